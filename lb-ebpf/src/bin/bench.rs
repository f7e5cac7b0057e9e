//! Benchmark harness for BPF_PROG_TEST_RUN. With `repeat` > 1 the kernel does not restore the
//! packet between repetitions, so a program that rewrites it would measure itself on its own
//! output. The harness restores the saved input before every repetition, then tail-calls the
//! program under test; the trivial `bench_tx` program is measured through the same harness.
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

    #[xdp]
    pub fn bench_tx(_ctx: XdpContext) -> u32 {
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
