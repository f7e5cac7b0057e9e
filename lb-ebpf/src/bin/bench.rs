//! Benchmark harness for BPF_PROG_TEST_RUN. With `repeat` > 1 the kernel does not restore the
//! packet between repetitions, so a program that rewrites it would measure itself on its own
//! output. The harness restores the saved input before every repetition, then tail-calls the
//! program under test; the trivial `bench_tx` program is measured through the same harness, and
//! so is `bench_table_write`, the floor of a packet that creates a tracked entry.
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
        helpers::{bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
        macros::{map, xdp},
        maps::{Array, PerCpuArray, ProgramArray},
        programs::XdpContext,
    };
    use lb_common::*;
    use lb_ebpf::net::*;

    #[map]
    static BENCH_PROGS: ProgramArray = ProgramArray::with_max_entries(1, 0);
    #[map]
    static BENCH_INPUT: Array<BenchInput> = Array::with_max_entries(1, 0);
    #[map]
    static BENCH_STATE: PerCpuArray<u64> = PerCpuArray::with_max_entries(2, 0);

    /// `bench_table_write`'s table: one 64-byte slot per flow.
    #[map]
    static BENCH_TABLE: Array<[u64; 8]> = Array::with_max_entries(1 << BENCH_TABLE_BITS, 0);
    /// `bench_table_write`'s repetitions so far, never reset: every repetition of every run
    /// writes another slot.
    #[map]
    static BENCH_CURSOR: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

    #[xdp]
    pub fn bench_tx(_ctx: XdpContext) -> u32 {
        xdp_action::XDP_TX
    }

    /// `bench_tx` plus what any design that keeps an entry per flow must do for a new flow:
    /// write 40 bytes (a 16-byte IPv4 key and a 24-byte value) into a slot of a table sized for
    /// the default `conntrack_size`, at a place no prefetcher can guess (a multiplicative hash
    /// of a counter), so that the write misses the caches as a new flow's does.
    #[xdp]
    pub fn bench_table_write(_ctx: XdpContext) -> u32 {
        let Some(cursor) = BENCH_CURSOR.get_ptr_mut(0) else {
            return xdp_action::XDP_ABORTED;
        };
        // SAFETY: per-CPU slot, only this CPU writes it while this program runs.
        let n = unsafe {
            *cursor += 1;
            *cursor
        };
        let slot = (n as u32).wrapping_mul(0x9e37_79b1) >> (32 - BENCH_TABLE_BITS);
        if let Some(s) = BENCH_TABLE.get_ptr_mut(slot) {
            // SAFETY: an array element, valid while the program runs.
            unsafe {
                for w in 0..5 {
                    (*s)[w] = n;
                }
            }
        }
        xdp_action::XDP_TX
    }

    #[xdp]
    pub fn bench_harness(ctx: XdpContext) -> u32 {
        let Some(input) = BENCH_INPUT.get_ptr(0) else {
            return xdp_action::XDP_ABORTED;
        };
        let Some(runs) = BENCH_STATE.get_ptr_mut(BENCH_RUNS) else {
            return xdp_action::XDP_ABORTED;
        };
        // SAFETY: per-CPU slot, only this CPU writes it while this program runs.
        let run = unsafe {
            *runs += 1;
            *runs
        };
        // SAFETY: array value, written by userspace before the run.
        let (len, vary_off) = unsafe { ((*input).len as usize, (*input).vary_off as usize) };
        // Undo what the previous repetition did: encapsulation grows the head only.
        let cur = ctx.data_end() - ctx.data();
        if cur > len {
            // SAFETY: the helper validates the delta.
            unsafe { bpf_xdp_adjust_head(ctx.ctx, (cur - len) as i32) };
        } else if cur < len {
            // SAFETY: the helper validates the delta.
            unsafe { bpf_xdp_adjust_tail(ctx.ctx, (len - cur) as i32) };
        }
        let mut i = 0usize;
        while i < BENCH_MAX_PACKET / 8 {
            if i * 8 >= len {
                break;
            }
            // SAFETY: `i * 8 + 8 <= BENCH_MAX_PACKET`, inside the array value.
            let w = unsafe { ((*input).data.as_ptr().add(i * 8) as *const u64).read_unaligned() };
            if write(&ctx, i * 8, w).is_err() {
                break;
            }
            i += 1;
        }
        // Masked so the verifier sees a bounded offset (a comparison on a copy would not do).
        let vary_off = vary_off & (BENCH_MAX_PACKET - 1);
        if vary_off != 0 && vary_off + 4 <= len {
            let _ = write(&ctx, vary_off, (run as u32).to_be_bytes());
        }
        // SAFETY: on success the tail call does not return.
        unsafe { BENCH_PROGS.tail_call(&ctx, 0) };
        if let Some(failed) = BENCH_STATE.get_ptr_mut(BENCH_TAIL_CALL_FAILED) {
            // SAFETY: per-CPU slot.
            unsafe { *failed += 1 };
        }
        xdp_action::XDP_ABORTED
    }
}
