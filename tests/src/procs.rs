//! Running the shipped binaries (`lbd`, `lbctl`) in a lab, shared by the end-to-end tests.
use crate::{lab::Lab, netns::NetNs};
use std::{
    path::PathBuf,
    process::Child,
    time::{Duration, Instant},
};

/// `target/<profile>/<name>`: the binaries `cargo build --workspace` (run by `cargo xtask
/// test`) puts beside the test binaries.
pub fn bin_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target/<profile>");
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is missing: build it first (`cargo build -p lb-userspace`, which `cargo xtask test` does)",
        p.display()
    );
    p
}

/// Polls `f` every 100 ms until it holds; panics naming `what` after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Sends `sig` to a child process.
pub fn signal(child: &Child, sig: i32) {
    // SAFETY: signalling our own child process.
    assert_eq!(
        unsafe { libc::kill(child.id() as i32, sig) },
        0,
        "kill({sig})"
    );
}

/// Whether `eth0` in `ns` has an XDP program attached.
pub fn xdp_attached(ns: &NetNs) -> bool {
    ns.ip(["link", "show", "dev", "eth0"])
        .map(|s| s.contains("xdp"))
        .unwrap_or(false)
}

/// Starts `lbd decap` for the IPv4 VIP on backends `0..n` and waits until each has attached.
/// The processes are tracked by the backends' namespace guards (killed when the lab drops).
pub fn start_decaps(lab: &Lab, n: usize) -> Vec<Child> {
    let lbd = bin_path("lbd");
    let vip = crate::lab::VIP_V4.to_string();
    let out: Vec<Child> = (0..n)
        .map(|i| {
            lab.backend(i).ns().spawn(
                lbd.to_str().unwrap(),
                [
                    "decap",
                    "--interface",
                    "eth0",
                    "--vip",
                    &vip,
                    "--xdp-mode",
                    "native",
                ],
            )
        })
        .collect();
    for i in 0..n {
        wait_for("lbd decap to attach", Duration::from_secs(20), || {
            xdp_attached(lab.backend(i).ns())
        });
    }
    out
}

/// Removes a test's scratch directory when dropped, so it goes on success, failure and panic.
pub struct RemoveOnDrop(pub PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
