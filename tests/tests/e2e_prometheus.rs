//! The shipped Grafana dashboard (`packaging/grafana/lb.json`) against a real Prometheus
//! (Debian's `prometheus`, started in the lab balancer's namespace, scraping lbd's
//! `/metrics` every second): after traffic, a drain, a weight change, a refused lbctl change
//! and a refused reload, every query of the dashboard (each panel's targets, each annotation,
//! each variable), read from lb.json itself, is evaluated through Prometheus's HTTP API and
//! must return series carrying the labels its legend names (a query returning nothing fails);
//! the effective weight of the drained backend must drop to 0 and its health read
//! "draining"; the configured weight must show the change.
use serde_json::Value;
use std::{
    collections::BTreeSet,
    fs,
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr},
    path::Path,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};
use tests::{
    lab::{backend_v4, Lab, LabSpec, VIP_V4},
    netns::NetNs,
    procs::{lab_config, lbctl, lbctl_json, now_ms, scratch, start_decaps, wait_for, Lbd},
    promql::{metric_names, readme_metrics, workspace_root},
    require_root,
    tcp::{client_many, HttpResponder, TcpServer},
};

const VIP: &str = "10.200.100.1:80/tcp";
const HTTP_PORT: u16 = 8081;
/// Prometheus inside the balancer's namespace (its own loopback: no clash with other tests).
const PROM: &str = "127.0.0.1:9090";
/// What Grafana would put for its interval variables at a 1 s scrape interval.
const RATE_INTERVAL: &str = "4s";
const INTERVAL: &str = "2s";

/// Percent-encodes a query string value.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `GET path` from Prometheus's HTTP API inside `ns`; the JSON answer's `data`, which must
/// be a success. `None` while Prometheus does not answer yet.
fn prom_get(ns: &NetNs, path: &str) -> Option<Value> {
    let text = ns.run_in(|| -> Option<String> {
        let mut s = std::net::TcpStream::connect(PROM).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: prometheus\r\n\r\n").as_bytes())
            .ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        Some(out)
    })?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    if head.starts_with("HTTP/1.0 503") || head.starts_with("HTTP/1.1 503") {
        return None; // starting up
    }
    let v: Value = serde_json::from_str(body).unwrap_or_else(|e| {
        panic!("Prometheus answered {path} with no JSON ({e}):\n{head}\n{body}")
    });
    assert_eq!(v["status"], "success", "Prometheus refused {path}: {v}");
    Some(v["data"].clone())
}

/// An instant query's result vector.
fn query(ns: &NetNs, expr: &str) -> Vec<Value> {
    prom_get(ns, &format!("/api/v1/query?query={}", encode(expr)))
        .and_then(|d| d["result"].as_array().cloned())
        .unwrap_or_default()
}

/// A range query's result matrix over `[start, now]`, one point a second.
fn query_range(ns: &NetNs, expr: &str, start: f64) -> Vec<Value> {
    let end = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let path = format!(
        "/api/v1/query_range?query={}&start={start:.3}&end={end:.3}&step=1",
        encode(expr)
    );
    prom_get(ns, &path).expect("Prometheus answers")["result"]
        .as_array()
        .cloned()
        .unwrap()
}

/// Polls an instant query until `f` holds for its result.
fn wait_query(ns: &NetNs, what: &str, expr: &str, f: impl Fn(&[Value]) -> bool) {
    wait_for(
        &format!("Prometheus to see {what} ({expr})"),
        Duration::from_secs(30),
        || f(&query(ns, expr)),
    );
}

/// The value of the sample of an instant result.
fn value(sample: &Value) -> f64 {
    sample["value"][1].as_str().unwrap().parse().unwrap()
}

/// Escapes a variable's value as Grafana does for a regex matcher in PromQL.
fn regex_value(v: &str) -> String {
    v.chars()
        .map(|c| {
            if "\\^$.|?*+()[]{}".contains(c) {
                format!("\\\\{c}")
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// The dashboard's query with its variables set: one VIP chosen, every lbd and backend.
fn substitute(expr: &str) -> String {
    expr.replace("$__rate_interval", RATE_INTERVAL)
        .replace("$__interval", INTERVAL)
        .replace("$instance", ".*")
        .replace("$backend", ".*")
        .replace("$vip", &regex_value(VIP))
}

/// The labels a legend or title format names (`{{vip}} on {{instance}}` -> vip, instance).
fn legend_labels(format: &str) -> BTreeSet<String> {
    format
        .split("{{")
        .skip(1)
        .filter_map(|s| s.split_once("}}").map(|(l, _)| l.trim().to_string()))
        .collect()
}

/// Every query of the dashboard: (where, expr, legend/title format).
fn dashboard_queries(dash: &Value) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push((
                format!("panel {:?} target {}", p["title"], t["refId"]),
                t["expr"].as_str().unwrap().to_string(),
                t["legendFormat"].as_str().unwrap_or("").to_string(),
            ));
        }
    }
    for a in dash["annotations"]["list"].as_array().unwrap() {
        if let Some(e) = a["expr"].as_str() {
            out.push((
                format!("annotation {:?}", a["name"]),
                e.to_string(),
                a["titleFormat"].as_str().unwrap_or("").to_string(),
            ));
        }
    }
    out
}

fn dashboard() -> Value {
    let path = workspace_root().join("packaging/grafana/lb.json");
    serde_json::from_str(&fs::read_to_string(&path).unwrap()).expect("lb.json is JSON")
}

/// The dashboard's shape, without Prometheus: variables for lbd, VIP and backend, every query
/// filtered by them, no hard-coded instance, only documented metrics.
#[test]
fn dashboard_uses_variables_and_documented_metrics() {
    let dash = dashboard();
    let vars: Vec<&str> = dash["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(vars, ["datasource", "instance", "vip", "backend"]);
    let documented = readme_metrics();
    let queries = dashboard_queries(&dash);
    assert!(queries.len() >= 15, "{} queries", queries.len());
    for (at, expr, legend) in &queries {
        assert!(
            expr.contains("instance=~\"$instance\""),
            "{at}: not filtered by $instance: {expr}"
        );
        let names = metric_names(expr);
        assert!(!names.is_empty(), "{at}: no lb_ metric: {expr}");
        let unknown: Vec<_> = names.difference(&documented).collect();
        assert!(unknown.is_empty(), "{at}: undocumented metrics {unknown:?}");
        if names.iter().any(|n| n.starts_with("lb_backend_")) {
            assert!(
                expr.contains("backend=~\"$backend\""),
                "{at}: not filtered by $backend"
            );
        }
        if names.iter().any(|n| n.starts_with("lb_vip_")) {
            assert!(expr.contains("vip=~\"$vip\""), "{at}: not filtered by $vip");
        }
        assert!(!legend.is_empty(), "{at}: no legend");
    }
    let text = serde_json::to_string(&dash).unwrap();
    for hard in ["127.0.0.1", ":9469", "localhost", "10.200."] {
        assert!(!text.contains(hard), "lb.json hard-codes {hard}");
    }
    for d in text
        .match_indices("\"uid\":\"")
        .map(|(i, _)| &text[i + 7..])
    {
        let uid = d.split('"').next().unwrap();
        assert!(
            ["${datasource}", "-- Grafana --", "lb-overview"].contains(&uid),
            "lb.json names a datasource uid {uid}: use ${{datasource}}"
        );
    }
}

/// The lab: three backends with servers, HTTP health endpoints and decap.
struct Backends {
    _servers: Vec<TcpServer>,
    _http: Vec<HttpResponder>,
    _decaps: Vec<std::process::Child>,
}

fn backends(lab: &Lab) -> Backends {
    let _servers = (0..3)
        .map(|i| {
            let addrs = [
                SocketAddr::new(IpAddr::from(VIP_V4), 80),
                SocketAddr::new(IpAddr::from(backend_v4(i)), 80),
            ];
            TcpServer::start(lab.backend(i).ns(), &addrs, &format!("backend{i}")).unwrap()
        })
        .collect();
    let _http = (0..3)
        .map(|i| {
            HttpResponder::start(
                lab.backend(i).ns(),
                SocketAddr::new(IpAddr::from(backend_v4(i)), HTTP_PORT),
                200,
                Duration::ZERO,
            )
        })
        .collect();
    let _decaps = start_decaps(lab, 3);
    Backends {
        _servers,
        _http,
        _decaps,
    }
}

fn write_lbd_config(dir: &Path) {
    let b: Vec<String> = (0..3).map(|i| backend_v4(i).to_string()).collect();
    fs::write(
        dir.join("lbd.toml"),
        lab_config(
            dir,
            &format!(
            "[[vip]]\naddress = \"{VIP_V4}\"\nport = 80\nprotocol = \"tcp\"\ntable_size = 1021\n\
             [vip.health]\nkind = \"http\"\ninterval_ms = 200\ntimeout_ms = 200\nrise = 2\nfall = 3\n\
             port = {HTTP_PORT}\npath = \"/healthz\"\n\
             [vip.learning]\nenabled = true\ninterval_ms = 200\nlatency_target_ms = 50\n\
             [[vip.backend]]\naddress = \"{}\"\n[[vip.backend]]\naddress = \"{}\"\n[[vip.backend]]\naddress = \"{}\"\n",
            b[0],
            b[1],
            b[2]
        ),
        ),
    )
    .unwrap();
}

/// Prometheus in `ns`, scraping lbd's default metrics address every second; killed with the
/// namespace's processes.
fn start_prometheus(ns: &NetNs, dir: &Path) -> std::process::Child {
    let config = dir.join("prometheus.yml");
    fs::write(
        &config,
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
         scrape_configs:\n  - job_name: lb\n    static_configs:\n      - targets: ['127.0.0.1:9469']\n",
    )
    .unwrap();
    let log = fs::File::create(dir.join("prometheus.log")).unwrap();
    let mut cmd = ns.command("prometheus");
    cmd.arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("tsdb").display()
        ))
        .arg(format!("--web.listen-address={PROM}"))
        .arg("--log.level=warn")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log);
    ns.spawn_command(&mut cmd).unwrap_or_else(|e| {
        panic!("starting prometheus: {e}; install it with `cargo xtask setup` (Debian package prometheus)")
    })
}

/// Traffic through the VIP from the client: `n` connections, all must succeed.
fn traffic(lab: &Lab, n: usize) {
    let vip = SocketAddr::new(IpAddr::from(VIP_V4), 80);
    let results = client_many(lab.client().ns(), vip, n, Duration::from_secs(3));
    let failed = results.iter().filter(|r| r.is_err()).count();
    assert_eq!(
        failed, 0,
        "{failed} of {n} connections through {VIP} failed"
    );
}

#[test]
fn every_dashboard_query_answers_on_a_real_prometheus() {
    require_root();
    let t0 = Instant::now();
    let dash = dashboard();
    let lab = Lab::new(LabSpec { backends: 3 }).expect("building the lab");
    let _backends = backends(&lab);
    let dir = scratch("prometheus-e2e");
    let _cleanup = tests::procs::RemoveOnDrop(dir.clone());
    write_lbd_config(&dir);
    let lbd = Lbd::start(lab.lb().ns(), &dir);
    lbd.wait_ready();
    let ns = lab.lb().ns();
    let mut prom = start_prometheus(ns, &dir);
    let start = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    wait_query(ns, "lbd scraped", "lb_up{job=\"lb\"}", |r| {
        r.len() == 1 && value(&r[0]) == 1.0
    });
    let (b0, b1) = (backend_v4(0).to_string(), backend_v4(1).to_string());
    let sel = |metric: &str, b: &str| format!("{metric}{{vip=\"{VIP}\",backend=\"{b}\"}}");
    wait_query(ns, "b0 up", &sel("lb_backend_health", &b0), |r| {
        r.iter()
            .any(|s| s["metric"]["state"] == "up" && value(s) == 1.0)
    });

    // Traffic, then a drain of backend 0 while traffic flows, then a weight change.
    traffic(&lab, 200);
    wait_query(
        ns,
        "the traffic",
        &format!("lb_vip_packets_total{{vip=\"{VIP}\"}}"),
        |r| r.first().is_some_and(|s| value(s) > 0.0),
    );
    let out = lbctl(&lbd.socket, &["backend", "drain", VIP, &b0]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    traffic(&lab, 200);
    wait_query(
        ns,
        "b0 drained",
        &sel("lb_backend_effective_weight", &b0),
        |r| r.first().is_some_and(|s| value(s) == 0.0),
    );
    let out = lbctl(&lbd.socket, &["backend", "set-weight", VIP, &b1, "3"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    traffic(&lab, 200);
    wait_query(ns, "b1's new weight", &sel("lb_backend_weight", &b1), |r| {
        r.first().is_some_and(|s| value(s) == 3.0)
    });
    // A refused lbctl change and a refused reload (the file broken behind lbd's back).
    let out = lbctl(&lbd.socket, &["backend", "set-weight", VIP, &b1, "10001"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let since = now_ms();
    fs::write(&lbd.config, "interface = \n").unwrap();
    lbd.signal(libc::SIGHUP);
    lbd.wait_event("reload_refused", since);
    wait_query(
        ns,
        "the refused reload",
        "lb_events_total{kind=\"reload_refused\"}",
        |r| r.first().is_some_and(|s| value(s) == 1.0),
    );
    wait_query(ns, "a model refusal", "lb_model_refusals_total", |r| {
        !r.is_empty()
    });
    // Three more scrapes after the last change, so that a range query's one-second steps
    // cover the change with room on both sides (changes() and rate() need two samples).
    let last = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    wait_query(
        ns,
        "three scrapes after the last change",
        "timestamp(lb_up)",
        |r| r.first().is_some_and(|s| value(s) > last + 3.0),
    );

    // Every variable lists what the lab has.
    for (var, want) in [
        ("instance", "127.0.0.1:9469"),
        ("vip", VIP),
        ("backend", b1.as_str()),
    ] {
        let v = dash["templating"]["list"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == var)
            .unwrap();
        let q = substitute(v["query"]["query"].as_str().unwrap());
        let (metric, label) = q
            .strip_prefix("label_values(")
            .and_then(|q| q.strip_suffix(')'))
            .and_then(|q| q.rsplit_once(", "))
            .unwrap_or_else(|| panic!("variable {var}: not label_values(SELECTOR, LABEL): {q}"));
        let values = prom_get(
            ns,
            &format!("/api/v1/label/{label}/values?match[]={}", encode(metric)),
        )
        .unwrap();
        assert!(
            values.as_array().unwrap().iter().any(|x| x == want),
            "variable {var} ({q}) lists {values}, not {want}"
        );
    }

    // Every query of every panel and annotation, over the whole run.
    let queries = dashboard_queries(&dash);
    let mut answered = 0;
    for (at, expr, legend) in &queries {
        let expr = substitute(expr);
        let series = query_range(ns, &expr, start);
        if series.is_empty() {
            let raw: Vec<String> = metric_names(&expr)
                .iter()
                .map(|m| format!("{m}: {:?}", query_range(ns, m, start)))
                .collect();
            panic!(
                "{at} returned nothing: {expr}\nits metrics over the run:\n{}",
                raw.join("\n")
            );
        }
        for s in &series {
            for l in legend_labels(legend) {
                assert!(
                    s["metric"][&l].is_string(),
                    "{at}: a series without the label {l} its legend names: {}\n{expr}",
                    s["metric"]
                );
            }
            if let Some(v) = s["metric"]["vip"].as_str() {
                assert_eq!(v, VIP, "{at}: the $vip filter let another VIP through");
            }
        }
        answered += 1;
    }

    // The drain as the panels show it: backend 0's effective weight went from >0 to 0, its
    // health to draining (2); backend 1's configured weight (x100) reached 300.
    let panel_series = |title: &str, backend: &str| -> Vec<f64> {
        let p = dash["panels"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["title"] == title)
            .unwrap_or_else(|| panic!("no panel {title:?}"));
        let expr = substitute(p["targets"][0]["expr"].as_str().unwrap());
        let series = query_range(ns, &expr, start);
        let s = series
            .iter()
            .find(|s| s["metric"]["backend"] == backend)
            .unwrap_or_else(|| panic!("{title}: no series of {backend}"));
        s["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v[1].as_str().unwrap().parse().unwrap())
            .collect()
    };
    let eff = panel_series("Effective weight", &b0);
    assert!(
        eff.iter().any(|&w| w > 0.0),
        "b0's effective weight never above 0: {eff:?}"
    );
    assert_eq!(
        eff.last(),
        Some(&0.0),
        "b0's effective weight did not drop to 0: {eff:?}"
    );
    let health = panel_series("Health", &b0);
    assert_eq!(health.first(), Some(&0.0), "b0 not up at first: {health:?}");
    assert_eq!(
        health.last(),
        Some(&2.0),
        "b0 not draining at the end: {health:?}"
    );
    let conf = panel_series("Configured and learned weight", &b1);
    assert_eq!(
        conf.last(),
        Some(&300.0),
        "b1's configured weight x100: {conf:?}"
    );
    let stats = lbctl_json(&lbd.socket, &["stats"]);
    assert!(stats["vips"][0]["packets"].as_u64().unwrap() > 0);

    let _ = prom.kill();
    let _ = prom.wait();
    println!(
        "prometheus e2e: {answered} dashboard queries answered with their labels; b0 weight {:?} -> 0; total {:?}",
        eff.iter().copied().fold(0.0f64, f64::max),
        t0.elapsed()
    );
    drop(lbd);
    lab.shutdown().expect("lab teardown");
}
