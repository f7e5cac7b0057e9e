//! The client side of the control socket, as `lbctl` uses it: one request, one response.
use super::api::{Request, Response};
use std::{
    io::{self, BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

/// Why a client could not talk to lbd.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket is missing, refused or forbidden: lbd is not running, or we may not use it.
    #[error("{0}")]
    Unreachable(String),
    /// lbd answered something that is not a response, or hung up.
    #[error("{0}")]
    Protocol(String),
}

/// A blocking connection to lbd's control socket (what `lbctl` uses).
pub struct Client {
    reader: BufReader<UnixStream>,
    path: String,
}

impl Client {
    pub fn connect(path: &Path) -> Result<Self, ClientError> {
        let shown = path.display().to_string();
        let stream = UnixStream::connect(path).map_err(|e| {
            let what = match e.kind() {
                io::ErrorKind::PermissionDenied => format!(
                    "permission denied on lbd's control socket {shown}: run lbctl as root, or as a member of the group named by control_group in lbd's configuration"
                ),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => format!(
                    "cannot reach lbd at {shown} ({e}): is lbd running (systemctl status lbd)? Is control_socket in its configuration this path? Use --socket PATH for another one"
                ),
                _ => format!(
                    "cannot connect to lbd's control socket {shown}: {e}; check that lbd is running and the path is its control_socket"
                ),
            };
            ClientError::Unreachable(what)
        })?;
        // Changes that rebuild large tables take a while; do not hang forever on a stuck lbd.
        let _ = stream.set_read_timeout(Some(Duration::from_secs(120)));
        Ok(Client {
            reader: BufReader::new(stream),
            path: shown,
        })
    }

    /// Sends one request and waits for its response.
    pub fn call(&mut self, req: &Request) -> Result<Response, ClientError> {
        let mut line = serde_json::to_string(req)
            .map_err(|e| ClientError::Protocol(format!("encoding the request: {e}")))?;
        line.push('\n');
        let path = &self.path;
        self.reader
            .get_mut()
            .write_all(line.as_bytes())
            .map_err(|e| ClientError::Protocol(format!("sending to lbd at {path}: {e}")))?;
        let mut answer = String::new();
        let n = self
            .reader
            .read_line(&mut answer)
            .map_err(|e| ClientError::Protocol(format!("reading lbd's answer on {path}: {e}")))?;
        if n == 0 {
            return Err(ClientError::Protocol(format!(
                "lbd closed the connection on {path} without answering (did it stop? see its log)"
            )));
        }
        serde_json::from_str(&answer).map_err(|e| {
            ClientError::Protocol(format!("lbd's answer on {path} is not a response: {e}"))
        })
    }
}
