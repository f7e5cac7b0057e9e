//! The balancer's kernel side as the agent sees it: the loaded XDP program, its maps, and the
//! state that decides what goes into them.
//!
//! `apply` turns a validated configuration into map contents. Everything that can fail
//! (validation, table building, allocation) happens before the first write; writes then go in
//! an order the datapath can never misread: backend entries first, then each new table into a
//! fresh region of the ring pool, then the VIP entry swap that publishes it, and only then the
//! retirement of what is gone.
use crate::{
    config::{Config, Forwarding, XdpMode},
    netif,
    pool::{Region, RingPool},
};
use anyhow::{anyhow, bail, Context as _, Result};
use aya::{
    maps::{Array, HashMap as BpfHashMap, Map, MapData, MapInfo, PerCpuArray, PerCpuValues},
    programs::{
        links::{FdLink, PinnedLink},
        xdp::{XdpLink, XdpLinkId},
        Xdp, XdpMode as AyaXdpMode,
    },
    Ebpf, EbpfLoader,
};
use lb_common::{
    maglev, maps, progs, BackendInfo, BackendStats, Counter, CtValue, FlowKey, FragKey,
    GlobalConfig, NextHop, VipKey, VipMeta, VipStats, BACKEND_F_ACTIVE, BACKEND_F_DOWN,
    CONFIG_F_HAVE_V4_SRC, CONFIG_F_HAVE_V6_SRC, COUNTER_SLOTS, FAMILY_V4, FAMILY_V6,
    FRAG_TABLE_SIZE, MAX_BACKENDS, MAX_VIPS, MODE_L2, PROTO_TCP, PROTO_UDP,
};
use std::{
    collections::{BTreeMap, BTreeSet},
    mem::size_of,
    net::IpAddr,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

/// The balancer program, built by build.rs for the BPF target.
pub static BALANCER_OBJ: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-balancer"));

/// 16-byte address and family tag, as stored in the maps.
pub fn addr_bytes(a: IpAddr) -> ([u8; 16], u8) {
    let mut out = [0u8; 16];
    match a {
        IpAddr::V4(v4) => {
            out[..4].copy_from_slice(&v4.octets());
            (out, FAMILY_V4)
        }
        IpAddr::V6(v6) => (v6.octets(), FAMILY_V6),
    }
}

/// Inverse of [`addr_bytes`].
pub fn addr_from_bytes(b: &[u8; 16], family: u8) -> IpAddr {
    if family == FAMILY_V4 {
        IpAddr::from([b[0], b[1], b[2], b[3]])
    } else {
        IpAddr::from(*b)
    }
}

/// Identity of a VIP in the agent's state.
pub type VipId = (IpAddr, u16, crate::config::Protocol);

fn vip_key(v: &crate::config::Vip) -> VipKey {
    let (addr, family) = addr_bytes(v.address);
    VipKey {
        addr,
        port: v.port.to_be(),
        proto: v.protocol.number(),
        family,
    }
}

/// Sizes of the maps, fixed at load time.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub table_pool: u32,
    pub conntrack_size: u32,
    pub conntrack_new_size: u32,
    /// bpffs directory for pinned maps and link (hitless restarts); `None`: no pinning.
    pub pin_dir: Option<PathBuf>,
}

impl From<&Config> for LoadOptions {
    fn from(c: &Config) -> Self {
        LoadOptions {
            table_pool: c.table_pool,
            conntrack_size: c.conntrack_size,
            conntrack_new_size: c.conntrack_new_size,
            pin_dir: (!c.pin_dir.is_empty()).then(|| PathBuf::from(&c.pin_dir)),
        }
    }
}

/// Name of the pinned XDP link inside the pin directory.
const LINK_PIN: &str = "link";

/// The maps kept across restarts, with the (key size, value size, capacity) this build expects.
fn pinned_maps(o: &LoadOptions) -> [(&'static str, usize, usize, u32); 12] {
    [
        (
            maps::VIPS,
            size_of::<VipKey>(),
            size_of::<VipMeta>(),
            MAX_VIPS,
        ),
        (maps::RING, 4, 4, o.table_pool),
        (maps::BACKENDS, 4, size_of::<BackendInfo>(), MAX_BACKENDS),
        (maps::NEXTHOPS, 4, size_of::<NextHop>(), MAX_BACKENDS),
        (
            maps::CT,
            size_of::<FlowKey>(),
            size_of::<CtValue>(),
            o.conntrack_size,
        ),
        (
            maps::CT_NEW,
            size_of::<FlowKey>(),
            size_of::<CtValue>(),
            o.conntrack_new_size,
        ),
        (
            maps::FRAGS,
            size_of::<FragKey>(),
            size_of::<CtValue>(),
            FRAG_TABLE_SIZE,
        ),
        (maps::CONFIG, 4, size_of::<GlobalConfig>(), 1),
        (maps::VIP_PORTS, 4, 1, 65_536),
        (maps::COUNTERS, 4, 8, COUNTER_SLOTS),
        (maps::VIP_STATS, 4, size_of::<VipStats>(), MAX_VIPS),
        (
            maps::BACKEND_STATS,
            4,
            size_of::<BackendStats>(),
            MAX_BACKENDS,
        ),
    ]
}

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

fn is_bpffs(p: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs fills the zeroed struct; `c` is a valid path string.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC
    }
}

/// Makes sure `dir` exists on a bpffs mount; mounts bpffs on /sys/fs/bpf if that is where it
/// should be and nothing is mounted there yet (fresh machines, private mount namespaces).
fn ensure_pin_dir(dir: &Path) -> Result<()> {
    let parent = dir.parent().unwrap_or(Path::new("/"));
    if !is_bpffs(parent) {
        let sysfs_bpf = Path::new("/sys/fs/bpf");
        if parent == sysfs_bpf {
            let src = std::ffi::CString::new("bpf").unwrap();
            let target = std::ffi::CString::new("/sys/fs/bpf").unwrap();
            // SAFETY: plain mount(2) call with valid NUL-terminated strings.
            let rc = unsafe {
                libc::mount(
                    src.as_ptr(),
                    target.as_ptr(),
                    src.as_ptr(),
                    0,
                    std::ptr::null(),
                )
            };
            if rc != 0 {
                bail!(
                    "pin_dir: /sys/fs/bpf is not a bpffs mount and mounting one failed ({}); run `mount -t bpf bpf /sys/fs/bpf`",
                    std::io::Error::last_os_error()
                );
            }
        } else {
            bail!(
                "pin_dir: {} is not on a bpffs mount; mount one (`mount -t bpf bpf {}`) or use the default {}",
                dir.display(),
                parent.display(),
                crate::config::DEFAULT_PIN_DIR
            );
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating pin_dir {}", dir.display()))
}

/// Refuses pinned maps this build cannot use (another layout or other sizes). One exception:
/// a `COUNTERS` map of another capacity (an older build had one slot per counter) is only
/// statistics, so it is not a reason to drop the connection tables: its capacity is returned
/// and the caller replaces that map alone.
fn check_pins(dir: &Path, o: &LoadOptions) -> Result<Option<u32>> {
    let mut counters = None;
    for (name, k, v, n) in pinned_maps(o) {
        let path = dir.join(name);
        let info = MapInfo::from_pin(&path).with_context(|| {
            format!(
                "reading pinned map {}; remove stale pins with `lbd cleanup`",
                path.display()
            )
        })?;
        let (pk, pv, pn) = (
            info.key_size() as usize,
            info.value_size() as usize,
            info.max_entries(),
        );
        if name == maps::COUNTERS && (pk, pv) == (k, v) && pn != n {
            counters = Some(pn);
            continue;
        }
        if (pk, pv, pn) != (k, v, n) {
            bail!("{}", pin_mismatch(&path, (pk, pv, pn), (k, v, n)));
        }
    }
    Ok(counters)
}

/// Why a pinned map cannot be taken over, and what to do: `pinned` and `needed` are (key size,
/// value size, entries). Other key or value sizes mean another build's map layout (an upgrade
/// that changed a map's value, e.g. the connection tables' values), which no setting brings
/// back; other entries alone may also be other settings. Either way `lbd cleanup` is the way
/// out.
fn pin_mismatch(
    path: &Path,
    (pk, pv, pn): (usize, usize, u32),
    (k, v, n): (usize, usize, u32),
) -> String {
    let what = format!(
        "pinned map {} has key/value size {pk}/{pv} and {pn} entries, this lbd needs {k}/{v} and {n}",
        path.display()
    );
    if (pk, pv) != (k, v) {
        format!(
            "{what}: the pins come from another build with another map layout. \
             Run `lbd cleanup` (drops established flows) and start again"
        )
    } else {
        format!(
            "{what}: the pins come from another build or other map sizes (conntrack_size, conntrack_new_size, table_pool). \
             Restart with the old settings, or run `lbd cleanup` (drops established flows) and start again"
        )
    }
}

/// What [`Balancer::load`] found in the pin directory and what it did about it, for lbd's
/// journal (`lbctl status`): an operator should learn from lbd, not from a packet capture, that
/// the connection tables were lost or that the counters restarted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PinReport {
    /// The pin directory (`None`: pinning is off).
    pub dir: Option<PathBuf>,
    /// Map pins that were there.
    pub found: Vec<String>,
    /// Map pins this build uses that were not there.
    pub missing: Vec<String>,
    /// Map pins removed because they could not be taken over: the rest of an incomplete set.
    pub dropped: Vec<String>,
    /// A pinned XDP link was there: the new program is swapped into it (no detach).
    pub link: bool,
    /// The maps were taken over (every one was there and fits).
    pub resumed: bool,
    /// With `resumed`: VIPs and backends rebuilt from the maps.
    pub restored_vips: usize,
    pub restored_backends: usize,
    /// The pinned `COUNTERS` had this many slots (an older build) and was replaced by a
    /// fresh one: the datapath counters restart from zero, nothing else is lost.
    pub counters_replaced: Option<u32>,
}

/// Looks at the pin directory before loading: which pins are there, whether they can be taken
/// over, and removes those that cannot. A pin set is taken over whole or not at all: a partial
/// set (some map pins removed by hand, or a crash of `lbd cleanup`) cannot be restored
/// consistently (a VIP entry without its table, tables without the port filter), and aya would
/// reuse whatever is pinned without checking it, so the rest is unpinned and every map starts
/// fresh. The pinned link is never removed here: the old program keeps forwarding until the new
/// one is swapped in.
fn survey_pins(dir: &Path, o: &LoadOptions) -> Result<PinReport> {
    let mut r = PinReport {
        dir: Some(dir.to_path_buf()),
        link: dir.join(LINK_PIN).exists(),
        ..PinReport::default()
    };
    for (name, ..) in pinned_maps(o) {
        if dir.join(name).exists() {
            r.found.push(name.to_string());
        } else {
            r.missing.push(name.to_string());
        }
    }
    if r.found.is_empty() {
        return Ok(r);
    }
    if !r.missing.is_empty() {
        for name in &r.found {
            let path = dir.join(name);
            std::fs::remove_file(&path).with_context(|| {
                format!(
                    "removing {} (pins {} are missing, so the rest cannot be taken over)",
                    path.display(),
                    r.missing.join(", ")
                )
            })?;
        }
        r.dropped = r.found.clone();
        tracing::warn!(
            dir = %dir.display(),
            missing = %r.missing.join(","),
            dropped = %r.dropped.join(","),
            "incomplete pin set: removed the rest and creating fresh maps (tracked connections are forgotten)"
        );
        return Ok(r);
    }
    if let Some(slots) = check_pins(dir, o)? {
        let path = dir.join(maps::COUNTERS);
        std::fs::remove_file(&path)
            .with_context(|| format!("replacing {} (another build's layout)", path.display()))?;
        tracing::warn!(
            pinned_slots = slots,
            slots = COUNTER_SLOTS,
            "the pinned COUNTERS map comes from another build: replaced, datapath counters restart from zero (connection tables kept)"
        );
        r.counters_replaced = Some(slots);
    }
    r.resumed = true;
    Ok(r)
}

/// Removes everything lbd pinned in `dir`: detaches the program (the link goes with its last
/// reference) and drops every map, established flows included.
pub fn remove_pins(dir: &Path) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    let link = dir.join(LINK_PIN);
    if link.exists() {
        let pinned = PinnedLink::from_pin(&link).context("opening the pinned link")?;
        drop(pinned.unpin().context("unpinning the link")?);
        removed.push(LINK_PIN.to_string());
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            std::fs::remove_file(e.path())
                .with_context(|| format!("removing {}", e.path().display()))?;
            removed.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    if dir.exists() {
        std::fs::remove_dir(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    Ok(removed)
}

/// One backend of one VIP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendState {
    pub address: IpAddr,
    /// Backend id in the datapath (slot value, stats index).
    pub id: u32,
    pub weight: u32,
    /// Slots this backend owns in the current table.
    pub slots: u32,
}

/// One VIP as applied to the datapath.
#[derive(Debug, Clone)]
pub struct VipState {
    pub config: crate::config::Vip,
    pub vip_id: u32,
    pub generation: u32,
    pub region: Region,
    pub table: Vec<u32>,
    pub backends: Vec<BackendState>,
}

/// What one `apply` changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// (VIP name, slots that changed owner, new generation) for every table that changed.
    pub tables: Vec<(String, usize, u32)>,
    pub vips_added: usize,
    pub vips_removed: usize,
    pub backends_added: usize,
    pub backends_removed: usize,
}

struct Maps {
    vips: BpfHashMap<MapData, VipKey, VipMeta>,
    ring: Array<MapData, u32>,
    /// RING's fd again, for the batch writes aya does not wrap.
    ring_fd: std::os::fd::OwnedFd,
    vip_ports: Array<MapData, u8>,
    backends: Array<MapData, BackendInfo>,
    nexthops: Array<MapData, NextHop>,
    config: Array<MapData, GlobalConfig>,
    counters: PerCpuArray<MapData, u64>,
    vip_stats: PerCpuArray<MapData, VipStats>,
    backend_stats: PerCpuArray<MapData, BackendStats>,
    ct: BpfHashMap<MapData, FlowKey, CtValue>,
    ct_new: BpfHashMap<MapData, FlowKey, CtValue>,
}

/// Writes `slots` into RING from index `offset`. One `BPF_MAP_UPDATE_BATCH` call instead of a
/// syscall per slot: a 65537-slot table took about 65537 syscalls, the largest part of a
/// learning step's cost. Kernels without batch support for arrays (before 5.6) get the
/// per-slot loop.
fn write_ring(maps: &mut Maps, offset: u32, slots: &[u32]) -> Result<()> {
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

/// Slots per `BPF_MAP_UPDATE_BATCH` call: big enough that syscalls cost little (a 65537-slot
/// table is 8 calls), small enough that one call is short and a signal (SIGTERM, or SIGKILL in
/// the chaos tests) is never held off by one write of a million slots.
const BATCH_SLOTS: usize = 8192;

/// `BPF_MAP_UPDATE_BATCH` of `u32` keys and `u32` values (`bpf(2)`) in calls of at most
/// [`BATCH_SLOTS`]; all, or an error.
fn update_batch(fd: &std::os::fd::OwnedFd, keys: &[u32], values: &[u32]) -> std::io::Result<()> {
    use std::os::fd::AsRawFd as _;
    /// The `batch` member of `union bpf_attr` (include/uapi/linux/bpf.h).
    #[repr(C)]
    #[derive(Default)]
    struct BatchAttr {
        in_batch: u64,
        out_batch: u64,
        keys: u64,
        values: u64,
        count: u32,
        map_fd: u32,
        elem_flags: u64,
        flags: u64,
    }
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
        // outlive the call and hold `count` elements of the map's key and value size (4 bytes);
        // the kernel writes only `attr.count` back.
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

fn take(ebpf: &mut Ebpf, name: &str) -> Result<Map> {
    ebpf.take_map(name)
        .ok_or_else(|| anyhow!("the balancer object has no map {name}"))
}

/// The loaded balancer and everything the agent knows about what it put in the maps.
pub struct Balancer {
    ebpf: Ebpf,
    maps: Maps,
    pool: RingPool,
    vips: BTreeMap<VipId, VipState>,
    used_backend_ids: BTreeSet<u32>,
    next_backend_id: u32,
    used_vip_ids: BTreeSet<u32>,
    interface: Option<(String, Option<XdpLinkId>, AyaXdpMode)>,
    pin_dir: Option<PathBuf>,
    /// Whether the maps were found pinned (a restart or an upgrade) rather than created.
    resumed: bool,
    /// The program's rare events (aya-log), for the agent to forward to its log.
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    /// `drop_fib` as [`Balancer::heal_next_hops`] last saw it.
    seen_drop_fib: u64,
    /// What `load` found pinned.
    pins: PinReport,
    /// Where `apply` notes the table it is writing, so that the next lbd can tell whether a
    /// crash cut a write short (see [`crate::events`]).
    journal: Option<std::sync::Arc<crate::events::Journal>>,
}

impl Balancer {
    /// Loads the program and creates its maps (verifier included); nothing is attached yet.
    /// With a pin directory that already holds maps (a restart or an upgrade), the maps are
    /// reused, connection tables and counters included, and the agent's view of them restored.
    pub fn load(opts: LoadOptions) -> Result<Self> {
        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries(maps::RING, opts.table_pool)
            .map_max_entries(maps::CT, opts.conntrack_size)
            .map_max_entries(maps::CT_NEW, opts.conntrack_new_size);
        let mut pins = PinReport::default();
        if let Some(dir) = &opts.pin_dir {
            ensure_pin_dir(dir)?;
            pins = survey_pins(dir, &opts)?;
            for (name, ..) in pinned_maps(&opts) {
                loader.map_pin_path(name, dir.join(name));
            }
        }
        let mut ebpf = loader
            .load(BALANCER_OBJ)
            .context("loading the balancer object")?;
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
            ct: BpfHashMap::try_from(take(&mut ebpf, maps::CT)?)?,
            ct_new: BpfHashMap::try_from(take(&mut ebpf, maps::CT_NEW)?)?,
        };
        let mut lb = Balancer {
            ebpf,
            maps,
            pool: RingPool::new(opts.table_pool),
            vips: BTreeMap::new(),
            used_backend_ids: BTreeSet::new(),
            next_backend_id: 1,
            used_vip_ids: BTreeSet::new(),
            interface: None,
            pin_dir: opts.pin_dir.clone(),
            resumed: pins.resumed,
            logger,
            seen_drop_fib: 0,
            pins,
            journal: None,
        };
        if lb.resumed {
            lb.restore()
                .context("restoring state from the pinned maps")?;
            lb.pins.restored_vips = lb.vips.len();
            lb.pins.restored_backends = lb.used_backend_ids.len();
        }
        Ok(lb)
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

    /// Lets `apply` note every table write in lbd's run-state file before it starts and after
    /// it is published.
    pub fn set_journal(&mut self, journal: std::sync::Arc<crate::events::Journal>) {
        self.journal = Some(journal);
    }

    /// Rebuilds the agent's view (VIP ids, backend ids, table regions, tables) from the maps,
    /// so that applying the same configuration changes nothing and no flow moves.
    fn restore(&mut self) -> Result<()> {
        let mut by_vip: BTreeMap<u32, Vec<(u32, IpAddr)>> = BTreeMap::new();
        for id in 1..MAX_BACKENDS {
            let b = self.maps.backends.get(&id, 0)?;
            if b.flags & BACKEND_F_ACTIVE != 0 {
                by_vip
                    .entry(b.vip_id)
                    .or_default()
                    .push((id, addr_from_bytes(&b.addr, b.family)));
                self.used_backend_ids.insert(id);
                self.next_backend_id = if id + 1 >= MAX_BACKENDS { 1 } else { id + 1 };
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
            let backends: Vec<BackendState> = by_vip
                .remove(&meta.vip_id)
                .unwrap_or_default()
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
        Ok(())
    }

    /// The loaded program (for BPF_PROG_TEST_RUN).
    pub fn program(&self) -> &Xdp {
        self.ebpf
            .program(progs::BALANCER)
            .and_then(|p| <&Xdp>::try_from(p).ok())
            .expect("program loaded in Balancer::load")
    }

    /// Attaches to `interface` and enables forwarding on it (`bpf_fib_lookup` requires it).
    ///
    /// With pinning, a link already pinned by a previous lbd is updated in place to this
    /// program: the kernel swaps programs atomically, no packet sees no program. Otherwise the
    /// new link is pinned, so it outlives this process.
    pub fn attach(&mut self, interface: &str, mode: XdpMode) -> Result<AyaXdpMode> {
        netif::ifindex(interface)?;
        netif::enable_forwarding(interface)?;
        let prog: &mut Xdp = self
            .ebpf
            .program_mut(progs::BALANCER)
            .expect("program loaded")
            .try_into()?;
        let Some(dir) = &self.pin_dir else {
            let (link, used) = attach_xdp(prog, interface, mode)?;
            self.interface = Some((interface.to_string(), Some(link), used));
            return Ok(used);
        };
        let link_path = dir.join(LINK_PIN);
        if link_path.exists() {
            let used = match mode {
                XdpMode::Generic => AyaXdpMode::Skb,
                _ => AyaXdpMode::Driver,
            };
            let pinned = PinnedLink::from_pin(&link_path).context("opening the pinned XDP link")?;
            let link = XdpLink::try_from(FdLink::from(pinned))
                .context("the pinned link is not an XDP link; run `lbd cleanup`")?;
            prog.attach_to_link(link)
                .context("replacing the running program in the pinned link")?;
            self.interface = Some((interface.to_string(), None, used));
            return Ok(used);
        }
        let (id, used) = attach_xdp(prog, interface, mode)?;
        let link = prog.take_link(id)?;
        let fd_link = FdLink::try_from(link).context(
            "pinning needs a bpf_link XDP attachment (Linux 5.9+); set pin_dir = \"\" to run without",
        )?;
        fd_link
            .pin(&link_path)
            .with_context(|| format!("pinning the link at {}", link_path.display()))?;
        self.interface = Some((interface.to_string(), None, used));
        Ok(used)
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

    /// The pin directory, if pinning.
    pub fn pin_dir(&self) -> Option<&Path> {
        self.pin_dir.as_deref()
    }

    pub fn interface(&self) -> Option<(&str, AyaXdpMode)> {
        self.interface.as_ref().map(|(n, _, m)| (n.as_str(), *m))
    }

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
            let table = crate::tables::build(&mg, v.table_size)
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
                if let Some(j) = &self.journal {
                    j.table_write(Some(crate::events::TableWrite {
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
                if let Some(j) = &self.journal {
                    j.table_write(None);
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

    pub fn vip_stats(&self, vip_id: u32) -> Result<VipStats> {
        let mut s = VipStats::default();
        for v in self.maps.vip_stats.get(&vip_id, 0)?.iter() {
            s.add(v);
        }
        Ok(s)
    }

    pub fn backend_stats(&self, id: u32) -> Result<BackendStats> {
        let mut s = BackendStats::default();
        for v in self.maps.backend_stats.get(&id, 0)?.iter() {
            s.add(v);
        }
        Ok(s)
    }

    /// Entries in the established and new-flow tables (walks the maps: not for hot loops).
    pub fn conntrack_len(&self) -> (usize, usize) {
        (self.maps.ct.keys().count(), self.maps.ct_new.keys().count())
    }

    /// The backend id a tracked flow is pinned to, if any.
    pub fn tracked_backend(&self, key: &FlowKey) -> Option<u32> {
        self.maps
            .ct
            .get(key, 0)
            .or_else(|_| self.maps.ct_new.get(key, 0))
            .ok()
            .map(|v| v.backend)
    }

    /// A flow's entries in the established table (`CT`) and the new-flow table (`CT_NEW`), as
    /// stored (backend, hash, SYN sequence number in network order, `CT_F_*` flags).
    pub fn conntrack_entries(&self, key: &FlowKey) -> (Option<CtValue>, Option<CtValue>) {
        (
            self.maps.ct.get(key, 0).ok(),
            self.maps.ct_new.get(key, 0).ok(),
        )
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

/// `VIP_PORTS` bits per destination port for a set of VIPs.
fn port_bits<'a>(vips: impl Iterator<Item = &'a crate::config::Vip>) -> BTreeMap<u16, u8> {
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

fn nr_cpus() -> Result<usize> {
    aya::util::nr_cpus().map_err(|(what, e)| anyhow!("{what}: {e}"))
}

fn alloc_backend_id(used: &mut BTreeSet<u32>, next: &mut u32) -> Result<u32> {
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

/// Forwarding mode as configured, for status output.
pub fn forwarding_name(f: Forwarding) -> &'static str {
    match f {
        Forwarding::Ipip => "ipip",
        Forwarding::L2 => "l2",
    }
}

/// The benchmark harness (restore-then-tail-call) and the trivial `XDP_TX` program it is
/// compared with; used by `cargo xtask bench datapath`.
pub static BENCH_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-bench"));

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_mismatch_names_cleanup() {
        let ct = Path::new("/sys/fs/bpf/lb/CT");
        let kv = (size_of::<FlowKey>(), size_of::<CtValue>());
        // The connection tables' values before they carried the SYN's sequence number.
        let old = pin_mismatch(ct, (kv.0, 8, 262_144), (kv.0, kv.1, 262_144));
        assert_eq!(
            old,
            format!(
                "pinned map /sys/fs/bpf/lb/CT has key/value size {}/8 and 262144 entries, this lbd needs {}/{} and 262144: \
                 the pins come from another build with another map layout. \
                 Run `lbd cleanup` (drops established flows) and start again",
                kv.0, kv.0, kv.1
            )
        );
        let sizes = pin_mismatch(ct, (kv.0, kv.1, 4096), (kv.0, kv.1, 8192));
        assert!(sizes.contains("other map sizes (conntrack_size"), "{sizes}");
        assert!(sizes.contains("Restart with the old settings"), "{sizes}");
        for m in [old, sizes] {
            assert!(m.contains("run `lbd cleanup`") || m.contains("Run `lbd cleanup`"));
        }
    }
}
