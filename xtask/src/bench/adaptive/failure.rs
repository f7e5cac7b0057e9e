//! Connection refused (hard failure), then 5% fast errors.

use anyhow::Result;

use super::bench::Bench;
use super::load::figures;
use super::run::{one_run, Event};
use super::{pool_capacity, BenchAdaptiveArgs, Verdicts, Weights, FALL, NOISE, PROBE_INTERVAL_MS};

pub(super) fn run(bench: &mut Bench, args: &BenchAdaptiveArgs, v: &mut Verdicts) -> Result<()> {
    let rate = args.fault_load * pool_capacity();
    let victim = 1usize;
    let (refuse, heal, errors_at, secs) = (100.0, 115.0, 140.0, 180u64);
    println!(
        "learned, load {rate:.0} req/s; backend{victim} refuses connections at {refuse} s, back at {heal} s, answers 5% of requests with fast 500s from {errors_at} s"
    );
    let events: Vec<Event<'static>> = vec![
        (
            refuse,
            Box::new(move |b: &mut Bench| b.control(victim, "refuse=1")),
        ),
        (
            heal,
            Box::new(move |b: &mut Bench| b.control(victim, "refuse=0")),
        ),
        (
            errors_at,
            Box::new(move |b: &mut Bench| b.control(victim, "error_rate=0.05")),
        ),
    ];
    let out = one_run(
        bench,
        "failure",
        Weights::Learned,
        rate,
        secs,
        11,
        NOISE,
        &[],
        events,
    )?;
    let zero = out
        .trace
        .iter()
        .find(|p| p.t > refuse && p.slots[victim] == 0)
        .map(|p| p.t - refuse);
    let bound = (FALL as f64 * PROBE_INTERVAL_MS as f64) / 1000.0 + 1.0;
    let errs_refused = figures(&out.reqs, refuse, heal).errors;
    let back = out
        .trace
        .iter()
        .find(|p| p.t > heal && p.slots[victim] > 0)
        .map(|p| p.t - heal);
    let suspected = out
        .trace
        .iter()
        .find(|p| p.t > errors_at && (p.suspected[victim] || p.drained_by_model[victim]))
        .map(|p| p.t - errors_at);
    let ramp: Vec<String> = out
        .trace
        .iter()
        .filter(|p| p.t > heal && p.t < errors_at)
        .step_by(10)
        .map(|p| format!("{:.0}s {}", p.t, p.slots[victim]))
        .collect();
    println!(
        "refused: 0 slots after {}; {errs_refused} failed requests meanwhile; back in the table {} after healing, slots (slow start): {}",
        zero.map_or("never".into(), |d| format!("{d:.2} s")),
        back.map_or("never".into(), |d| format!("{d:.1} s")),
        ramp.join(", ")
    );
    println!(
        "5% errors: suspected {}",
        suspected.map_or("never".into(), |d| format!("after {d:.1} s"))
    );
    v.push((
        format!("hard failure: weight 0 in the kernel within fall x interval + 1 s = {bound:.1} s"),
        zero.map_or("never".into(), |d| format!("{d:.2} s (trace every 0.2 s)")),
        zero.is_some_and(|d| d <= bound),
    ));
    v.push((
        "5% fast errors: suspected within 30 s".into(),
        suspected.map_or("never".into(), |d| format!("{d:.1} s")),
        suspected.is_some_and(|d| d <= 30.0),
    ));
    Ok(())
}
