//! The balancer: steers every packet to a VIP to one backend, chosen by weighted Maglev over
//! the VIP's table and pinned by connection tracking, and forwards it by IP-in-IP encapsulation
//! or by MAC rewrite (direct server return). Everything else passes untouched.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]
// Map keys and values are passed by reference: by value they would be copied onto the
// 512-byte BPF stack first.
#![allow(clippy::needless_borrows_for_generic_args)]

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
mod prog {
    use aya_ebpf::{
        bindings::{bpf_fib_lookup as FibParams, xdp_action, xdp_md, BPF_F_NO_PREALLOC},
        btf_maps::{Array, HashMap, LruHashMap, PerCpuArray},
        helpers::{
            bpf_fib_lookup, bpf_jiffies64, bpf_ktime_get_coarse_ns, bpf_redirect,
            bpf_xdp_adjust_head, bpf_xdp_adjust_tail,
        },
        macros::{btf_map, xdp},
        programs::XdpContext,
        EbpfContext,
    };
    use aya_log_ebpf::warn;
    use lb_common::*;
    use lb_ebpf::net::*;

    // BTF-defined maps (the `.maps` section): the kernel gets each map's key and value types,
    // so `bpftool map dump` prints them as structs. Sizes in the types are the defaults; lbd
    // sets the configured ones before loading.
    #[btf_map]
    static VIPS: HashMap<VipKey, VipMeta, { MAX_VIPS as usize }, { BPF_F_NO_PREALLOC as usize }> =
        HashMap::new();
    #[btf_map]
    static RING: Array<u32, { DEFAULT_RING_POOL as usize }> = Array::new();
    #[btf_map]
    static BACKENDS: Array<BackendInfo, { MAX_BACKENDS as usize }> = Array::new();
    #[btf_map]
    static NEXTHOPS: Array<NextHop, { MAX_BACKENDS as usize }> = Array::new();
    #[btf_map]
    static CT: LruHashMap<FlowKey, CtValue, { DEFAULT_CT_SIZE as usize }> = LruHashMap::new();
    #[btf_map]
    static CT_NEW: LruHashMap<FlowKey, CtValue, { DEFAULT_CT_NEW_SIZE as usize }> =
        LruHashMap::new();
    #[btf_map]
    static FRAGS: LruHashMap<FragKey, CtValue, { FRAG_TABLE_SIZE as usize }> = LruHashMap::new();
    #[btf_map]
    static CONFIG: Array<GlobalConfig, 1> = Array::new();
    /// Destination ports some VIP uses (`VIP_PORT_*` bits, indexed by port in host order): a
    /// one-load filter in front of the connection-table lookup, so traffic to other ports
    /// costs no hash lookup at all.
    #[btf_map]
    static VIP_PORTS: Array<u8, 65_536> = Array::new();
    /// `COUNTER_SLOTS` entries, not `Counter::COUNT`: room for later counters without a new
    /// map layout (pins of this build stay usable by the next).
    #[btf_map]
    static COUNTERS: PerCpuArray<u64, { COUNTER_SLOTS as usize }> = PerCpuArray::new();
    #[btf_map]
    static VIP_STATS: PerCpuArray<VipStats, { MAX_VIPS as usize }> = PerCpuArray::new();
    #[btf_map]
    static BACKEND_STATS: PerCpuArray<BackendStats, { MAX_BACKENDS as usize }> = PerCpuArray::new();
    /// The agent's id allocation cursors (`AgentState`), pinned with the other maps so that
    /// they survive a restart. Never read here.
    #[btf_map]
    static AGENT_STATE: Array<AgentState, 1> = Array::new();

    const AF_INET: u8 = 2;
    const AF_INET6: u8 = 10;
    const TCP_FIN: u8 = 0x01;
    const TCP_SYN: u8 = 0x02;
    const TCP_RST: u8 = 0x04;
    const TCP_ACK: u8 = 0x10;

    /// Why a packet was not forwarded. Mapped to an XDP action and a counter in one place.
    #[derive(Clone, Copy)]
    enum Error {
        NonIp,
        NotVip,
        Malformed,
        FragUnknown,
        IcmpNotVip,
        NoBackend,
        Fib,
        Adjust,
        TooBig,
        NoEncapSource,
        /// Not forwarded: rewritten into an ICMP "too big" for the sender and sent back.
        TooBigReplied,
    }

    impl From<Truncated> for Error {
        fn from(_: Truncated) -> Self {
            Error::Malformed
        }
    }

    impl Error {
        #[inline(always)]
        fn counter(self) -> Counter {
            match self {
                Error::NonIp => Counter::PassNonIp,
                Error::NotVip => Counter::PassNotVip,
                Error::Malformed => Counter::PassMalformed,
                Error::FragUnknown => Counter::PassFragUnknown,
                Error::IcmpNotVip => Counter::PassIcmpNotVip,
                Error::NoBackend => Counter::DropNoBackend,
                Error::Fib => Counter::DropFib,
                Error::Adjust => Counter::DropAdjust,
                Error::TooBig => Counter::DropTooBig,
                Error::NoEncapSource => Counter::DropNoEncapSource,
                Error::TooBigReplied => Counter::IcmpTooBigSent,
            }
        }

        /// Passes happen before the packet is touched, so it goes up byte-for-byte unchanged.
        /// A "too big" reply has already been written over the packet and goes back out.
        #[inline(always)]
        fn action(self) -> u32 {
            match self {
                Error::NonIp
                | Error::NotVip
                | Error::Malformed
                | Error::FragUnknown
                | Error::IcmpNotVip => xdp_action::XDP_PASS,
                Error::NoBackend
                | Error::Fib
                | Error::Adjust
                | Error::TooBig
                | Error::NoEncapSource => xdp_action::XDP_DROP,
                Error::TooBigReplied => xdp_action::XDP_TX,
            }
        }
    }

    /// Once the packet has been resized, a failed access can no longer pass it unchanged.
    #[inline(always)]
    fn adjusted(_: Truncated) -> Error {
        Error::Adjust
    }

    /// What the forwarding step needs to know about the packet as it arrived.
    #[derive(Clone, Copy)]
    struct Packet {
        l2: L2,
        family: u8,
        /// IP header length (IPv4 with options; 40 for IPv6).
        ihl: usize,
        /// Length of the IP packet according to its header.
        ip_len: usize,
        /// DSCP and ECN bits, copied to the outer header.
        tos: u8,
    }

    #[xdp]
    pub fn lb_balancer(ctx: XdpContext) -> u32 {
        match try_balance(&ctx) {
            Ok(action) => action,
            Err(e) => {
                count(e.counter());
                e.action()
            }
        }
    }

    #[inline(always)]
    fn count(c: Counter) {
        if let Some(p) = COUNTERS.get_ptr_mut(c as u32) {
            // SAFETY: per-CPU slot, only this CPU writes it while this program runs.
            unsafe { *p += 1 };
        }
    }

    #[inline(always)]
    fn backend_stats(id: u32) -> Option<&'static mut BackendStats> {
        // SAFETY: per-CPU slot, only this CPU writes it while this program runs.
        BACKEND_STATS.get_ptr_mut(id).map(|p| unsafe { &mut *p })
    }

    #[inline(always)]
    fn vip_stats(id: u32) -> Option<&'static mut VipStats> {
        // SAFETY: per-CPU slot, only this CPU writes it while this program runs.
        VIP_STATS.get_ptr_mut(id).map(|p| unsafe { &mut *p })
    }

    /// What kind of packet parsing found.
    #[derive(Clone, Copy)]
    enum Kind {
        /// TCP or UDP; the layer-4 header's offset and, for a first fragment, its id.
        Flow {
            l4: usize,
            first_fragment: Option<u32>,
        },
        /// A later fragment (no ports) with its datagram id.
        LaterFragment { id: u32 },
        /// ICMP or ICMPv6 at this offset.
        Icmp { l4: usize },
    }

    /// Where a packet goes: decided once, carried out by `forward`.
    struct Decision {
        id: u32,
        backend: BackendInfo,
        /// The flow's hash (IPv6 flow label of the outer header).
        hash: u32,
        /// Answer "too big" to the sender (never for ICMP errors themselves).
        reply_too_big: bool,
        /// Counted once the packet is on its way.
        counter: Option<Counter>,
    }

    #[inline(always)]
    fn try_balance(ctx: &XdpContext) -> Result<u32, Error> {
        let l2 = parse_l2(ctx)?;
        let mut key = FlowKey::default();
        let (pkt, kind) = match l2.ethertype {
            ETH_P_IP => ipv4(ctx, l2, &mut key)?,
            ETH_P_IPV6 => ipv6(ctx, l2, &mut key)?,
            _ => return Err(Error::NonIp),
        };
        // From here on, one path for both families: `key` is the flow as the client sees it.
        let end = pkt.l2.l3 + pkt.ip_len;
        let d = match kind {
            Kind::Flow { l4, first_fragment } => {
                new_or_tracked(ctx, &mut key, l4, end, first_fragment)?
            }
            Kind::LaterFragment { id } => later_fragment(&key, id)?,
            Kind::Icmp { l4 } => icmp_error(ctx, l4, end, &mut key)?,
        };
        let action = forward(ctx, &pkt, &key, &d)?;
        if let Some(c) = d.counter {
            count(c);
        }
        Ok(action)
    }

    /// Pointer to a header inside the packet (reads through it avoid stack copies).
    #[inline(always)]
    fn header<const N: usize>(ctx: &XdpContext, offset: usize) -> Result<&[u8; N], Error> {
        let p = ptr_at::<[u8; N]>(ctx, offset)?;
        // SAFETY: `ptr_at` checked the bounds; the packet is not resized while this lives.
        Ok(unsafe { &*p })
    }

    /// Like [`header`], but the header must also lie within the IP packet (`end` is where the
    /// IP header's length field says it ends): Ethernet padding is not a header.
    #[inline(always)]
    fn header_within<const N: usize>(
        ctx: &XdpContext,
        offset: usize,
        end: usize,
    ) -> Result<&[u8; N], Error> {
        if offset + N > end {
            return Err(Error::Malformed);
        }
        header::<N>(ctx, offset)
    }

    #[inline(always)]
    fn ipv4(ctx: &XdpContext, l2: L2, key: &mut FlowKey) -> Result<(Packet, Kind), Error> {
        let l3 = l2.l3;
        let h = header::<IPV4_LEN>(ctx, l3)?;
        let ihl = ((h[0] & 0x0f) as usize) * 4;
        if h[0] >> 4 != 4 || ihl < IPV4_LEN {
            return Err(Error::Malformed);
        }
        let ip_len = u16::from_be_bytes([h[2], h[3]]) as usize;
        if ip_len < ihl || l3 + ip_len > ctx.data_end() - ctx.data() {
            return Err(Error::Malformed);
        }
        key.family = FAMILY_V4;
        key.proto = h[9];
        key.src[..4].copy_from_slice(&h[12..16]);
        key.dst[..4].copy_from_slice(&h[16..20]);
        let pkt = Packet {
            l2,
            family: FAMILY_V4,
            ihl,
            ip_len,
            tos: h[1],
        };
        let frag = u16::from_be_bytes([h[6], h[7]]);
        let frag_id = u16::from_ne_bytes([h[4], h[5]]) as u32;
        if frag & 0x1fff != 0 {
            return Ok((pkt, Kind::LaterFragment { id: frag_id }));
        }
        let first_fragment = if frag & 0x2000 != 0 {
            Some(frag_id)
        } else {
            None
        };
        let l4 = l3 + ihl;
        let kind = match key.proto {
            PROTO_TCP | PROTO_UDP => Kind::Flow { l4, first_fragment },
            PROTO_ICMP => Kind::Icmp { l4 },
            _ => return Err(Error::NotVip),
        };
        Ok((pkt, kind))
    }

    /// IPv6 with its fixed header and at most a Fragment header after it.
    #[inline(always)]
    fn ipv6(ctx: &XdpContext, l2: L2, key: &mut FlowKey) -> Result<(Packet, Kind), Error> {
        let l3 = l2.l3;
        let h = header::<IPV6_LEN>(ctx, l3)?;
        if h[0] >> 4 != 6 {
            return Err(Error::Malformed);
        }
        let ip_len = IPV6_LEN + u16::from_be_bytes([h[4], h[5]]) as usize;
        if l3 + ip_len > ctx.data_end() - ctx.data() {
            return Err(Error::Malformed);
        }
        key.family = FAMILY_V6;
        key.proto = h[6];
        key.src.copy_from_slice(&h[8..24]);
        key.dst.copy_from_slice(&h[24..40]);
        let tos = (h[0] << 4) | (h[1] >> 4);
        let pkt = Packet {
            l2,
            family: FAMILY_V6,
            ihl: IPV6_LEN,
            ip_len,
            tos,
        };
        let mut l4 = l3 + IPV6_LEN;
        let mut first_fragment = None;
        if key.proto == PROTO_IPV6_FRAG {
            let f = header_within::<8>(ctx, l4, l3 + ip_len)?;
            let off_flags = u16::from_be_bytes([f[2], f[3]]);
            let frag_id = u32::from_ne_bytes([f[4], f[5], f[6], f[7]]);
            key.proto = f[0];
            if off_flags >> 3 != 0 {
                return Ok((pkt, Kind::LaterFragment { id: frag_id }));
            }
            if off_flags & 1 != 0 {
                first_fragment = Some(frag_id);
            }
            l4 += 8;
        }
        let kind = match key.proto {
            PROTO_TCP | PROTO_UDP => Kind::Flow { l4, first_fragment },
            PROTO_ICMPV6 => Kind::Icmp { l4 },
            _ => return Err(Error::NotVip),
        };
        Ok((pkt, kind))
    }

    #[inline(always)]
    fn frag_key(key: &FlowKey, id: u32) -> FragKey {
        FragKey {
            src: key.src,
            dst: key.dst,
            id,
            proto: key.proto,
            family: key.family,
            _pad: [0; 2],
        }
    }

    #[inline(always)]
    fn lookup_vip(key: &FlowKey) -> Option<VipMeta> {
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

    /// A TCP or UDP packet: pick (or recall) its backend.
    ///
    /// An established flow whose backend is up is served from `CT` alone: it needs neither the
    /// VIP entry (the backend entry carries the mode and VIP id) nor the table. The port filter
    /// in front keeps that lookup off traffic to ports no VIP uses. A bare SYN is never served
    /// from `CT`: it opens a new connection on a reused 4-tuple (`choose`).
    #[inline(always)]
    fn new_or_tracked(
        ctx: &XdpContext,
        key: &mut FlowKey,
        l4: usize,
        end: usize,
        first_fragment: Option<u32>,
    ) -> Result<Decision, Error> {
        let (tcp_flags, seq, port_bit) = if key.proto == PROTO_TCP {
            let th = header_within::<20>(ctx, l4, end)?;
            key.sport = u16::from_ne_bytes([th[0], th[1]]);
            key.dport = u16::from_ne_bytes([th[2], th[3]]);
            // The sequence number as read (network order): only compared, never computed with.
            (
                th[13],
                u32::from_ne_bytes([th[4], th[5], th[6], th[7]]),
                VIP_PORT_TCP,
            )
        } else {
            let uh = header_within::<8>(ctx, l4, end)?;
            key.sport = u16::from_ne_bytes([uh[0], uh[1]]);
            key.dport = u16::from_ne_bytes([uh[2], uh[3]]);
            (0, 0, VIP_PORT_UDP)
        };
        let ports = VIP_PORTS
            .get(u16::from_be(key.dport) as u32)
            .copied()
            .unwrap_or(0);
        if ports & port_bit == 0 {
            return Err(Error::NotVip);
        }
        let syn = tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
        let rst = tcp_flags & TCP_RST != 0;
        let closes = tcp_flags & (TCP_FIN | TCP_RST) != 0;
        let established_ptr = CT.get_ptr_mut(&*key);
        // SAFETY: LRU element, read in place (a copy would cost stack); the memory stays
        // valid while the program runs, a concurrent eviction yields stale fields at worst.
        let established = established_ptr.map(|v| unsafe { &*v });
        // An established connection never sends a bare SYN: a SYN that finds its 4-tuple in
        // `CT` opens a new connection on a reused tuple (clients cycle through their ephemeral
        // ports), so it is not served from `CT`.
        let served = if syn { None } else { established_ptr };
        let (id, backend, hash) = match served.and_then(|p| {
            // SAFETY: as `established`.
            let v = unsafe { &*p };
            let id = v.backend;
            live_backend(id).map(|b| (p, id, b, v.hash, v.flags))
        }) {
            Some((p, id, b, hash, flags)) => {
                if rst && flags & CT_F_RESTEERED == 0 {
                    if let Some(s) = backend_stats(id) {
                        s.client_rsts += 1;
                    }
                }
                touch(p, closes);
                (id, b, hash)
            }
            None => {
                let vip = lookup_vip(key).ok_or(Error::NotVip)?;
                if syn && established.is_some() {
                    // The old connection's entry goes; the new one starts in `CT_NEW` with a
                    // backend from the current table. Flood-safe: a hit needs a client's exact
                    // address and port, which spoofed SYNs from random sources and ports
                    // practically never have, so a SYN flood still only churns `CT_NEW`.
                    let _ = CT.remove(&*key);
                }
                let flow = FlowPacket {
                    syn,
                    seq,
                    rst,
                    closes,
                };
                let resteer = if syn { None } else { established };
                choose(key, &vip, flow, established.is_some(), resteer)?
            }
        };
        if let Some(frag_id) = first_fragment {
            let value = CtValue {
                backend: id,
                hash,
                syn_seq: 0,
                flags: 0,
                last_seen: 0,
                touched: 0,
            };
            if FRAGS.insert(&frag_key(key, frag_id), &value, 0).is_err() {
                count(Counter::FragInsertFailed);
            }
        }
        Ok(Decision {
            id,
            backend,
            hash,
            reply_too_big: true,
            counter: None,
        })
    }

    /// The low 32 bits of jiffies (`CtValue::touched`).
    #[inline(always)]
    fn jiffies32() -> u32 {
        // SAFETY: a helper without arguments (inlined into a load by the verifier).
        unsafe { bpf_jiffies64() as u32 }
    }

    /// Now, in connection-table ticks (`CT_TICK_SHIFT`).
    #[inline(always)]
    fn now_tick() -> u32 {
        // SAFETY: a helper without arguments.
        (unsafe { bpf_ktime_get_coarse_ns() } >> CT_TICK_SHIFT) as u32
    }

    /// A tracked flow's packet: its entry's last-seen time, written only when the tick changed
    /// (a busy flow does not dirty the entry's cache line on every packet), and the closing
    /// flag on the client's FIN or RST.
    #[inline(always)]
    fn touch(v: *mut CtValue, closes: bool) {
        let jiffies = jiffies32();
        // SAFETY: an LRU element found by the caller in this run of the program; its memory
        // stays valid until the program ends. Two CPUs writing the same fields write the same
        // values (a tick, a bit), so a race loses nothing that matters.
        unsafe {
            if (*v).touched != jiffies {
                (*v).touched = jiffies;
                let now = now_tick();
                if (*v).last_seen != now {
                    (*v).last_seen = now;
                }
            }
            if closes && (*v).flags & CT_F_CLOSING == 0 {
                (*v).flags |= CT_F_CLOSING;
            }
        }
    }

    /// What `choose` needs of a TCP or UDP packet: a bare SYN and its sequence number (0 for
    /// other packets), a RST, a FIN or RST (the client closes).
    #[derive(Clone, Copy)]
    struct FlowPacket {
        syn: bool,
        seq: u32,
        rst: bool,
        closes: bool,
    }

    /// The backend behind `id`, if it may carry traffic.
    #[inline(always)]
    fn live_backend(id: u32) -> Option<BackendInfo> {
        let b = *BACKENDS.get(id)?;
        if b.flags & BACKEND_F_ACTIVE != 0 && b.flags & BACKEND_F_DOWN == 0 {
            Some(b)
        } else {
            None
        }
    }

    /// The Maglev choice for a flow: (backend id, backend, flow hash).
    #[inline(always)]
    fn from_table(key: &FlowKey, vip: &VipMeta) -> Result<(u32, BackendInfo, u32), Error> {
        let hash = flow_hash(key);
        let slot = vip.ring_offset + maglev_index(hash, vip.ring_size);
        let id = RING.get(slot).copied().unwrap_or(0);
        match if id == 0 { None } else { live_backend(id) } {
            Some(b) => Ok((id, b, hash)),
            None => {
                if let Some(s) = vip_stats(vip.vip_id) {
                    s.no_backend += 1;
                }
                Err(Error::NoBackend)
            }
        }
    }

    /// Connection tracking in two stages: a flow's first packet is recorded in `CT_NEW`, and
    /// only a later non-SYN packet promotes it to `CT`, so a flood of first packets churns
    /// `CT_NEW` and never evicts established flows. A tracked flow keeps its backend whatever
    /// the table says (`new_or_tracked` serves `CT` hits), unless that backend is down; then it
    /// is steered again and flagged `CT_F_RESTEERED`.
    ///
    /// `in_ct`: `CT` has the flow, so `CT_NEW` is not consulted; `resteer_ct`: its `CT` value,
    /// when the flow stays in `CT` (not a SYN) but its backend is down. A SYN found in `CT` is a
    /// new connection on a reused tuple (the caller removed the entry): a new flow.
    ///
    /// Tuple reuse in `CT_NEW`: `seq` is the SYN's sequence number (0 for other packets). A SYN
    /// with the recorded `syn_seq` is a retry (`syn_retries`); with another one it is a new
    /// connection on a reused 4-tuple, chosen through the current table and recorded over the
    /// old entry like any new flow.
    ///
    /// LRU maps do not report evictions, so pressure is counted where it shows: a TCP packet
    /// past the SYN that neither table knows (`ct_lost`), and inserts that fail
    /// (`ct_insert_failed` for `CT`, `ct_new_insert_failed` for `CT_NEW`).
    #[inline(always)]
    fn choose(
        key: &FlowKey,
        vip: &VipMeta,
        p: FlowPacket,
        in_ct: bool,
        resteer_ct: Option<&CtValue>,
    ) -> Result<(u32, BackendInfo, u32), Error> {
        let FlowPacket {
            syn,
            seq,
            rst,
            closes,
        } = p;
        let seen_ptr = if in_ct { None } else { CT_NEW.get_ptr_mut(key) };
        // SAFETY: LRU element, read in place like `CT`'s in `new_or_tracked`.
        let seen = seen_ptr.map(|v| unsafe { &*v });
        // Neither table knows the flow, yet the packet is not the one that opens a TCP
        // connection: its state was lost (LRU eviction, replaced maps) or predates us.
        if !in_ct && seen.is_none() && key.proto == PROTO_TCP && !syn {
            count(Counter::CtLost);
        }
        // A SYN with another initial sequence number: a new connection, the entry is not its.
        let seen = seen.filter(|v| !syn || v.syn_seq == seq);
        if let (Some(v), Some(ptr)) = (seen, seen_ptr) {
            if let Some(b) = live_backend(v.backend) {
                // Before the promotion copies it.
                touch(ptr, closes);
                if let Some(s) = backend_stats(v.backend) {
                    s.syn_retries += syn as u64;
                    s.client_rsts += (rst && v.flags & CT_F_RESTEERED == 0) as u64;
                }
                // A retried SYN proves nothing about the client: only a later packet promotes.
                if !syn {
                    // Straight from the map value: no copy on the stack.
                    if CT.insert(key, v, 0).is_ok() {
                        count(Counter::CtPromoted);
                    } else {
                        count(Counter::CtInsertFailed);
                    }
                }
                return Ok((v.backend, b, v.hash));
            }
        }
        let (id, b, hash) = from_table(key, vip)?;
        let stats = backend_stats(id);
        if let Some(old) = resteer_ct.or(seen) {
            // The flow keeps its initial sequence number: a retry of its SYN is still one.
            let value = CtValue {
                backend: id,
                hash,
                syn_seq: old.syn_seq,
                flags: old.flags | CT_F_RESTEERED | if closes { CT_F_CLOSING } else { 0 },
                last_seen: now_tick(),
                touched: jiffies32(),
            };
            let (inserted, failed) = if resteer_ct.is_some() {
                (CT.insert(key, &value, 0), Counter::CtInsertFailed)
            } else {
                (CT_NEW.insert(key, &value, 0), Counter::CtNewInsertFailed)
            };
            if inserted.is_err() {
                count(failed);
            }
            count(Counter::CtResteered);
            if let Some(s) = stats {
                s.resteered += 1;
            }
        } else {
            let now = now_tick();
            let value = CtValue {
                backend: id,
                hash,
                syn_seq: if syn { seq } else { 0 },
                flags: if closes { CT_F_CLOSING } else { 0 },
                last_seen: now,
                touched: jiffies32(),
            };
            if CT_NEW.insert(key, &value, 0).is_ok() {
                count(Counter::CtNew);
            } else {
                count(Counter::CtNewInsertFailed);
            }
            if let Some(s) = stats {
                s.new_flows += 1;
            }
            if let Some(s) = vip_stats(vip.vip_id) {
                s.new_flows += 1;
            }
        }
        Ok((id, b, hash))
    }

    /// A later fragment: it has no ports, so it follows its first fragment's choice.
    /// `key` holds the addresses and protocol only.
    #[inline(always)]
    fn later_fragment(key: &FlowKey, frag_id: u32) -> Result<Decision, Error> {
        let v = FRAGS
            .get_ptr(&frag_key(key, frag_id))
            .ok_or(Error::FragUnknown)?;
        // SAFETY: LRU element, copied out at once.
        let v = unsafe { *v };
        let backend = live_backend(v.backend).ok_or(Error::FragUnknown)?;
        Ok(Decision {
            id: v.backend,
            backend,
            hash: v.hash,
            reply_too_big: true,
            counter: Some(Counter::FragForwarded),
        })
    }

    /// ICMP "fragmentation needed" (IPv4) or "packet too big" (IPv6) about a VIP flow goes to
    /// the backend serving that flow; other ICMP is the kernel's business. Replaces `key` with
    /// the quoted flow, seen from the client.
    #[inline(always)]
    fn icmp_error(
        ctx: &XdpContext,
        l4: usize,
        end: usize,
        key: &mut FlowKey,
    ) -> Result<Decision, Error> {
        let family = key.family;
        let ih = header_within::<8>(ctx, l4, end)?;
        let ours = if family == FAMILY_V4 {
            ih[0] == 3 && ih[1] == 4
        } else {
            ih[0] == 2
        };
        if !ours {
            return Err(Error::NotVip);
        }
        let vip = quoted_flow(ctx, l4 + 8, end, key)?;
        // SAFETY: LRU elements, copied out at once.
        let tracked = match CT.get_ptr(&*key) {
            Some(v) => Some(unsafe { *v }),
            None => CT_NEW.get_ptr(&*key).map(|v| unsafe { *v }),
        };
        let (id, backend, hash) =
            match tracked.and_then(|v| live_backend(v.backend).map(|b| (v.backend, b, v.hash))) {
                Some(t) => t,
                None => from_table(key, &vip)?,
            };
        Ok(Decision {
            id,
            backend,
            hash,
            reply_too_big: false,
            counter: Some(Counter::IcmpForwarded),
        })
    }

    /// Reads the quoted packet of an ICMP error: returns the flow it belongs to, seen from the
    /// client (the quoted packet went from the VIP to the client).
    #[inline(always)]
    fn quoted_flow(
        ctx: &XdpContext,
        q: usize,
        end: usize,
        key: &mut FlowKey,
    ) -> Result<VipMeta, Error> {
        *key = FlowKey {
            family: key.family,
            ..FlowKey::default()
        };
        let l4 = if key.family == FAMILY_V4 {
            let qh = header_within::<IPV4_LEN>(ctx, q, end)?;
            let qihl = ((qh[0] & 0x0f) as usize) * 4;
            if qh[0] >> 4 != 4 || qihl < IPV4_LEN {
                return Err(Error::Malformed);
            }
            key.proto = qh[9];
            key.src[..4].copy_from_slice(&qh[16..20]);
            key.dst[..4].copy_from_slice(&qh[12..16]);
            q + qihl
        } else {
            let qh = header_within::<IPV6_LEN>(ctx, q, end)?;
            if qh[0] >> 4 != 6 {
                return Err(Error::Malformed);
            }
            key.proto = qh[6];
            key.src.copy_from_slice(&qh[24..40]);
            key.dst.copy_from_slice(&qh[8..24]);
            q + IPV6_LEN
        };
        if key.proto != PROTO_TCP && key.proto != PROTO_UDP {
            return Err(Error::IcmpNotVip);
        }
        let ports = header_within::<4>(ctx, l4, end)?;
        key.sport = u16::from_ne_bytes([ports[2], ports[3]]);
        key.dport = u16::from_ne_bytes([ports[0], ports[1]]);
        lookup_vip(key).ok_or(Error::IcmpNotVip)
    }

    /// Next hop towards a backend: `bpf_fib_lookup`, cached per backend for `NEXTHOP_TTL_JIFFIES`
    /// so that an established flow does not pay for a route lookup on every packet.
    #[inline(always)]
    fn nexthop(ctx: &XdpContext, id: u32, b: &BackendInfo) -> Result<NextHop, Error> {
        // SAFETY: calling a helper without arguments.
        let now = unsafe { bpf_jiffies64() };
        let slot = NEXTHOPS.get_ptr_mut(id).ok_or(Error::Fib)?;
        // SAFETY: array slot; a concurrent refresh writes the same kind of value.
        let cached = unsafe { *slot };
        if cached.expires > now {
            // ifindex 0: a failed lookup, remembered briefly so a dead route costs no lookup
            // per packet.
            return if cached.ifindex != 0 {
                Ok(cached)
            } else {
                Err(Error::Fib)
            };
        }
        match fib_lookup(ctx.ctx, b, now) {
            Some(nh) => {
                // SAFETY: array slot owned by this backend id.
                unsafe { *slot = nh };
                Ok(nh)
            }
            None => {
                let failed = NextHop {
                    expires: now + NEXTHOP_RETRY_JIFFIES,
                    ..NextHop::default()
                };
                // SAFETY: array slot owned by this backend id.
                unsafe { *slot = failed };
                // Log the change from reachable (or never looked up) to unreachable only: a
                // rare event, never one line per packet.
                if cached.ifindex != 0 || cached.expires == 0 {
                    report_no_route(ctx.ctx, id);
                }
                Err(Error::Fib)
            }
        }
    }

    /// Tells the agent (through aya-log) that a backend became unreachable from here.
    #[inline(never)]
    fn report_no_route(ctx: *mut xdp_md, id: u32) {
        let ctx = XdpContext::new(ctx);
        warn!(
            &ctx,
            "backend id {}: no route or unresolved neighbour, its packets are dropped (drop_fib)",
            id
        );
    }

    /// `bpf_fib_lookup` towards a backend. A separate BPF function: it runs about once a second
    /// per backend, and its 64-byte parameter block stays off the hot path's stack.
    #[inline(never)]
    fn fib_lookup(ctx: *mut xdp_md, b: &BackendInfo, now: u64) -> Option<NextHop> {
        let ctx = XdpContext::new(ctx);
        // SAFETY: plain C struct, all-zero is its documented initial state.
        let mut p: FibParams = unsafe { core::mem::zeroed() };
        p.ifindex = ctx.ingress_ifindex() as u32;
        if b.family == FAMILY_V4 {
            p.family = AF_INET;
            p.__bindgen_anon_4.ipv4_dst =
                u32::from_ne_bytes([b.addr[0], b.addr[1], b.addr[2], b.addr[3]]);
        } else {
            p.family = AF_INET6;
            let mut dst = [0u32; 4];
            let mut i = 0;
            while i < 4 {
                dst[i] = u32::from_ne_bytes([
                    b.addr[4 * i],
                    b.addr[4 * i + 1],
                    b.addr[4 * i + 2],
                    b.addr[4 * i + 3],
                ]);
                i += 1;
            }
            p.__bindgen_anon_4.ipv6_dst = dst;
        }
        // SAFETY: `p` is a valid, fully initialised parameter block of the size passed.
        let rc = unsafe {
            bpf_fib_lookup(
                ctx.as_ptr(),
                &mut p,
                core::mem::size_of::<FibParams>() as i32,
                0,
            )
        };
        if rc != 0 {
            return None;
        }
        Some(NextHop {
            expires: now + NEXTHOP_TTL_JIFFIES,
            ifindex: p.ifindex,
            // SAFETY: after a successful lookup the union holds the MTU.
            mtu: unsafe { p.__bindgen_anon_1.mtu_result },
            _pad0: 0,
            smac: p.smac,
            dmac: p.dmac,
            _pad1: [0; 4],
        })
    }

    /// Out of the ingress interface (`XDP_TX`) or another one (`bpf_redirect`).
    #[inline(always)]
    fn transmit(same_link: bool, ifindex: u32) -> u32 {
        if same_link {
            xdp_action::XDP_TX
        } else {
            // SAFETY: helper call with plain integers.
            unsafe { bpf_redirect(ifindex, 0) as u32 }
        }
    }

    #[inline(always)]
    fn adjust_head(ctx: &XdpContext, delta: i32) -> Result<(), Error> {
        // SAFETY: the helper validates the delta against the buffer's headroom.
        if unsafe { bpf_xdp_adjust_head(ctx.ctx, delta) } != 0 {
            return Err(Error::Adjust);
        }
        Ok(())
    }

    #[inline(always)]
    fn adjust_tail(ctx: &XdpContext, delta: i32) -> Result<(), Error> {
        // SAFETY: the helper validates the delta against the buffer.
        if unsafe { bpf_xdp_adjust_tail(ctx.ctx, delta) } != 0 {
            return Err(Error::Adjust);
        }
        Ok(())
    }

    /// Sends the packet to backend `id`: MAC rewrite (`l2`) or IP-in-IP encapsulation (`ipip`).
    /// An encapsulated packet that would exceed the next hop's MTU is answered with ICMP
    /// instead, when `reply_too_big` (never for ICMP errors themselves).
    #[inline(always)]
    fn forward(ctx: &XdpContext, pkt: &Packet, key: &FlowKey, d: &Decision) -> Result<u32, Error> {
        let (id, b) = (d.id, &d.backend);
        let frame_len = (ctx.data_end() - ctx.data()) as u64;
        let nh = nexthop(ctx, id, b)?;
        // An 802.1Q tag belongs to the ingress link: kept when the frame goes back out of it,
        // dropped when it leaves by another interface (whose VLANs are not the ingress's).
        let same_link = nh.ifindex as usize == ctx.ingress_ifindex();
        let vlan = if same_link { pkt.l2.vlan_tci } else { None };
        if b.mode == MODE_L2 {
            if vlan.is_some() || pkt.l2.vlan_tci.is_none() {
                write(ctx, 0, nh.dmac)?;
                write(ctx, 6, nh.smac)?;
            } else {
                untag(ctx, &nh)?;
            }
        } else {
            encapsulate(ctx, pkt, key, d.hash, b, &nh, vlan, d.reply_too_big)?;
        }
        if let Some(s) = backend_stats(id) {
            s.packets += 1;
            s.bytes += frame_len;
        }
        if let Some(s) = vip_stats(b.vip_id) {
            s.packets += 1;
            s.bytes += frame_len;
        }
        Ok(transmit(same_link, nh.ifindex))
    }

    /// L2 forwarding of a tagged frame out of another interface: the addresses are written 4
    /// bytes further in, over the tag (the ethertype after the tag stays where it is), and the
    /// head moves past the 4 bytes left in front.
    #[inline(always)]
    fn untag(ctx: &XdpContext, nh: &NextHop) -> Result<(), Error> {
        write(ctx, VLAN_LEN, nh.dmac)?;
        write(ctx, VLAN_LEN + 6, nh.smac)?;
        adjust_head(ctx, VLAN_LEN as i32)
    }

    /// Prepends the outer IPv4 or IPv6 header (from the configured source to the backend),
    /// behind a new Ethernet header with `vlan`'s tag, if any: the head moves by the outer
    /// header's length plus the difference between the new and the old link header.
    // One argument over clippy's limit: a struct would cost stack on the hot path.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn encapsulate(
        ctx: &XdpContext,
        pkt: &Packet,
        key: &FlowKey,
        hash: u32,
        b: &BackendInfo,
        nh: &NextHop,
        vlan: Option<u16>,
        reply_too_big: bool,
    ) -> Result<(), Error> {
        let l2_len = if vlan.is_some() {
            ETH_LEN + VLAN_LEN
        } else {
            ETH_LEN
        };
        let cfg = CONFIG.get(0).ok_or(Error::NoEncapSource)?;
        if pkt.family == FAMILY_V4 {
            let outer_len = pkt.ip_len + IPV4_LEN;
            if outer_len > nh.mtu as usize {
                return Err(too_big(ctx, pkt, key, nh.mtu, reply_too_big));
            }
            if cfg.flags & CONFIG_F_HAVE_V4_SRC == 0 {
                return Err(Error::NoEncapSource);
            }
            adjust_head(ctx, pkt.l2.l3 as i32 - (l2_len + IPV4_LEN) as i32)?;
            let l3 = write_l2(ctx, &nh.dmac, &nh.smac, vlan, ETH_P_IP).map_err(adjusted)?;
            let h = bytes_mut::<IPV4_LEN>(ctx, l3).map_err(adjusted)?;
            h[0] = 0x45;
            h[1] = pkt.tos;
            h[2..4].copy_from_slice(&(outer_len as u16).to_be_bytes());
            h[4..6].copy_from_slice(&[0, 0]);
            h[6..8].copy_from_slice(&[0x40, 0]); // DF: we answer "too big" instead of fragmenting.
            h[8] = DEFAULT_TTL;
            h[9] = PROTO_IPIP;
            h[10..12].copy_from_slice(&[0, 0]);
            h[12..16].copy_from_slice(&cfg.encap_src_v4);
            h[16..20].copy_from_slice(&b.addr[..4]);
            let c = csum_fold(csum_add_bytes(0, h));
            h[10..12].copy_from_slice(&c.to_ne_bytes());
        } else {
            let outer_len = pkt.ip_len + IPV6_LEN;
            if outer_len > nh.mtu as usize {
                return Err(too_big(ctx, pkt, key, nh.mtu, reply_too_big));
            }
            if cfg.flags & CONFIG_F_HAVE_V6_SRC == 0 {
                return Err(Error::NoEncapSource);
            }
            adjust_head(ctx, pkt.l2.l3 as i32 - (l2_len + IPV6_LEN) as i32)?;
            let l3 = write_l2(ctx, &nh.dmac, &nh.smac, vlan, ETH_P_IPV6).map_err(adjusted)?;
            // The flow label carries the flow's hash, so ECMP on the way keeps a flow on one path.
            let vtcfl = (6u32 << 28) | ((pkt.tos as u32) << 20) | (hash & 0xf_ffff);
            let h = bytes_mut::<IPV6_LEN>(ctx, l3).map_err(adjusted)?;
            h[0..4].copy_from_slice(&vtcfl.to_be_bytes());
            h[4..6].copy_from_slice(&(pkt.ip_len as u16).to_be_bytes());
            h[6] = PROTO_IPV6;
            h[7] = DEFAULT_TTL;
            h[8..24].copy_from_slice(&cfg.encap_src_v6);
            h[24..40].copy_from_slice(&b.addr);
        }
        Ok(())
    }

    /// The packet is too big once encapsulated: turn it into the ICMP error for its sender and
    /// send that back out (`Error::TooBigReplied`), or say why it could not be.
    #[inline(always)]
    fn too_big(ctx: &XdpContext, pkt: &Packet, key: &FlowKey, mtu: u16, reply: bool) -> Error {
        if !reply {
            return Error::TooBig;
        }
        let sent = if pkt.family == FAMILY_V4 {
            icmp4_too_big(ctx.ctx, pkt, key, mtu.saturating_sub(IPV4_LEN as u16))
        } else {
            icmp6_too_big(ctx.ctx, pkt, key, mtu.saturating_sub(IPV6_LEN as u16))
        };
        match sent {
            Ok(()) => Error::TooBigReplied,
            Err(e) => e,
        }
    }

    /// Rewrites the packet in place into ICMP "fragmentation needed" (type 3 code 4) from the
    /// VIP to the client, quoting the IP header and 8 bytes of payload (RFC 792).
    /// A separate BPF function: a cold path whose stack frame the hot path does not carry.
    #[inline(never)]
    fn icmp4_too_big(ctx: *mut xdp_md, pkt: &Packet, key: &FlowKey, mtu: u16) -> Result<(), Error> {
        let ctx = &XdpContext::new(ctx);
        let quote = pkt.ihl + 8;
        if pkt.ip_len < quote {
            return Err(Error::TooBig);
        }
        const GROW: usize = IPV4_LEN + 8;
        adjust_head(ctx, -(GROW as i32))?;
        let len = ctx.data_end() - ctx.data();
        let want = pkt.l2.l3 + GROW + quote;
        adjust_tail(ctx, want as i32 - len as i32)?;
        let l3 =
            write_l2(ctx, &pkt.l2.src, &pkt.l2.dst, pkt.l2.vlan_tci, ETH_P_IP).map_err(adjusted)?;
        let h = bytes_mut::<IPV4_LEN>(ctx, l3).map_err(adjusted)?;
        *h = [0; IPV4_LEN];
        h[0] = 0x45;
        h[2..4].copy_from_slice(&((GROW + quote) as u16).to_be_bytes());
        h[8] = DEFAULT_TTL;
        h[9] = PROTO_ICMP;
        h[12..16].copy_from_slice(&key.dst[..4]);
        h[16..20].copy_from_slice(&key.src[..4]);
        let c = csum_fold(csum_add_bytes(0, h));
        h[10..12].copy_from_slice(&c.to_ne_bytes());
        let icmp = bytes_mut::<8>(ctx, l3 + IPV4_LEN).map_err(adjusted)?;
        *icmp = [3, 4, 0, 0, 0, 0, 0, 0];
        icmp[6..8].copy_from_slice(&mtu.to_be_bytes());
        let sum = csum_add_bytes(0, icmp);
        let sum = csum_packet::<68>(ctx, l3 + GROW, quote, sum).map_err(adjusted)?;
        let icmp = bytes_mut::<8>(ctx, l3 + IPV4_LEN).map_err(adjusted)?;
        icmp[2..4].copy_from_slice(&csum_fold(sum).to_ne_bytes());
        Ok(())
    }

    /// Rewrites the packet in place into ICMPv6 "packet too big" from the VIP to the client,
    /// quoting the start of the original packet. A separate BPF function, like `icmp4_too_big`.
    #[inline(never)]
    fn icmp6_too_big(ctx: *mut xdp_md, pkt: &Packet, key: &FlowKey, mtu: u16) -> Result<(), Error> {
        let ctx = &XdpContext::new(ctx);
        let quote = if pkt.ip_len < ICMP6_QUOTE_LEN {
            pkt.ip_len
        } else {
            ICMP6_QUOTE_LEN
        };
        const GROW: usize = IPV6_LEN + 8;
        adjust_head(ctx, -(GROW as i32))?;
        let len = ctx.data_end() - ctx.data();
        let want = pkt.l2.l3 + GROW + quote;
        adjust_tail(ctx, want as i32 - len as i32)?;
        let l3 = write_l2(ctx, &pkt.l2.src, &pkt.l2.dst, pkt.l2.vlan_tci, ETH_P_IPV6)
            .map_err(adjusted)?;
        let plen = (8 + quote) as u16;
        let h = bytes_mut::<IPV6_LEN>(ctx, l3).map_err(adjusted)?;
        h[0..4].copy_from_slice(&[0x60, 0, 0, 0]);
        h[4..6].copy_from_slice(&plen.to_be_bytes());
        h[6] = PROTO_ICMPV6;
        h[7] = DEFAULT_TTL;
        h[8..24].copy_from_slice(&key.dst);
        h[24..40].copy_from_slice(&key.src);
        let icmp = bytes_mut::<8>(ctx, l3 + IPV6_LEN).map_err(adjusted)?;
        *icmp = [2, 0, 0, 0, 0, 0, 0, 0];
        icmp[4..8].copy_from_slice(&(mtu as u32).to_be_bytes());
        let plen = plen.to_be_bytes();
        let pseudo = [0, 0, plen[0], plen[1], 0, 0, 0, PROTO_ICMPV6];
        let mut sum = csum_add_bytes(0, &key.dst);
        sum = csum_add_bytes(sum, &key.src);
        sum = csum_add_bytes(sum, &pseudo);
        sum = csum_add_bytes(sum, icmp);
        let sum = csum_packet::<ICMP6_QUOTE_LEN>(ctx, l3 + GROW, quote, sum).map_err(adjusted)?;
        let icmp = bytes_mut::<8>(ctx, l3 + IPV6_LEN).map_err(adjusted)?;
        icmp[2..4].copy_from_slice(&csum_fold(sum).to_ne_bytes());
        Ok(())
    }
}
