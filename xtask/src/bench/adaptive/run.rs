//! One run: lbd with a configuration, the load, events at given times, the trace; every run's
//! artifacts are kept in [`results_dir`].

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde_json::Value;

use super::bench::Bench;
use super::load::{Load, Req};
use super::results_dir;
use super::trace::{TracePoint, Tracer};
use super::Weights;
use crate::util::sleep_unless_interrupted;

/// One run: lbd with `weights`, load at `rate` for `secs` with `seed`; returns the requests,
/// the trace and lbd's log.
pub(super) struct RunOut {
    pub(super) reqs: Vec<Req>,
    pub(super) trace: Vec<TracePoint>,
    pub(super) log: String,
    pub(super) summary: Value,
    pub(super) model: Option<Value>,
    pub(super) cpu_share: f64,
}

/// Something done to the lab at a time of a run (seconds since the load started).
pub(super) type Event<'a> = (f64, Box<dyn FnMut(&mut Bench) -> Result<()> + 'a>);

pub(super) fn cpu_secs(pid: u32) -> Option<f64> {
    tests::procs::process_cpu(pid).ok().map(|d| d.as_secs_f64())
}

#[allow(clippy::too_many_arguments)]
pub(super) fn one_run<'a>(
    bench: &'a mut Bench,
    label: &str,
    weights: Weights,
    rate: f64,
    secs: u64,
    seed: u64,
    noise: f64,
    extra: &[String],
    events: Vec<Event<'a>>,
) -> Result<RunOut> {
    bench.reset()?;
    bench.write_config(weights)?;
    bench.start_lbd()?;
    let pid = bench.lbd_pid().unwrap();
    let cpu0 = cpu_secs(pid).unwrap_or(0.0);
    let t_cpu = Instant::now();
    let load = Load::start(bench, label, rate, secs, seed, noise, extra)?;
    let tracer = Tracer::start(bench, load.started, bench.trace_every);
    let mut events = events;
    events.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut next = 0;
    let mut cpu_share = f64::NAN;
    loop {
        let t = load.started.elapsed().as_secs_f64();
        while next < events.len() && events[next].0 <= t {
            (events[next].1)(bench)?;
            next += 1;
        }
        if t >= secs as f64 + 0.5 {
            break;
        }
        if let Some(pid_now) = bench.lbd_pid() {
            if pid_now == pid {
                if let Some(c) = cpu_secs(pid) {
                    cpu_share = (c - cpu0) / t_cpu.elapsed().as_secs_f64();
                }
            }
        }
        load.ramp()?;
        if !sleep_unless_interrupted(Duration::from_millis(100)) {
            bail!("interrupted");
        }
    }
    let model = bench.lbctl_json(&["model", "show"]).ok();
    let trace = tracer.finish();
    let csv = load.csv.clone();
    let (summary, reqs) = load.finish()?;
    let log = std::fs::read_to_string(bench.log_path()).unwrap_or_default();
    // Everything a run produced, to look at afterwards.
    let dir = results_dir();
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join(format!("{label}.lbd.log")), &log)?;
    std::fs::copy(&csv, dir.join(format!("{label}.csv")))?;
    if let Some(m) = &model {
        std::fs::write(
            dir.join(format!("{label}.model.json")),
            serde_json::to_string_pretty(m)?,
        )?;
    }
    let mut t = String::from(
        "t,slots0,slots1,slots2,weight0,weight1,weight2,health0,health1,health2,drained0,drained1,drained2\n",
    );
    for p in &trace {
        let _ = writeln!(
            t,
            "{:.2},{},{},{},{},{},{},{},{},{},{},{},{}",
            p.t,
            p.slots[0],
            p.slots[1],
            p.slots[2],
            p.weights[0],
            p.weights[1],
            p.weights[2],
            p.health[0],
            p.health[1],
            p.health[2],
            p.drained_by_model[0],
            p.drained_by_model[1],
            p.drained_by_model[2]
        );
    }
    std::fs::write(dir.join(format!("{label}.trace.csv")), t)?;
    let mut d = String::new();
    for p in &trace {
        for (i, text) in p.decisions.iter().enumerate() {
            if !text.is_empty() {
                let _ = writeln!(d, "{:.2} backend{i} weight {}: {text}", p.t, p.weights[i]);
            }
        }
    }
    std::fs::write(dir.join(format!("{label}.decisions.txt")), d)?;
    Ok(RunOut {
        reqs,
        trace,
        log,
        summary,
        model,
        cpu_share,
    })
}
