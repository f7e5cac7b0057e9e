//! The bench's lab: three lb-workpool backends behind `lbd decap`, lbd on the balancer with a
//! control socket and pins of its own, and lbctl to talk to it.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;
use tests::{backend_v4, Host, Lab, VIP_V4};

use super::{
    Weights, FALL, LATENCY_TARGET_MS, LEARN_INTERVAL_MS, PROBE_INTERVAL_MS, PROBE_PORT,
    PROBE_TIMEOUT_MS, QUEUE, RISE, SERVICE_MS, TABLE_SIZE, VIP_PORT, WORKERS,
};
use crate::env::procs::{
    lbd_config_backend, lbd_config_head, open_lab, start_decap, wait_xdp, Proc, TAIL_LINES,
};
use crate::util::{self, check_interrupted, log_tail, TempDir};

/// The binaries the bench runs.
pub(super) struct Bins {
    pub(super) lbd: PathBuf,
    pub(super) lbctl: PathBuf,
    pub(super) workpool: PathBuf,
    pub(super) loadgen: PathBuf,
}

pub(super) fn build() -> Result<Bins> {
    util::run(util::cargo().args([
        "build",
        "--release",
        "-p",
        "lb-userspace",
        "--bin",
        "lbd",
        "--bin",
        "lbctl",
        "-p",
        "tests",
        "--bin",
        "lb-workpool",
        "--bin",
        "lb-loadgen",
    ]))
    .context("building lbd, lbctl, lb-workpool and lb-loadgen")?;
    let dir = util::target_dir().join("release");
    let bins = Bins {
        lbd: dir.join("lbd"),
        lbctl: dir.join("lbctl"),
        workpool: dir.join("lb-workpool"),
        loadgen: dir.join("lb-loadgen"),
    };
    for p in [&bins.lbd, &bins.lbctl, &bins.workpool, &bins.loadgen] {
        if !p.exists() {
            bail!("{} was not produced by the build", p.display());
        }
    }
    Ok(bins)
}

/// The lab, the servers, the decapsulators and lbd.
pub(super) struct Bench {
    pub(super) lab: Option<Lab>,
    pub(super) tmp: TempDir,
    pub(super) bins: Bins,
    pub(super) pin_dir: PathBuf,
    pub(super) servers: Vec<Child>,
    pub(super) decaps: Vec<Proc>,
    pub(super) lbd: Option<Proc>,
    pub(super) config: PathBuf,
    pub(super) socket: PathBuf,
    /// How often the tracer asks lbd (`backend list` and `model show`).
    pub(super) trace_every: Duration,
}

impl Bench {
    pub(super) fn new(bins: Bins) -> Result<Self> {
        let tmp = TempDir::new("adaptive")?;
        let lab = open_lab(WORKERS.len(), true)?;
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/lb-bench-{}", std::process::id()));
        let mut b = Bench {
            config: tmp.path().join("lbd.toml"),
            socket: tmp.path().join("lbd.sock"),
            lab: Some(lab),
            tmp,
            bins,
            pin_dir,
            servers: Vec::new(),
            decaps: Vec::new(),
            lbd: None,
            trace_every: Duration::from_millis(200),
        };
        // The whole ephemeral range for the client: one client opening hundreds of
        // connections a second reuses its source ports sooner than real client populations.
        b.lab()
            .client()
            .ns()
            .exec_ok("sysctl", ["-qw", "net.ipv4.ip_local_port_range=1024 65535"])?;
        b.start_servers()?;
        b.start_decaps()?;
        Ok(b)
    }

    pub(super) fn lab(&self) -> &Lab {
        self.lab.as_ref().expect("lab is up")
    }

    pub(super) fn control_file(&self, i: usize) -> PathBuf {
        self.tmp.path().join(format!("workpool-{i}.ctl"))
    }

    /// Sets backend `i`'s fault controls (`slow`, `error_rate`, `refuse`).
    pub(super) fn control(&self, i: usize, settings: &str) -> Result<()> {
        let path = self.control_file(i);
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, settings.replace(' ', "\n") + "\n")?;
        std::fs::rename(&tmp, &path)?;
        Ok(())
    }

    pub(super) fn start_servers(&mut self) -> Result<()> {
        for (i, &workers) in WORKERS.iter().enumerate() {
            self.control(i, "slow=1 error_rate=0 refuse=0")?;
            let ns = self.lab().backend(i).ns();
            let mut cmd = ns.command(&self.bins.workpool);
            cmd.arg("--listen")
                .arg(SocketAddr::new(IpAddr::from(VIP_V4), VIP_PORT).to_string())
                .arg("--listen")
                .arg(SocketAddr::new(IpAddr::from(backend_v4(i)), PROBE_PORT).to_string())
                .args(["--workers", &workers.to_string()])
                .args(["--service-ms", &SERVICE_MS.to_string()])
                .args(["--queue", &QUEUE.to_string()])
                .args(["--name", &format!("backend{i}")])
                .arg("--control")
                .arg(self.control_file(i))
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit());
            let mut child = ns.spawn_command(&mut cmd).context("starting lb-workpool")?;
            let mut out = child.stdout.take().unwrap();
            let mut line = [0u8; 6];
            std::io::Read::read_exact(&mut out, &mut line)
                .context("waiting for lb-workpool's `ready`")?;
            if &line != b"ready\n" {
                bail!("lb-workpool said {:?}", String::from_utf8_lossy(&line));
            }
            // Keep the pipe open (its exit report goes there).
            std::mem::forget(out);
            self.servers.push(child);
        }
        Ok(())
    }

    pub(super) fn start_decaps(&mut self) -> Result<()> {
        let lab = self.lab.as_ref().unwrap();
        let vips = [IpAddr::from(VIP_V4)];
        for b in lab.backends() {
            let decap = start_decap(b, &self.bins.lbd, &vips, None, self.tmp.path(), false)?;
            self.decaps.push(decap);
        }
        let hosts: Vec<&Host> = lab.backends().iter().collect();
        wait_xdp(&hosts, &mut self.decaps, Duration::from_secs(20))
    }

    pub(super) fn write_config(&self, weights: Weights) -> Result<()> {
        let w: [u32; 3] = match weights {
            Weights::Oracle => [1, 1, 3],
            _ => [1, 1, 1],
        };
        let mut s = lbd_config_head(
            &format!("cargo xtask bench adaptive: {}", weights.name()),
            "native",
            &self.pin_dir.to_string_lossy(),
            Some(&self.socket),
        );
        let _ = write!(
            s,
            "\n[[vip]]\naddress = \"{VIP_V4}\"\nport = {VIP_PORT}\nprotocol = \"tcp\"\ntable_size = {TABLE_SIZE}\n\
             [vip.health]\nkind = \"http\"\ninterval_ms = {PROBE_INTERVAL_MS}\ntimeout_ms = {PROBE_TIMEOUT_MS}\n\
             rise = {RISE}\nfall = {FALL}\nport = {PROBE_PORT}\npath = \"/health\"\n"
        );
        if weights == Weights::Learned {
            let _ = write!(
                s,
                "[vip.learning]\nenabled = true\ninterval_ms = {LEARN_INTERVAL_MS}\n\
                 latency_target_ms = {LATENCY_TARGET_MS}\n"
            );
        }
        for (i, &w) in w.iter().enumerate() {
            lbd_config_backend(&mut s, backend_v4(i).into(), w);
        }
        std::fs::write(&self.config, s)?;
        Ok(())
    }

    pub(super) fn log_path(&self) -> PathBuf {
        self.tmp.path().join("lbd.log")
    }

    /// Starts lbd (appending to its log) and waits until it answers.
    pub(super) fn start_lbd(&mut self) -> Result<()> {
        let ns = self.lab().lb().ns();
        // `nsenter --net`, not `ip netns exec`: the latter gives the program a mount namespace
        // of its own with a fresh /sys, so its pins would vanish with it and a restart could
        // not take the datapath over.
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", ns.path().display()))
            .arg(&self.bins.lbd)
            .arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1");
        let lbd = Proc::spawn(ns, &mut cmd, "lbd", &self.log_path(), false)?;
        self.lbd = Some(lbd);
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            if self.lbctl(&["status"])?.status.success() {
                return Ok(());
            }
            self.lbd.as_mut().unwrap().check_alive()?;
            if Instant::now() > end {
                bail!(
                    "lbd did not answer within 30 s; last lines of its log:\n{}",
                    log_tail(&self.log_path(), TAIL_LINES)
                );
            }
            check_interrupted()?;
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGTERM: lbd leaves the datapath running from its pins.
    pub(super) fn stop_lbd(&mut self) -> Result<()> {
        if let Some(mut p) = self.lbd.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(p.child.id() as i32, libc::SIGTERM) };
            p.child.wait()?;
        }
        Ok(())
    }

    /// Stops lbd and removes its pins: the next run starts from nothing.
    pub(super) fn reset(&mut self) -> Result<()> {
        self.stop_lbd()?;
        if self.config.exists() {
            let out = Command::new(&self.bins.lbd)
                .arg("--config")
                .arg(&self.config)
                .arg("cleanup")
                .output()?;
            if !out.status.success() {
                bail!(
                    "lbd cleanup: {}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        for i in 0..WORKERS.len() {
            self.control(i, "slow=1 error_rate=0 refuse=0")?;
            let _ = self.lab().backend(i).ns().exec("nft", ["flush", "ruleset"]);
        }
        let _ = std::fs::remove_file(self.log_path());
        // Queues drain.
        std::thread::sleep(Duration::from_secs(1));
        Ok(())
    }

    pub(super) fn lbctl(&self, args: &[&str]) -> Result<Output> {
        Command::new(&self.bins.lbctl)
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .context("running lbctl")
    }

    pub(super) fn lbctl_json(&self, args: &[&str]) -> Result<Value> {
        let mut all = args.to_vec();
        all.push("--json");
        let out = self.lbctl(&all)?;
        if !out.status.success() {
            bail!(
                "lbctl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        serde_json::from_slice(&out.stdout).context("lbctl JSON")
    }

    pub(super) fn lbd_pid(&self) -> Option<u32> {
        self.lbd.as_ref().map(|p| p.child.id())
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        let _ = self.reset();
        let decaps = self.decaps.iter_mut().map(|p| &mut p.child);
        for c in self.servers.iter_mut().chain(decaps) {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(lab) = self.lab.take() {
            if let Err(e) = lab.shutdown() {
                eprintln!("warning: lab teardown: {e:#}");
            }
        }
        let _ = std::fs::remove_dir_all(&self.pin_dir);
    }
}

pub(super) fn vip() -> String {
    format!("{VIP_V4}:{VIP_PORT}/tcp")
}

pub(super) fn lbctl_ok(b: &Bench, args: &[&str]) -> Result<()> {
    let out = b.lbctl(args)?;
    if !out.status.success() {
        bail!(
            "lbctl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}
