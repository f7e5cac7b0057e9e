//! `cargo xtask`: developer tasks for lb.
//!
//! * `setup`: install what builds and tests need (idempotent).
//! * `test`: setup, build everything, run every test (needs root).
//! * `lab`: demo of the balancer in a namespace lab with nginx backends.
//! * `bench lab`: HTTP throughput through the balancer vs straight to the backends.
//! * `install`: build and install lbd, lbctl, systemd units, config, man pages, completions.
//! * `package`: the same as a Debian package.
//! * `docs`: regenerate the README's configuration key list from `packaging/config-keys.toml`.
//! * `fuzz`: differential fuzzing of the XDP balancer against the reference model.

mod bench;
mod docs;
mod env;
mod install;
mod lab;
mod lab_fleet;
mod setup;
mod util;

use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Developer tasks for lb"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install packages, the eBPF toolchain (nightly + rust-src), bpf-linker and mount bpffs.
    /// Idempotent: only does what is missing.
    Setup,
    /// Setup, `cargo build --workspace --all-targets`, then `cargo test --workspace [ARGS...]`.
    /// Must run as root (the end-to-end tests create network namespaces and attach XDP).
    Test {
        /// Extra arguments for `cargo test --workspace` (e.g. `-p tests -- --nocapture`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Demo: build lbd, start a lab with 3 nginx backends (weights 1:1:2) behind the balancer,
    /// send requests to the VIPs and show which backend answered them.
    Lab(LabArgs),
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        which: bench::BenchCmd,
    },
    /// Build (release) and install lbd and lbctl to PREFIX/sbin, the systemd units, the
    /// default /etc/lb/lbd.toml (only if absent), man pages and bash/zsh/fish completions.
    /// Idempotent; prints what it installed.
    Install(install::InstallArgs),
    /// Build a Debian package (.deb) of the installation (prefix /usr) with dpkg-deb.
    Package(install::PackageArgs),
    /// Rewrite the README's configuration key list from packaging/config-keys.toml (the
    /// source of the lbd.toml(5) man page too).
    Docs,
    /// Differential fuzzing: random and mutated packets through the XDP balancer
    /// (BPF_PROG_TEST_RUN) and the reference model, for N minutes (needs root). Runs the tests
    /// crate's `lb-fuzz`; `cargo xtask fuzz --help` shows its options.
    #[command(disable_help_flag = true)]
    Fuzz(util::ToolArgs),
}

/// The lab's `--mode` and `--xdp-mode`: lbd's own config values.
pub use lb_userspace::config::{Forwarding, XdpMode};

/// Options shared by the lab demo and the lab benchmark.
#[derive(Args, Clone, Debug)]
pub struct LbOpts {
    /// How the balancer forwards to backends.
    #[arg(long, value_enum, default_value_t = Forwarding::Ipip)]
    pub mode: Forwarding,
    /// XDP attach mode written to lbd's config.
    #[arg(long, value_enum, default_value_t = XdpMode::Native)]
    pub xdp_mode: XdpMode,
}

#[derive(Args, Debug)]
pub struct LabArgs {
    #[command(flatten)]
    pub lb: LbOpts,
    /// After the demo, keep the lab up this many seconds (to look around) before tearing down.
    #[arg(long, default_value_t = 0)]
    pub seconds: u64,
    /// After the demo, keep the lab up until Ctrl-C.
    #[arg(long)]
    pub keep: bool,
    /// Requests per address family.
    #[arg(long, default_value_t = 1000)]
    pub requests: usize,
    /// Print lbd's, lbd decap's and nginx's logs on the terminal (prefixed), and every step of
    /// the setup; without it they only go to files in the lab's scratch directory.
    #[arg(long)]
    pub verbose: bool,
    /// Skip lbd: send the requests straight to the backends' own addresses (checks the lab and
    /// nginx without the balancer).
    #[arg(long)]
    pub no_lbd: bool,
    /// Run the demo as a fleet: N lbd nodes announcing the VIPs by BGP to a router (BIRD 2,
    /// ECMP), printing each node's and each backend's share.
    #[arg(long, value_name = "N")]
    pub nodes: Option<usize>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result: Result<ExitCode> = match cli.cmd {
        Cmd::Setup => setup::setup().map(|_| ExitCode::SUCCESS),
        Cmd::Test { args } => util::test(&args),
        // The demo and the benchmarks install what they need first, like `test` (idempotent):
        // a fresh machine needs nothing but the README's commands.
        Cmd::Lab(args) => if args.verbose {
            setup::setup()
        } else {
            setup::setup_quietly()
        }
        .and_then(|_| match args.nodes {
            Some(n) => lab_fleet::run(&args, n),
            None => lab::run(&args),
        })
        .map(|_| ExitCode::SUCCESS),
        // A simulation: nothing to set up.
        Cmd::Bench {
            which: which @ bench::BenchCmd::Queueing(_),
        } => bench::run(which),
        Cmd::Bench { which } => setup::setup().and_then(|_| bench::run(which)),
        Cmd::Install(args) => install::install(&args).map(|_| ExitCode::SUCCESS),
        Cmd::Package(args) => install::package(&args).map(|_| ExitCode::SUCCESS),
        Cmd::Docs => docs::update_readme().map(|_| ExitCode::SUCCESS),
        Cmd::Fuzz(args) => {
            setup::setup_quietly().and_then(|_| util::run_tool("lb-fuzz", &args.args))
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
