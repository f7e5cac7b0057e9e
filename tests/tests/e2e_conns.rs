//! Connections in view (issue 21), against the real `lbd` in a namespace lab: 200 long-lived
//! connections over three backends, counted per backend exactly (`backend list`, `stats`,
//! `/metrics`), listed one by one with their backend (`conn list`), looked up (`lookup` agrees
//! with the backend the next new connection gets), and drained: `backend drain --wait` returns
//! 0 within a second of the last close while the test closes the drained backend's connections
//! over 10 s, and exit status 4 naming how many are left when they stay open.
use serde_json::Value;
use std::{
    collections::BTreeMap,
    fs,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};
use tests::{
    lab::{backend_v4, Lab, LabSpec, LB_V4, LB_V6, VIP_V4, VIP_V6},
    procs::{self, bin_path, lbctl, lbctl_json, scrape_metrics, start_decaps, wait_for, Lbd},
    require_root,
    tcp::{client_from, LongLived, TcpServer},
};

const VIP4: &str = "10.200.100.1:80/tcp";
const CONNS: usize = 200;

fn config(dir: &Path) -> String {
    let backends: String = (0..3)
        .map(|i| format!("[[vip.backend]]\naddress = \"{}\"\n", backend_v4(i)))
        .collect();
    format!(
        "interface = \"eth0\"\nxdp_mode = \"native\"\npin_dir = \"\"\n\
         control_socket = \"{}\"\n\
         [encap]\nsource_v4 = \"{LB_V4}\"\nsource_v6 = \"{LB_V6}\"\n\
         [[vip]]\naddress = \"{VIP_V4}\"\nport = 80\nprotocol = \"tcp\"\n{backends}",
        dir.join("run/lbd.sock").display()
    )
}

/// Server name ("backend1") -> backend address.
fn address_of(name: &str) -> String {
    let i: usize = name.trim_start_matches("backend").parse().unwrap();
    backend_v4(i).to_string()
}

/// `backend list --json`: address -> (active, idle, closing).
fn counts(sock: &Path) -> BTreeMap<String, (u64, u64, u64)> {
    lbctl_json(sock, &["backend", "list", VIP4])
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            let n = |k: &str| b[k].as_u64().unwrap_or_else(|| panic!("{k} in {b}"));
            (
                b["address"].as_str().unwrap().to_string(),
                (n("conns_active"), n("conns_idle"), n("conns_closing")),
            )
        })
        .collect()
}

/// The test's connections per backend address, as `counts` shows them (none idle or closing).
fn held(conns: &LongLived) -> BTreeMap<String, (u64, u64, u64)> {
    let mut want: BTreeMap<String, (u64, u64, u64)> = (0..3)
        .map(|i| (backend_v4(i).to_string(), (0, 0, 0)))
        .collect();
    for (name, n) in conns.backend_counts() {
        want.get_mut(&address_of(&name)).unwrap().0 = n as u64;
    }
    want
}

/// An `lbctl` child killed if the test fails before it exits.
struct Lbctl(Option<Child>);

impl Lbctl {
    fn child(&mut self) -> &mut Child {
        self.0.as_mut().expect("not taken")
    }
}

impl Drop for Lbctl {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn spawn_lbctl(sock: &Path, args: &[&str]) -> Lbctl {
    Lbctl(Some(
        Command::new(bin_path("lbctl"))
            .arg("--socket")
            .arg(sock)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("running lbctl"),
    ))
}

/// Everything a change could touch: backend list (slots included), vip list, the file's bytes.
fn state(sock: &Path, dir: &Path) -> (Value, Value, Vec<u8>) {
    let mut backends = lbctl_json(sock, &["backend", "list"]);
    for b in backends.as_array_mut().unwrap() {
        for k in [
            "conns_active",
            "conns_idle",
            "conns_closing",
            "last_probe_ms",
        ] {
            b.as_object_mut().unwrap().remove(k);
        }
    }
    (
        backends,
        lbctl_json(sock, &["vip", "list"]),
        fs::read(dir.join("lbd.toml")).unwrap(),
    )
}

/// `--dry-run` changes nothing and predicts exactly what the real change then does;
/// `lbd --check --diff` says what a reload would do; --dry-run on a query is a usage error.
fn dry_runs_change_nothing(lab: &Lab, sock: &Path, dir: &Path) {
    let b0 = backend_v4(0).to_string();
    let before = state(sock, dir);
    let d = lbctl_json(sock, &["--dry-run", "backend", "undrain", VIP4, &b0]);
    assert_eq!(d["changed"], true, "{d}");
    assert!(
        d["message"]
            .as_str()
            .unwrap()
            .starts_with("dry run, nothing changed"),
        "{d}"
    );
    let v = &d["vips"][0];
    let gained: BTreeMap<String, i64> = v["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["address"].as_str().unwrap().to_string(),
                b["slots_gained"].as_i64().unwrap(),
            )
        })
        .collect();
    assert!(gained[&b0] > 0, "{d}");
    assert_eq!(
        gained.values().sum::<i64>(),
        0,
        "slots move, none appear: {d}"
    );
    assert_eq!(v["slots_moved"].as_i64(), Some(gained[&b0]), "{d}");
    // Refused like the change itself; the text form; a dry run of a query.
    let b2 = backend_v4(2).to_string();
    let out = lbctl(
        sock,
        &[
            "--dry-run",
            "backend",
            "drain",
            VIP4,
            &backend_v4(1).to_string(),
        ],
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "draining the last serving backend is refused"
    );
    // Backend 2 is drained: removing it moves no slot; neither does reweighting drained 0.
    for args in [
        vec!["--dry-run", "backend", "remove", VIP4, &b2],
        vec!["--dry-run", "backend", "set-weight", VIP4, &b0, "3"],
    ] {
        let out = lbctl(sock, &args);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains("no table would change"),
            "{text}"
        );
    }
    let out = lbctl(sock, &["--dry-run", "backend", "list"]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(state(sock, dir), before, "a dry run changed something");

    // lbd --check --diff: a file with backend 0 undrained, against the running lbd.
    let file = dir.join("next.toml");
    let text = String::from_utf8(before.2.clone()).unwrap();
    let mut in_b0 = false;
    let mut undrained = String::new();
    for l in text.lines() {
        if l.starts_with('[') {
            in_b0 = false;
        }
        if l.trim() == format!("address = \"{b0}\"") {
            in_b0 = true;
        }
        if !(in_b0 && l.trim_start().starts_with("drained")) {
            undrained.push_str(l);
            undrained.push('\n');
        }
    }
    assert_ne!(undrained, text, "backend 0's drained key in:\n{text}");
    fs::write(&file, &undrained).unwrap();
    let out = procs::lbd_run(lab.lb().ns(), &file, &["--check", "--diff"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!("{} of 65537 slots would move", v["slots_moved"])),
        "{stdout}"
    );
    assert_eq!(state(sock, dir), before, "--check --diff changed something");

    // The real change moves exactly the slots the dry run said.
    let c = lbctl_json(sock, &["backend", "undrain", VIP4, &b0]);
    assert_eq!(
        c["tables"][0]["slots_moved"], v["slots_moved"],
        "{c}
{d}"
    );
    let after = lbctl_json(sock, &["backend", "list", VIP4]);
    for b in v["backends"].as_array().unwrap() {
        let got = after
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["address"] == b["address"])
            .unwrap();
        assert_eq!(got["slots"], b["slots_after"], "{b} vs {got}");
    }
}

fn scratch(name: &str) -> PathBuf {
    procs::scratch(&format!("conns-{name}"))
}

#[test]
fn connections_are_counted_listed_looked_up_and_drained() {
    require_root();
    let t0 = Instant::now();
    let lab = Lab::new(LabSpec { backends: 3 }).expect("building the lab");
    let addrs = [
        SocketAddr::new(IpAddr::from(VIP_V4), 80),
        SocketAddr::new(IpAddr::from(VIP_V6), 80),
    ];
    let _servers: Vec<TcpServer> = (0..3)
        .map(|i| TcpServer::start(lab.backend(i).ns(), &addrs, &format!("backend{i}")).unwrap())
        .collect();
    let _decaps = start_decaps(&lab, 3);
    let dir = scratch("view");
    fs::write(dir.join("lbd.toml"), config(&dir)).unwrap();
    let mut lbd = Lbd::start(lab.lb().ns(), &dir);
    // The scratch directory (config, socket, log) goes with lbd, on success and on panic.
    lbd.own_dir = true;
    let sock = lbd.socket.clone();
    let vip = SocketAddr::new(IpAddr::from(VIP_V4), 80);

    // 200 long-lived connections; the counts match them exactly, per backend.
    let mut conns = LongLived::open(lab.client().ns(), vip, CONNS, Duration::from_secs(5))
        .expect("opening the long-lived connections");
    let want = held(&conns);
    assert!(
        want.values().all(|c| c.0 > 20),
        "the table spreads 200 connections over the three backends: {want:?}"
    );
    let mut last = BTreeMap::new();
    wait_for(
        "backend list to count the test's connections",
        Duration::from_secs(5),
        || {
            last = counts(&sock);
            last == want
        },
    );
    eprintln!("counts match after {:?}: {last:?}", t0.elapsed());

    // stats and /metrics say the same, and the tables' fill.
    let stats = lbctl_json(&sock, &["stats", "--interval", "0.1"]);
    for b in stats["vips"][0]["backends"].as_array().unwrap() {
        let addr = b["address"].as_str().unwrap();
        assert_eq!(b["conns_active"].as_u64(), Some(want[addr].0), "{b}");
    }
    let fill = &stats["conntrack"];
    assert_eq!(fill["ct_capacity"], 262_144, "{fill}");
    assert_eq!(fill["ct_new_capacity"], 65_536, "{fill}");
    assert!(
        fill["ct_entries"].as_u64().unwrap() >= CONNS as u64,
        "{fill}"
    );
    // The connections are IPv4: tracked in CT4, under its 16-byte key.
    assert!(
        fill["ct4_entries"].as_u64().unwrap() >= CONNS as u64,
        "{fill}"
    );
    // The tracked-flow filter, rebuilt by the count: with a few hundred flows in it, a few in
    // a million SYNs of other tuples collide with them, and not none.
    let probe = fill["syn_filter_probe"].as_f64().unwrap();
    assert!(probe > 0.0 && probe < 1e-4, "{fill}");
    let metrics = scrape_metrics(lab.lb().ns());
    for (addr, (active, _, _)) in &want {
        let key =
            format!("lb_backend_connections{{vip=\"{VIP4}\",backend=\"{addr}\",state=\"active\"}}");
        assert_eq!(metrics.get(&key).copied(), Some(*active as f64), "{key}");
    }
    assert_eq!(
        metrics.get("lb_conntrack_capacity{table=\"CT\"}").copied(),
        Some(262_144.0)
    );
    assert!(
        metrics
            .get("lb_conntrack_entries{table=\"CT4\"}")
            .is_some_and(|n| *n >= CONNS as f64),
        "lb_conntrack_entries{{table=\"CT4\"}}"
    );
    assert!(
        metrics
            .get("lb_conntrack_syn_filter_probe_ratio")
            .is_some_and(|r| *r > 0.0 && *r < 1e-4),
        "lb_conntrack_syn_filter_probe_ratio: {:?}",
        metrics.get("lb_conntrack_syn_filter_probe_ratio")
    );

    // conn list: every connection of the test, with its backend.
    let list = lbctl_json(&sock, &["conn", "list", VIP4]);
    assert_eq!(list["matched"], CONNS as u64, "{}", list["matched"]);
    let listed: BTreeMap<String, (String, String)> = list["connections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["client"].as_str().unwrap().to_string(),
                (
                    c["backend"].as_str().unwrap().to_string(),
                    c["state"].as_str().unwrap().to_string(),
                ),
            )
        })
        .collect();
    for (local, name) in conns.locals() {
        let got = listed
            .get(&local.to_string())
            .unwrap_or_else(|| panic!("{local} is not in conn list"));
        assert_eq!(
            got,
            &(address_of(&name), "established".to_string()),
            "{local}"
        );
    }
    let b1 = backend_v4(1).to_string();
    let only = lbctl_json(&sock, &["conn", "list", "--backend", &b1, "--limit", "5"]);
    assert_eq!(only["matched"], want[&b1].0, "{only}");
    assert_eq!(only["connections"].as_array().unwrap().len(), 5, "{only}");
    let text = lbctl(&sock, &["conn", "list", VIP4, "--limit", "3"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("established") && text.contains(&format!("(3 of {CONNS} connections shown")),
        "{text}"
    );

    // lookup: the tracked backend of a held connection, and the table's choice for a new flow
    // from a given port, which the next connection from that port gets.
    let (local, name) = conns.locals()[0].clone();
    let l = lbctl_json(&sock, &["lookup", VIP4, &local.to_string()]);
    assert_eq!(l["tracked"][0]["backend"], address_of(&name), "{l}");
    let client = lab.client().v4();
    for port in [45_001u16, 45_002, 45_003] {
        let from = SocketAddr::new(IpAddr::from(client), port);
        let l = lbctl_json(&sock, &["lookup", VIP4, &from.to_string()]);
        assert!(l["tracked"].as_array().unwrap().is_empty(), "{l}");
        let predicted = l["new_flow_backend"].as_str().unwrap().to_string();
        let got = client_from(lab.client().ns(), from, vip, Duration::from_secs(5))
            .expect("connecting from a chosen port");
        assert_eq!(address_of(&got), predicted, "lookup {from}: {l}");
        let after = lbctl_json(&sock, &["lookup", VIP4, &from.to_string()]);
        assert_eq!(after["tracked"][0]["backend"], predicted, "{after}");
    }
    let shares = lbctl_json(&sock, &["lookup", VIP4, &client.to_string()]);
    let total: f64 = shares["shares_by_port"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_f64().unwrap())
        .sum();
    assert!((total - 1.0).abs() < 0.01, "{shares}");
    assert!(
        shares["tracked"].as_array().unwrap().len() >= CONNS,
        "every flow of the client"
    );
    let bad = lbctl(&sock, &["lookup", VIP4, "10.0.0.5:0"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("port 1 to 65535"));

    // Drain backend 0 and wait while the test closes its connections over 10 s: exit 0 within
    // a second of the last close, not before it.
    let b0 = backend_v4(0).to_string();
    let n0 = want[&b0].0 as usize;
    let mut drain = spawn_lbctl(
        &sock,
        &["backend", "drain", VIP4, &b0, "--wait", "--timeout", "60"],
    );
    let steps = 10;
    let mut last_close = Instant::now();
    for step in 0..steps {
        std::thread::sleep(Duration::from_secs(1));
        assert!(
            drain.child().try_wait().unwrap().is_none(),
            "drain --wait returned with connections still open (step {step})"
        );
        let n = if step + 1 == steps {
            usize::MAX
        } else {
            n0 / steps
        };
        conns.close_some("backend0", n);
        last_close = Instant::now();
    }
    let mut exited = None;
    wait_for("drain --wait to return", Duration::from_secs(5), || {
        exited = drain.child().try_wait().unwrap();
        exited.is_some()
    });
    let after_close = last_close.elapsed();
    let out = drain.0.take().unwrap().wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        exited.unwrap().code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        after_close < Duration::from_secs(1),
        "drain --wait returned {after_close:?} after the last close"
    );
    assert!(stdout.contains("has no active connection"), "{stdout}");
    eprintln!("drain --wait returned within {after_close:?} of the last close");
    let now = counts(&sock);
    assert_eq!(now[&b0].0, 0, "{now:?}");
    // (The lookups' connections above may have gone to backend 0 too.)
    assert!(
        now[&b0].2 >= n0 as u64,
        "the closed connections count as closing: {now:?}"
    );

    // Drain backend 2 with its connections left open: exit 4 at the timeout, naming how many.
    let b2 = backend_v4(2).to_string();
    let n2 = want[&b2].0;
    let started = Instant::now();
    let out = lbctl(
        &sock,
        &["backend", "drain", VIP4, &b2, "--wait", "--timeout", "2"],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert!(
        stderr.contains(&format!("{n2} active connections left")),
        "{stderr}"
    );
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );

    dry_runs_change_nothing(&lab, &sock, &dir);

    // The held connections still work.
    conns.check_all().expect("the remaining connections");
    drop(conns);
    lbd.stop();
    lab.shutdown().expect("tearing down the lab");
    eprintln!("e2e_conns: {:?}", t0.elapsed());
}
