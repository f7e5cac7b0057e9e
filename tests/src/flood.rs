//! Spoofed SYNs to the lab's IPv4 VIP, for the flood test (`e2e_flood`, through a raw IP
//! socket) and the flood benchmark (`lb-bench-flood`, as Ethernet frames through AF_PACKET):
//! one generator, so the benchmark measures the traffic the test proves safe.
use std::net::Ipv4Addr;

use lb_pkt::{self as pkt, Ip4, Tcp};

use crate::lab::VIP_V4;

/// The port of the VIP the flood aims at.
pub const FLOOD_PORT: u16 = 80;

/// A SYN from `src:sport` to the VIP's [`FLOOD_PORT`] with sequence number `seq`: IPv4 with DF
/// and TTL 64, a bare 20-byte TCP header.
pub fn syn(src: Ipv4Addr, sport: u16, seq: u32) -> Vec<u8> {
    segment(src, sport, seq, pkt::TCP_SYN)
}

/// Like [`syn`], with TCP flags `flags` (e2e_flood also sends bare ACKs without a SYN).
pub fn segment(src: Ipv4Addr, sport: u16, seq: u32, flags: u8) -> Vec<u8> {
    let seg = Tcp {
        seq,
        flags,
        ..Tcp::new(sport, FLOOD_PORT)
    }
    .build(src.into(), VIP_V4.into(), &[]);
    Ip4 {
        frag: pkt::IP4_DF,
        ..Ip4::new(src, VIP_V4, pkt::TCP)
    }
    .build(&seg)
}

/// An endless run of spoofed SYNs: sources in 198.18.0.0/15 (the benchmarking range, RFC
/// 2544), source ports 1024..61024 and sequence numbers from a xorshift64 generator, so a run
/// is the same for the same seed.
#[derive(Clone, Debug)]
pub struct SpoofedSyns {
    state: u64,
}

impl SpoofedSyns {
    /// A run from `seed` (not 0: xorshift would stay at 0).
    pub fn new(seed: u64) -> Self {
        assert_ne!(seed, 0, "xorshift64 needs a non-zero seed");
        Self { state: seed }
    }

    /// The next SYN's source address, source port and sequence number.
    pub fn next_tuple(&mut self) -> (Ipv4Addr, u16, u32) {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        let r = self.state;
        let src = Ipv4Addr::from(0xc612_0000u32 | (r as u32 & 0x1_ffff));
        (src, 1024 + (r >> 20) as u16 % 60000, (r >> 32) as u32)
    }

    /// The next SYN's IPv4 packet (see [`syn`]).
    pub fn next_packet(&mut self) -> Vec<u8> {
        let (src, sport, seq) = self.next_tuple();
        syn(src, sport, seq)
    }
}
