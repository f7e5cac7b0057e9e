//! The lab environment shared by `xtask lab` and `xtask bench lab`: a [`Lab`] with nginx on
//! every backend, and optionally lbd (balancer on the lb, `lbd decap` on the backends).

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, IsTerminal, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tests::{Host, Lab, LabSpec, NetNs, LB_V4, LB_V6, VIP_V4, VIP_V6};

use crate::util::{self, check_interrupted, TempDir};
use crate::LbOpts;

/// Port nginx listens on, and the VIPs' port.
pub const HTTP_PORT: u16 = 80;

/// Builds `lbd` in release mode and returns its path.
pub fn build_lbd() -> Result<PathBuf> {
    util::run(util::cargo().args(["build", "--release", "-p", "lb-userspace", "--bin", "lbd"]))
        .context("building lbd")?;
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

/// A running lab: namespaces, nginx per backend, and lbd once [`LabEnv::start_lbd`] ran.
/// [`LabEnv::shutdown`] (or drop) kills everything and deletes the namespaces.
pub struct LabEnv {
    lab: Option<Lab>,
    tmp: TempDir,
    nginx: Vec<Child>,
    lbd: Vec<(String, Child)>,
}

impl LabEnv {
    /// Builds the lab and starts nginx on every backend, answering `backend<i>\n` on the VIPs
    /// and the backend's own addresses (IPv4 and IPv6, port 80).
    pub fn new(backends: usize) -> Result<Self> {
        let tmp = TempDir::new("lab")?;
        let lab = Lab::new(LabSpec { backends })?;
        eprintln!(
            "lab {}: namespaces {}",
            lab.prefix(),
            lab.namespace_names().join(" ")
        );
        let mut env = Self {
            lab: Some(lab),
            tmp,
            nginx: Vec::new(),
            lbd: Vec::new(),
        };
        env.start_nginx()?;
        Ok(env)
    }

    /// The lab.
    pub fn lab(&self) -> &Lab {
        self.lab.as_ref().expect("lab is up")
    }

    /// The scratch directory (configs, logs).
    pub fn dir(&self) -> &Path {
        self.tmp.path()
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
            std::fs::write(&conf, nginx_conf(&dir, &backend_name(i), &listen))?;
            let mut cmd = b.ns().command("nginx");
            cmd.arg("-e")
                .arg(dir.join("error.log"))
                .arg("-p")
                .arg(&dir)
                .arg("-c")
                .arg(&conf)
                .stdin(Stdio::null())
                .stdout(Stdio::null());
            let child = b.ns().spawn_command(&mut cmd).context("starting nginx")?;
            self.nginx.push(child);
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
                            if let Some(status) = self.nginx[i].try_wait()? {
                                bail!(
                                    "nginx on {} exited ({status}): {}",
                                    b.ns_name(),
                                    read_log(&self.tmp.path().join(format!("nginx-{i}/error.log")))
                                );
                            }
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
        eprintln!(
            "nginx answering on {} backends (VIPs and own addresses, IPv4 and IPv6, port {HTTP_PORT})",
            lab.backends().len()
        );
        Ok(())
    }

    /// Writes lbd's config (one VIP per family, every backend with its weight), starts
    /// `lbd decap` on every backend and `lbd --config` on the lb (their output shown with a
    /// prefix), and waits until every eth0 has an XDP program attached.
    pub fn start_lbd(&mut self, bin: &Path, opts: &LbOpts, weights: &[u32]) -> Result<()> {
        let lab = self.lab.as_ref().unwrap();
        assert_eq!(
            weights.len(),
            lab.backends().len(),
            "one weight per backend"
        );
        let config = self.tmp.path().join("lbd.toml");
        std::fs::write(&config, lbd_config(lab, opts, weights))?;
        eprintln!(
            "lbd config {}:\n{}",
            config.display(),
            std::fs::read_to_string(&config)?
        );
        for b in lab.backends() {
            let label = format!("decap@{}", b.role().name());
            let mut cmd = b.ns().command(bin);
            cmd.args(["decap", "--interface", "eth0", "--vip"])
                .arg(VIP_V4.to_string())
                .arg("--vip")
                .arg(VIP_V6.to_string())
                .args(["--xdp-mode", opts.xdp_mode.config_value()]);
            let child = spawn_prefixed(b.ns(), &mut cmd, &label)?;
            self.lbd.push((label, child));
        }
        let mut cmd = lab.lb().ns().command(bin);
        cmd.arg("--config").arg(&config);
        let child = spawn_prefixed(lab.lb().ns(), &mut cmd, "lbd@lb")?;
        self.lbd.push(("lbd@lb".into(), child));

        let deadline = Instant::now() + Duration::from_secs(30);
        let hosts: Vec<&Host> = std::iter::once(lab.lb()).chain(lab.backends()).collect();
        for h in hosts {
            loop {
                let link = h.ns().ip(["link", "show", "dev", "eth0"])?;
                if link.contains("xdp") {
                    break;
                }
                check_alive(&mut self.lbd)?;
                check_interrupted()?;
                if Instant::now() > deadline {
                    bail!(
                        "no XDP program on {}'s eth0 after 30 s:\n{link}",
                        h.role().name()
                    );
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        let lb_link = lab.lb().ns().ip(["link", "show", "dev", "eth0"])?;
        let prog = lb_link
            .lines()
            .find(|l| l.contains("prog/xdp"))
            .map(str::trim)
            .unwrap_or("");
        eprintln!("XDP attached on the lb's and every backend's eth0 ({prog})");
        Ok(())
    }

    /// Fails if any lbd process has exited.
    pub fn check_lbd_alive(&mut self) -> Result<()> {
        check_alive(&mut self.lbd)
    }

    /// Kills everything, deletes the namespaces and checks nothing is left behind.
    pub fn shutdown(mut self) -> Result<()> {
        let result = self.lab.take().map(Lab::shutdown).unwrap_or(Ok(()));
        self.reap();
        result
    }

    fn reap(&mut self) {
        for child in self
            .nginx
            .iter_mut()
            .chain(self.lbd.iter_mut().map(|(_, c)| c))
        {
            let _ = child.wait();
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

fn check_alive(procs: &mut [(String, Child)]) -> Result<()> {
    for (label, child) in procs {
        if let Some(status) = child.try_wait()? {
            bail!("{label} exited ({status})");
        }
    }
    Ok(())
}

/// Spawns `cmd` (built with [`NetNs::command`]) tracked by `ns`, with its stdout and stderr
/// printed line by line as `[label] ...`.
fn spawn_prefixed(ns: &NetNs, cmd: &mut std::process::Command, label: &str) -> Result<Child> {
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", "info");
    }
    // Its output goes through a pipe to our stderr: colour only if that is a terminal.
    if !std::io::stderr().is_terminal() {
        cmd.env("NO_COLOR", "1");
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = ns
        .spawn_command(cmd)
        .with_context(|| format!("starting `{}`", util::show(cmd)))?;
    let out = child.stdout.take().unwrap();
    let err = child.stderr.take().unwrap();
    forward_lines(out, label);
    forward_lines(err, label);
    Ok(child)
}

fn forward_lines(r: impl Read + Send + 'static, label: &str) {
    let prefix = format!("[{label}]");
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            match line {
                Ok(l) => eprintln!("{prefix} {l}"),
                Err(_) => break,
            }
        }
    });
}

fn read_log(path: &Path) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|e| format!("(no log at {}: {e})", path.display()))
}

fn nginx_conf(dir: &Path, name: &str, listen: &[SocketAddr]) -> String {
    let d = dir.display();
    let mut listens = String::new();
    for a in listen {
        let _ = writeln!(listens, "        listen {a};");
    }
    format!(
        r#"# nginx for lab backend {name} (generated by cargo xtask)
worker_processes 1;
daemon off;
master_process on;
pid {d}/nginx.pid;
error_log {d}/error.log warn;

events {{
    worker_connections 4096;
}}

http {{
    access_log off;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    # Keep-alive benchmarks should measure requests, not reconnections.
    keepalive_requests 1000000;
    keepalive_timeout 65s;

    server {{
{listens}        default_type text/plain;
        location / {{
            return 200 "{name}\n";
        }}
        # Request counters, read by the benchmark to show how load was split.
        location = /status {{
            stub_status;
        }}
    }}
}}
"#
    )
}

/// lbd's TOML config for this lab: one VIP per family on port 80/tcp, every backend with its
/// weight, encapsulation sources = the lb's own addresses.
pub fn lbd_config(lab: &Lab, opts: &LbOpts, weights: &[u32]) -> String {
    let mut s = format!(
        "# lbd config for lab {} (generated by cargo xtask)\n\
         interface = \"eth0\"\n\
         xdp_mode = \"{}\"\n\
         # A demo leaves nothing behind: no pinned maps or link outliving lbd.\n\
         pin_dir = \"\"\n\
         \n\
         [encap]\n\
         source_v4 = \"{LB_V4}\"\n\
         source_v6 = \"{LB_V6}\"\n",
        lab.prefix(),
        opts.xdp_mode.config_value(),
    );
    for vip in [IpAddr::from(VIP_V4), IpAddr::from(VIP_V6)] {
        let _ = write!(
            s,
            "\n[[vip]]\n\
             address = \"{vip}\"\n\
             port = {HTTP_PORT}\n\
             protocol = \"tcp\"\n\
             forwarding = \"{}\"\n",
            opts.mode.config_value()
        );
        for (b, w) in lab.backends().iter().zip(weights) {
            let _ = write!(
                s,
                "\n[[vip.backend]]\naddress = \"{}\"\nweight = {w}\n",
                b.addr_like(vip)
            );
        }
    }
    s
}

/// One HTTP/1.1 GET (`Connection: close`) to `addr`; returns the response body's first line
/// (nginx answers `/` with the backend's name). Call it on a thread inside the client namespace.
pub fn http_get(addr: SocketAddr, timeout: Duration) -> std::io::Result<String> {
    let body = http_get_path(addr, "/", timeout)?;
    Ok(body.lines().next().unwrap_or("").trim().to_owned())
}

/// One HTTP/1.1 GET of `path` (`Connection: close`) to `addr`; returns the body of a 200.
pub fn http_get_path(addr: SocketAddr, path: &str, timeout: Duration) -> std::io::Result<String> {
    use std::io::{Error, ErrorKind};
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: lab\r\nConnection: close\r\n\r\n").as_bytes(),
    )?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)?;
    let resp = String::from_utf8_lossy(&resp);
    let (head, body) = resp
        .split_once("\r\n\r\n")
        .ok_or_else(|| Error::new(ErrorKind::InvalidData, "truncated HTTP response"))?;
    let status = head.lines().next().unwrap_or("");
    if !status.starts_with("HTTP/1.1 200") {
        return Err(Error::other(format!("HTTP status {status:?}")));
    }
    Ok(body.to_owned())
}

/// Requests each backend's nginx has handled so far (from its `stub_status` page, fetched
/// from the client namespace via the backend's own IPv4 address).
pub fn nginx_requests(lab: &Lab) -> Result<Vec<u64>> {
    lab.client().ns().run_in(|| {
        lab.backends()
            .iter()
            .map(|b| {
                let addr = SocketAddr::new(b.v4().into(), HTTP_PORT);
                let body = http_get_path(addr, "/status", Duration::from_secs(2))
                    .with_context(|| format!("nginx status from {addr}"))?;
                // "Active connections: N\nserver accepts handled requests\n A H R\n..."
                body.lines()
                    .nth(2)
                    .and_then(|l| l.split_whitespace().nth(2))
                    .and_then(|n| n.parse().ok())
                    .with_context(|| format!("unexpected nginx status from {addr}: {body:?}"))
            })
            .collect()
    })
}
