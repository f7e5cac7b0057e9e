//! The server side of the control socket: binding it with the right owner and mode, reading
//! one JSON request per line and writing each answer. What a request does is the [`Handler`]'s
//! business (the agent's), so this room never needs the agent.
use super::api::{Request, Response, MAX_LINE};
use crate::config::Config;
use anyhow::{anyhow, bail, Context as _, Result};
use std::{
    ffi::CString,
    fs,
    future::Future,
    os::unix::fs::{DirBuilderExt as _, FileTypeExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::Arc,
};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
};
use tracing::{debug, warn};

/// Answers one control request; the agent is the one handler. `peer` is who sent it, as the
/// kernel says (SO_PEERCRED), for the log and the journal.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, req: Request, peer: Peer) -> impl Future<Output = Response> + Send;
}

/// The process at the other end of a control connection (SO_PEERCRED).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Peer {
    pub uid: Option<u32>,
    pub pid: Option<i32>,
}

/// `uid 0 pid 4242`, or `unknown peer`.
impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.uid, self.pid) {
            (Some(u), Some(p)) => write!(f, "uid {u} pid {p}"),
            (Some(u), None) => write!(f, "uid {u}"),
            _ => f.write_str("unknown peer"),
        }
    }
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
    pub async fn serve<H: Handler>(mut self, handler: Arc<H>) -> Result<()> {
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
            let handler = handler.clone();
            tokio::spawn(async move {
                if let Err(e) = serve_connection(stream, handler).await {
                    debug!("control connection ended: {e:#}");
                }
            });
        }
    }
}

async fn serve_connection<H: Handler>(stream: UnixStream, handler: Arc<H>) -> Result<()> {
    let peer = stream
        .peer_cred()
        .map(|c| Peer {
            uid: Some(c.uid()),
            pid: c.pid(),
        })
        .unwrap_or_default();
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
            // The handler logs and journals every change with `peer`, accepted or refused.
            Ok(req) => handler.handle(req, peer).await,
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
pub fn group_id(name: &str) -> Result<u32> {
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
