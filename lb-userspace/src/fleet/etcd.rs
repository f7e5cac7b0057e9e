//! A small etcd v3 client over etcd's JSON gateway (`POST /v3/kv/range`, `/v3/kv/txn`,
//! `/v3/lease/*`, `/v3/watch`): plain HTTP/1.1 on the client port, no protobuf, no protoc, no
//! HTTP library. Keys and values travel base64-encoded; 64-bit integers as JSON strings.
//! Each call opens one connection (`Connection: close`) to the first endpoint that answers,
//! with a deadline, so a dead etcd costs a bounded wait, never a hang.
use anyhow::{anyhow, bail, Context as _, Result};
use serde_json::{json, Value};
use std::time::Duration;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

/// How long one call may take (connect, request, answer).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// One key as etcd holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kv {
    pub key: String,
    pub value: Vec<u8>,
    pub mod_revision: i64,
    pub create_revision: i64,
    /// The lease the key lives on, 0 if none.
    pub lease: i64,
}

/// The endpoints of one etcd cluster (`--etcd URL[,URL]`).
#[derive(Debug, Clone)]
pub struct Etcd {
    /// host:port of each endpoint, in the order given.
    endpoints: Vec<String>,
}

/// One operation of a transaction's success branch.
#[derive(Debug, Clone)]
pub enum Op {
    Put {
        key: String,
        value: Vec<u8>,
        lease: i64,
    },
    Delete {
        key: String,
    },
}

impl Etcd {
    /// Parses `http://host:port[,http://host:port...]` (https is not supported: say so).
    pub fn try_new(urls: &str) -> Result<Etcd> {
        let mut endpoints = Vec::new();
        for u in urls.split(',').map(str::trim).filter(|u| !u.is_empty()) {
            let Some(rest) = u.strip_prefix("http://") else {
                bail!("--etcd {u:?}: give each endpoint as http://HOST:PORT (TLS is not supported; reach etcd over a trusted network or a local proxy)");
            };
            let hostport = rest.trim_end_matches('/');
            if hostport.is_empty() || hostport.contains('/') {
                bail!("--etcd {u:?}: give each endpoint as http://HOST:PORT, without a path");
            }
            endpoints.push(hostport.to_string());
        }
        if endpoints.is_empty() {
            bail!("--etcd: no endpoint given; use --etcd http://HOST:2379[,http://HOST2:2379]");
        }
        Ok(Etcd { endpoints })
    }

    /// Every key under `prefix`, and the store's revision at the read.
    pub async fn range_prefix(&self, prefix: &str) -> Result<(i64, Vec<Kv>)> {
        let body = json!({"key": b64(prefix.as_bytes()), "range_end": b64(&prefix_end(prefix))});
        let v = self.call("/v3/kv/range", &body).await?;
        let rev = int(&v["header"]["revision"]);
        let kvs = v["kvs"]
            .as_array()
            .map(|a| a.iter().map(kv).collect::<Result<Vec<_>>>())
            .transpose()?
            .unwrap_or_default();
        Ok((rev, kvs))
    }

    /// One key, if present.
    pub async fn get(&self, key: &str) -> Result<Option<Kv>> {
        let v = self
            .call("/v3/kv/range", &json!({"key": b64(key.as_bytes())}))
            .await?;
        v["kvs"]
            .as_array()
            .and_then(|a| a.first())
            .map(kv)
            .transpose()
    }

    /// Runs `ops` if every `(key, mod_revision)` still has that mod revision (0: the key does
    /// not exist). Returns the new store revision if the comparison held (and so the
    /// operations ran), None if it did not.
    pub async fn txn_if_mod(&self, compare: &[(String, i64)], ops: &[Op]) -> Result<Option<i64>> {
        let cmp: Vec<Value> = compare
            .iter()
            .map(|(k, r)| json!({"key": b64(k.as_bytes()), "target": "MOD", "result": "EQUAL", "mod_revision": r.to_string()}))
            .collect();
        self.txn(cmp, ops).await
    }

    /// Runs `ops` if `key` does not exist (create revision 0): what an election needs.
    pub async fn txn_if_absent(&self, key: &str, ops: &[Op]) -> Result<Option<i64>> {
        let cmp = vec![
            json!({"key": b64(key.as_bytes()), "target": "CREATE", "result": "EQUAL", "create_revision": "0"}),
        ];
        self.txn(cmp, ops).await
    }

    async fn txn(&self, compare: Vec<Value>, ops: &[Op]) -> Result<Option<i64>> {
        let success: Vec<Value> = ops
            .iter()
            .map(|op| match op {
                Op::Put { key, value, lease } => json!({"request_put": {
                    "key": b64(key.as_bytes()), "value": b64(value), "lease": lease.to_string()}}),
                Op::Delete { key } => {
                    json!({"request_delete_range": {"key": b64(key.as_bytes())}})
                }
            })
            .collect();
        let v = self
            .call(
                "/v3/kv/txn",
                &json!({"compare": compare, "success": success}),
            )
            .await?;
        // The gateway leaves out false fields.
        Ok(v["succeeded"]
            .as_bool()
            .unwrap_or(false)
            .then(|| int(&v["header"]["revision"])))
    }

    /// A lease of `ttl_s` seconds; keys put with it vanish when it is not kept alive.
    pub async fn lease_grant(&self, ttl_s: i64) -> Result<i64> {
        let v = self
            .call("/v3/lease/grant", &json!({"TTL": ttl_s.to_string()}))
            .await?;
        match int(&v["ID"]) {
            0 => bail!("etcd granted no lease: {v}"),
            id => Ok(id),
        }
    }

    /// Renews a lease; false when it has expired (its keys are gone).
    pub async fn lease_keepalive(&self, id: i64) -> Result<bool> {
        let v = self
            .call("/v3/lease/keepalive", &json!({"ID": id.to_string()}))
            .await?;
        Ok(int(&v["result"]["TTL"]) > 0)
    }

    /// Revokes a lease (on a clean stop: its keys go at once instead of at expiry).
    pub async fn lease_revoke(&self, id: i64) -> Result<()> {
        self.call("/v3/lease/revoke", &json!({"ID": id.to_string()}))
            .await
            .map(|_| ())
    }

    /// Waits until a key under `prefix` changes at or after revision `from`, or `wait`
    /// passes. Returns whether a change was seen (the caller reads the prefix again either
    /// way: the watch only says when).
    pub async fn watch_prefix(&self, prefix: &str, from: i64, wait: Duration) -> Result<bool> {
        let body = json!({"create_request": {"key": b64(prefix.as_bytes()),
            "range_end": b64(&prefix_end(prefix)), "start_revision": from.to_string()}});
        let mut conn = None;
        for ep in &self.endpoints {
            if let Ok(Ok(s)) =
                tokio::time::timeout(CALL_TIMEOUT, TcpStream::connect(ep.as_str())).await
            {
                conn = Some((ep, s));
                break;
            }
        }
        let (ep, mut s) =
            conn.ok_or_else(|| self.unreachable("no endpoint accepts connections"))?;
        s.write_all(request(ep, "/v3/watch", &body.to_string()).as_bytes())
            .await?;
        let mut stream = Body::default();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let line = match tokio::time::timeout_at(deadline, stream.next_line(&mut s)).await {
                Err(_) => return Ok(false),
                Ok(line) => line?,
            };
            let Some(line) = line else {
                return Ok(false);
            };
            let v: Value = serde_json::from_slice(&line)
                .with_context(|| format!("etcd {ep}: watch answered something not JSON"))?;
            if v["result"]["events"]
                .as_array()
                .is_some_and(|e| !e.is_empty())
            {
                return Ok(true);
            }
            if v["result"]["canceled"].as_bool() == Some(true) {
                // Compacted past `from`: the caller reads everything again.
                return Ok(true);
            }
        }
    }

    /// One request to the first endpoint that answers it.
    async fn call(&self, path: &str, body: &Value) -> Result<Value> {
        let text = body.to_string();
        let mut errors = Vec::new();
        for ep in &self.endpoints {
            match tokio::time::timeout(CALL_TIMEOUT, call_one(ep, path, &text)).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) => errors.push(format!("{ep}: {e:#}")),
                Err(_) => errors.push(format!("{ep}: no answer within {CALL_TIMEOUT:?}")),
            }
        }
        Err(self.unreachable(&errors.join("; ")))
    }

    fn unreachable(&self, why: &str) -> anyhow::Error {
        anyhow!("etcd unreachable ({}): {why}", self.endpoints.join(","))
    }
}

fn request(host: &str, path: &str, body: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

async fn call_one(ep: &str, path: &str, body: &str) -> Result<Value> {
    let mut s = TcpStream::connect(ep).await?;
    s.write_all(request(ep, path, body).as_bytes()).await?;
    let mut stream = Body::default();
    let status = stream.status(&mut s).await?;
    // Streaming answers (keepalive) end their first message with a newline; others with EOF.
    let line = stream.next_line(&mut s).await?.unwrap_or_default();
    let v: Value = serde_json::from_slice(&line).with_context(|| {
        format!(
            "answered {status} with something not JSON: {:?}",
            String::from_utf8_lossy(&line)
        )
    })?;
    if status != 200 {
        bail!(
            "answered {status}: {}",
            v["error"].as_str().unwrap_or(&v.to_string())
        );
    }
    Ok(v)
}

/// An HTTP/1.1 response read incrementally: the head, then the body (chunked or not) as
/// newline-separated messages.
#[derive(Default)]
struct Body {
    raw: Vec<u8>,
    /// Body bytes already de-chunked.
    body: Vec<u8>,
    chunked: bool,
    head_done: bool,
    eof: bool,
}

impl Body {
    async fn fill(&mut self, s: &mut TcpStream) -> Result<()> {
        let mut buf = [0u8; 8192];
        let n = s.read(&mut buf).await?;
        if n == 0 {
            self.eof = true;
        }
        self.raw.extend_from_slice(&buf[..n]);
        Ok(())
    }

    /// Reads the head; returns the status code.
    async fn status(&mut self, s: &mut TcpStream) -> Result<u16> {
        loop {
            if let Some(end) = find(&self.raw, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.raw[..end]).to_ascii_lowercase();
                self.chunked = head.contains("transfer-encoding: chunked");
                self.raw.drain(..end + 4);
                self.head_done = true;
                let code = head
                    .split_whitespace()
                    .nth(1)
                    .and_then(|c| c.parse().ok())
                    .ok_or_else(|| anyhow!("not an HTTP answer"))?;
                return Ok(code);
            }
            if self.eof {
                bail!("closed the connection before answering");
            }
            self.fill(s).await?;
        }
    }

    /// Moves what can be de-chunked from `raw` to `body`.
    fn dechunk(&mut self) {
        if !self.chunked {
            self.body.append(&mut self.raw);
            return;
        }
        while let Some(eol) = find(&self.raw, b"\r\n") {
            let size = std::str::from_utf8(&self.raw[..eol])
                .ok()
                .and_then(|h| usize::from_str_radix(h.split(';').next()?.trim(), 16).ok());
            let Some(size) = size else { return };
            if self.raw.len() < eol + 2 + size + 2 {
                return;
            }
            self.body
                .extend_from_slice(&self.raw[eol + 2..eol + 2 + size]);
            self.raw.drain(..eol + 2 + size + 2);
            if size == 0 {
                self.eof = true;
                return;
            }
        }
    }

    /// The next message (up to a newline, or the rest at the end); None at the end.
    async fn next_line(&mut self, s: &mut TcpStream) -> Result<Option<Vec<u8>>> {
        if !self.head_done {
            self.status(s).await?;
        }
        loop {
            self.dechunk();
            if let Some(nl) = self.body.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.body.drain(..=nl).collect();
                return Ok(Some(line));
            }
            if self.eof {
                if self.body.is_empty() {
                    return Ok(None);
                }
                return Ok(Some(std::mem::take(&mut self.body)));
            }
            self.fill(s).await?;
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn kv(v: &Value) -> Result<Kv> {
    let key = unb64(v["key"].as_str().unwrap_or_default())?;
    Ok(Kv {
        key: String::from_utf8(key).map_err(|_| anyhow!("etcd holds a key that is not UTF-8"))?,
        value: unb64(v["value"].as_str().unwrap_or_default())?,
        mod_revision: int(&v["mod_revision"]),
        create_revision: int(&v["create_revision"]),
        lease: int(&v["lease"]),
    })
}

/// A 64-bit integer as the gateway writes it (a string), 0 when absent.
fn int(v: &Value) -> i64 {
    match v {
        Value::String(s) => s.parse().unwrap_or(0),
        Value::Number(n) => n.as_i64().unwrap_or(0),
        _ => 0,
    }
}

/// The end of the key range holding every key that starts with `prefix`.
pub fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

pub fn b64(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

pub fn unb64(text: &str) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let mut acc = 0u32;
    let mut bits = 0;
    for c in text.bytes().filter(|&c| c != b'=') {
        let v = B64
            .iter()
            .position(|&x| x == c)
            .ok_or_else(|| anyhow!("etcd sent invalid base64"))? as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips_and_prefix_ends() {
        for s in [
            "",
            "f",
            "fo",
            "foo",
            "foob",
            "fooba",
            "foobar",
            "/lb/vips/[fd00::1]:80/tcp",
        ] {
            assert_eq!(unb64(&b64(s.as_bytes())).unwrap(), s.as_bytes());
        }
        assert_eq!(b64(b"foobar"), "Zm9vYmFy");
        assert_eq!(b64(b"fo"), "Zm8=");
        assert_eq!(prefix_end("/lb/"), b"/lb0");
        assert!(Etcd::try_new("https://x:1")
            .unwrap_err()
            .to_string()
            .contains("TLS"));
        assert_eq!(
            Etcd::try_new("http://10.0.0.1:2379, http://10.0.0.2:2379")
                .unwrap()
                .endpoints,
            ["10.0.0.1:2379", "10.0.0.2:2379"]
        );
    }
}
