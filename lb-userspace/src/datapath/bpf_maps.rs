//! The maps as the agent holds them, the batched ring write, and the reads and single-entry
//! writes the agent makes outside `apply` (stats, conntrack, DOWN flags).
use super::pins::entries;
use super::VipState;
use super::{vip_key, Balancer, LoadOptions, VipId};
use anyhow::{anyhow, bail, Context as _, Result};
use aya::{
    maps::{Array, HashMap as BpfHashMap, Map, MapData, PerCpuArray},
    Ebpf,
};
use lb_common::{
    maps::{self, Kind, MapSpec},
    AgentState, BackendInfo, BackendStats, Counter, CtValue, FlowKey, FlowKey4, GlobalConfig,
    NextHop, VipKey, VipMeta, VipStats, VipTotals, BACKEND_F_ACTIVE, BACKEND_F_DOWN,
};
use std::{mem::size_of, net::IpAddr};

pub(super) struct Maps {
    pub(super) vips: BpfHashMap<MapData, VipKey, VipMeta>,
    pub(super) ring: Array<MapData, u32>,
    /// RING's fd again, for the batch writes aya does not wrap.
    pub(super) ring_fd: std::os::fd::OwnedFd,
    pub(super) vip_ports: Array<MapData, u8>,
    pub(super) backends: Array<MapData, BackendInfo>,
    pub(super) nexthops: Array<MapData, NextHop>,
    pub(super) config: Array<MapData, GlobalConfig>,
    pub(super) counters: PerCpuArray<MapData, u64>,
    pub(super) vip_stats: PerCpuArray<MapData, VipStats>,
    pub(super) backend_stats: PerCpuArray<MapData, BackendStats>,
    pub(super) ct: BpfHashMap<MapData, FlowKey, CtValue>,
    pub(super) ct4: BpfHashMap<MapData, FlowKey4, CtValue>,
    pub(super) ct_new: BpfHashMap<MapData, FlowKey, CtValue>,
    pub(super) agent_state: Array<MapData, AgentState>,
    /// The retired backends' share of each VIP's packets and bytes.
    pub(super) vip_retired: Array<MapData, VipTotals>,
    /// Until when the datapath records each VIP's SYNs (`SYN_RECORD`, a tick per VIP id).
    pub(super) syn_record: Array<MapData, u32>,
    /// CT's and CT_NEW's fds again, for the batch reads aya does not wrap.
    pub(super) conntrack: super::conntrack::ConntrackReader,
}

/// Writes `slots` into RING from index `offset`. One `BPF_MAP_UPDATE_BATCH` call instead of a
/// syscall per slot: a 65537-slot table took about 65537 syscalls, the largest part of a
/// learning step's cost. Kernels without batch support for arrays (before 5.6) get the
/// per-slot loop.
pub(super) fn write_ring(maps: &mut Maps, offset: u32, slots: &[u32]) -> Result<()> {
    let keys: Vec<u32> = (offset..offset + slots.len() as u32).collect();
    match update_batch(&maps.ring_fd, &keys, slots) {
        Ok(()) => Ok(()),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOTSUP | 524)) => {
            // 524 is the kernel's ENOTSUPP.
            for (&k, slot) in keys.iter().zip(slots) {
                maps.ring.set(k, *slot, 0).context("writing RING")?;
            }
            Ok(())
        }
        Err(e) => Err(anyhow!(e).context("writing RING (BPF_MAP_UPDATE_BATCH)")),
    }
}

/// The `batch` member of `union bpf_attr` (include/uapi/linux/bpf.h).
#[repr(C)]
#[derive(Default)]
pub(super) struct BatchAttr {
    pub(super) in_batch: u64,
    pub(super) out_batch: u64,
    pub(super) keys: u64,
    pub(super) values: u64,
    pub(super) count: u32,
    pub(super) map_fd: u32,
    pub(super) elem_flags: u64,
    pub(super) flags: u64,
}

/// Slots per `BPF_MAP_UPDATE_BATCH` call: big enough that syscalls cost little (a 65537-slot
/// table is 8 calls), small enough that one call is short and a signal (SIGTERM, or SIGKILL in
/// the chaos tests) is never held off by one write of a million slots.
pub(super) const BATCH_SLOTS: usize = 8192;

/// `BPF_MAP_UPDATE_BATCH` (`bpf(2)`) of `keys` and `values`, of the map's key and value
/// types, in calls of at most [`BATCH_SLOTS`]; all, or an error.
pub(super) fn update_batch<K: Copy, V: Copy>(
    fd: &std::os::fd::OwnedFd,
    keys: &[K],
    values: &[V],
) -> std::io::Result<()> {
    use std::os::fd::AsRawFd as _;
    const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
    debug_assert_eq!(keys.len(), values.len());
    let mut done = 0usize;
    while done < keys.len() {
        let mut attr = BatchAttr {
            keys: keys[done..].as_ptr() as u64,
            values: values[done..].as_ptr() as u64,
            count: (keys.len() - done).min(BATCH_SLOTS) as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..Default::default()
        };
        // SAFETY: `attr` is a valid `bpf_attr.batch` for its whole size; `keys` and `values`
        // outlive the call and hold `count` elements of the map's key and value types (the
        // caller's contract); the kernel writes only `attr.count` back.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_UPDATE_BATCH,
                &mut attr as *mut BatchAttr,
                size_of::<BatchAttr>() as u32,
            )
        };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // The kernel reports how many it wrote; go on after them (it may stop early).
        if attr.count == 0 {
            return Err(std::io::Error::other("BPF_MAP_UPDATE_BATCH wrote nothing"));
        }
        done += attr.count as usize;
    }
    Ok(())
}

pub(super) fn take(ebpf: &mut Ebpf, name: &str) -> Result<Map> {
    ebpf.take_map(name)
        .ok_or_else(|| anyhow!("the balancer object has no map {name}"))
}

/// A map as the kernel created it (or as it was pinned): what [`check_map`] compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct MapShape {
    pub(super) kind: Kind,
    pub(super) key_size: u32,
    pub(super) value_size: u32,
    pub(super) max_entries: u32,
    pub(super) flags: u32,
}

impl MapShape {
    /// What the registry says a map must be, with the capacity this lbd gives it.
    pub(super) fn of(spec: &MapSpec, max_entries: u32) -> Self {
        MapShape {
            kind: spec.kind,
            key_size: spec.key_size,
            value_size: spec.value_size,
            max_entries,
            flags: spec.flags,
        }
    }
}

impl std::fmt::Display for MapShape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} map, key/value size {}/{}, {} entries, flags {:#x}",
            self.kind.describe(),
            self.key_size,
            self.value_size,
            self.max_entries,
            self.flags
        )
    }
}

/// One loaded map against its registry entry; the error names the map.
pub(super) fn check_map(spec: &MapSpec, max_entries: u32, found: MapShape) -> Result<()> {
    let want = MapShape::of(spec, max_entries);
    if found != want {
        bail!(
            "the balancer object's map {} is a {found}, but lb_common::maps (the registry lbd \
             was built with) says {want}: the XDP program and lbd were built from different \
             sources; rebuild lbd (`cargo build -p lb-userspace`)",
            spec.name
        );
    }
    Ok(())
}

/// Every map of the registry, as the loaded object has it (pins reused included): a map the
/// object lacks or has in another shape is an error naming it, before any map is used.
pub(super) fn check_object_maps(ebpf: &Ebpf, o: &LoadOptions) -> Result<()> {
    for spec in maps::BALANCER {
        let name = spec.name;
        let map = ebpf.map(name).ok_or_else(|| {
            anyhow!("the balancer object has no map {name}, which lb_common::maps lists")
        })?;
        let (kind, data) = match map {
            Map::HashMap(d) => (Kind::Hash, d),
            Map::LruHashMap(d) => (Kind::LruHash, d),
            Map::Array(d) => (Kind::Array, d),
            Map::PerCpuArray(d) => (Kind::PerCpuArray, d),
            other => bail!(
                "the balancer object's map {name} is a {other:?}, but lb_common::maps says {}",
                MapShape::of(spec, entries(spec, o))
            ),
        };
        let info = data
            .info()
            .with_context(|| format!("reading the kernel's description of map {name}"))?;
        let found = MapShape {
            kind,
            key_size: info.key_size(),
            value_size: info.value_size(),
            max_entries: info.max_entries(),
            flags: info.map_flags(),
        };
        check_map(spec, entries(spec, o), found)?;
    }
    Ok(())
}

impl Balancer {
    /// The VIPs as applied.
    pub fn vips(&self) -> impl Iterator<Item = &VipState> {
        self.vips.values()
    }

    /// Global counters, summed over CPUs.
    pub fn counters(&self) -> Result<Vec<(Counter, u64)>> {
        Counter::ALL
            .iter()
            .map(|c| Ok((*c, self.maps.counters.get(&(*c as u32), 0)?.iter().sum())))
            .collect()
    }

    /// A VIP's statistics: `new_flows` and `no_backend` as the datapath counts them; packets
    /// and bytes its backends' (the datapath counts a packet once, on its backend) plus those
    /// of the backends it retired (`VIP_RETIRED`).
    pub fn vip_stats(&self, vip_id: u32) -> Result<VipStats> {
        let current = match self.vips.values().find(|v| v.vip_id == vip_id) {
            Some(v) => self.backends_stats(v)?,
            None => Vec::new(),
        };
        self.vip_stats_with(vip_id, &current)
    }

    /// [`vip_stats`](Self::vip_stats) from its current backends' statistics, read by the
    /// caller ([`backends_stats`](Self::backends_stats)), which needs them too.
    pub fn vip_stats_with(&self, vip_id: u32, current: &[BackendStats]) -> Result<VipStats> {
        let mut s = VipStats::default();
        for v in self.maps.vip_stats.get(&vip_id, 0)?.iter() {
            s.new_flows += v.new_flows;
            s.no_backend += v.no_backend;
        }
        let retired = self.maps.vip_retired.get(&vip_id, 0)?;
        let current = forwarded(current);
        s.packets = retired.packets + current.packets;
        s.bytes = retired.bytes + current.bytes;
        Ok(s)
    }

    /// The statistics of each of a VIP's current backends, in its order.
    pub fn backends_stats(&self, v: &VipState) -> Result<Vec<BackendStats>> {
        v.backends
            .iter()
            .map(|b| self.backend_stats(b.id))
            .collect()
    }

    pub fn backend_stats(&self, id: u32) -> Result<BackendStats> {
        let mut s = BackendStats::default();
        for v in self.maps.backend_stats.get(&id, 0)?.iter() {
            s.add(v);
        }
        Ok(s)
    }

    /// Entries in the established tables (`CT4` and `CT`) and the new-flow table (walks the
    /// maps: not for hot loops).
    pub fn conntrack_len(&self) -> (usize, usize) {
        (
            self.maps.ct4.keys().count() + self.maps.ct.keys().count(),
            self.maps.ct_new.keys().count(),
        )
    }

    /// The backend id a tracked flow is pinned to, if any.
    pub fn tracked_backend(&self, key: &FlowKey) -> Option<u32> {
        let (ct, ct_new) = self.conntrack_entries(key);
        ct.or(ct_new).map(|v| v.backend)
    }

    /// A flow's entries in the established table of its family (`CT4` or `CT`) and the
    /// new-flow table (`CT_NEW`), as stored (backend, hash, SYN sequence number in network
    /// order, `CT_F_*` flags).
    pub fn conntrack_entries(&self, key: &FlowKey) -> (Option<CtValue>, Option<CtValue>) {
        let established = match key.v4() {
            Some(k4) => self.maps.ct4.get(&k4, 0).ok(),
            None => self.maps.ct.get(key, 0).ok(),
        };
        (established, self.maps.ct_new.get(key, 0).ok())
    }

    /// Writes a flow's entries in the established table of its family and `CT_NEW` (`None`
    /// removes one): what the datapath finds of a connection seen long ago, for tests of how
    /// it treats old entries.
    pub fn set_conntrack_entries(
        &mut self,
        key: &FlowKey,
        ct: Option<CtValue>,
        ct_new: Option<CtValue>,
    ) -> Result<()> {
        match (key.v4(), ct) {
            (Some(k4), Some(v)) => self.maps.ct4.insert(k4, v, 0)?,
            (Some(k4), None) => {
                let _ = self.maps.ct4.remove(&k4);
            }
            (None, Some(v)) => self.maps.ct.insert(key, v, 0)?,
            (None, None) => {
                let _ = self.maps.ct.remove(key);
            }
        }
        match ct_new {
            Some(v) => self.maps.ct_new.insert(key, v, 0)?,
            None => {
                let _ = self.maps.ct_new.remove(key);
            }
        }
        if ct.is_some() {
            self.maps.conntrack.filter().mark(key);
        }
        Ok(())
    }

    /// The VIP entry the datapath currently reads.
    pub fn vip_meta(&self, v: &crate::config::Vip) -> Option<VipMeta> {
        self.maps.vips.get(&vip_key(v), 0).ok()
    }

    /// Marks one backend of an applied VIP down (or up again) in the datapath: a DOWN backend
    /// takes no flow at all, and the flows tracked to it are steered again through the table
    /// at their next packet. Only the DOWN flag changes (the entry stays ACTIVE); `apply` keeps
    /// the flag. Returns whether the entry changed. The table is the caller's: give a down
    /// backend weight 0 in the next `apply` so new flows avoid it too.
    pub fn set_backend_down(&mut self, vip: VipId, addr: IpAddr, down: bool) -> Result<bool> {
        let v = self
            .vips
            .get(&vip)
            .ok_or_else(|| anyhow!("no VIP {}:{}/{} is applied", vip.0, vip.1, vip.2))?;
        let b = v
            .backends
            .iter()
            .find(|b| b.address == addr)
            .ok_or_else(|| anyhow!("{addr} is not a backend of {}", v.config.name()))?;
        let id = b.id;
        let mut info = self
            .maps
            .backends
            .get(&id, 0)
            .with_context(|| format!("reading backend {addr}'s datapath entry"))?;
        if info.flags & BACKEND_F_ACTIVE == 0 {
            bail!("backend {addr}'s datapath entry is not active");
        }
        let flags = if down {
            info.flags | BACKEND_F_DOWN
        } else {
            info.flags & !BACKEND_F_DOWN
        };
        if flags == info.flags {
            return Ok(false);
        }
        info.flags = flags;
        self.maps
            .backends
            .set(id, info, 0)
            .with_context(|| format!("writing backend {addr}'s datapath entry"))?;
        Ok(true)
    }

    /// Whether a backend's datapath entry carries the DOWN flag (`None`: no such backend).
    pub fn backend_down(&self, vip: VipId, addr: IpAddr) -> Option<bool> {
        let b = self
            .vips
            .get(&vip)?
            .backends
            .iter()
            .find(|b| b.address == addr)?;
        let info = self.maps.backends.get(&b.id, 0).ok()?;
        Some(info.flags & BACKEND_F_DOWN != 0)
    }
}

/// The packets and bytes of backends' statistics, summed.
pub(super) fn forwarded(stats: &[BackendStats]) -> VipTotals {
    let mut t = VipTotals::default();
    for s in stats {
        t.packets += s.packets;
        t.bytes += s.bytes;
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_map_unlike_the_registry_is_refused_by_name() {
        let ct = &maps::ct::SPEC;
        let good = MapShape::of(ct, 4096);
        check_map(ct, 4096, good).unwrap();
        // An object built when CT's value was 8 bytes, and one whose CT is a plain hash map.
        let old_value = MapShape {
            value_size: 8,
            ..good
        };
        let plain_hash = MapShape {
            kind: Kind::Hash,
            ..good
        };
        let smaller = MapShape {
            max_entries: 1024,
            ..good
        };
        for found in [old_value, plain_hash, smaller] {
            let e = check_map(ct, 4096, found).unwrap_err().to_string();
            assert!(e.starts_with("the balancer object's map CT is a "), "{e}");
            assert!(e.contains(&found.to_string()), "{e}");
            assert!(e.contains("rebuild lbd"), "{e}");
        }
    }

    #[test]
    fn the_registry_names_each_map_once_and_sizes_from_the_types() {
        let mut names: Vec<&str> = maps::BALANCER.iter().map(|s| s.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), maps::BALANCER.len());
        assert_eq!(maps::ct::SPEC.key_size as usize, size_of::<FlowKey>());
        assert_eq!(maps::ct::SPEC.value_size as usize, size_of::<CtValue>());
        assert_eq!(maps::ct::ENTRIES, lb_common::DEFAULT_CT_SIZE as usize);
    }
}
