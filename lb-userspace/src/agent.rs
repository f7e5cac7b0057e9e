//! `lbd` as an agent: it owns the [`Balancer`] and the current [`Config`], and serves the
//! control API ([`crate::control`]) on a Unix socket.
//!
//! Every change is a transaction, one at a time (a mutex serializes them): clone the
//! configuration, apply the request to the clone, validate it, apply it to the datapath (on
//! failure the previous configuration is applied again), then write it to the configuration
//! file atomically (temporary file in the same directory, fsync, rename, fsync of the
//! directory; on failure the datapath is rolled back too). A rejected request changes neither
//! the maps nor the file, and a restart comes back with exactly what was last accepted.
use crate::{
    config::{self, Config},
    control::{
        parse_backend_address, BackendEntry, BackendStatsEntry, Changed, Request, Response,
        StatsSnapshot, Status, TableChange, VipEntry, VipName, VipStatsEntry, VipStatus, MAX_LINE,
    },
    datapath::{ApplyReport, Balancer},
};
use anyhow::{anyhow, bail, Context as _, Result};
use std::{
    ffi::CString,
    fs,
    io::Write as _,
    os::unix::fs::{
        DirBuilderExt as _, FileTypeExt as _, MetadataExt as _, OpenOptionsExt as _,
        PermissionsExt as _,
    },
    path::{Path, PathBuf},
    sync::Arc,
    time::{Instant, SystemTime, UNIX_EPOCH},
};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::Mutex,
};
use tracing::{debug, error, info, warn};

/// What the mutex protects: the datapath and the configuration it was built from.
struct State {
    lb: Balancer,
    config: Config,
    /// The configuration file's text as lbd last read or wrote it. A change made with lbctl is
    /// refused while the file holds something else (an operator's edit not yet reloaded), so
    /// that writing the file never throws such an edit away.
    file_text: Option<String>,
}

/// The running agent. Share it as `Arc<Agent>` between the control socket, the metrics
/// endpoint and the signal loop.
pub struct Agent {
    state: Mutex<State>,
    config_path: PathBuf,
    started: Instant,
}

impl Agent {
    /// Takes over a loaded, attached balancer that `config` (read from `config_path`) was
    /// applied to.
    pub fn new(config_path: &Path, config: Config, lb: Balancer) -> Arc<Self> {
        let file_text = fs::read_to_string(config_path).ok();
        Arc::new(Agent {
            state: Mutex::new(State {
                lb,
                config,
                file_text,
            }),
            config_path: config_path.to_path_buf(),
            started: Instant::now(),
        })
    }

    /// The configuration currently applied.
    pub async fn config(&self) -> Config {
        self.state.lock().await.config.clone()
    }

    /// Detaches the balancer (on stop). The agent answers no further changes meaningfully
    /// after this; call it last.
    pub async fn detach(&self) -> Result<()> {
        self.state.lock().await.lb.detach()
    }

    /// Runs `f` with the balancer, under the same lock as changes.
    pub async fn with_balancer<T>(&self, f: impl FnOnce(&mut Balancer, &Config) -> T) -> T {
        let mut st = self.state.lock().await;
        let State { lb, config, .. } = &mut *st;
        f(lb, config)
    }

    /// SIGHUP: re-reads the configuration file and applies it, as one more serialized change.
    /// A file that is invalid, or that changes settings fixed at start, changes nothing.
    pub async fn reload(&self) -> Result<ApplyReport> {
        let mut st = self.state.lock().await;
        let path = self.config_path.display();
        let text = fs::read_to_string(&self.config_path).map_err(|e| {
            anyhow!("reload rejected, nothing changed: cannot read config file {path}: {e}")
        })?;
        let new = Config::parse(&text)
            .map_err(|e| anyhow!("reload rejected, nothing changed: config file {path}: {e}"))?;
        let fixed = st.config.restart_only_changes(&new);
        if !fixed.is_empty() {
            bail!(
                "reload rejected, nothing changed: {} only change on restart",
                fixed.join(", ")
            );
        }
        let prev = st.config.clone();
        match st.lb.apply(&new) {
            Ok(r) => {
                st.config = new;
                st.file_text = Some(text);
                Ok(r)
            }
            Err(e) => {
                rollback(&mut st.lb, &prev);
                Err(e.context("reload failed; the previous configuration stays applied"))
            }
        }
    }

    /// Answers one control request.
    pub async fn handle(&self, req: Request) -> Response {
        let result = match req {
            Request::VipList => self.vip_list().await.map(Response::ok),
            Request::BackendList { vip } => self.backend_list(vip.as_deref()).await,
            Request::Stats => self.snapshot().await.map(Response::ok),
            Request::Status => self.status().await.map(Response::ok),
            other => self.change(other).await.map(Response::ok),
        };
        result.unwrap_or_else(|e| Response::error(format!("{e:#}")))
    }

    async fn vip_list(&self) -> Result<Vec<VipEntry>> {
        let st = self.state.lock().await;
        Ok(st
            .lb
            .vips()
            .map(|v| VipEntry {
                vip: VipName::of(&v.config).to_string(),
                address: v.config.address,
                port: v.config.port,
                protocol: v.config.protocol,
                forwarding: v.config.forwarding,
                table_size: v.config.table_size,
                generation: v.generation,
                datapath_generation: st.lb.vip_meta(&v.config).map(|m| m.generation),
                backends: v.config.backends.len(),
                drained: v.config.backends.iter().filter(|b| b.drained).count(),
            })
            .collect())
    }

    async fn backend_list(&self, vip: Option<&str>) -> Result<Response> {
        let want = match vip {
            Some(v) => Some(v.parse::<VipName>().map_err(|e| anyhow!(e))?),
            None => None,
        };
        let st = self.state.lock().await;
        if let Some(w) = want {
            if !st.lb.vips().any(|v| VipName::of(&v.config) == w) {
                return Ok(Response::error(unknown_vip(&w)));
            }
        }
        let mut out = Vec::new();
        for v in st.lb.vips() {
            let name = VipName::of(&v.config);
            if want.is_some_and(|w| w != name) {
                continue;
            }
            for (b, cfg) in v.backends.iter().zip(&v.config.backends) {
                out.push(BackendEntry {
                    vip: name.to_string(),
                    address: b.address,
                    weight: cfg.weight,
                    drained: cfg.drained,
                    effective_weight: cfg.effective_weight(),
                    slots: b.slots,
                    up: true,
                    id: b.id,
                });
            }
        }
        Ok(Response::ok(out))
    }

    /// Statistics of every VIP and backend and every datapath counter, at one instant.
    pub async fn snapshot(&self) -> Result<StatsSnapshot> {
        let st = self.state.lock().await;
        let mut vips = Vec::new();
        for v in st.lb.vips() {
            let s = st.lb.vip_stats(v.vip_id)?;
            let mut backends = Vec::new();
            for (b, cfg) in v.backends.iter().zip(&v.config.backends) {
                let bs = st.lb.backend_stats(b.id)?;
                backends.push(BackendStatsEntry {
                    address: b.address,
                    weight: cfg.weight,
                    effective_weight: cfg.effective_weight(),
                    drained: cfg.drained,
                    up: true,
                    packets: bs.packets,
                    bytes: bs.bytes,
                    new_flows: bs.new_flows,
                    syn_retries: bs.syn_retries,
                    client_rsts: bs.client_rsts,
                    resteered: bs.resteered,
                    rates: None,
                });
            }
            vips.push(VipStatsEntry {
                vip: VipName::of(&v.config).to_string(),
                packets: s.packets,
                bytes: s.bytes,
                new_flows: s.new_flows,
                no_backend: s.no_backend,
                generation: v.generation,
                rates: None,
                backends,
            });
        }
        let counters = st
            .lb
            .counters()?
            .into_iter()
            .map(|(c, n)| (c.name().to_string(), n))
            .collect();
        Ok(StatsSnapshot {
            timestamp_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            vips,
            counters,
            interval_seconds: None,
        })
    }

    async fn status(&self) -> Result<Status> {
        let st = self.state.lock().await;
        let (interface, mode) = match st.lb.interface() {
            Some((name, mode)) => (name.to_string(), xdp_mode_name(mode)),
            None => (st.config.interface.clone(), "detached"),
        };
        let program_id = st
            .lb
            .program()
            .info()
            .context("reading the balancer program's id")?
            .id();
        Ok(Status {
            version: env!("CARGO_PKG_VERSION").to_string(),
            pid: std::process::id(),
            interface,
            xdp_mode: mode.to_string(),
            program_id,
            uptime_seconds: self.started.elapsed().as_secs(),
            config_file: self.config_path.display().to_string(),
            control_socket: st.config.control_socket.display().to_string(),
            metrics_listen: st.config.metrics_listen.to_string(),
            vips: st
                .lb
                .vips()
                .map(|v| VipStatus {
                    vip: VipName::of(&v.config).to_string(),
                    generation: v.generation,
                    table_size: v.config.table_size,
                    backends: v.backends.len(),
                })
                .collect(),
        })
    }

    /// One mutating request, as a transaction (see the module docs).
    async fn change(&self, req: Request) -> Result<Changed> {
        let mut st = self.state.lock().await;
        let prev = st.config.clone();
        let mut next = prev.clone();
        let message = edit(&mut next, &req)?;
        if next == prev {
            return Ok(Changed {
                message: format!("{message} (already so: nothing changed)"),
                changed: false,
                tables: Vec::new(),
            });
        }
        next.validate()?;
        let on_disk = fs::read_to_string(&self.config_path).ok();
        if on_disk.is_none() || on_disk != st.file_text {
            bail!(
                "config file {}: {} since lbd last read or wrote it, and saving this change would overwrite that; nothing changed. Apply the edit first (systemctl reload lbd, or kill -HUP the lbd process) or undo it, then retry",
                self.config_path.display(),
                if on_disk.is_none() { "cannot be read" } else { "edited" }
            );
        }
        let report = match st.lb.apply(&next) {
            Ok(r) => r,
            Err(e) => {
                rollback(&mut st.lb, &prev);
                return Err(e.context("the datapath rejected the change; nothing changed"));
            }
        };
        let written = match persist(&self.config_path, &next) {
            Ok(t) => t,
            Err(e) => {
                rollback(&mut st.lb, &prev);
                return Err(e.context(
                    "the change was rolled back because the configuration file could not be written",
                ));
            }
        };
        st.config = next;
        st.file_text = Some(written);
        info!(request = ?req, "{message}");
        for (vip, moved, generation) in &report.tables {
            info!(%vip, moved, generation, "table updated");
        }
        Ok(Changed {
            message,
            changed: true,
            tables: report
                .tables
                .into_iter()
                .map(|(vip, slots_moved, generation)| TableChange {
                    vip,
                    slots_moved,
                    generation,
                })
                .collect(),
        })
    }
}

/// Re-applies the configuration that was in force before a failed change, then checks that
/// the datapath's VIP entries are the ones lbd believes in (a failure in the middle of the
/// writes could leave one pointing at a table lbd did not keep; `apply` only rewrites tables it
/// thinks changed). A mismatch is logged loudly: restarting lbd rewrites everything.
fn rollback(lb: &mut Balancer, prev: &Config) {
    if let Err(e) = lb.apply(prev) {
        error!("rolling back to the previous configuration failed too: {e:#}");
    }
    for v in lb.vips() {
        let in_kernel = lb.vip_meta(&v.config).map(|m| m.generation);
        if in_kernel != Some(v.generation) {
            error!(
                vip = %VipName::of(&v.config),
                lbd = v.generation,
                datapath = ?in_kernel,
                "after the rollback the datapath's table generation differs from lbd's; restart lbd to rewrite the tables"
            );
        }
    }
}

fn unknown_vip(v: &VipName) -> String {
    format!(
        "vip {v}: no such VIP; `lbctl vip list` shows the configured ones, `lbctl vip add` adds one"
    )
}

fn find_vip<'a>(cfg: &'a mut Config, v: &VipName) -> Result<&'a mut config::Vip> {
    cfg.vips
        .iter_mut()
        .find(|x| VipName::of(x) == *v)
        .ok_or_else(|| anyhow!(unknown_vip(v)))
}

fn find_backend<'a>(
    vip: &'a mut config::Vip,
    name: &VipName,
    addr: std::net::IpAddr,
) -> Result<&'a mut config::Backend> {
    vip.backends
        .iter_mut()
        .find(|b| b.address == addr)
        .ok_or_else(|| {
            anyhow!(
                "backend {addr} of vip {name}: no such backend; `lbctl backend list {name}` shows them, `lbctl backend add` adds one"
            )
        })
}

fn parse_vip(s: &str) -> Result<VipName> {
    s.parse::<VipName>().map_err(|e| anyhow!(e))
}

fn parse_addr(s: &str) -> Result<std::net::IpAddr> {
    parse_backend_address(s).map_err(|e| anyhow!(e))
}

/// Applies a mutating request to a configuration; returns what was done, for the log and the
/// caller. Validation of the result is the caller's (`Config::validate`).
fn edit(cfg: &mut Config, req: &Request) -> Result<String> {
    match req {
        Request::VipAdd {
            vip,
            forwarding,
            table_size,
        } => {
            let name = parse_vip(vip)?;
            if cfg.vips.iter().any(|x| VipName::of(x) == name) {
                bail!("vip {name}: already configured; change its backends with `lbctl backend ...`, or `lbctl vip remove` it first to change its forwarding or table size");
            }
            let forwarding = forwarding.unwrap_or_default();
            let table_size = table_size.unwrap_or(lb_common::DEFAULT_TABLE_SIZE);
            cfg.vips.push(config::Vip {
                address: name.address,
                port: name.port,
                protocol: name.protocol,
                forwarding,
                table_size,
                backends: Vec::new(),
            });
            Ok(format!(
                "added vip {name} (forwarding {}, table_size {table_size})",
                crate::datapath::forwarding_name(forwarding)
            ))
        }
        Request::VipRemove { vip } => {
            let name = parse_vip(vip)?;
            find_vip(cfg, &name)?;
            cfg.vips.retain(|x| VipName::of(x) != name);
            Ok(format!("removed vip {name}"))
        }
        Request::BackendAdd {
            vip,
            address,
            weight,
        } => {
            let name = parse_vip(vip)?;
            let addr = parse_addr(address)?;
            let v = find_vip(cfg, &name)?;
            if v.backends.iter().any(|b| b.address == addr) {
                bail!("backend {addr} of vip {name}: already a backend of this VIP; use `lbctl backend set-weight` to change its weight");
            }
            let weight = weight.unwrap_or(1);
            v.backends.push(config::Backend {
                address: addr,
                weight,
                drained: false,
            });
            Ok(format!(
                "added backend {addr} to vip {name} with weight {weight}"
            ))
        }
        Request::BackendRemove { vip, address } => {
            let name = parse_vip(vip)?;
            let addr = parse_addr(address)?;
            let v = find_vip(cfg, &name)?;
            find_backend(v, &name, addr)?;
            v.backends.retain(|b| b.address != addr);
            Ok(format!("removed backend {addr} from vip {name}"))
        }
        Request::BackendSetWeight {
            vip,
            address,
            weight,
        } => {
            let name = parse_vip(vip)?;
            let addr = parse_addr(address)?;
            let v = find_vip(cfg, &name)?;
            let b = find_backend(v, &name, addr)?;
            let old = b.weight;
            b.weight = *weight;
            Ok(format!(
                "backend {addr} of vip {name}: weight {old} -> {weight}{}",
                if b.drained {
                    " (drained: takes effect on undrain)"
                } else {
                    ""
                }
            ))
        }
        Request::BackendDrain { vip, address } | Request::BackendUndrain { vip, address } => {
            let drain = matches!(req, Request::BackendDrain { .. });
            let name = parse_vip(vip)?;
            let addr = parse_addr(address)?;
            let v = find_vip(cfg, &name)?;
            let b = find_backend(v, &name, addr)?;
            b.drained = drain;
            Ok(if drain {
                format!("backend {addr} of vip {name}: drained (no new flows; established flows continue)")
            } else {
                format!(
                    "backend {addr} of vip {name}: undrained (weight {} again)",
                    b.weight
                )
            })
        }
        Request::VipList | Request::BackendList { .. } | Request::Stats | Request::Status => {
            bail!("internal error: {req:?} is not a change")
        }
    }
}

/// Writes the configuration to `path` atomically: a temporary file in the same directory
/// (same owner and mode as the file it replaces), fsync, rename over the file, fsync of the
/// directory. A symlink is followed, so the file it points to is the one replaced. Returns the
/// text written.
pub fn persist(path: &Path, cfg: &Config) -> Result<String> {
    let text = cfg.to_toml()?;
    let target = fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let dir = match target.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_name = target
        .file_name()
        .ok_or_else(|| anyhow!("config file {}: not a file path", path.display()))?
        .to_string_lossy()
        .into_owned();
    let tmp = dir.join(format!(".{file_name}.lbd-{}.tmp", std::process::id()));
    let old = fs::metadata(&target).ok();
    let mode = old
        .as_ref()
        .map_or(0o644, |m| m.permissions().mode() & 0o7777);
    let write = || -> std::io::Result<()> {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        if let Some(m) = &old {
            std::os::unix::fs::fchown(&f, Some(m.uid()), Some(m.gid()))?;
        }
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, &target)?;
        fs::File::open(&dir)?.sync_all()
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&tmp);
        anyhow!(
            "config file {}: cannot write it ({e}); check that lbd may write to {}",
            target.display(),
            dir.display()
        )
    })?;
    Ok(text)
}

/// The control socket, bound and with its permissions set, ready to be served.
pub struct ControlSocket {
    listener: Option<std::os::unix::net::UnixListener>,
    path: PathBuf,
}

/// The socket file goes when the socket does (lbd stopping, or failing to start after the
/// socket was bound), so no stale socket is left behind.
impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

impl ControlSocket {
    /// Binds `control_socket` (creating its directory): mode 0600, or 0660 with group
    /// `control_group` when set. The socket appears at its path only once its permissions are
    /// final (bound under a temporary name, then renamed). A stale socket left by a crashed lbd
    /// is replaced; one that another lbd still serves is an error.
    pub fn bind(cfg: &Config) -> Result<Self> {
        let path = cfg.control_socket.clone();
        let shown = path.display();
        let gid = match &cfg.control_group {
            Some(g) => Some(group_id(g)?),
            None => None,
        };
        let dir = path
            .parent()
            .ok_or_else(|| anyhow!("control_socket: {shown} has no directory"))?;
        if !dir.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(dir)
                .with_context(|| {
                    format!("control_socket: cannot create directory {}", dir.display())
                })?;
        }
        match fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_socket() => {
                if std::os::unix::net::UnixStream::connect(&path).is_ok() {
                    bail!("control_socket: another lbd is serving {shown}; stop it first, or give this one another control_socket");
                }
                fs::remove_file(&path).with_context(|| {
                    format!("control_socket: removing the stale socket {shown}")
                })?;
            }
            Ok(_) => bail!(
                "control_socket: {shown} exists and is not a socket; remove it or choose another path"
            ),
            Err(_) => {}
        }
        let name = path
            .file_name()
            .ok_or_else(|| anyhow!("control_socket: {shown} names no file"))?;
        let tmp = dir.join(format!(
            ".{}.{}.tmp",
            name.to_string_lossy(),
            std::process::id()
        ));
        let _ = fs::remove_file(&tmp);
        let listener = std::os::unix::net::UnixListener::bind(&tmp)
            .with_context(|| format!("control_socket: cannot bind {}", tmp.display()))?;
        let finish = || -> std::io::Result<()> {
            if let Some(gid) = gid {
                std::os::unix::fs::chown(&tmp, None, Some(gid))?;
                fs::set_permissions(&tmp, fs::Permissions::from_mode(0o660))?;
            } else {
                fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600))?;
            }
            fs::rename(&tmp, &path)
        };
        if let Err(e) = finish() {
            let _ = fs::remove_file(&tmp);
            bail!("control_socket: cannot set up {shown}: {e}");
        }
        listener.set_nonblocking(true)?;
        Ok(ControlSocket {
            listener: Some(listener),
            path,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves connections until the task is dropped; each connection on its own task.
    pub async fn serve(mut self, agent: Arc<Agent>) -> Result<()> {
        let listener = self
            .listener
            .take()
            .ok_or_else(|| anyhow!("control socket served twice"))?;
        let listener = UnixListener::from_std(listener)?;
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    warn!("control socket: accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let agent = agent.clone();
            tokio::spawn(async move {
                if let Err(e) = serve_connection(stream, agent).await {
                    debug!("control connection ended: {e:#}");
                }
            });
        }
    }
}

async fn serve_connection(stream: UnixStream, agent: Arc<Agent>) -> Result<()> {
    let peer = stream
        .peer_cred()
        .map(|c| format!("uid {} pid {}", c.uid(), c.pid().unwrap_or(0)))
        .unwrap_or_else(|_| "unknown peer".into());
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = (&mut reader)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)
            .await?;
        if n == 0 {
            return Ok(());
        }
        if line.len() > MAX_LINE {
            let resp = Response::error(format!(
                "request: longer than {MAX_LINE} bytes; send one JSON request per line"
            ));
            send(&mut write, &resp).await?;
            return Ok(());
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim();
        if text.is_empty() {
            continue;
        }
        let resp = match serde_json::from_str::<Request>(text) {
            Ok(req) => {
                let mutation = req.is_mutation();
                let resp = agent.handle(req).await;
                if mutation && !resp.ok {
                    info!(%peer, "change rejected: {}", resp.error.as_deref().unwrap_or(""));
                } else if mutation {
                    debug!(%peer, "change applied");
                }
                resp
            }
            Err(e) => Response::error(format!(
                "request: {e}; send one JSON object per line with a \"command\" field (see the README's control API section)"
            )),
        };
        send(&mut write, &resp).await?;
    }
}

async fn send(w: &mut tokio::net::unix::OwnedWriteHalf, resp: &Response) -> Result<()> {
    let mut out = serde_json::to_vec(resp)?;
    out.push(b'\n');
    w.write_all(&out).await?;
    Ok(())
}

/// The numeric id of a group, or an error that says what to do.
fn group_id(name: &str) -> Result<u32> {
    let c = CString::new(name).map_err(|_| anyhow!("control_group: {name:?} is not a name"))?;
    let mut buf = vec![0 as libc::c_char; 16384];
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut out: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; `buf` outlives the use of `grp`'s fields
    // (only gr_gid, a plain integer, is read).
    let rc =
        unsafe { libc::getgrnam_r(c.as_ptr(), &mut grp, buf.as_mut_ptr(), buf.len(), &mut out) };
    if rc != 0 || out.is_null() {
        bail!("control_group: no group named {name:?} on this host; create it (groupadd {name}) or remove control_group from the configuration");
    }
    Ok(grp.gr_gid)
}

/// How `status` names an attach mode.
pub fn xdp_mode_name(m: aya::programs::XdpMode) -> &'static str {
    match m {
        aya::programs::XdpMode::Driver => "native",
        aya::programs::XdpMode::Skb => "generic",
        aya::programs::XdpMode::Hardware => "offload",
        aya::programs::XdpMode::Default => "default",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Config {
        Config::parse(
            "interface = \"eth0\"\n[encap]\nsource_v4 = \"10.0.0.2\"\n\n[[vip]]\naddress = \"10.0.0.100\"\nport = 80\nprotocol = \"tcp\"\n[[vip.backend]]\naddress = \"10.0.0.11\"\n",
        )
        .unwrap()
    }

    fn try_edit(req: Request) -> Result<Config, String> {
        let mut c = base();
        edit(&mut c, &req).map_err(|e| e.to_string())?;
        c.validate().map_err(|e| e.to_string())?;
        Ok(c)
    }

    const VIP: &str = "10.0.0.100:80/tcp";

    #[test]
    fn edits_and_their_errors() {
        let c = try_edit(Request::BackendAdd {
            vip: VIP.into(),
            address: "10.0.0.12".into(),
            weight: Some(3),
        })
        .unwrap();
        assert_eq!(c.vips[0].backends[1].weight, 3);
        let c = try_edit(Request::BackendDrain {
            vip: VIP.into(),
            address: "10.0.0.11".into(),
        })
        .unwrap();
        assert!(c.vips[0].backends[0].drained);
        assert_eq!(c.vips[0].backends[0].weight, 1);

        let e = |r| try_edit(r).unwrap_err();
        assert!(e(Request::VipAdd {
            vip: VIP.into(),
            forwarding: None,
            table_size: None
        })
        .contains("already configured"));
        assert!(e(Request::VipAdd {
            vip: "10.0.0.101:80/tcp".into(),
            forwarding: None,
            table_size: Some(65536)
        })
        .contains("table_size 65536 is not prime"));
        assert!(e(Request::VipAdd {
            vip: "[fd00::1]:80/tcp".into(),
            forwarding: None,
            table_size: None
        })
        .contains("needs encap.source_v6"));
        assert!(e(Request::VipRemove {
            vip: "10.0.0.9:80/tcp".into()
        })
        .contains("vip 10.0.0.9:80/tcp: no such VIP"));
        assert!(e(Request::BackendRemove {
            vip: VIP.into(),
            address: "10.0.0.99".into()
        })
        .contains("backend 10.0.0.99 of vip 10.0.0.100:80/tcp: no such backend"));
        assert!(e(Request::BackendSetWeight {
            vip: VIP.into(),
            address: "10.0.0.11".into(),
            weight: 10_001
        })
        .contains("weight 10001 is out of range; use 0 to 10000"));
        assert!(e(Request::BackendAdd {
            vip: VIP.into(),
            address: "fd00::5".into(),
            weight: None
        })
        .contains("address is IPv6 but the VIP is IPv4"));
        assert!(e(Request::BackendAdd {
            vip: VIP.into(),
            address: "10.0.0.11".into(),
            weight: None
        })
        .contains("already a backend"));
    }

    #[test]
    fn persist_replaces_the_file_atomically_keeping_its_mode() {
        let dir = std::env::temp_dir().join(format!("lb-agent-persist-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("lbd.toml");
        fs::write(&path, "# old\n").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        let mut c = base();
        c.vips[0].backends[0].drained = true;
        persist(&path, &c).unwrap();
        assert_eq!(Config::load(&path).unwrap(), c);
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o640
        );
        let leftovers: Vec<_> = fs::read_dir(&dir).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "temporary file left behind");
        fs::remove_dir_all(&dir).unwrap();
    }
}
