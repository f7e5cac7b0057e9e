//! Per-CPU counting: the global counters, and per-backend and per-VIP statistics. A slot is
//! reached through a handle that writes through its raw pointer and never hands out a
//! reference, so two handles to one slot cannot alias.
use crate::maps::{BACKEND_STATS, COUNTERS, VIP_STATS};
use lb_common::{BackendStats, Counter, VipStats};

#[inline(always)]
pub fn count(c: Counter) {
    if let Some(p) = COUNTERS.get_ptr_mut(c as u32) {
        // SAFETY: per-CPU slot, only this CPU writes it while this program runs.
        unsafe { *p += 1 };
    }
}

/// This CPU's statistics of one backend.
#[derive(Clone, Copy)]
pub struct BackendCounters(*mut BackendStats);

/// This CPU's statistics of backend `id` (`None`: id out of range).
#[inline(always)]
pub fn backend(id: u32) -> Option<BackendCounters> {
    BACKEND_STATS.get_ptr_mut(id).map(BackendCounters)
}

// SAFETY (every block below): the pointer is this CPU's slot of a per-CPU array, valid while the
// program runs and written only by this CPU meanwhile; the fields are written in place through
// the raw pointer, no reference to them is formed.
impl BackendCounters {
    #[inline(always)]
    pub fn forwarded(self, bytes: u64) {
        // SAFETY: see above.
        unsafe {
            (*self.0).packets += 1;
            (*self.0).bytes += bytes;
        }
    }

    #[inline(always)]
    pub fn new_flow(self) {
        // SAFETY: see above.
        unsafe { (*self.0).new_flows += 1 };
    }

    #[inline(always)]
    pub fn resteered(self) {
        // SAFETY: see above.
        unsafe { (*self.0).resteered += 1 };
    }

    #[inline(always)]
    pub fn syn_retries(self, n: u64) {
        // SAFETY: see above.
        unsafe { (*self.0).syn_retries += n };
    }

    #[inline(always)]
    pub fn client_rsts(self, n: u64) {
        // SAFETY: see above.
        unsafe { (*self.0).client_rsts += n };
    }
}

/// This CPU's statistics of one VIP.
#[derive(Clone, Copy)]
pub struct VipCounters(*mut VipStats);

/// This CPU's statistics of VIP `id` (`None`: id out of range).
#[inline(always)]
pub fn vip(id: u32) -> Option<VipCounters> {
    VIP_STATS.get_ptr_mut(id).map(VipCounters)
}

// SAFETY: as for `BackendCounters`.
impl VipCounters {
    #[inline(always)]
    pub fn forwarded(self, bytes: u64) {
        // SAFETY: as for `BackendCounters`.
        unsafe {
            (*self.0).packets += 1;
            (*self.0).bytes += bytes;
        }
    }

    #[inline(always)]
    pub fn new_flow(self) {
        // SAFETY: as for `BackendCounters`.
        unsafe { (*self.0).new_flows += 1 };
    }

    #[inline(always)]
    pub fn no_backend(self) {
        // SAFETY: as for `BackendCounters`.
        unsafe { (*self.0).no_backend += 1 };
    }
}
