//! Backend and VIP ids in the lab, through lbd and lbctl (issue 19):
//!
//! * a flow tracked to a backend removed just before a restart must never be forwarded to a
//!   backend added after it (the established path checks only that the tracked id is live, so
//!   the id must not be handed out again);
//! * a VIP added after another was removed starts with its statistics at zero.
use serde_json::Value;
use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    time::Duration,
};
use tests::{
    lab::{Lab, LabSpec, LB_V4, LB_V6, VIP_V4},
    netns::NetNs,
    procs::{
        lbctl_json, lbd_cleanup, scratch, start_decaps, wait_for, wait_neighbours, Lbd, LbdOptions,
        RemoveOnDrop,
    },
    require_root,
    tcp::{client_many, LongLived, TcpServer},
};

const VIP1: &str = "10.200.100.1:80/tcp";
const VIP2: &str = "10.200.100.1:8080/tcp";
const LONG_LIVED: usize = 60;

/// `count` connections to `addr`, which must all succeed.
fn client_many_ok(ns: &NetNs, addr: SocketAddr, count: usize) {
    let results = client_many(ns, addr, count, Duration::from_secs(3));
    let failed: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "connections to {addr} failed: {failed:?}"
    );
}

fn stats(socket: &Path) -> Value {
    lbctl_json(socket, &["stats", "--interval", "0.1"])
}

/// `stats` once the balancer's packet counters no longer move (polled every 100 ms).
fn at_rest(socket: &Path) -> Value {
    let packets = |s: &Value| s["vips"].to_string();
    let mut last = stats(socket);
    wait_for(
        "the counters to come to rest",
        Duration::from_secs(20),
        || {
            let now = stats(socket);
            let still = packets(&now) == packets(&last);
            last = now;
            still
        },
    );
    last
}

fn vip_entry<'a>(stats: &'a Value, name: &str) -> &'a Value {
    stats["vips"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["vip"] == name)
        .unwrap_or_else(|| panic!("no {name} in {stats}"))
}

fn backend_id(socket: &Path, vip: &str, addr: &str) -> u64 {
    lbctl_json(socket, &["backend", "list", vip])
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["address"] == addr)
        .unwrap_or_else(|| panic!("no backend {addr} on {vip}"))["id"]
        .as_u64()
        .unwrap()
}

/// lbd in the lab's balancer namespace through `nsenter --net` (pins land in the host's
/// /sys/fs/bpf and outlive it, as in e2e_restart), logging to `log`; waits until it serves
/// with its program attached.
fn start_lbd(lab: &Lab, config: &Path, socket: &Path, log: &Path) -> Lbd {
    let opts = LbdOptions {
        nsenter: true,
        env: vec![("RUST_LOG".into(), "info".into())],
        log: Some(log.to_path_buf()),
        ..LbdOptions::default()
    };
    let lbd = Lbd::spawn(lab.lb().ns(), config, socket, &opts);
    lbd.wait_ready();
    lbd
}

/// Removes the pins (and with them the link) when dropped, on failure too.
struct PinsOnDrop(std::path::PathBuf);

impl Drop for PinsOnDrop {
    fn drop(&mut self) {
        let _ = lb_userspace::datapath::remove_pins(&self.0);
    }
}

#[test]
fn flows_of_a_backend_removed_before_a_restart_never_reach_a_newcomer() {
    require_root();
    let lab = Lab::new(LabSpec { backends: 4 }).expect("building the lab");
    let pin_dir = Path::new("/sys/fs/bpf").join(format!("{}-ids", lab.prefix()));
    let _pins = PinsOnDrop(pin_dir.clone());
    let vip = SocketAddr::new(IpAddr::from(VIP_V4), 80);
    let vip2 = SocketAddr::new(IpAddr::from(VIP_V4), 8080);
    let _servers: Vec<TcpServer> = (0..4)
        .map(|i| {
            TcpServer::start(lab.backend(i).ns(), &[vip, vip2], &format!("backend{i}")).unwrap()
        })
        .collect();
    let _decaps = start_decaps(&lab, 4);
    let dir = scratch("e2e-ids");
    let _cleanup = RemoveOnDrop(dir.clone());
    let socket = dir.join("lbd.sock");
    let config = dir.join("lbd.toml");
    let mut text = format!(
        "interface = \"eth0\"\nxdp_mode = \"native\"\npin_dir = \"{}\"\ncontrol_socket = \"{}\"\n[encap]\nsource_v4 = \"{LB_V4}\"\nsource_v6 = \"{LB_V6}\"\n\
         [[vip]]\naddress = \"{VIP_V4}\"\nport = 80\nprotocol = \"tcp\"\n",
        pin_dir.display(),
        socket.display()
    );
    for i in 0..3 {
        text.push_str(&format!(
            "[[vip.backend]]\naddress = \"{}\"\nweight = 1\n",
            lab.backend(i).v4()
        ));
    }
    std::fs::write(&config, text).unwrap();
    let mut agent = start_lbd(&lab, &config, &socket, &dir.join("lbd-1.log"));
    let backends: Vec<IpAddr> = (0..3).map(|i| lab.backend(i).v4().into()).collect();
    wait_neighbours(lab.lb().ns(), &backends);

    // Long-lived flows on every backend of VIP 1, C (backend2, the highest id) among them.
    let mut long = LongLived::open(lab.client().ns(), vip, LONG_LIVED, Duration::from_secs(3))
        .expect("opening connections");
    long.check_all().expect("long-lived connections work");
    let on_c = long.backend_counts().get("backend2").copied().unwrap_or(0);
    assert!(on_c > 0, "no flow on backend2: {:?}", long.backend_counts());
    let c = lab.backend(2).v4().to_string();
    let c_id = backend_id(&socket, VIP1, &c);

    // The clients' delayed ACKs would reach the balancer after C's removal and re-steer C's
    // flows before D exists, hiding the bug: remove C only once no packet is in flight.
    let before = at_rest(&socket);

    // Remove C, restart lbd (pins kept), then add a backend to another VIP.
    lbctl_json(&socket, &["backend", "remove", VIP1, &c]);
    agent.stop();
    let mut agent = start_lbd(&lab, &config, &socket, &dir.join("lbd-2.log"));
    lbctl_json(&socket, &["vip", "add", VIP2]);
    let d = lab.backend(3).v4().to_string();
    lbctl_json(&socket, &["backend", "add", VIP2, &d]);
    let d_id = backend_id(&socket, VIP2, &d);
    wait_neighbours(lab.lb().ns(), &[lab.backend(3).v4().into()]);
    println!("backend2 had id {c_id} on {VIP1}; backend3 got id {d_id} on {VIP2}");

    // The old flows' next packets: those on C must not reach D (VIP 2's backend).
    let statuses = long.check();
    let after = stats(&socket);
    let v2 = vip_entry(&after, VIP2);
    let d_packets = v2["backends"][0]["packets"].as_u64().unwrap();
    assert_eq!(
        (v2["packets"].as_u64(), d_packets),
        (Some(0), 0),
        "{on_c} flows tracked to removed backend2 (id {c_id}) were forwarded to {VIP2}'s new backend3 (id {d_id}): {v2}"
    );
    let resteered = |s: &Value| s["counters"]["ct_resteered"].as_u64().unwrap();
    assert!(
        resteered(&after) > resteered(&before),
        "the flows of backend2 are re-steered within {VIP1}: {after}"
    );
    let broken_elsewhere: Vec<_> = statuses
        .iter()
        .filter(|s| !s.is_ok() && s.backend != "backend2")
        .collect();
    assert!(
        broken_elsewhere.is_empty(),
        "flows of the remaining backends broke: {broken_elsewhere:?}"
    );
    // New connections to VIP 2 reach D, which does get packets of its own.
    client_many_ok(lab.client().ns(), vip2, 10);
    assert!(
        vip_entry(&stats(&socket), VIP2)["packets"]
            .as_u64()
            .unwrap()
            > 0
    );

    agent.stop();
    lbd_cleanup(lab.lb().ns(), &config);
}

#[test]
fn a_vip_added_after_another_was_removed_starts_from_zero() {
    require_root();
    let lab = Lab::new(LabSpec { backends: 1 }).expect("building the lab");
    let vip2 = SocketAddr::new(IpAddr::from(VIP_V4), 8080);
    let _server = TcpServer::start(lab.backend(0).ns(), &[vip2], "backend0").unwrap();
    let _decaps = start_decaps(&lab, 1);
    let dir = scratch("e2e-ids-stats");
    std::fs::create_dir_all(dir.join("run")).unwrap();
    let b = lab.backend(0).v4().to_string();
    std::fs::write(
        dir.join("lbd.toml"),
        format!(
            "interface = \"eth0\"\nxdp_mode = \"native\"\npin_dir = \"\"\ncontrol_socket = \"{}\"\n[encap]\nsource_v4 = \"{LB_V4}\"\n\
             [[vip]]\naddress = \"{VIP_V4}\"\nport = 80\nprotocol = \"tcp\"\n[[vip.backend]]\naddress = \"{b}\"\nweight = 1\n",
            dir.join("run/lbd.sock").display()
        ),
    )
    .unwrap();
    let mut lbd = Lbd::start(lab.lb().ns(), &dir);
    lbd.own_dir = true;
    let socket = lbd.socket.clone();
    wait_neighbours(lab.lb().ns(), &[lab.backend(0).v4().into()]);

    lbctl_json(&socket, &["vip", "add", VIP2]);
    lbctl_json(&socket, &["backend", "add", VIP2, &b]);
    client_many_ok(lab.client().ns(), vip2, 20);
    let busy = vip_entry(&stats(&socket), VIP2)["packets"]
        .as_u64()
        .unwrap();
    assert!(busy > 0, "traffic to {VIP2} was counted");
    lbctl_json(&socket, &["vip", "remove", VIP2]);
    let vip3 = "10.200.100.1:8081/tcp";
    lbctl_json(&socket, &["vip", "add", vip3]);
    let fresh = stats(&socket);
    let v3 = vip_entry(&fresh, vip3);
    assert_eq!(
        (v3["packets"].as_u64(), v3["bytes"].as_u64(), v3["new_flows"].as_u64()),
        (Some(0), Some(0), Some(0)),
        "{vip3} was just added and has seen no packet, yet inherits {VIP2}'s counters ({busy} packets): {v3}"
    );
}
