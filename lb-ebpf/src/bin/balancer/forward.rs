//! Forwarding: the next hop towards the backend (cached `bpf_fib_lookup`), then MAC rewrite
//! (`l2`) or IP-in-IP encapsulation (`ipip`), and out by `XDP_TX` or `bpf_redirect`.
use crate::icmp::too_big;
use crate::maps::{CONFIG, NEXTHOPS};
use crate::parse::Packet;
use crate::stats;
use crate::{adjusted, Decision, Error};
use aya_ebpf::{
    bindings::{bpf_fib_lookup as FibParams, xdp_action, xdp_md},
    helpers::{
        bpf_fib_lookup, bpf_jiffies64, bpf_redirect, bpf_xdp_adjust_head, bpf_xdp_adjust_tail,
    },
    programs::XdpContext,
    EbpfContext,
};
use aya_log_ebpf::warn;
use lb_common::*;
use lb_ebpf::net::*;

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// Next hop towards a backend: `bpf_fib_lookup`, cached per backend for `NEXTHOP_TTL_JIFFIES`
/// so that an established flow does not pay for a route lookup on every packet. The cache
/// entry is returned in place (no copy on the stack).
#[inline(always)]
pub fn nexthop(ctx: &XdpContext, id: u32, b: &BackendInfo) -> Result<&'static NextHop, Error> {
    // SAFETY: calling a helper without arguments.
    let now = unsafe { bpf_jiffies64() };
    let slot = NEXTHOPS.get_ptr_mut(id).ok_or(Error::Fib)?;
    // SAFETY: array slot of a map that lives as long as the program; a concurrent refresh
    // writes the same kind of value.
    let cached = unsafe { &*slot };
    if cached.expires > now {
        // ifindex 0: a failed lookup, remembered briefly so a dead route costs no lookup
        // per packet.
        return if cached.ifindex != 0 {
            Ok(cached)
        } else {
            Err(Error::Fib)
        };
    }
    let was_reachable = cached.ifindex != 0 || cached.expires == 0;
    match fib_lookup(ctx.ctx, b, now) {
        Some(nh) => {
            // SAFETY: array slot owned by this backend id.
            unsafe { *slot = nh };
            // SAFETY: as `cached`.
            Ok(unsafe { &*slot })
        }
        None => {
            let failed = NextHop {
                expires: now + NEXTHOP_RETRY_JIFFIES,
                ..NextHop::default()
            };
            // SAFETY: array slot owned by this backend id.
            unsafe { *slot = failed };
            // Log the change from reachable (or never looked up) to unreachable only: a
            // rare event, never one line per packet.
            if was_reachable {
                report_no_route(ctx.ctx, id);
            }
            Err(Error::Fib)
        }
    }
}

/// The next hop's addresses as the frame's first two words: `NextHop` keeps the source
/// address right before the destination, so two wide loads of the map value read both.
#[inline(always)]
pub fn macs(nh: &'static NextHop) -> Macs {
    // SAFETY: `smac` and `dmac` are 12 contiguous bytes of a `NEXTHOPS` value.
    unsafe { Macs::from_src_dst(nh.smac.as_ptr()) }
}

/// Tells the agent (through aya-log) that a backend became unreachable from here.
#[inline(never)]
pub fn report_no_route(ctx: *mut xdp_md, id: u32) {
    let ctx = XdpContext::new(ctx);
    warn!(
        &ctx,
        "backend id {}: no route or unresolved neighbour, its packets are dropped (drop_fib)", id
    );
}

/// `bpf_fib_lookup` towards a backend. A separate BPF function: it runs about once a second
/// per backend, and its 64-byte parameter block stays off the hot path's stack.
#[inline(never)]
pub fn fib_lookup(ctx: *mut xdp_md, b: &BackendInfo, now: u64) -> Option<NextHop> {
    let ctx = XdpContext::new(ctx);
    // SAFETY: plain C struct, all-zero is its documented initial state.
    let mut p: FibParams = unsafe { core::mem::zeroed() };
    p.ifindex = ctx.ingress_ifindex() as u32;
    if b.family == FAMILY_V4 {
        p.family = AF_INET;
        p.__bindgen_anon_4.ipv4_dst =
            u32::from_ne_bytes([b.addr[0], b.addr[1], b.addr[2], b.addr[3]]);
    } else {
        p.family = AF_INET6;
        let mut dst = [0u32; 4];
        let mut i = 0;
        while i < 4 {
            dst[i] = u32::from_ne_bytes([
                b.addr[4 * i],
                b.addr[4 * i + 1],
                b.addr[4 * i + 2],
                b.addr[4 * i + 3],
            ]);
            i += 1;
        }
        p.__bindgen_anon_4.ipv6_dst = dst;
    }
    // SAFETY: `p` is a valid, fully initialised parameter block of the size passed.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.as_ptr(),
            &mut p,
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    };
    if rc != 0 {
        return None;
    }
    Some(NextHop {
        expires: now + NEXTHOP_TTL_JIFFIES,
        ifindex: p.ifindex,
        // SAFETY: after a successful lookup the union holds the MTU.
        mtu: unsafe { p.__bindgen_anon_1.mtu_result },
        _pad0: 0,
        smac: p.smac,
        dmac: p.dmac,
        _pad1: [0; 4],
    })
}

/// Out of the ingress interface (`XDP_TX`) or another one (`bpf_redirect`).
#[inline(always)]
pub fn transmit(same_link: bool, ifindex: u32) -> u32 {
    if same_link {
        xdp_action::XDP_TX
    } else {
        // SAFETY: helper call with plain integers.
        unsafe { bpf_redirect(ifindex, 0) as u32 }
    }
}

#[inline(always)]
pub fn adjust_head(ctx: &XdpContext, delta: i32) -> Result<(), Error> {
    // SAFETY: the helper validates the delta against the buffer's headroom.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, delta) } != 0 {
        return Err(Error::Adjust);
    }
    Ok(())
}

#[inline(always)]
pub fn adjust_tail(ctx: &XdpContext, delta: i32) -> Result<(), Error> {
    // SAFETY: the helper validates the delta against the buffer.
    if unsafe { bpf_xdp_adjust_tail(ctx.ctx, delta) } != 0 {
        return Err(Error::Adjust);
    }
    Ok(())
}

/// Sends the packet to backend `id`: MAC rewrite (`l2`) or IP-in-IP encapsulation (`ipip`).
/// An encapsulated packet that would exceed the next hop's MTU is answered with ICMP
/// instead, when `reply_too_big` (never for ICMP errors themselves).
#[inline(always)]
pub fn forward(ctx: &XdpContext, pkt: &Packet, key: &FlowKey, d: &Decision) -> Result<u32, Error> {
    let (id, b) = (d.id, d.backend);
    let frame_len = (ctx.data_end() - ctx.data()) as u64;
    let nh = nexthop(ctx, id, b)?;
    // An 802.1Q tag belongs to the ingress link: kept when the frame goes back out of it,
    // dropped when it leaves by another interface (whose VLANs are not the ingress's).
    let same_link = nh.ifindex as usize == ctx.ingress_ifindex();
    let vlan = if same_link { pkt.l2.vlan_tci } else { None };
    if b.mode == MODE_L2 {
        if vlan.is_some() || pkt.l2.vlan_tci.is_none() {
            write_macs(ctx, 0, macs(nh))?;
        } else {
            untag(ctx, nh)?;
        }
    } else {
        encapsulate(ctx, pkt, key, d.hash, b, nh, vlan, d.reply_too_big)?;
    }
    // Counted once, on the backend: lbd sums a VIP's from its backends' (one per-CPU slot
    // fewer per packet).
    if let Some(s) = stats::backend(id) {
        s.packets(1);
        s.bytes(frame_len);
    }
    Ok(transmit(same_link, nh.ifindex))
}

/// L2 forwarding of a tagged frame out of another interface: the addresses are written 4
/// bytes further in, over the tag (the ethertype after the tag stays where it is), and the
/// head moves past the 4 bytes left in front.
#[inline(always)]
pub fn untag(ctx: &XdpContext, nh: &'static NextHop) -> Result<(), Error> {
    write_macs(ctx, VLAN_LEN, macs(nh))?;
    adjust_head(ctx, VLAN_LEN as i32)
}

/// Prepends the outer IPv4 or IPv6 header (from the configured source to the backend),
/// behind a new Ethernet header with `vlan`'s tag, if any: the head moves by the outer
/// header's length plus the difference between the new and the old link header.
// One argument over clippy's limit: a struct would cost stack on the hot path.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub fn encapsulate(
    ctx: &XdpContext,
    pkt: &Packet,
    key: &FlowKey,
    hash: u32,
    b: &BackendInfo,
    nh: &'static NextHop,
    vlan: Option<u16>,
    reply_too_big: bool,
) -> Result<(), Error> {
    let l2_len = if vlan.is_some() {
        ETH_LEN + VLAN_LEN
    } else {
        ETH_LEN
    };
    let cfg = CONFIG.get(0).ok_or(Error::NoEncapSource)?;
    if pkt.family == FAMILY_V4 {
        let outer_len = pkt.ip_len + IPV4_LEN;
        if outer_len > nh.mtu as usize {
            return Err(too_big(ctx, pkt, key, nh.mtu, reply_too_big));
        }
        if cfg.flags & CONFIG_F_HAVE_V4_SRC == 0 {
            return Err(Error::NoEncapSource);
        }
        adjust_head(ctx, pkt.l2.l3 as i32 - (l2_len + IPV4_LEN) as i32)?;
        let l3 = write_l2(ctx, macs(nh), vlan, ETH_P_IP).map_err(adjusted)?;
        let h = ptr_at_mut::<[u8; IPV4_LEN]>(ctx, l3).map_err(adjusted)? as *mut u8;
        // Five 4-byte words in native order, the checksum summed over them.
        let w0 = 0x45 | (pkt.tos as u32) << 8 | ((outer_len as u16).to_be() as u32) << 16;
        let w1 = 0x40 << 16; // DF: we answer "too big" instead of fragmenting.
        let w2 = DEFAULT_TTL as u32 | (PROTO_IPIP as u32) << 8;
        // SAFETY: `ptr_at_mut` checked the 20 bytes at `h`, the only view of the packet while
        // they are written; the addresses are 4 bytes of map values.
        unsafe {
            let src = wide::load32(cfg.encap_src_v4.as_ptr());
            let dst = wide::load32(b.addr.as_ptr());
            let sum = w0 as u64 + w1 as u64 + w2 as u64 + src as u64 + dst as u64;
            let c = csum_fold(csum_fold64(sum));
            wide::store32(h, w0);
            wide::store32(h.add(4), w1);
            wide::store32(h.add(8), w2 | (c as u32) << 16);
            wide::store32(h.add(12), src);
            wide::store32(h.add(16), dst);
        }
    } else {
        let outer_len = pkt.ip_len + IPV6_LEN;
        if outer_len > nh.mtu as usize {
            return Err(too_big(ctx, pkt, key, nh.mtu, reply_too_big));
        }
        if cfg.flags & CONFIG_F_HAVE_V6_SRC == 0 {
            return Err(Error::NoEncapSource);
        }
        adjust_head(ctx, pkt.l2.l3 as i32 - (l2_len + IPV6_LEN) as i32)?;
        let l3 = write_l2(ctx, macs(nh), vlan, ETH_P_IPV6).map_err(adjusted)?;
        // The flow label carries the flow's hash, so ECMP on the way keeps a flow on one path.
        let vtcfl = (6u32 << 28) | ((pkt.tos as u32) << 20) | (hash & 0xf_ffff);
        let w0 = vtcfl.to_be() as u64
            | ((pkt.ip_len as u16).to_be() as u64) << 32
            | (PROTO_IPV6 as u64) << 48
            | (DEFAULT_TTL as u64) << 56;
        let h = ptr_at_mut::<[u8; IPV6_LEN]>(ctx, l3).map_err(adjusted)? as *mut u8;
        let (src, dst) = (cfg.encap_src_v6.as_ptr(), b.addr.as_ptr());
        // SAFETY: `ptr_at_mut` checked the 40 bytes at `h`, the only view of the packet while
        // they are written; the addresses are 16 bytes of map values.
        unsafe {
            wide::store64(h, w0);
            wide::store64(h.add(8), wide::load64(src));
            wide::store64(h.add(16), wide::load64(src.add(8)));
            wide::store64(h.add(24), wide::load64(dst));
            wide::store64(h.add(32), wide::load64(dst.add(8)));
        }
    }
    Ok(())
}
