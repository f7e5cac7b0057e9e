//! Connection tracking: a flow's backend from `CT` (established) or `CT_NEW` (seen once), or
//! chosen through the VIP's Maglev table and recorded; later fragments follow their first.
//! Entries are read and updated in place (no copies on the stack).
use crate::maps::{live_backend, live_backend_ref, lookup_vip, BACKENDS, CT, CT_NEW, FRAGS, RING};
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
/// in front (`try_balance`) keeps that lookup off traffic to ports no VIP uses. A bare SYN is never served
/// from `CT`: it opens a new connection on a reused 4-tuple (`choose`).
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
    let established_ptr = CT.get_ptr_mut(&*key);
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
            let tracked = match established {
                None => Tracked::No,
                Some(_) if reused => Tracked::Reused,
                Some(v) => Tracked::BackendGone(v),
            };
            let (id, _, hash) = choose(key, &vip, flow, tracked)?;
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
/// other packets), a RST, a FIN or RST (the client closes).
#[derive(Clone, Copy)]
pub struct FlowPacket {
    pub syn: bool,
    pub seq: u32,
    pub rst: bool,
    pub closes: bool,
}

/// The Maglev choice for a flow: (backend id, backend, flow hash).
#[inline(always)]
pub fn from_table(key: &FlowKey, vip: &VipMeta) -> Result<(u32, BackendInfo, u32), Error> {
    let hash = flow_hash(key);
    let slot = vip.ring_offset + maglev_index(hash, vip.ring_size);
    let id = RING.get(slot).copied().unwrap_or(0);
    match if id == 0 { None } else { live_backend(id) } {
        Some(b) => Ok((id, b, hash)),
        None => {
            if let Some(s) = stats::vip(vip.vip_id) {
                s.no_backend(1);
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
/// `tracked` says what `CT` knew of the flow (see [`Tracked`]); only an untracked flow is
/// looked up in `CT_NEW`.
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
pub fn choose(
    key: &FlowKey,
    vip: &VipMeta,
    p: FlowPacket,
    tracked: Tracked,
) -> Result<(u32, BackendInfo, u32), Error> {
    let FlowPacket {
        syn,
        seq,
        rst,
        closes,
    } = p;
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
        if let Some(b) = live_backend(v.backend) {
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
            (CT.insert(key, &value, 0), Counter::CtInsertFailed)
        } else {
            (CT_NEW.insert(key, &value, 0), Counter::CtNewInsertFailed)
        };
        if inserted.is_err() {
            count(failed);
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
        if let Some(s) = backend_stats {
            s.new_flows(1);
        }
        if let Some(s) = stats::vip(vip.vip_id) {
            s.new_flows(1);
        }
    }
    Ok((id, b, hash))
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
