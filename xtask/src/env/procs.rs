//! What every lab of the xtask does the same way: build the [`Lab`], run its processes with their
//! output in log files (shown on the terminal too when asked), start `lbd decap` on backends,
//! wait for XDP programs, and write the common part of lbd's config.

use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, IsTerminal, Read, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tests::{Host, Lab, LabSpec, NetNs, LB_V4, LB_V6};

use crate::util::{self, check_interrupted, log_tail};

/// Lines of a log shown when its process failed.
pub const TAIL_LINES: usize = 30;

/// Builds a lab of `backends` backends; with `verbose`, says which namespaces it made.
pub fn open_lab(backends: usize, verbose: bool) -> Result<Lab> {
    let lab = Lab::new(LabSpec { backends })?;
    if verbose {
        eprintln!(
            "lab {}: namespaces {}",
            lab.prefix(),
            lab.namespace_names().join(" ")
        );
    }
    Ok(lab)
}

/// A process of the lab whose stdout and stderr go to a log file.
pub struct Proc {
    /// What it is, e.g. `lbd@lb` (used as the prefix of forwarded lines and in messages).
    pub label: String,
    /// The process.
    pub child: Child,
    /// Its log file.
    pub log: PathBuf,
}

impl Proc {
    /// Spawns `cmd` (built with [`NetNs::command`], or any command entering `ns`) tracked by
    /// `ns`, its stdout and stderr appended to `log`; with `forward`, also printed on our stderr
    /// line by line as `[label] ...`. `RUST_LOG` defaults to `info`.
    pub fn spawn(
        ns: &NetNs,
        cmd: &mut Command,
        label: &str,
        log: &Path,
        forward: bool,
    ) -> Result<Proc> {
        let sets = |cmd: &Command, key: &str| cmd.get_envs().any(|(k, _)| k == key);
        if !sets(cmd, "RUST_LOG") && std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        // Colour only when the lines end up on a terminal.
        let on_terminal = forward && std::io::stderr().is_terminal();
        if !on_terminal && !sets(cmd, "NO_COLOR") {
            cmd.env("NO_COLOR", "1");
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening {}", log.display()))?;
        cmd.stdin(Stdio::null());
        if forward {
            cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        } else {
            cmd.stdout(file.try_clone()?).stderr(file.try_clone()?);
        }
        let mut child = ns
            .spawn_command(cmd)
            .with_context(|| format!("starting `{}`", util::show(cmd)))?;
        if forward {
            let file = Arc::new(Mutex::new(file));
            tee_lines(child.stdout.take().unwrap(), label, file.clone());
            tee_lines(child.stderr.take().unwrap(), label, file);
        }
        Ok(Proc {
            label: label.to_owned(),
            child,
            log: log.to_owned(),
        })
    }

    /// Fails, with the tail of its log, if the process has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited ({status}); last lines of {}:\n{}",
                self.label,
                self.log.display(),
                log_tail(&self.log, TAIL_LINES)
            );
        }
        Ok(())
    }
}

/// Fails, with the tail of its log, if any of `procs` has exited.
pub fn check_all_alive<'a>(procs: impl IntoIterator<Item = &'a mut Proc>) -> Result<()> {
    procs.into_iter().try_for_each(Proc::check_alive)
}

/// Copies `r`'s lines to `file` and to our stderr as `[label] ...`.
fn tee_lines(r: impl Read + Send + 'static, label: &str, file: Arc<Mutex<File>>) {
    let prefix = format!("[{label}]");
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(l) = line else { break };
            let _ = writeln!(file.lock().unwrap(), "{l}");
            eprintln!("{prefix} {l}");
        }
    });
}

/// Starts `lbd decap` on `host`'s eth0 for `vips` (with `--xdp-mode` if given), logging to
/// `dir/decap-<host>.log`.
pub fn start_decap(
    host: &Host,
    lbd: &Path,
    vips: &[IpAddr],
    xdp_mode: Option<&str>,
    dir: &Path,
    forward: bool,
) -> Result<Proc> {
    let name = host.role().name();
    let mut cmd = host.ns().command(lbd);
    cmd.args(["decap", "--interface", "eth0"]);
    for vip in vips {
        cmd.arg("--vip").arg(vip.to_string());
    }
    if let Some(mode) = xdp_mode {
        cmd.args(["--xdp-mode", mode]);
    }
    let log = dir.join(format!("decap-{name}.log"));
    Proc::spawn(host.ns(), &mut cmd, &format!("decap@{name}"), &log, forward)
        .context("starting lbd decap")
}

/// Waits until every host's eth0 has an XDP program attached, failing (with the tail of its
/// log) as soon as one of `procs` exits, or after `limit`.
pub fn wait_xdp(hosts: &[&Host], procs: &mut [Proc], limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    for h in hosts {
        loop {
            let link = h.ns().ip(["link", "show", "dev", "eth0"])?;
            if link.contains("xdp") {
                break;
            }
            check_all_alive(procs.iter_mut())?;
            check_interrupted()?;
            if Instant::now() > deadline {
                let mut logs = String::new();
                for p in procs.iter() {
                    let _ = write!(
                        logs,
                        "\nlast lines of {}:\n{}",
                        p.log.display(),
                        log_tail(&p.log, 10)
                    );
                }
                bail!(
                    "no XDP program on {}'s eth0 after {} s:\n{link}{logs}",
                    h.role().name(),
                    limit.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    Ok(())
}

/// The head of an lbd config for a lab: interface eth0, `xdp_mode`, `pin_dir` ("" pins
/// nothing), the control socket if given, and the lb's own addresses as encapsulation sources.
/// `comment` is the first line (after `# `).
pub fn lbd_config_head(
    comment: &str,
    xdp_mode: &str,
    pin_dir: &str,
    control_socket: Option<&Path>,
) -> String {
    let mut s = format!(
        "# {comment}\n\
         interface = \"eth0\"\n\
         xdp_mode = \"{xdp_mode}\"\n\
         pin_dir = \"{pin_dir}\"\n"
    );
    if let Some(sock) = control_socket {
        let _ = writeln!(s, "control_socket = \"{}\"", sock.display());
    }
    let _ = write!(
        s,
        "\n[encap]\nsource_v4 = \"{LB_V4}\"\nsource_v6 = \"{LB_V6}\"\n"
    );
    s
}

/// A `[[vip.backend]]` section.
pub fn lbd_config_backend(s: &mut String, address: IpAddr, weight: u32) {
    let _ = write!(
        s,
        "\n[[vip.backend]]\naddress = \"{address}\"\nweight = {weight}\n"
    );
}
