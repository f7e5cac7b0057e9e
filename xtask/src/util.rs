//! Small helpers: workspace paths, cargo invocations, temp dirs, Ctrl-C, and `xtask test`.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::setup;

/// The workspace root (parent of `xtask/`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// The cargo target directory (`$CARGO_TARGET_DIR` or `<root>/target`).
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// A `cargo` command (the cargo that runs us, if known) in the workspace root, with the eBPF
/// toolchain exported for lb-userspace's build script and cargo's bin directory on `PATH` (where
/// setup installs bpf-linker).
pub fn cargo() -> Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace_root());
    // `$LB_EBPF_TOOLCHAIN` if the caller set it, else what the machine has.
    if let Ok(tc) = setup::detect_bpf_toolchain() {
        cmd.env(setup::TOOLCHAIN_ENV, tc);
    }
    if let Some(path) = setup::path_with_cargo_bin() {
        cmd.env("PATH", path);
    }
    cmd
}

/// Runs a command, echoing it first; fails on a non-zero exit.
pub fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("+ {}", show(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("starting `{}`", show(cmd)))?;
    if !status.success() {
        bail!("`{}` failed ({status})", show(cmd));
    }
    Ok(())
}

/// A command line for messages.
pub fn show(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(OsStr::to_string_lossy)
        .collect::<Vec<_>>()
        .join(" ")
}

pub use tests::ensure_root;

/// The arguments of a command that [`run_tool`] runs, passed on as they are (its `--help`
/// lists them).
#[derive(clap::Args, Debug)]
pub struct ToolArgs {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<String>,
}

/// Builds the tool binary `bin` of the tests crate in xtask's own profile (a release xtask
/// measures with a release tool) and runs it with `args`, returning its exit status: the
/// commands that load lb's XDP programs (`bench datapath`, `bench conntrack`, `fuzz`) run
/// there, so that xtask itself builds no eBPF.
pub fn run_tool(bin: &str, args: &[String]) -> Result<ExitCode> {
    run_tool_with(bin, &[], args)
}

/// [`run_tool`], building lb-userspace's binaries `also` (`lbd`, `lbctl`) beside the tool
/// first, in the same profile, for a tool that runs them (`bench flood`).
pub fn run_tool_with(bin: &str, also: &[&str], args: &[String]) -> Result<ExitCode> {
    let (profile, dir) = if cfg!(debug_assertions) {
        ("dev", "debug")
    } else {
        ("release", "release")
    };
    let mut build = cargo();
    build.args([
        "build",
        "--quiet",
        "--profile",
        profile,
        "-p",
        "tests",
        "--bin",
        bin,
    ]);
    if !also.is_empty() {
        build.args(["-p", "lb-userspace"]);
        for b in also {
            build.args(["--bin", b]);
        }
    }
    run(&mut build)?;
    let path = target_dir().join(dir).join(bin);
    let status = Command::new(&path)
        .args(args)
        .status()
        .with_context(|| format!("starting {}", path.display()))?;
    Ok(match status.code() {
        Some(0) => ExitCode::SUCCESS,
        Some(c) => ExitCode::from(u8::try_from(c).unwrap_or(1)),
        None => {
            eprintln!("{bin} was killed ({status})");
            ExitCode::FAILURE
        }
    })
}

/// `cargo xtask test`: root check, setup, build everything, run every test.
pub fn test(args: &[String]) -> Result<ExitCode> {
    ensure_root("test")?;
    setup::setup()?;
    match tests::cleanup_stale_namespaces() {
        Ok(gone) if !gone.is_empty() => {
            eprintln!("removed stale namespaces from killed runs: {gone:?}")
        }
        Ok(_) => {}
        Err(e) => eprintln!("warning: looking for stale namespaces: {e:#}"),
    }
    run(cargo().args(["build", "--workspace", "--all-targets"]))?;
    let mut cmd = cargo();
    // Run every test binary even if one fails, so one broken suite doesn't hide the others;
    // the exit status still reports the failure.
    cmd.args(["test", "--workspace", "--no-fail-fast"])
        .args(args);
    eprintln!("+ {}", show(&cmd));
    let status = cmd.status().context("starting cargo test")?;
    Ok(if status.success() {
        ExitCode::SUCCESS
    } else {
        eprintln!("cargo test failed ({status})");
        ExitCode::FAILURE
    })
}

/// A directory under the system temp dir, `$TMPDIR/lb-xtask-<pid>-<label>`: removed on drop,
/// or kept after the run ([`TempDir::kept`]).
pub struct TempDir {
    path: PathBuf,
    remove: bool,
}

impl TempDir {
    /// Creates `$TMPDIR/lb-xtask-<pid>-<label>`, removed on drop.
    pub fn new(label: &str) -> Result<Self> {
        Self::create(label, true)
    }

    /// Creates `$TMPDIR/lb-xtask-<pid>-<label>` and keeps it after the run, so that its logs can
    /// be read afterwards. The kept directories of earlier runs with the same label (whose
    /// process is gone) are removed first, so only the last run's stays.
    pub fn kept(label: &str) -> Result<Self> {
        let suffix = format!("-{label}");
        if let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let pid = name
                    .strip_prefix("lb-xtask-")
                    .and_then(|r| r.strip_suffix(&suffix))
                    .and_then(|p| p.parse::<i32>().ok());
                if pid.is_some_and(|p| !process_alive(p)) {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        Self::create(label, false)
    }

    fn create(label: &str, remove: bool) -> Result<Self> {
        let path = std::env::temp_dir().join(format!("lb-xtask-{}-{label}", std::process::id()));
        if path.exists() {
            std::fs::remove_dir_all(&path)?;
        }
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { path, remove })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if self.remove {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Whether process `pid` exists.
fn process_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists and may be signalled.
    let exists = unsafe { libc::kill(pid, 0) == 0 };
    exists || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// The last `n` lines of the file at `path`, for failure messages.
pub fn log_tail(path: &Path, n: usize) -> String {
    match std::fs::read_to_string(path) {
        Ok(log) => {
            let lines: Vec<&str> = log.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        }
        Err(e) => format!("(no log at {}: {e})", path.display()),
    }
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Turns SIGINT/SIGTERM into a flag ([`interrupted`]) so that long runs stop at the next check
/// and still tear their lab down.
pub fn catch_interrupts() {
    let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGTERM, handler);
    }
}

/// Whether Ctrl-C (or SIGTERM) arrived since [`catch_interrupts`].
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Fails if interrupted.
pub fn check_interrupted() -> Result<()> {
    if interrupted() {
        bail!("interrupted");
    }
    Ok(())
}

/// Sleeps up to `d`, returning early (false) if interrupted.
pub fn sleep_unless_interrupted(d: Duration) -> bool {
    let end = Instant::now() + d;
    while Instant::now() < end {
        if interrupted() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100).min(end - Instant::now()));
    }
    !interrupted()
}
