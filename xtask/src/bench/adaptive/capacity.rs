//! Capacities 1:1:3 at 70% of the pool: static-equal, oracle and learned, several seeds.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use anyhow::Result;

use super::bench::Bench;
use super::load::{figures, fmt_fig, median_spread, served, Figures};
use super::run::one_run;
use super::trace::{share, shares, slots_moved};
use super::{pool_capacity, BenchAdaptiveArgs, Verdicts, Weights, NOISE, RAMP_SECS};

pub(super) fn run(bench: &mut Bench, args: &BenchAdaptiveArgs, v: &mut Verdicts) -> Result<()> {
    let rate = args.load * pool_capacity();
    let secs = args.capacity_secs.max(60);
    let (from, to) = (secs as f64 - 40.0, secs as f64);
    println!(
        "load {:.0}% of the pool = {rate:.0} req/s (after a {RAMP_SECS} s ramp, ±{:.0}% noise), {secs} s per run, measured over {from:.0}-{to:.0} s; seeds 1..={}",
        args.load * 100.0,
        NOISE * 100.0,
        args.seeds
    );
    let mut all: BTreeMap<&'static str, Vec<Figures>> = BTreeMap::new();
    let mut max_gradual = 0;
    for seed in 1..=args.seeds {
        let configs = if args.weights.is_empty() {
            vec![Weights::StaticEqual, Weights::Oracle, Weights::Learned]
        } else {
            args.weights.clone()
        };
        for w in configs {
            let label = format!("capacity-{}-{seed}", w.name());
            let out = one_run(bench, &label, w, rate, secs, seed, NOISE, &[], Vec::new())?;
            let f = figures(&out.reqs, from, to);
            let last = out.trace.last().map(shares).unwrap_or_default();
            let (any, _, gradual) = slots_moved(&out.log);
            if w == Weights::Learned {
                max_gradual = max_gradual.max(gradual);
            }
            println!(
                "seed {seed} {:<13} {}  served {}  table {last}{}",
                w.name(),
                fmt_fig(&f),
                served(&out.reqs, from, to),
                if w == Weights::Learned {
                    format!("  largest change {any} slots ({:.2}%)", 100.0 * share(any))
                } else {
                    String::new()
                }
            );
            if w == Weights::Learned {
                // Weights over time, every 10 s.
                let mut line = String::from("   learned table over time:");
                let mut next_t = 0.0;
                for p in &out.trace {
                    if p.t >= next_t {
                        let _ = write!(line, " {:.0}s {}", p.t, shares(p));
                        next_t += 10.0;
                    }
                }
                println!("{line}");
            }
            all.entry(w.name()).or_default().push(f);
        }
    }
    println!("\nmedian [min-max] over {} seeds:", args.seeds);
    let mut med = BTreeMap::new();
    for (name, figs) in &all {
        let p50 = median_spread(&figs.iter().map(|f| f.p50).collect::<Vec<_>>());
        let p99 = median_spread(&figs.iter().map(|f| f.p99).collect::<Vec<_>>());
        let rps = median_spread(&figs.iter().map(|f| f.rps).collect::<Vec<_>>());
        let err = median_spread(&figs.iter().map(|f| f.errors as f64).collect::<Vec<_>>());
        println!(
            "{name:<13} p50 {:.1} [{:.1}-{:.1}] ms  p99 {:.1} [{:.1}-{:.1}] ms  {:.1} [{:.1}-{:.1}] req/s  errors {:.0} [{:.0}-{:.0}]",
            p50.0, p50.1, p50.2, p99.0, p99.1, p99.2, rps.0, rps.1, rps.2, err.0, err.1, err.2
        );
        med.insert(*name, (p99.0, err.0));
    }
    let (Some(&eq), Some(&or), Some(&le)) = (
        med.get("static-equal"),
        med.get("oracle"),
        med.get("learned"),
    ) else {
        return Ok(());
    };
    v.push((
        "capacity 1:1:3 at 70%: learned p99 <= 0.5 x static-equal".into(),
        format!("{:.1} ms vs {:.1} ms ({:.2}x)", le.0, eq.0, le.0 / eq.0),
        le.0 <= 0.5 * eq.0,
    ));
    v.push((
        "capacity 1:1:3 at 70%: learned p99 within 1.25 x oracle".into(),
        format!("{:.1} ms vs {:.1} ms ({:.2}x)", le.0, or.0, le.0 / or.0),
        le.0 <= 1.25 * or.0,
    ));
    v.push((
        "capacity 1:1:3 at 70%: learned errors no more than static-equal".into(),
        format!("{:.0} vs {:.0} (oracle {:.0})", le.1, eq.1, or.1),
        le.1 <= eq.1,
    ));
    v.push((
        "capacity: every learned table change within the 5% budget".into(),
        format!(
            "largest gradual move {max_gradual} slots ({:.2}%)",
            100.0 * share(max_gradual)
        ),
        share(max_gradual) <= 0.05 + 1e-9,
    ));
    Ok(())
}
