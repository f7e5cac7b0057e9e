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
