//! Running the shipped binaries (`lbd`, `lbctl`) in a lab, shared by the end-to-end tests.
use crate::{lab::Lab, netns::NetNs};
use std::{
    path::PathBuf,
    process::Child,
    time::{Duration, Instant},
};

/// `target/<profile>/<name>`: the binaries `cargo build --workspace` (run by `cargo xtask
/// test`) puts beside the test binaries.
pub fn bin_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target/<profile>");
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is missing: build it first (`cargo build -p lb-userspace`, which `cargo xtask test` does)",
        p.display()
    );
    p
}

/// Polls `f` every 100 ms until it holds; panics naming `what` after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
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

/// Starts `lbd decap` for the IPv4 VIP on backends `0..n` and waits until each has attached.
/// The processes are tracked by the backends' namespace guards (killed when the lab drops).
pub fn start_decaps(lab: &Lab, n: usize) -> Vec<Child> {
    let lbd = bin_path("lbd");
    let vip = crate::lab::VIP_V4.to_string();
    let out: Vec<Child> = (0..n)
        .map(|i| {
            lab.backend(i).ns().spawn(
                lbd.to_str().unwrap(),
                [
                    "decap",
                    "--interface",
                    "eth0",
                    "--vip",
                    &vip,
                    "--xdp-mode",
                    "native",
                ],
            )
        })
        .collect();
    for i in 0..n {
        wait_for("lbd decap to attach", Duration::from_secs(20), || {
            xdp_attached(lab.backend(i).ns())
        });
    }
    out
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

/// A running lbd in a namespace, configured by `dir/lbd.toml` (whose `control_socket` must be
/// `dir/run/lbd.sock`), logging to `dir/lbd.log`. Killed on drop; with `own_dir`, the
/// directory goes too.
pub struct Lbd {
    child: Option<Child>,
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub own_dir: bool,
}

impl Lbd {
    /// Starts lbd and waits until it answers `lbctl status`.
    pub fn start(ns: &NetNs, dir: &std::path::Path) -> Lbd {
        use std::process::Stdio;
        let log = std::fs::File::create(dir.join("lbd.log")).unwrap();
        let mut cmd = ns.command(bin_path("lbd"));
        cmd.arg("--config")
            .arg(dir.join("lbd.toml"))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let child = ns.spawn_command(&mut cmd).expect("starting lbd");
        let mut lbd = Lbd {
            child: Some(child),
            dir: dir.to_path_buf(),
            socket: dir.join("run/lbd.sock"),
            own_dir: false,
        };
        let end = Instant::now() + Duration::from_secs(20);
        while !lbctl(&lbd.socket, &["status"]).status.success() {
            if let Some(s) = lbd.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("lbd exited ({s}) before serving lbctl:\n{}", lbd.log());
            }
            assert!(Instant::now() < end, "lbd did not start:\n{}", lbd.log());
            std::thread::sleep(Duration::from_millis(100));
        }
        lbd
    }

    /// What lbd has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("lbd.log")).unwrap_or_default()
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
        let end = Instant::now() + STATE_TIMEOUT;
        let mut last = None;
        loop {
            if let Some(status) = self.status() {
                if let Some(t) = f(&status) {
                    return t;
                }
                last = Some(status);
            }
            assert!(
                Instant::now() < end,
                "timed out waiting for {what}; last status: {last:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
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
