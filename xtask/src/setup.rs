//! `cargo xtask setup`: make a fresh Debian machine able to build and test lb. Idempotent:
//! every step first checks whether it is needed and says what it did or skipped.

use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::util::run;

/// Debian packages the lab, tests and benchmarks use.
pub const PACKAGES: &[&str] = &[
    "iproute2",     // ip netns / link / addr
    "ethtool",      // GRO on the lb's switch port, checksum offload off on the client
    "iputils-ping", // the lab's connectivity check
    "nginx",        // lab/bench backends
    "wrk",          // bench load generator
    "bpftool",      // inspecting programs and maps
    "xdp-tools",    // xdp-loader status etc.
    "tcpdump",      // debugging the lab
    "curl",         // poking at a kept lab (`cargo xtask lab --keep`)
    "systemd",      // systemd-analyze verify in the packaging tests
    "dpkg-dev",     // dpkg-shlibdeps for `cargo xtask package`
    "man-db",       // checking the installed man pages
    "util-linux",   // nsenter (restart tests keep the root mount namespace)
    "nftables",     // bench adaptive: a backend that drops SYNs
];

/// Toolchain used when the machine has no `nightly` toolchain.
pub const PINNED_NIGHTLY: &str = "nightly-2026-05-19";
/// Environment variable lb-userspace's build script reads for the eBPF toolchain.
pub const TOOLCHAIN_ENV: &str = "LB_EBPF_TOOLCHAIN";
/// The bpf-linker version the eBPF build is known to work with.
pub const BPF_LINKER_VERSION: &str = "0.10.0";

/// Runs every setup step. Returns the eBPF toolchain name, which is also exported as
/// [`TOOLCHAIN_ENV`] for the cargo commands this process starts.
pub fn setup() -> Result<String> {
    packages()?;
    let toolchain = toolchain()?;
    bpf_linker()?;
    bpffs()?;
    // Children started later (cargo build/test) inherit it.
    std::env::set_var(TOOLCHAIN_ENV, &toolchain);
    eprintln!("setup: eBPF toolchain is `{toolchain}` (exported as {TOOLCHAIN_ENV}={toolchain})");
    Ok(toolchain)
}

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .stderr(Stdio::null())
        .output()
        .map(|o| o.status.success() && o.stdout.ends_with(b"install ok installed"))
        .unwrap_or(false)
}

fn packages() -> Result<()> {
    let missing: Vec<&str> = PACKAGES.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        eprintln!("setup: packages already installed: {}", PACKAGES.join(" "));
        return Ok(());
    }
    if !tests::is_root() {
        bail!(
            "missing packages {} and not root: run `sudo cargo xtask setup`",
            missing.join(" ")
        );
    }
    eprintln!("setup: installing {}", missing.join(" "));
    run(Command::new("apt-get")
        .args(["update", "-q"])
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    Ok(())
}

fn rustup_toolchains() -> Result<Vec<String>> {
    let out = Command::new("rustup")
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

/// `nightly` if the machine has a floating nightly toolchain (`nightly-<host>`), else
/// [`PINNED_NIGHTLY`]. Does not install anything.
pub fn detect_bpf_toolchain() -> Result<String> {
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

fn toolchain() -> Result<String> {
    let tc = detect_bpf_toolchain()?;
    let installed = rustup_toolchains()?
        .iter()
        .any(|t| t == &tc || t.starts_with(&format!("{tc}-")));
    if !installed {
        eprintln!("setup: no nightly toolchain; installing {tc} with rust-src");
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            &tc,
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))?;
    }
    let out = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", &tc])
        .output()
        .context("running `rustup component list`")?;
    let has_src = String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.trim() == "rust-src" || l.starts_with("rust-src-"));
    if has_src {
        eprintln!("setup: rust-src already installed for {tc}");
    } else {
        run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", &tc]))?;
    }
    Ok(tc)
}

fn bpf_linker() -> Result<()> {
    let version = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    match version {
        Some(v) if v.split_whitespace().any(|w| w == BPF_LINKER_VERSION) => {
            eprintln!("setup: {v} already installed");
            Ok(())
        }
        other => {
            eprintln!(
                "setup: bpf-linker is {}; installing {BPF_LINKER_VERSION}",
                other.as_deref().unwrap_or("missing")
            );
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            run(Command::new(cargo).args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--locked",
            ]))
        }
    }
}

fn bpffs() -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    let mounted = mounts.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 2 && f[1] == "/sys/fs/bpf" && f[2] == "bpf"
    });
    if mounted {
        eprintln!("setup: bpffs already mounted on /sys/fs/bpf");
        return Ok(());
    }
    if !tests::is_root() {
        bail!("bpffs is not mounted on /sys/fs/bpf and not root: run `sudo cargo xtask setup`");
    }
    std::fs::create_dir_all("/sys/fs/bpf").ok();
    run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
    eprintln!("setup: mounted bpffs on /sys/fs/bpf");
    Ok(())
}
