//! A backend drops SYNs on its service port while its probe port answers.

use std::io::Write as _;
use std::process::Stdio;

use anyhow::{bail, Context, Result};
use tests::backend_v4;

use super::bench::Bench;
use super::run::{one_run, Event};
use super::trace::{share, slots_moved};
use super::{pool_capacity, BenchAdaptiveArgs, Verdicts, Weights, NOISE, PROBE_PORT, VIP_PORT};

pub(super) fn run(bench: &mut Bench, args: &BenchAdaptiveArgs, v: &mut Verdicts) -> Result<()> {
    let rate = args.fault_load * pool_capacity();
    let victim = 2usize;
    let (drop_at, secs) = (100.0, 130u64);
    println!(
        "learned, load {rate:.0} req/s; backend{victim} drops SYNs to port {VIP_PORT} from {drop_at} s (nftables in its namespace); its probe port {PROBE_PORT} still answers"
    );
    let events: Vec<Event<'static>> = vec![(
        drop_at,
        Box::new(move |b: &mut Bench| {
            let ns = b.lab().backend(victim).ns();
            let rules = format!(
                "table inet lbbench {{\n  chain input {{\n    type filter hook input priority 0;\n    \
                 tcp dport {VIP_PORT} tcp flags & (syn | ack) == syn drop\n  }}\n}}\n"
            );
            let mut child = ns
                .command("nft")
                .args(["-f", "-"])
                .stdin(Stdio::piped())
                .spawn()
                .context("nft")?;
            child.stdin.take().unwrap().write_all(rules.as_bytes())?;
            let st = child.wait()?;
            if !st.success() {
                bail!("nft failed ({st})");
            }
            Ok(())
        }),
    )];
    let out = one_run(
        bench,
        "syndrop",
        Weights::Learned,
        rate,
        secs,
        13,
        NOISE,
        &[],
        events,
    )?;
    let drained = out
        .trace
        .iter()
        .find(|p| p.t > drop_at && p.drained_by_model[victim])
        .map(|p| p.t - drop_at);
    let zero = out
        .trace
        .iter()
        .find(|p| p.t > drop_at && p.slots[victim] == 0)
        .map(|p| p.t - drop_at);
    let health_down = out
        .trace
        .iter()
        .any(|p| p.t > drop_at && p.health[victim] == "down");
    let reason = out
        .model
        .as_ref()
        .and_then(|m| {
            m[0]["backends"]
                .as_array()?
                .iter()
                .find(|b| b["address"] == backend_v4(victim).to_string())
                .map(|b| b["decisions"].to_string())
        })
        .unwrap_or_default();
    let (_, _, gradual) = slots_moved(&out.log);
    println!(
        "drained by the model {} after the SYN drop began, 0 slots after {}; health checks said down: {health_down}; largest gradual move {:.2}%",
        drained.map_or("never".into(), |d| format!("{d:.1} s")),
        zero.map_or("never".into(), |d| format!("{d:.1} s")),
        100.0 * share(gradual)
    );
    if let Some(at) = reason.find("SynRetryRatio") {
        println!(
            "model's reason: ...{}...",
            &reason[at.saturating_sub(20)..(at + 60).min(reason.len())]
        );
    }
    v.push((
        "SYN drop with probes passing: drained from the passive signals within 10 s".into(),
        format!(
            "drain decided after {}, out of the table after {} (health: down={health_down})",
            drained.map_or("never".into(), |d| format!("{d:.1} s")),
            zero.map_or("never".into(), |d| format!("{d:.1} s"))
        ),
        drained.is_some_and(|d| d <= 10.0) && !health_down,
    ));
    Ok(())
}
