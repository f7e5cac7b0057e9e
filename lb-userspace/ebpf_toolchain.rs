//! The eBPF toolchain: a nightly with `rust-src` and `bpf-linker` 0.10.0. Shared (by `#[path]`)
//! between lb-userspace's build script, which must be able to build the XDP programs on a fresh
//! machine before anything else of ours has run (xtask itself depends on lb-userspace), and
//! `cargo xtask setup`. Every step checks first and installs only what is missing.
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
    // Output goes to our stderr: in a build script cargo shows it when the build fails.
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

/// Makes sure toolchain `tc` is installed with `rust-src` (needed for `-Z build-std=core`).
pub fn ensure_toolchain(tc: &str, log: &dyn Fn(&str)) -> Result<()> {
    let installed = rustup_toolchains()?
        .iter()
        .any(|t| t == tc || t.starts_with(&format!("{tc}-")));
    if !installed {
        log(&format!("no toolchain {tc}; installing it with rust-src"));
        let mut cmd = clean("rustup");
        cmd.args(["toolchain", "install", tc, "--profile", "minimal"])
            .args(["--component", "rust-src"]);
        run(cmd, log)?;
    }
    let out = clean("rustup")
        .args(["component", "list", "--installed", "--toolchain", tc])
        .output()
        .context("running `rustup component list`")?;
    let has_src = String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.trim() == "rust-src" || l.starts_with("rust-src-"));
    if has_src {
        log(&format!("rust-src for {tc} {PRESENT}"));
    } else {
        let mut cmd = clean("rustup");
        cmd.args(["component", "add", "rust-src", "--toolchain", tc]);
        run(cmd, log)?;
    }
    Ok(())
}

/// `$CARGO_HOME/bin` (default `~/.cargo/bin`), where `cargo install` puts bpf-linker.
pub fn cargo_bin_dir() -> Option<PathBuf> {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .map(|h| h.join("bin"))
}

/// The installed bpf-linker's `--version` line, if there is one on `PATH` or in
/// [`cargo_bin_dir`].
fn bpf_linker_version() -> Option<String> {
    let candidates = std::iter::once(PathBuf::from("bpf-linker"))
        .chain(cargo_bin_dir().map(|d| d.join("bpf-linker")));
    candidates.into_iter().find_map(|p| {
        Command::new(p)
            .arg("--version")
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    })
}

/// Makes sure bpf-linker [`BPF_LINKER_VERSION`] is installed (`cargo install --locked`, a few
/// minutes on two cores the first time).
pub fn ensure_bpf_linker(log: &dyn Fn(&str)) -> Result<()> {
    match bpf_linker_version() {
        Some(v) if v.split_whitespace().any(|w| w == BPF_LINKER_VERSION) => {
            log(&format!("{v} {PRESENT}"));
            Ok(())
        }
        other => {
            log(&format!(
                "bpf-linker is {}; installing {BPF_LINKER_VERSION} (takes a few minutes)",
                other.as_deref().unwrap_or("missing")
            ));
            let mut cmd = clean("cargo");
            cmd.args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
                .arg("--locked");
            run(cmd, log)
        }
    }
}

/// `PATH` with [`cargo_bin_dir`] appended if it is not there, so a freshly installed
/// bpf-linker is found by the eBPF build.
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
