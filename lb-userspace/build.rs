//! Builds the XDP programs (lb-ebpf) for the BPF target with the nightly toolchain, so that the
//! agent embeds the exact programs it was built with, and makes their BTF loadable (see
//! `ebpf_btf.rs`). It installs nothing: when the nightly's rust-src or bpf-linker is missing it
//! fails with the command that installs it (`cargo xtask setup` does it all, and xtask itself
//! builds no eBPF, so it runs on a fresh machine). Without the `ebpf` feature (xtask turns it
//! off) it builds nothing and leaves empty objects, which the loaders refuse.
//!
//! It says something (a `cargo:warning`) only when the eBPF build itself warns or when it fails
//! (then with the eBPF build's whole output). Not aya-build: that forwards every line of the
//! nested cargo (`Compiling ...`) as a warning.
use std::{
    path::{Path, PathBuf},
    process::Stdio,
};

use anyhow::{bail, Context as _, Result};

#[path = "ebpf_toolchain.rs"]
mod ebpf_toolchain;

#[path = "ebpf_btf.rs"]
mod ebpf_btf;

/// The eBPF package and the programs (its bins) that lb-userspace embeds from `OUT_DIR`.
const PACKAGE: &str = "lb-ebpf";
const PROGRAMS: [&str; 3] = ["lb-balancer", "lb-decap", "lb-bench"];

fn main() {
    // The error alone, without the backtrace a returned error gets under RUST_BACKTRACE.
    if let Err(e) = build() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn build() -> Result<()> {
    println!(
        "cargo:rerun-if-env-changed={}",
        ebpf_toolchain::TOOLCHAIN_ENV
    );
    for path in [
        "ebpf_toolchain.rs",
        "ebpf_btf.rs",
        "../lb-ebpf",
        "../lb-common",
    ] {
        println!("cargo:rerun-if-changed={path}");
    }
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    if std::env::var_os("CARGO_FEATURE_EBPF").is_none() {
        for program in PROGRAMS {
            let dst = out_dir.join(program);
            std::fs::write(&dst, []).with_context(|| format!("writing {}", dst.display()))?;
        }
        return Ok(());
    }
    let toolchain = ebpf_toolchain::detect_bpf_toolchain()?;
    let missing: Vec<ebpf_toolchain::Missing> = ebpf_toolchain::missing_rust_src(&toolchain)?
        .into_iter()
        .chain(ebpf_toolchain::missing_bpf_linker(false))
        .collect();
    if !missing.is_empty() {
        let list: Vec<String> = missing
            .iter()
            .map(|m| format!("  {}: `{}`", m.what, m.command()))
            .collect();
        bail!(
            "building the XDP programs needs what is missing here; run `cargo xtask setup` \
             (installs it all, idempotent) or the command after each:\n{}",
            list.join("\n")
        );
    }
    let built = build_ebpf(&toolchain, &out_dir.join("ebpf-target"))
        .context("building the XDP programs")?;
    for program in PROGRAMS {
        let mut object = std::fs::read(built.join(program))
            .with_context(|| format!("reading the built {program}"))?;
        ebpf_btf::sanitize_object(&mut object)
            .with_context(|| format!("making the BTF of {program} loadable"))?;
        let dst = out_dir.join(program);
        std::fs::write(&dst, object).with_context(|| format!("writing {}", dst.display()))?;
    }
    Ok(())
}

/// `cargo build --release` of [`PACKAGE`] for the BPF target with `toolchain`, into
/// `target_dir`; returns the directory holding the programs. The nested cargo's output is kept:
/// compiler warnings are passed on, everything else is shown only if the build fails.
fn build_ebpf(toolchain: &str, target_dir: &Path) -> Result<PathBuf> {
    let endian = std::env::var("CARGO_CFG_TARGET_ENDIAN").context("no target endianness")?;
    let target = match endian.as_str() {
        "little" => "bpfel-unknown-none",
        "big" => "bpfeb-unknown-none",
        other => bail!("unsupported endianness {other}"),
    };
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").context("no target arch")?;
    let mut cmd = ebpf_toolchain::clean("rustup");
    cmd.args([
        "run",
        toolchain,
        "cargo",
        "build",
        "--package",
        PACKAGE,
        "--bins",
    ])
    .args(["--release", "--target", target, "-Z", "build-std=core"])
    .args(["--message-format=short", "--color=never", "--target-dir"])
    .arg(target_dir)
    .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
    // The same flags aya-build passes: the arch for aya-ebpf's cfgs, debug info for BTF.
    .env(
        "CARGO_ENCODED_RUSTFLAGS",
        [
            format!("--cfg=bpf_target_arch=\"{arch}\""),
            "-Cdebuginfo=2".into(),
            "-Clink-arg=--btf".into(),
        ]
        .join("\x1f"),
    );
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .context("starting `rustup run ... cargo build` for lb-ebpf")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        // A failing build script's stderr is what cargo prints: the nested build's whole story.
        eprintln!("{stderr}");
        bail!(
            "`cargo build -p {PACKAGE}` for {target} failed with {}",
            out.status
        );
    }
    for line in stderr.lines().filter(|l| l.contains("warning")) {
        println!("cargo:warning={line}");
    }
    Ok(target_dir.join(target).join("release"))
}
