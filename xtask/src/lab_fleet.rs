//! `cargo xtask lab --nodes N`: the demo as a fleet. A router running BIRD 2 with ECMP (L4
//! hash) in front of N lbd nodes that announce the VIPs by BGP, their configuration in etcd
//! (written once with `lbctl --etcd`; every node runs `lbd --etcd`), three backends (weights
//! 1:1:2) reached by IP-in-IP; connections from the client to each VIP, and each node's and
//! each backend's share of them.
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use tests::fleet::{node_addr, Fleet, PORT, VIP_V4, VIP_V6};

use crate::util::{self, catch_interrupts, ensure_root, interrupted, sleep_unless_interrupted};
use crate::LabArgs;

const WEIGHTS: [u32; 3] = [1, 1, 2];

pub fn run(args: &LabArgs, nodes: usize) -> Result<()> {
    ensure_root("lab")?;
    if !(1..=8).contains(&nodes) {
        bail!("--nodes {nodes}: use 1 to 8");
    }
    if args.no_lbd || args.lb.mode.config_value() != "ipip" {
        bail!("--nodes runs the fleet with IP-in-IP forwarding only; drop --mode l2 and --no-lbd");
    }
    catch_interrupts();
    let _ = tests::cleanup_stale_namespaces();
    let bin_dir = build()?;
    let mut fleet =
        Fleet::with_bins_and_store(nodes, &WEIGHTS, &bin_dir).context("building the fleet")?;
    // Its logs stay readable after the run, like the single-node lab's.
    fleet.keep_dir = true;
    let all: Vec<usize> = (0..nodes).collect();
    for &i in &all {
        fleet.try_start_node(i)?;
    }
    let t = fleet.try_wait_next_hops(&all, Duration::from_secs(60))?;
    for &i in &all {
        fleet.try_wait_announcing(i, Duration::from_secs(30))?;
    }
    fleet.try_wait_in_sync(&all, Duration::from_secs(30))?;
    fleet.try_wait_reported(&all, Duration::from_secs(30))?;
    print_header(&fleet, nodes, t);
    let mut failed = 0;
    for vip in [IpAddr::from(VIP_V4), IpAddr::from(VIP_V6)] {
        if interrupted() {
            break;
        }
        failed += share(&fleet, &all, vip, args.requests)?;
    }
    if args.keep && !interrupted() {
        eprintln!(
            "fleet is up; Ctrl-C tears it down. Try: lbctl --socket {} node drain; ip netns exec {}-st lbctl --etcd {} --prefix {} cluster status",
            fleet.nodes[0].socket.display(),
            fleet.prefix,
            fleet.store().url,
            fleet.etcd_prefix
        );
        while sleep_unless_interrupted(Duration::from_secs(3600)) {}
    }
    eprintln!("tearing the fleet down");
    drop(fleet);
    if failed > 0 {
        bail!("{failed} connections failed");
    }
    Ok(())
}

/// Release `lbd` and `lbctl`; their directory.
fn build() -> Result<std::path::PathBuf> {
    let mut cmd = util::cargo();
    cmd.args([
        "build",
        "--release",
        "--quiet",
        "-p",
        "lb-userspace",
        "--bin",
        "lbd",
        "--bin",
        "lbctl",
    ]);
    util::run(&mut cmd).context("building lbd and lbctl")?;
    Ok(util::target_dir().join("release"))
}

fn print_header(f: &Fleet, nodes: usize, converged: Duration) {
    println!(
        "fleet {} (namespaces {}-*): a client, a router (BIRD 2, ECMP by L4 hash), etcd, {nodes} lbd nodes, {} backends",
        f.prefix,
        f.prefix,
        WEIGHTS.len()
    );
    println!(
        "  every node announced both VIPs; the router's ECMP had all {nodes} after {converged:.1?}"
    );
    for (i, n) in f.nodes.iter().enumerate() {
        let s = f.try_lbctl(i, &["status"]).unwrap_or_default();
        let sessions: Vec<String> = s["bgp"]["sessions"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|s| format!("{} {}", s["peer"], s["state"]).replace('"', ""))
                    .collect()
            })
            .unwrap_or_default();
        println!(
            "  node{i} {} / {}: announces {}; sessions: {}; log {}",
            node_addr(i, VIP_V4.into()),
            node_addr(i, VIP_V6.into()),
            s["bgp"]["announced"],
            sessions.join(", "),
            n.lbd
                .as_ref()
                .map(|l| l.log_path.display().to_string())
                .unwrap_or_default()
        );
    }
    let backends: Vec<String> = WEIGHTS
        .iter()
        .enumerate()
        .map(|(i, w)| format!("backend{i} weight {w}"))
        .collect();
    println!("  backends: {}", backends.join(", "));
    println!(
        "  etcd {} (namespace {}-st), prefix {}: every node's VIPs and backends",
        f.store().url,
        f.prefix,
        f.etcd_prefix
    );
    match f.try_ctl_store(&["cluster", "status"]) {
        Ok(text) => {
            for line in text.lines() {
                println!("  | {line}");
            }
        }
        Err(e) => println!("  cluster status: {e:#}"),
    }
    println!(
        "  router's BIRD: {}/router-bird.{{conf,log}}",
        f.dir.display()
    );
}

/// `requests` connections to `vip`: each node's share (its new-flow counter) and each
/// backend's (who answered); returns how many failed.
fn share(f: &Fleet, nodes: &[usize], vip: IpAddr, requests: usize) -> Result<usize> {
    let flows = |i: usize| -> Result<u64> {
        let s = f.try_lbctl(i, &["stats", "--interval", "0.1"])?;
        Ok(s["vips"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|v| {
                v["vip"]
                    .as_str()
                    .is_some_and(|n| n.contains(&vip.to_string()))
            })
            .map(|v| v["new_flows"].as_u64().unwrap_or(0))
            .sum())
    };
    let before: Vec<u64> = nodes.iter().map(|&i| flows(i)).collect::<Result<_>>()?;
    let addr = SocketAddr::new(vip, PORT);
    let results = tests::client_many(&f.client, addr, requests, Duration::from_secs(2));
    let failed = results.iter().filter(|r| r.is_err()).count();
    let ok = results.len() - failed;
    let family = if vip.is_ipv4() { "IPv4" } else { "IPv6" };
    println!("\n{family} — {requests} connections to {addr}");
    println!("  {:<8} {:>10} {:>7}", "node", "new flows", "share");
    let mut seen = 0;
    for (k, &i) in nodes.iter().enumerate() {
        let n = flows(i)? - before[k];
        seen += n;
        println!(
            "  {:<8} {:>10} {:>6.1}%",
            format!("node{i}"),
            n,
            pct(n as usize, requests)
        );
    }
    println!("  {:<8} {:>10}", "total", seen);
    let counts: BTreeMap<String, usize> = tests::tally(&results);
    let total_w: u32 = WEIGHTS.iter().sum();
    println!(
        "  {:<10} {:>6} {:>9} {:>10} {:>7}",
        "backend", "weight", "expected", "answered", "share"
    );
    for (i, w) in WEIGHTS.iter().enumerate() {
        let n = counts.get(&format!("backend{i}")).copied().unwrap_or(0);
        println!(
            "  {:<10} {:>6} {:>8.1}% {:>10} {:>6.1}%",
            format!("backend{i}"),
            w,
            100.0 * f64::from(*w) / f64::from(total_w),
            n,
            pct(n, ok)
        );
    }
    println!("  failed {failed}");
    Ok(failed)
}

fn pct(n: usize, of: usize) -> f64 {
    if of == 0 {
        0.0
    } else {
        100.0 * n as f64 / of as f64
    }
}
