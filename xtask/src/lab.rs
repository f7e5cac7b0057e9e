//! `cargo xtask lab`: the demo. A lab with 3 nginx backends (weights 1:1:2) behind lbd,
//! HTTP requests from the client to each VIP, and a table of who answered.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{bail, Result};
use tests::{NetNs, VIP_V4, VIP_V6};

use crate::env::procs::TAIL_LINES;
use crate::env::{backend_name, build_lbd, http_get, vips, LabEnv, HTTP_PORT};
use crate::util::{
    catch_interrupts, ensure_root, interrupted, log_tail, sleep_unless_interrupted, TempDir,
};
use crate::LabArgs;

const WEIGHTS: [u32; 3] = [1, 1, 2];
const GIVE_UP_AFTER: usize = 10;

/// Responses per backend name, plus failures.
#[derive(Default)]
pub struct Tally {
    /// Successful responses per body (backend name).
    pub by_backend: BTreeMap<String, usize>,
    /// Number of failed requests.
    pub failed: usize,
    /// The first few failure messages.
    pub examples: Vec<String>,
}

/// Sends `n` requests from `ns`, cycling through `targets`, one connection each.
pub fn http_requests(ns: &NetNs, targets: &[SocketAddr], n: usize) -> Tally {
    ns.run_in(|| {
        let mut t = Tally::default();
        for i in 0..n {
            if interrupted() {
                break;
            }
            let addr = targets[i % targets.len()];
            match http_get(addr, Duration::from_secs(2)) {
                Ok(name) => *t.by_backend.entry(name).or_default() += 1,
                Err(e) => {
                    t.failed += 1;
                    if t.examples.len() < 5 {
                        t.examples.push(format!("{addr}: {e}"));
                    }
                }
            }
            // Don't spend half an hour timing out when nothing gets through.
            if t.failed >= GIVE_UP_AFTER && t.by_backend.is_empty() {
                t.examples.push(format!(
                    "gave up after {GIVE_UP_AFTER} failures and no success"
                ));
                break;
            }
        }
        t
    })
}

pub fn run(args: &LabArgs) -> Result<()> {
    ensure_root("lab")?;
    catch_interrupts();
    let _ = tests::cleanup_stale_namespaces();
    let bin = if args.no_lbd {
        None
    } else {
        Some(build_lbd(!args.verbose)?)
    };
    // Kept after the run, so that the logs it names can still be read.
    let mut env = LabEnv::new(WEIGHTS.len(), TempDir::kept("lab")?, args.verbose)?;
    if let Some(bin) = &bin {
        env.start_lbd(bin, &args.lb, &WEIGHTS)?;
    }
    print_header(&env, args);
    let failed = send_requests(&mut env, args)?;
    if bin.is_some() {
        env.check_lbd_alive()?;
    }
    stay_up(&env, args);
    eprintln!("tearing the lab down");
    let log = env.lbd_log();
    env.shutdown()?;
    if failed > 0 {
        if bin.is_some() {
            eprintln!(
                "last lines of {} (lbd decap's and nginx's logs are beside it):\n{}",
                log.display(),
                log_tail(&log, TAIL_LINES)
            );
        }
        bail!("{failed} requests failed");
    }
    Ok(())
}

/// What the lab is: the balancer's mode, the VIPs, the backends and their weights, and where
/// the logs are.
fn print_header(env: &LabEnv, args: &LabArgs) {
    let lab = env.lab();
    println!(
        "lab {} (namespaces {}-*): a client, the balancer and {} nginx backends on one bridge",
        lab.prefix(),
        lab.prefix(),
        lab.backends().len()
    );
    if args.no_lbd {
        println!("  no lbd (--no-lbd): requests go straight to the backends' own addresses");
        println!("  nginx logs: {}/nginx-*/error.log", env.dir().display());
        return;
    }
    println!(
        "  lbd: {} forwarding, {} XDP ({} on the lb's eth0; lbd decap on every backend's)",
        args.lb.mode.config_value(),
        args.lb.xdp_mode.config_value(),
        match env.xdp_prog() {
            "" => "attached",
            prog => prog,
        }
    );
    let vips: Vec<String> = vips()
        .iter()
        .map(|&v| format!("{}/tcp", SocketAddr::new(v, HTTP_PORT)))
        .collect();
    println!("  VIPs: {}", vips.join(", "));
    let backends: Vec<String> = WEIGHTS
        .iter()
        .enumerate()
        .map(|(i, w)| format!("{} weight {w}", backend_name(i)))
        .collect();
    println!("  backends: {}", backends.join(", "));
    println!(
        "  lbd log: {} (lbd decap's and nginx's logs in the same directory{})",
        env.lbd_log().display(),
        if args.verbose {
            ""
        } else {
            "; --verbose prints them here"
        }
    );
}

/// Sends the requests to each VIP (or, with `--no-lbd`, to the backends) and prints a table
/// of who answered; returns how many failed. Fails, with the tail of its log, as soon as
/// requests failed because an lbd process died.
fn send_requests(env: &mut LabEnv, args: &LabArgs) -> Result<usize> {
    let mut failed = 0;
    for vip in vips() {
        let lab = env.lab();
        let (targets, what): (Vec<SocketAddr>, String) = if args.no_lbd {
            (
                lab.backends()
                    .iter()
                    .map(|b| SocketAddr::new(b.addr_like(vip), HTTP_PORT))
                    .collect(),
                "round robin over the backends' own addresses (--no-lbd)".into(),
            )
        } else {
            (
                vec![SocketAddr::new(vip, HTTP_PORT)],
                format!(
                    "VIP {} via lbd ({} forwarding, {} XDP)",
                    SocketAddr::new(vip, HTTP_PORT),
                    args.lb.mode.config_value(),
                    args.lb.xdp_mode.config_value()
                ),
            )
        };
        let t = http_requests(lab.client().ns(), &targets, args.requests);
        let weights: Vec<u32> = if args.no_lbd {
            vec![1; WEIGHTS.len()]
        } else {
            WEIGHTS.to_vec()
        };
        print_table(&what, lab, vip, &weights, &t, args.requests);
        failed += t.failed;
        if t.failed > 0 && !args.no_lbd {
            env.check_lbd_alive()?;
        }
        if interrupted() {
            break;
        }
    }
    Ok(failed)
}

/// `--seconds` and `--keep`: the lab stays up to be looked at.
fn stay_up(env: &LabEnv, args: &LabArgs) {
    if args.seconds > 0 && !interrupted() {
        print_howto(env);
        eprintln!("keeping the lab up for {} s", args.seconds);
        sleep_unless_interrupted(Duration::from_secs(args.seconds));
    }
    if args.keep && !interrupted() {
        print_howto(env);
        eprintln!("lab is up; Ctrl-C tears it down");
        while sleep_unless_interrupted(Duration::from_secs(3600)) {}
    }
}

fn print_table(what: &str, lab: &tests::Lab, vip: IpAddr, weights: &[u32], t: &Tally, sent: usize) {
    let total_w: u32 = weights.iter().sum();
    let ok: usize = t.by_backend.values().sum();
    println!();
    println!("{} — {sent} requests, {what}", family(vip));
    println!(
        "  {:<10} {:<16} {:>6} {:>9} {:>10} {:>7}",
        "backend", "address", "weight", "expected", "responses", "share"
    );
    for (i, b) in lab.backends().iter().enumerate() {
        let name = backend_name(i);
        let n = t.by_backend.get(&name).copied().unwrap_or(0);
        println!(
            "  {:<10} {:<16} {:>6} {:>8.1}% {:>10} {:>6.1}%",
            name,
            b.addr_like(vip).to_string(),
            weights[i],
            100.0 * weights[i] as f64 / total_w as f64,
            n,
            pct(n, ok)
        );
    }
    for (name, n) in &t.by_backend {
        if !(0..weights.len()).any(|i| &backend_name(i) == name) {
            println!("  unexpected response {name:?}: {n}");
        }
    }
    println!("  {:<10} {:>54}", "failed", t.failed);
    for e in &t.examples {
        println!("    e.g. {e}");
    }
}

fn family(ip: IpAddr) -> &'static str {
    if ip.is_ipv4() {
        "IPv4"
    } else {
        "IPv6"
    }
}

fn pct(n: usize, of: usize) -> f64 {
    if of == 0 {
        0.0
    } else {
        100.0 * n as f64 / of as f64
    }
}

fn print_howto(env: &LabEnv) {
    let lab = env.lab();
    let c = lab.client().ns_name();
    eprintln!("look around:");
    eprintln!("  ip netns exec {c} curl -s http://{VIP_V4}/");
    eprintln!("  ip netns exec {c} curl -s 'http://[{VIP_V6}]/'");
    eprintln!(
        "  ip -n {} link show dev eth0; bpftool prog show",
        lab.lb().ns_name()
    );
    eprintln!(
        "  ip netns exec {} tcpdump -ni eth0",
        lab.backend(0).ns_name()
    );
    eprintln!("  scratch dir (configs, logs): {}", env.dir().display());
}
