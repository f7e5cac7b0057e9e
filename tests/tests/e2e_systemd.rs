//! lbd under a real systemd: the .deb that `cargo xtask package` builds, installed with `dpkg -i`
//! in a Debian bookworm container booted by `systemd-nspawn`, driven with `systemctl` and `lbctl`
//! the way an operator drives it, with traffic from a client namespace through the VIP to TCP
//! servers in backend namespaces.
//!
//! One test, scenarios in sequence on one container (booting it is the slow part):
//!
//! 1. `systemctl start` returns once lbd sent READY=1: the program is attached when it returns,
//!    and `systemctl status` shows lbd's STATUS= line.
//! 2. `systemctl reload` applies a good edited file, and FAILS on a bad one, changing nothing.
//! 3. `kill -9` of lbd: systemd restarts it, flows keep forwarding meanwhile (pins), and the new
//!    lbd reports `unclean_stop` — which needs `RuntimeDirectoryPreserve=` in the unit: without
//!    it systemd removes /run/lb (with the run-state file) before the restart. A control run with
//!    `RuntimeDirectoryPreserve=no` shows the report lost.
//! 4. A stalled main loop (`kill -STOP`): the watchdog aborts lbd and systemd restarts it within
//!    WatchdogSec (lowered to 4 s by a drop-in) plus RestartSec and a margin.
//! 5. Under the unit's sandbox every documented operation works (`lbctl status`, `backend
//!    add/set-weight/drain/remove`, `lbctl status` as a member of `control_group` but not as
//!    another user); `systemctl stop` leaves the datapath forwarding and is known as a clean stop
//!    at the next start, while a kill followed by `systemctl stop`, or by a crash loop's start
//!    limit (which `RuntimeDirectoryPreserve=restart` would not survive), is still reported as
//!    unclean; `lbd cleanup` as root takes the datapath down.
//!
//! The machine: a network namespace of a [`Lab`] (the balancer's) is the container's network
//! (`--network-namespace-path`), a private bpffs is bound at /sys/fs/bpf, and the container gets
//! CAP_BPF and CAP_PERFMON (CAP_NET_ADMIN and CAP_SYS_ADMIN it has) and the `bpf` system call
//! (nspawn's seccomp filter refuses it otherwise). The debootstrapped root is cached in
//! [`ROOTFS_CACHE`] and used read-only under a tmpfs overlay (`--volatile=overlay`), so a run
//! never modifies it and a second run does not wait for debootstrap. Everything this test creates
//! (machine, namespaces, bpffs mount, temporary directory) goes on success, failure and panic.
//!
//! Host packages: `debootstrap` and `systemd-container` (installed with apt-get if missing).
use serde_json::Value;
use std::{
    collections::BTreeMap,
    ffi::OsStr,
    io::{BufRead as _, BufReader},
    net::{IpAddr, SocketAddr, TcpStream},
    os::unix::{
        fs::{MetadataExt as _, PermissionsExt as _},
        process::CommandExt as _,
    },
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};
use tests::{
    cleanup_stale_namespaces, client_many, procs::poll, require_root, tally, Lab, LabSpec,
    LongLived, NetNs, TcpServer, VIP_V4,
};

/// The debootstrapped root file system, kept between runs (read-only to the containers).
const ROOTFS_CACHE: &str = "/var/cache/lb-tests/bookworm-rootfs";
/// Written last into a complete [`ROOTFS_CACHE`]; its content names how it was made, so a
/// change of the recipe makes a new one.
const ROOTFS_STAMP: &str = ".lb-tests-rootfs";
const DEBOOTSTRAP_ARGS: &[&str] = &[
    "--variant=minbase",
    "--include=systemd,dbus,iproute2",
    "bookworm",
];
const MIRROR: &str = "http://deb.debian.org/debian";
/// Host tools and the Debian packages that provide them.
const HOST_TOOLS: &[(&str, &str)] = &[
    ("debootstrap", "debootstrap"),
    ("systemd-nspawn", "systemd-container"),
];
/// The drop-in's WatchdogSec= (the unit ships 30 s).
const WATCHDOG: Duration = Duration::from_secs(4);
const VIP_PORT: u16 = 80;
const CONTROL_GROUP: &str = "lbops";
const MEMBER: &str = "lbop";
const STATE_FILE: &str = "/run/lb/lbd.sock.state";
const SOCKET: &str = "/run/lb/lbd.sock";
const CONFIG: &str = "/etc/lb/lbd.toml";
const DROPIN_DIR: &str = "/etc/systemd/system/lbd.service.d";

// --- small helpers ----------------------------------------------------------------------------

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is in the workspace")
        .to_path_buf()
}

/// The cargo profile this test was built with, so that `cargo xtask package` reuses the
/// binaries already built (`target/debug` is the `dev` profile).
fn cargo_profile() -> String {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target/<profile>/deps/<test>");
    match dir.file_name().and_then(OsStr::to_str) {
        Some("debug") | None => "dev".to_string(),
        Some(other) => other.to_string(),
    }
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Mount points at or below `dir` (deepest first), from /proc/self/mountinfo.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut found: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        // mountinfo escapes spaces and the like as \040; our paths have none.
        .map(PathBuf::from)
        .filter(|m| m.starts_with(dir))
        .collect();
    found.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    found.dedup();
    found
}

/// Removes `dir` after unmounting whatever is mounted below it (an interrupted debootstrap
/// leaves /proc mounted in its target; a run's bpffs). Refuses (loudly) to delete through a
/// mount that would not go.
fn remove_tree(dir: &Path) {
    if !dir.exists() {
        return;
    }
    for m in mounts_under(dir) {
        let _ = Command::new("umount").arg("-l").arg(&m).status();
    }
    let left = mounts_under(dir);
    if !left.is_empty() {
        eprintln!(
            "warning: not removing {}: still mounted below it: {left:?}",
            dir.display()
        );
        return;
    }
    if let Err(e) = std::fs::remove_dir_all(dir) {
        eprintln!("warning: removing {}: {e}", dir.display());
    }
}

/// Entries of `parent` named `<prefix><pid>` whose process is gone (left by a killed run).
fn stale_entries(parent: &Path, prefix: &str) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(parent) else {
        return Vec::new();
    };
    rd.flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix(prefix))
                .and_then(|p| p.parse::<u32>().ok())
                .is_some_and(|pid| pid != std::process::id() && !pid_alive(pid))
        })
        .map(|e| e.path())
        .collect()
}

// --- host preparation -----------------------------------------------------------------------

/// Installs the host tools this test needs when they are missing (a fresh machine), saying so.
fn ensure_host_tools() {
    let missing: Vec<&str> = HOST_TOOLS
        .iter()
        .filter(|(tool, _)| !have(tool))
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        return;
    }
    eprintln!(
        "e2e_systemd: installing {} with apt-get (the test boots a Debian container with \
         debootstrap and systemd-nspawn; `cargo xtask setup` should install them)",
        missing.join(" ")
    );
    let apt = |args: &[&str]| {
        let out = Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .output()
            .expect("running apt-get");
        assert!(
            out.status.success(),
            "apt-get {} failed; install {} by hand:\n{}",
            args.join(" "),
            missing.join(" "),
            text(&out)
        );
    };
    apt(&["update", "-q"]);
    let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
    args.extend(&missing);
    apt(&args);
    for (tool, pkg) in HOST_TOOLS {
        assert!(
            have(tool),
            "`{tool}` is still missing after installing {pkg}"
        );
    }
}

fn rootfs_stamp() -> String {
    format!("debootstrap {} {MIRROR}\n", DEBOOTSTRAP_ARGS.join(" "))
}

/// The cached root file system, made with debootstrap (about a minute) if it is not there yet.
/// Built under a temporary name and renamed when complete, so an interrupted build is never
/// taken for a cache (and is removed by the next run).
fn rootfs() -> PathBuf {
    let cache = PathBuf::from(ROOTFS_CACHE);
    let stamp = cache.join(ROOTFS_STAMP);
    if std::fs::read_to_string(&stamp).is_ok_and(|s| s == rootfs_stamp()) {
        return cache;
    }
    let parent = cache.parent().unwrap();
    std::fs::create_dir_all(parent).unwrap();
    let tmp_prefix = "bookworm-rootfs.tmp-";
    for stale in stale_entries(parent, tmp_prefix) {
        remove_tree(&stale);
    }
    struct Partial(PathBuf);
    impl Drop for Partial {
        fn drop(&mut self) {
            remove_tree(&self.0);
        }
    }
    let tmp = Partial(parent.join(format!("{tmp_prefix}{}", std::process::id())));
    remove_tree(&tmp.0);
    let started = Instant::now();
    eprintln!(
        "e2e_systemd: no cached root file system in {ROOTFS_CACHE}: debootstrap {} (once)",
        DEBOOTSTRAP_ARGS.join(" ")
    );
    let out = Command::new("debootstrap")
        .args(DEBOOTSTRAP_ARGS)
        .arg(&tmp.0)
        .arg(MIRROR)
        .stdin(Stdio::null())
        .output()
        .expect("running debootstrap");
    if !out.status.success() {
        let log =
            std::fs::read_to_string(tmp.0.join("debootstrap/debootstrap.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        panic!(
            "debootstrap failed (is {MIRROR} reachable?):\n{}\ndebootstrap.log (end):\n{}",
            text(&out),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    std::fs::write(tmp.0.join(ROOTFS_STAMP), rootfs_stamp()).unwrap();
    eprintln!("e2e_systemd: debootstrap took {:.0?}", started.elapsed());
    // An outdated cache (other stamp) makes way; a concurrent run that finished first wins.
    if cache.exists() {
        remove_tree(&cache);
    }
    if std::fs::rename(&tmp.0, &cache).is_err() && !stamp.exists() {
        panic!("cannot move {} to {ROOTFS_CACHE}", tmp.0.display());
    }
    cache
}

/// This run's directory: the .deb (bound read-only into the container) and the bpffs bound at
/// its /sys/fs/bpf. Unmounted and removed on drop.
struct RunDir {
    path: PathBuf,
}

const RUN_PREFIX: &str = "lb-e2e-systemd-";

impl RunDir {
    fn new() -> RunDir {
        let tmp = std::env::temp_dir();
        for stale in stale_entries(&tmp, RUN_PREFIX) {
            remove_tree(&stale);
        }
        let path = tmp.join(format!("{RUN_PREFIX}{}", std::process::id()));
        remove_tree(&path);
        let dir = RunDir { path };
        std::fs::create_dir_all(dir.deb_dir()).unwrap();
        std::fs::create_dir_all(dir.bpffs()).unwrap();
        let out = Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(dir.bpffs())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mounting a bpffs for the container:\n{}",
            text(&out)
        );
        dir
    }
    fn deb_dir(&self) -> PathBuf {
        self.path.join("deb")
    }
    fn bpffs(&self) -> PathBuf {
        self.path.join("bpffs")
    }
    fn log(&self) -> PathBuf {
        self.path.join("nspawn.log")
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        remove_tree(&self.path);
    }
}

/// `cargo xtask package` into the run directory; returns the .deb.
fn build_deb(run: &RunDir) -> PathBuf {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .args(["xtask", "package", "--profile", &cargo_profile(), "--out"])
        .arg(run.deb_dir())
        .current_dir(workspace_root())
        .stdin(Stdio::null())
        .output()
        .expect("starting cargo xtask package");
    assert!(
        out.status.success(),
        "cargo xtask package failed:\n{}",
        text(&out)
    );
    let debs: Vec<PathBuf> = std::fs::read_dir(run.deb_dir())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "deb"))
        .collect();
    assert_eq!(debs.len(), 1, "one .deb expected: {debs:?}");
    debs[0].clone()
}

// --- the machine ----------------------------------------------------------------------------

/// A booted container. Powered off (SIGTERM to nspawn: the container's systemd shuts down),
/// killed if that takes too long, on drop.
struct Machine {
    nspawn: Child,
    /// The container's PID 1, as the host sees it.
    leader: u32,
    log: PathBuf,
}

impl Machine {
    fn boot(rootfs: &Path, netns: &NetNs, run: &RunDir) -> Machine {
        let log = std::fs::File::create(run.log()).unwrap();
        let name = netns.name().to_string();
        let mut cmd = Command::new("systemd-nspawn");
        cmd.arg("--directory")
            .arg(rootfs)
            // The cache stays untouched: writes go to a tmpfs overlay that dies with the machine.
            .arg("--volatile=overlay")
            // No systemd-machined on the host to register with, nor a host systemd to make
            // a scope unit.
            .args(["--register=no", "--keep-unit", "--boot"])
            .arg(format!("--machine={name}"))
            // Our namespace as the container's network; --private-network also makes
            // /proc/sys/net writable inside (lbd turns forwarding on).
            .arg("--private-network")
            .arg(format!(
                "--network-namespace-path={}",
                netns.path().display()
            ))
            // What lbd.service's CapabilityBoundingSet= asks for, and bpffs.
            .arg("--capability=CAP_BPF,CAP_PERFMON,CAP_NET_ADMIN,CAP_SYS_ADMIN")
            // nspawn's own seccomp filter refuses bpf(2) with EPERM otherwise.
            .arg("--system-call-filter=bpf")
            .arg(format!("--bind={}:/sys/fs/bpf", run.bpffs().display()))
            .arg(format!(
                "--bind-ro={}:/srv/lb-test",
                run.deb_dir().display()
            ))
            .args([
                "--console=pipe",
                "--link-journal=no",
                "--resolv-conf=off",
                "--timezone=off",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        // If this test is killed (no Drop runs), nspawn gets SIGTERM and powers the container
        // off; the next run removes the namespaces and the run directory left behind.
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        let nspawn = cmd.spawn().expect("starting systemd-nspawn");
        let mut m = Machine {
            nspawn,
            leader: 0,
            log: run.log(),
        };
        let nspawn_pid = m.nspawn.id();
        m.leader = poll("the container's PID 1", Duration::from_secs(30), || {
            m.assert_running();
            netns.pids().into_iter().find(|&p| {
                let status =
                    std::fs::read_to_string(format!("/proc/{p}/status")).unwrap_or_default();
                let ppid = status
                    .lines()
                    .find_map(|l| l.strip_prefix("PPid:"))
                    .and_then(|v| v.trim().parse::<u32>().ok());
                let nspid_one = status
                    .lines()
                    .find_map(|l| l.strip_prefix("NSpid:"))
                    .is_some_and(|v| v.split_whitespace().last() == Some("1"));
                ppid == Some(nspawn_pid) && nspid_one
            })
        });
        let state = poll(
            "the container's systemd to finish booting",
            Duration::from_secs(90),
            || {
                m.assert_running();
                let out = m.run(&["systemctl", "is-system-running"]);
                let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
                matches!(s.as_str(), "running" | "degraded").then_some(s)
            },
        );
        if state == "degraded" {
            eprintln!(
                "container booted degraded:\n{}",
                m.stdout(&["systemctl", "--failed", "--no-pager"])
            );
        }
        m
    }

    fn assert_running(&mut self) {
        if let Some(s) = self.nspawn.try_wait().unwrap() {
            panic!(
                "systemd-nspawn exited ({s}):\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }

    /// `args` inside the container: all its namespaces (nsenter into its PID 1), a clean
    /// environment. Not in the container's cgroup or seccomp filter, but the unit's processes
    /// are started by the container's systemd, so they get both.
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--target={}", self.leader))
            .args([
                "--mount", "--uts", "--ipc", "--net", "--pid", "--root", "--wd",
            ])
            .args(args)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("LANG", "C.UTF-8")
            .env("SYSTEMD_PAGER", "")
            .env("SYSTEMD_COLORS", "0")
            .stdin(Stdio::null());
        cmd
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args)
            .output()
            .unwrap_or_else(|e| panic!("nsenter {args:?}: {e}"))
    }

    /// Runs `args`, asserting success; returns stdout.
    fn stdout(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "in the container: {}\n{}",
            args.join(" "),
            text(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn sh(&self, script: &str) -> String {
        self.stdout(&["sh", "-ec", script])
    }

    /// A path inside the container, as the host reaches it.
    fn path(&self, p: &str) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root{p}", self.leader))
    }

    fn write(&self, p: &str, content: &str, mode: u32) {
        let path = self.path(p);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, content).unwrap_or_else(|e| panic!("writing {p}: {e}"));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    fn read(&self, p: &str) -> String {
        std::fs::read_to_string(self.path(p)).unwrap_or_else(|e| panic!("reading {p}: {e}"))
    }

    /// `systemctl show -p ... lbd` as a map.
    fn show(&self, props: &[&str]) -> BTreeMap<String, String> {
        self.stdout(&["systemctl", "show", "-p", &props.join(","), "lbd"])
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn main_pid(&self) -> u32 {
        self.show(&["MainPID"])["MainPID"].parse().unwrap()
    }

    /// Polls until lbd is active with a main pid other than `old` and NRestarts reached
    /// `restarts`; returns the new pid.
    fn wait_restarted(&self, old: u32, restarts: u32, timeout: Duration) -> u32 {
        let end = Instant::now() + timeout;
        loop {
            let last = self.show(&["ActiveState", "SubState", "MainPID", "NRestarts"]);
            let pid: u32 = last["MainPID"].parse().unwrap_or(0);
            let n: u32 = last["NRestarts"].parse().unwrap_or(0);
            if last["ActiveState"] == "active" && pid != 0 && pid != old && n >= restarts {
                assert_eq!(n, restarts, "more restarts than expected: {last:?}");
                return pid;
            }
            assert!(
                Instant::now() < end,
                "lbd was not restarted within {timeout:?} (wanted NRestarts={restarts}, a main pid \
                 other than {old}); last: {last:?}\n{}",
                self.journal()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn systemctl(&self, args: &[&str]) -> Output {
        let mut all = vec!["systemctl"];
        all.extend(args);
        self.run(&all)
    }

    fn journal(&self) -> String {
        String::from_utf8_lossy(
            &self
                .run(&[
                    "journalctl",
                    "-u",
                    "lbd",
                    "--no-pager",
                    "-o",
                    "short-monotonic",
                ])
                .stdout,
        )
        .into_owned()
    }

    /// `lbctl --json ARGS` as root, parsed.
    fn lbctl_json(&self, args: &[&str]) -> Value {
        let mut all = vec!["lbctl", "--json"];
        all.extend(args);
        let out = self.stdout(&all);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("lbctl {args:?}: {e}: {out}"))
    }

    /// Kinds and messages of lbd's recent events (`lbctl status`).
    fn events(&self) -> Vec<(String, String)> {
        self.lbctl_json(&["status"])["events"]
            .as_array()
            .expect("events in lbctl status --json")
            .iter()
            .map(|e| {
                (
                    e["kind"].as_str().unwrap_or("").to_string(),
                    e["message"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect()
    }

    fn dropin(&self, name: &str, content: Option<&str>) {
        let p = format!("{DROPIN_DIR}/{name}");
        match content {
            Some(c) => self.write(&p, c, 0o644),
            None => std::fs::remove_file(self.path(&p)).unwrap(),
        }
        self.stdout(&["systemctl", "daemon-reload"]);
    }

    /// The shell's kill: a minimal Debian has no /bin/kill (procps).
    fn kill(&self, sig: &str, pid: u32) {
        self.sh(&format!("kill {sig} {pid}"));
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        if self.nspawn.try_wait().ok().flatten().is_some() {
            return;
        }
        // nspawn turns SIGTERM into SIGRTMIN+3 for the container's systemd: a poweroff.
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.nspawn.id() as i32, libc::SIGTERM) };
        let end = Instant::now() + Duration::from_secs(30);
        while Instant::now() < end {
            if self.nspawn.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("warning: the container did not power off within 30 s; killing it");
        let _ = self.nspawn.kill();
        let _ = self.nspawn.wait();
    }
}

// --- traffic --------------------------------------------------------------------------------

/// One connection of a [`ClientLoop`]: when it ended, and which backend answered (or why not).
type Attempt = (Instant, Result<String, String>);

/// New TCP connections to the VIP from the client namespace, one after the other, each
/// recorded as an [`Attempt`].
struct ClientLoop {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Vec<Attempt>>>,
}

impl ClientLoop {
    fn start(ns: &NetNs, vip: SocketAddr) -> ClientLoop {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = ns.thread(move || {
            let mut results = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                let r = (|| -> std::io::Result<String> {
                    let s = TcpStream::connect_timeout(&vip, Duration::from_secs(2))?;
                    s.set_read_timeout(Some(Duration::from_secs(2)))?;
                    let mut line = String::new();
                    BufReader::new(s).read_line(&mut line)?;
                    Ok(line.trim().to_string())
                })();
                results.push((Instant::now(), r.map_err(|e| e.to_string())));
                std::thread::sleep(Duration::from_millis(20));
            }
            results
        });
        ClientLoop {
            stop,
            handle: Some(handle),
        }
    }

    fn finish(mut self) -> Vec<Attempt> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .take()
            .unwrap()
            .join()
            .expect("client loop panicked")
    }
}

impl Drop for ClientLoop {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Asserts every connection of the loop succeeded and some ran while lbd was down
/// (`down..up`); returns (connections, connections while down).
fn assert_forwarded_throughout(
    results: &[Attempt],
    down: Instant,
    up: Instant,
    what: &str,
) -> (usize, usize) {
    let failed: Vec<&String> = results
        .iter()
        .filter_map(|(_, r)| r.as_ref().err())
        .collect();
    assert!(
        failed.is_empty(),
        "{what}: {} of {} new connections through the VIP failed: {:?}",
        failed.len(),
        results.len(),
        &failed[..failed.len().min(5)]
    );
    let during = results.iter().filter(|(t, _)| *t > down && *t < up).count();
    assert!(
        during > 0,
        "{what}: no connection completed while lbd was down ({:?} window)",
        up - down
    );
    (results.len(), during)
}

// --- the configuration ----------------------------------------------------------------------

fn config(backends: &[(IpAddr, u32)], table_size: u32) -> String {
    let mut t = format!(
        "# written by tests/e2e_systemd.rs\n\
         interface = \"eth0\"\nxdp_mode = \"native\"\ncontrol_group = \"{CONTROL_GROUP}\"\n\n\
         [[vip]]\naddress = \"{VIP_V4}\"\nport = {VIP_PORT}\nprotocol = \"tcp\"\n\
         forwarding = \"l2\"\ntable_size = {table_size}\n"
    );
    for (addr, weight) in backends {
        t.push_str(&format!(
            "\n[[vip.backend]]\naddress = \"{addr}\"\nweight = {weight}\n"
        ));
    }
    t
}

/// `lbctl backend list`: address -> (weight, slots, drained).
fn backends(m: &Machine) -> BTreeMap<String, (u64, u64, bool)> {
    m.lbctl_json(&["backend", "list"])
        .as_array()
        .expect("a list")
        .iter()
        .map(|b| {
            (
                b["address"].as_str().unwrap().to_string(),
                (
                    b["weight"].as_u64().unwrap(),
                    b["slots"].as_u64().unwrap(),
                    b["drained"].as_bool().unwrap(),
                ),
            )
        })
        .collect()
}

fn xdp_attached(lab: &Lab) -> bool {
    lab.lb()
        .ns()
        .ip(["link", "show", "dev", "eth0"])
        .is_ok_and(|s| s.contains("prog/xdp"))
}

fn has_unclean_stop(events: &[(String, String)], pid: u32) -> bool {
    events
        .iter()
        .any(|(k, m)| k == "unclean_stop" && m.contains(&format!("previous lbd (pid {pid},")))
}

fn step(t0: Instant, what: &str) {
    println!("[{:>6.1}s] {what}", t0.elapsed().as_secs_f64());
}

// --- the test -------------------------------------------------------------------------------

#[test]
fn lbd_under_systemd_in_a_container() {
    let t0 = Instant::now();
    require_root();
    if let Err(e) = cleanup_stale_namespaces() {
        eprintln!("warning: cleaning up stale namespaces: {e:#}");
    }
    ensure_host_tools();
    let rootfs = rootfs();
    step(t0, "root file system ready");

    // Locals drop in reverse order, which is the teardown order: traffic, the machine (it lives
    // in the lab's namespace), the servers, the lab, the run directory (the bpffs).
    let run = RunDir::new();
    let deb = build_deb(&run);
    step(t0, &format!("built {}", deb.display()));
    let lab = Lab::new(LabSpec { backends: 3 }).expect("building the lab");
    let vip = SocketAddr::new(IpAddr::from(VIP_V4), VIP_PORT);
    let servers: Vec<TcpServer> = (0..3)
        .map(|i| TcpServer::start(lab.backend(i).ns(), &[vip], &format!("backend{i}")).unwrap())
        .collect();
    let b: Vec<IpAddr> = (0..3).map(|i| IpAddr::from(lab.backend(i).v4())).collect();
    let machine = Machine::boot(&rootfs, lab.lb().ns(), &run);
    let m = &machine;
    step(
        t0,
        &format!("container booted (PID 1 is {} on the host)", m.leader),
    );

    // Install as an operator does; the postinst tells the running systemd (daemon-reload).
    let deb_name = deb.file_name().unwrap().to_str().unwrap();
    m.stdout(&["dpkg", "-i", &format!("/srv/lb-test/{deb_name}")]);
    let unit = m.stdout(&["systemctl", "cat", "lbd.service"]);
    println!(
        "installed lbd.service: {}",
        unit.lines()
            .filter(|l| l.starts_with("RuntimeDirectory") || l.starts_with("Restart"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    m.sh(&format!(
        "groupadd --system {CONTROL_GROUP}; useradd --no-create-home --groups {CONTROL_GROUP} {MEMBER}"
    ));
    // A shorter watchdog for scenario 4, set before the first start (one restart less).
    m.dropin(
        "50-test-watchdog.conf",
        Some(&format!("[Service]\nWatchdogSec={}\n", WATCHDOG.as_secs())),
    );
    let props = m.show(&["RestartUSec", "RuntimeDirectoryPreserve"]);
    println!("unit as loaded: {props:?}");
    let restart_sec: u64 = props["RestartUSec"]
        .trim_end_matches('s')
        .parse()
        .unwrap_or_else(|_| panic!("RestartUSec {:?}", props["RestartUSec"]));
    let restart_sec = Duration::from_secs(restart_sec);
    let mut weights = vec![(b[0], 1), (b[1], 1)];
    m.write(CONFIG, &config(&weights, 1021), 0o644);

    // 1. start: returns after READY=1, with the program attached.
    let started = Instant::now();
    let out = m.systemctl(&["start", "lbd"]);
    let start_time = started.elapsed();
    assert!(
        out.status.success(),
        "systemctl start lbd:\n{}\n{}",
        text(&out),
        m.journal()
    );
    // No polling: READY=1 means attached and tables built.
    assert!(
        xdp_attached(&lab),
        "systemctl start returned but no XDP program is attached:\n{}",
        lab.lb().ns().ip(["link"]).unwrap_or_default()
    );
    let s = m.show(&[
        "ActiveState",
        "SubState",
        "StatusText",
        "Type",
        "WatchdogUSec",
    ]);
    // (systemd reports the watchdog of the running process, so only once started.)
    assert_eq!(
        s["WatchdogUSec"],
        format!("{}s", WATCHDOG.as_secs()),
        "the drop-in's WatchdogSec="
    );
    assert_eq!(
        (
            s["ActiveState"].as_str(),
            s["SubState"].as_str(),
            s["Type"].as_str()
        ),
        ("active", "running", "notify"),
        "{s:?}"
    );
    assert_eq!(s["StatusText"], "balancing 1 VIPs on eth0");
    let status = m.stdout(&["systemctl", "status", "--no-pager", "lbd"]);
    assert!(
        status.contains("Status: \"balancing 1 VIPs on eth0\""),
        "systemctl status does not show lbd's STATUS= line:\n{status}"
    );
    let sock = std::fs::metadata(m.path(SOCKET)).expect("the control socket");
    assert_eq!(sock.mode() & 0o777, 0o660, "control socket mode");
    assert!(
        m.path(STATE_FILE).exists(),
        "no run-state file while running"
    );
    let r = client_many(lab.client().ns(), vip, 60, Duration::from_secs(3));
    let spread = tally(&r);
    assert!(
        r.iter().all(|r| r.is_ok()) && spread.len() == 2,
        "traffic after start: {spread:?} ({} failed)",
        r.iter().filter(|r| r.is_err()).count()
    );
    step(
        t0,
        &format!("1. systemctl start returned in {start_time:.1?}, attached, status line shown; VIP answers {spread:?}"),
    );

    // 2. reload: a good file is applied; a bad one fails the reload and changes nothing.
    let pid = m.main_pid();
    weights[1].1 = 3;
    let good = config(&weights, 1021);
    m.write(CONFIG, &good, 0o644);
    let out = m.systemctl(&["reload", "lbd"]);
    assert!(
        out.status.success(),
        "systemctl reload (good file):\n{}\n{}",
        text(&out),
        m.journal()
    );
    let list = poll(
        "the reloaded weight in lbctl backend list",
        Duration::from_secs(10),
        || {
            let l = backends(m);
            (l[&b[1].to_string()].0 == 3).then_some(l)
        },
    );
    assert!(
        list[&b[1].to_string()].1 > 2 * list[&b[0].to_string()].1,
        "weights 1:3 but slots {list:?}"
    );
    assert_eq!(m.main_pid(), pid, "reload restarted lbd");
    let bad = config(&weights, 1000).replace("weight = 3", "weight = 7");
    m.write(CONFIG, &bad, 0o644);
    let out = m.systemctl(&["reload", "lbd"]);
    assert!(
        !out.status.success(),
        "systemctl reload succeeded with a bad file (table_size 1000):\n{}",
        text(&out)
    );
    let journal = m.journal();
    assert!(
        journal.contains("not prime"),
        "the journal does not say why the reload failed:\n{journal}"
    );
    assert_eq!(backends(m), list, "a rejected reload changed the backends");
    let s = m.show(&["ActiveState", "MainPID", "StatusText"]);
    assert_eq!(s["ActiveState"], "active", "{s:?}");
    assert_eq!(s["MainPID"], pid.to_string());
    assert_eq!(s["StatusText"], "balancing 1 VIPs on eth0");
    m.write(CONFIG, &good, 0o644);
    step(
        t0,
        &format!(
            "2. reload applied weight 3 (slots {:?}); a bad file failed the reload (exit {}), nothing changed",
            list.values().map(|v| v.1).collect::<Vec<_>>(),
            out.status.code().unwrap_or(-1)
        ),
    );

    // 3. kill -9: restarted, forwarding meanwhile, and the new lbd knows.
    let mut long = LongLived::open(lab.client().ns(), vip, 24, Duration::from_secs(3))
        .expect("opening long-lived connections");
    let restarts: u32 = m.show(&["NRestarts"])["NRestarts"].parse().unwrap();
    let clients = ClientLoop::start(lab.client().ns(), vip);
    std::thread::sleep(Duration::from_millis(200));
    let old = m.main_pid();
    let down = Instant::now();
    m.kill("-KILL", old);
    let new = m.wait_restarted(old, restarts + 1, restart_sec + Duration::from_secs(20));
    let up = Instant::now();
    // Some connections after the restart too.
    std::thread::sleep(Duration::from_millis(300));
    let results = clients.finish();
    let (n, during) = assert_forwarded_throughout(&results, down, up, "kill -9");
    long.check_all()
        .expect("established connections across kill -9 and restart");
    assert!(xdp_attached(&lab));
    let events = m.events();
    assert!(
        has_unclean_stop(&events, old),
        "after kill -9 of lbd (pid {old}) and its restart by systemd (pid {new}), lbctl status \
         does not report unclean_stop: the run-state file {STATE_FILE} did not survive the \
         restart (RuntimeDirectoryPreserve= in lbd.service?). Events: {events:#?}"
    );
    step(
        t0,
        &format!(
            "3. kill -9 {old}: restarted as {new} after {:.1?}; {n} new connections ({during} while lbd was down) and 24 long-lived ones all fine; unclean_stop reported",
            up - down
        ),
    );

    // 3b. Control: with the old unit's behaviour (the directory removed at every stop) the same
    // kill goes unreported. Proves the assertion above is what catches a regression.
    m.dropin(
        "60-test-no-preserve.conf",
        Some("[Service]\nRuntimeDirectoryPreserve=no\n"),
    );
    let old = new;
    m.kill("-KILL", old);
    let new = m.wait_restarted(old, restarts + 2, restart_sec + Duration::from_secs(20));
    let events = m.events();
    assert!(
        !has_unclean_stop(&events, old) && events.iter().any(|(k, _)| k == "start"),
        "control run: with RuntimeDirectoryPreserve=no the state file should be gone: {events:#?}"
    );
    m.dropin("60-test-no-preserve.conf", None);
    step(
        t0,
        "3b. control: with RuntimeDirectoryPreserve=no the same kill -9 is NOT reported (the old unit's bug)",
    );

    // 4. A stalled main loop: the watchdog aborts lbd, systemd restarts it.
    let old = new;
    let stalled = Instant::now();
    m.kill("-STOP", old);
    let limit = WATCHDOG + restart_sec + Duration::from_secs(5);
    let new = m.wait_restarted(old, restarts + 3, limit + Duration::from_secs(20));
    let took = stalled.elapsed();
    let journal = m.journal();
    assert!(
        journal.contains("Watchdog timeout"),
        "lbd was restarted, but not by the watchdog:\n{journal}"
    );
    assert!(
        took <= limit,
        "the watchdog restart took {took:.1?}, more than WatchdogSec {WATCHDOG:?} + RestartSec \
         {restart_sec:?} + 5 s"
    );
    let events = m.events();
    assert!(
        has_unclean_stop(&events, old),
        "after the watchdog abort of pid {old}, no unclean_stop: {events:#?}"
    );
    long.check_all()
        .expect("established connections across the watchdog restart");
    step(
        t0,
        &format!("4. kill -STOP {old}: watchdog abort and restart as {new} after {took:.1?} (limit {limit:?}); unclean_stop reported"),
    );

    // 5a. Every documented operation under the unit's sandbox.
    let vip_name = format!("{VIP_V4}:{VIP_PORT}/tcp");
    let vip_name = vip_name.as_str();
    m.stdout(&["lbctl", "status"]);
    m.stdout(&["lbctl", "stats", "--interval", "0.2"]);
    // The metrics endpoint (AF_INET under RestrictAddressFamilies=), in the balancer's namespace.
    let metrics = tests::procs::scrape_metrics(lab.lb().ns());
    assert!(
        metrics.keys().any(|k| k.starts_with("lb_")),
        "no lb_ series in /metrics: {metrics:?}"
    );
    let b2 = b[2].to_string();
    m.stdout(&["lbctl", "backend", "add", vip_name, &b2, "--weight", "2"]);
    assert_eq!(backends(m)[&b2].0, 2);
    assert!(
        m.read(CONFIG).contains(&b2),
        "backend add was not written to {CONFIG}"
    );
    m.stdout(&["lbctl", "backend", "set-weight", vip_name, &b2, "5"]);
    assert_eq!(backends(m)[&b2].0, 5);
    m.stdout(&["lbctl", "backend", "drain", vip_name, &b2]);
    assert!(backends(m)[&b2].2, "drained");
    m.stdout(&["lbctl", "backend", "remove", vip_name, &b2]);
    assert!(!backends(m).contains_key(&b2));
    assert!(!m.read(CONFIG).contains(&b2), "backend remove not written");
    let meta = std::fs::metadata(m.path(CONFIG)).unwrap();
    assert_eq!(
        (meta.uid(), meta.mode() & 0o777),
        (0, 0o644),
        "lbd's rewrite of {CONFIG} changed its owner or mode"
    );
    let member = m.run(&[
        "setpriv",
        &format!("--reuid={MEMBER}"),
        &format!("--regid={MEMBER}"),
        "--init-groups",
        "lbctl",
        "status",
    ]);
    assert!(
        member.status.success(),
        "lbctl status as {MEMBER} (member of {CONTROL_GROUP}):\n{}",
        text(&member)
    );
    let other = m.run(&[
        "setpriv",
        "--reuid=nobody",
        "--regid=nogroup",
        "--clear-groups",
        "lbctl",
        "status",
    ]);
    assert_eq!(
        other.status.code(),
        Some(3),
        "lbctl status as nobody should be refused:\n{}",
        text(&other)
    );
    step(
        t0,
        "5a. lbctl status/stats, /metrics, backend add/set-weight/drain/remove (written back), status as a control_group member work; nobody is refused",
    );

    // 5b. A clean stop: forwarding goes on, and the next start knows the stop was clean.
    let stopped = m.main_pid();
    let out = m.systemctl(&["stop", "lbd"]);
    assert!(out.status.success(), "systemctl stop:\n{}", text(&out));
    let s = m.show(&["ActiveState", "Result"]);
    assert_eq!(
        (s["ActiveState"].as_str(), s["Result"].as_str()),
        ("inactive", "success"),
        "{s:?}"
    );
    assert!(
        xdp_attached(&lab),
        "systemctl stop detached the pinned program"
    );
    long.check_all()
        .expect("established connections with lbd stopped");
    let r = client_many(lab.client().ns(), vip, 50, Duration::from_secs(3));
    assert!(
        r.iter().all(|r| r.is_ok()),
        "new connections with lbd stopped: {:?}",
        tally(&r)
    );
    assert!(
        !m.path(STATE_FILE).exists() && !m.path(SOCKET).exists(),
        "a clean stop left the socket or the run-state file behind"
    );
    let out = m.systemctl(&["start", "lbd"]);
    assert!(out.status.success(), "systemctl start:\n{}", text(&out));
    // The journal keeps the earlier kills (it is the operator's history): only this stop's
    // lbd must not be reported.
    let events = m.events();
    assert!(
        !has_unclean_stop(&events, stopped)
            && events
                .iter()
                .rev()
                .find(|(k, _)| k == "start")
                .is_some_and(|(_, m)| m.contains("restored from pins")),
        "after a clean stop, the next start must restore the pins and report no unclean stop: {events:#?}"
    );
    step(
        t0,
        "5b. systemctl stop: datapath kept forwarding (new and established flows); next start: restored from pins, no unclean_stop",
    );

    // 5c. Killed, then stopped by the operator before systemd restarted it: the run-state file
    // is still there for the next start.
    let old = m.main_pid();
    m.kill("-KILL", old);
    poll(
        "lbd waiting to be restarted",
        Duration::from_secs(10),
        || {
            let s = m.show(&["SubState"]);
            (s["SubState"] == "auto-restart").then_some(())
        },
    );
    let out = m.systemctl(&["stop", "lbd"]);
    assert!(out.status.success(), "systemctl stop:\n{}", text(&out));
    assert!(
        m.path(STATE_FILE).exists(),
        "{STATE_FILE} is gone after kill -9 and systemctl stop: the next start cannot report the unclean stop"
    );
    let out = m.systemctl(&["start", "lbd"]);
    assert!(out.status.success(), "systemctl start:\n{}", text(&out));
    let events = m.events();
    assert!(
        has_unclean_stop(&events, old),
        "kill -9 then systemctl stop then start: no unclean_stop for pid {old}: {events:#?}"
    );
    step(
        t0,
        "5c. kill -9, systemctl stop before the restart, start: unclean_stop still reported",
    );

    // 5d. A crash loop ends in the start limit (one start per minute here, by a drop-in): the
    // unit fails for good and systemd cleans up after it. The run-state file must stay for the
    // operator's next start; RuntimeDirectoryPreserve=restart removes it at this point.
    m.dropin(
        "70-test-start-limit.conf",
        Some("[Unit]\nStartLimitIntervalSec=60\nStartLimitBurst=1\n"),
    );
    // daemon-reload forgot the earlier starts; this one uses up the minute's single start.
    let out = m.systemctl(&["restart", "lbd"]);
    assert!(out.status.success(), "systemctl restart:\n{}", text(&out));
    let old = m.main_pid();
    m.kill("-KILL", old);
    let s = poll(
        "the restart refused by the start limit",
        Duration::from_secs(20),
        || {
            let s = m.show(&["ActiveState", "Result"]);
            (s["ActiveState"] == "failed").then_some(s)
        },
    );
    // (Result= keeps the crash's "signal"; the journal says why no restart came.)
    let journal = m.journal();
    assert!(
        journal.contains("Start request repeated too quickly"),
        "lbd failed ({s:?}) but not by the start limit:\n{journal}"
    );
    let kept = m.path(STATE_FILE).exists();
    m.dropin("70-test-start-limit.conf", None);
    assert!(
        kept,
        "{STATE_FILE} is gone once the start limit failed the unit: the next start cannot report the unclean stop"
    );
    m.stdout(&["systemctl", "reset-failed", "lbd"]);
    let out = m.systemctl(&["start", "lbd"]);
    assert!(out.status.success(), "systemctl start:\n{}", text(&out));
    let events = m.events();
    assert!(
        has_unclean_stop(&events, old),
        "kill -9, start limit hit, reset-failed, start: no unclean_stop for pid {old}: {events:#?}"
    );
    step(
        t0,
        "5d. kill -9 with the start limit reached: unit failed, state file kept, next start reports unclean_stop",
    );

    // 5e. lbd cleanup takes the datapath down for good.
    m.stdout(&["systemctl", "stop", "lbd"]);
    assert!(xdp_attached(&lab));
    m.stdout(&["lbd", "cleanup"]);
    assert!(!xdp_attached(&lab), "lbd cleanup left the program attached");
    let left: Vec<String> = std::fs::read_dir(m.path("/sys/fs/bpf/lb"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    assert!(left.is_empty(), "lbd cleanup left pins: {left:?}");
    step(
        t0,
        "5e. systemctl stop + lbd cleanup: detached, no pins left",
    );

    drop(machine);
    drop(servers);
    lab.shutdown().expect("tearing down the lab");
    drop(run);
    step(t0, "torn down");
}
