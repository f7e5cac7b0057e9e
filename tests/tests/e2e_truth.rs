//! The balancer must not lie about, or lose, its own datapath (issue 20): `lbd cleanup` under a
//! running lbd, a program detached or unpinned behind lbd's back, the XDP mode lbd reports,
//! and `lbd --check` running every validation lbd itself runs.
use serde_json::{json, Value};
use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};
use tests::{
    lab::{Lab, LabSpec, LB_V4, VIP_V4},
    procs::{
        bin_path, lbctl, lbctl_json, lbd_run, now_ms, poll_until, scratch, wait_for, xdp_attached,
        Lbd, LbdOptions, RemoveOnDrop,
    },
    require_root,
    tcp::TcpServer,
};

/// A pinned lbd's configuration: pins under /sys/fs/bpf, control socket `dir/run/lbd.sock`.
fn pinned_config(lab: &Lab, dir: &Path, pin_dir: &Path, mode: &str) -> String {
    format!(
        "interface = \"eth0\"\nxdp_mode = \"{mode}\"\npin_dir = \"{}\"\ncontrol_socket = \"{}\"\n\
         [encap]\nsource_v4 = \"{LB_V4}\"\n[[vip]]\naddress = \"{VIP_V4}\"\nport = 80\nprotocol = \"tcp\"\n\
         [[vip.backend]]\naddress = \"{}\"\n",
        pin_dir.display(),
        dir.join("run/lbd.sock").display(),
        lab.backend(0).v4()
    )
}

/// Starts lbd with `nsenter --net` (pins land in the host's bpffs) and waits until it serves.
fn start_pinned(lab: &Lab, dir: &Path, n: usize) -> Lbd {
    let opts = LbdOptions {
        nsenter: true,
        env: vec![("RUST_LOG".into(), "info".into())],
        log: Some(dir.join(format!("lbd-{n}.log"))),
        ..LbdOptions::default()
    };
    let mut lbd = Lbd::spawn(
        lab.lb().ns(),
        &dir.join("lbd.toml"),
        dir.join("run/lbd.sock"),
        &opts,
    );
    lbd.wait_serving();
    lbd
}

/// A lab, a scratch directory and a pin directory that is removed however the test ends.
fn pinned_setup(label: &str) -> (Lab, PathBuf, PathBuf, RemoveOnDrop, RemoveOnDrop) {
    let lab = Lab::new(LabSpec { backends: 1 }).expect("building the lab");
    let dir = scratch(label);
    let pin_dir = Path::new("/sys/fs/bpf").join(format!("{}-{label}", lab.prefix()));
    let _ = std::fs::remove_dir_all(&pin_dir);
    let pins = RemoveOnDrop(pin_dir.clone());
    let scratch_guard = RemoveOnDrop(dir.clone());
    (lab, dir, pin_dir, pins, scratch_guard)
}

#[test]
fn cleanup_refuses_while_an_lbd_runs_unless_forced() {
    require_root();
    let (lab, dir, pin_dir, _pins, _dir) = pinned_setup("truth-cleanup");
    let config = dir.join("lbd.toml");
    std::fs::write(&config, pinned_config(&lab, &dir, &pin_dir, "native")).unwrap();
    let mut lbd = start_pinned(&lab, &dir, 1);

    let out = lbd_run(lab.lb().ns(), &config, &["cleanup"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "cleanup under a running lbd: {stderr}"
    );
    assert!(
        stderr.starts_with("lbd: error: an lbd (pid ")
            && stderr.contains(&format!(
                "is running on control socket {}",
                dir.join("run/lbd.sock").display()
            ))
            && stderr.contains("`lbd cleanup --force`"),
        "the refusal names the running lbd and --force: {stderr}"
    );
    assert!(
        pin_dir.join("link").exists() && xdp_attached(lab.lb().ns()),
        "a refused cleanup removed nothing"
    );

    let out = lbd_run(lab.lb().ns(), &config, &["cleanup", "--force"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "cleanup --force: {stderr}");
    assert!(
        stderr.contains("loses its datapath"),
        "--force says what it breaks: {stderr}"
    );
    assert!(!pin_dir.exists(), "cleanup --force removed the pins");
    let s = lbd.stop();
    assert!(
        s.success(),
        "lbd after a forced cleanup: {s}\n{}",
        lbd.log()
    );
    // Without an lbd, cleanup needs no --force.
    let out = lbd_run(lab.lb().ns(), &config, &["cleanup"]);
    assert!(out.status.success(), "{out:?}");
}

/// The XDP mode on `eth0` in the lab balancer's namespace as `bpftool net show` says it, in
/// lbd's words (`driver` is `native`), and the program id; `None` when nothing is attached.
fn bpftool_xdp(lab: &Lab) -> Option<(String, u64)> {
    let out = lab
        .lb()
        .ns()
        .command("bpftool")
        .args(["-j", "net", "show", "dev", "eth0"])
        .output()
        .expect("running bpftool (cargo xtask setup installs it)");
    assert!(out.status.success(), "bpftool net show: {out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool's JSON");
    let xdp = v[0]["xdp"].as_array()?.first()?.clone();
    let mode = match xdp["mode"].as_str()? {
        "driver" => "native".to_string(),
        m => m.to_string(),
    };
    Some((mode, xdp["id"].as_u64()?))
}

#[test]
fn the_reported_xdp_mode_is_the_kernels_across_a_mode_change() {
    require_root();
    let (lab, dir, pin_dir, _pins, _dir) = pinned_setup("truth-mode");
    let config = dir.join("lbd.toml");
    let mut prev_id = None;
    for (n, mode) in ["generic", "native", "native", "generic"]
        .iter()
        .enumerate()
    {
        std::fs::write(&config, pinned_config(&lab, &dir, &pin_dir, mode)).unwrap();
        let asked = now_ms();
        let mut lbd = start_pinned(&lab, &dir, n);
        let status = lbd.wait_ready();
        let (kernel_mode, kernel_id) = bpftool_xdp(&lab).expect("a program on eth0");
        println!(
            "start {n}: xdp_mode = {mode}: lbctl says {}, bpftool says {kernel_mode}",
            status["xdp_mode"]
        );
        assert_eq!(
            status["xdp_mode"], kernel_mode,
            "lbctl status must report the kernel's mode (xdp_mode = {mode}, start {n})"
        );
        assert_eq!(
            kernel_mode, *mode,
            "xdp_mode = {mode} is applied on restart (start {n})"
        );
        assert_eq!(
            status["program_id"], kernel_id,
            "lbd's program is the one attached"
        );
        let changed =
            status["events"].as_array().unwrap().iter().any(|e| {
                e["kind"] == "xdp_mode_changed" && e["timestamp_ms"].as_u64() >= Some(asked)
            });
        assert_eq!(
            changed,
            n == 1 || n == 3,
            "an xdp_mode_changed event exactly when the mode changed (start {n}): {status}"
        );
        assert_ne!(prev_id, Some(kernel_id), "each start swaps its program in");
        prev_id = Some(kernel_id);
        let s = lbd.stop();
        assert!(s.success(), "lbd exited with {s}:\n{}", lbd.log());
        assert!(
            xdp_attached(lab.lb().ns()),
            "the pinned datapath outlives lbd"
        );
    }
    let out = lbd_run(lab.lb().ns(), &config, &["cleanup"]);
    assert!(out.status.success(), "{out:?}");
}

/// `lb_datapath_intact` from lbd's metrics in the lab balancer's namespace.
fn intact_metric(lab: &Lab) -> f64 {
    tests::procs::scrape_metrics(lab.lb().ns())["lb_datapath_intact"]
}

/// Waits at most 1 s for `lbctl status` to list a datapath fault containing `what`; returns
/// the status.
fn wait_fault(lbd: &Lbd, what: &str) -> serde_json::Value {
    let t = std::time::Instant::now();
    let mut last = serde_json::Value::Null;
    let found = poll_until(std::time::Duration::from_secs(1), || {
        let s = lbd.control().status().expect("lbd answers");
        let faults = s["datapath_faults"].as_array().expect("datapath_faults");
        let hit = faults.iter().any(|f| f.as_str().unwrap().contains(what));
        if hit {
            println!("{what:?} reported after {:?}: {faults:?}", t.elapsed());
        }
        last = s.clone();
        hit.then_some(s)
    });
    found.unwrap_or_else(|| panic!("no datapath fault {what:?} within 1 s: {last}"))
}

#[test]
fn a_datapath_taken_away_is_reported_within_a_second() {
    require_root();
    let (lab, dir, pin_dir, _pins, _dir) = pinned_setup("truth-lost");
    let config = dir.join("lbd.toml");
    std::fs::write(&config, pinned_config(&lab, &dir, &pin_dir, "native")).unwrap();
    let mut lbd = start_pinned(&lab, &dir, 1);
    let status = lbd.wait_ready();
    assert_eq!(status["datapath_faults"], serde_json::json!([]), "{status}");
    assert_eq!(intact_metric(&lab), 1.0);

    // A pin removed by hand: still balancing, but no longer surviving a restart.
    let asked = now_ms();
    std::fs::remove_file(pin_dir.join("CT")).unwrap();
    let s = wait_fault(&lbd, "unpinned: CT missing from");
    assert_eq!(s["xdp_mode"], "native", "still attached: {s}");
    let t = std::time::Instant::now();
    lbd.wait_event("datapath_lost", asked);
    assert!(
        t.elapsed() < std::time::Duration::from_secs(1),
        "journalled within a second"
    );
    assert_eq!(intact_metric(&lab), 0.0);

    // `lbd cleanup --force`: the program is gone from the interface.
    let asked = now_ms();
    let out = lbd_run(lab.lb().ns(), &config, &["cleanup", "--force"]);
    assert!(out.status.success(), "{out:?}");
    let s = wait_fault(&lbd, "detached: no XDP program on eth0");
    assert_eq!(s["xdp_mode"], "detached", "{s}");
    let lost = lbd.wait_event("datapath_lost", asked);
    assert!(
        lost["message"]
            .as_str()
            .unwrap()
            .contains("balances nothing until it is restarted"),
        "{lost}"
    );
    let text = String::from_utf8_lossy(&lbctl(&lbd.socket, &["status"]).stdout).to_string();
    assert!(
        text.contains("DATAPATH   detached"),
        "lbctl status says it: {text}"
    );
    assert_eq!(intact_metric(&lab), 0.0);
    let s = lbd.stop();
    assert!(s.success(), "{s}");
    assert!(
        lbd.log().contains("taken away behind lbd's back"),
        "the log says it: {}",
        lbd.log()
    );
}

/// `lbd --config PATH --check` on the host; asserted to fail with exactly `want` on stderr
/// (once, as `lbd: error: ...`) and exit status 1.
fn check_refuses(path: &Path, want: &str) {
    let out = Command::new(bin_path("lbd"))
        .args(["--config", path.to_str().unwrap(), "--check"])
        .output()
        .expect("running lbd --check");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr,
        format!("lbd: error: {want}\n"),
        "lbd --check on {}",
        path.display()
    );
    assert_eq!(out.status.code(), Some(1), "{stderr}");
}

#[test]
fn check_runs_every_validation_start_runs() {
    require_root();
    use std::os::unix::fs::PermissionsExt as _;
    let dir = scratch("truth-check");
    let _dir = RemoveOnDrop(dir.clone());
    let sock = dir.join("run/lbd.sock");
    let base = format!("pin_dir = \"\"\ncontrol_socket = \"{}\"\n", sock.display());
    let pins = dir.join("pins");
    let cases = [
        (
            format!("interface = \"no-such-if0\"\n{base}"),
            "interface: no interface named \"no-such-if0\" here; check `ip link` (and the network namespace)".to_string(),
        ),
        (
            format!("interface = \"lo\"\ncontrol_group = \"no-such-group-lb\"\n{base}"),
            "control_group: no group named \"no-such-group-lb\" on this host; create it (groupadd no-such-group-lb) or remove control_group from the configuration".to_string(),
        ),
        (
            format!(
                "interface = \"lo\"\npin_dir = \"{}\"\ncontrol_socket = \"{}\"\n",
                pins.display(),
                sock.display()
            ),
            format!(
                "pin_dir: {} is not on a bpffs mount; mount one (`mount -t bpf bpf {}`) or use the default /sys/fs/bpf/lb",
                pins.display(),
                dir.display()
            ),
        ),
    ];
    for (i, (text, want)) in cases.iter().enumerate() {
        let path = dir.join(format!("case{i}.toml"));
        std::fs::write(&path, text).unwrap();
        check_refuses(&path, want);
    }
    assert!(!pins.exists(), "--check creates no pin_dir");
    // The host checks start runs (an encapsulation source this host does not have).
    let path = dir.join("encap.toml");
    std::fs::write(
        &path,
        format!("interface = \"lo\"\n{base}[encap]\nsource_v4 = \"192.0.2.99\"\n"),
    )
    .unwrap();
    check_refuses(
        &path,
        "encap.source_v4: 192.0.2.99 is not an address of this host (no interface in lbd's network namespace has it), so tunnelled packets would carry a source that is not this host's (dropped by anti-spoofing filters, their ICMP errors lost); use an address of lo (`ip -4 addr show lo`)",
    );
    for (mode, who) in [(0o666, "everyone"), (0o620, "its group")] {
        let path = dir.join(format!("open{mode:o}.toml"));
        std::fs::write(&path, format!("interface = \"lo\"\n{base}")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        check_refuses(
            &path,
            &format!(
                "config file {p} is writable by {who} (mode {mode:04o}): lbd acts on it as root; `chmod go-w {p}`",
                p = path.display()
            ),
        );
    }
    // A good file passes.
    let path = dir.join("good.toml");
    std::fs::write(&path, format!("interface = \"lo\"\n{base}")).unwrap();
    let out = Command::new(bin_path("lbd"))
        .args(["--config", path.to_str().unwrap(), "--check"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(!dir.join("run").exists(), "--check binds no control socket");
}

#[test]
fn check_refuses_restart_only_changes_for_the_running_lbd() {
    require_root();
    let (lab, dir, pin_dir, _pins, _dir) = pinned_setup("truth-check-running");
    let config = dir.join("lbd.toml");
    let text = pinned_config(&lab, &dir, &pin_dir, "native");
    std::fs::write(&config, &text).unwrap();
    let mut lbd = start_pinned(&lab, &dir, 1);
    let running = lbd.wait_ready();
    let pid = running["pid"].as_u64().unwrap();

    // A change a reload applies: ok.
    std::fs::write(
        &config,
        text.replace("[[vip.backend]]", "[[vip.backend]]\nweight = 2"),
    )
    .unwrap();
    let out = lbd_run(lab.lb().ns(), &config, &["--check"]);
    assert!(out.status.success(), "{out:?}");
    // Restart-only keys: refused, naming each and the running lbd.
    std::fs::write(
        &config,
        text.replace(
            "xdp_mode = \"native\"",
            "xdp_mode = \"generic\"\nmetrics_listen = \"127.0.0.1:9470\"\nconntrack_size = 100000",
        ),
    )
    .unwrap();
    let out = lbd_run(lab.lb().ns(), &config, &["--check"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr,
        format!(
            "lbd: error: xdp_mode, conntrack_size, metrics_listen differ from what the lbd running on {} (pid {pid}) runs with, and only change on restart: a reload would be refused; restart lbd to apply them (systemctl restart lbd)\n",
            dir.join("run/lbd.sock").display()
        )
    );
    assert_eq!(out.status.code(), Some(1));
    // And lbd's own reload agrees.
    let asked = now_ms();
    lbd.signal(libc::SIGHUP);
    let refused = lbd.wait_event("reload_refused", asked);
    assert!(
        refused["message"]
            .as_str()
            .unwrap()
            .contains("xdp_mode, conntrack_size, metrics_listen only change on restart"),
        "{refused}"
    );
    let s = lbd.stop();
    assert!(s.success(), "{s}");
    // Once no lbd answers, the same file passes (a restart applies it).
    let out = lbd_run(lab.lb().ns(), &config, &["--check"]);
    assert!(out.status.success(), "{out:?}");
    let out = lbd_run(lab.lb().ns(), &config, &["cleanup"]);
    assert!(out.status.success(), "{out:?}");
}

/// `lbd.toml` without pins: control socket `dir/run/lbd.sock`, one VIP with `vip_extra` and
/// `backends` as `(address, weight)`.
fn plain_config(dir: &Path, vip_extra: &str, backends: &[(String, u32)]) -> String {
    let mut s = format!(
        "interface = \"eth0\"\nxdp_mode = \"native\"\npin_dir = \"\"\ncontrol_socket = \"{}\"\n\
         [encap]\nsource_v4 = \"{LB_V4}\"\n[[vip]]\naddress = \"{VIP_V4}\"\nport = 80\nprotocol = \"tcp\"\n{vip_extra}\n",
        dir.join("run/lbd.sock").display()
    );
    for (a, w) in backends {
        s.push_str(&format!(
            "[[vip.backend]]\naddress = \"{a}\"\nweight = {w}\n"
        ));
    }
    s
}

const VIP: &str = "10.200.100.1:80/tcp";

/// Each backend's `(effective_weight, table_weight)` in `backend list`, `stats` and `/metrics`,
/// and its `learned_weight` in `stats`, by address.
type Shown = Vec<(String, Value, Value, Value, Value, f64, f64, Value)>;

fn shown_weights(lab: &Lab, sock: &Path) -> Shown {
    let list = lbctl_json(sock, &["backend", "list"]);
    let stats = lbctl_json(sock, &["stats", "--interval", "0.1"]);
    let metrics = tests::procs::scrape_metrics(lab.lb().ns());
    let mut out = Vec::new();
    for b in list.as_array().unwrap() {
        let addr = b["address"].as_str().unwrap().to_string();
        let s = stats["vips"][0]["backends"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["address"] == addr.as_str())
            .unwrap()
            .clone();
        let series = |name: &str| metrics[&format!("{name}{{vip=\"{VIP}\",backend=\"{addr}\"}}")];
        out.push((
            addr.clone(),
            b["effective_weight"].clone(),
            b["table_weight"].clone(),
            s["effective_weight"].clone(),
            s["table_weight"].clone(),
            series("lb_backend_effective_weight"),
            series("lb_backend_table_weight"),
            s["learned_weight"].clone(),
        ));
    }
    out
}

/// Issue 20, "one truth": switching `[vip.learning]` on changes no weight an operator reads
/// (`backend list`, `stats`, `lb_backend_effective_weight`): they stay in configured units,
/// and the table's own units (configured x 100) show apart as `table_weight`.
#[test]
fn turning_learning_on_keeps_the_weights_in_configured_units() {
    require_root();
    let lab = Lab::new(LabSpec { backends: 2 }).expect("building the lab");
    let dir = scratch("truth-weights");
    let _dir = RemoveOnDrop(dir.clone());
    let backends: Vec<(String, u32)> = vec![
        (lab.backend(0).v4().to_string(), 1),
        (lab.backend(1).v4().to_string(), 3),
    ];
    // Health probes (TCP to each backend's own address) must pass: learning needs them.
    let _servers: Vec<TcpServer> = (0..2)
        .map(|i| {
            let a = SocketAddr::new(IpAddr::from(lab.backend(i).v4()), 80);
            TcpServer::start(lab.backend(i).ns(), &[a], &format!("backend{i}")).unwrap()
        })
        .collect();
    let health =
        "[vip.health]\nkind = \"tcp\"\ninterval_ms = 100\ntimeout_ms = 100\nrise = 1\nfall = 3\n";
    let config = dir.join("lbd.toml");
    std::fs::write(&config, plain_config(&dir, health, &backends)).unwrap();
    let lbd = Lbd::start(lab.lb().ns(), &dir);
    let sock = lbd.socket.clone();
    let all_up = || {
        lbctl_json(&sock, &["backend", "list"])
            .as_array()
            .unwrap()
            .iter()
            .all(|b| b["health"] == "up")
    };
    wait_for("both backends up", Duration::from_secs(10), all_up);
    let slots = |l: &Value| -> Vec<u64> {
        l.as_array()
            .unwrap()
            .iter()
            .map(|b| b["slots"].as_u64().unwrap())
            .collect()
    };
    let slots_before = slots(&lbctl_json(&sock, &["backend", "list"]));
    let before = shown_weights(&lab, &sock);
    for ((addr, w), (a, list_eff, list_table, st_eff, st_table, m_eff, m_table, learned)) in
        backends.iter().zip(&before)
    {
        assert_eq!(addr, a);
        assert_eq!((list_eff, list_table), (&json!(w), &json!(w)), "{before:?}");
        assert_eq!((st_eff, st_table), (&json!(w), &json!(w)), "{before:?}");
        assert_eq!((*m_eff, *m_table), (*w as f64, *w as f64), "{before:?}");
        assert!(
            learned.is_null(),
            "no learning, no learned weight: {before:?}"
        );
    }

    // Learning on (a long interval: the model takes no step during the test), by reload.
    let learning = format!("{health}[vip.learning]\nenabled = true\ninterval_ms = 600000\n");
    std::fs::write(&config, plain_config(&dir, &learning, &backends)).unwrap();
    let since = now_ms();
    lbd.signal(libc::SIGHUP);
    lbd.wait_event("reloaded", since);
    wait_for("both backends up again", Duration::from_secs(10), all_up);
    let after = shown_weights(&lab, &sock);
    for ((addr, w), (a, list_eff, list_table, st_eff, st_table, m_eff, m_table, learned)) in
        backends.iter().zip(&after)
    {
        assert_eq!(addr, a);
        // What operators read did not move; the table's units are apart.
        assert_eq!(list_eff, &json!(w), "backend list, learning on: {after:?}");
        assert_eq!(st_eff, &json!(w), "stats, learning on: {after:?}");
        assert_eq!(*m_eff, *w as f64, "lb_backend_effective_weight: {after:?}");
        assert_eq!(learned, &json!(w), "stats learned_weight: {after:?}");
        assert_eq!(list_table, &json!(w * 100), "{after:?}");
        assert_eq!(st_table, &json!(w * 100), "{after:?}");
        assert_eq!(*m_table, (w * 100) as f64, "{after:?}");
    }
    let m = tests::procs::scrape_metrics(lab.lb().ns());
    assert_eq!(
        m[&format!(
            "lb_backend_learned_weight{{vip=\"{VIP}\",backend=\"{}\"}}",
            backends[1].0
        )],
        3.0
    );
    // The same ratios: the table did not change, slot for slot.
    assert_eq!(
        slots(&lbctl_json(&sock, &["backend", "list"])),
        slots_before,
        "learning on rebuilt another table"
    );
    let text = lbctl(&sock, &["backend", "list"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("EFFECTIVE") && text.contains("TABLE"),
        "{text}"
    );
}

/// `lbctl ARGS...` run as a child whose pid is known: (pid, output).
fn lbctl_with_pid(sock: &Path, args: &[&str]) -> (u32, Output) {
    let child = Command::new(bin_path("lbctl"))
        .arg("--socket")
        .arg(sock)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("running lbctl");
    let pid = child.id();
    (pid, child.wait_with_output().unwrap())
}

/// The journal's events of `kind`, from `lbctl status --json`.
fn events_of(sock: &Path, kind: &str) -> Vec<Value> {
    lbctl_json(sock, &["status"])["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == kind)
        .cloned()
        .collect()
}

/// Issue 20, audit: every accepted change is logged once and journaled with who asked (uid,
/// pid) and the request as the lbctl command; the journal survives a clean restart and a kill
/// (restarts from pins), and the kill is said in the new lbd's log too.
#[test]
fn changes_are_audited_and_the_history_survives_restarts() {
    require_root();
    let (lab, dir, pin_dir, _pins, _dir) = pinned_setup("truth-audit");
    std::fs::write(
        dir.join("lbd.toml"),
        pinned_config(&lab, &dir, &pin_dir, "native"),
    )
    .unwrap();
    let mut lbd = start_pinned(&lab, &dir, 1);
    let sock = dir.join("run/lbd.sock");

    let (pid, out) = lbctl_with_pid(
        &sock,
        &["backend", "add", VIP, "10.200.0.99", "--weight", "2"],
    );
    assert!(out.status.success(), "{out:?}");
    let words = format!("lbctl backend add {VIP} 10.200.0.99 --weight 2");
    let by = format!("(by uid 0 pid {pid})");
    let applied = events_of(&sock, "change_applied");
    assert_eq!(applied.len(), 1, "{applied:#?}");
    let event = applied[0].clone();
    let msg = event["message"].as_str().unwrap();
    assert!(msg.starts_with(&format!("{words} {by}: ")), "{msg}");
    let logged = |log: &str, pid: u32| {
        log.lines()
            .filter(|l| {
                l.contains("change applied")
                    && l.contains(&words)
                    && l.contains(&format!("uid 0 pid {pid}"))
            })
            .count()
    };
    assert_eq!(logged(&lbd.log(), pid), 1, "{}", lbd.log());

    // The same request again changes nothing: neither logged as a change nor journaled.
    let (again, out) = lbctl_with_pid(
        &sock,
        &["backend", "add", VIP, "10.200.0.99", "--weight", "2"],
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(events_of(&sock, "change_applied").len(), 1);
    assert_eq!(logged(&lbd.log(), again), 0, "{}", lbd.log());
    // A refused one: the same words and who asked, in the log and the journal.
    let (refused_pid, out) = lbctl_with_pid(
        &sock,
        &["backend", "set-weight", VIP, "10.200.0.99", "10001"],
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let refused = events_of(&sock, "change_refused");
    assert!(
        refused
            .iter()
            .any(|e| e["message"].as_str().unwrap().starts_with(&format!(
                "lbctl backend set-weight {VIP} 10.200.0.99 10001 (by uid 0 pid {refused_pid}): "
            ))),
        "{refused:#?}"
    );
    assert!(
        lbd.log().lines().any(
            |l| l.contains("change refused") && l.contains(&format!("uid 0 pid {refused_pid}"))
        ),
        "{}",
        lbd.log()
    );

    // A clean restart from pins: the history is still there, before the new start.
    assert!(lbd.stop().success());
    let mut lbd = start_pinned(&lab, &dir, 2);
    let st = lbctl_json(&sock, &["status"]);
    let ev = st["events"].as_array().unwrap();
    let at = ev
        .iter()
        .position(|e| *e == event)
        .unwrap_or_else(|| panic!("the change_applied event did not survive the restart: {st:#}"));
    assert!(
        ev[at..].iter().any(|e| e["kind"] == "start"
            && e["message"]
                .as_str()
                .unwrap()
                .contains("restored from pins")),
        "{st:#}"
    );
    assert!(events_of(&sock, "change_refused").len() >= refused.len());

    // Killed: the next lbd says so in the journal and in its log, and the history stays.
    lbd.sigkill();
    let lbd = start_pinned(&lab, &dir, 3);
    let unclean = events_of(&sock, "unclean_stop");
    assert_eq!(unclean.len(), 1, "{unclean:#?}");
    assert!(
        lbd.log()
            .lines()
            .any(|l| l.contains("WARN") && l.contains("stopped without cleanup")),
        "{}",
        lbd.log()
    );
    assert!(events_of(&sock, "change_applied").contains(&event));
    assert!(
        events_of(&sock, "start").len() >= 3,
        "{:#}",
        lbctl_json(&sock, &["status"])
    );
    let history = events_history(&sock);
    assert!(history.contains("change_applied"), "{history}");
}

/// The journal's file beside the control socket.
fn events_history(sock: &Path) -> String {
    let mut p = sock.as_os_str().to_owned();
    p.push(".events");
    std::fs::read_to_string(PathBuf::from(p)).unwrap_or_default()
}

/// `ip neigh show ADDR` in the balancer's namespace.
fn neigh(lab: &Lab, addr: &str) -> String {
    lab.lb()
        .ns()
        .ip(["-d", "neigh", "show", addr])
        .unwrap_or_default()
}

/// Issue 20: `lbctl backend remove` and `lbd cleanup` remove the managed neighbour entries lbd
/// installed, and only those (an operator's own entry stays).
#[test]
fn removed_backends_and_cleanup_leave_no_neighbour_entries_of_lbds() {
    require_root();
    let (lab, dir, pin_dir, _pins, _dir) = pinned_setup("truth-neigh");
    let config = dir.join("lbd.toml");
    std::fs::write(&config, pinned_config(&lab, &dir, &pin_dir, "native")).unwrap();
    let operators = "10.200.0.98";
    lab.lb()
        .ns()
        .ip([
            "neigh",
            "replace",
            operators,
            "dev",
            "eth0",
            "lladdr",
            "02:00:00:00:00:98",
            "nud",
            "permanent",
        ])
        .unwrap();
    let mut lbd = start_pinned(&lab, &dir, 1);
    let sock = dir.join("run/lbd.sock");
    let b0 = lab.backend(0).v4().to_string();
    // 10.200.0.99 is on the lab's segment but nobody answers for it: `managed FAILED`.
    let gone = "10.200.0.99";
    assert!(lbctl(&sock, &["backend", "add", VIP, gone])
        .status
        .success());
    for a in [b0.as_str(), gone] {
        let n = neigh(&lab, a);
        assert!(
            n.contains("managed") && n.contains("proto 76"),
            "{a}: {n:?}"
        );
    }
    assert!(lbctl(&sock, &["backend", "remove", VIP, gone])
        .status
        .success());
    assert_eq!(
        neigh(&lab, gone).trim(),
        "",
        "left behind after backend remove"
    );
    assert!(neigh(&lab, &b0).contains("managed"), "{}", neigh(&lab, &b0));

    assert!(lbd.stop().success());
    let out = lbd_run(lab.lb().ns(), &config, &["cleanup"]);
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!(
            "removed the neighbour entries lbd had installed: {b0}"
        )),
        "{stdout}"
    );
    assert_eq!(neigh(&lab, &b0).trim(), "", "left behind after lbd cleanup");
    let theirs = neigh(&lab, operators);
    assert!(
        theirs.contains("PERMANENT"),
        "the operator's entry went: {theirs:?}"
    );
}

/// Issue 20: after a refused reload, lbctl's refusal to overwrite the file says that it holds
/// an edit lbd refused, and why; an edit not reloaded that lbd would refuse is said as such.
/// Nothing changes either way.
#[test]
fn a_refused_reload_is_named_in_lbctls_refusal() {
    require_root();
    let lab = Lab::new(LabSpec { backends: 1 }).expect("building the lab");
    let dir = scratch("truth-reload");
    let _dir = RemoveOnDrop(dir.clone());
    let b0 = lab.backend(0).v4().to_string();
    let backends = vec![(b0.clone(), 1)];
    let config = dir.join("lbd.toml");
    std::fs::write(&config, plain_config(&dir, "", &backends)).unwrap();
    let lbd = Lbd::start(lab.lb().ns(), &dir);
    let sock = lbd.socket.clone();
    let list = lbctl_json(&sock, &["backend", "list"]);

    let bad = plain_config(&dir, "table_size = 100", &backends);
    std::fs::write(&config, &bad).unwrap();
    let since = now_ms();
    lbd.signal(libc::SIGHUP);
    lbd.wait_event("reload_refused", since);
    let out = lbctl(&sock, &["backend", "set-weight", VIP, &b0, "5"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    for want in [
        format!(
            "config file {}: holds an edit that lbd refused to load (reload at ",
            config.display()
        ),
        "table_size 100 is not prime".to_string(),
        "Fix the edit".to_string(),
    ] {
        assert!(stderr.contains(&want), "{want:?} in {stderr}");
    }
    assert!(
        !stderr.contains("reload rejected"),
        "the reason, bare: {stderr}"
    );
    assert_eq!(std::fs::read_to_string(&config).unwrap(), bad);
    assert_eq!(lbctl_json(&sock, &["backend", "list"]), list);

    // Another edit, not reloaded, that lbd would refuse too.
    let bad = plain_config(&dir, "table_size = 102", &backends);
    std::fs::write(&config, &bad).unwrap();
    let out = lbctl(&sock, &["backend", "drain", VIP, &b0, "--force"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("holds an edit that lbd has not loaded and would refuse to load: ")
            && stderr.contains("table_size 102 is not prime"),
        "{stderr}"
    );
    assert_eq!(std::fs::read_to_string(&config).unwrap(), bad);
    assert_eq!(lbctl_json(&sock, &["backend", "list"]), list);

    // A valid edit not reloaded yet: "apply the edit first", as before.
    std::fs::write(&config, plain_config(&dir, "table_size = 251", &backends)).unwrap();
    let out = lbctl(&sock, &["backend", "drain", VIP, &b0, "--force"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("Apply the edit first"), "{stderr}");
    assert_eq!(lbctl_json(&sock, &["backend", "list"]), list);
}
