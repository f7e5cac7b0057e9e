//! Running the shipped binaries (`lbd`, `lbctl`) in a lab, shared by the end-to-end tests.
use crate::{lab::Lab, netns::NetNs};
use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    time::{Duration, Instant},
};

/// `target/<profile>/<name>`: the binaries `cargo build --workspace` (run by `cargo xtask
/// test`) puts beside the test binaries (in `target/<profile>/deps/`) and beside the tests
/// crate's own tools (`lb-bench-flood`, in `target/<profile>/`).
pub fn bin_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe
        .parent()
        .map(|d| match d.file_name() {
            Some(n) if n == "deps" => d.parent().unwrap_or(d),
            _ => d,
        })
        .expect("target/<profile>");
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is missing: build it first (`cargo build -p lb-userspace`, which `cargo xtask test` does)",
        p.display()
    );
    p
}

/// Polls `f` every 20 ms until it returns `Some`, and returns that; `None` after `timeout`.
/// The one polling loop of the tests: [`poll`], [`wait_for`], [`Control`]'s waits and the
/// fleet's go through it.
pub fn poll_until<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let t = Instant::now();
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if t.elapsed() >= timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// [`poll_until`], panicking naming `what` after `timeout`.
pub fn poll<T>(what: &str, timeout: Duration, f: impl FnMut() -> Option<T>) -> T {
    poll_until(timeout, f)
        .unwrap_or_else(|| panic!("timed out after {timeout:?} waiting for {what}"))
}

/// Polls `f` every 20 ms until it holds and returns how long that took; panics naming `what`
/// after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let t = Instant::now();
    poll(what, timeout, || f().then_some(()));
    t.elapsed()
}

/// Sends `sig` to a child process.
pub fn signal(child: &Child, sig: i32) {
    // SAFETY: signalling our own child process.
    assert_eq!(
        unsafe { libc::kill(child.id() as i32, sig) },
        0,
        "kill({sig})"
    );
}

/// Whether `eth0` in `ns` has an XDP program attached.
pub fn xdp_attached(ns: &NetNs) -> bool {
    ns.ip(["link", "show", "dev", "eth0"])
        .map(|s| s.contains("xdp"))
        .unwrap_or(false)
}

/// Starts `bin decap --interface eth0 --xdp-mode native --vip V...` in `ns`, its stderr to
/// `log` (or nowhere), and waits until it has attached. The process is tracked by `ns`'s guard
/// (killed when the namespace goes).
pub fn start_decap(
    ns: &NetNs,
    bin: &Path,
    vips: &[std::net::IpAddr],
    log: Option<&Path>,
) -> std::io::Result<Child> {
    let mut cmd = ns.command(bin);
    cmd.args(["decap", "--interface", "eth0", "--xdp-mode", "native"]);
    for vip in vips {
        cmd.arg("--vip").arg(vip.to_string());
    }
    let stderr = match log {
        Some(p) => Stdio::from(std::fs::File::create(p)?),
        None => Stdio::null(),
    };
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr);
    let child = ns.spawn_command(&mut cmd)?;
    wait_for("lbd decap to attach", Duration::from_secs(20), || {
        xdp_attached(ns)
    });
    Ok(child)
}

/// Starts `lbd decap` for the IPv4 VIP on backends `0..n` and waits until each has attached.
/// The processes are tracked by the backends' namespace guards (killed when the lab drops).
pub fn start_decaps(lab: &Lab, n: usize) -> Vec<Child> {
    let lbd = bin_path("lbd");
    let vip = [crate::lab::VIP_V4.into()];
    (0..n)
        .map(|i| start_decap(lab.backend(i).ns(), &lbd, &vip, None).expect("starting lbd decap"))
        .collect()
}

/// Removes a test's scratch directory when dropped, so it goes on success, failure and panic.
pub struct RemoveOnDrop(pub PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A scratch directory for one test's config file, control socket and log: world-traversable
/// (0755) so an unprivileged lbctl can reach the socket and be refused by the socket's own mode.
pub fn scratch(label: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = std::env::temp_dir().join(format!("lb-{label}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// Runs `lbctl --socket SOCKET ARGS...` to completion.
pub fn lbctl(socket: &std::path::Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(bin_path("lbctl"))
        .arg("--socket")
        .arg(socket)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("running lbctl")
}

/// A config for [`Lbd::start`] in a [`Lab`]: the balancer's eth0 in native mode, nothing
/// pinned, the control socket `dir/run/lbd.sock`, the lab's encap sources, then `vips` (the
/// test's `[[vip]]` tables).
pub fn lab_config(dir: &Path, vips: &str) -> String {
    use crate::lab::{LB_V4, LB_V6};
    format!(
        "interface = \"eth0\"\nxdp_mode = \"native\"\npin_dir = \"\"\n\
         control_socket = \"{}\"\n\
         [encap]\nsource_v4 = \"{LB_V4}\"\nsource_v6 = \"{LB_V6}\"\n\n{vips}",
        dir.join("run/lbd.sock").display()
    )
}

/// How [`Lbd::spawn`] starts lbd.
#[derive(Clone, Debug, Default)]
pub struct LbdOptions {
    /// The binary; default [`bin_path`]`("lbd")` (the upgrade test runs a copy).
    pub bin: Option<PathBuf>,
    /// Enter only the namespace's network namespace (`nsenter --net`) instead of `ip netns
    /// exec`, keeping the root mount namespace: pins land in the host's /sys/fs/bpf and outlive
    /// lbd.
    pub nsenter: bool,
    /// Extra environment (`RUST_LOG`, ...).
    pub env: Vec<(String, String)>,
    /// Where lbd's stderr and stdout go; default `lbd.log` beside the config file.
    pub log: Option<PathBuf>,
    /// Extra arguments after `--config FILE` (fleet mode: `--etcd`, `--prefix`, `--node`).
    pub args: Vec<String>,
    /// Environment variables removed from lbd's (inherited) environment.
    pub env_remove: Vec<String>,
    /// A command lbd runs under inside the namespace, with its arguments (`setpriv
    /// --bounding-set=...`); not with `nsenter`.
    pub wrapper: Vec<String>,
}

/// How long an lbd may take to serve its control socket, and to exit on SIGTERM.
const LBD_START_TIMEOUT: Duration = Duration::from_secs(30);
const LBD_STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// A running lbd in a namespace, its stderr in a log file. Killed on drop; with `own_dir`,
/// `dir` goes too.
pub struct Lbd {
    child: Option<Child>,
    /// The directory of the config file (of the log, with [`Lbd::spawn_args`]).
    pub dir: PathBuf,
    /// The config file; empty with [`Lbd::spawn_args`].
    pub config: PathBuf,
    pub socket: PathBuf,
    pub log_path: PathBuf,
    pub own_dir: bool,
    control: Control,
}

impl Lbd {
    /// Starts lbd with `dir/lbd.toml` (whose `control_socket` must be `dir/run/lbd.sock`),
    /// `RUST_LOG=info`, logging to `dir/lbd.log`, and waits until it answers `lbctl status`.
    pub fn start(ns: &NetNs, dir: &Path) -> Lbd {
        let opts = LbdOptions {
            env: vec![("RUST_LOG".into(), "info".into())],
            ..LbdOptions::default()
        };
        let mut lbd = Lbd::spawn(ns, &dir.join("lbd.toml"), dir.join("run/lbd.sock"), &opts);
        lbd.wait_serving();
        lbd
    }

    /// Starts `lbd --config CONFIG` in `ns` without waiting for it; `socket` is the config's
    /// `control_socket`.
    pub fn spawn(ns: &NetNs, config: &Path, socket: impl Into<PathBuf>, opts: &LbdOptions) -> Lbd {
        let dir = config.parent().expect("config in a directory");
        let mut args = vec![OsString::from("--config"), config.into()];
        args.extend(opts.args.iter().map(OsString::from));
        let mut lbd = Lbd::spawn_args(ns, &args, dir, socket, opts);
        lbd.config = config.to_path_buf();
        lbd
    }

    /// Starts `lbd ARGS` in `ns` without waiting for it (`decap`, or a daemon under a
    /// [`LbdOptions::wrapper`]); `dir` holds the default log, `socket` is where it serves its
    /// control socket, if it does.
    pub fn spawn_args(
        ns: &NetNs,
        args: &[OsString],
        dir: &Path,
        socket: impl Into<PathBuf>,
        opts: &LbdOptions,
    ) -> Lbd {
        let bin = opts.bin.clone().unwrap_or_else(|| bin_path("lbd"));
        let log_path = opts.log.clone().unwrap_or_else(|| dir.join("lbd.log"));
        let log = std::fs::File::create(&log_path)
            .unwrap_or_else(|e| panic!("creating {}: {e}", log_path.display()));
        let mut cmd = match (opts.nsenter, opts.wrapper.split_first()) {
            (true, _) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{}", ns.name())).arg(&bin);
                c
            }
            (false, Some((wrapper, wargs))) => {
                let mut c = ns.command(wrapper);
                c.args(wargs).arg(&bin);
                c
            }
            (false, None) => ns.command(&bin),
        };
        cmd.args(args)
            .envs(opts.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("the log file"))
            .stderr(log);
        for k in &opts.env_remove {
            cmd.env_remove(k);
        }
        let child = ns.spawn_command(&mut cmd).expect("starting lbd");
        let socket = socket.into();
        Lbd {
            child: Some(child),
            dir: dir.to_path_buf(),
            config: PathBuf::new(),
            control: Control::new(&socket),
            socket,
            log_path,
            own_dir: false,
        }
    }

    /// Waits until lbd answers `lbctl status`; returns how long that took. Panics with the log
    /// if lbd exits first or does not answer within 30 s.
    pub fn wait_serving(&mut self) -> Duration {
        self.try_wait_serving().unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Lbd::wait_serving`], the failure (with the log) as an error.
    pub fn try_wait_serving(&mut self) -> Result<Duration, String> {
        let t = Instant::now();
        while !lbctl(&self.socket, &["status"]).status.success() {
            if let Some(s) = self.try_wait() {
                return Err(format!(
                    "lbd exited ({s}) before serving lbctl:\n{}",
                    self.log()
                ));
            }
            if t.elapsed() >= LBD_START_TIMEOUT {
                return Err(format!(
                    "lbd did not serve its control socket within {LBD_START_TIMEOUT:?}:\n{}",
                    self.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(t.elapsed())
    }

    /// The running lbd's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("lbd running").id()
    }

    /// The control socket's queries ([`Control`]).
    pub fn control(&self) -> &Control {
        &self.control
    }

    /// Waits until this lbd (not one before it on the same socket) serves with its program
    /// attached ([`Control::wait_ready`]).
    pub fn wait_ready(&self) -> serde_json::Value {
        self.control.wait_ready(self.pid())
    }

    /// [`Control::wait_event`].
    pub fn wait_event(&self, kind: &str, since_ms: u64) -> serde_json::Value {
        self.control.wait_event(kind, since_ms)
    }

    /// [`Control::wait_generation`].
    pub fn wait_generation(&self, vip: &str, generation: u64) {
        self.control.wait_generation(vip, generation)
    }

    /// Sends `sig` to lbd.
    pub fn signal(&self, sig: i32) {
        signal(self.child.as_ref().expect("lbd running"), sig);
    }

    /// Its exit status if lbd has exited (it is then no longer running).
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        let s = self.child.as_mut()?.try_wait().expect("waiting for lbd")?;
        self.child = None;
        Some(s)
    }

    /// Waits up to `timeout` for lbd to exit on its own; its exit status.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let mut status = None;
        wait_for("lbd to exit", timeout, || {
            status = self.try_wait();
            status.is_some()
        });
        status.unwrap()
    }

    /// SIGTERM, and the exit status (within 10 s).
    pub fn stop(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait_exit(LBD_STOP_TIMEOUT)
    }

    /// SIGKILL, and reaps it.
    pub fn sigkill(&mut self) {
        let mut c = self.child.take().expect("lbd running");
        signal(&c, libc::SIGKILL);
        let _ = c.wait();
    }

    /// What lbd has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }
}

impl Drop for Lbd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if self.own_dir {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// `lbd --config CONFIG ARGS...` run to completion in `ns`'s network namespace and the host's
/// mount namespace (where the pins are): `cleanup`, `--check`, ... Its output, not checked.
pub fn lbd_run(ns: &NetNs, config: &Path, args: &[&str]) -> Output {
    Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", ns.name()))
        .arg(bin_path("lbd"))
        .arg("--config")
        .arg(config)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running lbd {args:?}: {e}"))
}

/// `lbd --config CONFIG cleanup` ([`lbd_run`]), asserted to succeed.
pub fn lbd_cleanup(ns: &NetNs, config: &Path) -> Output {
    let out = lbd_run(ns, config, &["cleanup"]);
    assert!(
        out.status.success(),
        "lbd cleanup: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `GET /metrics` from inside `ns` (lbd's default `metrics_listen`), checked to be a 200 with
/// the Prometheus text content type, parsed into `series -> value`.
pub fn scrape_metrics(ns: &NetNs) -> std::collections::BTreeMap<String, f64> {
    use std::io::{Read as _, Write as _};
    let text = ns.run_in(|| {
        let mut s = std::net::TcpStream::connect("127.0.0.1:9469").expect("connecting to metrics");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: lb\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    });
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert!(
        head.contains("Content-Type: text/plain; version=0.0.4"),
        "{head}"
    );
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').expect("series value");
            (k.to_string(), v.parse::<f64>().expect("a number"))
        })
        .collect()
}

/// Runs `lbctl --socket SOCKET ARGS... --json`, which must succeed, and parses its output.
pub fn lbctl_json(socket: &std::path::Path, args: &[&str]) -> serde_json::Value {
    let mut all = args.to_vec();
    all.push("--json");
    let out = lbctl(socket, &all);
    assert!(
        out.status.success(),
        "lbctl {args:?}: exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("lbctl {args:?}: not JSON ({e}): {out:?}"))
}

/// Milliseconds since the Unix epoch: the clock lbd stamps its events with. Take it before
/// the action whose event a test then waits for.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64
}

/// How long the waits of [`Control`] allow before they fail the test.
pub const STATE_TIMEOUT: Duration = Duration::from_secs(20);

/// An lbd's control socket as the tests query it: `lbctl status --json`, polled for the state
/// a test waits for (never a fixed sleep).
pub struct Control {
    pub socket: PathBuf,
}

impl Control {
    pub fn new(socket: impl Into<PathBuf>) -> Control {
        Control {
            socket: socket.into(),
        }
    }

    /// `lbctl status --json`, or `None` while no lbd answers.
    pub fn status(&self) -> Option<serde_json::Value> {
        let out = lbctl(&self.socket, &["status", "--json"]);
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// Polls `f` on each status until it returns `Some`; panics naming `what`, with the last
    /// status, after [`STATE_TIMEOUT`].
    fn poll<T>(&self, what: &str, mut f: impl FnMut(&serde_json::Value) -> Option<T>) -> T {
        let mut last = None;
        let found = poll_until(STATE_TIMEOUT, || {
            let status = self.status()?;
            let t = f(&status);
            last = Some(status);
            t
        });
        found.unwrap_or_else(|| panic!("timed out waiting for {what}; last status: {last:?}"))
    }

    /// Waits until the lbd with process id `pid` answers (a restarted lbd, not the one before
    /// it) with its program attached.
    pub fn wait_ready(&self, pid: u32) -> serde_json::Value {
        self.poll(&format!("lbd {pid} to serve"), |s| {
            (s["pid"] == pid && s["program_id"].as_u64().is_some_and(|id| id > 0))
                .then(|| s.clone())
        })
    }

    /// Waits for an event of `kind` (`reloaded`, `reload_refused`, `start`, ...) stamped at or
    /// after `since_ms` (see [`now_ms`]); returns it.
    pub fn wait_event(&self, kind: &str, since_ms: u64) -> serde_json::Value {
        self.poll(&format!("a {kind} event"), |s| {
            s["events"].as_array()?.iter().find_map(|e| {
                (e["kind"] == kind && e["timestamp_ms"].as_u64() >= Some(since_ms))
                    .then(|| e.clone())
            })
        })
    }

    /// Waits until `vip`'s table generation (as `lbctl status` names the VIP) is at least
    /// `generation`.
    pub fn wait_generation(&self, vip: &str, generation: u64) {
        self.poll(&format!("{vip} at generation {generation}"), |s| {
            s["vips"]
                .as_array()?
                .iter()
                .any(|v| v["vip"] == vip && v["generation"].as_u64() >= Some(generation))
                .then_some(())
        })
    }
}

/// Waits until `ns` has resolved the link-layer address of each of `addrs` (lbd's managed
/// neighbour entries resolve in the background, and the datapath drops packets to a backend
/// whose next hop is unknown).
pub fn wait_neighbours(ns: &NetNs, addrs: &[std::net::IpAddr]) {
    for addr in addrs {
        let addr = addr.to_string();
        wait_for(
            &format!("the neighbour entry of {addr} to resolve"),
            STATE_TIMEOUT,
            || {
                ns.ip(["neigh", "show", "to", &addr])
                    .map(|s| {
                        s.contains("lladdr") && !s.contains("FAILED") && !s.contains("INCOMPLETE")
                    })
                    .unwrap_or(false)
            },
        );
    }
}

/// The addresses of every backend of `cfg`, for [`wait_neighbours`].
pub fn backend_addrs(cfg: &lb_userspace::Config) -> Vec<std::net::IpAddr> {
    cfg.vips
        .iter()
        .flat_map(|v| v.backends.iter().map(|b| b.address))
        .collect()
}

/// User plus system CPU time of process or thread `pid` (fields 14 and 15 of `/proc/PID/stat`).
pub fn process_cpu(pid: u32) -> anyhow::Result<Duration> {
    use anyhow::Context as _;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name (field 2) is in parentheses and may hold spaces: count after it.
    let after = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("no ')' in /proc/PID/stat")?;
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // After ")": state is field 3, so utime (14) and stime (15) are at 11 and 12.
    Ok(ticks_to_duration(ticks(11) + ticks(12)))
}

fn ticks_to_duration(ticks: u64) -> Duration {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_nanos(ticks * 1_000_000_000 / hz)
}
