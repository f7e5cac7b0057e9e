//! VIP announcement by BGP with the service configuration in each node's file (no etcd):
//! two nodes behind a router running BIRD 2 announce both VIPs, report their sessions and
//! announcements in `lbctl status` and the metrics, and a drain withdraws the routes while
//! the program stays attached. The fleet under load (spread over nodes, long-lived
//! connections across a node killed, drained, added, its BIRD killed, its program detached,
//! stopped cleanly) is shown with the store in front, in e2e_cluster.
use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};
use tests::{
    fleet::{require_bird, Fleet, PORT, VIP_V4, VIP_V6},
    procs::wait_for,
    require_root,
    tcp::{client_many, tally},
};

/// The bound on how fast a node stops attracting traffic.
const WITHDRAW_BOUND: Duration = Duration::from_secs(3);
/// First sessions: BIRD's connect retry and error wait are 1 s.
const CONVERGE: Duration = Duration::from_secs(30);

fn v4() -> SocketAddr {
    SocketAddr::new(VIP_V4.into(), PORT)
}
fn v6() -> SocketAddr {
    SocketAddr::new(VIP_V6.into(), PORT)
}

#[test]
fn toml_fleet_announces_drains_and_reports() {
    require_root();
    require_bird().unwrap();
    let mut f = Fleet::new(2, &[1, 1]).expect("building the fleet");
    for i in 0..2 {
        f.start_node(i);
    }
    let t = f.wait_next_hops(&[0, 1], CONVERGE);
    println!("two nodes announced; the router has 2 next hops per VIP after {t:?}");
    for i in 0..2 {
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
    for addr in [v4(), v6()] {
        let r = client_many(&f.client, addr, 50, Duration::from_secs(5));
        let failed: Vec<_> = r.iter().filter_map(|r| r.as_ref().err()).collect();
        assert!(failed.is_empty(), "{failed:?}");
        assert_eq!(tally(&r).len(), 2, "both backends answer {addr}");
    }

    // Drained: routes withdrawn, the program stays attached (forwards what arrives), the
    // state in status, metrics and journal; a second drain changes nothing.
    let t = Instant::now();
    let r = f.lbctl(1, &["node", "drain", "--timeout", "1"]);
    assert_eq!(r["node"], "draining", "{r}");
    assert_eq!(r["changed"], true, "{r}");
    f.wait_next_hops(&[0], WITHDRAW_BOUND);
    println!(
        "node1 drained: its routes withdrawn after {:?}",
        t.elapsed()
    );
    let s = f.lbctl(1, &["status"]);
    assert_eq!(s["bgp"]["announced"], serde_json::json!([]), "{s}");
    assert_eq!(s["bgp"]["withheld"][0]["reason"], "node_draining", "{s}");
    wait_for("node1 to report drained", Duration::from_secs(5), || {
        f.lbctl(1, &["status"])["bgp"]["node"] == "drained"
    });
    let s = f.lbctl(1, &["status"]);
    assert_eq!(s["xdp_mode"], "native", "{s}");
    assert_eq!(s["datapath_faults"], serde_json::json!([]), "{s}");
    let m = tests::procs::scrape_metrics(&f.nodes[1].ns);
    assert_eq!(m.get("lb_node_state{state=\"drained\"}"), Some(&1.0));
    let e = f.nodes[1]
        .lbd
        .as_ref()
        .unwrap()
        .wait_event("node_draining", 0);
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .starts_with("lbctl node drain --timeout 1 (by uid"),
        "{e}"
    );
    f.nodes[1]
        .lbd
        .as_ref()
        .unwrap()
        .wait_event("node_drained", 0);
    let again = f.lbctl(1, &["node", "drain"]);
    assert_eq!(again["changed"], false, "{again}");
    let r = f.lbctl(1, &["node", "undrain"]);
    assert_eq!(r["node"], "serving", "{r}");
    let t = f.wait_next_hops(&[0, 1], CONVERGE);
    println!("node1 undrained: announced again after {t:?}");
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
