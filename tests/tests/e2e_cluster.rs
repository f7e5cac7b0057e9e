//! The fleet end to end (issue 13): a real etcd holding the one configuration, a router
//! running BIRD 2 with ECMP on the 5-tuple (IPv4 and IPv6), lbd nodes in `--etcd` mode that
//! announce the VIPs by BGP through their own BIRD, three backends behind IP-in-IP, real TCP.
//! One topology, built once, goes through every scenario in turn:
//!
//! - new connections spread over the three nodes (each node's counters) and the backends by
//!   weight; `lbctl cluster status` shows every node's role, revision and BGP side;
//! - a backend change written once to etcd reaches every node, whose Maglev tables, read from
//!   their pinned maps, are the same slot for slot;
//! - 360 long-lived connections (300 IPv4, 60 IPv6) across etcd stopped for 30 s while new
//!   connections keep coming (0 failed), a node SIGKILLed (its routes withdrawn: time printed),
//!   a node drained and undrained, a node added once etcd is back: 0 resets and 0 backend
//!   changes; a change made after etcd returns applies everywhere;
//! - a backend killed: the leader's health checks take it out of every node's table within
//!   the health bound; every node, the leader too, applies it from the published weights, so
//!   every node goes through the same tables and they differ only for the skew between the
//!   nodes' watch deliveries (measured, bounded); the followers set its DOWN flag too, so
//!   long-lived connections to it through them are re-steered.
//!
//! A backend change would show as a failed echo on a long-lived connection: the other backend
//! has no such connection and answers with a reset.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};
use tests::{
    etcd::{assert_same_tables, shares, v4_table},
    fleet::{backend_v4, backend_v6, require_bird, vip_name, Fleet, PORT, VIP_V4, VIP_V6},
    procs::{lbd_run, now_ms, scrape_metrics, wait_for},
    require_root,
    tcp::{client_many, tally, LongLived},
};

const LONG_V4: usize = 300;
const LONG_V6: usize = 60;
/// The bound on how fast a dead node stops attracting traffic.
const WITHDRAW_BOUND: Duration = Duration::from_secs(3);
/// First sessions: BIRD's connect retry and error wait are 1 s.
const CONVERGE: Duration = Duration::from_secs(30);
/// A revision reaches every node within a watch round; a leader change within the lease.
const SYNC: Duration = Duration::from_secs(15);
const OUTAGE: Duration = Duration::from_secs(30);
/// Health checks set on the VIPs for the backend-kill scenario.
const PROBE_INTERVAL_MS: u64 = 200;
const PROBE_TIMEOUT_MS: u64 = 200;
const FALL: u64 = 2;
/// Down after `FALL` failed probes (one interval apart, each at most the timeout), then one
/// leader round (200 ms) to publish and a watch event to every follower: 1 s allowed for
/// those and for scheduling on a busy machine.
/// How long the nodes' tables may differ while a revision reaches each node's watch.
const SKEW_BOUND: Duration = Duration::from_millis(500);
const HEALTH_BOUND: Duration =
    Duration::from_millis(FALL * PROBE_INTERVAL_MS + PROBE_TIMEOUT_MS + 1000);

fn v4() -> SocketAddr {
    SocketAddr::new(VIP_V4.into(), PORT)
}
fn v6() -> SocketAddr {
    SocketAddr::new(VIP_V6.into(), PORT)
}

fn check_long_lived(f: &Fleet, what: &str, sets: &mut [&mut LongLived], backends: &[Vec<String>]) {
    for (set, before) in sets.iter_mut().zip(backends) {
        let failed: Vec<_> = set
            .check()
            .into_iter()
            .filter(|s| s.outcome.is_err())
            .collect();
        if !failed.is_empty() {
            let mut why = String::new();
            for s in &failed {
                let _ = write!(
                    why,
                    "\n  #{} {} (backend {}): {}",
                    s.index,
                    s.local,
                    s.backend,
                    s.outcome.as_ref().unwrap_err()
                );
                why.push_str(&tracked_on_nodes(f, s.local));
            }
            panic!(
                "after {what}: {} of {} long-lived connections failed:{why}",
                failed.len(),
                set.len()
            );
        }
        assert_eq!(&set.backends(), before, "after {what}: a backend changed");
    }
    let n: usize = sets.iter().map(|s| s.len()).sum();
    println!("after {what}: {n} long-lived connections, 0 resets, 0 backend changes");
}

/// What each running node's connection tables hold for the client address `local`: where a
/// failed connection's packets went.
fn tracked_on_nodes(f: &Fleet, local: SocketAddr) -> String {
    let mut out = String::new();
    for (i, n) in f.nodes.iter().enumerate() {
        if n.lbd.is_none() {
            continue;
        }
        let entries = match f.try_lbctl(i, &["conn", "list"]) {
            Ok(list) => list["connections"]
                .as_array()
                .map(|c| {
                    c.iter()
                        .filter(|e| e["client"].as_str() == Some(local.to_string().as_str()))
                        .map(|e| e.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .unwrap_or_default(),
            Err(e) => format!("lbctl conn list failed: {e:#}"),
        };
        let _ = write!(out, "\n      node{i}: [{entries}]");
    }
    out
}

/// Connections from the client, with each node's share (new flows its datapath gave a
/// backend) and each backend's share, printed and checked against the weights (within 8
/// points: with 300 connections a family, a sequential-port client through Maglev and the
/// flow hash strays up to 5.8 points in 20,000 simulated runs; with 150, 0.75% of runs
/// strayed past 8, and one fresh-clone run did).
fn spread(f: &Fleet, nodes: &[usize], per_family: usize) {
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
    println!("{} new connections (IPv4 and IPv6):", results.len());
    let mut seen = 0;
    for (&i, b) in nodes.iter().zip(before) {
        let n = f.node_new_flows(i) - b;
        seen += n;
        println!("  node{i}: {n} flows ({:.1}%)", 100.0 * n as f64 / total);
        assert!(
            n as f64 >= 0.10 * total,
            "node{i} got {n} of {total} new flows: ECMP does not spread over it"
        );
    }
    assert!(
        seen >= results.len() as u64,
        "the nodes' counters saw {seen} new flows for {} connections",
        results.len()
    );
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
}

/// Nodes `nodes`' tables, asserted the same slot for slot (by the backend address each slot
/// leads to: the ids in the ring index each node's own backend array, numbered by that node's
/// history, so a node added later may use other ids for the same backends); returns them.
fn same_tables(f: &Fleet, nodes: &[usize]) -> BTreeMap<String, Vec<IpAddr>> {
    let first = assert_same_tables(
        nodes
            .iter()
            .map(|&i| (format!("node{i}"), f.tables(i)))
            .collect(),
    );
    assert_eq!(first.len(), 2, "node{}: an IPv4 and an IPv6 VIP", nodes[0]);
    first
}

/// `lbctl cluster status`: every node in `nodes`, in sync, with its BGP side serving, its
/// sessions up and both VIPs announced (a node reports at least once a second).
fn check_cluster_status(f: &Fleet, nodes: &[usize]) {
    f.try_wait_reported(nodes, SYNC).unwrap();
    let text = f.ctl_store(&["cluster", "status"]);
    assert_eq!(text.matches("in sync").count(), nodes.len(), "{text}");
    assert_eq!(
        text.matches("bgp serving, sessions 2/2 established, announces 198.51.100.10/32 2001:db8:100::10/128").count(),
        nodes.len(),
        "{text}"
    );
    println!("{text}");
}

/// Sets tcp health checks on both VIPs, in the store (as `etcdctl put` of the VIP's key).
fn set_health(f: &Fleet) {
    for vip in [IpAddr::from(VIP_V4), IpAddr::from(VIP_V6)] {
        let key = format!("{}/config/vips/{}", f.etcd_prefix, vip_name(vip));
        let text = f.store().get(&key).unwrap().expect("the VIP's key");
        let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v["health"] = serde_json::json!({"kind": "tcp", "interval_ms": PROBE_INTERVAL_MS,
            "timeout_ms": PROBE_TIMEOUT_MS, "rise": 2, "fall": FALL});
        f.store().put(&key, &v.to_string()).unwrap();
    }
}

/// New connections from a second thread until `stop`: (connections, failures).
fn traffic(client: &tests::NetNs, stop: &AtomicBool) -> (usize, Vec<String>) {
    let (mut n, mut failed) = (0, Vec::new());
    while !stop.load(Ordering::Relaxed) {
        for addr in [v4(), v6()] {
            for r in client_many(client, addr, 10, Duration::from_secs(3)) {
                n += 1;
                if let Err(e) = r {
                    failed.push(format!("{addr}: {e}"));
                }
            }
        }
    }
    (n, failed)
}

/// `lbd cleanup --force` on node `i`: its program is detached behind its lbd's back.
fn detach(f: &Fleet, i: usize) {
    let n = &f.nodes[i];
    let out = lbd_run(&n.ns, &n.config, &["cleanup", "--force"]);
    assert!(out.status.success(), "lbd cleanup --force: {out:?}");
}

/// The other ways a node stops serving, on nodes 1, 2, 3 (all serving), with long-lived
/// connections to the two live backends: a node's BIRD killed alone (lbd restarts it), a
/// node's program detached behind its lbd's back, and the leader stopped cleanly (another
/// node leads, taking over the health the old leader published: backend2 stays out of every
/// table, so the flows that move keep their backend).
fn node_failures(f: &mut Fleet) {
    let mut ll4 = LongLived::open(&f.client, v4(), 100, Duration::from_secs(10)).unwrap();
    let mut ll6 = LongLived::open(&f.client, v6(), 30, Duration::from_secs(10)).unwrap();
    let backends = [ll4.backends(), ll6.backends()];
    let c = f.cluster();
    let leader: usize = c["leader"]
        .as_str()
        .and_then(|l| l.strip_prefix('n'))
        .and_then(|i| i.parse().ok())
        .unwrap_or_else(|| panic!("no leader: {c:#}"));
    let others: Vec<usize> = [1, 2, 3].into_iter().filter(|&i| i != leader).collect();
    let (a, b) = (others[0], others[1]);
    let but =
        |x: &[usize]| -> Vec<usize> { [1, 2, 3].into_iter().filter(|i| !x.contains(i)).collect() };

    let s = f.lbctl(a, &["status"]);
    let speaker = s["bgp"]["speaker"].as_str().unwrap().to_string();
    let pid: i32 = speaker
        .strip_prefix("running (pid ")
        .and_then(|r| r.split(')').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no BIRD pid in {speaker:?}"));
    let asked = now_ms();
    // SAFETY: kill(2) on the pid lbd reports for its BIRD child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let t = f.wait_next_hops(&but(&[a]), WITHDRAW_BOUND);
    println!("node{a}'s BIRD SIGKILLed: its routes withdrawn after {t:?}");
    let t = f.wait_next_hops(&[1, 2, 3], CONVERGE);
    println!("  started again by lbd and announced after {t:?} more");
    f.nodes[a]
        .lbd
        .as_ref()
        .unwrap()
        .wait_event("bgp_speaker_failed", asked);
    check_long_lived(
        f,
        "a node's BIRD killed",
        &mut [&mut ll4, &mut ll6],
        &backends,
    );

    let t = Instant::now();
    detach(f, b);
    f.wait_next_hops(&but(&[b]), WITHDRAW_BOUND);
    println!(
        "node{b}'s program detached: its routes withdrawn after {:?}",
        t.elapsed()
    );
    let s = f.lbctl(b, &["status"]);
    assert_eq!(s["bgp"]["withheld"][0]["reason"], "datapath_faults", "{s}");
    check_long_lived(f, "a node detached", &mut [&mut ll4, &mut ll6], &backends);

    let t = Instant::now();
    let status = f.nodes[leader].lbd.as_mut().unwrap().stop();
    assert!(status.success(), "node{leader}'s lbd exited with {status}");
    f.wait_next_hops(&[a], WITHDRAW_BOUND);
    println!(
        "node{leader} (the leader) stopped (SIGTERM): its routes withdrawn after {:?}",
        t.elapsed()
    );
    wait_for("a new leader", SYNC, || {
        f.cluster()["leader"]
            .as_str()
            .is_some_and(|l| l != format!("n{leader}"))
    });
    f.wait_in_sync(&[a, b], SYNC);
    // Node b's pins went with its program; node a carries every flow now.
    let dead: IpAddr = backend_v4(2).into();
    assert!(
        !v4_table(&f.tables(a)).contains(&dead),
        "node{a} brought backend2 back"
    );
    check_long_lived(
        f,
        "the leader stopped",
        &mut [&mut ll4, &mut ll6],
        &backends,
    );
}

#[test]
fn fleet_one_store_bgp_ecmp_identical_tables() {
    require_root();
    require_bird().unwrap();
    let started = Instant::now();
    let mut f = Fleet::with_store(4, &[1, 1, 2]).expect("building the fleet");
    for i in 0..3 {
        f.start_node(i);
    }
    let t = f.wait_next_hops(&[0, 1, 2], CONVERGE);
    println!("three nodes announced; the router has 3 next hops per VIP after {t:?}");
    let rev = f.wait_in_sync(&[0, 1, 2], SYNC);
    check_cluster_status(&f, &[0, 1, 2]);
    let tables = same_tables(&f, &[0, 1, 2]);
    let share = shares(v4_table(&tables));
    println!("revision {rev}: 3 nodes, identical tables, IPv4 slots per backend {share:?}");
    spread(&f, &[0, 1, 2], 300);

    // A backend change written once to the store reaches every node; tables stay identical.
    let t = Instant::now();
    for (vip, b) in [
        (VIP_V4.into(), backend_v4(0).into()),
        (VIP_V6.into(), backend_v6(0).into()),
    ] {
        let b: IpAddr = b;
        f.ctl_store(&["backend", "set-weight", &vip_name(vip), &b.to_string(), "2"]);
    }
    f.weights[0] = 2;
    let rev2 = f.wait_in_sync(&[0, 1, 2], SYNC);
    let took = t.elapsed();
    let tables = same_tables(&f, &[0, 1, 2]);
    let share = shares(v4_table(&tables));
    let (b0, b2) = (share[&backend_v4(0).into()], share[&backend_v4(2).into()]);
    assert!(rev2 > rev);
    assert!(
        (b0 as f64 / b2 as f64 - 1.0).abs() < 0.05,
        "weights 2:1:2 give {share:?}"
    );
    println!("backend0's weight set to 2 once in etcd: every node on revision {rev2} after {took:?}, identical tables {share:?}");

    let mut ll4 = LongLived::open(&f.client, v4(), LONG_V4, Duration::from_secs(10)).unwrap();
    let mut ll6 = LongLived::open(&f.client, v6(), LONG_V6, Duration::from_secs(10)).unwrap();
    let backends = [ll4.backends(), ll6.backends()];
    check_long_lived(&f, "opening", &mut [&mut ll4, &mut ll6], &backends);

    // etcd stopped for 30 s while new connections keep coming; meanwhile a node dies and
    // another is drained and undrained (node-local: no store needed).
    let stop = AtomicBool::new(false);
    let mut etcd = f.etcd.take().unwrap();
    let mut node0 = f.nodes[0].lbd.take().unwrap();
    let (n, failed) = std::thread::scope(|s| {
        let load = s.spawn(|| traffic(&f.client, &stop));
        let down = Instant::now();
        etcd.kill();
        for i in 0..3 {
            wait_for("the node to see etcd gone", SYNC, || {
                f.lbctl(i, &["status"])["fleet"]["store_connected"] == false
            });
            assert_eq!(
                scrape_metrics(&f.nodes[i].ns)["lb_fleet_store_connected"],
                0.0
            );
        }
        println!("etcd killed: every node says so after {:?}", down.elapsed());

        let t = Instant::now();
        node0.sigkill();
        wait_for("node0's routes withdrawn", WITHDRAW_BOUND, || {
            f.next_hops(VIP_V4.into()).len() == 2 && f.next_hops(VIP_V6.into()).len() == 2
        });
        println!(
            "node0 SIGKILLed: its routes withdrawn from the router after {:?}",
            t.elapsed()
        );
        f.wait_next_hops(&[1, 2], Duration::from_secs(1));
        check_long_lived(&f, "node0 SIGKILLed", &mut [&mut ll4, &mut ll6], &backends);

        let t = Instant::now();
        let r = f.lbctl(1, &["node", "drain", "--timeout", "2"]);
        assert_eq!(r["node"], "draining", "{r}");
        f.wait_next_hops(&[2], WITHDRAW_BOUND);
        println!(
            "node1 drained: its routes withdrawn after {:?}",
            t.elapsed()
        );
        check_long_lived(&f, "node1 drained", &mut [&mut ll4, &mut ll6], &backends);
        wait_for("node1 to report drained", Duration::from_secs(5), || {
            f.lbctl(1, &["status"])["bgp"]["node"] == "drained"
        });
        let r = f.lbctl(1, &["node", "undrain"]);
        assert_eq!(r["node"], "serving", "{r}");
        let t = f.wait_next_hops(&[1, 2], CONVERGE);
        println!("node1 undrained: announced again after {t:?}");
        check_long_lived(&f, "node1 undrained", &mut [&mut ll4, &mut ll6], &backends);

        // The rest of the outage: the nodes keep forwarding on the revision they applied.
        while down.elapsed() < OUTAGE {
            std::thread::sleep(Duration::from_millis(200));
        }
        for i in 1..3 {
            let s = f.lbctl(i, &["status"])["fleet"].clone();
            assert_eq!(s["store_connected"], false, "{s}");
            assert_eq!(s["applied_revision"].as_i64(), Some(rev2), "{s}");
        }
        etcd.restart().expect("etcd back");
        println!("etcd back after {:?}", down.elapsed());
        stop.store(true, Ordering::Relaxed);
        load.join().unwrap()
    });
    f.etcd = Some(etcd);
    drop(node0);
    assert!(n > 0);
    assert!(
        failed.is_empty(),
        "{} of {n} connections failed during the etcd outage: {failed:?}",
        failed.len()
    );
    println!("during the etcd outage: {n} new connections, 0 failed");
    check_long_lived(&f, "etcd outage", &mut [&mut ll4, &mut ll6], &backends);
    f.wait_in_sync(&[1, 2], SYNC);

    // A node added: it takes the store's configuration and the leader's weights before it
    // announces, so the flows ECMP moves to it keep their backend.
    f.start_node(3);
    let t = f.wait_next_hops(&[1, 2, 3], CONVERGE);
    println!("node3 added: in the router's ECMP after {t:?}");
    f.wait_in_sync(&[1, 2, 3], SYNC);
    same_tables(&f, &[1, 2, 3]);
    check_long_lived(&f, "node3 added", &mut [&mut ll4, &mut ll6], &backends);
    spread(&f, &[1, 2, 3], 300);

    // A change made after etcd returned is applied everywhere (moving no established flow).
    let t = Instant::now();
    for (vip, b) in [
        (VIP_V4.into(), backend_v4(1).into()),
        (VIP_V6.into(), backend_v6(1).into()),
    ] {
        let b: IpAddr = b;
        f.ctl_store(&["backend", "set-weight", &vip_name(vip), &b.to_string(), "2"]);
    }
    f.weights[1] = 2;
    let rev3 = f.wait_in_sync(&[1, 2, 3], SYNC);
    let share = shares(v4_table(&same_tables(&f, &[1, 2, 3])));
    println!("after etcd returned, backend1's weight set to 2: every node on revision {rev3} after {:?}, identical tables {share:?}", t.elapsed());
    check_long_lived(
        &f,
        "a change after etcd returned",
        &mut [&mut ll4, &mut ll6],
        &backends,
    );
    check_cluster_status(&f, &[1, 2, 3]);
    drop((ll4, ll6));

    // A backend killed: the leader's health checks take it out of every node's table; the
    // tables are sampled throughout to see how long, and in how many slots, they differ.
    set_health(&f);
    f.wait_in_sync(&[1, 2, 3], SYNC);
    let dead: IpAddr = backend_v4(2).into();
    let live = [1, 2, 3];
    wait_for("every node to serve all three backends", SYNC, || {
        live.iter()
            .all(|&i| shares(v4_table(&f.tables(i))).contains_key(&dead))
    });
    same_tables(&f, &live);
    // Long-lived connections, some through followers to backend2: once every node sets its
    // DOWN flag, their next packets are steered to another backend on whichever node they hit.
    let mut ll_dead = LongLived::open(&f.client, v4(), 150, Duration::from_secs(10)).unwrap();
    let to_dead = ll_dead
        .backend_counts()
        .get("backend2")
        .copied()
        .unwrap_or(0);
    assert!(
        to_dead > 0,
        "no long-lived connection to backend2: {:?}",
        ll_dead.backend_counts()
    );
    let leader = f.cluster()["leader"].as_str().unwrap().to_string();
    let followers: Vec<usize> = live
        .iter()
        .copied()
        .filter(|i| format!("n{i}") != leader)
        .collect();
    let resteered = |i: usize| {
        scrape_metrics(&f.nodes[i].ns)["lb_datapath_events_total{event=\"ct_resteered\"}"]
    };
    let before: Vec<f64> = followers.iter().map(|&i| resteered(i)).collect();
    // Every distinct table each node showed for each VIP, in order: every node must go
    // through the same. By VIP: a revision rewrites one VIP's table after the other, and each
    // table switches at once, but a sample can fall between the two.
    let mut seen: BTreeMap<(usize, String), Vec<Vec<IpAddr>>> = BTreeMap::new();
    let t = Instant::now();
    f.servers[2] = None;
    let mut out_at: BTreeMap<usize, Duration> = BTreeMap::new();
    let dead_both: [IpAddr; 2] = [dead, backend_v6(2).into()];
    let (mut samples, mut differing, mut max_differ_slots, mut max_live_differ) = (0, 0, 0, 0);
    let (mut first_differ, mut last_differ) = (None, None);
    while out_at.len() < live.len() {
        let tables: Vec<_> = live.iter().map(|&i| f.tables(i)).collect();
        let now = t.elapsed();
        samples += 1;
        for (k, &i) in live.iter().enumerate() {
            for (vip, slots) in &tables[k] {
                let states = seen.entry((i, vip.clone())).or_default();
                if states.last() != Some(slots) {
                    states.push(slots.clone());
                }
            }
        }
        for (k, &i) in live.iter().enumerate() {
            if !tables[k]
                .values()
                .any(|s| s.contains(&dead) || s.contains(&backend_v6(2).into()))
            {
                out_at.entry(i).or_insert(now);
            }
        }
        // Differing slots, and those among them where neither node's slot leads to the dead
        // backend (only these would send a flow that changes node to another live backend).
        let (mut slots, mut live_slots) = (0, 0);
        for t in &tables[1..] {
            for (vip, s) in t {
                for (a, b) in s.iter().zip(&tables[0][vip]).filter(|(a, b)| a != b) {
                    slots += 1;
                    if !dead_both.contains(a) && !dead_both.contains(b) {
                        live_slots += 1;
                    }
                }
            }
        }
        max_live_differ = max_live_differ.max(live_slots);
        if slots > 0 {
            differing += 1;
            max_differ_slots = max_differ_slots.max(slots);
            first_differ.get_or_insert(now);
            last_differ = Some(now);
        }
        assert!(
            now < HEALTH_BOUND * 2,
            "backend2 still in tables after {now:?}: out of {out_at:?}"
        );
    }
    let slowest = *out_at.values().max().unwrap();
    println!("backend2 killed: out of each node's table after {out_at:?} (bound {HEALTH_BOUND:?}: probes every {PROBE_INTERVAL_MS} ms, fall {FALL})");
    let window = match (first_differ, last_differ) {
        (Some(a), Some(b)) => b - a,
        _ => Duration::ZERO,
    };
    println!("  tables sampled {samples} times meanwhile: {differing} samples differed, over {window:?} (the skew between the first and the last node applying the leader's revision), in up to {max_differ_slots} slots (both VIPs, 2042 slots), {max_live_differ} of them between two live backends");
    assert!(
        slowest <= HEALTH_BOUND,
        "backend2 left the last table after {slowest:?}, bound {HEALTH_BOUND:?}"
    );
    // Every node, the leader too, builds from the weights the leader published: each went
    // through the same tables, in the same order.
    let mut per_vip = Vec::new();
    for ((i, vip), states) in &seen {
        let first = &seen[&(live[0], vip.clone())];
        assert!(
            states == first,
            "node{i} went through {} tables of {vip}, node{} through {}: not the same sequence",
            states.len(),
            live[0],
            first.len()
        );
        if *i == live[0] {
            per_vip.push(states.len());
        }
    }
    println!("  every node went through the same tables (per VIP: {per_vip:?})");
    // They differ only while the watch delivers the revision to each node.
    assert!(
        window < SKEW_BOUND,
        "the nodes' tables differed for {window:?}, bound {SKEW_BOUND:?}"
    );
    assert!(
        max_live_differ * 100 <= 2042,
        "while the nodes' tables differed, {max_live_differ} slots led to two different live backends"
    );
    // The followers set backend2's DOWN flag too: the connections to it that reach them are
    // steered to another backend.
    let _ = ll_dead.check();
    wait_for("a follower to re-steer a flow of backend2", SYNC, || {
        followers
            .iter()
            .zip(&before)
            .any(|(&i, b)| resteered(i) > *b)
    });
    let moved: Vec<f64> = followers
        .iter()
        .zip(&before)
        .map(|(&i, b)| resteered(i) - b)
        .collect();
    println!("  {to_dead} long-lived connections to backend2: flows re-steered by the followers {followers:?}: {moved:?}");
    drop(ll_dead);
    same_tables(&f, &live);
    let results: Vec<_> = [v4(), v6()]
        .into_iter()
        .flat_map(|a| client_many(&f.client, a, 100, Duration::from_secs(3)))
        .collect();
    let failed: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(failed.is_empty(), "{failed:?}");
    let counts = tally(&results);
    assert!(
        !counts.contains_key("backend2"),
        "new flows still reach backend2: {counts:?}"
    );
    println!("  200 new connections after: {counts:?}, none to backend2");

    node_failures(&mut f);
    println!("e2e_cluster: {:?} in all", started.elapsed());
}
