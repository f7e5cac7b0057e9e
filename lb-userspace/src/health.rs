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

/// One backend's health-check settings.
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
        }
    }
}

impl HealthConfig {
    /// The problem with these settings, phrased for the operator, if any.
    pub fn validate(&self) -> Result<(), String> {
        if self.timeout.is_zero() {
            return Err("health check timeout must be above 0".into());
        }
        if self.interval < self.timeout {
            return Err(format!(
                "health check interval ({:?}) must be at least the timeout ({:?}), so that probes of one backend never overlap",
                self.interval, self.timeout
            ));
        }
        if self.rise == 0 || self.fall == 0 {
            return Err("health check rise and fall must be at least 1".into());
        }
        if self.kind == ProbeKind::Http {
            if !self.path.starts_with('/') || self.path.bytes().any(|b| b <= b' ' || b == 0x7f) {
                return Err(format!(
                    "health check path {:?} must start with '/' and contain no spaces or control characters",
                    self.path
                ));
            }
            if !(100..=599).contains(&self.expected_status) {
                return Err(format!(
                    "health check expected_status {} is not an HTTP status (100..=599)",
                    self.expected_status
                ));
            }
        }
        Ok(())
    }

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
    /// Was down, passed `rise` consecutive probes: back in the table on a slow start (the weight
    /// model ramps it up from its floor). One failure sends it back down; `rise` more passes make
    /// it up.
    Probation,
    /// Taken out of rotation by the operator or the agent: no new flows, tracked flows continue.
    /// Probes still run underneath, so undraining returns to what they say.
    Draining,
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
        }
    }
}

impl fmt::Display for HealthStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The health state machine of one backend: pure, driven only by probe outcomes and by
/// drain/undrain calls, so it is tested without a network and without a clock.
///
/// ```text
///            fall consecutive failures
///   Up ─────────────────────────────────▶ Down
///   ▲                                      │ rise consecutive passes
///   │ rise more consecutive passes         ▼
///   └────────────────────────────── Probation ──(one failure)──▶ Down
///
///   drain(): any state ─▶ Draining (probes keep counting underneath)
///   undrain(): Draining ─▶ the state the probes put it in meanwhile
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
}

/// A change of status, returned by the calls that cause one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transition {
    pub from: HealthStatus,
    pub to: HealthStatus,
}

impl HealthState {
    /// A configured backend starts up (as without health checks): `fall` failures take it down.
    pub fn new(rise: u32, fall: u32) -> Self {
        Self::starting(HealthStatus::Up, rise, fall)
    }

    /// A backend that starts down, for example one added while its service is still starting:
    /// it needs `rise` passes to enter probation.
    pub fn new_down(rise: u32, fall: u32) -> Self {
        Self::starting(HealthStatus::Down, rise, fall)
    }

    fn starting(probed: HealthStatus, rise: u32, fall: u32) -> Self {
        HealthState {
            rise: rise.max(1),
            fall: fall.max(1),
            probed,
            draining: false,
            passes: 0,
            failures: 0,
        }
    }

    pub fn status(&self) -> HealthStatus {
        if self.draining {
            HealthStatus::Draining
        } else {
            self.probed
        }
    }

    /// What the probes alone say (`Up`, `Down` or `Probation`), draining or not.
    pub fn probed_status(&self) -> HealthStatus {
        self.probed
    }

    pub fn consecutive_passes(&self) -> u32 {
        self.passes
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.failures
    }

    /// Feeds one probe outcome; returns the change of `status()` it caused, if any.
    pub fn on_probe(&mut self, result: &ProbeResult) -> Option<Transition> {
        let before = self.status();
        if result.ok {
            self.passes = self.passes.saturating_add(1);
            self.failures = 0;
            match self.probed {
                HealthStatus::Down if self.passes >= self.rise => {
                    self.probed = HealthStatus::Probation;
                    self.passes = 0;
                }
                HealthStatus::Probation if self.passes >= self.rise => {
                    self.probed = HealthStatus::Up;
                    self.passes = 0;
                }
                _ => {}
            }
        } else {
            self.failures = self.failures.saturating_add(1);
            self.passes = 0;
            match self.probed {
                HealthStatus::Up if self.failures >= self.fall => {
                    self.probed = HealthStatus::Down;
                }
                // On probation a single failure is enough: the backend has just come back.
                HealthStatus::Probation => self.probed = HealthStatus::Down,
                _ => {}
            }
        }
        self.changed(before)
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
            state: HealthState::new(config.rise, config.fall),
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
                let offset = target.interval / n * i as u32;
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

    #[test]
    fn config_validation() {
        let mut c = HealthConfig::default();
        assert_eq!(c.validate(), Ok(()));
        c.interval = Duration::from_millis(100);
        assert!(c.validate().unwrap_err().contains("interval"));
        c = HealthConfig {
            kind: ProbeKind::Http,
            path: "/a b".into(),
            ..HealthConfig::default()
        };
        assert!(c.validate().unwrap_err().contains("path"));
        c.path = "/healthz".into();
        c.expected_status = 42;
        assert!(c.validate().unwrap_err().contains("expected_status"));
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
