//! `cargo xtask bench ...`: the benchmarks, each in its own module, and what they share.
//!
//! * [`lab`]: HTTP requests/s with wrk through the balancer vs straight to the backends.
//! * [`adaptive`]: learned weights against static-equal and oracle weights (issue #4).
//! * [`queueing`]: what the best weights can give issue 25's slowdown, by simulation.
//! * `datapath` and `conntrack` load the XDP programs, so they are the tests crate's
//!   `lb-bpf-bench` (`tests/src/bin/bpf-bench/`), which xtask builds and runs.
//! * `flood` runs lbd in a namespace lab under a spoofed SYN flood: the tests crate's
//!   `lb-bench-flood` (`tests/src/bin/bench-flood/`), built with lbd and lbctl beside it.

pub mod adaptive;
pub mod lab;
pub mod queueing;

use std::process::ExitCode;

use anyhow::Result;
use clap::Subcommand;

use crate::util::{run_tool, run_tool_with, ToolArgs};

#[derive(Subcommand)]
pub enum BenchCmd {
    /// HTTP requests/s with wrk through the balancer vs straight to the backends.
    Lab(lab::BenchLabArgs),
    /// Cost per packet of the XDP balancer vs a trivial XDP_TX program (BPF_PROG_TEST_RUN
    /// through the restoring harness), with counter checks. Needs root. Runs `lb-bpf-bench
    /// datapath`; `cargo xtask bench datapath --help` shows its options.
    #[command(disable_help_flag = true)]
    Datapath(ToolArgs),
    /// Learned weights against static-equal and oracle weights in a namespace lab with
    /// worker-pool backends and open-loop load (issue #4's scenarios). Needs root; takes about
    /// 45 minutes with the defaults.
    Adaptive(adaptive::BenchAdaptiveArgs),
    /// What counting the connection tables costs lbd with CT4 holding a million entries (ms and
    /// CPU per count). Needs root. Runs `lb-bpf-bench conntrack`; `--help` shows its options.
    #[command(disable_help_flag = true)]
    Conntrack(ToolArgs),
    /// Spoofed SYNs per second lbd's XDP balancer absorbs on one core while 500 established
    /// connections must see no failure and legitimate clients keep connecting (issue 24), in
    /// a namespace lab; under a minute. Needs root. Runs `lb-bench-flood`; `--help` shows its
    /// options.
    #[command(disable_help_flag = true)]
    Flood(ToolArgs),
    /// What the best static weights can give issue 25's slowdown (one of four worker pools
    /// slowed 5x at 60% load): the others' p99 ratio per share of the slowed backend, by
    /// simulation over seeded runs. Seconds; no root.
    Queueing(queueing::BenchQueueingArgs),
}

/// Runs one benchmark.
pub fn run(which: BenchCmd) -> Result<ExitCode> {
    match which {
        BenchCmd::Lab(args) => lab::run(&args).map(|_| ExitCode::SUCCESS),
        BenchCmd::Datapath(args) => run_tool("lb-bpf-bench", &with_first("datapath", args)),
        BenchCmd::Adaptive(args) => adaptive::run(&args).map(|_| ExitCode::SUCCESS),
        BenchCmd::Conntrack(args) => run_tool("lb-bpf-bench", &with_first("conntrack", args)),
        BenchCmd::Flood(args) => run_tool_with("lb-bench-flood", &["lbd", "lbctl"], &args.args),
        BenchCmd::Queueing(args) => queueing::run(&args).map(|_| ExitCode::SUCCESS),
    }
}

/// `lb-bpf-bench`'s arguments: the subcommand `which`, then the user's.
fn with_first(which: &str, args: ToolArgs) -> Vec<String> {
    std::iter::once(which.to_owned()).chain(args.args).collect()
}
