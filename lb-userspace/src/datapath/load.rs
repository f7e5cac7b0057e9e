//! Loading the balancer object (reusing pinned maps), restoring the agent's view from them,
//! and attaching or detaching the program on an interface.
use super::netif;
use super::pool::{Region, RingPool};
use super::{
    addr_from_bytes,
    bpf_maps::{check_object_maps, take, Maps},
    conntrack::ConntrackReader,
    ct_filter::CtFilter,
    pins::{ensure_pin_dir, entries, pinned_maps, survey_pins, PinReport, LINK_PIN},
    BackendState, Balancer, LoadOptions, TableWrite, VipState, BALANCER_OBJ,
};
use crate::config::{Forwarding, XdpMode};
use anyhow::{anyhow, bail, Context as _, Result};
use aya::{
    maps::{Array, HashMap as BpfHashMap, Map, MapError, PerCpuArray},
    programs::{
        links::{FdLink, PinnedLink},
        xdp::{XdpLink, XdpLinkId},
        Xdp, XdpMode as AyaXdpMode,
    },
    EbpfLoader,
};
use lb_common::{
    maps::{self, Capacity},
    progs, VipKey, VipMeta, VipStats, VipTotals, AGENT_F_VIP_RETIRED, AGENT_STATE_MAGIC,
    BACKEND_F_ACTIVE, MAX_BACKENDS, MAX_VIPS, MODE_L2, PROTO_TCP, PROTO_UDP,
};
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    os::fd::AsFd as _,
    path::Path,
};

/// Attaches an XDP program in the requested mode (`Auto`: driver mode, else generic).
pub fn attach_xdp(
    prog: &mut Xdp,
    interface: &str,
    mode: XdpMode,
) -> Result<(XdpLinkId, AyaXdpMode)> {
    let attempt = |prog: &mut Xdp, m: AyaXdpMode| {
        prog.attach(interface, m)
            .with_context(|| format!("attaching XDP to interface {interface} in {m:?} mode"))
    };
    match mode {
        XdpMode::Native => Ok((attempt(prog, AyaXdpMode::Driver)?, AyaXdpMode::Driver)),
        XdpMode::Generic => Ok((attempt(prog, AyaXdpMode::Skb)?, AyaXdpMode::Skb)),
        XdpMode::Auto => match attempt(prog, AyaXdpMode::Driver) {
            Ok(l) => Ok((l, AyaXdpMode::Driver)),
            Err(e) => {
                tracing::warn!("driver-mode XDP failed ({e:#}); falling back to generic mode");
                Ok((attempt(prog, AyaXdpMode::Skb)?, AyaXdpMode::Skb))
            }
        },
    }
}

/// The mode of the XDP program on `interface`, as the kernel reports it; an error if none is
/// attached.
fn kernel_mode(interface: &str) -> Result<AyaXdpMode> {
    match netif::kernel_xdp(interface)? {
        Some(k) => Ok(k.mode),
        None => bail!("attached to {interface}, yet the kernel reports no XDP program on it"),
    }
}

impl Balancer {
    /// Loads the program and creates its maps (verifier included); nothing is attached yet.
    /// With a pin directory that already holds maps (a restart or an upgrade), the maps are
    /// reused, connection tables and counters included, and the agent's view of them restored.
    pub fn load(opts: LoadOptions) -> Result<Self> {
        let mut loader = EbpfLoader::new();
        for spec in maps::BALANCER {
            if matches!(spec.capacity, Capacity::Configured { .. }) {
                loader.map_max_entries(spec.name, entries(spec, &opts));
            }
        }
        let mut pins = PinReport::default();
        if let Some(dir) = &opts.pin_dir {
            ensure_pin_dir(dir)?;
            pins = survey_pins(dir, &opts)?;
            for (name, ..) in pinned_maps(&opts) {
                loader.map_pin_path(name, dir.join(name));
            }
        }
        let mut ebpf = loader
            .load(super::try_embedded(BALANCER_OBJ, "balancer")?)
            .context("loading the balancer object")?;
        check_object_maps(&ebpf, &opts)?;
        let prog: &mut Xdp = ebpf
            .program_mut(progs::BALANCER)
            .ok_or_else(|| anyhow!("no program {}", progs::BALANCER))?
            .try_into()?;
        prog.load()
            .context("the kernel rejected the balancer program")?;
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::warn!("the balancer's log records are unavailable: {e}");
                None
            }
        };
        let ring = take(&mut ebpf, maps::RING)?;
        let ring_fd = match &ring {
            Map::Array(d) => d
                .fd()
                .as_fd()
                .try_clone_to_owned()
                .context("duplicating RING's fd")?,
            _ => bail!("the balancer object's {} is not an array", maps::RING),
        };
        let ct = take(&mut ebpf, maps::CT)?;
        let ct4 = take(&mut ebpf, maps::CT4)?;
        let ct_new = take(&mut ebpf, maps::CT_NEW)?;
        let filter = match take(&mut ebpf, maps::CT_FILTER)? {
            // The mapping keeps the map alive once the fd is closed.
            Map::Array(d) => CtFilter::map(d.fd().as_fd())?,
            _ => bail!("the balancer object's {} is not an array", maps::CT_FILTER),
        };
        let conntrack = ConntrackReader::new(
            dup_hash_fd(&ct, maps::CT)?,
            dup_hash_fd(&ct4, maps::CT4)?,
            dup_hash_fd(&ct_new, maps::CT_NEW)?,
            filter,
            (opts.conntrack_size, opts.conntrack_new_size),
        );
        let maps = Maps {
            vips: BpfHashMap::try_from(take(&mut ebpf, maps::VIPS)?)?,
            ring: Array::try_from(ring)?,
            ring_fd,
            vip_ports: Array::try_from(take(&mut ebpf, maps::VIP_PORTS)?)?,
            backends: Array::try_from(take(&mut ebpf, maps::BACKENDS)?)?,
            nexthops: Array::try_from(take(&mut ebpf, maps::NEXTHOPS)?)?,
            config: Array::try_from(take(&mut ebpf, maps::CONFIG)?)?,
            counters: PerCpuArray::try_from(take(&mut ebpf, maps::COUNTERS)?)?,
            vip_stats: PerCpuArray::try_from(take(&mut ebpf, maps::VIP_STATS)?)?,
            backend_stats: PerCpuArray::try_from(take(&mut ebpf, maps::BACKEND_STATS)?)?,
            ct: BpfHashMap::try_from(ct)?,
            ct4: BpfHashMap::try_from(ct4)?,
            ct_new: BpfHashMap::try_from(ct_new)?,
            agent_state: Array::try_from(take(&mut ebpf, maps::AGENT_STATE)?)?,
            vip_retired: Array::try_from(take(&mut ebpf, maps::VIP_RETIRED)?)?,
            syn_record: Array::try_from(take(&mut ebpf, maps::SYN_RECORD)?)?,
            conntrack,
        };
        let mut lb = Balancer {
            ebpf,
            maps,
            pool: RingPool::new(opts.table_pool),
            vips: BTreeMap::new(),
            used_backend_ids: BTreeSet::new(),
            next_backend_id: 1,
            used_vip_ids: BTreeSet::new(),
            next_vip_id: 0,
            interface: None,
            pin_dir: opts.pin_dir.clone(),
            resumed: pins.resumed,
            logger,
            seen_drop_fib: 0,
            next_hops: Default::default(),
            pins,
            table_writes: None,
            mode_changed: None,
        };
        if lb.resumed {
            lb.restore()
                .context("restoring state from the pinned maps")?;
            lb.pins.restored_vips = lb.vips.len();
            lb.pins.restored_backends = lb.used_backend_ids.len();
            if lb.pins.ct4_created {
                lb.move_v4_flows("taking the pins over")?;
            }
        }
        Ok(lb)
    }

    /// Pins of a build before `CT4` hold the established IPv4 flows in `CT`, where this
    /// program does not look: they are moved into `CT4` when the pins are taken over, and again
    /// once this program has replaced the old one (which may have added flows meanwhile; a
    /// flow's entry that this program already wrote in `CT4` is kept).
    fn move_v4_flows(&mut self, when: &str) -> Result<()> {
        const BPF_NOEXIST: u64 = 1;
        let found = self
            .maps
            .conntrack
            .v4_in_ct()
            .context("reading the pinned IPv4 flows in CT")?;
        let mut moved = 0;
        for (k, v) in &found {
            let k4 = k.v4().expect("`v4_in_ct` returns IPv4 flows");
            self.maps.conntrack.filter().mark(k);
            match self.maps.ct4.insert(k4, v, BPF_NOEXIST) {
                Ok(()) => moved += 1,
                Err(e) if os_error(&e) == Some(libc::EEXIST) => {}
                Err(e) => return Err(e).context("writing a pinned IPv4 flow into CT4"),
            }
            match self.maps.ct.remove(k) {
                Err(e) if os_error(&e) != Some(libc::ENOENT) => {
                    return Err(e).context("removing a moved IPv4 flow from CT")
                }
                _ => {}
            }
        }
        tracing::info!(
            moved,
            "pins of a build before CT4: IPv4 flows moved from CT to CT4 ({when})"
        );
        self.pins.v4_flows_moved += moved;
        Ok(())
    }

    /// The reader of the program's log records (aya-log): poll it when its fd is readable and
    /// call `flush`, which hands the records to the `log` facade (and so to `tracing`).
    pub fn take_logger(&mut self) -> Option<aya_log::EbpfLogger<&'static dyn log::Log>> {
        self.logger.take()
    }

    /// Whether this instance took over pinned maps from a previous one.
    pub fn resumed(&self) -> bool {
        self.resumed
    }

    /// What `load` found in the pin directory and did about it.
    pub fn pin_report(&self) -> &PinReport {
        &self.pins
    }

    /// Lets `apply` announce every table write before it starts (`Some`) and once it is
    /// published (`None`); lbd notes them in its run-state file.
    pub fn on_table_write(&mut self, hook: impl Fn(Option<TableWrite>) + Send + Sync + 'static) {
        self.table_writes = Some(Box::new(hook));
    }

    /// Rebuilds the agent's view (VIP ids, backend ids, table regions, tables) from the maps,
    /// so that applying the same configuration changes nothing and no flow moves.
    ///
    /// The id cursors come from `AGENT_STATE`, so allocation goes on where the previous lbd
    /// left it and no id that pinned connection-table entries may still name is handed out
    /// again soon. Pins of a build without it: derived from the ids in use, as that build did.
    /// Backend entries whose VIP was never published (a crash between writing a new VIP's
    /// backends and publishing its table) are retired: no table names them, and nothing would
    /// ever retire them later.
    fn restore(&mut self) -> Result<()> {
        let mut by_vip: BTreeMap<u32, Vec<(u32, IpAddr)>> = BTreeMap::new();
        let mut highest = 0;
        for id in 1..MAX_BACKENDS {
            let b = self.maps.backends.get(&id, 0)?;
            if b.flags & BACKEND_F_ACTIVE != 0 {
                by_vip
                    .entry(b.vip_id)
                    .or_default()
                    .push((id, addr_from_bytes(&b.addr, b.family)));
                highest = id;
            }
        }
        let entries: Vec<(VipKey, VipMeta)> = self.maps.vips.iter().collect::<Result<_, _>>()?;
        for (k, meta) in entries {
            let protocol = match k.proto {
                PROTO_TCP => crate::config::Protocol::Tcp,
                PROTO_UDP => crate::config::Protocol::Udp,
                p => bail!("pinned VIP map holds protocol {p}, which this lbd does not know"),
            };
            let address = addr_from_bytes(&k.addr, k.family);
            let region = Region {
                offset: meta.ring_offset,
                size: meta.ring_size,
            };
            if !self.pool.reserve(region) {
                bail!("pinned tables overlap or exceed table_pool; run `lbd cleanup`");
            }
            let mut table = Vec::with_capacity(region.size as usize);
            for i in 0..region.size {
                table.push(self.maps.ring.get(&(region.offset + i), 0)?);
            }
            let restored = by_vip.remove(&meta.vip_id).unwrap_or_default();
            self.used_backend_ids
                .extend(restored.iter().map(|(id, _)| *id));
            let backends: Vec<BackendState> = restored
                .into_iter()
                .map(|(id, address)| BackendState {
                    address,
                    id,
                    weight: 0,
                    slots: table.iter().filter(|&&s| s == id).count() as u32,
                })
                .collect();
            let config = crate::config::Vip {
                address,
                port: u16::from_be(k.port),
                protocol,
                forwarding: if meta.mode == MODE_L2 {
                    Forwarding::L2
                } else {
                    Forwarding::Ipip
                },
                table_size: region.size,
                health: None,
                learning: None,
                allow_host_address: false,
                backends: backends
                    .iter()
                    .map(|b| crate::config::Backend {
                        address: b.address,
                        weight: b.slots,
                        drained: false,
                        pinned: false,
                    })
                    .collect(),
            };
            self.used_vip_ids.insert(meta.vip_id);
            self.vips.insert(
                (address, config.port, protocol),
                VipState {
                    config,
                    vip_id: meta.vip_id,
                    generation: meta.generation,
                    region,
                    table,
                    backends,
                },
            );
        }
        for (vip_id, orphans) in by_vip {
            for (id, address) in orphans {
                tracing::info!(
                    backend = %address, id, vip_id,
                    "retiring a backend entry of a VIP that was never published"
                );
                self.clear_backend(id)?;
            }
        }
        self.derive_vip_retired()?;
        self.restore_cursors(highest)
    }

    /// Pins of a build whose program also counted every packet on its VIP (`AGENT_STATE`
    /// without `AGENT_F_VIP_RETIRED`): each VIP's retired share is what it counted beyond its
    /// current backends. The backends are read first: packets the old program, still attached,
    /// counts meanwhile make the share a little high, never low, so no VIP's totals go back.
    fn derive_vip_retired(&mut self) -> Result<()> {
        if self.maps.agent_state.get(&0, 0)?.flags & AGENT_F_VIP_RETIRED != 0 {
            return Ok(());
        }
        for v in self.vips.values() {
            let current = super::bpf_maps::forwarded(&self.backends_stats(v)?);
            let mut counted = VipStats::default();
            for c in self.maps.vip_stats.get(&v.vip_id, 0)?.iter() {
                counted.add(c);
            }
            let retired = VipTotals {
                packets: counted.packets.saturating_sub(current.packets),
                bytes: counted.bytes.saturating_sub(current.bytes),
            };
            self.maps
                .vip_retired
                .set(v.vip_id, retired, 0)
                .context("writing VIP_RETIRED")?;
        }
        Ok(())
    }

    /// The id cursors from `AGENT_STATE`, or (pins of an older build, or an entry out of
    /// range) derived from the highest ids in use; written back at once.
    fn restore_cursors(&mut self, highest_backend: u32) -> Result<()> {
        let s = self.maps.agent_state.get(&0, 0)?;
        let valid = s.magic == AGENT_STATE_MAGIC
            && (1..MAX_BACKENDS).contains(&s.next_backend_id)
            && s.next_vip_id < MAX_VIPS;
        if valid {
            self.next_backend_id = s.next_backend_id;
            self.next_vip_id = s.next_vip_id;
        } else {
            self.next_backend_id = if highest_backend + 1 >= MAX_BACKENDS {
                1
            } else {
                highest_backend + 1
            };
            self.next_vip_id = self.used_vip_ids.last().map_or(0, |v| (v + 1) % MAX_VIPS);
        }
        self.write_cursors(self.next_backend_id, self.next_vip_id)
    }

    /// The loaded program (for BPF_PROG_TEST_RUN).
    pub fn program(&self) -> &Xdp {
        self.ebpf
            .program(progs::BALANCER)
            .and_then(|p| <&Xdp>::try_from(p).ok())
            .expect("program loaded in Balancer::load")
    }

    /// Attaches to `interface` and enables forwarding on it (`bpf_fib_lookup` requires it).
    /// Returns the mode the kernel reports once attached, which is what lbd reports.
    ///
    /// With pinning, a link already pinned by a previous lbd is updated in place to this
    /// program: the kernel swaps programs atomically, no packet sees no program. Unless the
    /// pinned link is in another mode than `mode` asks for (not `auto`): a link cannot change
    /// its mode, so it is unpinned and the program attached anew in the requested mode (packets
    /// arriving in between reach the kernel's stack instead; the maps, and with them every
    /// tracked flow, are kept). Otherwise the new link is pinned, so it outlives this process.
    pub fn attach(&mut self, interface: &str, mode: XdpMode) -> Result<AyaXdpMode> {
        let used = self.attach_program(interface, mode)?;
        if self.pins.ct4_created {
            self.move_v4_flows("the old program replaced")?;
        }
        Ok(used)
    }

    fn attach_program(&mut self, interface: &str, mode: XdpMode) -> Result<AyaXdpMode> {
        netif::ifindex(interface)?;
        netif::enable_forwarding(interface)?;
        let prog: &mut Xdp = self
            .ebpf
            .program_mut(progs::BALANCER)
            .expect("program loaded")
            .try_into()?;
        let Some(dir) = &self.pin_dir else {
            let (link, _) = attach_xdp(prog, interface, mode)?;
            let used = kernel_mode(interface)?;
            self.interface = Some((interface.to_string(), Some(link), used));
            return Ok(used);
        };
        let link_path = dir.join(LINK_PIN);
        if link_path.exists() {
            let pinned_mode = netif::kernel_xdp(interface)?.map(|k| k.mode);
            let wanted = match mode {
                XdpMode::Native => Some(AyaXdpMode::Driver),
                XdpMode::Generic => Some(AyaXdpMode::Skb),
                XdpMode::Auto => None,
            };
            if wanted.is_some() && pinned_mode.is_some() && wanted != pinned_mode {
                tracing::warn!(
                    from = ?pinned_mode, to = ?wanted,
                    "the pinned XDP link is in another mode than xdp_mode asks for: attaching anew in the new mode (established flows are kept)"
                );
                std::fs::remove_file(&link_path).with_context(|| {
                    format!("unpinning the XDP link at {}", link_path.display())
                })?;
                self.mode_changed = pinned_mode;
                return self.attach_and_pin(interface, mode);
            }
            let pinned = PinnedLink::from_pin(&link_path).context("opening the pinned XDP link")?;
            let link = XdpLink::try_from(FdLink::from(pinned))
                .context("the pinned link is not an XDP link; run `lbd cleanup`")?;
            prog.attach_to_link(link)
                .context("replacing the running program in the pinned link")?;
            let used = kernel_mode(interface)?;
            self.interface = Some((interface.to_string(), None, used));
            return Ok(used);
        }
        self.attach_and_pin(interface, mode)
    }

    /// A new link in `mode`, pinned. A link just unpinned is released by the kernel a moment
    /// later: until then the interface is busy, so the attach is retried for up to 2 s.
    fn attach_and_pin(&mut self, interface: &str, mode: XdpMode) -> Result<AyaXdpMode> {
        let link_path = self.pin_dir.as_ref().expect("pinning").join(LINK_PIN);
        let prog: &mut Xdp = self
            .ebpf
            .program_mut(progs::BALANCER)
            .expect("program loaded")
            .try_into()?;
        let until = std::time::Instant::now() + std::time::Duration::from_secs(2);
        let (id, _) = loop {
            match attach_xdp(prog, interface, mode) {
                Ok(attached) => break attached,
                Err(_) if std::time::Instant::now() < until => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => return Err(e),
            }
        };
        let link = prog.take_link(id)?;
        let fd_link = FdLink::try_from(link).context(
            "pinning needs a bpf_link XDP attachment (Linux 5.9+); set pin_dir = \"\" to run without",
        )?;
        fd_link
            .pin(&link_path)
            .with_context(|| format!("pinning the link at {}", link_path.display()))?;
        let used = kernel_mode(interface)?;
        self.interface = Some((interface.to_string(), None, used));
        Ok(used)
    }

    /// The mode the pinned link was in when `attach` replaced it by one in another mode.
    pub fn mode_changed_from(&self) -> Option<AyaXdpMode> {
        self.mode_changed
    }

    /// Detaches from the interface, unless pinned: a pinned datapath outlives lbd on purpose
    /// (`remove_pins` takes it down).
    pub fn detach(&mut self) -> Result<()> {
        if let Some((_, Some(link), _)) = self.interface.take() {
            let prog: &mut Xdp = self
                .ebpf
                .program_mut(progs::BALANCER)
                .expect("program loaded")
                .try_into()?;
            prog.detach(link)?;
        }
        Ok(())
    }

    /// What is missing from this lbd's datapath, as the kernel and bpffs say now (empty: it is
    /// whole): its program no longer on the interface, or another one there; pins of its maps
    /// or link removed (`lbd cleanup --force`, an `rm` in /sys/fs/bpf). Cheap enough to ask
    /// every second (one netlink request, a stat per pin).
    pub fn datapath_faults(&self) -> Vec<String> {
        let mut faults = Vec::new();
        if let Some((name, ..)) = &self.interface {
            let ours = self.program().info().map(|i| i.id()).unwrap_or(0);
            match netif::kernel_xdp(name) {
                Ok(None) => faults.push(format!(
                    "detached: no XDP program on {name} (lbd's program {ours} was detached behind its back)"
                )),
                Ok(Some(k)) if k.program_id != ours => faults.push(format!(
                    "replaced: the XDP program on {name} is id {}, not lbd's {ours}",
                    k.program_id
                )),
                Ok(Some(_)) => {}
                Err(e) => faults.push(format!("unknown: {e:#}")),
            }
        }
        if let Some(dir) = &self.pin_dir {
            let mut names: Vec<&str> = maps::pinned().map(|s| s.name).collect();
            if self.interface.is_some() {
                names.push(LINK_PIN);
            }
            let missing: Vec<&str> = names
                .into_iter()
                .filter(|n| !dir.join(n).exists())
                .collect();
            if !missing.is_empty() {
                faults.push(format!(
                    "unpinned: {} missing from {}",
                    missing.join(", "),
                    dir.display()
                ));
            }
        }
        faults
    }

    /// The pin directory, if pinning.
    pub fn pin_dir(&self) -> Option<&Path> {
        self.pin_dir.as_deref()
    }

    pub fn interface(&self) -> Option<(&str, AyaXdpMode)> {
        self.interface.as_ref().map(|(n, _, m)| (n.as_str(), *m))
    }
}

/// A second fd of a connection table, for the batch reads aya does not wrap.
fn dup_hash_fd(m: &Map, name: &str) -> Result<std::os::fd::OwnedFd> {
    match m {
        Map::LruHashMap(d) | Map::HashMap(d) => d
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .with_context(|| format!("duplicating {name}'s fd")),
        _ => bail!("the balancer object's {name} is not a hash map"),
    }
}

/// The errno of a failed map system call.
fn os_error(e: &MapError) -> Option<i32> {
    match e {
        MapError::SyscallError(s) => s.io_error.raw_os_error(),
        _ => None,
    }
}
