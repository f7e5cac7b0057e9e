//! A minimal `XDP_PASS` program attached with raw `bpf(2)` calls (no object file, no loader).
//!
//! Why the lab needs it: a frame an XDP program sends back with `XDP_TX` on a veth goes into
//! the peer veth's XDP ring, but the kernel only schedules the peer's NAPI to drain that ring
//! when the *peer* has an XDP program too (`veth_xdp_flush` checks the peer's `xdp_prog`).
//! GRO on the peer enables its NAPI, so the frames are queued without error (`xdp_tx` counts
//! them) and then never delivered. An `XDP_PASS` program on the peer makes the kernel deliver
//! them, as a real NIC would.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};

const BPF_PROG_LOAD: libc::c_long = 5;
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

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<OwnedFd> {
    // SAFETY: `attr` points to a properly laid out, zero-padded bpf_attr prefix of the given
    // size, which the kernel reads (and may write) within that size.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: on success these commands return a new file descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Attaches an `XDP_PASS` program in driver (native) mode to `ifindex` of the calling thread's
/// network namespace, through a BPF link. The program stays attached while the returned fd is
/// open (closing it, or deleting the device, detaches it).
pub fn attach_xdp_pass(ifindex: u32) -> io::Result<OwnedFd> {
    // r0 = XDP_PASS (2); exit
    let insns: [u64; 2] = [0x0000_0002_0000_00b7, 0x0000_0000_0000_0095];
    let license = b"GPL\0";
    let mut name = [0u8; 16];
    name[..9].copy_from_slice(b"lab_pass\0");
    let mut load = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_XDP,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        prog_name: name,
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
