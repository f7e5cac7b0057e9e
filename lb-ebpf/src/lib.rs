//! Helpers shared by the XDP programs: one bounds-checked packet accessor, Ethernet parsing and
//! Internet checksums. Everything is `#[inline(always)]`: BPF-to-BPF calls cost more than the
//! code they would save, and the verifier tracks packet bounds better inside one function.
#![cfg_attr(target_arch = "bpf", no_std)]
// Wide loads and stores at addresses of unknown alignment (`net::wide`).
#![cfg_attr(target_arch = "bpf", feature(asm_experimental_arch))]

#[cfg(all(target_arch = "bpf", not(test)))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// Atomic read-modify-write on map memory. The BPF target has no compare-and-swap in Rust's
/// eyes, so `AtomicU64::fetch_or` does not exist there; the instruction itself does.
#[cfg(target_arch = "bpf")]
pub mod atomic {
    use core::arch::asm;

    /// `*p |= v` as one atomic instruction (`BPF_ATOMIC | BPF_OR`, no value fetched).
    ///
    /// # Safety
    /// `p` must be a valid, 8-byte aligned pointer into a map value.
    #[inline(always)]
    pub unsafe fn or_u64(p: *mut u64, v: u64) {
        // SAFETY: the caller's contract; one atomic instruction on that word.
        unsafe {
            asm!("lock *(u64 *)({p} + 0) |= {v}", p = in(reg) p, v = in(reg) v,
                options(nostack, preserves_flags));
        }
    }
}

#[cfg(target_arch = "bpf")]
pub mod net {
    use aya_ebpf::programs::XdpContext;
    use core::mem::size_of;

    pub const ETH_LEN: usize = 14;
    pub const VLAN_LEN: usize = 4;
    pub const ETH_P_IP: u16 = 0x0800;
    pub const ETH_P_IPV6: u16 = 0x86DD;
    pub const ETH_P_8021Q: u16 = 0x8100;
    pub const IPV4_LEN: usize = 20;
    pub const IPV6_LEN: usize = 40;

    /// The packet is shorter than the header being read.
    #[derive(Clone, Copy)]
    pub struct Truncated;

    /// Pointer to a `T` at `offset` from the start of the packet, if the packet holds it.
    ///
    /// # Safety
    /// The returned pointer is valid for reads (and writes, through `ptr_at_mut`) of
    /// `size_of::<T>()` bytes until the packet is resized; it may be unaligned.
    #[inline(always)]
    pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Result<*const T, Truncated> {
        let start = ctx.data();
        let end = ctx.data_end();
        if start + offset + size_of::<T>() > end {
            return Err(Truncated);
        }
        Ok((start + offset) as *const T)
    }

    /// Mutable variant of [`ptr_at`].
    #[inline(always)]
    pub fn ptr_at_mut<T>(ctx: &XdpContext, offset: usize) -> Result<*mut T, Truncated> {
        ptr_at::<T>(ctx, offset).map(|p| p as *mut T)
    }

    /// Reads an unaligned `T` at `offset`.
    #[inline(always)]
    pub fn read<T: Copy>(ctx: &XdpContext, offset: usize) -> Result<T, Truncated> {
        let p = ptr_at::<T>(ctx, offset)?;
        // SAFETY: `ptr_at` checked that `size_of::<T>()` bytes at `p` are inside the packet.
        Ok(unsafe { p.read_unaligned() })
    }

    /// Writes an unaligned `T` at `offset`.
    #[inline(always)]
    pub fn write<T: Copy>(ctx: &XdpContext, offset: usize, v: T) -> Result<(), Truncated> {
        let p = ptr_at_mut::<T>(ctx, offset)?;
        // SAFETY: `ptr_at_mut` checked that `size_of::<T>()` bytes at `p` are inside the packet.
        unsafe { p.write_unaligned(v) };
        Ok(())
    }

    /// One BPF load or store of 2, 4 or 8 bytes at an address of unknown alignment.
    ///
    /// LLVM's BPF backend splits an access it cannot prove aligned into single bytes (a
    /// 16-byte address becomes 16 loads, 16 stores and the shifts between them), and packet
    /// data has no alignment it could prove. The verifier allows misaligned packet and map
    /// value accesses where the CPU handles them (x86: `CONFIG_HAVE_EFFICIENT_UNALIGNED_ACCESS`,
    /// no strict alignment), so one instruction, written in assembly, does the same work.
    /// The value is the memory's bytes in native (little-endian) order, like `from_ne_bytes`.
    pub mod wide {
        use core::arch::asm;

        macro_rules! wide {
            ($($load:ident, $store:ident, $t:ty, $w:literal;)*) => {$(
                /// Loads the bytes at `p` (any alignment) in native order.
                ///
                /// # Safety
                /// `p` must be valid for reads of the type's size: a bounds-checked packet
                /// pointer (the verifier checks it again) or a map value.
                #[inline(always)]
                pub unsafe fn $load(p: *const u8) -> $t {
                    let v: u64;
                    // SAFETY: the caller's contract; one load instruction, no other effect.
                    unsafe {
                        asm!(concat!("{v} = *(", $w, " *)({p} + 0)"), p = in(reg) p,
                            v = lateout(reg) v, options(nostack, readonly, preserves_flags));
                    }
                    v as $t
                }

                /// Stores `v` at `p` (any alignment) in native order.
                ///
                /// # Safety
                /// `p` must be valid for writes of the type's size (a bounds-checked packet
                /// pointer) and no reference may cover those bytes meanwhile.
                #[inline(always)]
                pub unsafe fn $store(p: *mut u8, v: $t) {
                    // SAFETY: the caller's contract; one store instruction.
                    unsafe {
                        asm!(concat!("*(", $w, " *)({p} + 0) = {v}"), p = in(reg) p,
                            v = in(reg) v as u64, options(nostack, preserves_flags));
                    }
                }
            )*};
        }

        wide! {
            load16, store16, u16, "u16";
            load32, store32, u32, "u32";
            load64, store64, u64, "u64";
        }
    }

    /// The link layer of a frame: where the IP header starts and what the frame said. The
    /// addresses stay in the packet ([`read_macs`]): most packets never need them.
    #[derive(Clone, Copy)]
    pub struct L2 {
        /// The 802.1Q tag control information, as read (network order), if tagged.
        pub vlan_tci: Option<u16>,
        /// Ethertype of the payload (host order).
        pub ethertype: u16,
        /// Offset of the layer-3 header.
        pub l3: usize,
    }

    /// Parses Ethernet with at most one 802.1Q tag.
    #[inline(always)]
    pub fn parse_l2(ctx: &XdpContext) -> Result<L2, Truncated> {
        let p = ptr_at::<[u8; ETH_LEN]>(ctx, 0)? as *const u8;
        // SAFETY: `ptr_at` checked the 14 bytes at `p`.
        let ethertype = u16::from_be(unsafe { wide::load16(p.add(12)) });
        if ethertype == ETH_P_8021Q {
            let p = ptr_at::<[u8; ETH_LEN + VLAN_LEN]>(ctx, 0)? as *const u8;
            // SAFETY: `ptr_at` checked the 18 bytes at `p`.
            let tag = unsafe { wide::load32(p.add(ETH_LEN)) };
            return Ok(L2 {
                vlan_tci: Some(tag as u16),
                ethertype: u16::from_be((tag >> 16) as u16),
                l3: ETH_LEN + VLAN_LEN,
            });
        }
        Ok(L2 {
            vlan_tci: None,
            ethertype,
            l3: ETH_LEN,
        })
    }

    /// The frame's destination and source MAC addresses.
    #[inline(always)]
    pub fn read_macs(ctx: &XdpContext) -> Result<([u8; 6], [u8; 6]), Truncated> {
        Ok((read(ctx, 0)?, read(ctx, 6)?))
    }

    /// Mutable view of `N` packet bytes at `offset` (bounds checked).
    ///
    /// # Safety
    /// No other reference into the packet (from `bytes_mut` or a header read) may be used
    /// while the returned one lives, and the packet must not be resized meanwhile: the
    /// reference is tied to `ctx`, which does not own the bytes, so the compiler cannot see
    /// two views of one packet.
    // The bytes belong to the packet, not to the context that locates them.
    #[allow(clippy::mut_from_ref)]
    #[inline(always)]
    pub unsafe fn bytes_mut<const N: usize>(
        ctx: &XdpContext,
        offset: usize,
    ) -> Result<&mut [u8; N], Truncated> {
        let p = ptr_at_mut::<[u8; N]>(ctx, offset)?;
        // SAFETY: `ptr_at_mut` checked the bounds and `[u8; N]` has alignment 1; the caller
        // keeps the reference unique and the packet unresized (the contract above).
        Ok(unsafe { &mut *p })
    }

    /// A destination and a source MAC address as the two words an Ethernet header starts
    /// with: bytes 0..8 (the destination, then 2 bytes of the source) and 8..12.
    #[derive(Clone, Copy)]
    pub struct Macs(pub u64, pub u32);

    impl Macs {
        /// From two addresses anywhere, the stack included (read as plain Rust: the verifier
        /// refuses misaligned stack accesses, so `wide` is not for them).
        #[inline(always)]
        pub fn new(dst: &[u8; 6], src: &[u8; 6]) -> Self {
            let d_lo = u16::from_ne_bytes([dst[0], dst[1]]) as u64;
            let d_hi = u32::from_ne_bytes([dst[2], dst[3], dst[4], dst[5]]) as u64;
            let s_lo = u32::from_ne_bytes([src[0], src[1], src[2], src[3]]);
            let s_hi = u16::from_ne_bytes([src[4], src[5]]) as u32;
            Macs(
                d_lo | d_hi << 16 | ((s_lo & 0xffff) as u64) << 48,
                s_lo >> 16 | s_hi << 16,
            )
        }

        /// From 12 bytes of a map value holding the source, then the destination address:
        /// two wide loads instead of twelve byte loads.
        ///
        /// # Safety
        /// `src_dst` must point to 12 readable bytes of a map value (not the stack).
        #[inline(always)]
        pub unsafe fn from_src_dst(src_dst: *const u8) -> Self {
            // SAFETY: the caller's contract.
            let (a, b) = unsafe { (wide::load64(src_dst), wide::load32(src_dst.add(8))) };
            let src = a & 0xffff_ffff_ffff;
            let dst = a >> 48 | (b as u64) << 16;
            Macs(dst | src << 48, (src >> 16) as u32)
        }
    }

    /// Writes a destination and a source MAC address at `offset`: one 8-byte and one 4-byte
    /// store instead of twelve.
    #[inline(always)]
    pub fn write_macs(ctx: &XdpContext, offset: usize, macs: Macs) -> Result<(), Truncated> {
        let p = ptr_at_mut::<[u8; 12]>(ctx, offset)? as *mut u8;
        // SAFETY: `ptr_at_mut` checked the 12 bytes at `p`.
        unsafe { store_macs(p, macs) };
        Ok(())
    }

    /// # Safety
    /// `p` must be valid for writes of 12 bytes, with no reference covering them.
    #[inline(always)]
    unsafe fn store_macs(p: *mut u8, macs: Macs) {
        // SAFETY: the caller's contract.
        unsafe {
            wide::store64(p, macs.0);
            wide::store32(p.add(8), macs.1);
        }
    }

    /// Writes an Ethernet header (and the 802.1Q tag, if any) at the start of the packet and
    /// returns the offset of the layer-3 header. Written in place: no stack copies.
    #[inline(always)]
    pub fn write_l2(
        ctx: &XdpContext,
        macs: Macs,
        vlan_tci: Option<u16>,
        ethertype: u16,
    ) -> Result<usize, Truncated> {
        match vlan_tci {
            Some(tci) => {
                let p = ptr_at_mut::<[u8; ETH_LEN + VLAN_LEN]>(ctx, 0)? as *mut u8;
                let tag = ETH_P_8021Q.to_be() as u32 | (tci as u32) << 16;
                // SAFETY: `ptr_at_mut` checked the 18 bytes at `p`.
                unsafe {
                    store_macs(p, macs);
                    wide::store32(p.add(12), tag);
                    wide::store16(p.add(16), ethertype.to_be());
                }
                Ok(ETH_LEN + VLAN_LEN)
            }
            None => {
                let p = ptr_at_mut::<[u8; ETH_LEN]>(ctx, 0)? as *mut u8;
                // SAFETY: `ptr_at_mut` checked the 14 bytes at `p`.
                unsafe {
                    store_macs(p, macs);
                    wide::store16(p.add(12), ethertype.to_be());
                }
                Ok(ETH_LEN)
            }
        }
    }

    /// Folds a sum of 32-bit words into a 32-bit one's-complement sum for [`csum_fold`]: the
    /// same checksum as summing the 16-bit words (RFC 1071's byte-order independence).
    #[inline(always)]
    pub fn csum_fold64(sum: u64) -> u32 {
        let sum = (sum & 0xffff_ffff) + (sum >> 32);
        ((sum & 0xffff_ffff) + (sum >> 32)) as u32
    }

    /// Adds 16-bit words of `b` (native order) to a running one's-complement sum.
    #[inline(always)]
    pub fn csum_add_bytes<const N: usize>(mut sum: u32, b: &[u8; N]) -> u32 {
        let mut i = 0;
        while i + 1 < N {
            sum += u16::from_ne_bytes([b[i], b[i + 1]]) as u32;
            i += 2;
        }
        if N % 2 == 1 {
            sum += u16::from_ne_bytes([b[N - 1], 0]) as u32;
        }
        sum
    }

    /// Folds a 32-bit one's-complement sum into the 16-bit checksum to store (native order).
    #[inline(always)]
    pub fn csum_fold(mut sum: u32) -> u16 {
        sum = (sum & 0xffff) + (sum >> 16);
        sum = (sum & 0xffff) + (sum >> 16);
        !(sum as u16)
    }

    /// Sums `len` bytes of the packet starting at `offset` (at most `MAX` bytes), one 16-bit
    /// word at a time with a bounds check each: the loop bound is a constant for the verifier.
    #[inline(always)]
    pub fn csum_packet<const MAX: usize>(
        ctx: &XdpContext,
        offset: usize,
        len: usize,
        mut sum: u32,
    ) -> Result<u32, Truncated> {
        let mut i = 0usize;
        while i < MAX {
            if i >= len {
                break;
            }
            if i + 1 == len {
                let last: u8 = read(ctx, offset + i)?;
                sum += u16::from_ne_bytes([last, 0]) as u32;
                break;
            }
            let w: [u8; 2] = read(ctx, offset + i)?;
            sum += u16::from_ne_bytes(w) as u32;
            i += 2;
        }
        Ok(sum)
    }
}
