//! The balancer must not lie about, or lose, its own datapath (issue 20): `lbd cleanup` under a
//! running lbd, a program detached or unpinned behind lbd's back, the XDP mode lbd reports,
//! and `lbd --check` running every validation lbd itself runs.
use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};
use tests::{
    lab::{Lab, LabSpec, LB_V4, VIP_V4},
    procs::{bin_path, lbctl, now_ms, scratch, xdp_attached, Lbd, LbdOptions, RemoveOnDrop},
    require_root,
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

/// `lbd --config CONFIG ARGS...` in the lab balancer's network namespace (host mounts).
fn lbd_cmd(lab: &Lab, config: &Path, args: &[&str]) -> Output {
    Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", lab.lb().ns().name()))
        .arg(bin_path("lbd"))
        .arg("--config")
        .arg(config)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("running lbd")
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

    let out = lbd_cmd(&lab, &config, &["cleanup"]);
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

    let out = lbd_cmd(&lab, &config, &["cleanup", "--force"]);
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
    let out = lbd_cmd(&lab, &config, &["cleanup"]);
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
    let out = lbd_cmd(&lab, &config, &["cleanup"]);
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
    loop {
        let s = lbd.control().status().expect("lbd answers");
        let faults = s["datapath_faults"].as_array().expect("datapath_faults");
        if faults.iter().any(|f| f.as_str().unwrap().contains(what)) {
            println!("{what:?} reported after {:?}: {faults:?}", t.elapsed());
            return s;
        }
        assert!(
            t.elapsed() < std::time::Duration::from_secs(1),
            "no datapath fault {what:?} within 1 s: {s}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
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
    let out = lbd_cmd(&lab, &config, &["cleanup", "--force"]);
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
    let out = lbd_cmd(&lab, &config, &["--check"]);
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
    let out = lbd_cmd(&lab, &config, &["--check"]);
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
    let out = lbd_cmd(&lab, &config, &["--check"]);
    assert!(out.status.success(), "{out:?}");
    let out = lbd_cmd(&lab, &config, &["cleanup"]);
    assert!(out.status.success(), "{out:?}");
}
