//! The learning step's wiring: which backends the weight model watches, feeding it probe
//! samples and CPU time, applying its decisions, and showing them (`lbctl model show`).
use super::edit::unknown_vip;
use super::health::{
    configured, health_share, probed, readmission, service_check, share_weight, shown_health,
    HealthKey, HealthMap, SharedCheck,
};
use super::queries::vip_filter;
use super::{apply_datapath, vip_id, Agent, State};
use crate::{
    config::{self, Config},
    control::{ApplyTiming, ModelBackend, ModelDecisionEntry, ModelVip, Response, VipName},
    datapath::{Balancer, VipId},
    health::HealthStatus,
    learning::{self, table_weight, BackendDecision, BackendInput, PolicyState, Sample, Window},
};
use anyhow::{Context as _, Result};
use lb_common::BackendStats;
use std::{
    collections::{BTreeMap, VecDeque},
    net::IpAddr,
    sync::Arc,
    time::Instant,
};
use tracing::{error, info, warn};

/// Learned table weights by (VIP, backend).
pub(super) type Learned = BTreeMap<HealthKey, LearnedWeight>;

/// One backend's learned table weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct LearnedWeight {
    pub weight: u32,
    /// Carried by the model while slow (docs/model.md, "Carrying a slow backend"): the carry
    /// steers its weight by its latency, so health's ramp does not cap it too (the ramp falls
    /// back on probes at half the timeout, which a carried backend's queue makes now and then,
    /// and held it at a third of what the carry asked).
    pub carried: bool,
}

pub(super) type LearnMap = BTreeMap<VipId, VipLearning>;

/// Decisions kept per backend for `lbctl model show`.
pub(super) const DECISIONS_KEPT: usize = 10;

/// One VIP's learning state.
#[derive(Debug, Clone)]
pub(super) struct VipLearning {
    pub(super) settings: config::Learning,
    pub(super) policy: PolicyState,
    pub(super) backends: BTreeMap<IpAddr, LearnedBackend>,
    pub(super) next_step: Instant,
    pub(super) last_slots_moved: usize,
    pub(super) last_slots_moved_gradual: usize,
    pub(super) max_slots_moved_gradual: usize,
    /// Slowest single fit and slowest whole step (fits, decision, table checks) since start,
    /// in microseconds: the model's cost, shown by `lbctl model show`.
    pub(super) max_fit_us: u64,
    pub(super) max_step_us: u64,
    /// CPU time of the most recent fits (at most `FIT_TIMES` of them), for their 99th
    /// percentile: the slowest one alone also carries whatever the kernel charged to the
    /// thread while it ran (softirq work of the traffic being balanced, without
    /// IRQ time accounting).
    pub(super) fit_us: VecDeque<u32>,
}

/// Fits whose CPU time `lbctl model show` summarises.
pub(super) const FIT_TIMES: usize = 4096;

/// One backend's samples, counters and last decisions.
#[derive(Debug, Clone)]
pub(super) struct LearnedBackend {
    pub(super) window: Window,
    pub(super) counters: Option<(Instant, BackendStats)>,
    pub(super) last: Option<BackendDecision>,
    pub(super) history: VecDeque<ModelDecisionEntry>,
    /// Its service port's check while drained on a passive signal.
    pub(super) check: SharedCheck,
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
            check: SharedCheck::default(),
        }
    }
}

/// `learning` brought in line with `cfg`: a state for every VIP with learning enabled, carried
/// over while its settings are unchanged (new settings start the model again); backends no
/// longer configured are forgotten.
pub(super) fn sync_learning(
    learning: &LearnMap,
    learned: &Learned,
    cfg: &Config,
) -> (LearnMap, Learned) {
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
pub(super) fn weight_policy(l: &config::Learning, table_size: u32) -> learning::WeightPolicy {
    learning::WeightPolicy {
        learning: l.enabled,
        table_size,
        latency_target_ms: l.latency_target_ms,
        floor: l.floor,
        ceiling: l.ceiling,
        max_step_ratio: l.max_step,
        deadband: l.deadband,
        disruption_budget: l.disruption_budget,
        max_drained_share: l.max_drained_share,
        carry_knee: l.carry_knee,
        // At most one change of direction per backend per minute, whatever the step.
        reversal_hold_steps: 60_000u64
            .div_ceil(l.interval_ms.max(1))
            .min(u64::from(u32::MAX)) as u32,
        ..Default::default()
    }
}

pub(super) fn refusal_name(r: &learning::Refusal) -> &'static str {
    match r {
        learning::Refusal::TooFewSamples { .. } => "too_few_samples",
        learning::Refusal::NoLoadVariation { .. } => "no_load_variation",
        learning::Refusal::PoorFit { .. } => "poor_fit",
        learning::Refusal::NonPhysical { .. } => "non_physical",
        learning::Refusal::Numerical { .. } => "numerical",
    }
}

/// The table weight of backend `b` of a learning VIP `id`, before any scaling: the learned
/// weight in force (configured × 100 without one; 0 after being out of the table, until the
/// model's next step brings it back), 0 while down, pending or drained, at most its slow
/// start's share on probation: the model's weight wins when it is lower, or when the model
/// carries the backend while slow (its carry steers by the latency the ramp would react to).
pub(super) fn learning_weight(
    b: &config::Backend,
    id: VipId,
    health: &HealthMap,
    learned: &Learned,
) -> u32 {
    let tw = table_weight(b.weight);
    let learned = learned.get(&(id, b.address)).copied();
    let w = learned.map_or(tw, |l| l.weight);
    if b.drained {
        return 0;
    }
    match probed(health, id, b.address) {
        HealthStatus::Down | HealthStatus::Pending => 0,
        HealthStatus::Probation if learned.is_some_and(|l| l.carried) => w,
        HealthStatus::Probation => w.min(share_weight(tw, health_share(health, id, b.address))),
        _ => w,
    }
}

/// One learning step of VIP `id` (docs/model.md): a sample per backend from the datapath's
/// counters and the probes since the last step, a fit per backend, [`learning::decide`], the
/// audit log, and the datapath when a weight changed.
/// CPU time used by the calling thread, in microseconds.
pub(super) fn thread_cpu_us() -> u64 {
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

pub(super) fn learn_step(st: &mut State, id: VipId, now: Instant, t_secs: f64) -> Result<()> {
    let State {
        lb,
        config,
        health,
        learning,
        learned,
        refusals,
        timing,
        fleet_table,
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
        if !down {
            lbk.observe(stats, probes, now, t_secs);
        }
        lbk.counters = Some((now, stats));
        let samples = lbk.window.samples();
        // CPU time of this thread: the fit's own cost, not the time another process had the
        // core (the agent shares the machine with the services it balances).
        let fit_started = thread_cpu_us();
        let fit = learning::fit_with(&samples, &policy.fit);
        let fit_us = thread_cpu_us().saturating_sub(fit_started);
        // Drained on a passive signal (a TCP VIP): its service port is checked actively.
        let checked = vcfg.protocol == config::Protocol::Tcp
            && l.policy
                .backends
                .get(&b.id)
                .is_some_and(|s| s.drained_at.is_some() && s.drained_for.is_some());
        let timeout = vcfg.health.as_ref().map_or(1000, |h| h.timeout_ms);
        let service_check = service_check(
            &lbk.check,
            std::net::SocketAddr::new(b.address, vcfg.port),
            std::time::Duration::from_millis(timeout),
            checked,
        );
        let (observed, peak_load) = (lbk.window.observed(observe_secs), lbk.window.peak_load());
        l.record_fit_time(fit_us);
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
            observed,
            peak_load,
            probe_timeout_ms: vcfg.health.as_ref().map(|h| h.timeout_ms as f64),
            service_check,
        });
    }
    let decision = learning::decide(&inputs, &policy, &l.policy);
    l.max_step_us = l.max_step_us.max(now.elapsed().as_micros() as u64);
    remember_decision(l, learned, id, &name, &decision)?;
    if decision.changed() {
        let inputs = (&*health, &*learned, fleet_table.as_ref());
        apply_learned((lb, config, inputs, timing), &name, &decision)?;
    }
    Ok(())
}

impl Agent {
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
    pub(super) async fn learn_due(&self) {
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

    pub(super) async fn model_show(&self, vip: Option<&str>) -> Result<Response> {
        let want = vip_filter(vip)?;
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
                let (_, shown, h) = shown_health(&st.health, vid, cfg);
                let pstate = l.policy.backends.get(&b.id);
                let lbk = l.backends.get(&b.address);
                let last = lbk.and_then(|x| x.last.as_ref());
                let refusal = last.and_then(|d| d.refusal.clone()).or_else(|| {
                    // Before the first step: nothing sampled yet.
                    last.is_none().then_some(learning::Refusal::TooFewSamples {
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
                    readmission: readmission(h),
                    trial_flows: pstate.and_then(|p| p.trial_flows),
                    failed_trials: pstate.map_or(0, |p| p.failed_trials),
                    carry_weight: pstate.and_then(|p| p.carry).map(|c| c.weight),
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
}

/// Keeps a step's decision: the policy state for the next step, the audit log, each
/// backend's recent decisions (`lbctl model show`) and the table weights now learned.
fn remember_decision(
    l: &mut VipLearning,
    learned: &mut Learned,
    id: VipId,
    name: &VipName,
    decision: &learning::Decision,
) -> Result<()> {
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
            // Never in the table yet (a fresh start, or just added): its first pass decides,
            // not this step (at a fresh start all come back together, as configured).
            HealthStatus::Pending => {
                learned.remove(&(id, d.addr));
                continue;
            }
            _ => 0,
        };
        let carried = decision
            .state
            .backends
            .get(&d.id)
            .is_some_and(|m| m.carry.is_some());
        learned.insert((id, d.addr), LearnedWeight { weight: w, carried });
    }
    Ok(())
}

/// Applies the weights a step changed to the datapath, with the audit record of the step.
fn apply_learned(
    (lb, config, inputs, timing): (&mut Balancer, &Config, super::Inputs, &mut ApplyTiming),
    name: &VipName,
    decision: &learning::Decision,
) -> Result<()> {
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
        apply_datapath(lb, config, inputs, timing).context("applying the learned weights")?;
    for (vip, moved, generation) in &report.tables {
        info!(%vip, moved, generation, "table updated");
    }
    Ok(())
}

impl LearnedBackend {
    /// Adds a sample to the window from the counters' change since the last step and the
    /// probes of the step (none without both, or without any probe).
    fn observe(
        &mut self,
        stats: BackendStats,
        probes: Option<(f64, u32, u32)>,
        now: Instant,
        t_secs: f64,
    ) {
        if let (Some((t0, s0)), Some((sum, n, failed))) = (self.counters, probes) {
            let dt = now.duration_since(t0).as_secs_f64();
            if dt > 0.0 && n > 0 {
                let rate = |a: u64, b: u64| a.saturating_sub(b) as f64 / dt;
                self.window.push(Sample {
                    t_secs,
                    load: rate(stats.new_flows, s0.new_flows),
                    latency_ms: sum / f64::from(n),
                    errors: f64::from(failed) / f64::from(n),
                    syn_retries_per_s: rate(stats.syn_retries, s0.syn_retries),
                    rsts_per_s: rate(stats.client_rsts, s0.client_rsts),
                });
            }
        }
    }
}

impl VipLearning {
    /// Keeps the last [`FIT_TIMES`] fit costs and the largest.
    fn record_fit_time(&mut self, fit_us: u64) {
        self.max_fit_us = self.max_fit_us.max(fit_us);
        if self.fit_us.len() == FIT_TIMES {
            self.fit_us.pop_front();
        }
        self.fit_us
            .push_back(u32::try_from(fit_us).unwrap_or(u32::MAX));
    }
}
