//! A fleet of lbd nodes behind a router running BIRD 2 with ECMP (issue 13, routing part):
//! each node announces its VIPs by BGP only while it can serve them, new connections spread
//! over the nodes and over the backends by weight, and long-lived connections survive a node
//! SIGKILLed, a node drained and undrained, a node added and a node whose program is detached,
//! with 0 resets and 0 backend changes: every node builds the same Maglev table, so a flow
//! whose packets move to another node still reaches its backend. A backend change would show
//! as a failed echo (the other backend has no such connection and answers with a reset).
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    process::{Command, Stdio},
    time::{Duration, Instant},
};
use tests::{
    fleet::{require_bird, Fleet, PORT, VIP_V4, VIP_V6},
    procs::{bin_path, now_ms, wait_for},
    require_root,
    tcp::{client_many, tally, LongLived},
};

/// Long-lived connections per family.
const LONG_V4: usize = 300;
const LONG_V6: usize = 60;
/// The bound on how fast a dead or detached node stops attracting traffic.
const WITHDRAW_BOUND: Duration = Duration::from_secs(3);
/// First sessions: BIRD's connect retry and error wait are 1 s.
const CONVERGE: Duration = Duration::from_secs(30);

fn v4() -> SocketAddr {
    SocketAddr::new(VIP_V4.into(), PORT)
}
fn v6() -> SocketAddr {
    SocketAddr::new(VIP_V6.into(), PORT)
}

fn check_long_lived(what: &str, sets: &mut [&mut LongLived], backends: &[Vec<String>]) {
    for (set, before) in sets.iter_mut().zip(backends) {
        if let Err(e) = set.check_all() {
            panic!("after {what}: {e}");
        }
        assert_eq!(&set.backends(), before, "after {what}: a backend changed");
    }
    let n: usize = sets.iter().map(|s| s.len()).sum();
    println!("after {what}: {n} long-lived connections, 0 resets, 0 backend changes");
}

/// `lbd cleanup --force` on node `i`: its program is detached behind its lbd's back.
fn detach(f: &Fleet, i: usize) {
    let n = &f.nodes[i];
    let out = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", n.ns.name()))
        .arg(bin_path("lbd"))
        .arg("--config")
        .arg(&n.config)
        .args(["cleanup", "--force"])
        .stdin(Stdio::null())
        .output()
        .expect("running lbd cleanup --force");
    assert!(out.status.success(), "lbd cleanup --force: {out:?}");
}

/// Connections from the client, with each node's share (new flows its datapath gave a
/// backend) and each backend's share, printed and checked against the weights.
fn spread(f: &Fleet, nodes: &[usize], per_family: usize) -> BTreeMap<usize, u64> {
    let before: Vec<u64> = nodes.iter().map(|&i| f.node_new_flows(i)).collect();
    let mut results = client_many(&f.client, v4(), per_family, Duration::from_secs(5));
    results.extend(client_many(
        &f.client,
        v6(),
        per_family,
        Duration::from_secs(5),
    ));
    let failed: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "{} connections failed: {failed:?}",
        failed.len()
    );
    let total = results.len() as f64;
    let per_node: BTreeMap<usize, u64> = nodes
        .iter()
        .zip(before)
        .map(|(&i, b)| (i, f.node_new_flows(i) - b))
        .collect();
    println!("{} new connections (IPv4 and IPv6):", results.len());
    for (i, n) in &per_node {
        println!("  node{i}: {n} flows ({:.1}%)", 100.0 * *n as f64 / total);
    }
    let seen: u64 = per_node.values().sum();
    assert!(
        seen >= results.len() as u64,
        "the nodes' counters saw {seen} new flows for {} connections",
        results.len()
    );
    for (i, n) in &per_node {
        assert!(
            *n as f64 >= 0.10 * total,
            "node{i} got {n} of {total} new flows: ECMP does not spread over it"
        );
    }
    let counts = tally(&results);
    let sum: u32 = f.weights.iter().sum();
    for (b, w) in f.weights.iter().enumerate() {
        let got = counts.get(&format!("backend{b}")).copied().unwrap_or(0) as f64 / total;
        let want = f64::from(*w) / f64::from(sum);
        println!(
            "  backend{b} (weight {w}): {:.1}% (weight share {:.1}%)",
            100.0 * got,
            100.0 * want
        );
        assert!(
            (got - want).abs() < 0.08,
            "backend{b} got {got:.3} of the connections, its weight share is {want:.3}"
        );
    }
    per_node
}

#[test]
fn fleet_spreads_and_keeps_connections_across_kill_drain_add_and_detach() {
    require_root();
    require_bird().unwrap();
    let mut f = Fleet::new(4, &[1, 1, 2]).expect("building the fleet");
    for i in 0..3 {
        f.start_node(i);
    }
    let t = f.wait_next_hops(&[0, 1, 2], CONVERGE);
    println!("three nodes announced; the router has 3 next hops per VIP after {t:?}");
    for i in 0..3 {
        let s = f.try_wait_announcing(i, CONVERGE).unwrap();
        let metrics = tests::procs::scrape_metrics(&f.nodes[i].ns);
        assert_eq!(
            metrics.get("lb_bgp_announced{prefix=\"198.51.100.10/32\"}"),
            Some(&1.0),
            "node{i}: {s}"
        );
        assert_eq!(
            metrics.get(&format!(
                "lb_bgp_session_established{{peer=\"{}\"}}",
                tests::fleet::router_v4()
            )),
            Some(&1.0)
        );
    }

    let text = tests::procs::lbctl(&f.nodes[0].socket, &["status"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("node       serving"), "{text}");
    assert!(
        text.contains("announced 198.51.100.10/32, 2001:db8:100::10/128"),
        "{text}"
    );
    assert!(text.contains("established"), "{text}");

    spread(&f, &[0, 1, 2], 300);

    let mut ll4 = LongLived::open(&f.client, v4(), LONG_V4, Duration::from_secs(10)).unwrap();
    let mut ll6 = LongLived::open(&f.client, v6(), LONG_V6, Duration::from_secs(10)).unwrap();
    let backends = [ll4.backends(), ll6.backends()];
    check_long_lived("opening", &mut [&mut ll4, &mut ll6], &backends);

    // A node SIGKILLed: its BIRD dies with it (PR_SET_PDEATHSIG), the router sees the
    // sessions close and withdraws at once.
    let t = Instant::now();
    f.nodes[0].lbd.as_mut().unwrap().sigkill();
    wait_for("node0's routes withdrawn", WITHDRAW_BOUND, || {
        f.next_hops(VIP_V4.into()).len() == 2 && f.next_hops(VIP_V6.into()).len() == 2
    });
    let withdrawn = t.elapsed();
    f.wait_next_hops(&[1, 2], Duration::from_secs(1));
    println!("node0 SIGKILLed: its routes withdrawn from the router after {withdrawn:?}");
    check_long_lived("node0 SIGKILLed", &mut [&mut ll4, &mut ll6], &backends);

    // A node drained, then undrained.
    let t = Instant::now();
    let r = f.lbctl(1, &["node", "drain", "--timeout", "2"]);
    assert_eq!(r["node"], "draining", "{r}");
    assert_eq!(r["changed"], true, "{r}");
    f.wait_next_hops(&[2], WITHDRAW_BOUND);
    println!(
        "node1 drained: its routes withdrawn after {:?}",
        t.elapsed()
    );
    let s = f.lbctl(1, &["status"]);
    assert_eq!(s["bgp"]["announced"], serde_json::json!([]), "{s}");
    assert_eq!(s["bgp"]["withheld"][0]["reason"], "node_draining", "{s}");
    check_long_lived("node1 drained", &mut [&mut ll4, &mut ll6], &backends);
    wait_for("node1 to report drained", Duration::from_secs(5), || {
        f.lbctl(1, &["status"])["bgp"]["node"] == "drained"
    });
    // Drained, still forwarding whatever arrives: the program stays on the interface.
    let s = f.lbctl(1, &["status"]);
    assert_eq!(s["xdp_mode"], "native", "{s}");
    assert_eq!(s["datapath_faults"], serde_json::json!([]), "{s}");
    let m = tests::procs::scrape_metrics(&f.nodes[1].ns);
    assert_eq!(m.get("lb_node_state{state=\"drained\"}"), Some(&1.0));
    f.nodes[1]
        .lbd
        .as_ref()
        .unwrap()
        .wait_event("node_drained", 0);
    let again = f.lbctl(1, &["node", "drain"]);
    assert_eq!(again["changed"], false, "{again}");
    let r = f.lbctl(1, &["node", "undrain"]);
    assert_eq!(r["node"], "serving", "{r}");
    let t = f.wait_next_hops(&[1, 2], CONVERGE);
    println!("node1 undrained: announced again after {t:?}");
    check_long_lived("node1 undrained", &mut [&mut ll4, &mut ll6], &backends);

    // A node added.
    f.start_node(3);
    let t = f.wait_next_hops(&[1, 2, 3], CONVERGE);
    println!("node3 added: in the router's ECMP after {t:?}");
    check_long_lived("node3 added", &mut [&mut ll4, &mut ll6], &backends);
    spread(&f, &[1, 2, 3], 300);
    check_long_lived("new connections", &mut [&mut ll4, &mut ll6], &backends);

    // A node's BIRD killed alone: its routes go with it, lbd starts it again and announces.
    let s = f.lbctl(1, &["status"]);
    let speaker = s["bgp"]["speaker"].as_str().unwrap().to_string();
    let pid: i32 = speaker
        .strip_prefix("running (pid ")
        .and_then(|r| r.split(')').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no BIRD pid in {speaker:?}"));
    let asked = now_ms();
    // SAFETY: kill(2) on the pid lbd reports for its BIRD child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    f.wait_next_hops(&[2, 3], WITHDRAW_BOUND);
    let t = f.wait_next_hops(&[1, 2, 3], CONVERGE);
    println!(
        "node1's BIRD SIGKILLed: withdrawn, then started again by lbd and announced after {t:?}"
    );
    f.nodes[1]
        .lbd
        .as_ref()
        .unwrap()
        .wait_event("bgp_speaker_failed", asked);
    check_long_lived("node1's BIRD killed", &mut [&mut ll4, &mut ll6], &backends);

    // A node whose program is detached behind its lbd's back stops announcing.
    let t = Instant::now();
    detach(&f, 2);
    f.wait_next_hops(&[1, 3], WITHDRAW_BOUND);
    println!(
        "node2's program detached: its routes withdrawn after {:?}",
        t.elapsed()
    );
    let s = f.lbctl(2, &["status"]);
    assert_eq!(s["bgp"]["withheld"][0]["reason"], "datapath_faults", "{s}");
    check_long_lived("node2 detached", &mut [&mut ll4, &mut ll6], &backends);

    // A node stopped cleanly (SIGTERM): BIRD tells the router, which withdraws at once.
    let t = Instant::now();
    let status = f.nodes[3].lbd.as_mut().unwrap().stop();
    assert!(status.success(), "node3's lbd exited with {status}");
    f.wait_next_hops(&[1], WITHDRAW_BOUND);
    println!(
        "node3 stopped (SIGTERM): its routes withdrawn after {:?}",
        t.elapsed()
    );
    check_long_lived("node3 stopped", &mut [&mut ll4, &mut ll6], &backends);
}

#[test]
fn bgp_settings_are_checked() {
    let bad = |extra: &str| {
        let text = format!(
            "interface = \"eth0\"\n[bgp]\nlocal_as = 65001\npeer_as = 65000\npeers = [\"10.0.0.1\"]\nrouter_id = \"10.0.0.2\"\n{extra}\n[[vip]]\naddress = \"2001:db8::1\"\nport = 80\nprotocol = \"tcp\"\n"
        );
        lb_userspace::Config::parse(&text).unwrap_err().to_string()
    };
    let e = bad("");
    assert!(
        e.contains("bgp has no IPv6 peer") && e.contains("bgp.peers"),
        "{e}"
    );
    let e = bad("hold_time = 1");
    assert!(e.contains("bgp.hold_time: 1 is below 3"), "{e}");
}
