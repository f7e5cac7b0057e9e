//! `cargo xtask bench conntrack`: what counting the connection tables costs lbd (`backend
//! list`, `stats`, every metrics scrape, and every 10 s for the fill warning) with the tables
//! full: `CT` with a million entries, `CT_NEW` full, half of it copies of `CT` entries (what
//! promotions leave behind). The balancer is loaded with private maps, never attached; the
//! count is the agent's: a batched read of both tables, each flow classified and counted per
//! backend.
use std::{collections::HashMap, process::ExitCode, time::Instant};

use anyhow::{anyhow, bail, Result};
use clap::Args;
use lb_common::{CtValue, FlowKey, FAMILY_V4, PROTO_TCP};
use lb_userspace::{
    datapath::conntrack::{now_tick, ConnState, CtTable, IdleWindows},
    Balancer, Config, LoadOptions,
};

use crate::thread_cpu_ns;
use tests::ensure_root;

#[derive(Args, Debug)]
pub struct BenchConntrackArgs {
    /// Capacity of `CT4` and `CT` (conntrack_size); `CT4` is filled to the brim with IPv4 flows.
    #[arg(long, default_value_t = 1 << 20)]
    pub entries: u32,
    /// Capacity of `CT_NEW` (conntrack_new_size), filled too.
    #[arg(long, default_value_t = 1 << 16)]
    pub new_entries: u32,
    /// Counts measured; the median, min and max are reported.
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
}

fn key(i: u32) -> FlowKey {
    let mut src = [0u8; 16];
    src[..4].copy_from_slice(&(0x0a00_0000u32 | (i >> 12)).to_be_bytes());
    let mut dst = [0u8; 16];
    dst[..4].copy_from_slice(&[10, 220, 100, 1]);
    FlowKey {
        src,
        dst,
        sport: (10_000 + (i & 0xfff) as u16).to_be(),
        dport: 80u16.to_be(),
        proto: PROTO_TCP,
        family: FAMILY_V4,
        _pad: [0; 2],
    }
}

pub fn run(args: &BenchConntrackArgs) -> Result<ExitCode> {
    ensure_root("bench conntrack")?;
    if args.rounds < 1 || args.rounds > 100 {
        bail!("--rounds: 1 to 100");
    }
    let cfg = Config::parse(&format!(
        "interface = \"lo\"\npin_dir = \"\"\nconntrack_size = {}\nconntrack_new_size = {}\n",
        args.entries, args.new_entries
    ))
    .map_err(|e| anyhow!("bench config: {e}"))?;
    let mut opts = LoadOptions::from(&cfg);
    opts.pin_dir = None;
    let lb = Balancer::load(opts)?;
    let reader = lb.conntrack_reader();
    let now = now_tick();
    let value = |i: u32| CtValue {
        backend: 1 + i % 3,
        hash: i,
        syn_seq: 0,
        // A tenth closing, a tenth idle (last seen 20 minutes ago), the rest active.
        flags: if i.is_multiple_of(10) {
            lb_common::CT_F_CLOSING
        } else {
            0
        },
        last_seen: if i % 10 == 1 {
            now.wrapping_sub(((1200u64 * 1_000_000_000) >> lb_common::CT_TICK_SHIFT) as u32)
        } else {
            now
        },
        touched: 0,
    };
    let started = Instant::now();
    let ct: Vec<(FlowKey, CtValue)> = (0..args.entries).map(|i| (key(i), value(i))).collect();
    reader.try_insert(CtTable::Established, &ct)?;
    // Half of CT_NEW: copies of CT entries (left by promotions); half: flows seen once.
    let ct_new: Vec<(FlowKey, CtValue)> = (0..args.new_entries)
        .map(|i| {
            let k = if i.is_multiple_of(2) {
                i
            } else {
                args.entries + i
            };
            (key(k), value(k))
        })
        .collect();
    reader.try_insert(CtTable::New, &ct_new)?;
    drop((ct, ct_new));
    println!(
        "bench conntrack: filled CT4 ({}, IPv4 flows) and CT_NEW ({}) in {:.1} s",
        args.entries,
        args.new_entries,
        started.elapsed().as_secs_f64()
    );
    let idle = IdleWindows {
        tcp: std::time::Duration::from_secs(300),
        udp: std::time::Duration::from_secs(30),
    };
    let mut wall = Vec::new();
    let mut cpu = Vec::new();
    let mut last = (0u64, 0u64, 0u64, 0u64, 0u64);
    for _ in 0..args.rounds {
        let (t, c) = (Instant::now(), thread_cpu_ns());
        let mut per: HashMap<u32, [u64; 3]> = HashMap::new();
        let totals = reader.try_connections(&idle, |_, v, view| {
            let e = per.entry(v.backend).or_default();
            match (view.state, view.active) {
                (ConnState::Closing, _) => e[2] += 1,
                (_, true) => e[0] += 1,
                (_, false) => e[1] += 1,
            }
        })?;
        cpu.push((thread_cpu_ns() - c) as f64 / 1e6);
        wall.push(t.elapsed().as_secs_f64() * 1e3);
        let sum = |j: usize| per.values().map(|a| a[j]).sum::<u64>();
        last = (totals.ct, totals.ct_new, sum(0), sum(1), sum(2));
    }
    let stats = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        (v[v.len() / 2], v[0], v[v.len() - 1])
    };
    let (wm, wmin, wmax) = stats(&mut wall);
    let (cm, cmin, cmax) = stats(&mut cpu);
    println!(
        "entries read: CT4 and CT {}, CT_NEW {}; connections counted: {} active, {} idle, {} closing",
        last.0, last.1, last.2, last.3, last.4
    );
    println!(
        "one count ({} rounds): {wm:.1} ms wall [{wmin:.1}..{wmax:.1}], {cm:.1} ms CPU [{cmin:.1}..{cmax:.1}] (the counting thread)",
        args.rounds
    );
    println!(
        "lbd counts every 10 s for the fill warning: {:.2}% of one CPU at this size, plus one count per backend list, stats or scrape",
        cm / 10_000.0 * 100.0
    );
    Ok(ExitCode::SUCCESS)
}
