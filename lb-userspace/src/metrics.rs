//! Prometheus metrics: `GET /metrics` on `metrics_listen` (default 127.0.0.1:9469), in the text
//! exposition format, rendered from the same [`StatsSnapshot`] that `lbctl stats --json`
//! prints, so the two always agree.
//!
//! The HTTP side is deliberately tiny: HTTP/1.x, one request per connection, `GET` or `HEAD`.
use crate::{
    agent::Agent,
    control::{BgpStatus, StatsSnapshot},
};
use anyhow::{Context as _, Result};
use std::{fmt::Write as _, net::SocketAddr, sync::Arc, time::Duration};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};
use tracing::{debug, warn};

/// Longest request head accepted.
const MAX_HEAD: usize = 8192;
/// How long a client may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Binds the metrics address (before the datapath is touched, so a busy port fails early).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| {
        format!("metrics_listen: cannot listen on {addr}; choose a free address and port")
    })
}

/// Serves scrapes until the task is dropped.
pub async fn serve(listener: TcpListener, agent: Arc<Agent>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let agent = agent.clone();
                tokio::spawn(async move {
                    if let Err(e) = serve_one(stream, agent).await {
                        debug!(%peer, "metrics request failed: {e:#}");
                    }
                });
            }
            Err(e) => {
                warn!("metrics: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn serve_one(mut stream: TcpStream, agent: Arc<Agent>) -> Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    let read = async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
            if head.len() > MAX_HEAD {
                break;
            }
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(READ_TIMEOUT, read)
        .await
        .context("request timed out")??;
    let text = String::from_utf8_lossy(&head);
    let mut parts = text.lines().next().unwrap_or("").split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, ctype, body) = if head.len() > MAX_HEAD {
        (
            "431 Request Header Fields Too Large",
            "text/plain",
            String::new(),
        )
    } else if method != "GET" && method != "HEAD" {
        (
            "405 Method Not Allowed",
            "text/plain",
            "use GET /metrics\n".into(),
        )
    } else if path == "/metrics" {
        match agent.snapshot().await {
            Ok(s) => (
                "200 OK",
                "text/plain; version=0.0.4; charset=utf-8",
                render(&s)
                    + &render_events(&agent.events().counts())
                    + &render_fleet(agent.fleet_status().as_ref())
                    + &agent
                        .node_status()
                        .await
                        .map(|b| render_bgp(&b))
                        .unwrap_or_default(),
            ),
            Err(e) => (
                "500 Internal Server Error",
                "text/plain",
                format!("reading the datapath's statistics failed: {e:#}\n"),
            ),
        }
    } else {
        (
            "404 Not Found",
            "text/plain",
            "lbd serves metrics at /metrics\n".into(),
        )
    };
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if method != "HEAD" {
        out.extend_from_slice(body.as_bytes());
    }
    stream.write_all(&out).await?;
    stream.shutdown().await?;
    Ok(())
}

/// Escapes a label value (backslash, double quote, newline).
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

struct Family<'a> {
    out: &'a mut String,
}

impl Family<'_> {
    fn header(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }
    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", label(v));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }
}

/// Fleet mode's families (none for a single-node lbd).
pub fn render_fleet(fleet: Option<&crate::control::FleetStatus>) -> String {
    let mut out = String::new();
    let Some(fl) = fleet else { return out };
    let mut f = Family { out: &mut out };
    f.header(
        "lb_fleet_store_connected",
        "gauge",
        "1 while the last read of the fleet's etcd succeeded; 0 while unreachable (forwarding goes on with lb_fleet_applied_revision).",
    );
    f.sample(
        "lb_fleet_store_connected",
        &[],
        u64::from(fl.store_connected),
    );
    f.header(
        "lb_fleet_applied_revision",
        "gauge",
        "The etcd revision of the fleet configuration this node applies.",
    );
    f.sample("lb_fleet_applied_revision", &[], fl.applied_revision);
    f.header(
        "lb_fleet_leader",
        "gauge",
        "1 while this node is the fleet's elected leader (runs health checks and learning, publishes the weights).",
    );
    f.sample("lb_fleet_leader", &[], u64::from(fl.role == "leader"));
    f.header(
        "lb_fleet_refused",
        "gauge",
        "1 while the newest revision in the store is refused (bad data; lbctl status says which key) or the store is unreachable.",
    );
    f.sample("lb_fleet_refused", &[], u64::from(fl.last_error.is_some()));
    out
}

/// The metric families, in the text exposition format (names in the README, "Observe").
pub fn render(s: &StatsSnapshot) -> String {
    let mut out = String::new();
    let mut f = Family { out: &mut out };

    f.header(
        "lb_up",
        "gauge",
        "1 while lbd runs and its datapath answers.",
    );
    f.sample("lb_up", &[], 1);
    f.header(
        "lb_datapath_intact",
        "gauge",
        "1 while lbd's program is the one on its interface and every pin is in place; 0 once detached, replaced or unpinned behind its back (lbctl status says which).",
    );
    f.sample(
        "lb_datapath_intact",
        &[],
        u64::from(s.datapath_faults.is_empty()),
    );
    f.header("lb_uptime_seconds", "gauge", "Seconds since lbd started.");
    f.sample("lb_uptime_seconds", &[], s.uptime_ms as f64 / 1000.0);
    vip_families(&mut f, s);
    backend_families(&mut f, s);
    conntrack_families(&mut f, s);
    health_family(&mut f, s);
    readmission_family(&mut f, s);
    learning_families(&mut f, s);
    datapath_family(&mut f, s);
    out
}

/// With `[bgp]`: the node's sessions, announcements and drain.
pub fn render_bgp(b: &BgpStatus) -> String {
    let mut out = String::new();
    let mut f = Family { out: &mut out };
    f.header(
        "lb_bgp_session_established",
        "gauge",
        "1 while the BGP session with the peer is established, else 0.",
    );
    for s in &b.sessions {
        f.sample(
            "lb_bgp_session_established",
            &[("peer", &s.peer)],
            u64::from(s.established),
        );
    }
    f.header(
        "lb_bgp_announced",
        "gauge",
        "1 for each VIP prefix this node announces, 0 for each it withholds (status.bgp.withheld says why).",
    );
    for p in &b.announced {
        f.sample("lb_bgp_announced", &[("prefix", p)], 1);
    }
    for w in &b.withheld {
        f.sample(
            "lb_bgp_announced",
            &[("prefix", &w.prefix), ("reason", &w.reason)],
            0,
        );
    }
    f.header(
        "lb_node_state",
        "gauge",
        "1 for the node's state (serving, draining, drained), 0 for the other two.",
    );
    for state in ["serving", "draining", "drained"] {
        f.sample(
            "lb_node_state",
            &[("state", state)],
            u64::from(b.node == state),
        );
    }
    out
}

/// Per-VIP counters and gauges, one sample per VIP.
fn vip_families(f: &mut Family<'_>, s: &StatsSnapshot) {
    type VipField = fn(&crate::control::VipStatsEntry) -> u64;
    let vip_families: [(&str, &str, &str, VipField); 5] = [
        (
            "lb_vip_packets_total",
            "counter",
            "Packets forwarded to a backend of the VIP.",
            |v| v.packets,
        ),
        (
            "lb_vip_bytes_total",
            "counter",
            "Bytes (whole frames, as received) forwarded for the VIP.",
            |v| v.bytes,
        ),
        (
            "lb_vip_new_flows_total",
            "counter",
            "Flows of the VIP that got a backend from the Maglev table.",
            |v| v.new_flows,
        ),
        (
            "lb_vip_no_backend_packets_total",
            "counter",
            "Packets dropped because the VIP had no backend with weight.",
            |v| v.no_backend,
        ),
        (
            "lb_vip_table_generation",
            "gauge",
            "Generation of the VIP's Maglev table (bumped on every change).",
            |v| v.generation as u64,
        ),
    ];
    for (name, kind, help, get) in vip_families {
        f.header(name, kind, help);
        for v in &s.vips {
            f.sample(name, &[("vip", &v.vip)], get(v));
        }
    }
    let name = "lb_vip_serving_backends";
    f.header(
        name,
        "gauge",
        "Backends of the VIP with weight in its table (not drained, not down); 0: its traffic is dropped.",
    );
    for v in &s.vips {
        let serving = v.backends.iter().filter(|b| b.table_weight > 0).count();
        f.sample(name, &[("vip", &v.vip)], serving);
    }
}

/// Per-backend counters and gauges, one sample per backend of each VIP.
fn backend_families(f: &mut Family<'_>, s: &StatsSnapshot) {
    type BackendField = fn(&crate::control::BackendStatsEntry) -> u64;
    let backend_families: [(&str, &str, &str, BackendField); 10] = [
        (
            "lb_backend_table_weight",
            "gauge",
            "Weight of the backend in the VIP's Maglev table, in the table's units (configured x 100 with [vip.learning]); only ratios within a VIP mean something.",
            |b| u64::from(b.table_weight),
        ),
        (
            "lb_backend_packets_total",
            "counter",
            "Packets forwarded to the backend.",
            |b| b.packets,
        ),
        (
            "lb_backend_bytes_total",
            "counter",
            "Bytes (whole frames, as received) forwarded to the backend.",
            |b| b.bytes,
        ),
        (
            "lb_backend_new_flows_total",
            "counter",
            "Flows whose first packet chose the backend.",
            |b| b.new_flows,
        ),
        (
            "lb_backend_syn_retries_total",
            "counter",
            "SYNs retried by clients on flows of the backend (nobody answered).",
            |b| b.syn_retries,
        ),
        (
            "lb_backend_client_rsts_total",
            "counter",
            "RSTs sent by clients on flows of the backend.",
            |b| b.client_rsts,
        ),
        (
            "lb_backend_resteered_total",
            "counter",
            "Flows moved to the backend because their previous backend was down.",
            |b| b.resteered,
        ),
        (
            "lb_backend_weight",
            "gauge",
            "Configured weight (kept while drained).",
            |b| b.weight as u64,
        ),
        (
            "lb_backend_drained",
            "gauge",
            "1 if the backend is drained (no new flows).",
            |b| b.drained as u64,
        ),
        (
            "lb_backend_up",
            "gauge",
            "1 unless health checks say the backend is down or pending (1 for a VIP without health checks).",
            |b| b.up as u64,
        ),
    ];
    for (name, kind, help, get) in backend_families {
        f.header(name, kind, help);
        for v in &s.vips {
            for b in &v.backends {
                let addr = b.address.to_string();
                f.sample(name, &[("vip", &v.vip), ("backend", &addr)], get(b));
            }
        }
    }
    let name = "lb_backend_effective_weight";
    f.header(
        name,
        "gauge",
        "Weight in force, in configured units whether or not the VIP learns (0 while drained or down, a quarter on probation, the learned weight with [vip.learning], fractional).",
    );
    for v in &s.vips {
        for b in &v.backends {
            let addr = b.address.to_string();
            let w = crate::control::round::decimals(b.effective_weight, 3);
            f.sample(name, &[("vip", &v.vip), ("backend", &addr)], w);
        }
    }
}

/// `lb_backend_connections` per state, and the connection tables' fill.
fn conntrack_families(f: &mut Family<'_>, s: &StatsSnapshot) {
    let name = "lb_backend_connections";
    f.header(
        name,
        "gauge",
        "Tracked connections of the backend by state: active (client sent within the idle window, not closed), idle (silent longer), closing (client sent FIN or RST).",
    );
    for v in &s.vips {
        for b in &v.backends {
            let addr = b.address.to_string();
            for (state, n) in [
                ("active", b.conns.conns_active),
                ("idle", b.conns.conns_idle),
                ("closing", b.conns.conns_closing),
            ] {
                f.sample(
                    name,
                    &[("vip", &v.vip), ("backend", &addr), ("state", state)],
                    n,
                );
            }
        }
    }
    let Some(fill) = &s.conntrack else {
        return;
    };
    let name = "lb_conntrack_entries";
    f.header(
        name,
        "gauge",
        "Entries in a connection table (CT4, CT: established IPv4 and IPv6 flows, CT_NEW: flows seen once).",
    );
    let (v4, v6) = fill.established();
    f.sample(name, &[("table", "CT4")], v4);
    f.sample(name, &[("table", "CT")], v6);
    f.sample(name, &[("table", "CT_NEW")], fill.ct_new_entries);
    let name = "lb_conntrack_capacity";
    f.header(
        name,
        "gauge",
        "Capacity of a connection table (conntrack_size, conntrack_new_size).",
    );
    f.sample(name, &[("table", "CT4")], fill.ct_capacity);
    f.sample(name, &[("table", "CT")], fill.ct_capacity);
    f.sample(name, &[("table", "CT_NEW")], fill.ct_new_capacity);
    let name = "lb_conntrack_scan_seconds";
    f.header(
        name,
        "gauge",
        "How long counting the connection tables took at this scrape.",
    );
    f.sample(name, &[], fill.scan_ms / 1e3);
    let name = "lb_conntrack_syn_filter_probe_ratio";
    f.header(
        name,
        "gauge",
        "Share of SYNs on untracked tuples that still look them up in CT (the tracked-flow filter's collisions at the last count).",
    );
    f.sample(name, &[], fill.syn_filter_probe);
}

/// How health-checked backends are let back in: recent ejections, the hold left, the ramp.
fn readmission_family(f: &mut Family<'_>, s: &StatsSnapshot) {
    type Get = fn(&crate::control::BackendStatsEntry) -> f64;
    let families: [(&str, &str, Get); 3] = [
        (
            "lb_backend_ejections",
            "Health-checked backends: ejections (taken down by probes after serving) that still count towards the next hold; 0 after health.ejection_forget_ms without one.",
            |b| f64::from(b.readmission.ejections.unwrap_or(0)),
        ),
        (
            "lb_backend_returns_in_seconds",
            "Health-checked backends: seconds until a backend held out after an ejection may return (0 when not held).",
            |b| b.readmission.returns_in_ms.unwrap_or(0.0) / 1e3,
        ),
        (
            "lb_backend_ramp",
            "Health-checked backends: share of its weight the probes allow, 0 (down, pending) to 1 (up); in between on a slow start.",
            |b| b.readmission.ramp.unwrap_or(if b.up && b.health != "pending" { 1.0 } else { 0.0 }),
        ),
    ];
    for (name, help, get) in families {
        f.header(name, "gauge", help);
        for v in &s.vips {
            for b in v
                .backends
                .iter()
                .filter(|b| b.readmission.ejections.is_some())
            {
                let addr = b.address.to_string();
                f.sample(name, &[("vip", &v.vip), ("backend", &addr)], get(b));
            }
        }
    }
}

/// `lb_backend_health`: one sample per backend and state, 1 for the state it is in.
fn health_family(f: &mut Family<'_>, s: &StatsSnapshot) {
    let name = "lb_backend_health";
    f.header(
        name,
        "gauge",
        "1 for the backend's health state (up, down, probation: back on a ramping weight, draining: drained by the operator, pending: not probed yet), 0 for the others.",
    );
    for v in &s.vips {
        for b in &v.backends {
            let addr = b.address.to_string();
            for state in ["up", "down", "probation", "draining", "pending"] {
                let now = if b.health.is_empty() {
                    "up"
                } else {
                    b.health.as_str()
                };
                f.sample(
                    name,
                    &[("vip", &v.vip), ("backend", &addr), ("state", state)],
                    (now == state) as u64,
                );
            }
        }
    }
}

/// What the weight model learned and refused.
fn learning_families(f: &mut Family<'_>, s: &StatsSnapshot) {
    let name = "lb_backend_learned_weight";
    f.header(
        name,
        "gauge",
        "Weight the model has set for backends of VIPs with [vip.learning] enabled, in configured units (the configured weight until the model changes it; runtime only).",
    );
    for v in &s.vips {
        for b in &v.backends {
            if let Some(w) = b.learned_weight {
                let w = crate::control::round::decimals(w, 3);
                let addr = b.address.to_string();
                f.sample(name, &[("vip", &v.vip), ("backend", &addr)], w);
            }
        }
    }
    let name = "lb_model_fit_r2";
    f.header(
        name,
        "gauge",
        "R squared of the backend's accepted latency model at the last learning step (absent while the fit is refused).",
    );
    for v in &s.vips {
        for b in &v.backends {
            if let Some(r2) = b.fit_r2 {
                let addr = b.address.to_string();
                f.sample(name, &[("vip", &v.vip), ("backend", &addr)], r2);
            }
        }
    }
    let name = "lb_model_refusals_total";
    f.header(
        name,
        "counter",
        "Backend fits the learning model refused (one per backend per step), by reason.",
    );
    for (reason, n) in &s.model_refusals {
        f.sample(name, &[("reason", reason)], n);
    }
}

/// The datapath's global counters: packet outcomes by reason, events by event.
fn datapath_family(f: &mut Family<'_>, s: &StatsSnapshot) {
    let value = |c: lb_common::Counter| s.counters.get(c.name()).copied().unwrap_or(0);
    let name = "lb_datapath_packets_total";
    f.header(
        name,
        "counter",
        "Packets the datapath did not forward, by reason: each counts once under one pass_*/drop_* reason (or icmp_too_big_sent).",
    );
    for &c in lb_common::Counter::ALL.iter().filter(|c| c.is_outcome()) {
        f.sample(name, &[("reason", c.name())], value(c));
    }
    let name = "lb_datapath_events_total";
    f.header(
        name,
        "counter",
        "Datapath events by event: connection-table events (ct_*) and kinds of forwarded packets (icmp_forwarded, frag_forwarded); not packet outcomes, a sum means nothing.",
    );
    for &c in lb_common::Counter::ALL.iter().filter(|c| !c.is_outcome()) {
        f.sample(name, &[("event", c.name())], value(c));
    }
}

/// `lb_events_total{kind}`: the journal's events (`lbctl status`) since lbd started, every
/// kind from 0 so that `increase()` sees the first one (alerts on `reload_refused`, dashboard
/// annotations on `backend_down`).
pub fn render_events(counts: &[(&str, u64)]) -> String {
    let mut out = String::new();
    let mut f = Family { out: &mut out };
    let name = "lb_events_total";
    f.header(
        name,
        "counter",
        "Events of lbd's journal (lbctl status) since it started, by kind: reload_refused, backend_down, change_refused, ...",
    );
    for (kind, n) in counts {
        f.sample(name, &[("kind", kind)], n);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::{BackendStatsEntry, VipStatsEntry};

    #[test]
    fn renders_every_family_with_labels() {
        let s = StatsSnapshot {
            datapath_faults: Vec::new(),
            timestamp_ms: 1,
            uptime_ms: 2500,
            interval_seconds: None,
            conntrack: Some(crate::control::TableFill {
                ct_entries: 5,
                ct4_entries: 3,
                ct_capacity: 1024,
                ct_new_entries: 1,
                ct_new_capacity: 2048,
                scan_ms: 0.5,
                syn_filter_probe: 0.25,
            }),
            counters: [("drop_fib".to_string(), 7u64)].into_iter().collect(),
            model_refusals: [("poor_fit".to_string(), 4u64)].into_iter().collect(),
            vips: vec![VipStatsEntry {
                vip: "[2001:db8::1]:443/tcp".into(),
                packets: 10,
                bytes: 1000,
                new_flows: 2,
                no_backend: 0,
                generation: 3,
                rates: None,
                backends: vec![BackendStatsEntry {
                    address: "2001:db8::11".parse().unwrap(),
                    weight: 5,
                    effective_weight: 0.0,
                    table_weight: 0,
                    drained: true,
                    up: true,
                    health: "draining".into(),
                    packets: 10,
                    bytes: 1000,
                    new_flows: 2,
                    syn_retries: 0,
                    client_rsts: 1,
                    resteered: 0,
                    learned_weight: Some(0.7300000001),
                    fit_r2: Some(0.5),
                    rates: None,
                    conns: crate::control::ConnCounts {
                        conns_active: 3,
                        conns_idle: 1,
                        conns_closing: 2,
                    },
                    readmission: crate::control::Readmission {
                        ejections: Some(2),
                        returns_in_ms: Some(1500.0),
                        ramp: None,
                    },
                }],
            }],
        };
        let text = render(&s);
        for line in [
            "lb_uptime_seconds 2.5",
            "lb_backend_ejections{vip=\"[2001:db8::1]:443/tcp\",backend=\"2001:db8::11\"} 2",
            "lb_backend_returns_in_seconds{vip=\"[2001:db8::1]:443/tcp\",backend=\"2001:db8::11\"} 1.5",
            "lb_vip_packets_total{vip=\"[2001:db8::1]:443/tcp\"} 10",
            "lb_vip_table_generation{vip=\"[2001:db8::1]:443/tcp\"} 3",
            "lb_backend_bytes_total{vip=\"[2001:db8::1]:443/tcp\",backend=\"2001:db8::11\"} 1000",
            "lb_backend_weight{vip=\"[2001:db8::1]:443/tcp\",backend=\"2001:db8::11\"} 5",
            "lb_backend_drained{vip=\"[2001:db8::1]:443/tcp\",backend=\"2001:db8::11\"} 1",
            "lb_backend_up{vip=\"[2001:db8::1]:443/tcp\",backend=\"2001:db8::11\"} 1",
            "lb_backend_health{vip=\"[2001:db8::1]:443/tcp\",backend=\"2001:db8::11\",state=\"draining\"} 1",
            "lb_backend_health{vip=\"[2001:db8::1]:443/tcp\",backend=\"2001:db8::11\",state=\"up\"} 0",
            "lb_datapath_packets_total{reason=\"drop_fib\"} 7",
            "lb_backend_learned_weight{vip=\"[2001:db8::1]:443/tcp\",backend=\"2001:db8::11\"} 0.73",
            "lb_backend_effective_weight{vip=\"[2001:db8::1]:443/tcp\",backend=\"2001:db8::11\"} 0",
            "lb_backend_table_weight{vip=\"[2001:db8::1]:443/tcp\",backend=\"2001:db8::11\"} 0",
            "lb_model_fit_r2{vip=\"[2001:db8::1]:443/tcp\",backend=\"2001:db8::11\"} 0.5",
            "lb_model_refusals_total{reason=\"poor_fit\"} 4",
            "lb_backend_connections{vip=\"[2001:db8::1]:443/tcp\",backend=\"2001:db8::11\",state=\"active\"} 3",
            "lb_backend_connections{vip=\"[2001:db8::1]:443/tcp\",backend=\"2001:db8::11\",state=\"closing\"} 2",
            "lb_conntrack_entries{table=\"CT_NEW\"} 1",
            "lb_conntrack_entries{table=\"CT4\"} 3",
            "lb_conntrack_entries{table=\"CT\"} 2",
            "lb_conntrack_capacity{table=\"CT4\"} 1024",
            "lb_conntrack_capacity{table=\"CT\"} 1024",
            "lb_conntrack_syn_filter_probe_ratio 0.25",
            "lb_datapath_packets_total{reason=\"pass_not_vip\"} 0",
            "lb_datapath_events_total{event=\"ct_lost\"} 0",
            "lb_datapath_events_total{event=\"ct_new_insert_failed\"} 0",
            "lb_datapath_events_total{event=\"frag_insert_failed\"} 0",
            "# TYPE lb_datapath_events_total counter",
            "# TYPE lb_backend_packets_total counter",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in:\n{text}"
            );
        }
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn renders_every_event_kind_from_zero() {
        let journal = crate::control::events::Journal::new();
        journal.record(crate::control::events::Kind::ReloadRefused, "bad file");
        let text = render_events(&journal.counts());
        assert!(text.contains("# TYPE lb_events_total counter"), "{text}");
        assert!(
            text.lines()
                .any(|l| l == "lb_events_total{kind=\"reload_refused\"} 1"),
            "{text}"
        );
        assert!(
            text.lines()
                .any(|l| l == "lb_events_total{kind=\"backend_down\"} 0"),
            "{text}"
        );
    }
}
