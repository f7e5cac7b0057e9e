//! `lb-bench-flood`, run by `cargo xtask bench flood` (issue 24): how many spoofed SYNs a
//! second lbd's XDP balancer absorbs on one core while 500 established connections keep
//! working and legitimate clients keep connecting.
//!
//! In a namespace lab (client, balancer, three backends; torn down on success, failure, panic
//! and Ctrl-C): lbd on the balancer with `lbd decap` and the tests' name-then-echo servers on
//! the backends, 500 long-lived connections, legitimate new connections for a few seconds,
//! then a spoofed SYN flood ([`sender`]) while the legitimate clients go on and the
//! established connections are probed every second. The balancer's receive NAPI runs alone
//! on one CPU ([`napi`]), the rest of the lab on the other. It prints the rates offered and
//! handled (lbd's counters, as `lbctl stats` shows them), where the CPU went ([`cpu`]), and
//! issue 24's targets, met or not.

mod cpu;
mod napi;
mod sender;

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::Path,
    process::ExitCode,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use tests::{
    ensure_root,
    flood::{SpoofedSyns, FLOOD_PORT},
    lab::{backend_v4, Lab, LabSpec, VIP_V4},
    netns::NetNs,
    procs::{lab_config, lbctl_json, scratch, start_decaps, wait_neighbours, Lbd},
    tcp::{client_many, LongLived, TcpServer},
};

const BACKENDS: usize = 3;
/// How long a legitimate connection (connect and the server's name line) may take, and how
/// long an established connection may take to echo a probe.
const CONN_TIMEOUT: Duration = Duration::from_secs(3);
/// Legitimate connections opened per `client_many` call: small, so the clients stop soon
/// after the flood does.
const LEGIT_BATCH: usize = 10;

#[derive(Parser, Debug)]
#[command(
    bin_name = "cargo xtask bench flood",
    about = "Spoofed SYNs per second the XDP balancer absorbs on one core, with 500 established \
             connections and legitimate new connections meanwhile (issue 24). Needs root."
)]
struct Args {
    /// Seconds of flood (10 to 20).
    #[arg(long, default_value_t = 15)]
    duration: u64,
    /// Seconds of legitimate new connections before the flood, the rate to compare with.
    #[arg(long, default_value_t = 5)]
    baseline: u64,
    /// Established connections held through the flood.
    #[arg(long, default_value_t = 500)]
    established: usize,
    /// The balancer's core: the CPU its receive NAPI thread (where its XDP program runs) is
    /// pinned to, alone; default the last one.
    #[arg(long)]
    cpu: Option<usize>,
    /// The CPU the rest of the lab runs on: this process's threads (the sender, the clients,
    /// the servers), lbd, and the veths before and behind the balancer (the bridge, the
    /// backends' decap and TCP); default the first one that is not the balancer's.
    #[arg(long)]
    lab_cpu: Option<usize>,
    /// Turn the kernel's BPF run-time statistics on during the flood to measure the XDP
    /// balancer's own CPU. Machine-wide: every BPF program (other benchmarks' too) pays two
    /// clock reads per run meanwhile, so it is off unless asked for.
    #[arg(long)]
    bpf_stats: bool,
}

/// Set by SIGINT/SIGTERM: the flood and the clients stop, the lab is torn down.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn main() -> ExitCode {
    match run(&Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The bounds that keep the bench bounded (flood length, baseline, connections held).
fn check_args(args: &Args) -> Result<()> {
    ensure!(
        (10..=20).contains(&args.duration),
        "--duration: 10 to 20 seconds"
    );
    ensure!((1..=30).contains(&args.baseline), "--baseline: 1 to 30 s");
    ensure!(
        (1..=5000).contains(&args.established),
        "--established: 1 to 5000"
    );
    Ok(())
}

fn run(args: &Args) -> Result<()> {
    ensure_root("bench flood")?;
    check_args(args)?;
    let cores = Cores::choose(args)?;
    // Every thread of this process and every process it starts (lbd, `lbd decap`) inherits
    // the pin, and the veths without a NAPI thread do their work on the sending CPU: the
    // whole lab but the balancer's NAPI thread runs on the lab's CPU.
    cpu::pin(0, cores.lab).context("pinning the bench to the lab's CPU")?;
    let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGTERM, handler);
    }
    tests::tcp::raise_nofile();

    let t0 = Instant::now();
    let lab = Lab::new(LabSpec { backends: BACKENDS }).context("building the lab")?;
    // Many short connections from one address to one VIP: the whole port range, and ports
    // in TIME_WAIT reused, as a busy client host would.
    lab.client().ns().sysctls(&[
        ("net/ipv4/ip_local_port_range", "1024 65000"),
        ("net/ipv4/tcp_tw_reuse", "1"),
    ])?;
    let vip = vip();
    let _servers = (0..BACKENDS)
        .map(|i| TcpServer::start(lab.backend(i).ns(), &[vip], &format!("backend{i}")))
        .collect::<Result<Vec<_>>>()?;
    let _decaps = start_decaps(&lab, BACKENDS);
    let dir = scratch("bench-flood");
    let backends: String = (0..BACKENDS)
        .map(|i| format!("[[vip.backend]]\naddress = \"{}\"\n", backend_v4(i)))
        .collect();
    std::fs::write(
        dir.join("lbd.toml"),
        lab_config(
            &dir,
            &format!(
                "[[vip]]\naddress = \"{VIP_V4}\"\nport = {FLOOD_PORT}\nprotocol = \"tcp\"\n{backends}"
            ),
        ),
    )?;
    let mut lbd = Lbd::start(lab.lb().ns(), &dir);
    // The scratch directory (config, socket, log) goes with lbd, on success and on panic.
    lbd.own_dir = true;
    let program_id = lbd.wait_ready()["program_id"]
        .as_u64()
        .context("no program_id in lbctl status")? as u32;
    let addrs: Vec<IpAddr> = (0..BACKENDS).map(|i| backend_v4(i).into()).collect();
    wait_neighbours(lab.lb().ns(), &addrs);
    // The balancer's eth0 on its core, alone; the switch port behind it (its XDP_TX frames
    // arrive there, on their way to the backends) on the lab's.
    let napi = napi::pin_napi(lab.lb().ns(), "eth0", cores.balancer)?;
    napi::pin_napi(lab.switch(), lab.lb().switch_port(), cores.lab)?;
    println!(
        "bench flood: lab {} ready in {:.1} s: lbd {} (XDP program {program_id}, native on the balancer's eth0, \
         its NAPI thread {napi:?} alone on CPU {}), {BACKENDS} backends behind {vip}, default connection tables, \
         the rest of the lab on CPU {}",
        lab.prefix(),
        t0.elapsed().as_secs_f64(),
        lbd.pid(),
        cores.balancer,
        cores.lab,
    );

    let mut long = LongLived::open(lab.client().ns(), vip, args.established, CONN_TIMEOUT)
        .context("opening the established connections")?;
    long.check_all()
        .context("the established connections before the flood")?;
    println!(
        "established: {} connections open and echoing {:?}",
        long.len(),
        long.backend_counts()
    );

    let client = lab.client().ns();
    let before = legit_for(client, vip, Duration::from_secs(args.baseline), &STOP);
    println!(
        "legitimate new connections before the flood: {} in {:.1} s = {:.0}/s, {} failed{}",
        before.ok,
        before.secs,
        before.rate(),
        before.failed,
        before.first_error()
    );
    check_stopped()?;

    let flood = flood_window(args, &lab, &lbd, program_id, &napi, &mut long)?;
    check_stopped()?;
    let after = long.check();
    let broken: Vec<String> = after
        .iter()
        .filter_map(|s| {
            let e = s.outcome.as_ref().err()?;
            Some(format!("#{} {} ({}): {e}", s.index, s.local, s.backend))
        })
        .collect();
    report(args, cores, &before, &flood, &broken);
    drop(lbd);
    lab.shutdown().context("tearing the lab down")?;
    println!("bench flood: {:.1} s in all", t0.elapsed().as_secs_f64());
    Ok(())
}

/// Which CPU does what.
#[derive(Clone, Copy, Debug)]
struct Cores {
    /// The balancer's receive NAPI thread: its XDP program and the hand-off of what it
    /// forwards to the next veth.
    balancer: usize,
    /// Everything else of the lab.
    lab: usize,
}

impl Cores {
    fn choose(args: &Args) -> Result<Self> {
        let n = cpu::cpu_times()?.len();
        let balancer = args.cpu.unwrap_or(n - 1);
        ensure!(balancer < n, "--cpu: 0 to {}", n - 1);
        let lab = args
            .lab_cpu
            .unwrap_or_else(|| (0..n).find(|&c| c != balancer).unwrap_or(balancer));
        ensure!(lab < n, "--lab-cpu: 0 to {}", n - 1);
        Ok(Self { balancer, lab })
    }
}

fn check_stopped() -> Result<()> {
    if STOP.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// Legitimate connections made in a window: each one connect, the server's name line, close.
#[derive(Debug, Default)]
struct Admitted {
    ok: usize,
    failed: usize,
    secs: f64,
    first_error: Option<String>,
}

impl Admitted {
    fn rate(&self) -> f64 {
        self.ok as f64 / self.secs.max(1e-9)
    }

    fn first_error(&self) -> String {
        self.first_error
            .as_ref()
            .map(|e| format!(" (first: {e})"))
            .unwrap_or_default()
    }
}

/// Opens legitimate connections from `ns` to `vip`, [`LEGIT_BATCH`] at a time, one after the
/// other, for `window` or until `stop` is set.
fn legit_for(ns: &NetNs, vip: SocketAddr, window: Duration, stop: &AtomicBool) -> Admitted {
    let start = Instant::now();
    let mut a = Admitted::default();
    while start.elapsed() < window && !stop.load(Ordering::Relaxed) {
        for r in client_many(ns, vip, LEGIT_BATCH, CONN_TIMEOUT) {
            match r {
                Ok(_) => a.ok += 1,
                Err(e) => {
                    a.failed += 1;
                    a.first_error.get_or_insert_with(|| e.to_string());
                }
            }
        }
    }
    a.secs = start.elapsed().as_secs_f64();
    a
}

/// lbd's view of the datapath at one moment (`lbctl stats --json`).
struct Snapshot {
    counters: BTreeMap<String, u64>,
    vip_packets: u64,
    ct_entries: u64,
    ct_new_entries: u64,
    cpus: Vec<cpu::CpuTimes>,
    /// Frames the veth in front of the balancer dropped (its switch port's TX drops: the
    /// balancer's receive ring was full), before XDP saw them.
    ring_drops: u64,
    lbd_cpu: Duration,
    /// CPU time of the balancer's NAPI thread: its XDP program and the hand-off of what it
    /// forwards (softirq work it raises for the veth behind it is the CPU's, not the thread's).
    napi_cpu: Duration,
    /// The balancer's run time and count, with `--bpf-stats`.
    prog: Option<(Duration, u64)>,
}

impl Snapshot {
    fn take(
        lab: &Lab,
        socket: &Path,
        lbd_pid: u32,
        napi: &[i32],
        program_id: Option<u32>,
    ) -> Result<Self> {
        let cpus = cpu::cpu_times()?;
        let napi_cpu = napi
            .iter()
            .map(|&pid| tests::procs::process_cpu(pid as u32))
            .sum::<Result<Duration>>()?;
        let ring_drops = tx_dropped(lab.switch(), lab.lb().switch_port())?;
        let lbd_cpu = tests::procs::process_cpu(lbd_pid)?;
        let prog = program_id.map(cpu::prog_run_stats).transpose()?;
        let stats = lbctl_json(socket, &["stats"]);
        let counters =
            serde_json::from_value(stats["counters"].clone()).context("lbctl stats: counters")?;
        let vip_packets = stats["vips"]
            .as_array()
            .and_then(|v| v.first())
            .and_then(|v| v["packets"].as_u64())
            .context("lbctl stats: the VIP's packets")?;
        let fill = &stats["conntrack"];
        Ok(Self {
            counters,
            vip_packets,
            ct_entries: fill["ct_entries"].as_u64().unwrap_or(0),
            ct_new_entries: fill["ct_new_entries"].as_u64().unwrap_or(0),
            cpus,
            ring_drops,
            lbd_cpu,
            napi_cpu,
            prog,
        })
    }

    /// How much counter `name` grew since `before`.
    fn grew(&self, before: &Snapshot, name: &str) -> u64 {
        let get = |s: &Snapshot| s.counters.get(name).copied().unwrap_or(0);
        get(self).saturating_sub(get(before))
    }

    /// How much the counters whose name starts with `prefix` grew since `before`, together.
    fn grew_all(&self, before: &Snapshot, prefix: &str) -> u64 {
        self.counters
            .keys()
            .filter(|k| k.starts_with(prefix))
            .map(|k| self.grew(before, k))
            .sum()
    }
}

/// The TX drops of link `dev` in `ns` (`ip -s -j link show`).
fn tx_dropped(ns: &NetNs, dev: &str) -> Result<u64> {
    let out = ns.ip(["-s", "-j", "link", "show", "dev", dev])?;
    let v: serde_json::Value = serde_json::from_str(&out).context("ip -j link show")?;
    v[0]["stats64"]["tx"]["dropped"]
        .as_u64()
        .with_context(|| format!("no TX drops of {dev} in {out}"))
}

/// What the flood window measured.
struct Flood {
    sent: sender::Sent,
    /// The CPU the sender ran on at its end (it is pinned).
    ran_on: Option<usize>,
    start: Snapshot,
    end: Snapshot,
    legit: Admitted,
    /// Echo rounds of the established connections during the flood, and the failures seen.
    probes: usize,
    failed_during: usize,
}

/// The flood, the legitimate clients beside it and the established connections' probes, with
/// the counters and CPU times around it.
fn flood_window(
    args: &Args,
    lab: &Lab,
    lbd: &Lbd,
    program_id: u32,
    napi: &[i32],
    long: &mut LongLived,
) -> Result<Flood> {
    let client = lab.client();
    let dst = lab.lb().mac().octets();
    let src = client.mac().octets();
    let sock = client
        .ns()
        .run_in(|| sender::Sender::open(client.ifindex(), dst))
        .context("opening the AF_PACKET socket")?;
    let stats_fd = args.bpf_stats.then(cpu::enable_bpf_stats).transpose()?;
    let prog = stats_fd.as_ref().map(|_| program_id);
    let legit_stop = AtomicBool::new(false);
    let duration = Duration::from_secs(args.duration);
    let start = Snapshot::take(lab, &lbd.socket, lbd.pid(), napi, prog)?;
    let (sent, ran_on, legit, probes, failed_during) = std::thread::scope(|s| {
        let flooder = s.spawn(|| -> Result<_> {
            let mut syns = SpoofedSyns::new(0x9e37_79b9_7f4a_7c15);
            let sent = sock.flood(&mut syns, src, duration, &STOP);
            Ok((sent, sender::current_cpu()))
        });
        let legit = s.spawn(|| legit_for(client.ns(), vip(), Duration::MAX, &legit_stop));
        // The established connections echo a probe every second while the flood runs.
        let (mut probes, mut failed) = (0, 0);
        let mut next = Instant::now();
        while !flooder.is_finished() {
            if Instant::now() >= next {
                failed = long.check().iter().filter(|c| !c.is_ok()).count();
                probes += 1;
                next += Duration::from_secs(1);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let flooded = flooder.join().expect("the sender thread");
        legit_stop.store(true, Ordering::Relaxed);
        let legit = legit.join().expect("the legitimate clients' thread");
        flooded.map(|(sent, ran_on)| (sent, ran_on, legit, probes, failed))
    })?;
    let end = Snapshot::take(lab, &lbd.socket, lbd.pid(), napi, prog)?;
    drop(stats_fd);
    Ok(Flood {
        sent,
        ran_on,
        start,
        end,
        legit,
        probes,
        failed_during,
    })
}

/// The VIP the flood and every client aim at.
fn vip() -> SocketAddr {
    SocketAddr::new(IpAddr::from(VIP_V4), FLOOD_PORT)
}

/// Prints the figures and issue 24's targets.
fn report(args: &Args, cores: Cores, before: &Admitted, f: &Flood, broken: &[String]) {
    let secs = f.sent.elapsed.as_secs_f64();
    let (s, e) = (&f.start, &f.end);
    let per_s = |n: u64| n as f64 / secs;
    let ct_new = e.grew(s, "ct_new");
    let vip_packets = e.vip_packets.saturating_sub(s.vip_packets);
    // Every legitimate connection is one first packet in CT_NEW too.
    let spoofed = ct_new.saturating_sub((f.legit.ok + f.legit.failed) as u64);
    println!();
    println!(
        "flood: {secs:.1} s. \"One core\" is CPU {}: the balancer's receive NAPI thread, alone there, runs its XDP \
         program and hands what it forwards to the next veth. The sender ran on CPU {} with the rest of the lab: \
         the client's veth and the bridge in its system calls, the veth behind the balancer (the bridge again, the \
         backends' decap and TCP) in a NAPI thread pinned there, the clients, the servers and lbd",
        cores.balancer,
        f.ran_on.map_or("?".into(), |c| c.to_string())
    );
    println!(
        "  offered: {} spoofed SYNs = {:.0}/s ({} send errors); the sender thread used {:.1} s user, {:.1} s system",
        f.sent.frames,
        per_s(f.sent.frames),
        f.sent.errors,
        f.sent.user.as_secs_f64(),
        f.sent.system.as_secs_f64()
    );
    println!(
        "  handled by the XDP balancer: {ct_new} first packets counted (ct_new: a SYN makes no entry while no table changes) = {:.0}/s, of which spoofed about {spoofed} = {:.0}/s \
         ({:.1}% of offered); {vip_packets} packets forwarded for the VIP = {:.0}/s",
        per_s(ct_new),
        per_s(spoofed),
        spoofed as f64 * 100.0 / f.sent.frames.max(1) as f64,
        per_s(vip_packets)
    );
    println!(
        "  not forwarded: drop_* +{}, pass_* +{}; connection tables: ct_lost +{}, ct_insert_failed +{}, \
         ct_new_insert_failed +{}, ct_promoted +{}; CT {} entries, CT_NEW {} after",
        e.grew_all(s, "drop_"),
        e.grew_all(s, "pass_"),
        e.grew(s, "ct_lost"),
        e.grew(s, "ct_insert_failed"),
        e.grew(s, "ct_new_insert_failed"),
        e.grew(s, "ct_promoted"),
        e.ct_entries,
        e.ct_new_entries
    );
    println!(
        "  dropped before the balancer's XDP program (its veth's receive ring full, 256 frames): {}",
        e.ring_drops.saturating_sub(s.ring_drops)
    );
    let through_xdp = vip_packets + e.grew_all(s, "drop_") + e.grew_all(s, "pass_");
    let napi = e.napi_cpu.saturating_sub(s.napi_cpu);
    let napi_ns = napi.as_nanos() as f64 / through_xdp.max(1) as f64;
    let napi_share = napi.as_secs_f64() / secs;
    // Saturated: the thread had no time left. Ring drops alone are not that: a burst from
    // the sender can fill the ring (256 frames) before the sleeping thread is woken.
    let saturated = napi_share > 0.8;
    println!(
        "  the balancer's NAPI thread: {:.0}% of CPU {}, {napi_ns:.0} ns per packet through XDP ({through_xdp} packets; \
         the veth's copy of each frame and the thread's wake-ups included); {}",
        napi_share * 100.0,
        cores.balancer,
        if saturated {
            "saturated: what it handled is what the core absorbs"
        } else {
            "not saturated: the offered rate is the lab CPU's limit, the core absorbs more"
        }
    );
    for (i, (now, then)) in e.cpus.iter().zip(&s.cpus).enumerate() {
        let (user, sys, soft, busy) = now.shares_since(then);
        let role = match i {
            _ if i == cores.balancer && i == cores.lab => " (the balancer and the lab)",
            _ if i == cores.balancer => " (the balancer)",
            _ if i == cores.lab => " (the lab)",
            _ => "",
        };
        println!(
            "  CPU {i}{role}: busy {busy:.0}% (user {user:.0}%, system {sys:.0}%, softirq {soft:.0}%; /proc/stat, everything the machine ran there)"
        );
    }
    println!(
        "  lbd (the agent's process): {:.1}% of one CPU",
        (e.lbd_cpu.saturating_sub(s.lbd_cpu)).as_secs_f64() * 100.0 / secs
    );
    match (s.prog, e.prog) {
        (Some((t0, n0)), Some((t1, n1))) => {
            let (t, n) = (t1.saturating_sub(t0), n1.saturating_sub(n0));
            let ns = t.as_nanos() as f64 / n.max(1) as f64;
            println!(
                "  XDP balancer (kernel BPF statistics): {n} runs = {:.0}/s, {ns:.0} ns per run, {:.1}% of one CPU; \
                 a core doing nothing else would run it {:.0} times a second at that cost",
                per_s(n),
                t.as_secs_f64() * 100.0 / secs,
                1e9 / ns.max(1.0)
            );
        }
        _ => println!(
            "  XDP balancer's own CPU: not measured (--bpf-stats measures it, turning the kernel's BPF statistics on machine-wide for the flood)"
        ),
    }
    println!(
        "legitimate new connections during the flood: {} in {:.1} s = {:.0}/s ({:.0}% of the {:.0}/s before), {} failed{}",
        f.legit.ok,
        f.legit.secs,
        f.legit.rate(),
        f.legit.rate() * 100.0 / before.rate().max(1e-9),
        before.rate(),
        f.legit.failed,
        f.legit.first_error()
    );
    println!(
        "established connections: {} echo rounds during the flood ({} failed by the last), {} of {} failed after it{}",
        f.probes,
        f.failed_during,
        broken.len(),
        args.established,
        broken
            .first()
            .map(|b| format!(" (first: {b})"))
            .unwrap_or_default()
    );
    let met = |ok: bool| if ok { "target met" } else { "target NOT met" };
    println!();
    println!("targets (issue 24):");
    println!(
        "  {} established connections, 0 failures through the flood: {} failed: {}",
        args.established,
        broken.len(),
        met(broken.is_empty())
    );
    println!(
        "  legitimate new connections admitted during the flood (every one within {} s): {} admitted, {} failed: {}",
        CONN_TIMEOUT.as_secs(),
        f.legit.ok,
        f.legit.failed,
        met(f.legit.ok > 0 && f.legit.failed == 0)
    );
    println!(
        "  spoofed SYNs absorbed on one core (CPU {}) meanwhile: {:.0}/s, the balancer's thread at {:.0}% of it{} \
         (figures, no target)",
        cores.balancer,
        per_s(spoofed),
        napi_share * 100.0,
        if saturated { ", saturated" } else { "" }
    );
}

#[cfg(test)]
mod args_tests {
    use super::*;

    fn check(argv: &[&str]) -> String {
        let args = Args::try_parse_from([&["lb-bench-flood"], argv].concat()).expect("parses");
        match check_args(&args) {
            Ok(()) => "ok".into(),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn out_of_range_arguments_are_refused_by_name() {
        assert_eq!(check(&[]), "ok");
        assert_eq!(check(&["--duration", "9"]), "--duration: 10 to 20 seconds");
        assert_eq!(check(&["--duration", "21"]), "--duration: 10 to 20 seconds");
        assert_eq!(check(&["--baseline", "0"]), "--baseline: 1 to 30 s");
        assert_eq!(
            check(&["--established", "5001"]),
            "--established: 1 to 5000"
        );
    }
}
