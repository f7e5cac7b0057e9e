//! Tests of the namespace harness itself (no balancer involved): a 3-backend lab, direct
//! client → backend TCP over IPv4 and IPv6, long-lived echo connections, and clean teardown.

use std::net::SocketAddr;
use std::time::Duration;

use tests::{
    client_many, client_once, list_namespaces, require_root, root_links_named, tally, Lab, LabSpec,
    LongLived, NetNs, Role, TcpServer, VIP_V4, VIP_V6,
};

const TIMEOUT: Duration = Duration::from_secs(3);

#[test]
fn lab_direct_tcp_long_lived_and_teardown() {
    require_root();
    let lab = Lab::new(LabSpec { backends: 3 }).expect("building the lab");
    let names = lab.namespace_names();
    assert_eq!(
        names.len(),
        6,
        "switch + client + lb + 3 backends: {names:?}"
    );

    // Facts the accessors report match the topology.
    assert_eq!(lab.backends().len(), 3);
    assert_eq!(lab.backend(2).v4().to_string(), "10.200.0.13");
    assert_eq!(lab.backend(2).v6().to_string(), "fd00:200::13");
    assert_eq!(lab.lb().v4().to_string(), "10.200.0.2");
    let macs: std::collections::HashSet<_> = lab.hosts().iter().map(|h| h.mac()).collect();
    assert_eq!(macs.len(), 5, "distinct MACs");
    for h in lab.hosts() {
        assert!(
            h.ifindex() > 1,
            "{:?} eth0 ifindex {}",
            h.role(),
            h.ifindex()
        );
        assert!(h.ns_name().starts_with(lab.prefix()));
    }
    let lb_port = lab
        .switch()
        .exec_ok("ethtool", ["-k", lab.lb().switch_port()])
        .unwrap();
    assert!(
        lb_port.contains("generic-receive-offload: on"),
        "GRO on the lb's switch port:\n{lb_port}"
    );
    let sysctl =
        |ns: &NetNs, key: &str| ns.exec_ok("sysctl", ["-n", key]).unwrap().trim().to_owned();
    let b1 = lab.backend(1).ns();
    assert_eq!(sysctl(b1, "net.ipv4.conf.eth0.arp_ignore"), "1");
    assert_eq!(sysctl(b1, "net.ipv4.conf.all.arp_announce"), "2");
    assert_eq!(sysctl(b1, "net.ipv4.conf.all.rp_filter"), "0");
    assert_eq!(sysctl(lab.lb().ns(), "net.ipv6.conf.eth0.forwarding"), "1");
    assert_eq!(sysctl(lab.lb().ns(), "net.ipv4.conf.all.forwarding"), "1");
    assert!(
        lab.lb().switch_port_has_xdp(),
        "XDP_PASS on the lb's switch port"
    );
    assert!(!lab.client().switch_port_has_xdp());
    let port = lab
        .switch()
        .ip(["link", "show", "dev", lab.lb().switch_port()])
        .unwrap();
    assert!(port.contains("prog/xdp"), "{port}");
    let vips = lab
        .backend(0)
        .ns()
        .ip(["-br", "addr", "show", "dev", "lo"])
        .unwrap();
    assert!(
        vips.contains(&VIP_V4.to_string()) && vips.contains(&VIP_V6.to_string()),
        "{vips}"
    );

    // Each backend serves on its own addresses, v4 and v6.
    let servers: Vec<TcpServer> = lab
        .backends()
        .iter()
        .enumerate()
        .map(|(i, b)| TcpServer::start(b.ns(), &b.sockaddrs(7000), &format!("backend{i}")).unwrap())
        .collect();
    let client = lab.client().ns();
    for (i, b) in lab.backends().iter().enumerate() {
        for addr in b.sockaddrs(7000) {
            let name = client_once(client, addr, TIMEOUT)
                .unwrap_or_else(|e| panic!("client → {addr}: {e}\n{}", lab.diagnostics()));
            assert_eq!(name, format!("backend{i}"), "answer from {addr}");
        }
    }
    let many = client_many(
        client,
        SocketAddr::new(lab.backend(1).v6().into(), 7000),
        20,
        TIMEOUT,
    );
    assert_eq!(tally(&many).get("backend1"), Some(&20), "{many:?}");

    // Long-lived connections echo, repeatedly, and know their backend.
    let mut v4 = LongLived::open(client, lab.backend(0).sockaddrs(7000)[0], 4, TIMEOUT).unwrap();
    let mut v6 = LongLived::open(client, lab.backend(2).sockaddrs(7000)[1], 4, TIMEOUT).unwrap();
    assert_eq!(v4.backend_counts().get("backend0"), Some(&4));
    assert_eq!(v6.backend_counts().get("backend2"), Some(&4));
    for _ in 0..3 {
        v4.check_all().unwrap();
        v6.check_all().unwrap();
    }
    assert!(
        servers[0].accepted() >= 6,
        "accepted {}",
        servers[0].accepted()
    );

    // Stopping a server closes its connections; the client notices.
    let mut servers = servers;
    drop(servers.remove(2));
    let after = v6.check();
    assert!(after.iter().all(|s| !s.is_ok()), "{after:?}");
    v4.check_all().unwrap();
    drop((v4, v6, servers));

    lab.shutdown().expect("teardown leaves nothing behind");
    let left: Vec<_> = list_namespaces()
        .unwrap()
        .into_iter()
        .filter(|n| names.contains(n))
        .collect();
    assert!(left.is_empty(), "namespaces left: {left:?}");
    assert!(root_links_named("lbp-").unwrap().is_empty());
}

#[test]
fn dropped_lab_leaves_no_namespace() {
    require_root();
    let lab = Lab::new(LabSpec { backends: 1 }).unwrap();
    let names = lab.namespace_names();
    let _srv = TcpServer::start(lab.backend(0).ns(), &lab.backend(0).sockaddrs(0), "b").unwrap();
    drop(lab);
    let all = list_namespaces().unwrap();
    assert!(names.iter().all(|n| !all.contains(n)), "left: {all:?}");
}

#[test]
fn netns_runs_code_inside_and_kills_spawned_processes() {
    require_root();
    let ns = NetNs::new("harness").unwrap();
    let name = ns.name().to_owned();
    ns.ip(["link", "add", "hv0", "type", "veth", "peer", "name", "hv1"])
        .unwrap();
    let inside = ns.run_in(|| {
        let n = std::ffi::CString::new("hv0").unwrap();
        // SAFETY: valid NUL-terminated string.
        unsafe { libc::if_nametoindex(n.as_ptr()) }
    });
    assert_ne!(inside, 0, "hv0 visible inside the namespace");
    assert!(
        root_links_named("hv0").unwrap().is_empty(),
        "but not in the root namespace"
    );
    let t = ns.thread(|| std::fs::read_to_string("/proc/thread-self/net/dev").unwrap());
    assert!(t.join().unwrap().contains("hv1"));

    let sleeper = ns.spawn("sleep", ["1000"]);
    let pid = sleeper.id();
    // An untracked grandchild, like an nginx worker, dies too.
    let out = ns.exec("sh", ["-c", "sleep 1000 >/dev/null 2>&1 & echo $!"]);
    let orphan: u32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    assert!(ns.pids().contains(&pid) && ns.pids().contains(&orphan));
    drop(ns);
    let mut sleeper = sleeper;
    let status = sleeper.wait().unwrap();
    assert!(!status.success(), "sleep was killed: {status}");
    assert!(
        !std::path::Path::new(&format!("/proc/{orphan}/ns")).exists() || {
            // A zombie has no namespaces left to show.
            std::fs::read_link(format!("/proc/{orphan}/ns/net")).is_err()
        }
    );
    assert!(!list_namespaces().unwrap().contains(&name));
}

/// `bench lab`'s floor and switch: the minimal forwarder on a second balancer host sends TCP
/// to the VIPs' port 80 back out to the backend of the source port, and the XDP switch on that
/// host's port hands its frames straight to the backends' ports (veth counters show both
/// steps); the answers come back through the bridge.
#[test]
fn xdp_switch_and_minimal_forwarder_carry_tcp_to_every_backend() {
    require_root();
    let mut lab = Lab::new(LabSpec { backends: 3 }).expect("building the lab");
    let node = lab
        .add(Role::Node(1))
        .expect("adding a second balancer host");
    let reflector = node.attach_reflector(3).unwrap();
    let port = node.switch_port().to_owned();
    lab.switch_lb_frames_in_xdp().expect("the XDP switch");
    lab.route_vips_via(Role::Node(1)).unwrap();
    let client = lab.client().ns();
    let vips = [
        SocketAddr::new(VIP_V4.into(), 80),
        SocketAddr::new(VIP_V6.into(), 80),
    ];
    let _servers: Vec<TcpServer> = lab
        .backends()
        .iter()
        .enumerate()
        .map(|(i, b)| TcpServer::start(b.ns(), &vips, &format!("backend{i}")).unwrap())
        .collect();
    for vip in vips {
        let many = client_many(client, vip, 30, TIMEOUT);
        let counts = tally(&many);
        assert_eq!(
            counts.values().sum::<usize>(),
            30,
            "{vip}: {many:?}\n{}",
            lab.diagnostics()
        );
        for i in 0..3 {
            assert!(
                counts.get(&format!("backend{i}")).is_some_and(|&n| n > 0),
                "{vip}: every backend answers: {counts:?}"
            );
        }
    }
    let stat = |ns: &NetNs, dev: &str, name: &str| -> u64 {
        let out = ns.exec_ok("ethtool", ["-S", dev]).unwrap();
        out.lines()
            .filter_map(|l| l.trim().strip_prefix(name)?.trim().strip_prefix(':'))
            .map(|v| v.trim().parse::<u64>().unwrap())
            .sum()
    };
    let sent = stat(lab.host(Role::Node(1)).ns(), "eth0", "rx_queue_0_xdp_tx");
    assert!(sent >= 60, "the forwarder sent {sent} frames");
    let redirected = stat(lab.switch(), &port, "rx_queue_0_xdp_redirect");
    assert!(
        redirected >= sent,
        "the switch redirected {redirected} of {sent} frames"
    );
    drop(reflector);
    lab.shutdown().expect("teardown leaves nothing behind");
}
