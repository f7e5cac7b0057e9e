//! `lb-fuzz`, run by `cargo xtask fuzz`: the differential fuzzer of `tests/tests/fuzz.rs` (the
//! XDP balancer through BPF_PROG_TEST_RUN against the reference model in `tests/src/model.rs`),
//! run for as long as asked. Same loop, same checks, same seeds: a failure found here
//! reproduces with `LB_FUZZ_SEED=<seed> cargo xtask fuzz` or the test. A binary of its own
//! because it loads the XDP programs, which xtask does not build.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::{Args, Parser};
use tests::fuzz::{self, FuzzOptions};

use tests::ensure_root;

#[derive(Parser, Debug)]
#[command(
    bin_name = "cargo xtask fuzz",
    about = "Differential fuzzing of the XDP balancer"
)]
struct Cli {
    #[command(flatten)]
    args: FuzzArgs,
}

fn main() -> ExitCode {
    match run(&Cli::parse().args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[derive(Args, Debug)]
pub struct FuzzArgs {
    /// How long to run, in minutes.
    #[arg(long, default_value_t = 10.0)]
    pub minutes: f64,
    /// Stop after this many packets instead (or earlier, if the time is up first).
    #[arg(long)]
    pub packets: Option<u64>,
    /// RNG seed, decimal or 0x-hex (default: $LB_FUZZ_SEED, else from the clock).
    #[arg(long)]
    pub seed: Option<String>,
    /// Compare the counters every N packets (1: after every packet; slower).
    #[arg(long, default_value_t = 16)]
    pub counter_every: u64,
    /// Stop after this many mismatches.
    #[arg(long, default_value_t = 10)]
    pub max_mismatches: usize,
}

pub fn run(args: &FuzzArgs) -> Result<ExitCode> {
    ensure_root("fuzz")?;
    if let Some(s) = &args.seed {
        std::env::set_var("LB_FUZZ_SEED", s);
    }
    if args.minutes.is_nan() || args.minutes <= 0.0 || args.counter_every == 0 {
        bail!("--minutes must be positive and --counter-every at least 1");
    }
    let seed = fuzz::seed_from_env();
    eprintln!(
        "fuzz: seed {seed:#x} (reproduce with --seed {seed:#x}), {} minutes",
        args.minutes
    );
    let mut opts = FuzzOptions::new(seed);
    opts.duration = Some(Duration::from_secs_f64(args.minutes * 60.0));
    opts.packets = args.packets;
    opts.counter_every = args.counter_every;
    opts.max_mismatches = args.max_mismatches;
    let report = fuzz::run(&opts)?;
    println!("{}", report.summary());
    let missing = report.uncovered();
    if !missing.is_empty() {
        println!("not reached: {missing:?}");
    }
    for m in &report.mismatches {
        println!("MISMATCH {m}\n");
    }
    Ok(if report.mismatches.is_empty() {
        ExitCode::SUCCESS
    } else {
        println!("{} mismatches (seed {seed:#x})", report.mismatches.len());
        ExitCode::FAILURE
    })
}
