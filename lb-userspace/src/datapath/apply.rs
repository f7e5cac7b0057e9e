//! Turning a validated configuration into map contents (`Balancer::apply`), in an order the
//! datapath can never misread, and re-resolving next hops.
use super::pool::Region;
use super::{
    addr_bytes, bpf_maps::write_ring, vip_key, ApplyReport, BackendState, Balancer, TableWrite,
    VipId, VipState,
};
use super::{netif, tables};
use crate::config::Config;
use anyhow::{anyhow, bail, Context as _, Result};
use aya::maps::PerCpuValues;
use lb_common::{
    maglev, BackendInfo, BackendStats, Counter, GlobalConfig, NextHop, VipMeta, BACKEND_F_ACTIVE,
    BACKEND_F_DOWN, CONFIG_F_HAVE_V4_SRC, CONFIG_F_HAVE_V6_SRC, MAX_BACKENDS, MAX_VIPS,
};
use std::collections::{BTreeMap, BTreeSet};

/// `VIP_PORTS` bits per destination port for a set of VIPs.
pub(super) fn port_bits<'a>(
    vips: impl Iterator<Item = &'a crate::config::Vip>,
) -> BTreeMap<u16, u8> {
    let mut out = BTreeMap::new();
    for v in vips {
        let bit = match v.protocol {
            crate::config::Protocol::Tcp => lb_common::VIP_PORT_TCP,
            crate::config::Protocol::Udp => lb_common::VIP_PORT_UDP,
        };
        *out.entry(v.port).or_insert(0) |= bit;
    }
    out
}

pub(super) fn nr_cpus() -> Result<usize> {
    aya::util::nr_cpus().map_err(|(what, e)| anyhow!("{what}: {e}"))
}

pub(super) fn alloc_backend_id(used: &mut BTreeSet<u32>, next: &mut u32) -> Result<u32> {
    // Round-robin, so that a retired id is reused as late as possible (flows still tracked to
    // it are steered again, never sent to a newcomer that inherited the id).
    for _ in 1..MAX_BACKENDS {
        let id = *next;
        *next = if *next + 1 >= MAX_BACKENDS {
            1
        } else {
            *next + 1
        };
        if used.insert(id) {
            return Ok(id);
        }
    }
    bail!("no free backend id (at most {} backends)", MAX_BACKENDS - 1)
}

impl Balancer {
    /// Applies a configuration (interface and map sizes excepted: they are fixed at start).
    pub fn apply(&mut self, cfg: &Config) -> Result<ApplyReport> {
        cfg.validate()?;
        let mut report = ApplyReport::default();

        // ---- Plan: everything that can fail, before any write. ----
        let mut pool = self.pool.clone();
        let mut used_backend_ids = self.used_backend_ids.clone();
        let mut next_backend_id = self.next_backend_id;
        let mut used_vip_ids = self.used_vip_ids.clone();
        let mut planned: Vec<(VipId, VipState, Option<Region>)> = Vec::new();
        let wanted: BTreeSet<VipId> = cfg
            .vips
            .iter()
            .map(|v| (v.address, v.port, v.protocol))
            .collect();

        for v in &cfg.vips {
            let id: VipId = (v.address, v.port, v.protocol);
            let old = self.vips.get(&id);
            let vip_id = match old {
                Some(o) => o.vip_id,
                None => {
                    let n = (0..MAX_VIPS)
                        .find(|i| !used_vip_ids.contains(i))
                        .ok_or_else(|| anyhow!("no free VIP slot (at most {MAX_VIPS})"))?;
                    used_vip_ids.insert(n);
                    report.vips_added += 1;
                    n
                }
            };
            let mut backends = Vec::with_capacity(v.backends.len());
            for b in &v.backends {
                let existing = old.and_then(|o| o.backends.iter().find(|x| x.address == b.address));
                let bid = match existing {
                    Some(x) => x.id,
                    None => {
                        report.backends_added += 1;
                        alloc_backend_id(&mut used_backend_ids, &mut next_backend_id)?
                    }
                };
                backends.push(BackendState {
                    address: b.address,
                    id: bid,
                    weight: b.effective_weight(),
                    slots: 0,
                });
            }
            let mg: Vec<maglev::Backend> = backends
                .iter()
                .map(|b| {
                    let (addr, family) = addr_bytes(b.address);
                    maglev::Backend {
                        addr,
                        family,
                        id: b.id,
                        weight: b.weight,
                    }
                })
                .collect();
            let table = tables::build(&mg, v.table_size)
                .map_err(|e| anyhow!("vip {}: building the Maglev table: {e}", v.name()))?;
            for b in &mut backends {
                b.slots = table.iter().filter(|&&s| s == b.id).count() as u32;
            }
            let changed = match old {
                Some(o) => o.table != table || o.config.forwarding != v.forwarding,
                None => true,
            };
            let region = if changed {
                Some(pool.alloc(v.table_size).ok_or_else(|| {
                    anyhow!(
                        "table_pool: no room for a {}-slot table for {}; raise table_pool",
                        v.table_size,
                        v.name()
                    )
                })?)
            } else {
                None
            };
            let generation = old.map_or(0, |o| o.generation) + changed as u32;
            if changed {
                let moved = match old {
                    Some(o) if o.table.len() == table.len() => {
                        maglev::slots_changed(&o.table, &table)
                    }
                    _ => table.len(),
                };
                report.tables.push((v.name(), moved, generation));
            }
            let state = VipState {
                config: v.clone(),
                vip_id,
                generation,
                region: region.unwrap_or(old.map_or(Region { offset: 0, size: 0 }, |o| o.region)),
                table,
                backends,
            };
            planned.push((id, state, region));
        }

        // ---- Write. ----
        let mut g = GlobalConfig::default();
        if let Some(a) = cfg.encap.source_v4 {
            g.encap_src_v4 = a.octets();
            g.flags |= CONFIG_F_HAVE_V4_SRC;
        }
        if let Some(a) = cfg.encap.source_v6 {
            g.encap_src_v6 = a.octets();
            g.flags |= CONFIG_F_HAVE_V6_SRC;
        }
        self.maps
            .config
            .set(0, g, 0)
            .context("writing the CONFIG map")?;
        // Port filter: ports of new VIPs are marked before the VIPs are published, ports no
        // VIP uses any more are cleared after the VIPs are gone (a stale bit only costs a lookup).
        let old_ports = port_bits(self.vips.values().map(|v| &v.config));
        let new_ports = port_bits(planned.iter().map(|(_, st, _)| &st.config));
        for (port, bits) in &new_ports {
            let merged = bits | old_ports.get(port).copied().unwrap_or(0);
            if old_ports.get(port) != Some(&merged) {
                self.maps
                    .vip_ports
                    .set(*port as u32, merged, 0)
                    .context("writing VIP_PORTS")?;
            }
        }

        for (_, st, region) in &planned {
            for b in &st.backends {
                let (addr, family) = addr_bytes(b.address);
                let mut info = BackendInfo {
                    addr,
                    family,
                    _pad: [0; 3],
                    flags: BACKEND_F_ACTIVE,
                    mode: st.config.forwarding.mode(),
                    vip_id: st.vip_id,
                };
                let current = self.maps.backends.get(&b.id, 0).ok();
                // A DOWN flag is the health checker's (`set_backend_down`), not the
                // configuration's: an entry for this same backend keeps it.
                if let Some(c) = current {
                    let same = c.flags & BACKEND_F_ACTIVE != 0
                        && (c.addr, c.family, c.vip_id) == (addr, family, st.vip_id);
                    if same {
                        info.flags |= c.flags & BACKEND_F_DOWN;
                    }
                }
                let fresh = current.map(|x| x != info).unwrap_or(true);
                if fresh {
                    self.maps
                        .backends
                        .set(b.id, info, 0)
                        .context("writing BACKENDS")?;
                    self.maps
                        .nexthops
                        .set(b.id, NextHop::default(), 0)
                        .context("writing NEXTHOPS")?;
                }
            }
            if let Some(r) = region {
                // Debug records bracket the write so a crash can be placed before, during or
                // after it (the chaos tests SIGKILL lbd between the two).
                tracing::debug!(vip = %st.config.name(), slots = st.table.len(), offset = r.offset,
                    generation = st.generation, "writing table");
                if let Some(note) = &self.table_writes {
                    note(Some(TableWrite {
                        vip: st.config.name(),
                        generation: st.generation,
                        slots: st.table.len() as u32,
                        offset: r.offset,
                    }));
                }
                write_ring(&mut self.maps, r.offset, &st.table)?;
                let meta = VipMeta {
                    vip_id: st.vip_id,
                    mode: st.config.forwarding.mode(),
                    ring_offset: r.offset,
                    ring_size: r.size,
                    generation: st.generation,
                    _pad: 0,
                };
                // The atomic switch: the datapath now reads the new table.
                self.maps
                    .vips
                    .insert(vip_key(&st.config), meta, 0)
                    .context("writing VIPS")?;
                tracing::debug!(vip = %st.config.name(), generation = st.generation, "table published");
                if let Some(note) = &self.table_writes {
                    note(None);
                }
            }
        }

        // ---- Retire what is gone. ----
        let mut retired: Vec<u32> = Vec::new();
        for (id, old) in &self.vips {
            let new = planned.iter().find(|(k, _, _)| k == id).map(|(_, s, _)| s);
            match new {
                None => {
                    self.maps
                        .vips
                        .remove(&vip_key(&old.config))
                        .context("removing a VIP")?;
                    used_vip_ids.remove(&old.vip_id);
                    pool.release(old.region);
                    report.vips_removed += 1;
                    retired.extend(old.backends.iter().map(|b| b.id));
                }
                Some(n) => {
                    if n.region != old.region {
                        pool.release(old.region);
                    }
                    for b in &old.backends {
                        if !n.backends.iter().any(|x| x.id == b.id) {
                            retired.push(b.id);
                        }
                    }
                }
            }
        }
        debug_assert!(wanted.len() == planned.len());
        for bid in &retired {
            // Inactive: flows still tracked to it are steered again through the table.
            self.maps
                .backends
                .set(*bid, BackendInfo::default(), 0)
                .context("retiring a backend")?;
            self.maps.nexthops.set(*bid, NextHop::default(), 0)?;
            let zero = PerCpuValues::try_from(vec![BackendStats::default(); nr_cpus()?])?;
            self.maps.backend_stats.set(*bid, zero, 0)?;
            used_backend_ids.remove(bid);
            report.backends_removed += 1;
        }

        for (port, bits) in &old_ports {
            let now = new_ports.get(port).copied().unwrap_or(0);
            if now != *bits {
                self.maps
                    .vip_ports
                    .set(*port as u32, now, 0)
                    .context("writing VIP_PORTS")?;
            }
        }

        self.pool = pool;
        self.used_backend_ids = used_backend_ids;
        self.next_backend_id = next_backend_id;
        self.used_vip_ids = used_vip_ids;
        self.vips = planned.into_iter().map(|(k, s, _)| (k, s)).collect();
        if let Some((ifname, _, _)) = &self.interface {
            for v in self.vips.values() {
                for b in &v.backends {
                    if let Err(e) = netif::ensure_neighbour(ifname, b.address) {
                        tracing::warn!(backend = %b.address, "cannot keep the next hop resolved: {e:#}");
                    }
                }
            }
        }
        Ok(report)
    }

    /// Resolves every backend's next hop again if the datapath dropped packets for want of one
    /// (`drop_fib` grew) since the last call. Taking the interface down flushes the kernel's
    /// neighbour entries, the managed ones `apply` asked for included, and nothing else brings
    /// them back: without this, a link flap would blackhole every backend until the next
    /// change. lbd calls it once a second; it returns whether it re-resolved.
    pub fn heal_next_hops(&mut self) -> Result<bool> {
        let drops: u64 = self
            .maps
            .counters
            .get(&(Counter::DropFib as u32), 0)?
            .iter()
            .sum();
        let grew = drops > self.seen_drop_fib;
        self.seen_drop_fib = drops;
        if self.interface.is_none() || !grew {
            return Ok(false);
        }
        self.resolve_next_hops();
        Ok(true)
    }

    /// Asks the kernel again to keep every backend's next hop resolved (managed neighbour
    /// entries), now. lbd calls it when the interface comes back up, since taking it down
    /// flushed those entries. Returns how many backends' next hops were (re)requested.
    pub fn resolve_next_hops(&self) -> usize {
        let Some((ifname, _, _)) = &self.interface else {
            return 0;
        };
        let mut n = 0;
        for v in self.vips.values() {
            for b in &v.backends {
                match netif::ensure_neighbour(ifname, b.address) {
                    Ok(()) => n += 1,
                    Err(e) => {
                        tracing::debug!(backend = %b.address, "cannot resolve the next hop yet: {e:#}")
                    }
                }
            }
        }
        n
    }
}
