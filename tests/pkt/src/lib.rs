//! Packet building for the tests and benchmarks: the Internet checksum (RFC 1071) with the
//! TCP/UDP/ICMPv6 pseudo-headers over IPv4 and IPv6, builders for Ethernet (with an optional
//! 802.1Q tag), IPv4, IPv6 (and its Fragment header), TCP, UDP, ICMP and ICMPv6, and the few
//! big-endian field readers the users need.
//!
//! One copy for the fixture table, the differential fuzzer and its reference model, the flood
//! test and `cargo xtask bench datapath`. It is checked against an independent implementation
//! (`etherparse`) by the unit tests below, and the fixture table checks every output packet with
//! `etherparse` again.
//!
//! Builders return the bytes of the layer they build followed by its payload, so layers nest:
//!
//! ```
//! use std::net::Ipv4Addr;
//! use lb_pkt::{self as pkt, Ip4, Tcp, ETH_IPV4, TCP_SYN};
//!
//! let (c, v) = (Ipv4Addr::new(198, 51, 100, 1), Ipv4Addr::new(10, 0, 0, 1));
//! let seg = Tcp { flags: TCP_SYN, ..Tcp::new(40_000, 80) }.build(c.into(), v.into(), b"");
//! let ip = Ip4::new(c, v, pkt::TCP).build(&seg);
//! let frame = pkt::ether([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2], ETH_IPV4, &ip);
//! assert_eq!(frame.len(), 14 + 20 + 20);
//! assert_eq!(pkt::checksum(&ip[..20]), 0, "a header with its checksum sums to zero");
//! ```

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// A MAC address.
pub type Mac = [u8; 6];

/// IP protocol numbers.
pub const ICMP: u8 = 1;
pub const IPIP: u8 = 4;
pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const IPV6: u8 = 41;
pub const IPV6_FRAG: u8 = 44;
pub const GRE: u8 = 47;
pub const ICMPV6: u8 = 58;

/// Ethertypes.
pub const ETH_IPV4: u16 = 0x0800;
pub const ETH_ARP: u16 = 0x0806;
pub const ETH_IPV6: u16 = 0x86dd;
pub const ETH_8021Q: u16 = 0x8100;
pub const ETH_8021AD: u16 = 0x88a8;

/// Length of an Ethernet header without a tag.
pub const ETH_LEN: usize = 14;

/// TCP flags.
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;

/// IPv4 "don't fragment" and "more fragments" bits of the flags/fragment-offset word.
pub const IP4_DF: u16 = 0x4000;
pub const IP4_MF: u16 = 0x2000;

/// XDP verdicts (`enum xdp_action`): what `BPF_PROG_TEST_RUN` returns for a packet.
pub const XDP_ABORTED: u32 = 0;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

/// `XDP_TX` for 3, `verdict 7` for a value that is no verdict.
pub fn verdict_name(v: u32) -> String {
    match v {
        XDP_ABORTED => "XDP_ABORTED".into(),
        XDP_DROP => "XDP_DROP".into(),
        XDP_PASS => "XDP_PASS".into(),
        XDP_TX => "XDP_TX".into(),
        XDP_REDIRECT => "XDP_REDIRECT".into(),
        v => format!("verdict {v}"),
    }
}

// ---------------------------------------------------------------------------------------------
// The Internet checksum.

/// A running one's-complement sum of 16-bit big-endian words (RFC 1071). Pieces may have any
/// length: an odd piece's last byte pairs with the next piece's first, as if the pieces were
/// one buffer (a trailing odd byte is padded with zero).
#[derive(Clone, Copy, Debug, Default)]
pub struct Csum {
    sum: u64,
    odd: bool,
}

impl Csum {
    pub fn new() -> Csum {
        Csum::default()
    }

    /// Adds `data` to the sum.
    pub fn push(mut self, data: &[u8]) -> Csum {
        for &b in data {
            self.sum += if self.odd { b as u64 } else { (b as u64) << 8 };
            self.odd = !self.odd;
        }
        self
    }

    /// The checksum: the folded sum, complemented.
    pub fn finish(self) -> u16 {
        let mut s = self.sum;
        while s > 0xffff {
            s = (s & 0xffff) + (s >> 16);
        }
        !(s as u16)
    }
}

/// The Internet checksum of `data` (IPv4 header, ICMP message). Over a header that holds its
/// own correct checksum the result is 0.
pub fn checksum(data: &[u8]) -> u16 {
    Csum::new().push(data).finish()
}

/// The sum of the pseudo-header of a TCP, UDP or ICMPv6 message of `len` bytes: RFC 793/768
/// for IPv4 (source, destination, zero, protocol, 16-bit length), RFC 8200 §8.1 for IPv6
/// (source, destination, 32-bit length, three zero bytes, next header). Panics on mixed
/// address families.
pub fn pseudo_header(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> Csum {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => Csum::new()
            .push(&s.octets())
            .push(&d.octets())
            .push(&[0, proto])
            .push(&(len as u16).to_be_bytes()),
        (IpAddr::V6(s), IpAddr::V6(d)) => Csum::new()
            .push(&s.octets())
            .push(&d.octets())
            .push(&(len as u32).to_be_bytes())
            .push(&[0, 0, 0, proto]),
        _ => panic!("mixed address families: {src} -> {dst}"),
    }
}

/// The checksum of a TCP, UDP or ICMPv6 message `seg` (its checksum field zero) with its
/// pseudo-header. UDP's "0 means none" rule is [`Udp`]'s business, not this one's.
pub fn l4_checksum(src: IpAddr, dst: IpAddr, proto: u8, seg: &[u8]) -> u16 {
    pseudo_header(src, dst, proto, seg.len()).push(seg).finish()
}

/// Recomputes the header checksum of the IPv4 header at the start of `p` after a field was
/// patched: over IHL × 4 bytes, or the fixed 20 bytes if the IHL is below 5 (a malformed
/// header, built to be refused), and never beyond `p`.
pub fn set_ip4_checksum(p: &mut [u8]) {
    let ihl = ip4_ihl(p).max(20).min(p.len());
    p[10..12].copy_from_slice(&[0, 0]);
    let c = checksum(&p[..ihl]);
    p[10..12].copy_from_slice(&c.to_be_bytes());
}

// ---------------------------------------------------------------------------------------------
// Field readers.

/// The big-endian 16-bit word at `off`.
pub fn be16(b: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([b[off], b[off + 1]])
}

/// The big-endian 32-bit word at `off`.
pub fn be32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

/// The ethertype of a frame (the outer one: 0x8100 for a tagged frame).
pub fn ethertype(f: &[u8]) -> u16 {
    be16(f, 12)
}

/// The six bytes at `off` (a frame's destination MAC at 0, its source at 6).
pub fn mac_at(f: &[u8], off: usize) -> Mac {
    f[off..off + 6].try_into().unwrap()
}

/// `02:00:00:00:00:01`.
pub fn mac_str(m: &Mac) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The header length (IHL × 4) of the IPv4 header at the start of `p`.
pub fn ip4_ihl(p: &[u8]) -> usize {
    (p[0] & 0x0f) as usize * 4
}

/// The total length field of the IPv4 header at the start of `p`.
pub fn ip4_total_len(p: &[u8]) -> usize {
    be16(p, 2) as usize
}

/// Source and destination of the IPv4 header at the start of `p`.
pub fn ip4_addrs(p: &[u8]) -> (Ipv4Addr, Ipv4Addr) {
    let a = |o: usize| Ipv4Addr::from(<[u8; 4]>::try_from(&p[o..o + 4]).unwrap());
    (a(12), a(16))
}

/// The payload length field of the IPv6 header at the start of `p`.
pub fn ip6_payload_len(p: &[u8]) -> usize {
    be16(p, 4) as usize
}

/// Source and destination of the IPv6 header at the start of `p`.
pub fn ip6_addrs(p: &[u8]) -> (Ipv6Addr, Ipv6Addr) {
    let a = |o: usize| Ipv6Addr::from(<[u8; 16]>::try_from(&p[o..o + 16]).unwrap());
    (a(8), a(24))
}

// ---------------------------------------------------------------------------------------------
// Builders.

/// An Ethernet frame: destination, source, ethertype, payload.
pub fn ether(dst: Mac, src: Mac, ethertype: u16, payload: &[u8]) -> Vec<u8> {
    ether_vlan(dst, src, None, ethertype, payload)
}

/// An Ethernet frame with an 802.1Q tag (TPID 0x8100, then `vlan`'s TCI) if `vlan` is set.
pub fn ether_vlan(
    dst: Mac,
    src: Mac,
    vlan: Option<u16>,
    ethertype: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut f = Vec::with_capacity(18 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    if let Some(tci) = vlan {
        f.extend(ETH_8021Q.to_be_bytes());
        f.extend(tci.to_be_bytes());
    }
    f.extend(ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// Inserts an 802.1Q tag with `tci` into an untagged frame (after the MACs).
pub fn add_vlan(f: &mut Vec<u8>, tci: u16) {
    let [a, b] = ETH_8021Q.to_be_bytes();
    let [c, d] = tci.to_be_bytes();
    f.splice(12..12, [a, b, c, d]);
}

/// An IPv4 header; [`Ip4::build`] fills in the total length and the header checksum.
#[derive(Clone, Debug)]
pub struct Ip4 {
    pub tos: u8,
    pub id: u16,
    /// Flags ([`IP4_DF`], [`IP4_MF`]) and fragment offset (in 8-byte units), as on the wire.
    pub frag: u16,
    pub ttl: u8,
    pub proto: u8,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    /// Options (a multiple of 4 bytes, at most 40).
    pub options: Vec<u8>,
}

impl Ip4 {
    /// TOS 0, id 0, no flags, TTL 64, no options.
    pub fn new(src: Ipv4Addr, dst: Ipv4Addr, proto: u8) -> Ip4 {
        Ip4 {
            tos: 0,
            id: 0,
            frag: 0,
            ttl: 64,
            proto,
            src,
            dst,
            options: Vec::new(),
        }
    }

    /// The header (with its checksum) followed by `payload`.
    pub fn build(&self, payload: &[u8]) -> Vec<u8> {
        assert!(self.options.len().is_multiple_of(4) && self.options.len() <= 40);
        let ihl = 20 + self.options.len();
        let total = ihl + payload.len();
        let mut p = Vec::with_capacity(total);
        p.push(0x40 | (ihl / 4) as u8);
        p.push(self.tos);
        p.extend((total as u16).to_be_bytes());
        p.extend(self.id.to_be_bytes());
        p.extend(self.frag.to_be_bytes());
        p.push(self.ttl);
        p.push(self.proto);
        p.extend([0, 0]);
        p.extend(self.src.octets());
        p.extend(self.dst.octets());
        p.extend_from_slice(&self.options);
        let c = checksum(&p[..ihl]);
        p[10..12].copy_from_slice(&c.to_be_bytes());
        p.extend_from_slice(payload);
        p
    }
}

/// An IPv6 header; [`Ip6::build`] fills in the payload length.
#[derive(Clone, Copy, Debug)]
pub struct Ip6 {
    /// Traffic class.
    pub tc: u8,
    /// Flow label (20 bits; higher bits are dropped).
    pub label: u32,
    pub next: u8,
    pub hop: u8,
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
}

impl Ip6 {
    /// Traffic class 0, flow label 0, hop limit 64.
    pub fn new(src: Ipv6Addr, dst: Ipv6Addr, next: u8) -> Ip6 {
        Ip6 {
            tc: 0,
            label: 0,
            next,
            hop: 64,
            src,
            dst,
        }
    }

    /// The header followed by `payload`.
    pub fn build(&self, payload: &[u8]) -> Vec<u8> {
        let mut p = Vec::with_capacity(40 + payload.len());
        let first = (6u32 << 28) | ((self.tc as u32) << 20) | (self.label & 0xf_ffff);
        p.extend(first.to_be_bytes());
        p.extend((payload.len() as u16).to_be_bytes());
        p.push(self.next);
        p.push(self.hop);
        p.extend(self.src.octets());
        p.extend(self.dst.octets());
        p.extend_from_slice(payload);
        p
    }
}

/// An IPv6 Fragment header (RFC 8200 §4.5): next header, reserved, then the 13-bit fragment
/// offset (in 8-byte units) in the top bits of a 16-bit word whose lowest bit is M ("more
/// fragments"), then the 32-bit identification. Offset bits beyond 13 do not fit the field
/// and are dropped.
pub fn frag6(next: u8, offset: u16, more: bool, id: u32) -> [u8; 8] {
    let of = ((offset & 0x1fff) << 3) | more as u16;
    let [o0, o1] = of.to_be_bytes();
    let [i0, i1, i2, i3] = id.to_be_bytes();
    [next, 0, o0, o1, i0, i1, i2, i3]
}

/// An IPv4 or IPv6 header (by the addresses' family) from `src` to `dst` with defaults
/// ([`Ip4::new`], [`Ip6::new`]), followed by `payload`.
pub fn ip(src: IpAddr, dst: IpAddr, proto: u8, payload: &[u8]) -> Vec<u8> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => Ip4::new(s, d, proto).build(payload),
        (IpAddr::V6(s), IpAddr::V6(d)) => Ip6::new(s, d, proto).build(payload),
        _ => panic!("mixed address families: {src} -> {dst}"),
    }
}

/// A TCP header; [`Tcp::build`] fills in the data offset and the checksum.
#[derive(Clone, Debug)]
pub struct Tcp {
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub window: u16,
    /// Options (a multiple of 4 bytes, at most 40).
    pub options: Vec<u8>,
}

impl Tcp {
    /// Sequence and acknowledgement numbers 0, no flags, window 64240, no options.
    pub fn new(sport: u16, dport: u16) -> Tcp {
        Tcp {
            sport,
            dport,
            seq: 0,
            ack: 0,
            flags: 0,
            window: 64_240,
            options: Vec::new(),
        }
    }

    /// The segment from `src` to `dst` with `payload` and a valid checksum.
    pub fn build(&self, src: IpAddr, dst: IpAddr, payload: &[u8]) -> Vec<u8> {
        assert!(self.options.len().is_multiple_of(4) && self.options.len() <= 40);
        let mut s = Vec::with_capacity(20 + self.options.len() + payload.len());
        s.extend(self.sport.to_be_bytes());
        s.extend(self.dport.to_be_bytes());
        s.extend(self.seq.to_be_bytes());
        s.extend(self.ack.to_be_bytes());
        s.push(((5 + self.options.len() / 4) as u8) << 4);
        s.push(self.flags);
        s.extend(self.window.to_be_bytes());
        s.extend([0, 0, 0, 0]);
        s.extend_from_slice(&self.options);
        s.extend_from_slice(payload);
        let c = l4_checksum(src, dst, TCP, &s);
        s[16..18].copy_from_slice(&c.to_be_bytes());
        s
    }
}

/// A UDP datagram with a valid checksum (a computed 0 is sent as 0xffff: RFC 768, and RFC 8200
/// §8.1 for IPv6, where 0 is not allowed).
pub fn udp(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut s = Vec::with_capacity(8 + payload.len());
    s.extend(sport.to_be_bytes());
    s.extend(dport.to_be_bytes());
    s.extend(((8 + payload.len()) as u16).to_be_bytes());
    s.extend([0, 0]);
    s.extend_from_slice(payload);
    let c = match l4_checksum(src, dst, UDP, &s) {
        0 => 0xffff,
        c => c,
    };
    s[6..8].copy_from_slice(&c.to_be_bytes());
    s
}

/// An ICMP (IPv4) message: type, code, the four "rest of header" bytes, body; checksum over
/// the message only (RFC 792).
pub fn icmp4(typ: u8, code: u8, rest: [u8; 4], body: &[u8]) -> Vec<u8> {
    let mut m = vec![typ, code, 0, 0];
    m.extend(rest);
    m.extend_from_slice(body);
    let c = checksum(&m);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    m
}

/// An ICMPv6 message from `src` to `dst`; checksum with the pseudo-header (RFC 4443 §2.3).
pub fn icmp6(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    typ: u8,
    code: u8,
    rest: [u8; 4],
    body: &[u8],
) -> Vec<u8> {
    let mut m = vec![typ, code, 0, 0];
    m.extend(rest);
    m.extend_from_slice(body);
    let c = l4_checksum(src.into(), dst.into(), ICMPV6, &m);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    m
}

#[cfg(test)]
mod unit {
    use super::*;
    use etherparse::{
        IcmpEchoHeader, Icmpv4Header, Icmpv4Type, Icmpv6Header, Icmpv6Type, IpFragOffset, IpNumber,
        Ipv4Header, Ipv6FragmentHeader, Ipv6Header, TcpHeader, UdpHeader,
    };

    const C4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
    const V4: Ipv4Addr = Ipv4Addr::new(10, 210, 0, 100);
    const C6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x10);
    const V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x210, 0, 0, 0, 0, 0, 0x100);

    fn data(n: usize) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(37).wrapping_add(5))
            .collect()
    }

    #[test]
    fn rfc1071_example() {
        // RFC 1071 §3: the words 0001 f203 f4f5 f6f7 sum to 0xddf2 (folded); the checksum is
        // its complement.
        let d = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(checksum(&d), !0xddf2);
        // Split at odd offsets: the same sum.
        assert_eq!(Csum::new().push(&d[..3]).push(&d[3..]).finish(), !0xddf2);
        // Odd length: padded with a zero byte.
        assert_eq!(checksum(&[0xab]), !0xab00);
        assert_eq!(checksum(&[]), 0xffff);
    }

    #[test]
    fn ip4_header_matches_etherparse() {
        for options in [vec![], vec![1, 1, 1, 0], vec![7; 40]] {
            let h = Ip4 {
                tos: 0xb9,
                id: 0x4d2e,
                frag: IP4_DF | 3,
                ttl: 57,
                options: options.clone(),
                ..Ip4::new(C4, V4, TCP)
            };
            let p = h.build(&data(33));
            let e = etherparse::Ipv4HeaderSlice::from_slice(&p).unwrap();
            let want = e.to_header().calc_header_checksum();
            assert_eq!(e.header_checksum(), want);
            assert_eq!(checksum(&p[..20 + options.len()]), 0);
            assert_eq!(e.total_len() as usize, p.len());
            assert_eq!(e.fragments_offset().value(), 3);
            assert!(e.dont_fragment());
            assert_eq!(ip4_ihl(&p), 20 + options.len());
            assert_eq!(ip4_total_len(&p), p.len());
            assert_eq!(ip4_addrs(&p), (C4, V4));
        }
        // Bit for bit what etherparse writes.
        let mut e = Ipv4Header::new(20, 64, IpNumber::TCP, C4.octets(), V4.octets()).unwrap();
        e.identification = 7;
        e.dont_fragment = true;
        e.header_checksum = e.calc_header_checksum();
        let h = Ip4 {
            id: 7,
            frag: IP4_DF,
            ..Ip4::new(C4, V4, TCP)
        };
        assert_eq!(h.build(&[0; 20])[..20], e.to_bytes()[..]);
        // A patched header gets its checksum back.
        let mut p = h.build(&[]);
        p[8] = 3;
        set_ip4_checksum(&mut p);
        assert_eq!(checksum(&p), 0);
        // IHL 4 (malformed): the fixed 20 bytes.
        p[0] = 0x44;
        set_ip4_checksum(&mut p);
        assert_eq!(checksum(&p[..20]), 0);
    }

    #[test]
    fn ip6_header_and_fragment_match_etherparse() {
        let h = Ip6 {
            tc: 0xb9,
            label: 0x5_4321,
            hop: 57,
            ..Ip6::new(C6, V6, UDP)
        };
        let p = h.build(&data(11));
        let e = Ipv6Header {
            traffic_class: 0xb9,
            flow_label: etherparse::Ipv6FlowLabel::try_new(0x5_4321).unwrap(),
            payload_length: 11,
            next_header: IpNumber::UDP,
            hop_limit: 57,
            source: C6.octets(),
            destination: V6.octets(),
        };
        assert_eq!(p[..40], e.to_bytes()[..]);
        assert_eq!(ip6_payload_len(&p), 11);
        assert_eq!(ip6_addrs(&p), (C6, V6));
        for (offset, more) in [(0, true), (1, false), (0x1fff, true), (185, false)] {
            let f = Ipv6FragmentHeader::new(
                IpNumber::TCP,
                IpFragOffset::try_new(offset).unwrap(),
                more,
                0xdead_beef,
            );
            assert_eq!(frag6(TCP, offset, more, 0xdead_beef), f.to_bytes());
        }
        // 13 bits: an offset beyond them does not spill into the M flag or the reserved bits.
        assert_eq!(frag6(TCP, 0x2001, false, 1), frag6(TCP, 1, false, 1));
    }

    #[test]
    fn tcp_and_udp_checksums_match_etherparse() {
        for (src, dst) in [(IpAddr::V4(C4), IpAddr::V4(V4)), (C6.into(), V6.into())] {
            for len in [0, 1, 7, 100] {
                let payload = data(len);
                let t = Tcp {
                    seq: 0x1a2b_3c4d,
                    ack: 0x5e6f_7081,
                    flags: TCP_ACK | TCP_PSH,
                    options: vec![1; 8],
                    ..Tcp::new(40_000, 80)
                };
                let s = t.build(src, dst, &payload);
                let e = etherparse::TcpSlice::from_slice(&s).unwrap();
                let want = match (src, dst) {
                    (IpAddr::V4(a), IpAddr::V4(b)) => e.calc_checksum_ipv4(a.octets(), b.octets()),
                    (IpAddr::V6(a), IpAddr::V6(b)) => e.calc_checksum_ipv6(a.octets(), b.octets()),
                    _ => unreachable!(),
                }
                .unwrap();
                assert_eq!(e.checksum(), want, "TCP {src} len {len}");
                assert_eq!(e.data_offset(), 7);
                assert_eq!(
                    (e.sequence_number(), e.acknowledgment_number()),
                    (t.seq, t.ack)
                );
                assert_eq!(e.payload(), &payload[..]);

                let u = udp(src, dst, 5353, 53, &payload);
                let (h, rest) = UdpHeader::from_slice(&u).unwrap();
                let want = match (src, dst) {
                    (IpAddr::V4(a), IpAddr::V4(b)) => {
                        h.calc_checksum_ipv4_raw(a.octets(), b.octets(), rest)
                    }
                    (IpAddr::V6(a), IpAddr::V6(b)) => {
                        h.calc_checksum_ipv6_raw(a.octets(), b.octets(), rest)
                    }
                    _ => unreachable!(),
                }
                .unwrap();
                assert_eq!(h.checksum, want, "UDP {src} len {len}");
                assert_eq!(h.length as usize, u.len());
            }
        }
        // Bit for bit what etherparse writes for a bare SYN.
        let mut e = TcpHeader::new(40_000, 80, 1000, 64_240);
        e.syn = true;
        e.checksum = e
            .calc_checksum_ipv4_raw(C4.octets(), V4.octets(), &[])
            .unwrap();
        let t = Tcp {
            seq: 1000,
            flags: TCP_SYN,
            ..Tcp::new(40_000, 80)
        };
        assert_eq!(t.build(C4.into(), V4.into(), &[])[..], e.to_bytes()[..]);
    }

    #[test]
    fn icmp_checksums_match_etherparse() {
        let body = data(28);
        let m = icmp4(3, 4, [0, 0, 0x05, 0x78], &body);
        let e = Icmpv4Header::with_checksum(
            Icmpv4Type::DestinationUnreachable(
                etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded {
                    next_hop_mtu: 1400,
                },
            ),
            &body,
        );
        assert_eq!(m[..8], e.to_bytes()[..]);
        let echo = icmp4(8, 0, [0, 1, 0, 2], &body);
        let e = Icmpv4Header::with_checksum(
            Icmpv4Type::EchoRequest(IcmpEchoHeader { id: 1, seq: 2 }),
            &body,
        );
        assert_eq!(echo[..8], e.to_bytes()[..]);

        let m = icmp6(V6, C6, 2, 0, 1460u32.to_be_bytes(), &body);
        let e = Icmpv6Header::with_checksum(
            Icmpv6Type::PacketTooBig { mtu: 1460 },
            V6.octets(),
            C6.octets(),
            &body,
        )
        .unwrap();
        assert_eq!(m[..8], e.to_bytes()[..]);
    }

    #[test]
    fn ethernet_and_vlan() {
        let d = [2, 0, 0, 0, 0, 1];
        let s = [2, 0, 0, 0, 0, 2];
        let plain = ether(d, s, ETH_IPV4, &[9; 4]);
        assert_eq!(plain.len(), 18);
        assert_eq!(ethertype(&plain), ETH_IPV4);
        assert_eq!((mac_at(&plain, 0), mac_at(&plain, 6)), (d, s));
        let tagged = ether_vlan(d, s, Some(0x0123), ETH_IPV6, &[9; 4]);
        assert_eq!(ethertype(&tagged), ETH_8021Q);
        assert_eq!(be16(&tagged, 14), 0x0123);
        assert_eq!(be16(&tagged, 16), ETH_IPV6);
        let mut added = ether(d, s, ETH_IPV6, &[9; 4]);
        add_vlan(&mut added, 0x0123);
        assert_eq!(added, tagged);
        let v = etherparse::SingleVlanHeaderSlice::from_slice(&tagged[ETH_LEN..]).unwrap();
        assert_eq!(
            (v.vlan_identifier().value(), v.ether_type()),
            (0x123, ETH_IPV6.into())
        );
        assert_eq!(mac_str(&d), "02:00:00:00:00:01");
        assert_eq!(
            (verdict_name(XDP_TX).as_str(), verdict_name(7).as_str()),
            ("XDP_TX", "verdict 7")
        );
        assert_eq!(be32(&[0, 1, 2, 3, 4], 1), 0x0102_0304);
    }
}
