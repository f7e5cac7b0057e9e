//! The backend-side decapsulation program: lets a backend receive IP-in-IP from the balancer
//! without a tunnel device.
use super::{addr_bytes, attach_xdp};
use crate::config::XdpMode;
use anyhow::{anyhow, Context as _, Result};
use aya::{
    maps::{HashMap as BpfHashMap, MapData, PerCpuArray},
    programs::{Xdp, XdpMode as AyaXdpMode},
    Ebpf,
};
use lb_common::{maps, progs, DecapCounter, DecapKey, DECAP_KIND_LOCAL, DECAP_KIND_VIP};
use std::net::IpAddr;

pub static DECAP_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-decap"));

pub struct Decap {
    ebpf: Ebpf,
    addrs: BpfHashMap<MapData, DecapKey, u32>,
    counters: PerCpuArray<MapData, u64>,
}

impl Decap {
    pub fn load() -> Result<Self> {
        let mut ebpf = Ebpf::load(super::try_embedded(DECAP_OBJ, "decap")?)
            .context("loading the decap object")?;
        let prog: &mut Xdp = ebpf
            .program_mut(progs::DECAP)
            .ok_or_else(|| anyhow!("no program {}", progs::DECAP))?
            .try_into()?;
        prog.load()
            .context("the kernel rejected the decap program")?;
        let addrs = BpfHashMap::try_from(
            ebpf.take_map(maps::DECAP_VIPS)
                .ok_or_else(|| anyhow!("no DECAP_VIPS map"))?,
        )?;
        let counters = PerCpuArray::try_from(
            ebpf.take_map(maps::DECAP_COUNTERS)
                .ok_or_else(|| anyhow!("no DECAP_COUNTERS map"))?,
        )?;
        Ok(Decap {
            ebpf,
            addrs,
            counters,
        })
    }

    fn add(&mut self, a: IpAddr, kind: u32) -> Result<()> {
        let (addr, family) = addr_bytes(a);
        self.addrs.insert(
            DecapKey {
                addr,
                family,
                _pad: [0; 3],
            },
            kind,
            0,
        )?;
        Ok(())
    }

    /// A VIP this host serves: inner packets to it are decapsulated.
    pub fn add_vip(&mut self, a: IpAddr) -> Result<()> {
        self.add(a, DECAP_KIND_VIP)
    }

    /// An address of this host: outer packets must be addressed to one of these.
    pub fn add_local(&mut self, a: IpAddr) -> Result<()> {
        self.add(a, DECAP_KIND_LOCAL)
    }

    pub fn program(&self) -> &Xdp {
        self.ebpf
            .program(progs::DECAP)
            .and_then(|p| <&Xdp>::try_from(p).ok())
            .expect("loaded")
    }

    pub fn attach(&mut self, interface: &str, mode: XdpMode) -> Result<AyaXdpMode> {
        super::netif::ifindex(interface)?;
        let prog: &mut Xdp = self
            .ebpf
            .program_mut(progs::DECAP)
            .expect("loaded")
            .try_into()?;
        let (_, used) = attach_xdp(prog, interface, mode)?;
        Ok(used)
    }

    pub fn counters(&self) -> Result<Vec<(DecapCounter, u64)>> {
        DecapCounter::ALL
            .iter()
            .map(|c| Ok((*c, self.counters.get(&(*c as u32), 0)?.iter().sum())))
            .collect()
    }
}
