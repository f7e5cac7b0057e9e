//! Differential fuzzing of the XDP balancer against the reference model ([`crate::model`]).
//!
//! Random and mutated packets (valid TCP/UDP to VIPs and to near misses, truncated, with bad
//! lengths or checksums, IPv4 options, IPv6 extension headers, fragments, 802.1Q tags, ICMP
//! errors quoting VIP and non-VIP packets, non-IP frames, random bytes) go through the real
//! program with `BPF_PROG_TEST_RUN` and through the model. For every packet the verdict and the
//! output bytes must match, no verdict may be `XDP_ABORTED`, and a passed packet must be
//! byte-for-byte the input. The model's state follows the kernel's: after each packet the
//! model makes its predicted table changes (and accumulates its predicted counter and
//! statistics increments). The counters are compared after every packet for the first 4096
//! packets and for 4096 packets after any difference (which pins it to its packet), otherwise
//! every `counter_every` packets (16) as aggregated deltas, with the window's packets and their
//! predicted counters in the report: reading the 17 per-CPU counters costs about ten test runs
//! (measured: 2.4k packets/s comparing after every packet, 27k every 16). The per-backend and
//! per-VIP statistics and a sample of tracked flows (`Balancer::tracked_backend`) are compared
//! every `check_every` packets, and the whole content of `CT`, `CT_NEW` and `FRAGS` whenever
//! they are flushed (and at the end). After a difference both sides are resynchronised (tables
//! emptied, counters and statistics taken as they are), so one fault is reported once.
//!
//! Connection-table evictions: the LRU tables would evict entries the model cannot know about
//! once full (the kernel's LRU also evicts somewhat before that: per-CPU free lists). Instead of
//! declaring evictions unknowable (which would weaken every later check of a flow), the run
//! keeps the tables far below capacity: `CT` and `CT_NEW` are 65536 entries, `FRAGS` 8192
//! (fixed), and when the model holds more than a quarter of that (16384, 16384, 2048), both
//! sides are compared entry by entry and emptied (deleted through the map, and cleared in the
//! model). The BPF LRU only evicts when its global free list runs short of its per-CPU refill
//! batch (at most 128 per CPU), so at a quarter full no eviction can happen, and the model's
//! tables are exact.
//!
//! Environment: one network namespace with two veth pairs: `eth0` (the ingress, MTU 1500) with
//! backends 10.230.0.N / fd00:230::N, and `eth1` (MTU 1400) with backends 10.230.1.N /
//! fd00:230:1::N, so forwarding is `XDP_TX` or `XDP_REDIRECT` and both MTUs produce "too big"
//! answers. Permanent neighbours with known MACs make `bpf_fib_lookup` deterministic; one
//! backend per family has no neighbour and one no route (`drop_fib`). The MTUs never change
//! during a run, so the program's next-hop cache (250 jiffies) always holds what a fresh lookup
//! would find. The configuration does change (backends removed, re-added, drained, VIPs removed
//! and re-added), and backends are marked down and up again (`Balancer::set_backend_down`, as
//! the health checker does; `apply` keeps the mark), so re-steering is exercised. The model is
//! resynchronised from `Balancer::vips()` after every change, and its backend flags are
//! checked against the kernel's `BACKENDS` entries.
//!
//! Everything is seeded ([`FuzzOptions::seed`]): a failure reproduces with the same seed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use aya::maps::{Array, HashMap as BpfHashMap, Map, MapData};
use aya::programs::{ProgramError, TestRun, TestRunOptions};
use lb_common::{
    maps, BackendInfo, BackendStats, Counter, CtValue, FlowKey, FlowKey4, FragKey, VipStats,
    BACKEND_F_DOWN, CT_F_CLOSING, CT_F_RESTEERED,
};
use lb_userspace::config::Forwarding;
use lb_userspace::{Balancer, Config, LoadOptions};

use crate::model::{self, Flow, FragId, Mode, NextHop, State, SynSlot, Track, Verdict};
use crate::netns::{NetNs, Veth};
use lb_pkt::{self as pkt, mac_str, Ip4, Ip6, Mac, Tcp, ICMP, ICMPV6, IPV6_FRAG, TCP, UDP};

// ---------------------------------------------------------------------------------------------
// Options and report.

/// How long and how closely to fuzz.
#[derive(Clone, Debug)]
pub struct FuzzOptions {
    pub seed: u64,
    /// Stop after this many packets (if set).
    pub packets: Option<u64>,
    /// Stop after this long (if set).
    pub duration: Option<Duration>,
    /// Compare the counters every this many packets (1: after every packet).
    pub counter_every: u64,
    /// Compare backend and VIP statistics and sample tracked flows every this many packets.
    pub check_every: u64,
    /// Apply the next configuration variant every this many packets.
    pub reconfig_every: u64,
    /// Mark other backends down every this many packets.
    pub down_every: u64,
    /// Stop after this many mismatches (each resynchronises both sides).
    pub max_mismatches: usize,
    /// Print a progress line this often.
    pub progress: Option<Duration>,
}

impl FuzzOptions {
    pub fn new(seed: u64) -> FuzzOptions {
        FuzzOptions {
            seed,
            packets: None,
            duration: None,
            counter_every: 16,
            check_every: 8192,
            reconfig_every: 150_000,
            down_every: 25_000,
            max_mismatches: 10,
            progress: Some(Duration::from_secs(15)),
        }
    }
}

/// The seed from `LB_FUZZ_SEED` (decimal or 0x-hex), else one from the clock.
pub fn seed_from_env() -> u64 {
    match std::env::var("LB_FUZZ_SEED") {
        Ok(s) => {
            let s = s.trim();
            let v = match s.strip_prefix("0x") {
                Some(h) => u64::from_str_radix(h, 16),
                None => s.parse(),
            };
            v.unwrap_or_else(|_| panic!("LB_FUZZ_SEED={s:?} is not a number"))
        }
        Err(_) => {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            t.as_nanos() as u64 ^ ((std::process::id() as u64) << 32)
        }
    }
}

#[derive(Debug, Default)]
pub struct FuzzReport {
    pub seed: u64,
    pub packets: u64,
    pub elapsed: Duration,
    /// Packets per generated class.
    pub mix: BTreeMap<&'static str, u64>,
    /// Packets per verdict.
    pub verdicts: BTreeMap<&'static str, u64>,
    /// Packets per decision path of the model.
    pub paths: BTreeMap<&'static str, u64>,
    /// Counter totals (as predicted and confirmed).
    pub counters: BTreeMap<&'static str, u64>,
    pub mismatches: Vec<String>,
    pub flushes: u64,
    pub reconfigs: u64,
    pub downs: u64,
    pub entries_compared: u64,
    pub tracked_checked: u64,
    pub counter_checks: u64,
    /// Rebuilds of the tracked-flow filter (`CT_FILTER`) during the run.
    pub filter_rebuilds: u64,
}

impl FuzzReport {
    pub fn pps(&self) -> f64 {
        self.packets as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Paths, verdicts and counters that a long enough run must reach; what it did not.
    pub fn uncovered(&self) -> Vec<String> {
        let mut missing = Vec::new();
        for p in [
            "ct",
            "ct(resteered)",
            "ct_new(syn)",
            "ct_new+promote",
            "syn_seen(new)",
            "syn_seen(retry)",
            "syn_seen+ack",
            "ct_new(syn_seen retry)",
            "new",
            "reuse(ct)",
            "reuse(ct_new)",
            "resteer(ct)",
            "resteer(ct_new)",
            "frag",
            "icmp(tracked)",
            "icmp(table)",
            "no_backend",
        ] {
            if self.paths.get(p).copied().unwrap_or(0) == 0 {
                missing.push(format!("path {p}"));
            }
        }
        for v in [Verdict::Pass, Verdict::Drop, Verdict::Tx, Verdict::Redirect] {
            if self.verdicts.get(v.name()).copied().unwrap_or(0) == 0 {
                missing.push(format!("verdict {}", v.name()));
            }
        }
        for c in Counter::ALL {
            // Unreachable with a valid configuration and tables kept below capacity.
            if matches!(
                c,
                Counter::DropAdjust
                    | Counter::DropNoEncapSource
                    | Counter::CtInsertFailed
                    | Counter::CtNewInsertFailed
                    | Counter::FragInsertFailed
            ) {
                continue;
            }
            if self.counters.get(c.name()).copied().unwrap_or(0) == 0 {
                missing.push(format!("counter {}", c.name()));
            }
        }
        missing
    }

    pub fn summary(&self) -> String {
        let mut s = String::new();
        let total = self.packets.max(1) as f64;
        writeln!(
            s,
            "seed {:#x}: {} packets in {:.1} s = {:.0} packets/s through the XDP program and the model; {} mismatches",
            self.seed,
            self.packets,
            self.elapsed.as_secs_f64(),
            self.pps(),
            self.mismatches.len()
        )
        .unwrap();
        writeln!(
            s,
            "checks: {} counter comparisons, {} tracked flows sampled, {} table entries compared in {} flushes; {} reconfigurations, {} down-marks, {} tracked-flow filter rebuilds",
            self.counter_checks,
            self.tracked_checked,
            self.entries_compared,
            self.flushes,
            self.reconfigs,
            self.downs,
            self.filter_rebuilds
        )
        .unwrap();
        let table = |s: &mut String, title: &str, m: &BTreeMap<&'static str, u64>| {
            writeln!(s, "{title}:").unwrap();
            let mut v: Vec<_> = m.iter().collect();
            v.sort_by(|a, b| b.1.cmp(a.1));
            for (k, n) in v {
                writeln!(s, "  {k:<22} {n:>10}  {:5.2}%", *n as f64 * 100.0 / total).unwrap();
            }
        };
        table(&mut s, "packet classes", &self.mix);
        table(&mut s, "verdicts", &self.verdicts);
        table(&mut s, "model decision paths", &self.paths);
        table(&mut s, "counters", &self.counters);
        s
    }
}

// ---------------------------------------------------------------------------------------------
// Seeded RNG (xoshiro256**, seeded by splitmix64): no dependency, stable across versions.

pub struct Rng([u64; 4]);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        let mut z = seed;
        let mut next = || {
            z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut x = z;
            x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            x ^ (x >> 31)
        };
        Rng([next(), next(), next(), next()])
    }

    pub fn u64(&mut self) -> u64 {
        let s = &mut self.0;
        let r = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        r
    }

    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.u64() % n as u64) as usize
        }
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo + 1)
    }

    pub fn chance(&mut self, p: f64) -> bool {
        (self.u64() >> 11) as f64 / (1u64 << 53) as f64 > 1.0 - p
    }

    pub fn u8(&mut self) -> u8 {
        self.u64() as u8
    }

    pub fn u16(&mut self) -> u16 {
        self.u64() as u16
    }

    pub fn u32(&mut self) -> u32 {
        self.u64() as u32
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.u8()).collect()
    }

    pub fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len())]
    }
}

// ---------------------------------------------------------------------------------------------
// The environment.

const ETH0_MAC: Mac = [0x02, 0x00, 0x00, 0x33, 0x00, 0x02];
const ETH1_MAC: Mac = [0x02, 0x00, 0x00, 0x33, 0x01, 0x02];
const MTU: [u16; 2] = [1500, 1400];
const LB_V4: Ipv4Addr = Ipv4Addr::new(10, 230, 0, 2);
const LB_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x230, 0, 0, 0, 0, 0, 2);
/// Backends with a permanent neighbour: (segment, host).
const RESOLVED: [(u8, u8); 7] = [
    (0, 0x11),
    (0, 0x12),
    (0, 0x13),
    (0, 0x14),
    (1, 0x21),
    (1, 0x22),
    (1, 0x23),
];
/// On eth0's subnet, without a neighbour entry: `bpf_fib_lookup` finds no neighbour.
const UNRESOLVED: u8 = 0x99;

fn backend(v6: bool, seg: u8, host: u8) -> IpAddr {
    if v6 {
        IpAddr::V6(Ipv6Addr::new(
            0xfd00,
            0x230,
            seg as u16,
            0,
            0,
            0,
            0,
            host as u16,
        ))
    } else {
        IpAddr::V4(Ipv4Addr::new(10, 230, seg, host))
    }
}

/// No route at all towards this one.
fn unroutable(v6: bool) -> IpAddr {
    if v6 {
        IpAddr::V6(Ipv6Addr::new(0xfd00, 0x231, 0, 0, 0, 0, 0, 5))
    } else {
        IpAddr::V4(Ipv4Addr::new(10, 231, 0, 5))
    }
}

fn backend_mac(v6: bool, seg: u8, host: u8) -> Mac {
    [0x02, 0x00, 0x00, 0x34 + v6 as u8, seg, host]
}

fn vip_addr(v6: bool, n: u8) -> IpAddr {
    if v6 {
        IpAddr::V6(Ipv6Addr::new(0xfd00, 0x230, 0x100, 0, 0, 0, 0, n as u16))
    } else {
        IpAddr::V4(Ipv4Addr::new(10, 230, 100, n))
    }
}

/// A service the generator aims at.
#[derive(Clone, Copy, Debug)]
struct Target {
    addr: IpAddr,
    port: u16,
    proto: u8,
}

/// The VIP services of the base configuration (some variants remove some of them).
fn vip_targets(v6: bool) -> Vec<Target> {
    let t = |n, port, proto| Target {
        addr: vip_addr(v6, n),
        port,
        proto,
    };
    vec![
        t(1, 80, TCP),
        t(1, 53, UDP),
        t(1, 443, TCP),
        t(2, 80, TCP),
        t(2, 5000, UDP),
        t(3, 80, UDP),
    ]
}

/// Services that are not VIPs: other ports and protocols on VIP addresses (some pass the
/// port filter), VIP ports on other addresses, the balancer's own address.
fn near_miss_targets(v6: bool) -> Vec<Target> {
    let lb = if v6 {
        IpAddr::V6(LB_V6)
    } else {
        IpAddr::V4(LB_V4)
    };
    let t = |addr, port, proto| Target { addr, port, proto };
    vec![
        t(vip_addr(v6, 1), 53, TCP),
        t(vip_addr(v6, 1), 443, UDP),
        t(vip_addr(v6, 1), 8080, TCP),
        t(vip_addr(v6, 2), 53, UDP),
        t(vip_addr(v6, 3), 80, TCP),
        t(vip_addr(v6, 7), 80, TCP),
        t(vip_addr(v6, 7), 53, UDP),
        t(lb, 22, TCP),
        t(lb, 80, TCP),
    ]
}

/// Configuration variant `n % 3`: 0 is the base; 1 removes, drains and adds backends and
/// removes the third VIP address; 2 re-adds (with new ids), reweights and restores.
fn config_text(n: u64) -> String {
    let variant = n % 3;
    let mut t = format!(
        "interface = \"eth0\"\npin_dir = \"\"\ntable_pool = {}\nconntrack_size = 65536\nconntrack_new_size = 65536\n[encap]\nsource_v4 = \"{LB_V4}\"\nsource_v6 = \"{LB_V6}\"\n",
        1u32 << 20
    );
    for v6 in [false, true] {
        let b = |seg, host| backend(v6, seg, host);
        // (vip n, port, proto, forwarding, table size, [(address, weight, drained)])
        type Backends = Vec<(IpAddr, u32, bool)>;
        let mut vips: Vec<(u8, u16, &str, &str, u32, Backends)> = Vec::new();
        let vip1_tcp = match variant {
            0 => vec![
                (b(0, 0x11), 1, false),
                (b(0, 0x12), 2, false),
                (b(0, 0x13), 1, false),
                (b(1, 0x21), 1, false),
            ],
            1 => vec![
                (b(0, 0x11), 1, false),
                (b(0, 0x13), 1, true),
                (b(1, 0x21), 1, false),
            ],
            _ => vec![
                (b(0, 0x11), 1, false),
                (b(0, 0x12), 3, false),
                (b(0, 0x13), 1, false),
                (b(1, 0x21), 2, false),
            ],
        };
        vips.push((1, 80, "tcp", "ipip", 65_537, vip1_tcp));
        let vip1_udp = match variant {
            2 => vec![(b(0, 0x11), 1, false), (b(0, 0x12), 1, false)],
            _ => vec![
                (b(0, 0x11), 1, false),
                (b(0, 0x12), 1, false),
                (b(0, UNRESOLVED), 1, false),
            ],
        };
        vips.push((1, 53, "udp", "ipip", 1021, vip1_udp));
        let vip1_l2 = match variant {
            1 => vec![
                (b(0, 0x13), 1, false),
                (b(0, 0x14), 1, false),
                (b(0, 0x12), 1, false),
            ],
            _ => vec![
                (b(0, 0x13), 1, false),
                (b(0, 0x14), 1, false),
                (b(1, 0x22), 1, false),
            ],
        };
        vips.push((1, 443, "tcp", "l2", 1021, vip1_l2));
        let vip2_tcp = match variant {
            1 => vec![(b(0, 0x11), 1, false)],
            _ => vec![],
        };
        vips.push((2, 80, "tcp", "ipip", 1021, vip2_tcp));
        vips.push((
            2,
            5000,
            "udp",
            "ipip",
            1021,
            vec![(unroutable(v6), 1, false), (b(1, 0x23), 1, false)],
        ));
        if variant != 1 {
            vips.push((3, 80, "udp", "l2", 7, vec![(b(0, 0x14), 1, false)]));
        }
        for (n, port, proto, fwd, size, backends) in vips {
            let addr = vip_addr(v6, n);
            writeln!(
                t,
                "\n[[vip]]\naddress = \"{addr}\"\nport = {port}\nprotocol = \"{proto}\"\nforwarding = \"{fwd}\"\ntable_size = {size}"
            )
            .unwrap();
            for (a, w, drained) in backends {
                writeln!(
                    t,
                    "[[vip.backend]]\naddress = \"{a}\"\nweight = {w}\ndrained = {drained}"
                )
                .unwrap();
            }
        }
    }
    t
}

fn config(n: u64) -> Result<Config> {
    let text = config_text(n);
    Config::parse(&text).map_err(|e| anyhow!("fuzz config variant {n} is invalid: {e}\n{text}"))
}

/// Builds the namespace: eth0/peer0 and eth1/peer1, addresses, forwarding, neighbours.
/// Returns the ifindexes of eth0 and eth1.
fn setup_namespace(ns: &NetNs) -> Result<[u32; 2]> {
    let mut ifindex = [0u32; 2];
    for (i, mac) in [ETH0_MAC, ETH1_MAC].iter().enumerate() {
        let (dev, peer) = (format!("eth{i}"), format!("peer{i}"));
        ns.add_veth(&Veth {
            name: &dev,
            peer: &peer,
            mtu: MTU[i].into(),
            mac: Some(&mac_str(mac)),
            peer_mac: None,
            peer_ns: None,
        })?;
        ns.ip(["addr", "add", &format!("10.230.{i}.2/24"), "dev", &dev])?;
        ns.ip([
            "-6",
            "addr",
            "add",
            &format!("fd00:230:{i}::2/64"),
            "dev",
            &dev,
            "nodad",
        ])?;
        for d in [dev.as_str(), peer.as_str()] {
            ns.ip(["link", "set", d, "up"])?;
        }
        ifindex[i] = ns
            .exec_ok("cat", [format!("/sys/class/net/{dev}/ifindex")])?
            .trim()
            .parse()
            .context("eth ifindex")?;
    }
    ns.ip(["link", "set", "lo", "up"])?;
    ns.exec_ok(
        "sysctl",
        [
            "-qw",
            "net.ipv4.conf.all.forwarding=1",
            "net.ipv4.conf.eth0.forwarding=1",
            "net.ipv4.conf.eth1.forwarding=1",
            "net.ipv6.conf.all.forwarding=1",
            "net.ipv6.conf.eth0.forwarding=1",
            "net.ipv6.conf.eth1.forwarding=1",
        ],
    )?;
    for (seg, host) in RESOLVED {
        for v6 in [false, true] {
            ns.ip([
                "neigh",
                "replace",
                &backend(v6, seg, host).to_string(),
                "lladdr",
                &mac_str(&backend_mac(v6, seg, host)),
                "dev",
                &format!("eth{seg}"),
                "nud",
                "permanent",
            ])?;
        }
    }
    Ok(ifindex)
}

/// What `bpf_fib_lookup` finds towards every backend the configurations use.
fn nexthops(ifindex: [u32; 2]) -> HashMap<IpAddr, NextHop> {
    let mut m = HashMap::new();
    for (seg, host) in RESOLVED {
        for v6 in [false, true] {
            let s = seg as usize;
            m.insert(
                backend(v6, seg, host),
                NextHop {
                    ifindex: ifindex[s],
                    smac: if s == 0 { ETH0_MAC } else { ETH1_MAC },
                    dmac: backend_mac(v6, seg, host),
                    mtu: MTU[s],
                },
            );
        }
    }
    m
}

/// A model state like the fuzzer's environment, for runs without the kernel (no root): the
/// base configuration's tables built by `lb_common::maglev::build` (as the agent builds them),
/// backend ids and VIP ids assigned in order, eth0/eth1 as ifindex 2/3.
pub fn offline_state() -> State {
    let cfg = config(0).expect("base configuration");
    let ifindex = [2, 3];
    let mut m = State::new();
    m.ingress_ifindex = ifindex[0];
    m.encap_v4 = Some(LB_V4);
    m.encap_v6 = Some(LB_V6);
    m.nexthops = nexthops(ifindex);
    let mut vips = HashMap::new();
    let mut next_id = 1;
    for (vip_id, v) in cfg.vips.iter().enumerate() {
        let mode = match v.forwarding {
            Forwarding::Ipip => Mode::Ipip,
            Forwarding::L2 => Mode::L2,
        };
        let mut mg = Vec::new();
        for b in &v.backends {
            let (addr, family) = lb_userspace::datapath::addr_bytes(b.address);
            mg.push(lb_common::maglev::Backend {
                addr,
                family,
                id: next_id,
                weight: b.effective_weight(),
            });
            m.backends.insert(
                next_id,
                model::Backend {
                    addr: b.address,
                    mode,
                    vip_id: vip_id as u32,
                    active: true,
                    down: false,
                },
            );
            next_id += 1;
        }
        let table = lb_common::maglev::build(&mg, v.table_size).expect("maglev table");
        vips.insert(
            (v.address, v.port, v.protocol.number()),
            model::Vip {
                vip_id: vip_id as u32,
                mode,
                table,
            },
        );
    }
    m.set_vips(vips);
    m
}

// ---------------------------------------------------------------------------------------------
// The kernel side.

struct Kernel {
    lb: Balancer,
    ingress: u32,
    ct: BpfHashMap<MapData, FlowKey, CtValue>,
    ct4: BpfHashMap<MapData, FlowKey4, CtValue>,
    ct_new: BpfHashMap<MapData, FlowKey, CtValue>,
    frags: BpfHashMap<MapData, FragKey, CtValue>,
    syn_seen: Array<MapData, CtValue>,
    backends: Array<MapData, BackendInfo>,
    /// For mismatch reports only.
    nexthops: Array<MapData, lb_common::NextHop>,
    out: Vec<u8>,
}

/// A map of the loaded program, opened by id (the agent keeps its own handles private).
fn program_map(lb: &Balancer, name: &str) -> Result<Map> {
    let info = lb.program().info().context("program info")?;
    let ids = info
        .map_ids()
        .context("program map ids")?
        .ok_or_else(|| anyhow!("the kernel does not report the program's map ids"))?;
    for id in ids {
        let md = MapData::from_id(id).with_context(|| format!("opening map id {id}"))?;
        if md.info()?.name_as_str() == Some(name) {
            return Ok(Map::from_map_data(md)?);
        }
    }
    bail!("the balancer program uses no map named {name}")
}

impl Kernel {
    fn new(lb: Balancer, ingress: u32) -> Result<Kernel> {
        Ok(Kernel {
            ct: program_map(&lb, maps::CT)?.try_into()?,
            ct4: program_map(&lb, maps::CT4)?.try_into()?,
            ct_new: program_map(&lb, maps::CT_NEW)?.try_into()?,
            frags: program_map(&lb, maps::FRAGS)?.try_into()?,
            syn_seen: program_map(&lb, maps::SYN_SEEN)?.try_into()?,
            backends: program_map(&lb, maps::BACKENDS)?.try_into()?,
            nexthops: program_map(&lb, maps::NEXTHOPS)?.try_into()?,
            lb,
            ingress,
            out: vec![0u8; 4096],
        })
    }

    /// Runs the program once on `frame` with eth0 as the ingress interface (the calling thread
    /// must be in the namespace: `bpf_fib_lookup` uses its network namespace).
    fn run(&mut self, frame: &[u8]) -> Result<(Verdict, &[u8]), String> {
        // struct xdp_md { data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex }
        let mut md = [0u8; 24];
        md[4..8].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
        md[12..16].copy_from_slice(&self.ingress.to_ne_bytes());
        let r = self.lb.program().test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut self.out),
            ctx_in: Some(&md),
            repeat: 1,
            ..Default::default()
        });
        match r {
            Ok(r) => {
                let v = Verdict::from_xdp(r.return_value)
                    .ok_or_else(|| format!("unknown XDP verdict {}", r.return_value))?;
                Ok((v, &self.out[..r.data_size_out as usize]))
            }
            Err(ProgramError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::EINVAL) =>
            {
                Ok((Verdict::Refused, &self.out[..0]))
            }
            Err(e) => Err(format!("BPF_PROG_TEST_RUN: {e:#}")),
        }
    }

    fn counters(&self) -> Result<Vec<u64>> {
        Ok(self.lb.counters()?.into_iter().map(|(_, n)| n).collect())
    }
}

// ---------------------------------------------------------------------------------------------
// Packet building (generator side; the model never uses these): `lb_pkt`.

/// A TCP (20 bytes, or with `opts` bytes of NOP options; flags and sequence number; an ACK
/// carries acknowledgement number 0x5e6f7081) or UDP segment with a valid checksum.
#[allow(clippy::too_many_arguments)]
fn segment(
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    sport: u16,
    dport: u16,
    (flags, seq): (u8, u32),
    opts: usize,
    payload: &[u8],
) -> Vec<u8> {
    if proto == TCP {
        Tcp {
            seq,
            ack: if flags & pkt::TCP_ACK != 0 {
                0x5e6f_7081
            } else {
                0
            },
            flags,
            options: vec![1; opts],
            ..Tcp::new(sport, dport)
        }
        .build(src, dst, payload)
    } else {
        pkt::udp(src, dst, sport, dport, payload)
    }
}

// ---------------------------------------------------------------------------------------------
// The generator.

#[derive(Clone, Copy, Debug)]
struct PoolFlow {
    client: IpAddr,
    target: Target,
    sport: u16,
    sent: u32,
    tos: u8,
    /// The client's initial sequence number: SYNs carry it, later packets follow it. A new
    /// one now and then is a new connection on the same 4-tuple (tuple reuse).
    isn: u32,
}

#[derive(Clone, Copy, Debug)]
struct FragRecord {
    client: IpAddr,
    vip: IpAddr,
    proto: u8,
    id: u32,
}

/// Classes and their weights (per 1000).
const MIX: [(&str, u32); 16] = [
    ("vip_flow", 340),
    ("large", 50),
    ("near_miss", 60),
    ("truncated", 50),
    ("bad_length", 50),
    ("bad_checksum", 20),
    ("ip_options", 40),
    ("ipv6_ext", 30),
    ("frag_first", 40),
    ("frag_later", 50),
    ("icmp_error", 80),
    ("icmp_other", 20),
    ("random", 30),
    ("non_ip", 20),
    ("mutated", 110),
    ("padded", 10),
];

const POOL: usize = 1024;
const ROUTERS: [Mac; 3] = [
    [0x02, 0xee, 0, 0, 0, 1],
    [0x02, 0xee, 0, 0, 0, 2],
    [0x0a, 0x1b, 0x2c, 0x3d, 0x4e, 0x5f],
];

/// The packet generator: seeded, one `(class, frame)` per call.
pub struct Generator {
    rng: Rng,
    pool: Vec<PoolFlow>,
    frags: Vec<FragRecord>,
    vips: [Vec<Target>; 2],
    misses: [Vec<Target>; 2],
}

impl Generator {
    pub fn new(seed: u64) -> Generator {
        Generator {
            rng: Rng::new(seed),
            pool: Vec::new(),
            frags: Vec::new(),
            vips: [vip_targets(false), vip_targets(true)],
            misses: [near_miss_targets(false), near_miss_targets(true)],
        }
    }

    /// One packet: (class, frame).
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> (&'static str, Vec<u8>) {
        if self.rng.below(2000) == 0 {
            let n = self.rng.below(14);
            return ("runt", self.rng.bytes(n));
        }
        let mut w = self.rng.below(1000) as u32;
        let mut class = MIX[0].0;
        for (c, weight) in MIX {
            if w < weight {
                class = c;
                break;
            }
            w -= weight;
        }
        let mut f = match class {
            "vip_flow" => self.vip_flow(None, Size::Normal),
            "large" => self.vip_flow(None, Size::Large),
            "near_miss" => self.near_miss(),
            "truncated" => {
                let f = self.any_valid();
                let n = self.rng.range(14, f.len().max(15) - 1);
                f[..n.min(f.len())].to_vec()
            }
            "bad_length" => self.bad_length(),
            "bad_checksum" => self.bad_checksum(),
            "ip_options" => self.vip_flow(Some(false), Size::Options),
            "ipv6_ext" => self.ipv6_ext(),
            "frag_first" => self.frag_first(),
            "frag_later" => self.frag_later(),
            "icmp_error" => self.icmp_error(true),
            "icmp_other" => self.icmp_error(false),
            "random" => self.random(),
            "non_ip" => self.non_ip(),
            "mutated" => {
                let mut f = self.any_valid();
                for _ in 0..self.rng.range(1, 4) {
                    let at = self.rng.below(f.len().min(100));
                    if self.rng.chance(0.5) {
                        f[at] ^= 1 << self.rng.below(8);
                    } else {
                        f[at] = self.rng.u8();
                    }
                }
                f
            }
            "padded" => self.padded(),
            _ => unreachable!(),
        };
        let tagged = self.rng.chance(0.12) && f.len() >= 14 && class != "non_ip";
        if tagged {
            let tci = self.rng.u16();
            pkt::add_vlan(&mut f, tci);
        }
        (class, f)
    }

    fn eth_in(&mut self, et: u16, payload: &[u8]) -> Vec<u8> {
        let dst = if self.rng.chance(0.95) {
            ETH0_MAC
        } else {
            let mut m: Mac = self.rng.bytes(6).try_into().unwrap();
            m[0] &= 0xfe;
            m
        };
        let src = *self.rng.pick(&ROUTERS);
        pkt::ether(dst, src, et, payload)
    }

    fn client(&mut self, v6: bool) -> IpAddr {
        if v6 {
            IpAddr::V6(Ipv6Addr::new(
                0x2001,
                0xdb8,
                self.rng.below(4) as u16,
                0,
                0,
                0,
                self.rng.u16(),
                self.rng.u16(),
            ))
        } else if self.rng.chance(0.8) {
            IpAddr::V4(Ipv4Addr::new(
                198,
                51,
                100 + self.rng.below(4) as u8,
                self.rng.u8(),
            ))
        } else {
            IpAddr::V4(Ipv4Addr::new(203, 0, 113, self.rng.u8()))
        }
    }

    fn new_flow(&mut self, v6: bool, miss: bool) -> (usize, PoolFlow) {
        let len = if miss {
            self.misses[v6 as usize].len()
        } else {
            self.vips[v6 as usize].len()
        };
        let i = self.rng.below(len);
        let target = if miss {
            self.misses[v6 as usize][i]
        } else {
            self.vips[v6 as usize][i]
        };
        let f = PoolFlow {
            client: self.client(v6),
            target,
            sport: self.rng.range(1024, 65535) as u16,
            sent: 0,
            tos: if self.rng.chance(0.7) {
                0
            } else {
                self.rng.u8()
            },
            isn: self.rng.u32(),
        };
        if self.pool.len() < POOL {
            self.pool.push(f);
            (self.pool.len() - 1, f)
        } else {
            let i = self.rng.below(POOL);
            self.pool[i] = f;
            (i, f)
        }
    }

    /// A flow of the pool (80%) or a new one; `v6`: of that family.
    fn flow(&mut self, v6: Option<bool>) -> (usize, PoolFlow) {
        for _ in 0..4 {
            if self.pool.is_empty() || !self.rng.chance(0.8) {
                break;
            }
            let i = self.rng.below(self.pool.len());
            let f = self.pool[i];
            if v6.is_none_or(|v| v == f.client.is_ipv6()) {
                return (i, f);
            }
        }
        let v6 = v6.unwrap_or_else(|| self.rng.chance(0.5));
        let miss = self.rng.chance(0.08);
        self.new_flow(v6, miss)
    }

    fn tcp_flags(&mut self, first: bool) -> u8 {
        if first && self.rng.chance(0.85) {
            return 0x02;
        }
        let r = self.rng.below(100);
        match r {
            0..40 => 0x10,
            40..65 => 0x18,
            65..70 => 0x02,
            70..77 => 0x11,
            77..82 => 0x04,
            82..85 => 0x14,
            85..88 => 0x12,
            88..95 => self.rng.u8(),
            _ => 0,
        }
    }

    fn payload_len(&mut self, size: Size, v6: bool, l4: usize) -> usize {
        let hdr = if v6 { 40 } else { 20 } + l4;
        match size {
            Size::Large => {
                // Around both MTUs' limits (1400 - 20/40 and 1500 - 20/40).
                let ip = if self.rng.chance(0.5) {
                    self.rng.range(1320, 1420)
                } else {
                    self.rng.range(1420, 1530)
                };
                ip.saturating_sub(hdr)
            }
            _ => match self.rng.below(10) {
                0..6 => self.rng.below(64),
                6..9 => self.rng.range(64, 700),
                _ => self.rng.range(700, 1300),
            },
        }
    }

    /// A TCP/UDP packet of a pool flow (client → service).
    fn vip_flow(&mut self, v6: Option<bool>, size: Size) -> Vec<u8> {
        let (i, f) = self.flow(v6);
        self.pool[i].sent += 1;
        let flags = self.tcp_flags(f.sent == 0);
        let seq = self.seq(i, flags);
        self.flow_packet(&f, (flags, seq), size, None)
    }

    /// The sequence number of pool flow `i`'s next packet: its initial one on a SYN (a SYN
    /// after the first packet is a retry, or 40% of the time a new connection on the same
    /// 4-tuple with a new initial number), past it otherwise.
    fn seq(&mut self, i: usize, flags: u8) -> u32 {
        let f = &self.pool[i];
        if flags & 0x12 == 0x02 {
            if f.sent > 1 && self.rng.chance(0.4) {
                self.pool[i].isn = self.rng.u32();
            }
            self.pool[i].isn
        } else {
            // The handshake's ACK (the initial number plus one) often: the SYN cache's shortcut.
            let n = if self.rng.chance(0.3) {
                0
            } else {
                self.rng.below(100_000) as u32
            };
            self.pool[i].isn.wrapping_add(1).wrapping_add(n)
        }
    }

    /// The frame of one packet of `f`; `frag`: IPv4 flags/offset word or IPv6 Fragment header.
    fn flow_packet(
        &mut self,
        f: &PoolFlow,
        flags: (u8, u32),
        size: Size,
        frag: Option<(u16, u32)>,
    ) -> Vec<u8> {
        let v6 = f.client.is_ipv6();
        let t = f.target;
        let opts = if t.proto == TCP && self.rng.chance(0.1) {
            4 * self.rng.range(1, 10)
        } else {
            0
        };
        let l4 = if t.proto == TCP { 20 + opts } else { 8 };
        let n = self.payload_len(size, v6, l4);
        let payload = self.rng.bytes(n);
        let seg = segment(
            f.client, t.addr, t.proto, f.sport, t.port, flags, opts, &payload,
        );
        let tos = if self.rng.chance(0.9) {
            f.tos
        } else {
            self.rng.u8()
        };
        self.ip_frame(f.client, t.addr, t.proto, tos, size, frag, &seg)
    }

    #[allow(clippy::too_many_arguments)]
    fn ip_frame(
        &mut self,
        src: IpAddr,
        dst: IpAddr,
        proto: u8,
        tos: u8,
        size: Size,
        frag: Option<(u16, u32)>,
        payload: &[u8],
    ) -> Vec<u8> {
        match (src, dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let options =
                    if size == Size::Options || (size == Size::Large && self.rng.chance(0.2)) {
                        let n = 4 * self.rng.range(1, 10);
                        if self.rng.chance(0.5) {
                            vec![1u8; n]
                        } else {
                            self.rng.bytes(n)
                        }
                    } else {
                        Vec::new()
                    };
                let o = Ip4 {
                    tos,
                    id: frag.map_or_else(|| self.rng.u16(), |(_, id)| id as u16),
                    frag: match frag {
                        Some((word, _)) => word,
                        None => {
                            if self.rng.chance(0.8) {
                                0x4000
                            } else {
                                0
                            }
                        }
                    },
                    ttl: self.rng.range(1, 255) as u8,
                    options,
                    ..Ip4::new(s, d, proto)
                };
                let p = o.build(payload);
                self.eth_in(pkt::ETH_IPV4, &p)
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                let h = Ip6 {
                    tc: tos,
                    label: self.rng.u32(),
                    hop: self.rng.range(1, 255) as u8,
                    ..Ip6::new(s, d, proto)
                };
                let p = match frag {
                    Some((word, id)) => {
                        let mut body = pkt::frag6(proto, word >> 3, word & 1 != 0, id).to_vec();
                        body.extend_from_slice(payload);
                        Ip6 {
                            next: IPV6_FRAG,
                            ..h
                        }
                        .build(&body)
                    }
                    None => h.build(payload),
                };
                self.eth_in(pkt::ETH_IPV6, &p)
            }
            _ => unreachable!(),
        }
    }

    /// A valid packet of a random kind (for truncation and mutation).
    fn any_valid(&mut self) -> Vec<u8> {
        match self.rng.below(10) {
            0..5 => self.vip_flow(None, Size::Normal),
            5..7 => self.icmp_error(true),
            7 => self.frag_first(),
            8 => self.frag_later(),
            _ => self.ipv6_ext(),
        }
    }

    fn near_miss(&mut self) -> Vec<u8> {
        let v6 = self.rng.chance(0.5);
        if self.rng.chance(0.3) {
            // Another protocol (GRE, ESP, SCTP, IP-in-IP, hop-by-hop on IPv4...) to a VIP address.
            let proto = *self.rng.pick(&[47u8, 50, 132, 4, 41, 0, 2, 89]);
            let dst = vip_addr(v6, self.rng.range(1, 3) as u8);
            let src = self.client(v6);
            let n = self.rng.range(8, 100);
            let payload = self.rng.bytes(n);
            return self.ip_frame(src, dst, proto, 0, Size::Normal, None, &payload);
        }
        let (_, mut f) = self.new_flow(v6, true);
        f.sent = 1;
        let flags = self.tcp_flags(false);
        self.flow_packet(&f, (flags, f.isn), Size::Normal, None)
    }

    fn bad_length(&mut self) -> Vec<u8> {
        let mut f = self.vip_flow(None, Size::Normal);
        let v6 = pkt::ethertype(&f) == pkt::ETH_IPV6;
        let l3 = 14;
        if v6 {
            let real = pkt::be16(&f, l3 + 4);
            let v = match self.rng.below(5) {
                0 => 0,
                1 => real.wrapping_add(1),
                2 => real.saturating_sub(self.rng.range(1, 30) as u16),
                3 => real.saturating_sub(self.rng.range(1, 8) as u16),
                _ => self.rng.u16(),
            };
            f[l3 + 4..l3 + 6].copy_from_slice(&v.to_be_bytes());
        } else {
            let real = pkt::be16(&f, l3 + 2);
            if self.rng.chance(0.3) {
                f[l3] = 0x40 | self.rng.below(16) as u8;
            } else {
                let v = match self.rng.below(6) {
                    0 => self.rng.below(20) as u16,
                    1 => real.wrapping_add(1),
                    2 => real.saturating_sub(self.rng.range(1, 30) as u16),
                    3 => 20 + self.rng.below(8) as u16,
                    4 => real.saturating_sub(self.rng.range(1, 8) as u16),
                    _ => self.rng.u16(),
                };
                f[l3 + 2..l3 + 4].copy_from_slice(&v.to_be_bytes());
            }
            // Recompute the header checksum half the time (the program does not check it).
            if self.rng.chance(0.5) {
                pkt::set_ip4_checksum(&mut f[l3..]);
            }
        }
        f
    }

    fn bad_checksum(&mut self) -> Vec<u8> {
        let mut f = self.vip_flow(None, Size::Normal);
        let v6 = pkt::ethertype(&f) == pkt::ETH_IPV6;
        if !v6 && self.rng.chance(0.5) {
            f[14 + 10] ^= 1 + self.rng.below(255) as u8;
        } else {
            let l4 = if v6 {
                54
            } else {
                14 + (f[14] & 0x0f) as usize * 4
            };
            let proto = if v6 { f[20] } else { f[23] };
            let at = l4 + if proto == TCP { 16 } else { 6 };
            if at < f.len() {
                f[at] ^= 1 + self.rng.below(255) as u8;
            }
        }
        f
    }

    fn ipv6_ext(&mut self) -> Vec<u8> {
        let (i, f) = self.flow(Some(true));
        self.pool[i].sent += 1;
        let (IpAddr::V6(s), IpAddr::V6(d)) = (f.client, f.target.addr) else {
            unreachable!()
        };
        let flags = self.tcp_flags(f.sent == 0);
        let seq = self.seq(i, flags);
        let n = self.rng.below(40);
        let payload = self.rng.bytes(n);
        let seg = segment(
            f.client,
            f.target.addr,
            f.target.proto,
            f.sport,
            f.target.port,
            (flags, seq),
            0,
            &payload,
        );
        let kind = self.rng.below(5);
        let (first, body) = match kind {
            // Hop-by-hop, routing, destination options, then the segment.
            0..3 => {
                let nh = [0u8, 43, 60][kind];
                let mut b = vec![f.target.proto, 0];
                b.extend(self.rng.bytes(6));
                b.extend(&seg);
                (nh, b)
            }
            // A Fragment header followed by a hop-by-hop header.
            3 => {
                let mut b = pkt::frag6(0, 0, self.rng.chance(0.5), self.rng.u32()).to_vec();
                b.extend([f.target.proto, 0, 0, 0, 0, 0, 0, 0]);
                b.extend(&seg);
                (IPV6_FRAG, b)
            }
            // No next header.
            _ => (59, seg),
        };
        let p = Ip6 {
            tc: f.tos,
            ..Ip6::new(s, d, first)
        }
        .build(&body);
        self.eth_in(pkt::ETH_IPV6, &p)
    }

    fn frag_first(&mut self) -> Vec<u8> {
        let (i, f) = self.flow(None);
        self.pool[i].sent += 1;
        let v6 = f.client.is_ipv6();
        let id = if v6 {
            self.rng.u32()
        } else {
            self.rng.u16() as u32
        };
        self.frags.push(FragRecord {
            client: f.client,
            vip: f.target.addr,
            proto: f.target.proto,
            id,
        });
        if self.frags.len() > 256 {
            self.frags.remove(0);
        }
        let more = !(v6 && self.rng.chance(0.1)); // IPv6 atomic fragment: offset 0, M=0.
        let word = if v6 { more as u16 } else { 0x2000 };
        let flags = self.tcp_flags(f.sent == 0);
        let seq = self.seq(i, flags);
        let size = if self.rng.chance(0.15) {
            Size::Large
        } else {
            Size::Normal
        };
        let mut frame = self.flow_packet(&f, (flags, seq), size, Some((word, id)));
        if self.rng.chance(0.05) {
            // The layer-4 header does not fit in the first fragment.
            let l3 = 14;
            let keep = if v6 { 48 } else { 20 } + self.rng.below(8);
            frame.truncate(l3 + keep);
            if v6 {
                frame[l3 + 4..l3 + 6].copy_from_slice(&((keep - 40) as u16).to_be_bytes());
            } else {
                frame[l3 + 2..l3 + 4].copy_from_slice(&(keep as u16).to_be_bytes());
            }
        }
        frame
    }

    fn frag_later(&mut self) -> Vec<u8> {
        let known = !self.frags.is_empty() && self.rng.chance(0.7);
        let r = if known {
            let i = self.rng.below(self.frags.len());
            self.frags[i]
        } else {
            let v6 = self.rng.chance(0.5);
            let i = self.rng.below(self.vips[v6 as usize].len());
            let t = self.vips[v6 as usize][i];
            FragRecord {
                client: self.client(v6),
                vip: t.addr,
                proto: *self.rng.pick(&[TCP, UDP, 1, 58, 47]),
                id: self.rng.u32() & if v6 { u32::MAX } else { 0xffff },
            }
        };
        let offset = self.rng.range(1, 0x1fff) as u16;
        let more = self.rng.chance(0.5);
        let n = if self.rng.chance(0.15) {
            self.rng.range(1320, 1480)
        } else {
            self.rng.range(0, 200)
        };
        let payload = self.rng.bytes(n);
        let word = if r.client.is_ipv6() {
            (offset << 3) | more as u16
        } else {
            ((more as u16) << 13) | offset
        };
        self.ip_frame(
            r.client,
            r.vip,
            r.proto,
            0,
            Size::Normal,
            Some((word, r.id)),
            &payload,
        )
    }

    /// ICMP errors about a packet that went service → client (`ours`: frag-needed / packet
    /// too big; otherwise other ICMP types and codes).
    fn icmp_error(&mut self, ours: bool) -> Vec<u8> {
        let v6 = self.rng.chance(0.5);
        let f = if !self.pool.is_empty() && self.rng.chance(0.7) {
            let (_, f) = self.flow(Some(v6));
            f
        } else {
            let i = self.rng.below(self.vips[v6 as usize].len());
            PoolFlow {
                client: self.client(v6),
                target: self.vips[v6 as usize][i],
                sport: self.rng.u16(),
                sent: 0,
                tos: 0,
                isn: 0,
            }
        };
        // The quoted packet: service → client.
        let qproto = if self.rng.chance(0.07) {
            *self.rng.pick(&[1u8, 58, 47, 44])
        } else {
            f.target.proto
        };
        let n = if self.rng.chance(0.05) {
            self.rng.range(1300, 1500)
        } else {
            self.rng.below(80)
        };
        let payload = self.rng.bytes(n);
        let seg = segment(
            f.target.addr,
            f.client,
            if qproto == TCP { TCP } else { UDP },
            f.target.port,
            f.sport,
            (0x12, 0x7a6b_5c4d),
            0,
            &payload,
        );
        let quoted = match (f.target.addr, f.client) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let options = if self.rng.chance(0.1) {
                    vec![1u8; 4 * self.rng.range(1, 4)]
                } else {
                    Vec::new()
                };
                Ip4 {
                    id: self.rng.u16(),
                    frag: pkt::IP4_DF,
                    options,
                    ..Ip4::new(s, d, qproto)
                }
                .build(&seg)
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => Ip6::new(s, d, qproto).build(&seg),
            _ => unreachable!(),
        };
        let ihl = if v6 { 40 } else { pkt::ip4_ihl(&quoted) };
        let qlen = match self.rng.below(10) {
            0..4 => ihl + 8,
            4..8 => quoted.len(),
            _ => self.rng.below(quoted.len() + 1),
        }
        .min(quoted.len());
        let body = &quoted[..qlen];
        let router = self.client(v6);
        let dst = if self.rng.chance(0.9) {
            f.target.addr
        } else if v6 {
            IpAddr::V6(LB_V6)
        } else {
            IpAddr::V4(LB_V4)
        };
        let (typ, code) = if ours {
            if v6 {
                (2, self.rng.below(2) as u8)
            } else {
                (3, 4)
            }
        } else if v6 {
            *self.rng.pick(&[
                (1u8, 4u8),
                (3, 0),
                (4, 0),
                (128, 0),
                (129, 0),
                (135, 0),
                (2, 0),
            ])
        } else {
            *self
                .rng
                .pick(&[(3u8, 3u8), (3, 1), (11, 0), (8, 0), (0, 0), (12, 0), (3, 4)])
        };
        let mtu = self.rng.range(1200, 1500) as u32;
        match (router, dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let m = (mtu as u16).to_be_bytes();
                let msg = pkt::icmp4(typ, code, [0, 0, m[0], m[1]], body);
                // Now and then the error itself is a first fragment, or carries options.
                let frag = if self.rng.chance(0.05) { 0x2000 } else { 0 };
                let options = if self.rng.chance(0.05) {
                    vec![1u8; 4 * self.rng.range(1, 10)]
                } else {
                    Vec::new()
                };
                let p = Ip4 {
                    tos: 0xc0,
                    id: self.rng.u16(),
                    frag,
                    ttl: 250,
                    options,
                    ..Ip4::new(s, d, ICMP)
                }
                .build(&msg);
                self.eth_in(pkt::ETH_IPV4, &p)
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                let msg = pkt::icmp6(s, d, typ, code, mtu.to_be_bytes(), body);
                // Now and then behind a Fragment header (first or atomic fragment).
                let p = if self.rng.chance(0.05) {
                    let mut b =
                        pkt::frag6(ICMPV6, 0, self.rng.chance(0.5), self.rng.u32()).to_vec();
                    b.extend(&msg);
                    Ip6 {
                        hop: 250,
                        ..Ip6::new(s, d, IPV6_FRAG)
                    }
                    .build(&b)
                } else {
                    Ip6 {
                        hop: 250,
                        ..Ip6::new(s, d, ICMPV6)
                    }
                    .build(&msg)
                };
                self.eth_in(pkt::ETH_IPV6, &p)
            }
            _ => unreachable!(),
        }
    }

    fn random(&mut self) -> Vec<u8> {
        let n = self.rng.range(0, 200);
        let mut body = self.rng.bytes(n);
        let et = match self.rng.below(10) {
            0..4 => self.rng.u16(),
            4..7 => {
                if let Some(b) = body.first_mut() {
                    *b = 0x40 | (*b & 0x0f);
                }
                if body.len() >= 4 && self.rng.chance(0.5) {
                    let l = self.rng.range(0, body.len()) as u16;
                    body[2..4].copy_from_slice(&l.to_be_bytes());
                }
                pkt::ETH_IPV4
            }
            _ => {
                if let Some(b) = body.first_mut() {
                    *b = 0x60 | (*b & 0x0f);
                }
                if body.len() >= 6 && self.rng.chance(0.5) {
                    let l = self.rng.range(0, body.len().saturating_sub(40)) as u16;
                    body[4..6].copy_from_slice(&l.to_be_bytes());
                }
                pkt::ETH_IPV6
            }
        };
        self.eth_in(et, &body)
    }

    fn non_ip(&mut self) -> Vec<u8> {
        match self.rng.below(6) {
            0 => {
                let body = self.rng.bytes(28);
                self.eth_in(pkt::ETH_ARP, &body)
            }
            1 => {
                let body = self.rng.bytes(40);
                self.eth_in(0x88cc, &body)
            }
            2 => {
                // 802.1ad outer tag: not 802.1Q, so not IP for the balancer.
                let mut f = self.vip_flow(None, Size::Normal);
                let tci = self.rng.u16();
                pkt::add_vlan(&mut f, tci);
                f[12..14].copy_from_slice(&pkt::ETH_8021AD.to_be_bytes());
                f
            }
            3 => {
                // Two 802.1Q tags: the inner tag's type is not IP.
                let mut f = self.vip_flow(None, Size::Normal);
                let (a, b) = (self.rng.u16(), self.rng.u16());
                pkt::add_vlan(&mut f, a);
                pkt::add_vlan(&mut f, b);
                f
            }
            4 => {
                // IPv6 in an IPv4 frame (version mismatch) and vice versa.
                let mut f = self.vip_flow(None, Size::Normal);
                let et = if pkt::ethertype(&f) == pkt::ETH_IPV6 {
                    pkt::ETH_IPV4
                } else {
                    pkt::ETH_IPV6
                };
                f[12..14].copy_from_slice(&et.to_be_bytes());
                f
            }
            _ => {
                // A tagged frame cut inside the tag.
                let mut f = self.eth_in(pkt::ETH_8021Q, &[]);
                let n = self.rng.below(4);
                f.extend(self.rng.bytes(n));
                f
            }
        }
    }

    fn padded(&mut self) -> Vec<u8> {
        let mut f = self.vip_flow(None, Size::Normal);
        let v6 = pkt::ethertype(&f) == pkt::ETH_IPV6;
        if self.rng.chance(0.5) {
            // Ethernet padding after the IP packet.
            let n = self.rng.range(1, 46);
            f.extend(self.rng.bytes(n));
        } else {
            // The IP length ends inside the layer-4 header; the rest of the frame is "padding".
            let l3 = 14;
            let hdr = if v6 { 40 } else { (f[l3] & 0x0f) as usize * 4 };
            let cut = self.rng.below(20);
            if v6 {
                f[l3 + 4..l3 + 6].copy_from_slice(&(cut as u16).to_be_bytes());
            } else {
                f[l3 + 2..l3 + 4].copy_from_slice(&((hdr + cut) as u16).to_be_bytes());
            }
        }
        f
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Size {
    Normal,
    Large,
    Options,
}

// ---------------------------------------------------------------------------------------------
// The run.

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn hexdiff(exp: &[u8], act: &[u8]) -> String {
    let mut s = String::new();
    if exp.len() != act.len() {
        writeln!(
            s,
            "      length: expected {}, actual {}",
            exp.len(),
            act.len()
        )
        .unwrap();
    }
    let n = exp.len().max(act.len());
    let mut shown = 0;
    for line in (0..n).step_by(16) {
        let e = &exp[line.min(exp.len())..(line + 16).min(exp.len())];
        let a = &act[line.min(act.len())..(line + 16).min(act.len())];
        if e != a {
            writeln!(
                s,
                "      {line:04x}  expected {}\n            actual   {}",
                hex(e),
                hex(a)
            )
            .unwrap();
            shown += 1;
            if shown == 6 {
                writeln!(s, "      ...").unwrap();
                break;
            }
        }
    }
    s
}

fn describe(o: &model::Outcome) -> String {
    let counters: Vec<&str> = o.counters.iter().map(|c| c.name()).collect();
    format!(
        "{} via {:?} (backend {:?}, counters {:?})",
        o.verdict.name(),
        o.path,
        o.backend,
        counters
    )
}

/// Model state of the backends and VIPs after a configuration was applied.
/// A backend keeps its id, and with it its DOWN mark (`apply` keeps the health checker's
/// flag), for as long as it stays configured; a retired id gets an all-zero entry.
fn sync_model(m: &mut State, lb: &Balancer) {
    let mut vips = HashMap::new();
    let was_down: BTreeSet<u32> = m
        .backends
        .iter()
        .filter(|(_, b)| b.active && b.down)
        .map(|(id, _)| *id)
        .collect();
    for b in m.backends.values_mut() {
        b.active = false;
        b.down = false;
    }
    for v in lb.vips() {
        let mode = match v.config.forwarding {
            Forwarding::Ipip => Mode::Ipip,
            Forwarding::L2 => Mode::L2,
        };
        vips.insert(
            (v.config.address, v.config.port, v.config.protocol.number()),
            model::Vip {
                vip_id: v.vip_id,
                mode,
                table: v.table.clone(),
            },
        );
        for b in &v.backends {
            m.backends.insert(
                b.id,
                model::Backend {
                    addr: b.address,
                    mode,
                    vip_id: v.vip_id,
                    active: true,
                    down: was_down.contains(&b.id),
                },
            );
        }
    }
    m.set_vips(vips);
}

/// The model's backend flags against the kernel's `BACKENDS` entries.
fn check_backend_flags(k: &Kernel, m: &State) -> Result<Vec<String>> {
    let mut problems = Vec::new();
    let mut ids: Vec<u32> = m.backends.keys().copied().collect();
    ids.sort();
    for id in ids {
        let b = &m.backends[&id];
        let e = k.backends.get(&id, 0)?;
        let active = e.flags & lb_common::BACKEND_F_ACTIVE != 0;
        let down = e.flags & BACKEND_F_DOWN != 0;
        if (active, down) != (b.active, b.active && b.down) {
            problems.push(format!(
                "backend {id} ({}): model active {} down {}, kernel BACKENDS entry {e:?}",
                b.addr, b.active, b.down
            ));
        }
    }
    Ok(problems)
}

struct Expect {
    counters: Vec<u64>,
    backends: BTreeMap<u32, BackendStats>,
    vips: BTreeMap<u32, VipStats>,
}

fn add_backend(a: &mut BackendStats, d: &BackendStats) {
    a.add(d);
}

/// Runs the differential fuzzer. Needs root (namespace, BPF).
pub fn run(opts: &FuzzOptions) -> Result<FuzzReport> {
    crate::cleanup_stale_namespaces().ok();
    let ns = NetNs::new("fuzz")?;
    let ifindex = setup_namespace(&ns)?;
    let opts = opts.clone();
    ns.run_in(move || run_inside(&opts, ifindex))
}

fn run_inside(opts: &FuzzOptions, ifindex: [u32; 2]) -> Result<FuzzReport> {
    let mut lb = Balancer::load(LoadOptions {
        pin_dir: None,
        table_pool: 1 << 20,
        conntrack_size: 65_536,
        conntrack_new_size: 65_536,
    })?;
    let mut variant = 0u64;
    lb.apply(&config(variant)?)?;
    let mut k = Kernel::new(lb, ifindex[0])?;
    let mut ctl = Rng::new(opts.seed ^ 0x00c0_ffee);

    let mut m = State::new();
    m.ingress_ifindex = ifindex[0];
    m.encap_v4 = Some(LB_V4);
    m.encap_v6 = Some(LB_V6);
    m.nexthops = nexthops(ifindex);
    sync_model(&mut m, &k.lb);
    set_syn_recording(&mut k, &mut m, &mut ctl)?;

    let mut report = FuzzReport {
        seed: opts.seed,
        ..Default::default()
    };
    let mut gen = Generator::new(opts.seed);
    // Control decisions (down marks, SYN recording) draw from their own stream (`ctl`), so
    // the packet sequence depends on the seed alone.
    let mut baseline = k.counters()?;
    let mut exp = Expect {
        counters: vec![0; Counter::COUNT as usize],
        backends: BTreeMap::new(),
        vips: BTreeMap::new(),
    };
    // Packets since the last counter comparison, for the report if it fails.
    let mut window: Vec<(u64, &'static str, Vec<u8>, Vec<Counter>)> = Vec::new();
    let mut tracked_keys: Vec<Flow> = Vec::new();
    // The model has no clock: flushing the tables this often keeps every entry younger than
    // `CT_CLOSED_TICKS`, after which the datapath treats a closing entry as gone.
    let mut flushed = Instant::now();
    let mut down: BTreeSet<u32> = BTreeSet::new();

    let start = Instant::now();
    let mut last_progress = Instant::now();
    let mut n: u64 = 0;
    let mut fine_until = 0u64;
    loop {
        if opts.packets.is_some_and(|p| n >= p)
            || opts.duration.is_some_and(|d| start.elapsed() >= d)
            || report.mismatches.len() >= opts.max_mismatches
        {
            break;
        }
        n += 1;
        let (class, frame) = gen.next();
        *report.mix.entry(class).or_default() += 1;
        if frame.len() >= 18 && pkt::ethertype(&frame) == pkt::ETH_8021Q {
            *report.mix.entry("(802.1Q tagged)").or_default() += 1;
        }
        let o = m.run(&frame);
        let actual = k
            .run(&frame)
            .map_err(|e| anyhow!("packet {n} ({class}) {}: {e}", hex(&frame)))?;
        let (verdict, out) = (actual.0, actual.1.to_vec());
        *report.verdicts.entry(verdict.name()).or_default() += 1;
        *report
            .paths
            .entry(if o.path.is_empty() { "(none)" } else { o.path })
            .or_default() += 1;

        let mut problems = Vec::new();
        if verdict == Verdict::Aborted {
            problems.push("XDP_ABORTED".to_string());
        }
        if verdict == Verdict::Pass && out != frame {
            problems.push("XDP_PASS with a modified packet".to_string());
        }
        if verdict != o.verdict {
            problems.push(format!(
                "verdict: expected {}, actual {}",
                o.verdict.name(),
                verdict.name()
            ));
        }
        if verdict != Verdict::Refused && out != o.output {
            problems.push(format!(
                "output bytes differ:\n{}",
                hexdiff(&o.output, &out)
            ));
        }
        // The model's changes are applied even on a mismatch; the resync below clears both.
        m.apply(&o);
        for c in &o.counters {
            exp.counters[*c as usize] += 1;
            *report.counters.entry(c.name()).or_default() += 1;
        }
        for (id, d) in &o.backend_stats {
            add_backend(exp.backends.entry(*id).or_default(), d);
        }
        for (id, d) in &o.vip_stats {
            exp.vips.entry(*id).or_default().add(d);
        }
        for c in &o.changes {
            if let model::Change::CtNew(f, _) = c {
                tracked_keys.push(*f);
            }
        }
        window.push((n, class, frame.clone(), o.counters.clone()));

        if !problems.is_empty() {
            // What else the kernel says: the counters over the window (a single packet while
            // comparing after every packet) and the next hop it holds for the expected backend.
            if let Some(c) = check_counters(&k, &mut baseline, &mut exp, &window)? {
                problems.push(c);
            }
            if let Some(id) = o.backend {
                let nh = k.nexthops.get(&id, 0)?;
                let b = k.backends.get(&id, 0)?;
                problems.push(format!(
                    "kernel BACKENDS[{id}] = {b:?}, NEXTHOPS[{id}] = {nh:?}"
                ));
            }
            fine_until = n + 4096;
            let msg = format!(
                "packet {n} ({class}), {} bytes: {}\n    expected: {}\n    actual:   {}\n    {}\n    expected output: {}\n    actual output:   {}",
                frame.len(),
                hex(&frame),
                describe(&o),
                verdict.name(),
                problems.join("\n    "),
                hex(&o.output),
                hex(&out),
            );
            eprintln!("MISMATCH {msg}");
            report.mismatches.push(msg);
            resync(
                &mut k,
                &mut m,
                &mut tracked_keys,
                &mut baseline,
                &mut exp,
                &mut window,
            )?;
            continue;
        }

        // Every packet at first and after a counter difference (to pin the next one to its
        // packet), then every `counter_every` packets.
        let every = if n <= 4096 || n < fine_until {
            1
        } else {
            opts.counter_every
        };
        if n.is_multiple_of(every) {
            report.counter_checks += 1;
            if let Some(msg) = check_counters(&k, &mut baseline, &mut exp, &window)? {
                eprintln!("MISMATCH {msg}");
                report.mismatches.push(msg);
                fine_until = n + 4096;
                resync(
                    &mut k,
                    &mut m,
                    &mut tracked_keys,
                    &mut baseline,
                    &mut exp,
                    &mut window,
                )?;
                continue;
            }
            window.clear();
        }
        if n.is_multiple_of(opts.check_every) {
            let mut problems = check_stats(&k, &m, &exp)?;
            // The tracked-flow filter must hold every flow `CT` holds (the kernel marks its
            // inserts; a flow missing would send a SYN on its tuple past its entry), then it
            // is rebuilt from `CT` as lbd's scans do, so that SYNs also take the unprobed path.
            let reader = k.lb.conntrack_reader();
            for f in m.ct.keys() {
                if !reader.filter().may_be_tracked(&f.key()) {
                    problems.push(format!("{f} is in CT but not in the tracked-flow filter"));
                }
            }
            if reader.rebuild_filter()?.is_some() {
                report.filter_rebuilds += 1;
            }
            for _ in 0..8 {
                if tracked_keys.is_empty() {
                    break;
                }
                let f = tracked_keys[ctl.below(tracked_keys.len())];
                report.tracked_checked += 1;
                let want = m.tracked(&f);
                let got = k.lb.tracked_backend(&f.key());
                if want != got {
                    problems.push(format!(
                        "tracked backend of {f}: model {want:?}, kernel {got:?}"
                    ));
                }
            }
            if !problems.is_empty() {
                let msg = format!("after packet {n}: {}", problems.join("\n    "));
                eprintln!("MISMATCH {msg}");
                report.mismatches.push(msg);
                resync(
                    &mut k,
                    &mut m,
                    &mut tracked_keys,
                    &mut baseline,
                    &mut exp,
                    &mut window,
                )?;
                continue;
            }
        }
        if m.ct.len() > 16_384
            || m.ct_new.len() > 16_384
            || m.frags.len() > 2048
            || flushed.elapsed() > MODEL_ENTRY_AGE
        {
            flushed = Instant::now();
            report.flushes += 1;
            let (compared, problems) = compare_and_flush(&mut k, &mut m)?;
            report.entries_compared += compared;
            tracked_keys.clear();
            if !problems.is_empty() {
                let msg = format!(
                    "table contents after packet {n}:\n    {}",
                    problems.join("\n    ")
                );
                eprintln!("MISMATCH {msg}");
                report.mismatches.push(msg);
            }
        }
        if n.is_multiple_of(opts.reconfig_every) {
            // Counters and statistics must agree before the agent zeroes retired backends'.
            let mut problems = check_stats(&k, &m, &exp)?;
            problems.extend(check_counters(&k, &mut baseline, &mut exp, &window)?);
            window.clear();
            if !problems.is_empty() {
                let msg = format!(
                    "before reconfiguration {}: {}",
                    variant + 1,
                    problems.join("\n    ")
                );
                eprintln!("MISMATCH {msg}");
                report.mismatches.push(msg);
                resync(
                    &mut k,
                    &mut m,
                    &mut tracked_keys,
                    &mut baseline,
                    &mut exp,
                    &mut window,
                )?;
            }
            variant += 1;
            report.reconfigs += 1;
            k.lb.apply(&config(variant)?)?;
            sync_model(&mut m, &k.lb);
            set_syn_recording(&mut k, &mut m, &mut ctl)?;
            down.retain(|id| m.backends[id].active);
            // Retired backends' statistics are zeroed by the agent.
            for (id, b) in &m.backends {
                if !b.active {
                    exp.backends.remove(id);
                }
            }
            // So are removed VIPs'.
            let vip_ids: BTreeSet<u32> = m.vips().values().map(|v| v.vip_id).collect();
            exp.vips.retain(|id, _| vip_ids.contains(id));
        }
        if n.is_multiple_of(opts.down_every) {
            for id in std::mem::take(&mut down) {
                set_down(&mut k, &mut m, id, false)?;
            }
            // Recording switched between reconfigurations too: SYNs sent on before it and
            // retried after (the SYN cache's retries while recording).
            set_syn_recording(&mut k, &mut m, &mut ctl)?;
            let mut live: Vec<u32> = m
                .backends
                .iter()
                .filter(|(_, b)| b.active)
                .map(|(id, _)| *id)
                .collect();
            live.sort();
            for _ in 0..ctl.range(1, 3) {
                let id = *ctl.pick(&live);
                set_down(&mut k, &mut m, id, true)?;
                down.insert(id);
                report.downs += 1;
            }
        }
        if n.is_multiple_of(opts.down_every) || n.is_multiple_of(opts.reconfig_every) {
            let problems = check_backend_flags(&k, &m)?;
            if !problems.is_empty() {
                let msg = format!(
                    "backend entries after packet {n} (reconfiguration or down marks):\n    {}",
                    problems.join("\n    ")
                );
                eprintln!("MISMATCH {msg}");
                report.mismatches.push(msg);
                // Take the kernel's flags, so that the run goes on meaningfully.
                for (id, b) in m.backends.iter_mut() {
                    let e = k.backends.get(id, 0)?;
                    b.active = e.flags & lb_common::BACKEND_F_ACTIVE != 0;
                    b.down = e.flags & BACKEND_F_DOWN != 0;
                }
            }
        }
        if let Some(every) = opts.progress {
            if last_progress.elapsed() >= every {
                last_progress = Instant::now();
                eprintln!(
                    "fuzz: {n} packets, {:.0} packets/s, {} mismatches, CT {} CT_NEW {} FRAGS {}",
                    n as f64 / start.elapsed().as_secs_f64(),
                    report.mismatches.len(),
                    m.ct.len(),
                    m.ct_new.len(),
                    m.frags.len()
                );
            }
        }
    }
    // Final checks: counters, statistics, and every table entry.
    if report.mismatches.len() < opts.max_mismatches {
        if let Some(msg) = check_counters(&k, &mut baseline, &mut exp, &window)? {
            report.mismatches.push(msg);
        }
        let problems = check_stats(&k, &m, &exp)?;
        if !problems.is_empty() {
            report
                .mismatches
                .push(format!("final statistics: {}", problems.join("\n    ")));
        }
        let (compared, problems) = compare_and_flush(&mut k, &mut m)?;
        report.entries_compared += compared;
        report.flushes += 1;
        if !problems.is_empty() {
            report.mismatches.push(format!(
                "final table contents:\n    {}",
                problems.join("\n    ")
            ));
        }
    }
    report.packets = n;
    report.elapsed = start.elapsed();
    Ok(report)
}

/// Marks backend `id` down or up again, as the health checker does
/// (`Balancer::set_backend_down`).
fn set_down(k: &mut Kernel, m: &mut State, id: u32, down: bool) -> Result<()> {
    let (vip, addr) =
        k.lb.vips()
            .find_map(|v| {
                v.backends.iter().find(|b| b.id == id).map(|b| {
                    (
                        (v.config.address, v.config.port, v.config.protocol),
                        b.address,
                    )
                })
            })
            .ok_or_else(|| anyhow!("backend id {id} is not configured"))?;
    k.lb.set_backend_down(vip, addr, down)?;
    if let Some(mb) = m.backends.get_mut(&id) {
        mb.down = down;
    }
    Ok(())
}

/// Compares the counters' movement since the last comparison with the model's prediction for
/// the packets of `window`; on agreement, starts the next window.
fn check_counters(
    k: &Kernel,
    baseline: &mut Vec<u64>,
    exp: &mut Expect,
    window: &[(u64, &'static str, Vec<u8>, Vec<Counter>)],
) -> Result<Option<String>> {
    let now = k.counters()?;
    let mut diffs = Vec::new();
    for (i, c) in Counter::ALL.iter().enumerate() {
        let got = now[i].wrapping_sub(baseline[i]);
        if got != exp.counters[i] {
            diffs.push(format!(
                "{} +{} expected, +{} actual",
                c.name(),
                exp.counters[i],
                got
            ));
        }
    }
    if diffs.is_empty() {
        *baseline = now;
        exp.counters.iter_mut().for_each(|c| *c = 0);
        return Ok(None);
    }
    let mut s = format!(
        "counters differ ({}) over these {} packets:",
        diffs.join(", "),
        window.len()
    );
    for (n, class, f, cs) in window {
        let names: Vec<&str> = cs.iter().map(|c| c.name()).collect();
        write!(
            s,
            "\n    packet {n} ({class}) expected {names:?}: {}",
            hex(f)
        )
        .unwrap();
    }
    Ok(Some(s))
}

fn check_stats(k: &Kernel, m: &State, exp: &Expect) -> Result<Vec<String>> {
    let mut problems = Vec::new();
    let mut ids: BTreeSet<u32> = exp.backends.keys().copied().collect();
    ids.extend(m.backends.keys());
    for id in ids {
        let got = k.lb.backend_stats(id)?;
        let want = exp.backends.get(&id).copied().unwrap_or_default();
        if got != want {
            problems.push(format!(
                "backend {id} statistics: expected {want:?}, actual {got:?}"
            ));
        }
    }
    let mut vids: BTreeSet<u32> = exp.vips.keys().copied().collect();
    vids.extend(m.vips().values().map(|v| v.vip_id));
    for id in vids {
        let got = k.lb.vip_stats(id)?;
        let want = exp.vips.get(&id).copied().unwrap_or_default();
        if got != want {
            problems.push(format!(
                "VIP {id} statistics: expected {want:?}, actual {got:?}"
            ));
        }
    }
    Ok(problems)
}

/// After a mismatch: empty the tables on both sides and take the kernel's counters and
/// statistics as they are, so that one difference is reported once.
fn resync(
    k: &mut Kernel,
    m: &mut State,
    tracked: &mut Vec<Flow>,
    baseline: &mut Vec<u64>,
    exp: &mut Expect,
    window: &mut Vec<(u64, &'static str, Vec<u8>, Vec<Counter>)>,
) -> Result<()> {
    compare_and_flush(k, m)?;
    tracked.clear();
    window.clear();
    *baseline = k.counters()?;
    exp.counters.iter_mut().for_each(|c| *c = 0);
    exp.backends.clear();
    exp.vips.clear();
    let mut ids: BTreeSet<u32> = m.backends.keys().copied().collect();
    ids.extend(k.lb.vips().flat_map(|v| v.backends.iter().map(|b| b.id)));
    for id in ids {
        exp.backends.insert(id, k.lb.backend_stats(id)?);
    }
    for v in k.lb.vips() {
        exp.vips.insert(v.vip_id, k.lb.vip_stats(v.vip_id)?);
    }
    Ok(())
}

/// Reports (at most 10 of) the differences between a table's kernel and model contents;
/// returns how many entries were compared (the larger side).
fn diff_tables<K: Ord + Copy + std::fmt::Debug>(
    name: &str,
    kernel: &BTreeMap<K, Track>,
    model: &BTreeMap<K, Track>,
    problems: &mut Vec<String>,
) -> u64 {
    let compared = kernel.len().max(model.len()) as u64;
    let mut n = 0;
    for (key, v) in model {
        match kernel.get(key) {
            None => {
                problems.push(format!(
                    "{name}: {key:?} -> {v:?} in the model, missing in the kernel"
                ));
                n += 1;
            }
            Some(kv) if kv != v => {
                problems.push(format!("{name}: {key:?}: model {v:?}, kernel {kv:?}"));
                n += 1;
            }
            _ => {}
        }
        if n >= 10 {
            return compared;
        }
    }
    for (key, v) in kernel {
        if !model.contains_key(key) {
            problems.push(format!(
                "{name}: {key:?} -> {v:?} in the kernel, not in the model"
            ));
            n += 1;
            if n >= 10 {
                return compared;
            }
        }
    }
    compared
}

/// SYN recording on or off, at random, after each reconfiguration and down-mark round (lbd
/// arms it for 10 s when it changes a table; the fuzzer sets either state explicitly
/// instead, so that no packet races the deadline).
fn set_syn_recording(k: &mut Kernel, m: &mut State, ctl: &mut Rng) -> Result<()> {
    m.syn_record = ctl.chance(0.5);
    k.lb.set_syn_recording(if m.syn_record { 1 << 28 } else { 0 })
}

/// How long the model's table entries may live: half the quiet time after which the datapath
/// takes a closing entry for a connection that is over (`lb_common::CT_CLOSED_TICKS`, 10 s).
const MODEL_ENTRY_AGE: Duration = Duration::from_secs(5);

/// Compares `CT`, `CT_NEW` and `FRAGS` entry by entry with the model, then empties both.
fn compare_and_flush(k: &mut Kernel, m: &mut State) -> Result<(u64, Vec<String>)> {
    // The documented value layout: `syn_seq` as read from the packet (network order), `flags`
    // with `CT_F_RESTEERED` and `CT_F_CLOSING` as the only bits. The closing flag and the
    // times are not modelled (the fixtures and e2e_conns check them).
    fn track(what: &str, v: CtValue, problems: &mut Vec<String>) -> Track {
        if v.flags & !(CT_F_RESTEERED | CT_F_CLOSING) != 0 {
            problems.push(format!("{what}: value {v:?} has unknown flags"));
        }
        Track {
            backend: v.backend,
            hash: v.hash,
            syn_seq: u32::from_be(v.syn_seq),
            resteered: v.flags & CT_F_RESTEERED != 0,
        }
    }
    /// Empties a connection table into `into` (by `id` of each key), returning its keys.
    fn drain<K: aya::Pod, I: Ord>(
        map: &mut BpfHashMap<MapData, K, CtValue>,
        name: &str,
        id: impl Fn(&K) -> I,
        into: &mut BTreeMap<I, Track>,
        problems: &mut Vec<String>,
    ) -> Result<Vec<K>> {
        let entries: Vec<(K, CtValue)> = map.iter().collect::<Result<_, _>>()?;
        for (key, v) in &entries {
            into.insert(id(key), track(name, *v, problems));
            map.remove(key)?;
        }
        Ok(entries.into_iter().map(|(key, _)| key).collect())
    }
    let mut problems = Vec::new();
    let mut compared = 0u64;
    // The model has one table of established flows: the kernel's are CT4 (IPv4) and CT (IPv6).
    let mut kernel = BTreeMap::new();
    drain(
        &mut k.ct4,
        "CT4",
        |key| Flow::from_key(&key.flow_key()),
        &mut kernel,
        &mut problems,
    )?;
    for key in drain(&mut k.ct, "CT", Flow::from_key, &mut kernel, &mut problems)? {
        if key.v4().is_some() {
            problems.push(format!(
                "CT holds IPv4 flow {key:?}: IPv4 flows belong in CT4"
            ));
        }
    }
    let model: BTreeMap<Flow, Track> = m.ct.drain().collect();
    compared += diff_tables("CT4/CT", &kernel, &model, &mut problems);
    let mut kernel = BTreeMap::new();
    drain(
        &mut k.ct_new,
        "CT_NEW",
        Flow::from_key,
        &mut kernel,
        &mut problems,
    )?;
    let model: BTreeMap<Flow, Track> = m.ct_new.drain().collect();
    compared += diff_tables("CT_NEW", &kernel, &model, &mut problems);
    let mut kernel = BTreeMap::new();
    drain(
        &mut k.frags,
        "FRAGS",
        FragId::from_key,
        &mut kernel,
        &mut problems,
    )?;
    let model: BTreeMap<FragId, Track> = m.frags.drain().collect();
    compared += diff_tables("FRAGS", &kernel, &model, &mut problems);
    // The SYN cache: the slots the model wrote (the kernel writing others shows up as packets
    // that differ), compared and zeroed.
    for (slot, want) in m.syn_seen.drain() {
        let got = k.syn_seen.get(&slot, 0)?;
        let got = SynSlot {
            hash: got.hash,
            seq: u32::from_be(got.syn_seq),
            backend: got.backend,
        };
        compared += 1;
        if got != want {
            problems.push(format!(
                "SYN_SEEN[{slot}]: {want:?} in the model, {got:?} in the kernel"
            ));
        }
        k.syn_seen.set(slot, CtValue::default(), 0)?;
    }
    Ok((compared, problems))
}
