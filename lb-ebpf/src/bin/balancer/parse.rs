//! Parsing: IPv4 and IPv6 headers, what kind of packet it is, the ports, and the flow key
//! (built only once the port filter let the packet through). Reads go through [`header`], a
//! pointer into the packet (no stack copies) behind one bounds check.
use crate::Error;
use aya_ebpf::programs::XdpContext;
use lb_common::*;
use lb_ebpf::net::*;

/// What the forwarding step needs to know about the packet as it arrived.
#[derive(Clone, Copy)]
pub struct Packet {
    pub l2: L2,
    pub family: u8,
    /// The layer-4 protocol (after an IPv6 Fragment header, the one it carries).
    pub proto: u8,
    /// IP header length (IPv4 with options; 40 for IPv6).
    pub ihl: usize,
    /// Length of the IP packet according to its header.
    pub ip_len: usize,
    /// DSCP and ECN bits, copied to the outer header.
    pub tos: u8,
}

/// What kind of packet parsing found.
#[derive(Clone, Copy)]
pub enum Kind {
    /// TCP or UDP; the layer-4 header's offset and, for a first fragment, its id.
    Flow {
        l4: usize,
        first_fragment: Option<u32>,
    },
    /// A later fragment (no ports) with its datagram id.
    LaterFragment { id: u32 },
    /// ICMP or ICMPv6 at this offset.
    Icmp { l4: usize },
}

/// The start of a TCP or UDP header: what the port filter and connection tracking read.
#[derive(Clone, Copy)]
pub struct Ports {
    /// Source and destination port as read (network order each): `FlowKey`'s `sport` and
    /// `dport` in one word.
    pub both: u32,
    /// TCP flags (0 for UDP).
    pub tcp_flags: u8,
    /// The TCP sequence number as read (network order): only compared, never computed
    /// with. 0 for UDP.
    pub seq: u32,
}

impl Ports {
    /// The destination port (host order).
    #[inline(always)]
    pub fn dport(&self) -> u16 {
        u16::from_be((self.both >> 16) as u16)
    }
}

/// Reads the ports (and TCP's flags and sequence number) of the TCP or UDP header at `l4`.
#[inline(always)]
pub fn ports(ctx: &XdpContext, pkt: &Packet, l4: usize, end: usize) -> Result<Ports, Error> {
    if pkt.proto == PROTO_TCP {
        let th = header_within::<20>(ctx, l4, end)?;
        // SAFETY: `header_within` checked the 20 bytes at `th`.
        let (both, seq) = unsafe { (wide::load32(th.as_ptr()), wide::load32(th.as_ptr().add(4))) };
        Ok(Ports {
            both,
            tcp_flags: th[13],
            seq,
        })
    } else {
        let uh = header_within::<8>(ctx, l4, end)?;
        Ok(Ports {
            // SAFETY: `header_within` checked the 8 bytes at `uh`.
            both: unsafe { wide::load32(uh.as_ptr()) },
            tcp_flags: 0,
            seq: 0,
        })
    }
}

/// Writes the flow key of the packet whose IP header is at `l3`: its addresses, protocol and
/// family, and `ports` (`Ports::both`, 0 for packets without ports). Five 8-byte stores into
/// the key (8-aligned) from wide loads of the packet: no zeroing first, no byte copies.
/// `l3` is passed as a value, not read from `pkt`: the verifier must see its bounds, which
/// a copy of `Packet` in memory can lose.
#[inline(always)]
pub fn flow_key(
    ctx: &XdpContext,
    l3: usize,
    pkt: &Packet,
    ports: u32,
    key: &mut core::mem::MaybeUninit<FlowKey>,
) -> Result<(), Error> {
    let last = ports as u64 | (pkt.proto as u64) << 32 | (pkt.family as u64) << 40;
    let words = if pkt.family == FAMILY_V4 {
        let a = header::<8>(ctx, l3 + 12)?;
        // SAFETY: `header` checked the 8 bytes at `a`: source, then destination address.
        let both = unsafe { wide::load64(a.as_ptr()) };
        [both & 0xffff_ffff, 0, both >> 32, 0, last]
    } else {
        let a = header::<32>(ctx, l3 + 8)?.as_ptr();
        // SAFETY: `header` checked the 32 bytes at `a`: source, then destination address.
        unsafe {
            [
                wide::load64(a),
                wide::load64(a.add(8)),
                wide::load64(a.add(16)),
                wide::load64(a.add(24)),
                last,
            ]
        }
    };
    let w = key.as_mut_ptr() as *mut u64;
    let mut i = 0;
    while i < words.len() {
        // SAFETY: `FlowKey` is 40 bytes, 8-aligned; every byte is written, padding as 0.
        unsafe { w.add(i).write(words[i]) };
        i += 1;
    }
    Ok(())
}

/// Pointer to a header inside the packet (reads through it avoid stack copies).
#[inline(always)]
pub fn header<const N: usize>(ctx: &XdpContext, offset: usize) -> Result<&[u8; N], Error> {
    let p = ptr_at::<[u8; N]>(ctx, offset)?;
    // SAFETY: `ptr_at` checked the bounds; the packet is not resized while this lives.
    Ok(unsafe { &*p })
}

/// Like [`header`], but the header must also lie within the IP packet (`end` is where the
/// IP header's length field says it ends): Ethernet padding is not a header.
#[inline(always)]
pub fn header_within<const N: usize>(
    ctx: &XdpContext,
    offset: usize,
    end: usize,
) -> Result<&[u8; N], Error> {
    if offset + N > end {
        return Err(Error::Malformed);
    }
    header::<N>(ctx, offset)
}

#[inline(always)]
pub fn ipv4(ctx: &XdpContext, l2: L2) -> Result<(Packet, Kind), Error> {
    let l3 = l2.l3;
    let h = header::<IPV4_LEN>(ctx, l3)?;
    // SAFETY: `header` checked the 20 bytes at `h`: its first two words, in two loads.
    let (w0, w1) = unsafe { (wide::load32(h.as_ptr()), wide::load32(h.as_ptr().add(4))) };
    let ihl = ((w0 & 0x0f) as usize) * 4;
    if (w0 >> 4) & 0x0f != 4 || ihl < IPV4_LEN {
        return Err(Error::Malformed);
    }
    let ip_len = u16::from_be((w0 >> 16) as u16) as usize;
    if ip_len < ihl || l3 + ip_len > ctx.data_end() - ctx.data() {
        return Err(Error::Malformed);
    }
    let pkt = Packet {
        l2,
        family: FAMILY_V4,
        proto: h[9],
        ihl,
        ip_len,
        tos: (w0 >> 8) as u8,
    };
    let frag = u16::from_be((w1 >> 16) as u16);
    let frag_id = w1 & 0xffff;
    if frag & 0x1fff != 0 {
        return Ok((pkt, Kind::LaterFragment { id: frag_id }));
    }
    let first_fragment = if frag & 0x2000 != 0 {
        Some(frag_id)
    } else {
        None
    };
    let l4 = l3 + ihl;
    let kind = match pkt.proto {
        PROTO_TCP | PROTO_UDP => Kind::Flow { l4, first_fragment },
        PROTO_ICMP => Kind::Icmp { l4 },
        _ => return Err(Error::NotVip),
    };
    Ok((pkt, kind))
}

/// IPv6 with its fixed header and at most a Fragment header after it.
#[inline(always)]
pub fn ipv6(ctx: &XdpContext, l2: L2) -> Result<(Packet, Kind), Error> {
    let l3 = l2.l3;
    let h = header::<IPV6_LEN>(ctx, l3)?;
    // SAFETY: `header` checked the 40 bytes at `h`: its first 8 bytes in one load.
    let w = unsafe { wide::load64(h.as_ptr()) };
    let (b0, b1) = (w as u8, (w >> 8) as u8);
    if b0 >> 4 != 6 {
        return Err(Error::Malformed);
    }
    let ip_len = IPV6_LEN + u16::from_be((w >> 32) as u16) as usize;
    if l3 + ip_len > ctx.data_end() - ctx.data() {
        return Err(Error::Malformed);
    }
    let tos = (b0 << 4) | (b1 >> 4);
    let mut pkt = Packet {
        l2,
        family: FAMILY_V6,
        proto: (w >> 48) as u8,
        ihl: IPV6_LEN,
        ip_len,
        tos,
    };
    let mut l4 = l3 + IPV6_LEN;
    let mut first_fragment = None;
    if pkt.proto == PROTO_IPV6_FRAG {
        let f = header_within::<8>(ctx, l4, l3 + ip_len)?;
        let off_flags = u16::from_be_bytes([f[2], f[3]]);
        let frag_id = u32::from_ne_bytes([f[4], f[5], f[6], f[7]]);
        pkt.proto = f[0];
        if off_flags >> 3 != 0 {
            return Ok((pkt, Kind::LaterFragment { id: frag_id }));
        }
        if off_flags & 1 != 0 {
            first_fragment = Some(frag_id);
        }
        l4 += 8;
    }
    let kind = match pkt.proto {
        PROTO_TCP | PROTO_UDP => Kind::Flow { l4, first_fragment },
        PROTO_ICMPV6 => Kind::Icmp { l4 },
        _ => return Err(Error::NotVip),
    };
    Ok((pkt, kind))
}

#[inline(always)]
pub fn frag_key(key: &FlowKey, id: u32) -> FragKey {
    FragKey {
        src: key.src,
        dst: key.dst,
        id,
        proto: key.proto,
        family: key.family,
        _pad: [0; 2],
    }
}
