//! Connections in view: counts per backend (`backend list`, `stats`, metrics), the list
//! (`conn list`), where a client goes (`lookup`), and the connection tables' fill with its
//! warning event. The tables are read outside the agent's lock (see
//! [`crate::datapath::conntrack`]).
use super::edit::unknown_vip;
use super::queries::vip_filter;
use super::{Agent, State};
use crate::config::Config;
use crate::control::events::Kind;
use crate::control::{ConnCounts, ConnEntry, ConnList, Lookup, Response, TableFill, VipName};
use crate::datapath::conntrack::{ConnState, ConnView, ConntrackReader, CtTable, IdleWindows};
use crate::datapath::{addr_bytes, addr_from_bytes};
use anyhow::{anyhow, Context as _, Result};
use lb_common::{flow_hash, maglev_index, CtValue, FlowKey};
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

/// Above this share of its capacity a connection table is reported (`conntrack_fill` event):
/// past it, LRU evictions of live flows (`ct_lost`) are near.
pub const FILL_WARNING: f64 = 0.8;

/// A count this recent answers `backend list`, `stats` and scrapes instead of a new one: a
/// count reads every entry (`cargo xtask bench conntrack`), and a script polling `backend list`
/// must not keep lbd counting. `drain --wait` polls every 200 ms, so it still sees a backend
/// empty within half a second.
pub const CENSUS_MAX_AGE: std::time::Duration = std::time::Duration::from_millis(250);

/// The idle windows of the configuration.
pub(super) fn idle_windows(cfg: &Config) -> IdleWindows {
    IdleWindows {
        tcp: std::time::Duration::from_secs(cfg.conn_idle_tcp_seconds.into()),
        udp: std::time::Duration::from_secs(cfg.conn_idle_udp_seconds.into()),
    }
}

/// Connections per backend id, and the tables' fill.
#[derive(Debug, Clone, Default)]
pub struct Census {
    pub per_backend: HashMap<u32, ConnCounts>,
    pub fill: TableFill,
}

/// Which VIP and backend the datapath's ids and keys are: taken under the lock, used after.
#[derive(Default)]
struct Names {
    /// Backend id -> (VIP name, backend address).
    backends: HashMap<u32, (String, IpAddr)>,
    /// (address, port in network order, protocol) of a VIP -> its name.
    vips: HashMap<([u8; 16], u16, u8), String>,
}

impl Names {
    fn of(st: &State) -> Names {
        let mut n = Names::default();
        for v in st.lb.vips() {
            let name = VipName::of(&v.config).to_string();
            let (addr, _) = addr_bytes(v.config.address);
            n.vips.insert(
                (addr, v.config.port.to_be(), v.config.protocol.number()),
                name.clone(),
            );
            for b in &v.backends {
                n.backends.insert(b.id, (name.clone(), b.address));
            }
        }
        n
    }

    fn entry(&self, k: &FlowKey, v: &CtValue, c: &ConnView) -> Option<ConnEntry> {
        let vip = self.vips.get(&(k.dst, k.dport, k.proto))?;
        let (_, backend) = self.backends.get(&v.backend)?;
        Some(ConnEntry {
            client: SocketAddr::new(addr_from_bytes(&k.src, k.family), u16::from_be(k.sport)),
            vip: vip.clone(),
            backend: *backend,
            state: c.state.name().to_string(),
            active: c.active,
            last_seen_seconds: c.idle_for.as_secs_f64(),
        })
    }
}

impl Agent {
    /// What the agent needs to read the tables without its lock.
    async fn conntrack_view(&self) -> (ConntrackReader, IdleWindows, Names) {
        let st = self.state.lock().await;
        (
            st.lb.conntrack_reader(),
            idle_windows(&st.config),
            Names::of(&st),
        )
    }

    /// Counts every backend's connections and the tables' fill (and reports a table that
    /// passed [`FILL_WARNING`]).
    pub async fn census(&self) -> Result<Census> {
        if let Some((at, c)) = &*self.census_cache.lock().unwrap_or_else(|e| e.into_inner()) {
            if at.elapsed() < CENSUS_MAX_AGE {
                return Ok(c.clone());
            }
        }
        let (reader, idle, _) = self.conntrack_view().await;
        let census = tokio::task::spawn_blocking(move || count(&reader, &idle))
            .await
            .context("counting connections")??;
        self.note_fill(&census.fill);
        *self.census_cache.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((Instant::now(), census.clone()));
        Ok(census)
    }

    /// Journals a table crossing [`FILL_WARNING`] (once per crossing, and once when it is
    /// back under).
    fn note_fill(&self, fill: &TableFill) {
        let mut above = self.fill_above.lock().unwrap_or_else(|e| e.into_inner());
        for msg in fill_crossings(&mut above, fill) {
            tracing::warn!("{msg}");
            self.events.record(Kind::ConntrackFill, msg);
        }
    }

    /// `conn list`.
    pub(super) async fn conn_list(
        &self,
        vip: Option<&str>,
        backend: Option<&str>,
        limit: Option<u32>,
    ) -> Result<Response> {
        let want = vip_filter(vip)?;
        let backend: Option<IpAddr> = backend
            .map(|b| {
                b.parse()
                    .map_err(|_| anyhow!("--backend: {b:?} is not an IP address; give the backend's address as `backend list` shows it"))
            })
            .transpose()?;
        let (reader, idle, names) = self.conntrack_view().await;
        if let Some(w) = want {
            if !names.vips.values().any(|n| *n == w.to_string()) {
                return Ok(Response::error(unknown_vip(&w)));
            }
        }
        let want = want.map(|w| w.to_string());
        let limit = limit.map_or(usize::MAX, |n| n as usize);
        let list = tokio::task::spawn_blocking(move || -> Result<ConnList> {
            let mut connections = Vec::new();
            let mut matched = 0u64;
            reader.try_connections(&idle, |k, v, c| {
                let Some(e) = names.entry(k, v, &c) else {
                    return;
                };
                if want.as_ref().is_some_and(|w| *w != e.vip)
                    || backend.is_some_and(|b| b != e.backend)
                {
                    return;
                }
                matched += 1;
                if connections.len() < limit {
                    connections.push(e);
                }
            })?;
            connections
                .sort_by(|a, b| (&a.vip, a.backend, a.client).cmp(&(&b.vip, b.backend, b.client)));
            Ok(ConnList {
                connections,
                matched,
            })
        })
        .await
        .context("listing connections")??;
        Ok(Response::ok(list))
    }

    /// `lookup`: the table's choice for a new flow from `client` and what is tracked of it.
    pub(super) async fn lookup(&self, vip: &str, client: &str) -> Result<Response> {
        let name: VipName = vip.parse().map_err(|e: String| anyhow!(e))?;
        let (client_addr, port) = parse_client(client)?;
        let st = self.state.lock().await;
        let Some(v) = st.lb.vips().find(|v| VipName::of(&v.config) == name) else {
            return Ok(Response::error(unknown_vip(&name)));
        };
        if client_addr.is_ipv4() != v.config.address.is_ipv4() {
            return Err(anyhow!(
                "client {client}: not the VIP's address family; give an {} address",
                if v.config.address.is_ipv4() {
                    "IPv4"
                } else {
                    "IPv6"
                }
            ));
        }
        let (src, family) = addr_bytes(client_addr);
        let (dst, _) = addr_bytes(v.config.address);
        let key = |sport: u16| FlowKey {
            src,
            dst,
            sport: sport.to_be(),
            dport: v.config.port.to_be(),
            proto: v.config.protocol.number(),
            family,
            _pad: [0; 2],
        };
        let size = v.table.len() as u32;
        let choice = |sport: u16| -> (u32, Option<IpAddr>) {
            let slot = maglev_index(flow_hash(&key(sport)), size);
            let id = v.table.get(slot as usize).copied().unwrap_or(0);
            let addr = v.backends.iter().find(|b| b.id == id).map(|b| b.address);
            (slot, addr)
        };
        let mut out = Lookup {
            vip: name.to_string(),
            client: client.to_string(),
            new_flow_backend: None,
            slot: None,
            shares_by_port: BTreeMap::new(),
            tracked: Vec::new(),
        };
        let idle = idle_windows(&st.config);
        let names = Names::of(&st);
        if let Some(p) = port {
            let (slot, addr) = choice(p);
            out.slot = Some(slot);
            out.new_flow_backend = addr;
            let k = key(p);
            let now = crate::datapath::conntrack::now_tick();
            let (ct, ct_new) = st.lb.conntrack_entries(&k);
            let tracked = ct
                .map(|v| (CtTable::Established, v))
                .or(ct_new.map(|v| (CtTable::New, v)));
            if let Some((t, v)) = tracked {
                let c = crate::datapath::conntrack::classify(t, &k, &v, now, &idle);
                out.tracked.extend(names.entry(&k, &v, &c));
            }
            return Ok(Response::ok(out));
        }
        let mut per: BTreeMap<IpAddr, u32> = BTreeMap::new();
        for p in 1..=u16::MAX {
            if let (_, Some(a)) = choice(p) {
                *per.entry(a).or_default() += 1;
            }
        }
        out.shares_by_port = per
            .into_iter()
            .map(|(a, n)| {
                (
                    a,
                    crate::control::round::decimals(f64::from(n) / 65535.0, 4),
                )
            })
            .collect();
        let reader = st.lb.conntrack_reader();
        drop(st);
        let vip_name = name.to_string();
        out.tracked = tokio::task::spawn_blocking(move || -> Result<Vec<ConnEntry>> {
            let mut found = Vec::new();
            reader.try_connections(&idle, |k, v, c| {
                if k.src == src && k.family == family {
                    if let Some(e) = names.entry(k, v, &c).filter(|e| e.vip == vip_name) {
                        found.push(e);
                    }
                }
            })?;
            found.sort_by_key(|e| e.client);
            Ok(found)
        })
        .await
        .context("looking up tracked flows")??;
        Ok(Response::ok(out))
    }
}

/// What crossed [`FILL_WARNING`] since the last count (`above`: each table's side then, kept
/// up to date): a message per table that went over it or back under.
fn fill_crossings(above: &mut [bool; 3], fill: &TableFill) -> Vec<String> {
    let mut out = Vec::new();
    let size_keys = ["conntrack_size", "conntrack_size", "conntrack_new_size"];
    for (i, ((name, entries, capacity, ratio), size_key)) in
        fill.tables().into_iter().zip(size_keys).enumerate()
    {
        let now_above = ratio > FILL_WARNING;
        if now_above == above[i] {
            continue;
        }
        above[i] = now_above;
        out.push(if now_above {
            format!(
                "connection table {name} is {:.0}% full ({entries} of {capacity}); once it is full, tracked flows are evicted (ct_lost): raise {size_key}",
                ratio * 100.0
            )
        } else {
            format!(
                "connection table {name} is back under {:.0}% ({entries} of {capacity})",
                FILL_WARNING * 100.0
            )
        });
    }
    out
}

/// `ADDR`, `ADDR:PORT` or `[ADDR]:PORT`.
fn parse_client(s: &str) -> Result<(IpAddr, Option<u16>)> {
    if let Ok(a) = s.parse::<IpAddr>() {
        return Ok((a, None));
    }
    match s.parse::<SocketAddr>() {
        Ok(sa) if sa.port() != 0 => Ok((sa.ip(), Some(sa.port()))),
        _ => Err(anyhow!(
            "client {s:?}: give an address (10.0.0.5, 2001:db8::5) or address and port (10.0.0.5:40000, [2001:db8::5]:40000); port 1 to 65535"
        )),
    }
}

/// Counts connections per backend id (blocking).
fn count(reader: &ConntrackReader, idle: &IdleWindows) -> Result<Census> {
    let started = Instant::now();
    let mut per_backend: HashMap<u32, ConnCounts> = HashMap::new();
    let totals = reader.try_connections(idle, |_, v, c| {
        let e = per_backend.entry(v.backend).or_default();
        match (c.state, c.active) {
            (ConnState::Closing, _) => e.conns_closing += 1,
            (_, true) => e.conns_active += 1,
            (_, false) => e.conns_idle += 1,
        }
    })?;
    Ok(Census {
        per_backend,
        fill: TableFill {
            ct_entries: totals.ct,
            ct4_entries: totals.ct4,
            ct_capacity: reader.capacity.0,
            ct_new_entries: totals.ct_new,
            ct_new_capacity: reader.capacity.1,
            scan_ms: started.elapsed().as_secs_f64() * 1e3,
            syn_filter_probe: totals
                .filter
                .unwrap_or_else(|| reader.filter().fill())
                .probe_share,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_warns_once_per_crossing_and_when_back_under() {
        let fill = |ct, ct_new| TableFill {
            ct_entries: ct,
            ct4_entries: 0,
            ct_capacity: 1000,
            ct_new_entries: ct_new,
            ct_new_capacity: 100,
            scan_ms: 1.0,
            syn_filter_probe: 0.0,
        };
        let mut above = [false; 3];
        assert!(
            fill_crossings(&mut above, &fill(800, 80)).is_empty(),
            "80% is not past 80%"
        );
        let m = fill_crossings(&mut above, &fill(801, 10));
        assert_eq!(m.len(), 1, "{m:?}");
        assert!(
            m[0].starts_with("connection table CT is 80% full (801 of 1000)")
                && m[0].contains("raise conntrack_size"),
            "{m:?}"
        );
        assert!(
            fill_crossings(&mut above, &fill(950, 10)).is_empty(),
            "said once"
        );
        let m = fill_crossings(&mut above, &fill(100, 90));
        assert_eq!(m.len(), 2, "{m:?}");
        assert!(
            m[0].contains("CT is back under 80%") && m[1].contains("CT_NEW is 90% full"),
            "{m:?}"
        );
    }

    #[test]
    fn clients_parse_with_and_without_port() {
        assert_eq!(
            parse_client("10.0.0.5").unwrap(),
            ("10.0.0.5".parse().unwrap(), None)
        );
        assert_eq!(
            parse_client("[2001:db8::5]:40000").unwrap(),
            ("2001:db8::5".parse().unwrap(), Some(40000))
        );
        let e = parse_client("10.0.0.5:0").unwrap_err().to_string();
        assert!(e.contains("port 1 to 65535"), "{e}");
        assert!(parse_client("host:1").is_err());
    }
}
