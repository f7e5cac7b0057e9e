//! The agent's TOML configuration and its validation. Every error names the field and the fix;
//! nothing is applied until the whole file is valid.
pub use crate::health::ProbeKind;
use crate::health::{Admission, HealthConfig};
use lb_common::{
    is_prime, DEFAULT_CT_NEW_SIZE, DEFAULT_CT_SIZE, DEFAULT_RING_POOL, DEFAULT_TABLE_SIZE,
    MAX_BACKENDS, MAX_TABLE_SIZE, MAX_VIPS, MIN_TABLE_SIZE,
};
use serde::{Deserialize, Serialize};
use std::{
    collections::HashSet,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

/// Where `lbd` serves its control API (`lbctl`) unless `control_socket` says otherwise.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/lb/lbd.sock";
/// Where `lbd` serves Prometheus metrics unless `metrics_listen` says otherwise.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9469";

/// Largest backend weight. Weights are relative; 0 keeps a backend configured but gives it no
/// new flows.
pub const MAX_WEIGHT: u32 = 10_000;

/// A configuration problem, phrased for the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

fn err<T>(msg: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError(msg.into()))
}

/// `xdp_mode`. Also a `clap` value (xtask's `--xdp-mode`), spelled as in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    /// Driver mode, falling back to generic mode if the driver has no XDP support.
    #[default]
    Auto,
    /// Driver (native) mode only.
    Native,
    /// Generic (skb) mode: works everywhere, slower.
    Generic,
}

impl XdpMode {
    /// The value of `xdp_mode` in the file.
    pub fn config_value(self) -> &'static str {
        match self {
            XdpMode::Auto => "auto",
            XdpMode::Native => "native",
            XdpMode::Generic => "generic",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => lb_common::PROTO_TCP,
            Protocol::Udp => lb_common::PROTO_UDP,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

/// A VIP's `forwarding`. Also a `clap` value (xtask's `--mode`), spelled as in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Forwarding {
    /// IPv4-in-IPv4 / IPv6-in-IPv6 to the backend, which decapsulates and answers directly.
    #[default]
    Ipip,
    /// Direct server return by MAC rewrite: the backend is on the same segment and has the
    /// VIP on a loopback interface.
    L2,
}

impl Forwarding {
    pub fn mode(self) -> u32 {
        match self {
            Forwarding::Ipip => lb_common::MODE_IPIP,
            Forwarding::L2 => lb_common::MODE_L2,
        }
    }

    /// The value of `forwarding` in the file.
    pub fn config_value(self) -> &'static str {
        match self {
            Forwarding::Ipip => "ipip",
            Forwarding::L2 => "l2",
        }
    }
}

/// This host's addresses, for [`Config::host_problems`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostAddrs {
    /// The addresses of the balancer's interface.
    pub interface: Vec<IpAddr>,
    /// The addresses of every interface in lbd's network namespace.
    pub all: Vec<IpAddr>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Encap {
    /// Outer source address of IPv4-in-IPv4 packets (an address of this host).
    pub source_v4: Option<Ipv4Addr>,
    /// Outer source address of IPv6-in-IPv6 packets (an address of this host).
    pub source_v6: Option<Ipv6Addr>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Backend {
    pub address: IpAddr,
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// A drained backend keeps its weight but gets no new flows (effective weight 0); flows it
    /// already has continue, since the connection tables keep them.
    #[serde(default, skip_serializing_if = "is_false")]
    pub drained: bool,
    /// With `[vip.learning]`: the weight stays the configured one, whatever the model says.
    #[serde(default, skip_serializing_if = "is_false")]
    pub pinned: bool,
}

impl Backend {
    /// The weight the Maglev table is built with: 0 while drained.
    pub fn effective_weight(&self) -> u32 {
        if self.drained {
            0
        } else {
            self.weight
        }
    }
}

fn default_weight() -> u32 {
    1
}

fn is_false(b: &bool) -> bool {
    !*b
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Vip {
    pub address: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    #[serde(default)]
    pub forwarding: Forwarding,
    /// Maglev table size: prime, at least 7, at most 1048573; 65537 by default.
    #[serde(default = "default_table_size")]
    pub table_size: u32,
    /// Active health checks of this VIP's backends (`[vip.health]`); none: every backend
    /// counts as up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<Health>,
    /// Learned weights (`[vip.learning]`); none: configured weights.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub learning: Option<Learning>,
    #[serde(default, rename = "backend")]
    pub backends: Vec<Backend>,
    /// The VIP may be an address of the balancer's own interface: its port is then taken over
    /// from the host's own service (refused otherwise; `lbctl vip add --force` sets it).
    #[serde(default, skip_serializing_if = "is_false")]
    pub allow_host_address: bool,
}

fn default_table_size() -> u32 {
    DEFAULT_TABLE_SIZE
}

/// `[vip.health]`: how `lbd` probes each backend of the VIP (see `crate::health`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Health {
    /// `tcp` (a connection is established) or `http` (`GET path` answers `expected_status`).
    #[serde(default = "default_health_kind")]
    pub kind: ProbeKind,
    /// Time between two probes of one backend.
    #[serde(default = "default_health_interval_ms")]
    pub interval_ms: u64,
    /// A probe that has not succeeded by then fails.
    #[serde(default = "default_health_timeout_ms")]
    pub timeout_ms: u64,
    /// Consecutive passes that bring a down backend back (probation, then up after as many).
    #[serde(default = "default_health_rise")]
    pub rise: u32,
    /// Consecutive failures that take a backend down.
    #[serde(default = "default_health_fall")]
    pub fall: u32,
    /// Port probed on each backend's address; the VIP's port when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// HTTP only: the path requested.
    #[serde(default = "default_health_path")]
    pub path: String,
    /// HTTP only: the status that counts as a pass.
    #[serde(default = "default_health_status")]
    pub expected_status: u16,
    /// Time a returning or new backend's share ramps from nothing to full (0: a quarter of its
    /// weight for `rise` passes, as before).
    #[serde(
        default = "default_slow_start_ms",
        skip_serializing_if = "is_default_slow_start_ms"
    )]
    pub slow_start_ms: u64,
    /// Hold after an ejection, times the recent ejections.
    #[serde(
        default = "default_ejection_base_ms",
        skip_serializing_if = "is_default_ejection_base_ms"
    )]
    pub ejection_base_ms: u64,
    /// Longest hold after an ejection.
    #[serde(
        default = "default_ejection_max_ms",
        skip_serializing_if = "is_default_ejection_max_ms"
    )]
    pub ejection_max_ms: u64,
    /// Ejections further apart than this are forgotten.
    #[serde(
        default = "default_ejection_forget_ms",
        skip_serializing_if = "is_default_ejection_forget_ms"
    )]
    pub ejection_forget_ms: u64,
}

/// Shortest probe interval accepted.
pub const MIN_HEALTH_INTERVAL_MS: u64 = 100;
/// Shortest probe timeout accepted.
pub const MIN_HEALTH_TIMEOUT_MS: u64 = 10;
/// Largest interval or timeout accepted (one hour).
pub const MAX_HEALTH_MS: u64 = 3_600_000;
/// Largest rise or fall accepted.
pub const MAX_HEALTH_COUNT: u32 = 100;

// The defaults are the prober's (`HealthConfig::default`), so that they are written once.
fn default_health_kind() -> ProbeKind {
    HealthConfig::default().kind
}
fn default_health_interval_ms() -> u64 {
    HealthConfig::default().interval.as_millis() as u64
}
fn default_health_timeout_ms() -> u64 {
    HealthConfig::default().timeout.as_millis() as u64
}
fn default_health_rise() -> u32 {
    HealthConfig::default().rise
}
fn default_health_fall() -> u32 {
    HealthConfig::default().fall
}
fn default_health_path() -> String {
    HealthConfig::default().path
}
fn default_health_status() -> u16 {
    HealthConfig::default().expected_status
}
fn is_default_slow_start_ms(v: &u64) -> bool {
    *v == default_slow_start_ms()
}
fn default_slow_start_ms() -> u64 {
    Admission::default().slow_start.as_millis() as u64
}
fn is_default_ejection_base_ms(v: &u64) -> bool {
    *v == default_ejection_base_ms()
}
fn default_ejection_base_ms() -> u64 {
    Admission::default().ejection_base.as_millis() as u64
}
fn is_default_ejection_max_ms(v: &u64) -> bool {
    *v == default_ejection_max_ms()
}
fn default_ejection_max_ms() -> u64 {
    Admission::default().ejection_max.as_millis() as u64
}
fn is_default_ejection_forget_ms(v: &u64) -> bool {
    *v == default_ejection_forget_ms()
}
fn default_ejection_forget_ms() -> u64 {
    Admission::default().ejection_forget.as_millis() as u64
}

impl Default for Health {
    fn default() -> Self {
        Health {
            kind: default_health_kind(),
            interval_ms: default_health_interval_ms(),
            timeout_ms: default_health_timeout_ms(),
            rise: default_health_rise(),
            fall: default_health_fall(),
            port: None,
            path: default_health_path(),
            expected_status: default_health_status(),
            slow_start_ms: default_slow_start_ms(),
            ejection_base_ms: default_ejection_base_ms(),
            ejection_max_ms: default_ejection_max_ms(),
            ejection_forget_ms: default_ejection_forget_ms(),
        }
    }
}

impl Health {
    /// The prober's settings for a VIP listening on `vip_port`.
    pub fn to_config(&self, vip_port: u16) -> HealthConfig {
        HealthConfig {
            kind: self.kind,
            interval: Duration::from_millis(self.interval_ms),
            timeout: Duration::from_millis(self.timeout_ms),
            rise: self.rise,
            fall: self.fall,
            port: self.port.unwrap_or(vip_port),
            path: self.path.clone(),
            expected_status: self.expected_status,
            admission: Admission {
                slow_start: Duration::from_millis(self.slow_start_ms),
                ejection_base: Duration::from_millis(self.ejection_base_ms),
                ejection_max: Duration::from_millis(self.ejection_max_ms),
                ejection_forget: Duration::from_millis(self.ejection_forget_ms),
            },
        }
    }

    /// The first problem with these settings, as `health.FIELD ...` (the caller names the VIP).
    fn check(&self) -> Result<(), String> {
        if self.interval_ms < MIN_HEALTH_INTERVAL_MS || self.interval_ms > MAX_HEALTH_MS {
            return Err(format!(
                "health.interval_ms must be at least {MIN_HEALTH_INTERVAL_MS} and at most {MAX_HEALTH_MS} (got {})",
                self.interval_ms
            ));
        }
        if self.timeout_ms < MIN_HEALTH_TIMEOUT_MS {
            return Err(format!(
                "health.timeout_ms must be at least {MIN_HEALTH_TIMEOUT_MS} (got {})",
                self.timeout_ms
            ));
        }
        if self.timeout_ms > self.interval_ms {
            return Err(format!(
                "health.timeout_ms ({}) must not exceed health.interval_ms ({}), so that probes of one backend never overlap",
                self.timeout_ms, self.interval_ms
            ));
        }
        if !(1..=MAX_HEALTH_COUNT).contains(&self.rise) {
            return Err(format!(
                "health.rise must be between 1 and {MAX_HEALTH_COUNT} (got {})",
                self.rise
            ));
        }
        if !(1..=MAX_HEALTH_COUNT).contains(&self.fall) {
            return Err(format!(
                "health.fall must be between 1 and {MAX_HEALTH_COUNT} (got {})",
                self.fall
            ));
        }
        for (key, ms) in [
            ("slow_start_ms", self.slow_start_ms),
            ("ejection_base_ms", self.ejection_base_ms),
            ("ejection_max_ms", self.ejection_max_ms),
            ("ejection_forget_ms", self.ejection_forget_ms),
        ] {
            if ms > MAX_HEALTH_MS {
                return Err(format!(
                    "health.{key} must be at most {MAX_HEALTH_MS} (one hour; got {ms})"
                ));
            }
        }
        if self.ejection_max_ms < self.ejection_base_ms {
            return Err(format!(
                "health.ejection_max_ms ({}) must be at least health.ejection_base_ms ({}): it caps the growing hold",
                self.ejection_max_ms, self.ejection_base_ms
            ));
        }
        if self.port == Some(0) {
            return Err(
                "health.port must be between 1 and 65535 (or left out: the VIP's port)".into(),
            );
        }
        if self.kind == ProbeKind::Http {
            if !self.path.starts_with('/') || self.path.bytes().any(|b| b <= b' ' || b == 0x7f) {
                return Err(format!(
                    "health.path {:?} must start with '/' and contain no spaces or control characters",
                    self.path
                ));
            }
            if !(100..=599).contains(&self.expected_status) {
                return Err(format!(
                    "health.expected_status {} is not an HTTP status (100 to 599)",
                    self.expected_status
                ));
            }
        }
        Ok(())
    }
}

/// `[vip.learning]`: how `lbd` learns this VIP's backend weights from probe latency and load
/// (see `crate::learning` and docs/model.md). Runtime state only: learned weights are never
/// written to the file. Needs `[vip.health]` (the latency samples come from the probes).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Learning {
    /// Off by default: the table stays at the configured weights.
    #[serde(default)]
    pub enabled: bool,
    /// Latency a backend should stay under; capacities are the loads at this latency.
    #[serde(default = "default_latency_target_ms")]
    pub latency_target_ms: f64,
    /// Lowest learned weight, as a share of the configured weight (0 < floor <= 1).
    #[serde(default = "default_floor")]
    pub floor: f64,
    /// Highest learned weight, as a multiple of the configured weight (at least 1).
    #[serde(default = "default_ceiling")]
    pub ceiling: f64,
    /// Largest change of one weight in one step, as a share of its current weight (0 to 1,
    /// exclusive).
    #[serde(default = "default_max_step")]
    pub max_step: f64,
    /// Learned targets within this share of the current weight are ignored (0 to 1).
    #[serde(default = "default_deadband")]
    pub deadband: f64,
    /// Largest share of the table's slots one step's gradual changes may move (0 to 1).
    #[serde(default = "default_disruption_budget")]
    pub disruption_budget: f64,
    /// Largest share of the backends the model may drain (with down and drained ones; 0 to 1).
    #[serde(default = "default_max_drained_share")]
    pub max_drained_share: f64,
    /// Step period: one sample per backend and one decision per step.
    #[serde(default = "default_learning_interval_ms")]
    pub interval_ms: u64,
    /// Carry a backend that misses the latency target even unloaded at the share it can serve,
    /// instead of draining it, while without it the pool's load is above this share of its
    /// peers' capacity at the target (above 0, at most 1; 0.65 in the e2e lab). Unset: such a
    /// backend is drained (docs/model.md, "Carrying a slow backend").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub carry_knee: Option<f64>,
}

fn default_latency_target_ms() -> f64 {
    100.0
}
fn default_floor() -> f64 {
    0.25
}
fn default_ceiling() -> f64 {
    4.0
}
fn default_max_step() -> f64 {
    0.25
}
fn default_deadband() -> f64 {
    0.05
}
fn default_disruption_budget() -> f64 {
    0.05
}
fn default_max_drained_share() -> f64 {
    0.34
}
fn default_learning_interval_ms() -> u64 {
    1000
}

/// Shortest learning step accepted.
pub const MIN_LEARNING_INTERVAL_MS: u64 = 100;

impl Default for Learning {
    fn default() -> Self {
        Learning {
            enabled: false,
            latency_target_ms: default_latency_target_ms(),
            floor: default_floor(),
            ceiling: default_ceiling(),
            max_step: default_max_step(),
            deadband: default_deadband(),
            disruption_budget: default_disruption_budget(),
            max_drained_share: default_max_drained_share(),
            interval_ms: default_learning_interval_ms(),
            carry_knee: None,
        }
    }
}

impl Learning {
    /// The first problem with these settings, as `learning.FIELD ...`.
    fn check(&self, has_health: bool) -> Result<(), String> {
        let t = self.latency_target_ms;
        if !(t.is_finite() && t > 0.0 && t <= MAX_HEALTH_MS as f64) {
            return Err(format!(
                "learning.latency_target_ms must be above 0 and at most {MAX_HEALTH_MS} (got {t})"
            ));
        }
        if !(self.floor > 0.0 && self.floor <= 1.0) {
            return Err(format!(
                "learning.floor must be above 0 and at most 1 (a share of the configured weight; got {})",
                self.floor
            ));
        }
        if !(self.ceiling.is_finite() && self.ceiling >= 1.0 && self.ceiling <= 100.0) {
            return Err(format!(
                "learning.ceiling must be from 1 to 100 (a multiple of the configured weight; got {})",
                self.ceiling
            ));
        }
        if !(self.max_step > 0.0 && self.max_step < 1.0) {
            return Err(format!(
                "learning.max_step must be above 0 and below 1 (got {})",
                self.max_step
            ));
        }
        for (name, v) in [
            ("deadband", self.deadband),
            ("disruption_budget", self.disruption_budget),
            ("max_drained_share", self.max_drained_share),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(format!("learning.{name} must be from 0 to 1 (got {v})"));
            }
        }
        if let Some(k) = self.carry_knee.filter(|k| !(*k > 0.0 && *k <= 1.0)) {
            return Err(format!(
                "learning.carry_knee must be above 0 and at most 1 (a share of the peers' capacity; got {k}), or left out to drain slow backends"
            ));
        }
        if self.interval_ms < MIN_LEARNING_INTERVAL_MS || self.interval_ms > MAX_HEALTH_MS {
            return Err(format!(
                "learning.interval_ms must be at least {MIN_LEARNING_INTERVAL_MS} and at most {MAX_HEALTH_MS} (got {})",
                self.interval_ms
            ));
        }
        if self.enabled && !has_health {
            return Err("learning.enabled needs [vip.health]: the model's latency samples come from the health probes; add a [vip.health] table (an HTTP probe measures the application best) or set learning.enabled = false".into());
        }
        Ok(())
    }
}

impl Vip {
    /// Whether `lbd` learns this VIP's weights.
    pub fn learning_enabled(&self) -> bool {
        self.learning.as_ref().is_some_and(|l| l.enabled)
    }

    /// How operators name a VIP: `address:port/protocol`.
    pub fn name(&self) -> String {
        match self.address {
            IpAddr::V4(a) => format!("{a}:{}/{}", self.port, self.protocol),
            IpAddr::V6(a) => format!("[{a}]:{}/{}", self.port, self.protocol),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The network interface the balancer attaches to.
    pub interface: String,
    #[serde(default)]
    pub xdp_mode: XdpMode,
    #[serde(default)]
    pub encap: Encap,
    /// Capacity of the established-flow table.
    #[serde(default = "default_ct_size")]
    pub conntrack_size: u32,
    /// Capacity of the table of flows seen once.
    #[serde(default = "default_ct_new_size")]
    pub conntrack_new_size: u32,
    /// A tracked TCP connection whose client sent nothing for this long is idle, not active
    /// (`lbctl backend list`, `lbctl backend drain --wait`).
    #[serde(
        default = "default_conn_idle_tcp",
        skip_serializing_if = "is_default_conn_idle_tcp"
    )]
    pub conn_idle_tcp_seconds: u32,
    /// The same for UDP flows.
    #[serde(
        default = "default_conn_idle_udp",
        skip_serializing_if = "is_default_conn_idle_udp"
    )]
    pub conn_idle_udp_seconds: u32,
    /// Slots in the pool that holds every VIP's Maglev table (two per VIP during an update).
    #[serde(default = "default_table_pool")]
    pub table_pool: u32,
    /// bpffs directory where maps and the XDP link are pinned, so that stopping, restarting or
    /// upgrading lbd neither detaches the program nor loses a flow. Empty: no pinning (the
    /// program is detached when lbd stops).
    #[serde(default = "default_pin_dir")]
    pub pin_dir: String,
    /// Unix socket of the control API (`lbctl`). Mode 0600 (root only) unless `control_group`
    /// is set.
    #[serde(default = "default_control_socket")]
    pub control_socket: PathBuf,
    /// A group whose members may use the control socket too (mode 0660, that group).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_group: Option<String>,
    /// Address of the Prometheus metrics endpoint (`GET /metrics`).
    #[serde(default = "default_metrics_listen")]
    pub metrics_listen: SocketAddr,
    /// Announce the VIPs to upstream routers by BGP (a fleet behind ECMP); see [`Bgp`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bgp: Option<Bgp>,
    #[serde(default, rename = "vip")]
    pub vips: Vec<Vip>,
}

/// `[bgp]`: this node announces each VIP it can serve (/32, /128) to its peers, through a
/// node-local BIRD that lbd runs as its child (see `fleet::bgp` and docs/cluster.md). Node-local
/// settings: they only change on restart.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Bgp {
    /// This node's AS number.
    pub local_as: u32,
    /// The peers' AS number (eBGP when it differs from `local_as`).
    pub peer_as: u32,
    /// Peer addresses, each on a directly connected network: one session each. An IPv4 peer
    /// carries the IPv4 VIPs, an IPv6 peer the IPv6 VIPs.
    pub peers: Vec<IpAddr>,
    /// BGP router id (an IPv4 address of this node, unique among the peers' neighbours).
    pub router_id: Ipv4Addr,
    /// Hold time offered, in seconds (3 to 65535); the session is declared down after this
    /// long without a word from the peer. Keepalives go every third of it.
    #[serde(default = "default_hold_time")]
    pub hold_time: u16,
    /// The BIRD 2 daemon lbd runs (a path, or a name looked up in PATH).
    #[serde(default = "default_bird")]
    pub bird: PathBuf,
    /// How long `lbctl node drain` keeps a node in `draining` (its routes withdrawn, still
    /// forwarding what arrives) before it reports `drained`, in seconds, unless the command
    /// gives `--timeout`.
    #[serde(default = "default_drain_timeout")]
    pub drain_timeout_seconds: u64,
}

/// Longest drain accepted (a day).
pub const MAX_DRAIN_SECONDS: u64 = 86_400;

fn default_hold_time() -> u16 {
    3
}
fn default_bird() -> PathBuf {
    PathBuf::from("bird")
}
fn default_drain_timeout() -> u64 {
    30
}

impl Bgp {
    /// `[bgp]`'s own keys, and that each VIP's family has a peer to be announced to.
    fn check(&self, vips: &[Vip]) -> Result<(), ConfigError> {
        if self.local_as == 0 || self.peer_as == 0 {
            return err("bgp: local_as and peer_as must be AS numbers from 1 to 4294967295 (private: 64512 to 65534, 4200000000 to 4294967294)");
        }
        if self.peers.is_empty() {
            return err("bgp.peers: empty; list the upstream router's addresses, e.g. peers = [\"192.0.2.1\", \"2001:db8::1\"]");
        }
        let mut seen = HashSet::new();
        for (i, p) in self.peers.iter().enumerate() {
            if p.is_unspecified() || p.is_multicast() || p.is_loopback() {
                return err(format!("bgp.peers[{i}]: {p} is not a router's unicast address; use the upstream router's address on this node's network"));
            }
            if !seen.insert(*p) {
                return err(format!(
                    "bgp.peers[{i}]: {p} is listed twice; list each peer once"
                ));
            }
        }
        if self.router_id.is_unspecified() || self.router_id.is_broadcast() {
            return err(format!(
                "bgp.router_id: {} is not usable; use an IPv4 address of this node",
                self.router_id
            ));
        }
        if self.hold_time < 3 {
            return err(format!("bgp.hold_time: {} is below 3 seconds (the BGP minimum; 0, no hold timer, is not allowed: a dead peer would never be noticed); use 3 to 65535", self.hold_time));
        }
        if self.bird.as_os_str().is_empty() {
            return err(
                "bgp.bird: empty; name the BIRD 2 daemon, e.g. \"bird\" or \"/usr/sbin/bird\"",
            );
        }
        if !(1..=MAX_DRAIN_SECONDS).contains(&self.drain_timeout_seconds) {
            return err(format!(
                "bgp.drain_timeout_seconds: {} is out of range; use 1 to {MAX_DRAIN_SECONDS}",
                self.drain_timeout_seconds
            ));
        }
        for (i, v) in vips.iter().enumerate() {
            if !self
                .peers
                .iter()
                .any(|p| p.is_ipv4() == v.address.is_ipv4())
            {
                let family = if v.address.is_ipv4() { "IPv4" } else { "IPv6" };
                return err(format!(
                    "vip[{i}] ({}): bgp has no {family} peer, so this VIP would never be announced; add the router's {family} address to bgp.peers",
                    v.name()
                ));
            }
        }
        Ok(())
    }
}

/// Where maps and the link are pinned by default.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/lb";

fn default_pin_dir() -> String {
    DEFAULT_PIN_DIR.to_string()
}

fn default_ct_size() -> u32 {
    DEFAULT_CT_SIZE
}
fn default_ct_new_size() -> u32 {
    DEFAULT_CT_NEW_SIZE
}
/// Default TCP idle window: ipvs keeps an established connection 15 minutes; 5 minutes of
/// silence from a client (no data, no keepalive) is already a connection nobody uses.
pub const DEFAULT_CONN_IDLE_TCP: u32 = 300;
/// Default UDP idle window (the kernel's conntrack keeps a UDP stream 120 s, a single exchange 30 s).
pub const DEFAULT_CONN_IDLE_UDP: u32 = 30;
/// Longest idle window: a day.
pub const MAX_CONN_IDLE: u32 = 86_400;
fn default_conn_idle_tcp() -> u32 {
    DEFAULT_CONN_IDLE_TCP
}
fn default_conn_idle_udp() -> u32 {
    DEFAULT_CONN_IDLE_UDP
}
fn is_default_conn_idle_tcp(v: &u32) -> bool {
    *v == DEFAULT_CONN_IDLE_TCP
}
fn is_default_conn_idle_udp(v: &u32) -> bool {
    *v == DEFAULT_CONN_IDLE_UDP
}
fn default_table_pool() -> u32 {
    DEFAULT_RING_POOL
}
fn default_control_socket() -> PathBuf {
    PathBuf::from(DEFAULT_CONTROL_SOCKET)
}
fn default_metrics_listen() -> SocketAddr {
    DEFAULT_METRICS_LISTEN.parse().expect("valid default")
}

impl Config {
    /// Parses and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("cannot read config file {}: {e}", path.display())))?;
        Config::parse(&text)
            .map_err(|e| ConfigError(format!("config file {}: {e}", path.display())))
    }

    /// Parses and validates configuration text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The configuration as TOML, as `lbd` writes it back after a change made with `lbctl`.
    /// Parsing the text gives back an equal configuration.
    pub fn to_toml(&self) -> Result<String, ConfigError> {
        let body = toml::to_string(self)
            .map_err(|e| ConfigError(format!("cannot write the configuration as TOML: {e}")))?;
        Ok(format!(
            "# Written by lbd after a change made with lbctl (comments are not kept).\n\n{body}"
        ))
    }

    /// The settings that only take effect when `lbd` starts and differ between `self` and `new`.
    pub fn restart_only_changes(&self, new: &Config) -> Vec<&'static str> {
        let mut out = Vec::new();
        if self.interface != new.interface {
            out.push("interface");
        }
        if self.xdp_mode != new.xdp_mode {
            out.push("xdp_mode");
        }
        if self.conntrack_size != new.conntrack_size {
            out.push("conntrack_size");
        }
        if self.conntrack_new_size != new.conntrack_new_size {
            out.push("conntrack_new_size");
        }
        if self.table_pool != new.table_pool {
            out.push("table_pool");
        }
        if self.pin_dir != new.pin_dir {
            out.push("pin_dir");
        }
        if self.control_socket != new.control_socket {
            out.push("control_socket");
        }
        if self.control_group != new.control_group {
            out.push("control_group");
        }
        if self.metrics_listen != new.metrics_listen {
            out.push("metrics_listen");
        }
        if self.bgp != new.bgp {
            out.push("bgp");
        }
        out
    }

    /// What the configuration asks of this host that the host does not allow: an encap source
    /// that is none of its addresses, a VIP that is an address of the balancer's interface
    /// (without `allow_host_address`). Each as (what it is about, the refusal naming the field
    /// and the fix); `lbd` refuses any at start and reload, `lbctl` any new one.
    pub fn host_problems(&self, host: &HostAddrs) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let sources = [
            (
                "encap.source_v4",
                self.encap.source_v4.map(IpAddr::V4),
                "-4",
            ),
            (
                "encap.source_v6",
                self.encap.source_v6.map(IpAddr::V6),
                "-6",
            ),
        ];
        for (field, src, family) in sources {
            if let Some(a) = src {
                if !host.all.contains(&a) {
                    out.push((field.to_string(), format!(
                        "{field}: {a} is not an address of this host (no interface in lbd's network namespace has it), so tunnelled packets would carry a source that is not this host's (dropped by anti-spoofing filters, their ICMP errors lost); use an address of {} (`ip {family} addr show {}`)",
                        self.interface, self.interface
                    )));
                }
            }
        }
        for (i, vip) in self.vips.iter().enumerate() {
            if !vip.allow_host_address && host.interface.contains(&vip.address) {
                let name = vip.name();
                out.push((name.clone(), format!(
                    "vip[{i}] ({name}): {} is an address of the balancer's interface {}, so the balancer would take port {}/{} over from this host's own service (such as SSH); use an address that is not the balancer's own, or, to take the port over deliberately, `lbctl vip add --force` (allow_host_address = true in the file)",
                    vip.address, self.interface, vip.port, vip.protocol
                )));
            }
        }
        out
    }

    /// What is accepted but worth a warning (logged, and kept for `lbctl status`): a table with
    /// fewer than 100 slots per backend, where a change of one backend moves other backends'
    /// flows too (Maglev needs about 100 per backend for about 1% disruption). Each as (the
    /// VIP, the warning).
    pub fn warnings(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (i, vip) in self.vips.iter().enumerate() {
            let n = vip
                .backends
                .iter()
                .filter(|b| b.effective_weight() > 0)
                .count() as u64;
            if u64::from(vip.table_size) < 100 * n {
                let name = vip.name();
                out.push((name.clone(), format!(
                    "vip[{i}] ({name}): table_size {} is below 100 slots per backend ({n} backends), so a change of one backend also moves other backends' flows (Maglev needs about 100 per backend for about 1% disruption); use a prime table_size of at least {}",
                    vip.table_size,
                    next_prime(100 * n)
                )));
            }
        }
        out
    }

    /// Checks everything the datapath relies on.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.check_settings()?;
        if let Some(bgp) = &self.bgp {
            bgp.check(&self.vips)?;
        }
        let mut seen = HashSet::new();
        let mut slots: u64 = 0;
        let mut backends = 0usize;
        let vip_addrs: HashSet<IpAddr> = self.vips.iter().map(|v| v.address).collect();
        for (i, vip) in self.vips.iter().enumerate() {
            let name = vip.name();
            let at = format!("vip[{i}] ({name})");
            if !seen.insert((vip.address, vip.port, vip.protocol)) {
                return err(format!(
                    "{at}: duplicate VIP; each address, port and protocol may appear once"
                ));
            }
            self.check_vip(&at, vip)?;
            slots += vip.table_size as u64;
            check_backends(&at, vip, &vip_addrs)?;
            check_table_fits(&at, vip)?;
            backends += vip.backends.len();
        }
        if backends >= MAX_BACKENDS as usize {
            return err(format!(
                "backend: {backends} backends configured, at most {} are supported",
                MAX_BACKENDS - 1
            ));
        }
        // Two tables per VIP must fit while one replaces the other.
        if 2 * slots > self.table_pool as u64 {
            return err(format!(
                "table_pool: {} slots cannot hold two tables for every VIP ({} slots needed); raise table_pool or lower table_size",
                self.table_pool,
                2 * slots
            ));
        }
        Ok(())
    }

    /// The top-level keys, before any VIP.
    fn check_settings(&self) -> Result<(), ConfigError> {
        if self.interface.is_empty() || self.interface.len() > 15 {
            return err("interface: must name a network interface (1 to 15 characters)");
        }
        if !self.pin_dir.is_empty() && !self.pin_dir.starts_with('/') {
            return err(format!(
                "pin_dir: {:?} must be an absolute path on a bpffs mount (default {DEFAULT_PIN_DIR}), or \"\" to disable pinning",
                self.pin_dir
            ));
        }
        if self.control_socket.as_os_str().is_empty() || !self.control_socket.is_absolute() {
            return err(format!(
                "control_socket: {:?} is not an absolute path; use one such as {DEFAULT_CONTROL_SOCKET}",
                self.control_socket.display().to_string()
            ));
        }
        if let Some(g) = &self.control_group {
            if g.is_empty() || g.contains(['\0', ':', '/', ' ']) {
                return err(format!(
                    "control_group: {g:?} is not a group name; name an existing group or remove the key"
                ));
            }
        }
        if self.conntrack_size < 1024 {
            return err(format!(
                "conntrack_size: {} is too small; use at least 1024",
                self.conntrack_size
            ));
        }
        if self.conntrack_new_size < 1024 {
            return err(format!(
                "conntrack_new_size: {} is too small; use at least 1024",
                self.conntrack_new_size
            ));
        }
        for (name, v) in [
            ("conn_idle_tcp_seconds", self.conn_idle_tcp_seconds),
            ("conn_idle_udp_seconds", self.conn_idle_udp_seconds),
        ] {
            if v == 0 || v > MAX_CONN_IDLE {
                return err(format!(
                    "{name}: {v} is out of range; use 1 to {MAX_CONN_IDLE} seconds (default {})",
                    if name.contains("tcp") {
                        DEFAULT_CONN_IDLE_TCP
                    } else {
                        DEFAULT_CONN_IDLE_UDP
                    }
                ));
            }
        }
        if self.vips.len() > MAX_VIPS as usize {
            return err(format!(
                "vip: {} VIPs configured, at most {MAX_VIPS} are supported",
                self.vips.len()
            ));
        }
        Ok(())
    }

    /// One VIP's own keys (`at` names it in errors); duplicates are checked by the caller.
    fn check_vip(&self, at: &str, vip: &Vip) -> Result<(), ConfigError> {
        if vip.port == 0 {
            return err(format!("{at}: port must be between 1 and 65535"));
        }
        if vip.address.is_unspecified() || vip.address.is_multicast() {
            return err(format!("{at}: address must be a unicast address"));
        }
        if !is_prime(vip.table_size) {
            return err(format!(
                "{at}: table_size {} is not prime; use a prime such as 65537 (the default), 131071 or 262139",
                vip.table_size
            ));
        }
        if !(MIN_TABLE_SIZE..=MAX_TABLE_SIZE).contains(&vip.table_size) {
            return err(format!(
                "{at}: table_size {} is out of range; use a prime from {MIN_TABLE_SIZE} to {MAX_TABLE_SIZE}",
                vip.table_size
            ));
        }
        if let Some(h) = &vip.health {
            h.check().or_else(|e| err(format!("{at}: {e}")))?;
        }
        if let Some(l) = &vip.learning {
            l.check(vip.health.is_some())
                .or_else(|e| err(format!("{at}: {e}")))?;
        }
        if vip.forwarding == Forwarding::Ipip {
            match vip.address {
                IpAddr::V4(_) if self.encap.source_v4.is_none() => {
                    return err(format!("{at}: forwarding = \"ipip\" needs encap.source_v4 (an IPv4 address of this host)"));
                }
                IpAddr::V6(_) if self.encap.source_v6.is_none() => {
                    return err(format!("{at}: forwarding = \"ipip\" needs encap.source_v6 (an IPv6 address of this host)"));
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// The smallest prime at or above `n` (at least [`MIN_TABLE_SIZE`]).
fn next_prime(n: u64) -> u64 {
    let mut p = n.max(u64::from(MIN_TABLE_SIZE));
    while p <= u64::from(u32::MAX) && !is_prime(p as u32) {
        p += 1;
    }
    p
}

/// Every backend with weight must own at least one slot of the VIP's table: a table too small
/// for its backends would give some none (they get no traffic, silently).
fn check_table_fits(at: &str, vip: &Vip) -> Result<(), ConfigError> {
    // Identity order, as the table is built (backends of a VIP share its family).
    let mut sorted: Vec<&Backend> = vip.backends.iter().collect();
    sorted.sort_by_key(|b| b.address);
    let weights: Vec<u32> = sorted.iter().map(|b| b.effective_weight()).collect();
    let slots = lb_common::maglev::slot_counts(&weights, vip.table_size);
    let starved = sorted
        .iter()
        .zip(&slots)
        .filter(|(b, &s)| b.effective_weight() > 0 && s == 0)
        .map(|(b, _)| b)
        .collect::<Vec<_>>();
    let Some(first) = starved.first() else {
        return Ok(());
    };
    let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
    let lightest = weights
        .iter()
        .filter(|&&w| w > 0)
        .min()
        .copied()
        .unwrap_or(1);
    let serving = weights.iter().filter(|&&w| w > 0).count() as u64;
    // With M >= W / w_min every backend's exact share is at least one slot.
    let need = next_prime(total.div_ceil(u64::from(lightest)));
    err(format!(
        "{at}: table_size {} is too small for its {serving} backends: {} of them would own no slot and get no traffic (the first is {}, weight {}); use a prime table_size of at least {need}, or {} or more for about 1% disruption (100 slots per backend)",
        vip.table_size,
        starved.len(),
        first.address,
        first.effective_weight(),
        next_prime((100 * serving).max(need))
    ))
}

/// A VIP's backends: family, unicast (not broadcast, multicast, unspecified or loopback), not
/// one of the balancer's VIPs (`vip_addrs`), unique, weight in range.
fn check_backends(at: &str, vip: &Vip, vip_addrs: &HashSet<IpAddr>) -> Result<(), ConfigError> {
    let mut addrs = HashSet::new();
    for (j, b) in vip.backends.iter().enumerate() {
        let bat = format!("{at}: backend[{j}] ({})", b.address);
        if b.address.is_ipv4() != vip.address.is_ipv4() {
            let (bf, vf) = if b.address.is_ipv4() {
                ("IPv4", "IPv6")
            } else {
                ("IPv6", "IPv4")
            };
            return err(format!(
                "{bat}: address is {bf} but the VIP is {vf}; use an {vf} backend address"
            ));
        }
        let broadcast = matches!(b.address, IpAddr::V4(a) if a.is_broadcast());
        if b.address.is_unspecified()
            || b.address.is_multicast()
            || b.address.is_loopback()
            || broadcast
        {
            return err(format!(
                "{bat}: address must be a unicast address of another host"
            ));
        }
        if vip_addrs.contains(&b.address) {
            return err(format!(
                "{bat}: address is a VIP of this balancer (its packets would come back here); a backend must be a unicast address of another host"
            ));
        }
        if !addrs.insert(b.address) {
            return err(format!(
                "{bat}: duplicate backend; list each address once per VIP"
            ));
        }
        if b.weight > MAX_WEIGHT {
            return err(format!(
                "{bat}: weight {} is out of range; use 0 to {MAX_WEIGHT}",
                b.weight
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
interface = "eth0"
[encap]
source_v4 = "10.0.0.2"
source_v6 = "fd00::2"
"#;

    fn with_vip(vip: &str) -> String {
        format!("{BASE}\n{vip}")
    }

    fn error(text: &str) -> String {
        Config::parse(text).expect_err("config must be rejected").0
    }

    #[test]
    fn minimal_config_has_defaults() {
        let c = Config::parse(&with_vip(
            "[[vip]]\naddress = \"10.0.0.100\"\nport = 80\nprotocol = \"tcp\"\n[[vip.backend]]\naddress = \"10.0.0.11\"\n",
        ))
        .unwrap();
        assert_eq!(c.xdp_mode, XdpMode::Auto);
        assert_eq!(c.vips[0].table_size, DEFAULT_TABLE_SIZE);
        assert_eq!(c.vips[0].forwarding, Forwarding::Ipip);
        assert_eq!(c.vips[0].backends[0].weight, 1);
    }

    #[test]
    fn rejects_with_field_and_fix() {
        let v = |extra: &str, backend: &str| {
            with_vip(&format!(
                "[[vip]]\naddress = \"10.0.0.100\"\nport = 80\nprotocol = \"tcp\"\n{extra}\n[[vip.backend]]\naddress = \"{backend}\"\n"
            ))
        };
        assert!(
            error(&v("table_size = 65536", "10.0.0.11")).contains("table_size 65536 is not prime")
        );
        assert!(error(&v("table_size = 2147483647", "10.0.0.11")).contains("out of range"));
        assert!(error(&v("", "2001:db8::1")).contains("address is IPv6 but the VIP is IPv4"));
        assert!(error(&v("bogus = 1", "10.0.0.11")).contains("unknown field `bogus`"));
        assert!(error(&v("forwarding = \"gre\"", "10.0.0.11")).contains("unknown variant `gre`"));
        let dup = format!(
            "{}\n[[vip.backend]]\naddress = \"10.0.0.11\"\n",
            v("", "10.0.0.11")
        );
        assert!(error(&dup).contains("duplicate backend"));
        let heavy = v("", "10.0.0.11").replace(
            "address = \"10.0.0.11\"",
            "address = \"10.0.0.11\"\nweight = 10001",
        );
        assert!(error(&heavy).contains("weight 10001 is out of range; use 0 to 10000"));
        let no_src = "interface = \"eth0\"\n[[vip]]\naddress = \"10.0.0.100\"\nport = 80\nprotocol = \"tcp\"\n";
        assert!(error(no_src).contains("needs encap.source_v4"));
        let two = format!(
            "{}\n{}",
            v("", "10.0.0.11"),
            "[[vip]]\naddress = \"10.0.0.100\"\nport = 80\nprotocol = \"tcp\"\n"
        );
        assert!(error(&two).contains("duplicate VIP"));
        assert!(error(&v("", "10.0.0.11").replace("port = 80", "port = 0"))
            .contains("port must be between 1 and 65535"));
        assert!(error(&v("", "10.0.0.11").replace("port = 80", "port = 70000")).contains("port"));
        assert!(error(&v("", "not-an-ip")).contains("invalid IP address syntax"));
        assert!(
            error(&v("", "10.0.0.11").replace("interface = \"eth0\"", "interface = \"\""))
                .contains("interface")
        );
    }

    #[test]
    fn backend_must_be_a_unicast_address_of_another_host() {
        let v = |backend: &str| {
            with_vip(&format!(
                "[[vip]]\naddress = \"10.0.0.100\"\nport = 80\nprotocol = \"tcp\"\n[[vip]]\naddress = \"10.0.0.101\"\nport = 53\nprotocol = \"udp\"\n[[vip.backend]]\naddress = \"{backend}\"\n"
            ))
        };
        for b in ["255.255.255.255", "224.0.0.1", "0.0.0.0", "127.0.0.1"] {
            assert!(
                error(&v(b)).ends_with(&format!(
                    "vip[1] (10.0.0.101:53/udp): backend[0] ({b}): address must be a unicast address of another host"
                )),
                "{b}: {}",
                error(&v(b))
            );
        }
        // Any VIP of the balancer, its own or another's: the packet would come back here.
        for b in ["10.0.0.100", "10.0.0.101"] {
            assert!(
                error(&v(b)).contains(&format!("backend[0] ({b}): address is a VIP of this balancer (its packets would come back here); a backend must be a unicast address of another host")),
                "{b}: {}",
                error(&v(b))
            );
        }
        Config::parse(&v("10.0.0.11")).unwrap().validate().unwrap();
    }

    #[test]
    fn host_problems_name_the_field_and_the_fix() {
        let c = Config::parse(&with_vip(
            "[[vip]]\naddress = \"10.0.0.2\"\nport = 22\nprotocol = \"tcp\"\n",
        ))
        .unwrap();
        let own = HostAddrs {
            interface: vec!["10.0.0.2".parse().unwrap(), "fd00::2".parse().unwrap()],
            all: vec!["10.0.0.2".parse().unwrap(), "fd00::2".parse().unwrap()],
        };
        let p = c.host_problems(&own);
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].0, "10.0.0.2:22/tcp");
        assert!(
            p[0].1.starts_with(
                "vip[0] (10.0.0.2:22/tcp): 10.0.0.2 is an address of the balancer's interface eth0"
            ),
            "{p:?}"
        );
        assert!(p[0]
            .1
            .contains("`lbctl vip add --force` (allow_host_address = true in the file)"));
        let mut forced = c.clone();
        forced.vips[0].allow_host_address = true;
        assert!(forced.host_problems(&own).is_empty());
        // Written back and read again, the key survives.
        let again = Config::parse(&forced.to_toml().unwrap()).unwrap();
        assert!(again.vips[0].allow_host_address);
        // Sources on another interface are fine; sources on none are not.
        let elsewhere = HostAddrs {
            interface: vec![],
            all: vec!["10.0.0.2".parse().unwrap()],
        };
        let p = c.host_problems(&elsewhere);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].1
                .starts_with("encap.source_v6: fd00::2 is not an address of this host"),
            "{p:?}"
        );
        assert!(
            p[0].1
                .ends_with("use an address of eth0 (`ip -6 addr show eth0`)"),
            "{p:?}"
        );
    }

    #[test]
    fn a_table_too_small_for_its_backends_is_refused_and_a_small_one_warned() {
        let vip = |size: u32, backends: usize, extra: &str| {
            let mut t = format!(
                "[[vip]]\naddress = \"10.0.0.100\"\nport = 80\nprotocol = \"tcp\"\ntable_size = {size}\n"
            );
            for b in 0..backends {
                t.push_str(&format!(
                    "[[vip.backend]]\naddress = \"10.0.1.{}\"\n",
                    b + 1
                ));
            }
            with_vip(&(t + extra))
        };
        assert!(error(&vip(7, 10, "")).ends_with("vip[0] (10.0.0.100:80/tcp): table_size 7 is too small for its 10 backends: 3 of them would own no slot and get no traffic (the first is 10.0.1.8, weight 1); use a prime table_size of at least 11, or 1009 or more for about 1% disruption (100 slots per backend)"), "{}", error(&vip(7, 10, "")));
        // Draining three leaves seven: one slot each.
        let drained = vip(7, 10, "").replace(
            "address = \"10.0.1.8\"\n",
            "address = \"10.0.1.8\"\ndrained = true\n",
        );
        let drained = drained
            .replace(
                "address = \"10.0.1.9\"\n",
                "address = \"10.0.1.9\"\nweight = 0\n",
            )
            .replace(
                "address = \"10.0.1.10\"\n",
                "address = \"10.0.1.10\"\nweight = 0\n",
            );
        Config::parse(&drained).unwrap();
        // Weights: one heavy backend starves a light one in a small table.
        let heavy = vip(11, 2, "").replacen(
            "address = \"10.0.1.1\"\n",
            "address = \"10.0.1.1\"\nweight = 100\n",
            1,
        );
        assert!(error(&heavy).contains("table_size 11 is too small for its 2 backends: 1 of them would own no slot and get no traffic (the first is 10.0.1.2, weight 1); use a prime table_size of at least 101"), "{}", error(&heavy));
        // Accepted but warned below 100 slots per backend; not at the default size.
        let w = Config::parse(&vip(251, 3, "")).unwrap().warnings();
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].1, "vip[0] (10.0.0.100:80/tcp): table_size 251 is below 100 slots per backend (3 backends), so a change of one backend also moves other backends' flows (Maglev needs about 100 per backend for about 1% disruption); use a prime table_size of at least 307");
        assert!(Config::parse(&vip(307, 3, ""))
            .unwrap()
            .warnings()
            .is_empty());
        assert!(Config::parse(&vip(65537, 100, ""))
            .unwrap()
            .warnings()
            .is_empty());
    }

    #[test]
    fn written_toml_parses_back_equal() {
        let mut c = Config::parse(&with_vip(
            "[[vip]]\naddress = \"10.0.0.100\"\nport = 80\nprotocol = \"tcp\"\n[[vip.backend]]\naddress = \"10.0.0.11\"\nweight = 3\n[[vip.backend]]\naddress = \"10.0.0.12\"\n\n[[vip]]\naddress = \"fd00::100\"\nport = 443\nprotocol = \"udp\"\nforwarding = \"l2\"\ntable_size = 251\n",
        ))
        .unwrap();
        c.vips[0].backends[1].drained = true;
        c.control_group = Some("lbops".into());
        c.bgp = Some(Bgp {
            local_as: 65001,
            peer_as: 65000,
            peers: vec!["10.0.0.1".parse().unwrap(), "fd00::1".parse().unwrap()],
            router_id: "10.0.0.2".parse().unwrap(),
            hold_time: 3,
            bird: "bird".into(),
            drain_timeout_seconds: 30,
        });
        let text = c.to_toml().unwrap();
        assert_eq!(Config::parse(&text).unwrap(), c, "{text}");
        assert!(text.contains("drained = true"), "{text}");
        // Not drained: the key is left out, so files stay as operators write them.
        assert_eq!(text.matches("drained").count(), 1, "{text}");
    }

    #[test]
    fn drained_backend_keeps_weight_but_has_none_effective() {
        let b = Backend {
            address: "10.0.0.11".parse().unwrap(),
            weight: 5,
            drained: true,
            pinned: false,
        };
        assert_eq!(b.effective_weight(), 0);
        let undrained = Backend {
            drained: false,
            ..b
        };
        assert_eq!(undrained.effective_weight(), 5);
    }

    const HVIP: &str = "[[vip]]\naddress = \"10.0.0.100\"\nport = 8080\nprotocol = \"tcp\"\n";

    fn with_health(health: &str) -> String {
        with_vip(&format!(
            "{HVIP}[vip.health]\n{health}\n[[vip.backend]]\naddress = \"10.0.0.11\"\n"
        ))
    }

    #[test]
    fn health_table_parses_with_defaults_and_maps_to_the_prober() {
        let c = Config::parse(&with_vip(&format!(
            "{HVIP}[[vip.backend]]\naddress = \"10.0.0.11\"\n"
        )))
        .unwrap();
        assert_eq!(c.vips[0].health, None, "no [vip.health]: no probing");

        let c = Config::parse(&with_health("")).unwrap();
        let h = c.vips[0].health.clone().unwrap();
        assert_eq!(h, Health::default());
        let p = h.to_config(c.vips[0].port);
        assert_eq!(p.kind, ProbeKind::Tcp);
        assert_eq!(p.port, 8080, "the VIP's port by default");
        assert_eq!(p.interval, Duration::from_secs(2));
        assert_eq!((p.rise, p.fall), (2, 3));

        let c = Config::parse(&with_health(
            "kind = \"http\"\ninterval_ms = 200\ntimeout_ms = 150\nrise = 1\nfall = 4\nport = 9000\npath = \"/healthz\"\nexpected_status = 204\nslow_start_ms = 20000\nejection_base_ms = 5000",
        ))
        .unwrap();
        let p = c.vips[0].health.as_ref().unwrap().to_config(8080);
        assert_eq!(
            p,
            HealthConfig {
                kind: ProbeKind::Http,
                interval: Duration::from_millis(200),
                timeout: Duration::from_millis(150),
                rise: 1,
                fall: 4,
                port: 9000,
                path: "/healthz".into(),
                expected_status: 204,
                admission: crate::health::Admission {
                    slow_start: Duration::from_secs(20),
                    ejection_base: Duration::from_secs(5),
                    ..crate::health::Admission::default()
                },
            }
        );
        // Written back and read again, unchanged (lbd rewrites the file after lbctl changes).
        let text = c.to_toml().unwrap();
        assert_eq!(Config::parse(&text).unwrap(), c, "{text}");
        assert!(text.contains("[vip.health]"), "{text}");
    }

    #[test]
    fn health_table_is_validated_field_by_field() {
        let at = "vip[0] (10.0.0.100:8080/tcp): ";
        for (body, want) in [
            (
                "interval_ms = 50",
                "health.interval_ms must be at least 100",
            ),
            (
                "interval_ms = 4000000",
                "health.interval_ms must be at least 100 and at most 3600000",
            ),
            ("timeout_ms = 5", "health.timeout_ms must be at least 10"),
            (
                "interval_ms = 200\ntimeout_ms = 300",
                "health.timeout_ms (300) must not exceed health.interval_ms (200)",
            ),
            ("rise = 0", "health.rise must be between 1 and 100"),
            ("fall = 101", "health.fall must be between 1 and 100"),
            ("port = 0", "health.port must be between 1 and 65535"),
            (
                "slow_start_ms = 3600001",
                "health.slow_start_ms must be at most 3600000",
            ),
            (
                "ejection_base_ms = 20000\nejection_max_ms = 10000",
                "health.ejection_max_ms (10000) must be at least health.ejection_base_ms (20000)",
            ),
            (
                "kind = \"http\"\npath = \"healthz\"",
                "health.path \"healthz\" must start with '/'",
            ),
            (
                "kind = \"http\"\nexpected_status = 42",
                "health.expected_status 42 is not an HTTP status",
            ),
        ] {
            let e = error(&with_health(body));
            assert!(e.starts_with(at) && e.contains(want), "{body:?}: {e}");
        }
        // Parse errors name the field too.
        assert!(error(&with_health("kind = \"icmp\"")).contains("unknown variant `icmp`"));
        assert!(error(&with_health("intervall_ms = 100")).contains("unknown field `intervall_ms`"));
        assert!(error(&with_health("port = 70000")).contains("port"));
        // HTTP-only fields are not checked for a TCP probe.
        assert!(Config::parse(&with_health("path = \"x\"")).is_ok());
    }

    fn with_learning(learning: &str) -> String {
        with_vip(&format!(
            "{HVIP}[vip.health]\nkind = \"http\"\n[vip.learning]\n{learning}\n[[vip.backend]]\naddress = \"10.0.0.11\"\npinned = true\n[[vip.backend]]\naddress = \"10.0.0.12\"\n"
        ))
    }

    #[test]
    fn learning_table_and_pinned_parse_with_defaults() {
        let c = Config::parse(&with_health("")).unwrap();
        assert_eq!(
            c.vips[0].learning, None,
            "no [vip.learning]: configured weights"
        );
        assert!(!c.vips[0].learning_enabled());
        assert!(!c.vips[0].backends[0].pinned, "not pinned by default");

        let c = Config::parse(&with_learning("")).unwrap();
        let l = c.vips[0].learning.clone().unwrap();
        assert_eq!(l, Learning::default());
        assert!(!l.enabled, "learning is off unless enabled");
        assert_eq!(l.disruption_budget, 0.05);
        assert_eq!(l.interval_ms, 1000);
        assert!(c.vips[0].backends[0].pinned);
        assert!(!c.vips[0].backends[1].pinned);

        let c = Config::parse(&with_learning(
            "enabled = true\nlatency_target_ms = 50\nfloor = 0.5\nceiling = 2\nmax_step = 0.1\ndeadband = 0.02\ndisruption_budget = 0.01\nmax_drained_share = 0.5\ninterval_ms = 300\ncarry_knee = 0.7",
        ))
        .unwrap();
        assert!(c.vips[0].learning_enabled());
        assert_eq!(c.vips[0].learning.as_ref().unwrap().carry_knee, Some(0.7));
        // Written back and read again, unchanged; pinned is kept, unpinned left out.
        let text = c.to_toml().unwrap();
        assert_eq!(Config::parse(&text).unwrap(), c, "{text}");
        assert!(text.contains("[vip.learning]"), "{text}");
        assert_eq!(text.matches("pinned").count(), 1, "{text}");
    }

    #[test]
    fn learning_table_is_validated_field_by_field() {
        let at = "vip[0] (10.0.0.100:8080/tcp): ";
        for (body, want) in [
            (
                "latency_target_ms = 0",
                "learning.latency_target_ms must be above 0",
            ),
            ("floor = 0", "learning.floor must be above 0 and at most 1"),
            (
                "floor = 1.5",
                "learning.floor must be above 0 and at most 1",
            ),
            ("ceiling = 0.5", "learning.ceiling must be from 1 to 100"),
            (
                "max_step = 1",
                "learning.max_step must be above 0 and below 1",
            ),
            ("deadband = -0.1", "learning.deadband must be from 0 to 1"),
            (
                "disruption_budget = 1.5",
                "learning.disruption_budget must be from 0 to 1",
            ),
            (
                "max_drained_share = 2",
                "learning.max_drained_share must be from 0 to 1",
            ),
            (
                "carry_knee = 0",
                "learning.carry_knee must be above 0 and at most 1",
            ),
            (
                "carry_knee = 1.5",
                "learning.carry_knee must be above 0 and at most 1",
            ),
            (
                "interval_ms = 50",
                "learning.interval_ms must be at least 100",
            ),
        ] {
            let e = error(&with_learning(body));
            assert!(e.starts_with(at) && e.contains(want), "{body:?}: {e}");
        }
        assert!(error(&with_learning("interval = 1")).contains("unknown field `interval`"));
        assert!(error(&with_learning("enabled = \"yes\"")).contains("enabled"));
        assert!(
            error(&with_learning("").replace("pinned = true", "pinned = 1")).contains("pinned")
        );
        // Learning without health checks is refused, with the reason and the fix.
        let no_health = with_vip(&format!(
            "{HVIP}[vip.learning]\nenabled = true\n[[vip.backend]]\naddress = \"10.0.0.11\"\n"
        ));
        let e = error(&no_health);
        assert!(
            e.starts_with(at) && e.contains("learning.enabled needs [vip.health]"),
            "{e}"
        );
        // Disabled learning without health is accepted (nothing to learn from, nothing learned).
        assert!(Config::parse(&no_health.replace("enabled = true", "enabled = false")).is_ok());
    }

    #[test]
    fn control_keys_have_defaults_and_are_checked() {
        let c = Config::parse(BASE).unwrap();
        assert_eq!(c.control_socket, PathBuf::from(DEFAULT_CONTROL_SOCKET));
        assert_eq!(c.metrics_listen.to_string(), DEFAULT_METRICS_LISTEN);
        assert_eq!(c.control_group, None);
        assert!(error(&format!("control_socket = \"lbd.sock\"\n{BASE}"))
            .contains("control_socket: \"lbd.sock\" is not an absolute path"));
        assert!(error(&format!("control_group = \"a:b\"\n{BASE}"))
            .contains("control_group: \"a:b\" is not a group name"));
        let bad_listen = error(&format!("metrics_listen = \"nowhere\"\n{BASE}"));
        assert!(bad_listen.contains("metrics_listen"), "{bad_listen}");
    }
}
