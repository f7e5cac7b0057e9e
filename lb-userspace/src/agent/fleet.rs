//! The agent's side of fleet mode (`lbd --etcd`): the service configuration (the VIPs) comes
//! from the store instead of the file, as one transaction per store revision, with the same
//! validation as a change made with lbctl; the file keeps the node's own settings. The store
//! loop lives in [`crate::fleet`]; this room only offers it the transaction and the status.
use super::{
    apply_datapath, effective, refuse_leaving_no_serving_backend, refuse_new_host_problems,
    rollback, sync_health, sync_learning, warn_new, Agent, FleetTable, HealthMap, Learned,
    Newcomers,
};
use crate::{
    config::{self, Config},
    control::{events, FleetStatus, Request, VipName},
    datapath::ApplyReport,
    health::HealthStatus,
};
use anyhow::Result;
use std::net::IpAddr;
use tracing::info;

impl Agent {
    /// Puts the agent in fleet mode: its VIPs come from [`Agent::apply_fleet`] from now on;
    /// lbctl changes over the control socket are refused (they belong in the store) and a
    /// reload keeps the VIPs in force.
    pub fn set_fleet_status(&self, status: FleetStatus) {
        *self.fleet.lock().expect("fleet status lock") = Some(status);
    }

    /// Fleet mode's status, None for a single-node lbd.
    pub fn fleet_status(&self) -> Option<FleetStatus> {
        self.fleet.lock().expect("fleet status lock").clone()
    }

    pub(super) fn fleet_refusal(&self) -> Option<String> {
        self.fleet_status().map(|f| {
            format!(
                "this lbd is a fleet node: its VIPs and backends come from etcd ({} under {}), so a change here would be undone by the next revision; nothing changed. Write it to the store instead: lbctl --etcd {} --prefix {} ...",
                f.etcd, f.prefix, f.etcd, f.prefix
            )
        })
    }

    /// Applies `vips` (a store revision, `what` names it for the journal) in place of the
    /// current ones, as one transaction: validated with the node's settings, applied to the
    /// datapath (rolled back on failure); the file is not written. An error changes nothing.
    /// Backends in `known_down` whose health checks start here start down (a new leader takes
    /// over the health its predecessor published instead of bringing dead backends back into
    /// every node's tables until its own probes fail).
    pub async fn apply_fleet(
        &self,
        vips: Vec<config::Vip>,
        what: &str,
        known_down: &[(VipName, IpAddr)],
        table: Option<FleetTable>,
    ) -> Result<ApplyReport> {
        let mut guard = self.state.lock().await;
        let st = &mut *guard;
        let prev = st.config.clone();
        let mut next = prev.clone();
        next.vips = vips;
        if next == prev {
            if table == st.fleet_table {
                return Ok(ApplyReport::default());
            }
            // Only the published weights changed: the probes and models go on as they are.
            let inputs = (&st.health, &st.learned, table.as_ref());
            return match apply_datapath(&mut st.lb, &next, inputs, &mut st.timing) {
                Ok(report) => {
                    st.fleet_table = table;
                    Ok(report)
                }
                Err(e) => {
                    let old = (&st.health, &st.learned, st.fleet_table.as_ref());
                    rollback(&mut st.lb, &prev, old, &mut st.timing);
                    Err(e.context(events::RolledBack(
                        "the datapath rejected the published weights; the previous ones stay applied",
                    )))
                }
            };
        }
        next.validate()?;
        refuse_new_host_problems(&prev, &next)?;
        let _busy = self.events.begin_change(what, None, None);
        let mut health = sync_health(&st.health, &next, Newcomers::Added);
        for v in &next.vips {
            let id = super::vip_id(v);
            // A VIP this node did not probe before (it just became leader, or just started):
            // its backends start as the last published weights had them, not pending, or
            // every node would stop sending them new flows until this node's first probes.
            let vip_known = st.health.keys().any(|(vid, _)| *vid == id);
            for b in &v.backends {
                let key = (id, b.address);
                let down = known_down.contains(&(VipName::of(v), b.address));
                if st.health.contains_key(&key) || (vip_known && !down) {
                    continue;
                }
                if let Some(h) = health.get_mut(&key) {
                    h.state = if down {
                        crate::health::HealthState::new_down(h.config.rise, h.config.fall)
                    } else {
                        crate::health::HealthState::for_config(&h.config, HealthStatus::Up, false)
                    };
                }
            }
        }
        let (learning, learned) = sync_learning(&st.learning, &st.learned, &next);
        let inputs = (&health, &learned, table.as_ref());
        let report = match apply_datapath(&mut st.lb, &next, inputs, &mut st.timing) {
            Ok(r) => r,
            Err(e) => {
                let old = (&st.health, &st.learned, st.fleet_table.as_ref());
                rollback(&mut st.lb, &prev, old, &mut st.timing);
                return Err(e.context(events::RolledBack(
                    "the datapath rejected the revision; the previous one stays applied",
                )));
            }
        };
        warn_new(&self.events, Some(&st.config), &next);
        st.config = next;
        st.health = health;
        st.learning = learning;
        st.learned = learned;
        st.fleet_table = table;
        self.restart_probes(st);
        info!(
            tables_changed = report.tables.len(),
            "{what}: applied from the fleet store"
        );
        Ok(report)
    }

    /// The VIPs as this node's own health and learning would build them: health and learned
    /// weights folded into each backend's weight; and the backends its probes find down. The
    /// fleet's leader publishes these for every node (itself included) to build from.
    pub async fn effective_vips(&self) -> (Vec<config::Vip>, Vec<(VipName, IpAddr)>) {
        let st = self.state.lock().await;
        let mut down = Vec::new();
        for v in &st.config.vips {
            for b in &v.backends {
                if super::probed(&st.health, super::vip_id(v), b.address) == HealthStatus::Down {
                    down.push((VipName::of(v), b.address));
                }
            }
        }
        (effective(&st.config, &st.health, &st.learned).vips, down)
    }
}

/// What `lbctl --etcd ... <change>` does to the fleet's configuration before writing it: the
/// same edit, validation and refusals as a change sent to one lbd (health unknown: judged on
/// configured weights). `cfg` holds the store's VIPs and placeholder node settings.
pub fn fleet_edit(cfg: &mut Config, req: &Request) -> Result<String> {
    let prev = cfg.clone();
    let message = super::edit(cfg, req)?;
    if *cfg != prev {
        cfg.validate()?;
        if !req.forced() {
            refuse_leaving_no_serving_backend(&prev, cfg, &HealthMap::new(), &Learned::new())?;
        }
    }
    Ok(message)
}
