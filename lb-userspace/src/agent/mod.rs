//! `lbd` as an agent: it owns the [`Balancer`] and the current [`Config`], answers the
//! control API ([`crate::control`], whose socket hands requests to [`Agent::handle`]), and
//! wires the other rooms together. The owner and its transactions are here; the parts it runs
//! live next to it: [`edit`] (a request's change to the config, and saving it), [`health`]
//! (probers and backend states), [`learning`] (the weight model's steps) and [`queries`]
//! (the read-only answers).
//!
//! Every change is a transaction, one at a time (a mutex serializes them): clone the
//! configuration, apply the request to the clone, validate it, apply it to the datapath (on
//! failure the previous configuration is applied again), then write it to the configuration
//! file atomically (temporary file in the same directory, fsync, rename, fsync of the
//! directory; on failure the datapath is rolled back too). A rejected request changes neither
//! the maps nor the file, and a restart comes back with exactly what was last accepted.
//!
//! Health checks (`[vip.health]`) are runtime state, never written to the file: the agent runs
//! a `Prober` for every backend of such VIPs (restarted after every accepted change or
//! reload), feeds each outcome to that backend's `HealthState`, and when a backend's status
//! changes applies the datapath again. A down backend gets weight 0 in the table and the DOWN
//! flag in its datapath entry (its established flows are steered again at once); a backend on
//! probation comes back with a quarter of its weight (slow start), then all of it once up.
mod conns;
mod drain;
mod dryrun;
mod edit;
mod fleet;
mod health;
mod learning;
mod queries;

use crate::learning::WEIGHT_SCALE;
use crate::{
    config::{self, Config},
    control::{
        events::{self, Journal},
        ApplyTiming, Changed, Handler, Peer, Request, Response, TableChange, VipName,
    },
    datapath::{ApplyReport, Balancer, VipId},
    health::HealthStatus,
};
use anyhow::{anyhow, bail, Result};
pub use drain::NodeInputs;
use edit::edit;
pub use edit::persist;
pub use fleet::fleet_edit;
use health::{
    health_share, probed, ramp_share, sync_health, HealthKey, HealthMap, Newcomers, Probes,
};
pub use health::{share_weight, slow_start_weight, PinnedHealth};
use learning::{learning_weight, sync_learning, LearnMap, Learned};
use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    sync::Arc,
    time::Instant,
};
use tokio::sync::Mutex;
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
    /// How long the datapath applies take (`lbctl status`).
    timing: ApplyTiming,
    /// Fleet mode: the table the store's published weights give (None: built from this
    /// node's own health and learning, as a single lbd).
    fleet_table: Option<FleetTable>,
    /// The last reload lbd refused: the file's text (hash), when, and why. An lbctl change
    /// refused because the file holds that edit says so.
    refused_reload: Option<RefusedReload>,
}

/// A reload lbd refused, for the refusal of later lbctl changes.
struct RefusedReload {
    text_hash: u64,
    time: String,
    reason: String,
}

/// What a fleet node builds its datapath from once the leader has published for the revision
/// it applied: the published weights and down backends, in place of its own health results
/// and learned weights. The leader builds from them too, so that every node's table follows
/// the same sequence of store revisions (its own results reach its table through the store).
#[derive(Debug, Clone, PartialEq)]
pub struct FleetTable {
    /// Every VIP with the weights to build (health and learning folded in by the leader).
    pub vips: Vec<config::Vip>,
    /// Backends whose DOWN flag is set: their established flows move on every node.
    pub down: Vec<(VipName, std::net::IpAddr)>,
}

fn vip_id(v: &config::Vip) -> VipId {
    (v.address, v.port, v.protocol)
}

/// The configuration the datapath is built from: `cfg` with the weight of every down or
/// pending backend at 0 and of every backend on probation reduced to its ramp's share
/// ([`share_weight`]). VIPs with learning
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
            within_max_weight(&mut v.backends);
            continue;
        }
        // A ramp needs finer steps than weight 1: while one runs, the VIP's weights are in
        // hundredths (the table depends only on their ratios).
        let ramping = v
            .backends
            .iter()
            .any(|b| ramp_share(health, id, b.address).is_some());
        let scale = if ramping { WEIGHT_SCALE } else { 1 };
        for b in &mut v.backends {
            b.weight = share_weight(
                b.weight.saturating_mul(scale),
                health_share(health, id, b.address),
            );
        }
        within_max_weight(&mut v.backends);
    }
    out
}

/// Tables depend only on weight ratios: scales weights down to what the datapath accepts.
fn within_max_weight(backends: &mut [config::Backend]) {
    let max = backends.iter().map(|b| b.weight).max().unwrap_or(0);
    if max > config::MAX_WEIGHT {
        for b in backends {
            if b.weight > 0 {
                b.weight = ((u64::from(b.weight) * u64::from(config::MAX_WEIGHT) / u64::from(max))
                    as u32)
                    .max(1);
            }
        }
    }
}

/// Applies `cfg` as `health` has it: DOWN flags of backends no longer down cleared first (so
/// that the slots they get back lead somewhere), the tables, then the DOWN flag of every down
/// backend set (its established flows move at once).
impl State {
    /// Applies the current configuration with the runtime health and learned weights.
    fn reapply(&mut self) -> Result<ApplyReport> {
        apply_datapath(
            &mut self.lb,
            &self.config,
            (&self.health, &self.learned, self.fleet_table.as_ref()),
            &mut self.timing,
        )
    }
}

/// What a table's weights come from: health, learned weights, and in fleet mode the store's.
type Inputs<'a> = (&'a HealthMap, &'a Learned, Option<&'a FleetTable>);

fn apply_datapath(
    lb: &mut Balancer,
    cfg: &Config,
    (health, learned, fleet): Inputs,
    timing: &mut ApplyTiming,
) -> Result<ApplyReport> {
    let started = Instant::now();
    let cpu_started = learning::thread_cpu_us();
    let result = match fleet {
        Some(t) => apply_fleet_table(lb, cfg, t),
        None => apply_datapath_untimed(lb, cfg, health, learned),
    };
    let us = started.elapsed().as_micros() as u64;
    let cpu_us = learning::thread_cpu_us().saturating_sub(cpu_started);
    timing.applies += 1;
    timing.last_us = us;
    timing.max_us = timing.max_us.max(us);
    timing.last_cpu_us = cpu_us;
    timing.max_cpu_us = timing.max_cpu_us.max(cpu_us);
    timing.last_backends = lb.vips().map(|v| v.backends.len()).sum();
    debug!(
        apply_us = us,
        cpu_us,
        backends = timing.last_backends,
        "datapath applied"
    );
    result
}

/// Applies `cfg` with the store's weights and DOWN flags (`t`) in place of local health.
fn apply_fleet_table(lb: &mut Balancer, cfg: &Config, t: &FleetTable) -> Result<ApplyReport> {
    let down: Vec<HealthKey> = t
        .down
        .iter()
        .filter_map(|(name, addr)| {
            t.vips
                .iter()
                .find(|v| VipName::of(v) == *name)
                .map(|v| (vip_id(v), *addr))
        })
        .collect();
    let applied = applied_backends(lb);
    for (vip, addr) in applied {
        if !down.contains(&(vip, addr)) && lb.backend_down(vip, addr) == Some(true) {
            lb.set_backend_down(vip, addr, false)?;
        }
    }
    let mut built = cfg.clone();
    built.vips = t.vips.clone();
    let report = lb.apply(&built)?;
    for (vip, addr) in down {
        if lb.backend_down(vip, addr) == Some(false) {
            lb.set_backend_down(vip, addr, true)?;
        }
    }
    Ok(report)
}

/// Every (VIP, backend) the datapath holds now.
fn applied_backends(lb: &Balancer) -> Vec<HealthKey> {
    lb.vips()
        .flat_map(|v| {
            v.backends
                .iter()
                .map(move |b| (vip_id(&v.config), b.address))
        })
        .collect()
}

fn apply_datapath_untimed(
    lb: &mut Balancer,
    cfg: &Config,
    health: &HealthMap,
    learned: &Learned,
) -> Result<ApplyReport> {
    let applied = applied_backends(lb);
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
    /// Fleet mode's status (set by the store loop); None for a single-node lbd.
    fleet: std::sync::Mutex<Option<crate::control::FleetStatus>>,
    /// BGP announcements and drain (locked after `state`; never held across an await).
    node: std::sync::Mutex<drain::Node>,
    /// Wakes the BGP announcer on a drain or undrain.
    node_notify: tokio::sync::Notify,
    /// Whether `CT` and `CT_NEW` were above the fill warning at the last count.
    fill_above: std::sync::Mutex<[bool; 3]>,
    /// The last count of the connection tables, and when it was taken.
    census_cache: std::sync::Mutex<Option<(Instant, conns::Census)>>,
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
        // Replaced by `start_health`, which knows what the datapath had.
        let health = sync_health(
            &HealthMap::new(),
            &config,
            Newcomers::Start(&PinnedHealth::default()),
        );
        let (learning, learned) = sync_learning(&LearnMap::new(), &Learned::new(), &config);
        warn_new(&events, None, &config);
        Arc::new(Agent {
            state: Mutex::new(State {
                lb,
                config,
                file_text,
                health,
                learning,
                learned,
                refusals: BTreeMap::new(),
                timing: ApplyTiming::default(),
                refused_reload: None,
                fleet_table: None,
            }),
            config_path: config_path.to_path_buf(),
            started: Instant::now(),
            probes: std::sync::Mutex::new(Probes::default()),
            events,
            fleet: std::sync::Mutex::new(None),
            node: std::sync::Mutex::new(drain::Node::new()),
            node_notify: tokio::sync::Notify::new(),
            fill_above: std::sync::Mutex::new([false; 3]),
            census_cache: std::sync::Mutex::new(None),
        })
    }

    /// The journal `lbctl status` shows.
    pub fn events(&self) -> &Arc<Journal> {
        &self.events
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
    /// A file that is invalid, or that changes settings fixed at start, changes nothing; it is
    /// remembered, so that lbctl's refusal to overwrite it says why it was not loaded.
    pub async fn reload(&self) -> Result<ApplyReport> {
        let mut guard = self.state.lock().await;
        let st = &mut *guard;
        let path = self.config_path.display();
        let text = fs::read_to_string(&self.config_path).map_err(|e| {
            anyhow!("reload rejected, nothing changed: cannot read config file {path}: {e}")
        })?;
        // The bare reason is kept for lbctl's refusals; the error says the reload's outcome.
        let (reason, result) = match self.reloadable(st, &text) {
            Ok(new) => {
                let r = self.reload_config(st, new, &text);
                (r.as_ref().err().map(|e| format!("{e:#}")), r)
            }
            Err(e) => (
                Some(format!("{e:#}")),
                Err(anyhow!("reload rejected, nothing changed: {e:#}")),
            ),
        };
        st.refused_reload = reason.map(|reason| RefusedReload {
            text_hash: events::text_hash(&text),
            time: events::rfc3339(events::now_ms()),
            reason,
        });
        result
    }

    /// Whether lbd would load `text` as its configuration on reload: the file's own checks,
    /// the host's, and no restart-only key changed. The configuration it holds, or why not.
    fn reloadable(&self, st: &State, text: &str) -> Result<Config> {
        let path = self.config_path.display();
        let mut new = Config::parse(text).map_err(|e| anyhow!("config file {path}: {e}"))?;
        if self.fleet_status().is_some() {
            // A fleet node's VIPs come from the store; the file only holds its own settings.
            new.vips = st.config.vips.clone();
        }
        check_host(&new)?;
        let fixed = st.config.restart_only_changes(&new);
        if !fixed.is_empty() {
            bail!("{} only change on restart", fixed.join(", "));
        }
        Ok(new)
    }

    /// Applies `new`, read from the file's `text`, as the reload of a valid file.
    fn reload_config(&self, st: &mut State, new: Config, text: &str) -> Result<ApplyReport> {
        let prev = st.config.clone();
        let _busy =
            self.events
                .begin_change("reload (SIGHUP)", st.file_text.as_deref(), Some(text));
        let health = sync_health(&st.health, &new, Newcomers::Added);
        let (learning, learned) = sync_learning(&st.learning, &st.learned, &new);
        let fleet = st.fleet_table.clone();
        match apply_datapath(
            &mut st.lb,
            &new,
            (&health, &learned, fleet.as_ref()),
            &mut st.timing,
        ) {
            Ok(r) => {
                warn_new(&self.events, Some(&st.config), &new);
                st.config = new;
                st.file_text = Some(text.to_string());
                st.health = health;
                st.learning = learning;
                st.learned = learned;
                self.restart_probes(st);
                Ok(r)
            }
            Err(e) => {
                let old = (&st.health, &st.learned, fleet.as_ref());
                rollback(&mut st.lb, &prev, old, &mut st.timing);
                Err(e.context("reload failed; the previous configuration stays applied"))
            }
        }
    }

    /// Why an lbctl change cannot be saved while the file differs from what lbd last read or
    /// wrote: unreadable, an edit lbd refused (or would refuse) to load and why, or an edit
    /// not loaded yet.
    fn file_differs(&self, st: &State, on_disk: Option<&str>) -> anyhow::Error {
        let path = self.config_path.display();
        let Some(text) = on_disk else {
            return anyhow!(
                "config file {path}: cannot be read, and saving this change would replace it; nothing changed. Make it readable again (or restore it), then retry"
            );
        };
        let refused = st
            .refused_reload
            .as_ref()
            .filter(|r| r.text_hash == events::text_hash(text));
        if let Some(r) = refused {
            return anyhow!(
                "config file {path}: holds an edit that lbd refused to load (reload at {}: {}); saving this change would overwrite that edit, so nothing changed. Fix the edit (lbd --config {path} --check says what is wrong) and reload (systemctl reload lbd), or undo it, then retry",
                r.time,
                r.reason
            );
        }
        if let Err(e) = self.reloadable(st, text) {
            return anyhow!(
                "config file {path}: holds an edit that lbd has not loaded and would refuse to load: {e:#}; saving this change would overwrite that edit, so nothing changed. Fix the edit (lbd --config {path} --check says what is wrong) and reload (systemctl reload lbd), or undo it, then retry"
            );
        }
        anyhow!(
            "config file {path}: edited since lbd last read or wrote it, and saving this change would overwrite that; nothing changed. Apply the edit first (systemctl reload lbd, or kill -HUP the lbd process) or undo it, then retry"
        )
    }

    /// Answers one control request from `peer`. A change is logged once and journaled with
    /// who asked and the request as the lbctl command (accepted or refused).
    pub async fn handle(&self, req: Request, peer: Peer) -> Response {
        let result = match req {
            Request::VipList => self.vip_list().await.map(Response::ok),
            Request::BackendList { vip } => self.backend_list(vip.as_deref()).await,
            Request::ModelShow { vip } => self.model_show(vip.as_deref()).await,
            Request::Stats => self.snapshot().await.map(Response::ok),
            Request::Status => self.status().await.map(Response::ok),
            Request::RunningConfig => Ok(Response::ok(self.config().await)),
            Request::NodeDrain { timeout_seconds } => {
                let who = format!("{} (by {peer})", req.as_lbctl());
                self.node_change(true, timeout_seconds, &who)
                    .await
                    .map(Response::ok)
            }
            Request::NodeUndrain => {
                let who = format!("{} (by {peer})", req.as_lbctl());
                self.node_change(false, None, &who).await.map(Response::ok)
            }
            Request::ConnList {
                vip,
                backend,
                limit,
            } => {
                self.conn_list(vip.as_deref(), backend.as_deref(), limit)
                    .await
            }
            Request::Lookup { vip, client } => self.lookup(&vip, &client).await,
            Request::DryRun { request } => self.dry_run(*request).await,
            Request::ConfigDiff { text } => self.config_diff(&text).await,
            other => {
                let words = other.as_lbctl();
                let r = self.change(other).await;
                self.audit(&words, peer, &r);
                r.map(Response::ok)
            }
        };
        result.unwrap_or_else(|e| Response::error(format!("{e:#}")))
    }

    /// One mutating request, as a transaction (see the module docs).
    async fn change(&self, req: Request) -> Result<Changed> {
        if let Some(refusal) = self.fleet_refusal() {
            bail!("{refusal}");
        }
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
        refuse_new_host_problems(&prev, &next)?;
        if !req.forced() {
            refuse_leaving_no_serving_backend(&prev, &next, &st.health, &st.learned)?;
        }
        let on_disk = fs::read_to_string(&self.config_path).ok();
        if on_disk.is_none() || on_disk != st.file_text {
            return Err(self.file_differs(st, on_disk.as_deref()));
        }
        let next_text = next.to_toml().ok();
        let _busy =
            self.events
                .begin_change(&message, st.file_text.as_deref(), next_text.as_deref());
        let health = sync_health(&st.health, &next, Newcomers::Added);
        let (learning, learned) = sync_learning(&st.learning, &st.learned, &next);
        let fleet = st.fleet_table.clone();
        let report = match apply_datapath(
            &mut st.lb,
            &next,
            (&health, &learned, fleet.as_ref()),
            &mut st.timing,
        ) {
            Ok(r) => r,
            Err(e) => {
                let old = (&st.health, &st.learned, fleet.as_ref());
                rollback(&mut st.lb, &prev, old, &mut st.timing);
                return Err(e.context(events::RolledBack(
                    "the datapath rejected the change; nothing changed",
                )));
            }
        };
        let written = match persist(&self.config_path, &next) {
            Ok(t) => t,
            Err(e) => {
                let old = (&st.health, &st.learned, fleet.as_ref());
                rollback(&mut st.lb, &prev, old, &mut st.timing);
                return Err(e.context(events::RolledBack(
                    "the change was rolled back because the configuration file could not be written",
                )));
            }
        };
        let warnings = warn_new(&self.events, Some(&st.config), &next);
        st.config = next;
        st.file_text = Some(written);
        st.health = health;
        st.learning = learning;
        st.learned = learned;
        self.restart_probes(st);
        for (vip, moved, generation) in &report.tables {
            info!(%vip, moved, generation, "table updated");
        }
        Ok(Changed {
            message: warnings
                .iter()
                .fold(message, |m, w| format!("{m}\nwarning: {w}")),
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

impl Agent {
    /// The audit trail of one lbctl change: the log (once) and the journal, with who asked
    /// (`peer`) and what (`words`, the lbctl command). A request for what already was changes
    /// nothing and is only logged at debug level.
    fn audit(&self, words: &str, peer: Peer, r: &Result<Changed>) {
        match r {
            Ok(c) if c.changed => {
                info!(%peer, request = %words, "change applied: {}", c.message);
                self.events.record(
                    events::Kind::ChangeApplied,
                    format!("{words} (by {peer}): {}", c.message),
                );
            }
            Ok(c) => debug!(%peer, request = %words, "{}", c.message),
            Err(e) => {
                info!(%peer, request = %words, "change refused: {e:#}");
                self.events.record(
                    events::change_failure_kind(e),
                    format!("{words} (by {peer}): {e:#}"),
                );
            }
        }
    }
}

/// Refuses a change that leaves a VIP which has a serving backend (weight in the table: not
/// drained, not down) without one: all its traffic would be dropped. `--force` overrides.
fn refuse_leaving_no_serving_backend(
    prev: &Config,
    next: &Config,
    health: &HealthMap,
    learned: &Learned,
) -> Result<()> {
    let serving = |cfg: &Config| -> BTreeMap<VipId, usize> {
        effective(cfg, health, learned)
            .vips
            .iter()
            .map(|v| {
                let n = v
                    .backends
                    .iter()
                    .filter(|b| b.effective_weight() > 0)
                    .count();
                (vip_id(v), n)
            })
            .collect()
    };
    let before = serving(prev);
    for (id, n) in serving(next) {
        if n == 0 && before.get(&id).is_some_and(|&b| b > 0) {
            let name = VipName {
                address: id.0,
                port: id.1,
                protocol: id.2,
            };
            bail!(
                "vip {name}: this change leaves it no serving backend (the others are drained, down or at weight 0), so all its traffic would be dropped; add or undrain another backend first, or repeat the command with --force to do it anyway"
            );
        }
    }
    Ok(())
}

/// Logs and journals the warnings of `next` ([`Config::warnings`]) that `prev` did not have;
/// returns them.
fn warn_new(events: &Journal, prev: Option<&Config>, next: &Config) -> Vec<String> {
    let before = prev.map(Config::warnings).unwrap_or_default();
    let mut out = Vec::new();
    for (key, w) in next.warnings() {
        if before.iter().any(|(k, _)| *k == key) {
            continue;
        }
        warn!("{w}");
        events.record(events::Kind::ConfigWarning, w.clone());
        out.push(w);
    }
    out
}

/// Refuses a configuration that asks of this host what it does not allow (see
/// [`Config::host_problems`]): at start and on reload.
pub fn check_host(cfg: &Config) -> Result<()> {
    let host = crate::datapath::netif::host_addrs(&cfg.interface)?;
    match cfg.host_problems(&host).into_iter().next() {
        Some((_, problem)) => bail!("{problem}"),
        None => Ok(()),
    }
}

/// An lbctl change is refused for a host problem it brings, not for one the running
/// configuration already had (an address added to the host since): that stays the file's to fix.
fn refuse_new_host_problems(prev: &Config, next: &Config) -> Result<()> {
    let host = crate::datapath::netif::host_addrs(&next.interface)?;
    let before: Vec<String> = prev
        .host_problems(&host)
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    match next
        .host_problems(&host)
        .into_iter()
        .find(|(k, _)| !before.contains(k))
    {
        Some((_, problem)) => bail!("{problem}"),
        None => Ok(()),
    }
}

/// Re-applies the configuration that was in force before a failed change, then checks that
/// the datapath's VIP entries are the ones lbd believes in (a failure in the middle of the
/// writes could leave one pointing at a table lbd did not keep; `apply` only rewrites tables it
/// thinks changed). A mismatch is logged loudly: restarting lbd rewrites everything.
fn rollback(lb: &mut Balancer, prev: &Config, inputs: Inputs, timing: &mut ApplyTiming) {
    if let Err(e) = apply_datapath(lb, prev, inputs, timing) {
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

/// The control socket hands every request to the agent.
impl Handler for Agent {
    fn handle(
        &self,
        req: Request,
        peer: Peer,
    ) -> impl std::future::Future<Output = Response> + Send {
        Agent::handle(self, req, peer)
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
    use super::{health::shown_health, learning::weight_policy, *};
    use std::{net::IpAddr, os::unix::fs::PermissionsExt as _};

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
    fn the_same_add_again_changes_nothing_and_succeeds() {
        let again = [
            Request::VipAdd {
                vip: VIP.into(),
                forwarding: None,
                table_size: None,
                force: false,
            },
            Request::BackendAdd {
                vip: VIP.into(),
                address: "10.0.0.11".into(),
                weight: None,
            },
            Request::BackendAdd {
                vip: VIP.into(),
                address: "10.0.0.11".into(),
                weight: Some(1),
            },
        ];
        for req in again {
            let c = try_edit(req.clone()).unwrap_or_else(|e| panic!("{req:?}: {e}"));
            assert_eq!(c, base(), "{req:?} changed the configuration");
        }
    }

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
            force: false,
        })
        .unwrap();
        assert!(c.vips[0].backends[0].drained);
        assert_eq!(c.vips[0].backends[0].weight, 1);

        let e = |r| try_edit(r).unwrap_err();
        assert!(e(Request::VipAdd {
            vip: VIP.into(),
            forwarding: None,
            table_size: Some(251),
            force: false
        })
        .contains("already configured with other settings"));
        assert!(e(Request::VipAdd {
            vip: "10.0.0.101:80/tcp".into(),
            forwarding: None,
            table_size: Some(65536),
            force: false
        })
        .contains("table_size 65536 is not prime"));
        assert!(e(Request::VipAdd {
            vip: "[fd00::1]:80/tcp".into(),
            forwarding: None,
            table_size: None,
            force: false
        })
        .contains("needs encap.source_v6"));
        assert!(e(Request::VipRemove {
            vip: "10.0.0.9:80/tcp".into()
        })
        .contains("vip 10.0.0.9:80/tcp: no such VIP"));
        assert!(e(Request::BackendRemove {
            vip: VIP.into(),
            address: "10.0.0.99".into(),
            force: false,
        })
        .contains("backend 10.0.0.99 of vip 10.0.0.100:80/tcp: no such backend"));
        assert!(e(Request::BackendSetWeight {
            vip: VIP.into(),
            address: "10.0.0.11".into(),
            weight: 10_001,
            force: false,
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
            weight: Some(7)
        })
        .contains("already a backend of this VIP, with weight 1"));
    }

    #[test]
    fn new_backends_are_pending_and_a_restart_keeps_the_datapaths_health() {
        let text = "interface = \"eth0\"\n[encap]\nsource_v4 = \"10.0.0.2\"\n\n[[vip]]\naddress = \"10.0.0.100\"\nport = 80\nprotocol = \"tcp\"\n[vip.health]\n[[vip.backend]]\naddress = \"10.0.0.11\"\nweight = 8\n[[vip.backend]]\naddress = \"10.0.0.12\"\nweight = 8\n";
        let cfg = Config::parse(text).unwrap();
        let id = vip_id(&cfg.vips[0]);
        let key = |a: &str| (id, a.parse::<IpAddr>().unwrap());
        let weights = |h: &HealthMap, c: &Config| -> Vec<u32> {
            effective(c, h, &Learned::new()).vips[0]
                .backends
                .iter()
                .map(|b| b.weight)
                .collect()
        };
        // A fresh start: nothing pinned, every backend pending, no slot for any.
        let fresh = sync_health(
            &HealthMap::new(),
            &cfg,
            Newcomers::Start(&PinnedHealth::default()),
        );
        assert!(fresh
            .values()
            .all(|h| h.state.probed_status() == HealthStatus::Pending));
        assert_eq!(weights(&fresh, &cfg), [0, 0]);
        assert_eq!(
            PinnedHealth::default().startup_config(&cfg).vips[0].backends[0].weight,
            0
        );
        // A restart that found .11 serving and .12 down keeps both as they were.
        let pins = PinnedHealth(
            [(key("10.0.0.11"), false), (key("10.0.0.12"), true)]
                .into_iter()
                .collect(),
        );
        let restarted = sync_health(&HealthMap::new(), &cfg, Newcomers::Start(&pins));
        assert_eq!(weights(&restarted, &cfg), [8, 0]);
        assert_eq!(
            pins.startup_config(&cfg).vips[0]
                .backends
                .iter()
                .map(|b| b.weight)
                .collect::<Vec<_>>(),
            [8, 0]
        );
        assert_eq!(
            restarted[&key("10.0.0.12")].state.probed_status(),
            HealthStatus::Down
        );
        // A backend added while running is pending: no slot before its first pass.
        let mut next = cfg.clone();
        let mut added = next.vips[0].backends[0].clone();
        added.address = "10.0.0.13".parse().unwrap();
        next.vips[0].backends.push(added);
        let mut health = sync_health(&restarted, &next, Newcomers::Added);
        assert_eq!(weights(&health, &next), [8, 0, 0]);
        let pass = crate::health::ProbeResult::pass(std::time::Duration::from_millis(1));
        let h13 = &mut health.get_mut(&key("10.0.0.13")).unwrap().state;
        h13.on_probe(&pass);
        assert_eq!(
            h13.probed_status(),
            HealthStatus::Probation,
            "added to a serving VIP: a slow start from its first pass"
        );
        let w = weights(&health, &next)[2];
        assert!((1..8).contains(&w), "ramping from nothing: {w}");
    }

    #[test]
    fn health_sets_effective_weights_and_follows_the_configuration() {
        // Without slow start and ejection hold: probation at a quarter of the weight.
        let text = "interface = \"eth0\"\n[encap]\nsource_v4 = \"10.0.0.2\"\n\n[[vip]]\naddress = \"10.0.0.100\"\nport = 80\nprotocol = \"tcp\"\n[vip.health]\nrise = 1\nfall = 1\nslow_start_ms = 0\nejection_base_ms = 0\n[[vip.backend]]\naddress = \"10.0.0.11\"\nweight = 8\n[[vip.backend]]\naddress = \"10.0.0.12\"\nweight = 8\n[[vip.backend]]\naddress = \"10.0.0.13\"\nweight = 8\n";
        let cfg = Config::parse(text).unwrap();
        let mut health = sync_health(
            &HealthMap::new(),
            &cfg,
            Newcomers::Start(&PinnedHealth::all_up(&cfg)),
        );
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
        let carried = sync_health(&health, &next, Newcomers::Added);
        assert_eq!(carried.len(), 2);
        assert_eq!(
            carried[&key("10.0.0.11")].state.probed_status(),
            HealthStatus::Down
        );
        // New settings: a down backend stays down until it passes again.
        next.vips[0].health.as_mut().unwrap().interval_ms = 5000;
        let changed = sync_health(&health, &next, Newcomers::Added);
        assert_eq!(
            changed[&key("10.0.0.11")].state.probed_status(),
            HealthStatus::Down
        );
        next.vips[0].health = None;
        assert!(sync_health(&health, &next, Newcomers::Added).is_empty());
        assert_eq!(effective(&next, &health, &Learned::new()), next);
    }

    #[test]
    fn learning_builds_table_weights_and_health_still_wins() {
        let text = "interface = \"eth0\"\n[encap]\nsource_v4 = \"10.0.0.2\"\n\n[[vip]]\naddress = \"10.0.0.100\"\nport = 80\nprotocol = \"tcp\"\n[vip.health]\nrise = 1\nfall = 1\nejection_base_ms = 0\n[vip.learning]\nenabled = true\n[[vip.backend]]\naddress = \"10.0.0.11\"\n[[vip.backend]]\naddress = \"10.0.0.12\"\n[[vip.backend]]\naddress = \"10.0.0.13\"\nweight = 200\n";
        let cfg = Config::parse(text).unwrap();
        let mut health = sync_health(
            &HealthMap::new(),
            &cfg,
            Newcomers::Start(&PinnedHealth::all_up(&cfg)),
        );
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
        learned.insert(
            (id, a("10.0.0.11")),
            learning::LearnedWeight {
                weight: 80,
                carried: false,
            },
        );
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
        // On probation, health's ramp caps a learned weight, not a carried one: the carry
        // steers it by its latency (docs/model.md, "Carrying a slow backend").
        let pass = crate::health::ProbeResult::pass(std::time::Duration::from_millis(1));
        let h12 = &mut health.get_mut(&(id, a("10.0.0.12"))).unwrap().state;
        h12.on_probe(&fail);
        h12.on_probe(&pass);
        assert_eq!(h12.probed_status(), HealthStatus::Probation);
        let b12 = &cfg.vips[0].backends[1];
        for carried in [false, true] {
            learned.insert(
                (id, a("10.0.0.12")),
                learning::LearnedWeight {
                    weight: 30,
                    carried,
                },
            );
            let w = learning_weight(b12, id, &health, &learned);
            if carried {
                assert_eq!(w, 30);
            } else {
                assert!(w < 30, "capped by the ramp: {w}");
            }
        }
        learned.remove(&(id, a("10.0.0.12")));
        // Learned weights survive an unrelated change, not a change of the learning settings.
        let (_, kept) = sync_learning(&learning, &learned, &cfg);
        assert_eq!(kept.get(&(id, a("10.0.0.11"))).map(|l| l.weight), Some(80));
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
            carry_knee: Some(0.75),
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
        assert_eq!(p.carry_knee, Some(0.75));
        p.validate().unwrap();
    }
}
