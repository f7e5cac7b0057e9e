//! Backend-side decapsulation: strips the outer header of IPv4-in-IPv4 and IPv6-in-IPv6
//! packets addressed to this host whose inner destination is a VIP served here, and passes the
//! inner packet up the stack. Backends then need no tunnel device and answer clients directly.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]
// Map keys and values are passed by reference: by value they would be copied onto the
// 512-byte BPF stack first.
#![allow(clippy::needless_borrows_for_generic_args)]

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
mod prog {
    use aya_ebpf::{
        bindings::xdp_action,
        btf_maps::{HashMap, PerCpuArray},
        helpers::bpf_xdp_adjust_head,
        macros::{btf_map, xdp},
        programs::XdpContext,
    };
    use lb_common::*;
    use lb_ebpf::net::*;

    // BTF-defined maps: `bpftool map dump` shows their keys and values typed.
    #[btf_map]
    static DECAP_VIPS: HashMap<DecapKey, u32, { MAX_DECAP_ADDRS as usize }> = HashMap::new();
    #[btf_map]
    static DECAP_COUNTERS: PerCpuArray<u64, { DecapCounter::COUNT as usize }> = PerCpuArray::new();

    #[derive(Clone, Copy)]
    enum Error {
        NotOurs,
        Malformed,
        Adjust,
    }

    impl From<Truncated> for Error {
        fn from(_: Truncated) -> Self {
            Error::Malformed
        }
    }

    impl Error {
        #[inline(always)]
        fn counter(self) -> DecapCounter {
            match self {
                Error::NotOurs => DecapCounter::PassNotOurs,
                Error::Malformed => DecapCounter::PassMalformed,
                Error::Adjust => DecapCounter::DropAdjust,
            }
        }

        #[inline(always)]
        fn action(self) -> u32 {
            match self {
                Error::NotOurs | Error::Malformed => xdp_action::XDP_PASS,
                Error::Adjust => xdp_action::XDP_DROP,
            }
        }
    }

    #[xdp]
    pub fn lb_decap(ctx: XdpContext) -> u32 {
        match try_decap(&ctx) {
            Ok(()) => {
                count(DecapCounter::Decapsulated);
                xdp_action::XDP_PASS
            }
            Err(e) => {
                count(e.counter());
                e.action()
            }
        }
    }

    #[inline(always)]
    fn count(c: DecapCounter) {
        if let Some(p) = DECAP_COUNTERS.get_ptr_mut(c as u32) {
            // SAFETY: per-CPU slot, only this CPU writes it while this program runs.
            unsafe { *p += 1 };
        }
    }

    #[inline(always)]
    fn is(addr: &[u8; 16], family: u8, kind: u32) -> bool {
        let k = DecapKey {
            addr: *addr,
            family,
            _pad: [0; 3],
        };
        // SAFETY: the value is copied out at once.
        unsafe { DECAP_VIPS.get(&k) }.copied() == Some(kind)
    }

    #[inline(always)]
    fn try_decap(ctx: &XdpContext) -> Result<(), Error> {
        let l2 = parse_l2(ctx)?;
        let (dst, src) = read_macs(ctx)?;
        let l3 = l2.l3;
        let outer = match l2.ethertype {
            ETH_P_IP => {
                let h: [u8; IPV4_LEN] = read(ctx, l3)?;
                // Only what the balancer sends: no options, not fragmented, IPv4 inside.
                if h[0] != 0x45
                    || h[9] != PROTO_IPIP
                    || u16::from_be_bytes([h[6], h[7]]) & 0x3fff != 0
                {
                    return Err(Error::NotOurs);
                }
                let mut dst = [0u8; 16];
                dst[..4].copy_from_slice(&h[16..20]);
                if !is(&dst, FAMILY_V4, DECAP_KIND_LOCAL) {
                    return Err(Error::NotOurs);
                }
                let inner: [u8; IPV4_LEN] = read(ctx, l3 + IPV4_LEN)?;
                if inner[0] >> 4 != 4 {
                    return Err(Error::Malformed);
                }
                let mut vip = [0u8; 16];
                vip[..4].copy_from_slice(&inner[16..20]);
                if !is(&vip, FAMILY_V4, DECAP_KIND_VIP) {
                    return Err(Error::NotOurs);
                }
                IPV4_LEN
            }
            ETH_P_IPV6 => {
                let h: [u8; IPV6_LEN] = read(ctx, l3)?;
                if h[0] >> 4 != 6 || h[6] != PROTO_IPV6 {
                    return Err(Error::NotOurs);
                }
                let mut dst = [0u8; 16];
                dst.copy_from_slice(&h[24..40]);
                if !is(&dst, FAMILY_V6, DECAP_KIND_LOCAL) {
                    return Err(Error::NotOurs);
                }
                let inner: [u8; IPV6_LEN] = read(ctx, l3 + IPV6_LEN)?;
                if inner[0] >> 4 != 6 {
                    return Err(Error::Malformed);
                }
                let mut vip = [0u8; 16];
                vip.copy_from_slice(&inner[24..40]);
                if !is(&vip, FAMILY_V6, DECAP_KIND_VIP) {
                    return Err(Error::NotOurs);
                }
                IPV6_LEN
            }
            _ => return Err(Error::NotOurs),
        };
        // SAFETY: the helper validates the delta; the outer header is inside the packet.
        if unsafe { bpf_xdp_adjust_head(ctx.ctx, outer as i32) } != 0 {
            return Err(Error::Adjust);
        }
        // The inner packet has the outer one's family, so the ethertype is unchanged.
        write_l2(ctx, Macs::new(&dst, &src), l2.vlan_tci, l2.ethertype)
            .map_err(|_| Error::Adjust)?;
        Ok(())
    }
}
