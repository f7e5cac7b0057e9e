//! Real TCP servers and clients running as threads of the test process, with their sockets in
//! lab namespaces.
//!
//! The protocol: when a connection is accepted the server writes its name followed by `\n`;
//! after that it echoes every line it receives. A client learns which backend it reached from
//! the first line, and a long-lived connection can be probed with a line at any time.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use socket2::{Domain, Protocol, Socket, Type};

use crate::netns::NetNs;

/// How often blocked server threads look at the stop flag.
const POLL: Duration = Duration::from_millis(50);
/// Longest line (including `\n`) the server and clients accept.
const MAX_LINE: usize = 4096;

/// A name-then-echo TCP server (see the module docs) listening on `addrs` inside a namespace.
/// Stops on drop: stops accepting, closes every connection and joins its threads (bounded by
/// about [`POLL`] plus whatever a blocked write needs, at most 1 s).
pub struct TcpServer {
    name: String,
    addrs: Vec<SocketAddr>,
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicUsize>,
    acceptor: Option<JoinHandle<()>>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl TcpServer {
    /// Binds a listener on every address (inside `ns`, with `IP_FREEBIND` so the address need
    /// not be configured yet, and `SO_REUSEADDR`), then serves connections, each on its own
    /// thread, until dropped. Port 0 picks a free port; see [`TcpServer::local_addrs`].
    pub fn start(ns: &NetNs, addrs: &[SocketAddr], name: &str) -> Result<Self> {
        assert!(!name.contains('\n'), "server name must be one line");
        let listeners = ns.run_in(|| -> Result<Vec<TcpListener>> {
            addrs
                .iter()
                .map(|&a| {
                    listen(a, 1024).with_context(|| format!("listening on {a} in {}", ns.name()))
                })
                .collect()
        })?;
        let local = listeners
            .iter()
            .map(|l| l.local_addr())
            .collect::<io::Result<Vec<_>>>()?;
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicUsize::new(0));
        let conns = Arc::new(Mutex::new(Vec::new()));
        let acceptor = {
            let (stop, accepted, conns) = (stop.clone(), accepted.clone(), conns.clone());
            let name = name.to_owned();
            std::thread::Builder::new()
                .name(format!("tcp-accept-{name}"))
                .spawn(move || accept_loop(listeners, name, stop, accepted, conns))?
        };
        Ok(Self {
            name: name.to_owned(),
            addrs: local,
            stop,
            accepted,
            acceptor: Some(acceptor),
            conns,
        })
    }

    /// The name the server announces.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The addresses actually bound (ports filled in when 0 was asked for).
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// How many connections have been accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for TcpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
        let conns = std::mem::take(&mut *self.conns.lock().unwrap());
        for c in conns {
            let _ = c.join();
        }
    }
}

/// A non-blocking listening socket with a `backlog`: SO_REUSEADDR (re-bind at once despite
/// TIME_WAIT), IP_FREEBIND/IPV6_FREEBIND (a VIP not configured yet), and v6-only for IPv6 so
/// `[::]:P` and `0.0.0.0:P` coexist. Shared by [`TcpServer`] and the `lb-workpool` tool.
pub fn listen(addr: SocketAddr, backlog: i32) -> io::Result<TcpListener> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
        sock.set_freebind_v6(true)?;
    } else {
        sock.set_freebind_v4(true)?;
    }
    sock.bind(&addr.into())?;
    sock.listen(backlog)?;
    sock.set_nonblocking(true)?;
    Ok(sock.into())
}

fn accept_loop(
    listeners: Vec<TcpListener>,
    name: String,
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicUsize>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
) {
    let mut fds: Vec<libc::pollfd> = listeners
        .iter()
        .map(|l| libc::pollfd {
            fd: l.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: `fds` is a valid array of pollfd for its length; the fds stay open.
        let n = unsafe {
            libc::poll(
                fds.as_mut_ptr(),
                fds.len() as libc::nfds_t,
                POLL.as_millis() as libc::c_int,
            )
        };
        if n <= 0 {
            continue;
        }
        for l in &listeners {
            loop {
                match l.accept() {
                    Ok((stream, _)) => {
                        accepted.fetch_add(1, Ordering::Relaxed);
                        let (name, stop) = (name.clone(), stop.clone());
                        let spawned = std::thread::Builder::new()
                            .name(format!("tcp-conn-{name}"))
                            .spawn(move || {
                                let _ = serve(stream, &name, &stop);
                            });
                        let mut conns = conns.lock().unwrap();
                        conns.retain(|h| !h.is_finished());
                        if let Ok(h) = spawned {
                            conns.push(h);
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    // ECONNABORTED and friends: the next connection may be fine.
                    Err(_) => break,
                }
            }
        }
    }
}

fn serve(stream: TcpStream, name: &str, stop: &AtomicBool) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(POLL))?;
    stream.set_write_timeout(Some(Duration::from_secs(1)))?;
    let mut writer = stream.try_clone()?;
    writer.write_all(format!("{name}\n").as_bytes())?;
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        match (&mut reader)
            .take((MAX_LINE - line.len()) as u64)
            .read_until(b'\n', &mut line)
        {
            Ok(0) => return Ok(()), // peer closed (or over-long line)
            Ok(_) if line.ends_with(b"\n") => {
                writer.write_all(&line)?;
                line.clear();
            }
            Ok(_) if line.len() >= MAX_LINE => return Ok(()),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads one `\n`-terminated line (without the `\n`) before `deadline`.
fn read_line_by(reader: &mut BufReader<TcpStream>, deadline: Instant) -> io::Result<String> {
    let mut line = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "timed out waiting for a line",
            ));
        }
        reader.get_ref().set_read_timeout(Some(left))?;
        match reader
            .by_ref()
            .take((MAX_LINE - line.len()) as u64)
            .read_until(b'\n', &mut line)
        {
            Ok(0) if line.len() >= MAX_LINE => {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "line too long"))
            }
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed by peer",
                ))
            }
            Ok(_) if line.ends_with(b"\n") => {
                line.pop();
                return String::from_utf8(line)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e));
            }
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e),
        }
    }
}

fn connect_and_greet(
    addr: SocketAddr,
    timeout: Duration,
) -> io::Result<(BufReader<TcpStream>, String)> {
    let deadline = Instant::now() + timeout;
    let stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_nodelay(true)?;
    stream.set_write_timeout(Some(timeout))?;
    let mut reader = BufReader::new(stream);
    let name = read_line_by(&mut reader, deadline)?;
    Ok((reader, name))
}

/// Connects from `ns` to `addr` from the source address and port `local`, reads the server's
/// name line, closes, and returns the name (a flow whose 5-tuple the test knows in advance).
pub fn client_from(
    ns: &NetNs,
    local: SocketAddr,
    addr: SocketAddr,
    timeout: Duration,
) -> io::Result<String> {
    ns.run_in(|| {
        let deadline = Instant::now() + timeout;
        let sock = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        sock.set_reuse_address(true)?;
        sock.bind(&local.into())?;
        sock.connect_timeout(&addr.into(), timeout)?;
        let stream: TcpStream = sock.into();
        let mut reader = BufReader::new(stream);
        read_line_by(&mut reader, deadline)
    })
}

/// Connects from `ns` to `addr`, reads the server's name line, closes, and returns the name.
/// The whole exchange is bounded by `timeout` (connect gets all of it, the read what is left).
pub fn client_once(ns: &NetNs, addr: SocketAddr, timeout: Duration) -> io::Result<String> {
    ns.run_in(|| connect_and_greet(addr, timeout).map(|(_, name)| name))
}

/// `count` sequential [`client_once`] exchanges on one thread inside `ns` (cheaper than calling
/// it `count` times). Each connection is bounded by `timeout`.
pub fn client_many(
    ns: &NetNs,
    addr: SocketAddr,
    count: usize,
    timeout: Duration,
) -> Vec<io::Result<String>> {
    ns.run_in(|| {
        (0..count)
            .map(|_| connect_and_greet(addr, timeout).map(|(_, name)| name))
            .collect()
    })
}

/// How many of the successful results named each server.
pub fn tally<'a>(
    results: impl IntoIterator<Item = &'a io::Result<String>>,
) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for name in results.into_iter().flatten() {
        *counts.entry(name.clone()).or_default() += 1;
    }
    counts
}

/// Why a long-lived connection failed a [`LongLived::check`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConnFailure {
    /// The connection was reset (RST received, or EPIPE on write).
    Reset,
    /// The peer closed the connection (EOF).
    Closed,
    /// No echo within the timeout (e.g. packets blackholed).
    Timeout,
    /// An echo arrived but was not the line sent.
    WrongEcho {
        /// The line sent.
        sent: String,
        /// The line received.
        got: String,
    },
    /// Any other I/O error.
    Other(String),
}

impl fmt::Display for ConnFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnFailure::Reset => f.write_str("connection reset"),
            ConnFailure::Closed => f.write_str("connection closed by peer"),
            ConnFailure::Timeout => f.write_str("no echo before the timeout"),
            ConnFailure::WrongEcho { sent, got } => write!(f, "sent {sent:?}, echo was {got:?}"),
            ConnFailure::Other(e) => write!(f, "I/O error: {e}"),
        }
    }
}

impl From<io::Error> for ConnFailure {
    fn from(e: io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted => ConnFailure::Reset,
            io::ErrorKind::UnexpectedEof => ConnFailure::Closed,
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => ConnFailure::Timeout,
            _ => ConnFailure::Other(e.to_string()),
        }
    }
}

/// The outcome of one connection in a [`LongLived::check`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnStatus {
    /// Index of the connection (0-based, in opening order).
    pub index: usize,
    /// The client's local address of the connection.
    pub local: SocketAddr,
    /// The server name read when the connection was opened.
    pub backend: String,
    /// `Ok` if the probe line was echoed; once a connection failed it stays failed.
    pub outcome: Result<(), ConnFailure>,
}

impl ConnStatus {
    /// Whether the probe succeeded.
    pub fn is_ok(&self) -> bool {
        self.outcome.is_ok()
    }
}

struct LongConn {
    reader: BufReader<TcpStream>,
    local: SocketAddr,
    backend: String,
    failed: Option<ConnFailure>,
}

/// A set of long-lived connections opened from one namespace to one address, each remembering
/// which server answered, probed with [`LongLived::check`] (e.g. across backend changes).
pub struct LongLived {
    conns: Vec<LongConn>,
    timeout: Duration,
    seq: u64,
}

impl LongLived {
    /// Opens `count` connections from `ns` to `addr` and reads each one's name line; each
    /// connection is bounded by `timeout`, which also bounds each later [`LongLived::check`].
    /// Fails if any connection cannot be opened.
    pub fn open(ns: &NetNs, addr: SocketAddr, count: usize, timeout: Duration) -> io::Result<Self> {
        let conns = ns.run_in(|| {
            (0..count)
                .map(|_| {
                    let (reader, backend) = connect_and_greet(addr, timeout)?;
                    let local = reader.get_ref().local_addr()?;
                    Ok(LongConn {
                        reader,
                        local,
                        backend,
                        failed: None,
                    })
                })
                .collect::<io::Result<Vec<_>>>()
        })?;
        Ok(Self {
            conns,
            timeout,
            seq: 0,
        })
    }

    /// Number of connections.
    pub fn len(&self) -> usize {
        self.conns.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// The server name each connection got, by index.
    pub fn backends(&self) -> Vec<String> {
        self.conns.iter().map(|c| c.backend.clone()).collect()
    }

    /// Each connection's local (client) address and the server name it got, by index.
    pub fn locals(&self) -> Vec<(SocketAddr, String)> {
        self.conns
            .iter()
            .map(|c| (c.local, c.backend.clone()))
            .collect()
    }

    /// Closes up to `n` of the connections served by `backend` (the client's FIN goes out
    /// now); they leave the set. Returns how many were closed.
    pub fn close_some(&mut self, backend: &str, n: usize) -> usize {
        let mut closed = 0;
        self.conns.retain(|c| {
            if closed < n && c.backend == backend {
                closed += 1;
                false
            } else {
                true
            }
        });
        closed
    }

    /// How many connections each server got.
    pub fn backend_counts(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for c in &self.conns {
            *counts.entry(c.backend.clone()).or_default() += 1;
        }
        counts
    }

    /// Sends a fresh line on every connection, then waits for every echo. All probes are sent
    /// before any echo is awaited, so the whole check takes about one timeout at worst (plus
    /// 50 ms per connection that had not answered by then).
    pub fn check(&mut self) -> Vec<ConnStatus> {
        self.seq += 1;
        let seq = self.seq;
        let deadline = Instant::now() + self.timeout;
        let mut sent = Vec::with_capacity(self.conns.len());
        for (i, c) in self.conns.iter_mut().enumerate() {
            let line = format!("probe {i} {seq}");
            if c.failed.is_none() {
                let r = c.reader.get_mut().write_all(format!("{line}\n").as_bytes());
                if let Err(e) = r {
                    c.failed = Some(e.into());
                }
            }
            sent.push(line);
        }
        let mut out = Vec::with_capacity(self.conns.len());
        for (i, (c, line)) in self.conns.iter_mut().zip(sent).enumerate() {
            if c.failed.is_none() {
                let by = deadline.max(Instant::now() + Duration::from_millis(50));
                match read_line_by(&mut c.reader, by) {
                    Ok(got) if got == line => {}
                    Ok(got) => c.failed = Some(ConnFailure::WrongEcho { sent: line, got }),
                    Err(e) => c.failed = Some(e.into()),
                }
            }
            out.push(ConnStatus {
                index: i,
                local: c.local,
                backend: c.backend.clone(),
                outcome: c.failed.clone().map_or(Ok(()), Err),
            });
        }
        out
    }

    /// [`LongLived::check`], asserting that every connection whose backend is not in `except`
    /// answered (`when` names the moment in the failure); how many such connections there are.
    pub fn assert_intact(&mut self, except: &[&str], when: &str) -> usize {
        let statuses = self.check();
        let kept: Vec<_> = statuses
            .iter()
            .filter(|s| !except.contains(&s.backend.as_str()))
            .collect();
        let failed: Vec<String> = kept
            .iter()
            .filter_map(|s| {
                s.outcome
                    .as_ref()
                    .err()
                    .map(|e| format!("#{} (backend {}): {e}", s.index, s.backend))
            })
            .collect();
        assert!(
            failed.is_empty(),
            "{when}: {} of {} long-lived connections (backends other than {except:?}) failed: {failed:?}",
            failed.len(),
            kept.len()
        );
        kept.len()
    }

    /// [`LongLived::check`], turned into an error listing every failed connection.
    pub fn check_all(&mut self) -> Result<()> {
        let failed: Vec<String> = self
            .check()
            .into_iter()
            .filter_map(|s| {
                s.outcome
                    .err()
                    .map(|e| format!("#{} {} (backend {}): {e}", s.index, s.local, s.backend))
            })
            .collect();
        if failed.is_empty() {
            Ok(())
        } else {
            anyhow::bail!(
                "{} of {} long-lived connections failed: {}",
                failed.len(),
                self.len(),
                failed.join("; ")
            )
        }
    }
}

/// Raises the soft open-files limit to the hard one: the benchmark tools hold one socket per
/// request in flight (`lb-loadgen`) or per waiting client (`lb-workpool`).
pub fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// A minimal HTTP server in a namespace: every request is answered `status` after `delay`,
/// one request at a time (like a busy application), with `Connection: close`. For health
/// probes that must pass, fail or be slow.
pub struct HttpResponder {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl HttpResponder {
    /// Binds `addr` inside `ns` and serves until dropped.
    pub fn start(ns: &NetNs, addr: SocketAddr, status: u16, delay: Duration) -> Self {
        let listener = ns
            .run_in(|| std::net::TcpListener::bind(addr))
            .expect("binding");
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        let _ = s.set_nonblocking(false);
                        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
                        let mut buf = [0u8; 1024];
                        let _ = s.read(&mut buf);
                        thread::sleep(delay);
                        let reason = if status == 200 { "OK" } else { "Error" };
                        let _ = write!(
                            s,
                            "HTTP/1.1 {status} {reason}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                        );
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        HttpResponder {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for HttpResponder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
