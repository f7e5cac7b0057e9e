//! A minimal `XDP_PASS` program attached with raw `bpf(2)` calls (no object file, no loader).
//!
//! Why the lab needs it: a frame an XDP program sends back with `XDP_TX` on a veth goes into
//! the peer veth's XDP ring, but the kernel only schedules the peer's NAPI to drain that ring
//! when the *peer* has an XDP program too (`veth_xdp_flush` checks the peer's `xdp_prog`).
//! GRO on the peer enables its NAPI, so the frames are queued without error (`xdp_tx` counts
//! them) and then never delivered. An `XDP_PASS` program on the peer makes the kernel deliver
//! them, as a real NIC would.
//!
//! [`attach_xdp_switch`] is the alternative for benchmarks: the lab's switch forwards the
//! balancer's frames to the backends' ports in XDP instead of through the bridge, so that the
//! emulated switch takes less of the CPU the balancer is measured on.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_MAP_TYPE_DEVMAP: u32 = 14;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_XDP: u32 = 37;
const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;

/// The prefix of `union bpf_attr` for `BPF_PROG_LOAD` that we use; the rest stays zero.
#[repr(C, align(8))]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// The prefix of `union bpf_attr` for `BPF_MAP_CREATE`.
#[repr(C, align(8))]
#[derive(Default)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    _rest: [u32; 11],
}

/// `union bpf_attr` for `BPF_MAP_UPDATE_ELEM`.
#[repr(C, align(8))]
#[derive(Default)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// The prefix of `union bpf_attr` for `BPF_LINK_CREATE`.
#[repr(C, align(8))]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
    _rest: [u64; 4],
}

/// A `bpf(2)` command that returns a new file descriptor.
fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<OwnedFd> {
    let fd = bpf_call(cmd, attr)?;
    // SAFETY: on success these commands return a new file descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// A `bpf(2)` command: its non-negative result, or the error.
fn bpf_call<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` points to a properly laid out, zero-padded bpf_attr prefix of the given
    // size, which the kernel reads (and may write) within that size.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ret)
}

/// Attaches an `XDP_PASS` program in driver (native) mode to `ifindex` of the calling thread's
/// network namespace, through a BPF link. The program stays attached while the returned fd is
/// open (closing it, or deleting the device, detaches it).
pub fn attach_xdp_pass(ifindex: u32) -> io::Result<OwnedFd> {
    // r0 = XDP_PASS (2); exit
    let insns: [u64; 2] = [0x0000_0002_0000_00b7, 0x0000_0000_0000_0095];
    attach(ifindex, &insns, b"lab_pass")
}

/// One BPF instruction: opcode, registers, offset, immediate.
const fn insn(op: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    op as u64
        | (dst as u64) << 8
        | (src as u64) << 12
        | (off as u16 as u64) << 16
        | (imm as u32 as u64) << 32
}

/// Attaches, in driver mode, a program that redirects every frame addressed to one of `ports`'
/// MAC addresses straight to that port (`bpf_redirect_map` over a device map) and passes the
/// rest (broadcasts, other hosts) to the bridge. `ports`: (the last byte of a lab host's MAC,
/// `02:00:00:00:00:xx`, the ifindex of its switch port). A redirected frame loses an skb's
/// pending checksum, so every sender on the port must compute full checksums, and a target
/// port's peer must run NAPI (an XDP program or GRO) to receive it.
pub fn attach_xdp_switch(ifindex: u32, ports: &[(u8, u32)]) -> io::Result<OwnedFd> {
    let mut create = MapCreateAttr {
        map_type: BPF_MAP_TYPE_DEVMAP,
        key_size: 4,
        value_size: 4,
        max_entries: 256,
        ..Default::default()
    };
    let map = bpf(BPF_MAP_CREATE, &mut create)?;
    let map_fd = std::os::fd::AsRawFd::as_raw_fd(&map);
    for &(last_byte, port) in ports {
        let key = last_byte as u32;
        let mut update = MapElemAttr {
            map_fd: map_fd as u32,
            key: &key as *const u32 as u64,
            value: &port as *const u32 as u64,
            ..Default::default()
        };
        bpf_call(BPF_MAP_UPDATE_ELEM, &mut update)?;
    }
    const PASS: i16 = 15;
    let insns: [u64; 17] = [
        insn(0x61, 2, 1, 0, 0),        // r2 = ctx->data
        insn(0x61, 3, 1, 4, 0),        // r3 = ctx->data_end
        insn(0xbf, 4, 2, 0, 0),        // r4 = r2
        insn(0x07, 4, 0, 0, 6),        // r4 += 6
        insn(0x2d, 4, 3, PASS - 5, 0), // if r4 > r3 goto pass
        insn(0x61, 5, 2, 0, 0),        // r5 = dst MAC bytes 0..4
        insn(0x55, 5, 0, PASS - 7, 2), // if r5 != 02:00:00:00 goto pass
        insn(0x71, 5, 2, 4, 0),        // r5 = dst MAC byte 4
        insn(0x55, 5, 0, PASS - 9, 0), // if r5 != 0 goto pass
        insn(0x71, 2, 2, 5, 0),        // r2 = dst MAC byte 5: the key
        insn(0x18, 1, 1, 0, map_fd),   // r1 = the device map
        0,                             //   (the wide load's second half)
        insn(0xb7, 3, 0, 0, 2),        // r3 = XDP_PASS if the key has no port
        insn(0x85, 0, 0, 0, 51),       // bpf_redirect_map(r1, r2, r3)
        insn(0x95, 0, 0, 0, 0),        // exit
        insn(0xb7, 0, 0, 0, 2),        // pass: r0 = XDP_PASS
        insn(0x95, 0, 0, 0, 0),        // exit
    ];
    // The program holds its own reference to the map.
    attach(ifindex, &insns, b"lab_switch")
}

/// Attaches, in driver mode, the least a balancer can do: every TCP packet to port 80 addressed
/// to this host's MAC (IPv4 or IPv6, no IPv4 options) goes back out (`XDP_TX`) to backend
/// `source port % backends`, by rewriting the last byte of the MAC addresses (lab hosts are
/// `02:00:00:00:00:xx`; backend i is `0x11 + i`, this host `own`); the rest passes. No table, no
/// state, no encapsulation: `bench lab` measures it as the floor of its topology.
pub fn attach_xdp_reflector(ifindex: u32, own: u8, backends: u8) -> io::Result<OwnedFd> {
    const PASS: i16 = 28;
    const V6: i16 = 13;
    const FWD: i16 = 22;
    let insns: [u64; 30] = [
        insn(0x61, 2, 1, 0, 0),               // r2 = ctx->data
        insn(0x61, 3, 1, 4, 0),               // r3 = ctx->data_end
        insn(0xbf, 4, 2, 0, 0),               // r4 = r2
        insn(0x07, 4, 0, 0, 38),              // r4 += IPv4's ports' end
        insn(0x2d, 4, 3, PASS - 5, 0),        // if r4 > r3 goto pass
        insn(0x69, 5, 2, 12, 0),              // r5 = ethertype (as loaded)
        insn(0x55, 5, 0, V6 - 7, 0x0008),     // if not IPv4 goto v6
        insn(0x71, 5, 2, 23, 0),              // r5 = protocol
        insn(0x55, 5, 0, PASS - 9, 6),        // if not TCP goto pass
        insn(0x69, 5, 2, 36, 0),              // r5 = destination port
        insn(0x55, 5, 0, PASS - 11, 0x5000),  // if not 80 goto pass
        insn(0x69, 5, 2, 34, 0),              // r5 = source port
        insn(0x05, 0, 0, FWD - 13, 0),        // goto fwd
        insn(0x55, 5, 0, PASS - 14, 0xdd86),  // v6: if not IPv6 goto pass
        insn(0xbf, 4, 2, 0, 0),               // r4 = r2
        insn(0x07, 4, 0, 0, 58),              // r4 += IPv6's ports' end
        insn(0x2d, 4, 3, PASS - 17, 0),       // if r4 > r3 goto pass
        insn(0x71, 5, 2, 20, 0),              // r5 = next header
        insn(0x55, 5, 0, PASS - 19, 6),       // if not TCP goto pass
        insn(0x69, 5, 2, 56, 0),              // r5 = destination port
        insn(0x55, 5, 0, PASS - 21, 0x5000),  // if not 80 goto pass
        insn(0x69, 5, 2, 54, 0),              // r5 = source port
        insn(0x97, 5, 0, 0, backends as i32), // fwd: r5 %= backends
        insn(0x07, 5, 0, 0, 0x11),            // r5 += backend 0's byte
        insn(0x73, 2, 5, 5, 0),               // destination MAC's last byte = r5
        insn(0x72, 2, 0, 11, own as i32),     // source MAC's last byte = own
        insn(0xb7, 0, 0, 0, 3),               // r0 = XDP_TX
        insn(0x95, 0, 0, 0, 0),               // exit
        insn(0xb7, 0, 0, 0, 2),               // pass: r0 = XDP_PASS
        insn(0x95, 0, 0, 0, 0),               // exit
    ];
    attach(ifindex, &insns, b"lab_reflector")
}

/// Loads `insns` as an XDP program named `name` and links it to `ifindex` in driver mode.
fn attach(ifindex: u32, insns: &[u64], name: &[u8]) -> io::Result<OwnedFd> {
    let license = b"GPL\0";
    let mut prog_name = [0u8; 16];
    prog_name[..name.len()].copy_from_slice(name);
    let mut load = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_XDP,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        prog_name,
        expected_attach_type: BPF_XDP,
        ..Default::default()
    };
    let prog = bpf(BPF_PROG_LOAD, &mut load)?;
    let mut link = LinkCreateAttr {
        prog_fd: std::os::fd::AsRawFd::as_raw_fd(&prog) as u32,
        target_ifindex: ifindex,
        attach_type: BPF_XDP,
        flags: XDP_FLAGS_DRV_MODE,
        ..Default::default()
    };
    // The link holds a reference to the program; `prog` can be closed.
    bpf(BPF_LINK_CREATE, &mut link)
}
