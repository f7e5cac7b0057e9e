//! 500 long-lived connections across a drain, weight updates and an agent restart.

use anyhow::Result;
use tests::backend_v4;

use super::bench::{lbctl_ok, vip, Bench};
use super::load::{figures, fmt_fig};
use super::run::{one_run, Event};
use super::trace::{share, slots_moved};
use super::{pool_capacity, BenchAdaptiveArgs, Verdicts, Weights, NOISE};

pub(super) fn run(bench: &mut Bench, args: &BenchAdaptiveArgs, v: &mut Verdicts) -> Result<()> {
    // 500 keep-alive connections add 100 requests/s: with 100 more of new connections the
    // pool runs at 40%, so nothing here is overload.
    let rate = 0.2 * pool_capacity();
    let secs = 120u64;
    let _ = args;
    println!(
        "learning off (the operator's weight changes apply as given; the model's own reweights are in the other scenarios), \
         500 keep-alive connections (a request every 5 s each) + {rate:.0} req/s of new connections; \
         drain backend0 at 20 s (undrain at 45 s), 24 operator weight changes between 50 and 98 s, lbd restarted at 100 s"
    );
    let mut events: Vec<Event<'static>> = vec![
        (
            20.0,
            Box::new(|b: &mut Bench| {
                lbctl_ok(b, &["backend", "drain", &vip(), &backend_v4(0).to_string()])
            }),
        ),
        (
            45.0,
            Box::new(|b: &mut Bench| {
                lbctl_ok(
                    b,
                    &["backend", "undrain", &vip(), &backend_v4(0).to_string()],
                )
            }),
        ),
    ];
    for k in 0..24 {
        let w = if k % 2 == 0 { "2" } else { "1" };
        events.push((
            50.0 + 2.0 * k as f64,
            Box::new(move |b: &mut Bench| {
                lbctl_ok(
                    b,
                    &[
                        "backend",
                        "set-weight",
                        &vip(),
                        &backend_v4(1).to_string(),
                        w,
                    ],
                )
            }),
        ));
    }
    events.push((
        100.0,
        Box::new(|b: &mut Bench| {
            b.stop_lbd()?;
            b.start_lbd()
        }),
    ));
    let extra: Vec<String> = [
        "--keepalive-conns",
        "500",
        "--keepalive-interval-ms",
        "5000",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let out = one_run(
        bench,
        "longlived",
        Weights::StaticEqual,
        rate,
        secs,
        17,
        NOISE,
        &extra,
        events,
    )?;
    let ka = &out.summary["keepalive"];
    let generations = out.log.matches("table updated").count();
    let (any, _, gradual) = slots_moved(&out.log);
    let new_conn = figures(&out.reqs, 0.0, secs as f64);
    println!(
        "keep-alive: {} connections, {} requests, {} failed, {} moved to another backend; {generations} table updates; new connections: {}; largest change {any} slots ({:.2}%), largest gradual {:.2}%",
        ka["conns"], ka["requests"], ka["failed"], ka["moved"], fmt_fig(&new_conn), 100.0 * share(any), 100.0 * share(gradual)
    );
    let failed = ka["failed"].as_u64().unwrap_or(u64::MAX);
    let moved = ka["moved"].as_u64().unwrap_or(u64::MAX);
    let conns = ka["conns"].as_u64().unwrap_or(0);
    v.push((
        ">= 500 long-lived connections: zero failures across a drain, >= 20 weight updates and a restart".into(),
        format!("{conns} connections, {failed} failed, {moved} moved, {generations} table updates"),
        conns >= 500 && failed == 0 && moved == 0 && generations >= 20,
    ));
    Ok(())
}
