//! `cargo xtask bench lab`: HTTP requests/s with wrk from the client namespace, through the
//! balancer to the VIP vs straight to the backends.
//!
//! Fairness: both paths use one identical wrk process (one thread per backend, the same number
//! of connections per thread, same duration). Through the balancer every thread targets the
//! VIP and lbd spreads the connections (weights 1:1:1); directly, a Lua `setup()` pins thread
//! i to backend i's own address, so each backend again gets a third of the load and the client
//! side does exactly the same work. The only difference is the path the packets take.
//!
//! The floor: a third path goes through a second balancer host running the least an XDP
//! balancer can do ([`tests::xdp::attach_xdp_reflector`]: rewrite the MACs, `XDP_TX`), so the
//! table shows how much of the gap to direct is the lab's extra hop and how much the balancer.

use std::net::IpAddr;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use tests::{Role, VIP_V4, VIP_V6};

use crate::env::{build_lbd, nginx_requests, LabEnv, HTTP_PORT};
use crate::util::{catch_interrupts, check_interrupted, ensure_root, TempDir};
use crate::LbOpts;

const BACKENDS: usize = 3;
/// The host of the minimal forwarder (the floor).
const FLOOR: Role = Role::Node(1);

#[derive(Args, Debug)]
pub struct BenchLabArgs {
    #[command(flatten)]
    pub lb: LbOpts,
    /// Seconds per wrk run.
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// wrk connections per backend (wrk runs one thread per backend).
    #[arg(long, default_value_t = 21)]
    pub connections_per_backend: usize,
    /// Address family to load.
    #[arg(long, value_enum, default_value_t = Family::V4)]
    pub family: Family,
    /// Only measure the direct path (no lbd needed).
    #[arg(long)]
    pub direct_only: bool,
    /// Runs of each path per variant, interleaved (direct, via, direct, via, ...); the
    /// ratio judged is the median of the runs' via/direct ratios.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub runs: u32,
    /// How the lab's switch forwards the balancer's frames to the backends.
    #[arg(long, value_enum, default_value_t = Switch::Xdp)]
    pub switch: Switch,
}

/// How the lab's switch forwards the frames the balancer sends back (`XDP_TX`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Switch {
    /// Straight from a balancer host's port to the backend's, in XDP: closer to a hardware
    /// switch, which costs the hosts nothing.
    Xdp,
    /// Through the bridge, an skb per frame, on the cores the balancer is measured on.
    Bridge,
}

/// Issue 24's target: through the balancer at least this share of direct, for both loads.
const TARGET_RATIO: f64 = 0.9;

/// IP family selection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Family {
    /// IPv4 only.
    V4,
    /// IPv6 only.
    V6,
    /// Both, one after the other.
    Both,
}

/// What one wrk run reported.
#[derive(Debug, Default, Clone)]
pub struct WrkResult {
    /// Requests/sec.
    pub rps: f64,
    /// Total requests completed.
    pub requests: u64,
    /// Average latency as wrk printed it.
    pub latency: String,
    /// "Socket errors: ..." line, if any.
    pub socket_errors: Option<String>,
    /// Non-2xx/3xx responses.
    pub non2xx: u64,
    /// Requests each backend's nginx served during the run.
    pub per_backend: Vec<u64>,
}

impl WrkResult {
    /// Per-backend shares, e.g. `33/33/34%`.
    pub fn split(&self) -> String {
        let total: u64 = self.per_backend.iter().sum();
        if total == 0 {
            return "-".into();
        }
        let parts: Vec<String> = self
            .per_backend
            .iter()
            .map(|&n| format!("{:.0}", 100.0 * n as f64 / total as f64))
            .collect();
        format!("{}%", parts.join("/"))
    }
}

/// Parses wrk's text output.
pub fn parse_wrk(out: &str) -> Result<WrkResult> {
    let mut r = WrkResult::default();
    for line in out.lines().map(str::trim) {
        if let Some(v) = line.strip_prefix("Requests/sec:") {
            r.rps = v.trim().parse().context("Requests/sec")?;
        } else if line.starts_with("Latency") {
            r.latency = line.split_whitespace().nth(1).unwrap_or("").to_owned();
        } else if line.contains("requests in") {
            r.requests = line
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
        } else if line.starts_with("Socket errors:") {
            r.socket_errors = Some(line.to_owned());
        } else if let Some(v) = line.strip_prefix("Non-2xx or 3xx responses:") {
            r.non2xx = v.trim().parse().unwrap_or(0);
        }
    }
    if r.rps == 0.0 && r.requests == 0 {
        bail!("no results in wrk output:\n{out}");
    }
    Ok(r)
}

fn url(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(a) => format!("http://{a}:{HTTP_PORT}/"),
        IpAddr::V6(a) => format!("http://[{a}]:{HTTP_PORT}/"),
    }
}

/// The Lua script pinning wrk thread i to `addrs[i]`.
fn split_script(addrs: &[IpAddr]) -> String {
    let list = addrs
        .iter()
        .map(|a| format!("\"{a}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "-- Pins wrk thread i to backend i (generated by cargo xtask bench lab).\n\
         local addrs = {{ {list} }}\n\
         local n = 0\n\
         function setup(thread)\n\
         \x20 n = n + 1\n\
         \x20 thread.addr = wrk.lookup(addrs[((n - 1) % #addrs) + 1], \"{HTTP_PORT}\")[1]\n\
         end\n"
    )
}

struct Row {
    family: &'static str,
    variant: &'static str,
    /// One per run (empty with `--direct-only`).
    via: Vec<WrkResult>,
    /// Through the minimal forwarder, one per run (empty with `--direct-only`).
    floor: Vec<WrkResult>,
    /// One per run.
    direct: Vec<WrkResult>,
}

impl Row {
    /// The median run of a path, by requests/s.
    fn median(runs: &[WrkResult]) -> Option<&WrkResult> {
        let mut sorted: Vec<&WrkResult> = runs.iter().collect();
        sorted.sort_by(|a, b| a.rps.total_cmp(&b.rps));
        sorted.get(sorted.len() / 2).copied()
    }

    /// The median of the runs' via/direct ratios (each via run against the direct run of the
    /// same round), if the balancer was measured.
    fn ratio(&self) -> Option<f64> {
        median_ratio(&self.via, &self.direct)
    }
}

/// The median of the ratios of `a`'s runs to `b`'s, round by round.
fn median_ratio(a: &[WrkResult], b: &[WrkResult]) -> Option<f64> {
    let mut r: Vec<f64> = a.iter().zip(b).map(|(a, b)| a.rps / b.rps).collect();
    r.sort_by(f64::total_cmp);
    r.get(r.len() / 2).copied()
}

pub fn run(args: &BenchLabArgs) -> Result<()> {
    ensure_root("bench lab")?;
    catch_interrupts();
    let _ = tests::cleanup_stale_namespaces();
    let bin = if args.direct_only {
        None
    } else {
        Some(build_lbd(false)?)
    };
    let mut env = LabEnv::new(BACKENDS, TempDir::new("lab")?, true)?;
    // The floor's host, before the switch is set up (which covers every balancer host). The
    // link keeps its program attached until the lab goes.
    let floor = if bin.is_some() {
        Some(env.lab_mut().add(FLOOR)?.attach_reflector(BACKENDS as u8)?)
    } else {
        None
    };
    if args.switch == Switch::Xdp {
        env.lab_mut().switch_lb_frames_in_xdp()?;
    }
    if let Some(bin) = &bin {
        env.start_lbd(bin, &args.lb, &[1; BACKENDS])?;
    }
    let common = wrk_common_args(args);
    print_intro(args, &common, bin.is_some());
    let rows = measure(&mut env, args, &common, floor.is_some())?;
    drop(floor);
    env.shutdown()?;
    print_rows(&rows);
    plot_ratios(&rows, &args.lb)?;
    Ok(())
}

/// `target/bench-lab/ratios.svg`: via/direct req/s per family and variant (1.0: the balancer
/// costs nothing).
fn plot_ratios(rows: &[Row], lb: &crate::LbOpts) -> Result<()> {
    let values: Vec<(String, f64)> = rows
        .iter()
        .filter_map(|r| {
            let ratio = r.ratio()?;
            let short = if r.variant.starts_with("new") {
                "new conn"
            } else {
                "keep-alive"
            };
            Some((format!("{} {short}", r.family), ratio))
        })
        .collect();
    if values.is_empty() {
        return Ok(());
    }
    let dir = crate::util::target_dir().join("bench-lab");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("ratios.svg");
    tests::plot::bars(
        &path,
        &format!(
            "bench lab: HTTP req/s via the balancer / direct ({}, {} XDP)",
            lb.mode.config_value(),
            lb.xdp_mode.config_value()
        ),
        "via / direct",
        &values,
        Some((1.0, "direct (no balancer)")),
    )?;
    println!("plot: {}", path.display());
    Ok(())
}

/// wrk's arguments common to both paths: threads, connections, duration, timeout.
fn wrk_common_args(args: &BenchLabArgs) -> [String; 5] {
    let threads = BACKENDS;
    let conns = args.connections_per_backend * BACKENDS;
    [
        format!("-t{threads}"),
        format!("-c{conns}"),
        format!("-d{}s", args.duration),
        "--timeout".into(),
        "2s".into(),
    ]
}

/// What is measured, and why the comparison is fair.
fn print_intro(args: &BenchLabArgs, common: &[String], via_lbd: bool) {
    println!(
        "wrk {} from the client namespace, {BACKENDS} nginx backends (worker_processes 1){}",
        common.join(" "),
        match via_lbd {
            true => format!(
                ", lbd {} forwarding, {} XDP, weights 1:1:1",
                args.lb.mode.config_value(),
                args.lb.xdp_mode.config_value()
            ),
            false => ", direct only".into(),
        }
    );
    println!(
        "fairness: the same single wrk process (1 thread per backend, {} connections each) is \
         used for both paths; via the balancer every thread targets the VIP, directly a Lua \
         setup() pins thread i to backend i's own address, so each backend gets 1/{BACKENDS} \
         of the load either way and only the packets' path differs.",
        args.connections_per_backend
    );
    let switch = match args.switch {
        Switch::Xdp => "the balancer hosts' frames for the backends forwarded in XDP, the rest by the bridge (--switch bridge: everything by the bridge)",
        Switch::Bridge => "everything by the bridge, an skb per frame",
    };
    println!("switch: {switch}");
    println!(
        "{} interleaved runs of each path per variant; judged: the median of the runs' \
         via/direct ratios against {TARGET_RATIO}",
        args.runs
    );
}

/// Both variants (new connection per request, keep-alive) of each family, direct and (unless
/// `--direct-only`, `via_lbd` false) through the minimal forwarder and via the balancer.
fn measure(
    env: &mut LabEnv,
    args: &BenchLabArgs,
    common: &[String],
    via_lbd: bool,
) -> Result<Vec<Row>> {
    let families: Vec<(&'static str, IpAddr)> = match args.family {
        Family::V4 => vec![("IPv4", VIP_V4.into())],
        Family::V6 => vec![("IPv6", VIP_V6.into())],
        Family::Both => vec![("IPv4", VIP_V4.into()), ("IPv6", VIP_V6.into())],
    };
    let mut rows = Vec::new();
    for (family, vip) in families {
        let backends: Vec<IpAddr> = env
            .lab()
            .backends()
            .iter()
            .map(|b| b.addr_like(vip))
            .collect();
        let script = env.dir().join(format!("split-{family}.lua"));
        std::fs::write(&script, split_script(&backends))?;
        for (variant, close) in [("new connection per request", true), ("keep-alive", false)] {
            let mut extra: Vec<String> = Vec::new();
            if close {
                extra.extend(["-H".into(), "Connection: close".into()]);
            }
            let mut direct_args = extra.clone();
            direct_args.extend(["-s".into(), script.display().to_string(), url(backends[0])]);
            let mut via_args = extra.clone();
            via_args.push(url(vip));
            let (mut direct, mut via, mut floor_runs) = (Vec::new(), Vec::new(), Vec::new());
            for run in 1..=args.runs {
                eprintln!("{family} {variant}: direct, run {run} of {} ...", args.runs);
                direct.push(wrk(env, common, &direct_args)?);
                check_interrupted()?;
                if via_lbd {
                    eprintln!("{family} {variant}: via the minimal forwarder, run {run} ...");
                    env.lab().route_vips_via(FLOOR)?;
                    let r = wrk(env, common, &via_args);
                    env.lab().route_vips_via(Role::Lb)?;
                    floor_runs.push(r?);
                    check_interrupted()?;
                    eprintln!("{family} {variant}: via the balancer, run {run} ...");
                    via.push(wrk(env, common, &via_args)?);
                    env.check_lbd_alive()?;
                    check_interrupted()?;
                }
            }
            rows.push(Row {
                family,
                variant,
                via,
                floor: floor_runs,
                direct,
            });
        }
    }
    Ok(rows)
}

/// The table of both paths, then notes on errors.
fn print_rows(rows: &[Row]) {
    println!();
    println!(
        "{:<5} {:<27} {:>14} {:>14} {:>14} {:>10} {:>12} {:>11}   {:<12} {:<12}",
        "",
        "",
        "via balancer",
        "via floor",
        "direct",
        "via/direct",
        "floor/direct",
        "via/floor",
        "split via",
        "split direct"
    );
    let rps = |r: Option<&WrkResult>| r.map_or("-".into(), |r| format!("{:.0} req/s", r.rps));
    let ratio = |x: Option<f64>| x.map_or("-".into(), |x| format!("{x:.2}"));
    for r in rows {
        let via = Row::median(&r.via);
        let direct = Row::median(&r.direct);
        println!(
            "{:<5} {:<27} {:>14} {:>14} {:>14} {:>10} {:>12} {:>11}   {:<12} {:<12}",
            r.family,
            r.variant,
            rps(via),
            rps(Row::median(&r.floor)),
            rps(direct),
            ratio(r.ratio()),
            ratio(median_ratio(&r.floor, &r.direct)),
            ratio(median_ratio(&r.via, &r.floor)),
            via.map_or("-".into(), WrkResult::split),
            direct.map_or("-".into(), WrkResult::split)
        );
    }
    println!(
        "(medians of the runs; ratios: the median of the runs' ratios, round by round; the \
         floor: a second host whose XDP program only rewrites the MACs and sends the packet \
         back out, the least any XDP balancer does on this path)"
    );
    for r in rows {
        let Some(ratio) = r.ratio() else { continue };
        let each: Vec<String> = r
            .via
            .iter()
            .zip(&r.direct)
            .map(|(v, d)| format!("{:.2}", v.rps / d.rps))
            .collect();
        println!(
            "target: {} {} via/direct >= {TARGET_RATIO}: {ratio:.2} (runs {}): {}",
            r.family,
            r.variant,
            each.join(", "),
            if ratio >= TARGET_RATIO {
                "target met"
            } else {
                "target NOT met"
            }
        );
    }
    for r in rows {
        let paths = r
            .via
            .iter()
            .map(|v| ("via", v))
            .chain(r.floor.iter().map(|f| ("floor", f)))
            .chain(r.direct.iter().map(|d| ("direct", d)));
        for (path, res) in paths {
            if res.socket_errors.is_some() || res.non2xx > 0 {
                println!(
                    "note: {} {} {path}: {} {}",
                    r.family,
                    r.variant,
                    res.socket_errors.as_deref().unwrap_or(""),
                    if res.non2xx > 0 {
                        format!("non-2xx responses: {}", res.non2xx)
                    } else {
                        String::new()
                    }
                );
            }
        }
    }
}

fn wrk(env: &LabEnv, common: &[String], args: &[String]) -> Result<WrkResult> {
    let ns = env.lab().client().ns();
    let all: Vec<&String> = common.iter().chain(args).collect();
    let before = nginx_requests(env.lab())?;
    let out = ns.exec("wrk", &all);
    let after = nginx_requests(env.lab())?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "wrk {} failed ({}): {}{stdout}",
            all.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut r = parse_wrk(&stdout)?;
    r.per_backend = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    eprintln!(
        "  {:.0} req/s, {} requests, avg latency {}, backends served {}{}",
        r.rps,
        r.requests,
        r.latency,
        r.split(),
        r.socket_errors
            .as_deref()
            .map(|e| format!(", {e}"))
            .unwrap_or_default()
    );
    Ok(r)
}

#[cfg(test)]
mod args_tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        lab: BenchLabArgs,
    }

    #[test]
    fn runs_must_be_at_least_one() {
        assert_eq!(Cli::parse_from(["bench-lab"]).lab.runs, 3);
        let err = Cli::try_parse_from(["bench-lab", "--runs", "0"])
            .err()
            .expect("--runs 0 refused")
            .to_string();
        assert!(
            err.contains("invalid value '0' for '--runs <RUNS>'"),
            "{err}"
        );
    }
}
