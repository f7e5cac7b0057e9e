//! Active health checks: TCP connect and HTTP GET probes, a pure up/down/probation/draining state
//! machine driven by rise and fall counts, and a `Prober` that runs one probe task per backend.
//!
//! With direct server return the balancer never sees replies, so probes are the only direct
//! measure of a backend's latency and errors. A failed probe is reported with the timeout as its
//! latency, whatever time it took to fail: a backend that refuses connections in 0.1 ms must never
//! look like the fastest backend of its pool to the weight model (`crate::learning`).
//!
//! Everything here talks only to the addresses it is given; the tests use 127.0.0.1.
use std::{
    fmt,
    net::SocketAddr,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::{mpsc, watch},
    task::JoinHandle,
    time::{timeout, MissedTickBehavior},
};

/// What a probe does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProbeKind {
    /// Succeeds when a TCP connection is established within the timeout.
    Tcp,
    /// Succeeds when `GET path` answers with `expected_status` within the timeout.
    Http,
}

/// One backend's health-check settings, built from `[vip.health]` (`crate::config`, which
/// validates them and takes its defaults from [`HealthConfig::default`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthConfig {
    pub kind: ProbeKind,
    /// Time between the starts of two probes.
    pub interval: Duration,
    /// A probe that has not succeeded by then fails (connect, request and status line included).
    pub timeout: Duration,
    /// Consecutive passes that bring a down backend back (into probation, then up).
    pub rise: u32,
    /// Consecutive failures that take an up backend down.
    pub fall: u32,
    /// Port probed on the backend's address (the service's port, usually the VIP's).
    pub port: u16,
    /// HTTP only: the path requested.
    pub path: String,
    /// HTTP only: the status that counts as a pass.
    pub expected_status: u16,
    /// How a backend is let back in (ejection backoff, slow start).
    pub admission: Admission,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            kind: ProbeKind::Tcp,
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            rise: 2,
            fall: 3,
            port: 80,
            path: "/".into(),
            expected_status: 200,
            admission: Admission::default(),
        }
    }
}

impl HealthConfig {
    /// The probe these settings describe, aimed at `addr` (the port comes from `self.port`).
    pub fn probe_for(&self, addr: std::net::IpAddr) -> Probe {
        let target = SocketAddr::new(addr, self.port);
        match self.kind {
            ProbeKind::Tcp => Probe::Tcp(TcpProbe {
                addr: target,
                timeout: self.timeout,
            }),
            ProbeKind::Http => Probe::Http(HttpProbe {
                addr: target,
                path: self.path.clone(),
                expected_status: self.expected_status,
                timeout: self.timeout,
            }),
        }
    }
}

/// The outcome of one probe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeResult {
    pub ok: bool,
    /// Time to success; for a failure, the probe's timeout whatever time the failure took (a
    /// fast failure is not a fast answer). This is the latency sample the weight model uses.
    pub latency: Duration,
    /// Why the probe failed (with the time it actually took), `None` on success.
    pub error: Option<String>,
}

impl ProbeResult {
    pub fn pass(latency: Duration) -> Self {
        ProbeResult {
            ok: true,
            latency,
            error: None,
        }
    }

    /// A failure, counted at `timeout`. `elapsed` goes into the message only.
    pub fn fail(timeout: Duration, elapsed: Duration, error: impl fmt::Display) -> Self {
        ProbeResult {
            ok: false,
            latency: timeout,
            error: Some(format!("{error} (after {:.1} ms)", ms(elapsed))),
        }
    }

    /// The latency in milliseconds, as the weight model takes it.
    pub fn latency_ms(&self) -> f64 {
        ms(self.latency)
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// A TCP connect probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpProbe {
    pub addr: SocketAddr,
    pub timeout: Duration,
}

impl TcpProbe {
    pub async fn probe(&self) -> ProbeResult {
        let start = Instant::now();
        match timeout(self.timeout, TcpStream::connect(self.addr)).await {
            Ok(Ok(_stream)) => ProbeResult::pass(start.elapsed()),
            Ok(Err(e)) => ProbeResult::fail(
                self.timeout,
                start.elapsed(),
                format!("connect {}: {e}", self.addr),
            ),
            Err(_) => ProbeResult::fail(
                self.timeout,
                start.elapsed(),
                format!("connect {}: timed out", self.addr),
            ),
        }
    }
}

/// An HTTP/1.1 `GET` probe: passes when the status line carries `expected_status`. Only the
/// status line is read (at most `MAX_STATUS_LINE` bytes); the connection is then closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpProbe {
    pub addr: SocketAddr,
    pub path: String,
    pub expected_status: u16,
    pub timeout: Duration,
}

/// Longest status line an HTTP probe reads before giving up on the answer.
pub const MAX_STATUS_LINE: usize = 1024;

impl HttpProbe {
    pub async fn probe(&self) -> ProbeResult {
        let start = Instant::now();
        match timeout(self.timeout, self.exchange()).await {
            Ok(Ok(status)) if status == self.expected_status => ProbeResult::pass(start.elapsed()),
            Ok(Ok(status)) => ProbeResult::fail(
                self.timeout,
                start.elapsed(),
                format!(
                    "GET http://{}{}: status {status}, expected {}",
                    self.addr, self.path, self.expected_status
                ),
            ),
            Ok(Err(e)) => ProbeResult::fail(
                self.timeout,
                start.elapsed(),
                format!("GET http://{}{}: {e}", self.addr, self.path),
            ),
            Err(_) => ProbeResult::fail(
                self.timeout,
                start.elapsed(),
                format!("GET http://{}{}: timed out", self.addr, self.path),
            ),
        }
    }

    /// Sends the request and returns the status code of the answer.
    async fn exchange(&self) -> std::io::Result<u16> {
        let mut stream = TcpStream::connect(self.addr).await?;
        let host = match self.addr {
            SocketAddr::V4(a) => a.ip().to_string(),
            SocketAddr::V6(a) => format!("[{}]", a.ip()),
        };
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: lbd-health\r\nAccept: */*\r\nConnection: close\r\n\r\n",
            self.path
        );
        stream.write_all(request.as_bytes()).await?;
        let mut buf = Vec::with_capacity(256);
        let mut chunk = [0u8; 256];
        loop {
            if let Some(end) = buf.windows(2).position(|w| w == b"\r\n") {
                return parse_status_line(&buf[..end]);
            }
            if buf.len() >= MAX_STATUS_LINE {
                return Err(bad("status line longer than 1024 bytes"));
            }
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(bad("connection closed before a status line"));
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    }
}

fn bad(msg: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg.to_string())
}

/// `HTTP/1.1 200 OK` → 200.
fn parse_status_line(line: &[u8]) -> std::io::Result<u16> {
    let line = std::str::from_utf8(line).map_err(|_| bad("status line is not UTF-8"))?;
    let mut parts = line.splitn(3, ' ');
    let version = parts.next().unwrap_or("");
    if !version.starts_with("HTTP/") {
        return Err(bad("answer is not HTTP"));
    }
    let code = parts.next().unwrap_or("");
    if code.len() != 3 {
        return Err(bad("malformed status code"));
    }
    code.parse().map_err(|_| bad("malformed status code"))
}

/// A probe of either kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    Tcp(TcpProbe),
    Http(HttpProbe),
}

impl Probe {
    pub async fn probe(&self) -> ProbeResult {
        match self {
            Probe::Tcp(p) => p.probe().await,
            Probe::Http(p) => p.probe().await,
        }
    }

    pub fn timeout(&self) -> Duration {
        match self {
            Probe::Tcp(p) => p.timeout,
            Probe::Http(p) => p.timeout,
        }
    }
}

/// A backend's health as the balancer should treat it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthStatus {
    /// Passing: full (learned or configured) weight.
    Up,
    /// Failed `fall` consecutive probes: no new flows, tracked flows re-steered.
    Down,
    /// Was down (or new), passed its probes: back in the table on a slow start, its share
    /// ramping from nothing to full over `slow_start` (falling back when probes degrade). With
    /// `slow_start` 0: a quarter of its weight until `rise` more passes, one failure sends it
    /// back down.
    Probation,
    /// Taken out of rotation by the operator or the agent: no new flows, tracked flows continue.
    /// Probes still run underneath, so undraining returns to what they say.
    Draining,
    /// Not probed yet (a new backend, or every backend at a fresh start): no new flows until its
    /// first probe passes, so that a backend whose server does not exist never gets one.
    Pending,
}

impl HealthStatus {
    /// Whether the backend may take new flows (probation included, at a reduced weight).
    pub fn serving(self) -> bool {
        matches!(self, HealthStatus::Up | HealthStatus::Probation)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            HealthStatus::Up => "up",
            HealthStatus::Down => "down",
            HealthStatus::Probation => "probation",
            HealthStatus::Draining => "draining",
            HealthStatus::Pending => "pending",
        }
    }
}

impl fmt::Display for HealthStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a backend is let back in after an ejection (`[vip.health]`): an ejection holds it out
/// for longer each time it fails again soon after returning, and its return is a ramp that
/// stops and falls back when its probes degrade, so a backend that only fails under load
/// settles at the share it can carry instead of going down and up (flapping).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Admission {
    /// Time a returning (or new) backend's share takes to ramp from nothing to full. Zero:
    /// probation at a quarter of its weight for `rise` passes (no ramp, no fallback).
    pub slow_start: Duration,
    /// Hold after an ejection: `ejection_base` × the recent ejections, at most `ejection_max`.
    pub ejection_base: Duration,
    pub ejection_max: Duration,
    /// Ejections further apart than this are not recent: the count starts again at 1.
    pub ejection_forget: Duration,
}

impl Default for Admission {
    fn default() -> Self {
        Admission {
            slow_start: Duration::from_secs(10),
            ejection_base: Duration::from_secs(10),
            ejection_max: Duration::from_secs(300),
            ejection_forget: Duration::from_secs(300),
        }
    }
}

impl Admission {
    /// Readmission as before ejection backoff and slow start: no hold, a quarter of the weight
    /// on probation. What the bare constructors use.
    pub const NONE: Admission = Admission {
        slow_start: Duration::ZERO,
        ejection_base: Duration::ZERO,
        ejection_max: Duration::ZERO,
        ejection_forget: Duration::ZERO,
    };
}

/// Smallest share a ramp falls back to (the weight is never below 1 while on probation).
pub const MIN_RAMP_SHARE: f64 = 0.02;

/// Most holds a ramp waits after falling back, in multiples of `slow_start`: a backend that
/// recovers for real is ramping again within this.
pub const MAX_RAMP_HOLD_STEPS: u32 = 4;

/// A slow start in progress: the share grows linearly from `from` once `start` has passed.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Ramp {
    from: f64,
    /// When the share starts growing (later than the fallback that set `from`: held).
    start: Instant,
    /// When it last fell back (`None`: not since it began).
    fell_back: Option<Instant>,
    /// Fallbacks since it began: each holds the ramp for longer.
    fallbacks: u32,
    /// When a fallback first brought it to `MIN_RAMP_SHARE` (`None`: above it).
    at_floor_since: Option<Instant>,
}

/// The health state machine of one backend, driven by probe outcomes (each with the instant it
/// was seen, so that it is tested without a network and without a clock) and by drain/undrain
/// calls.
///
/// ```text
///   Pending ──first pass──▶ Up (fresh start) or Probation (a backend added)
///      └──first failure──▶ Down (not an ejection: it never served)
///            fall consecutive failures (an ejection: held out, longer each recent time)
///   Up ─────────────────────────────────▶ Down
///   ▲                                      │ rise consecutive passes, once the hold is over
///   │ ramp reached full share              ▼
///   └────────────────────────────── Probation ──(fall failures)──▶ Down
///                           degraded probe (failure, or latency ≥ timeout/2):
///                           share halved, ramp held (longer after each fallback);
///                           with a ramp, failures eject only once it has been at
///                           MIN_RAMP_SHARE for `fall` probe intervals
///
///   drain(): any state ─▶ Draining (probes keep counting underneath)
///   undrain(): Draining ─▶ the state the probes put it in meanwhile
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct HealthState {
    rise: u32,
    fall: u32,
    /// What the probes say (never `Draining`).
    probed: HealthStatus,
    draining: bool,
    /// Consecutive passes (reset by a failure).
    passes: u32,
    /// Consecutive failures (reset by a pass).
    failures: u32,
    admission: Admission,
    /// A passing probe slower than this is degraded (half the probe timeout).
    slow: Duration,
    /// Probe interval: a ramp falls back at most once per two of them (the queue that made
    /// its probes slow needs that long to drain).
    interval: Duration,
    /// Pending: whether the first pass starts a slow start (a backend added to a running VIP)
    /// rather than making it up (every backend at a fresh start: they start together).
    ramp_on_admit: bool,
    /// Recent ejections (see `recent_ejections`) and the last one.
    ejections: u32,
    last_ejection: Option<Instant>,
    /// A down backend does not return before this, whatever its probes say.
    hold_until: Option<Instant>,
    ramp: Option<Ramp>,
}

/// A change of status, returned by the calls that cause one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transition {
    pub from: HealthStatus,
    pub to: HealthStatus,
}

impl HealthState {
    /// A backend that starts up (a restart that found it serving in the datapath): `fall`
    /// failures take it down.
    pub fn new(rise: u32, fall: u32) -> Self {
        Self::starting(HealthStatus::Up, rise, fall)
    }

    /// A backend that starts down (a restart that found it down in the datapath): it needs
    /// `rise` passes to enter probation.
    pub fn new_down(rise: u32, fall: u32) -> Self {
        Self::starting(HealthStatus::Down, rise, fall)
    }

    /// A backend not probed yet: no new flows until its first probe passes. `ramp`: it then
    /// starts a slow start (a backend added to a running VIP) rather than being up at once.
    pub fn pending(rise: u32, fall: u32, ramp: bool) -> Self {
        HealthState {
            ramp_on_admit: ramp,
            ..Self::starting(HealthStatus::Pending, rise, fall)
        }
    }

    /// The state `config`'s backend starts in, from `status` (Up, Down or Pending).
    pub fn for_config(config: &HealthConfig, status: HealthStatus, ramp: bool) -> Self {
        let base = match status {
            HealthStatus::Down => Self::new_down(config.rise, config.fall),
            HealthStatus::Pending => Self::pending(config.rise, config.fall, ramp),
            _ => Self::new(config.rise, config.fall),
        };
        base.with_admission(config.admission, config.timeout / 2, config.interval)
    }

    /// Sets how the backend is let back in (`slow`: latency above which a pass is degraded).
    pub fn with_admission(
        mut self,
        admission: Admission,
        slow: Duration,
        interval: Duration,
    ) -> Self {
        self.admission = admission;
        self.slow = slow;
        self.interval = interval;
        self
    }

    fn starting(probed: HealthStatus, rise: u32, fall: u32) -> Self {
        HealthState {
            rise: rise.max(1),
            fall: fall.max(1),
            probed,
            draining: false,
            passes: 0,
            failures: 0,
            admission: Admission::NONE,
            slow: Duration::MAX,
            interval: Duration::ZERO,
            ramp_on_admit: false,
            ejections: 0,
            last_ejection: None,
            hold_until: None,
            ramp: None,
        }
    }

    pub fn status(&self) -> HealthStatus {
        if self.draining {
            HealthStatus::Draining
        } else {
            self.probed
        }
    }

    /// What the probes alone say (`Up`, `Down`, `Probation` or `Pending`), draining or not.
    pub fn probed_status(&self) -> HealthStatus {
        self.probed
    }

    pub fn consecutive_passes(&self) -> u32 {
        self.passes
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.failures
    }

    /// Ejections that still count at `now` (0 once `ejection_forget` has passed since the last).
    pub fn recent_ejections(&self, now: Instant) -> u32 {
        match self.last_ejection {
            Some(t) if now.saturating_duration_since(t) <= self.admission.ejection_forget => {
                self.ejections
            }
            _ => 0,
        }
    }

    /// How long a down backend is still held out at `now` (`None`: not held).
    pub fn held_for(&self, now: Instant) -> Option<Duration> {
        if self.probed != HealthStatus::Down {
            return None;
        }
        self.hold_until
            .map(|t| t.saturating_duration_since(now))
            .filter(|d| !d.is_zero())
    }

    /// The share of its weight the probes allow at `now`: 0 when not serving, 1 when up, the
    /// ramp's position on probation (a quarter without a slow start).
    pub fn share(&self, now: Instant) -> f64 {
        match self.probed {
            HealthStatus::Up => 1.0,
            // On probation it serves, however early in its ramp.
            HealthStatus::Probation => match &self.ramp {
                Some(r) => self.position(r, now).max(f64::MIN_POSITIVE),
                None => 0.25,
            },
            _ => 0.0,
        }
    }

    /// Where a slow start is at `now` (`None`: not ramping).
    pub fn ramp_position(&self, now: Instant) -> Option<f64> {
        (self.probed == HealthStatus::Probation)
            .then(|| self.ramp.as_ref().map(|r| self.position(r, now)))
            .flatten()
    }

    fn position(&self, r: &Ramp, now: Instant) -> f64 {
        let grown = now.saturating_duration_since(r.start).as_secs_f64()
            / self.admission.slow_start.as_secs_f64().max(1e-3);
        (r.from + grown).min(1.0)
    }

    /// Feeds one probe outcome seen now; returns the change of `status()` it caused, if any.
    pub fn on_probe(&mut self, result: &ProbeResult) -> Option<Transition> {
        self.on_probe_at(result, Instant::now())
    }

    /// Feeds one probe outcome seen at `now`; returns the change of `status()` it caused.
    pub fn on_probe_at(&mut self, result: &ProbeResult, now: Instant) -> Option<Transition> {
        let before = self.status();
        if result.ok {
            self.passes = self.passes.saturating_add(1);
            self.failures = 0;
        } else {
            self.failures = self.failures.saturating_add(1);
            self.passes = 0;
        }
        let degraded = !result.ok || result.latency >= self.slow;
        match self.probed {
            HealthStatus::Pending if result.ok => {
                self.passes = 0;
                if self.ramp_on_admit && !self.admission.slow_start.is_zero() {
                    self.start_ramp(now);
                } else {
                    self.probed = HealthStatus::Up;
                }
            }
            // It never served: down, but not an ejection (nothing to hold it out for).
            HealthStatus::Pending => self.probed = HealthStatus::Down,
            HealthStatus::Up if self.failures >= self.fall => self.eject(now),
            HealthStatus::Down if self.passes >= self.rise && self.held_for(now).is_none() => {
                self.passes = 0;
                if self.admission.slow_start.is_zero() {
                    self.probed = HealthStatus::Probation;
                } else {
                    self.start_ramp(now);
                }
            }
            HealthStatus::Probation => self.on_probation(result.ok, degraded, now),
            _ => {}
        }
        self.changed(before)
    }

    fn on_probation(&mut self, ok: bool, degraded: bool, now: Instant) {
        let Some(mut r) = self.ramp else {
            // Without a slow start: one failure is enough, `rise` passes make it up.
            if !ok {
                self.eject(now);
            } else if self.passes >= self.rise {
                self.probed = HealthStatus::Up;
                self.passes = 0;
            }
            return;
        };
        // Failures eject only once the ramp is at its floor: above it, a failure is the
        // queue its share built (the fallback below lowers the share, the queue needs a few
        // probe intervals to drain), so a backend that fails only under load settles at the
        // share it can carry instead of going down again (issue 25). At the floor it carries
        // next to nothing: failing there means it cannot serve at all.
        let floor_held = r
            .at_floor_since
            .is_some_and(|t| now.saturating_duration_since(t) >= self.interval * self.fall);
        if self.failures >= self.fall && floor_held {
            self.eject(now);
            return;
        }
        if degraded {
            let settled = r
                .fell_back
                .is_none_or(|t| now.saturating_duration_since(t) >= self.interval * 2);
            if settled {
                r.fallbacks += 1;
                r.from = (self.position(&r, now) / 2.0).max(MIN_RAMP_SHARE);
                r.at_floor_since = if r.from > MIN_RAMP_SHARE {
                    None
                } else {
                    r.at_floor_since.or(Some(now))
                };
                let steps = 1u32 << (r.fallbacks - 1).min(MAX_RAMP_HOLD_STEPS.ilog2());
                let hold = (self.admission.slow_start * steps).min(self.admission.ejection_max);
                r.start = now + hold;
                r.fell_back = Some(now);
                self.ramp = Some(r);
            }
            return;
        }
        if self.position(&r, now) >= 1.0 {
            self.probed = HealthStatus::Up;
            self.ramp = None;
            self.passes = 0;
        }
    }

    fn start_ramp(&mut self, now: Instant) {
        self.probed = HealthStatus::Probation;
        self.ramp = Some(Ramp {
            from: 0.0,
            start: now,
            fell_back: None,
            fallbacks: 0,
            at_floor_since: None,
        });
    }

    /// Down after serving: held out for `ejection_base` × recent ejections (capped).
    fn eject(&mut self, now: Instant) {
        self.ejections = self.recent_ejections(now).saturating_add(1);
        self.last_ejection = Some(now);
        let hold = self
            .admission
            .ejection_base
            .saturating_mul(self.ejections)
            .min(self.admission.ejection_max);
        self.hold_until = Some(now + hold);
        self.probed = HealthStatus::Down;
        self.ramp = None;
        self.passes = 0;
    }

    /// Operator or agent drain: no new flows whatever the probes say.
    pub fn drain(&mut self) -> Option<Transition> {
        let before = self.status();
        self.draining = true;
        self.changed(before)
    }

    /// Ends a drain: the status becomes what the probes said meanwhile.
    pub fn undrain(&mut self) -> Option<Transition> {
        let before = self.status();
        self.draining = false;
        self.changed(before)
    }

    fn changed(&self, before: HealthStatus) -> Option<Transition> {
        let after = self.status();
        (after != before).then_some(Transition {
            from: before,
            to: after,
        })
    }
}

/// One probe's outcome, as the `Prober` publishes it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProbeReport<K> {
    /// The caller's name for the backend.
    pub key: K,
    /// 0 for the first probe of this backend, then +1 per probe.
    pub seq: u64,
    pub result: ProbeResult,
    /// The backend's status after this probe (never `Draining`: drains are the caller's).
    pub status: HealthStatus,
    /// The change this probe caused, if any.
    pub transition: Option<Transition>,
}

/// One backend to probe.
#[derive(Debug, Clone)]
pub struct ProbeTarget<K> {
    pub key: K,
    pub probe: Probe,
    pub interval: Duration,
    /// Health state to start from (`HealthState::new` or one carried over from before).
    pub state: HealthState,
}

impl<K> ProbeTarget<K> {
    pub fn new(key: K, addr: std::net::IpAddr, config: &HealthConfig) -> Self {
        ProbeTarget {
            key,
            probe: config.probe_for(addr),
            interval: config.interval,
            state: HealthState::for_config(config, HealthStatus::Up, false),
        }
    }
}

/// Runs one probe task per backend, each on its own interval, and sends every outcome to one
/// bounded channel. A task waits for room in the channel (so a slow consumer delays probes rather
/// than queueing without bound) and stops when the `Prober` is shut down or dropped, or when the
/// receiver is gone. Tasks start staggered over one interval so probes do not go out in bursts.
///
/// The tasks run on a thread of their own (`lb-probes`, with its own single-threaded tokio
/// runtime), never on the caller's: a probe's latency is the time until its task sees the
/// answer, and on the agent's thread anything the agent does meanwhile (an apply, a fit, a
/// configuration file written and synced) would be added to it, and learned from. The thread
/// is spawned by the caller, so it is in the caller's network namespace; it ends with the
/// `Prober`. Only waiting for room in the report channel happens after the clock stops.
pub struct Prober {
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Prober {
    /// Starts probing on a new thread (the report channel may belong to any runtime).
    pub fn spawn<K>(targets: Vec<ProbeTarget<K>>, reports: mpsc::Sender<ProbeReport<K>>) -> Prober
    where
        K: Clone + Send + Sync + 'static,
    {
        let (stop, _) = watch::channel(false);
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                // Without a runtime of their own (out of file descriptors), probes still run,
                // on the caller's.
                tracing::error!(
                    "health checks: no runtime of their own ({e}); probing from the agent's thread"
                );
                return Self::spawn_on(&tokio::runtime::Handle::current(), targets, reports, stop);
            }
        };
        let prober = Self::spawn_on(rt.handle(), targets, reports, stop);
        let mut until_stopped = prober.stop.subscribe();
        let started = std::thread::Builder::new()
            .name("lb-probes".into())
            .spawn(move || {
                rt.block_on(async {
                    while !*until_stopped.borrow_and_update() {
                        if until_stopped.changed().await.is_err() {
                            break;
                        }
                    }
                });
                // Dropping the runtime drops whatever task is left.
            });
        if let Err(e) = started {
            tracing::error!("health checks: cannot start their thread: {e}");
        }
        prober
    }

    fn spawn_on<K>(
        rt: &tokio::runtime::Handle,
        targets: Vec<ProbeTarget<K>>,
        reports: mpsc::Sender<ProbeReport<K>>,
        stop: watch::Sender<bool>,
    ) -> Prober
    where
        K: Clone + Send + Sync + 'static,
    {
        let n = targets.len().max(1) as u32;
        let tasks = targets
            .into_iter()
            .enumerate()
            .map(|(i, target)| {
                // A backend not probed yet is probed at once: it takes no flows until then.
                let offset = if target.state.probed_status() == HealthStatus::Pending {
                    Duration::ZERO
                } else {
                    target.interval / n * i as u32
                };
                let stop = stop.subscribe();
                rt.spawn(run_target(target, offset, reports.clone(), stop))
            })
            .collect();
        Prober { stop, tasks }
    }

    /// Number of probe tasks.
    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    /// Stops every task and waits for them to finish (a probe in flight is abandoned).
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        for t in self.tasks.drain(..) {
            t.abort();
            let _ = t.await;
        }
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn run_target<K: Clone>(
    mut target: ProbeTarget<K>,
    offset: Duration,
    reports: mpsc::Sender<ProbeReport<K>>,
    mut stop: watch::Receiver<bool>,
) {
    let start = tokio::time::Instant::now() + offset;
    let mut ticks = tokio::time::interval_at(start, target.interval.max(Duration::from_millis(1)));
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut seq = 0u64;
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => return,
            _ = ticks.tick() => {}
        }
        let result = tokio::select! {
            biased;
            _ = stop.changed() => return,
            r = target.probe.probe() => r,
        };
        let transition = target.state.on_probe(&result);
        let report = ProbeReport {
            key: target.key.clone(),
            seq,
            result,
            status: target.state.status(),
            transition,
        };
        seq += 1;
        tokio::select! {
            biased;
            _ = stop.changed() => return,
            sent = reports.send(report) => if sent.is_err() { return },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{IpAddr, Ipv4Addr};
    use tokio::net::TcpListener;

    const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

    fn pass() -> ProbeResult {
        ProbeResult::pass(Duration::from_millis(1))
    }

    fn fail() -> ProbeResult {
        ProbeResult::fail(Duration::from_secs(1), Duration::ZERO, "refused")
    }

    #[test]
    fn fall_takes_up_down_and_a_pass_resets_the_count() {
        let mut h = HealthState::new(2, 3);
        assert_eq!(h.status(), HealthStatus::Up);
        assert_eq!(h.on_probe(&fail()), None);
        assert_eq!(h.on_probe(&fail()), None);
        assert_eq!(h.on_probe(&pass()), None, "a pass resets the failure count");
        assert_eq!(h.on_probe(&fail()), None);
        assert_eq!(h.on_probe(&fail()), None);
        assert_eq!(
            h.on_probe(&fail()),
            Some(Transition {
                from: HealthStatus::Up,
                to: HealthStatus::Down
            })
        );
        assert_eq!(h.consecutive_failures(), 3);
    }

    #[test]
    fn rise_brings_down_to_probation_then_up() {
        let mut h = HealthState::new_down(2, 3);
        assert_eq!(h.on_probe(&pass()), None);
        assert_eq!(h.on_probe(&fail()), None, "a failure resets the pass count");
        assert_eq!(h.on_probe(&pass()), None);
        assert_eq!(
            h.on_probe(&pass()).map(|t| t.to),
            Some(HealthStatus::Probation)
        );
        assert!(h.status().serving());
        assert_eq!(h.on_probe(&pass()), None);
        assert_eq!(h.on_probe(&pass()).map(|t| t.to), Some(HealthStatus::Up));
    }

    #[test]
    fn one_failure_on_probation_goes_back_down() {
        let mut h = HealthState::new_down(1, 5);
        assert_eq!(
            h.on_probe(&pass()).map(|t| t.to),
            Some(HealthStatus::Probation)
        );
        assert_eq!(
            h.on_probe(&fail()),
            Some(Transition {
                from: HealthStatus::Probation,
                to: HealthStatus::Down
            })
        );
        assert!(!h.status().serving());
    }

    #[test]
    fn draining_overrides_probes_which_keep_counting() {
        let mut h = HealthState::new(1, 2);
        assert_eq!(h.drain().map(|t| t.to), Some(HealthStatus::Draining));
        assert_eq!(h.drain(), None, "draining twice is no change");
        assert_eq!(h.on_probe(&fail()), None);
        assert_eq!(h.on_probe(&fail()), None, "still draining");
        assert_eq!(h.probed_status(), HealthStatus::Down);
        assert_eq!(
            h.undrain(),
            Some(Transition {
                from: HealthStatus::Draining,
                to: HealthStatus::Down
            })
        );
        let mut h = HealthState::new(1, 2);
        h.drain();
        assert_eq!(h.undrain().map(|t| t.to), Some(HealthStatus::Up));
    }

    fn admitting(state: HealthState) -> HealthState {
        state.with_admission(
            Admission {
                slow_start: Duration::from_secs(10),
                ejection_base: Duration::from_secs(10),
                ejection_max: Duration::from_secs(25),
                ejection_forget: Duration::from_secs(100),
            },
            Duration::from_millis(500),
            Duration::from_secs(1),
        )
    }

    fn slow_pass() -> ProbeResult {
        ProbeResult::pass(Duration::from_millis(600))
    }

    #[test]
    fn pending_takes_no_flows_until_its_first_pass() {
        let now = Instant::now();
        let mut fresh = admitting(HealthState::pending(2, 3, false));
        assert_eq!(fresh.status(), HealthStatus::Pending);
        assert!(!fresh.status().serving());
        assert_eq!(fresh.share(now), 0.0);
        assert_eq!(
            fresh.on_probe_at(&pass(), now).map(|t| t.to),
            Some(HealthStatus::Up)
        );
        assert_eq!(fresh.share(now), 1.0, "a fresh start is up at once");
        let mut added = admitting(HealthState::pending(2, 3, true));
        assert_eq!(
            added.on_probe_at(&pass(), now).map(|t| t.to),
            Some(HealthStatus::Probation),
            "a backend added to a running VIP ramps"
        );
        assert!(
            added.share(now) < 1e-9,
            "from nothing: {}",
            added.share(now)
        );
        let mut missing = admitting(HealthState::pending(2, 3, true));
        assert_eq!(
            missing.on_probe_at(&fail(), now).map(|t| t.to),
            Some(HealthStatus::Down)
        );
        assert_eq!(
            missing.recent_ejections(now),
            0,
            "it never served: not an ejection"
        );
        assert_eq!(missing.held_for(now), None);
    }

    #[test]
    fn ejections_hold_longer_each_recent_time_capped_and_forgotten() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut h = admitting(HealthState::new(1, 1));
        h.on_probe_at(&fail(), at(0));
        assert_eq!(h.recent_ejections(at(0)), 1);
        assert_eq!(h.held_for(at(0)), Some(Duration::from_secs(10)));
        assert_eq!(
            h.on_probe_at(&pass(), at(5)),
            None,
            "held: passes do not bring it back"
        );
        assert_eq!(h.held_for(at(5)), Some(Duration::from_secs(5)));
        assert_eq!(
            h.on_probe_at(&pass(), at(10)).map(|t| t.to),
            Some(HealthStatus::Probation)
        );
        // On its ramp a failure first drops it to its floor; failing there ejects it.
        h.on_probe_at(&fail(), at(10));
        assert_eq!(h.status(), HealthStatus::Probation);
        h.on_probe_at(&fail(), at(12));
        assert_eq!(h.status(), HealthStatus::Down);
        assert_eq!(h.recent_ejections(at(12)), 2);
        assert_eq!(
            h.held_for(at(12)),
            Some(Duration::from_secs(20)),
            "base x 2"
        );
        h.on_probe_at(&pass(), at(32));
        h.on_probe_at(&fail(), at(32));
        h.on_probe_at(&fail(), at(33));
        assert_eq!(h.held_for(at(33)), Some(Duration::from_secs(25)), "capped");
        assert_eq!(
            h.recent_ejections(at(200)),
            0,
            "forgotten after the quiet period"
        );
        h.on_probe_at(&pass(), at(200));
        h.on_probe_at(&fail(), at(200));
        h.on_probe_at(&fail(), at(201));
        assert_eq!(h.recent_ejections(at(201)), 1);
        assert_eq!(h.held_for(at(201)), Some(Duration::from_secs(10)));
    }

    #[test]
    fn slow_start_ramps_over_time_and_falls_back_when_probes_degrade() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut h = admitting(HealthState::new_down(1, 3));
        h.on_probe_at(&pass(), at(0));
        assert_eq!(h.status(), HealthStatus::Probation);
        assert!((h.share(at(4000)) - 0.4).abs() < 1e-9);
        assert_eq!(h.ramp_position(at(4000)), h.share(at(4000)).into());
        // Slow but passing at 40 %: halved, and held for one slow start.
        assert_eq!(h.on_probe_at(&slow_pass(), at(4000)), None);
        assert!((h.share(at(4000)) - 0.2).abs() < 1e-9);
        assert!((h.share(at(13_999)) - 0.2).abs() < 1e-9, "held");
        // Another degraded probe right after is the same episode (the queue drains).
        h.on_probe_at(&fail(), at(4500));
        assert!((h.share(at(5000)) - 0.2).abs() < 1e-9);
        assert_eq!(
            h.status(),
            HealthStatus::Probation,
            "one failure is not fall"
        );
        // Later, a second episode: halved again and held twice as long.
        h.on_probe_at(&slow_pass(), at(7000));
        assert!((h.share(at(7000)) - 0.1).abs() < 1e-9);
        assert!((h.share(at(26_999)) - 0.1).abs() < 1e-9);
        assert!((h.share(at(32_000)) - 0.6).abs() < 1e-9, "ramping again");
        // Clean probes until full share: up.
        assert_eq!(
            h.on_probe_at(&pass(), at(37_000)).map(|t| t.to),
            Some(HealthStatus::Up)
        );
        assert_eq!(h.share(at(37_000)), 1.0);
        assert_eq!(h.ramp_position(at(37_000)), None);
    }

    /// A backend (rise 1, fall 2) whose ramp began at 0 ms, and the clock in ms from then.
    fn ramping_from_0() -> (HealthState, impl Fn(u64) -> Instant) {
        let t0 = Instant::now();
        let mut h = admitting(HealthState::new_down(1, 2));
        h.on_probe_at(&pass(), t0);
        (h, move |ms: u64| t0 + Duration::from_millis(ms))
    }

    /// Issue 25: failures above the ramp's floor are the queue its share built, not a dead
    /// backend: they lower the share; only `fall` failures once it has been at the floor for
    /// `fall` probe intervals eject it.
    #[test]
    fn fall_failures_on_a_ramp_eject_only_at_its_floor() {
        let (mut h, at) = ramping_from_0();
        // At 30 % its queue overflows: failures halve the share, once per two intervals.
        for ms in [3000, 3500, 4000, 5000, 7000, 9000] {
            assert_eq!(h.on_probe_at(&fail(), at(ms)), None, "at {ms} ms");
        }
        assert!((h.share(at(9000)) - MIN_RAMP_SHARE).abs() < 1e-9);
        // At its floor since 9 s: one more interval is not yet `fall` of them.
        assert_eq!(h.on_probe_at(&fail(), at(10_000)), None);
        assert_eq!(
            h.on_probe_at(&fail(), at(11_000)).map(|t| t.to),
            Some(HealthStatus::Down),
            "failing at its floor: it cannot serve at all"
        );
        assert_eq!(h.recent_ejections(at(11_000)), 1);
    }

    #[test]
    fn a_pass_at_the_floor_keeps_a_ramp_in() {
        let (mut h, at) = ramping_from_0();
        h.on_probe_at(&fail(), at(100));
        assert!(
            (h.share(at(100)) - MIN_RAMP_SHARE).abs() < 1e-9,
            "floor at once"
        );
        h.on_probe_at(&fail(), at(1500));
        h.on_probe_at(&pass(), at(3000));
        h.on_probe_at(&fail(), at(3500));
        assert_eq!(
            h.status(),
            HealthStatus::Probation,
            "the pass reset the count"
        );
        assert_eq!(
            h.on_probe_at(&fail(), at(4000)).map(|t| t.to),
            Some(HealthStatus::Down)
        );
    }

    #[test]
    fn status_lines() {
        assert_eq!(parse_status_line(b"HTTP/1.1 200 OK").unwrap(), 200);
        assert_eq!(parse_status_line(b"HTTP/1.0 503").unwrap(), 503);
        assert!(parse_status_line(b"SSH-2.0-OpenSSH").is_err());
        assert!(parse_status_line(b"HTTP/1.1 20 OK").is_err());
    }

    #[tokio::test]
    async fn tcp_probe_passes_against_a_listener() {
        let l = TcpListener::bind((LOCAL, 0)).await.unwrap();
        let p = TcpProbe {
            addr: l.local_addr().unwrap(),
            timeout: Duration::from_secs(2),
        };
        let r = p.probe().await;
        assert!(r.ok, "{r:?}");
        assert!(r.error.is_none());
        assert!(r.latency < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn tcp_probe_on_a_closed_port_fails_at_the_timeout_latency() {
        let l = TcpListener::bind((LOCAL, 0)).await.unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let timeout = Duration::from_millis(700);
        let started = Instant::now();
        let r = TcpProbe { addr, timeout }.probe().await;
        assert!(!r.ok);
        assert!(
            started.elapsed() < timeout,
            "refused at once, not timed out"
        );
        assert_eq!(r.latency, timeout, "a fast failure counts as the timeout");
        let e = r.error.unwrap();
        assert!(e.contains("refused"), "{e}");
    }

    /// A one-connection-at-a-time HTTP server answering every request with `status`.
    async fn http_server(status: u16) -> SocketAddr {
        let l = TcpListener::bind((LOCAL, 0)).await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let mut buf = [0u8; 1024];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                assert!(got.starts_with(b"GET /healthz HTTP/1.1\r\n"));
                let body = format!("HTTP/1.1 {status} X\r\nContent-Length: 0\r\n\r\n");
                let _ = s.write_all(body.as_bytes()).await;
            }
        });
        addr
    }

    fn http(addr: SocketAddr, timeout: Duration) -> HttpProbe {
        HttpProbe {
            addr,
            path: "/healthz".into(),
            expected_status: 200,
            timeout,
        }
    }

    #[tokio::test]
    async fn http_probe_checks_the_status() {
        let ok = http(http_server(200).await, Duration::from_secs(2))
            .probe()
            .await;
        assert!(ok.ok, "{ok:?}");
        let t = Duration::from_secs(2);
        let bad = http(http_server(500).await, t).probe().await;
        assert!(!bad.ok);
        assert_eq!(bad.latency, t);
        let e = bad.error.unwrap();
        assert!(e.contains("status 500, expected 200"), "{e}");
    }

    #[tokio::test]
    async fn http_probe_times_out_against_a_silent_listener() {
        // The kernel completes the handshake; nobody ever answers.
        let l = TcpListener::bind((LOCAL, 0)).await.unwrap();
        let timeout = Duration::from_millis(300);
        let started = Instant::now();
        let r = http(l.local_addr().unwrap(), timeout).probe().await;
        assert!(!r.ok);
        assert!(started.elapsed() >= timeout);
        assert_eq!(r.latency, timeout);
        assert!(r.error.unwrap().contains("timed out"));
    }

    /// The agent's thread blocked (an apply, a fit) while probes are in flight: the latencies
    /// measured are the network's, not the block's. On the caller's runtime every probe
    /// answered during the block measured until the block ended.
    #[tokio::test(flavor = "current_thread")]
    async fn a_blocked_caller_does_not_inflate_probe_latencies() {
        let l = TcpListener::bind((LOCAL, 0)).await.unwrap();
        let port = l.local_addr().unwrap().port();
        let cfg = HealthConfig {
            interval: Duration::from_millis(20),
            timeout: Duration::from_millis(20),
            port,
            ..HealthConfig::default()
        };
        let targets = (0..4)
            .map(|i| ProbeTarget::new(i, LOCAL, &cfg))
            .collect::<Vec<_>>();
        let (tx, mut rx) = mpsc::channel(1024);
        let prober = Prober::spawn(targets, tx);
        // The listener is never polled; the kernel completes the handshakes (backlog).
        for _ in 0..5 {
            std::thread::sleep(Duration::from_millis(60));
            tokio::task::yield_now().await;
        }
        let mut seen = 0;
        while let Ok(r) = rx.try_recv() {
            assert!(r.result.ok, "{r:?}");
            assert!(
                r.result.latency < Duration::from_millis(15),
                "probe {} measured {:?} while its caller was blocked",
                r.seq,
                r.result.latency
            );
            seen += 1;
        }
        assert!(
            seen >= 20,
            "{seen} probes in 300 ms at 4 backends every 20 ms"
        );
        prober.shutdown().await;
        drop(l);
    }

    #[tokio::test]
    async fn prober_reports_each_backend_and_stops() {
        let up = TcpListener::bind((LOCAL, 0)).await.unwrap();
        let gone = TcpListener::bind((LOCAL, 0)).await.unwrap();
        let gone_port = gone.local_addr().unwrap().port();
        drop(gone);
        let cfg = |port| HealthConfig {
            interval: Duration::from_millis(50),
            timeout: Duration::from_millis(40),
            rise: 1,
            fall: 2,
            port,
            ..HealthConfig::default()
        };
        let targets = vec![
            ProbeTarget::new("up", LOCAL, &cfg(up.local_addr().unwrap().port())),
            ProbeTarget::new("gone", LOCAL, &cfg(gone_port)),
        ];
        let (tx, mut rx) = mpsc::channel(4);
        let prober = Prober::spawn(targets, tx);
        assert_eq!(prober.len(), 2);
        let mut up_seen = 0;
        let mut gone_down = false;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while up_seen < 3 || !gone_down {
            let r = tokio::time::timeout_at(deadline, rx.recv())
                .await
                .expect("reports within 10 s")
                .unwrap();
            match r.key {
                "up" => {
                    assert!(r.result.ok, "{r:?}");
                    assert_eq!(r.status, HealthStatus::Up);
                    up_seen += 1;
                }
                _ => {
                    assert!(!r.result.ok);
                    assert_eq!(r.result.latency, Duration::from_millis(40));
                    if r.seq == 1 {
                        assert_eq!(r.transition.map(|t| t.to), Some(HealthStatus::Down));
                    }
                    gone_down |= r.status == HealthStatus::Down;
                }
            }
        }
        prober.shutdown().await;
        // Every sender is gone with the tasks: the channel drains and closes.
        while rx.recv().await.is_some() {}
    }
}
