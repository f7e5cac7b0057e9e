//! Connection tracking: a flow's backend from `CT` (established) or `CT_NEW` (seen once), or
//! chosen through the VIP's Maglev table and recorded; later fragments follow their first.
//! Entries are read and updated in place (no copies on the stack).
use crate::maps::{
    backend_live, establish, established, forget_established, live_backend_ref, lookup_vip,
    mark_tracked, may_be_tracked, prefetch_tracked, BACKENDS, CT_NEW, FRAGS, RING, SYN_RECORD,
    SYN_SEEN,
};
use crate::parse::{frag_key, Ports};
use crate::stats::{self, count};
use crate::{Decision, Error};
use aya_ebpf::helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns};
use lb_common::*;

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// A TCP or UDP packet: pick (or recall) its backend.
///
/// An established flow whose backend is up is served from `CT` alone: it needs neither the
/// VIP entry (the backend entry carries the mode and VIP id) nor the table. The port filter
/// in front (`try_balance`) keeps that lookup off traffic to ports no VIP uses. A bare SYN is
/// never served from `CT`: it opens a new connection on a reused 4-tuple (`choose`). It probes
/// `CT` only if the tracked-flow filter says its tuple may be there (`may_be_tracked`): mostly
/// it is not.
#[inline(always)]
pub fn new_or_tracked(
    key: &mut FlowKey,
    ports: &Ports,
    first_fragment: Option<u32>,
) -> Result<Decision, Error> {
    let (tcp_flags, seq) = (ports.tcp_flags, ports.seq);
    let syn = tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    let rst = tcp_flags & TCP_RST != 0;
    let closes = tcp_flags & (TCP_FIN | TCP_RST) != 0;
    // A SYN's hash, computed once: for the filter, the table and the SYN cache.
    let syn_hash = if syn { Some(flow_hash(key)) } else { None };
    let established_ptr = match syn_hash {
        Some(h) if !may_be_tracked(h) => None,
        _ => established(key),
    };
    // SAFETY: LRU element, read in place (a copy would cost stack); the memory stays
    // valid while the program runs, a concurrent eviction yields stale fields at worst.
    let established = established_ptr.map(|v| unsafe { &*v });
    // An established connection never sends a bare SYN: a SYN that finds its 4-tuple in
    // `CT` opens a new connection on a reused tuple (clients cycle through their ephemeral
    // ports), so it is not served from `CT`. Nor is any packet that finds a closing entry
    // quiet for `CT_CLOSED_TICKS`: the connection it belonged to is over, the packet is a
    // later one's whose SYN another balancer saw. The clock is read only for closing entries.
    let reused = syn
        || established.is_some_and(|v| {
            v.flags & CT_F_CLOSING != 0 && ct_closed_long_ago(v.last_seen, now_tick())
        });
    let served = if reused { None } else { established_ptr };
    let (id, backend, hash) = match served.and_then(|p| {
        // SAFETY: as `established`.
        let v = unsafe { &*p };
        let id = v.backend;
        live_backend_ref(id).map(|b| (p, id, b, v.hash, v.flags))
    }) {
        Some((p, id, b, hash, flags)) => {
            if rst && flags & CT_F_RESTEERED == 0 {
                if let Some(s) = stats::backend(id) {
                    s.client_rsts(1);
                }
            }
            touch(p, closes);
            (id, b, hash)
        }
        None => {
            let vip = lookup_vip(key).ok_or(Error::NotVip)?;
            if reused && established.is_some() {
                // The old connection's entry goes; the new one starts as a new flow with a
                // backend from the current table. Flood-safe: a hit needs a client's exact
                // address and port, which spoofed SYNs from random sources and ports
                // practically never have, so a SYN flood never reaches `CT`.
                forget_established(key);
            }
            let flow = FlowPacket {
                syn,
                seq,
                rst,
                closes,
                // Every path of `choose` needs it: a SYN's was computed above.
                hash: syn_hash.unwrap_or_else(|| flow_hash(key)),
            };
            let tracked = match established {
                None => Tracked::No,
                Some(_) if reused => Tracked::Reused,
                Some(v) => Tracked::BackendGone(v),
            };
            let (id, hash) = choose(key, &vip, flow, tracked)?;
            // `choose` found the backend live: its entry, in place.
            (id, BACKENDS.get(id).ok_or(Error::NoBackend)?, hash)
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
pub fn jiffies32() -> u32 {
    // SAFETY: a helper without arguments (inlined into a load by the verifier).
    unsafe { bpf_jiffies64() as u32 }
}

/// Now, in connection-table ticks (`CT_TICK_SHIFT`).
#[inline(always)]
pub fn now_tick() -> u32 {
    // SAFETY: a helper without arguments.
    (unsafe { bpf_ktime_get_coarse_ns() } >> CT_TICK_SHIFT) as u32
}

/// A tracked flow's packet: its entry's last-seen time, written only when the tick changed
/// (a busy flow does not dirty the entry's cache line on every packet), and the closing
/// flag on the client's FIN or RST.
#[inline(always)]
pub fn touch(v: *mut CtValue, closes: bool) {
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

/// What the established table (`CT`) knew of a flow it does not serve.
#[derive(Clone, Copy)]
pub enum Tracked<'a> {
    /// Not in `CT`: `CT_NEW` may know it.
    No,
    /// In `CT`, but the packet is a bare SYN, or the entry is closing and long quiet: a new
    /// connection on a reused 4-tuple (the caller removed the entry). A new flow; `CT_NEW`
    /// (the old connection's entry, if any) is not consulted.
    Reused,
    /// In `CT` with this value, but its backend is down or retired: steered again through
    /// the table and kept in `CT`.
    BackendGone(&'a CtValue),
}

/// What `choose` needs of a TCP or UDP packet: a bare SYN and its sequence number (0 for
/// other packets), a RST, a FIN or RST (the client closes), and the flow hash (every path of
/// `choose` needs it: the table, the SYN cache, the filter's mark).
#[derive(Clone, Copy)]
pub struct FlowPacket {
    pub syn: bool,
    pub seq: u32,
    pub rst: bool,
    pub closes: bool,
    pub hash: u32,
}

/// The Maglev choice for a flow: (live backend id, flow hash).
#[inline(always)]
pub fn from_table(key: &FlowKey, vip: &VipMeta) -> Result<(u32, u32), Error> {
    from_table_hashed(flow_hash(key), vip)
}

/// The Maglev choice for a flow whose hash the caller has.
#[inline(always)]
pub fn from_table_hashed(hash: u32, vip: &VipMeta) -> Result<(u32, u32), Error> {
    let slot = vip.ring_offset + maglev_index(hash, vip.ring_size);
    let id = RING.get(slot).copied().unwrap_or(0);
    if id != 0 && backend_live(id) {
        Ok((id, hash))
    } else {
        if let Some(s) = stats::vip(vip.vip_id) {
            s.no_backend(1);
        }
        Err(Error::NoBackend)
    }
}

/// Connection tracking. While no table changes, a bare SYN makes no entry: the table gives
/// its backend, and the SYN cache (`SYN_SEEN`) remembers it (`syn_unrecorded`). The packet
/// that creates the entry is the first non-SYN one: if it is the handshake's ACK of a SYN in
/// the cache (its hash, the SYN's sequence number plus one) it goes straight into `CT`
/// (`handshake_ack`); otherwise it is recorded in `CT_NEW` and only a later non-SYN packet
/// promotes it to `CT`. Either way `CT` is only written for flows that sent two packets from
/// one 4-tuple, so a flood of first packets (SYNs, or ACKs without a SYN) never evicts
/// established flows. While lbd changes a VIP's table (its `SYN_RECORD` entry armed), its
/// SYNs are recorded in `CT_NEW` as first packets, so a handshake whose SYN and ACK straddle
/// the change keeps its backend. A tracked flow keeps its backend whatever the table says
/// (`new_or_tracked` serves `CT` hits), unless that backend is down; then it is steered again
/// and flagged `CT_F_RESTEERED`.
///
/// `tracked` says what `CT` knew of the flow (see [`Tracked`]); only an untracked flow is
/// looked up in `CT_NEW`.
///
/// Tuple reuse in `CT_NEW`: `seq` is the SYN's sequence number (0 for other packets). A SYN
/// with the recorded `syn_seq` is a retry (`syn_retries`); with another one it is a new
/// connection on a reused 4-tuple, chosen through the current table and recorded over the
/// old entry like any new flow.
///
/// LRU maps do not report evictions, so pressure is counted where it shows: a TCP packet
/// past the SYN that neither table nor the SYN cache knows (`ct_lost`), and inserts that
/// fail (`ct_insert_failed` for `CT`, `ct_new_insert_failed` for `CT_NEW`).
#[inline(always)]
pub fn choose(
    key: &FlowKey,
    vip: &VipMeta,
    p: FlowPacket,
    tracked: Tracked,
) -> Result<(u32, u32), Error> {
    let FlowPacket {
        syn,
        seq,
        rst,
        closes,
        hash,
    } = p;
    if syn {
        // The clock is read only once lbd has armed this VIP's recording at least once.
        let deadline = SYN_RECORD.get(vip.vip_id).copied().unwrap_or(0);
        if !(deadline != 0 && syn_recording(deadline, now_tick())) {
            return syn_unrecorded(vip, hash, seq);
        }
    } else if key.proto == PROTO_TCP && matches!(tracked, Tracked::No) {
        let found = handshake_ack(key, hash, seq, closes);
        if found != 0 {
            return Ok(unpacked(found));
        }
    }
    let seq = if syn { seq } else { 0 };
    let seen_ptr = match tracked {
        Tracked::No => CT_NEW.get_ptr_mut(key),
        Tracked::Reused | Tracked::BackendGone(_) => None,
    };
    // SAFETY: LRU element, read in place like `CT`'s in `new_or_tracked`.
    let seen = seen_ptr.map(|v| unsafe { &*v });
    // Neither table knows the flow, yet the packet is not the one that opens a TCP
    // connection: its state was lost (LRU eviction, replaced maps) or predates us.
    if seen_ptr.is_none() && matches!(tracked, Tracked::No) && key.proto == PROTO_TCP && !syn {
        count(Counter::CtLost);
    }
    // A SYN with another initial sequence number: a new connection, the entry is not its.
    let seen = seen.filter(|v| !syn || v.syn_seq == seq);
    if let (Some(v), Some(ptr)) = (seen, seen_ptr) {
        if backend_live(v.backend) {
            // Before the promotion copies it.
            touch(ptr, closes);
            // SAFETY: as `seen`; borrowed again, since `touch` wrote through the pointer.
            let v = unsafe { &*ptr };
            if let Some(s) = stats::backend(v.backend) {
                s.syn_retries(syn as u64);
                s.client_rsts((rst && v.flags & CT_F_RESTEERED == 0) as u64);
            }
            // A retried SYN proves nothing about the client: only a later packet promotes.
            if !syn {
                // The key's hash for the filter, not the entry's: an entry lbd wrote may carry
                // another.
                promote(key, v, hash);
            }
            return Ok((v.backend, v.hash));
        }
    }
    // A SYN `CT_NEW` does not know, while recording: if the SYN cache holds it, it is a retry
    // of a SYN sent on before recording was armed, and it keeps that SYN's backend.
    if syn && seen.is_none() {
        let found = syn_retry_recorded(key, hash, seq, closes);
        if found != 0 {
            return Ok(unpacked(found));
        }
    }
    let (id, hash) = from_table_hashed(hash, vip)?;
    let backend_stats = stats::backend(id);
    let resteer_ct = match tracked {
        Tracked::BackendGone(v) => Some(v),
        Tracked::No | Tracked::Reused => None,
    };
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
            (establish(key, &value), Counter::CtInsertFailed)
        } else {
            (
                CT_NEW.insert(key, &value, 0).is_ok(),
                Counter::CtNewInsertFailed,
            )
        };
        if !inserted {
            count(failed);
        } else if resteer_ct.is_some() {
            mark_tracked(hash);
        }
        count(Counter::CtResteered);
        if let Some(s) = backend_stats {
            s.resteered(1);
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
        new_flow(backend_stats, vip.vip_id);
    }
    Ok((id, hash))
}

/// A new flow in the backend's and the VIP's statistics.
#[inline(always)]
fn new_flow(backend_stats: Option<stats::Slot<BackendStats>>, vip_id: u32) {
    if let Some(s) = backend_stats {
        s.new_flows(1);
    }
    if let Some(s) = stats::vip(vip_id) {
        s.new_flows(1);
    }
}

/// Inserts `v`, a map value (nothing is built on the stack), as the flow's established entry
/// (`CT4` or `CT`) and marks `hash` in the tracked-flow filter: `ct_promoted`, or
/// `ct_insert_failed`.
#[inline(always)]
fn promote(key: &FlowKey, v: *const CtValue, hash: u32) {
    // SAFETY: the callers pass an element of a map this program uses, valid while it runs;
    // the update copies it.
    if establish(key, unsafe { &*v }) {
        mark_tracked(hash);
        count(Counter::CtPromoted);
    } else {
        count(Counter::CtInsertFailed);
    }
}

/// A backend id and a flow hash as one BPF function result (the id, never 0, in the high
/// half; 0 means none).
#[inline(always)]
fn packed(id: u32, hash: u32) -> u64 {
    ((id as u64) << 32) | hash as u64
}

/// `packed`'s (backend id, flow hash).
#[inline(always)]
fn unpacked(found: u64) -> (u32, u32) {
    ((found >> 32) as u32, found as u32)
}

/// Makes a cached SYN's slot the value of its flow's new entry: the slot already holds the
/// backend, hash and SYN sequence number; the flags and times are written here, and the caller
/// inserts the slot itself (a map value is a valid value argument of an update, so nothing is
/// built on the stack).
#[inline(always)]
fn stamp(slot: *mut CtValue, closes: bool) {
    // SAFETY: a SYN cache element found by the caller in this run of the program; valid
    // while it runs.
    unsafe {
        (*slot).flags = if closes { CT_F_CLOSING } else { 0 };
        (*slot).last_seen = now_tick();
        (*slot).touched = jiffies32();
    }
}

/// A bare SYN while no table changes: the table's backend, no connection-table entry. The SYN
/// cache slot of the flow's hash tells a retry (same hash, same sequence number:
/// `syn_retries`) from a new connection (`ct_new`, `new_flows`), which takes the slot.
#[inline(always)]
fn syn_unrecorded(vip: &VipMeta, hash: u32, seq: u32) -> Result<(u32, u32), Error> {
    let (id, hash) = from_table_hashed(hash, vip)?;
    let backend_stats = stats::backend(id);
    if let Some(slot) = SYN_SEEN.get_ptr_mut(hash & SYN_SEEN_MASK) {
        // SAFETY: an array element, valid while the program runs. Two CPUs writing one slot
        // at once may leave it mixed: a lost or bogus entry of a lossy cache, never a fault.
        unsafe {
            if (*slot).hash == hash && (*slot).syn_seq == seq {
                if let Some(s) = backend_stats {
                    s.syn_retries(1);
                }
                return Ok((id, hash));
            }
            (*slot).hash = hash;
            (*slot).syn_seq = seq;
            (*slot).backend = id;
        }
    }
    count(Counter::CtNew);
    new_flow(backend_stats, vip.vip_id);
    Ok((id, hash))
}

/// The first non-SYN packet of a TCP flow `CT` does not know: if the SYN cache holds its SYN
/// (the flow's hash, and this packet's sequence number is the SYN's plus one: the handshake's
/// ACK) and that backend is live, the flow goes straight into `CT` on the SYN's backend
/// (`ct_promoted`). Two packets from one 4-tuple with matching sequence numbers are what a
/// `CT_NEW` promotion proves too, so a flood of ACKs alone cannot reach `CT`.
///
/// Returns the backend id (high half) and the flow hash (low half), or 0. A BPF function of
/// its own with a scalar result, inserting the cache slot itself (no value on the stack):
/// inlined, or with a value built on its own stack, it took the frames past the verifier's
/// budget (see "Stack budget" in docs/datapath.md).
#[inline(never)]
fn handshake_ack(key: &FlowKey, hash: u32, seq: u32, closes: bool) -> u64 {
    let Some(s) = SYN_SEEN.get_ptr_mut(hash & SYN_SEEN_MASK) else {
        return 0;
    };
    prefetch_tracked(hash);
    // SAFETY: an array element, valid while the program runs.
    let (slot_hash, slot_seq, id) = unsafe { ((*s).hash, (*s).syn_seq, (*s).backend) };
    if slot_hash != hash || u32::from_be(slot_seq).wrapping_add(1) != u32::from_be(seq) {
        return 0;
    }
    if !backend_live(id) {
        return 0;
    }
    stamp(s, closes);
    promote(key, s, hash);
    packed(id, hash)
}

/// A SYN that `CT_NEW` does not know while recording is armed: if the SYN cache holds it (same
/// hash, same sequence number) and its backend is live, it is a retry of a SYN sent on before
/// recording began; it is recorded in `CT_NEW` on that backend (the slot is the value) and
/// counted as a retry. Returns the backend id (high half) and the flow hash (low half), or 0.
/// A BPF function of its own, like `handshake_ack`.
#[inline(never)]
fn syn_retry_recorded(key: &FlowKey, hash: u32, seq: u32, closes: bool) -> u64 {
    let Some(s) = SYN_SEEN.get_ptr_mut(hash & SYN_SEEN_MASK) else {
        return 0;
    };
    // SAFETY: an array element, valid while the program runs.
    let (slot_hash, slot_seq, id) = unsafe { ((*s).hash, (*s).syn_seq, (*s).backend) };
    if slot_hash != hash || slot_seq != seq || !backend_live(id) {
        return 0;
    }
    stamp(s, closes);
    // SAFETY: as above.
    if CT_NEW.insert(key, unsafe { &*s }, 0).is_err() {
        count(Counter::CtNewInsertFailed);
    }
    if let Some(st) = stats::backend(id) {
        st.syn_retries(1);
    }
    packed(id, hash)
}

/// A later fragment: it has no ports, so it follows its first fragment's choice.
/// `key` holds the addresses and protocol only.
#[inline(always)]
pub fn later_fragment(key: &FlowKey, frag_id: u32) -> Result<Decision, Error> {
    let v = FRAGS
        .get_ptr(&frag_key(key, frag_id))
        .ok_or(Error::FragUnknown)?;
    // SAFETY: LRU element, copied out at once.
    let v = unsafe { *v };
    let backend = live_backend_ref(v.backend).ok_or(Error::FragUnknown)?;
    Ok(Decision {
        id: v.backend,
        backend,
        hash: v.hash,
        reply_too_big: true,
        counter: Some(Counter::FragForwarded),
    })
}
