//! The control API between `lbd` and `lbctl`: newline-delimited JSON over a Unix socket.
//!
//! A client writes one [`Request`] per line and reads one [`Response`] line for each, in order;
//! a connection may carry any number of requests. Requests are tagged by `"command"`:
//!
//! ```text
//! {"command":"backend_set_weight","vip":"10.0.0.1:80/tcp","address":"10.0.0.11","weight":3}
//! {"ok":true,"result":{"message":"...","tables":[{"vip":"10.0.0.1:80/tcp","slots_moved":21845,"generation":4}]}}
//! {"ok":false,"error":"vip 10.0.0.9:80/tcp: no such VIP; `lbctl vip list` shows the configured ones"}
//! ```
//!
//! Every error names the field and the fix. The result types below are also what
//! `lbctl --json` prints, so their field names are a stable interface (README, "Operate").
use crate::config::{Forwarding, Protocol};
use serde::{Deserialize, Serialize};
use std::{collections::BTreeMap, net::IpAddr};

/// Longest request or response line either side accepts.
pub const MAX_LINE: usize = 16 << 20;

/// How a VIP is written everywhere (CLI, JSON, metrics labels): `10.0.0.1:80/tcp`,
/// `[2001:db8::1]:443/tcp`.
pub const VIP_SYNTAX: &str = "ADDRESS:PORT/PROTOCOL, e.g. 10.0.0.1:80/tcp or [2001:db8::1]:443/tcp";

/// A VIP's identity: address, port, protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VipName {
    pub address: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
}

impl std::fmt::Display for VipName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.address {
            IpAddr::V4(a) => write!(f, "{a}:{}/{}", self.port, self.protocol),
            IpAddr::V6(a) => write!(f, "[{a}]:{}/{}", self.port, self.protocol),
        }
    }
}

impl std::str::FromStr for VipName {
    type Err = String;

    /// Parses `ADDRESS:PORT/PROTOCOL`; IPv6 addresses in brackets.
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |why: String| Err(format!("VIP {s:?}: {why}; write {VIP_SYNTAX}"));
        let Some((hostport, proto)) = s.rsplit_once('/') else {
            return bad("the protocol is missing".into());
        };
        let protocol = match proto.to_ascii_lowercase().as_str() {
            "tcp" => Protocol::Tcp,
            "udp" => Protocol::Udp,
            "" => return bad("the protocol is missing".into()),
            p => {
                return Err(format!(
                    "VIP {s:?}: protocol {p:?} is not supported; use tcp or udp"
                ))
            }
        };
        let bracketed = hostport.starts_with('[');
        let (addr, port) = if let Some(rest) = hostport.strip_prefix('[') {
            let Some((a, p)) = rest.split_once("]:") else {
                return bad("an IPv6 address in brackets must be followed by :PORT".into());
            };
            (a, p)
        } else {
            let Some((a, p)) = hostport.rsplit_once(':') else {
                return bad("the port is missing".into());
            };
            if a.contains(':') {
                return bad("IPv6 addresses go in brackets".into());
            }
            (a, p)
        };
        let address: IpAddr = match addr.parse() {
            Ok(a) => a,
            Err(_) => return bad(format!("{addr:?} is not an IP address")),
        };
        if bracketed && address.is_ipv4() {
            return bad(format!("brackets are for IPv6 addresses, not {addr:?}"));
        }
        let port = match port.parse::<u16>() {
            Ok(p) if p > 0 => p,
            _ => {
                return Err(format!(
                    "VIP {s:?}: port {port:?} is not a number from 1 to 65535"
                ))
            }
        };
        Ok(VipName {
            address,
            port,
            protocol,
        })
    }
}

impl VipName {
    pub fn of(v: &crate::config::Vip) -> Self {
        VipName {
            address: v.address,
            port: v.port,
            protocol: v.protocol,
        }
    }
}

/// Parses a backend address (no port: a backend serves the VIP's port).
pub fn parse_backend_address(s: &str) -> Result<IpAddr, String> {
    if let Ok(a) = s.parse::<IpAddr>() {
        return Ok(a);
    }
    let looks_like_port = s.parse::<std::net::SocketAddr>().is_ok();
    if looks_like_port {
        Err(format!(
            "backend address {s:?}: write the address without a port (a backend serves the VIP's port), e.g. 10.0.0.11 or 2001:db8::11"
        ))
    } else {
        Err(format!(
            "backend address {s:?}: not an IP address; write e.g. 10.0.0.11 or 2001:db8::11"
        ))
    }
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// One request. VIPs are written as in [`VipName`]; backend addresses as plain IP addresses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Adds a VIP with no backends (`forwarding` defaults to ipip, `table_size` to 65537).
    VipAdd {
        vip: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        forwarding: Option<Forwarding>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        table_size: Option<u32>,
        /// Accept a VIP that is an address of the balancer's interface (its port is taken over
        /// from the host's own service); written to the file as `allow_host_address = true`.
        #[serde(default, skip_serializing_if = "is_false")]
        force: bool,
    },
    /// Removes a VIP and its backends (their flows end).
    VipRemove {
        vip: String,
    },
    /// Result: `[VipEntry]`.
    VipList,
    /// Adds a backend (weight defaults to 1).
    BackendAdd {
        vip: String,
        address: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        weight: Option<u32>,
    },
    BackendRemove {
        vip: String,
        address: String,
        /// Do it even if it leaves the VIP no serving backend (all its traffic dropped).
        #[serde(default, skip_serializing_if = "is_false")]
        force: bool,
    },
    BackendSetWeight {
        vip: String,
        address: String,
        weight: u32,
        /// Do it even if it leaves the VIP no serving backend (all its traffic dropped).
        #[serde(default, skip_serializing_if = "is_false")]
        force: bool,
    },
    /// No new flows to the backend; its established flows continue.
    BackendDrain {
        vip: String,
        address: String,
        /// Do it even if it leaves the VIP no serving backend (all its traffic dropped).
        #[serde(default, skip_serializing_if = "is_false")]
        force: bool,
    },
    BackendUndrain {
        vip: String,
        address: String,
    },
    /// Result: `[BackendEntry]`, of one VIP or of all.
    BackendList {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        vip: Option<String>,
    },
    /// Result: `[ModelVip]`: the learned-weight model of one VIP with `[vip.learning]`, or of
    /// all of them.
    ModelShow {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        vip: Option<String>,
    },
    /// Result: [`StatsSnapshot`].
    Stats,
    /// Result: [`Status`].
    Status,
    /// Result: the running [`crate::config::Config`] (`lbd --check` compares a file's
    /// restart-only keys with it).
    RunningConfig,
    /// Result: [`NodeChanged`]. Withdraws this node's BGP routes (the router sends it no new
    /// flows) and keeps forwarding what still arrives; `draining` for `timeout_seconds`
    /// (default `bgp.drain_timeout_seconds`), then `drained`. Needs `[bgp]`.
    NodeDrain {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timeout_seconds: Option<u64>,
    },
    /// Result: [`NodeChanged`]. Announces the VIPs again (those it can serve).
    NodeUndrain,
    /// Result: [`ConnList`]: tracked connections, of one VIP or all, of one backend or all.
    ConnList {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        vip: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        backend: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<u32>,
    },
    /// Result: [`Lookup`]: the backend a new flow from `client` (`ADDR` or `ADDR:PORT`) gets
    /// now, and the one it has if it is tracked.
    Lookup {
        vip: String,
        client: String,
    },
    /// Result: [`DryRun`]: what `request` (a change) would do to the tables; nothing changes.
    DryRun {
        request: Box<Request>,
    },
    /// Result: [`DryRun`]: what reloading with this configuration file's text would do to the
    /// tables (`lbd --check --diff`); nothing changes.
    ConfigDiff {
        text: String,
    },
}

impl Request {
    /// Whether the request carries `--force`.
    pub fn forced(&self) -> bool {
        match self {
            Request::VipAdd { force, .. }
            | Request::BackendRemove { force, .. }
            | Request::BackendSetWeight { force, .. }
            | Request::BackendDrain { force, .. } => *force,
            _ => false,
        }
    }

    /// The request in the words of the `lbctl` command that sends it (`lbctl backend drain
    /// 10.0.0.1:80/tcp 10.0.0.11 --force`): how lbd's log and journal name who asked for what.
    pub fn as_lbctl(&self) -> String {
        let force = |f: &bool| if *f { " --force" } else { "" };
        match self {
            Request::VipAdd {
                vip,
                forwarding,
                table_size,
                force: f,
            } => {
                let mut s = format!("lbctl vip add {vip}");
                if let Some(fw) = forwarding {
                    s.push_str(match fw {
                        Forwarding::Ipip => " --forwarding ipip",
                        Forwarding::L2 => " --forwarding l2",
                    });
                }
                if let Some(t) = table_size {
                    s.push_str(&format!(" --table-size {t}"));
                }
                s + force(f)
            }
            Request::VipRemove { vip } => format!("lbctl vip remove {vip}"),
            Request::VipList => "lbctl vip list".into(),
            Request::BackendAdd {
                vip,
                address,
                weight,
            } => match weight {
                Some(w) => format!("lbctl backend add {vip} {address} --weight {w}"),
                None => format!("lbctl backend add {vip} {address}"),
            },
            Request::BackendRemove {
                vip,
                address,
                force: f,
            } => format!("lbctl backend remove {vip} {address}{}", force(f)),
            Request::BackendSetWeight {
                vip,
                address,
                weight,
                force: f,
            } => format!(
                "lbctl backend set-weight {vip} {address} {weight}{}",
                force(f)
            ),
            Request::BackendDrain {
                vip,
                address,
                force: f,
            } => format!("lbctl backend drain {vip} {address}{}", force(f)),
            Request::BackendUndrain { vip, address } => {
                format!("lbctl backend undrain {vip} {address}")
            }
            Request::BackendList { vip } => {
                format!("lbctl backend list {}", vip.as_deref().unwrap_or(""))
                    .trim_end()
                    .into()
            }
            Request::ModelShow { vip } => {
                format!("lbctl model show {}", vip.as_deref().unwrap_or(""))
                    .trim_end()
                    .into()
            }
            Request::Stats => "lbctl stats".into(),
            Request::Status => "lbctl status".into(),
            Request::RunningConfig => "lbd --check (running_config)".into(),
            Request::NodeDrain {
                timeout_seconds: Some(t),
            } => format!("lbctl node drain --timeout {t}"),
            Request::NodeDrain {
                timeout_seconds: None,
            } => "lbctl node drain".into(),
            Request::NodeUndrain => "lbctl node undrain".into(),
            Request::ConnList {
                vip,
                backend,
                limit,
            } => {
                let mut s = "lbctl conn list".to_string();
                if let Some(v) = vip {
                    s.push_str(&format!(" {v}"));
                }
                if let Some(b) = backend {
                    s.push_str(&format!(" --backend {b}"));
                }
                if let Some(n) = limit {
                    s.push_str(&format!(" --limit {n}"));
                }
                s
            }
            Request::Lookup { vip, client } => format!("lbctl lookup {vip} {client}"),
            Request::DryRun { request } => format!("{} --dry-run", request.as_lbctl()),
            Request::ConfigDiff { .. } => "lbd --check --diff".into(),
        }
    }

    /// Whether the request changes the configuration.
    pub fn is_mutation(&self) -> bool {
        !matches!(
            self,
            Request::VipList
                | Request::BackendList { .. }
                | Request::ModelShow { .. }
                | Request::Stats
                | Request::Status
                | Request::RunningConfig
                | Request::NodeDrain { .. }
                | Request::NodeUndrain
                | Request::ConnList { .. }
                | Request::Lookup { .. }
                | Request::DryRun { .. }
                | Request::ConfigDiff { .. }
        )
    }
}

/// `lbctl model show`: one VIP with `[vip.learning]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelVip {
    pub vip: String,
    /// Learning enabled (a VIP with `[vip.learning]` but `enabled = false` shows configured
    /// weights).
    pub learning: bool,
    pub interval_ms: u64,
    #[serde(serialize_with = "super::round::ms")]
    pub latency_target_ms: f64,
    /// Steps taken so far (0: none yet).
    pub step: u64,
    pub table_size: u32,
    /// Most slots one step's gradual changes may move (disruption_budget × table_size).
    pub slots_budget: usize,
    /// Slots the last step moved in all, and by gradual changes.
    pub last_slots_moved: usize,
    pub last_slots_moved_gradual: usize,
    /// Most slots any step moved by gradual changes since lbd started (at most `slots_budget`).
    pub max_slots_moved_gradual: usize,
    /// Slowest fit of one backend's window since lbd started, in microseconds of the agent
    /// thread's CPU time (time the core spent elsewhere is not the fit's).
    #[serde(default)]
    pub max_fit_us: u64,
    /// 99th percentile of the CPU time of the last `fits` fits (at most 4096), in
    /// microseconds: the fit's own cost. The slowest also carries what the kernel charged to
    /// the thread meanwhile (softirq work, on kernels without IRQ time accounting).
    #[serde(default)]
    pub fit_p99_us: u64,
    #[serde(default)]
    pub fits: usize,
    /// Slowest learning step (every fit, the decision and its table checks), in microseconds.
    #[serde(default)]
    pub max_step_us: u64,
    pub backends: Vec<ModelBackend>,
}

/// `lbctl model show`: one backend's model and weight, with the reasons.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelBackend {
    pub address: IpAddr,
    pub id: u32,
    pub health: String,
    pub pinned: bool,
    pub learning: bool,
    /// Configured weight (configuration units).
    pub configured_weight: u32,
    /// Table weights (configured × 100): the one in the table now, and what the model wants.
    pub configured_table_weight: u32,
    pub current_weight: u32,
    #[serde(default)]
    #[serde(serialize_with = "super::round::opt_rate")]
    pub target_weight: Option<f64>,
    /// Drained by the model (latency, errors, SYN retries or RSTs far above its peers).
    pub drained_by_model: bool,
    /// Samples in the backend's window.
    pub samples: usize,
    /// The accepted fit (`1000 / latency_ms = intercept + slope × load`), or why there is none.
    #[serde(default)]
    #[serde(serialize_with = "super::round::opt_fit")]
    pub fit: Option<crate::learning::Fit>,
    #[serde(default)]
    pub refusal: Option<String>,
    #[serde(default)]
    pub refusal_detail: Option<crate::learning::Refusal>,
    #[serde(default)]
    #[serde(serialize_with = "super::round::opt_rate")]
    pub capacity_at_target: Option<f64>,
    #[serde(default)]
    #[serde(serialize_with = "super::round::opt_ms")]
    pub predicted_latency_ms: Option<f64>,
    /// Means over the last few steps (load in new flows/s, probe latency, error share, ...).
    #[serde(default)]
    #[serde(serialize_with = "super::round::opt_observed")]
    pub observed: Option<crate::learning::Observed>,
    /// Health's readmission, as in `BackendEntry`.
    #[serde(flatten)]
    pub readmission: Readmission,
    /// The model's trial after a drain on a passive signal: flows judged so far (null when not
    /// on trial), and the trials failed since the last one that passed.
    #[serde(default)]
    #[serde(serialize_with = "super::round::opt_rate")]
    pub trial_flows: Option<f64>,
    #[serde(default)]
    pub failed_trials: u32,
    /// Carried while slow at the share it can serve: the table weight it is carried at (null
    /// when not carried).
    #[serde(default)]
    #[serde(serialize_with = "super::round::opt_rate")]
    pub carry_weight: Option<f64>,
    /// The last decisions, oldest first, with their reasons.
    pub decisions: Vec<ModelDecisionEntry>,
}

/// One step's outcome for one backend.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelDecisionEntry {
    pub step: u64,
    pub from_weight: u32,
    pub to_weight: u32,
    #[serde(default)]
    #[serde(serialize_with = "super::round::opt_rate")]
    pub target_weight: Option<f64>,
    /// The reasons as the operator reads them.
    pub reasons: Vec<String>,
}

/// One response: `{"ok":true,"result":...}` or `{"ok":false,"error":"..."}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub result: serde_json::Value,
}

impl Response {
    pub fn ok(result: impl Serialize) -> Self {
        match serde_json::to_value(result) {
            Ok(result) => Response {
                ok: true,
                error: None,
                result,
            },
            Err(e) => Response::error(format!("internal error encoding the result: {e}")),
        }
    }

    pub fn error(msg: impl Into<String>) -> Self {
        Response {
            ok: false,
            error: Some(msg.into()),
            result: serde_json::Value::Null,
        }
    }
}

/// Result of a request that changed (or would have changed) the configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Changed {
    /// What was done, for people.
    pub message: String,
    /// False when the request asked for the state that already was (nothing written).
    pub changed: bool,
    /// Every Maglev table that was rebuilt.
    pub tables: Vec<TableChange>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableChange {
    pub vip: String,
    /// Slots that now point at a different backend.
    pub slots_moved: usize,
    pub generation: u32,
}

/// `vip list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VipEntry {
    /// `ADDRESS:PORT/PROTOCOL`.
    pub vip: String,
    pub address: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub forwarding: Forwarding,
    pub table_size: u32,
    /// Table generation lbd applied (bumped on every table change).
    pub generation: u32,
    /// Generation the datapath's VIP map holds; equal to `generation` unless something is wrong.
    pub datapath_generation: Option<u32>,
    pub backends: usize,
    pub drained: usize,
}

/// `backend list`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackendEntry {
    pub vip: String,
    pub address: IpAddr,
    /// Configured weight (kept while drained).
    pub weight: u32,
    pub drained: bool,
    /// The weight in force, in the configured weight's units: 0 while drained or down, a
    /// quarter on probation, the learned weight (fractional, e.g. 0.73) with `[vip.learning]`.
    #[serde(serialize_with = "super::round::weight")]
    pub effective_weight: f64,
    /// The weight the Maglev table is built with, in the table's own units (with learning:
    /// configured x 100, scaled down to at most 10000 per VIP); only ratios within a VIP mean
    /// something.
    #[serde(default)]
    pub table_weight: u32,
    /// Slots this backend owns in the VIP's current table.
    pub slots: u32,
    /// Health: false only while health checks say the backend is down (always true for a VIP
    /// without `[vip.health]`).
    pub up: bool,
    /// `up`, `down`, `probation` (back from down, ramping its weight), `pending` (not probed
    /// yet: no new flows) or `draining` (drained by the operator, whatever the probes say).
    #[serde(default)]
    pub health: String,
    /// Latency of the last probe in milliseconds (the timeout for a failed one); absent without
    /// health checks or before the first probe.
    #[serde(default)]
    #[serde(serialize_with = "super::round::opt_ms")]
    pub last_probe_ms: Option<f64>,
    /// Why the last probe failed; absent when it passed.
    #[serde(default)]
    pub last_error: Option<String>,
    /// How health lets the backend back in (`ejections`, `returns_in_ms`, `ramp`).
    #[serde(flatten)]
    pub readmission: Readmission,
    /// Carried by the model while slow, at the share it can serve (docs/model.md, "Carrying a
    /// slow backend"); false without learning.
    #[serde(default)]
    pub carried: bool,
    /// Backend id in the datapath (index of its statistics).
    pub id: u32,
    /// Tracked connections (`conns_active`, `conns_idle`, `conns_closing`).
    #[serde(flatten)]
    pub conns: ConnCounts,
}

/// How health lets a backend back in after an ejection, as `backend list`, `stats` and
/// `model show` show it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Readmission {
    /// Health-checked backends: ejections that still count (forgotten after
    /// `health.ejection_forget_ms` without one); null without health checks.
    #[serde(default)]
    pub ejections: Option<u32>,
    /// A down backend held out after an ejection: milliseconds until it may return (its probes
    /// must pass then too); null when not held.
    #[serde(default)]
    #[serde(serialize_with = "super::round::opt_ms")]
    pub returns_in_ms: Option<f64>,
    /// On a slow start: the share of its weight it has ramped to (0 to 1); null when not
    /// ramping.
    #[serde(default)]
    #[serde(serialize_with = "super::round::opt_ratio")]
    pub ramp: Option<f64>,
}

/// A backend's tracked connections by what their entries say (see the README's "Connections"):
/// active (the client sent within the idle window and has not closed), idle (silent for
/// longer), closing (the client sent a FIN or RST).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnCounts {
    #[serde(default)]
    pub conns_active: u64,
    #[serde(default)]
    pub conns_idle: u64,
    #[serde(default)]
    pub conns_closing: u64,
}

/// Entries and capacity of the connection tables, from the last count.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct TableFill {
    /// Established flows: `CT4`'s (IPv4) and `CT`'s (IPv6) entries.
    pub ct_entries: u64,
    /// Capacity of `CT4` and of `CT`, each (`conntrack_size`).
    pub ct_capacity: u32,
    /// Of `ct_entries`, those in `CT4`.
    #[serde(default)]
    pub ct4_entries: u64,
    pub ct_new_entries: u64,
    pub ct_new_capacity: u32,
    /// How long the count took (both tables), in milliseconds.
    #[serde(serialize_with = "super::round::ms")]
    pub scan_ms: f64,
    /// The share of SYNs on tuples `CT` does not hold that still look them up there (0 to 1):
    /// the tracked-flow filter's collisions, rebuilt with every count.
    #[serde(default)]
    pub syn_filter_probe: f64,
}

impl TableFill {
    /// Each table's name, entries, capacity and fill (0 to 1): `CT4`, `CT`, `CT_NEW`.
    pub fn tables(&self) -> [(&'static str, u64, u32, f64); 3] {
        let (v4, v6) = self.established();
        let fill = |n: u64, capacity: u32| n as f64 / f64::from(capacity.max(1));
        [
            ("CT4", v4, self.ct_capacity, fill(v4, self.ct_capacity)),
            ("CT", v6, self.ct_capacity, fill(v6, self.ct_capacity)),
            (
                "CT_NEW",
                self.ct_new_entries,
                self.ct_new_capacity,
                fill(self.ct_new_entries, self.ct_new_capacity),
            ),
        ]
    }

    /// Entries of `CT4` (IPv4) and `CT` (IPv6).
    pub fn established(&self) -> (u64, u64) {
        (
            self.ct4_entries,
            self.ct_entries.saturating_sub(self.ct4_entries),
        )
    }
}

/// `conn list`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConnList {
    pub connections: Vec<ConnEntry>,
    /// Connections that matched, listed or not (`--limit`).
    pub matched: u64,
}

/// One tracked connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConnEntry {
    /// The client's address and port.
    pub client: std::net::SocketAddr,
    pub vip: String,
    pub backend: IpAddr,
    /// `new`, `established` or `closing`.
    pub state: String,
    /// Counted in `conns_active` (not closing, seen within the idle window).
    pub active: bool,
    /// Since its last packet, in seconds.
    #[serde(serialize_with = "super::round::ms")]
    pub last_seen_seconds: f64,
}

/// `--dry-run` and `lbd --check --diff`: what a change would do to the Maglev tables.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DryRun {
    /// What the change would do, as its real run would say it.
    pub message: String,
    /// Whether the configuration would change at all.
    pub changed: bool,
    /// Every VIP whose table would change (or that would come or go).
    pub vips: Vec<VipDiff>,
}

/// The message, then per VIP the slots that would move and each backend's gain or loss.
impl std::fmt::Display for DryRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "{}", self.message)?;
        if self.changed && self.vips.is_empty() {
            writeln!(f, "  no table would change")?;
        }
        for v in &self.vips {
            writeln!(
                f,
                "  {} ({}): {} of {} slots would move ({:.2}% of new flows)",
                v.vip,
                v.change,
                v.slots_moved,
                v.table_size,
                v.share_moved * 100.0
            )?;
            for b in &v.backends {
                writeln!(
                    f,
                    "    {:<28} {:>8} -> {:>8} slots ({:+})",
                    b.address.to_string(),
                    b.slots_before,
                    b.slots_after,
                    b.slots_gained
                )?;
            }
        }
        Ok(())
    }
}

/// One VIP's table before and after a change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VipDiff {
    pub vip: String,
    /// `changed`, `added` or `removed`.
    pub change: String,
    pub table_size: u32,
    /// Slots whose backend would change.
    pub slots_moved: u64,
    /// `slots_moved` / table size: the share of new flows that would go to another backend
    /// than now (tracked connections keep theirs unless it is removed or down).
    #[serde(serialize_with = "super::round::rate")]
    pub share_moved: f64,
    pub backends: Vec<BackendSlots>,
}

/// A backend's slots before and after a change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackendSlots {
    pub address: IpAddr,
    pub slots_before: u64,
    pub slots_after: u64,
    /// After minus before: slots gained (negative: lost).
    pub slots_gained: i64,
}

/// `lookup`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Lookup {
    pub vip: String,
    pub client: String,
    /// With a port: the backend the table gives a new flow now (null: the slot is empty).
    pub new_flow_backend: Option<IpAddr>,
    /// With a port: the Maglev slot the flow hashes to.
    pub slot: Option<u32>,
    /// Without a port: each backend's share of the client's 65535 source ports.
    #[serde(default)]
    pub shares_by_port: BTreeMap<IpAddr, f64>,
    /// Tracked flows from the client (with a port: that one flow, if tracked).
    pub tracked: Vec<ConnEntry>,
}

/// `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub pid: u32,
    pub interface: String,
    /// `native`, `generic`, `offload` or `default`.
    pub xdp_mode: String,
    pub program_id: u32,
    /// What is missing from the datapath now, checked against the kernel and bpffs: empty
    /// while it is whole; otherwise each fault, starting with `detached:`, `replaced:` or
    /// `unpinned:`.
    #[serde(default)]
    pub datapath_faults: Vec<String>,
    pub uptime_seconds: u64,
    pub config_file: String,
    pub control_socket: String,
    pub metrics_listen: String,
    pub vips: Vec<VipStatus>,
    /// What happened to lbd recently, oldest first (at most [`crate::control::events::KEPT`]): how it
    /// started, faults it saw or recovered from, backends going down or up, refused changes.
    #[serde(default)]
    pub events: Vec<crate::control::events::Event>,
    /// How long applying the datapath takes (every change, health transition and learning step
    /// that changed weights goes through it).
    #[serde(default)]
    pub apply: ApplyTiming,
    /// Fleet mode (`lbd --etcd`): the store, this node's role and the revision it applies;
    /// null for a single-node lbd.
    #[serde(default)]
    pub fleet: Option<FleetStatus>,
    /// VIP announcement by BGP; null without `[bgp]`.
    #[serde(default)]
    pub bgp: Option<BgpStatus>,
}

/// What a fleet node (`lbd --etcd URL --prefix P`) knows of the shared store and its role.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetStatus {
    /// This node's name in the fleet (`--node`, default the host name).
    pub node: String,
    pub etcd: String,
    pub prefix: String,
    /// Whether the last read of the store succeeded. While false, the node keeps forwarding
    /// on `applied_revision`.
    pub store_connected: bool,
    /// The store revision of the service configuration in force (the highest mod revision
    /// under `PREFIX/config/`); 0 before the first apply.
    pub applied_revision: i64,
    /// The revision of the leader's published weights in force, 0 if none.
    pub applied_weights_revision: i64,
    /// `leader` or `follower`.
    pub role: String,
    /// The node holding the election key, if known.
    pub leader: Option<String>,
    /// Why the newest configuration in the store is not applied (bad data: the key and the
    /// fix), or why the store is unreachable; null when all is well.
    pub last_error: Option<String>,
    /// Unix seconds of the last successful read of the store.
    pub last_contact_unix: u64,
}

/// `status.bgp`: this node's place in the fleet as its routers see it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BgpStatus {
    /// `serving` (announcing what it can serve), `draining` (routes withdrawn by
    /// `lbctl node drain`, still forwarding what arrives) or `drained` (the drain's timeout has
    /// passed: safe to stop).
    pub node: String,
    /// Seconds left of the drain's timeout while `draining`, else null.
    pub drain_remaining_seconds: Option<u64>,
    /// The node-local BIRD: `running (pid N)`, or what went wrong with it.
    pub speaker: String,
    /// One per `bgp.peers` entry.
    pub sessions: Vec<BgpSession>,
    /// Prefixes announced now (`198.51.100.1/32`, `2001:db8::1/128`).
    pub announced: Vec<String>,
    /// Configured VIPs' prefixes not announced, and why.
    pub withheld: Vec<Withheld>,
    /// Milliseconds since the Unix epoch of the last change of `announced`; null before any.
    pub changed_ms: Option<u64>,
}

/// One BGP session, as BIRD reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BgpSession {
    pub peer: String,
    /// BGP state in lower case: `established`, `active`, `connect`, `opensent`,
    /// `openconfirm`, `idle`, or `unknown` when BIRD cannot be asked.
    pub state: String,
    pub established: bool,
    /// BIRD's own words (e.g. `Socket: Connection refused`).
    pub info: String,
}

/// A prefix this node does not announce.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Withheld {
    pub prefix: String,
    /// `node_draining`, `node_drained`, `datapath_faults` or `no_serving_backend`.
    pub reason: String,
}

/// Result of `node drain` / `node undrain`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeChanged {
    pub message: String,
    /// False when the node already was in the state asked for.
    pub changed: bool,
    /// `serving`, `draining` or `drained`.
    pub node: String,
}

/// Durations of the agent's datapath applies since start, in microseconds (wall clock, on the
/// agent's thread: what a change or a learning step holds the agent for).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyTiming {
    pub applies: u64,
    pub last_us: u64,
    pub max_us: u64,
    /// Backends in the datapath at the last apply.
    pub last_backends: usize,
    /// CPU time of the agent's thread in the last and the costliest apply: the wall-clock
    /// figures also hold whatever time another process had the core.
    #[serde(default)]
    pub last_cpu_us: u64,
    #[serde(default)]
    pub max_cpu_us: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VipStatus {
    pub vip: String,
    pub generation: u32,
    pub table_size: u32,
    pub backends: usize,
    /// Backends with weight in the table (not drained, not down, weight above 0); 0: the VIP's
    /// traffic is dropped.
    #[serde(default)]
    pub serving_backends: usize,
}

/// Statistics at one instant; `stats` and `/metrics` are rendered from this one type, so their
/// values agree. Counters are totals since the program was loaded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatsSnapshot {
    /// Wall clock when taken, milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
    /// Milliseconds since lbd started (monotonic: rates are computed from it).
    pub uptime_ms: u64,
    pub vips: Vec<VipStatsEntry>,
    /// Every datapath counter (`Counter` names in lb-common: `drop_fib`, `pass_not_vip`, ...).
    pub counters: BTreeMap<String, u64>,
    /// Refused model fits since lbd started, by refusal (`too_few_samples`, `poor_fit`, ...).
    #[serde(default)]
    pub model_refusals: BTreeMap<String, u64>,
    /// What is missing from the datapath (as in [`Status`]); empty while it is whole.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub datapath_faults: Vec<String>,
    /// Seconds between the two samples the rates come from (set by `lbctl stats`).
    #[serde(default)]
    #[serde(serialize_with = "super::round::opt_rate")]
    pub interval_seconds: Option<f64>,
    /// The connection tables' fill (null if they could not be read).
    #[serde(default)]
    pub conntrack: Option<TableFill>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VipStatsEntry {
    pub vip: String,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    /// Packets dropped because the VIP had no backend with weight.
    pub no_backend: u64,
    pub generation: u32,
    #[serde(default)]
    pub rates: Option<Rates>,
    pub backends: Vec<BackendStatsEntry>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackendStatsEntry {
    pub address: IpAddr,
    pub weight: u32,
    /// As in [`BackendEntry::effective_weight`]: configured units.
    #[serde(serialize_with = "super::round::weight")]
    pub effective_weight: f64,
    /// As in [`BackendEntry::table_weight`].
    #[serde(default)]
    pub table_weight: u32,
    pub drained: bool,
    pub up: bool,
    /// `up`, `down`, `probation` or `draining` (see `BackendEntry::health`).
    #[serde(default)]
    pub health: String,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    pub syn_retries: u64,
    pub client_rsts: u64,
    pub resteered: u64,
    /// With `[vip.learning]` enabled: the weight the model has set, in configured units (the
    /// configured weight until the model changes it; drains and health not applied).
    #[serde(default)]
    #[serde(serialize_with = "super::round::opt_weight")]
    pub learned_weight: Option<f64>,
    /// With `[vip.learning]` enabled: R² of the backend's accepted fit, if the last step had one.
    #[serde(default)]
    #[serde(serialize_with = "super::round::opt_ratio")]
    pub fit_r2: Option<f64>,
    #[serde(default)]
    pub rates: Option<Rates>,
    /// How health lets the backend back in (`ejections`, `returns_in_ms`, `ramp`).
    #[serde(flatten)]
    pub readmission: Readmission,
    #[serde(flatten)]
    pub conns: ConnCounts,
}

/// Per-second rates between two snapshots.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Rates {
    #[serde(serialize_with = "super::round::rate")]
    pub packets_per_second: f64,
    #[serde(serialize_with = "super::round::rate")]
    pub bytes_per_second: f64,
    #[serde(serialize_with = "super::round::rate")]
    pub new_flows_per_second: f64,
}

impl Rates {
    fn between(dt: f64, (p0, b0, n0): (u64, u64, u64), (p1, b1, n1): (u64, u64, u64)) -> Self {
        let r = |a: u64, b: u64| {
            if dt > 0.0 {
                b.saturating_sub(a) as f64 / dt
            } else {
                0.0
            }
        };
        Rates {
            packets_per_second: r(p0, p1),
            bytes_per_second: r(b0, b1),
            new_flows_per_second: r(n0, n1),
        }
    }
}

impl StatsSnapshot {
    /// Fills in the rates of `self` from an earlier snapshot (entries that are new since have
    /// rates from zero). Counters that went backwards (a backend removed and added again) give 0.
    pub fn with_rates_since(mut self, earlier: &StatsSnapshot) -> Self {
        let dt = self.uptime_ms.saturating_sub(earlier.uptime_ms) as f64 / 1000.0;
        self.interval_seconds = Some(dt);
        for v in &mut self.vips {
            let old = earlier.vips.iter().find(|o| o.vip == v.vip);
            let before = old.map_or((0, 0, 0), |o| (o.packets, o.bytes, o.new_flows));
            v.rates = Some(Rates::between(
                dt,
                before,
                (v.packets, v.bytes, v.new_flows),
            ));
            for b in &mut v.backends {
                let before = old
                    .and_then(|o| o.backends.iter().find(|x| x.address == b.address))
                    .map_or((0, 0, 0), |o| (o.packets, o.bytes, o.new_flows));
                b.rates = Some(Rates::between(
                    dt,
                    before,
                    (b.packets, b.bytes, b.new_flows),
                ));
            }
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The log's words for a request are an lbctl command that parses, with every option.
    #[test]
    fn requests_are_named_as_the_lbctl_command_that_sends_them() {
        use clap::Parser as _;
        let vip = "10.0.0.1:80/tcp".to_string();
        let cases = [
            (
                Request::VipAdd {
                    vip: vip.clone(),
                    forwarding: Some(Forwarding::L2),
                    table_size: Some(251),
                    force: true,
                },
                "lbctl vip add 10.0.0.1:80/tcp --forwarding l2 --table-size 251 --force",
            ),
            (
                Request::BackendAdd {
                    vip: vip.clone(),
                    address: "10.0.0.11".into(),
                    weight: Some(3),
                },
                "lbctl backend add 10.0.0.1:80/tcp 10.0.0.11 --weight 3",
            ),
            (
                Request::BackendSetWeight {
                    vip: vip.clone(),
                    address: "10.0.0.11".into(),
                    weight: 0,
                    force: true,
                },
                "lbctl backend set-weight 10.0.0.1:80/tcp 10.0.0.11 0 --force",
            ),
            (
                Request::BackendDrain {
                    vip: vip.clone(),
                    address: "10.0.0.11".into(),
                    force: false,
                },
                "lbctl backend drain 10.0.0.1:80/tcp 10.0.0.11",
            ),
            (
                Request::BackendUndrain {
                    vip: vip.clone(),
                    address: "10.0.0.11".into(),
                },
                "lbctl backend undrain 10.0.0.1:80/tcp 10.0.0.11",
            ),
            (
                Request::BackendRemove {
                    vip: vip.clone(),
                    address: "10.0.0.11".into(),
                    force: false,
                },
                "lbctl backend remove 10.0.0.1:80/tcp 10.0.0.11",
            ),
            (
                Request::VipRemove { vip },
                "lbctl vip remove 10.0.0.1:80/tcp",
            ),
        ];
        for (req, words) in cases {
            assert_eq!(req.as_lbctl(), words);
            crate::cli::LbctlCli::try_parse_from(words.split(' '))
                .unwrap_or_else(|e| panic!("{words}: {e}"));
        }
    }

    /// Every key of `value` (an object), sorted.
    fn keys(value: &serde_json::Value) -> Vec<&str> {
        value
            .as_object()
            .unwrap_or_else(|| panic!("not an object: {value}"))
            .keys()
            .map(String::as_str)
            .collect()
    }

    fn assert_keys(what: &str, value: &serde_json::Value, listed: &[&str]) {
        let have = keys(value);
        for k in listed {
            assert!(have.contains(k), "{what}: {k:?} missing from {value}");
        }
    }

    /// The shapes the README lists do not depend on state: with nothing known yet (no probe,
    /// no step, no fit, no rates), every listed key is there, null when unknown.
    #[test]
    fn json_shapes_list_every_key_when_nothing_is_known() {
        let backend = BackendEntry {
            vip: "10.0.0.1:80/tcp".into(),
            address: "10.0.0.11".parse().unwrap(),
            weight: 1,
            drained: false,
            effective_weight: 1.0,
            table_weight: 1,
            slots: 0,
            up: true,
            health: "up".into(),
            last_probe_ms: None,
            last_error: None,
            readmission: Readmission::default(),
            carried: false,
            id: 0,
            conns: ConnCounts::default(),
        };
        let v = serde_json::to_value(&backend).unwrap();
        assert_keys(
            "backend list",
            &v,
            &[
                "vip",
                "address",
                "weight",
                "drained",
                "effective_weight",
                "table_weight",
                "slots",
                "up",
                "health",
                "last_probe_ms",
                "last_error",
                "ejections",
                "returns_in_ms",
                "ramp",
                "carried",
                "id",
                "conns_active",
                "conns_idle",
                "conns_closing",
            ],
        );
        assert!(
            v["last_probe_ms"].is_null() && v["last_error"].is_null(),
            "{v}"
        );

        let model = ModelVip {
            vip: "10.0.0.1:80/tcp".into(),
            learning: true,
            interval_ms: 1000,
            latency_target_ms: 10.0,
            step: 0,
            table_size: 65537,
            slots_budget: 0,
            last_slots_moved: 0,
            last_slots_moved_gradual: 0,
            max_slots_moved_gradual: 0,
            max_fit_us: 0,
            fit_p99_us: 0,
            fits: 0,
            max_step_us: 0,
            backends: vec![ModelBackend {
                address: "10.0.0.11".parse().unwrap(),
                id: 0,
                health: "up".into(),
                pinned: false,
                learning: true,
                configured_weight: 1,
                configured_table_weight: 100,
                current_weight: 100,
                target_weight: None,
                drained_by_model: false,
                samples: 0,
                fit: None,
                refusal: None,
                refusal_detail: None,
                capacity_at_target: None,
                predicted_latency_ms: None,
                observed: None,
                readmission: Readmission::default(),
                trial_flows: None,
                failed_trials: 0,
                carry_weight: None,
                decisions: vec![ModelDecisionEntry {
                    step: 1,
                    from_weight: 100,
                    to_weight: 100,
                    target_weight: None,
                    reasons: Vec::new(),
                }],
            }],
        };
        let v = serde_json::to_value(&model).unwrap();
        assert_keys(
            "model show",
            &v,
            &[
                "vip",
                "learning",
                "interval_ms",
                "latency_target_ms",
                "step",
                "table_size",
                "slots_budget",
                "last_slots_moved",
                "last_slots_moved_gradual",
                "max_slots_moved_gradual",
                "backends",
            ],
        );
        let b = &v["backends"][0];
        let unknown = [
            "target_weight",
            "fit",
            "refusal",
            "refusal_detail",
            "capacity_at_target",
            "predicted_latency_ms",
            "observed",
            "ejections",
            "returns_in_ms",
            "ramp",
            "trial_flows",
            "carry_weight",
        ];
        assert_keys(
            "model show backend",
            b,
            &[
                "address",
                "id",
                "health",
                "pinned",
                "learning",
                "configured_weight",
                "configured_table_weight",
                "current_weight",
                "drained_by_model",
                "samples",
                "failed_trials",
                "decisions",
            ],
        );
        assert_keys("model show backend", b, &unknown);
        for k in unknown {
            assert!(b[k].is_null(), "{k} should be null: {b}");
        }
        assert_keys(
            "model show decision",
            &b["decisions"][0],
            &[
                "step",
                "from_weight",
                "to_weight",
                "target_weight",
                "reasons",
            ],
        );

        let stats = StatsSnapshot {
            timestamp_ms: 1,
            uptime_ms: 1,
            vips: vec![VipStatsEntry {
                vip: "10.0.0.1:80/tcp".into(),
                packets: 0,
                bytes: 0,
                new_flows: 0,
                no_backend: 0,
                generation: 1,
                rates: None,
                backends: vec![BackendStatsEntry {
                    address: "10.0.0.11".parse().unwrap(),
                    weight: 1,
                    effective_weight: 1.0,
                    table_weight: 1,
                    drained: false,
                    up: true,
                    health: "up".into(),
                    packets: 0,
                    bytes: 0,
                    new_flows: 0,
                    syn_retries: 0,
                    client_rsts: 0,
                    resteered: 0,
                    learned_weight: None,
                    fit_r2: None,
                    rates: None,
                    readmission: Readmission::default(),
                    conns: ConnCounts::default(),
                }],
            }],
            counters: BTreeMap::new(),
            model_refusals: BTreeMap::new(),
            datapath_faults: Vec::new(),
            interval_seconds: None,
            conntrack: None,
        };
        let v = serde_json::to_value(&stats).unwrap();
        assert_keys(
            "stats",
            &v,
            &[
                "timestamp_ms",
                "uptime_ms",
                "interval_seconds",
                "counters",
                "vips",
                "model_refusals",
                "conntrack",
            ],
        );
        assert!(v["model_refusals"].is_object(), "{v}");
        assert_keys(
            "stats vip",
            &v["vips"][0],
            &[
                "vip",
                "packets",
                "bytes",
                "new_flows",
                "no_backend",
                "generation",
                "rates",
                "backends",
            ],
        );
        assert_keys(
            "stats backend",
            &v["vips"][0]["backends"][0],
            &[
                "address",
                "weight",
                "effective_weight",
                "table_weight",
                "drained",
                "up",
                "health",
                "packets",
                "bytes",
                "new_flows",
                "syn_retries",
                "client_rsts",
                "resteered",
                "learned_weight",
                "fit_r2",
                "rates",
            ],
        );
        // What lbctl reads back is what lbd sent.
        let back: StatsSnapshot = serde_json::from_value(v).unwrap();
        assert_eq!(back, stats);
        let back: ModelVip = serde_json::from_value(serde_json::to_value(&model).unwrap()).unwrap();
        assert_eq!(back, model);
    }

    #[test]
    fn vip_names_parse_and_print() {
        for s in [
            "10.0.0.1:80/tcp",
            "[2001:db8::1]:443/tcp",
            "192.0.2.1:53/udp",
        ] {
            let v: VipName = s.parse().unwrap();
            assert_eq!(v.to_string(), s);
        }
        assert_eq!(
            "10.0.0.1:80/TCP".parse::<VipName>().unwrap().protocol,
            Protocol::Tcp
        );
        let e = |s: &str| s.parse::<VipName>().unwrap_err();
        assert!(e("10.0.0.1:80").contains("the protocol is missing"));
        assert!(e("10.0.0.1/tcp").contains("the port is missing"));
        assert!(
            e("10.0.0.1:80/sctp").contains("protocol \"sctp\" is not supported; use tcp or udp")
        );
        assert!(e("10.0.0.1:0/tcp").contains("port \"0\" is not a number from 1 to 65535"));
        assert!(e("10.0.0.1:65536/tcp").contains("port \"65536\""));
        assert!(e("10.0.0.300:80/tcp").contains("\"10.0.0.300\" is not an IP address"));
        assert!(e("2001:db8::1:80/tcp").contains("IPv6 addresses go in brackets"));
        assert!(e("[10.0.0.1]:80/tcp").contains("brackets are for IPv6 addresses"));
        assert!(e("[2001:db8::1]/tcp").contains("must be followed by :PORT"));
    }

    #[test]
    fn backend_addresses() {
        assert!(parse_backend_address("10.0.0.11").is_ok());
        assert!(parse_backend_address("2001:db8::11").is_ok());
        assert!(parse_backend_address("10.0.0.11:80")
            .unwrap_err()
            .contains("without a port"));
        assert!(parse_backend_address("backend1")
            .unwrap_err()
            .contains("not an IP address"));
    }

    #[test]
    fn requests_round_trip_as_tagged_json() {
        let r = Request::BackendSetWeight {
            vip: "10.0.0.1:80/tcp".into(),
            address: "10.0.0.11".into(),
            weight: 3,
            force: false,
        };
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(
            text,
            r#"{"command":"backend_set_weight","vip":"10.0.0.1:80/tcp","address":"10.0.0.11","weight":3}"#
        );
        assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), r);
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"command":"vip_list"}"#).unwrap(),
            Request::VipList
        );
        let typo = r#"{"command":"vip_remove","vip":"10.0.0.1:80/tcp","adress":"10.0.0.11"}"#;
        assert!(serde_json::from_str::<Request>(typo).is_err());
    }

    #[test]
    fn rates_come_from_two_snapshots() {
        let snap = |ms, packets| StatsSnapshot {
            datapath_faults: Vec::new(),
            timestamp_ms: 0,
            uptime_ms: ms,
            counters: BTreeMap::new(),
            model_refusals: BTreeMap::new(),
            interval_seconds: None,
            conntrack: None,
            vips: vec![VipStatsEntry {
                vip: "10.0.0.1:80/tcp".into(),
                packets,
                bytes: packets * 100,
                new_flows: packets / 10,
                no_backend: 0,
                generation: 1,
                rates: None,
                backends: vec![],
            }],
        };
        let r = snap(3000, 500).with_rates_since(&snap(1000, 100));
        assert_eq!(r.interval_seconds, Some(2.0));
        let rates = r.vips[0].rates.unwrap();
        assert_eq!(rates.packets_per_second, 200.0);
        assert_eq!(rates.bytes_per_second, 20000.0);
        assert_eq!(rates.new_flows_per_second, 20.0);
    }
}
