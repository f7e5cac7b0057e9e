//! Fleet mode's store, end to end: a real etcd (Debian's etcd-server) in its own namespace,
//! three lbd nodes (`lbd --etcd URL --prefix P --node nI`), each in its own namespace with its
//! own veth and XDP program, on one segment with a client and three backends (IP-in-IP, decap
//! on the backends). No BGP: the client's route to the VIP names one node at a time.
//!
//! Shown: a change written once with `lbctl --etcd` reaches every node, and their Maglev
//! tables, read from each node's pinned maps, are the same slot for slot (so connections keep
//! their backend when their packets move to another node); bad data in etcd is refused whole
//! by every node, naming the key, the previous revision serving; concurrent writers lose
//! nothing; the leader SIGKILLed: another node takes over within the lease; stopped cleanly:
//! at once. etcd stopped for 30 s and health decided by the leader are shown with BGP and
//! ECMP in front, in e2e_cluster.
use std::{
    collections::BTreeMap,
    fs,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    process::Child,
    time::{Duration, Instant},
};
use tests::{
    backend_v4, backend_v6,
    etcd::{
        assert_same_tables, fleet_applied, lbctl_fleet, lbctl_fleet_ok, pinned_tables, shares,
        v4_table, EtcdServer,
    },
    procs::{lbctl_json, poll_until, scrape_metrics, start_decaps, wait_for, Lbd, LbdOptions},
    require_root, Lab, LabSpec, LongLived, NetNs, Role, TcpServer, VIP_V4, VIP_V6,
};

const NODES: usize = 3;
const VIP: &str = "10.200.100.1:80/tcp";
/// Within the lease (3 s) plus a read or two.
const CONVERGE: Duration = Duration::from_secs(15);

struct Fleet {
    nodes: Vec<Option<Lbd>>,
    dir: PathBuf,
    prefix: String,
    etcd: EtcdServer,
    /// Kept for their lifetime: the backends answer while the fleet lives.
    _servers: Vec<Option<TcpServer>>,
    decaps: Vec<Child>,
    lab: Lab,
}

impl Fleet {
    fn new() -> Fleet {
        require_root();
        let mut lab = Lab::new(LabSpec { backends: 3 }).expect("building the lab");
        for i in 1..NODES {
            lab.add(Role::Node(i)).expect("adding a node");
        }
        let store_addr = IpAddr::V4(lab.add(Role::Store).expect("adding the store").v4());
        let etcd = EtcdServer::start(lab.host(Role::Store).ns(), store_addr).expect("etcd");
        let dir = std::env::temp_dir().join(format!("{}-fleet-store", lab.prefix()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let servers = (0..3)
            .map(|i| {
                let addrs = [
                    SocketAddr::new(IpAddr::V4(VIP_V4), 80),
                    SocketAddr::new(IpAddr::from(backend_v4(i)), 80),
                ];
                Some(TcpServer::start(lab.backend(i).ns(), &addrs, &format!("backend{i}")).unwrap())
            })
            .collect();
        let decaps = start_decaps(&lab, 3);
        let prefix = format!("/lbtest/{}", lab.prefix());
        Fleet {
            nodes: (0..NODES).map(|_| None).collect(),
            dir,
            prefix,
            etcd,
            _servers: servers,
            decaps,
            lab,
        }
    }

    fn node_ns(&self, i: usize) -> &NetNs {
        if i == 0 {
            self.lab.lb().ns()
        } else {
            self.lab.host(Role::Node(i)).ns()
        }
    }

    fn node_v4(&self, i: usize) -> IpAddr {
        IpAddr::V4(if i == 0 {
            self.lab.lb().v4()
        } else {
            self.lab.host(Role::Node(i)).v4()
        })
    }

    fn pin_dir(&self, i: usize) -> PathBuf {
        PathBuf::from(format!("/sys/fs/bpf/{}-fleet-n{i}", self.lab.prefix()))
    }

    fn socket(&self, i: usize) -> PathBuf {
        self.dir.join(format!("n{i}.sock"))
    }

    /// Starts node `i`: its file holds only its own settings (no VIP).
    fn start(&mut self, i: usize) {
        let (v4, v6) = if i == 0 {
            (self.lab.lb().v4(), self.lab.lb().v6())
        } else {
            let h = self.lab.host(Role::Node(i));
            (h.v4(), h.v6())
        };
        let config = self.dir.join(format!("n{i}.toml"));
        fs::write(
            &config,
            format!(
                "interface = \"eth0\"\nxdp_mode = \"native\"\npin_dir = \"{}\"\ncontrol_socket = \"{}\"\n\
                 [encap]\nsource_v4 = \"{v4}\"\nsource_v6 = \"{v6}\"\n",
                self.pin_dir(i).display(),
                self.socket(i).display()
            ),
        )
        .unwrap();
        let opts = LbdOptions {
            nsenter: true,
            env: vec![("RUST_LOG".into(), "info".into())],
            log: Some(self.dir.join(format!("n{i}.log"))),
            args: [
                "--etcd",
                &self.etcd.url,
                "--prefix",
                &self.prefix,
                "--node",
                &format!("n{i}"),
            ]
            .map(String::from)
            .to_vec(),
            ..LbdOptions::default()
        };
        let mut lbd = Lbd::spawn(self.node_ns(i), &config, self.socket(i), &opts);
        lbd.wait_serving();
        self.nodes[i] = Some(lbd);
    }

    fn alive(&self) -> Vec<usize> {
        (0..NODES).filter(|&i| self.nodes[i].is_some()).collect()
    }

    /// `lbctl --etcd ... ARGS` from node 0's namespace (where etcd is reachable).
    fn ctl(&self, args: &[&str]) -> String {
        lbctl_fleet_ok(self.lab.client().ns(), &self.etcd.url, &self.prefix, args)
    }

    fn cluster(&self) -> serde_json::Value {
        serde_json::from_str(&self.ctl(&["cluster", "status", "--json"])).unwrap()
    }

    fn fleet_status(&self, i: usize) -> serde_json::Value {
        lbctl_json(&self.socket(i), &["status"])["fleet"].clone()
    }

    /// Waits until every live node applies the store's configuration revision (and the
    /// leader's weights for it) with the store reachable; returns that revision.
    fn wait_in_sync(&self) -> i64 {
        let (mut rev, mut last) = (0, serde_json::Value::Null);
        let synced = poll_until(CONVERGE, || {
            let c = self.cluster();
            rev = c["config_revision"].as_i64().unwrap();
            let synced = self.alive().iter().all(|&i| {
                let f = self.fleet_status(i);
                let ok = fleet_applied(&f, rev);
                last = f;
                ok
            });
            (synced && c["weights_config_revision"].as_i64() == Some(rev)).then_some(rev)
        });
        synced.unwrap_or_else(|| {
            panic!(
                "nodes not in sync on revision {rev} within {CONVERGE:?}; last node status {last:#}; cluster {:#}; logs:\n{}",
                self.cluster(),
                self.logs()
            )
        })
    }

    /// Every live node's tables, asserted identical; returns them.
    fn same_tables(&self) -> BTreeMap<String, Vec<IpAddr>> {
        let alive = self.alive();
        let tables: Vec<_> = alive
            .iter()
            .map(|&i| (format!("node n{i}"), pinned_tables(&self.pin_dir(i))))
            .collect();
        assert!(!tables[0].1.is_empty(), "node {} has no table", alive[0]);
        assert_same_tables(tables)
    }

    /// Sends the client's traffic for the VIP to node `i`.
    fn route_via(&self, i: usize) {
        self.lab
            .client()
            .ns()
            .ip([
                "route",
                "replace",
                &format!("{VIP_V4}/32"),
                "via",
                &self.node_v4(i).to_string(),
            ])
            .unwrap();
    }

    fn logs(&self) -> String {
        (0..NODES)
            .map(|i| {
                let log =
                    fs::read_to_string(self.dir.join(format!("n{i}.log"))).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(25).collect();
                format!(
                    "--- n{i}\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn leader(&self) -> Option<usize> {
        let c = self.cluster();
        let name = c["leader"].as_str()?;
        name.strip_prefix('n')?.parse().ok()
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.nodes.iter_mut().for_each(|n| *n = None);
        for i in 0..NODES {
            let pins = self.pin_dir(i);
            if pins.exists() {
                let _ = lb_userspace::datapath::remove_pins(&pins);
            }
        }
        for d in &mut self.decaps {
            let _ = d.kill();
            let _ = d.wait();
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn vip_addr() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(VIP_V4), 80)
}

#[test]
fn one_configuration_in_etcd_every_node_the_same_table() {
    let mut fx = Fleet::new();
    let b = |i: usize| backend_v4(i).to_string();

    // Written once, before any node runs.
    fx.ctl(&["vip", "add", VIP]);
    for (i, w) in [(0, "1"), (1, "1"), (2, "2")] {
        fx.ctl(&["backend", "add", VIP, &b(i), "--weight", w]);
    }
    let vip6 = format!("[{VIP_V6}]:80/tcp");
    fx.ctl(&["vip", "add", &vip6]);
    for i in 0..3 {
        fx.ctl(&["backend", "add", &vip6, &backend_v6(i).to_string()]);
    }
    for i in 0..NODES {
        fx.start(i);
    }
    let rev = fx.wait_in_sync();
    let c = fx.cluster();
    assert_eq!(c["nodes"].as_array().unwrap().len(), NODES, "{c:#}");
    assert!(c["leader"].is_string(), "{c:#}");
    let tables = fx.same_tables();
    assert_eq!(tables.len(), 2, "an IPv4 and an IPv6 VIP");
    let share = shares(v4_table(&tables));
    let b2 = share[&IpAddr::from(backend_v4(2))] as f64;
    let b0 = share[&IpAddr::from(backend_v4(0))] as f64;
    assert!((b2 / b0 - 2.0).abs() < 0.05, "weights 1:1:2 give {share:?}");
    eprintln!("revision {rev}: 3 nodes, identical tables, slots per backend {share:?}");

    // A node's own control socket refuses service changes (they belong in the store) and
    // says where it gets them from.
    let own = tests::procs::lbctl(&fx.socket(1), &["backend", "set-weight", VIP, &b(0), "5"]);
    assert_eq!(own.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&own.stderr).contains("this lbd is a fleet node"),
        "{own:?}"
    );
    let text = tests::procs::lbctl(&fx.socket(1), &["status"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("fleet      node n1"), "{text}");
    let text = fx.ctl(&["cluster", "status"]);
    assert_eq!(text.matches("in sync").count(), NODES, "{text}");

    // Concurrent writers lose nothing: each transaction holds only if what it read is
    // unchanged, and is otherwise read, edited and tried again.
    let extra = |w: usize, k: usize| format!("10.200.0.{}", 100 + 10 * w + k);
    std::thread::scope(|s| {
        for w in 0..2 {
            let fx = &fx;
            s.spawn(move || {
                for k in 0..3 {
                    fx.ctl(&["backend", "add", VIP, &extra(w, k)]);
                }
            });
        }
    });
    let c = fx.cluster();
    let key = format!("{}/config/vips/{VIP}", fx.prefix);
    let stored = fx.etcd.get(&key).unwrap().unwrap();
    for w in 0..2 {
        for k in 0..3 {
            assert!(
                stored.contains(&extra(w, k)),
                "{} lost: {stored}",
                extra(w, k)
            );
            fx.ctl(&["backend", "remove", VIP, &extra(w, k)]);
        }
    }
    assert!(c["config_revision"].as_i64().unwrap() > rev);
    let rev = fx.wait_in_sync();

    // Every node forwards, and a connection keeps its backend when its packets move to another
    // node (no shared connection state: the tables are the same).
    for i in 0..NODES {
        fx.route_via(i);
        let name =
            tests::client_once(fx.lab.client().ns(), vip_addr(), Duration::from_secs(3)).unwrap();
        assert!(name.starts_with("backend"), "via n{i}: {name}");
    }
    fx.route_via(0);
    let mut long = LongLived::open(fx.lab.client().ns(), vip_addr(), 30, Duration::from_secs(3))
        .expect("opening long-lived connections");
    fx.route_via(1);
    long.check_all()
        .expect("connections moved from n0 to n1 keep their backend");

    // A change written once reaches every node.
    fx.ctl(&["backend", "set-weight", VIP, &b(0), "3"]);
    let rev2 = fx.wait_in_sync();
    assert!(rev2 > rev);
    let share = shares(v4_table(&fx.same_tables()));
    assert!(share[&IpAddr::from(backend_v4(0))] > share[&IpAddr::from(backend_v4(2))]);
    long.check_all()
        .expect("long-lived connections after a weight change");

    // Bad data is refused whole by every node, naming the key; the revision before serves.
    let good = fx.etcd.get(&key).unwrap().expect("the VIP's key");
    let before = fx.same_tables();
    let bad = good.replacen("\"weight\":3", "\"weight\":10001", 1);
    assert_ne!(bad, good, "{good}");
    fx.etcd.put(&key, &bad).unwrap();
    for i in fx.alive() {
        wait_for("the bad revision refused", CONVERGE, || {
            fx.fleet_status(i)["last_error"]
                .as_str()
                .is_some_and(|e| e.contains(&key) && e.contains("weight 10001 is out of range"))
        });
        assert_eq!(fx.fleet_status(i)["applied_revision"].as_i64(), Some(rev2));
    }
    assert_eq!(fx.same_tables(), before, "bad data changed a table");
    let refused = lbctl_fleet(
        fx.lab.client().ns(),
        &fx.etcd.url,
        &fx.prefix,
        &["backend", "set-weight", VIP, &b(1), "2"],
    );
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains(&key));
    fx.etcd.put(&key, &good).unwrap();
    fx.wait_in_sync();
    long.check_all()
        .expect("long-lived connections through bad data");

    // (etcd stopped and back, with traffic and every node saying so: e2e_cluster.)
    fx.ctl(&["backend", "drain", VIP, &b(1)]);
    let rev3 = fx.wait_in_sync();
    let share = shares(v4_table(&fx.same_tables()));
    assert!(
        !share.contains_key(&IpAddr::from(backend_v4(1))),
        "{share:?}"
    );
    for i in fx.alive() {
        assert_eq!(
            scrape_metrics(fx.node_ns(i))["lb_fleet_applied_revision"],
            rev3 as f64
        );
    }

    // The leader SIGKILLed: another node takes over; changes still reach every live node.
    let old = fx.leader().expect("a leader");
    let survivor = (0..NODES).find(|&i| i != old).unwrap();
    fx.route_via(survivor);
    long.check_all().expect("connections moved to a survivor");
    let t = Instant::now();
    fx.nodes[old].take().unwrap().sigkill();
    wait_for("a new leader", CONVERGE, || {
        fx.leader().is_some_and(|l| l != old)
    });
    let took = t.elapsed();
    let new = fx.leader().unwrap();
    eprintln!("leader n{old} killed: n{new} leads after {took:?}");
    fx.ctl(&["backend", "undrain", VIP, &b(1)]);
    fx.wait_in_sync();
    let c = fx.cluster();
    assert_eq!(c["nodes"].as_array().unwrap().len(), NODES - 1, "{c:#}");
    fx.same_tables();
    long.check_all()
        .expect("long-lived connections across the failover");

    // The killed node comes back and catches up.
    fx.start(old);
    fx.wait_in_sync();
    fx.same_tables();
    drop(long);

    // A leader stopped cleanly hands over at once: it revokes its lease on the way out.
    let lead = fx.leader().expect("a leader");
    let t = Instant::now();
    let status = fx.nodes[lead].take().unwrap().stop();
    assert!(status.success(), "{status}");
    wait_for("a new leader after a clean stop", CONVERGE, || {
        fx.leader().is_some_and(|l| l != lead)
    });
    let took = t.elapsed();
    eprintln!(
        "leader n{lead} stopped (SIGTERM): n{} leads after {took:?}",
        fx.leader().unwrap()
    );
    assert!(
        took < Duration::from_secs(2),
        "{took:?}: the lease was not revoked"
    );
    fx.start(lead);
    fx.wait_in_sync();
    // (Health decided by the leader for every node, a backend killed: e2e_cluster.)
}
