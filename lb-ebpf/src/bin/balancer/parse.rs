//! Parsing: IPv4 and IPv6 headers into the flow key, and what kind of packet it is. Reads go
//! through [`header`], a pointer into the packet (no stack copies) behind one bounds check.
use crate::Error;
use aya_ebpf::programs::XdpContext;
use lb_common::*;
use lb_ebpf::net::*;

/// Zeroes the flow key with twenty 2-byte stores (its alignment). `FlowKey::default()`
/// compiles into a call to compiler_builtins' byte-at-a-time `memset`: 40 iterations on
/// every packet (docs/datapath.md, "Where the time goes"). A function of its own, like that
/// call, so the main frame keeps its size: zeroing inline made it 8 bytes larger, past the
/// 512-byte stack with `fib_lookup`.
#[inline(never)]
pub fn zero_key(key: *mut FlowKey) {
    let halves = key as *mut u16;
    let mut i = 0;
    while i < core::mem::size_of::<FlowKey>() / 2 {
        // SAFETY: the caller's key is 2-aligned and an even number of bytes long, so every
        // half-word is inside it; volatile, so that LLVM keeps the stores rather than folding
        // them back into a `memset` call.
        unsafe { core::ptr::write_volatile(halves.add(i), 0) };
        i += 1;
    }
}

/// What the forwarding step needs to know about the packet as it arrived.
#[derive(Clone, Copy)]
pub struct Packet {
    pub l2: L2,
    pub family: u8,
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
pub fn ipv4(ctx: &XdpContext, l2: L2, key: &mut FlowKey) -> Result<(Packet, Kind), Error> {
    let l3 = l2.l3;
    let h = header::<IPV4_LEN>(ctx, l3)?;
    let ihl = ((h[0] & 0x0f) as usize) * 4;
    if h[0] >> 4 != 4 || ihl < IPV4_LEN {
        return Err(Error::Malformed);
    }
    let ip_len = u16::from_be_bytes([h[2], h[3]]) as usize;
    if ip_len < ihl || l3 + ip_len > ctx.data_end() - ctx.data() {
        return Err(Error::Malformed);
    }
    key.family = FAMILY_V4;
    key.proto = h[9];
    key.src[..4].copy_from_slice(&h[12..16]);
    key.dst[..4].copy_from_slice(&h[16..20]);
    let pkt = Packet {
        l2,
        family: FAMILY_V4,
        ihl,
        ip_len,
        tos: h[1],
    };
    let frag = u16::from_be_bytes([h[6], h[7]]);
    let frag_id = u16::from_ne_bytes([h[4], h[5]]) as u32;
    if frag & 0x1fff != 0 {
        return Ok((pkt, Kind::LaterFragment { id: frag_id }));
    }
    let first_fragment = if frag & 0x2000 != 0 {
        Some(frag_id)
    } else {
        None
    };
    let l4 = l3 + ihl;
    let kind = match key.proto {
        PROTO_TCP | PROTO_UDP => Kind::Flow { l4, first_fragment },
        PROTO_ICMP => Kind::Icmp { l4 },
        _ => return Err(Error::NotVip),
    };
    Ok((pkt, kind))
}

/// IPv6 with its fixed header and at most a Fragment header after it.
#[inline(always)]
pub fn ipv6(ctx: &XdpContext, l2: L2, key: &mut FlowKey) -> Result<(Packet, Kind), Error> {
    let l3 = l2.l3;
    let h = header::<IPV6_LEN>(ctx, l3)?;
    if h[0] >> 4 != 6 {
        return Err(Error::Malformed);
    }
    let ip_len = IPV6_LEN + u16::from_be_bytes([h[4], h[5]]) as usize;
    if l3 + ip_len > ctx.data_end() - ctx.data() {
        return Err(Error::Malformed);
    }
    key.family = FAMILY_V6;
    key.proto = h[6];
    key.src.copy_from_slice(&h[8..24]);
    key.dst.copy_from_slice(&h[24..40]);
    let tos = (h[0] << 4) | (h[1] >> 4);
    let pkt = Packet {
        l2,
        family: FAMILY_V6,
        ihl: IPV6_LEN,
        ip_len,
        tos,
    };
    let mut l4 = l3 + IPV6_LEN;
    let mut first_fragment = None;
    if key.proto == PROTO_IPV6_FRAG {
        let f = header_within::<8>(ctx, l4, l3 + ip_len)?;
        let off_flags = u16::from_be_bytes([f[2], f[3]]);
        let frag_id = u32::from_ne_bytes([f[4], f[5], f[6], f[7]]);
        key.proto = f[0];
        if off_flags >> 3 != 0 {
            return Ok((pkt, Kind::LaterFragment { id: frag_id }));
        }
        if off_flags & 1 != 0 {
            first_fragment = Some(frag_id);
        }
        l4 += 8;
    }
    let kind = match key.proto {
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
