//! The shipped binaries as an operator runs them: `lbd --config` in the balancer namespace,
//! `lbd decap` on every backend, configuration reloads on SIGHUP, clean detach on SIGTERM.
use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};
use tests::{
    lab::{Lab, LabSpec, LB_V4, LB_V6, VIP_V4},
    procs::{
        bin_path, now_ms, signal, start_decaps, wait_for, wait_neighbours, xdp_attached, Lbd,
        LbdOptions,
    },
    require_root,
    tcp::{client_many, tally, TcpServer},
};

fn config(lab: &Lab, weights: &[u32]) -> String {
    // A socket of its own, so that lbd instances of concurrent tests never meet.
    let prefix = lab.prefix();
    let mut text = format!(
        "interface = \"eth0\"\nxdp_mode = \"native\"\npin_dir = \"\"\ncontrol_socket = \"/run/{prefix}/lbd.sock\"\n[encap]\nsource_v4 = \"{LB_V4}\"\nsource_v6 = \"{LB_V6}\"\n\
         [[vip]]\naddress = \"{VIP_V4}\"\nport = 80\nprotocol = \"tcp\"\nforwarding = \"ipip\"\n"
    );
    for (i, w) in weights.iter().enumerate() {
        text.push_str(&format!(
            "[[vip.backend]]\naddress = \"{}\"\nweight = {w}\n",
            lab.backend(i).v4()
        ));
    }
    text
}

#[test]
fn lbd_serves_reloads_and_detaches() {
    require_root();
    let lab = Lab::new(LabSpec { backends: 3 }).expect("building the lab");
    let vip = SocketAddr::new(IpAddr::from(VIP_V4), 80);
    let _servers: Vec<TcpServer> = (0..3)
        .map(|i| TcpServer::start(lab.backend(i).ns(), &[vip], &format!("backend{i}")).unwrap())
        .collect();
    let decaps = start_decaps(&lab, 3);

    let dir = std::env::temp_dir().join(format!("lbd-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg_path = dir.join("lbd.toml");
    std::fs::write(&cfg_path, config(&lab, &[1, 1, 1])).unwrap();
    let socket = format!("/run/{}/lbd.sock", lab.prefix());
    let mut agent = Lbd::spawn(lab.lb().ns(), &cfg_path, socket, &LbdOptions::default());
    agent.wait_ready();
    assert!(xdp_attached(lab.lb().ns()));
    let backends: Vec<IpAddr> = (0..3).map(|i| lab.backend(i).v4().into()).collect();
    wait_neighbours(lab.lb().ns(), &backends);

    // Metrics listen on localhost by default: reachable inside the balancer's namespace,
    // refused from the network.
    let metrics = |ns: &tests::netns::NetNs, addr: SocketAddr| {
        ns.run_in(|| std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok())
    };
    assert!(
        metrics(lab.lb().ns(), "127.0.0.1:9469".parse().unwrap()),
        "metrics must listen on 127.0.0.1:9469 by default"
    );
    assert!(
        !metrics(
            lab.client().ns(),
            SocketAddr::new(IpAddr::from(LB_V4), 9469)
        ),
        "metrics must not be reachable from the network by default"
    );
    let results = client_many(lab.client().ns(), vip, 600, Duration::from_secs(3));
    assert!(
        results.iter().all(|r| r.is_ok()),
        "connections through lbd failed: {:?}",
        results.iter().find(|r| r.is_err())
    );
    let counts = tally(&results);
    println!("equal weights: {counts:?}");
    assert_eq!(counts.len(), 3, "all three backends serve: {counts:?}");

    // Drain backend0 by weight 0 and reload: new connections avoid it.
    std::fs::write(&cfg_path, config(&lab, &[0, 1, 1])).unwrap();
    let asked = now_ms();
    agent.signal(libc::SIGHUP);
    agent.wait_event("reloaded", asked);
    let results = client_many(lab.client().ns(), vip, 400, Duration::from_secs(3));
    let counts = tally(&results);
    println!("after reload with backend0 at weight 0: {counts:?}");
    assert!(results.iter().all(|r| r.is_ok()));
    assert!(
        !counts.contains_key("backend0"),
        "backend0 still gets new connections: {counts:?}"
    );

    // A broken file is rejected on reload and changes nothing; lbd keeps running.
    std::fs::write(&cfg_path, "interface = \"eth0\"\n[[vip]]\naddress = \"10.200.100.1\"\nport = 80\nprotocol = \"tcp\"\ntable_size = 65536\n").unwrap();
    let asked = now_ms();
    agent.signal(libc::SIGHUP);
    agent.wait_event("reload_refused", asked);
    assert!(agent.try_wait().is_none(), "lbd exited on a bad reload");
    let results = client_many(lab.client().ns(), vip, 200, Duration::from_secs(3));
    let counts = tally(&results);
    assert!(
        results.iter().all(|r| r.is_ok()) && !counts.contains_key("backend0"),
        "state changed after a rejected reload: {counts:?}"
    );

    // SIGTERM: lbd exits cleanly and the program is detached.
    let status = agent.stop();
    assert!(
        status.success(),
        "lbd exit status {status}:\n{}",
        agent.log()
    );
    assert!(
        !xdp_attached(lab.lb().ns()),
        "XDP still attached after lbd exited"
    );
    for d in &decaps {
        signal(d, libc::SIGTERM);
    }
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(format!("/run/{}", lab.prefix()));
}

/// lbd's refusal is said once on stderr, as `lbd: error: ...`, not also as a log record.
fn assert_once(stderr: &str) {
    assert!(stderr.starts_with("lbd: error: "), "{stderr}");
    assert_eq!(stderr.matches("lbd: error:").count(), 1, "{stderr}");
    assert!(!stderr.contains("ERROR"), "no log record of it: {stderr}");
}

/// Writes `text` to `path` and runs `lbd --config PATH`, which must fail with `want` in its
/// error; its exit code and stderr.
fn refuses(path: &std::path::Path, text: &str, want: &str) -> (Option<i32>, String) {
    std::fs::write(path, text).unwrap();
    let out = std::process::Command::new(bin_path("lbd"))
        .arg("--config")
        .arg(path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "lbd accepted {text:?}: {stderr}");
    assert!(
        stderr.contains(want),
        "lbd's error for {text:?} should contain {want:?}, got: {stderr}"
    );
    (out.status.code(), stderr)
}

#[test]
fn lbd_rejects_bad_config_with_clear_errors() {
    require_root();
    let lbd = bin_path("lbd");
    let dir = std::env::temp_dir().join(format!("lbd-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cases = [
        ("interface = \"eth0\"\nbogus = 1\n", "unknown field `bogus`"),
        (
            "interface = \"no-such-if0\"\n[encap]\nsource_v4 = \"10.0.0.1\"\n",
            "interface: no interface named \"no-such-if0\"",
        ),
        (
            "interface = \"lo\"\n[[vip]]\naddress = \"10.0.0.100\"\nport = 80\nprotocol = \"tcp\"\n",
            "needs encap.source_v4",
        ),
    ];
    for (i, (text, want)) in cases.iter().enumerate() {
        let (_, stderr) = refuses(&dir.join(format!("bad{i}.toml")), text, want);
        assert_once(&stderr);
    }
    // Also with --check, and for a file that is not there.
    let out = std::process::Command::new(&lbd)
        .args(["--config", "/nonexistent/lbd.toml", "--check"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot read config file /nonexistent/lbd.toml"),
        "{stderr}"
    );
    assert_once(&stderr);
    // A config file anyone can write is a way to root: refused, with the fix.
    use std::os::unix::fs::PermissionsExt as _;
    let path = dir.join("open.toml");
    std::fs::write(&path, "interface = \"lo\"\npin_dir = \"\"\n").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = std::process::Command::new(&lbd)
        .args(["--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "lbd accepted a world-writable config"
    );
    assert!(
        stderr.contains("is writable by everyone (mode 0666)") && stderr.contains("chmod go-w"),
        "lbd's error for a world-writable config: {stderr}"
    );
    // So are state directories others could write: the control socket's and pin_dir. Refused
    // before anything is touched (the interface does not even exist, and is checked later).
    let shared_run = dir.join("shared-run");
    std::fs::create_dir_all(&shared_run).unwrap();
    std::fs::set_permissions(&shared_run, std::fs::Permissions::from_mode(0o777)).unwrap();
    let foreign_pins =
        std::path::Path::new("/sys/fs/bpf").join(format!("lbd-bad-{}", std::process::id()));
    let _ = std::fs::remove_dir(&foreign_pins);
    std::fs::create_dir(&foreign_pins).unwrap();
    std::os::unix::fs::chown(&foreign_pins, Some(65534), Some(65534)).unwrap();
    let state_cases = [
        (
            format!(
                "interface = \"no-such-if0\"\npin_dir = \"\"\ncontrol_socket = \"{}/lbd.sock\"\n",
                shared_run.display()
            ),
            format!(
                "control_socket directory {} is writable by everyone (mode 0777): lbd acts on it as root; `chmod go-w {}`",
                shared_run.display(),
                shared_run.display()
            ),
        ),
        (
            format!(
                "interface = \"no-such-if0\"\npin_dir = \"{}\"\ncontrol_socket = \"{}/run/lbd.sock\"\n",
                foreign_pins.display(),
                dir.display()
            ),
            format!(
                "pin_dir {} is owned by uid 65534, not root: lbd acts on it as root; `chown root {}`",
                foreign_pins.display(),
                foreign_pins.display()
            ),
        ),
    ];
    for (i, (text, want)) in state_cases.iter().enumerate() {
        let (code, stderr) = refuses(&dir.join(format!("state{i}.toml")), text, want);
        assert_eq!(code, Some(1), "{stderr}");
    }
    assert!(
        !dir.join("run").exists(),
        "refused before the control socket's directory was created"
    );
    let _ = std::fs::remove_dir(&foreign_pins);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn datapath_warnings_reach_the_log_once_not_per_packet() {
    require_root();
    let lab = Lab::new(LabSpec { backends: 1 }).expect("building the lab");
    let prefix = lab.prefix();
    let dir = std::env::temp_dir().join(format!("{prefix}-log"));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg_path = dir.join("lbd.toml");
    // 10.200.0.99 is on the lab's segment but no host answers for it: its neighbour never
    // resolves, so every packet to it is dropped with drop_fib.
    std::fs::write(
        &cfg_path,
        format!(
            "interface = \"eth0\"\nxdp_mode = \"native\"\npin_dir = \"\"\ncontrol_socket = \"/run/{prefix}/lbd.sock\"\n\
             [encap]\nsource_v4 = \"{LB_V4}\"\n[[vip]]\naddress = \"{VIP_V4}\"\nport = 80\nprotocol = \"tcp\"\n\
             [[vip.backend]]\naddress = \"10.200.0.99\"\n"
        ),
    )
    .unwrap();
    let socket = format!("/run/{prefix}/lbd.sock");
    let mut agent = Lbd::spawn(lab.lb().ns(), &cfg_path, socket, &LbdOptions::default());
    wait_for("lbd to attach", Duration::from_secs(20), || {
        xdp_attached(lab.lb().ns())
    });
    let vip = SocketAddr::new(IpAddr::from(VIP_V4), 80);
    // Several connection attempts, each retrying its SYN: dozens of dropped packets.
    let results = client_many(lab.client().ns(), vip, 5, Duration::from_millis(1500));
    assert!(
        results.iter().all(|r| r.is_err()),
        "nothing can answer for 10.200.0.99"
    );
    agent.stop();
    let text = agent.log();
    let warnings = text.matches("no route or unresolved neighbour").count();
    println!("{warnings} datapath warning(s) for 5 failed connections:\n{text}");
    assert!(
        (1..=3).contains(&warnings),
        "the datapath must report the unreachable backend through aya-log, once per change, not per packet (got {warnings})"
    );
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(format!("/run/{prefix}"));
}

/// `bpftool ARGS... --json`, parsed.
fn bpftool_json(args: &[&str]) -> serde_json::Value {
    let out = std::process::Command::new("bpftool")
        .args(args)
        .arg("--json")
        .output()
        .expect("running bpftool (installed by `cargo xtask setup`)");
    assert!(out.status.success(), "bpftool {args:?}: {out:?}");
    serde_json::from_slice(&out.stdout).expect("bpftool's JSON")
}

#[test]
fn the_program_and_its_maps_carry_btf_and_lbd_logs_no_btf_warning() {
    require_root();
    let lab = Lab::new(LabSpec { backends: 1 }).expect("building the lab");
    let dir = tests::procs::scratch("btf-e2e");
    let _cleanup = tests::procs::RemoveOnDrop(dir.clone());
    std::fs::write(
        dir.join("lbd.toml"),
        format!(
            "interface = \"eth0\"\nxdp_mode = \"native\"\npin_dir = \"\"\ncontrol_socket = \"{sock}\"\n\
             [encap]\nsource_v4 = \"{LB_V4}\"\n[[vip]]\naddress = \"{VIP_V4}\"\nport = 80\nprotocol = \"tcp\"\n\
             [[vip.backend]]\naddress = \"{}\"\n",
            lab.backend(0).v4(),
            sock = dir.join("run/lbd.sock").display()
        ),
    )
    .unwrap();
    // RUST_LOG=info, as lbd's default filter: a warning of aya's loader would be in the log.
    let lbd = tests::procs::Lbd::start(lab.lb().ns(), &dir);
    let status = tests::procs::lbctl(&lbd.socket, &["status", "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).expect("status JSON");
    let id = status["program_id"]
        .as_u64()
        .expect("a program id")
        .to_string();

    let prog = bpftool_json(&["prog", "show", "id", &id]);
    println!("program {id}: {prog}");
    assert!(
        prog["btf_id"].as_u64().is_some_and(|b| b > 0),
        "the balancer must load with its BTF: {prog}"
    );
    let maps: Vec<serde_json::Value> = prog["map_ids"]
        .as_array()
        .expect("map_ids")
        .iter()
        .map(|m| bpftool_json(&["map", "show", "id", &m.to_string()]))
        .collect();
    let named = |name: &str| {
        maps.iter()
            .find(|m| m["name"] == name)
            .unwrap_or_else(|| panic!("the program uses no map {name}: {maps:?}"))
    };
    for name in [
        lb_common::maps::VIPS,
        lb_common::maps::CT,
        lb_common::maps::BACKENDS,
    ] {
        let map = named(name);
        assert!(
            map["btf_id"].as_u64().is_some_and(|b| b > 0),
            "map {name} must carry BTF: {map}"
        );
    }
    // Typed keys and values: bpftool prints the structs' fields by name.
    let vips = bpftool_json(&[
        "map",
        "dump",
        "id",
        &named(lb_common::maps::VIPS)["id"].to_string(),
    ]);
    let entry = &vips[0]["formatted"];
    println!("VIPS entry: {entry}");
    // The port is kept in network byte order.
    assert_eq!(
        entry["key"]["port"],
        80u16.to_be(),
        "VIPS keys typed as VipKey: {vips}"
    );
    assert!(
        entry["value"]["vip_id"].is_u64(),
        "VIPS values typed as VipMeta: {vips}"
    );

    let log = lbd.log();
    assert!(
        !log.contains("BTF"),
        "lbd's start must log nothing about BTF:\n{log}"
    );
}
