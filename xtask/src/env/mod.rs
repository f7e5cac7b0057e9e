//! The labs of the xtask, in one place.
//!
//! * [`procs`]: what every lab does the same way (build the [`Lab`], run its processes with
//!   their output in log files, start `lbd decap`, wait for XDP, lbd's config head); used by
//!   [`LabEnv`] and by `bench adaptive`'s lab.
//! * [`LabEnv`]: the nginx lab of `xtask lab` and `xtask bench lab`: nginx on every backend,
//!   and optionally lbd (balancer on the lb, `lbd decap` on the backends).
//! * [`http`]: nginx's config, HTTP GETs from the client, nginx's request counters.

pub mod http;
pub mod procs;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tests::{Host, Lab, VIP_V4, VIP_V6};

pub use http::{http_get, nginx_requests};
pub use procs::Proc;
use procs::{check_all_alive, lbd_config_backend, lbd_config_head, open_lab, start_decap};

use crate::util::{self, check_interrupted, TempDir};
use crate::LbOpts;

/// Port nginx listens on, and the VIPs' port.
pub const HTTP_PORT: u16 = 80;

/// Builds `lbd` in release mode and returns its path. `quiet`: cargo says nothing but errors
/// and warnings.
pub fn build_lbd(quiet: bool) -> Result<PathBuf> {
    let mut cmd = util::cargo();
    cmd.args(["build", "--release", "-p", "lb-userspace", "--bin", "lbd"]);
    if quiet {
        cmd.arg("--quiet");
    }
    util::run(&mut cmd).context("building lbd")?;
    let bin = util::target_dir().join("release/lbd");
    if !bin.exists() {
        bail!("{} was not produced by the build", bin.display());
    }
    Ok(bin)
}

/// The name nginx on backend `i` answers with (the response body, one line).
pub fn backend_name(i: usize) -> String {
    format!("backend{i}")
}

/// The two VIPs (IPv4, IPv6).
pub fn vips() -> [IpAddr; 2] {
    [IpAddr::from(VIP_V4), IpAddr::from(VIP_V6)]
}

/// A running lab: namespaces, nginx per backend, and lbd once [`LabEnv::start_lbd`] ran.
/// [`LabEnv::shutdown`] (or drop) kills everything and deletes the namespaces.
///
/// Every process logs to a file in the scratch directory ([`LabEnv::dir`]): nginx to
/// `nginx-<i>/error.log`, lbd to `lbd.log`, `lbd decap` to `decap-backend<i>.log`. With
/// `verbose`, their output is also printed with a `[label]` prefix, and so is every step.
pub struct LabEnv {
    lab: Option<Lab>,
    tmp: TempDir,
    verbose: bool,
    nginx: Vec<Proc>,
    lbd: Vec<Proc>,
    xdp_prog: String,
}

impl LabEnv {
    /// Builds the lab in the scratch directory `tmp` and starts nginx on every backend,
    /// answering `backend<i>\n` on the VIPs and the backend's own addresses (IPv4 and IPv6,
    /// port 80).
    pub fn new(backends: usize, tmp: TempDir, verbose: bool) -> Result<Self> {
        let lab = open_lab(backends, verbose)?;
        let mut env = Self {
            lab: Some(lab),
            tmp,
            verbose,
            nginx: Vec::new(),
            lbd: Vec::new(),
            xdp_prog: String::new(),
        };
        env.start_nginx()?;
        Ok(env)
    }

    /// The lab.
    pub fn lab(&self) -> &Lab {
        self.lab.as_ref().expect("lab is up")
    }

    /// The lab, to change its switch ([`Lab::switch_lb_frames_in_xdp`]).
    pub fn lab_mut(&mut self) -> &mut Lab {
        self.lab.as_mut().expect("lab is up")
    }

    /// The scratch directory (configs, logs).
    pub fn dir(&self) -> &Path {
        self.tmp.path()
    }

    /// lbd's log file (once [`LabEnv::start_lbd`] ran).
    pub fn lbd_log(&self) -> PathBuf {
        self.dir().join("lbd.log")
    }

    /// The lb's XDP program as `ip link` shows it (once [`LabEnv::start_lbd`] ran).
    pub fn xdp_prog(&self) -> &str {
        &self.xdp_prog
    }

    fn start_nginx(&mut self) -> Result<()> {
        let lab = self.lab.as_ref().unwrap();
        for (i, b) in lab.backends().iter().enumerate() {
            let dir = self.tmp.path().join(format!("nginx-{i}"));
            std::fs::create_dir_all(&dir)?;
            let listen = [
                SocketAddr::new(VIP_V4.into(), HTTP_PORT),
                SocketAddr::new(VIP_V6.into(), HTTP_PORT),
                SocketAddr::new(b.v4().into(), HTTP_PORT),
                SocketAddr::new(b.v6().into(), HTTP_PORT),
            ];
            let conf = dir.join("nginx.conf");
            std::fs::write(&conf, http::nginx_conf(&dir, &backend_name(i), &listen))?;
            let log = dir.join("error.log");
            let mut cmd = b.ns().command("nginx");
            cmd.arg("-e")
                .arg(&log)
                .arg("-p")
                .arg(&dir)
                .arg("-c")
                .arg(&conf);
            let label = format!("nginx@{}", b.role().name());
            let proc = Proc::spawn(b.ns(), &mut cmd, &label, &log, self.verbose)
                .context("starting nginx")?;
            self.nginx.push(proc);
        }
        // Ready when each answers on its own addresses, straight from the client.
        let deadline = Instant::now() + Duration::from_secs(10);
        for (i, b) in lab.backends().iter().enumerate() {
            for addr in b.sockaddrs(HTTP_PORT) {
                loop {
                    let got = lab
                        .client()
                        .ns()
                        .run_in(|| http_get(addr, Duration::from_secs(1)));
                    match got {
                        Ok(name) if name == backend_name(i) => break,
                        Ok(other) => bail!("{addr} answered {other:?}, not {}", backend_name(i)),
                        Err(e) => {
                            self.nginx[i].check_alive()?;
                            if Instant::now() > deadline {
                                bail!("nginx on {addr} not answering: {e}");
                            }
                            check_interrupted()?;
                            std::thread::sleep(Duration::from_millis(50));
                        }
                    }
                }
            }
        }
        if self.verbose {
            eprintln!(
                "nginx answering on {} backends (VIPs and own addresses, IPv4 and IPv6, port {HTTP_PORT})",
                lab.backends().len()
            );
        }
        Ok(())
    }

    /// Writes lbd's config (one VIP per family, every backend with its weight), starts
    /// `lbd decap` on every backend and `lbd --config` on the lb (logging to files, and to the
    /// terminal with a prefix if verbose), and waits until every eth0 has an XDP program.
    pub fn start_lbd(&mut self, bin: &Path, opts: &LbOpts, weights: &[u32]) -> Result<()> {
        let lab = self.lab.as_ref().unwrap();
        assert_eq!(
            weights.len(),
            lab.backends().len(),
            "one weight per backend"
        );
        let config = self.tmp.path().join("lbd.toml");
        std::fs::write(&config, lbd_config(lab, opts, weights))?;
        if self.verbose {
            eprintln!(
                "lbd config {}:\n{}",
                config.display(),
                std::fs::read_to_string(&config)?
            );
        }
        for b in lab.backends() {
            let mode = Some(opts.xdp_mode.config_value());
            let decap = start_decap(b, bin, &vips(), mode, self.tmp.path(), self.verbose)?;
            self.lbd.push(decap);
        }
        let mut cmd = lab.lb().ns().command(bin);
        cmd.arg("--config").arg(&config);
        let log = self.lbd_log();
        let lbd = Proc::spawn(lab.lb().ns(), &mut cmd, "lbd@lb", &log, self.verbose)?;
        self.lbd.push(lbd);

        let hosts: Vec<&Host> = std::iter::once(lab.lb()).chain(lab.backends()).collect();
        procs::wait_xdp(&hosts, &mut self.lbd, Duration::from_secs(30))?;
        let lb_link = lab.lb().ns().ip(["link", "show", "dev", "eth0"])?;
        self.xdp_prog = lb_link
            .lines()
            .find(|l| l.contains("prog/xdp"))
            .map(str::trim)
            .unwrap_or("")
            .to_owned();
        if self.verbose {
            eprintln!(
                "XDP attached on the lb's and every backend's eth0 ({})",
                self.xdp_prog
            );
        }
        Ok(())
    }

    /// Fails, with the tail of its log, if any lbd process has exited.
    pub fn check_lbd_alive(&mut self) -> Result<()> {
        check_all_alive(&mut self.lbd)
    }

    /// Kills everything, deletes the namespaces and checks nothing is left behind.
    pub fn shutdown(mut self) -> Result<()> {
        let result = self.lab.take().map(Lab::shutdown).unwrap_or(Ok(()));
        self.reap();
        result
    }

    fn reap(&mut self) {
        for p in self.nginx.iter_mut().chain(self.lbd.iter_mut()) {
            let _ = p.child.wait();
        }
    }
}

impl Drop for LabEnv {
    fn drop(&mut self) {
        if let Some(lab) = self.lab.take() {
            drop(lab);
            self.reap();
        }
    }
}

/// lbd's TOML config for this lab: one VIP per family on port 80/tcp, every backend with its
/// weight, encapsulation sources = the lb's own addresses, nothing pinned.
pub fn lbd_config(lab: &Lab, opts: &LbOpts, weights: &[u32]) -> String {
    // A demo leaves nothing behind: no pinned maps or link outliving lbd.
    let mut s = lbd_config_head(
        &format!(
            "lbd config for lab {} (generated by cargo xtask)",
            lab.prefix()
        ),
        opts.xdp_mode.config_value(),
        "",
        None,
    );
    for vip in vips() {
        s += &format!(
            "\n[[vip]]\n\
             address = \"{vip}\"\n\
             port = {HTTP_PORT}\n\
             protocol = \"tcp\"\n\
             forwarding = \"{}\"\n",
            opts.mode.config_value()
        );
        for (b, &w) in lab.backends().iter().zip(weights) {
            lbd_config_backend(&mut s, b.addr_like(vip), w);
        }
    }
    s
}
