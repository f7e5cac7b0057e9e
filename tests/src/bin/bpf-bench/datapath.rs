//! `cargo xtask bench datapath`: the XDP balancer's cost per packet, measured with
//! BPF_PROG_TEST_RUN against a trivial program that only returns XDP_TX.
//!
//! With `repeat` > 1 the kernel runs the program on the same buffer again and again without
//! restoring it, so a program that encapsulates would measure itself on its own output. Every
//! measurement therefore runs the harness `bench_harness` (lb-ebpf's `bench.rs`), which before
//! every repetition undoes the previous repetition's head growth, copies the saved input packet
//! back, optionally writes the repetition number into the source address (so every repetition
//! is a new flow), then tail-calls the program under test (slot 0 of `BENCH_PROGS`). The
//! trivial `bench_tx` runs through the same harness with the same input, in the same run, so
//! the ratio compares the balancer with "restore the packet, tail-call, return" and nothing else.
//!
//! Everything runs in a fresh network namespace with a veth `eth0`, forwarding enabled and
//! permanent neighbour entries for the backends, so `bpf_fib_lookup` (which uses the netns of
//! the thread that calls BPF_PROG_TEST_RUN) resolves every backend on `eth0` and the balancer's
//! verdict for a VIP packet is XDP_TX. The balancer is loaded and configured, never attached.
//!
//! What every repetition did is checked from the counters: the harness's run and tail-call
//! failure counts, the verdict, the backends' packet statistics and the balancer's counters.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    process::ExitCode,
};

use anyhow::{anyhow, bail, Context, Result};
use aya::{
    maps::{Array, MapData, PerCpuArray, PerCpuValues, ProgramArray},
    programs::{ProgramFd, TestRun, TestRunOptions, Xdp},
    Ebpf, EbpfLoader,
};
use clap::Args;
use lb_common::{
    maps, progs, BenchInput, Counter, CtValue, FlowKey, BENCH_MAX_PACKET, BENCH_RUNS,
    BENCH_TABLE_BITS, BENCH_TAIL_CALL_FAILED, SYN_SEEN_SLOTS,
};
use lb_pkt::{self as pkt, verdict_name, Ip4, Ip6, Tcp, TCP_ACK, TCP_SYN, XDP_PASS, XDP_TX};
use lb_userspace::{
    datapath::{conntrack::CtTable, ct_filter::FilterFill, BENCH_OBJ},
    netif, Balancer, Config, LoadOptions,
};
use tests::NetNs;

use crate::thread_cpu_ns;
use tests::ensure_root;

/// Issue 24's targets, in multiples of the trivial program's cost in the same run.
const TARGETS: [(Kind, f64); 4] = [
    (Kind::Established, 2.5),
    (Kind::NotVip, 1.5),
    (Kind::NewFlow, 4.0),
    (Kind::Promote, 6.0),
];
/// The established-flow target, drawn on the plot.
const TARGET_RATIO: f64 = TARGETS[0].1;

const IFNAME: &str = "eth0";
const PEER: &str = "peer0";
const ETH0_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x22, 0x00, 0x02];
const PEER_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x22, 0x00, 0xfe];
const LB_V4: Ipv4Addr = Ipv4Addr::new(10, 220, 0, 2);
const LB_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x220, 0, 0, 0, 0, 0, 2);
const VIP_V4: Ipv4Addr = Ipv4Addr::new(10, 220, 100, 1);
const VIP_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x220, 0x100, 0, 0, 0, 0, 1);
const VIP_PORT: u16 = 80;
/// Host numbers of the three backends: 10.220.0.11-13, fd00:220::11-13, MAC 02:00:00:22:00:11-13.
const BACKEND_HOSTS: [u8; 3] = [11, 12, 13];
/// The client of the established flow.
const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 7);
const CLIENT_PORT: u16 = 40_000;
/// Source ports of the new-flow scenario are this plus the round number, so that no round
/// meets a flow an earlier round left in the connection tables.
const NEW_FLOW_PORT_BASE: u16 = 20_000;
/// Source ports of the promotion scenario, likewise (rounds are at most 1000).
const PROMOTE_PORT_BASE: u16 = 30_000;
/// Repetitions of the promotion scenario: each ACK needs its SYN in the SYN cache, sent by an
/// untimed SYN run just before. The cache is direct-mapped, so more SYNs take more of each
/// other's slots: with 8192 of 65536 slots about 6% do, and those ACKs take the `CT_NEW` path.
const PROMOTE_MAX_REPEAT: u32 = 8192;

#[derive(Args, Debug)]
pub struct BenchDatapathArgs {
    /// Repetitions per BPF_PROG_TEST_RUN call (the kernel reports the mean time per repetition).
    #[arg(long, default_value_t = 2_000_000)]
    pub repeat: u32,
    /// Measurements of every scenario and program; the median, min and max are reported.
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// CPU to pin the measuring thread to (default: the last CPU this process may use).
    #[arg(long)]
    pub cpu: Option<usize>,
    /// Only the scenarios whose name contains this (e.g. "established", "ipv4 not"), for a
    /// profiler run; the targets of the others are then not printed.
    #[arg(long)]
    pub only: Option<String>,
    /// Time SYNs as while a table changes: SYN recording armed for the whole run, so a SYN is
    /// recorded in CT_NEW and its ACK promotes it (the design before the SYN cache).
    #[arg(long)]
    pub record_syns: bool,
    /// Fill CT to its capacity with other clients' flows before the rounds, as on a busy
    /// balancer: the tracked-flow filter then has about 12% of its bits set, and 1.5% of
    /// SYNs look in CT.
    #[arg(long)]
    pub fill_ct: bool,
}

/// `host` written with decimal digits read as hex: 11 -> 0x11 (so that the MAC and the IPv6
/// address end in the same digits as the IPv4 address).
fn hexish(host: u8) -> u16 {
    u16::from_str_radix(&host.to_string(), 16).expect("decimal digits are hex digits")
}

fn backend_mac(host: u8) -> [u8; 6] {
    [0x02, 0x00, 0x00, 0x22, 0x00, hexish(host) as u8]
}

fn backend_v4(host: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 220, 0, host)
}

fn backend_v6(host: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x220, 0, 0, 0, 0, 0, hexish(host))
}

fn config_text() -> String {
    let mut s = format!(
        "interface = \"{IFNAME}\"\npin_dir = \"\"\n\n[encap]\nsource_v4 = \"{LB_V4}\"\nsource_v6 = \"{LB_V6}\"\n"
    );
    for (vip, v4) in [(IpAddr::V4(VIP_V4), true), (IpAddr::V6(VIP_V6), false)] {
        s += &format!(
            "\n[[vip]]\naddress = \"{vip}\"\nport = {VIP_PORT}\nprotocol = \"tcp\"\nforwarding = \"ipip\"\n"
        );
        for h in BACKEND_HOSTS {
            let b: IpAddr = if v4 {
                backend_v4(h).into()
            } else {
                backend_v6(h).into()
            };
            s += &format!("[[vip.backend]]\naddress = \"{b}\"\n");
        }
    }
    s
}

// ---------------------------------------------------------------------------------------------
// Packets.

/// An Ethernet frame with a TCP segment without payload from `src:sport` to `dst:dport`,
/// valid checksums, padded with zeros to at least 64 bytes and to a multiple of 8 (what the
/// harness copies). The balancer uses the IP length, so the padding is not part of the packet.
fn tcp_frame(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let tcp = Tcp {
        // The client's ISN on a SYN, one past it afterwards (what the SYN cache matches).
        seq: if flags & TCP_SYN != 0 { 1_000 } else { 1_001 },
        ack: if flags & TCP_ACK != 0 { 2_000 } else { 0 },
        flags,
        ..Tcp::new(sport, dport)
    }
    .build(src, dst, &[]);
    let (ethertype, ip) = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let h = Ip4 {
                id: 0x1234,
                frag: pkt::IP4_DF,
                ..Ip4::new(s, d, pkt::TCP)
            };
            (pkt::ETH_IPV4, h.build(&tcp))
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => (pkt::ETH_IPV6, Ip6::new(s, d, pkt::TCP).build(&tcp)),
        _ => unreachable!("mixed address families"),
    };
    let mut p = pkt::ether(ETH0_MAC, PEER_MAC, ethertype, &ip);
    let len = p.len().max(64).next_multiple_of(8);
    p.resize(len, 0);
    assert!(p.len() <= BENCH_MAX_PACKET);
    p
}

// ---------------------------------------------------------------------------------------------
// Scenarios.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fam {
    V4,
    V6,
}

impl Fam {
    fn name(self) -> &'static str {
        match self {
            Fam::V4 => "ipv4",
            Fam::V6 => "ipv6",
        }
    }
    fn vip(self) -> IpAddr {
        match self {
            Fam::V4 => VIP_V4.into(),
            Fam::V6 => VIP_V6.into(),
        }
    }
    fn client(self) -> IpAddr {
        match self {
            Fam::V4 => CLIENT_V4.into(),
            Fam::V6 => CLIENT_V6.into(),
        }
    }
    fn local(self) -> IpAddr {
        match self {
            Fam::V4 => LB_V4.into(),
            Fam::V6 => LB_V6.into(),
        }
    }
    /// Offset in the frame of the last 4 bytes of the IP source address.
    fn src_tail_offset(self) -> u32 {
        match self {
            Fam::V4 => 14 + 12,
            Fam::V6 => 14 + 8 + 12,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// TCP to the balancer host's own address: not a VIP, passed.
    NotVip,
    /// A SYN to the VIP from a different source address every repetition: a connection's
    /// first packet; while no table changes, lb sends it on and notes it in the SYN cache.
    NewFlow,
    /// The ACK that follows each of those SYNs (an untimed SYN run sent them first): the
    /// packet that creates the tracked entry, straight in CT when the SYN cache holds its SYN.
    Promote,
    /// The same ACK to the VIP every repetition, on a flow already in the established table.
    Established,
}

#[derive(Clone, Copy, Debug)]
struct Scenario {
    fam: Fam,
    kind: Kind,
}

impl Scenario {
    fn all() -> Vec<Scenario> {
        let mut v = Vec::new();
        for fam in [Fam::V4, Fam::V6] {
            for kind in [
                Kind::NotVip,
                Kind::NewFlow,
                Kind::Promote,
                Kind::Established,
            ] {
                v.push(Scenario { fam, kind });
            }
        }
        v
    }

    fn name(&self) -> String {
        let k = match self.kind {
            Kind::NotVip => "not a VIP (PASS)",
            Kind::NewFlow => "VIP, SYN (new flow)",
            Kind::Promote => "VIP, ACK (creates the entry)",
            Kind::Established => "VIP, established",
        };
        format!("{} {k}", self.fam.name())
    }

    /// The input packet and `vary_off` for round `round`.
    fn input(&self, round: usize) -> (Vec<u8>, u32) {
        let f = self.fam;
        match self.kind {
            Kind::NotVip => (
                tcp_frame(f.client(), f.local(), CLIENT_PORT, 22, TCP_ACK),
                0,
            ),
            Kind::NewFlow => (
                tcp_frame(
                    f.client(),
                    f.vip(),
                    NEW_FLOW_PORT_BASE + round as u16,
                    VIP_PORT,
                    TCP_SYN,
                ),
                f.src_tail_offset(),
            ),
            Kind::Promote => (
                tcp_frame(
                    f.client(),
                    f.vip(),
                    PROMOTE_PORT_BASE + round as u16,
                    VIP_PORT,
                    TCP_ACK,
                ),
                f.src_tail_offset(),
            ),
            Kind::Established => (
                tcp_frame(f.client(), f.vip(), CLIENT_PORT, VIP_PORT, TCP_ACK),
                0,
            ),
        }
    }

    /// The SYNs a promotion run needs recorded first: the same flows as `input`'s ACKs
    /// (the harness numbers repetitions from 1 in every run).
    fn syn_input(&self, round: usize) -> Option<(Vec<u8>, u32)> {
        let f = self.fam;
        (self.kind == Kind::Promote).then(|| {
            (
                tcp_frame(
                    f.client(),
                    f.vip(),
                    PROMOTE_PORT_BASE + round as u16,
                    VIP_PORT,
                    TCP_SYN,
                ),
                f.src_tail_offset(),
            )
        })
    }

    /// Repetitions per run of this scenario (both programs run the same number).
    fn repeat(&self, repeat: u32) -> u32 {
        match self.kind {
            Kind::Promote => repeat.min(PROMOTE_MAX_REPEAT),
            _ => repeat,
        }
    }

    fn expected_verdict(&self) -> u32 {
        match self.kind {
            Kind::NotVip => XDP_PASS,
            _ => XDP_TX,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The harness.

/// The harness object: `bench_harness`, `bench_tx` and their maps.
struct Harness {
    ebpf: Ebpf,
    input: Array<MapData, BenchInput>,
    state: PerCpuArray<MapData, u64>,
    progs: ProgramArray<MapData>,
    ncpu: usize,
}

/// One BPF_PROG_TEST_RUN call.
#[derive(Clone, Copy, Debug)]
struct Sample {
    /// Mean time per repetition as the kernel reports it (integer nanoseconds, truncated).
    kernel_ns: u32,
    /// The calling thread's CPU time during the call divided by the repetitions (fractional;
    /// includes the syscall's fixed cost, negligible over millions of repetitions).
    cpu_ns: f64,
    verdict: u32,
    /// BENCH_STATE[BENCH_RUNS] summed over CPUs: how many times the harness ran.
    runs: u64,
    /// BENCH_STATE[BENCH_TAIL_CALL_FAILED] summed over CPUs.
    tail_call_failed: u64,
}

enum Target<'a> {
    Trivial,
    /// `bench_table_write`: the trivial program plus one slot of a 16 MiB table written.
    TableWrite,
    Balancer(&'a ProgramFd),
}

/// The bench object's XDP program `name` (borrowing the object only, so that the harness's
/// maps stay writable meanwhile).
fn xdp_program<'a>(ebpf: &'a Ebpf, name: &str) -> Result<&'a Xdp> {
    let p = ebpf
        .program(name)
        .ok_or_else(|| anyhow!("no program {name}"))?;
    Ok(<&Xdp>::try_from(p)?)
}

fn take_map(ebpf: &mut Ebpf, name: &str) -> Result<aya::maps::Map> {
    ebpf.take_map(name)
        .ok_or_else(|| anyhow!("the bench object has no map {name}"))
}

impl Harness {
    fn load() -> Result<Self> {
        let mut ebpf = EbpfLoader::new()
            .load(BENCH_OBJ)
            .context("loading the bench object")?;
        for name in [
            progs::BENCH_HARNESS,
            progs::BENCH_TX,
            progs::BENCH_TABLE_WRITE,
        ] {
            let p: &mut Xdp = ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("the bench object has no program {name}"))?
                .try_into()?;
            p.load().with_context(|| {
                format!("the kernel rejected {name} (lb-ebpf/src/bin/bench.rs; the verifier log is below)")
            })?;
        }
        let input = Array::try_from(take_map(&mut ebpf, maps::BENCH_INPUT)?)?;
        let state = PerCpuArray::try_from(take_map(&mut ebpf, maps::BENCH_STATE)?)?;
        let progs = ProgramArray::try_from(take_map(&mut ebpf, maps::BENCH_PROGS)?)?;
        let ncpu = aya::util::nr_cpus().map_err(|(what, e)| anyhow!("{what}: {e}"))?;
        Ok(Harness {
            ebpf,
            input,
            state,
            progs,
            ncpu,
        })
    }

    fn state_sum(&self, index: u32) -> Result<u64> {
        Ok(self.state.get(&index, 0)?.iter().sum())
    }

    /// Runs the harness `repeat` times on `packet` with `target` in its tail-call slot.
    /// BENCH_STATE is zeroed on every CPU first. `out` receives the last repetition's packet.
    #[allow(clippy::too_many_arguments)]
    fn run(
        &mut self,
        target: &Target<'_>,
        packet: &[u8],
        vary_off: u32,
        repeat: u32,
        ifindex: u32,
        out: Option<&mut [u8]>,
    ) -> Result<Sample> {
        if packet.len() > BENCH_MAX_PACKET || !packet.len().is_multiple_of(8) {
            bail!("bench packets must be a multiple of 8 bytes, at most {BENCH_MAX_PACKET}");
        }
        let mut data = [0u8; BENCH_MAX_PACKET];
        data[..packet.len()].copy_from_slice(packet);
        self.input.set(
            0,
            BenchInput {
                len: packet.len() as u32,
                vary_off,
                data,
            },
            0,
        )?;
        let fd = match target {
            Target::Trivial => xdp_program(&self.ebpf, progs::BENCH_TX)?.fd()?,
            Target::TableWrite => xdp_program(&self.ebpf, progs::BENCH_TABLE_WRITE)?.fd()?,
            Target::Balancer(fd) => *fd,
        };
        self.progs.set(0, fd, 0).context("setting BENCH_PROGS[0]")?;
        for index in [BENCH_RUNS, BENCH_TAIL_CALL_FAILED] {
            let zero = PerCpuValues::try_from(vec![0u64; self.ncpu])?;
            self.state.set(index, zero, 0)?;
        }
        // struct xdp_md { data, data_end, data_meta, ingress_ifindex, rx_queue_index,
        // egress_ifindex }: eth0 as the ingress device, so the balancer's fib lookups run
        // against it and a backend reached through eth0 gives XDP_TX.
        let md: [u32; 6] = [0, packet.len() as u32, 0, ifindex, 0, 0];
        let ctx: Vec<u8> = md.iter().flat_map(|w| w.to_ne_bytes()).collect();
        let harness = xdp_program(&self.ebpf, progs::BENCH_HARNESS)?;
        let t0 = thread_cpu_ns();
        let r = harness
            .test_run(TestRunOptions {
                data_in: Some(packet),
                data_out: out,
                ctx_in: Some(&ctx),
                repeat,
                ..TestRunOptions::new()
            })
            .context("BPF_PROG_TEST_RUN")?;
        let t1 = thread_cpu_ns();
        Ok(Sample {
            kernel_ns: r.duration.as_nanos() as u32,
            cpu_ns: (t1 - t0) as f64 / repeat as f64,
            verdict: r.return_value,
            runs: self.state_sum(BENCH_RUNS)?,
            tail_call_failed: self.state_sum(BENCH_TAIL_CALL_FAILED)?,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Balancer state snapshots, for the checks.

struct Snapshot {
    counters: Vec<u64>,
    /// (packets, new_flows) per backend id in `ids`.
    backends: Vec<(u64, u64)>,
}

fn snapshot(lb: &Balancer, ids: &[u32]) -> Result<Snapshot> {
    let counters = lb.counters()?.into_iter().map(|(_, v)| v).collect();
    let backends = ids
        .iter()
        .map(|&id| {
            let s = lb.backend_stats(id)?;
            Ok((s.packets, s.new_flows))
        })
        .collect::<Result<_>>()?;
    Ok(Snapshot { counters, backends })
}

fn counter_delta(a: &Snapshot, b: &Snapshot, c: Counter) -> u64 {
    b.counters[c as usize] - a.counters[c as usize]
}

/// What one balancer measurement showed, and whether it is what the scenario must do.
struct Check {
    ok: bool,
    text: String,
}

/// Checks a balancer sample: `ids` are the backend ids of the scenario's VIP (`all_ids` of
/// both VIPs for the non-VIP scenario).
fn check_balancer(
    sc: &Scenario,
    s: &Sample,
    repeat: u32,
    before: &Snapshot,
    after: &Snapshot,
    ids: &[u32],
    all_ids: &[u32],
) -> Check {
    let repeat = repeat as u64;
    let mut bad = Vec::new();
    let mut parts = vec![format!(
        "harness runs {} (want {repeat}), tail-call failures {}, verdict {}",
        s.runs,
        s.tail_call_failed,
        verdict_name(s.verdict)
    )];
    if s.runs != repeat {
        bad.push("harness run count".to_string());
    }
    if s.tail_call_failed != 0 {
        bad.push("tail call failed".to_string());
    }
    if s.verdict != sc.expected_verdict() {
        bad.push(format!(
            "verdict is not {}",
            verdict_name(sc.expected_verdict())
        ));
    }
    // Backend stats of the backends concerned: ids are a subset of all_ids, same order.
    let delta = |id: u32| {
        let i = all_ids.iter().position(|&x| x == id).expect("known id");
        (
            after.backends[i].0 - before.backends[i].0,
            after.backends[i].1 - before.backends[i].1,
        )
    };
    let per: Vec<(u64, u64)> = ids.iter().map(|&id| delta(id)).collect();
    let packets: u64 = per.iter().map(|p| p.0).sum();
    let new_flows: u64 = per.iter().map(|p| p.1).sum();
    let split = per
        .iter()
        .map(|p| p.0.to_string())
        .collect::<Vec<_>>()
        .join("+");
    // Every counter's expected change.
    let mut expected = vec![0u64; Counter::ALL.len()];
    match sc.kind {
        Kind::NotVip => {
            expected[Counter::PassNotVip as usize] = repeat;
            parts.push(format!(
                "pass_not_vip +{} (want +{repeat}), backends' packets +{packets} (want +0)",
                counter_delta(before, after, Counter::PassNotVip)
            ));
            if packets != 0 {
                bad.push("a backend received packets".to_string());
            }
        }
        Kind::NewFlow | Kind::Promote => {
            // A SYN is a new flow (no entry while no table changes); its ACK goes into CT,
            // or, when another SYN took its SYN cache slot, into CT_NEW (ct_lost, ct_new).
            let counter = if sc.kind == Kind::NewFlow {
                Counter::CtNew
            } else {
                Counter::CtPromoted
            };
            let want_new;
            if sc.kind == Kind::NewFlow {
                // Every SYN carries the same sequence number, so a SYN whose slot holds another
                // flow with the same 32-bit hash is taken for a retry: the slot is 16 bits of
                // the hash, so one SYN in 65536 (about 30 of 2,000,000).
                let retries = repeat - counter_delta(before, after, Counter::CtNew).min(repeat);
                want_new = repeat - retries;
                expected[counter as usize] = want_new;
                if retries > 0 {
                    parts.push(format!("{retries} taken for retries (hash collisions)"));
                }
                if retries > syn_collisions_allowed(repeat) {
                    bad.push(format!(
                        "more hash collisions than twice the expected {:.0} (one SYN in {SYN_SEEN_SLOTS})",
                        repeat as f64 / SYN_SEEN_SLOTS as f64
                    ));
                }
            } else {
                let slow = counter_delta(before, after, Counter::CtLost);
                expected[Counter::CtLost as usize] = slow;
                expected[Counter::CtNew as usize] = slow;
                expected[counter as usize] = repeat - slow.min(repeat);
                want_new = slow;
                parts.push(format!(
                    "{slow} of {repeat} ACKs found their SYN's cache slot taken (ct_lost, ct_new, new_flows)"
                ));
                if slow * 5 > repeat {
                    bad.push("more than a fifth of the ACKs missed the SYN cache".to_string());
                }
            }
            parts.push(format!(
                "backends' packets +{packets} = {split} (want +{repeat}), new_flows +{new_flows} (want +{want_new}), {} +{}",
                counter.name(),
                counter_delta(before, after, counter)
            ));
            if packets != repeat {
                bad.push("backends' packets".to_string());
            }
            if new_flows != want_new {
                bad.push("backends' new_flows".to_string());
            }
        }
        Kind::Established => {
            parts.push(format!(
                "backends' packets +{packets} = {split} (want +{repeat}, all on one backend), new_flows +{new_flows}, ct_new/ct_promoted +0"
            ));
            if packets != repeat {
                bad.push("backends' packets".to_string());
            }
            if !per.iter().any(|p| p.0 == repeat) {
                bad.push("flow not pinned to one backend".to_string());
            }
            if new_flows != 0 {
                bad.push("new flows during the established run".to_string());
            }
        }
    }
    let mut moved = Vec::new();
    for c in Counter::ALL {
        let d = counter_delta(before, after, *c);
        if d != expected[*c as usize] {
            moved.push(format!(
                "{} +{d} (want +{})",
                c.name(),
                expected[*c as usize]
            ));
        }
    }
    if moved.is_empty() {
        parts.push("no other counter moved".to_string());
    } else {
        bad.push(format!("counters: {}", moved.join(", ")));
    }
    let ok = bad.is_empty();
    let mut text = parts.join(", ");
    if !ok {
        text += &format!("  FAILED: {}", bad.join("; "));
    }
    Check { ok, text }
}

fn check_trivial(s: &Sample, repeat: u32, before: &Snapshot, after: &Snapshot) -> Check {
    let ok = s.runs == repeat as u64
        && s.tail_call_failed == 0
        && s.verdict == XDP_TX
        && before.counters == after.counters
        && before.backends == after.backends;
    Check {
        ok,
        text: format!(
            "harness runs {} (want {repeat}), tail-call failures {}, verdict {}, balancer counters {}",
            s.runs,
            s.tail_call_failed,
            verdict_name(s.verdict),
            if before.counters == after.counters && before.backends == after.backends {
                "untouched"
            } else {
                "CHANGED"
            }
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// Setup.

fn setup_namespace(ns: &NetNs) -> Result<()> {
    let mac = |m: [u8; 6]| {
        m.iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    };
    ns.ip(["link", "set", "lo", "up"])?;
    ns.ip([
        "link",
        "add",
        IFNAME,
        "address",
        &mac(ETH0_MAC),
        "type",
        "veth",
        "peer",
        "name",
        PEER,
        "address",
        &mac(PEER_MAC),
    ])?;
    ns.ip(["addr", "add", &format!("{LB_V4}/24"), "dev", IFNAME])?;
    ns.ip([
        "addr",
        "add",
        &format!("{LB_V6}/64"),
        "dev",
        IFNAME,
        "nodad",
    ])?;
    ns.ip(["link", "set", PEER, "up"])?;
    ns.ip(["link", "set", IFNAME, "up"])?;
    for h in BACKEND_HOSTS {
        for addr in [backend_v4(h).to_string(), backend_v6(h).to_string()] {
            ns.ip([
                "neigh",
                "replace",
                &addr,
                "lladdr",
                &mac(backend_mac(h)),
                "dev",
                IFNAME,
                "nud",
                "permanent",
            ])?;
        }
    }
    Ok(())
}

/// Pins the calling thread to one CPU: `want`, or the last CPU it may run on.
fn pin_current_thread(want: Option<usize>) -> Result<usize> {
    // SAFETY: cpu_set_t is a plain bit set; all-zero is empty.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer and size; pid 0 is the calling thread.
    if unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) } != 0
    {
        return Err(std::io::Error::last_os_error()).context("sched_getaffinity");
    }
    let allowed: Vec<usize> = (0..libc::CPU_SETSIZE as usize)
        // SAFETY: index below CPU_SETSIZE.
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect();
    let cpu = match want {
        Some(c) if allowed.contains(&c) => c,
        Some(c) => bail!("--cpu {c}: not one of the CPUs this process may use ({allowed:?})"),
        None => *allowed.last().ok_or_else(|| anyhow!("no CPU allowed"))?,
    };
    // SAFETY: as above.
    let mut one: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: index below CPU_SETSIZE.
    unsafe { libc::CPU_SET(cpu, &mut one) };
    // SAFETY: valid pointer and size.
    if unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &one) } != 0 {
        return Err(std::io::Error::last_os_error()).context("sched_setaffinity");
    }
    Ok(cpu)
}

// ---------------------------------------------------------------------------------------------
// The run.

struct Row {
    scenario: Scenario,
    lb: Vec<Sample>,
    trivial: Vec<Sample>,
    /// `bench_table_write`, for the packet that creates the entry only.
    floor: Vec<Sample>,
    lb_checks: Vec<Check>,
    trivial_checks: Vec<Check>,
    floor_checks: Vec<Check>,
}

struct Report {
    cpu: usize,
    rows: Vec<Row>,
    /// Warm-up facts (established flows), one line per family, and failed SYN runs before
    /// promotion runs.
    warmup: Vec<Check>,
    /// The connection tables as the kernel accounts them.
    tables: Vec<MapMemory>,
    /// The tracked-flow filter as rebuilt before each timed SYN run.
    filter: Vec<FilterFill>,
}

/// The warm-up of an established flow: the first packet must create it in CT_NEW, the second
/// promote it; the second's output must be the packet encapsulated to one of the VIP's
/// backends, with that backend's neighbour MAC.
fn warm_up(
    h: &mut Harness,
    lb: &Balancer,
    sc: &Scenario,
    ifindex: u32,
    ids: &[u32],
) -> Result<Check> {
    let (pkt, vary) = sc.input(0);
    let fd = lb.program().fd()?;
    let s0 = snapshot(lb, ids)?;
    let r1 = h.run(&Target::Balancer(fd), &pkt, vary, 1, ifindex, None)?;
    let s1 = snapshot(lb, ids)?;
    let mut out = [0u8; 512];
    let r2 = h.run(
        &Target::Balancer(fd),
        &pkt,
        vary,
        1,
        ifindex,
        Some(&mut out),
    )?;
    let s2 = snapshot(lb, ids)?;
    let new1 = counter_delta(&s0, &s1, Counter::CtNew);
    let prom1 = counter_delta(&s0, &s1, Counter::CtPromoted);
    let new2 = counter_delta(&s1, &s2, Counter::CtNew);
    let prom2 = counter_delta(&s1, &s2, Counter::CtPromoted);
    // Already established (an earlier round): both packets hit CT, no counter moves.
    let fresh = new1 == 1 && prom1 == 0 && new2 == 0 && prom2 == 1;
    let already = new1 == 0 && prom1 == 0 && new2 == 0 && prom2 == 0;
    let (outer_dst, dmac, proto, ethertype) = match sc.fam {
        Fam::V4 => (
            IpAddr::from([out[30], out[31], out[32], out[33]]),
            &out[0..6],
            out[23],
            u16::from_be_bytes([out[12], out[13]]),
        ),
        Fam::V6 => {
            let mut a = [0u8; 16];
            a.copy_from_slice(&out[38..54]);
            (
                IpAddr::from(a),
                &out[0..6],
                out[20],
                u16::from_be_bytes([out[12], out[13]]),
            )
        }
    };
    let want_proto = match sc.fam {
        Fam::V4 => lb_common::PROTO_IPIP,
        Fam::V6 => lb_common::PROTO_IPV6,
    };
    let backend = BACKEND_HOSTS.iter().find(|&&h| match outer_dst {
        IpAddr::V4(a) => a == backend_v4(h),
        IpAddr::V6(a) => a == backend_v6(h),
    });
    let encap_ok = backend.is_some_and(|&b| dmac == backend_mac(b))
        && proto == want_proto
        && ethertype == if sc.fam == Fam::V4 { 0x0800 } else { 0x86dd };
    let ok = (fresh || already)
        && encap_ok
        && r1.verdict == XDP_TX
        && r2.verdict == XDP_TX
        && r1.tail_call_failed + r2.tail_call_failed == 0;
    let text = format!(
        "{} warm-up: packet 1 ct_new +{new1} ct_promoted +{prom1}, packet 2 ct_new +{new2} ct_promoted +{prom2} ({}); verdicts {}/{}; packet 2 left encapsulated (outer proto {proto}) to {outer_dst}, dst MAC {}{}",
        sc.fam.name(),
        if fresh { "new, then promoted" } else if already { "already established" } else { "UNEXPECTED" },
        verdict_name(r1.verdict),
        verdict_name(r2.verdict),
        dmac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":"),
        if encap_ok { "" } else { "  FAILED: not encapsulated to a backend with its neighbour MAC" }
    );
    Ok(Check { ok, text })
}

/// How many of `repeat` SYNs with one sequence number may be taken for retries: a SYN whose
/// cache slot (16 bits of the flow hash) holds another flow with the same whole hash, one in
/// `SYN_SEEN_SLOTS`. Twice that, and at least 2.
fn syn_collisions_allowed(repeat: u64) -> u64 {
    (2 * repeat / SYN_SEEN_SLOTS as u64).max(2)
}

/// For the promotion scenario: the untimed SYN run that puts in the SYN cache (or, with
/// `--record-syns`, in CT_NEW) the flows whose ACKs the timed run sends. Returns a failed
/// check if the SYNs did not count as new flows (but for hash collisions).
fn record_syns(
    h: &mut Harness,
    lb: &Balancer,
    sc: &Scenario,
    round: usize,
    repeat: u32,
    ifindex: u32,
    ids: &[u32],
) -> Result<Option<Check>> {
    let Some((pkt, vary)) = sc.syn_input(round) else {
        return Ok(None);
    };
    empty_ct_new()?;
    let fd = lb.program().fd()?;
    let before = snapshot(lb, ids)?;
    let s = h.run(&Target::Balancer(fd), &pkt, vary, repeat, ifindex, None)?;
    let after = snapshot(lb, ids)?;
    let made = counter_delta(&before, &after, Counter::CtNew);
    let collisions = (repeat as u64).saturating_sub(made);
    if collisions <= syn_collisions_allowed(repeat as u64)
        && s.runs == repeat as u64
        && s.verdict == XDP_TX
    {
        return Ok(None);
    }
    Ok(Some(Check {
        ok: false,
        text: format!(
            "{} round {round}: the SYNs before the promotion run counted {made} new flows (want {repeat}, up to {} taken for retries), harness runs {}, verdict {}",
            sc.name(),
            syn_collisions_allowed(repeat as u64),
            s.runs,
            verdict_name(s.verdict)
        ),
    }))
}

/// `--fill-ct`: the capacity of `CT4` and of `CT` in flows of clients the scenarios never use
/// (10.99.0.0/16 and fd99::/64 to the VIPs' port), on the configured backends.
fn fill_ct(lb: &Balancer, ids: &[u32]) -> Result<()> {
    let reader = lb.conntrack_reader();
    let n = reader.capacity.0;
    let now = lb_userspace::datapath::conntrack::now_tick();
    let entries: Vec<(FlowKey, CtValue)> = (0..2 * n)
        .map(|i| {
            let mut k = FlowKey {
                sport: (1024 + (i % 60_000) as u16).to_be(),
                dport: VIP_PORT.to_be(),
                proto: lb_common::PROTO_TCP,
                ..Default::default()
            };
            let client = i / 60_000;
            if i % 2 == 0 {
                k.family = lb_common::FAMILY_V4;
                k.src[..4].copy_from_slice(&[10, 99, (client >> 8) as u8, client as u8]);
                k.dst[..4].copy_from_slice(&VIP_V4.octets());
            } else {
                k.family = lb_common::FAMILY_V6;
                k.src = Ipv6Addr::new(0xfd99, 0, 0, 0, 0, 0, 0, client as u16).octets();
                k.dst = VIP_V6.octets();
            }
            let v = CtValue {
                backend: ids[i as usize % ids.len()],
                hash: lb_common::flow_hash(&k),
                last_seen: now,
                ..Default::default()
            };
            (k, v)
        })
        .collect();
    reader.try_insert(CtTable::Established, &entries)?;
    println!(
        "--fill-ct: CT4 and CT filled with {n} other flows each (their capacity) before the rounds"
    );
    Ok(())
}

fn measure(args: &BenchDatapathArgs) -> Result<Report> {
    let cpu = pin_current_thread(args.cpu)?;
    for f in [
        "/proc/sys/net/ipv4/conf/all/forwarding",
        "/proc/sys/net/ipv6/conf/all/forwarding",
    ] {
        std::fs::write(f, "1").with_context(|| format!("enabling forwarding ({f})"))?;
    }
    netif::enable_forwarding(IFNAME)?;
    let ifindex = netif::ifindex(IFNAME)?;

    let cfg = Config::parse(&config_text()).map_err(|e| anyhow!("bench config: {e}"))?;
    let mut opts = LoadOptions::from(&cfg);
    // Private maps only (the config says so too): never pinned, never a running lbd's.
    opts.pin_dir = None;
    let mut lb = Balancer::load(opts)?;
    lb.apply(&cfg)?;
    // Armed for about three days, or not at all (a fresh load is not armed).
    lb.set_syn_recording(if args.record_syns { 1 << 28 } else { 0 })?;
    if args.record_syns {
        println!("SYN recording armed for the whole run (--record-syns): SYNs go into CT_NEW");
    }
    let ids_of = |fam: Fam| -> Vec<u32> {
        lb.vips()
            .find(|v| v.config.address == fam.vip())
            .map(|v| v.backends.iter().map(|b| b.id).collect())
            .unwrap_or_default()
    };
    let ids_v4 = ids_of(Fam::V4);
    let ids_v6 = ids_of(Fam::V6);
    if ids_v4.len() != 3 || ids_v6.len() != 3 {
        bail!("the configured VIPs do not have 3 backends each");
    }
    let all_ids: Vec<u32> = ids_v4.iter().chain(&ids_v6).copied().collect();
    if args.fill_ct {
        fill_ct(&lb, &all_ids)?;
    }

    let mut h = Harness::load()?;
    let fd = lb.program().fd()?;
    let mut rows: Vec<Row> = Scenario::all()
        .into_iter()
        .filter(|sc| {
            args.only
                .as_ref()
                .is_none_or(|o| sc.name().contains(o.as_str()))
        })
        .map(|scenario| Row {
            scenario,
            lb: Vec::new(),
            trivial: Vec::new(),
            floor: Vec::new(),
            lb_checks: Vec::new(),
            trivial_checks: Vec::new(),
            floor_checks: Vec::new(),
        })
        .collect();
    let mut warmup = Vec::new();
    let mut filter = Vec::new();
    // An untimed pass first (a tenth of the repetitions, every scenario and program), so that
    // the first round does not pay for cold caches. The established flows are set up (and that
    // checked) before it; the new flows use source ports no round uses.
    eprintln!("warm-up");
    for row in &rows {
        let sc = row.scenario;
        if sc.kind == Kind::Established {
            warmup.push(warm_up(&mut h, &lb, &sc, ifindex, &all_ids)?);
        }
        let (pkt, vary) = sc.input(args.rounds);
        let n = (sc.repeat(args.repeat) / 10).max(1);
        h.run(&Target::Trivial, &pkt, vary, n, ifindex, None)?;
        warmup.extend(record_syns(
            &mut h,
            &lb,
            &sc,
            args.rounds,
            n,
            ifindex,
            &all_ids,
        )?);
        h.run(&Target::Balancer(fd), &pkt, vary, n, ifindex, None)?;
    }
    for round in 0..args.rounds {
        eprintln!("round {}/{}", round + 1, args.rounds);
        for row in &mut rows {
            let sc = row.scenario;
            let ids = match sc.fam {
                Fam::V4 => &ids_v4,
                Fam::V6 => &ids_v6,
            };
            if sc.kind == Kind::Established {
                // Still established (nothing evicts it): both packets hit CT.
                let w = warm_up(&mut h, &lb, &sc, ifindex, &all_ids)?;
                if !w.ok {
                    warmup.push(w);
                }
            }
            let (pkt, vary) = sc.input(round);
            let repeat = sc.repeat(args.repeat);
            // Alternate the order, so that a drift during a round favours neither program.
            let order: [bool; 2] = if round % 2 == 0 {
                [false, true]
            } else {
                [true, false]
            };
            for is_lb in order {
                if is_lb && sc.kind == Kind::NewFlow {
                    // The filter as lbd keeps it: rebuilt from CT with every scan (at least
                    // every 10 s), so it holds what CT holds now (the promotion runs filled
                    // CT), not every flow inserted since the program was loaded.
                    filter.extend(lb.conntrack_reader().rebuild_filter()?);
                }
                if is_lb {
                    warmup.extend(record_syns(
                        &mut h, &lb, &sc, round, repeat, ifindex, &all_ids,
                    )?);
                }
                let before = snapshot(&lb, &all_ids)?;
                let target = if is_lb {
                    Target::Balancer(fd)
                } else {
                    Target::Trivial
                };
                let s = h.run(&target, &pkt, vary, repeat, ifindex, None)?;
                let after = snapshot(&lb, &all_ids)?;
                if is_lb {
                    let ids_here: &[u32] = if sc.kind == Kind::NotVip {
                        &all_ids
                    } else {
                        ids
                    };
                    row.lb_checks.push(check_balancer(
                        &sc, &s, repeat, &before, &after, ids_here, &all_ids,
                    ));
                    row.lb.push(s);
                } else {
                    row.trivial_checks
                        .push(check_trivial(&s, repeat, &before, &after));
                    row.trivial.push(s);
                }
            }
            if sc.kind == Kind::Promote {
                let before = snapshot(&lb, &all_ids)?;
                let s = h.run(&Target::TableWrite, &pkt, vary, repeat, ifindex, None)?;
                let after = snapshot(&lb, &all_ids)?;
                row.floor_checks
                    .push(check_trivial(&s, repeat, &before, &after));
                row.floor.push(s);
            }
        }
    }
    let tables = [
        maps::ct4::SPEC.name,
        maps::ct::SPEC.name,
        maps::ct_new::SPEC.name,
    ]
    .into_iter()
    .map(map_memory)
    .collect::<Result<_>>()?;
    Ok(Report {
        cpu,
        rows,
        warmup,
        tables,
        filter,
    })
}

// ---------------------------------------------------------------------------------------------
// Statistics and output.

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NEG_INFINITY, f64::max)
}

struct Stats {
    med: f64,
    min: f64,
    max: f64,
}

impl Stats {
    fn of(v: &[f64]) -> Stats {
        Stats {
            med: median(v),
            min: min(v),
            max: max(v),
        }
    }
    fn spread_pct(&self) -> f64 {
        100.0 * (self.max - self.min) / self.med
    }
}

fn kernel_ns(v: &[Sample]) -> Vec<f64> {
    v.iter().map(|s| s.kernel_ns as f64).collect()
}

fn cpu_ns(v: &[Sample]) -> Vec<f64> {
    v.iter().map(|s| s.cpu_ns).collect()
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into())
}

pub fn run(args: &BenchDatapathArgs) -> Result<ExitCode> {
    ensure_root("bench datapath")?;
    if args.repeat < 1 || args.rounds < 1 {
        bail!("--repeat and --rounds must be at least 1");
    }
    if args.rounds > 1000 {
        bail!("--rounds: at most 1000");
    }
    if let Some(o) = &args.only {
        if !Scenario::all()
            .iter()
            .any(|sc| sc.name().contains(o.as_str()))
        {
            bail!("--only {o:?}: no scenario's name contains it");
        }
    }
    let ns = NetNs::new("bench")?;
    setup_namespace(&ns)?;
    let report = ns.run_in(|| measure(args));
    let deleted = ns.delete();
    let report = report?;
    deleted?;

    print_intro(args, &report);
    let (ratios, variance) = print_table(&report);
    let all_ok = print_checks(&report);
    print_variance(&variance);
    print_targets(&ratios);
    print_floor(&report.rows);
    print_memory(&report.tables);
    print_maglev_build()?;
    plot_ratios(&report)?;
    if !all_ok {
        println!("some checks FAILED (see above)");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// `target/bench-datapath/ratios.svg`: lb / trivial ns per packet per scenario (medians).
fn plot_ratios(report: &Report) -> Result<()> {
    let values: Vec<(String, f64)> = report
        .rows
        .iter()
        .map(|row| {
            let lb = Stats::of(&kernel_ns(&row.lb));
            let tr = Stats::of(&kernel_ns(&row.trivial));
            (row.scenario.name(), lb.med / tr.med)
        })
        .collect();
    let dir = crate::target_dir()?.join("bench-datapath");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("ratios.svg");
    tests::plot::bars(
        &path,
        &format!(
            "bench datapath: ns per packet, lb / trivial XDP_TX (kernel {})",
            kernel_release()
        ),
        "lb / trivial",
        &values,
        Some((TARGET_RATIO, "target")),
    )?;
    println!("plot: {}", path.display());
    Ok(())
}

/// Ratio to trivial per scenario: (scenario, ratio of the medians, median per-round ratio).
type Ratios = Vec<(Scenario, f64, f64)>;
/// Spread between rounds per scenario: (scenario, lb %, trivial %).
type Variance = Vec<(String, f64, f64)>;

/// How it was measured.
fn print_intro(args: &BenchDatapathArgs, report: &Report) {
    println!(
        "bench datapath: BPF_PROG_TEST_RUN, {} repetitions per run, {} rounds, measuring thread pinned to CPU {}, kernel {}",
        args.repeat,
        args.rounds,
        report.cpu,
        kernel_release()
    );
    println!(
        "Both programs run through bench_harness, which restores the saved input packet before every repetition (undoes the previous encapsulation, copies the frame back, varies the source address for new flows) and tail-calls the program; the trivial one only returns XDP_TX."
    );
    println!(
        "ns/pkt: median [min..max] over the rounds of the kernel's mean time per repetition (whole ns, truncated by the kernel). ratio: lb median / trivial median; per round: lb / trivial of the same round (run back to back)."
    );
    if !report.filter.is_empty() {
        let share = |f: &FilterFill| f.probe_share * 100.0;
        let lo = report.filter.iter().map(share).fold(f64::MAX, f64::min);
        let hi = report.filter.iter().map(share).fold(0.0, f64::max);
        let entries = report.filter.iter().map(|f| f.scanned).max().unwrap_or(0);
        let bits = report.filter.iter().map(|f| f.bits_set).max().unwrap_or(0);
        println!(
            "SYN runs: the tracked-flow filter rebuilt from CT before each, as lbd's scans do (CT up to {entries} entries, up to {:.1}% of the filter's bits set): {lo:.2}-{hi:.2}% of these SYNs still look in CT.",
            bits as f64 * 100.0 / f64::from(lb_common::CT_FILTER_BITS)
        );
    }
    println!();
}

/// The table of ns per packet and ratios; returns the established-flow ratios and the
/// spread between rounds.
fn print_table(report: &Report) -> (Ratios, Variance) {
    let w = 26;
    println!(
        "{:<w$} | {:>20} | {:>20} | {:>6} | {:>16}",
        "scenario", "lb ns/pkt", "trivial ns/pkt", "ratio", "per round"
    );
    println!("{}", "-".repeat(w + 3 + 20 + 3 + 20 + 3 + 6 + 3 + 16));
    let mut ratios = Vec::new();
    let mut variance = Vec::new();
    let mut cpu_gap = 0.0f64;
    for row in &report.rows {
        let lb = Stats::of(&kernel_ns(&row.lb));
        let tr = Stats::of(&kernel_ns(&row.trivial));
        let ratio = lb.med / tr.med;
        let paired: Vec<f64> = row
            .lb
            .iter()
            .zip(&row.trivial)
            .map(|(l, t)| l.kernel_ns as f64 / t.kernel_ns.max(1) as f64)
            .collect();
        let cpu_ratio = median(&cpu_ns(&row.lb)) / median(&cpu_ns(&row.trivial));
        cpu_gap = cpu_gap.max((cpu_ratio - ratio).abs() / ratio);
        println!(
            "{:<w$} | {:>20} | {:>20} | {:>5.2}x | {:>16}",
            row.scenario.name(),
            format!("{:.0} [{:.0}..{:.0}]", lb.med, lb.min, lb.max),
            format!("{:.0} [{:.0}..{:.0}]", tr.med, tr.min, tr.max),
            ratio,
            format!("{:.2}..{:.2}x", min(&paired), max(&paired))
        );
        ratios.push((row.scenario, ratio, median(&paired)));
        variance.push((row.scenario.name(), lb.spread_pct(), tr.spread_pct()));
    }
    println!(
        "cross-check: the thread's CPU time around each call (fractional ns, syscall included) gives ratios within {:.0}% of these.",
        100.0 * cpu_gap
    );
    (ratios, variance)
}

/// What every repetition did, checked; returns whether all checks passed.
fn print_checks(report: &Report) -> bool {
    println!();
    println!("checks (every repetition did what the scenario must):");
    let mut all_ok = true;
    for c in &report.warmup {
        all_ok &= c.ok;
        println!("  {} {}", if c.ok { "ok  " } else { "FAIL" }, c.text);
    }
    for row in &report.rows {
        let name = row.scenario.name();
        let lists = [
            ("lb", &row.lb_checks),
            ("trivial", &row.trivial_checks),
            ("floor", &row.floor_checks),
        ];
        for (what, checks) in lists.into_iter().filter(|(_, c)| !c.is_empty()) {
            let n_ok = checks.iter().filter(|c| c.ok).count();
            let ok = n_ok == checks.len();
            all_ok &= ok;
            println!(
                "  {} {name}, {what}: {n_ok}/{} rounds ok; last: {}",
                if ok { "ok  " } else { "FAIL" },
                checks.len(),
                checks.last().map_or("", |c| c.text.as_str())
            );
            for (i, c) in checks.iter().enumerate().filter(|(_, c)| !c.ok) {
                println!("       round {}: {}", i + 1, c.text);
            }
        }
    }
    all_ok
}

/// The spread between rounds.
fn print_variance(variance: &Variance) {
    println!();
    let worst = variance.iter().map(|v| v.1.max(v.2)).fold(0.0f64, f64::max);
    println!(
        "variance: spread (max-min)/median per scenario, lb / trivial: {}",
        variance
            .iter()
            .map(|(n, l, t)| format!("{n} {l:.0}%/{t:.0}%"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if worst > 10.0 {
        println!(
            "variance: up to {worst:.0}% between rounds: the machine was busy (other work on the CPUs); trust the medians, rerun on an idle machine or with more --rounds for tighter numbers."
        );
    }
}

/// Issue 24's targets against this run's ratios (lb median / trivial median).
fn print_targets(ratios: &Ratios) {
    println!();
    println!("targets (lb / trivial, medians of this run):");
    for (kind, limit) in TARGETS {
        let what = match kind {
            Kind::Established => "established flow",
            Kind::NotVip => "not a VIP",
            Kind::NewFlow => "a connection's first packet (SYN, no entry while no table changes)",
            Kind::Promote => {
                "the packet that creates the tracked entry (the handshake's ACK, into CT from the SYN cache)"
            }
        };
        for (sc, r, p) in ratios.iter().filter(|(sc, _, _)| sc.kind == kind) {
            println!(
                "  {} {what} <= {limit}x: {r:.2}x (median per-round {p:.2}x): {}",
                sc.fam.name(),
                if *r <= limit {
                    "target met"
                } else {
                    "target NOT met"
                }
            );
        }
    }
}

/// The floor of the packet that creates the entry: `bench_table_write` against the trivial
/// program and against the balancer's ACK, in the same rounds.
fn print_floor(rows: &[Row]) {
    for row in rows.iter().filter(|r| !r.floor.is_empty()) {
        let floor = Stats::of(&kernel_ns(&row.floor)).med;
        let trivial = Stats::of(&kernel_ns(&row.trivial)).med;
        let lb = Stats::of(&kernel_ns(&row.lb)).med;
        println!(
            "  {} floor of that packet: the trivial program plus one 40-byte write to a random \
             slot of a {} MiB table (what any design with an entry per flow does): {floor:.0} ns, \
             {:.2}x trivial; the ACK costs {:.2}x the floor",
            row.scenario.fam.name(),
            (64u64 << BENCH_TABLE_BITS) >> 20,
            floor / trivial,
            lb / floor
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Memory per tracked flow, and the Maglev build time.

/// A connection table as the kernel accounts it (`/proc/self/fdinfo` of its map fd).
struct MapMemory {
    name: &'static str,
    max_entries: u64,
    /// The kernel's `memlock` for the map: what it charges for the whole preallocated table.
    memlock: u64,
}

/// The sizes `htab_map_alloc` uses for a preallocated (LRU) hash map element, kernel 6.x:
/// `struct htab_elem` (hash node 16 + LRU node 24 + hash 4, the key aligned to 8: 48 bytes),
/// then the key and the value, each rounded up to 8; plus one `struct bucket` (list head 8 +
/// lock 4, aligned: 16 bytes) per bucket, buckets = max_entries rounded up to a power of two.
const HTAB_ELEM_HEADER: u64 = 48;
const HTAB_BUCKET: u64 = 16;

/// Bytes per entry of a connection table (`key_size` -> CtValue), computed from the layout.
fn computed_bytes_per_entry(key_size: usize) -> u64 {
    let key = (key_size as u64).next_multiple_of(8);
    let value = (std::mem::size_of::<lb_common::CtValue>() as u64).next_multiple_of(8);
    HTAB_ELEM_HEADER + key + value + HTAB_BUCKET
}

/// The balancer's connection table `name` among this process's fds, found by its shape (the
/// registry's kind, key and value sizes and default capacity; the balancer has no accessor
/// for it): (fd, its fdinfo text).
fn find_ct_map(name: &str) -> Result<(i32, String)> {
    let spec = maps::spec(name).ok_or_else(|| anyhow!("no map {name} in the registry"))?;
    let want = [
        ("map_type", u64::from(spec.kind.bpf_map_type())),
        ("key_size", u64::from(spec.key_size)),
        (
            "value_size",
            std::mem::size_of::<lb_common::CtValue>() as u64,
        ),
        ("max_entries", u64::from(spec.default_entries())),
    ];
    for entry in std::fs::read_dir("/proc/self/fdinfo")? {
        let entry = entry?;
        let Ok(text) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        if want.iter().all(|(f, v)| fdinfo_field(&text, f) == Some(*v)) {
            let fd = entry.file_name().to_string_lossy().parse()?;
            return Ok((fd, text));
        }
    }
    bail!(
        "no map fd of {name}'s shape ({}, {} B key -> CtValue, {} entries) in /proc/self/fdinfo",
        spec.kind.describe(),
        want[1].1,
        want[3].1
    )
}

fn fdinfo_field(text: &str, field: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().parse::<u64>().ok())
}

/// The kernel's figures for the connection table `name`.
fn map_memory(name: &'static str) -> Result<MapMemory> {
    let (_, text) = find_ct_map(name)?;
    Ok(MapMemory {
        name,
        max_entries: fdinfo_field(&text, "max_entries").context("fdinfo without max_entries")?,
        memlock: fdinfo_field(&text, "memlock").context("fdinfo without memlock")?,
    })
}

/// Empties `CT_NEW`, so that the SYNs of a promotion run find room without the LRU evicting
/// any of them (the table is approximate LRU: full of earlier rounds' flows, it evicted some
/// of the new ones before their ACK came). Established flows live in `CT` and are untouched.
fn empty_ct_new() -> Result<()> {
    use std::os::fd::{AsFd, BorrowedFd};
    let (fd, _) = find_ct_map(maps::ct_new::SPEC.name)?;
    // SAFETY: the fd was just listed in /proc/self/fdinfo and the balancer (which owns it)
    // lives on; it is only borrowed long enough to duplicate it.
    let owned = unsafe { BorrowedFd::borrow_raw(fd) }
        .as_fd()
        .try_clone_to_owned()?;
    let data = MapData::from_fd(owned)?;
    let mut map: aya::maps::HashMap<MapData, lb_common::FlowKey, lb_common::CtValue> =
        aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(data))?;
    let keys: Vec<lb_common::FlowKey> = map.keys().collect::<Result<_, _>>()?;
    for k in &keys {
        map.remove(k)?;
    }
    Ok(())
}

fn print_memory(tables: &[MapMemory]) {
    let v4 = computed_bytes_per_entry(std::mem::size_of::<lb_common::FlowKey4>());
    let v6 = computed_bytes_per_entry(std::mem::size_of::<lb_common::FlowKey>());
    println!();
    println!(
        "memory per tracked flow: an established flow holds one entry, IPv4 in CT4 (FlowKey4 {} B -> CtValue {} B: computed {v4} B), IPv6 in CT (FlowKey {} B: {v6} B); computed = htab_elem header {HTAB_ELEM_HEADER} + key and value rounded to 8 + one {HTAB_BUCKET} B bucket (tables are preallocated: the memory is taken at load, full or empty)",
        std::mem::size_of::<lb_common::FlowKey4>(),
        std::mem::size_of::<lb_common::CtValue>(),
        std::mem::size_of::<lb_common::FlowKey>(),
    );
    let mut per = std::collections::BTreeMap::new();
    for t in tables {
        let p = t.memlock as f64 / t.max_entries as f64;
        per.insert(t.name, p);
        println!(
            "  kernel's memlock for {}: {} B for {} entries = {p:.1} B per entry",
            t.name, t.memlock, t.max_entries,
        );
    }
    let per = |name: &str, computed: u64| per.get(name).copied().unwrap_or(computed as f64);
    let mib = |b: f64| b * 1_048_576.0 / (1 << 20) as f64;
    println!(
        "  1M tracked flows (conntrack_size = 1048576, which sizes CT4 and CT each): {:.0} MiB for CT4 and {:.0} MiB for CT at the kernel's figures, plus CT_NEW at its own size",
        mib(per(maps::CT4, v4)),
        mib(per(maps::CT, v6)),
    );
}

/// Maglev table builds of 1,000 backends x 65537 slots (`lb_common::maglev::build`), timed.
fn print_maglev_build() -> Result<()> {
    const BACKENDS: u32 = 1_000;
    const SLOTS: u32 = 65_537;
    const BUILDS: usize = 5;
    const TARGET_MS: f64 = 50.0;
    let backends: Vec<lb_common::maglev::Backend> = (0..BACKENDS)
        .map(|i| {
            let mut addr = [0u8; 16];
            addr[..4].copy_from_slice(&[10, 30, (i >> 8) as u8, i as u8]);
            lb_common::maglev::Backend {
                addr,
                family: lb_common::FAMILY_V4,
                id: i + 1,
                weight: 1,
            }
        })
        .collect();
    let mut ms = Vec::with_capacity(BUILDS);
    for _ in 0..BUILDS {
        let t0 = std::time::Instant::now();
        let table =
            lb_common::maglev::build(&backends, SLOTS).map_err(|e| anyhow!("maglev build: {e}"))?;
        ms.push(t0.elapsed().as_secs_f64() * 1e3);
        std::hint::black_box(table);
    }
    let s = Stats::of(&ms);
    let release = !cfg!(debug_assertions);
    println!();
    println!(
        "maglev build, {BACKENDS} backends x {SLOTS} slots, {} build: median {:.1} ms [{:.1}..{:.1}] over {BUILDS} builds; target < {TARGET_MS} ms (release build): {}",
        if release { "release" } else { "debug" },
        s.med,
        s.min,
        s.max,
        match (release, s.med < TARGET_MS) {
            (false, _) => "not judged (debug build: run `cargo run --release -p xtask -- bench datapath`)",
            (true, true) => "target met",
            (true, false) => "target NOT met",
        }
    );
    Ok(())
}
