//! The program's maps. Types, capacities and flags come from `lb_common::maps`, the registry
//! lbd loads and checks them by, so the two cannot drift; lbd sets the configured sizes (the
//! capacities here are their defaults) before loading.
//!
//! BTF-defined maps (the `.maps` section): the kernel gets each map's key and value types, so
//! `bpftool map dump` prints them as structs.
use aya_ebpf::{
    btf_maps::{Array, HashMap, LruHashMap, PerCpuArray},
    macros::btf_map,
};
use lb_common::{
    ct_filter_slot,
    maps::{
        agent_state, backend_stats, backends, config, counters, ct, ct4, ct_filter, ct_new, frags,
        nexthops, ring, syn_record, syn_seen, vip_ports, vip_retired, vip_stats, vips,
    },
    BackendInfo, CtValue, FlowKey, FlowKey4, VipKey, VipMeta, BACKEND_F_ACTIVE, BACKEND_F_DOWN,
    CT_FILTER_ACTIVE, FAMILY_V4,
};

#[btf_map]
pub static VIPS: HashMap<vips::Key, vips::Value, { vips::ENTRIES }, { vips::SPEC.flags as usize }> =
    HashMap::new();
#[btf_map]
pub static RING: Array<ring::Value, { ring::ENTRIES }> = Array::new();
#[btf_map]
pub static BACKENDS: Array<backends::Value, { backends::ENTRIES }> = Array::new();
#[btf_map]
pub static NEXTHOPS: Array<nexthops::Value, { nexthops::ENTRIES }> = Array::new();
#[btf_map]
pub static CT: LruHashMap<ct::Key, ct::Value, { ct::ENTRIES }> = LruHashMap::new();
#[btf_map]
pub static CT4: LruHashMap<ct4::Key, ct4::Value, { ct4::ENTRIES }> = LruHashMap::new();
#[btf_map]
pub static CT_NEW: LruHashMap<ct_new::Key, ct_new::Value, { ct_new::ENTRIES }> = LruHashMap::new();
#[btf_map]
pub static FRAGS: LruHashMap<frags::Key, frags::Value, { frags::ENTRIES }> = LruHashMap::new();
#[btf_map]
pub static CONFIG: Array<config::Value, { config::ENTRIES }> = Array::new();
/// A one-load filter in front of the connection-table lookup, so traffic to ports no VIP
/// uses costs no hash lookup at all.
#[btf_map]
pub static VIP_PORTS: Array<vip_ports::Value, { vip_ports::ENTRIES }> = Array::new();
#[btf_map]
pub static COUNTERS: PerCpuArray<counters::Value, { counters::ENTRIES }> = PerCpuArray::new();
#[btf_map]
pub static VIP_STATS: PerCpuArray<vip_stats::Value, { vip_stats::ENTRIES }> = PerCpuArray::new();
#[btf_map]
pub static BACKEND_STATS: PerCpuArray<backend_stats::Value, { backend_stats::ENTRIES }> =
    PerCpuArray::new();
/// Pinned with the other maps so that the agent's cursors survive a restart. Never read here.
#[btf_map]
pub static AGENT_STATE: Array<agent_state::Value, { agent_state::ENTRIES }> = Array::new();
/// What each VIP's retired backends forwarded: lbd's, pinned with the other maps, never read
/// here (a packet is counted once, on its backend).
#[btf_map]
pub static VIP_RETIRED: Array<vip_retired::Value, { vip_retired::ENTRIES }> = Array::new();

/// Until when each VIP's SYNs are recorded in `CT_NEW` (lbd arms a VIP's entry around changes
/// of its table).
#[btf_map]
pub static SYN_RECORD: Array<syn_record::Value, { syn_record::ENTRIES }> = Array::new();
/// The SYN cache: SYNs sent on while no table changes, for retries and the handshake's ACK.
#[btf_map]
pub static SYN_SEEN: Array<syn_seen::Value, { syn_seen::ENTRIES }> = Array::new();

/// The tracked-flow filter in front of a SYN's `CT` probe (`lb_common::CT_FILTER_BITS`).
#[btf_map]
pub static CT_FILTER: Array<
    ct_filter::Value,
    { ct_filter::ENTRIES },
    { ct_filter::SPEC.flags as usize },
> = Array::new();

/// An IPv4 flow's `CT4` key, in two 8-byte words: `FlowKey` keeps the IPv4 addresses in
/// the first word of each address field and the ports and protocol at byte 32, so three
/// aligned loads build it (the field-by-field copy of `FlowKey::v4` costs more than the
/// smaller key saves). Little-endian: the program's target.
#[inline(always)]
fn ct4_key(key: &FlowKey) -> FlowKey4 {
    let p = key as *const FlowKey as *const u32;
    // SAFETY: `FlowKey` is 40 bytes, 8-aligned: u32 words 0 and 4 are the source and
    // destination (IPv4), the u64 at byte 32 holds sport, dport, proto, family and padding.
    let (src, dst, rest) = unsafe { (*p, *p.add(4), *(p.add(8) as *const u64)) };
    // Bytes 0 to 4 of `rest`: the ports and the protocol; family and padding become zeros.
    let words = [src as u64 | (dst as u64) << 32, rest & 0xff_ffff_ffff];
    // SAFETY: `FlowKey4` is 16 bytes of plain integers, 8-aligned, without padding rules.
    unsafe { core::mem::transmute::<[u64; 2], FlowKey4>(words) }
}

/// A flow's entry among the established flows, in place: `CT4` (16-byte key) for IPv4,
/// `CT` for IPv6. The kernel hashes and compares a table's whole key on every lookup.
#[inline(always)]
pub fn established(key: &FlowKey) -> Option<*mut CtValue> {
    if key.family == FAMILY_V4 {
        CT4.get_ptr_mut(&ct4_key(key))
    } else {
        CT.get_ptr_mut(key)
    }
}

/// Inserts (or replaces) a flow's established entry; `false` if the table refused it.
#[inline(always)]
pub fn establish(key: &FlowKey, v: &CtValue) -> bool {
    if key.family == FAMILY_V4 {
        CT4.insert(&ct4_key(key), v, 0).is_ok()
    } else {
        CT.insert(key, v, 0).is_ok()
    }
}

/// Removes a flow's established entry, if any.
#[inline(always)]
pub fn forget_established(key: &FlowKey) {
    let _ = if key.family == FAMILY_V4 {
        CT4.remove(&ct4_key(key))
    } else {
        CT.remove(key)
    };
}

/// Whether the established tables (`CT4`, `CT`) may hold the flow of `hash`. `false` is
/// certain: every flow in them has its two bits set in the half read (`mark_tracked`, and lbd's
/// rebuild); `true` may be collisions.
#[inline(always)]
pub fn may_be_tracked(hash: u32) -> bool {
    let half = CT_FILTER.get(CT_FILTER_ACTIVE).copied().unwrap_or(0) as u32 & 1;
    let (entry, mask) = ct_filter_slot(hash);
    CT_FILTER
        .get(entry + half)
        .is_none_or(|w| *w & mask == mask)
}

/// Reads the filter word of `hash` and drops it: issued before an insert into `CT4` or `CT`,
/// the cache miss on it overlaps the insert's own (BPF has no prefetch instruction).
#[inline(always)]
pub fn prefetch_tracked(hash: u32) {
    let (entry, _) = ct_filter_slot(hash);
    if let Some(w) = CT_FILTER.get_ptr(entry) {
        // SAFETY: an array element, valid while the program runs; the value is not used.
        let _ = unsafe { core::ptr::read_volatile(w) };
    }
}

/// Sets the bits of a flow just inserted into `CT4` or `CT` in both halves of the filter. After
/// the insert, not before: if lbd's rebuild zeroes them again, the insert came before its scan
/// of the tables, which then finds the flow.
#[inline(always)]
pub fn mark_tracked(hash: u32) {
    let (entry, mask) = ct_filter_slot(hash);
    for half in 0..2 {
        if let Some(w) = CT_FILTER.get_ptr_mut(entry + half) {
            // SAFETY: an array element, valid while the program runs; an atomic OR, since other
            // CPUs and lbd (through its mapping) write the same words. Read first: bits already
            // set do not dirty the line again.
            unsafe {
                if *w & mask != mask {
                    lb_ebpf::atomic::or_u64(w, mask);
                }
            }
        }
    }
}

/// The VIP a flow is addressed to.
#[inline(always)]
pub fn lookup_vip(key: &FlowKey) -> Option<VipMeta> {
    let vk = VipKey {
        addr: key.dst,
        port: key.dport,
        proto: key.proto,
        family: key.family,
    };
    // SAFETY: the map has no preallocation (elements are RCU-freed), and the value is
    // copied out at once.
    unsafe { VIPS.get(&vk) }.copied()
}

/// The backend behind `id`, if it may carry traffic: its entry in `BACKENDS`, read in place.
#[inline(always)]
pub fn live_backend_ref(id: u32) -> Option<&'static BackendInfo> {
    let b = BACKENDS.get(id)?;
    if b.flags & BACKEND_F_ACTIVE != 0 && b.flags & BACKEND_F_DOWN == 0 {
        Some(b)
    } else {
        None
    }
}

/// Whether backend `id` may carry traffic (its entry read in place, nothing copied).
#[inline(always)]
pub fn backend_live(id: u32) -> bool {
    live_backend_ref(id).is_some()
}
