//! ICMP: errors about VIP flows ("fragmentation needed", "packet too big") go to the flow's
//! backend; packets too big once encapsulated are answered with one. The replies are cold
//! paths in separate BPF functions, so the hot path does not carry their stack frames.
use crate::forward::{adjust_head, adjust_tail};
use crate::maps::{established, live_backend_ref, lookup_vip, BACKENDS, CT_NEW};
use crate::parse::{header_within, Packet};
use crate::{adjusted, conntrack::from_table, Decision, Error};
use aya_ebpf::{bindings::xdp_md, programs::XdpContext};
use lb_common::*;
use lb_ebpf::net::*;

/// ICMP "fragmentation needed" (IPv4) or "packet too big" (IPv6) about a VIP flow goes to
/// the backend serving that flow; other ICMP is the kernel's business. Replaces `key` with
/// the quoted flow, seen from the client.
#[inline(always)]
pub fn icmp_error(
    ctx: &XdpContext,
    l4: usize,
    end: usize,
    key: &mut FlowKey,
) -> Result<Decision, Error> {
    let family = key.family;
    let ih = header_within::<8>(ctx, l4, end)?;
    let ours = if family == FAMILY_V4 {
        ih[0] == 3 && ih[1] == 4
    } else {
        ih[0] == 2
    };
    if !ours {
        return Err(Error::NotVip);
    }
    let vip = quoted_flow(ctx, l4 + 8, end, key)?;
    // SAFETY: LRU elements, copied out at once.
    let tracked = match established(key) {
        Some(v) => Some(unsafe { *v }),
        None => CT_NEW.get_ptr(&*key).map(|v| unsafe { *v }),
    };
    let (id, backend, hash) =
        match tracked.and_then(|v| live_backend_ref(v.backend).map(|b| (v.backend, b, v.hash))) {
            Some(t) => t,
            None => {
                let (id, hash) = from_table(key, &vip)?;
                // `from_table` found the backend live: its entry, in place.
                (id, BACKENDS.get(id).ok_or(Error::NoBackend)?, hash)
            }
        };
    Ok(Decision {
        id,
        backend,
        hash,
        reply_too_big: false,
        counter: Some(Counter::IcmpForwarded),
    })
}

/// Reads the quoted packet of an ICMP error: returns the flow it belongs to, seen from the
/// client (the quoted packet went from the VIP to the client).
#[inline(always)]
pub fn quoted_flow(
    ctx: &XdpContext,
    q: usize,
    end: usize,
    key: &mut FlowKey,
) -> Result<VipMeta, Error> {
    *key = FlowKey {
        family: key.family,
        ..FlowKey::default()
    };
    let l4 = if key.family == FAMILY_V4 {
        let qh = header_within::<IPV4_LEN>(ctx, q, end)?;
        let qihl = ((qh[0] & 0x0f) as usize) * 4;
        if qh[0] >> 4 != 4 || qihl < IPV4_LEN {
            return Err(Error::Malformed);
        }
        key.proto = qh[9];
        key.src[..4].copy_from_slice(&qh[16..20]);
        key.dst[..4].copy_from_slice(&qh[12..16]);
        q + qihl
    } else {
        let qh = header_within::<IPV6_LEN>(ctx, q, end)?;
        if qh[0] >> 4 != 6 {
            return Err(Error::Malformed);
        }
        key.proto = qh[6];
        key.src.copy_from_slice(&qh[24..40]);
        key.dst.copy_from_slice(&qh[8..24]);
        q + IPV6_LEN
    };
    if key.proto != PROTO_TCP && key.proto != PROTO_UDP {
        return Err(Error::IcmpNotVip);
    }
    let ports = header_within::<4>(ctx, l4, end)?;
    key.sport = u16::from_ne_bytes([ports[2], ports[3]]);
    key.dport = u16::from_ne_bytes([ports[0], ports[1]]);
    lookup_vip(key).ok_or(Error::IcmpNotVip)
}

/// The packet is too big once encapsulated: turn it into the ICMP error for its sender and
/// send that back out (`Error::TooBigReplied`), or say why it could not be.
#[inline(always)]
pub fn too_big(ctx: &XdpContext, pkt: &Packet, key: &FlowKey, mtu: u16, reply: bool) -> Error {
    if !reply {
        return Error::TooBig;
    }
    // The cold functions get a copy made here, on the cold path: the hot path's `Packet`
    // itself is never referenced from outside, so it stays in registers (a referenced one was
    // written to the stack on every packet).
    let pkt = &{ *pkt };
    let sent = if pkt.family == FAMILY_V4 {
        icmp4_too_big(ctx.ctx, pkt, key, mtu.saturating_sub(IPV4_LEN as u16))
    } else {
        icmp6_too_big(ctx.ctx, pkt, key, mtu.saturating_sub(IPV6_LEN as u16))
    };
    match sent {
        Ok(()) => Error::TooBigReplied,
        Err(e) => e,
    }
}

/// Rewrites the packet in place into ICMP "fragmentation needed" (type 3 code 4) from the
/// VIP to the client, quoting the IP header and 8 bytes of payload (RFC 792).
/// A separate BPF function: a cold path whose stack frame the hot path does not carry.
#[inline(never)]
pub fn icmp4_too_big(ctx: *mut xdp_md, pkt: &Packet, key: &FlowKey, mtu: u16) -> Result<(), Error> {
    let ctx = &XdpContext::new(ctx);
    let quote = pkt.ihl + 8;
    if pkt.ip_len < quote {
        return Err(Error::TooBig);
    }
    // The client's frame goes back to it: the addresses swap.
    let (us, client) = read_macs(ctx)?;
    const GROW: usize = IPV4_LEN + 8;
    adjust_head(ctx, -(GROW as i32))?;
    let len = ctx.data_end() - ctx.data();
    let want = pkt.l2.l3 + GROW + quote;
    adjust_tail(ctx, want as i32 - len as i32)?;
    let l3 = write_l2(ctx, Macs::new(&client, &us), pkt.l2.vlan_tci, ETH_P_IP).map_err(adjusted)?;
    // SAFETY: the only view of the packet while `h` is used (earlier views are
    // dead), and the packet is not resized meanwhile.
    let h = unsafe { bytes_mut::<IPV4_LEN>(ctx, l3) }.map_err(adjusted)?;
    *h = [0; IPV4_LEN];
    h[0] = 0x45;
    h[2..4].copy_from_slice(&((GROW + quote) as u16).to_be_bytes());
    h[8] = DEFAULT_TTL;
    h[9] = PROTO_ICMP;
    h[12..16].copy_from_slice(&key.dst[..4]);
    h[16..20].copy_from_slice(&key.src[..4]);
    let c = csum_fold(csum_add_bytes(0, h));
    h[10..12].copy_from_slice(&c.to_ne_bytes());
    // SAFETY: the only view of the packet while `icmp` is used (earlier views are
    // dead), and the packet is not resized meanwhile.
    let icmp = unsafe { bytes_mut::<8>(ctx, l3 + IPV4_LEN) }.map_err(adjusted)?;
    *icmp = [3, 4, 0, 0, 0, 0, 0, 0];
    icmp[6..8].copy_from_slice(&mtu.to_be_bytes());
    let sum = csum_add_bytes(0, icmp);
    let sum = csum_packet::<68>(ctx, l3 + GROW, quote, sum).map_err(adjusted)?;
    // SAFETY: the only view of the packet while `icmp` is used (earlier views are
    // dead), and the packet is not resized meanwhile.
    let icmp = unsafe { bytes_mut::<8>(ctx, l3 + IPV4_LEN) }.map_err(adjusted)?;
    icmp[2..4].copy_from_slice(&csum_fold(sum).to_ne_bytes());
    Ok(())
}

/// Rewrites the packet in place into ICMPv6 "packet too big" from the VIP to the client,
/// quoting the start of the original packet. A separate BPF function, like `icmp4_too_big`.
#[inline(never)]
pub fn icmp6_too_big(ctx: *mut xdp_md, pkt: &Packet, key: &FlowKey, mtu: u16) -> Result<(), Error> {
    let ctx = &XdpContext::new(ctx);
    let quote = if pkt.ip_len < ICMP6_QUOTE_LEN {
        pkt.ip_len
    } else {
        ICMP6_QUOTE_LEN
    };
    // The client's frame goes back to it: the addresses swap.
    let (us, client) = read_macs(ctx)?;
    const GROW: usize = IPV6_LEN + 8;
    adjust_head(ctx, -(GROW as i32))?;
    let len = ctx.data_end() - ctx.data();
    let want = pkt.l2.l3 + GROW + quote;
    adjust_tail(ctx, want as i32 - len as i32)?;
    let l3 =
        write_l2(ctx, Macs::new(&client, &us), pkt.l2.vlan_tci, ETH_P_IPV6).map_err(adjusted)?;
    let plen = (8 + quote) as u16;
    // SAFETY: the only view of the packet while `h` is used (earlier views are
    // dead), and the packet is not resized meanwhile.
    let h = unsafe { bytes_mut::<IPV6_LEN>(ctx, l3) }.map_err(adjusted)?;
    h[0..4].copy_from_slice(&[0x60, 0, 0, 0]);
    h[4..6].copy_from_slice(&plen.to_be_bytes());
    h[6] = PROTO_ICMPV6;
    h[7] = DEFAULT_TTL;
    h[8..24].copy_from_slice(&key.dst);
    h[24..40].copy_from_slice(&key.src);
    // SAFETY: the only view of the packet while `icmp` is used (earlier views are
    // dead), and the packet is not resized meanwhile.
    let icmp = unsafe { bytes_mut::<8>(ctx, l3 + IPV6_LEN) }.map_err(adjusted)?;
    *icmp = [2, 0, 0, 0, 0, 0, 0, 0];
    icmp[4..8].copy_from_slice(&(mtu as u32).to_be_bytes());
    let plen = plen.to_be_bytes();
    let pseudo = [0, 0, plen[0], plen[1], 0, 0, 0, PROTO_ICMPV6];
    let mut sum = csum_add_bytes(0, &key.dst);
    sum = csum_add_bytes(sum, &key.src);
    sum = csum_add_bytes(sum, &pseudo);
    sum = csum_add_bytes(sum, icmp);
    let sum = csum_packet::<ICMP6_QUOTE_LEN>(ctx, l3 + GROW, quote, sum).map_err(adjusted)?;
    // SAFETY: the only view of the packet while `icmp` is used (earlier views are
    // dead), and the packet is not resized meanwhile.
    let icmp = unsafe { bytes_mut::<8>(ctx, l3 + IPV6_LEN) }.map_err(adjusted)?;
    icmp[2..4].copy_from_slice(&csum_fold(sum).to_ne_bytes());
    Ok(())
}
