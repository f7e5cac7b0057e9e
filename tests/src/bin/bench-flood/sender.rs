//! The flood's sender: spoofed SYN frames written to the client's `eth0` through an AF_PACKET
//! socket (no pktgen: no kernel modules here).
//!
//! A veth without a NAPI thread hands a frame to its peer on the sending CPU: the client's
//! veth and the bridge run in the sender's system calls, up to the balancer's receive ring.
use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use lb_pkt::{self as pkt, Csum};
use std::net::Ipv4Addr;
use tests::{
    flood::{syn, SpoofedSyns},
    lab::VIP_V4,
};

/// What one flood sent.
pub struct Sent {
    /// Frames the socket accepted.
    pub frames: u64,
    /// Sends that failed (`ENOBUFS` and the like).
    pub errors: u64,
    /// How long the sender ran.
    pub elapsed: Duration,
    /// The sender thread's user and system CPU time (softirq work done on its behalf is the
    /// CPU's, not the thread's).
    pub user: Duration,
    pub system: Duration,
}

/// An AF_PACKET socket bound to one interface of the calling thread's namespace, bypassing the
/// qdisc (the frames go straight to the veth).
pub struct Sender {
    fd: OwnedFd,
    to: libc::sockaddr_ll,
}

impl Sender {
    /// Opens the socket for interface `ifindex`, frames to `dst`.
    pub fn open(ifindex: u32, dst: pkt::Mac) -> io::Result<Self> {
        // SAFETY: plain socket(2); protocol 0 receives nothing.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a socket we just opened and own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let one: libc::c_int = 1;
        // SAFETY: a valid int option for the duration of the call.
        let r = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_QDISC_BYPASS,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as u32,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut addr = [0u8; 8];
        addr[..6].copy_from_slice(&dst);
        let to = libc::sockaddr_ll {
            sll_family: libc::AF_PACKET as u16,
            sll_protocol: (libc::ETH_P_IP as u16).to_be(),
            sll_ifindex: ifindex as i32,
            sll_hatype: 0,
            sll_pkttype: 0,
            sll_halen: 6,
            sll_addr: addr,
        };
        Ok(Self { fd, to })
    }

    /// Sends one whole Ethernet frame.
    fn send(&self, frame: &[u8]) -> io::Result<()> {
        // SAFETY: valid buffer and address for the duration of the call.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&self.to as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if n == frame.len() as isize {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Sends SYNs from `syns`, from `src` to `dst` (the socket's), as fast as the path takes
    /// them, for `duration` or until `stop` is set.
    pub fn flood(
        &self,
        syns: &mut SpoofedSyns,
        src: pkt::Mac,
        duration: Duration,
        stop: &AtomicBool,
    ) -> Sent {
        let dst = self.to.sll_addr[..6].try_into().expect("6 bytes");
        let mut frame = SynFrame::new(dst, src);
        let start = Instant::now();
        let (mut frames, mut errors) = (0u64, 0u64);
        loop {
            for _ in 0..256 {
                let (ip, port, seq) = syns.next_tuple();
                match self.send(frame.patch(ip, port, seq)) {
                    Ok(()) => frames += 1,
                    Err(_) => errors += 1,
                }
            }
            if start.elapsed() >= duration || stop.load(Ordering::Relaxed) {
                break;
            }
        }
        let elapsed = start.elapsed();
        let (user, system) = thread_cpu();
        Sent {
            frames,
            errors,
            elapsed,
            user,
            system,
        }
    }
}

/// One SYN frame (Ethernet, then [`syn`]'s packet) rewritten in place for each new source:
/// the address, port and sequence number written, both checksums from sums of the rest
/// taken once. Cheap in a debug build too, so the sender's CPU goes to sending.
struct SynFrame {
    frame: Vec<u8>,
    /// Sum of the IPv4 header with the source address and checksum zero.
    ip_sum: Csum,
    /// Sum of the pseudo-header and the TCP header with the source address, port, sequence
    /// number and checksum zero.
    tcp_sum: Csum,
}

/// Offsets in the frame (no VLAN tag, IPv4 header of 20 bytes).
const IP: usize = pkt::ETH_LEN;
const IP_CSUM: usize = IP + 10;
const IP_SRC: usize = IP + 12;
const TCP: usize = IP + 20;
const TCP_SEQ: usize = TCP + 4;
const TCP_CSUM: usize = TCP + 16;

impl SynFrame {
    fn new(dst: pkt::Mac, src: pkt::Mac) -> Self {
        let mut frame = pkt::ether(dst, src, pkt::ETH_IPV4, &syn(Ipv4Addr::UNSPECIFIED, 0, 0));
        for (at, len) in [
            (IP_CSUM, 2),
            (IP_SRC, 4),
            (TCP, 2),
            (TCP_SEQ, 4),
            (TCP_CSUM, 2),
        ] {
            frame[at..at + len].fill(0);
        }
        let ip_sum = Csum::new().push(&frame[IP..TCP]);
        let tcp_len = frame.len() - TCP;
        let tcp_sum = pkt::pseudo_header(
            Ipv4Addr::UNSPECIFIED.into(),
            VIP_V4.into(),
            pkt::TCP,
            tcp_len,
        )
        .push(&frame[TCP..]);
        Self {
            frame,
            ip_sum,
            tcp_sum,
        }
    }

    /// The frame of the SYN from `ip:port` with sequence number `seq`.
    fn patch(&mut self, ip: Ipv4Addr, port: u16, seq: u32) -> &[u8] {
        let (ip, port, seq) = (ip.octets(), port.to_be_bytes(), seq.to_be_bytes());
        let f = &mut self.frame;
        f[IP_SRC..IP_SRC + 4].copy_from_slice(&ip);
        f[IP_CSUM..IP_CSUM + 2].copy_from_slice(&self.ip_sum.push(&ip).finish().to_be_bytes());
        f[TCP..TCP + 2].copy_from_slice(&port);
        f[TCP_SEQ..TCP_SEQ + 4].copy_from_slice(&seq);
        let tcp = self.tcp_sum.push(&ip).push(&port).push(&seq).finish();
        f[TCP_CSUM..TCP_CSUM + 2].copy_from_slice(&tcp.to_be_bytes());
        f
    }
}

/// The calling thread's user and system CPU time so far (getrusage RUSAGE_THREAD).
fn thread_cpu() -> (Duration, Duration) {
    // SAFETY: a zeroed rusage is a valid buffer for getrusage to fill.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is valid for writes for the duration of the call.
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) };
    let d = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    (d(ru.ru_utime), d(ru.ru_stime))
}

/// The CPU the calling thread runs on now.
pub fn current_cpu() -> Option<usize> {
    // SAFETY: sched_getcpu has no preconditions.
    let c = unsafe { libc::sched_getcpu() };
    usize::try_from(c).ok()
}

#[cfg(test)]
mod syn_frame {
    use super::*;

    /// A patched frame is byte for byte the one built from scratch.
    #[test]
    fn patched_frames_are_the_built_ones() {
        let (dst, src) = ([2, 0, 0, 0, 0, 2], [2, 0, 0, 0, 0, 1]);
        let mut frame = SynFrame::new(dst, src);
        let mut syns = SpoofedSyns::new(7);
        for _ in 0..1000 {
            let (ip, port, seq) = syns.next_tuple();
            let built = pkt::ether(dst, src, pkt::ETH_IPV4, &syn(ip, port, seq));
            assert_eq!(
                frame.patch(ip, port, seq),
                &built[..],
                "{ip}:{port} seq {seq}"
            );
        }
    }
}
