//! The balancer must not lie about, or lose, its own datapath (issue 20): `lbd cleanup` under a
//! running lbd, a program detached or unpinned behind lbd's back, the XDP mode lbd reports,
//! and `lbd --check` running every validation lbd itself runs.
use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};
use tests::{
    lab::{Lab, LabSpec, LB_V4, VIP_V4},
    procs::{bin_path, scratch, xdp_attached, Lbd, LbdOptions, RemoveOnDrop},
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
