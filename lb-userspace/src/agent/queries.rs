//! Answers to the read-only requests (`vip list`, `backend list`, `stats`, `status`), built
//! from the datapath and configuration under the agent's lock.
use super::edit::unknown_vip;
use super::health::{configured, health_share, readmission, shown_health};
use super::learning::learning_weight;
use super::{vip_id, xdp_mode_name, Agent, State};
use crate::config;
use crate::control::{
    BackendEntry, BackendStatsEntry, Response, StatsSnapshot, Status, VipEntry, VipName,
    VipStatsEntry, VipStatus,
};
use crate::datapath::VipId;
use crate::learning::{table_weight, WEIGHT_SCALE};
use anyhow::{anyhow, Context as _, Result};
use std::time::{SystemTime, UNIX_EPOCH};

impl Agent {
    pub(super) async fn vip_list(&self) -> Result<Vec<VipEntry>> {
        let st = self.state.lock().await;
        Ok(st
            .lb
            .vips()
            .map(|v| VipEntry {
                vip: VipName::of(&v.config).to_string(),
                address: v.config.address,
                port: v.config.port,
                protocol: v.config.protocol,
                forwarding: v.config.forwarding,
                table_size: v.config.table_size,
                generation: v.generation,
                datapath_generation: st.lb.vip_meta(&v.config).map(|m| m.generation),
                backends: v.config.backends.len(),
                drained: v.config.backends.iter().filter(|b| b.drained).count(),
            })
            .collect())
    }

    pub(super) async fn backend_list(&self, vip: Option<&str>) -> Result<Response> {
        let want = vip_filter(vip)?;
        // Counted before the lock is taken: a scan of a full table takes a while.
        let census = self.census().await?;
        let st = self.state.lock().await;
        if let Some(w) = want {
            if !st.lb.vips().any(|v| VipName::of(&v.config) == w) {
                return Ok(Response::error(unknown_vip(&w)));
            }
        }
        let mut out = Vec::new();
        for v in st.lb.vips() {
            let name = VipName::of(&v.config);
            if want.is_some_and(|w| w != name) {
                continue;
            }
            let vid = vip_id(&v.config);
            for (b, applied) in v.backends.iter().zip(&v.config.backends) {
                let cfg = configured(&st.config, vid, b.address).unwrap_or(applied);
                let (up, shown, h) = shown_health(&st.health, vid, cfg);
                out.push(BackendEntry {
                    vip: name.to_string(),
                    address: b.address,
                    weight: cfg.weight,
                    drained: cfg.drained,
                    effective_weight: shown_weights(&st, vid, cfg, b.weight).0,
                    table_weight: b.weight,
                    slots: b.slots,
                    up,
                    health: shown.to_string(),
                    last_probe_ms: h.and_then(|h| h.last_probe_ms),
                    last_error: h.and_then(|h| h.last_error.clone()),
                    readmission: readmission(h),
                    carried: st.learned.get(&(vid, b.address)).is_some_and(|l| l.carried),
                    id: b.id,
                    conns: census.per_backend.get(&b.id).copied().unwrap_or_default(),
                });
            }
        }
        Ok(Response::ok(out))
    }

    /// Statistics of every VIP and backend and every datapath counter, at one instant.
    pub async fn snapshot(&self) -> Result<StatsSnapshot> {
        // Tables that cannot be read leave the counts at 0 and `conntrack` null: the
        // statistics are still worth having.
        let census = match self.census().await {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!("counting connections: {e:#}");
                None
            }
        };
        let st = self.state.lock().await;
        let mut vips = Vec::new();
        for v in st.lb.vips() {
            // Each backend's statistics read once: the VIP's packets and bytes are their sum.
            let current = st.lb.backends_stats(v)?;
            let s = st.lb.vip_stats_with(v.vip_id, &current)?;
            let mut backends = Vec::new();
            let vid = vip_id(&v.config);
            for ((b, applied), bs) in v.backends.iter().zip(&v.config.backends).zip(&current) {
                let cfg = configured(&st.config, vid, b.address).unwrap_or(applied);
                let (up, shown, h) = shown_health(&st.health, vid, cfg);
                let (effective_weight, learned_weight) = shown_weights(&st, vid, cfg, b.weight);
                backends.push(BackendStatsEntry {
                    address: b.address,
                    weight: cfg.weight,
                    effective_weight,
                    table_weight: b.weight,
                    drained: cfg.drained,
                    up,
                    health: shown.to_string(),
                    packets: bs.packets,
                    bytes: bs.bytes,
                    new_flows: bs.new_flows,
                    syn_retries: bs.syn_retries,
                    client_rsts: bs.client_rsts,
                    resteered: bs.resteered,
                    learned_weight,
                    fit_r2: st
                        .learning
                        .get(&vid)
                        .and_then(|l| l.backends.get(&b.address))
                        .and_then(|lb| lb.last.as_ref())
                        .and_then(|d| d.fit)
                        .map(|f| f.r2),
                    rates: None,
                    readmission: readmission(h),
                    conns: census
                        .as_ref()
                        .and_then(|c| c.per_backend.get(&b.id).copied())
                        .unwrap_or_default(),
                });
            }
            vips.push(VipStatsEntry {
                vip: VipName::of(&v.config).to_string(),
                packets: s.packets,
                bytes: s.bytes,
                new_flows: s.new_flows,
                no_backend: s.no_backend,
                generation: v.generation,
                rates: None,
                backends,
            });
        }
        let counters = st
            .lb
            .counters()?
            .into_iter()
            .map(|(c, n)| (c.name().to_string(), n))
            .collect();
        Ok(StatsSnapshot {
            timestamp_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            vips,
            counters,
            model_refusals: st.refusals.clone(),
            datapath_faults: st.lb.datapath_faults(),
            interval_seconds: None,
            conntrack: census.map(|c| c.fill),
        })
    }

    pub(super) async fn status(&self) -> Result<Status> {
        let st = self.state.lock().await;
        // The mode the kernel reports now (as `bpftool net show` does), never the one asked for.
        let (interface, mode) = match st.lb.interface() {
            Some((name, _)) => (
                name.to_string(),
                match crate::datapath::netif::kernel_xdp(name) {
                    Ok(Some(k)) => xdp_mode_name(k.mode),
                    Ok(None) => "detached",
                    Err(_) => "unknown",
                },
            ),
            None => (st.config.interface.clone(), "detached"),
        };
        let program_id = st
            .lb
            .program()
            .info()
            .context("reading the balancer program's id")?
            .id();
        Ok(Status {
            version: env!("CARGO_PKG_VERSION").to_string(),
            pid: std::process::id(),
            interface,
            xdp_mode: mode.to_string(),
            program_id,
            datapath_faults: st.lb.datapath_faults(),
            uptime_seconds: self.started.elapsed().as_secs(),
            config_file: self.config_path.display().to_string(),
            control_socket: st.config.control_socket.display().to_string(),
            metrics_listen: st.config.metrics_listen.to_string(),
            events: self.events.recent(),
            apply: st.timing.clone(),
            fleet: self.fleet_status(),
            bgp: self.bgp_status(st.config.bgp.is_some()),
            vips: st
                .lb
                .vips()
                .map(|v| VipStatus {
                    vip: VipName::of(&v.config).to_string(),
                    generation: v.generation,
                    table_size: v.config.table_size,
                    backends: v.backends.len(),
                    serving_backends: v.backends.iter().filter(|b| b.weight > 0).count(),
                })
                .collect(),
        })
    }
}

/// A backend's effective and learned weights as operators see them: in configured units
/// whether or not the VIP learns (the table's units, configured x 100, stay internal and are
/// shown apart as `table_weight`), so turning learning on changes no dashboard's scale.
/// `table` is the weight the backend has in the applied table.
fn shown_weights(st: &State, vid: VipId, b: &config::Backend, table: u32) -> (f64, Option<f64>) {
    if !st.learning.contains_key(&vid) {
        // While a backend of the VIP ramps, the table is in hundredths: show the share of the
        // configured weight the backend is allowed instead.
        let effective = if table == 0 {
            0.0
        } else {
            f64::from(b.weight) * health_share(&st.health, vid, b.address).min(1.0)
        };
        return (effective, None);
    }
    let scale = f64::from(WEIGHT_SCALE);
    let effective = f64::from(learning_weight(b, vid, &st.health, &st.learned)) / scale;
    let learned = st
        .learned
        .get(&(vid, b.address))
        .map_or_else(|| table_weight(b.weight), |l| l.weight);
    (effective, Some(f64::from(learned) / scale))
}

/// The VIP a listing is limited to (`lbctl ... [VIP]`), if one is named.
pub(super) fn vip_filter(vip: Option<&str>) -> Result<Option<VipName>> {
    vip.map(|v| v.parse::<VipName>().map_err(|e| anyhow!(e)))
        .transpose()
}
