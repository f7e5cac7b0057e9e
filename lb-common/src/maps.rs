//! The balancer's maps, written down once: name, kind, key and value types, capacity and
//! whether lbd pins it. The XDP program takes its statics' types and capacities from here, and
//! lbd drives everything from [`BALANCER`]: the sizes it sets before loading, the pins it
//! reuses, checks and removes, the maps it takes, and the check that the loaded object's maps
//! are these (a mismatch is an error naming the map). Adding a map is one line in
//! `balancer_maps!` plus its static in the program (and a field in lbd if lbd reads it).
use crate::{
    AgentState, BackendInfo, BackendStats, CtValue, FlowKey, FlowKey4, FragKey, GlobalConfig,
    NextHop, VipKey, VipMeta, VipStats, VipTotals, COUNTER_SLOTS, CT_FILTER_ENTRIES,
    DEFAULT_CT_NEW_SIZE, DEFAULT_CT_SIZE, DEFAULT_RING_POOL, FRAG_TABLE_SIZE, MAX_BACKENDS,
    MAX_VIPS, SYN_SEEN_SLOTS,
};
use core::mem::size_of;

/// The kinds of BPF map the programs use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Hash,
    LruHash,
    Array,
    PerCpuArray,
}

impl Kind {
    /// `enum bpf_map_type` (include/uapi/linux/bpf.h).
    pub const fn bpf_map_type(self) -> u32 {
        match self {
            Kind::Hash => 1,
            Kind::Array => 2,
            Kind::PerCpuArray => 6,
            Kind::LruHash => 9,
        }
    }

    /// As an operator reads it in an error.
    pub const fn describe(self) -> &'static str {
        match self {
            Kind::Hash => "hash",
            Kind::LruHash => "LRU hash",
            Kind::Array => "array",
            Kind::PerCpuArray => "per-CPU array",
        }
    }
}

/// Which of lbd's settings sizes a map (the object carries the setting's default).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Setting {
    TablePool,
    ConntrackSize,
    ConntrackNewSize,
}

impl Setting {
    /// The configuration key, for errors.
    pub const fn key(self) -> &'static str {
        match self {
            Setting::TablePool => "table_pool",
            Setting::ConntrackSize => "conntrack_size",
            Setting::ConntrackNewSize => "conntrack_new_size",
        }
    }
}

/// A map's capacity: fixed by this build, or one of lbd's settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Capacity {
    Fixed(u32),
    Configured { setting: Setting, default: u32 },
}

/// Whether lbd pins a map, so that it outlives a restart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pin {
    /// Pinned; a pin set without it is incomplete.
    Required,
    /// Pinned, but an older build did not pin it: a pin set without it is still complete (the
    /// map is created and pinned).
    Optional,
    /// Never pinned: each loaded program gets a fresh one (state that a restart may lose).
    Never,
}

/// One map of the balancer object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSpec {
    pub name: &'static str,
    pub kind: Kind,
    pub key_size: u32,
    pub value_size: u32,
    pub capacity: Capacity,
    /// `BPF_F_*` map flags.
    pub flags: u32,
    pub pin: Pin,
}

impl MapSpec {
    pub const fn new<K, V>(
        name: &'static str,
        kind: Kind,
        capacity: Capacity,
        flags: u32,
        pin: Pin,
    ) -> Self {
        MapSpec {
            name,
            kind,
            key_size: size_of::<K>() as u32,
            value_size: size_of::<V>() as u32,
            capacity,
            flags,
            pin,
        }
    }

    /// The capacity compiled into the object (a setting's default).
    pub const fn default_entries(&self) -> u32 {
        match self.capacity {
            Capacity::Fixed(n) => n,
            Capacity::Configured { default, .. } => default,
        }
    }
}

/// `BPF_F_NO_PREALLOC`: hash map elements allocated on insert (and RCU-freed).
pub const BPF_F_NO_PREALLOC: u32 = 1;

/// `BPF_F_MMAPABLE`: an array lbd maps into its memory (and updates with atomic operations).
pub const BPF_F_MMAPABLE: u32 = 1 << 10;

/// Declares each map once: a module named after it with its `Key`, `Value`, `SPEC` and
/// `ENTRIES` (what the program's static uses), its name constant, and [`BALANCER`].
macro_rules! balancer_maps {
    ($(
        $(#[$doc:meta])*
        $module:ident / $name:ident = $kind:ident<$key:ty, $value:ty>, $capacity:expr, $flags:expr, $pin:ident;
    )*) => {
        $(
            $(#[$doc])*
            pub const $name: &str = stringify!($name);
            $(#[$doc])*
            pub mod $module {
                use super::*;
                pub type Key = $key;
                pub type Value = $value;
                pub const SPEC: MapSpec =
                    MapSpec::new::<Key, Value>($name, Kind::$kind, $capacity, $flags, Pin::$pin);
                /// The capacity compiled into the object.
                pub const ENTRIES: usize = SPEC.default_entries() as usize;
            }
        )*
        /// Every map of the balancer object.
        pub const BALANCER: &[MapSpec] = &[$($module::SPEC),*];
    };
}

balancer_maps! {
    /// The VIPs (address, port, protocol) and their tables' place in `RING`.
    vips / VIPS = Hash<VipKey, VipMeta>, Capacity::Fixed(MAX_VIPS), BPF_F_NO_PREALLOC, Required;
    /// Every VIP's Maglev table, in regions of one pool.
    ring / RING = Array<u32, u32>,
        Capacity::Configured { setting: Setting::TablePool, default: DEFAULT_RING_POOL }, 0, Required;
    /// Backend entries by id (id 0 is reserved).
    backends / BACKENDS = Array<u32, BackendInfo>, Capacity::Fixed(MAX_BACKENDS), 0, Required;
    /// The cached next hop per backend id.
    nexthops / NEXTHOPS = Array<u32, NextHop>, Capacity::Fixed(MAX_BACKENDS), 0, Required;
    /// Established IPv6 flows (and, in pins of builds before `CT4`, IPv4 ones: lbd moves them).
    ct / CT = LruHash<FlowKey, CtValue>,
        Capacity::Configured { setting: Setting::ConntrackSize, default: DEFAULT_CT_SIZE }, 0, Required;
    /// Established IPv4 flows, under a 16-byte key.
    ct4 / CT4 = LruHash<FlowKey4, CtValue>,
        Capacity::Configured { setting: Setting::ConntrackSize, default: DEFAULT_CT_SIZE }, 0, Optional;
    /// Flows seen once.
    ct_new / CT_NEW = LruHash<FlowKey, CtValue>,
        Capacity::Configured { setting: Setting::ConntrackNewSize, default: DEFAULT_CT_NEW_SIZE }, 0, Required;
    /// First fragments' choices, for the later fragments.
    frags / FRAGS = LruHash<FragKey, CtValue>, Capacity::Fixed(FRAG_TABLE_SIZE), 0, Required;
    /// The global configuration (one entry).
    config / CONFIG = Array<u32, GlobalConfig>, Capacity::Fixed(1), 0, Required;
    /// Destination ports some VIP uses (`VIP_PORT_*` bits, indexed by port in host order).
    vip_ports / VIP_PORTS = Array<u32, u8>, Capacity::Fixed(65_536), 0, Required;
    /// Per-CPU counters (`Counter`), `COUNTER_SLOTS` of them: room for later counters.
    counters / COUNTERS = PerCpuArray<u32, u64>, Capacity::Fixed(COUNTER_SLOTS), 0, Required;
    /// Per-CPU statistics per VIP id.
    vip_stats / VIP_STATS = PerCpuArray<u32, VipStats>, Capacity::Fixed(MAX_VIPS), 0, Required;
    /// Per-CPU statistics per backend id.
    backend_stats / BACKEND_STATS = PerCpuArray<u32, BackendStats>, Capacity::Fixed(MAX_BACKENDS), 0, Required;
    /// The agent's id allocation cursors (one entry; never read by the program).
    agent_state / AGENT_STATE = Array<u32, AgentState>, Capacity::Fixed(1), 0, Optional;
    /// Packets and bytes of each VIP's retired backends (by VIP id; written by lbd only).
    vip_retired / VIP_RETIRED = Array<u32, VipTotals>, Capacity::Fixed(MAX_VIPS), 0, Optional;
    /// Until when each VIP's SYNs are recorded in `CT_NEW` (by VIP id, a tick; see
    /// `syn_recording`): a VIP whose table changes does not slow the others' SYNs.
    syn_record / SYN_RECORD = Array<u32, u32>, Capacity::Fixed(MAX_VIPS), 0, Never;
    /// The SYN cache, direct-mapped by flow hash (`SYN_SEEN_SLOTS`).
    syn_seen / SYN_SEEN = Array<u32, CtValue>, Capacity::Fixed(SYN_SEEN_SLOTS), 0, Never;
    /// The tracked-flow filter: two halves of `CT_FILTER_BITS` bits and the selector
    /// (`CT_FILTER_ACTIVE`). Fresh with every loaded program, all bits set until lbd's first
    /// rebuild (a program replaced under pinned tables must not miss their flows).
    ct_filter / CT_FILTER = Array<u32, u64>, Capacity::Fixed(CT_FILTER_ENTRIES), BPF_F_MMAPABLE, Never;
}

/// The maps of the other objects (not pinned, not resized).
pub const DECAP_VIPS: &str = "DECAP_VIPS";
pub const DECAP_COUNTERS: &str = "DECAP_COUNTERS";
pub const BENCH_PROGS: &str = "BENCH_PROGS";
pub const BENCH_INPUT: &str = "BENCH_INPUT";
pub const BENCH_STATE: &str = "BENCH_STATE";

/// The maps lbd pins: all but `Pin::Never`.
pub fn pinned() -> impl Iterator<Item = &'static MapSpec> {
    BALANCER.iter().filter(|s| s.pin != Pin::Never)
}

/// The registry entry of a balancer map.
pub fn spec(name: &str) -> Option<&'static MapSpec> {
    BALANCER.iter().find(|s| s.name == name)
}
