//! Health checks in the real `lbd`, in a namespace lab with real TCP servers:
//!
//! * a backend whose server stops is marked down within fall × interval (+ 1 s of slack):
//!   `lbctl backend list` says so, its table slots go to the others, every new connection
//!   succeeds on them, and `/metrics` agrees;
//! * when its server comes back it goes through probation to up and takes new flows again;
//! * long-lived connections on the other backends see no reset through all of this;
//! * an HTTP health check against a server answering 500 marks that backend down.
use serde_json::Value;
use std::{
    collections::BTreeMap,
    fs,
    net::{IpAddr, SocketAddr},
    path::Path,
    time::{Duration, Instant},
};
use tests::{
    lab::{backend_v4, Lab, LabSpec, VIP_V4},
    procs::{lab_config, lbctl, poll_until, scrape_metrics, scratch, start_decaps, Lbd},
    require_root,
    tcp::{client_many, tally, HttpResponder, LongLived, TcpServer},
};

const VIP: &str = "10.200.100.1:80/tcp";
const HTTP_VIP: &str = "10.200.100.1:8080/tcp";
/// Port of the HTTP health endpoint on the backends.
const HTTP_PORT: u16 = 8081;
/// Probe settings of the test: interval 200 ms, timeout 200 ms, rise 2, fall 2.
const INTERVAL_MS: u64 = 200;
const FALL: u64 = 2;

/// `lbctl backend list VIP --json`, by backend address.
fn backends(socket: &Path, vip: &str) -> BTreeMap<String, Value> {
    let out = lbctl(socket, &["backend", "list", vip, "--json"]);
    assert!(
        out.status.success(),
        "lbctl backend list: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    v.as_array()
        .unwrap()
        .iter()
        .map(|b| (b["address"].as_str().unwrap().to_string(), b.clone()))
        .collect()
}

/// Polls `backend list` until `addr`'s health is `want`; returns the time it took and every
/// state seen on the way.
fn wait_health(
    lbd: &Lbd,
    vip: &str,
    addr: &str,
    want: &str,
    timeout: Duration,
) -> (Duration, Vec<String>) {
    let start = Instant::now();
    let mut seen: Vec<String> = Vec::new();
    let mut last = Value::Null;
    let reached = poll_until(timeout, || {
        let list = backends(&lbd.socket, vip);
        let h = list[addr]["health"].as_str().unwrap().to_string();
        if seen.last() != Some(&h) {
            seen.push(h.clone());
        }
        last = list[addr].clone();
        (h == want).then(|| start.elapsed())
    });
    let Some(took) = reached else {
        panic!(
            "backend {addr} of {vip} not {want} within {timeout:?} (states seen: {seen:?}): {last}\nlbd log:\n{}",
            lbd.log()
        );
    };
    (took, seen)
}

/// The name-then-echo server of backend `i`, on the VIP (for balanced traffic) and on the
/// backend's own address (for the health probes).
fn server(lab: &Lab, i: usize) -> TcpServer {
    let addrs = [
        SocketAddr::new(IpAddr::from(VIP_V4), 80),
        SocketAddr::new(IpAddr::from(backend_v4(i)), 80),
    ];
    TcpServer::start(lab.backend(i).ns(), &addrs, &format!("backend{i}")).unwrap()
}

#[test]
fn health_checks_take_dead_backends_out_and_bring_them_back() {
    require_root();
    let t0 = Instant::now();
    let lab = Lab::new(LabSpec { backends: 3 }).expect("building the lab");
    let mut servers: Vec<Option<TcpServer>> = (0..3).map(|i| Some(server(&lab, i))).collect();
    let _decaps = start_decaps(&lab, 3);
    let http_ok = HttpResponder::start(
        lab.backend(0).ns(),
        SocketAddr::new(IpAddr::from(backend_v4(0)), HTTP_PORT),
        200,
        Duration::ZERO,
    );
    let http_500 = HttpResponder::start(
        lab.backend(1).ns(),
        SocketAddr::new(IpAddr::from(backend_v4(1)), HTTP_PORT),
        500,
        Duration::ZERO,
    );
    let (b0, b1, b2) = (
        backend_v4(0).to_string(),
        backend_v4(1).to_string(),
        backend_v4(2).to_string(),
    );
    let dir = scratch("health-e2e");
    let _cleanup = tests::procs::RemoveOnDrop(dir.clone());
    fs::write(
        dir.join("lbd.toml"),
        lab_config(
            &dir,
            &format!(
            "[[vip]]\naddress = \"{VIP_V4}\"\nport = 80\nprotocol = \"tcp\"\ntable_size = 4099\n\
             [vip.health]\nkind = \"tcp\"\ninterval_ms = {INTERVAL_MS}\ntimeout_ms = 200\nrise = 2\nfall = {FALL}\nslow_start_ms = 1000\nejection_base_ms = 1000\n\
             [[vip.backend]]\naddress = \"{b0}\"\n[[vip.backend]]\naddress = \"{b1}\"\n[[vip.backend]]\naddress = \"{b2}\"\n\n\
             [[vip]]\naddress = \"{VIP_V4}\"\nport = 8080\nprotocol = \"tcp\"\ntable_size = 251\n\
             [vip.health]\nkind = \"http\"\ninterval_ms = {INTERVAL_MS}\ntimeout_ms = 200\nrise = 2\nfall = {FALL}\n\
             port = {HTTP_PORT}\npath = \"/healthz\"\nexpected_status = 200\n\
             [[vip.backend]]\naddress = \"{b0}\"\n[[vip.backend]]\naddress = \"{b1}\"\n"
        ),
        ),
    )
    .unwrap();
    let lbd = Lbd::start(lab.lb().ns(), &dir);
    let vip = SocketAddr::new(IpAddr::from(VIP_V4), 80);

    // Every backend probed and up.
    let mut last = BTreeMap::new();
    let up = poll_until(Duration::from_secs(5), || {
        let list = backends(&lbd.socket, VIP);
        let ready = list.values().all(|b| {
            b["health"] == "up" && b["up"] == true && b["last_probe_ms"].as_f64().is_some()
        });
        last = list.clone();
        ready.then_some(list)
    });
    let list = up.unwrap_or_else(|| panic!("backends not all probed up: {last:?}\n{}", lbd.log()));
    for b in list.values() {
        assert_eq!(b["effective_weight"], 1, "{b}");
        assert!(b["slots"].as_u64().unwrap() > 1000, "{b}");
        assert!(b["last_error"].is_null(), "{b}");
    }
    let before = tally(&client_many(
        lab.client().ns(),
        vip,
        150,
        Duration::from_secs(3),
    ));
    assert_eq!(before.len(), 3, "all three backends take flows: {before:?}");

    // Long-lived connections, most of them on the backends that stay healthy.
    let mut long = LongLived::open(lab.client().ns(), vip, 30, Duration::from_secs(3)).unwrap();
    let on_others = long.assert_intact(&["backend0"], "at the start");
    assert!(on_others >= 10, "{:?}", long.backend_counts());

    // (4) HTTP: the backend answering 500 goes down, the one answering 200 stays up.
    let bound = Duration::from_millis(FALL * INTERVAL_MS) + Duration::from_secs(1);
    let (took, _) = wait_health(&lbd, HTTP_VIP, &b1, "down", bound * 3);
    let list = backends(&lbd.socket, HTTP_VIP);
    println!(
        "http 500: down after {took:?} (polled from lbd start): {}",
        list[&b1]
    );
    assert!(
        list[&b1]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("status 500, expected 200")),
        "{}",
        list[&b1]
    );
    assert_eq!(list[&b1]["slots"], 0, "{}", list[&b1]);
    assert_eq!(list[&b0]["health"], "up", "{}", list[&b0]);
    assert_eq!(list[&b0]["slots"], 251, "{}", list[&b0]);

    // (1) Backend 0's server stops: down within fall × interval + 1 s.
    let stopped = Instant::now();
    drop(servers[0].take());
    let (took, seen) = wait_health(&lbd, VIP, &b0, "down", bound);
    let took_total = stopped.elapsed();
    println!("tcp: backend0 down {took_total:?} after its server stopped (states {seen:?})");
    assert!(took_total <= bound, "{took:?}");
    let list = backends(&lbd.socket, VIP);
    let d = &list[&b0];
    assert_eq!(d["up"], false, "{d}");
    assert_eq!(d["effective_weight"], 0, "{d}");
    assert_eq!(d["slots"], 0, "{d}");
    assert_eq!(d["weight"], 1, "configured weight kept: {d}");
    assert!(
        d["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("connect")),
        "{d}"
    );
    let total: u64 = list.values().map(|b| b["slots"].as_u64().unwrap()).sum();
    assert_eq!(total, 4099, "the others own the whole table: {list:?}");
    // Health is runtime state: the file is not rewritten.
    assert!(!fs::read_to_string(dir.join("lbd.toml"))
        .unwrap()
        .contains("weight = 0"));
    let m = scrape_metrics(lab.lb().ns());
    let series =
        |name: &str, extra: &str| format!("{name}{{vip=\"{VIP}\",backend=\"{b0}\"{extra}}}");
    assert_eq!(m[&series("lb_backend_up", "")], 0.0);
    assert_eq!(m[&series("lb_backend_health", ",state=\"down\"")], 1.0);
    assert_eq!(m[&series("lb_backend_health", ",state=\"up\"")], 0.0);
    assert_eq!(m[&series("lb_backend_effective_weight", "")], 0.0);

    let results = client_many(lab.client().ns(), vip, 200, Duration::from_secs(3));
    let failed: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "{} of 200 new connections failed while backend0 is down, first: {:?}",
        failed.len(),
        failed[0]
    );
    let c = tally(&results);
    println!("while backend0 is down: {c:?}");
    assert!(!c.contains_key("backend0"), "{c:?}");
    long.assert_intact(&["backend0"], "after backend0 went down");
    // The probes just sent on backend0's closed connections met its DOWN flag: the datapath
    // steered them to another backend instead of the dead one.
    let m = scrape_metrics(lab.lb().ns());
    let resteered = m["lb_datapath_events_total{event=\"ct_resteered\"}"];
    println!("ct_resteered after backend0 went down: {resteered}");
    assert!(
        resteered > 0.0,
        "backend0's tracked flows were not re-steered"
    );

    // (2) The server comes back: probation, then up, then new flows again.
    let restarted = Instant::now();
    servers[0] = Some(server(&lab, 0));
    let (_, seen) = wait_health(&lbd, VIP, &b0, "up", Duration::from_secs(5));
    let took_up = restarted.elapsed();
    println!("tcp: backend0 up {took_up:?} after its server restarted (states {seen:?})");
    let log = lbd.log();
    let probation = log
        .find("on probation")
        .unwrap_or_else(|| panic!("no probation in the log:\n{log}"));
    let up = log[probation..]
        .find("backend up")
        .unwrap_or_else(|| panic!("no up after probation in the log:\n{log}"));
    assert!(up > 0);
    assert!(
        seen.iter()
            .all(|s| s == "down" || s == "probation" || s == "up"),
        "{seen:?}"
    );
    assert!(log.contains("backend down"), "{log}");
    let list = backends(&lbd.socket, VIP);
    assert_eq!(list[&b0]["effective_weight"], 1, "{}", list[&b0]);
    assert!(list[&b0]["slots"].as_u64().unwrap() > 1000, "{}", list[&b0]);
    let c = tally(&client_many(
        lab.client().ns(),
        vip,
        150,
        Duration::from_secs(3),
    ));
    println!("after backend0 came back: {c:?}");
    assert!(c.get("backend0").is_some_and(|&n| n > 10), "{c:?}");

    // (3) No reset on the healthy backends through all of it.
    let n = long.assert_intact(&["backend0"], "after backend0 came back");
    println!(
        "{n} long-lived connections on backend1/backend2 intact; test took {:?}",
        t0.elapsed()
    );
    drop(http_ok);
    drop(http_500);
    drop(lbd);
    lab.shutdown().unwrap();
}
