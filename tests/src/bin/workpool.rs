//! `lb-workpool`: an HTTP/1.1 backend whose capacity is a fixed pool of worker threads, for
//! benchmarks that need a backend which saturates (queueing delay, 503s) in a known way.
//!
//! ```text
//! lb-workpool --listen ADDR:PORT [--listen ADDR:PORT ...] --workers K --service-ms S --queue Q
//!             --name NAME [--control FILE]
//! ```
//!
//! * Every request on every listener (traffic and health-probe ports alike, so probes see the
//!   same queueing as traffic) becomes a job in ONE bounded queue served by exactly K worker
//!   threads. A job holds its worker for `S × slow` ms (a blocking sleep in the worker thread),
//!   then the worker hands the answer back and the connection writes
//!   `200 OK` with body `NAME\n` and header `X-Backend: NAME`.
//! * If Q jobs are already waiting (not counting jobs an idle worker is about to take), the
//!   request is answered `503 Service Unavailable` at once, without a worker.
//! * Connections are served by a single-threaded tokio runtime: a connection costs no worker,
//!   so a keep-alive connection holds nothing between requests and connection handling adds no
//!   capacity. Keep-alive is HTTP/1.1's default; `Connection: close` (or HTTP/1.0 without
//!   `keep-alive`) gets `Connection: close` and the socket is closed after the answer.
//! * `--control FILE` is re-read every 100 ms (missing file = defaults), lines `key=value`,
//!   unknown keys ignored: `slow=F` (service-time multiplier, default 1), `error_rate=P`
//!   (fraction of requests answered `500` at once without a worker, decided by a xorshift RNG
//!   seeded from NAME so runs are reproducible), `refuse=0|1` (1 closes every listening socket,
//!   so connects are refused and the accept backlog is reset; connections already accepted are
//!   still served; 0 binds them again).
//! * Prints `ready` once every listener is bound; on SIGTERM/SIGINT prints
//!   `{"served":N,"errors500":N,"rejected503":N}` and exits 0. Nothing is logged per request.
use std::collections::VecDeque;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};

const USAGE: &str = "usage: lb-workpool --listen ADDR:PORT [--listen ADDR:PORT ...] --workers K \
--service-ms S --queue Q --name NAME [--control FILE]";

/// Largest request head accepted; anything longer is answered 400 and the connection closed.
const MAX_HEAD: usize = 64 * 1024;

struct Args {
    listen: Vec<SocketAddr>,
    workers: usize,
    service_ms: f64,
    queue: usize,
    name: String,
    control: Option<PathBuf>,
}

fn parse_args() -> Result<Args, String> {
    let mut listen = Vec::new();
    let (mut workers, mut service_ms, mut queue, mut name, mut control) =
        (None, None, None, None, None);
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            return Err(String::new());
        }
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let bad = |what: &str| format!("{flag} {value}: {what}");
        match flag.as_str() {
            "--listen" => listen.push(value.parse().map_err(|_| bad("not an ADDR:PORT"))?),
            "--workers" => workers = Some(value.parse::<usize>().map_err(|_| bad("not a count"))?),
            "--service-ms" => {
                service_ms = Some(value.parse::<f64>().map_err(|_| bad("not a number"))?)
            }
            "--queue" => queue = Some(value.parse::<usize>().map_err(|_| bad("not a count"))?),
            "--name" => name = Some(value),
            "--control" => control = Some(PathBuf::from(value)),
            _ => return Err(format!("unknown option {flag}")),
        }
    }
    let workers = workers.ok_or("--workers is required")?;
    if workers == 0 {
        return Err("--workers must be at least 1".into());
    }
    let service_ms = service_ms.ok_or("--service-ms is required")?;
    if !(service_ms.is_finite() && service_ms >= 0.0) {
        return Err("--service-ms must be a number >= 0".into());
    }
    if listen.is_empty() {
        return Err("at least one --listen is required".into());
    }
    Ok(Args {
        listen,
        workers,
        service_ms,
        queue: queue.ok_or("--queue is required")?,
        name: name.ok_or("--name is required")?,
        control,
    })
}

/// The knobs of the control file, as last read.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Control {
    slow: f64,
    error_rate: f64,
    refuse: bool,
}

impl Default for Control {
    fn default() -> Self {
        Control {
            slow: 1.0,
            error_rate: 0.0,
            refuse: false,
        }
    }
}

impl Control {
    /// Parses `key=value` lines; unknown keys and unparsable values keep the default.
    fn parse(text: &str) -> Control {
        let mut c = Control::default();
        for line in text.lines() {
            let Some((k, v)) = line.split_once('=') else {
                continue;
            };
            let v = v.trim();
            match k.trim() {
                "slow" => {
                    if let Ok(f) = v.parse::<f64>() {
                        if f.is_finite() && f >= 0.0 {
                            c.slow = f;
                        }
                    }
                }
                "error_rate" => {
                    if let Ok(f) = v.parse::<f64>() {
                        if f.is_finite() {
                            c.error_rate = f.clamp(0.0, 1.0);
                        }
                    }
                }
                "refuse" => c.refuse = v == "1" || v.eq_ignore_ascii_case("true"),
                _ => {}
            }
        }
        c
    }
}

/// One request waiting for a worker: how long it holds the worker, and where to say it is done.
struct Job {
    hold: Duration,
    done: oneshot::Sender<()>,
}

#[derive(Default)]
struct QueueState {
    jobs: VecDeque<Job>,
    /// Workers blocked waiting for a job.
    idle: usize,
}

/// The single bounded queue in front of the K workers.
struct Pool {
    state: Mutex<QueueState>,
    ready: Condvar,
    /// Jobs allowed to wait for a worker.
    max_waiting: usize,
}

impl Pool {
    /// Queues a job, or gives it back if `max_waiting` jobs are already waiting. Jobs that an
    /// idle worker will pick up at once are not waiting, so `--queue 0` still serves requests
    /// while a worker is free.
    fn submit(&self, job: Job) -> Result<(), Job> {
        let mut st = self.state.lock().unwrap();
        let waiting = st.jobs.len().saturating_sub(st.idle);
        if waiting >= self.max_waiting {
            return Err(job);
        }
        st.jobs.push_back(job);
        drop(st);
        self.ready.notify_one();
        Ok(())
    }

    /// A worker thread: takes jobs in order and holds itself (sleeps) for each job's time.
    fn work(&self) {
        loop {
            let job = {
                let mut st = self.state.lock().unwrap();
                loop {
                    if let Some(j) = st.jobs.pop_front() {
                        break j;
                    }
                    st.idle += 1;
                    st = self.ready.wait(st).unwrap();
                    st.idle -= 1;
                }
            };
            std::thread::sleep(job.hold);
            // The connection may have gone away meanwhile; the worker was held all the same.
            let _ = job.done.send(());
        }
    }
}

/// Shared state of the server.
struct Server {
    name: String,
    service_ms: f64,
    pool: Arc<Pool>,
    /// `slow` and `error_rate` as f64 bits, updated by the control-file reader.
    slow: AtomicU64,
    error_rate: AtomicU64,
    /// xorshift64 state for the error decision.
    rng: AtomicU64,
    served: AtomicU64,
    errors500: AtomicU64,
    rejected503: AtomicU64,
}

impl Server {
    /// A uniform draw in [0, 1) from the shared xorshift64 generator.
    fn uniform(&self) -> f64 {
        let step = |mut x: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let prev = self
            .rng
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |x| Some(step(x)))
            .unwrap();
        (step(prev) >> 11) as f64 / (1u64 << 53) as f64
    }

    fn response(&self, status: &str, close: bool) -> Vec<u8> {
        let body = format!("{}\n", self.name);
        let conn = if close { "Connection: close\r\n" } else { "" };
        format!(
            "HTTP/1.1 {status}\r\nContent-Length: {}\r\nX-Backend: {}\r\n{conn}\r\n{body}",
            body.len(),
            self.name
        )
        .into_bytes()
    }

    /// Decides and produces the answer to one request.
    async fn answer(&self, close: bool) -> Vec<u8> {
        let error_rate = f64::from_bits(self.error_rate.load(Ordering::Relaxed));
        if error_rate > 0.0 && self.uniform() < error_rate {
            self.errors500.fetch_add(1, Ordering::Relaxed);
            return self.response("500 Internal Server Error", close);
        }
        let slow = f64::from_bits(self.slow.load(Ordering::Relaxed));
        let hold = Duration::from_secs_f64((self.service_ms * slow / 1000.0).max(0.0));
        let (tx, rx) = oneshot::channel();
        match self.pool.submit(Job { hold, done: tx }) {
            Err(_) => {
                self.rejected503.fetch_add(1, Ordering::Relaxed);
                self.response("503 Service Unavailable", close)
            }
            Ok(()) => {
                // Workers never drop a job unanswered; an error here would be a bug.
                rx.await.expect("worker dropped a job");
                self.served.fetch_add(1, Ordering::Relaxed);
                self.response("200 OK", close)
            }
        }
    }
}

/// What the connection loop needs from one request head.
struct Head {
    close: bool,
    body_len: usize,
}

/// Parses a request head (up to and including the blank line). `None` if it is not HTTP.
fn parse_head(head: &[u8]) -> Option<Head> {
    let text = std::str::from_utf8(head).ok()?;
    let mut lines = text.split("\r\n");
    let request = lines.next()?;
    let mut parts = request.split(' ');
    let (_method, _target, version) = (parts.next()?, parts.next()?, parts.next()?);
    let http10 = match version {
        "HTTP/1.1" => false,
        "HTTP/1.0" => true,
        _ => return None,
    };
    let (mut close, mut keep_alive, mut body_len) = (http10, false, 0usize);
    for line in lines {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let k = k.trim();
        if k.eq_ignore_ascii_case("connection") {
            for token in v.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    close = true;
                    keep_alive = false;
                } else if token.eq_ignore_ascii_case("keep-alive") {
                    keep_alive = true;
                }
            }
        } else if k.eq_ignore_ascii_case("content-length") {
            body_len = v.trim().parse().ok()?;
        }
    }
    if http10 && keep_alive {
        close = false;
    }
    Some(Head { close, body_len })
}

fn find_blank_line(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

/// Serves one connection: requests in order (pipelining works), until the peer closes, asks
/// for close, or sends something that is not HTTP.
async fn serve_conn(server: Arc<Server>, mut sock: TcpStream) {
    let _ = sock.set_nodelay(true);
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        let head_end = loop {
            if let Some(end) = find_blank_line(&buf) {
                break end;
            }
            if buf.len() > MAX_HEAD {
                let _ = sock
                    .write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    .await;
                return;
            }
            match sock.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let Some(head) = parse_head(&buf[..head_end]) else {
            let _ = sock
                .write_all(
                    b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                )
                .await;
            return;
        };
        // Discard the request body, if any.
        while buf.len() < head_end + head.body_len {
            match sock.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        buf.drain(..head_end + head.body_len);
        let answer = server.answer(head.close).await;
        if sock.write_all(&answer).await.is_err() {
            return;
        }
        if head.close {
            let _ = sock.shutdown().await;
            return;
        }
    }
}

/// A listening socket (see [`tests::tcp::listen`]), with a backlog deep enough for a saturated
/// backend's waiting clients.
fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    tests::tcp::listen(addr, 4096)
}

/// Accepts on `addr` while `refuse` is false; closes the socket while it is true and binds it
/// again (retrying every 100 ms) when it goes back to false.
async fn listen_loop(
    server: Arc<Server>,
    addr: SocketAddr,
    first: std::net::TcpListener,
    mut refuse: watch::Receiver<bool>,
) {
    let mut listener = Some(first);
    loop {
        let std_listener = match listener.take() {
            Some(l) => l,
            None => {
                if refuse.wait_for(|r| !*r).await.is_err() {
                    return;
                }
                match bind(addr) {
                    Ok(l) => l,
                    Err(e) => {
                        eprintln!("lb-workpool: binding {addr} again: {e}; retrying");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                }
            }
        };
        let tokio_listener = match TcpListener::from_std(std_listener) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("lb-workpool: listener {addr}: {e}");
                return;
            }
        };
        loop {
            if *refuse.borrow_and_update() {
                break;
            }
            tokio::select! {
                accepted = tokio_listener.accept() => {
                    if let Ok((sock, _)) = accepted {
                        tokio::spawn(serve_conn(server.clone(), sock));
                    }
                }
                changed = refuse.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
            }
        }
        // Dropping the listener closes it: connects are refused, the backlog is reset.
        drop(tokio_listener);
    }
}

fn read_control(path: &Option<PathBuf>) -> Control {
    match path {
        Some(p) => std::fs::read_to_string(p)
            .map(|t| Control::parse(&t))
            .unwrap_or_default(),
        None => Control::default(),
    }
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("lb-workpool: {e}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    tests::tcp::raise_nofile();
    let control = read_control(&args.control);
    // FNV-1a of the name: each backend gets its own reproducible error sequence.
    let seed = args.name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    }) | 1;
    let pool = Arc::new(Pool {
        state: Mutex::new(QueueState::default()),
        ready: Condvar::new(),
        max_waiting: args.queue,
    });
    let server = Arc::new(Server {
        name: args.name.clone(),
        service_ms: args.service_ms,
        pool: pool.clone(),
        slow: AtomicU64::new(control.slow.to_bits()),
        error_rate: AtomicU64::new(control.error_rate.to_bits()),
        rng: AtomicU64::new(seed),
        served: AtomicU64::new(0),
        errors500: AtomicU64::new(0),
        rejected503: AtomicU64::new(0),
    });
    for i in 0..args.workers {
        let pool = pool.clone();
        std::thread::Builder::new()
            .name(format!("worker-{i}"))
            .spawn(move || pool.work())
            .expect("spawning a worker thread");
    }
    let mut listeners = Vec::new();
    for &addr in &args.listen {
        match bind(addr) {
            Ok(l) => listeners.push((addr, l)),
            Err(e) => {
                eprintln!("lb-workpool: cannot listen on {addr}: {e}");
                return ExitCode::from(1);
            }
        }
    }
    let (refuse_tx, refuse_rx) = watch::channel(control.refuse);
    if let Some(path) = args.control.clone() {
        let server = server.clone();
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || loop {
                std::thread::sleep(Duration::from_millis(100));
                let c = read_control(&Some(path.clone()));
                server.slow.store(c.slow.to_bits(), Ordering::Relaxed);
                server
                    .error_rate
                    .store(c.error_rate.to_bits(), Ordering::Relaxed);
                refuse_tx.send_if_modified(|r| std::mem::replace(r, c.refuse) != c.refuse);
            })
            .expect("spawning the control thread");
    } else {
        // Keep the channel open for the listeners' whole life.
        std::mem::forget(refuse_tx);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("building the tokio runtime");
    rt.block_on(async move {
        for (addr, l) in listeners {
            tokio::spawn(listen_loop(server.clone(), addr, l, refuse_rx.clone()));
        }
        {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "ready");
            let _ = out.flush();
        }
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
            .expect("SIGINT handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        let mut out = std::io::stdout().lock();
        let _ = writeln!(
            out,
            "{{\"served\":{},\"errors500\":{},\"rejected503\":{}}}",
            server.served.load(Ordering::Relaxed),
            server.errors500.load(Ordering::Relaxed),
            server.rejected503.load(Ordering::Relaxed)
        );
        let _ = out.flush();
    });
    // Workers may be mid-sleep: exit without joining them.
    std::process::exit(0)
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn control_file_keys() {
        let c = Control::parse("slow=2.5\nerror_rate=0.3\nrefuse=1\nbogus=7\n");
        assert_eq!(
            c,
            Control {
                slow: 2.5,
                error_rate: 0.3,
                refuse: true
            }
        );
        assert_eq!(Control::parse("slow=x\n"), Control::default());
    }

    #[test]
    fn head_close_rules() {
        let h = parse_head(b"GET / HTTP/1.1\r\nHost: lb\r\n\r\n").unwrap();
        assert!(!h.close);
        let h = parse_head(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n").unwrap();
        assert!(h.close);
        let h = parse_head(b"GET / HTTP/1.0\r\n\r\n").unwrap();
        assert!(h.close);
        let h =
            parse_head(b"POST / HTTP/1.0\r\nConnection: Keep-Alive\r\nContent-Length: 3\r\n\r\n")
                .unwrap();
        assert!(!h.close);
        assert_eq!(h.body_len, 3);
        assert!(parse_head(b"hello\r\n\r\n").is_none());
    }
}
