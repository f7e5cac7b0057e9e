//! The fleet's configuration in etcd: where each part lives under the prefix, how a revision
//! is read into VIPs (refused whole, naming the key and the fix), and how `lbctl --etcd`
//! writes a change (one transaction that holds only if nothing it read changed meanwhile).
//!
//! Layout under `PREFIX/`:
//! - `config/vips/<vip>` (e.g. `config/vips/10.0.0.100:80/tcp`): one VIP with its backends,
//!   as JSON in the shape of the TOML's `[[vip]]` table;
//! - `config/version`: rewritten by every lbctl change (what it did), so that a deletion
//!   also raises the configuration's revision;
//! - `leader`: the elected node's name, on its lease;
//! - `weights`: the leader's effective weights ([`Published`]);
//! - `nodes/<node>`: each node's report ([`NodeReport`]), on its lease.
use super::etcd::{Etcd, Kv, Op};
use crate::{
    config::{Config, Vip},
    control::{BgpStatus, Changed, Request, VipName},
};
use anyhow::{anyhow, bail, Result};
use serde::{Deserialize, Serialize};

/// The prefix as given, with exactly one trailing slash.
pub fn normalize_prefix(p: &str) -> Result<String> {
    let t = p.trim_end_matches('/');
    if t.is_empty() || !t.starts_with('/') {
        bail!("--prefix {p:?}: give an absolute key prefix such as /lb/fleet1");
    }
    Ok(format!("{t}/"))
}

pub fn config_prefix(prefix: &str) -> String {
    format!("{prefix}config/")
}
pub fn vips_prefix(prefix: &str) -> String {
    format!("{prefix}config/vips/")
}
pub fn version_key(prefix: &str) -> String {
    format!("{prefix}config/version")
}
pub fn leader_key(prefix: &str) -> String {
    format!("{prefix}leader")
}
pub fn weights_key(prefix: &str) -> String {
    format!("{prefix}weights")
}
pub fn nodes_prefix(prefix: &str) -> String {
    format!("{prefix}nodes/")
}

/// The service configuration of one store revision.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Desired {
    /// The highest mod revision under `config/` (0: nothing configured yet).
    pub revision: i64,
    /// The VIPs, in key order, each with the key it came from.
    pub vips: Vec<(String, Vip)>,
    /// Every key read under `config/` with its mod revision: a writer's transaction compares
    /// them all.
    pub read: Vec<(String, i64)>,
}

/// What the leader publishes: the weights every node builds its tables from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Published {
    pub leader: String,
    /// The configuration revision these weights were computed for.
    pub config_revision: i64,
    /// Every VIP as the leader's datapath has it: health and learned weights folded into the
    /// backends' weights.
    pub vips: Vec<Vip>,
    /// The backends the leader's probes find down: every node sets their DOWN flag, so that
    /// their established flows move on every node, not only on the leader.
    #[serde(default)]
    pub down: Vec<DownBackend>,
}

/// A backend published down: its VIP (as `lbctl` names it) and address.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DownBackend {
    pub vip: String,
    pub backend: std::net::IpAddr,
}

/// What each node writes to `nodes/<node>` (on its lease: it vanishes with the node).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeReport {
    pub node: String,
    pub role: String,
    pub applied_revision: i64,
    pub applied_weights_revision: i64,
    /// Why the newest revision is not applied, if so.
    pub last_error: Option<String>,
    pub vips: usize,
    /// The node's BGP side as `lbctl status` shows it (`status.bgp`: serving or drained,
    /// sessions, announced and withheld prefixes), without the drain's countdown so that the
    /// report is rewritten only when something changes; null without `[bgp]`.
    pub bgp: Option<BgpStatus>,
}

/// Reads the configuration keys of one range answer (keys outside `config/` are ignored).
/// Refused whole on the first bad key, naming it and the fix.
pub fn decode(prefix: &str, kvs: &[Kv]) -> Result<Desired> {
    let cfg_prefix = config_prefix(prefix);
    let vips_prefix = vips_prefix(prefix);
    let mut out = Desired::default();
    for kv in kvs.iter().filter(|kv| kv.key.starts_with(&cfg_prefix)) {
        out.revision = out.revision.max(kv.mod_revision);
        out.read.push((kv.key.clone(), kv.mod_revision));
        if kv.key == version_key(prefix) {
            continue;
        }
        let Some(name) = kv.key.strip_prefix(&vips_prefix) else {
            bail!(
                "etcd key {}: not a key lb knows under {cfg_prefix} (VIPs go under {vips_prefix}<vip>); delete it (etcdctl del {})",
                kv.key, kv.key
            );
        };
        let vip: Vip = serde_json::from_slice(&kv.value).map_err(|e| {
            anyhow!(
                "etcd key {}: {e}; the value must be one VIP as JSON, as `lbctl --etcd URL --prefix P vip add` writes it (see README, Fleet); fix it or delete the key",
                kv.key
            )
        })?;
        let own = VipName::of(&vip).to_string();
        if name != own {
            bail!(
                "etcd key {}: holds vip {own}; a VIP must be stored under its own name ({vips_prefix}{own}); move it there",
                kv.key
            );
        }
        out.vips.push((kv.key.clone(), vip));
    }
    Ok(out)
}

/// `local` with the store's VIPs, validated as lbd validates its file: each VIP first (the
/// error names its key), then the whole (limits shared by every VIP, named by the prefix).
pub fn with_vips(local: &Config, prefix: &str, vips: &[(String, Vip)]) -> Result<Config> {
    for (key, vip) in vips {
        let mut one = local.clone();
        one.vips = vec![vip.clone()];
        one.validate()
            .map_err(|e| anyhow!("etcd key {key}: {e}; fix the VIP there"))?;
    }
    let mut all = local.clone();
    all.vips = vips.iter().map(|(_, v)| v.clone()).collect();
    all.validate().map_err(|e| {
        anyhow!(
            "etcd prefix {}: {e}; fix the VIPs there",
            config_prefix(prefix)
        )
    })?;
    Ok(all)
}

/// The node settings `lbctl --etcd` validates a change with (each node validates again with
/// its own when it applies the revision, and refuses it whole if they do not fit).
fn template() -> Config {
    Config::parse(
        "interface = \"fleet\"\n[encap]\nsource_v4 = \"192.0.2.1\"\nsource_v6 = \"2001:db8::1\"\n",
    )
    .expect("the template parses")
}

/// `lbctl --etcd URL --prefix P <change>`: reads the configuration, applies the request with
/// the same edit and validation as lbd, and writes the VIPs it changed in one transaction
/// that holds only if no key read changed since; retried (read again, edit again) a few
/// times when another writer came first.
pub async fn write(etcd: &Etcd, prefix: &str, req: &Request) -> Result<Changed> {
    const ATTEMPTS: usize = 5;
    for _ in 0..ATTEMPTS {
        let (_, kvs) = etcd.range_prefix(&config_prefix(prefix)).await?;
        let desired = decode(prefix, &kvs)?;
        let prev = with_vips(&template(), prefix, &desired.vips)?;
        let mut next = prev.clone();
        let message = crate::agent::fleet_edit(&mut next, req)?;
        if next == prev {
            return Ok(Changed {
                message: format!("{message} (already so: nothing changed)"),
                changed: false,
                tables: Vec::new(),
            });
        }
        let ops = changes(prefix, &desired, &next.vips, &message)?;
        let mut compare = desired.read.clone();
        for op in &ops {
            if let Op::Put { key, .. } = op {
                if !compare.iter().any(|(k, _)| k == key) {
                    compare.push((key.clone(), 0));
                }
            }
        }
        if let Some(rev) = etcd.txn_if_mod(&compare, &ops).await? {
            return Ok(Changed {
                message: format!("{message} (etcd revision {rev}; every node applies it)"),
                changed: true,
                tables: Vec::new(),
            });
        }
    }
    bail!("the fleet configuration under {prefix} kept changing while this change was prepared ({ATTEMPTS} attempts); nothing written. Retry")
}

/// The puts and deletes that turn `desired` into `next`, and the version bump.
fn changes(prefix: &str, desired: &Desired, next: &[Vip], message: &str) -> Result<Vec<Op>> {
    let mut ops = Vec::new();
    let vips = vips_prefix(prefix);
    for v in next {
        let key = format!("{vips}{}", VipName::of(v));
        if desired.vips.iter().any(|(k, old)| *k == key && old == v) {
            continue;
        }
        ops.push(Op::Put {
            key,
            value: serde_json::to_vec(v)?,
            lease: 0,
        });
    }
    for (key, old) in &desired.vips {
        if !next.iter().any(|v| VipName::of(v) == VipName::of(old)) {
            ops.push(Op::Delete { key: key.clone() });
        }
    }
    ops.push(Op::Put {
        key: version_key(prefix),
        value: message.as_bytes().to_vec(),
        lease: 0,
    });
    Ok(ops)
}

/// `lbctl cluster status`: what the store says of the fleet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub prefix: String,
    /// The configuration's revision (highest mod revision under `config/`).
    pub config_revision: i64,
    /// The configuration revision the leader's published weights are for, if any.
    pub weights_config_revision: Option<i64>,
    pub leader: Option<String>,
    /// Every node whose lease is alive, by name.
    pub nodes: Vec<NodeReport>,
    /// Why the store's configuration cannot be read, if it cannot (bad data).
    pub config_error: Option<String>,
}

pub async fn cluster_status(etcd: &Etcd, prefix: &str) -> Result<ClusterStatus> {
    let (_, kvs) = etcd.range_prefix(prefix).await?;
    let desired = decode(prefix, &kvs);
    let find = |k: &str| kvs.iter().find(|kv| kv.key == k);
    let weights: Option<Published> =
        find(&weights_key(prefix)).and_then(|kv| serde_json::from_slice(&kv.value).ok());
    let nodes_prefix = nodes_prefix(prefix);
    Ok(ClusterStatus {
        prefix: prefix.to_string(),
        config_revision: kvs
            .iter()
            .filter(|kv| kv.key.starts_with(&config_prefix(prefix)))
            .map(|kv| kv.mod_revision)
            .max()
            .unwrap_or(0),
        weights_config_revision: weights.map(|w| w.config_revision),
        leader: find(&leader_key(prefix)).map(|kv| String::from_utf8_lossy(&kv.value).to_string()),
        nodes: kvs
            .iter()
            .filter(|kv| kv.key.starts_with(&nodes_prefix))
            .filter_map(|kv| serde_json::from_slice(&kv.value).ok())
            .collect(),
        config_error: desired.err().map(|e| format!("{e:#}")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(key: &str, value: &str, rev: i64) -> Kv {
        Kv {
            key: key.into(),
            value: value.as_bytes().to_vec(),
            mod_revision: rev,
            create_revision: rev,
            lease: 0,
        }
    }

    #[test]
    fn bad_data_is_refused_naming_the_key_and_the_fix() {
        let p = "/lb/";
        let good = r#"{"address":"10.0.0.100","port":80,"protocol":"tcp","backend":[{"address":"10.1.0.1"}]}"#;
        let d = decode(p, &[kv("/lb/config/vips/10.0.0.100:80/tcp", good, 7)]).unwrap();
        assert_eq!(d.revision, 7);
        with_vips(&template(), p, &d.vips).unwrap();

        let e = decode(p, &[kv("/lb/config/vips/10.0.0.100:80/tcp", "{", 7)]).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("etcd key /lb/config/vips/10.0.0.100:80/tcp: "),
            "{e}"
        );
        let e = decode(p, &[kv("/lb/config/vips/10.0.0.1:80/tcp", good, 7)]).unwrap_err();
        assert!(e.to_string().contains("stored under its own name"), "{e}");
        let e = decode(p, &[kv("/lb/config/other", good, 7)]).unwrap_err();
        assert!(
            e.to_string().contains("etcdctl del /lb/config/other"),
            "{e}"
        );

        let bad = good.replace("10.1.0.1\"}", "10.1.0.1\",\"weight\":10001}");
        let d = decode(p, &[kv("/lb/config/vips/10.0.0.100:80/tcp", &bad, 7)]).unwrap();
        let e = with_vips(&template(), p, &d.vips).unwrap_err().to_string();
        assert!(
            e.starts_with("etcd key /lb/config/vips/10.0.0.100:80/tcp: vip[0]"),
            "{e}"
        );
        assert!(e.contains("out of range"), "{e}");
        assert!(normalize_prefix("lb").is_err());
        assert_eq!(normalize_prefix("/lb//").unwrap(), "/lb/");
    }
}
