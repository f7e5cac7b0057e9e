//! End to end through the kernel: a client namespace, the balancer namespace with XDP attached
//! to its veth, and backend namespaces (VIP on loopback, decapsulation attached), all on one
//! bridge. Real TCP clients and servers; both forwarding modes, both address families.
use lb_userspace::{
    config::XdpMode, datapath::conntrack::ConntrackReader, netif, Balancer, Config, Decap,
    LoadOptions,
};
use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::Duration,
};
use tests::{
    lab::{Lab, LabSpec, LB_V4, LB_V6, VIP_V4, VIP_V6},
    procs::{backend_addrs, wait_neighbours},
    require_root,
    tcp::{client_many, tally, LongLived, TcpServer},
};

const PORT: u16 = 80;
const SHORT_CONNECTIONS: usize = 3000;
const LONG_LIVED: usize = 90;

/// Config text for one VIP of `family` with `backends` as (backend index, weight).
fn config(lab: &Lab, v6: bool, forwarding: &str, backends: &[(usize, u32)]) -> Config {
    let vip: IpAddr = if v6 { VIP_V6.into() } else { VIP_V4.into() };
    let mut text = format!(
        "interface = \"eth0\"\nxdp_mode = \"native\"\npin_dir = \"\"\n[encap]\nsource_v4 = \"{LB_V4}\"\nsource_v6 = \"{LB_V6}\"\n\
         [[vip]]\naddress = \"{vip}\"\nport = {PORT}\nprotocol = \"tcp\"\nforwarding = \"{forwarding}\"\n"
    );
    for (i, w) in backends {
        let addr = if v6 {
            IpAddr::from(lab.backend(*i).v6())
        } else {
            lab.backend(*i).v4().into()
        };
        text.push_str(&format!(
            "[[vip.backend]]\naddress = \"{addr}\"\nweight = {w}\n"
        ));
    }
    Config::parse(&text).expect("test config is valid")
}

/// Each backend's share of `counts` is within 5 percentage points of its weight share.
fn assert_shares(counts: &BTreeMap<String, usize>, weights: &[(usize, u32)], what: &str) {
    let total: usize = counts.values().sum();
    let wsum: u32 = weights.iter().map(|(_, w)| w).sum();
    for (i, w) in weights {
        let got = *counts.get(&format!("backend{i}")).unwrap_or(&0) as f64 / total as f64;
        let want = *w as f64 / wsum as f64;
        println!(
            "{what}: backend{i} got {:.1}% (weight share {:.1}%)",
            got * 100.0,
            want * 100.0
        );
        assert!(
            (got - want).abs() <= 0.05,
            "{what}: backend{i} got {:.1}% of {total} connections, weight share is {:.1}% (counts {counts:?})",
            got * 100.0,
            want * 100.0
        );
    }
    for name in counts.keys() {
        assert!(
            weights
                .iter()
                .any(|(i, w)| *w > 0 && name == &format!("backend{i}")),
            "{what}: {name} got connections but has no weight (counts {counts:?})"
        );
    }
}

/// Rebuilds the tracked-flow filter from `CT` every 20 ms while the traffic runs (lbd does it
/// with every scan, every 10 s at least), so that the SYNs of reused tuples meet filters
/// rebuilt under them: a flow of `CT` missing from the filter would send its tuple's next
/// SYN past its entry, to the old connection's backend. Stopped when dropped.
struct Rebuilds {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<u64>>,
}

impl Rebuilds {
    fn start(reader: ConntrackReader) -> Rebuilds {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut n = 0;
            while !flag.load(Ordering::Relaxed) {
                if reader
                    .rebuild_filter()
                    .expect("rebuilding the filter")
                    .is_some()
                {
                    n += 1;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            n
        });
        Rebuilds {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops the thread; the number of rebuilds it made.
    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let t = self.thread.take().expect("running");
        t.join().expect("the rebuild thread panicked")
    }
}

impl Drop for Rebuilds {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Fields drop in order: programs and servers leave before the namespaces are deleted.
struct Running {
    lb: Balancer,
    _servers: Vec<TcpServer>,
    _decaps: Vec<Decap>,
    lab: Lab,
}

impl Running {
    fn start(v6: bool, forwarding: &str, backends: usize, weights: &[(usize, u32)]) -> Running {
        require_root();
        let lab = Lab::new(LabSpec { backends }).expect("building the lab");
        let vip: IpAddr = if v6 { VIP_V6.into() } else { VIP_V4.into() };
        let servers = (0..backends)
            .map(|i| {
                TcpServer::start(
                    lab.backend(i).ns(),
                    &[SocketAddr::new(vip, PORT)],
                    &format!("backend{i}"),
                )
                .expect("starting a backend server")
            })
            .collect();
        let decaps = (0..backends)
            .map(|i| {
                lab.backend(i).ns().run_in(|| {
                    let mut d = Decap::load().expect("loading decap");
                    d.add_vip(VIP_V4.into()).unwrap();
                    d.add_vip(VIP_V6.into()).unwrap();
                    for a in netif::interface_addrs("eth0").unwrap() {
                        d.add_local(a).unwrap();
                    }
                    d.attach("eth0", XdpMode::Native).expect("attaching decap");
                    d
                })
            })
            .collect();
        let cfg = config(&lab, v6, forwarding, weights);
        let lb = lab.lb().ns().run_in(|| {
            let mut lb = Balancer::load(LoadOptions::from(&cfg)).expect("loading the balancer");
            lb.apply(&cfg).expect("applying the config");
            lb.attach("eth0", XdpMode::Native)
                .expect("attaching the balancer");
            lb.apply(&cfg).expect("resolving next hops");
            lb
        });
        // Managed neighbour entries resolve in the background.
        wait_neighbours(lab.lb().ns(), &backend_addrs(&cfg));
        Running {
            lab,
            lb,
            _servers: servers,
            _decaps: decaps,
        }
    }

    fn apply(&mut self, cfg: &Config) {
        let lb = &mut self.lb;
        self.lab
            .lb()
            .ns()
            .run_in(|| lb.apply(cfg).expect("applying the new config"));
        wait_neighbours(self.lab.lb().ns(), &backend_addrs(cfg));
    }

    fn vip(&self, v6: bool) -> SocketAddr {
        SocketAddr::new(if v6 { VIP_V6.into() } else { VIP_V4.into() }, PORT)
    }

    fn counters(&self) -> BTreeMap<&'static str, u64> {
        self.lb
            .counters()
            .unwrap()
            .into_iter()
            .map(|(c, v)| (c.name(), v))
            .collect()
    }
}

fn scenario(v6: bool, forwarding: &str) {
    let weights = [(0, 1), (1, 2), (2, 3)];
    let mut run = Running::start(v6, forwarding, 4, &weights);
    let vip = run.vip(v6);
    let what = format!("{} {forwarding}", if v6 { "IPv6" } else { "IPv4" });
    let rebuilds = Rebuilds::start(run.lb.conntrack_reader());

    // Thousands of short connections: all complete, shares follow the weights.
    let results = client_many(
        run.lab.client().ns(),
        vip,
        SHORT_CONNECTIONS,
        Duration::from_secs(3),
    );
    let failed: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "{what}: {} of {SHORT_CONNECTIONS} connections failed, first: {:?}\n{}",
        failed.len(),
        failed.first(),
        run.lab.diagnostics()
    );
    assert_shares(&tally(&results), &weights, &format!("{what} short"));

    // The datapath counted them: new flows per backend match what the servers saw.
    let c = run.counters();
    println!("{what} counters: {c:?}");
    for reason in [
        "drop_fib",
        "drop_no_backend",
        "drop_adjust",
        "drop_no_encap_source",
        "pass_malformed",
    ] {
        assert_eq!(c[reason], 0, "{what}: {reason} moved");
    }
    let vip_state = run.lb.vips().next().expect("one VIP").clone();
    let vip_stats = run.lb.vip_stats(vip_state.vip_id).unwrap();
    // A client port reused for a later connection hits that flow's tracked entry, so new flows
    // can be a little under the number of connections. Every connection sends at least 4
    // packets to the VIP (SYN, ACK, request, FIN): usually 5, but a client that has the server's
    // FIN before it closes acknowledges it with its own FIN (seen once in 3000: 14999 packets).
    assert!(
        vip_stats.new_flows >= SHORT_CONNECTIONS as u64 * 95 / 100
            && vip_stats.packets >= 4 * SHORT_CONNECTIONS as u64,
        "{what}: VIP stats {vip_stats:?}"
    );
    let (mut packets, mut bytes, mut new_flows) = (0, 0, 0);
    for b in &vip_state.backends {
        let s = run.lb.backend_stats(b.id).unwrap();
        assert!(
            s.packets > 0 && s.new_flows > 0,
            "{what}: backend {} stats {s:?}",
            b.address
        );
        packets += s.packets;
        bytes += s.bytes;
        new_flows += s.new_flows;
    }
    assert_eq!(
        (packets, bytes, new_flows),
        (vip_stats.packets, vip_stats.bytes, vip_stats.new_flows),
        "{what}: per-backend counters must add up to the VIP's"
    );

    // Long-lived connections keep their backend across a removal, an addition and reweights.
    let mut long = LongLived::open(
        run.lab.client().ns(),
        vip,
        LONG_LIVED,
        Duration::from_secs(3),
    )
    .expect("opening long-lived connections");
    long.check_all()
        .expect("long-lived connections echo before the change");
    let before = long.backend_counts();
    println!("{what} long-lived per backend: {before:?}");
    assert!(
        before.len() == 3,
        "{what}: long-lived connections should reach all three backends: {before:?}"
    );

    let new_weights = [(1, 5), (2, 1), (3, 2)];
    run.apply(&config(&run.lab, v6, forwarding, &new_weights));
    let statuses = long.check();
    let mut survivors = 0;
    for s in &statuses {
        if s.backend != "backend0" {
            assert!(
                s.is_ok(),
                "{what}: connection {} to {} broke after the change: {:?}",
                s.index,
                s.backend,
                s.outcome
            );
            survivors += 1;
        }
    }
    println!("{what}: {survivors} long-lived connections on remaining backends survived with zero resets");
    assert!(survivors > LONG_LIVED / 2);
    // A second round of weight changes, with the survivors still checked.
    let third = [(1, 1), (2, 1), (3, 1)];
    run.apply(&config(&run.lab, v6, forwarding, &third));
    for s in long.check() {
        if s.backend != "backend0" {
            assert!(
                s.is_ok(),
                "{what}: connection {} to {} broke after the reweight: {:?}",
                s.index,
                s.backend,
                s.outcome
            );
        }
    }

    // New connections follow the new table: none to the removed backend.
    let results = client_many(
        run.lab.client().ns(),
        vip,
        SHORT_CONNECTIONS / 2,
        Duration::from_secs(3),
    );
    let failed: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "{what}: {} of {} connections failed after the change, first: {:?}; counters {:?}\n{}",
        failed.len(),
        results.len(),
        failed.first(),
        run.counters(),
        run.lab.diagnostics()
    );
    assert_shares(&tally(&results), &third, &format!("{what} after change"));
    let n = rebuilds.finish();
    println!("{what}: the tracked-flow filter was rebuilt {n} times under the traffic");
    assert!(
        n >= 10,
        "{what}: only {n} rebuilds of the tracked-flow filter"
    );
}

#[test]
fn ipv4_ipip() {
    scenario(false, "ipip");
}

#[test]
fn ipv6_ipip() {
    scenario(true, "ipip");
}

#[test]
fn ipv4_l2() {
    scenario(false, "l2");
}

#[test]
fn ipv6_l2() {
    scenario(true, "l2");
}
