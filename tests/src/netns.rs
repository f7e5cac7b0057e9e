//! [`NetNs`]: a named network namespace that is deleted, together with every process
//! still running inside it, when the guard is dropped.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Every namespace this crate names starts with this, followed by the pid of the process that
/// made it (see [`unique_prefix`] and [`cleanup_stale_namespaces`]).
pub const NS_PREFIX: &str = "lbt-";

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A name prefix unique within this machine for as long as this process lives:
/// `lbt-<pid>-<counter>`. Tests running in parallel (threads of one test binary, or several test
/// binaries) never collide because the pid differs between processes and the counter within one.
pub fn unique_prefix() -> String {
    format!(
        "{NS_PREFIX}{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Names of all named network namespaces (`ip netns list`, first column).
pub fn list_namespaces() -> Result<Vec<String>> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .context("running `ip netns list` (is iproute2 installed?)")?;
    if !out.status.success() {
        bail!(
            "`ip netns list` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect())
}

/// Deletes namespaces left behind by earlier runs that were killed before their guards could
/// clean up: those named `lbt-<pid>-...` whose `<pid>` is no longer a running process.
/// Returns the names it deleted. Namespaces of live processes (parallel runs) are left alone.
pub fn cleanup_stale_namespaces() -> Result<Vec<String>> {
    let mut deleted = Vec::new();
    for name in list_namespaces()? {
        let Some(rest) = name.strip_prefix(NS_PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if PathBuf::from(format!("/proc/{pid}")).exists() {
            continue;
        }
        if let Ok(inode) = ns_inode(&name) {
            kill_in_namespace(inode, &[], Duration::from_millis(500));
        }
        let status = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status()?;
        if status.success() {
            deleted.push(name);
        }
    }
    Ok(deleted)
}

fn ns_path(name: &str) -> PathBuf {
    PathBuf::from("/run/netns").join(name)
}

fn ns_inode(name: &str) -> io::Result<u64> {
    Ok(std::fs::metadata(ns_path(name))?.ino())
}

/// Pids of all processes (not threads) whose network namespace has inode `inode`,
/// excluding this process.
fn pids_in_namespace(inode: u64) -> Vec<u32> {
    let me = std::process::id();
    let want = format!("net:[{inode}]");
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            std::fs::read_link(format!("/proc/{pid}/ns/net"))
                .map(|l| l.as_os_str() == OsStr::new(&want))
                .unwrap_or(false)
        })
        .collect()
}

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// SIGTERM every process in the namespace (plus `extra` pids, if they are still in it), give them
/// `grace` to exit, then SIGKILL what is left and wait (bounded) until none remain.
fn kill_in_namespace(inode: u64, extra: &[u32], grace: Duration) {
    let in_ns = |pids: &mut Vec<u32>| {
        let mut all = pids_in_namespace(inode);
        // Tracked children are normally found by the scan too; listing them explicitly only
        // matters if /proc could not be read for some reason.
        for &p in extra {
            let link = std::fs::read_link(format!("/proc/{p}/ns/net"));
            if link.is_ok_and(|l| l.as_os_str() == OsStr::new(&format!("net:[{inode}]")))
                && !all.contains(&p)
            {
                all.push(p);
            }
        }
        *pids = all;
    };
    let mut pids = Vec::new();
    in_ns(&mut pids);
    if pids.is_empty() {
        return;
    }
    for &p in &pids {
        signal(p, libc::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        in_ns(&mut pids);
        if pids.is_empty() {
            return;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        for &p in &pids {
            signal(p, libc::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(20));
        in_ns(&mut pids);
        if pids.is_empty() || Instant::now() > deadline {
            return;
        }
    }
}

/// A named network namespace (`ip netns add`), deleted on drop (`ip netns del`).
///
/// Processes started with [`NetNs::spawn`]/[`NetNs::spawn_command`] are tracked; on drop every
/// process still inside the namespace (tracked or not, e.g. nginx workers) gets SIGTERM, then
/// SIGKILL after a short grace period, before the namespace is deleted.
///
/// Sockets created inside the namespace (e.g. in [`NetNs::run_in`]) stay in it for their whole
/// life, and may be used from any thread afterwards.
#[derive(Debug)]
pub struct NetNs {
    name: String,
    inode: u64,
    children: Mutex<Vec<u32>>,
    deleted: bool,
}

/// A veth pair for [`NetNs::add_veth`]: `name` in the namespace that creates it, `peer` in
/// `peer_ns` (or beside it), both with `mtu` and with the MACs given (the kernel's otherwise).
#[derive(Clone, Copy, Debug)]
pub struct Veth<'a> {
    pub name: &'a str,
    pub peer: &'a str,
    pub mtu: u32,
    pub mac: Option<&'a str>,
    pub peer_mac: Option<&'a str>,
    pub peer_ns: Option<&'a NetNs>,
}

impl NetNs {
    /// Creates a namespace named `lbt-<pid>-<counter>-<role>` (see [`unique_prefix`]).
    pub fn new(role: &str) -> Result<Self> {
        Self::with_name(format!("{}-{role}", unique_prefix()))
    }

    /// Creates a namespace with exactly this name (`ip netns add NAME`). Prefer [`NetNs::new`]
    /// unless the name already carries a [`unique_prefix`].
    pub fn with_name(name: impl Into<String>) -> Result<Self> {
        let name = name.into();
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .context("running `ip netns add` (is iproute2 installed?)")?;
        if !out.status.success() {
            bail!(
                "`ip netns add {name}` failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let inode = match ns_inode(&name) {
            Ok(i) => i,
            Err(e) => {
                let _ = Command::new("ip").args(["netns", "del", &name]).status();
                return Err(e).with_context(|| format!("stat /run/netns/{name}"));
            }
        };
        Ok(Self {
            name,
            inode,
            children: Mutex::new(Vec::new()),
            deleted: false,
        })
    }

    /// The namespace's name, as `ip netns list` shows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`.
    pub fn path(&self) -> PathBuf {
        ns_path(&self.name)
    }

    /// A [`Command`] that runs `program` inside the namespace (`ip netns exec NAME program`).
    /// Add arguments and stdio as usual; start it with [`NetNs::spawn_command`] to have it
    /// tracked, or with `output()`/`status()` for short commands.
    ///
    /// `ip netns exec` runs the program in a private mount namespace with a fresh `/sys` (so
    /// `/sys/class/net` shows the namespace's devices); a bpffs mounted on `/sys/fs/bpf` in the
    /// root mount namespace is therefore not visible to it. Programs that pin BPF objects
    /// should mount their own bpffs or pin elsewhere.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Runs `program args...` inside the namespace to completion and returns its output
    /// (stdin is null, stdout/stderr captured). Panics only if `ip` itself cannot be started.
    pub fn exec<I, S>(&self, program: &str, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.command(program)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run `ip netns exec {} {program}`: {e}", self.name))
    }

    /// Like [`NetNs::exec`], but fails unless the command exits 0; returns its stdout.
    pub fn exec_ok<I, S>(&self, program: &str, args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args: Vec<_> = args
            .into_iter()
            .map(|a| a.as_ref().to_os_string())
            .collect();
        let out = self.exec(program, &args);
        check_output(
            out,
            &format!("[{}] {program} {}", self.name, join_args(&args)),
        )
    }

    /// Runs `ip -n NAME args...` (iproute2 inside the namespace); fails on a non-zero exit and
    /// returns stdout.
    pub fn ip<I, S>(&self, args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args: Vec<_> = args
            .into_iter()
            .map(|a| a.as_ref().to_os_string())
            .collect();
        let out = Command::new("ip")
            .args(["-n", &self.name])
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .context("running `ip`")?;
        check_output(out, &format!("ip -n {} {}", self.name, join_args(&args)))
    }

    /// Writes each `(key, value)` to `/proc/sys/KEY` inside the namespace.
    pub fn sysctls(&self, pairs: &[(&str, &str)]) -> Result<()> {
        self.run_in(|| -> Result<()> {
            for (k, v) in pairs {
                let path = format!("/proc/sys/{k}");
                std::fs::write(&path, v).with_context(|| format!("writing {v} to {path}"))?;
            }
            Ok(())
        })
    }

    /// Creates the veth pair `v` here (its peer moved to `v.peer_ns` if set).
    pub fn add_veth(&self, v: &Veth) -> Result<()> {
        let mtu = v.mtu.to_string();
        let mut args = vec!["link", "add", v.name, "mtu", &mtu];
        if let Some(mac) = v.mac {
            args.extend(["address", mac]);
        }
        args.extend(["type", "veth", "peer", "name", v.peer, "mtu", &mtu]);
        if let Some(mac) = v.peer_mac {
            args.extend(["address", mac]);
        }
        if let Some(ns) = v.peer_ns {
            args.extend(["netns", ns.name()]);
        }
        self.ip(args).map(drop)
    }

    /// Gives `dev` the addresses `v4` and `v6` (with their prefix lengths; IPv6 without
    /// duplicate address detection) and sets it up.
    pub fn addrs_up(&self, dev: &str, v4: &str, v6: &str) -> Result<()> {
        self.ip(["addr", "add", v4, "dev", dev])?;
        self.ip(["-6", "addr", "add", v6, "dev", dev, "nodad"])?;
        self.ip(["link", "set", dev, "up"]).map(drop)
    }

    /// Starts `program args...` inside the namespace (stdin null, stdout/stderr inherited) and
    /// tracks it: it is killed when the guard drops. Panics if it cannot be started.
    pub fn spawn<I, S>(&self, program: &str, args: I) -> Child
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = self.command(program);
        cmd.args(args).stdin(Stdio::null());
        self.spawn_command(&mut cmd)
            .unwrap_or_else(|e| panic!("cannot start `{program}` in {}: {e}", self.name))
    }

    /// Spawns a command built with [`NetNs::command`] and tracks its pid (`ip netns exec` execs
    /// the program in place, so the pid is the program's). Tracked processes are killed on drop.
    pub fn spawn_command(&self, cmd: &mut Command) -> io::Result<Child> {
        let child = cmd.spawn()?;
        self.children.lock().unwrap().push(child.id());
        Ok(child)
    }

    /// Pids of the processes currently inside the namespace (like `ip netns pids`).
    pub fn pids(&self) -> Vec<u32> {
        pids_in_namespace(self.inode)
    }

    /// Moves the *calling thread* into the namespace (`setns(fd, CLONE_NEWNET)`). Sockets it
    /// creates afterwards live in the namespace. Prefer [`NetNs::run_in`]/[`NetNs::thread`],
    /// which do this on a fresh thread so the caller's thread is never affected.
    pub fn enter_current_thread(&self) -> io::Result<()> {
        let file = self.open()?;
        setns(&file)
    }

    fn open(&self) -> io::Result<File> {
        File::open(self.path())
    }

    /// Runs `f` on a new thread that first entered the namespace, waits for it, and returns its
    /// result (a panic in `f` is propagated). Cheap enough (one thread) to call per operation.
    ///
    /// Inside, sockets, ioctls, netlink and `/proc/sys/net` see the namespace, but `/proc/net`
    /// is `/proc/self/net` (the process's main thread): read `/proc/thread-self/net` instead.
    pub fn run_in<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let file = self
            .open()
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", self.path().display()));
        let name = &self.name;
        std::thread::scope(|s| {
            let handle = s.spawn(move || {
                setns(&file).unwrap_or_else(|e| panic!("setns into {name}: {e}"));
                drop(file);
                f()
            });
            match handle.join() {
                Ok(v) => v,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// Starts a long-running thread inside the namespace. Join it before the namespace is
    /// dropped: a thread still inside keeps the (already unnamed) namespace alive.
    pub fn thread<T, F>(&self, f: F) -> JoinHandle<T>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let file = self
            .open()
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", self.path().display()));
        let name = self.name.clone();
        std::thread::Builder::new()
            .name(format!("ns-{name}"))
            .spawn(move || {
                setns(&file).unwrap_or_else(|e| panic!("setns into {name}: {e}"));
                drop(file);
                f()
            })
            .expect("spawning a thread")
    }

    /// Kills the processes inside and deletes the namespace, reporting failure (drop does the
    /// same but can only print errors).
    pub fn delete(mut self) -> Result<()> {
        self.delete_inner()
    }

    fn delete_inner(&mut self) -> Result<()> {
        if self.deleted {
            return Ok(());
        }
        self.deleted = true;
        let tracked = std::mem::take(&mut *self.children.lock().unwrap());
        kill_in_namespace(self.inode, &tracked, Duration::from_secs(2));
        if !self.path().exists() {
            // Already deleted behind the guard's back (a test removing a host on purpose):
            // nothing left to delete.
            return Ok(());
        }
        let out = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output()
            .context("running `ip netns del`")?;
        if !out.status.success() {
            bail!(
                "`ip netns del {}` failed: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let left = self.pids();
        if !left.is_empty() {
            bail!(
                "processes {left:?} were still inside {} when it was deleted",
                self.name
            );
        }
        Ok(())
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(e) = self.delete_inner() {
            eprintln!(
                "warning: cleaning up network namespace {}: {e:#}",
                self.name
            );
        }
    }
}

fn setns(file: &File) -> io::Result<()> {
    // SAFETY: the fd is valid for the duration of the call; setns has no other preconditions.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn join_args(args: &[std::ffi::OsString]) -> String {
    args.iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

fn check_output(out: Output, what: &str) -> Result<String> {
    if !out.status.success() {
        bail!(
            "`{what}` failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
