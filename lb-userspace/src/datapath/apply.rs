//! Turning a validated configuration into map contents (`Balancer::apply`), in an order the
//! datapath can never misread, and re-resolving next hops.
use super::pool::{Region, RingPool};
use super::tables;
use super::{
    addr_bytes, bpf_maps::write_ring, vip_key, ApplyReport, BackendState, Balancer, TableWrite,
    VipId, VipState,
};
use crate::config::Config;
use anyhow::{anyhow, bail, Context as _, Result};
use aya::maps::PerCpuValues;
use lb_common::{
    maglev, AgentState, BackendInfo, BackendStats, Counter, GlobalConfig, NextHop, VipMeta,
    VipStats, VipTotals, AGENT_F_VIP_RETIRED, AGENT_STATE_MAGIC, BACKEND_F_ACTIVE, BACKEND_F_DOWN,
    CONFIG_F_HAVE_V4_SRC, CONFIG_F_HAVE_V6_SRC, MAX_BACKENDS, MAX_VIPS, SYN_RECORD_TICKS,
};
use std::collections::{BTreeMap, BTreeSet};

/// What `apply` will write, worked out before the first write: copies of the allocators with
/// the new ids and regions taken, and each VIP's new state with the region its new table goes
/// to (`None`: the table is unchanged).
struct Plan {
    pool: RingPool,
    used_backend_ids: BTreeSet<u32>,
    next_backend_id: u32,
    used_vip_ids: BTreeSet<u32>,
    next_vip_id: u32,
    vips: Vec<(VipId, VipState, Option<Region>)>,
    report: ApplyReport,
}

/// A VIP's backends with their ids: kept for a backend the VIP already had, new otherwise.
fn plan_backends(
    v: &crate::config::Vip,
    old: Option<&VipState>,
    plan: &mut Plan,
) -> Result<Vec<BackendState>> {
    let mut backends = Vec::with_capacity(v.backends.len());
    for b in &v.backends {
        let existing = old.and_then(|o| o.backends.iter().find(|x| x.address == b.address));
        let bid = match existing {
            Some(x) => x.id,
            None => {
                plan.report.backends_added += 1;
                alloc_backend_id(&mut plan.used_backend_ids, &mut plan.next_backend_id)?
            }
        };
        backends.push(BackendState {
            address: b.address,
            id: bid,
            weight: b.effective_weight(),
            slots: 0,
        });
    }
    Ok(backends)
}

/// The VIP's Maglev table for these backends and weights.
fn build_table(v: &crate::config::Vip, backends: &[BackendState]) -> Result<Vec<u32>> {
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
    tables::build(&mg, v.table_size)
        .map_err(|e| anyhow!("vip {}: building the Maglev table: {e}", v.name()))
}

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

/// Round-robin over `0..MAX_VIPS` like backend ids: a removed VIP's id (and its statistics
/// slot) is reused as late as possible.
pub(super) fn alloc_vip_id(used: &mut BTreeSet<u32>, next: &mut u32) -> Result<u32> {
    for _ in 0..MAX_VIPS {
        let id = *next;
        *next = (*next + 1) % MAX_VIPS;
        if used.insert(id) {
            return Ok(id);
        }
    }
    bail!("no free VIP slot (at most {MAX_VIPS})")
}

impl Balancer {
    /// Applies a configuration (interface and map sizes excepted: they are fixed at start).
    pub fn apply(&mut self, cfg: &Config) -> Result<ApplyReport> {
        cfg.validate()?;
        let mut plan = self.plan(cfg)?;
        // The cursors go first: ids taken by this apply are never handed out again by a later
        // lbd, even if this one dies half-way (skipping an id costs nothing).
        if (plan.next_backend_id, plan.next_vip_id) != (self.next_backend_id, self.next_vip_id) {
            self.write_cursors(plan.next_backend_id, plan.next_vip_id)?;
        }
        self.write_global_config(cfg)?;
        // Port filter: ports of new VIPs are marked before the VIPs are published, ports no
        // VIP uses any more are cleared after the VIPs are gone (a stale bit only costs a lookup).
        let old_ports = port_bits(self.vips.values().map(|v| &v.config));
        let new_ports = port_bits(plan.vips.iter().map(|(_, st, _)| &st.config));
        self.mark_new_ports(&old_ports, &new_ports)?;
        // While a VIP's table changes, the datapath records its SYNs (they make no entry
        // otherwise): armed before the first write, so a handshake whose SYN and ACK straddle
        // the change keeps its backend. A new VIP has no handshakes in flight; the VIPs whose
        // tables stay keep their SYNs unrecorded.
        let changing: Vec<u32> = plan
            .vips
            .iter()
            .filter(|(id, _, region)| region.is_some() && self.vips.contains_key(id))
            .map(|(_, st, _)| st.vip_id)
            .collect();
        for vip_id in changing {
            self.set_vip_syn_recording(vip_id, SYN_RECORD_TICKS)?;
        }
        for (id, st, region) in &plan.vips {
            if !self.vips.contains_key(id) {
                // A new VIP starts from zero, whatever a crash left in its statistics slot.
                self.zero_vip_stats(st.vip_id)?;
            }
            self.write_backends(st)?;
            if let Some(r) = region {
                self.publish_table(st, *r)?;
            }
        }
        self.retire_gone(&mut plan)?;
        self.clear_unused_ports(&old_ports, &new_ports)?;
        Ok(self.adopt(plan))
    }

    /// Everything that can fail, before any write: ids, tables and ring regions for every VIP,
    /// on copies of the allocators that [`Balancer::adopt`] keeps once the writes are done.
    fn plan(&self, cfg: &Config) -> Result<Plan> {
        let mut plan = Plan {
            pool: self.pool.clone(),
            used_backend_ids: self.used_backend_ids.clone(),
            next_backend_id: self.next_backend_id,
            used_vip_ids: self.used_vip_ids.clone(),
            next_vip_id: self.next_vip_id,
            vips: Vec::new(),
            report: ApplyReport::default(),
        };
        for v in &cfg.vips {
            let planned = self.plan_vip(v, &mut plan)?;
            plan.vips.push(planned);
        }
        // Validation refuses duplicate VIPs, so every VIP has one plan.
        let wanted: BTreeSet<VipId> = plan.vips.iter().map(|(id, _, _)| *id).collect();
        debug_assert!(wanted.len() == plan.vips.len());
        Ok(plan)
    }

    /// One VIP's new state: its id (kept, or a free one), its backends' ids, its table, and a
    /// fresh ring region when the table or the forwarding mode changed.
    fn plan_vip(
        &self,
        v: &crate::config::Vip,
        plan: &mut Plan,
    ) -> Result<(VipId, VipState, Option<Region>)> {
        let id: VipId = (v.address, v.port, v.protocol);
        let old = self.vips.get(&id);
        let vip_id = match old {
            Some(o) => o.vip_id,
            None => {
                let n = alloc_vip_id(&mut plan.used_vip_ids, &mut plan.next_vip_id)?;
                plan.report.vips_added += 1;
                n
            }
        };
        let mut backends = plan_backends(v, old, plan)?;
        // A table depends only on the backends (address, id, weight) and the size: a VIP whose
        // inputs did not change keeps its table without a build. With many VIPs, every apply
        // (each learning step that changes one VIP's weights) rebuilt all of them, and pushed
        // the tables the next step needs out of the small cache (`tables`).
        // A state restored from pins has weight 0 everywhere (its weights are unknown): its
        // table is always built again and compared.
        let same_inputs = old.is_some_and(|o| {
            o.backends.iter().any(|b| b.weight > 0)
                && o.config.table_size == v.table_size
                && o.backends.len() == backends.len()
                && o.backends
                    .iter()
                    .zip(&backends)
                    .all(|(x, y)| (x.address, x.id, x.weight) == (y.address, y.id, y.weight))
        });
        let table = match old {
            Some(o) if same_inputs => {
                for (b, x) in backends.iter_mut().zip(&o.backends) {
                    b.slots = x.slots;
                }
                o.table.clone()
            }
            _ => {
                let table = build_table(v, &backends)?;
                let mut slots = vec![0u32; MAX_BACKENDS as usize];
                for s in &table {
                    if let Some(n) = slots.get_mut(*s as usize) {
                        *n += 1;
                    }
                }
                for b in &mut backends {
                    b.slots = slots.get(b.id as usize).copied().unwrap_or(0);
                }
                table
            }
        };
        let changed = match old {
            Some(o) => (!same_inputs && o.table != table) || o.config.forwarding != v.forwarding,
            None => true,
        };
        let region = if changed {
            Some(plan.pool.alloc(v.table_size).ok_or_else(|| {
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
                Some(o) if o.table.len() == table.len() => maglev::slots_changed(&o.table, &table),
                _ => table.len(),
            };
            plan.report.tables.push((v.name(), moved, generation));
        }
        let state = VipState {
            config: v.clone(),
            vip_id,
            generation,
            region: region.unwrap_or(old.map_or(Region { offset: 0, size: 0 }, |o| o.region)),
            table,
            backends,
        };
        Ok((id, state, region))
    }

    /// The CONFIG map: encapsulation source addresses.
    fn write_global_config(&mut self, cfg: &Config) -> Result<()> {
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
            .context("writing the CONFIG map")
    }

    /// Marks the ports of new VIPs (old bits kept until [`Balancer::clear_unused_ports`]).
    fn mark_new_ports(
        &mut self,
        old_ports: &BTreeMap<u16, u8>,
        new_ports: &BTreeMap<u16, u8>,
    ) -> Result<()> {
        for (port, bits) in new_ports {
            let merged = bits | old_ports.get(port).copied().unwrap_or(0);
            if old_ports.get(port) != Some(&merged) {
                self.maps
                    .vip_ports
                    .set(*port as u32, merged, 0)
                    .context("writing VIP_PORTS")?;
            }
        }
        Ok(())
    }

    /// Clears the bits of ports no VIP uses any more, once those VIPs are gone.
    fn clear_unused_ports(
        &mut self,
        old_ports: &BTreeMap<u16, u8>,
        new_ports: &BTreeMap<u16, u8>,
    ) -> Result<()> {
        for (port, bits) in old_ports {
            let now = new_ports.get(port).copied().unwrap_or(0);
            if now != *bits {
                self.maps
                    .vip_ports
                    .set(*port as u32, now, 0)
                    .context("writing VIP_PORTS")?;
            }
        }
        Ok(())
    }

    /// A VIP's backend entries, written before any table can name them. Entries that are
    /// already right are left alone (their next hop stays resolved).
    fn write_backends(&mut self, st: &VipState) -> Result<()> {
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
        Ok(())
    }

    /// Writes a VIP's new table into its fresh region, then swaps the VIP entry to it.
    fn publish_table(&mut self, st: &VipState, r: Region) -> Result<()> {
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
        Ok(())
    }

    /// Removes the VIPs that are gone, frees the regions no table uses any more, and retires
    /// the backends that left.
    fn retire_gone(&mut self, plan: &mut Plan) -> Result<()> {
        let mut retired: Vec<u32> = Vec::new();
        let mut removed_vips: Vec<u32> = Vec::new();
        for (id, old) in &self.vips {
            let new = plan
                .vips
                .iter()
                .find(|(k, _, _)| k == id)
                .map(|(_, s, _)| s);
            match new {
                None => {
                    self.maps
                        .vips
                        .remove(&vip_key(&old.config))
                        .context("removing a VIP")?;
                    removed_vips.push(old.vip_id);
                    plan.used_vip_ids.remove(&old.vip_id);
                    plan.pool.release(old.region);
                    plan.report.vips_removed += 1;
                    retired.extend(old.backends.iter().map(|b| b.id));
                }
                Some(n) => {
                    if n.region != old.region {
                        plan.pool.release(old.region);
                    }
                    for b in &old.backends {
                        if !n.backends.iter().any(|x| x.id == b.id) {
                            retired.push(b.id);
                        }
                    }
                }
            }
        }
        for bid in &retired {
            self.clear_backend(*bid)?;
            plan.used_backend_ids.remove(bid);
            plan.report.backends_removed += 1;
        }
        // After its backends (whose statistics `clear_backend` adds to their VIP's).
        for vip_id in removed_vips {
            // Its counters go with it: a later VIP with this id must start from zero (its
            // Prometheus counters would jump otherwise).
            self.zero_vip_stats(vip_id)?;
        }
        Ok(())
    }

    /// Retires backend id `id` in the datapath: inactive (flows still tracked to it are steered
    /// again through the table), no next hop, statistics added to its VIP's retired share
    /// (`VIP_RETIRED`), then zero for the id's next owner. Read once the entry is inactive, so
    /// only packets already past the liveness check can still count on it (and be lost to the
    /// VIP's totals).
    pub(super) fn clear_backend(&mut self, id: u32) -> Result<()> {
        let old = self.maps.backends.get(&id, 0)?;
        self.maps
            .backends
            .set(id, BackendInfo::default(), 0)
            .context("retiring a backend")?;
        self.maps.nexthops.set(id, NextHop::default(), 0)?;
        if old.flags & BACKEND_F_ACTIVE != 0 {
            let s = self.backend_stats(id)?;
            let mut t = self.maps.vip_retired.get(&old.vip_id, 0)?;
            t.packets += s.packets;
            t.bytes += s.bytes;
            self.maps
                .vip_retired
                .set(old.vip_id, t, 0)
                .context("writing VIP_RETIRED")?;
        }
        let zero = PerCpuValues::try_from(vec![BackendStats::default(); nr_cpus()?])?;
        self.maps.backend_stats.set(id, zero, 0)?;
        Ok(())
    }

    /// Zeroes VIP id `id`'s statistics on every CPU, and its retired backends' share.
    fn zero_vip_stats(&mut self, id: u32) -> Result<()> {
        let zero = PerCpuValues::try_from(vec![VipStats::default(); nr_cpus()?])?;
        self.maps
            .vip_stats
            .set(id, zero, 0)
            .context("zeroing VIP_STATS")?;
        self.maps
            .vip_retired
            .set(id, VipTotals::default(), 0)
            .context("zeroing VIP_RETIRED")
    }

    /// Makes the datapath record every VIP's SYNs in `CT_NEW` for `ticks` (`CT_TICK_SHIFT`
    /// ticks) from now, or no longer (0): tests and benches set it to choose a path.
    pub fn set_syn_recording(&mut self, ticks: u32) -> Result<()> {
        for vip_id in 0..MAX_VIPS {
            self.set_vip_syn_recording(vip_id, ticks)?;
        }
        Ok(())
    }

    /// Makes the datapath record VIP `vip_id`'s SYNs in `CT_NEW` for `ticks` from now, or no
    /// longer (0). `apply` arms it for [`SYN_RECORD_TICKS`] before it writes the VIP's changed
    /// table.
    pub fn set_vip_syn_recording(&mut self, vip_id: u32, ticks: u32) -> Result<()> {
        let deadline = match ticks {
            0 => 0,
            t => super::conntrack::now_tick().wrapping_add(t).max(1),
        };
        self.maps
            .syn_record
            .set(vip_id, deadline, 0)
            .with_context(|| format!("writing SYN_RECORD[{vip_id}]"))
    }

    /// Whether the datapath records VIP `vip_id`'s SYNs now.
    pub fn vip_syn_recording(&self, vip_id: u32) -> Result<bool> {
        let deadline = self
            .maps
            .syn_record
            .get(&vip_id, 0)
            .with_context(|| format!("reading SYN_RECORD[{vip_id}]"))?;
        Ok(lb_common::syn_recording(
            deadline,
            super::conntrack::now_tick(),
        ))
    }

    /// Persists the id cursors in `AGENT_STATE` (see [`AgentState`]).
    pub(super) fn write_cursors(&mut self, next_backend_id: u32, next_vip_id: u32) -> Result<()> {
        let s = AgentState {
            magic: AGENT_STATE_MAGIC,
            next_backend_id,
            next_vip_id,
            flags: AGENT_F_VIP_RETIRED,
            ..AgentState::default()
        };
        self.maps
            .agent_state
            .set(0, s, 0)
            .context("writing AGENT_STATE")
    }

    /// Keeps the plan as the balancer's view once every write is done, and asks the kernel to
    /// resolve the next hop of every backend it was not asked for yet (see
    /// [`super::netif::NextHops`]: a learning step that only changes weights asks for nothing).
    fn adopt(&mut self, plan: Plan) -> ApplyReport {
        self.pool = plan.pool;
        self.used_backend_ids = plan.used_backend_ids;
        self.next_backend_id = plan.next_backend_id;
        self.used_vip_ids = plan.used_vip_ids;
        self.next_vip_id = plan.next_vip_id;
        self.vips = plan.vips.into_iter().map(|(k, s, _)| (k, s)).collect();
        if self.interface.is_some() {
            let backends = self.backend_addrs();
            for (addr, e) in self.next_hops.sync(&backends) {
                tracing::warn!(backend = %addr, "cannot keep the next hop resolved: {e:#}");
            }
        }
        plan.report
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
    pub fn resolve_next_hops(&mut self) -> usize {
        if self.interface.is_none() {
            return 0;
        }
        let backends = self.backend_addrs();
        let (n, failed) = self.next_hops.resolve_all(&backends);
        for (addr, e) in failed {
            tracing::debug!(backend = %addr, "cannot resolve the next hop yet: {e:#}");
        }
        n
    }

    /// Every backend address of every VIP (a backend of two VIPs once).
    fn backend_addrs(&self) -> BTreeSet<std::net::IpAddr> {
        self.vips
            .values()
            .flat_map(|v| v.backends.iter().map(|b| b.address))
            .collect()
    }
}
