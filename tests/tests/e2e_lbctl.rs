//! `lbctl` against the real `lbd` in a namespace lab, as an operator uses them:
//!
//! * every command, its `--json` output field by field, and the datapath following each change
//!   (traffic moves with weights; a drained backend gets no new flows while its established
//!   connections keep working; undrain brings it back);
//! * bad input refused with the exact message and a non-zero exit, leaving `vip list`,
//!   `backend list` and the config file's bytes exactly as they were; lbd startup errors;
//! * two racing writers never leave a half-applied state;
//! * `/metrics` scraped over HTTP agrees with `lbctl stats --json`;
//! * a restart comes back with the persisted VIPs, weights and drain states.
use serde_json::Value;
use std::{
    collections::BTreeMap,
    fs,
    io::Write as _,
    net::{IpAddr, SocketAddr},
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};
use tests::{
    lab::{backend_v4, backend_v6, Lab, LabSpec, LB_V4, LB_V6, VIP_V4, VIP_V6},
    procs::{
        self, bin_path, lbctl, lbctl_json, poll_until, scrape_metrics, start_decaps, wait_for,
        wait_neighbours, Lbd,
    },
    require_root,
    tcp::{client_many, tally, LongLived, TcpServer},
};

const VIP4: &str = "10.200.100.1:80/tcp";
const VIP6: &str = "[fd00:200:100::1]:80/tcp";

/// A scratch directory for one test's config file and control socket ([`procs::scratch`]).
fn scratch(name: &str) -> PathBuf {
    procs::scratch(&format!("lbctl-{name}"))
}

fn header(dir: &Path) -> String {
    format!(
        "interface = \"eth0\"\nxdp_mode = \"native\"\npin_dir = \"\"\n\
         control_socket = \"{}\"\n\
         [encap]\nsource_v4 = \"{LB_V4}\"\nsource_v6 = \"{LB_V6}\"\n",
        dir.join("run/lbd.sock").display()
    )
}

fn show(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A change through lbctl: must succeed and report a change.
fn change(socket: &Path, args: &[&str]) -> Value {
    let v = lbctl_json(socket, args);
    assert_eq!(v["changed"], true, "{args:?}: {v}");
    assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    v
}

fn backend<'a>(list: &'a Value, addr: &str) -> &'a Value {
    list.as_array()
        .unwrap()
        .iter()
        .find(|b| b["address"] == addr)
        .unwrap_or_else(|| panic!("backend {addr} not in {list}"))
}

/// `count` connections from the client; all must succeed. Returns connections per backend.
fn spread(lab: &Lab, addr: SocketAddr, count: usize) -> BTreeMap<String, usize> {
    let results = client_many(lab.client().ns(), addr, count, Duration::from_secs(3));
    let failed: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "{} of {count} connections to {addr} failed, first: {:?}",
        failed.len(),
        failed[0]
    );
    tally(&results)
}

fn vip_servers(lab: &Lab, n: usize) -> Vec<TcpServer> {
    let addrs = [
        SocketAddr::new(IpAddr::from(VIP_V4), 80),
        SocketAddr::new(IpAddr::from(VIP_V6), 80),
    ];
    (0..n)
        .map(|i| TcpServer::start(lab.backend(i).ns(), &addrs, &format!("backend{i}")).unwrap())
        .collect()
}

/// Backend list without the datapath ids (which a fresh lbd allocates anew) and connection
/// counts (fresh maps track no connection).
fn without_ids(list: &Value) -> Value {
    let mut l = list.clone();
    for b in l.as_array_mut().unwrap() {
        let b = b.as_object_mut().unwrap();
        for k in ["id", "conns_active", "conns_idle", "conns_closing"] {
            b.remove(k);
        }
    }
    l
}

#[test]
fn lbctl_drives_lbd_and_the_datapath_follows() {
    require_root();
    let t0 = Instant::now();
    let lab = Lab::new(LabSpec { backends: 3 }).expect("building the lab");
    let _servers = vip_servers(&lab, 3);
    let _decaps = start_decaps(&lab, 3);
    let dir = scratch("drive");
    let (b0, b1, b2) = (
        backend_v4(0).to_string(),
        backend_v4(1).to_string(),
        backend_v4(2).to_string(),
    );
    fs::write(
        dir.join("lbd.toml"),
        format!(
            "{}\n[[vip]]\naddress = \"{VIP_V4}\"\nport = 80\nprotocol = \"tcp\"\n\
             [[vip.backend]]\naddress = \"{b0}\"\n[[vip.backend]]\naddress = \"{b1}\"\n",
            header(&dir)
        ),
    )
    .unwrap();
    let mut lbd = Lbd::start(lab.lb().ns(), &dir);
    let sock = lbd.socket.clone();
    let vip4 = SocketAddr::new(IpAddr::from(VIP_V4), 80);
    let vip6 = SocketAddr::new(IpAddr::from(VIP_V6), 80);

    // The socket: root only by default.
    let meta = fs::metadata(&sock).unwrap();
    assert!(std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()));
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!((meta.uid(), meta.gid()), (0, 0));

    // status
    let st = lbctl_json(&sock, &["status"]);
    assert_eq!(st["interface"], "eth0");
    assert_eq!(st["xdp_mode"], "native");
    assert!(st["program_id"].as_u64().unwrap() > 0, "{st}");
    assert!(st["uptime_seconds"].as_u64().is_some(), "{st}");
    assert!(st["pid"].as_u64().unwrap() > 0, "{st}");
    assert_eq!(st["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(st["config_file"], lbd.config.to_str().unwrap());
    assert_eq!(st["control_socket"], sock.to_str().unwrap());
    assert_eq!(st["metrics_listen"], "127.0.0.1:9469");
    assert_eq!(st["vips"][0]["vip"], VIP4);
    assert_eq!(st["vips"][0]["generation"], 1);
    assert_eq!(st["vips"][0]["table_size"], 65537);
    assert_eq!(st["vips"][0]["backends"], 2);
    // The program id is the one attached to eth0.
    let link = lab
        .lb()
        .ns()
        .ip(["-d", "link", "show", "dev", "eth0"])
        .unwrap();
    assert!(
        link.contains(&format!("id {}", st["program_id"])),
        "program id {} not in: {link}",
        st["program_id"]
    );
    let human = lbctl(&sock, &["status"]);
    assert!(String::from_utf8_lossy(&human.stdout).contains("interface  eth0 (native XDP"));

    // vip list
    let vips = lbctl_json(&sock, &["vip", "list"]);
    assert_eq!(vips.as_array().unwrap().len(), 1, "{vips}");
    let v = &vips[0];
    assert_eq!(v["vip"], VIP4);
    assert_eq!(v["address"], VIP_V4.to_string());
    assert_eq!(v["port"], 80);
    assert_eq!(v["protocol"], "tcp");
    assert_eq!(v["forwarding"], "ipip");
    assert_eq!(v["table_size"], 65537);
    assert_eq!(v["generation"], 1);
    assert_eq!(v["datapath_generation"], 1);
    assert_eq!(v["backends"], 2);
    assert_eq!(v["drained"], 0);

    // backend list
    let list = lbctl_json(&sock, &["backend", "list"]);
    assert_eq!(list.as_array().unwrap().len(), 2, "{list}");
    for addr in [&b0, &b1] {
        let b = backend(&list, addr);
        assert_eq!(b["vip"], VIP4);
        assert_eq!(b["weight"], 1);
        assert_eq!(b["drained"], false);
        assert_eq!(b["effective_weight"], 1);
        assert_eq!(b["up"], true);
        assert!(b["id"].as_u64().unwrap() > 0);
        let slots = b["slots"].as_u64().unwrap();
        assert!((32000..=33537).contains(&slots), "{b}");
    }
    assert_eq!(
        backend(&list, &b0)["slots"].as_u64().unwrap()
            + backend(&list, &b1)["slots"].as_u64().unwrap(),
        65537
    );
    assert_eq!(lbctl_json(&sock, &["backend", "list", VIP4]), list);

    let c = spread(&lab, vip4, 300);
    println!("b0:b1 = 1:1: {c:?}");
    assert_eq!(c.len(), 2, "{c:?}");
    assert!(c["backend0"] > 90 && c["backend1"] > 90, "{c:?}");

    // backend add: the new backend takes its share at once.
    let r = change(&sock, &["backend", "add", VIP4, &b2, "--weight", "2"]);
    assert_eq!(r["tables"][0]["vip"], VIP4);
    assert_eq!(r["tables"][0]["generation"], 2);
    let moved = r["tables"][0]["slots_moved"].as_u64().unwrap();
    assert!(
        (30000..=35000).contains(&moved),
        "half the slots move to b2: {r}"
    );
    wait_neighbours(lab.lb().ns(), &[b2.parse().unwrap()]);
    let c = spread(&lab, vip4, 300);
    println!("b0:b1:b2 = 1:1:2: {c:?}");
    assert!((110..=190).contains(&c["backend2"]), "{c:?}");

    // drain b1: established connections to it keep working, new ones avoid it.
    let mut long = LongLived::open(lab.client().ns(), vip4, 40, Duration::from_secs(3)).unwrap();
    let on_b1 = long.backend_counts().get("backend1").copied().unwrap_or(0);
    assert!(
        on_b1 > 0,
        "no long-lived connection landed on backend1: {:?}",
        long.backend_counts()
    );
    let r = change(&sock, &["backend", "drain", VIP4, &b1]);
    assert!(r["message"].as_str().unwrap().contains("drained"), "{r}");
    let list = lbctl_json(&sock, &["backend", "list"]);
    let d = backend(&list, &b1);
    assert_eq!(d["drained"], true);
    assert_eq!(d["weight"], 1, "drain keeps the weight");
    assert_eq!(d["effective_weight"], 0);
    assert_eq!(d["slots"], 0);
    assert_eq!(lbctl_json(&sock, &["vip", "list"])[0]["drained"], 1);
    let c = spread(&lab, vip4, 300);
    println!("b1 drained: {c:?}");
    assert!(
        !c.contains_key("backend1"),
        "a drained backend got new flows: {c:?}"
    );
    long.check_all()
        .expect("established connections survive a drain");
    println!("{on_b1} long-lived connections on the drained backend still answer");
    // Draining again changes nothing and says so.
    let again = lbctl_json(&sock, &["backend", "drain", VIP4, &b1]);
    assert_eq!(again["changed"], false, "{again}");
    assert_eq!(again["tables"], Value::Array(vec![]));

    // undrain: back in the table.
    change(&sock, &["backend", "undrain", VIP4, &b1]);
    let d = lbctl_json(&sock, &["backend", "list", VIP4]);
    assert_eq!(backend(&d, &b1)["drained"], false);
    assert!(backend(&d, &b1)["slots"].as_u64().unwrap() > 0);
    let c = spread(&lab, vip4, 300);
    println!("b1 undrained: {c:?}");
    assert!(c.get("backend1").copied().unwrap_or(0) > 5, "{c:?}");
    long.check_all()
        .expect("established connections survive an undrain");

    // set-weight: traffic moves.
    let r = change(&sock, &["backend", "set-weight", VIP4, &b2, "8"]);
    assert_eq!(r["tables"][0]["generation"], 5);
    assert_eq!(
        backend(&lbctl_json(&sock, &["backend", "list"]), &b2)["weight"],
        8
    );
    let c = spread(&lab, vip4, 300);
    println!("b0:b1:b2 = 1:1:8: {c:?}");
    assert!(c["backend2"] >= 210, "{c:?}");

    // backend remove
    change(&sock, &["backend", "remove", VIP4, &b2]);
    let list = lbctl_json(&sock, &["backend", "list"]);
    assert_eq!(list.as_array().unwrap().len(), 2);
    assert!(list
        .as_array()
        .unwrap()
        .iter()
        .all(|b| b["address"] != b2.as_str()));
    let c = spread(&lab, vip4, 200);
    assert!(!c.contains_key("backend2"), "{c:?}");

    // An IPv6 VIP with L2 forwarding, added and served, then removed.
    let r = change(
        &sock,
        &[
            "vip",
            "add",
            VIP6,
            "--forwarding",
            "l2",
            "--table-size",
            "251",
        ],
    );
    assert_eq!(r["tables"][0]["vip"], VIP6);
    let v6 = lbctl_json(&sock, &["vip", "list"]);
    let e = v6
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["vip"] == VIP6)
        .unwrap();
    assert_eq!(e["address"], VIP_V6.to_string());
    assert_eq!(e["forwarding"], "l2");
    assert_eq!(e["table_size"], 251);
    assert_eq!(e["backends"], 0);
    for i in 0..2 {
        change(&sock, &["backend", "add", VIP6, &backend_v6(i).to_string()]);
    }
    let six = lbctl_json(&sock, &["backend", "list", VIP6]);
    assert_eq!(six.as_array().unwrap().len(), 2, "{six}");
    let v6_backends: Vec<IpAddr> = (0..2).map(|i| backend_v6(i).into()).collect();
    wait_neighbours(lab.lb().ns(), &v6_backends);
    let c = spread(&lab, vip6, 100);
    println!("IPv6 L2 VIP: {c:?}");
    assert_eq!(c.len(), 2, "{c:?}");

    // Statistics while traffic flows: rates from two samples.
    let done = std::sync::atomic::AtomicBool::new(false);
    let made = std::sync::atomic::AtomicUsize::new(0);
    let during = std::thread::scope(|s| {
        let traffic = s.spawn(|| {
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let n = spread(&lab, vip4, 50).values().sum::<usize>();
                made.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
            }
            made.load(std::sync::atomic::Ordering::Relaxed)
        });
        wait_for("traffic to flow", Duration::from_secs(20), || {
            made.load(std::sync::atomic::Ordering::Relaxed) > 0
        });
        let st = lbctl_json(&sock, &["stats", "--interval", "0.5"]);
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        println!(
            "{} connections while sampling rates",
            traffic.join().unwrap()
        );
        st
    });
    let v = during["vips"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["vip"] == VIP4)
        .unwrap();
    assert!(
        v["rates"]["packets_per_second"].as_f64().unwrap() > 0.0,
        "no rate while traffic flows: {v}"
    );
    assert!(
        v["rates"]["new_flows_per_second"].as_f64().unwrap() > 0.0,
        "{v}"
    );
    let dt = during["interval_seconds"].as_f64().unwrap();
    assert!((0.45..1.5).contains(&dt), "{during}");
    // `stats --watch` into a pipe: reports one after another, no terminal escape codes.
    {
        use std::io::BufRead as _;
        let mut watch = std::process::Command::new(bin_path("lbctl"))
            .arg("--socket")
            .arg(&sock)
            .args(["stats", "--watch", "0.1"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("lbctl stats --watch");
        let out = std::io::BufReader::new(watch.stdout.take().unwrap());
        let mut text = String::new();
        let mut reports = 0;
        for line in out.lines() {
            let line = line.unwrap();
            reports += usize::from(line.starts_with("lbctl stats: every"));
            text.push_str(&line);
            text.push('\n');
            if reports == 2 {
                break;
            }
        }
        let _ = watch.kill();
        let _ = watch.wait();
        assert_eq!(reports, 2, "{text}");
        assert!(!text.contains('\x1b'), "escape codes into a pipe: {text:?}");
    }
    let human = lbctl(&sock, &["stats", "--interval", "0.1"]);
    assert!(human.status.success(), "{}", show(&human));
    let human = String::from_utf8_lossy(&human.stdout);
    assert!(human.contains(VIP4), "{human}");
    assert!(
        human.lines().any(|l| l.starts_with("connection tables: ")
            && l.contains(" lost (state evicted or older than the maps)")
            && l.contains("insert failures: 0 established, 0 new, 0 fragments")),
        "{human}"
    );

    // Traffic has stopped: once the counters are at rest, /metrics agrees with stats --json.
    let totals = |m: &std::collections::BTreeMap<String, f64>| {
        m.iter()
            .filter(|(k, _)| k.contains("_total"))
            .map(|(k, v)| (k.clone(), *v))
            .collect::<Vec<_>>()
    };
    let mut m1 = scrape_metrics(lab.lb().ns());
    wait_for(
        "the counters to come to rest",
        Duration::from_secs(20),
        || {
            let again = scrape_metrics(lab.lb().ns());
            totals(&std::mem::replace(&mut m1, again)) == totals(&m1)
        },
    );
    let stats = lbctl_json(&sock, &["stats", "--interval", "0.1"]);
    let m2 = scrape_metrics(lab.lb().ns());
    let mut compared = 0;
    for v in stats["vips"].as_array().unwrap() {
        let name = v["vip"].as_str().unwrap();
        for (metric, field) in [
            ("lb_vip_packets_total", "packets"),
            ("lb_vip_bytes_total", "bytes"),
            ("lb_vip_new_flows_total", "new_flows"),
            ("lb_vip_no_backend_packets_total", "no_backend"),
            ("lb_vip_table_generation", "generation"),
        ] {
            let key = format!("{metric}{{vip=\"{name}\"}}");
            assert_eq!(m2[&key], v[field].as_f64().unwrap(), "{key}");
            assert_eq!(m1[&key], m2[&key], "{key} moved while traffic was stopped");
            compared += 1;
        }
        for b in v["backends"].as_array().unwrap() {
            let addr = b["address"].as_str().unwrap();
            for (metric, field) in [
                ("lb_backend_packets_total", "packets"),
                ("lb_backend_bytes_total", "bytes"),
                ("lb_backend_new_flows_total", "new_flows"),
                ("lb_backend_syn_retries_total", "syn_retries"),
                ("lb_backend_client_rsts_total", "client_rsts"),
                ("lb_backend_resteered_total", "resteered"),
                ("lb_backend_weight", "weight"),
                ("lb_backend_effective_weight", "effective_weight"),
            ] {
                let key = format!("{metric}{{vip=\"{name}\",backend=\"{addr}\"}}");
                assert_eq!(m2[&key], b[field].as_f64().unwrap(), "{key}");
                compared += 1;
            }
            let key = |m: &str| format!("{m}{{vip=\"{name}\",backend=\"{addr}\"}}");
            assert_eq!(m2[&key("lb_backend_up")], 1.0);
            assert_eq!(
                m2[&key("lb_backend_drained")],
                if b["drained"] == true { 1.0 } else { 0.0 }
            );
        }
    }
    let counters = stats["counters"].as_object().unwrap();
    assert_eq!(counters.len(), lb_common::Counter::ALL.len());
    // Every connection here started with a SYN through lbd and the tables are far from full:
    // no packet found its flow's state gone.
    assert_eq!(counters["ct_lost"], 0, "{stats}");
    assert!(counters["ct_new"].as_u64().unwrap() > 0, "{stats}");
    for c in lb_common::Counter::ALL {
        // Every counter is exported in exactly one family: packet outcomes or events.
        let outcome = format!("lb_datapath_packets_total{{reason=\"{}\"}}", c.name());
        let event = format!("lb_datapath_events_total{{event=\"{}\"}}", c.name());
        assert_eq!(
            (m2.contains_key(&outcome), m2.contains_key(&event)),
            (c.is_outcome(), !c.is_outcome()),
            "{} must be in exactly one of lb_datapath_packets_total / lb_datapath_events_total",
            c.name()
        );
        let key = if c.is_outcome() { outcome } else { event };
        let s = counters[c.name()].as_f64().unwrap();
        // Non-VIP packets (neighbour discovery, ...) may still arrive between the samples.
        assert!(
            m1[&key] <= s && s <= m2[&key],
            "{key}: {} <= {s} <= {}",
            m1[&key],
            m2[&key]
        );
        compared += 1;
    }
    let forwarded = stats["vips"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["vip"] == VIP4)
        .unwrap();
    assert!(forwarded["packets"].as_u64().unwrap() > 1000, "{forwarded}");
    let b_sum: u64 = forwarded["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["packets"].as_u64().unwrap())
        .sum();
    assert!(
        b_sum <= forwarded["packets"].as_u64().unwrap(),
        "backend packets exceed the VIP's"
    );
    println!("metrics == stats --json on {compared} values");

    change(&sock, &["vip", "remove", VIP6]);
    assert_eq!(
        lbctl_json(&sock, &["vip", "list"])
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // Leave a drained backend and a non-default weight, then restart: same state comes back.
    change(&sock, &["backend", "set-weight", VIP4, &b0, "3"]);
    change(&sock, &["backend", "drain", VIP4, &b1]);
    let before = lbctl_json(&sock, &["backend", "list"]);
    let vips_before = lbctl_json(&sock, &["vip", "list"]);
    let status = lbd.stop();
    assert!(status.success(), "lbd exit status {status}:\n{}", lbd.log());
    assert!(!sock.exists(), "the control socket is removed on exit");
    // This time let the nobody group in (control_group): mode 0660, group-owned.
    let text = fs::read_to_string(&lbd.config).unwrap();
    assert!(
        text.contains("drained = true") && text.contains("weight = 3"),
        "{text}"
    );
    fs::write(&lbd.config, format!("control_group = \"nogroup\"\n{text}")).unwrap();
    let lbd2 = Lbd::start(lab.lb().ns(), &dir);
    let after = lbctl_json(&sock, &["backend", "list"]);
    assert_eq!(
        without_ids(&after),
        without_ids(&before),
        "restart changed the backends"
    );
    let vips_after = lbctl_json(&sock, &["vip", "list"]);
    assert_eq!(vips_after[0]["vip"], vips_before[0]["vip"]);
    assert_eq!(vips_after[0]["drained"], 1);
    let c = spread(&lab, vip4, 200);
    println!("after restart (b0:b1 = 3:drained): {c:?}");
    assert!(!c.contains_key("backend1"), "{c:?}");
    assert!(c["backend0"] > 0);
    let meta = fs::metadata(&lbd2.socket).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!(meta.gid(), 65534);
    let as_nobody = |gid: &str| {
        Command::new("setpriv")
            .args(["--reuid=65534", &format!("--regid={gid}"), "--clear-groups"])
            .arg(bin_path("lbctl"))
            .arg("--socket")
            .arg(&lbd2.socket)
            .args(["vip", "list", "--json"])
            .output()
            .unwrap()
    };
    let ok = as_nobody("65534");
    assert!(
        ok.status.success(),
        "a control_group member is refused: {}",
        show(&ok)
    );
    let denied = as_nobody("65533");
    assert_eq!(denied.status.code(), Some(3), "{}", show(&denied));
    assert!(String::from_utf8_lossy(&denied.stderr).contains("permission denied"));

    drop(lbd2);
    drop(lbd);
    let _ = fs::remove_dir_all(&dir);
    println!("drive test took {:?}", t0.elapsed());
}

/// One refused command and what it must say.
struct Bad {
    args: Vec<String>,
    code: i32,
    stderr: &'static str,
}

fn bad(args: &[&str], code: i32, stderr: &'static str) -> Bad {
    Bad {
        args: args.iter().map(|s| s.to_string()).collect(),
        code,
        stderr,
    }
}

#[test]
fn bad_input_is_refused_with_the_fix_and_changes_nothing() {
    require_root();
    let lab = Lab::new(LabSpec { backends: 1 }).expect("building the lab");
    let dir = scratch("bad");
    let b0 = backend_v4(0).to_string();
    fs::write(
        dir.join("lbd.toml"),
        format!(
            "table_pool = 400000\n{}\n[[vip]]\naddress = \"{VIP_V4}\"\nport = 80\nprotocol = \"tcp\"\n\
             [[vip.backend]]\naddress = \"{b0}\"\nweight = 5\n\
             [[vip]]\naddress = \"{VIP_V6}\"\nport = 80\nprotocol = \"tcp\"\n\
             [[vip.backend]]\naddress = \"{}\"\n",
            header(&dir),
            backend_v6(0)
        ),
    )
    .unwrap();
    let lbd = Lbd::start(lab.lb().ns(), &dir);
    let sock = lbd.socket.clone();
    let vips = lbctl_json(&sock, &["vip", "list"]);
    let backends = lbctl_json(&sock, &["backend", "list"]);
    let file = fs::read(&lbd.config).unwrap();
    assert_eq!(vips.as_array().unwrap().len(), 2);
    assert_eq!(backends.as_array().unwrap().len(), 2);

    let cases = [
        bad(&["vip", "add", "10.200.100.2:80"], 2, "VIP \"10.200.100.2:80\": the protocol is missing; write ADDRESS:PORT/PROTOCOL, e.g. 10.0.0.1:80/tcp or [2001:db8::1]:443/tcp"),
        bad(&["vip", "add", "10.200.100.2/tcp"], 2, "VIP \"10.200.100.2/tcp\": the port is missing; write ADDRESS:PORT/PROTOCOL"),
        bad(&["vip", "add", "10.200.100.300:80/tcp"], 2, "VIP \"10.200.100.300:80/tcp\": \"10.200.100.300\" is not an IP address; write ADDRESS:PORT/PROTOCOL"),
        bad(&["vip", "add", "10.200.100.2:0/tcp"], 2, "VIP \"10.200.100.2:0/tcp\": port \"0\" is not a number from 1 to 65535"),
        bad(&["vip", "add", "10.200.100.2:70000/tcp"], 2, "VIP \"10.200.100.2:70000/tcp\": port \"70000\" is not a number from 1 to 65535"),
        bad(&["vip", "add", "10.200.100.2:80/sctp"], 2, "VIP \"10.200.100.2:80/sctp\": protocol \"sctp\" is not supported; use tcp or udp"),
        bad(&["vip", "add", "fd00:200:100::2:80/tcp"], 2, "IPv6 addresses go in brackets; write ADDRESS:PORT/PROTOCOL"),
        bad(&["vip", "add", "10.200.100.2:80/tcp", "--forwarding", "gre"], 2, "invalid value 'gre' for '--forwarding <FORWARDING>'\n  [possible values: ipip, l2]"),
        bad(&["vip", "add", "10.200.100.2:80/tcp", "--table-size", "many"], 2, "table_size \"many\" is not a whole number; use a prime from 7 to 1048573, such as 65537"),
        bad(&["vip", "add", VIP4, "--table-size", "251"], 1, "vip 10.200.100.1:80/tcp: already configured with other settings; change its backends with `lbctl backend ...`, or `lbctl vip remove` it first"),
        bad(&["vip", "add", "10.200.100.2:80/tcp", "--table-size", "65536"], 1, "vip[2] (10.200.100.2:80/tcp): table_size 65536 is not prime; use a prime such as 65537 (the default), 131071 or 262139"),
        bad(&["vip", "add", "10.200.100.2:80/tcp", "--table-size", "2147483647"], 1, "vip[2] (10.200.100.2:80/tcp): table_size 2147483647 is out of range; use a prime from 7 to 1048573"),
        bad(&["vip", "add", "10.200.100.2:80/tcp", "--table-size", "131071"], 1, "table_pool: 400000 slots cannot hold two tables for every VIP (524290 slots needed); raise table_pool or lower table_size"),
        bad(&["vip", "add", "224.0.0.1:80/tcp"], 1, "vip[2] (224.0.0.1:80/tcp): address must be a unicast address"),
        bad(&["vip", "remove", "10.200.100.9:80/tcp"], 1, "vip 10.200.100.9:80/tcp: no such VIP; `lbctl vip list` shows the configured ones, `lbctl vip add` adds one"),
        bad(&["backend", "list", "10.200.100.9:80/tcp"], 1, "vip 10.200.100.9:80/tcp: no such VIP"),
        bad(&["backend", "add", "10.200.100.9:80/tcp", "10.200.0.12"], 1, "vip 10.200.100.9:80/tcp: no such VIP"),
        bad(&["backend", "add", VIP4, &b0], 1, "backend 10.200.0.11 of vip 10.200.100.1:80/tcp: already a backend of this VIP, with weight 5; use `lbctl backend set-weight` to change its weight"),
        bad(&["backend", "add", VIP4, "fd00:200::12"], 1, "vip[0] (10.200.100.1:80/tcp): backend[1] (fd00:200::12): address is IPv6 but the VIP is IPv4; use an IPv4 backend address"),
        bad(&["backend", "add", VIP6, "10.200.0.12"], 1, "vip[1] ([fd00:200:100::1]:80/tcp): backend[1] (10.200.0.12): address is IPv4 but the VIP is IPv6; use an IPv6 backend address"),
        bad(&["backend", "add", VIP4, "10.200.0.300"], 2, "backend address \"10.200.0.300\": not an IP address; write e.g. 10.0.0.11 or 2001:db8::11"),
        bad(&["backend", "add", VIP4, "10.200.0.12:80"], 2, "backend address \"10.200.0.12:80\": write the address without a port (a backend serves the VIP's port)"),
        bad(&["backend", "add", VIP4, "127.0.0.1"], 1, "backend[1] (127.0.0.1): address must be a unicast address of another host"),
        bad(&["backend", "add", VIP4, "255.255.255.255"], 1, "backend[1] (255.255.255.255): address must be a unicast address of another host"),
        bad(&["backend", "add", VIP4, "0.0.0.0"], 1, "backend[1] (0.0.0.0): address must be a unicast address of another host"),
        bad(&["backend", "add", VIP6, "ff02::1"], 1, "backend[1] (ff02::1): address must be a unicast address of another host"),
        bad(&["backend", "add", VIP4, "10.200.100.1"], 1, "vip[0] (10.200.100.1:80/tcp): backend[1] (10.200.100.1): address is a VIP of this balancer (its packets would come back here); a backend must be a unicast address of another host"),
        bad(&["backend", "add", VIP6, "fd00:200:100::1"], 1, "backend[1] (fd00:200:100::1): address is a VIP of this balancer"),
        bad(&["backend", "add", VIP4, "10.200.0.12", "--weight", "10001"], 1, "vip[0] (10.200.100.1:80/tcp): backend[1] (10.200.0.12): weight 10001 is out of range; use 0 to 10000"),
        bad(&["backend", "set-weight", VIP4, &b0, "-3"], 2, "weight \"-3\" is not a whole number; use 0 to 10000"),
        bad(&["backend", "set-weight", VIP4, &b0, "99999"], 1, "backend[0] (10.200.0.11): weight 99999 is out of range; use 0 to 10000"),
        bad(&["backend", "set-weight", VIP4, "10.200.0.99", "5"], 1, "backend 10.200.0.99 of vip 10.200.100.1:80/tcp: no such backend; `lbctl backend list 10.200.100.1:80/tcp` shows them, `lbctl backend add` adds one"),
        bad(&["backend", "remove", VIP4, "10.200.0.99"], 1, "backend 10.200.0.99 of vip 10.200.100.1:80/tcp: no such backend"),
        bad(&["backend", "drain", "10.200.100.9:80/tcp", &b0], 1, "vip 10.200.100.9:80/tcp: no such VIP"),
        bad(&["backend", "undrain", VIP4, "10.200.0.99"], 1, "backend 10.200.0.99 of vip 10.200.100.1:80/tcp: no such backend"),
        bad(&["stats", "--watch", "0"], 2, "\"0\" is not a number of seconds from 0.1 to 3600"),
        bad(&["frobnicate"], 2, "unrecognized subcommand 'frobnicate'"),
        bad(&["node", "drain"], 1, "node drain/undrain: this lbd has no [bgp] section, so it announces nothing to withdraw; add [bgp] to lbd.toml"),
        bad(&["node", "drain", "--timeout", "soon"], 2, "invalid value 'soon' for '--timeout <SECS>'"),
    ];
    let mut checked = 0;
    for case in &cases {
        let args: Vec<&str> = case.args.iter().map(String::as_str).collect();
        let out = lbctl(&sock, &args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(case.code),
            "lbctl {args:?}: {}",
            show(&out)
        );
        assert!(
            stderr.contains(case.stderr),
            "lbctl {args:?}: stderr should contain {:?}, got: {stderr}",
            case.stderr
        );
        assert!(
            out.stdout.is_empty(),
            "lbctl {args:?} printed: {}",
            show(&out)
        );
        assert_eq!(
            lbctl_json(&sock, &["vip", "list"]),
            vips,
            "vip list changed after {args:?}"
        );
        assert_eq!(
            lbctl_json(&sock, &["backend", "list"]),
            backends,
            "backend list changed after {args:?}"
        );
        assert_eq!(
            fs::read(&lbd.config).unwrap(),
            file,
            "config file changed after {args:?}"
        );
        checked += 1;
    }
    // The same add again is no error: exit 0, "already so", nothing changed.
    for args in [
        vec!["vip", "add", VIP4],
        vec!["backend", "add", VIP4, &b0, "--weight", "5"],
    ] {
        let out = lbctl(&sock, &args);
        assert!(out.status.success(), "lbctl {args:?}: {}", show(&out));
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("(already so: nothing changed)"),
            "lbctl {args:?}: {}",
            show(&out)
        );
        assert_eq!(
            lbctl_json(&sock, &["backend", "list"]),
            backends,
            "{args:?}"
        );
        assert_eq!(fs::read(&lbd.config).unwrap(), file, "{args:?}");
    }

    // Socket not there: exit 3, and what to check.
    let out = lbctl(Path::new("/nonexistent/lbd.sock"), &["vip", "list"]);
    assert_eq!(out.status.code(), Some(3), "{}", show(&out));
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("cannot reach lbd at /nonexistent/lbd.sock")
            && e.contains("is lbd running")
            && e.contains("Use --socket PATH"),
        "{e}"
    );
    checked += 1;

    // Not root, not in a control group: the 0600 socket refuses, exit 3, and what to do.
    for args in [
        vec!["vip", "list"],
        vec!["backend", "drain", VIP4, b0.as_str()],
    ] {
        let out = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(bin_path("lbctl"))
            .arg("--socket")
            .arg(&sock)
            .args(&args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(3), "{}", show(&out));
        let e = String::from_utf8_lossy(&out.stderr);
        assert!(
            e.contains(&format!(
                "permission denied on lbd's control socket {}",
                sock.display()
            )) && e
                .contains("run lbctl as root, or as a member of the group named by control_group"),
            "{e}"
        );
        checked += 1;
    }

    // The protocol itself refuses what lbctl never sends, with the same care.
    let raw = |line: &str| -> Value {
        let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        s.write_all(format!("{line}\n").as_bytes()).unwrap();
        let mut r = std::io::BufReader::new(s);
        let mut answer = String::new();
        std::io::BufRead::read_line(&mut r, &mut answer).unwrap();
        serde_json::from_str(&answer).unwrap()
    };
    for (line, want) in [
        (
            r#"{"command":"frobnicate"}"#,
            "request: unknown variant `frobnicate`",
        ),
        (r#"not json"#, "request: expected ident"),
        (
            r#"{"command":"backend_add","vip":"10.200.100.1:80/tcp","adress":"10.200.0.12"}"#,
            "request: unknown field `adress`",
        ),
        (
            r#"{"command":"backend_add","vip":"10.200.100.1:80/tcp","address":"ten"}"#,
            "backend address \"ten\": not an IP address",
        ),
        (
            r#"{"command":"vip_add","vip":"10.200.100.2:80/tcp","forwarding":"gre"}"#,
            "unknown variant `gre`, expected `ipip` or `l2`",
        ),
    ] {
        let v = raw(line);
        assert_eq!(v["ok"], false, "{line}: {v}");
        assert!(v["error"].as_str().unwrap().contains(want), "{line}: {v}");
        checked += 1;
    }
    assert_eq!(lbctl_json(&sock, &["vip", "list"]), vips);
    assert_eq!(lbctl_json(&sock, &["backend", "list"]), backends);
    assert_eq!(fs::read(&lbd.config).unwrap(), file);
    println!("{checked} bad inputs refused, state unchanged after each");
    // lbctl status keeps the changes lbd refused (not the command lines lbctl itself rejected).
    let st = lbctl_json(&sock, &["status"]);
    let refused: Vec<&str> = st["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "change_refused")
        .map(|e| e["message"].as_str().unwrap())
        .collect();
    // Named as the lbctl command, with who asked (the peer's uid and pid), and why.
    let want = "vip[0] (10.200.100.1:80/tcp): backend[1] (10.200.0.12): weight 10001 is out of range; use 0 to 10000";
    assert!(
        refused.iter().any(|m| m.starts_with(&format!(
            "lbctl backend add {VIP4} 10.200.0.12 --weight 10001 (by uid 0 pid "
        )) && m.ends_with(&format!("): {want}"))),
        "{refused:#?}"
    );
    assert!(
        refused
            .iter()
            .any(|m| m.contains("backend address \"ten\": not an IP address")),
        "{refused:#?}"
    );
    assert!(
        !refused.iter().any(|m| m.contains("10.200.100.2:80\"")),
        "{refused:#?}"
    );
    let text = lbctl(&sock, &["status"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.lines()
            .any(|l| l.contains("change_refused") && l.contains(want)),
        "{text}"
    );

    // lbd's own startup errors: non-zero exit, the message names the field and the fix.
    let run_dir = dir.join("startup");
    fs::create_dir_all(&run_dir).unwrap();
    let base = |extra: &str| {
        format!(
            "{extra}\npin_dir = \"\"\nmetrics_listen = \"127.0.0.1:0\"\ncontrol_socket = \"{}\"\n[encap]\nsource_v4 = \"{LB_V4}\"\n",
            run_dir.join("lbd.sock").display()
        )
    };
    let startup = [
        (base("interface = \"no-such-if0\""), "interface: no interface named \"no-such-if0\" here; check `ip link`"),
        ("interface = \"eth0\"\n[[vip]\naddress = \"10.0.0.1\"\n".to_string(), "TOML parse error at line 2"),
        (base("interface = \"eth0\"\nbogus = 1"), "unknown field `bogus`, expected one of"),
        (base("interface = \"eth0\"\ncontrol_group = \"no-such-group-lb\""), "control_group: no group named \"no-such-group-lb\" on this host; create it (groupadd no-such-group-lb) or remove control_group"),
        (
            format!("interface = \"eth0\"\npin_dir = \"\"\nmetrics_listen = \"127.0.0.1:0\"\ncontrol_socket = \"{}\"\n", sock.display()),
            "control_socket: another lbd is serving",
        ),
    ];
    for (i, (text, want)) in startup.iter().enumerate() {
        let path = run_dir.join(format!("bad{i}.toml"));
        fs::write(&path, text).unwrap();
        lbd_refuses_to_start(&lab, &path, want);
    }
    // The running lbd was not disturbed by the one that found its socket taken.
    assert_eq!(lbctl_json(&sock, &["vip", "list"]), vips);
    println!("{} lbd startup errors reported", startup.len());

    // An operator edited the file but has not reloaded: lbctl refuses to overwrite the edit.
    let mut edited = file.clone();
    edited.extend_from_slice(b"# an operator's note, not yet reloaded\n");
    fs::write(&lbd.config, &edited).unwrap();
    let out = lbctl(&sock, &["backend", "set-weight", VIP4, &b0, "6"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!(
            "config file {}: edited since lbd last read or wrote it, and saving this change would overwrite that; nothing changed. Apply the edit first (systemctl reload lbd, or kill -HUP the lbd process) or undo it, then retry",
            lbd.config.display()
        )),
        "{}",
        show(&out)
    );
    assert_eq!(fs::read(&lbd.config).unwrap(), edited);
    assert_eq!(lbctl_json(&sock, &["backend", "list"]), backends);
    // Once reloaded (SIGHUP), changes go through again and the file is lbd's to write.
    lbd.signal(libc::SIGHUP);
    wait_for(
        "lbctl to accept changes after SIGHUP",
        Duration::from_secs(5),
        || {
            lbctl(&sock, &["backend", "set-weight", VIP4, &b0, "6"])
                .status
                .success()
        },
    );
    assert_eq!(
        backend(&lbctl_json(&sock, &["backend", "list"]), &b0)["weight"],
        6
    );
    let text = fs::read_to_string(&lbd.config).unwrap();
    assert!(
        text.contains("weight = 6") && !text.contains("operator's note"),
        "{text}"
    );
    drop(lbd);
    let _ = fs::remove_dir_all(&dir);
}

/// What one writer believes the backends it owns are: address -> (weight, drained).
type Model = BTreeMap<String, (u64, bool)>;

/// 30 valid commands over a private set of addresses, tracking the expected outcome.
fn writer(socket: &Path, base: u8) -> (Model, Vec<u64>) {
    let pool: Vec<String> = (0..5).map(|i| format!("10.200.0.{}", base + i)).collect();
    let mut model = Model::new();
    let mut generations = Vec::new();
    for i in 0..30usize {
        let addr = pool[i % 5].clone();
        let w = ((i * 7) % 13 + 1) as u64;
        let ws = w.to_string();
        // Each address goes through adds, weight changes, drains, undrains and removals, in an
        // order that differs per address.
        let op = (i / 5 + i % 5) % 5;
        let args: Vec<&str> = match model.get(&addr).copied() {
            None => {
                model.insert(addr.clone(), (w, false));
                vec!["backend", "add", VIP4, &addr, "--weight", &ws]
            }
            Some((_, drained)) if op <= 1 => {
                model.insert(addr.clone(), (w, drained));
                vec!["backend", "set-weight", VIP4, &addr, &ws]
            }
            Some(_) if op == 3 => {
                model.remove(&addr);
                vec!["backend", "remove", VIP4, &addr]
            }
            Some((weight, drained)) => {
                model.insert(addr.clone(), (weight, !drained));
                let verb = if drained { "undrain" } else { "drain" };
                vec!["backend", verb, VIP4, &addr]
            }
        };
        let v = lbctl_json(socket, &args);
        for t in v["tables"].as_array().unwrap() {
            generations.push(t["generation"].as_u64().unwrap());
        }
    }
    (model, generations)
}

#[test]
fn racing_writers_never_leave_a_half_applied_state() {
    require_root();
    let lab = Lab::new(LabSpec { backends: 1 }).expect("building the lab");
    let dir = scratch("race");
    fs::write(
        dir.join("lbd.toml"),
        format!(
            "{}\n[[vip]]\naddress = \"{VIP_V4}\"\nport = 80\nprotocol = \"tcp\"\nforwarding = \"l2\"\ntable_size = 1021\n\
             [[vip.backend]]\naddress = \"{}\"\nweight = 2\n",
            header(&dir),
            backend_v4(0)
        ),
    )
    .unwrap();
    let lbd = Lbd::start(lab.lb().ns(), &dir);
    let sock = lbd.socket.clone();
    let t = Instant::now();
    let ((ma, ga), (mb, gb)) = std::thread::scope(|s| {
        let a = s.spawn(|| writer(&sock, 100));
        let b = s.spawn(|| writer(&sock, 120));
        (a.join().unwrap(), b.join().unwrap())
    });
    println!("2 writers x 30 commands in {:?}", t.elapsed());

    // Every table change got its own generation: the changes were serialized.
    let mut all: Vec<u64> = ga.iter().chain(&gb).copied().collect();
    let n = all.len();
    all.sort_unstable();
    all.dedup();
    assert_eq!(
        all.len(),
        n,
        "two changes reported the same table generation"
    );
    assert!(n >= 20, "only {n} table changes");

    // The outcome is exactly both writers' intent plus the untouched backend.
    let mut want = ma;
    want.extend(mb);
    want.insert(backend_v4(0).to_string(), (2, false));
    let list = lbctl_json(&sock, &["backend", "list"]);
    let got: Model = list
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["address"].as_str().unwrap().to_string(),
                (
                    b["weight"].as_u64().unwrap(),
                    b["drained"].as_bool().unwrap(),
                ),
            )
        })
        .collect();
    assert_eq!(got, want);

    // The config file parses and says the same.
    let cfg = lb_userspace::Config::load(&lbd.config).expect("the persisted config parses");
    let from_file: Model = cfg.vips[0]
        .backends
        .iter()
        .map(|b| (b.address.to_string(), (b.weight as u64, b.drained)))
        .collect();
    assert_eq!(from_file, got, "config file and lbd disagree");

    // The datapath's table is the one lbd built from that state.
    let vips = lbctl_json(&sock, &["vip", "list"]);
    assert_eq!(
        vips[0]["generation"], vips[0]["datapath_generation"],
        "{vips}"
    );
    assert_eq!(
        vips[0]["generation"].as_u64().unwrap(),
        all.last().copied().unwrap()
    );
    assert_eq!(vips[0]["backends"].as_u64().unwrap() as usize, want.len());
    let slots: u64 = list
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["slots"].as_u64().unwrap())
        .sum();
    assert_eq!(slots, 1021, "every slot has a backend: {list}");
    for b in list.as_array().unwrap() {
        let eff = b["effective_weight"].as_u64().unwrap();
        assert_eq!(
            eff == 0,
            b["slots"] == 0,
            "slots follow the effective weight: {b}"
        );
        assert_eq!(
            eff,
            if b["drained"] == true {
                0
            } else {
                b["weight"].as_u64().unwrap()
            }
        );
    }
    // And the same table comes back from the file alone: a fresh Maglev build of the
    // persisted backends gives the same slot counts.
    let mg: Vec<lb_common::maglev::Backend> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            let (addr, family) =
                lb_userspace::datapath::addr_bytes(b["address"].as_str().unwrap().parse().unwrap());
            lb_common::maglev::Backend {
                addr,
                family,
                id: b["id"].as_u64().unwrap() as u32,
                weight: b["table_weight"].as_u64().unwrap() as u32,
            }
        })
        .collect();
    let table = lb_common::maglev::build(&mg, 1021).unwrap();
    for b in &mg {
        let own = table.iter().filter(|&&s| s == b.id).count() as u64;
        let listed = list
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["id"].as_u64().unwrap() as u32 == b.id)
            .unwrap()["slots"]
            .as_u64()
            .unwrap();
        assert_eq!(own, listed);
    }
    drop(lbd);
    let _ = fs::remove_dir_all(&dir);
}

/// Runs `lbd --config PATH` in `lab`'s balancer namespace, expecting it to refuse to start
/// with `want` in its error (an lbd still running after 10 s is killed and the test fails).
fn lbd_refuses_to_start(lab: &Lab, path: &Path, want: &str) {
    let mut child = lab
        .lb()
        .ns()
        .command(bin_path("lbd"))
        .arg("--config")
        .arg(path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = poll_until(Duration::from_secs(10), || child.try_wait().unwrap());
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(
        status.is_some_and(|s| !s.success()),
        "lbd started ({status:?}) with {}\n{stderr}",
        fs::read_to_string(path).unwrap()
    );
    assert!(stderr.contains(want), "want {want:?}, got: {stderr}");
}

/// Issue 20: what would break the host. A VIP that is an address of the balancer's interface
/// takes the host's own service on that port over (SSH on 22): refused by lbctl unless
/// `--force` (which the file keeps as `allow_host_address`), and refused in the file at start and
/// reload without that key. An encap source that is no address of the host: refused at start
/// and reload. Each refusal names the field and the fix and changes nothing.
#[test]
fn the_hosts_own_addresses_are_refused_unless_forced() {
    require_root();
    let lab = Lab::new(LabSpec { backends: 1 }).expect("building the lab");
    let dir = scratch("host");
    let b0 = backend_v4(0).to_string();
    let config = |extra: &str| {
        format!(
            "{}\n[[vip]]\naddress = \"{VIP_V4}\"\nport = 80\nprotocol = \"tcp\"\n\
             [[vip.backend]]\naddress = \"{b0}\"\n{extra}",
            header(&dir)
        )
    };
    fs::write(dir.join("lbd.toml"), config("")).unwrap();
    let lbd = Lbd::start(lab.lb().ns(), &dir);
    let sock = lbd.socket.clone();
    let vips = lbctl_json(&sock, &["vip", "list"]);
    let file = fs::read(&lbd.config).unwrap();
    let ssh = format!("{LB_V4}:22/tcp");
    let ssh6 = format!("[{LB_V6}]:22/tcp");
    for vip in [&ssh, &ssh6] {
        let out = lbctl(&sock, &["vip", "add", vip]);
        assert_eq!(out.status.code(), Some(1), "{}", show(&out));
        let want = format!(
            "vip[1] ({vip}): {} is an address of the balancer's interface eth0, so the balancer would take port 22/tcp over from this host's own service (such as SSH); use an address that is not the balancer's own, or, to take the port over deliberately, `lbctl vip add --force` (allow_host_address = true in the file)",
            if vip == &ssh { LB_V4.to_string() } else { LB_V6.to_string() }
        );
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(&want),
            "{}",
            show(&out)
        );
        assert_eq!(lbctl_json(&sock, &["vip", "list"]), vips);
        assert_eq!(fs::read(&lbd.config).unwrap(), file);
    }
    // Forced: accepted, and the file says so, so that a restart accepts it too.
    change(&sock, &["vip", "add", &ssh, "--force"]);
    let text = fs::read_to_string(&lbd.config).unwrap();
    assert!(text.contains("allow_host_address = true"), "{text}");
    drop(lbd);
    let lbd = Lbd::start(lab.lb().ns(), &dir);
    assert_eq!(
        lbctl_json(&lbd.socket, &["vip", "list"])
            .as_array()
            .unwrap()
            .len(),
        2
    );
    // Without the key, the file is refused on reload (nothing changes) and at start.
    let t = procs::now_ms();
    fs::write(
        &lbd.config,
        config(&format!(
            "[[vip]]\naddress = \"{LB_V4}\"\nport = 22\nprotocol = \"tcp\"\n"
        )),
    )
    .unwrap();
    lbd.signal(libc::SIGHUP);
    let e = lbd.wait_event("reload_refused", t);
    assert!(
        e["message"].as_str().unwrap().contains(&format!(
            "vip[1] ({ssh}): {LB_V4} is an address of the balancer's interface eth0"
        )),
        "{e}"
    );
    assert_eq!(
        lbctl_json(&lbd.socket, &["vip", "list"])
            .as_array()
            .unwrap()
            .len(),
        2
    );
    drop(lbd);
    let bad = dir.join("bad.toml");
    fs::write(
        &bad,
        config(&format!(
            "[[vip]]\naddress = \"{LB_V4}\"\nport = 22\nprotocol = \"tcp\"\n"
        )),
    )
    .unwrap();
    lbd_refuses_to_start(
        &lab,
        &bad,
        &format!("vip[1] ({ssh}): {LB_V4} is an address of the balancer's interface eth0"),
    );

    // An encap source that is no address of this host, at start and on reload.
    for (field, other, fix) in [
        ("source_v4", "10.200.0.99", "`ip -4 addr show eth0`"),
        ("source_v6", "fd00:200::99", "`ip -6 addr show eth0`"),
    ] {
        let own = if field == "source_v4" {
            LB_V4.to_string()
        } else {
            LB_V6.to_string()
        };
        let text = config("").replace(
            &format!("{field} = \"{own}\""),
            &format!("{field} = \"{other}\""),
        );
        fs::write(&bad, &text).unwrap();
        let want = format!("encap.{field}: {other} is not an address of this host (no interface in lbd's network namespace has it), so tunnelled packets would carry a source that is not this host's (dropped by anti-spoofing filters, their ICMP errors lost); use an address of eth0 ({fix})");
        lbd_refuses_to_start(&lab, &bad, &want);
        fs::write(dir.join("lbd.toml"), config("")).unwrap();
        let lbd = Lbd::start(lab.lb().ns(), &dir);
        let t = procs::now_ms();
        fs::write(&lbd.config, &text).unwrap();
        lbd.signal(libc::SIGHUP);
        let e = lbd.wait_event("reload_refused", t);
        assert!(e["message"].as_str().unwrap().contains(&want), "{e}");
        drop(lbd);
    }
    let _ = fs::remove_dir_all(&dir);
}

/// Issue 20: a table too small for its backends gives some no slot (no traffic, silently):
/// refused at start and by lbctl, naming the field and the fix, changing nothing. Below 100
/// slots per backend it is accepted with a warning (log, `lbctl status` event, and the lbctl
/// answer).
#[test]
fn a_table_too_small_for_its_backends_is_refused() {
    require_root();
    let lab = Lab::new(LabSpec { backends: 1 }).expect("building the lab");
    let dir = scratch("small");
    let config = |backends: usize| {
        let mut t = format!(
            "{}\n[[vip]]\naddress = \"{VIP_V4}\"\nport = 80\nprotocol = \"tcp\"\ntable_size = 7\n",
            header(&dir)
        );
        for i in 0..backends {
            t.push_str(&format!(
                "[[vip.backend]]\naddress = \"10.200.0.{}\"\n",
                11 + i
            ));
        }
        t
    };
    let bad = dir.join("bad.toml");
    fs::write(&bad, config(10)).unwrap();
    lbd_refuses_to_start(&lab, &bad, "vip[0] (10.200.100.1:80/tcp): table_size 7 is too small for its 10 backends: 3 of them would own no slot and get no traffic (the first is 10.200.0.18, weight 1); use a prime table_size of at least 11, or 1009 or more for about 1% disruption (100 slots per backend)");
    // Seven backends fit seven slots, with a warning.
    let t = procs::now_ms();
    fs::write(dir.join("lbd.toml"), config(7)).unwrap();
    let lbd = Lbd::start(lab.lb().ns(), &dir);
    let sock = lbd.socket.clone();
    let e = lbd.wait_event("config_warning", t);
    assert_eq!(e["message"], "vip[0] (10.200.100.1:80/tcp): table_size 7 is below 100 slots per backend (7 backends), so a change of one backend also moves other backends' flows (Maglev needs about 100 per backend for about 1% disruption); use a prime table_size of at least 701");
    assert!(lbd
        .log()
        .contains("table_size 7 is below 100 slots per backend"));
    let backends = lbctl_json(&sock, &["backend", "list"]);
    let file = fs::read(&lbd.config).unwrap();
    let out = lbctl(&sock, &["backend", "add", VIP4, "10.200.0.18"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("vip[0] (10.200.100.1:80/tcp): table_size 7 is too small for its 8 backends: 1 of them would own no slot and get no traffic (the first is 10.200.0.18, weight 1); use a prime table_size of at least 11"), "{}", show(&out));
    assert_eq!(lbctl_json(&sock, &["backend", "list"]), backends);
    assert_eq!(fs::read(&lbd.config).unwrap(), file);
    // A new VIP with a small table: accepted, and the answer carries the warning.
    let v = change(
        &sock,
        &["vip", "add", "10.200.100.2:80/tcp", "--table-size", "7"],
    );
    assert!(!v["message"].as_str().unwrap().contains("warning"), "{v}");
    let v = change(
        &sock,
        &["backend", "add", "10.200.100.2:80/tcp", "10.200.0.11"],
    );
    assert!(v["message"].as_str().unwrap().contains("\nwarning: vip[1] (10.200.100.2:80/tcp): table_size 7 is below 100 slots per backend (1 backends)"), "{v}");
    drop(lbd);
    let _ = fs::remove_dir_all(&dir);
}

/// Issue 20: draining, removing or zeroing the weight of a VIP's last serving backend drops all
/// its traffic: refused unless `--force`, changing nothing. A VIP without a serving backend
/// shows in `lbctl status` (`serving_backends`, and a note in the text) and in
/// `lb_vip_serving_backends`.
#[test]
fn the_last_serving_backend_stays_unless_forced() {
    require_root();
    let lab = Lab::new(LabSpec { backends: 2 }).expect("building the lab");
    let dir = scratch("last");
    let (b0, b1) = (backend_v4(0).to_string(), backend_v4(1).to_string());
    fs::write(
        dir.join("lbd.toml"),
        format!(
            "{}\n[[vip]]\naddress = \"{VIP_V4}\"\nport = 80\nprotocol = \"tcp\"\n\
             [[vip.backend]]\naddress = \"{b0}\"\n[[vip.backend]]\naddress = \"{b1}\"\n",
            header(&dir)
        ),
    )
    .unwrap();
    let lbd = Lbd::start(lab.lb().ns(), &dir);
    let sock = lbd.socket.clone();
    let serving = || lbctl_json(&sock, &["status"])["vips"][0]["serving_backends"].clone();
    let metric =
        || scrape_metrics(lab.lb().ns())[&format!("lb_vip_serving_backends{{vip=\"{VIP4}\"}}")];
    assert_eq!(serving(), 2);
    assert_eq!(metric(), 2.0);
    change(&sock, &["backend", "drain", VIP4, &b0]);
    assert_eq!(serving(), 1);
    assert_eq!(metric(), 1.0);
    let backends = lbctl_json(&sock, &["backend", "list"]);
    let file = fs::read(&lbd.config).unwrap();
    let want = "vip 10.200.100.1:80/tcp: this change leaves it no serving backend (the others are drained, down or at weight 0), so all its traffic would be dropped; add or undrain another backend first, or repeat the command with --force to do it anyway";
    for args in [
        vec!["backend", "drain", VIP4, &b1],
        vec!["backend", "remove", VIP4, &b1],
        vec!["backend", "set-weight", VIP4, &b1, "0"],
    ] {
        let out = lbctl(&sock, &args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", show(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(want),
            "{args:?}: {}",
            show(&out)
        );
        assert_eq!(
            lbctl_json(&sock, &["backend", "list"]),
            backends,
            "{args:?}"
        );
        assert_eq!(fs::read(&lbd.config).unwrap(), file, "{args:?}");
    }
    // Forced: done, and shown.
    change(&sock, &["backend", "drain", VIP4, &b1, "--force"]);
    assert_eq!(serving(), 0);
    assert_eq!(metric(), 0.0);
    let text = lbctl(&sock, &["status"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.lines()
            .any(|l| l.starts_with(VIP4) && l.ends_with("no serving backend: traffic dropped")),
        "{text}"
    );
    // Nothing serving already: removing one more is no loss, and needs no force.
    change(&sock, &["backend", "remove", VIP4, &b0]);
    change(&sock, &["backend", "undrain", VIP4, &b1]);
    assert_eq!(serving(), 1);
    drop(lbd);
    let _ = fs::remove_dir_all(&dir);
}
