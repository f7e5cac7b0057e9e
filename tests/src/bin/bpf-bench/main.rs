//! `lb-bpf-bench`, run by `cargo xtask bench datapath|conntrack`: the benchmarks that load lb's
//! XDP programs. A binary of its own (not shipped) because xtask builds no eBPF.
//!
//! * [`datapath`]: the XDP balancer's cost per packet (BPF_PROG_TEST_RUN).
//! * [`conntrack`]: what counting full connection tables costs (issue 21).

mod conntrack;
mod datapath;

use std::{path::PathBuf, process::ExitCode};

use anyhow::{Context, Result};
use clap::Parser;

#[derive(Parser)]
#[command(
    bin_name = "cargo xtask bench",
    about = "Benchmarks that load lb's XDP programs"
)]
enum Cmd {
    /// Cost per packet of the XDP balancer vs a trivial XDP_TX program (BPF_PROG_TEST_RUN
    /// through the restoring harness), with counter checks. Needs root.
    Datapath(datapath::BenchDatapathArgs),
    /// What counting the connection tables costs lbd with CT4 holding a million entries (ms and
    /// CPU per count). Needs root.
    Conntrack(conntrack::BenchConntrackArgs),
}

fn main() -> ExitCode {
    let result = match Cmd::parse() {
        Cmd::Datapath(args) => datapath::run(&args),
        Cmd::Conntrack(args) => conntrack::run(&args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The cargo target directory this binary was built into (`target/<profile>/lb-bpf-bench`),
/// where the plots go.
fn target_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating lb-bpf-bench")?;
    exe.parent()
        .and_then(|profile| profile.parent())
        .map(PathBuf::from)
        .context("lb-bpf-bench is not in target/<profile>/")
}

/// CPU time of the calling thread, in ns: both benchmarks report it beside the wall time.
fn thread_cpu_ns() -> u128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write to.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u128 * 1_000_000_000 + ts.tv_nsec as u128
}
