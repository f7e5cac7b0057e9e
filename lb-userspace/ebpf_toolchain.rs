//! The eBPF toolchain: a nightly with `rust-src` and `bpf-linker` 0.10.0. Shared (by `#[path]`)
//! between `cargo xtask setup`, which installs what is missing, and lb-userspace's build script,
//! which only detects it and fails naming the command to run: a build script must not reach the
//! network (distribution builders forbid it), and xtask builds no eBPF, so setup runs first.
//! Only `std` and `anyhow`, which both users already have.

#![allow(dead_code)] // each user calls a different part

use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

/// Every "nothing to do" message ends with this, so a caller can keep quiet about them.
pub const PRESENT: &str = "already installed";
/// Toolchain used when the machine has no floating `nightly` toolchain.
pub const PINNED_NIGHTLY: &str = "nightly-2026-05-19";
/// Environment variable naming the eBPF toolchain (read by lb-userspace's build script).
pub const TOOLCHAIN_ENV: &str = "LB_EBPF_TOOLCHAIN";
/// The bpf-linker version the eBPF build is known to work with (it links rustc's LLVM 22).
pub const BPF_LINKER_VERSION: &str = "0.10.0";

/// A command with the caller's cargo/rustup environment removed: a build script runs with
/// `CARGO_*`, `RUSTC*` and `RUSTUP_TOOLCHAIN` set for its own crate, which would otherwise
/// leak into the nested `cargo install` or pin `rustup` to the stable toolchain.
pub fn clean(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new(program);
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        let keep = k == "CARGO_HOME" || k == "RUSTUP_HOME";
        if !keep
            && (k.starts_with("CARGO")
                || k.starts_with("RUSTC")
                || k.starts_with("RUSTUP_TOOLCHAIN")
                || k == "RUSTFLAGS"
                || k == "RUSTDOCFLAGS"
                || k == "TARGET"
                || k == "HOST"
                || k == "OUT_DIR"
                || k == "MAKEFLAGS"
                || k == "MFLAGS")
        {
            cmd.env_remove(&*k);
        }
    }
    cmd
}

fn run(mut cmd: Command, log: &dyn Fn(&str)) -> Result<()> {
    let shown: Vec<String> = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let shown = shown.join(" ");
    log(&format!("running `{shown}`"));
    // Output goes to our stderr, beside setup's own messages.
    let status = cmd
        .stdout(Stdio::null())
        .status()
        .with_context(|| format!("starting `{shown}`"))?;
    if !status.success() {
        bail!("`{shown}` failed with {status}");
    }
    Ok(())
}

fn rustup_toolchains() -> Result<Vec<String>> {
    let out = clean("rustup")
        .args(["toolchain", "list"])
        .output()
        .context("running `rustup toolchain list` (is rustup installed?)")?;
    if !out.status.success() {
        bail!("`rustup toolchain list` failed");
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect())
}

/// `$LB_EBPF_TOOLCHAIN` if set, else `nightly` if the machine has a floating nightly toolchain
/// (`nightly-<host>`), else [`PINNED_NIGHTLY`]. Installs nothing.
pub fn detect_bpf_toolchain() -> Result<String> {
    if let Ok(tc) = std::env::var(TOOLCHAIN_ENV) {
        if !tc.is_empty() {
            return Ok(tc);
        }
    }
    let has_floating_nightly = rustup_toolchains()?.iter().any(|t| {
        t.strip_prefix("nightly-")
            .is_some_and(|rest| !rest.starts_with(|c: char| c.is_ascii_digit()))
    });
    Ok(if has_floating_nightly {
        "nightly".into()
    } else {
        PINNED_NIGHTLY.into()
    })
}

/// A piece of the eBPF toolchain that is missing, and the command that installs it.
pub struct Missing {
    /// What is missing, for messages ("rust-src for nightly").
    pub what: String,
    /// The command that installs it (program and arguments).
    pub install: Vec<String>,
}

impl Missing {
    /// The install command as one would type it.
    pub fn command(&self) -> String {
        self.install.join(" ")
    }
}

fn args(words: &[&str]) -> Vec<String> {
    words.iter().map(|w| (*w).to_owned()).collect()
}

/// Whether toolchain `tc` is installed with `rust-src` (needed for `-Z build-std=core`); if
/// not, what to install. Installs nothing.
pub fn missing_rust_src(tc: &str) -> Result<Option<Missing>> {
    let installed = rustup_toolchains()?
        .iter()
        .any(|t| t == tc || t.starts_with(&format!("{tc}-")));
    if !installed {
        return Ok(Some(Missing {
            what: format!("toolchain {tc} with rust-src"),
            install: args(&[
                "rustup",
                "toolchain",
                "install",
                tc,
                "--profile",
                "minimal",
                "--component",
                "rust-src",
            ]),
        }));
    }
    let out = clean("rustup")
        .args(["component", "list", "--installed", "--toolchain", tc])
        .output()
        .context("running `rustup component list`")?;
    let has_src = String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.trim() == "rust-src" || l.starts_with("rust-src-"));
    Ok((!has_src).then(|| Missing {
        what: format!("rust-src for {tc}"),
        install: args(&["rustup", "component", "add", "rust-src", "--toolchain", tc]),
    }))
}

/// `$CARGO_HOME/bin` (default `~/.cargo/bin`), where `cargo install` puts bpf-linker.
pub fn cargo_bin_dir() -> Option<PathBuf> {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .map(|h| h.join("bin"))
}

/// The `--version` line of the bpf-linker at `program` (a path, or a name looked up on `PATH`).
fn bpf_linker_version(program: &std::path::Path) -> Option<String> {
    Command::new(program)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
}

fn is_wanted_version(version: &str) -> bool {
    version.split_whitespace().any(|w| w == BPF_LINKER_VERSION)
}

/// Whether bpf-linker [`BPF_LINKER_VERSION`] is on `PATH` (where rustc looks for it) or, with
/// `cargo_bin`, in [`cargo_bin_dir`]; if not, what to install. Installs nothing.
pub fn missing_bpf_linker(cargo_bin: bool) -> Option<Missing> {
    let on_path = bpf_linker_version("bpf-linker".as_ref());
    if on_path.as_deref().is_some_and(is_wanted_version) {
        return None;
    }
    let in_cargo_bin = cargo_bin_dir()
        .map(|d| d.join("bpf-linker"))
        .and_then(|p| bpf_linker_version(&p).map(|v| (p, v)))
        .filter(|(_, v)| is_wanted_version(v));
    let found = match (&on_path, &in_cargo_bin) {
        (_, Some(_)) if cargo_bin => return None,
        (_, Some((p, _))) => format!(
            "{} has it: add its directory to PATH, or install it on PATH",
            p.display()
        ),
        (Some(v), None) => format!("PATH has {v}"),
        (None, None) => "none on PATH".to_owned(),
    };
    Some(Missing {
        what: format!("bpf-linker {BPF_LINKER_VERSION} on PATH ({found})"),
        install: args(&[
            "cargo",
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
        ]),
    })
}

/// Installs what [`missing_rust_src`] and [`missing_bpf_linker`] (looking in [`cargo_bin_dir`]
/// too) find missing: `cargo xtask setup`'s step. bpf-linker takes a few minutes on two cores
/// the first time.
pub fn ensure_toolchain(tc: &str, log: &dyn Fn(&str)) -> Result<()> {
    let missing: Vec<Missing> = missing_rust_src(tc)?
        .into_iter()
        .chain(missing_bpf_linker(true))
        .collect();
    if missing.is_empty() {
        log(&format!(
            "rust-src for {tc} and bpf-linker {BPF_LINKER_VERSION} {PRESENT}"
        ));
    }
    for m in missing {
        log(&format!("missing {}; installing it", m.what));
        let mut cmd = clean(&m.install[0]);
        cmd.args(&m.install[1..]);
        run(cmd, log)?;
    }
    Ok(())
}

/// `PATH` with [`cargo_bin_dir`] appended if it is not there, so that a bpf-linker
/// [`ensure_toolchain`] installed is found by the eBPF build of the cargo commands xtask starts.
pub fn path_with_cargo_bin() -> Option<std::ffi::OsString> {
    let dir = cargo_bin_dir()?;
    let path = std::env::var_os("PATH").unwrap_or_default();
    if std::env::split_paths(&path).any(|p| p == dir) {
        return None;
    }
    let mut all: Vec<PathBuf> = std::env::split_paths(&path).collect();
    all.push(dir);
    std::env::join_paths(all).ok()
}
