//! The balancer: steers every packet to a VIP to one backend, chosen by weighted Maglev over
//! the VIP's table and pinned by connection tracking, and forwards it by IP-in-IP encapsulation
//! or by MAC rewrite (direct server return). Everything else passes untouched.
//!
//! The hot path reads top to bottom: [`parse`] the headers into a flow key, look the flow up in
//! [`conntrack`] (or choose through the VIP's table), [`forward`] it, count it ([`stats`]).
//! [`icmp`] handles ICMP errors about VIP flows and the "too big" replies. The maps are in
//! [`maps`]; packet bytes are only reached through `lb_ebpf::net`'s bounds-checked accessor.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]
// Map keys and values are passed by reference: by value they would be copied onto the
// 512-byte BPF stack first.
#![allow(clippy::needless_borrows_for_generic_args)]

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
mod conntrack;
#[cfg(target_arch = "bpf")]
mod forward;
#[cfg(target_arch = "bpf")]
mod icmp;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod parse;
#[cfg(target_arch = "bpf")]
mod stats;

#[cfg(target_arch = "bpf")]
mod prog {
    use crate::{conntrack, forward::forward, icmp, maps::VIP_PORTS, parse, stats::count};
    use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
    use lb_common::*;
    use lb_ebpf::net::*;

    /// Why a packet was not forwarded. Mapped to an XDP action and a counter in one place.
    #[derive(Clone, Copy)]
    pub enum Error {
        NonIp,
        NotVip,
        Malformed,
        FragUnknown,
        IcmpNotVip,
        NoBackend,
        Fib,
        Adjust,
        TooBig,
        NoEncapSource,
        /// Not forwarded: rewritten into an ICMP "too big" for the sender and sent back.
        TooBigReplied,
    }

    impl From<Truncated> for Error {
        fn from(_: Truncated) -> Self {
            Error::Malformed
        }
    }

    impl Error {
        #[inline(always)]
        fn counter(self) -> Counter {
            match self {
                Error::NonIp => Counter::PassNonIp,
                Error::NotVip => Counter::PassNotVip,
                Error::Malformed => Counter::PassMalformed,
                Error::FragUnknown => Counter::PassFragUnknown,
                Error::IcmpNotVip => Counter::PassIcmpNotVip,
                Error::NoBackend => Counter::DropNoBackend,
                Error::Fib => Counter::DropFib,
                Error::Adjust => Counter::DropAdjust,
                Error::TooBig => Counter::DropTooBig,
                Error::NoEncapSource => Counter::DropNoEncapSource,
                Error::TooBigReplied => Counter::IcmpTooBigSent,
            }
        }

        /// Passes happen before the packet is touched, so it goes up byte-for-byte unchanged.
        /// A "too big" reply has already been written over the packet and goes back out.
        #[inline(always)]
        fn action(self) -> u32 {
            match self {
                Error::NonIp
                | Error::NotVip
                | Error::Malformed
                | Error::FragUnknown
                | Error::IcmpNotVip => xdp_action::XDP_PASS,
                Error::NoBackend
                | Error::Fib
                | Error::Adjust
                | Error::TooBig
                | Error::NoEncapSource => xdp_action::XDP_DROP,
                Error::TooBigReplied => xdp_action::XDP_TX,
            }
        }
    }

    /// Once the packet has been resized, a failed access can no longer pass it unchanged.
    #[inline(always)]
    pub fn adjusted(_: Truncated) -> Error {
        Error::Adjust
    }

    /// Where a packet goes: decided once, carried out by `forward`.
    pub struct Decision {
        pub id: u32,
        /// The backend's entry in `BACKENDS`, read in place (a copy costs 32 bytes of stack
        /// and the moves in and out of it on every packet).
        pub backend: &'static BackendInfo,
        /// The flow's hash (IPv6 flow label of the outer header).
        pub hash: u32,
        /// Answer "too big" to the sender (never for ICMP errors themselves).
        pub reply_too_big: bool,
        /// Counted once the packet is on its way.
        pub counter: Option<Counter>,
    }

    #[xdp]
    pub fn lb_balancer(ctx: XdpContext) -> u32 {
        match try_balance(&ctx) {
            Ok(action) => action,
            Err(e) => {
                count(e.counter());
                e.action()
            }
        }
    }

    /// The hot path: parse, decide, forward, count.
    #[inline(always)]
    fn try_balance(ctx: &XdpContext) -> Result<u32, Error> {
        let l2 = parse_l2(ctx)?;
        let (pkt, kind) = match l2.ethertype {
            ETH_P_IP => parse::ipv4(ctx, l2)?,
            ETH_P_IPV6 => parse::ipv6(ctx, l2)?,
            _ => return Err(Error::NonIp),
        };
        // From here on, one path for both families.
        let end = l2.l3 + pkt.ip_len;
        let mut key = core::mem::MaybeUninit::<FlowKey>::uninit();
        let d = match kind {
            parse::Kind::Flow { l4, first_fragment } => {
                let ports = parse::ports(ctx, &pkt, l4, end)?;
                // The port filter, before anything is built: a packet to a port no VIP of
                // its protocol uses is not ours.
                let port_bit = if pkt.proto == PROTO_TCP {
                    VIP_PORT_TCP
                } else {
                    VIP_PORT_UDP
                };
                let used = VIP_PORTS.get(ports.dport() as u32).copied().unwrap_or(0);
                if used & port_bit == 0 {
                    return Err(Error::NotVip);
                }
                parse::flow_key(ctx, l2.l3, &pkt, ports.both, &mut key)?;
                // SAFETY: `flow_key` wrote every byte.
                let key = unsafe { key.assume_init_mut() };
                conntrack::new_or_tracked(key, &ports, first_fragment)?
            }
            parse::Kind::LaterFragment { id } => {
                parse::flow_key(ctx, l2.l3, &pkt, 0, &mut key)?;
                // SAFETY: `flow_key` wrote every byte.
                conntrack::later_fragment(unsafe { key.assume_init_ref() }, id)?
            }
            parse::Kind::Icmp { l4 } => {
                parse::flow_key(ctx, l2.l3, &pkt, 0, &mut key)?;
                // SAFETY: `flow_key` wrote every byte.
                icmp::icmp_error(ctx, l4, end, unsafe { key.assume_init_mut() })?
            }
        };
        // SAFETY: every arm above wrote the key before it got here.
        let key = unsafe { key.assume_init_ref() };
        let action = forward(ctx, &pkt, key, &d)?;
        if let Some(c) = d.counter {
            count(c);
        }
        Ok(action)
    }
}

#[cfg(target_arch = "bpf")]
use prog::{adjusted, Decision, Error};
