//! Per-CPU counting: the global counters, and per-backend and per-VIP statistics. A slot is
//! reached through a handle ([`Slot`]) that adds through its raw pointer and never hands out a
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

/// This CPU's slot of a per-CPU statistics array: one method per field, adding to it.
#[derive(Clone, Copy)]
pub struct Slot<T>(*mut T);

/// This CPU's statistics of backend `id` (`None`: id out of range).
#[inline(always)]
pub fn backend(id: u32) -> Option<Slot<BackendStats>> {
    BACKEND_STATS.get_ptr_mut(id).map(Slot)
}

/// This CPU's statistics of VIP `id` (`None`: id out of range).
#[inline(always)]
pub fn vip(id: u32) -> Option<Slot<VipStats>> {
    VIP_STATS.get_ptr_mut(id).map(Slot)
}

/// `Slot<$stats>::$field(n)` adds `n` to that field.
macro_rules! adders {
    ($stats:ty: $($field:ident),*) => {
        impl Slot<$stats> {
            $(
                #[inline(always)]
                pub fn $field(self, n: u64) {
                    // SAFETY: the pointer is this CPU's slot of a per-CPU array, valid while
                    // the program runs and written only by this CPU meanwhile; the field is
                    // written in place through the raw pointer, no reference is formed.
                    unsafe { (*self.0).$field += n };
                }
            )*
        }
    };
}

adders!(BackendStats: packets, bytes, new_flows, syn_retries, client_rsts, resteered);
adders!(VipStats: new_flows, no_backend);
