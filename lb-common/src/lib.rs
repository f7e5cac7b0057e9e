//! Types and pure logic shared by the XDP programs and the userspace agent.
//!
//! Everything that crosses the kernel/userspace boundary lives here, `#[repr(C)]` with explicit
//! padding so that both sides read the same bytes. Addresses are stored as network-order bytes
//! (IPv4 in the first four bytes of a 16-byte array, the rest zero) and ports as the raw
//! network-order `u16` read from the packet, so the datapath never swaps bytes on the hot path.
//!
//! The flow hash and the Maglev lookup index are defined once, here, so that the datapath and
//! the table builder (and every balancer node) agree on which slot a flow lands in.
#![cfg_attr(not(test), no_std)]

#[cfg(any(feature = "alloc", test))]
extern crate alloc;

#[cfg(any(feature = "alloc", test))]
pub mod maglev;

/// Address family tag used in keys: IPv4.
pub const FAMILY_V4: u8 = 4;
/// Address family tag used in keys: IPv6.
pub const FAMILY_V6: u8 = 6;

/// IP protocol numbers the datapath understands.
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_IPIP: u8 = 4;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_IPV6: u8 = 41;
pub const PROTO_IPV6_FRAG: u8 = 44;
pub const PROTO_ICMPV6: u8 = 58;

/// Default Maglev table size per VIP (prime, as in the Maglev paper and Katran).
pub const DEFAULT_TABLE_SIZE: u32 = 65_537;
/// Largest table size a VIP may ask for.
pub const MAX_TABLE_SIZE: u32 = 1_048_573;
/// Smallest table size a VIP may ask for.
pub const MIN_TABLE_SIZE: u32 = 7;
/// Default number of slots in the shared ring pool that holds every VIP's table.
/// Two tables per VIP must fit at once while one replaces the other.
pub const DEFAULT_RING_POOL: u32 = 1 << 22;
/// Capacity of the VIP map (and of the per-VIP statistics array).
pub const MAX_VIPS: u32 = 1024;
/// Capacity of the backend arrays. Backend id 0 is reserved: a ring slot holding 0 is empty.
pub const MAX_BACKENDS: u32 = 16_384;
/// Default capacity of the established-flow table.
pub const DEFAULT_CT_SIZE: u32 = 262_144;
/// Default capacity of the table of flows seen once (promoted to the main table on their
/// second packet), so that a flood of first packets cannot evict established flows.
pub const DEFAULT_CT_NEW_SIZE: u32 = 65_536;
/// Capacity of the fragment table (first fragment's choice, looked up by later fragments).
pub const FRAG_TABLE_SIZE: u32 = 8_192;
/// How long a cached next hop (from `bpf_fib_lookup`) is trusted before it is looked up again,
/// in jiffies (reading jiffies is far cheaper per packet than a clock): 0.25 s at HZ=1000,
/// 1 s at HZ=250.
pub const NEXTHOP_TTL_JIFFIES: u64 = 250;
/// How long a failed next-hop lookup is remembered before it is tried again, in jiffies.
pub const NEXTHOP_RETRY_JIFFIES: u64 = 25;
/// Outer TTL / hop limit of encapsulated packets and of ICMP replies.
pub const DEFAULT_TTL: u8 = 64;
/// IPv6 bytes of the original packet quoted in a Packet Too Big reply.
pub const ICMP6_QUOTE_LEN: usize = 128;

/// Bits of the `VIP_PORTS` filter (indexed by destination port): some VIP uses this port.
pub const VIP_PORT_TCP: u8 = 1;
pub const VIP_PORT_UDP: u8 = 2;

/// Forwarding modes of a VIP.
pub const MODE_IPIP: u32 = 0;
pub const MODE_L2: u32 = 1;

/// Backend flags.
/// The slot is in use (a backend of some VIP).
pub const BACKEND_F_ACTIVE: u32 = 1;
/// The backend is down: its established flows are re-steered through the table at once.
pub const BACKEND_F_DOWN: u32 = 2;

/// Global configuration flags.
pub const CONFIG_F_HAVE_V4_SRC: u32 = 1;
pub const CONFIG_F_HAVE_V6_SRC: u32 = 2;

/// The maps: one registry of names, kinds, types, capacities and pins.
pub mod maps;

/// Names of the programs in the eBPF objects.
pub mod progs {
    pub const BALANCER: &str = "lb_balancer";
    pub const DECAP: &str = "lb_decap";
    pub const BENCH_HARNESS: &str = "bench_harness";
    pub const BENCH_TX: &str = "bench_tx";
    pub const BENCH_TABLE_WRITE: &str = "bench_table_write";
}

/// Key of the VIP map: a service is an (address, port, protocol) triple.
/// Aligned so the datapath builds and copies it with word stores, not byte loops.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct VipKey {
    pub addr: [u8; 16],
    /// Network byte order, exactly as in the packet.
    pub port: u16,
    pub proto: u8,
    pub family: u8,
}

/// Value of the VIP map. Replaced whole (the map is a hash map without preallocation, so an
/// update is an RCU swap): this is what makes a table switch atomic for the datapath.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct VipMeta {
    /// Index into the per-VIP statistics.
    pub vip_id: u32,
    /// `MODE_IPIP` or `MODE_L2`.
    pub mode: u32,
    /// First slot of this VIP's Maglev table in the ring pool.
    pub ring_offset: u32,
    /// Number of slots (prime).
    pub ring_size: u32,
    /// Table generation, bumped on every table change (for observability).
    pub generation: u32,
    pub _pad: u32,
}

/// A backend as the datapath sees it, indexed by backend id. A backend id belongs to one
/// (VIP, backend address) pair, so statistics are per VIP and backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct BackendInfo {
    pub addr: [u8; 16],
    pub family: u8,
    pub _pad: [u8; 3],
    /// `BACKEND_F_*`.
    pub flags: u32,
    /// `MODE_IPIP` or `MODE_L2` (copied from the VIP so a connection-table hit needs no VIP).
    pub mode: u32,
    pub vip_id: u32,
}

/// Cached result of `bpf_fib_lookup` for a backend (next hop towards it).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NextHop {
    /// `bpf_jiffies64` deadline; 0 = never looked up.
    pub expires: u64,
    pub ifindex: u32,
    pub mtu: u16,
    pub _pad0: u16,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
    pub _pad1: [u8; 4],
}

/// Key of the connection tables: the 5-tuple as the client sent it.
/// 8-byte aligned so the datapath zeroes and copies it with five 8-byte stores.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// Network byte order.
    pub sport: u16,
    /// Network byte order.
    pub dport: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}

impl FlowKey {
    /// The key of an IPv4 flow in `CT4`; `None` for IPv6.
    #[inline(always)]
    pub fn v4(&self) -> Option<FlowKey4> {
        if self.family != FAMILY_V4 {
            return None;
        }
        Some(FlowKey4 {
            src: [self.src[0], self.src[1], self.src[2], self.src[3]],
            dst: [self.dst[0], self.dst[1], self.dst[2], self.dst[3]],
            sport: self.sport,
            dport: self.dport,
            proto: self.proto,
            _pad: [0; 3],
        })
    }
}

/// Key of `CT4`, the established IPv4 flows: the 5-tuple in 16 bytes. The kernel hashes and
/// compares a table's whole key on every lookup, and `FlowKey` is 40 bytes for IPv6's sake.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey4 {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    /// Network byte order.
    pub sport: u16,
    /// Network byte order.
    pub dport: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

impl FlowKey4 {
    /// The same flow as a `FlowKey`.
    pub fn flow_key(&self) -> FlowKey {
        let mut k = FlowKey {
            sport: self.sport,
            dport: self.dport,
            proto: self.proto,
            family: FAMILY_V4,
            ..FlowKey::default()
        };
        k.src[..4].copy_from_slice(&self.src);
        k.dst[..4].copy_from_slice(&self.dst);
        k
    }
}

/// Value of the connection tables (`CT`, `CT4`, `CT_NEW`) and of the fragment table (`FRAGS`, where
/// `syn_seq` and `flags` are 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CtValue {
    pub backend: u32,
    /// The flow's hash, kept so that tracked packets need not hash again (IPv6 flow label).
    pub hash: u32,
    /// The client's initial sequence number: the sequence number of the SYN (SYN without ACK)
    /// that opened the flow, as read from the packet (network byte order, like the ports).
    /// 0 for UDP and for flows first seen on another packet. A later SYN with the same number
    /// is a retry of that SYN; with another number it opens a new connection on a reused
    /// 4-tuple.
    pub syn_seq: u32,
    /// `CT_F_*`.
    pub flags: u32,
    /// When the flow's last packet was seen, in `CT_TICK_SHIFT` ticks of the kernel's coarse
    /// monotonic clock (`bpf_ktime_get_coarse_ns() >> CT_TICK_SHIFT`, wrapping after about 52
    /// days): with direct server return the balancer sees only the client's side, so idleness
    /// is what tells an active connection from one whose client went away. 0 in `FRAGS`.
    pub last_seen: u32,
    /// The low 32 bits of jiffies when `last_seen` was last written. Reading jiffies is one
    /// load (the verifier inlines `bpf_jiffies64`), the coarse clock a helper call: the
    /// datapath reads the clock only when jiffies moved, at most once a tick per flow.
    pub touched: u32,
}

/// `CtValue::last_seen` is `CLOCK_MONOTONIC_COARSE` nanoseconds shifted right
/// by this much: ticks of about 1.05 ms, so a busy flow's entry is written at most once a tick.
pub const CT_TICK_SHIFT: u32 = 20;

/// Connection-table value flag: the client sent a FIN or a RST on this flow. It is not active
/// any more (it is counted as closing); a new SYN on the tuple starts a fresh entry, and so
/// does any packet once the entry has been quiet for [`CT_CLOSED_TICKS`].
pub const CT_F_CLOSING: u32 = 2;

/// How long a closing entry outlives its connection: after this many ticks (10 s) without a
/// packet, the tuple's next packet is a new connection's, steered by the current table, not
/// by the old backend. Why: a client reuses its ports, and with ECMP in front of several
/// balancers a new connection's packets can reach a balancer that still holds the old
/// connection's entry (the new one's SYN went to another): following it would send them to a
/// backend that never saw the connection and answers with a RST. 10 s, as Cilium's close
/// timeout: after its FIN a client only acknowledges what its server still sends (each ACK
/// keeps the entry fresh), and a port leaves TIME_WAIT only after 60 s.
pub const CT_CLOSED_TICKS: u32 = (10_000_000_000u64 >> CT_TICK_SHIFT) as u32;

/// Whether a closing entry last seen at tick `last_seen` has been quiet for longer than
/// [`CT_CLOSED_TICKS`] at tick `now` (wrapping ticks; a `last_seen` a little after `now`, read
/// on another CPU, is not old).
#[inline(always)]
pub fn ct_closed_long_ago(last_seen: u32, now: u32) -> bool {
    let quiet = now.wrapping_sub(last_seen);
    quiet > CT_CLOSED_TICKS && quiet < u32::MAX / 2
}

/// Connection-table value flag: the flow was steered again because its backend was down or
/// retired. Its client's RSTs are not counted against the backend it has now (they answer
/// what the old backend did, or did not, send).
pub const CT_F_RESTEERED: u32 = 1;

/// Slots of the SYN cache (`SYN_SEEN`, direct-mapped by `flow_hash & SYN_SEEN_MASK`): the last
/// bare SYN whose slot this is, sent on while no table changes (SYNs then make no
/// connection-table entry), as a `CtValue` (`backend`, `hash`, `syn_seq`; the rest is written
/// when the handshake's ACK copies the slot into `CT`, which saves building the value on the
/// stack). A SYN finding its own hash and sequence number is a retry (`syn_retries`); the
/// handshake's ACK finding its hash and the sequence number plus one goes straight into `CT`.
/// Lossy by design: a SYN of another flow with the same slot overwrites it (a statistic and a
/// shortcut, never the only record of a flow). A power of two: 24 bytes each, 1.5 MiB.
pub const SYN_SEEN_SLOTS: u32 = 65_536;
/// `flow_hash & SYN_SEEN_MASK` is a flow's slot.
pub const SYN_SEEN_MASK: u32 = SYN_SEEN_SLOTS - 1;

/// Bits in each half of the tracked-flow filter (`CT_FILTER`): a blocked Bloom filter, two bits
/// per flow in one 64-bit word (`ct_filter_slot`), set for every flow `CT` holds. A bare SYN
/// with either bit clear is certainly not in `CT`, so it skips the `CT` probe (a cache miss on
/// the table's buckets, about half of a SYN's cost); both set may be collisions and cost the
/// probe. 2^22 bits (512 KiB) a half: at the default `CT` size, full, about 1.5% of SYNs probe
/// (a probe of a full table costs a few hundred ns).
pub const CT_FILTER_BITS: u32 = 1 << 22;
/// 64-bit words in each half of `CT_FILTER`.
pub const CT_FILTER_WORDS: u32 = CT_FILTER_BITS / 64;
/// The entry of `CT_FILTER` after its two halves: which half SYNs read (0 or 1). The datapath
/// sets a flow's bits in both halves when it inserts the flow into `CT`; lbd rebuilds the other
/// half from a scan of `CT` (zero it, scan, set each entry's bits) and then makes it the one
/// read, so bits of flows `CT` no longer holds do not pile up.
pub const CT_FILTER_ACTIVE: u32 = 2 * CT_FILTER_WORDS;
/// Entries of `CT_FILTER`: two halves and the selector.
pub const CT_FILTER_ENTRIES: u32 = CT_FILTER_ACTIVE + 1;

/// A flow hash's place in `CT_FILTER`: the entry of its word in half 0 (half 1's is the next
/// one, so that an insert marks both in one cache line) and the mask of its two bits in it
/// (hash bits 6-21 choose the word, 0-5 and 22-27 the bits; one bit when those agree).
#[inline(always)]
pub fn ct_filter_slot(hash: u32) -> (u32, u64) {
    let word = (hash & (CT_FILTER_BITS - 1)) >> 6;
    (word << 1, 1u64 << (hash & 63) | 1u64 << ((hash >> 22) & 63))
}

/// How long lbd keeps SYN recording armed after it writes a changed table: in `CT_TICK_SHIFT`
/// ticks, 10 s (a client retries an unanswered SYN after 1, 3 and 7 s).
pub const SYN_RECORD_TICKS: u32 = (10_000_000_000u64 >> CT_TICK_SHIFT) as u32;

/// Whether a VIP's SYNs are recorded in `CT_NEW` at tick `now`: `deadline` (the VIP's entry of
/// `SYN_RECORD`, written by lbd before it writes the VIP's changed table) is non-zero and still
/// ahead of `now` (wrapping ticks).
#[inline(always)]
pub fn syn_recording(deadline: u32, now: u32) -> bool {
    deadline != 0 && (deadline.wrapping_sub(now) as i32) > 0
}

/// Key of the fragment table: what identifies one datagram's fragments.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FragKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// IPv4 identification (16 bits) or IPv6 fragment identification, as read (network order).
    pub id: u32,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}

/// Global datapath configuration (array map, one entry).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct GlobalConfig {
    /// Outer source address of IPv6-in-IPv6 packets.
    pub encap_src_v6: [u8; 16],
    /// Outer source address of IPv4-in-IPv4 packets.
    pub encap_src_v4: [u8; 4],
    /// `CONFIG_F_*`.
    pub flags: u32,
}

/// Per-CPU statistics of one backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct BackendStats {
    pub packets: u64,
    pub bytes: u64,
    /// Flows whose first packet chose this backend.
    pub new_flows: u64,
    /// SYNs repeating the tracked SYN of a flow not yet established (same 4-tuple, same
    /// initial sequence number, found in `CT_NEW` or in the SYN cache): the client retried
    /// because nobody answered. Lossy: a SYN whose cache slot another SYN took in between
    /// counts as a new flow.
    pub syn_retries: u64,
    /// RSTs sent by clients on flows of this backend (not counted on flows re-steered here
    /// from a backend that was down: see `CT_F_RESTEERED`).
    pub client_rsts: u64,
    /// Flows moved to this backend because their previous backend was down.
    pub resteered: u64,
}

impl BackendStats {
    pub fn add(&mut self, o: &Self) {
        self.packets += o.packets;
        self.bytes += o.bytes;
        self.new_flows += o.new_flows;
        self.syn_retries += o.syn_retries;
        self.client_rsts += o.client_rsts;
        self.resteered += o.resteered;
    }
}

/// Per-CPU statistics of one VIP.
///
/// The datapath counts a forwarded packet once, on its backend (`BackendStats`): `packets`
/// and `bytes` here are written only by programs before `VIP_RETIRED` existed. A VIP's
/// packets and bytes are its backends' plus those of the backends it retired (`VipTotals`),
/// summed by lbd.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct VipStats {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    /// Packets dropped because the VIP's table was empty.
    pub no_backend: u64,
}

impl VipStats {
    pub fn add(&mut self, o: &Self) {
        self.packets += o.packets;
        self.bytes += o.bytes;
        self.new_flows += o.new_flows;
        self.no_backend += o.no_backend;
    }
}

/// What a VIP's retired backends forwarded (`VIP_RETIRED`, by VIP id): lbd adds a backend's
/// statistics here before it zeroes them for the id's next owner, so the VIP's totals (this
/// plus its current backends') never go back.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct VipTotals {
    pub packets: u64,
    pub bytes: u64,
}

/// The agent's own state, kept beside the datapath's maps so that it outlives a restart with
/// them (`AGENT_STATE`, one entry; the program never reads it): where backend and VIP id
/// allocation goes on. Pinned connection-table entries outlive the backends they name, and the
/// established path checks only that a tracked id is live, so an id must not be handed out
/// again while entries may still name it: a restarted agent continues round-robin from the
/// persisted cursors instead of deriving them from the ids in use (which hands out the ids of
/// backends removed just before the restart first).
///
/// The layout is pinned: later fields take `_reserved` words, never change these.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct AgentState {
    /// `AGENT_STATE_MAGIC` once an agent has written the cursors; 0 in a fresh map.
    pub magic: u32,
    /// The next backend id to try (1 to `MAX_BACKENDS - 1`).
    pub next_backend_id: u32,
    /// The next VIP id to try (0 to `MAX_VIPS - 1`).
    pub next_vip_id: u32,
    /// `AGENT_F_*`.
    pub flags: u32,
    pub _reserved: [u32; 12],
}

/// `AgentState::flags`: `VIP_RETIRED` holds the retired backends' share of every VIP's
/// totals (set once lbd has derived it from the older programs' per-VIP counters).
pub const AGENT_F_VIP_RETIRED: u32 = 1;

/// `AgentState::magic` of a written entry ("lbAS").
pub const AGENT_STATE_MAGIC: u32 = 0x6c62_4153;

/// Key of the decapsulation program's VIP set.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct DecapKey {
    pub addr: [u8; 16],
    pub family: u8,
    pub _pad: [u8; 3],
}

/// Values of the decapsulation map: what a listed address is to this host.
/// A VIP served here: inner packets to it are decapsulated.
pub const DECAP_KIND_VIP: u32 = 1;
/// One of this host's own addresses: outer packets must be addressed to one of these.
pub const DECAP_KIND_LOCAL: u32 = 2;
/// Capacity of the decapsulation map.
pub const MAX_DECAP_ADDRS: u32 = 1024;

/// `bench_table_write`'s table: 2^this 64-byte slots (262,144, the default `conntrack_size`:
/// 16 MiB).
pub const BENCH_TABLE_BITS: u32 = 18;

/// Bytes of the benchmark harness's saved input packet.
pub const BENCH_MAX_PACKET: usize = 128;

/// The benchmark harness's input: the pristine packet restored before every repetition.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BenchInput {
    /// Length of the packet (at most `BENCH_MAX_PACKET`, a multiple of 8).
    pub len: u32,
    /// If non-zero, the offset of 4 bytes (a source address's last bytes) overwritten with the
    /// repetition number, so that every repetition is a new flow.
    pub vary_off: u32,
    pub data: [u8; BENCH_MAX_PACKET],
}

/// Indices of the benchmark harness's per-CPU state.
pub const BENCH_RUNS: u32 = 0;
pub const BENCH_TAIL_CALL_FAILED: u32 = 1;

macro_rules! counters {
    ($(#[$m:meta])* $vis:vis enum $name:ident { $($(#[$vm:meta])* $v:ident = $n:expr, $label:expr;)* }) => {
        $(#[$m])*
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        $vis enum $name { $($(#[$vm])* $v = $n,)* }
        impl $name {
            /// Every counter, in index order.
            pub const ALL: &'static [$name] = &[$($name::$v,)*];
            /// Number of counters (the per-CPU array's size).
            pub const COUNT: u32 = [$($n,)*].len() as u32;
            /// Stable snake_case name, used in metrics and JSON.
            pub const fn name(self) -> &'static str { match self { $($name::$v => $label,)* } }
        }
    };
}

counters! {
    /// The balancer's per-CPU counters: one per reason a packet was not forwarded, plus a few
    /// connection-table events. Every packet the program returns without forwarding increments
    /// exactly one of the `Pass*`/`Drop*`/`IcmpTooBigSent` counters.
    pub enum Counter {
        /// Not IPv4 or IPv6 (ARP, LLDP, ...): passed to the kernel.
        PassNonIp = 0, "pass_non_ip";
        /// IP, but not to a VIP (address, port, protocol): passed to the kernel.
        PassNotVip = 1, "pass_not_vip";
        /// Truncated or inconsistent headers: passed to the kernel, which drops it with its own accounting.
        PassMalformed = 2, "pass_malformed";
        /// A later fragment whose first fragment was not seen: passed to the kernel.
        PassFragUnknown = 3, "pass_frag_unknown";
        /// ICMP error quoting something that is not a VIP flow: passed to the kernel.
        PassIcmpNotVip = 4, "pass_icmp_not_vip";
        /// VIP with an empty table (no backend with weight): dropped.
        DropNoBackend = 5, "drop_no_backend";
        /// No route or no neighbour towards the backend: dropped.
        DropFib = 6, "drop_fib";
        /// Too big after encapsulation: dropped, ICMP fragmentation-needed / packet-too-big sent.
        IcmpTooBigSent = 7, "icmp_too_big_sent";
        /// Could not grow or shrink the packet (helper failure): dropped.
        DropAdjust = 8, "drop_adjust";
        /// Too big after encapsulation and too short to quote: dropped without an ICMP reply.
        DropTooBig = 9, "drop_too_big";
        /// Encapsulation needs a source address of this family and none is configured: dropped.
        DropNoEncapSource = 10, "drop_no_encap_source";
        /// A flow seen for the first time: a SYN that is not a retry (recorded in the new-flow
        /// table only while a table changes, otherwise noted in the SYN cache), or another
        /// first packet recorded in the new-flow table; including a new connection on a reused
        /// 4-tuple (a SYN with another initial sequence number than the tracked one, or any
        /// SYN on an established flow).
        CtNew = 11, "ct_new";
        /// A flow that entered the established table on a packet after its first: promoted
        /// from the new-flow table, or the handshake's ACK of a SYN in the SYN cache.
        CtPromoted = 12, "ct_promoted";
        /// A tracked flow whose backend was down, steered again through the table.
        CtResteered = 13, "ct_resteered";
        /// Inserting into the established table `CT` failed (a promotion or a re-steer): the
        /// LRU could not free an entry (-ENOMEM), i.e. the table is full and under contention.
        /// The packet is still forwarded; the flow stays in `CT_NEW` (or untracked).
        CtInsertFailed = 14, "ct_insert_failed";
        /// ICMP errors about a VIP flow forwarded to the flow's backend.
        IcmpForwarded = 15, "icmp_forwarded";
        /// Fragments forwarded through the fragment table.
        FragForwarded = 16, "frag_forwarded";
        /// A TCP packet other than a first SYN found its flow in neither connection table, and
        /// is not the handshake's ACK of a SYN in the SYN cache: the flow's state was lost
        /// (evicted from `CT`, evicted from `CT_NEW` before the handshake completed, its SYN's
        /// cache slot taken by another SYN, or tracked by maps that were since replaced), or
        /// the flow started before this balancer saw it (or is a spoofed ACK). The packet goes
        /// through the table (and is counted under `ct_new` too). UDP has no such marker: a
        /// datagram of a lost flow looks like a new one.
        CtLost = 17, "ct_lost";
        /// Recording a first packet in `CT_NEW` failed (the LRU could not free an entry): the
        /// packet is forwarded, its flow is not tracked.
        CtNewInsertFailed = 18, "ct_new_insert_failed";
        /// Recording a first fragment's choice in `FRAGS` failed: its later fragments will be
        /// passed to the kernel (`pass_frag_unknown`).
        FragInsertFailed = 19, "frag_insert_failed";
    }
}

impl Counter {
    /// Whether the counter is a packet's final outcome (the packet was passed to the kernel or
    /// dropped: every packet not forwarded counts once under exactly one of these) rather than
    /// an event (a connection-table event, or a forwarded packet of a particular kind, which is
    /// already counted as forwarded per VIP). Metrics export outcomes as
    /// `lb_datapath_packets_total{reason}` and events as `lb_datapath_events_total{event}`.
    pub const fn is_outcome(self) -> bool {
        match self {
            Counter::PassNonIp
            | Counter::PassNotVip
            | Counter::PassMalformed
            | Counter::PassFragUnknown
            | Counter::PassIcmpNotVip
            | Counter::DropNoBackend
            | Counter::DropFib
            | Counter::IcmpTooBigSent
            | Counter::DropAdjust
            | Counter::DropTooBig
            | Counter::DropNoEncapSource => true,
            Counter::CtNew
            | Counter::CtPromoted
            | Counter::CtResteered
            | Counter::CtInsertFailed
            | Counter::IcmpForwarded
            | Counter::FragForwarded
            | Counter::CtLost
            | Counter::CtNewInsertFailed
            | Counter::FragInsertFailed => false,
        }
    }
}

/// Slots of the `COUNTERS` per-CPU array. Larger than [`Counter::COUNT`] on purpose: a later
/// build can add counters without changing the map's layout, so its pins stay compatible and a
/// restart keeps the connection tables. Slots past the last counter stay zero.
pub const COUNTER_SLOTS: u32 = 64;
const _: () = assert!(Counter::COUNT <= COUNTER_SLOTS);

counters! {
    /// The decapsulation program's per-CPU counters.
    pub enum DecapCounter {
        /// Outer header removed, inner packet passed to the kernel.
        Decapsulated = 0, "decapsulated";
        /// Not IP-in-IP for a configured VIP: passed unchanged.
        PassNotOurs = 1, "pass_not_ours";
        /// Truncated or inconsistent headers: passed unchanged.
        PassMalformed = 2, "pass_malformed";
        /// Could not shrink the packet: dropped.
        DropAdjust = 3, "drop_adjust";
    }
}

#[inline(always)]
fn word(b: &[u8; 16], i: usize) -> u32 {
    u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

#[inline(always)]
fn word64(b: &[u8; 16], i: usize) -> u64 {
    word(b, i) as u64 | (word(b, i + 4) as u64) << 32
}

/// One step of the flow hash: the word in, then a multiplication by an odd constant (a
/// bijection), so the chain's latency is a XOR and a multiply per 8 bytes of key.
#[inline(always)]
fn mix(h: u64, k: u64) -> u64 {
    (h ^ k).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// MurmurHash3's 64-bit finalizer: every input bit reaches every output bit (the chain above
/// carries a word's high bits only upwards).
#[inline(always)]
fn fmix(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// Seed of the flow hash. Fixed, so that every balancer node hashes a flow the same way.
pub const FLOW_HASH_SEED: u64 = 0x5eed_1b1b_6c62_0001;

/// The flow hash: the 5-tuple's 64-bit words through a multiply-XOR chain and MurmurHash3's
/// finalizer, folded to 32 bits. The datapath uses it to pick a Maglev slot for a new flow;
/// tests and tools use it to predict that choice. An IPv4 key mixes its two addresses as one
/// word and skips the zeros after them; the family is in the last word, so IPv4 and IPv6 keys
/// with the same first bytes differ. Every SYN pays for it: an IPv6 key costs five steps (it
/// cost ten 32-bit MurmurHash rounds before, see docs/datapath.md "Change 6").
#[inline(always)]
pub fn flow_hash(k: &FlowKey) -> u32 {
    let tail = (k.sport as u64)
        | ((k.dport as u64) << 16)
        | ((k.proto as u64) << 32)
        | ((k.family as u64) << 40);
    let mut h = FLOW_HASH_SEED;
    if k.family == FAMILY_V4 {
        h = mix(h, word(&k.src, 0) as u64 | (word(&k.dst, 0) as u64) << 32);
    } else {
        h = mix(h, word64(&k.src, 0));
        h = mix(h, word64(&k.src, 8));
        h = mix(h, word64(&k.dst, 0));
        h = mix(h, word64(&k.dst, 8));
    }
    let h = fmix(mix(h, tail));
    (h ^ (h >> 32)) as u32
}

/// Slot of a flow in a Maglev table of `size` slots.
#[inline(always)]
pub fn maglev_index(hash: u32, size: u32) -> u32 {
    if size == 0 {
        0
    } else {
        hash % size
    }
}

/// Whether `n` is prime (table sizes must be, for Maglev's permutations to cover every slot).
pub const fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    if n.is_multiple_of(2) {
        return n == 2;
    }
    let mut d = 3u32;
    while (d as u64) * (d as u64) <= n as u64 {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 2;
    }
    true
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: every type below is `#[repr(C)]`, made only of integers and byte arrays, with
    // explicit padding fields, so any bit pattern is valid and there are no uninitialised bytes.
    unsafe impl aya::Pod for VipKey {}
    unsafe impl aya::Pod for VipMeta {}
    unsafe impl aya::Pod for BackendInfo {}
    unsafe impl aya::Pod for NextHop {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowKey4 {}
    unsafe impl aya::Pod for CtValue {}
    unsafe impl aya::Pod for FragKey {}
    unsafe impl aya::Pod for GlobalConfig {}
    unsafe impl aya::Pod for BackendStats {}
    unsafe impl aya::Pod for VipStats {}
    unsafe impl aya::Pod for VipTotals {}
    unsafe impl aya::Pod for DecapKey {}
    unsafe impl aya::Pod for BenchInput {}
    unsafe impl aya::Pod for AgentState {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn a_closing_entry_is_over_after_ten_quiet_seconds() {
        // 10 s of ~1.05 ms ticks.
        assert_eq!(CT_CLOSED_TICKS, 9536);
        for now in [CT_CLOSED_TICKS + 5, 3, u32::MAX - 7] {
            let ago = |t: u32| now.wrapping_sub(t);
            assert!(!ct_closed_long_ago(ago(0), now));
            assert!(!ct_closed_long_ago(ago(CT_CLOSED_TICKS), now));
            assert!(ct_closed_long_ago(ago(CT_CLOSED_TICKS + 1), now));
            assert!(ct_closed_long_ago(ago(3_600_000), now), "an hour ago");
            // Written on another CPU a little after this one read the clock.
            assert!(!ct_closed_long_ago(now.wrapping_add(2), now));
        }
    }

    #[test]
    fn syn_recording_is_armed_until_its_deadline() {
        assert!(!syn_recording(0, 5), "never armed");
        for now in [3u32, 1 << 30, u32::MAX - 2] {
            let deadline = now.wrapping_add(SYN_RECORD_TICKS);
            assert!(syn_recording(deadline, now));
            assert!(syn_recording(deadline, deadline.wrapping_sub(1)));
            assert!(!syn_recording(deadline, deadline));
            assert!(!syn_recording(deadline, deadline.wrapping_add(1_000_000)));
        }
    }

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<VipKey>(), 20);
        assert_eq!(size_of::<VipMeta>(), 24);
        assert_eq!(size_of::<BackendInfo>(), 32);
        assert_eq!(size_of::<NextHop>(), 32);
        assert_eq!(size_of::<FlowKey>(), 40);
        assert_eq!(size_of::<FlowKey4>(), 16);
        assert_eq!(size_of::<CtValue>(), 24);
        assert_eq!(size_of::<FragKey>(), 40);
        assert_eq!(size_of::<GlobalConfig>(), 24);
        assert_eq!(size_of::<BackendStats>(), 48);
        assert_eq!(size_of::<VipStats>(), 32);
        assert_eq!(size_of::<DecapKey>(), 20);
        assert_eq!(size_of::<BenchInput>(), 8 + BENCH_MAX_PACKET);
        assert_eq!(size_of::<AgentState>(), 64);
    }

    #[test]
    fn v4_keys_round_trip() {
        let mut k = FlowKey {
            sport: 0x1234,
            dport: 0x5000,
            proto: PROTO_TCP,
            family: FAMILY_V4,
            ..Default::default()
        };
        k.src[..4].copy_from_slice(&[10, 0, 0, 1]);
        k.dst[..4].copy_from_slice(&[10, 0, 0, 2]);
        let k4 = k.v4().expect("an IPv4 key");
        assert_eq!(
            (k4.src, k4.dst, k4.proto),
            ([10, 0, 0, 1], [10, 0, 0, 2], PROTO_TCP)
        );
        assert_eq!(k4.flow_key(), k);
        k.family = FAMILY_V6;
        assert!(k.v4().is_none());
    }

    #[test]
    fn counters_are_dense_and_named() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as u32, i as u32);
            assert!(!c.name().is_empty());
        }
        assert_eq!(Counter::COUNT as usize, Counter::ALL.len());
        let mut names: Vec<&str> = Counter::ALL.iter().map(|c| c.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Counter::ALL.len(), "counter names are unique");
        // Indices are a pinned-map layout: existing counters never move.
        assert_eq!(Counter::CtInsertFailed as u32, 14);
        assert_eq!(Counter::FragForwarded as u32, 16);
        assert_eq!(
            (
                Counter::CtLost.name(),
                Counter::CtNewInsertFailed.name(),
                Counter::FragInsertFailed.name()
            ),
            ("ct_lost", "ct_new_insert_failed", "frag_insert_failed")
        );
        for (i, c) in DecapCounter::ALL.iter().enumerate() {
            assert_eq!(*c as u32, i as u32);
        }
    }

    #[test]
    fn primes() {
        assert!(is_prime(DEFAULT_TABLE_SIZE));
        assert!(is_prime(MAX_TABLE_SIZE));
        assert!(is_prime(MIN_TABLE_SIZE));
        assert!(!is_prime(65_536));
        assert!(!is_prime(1));
        assert!(is_prime(2));
    }

    fn key(src: u8, sport: u16) -> FlowKey {
        let mut k = FlowKey::default();
        k.src[..4].copy_from_slice(&[10, 0, 0, src]);
        k.dst[..4].copy_from_slice(&[10, 0, 0, 100]);
        k.sport = sport.to_be();
        k.dport = 80u16.to_be();
        k.proto = PROTO_TCP;
        k.family = FAMILY_V4;
        k
    }

    /// 64,000 flows of one kind into 64 buckets, by `hash % 64` (the low bits: the filter's
    /// and the SYN cache's index) and by `hash >> 26` (the high bits): each within 15% of even.
    fn assert_spreads(what: &str, keys: impl Iterator<Item = FlowKey>) {
        let mut low = [0u32; 64];
        let mut high = [0u32; 64];
        let mut n = 0;
        for k in keys {
            let h = flow_hash(&k);
            low[(h % 64) as usize] += 1;
            high[(h >> 26) as usize] += 1;
            n += 1;
        }
        assert_eq!(n, 64_000, "{what}");
        for (name, b) in [("low", low), ("high", high)] {
            assert!(
                b.iter().all(|c| (850..1150).contains(c)),
                "{what}: uneven spread of the {name} bits {b:?}"
            );
        }
    }

    #[test]
    fn flow_hash_spreads_real_looking_flows() {
        // One client, consecutive source ports.
        assert_spreads("IPv4 ports", (0..64_000u16).map(|p| key(1, 1024 + p)));
        // 256 clients in a /24, 250 ports each.
        assert_spreads(
            "IPv4 clients",
            (0..64_000u32).map(|i| key(i as u8, 40_000 + (i >> 8) as u16)),
        );
        let v6 = |i: u32| {
            let mut k = FlowKey {
                family: FAMILY_V6,
                proto: PROTO_TCP,
                dport: 443u16.to_be(),
                ..Default::default()
            };
            k.src = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
            k.dst = [
                0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0x10,
            ];
            // Clients on 256 /64s (the prefix's 8th byte), 250 ports each.
            k.src[7] = i as u8;
            k.sport = (30_000 + (i >> 8) as u16).to_be();
            k
        };
        assert_spreads("IPv6 clients", (0..64_000u32).map(v6));
        // One IPv6 client, consecutive ports.
        assert_spreads(
            "IPv6 ports",
            (0..64_000u32).map(|i| {
                let mut k = v6(0);
                k.sport = (1024 + i as u16).to_be();
                k
            }),
        );
    }

    #[test]
    fn ct_filter_slots_stay_in_their_half_and_pair_up() {
        let mut seen = std::collections::HashSet::new();
        for hash in [0u32, 1, 63, 64, 1 << 22, CT_FILTER_BITS - 1, u32::MAX] {
            let (entry, mask) = ct_filter_slot(hash);
            // Half 1's word is `entry + 1`: both below the selector.
            assert!(
                entry % 2 == 0 && entry + 1 < CT_FILTER_ACTIVE,
                "{hash}: {entry}"
            );
            assert!((1..=2).contains(&mask.count_ones()), "{hash}: {mask:#x}");
            seen.insert((entry, mask));
        }
        // 1 and 1 << 22 set the same two bits of word 0 (bits 0 and 1, from either end).
        assert_eq!(seen.len(), 6, "{seen:?}");
        // The word comes from bits 6-21, the bits from 0-5 and 22-27.
        assert_eq!(ct_filter_slot(0), (0, 1));
        assert_eq!(ct_filter_slot(1 << 22), (0, 0b11));
        assert_eq!(ct_filter_slot(1 << 6).0, 2);
        assert_eq!(
            ct_filter_slot(0),
            ct_filter_slot(1 << 28),
            "bits 28-31 unused"
        );
        assert_eq!(CT_FILTER_ENTRIES, CT_FILTER_ACTIVE + 1);
    }

    #[test]
    fn flow_hash_is_deterministic_and_spreads() {
        assert_eq!(flow_hash(&key(1, 40000)), flow_hash(&key(1, 40000)));
        assert_ne!(flow_hash(&key(1, 40000)), flow_hash(&key(1, 40001)));
        assert_ne!(flow_hash(&key(1, 40000)), flow_hash(&key(2, 40000)));
        let mut other_vip = key(1, 40000);
        other_vip.dst[3] = 101;
        assert_ne!(flow_hash(&key(1, 40000)), flow_hash(&other_vip));
        // The same first words as IPv6: another family, another hash.
        let mut v6 = key(1, 40000);
        v6.family = FAMILY_V6;
        assert_ne!(flow_hash(&key(1, 40000)), flow_hash(&v6));
        // Consecutive source ports spread evenly over 7 slots.
        let mut buckets = [0u32; 7];
        for p in 0..7000u16 {
            buckets[maglev_index(flow_hash(&key(1, 30000 + p)), 7) as usize] += 1;
        }
        for b in buckets {
            assert!((900..1100).contains(&b), "uneven spread {buckets:?}");
        }
    }
}
