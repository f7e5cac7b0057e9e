//! `cargo xtask bench adaptive`: does learning weights help, against honest baselines?
//!
//! The lab: a client, the balancer and three backends in network namespaces (IPv4, ipip).
//! Every backend runs `lb-workpool`: an HTTP server whose capacity is a fixed pool of worker
//! threads, each request holding a worker for the service time (20 ms), with a bounded queue
//! (503 beyond it). Health probes (HTTP, own port) go through the same pool, so they see the
//! queueing real requests see. Capacities are 1:1:3 (2, 2 and 6 workers: 100, 100 and
//! 300 requests/s).
//!
//! The load: `lb-loadgen` in the client namespace, open loop (seeded Poisson arrivals, a new
//! connection per request, latency measured from the scheduled start so a stalled server or
//! generator is charged in full: the coordinated-omission correction), with the rate ramped up
//! over the first 30 s and varied ±15% (seeded) after that.
//!
//! Configurations, same agent and health checks: `static-equal` (weights 1:1:1, learning off),
//! `oracle` (weights 1:1:3, the true capacities, learning off) and `learned` (weights 1:1:1,
//! `[vip.learning]` on). The scenarios follow issue #4's list; every run prints its figures,
//! and the last lines compare them with the targets.

mod bench;
mod capacity;
mod failure;
mod load;
mod longlived;
mod plot;
mod run;
mod slowdown;
mod stability;
mod syndrop;
mod trace;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, ValueEnum};

use crate::util::{self, check_interrupted, ensure_root};
use bench::{build, Bench};

/// Worker threads per backend: capacities 1:1:3.
const WORKERS: [usize; 3] = [2, 2, 6];
/// Time a request holds a worker.
const SERVICE_MS: u64 = 20;
/// Requests waiting for a worker before the backend answers 503.
const QUEUE: usize = 40;
/// Port the health probes use (the VIP's traffic uses 80).
const PROBE_PORT: u16 = 8080;
const VIP_PORT: u16 = 80;
/// The VIP's Maglev table size (the default).
const TABLE_SIZE: u32 = 65537;
/// Health checks: a hard failure must reach the kernel within fall × interval + 1 s.
const PROBE_INTERVAL_MS: u64 = 400;
const PROBE_TIMEOUT_MS: u64 = 400;
const FALL: u32 = 3;
const RISE: u32 = 2;
/// Learning: one step per second, latency target 2× the service time.
const LEARN_INTERVAL_MS: u64 = 1000;
const LATENCY_TARGET_MS: f64 = 40.0;
/// Load generator: timeout of one request, and the seconds of the initial ramp.
const REQUEST_TIMEOUT_MS: u64 = 2000;
const RAMP_SECS: f64 = 60.0;
/// Rate noise after the ramp (the `--noise` of lb-loadgen) and its period.
const NOISE: f64 = 0.15;
const NOISE_PERIOD_S: u64 = 5;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
pub enum Scenario {
    /// Capacities 1:1:3 at 70% of the pool: static-equal, oracle and learned, several seeds.
    Capacity,
    /// One backend slowed 5× mid-run, then recovered.
    Slowdown,
    /// Connection refused (hard failure), then 5% fast errors.
    Failure,
    /// A backend drops SYNs on its service port while its probe port answers.
    Syndrop,
    /// 500 long-lived connections across a drain, weight updates and an agent restart.
    Longlived,
    /// A long healthy run with ±30% load noise: settling, reversals, false drains, overhead.
    Stability,
}

#[derive(Args, Debug)]
pub struct BenchAdaptiveArgs {
    /// Scenarios to run (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub scenario: Vec<Scenario>,
    /// Seeded runs per configuration in the capacity scenario (median and spread reported).
    #[arg(long, default_value_t = 3)]
    pub seeds: u64,
    /// Seconds of the capacity scenario's runs (the last 40 s are measured).
    #[arg(long, default_value_t = 120)]
    pub capacity_secs: u64,
    /// Seconds of the stability run.
    #[arg(long, default_value_t = 600)]
    pub stability_secs: u64,
    /// Load of the capacity scenario, as a share of the pool's capacity.
    #[arg(long, default_value_t = 0.7)]
    pub load: f64,
    /// Configurations of the capacity scenario (default: all three).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub weights: Vec<Weights>,
    /// Load of the fault scenarios, as a share of the pool's capacity.
    #[arg(long, default_value_t = 0.5)]
    pub fault_load: f64,
    /// Run nothing: redraw the scenarios' plots from the files the last run left in
    /// target/bench-adaptive/.
    #[arg(long)]
    pub plot_only: bool,
}

/// Every scenario, in the order they run.
const ALL: [Scenario; 6] = [
    Scenario::Capacity,
    Scenario::Slowdown,
    Scenario::Failure,
    Scenario::Syndrop,
    Scenario::Longlived,
    Scenario::Stability,
];

/// Draws scenario `s`'s plot, saying where (a failure to draw is a warning: the figures
/// printed are the result).
fn plot_scenario(s: Scenario) {
    let name = format!("{s:?}").to_lowercase();
    match plot::scenario(&name) {
        Ok(Some(path)) => println!("plot: {}", path.display()),
        Ok(None) => {}
        Err(e) => eprintln!("warning: plotting {name}: {e:#}"),
    }
}

fn pool_capacity() -> f64 {
    WORKERS
        .iter()
        .map(|&w| w as f64 * 1000.0 / SERVICE_MS as f64)
        .sum()
}

/// Which weights lbd runs with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Weights {
    StaticEqual,
    Oracle,
    Learned,
}

impl Weights {
    fn name(self) -> &'static str {
        match self {
            Weights::StaticEqual => "static-equal",
            Weights::Oracle => "oracle",
            Weights::Learned => "learned",
        }
    }
}

/// The lines of the final verdict: (target, measured, met).
type Verdicts = Vec<(String, String, bool)>;

pub fn run(args: &BenchAdaptiveArgs) -> Result<()> {
    if args.plot_only {
        let scenarios = if args.scenario.is_empty() {
            ALL.to_vec()
        } else {
            args.scenario.clone()
        };
        scenarios.into_iter().for_each(plot_scenario);
        return Ok(());
    }
    ensure_root("bench adaptive")?;
    util::catch_interrupts();
    let _ = tests::cleanup_stale_namespaces();
    let bins = build()?;
    let _ = std::fs::remove_dir_all(results_dir());
    let mut bench = Bench::new(bins)?;
    let mut scenarios = args.scenario.clone();
    if scenarios.is_empty() {
        scenarios = ALL.to_vec();
    }
    println!(
        "backends: lb-workpool with {:?} workers × {SERVICE_MS} ms (capacities {:?} req/s, pool {:.0} req/s), queue {QUEUE}; \
         probes http every {PROBE_INTERVAL_MS} ms (timeout {PROBE_TIMEOUT_MS} ms, fall {FALL}, rise {RISE}) through the same pool; \
         learning step {LEARN_INTERVAL_MS} ms, latency target {LATENCY_TARGET_MS} ms; load: lb-loadgen open loop, new connection per request, \
         ramp {RAMP_SECS} s, noise ±{:.0}%/{NOISE_PERIOD_S} s, timeout {REQUEST_TIMEOUT_MS} ms",
        WORKERS,
        WORKERS.map(|w| w as f64 * 1000.0 / SERVICE_MS as f64),
        pool_capacity(),
        NOISE * 100.0,
    );
    let mut verdicts: Verdicts = Vec::new();
    for s in scenarios {
        check_interrupted()?;
        println!("\n=== {s:?} ===");
        match s {
            Scenario::Capacity => capacity::run(&mut bench, args, &mut verdicts)?,
            Scenario::Slowdown => slowdown::run(&mut bench, args, &mut verdicts)?,
            Scenario::Failure => failure::run(&mut bench, args, &mut verdicts)?,
            Scenario::Syndrop => syndrop::run(&mut bench, args, &mut verdicts)?,
            Scenario::Longlived => longlived::run(&mut bench, args, &mut verdicts)?,
            Scenario::Stability => stability::run(&mut bench, args, &mut verdicts)?,
        }
        plot_scenario(s);
    }
    drop(bench);
    println!(
        "\nper run: lbd log, requests (CSV), table trace and final `lbctl model show`, and one SVG plot per scenario, in {}",
        results_dir().display()
    );
    println!("\n=== summary against issue #4's targets ===");
    for (target, measured, met) in &verdicts {
        println!(
            "[{}] {target}: {measured}",
            if *met { "met" } else { "NOT met" }
        );
    }
    Ok(())
}

/// Where each run's lbd log, requests, trace and final `model show` are kept.
fn results_dir() -> PathBuf {
    util::target_dir().join("bench-adaptive")
}

#[cfg(test)]
mod tests_ {
    use super::load::{figures, Req};
    use super::trace::slots_moved;

    #[test]
    fn percentiles_and_windows() {
        let reqs: Vec<Req> = (0..100)
            .map(|i| Req {
                sched_s: i as f64 / 10.0,
                latency_ms: (i + 1) as f64,
                ok: i % 10 != 9,
                backend: String::new(),
            })
            .collect();
        let f = figures(&reqs, 0.0, 10.0);
        assert_eq!(f.sent, 100);
        assert_eq!(f.errors, 10);
        // 90 successes: 1..=99 without the multiples of 10; nearest rank.
        assert_eq!(f.p50, 49.0);
        assert_eq!(f.p99, 99.0);
        assert!((f.rps - 9.0).abs() < 1e-9);
        let log = "x table updated moved=12 generation=3\n\
                   y learned weights applied slots_moved=40 slots_moved_gradual=30 z\n\
                   x table updated moved=40 generation=4\n";
        assert_eq!(slots_moved(log), (40, 40, 30));
    }
}
