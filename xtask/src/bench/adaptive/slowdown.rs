//! One backend slowed 5x mid-run, then recovered.

use std::fmt::Write as _;

use anyhow::Result;

use super::bench::Bench;
use super::load::{figures, fmt_fig, p99_at, Req};
use super::run::{one_run, Event};
use super::trace::{share, shares, slots_moved, TracePoint};
use super::{pool_capacity, BenchAdaptiveArgs, Verdicts, Weights, NOISE};

pub(super) fn run(bench: &mut Bench, args: &BenchAdaptiveArgs, v: &mut Verdicts) -> Result<()> {
    let rate = args.fault_load * pool_capacity();
    // The fault comes once the learned weights have settled (after the ramp and a minute).
    let (fault, heal, secs) = (100.0, 150.0, 200u64);
    let slow = 0usize;
    println!(
        "learned, load {:.0}% = {rate:.0} req/s; backend{slow} slowed 5x at {fault} s, back to normal at {heal} s",
        args.fault_load * 100.0
    );
    let events: Vec<Event<'static>> = vec![
        (
            fault,
            Box::new(move |b: &mut Bench| b.control(slow, "slow=5 error_rate=0 refuse=0")),
        ),
        (
            heal,
            Box::new(move |b: &mut Bench| b.control(slow, "slow=1 error_rate=0 refuse=0")),
        ),
    ];
    let out = one_run(
        bench,
        "slowdown",
        Weights::Learned,
        rate,
        secs,
        7,
        NOISE,
        &[],
        events,
    )?;
    let pre = figures(&out.reqs, fault - 20.0, fault);
    println!(
        "before the fault ({:.0}-{fault:.0} s): {}",
        fault - 20.0,
        fmt_fig(&pre)
    );
    let slots_at = |t: f64| {
        out.trace
            .iter()
            .rev()
            .find(|p| p.t <= t)
            .map(|p| p.slots[slow])
            .unwrap_or(0)
    };
    let before = slots_at(fault);
    let halved = out
        .trace
        .iter()
        .find(|p| p.t > fault && p.slots[slow] * 2 <= before)
        .map(|p| p.t - fault);
    let mut recovered = None;
    let mut t = fault + 5.0;
    while t <= heal {
        if p99_at(&out.reqs, t, 5.0) <= 1.25 * pre.p99 {
            recovered = Some(t - fault);
            break;
        }
        t += 1.0;
    }
    print_timeline(&out.trace, &out.reqs, slow, fault - 10.0, secs as f64);
    let back = slots_at(secs as f64);
    let (any, _, gradual) = slots_moved(&out.log);
    println!(
        "backend{slow}: {before} slots before, halved after {}, {} at the end (after recovery); p99 within 1.25x of before after {}; largest change {any} slots, largest gradual {gradual}",
        halved.map_or("never".into(), |d| format!("{d:.1} s")),
        back,
        recovered.map_or("never".into(), |d| format!("{d:.0} s")),
    );
    v.push((
        "5x slowdown: weight cut by half within 15 s".into(),
        halved.map_or("never".into(), |d| format!("{d:.1} s")),
        halved.is_some_and(|d| d <= 15.0),
    ));
    v.push((
        "5x slowdown: p99 back within 1.25x of before within 30 s".into(),
        recovered.map_or("never".into(), |d| format!("{d:.0} s")),
        recovered.is_some_and(|d| d <= 30.0),
    ));
    let min_after = out
        .trace
        .iter()
        .filter(|p| p.t > fault && p.t < heal)
        .map(|p| p.slots[slow])
        .min()
        .unwrap_or(0);
    v.push((
        "5x slowdown: ramps back after recovery".into(),
        format!("{min_after} slots at the lowest, {back} at the end"),
        back > min_after,
    ));
    v.push((
        "5x slowdown: every learned change within the 5% budget".into(),
        format!("largest gradual move {:.2}%", 100.0 * share(gradual)),
        share(gradual) <= 0.05 + 1e-9,
    ));
    Ok(())
}

/// The table every 5 s and the p99 per 5 s from `from` on.
fn print_timeline(trace: &[TracePoint], reqs: &[Req], slow: usize, from: f64, to: f64) {
    let mut line = String::from("table over time:");
    let mut next_t = from;
    for p in trace {
        if p.t >= next_t {
            let _ = write!(
                line,
                " {:.0}s {}{}",
                p.t,
                shares(p),
                if p.drained_by_model[slow] {
                    "(drained)"
                } else {
                    ""
                }
            );
            next_t += 5.0;
        }
    }
    println!("{line}");
    let mut line = String::from("p99 per 5 s:");
    let mut t = from;
    while t <= to {
        let _ = write!(line, " {:.0}s {:.0}", t, p99_at(reqs, t, 5.0));
        t += 5.0;
    }
    println!("{line} ms");
}
