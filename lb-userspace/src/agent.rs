//! `lbd` as an agent: it owns the [`Balancer`] and the current [`Config`], and serves the
//! control API ([`crate::control`]) on a Unix socket.
//!
//! Every change is a transaction, one at a time (a mutex serializes them): clone the
//! configuration, apply the request to the clone, validate it, apply it to the datapath (on
//! failure the previous configuration is applied again), then write it to the configuration
//! file atomically (temporary file in the same directory, fsync, rename, fsync of the
//! directory; on failure the datapath is rolled back too). A rejected request changes neither
//! the maps nor the file, and a restart comes back with exactly what was last accepted.
//!
//! Health checks (`[vip.health]`) are runtime state, never written to the file: the agent runs
//! a [`Prober`] for every backend of such VIPs (restarted after every accepted change or
//! reload), feeds each outcome to that backend's [`HealthState`], and when a backend's status
//! changes applies the datapath again. A down backend gets weight 0 in the table and the DOWN
//! flag in its datapath entry (its established flows are steered again at once); a backend on
//! probation comes back with a quarter of its weight (slow start), then all of it once up.
use crate::{
    config::{self, Config},
    control::{
        events::{self, Journal},
        parse_backend_address, BackendEntry, BackendStatsEntry, Changed, Handler, ModelBackend,
        ModelDecisionEntry, ModelVip, Request, Response, StatsSnapshot, Status, TableChange,
        VipEntry, VipName, VipStatsEntry, VipStatus,
    },
    datapath::{ApplyReport, Balancer, VipId},
    health::{HealthConfig, HealthState, HealthStatus, ProbeReport, ProbeTarget, Prober},
    model::{self, table_weight, BackendDecision, BackendInput, PolicyState, Sample, Window},
};
use anyhow::{anyhow, bail, Context as _, Result};
use lb_common::BackendStats;
use std::{
    collections::{BTreeMap, VecDeque},
    fs,
    io::Write as _,
    net::IpAddr,
    os::unix::fs::{MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Instant, SystemTime, UNIX_EPOCH},
};
use tokio::sync::{mpsc, Mutex};
use tracing::{debug, error, info, warn};

/// What the mutex protects: the datapath and the configuration it was built from.
struct State {
    lb: Balancer,
    config: Config,
    /// The configuration file's text as lbd last read or wrote it. A change made with lbctl is
    /// refused while the file holds something else (an operator's edit not yet reloaded), so
    /// that writing the file never throws such an edit away.
    file_text: Option<String>,
    /// Health of every backend of the VIPs with `[vip.health]`.
    health: HealthMap,
    /// The learning model of every VIP with `[vip.learning]` enabled (runtime state only).
    learning: LearnMap,
    /// Learned table weights in force, by (VIP, backend) (runtime state, never persisted).
    learned: Learned,
    /// Refused fits since start, by refusal (`lb_model_refusals_total`).
    refusals: BTreeMap<String, u64>,
}

/// Learned table weights by (VIP, backend).
type Learned = BTreeMap<HealthKey, u32>;
type LearnMap = BTreeMap<VipId, VipLearning>;

/// Decisions kept per backend for `lbctl model show`.
const DECISIONS_KEPT: usize = 10;

/// One VIP's learning state.
#[derive(Debug, Clone)]
struct VipLearning {
    settings: config::Learning,
    policy: PolicyState,
    backends: BTreeMap<IpAddr, LearnedBackend>,
    next_step: Instant,
    last_slots_moved: usize,
    last_slots_moved_gradual: usize,
    max_slots_moved_gradual: usize,
    /// Slowest single fit and slowest whole step (fits, decision, table checks) since start,
    /// in microseconds: the model's cost, shown by `lbctl model show`.
    max_fit_us: u64,
    max_step_us: u64,
    /// CPU time of the most recent fits (at most `FIT_TIMES` of them), for their 99th
    /// percentile: the slowest one alone also carries whatever the kernel charged to the
    /// thread while it ran (softirq work of the traffic being balanced, without
    /// IRQ time accounting).
    fit_us: VecDeque<u32>,
}

/// Fits whose CPU time `lbctl model show` summarises.
const FIT_TIMES: usize = 4096;

/// One backend's samples, counters and last decisions.
#[derive(Debug, Clone)]
struct LearnedBackend {
    window: Window,
    counters: Option<(Instant, BackendStats)>,
    last: Option<BackendDecision>,
    history: VecDeque<ModelDecisionEntry>,
}

impl LearnedBackend {
    fn new(interval_ms: u64) -> Self {
        // Two minutes of samples at most, and at most 120 of them.
        let secs = (interval_ms as f64 / 1000.0 * 120.0).min(120.0);
        LearnedBackend {
            window: Window::new(secs, 120),
            counters: None,
            last: None,
            history: VecDeque::new(),
        }
    }
}

/// `learning` brought in line with `cfg`: a state for every VIP with learning enabled, carried
/// over while its settings are unchanged (new settings start the model again); backends no
/// longer configured are forgotten.
fn sync_learning(learning: &LearnMap, learned: &Learned, cfg: &Config) -> (LearnMap, Learned) {
    let mut out = LearnMap::new();
    let mut weights = Learned::new();
    for v in &cfg.vips {
        let Some(l) = v.learning.as_ref().filter(|l| l.enabled) else {
            continue;
        };
        let id = vip_id(v);
        let mut state = match learning.get(&id) {
            Some(old) if old.settings == *l => old.clone(),
            _ => VipLearning {
                settings: l.clone(),
                policy: PolicyState::default(),
                backends: BTreeMap::new(),
                next_step: Instant::now(),
                last_slots_moved: 0,
                last_slots_moved_gradual: 0,
                max_slots_moved_gradual: 0,
                max_fit_us: 0,
                max_step_us: 0,
                fit_us: VecDeque::new(),
            },
        };
        state
            .backends
            .retain(|a, _| v.backends.iter().any(|b| b.address == *a));
        if learning.get(&id).is_some_and(|old| old.settings == *l) {
            for b in &v.backends {
                if let Some(w) = learned.get(&(id, b.address)) {
                    weights.insert((id, b.address), *w);
                }
            }
        }
        out.insert(id, state);
    }
    (out, weights)
}

/// A refusal's name, as the `reason` label of `lb_model_refusals_total`.
/// The model's policy for a VIP with this table size. Built here, not in `config`, so that
/// the configuration does not depend on the model that reads it.
fn weight_policy(l: &config::Learning, table_size: u32) -> model::WeightPolicy {
    model::WeightPolicy {
        learning: l.enabled,
        table_size,
        latency_target_ms: l.latency_target_ms,
        floor: l.floor,
        ceiling: l.ceiling,
        max_step_ratio: l.max_step,
        deadband: l.deadband,
        disruption_budget: l.disruption_budget,
        max_drained_share: l.max_drained_share,
        // At most one change of direction per backend per minute, whatever the step.
        reversal_hold_steps: 60_000u64
            .div_ceil(l.interval_ms.max(1))
            .min(u64::from(u32::MAX)) as u32,
        ..Default::default()
    }
}

fn refusal_name(r: &model::Refusal) -> &'static str {
    match r {
        model::Refusal::TooFewSamples { .. } => "too_few_samples",
        model::Refusal::NoLoadVariation { .. } => "no_load_variation",
        model::Refusal::PoorFit { .. } => "poor_fit",
        model::Refusal::NonPhysical { .. } => "non_physical",
        model::Refusal::Numerical { .. } => "numerical",
    }
}

/// Backends by (VIP, address).
type HealthKey = (VipId, IpAddr);
type HealthMap = BTreeMap<HealthKey, BackendHealth>;
/// A probe's key: the prober generation it belongs to, then the backend.
type ProbeKey = (u64, VipId, IpAddr);

/// One health-checked backend, as the agent tracks it.
#[derive(Debug, Clone)]
struct BackendHealth {
    config: HealthConfig,
    state: HealthState,
    last_probe_ms: Option<f64>,
    last_error: Option<String>,
    /// Probes since the learning loop last took a sample: latency sum (failures at the
    /// timeout), count, failures.
    probe_sum_ms: f64,
    probes: u32,
    probe_failures: u32,
}

/// The probers running, and where their reports go.
#[derive(Default)]
struct Probes {
    /// Bumped at each restart: reports of an older generation are ignored.
    epoch: u64,
    prober: Option<Prober>,
    reports: Option<mpsc::Sender<ProbeReport<ProbeKey>>>,
}

/// Capacity of the probe report channel (probes wait for room: no unbounded queue).
const REPORT_QUEUE: usize = 1024;

/// The weight a backend on probation comes back with: a quarter of its configured weight
/// (at least 1), until probes bring it up.
pub fn slow_start_weight(weight: u32) -> u32 {
    if weight == 0 {
        0
    } else {
        (weight / 4).max(1)
    }
}

fn vip_id(v: &config::Vip) -> VipId {
    (v.address, v.port, v.protocol)
}

/// `health` brought in line with `cfg`: an entry for every backend of every VIP with
/// `[vip.health]`, carried over when its settings did not change. A new backend starts up (as
/// without health checks); one whose settings changed keeps being down if it was.
fn sync_health(health: &HealthMap, cfg: &Config) -> HealthMap {
    let mut out = HealthMap::new();
    for v in &cfg.vips {
        let Some(h) = &v.health else { continue };
        let hc = h.to_config(v.port);
        for b in &v.backends {
            let key = (vip_id(v), b.address);
            let entry = match health.get(&key) {
                Some(old) if old.config == hc => old.clone(),
                old => BackendHealth {
                    state: match old.map(|o| o.state.probed_status()) {
                        Some(HealthStatus::Down | HealthStatus::Probation) => {
                            HealthState::new_down(hc.rise, hc.fall)
                        }
                        _ => HealthState::new(hc.rise, hc.fall),
                    },
                    config: hc.clone(),
                    last_probe_ms: old.and_then(|o| o.last_probe_ms),
                    last_error: old.and_then(|o| o.last_error.clone()),
                    probe_sum_ms: 0.0,
                    probes: 0,
                    probe_failures: 0,
                },
            };
            out.insert(key, entry);
        }
    }
    out
}

/// What the probes say of a backend (`Up` without health checks).
fn probed(health: &HealthMap, vip: VipId, addr: IpAddr) -> HealthStatus {
    health
        .get(&(vip, addr))
        .map_or(HealthStatus::Up, |h| h.state.probed_status())
}

/// The configuration the datapath is built from: `cfg` with the weight of every down backend
/// at 0 and of every backend on probation reduced ([`slow_start_weight`]). VIPs with learning
/// enabled are built with table weights (configured × 100, or the learned weight in force):
/// the same table as the configured weights until the model changes one. Health still wins.
fn effective(cfg: &Config, health: &HealthMap, learned: &Learned) -> Config {
    let mut out = cfg.clone();
    for v in &mut out.vips {
        if v.health.is_none() {
            continue;
        }
        let id = vip_id(v);
        if v.learning_enabled() {
            for b in &mut v.backends {
                b.weight = learning_weight(b, id, health, learned);
            }
            // Tables depend only on weight ratios; keep within what the datapath accepts.
            let max = v.backends.iter().map(|b| b.weight).max().unwrap_or(0);
            if max > config::MAX_WEIGHT {
                for b in &mut v.backends {
                    if b.weight > 0 {
                        b.weight = ((u64::from(b.weight) * u64::from(config::MAX_WEIGHT)
                            / u64::from(max)) as u32)
                            .max(1);
                    }
                }
            }
            continue;
        }
        for b in &mut v.backends {
            match probed(health, id, b.address) {
                HealthStatus::Down => b.weight = 0,
                HealthStatus::Probation => b.weight = slow_start_weight(b.weight),
                _ => {}
            }
        }
    }
    out
}

/// The table weight of backend `b` of a learning VIP `id`, before any scaling: the learned
/// weight in force (configured × 100 without one; 0 after being out of the table, until the
/// model's next step brings it back), 0 while down or drained, at most the slow start on
/// probation.
fn learning_weight(b: &config::Backend, id: VipId, health: &HealthMap, learned: &Learned) -> u32 {
    let tw = table_weight(b.weight);
    let w = learned.get(&(id, b.address)).copied().unwrap_or(tw);
    if b.drained {
        return 0;
    }
    match probed(health, id, b.address) {
        HealthStatus::Down => 0,
        HealthStatus::Probation => w.min(slow_start_weight(tw)),
        _ => w,
    }
}

/// Applies `cfg` as `health` has it: DOWN flags of backends no longer down cleared first (so
/// that the slots they get back lead somewhere), the tables, then the DOWN flag of every down
/// backend set (its established flows move at once).
impl State {
    /// Applies the current configuration with the runtime health and learned weights.
    fn reapply(&mut self) -> Result<ApplyReport> {
        apply_datapath(&mut self.lb, &self.config, &self.health, &self.learned)
    }
}

fn apply_datapath(
    lb: &mut Balancer,
    cfg: &Config,
    health: &HealthMap,
    learned: &Learned,
) -> Result<ApplyReport> {
    let applied: Vec<HealthKey> = lb
        .vips()
        .flat_map(|v| {
            v.backends
                .iter()
                .map(move |b| (vip_id(&v.config), b.address))
        })
        .collect();
    for (vip, addr) in applied {
        if probed(health, vip, addr) != HealthStatus::Down
            && lb.backend_down(vip, addr) == Some(true)
        {
            lb.set_backend_down(vip, addr, false)?;
        }
    }
    let report = lb.apply(&effective(cfg, health, learned))?;
    for ((vip, addr), h) in health {
        if h.state.probed_status() == HealthStatus::Down {
            lb.set_backend_down(*vip, *addr, true)?;
        }
    }
    Ok(report)
}

/// A backend's health as `backend list` and the metrics show it: (up, state, last probe).
fn shown_health<'a>(
    health: &'a HealthMap,
    vip: VipId,
    b: &config::Backend,
) -> (bool, HealthStatus, Option<&'a BackendHealth>) {
    let h = health.get(&(vip, b.address));
    let probed = h.map_or(HealthStatus::Up, |h| h.state.probed_status());
    let shown = if b.drained {
        HealthStatus::Draining
    } else {
        probed
    };
    (probed != HealthStatus::Down, shown, h)
}

/// The configured backend `addr` of `vip` (the datapath's copy has effective weights).
fn configured(cfg: &Config, vip: VipId, addr: IpAddr) -> Option<&config::Backend> {
    cfg.vips
        .iter()
        .find(|v| vip_id(v) == vip)?
        .backends
        .iter()
        .find(|b| b.address == addr)
}

/// The running agent. Share it as `Arc<Agent>` between the control socket, the metrics
/// endpoint and the signal loop.
pub struct Agent {
    state: Mutex<State>,
    config_path: PathBuf,
    started: Instant,
    /// Locked after `state` when both are needed.
    probes: std::sync::Mutex<Probes>,
    /// What happened, for `lbctl status` (see [`crate::control::events`]).
    events: Arc<Journal>,
}

impl Agent {
    /// Takes over a loaded, attached balancer that `config` (read from `config_path`) was
    /// applied to.
    pub fn new(
        config_path: &Path,
        config: Config,
        lb: Balancer,
        events: Arc<Journal>,
    ) -> Arc<Self> {
        let file_text = fs::read_to_string(config_path).ok();
        let health = sync_health(&HealthMap::new(), &config);
        let (learning, learned) = sync_learning(&LearnMap::new(), &Learned::new(), &config);
        Arc::new(Agent {
            state: Mutex::new(State {
                lb,
                config,
                file_text,
                health,
                learning,
                learned,
                refusals: BTreeMap::new(),
            }),
            config_path: config_path.to_path_buf(),
            started: Instant::now(),
            probes: std::sync::Mutex::new(Probes::default()),
            events,
        })
    }

    /// The journal `lbctl status` shows.
    pub fn events(&self) -> &Arc<Journal> {
        &self.events
    }

    /// Starts health checking (needs the tokio runtime): a probe task per backend of every VIP
    /// with `[vip.health]`, the task that acts on their reports, and the learning loop
    /// ([`Agent::start_learning`]). Also clears DOWN flags a
    /// previous lbd left in pinned maps: every backend starts up.
    pub async fn start_health(self: &Arc<Self>) -> Result<()> {
        let (tx, mut rx) = mpsc::channel(REPORT_QUEUE);
        self.probes.lock().expect("probes lock").reports = Some(tx);
        let agent = Arc::downgrade(self);
        tokio::spawn(async move {
            while let Some(report) = rx.recv().await {
                let Some(agent) = agent.upgrade() else { return };
                agent.on_probe(report).await;
            }
        });
        let mut st = self.state.lock().await;
        st.reapply().context("applying the backends' health")?;
        self.restart_probes(&st);
        drop(st);
        // The learning loop feeds on the probes: it starts with them.
        self.start_learning();
        Ok(())
    }

    /// Replaces the probers with ones for the backends in `st.health`, each starting from the
    /// state the agent has for it.
    fn restart_probes(&self, st: &State) {
        let mut p = self.probes.lock().expect("probes lock");
        p.epoch += 1;
        p.prober = None;
        let Some(tx) = p.reports.clone() else { return };
        if st.health.is_empty() {
            return;
        }
        let epoch = p.epoch;
        let targets = st
            .health
            .iter()
            .map(|((vip, addr), h)| ProbeTarget {
                key: (epoch, *vip, *addr),
                probe: h.config.probe_for(*addr),
                interval: h.config.interval,
                state: h.state.clone(),
            })
            .collect::<Vec<_>>();
        debug!(backends = targets.len(), "health checks (re)started");
        p.prober = Some(Prober::spawn(targets, tx));
    }

    /// One probe outcome: updates the backend's health and, when its status changed, the
    /// datapath.
    async fn on_probe(&self, report: ProbeReport<ProbeKey>) {
        let (epoch, vip, addr) = report.key;
        let mut st = self.state.lock().await;
        if epoch != self.probes.lock().expect("probes lock").epoch {
            return;
        }
        let Some(h) = st.health.get_mut(&(vip, addr)) else {
            return;
        };
        let result = report.result;
        h.last_probe_ms = Some(result.latency_ms());
        h.last_error = result.error.clone();
        h.probe_sum_ms += result.latency_ms();
        h.probes += 1;
        h.probe_failures += u32::from(!result.ok);
        let before = h.state.probed_status();
        h.state.on_probe(&result);
        let after = h.state.probed_status();
        if before == after {
            return;
        }
        let name = VipName {
            address: vip.0,
            port: vip.1,
            protocol: vip.2,
        };
        let error = result.error.as_deref().unwrap_or("");
        match after {
            HealthStatus::Down => warn!(
                vip = %name,
                backend = %addr,
                from = %before,
                error,
                consecutive_failures = h.state.consecutive_failures(),
                "backend down: no new flows, its established flows are steered to other backends"
            ),
            HealthStatus::Probation => info!(
                vip = %name,
                backend = %addr,
                latency_ms = result.latency_ms(),
                "backend passing again: on probation at a reduced weight (slow start)"
            ),
            _ => info!(
                vip = %name,
                backend = %addr,
                from = %before,
                latency_ms = result.latency_ms(),
                "backend up: full weight"
            ),
        }
        let failures = h.state.consecutive_failures();
        self.events.health(
            &name.to_string(),
            addr,
            before,
            after,
            error,
            failures,
            result.latency_ms(),
        );
        match st.reapply() {
            Ok(r) => {
                for (vip, moved, generation) in &r.tables {
                    info!(%vip, moved, generation, "table updated");
                }
            }
            Err(e) => {
                error!(vip = %name, backend = %addr, "applying a health change failed: {e:#}")
            }
        }
    }

    /// Starts the learning loop (needs the tokio runtime): every VIP with `[vip.learning]`
    /// enabled takes one step per `interval_ms` (see [`Agent::learn_step`]).
    pub fn start_learning(self: &Arc<Self>) {
        let agent = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_millis(50));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(agent) = agent.upgrade() else { return };
                agent.learn_due().await;
            }
        });
    }

    /// Takes a step for every VIP whose interval has passed.
    async fn learn_due(&self) {
        let mut st = self.state.lock().await;
        let now = Instant::now();
        let due: Vec<VipId> = st
            .learning
            .iter()
            .filter(|(_, l)| l.next_step <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            if let Some(l) = st.learning.get_mut(&id) {
                l.next_step = now + std::time::Duration::from_millis(l.settings.interval_ms);
            }
            let t_secs = self.started.elapsed().as_secs_f64();
            if let Err(e) = learn_step(&mut st, id, now, t_secs) {
                let name = VipName {
                    address: id.0,
                    port: id.1,
                    protocol: id.2,
                };
                error!(vip = %name, "learning step failed; weights unchanged: {e:#}");
            }
        }
    }

    async fn model_show(&self, vip: Option<&str>) -> Result<Response> {
        let want = match vip {
            Some(v) => Some(v.parse::<VipName>().map_err(|e| anyhow!(e))?),
            None => None,
        };
        let st = self.state.lock().await;
        if let Some(w) = want {
            let Some(v) = st.config.vips.iter().find(|v| VipName::of(v) == w) else {
                return Ok(Response::error(unknown_vip(&w)));
            };
            if !v.learning_enabled() {
                return Ok(Response::error(format!(
                    "vip {w}: learning is not enabled; add [vip.learning] with enabled = true (and [vip.health]) to its configuration and reload lbd"
                )));
            }
        }
        let mut out = Vec::new();
        for v in st.lb.vips() {
            let name = VipName::of(&v.config);
            if want.is_some_and(|w| w != name) {
                continue;
            }
            let vid = vip_id(&v.config);
            let Some(l) = st.learning.get(&vid) else {
                continue;
            };
            let policy = weight_policy(&l.settings, v.config.table_size);
            let mut backends = Vec::new();
            for b in &v.backends {
                let Some(cfg) = configured(&st.config, vid, b.address) else {
                    continue;
                };
                let (_, shown, _) = shown_health(&st.health, vid, cfg);
                let lbk = l.backends.get(&b.address);
                let last = lbk.and_then(|x| x.last.as_ref());
                let refusal = last.and_then(|d| d.refusal.clone()).or_else(|| {
                    // Before the first step: nothing sampled yet.
                    last.is_none().then_some(model::Refusal::TooFewSamples {
                        have: lbk.map_or(0, |x| x.window.len()),
                        need: policy.fit.min_samples,
                    })
                });
                backends.push(ModelBackend {
                    address: b.address,
                    id: b.id,
                    health: shown.to_string(),
                    pinned: cfg.pinned,
                    learning: true,
                    configured_weight: cfg.weight,
                    configured_table_weight: table_weight(cfg.weight),
                    current_weight: learning_weight(cfg, vid, &st.health, &st.learned),
                    target_weight: last.and_then(|d| d.target_weight),
                    drained_by_model: last.is_some_and(|d| d.drained),
                    samples: lbk.map_or(0, |x| x.window.len()),
                    fit: last.and_then(|d| d.fit),
                    refusal: refusal.as_ref().map(|r| r.to_string()),
                    refusal_detail: refusal,
                    capacity_at_target: last.and_then(|d| d.capacity_at_target),
                    predicted_latency_ms: last
                        .and_then(|d| d.predicted_latency_ms)
                        .filter(|x| x.is_finite()),
                    observed: last.and_then(|d| d.observed),
                    decisions: lbk.map_or_else(Vec::new, |x| x.history.iter().cloned().collect()),
                });
            }
            out.push(ModelVip {
                vip: name.to_string(),
                learning: true,
                interval_ms: l.settings.interval_ms,
                latency_target_ms: l.settings.latency_target_ms,
                step: l.policy.step,
                table_size: v.config.table_size,
                slots_budget: (policy.disruption_budget * f64::from(v.config.table_size)).floor()
                    as usize,
                last_slots_moved: l.last_slots_moved,
                last_slots_moved_gradual: l.last_slots_moved_gradual,
                max_slots_moved_gradual: l.max_slots_moved_gradual,
                max_fit_us: l.max_fit_us,
                fit_p99_us: {
                    let mut v: Vec<u32> = l.fit_us.iter().copied().collect();
                    v.sort_unstable();
                    v.get((v.len() * 99 / 100).min(v.len().saturating_sub(1)))
                        .map_or(0, |&x| u64::from(x))
                },
                fits: l.fit_us.len(),
                max_step_us: l.max_step_us,
                backends,
            });
        }
        Ok(Response::ok(out))
    }

    /// The configuration currently applied.
    pub async fn config(&self) -> Config {
        self.state.lock().await.config.clone()
    }

    /// Detaches the balancer (on stop). The agent answers no further changes meaningfully
    /// after this; call it last.
    pub async fn detach(&self) -> Result<()> {
        self.state.lock().await.lb.detach()
    }

    /// Runs `f` with the balancer, under the same lock as changes.
    pub async fn with_balancer<T>(&self, f: impl FnOnce(&mut Balancer, &Config) -> T) -> T {
        let mut st = self.state.lock().await;
        let State { lb, config, .. } = &mut *st;
        f(lb, config)
    }

    /// SIGHUP: re-reads the configuration file and applies it, as one more serialized change.
    /// A file that is invalid, or that changes settings fixed at start, changes nothing.
    pub async fn reload(&self) -> Result<ApplyReport> {
        let mut guard = self.state.lock().await;
        let st = &mut *guard;
        let path = self.config_path.display();
        let text = fs::read_to_string(&self.config_path).map_err(|e| {
            anyhow!("reload rejected, nothing changed: cannot read config file {path}: {e}")
        })?;
        let new = Config::parse(&text)
            .map_err(|e| anyhow!("reload rejected, nothing changed: config file {path}: {e}"))?;
        let fixed = st.config.restart_only_changes(&new);
        if !fixed.is_empty() {
            bail!(
                "reload rejected, nothing changed: {} only change on restart",
                fixed.join(", ")
            );
        }
        let prev = st.config.clone();
        let _busy =
            self.events
                .begin_change("reload (SIGHUP)", st.file_text.as_deref(), Some(&text));
        let health = sync_health(&st.health, &new);
        let (learning, learned) = sync_learning(&st.learning, &st.learned, &new);
        match apply_datapath(&mut st.lb, &new, &health, &learned) {
            Ok(r) => {
                st.config = new;
                st.file_text = Some(text);
                st.health = health;
                st.learning = learning;
                st.learned = learned;
                self.restart_probes(st);
                Ok(r)
            }
            Err(e) => {
                rollback(&mut st.lb, &prev, &st.health, &st.learned);
                Err(e.context("reload failed; the previous configuration stays applied"))
            }
        }
    }

    /// Answers one control request.
    pub async fn handle(&self, req: Request) -> Response {
        let result = match req {
            Request::VipList => self.vip_list().await.map(Response::ok),
            Request::BackendList { vip } => self.backend_list(vip.as_deref()).await,
            Request::ModelShow { vip } => self.model_show(vip.as_deref()).await,
            Request::Stats => self.snapshot().await.map(Response::ok),
            Request::Status => self.status().await.map(Response::ok),
            other => {
                let r = self.change(other).await;
                if let Err(e) = &r {
                    self.events.record(
                        events::change_failure_kind(e),
                        format!("lbctl change: {e:#}"),
                    );
                }
                r.map(Response::ok)
            }
        };
        result.unwrap_or_else(|e| Response::error(format!("{e:#}")))
    }

    async fn vip_list(&self) -> Result<Vec<VipEntry>> {
        let st = self.state.lock().await;
        Ok(st
            .lb
            .vips()
            .map(|v| VipEntry {
                vip: VipName::of(&v.config).to_string(),
                address: v.config.address,
                port: v.config.port,
                protocol: v.config.protocol,
                forwarding: v.config.forwarding,
                table_size: v.config.table_size,
                generation: v.generation,
                datapath_generation: st.lb.vip_meta(&v.config).map(|m| m.generation),
                backends: v.config.backends.len(),
                drained: v.config.backends.iter().filter(|b| b.drained).count(),
            })
            .collect())
    }

    async fn backend_list(&self, vip: Option<&str>) -> Result<Response> {
        let want = match vip {
            Some(v) => Some(v.parse::<VipName>().map_err(|e| anyhow!(e))?),
            None => None,
        };
        let st = self.state.lock().await;
        if let Some(w) = want {
            if !st.lb.vips().any(|v| VipName::of(&v.config) == w) {
                return Ok(Response::error(unknown_vip(&w)));
            }
        }
        let mut out = Vec::new();
        for v in st.lb.vips() {
            let name = VipName::of(&v.config);
            if want.is_some_and(|w| w != name) {
                continue;
            }
            let vid = vip_id(&v.config);
            for (b, applied) in v.backends.iter().zip(&v.config.backends) {
                let cfg = configured(&st.config, vid, b.address).unwrap_or(applied);
                let (up, shown, h) = shown_health(&st.health, vid, cfg);
                out.push(BackendEntry {
                    vip: name.to_string(),
                    address: b.address,
                    weight: cfg.weight,
                    drained: cfg.drained,
                    effective_weight: b.weight,
                    slots: b.slots,
                    up,
                    health: shown.to_string(),
                    last_probe_ms: h.and_then(|h| h.last_probe_ms),
                    last_error: h.and_then(|h| h.last_error.clone()),
                    id: b.id,
                });
            }
        }
        Ok(Response::ok(out))
    }

    /// Statistics of every VIP and backend and every datapath counter, at one instant.
    pub async fn snapshot(&self) -> Result<StatsSnapshot> {
        let st = self.state.lock().await;
        let mut vips = Vec::new();
        for v in st.lb.vips() {
            let s = st.lb.vip_stats(v.vip_id)?;
            let mut backends = Vec::new();
            let vid = vip_id(&v.config);
            for (b, applied) in v.backends.iter().zip(&v.config.backends) {
                let bs = st.lb.backend_stats(b.id)?;
                let cfg = configured(&st.config, vid, b.address).unwrap_or(applied);
                let (up, shown, _) = shown_health(&st.health, vid, cfg);
                backends.push(BackendStatsEntry {
                    address: b.address,
                    weight: cfg.weight,
                    effective_weight: b.weight,
                    drained: cfg.drained,
                    up,
                    health: shown.to_string(),
                    packets: bs.packets,
                    bytes: bs.bytes,
                    new_flows: bs.new_flows,
                    syn_retries: bs.syn_retries,
                    client_rsts: bs.client_rsts,
                    resteered: bs.resteered,
                    learned_weight: st.learning.get(&vid).map(|_| b.weight),
                    fit_r2: st
                        .learning
                        .get(&vid)
                        .and_then(|l| l.backends.get(&b.address))
                        .and_then(|lb| lb.last.as_ref())
                        .and_then(|d| d.fit)
                        .map(|f| f.r2),
                    rates: None,
                });
            }
            vips.push(VipStatsEntry {
                vip: VipName::of(&v.config).to_string(),
                packets: s.packets,
                bytes: s.bytes,
                new_flows: s.new_flows,
                no_backend: s.no_backend,
                generation: v.generation,
                rates: None,
                backends,
            });
        }
        let counters = st
            .lb
            .counters()?
            .into_iter()
            .map(|(c, n)| (c.name().to_string(), n))
            .collect();
        Ok(StatsSnapshot {
            timestamp_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            vips,
            counters,
            model_refusals: st.refusals.clone(),
            interval_seconds: None,
        })
    }

    async fn status(&self) -> Result<Status> {
        let st = self.state.lock().await;
        let (interface, mode) = match st.lb.interface() {
            Some((name, mode)) => (name.to_string(), xdp_mode_name(mode)),
            None => (st.config.interface.clone(), "detached"),
        };
        let program_id = st
            .lb
            .program()
            .info()
            .context("reading the balancer program's id")?
            .id();
        Ok(Status {
            version: env!("CARGO_PKG_VERSION").to_string(),
            pid: std::process::id(),
            interface,
            xdp_mode: mode.to_string(),
            program_id,
            uptime_seconds: self.started.elapsed().as_secs(),
            config_file: self.config_path.display().to_string(),
            control_socket: st.config.control_socket.display().to_string(),
            metrics_listen: st.config.metrics_listen.to_string(),
            events: self.events.recent(),
            vips: st
                .lb
                .vips()
                .map(|v| VipStatus {
                    vip: VipName::of(&v.config).to_string(),
                    generation: v.generation,
                    table_size: v.config.table_size,
                    backends: v.backends.len(),
                })
                .collect(),
        })
    }

    /// One mutating request, as a transaction (see the module docs).
    async fn change(&self, req: Request) -> Result<Changed> {
        let mut guard = self.state.lock().await;
        let st = &mut *guard;
        let prev = st.config.clone();
        let mut next = prev.clone();
        let message = edit(&mut next, &req)?;
        if next == prev {
            return Ok(Changed {
                message: format!("{message} (already so: nothing changed)"),
                changed: false,
                tables: Vec::new(),
            });
        }
        next.validate()?;
        let on_disk = fs::read_to_string(&self.config_path).ok();
        if on_disk.is_none() || on_disk != st.file_text {
            bail!(
                "config file {}: {} since lbd last read or wrote it, and saving this change would overwrite that; nothing changed. Apply the edit first (systemctl reload lbd, or kill -HUP the lbd process) or undo it, then retry",
                self.config_path.display(),
                if on_disk.is_none() { "cannot be read" } else { "edited" }
            );
        }
        let next_text = next.to_toml().ok();
        let _busy =
            self.events
                .begin_change(&message, st.file_text.as_deref(), next_text.as_deref());
        let health = sync_health(&st.health, &next);
        let (learning, learned) = sync_learning(&st.learning, &st.learned, &next);
        let report = match apply_datapath(&mut st.lb, &next, &health, &learned) {
            Ok(r) => r,
            Err(e) => {
                rollback(&mut st.lb, &prev, &st.health, &st.learned);
                return Err(e.context(events::RolledBack(
                    "the datapath rejected the change; nothing changed",
                )));
            }
        };
        let written = match persist(&self.config_path, &next) {
            Ok(t) => t,
            Err(e) => {
                rollback(&mut st.lb, &prev, &st.health, &st.learned);
                return Err(e.context(events::RolledBack(
                    "the change was rolled back because the configuration file could not be written",
                )));
            }
        };
        st.config = next;
        st.file_text = Some(written);
        st.health = health;
        st.learning = learning;
        st.learned = learned;
        self.restart_probes(st);
        info!(request = ?req, "{message}");
        for (vip, moved, generation) in &report.tables {
            info!(%vip, moved, generation, "table updated");
        }
        Ok(Changed {
            message,
            changed: true,
            tables: report
                .tables
                .into_iter()
                .map(|(vip, slots_moved, generation)| TableChange {
                    vip,
                    slots_moved,
                    generation,
                })
                .collect(),
        })
    }
}

/// One learning step of VIP `id` (docs/model.md): a sample per backend from the datapath's
/// counters and the probes since the last step, a fit per backend, [`model::decide`], the
/// audit log, and the datapath when a weight changed.
/// CPU time used by the calling thread, in microseconds.
fn thread_cpu_us() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the clock id is a constant the kernel knows.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000
}

fn learn_step(st: &mut State, id: VipId, now: Instant, t_secs: f64) -> Result<()> {
    let State {
        lb,
        config,
        health,
        learning,
        learned,
        refusals,
        ..
    } = st;
    let Some(l) = learning.get_mut(&id) else {
        return Ok(());
    };
    let Some(vcfg) = config.vips.iter().find(|v| vip_id(v) == id) else {
        return Ok(());
    };
    let Some(applied) = lb.vips().find(|v| vip_id(&v.config) == id) else {
        return Ok(());
    };
    let name = VipName::of(vcfg);
    let policy = weight_policy(&l.settings, vcfg.table_size);
    let observe_secs = (5.0 * l.settings.interval_ms as f64 / 1000.0).max(1.0);
    let mut inputs = Vec::new();
    for b in &applied.backends {
        let Some(cfg) = configured(config, id, b.address) else {
            continue;
        };
        let stats = lb.backend_stats(b.id)?;
        let interval_ms = l.settings.interval_ms;
        let lbk = l
            .backends
            .entry(b.address)
            .or_insert_with(|| LearnedBackend::new(interval_ms));
        let h = health.get_mut(&(id, b.address));
        let probes = h.map(|h| {
            let out = (h.probe_sum_ms, h.probes, h.probe_failures);
            (h.probe_sum_ms, h.probes, h.probe_failures) = (0.0, 0, 0);
            out
        });
        let (_, status, _) = shown_health(health, id, cfg);
        let down = status == HealthStatus::Down;
        if down {
            // A down backend's probes fail at the timeout whatever its load: nothing to learn,
            // and those failures must not make it an outlier when it comes back.
            lbk.window.clear();
        }
        if let (Some((t0, s0)), Some((sum, n, failed)), false) = (lbk.counters, probes, down) {
            let dt = now.duration_since(t0).as_secs_f64();
            if dt > 0.0 && n > 0 {
                let rate = |a: u64, b: u64| a.saturating_sub(b) as f64 / dt;
                lbk.window.push(Sample {
                    t_secs,
                    load: rate(stats.new_flows, s0.new_flows),
                    latency_ms: sum / f64::from(n),
                    errors: f64::from(failed) / f64::from(n),
                    syn_retries_per_s: rate(stats.syn_retries, s0.syn_retries),
                    rsts_per_s: rate(stats.client_rsts, s0.client_rsts),
                });
            }
        }
        lbk.counters = Some((now, stats));
        let samples = lbk.window.samples();
        // CPU time of this thread: the fit's own cost, not the time another process had the
        // core (the agent shares the machine with the services it balances).
        let fit_started = thread_cpu_us();
        let fit = model::fit_with(&samples, &policy.fit);
        let fit_us = thread_cpu_us().saturating_sub(fit_started);
        l.max_fit_us = l.max_fit_us.max(fit_us);
        if l.fit_us.len() == FIT_TIMES {
            l.fit_us.pop_front();
        }
        l.fit_us
            .push_back(u32::try_from(fit_us).unwrap_or(u32::MAX));
        if let Err(r) = &fit {
            *refusals.entry(refusal_name(r).to_string()).or_default() += 1;
        }
        inputs.push(BackendInput {
            id: b.id,
            addr: b.address,
            configured_weight: cfg.weight,
            // Unscaled: the datapath's copy is scaled down when a weight exceeds MAX_WEIGHT.
            current_weight: learning_weight(cfg, id, health, learned),
            pinned: cfg.pinned.then_some(cfg.weight),
            learning: true,
            health: status,
            fit,
            observed: lbk.window.observed(observe_secs),
            peak_load: lbk.window.peak_load(),
            probe_timeout_ms: vcfg.health.as_ref().map(|h| h.timeout_ms as f64),
        });
    }
    let decision = model::decide(&inputs, &policy, &l.policy);
    l.max_step_us = l.max_step_us.max(now.elapsed().as_micros() as u64);
    l.policy = decision.state.clone();
    l.last_slots_moved = decision.slots_moved;
    l.last_slots_moved_gradual = decision.slots_moved_gradual;
    l.max_slots_moved_gradual = l.max_slots_moved_gradual.max(decision.slots_moved_gradual);
    for e in &decision.events {
        let json = serde_json::to_string(e).context("audit event as JSON")?;
        info!(target: "lb::audit", vip = %name, step = e.step, backend = %e.addr, audit = %json, "model {:?}: {} -> {}", e.kind, e.from_weight, e.to_weight);
    }
    if let Some(err) = &decision.table_error {
        warn!(vip = %name, step = decision.step, "learning: weights held, the table could not be checked: {err}");
    }
    for d in &decision.backends {
        if let Some(lbk) = l.backends.get_mut(&d.addr) {
            lbk.history.push_back(ModelDecisionEntry {
                step: decision.step,
                from_weight: d.previous_weight,
                to_weight: d.weight,
                target_weight: d.target_weight,
                reasons: d.reasons.iter().map(|r| r.to_string()).collect(),
            });
            while lbk.history.len() > DECISIONS_KEPT {
                lbk.history.pop_front();
            }
            lbk.last = Some(d.clone());
        }
        // Out of the table (down or drained by the operator) is weight 0 to the model too: when
        // the backend returns, it stays out until the next step decides how it comes back (a
        // slow start, or not yet if it is still an outlier). Forgetting the learned weight
        // instead put it straight back at its configured weight, past a model drain in force.
        let w = match d.health {
            HealthStatus::Up | HealthStatus::Probation => d.weight,
            _ => 0,
        };
        learned.insert((id, d.addr), w);
    }
    if decision.changed() {
        let step = serde_json::json!({
            "vip": name.to_string(),
            "step": decision.step,
            "slots_moved": decision.slots_moved,
            "slots_moved_gradual": decision.slots_moved_gradual,
            "slots_budget": decision.slots_budget,
            "table_size": decision.table_size,
            "weights": decision.backends.iter().map(|b| serde_json::json!({
                "backend": b.addr, "from": b.previous_weight, "to": b.weight
            })).collect::<Vec<_>>(),
        });
        info!(target: "lb::audit", vip = %name, step = decision.step, slots_moved = decision.slots_moved, slots_moved_gradual = decision.slots_moved_gradual, slots_budget = decision.slots_budget, audit_step = %step, "learned weights applied");
        let report =
            apply_datapath(lb, config, health, learned).context("applying the learned weights")?;
        for (vip, moved, generation) in &report.tables {
            info!(%vip, moved, generation, "table updated");
        }
    }
    Ok(())
}

/// Re-applies the configuration that was in force before a failed change, then checks that
/// the datapath's VIP entries are the ones lbd believes in (a failure in the middle of the
/// writes could leave one pointing at a table lbd did not keep; `apply` only rewrites tables it
/// thinks changed). A mismatch is logged loudly: restarting lbd rewrites everything.
fn rollback(lb: &mut Balancer, prev: &Config, health: &HealthMap, learned: &Learned) {
    if let Err(e) = apply_datapath(lb, prev, health, learned) {
        error!("rolling back to the previous configuration failed too: {e:#}");
    }
    for v in lb.vips() {
        let in_kernel = lb.vip_meta(&v.config).map(|m| m.generation);
        if in_kernel != Some(v.generation) {
            error!(
                vip = %VipName::of(&v.config),
                lbd = v.generation,
                datapath = ?in_kernel,
                "after the rollback the datapath's table generation differs from lbd's; restart lbd to rewrite the tables"
            );
        }
    }
}

fn unknown_vip(v: &VipName) -> String {
    format!(
        "vip {v}: no such VIP; `lbctl vip list` shows the configured ones, `lbctl vip add` adds one"
    )
}

fn find_vip<'a>(cfg: &'a mut Config, v: &VipName) -> Result<&'a mut config::Vip> {
    cfg.vips
        .iter_mut()
        .find(|x| VipName::of(x) == *v)
        .ok_or_else(|| anyhow!(unknown_vip(v)))
}

fn find_backend<'a>(
    vip: &'a mut config::Vip,
    name: &VipName,
    addr: std::net::IpAddr,
) -> Result<&'a mut config::Backend> {
    vip.backends
        .iter_mut()
        .find(|b| b.address == addr)
        .ok_or_else(|| {
            anyhow!(
                "backend {addr} of vip {name}: no such backend; `lbctl backend list {name}` shows them, `lbctl backend add` adds one"
            )
        })
}

fn parse_vip(s: &str) -> Result<VipName> {
    s.parse::<VipName>().map_err(|e| anyhow!(e))
}

fn parse_addr(s: &str) -> Result<std::net::IpAddr> {
    parse_backend_address(s).map_err(|e| anyhow!(e))
}

/// Applies a mutating request to a configuration; returns what was done, for the log and the
/// caller. Validation of the result is the caller's (`Config::validate`).
fn edit(cfg: &mut Config, req: &Request) -> Result<String> {
    match req {
        Request::VipAdd {
            vip,
            forwarding,
            table_size,
        } => {
            let name = parse_vip(vip)?;
            if cfg.vips.iter().any(|x| VipName::of(x) == name) {
                bail!("vip {name}: already configured; change its backends with `lbctl backend ...`, or `lbctl vip remove` it first to change its forwarding or table size");
            }
            let forwarding = forwarding.unwrap_or_default();
            let table_size = table_size.unwrap_or(lb_common::DEFAULT_TABLE_SIZE);
            cfg.vips.push(config::Vip {
                address: name.address,
                port: name.port,
                protocol: name.protocol,
                forwarding,
                table_size,
                health: None,
                learning: None,
                backends: Vec::new(),
            });
            Ok(format!(
                "added vip {name} (forwarding {}, table_size {table_size})",
                crate::datapath::forwarding_name(forwarding)
            ))
        }
        Request::VipRemove { vip } => {
            let name = parse_vip(vip)?;
            find_vip(cfg, &name)?;
            cfg.vips.retain(|x| VipName::of(x) != name);
            Ok(format!("removed vip {name}"))
        }
        Request::BackendAdd {
            vip,
            address,
            weight,
        } => {
            let name = parse_vip(vip)?;
            let addr = parse_addr(address)?;
            let v = find_vip(cfg, &name)?;
            if v.backends.iter().any(|b| b.address == addr) {
                bail!("backend {addr} of vip {name}: already a backend of this VIP; use `lbctl backend set-weight` to change its weight");
            }
            let weight = weight.unwrap_or(1);
            v.backends.push(config::Backend {
                address: addr,
                weight,
                drained: false,
                pinned: false,
            });
            Ok(format!(
                "added backend {addr} to vip {name} with weight {weight}"
            ))
        }
        Request::BackendRemove { vip, address } => {
            let name = parse_vip(vip)?;
            let addr = parse_addr(address)?;
            let v = find_vip(cfg, &name)?;
            find_backend(v, &name, addr)?;
            v.backends.retain(|b| b.address != addr);
            Ok(format!("removed backend {addr} from vip {name}"))
        }
        Request::BackendSetWeight {
            vip,
            address,
            weight,
        } => {
            let name = parse_vip(vip)?;
            let addr = parse_addr(address)?;
            let v = find_vip(cfg, &name)?;
            let b = find_backend(v, &name, addr)?;
            let old = b.weight;
            b.weight = *weight;
            Ok(format!(
                "backend {addr} of vip {name}: weight {old} -> {weight}{}",
                if b.drained {
                    " (drained: takes effect on undrain)"
                } else {
                    ""
                }
            ))
        }
        Request::BackendDrain { vip, address } | Request::BackendUndrain { vip, address } => {
            let drain = matches!(req, Request::BackendDrain { .. });
            let name = parse_vip(vip)?;
            let addr = parse_addr(address)?;
            let v = find_vip(cfg, &name)?;
            let b = find_backend(v, &name, addr)?;
            b.drained = drain;
            Ok(if drain {
                format!("backend {addr} of vip {name}: drained (no new flows; established flows continue)")
            } else {
                format!(
                    "backend {addr} of vip {name}: undrained (weight {} again)",
                    b.weight
                )
            })
        }
        Request::VipList
        | Request::BackendList { .. }
        | Request::ModelShow { .. }
        | Request::Stats
        | Request::Status => {
            bail!("internal error: {req:?} is not a change")
        }
    }
}

/// Writes the configuration to `path` atomically: a temporary file in the same directory
/// (same owner and mode as the file it replaces), fsync, rename over the file, fsync of the
/// directory. A symlink is followed, so the file it points to is the one replaced. Returns the
/// text written.
pub fn persist(path: &Path, cfg: &Config) -> Result<String> {
    let text = cfg.to_toml()?;
    let target = fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let dir = match target.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_name = target
        .file_name()
        .ok_or_else(|| anyhow!("config file {}: not a file path", path.display()))?
        .to_string_lossy()
        .into_owned();
    let tmp = dir.join(format!(".{file_name}.lbd-{}.tmp", std::process::id()));
    let old = fs::metadata(&target).ok();
    let mode = old
        .as_ref()
        .map_or(0o644, |m| m.permissions().mode() & 0o7777);
    let write = || -> std::io::Result<()> {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        if let Some(m) = &old {
            std::os::unix::fs::fchown(&f, Some(m.uid()), Some(m.gid()))?;
        }
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, &target)?;
        fs::File::open(&dir)?.sync_all()
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&tmp);
        anyhow!(
            "config file {}: cannot write it ({e}); check that lbd may write to {}",
            target.display(),
            dir.display()
        )
    })?;
    Ok(text)
}

/// The control socket hands every request to the agent.
impl Handler for Agent {
    fn handle(&self, req: Request) -> impl std::future::Future<Output = Response> + Send {
        Agent::handle(self, req)
    }
}

/// How `status` names an attach mode.
pub fn xdp_mode_name(m: aya::programs::XdpMode) -> &'static str {
    match m {
        aya::programs::XdpMode::Driver => "native",
        aya::programs::XdpMode::Skb => "generic",
        aya::programs::XdpMode::Hardware => "offload",
        aya::programs::XdpMode::Default => "default",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Config {
        Config::parse(
            "interface = \"eth0\"\n[encap]\nsource_v4 = \"10.0.0.2\"\n\n[[vip]]\naddress = \"10.0.0.100\"\nport = 80\nprotocol = \"tcp\"\n[[vip.backend]]\naddress = \"10.0.0.11\"\n",
        )
        .unwrap()
    }

    fn try_edit(req: Request) -> Result<Config, String> {
        let mut c = base();
        edit(&mut c, &req).map_err(|e| e.to_string())?;
        c.validate().map_err(|e| e.to_string())?;
        Ok(c)
    }

    const VIP: &str = "10.0.0.100:80/tcp";

    #[test]
    fn edits_and_their_errors() {
        let c = try_edit(Request::BackendAdd {
            vip: VIP.into(),
            address: "10.0.0.12".into(),
            weight: Some(3),
        })
        .unwrap();
        assert_eq!(c.vips[0].backends[1].weight, 3);
        let c = try_edit(Request::BackendDrain {
            vip: VIP.into(),
            address: "10.0.0.11".into(),
        })
        .unwrap();
        assert!(c.vips[0].backends[0].drained);
        assert_eq!(c.vips[0].backends[0].weight, 1);

        let e = |r| try_edit(r).unwrap_err();
        assert!(e(Request::VipAdd {
            vip: VIP.into(),
            forwarding: None,
            table_size: None
        })
        .contains("already configured"));
        assert!(e(Request::VipAdd {
            vip: "10.0.0.101:80/tcp".into(),
            forwarding: None,
            table_size: Some(65536)
        })
        .contains("table_size 65536 is not prime"));
        assert!(e(Request::VipAdd {
            vip: "[fd00::1]:80/tcp".into(),
            forwarding: None,
            table_size: None
        })
        .contains("needs encap.source_v6"));
        assert!(e(Request::VipRemove {
            vip: "10.0.0.9:80/tcp".into()
        })
        .contains("vip 10.0.0.9:80/tcp: no such VIP"));
        assert!(e(Request::BackendRemove {
            vip: VIP.into(),
            address: "10.0.0.99".into()
        })
        .contains("backend 10.0.0.99 of vip 10.0.0.100:80/tcp: no such backend"));
        assert!(e(Request::BackendSetWeight {
            vip: VIP.into(),
            address: "10.0.0.11".into(),
            weight: 10_001
        })
        .contains("weight 10001 is out of range; use 0 to 10000"));
        assert!(e(Request::BackendAdd {
            vip: VIP.into(),
            address: "fd00::5".into(),
            weight: None
        })
        .contains("address is IPv6 but the VIP is IPv4"));
        assert!(e(Request::BackendAdd {
            vip: VIP.into(),
            address: "10.0.0.11".into(),
            weight: None
        })
        .contains("already a backend"));
    }

    #[test]
    fn health_sets_effective_weights_and_follows_the_configuration() {
        let text = "interface = \"eth0\"\n[encap]\nsource_v4 = \"10.0.0.2\"\n\n[[vip]]\naddress = \"10.0.0.100\"\nport = 80\nprotocol = \"tcp\"\n[vip.health]\nrise = 1\nfall = 1\n[[vip.backend]]\naddress = \"10.0.0.11\"\nweight = 8\n[[vip.backend]]\naddress = \"10.0.0.12\"\nweight = 8\n[[vip.backend]]\naddress = \"10.0.0.13\"\nweight = 8\n";
        let cfg = Config::parse(text).unwrap();
        let mut health = sync_health(&HealthMap::new(), &cfg);
        assert_eq!(health.len(), 3);
        let id = vip_id(&cfg.vips[0]);
        let key = |a: &str| (id, a.parse::<IpAddr>().unwrap());
        let fail = crate::health::ProbeResult::fail(
            std::time::Duration::from_millis(200),
            std::time::Duration::ZERO,
            "refused",
        );
        let pass = crate::health::ProbeResult::pass(std::time::Duration::from_millis(1));
        health
            .get_mut(&key("10.0.0.11"))
            .unwrap()
            .state
            .on_probe(&fail);
        let h12 = &mut health.get_mut(&key("10.0.0.12")).unwrap().state;
        h12.on_probe(&fail);
        h12.on_probe(&pass);
        assert_eq!(h12.probed_status(), HealthStatus::Probation);
        let eff = effective(&cfg, &health, &Learned::new());
        let weights: Vec<u32> = eff.vips[0].backends.iter().map(|b| b.weight).collect();
        assert_eq!(weights, [0, 2, 8], "down: 0, probation: a quarter, up: all");
        assert_eq!(
            cfg.vips[0].backends[0].weight, 8,
            "the configuration keeps its weights"
        );
        assert_eq!(slow_start_weight(1), 1);
        assert_eq!(slow_start_weight(0), 0);

        // A drained backend shows as draining whatever the probes say, and stays down if so.
        let mut drained = cfg.vips[0].backends[0].clone();
        drained.drained = true;
        let (up, shown, _) = shown_health(&health, id, &drained);
        assert_eq!((up, shown), (false, HealthStatus::Draining));

        // Settings unchanged: states carried over; a removed backend is forgotten; without
        // [vip.health] nothing is tracked and nothing changes.
        let mut next = cfg.clone();
        next.vips[0].backends.pop();
        let carried = sync_health(&health, &next);
        assert_eq!(carried.len(), 2);
        assert_eq!(
            carried[&key("10.0.0.11")].state.probed_status(),
            HealthStatus::Down
        );
        // New settings: a down backend stays down until it passes again.
        next.vips[0].health.as_mut().unwrap().interval_ms = 5000;
        let changed = sync_health(&health, &next);
        assert_eq!(
            changed[&key("10.0.0.11")].state.probed_status(),
            HealthStatus::Down
        );
        next.vips[0].health = None;
        assert!(sync_health(&health, &next).is_empty());
        assert_eq!(effective(&next, &health, &Learned::new()), next);
    }

    #[test]
    fn learning_builds_table_weights_and_health_still_wins() {
        let text = "interface = \"eth0\"\n[encap]\nsource_v4 = \"10.0.0.2\"\n\n[[vip]]\naddress = \"10.0.0.100\"\nport = 80\nprotocol = \"tcp\"\n[vip.health]\nrise = 1\nfall = 1\n[vip.learning]\nenabled = true\n[[vip.backend]]\naddress = \"10.0.0.11\"\n[[vip.backend]]\naddress = \"10.0.0.12\"\n[[vip.backend]]\naddress = \"10.0.0.13\"\nweight = 200\n";
        let cfg = Config::parse(text).unwrap();
        let mut health = sync_health(&HealthMap::new(), &cfg);
        let (learning, mut learned) = sync_learning(&LearnMap::new(), &Learned::new(), &cfg);
        assert_eq!(learning.len(), 1);
        let id = vip_id(&cfg.vips[0]);
        let a = |s: &str| s.parse::<IpAddr>().unwrap();
        let weights = |c: &Config| {
            c.vips[0]
                .backends
                .iter()
                .map(|b| b.weight)
                .collect::<Vec<_>>()
        };
        // Table weights: configured × 100, scaled down (ratios kept) to what apply accepts.
        assert_eq!(
            weights(&effective(&cfg, &health, &learned)),
            [50, 50, 10_000]
        );
        // decide sees the unscaled table weights.
        assert_eq!(
            learning_weight(&cfg.vips[0].backends[2], id, &health, &learned),
            20_000
        );
        learned.insert((id, a("10.0.0.11")), 80);
        assert_eq!(
            weights(&effective(&cfg, &health, &learned)),
            [40, 50, 10_000]
        );
        // A down backend is out whatever the model says.
        let fail = crate::health::ProbeResult::fail(
            std::time::Duration::from_millis(200),
            std::time::Duration::ZERO,
            "refused",
        );
        health
            .get_mut(&(id, a("10.0.0.11")))
            .unwrap()
            .state
            .on_probe(&fail);
        assert_eq!(
            effective(&cfg, &health, &learned).vips[0].backends[0].weight,
            0
        );
        // Learned weights survive an unrelated change, not a change of the learning settings.
        let (_, kept) = sync_learning(&learning, &learned, &cfg);
        assert_eq!(kept.get(&(id, a("10.0.0.11"))), Some(&80));
        let mut other = cfg.clone();
        other.vips[0].learning.as_mut().unwrap().floor = 0.5;
        let (_, reset) = sync_learning(&learning, &learned, &other);
        assert!(reset.is_empty());
        other.vips[0].learning.as_mut().unwrap().enabled = false;
        assert!(sync_learning(&learning, &learned, &other).0.is_empty());
    }

    #[test]
    fn persist_replaces_the_file_atomically_keeping_its_mode() {
        let dir = std::env::temp_dir().join(format!("lb-agent-persist-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("lbd.toml");
        fs::write(&path, "# old\n").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        let mut c = base();
        c.vips[0].backends[0].drained = true;
        persist(&path, &c).unwrap();
        assert_eq!(Config::load(&path).unwrap(), c);
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o640
        );
        let leftovers: Vec<_> = fs::read_dir(&dir).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "temporary file left behind");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn weight_policy_follows_the_learning_settings() {
        let l = config::Learning {
            enabled: true,
            latency_target_ms: 50.0,
            floor: 0.5,
            ceiling: 2.0,
            max_step: 0.1,
            deadband: 0.02,
            disruption_budget: 0.01,
            max_drained_share: 0.5,
            interval_ms: 300,
        };
        let p = weight_policy(&l, lb_common::DEFAULT_TABLE_SIZE);
        assert!(p.learning);
        assert_eq!(p.table_size, lb_common::DEFAULT_TABLE_SIZE);
        assert_eq!(
            (p.latency_target_ms, p.floor, p.ceiling, p.max_step_ratio),
            (50.0, 0.5, 2.0, 0.1)
        );
        assert_eq!(
            (p.deadband, p.disruption_budget, p.max_drained_share),
            (0.02, 0.01, 0.5)
        );
        assert_eq!(p.reversal_hold_steps, 200);
        p.validate().unwrap();
    }
}
