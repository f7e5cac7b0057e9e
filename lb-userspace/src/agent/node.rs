//! This node in a fleet: which VIPs it announces by BGP ([`crate::fleet::bgp`]) and its drain.
//!
//! A VIP address is announced while the node can serve it: no datapath fault (program
//! attached, pins in place), at least one VIP on that address with a serving backend, and
//! the node not drained. [`Agent::node_tick`] re-decides every 250 ms (lbd's datapath check),
//! so a detached program is withdrawn within about 250 ms plus the router's update.
use super::{Agent, State};
use crate::{
    config::MAX_DRAIN_SECONDS,
    control::{events::Kind, BgpSession, BgpStatus, NodeChanged},
    fleet::bgp::{self, Speaker},
};
use anyhow::{bail, Result};
use std::{
    collections::BTreeSet,
    net::IpAddr,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};
use tracing::{error, info, warn};

/// Where the node stands with its routers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Drain {
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

/// The speaker and what the agent knows of it (behind its own lock, taken after `state`).
pub(super) struct Node {
    speaker: Option<Speaker>,
    drain: Drain,
    /// Why the speaker is not running or could not be told, if so.
    fault: Option<String>,
    sessions: Vec<BgpSession>,
    /// Every configured VIP address and whether it has a serving backend, at the last tick.
    vips: Vec<(IpAddr, bool)>,
    node_reason: Option<&'static str>,
    changed_ms: Option<u64>,
    /// When BIRD last failed (restarted at most every 2 s).
    last_start: Option<Instant>,
}

impl Node {
    pub(super) fn new() -> Node {
        Node {
            speaker: None,
            drain: Drain::Serving,
            fault: None,
            sessions: Vec::new(),
            vips: Vec::new(),
            node_reason: None,
            changed_ms: None,
            last_start: None,
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
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
    /// Starts the node-local BIRD when the configuration has `[bgp]` (it announces nothing
    /// until the first [`Agent::node_tick`]).
    pub async fn start_bgp(&self) -> Result<()> {
        let cfg = self.config().await;
        let Some(b) = &cfg.bgp else { return Ok(()) };
        let speaker = Speaker::try_start(b, &cfg.control_socket)?;
        info!(pid = speaker.pid(), peers = ?b.peers, "BGP speaker (BIRD) started");
        let mut node = self.node.lock().unwrap_or_else(|e| e.into_inner());
        node.speaker = Some(speaker);
        node.last_start = Some(Instant::now());
        Ok(())
    }

    /// Re-decides what this node announces (`faults`: the datapath's, empty while whole),
    /// restarts a BIRD that died, ends a drain whose timeout passed and reads the sessions.
    pub async fn node_tick(&self, faults: &[String]) {
        let st = self.state.lock().await;
        let Some(b) = st.config.bgp.clone() else {
            return;
        };
        let control_socket = st.config.control_socket.clone();
        let vips = servable(&st);
        drop(st);
        let mut node = self.node.lock().unwrap_or_else(|e| e.into_inner());
        let node = &mut *node;
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
        if let Some(status) = node.speaker.as_mut().and_then(Speaker::exited) {
            let msg = format!("BGP speaker (BIRD) exited with {status}: this node's routes are withdrawn; restarting it");
            error!("{msg}");
            self.events.record(Kind::BgpSpeakerFailed, msg.clone());
            node.speaker = None;
            node.fault = Some(msg);
        }
        if node.speaker.is_none()
            && node
                .last_start
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(2))
        {
            node.last_start = Some(Instant::now());
            match Speaker::try_start(&b, &control_socket) {
                Ok(s) => {
                    info!(pid = s.pid(), "BGP speaker (BIRD) started again");
                    node.speaker = Some(s);
                    node.fault = None;
                }
                Err(e) => node.fault = Some(format!("{e:#}")),
            }
        }
        node.node_reason = match node.drain {
            Drain::Draining { .. } => Some("node_draining"),
            Drain::Drained => Some("node_drained"),
            Drain::Serving if !faults.is_empty() => Some("datapath_faults"),
            Drain::Serving => None,
        };
        let want: BTreeSet<IpAddr> = match node.node_reason {
            Some(_) => BTreeSet::new(),
            None => vips.iter().filter(|(_, s)| *s).map(|(a, _)| *a).collect(),
        };
        node.vips = vips;
        let Some(speaker) = node.speaker.as_mut() else {
            node.sessions = bgp::unknown_sessions(&b, "BIRD is not running");
            return;
        };
        let before = speaker.announced().clone();
        match speaker.try_announce(&want) {
            Ok(true) => {
                node.changed_ms = Some(now_ms());
                node.fault = None;
                let list = |s: &BTreeSet<IpAddr>| {
                    s.iter()
                        .map(|a| bgp::prefix(*a))
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                let msg = format!(
                    "BGP announcements changed ({}): now [{}], before [{}]",
                    node.node_reason.unwrap_or("serving"),
                    list(&want),
                    list(&before)
                );
                info!("{msg}");
                self.events.record(Kind::RoutesChanged, msg);
            }
            Ok(false) => {}
            Err(e) => {
                warn!("telling BIRD what to announce: {e:#}");
                node.fault = Some(format!("{e:#}"));
            }
        }
        let sessions = speaker
            .try_sessions()
            .unwrap_or_else(|e| bgp::unknown_sessions(&b, &format!("{e:#}")));
        self.journal_sessions(&node.sessions, &sessions);
        node.sessions = sessions;
    }

    /// Journals sessions coming up or going down.
    fn journal_sessions(&self, before: &[BgpSession], now: &[BgpSession]) {
        for s in now {
            let was = before
                .iter()
                .find(|p| p.peer == s.peer)
                .is_some_and(|p| p.established);
            if was == s.established {
                continue;
            }
            let (kind, msg) = if s.established {
                (
                    Kind::BgpSessionUp,
                    format!("BGP session with {} established", s.peer),
                )
            } else {
                (
                    Kind::BgpSessionDown,
                    format!("BGP session with {} down: {} ({})", s.peer, s.state, s.info),
                )
            };
            info!("{msg}");
            self.events.record(kind, msg);
        }
    }

    /// This node's BGP state (`status.bgp`, the `lb_bgp_*` metrics); None without `[bgp]`.
    pub async fn node_status(&self) -> Option<BgpStatus> {
        let has_bgp = self.state.lock().await.config.bgp.is_some();
        self.bgp_status(has_bgp)
    }

    /// `status.bgp`: null without `[bgp]`.
    pub(super) fn bgp_status(&self, has_bgp: bool) -> Option<BgpStatus> {
        if !has_bgp {
            return None;
        }
        let mut node = self.node.lock().unwrap_or_else(|e| e.into_inner());
        let node = &mut *node;
        let speaker = match (&mut node.speaker, &node.fault) {
            (Some(s), None) => format!("running (pid {})", s.pid()),
            (Some(s), Some(f)) => format!("running (pid {}), last error: {f}", s.pid()),
            (None, Some(f)) => f.clone(),
            (None, None) => "not started".into(),
        };
        Some(BgpStatus {
            node: node.drain.name().into(),
            drain_remaining_seconds: match node.drain {
                Drain::Draining { until } => {
                    Some(until.saturating_duration_since(Instant::now()).as_secs())
                }
                _ => None,
            },
            speaker,
            sessions: node.sessions.clone(),
            announced: node
                .speaker
                .as_ref()
                .map(|s| s.announced().iter().map(|a| bgp::prefix(*a)).collect())
                .unwrap_or_default(),
            withheld: bgp::withheld(&node.vips, node.node_reason),
            changed_ms: node.changed_ms,
        })
    }

    /// `lbctl node drain` / `undrain`.
    pub(super) async fn node_change(
        &self,
        drain: bool,
        timeout: Option<u64>,
    ) -> Result<NodeChanged> {
        let Some(b) = self.config().await.bgp else {
            bail!("node drain/undrain: this lbd has no [bgp] section, so it announces nothing to withdraw; add [bgp] to lbd.toml (see the README's fleet section) and restart lbd, or take the node out at the router");
        };
        let timeout = timeout.unwrap_or(b.drain_timeout_seconds);
        if drain && !(1..=MAX_DRAIN_SECONDS).contains(&timeout) {
            bail!("timeout: {timeout} seconds is out of range; use 1 to {MAX_DRAIN_SECONDS}");
        }
        let changed = {
            let mut node = self.node.lock().unwrap_or_else(|e| e.into_inner());
            let before = node.drain;
            node.drain = match (drain, before) {
                (true, Drain::Serving) => Drain::Draining {
                    until: Instant::now() + Duration::from_secs(timeout),
                },
                (true, other) => other,
                (false, _) => Drain::Serving,
            };
            node.drain != before
        };
        let (kind, message) = match (drain, changed) {
            (true, true) => (Kind::NodeDraining, format!("node draining: BGP routes withdrawn; flows that still arrive are forwarded; drained in {timeout} s")),
            (true, false) => (Kind::NodeDraining, "node already draining or drained (nothing changed)".to_string()),
            (false, true) => (Kind::NodeUndrained, "node undrained: announcing the VIPs it can serve again".to_string()),
            (false, false) => (Kind::NodeUndrained, "node was not drained (nothing changed)".to_string()),
        };
        if changed {
            info!("{message}");
            self.events.record(kind, message.clone());
            // Withdraw or announce now rather than at the next tick.
            let faults = self.with_balancer(|lb, _| lb.datapath_faults()).await;
            self.node_tick(&faults).await;
        }
        let node = self
            .node
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain
            .name()
            .to_string();
        Ok(NodeChanged {
            message,
            changed,
            node,
        })
    }

    /// Stops BIRD (on lbd's clean stop): it closes its sessions with a notification, and the
    /// routers withdraw this node's routes at once.
    pub fn stop_bgp(&self) {
        if let Some(mut s) = self
            .node
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .speaker
            .take()
        {
            s.stop();
            info!("BGP speaker stopped: routes withdrawn");
        }
    }
}
