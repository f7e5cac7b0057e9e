//! The balancer's kernel side as the agent sees it: the loaded XDP program, its maps, and the
//! state that decides what goes into them.
//!
//! `apply` turns a validated configuration into map contents. Everything that can fail
//! (validation, table building, allocation) happens before the first write; writes then go in
//! an order the datapath can never misread: backend entries first, then each new table into a
//! fresh region of the ring pool, then the VIP entry swap that publishes it, and only then the
//! retirement of what is gone.
mod apply;
mod bpf_maps;
pub mod conntrack;
pub mod ct_filter;
pub mod decap;
mod load;
pub mod netif;
mod pins;
pub mod pool;
pub mod tables;

pub use load::attach_xdp;
pub use pins::{check_pin_dir, remove_pins, PinReport};

use crate::config::Config;
use aya::{
    programs::{xdp::XdpLinkId, XdpMode as AyaXdpMode},
    Ebpf,
};
use bpf_maps::Maps;
use lb_common::{VipKey, FAMILY_V4, FAMILY_V6};
use pool::{Region, RingPool};
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::PathBuf,
};

/// The balancer program, built by build.rs for the BPF target.
pub static BALANCER_OBJ: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-balancer"));

/// `object` (one of the embedded programs, named `name`), or an error if this build holds
/// none: without the `ebpf` feature (xtask's build) build.rs leaves the objects empty.
pub fn try_embedded(object: &'static [u8], name: &str) -> anyhow::Result<&'static [u8]> {
    if object.is_empty() {
        anyhow::bail!(
            "this build of lb-userspace has no {name} program: it was built without its `ebpf` \
             feature (build it with default features, e.g. `cargo build -p lb-userspace`)"
        );
    }
    Ok(object)
}

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

/// A table write in progress: the VIP, the generation being written and where.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TableWrite {
    pub vip: String,
    pub generation: u32,
    pub slots: u32,
    pub offset: u32,
}

/// Where [`Balancer::apply`] announces its table writes (see [`Balancer::on_table_write`]).
type TableWriteHook = Box<dyn Fn(Option<TableWrite>) + Send + Sync>;

/// The loaded balancer and everything the agent knows about what it put in the maps.
pub struct Balancer {
    ebpf: Ebpf,
    maps: Maps,
    pool: RingPool,
    vips: BTreeMap<VipId, VipState>,
    used_backend_ids: BTreeSet<u32>,
    next_backend_id: u32,
    used_vip_ids: BTreeSet<u32>,
    /// Where VIP id allocation goes on (round-robin, like backend ids).
    next_vip_id: u32,
    interface: Option<(String, Option<XdpLinkId>, AyaXdpMode)>,
    pin_dir: Option<PathBuf>,
    /// Whether the maps were found pinned (a restart or an upgrade) rather than created.
    resumed: bool,
    /// The program's rare events (aya-log), for the agent to forward to its log.
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    /// `drop_fib` as [`Balancer::heal_next_hops`] last saw it.
    seen_drop_fib: u64,
    /// The managed neighbour entries asked for, so that an apply asks only for new backends.
    next_hops: netif::NextHops,
    /// What `load` found pinned.
    pins: PinReport,
    /// Told of the table `apply` is writing, so that the next lbd can tell whether a crash cut
    /// a write short (the agent passes its journal's note).
    table_writes: Option<TableWriteHook>,
    /// The mode of the pinned link `attach` replaced because `xdp_mode` asked for another.
    mode_changed: Option<AyaXdpMode>,
}

impl Balancer {}

/// The benchmark harness (restore-then-tail-call) and the trivial `XDP_TX` program it is
/// compared with; used by `cargo xtask bench datapath`.
pub static BENCH_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-bench"));
