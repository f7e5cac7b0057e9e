//! A reference model of the XDP balancer, written from the spec (`docs/datapath.md` and the
//! comments of `lb-ebpf/src/bin/balancer.rs`), independent of the eBPF code: packets are parsed
//! with `etherparse`, and the packets the balancer sends are built with [`lb_pkt`] (itself
//! checked against `etherparse` by its unit tests). The only code shared with the
//! datapath is `lb_common::flow_hash` and `lb_common::maglev_index`, the documented contract for
//! which Maglev slot a flow lands in, and the map key layouts (`FlowKey`, `FragKey`), used only
//! to compare this model's tables with the kernel's.
//!
//! [`State`] is everything the datapath's decision depends on: the VIPs (forwarding mode, id and
//! Maglev table, as the agent applied them), the backends (address, mode, VIP id, active and
//! down flags), the next hop towards each backend (what `bpf_fib_lookup` finds: egress
//! interface, MACs, MTU; none if there is no route or no neighbour), the encapsulation sources,
//! the ingress interface, and the contents of the connection tables (`CT`, `CT_NEW`) and the
//! fragment table (`FRAGS`). [`State::run`] says what one packet does, without changing the
//! state: the verdict, the output bytes, the backend, which counters and statistics move, and
//! the table changes ([`Change`]); [`State::apply`] then makes those changes.
//!
//! Where the spec fixes a looser reading than a general-purpose parser (the TCP header is 20
//! bytes whatever its data offset says; an ICMP error's quoted IPv4 header is read as its
//! fixed 20 bytes and its IHL only locates the ports; ICMP type/code are two bytes whatever the
//! type's own length rules), the model reads those fields itself instead of asking
//! `etherparse` to validate more than the datapath does.
//!
//! Spec points the model encodes (each is a rule of the datapath, not of this model):
//! - parse: Ethernet, at most one 802.1Q tag (0x8100; 0x88a8 is not IP); IPv4 with any IHL ≥ 5
//!   and total length within the frame; IPv6 with payload length within the frame and at most
//!   one Fragment header; anything else after IPv6 is not a VIP packet. Layer-4, fragment and
//!   ICMP headers must lie within the IP packet (Ethernet padding is not a header):
//!   `pass_malformed` otherwise.
//! - a later fragment (offset ≠ 0) of any protocol follows `FRAGS` or is `pass_frag_unknown`.
//! - port filter (`VIP_PORTS`: does a TCP/UDP VIP use this destination port), then `CT` (live
//!   backend: served, VIP not consulted), then the VIP, then `CT_NEW`/Maglev (`choose`).
//! - SYN recording (`SYN_RECORD`, armed by lbd around table changes; here `syn_record`): while
//!   it is off, a SYN (SYN without ACK) that `CT` does not serve makes no table entry: the
//!   table chooses, and the SYN cache slot `flow_hash & 0xffff` (hash, sequence number,
//!   backend) tells a retry (same hash and number: `syn_retries` of the chosen backend, nothing
//!   written) from a new connection (`ct_new`, `new_flows`, the slot is overwritten).
//!   `CT_NEW` is not consulted. A TCP packet other than a SYN that `CT` does not know, whose
//!   slot holds its hash and a sequence number one less than its own, with a live backend,
//!   goes straight into `CT` on that backend with that SYN's number (`ct_promoted`; `CT_NEW`
//!   not consulted). While recording is on, SYNs follow the rules below, as every other
//!   packet, except that a SYN `CT_NEW` does not know (or knows with another number) whose
//!   slot holds its hash and number, with a live backend, is a retry of a SYN sent before
//!   recording: recorded in `CT_NEW` on the slot's backend, `syn_retries`, no `ct_new`.
//! - a SYN (SYN without ACK) never promotes; any other packet of a `CT_NEW` flow promotes it
//!   (the `CT_NEW` entry stays). A tracked flow whose backend is not live is re-steered
//!   through the table in the table it was found in, keeps its SYN's sequence number and is
//!   marked re-steered.
//! - tuple reuse: a flow's entry records the sequence number of the SYN that opened it (0 for
//!   UDP and for flows opened by another packet). A SYN that finds its flow in `CT` is a new
//!   connection: the `CT` entry is deleted and the SYN is a new flow (table, `CT_NEW`, `ct_new`;
//!   `CT_NEW` is not consulted). A SYN that finds its flow in `CT_NEW` with the same sequence
//!   number is a retry (`syn_retries`, same backend); with another one it is a new flow whose
//!   entry replaces the old one.
//! - per-backend `syn_retries` only for SYN retries in `CT_NEW`; `client_rsts` for RSTs on a
//!   tracked flow with a live backend that is not marked re-steered.
//! - a closing `CT` entry (the client sent a FIN or RST) quiet for 10 s belongs to a
//!   connection that is over: the datapath treats any packet on it like a SYN on a tracked
//!   tuple. Not modelled (no clock here): the fuzzer empties the tables every 5 s.
//! - a TCP packet other than a SYN that neither table knows counts `ct_lost` (its state was
//!   lost or predates the balancer), then goes through the table like a first packet
//!   (`ct_new`). UDP never counts `ct_lost`. Inserts never fail here (the model has no
//!   capacity), so `ct_insert_failed`, `ct_new_insert_failed` and `frag_insert_failed` stay 0.
//! - ICMP frag-needed (3/4) / ICMPv6 packet-too-big (2): the quoted packet went VIP → client;
//!   reversed, it is the client's flow: `CT`, else `CT_NEW`, else the table. No state change.
//!   Never answered with "too big" (dropped as `drop_too_big` instead).
//! - encapsulation: outer IPv4 (tos copied, id 0, DF, TTL 64, protocol 4, checksum) or IPv6
//!   (traffic class copied, flow label = flow hash & 0xfffff, next header 41, hop limit 64)
//!   from the encapsulation source to the backend; the Ethernet header is rebuilt (backend's
//!   MAC, egress MAC, the input's 802.1Q tag if the next hop is on the ingress interface,
//!   untagged otherwise); everything after the original link header (the IP packet and any
//!   Ethernet padding) follows unchanged.
//! - L2 forwarding: the MACs rewritten (backend's, egress); a tagged frame keeps its tag when
//!   the next hop is on the ingress interface (`XDP_TX`) and loses it otherwise (redirect).
//! - too big (outer length > next-hop MTU): ICMP frag-needed (MTU − 20) quoting the IP header
//!   and 8 bytes, or ICMPv6 packet-too-big (MTU − 40) quoting the first 128 bytes, from the
//!   VIP to the client, MACs swapped, tag kept, sent back out (`XDP_TX`).
//! - counters and statistics: one reason counter per packet not forwarded; flow events
//!   (`ct_new`, `ct_promoted`, `ct_resteered`, `ct_lost`) and per-backend/VIP statistics counted when they
//!   happen, even if the packet is dropped afterwards (e.g. `drop_fib`).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use etherparse::{
    EtherType, Ethernet2Header, Ethernet2HeaderSlice, Ipv4Header, Ipv4HeaderSlice,
    Ipv6FragmentHeaderSlice, Ipv6Header, Ipv6HeaderSlice, SingleVlanHeader, SingleVlanHeaderSlice,
    UdpHeaderSlice,
};
use lb_common::{
    flow_hash, maglev_index, BackendStats, Counter, FlowKey, FragKey, VipStats, FAMILY_V4,
    FAMILY_V6,
};

use lb_pkt::{
    self as pkt, be16, be32, Ip4, Ip6, Mac, ICMP, ICMPV6, IP4_DF, IPIP, IPV6, IPV6_FRAG, TCP,
    TCP_ACK, TCP_RST, TCP_SYN, UDP,
};

/// Outer TTL / hop limit of what the balancer sends.
const TTL: u8 = 64;
/// IPv6 bytes quoted in a packet-too-big reply.
const ICMP6_QUOTE: usize = 128;

/// A flow as the client sends it (for an ICMP error: the quoted packet, reversed).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Flow {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
}

fn addr16(a: IpAddr) -> ([u8; 16], u8) {
    let mut b = [0u8; 16];
    match a {
        IpAddr::V4(v) => {
            b[..4].copy_from_slice(&v.octets());
            (b, FAMILY_V4)
        }
        IpAddr::V6(v) => (v.octets(), FAMILY_V6),
    }
}

fn addr_from16(b: &[u8; 16], family: u8) -> IpAddr {
    if family == FAMILY_V4 {
        IpAddr::from([b[0], b[1], b[2], b[3]])
    } else {
        IpAddr::from(*b)
    }
}

/// Ports are kept in the key exactly as they are on the wire (network order in memory).
fn wire16(port: u16) -> u16 {
    u16::from_ne_bytes(port.to_be_bytes())
}

fn host16(wire: u16) -> u16 {
    u16::from_be_bytes(wire.to_ne_bytes())
}

impl Flow {
    /// The connection-table key, in the documented layout of `lb_common::FlowKey`.
    pub fn key(&self) -> FlowKey {
        let (src, family) = addr16(self.src);
        let (dst, _) = addr16(self.dst);
        FlowKey {
            src,
            dst,
            sport: wire16(self.sport),
            dport: wire16(self.dport),
            proto: self.proto,
            family,
            _pad: [0; 2],
        }
    }

    pub fn from_key(k: &FlowKey) -> Flow {
        Flow {
            src: addr_from16(&k.src, k.family),
            dst: addr_from16(&k.dst, k.family),
            sport: host16(k.sport),
            dport: host16(k.dport),
            proto: k.proto,
        }
    }
}

impl fmt::Display for Flow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = match self.proto {
            TCP => "tcp".to_string(),
            UDP => "udp".to_string(),
            n => format!("proto {n}"),
        };
        write!(
            f,
            "{} {} -> {}",
            p,
            sock(self.src, self.sport),
            sock(self.dst, self.dport)
        )
    }
}

fn sock(a: IpAddr, p: u16) -> String {
    match a {
        IpAddr::V4(v) => format!("{v}:{p}"),
        IpAddr::V6(v) => format!("[{v}]:{p}"),
    }
}

/// What identifies one datagram's fragments. `id` is the header field's value (16 bits for
/// IPv4, 32 for IPv6).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FragId {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    pub id: u32,
}

impl FragId {
    /// The fragment-table key, in the documented layout of `lb_common::FragKey` (the
    /// identification as read from the packet: network order in memory, IPv4's 16 bits first).
    pub fn key(&self) -> FragKey {
        let (src, family) = addr16(self.src);
        let (dst, _) = addr16(self.dst);
        let id = if family == FAMILY_V4 {
            u16::from_ne_bytes((self.id as u16).to_be_bytes()) as u32
        } else {
            u32::from_ne_bytes(self.id.to_be_bytes())
        };
        FragKey {
            src,
            dst,
            id,
            proto: self.proto,
            family,
            _pad: [0; 2],
        }
    }

    pub fn from_key(k: &FragKey) -> FragId {
        let id = if k.family == FAMILY_V4 {
            u16::from_be_bytes((k.id as u16).to_ne_bytes()) as u32
        } else {
            u32::from_be_bytes(k.id.to_ne_bytes())
        };
        FragId {
            src: addr_from16(&k.src, k.family),
            dst: addr_from16(&k.dst, k.family),
            proto: k.proto,
            id,
        }
    }
}

/// A connection-table or fragment-table value: the backend, the flow's hash, the sequence
/// number of the SYN that opened the flow (0 for UDP, for flows opened by another packet, and
/// in the fragment table) and whether the flow was re-steered from a backend that was down.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Track {
    pub backend: u32,
    pub hash: u32,
    pub syn_seq: u32,
    pub resteered: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    Ipip,
    L2,
}

/// A VIP as the datapath reads it.
#[derive(Clone, Debug)]
pub struct Vip {
    pub vip_id: u32,
    pub mode: Mode,
    /// The Maglev table (backend ids; 0 = empty slot).
    pub table: Vec<u32>,
}

/// A backend entry, by id.
#[derive(Clone, Debug)]
pub struct Backend {
    pub addr: IpAddr,
    pub mode: Mode,
    pub vip_id: u32,
    pub active: bool,
    pub down: bool,
}

/// What `bpf_fib_lookup` finds towards a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NextHop {
    pub ifindex: u32,
    /// The egress interface's MAC.
    pub smac: Mac,
    /// The backend's (neighbour's) MAC.
    pub dmac: Mac,
    pub mtu: u16,
}

/// (address, port, protocol) of a VIP.
pub type VipAddr = (IpAddr, u16, u8);

/// Everything the datapath's decisions depend on.
#[derive(Clone, Debug, Default)]
pub struct State {
    vips: HashMap<VipAddr, Vip>,
    /// `VIP_PORTS`: destination port → bit 1 (some TCP VIP uses it) | bit 2 (some UDP VIP).
    port_bits: HashMap<u16, u8>,
    pub backends: HashMap<u32, Backend>,
    /// By backend address; absent: no route or no neighbour.
    pub nexthops: HashMap<IpAddr, NextHop>,
    pub encap_v4: Option<Ipv4Addr>,
    pub encap_v6: Option<Ipv6Addr>,
    pub ingress_ifindex: u32,
    pub ct: HashMap<Flow, Track>,
    pub ct_new: HashMap<Flow, Track>,
    pub frags: HashMap<FragId, Track>,
    /// Whether SYNs are recorded in `CT_NEW` (the datapath's `SYN_RECORD` is armed).
    pub syn_record: bool,
    /// The SYN cache by slot (an absent slot is all zeros).
    pub syn_seen: HashMap<u32, SynSlot>,
}

/// A SYN cache slot: the flow hash, the SYN's sequence number (host order) and its backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SynSlot {
    pub hash: u32,
    pub seq: u32,
    pub backend: u32,
}

/// SYN cache slots (a power of two).
pub const SYN_SLOTS: u32 = 65_536;

/// The XDP verdict, or the kernel's refusal to run the program (frames shorter than an
/// Ethernet header never reach XDP).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Verdict {
    Aborted,
    Drop,
    Pass,
    Tx,
    Redirect,
    Refused,
}

impl Verdict {
    pub fn from_xdp(v: u32) -> Option<Verdict> {
        Some(match v {
            pkt::XDP_ABORTED => Verdict::Aborted,
            pkt::XDP_DROP => Verdict::Drop,
            pkt::XDP_PASS => Verdict::Pass,
            pkt::XDP_TX => Verdict::Tx,
            pkt::XDP_REDIRECT => Verdict::Redirect,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Verdict::Aborted => "XDP_ABORTED",
            Verdict::Drop => "XDP_DROP",
            Verdict::Pass => "XDP_PASS",
            Verdict::Tx => "XDP_TX",
            Verdict::Redirect => "XDP_REDIRECT",
            Verdict::Refused => "refused (EINVAL)",
        }
    }
}

/// A table change a packet makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// First packet of a flow: recorded in `CT_NEW`.
    CtNew(Flow, Track),
    /// A later packet of a `CT_NEW` flow (not a SYN): copied to `CT` (it stays in `CT_NEW`).
    Promote(Flow, Track),
    /// A `CT` flow whose backend is not live, steered again: `CT` updated.
    ResteerCt(Flow, Track),
    /// A `CT_NEW` flow whose backend is not live, steered again: `CT_NEW` updated.
    ResteerCtNew(Flow, Track),
    /// A SYN on a `CT` flow (a new connection on a reused 4-tuple): the `CT` entry is deleted.
    CtRemove(Flow),
    /// A first fragment's choice, for the later fragments of its datagram.
    Frag(FragId, Track),
    /// A SYN sent on without recording: its SYN cache slot.
    SynSeen(u32, SynSlot),
}

/// What one packet does.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub verdict: Verdict,
    /// The frame the program leaves behind (the input itself unless forwarded or answered).
    pub output: Vec<u8>,
    /// The backend the packet went (or would have gone) to.
    pub backend: Option<u32>,
    /// Counters incremented (each once per entry).
    pub counters: Vec<Counter>,
    pub changes: Vec<Change>,
    /// Statistics increments, by backend id and VIP id.
    pub backend_stats: BTreeMap<u32, BackendStats>,
    pub vip_stats: BTreeMap<u32, VipStats>,
    /// How the decision was made (for coverage reports): e.g. "ct", "ct_new+promote".
    pub path: &'static str,
}

impl Outcome {
    fn new(frame: &[u8]) -> Outcome {
        Outcome {
            verdict: Verdict::Pass,
            output: frame.to_vec(),
            backend: None,
            counters: Vec::new(),
            changes: Vec::new(),
            backend_stats: BTreeMap::new(),
            vip_stats: BTreeMap::new(),
            path: "",
        }
    }

    fn bstat(&mut self, id: u32) -> &mut BackendStats {
        self.backend_stats.entry(id).or_default()
    }

    fn vstat(&mut self, id: u32) -> &mut VipStats {
        self.vip_stats.entry(id).or_default()
    }
}

/// Why a packet was not forwarded.
#[derive(Clone, Debug)]
enum Stop {
    NonIp,
    NotVip,
    Malformed,
    FragUnknown,
    IcmpNotVip,
    NoBackend,
    Fib,
    TooBig,
    NoEncapSource,
    /// Answered: the packet became this ICMP error, sent back out.
    TooBigReplied(Vec<u8>),
}

impl Stop {
    fn counter(&self) -> Counter {
        match self {
            Stop::NonIp => Counter::PassNonIp,
            Stop::NotVip => Counter::PassNotVip,
            Stop::Malformed => Counter::PassMalformed,
            Stop::FragUnknown => Counter::PassFragUnknown,
            Stop::IcmpNotVip => Counter::PassIcmpNotVip,
            Stop::NoBackend => Counter::DropNoBackend,
            Stop::Fib => Counter::DropFib,
            Stop::TooBig => Counter::DropTooBig,
            Stop::NoEncapSource => Counter::DropNoEncapSource,
            Stop::TooBigReplied(_) => Counter::IcmpTooBigSent,
        }
    }
}

/// The link layer of the input.
struct L2 {
    dst: Mac,
    src: Mac,
    /// The 802.1Q tag's TCI, if tagged.
    vlan: Option<u16>,
    /// Offset of the IP header.
    l3: usize,
}

/// The IP layer of the input.
struct Ip<'a> {
    l2: L2,
    frame: &'a [u8],
    /// The IP packet as its header delimits it (headers beyond it are Ethernet padding).
    packet: &'a [u8],
    v6: bool,
    /// IPv4 header length with options (40 for IPv6).
    ihl: usize,
    /// DSCP and ECN (IPv4 TOS byte, IPv6 traffic class).
    tos: u8,
    src: IpAddr,
    dst: IpAddr,
}

enum Kind {
    /// TCP or UDP whose header starts at `l4` (offset in the IP packet).
    Flow {
        proto: u8,
        l4: usize,
        first_fragment: Option<u32>,
    },
    /// A fragment with a non-zero offset.
    Later { proto: u8, id: u32 },
    /// ICMP or ICMPv6 at `l4`.
    Icmp { l4: usize },
}

/// A frame from `l2_src` to `l2_dst` with the input's 802.1Q tag (if any) and ethertype `et`,
/// its payload to follow.
fn frame_with(l2_dst: Mac, l2_src: Mac, vlan: Option<u16>, et: u16) -> Vec<u8> {
    pkt::ether_vlan(l2_dst, l2_src, vlan, et, &[])
}

impl State {
    pub fn new() -> State {
        State::default()
    }

    /// Replaces the VIP set (and with it the port filter).
    pub fn set_vips(&mut self, vips: HashMap<VipAddr, Vip>) {
        self.port_bits.clear();
        for (_, port, proto) in vips.keys() {
            let bit = if *proto == TCP { 1 } else { 2 };
            *self.port_bits.entry(*port).or_insert(0) |= bit;
        }
        self.vips = vips;
    }

    pub fn vips(&self) -> &HashMap<VipAddr, Vip> {
        &self.vips
    }

    /// Whether backend `id` may carry traffic (active and not down).
    pub fn live(&self, id: u32) -> bool {
        self.backends.get(&id).is_some_and(|b| b.active && !b.down)
    }

    /// The backend a tracked flow is pinned to: `CT`, else `CT_NEW` (what
    /// `Balancer::tracked_backend` reads).
    pub fn tracked(&self, f: &Flow) -> Option<u32> {
        self.ct
            .get(f)
            .or_else(|| self.ct_new.get(f))
            .map(|t| t.backend)
    }

    /// Makes the table changes of an outcome.
    pub fn apply(&mut self, o: &Outcome) {
        for c in &o.changes {
            match *c {
                Change::CtNew(f, t) | Change::ResteerCtNew(f, t) => {
                    self.ct_new.insert(f, t);
                }
                Change::Promote(f, t) | Change::ResteerCt(f, t) => {
                    self.ct.insert(f, t);
                }
                Change::Frag(k, t) => {
                    self.frags.insert(k, t);
                }
                Change::CtRemove(f) => {
                    self.ct.remove(&f);
                }
                Change::SynSeen(i, slot) => {
                    self.syn_seen.insert(i, slot);
                }
            }
        }
    }

    /// What `frame` does, arriving on the ingress interface.
    pub fn run(&self, frame: &[u8]) -> Outcome {
        let mut o = Outcome::new(frame);
        if frame.len() < Ethernet2Header::LEN {
            o.verdict = Verdict::Refused;
            o.output.clear();
            o.path = "refused";
            return o;
        }
        match self.walk(frame, &mut o) {
            Ok(()) => {}
            Err(stop) => {
                o.counters.push(stop.counter());
                match stop {
                    Stop::NonIp
                    | Stop::NotVip
                    | Stop::Malformed
                    | Stop::FragUnknown
                    | Stop::IcmpNotVip => {
                        o.verdict = Verdict::Pass;
                        o.output = frame.to_vec();
                    }
                    Stop::NoBackend | Stop::Fib | Stop::TooBig | Stop::NoEncapSource => {
                        o.verdict = Verdict::Drop;
                        o.output = frame.to_vec();
                    }
                    Stop::TooBigReplied(out) => {
                        o.verdict = Verdict::Tx;
                        o.output = out;
                    }
                }
            }
        }
        o
    }

    fn walk(&self, f: &[u8], o: &mut Outcome) -> Result<(), Stop> {
        let eth = Ethernet2HeaderSlice::from_slice(f).map_err(|_| Stop::Malformed)?;
        let (l3, et, vlan) = if eth.ether_type() == EtherType::VLAN_TAGGED_FRAME {
            let v = SingleVlanHeaderSlice::from_slice(&f[Ethernet2Header::LEN..])
                .map_err(|_| Stop::Malformed)?;
            (
                Ethernet2Header::LEN + SingleVlanHeader::LEN,
                v.ether_type(),
                Some(be16(f, Ethernet2Header::LEN)),
            )
        } else {
            (Ethernet2Header::LEN, eth.ether_type(), None)
        };
        let l2 = L2 {
            dst: eth.destination(),
            src: eth.source(),
            vlan,
            l3,
        };
        let (ip, kind) = match et {
            EtherType::IPV4 => ipv4(f, l2)?,
            EtherType::IPV6 => ipv6(f, l2)?,
            _ => return Err(Stop::NonIp),
        };
        match kind {
            Kind::Flow {
                proto,
                l4,
                first_fragment,
            } => self.flow(&ip, proto, l4, first_fragment, o),
            Kind::Later { proto, id } => {
                let k = FragId {
                    src: ip.src,
                    dst: ip.dst,
                    proto,
                    id,
                };
                let t = *self.frags.get(&k).ok_or(Stop::FragUnknown)?;
                if !self.live(t.backend) {
                    return Err(Stop::FragUnknown);
                }
                o.path = "frag";
                self.forward(&ip, t, true, Some(Counter::FragForwarded), o)
            }
            Kind::Icmp { l4 } => self.icmp(&ip, l4, o),
        }
    }

    fn flow(
        &self,
        ip: &Ip,
        proto: u8,
        l4: usize,
        first_fragment: Option<u32>,
        o: &mut Outcome,
    ) -> Result<(), Stop> {
        let seg = &ip.packet[l4..];
        let (sport, dport, flags, seq) = if proto == TCP {
            // The TCP header is read as its fixed 20 bytes (spec: "TCP (20 bytes)").
            if seg.len() < 20 {
                return Err(Stop::Malformed);
            }
            (be16(seg, 0), be16(seg, 2), seg[13], be32(seg, 4))
        } else {
            let u = UdpHeaderSlice::from_slice(seg).map_err(|_| Stop::Malformed)?;
            (u.source_port(), u.destination_port(), 0, 0)
        };
        let bit = if proto == TCP { 1 } else { 2 };
        if self.port_bits.get(&dport).copied().unwrap_or(0) & bit == 0 {
            return Err(Stop::NotVip);
        }
        let flow = Flow {
            src: ip.src,
            dst: ip.dst,
            sport,
            dport,
            proto,
        };
        let syn = flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
        let tcp_seq = seq;
        let seq = if syn { seq } else { 0 };
        let rst = flags & TCP_RST != 0;
        let established = self.ct.get(&flow).copied();
        // A SYN is never served from `CT`: it opens a new connection on a reused tuple.
        let served = if syn { None } else { established };
        let t = match served.filter(|t| self.live(t.backend)) {
            Some(t) => {
                let s = o.bstat(t.backend);
                s.client_rsts += (rst && !t.resteered) as u64;
                o.path = if t.resteered { "ct(resteered)" } else { "ct" };
                t
            }
            None => {
                let vip = self
                    .vips
                    .get(&(flow.dst, flow.dport, flow.proto))
                    .ok_or(Stop::NotVip)?;
                if syn && established.is_some() {
                    o.changes.push(Change::CtRemove(flow));
                }
                if syn && !self.syn_record {
                    self.syn_unrecorded(&flow, vip, seq, o)?
                } else if let Some(t) = (!syn && proto == TCP && established.is_none())
                    .then(|| self.handshake_ack(&flow, tcp_seq, o))
                    .flatten()
                {
                    t
                } else {
                    self.choose(&flow, vip, syn, seq, rst, established, o)?
                }
            }
        };
        if let Some(id) = first_fragment {
            let k = FragId {
                src: flow.src,
                dst: flow.dst,
                proto,
                id,
            };
            let ft = Track {
                syn_seq: 0,
                resteered: false,
                ..t
            };
            o.changes.push(Change::Frag(k, ft));
        }
        self.forward(ip, t, true, None, o)
    }

    /// `CT_NEW`, else the table. `established`: the flow's `CT` entry (a SYN's, which the
    /// caller deleted, or one whose backend is not live); `CT_NEW` is then not consulted.
    /// `seq`: the SYN's sequence number (0 for any other packet).
    #[allow(clippy::too_many_arguments)]
    fn choose(
        &self,
        flow: &Flow,
        vip: &Vip,
        syn: bool,
        seq: u32,
        rst: bool,
        established: Option<Track>,
        o: &mut Outcome,
    ) -> Result<Track, Stop> {
        // Kept in `CT` and steered again there (not a SYN: a SYN's entry was deleted).
        let in_ct = if syn { None } else { established };
        let seen = if established.is_some() {
            None
        } else {
            self.ct_new.get(flow).copied()
        };
        if established.is_none() && seen.is_none() && flow.proto == TCP && !syn {
            o.counters.push(Counter::CtLost);
        }
        // A SYN with another sequence number than the recorded one: a new connection.
        let reused = syn && seen.is_some_and(|t| t.syn_seq != seq);
        let seen = if reused { None } else { seen };
        if let Some(t) = seen.filter(|t| self.live(t.backend)) {
            let s = o.bstat(t.backend);
            s.syn_retries += syn as u64;
            s.client_rsts += (rst && !t.resteered) as u64;
            if syn {
                o.path = "ct_new(syn)";
            } else {
                o.changes.push(Change::Promote(*flow, t));
                o.counters.push(Counter::CtPromoted);
                o.path = "ct_new+promote";
            }
            return Ok(t);
        }
        // A SYN `CT_NEW` does not know, while recording: a retry of a SYN in the SYN cache
        // keeps that SYN's backend.
        let cached = syn
            .then(|| {
                let hash = flow_hash(&flow.key());
                let c = self.syn_seen.get(&(hash & (SYN_SLOTS - 1))).copied();
                c.filter(|c| c.hash == hash && c.seq == seq && self.live(c.backend))
            })
            .flatten()
            .filter(|_| seen.is_none());
        let t = match cached {
            Some(c) => Track {
                backend: c.backend,
                hash: c.hash,
                syn_seq: 0,
                resteered: false,
            },
            None => self.maglev_choice(flow, vip, o)?,
        };
        if cached.is_some() {
            let t = Track { syn_seq: seq, ..t };
            o.changes.push(Change::CtNew(*flow, t));
            o.bstat(t.backend).syn_retries += 1;
            o.path = "ct_new(syn_seen retry)";
            return Ok(t);
        }
        if let Some(old) = in_ct.or(seen) {
            let t = Track {
                syn_seq: old.syn_seq,
                resteered: true,
                ..t
            };
            o.changes.push(if in_ct.is_some() {
                Change::ResteerCt(*flow, t)
            } else {
                Change::ResteerCtNew(*flow, t)
            });
            o.counters.push(Counter::CtResteered);
            o.bstat(t.backend).resteered += 1;
            o.path = if in_ct.is_some() {
                "resteer(ct)"
            } else {
                "resteer(ct_new)"
            };
            Ok(t)
        } else {
            let t = Track { syn_seq: seq, ..t };
            o.changes.push(Change::CtNew(*flow, t));
            o.counters.push(Counter::CtNew);
            o.bstat(t.backend).new_flows += 1;
            o.vstat(vip.vip_id).new_flows += 1;
            o.path = if established.is_some() {
                "reuse(ct)"
            } else if reused {
                "reuse(ct_new)"
            } else {
                "new"
            };
            Ok(t)
        }
    }

    /// A SYN while recording is off: the table's choice; the SYN cache tells a retry from a
    /// new connection, which takes the slot.
    fn syn_unrecorded(
        &self,
        flow: &Flow,
        vip: &Vip,
        seq: u32,
        o: &mut Outcome,
    ) -> Result<Track, Stop> {
        let t = self.maglev_choice(flow, vip, o)?;
        let slot = t.hash & (SYN_SLOTS - 1);
        let seen = self.syn_seen.get(&slot).copied().unwrap_or_default();
        if seen.hash == t.hash && seen.seq == seq {
            o.bstat(t.backend).syn_retries += 1;
            o.path = "syn_seen(retry)";
        } else {
            o.changes.push(Change::SynSeen(
                slot,
                SynSlot {
                    hash: t.hash,
                    seq,
                    backend: t.backend,
                },
            ));
            o.counters.push(Counter::CtNew);
            o.bstat(t.backend).new_flows += 1;
            o.vstat(vip.vip_id).new_flows += 1;
            o.path = "syn_seen(new)";
        }
        Ok(t)
    }

    /// A TCP packet past the SYN that `CT` does not know: its SYN in the SYN cache (same
    /// hash, sequence number one less) with a live backend puts it straight into `CT`.
    fn handshake_ack(&self, flow: &Flow, seq: u32, o: &mut Outcome) -> Option<Track> {
        let hash = flow_hash(&flow.key());
        let seen = self
            .syn_seen
            .get(&(hash & (SYN_SLOTS - 1)))
            .copied()
            .unwrap_or_default();
        if seen.hash != hash || seen.seq.wrapping_add(1) != seq || !self.live(seen.backend) {
            return None;
        }
        let t = Track {
            backend: seen.backend,
            hash,
            syn_seq: seen.seq,
            resteered: false,
        };
        o.changes.push(Change::Promote(*flow, t));
        o.counters.push(Counter::CtPromoted);
        o.path = "syn_seen+ack";
        Some(t)
    }

    /// The Maglev choice: `table[flow_hash % size]`, which must be a live backend.
    fn maglev_choice(&self, flow: &Flow, vip: &Vip, o: &mut Outcome) -> Result<Track, Stop> {
        let hash = flow_hash(&flow.key());
        let id = vip
            .table
            .get(maglev_index(hash, vip.table.len() as u32) as usize)
            .copied()
            .unwrap_or(0);
        if id == 0 || !self.live(id) {
            o.vstat(vip.vip_id).no_backend += 1;
            o.path = "no_backend";
            return Err(Stop::NoBackend);
        }
        Ok(Track {
            backend: id,
            hash,
            syn_seq: 0,
            resteered: false,
        })
    }

    fn icmp(&self, ip: &Ip, l4: usize, o: &mut Outcome) -> Result<(), Stop> {
        let msg = &ip.packet[l4..];
        if msg.len() < 8 {
            return Err(Stop::Malformed);
        }
        let ours = if ip.v6 {
            msg[0] == 2
        } else {
            msg[0] == 3 && msg[1] == 4
        };
        if !ours {
            return Err(Stop::NotVip);
        }
        // The quoted packet went from the VIP to the client: its source is the VIP.
        let q = &msg[8..];
        let (proto, qsrc, qdst, ql4) = if ip.v6 {
            if q.len() < 40 || q[0] >> 4 != 6 {
                return Err(Stop::Malformed);
            }
            let (s, d) = pkt::ip6_addrs(q);
            (q[6], s.into(), d.into(), 40)
        } else {
            if q.len() < 20 || q[0] >> 4 != 4 || q[0] & 0x0f < 5 {
                return Err(Stop::Malformed);
            }
            let (s, d) = pkt::ip4_addrs(q);
            (q[9], s.into(), d.into(), pkt::ip4_ihl(q))
        };
        if proto != TCP && proto != UDP {
            return Err(Stop::IcmpNotVip);
        }
        if q.len() < ql4 + 4 {
            return Err(Stop::Malformed);
        }
        let flow = Flow {
            src: qdst,
            dst: qsrc,
            sport: be16(q, ql4 + 2),
            dport: be16(q, ql4),
            proto,
        };
        let vip = self
            .vips
            .get(&(flow.dst, flow.dport, flow.proto))
            .ok_or(Stop::IcmpNotVip)?;
        let tracked = self
            .ct
            .get(&flow)
            .or_else(|| self.ct_new.get(&flow))
            .copied();
        let t = match tracked.filter(|t| self.live(t.backend)) {
            Some(t) => {
                o.path = "icmp(tracked)";
                t
            }
            None => {
                let t = self.maglev_choice(&flow, vip, o)?;
                o.path = "icmp(table)";
                t
            }
        };
        self.forward(ip, t, false, Some(Counter::IcmpForwarded), o)
    }

    /// Sends the packet to `t.backend`: MAC rewrite or encapsulation (or the "too big" answer).
    fn forward(
        &self,
        ip: &Ip,
        t: Track,
        reply_too_big: bool,
        counter: Option<Counter>,
        o: &mut Outcome,
    ) -> Result<(), Stop> {
        o.backend = Some(t.backend);
        let b = &self.backends[&t.backend];
        let nh = self.nexthops.get(&b.addr).ok_or(Stop::Fib)?;
        // The 802.1Q tag belongs to the ingress link: it leaves with frames sent back out of
        // it, not with frames redirected to another interface.
        let same_link = nh.ifindex == self.ingress_ifindex;
        let vlan = if same_link { ip.l2.vlan } else { None };
        let out = match b.mode {
            Mode::L2 => {
                let et = be16(ip.frame, ip.l2.l3 - 2);
                let mut out = frame_with(nh.dmac, nh.smac, vlan, et);
                out.extend_from_slice(&ip.frame[ip.l2.l3..]);
                out
            }
            Mode::Ipip => self.encapsulate(ip, t.hash, b, nh, vlan, reply_too_big)?,
        };
        let len = ip.frame.len() as u64;
        let s = o.bstat(t.backend);
        s.packets += 1;
        s.bytes += len;
        let v = o.vstat(b.vip_id);
        v.packets += 1;
        v.bytes += len;
        if let Some(c) = counter {
            o.counters.push(c);
        }
        o.verdict = if same_link {
            Verdict::Tx
        } else {
            Verdict::Redirect
        };
        o.output = out;
        Ok(())
    }

    fn encapsulate(
        &self,
        ip: &Ip,
        hash: u32,
        b: &Backend,
        nh: &NextHop,
        vlan: Option<u16>,
        reply_too_big: bool,
    ) -> Result<Vec<u8>, Stop> {
        let inner_len = ip.packet.len();
        // Everything after the link header follows the new outer header, Ethernet padding too.
        let padding = &ip.frame[ip.l2.l3 + inner_len..];
        if ip.v6 {
            if inner_len + Ipv6Header::LEN > nh.mtu as usize {
                return Err(self.too_big(ip, nh.mtu, reply_too_big));
            }
            let src = self.encap_v6.ok_or(Stop::NoEncapSource)?;
            let IpAddr::V6(dst) = b.addr else {
                panic!("IPv6 VIP with IPv4 backend {}", b.addr)
            };
            let h = Ip6 {
                tc: ip.tos,
                label: hash & 0xf_ffff,
                hop: TTL,
                ..Ip6::new(src, dst, IPV6)
            };
            let mut out = frame_with(nh.dmac, nh.smac, vlan, pkt::ETH_IPV6);
            out.extend_from_slice(&h.build(ip.packet));
            out.extend_from_slice(padding);
            Ok(out)
        } else {
            if inner_len + Ipv4Header::MIN_LEN > nh.mtu as usize {
                return Err(self.too_big(ip, nh.mtu, reply_too_big));
            }
            let src = self.encap_v4.ok_or(Stop::NoEncapSource)?;
            let IpAddr::V4(dst) = b.addr else {
                panic!("IPv4 VIP with IPv6 backend {}", b.addr)
            };
            let h = Ip4 {
                tos: ip.tos,
                id: 0,
                frag: IP4_DF,
                ttl: TTL,
                ..Ip4::new(src, dst, IPIP)
            };
            let mut out = frame_with(nh.dmac, nh.smac, vlan, pkt::ETH_IPV4);
            out.extend_from_slice(&h.build(ip.packet));
            out.extend_from_slice(padding);
            Ok(out)
        }
    }

    /// The ICMP "too big" answer for the sender, from the VIP (the packet's destination).
    fn too_big(&self, ip: &Ip, mtu: u16, reply: bool) -> Stop {
        if !reply {
            return Stop::TooBig;
        }
        let (client, vip) = (ip.src, ip.dst);
        if ip.v6 {
            let quote = &ip.packet[..ip.packet.len().min(ICMP6_QUOTE)];
            let (IpAddr::V6(c), IpAddr::V6(v)) = (client, vip) else {
                unreachable!()
            };
            let mtu = (mtu.saturating_sub(40) as u32).to_be_bytes();
            // Packet Too Big (type 2, code 0).
            let icmp = pkt::icmp6(v, c, 2, 0, mtu, quote);
            let h = Ip6 {
                hop: TTL,
                ..Ip6::new(v, c, ICMPV6)
            };
            let mut out = frame_with(ip.l2.src, ip.l2.dst, ip.l2.vlan, pkt::ETH_IPV6);
            out.extend_from_slice(&h.build(&icmp));
            Stop::TooBigReplied(out)
        } else {
            let n = ip.ihl + 8;
            if ip.packet.len() < n {
                return Stop::TooBig;
            }
            let quote = &ip.packet[..n];
            let (IpAddr::V4(c), IpAddr::V4(v)) = (client, vip) else {
                unreachable!()
            };
            let [m0, m1] = mtu.saturating_sub(20).to_be_bytes();
            // Destination unreachable (3), fragmentation needed (4): the next hop's MTU in the
            // low 16 bits of the "rest of header".
            let icmp = pkt::icmp4(3, 4, [0, 0, m0, m1], quote);
            let h = Ip4 {
                id: 0,
                frag: 0,
                ttl: TTL,
                ..Ip4::new(v, c, ICMP)
            };
            let mut out = frame_with(ip.l2.src, ip.l2.dst, ip.l2.vlan, pkt::ETH_IPV4);
            out.extend_from_slice(&h.build(&icmp));
            Stop::TooBigReplied(out)
        }
    }
}

fn ipv4(f: &[u8], l2: L2) -> Result<(Ip<'_>, Kind), Stop> {
    let l3 = l2.l3;
    let h = Ipv4HeaderSlice::from_slice(&f[l3..]).map_err(|_| Stop::Malformed)?;
    let ihl = h.slice().len();
    let total = h.total_len() as usize;
    if total < ihl || total > f.len() - l3 {
        return Err(Stop::Malformed);
    }
    let proto = h.protocol().0;
    let id = h.identification() as u32;
    let ip = Ip {
        frame: f,
        packet: &f[l3..l3 + total],
        v6: false,
        ihl,
        tos: (h.dcp().value() << 2) | h.ecn().value(),
        src: IpAddr::V4(h.source_addr()),
        dst: IpAddr::V4(h.destination_addr()),
        l2,
    };
    if h.fragments_offset().value() != 0 {
        return Ok((ip, Kind::Later { proto, id }));
    }
    let first_fragment = h.more_fragments().then_some(id);
    let kind = match proto {
        TCP | UDP => Kind::Flow {
            proto,
            l4: ihl,
            first_fragment,
        },
        ICMP => Kind::Icmp { l4: ihl },
        _ => return Err(Stop::NotVip),
    };
    Ok((ip, kind))
}

fn ipv6(f: &[u8], l2: L2) -> Result<(Ip<'_>, Kind), Stop> {
    let l3 = l2.l3;
    let h = Ipv6HeaderSlice::from_slice(&f[l3..]).map_err(|_| Stop::Malformed)?;
    let total = Ipv6Header::LEN + h.payload_length() as usize;
    if total > f.len() - l3 {
        return Err(Stop::Malformed);
    }
    let ip = Ip {
        frame: f,
        packet: &f[l3..l3 + total],
        v6: true,
        ihl: Ipv6Header::LEN,
        tos: h.traffic_class(),
        src: IpAddr::V6(h.source_addr()),
        dst: IpAddr::V6(h.destination_addr()),
        l2,
    };
    let mut proto = h.next_header().0;
    let mut l4 = Ipv6Header::LEN;
    let mut first_fragment = None;
    if proto == IPV6_FRAG {
        let fh =
            Ipv6FragmentHeaderSlice::from_slice(&ip.packet[l4..]).map_err(|_| Stop::Malformed)?;
        proto = fh.next_header().0;
        let id = fh.identification();
        if fh.fragment_offset().value() != 0 {
            return Ok((ip, Kind::Later { proto, id }));
        }
        if fh.more_fragments() {
            first_fragment = Some(id);
        }
        l4 += 8;
    }
    let kind = match proto {
        TCP | UDP => Kind::Flow {
            proto,
            l4,
            first_fragment,
        },
        ICMPV6 => Kind::Icmp { l4 },
        _ => return Err(Stop::NotVip),
    };
    Ok((ip, kind))
}
