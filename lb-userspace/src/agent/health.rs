//! Health checks as the agent runs them: one prober per set of `[vip.health]` backends, each
//! outcome fed to the backend's state machine, and the datapath applied again on a change.
use super::{vip_id, Agent, State};
use crate::control::Readmission;
use crate::{
    config::{self, Config},
    control::VipName,
    datapath::{Balancer, VipId},
    health::{HealthConfig, HealthState, HealthStatus, ProbeReport, ProbeTarget, Prober},
};
use anyhow::{Context as _, Result};
use std::{collections::BTreeMap, net::IpAddr, sync::Arc, time::Instant};
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

/// Backends by (VIP, address).
pub(super) type HealthKey = (VipId, IpAddr);

pub(super) type HealthMap = BTreeMap<HealthKey, BackendHealth>;

/// A probe's key: the prober generation it belongs to, then the backend.
pub(super) type ProbeKey = (u64, VipId, IpAddr);

/// One health-checked backend, as the agent tracks it.
#[derive(Debug, Clone)]
pub(super) struct BackendHealth {
    pub(super) config: HealthConfig,
    pub(super) state: HealthState,
    pub(super) last_probe_ms: Option<f64>,
    pub(super) last_error: Option<String>,
    /// Probes since the learning loop last took a sample: latency sum (failures at the
    /// timeout), count, failures.
    pub(super) probe_sum_ms: f64,
    pub(super) probes: u32,
    pub(super) probe_failures: u32,
    /// The share of its weight last applied to the datapath (a ramp re-applies as it moves).
    pub(super) applied_share: f64,
}

/// The probers running, and where their reports go.
#[derive(Default)]
pub(super) struct Probes {
    /// Bumped at each restart: reports of an older generation are ignored.
    pub(super) epoch: u64,
    pub(super) prober: Option<Prober>,
    pub(super) reports: Option<mpsc::Sender<ProbeReport<ProbeKey>>>,
}

/// Capacity of the probe report channel (probes wait for room: no unbounded queue).
pub(super) const REPORT_QUEUE: usize = 1024;

/// The weight a backend on probation comes back with without a slow start: a quarter of its
/// configured weight (at least 1), until probes bring it up.
pub fn slow_start_weight(weight: u32) -> u32 {
    share_weight(weight, 0.25)
}

/// `share` of `weight` (at least 1 when the weight is not 0): a ramping backend's weight.
pub fn share_weight(weight: u32, share: f64) -> u32 {
    if weight == 0 || share <= 0.0 {
        0
    } else {
        ((f64::from(weight) * share.min(1.0)).floor() as u32).max(1)
    }
}

/// What the datapath said of each health-checked backend when lbd started: whether it was
/// down, by (VIP, address). Empty on a fresh start (nothing pinned).
#[derive(Debug, Clone, Default)]
pub struct PinnedHealth(pub(super) BTreeMap<HealthKey, bool>);

impl PinnedHealth {
    /// Reads the DOWN flags of a balancer restored from pins, before anything is applied.
    pub fn read(lb: &Balancer) -> Self {
        if !lb.resumed() {
            return PinnedHealth::default();
        }
        let mut out = BTreeMap::new();
        for v in lb.vips() {
            let id = vip_id(&v.config);
            for b in &v.backends {
                if let Some(down) = lb.backend_down(id, b.address) {
                    out.insert((id, b.address), down);
                }
            }
        }
        PinnedHealth(out)
    }

    /// `cfg` as lbd first applies it: a health-checked backend the datapath did not have
    /// serving (new, or down) gets no slots until its probes say so.
    pub fn startup_config(&self, cfg: &Config) -> Config {
        let mut out = cfg.clone();
        for v in &mut out.vips {
            if v.health.is_none() {
                continue;
            }
            let id = vip_id(v);
            for b in &mut v.backends {
                if self.0.get(&(id, b.address)) != Some(&false) {
                    b.weight = 0;
                }
            }
        }
        out
    }

    /// Every backend of `cfg` found serving (tests).
    #[cfg(test)]
    pub(super) fn all_up(cfg: &Config) -> Self {
        PinnedHealth(
            cfg.vips
                .iter()
                .flat_map(|v| {
                    v.backends
                        .iter()
                        .map(move |b| ((vip_id(v), b.address), false))
                })
                .collect(),
        )
    }

    /// The status a backend starts in: as the datapath had it, pending when it had none.
    fn status(&self, key: &HealthKey) -> HealthStatus {
        match self.0.get(key) {
            Some(true) => HealthStatus::Down,
            Some(false) => HealthStatus::Up,
            None => HealthStatus::Pending,
        }
    }
}

/// Where backends not tracked yet start.
pub(super) enum Newcomers<'a> {
    /// lbd starting: as the datapath had them (hitless restart), pending when new.
    Start(&'a PinnedHealth),
    /// Added to a running lbd: pending, then a slow start if their VIP already serves.
    Added,
}

/// `health` brought in line with `cfg`: an entry for every backend of every VIP with
/// `[vip.health]`, carried over when its settings did not change. A new backend starts as
/// `newcomers` says; one whose settings changed keeps being down (or pending) if it was.
pub(super) fn sync_health(health: &HealthMap, cfg: &Config, newcomers: Newcomers) -> HealthMap {
    let mut out = HealthMap::new();
    for v in &cfg.vips {
        let Some(h) = &v.health else { continue };
        let hc = h.to_config(v.port);
        let vip_known = health.keys().any(|(id, _)| *id == vip_id(v));
        for b in &v.backends {
            let key = (vip_id(v), b.address);
            let entry = match health.get(&key) {
                Some(old) if old.config == hc => old.clone(),
                old => {
                    let status = match (old.map(|o| o.state.probed_status()), &newcomers) {
                        (Some(HealthStatus::Down | HealthStatus::Probation), _) => {
                            HealthStatus::Down
                        }
                        (Some(HealthStatus::Pending), _) => HealthStatus::Pending,
                        (Some(_), _) => HealthStatus::Up,
                        (None, Newcomers::Start(pins)) => pins.status(&key),
                        (None, Newcomers::Added) => HealthStatus::Pending,
                    };
                    let ramp = vip_known && matches!(newcomers, Newcomers::Added);
                    BackendHealth {
                        state: HealthState::for_config(&hc, status, ramp),
                        config: hc.clone(),
                        last_probe_ms: old.and_then(|o| o.last_probe_ms),
                        last_error: old.and_then(|o| o.last_error.clone()),
                        probe_sum_ms: 0.0,
                        probes: 0,
                        probe_failures: 0,
                        applied_share: 0.0,
                    }
                }
            };
            out.insert(key, entry);
        }
    }
    out
}

/// The share of its weight the probes allow backend `addr` of `vip` now (1 without health
/// checks).
pub(super) fn health_share(health: &HealthMap, vip: VipId, addr: IpAddr) -> f64 {
    health
        .get(&(vip, addr))
        .map_or(1.0, |h| h.state.share(Instant::now()))
}

/// What the probes say of a backend (`Up` without health checks).
pub(super) fn probed(health: &HealthMap, vip: VipId, addr: IpAddr) -> HealthStatus {
    health
        .get(&(vip, addr))
        .map_or(HealthStatus::Up, |h| h.state.probed_status())
}

/// A backend's health as `backend list` and the metrics show it: (up, state, last probe).
pub(super) fn shown_health<'a>(
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
    let up = !matches!(probed, HealthStatus::Down | HealthStatus::Pending);
    (up, shown, h)
}

/// Where backend `addr` of `vip` is on a slow start now (`None`: not ramping).
pub(super) fn ramp_share(health: &HealthMap, vip: VipId, addr: IpAddr) -> Option<f64> {
    health
        .get(&(vip, addr))
        .and_then(|h| h.state.ramp_position(Instant::now()))
}

/// How a health-checked backend is being let back in, as `backend list`, `stats`, `model show`
/// and the metrics show it (all null without health checks).
pub(super) fn readmission(h: Option<&BackendHealth>) -> Readmission {
    let Some(h) = h else {
        return Readmission::default();
    };
    let now = Instant::now();
    Readmission {
        ejections: Some(h.state.recent_ejections(now)),
        returns_in_ms: h.state.held_for(now).map(|d| d.as_secs_f64() * 1e3),
        ramp: h.state.ramp_position(now),
    }
}

/// The configured backend `addr` of `vip` (the datapath's copy has effective weights).
pub(super) fn configured(cfg: &Config, vip: VipId, addr: IpAddr) -> Option<&config::Backend> {
    cfg.vips
        .iter()
        .find(|v| vip_id(v) == vip)?
        .backends
        .iter()
        .find(|b| b.address == addr)
}

impl Agent {
    /// Starts health checking (needs the tokio runtime): a probe task per backend of every VIP
    /// with `[vip.health]`, the task that acts on their reports, and the learning loop
    /// ([`Agent::start_learning`]). Each backend starts as `pins` say the datapath had it (a
    /// restart is hitless), pending (no flows before its first pass) when it had none.
    pub async fn start_health(self: &Arc<Self>, pins: &PinnedHealth) -> Result<()> {
        let (tx, mut rx) = mpsc::channel(REPORT_QUEUE);
        self.probes.lock().expect("probes lock").reports = Some(tx);
        let agent = Arc::downgrade(self);
        tokio::spawn(async move {
            while let Some(report) = rx.recv().await {
                let Some(agent) = agent.upgrade() else { return };
                // Reports that arrived together (every pending backend's first probe at start)
                // are applied together: one table write, not one per backend.
                let mut batch = vec![report];
                while let Ok(r) = rx.try_recv() {
                    batch.push(r);
                }
                agent.on_probes(batch).await;
            }
        });
        let mut st = self.state.lock().await;
        st.health = sync_health(&HealthMap::new(), &st.config, Newcomers::Start(pins));
        st.reapply().context("applying the backends' health")?;
        self.restart_probes(&st);
        drop(st);
        // The learning loop feeds on the probes: it starts with them.
        self.start_learning();
        Ok(())
    }

    /// Replaces the probers with ones for the backends in `st.health`, each starting from the
    /// state the agent has for it.
    pub(super) fn restart_probes(&self, st: &State) {
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

    /// Probe outcomes: each updates its backend's health; when a status changed (or a ramp
    /// moved), the datapath is applied once for all of them.
    pub(super) async fn on_probes(&self, reports: Vec<ProbeReport<ProbeKey>>) {
        let mut st = self.state.lock().await;
        let epoch = self.probes.lock().expect("probes lock").epoch;
        let mut changed = false;
        for report in reports {
            if report.key.0 == epoch {
                changed |= self.note_probe(&mut st, report);
            }
        }
        if !changed {
            return;
        }
        match st.reapply() {
            Ok(r) => {
                for (vip, moved, generation) in &r.tables {
                    info!(%vip, moved, generation, "table updated");
                }
            }
            Err(e) => error!("applying a health change failed: {e:#}"),
        }
    }

    /// One probe outcome on its backend's health; whether the datapath needs applying.
    fn note_probe(&self, st: &mut State, report: ProbeReport<ProbeKey>) -> bool {
        let (_, vip, addr) = report.key;
        let Some(h) = st.health.get_mut(&(vip, addr)) else {
            return false;
        };
        let result = report.result;
        h.last_probe_ms = Some(result.latency_ms());
        h.last_error = result.error.clone();
        h.probe_sum_ms += result.latency_ms();
        h.probes += 1;
        h.probe_failures += u32::from(!result.ok);
        let before = h.state.probed_status();
        let now = Instant::now();
        h.state.on_probe_at(&result, now);
        let after = h.state.probed_status();
        let share = h.state.share(now);
        if before == after {
            // A ramp moves the weight without a change of status: applied in steps of 5 %.
            let moved = (share - h.applied_share).abs() >= 0.05
                || (share == 1.0) != (h.applied_share == 1.0);
            if moved {
                h.applied_share = share;
            }
            return moved;
        }
        h.applied_share = share;
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
                recent_ejections = h.state.recent_ejections(now),
                held_out_ms = h.state.held_for(now).map_or(0, |d| d.as_millis() as u64),
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
        true
    }
}

/// The active check of a backend's service port while the model keeps it drained on a passive
/// signal (docs/model.md, "Trials"): a drained backend carries no traffic, so only a check of
/// the port its clients' SYNs go to can see a fault there end. Consecutive outcomes; a
/// refused connection is no outcome (the service may listen on the VIP's address only).
#[derive(Debug, Default)]
pub(super) struct ServiceChecker {
    passes: u32,
    failures: u32,
    /// Bumped when checking stops: a check still in flight then counts for nothing.
    generation: u64,
    in_flight: bool,
    last_started: Option<Instant>,
}

/// One backend's checker, shared with the check in flight.
pub(super) type SharedCheck = Arc<std::sync::Mutex<ServiceChecker>>;

/// At most one check per backend in this period.
const SERVICE_CHECK_PERIOD: std::time::Duration = std::time::Duration::from_secs(1);

/// The service check's outcomes so far while `on` (`None`: none conclusive yet, or off), and
/// the next check started if one is due (needs the tokio runtime). Off: forgotten.
pub(super) fn service_check(
    check: &SharedCheck,
    target: std::net::SocketAddr,
    timeout: std::time::Duration,
    on: bool,
) -> Option<crate::learning::ServiceCheck> {
    let mut c = check.lock().expect("service check lock");
    if !on {
        if c.passes > 0 || c.failures > 0 || c.in_flight || c.last_started.is_some() {
            c.generation += 1;
            (c.passes, c.failures, c.in_flight, c.last_started) = (0, 0, false, None);
        }
        return None;
    }
    let now = Instant::now();
    let due = c
        .last_started
        .is_none_or(|t| now.duration_since(t) >= SERVICE_CHECK_PERIOD);
    if !c.in_flight && due {
        (c.in_flight, c.last_started) = (true, Some(now));
        let (shared, generation) = (Arc::clone(check), c.generation);
        tokio::spawn(async move {
            let outcome =
                match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(target)).await {
                    Ok(Ok(_)) => Some(true),
                    Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => None,
                    _ => Some(false),
                };
            let mut c = shared.lock().expect("service check lock");
            if c.generation != generation {
                return;
            }
            c.in_flight = false;
            match outcome {
                Some(true) => (c.passes, c.failures) = (c.passes.saturating_add(1), 0),
                Some(false) => (c.passes, c.failures) = (0, c.failures.saturating_add(1)),
                None => {}
            }
        });
    }
    (c.passes > 0 || c.failures > 0).then_some(crate::learning::ServiceCheck {
        passes: c.passes,
        failures: c.failures,
    })
}
