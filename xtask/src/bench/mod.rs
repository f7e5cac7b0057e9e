//! `cargo xtask bench ...`: the benchmarks, each in its own module, and what they share.
//!
//! * [`lab`]: HTTP requests/s with wrk through the balancer vs straight to the backends.
//! * [`datapath`]: the XDP balancer's cost per packet (BPF_PROG_TEST_RUN).
//! * [`conntrack`]: what counting full connection tables costs (issue 21).
//! * [`adaptive`]: learned weights against static-equal and oracle weights (issue #4).

pub mod adaptive;
pub mod conntrack;
pub mod datapath;
pub mod lab;
pub mod plot;

use std::process::ExitCode;

use anyhow::Result;
use clap::Subcommand;

#[derive(Subcommand)]
pub enum BenchCmd {
    /// HTTP requests/s with wrk through the balancer vs straight to the backends.
    Lab(lab::BenchLabArgs),
    /// Cost per packet of the XDP balancer vs a trivial XDP_TX program (BPF_PROG_TEST_RUN
    /// through the restoring harness), with counter checks. Needs root.
    Datapath(datapath::BenchDatapathArgs),
    /// Learned weights against static-equal and oracle weights in a namespace lab with
    /// worker-pool backends and open-loop load (issue #4's scenarios). Needs root; takes about
    /// 45 minutes with the defaults.
    Adaptive(adaptive::BenchAdaptiveArgs),
    /// What counting the connection tables costs lbd with CT holding a million entries (ms and
    /// CPU per count). Needs root.
    Conntrack(conntrack::BenchConntrackArgs),
}

/// Runs one benchmark.
pub fn run(which: BenchCmd) -> Result<ExitCode> {
    match which {
        BenchCmd::Lab(args) => lab::run(&args).map(|_| ExitCode::SUCCESS),
        BenchCmd::Datapath(args) => datapath::run(&args),
        BenchCmd::Adaptive(args) => adaptive::run(&args).map(|_| ExitCode::SUCCESS),
        BenchCmd::Conntrack(args) => conntrack::run(&args),
    }
}
