//! This node's standing with its routers: its drain (`lbctl node drain`/`undrain`) and what
//! it can serve, for the fleet's BGP announcer ([`crate::fleet::bgp`], which sits above the
//! agent), and the announcer's last report, for `lbctl status` and the metrics.
//!
//! A VIP address may be announced while the node can serve it: no datapath fault (program
//! attached, pins in place), at least one VIP on that address with a serving backend, and the
//! node not drained ([`NodeInputs`]).
use super::{Agent, State};
use crate::{
    config::{Bgp, MAX_DRAIN_SECONDS},
    control::{events::Kind, BgpStatus, NodeChanged},
};
use anyhow::{bail, Result};
use std::{
    net::IpAddr,
    time::{Duration, Instant},
};
use tracing::info;

/// Where the node stands with its routers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Drain {
    Serving,
    Draining { until: Instant },
    Drained,
}

impl Drain {
    fn name(self) -> &'static str {
        match self {
            Drain::Serving => "serving",
            Drain::Draining { .. } => "draining",
            Drain::Drained => "drained",
        }
    }
}

/// The drain and the announcer's last report (behind their own lock, taken after `state`,
/// never held across an await).
pub(super) struct Node {
    drain: Drain,
    report: Option<BgpStatus>,
}

impl Node {
    pub(super) fn new() -> Node {
        Node {
            drain: Drain::Serving,
            report: None,
        }
    }
}

/// What decides this node's announcements, at one instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInputs {
    /// `[bgp]` as configured (None: nothing to announce).
    pub bgp: Option<Bgp>,
    /// Every VIP address in the datapath, and whether one of its VIPs has a serving backend.
    pub vips: Vec<(IpAddr, bool)>,
    /// Why nothing at all may be announced (`node_draining`, `node_drained`,
    /// `datapath_faults`), if so.
    pub withhold_all: Option<&'static str>,
}

/// Every VIP address of the datapath and whether one of its VIPs has a serving backend.
fn servable(st: &State) -> Vec<(IpAddr, bool)> {
    let mut out: Vec<(IpAddr, bool)> = Vec::new();
    for v in st.lb.vips() {
        let serving = v.backends.iter().any(|b| b.weight > 0);
        match out.iter_mut().find(|(a, _)| *a == v.config.address) {
            Some((_, s)) => *s |= serving,
            None => out.push((v.config.address, serving)),
        }
    }
    out
}

impl Agent {
    fn node(&self) -> std::sync::MutexGuard<'_, Node> {
        self.node.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What this node may announce now; ends a drain whose timeout has passed.
    pub async fn node_inputs(&self) -> NodeInputs {
        let (bgp, vips, faulty) = {
            let st = self.state.lock().await;
            (
                st.config.bgp.clone(),
                servable(&st),
                !st.lb.datapath_faults().is_empty(),
            )
        };
        let mut node = self.node();
        if let Drain::Draining { until } = node.drain {
            if Instant::now() >= until {
                node.drain = Drain::Drained;
                info!("drain timeout reached: node drained (safe to stop)");
                self.events.record(
                    Kind::NodeDrained,
                    "the drain's timeout passed: this node is drained (no routes announced; safe to stop or upgrade)".to_string(),
                );
            }
        }
        let withhold_all = match node.drain {
            Drain::Draining { .. } => Some("node_draining"),
            Drain::Drained => Some("node_drained"),
            Drain::Serving if faulty => Some("datapath_faults"),
            Drain::Serving => None,
        };
        NodeInputs {
            bgp,
            vips,
            withhold_all,
        }
    }

    /// The announcer's report of what it announces and its sessions.
    pub fn set_bgp_report(&self, report: BgpStatus) {
        self.node().report = Some(report);
    }

    /// Woken on `node drain`/`undrain`, so that the announcer acts at once.
    pub fn node_changed(&self) -> &tokio::sync::Notify {
        &self.node_notify
    }

    /// This node's BGP state (`status.bgp`, the `lb_bgp_*` metrics); None without `[bgp]`.
    pub async fn node_status(&self) -> Option<BgpStatus> {
        let has_bgp = self.state.lock().await.config.bgp.is_some();
        self.bgp_status(has_bgp)
    }

    /// `status.bgp`: the announcer's last report with the drain as it is now; None without
    /// `[bgp]`.
    pub(super) fn bgp_status(&self, has_bgp: bool) -> Option<BgpStatus> {
        if !has_bgp {
            return None;
        }
        let node = self.node();
        let mut s = node.report.clone().unwrap_or_else(|| BgpStatus {
            speaker: "not started".into(),
            ..BgpStatus::default()
        });
        s.node = node.drain.name().into();
        s.drain_remaining_seconds = match node.drain {
            Drain::Draining { until } => {
                Some(until.saturating_duration_since(Instant::now()).as_secs())
            }
            _ => None,
        };
        Some(s)
    }

    /// `lbctl node drain` / `undrain`.
    pub(super) async fn node_change(
        &self,
        drain: bool,
        timeout: Option<u64>,
        who: &str,
    ) -> Result<NodeChanged> {
        let Some(b) = self.config().await.bgp else {
            bail!("node drain/undrain: this lbd has no [bgp] section, so it announces nothing to withdraw; add [bgp] to lbd.toml (see the README's fleet section) and restart lbd, or take the node out at the router");
        };
        let timeout = timeout.unwrap_or(b.drain_timeout_seconds);
        if drain && !(1..=MAX_DRAIN_SECONDS).contains(&timeout) {
            bail!("timeout: {timeout} seconds is out of range; use 1 to {MAX_DRAIN_SECONDS}");
        }
        let (changed, now) = {
            let mut node = self.node();
            let before = node.drain;
            node.drain = match (drain, before) {
                (true, Drain::Serving) => Drain::Draining {
                    until: Instant::now() + Duration::from_secs(timeout),
                },
                (true, other) => other,
                (false, _) => Drain::Serving,
            };
            (node.drain != before, node.drain.name().to_string())
        };
        let message = match (drain, changed) {
            (true, true) => format!("node draining: its BGP routes are withdrawn and the flows that still arrive are forwarded; drained in {timeout} s"),
            (true, false) => format!("node already {now} (nothing changed)"),
            (false, true) => "node undrained: it announces the VIPs it can serve again".to_string(),
            (false, false) => "node was not drained (nothing changed)".to_string(),
        };
        if changed {
            info!(request = %who, "{message}");
            let kind = if drain {
                Kind::NodeDraining
            } else {
                Kind::NodeUndrained
            };
            self.events.record(kind, format!("{who}: {message}"));
            self.node_notify.notify_one();
        }
        Ok(NodeChanged {
            message,
            changed,
            node: now,
        })
    }
}
