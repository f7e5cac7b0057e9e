//! `lb-loadgen`: open-loop HTTP load whose latencies are corrected for coordinated omission,
//! plus optional long-lived keep-alive connections that check they stay on one backend.
//!
//! ```text
//! lb-loadgen --target ADDR:PORT --rate R --duration-s D --seed N [--noise F] [--noise-period-s P]
//!            [--timeout-ms T] [--out FILE.csv] [--keepalive-conns C --keepalive-interval-ms I]
//!            [--rate-file FILE]
//! ```
//!
//! * Start times are a Poisson process of rate `R × (1 + F × u_k)`, `u_k` uniform in [-1, 1]
//!   drawn anew every P seconds (default F = 0, P = 10). Gaps and `u_k` come from splitmix64
//!   streams seeded by N, so a run is reproducible by its seed. With `--rate-file`, the file
//!   is re-read every 200 ms (of schedule time) and a number in it replaces R; since the
//!   exponential gap is memoryless, redrawing it at every rate change point keeps the process
//!   exactly Poisson with the piecewise-constant rate.
//! * Every request is sent at its scheduled time whatever is still outstanding (in flight is
//!   capped at 20000; beyond that the request is an `overflow` error): a new TCP connection,
//!   `GET / HTTP/1.1` with `Connection: close`, the whole response read. Its latency is
//!   completion − SCHEDULED start, so a late generator or a slow connect counts: that is the
//!   coordinated-omission correction. The whole request has `--timeout-ms` (default 2000).
//!   Errors: `refused`, `reset`, `timeout`, `http5xx` (status ≥ 500, latency still recorded),
//!   `other` (any other failure or a non-2xx status), `overflow`.
//! * `--out FILE.csv`: one line per request in schedule order, header
//!   `sched_ms,latency_us,status,backend,error` (sched_ms: integer ms since the start; status 0
//!   without a response; backend from `X-Backend`, else the body's first line; error empty on
//!   success).
//! * `--keepalive-conns C`: C connections opened evenly over the first interval, each sending a
//!   keep-alive `GET /` every I ms (default 1000) for the whole run and checking that every
//!   answer is a 200 from the backend that answered its first request. A failed request
//!   (error, reset, EOF, non-200, timeout) counts in `failed`; a broken connection is opened
//!   again at the next tick and its first answer becomes the new reference; an answer from
//!   another backend counts in `moved`.
//! * Prints one JSON line: `{"sent","ok","errors":{...all six kinds...},"p50_ms","p90_ms",
//!   "p99_ms","p999_ms","max_ms","throughput_rps","max_sched_lag_ms","keepalive":{"conns",
//!   "requests","failed","moved"}}`; percentiles are over successful requests (0 when there are
//!   none), throughput is ok / D. Exits 0 whatever the requests did (the caller judges), 2 on
//!   usage errors, 1 if the CSV cannot be written. Ends within D + T + 1.5 s.
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::time::Instant;

const USAGE: &str = "usage: lb-loadgen --target ADDR:PORT --rate R --duration-s D --seed N \
[--noise F] [--noise-period-s P] [--timeout-ms T] [--out FILE.csv] \
[--keepalive-conns C --keepalive-interval-ms I] [--rate-file FILE]";

/// Requests allowed in flight at once; more are counted as `overflow` errors, not sent.
const MAX_IN_FLIGHT: usize = 20_000;
/// How often (of schedule time) `--rate-file` is re-read.
const RATE_FILE_PERIOD: f64 = 0.2;
/// Largest response accepted (head + body).
const MAX_RESPONSE: usize = 1 << 20;

const CLOSE_REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n";
const KEEPALIVE_REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: lb\r\n\r\n";

#[derive(Clone, Debug)]
struct Args {
    target: SocketAddr,
    rate: f64,
    duration_s: f64,
    seed: u64,
    noise: f64,
    noise_period_s: f64,
    timeout: Duration,
    out: Option<PathBuf>,
    ka_conns: usize,
    ka_interval: Duration,
    rate_file: Option<PathBuf>,
}

fn parse_args(argv: impl Iterator<Item = String>) -> Result<Args, String> {
    let (mut target, mut rate, mut duration, mut seed) = (None, None, None, None);
    let (mut noise, mut period, mut timeout_ms, mut out) = (0.0f64, 10.0f64, 2000u64, None);
    let (mut ka_conns, mut ka_interval_ms, mut rate_file) = (0usize, 1000u64, None);
    let mut it = argv;
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            return Err(String::new());
        }
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let bad = |what: &str| format!("{flag} {value}: {what}");
        let num = |v: &str| -> Result<f64, String> {
            v.parse::<f64>()
                .ok()
                .filter(|f| f.is_finite() && *f >= 0.0)
                .ok_or_else(|| bad("not a number >= 0"))
        };
        match flag.as_str() {
            "--target" => target = Some(value.parse().map_err(|_| bad("not an ADDR:PORT"))?),
            "--rate" => rate = Some(num(&value)?),
            "--duration-s" => duration = Some(num(&value)?),
            "--seed" => seed = Some(value.parse::<u64>().map_err(|_| bad("not an integer"))?),
            "--noise" => noise = num(&value)?,
            "--noise-period-s" => period = num(&value)?,
            "--timeout-ms" => timeout_ms = value.parse().map_err(|_| bad("not an integer"))?,
            "--out" => out = Some(PathBuf::from(value)),
            "--keepalive-conns" => ka_conns = value.parse().map_err(|_| bad("not a count"))?,
            "--keepalive-interval-ms" => {
                ka_interval_ms = value.parse().map_err(|_| bad("not an integer"))?
            }
            "--rate-file" => rate_file = Some(PathBuf::from(value)),
            _ => return Err(format!("unknown option {flag}")),
        }
    }
    if period <= 0.0 {
        return Err("--noise-period-s must be > 0".into());
    }
    if ka_interval_ms == 0 {
        return Err("--keepalive-interval-ms must be > 0".into());
    }
    if timeout_ms == 0 {
        return Err("--timeout-ms must be > 0".into());
    }
    Ok(Args {
        target: target.ok_or("--target is required")?,
        rate: rate.ok_or("--rate is required")?,
        duration_s: duration.ok_or("--duration-s is required")?,
        seed: seed.ok_or("--seed is required")?,
        noise,
        noise_period_s: period,
        timeout: Duration::from_millis(timeout_ms),
        out,
        ka_conns,
        ka_interval: Duration::from_millis(ka_interval_ms),
        rate_file,
    })
}

/// splitmix64: a tiny, well-mixed generator; `seed` fully determines the stream.
struct SplitMix(u64);

impl SplitMix {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Exponential with mean 1.
    fn exp1(&mut self) -> f64 {
        -(1.0 - self.uniform()).ln()
    }
}

/// `u_k` of the rate noise: uniform in [-1, 1], a pure function of the seed and the period
/// index (a stream separate from the gaps, so F does not change the gap sequence's draws).
fn noise_u(seed: u64, k: u64) -> f64 {
    let mut g = SplitMix(seed ^ 0xd1b5_4a32_d192_ed03u64.wrapping_mul(k.wrapping_add(1)));
    g.next_u64();
    g.uniform() * 2.0 - 1.0
}

/// The Poisson schedule: start times (seconds since the start) of successive requests.
struct Schedule {
    gaps: SplitMix,
    seed: u64,
    base: f64,
    noise: f64,
    period: f64,
    duration: f64,
    rate_file: Option<PathBuf>,
    /// Schedule time reached so far.
    t: f64,
}

/// What the scheduler should do next.
#[derive(Debug, PartialEq)]
enum Next {
    /// Send a request at this schedule time.
    Request(f64),
    /// Nothing before this rate change point: wait until then, call [`Schedule::at_boundary`],
    /// then ask again.
    Boundary(f64),
    /// The run is over.
    End,
}

impl Schedule {
    fn rate(&self) -> f64 {
        let k = (self.t / self.period).floor() as u64;
        (self.base * (1.0 + self.noise * noise_u(self.seed, k))).max(0.0)
    }

    /// The next point where the rate may change (noise period, rate-file read, end of run).
    fn boundary(&self) -> f64 {
        // The next multiple of `period` strictly after `t`: with floating point, `t / period`
        // for a `t` that is itself a boundary can round down and give `t` back, and a schedule
        // that does not advance spins forever.
        let after = |period: f64| {
            let mut b = ((self.t / period).floor() + 1.0) * period;
            while b <= self.t {
                b += period;
            }
            b
        };
        let mut b = after(self.period);
        if self.rate_file.is_some() {
            b = b.min(after(RATE_FILE_PERIOD));
        }
        b.min(self.duration)
    }

    fn next(&mut self) -> Next {
        if self.t >= self.duration {
            return Next::End;
        }
        let boundary = self.boundary();
        let rate = self.rate();
        if rate > 0.0 {
            let cand = self.t + self.gaps.exp1() / rate;
            if cand < boundary {
                self.t = cand;
                return Next::Request(cand);
            }
        }
        // Memoryless: the draw that overshot is discarded and a fresh one starts at the boundary.
        self.t = boundary;
        Next::Boundary(boundary)
    }

    /// Re-reads the rate file (if any) once the schedule has reached a boundary in real time.
    fn at_boundary(&mut self) {
        if let Some(r) = self.rate_file.as_deref().and_then(read_rate) {
            self.base = r;
        }
    }
}

/// The number in the rate file, if it exists and holds one (≥ 0).
fn read_rate(path: &std::path::Path) -> Option<f64> {
    std::fs::read_to_string(path)
        .ok()?
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|r| r.is_finite() && *r >= 0.0)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ErrKind {
    Refused,
    Reset,
    Timeout,
    Http5xx,
    Other,
    Overflow,
}

const KINDS: [ErrKind; 6] = [
    ErrKind::Refused,
    ErrKind::Reset,
    ErrKind::Timeout,
    ErrKind::Http5xx,
    ErrKind::Other,
    ErrKind::Overflow,
];

impl ErrKind {
    fn name(self) -> &'static str {
        match self {
            ErrKind::Refused => "refused",
            ErrKind::Reset => "reset",
            ErrKind::Timeout => "timeout",
            ErrKind::Http5xx => "http5xx",
            ErrKind::Other => "other",
            ErrKind::Overflow => "overflow",
        }
    }

    fn of_io(e: &std::io::Error) -> ErrKind {
        use std::io::ErrorKind as K;
        match e.kind() {
            K::ConnectionRefused => ErrKind::Refused,
            K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe => ErrKind::Reset,
            K::TimedOut => ErrKind::Timeout,
            _ => ErrKind::Other,
        }
    }
}

/// One open-loop request's outcome.
#[derive(Clone, Debug)]
struct Record {
    sched: Duration,
    latency: Duration,
    status: u16,
    backend: String,
    error: Option<ErrKind>,
}

/// A parsed HTTP response.
#[derive(Debug, PartialEq)]
struct Response {
    status: u16,
    backend: String,
    close: bool,
}

/// Parses a complete response in `buf` if there is one: `Ok(None)` means more bytes are
/// needed (`eof` says none will come, so a response without Content-Length ends here).
fn parse_response(buf: &[u8], eof: bool) -> Result<Option<Response>, ()> {
    let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return if eof { Err(()) } else { Ok(None) };
    };
    let head = std::str::from_utf8(&buf[..head_end]).map_err(|_| ())?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().ok_or(())?;
    let mut parts = status_line.split(' ');
    if !parts.next().ok_or(())?.starts_with("HTTP/1.") {
        return Err(());
    }
    let status: u16 = parts.next().ok_or(())?.parse().map_err(|_| ())?;
    let (mut len, mut backend, mut close) = (None, None, false);
    for line in lines {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let (k, v) = (k.trim(), v.trim());
        if k.eq_ignore_ascii_case("content-length") {
            len = Some(v.parse::<usize>().map_err(|_| ())?);
        } else if k.eq_ignore_ascii_case("x-backend") {
            backend = Some(v.to_string());
        } else if k.eq_ignore_ascii_case("connection") && v.eq_ignore_ascii_case("close") {
            close = true;
        }
    }
    let body_start = head_end + 4;
    let body = match len {
        Some(n) if buf.len() >= body_start + n => &buf[body_start..body_start + n],
        Some(_) => return if eof { Err(()) } else { Ok(None) },
        None if eof => &buf[body_start..],
        None => return Ok(None),
    };
    let backend = backend.unwrap_or_else(|| {
        String::from_utf8_lossy(body)
            .lines()
            .next()
            .unwrap_or("")
            .trim()
            .to_string()
    });
    Ok(Some(Response {
        status,
        backend,
        close: close || len.is_none(),
    }))
}

/// Sends `request` on `sock` and reads one response.
async fn exchange(sock: &mut TcpStream, request: &[u8]) -> Result<Response, ErrKind> {
    sock.write_all(request)
        .await
        .map_err(|e| ErrKind::of_io(&e))?;
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 4096];
    loop {
        let n = sock
            .read(&mut chunk)
            .await
            .map_err(|e| ErrKind::of_io(&e))?;
        buf.extend_from_slice(&chunk[..n]);
        match parse_response(&buf, n == 0) {
            Ok(Some(r)) => return Ok(r),
            Ok(None) if buf.len() <= MAX_RESPONSE => {}
            // EOF before any byte: the server closed without answering.
            Ok(None) | Err(()) => return Err(ErrKind::Other),
        }
    }
}

/// One open-loop request scheduled at `start + sched`.
async fn one_request(
    target: SocketAddr,
    start: Instant,
    sched: Duration,
    timeout: Duration,
    lag_us: Arc<AtomicU64>,
) -> Record {
    let sched_at = start + sched;
    let begin = Instant::now();
    lag_us.fetch_max(
        begin.saturating_duration_since(sched_at).as_micros() as u64,
        Ordering::Relaxed,
    );
    let mut sock_slot = None;
    let result = tokio::time::timeout_at(begin + timeout, async {
        let sock = sock_slot.insert(
            TcpStream::connect(target)
                .await
                .map_err(|e| ErrKind::of_io(&e))?,
        );
        let _ = sock.set_nodelay(true);
        exchange(sock, CLOSE_REQUEST).await
    })
    .await;
    let done = Instant::now();
    let latency = done.saturating_duration_since(sched_at);
    let record = |status, backend, error| Record {
        sched,
        latency,
        status,
        backend,
        error,
    };
    let rec = match result {
        Err(_) => record(0, String::new(), Some(ErrKind::Timeout)),
        Ok(Err(kind)) => record(0, String::new(), Some(kind)),
        Ok(Ok(r)) => {
            let error = match r.status {
                200..=299 => None,
                500.. => Some(ErrKind::Http5xx),
                _ => Some(ErrKind::Other),
            };
            record(r.status, r.backend, error)
        }
    };
    if let (Some(mut sock), None) = (sock_slot, rec.error) {
        // Let the server close first (it was asked to) so TIME_WAIT stays on its side and a
        // long run does not exhaust this side's ephemeral ports; the answer is already timed.
        tokio::spawn(async move {
            let mut sink = [0u8; 512];
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                while matches!(sock.read(&mut sink).await, Ok(n) if n > 0) {}
            })
            .await;
        });
    }
    rec
}

#[derive(Default)]
struct KeepAliveStats {
    requests: AtomicU64,
    failed: AtomicU64,
    moved: AtomicU64,
}

/// One long-lived keep-alive connection, opened at `first`, one request per `interval` until
/// `end`; each request has `timeout`.
async fn keepalive_conn(
    target: SocketAddr,
    first: Instant,
    end: Instant,
    interval: Duration,
    timeout: Duration,
    stats: Arc<KeepAliveStats>,
) {
    let mut conn: Option<TcpStream> = None;
    let mut reference: Option<String> = None;
    let mut next = first;
    while next < end {
        tokio::time::sleep_until(next).await;
        stats.requests.fetch_add(1, Ordering::Relaxed);
        let res = tokio::time::timeout(timeout, async {
            if conn.is_none() {
                let s = TcpStream::connect(target)
                    .await
                    .map_err(|e| ErrKind::of_io(&e))?;
                let _ = s.set_nodelay(true);
                conn = Some(s);
                reference = None;
            }
            exchange(conn.as_mut().unwrap(), KEEPALIVE_REQUEST).await
        })
        .await;
        match res {
            Ok(Ok(r)) => {
                if r.status != 200 {
                    stats.failed.fetch_add(1, Ordering::Relaxed);
                } else {
                    match &reference {
                        None => reference = Some(r.backend),
                        Some(b) if *b != r.backend => {
                            stats.moved.fetch_add(1, Ordering::Relaxed);
                        }
                        Some(_) => {}
                    }
                }
                if r.close {
                    conn = None;
                }
            }
            Ok(Err(_)) | Err(_) => {
                stats.failed.fetch_add(1, Ordering::Relaxed);
                conn = None;
            }
        }
        next += interval;
        // Ticks missed while a request was slow are skipped, not sent in a burst.
        let now = Instant::now();
        while next < now {
            next += interval;
        }
    }
}

/// Nearest-rank percentile of sorted `v`, in ms.
fn percentile_ms(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1].as_secs_f64() * 1000.0
}

/// Makes a backend name safe for one CSV field.
fn csv_field(s: &str) -> String {
    s.chars()
        .map(|c| {
            if matches!(c, ',' | '"' | '\n' | '\r') {
                '_'
            } else {
                c
            }
        })
        .collect()
}

fn write_csv(path: &std::path::Path, records: &[Record]) -> std::io::Result<()> {
    let mut w = std::io::BufWriter::new(std::fs::File::create(path)?);
    writeln!(w, "sched_ms,latency_us,status,backend,error")?;
    for r in records {
        writeln!(
            w,
            "{},{},{},{},{}",
            r.sched.as_millis(),
            r.latency.as_micros(),
            r.status,
            csv_field(&r.backend),
            r.error.map(ErrKind::name).unwrap_or("")
        )?;
    }
    w.flush()?;
    w.into_inner().map_err(|e| e.into_error())?.sync_all()
}

async fn run(args: Args) -> (Vec<Record>, Arc<KeepAliveStats>, Duration) {
    let start = Instant::now();
    let duration = Duration::from_secs_f64(args.duration_s);
    let end = start + duration;
    // Requests still unanswered here are counted as timeouts (each has its own timeout, so
    // only a starved runtime gets this far).
    let hard_end = end + args.timeout + Duration::from_millis(1000);

    let ka = Arc::new(KeepAliveStats::default());
    let mut ka_tasks = Vec::new();
    for i in 0..args.ka_conns {
        // Spread over one interval, so that the connections' requests arrive evenly rather
        // than as one burst per interval (500 connections at 5 s: 100 requests/s, not 500 in
        // the first second of every five).
        let first = start
            + Duration::from_secs_f64(
                args.ka_interval.as_secs_f64() * i as f64 / args.ka_conns as f64,
            );
        ka_tasks.push(tokio::spawn(keepalive_conn(
            args.target,
            first,
            end,
            args.ka_interval,
            args.timeout,
            ka.clone(),
        )));
    }

    let mut schedule = Schedule {
        gaps: SplitMix(args.seed),
        seed: args.seed,
        base: args.rate,
        noise: args.noise,
        period: args.noise_period_s,
        duration: args.duration_s,
        rate_file: args.rate_file.clone(),
        t: 0.0,
    };
    schedule.at_boundary();
    let lag_us = Arc::new(AtomicU64::new(0));
    let in_flight = Arc::new(AtomicUsize::new(0));
    let results: Arc<Mutex<Vec<Option<Record>>>> = Arc::new(Mutex::new(Vec::new()));
    let mut scheduled: Vec<Duration> = Vec::new();
    loop {
        match schedule.next() {
            Next::End => break,
            Next::Boundary(t) => {
                tokio::time::sleep_until(start + Duration::from_secs_f64(t)).await;
                schedule.at_boundary();
            }
            Next::Request(t) => {
                let sched = Duration::from_secs_f64(t);
                tokio::time::sleep_until(start + sched).await;
                let idx = scheduled.len();
                scheduled.push(sched);
                results.lock().unwrap().push(None);
                if in_flight.load(Ordering::Relaxed) >= MAX_IN_FLIGHT {
                    results.lock().unwrap()[idx] = Some(Record {
                        sched,
                        latency: Duration::ZERO,
                        status: 0,
                        backend: String::new(),
                        error: Some(ErrKind::Overflow),
                    });
                    continue;
                }
                in_flight.fetch_add(1, Ordering::Relaxed);
                let (results, in_flight, lag_us) =
                    (results.clone(), in_flight.clone(), lag_us.clone());
                let (target, timeout) = (args.target, args.timeout);
                tokio::spawn(async move {
                    let rec = one_request(target, start, sched, timeout, lag_us).await;
                    results.lock().unwrap()[idx] = Some(rec);
                    in_flight.fetch_sub(1, Ordering::Relaxed);
                });
            }
        }
    }
    // Wait (bounded) for outstanding requests and keep-alive connections.
    while Instant::now() < hard_end {
        let ka_done = ka_tasks.iter().all(|t| t.is_finished());
        if in_flight.load(Ordering::Relaxed) == 0 && ka_done {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let finished = Instant::now();
    let slots = std::mem::take(&mut *results.lock().unwrap());
    let records = slots
        .into_iter()
        .zip(scheduled)
        .map(|(r, sched)| {
            r.unwrap_or_else(|| Record {
                sched,
                latency: finished.saturating_duration_since(start + sched),
                status: 0,
                backend: String::new(),
                error: Some(ErrKind::Timeout),
            })
        })
        .collect();
    let lag = Duration::from_micros(lag_us.load(Ordering::Relaxed));
    (records, ka, lag)
}

/// The summary line.
fn summary(args: &Args, records: &[Record], ka: &KeepAliveStats, lag: Duration) -> String {
    let mut ok: Vec<Duration> = records
        .iter()
        .filter(|r| r.error.is_none())
        .map(|r| r.latency)
        .collect();
    ok.sort_unstable();
    let errors: Vec<String> = KINDS
        .iter()
        .map(|k| {
            let n = records.iter().filter(|r| r.error == Some(*k)).count();
            format!("\"{}\":{n}", k.name())
        })
        .collect();
    let throughput = if args.duration_s > 0.0 {
        ok.len() as f64 / args.duration_s
    } else {
        0.0
    };
    format!(
        "{{\"sent\":{},\"ok\":{},\"errors\":{{{}}},\"p50_ms\":{:.3},\"p90_ms\":{:.3},\
         \"p99_ms\":{:.3},\"p999_ms\":{:.3},\"max_ms\":{:.3},\"throughput_rps\":{:.3},\
         \"max_sched_lag_ms\":{:.3},\"keepalive\":{{\"conns\":{},\"requests\":{},\"failed\":{},\
         \"moved\":{}}}}}",
        records.len(),
        ok.len(),
        errors.join(","),
        percentile_ms(&ok, 50.0),
        percentile_ms(&ok, 90.0),
        percentile_ms(&ok, 99.0),
        percentile_ms(&ok, 99.9),
        ok.last().map_or(0.0, |d| d.as_secs_f64() * 1000.0),
        throughput,
        lag.as_secs_f64() * 1000.0,
        args.ka_conns,
        ka.requests.load(Ordering::Relaxed),
        ka.failed.load(Ordering::Relaxed),
        ka.moved.load(Ordering::Relaxed),
    )
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("lb-loadgen: {e}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    tests::tcp::raise_nofile();
    // One thread: a few hundred requests per second cost a few percent of a core, and the
    // scheduler stays on the same thread as the timers it relies on.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("building the tokio runtime");
    let (records, ka, lag) = rt.block_on(run(args.clone()));
    let mut code = ExitCode::SUCCESS;
    if let Some(path) = &args.out {
        if let Err(e) = write_csv(path, &records) {
            eprintln!("lb-loadgen: writing {}: {e}", path.display());
            code = ExitCode::from(1);
        }
    }
    let line = summary(&args, &records, &ka, lag);
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
    // Lingering sockets and the keep-alive tasks are abandoned, not awaited.
    rt.shutdown_background();
    code
}

#[cfg(test)]
mod unit {
    use super::*;

    fn schedule(seed: u64, rate: f64, noise: f64, duration: f64) -> Vec<f64> {
        let mut s = Schedule {
            gaps: SplitMix(seed),
            seed,
            base: rate,
            noise,
            period: 1.0,
            duration,
            rate_file: None,
            t: 0.0,
        };
        let mut out = Vec::new();
        for _ in 0..1_000_000 {
            match s.next() {
                Next::End => return out,
                Next::Request(t) => out.push(t),
                Next::Boundary(_) => s.at_boundary(),
            }
        }
        panic!("schedule did not end");
    }

    /// A boundary that `t / period` rounds below (0.6 / 0.2 = 2.9999999999999996) must not
    /// stall the schedule.
    #[test]
    fn boundaries_always_advance() {
        let mut s = Schedule {
            gaps: SplitMix(1),
            seed: 1,
            base: 0.0,
            noise: 0.0,
            period: 0.2,
            duration: 5.0,
            rate_file: Some(PathBuf::from("/nonexistent")),
            t: 0.0,
        };
        let mut boundaries = 0;
        loop {
            match s.next() {
                Next::End => break,
                Next::Boundary(_) => boundaries += 1,
                Next::Request(_) => unreachable!("rate 0"),
            }
            assert!(boundaries < 1000, "the schedule stalled at t = {}", s.t);
        }
        assert_eq!(boundaries, 25);
    }

    #[test]
    fn schedule_is_reproducible_and_has_the_rate() {
        let a = schedule(7, 500.0, 0.0, 20.0);
        assert_eq!(a, schedule(7, 500.0, 0.0, 20.0));
        assert_ne!(a, schedule(8, 500.0, 0.0, 20.0));
        // 10000 expected, Poisson sd 100.
        assert!((9600..=10400).contains(&a.len()), "{}", a.len());
        assert!(a.windows(2).all(|w| w[0] < w[1]));
        assert!(a.iter().all(|&t| (0.0..20.0).contains(&t)));
    }

    #[test]
    fn noise_changes_the_rate_per_period() {
        let a = schedule(3, 500.0, 0.8, 40.0);
        let per_period: Vec<usize> = (0..40)
            .map(|k| {
                a.iter()
                    .filter(|&&t| t >= k as f64 && t < (k + 1) as f64)
                    .count()
            })
            .collect();
        let (lo, hi) = (
            *per_period.iter().min().unwrap(),
            *per_period.iter().max().unwrap(),
        );
        // Without noise, 500 ± ~70 per second; with F = 0.8 the spread is several times that.
        assert!(lo < 350 && hi > 650, "{per_period:?}");
        for (k, &n) in per_period.iter().enumerate() {
            let want = 500.0 * (1.0 + 0.8 * noise_u(3, k as u64));
            assert!(
                (n as f64 - want).abs() < 5.0 * want.sqrt() + 5.0,
                "{k}: {n} vs {want}"
            );
        }
    }

    #[test]
    fn responses() {
        let r = parse_response(
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nX-Backend: b1\r\n\r\nb1\n",
            false,
        )
        .unwrap()
        .unwrap();
        assert_eq!((r.status, r.backend.as_str(), r.close), (200, "b1", false));
        assert_eq!(
            parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nb", false),
            Ok(None)
        );
        let r = parse_response(b"HTTP/1.1 503 Service Unavailable\r\n\r\nb2\nmore", true)
            .unwrap()
            .unwrap();
        assert_eq!((r.status, r.backend.as_str(), r.close), (503, "b2", true));
        assert!(parse_response(b"", true).is_err());
    }

    #[test]
    fn nearest_rank() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile_ms(&v, 50.0), 50.0);
        assert_eq!(percentile_ms(&v, 99.0), 99.0);
        assert_eq!(percentile_ms(&v, 99.9), 100.0);
        assert_eq!(percentile_ms(&[], 50.0), 0.0);
    }
}
