//! `cargo xtask setup`: make a fresh Debian machine able to build and test lb. Idempotent:
//! every step first checks whether it is needed and says what it did or skipped.

use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::util::run;

/// Debian packages the lab, tests and benchmarks use.
pub const PACKAGES: &[&str] = &[
    "iproute2",          // ip netns / link / addr
    "ethtool",           // GRO on the lb's switch port, checksum offload off on the client
    "iputils-ping",      // the lab's connectivity check
    "nginx",             // lab/bench backends
    "wrk",               // bench load generator
    "bpftool",           // inspecting programs and maps
    "xdp-tools",         // xdp-loader status etc.
    "tcpdump",           // debugging the lab
    "curl",              // poking at a kept lab (`cargo xtask lab --keep`)
    "systemd",           // systemd-analyze verify in the packaging tests
    "dpkg-dev",          // dpkg-shlibdeps for `cargo xtask package`
    "man-db",            // checking the installed man pages
    "util-linux",        // nsenter (restart tests keep the root mount namespace)
    "nftables",          // bench adaptive: a backend that drops SYNs
    "debootstrap",       // e2e_systemd: a Debian root for the container
    "systemd-container", // e2e_systemd: systemd-nspawn boots a real systemd
    "prometheus", // promtool (alert rules) and e2e_prometheus (the Grafana dashboard's queries)
    "lintian",    // packaging: lintian on the .deb
    "etcd-server", // fleet mode's store (e2e_fleet_store, tests/src/etcd.rs)
    "etcd-client", // etcdctl: the fleet tests read and write the store directly
    "bird2",      // fleet: the router and every lbd node's BGP speaker
];

#[path = "../../lb-userspace/ebpf_toolchain.rs"]
mod ebpf_toolchain;
pub use ebpf_toolchain::{detect_bpf_toolchain, path_with_cargo_bin, TOOLCHAIN_ENV};

/// Runs every setup step, saying what it did or skipped. Returns the eBPF toolchain name,
/// which is also exported as [`TOOLCHAIN_ENV`] for the cargo commands this process starts.
pub fn setup() -> Result<String> {
    setup_with(true)
}

/// [`setup`] that only speaks when it does something (installs, mounts): for commands whose
/// output should be their own (`cargo xtask lab`).
pub fn setup_quietly() -> Result<String> {
    setup_with(false)
}

fn setup_with(verbose: bool) -> Result<String> {
    let log = |m: &str| {
        if verbose || !m.contains(ebpf_toolchain::PRESENT) {
            eprintln!("setup: {m}");
        }
    };
    packages(verbose)?;
    let toolchain = detect_bpf_toolchain()?;
    ebpf_toolchain::ensure_toolchain(&toolchain, &log)?;
    bpffs(verbose)?;
    // Children started later (cargo build/test) inherit it.
    std::env::set_var(TOOLCHAIN_ENV, &toolchain);
    if verbose {
        eprintln!(
            "setup: eBPF toolchain is `{toolchain}` (exported as {TOOLCHAIN_ENV}={toolchain})"
        );
    }
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

fn packages(verbose: bool) -> Result<()> {
    let missing: Vec<&str> = PACKAGES.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        if verbose {
            eprintln!("setup: packages already installed: {}", PACKAGES.join(" "));
        }
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

fn bpffs(verbose: bool) -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    let mounted = mounts.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 2 && f[1] == "/sys/fs/bpf" && f[2] == "bpf"
    });
    if mounted {
        if verbose {
            eprintln!("setup: bpffs already mounted on /sys/fs/bpf");
        }
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
