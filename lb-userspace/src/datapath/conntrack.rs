//! Reading the connection tables (`CT4` and `CT`, the established IPv4 and IPv6 flows, and
//! `CT_NEW`) in bulk, without stopping the datapath, and
//! what an entry says about its connection: new, established or closing; active or idle.
//!
//! With direct server return the balancer sees only the client's packets, so a connection is
//! *active* while its client sends (its last packet is within the protocol's idle window) and
//! has not sent a FIN or RST; *closing* once it has (`CT_F_CLOSING`); *idle* otherwise (the
//! client went quiet or away: LRU maps never expire an entry). A TCP flow still in `CT_NEW`
//! (a SYN and nothing after it) is idle after [`NEW_TCP_IDLE`]: a handshake that did not finish
//! by then never will, and a SYN flood must not look like active connections.
use super::ct_filter::{CtFilter, FilterFill};
use super::Balancer;
use lb_common::{CtValue, FlowKey, FlowKey4, CT_F_CLOSING, CT_TICK_SHIFT, PROTO_TCP};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::os::fd::{AsRawFd as _, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

/// How long a TCP flow seen only by its SYN counts as a connection being opened (SYN retries
/// come after 1, 3 and 7 s).
pub const NEW_TCP_IDLE: Duration = Duration::from_secs(10);

/// Entries per `BPF_MAP_LOOKUP_BATCH` call: one call copies a few hundred kB and stays short.
const LOOKUP_CHUNK: usize = 8192;

/// Which connection table an entry is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CtTable {
    /// `CT4` (IPv4) or `CT` (IPv6): flows seen past their first packet.
    Established,
    /// `CT_NEW`: flows seen once (or only by SYNs).
    New,
}

/// A connection's state as its entry says: `new` (in `CT_NEW`), `established` (in `CT`),
/// `closing` (the client sent a FIN or RST).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnState {
    New,
    Established,
    Closing,
}

impl ConnState {
    pub fn name(self) -> &'static str {
        match self {
            ConnState::New => "new",
            ConnState::Established => "established",
            ConnState::Closing => "closing",
        }
    }
}

/// The idle windows: a flow whose last packet is older is idle, not active.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IdleWindows {
    pub tcp: Duration,
    pub udp: Duration,
}

/// What one entry says, at `now`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ConnView {
    pub state: ConnState,
    /// Not closing, and seen within its idle window.
    pub active: bool,
    /// Since the last packet.
    pub idle_for: Duration,
}

/// Now on the datapath's clock (`bpf_ktime_get_coarse_ns`, i.e. `CLOCK_MONOTONIC_COARSE`), in
/// connection-table ticks.
pub fn now_tick() -> u32 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to write; the clock id is a constant the kernel knows.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    let ns = ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64;
    (ns >> CT_TICK_SHIFT) as u32
}

/// Ticks between `then` and `now` (wrapping: the tick counter wraps after about 52 days).
pub fn ticks_between(then: u32, now: u32) -> Duration {
    let ticks = now.wrapping_sub(then);
    // A tick a little after `now` (the kernel's clock read later than ours): no time at all.
    if ticks > u32::MAX / 2 {
        return Duration::ZERO;
    }
    Duration::from_nanos((ticks as u64) << CT_TICK_SHIFT)
}

/// What an entry of `table` says at tick `now`.
pub fn classify(
    table: CtTable,
    key: &FlowKey,
    v: &CtValue,
    now: u32,
    idle: &IdleWindows,
) -> ConnView {
    let idle_for = ticks_between(v.last_seen, now);
    let tcp = key.proto == PROTO_TCP;
    let state = if v.flags & CT_F_CLOSING != 0 {
        ConnState::Closing
    } else if table == CtTable::New {
        ConnState::New
    } else {
        ConnState::Established
    };
    let window = match (tcp, state) {
        (true, ConnState::New) => NEW_TCP_IDLE.min(idle.tcp),
        (true, _) => idle.tcp,
        (false, _) => idle.udp,
    };
    ConnView {
        state,
        active: state != ConnState::Closing && idle_for <= window,
        idle_for,
    }
}

/// The tables' fds and capacities, usable without the agent's lock (a scan of a million
/// entries takes a while; changes need not wait for it).
#[derive(Clone)]
pub struct ConntrackReader {
    ct: Arc<OwnedFd>,
    ct4: Arc<OwnedFd>,
    ct_new: Arc<OwnedFd>,
    /// Rebuilt with every scan of `CT4` and `CT`.
    filter: Arc<CtFilter>,
    /// Capacities of `CT` (and of `CT4`, the same) and `CT_NEW` (their `max_entries`).
    pub capacity: (u32, u32),
}

/// Entries found by one scan, per table.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ScanTotals {
    /// Established flows: `CT4`'s and `CT`'s entries.
    pub ct: u64,
    /// Of which in `CT4` (IPv4).
    pub ct4: u64,
    pub ct_new: u64,
    /// The tracked-flow filter as this scan rebuilt it (`None`: another scan was rebuilding).
    pub filter: Option<FilterFill>,
}

impl Balancer {
    /// A reader of the connection tables that does not borrow the balancer.
    pub fn conntrack_reader(&self) -> ConntrackReader {
        self.maps.conntrack.clone()
    }
}

impl ConntrackReader {
    pub(super) fn new(
        ct: OwnedFd,
        ct4: OwnedFd,
        ct_new: OwnedFd,
        filter: CtFilter,
        capacity: (u32, u32),
    ) -> Self {
        ConntrackReader {
            ct: Arc::new(ct),
            ct4: Arc::new(ct4),
            ct_new: Arc::new(ct_new),
            filter: Arc::new(filter),
            capacity,
        }
    }

    /// The tracked-flow filter in front of a SYN's `CT` probe.
    pub fn filter(&self) -> &CtFilter {
        &self.filter
    }

    /// Rebuilds the tracked-flow filter from a scan of `CT4` and `CT` alone (what every
    /// [`try_connections`](Self::try_connections) does on the way); `None` if another scan
    /// was rebuilding it.
    pub fn rebuild_filter(&self) -> anyhow::Result<Option<FilterFill>> {
        let Some(rebuild) = self.filter.begin_rebuild() else {
            return Ok(None);
        };
        let scanned = self.established(|k, _| rebuild.mark(k))?;
        Ok(Some(rebuild.finish(scanned.0 + scanned.1)))
    }

    /// Calls `f` for every entry of `CT4` (as a `FlowKey`) and of `CT`: (`CT4`'s, `CT`'s).
    fn established(&self, mut f: impl FnMut(&FlowKey, &CtValue)) -> anyhow::Result<(u64, u64)> {
        let v4 = lookup_all(&self.ct4, |k: &FlowKey4, v| f(&k.flow_key(), v))
            .map_err(|e| anyhow::anyhow!("reading CT4 (BPF_MAP_LOOKUP_BATCH): {e}"))?;
        let v6 = lookup_all(&self.ct, |k: &FlowKey, v| f(k, v))
            .map_err(|e| anyhow::anyhow!("reading CT (BPF_MAP_LOOKUP_BATCH): {e}"))?;
        Ok((v4, v6))
    }

    /// Calls `f` for every tracked connection with what its entry says now: each entry of
    /// `CT4` and `CT`, and each of `CT_NEW` that they do not have (a promotion copies the entry
    /// and leaves the first one behind). Read with `BPF_MAP_LOOKUP_BATCH` while the datapath
    /// runs: a flow inserted or evicted meanwhile may be missed or seen, none twice. Blocking:
    /// a million entries take tens of milliseconds (`cargo xtask bench conntrack`). The scan
    /// of `CT` rebuilds the tracked-flow filter on the way.
    pub fn try_connections(
        &self,
        idle: &IdleWindows,
        mut f: impl FnMut(&FlowKey, &CtValue, ConnView),
    ) -> anyhow::Result<ScanTotals> {
        let now = now_tick();
        let rebuild = self.filter.begin_rebuild();
        // `CT_NEW` first (the smaller table is the one kept in memory): a flow promoted
        // between the two reads is then found in both, and counted once.
        let mut fresh: HashMap<FlowKey, CtValue> = HashMap::new();
        let ct_new = lookup_all(&self.ct_new, |k: &FlowKey, v| {
            fresh.insert(*k, *v);
        })
        .map_err(|e| anyhow::anyhow!("reading CT_NEW (BPF_MAP_LOOKUP_BATCH): {e}"))?;
        let (ct4, ct6) = self.established(|k, v| {
            if let Some(r) = &rebuild {
                r.mark(k);
            }
            fresh.remove(k);
            f(k, v, classify(CtTable::Established, k, v, now, idle));
        })?;
        let filter = rebuild.map(|r| r.finish(ct4 + ct6));
        for (k, v) in &fresh {
            f(k, v, classify(CtTable::New, k, v, now, idle));
        }
        Ok(ScanTotals {
            ct: ct4 + ct6,
            ct4,
            ct_new,
            filter,
        })
    }
}

impl ConntrackReader {
    /// Writes entries into the established tables (`CT4` for IPv4, `CT` for IPv6) or
    /// `CT_NEW` with `BPF_MAP_UPDATE_BATCH` (what `cargo xtask bench conntrack` fills the
    /// tables with; lbd itself never writes them this way).
    pub fn try_insert(&self, table: CtTable, entries: &[(FlowKey, CtValue)]) -> anyhow::Result<()> {
        if table == CtTable::Established {
            let v4: Vec<(FlowKey4, CtValue)> = entries
                .iter()
                .filter_map(|(k, v)| Some((k.v4()?, *v)))
                .collect();
            let v6: Vec<(FlowKey, CtValue)> = entries
                .iter()
                .filter(|(k, _)| k.v4().is_none())
                .copied()
                .collect();
            update_all(&self.ct4, &v4)?;
            update_all(&self.ct, &v6)?;
            for (k, _) in entries {
                self.filter.mark(k);
            }
            return Ok(());
        }
        update_all(&self.ct_new, entries)
    }

    /// The IPv4 flows a build before `CT4` left in `CT` (lbd moves them into `CT4`).
    pub(super) fn v4_in_ct(&self) -> anyhow::Result<Vec<(FlowKey, CtValue)>> {
        let mut found = Vec::new();
        lookup_all(&self.ct, |k: &FlowKey, v| {
            if k.v4().is_some() {
                found.push((*k, *v));
            }
        })
        .map_err(|e| anyhow::anyhow!("reading CT (BPF_MAP_LOOKUP_BATCH): {e}"))?;
        Ok(found)
    }
}

/// Writes `entries` into the hash map `fd` of `K -> CtValue` with `BPF_MAP_UPDATE_BATCH`.
fn update_all<K: Copy>(fd: &OwnedFd, entries: &[(K, CtValue)]) -> anyhow::Result<()> {
    let keys: Vec<K> = entries.iter().map(|e| e.0).collect();
    let values: Vec<CtValue> = entries.iter().map(|e| e.1).collect();
    super::bpf_maps::update_batch(fd, &keys, &values)
        .map_err(|e| anyhow::anyhow!("writing the connection table (BPF_MAP_UPDATE_BATCH): {e}"))
}

/// Every entry of a `K -> CtValue` hash map (`K`: `FlowKey` or `FlowKey4`), in batches.
fn lookup_all<K: Copy + Default>(
    fd: &OwnedFd,
    mut f: impl FnMut(&K, &CtValue),
) -> std::io::Result<u64> {
    const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
    let mut keys = vec![K::default(); LOOKUP_CHUNK];
    let mut values = vec![CtValue::default(); LOOKUP_CHUNK];
    // The hash map's batch token is a bucket index (u32).
    let mut token_in: u32 = 0;
    let mut token_out: u32 = 0;
    let mut first = true;
    let mut total = 0u64;
    loop {
        let mut attr = super::bpf_maps::BatchAttr {
            in_batch: if first {
                0
            } else {
                &token_in as *const u32 as u64
            },
            out_batch: &mut token_out as *mut u32 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: LOOKUP_CHUNK as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..Default::default()
        };
        // SAFETY: `attr` is a valid `bpf_attr.batch`; `keys` and `values` hold `count` elements
        // of the map's key and value types (`FlowKey`, `CtValue`: the sizes the pins check);
        // the tokens are u32 as the hash map's batch ops expect; the kernel writes at most
        // `count` entries and the tokens.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &mut attr as *mut super::bpf_maps::BatchAttr,
                std::mem::size_of::<super::bpf_maps::BatchAttr>() as u32,
            )
        };
        let err = (rc < 0).then(std::io::Error::last_os_error);
        let n = (attr.count as usize).min(LOOKUP_CHUNK);
        for (k, v) in keys[..n].iter().zip(&values[..n]) {
            f(k, v);
        }
        total += n as u64;
        match err {
            None => {}
            // The end of the map (with the last entries, if any, in this call).
            Some(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(total),
            Some(e) => return Err(e),
        }
        token_in = token_out;
        first = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(proto: u8) -> FlowKey {
        FlowKey {
            proto,
            ..Default::default()
        }
    }

    #[test]
    fn states_and_idleness() {
        let idle = IdleWindows {
            tcp: Duration::from_secs(300),
            udp: Duration::from_secs(30),
        };
        let secs = |s: u64| ((s * 1_000_000_000) >> CT_TICK_SHIFT) as u32;
        let now = 1_000_000;
        let v = |flags, ago| CtValue {
            flags,
            last_seen: now - secs(ago),
            ..Default::default()
        };
        let tcp = key(PROTO_TCP);
        let udp = key(17);
        let c = classify(CtTable::Established, &tcp, &v(0, 100), now, &idle);
        assert_eq!((c.state, c.active), (ConnState::Established, true));
        let c = classify(CtTable::Established, &tcp, &v(0, 400), now, &idle);
        assert_eq!((c.state, c.active), (ConnState::Established, false));
        let c = classify(CtTable::Established, &tcp, &v(CT_F_CLOSING, 0), now, &idle);
        assert_eq!((c.state, c.active), (ConnState::Closing, false));
        let c = classify(CtTable::New, &tcp, &v(0, 20), now, &idle);
        assert_eq!(
            (c.state, c.active),
            (ConnState::New, false),
            "a SYN 20 s ago"
        );
        let c = classify(CtTable::New, &udp, &v(0, 20), now, &idle);
        assert_eq!((c.state, c.active), (ConnState::New, true));
        let c = classify(CtTable::Established, &udp, &v(0, 40), now, &idle);
        assert!(!c.active);
        // The kernel's clock read a tick after ours: no negative time.
        let c = classify(CtTable::Established, &udp, &v(0, 0), now - 1, &idle);
        assert_eq!(c.idle_for, Duration::ZERO);
    }

    #[test]
    fn ticks_wrap() {
        assert_eq!(
            ticks_between(u32::MAX, 1),
            Duration::from_nanos(2 << CT_TICK_SHIFT)
        );
    }
}
