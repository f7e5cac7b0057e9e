//! A Katran-style fixture table for the XDP balancer: crafted packets, each with the verdict, the
//! exact output bytes and the counter changes it must produce (and, for connection-tracking
//! rows, the flow's `CT` and `CT_NEW` entries afterwards: backend, hash, SYN sequence number,
//! flags), run through the real program with `BPF_PROG_TEST_RUN`.
//!
//! Environment: one network namespace (deleted by its guard, also on panic) with a veth pair
//! `eth0` <-> `peer0`, eth0 = 10.210.0.2/24 and fd00:210::2/64, MTU 1600, forwarding on, and
//! permanent neighbour entries with known MACs for every backend, so that `bpf_fib_lookup`
//! (which runs in the caller's namespace) finds them. Every test run happens on a thread inside
//! that namespace, with an `xdp_md` context whose ingress interface is eth0: forwarding back out
//! of eth0 is `XDP_TX`. The balancer is loaded and configured, never attached.
//!
//! Expected bytes are built here, independently of the program, with the tests' packet builder
//! ([`lb_pkt`], its own Internet checksum), and the expected backend of a new flow is
//! `table[maglev_index(flow_hash(key), size)]` over the table the agent applied. Every output
//! that goes back on the wire is also checked with an independent parser (`etherparse`): IPv4
//! header checksums, ICMP/ICMPv6 checksums, and the inner TCP/UDP checksums.
//!
//! The table runs in order: connection tracking rows depend on the rows before them, and the MTU
//! rows come last, after eth0's MTU is lowered to 1500. The balancer caches a backend's next hop
//! (and with it the MTU) for one second, so the MTU rows use VIPs whose only backends
//! (10.210.0.31, fd00:210::31) get no packet before then: their first `bpf_fib_lookup` sees the
//! new MTU.
//!
//! Run: `cargo test -p tests --test fixtures -- --nocapture` (as root).

use aya::programs::{ProgramError, TestRun, TestRunOptions};
use etherparse::{
    checksum::Sum16BitWords, EtherType, Ethernet2HeaderSlice, Icmpv4Slice, Icmpv6Slice,
    Ipv4HeaderSlice, Ipv6HeaderSlice, SingleVlanHeaderSlice, TcpSlice, UdpSlice,
};
use lb_common::{
    flow_hash, maglev_index, BackendStats, Counter, CtValue, FlowKey, VipStats, CT_F_CLOSING,
    CT_F_RESTEERED, FAMILY_V4, FAMILY_V6, SYN_RECORD_TICKS,
};
use lb_pkt::{
    self as pkt, ether_vlan as frame, frag6, icmp4, icmp6, ip4_addrs, ip4_ihl, ip6_addrs, mac_at,
    mac_str, set_ip4_checksum as fix_ip4_csum, udp as udp_seg, verdict_name, Ip4, Ip6, Mac, Tcp,
    ETH_8021AD, ETH_8021Q, ETH_ARP, ETH_IPV4 as ETH_IP, ETH_IPV6, GRE, ICMP, ICMPV6, IP4_DF as DF,
    IP4_MF as MF, IPV6_FRAG as FRAG6, TCP, TCP_ACK as ACK, TCP_FIN as FIN, TCP_PSH as PSH,
    TCP_RST as RST, TCP_SYN as SYN, UDP, XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX,
};
use lb_userspace::{
    datapath::{conntrack::now_tick, VipState},
    Balancer, Config, LoadOptions,
};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Instant;
use tests::{anyhow, require_root, NetNs};

// ---------------------------------------------------------------------------------------------
// Constants of the environment.

/// The upstream router every client packet arrives from.
const ROUTER_MAC: Mac = [0x02, 0xee, 0x00, 0x00, 0x00, 0x01];

const LB_V4: Ipv4Addr = Ipv4Addr::new(10, 210, 0, 2);
const LB_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x210, 0, 0, 0, 0, 0, 2);

/// IPv4 TCP :80 (ipip, 3 backends) and UDP :53 (ipip, 2 backends).
const VIP4: Ipv4Addr = Ipv4Addr::new(10, 210, 0, 100);
/// IPv4 TCP :80, L2 (MAC rewrite) forwarding.
const VIP4_L2: Ipv4Addr = Ipv4Addr::new(10, 210, 0, 101);
/// IPv4 TCP :80 without backends.
const VIP4_EMPTY: Ipv4Addr = Ipv4Addr::new(10, 210, 0, 102);
/// IPv4 TCP :80 whose only backend (10.210.0.31) is first used by the MTU rows.
const VIP4_MTU: Ipv4Addr = Ipv4Addr::new(10, 210, 0, 103);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x210, 0, 0, 0, 0, 0, 0x100);
const VIP6_L2: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x210, 0, 0, 0, 0, 0, 0x101);
/// IPv6 TCP :80 whose backends all have weight 0.
const VIP6_EMPTY: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x210, 0, 0, 0, 0, 0, 0x102);
const VIP6_MTU: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x210, 0, 0, 0, 0, 0, 0x103);
/// IPv4 TCP :80 (ipip) and :81 (L2) whose only backend, 10.211.0.51, is behind eth1: its
/// packets leave by another interface than they came in by (`bpf_redirect`).
const VIP4_OUT: Ipv4Addr = Ipv4Addr::new(10, 210, 0, 104);
/// The backend behind eth1 (10.211.0.0/24), its MAC 02:00:00:00:04:51.
const OUT_BACKEND: Ipv4Addr = Ipv4Addr::new(10, 211, 0, 51);

const CLIENT4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
const CLIENT4_B: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 20);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x10);
const CLIENT6_B: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x20);
const ROUTER4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const ROUTER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 1);

/// Last byte of every backend address (decimal for IPv4: 10.210.0.11; hex for IPv6: ::11).
const BACKEND_IDS: [u8; 8] = [11, 12, 13, 21, 22, 31, 41, 42];

/// 11 -> 0x11: the decimal digits of a backend number read as hex digits.
fn bcd(n: u8) -> u8 {
    ((n / 10) << 4) | (n % 10)
}

fn b4(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 210, 0, n))
}

/// fd00:210::NN, where NN is read as hex digits (b6(11) = fd00:210::11).
fn b6(n: u8) -> IpAddr {
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0x210, 0, 0, 0, 0, 0, bcd(n) as u16))
}

/// The MAC of a backend's permanent neighbour entry: 02:00:00:00:04:NN (IPv4),
/// 02:00:00:00:06:NN (IPv6).
fn mac_of(a: IpAddr) -> Mac {
    match a {
        IpAddr::V4(v) => {
            let n = v.octets()[3];
            [0x02, 0, 0, 0, 0x04, bcd(n)]
        }
        IpAddr::V6(v) => [0x02, 0, 0, 0, 0x06, v.octets()[15]],
    }
}

// ---------------------------------------------------------------------------------------------
// Packets (`lb_pkt`) as the fixture rows build them.

/// A client's IPv4 header: DF set, TTL 57, id 0x4d2e.
fn client_ip4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8) -> Ip4 {
    Ip4 {
        id: 0x4d2e,
        frag: DF,
        ttl: 57,
        ..Ip4::new(src, dst, proto)
    }
}

/// An IPv6 header (in the rows' argument order) followed by `payload`.
fn ip6(
    tc: u8,
    label: u32,
    next: u8,
    hop: u8,
    src: Ipv6Addr,
    dst: Ipv6Addr,
    payload: &[u8],
) -> Vec<u8> {
    Ip6 {
        tc,
        label,
        next,
        hop,
        src,
        dst,
    }
    .build(payload)
}

/// Client-style IP packet: IPv4 with DF and TTL 57, or IPv6 with flow label 0x54321, hop 57.
fn ip(src: IpAddr, dst: IpAddr, tos: u8, proto: u8, payload: &[u8]) -> Vec<u8> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => Ip4 {
            tos,
            ..client_ip4(s, d, proto)
        }
        .build(payload),
        (IpAddr::V6(s), IpAddr::V6(d)) => ip6(tos, 0x5_4321, proto, 57, s, d, payload),
        _ => panic!("mixed address families"),
    }
}

fn payload_bytes(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed))
        .collect()
}

/// The client's initial sequence number in every TCP segment built here, unless a row asks for
/// another one (a new connection on a reused 4-tuple).
const ISN: u32 = 0x1a2b_3c4d;
/// The initial sequence number of the second connection on a reused 4-tuple.
const ISN2: u32 = 0x7e57_0002;

/// A 20-byte TCP header without options (window 64240; an ACK carries acknowledgement number
/// 0x5e6f7081) and `payload`.
fn tcp_seg(
    src: IpAddr,
    dst: IpAddr,
    (sport, dport): (u16, u16),
    (flags, seq): (u8, u32),
    payload: &[u8],
) -> Vec<u8> {
    Tcp {
        seq,
        ack: if flags & ACK != 0 { 0x5e6f_7081 } else { 0 },
        flags,
        ..Tcp::new(sport, dport)
    }
    .build(src, dst, payload)
}

/// A flow as the client sends it.
#[derive(Clone, Copy, Debug)]
struct Flow {
    client: IpAddr,
    vip: IpAddr,
    sport: u16,
    dport: u16,
    proto: u8,
}

impl Flow {
    fn new(
        client: impl Into<IpAddr>,
        vip: impl Into<IpAddr>,
        sport: u16,
        dport: u16,
        proto: u8,
    ) -> Flow {
        Flow {
            client: client.into(),
            vip: vip.into(),
            sport,
            dport,
            proto,
        }
    }

    /// The connection-table key, built here from the documented layout (addresses as
    /// network-order bytes, IPv4 in the first four; ports as read from the packet).
    fn key(&self) -> FlowKey {
        let bytes = |a: IpAddr| {
            let mut b = [0u8; 16];
            match a {
                IpAddr::V4(v) => b[..4].copy_from_slice(&v.octets()),
                IpAddr::V6(v) => b.copy_from_slice(&v.octets()),
            }
            b
        };
        FlowKey {
            src: bytes(self.client),
            dst: bytes(self.vip),
            sport: u16::from_ne_bytes(self.sport.to_be_bytes()),
            dport: u16::from_ne_bytes(self.dport.to_be_bytes()),
            proto: self.proto,
            family: if self.client.is_ipv4() {
                FAMILY_V4
            } else {
                FAMILY_V6
            },
            _pad: [0; 2],
        }
    }

    /// The key of a later fragment: addresses and protocol only (no ports in the packet).
    fn fragment_key(&self) -> FlowKey {
        FlowKey {
            sport: 0,
            dport: 0,
            ..self.key()
        }
    }

    /// The layer-4 segment client -> VIP with `len` payload bytes (TCP `flags` ignored for UDP).
    fn segment(&self, flags: u8, len: usize) -> Vec<u8> {
        self.segment_seq(flags, ISN, len)
    }

    /// Like [`Flow::segment`], with sequence number `seq` (TCP).
    fn segment_seq(&self, flags: u8, seq: u32, len: usize) -> Vec<u8> {
        let data = payload_bytes(len, self.sport as u8);
        match self.proto {
            TCP => tcp_seg(
                self.client,
                self.vip,
                (self.sport, self.dport),
                (flags, seq),
                &data,
            ),
            UDP => udp_seg(self.client, self.vip, self.sport, self.dport, &data),
            p => panic!("no segment for protocol {p}"),
        }
    }

    /// The IP packet client -> VIP.
    fn packet(&self, tos: u8, flags: u8, len: usize) -> Vec<u8> {
        // After the SYN, the client's next sequence number is its ISN plus one.
        let seq = if flags & SYN != 0 {
            ISN
        } else {
            ISN.wrapping_add(1)
        };
        self.packet_seq(tos, flags, seq, len)
    }

    /// The IP packet client -> VIP with TCP sequence number `seq`.
    fn packet_seq(&self, tos: u8, flags: u8, seq: u32, len: usize) -> Vec<u8> {
        ip(
            self.client,
            self.vip,
            tos,
            self.proto,
            &self.segment_seq(flags, seq, len),
        )
    }

    /// The connection-table value this flow should have: backend `id`, the flow hash, the SYN's
    /// sequence number as read from the packet (network order; 0: opened by another packet or
    /// UDP) and `CT_F_*` flags.
    fn ct(&self, id: u32, syn_seq: u32, flags: u32) -> CtValue {
        CtValue {
            backend: id,
            hash: flow_hash(&self.key()),
            syn_seq: u32::from_ne_bytes(syn_seq.to_be_bytes()),
            flags,
            last_seen: 0,
            touched: 0,
        }
    }

    /// The IP packet VIP -> client (the backend's answer, what an ICMP error quotes).
    fn reply(&self, len: usize) -> Vec<u8> {
        let data = payload_bytes(len, 0x5a);
        let seg = match self.proto {
            TCP => tcp_seg(
                self.vip,
                self.client,
                (self.dport, self.sport),
                (ACK | PSH, ISN),
                &data,
            ),
            _ => udp_seg(self.vip, self.client, self.dport, self.sport, &data),
        };
        ip(self.vip, self.client, 0, self.proto, &seg)
    }
}

// ---------------------------------------------------------------------------------------------
// Independent checker of output packets (etherparse).

/// Verifies every checksum of a frame that goes back on the wire; returns what it checked.
fn verify_checksums(f: &[u8]) -> Result<Vec<&'static str>, String> {
    let mut done = Vec::new();
    let eth = Ethernet2HeaderSlice::from_slice(f).map_err(|e| format!("ethernet: {e}"))?;
    let mut et = eth.ether_type();
    let mut rest = &f[14..];
    if et == EtherType::VLAN_TAGGED_FRAME {
        let v = SingleVlanHeaderSlice::from_slice(rest).map_err(|e| format!("802.1Q: {e}"))?;
        et = v.ether_type();
        rest = &rest[4..];
        done.push("vlan");
    }
    match et {
        EtherType::IPV4 => check_ip4(rest, false, &mut done)?,
        EtherType::IPV6 => check_ip6(rest, false, &mut done)?,
        other => return Err(format!("unexpected ethertype {other:?}")),
    }
    Ok(done)
}

fn check_ip4(p: &[u8], quoted: bool, done: &mut Vec<&'static str>) -> Result<(), String> {
    let h = Ipv4HeaderSlice::from_slice(p).map_err(|e| format!("IPv4 header: {e}"))?;
    let want = h.to_header().calc_header_checksum();
    if want != h.header_checksum() {
        return Err(format!(
            "IPv4 header checksum {:#06x}, should be {want:#06x} ({} -> {})",
            h.header_checksum(),
            h.source_addr(),
            h.destination_addr()
        ));
    }
    if quoted {
        done.push("quoted-ipv4");
        return Ok(());
    }
    done.push("ipv4");
    let total = h.total_len() as usize;
    if total > p.len() {
        return Err(format!(
            "IPv4 total length {total} beyond the {} bytes left",
            p.len()
        ));
    }
    let payload = &p[h.slice().len()..total];
    if h.is_fragmenting_payload() {
        done.push("fragment");
        return Ok(());
    }
    match h.protocol().0 {
        4 => check_ip4(payload, false, done),
        41 => check_ip6(payload, false, done),
        TCP => {
            let t = TcpSlice::from_slice(payload).map_err(|e| format!("TCP: {e}"))?;
            let want = t
                .calc_checksum_ipv4(h.source(), h.destination())
                .map_err(|e| format!("TCP: {e}"))?;
            if want != t.checksum() {
                return Err(format!(
                    "TCP checksum {:#06x}, should be {want:#06x}",
                    t.checksum()
                ));
            }
            done.push("tcp");
            Ok(())
        }
        UDP => {
            let u = UdpSlice::from_slice(payload).map_err(|e| format!("UDP: {e}"))?;
            let want = u
                .to_header()
                .calc_checksum_ipv4_raw(h.source(), h.destination(), u.payload())
                .map_err(|e| format!("UDP: {e}"))?;
            if want != u.checksum() {
                return Err(format!(
                    "UDP checksum {:#06x}, should be {want:#06x}",
                    u.checksum()
                ));
            }
            done.push("udp");
            Ok(())
        }
        ICMP => {
            if Sum16BitWords::new().add_slice(payload).ones_complement() != 0 {
                return Err("ICMP checksum does not verify".into());
            }
            done.push("icmp");
            let i = Icmpv4Slice::from_slice(payload).map_err(|e| format!("ICMP: {e}"))?;
            if i.type_u8() == 3 {
                check_ip4(i.payload(), true, done)?;
            }
            Ok(())
        }
        p => Err(format!("unexpected IPv4 protocol {p}")),
    }
}

fn check_ip6(p: &[u8], quoted: bool, done: &mut Vec<&'static str>) -> Result<(), String> {
    let h = Ipv6HeaderSlice::from_slice(p).map_err(|e| format!("IPv6 header: {e}"))?;
    if quoted {
        done.push("quoted-ipv6");
        return Ok(());
    }
    done.push("ipv6");
    let end = 40 + h.payload_length() as usize;
    if end > p.len() {
        return Err(format!(
            "IPv6 payload length {} beyond the {} bytes left",
            h.payload_length(),
            p.len() - 40
        ));
    }
    let payload = &p[40..end];
    match h.next_header().0 {
        41 => check_ip6(payload, false, done),
        FRAG6 => {
            done.push("fragment");
            Ok(())
        }
        TCP => {
            let t = TcpSlice::from_slice(payload).map_err(|e| format!("TCP: {e}"))?;
            let want = t
                .calc_checksum_ipv6(h.source(), h.destination())
                .map_err(|e| format!("TCP: {e}"))?;
            if want != t.checksum() {
                return Err(format!(
                    "TCP checksum {:#06x}, should be {want:#06x}",
                    t.checksum()
                ));
            }
            done.push("tcp");
            Ok(())
        }
        UDP => {
            let u = UdpSlice::from_slice(payload).map_err(|e| format!("UDP: {e}"))?;
            let want = u
                .to_header()
                .calc_checksum_ipv6_raw(h.source(), h.destination(), u.payload())
                .map_err(|e| format!("UDP: {e}"))?;
            if want != u.checksum() {
                return Err(format!(
                    "UDP checksum {:#06x}, should be {want:#06x}",
                    u.checksum()
                ));
            }
            done.push("udp");
            Ok(())
        }
        ICMPV6 => {
            let i = Icmpv6Slice::from_slice(payload).map_err(|e| format!("ICMPv6: {e}"))?;
            if !i.is_checksum_valid(h.source(), h.destination()) {
                return Err(format!(
                    "ICMPv6 checksum {:#06x} does not verify",
                    i.checksum()
                ));
            }
            done.push("icmpv6");
            if i.type_u8() == 2 {
                check_ip6(i.payload(), true, done)?;
            }
            Ok(())
        }
        n => Err(format!("unexpected IPv6 next header {n}")),
    }
}

// ---------------------------------------------------------------------------------------------
// Environment.

/// The fixture configuration; `v4_tcp` lists the IPv4 TCP VIP's backends (10.210.0.N, weight).
fn config_text(v4_tcp: &[(u8, u32)]) -> String {
    fn vip(
        t: &mut String,
        addr: IpAddr,
        port: u16,
        proto: &str,
        fwd: &str,
        size: u32,
        backends: &[(IpAddr, u32)],
    ) {
        writeln!(
            t,
            "\n[[vip]]\naddress = \"{addr}\"\nport = {port}\nprotocol = \"{proto}\"\nforwarding = \"{fwd}\"\ntable_size = {size}"
        )
        .unwrap();
        for (a, w) in backends {
            writeln!(t, "[[vip.backend]]\naddress = \"{a}\"\nweight = {w}").unwrap();
        }
    }
    let mut t = format!(
        "interface = \"eth0\"\ntable_pool = {}\n[encap]\nsource_v4 = \"{LB_V4}\"\nsource_v6 = \"{LB_V6}\"\n",
        1u32 << 20
    );
    let v4_tcp: Vec<(IpAddr, u32)> = v4_tcp.iter().map(|&(n, w)| (b4(n), w)).collect();
    vip(&mut t, VIP4.into(), 80, "tcp", "ipip", 65_537, &v4_tcp);
    vip(
        &mut t,
        VIP4.into(),
        53,
        "udp",
        "ipip",
        1021,
        &[(b4(11), 1), (b4(12), 1)],
    );
    vip(
        &mut t,
        VIP6.into(),
        80,
        "tcp",
        "ipip",
        65_537,
        &[(b6(11), 1), (b6(12), 1), (b6(13), 1)],
    );
    vip(
        &mut t,
        VIP6.into(),
        53,
        "udp",
        "ipip",
        1021,
        &[(b6(11), 1), (b6(12), 1)],
    );
    vip(
        &mut t,
        VIP4_L2.into(),
        80,
        "tcp",
        "l2",
        1021,
        &[(b4(21), 1), (b4(22), 1)],
    );
    vip(
        &mut t,
        VIP6_L2.into(),
        80,
        "tcp",
        "l2",
        1021,
        &[(b6(21), 1), (b6(22), 1)],
    );
    vip(&mut t, VIP4_EMPTY.into(), 80, "tcp", "ipip", 1021, &[]);
    vip(
        &mut t,
        VIP6_EMPTY.into(),
        80,
        "tcp",
        "ipip",
        1021,
        &[(b6(41), 0), (b6(42), 0)],
    );
    vip(
        &mut t,
        VIP4_MTU.into(),
        80,
        "tcp",
        "ipip",
        1021,
        &[(b4(31), 1)],
    );
    vip(
        &mut t,
        VIP6_MTU.into(),
        80,
        "tcp",
        "ipip",
        1021,
        &[(b6(31), 1)],
    );
    let out: IpAddr = OUT_BACKEND.into();
    vip(
        &mut t,
        VIP4_OUT.into(),
        80,
        "tcp",
        "ipip",
        1021,
        &[(out, 1)],
    );
    vip(&mut t, VIP4_OUT.into(), 81, "tcp", "l2", 1021, &[(out, 1)]);
    t
}

fn config(v4_tcp: &[(u8, u32)]) -> Config {
    let text = config_text(v4_tcp);
    Config::parse(&text).unwrap_or_else(|e| panic!("fixture config is invalid: {e}\n{text}"))
}

/// The namespace, the loaded balancer, and what the rows need to know about them.
struct Env {
    // Dropped first: the balancer holds no reference to the namespace.
    lb: Balancer,
    ns: NetNs,
    ifindex: u32,
    mac: Mac,
    /// eth1's MAC: the source of frames redirected to [`OUT_BACKEND`].
    eth1_mac: Mac,
    /// Source ports of two IPv4 TCP flows that the first table gives to 10.210.0.11.
    f1_sport: u16,
    f2_sport: u16,
    /// Source port of an IPv4 TCP flow that the first table gives to 10.210.0.13.
    f3_sport: u16,
    /// Source ports of two more IPv4 TCP flows the first table gives to 10.210.0.11 (tuple
    /// reuse: flow 4 established, flow 5 in the new-flow table only).
    f4_sport: u16,
    f5_sport: u16,
    /// Source port of another IPv4 TCP flow the first table gives to 10.210.0.13 (a SYN-only
    /// flow re-steered when .13 is retired).
    f6_sport: u16,
    /// The id of 10.210.0.13 on the IPv4 TCP VIP in the first configuration.
    id13: u32,
}

impl Env {
    fn new() -> anyhow::Result<Env> {
        let ns = NetNs::new("fixtures")?;
        ns.ip([
            "link", "add", "eth0", "mtu", "1600", "type", "veth", "peer", "name", "peer0", "mtu",
            "1600",
        ])?;
        ns.ip(["addr", "add", "10.210.0.2/24", "dev", "eth0"])?;
        ns.ip([
            "-6",
            "addr",
            "add",
            "fd00:210::2/64",
            "dev",
            "eth0",
            "nodad",
        ])?;
        // A second interface: the way to OUT_BACKEND, so its packets are redirected.
        ns.ip([
            "link", "add", "eth1", "mtu", "1600", "type", "veth", "peer", "name", "peer1", "mtu",
            "1600",
        ])?;
        ns.ip(["addr", "add", "10.211.0.2/24", "dev", "eth1"])?;
        for dev in ["lo", "eth0", "peer0", "eth1", "peer1"] {
            ns.ip(["link", "set", dev, "up"])?;
        }
        ns.ip([
            "neigh",
            "replace",
            &OUT_BACKEND.to_string(),
            "lladdr",
            &mac_str(&mac_of(OUT_BACKEND.into())),
            "dev",
            "eth1",
            "nud",
            "permanent",
        ])?;
        ns.exec_ok(
            "sysctl",
            [
                "-qw",
                "net.ipv4.conf.all.forwarding=1",
                "net.ipv4.conf.eth1.forwarding=1",
                "net.ipv4.conf.eth0.forwarding=1",
                "net.ipv6.conf.all.forwarding=1",
                "net.ipv6.conf.eth0.forwarding=1",
            ],
        )?;
        for n in BACKEND_IDS {
            for a in [b4(n), b6(n)] {
                ns.ip([
                    "neigh",
                    "replace",
                    &a.to_string(),
                    "lladdr",
                    &mac_str(&mac_of(a)),
                    "dev",
                    "eth0",
                    "nud",
                    "permanent",
                ])?;
            }
        }
        let ifindex: u32 = ns
            .exec_ok("cat", ["/sys/class/net/eth0/ifindex"])?
            .trim()
            .parse()?;
        let mac_text = ns.exec_ok("cat", ["/sys/class/net/eth0/address"])?;
        let octets: Vec<u8> = mac_text
            .trim()
            .split(':')
            .map(|x| u8::from_str_radix(x, 16))
            .collect::<Result<_, _>>()?;
        let mac: Mac = octets
            .try_into()
            .map_err(|_| anyhow::anyhow!("eth0 MAC {mac_text:?}"))?;
        let eth1_text = ns.exec_ok("cat", ["/sys/class/net/eth1/address"])?;
        let eth1_mac: Mac = eth1_text
            .trim()
            .split(':')
            .map(|x| u8::from_str_radix(x, 16))
            .collect::<Result<Vec<u8>, _>>()?
            .try_into()
            .map_err(|_| anyhow::anyhow!("eth1 MAC {eth1_text:?}"))?;

        let mut lb = Balancer::load(LoadOptions {
            pin_dir: None,
            table_pool: 1 << 20,
            conntrack_size: 4096,
            conntrack_new_size: 4096,
        })?;
        lb.apply(&config(&[(11, 1), (12, 1), (13, 1)]))?;
        let mut env = Env {
            lb,
            ns,
            ifindex,
            mac,
            eth1_mac,
            f1_sport: 0,
            f2_sport: 0,
            f3_sport: 0,
            f4_sport: 0,
            f5_sport: 0,
            f6_sport: 0,
            id13: 0,
        };
        let id11 = env.id11();
        let on_11 = (40_000u16..41_000)
            .filter(|&p| env.maglev(&Flow::new(CLIENT4, VIP4, p, 80, TCP)) == id11);
        let ports: Vec<u16> = on_11.take(4).collect();
        assert_eq!(ports.len(), 4, "four flows on 10.210.0.11");
        env.f1_sport = ports[0];
        env.f2_sport = ports[1];
        env.f4_sport = ports[2];
        env.f5_sport = ports[3];
        let id13 = env.id_of(VIP4.into(), 80, TCP, b4(13));
        let ports: Vec<u16> = (41_000u16..42_000)
            .filter(|&p| env.maglev(&Flow::new(CLIENT4, VIP4, p, 80, TCP)) == id13)
            .take(2)
            .collect();
        assert_eq!(ports.len(), 2, "two flows on 10.210.0.13");
        env.f3_sport = ports[0];
        env.f6_sport = ports[1];
        env.id13 = id13;
        Ok(env)
    }

    fn vip(&self, addr: IpAddr, port: u16, proto: u8) -> &VipState {
        self.lb
            .vips()
            .find(|v| {
                v.config.address == addr
                    && v.config.port == port
                    && v.config.protocol.number() == proto
            })
            .unwrap_or_else(|| panic!("no VIP {addr}:{port}/{proto}"))
    }

    /// The backend the VIP's current table gives a new flow.
    fn maglev(&self, f: &Flow) -> u32 {
        let t = &self.vip(f.vip, f.dport, f.proto).table;
        t[maglev_index(flow_hash(&f.key()), t.len() as u32) as usize]
    }

    fn id_of(&self, vip: IpAddr, port: u16, proto: u8, backend: IpAddr) -> u32 {
        self.vip(vip, port, proto)
            .backends
            .iter()
            .find(|b| b.address == backend)
            .unwrap_or_else(|| panic!("no backend {backend} on {vip}:{port}"))
            .id
    }

    /// Address and VIP statistics index of backend `id`.
    fn backend(&self, id: u32) -> (IpAddr, u32) {
        self.lb
            .vips()
            .find_map(|v| {
                v.backends
                    .iter()
                    .find(|b| b.id == id)
                    .map(|b| (b.address, v.vip_id))
            })
            .unwrap_or_else(|| panic!("no backend id {id}"))
    }

    fn id11(&self) -> u32 {
        self.id_of(VIP4.into(), 80, TCP, b4(11))
    }

    fn f1(&self) -> Flow {
        Flow::new(CLIENT4, VIP4, self.f1_sport, 80, TCP)
    }

    fn f2(&self) -> Flow {
        Flow::new(CLIENT4, VIP4, self.f2_sport, 80, TCP)
    }

    fn f3(&self) -> Flow {
        Flow::new(CLIENT4, VIP4, self.f3_sport, 80, TCP)
    }

    fn f4(&self) -> Flow {
        Flow::new(CLIENT4, VIP4, self.f4_sport, 80, TCP)
    }

    fn f5(&self) -> Flow {
        Flow::new(CLIENT4, VIP4, self.f5_sport, 80, TCP)
    }

    fn f6(&self) -> Flow {
        Flow::new(CLIENT4, VIP4, self.f6_sport, 80, TCP)
    }

    fn id_v4(&self, n: u8) -> u32 {
        self.id_of(VIP4.into(), 80, TCP, b4(n))
    }

    /// What a connection on `f`'s 4-tuple left behind `quiet_s` seconds ago: its `CT` entry
    /// (backend `id`, `flags`) and the `CT_NEW` copy its promotion left.
    fn old_entries(&mut self, f: &Flow, id: u32, flags: u32, quiet_s: u64) {
        let ticks = ((quiet_s * 1_000_000_000) >> lb_common::CT_TICK_SHIFT) as u32;
        let then = now_tick().wrapping_sub(ticks);
        let at = |flags| CtValue {
            last_seen: then,
            touched: 1,
            ..f.ct(id, 0, flags)
        };
        self.lb
            .set_conntrack_entries(&f.key(), Some(at(flags)), Some(at(0)))
            .expect("writing the connection tables");
    }

    /// A frame from the router to eth0 carrying `ip`.
    fn frame_in(&self, vlan: Option<u16>, ip: &[u8]) -> Vec<u8> {
        let et = if ip[0] >> 4 == 6 { ETH_IPV6 } else { ETH_IP };
        frame(self.mac, ROUTER_MAC, vlan, et, ip)
    }

    /// `inner` encapsulated towards backend `id`: outer Ethernet to the backend's MAC from eth0,
    /// outer IPv4 (tos copied, id 0, DF, TTL 64, proto 4) or IPv6 (traffic class copied, flow
    /// label from the flow hash of `key`, next header 41, hop limit 64) from the encap source.
    fn ipip(&self, id: u32, vlan: Option<u16>, inner: &[u8], key: &FlowKey) -> Vec<u8> {
        let (addr, _) = self.backend(id);
        match addr {
            IpAddr::V4(b) => {
                let mut h = client_ip4(LB_V4, b, 4);
                h.tos = inner[1];
                h.id = 0;
                h.frag = DF;
                h.ttl = 64;
                frame(mac_of(addr), self.mac, vlan, ETH_IP, &h.build(inner))
            }
            IpAddr::V6(b) => {
                let tc = ((inner[0] & 0x0f) << 4) | (inner[1] >> 4);
                let label = flow_hash(key) & 0xf_ffff;
                frame(
                    mac_of(addr),
                    self.mac,
                    vlan,
                    ETH_IPV6,
                    &ip6(tc, label, 41, 64, LB_V6, b, inner),
                )
            }
        }
    }

    /// L2 forwarding: only the MACs change (to the backend's, from eth0's).
    fn l2(&self, id: u32, input: &[u8]) -> Vec<u8> {
        let (addr, _) = self.backend(id);
        let mut out = input.to_vec();
        out[0..6].copy_from_slice(&mac_of(addr));
        out[6..12].copy_from_slice(&self.mac);
        out
    }

    /// `frame` (from this namespace, untagged) as it leaves by eth1: eth1's source MAC.
    fn leaving_by_eth1(&self, mut frame: Vec<u8>) -> Vec<u8> {
        frame[6..12].copy_from_slice(&self.eth1_mac);
        frame
    }
}

fn l3_offset(vlan: Option<u16>) -> usize {
    if vlan.is_some() {
        18
    } else {
        14
    }
}

/// The input rewritten into ICMP "fragmentation needed" (3/4) from the VIP to the client: MACs
/// swapped, VLAN tag kept, IPv4 (tos 0, id 0, no flags, TTL 64), next-hop MTU `mtu`, quoting the
/// original IP header and 8 bytes of payload.
fn too_big4(input: &[u8], vlan: Option<u16>, mtu: u16) -> Vec<u8> {
    let orig = &input[l3_offset(vlan)..];
    let ihl = ip4_ihl(orig);
    let (client, vip) = ip4_addrs(orig);
    let m = mtu.to_be_bytes();
    let icmp = icmp4(3, 4, [0, 0, m[0], m[1]], &orig[..ihl + 8]);
    let mut h = client_ip4(vip, client, ICMP);
    h.id = 0;
    h.frag = 0;
    h.ttl = 64;
    frame(
        mac_at(input, 6),
        mac_at(input, 0),
        vlan,
        ETH_IP,
        &h.build(&icmp),
    )
}

/// The input rewritten into ICMPv6 "packet too big" (type 2) from the VIP to the client: MACs
/// swapped, IPv6 (traffic class 0, flow label 0, hop limit 64), MTU `mtu`, quoting the first
/// 128 bytes of the original packet.
fn too_big6(input: &[u8], vlan: Option<u16>, mtu: u32) -> Vec<u8> {
    let orig = &input[l3_offset(vlan)..];
    let ip_len = 40 + pkt::ip6_payload_len(orig);
    let (client, vip) = ip6_addrs(orig);
    let icmp = icmp6(
        vip,
        client,
        2,
        0,
        mtu.to_be_bytes(),
        &orig[..ip_len.min(128)],
    );
    frame(
        mac_at(input, 6),
        mac_at(input, 0),
        vlan,
        ETH_IPV6,
        &ip6(0, 0, ICMPV6, 64, vip, client, &icmp),
    )
}

// ---------------------------------------------------------------------------------------------
// Fixtures.

/// One row: the packet and everything it must produce.
struct Case {
    input: Vec<u8>,
    /// The kernel must refuse to run the program on this input (EINVAL): frames shorter than
    /// an Ethernet header never reach XDP, so the program's own check for them is unreachable.
    refused: bool,
    verdict: u32,
    output: Vec<u8>,
    /// Expected counter deltas; every other counter must not move.
    counters: Vec<(Counter, u64)>,
    /// Expected statistics delta of one backend; every other backend's must be zero.
    backend: Option<(u32, BackendStats)>,
    /// Expected statistics delta of one VIP; every other VIP's must be zero.
    vip: Option<(u32, VipStats)>,
    /// Expected connection-table entries after the packet: (flow, `CT`, `CT_NEW`).
    tables: Vec<(Flow, Option<CtValue>, Option<CtValue>)>,
}

impl Case {
    fn new(input: Vec<u8>, verdict: u32, output: Vec<u8>) -> Case {
        Case {
            input,
            refused: false,
            verdict,
            output,
            counters: Vec::new(),
            backend: None,
            vip: None,
            tables: Vec::new(),
        }
    }

    /// After the packet, `f`'s entries in `CT` and `CT_NEW` must be these (`None`: absent).
    fn tables(mut self, f: &Flow, ct: Option<CtValue>, ct_new: Option<CtValue>) -> Case {
        self.tables.push((*f, ct, ct_new));
        self
    }

    fn tx(input: Vec<u8>, output: Vec<u8>) -> Case {
        Case::new(input, XDP_TX, output)
    }

    /// Passed to the kernel byte for byte, `counter` +1.
    fn pass(input: Vec<u8>, counter: Counter) -> Case {
        let output = input.clone();
        Case::new(input, XDP_PASS, output).count(counter)
    }

    fn count(mut self, c: Counter) -> Case {
        self.counters.push((c, 1));
        self
    }

    /// Forwarded to backend `id`: its packets +1, bytes + frame length (and the VIP's), plus
    /// new_flows +1 if the packet opened the flow.
    fn to(mut self, e: &Env, id: u32, new_flow: bool) -> Case {
        let len = self.input.len() as u64;
        let (_, vip_id) = e.backend(id);
        self.backend = Some((
            id,
            BackendStats {
                packets: 1,
                bytes: len,
                new_flows: new_flow as u64,
                ..Default::default()
            },
        ));
        self.vip = Some((
            vip_id,
            VipStats {
                packets: 1,
                bytes: len,
                new_flows: new_flow as u64,
                no_backend: 0,
            },
        ));
        self
    }

    /// A new flow whose first packet was answered with ICMP instead of being forwarded.
    fn opened_only(mut self, e: &Env, id: u32) -> Case {
        let (_, vip_id) = e.backend(id);
        self.backend = Some((
            id,
            BackendStats {
                new_flows: 1,
                ..Default::default()
            },
        ));
        self.vip = Some((
            vip_id,
            VipStats {
                new_flows: 1,
                ..Default::default()
            },
        ));
        self
    }

    fn backend_also(mut self, f: impl FnOnce(&mut BackendStats)) -> Case {
        f(&mut self.backend.as_mut().expect("backend expectation first").1);
        self
    }

    fn vip_stats(mut self, vip_id: u32, s: VipStats) -> Case {
        self.vip = Some((vip_id, s));
        self
    }
}

enum Step {
    /// A fixture row: description and the function that builds its case (just before it runs,
    /// from the current tables).
    Packet(&'static str, fn(&Env) -> Case),
    /// A change to the environment between rows.
    Do(&'static str, fn(&mut Env)),
}

use Counter::*;
use Step::{Do, Packet};

fn table() -> Vec<Step> {
    vec![
        // ---- IPv4 TCP VIP (ipip): connection tracking. ----
        // While no table changes (no apply changed one yet), a SYN makes no table entry.
        Packet("IPv4 TCP SYN to 10.210.0.100:80 (tos 0xb8): new flow -> IPIP to its Maglev backend, no table entry (no table is changing: the SYN cache holds it)", |e| {
            let f = e.f1();
            let ip = f.packet(0xb8, SYN, 0);
            let id = e.maglev(&f);
            assert_eq!(id, e.id11(), "precondition: flow 1 maps to 10.210.0.11");
            Case::tx(e.frame_in(None, &ip), e.ipip(id, None, &ip, &f.key()))
                .count(CtNew)
                .to(e, id, true)
                .tables(&f, None, None)
        }),
        Packet("IPv4 TCP SYN retransmit, same sequence number (found in the SYN cache) -> same backend, syn_retries +1, still no entry", |e| {
            let f = e.f1();
            let ip = f.packet(0xb8, SYN, 0);
            let id = e.id11();
            Case::tx(e.frame_in(None, &ip), e.ipip(id, None, &ip, &f.key()))
                .to(e, id, false)
                .backend_also(|s| s.syn_retries = 1)
                .tables(&f, None, None)
        }),
        Packet("IPv4 TCP ACK (the handshake's: sequence number ISN + 1) -> the SYN's backend, straight into CT from the SYN cache (SYN sequence number kept)", |e| {
            let f = e.f1();
            let ip = f.packet(0xb8, ACK, 0);
            let id = e.id11();
            Case::tx(e.frame_in(None, &ip), e.ipip(id, None, &ip, &f.key()))
                .count(CtPromoted)
                .to(e, id, false)
                .tables(&f, Some(f.ct(id, ISN, 0)), None)
        }),
        Packet("IPv4 TCP SYN of flow 3 -> its Maglev backend 10.210.0.13", |e| {
            let f = e.f3();
            let ip = f.packet(0, SYN, 0);
            let id = e.maglev(&f);
            assert_eq!(id, e.id_v4(13), "precondition");
            Case::tx(e.frame_in(None, &ip), e.ipip(id, None, &ip, &f.key()))
                .count(CtNew)
                .to(e, id, true)
        }),
        Packet("IPv4 TCP ACK of flow 3 -> same backend, promoted", |e| {
            let f = e.f3();
            let ip = f.packet(0, ACK, 0);
            let id = e.maglev(&f);
            Case::tx(e.frame_in(None, &ip), e.ipip(id, None, &ip, &f.key()))
                .count(CtPromoted)
                .to(e, id, false)
        }),
        Packet("IPv4 TCP SYN of flow 4 -> 10.210.0.11", |e| {
            let f = e.f4();
            let ip = f.packet(0, SYN, 0);
            let id = e.maglev(&f);
            assert_eq!(id, e.id11(), "precondition: flow 4 maps to 10.210.0.11");
            Case::tx(e.frame_in(None, &ip), e.ipip(id, None, &ip, &f.key()))
                .count(CtNew)
                .to(e, id, true)
        }),
        Packet("IPv4 TCP ACK of flow 4 -> 10.210.0.11, into CT from the SYN cache (flow 4 is established)", |e| {
            let f = e.f4();
            let ip = f.packet(0, ACK, 0);
            let id = e.id11();
            Case::tx(e.frame_in(None, &ip), e.ipip(id, None, &ip, &f.key()))
                .count(CtPromoted)
                .to(e, id, false)
                .tables(&f, Some(f.ct(id, ISN, 0)), None)
        }),
        Do("arm SYN recording, as apply does before it writes a changed table (from here on SYNs are recorded in CT_NEW)", |e| {
            e.lb.set_syn_recording(SYN_RECORD_TICKS).expect("arming SYN recording");
        }),
        Packet("IPv4 TCP SYN of flow 5 -> 10.210.0.11 (flow 5 stays in CT_NEW: no answer yet)", |e| {
            let f = e.f5();
            let ip = f.packet(0, SYN, 0);
            let id = e.maglev(&f);
            assert_eq!(id, e.id11(), "precondition: flow 5 maps to 10.210.0.11");
            Case::tx(e.frame_in(None, &ip), e.ipip(id, None, &ip, &f.key()))
                .count(CtNew)
                .to(e, id, true)
                .tables(&f, None, Some(f.ct(id, ISN, 0)))
        }),
        Packet("IPv4 TCP SYN of flow 6 -> 10.210.0.13 (flow 6 stays in CT_NEW)", |e| {
            let f = e.f6();
            let ip = f.packet(0, SYN, 0);
            let id = e.maglev(&f);
            assert_eq!(id, e.id_v4(13), "precondition: flow 6 maps to 10.210.0.13");
            Case::tx(e.frame_in(None, &ip), e.ipip(id, None, &ip, &f.key()))
                .count(CtNew)
                .to(e, id, true)
                .tables(&f, None, Some(f.ct(id, ISN, 0)))
        }),
        Do("re-apply with 10.210.0.11 at weight 0 on 10.210.0.100:80/tcp (its slots move to .12/.13)", |e| {
            e.lb.apply(&config(&[(11, 0), (12, 1), (13, 1)])).expect("re-apply");
        }),
        Packet("IPv4 TCP ACK+data of the established flow after the re-apply -> still its tracked backend 10.210.0.11", |e| {
            let f = e.f1();
            let id = e.id11();
            assert_ne!(e.maglev(&f), id, "precondition: the new table sends flow 1 elsewhere");
            assert_eq!(e.lb.tracked_backend(&f.key()), Some(id), "precondition: flow 1 is tracked");
            let ip = f.packet(0, ACK | PSH, 100);
            Case::tx(e.frame_in(None, &ip), e.ipip(id, None, &ip, &f.key())).to(e, id, false)
        }),
        Packet("IPv4 TCP SYN of a new flow the old table gave to .11 -> the new table's backend", |e| {
            let f = e.f2();
            let id = e.maglev(&f);
            assert_ne!(id, e.id11(), "precondition: the new table has no slot for .11");
            let ip = f.packet(0, SYN, 0);
            Case::tx(e.frame_in(None, &ip), e.ipip(id, None, &ip, &f.key()))
                .count(CtNew)
                .to(e, id, true)
        }),
        Packet("IPv4 TCP RST+ACK on the established flow -> tracked backend, client_rsts +1", |e| {
            let f = e.f1();
            let id = e.id11();
            let ip = f.packet(0, RST | ACK, 0);
            Case::tx(e.frame_in(None, &ip), e.ipip(id, None, &ip, &f.key()))
                .to(e, id, false)
                .backend_also(|s| s.client_rsts = 1)
        }),
        // ---- Tuple reuse: the client's ports wrap, a new connection arrives on an old 4-tuple. ----
        Packet("IPv4 TCP SYN of flow 5 again, same sequence number (a retry) after the re-apply -> still .11 from CT_NEW, syn_retries +1", |e| {
            let f = e.f5();
            let id = e.id11();
            assert_ne!(e.maglev(&f), id, "precondition: the new table sends flow 5 elsewhere");
            let ip = f.packet(0, SYN, 0);
            Case::tx(e.frame_in(None, &ip), e.ipip(id, None, &ip, &f.key()))
                .to(e, id, false)
                .backend_also(|s| s.syn_retries = 1)
                .tables(&f, None, Some(f.ct(id, ISN, 0)))
        }),
        Packet("IPv4 TCP SYN on flow 5's 4-tuple with another sequence number (new connection, tuple in CT_NEW) -> the current table's backend, a new flow (ct_new, new_flows), no syn_retries; CT_NEW overwritten", |e| {
            let f = e.f5();
            let id = e.maglev(&f);
            assert_ne!(id, e.id11(), "precondition: the new table has no slot for .11");
            let ip = f.packet_seq(0, SYN, ISN2, 0);
            Case::tx(e.frame_in(None, &ip), e.ipip(id, None, &ip, &f.key()))
                .count(CtNew)
                .to(e, id, true)
                .tables(&f, None, Some(f.ct(id, ISN2, 0)))
        }),
        Do("rebuild the tracked-flow filter from CT, as lbd's scans do: flow 4's tuple is in it (its SYN probes CT), a tuple CT does not hold is not (its SYN skips the probe)", |e| {
            let r = e.lb.conntrack_reader();
            let fill = r.rebuild_filter().expect("rebuilding the filter").expect("no other rebuild runs");
            assert!(fill.bits_set > 0 && fill.bits_set < 200, "two bits a flow: {fill:?}");
            assert!(r.filter().may_be_tracked(&e.f4().key()), "flow 4 is in CT");
            let unknown = Flow::new(CLIENT4, VIP4, 40_999, 80, TCP);
            assert!(!r.filter().may_be_tracked(&unknown.key()), "flow 40_999 is not in CT");
        }),
        Packet("IPv4 TCP SYN on established flow 4's 4-tuple (new connection, tuple in CT) -> CT entry deleted, the current table's backend, a new flow recorded in CT_NEW", |e| {
            let f = e.f4();
            let id = e.maglev(&f);
            assert_ne!(id, e.id11(), "precondition: the new table has no slot for .11");
            assert_eq!(e.lb.conntrack_entries(&f.key()).0.map(|v| v.backend), Some(e.id11()), "precondition: flow 4 established on .11");
            let ip = f.packet_seq(0, SYN, ISN2, 0);
            Case::tx(e.frame_in(None, &ip), e.ipip(id, None, &ip, &f.key()))
                .count(CtNew)
                .to(e, id, true)
                .tables(&f, None, Some(f.ct(id, ISN2, 0)))
        }),
        Packet("IPv4 TCP ACK of the new connection on flow 4's 4-tuple -> its new backend, promoted", |e| {
            let f = e.f4();
            let id = e.maglev(&f);
            let ip = f.packet_seq(0, ACK, ISN2.wrapping_add(1), 0);
            Case::tx(e.frame_in(None, &ip), e.ipip(id, None, &ip, &f.key()))
                .count(CtPromoted)
                .to(e, id, false)
                .tables(&f, Some(f.ct(id, ISN2, 0)), Some(f.ct(id, ISN2, 0)))
        }),
        Do("re-apply without 10.210.0.13 on 10.210.0.100:80/tcp (its backend id is retired)", |e| {
            e.lb.apply(&config(&[(11, 0), (12, 1)])).expect("re-apply");
        }),
        Packet("IPv4 TCP ACK+data of flow 3 whose backend .13 is gone -> steered again through the table (.12), flagged re-steered in CT", |e| {
            let f = e.f3();
            let ip = f.packet(0, ACK | PSH, 50);
            let id = e.maglev(&f);
            assert_eq!(id, e.id_v4(12), "precondition: .12 has every slot");
            assert_ne!(e.lb.tracked_backend(&f.key()), Some(id), "precondition: tracked elsewhere");
            Case::tx(e.frame_in(None, &ip), e.ipip(id, None, &ip, &f.key()))
                .count(CtResteered)
                .to(e, id, false)
                .backend_also(|s| s.resteered = 1)
                // Into CT from the SYN cache, so never in CT_NEW.
                .tables(&f, Some(f.ct(id, ISN, CT_F_RESTEERED)), None)
        }),
        Packet("IPv4 TCP ACK of flow 3 again -> stays on .12 (connection table updated)", |e| {
            let f = e.f3();
            let ip = f.packet(0, ACK, 0);
            let id = e.id_v4(12);
            Case::tx(e.frame_in(None, &ip), e.ipip(id, None, &ip, &f.key())).to(e, id, false)
        }),
        Packet("IPv4 TCP RST+ACK on re-steered flow 3 -> .12, not counted as .12's client_rsts (the RST answers the old backend)", |e| {
            let f = e.f3();
            let ip = f.packet(0, RST | ACK, 0);
            let id = e.id_v4(12);
            Case::tx(e.frame_in(None, &ip), e.ipip(id, None, &ip, &f.key())).to(e, id, false)
        }),
        Packet("IPv4 TCP SYN retry of flow 6 (same sequence number) whose backend .13 is gone -> re-steered in CT_NEW to .12, flagged, sequence number kept", |e| {
            let f = e.f6();
            let ip = f.packet(0, SYN, 0);
            let id = e.id_v4(12);
            Case::tx(e.frame_in(None, &ip), e.ipip(id, None, &ip, &f.key()))
                .count(CtResteered)
                .to(e, id, false)
                .backend_also(|s| s.resteered = 1)
                .tables(&f, None, Some(f.ct(id, ISN, CT_F_RESTEERED)))
        }),
        Packet("IPv4 TCP SYN retry of re-steered flow 6 (same sequence number) -> .12, syn_retries +1 (.12 did get that SYN)", |e| {
            let f = e.f6();
            let ip = f.packet(0, SYN, 0);
            let id = e.id_v4(12);
            Case::tx(e.frame_in(None, &ip), e.ipip(id, None, &ip, &f.key()))
                .to(e, id, false)
                .backend_also(|s| s.syn_retries = 1)
        }),
        Packet("IPv4 TCP RST on re-steered flow 6 -> .12, promoted with its flag and marked closing, no client_rsts", |e| {
            let f = e.f6();
            let ip = f.packet_seq(0, RST, ISN.wrapping_add(1), 0);
            let id = e.id_v4(12);
            let flags = CT_F_RESTEERED | CT_F_CLOSING;
            Case::tx(e.frame_in(None, &ip), e.ipip(id, None, &ip, &f.key()))
                .count(CtPromoted)
                .to(e, id, false)
                .tables(&f, Some(f.ct(id, ISN, flags)), Some(f.ct(id, ISN, flags)))
        }),
        // ---- Lost connection state. ----
        Packet("IPv4 TCP ACK+data of a flow neither table knows (state evicted, or older than the balancer) -> the table's backend, ct_lost +1, recorded as new", |e| {
            let f = Flow::new(CLIENT4, VIP4, 40_777, 80, TCP);
            assert_eq!(e.lb.tracked_backend(&f.key()), None, "precondition: untracked");
            let ip = f.packet(0, ACK | PSH, 80);
            let id = e.maglev(&f);
            Case::tx(e.frame_in(None, &ip), e.ipip(id, None, &ip, &f.key()))
                .count(CtLost)
                .count(CtNew)
                .to(e, id, true)
        }),
        Packet("IPv4 TCP ACK of that flow again -> same backend, promoted (no second ct_lost)", |e| {
            let f = Flow::new(CLIENT4, VIP4, 40_777, 80, TCP);
            let ip = f.packet(0, ACK, 0);
            let id = e.maglev(&f);
            Case::tx(e.frame_in(None, &ip), e.ipip(id, None, &ip, &f.key()))
                .count(CtPromoted)
                .to(e, id, false)
                .tables(&f, Some(f.ct(id, 0, 0)), Some(f.ct(id, 0, 0)))
        }),
        Packet("IPv4 TCP FIN+ACK of that established flow -> same backend, its CT entry marked closing (CT_NEW's copy untouched)", |e| {
            let f = Flow::new(CLIENT4, VIP4, 40_777, 80, TCP);
            let ip = f.packet(0, FIN | ACK, 0);
            let id = e.maglev(&f);
            Case::tx(e.frame_in(None, &ip), e.ipip(id, None, &ip, &f.key()))
                .to(e, id, false)
                .tables(&f, Some(f.ct(id, 0, CT_F_CLOSING)), Some(f.ct(id, 0, 0)))
        }),
        Packet("IPv4 TCP RST of a flow neither table knows -> the table's backend, ct_lost +1 (a new flow's RST is not a client_rsts)", |e| {
            let f = Flow::new(CLIENT4, VIP4, 40_778, 80, TCP);
            let ip = f.packet(0, RST, 0);
            let id = e.maglev(&f);
            Case::tx(e.frame_in(None, &ip), e.ipip(id, None, &ip, &f.key()))
                .count(CtLost)
                .count(CtNew)
                .to(e, id, true)
        }),
        // ---- A reused 4-tuple whose old connection's entries this balancer still holds (a
        // new connection's SYN went to another balancer behind the same ECMP). ----
        Do("flow 40_779: CT says .11, closing, quiet for 11 s; CT_NEW's copy says .11", |e| {
            let f = Flow::new(CLIENT4, VIP4, 40_779, 80, TCP);
            e.old_entries(&f, e.id11(), CT_F_CLOSING, 11);
        }),
        Packet("IPv4 TCP ACK+data on flow 40_779 -> the table's backend (.12), not the closed connection's .11 (which would answer with a RST); recorded as new, CT_NEW's copy replaced", |e| {
            let f = Flow::new(CLIENT4, VIP4, 40_779, 80, TCP);
            let id = e.maglev(&f);
            assert_eq!(id, e.id_v4(12), "precondition: .12 has every slot");
            let ip = f.packet(0, ACK | PSH, 40);
            Case::tx(e.frame_in(None, &ip), e.ipip(id, None, &ip, &f.key()))
                .count(CtNew)
                .to(e, id, true)
                .tables(&f, None, Some(f.ct(id, 0, 0)))
        }),
        Packet("IPv4 TCP ACK on flow 40_779 again -> .12, promoted", |e| {
            let f = Flow::new(CLIENT4, VIP4, 40_779, 80, TCP);
            let id = e.id_v4(12);
            let ip = f.packet(0, ACK, 0);
            Case::tx(e.frame_in(None, &ip), e.ipip(id, None, &ip, &f.key()))
                .count(CtPromoted)
                .to(e, id, false)
                .tables(&f, Some(f.ct(id, 0, 0)), Some(f.ct(id, 0, 0)))
        }),
        Do("flow 40_780: CT says .11, closing, quiet for 5 s; CT_NEW's copy says .11", |e| {
            let f = Flow::new(CLIENT4, VIP4, 40_780, 80, TCP);
            e.old_entries(&f, e.id11(), CT_F_CLOSING, 5);
        }),
        Packet("IPv4 TCP ACK on flow 40_780 -> .11: a late ACK of a connection closing 5 s ago keeps its backend", |e| {
            let f = Flow::new(CLIENT4, VIP4, 40_780, 80, TCP);
            let id = e.id11();
            let ip = f.packet(0, ACK, 0);
            Case::tx(e.frame_in(None, &ip), e.ipip(id, None, &ip, &f.key()))
                .to(e, id, false)
                .tables(&f, Some(f.ct(id, 0, CT_F_CLOSING)), Some(f.ct(id, 0, 0)))
        }),
        Do("flow 40_781: CT says .11, not closing, quiet for an hour; CT_NEW's copy says .11", |e| {
            let f = Flow::new(CLIENT4, VIP4, 40_781, 80, TCP);
            e.old_entries(&f, e.id11(), 0, 3600);
        }),
        Packet("IPv4 TCP ACK+data on flow 40_781 -> .11: a connection keeps its backend however long it was quiet", |e| {
            let f = Flow::new(CLIENT4, VIP4, 40_781, 80, TCP);
            let id = e.id11();
            let ip = f.packet(0, ACK | PSH, 20);
            Case::tx(e.frame_in(None, &ip), e.ipip(id, None, &ip, &f.key()))
                .to(e, id, false)
                .tables(&f, Some(f.ct(id, 0, 0)), Some(f.ct(id, 0, 0)))
        }),
        // ---- UDP and IPv6. ----
        Packet("IPv4 UDP to 10.210.0.100:53 -> new flow, IPIP", |e| {
            let f = Flow::new(CLIENT4, VIP4, 33_333, 53, UDP);
            let ip = f.packet(0, 0, 64);
            let id = e.maglev(&f);
            Case::tx(e.frame_in(None, &ip), e.ipip(id, None, &ip, &f.key()))
                .count(CtNew)
                .to(e, id, true)
        }),
        Packet("IPv4 UDP second datagram of the flow -> same backend, promoted", |e| {
            let f = Flow::new(CLIENT4, VIP4, 33_333, 53, UDP);
            let ip = f.packet(0, 0, 300);
            let id = e.maglev(&f);
            Case::tx(e.frame_in(None, &ip), e.ipip(id, None, &ip, &f.key()))
                .count(CtPromoted)
                .to(e, id, false)
        }),
        Packet("IPv6 TCP SYN to [fd00:210::100]:80 (traffic class 0xb8) -> IP6IP6, flow label from flow_hash", |e| {
            let f = Flow::new(CLIENT6, VIP6, 41_000, 80, TCP);
            let ip = f.packet(0xb8, SYN, 0);
            let id = e.maglev(&f);
            Case::tx(e.frame_in(None, &ip), e.ipip(id, None, &ip, &f.key()))
                .count(CtNew)
                .to(e, id, true)
        }),
        Packet("IPv6 TCP ACK of the same flow -> same backend, promoted", |e| {
            let f = Flow::new(CLIENT6, VIP6, 41_000, 80, TCP);
            let ip = f.packet(0xb8, ACK, 10);
            let id = e.maglev(&f);
            Case::tx(e.frame_in(None, &ip), e.ipip(id, None, &ip, &f.key()))
                .count(CtPromoted)
                .to(e, id, false)
        }),
        Packet("IPv6 UDP to [fd00:210::100]:53 -> new flow, IP6IP6", |e| {
            let f = Flow::new(CLIENT6, VIP6, 33_333, 53, UDP);
            let ip = f.packet(0x28, 0, 100);
            let id = e.maglev(&f);
            Case::tx(e.frame_in(None, &ip), e.ipip(id, None, &ip, &f.key()))
                .count(CtNew)
                .to(e, id, true)
        }),
        Packet("802.1Q (PCP 1, VID 42) IPv4 TCP SYN -> IPIP, tag kept", |e| {
            let f = Flow::new(CLIENT4_B, VIP4, 40_100, 80, TCP);
            let ip = f.packet(0, SYN, 0);
            let id = e.maglev(&f);
            Case::tx(e.frame_in(Some(0x202a), &ip), e.ipip(id, Some(0x202a), &ip, &f.key()))
                .count(CtNew)
                .to(e, id, true)
        }),
        Packet("802.1Q (VID 42) IPv6 UDP -> IP6IP6, tag kept", |e| {
            let f = Flow::new(CLIENT6_B, VIP6, 33_334, 53, UDP);
            let ip = f.packet(0, 0, 40);
            let id = e.maglev(&f);
            Case::tx(e.frame_in(Some(0x002a), &ip), e.ipip(id, Some(0x002a), &ip, &f.key()))
                .count(CtNew)
                .to(e, id, true)
        }),
        Packet("IPv4 TCP SYN with 8 bytes of IP options (IHL 7) -> IPIP, inner header and options intact", |e| {
            let f = Flow::new(CLIENT4_B, VIP4, 40_200, 80, TCP);
            let mut h = client_ip4(CLIENT4_B, VIP4, TCP);
            h.options = vec![0x94, 0x04, 0x00, 0x00, 0x01, 0x01, 0x01, 0x00]; // router alert, NOPs, EOL
            let ip = h.build(&f.segment(SYN, 0));
            let id = e.maglev(&f);
            Case::tx(e.frame_in(None, &ip), e.ipip(id, None, &ip, &f.key()))
                .count(CtNew)
                .to(e, id, true)
        }),
        Packet("L2 VIP 10.210.0.101:80 IPv4 TCP SYN -> only the MACs rewritten", |e| {
            let f = Flow::new(CLIENT4, VIP4_L2, 40_300, 80, TCP);
            let input = e.frame_in(None, &f.packet(0, SYN, 0));
            let id = e.maglev(&f);
            Case::tx(input.clone(), e.l2(id, &input)).count(CtNew).to(e, id, true)
        }),
        Packet("L2 VIP [fd00:210::101]:80 IPv6 TCP SYN -> only the MACs rewritten", |e| {
            let f = Flow::new(CLIENT6, VIP6_L2, 40_300, 80, TCP);
            let input = e.frame_in(None, &f.packet(0, SYN, 0));
            let id = e.maglev(&f);
            Case::tx(input.clone(), e.l2(id, &input)).count(CtNew).to(e, id, true)
        }),
        // ---- 802.1Q and the egress interface: the tag belongs to the ingress link. ----
        Packet("802.1Q (VID 42) IPv4 TCP SYN, backend behind eth1 -> IPIP redirected, untagged", |e| {
            let f = Flow::new(CLIENT4, VIP4_OUT, 40_400, 80, TCP);
            let ip = f.packet(0, SYN, 0);
            let id = e.maglev(&f);
            let out = e.leaving_by_eth1(e.ipip(id, None, &ip, &f.key()));
            Case::new(e.frame_in(Some(0x202a), &ip), XDP_REDIRECT, out)
                .count(CtNew)
                .to(e, id, true)
        }),
        Packet("IPv4 TCP SYN (untagged), backend behind eth1 -> IPIP redirected, untagged", |e| {
            let f = Flow::new(CLIENT4_B, VIP4_OUT, 40_401, 80, TCP);
            let ip = f.packet(0, SYN, 0);
            let id = e.maglev(&f);
            let out = e.leaving_by_eth1(e.ipip(id, None, &ip, &f.key()));
            Case::new(e.frame_in(None, &ip), XDP_REDIRECT, out)
                .count(CtNew)
                .to(e, id, true)
        }),
        Packet("802.1Q (VID 42) IPv4 TCP SYN, L2 VIP, backend behind eth1 -> MACs rewritten, redirected, untagged", |e| {
            let f = Flow::new(CLIENT4, VIP4_OUT, 40_402, 81, TCP);
            let ip = f.packet(0, SYN, 0);
            let id = e.maglev(&f);
            let out = e.leaving_by_eth1(e.l2(id, &e.frame_in(None, &ip)));
            Case::new(e.frame_in(Some(0x202a), &ip), XDP_REDIRECT, out)
                .count(CtNew)
                .to(e, id, true)
        }),
        Packet("802.1Q (PCP 5, VID 42) IPv4 TCP SYN, L2 VIP, backend on eth0 -> MACs rewritten, XDP_TX, tag kept", |e| {
            let f = Flow::new(CLIENT4_B, VIP4_L2, 40_403, 80, TCP);
            let input = e.frame_in(Some(0xa02a), &f.packet(0, SYN, 0));
            let id = e.maglev(&f);
            Case::tx(input.clone(), e.l2(id, &input)).count(CtNew).to(e, id, true)
        }),
        // ---- Not for a VIP. ----
        Packet("ARP request for 10.210.0.2 -> PASS unchanged (pass_non_ip)", |e| {
            let mut arp = vec![0, 1, 8, 0, 6, 4, 0, 1];
            arp.extend(ROUTER_MAC);
            arp.extend([10, 210, 0, 1]);
            arp.extend([0; 6]);
            arp.extend([10, 210, 0, 2]);
            let _ = e;
            Case::pass(frame([0xff; 6], ROUTER_MAC, None, ETH_ARP, &arp), PassNonIp)
        }),
        Packet("802.1ad (QinQ S-tag) frame carrying IPv4 to the VIP -> PASS unchanged (pass_non_ip)", |e| {
            let ip = Flow::new(CLIENT4, VIP4, 40_000, 80, TCP).packet(0, SYN, 0);
            let mut payload = vec![0x00, 0x64];
            payload.extend(ETH_IP.to_be_bytes());
            payload.extend(ip);
            Case::pass(frame(e.mac, ROUTER_MAC, None, ETH_8021AD, &payload), PassNonIp)
        }),
        Packet("IPv4 TCP to 10.210.0.2:22 (not a VIP) -> PASS unchanged (pass_not_vip)", |e| {
            let ip = Flow::new(CLIENT4, LB_V4, 50_000, 22, TCP).packet(0, SYN, 0);
            Case::pass(e.frame_in(None, &ip), PassNotVip)
        }),
        Packet("IPv4 TCP to the VIP address on port 443 -> PASS unchanged (pass_not_vip)", |e| {
            let ip = Flow::new(CLIENT4, VIP4, 50_000, 443, TCP).packet(0, SYN, 0);
            Case::pass(e.frame_in(None, &ip), PassNotVip)
        }),
        Packet("IPv4 UDP to 10.210.0.100:80 (that port is a TCP VIP) -> PASS unchanged (pass_not_vip)", |e| {
            let ip = Flow::new(CLIENT4, VIP4, 50_000, 80, UDP).packet(0, 0, 20);
            Case::pass(e.frame_in(None, &ip), PassNotVip)
        }),
        Packet("ICMP echo request to the VIP -> PASS unchanged (pass_not_vip)", |e| {
            let icmp = icmp4(8, 0, [0x12, 0x34, 0, 1], &payload_bytes(32, 1));
            let mut h = client_ip4(CLIENT4, VIP4, ICMP);
            h.frag = 0;
            Case::pass(e.frame_in(None, &h.build(&icmp)), PassNotVip)
        }),
        Packet("ICMPv6 echo request to the IPv6 VIP -> PASS unchanged (pass_not_vip)", |e| {
            let icmp = icmp6(CLIENT6, VIP6, 128, 0, [0x12, 0x34, 0, 1], &payload_bytes(32, 1));
            Case::pass(e.frame_in(None, &ip6(0, 0, ICMPV6, 64, CLIENT6, VIP6, &icmp)), PassNotVip)
        }),
        Packet("IPv4 GRE to the VIP -> PASS unchanged (pass_not_vip)", |e| {
            let mut h = client_ip4(CLIENT4, VIP4, GRE);
            h.frag = 0;
            let gre = [0, 0, 0x08, 0x00, 0x45, 0, 0, 20];
            Case::pass(e.frame_in(None, &h.build(&gre)), PassNotVip)
        }),
        // ---- Truncated and inconsistent headers: passed unchanged. ----
        Packet("13-byte frame (Ethernet header truncated) -> the kernel refuses to run it (EINVAL): XDP never sees it", |e| {
            let f = frame(e.mac, ROUTER_MAC, None, ETH_IP, &[]);
            let mut c = Case::new(f[..13].to_vec(), XDP_ABORTED, Vec::new());
            c.refused = true;
            c
        }),
        Packet("Ethernet header only (14 bytes, ethertype IPv4) -> PASS (pass_malformed)", |e| {
            Case::pass(frame(e.mac, ROUTER_MAC, None, ETH_IP, &[]), PassMalformed)
        }),
        Packet("802.1Q tag truncated (16-byte frame) -> PASS (pass_malformed)", |e| {
            let mut f = frame(e.mac, ROUTER_MAC, None, ETH_8021Q, &[0x00, 0x2a]);
            f.truncate(16);
            Case::pass(f, PassMalformed)
        }),
        Packet("IPv4 header truncated (19 of 20 bytes) -> PASS (pass_malformed)", |e| {
            let ip = Flow::new(CLIENT4, VIP4, 40_000, 80, TCP).packet(0, SYN, 0);
            Case::pass(e.frame_in(None, &ip[..19]), PassMalformed)
        }),
        Packet("IPv6 header truncated (39 of 40 bytes) -> PASS (pass_malformed)", |e| {
            let ip = Flow::new(CLIENT6, VIP6, 40_000, 80, TCP).packet(0, SYN, 0);
            Case::pass(e.frame_in(None, &ip[..39]), PassMalformed)
        }),
        Packet("TCP header truncated (IPv4 total length 20+12, frame ends there) -> PASS (pass_malformed)", |e| {
            let seg = Flow::new(CLIENT4, VIP4, 40_000, 80, TCP).segment(SYN, 0);
            let ip = client_ip4(CLIENT4, VIP4, TCP).build(&seg[..12]);
            Case::pass(e.frame_in(None, &ip), PassMalformed)
        }),
        Packet("UDP header truncated (IPv6 payload length 6) -> PASS (pass_malformed)", |e| {
            let seg = Flow::new(CLIENT6, VIP6, 33_333, 53, UDP).segment(0, 0);
            Case::pass(e.frame_in(None, &ip6(0, 0, UDP, 64, CLIENT6, VIP6, &seg[..6])), PassMalformed)
        }),
        Packet("IPv6 Fragment header truncated (payload length 4) -> PASS (pass_malformed)", |e| {
            let fh = frag6(UDP, 0, true, 7);
            Case::pass(e.frame_in(None, &ip6(0, 0, FRAG6, 64, CLIENT6, VIP6, &fh[..4])), PassMalformed)
        }),
        Packet("IPv4 IHL 4 (< 5) -> PASS (pass_malformed)", |e| {
            let mut ip = Flow::new(CLIENT4, VIP4, 40_000, 80, TCP).packet(0, SYN, 0);
            ip[0] = 0x44;
            fix_ip4_csum(&mut ip);
            Case::pass(e.frame_in(None, &ip), PassMalformed)
        }),
        Packet("IPv4 total length 1000, larger than the frame -> PASS (pass_malformed)", |e| {
            let mut ip = Flow::new(CLIENT4, VIP4, 40_000, 80, TCP).packet(0, SYN, 0);
            ip[2..4].copy_from_slice(&1000u16.to_be_bytes());
            fix_ip4_csum(&mut ip);
            Case::pass(e.frame_in(None, &ip), PassMalformed)
        }),
        Packet("IPv4 total length 16, smaller than the header -> PASS (pass_malformed)", |e| {
            let mut ip = Flow::new(CLIENT4, VIP4, 40_000, 80, TCP).packet(0, SYN, 0);
            ip[2..4].copy_from_slice(&16u16.to_be_bytes());
            fix_ip4_csum(&mut ip);
            Case::pass(e.frame_in(None, &ip), PassMalformed)
        }),
        Packet("IPv6 payload length 200, larger than the frame -> PASS (pass_malformed)", |e| {
            let mut ip = Flow::new(CLIENT6, VIP6, 40_000, 80, TCP).packet(0, SYN, 0);
            ip[4..6].copy_from_slice(&200u16.to_be_bytes());
            Case::pass(e.frame_in(None, &ip), PassMalformed)
        }),
        // Layer-4 headers must lie within the IP packet, not merely within the frame: here the
        // 12 TCP bytes the IP header declares are followed by Ethernet padding, which must not
        // be read as the rest of the TCP header.
        Packet("TCP header cut by the IPv4 total length (20+12) in a frame padded to 60 bytes -> PASS (pass_malformed)", |e| {
            let seg = Flow::new(CLIENT4, VIP4, 45_001, 80, TCP).segment(SYN, 0);
            let ip = client_ip4(CLIENT4, VIP4, TCP).build(&seg[..12]);
            let mut f = e.frame_in(None, &ip);
            f.resize(60, 0);
            Case::pass(f, PassMalformed)
        }),
        Packet("UDP header cut by the IPv6 payload length (4) with 8 trailing bytes in the frame -> PASS (pass_malformed)", |e| {
            let seg = Flow::new(CLIENT6, VIP6, 33_334, 53, UDP).segment(0, 0);
            let mut f = e.frame_in(None, &ip6(0, 0, UDP, 64, CLIENT6, VIP6, &seg[..4]));
            f.extend_from_slice(&seg[4..8]);
            f.extend_from_slice(&[0; 4]);
            Case::pass(f, PassMalformed)
        }),
        // ---- Fragments. ----
        Packet("IPv4 first fragment (MF, id 0x1234) of a UDP datagram to :53 -> IPIP to its Maglev backend", |e| {
            let f = Flow::new(CLIENT4_B, VIP4, 5353, 53, UDP);
            let seg = f.segment(0, 300);
            let mut h = client_ip4(CLIENT4_B, VIP4, UDP);
            h.id = 0x1234;
            h.frag = MF;
            let ip = h.build(&seg[..208]);
            let id = e.maglev(&f);
            Case::tx(e.frame_in(None, &ip), e.ipip(id, None, &ip, &f.key()))
                .count(CtNew)
                .to(e, id, true)
        }),
        Packet("IPv4 later fragment (offset 208, same id) -> same backend (frag_forwarded)", |e| {
            let f = Flow::new(CLIENT4_B, VIP4, 5353, 53, UDP);
            let seg = f.segment(0, 300);
            let mut h = client_ip4(CLIENT4_B, VIP4, UDP);
            h.id = 0x1234;
            h.frag = 208 / 8;
            let ip = h.build(&seg[208..]);
            let id = e.maglev(&f);
            Case::tx(e.frame_in(None, &ip), e.ipip(id, None, &ip, &f.fragment_key()))
                .count(FragForwarded)
                .to(e, id, false)
        }),
        Packet("IPv4 later fragment of an unseen datagram (id 0x4321) -> PASS unchanged (pass_frag_unknown)", |e| {
            let f = Flow::new(CLIENT4_B, VIP4, 5353, 53, UDP);
            let seg = f.segment(0, 300);
            let mut h = client_ip4(CLIENT4_B, VIP4, UDP);
            h.id = 0x4321;
            h.frag = 208 / 8;
            Case::pass(e.frame_in(None, &h.build(&seg[208..])), PassFragUnknown)
        }),
        Packet("IPv6 first fragment (Fragment header, M=1, id 0xabcdef01) of a UDP datagram to :53 -> IP6IP6", |e| {
            let f = Flow::new(CLIENT6_B, VIP6, 5353, 53, UDP);
            let seg = f.segment(0, 300);
            let mut payload = frag6(UDP, 0, true, 0xabcd_ef01).to_vec();
            payload.extend_from_slice(&seg[..208]);
            let ip = ip6(0, 0x1_2345, FRAG6, 57, CLIENT6_B, VIP6, &payload);
            let id = e.maglev(&f);
            Case::tx(e.frame_in(None, &ip), e.ipip(id, None, &ip, &f.key()))
                .count(CtNew)
                .to(e, id, true)
        }),
        // The first fragment's choice is recorded with its flow hash, so later fragments get the
        // same outer flow label as the rest of the flow and follow it through ECMP.
        Packet("IPv6 later fragment (offset 208, same id) -> same backend (frag_forwarded), same flow label as its flow", |e| {
            let f = Flow::new(CLIENT6_B, VIP6, 5353, 53, UDP);
            let seg = f.segment(0, 300);
            let mut payload = frag6(UDP, 208 / 8, false, 0xabcd_ef01).to_vec();
            payload.extend_from_slice(&seg[208..]);
            let ip = ip6(0, 0x1_2345, FRAG6, 57, CLIENT6_B, VIP6, &payload);
            let id = e.maglev(&f);
            Case::tx(e.frame_in(None, &ip), e.ipip(id, None, &ip, &f.key()))
                .count(FragForwarded)
                .to(e, id, false)
        }),
        Packet("IPv6 later fragment of an unseen datagram -> PASS unchanged (pass_frag_unknown)", |e| {
            let f = Flow::new(CLIENT6_B, VIP6, 5353, 53, UDP);
            let seg = f.segment(0, 300);
            let mut payload = frag6(UDP, 208 / 8, false, 0x0bad_f00d).to_vec();
            payload.extend_from_slice(&seg[208..]);
            let ip = ip6(0, 0x1_2345, FRAG6, 57, CLIENT6_B, VIP6, &payload);
            Case::pass(e.frame_in(None, &ip), PassFragUnknown)
        }),
        // ---- ICMP errors about VIP flows. ----
        Packet("ICMP frag-needed (3/4) from a router quoting VIP->client of the established flow -> IPIP to its tracked backend .11", |e| {
            let f = e.f1();
            let quote = &f.reply(1360)[..28];
            let icmp = icmp4(3, 4, [0, 0, 0x05, 0x78], quote);
            let mut h = client_ip4(ROUTER4, VIP4, ICMP);
            h.tos = 0xc0;
            h.frag = 0;
            let ip = h.build(&icmp);
            let id = e.id11();
            assert_ne!(e.maglev(&f), id, "precondition: only tracking knows .11");
            Case::tx(e.frame_in(None, &ip), e.ipip(id, None, &ip, &f.key()))
                .count(IcmpForwarded)
                .to(e, id, false)
        }),
        Packet("ICMP port unreachable (3/3) quoting the same flow -> PASS unchanged (pass_not_vip)", |e| {
            let quote = &e.f1().reply(100)[..28];
            let icmp = icmp4(3, 3, [0; 4], quote);
            let mut h = client_ip4(ROUTER4, VIP4, ICMP);
            h.frag = 0;
            Case::pass(e.frame_in(None, &h.build(&icmp)), PassNotVip)
        }),
        Packet("ICMP frag-needed quoting a non-VIP flow (10.210.0.2:22 -> client) -> PASS unchanged (pass_icmp_not_vip)", |e| {
            let quote = &Flow::new(CLIENT4, LB_V4, 50_000, 22, TCP).reply(1360)[..28];
            let icmp = icmp4(3, 4, [0, 0, 0x05, 0x78], quote);
            let mut h = client_ip4(ROUTER4, LB_V4, ICMP);
            h.frag = 0;
            Case::pass(e.frame_in(None, &h.build(&icmp)), PassIcmpNotVip)
        }),
        Packet("ICMPv6 packet too big from a router quoting VIP->client of the IPv6 TCP flow -> IP6IP6 to its backend", |e| {
            let f = Flow::new(CLIENT6, VIP6, 41_000, 80, TCP);
            let quote = &f.reply(1300)[..200];
            let icmp = icmp6(ROUTER6, VIP6, 2, 0, 1280u32.to_be_bytes(), quote);
            let ip = ip6(0, 0, ICMPV6, 60, ROUTER6, VIP6, &icmp);
            let id = e.maglev(&f);
            Case::tx(e.frame_in(None, &ip), e.ipip(id, None, &ip, &f.key()))
                .count(IcmpForwarded)
                .to(e, id, false)
        }),
        Packet("ICMPv6 packet too big quoting a non-VIP flow -> PASS unchanged (pass_icmp_not_vip)", |e| {
            let quote = &Flow::new(CLIENT6, LB_V6, 50_000, 22, TCP).reply(1300)[..200];
            let icmp = icmp6(ROUTER6, LB_V6, 2, 0, 1280u32.to_be_bytes(), quote);
            Case::pass(e.frame_in(None, &ip6(0, 0, ICMPV6, 60, ROUTER6, LB_V6, &icmp)), PassIcmpNotVip)
        }),
        // ---- VIPs without backends. ----
        Packet("IPv4 TCP SYN to 10.210.0.102:80 (no backends) -> DROP (drop_no_backend, VIP no_backend +1)", |e| {
            let f = Flow::new(CLIENT4, VIP4_EMPTY, 40_500, 80, TCP);
            let input = e.frame_in(None, &f.packet(0, SYN, 0));
            let vip_id = e.vip(f.vip, 80, TCP).vip_id;
            Case::new(input.clone(), XDP_DROP, input)
                .count(DropNoBackend)
                .vip_stats(vip_id, VipStats { no_backend: 1, ..Default::default() })
        }),
        Packet("IPv6 TCP SYN to [fd00:210::102]:80 (all weights 0) -> DROP (drop_no_backend, VIP no_backend +1)", |e| {
            let f = Flow::new(CLIENT6, VIP6_EMPTY, 40_500, 80, TCP);
            let input = e.frame_in(None, &f.packet(0, SYN, 0));
            let vip_id = e.vip(f.vip, 80, TCP).vip_id;
            Case::new(input.clone(), XDP_DROP, input)
                .count(DropNoBackend)
                .vip_stats(vip_id, VipStats { no_backend: 1, ..Default::default() })
        }),
        // ---- MTU. The MTU VIPs' backends have had no packet yet, so nothing is cached. ----
        // Each flow starts with data, no SYN: its first packet also counts ct_lost.
        Do("eth0 MTU 1600 -> 1500 (10.210.0.31 and fd00:210::31 not looked up yet)", |e| {
            for dev in ["eth0", "peer0"] {
                e.ns.ip(["link", "set", dev, "mtu", "1500"]).expect("setting the MTU");
            }
        }),
        Packet("IPv4 1500-byte TCP packet to 10.210.0.103:80 (1520 > MTU 1500) -> TX ICMP frag-needed, MTU 1480", |e| {
            let f = Flow::new(CLIENT4, VIP4_MTU, 40_600, 80, TCP);
            let ip = f.packet(0, ACK | PSH, 1460);
            assert_eq!(ip.len(), 1500);
            let input = e.frame_in(None, &ip);
            let id = e.maglev(&f);
            Case::tx(input.clone(), too_big4(&input, None, 1480))
                .count(CtNew)
                .count(CtLost)
                .count(IcmpTooBigSent)
                .opened_only(e, id)
        }),
        Packet("IPv4 1480-byte TCP packet of the same flow (outer 1500 = MTU) -> IPIP", |e| {
            let f = Flow::new(CLIENT4, VIP4_MTU, 40_600, 80, TCP);
            let ip = f.packet(0, ACK | PSH, 1440);
            let id = e.maglev(&f);
            Case::tx(e.frame_in(None, &ip), e.ipip(id, None, &ip, &f.key()))
                .count(CtPromoted)
                .to(e, id, false)
        }),
        Packet("802.1Q IPv4 1500-byte TCP packet to the MTU VIP -> TX ICMP frag-needed, tag kept", |e| {
            let f = Flow::new(CLIENT4, VIP4_MTU, 40_601, 80, TCP);
            let ip = f.packet(0x10, ACK | PSH, 1460);
            let input = e.frame_in(Some(0x002a), &ip);
            let id = e.maglev(&f);
            Case::tx(input.clone(), too_big4(&input, Some(0x002a), 1480))
                .count(CtNew)
                .count(CtLost)
                .count(IcmpTooBigSent)
                .opened_only(e, id)
        }),
        Packet("IPv4 1500-byte TCP packet with 8 bytes of IP options to the MTU VIP -> TX ICMP frag-needed quoting header+options+8", |e| {
            let f = Flow::new(CLIENT4, VIP4_MTU, 40_602, 80, TCP);
            let mut h = client_ip4(CLIENT4, VIP4_MTU, TCP);
            h.options = vec![0x94, 0x04, 0x00, 0x00, 0x01, 0x01, 0x01, 0x00];
            let ip = h.build(&f.segment(ACK | PSH, 1452));
            assert_eq!(ip.len(), 1500);
            let input = e.frame_in(None, &ip);
            let id = e.maglev(&f);
            Case::tx(input.clone(), too_big4(&input, None, 1480))
                .count(CtNew)
                .count(CtLost)
                .count(IcmpTooBigSent)
                .opened_only(e, id)
        }),
        Packet("IPv6 1500-byte TCP packet to [fd00:210::103]:80 (1540 > 1500) -> TX ICMPv6 packet too big, MTU 1460", |e| {
            let f = Flow::new(CLIENT6, VIP6_MTU, 40_700, 80, TCP);
            let ip = f.packet(0, ACK | PSH, 1440);
            assert_eq!(ip.len(), 1500);
            let input = e.frame_in(None, &ip);
            let id = e.maglev(&f);
            Case::tx(input.clone(), too_big6(&input, None, 1460))
                .count(CtNew)
                .count(CtLost)
                .count(IcmpTooBigSent)
                .opened_only(e, id)
        }),
        Packet("IPv6 1460-byte TCP packet of the same flow (outer 1500 = MTU) -> IP6IP6", |e| {
            let f = Flow::new(CLIENT6, VIP6_MTU, 40_700, 80, TCP);
            let ip = f.packet(0, ACK | PSH, 1400);
            let id = e.maglev(&f);
            Case::tx(e.frame_in(None, &ip), e.ipip(id, None, &ip, &f.key()))
                .count(CtPromoted)
                .to(e, id, false)
        }),
        // ---- SYN recording is per VIP: a VIP whose table changes does not slow the others. ----
        Do("SYN recording disarmed for every VIP, then a re-apply that changes 10.210.0.100:80/tcp's table (.11 back at weight 1): that VIP records its SYNs, [fd00:210::100]:80 does not", |e| {
            e.lb.set_syn_recording(0).expect("disarming SYN recording");
            e.lb.apply(&config(&[(11, 1), (12, 1)])).expect("re-apply");
            let tcp4 = e.vip(VIP4.into(), 80, TCP).vip_id;
            let tcp6 = e.vip(VIP6.into(), 80, TCP).vip_id;
            assert!(e.lb.vip_syn_recording(tcp4).expect("reading SYN_RECORD"), "the changed VIP records");
            assert!(!e.lb.vip_syn_recording(tcp6).expect("reading SYN_RECORD"), "an unchanged VIP does not");
        }),
        Packet("IPv6 TCP SYN to [fd00:210::100]:80 while only 10.210.0.100:80/tcp records -> no entry (the SYN cache only)", |e| {
            let f = Flow::new(CLIENT6, VIP6, 41_100, 80, TCP);
            let ip = f.packet(0, SYN, 0);
            let id = e.maglev(&f);
            Case::tx(e.frame_in(None, &ip), e.ipip(id, None, &ip, &f.key()))
                .count(CtNew)
                .to(e, id, true)
                .tables(&f, None, None)
        }),
        Packet("IPv4 TCP SYN to 10.210.0.100:80 (its table just changed) -> recorded in CT_NEW", |e| {
            let f = Flow::new(CLIENT4, VIP4, 41_101, 80, TCP);
            let ip = f.packet(0, SYN, 0);
            let id = e.maglev(&f);
            Case::tx(e.frame_in(None, &ip), e.ipip(id, None, &ip, &f.key()))
                .count(CtNew)
                .to(e, id, true)
                .tables(&f, None, Some(f.ct(id, ISN, 0)))
        }),
    ]
}

// ---------------------------------------------------------------------------------------------
// Running a case.

/// Runs the program once on `frame` from a thread inside the namespace, with eth0 as the
/// ingress interface. Returns the verdict and the output frame, or the errno and the error.
fn test_run(env: &Env, frame: &[u8]) -> Result<(u32, Vec<u8>), (Option<i32>, String)> {
    // struct xdp_md { data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex }
    let mut md = [0u8; 24];
    md[4..8].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
    md[12..16].copy_from_slice(&env.ifindex.to_ne_bytes());
    let prog = env.lb.program();
    env.ns.run_in(|| {
        let mut out = vec![0u8; 4096];
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ctx_in: Some(&md),
                repeat: 1,
                ..Default::default()
            })
            .map_err(|e| {
                let errno = match &e {
                    ProgramError::SyscallError(se) => se.io_error.raw_os_error(),
                    _ => None,
                };
                (errno, format!("BPF_PROG_TEST_RUN: {e:#?}"))
            })?;
        out.truncate(r.data_size_out as usize);
        Ok((r.return_value, out))
    })
}

struct Snapshot {
    counters: Vec<u64>,
    backends: BTreeMap<u32, BackendStats>,
    vips: BTreeMap<u32, VipStats>,
}

fn snapshot(env: &Env) -> Snapshot {
    let counters = env
        .lb
        .counters()
        .expect("reading counters")
        .into_iter()
        .map(|(_, n)| n)
        .collect();
    let mut backends = BTreeMap::new();
    let mut vips = BTreeMap::new();
    for v in env.lb.vips() {
        vips.insert(v.vip_id, env.lb.vip_stats(v.vip_id).expect("VIP stats"));
        for b in &v.backends {
            backends.insert(b.id, env.lb.backend_stats(b.id).expect("backend stats"));
        }
    }
    Snapshot {
        counters,
        backends,
        vips,
    }
}

fn backend_delta(a: &BackendStats, b: &BackendStats) -> BackendStats {
    BackendStats {
        packets: a.packets.wrapping_sub(b.packets),
        bytes: a.bytes.wrapping_sub(b.bytes),
        new_flows: a.new_flows.wrapping_sub(b.new_flows),
        syn_retries: a.syn_retries.wrapping_sub(b.syn_retries),
        client_rsts: a.client_rsts.wrapping_sub(b.client_rsts),
        resteered: a.resteered.wrapping_sub(b.resteered),
    }
}

fn vip_delta(a: &VipStats, b: &VipStats) -> VipStats {
    VipStats {
        packets: a.packets.wrapping_sub(b.packets),
        bytes: a.bytes.wrapping_sub(b.bytes),
        new_flows: a.new_flows.wrapping_sub(b.new_flows),
        no_backend: a.no_backend.wrapping_sub(b.no_backend),
    }
}

fn hex(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn hexdump(b: &[u8]) -> String {
    let mut s = String::new();
    for (i, c) in b.chunks(16).enumerate() {
        writeln!(s, "    {:04x}  {}", i * 16, hex(c)).unwrap();
    }
    s
}

/// The differing 16-byte lines of two byte strings, with markers under the differing bytes.
fn hexdiff(exp: &[u8], act: &[u8]) -> String {
    let mut s = format!(
        "    lengths: expected {}, actual {} (identical lines omitted)\n",
        exp.len(),
        act.len()
    );
    let n = exp.len().max(act.len());
    for off in (0..n).step_by(16) {
        let e = &exp[off.min(exp.len())..(off + 16).min(exp.len())];
        let a = &act[off.min(act.len())..(off + 16).min(act.len())];
        if e == a {
            continue;
        }
        let marks: String = (0..16)
            .map(|i| if e.get(i) != a.get(i) { "^^ " } else { "   " })
            .collect();
        writeln!(s, "    {off:04x}  exp {}", hex(e)).unwrap();
        writeln!(s, "          act {}", hex(a)).unwrap();
        writeln!(s, "              {}", marks.trim_end()).unwrap();
    }
    s
}

/// Runs one case; Ok(summary) or Err(report of every mismatch).
fn run_case(env: &Env, case: &Case) -> Result<String, String> {
    let before = snapshot(env);
    let run = test_run(env, &case.input);
    let after = snapshot(env);
    let mut problems = Vec::new();
    let (verdict, out) = match (run, case.refused) {
        (Ok(r), false) => r,
        (Err((_, e)), false) => return Err(format!("  - {e}\n")),
        (Err((Some(libc::EINVAL), _)), true) => {
            if after.counters != before.counters {
                return Err("  - a counter moved on a refused run\n".into());
            }
            return Ok("refused by the kernel (EINVAL), no counter".into());
        }
        (Err((_, e)), true) => return Err(format!("  - expected EINVAL, got {e}\n")),
        (Ok((v, _)), true) => {
            return Err(format!(
                "  - expected the kernel to refuse the run, got {}\n",
                verdict_name(v)
            ))
        }
    };
    if verdict != case.verdict {
        problems.push(format!(
            "verdict: expected {}, got {}",
            verdict_name(case.verdict),
            verdict_name(verdict)
        ));
    }
    if out != case.output {
        problems.push(format!(
            "output bytes differ:\n{}",
            hexdiff(&case.output, &out)
        ));
    }
    let mut moved = Vec::new();
    for (i, c) in Counter::ALL.iter().enumerate() {
        let d = after.counters[i].wrapping_sub(before.counters[i]);
        let want: u64 = case
            .counters
            .iter()
            .filter(|(x, _)| x == c)
            .map(|(_, n)| n)
            .sum();
        if d != want {
            problems.push(format!(
                "counter {}: moved by {d}, expected {want}",
                c.name()
            ));
        }
        if d != 0 {
            moved.push(format!("{}+{d}", c.name()));
        }
    }
    for (id, a) in &after.backends {
        let d = backend_delta(
            a,
            before.backends.get(id).unwrap_or(&BackendStats::default()),
        );
        let want = match case.backend {
            Some((bid, s)) if bid == *id => s,
            _ => BackendStats::default(),
        };
        if d != want {
            problems.push(format!(
                "backend {id} ({}) stats: delta {d:?}, expected {want:?}",
                env.backend(*id).0
            ));
        }
    }
    if let Some((bid, _)) = case.backend {
        if !after.backends.contains_key(&bid) {
            problems.push(format!("backend {bid} is not configured"));
        }
    }
    for (id, a) in &after.vips {
        let d = vip_delta(a, before.vips.get(id).unwrap_or(&VipStats::default()));
        let want = match case.vip {
            Some((vid, s)) if vid == *id => s,
            _ => VipStats::default(),
        };
        if d != want {
            problems.push(format!("VIP {id} stats: delta {d:?}, expected {want:?}"));
        }
    }
    for (f, ct, ct_new) in &case.tables {
        let (got_ct, got_new) = env.lb.conntrack_entries(&f.key());
        // Times are the kernel's clock: checked to be set, then left out of the comparison.
        for v in [got_ct, got_new].iter().flatten() {
            if v.last_seen == 0 || v.touched == 0 {
                problems.push(format!("connection-table times not set: {v:?}"));
            }
        }
        let untimed = |v: Option<CtValue>| {
            v.map(|v| CtValue {
                last_seen: 0,
                touched: 0,
                ..v
            })
        };
        let (got_ct, got_new) = (untimed(got_ct), untimed(got_new));
        if (got_ct, got_new) != (*ct, *ct_new) {
            problems.push(format!(
                "connection tables of {}:{} -> {}:{}: CT {got_ct:?}, CT_NEW {got_new:?}; expected CT {ct:?}, CT_NEW {ct_new:?}",
                f.client, f.sport, f.vip, f.dport
            ));
        }
    }
    let mut checked = String::new();
    if case.verdict == XDP_TX {
        match verify_checksums(&out) {
            Ok(done) => checked = format!(" [checksums ok: {}]", done.join(" ")),
            Err(e) => problems.push(format!("checksum check of the output: {e}")),
        }
    }
    if problems.is_empty() {
        let moved = if moved.is_empty() {
            "no counter".to_string()
        } else {
            moved.join(" ")
        };
        Ok(format!("{} ({moved}){checked}", verdict_name(verdict)))
    } else {
        let mut r = String::new();
        for p in &problems {
            writeln!(r, "  - {p}").unwrap();
        }
        write!(
            r,
            "  input ({} bytes):\n{}",
            case.input.len(),
            hexdump(&case.input)
        )
        .unwrap();
        if verdict != case.verdict || out != case.output {
            write!(
                r,
                "  actual output ({} bytes):\n{}",
                out.len(),
                hexdump(&out)
            )
            .unwrap();
        }
        Err(r)
    }
}

#[test]
fn fixture_table() {
    require_root();
    let start = Instant::now();
    let mut env = Env::new().expect("setting up the namespace and the balancer");
    println!(
        "eth0 ifindex {} mac {}; flow 1 = {CLIENT4}:{} -> {VIP4}:80, flow 2 = {CLIENT4}:{} -> {VIP4}:80",
        env.ifindex,
        mac_str(&env.mac),
        env.f1_sport,
        env.f2_sport
    );
    let steps = table();
    let rows = steps.iter().filter(|s| matches!(s, Packet(..))).count();
    assert!(
        rows >= 30,
        "the table must have at least 30 fixtures, has {rows}"
    );
    let mut n = 0;
    let mut failures = Vec::new();
    for step in &steps {
        match step {
            Do(desc, f) => {
                println!("---- {desc}");
                f(&mut env);
            }
            Packet(desc, build) => {
                n += 1;
                let case = build(&env);
                match run_case(&env, &case) {
                    Ok(summary) => println!("[{n:02}] {desc}  =>  {summary}"),
                    Err(report) => {
                        println!("[{n:02}] {desc}  =>  FAILED\n{report}");
                        failures.push(format!("[{n:02}] {desc}\n{report}"));
                    }
                }
            }
        }
    }
    drop(env);
    println!(
        "{rows} fixtures, {} failed, {:.1} s",
        failures.len(),
        start.elapsed().as_secs_f64()
    );
    assert!(
        failures.is_empty(),
        "{} of {rows} fixtures failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// The checker itself: it must reject what it is there to catch (no root needed).
#[test]
fn checksum_checker_rejects_corruption() {
    let f = Flow::new(CLIENT4, VIP4, 40_000, 80, TCP);
    let inner = f.packet(0x10, ACK | PSH, 33);
    let mut outer = client_ip4(LB_V4, Ipv4Addr::new(10, 210, 0, 11), 4);
    outer.ttl = 64;
    let good = frame([2; 6], [4; 6], Some(42), ETH_IP, &outer.build(&inner));
    assert_eq!(
        verify_checksums(&good).unwrap(),
        ["vlan", "ipv4", "ipv4", "tcp"]
    );
    // Outer header checksum, inner header checksum, TCP checksum, TCP payload.
    for off in [18 + 10, 18 + 20 + 11, 18 + 40 + 17, 18 + 40 + 20 + 5] {
        let mut bad = good.clone();
        bad[off] ^= 0x01;
        assert!(
            verify_checksums(&bad).is_err(),
            "corrupt byte {off} not caught"
        );
    }
    let u = Flow::new(CLIENT6, VIP6, 33_333, 53, UDP).packet(0, 0, 21);
    let good6 = frame([2; 6], [4; 6], None, ETH_IPV6, &u);
    assert_eq!(verify_checksums(&good6).unwrap(), ["ipv6", "udp"]);
    let mut bad6 = good6.clone();
    bad6[14 + 40 + 8 + 3] ^= 0x80;
    assert!(verify_checksums(&bad6).is_err());
    let reply = too_big4(&good, Some(42), 1480);
    assert_eq!(
        verify_checksums(&reply).unwrap(),
        ["vlan", "ipv4", "icmp", "quoted-ipv4"]
    );
    let mut bad_icmp = reply.clone();
    bad_icmp[18 + 20 + 7] ^= 0x01;
    assert!(verify_checksums(&bad_icmp).is_err());
    let ptb = too_big6(
        &frame(
            [2; 6],
            [4; 6],
            None,
            ETH_IPV6,
            &Flow::new(CLIENT6, VIP6, 1, 80, TCP).packet(0, ACK, 200),
        ),
        None,
        1460,
    );
    assert_eq!(
        verify_checksums(&ptb).unwrap(),
        ["ipv6", "icmpv6", "quoted-ipv6"]
    );
    let mut bad_ptb = ptb.clone();
    bad_ptb[14 + 40 + 8 + 100] ^= 0x01;
    assert!(verify_checksums(&bad_ptb).is_err());
}
