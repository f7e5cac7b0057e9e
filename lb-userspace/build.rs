//! Builds the XDP programs (lb-ebpf) for the BPF target with the nightly toolchain, so that the
//! agent embeds the exact programs it was built with. On a fresh machine it first installs what
//! that needs (rust-src for the nightly, bpf-linker): xtask depends on this crate, so nothing
//! of ours runs before this script, and `cargo xtask test` must work from a fresh clone.
use anyhow::{anyhow, Context as _};
use aya_build::{Package, Toolchain};

#[path = "ebpf_toolchain.rs"]
mod ebpf_toolchain;

fn main() -> anyhow::Result<()> {
    println!(
        "cargo:rerun-if-env-changed={}",
        ebpf_toolchain::TOOLCHAIN_ENV
    );
    println!("cargo:rerun-if-changed=ebpf_toolchain.rs");
    // Say something only when an install is needed (cargo shows every warning line).
    let log = |m: &str| {
        if !m.ends_with(ebpf_toolchain::PRESENT) {
            println!("cargo:warning=eBPF toolchain: {m}")
        }
    };
    let toolchain = ebpf_toolchain::detect_bpf_toolchain()?;
    ebpf_toolchain::ensure_toolchain(&toolchain, &log)
        .context("installing the eBPF toolchain (see `cargo xtask setup`)")?;
    ebpf_toolchain::ensure_bpf_linker(&log)
        .context("installing bpf-linker (see `cargo xtask setup`)")?;
    if let Some(path) = ebpf_toolchain::path_with_cargo_bin() {
        std::env::set_var("PATH", path);
    }
    let ebpf = Package {
        name: "lb-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../lb-ebpf"),
        ..Default::default()
    };
    let toolchain: &'static str = Box::leak(toolchain.into_boxed_str());
    aya_build::build_ebpf([ebpf], Toolchain::Custom(toolchain))
        .context("building the XDP programs (run `cargo xtask setup` for rust-src and bpf-linker)")
        .map_err(|e| anyhow!("{e:#}"))
}
