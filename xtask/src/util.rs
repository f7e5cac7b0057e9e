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
/// toolchain exported for lb-userspace's build script.
pub fn cargo() -> Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace_root());
    // `$LB_EBPF_TOOLCHAIN` if the caller set it, else what the machine has.
    if let Ok(tc) = setup::detect_bpf_toolchain() {
        cmd.env(setup::TOOLCHAIN_ENV, tc);
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

/// Fails with a message unless running as root.
pub fn ensure_root(what: &str) -> Result<()> {
    if !tests::is_root() {
        bail!(
            "`cargo xtask {what}` needs root (network namespaces, veth, XDP, apt-get): \
             run `sudo cargo xtask {what}`"
        );
    }
    Ok(())
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

/// A directory under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates `$TMPDIR/lb-xtask-<pid>-<label>`.
    pub fn new(label: &str) -> Result<Self> {
        let path = std::env::temp_dir().join(format!("lb-xtask-{}-{label}", std::process::id()));
        if path.exists() {
            std::fs::remove_dir_all(&path)?;
        }
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self(path))
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
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
