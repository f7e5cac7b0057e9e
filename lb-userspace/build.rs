//! Builds the XDP programs (lb-ebpf) for the BPF target with the nightly toolchain, so that the
//! agent embeds the exact programs it was built with.
use anyhow::{anyhow, Context as _};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let toolchain = std::env::var("LB_EBPF_TOOLCHAIN").unwrap_or_else(|_| "nightly".to_string());
    println!("cargo:rerun-if-env-changed=LB_EBPF_TOOLCHAIN");
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
