//! One fleet node's loop: read the prefix, keep the node's lease, take part in the election,
//! apply the revision (as leader: the configuration, its own health and learning on top; as
//! follower: the leader's published weights), publish the weights when leader, report to
//! `nodes/<node>`; then wait on a watch of the prefix (at most a second) and do it again.
//! A failed read changes nothing in the datapath: the node keeps forwarding on the revision
//! it applied last, says so, and catches up on the first read that works.
use super::{
    etcd::{Etcd, Kv, Op},
    store::{self, Desired, DownBackend, NodeReport, Published},
};
use crate::{
    agent::{Agent, FleetTable},
    config::Vip,
    control::{events::Kind, FleetStatus, VipName},
};
use anyhow::Result;
use std::{
    sync::{
        atomic::{AtomicI64, Ordering},
        Arc,
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};
use tracing::{error, info, warn};

/// The node's lease: a leader that stops renewing it loses the election key this long after.
pub const LEASE_TTL_S: i64 = 3;
/// How long a follower's loop waits on the watch before reading again anyway (lease
/// renewal); a leader's waits less, since its health results and learned weights change
/// without a store event and are published on its next round.
const WATCH_WAIT: Duration = Duration::from_millis(1000);
const LEADER_WATCH_WAIT: Duration = Duration::from_millis(200);

/// What a node is started with.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    pub etcd: Etcd,
    /// The endpoints as given (for messages).
    pub endpoints: String,
    /// Normalized ([`store::normalize_prefix`]).
    pub prefix: String,
    pub node: String,
    /// The node's lease id once granted (0 before): a clean stop revokes it ([`leave`]).
    pub lease: Arc<AtomicI64>,
}

impl NodeOptions {
    /// The status before the first read of the store.
    pub fn initial_status(&self) -> FleetStatus {
        FleetStatus {
            node: self.node.clone(),
            etcd: self.endpoints.clone(),
            prefix: self.prefix.clone(),
            role: "follower".into(),
            ..FleetStatus::default()
        }
    }
}

/// On a clean stop: revokes the node's lease, so that its report and, if it leads, the
/// election key go at once instead of when the lease expires (another node leads within a
/// round instead of within the lease).
pub async fn leave(opts: &NodeOptions) {
    let id = opts.lease.load(Ordering::Relaxed);
    if id == 0 {
        return;
    }
    match opts.etcd.lease_revoke(id).await {
        Ok(()) => info!("fleet: left the fleet (lease revoked)"),
        Err(e) => {
            warn!("fleet: revoking the lease on stop: {e:#}; it expires within {LEASE_TTL_S} s")
        }
    }
}

/// What was tried last: a revision is applied once, not on every loop.
#[derive(Debug, Clone, PartialEq)]
struct Tried {
    read: Vec<(String, i64)>,
    weights_revision: i64,
    leader: bool,
}

struct Node {
    opts: NodeOptions,
    agent: Arc<Agent>,
    status: FleetStatus,
    lease: Option<i64>,
    renewed: Option<Instant>,
    tried: Option<Tried>,
}

/// Runs the node until the process ends.
pub async fn run(agent: Arc<Agent>, opts: NodeOptions) {
    let mut node = Node {
        status: opts.initial_status(),
        opts,
        agent,
        lease: None,
        renewed: None,
        tried: None,
    };
    node.agent.set_fleet_status(node.status.clone());
    loop {
        let read = node.step().await;
        node.agent.set_fleet_status(node.status.clone());
        match read {
            Some(rev) => {
                let wait = if node.status.role == "leader" {
                    LEADER_WATCH_WAIT
                } else {
                    WATCH_WAIT
                };
                let _ = node
                    .opts
                    .etcd
                    .watch_prefix(&node.opts.prefix, rev + 1, wait)
                    .await;
            }
            None => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

/// The VIPs to build at first start, before the agent exists: the store's (as a follower
/// would apply them), or None if the store cannot be read or holds bad data (then the file's
/// VIPs are served until it can).
pub async fn initial_vips(opts: &NodeOptions, local: &crate::Config) -> Option<Vec<Vip>> {
    let (_, kvs) = match opts.etcd.range_prefix(&opts.prefix).await {
        Ok(r) => r,
        Err(e) => {
            warn!("fleet: {e:#}; starting with the configuration file's VIPs until etcd answers");
            return None;
        }
    };
    let desired = store::decode(&opts.prefix, &kvs).ok()?;
    let vips = follower_vips(&desired, published(&opts.prefix, &kvs).as_ref());
    store::with_vips(local, &opts.prefix, &vips)
        .ok()
        .map(|c| c.vips)
}

fn find<'a>(kvs: &'a [Kv], key: &str) -> Option<&'a Kv> {
    kvs.iter().find(|kv| kv.key == key)
}

fn published(prefix: &str, kvs: &[Kv]) -> Option<(i64, Published)> {
    let kv = find(kvs, &store::weights_key(prefix))?;
    serde_json::from_slice(&kv.value)
        .ok()
        .map(|p| (kv.mod_revision, p))
}

/// A follower's VIPs: the leader's weights when they were computed for this configuration
/// revision, else the configured weights; without health checks or learning (the leader's).
fn follower_vips(desired: &Desired, published: Option<&(i64, Published)>) -> Vec<(String, Vip)> {
    let strip = |mut v: Vip| {
        v.health = None;
        v.learning = None;
        v
    };
    match published {
        Some((_, p)) if p.config_revision == desired.revision => {
            let keyed: Vec<(String, Vip)> = desired
                .vips
                .iter()
                .map(|(key, d)| {
                    let v = p
                        .vips
                        .iter()
                        .find(|v| VipName::of(v) == VipName::of(d))
                        .unwrap_or(d);
                    (key.clone(), strip(v.clone()))
                })
                .collect();
            keyed
        }
        _ => desired
            .vips
            .iter()
            .map(|(k, v)| (k.clone(), strip(v.clone())))
            .collect(),
    }
}

/// The backends the last published weights (the previous leader's health results) give no
/// weight although configured with some and not drained: down when they were published.
fn published_down(
    desired: &Desired,
    published: Option<&(i64, Published)>,
) -> Vec<(VipName, std::net::IpAddr)> {
    let Some((_, p)) = published else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (_, d) in &desired.vips {
        let Some(pv) = p.vips.iter().find(|v| VipName::of(v) == VipName::of(d)) else {
            continue;
        };
        for b in d.backends.iter().filter(|b| b.weight > 0 && !b.drained) {
            if pv
                .backends
                .iter()
                .any(|pb| pb.address == b.address && pb.weight == 0)
            {
                out.push((VipName::of(d), b.address));
            }
        }
    }
    out
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Node {
    /// One round; the store revision read, None when the store could not be read.
    async fn step(&mut self) -> Option<i64> {
        let prefix = self.opts.prefix.clone();
        let (rev, kvs) = match self.opts.etcd.range_prefix(&prefix).await {
            Ok(r) => r,
            Err(e) => {
                self.lost(&format!("{e:#}"));
                return None;
            }
        };
        if !self.status.store_connected {
            self.back();
        }
        self.status.last_contact_unix = now_unix();
        if let Err(e) = self.keep_lease().await {
            self.lost(&format!("{e:#}"));
            return None;
        }
        self.elect(&kvs).await;
        self.apply(&kvs).await;
        if self.status.role == "leader" {
            if let Err(e) = self.publish(&kvs).await {
                warn!("fleet: publishing the weights: {e:#}");
            }
        }
        if let Err(e) = self.report(&kvs).await {
            warn!("fleet: writing this node's report: {e:#}");
        }
        Some(rev)
    }

    fn lost(&mut self, why: &str) {
        if self.status.store_connected || self.status.last_contact_unix == 0 {
            let msg = format!(
                "etcd unreachable: {why}; forwarding goes on with the configuration of revision {} until it answers",
                self.status.applied_revision
            );
            warn!("fleet: {msg}");
            self.agent.events().record(Kind::FleetStoreLost, msg);
        }
        self.status.store_connected = false;
        self.status.last_error = Some(why.to_string());
        // Unrenewed, the lease ends: this node is no longer the leader by then.
        if self
            .renewed
            .is_none_or(|t| t.elapsed() > Duration::from_secs(LEASE_TTL_S as u64))
        {
            self.set_leader(false);
        }
    }

    fn back(&mut self) {
        let msg = format!(
            "etcd reachable again ({}): catching up from revision {}",
            self.opts.endpoints, self.status.applied_revision
        );
        info!("fleet: {msg}");
        self.agent.events().record(Kind::FleetStoreBack, msg);
        self.status.store_connected = true;
        self.status.last_error = None;
        // Apply whatever is there now, even if it was tried before.
        self.tried = None;
    }

    async fn keep_lease(&mut self) -> Result<()> {
        let etcd = self.opts.etcd.clone();
        if let Some(id) = self.lease {
            if self
                .renewed
                .is_some_and(|t| t.elapsed() < Duration::from_millis(900))
            {
                return Ok(());
            }
            if etcd.lease_keepalive(id).await? {
                self.renewed = Some(Instant::now());
                return Ok(());
            }
            warn!("fleet: this node's lease expired; taking a new one");
            self.set_leader(false);
        }
        let id = etcd.lease_grant(LEASE_TTL_S).await?;
        self.lease = Some(id);
        self.opts.lease.store(id, Ordering::Relaxed);
        self.renewed = Some(Instant::now());
        Ok(())
    }

    async fn elect(&mut self, kvs: &[Kv]) {
        let key = store::leader_key(&self.opts.prefix);
        let lease = self.lease.unwrap_or(0);
        match find(kvs, &key) {
            Some(kv) => {
                let holder = String::from_utf8_lossy(&kv.value).to_string();
                self.set_leader(holder == self.opts.node && kv.lease == lease);
                self.status.leader = Some(holder);
            }
            None => {
                let put = Op::Put {
                    key: key.clone(),
                    value: self.opts.node.as_bytes().to_vec(),
                    lease,
                };
                match self.opts.etcd.txn_if_absent(&key, &[put]).await {
                    Ok(Some(_)) => {
                        self.set_leader(true);
                        self.status.leader = Some(self.opts.node.clone());
                    }
                    Ok(None) => self.status.leader = None,
                    Err(e) => warn!("fleet: election: {e:#}"),
                }
            }
        }
    }

    fn set_leader(&mut self, leader: bool) {
        let was = self.status.role == "leader";
        if was == leader {
            return;
        }
        self.status.role = if leader { "leader" } else { "follower" }.into();
        let msg = if leader {
            format!("this node ({}) is the fleet's leader: it runs health checks and learning and publishes the weights every node applies", self.opts.node)
        } else {
            format!("this node ({}) is no longer the fleet's leader: it applies the weights the leader publishes", self.opts.node)
        };
        info!("fleet: {msg}");
        self.agent.events().record(Kind::FleetLeader, msg);
    }

    /// Applies the revision read, once per revision (and role, and leader's weights).
    async fn apply(&mut self, kvs: &[Kv]) {
        let prefix = &self.opts.prefix;
        let leader = self.status.role == "leader";
        let desired = store::decode(prefix, kvs);
        let weights = published(prefix, kvs);
        let tried = Tried {
            read: match &desired {
                Ok(d) => d.read.clone(),
                Err(_) => kvs
                    .iter()
                    .filter(|kv| kv.key.starts_with(&store::config_prefix(prefix)))
                    .map(|kv| (kv.key.clone(), kv.mod_revision))
                    .collect(),
            },
            weights_revision: weights.as_ref().map_or(0, |w| w.0),
            leader,
        };
        if self.tried.as_ref() == Some(&tried) {
            return;
        }
        self.tried = Some(tried);
        match self.try_apply(desired, weights.as_ref(), leader).await {
            Ok(()) => self.status.last_error = None,
            Err(e) => {
                let msg = format!(
                    "fleet revision refused whole, revision {} keeps serving: {e:#}",
                    self.status.applied_revision
                );
                error!("{msg}");
                self.agent.events().record(Kind::FleetRefused, msg.clone());
                self.status.last_error = Some(msg);
            }
        }
    }

    async fn try_apply(
        &mut self,
        desired: Result<Desired>,
        weights: Option<&(i64, Published)>,
        leader: bool,
    ) -> Result<()> {
        let desired = desired?;
        let vips = if leader {
            desired.vips.clone()
        } else {
            follower_vips(&desired, weights)
        };
        let local = self.agent.config().await;
        let cfg = store::with_vips(&local, &self.opts.prefix, &vips)?;
        // Every node, the leader too, builds its tables from the published weights once they
        // are for this revision: the leader's own health results reach its table through the
        // store, in the same revision as on every other node.
        let (weights_revision, table) = match weights {
            Some((rev, p)) if p.config_revision == desired.revision => {
                let built =
                    store::with_vips(&local, &self.opts.prefix, &follower_vips(&desired, weights))?;
                let down = p
                    .down
                    .iter()
                    .filter_map(|d| {
                        built
                            .vips
                            .iter()
                            .find(|v| VipName::of(v).to_string() == d.vip)
                            .map(|v| (VipName::of(v), d.backend))
                    })
                    .collect();
                (
                    *rev,
                    Some(FleetTable {
                        vips: built.vips,
                        down,
                    }),
                )
            }
            _ => (0, None),
        };
        let what = format!(
            "fleet revision {} ({}{})",
            desired.revision,
            if leader { "leader" } else { "follower" },
            if weights_revision > 0 {
                format!(", the leader's weights of revision {weights_revision}")
            } else {
                String::new()
            }
        );
        let known_down = if leader {
            published_down(&desired, weights)
        } else {
            Vec::new()
        };
        let report = self
            .agent
            .apply_fleet(cfg.vips, &what, &known_down, table)
            .await?;
        if !report.tables.is_empty() || desired.revision != self.status.applied_revision {
            self.agent.events().record(
                Kind::FleetApplied,
                format!("{what}: applied, {} tables changed", report.tables.len()),
            );
        }
        self.status.applied_revision = desired.revision;
        self.status.applied_weights_revision = weights_revision;
        Ok(())
    }

    /// The leader's weights for the configuration it applied, written when they differ from
    /// what the store holds, only while this node still holds the election key.
    async fn publish(&mut self, kvs: &[Kv]) -> Result<()> {
        let prefix = &self.opts.prefix;
        let Some(leader_kv) = find(kvs, &store::leader_key(prefix)) else {
            return Ok(());
        };
        let (vips, down) = self.agent.effective_vips().await;
        let mine = Published {
            leader: self.opts.node.clone(),
            config_revision: self.status.applied_revision,
            vips,
            down: down
                .into_iter()
                .map(|(vip, backend)| DownBackend {
                    vip: vip.to_string(),
                    backend,
                })
                .collect(),
        };
        if published(prefix, kvs).is_some_and(|(_, p)| p == mine) {
            return Ok(());
        }
        let put = Op::Put {
            key: store::weights_key(prefix),
            value: serde_json::to_vec(&mine)?,
            lease: 0,
        };
        let compare = [(leader_kv.key.clone(), leader_kv.mod_revision)];
        if self.opts.etcd.txn_if_mod(&compare, &[put]).await?.is_some() {
            info!(
                config_revision = mine.config_revision,
                "fleet: published the effective weights"
            );
        }
        Ok(())
    }

    /// This node's report under `nodes/<node>`, on its lease, rewritten when it changes.
    async fn report(&mut self, kvs: &[Kv]) -> Result<()> {
        let key = format!(
            "{}{}",
            store::nodes_prefix(&self.opts.prefix),
            self.opts.node
        );
        let mine = NodeReport {
            node: self.opts.node.clone(),
            role: self.status.role.clone(),
            applied_revision: self.status.applied_revision,
            applied_weights_revision: self.status.applied_weights_revision,
            last_error: self.status.last_error.clone(),
            vips: self.agent.config().await.vips.len(),
            bgp: self.agent.node_status().await.map(|mut b| {
                b.drain_remaining_seconds = None;
                b
            }),
        };
        let lease = self.lease.unwrap_or(0);
        let current = find(kvs, &key);
        if current.is_some_and(|kv| {
            kv.lease == lease
                && serde_json::from_slice::<NodeReport>(&kv.value).ok() == Some(mine.clone())
        }) {
            return Ok(());
        }
        let put = Op::Put {
            key: key.clone(),
            value: serde_json::to_vec(&mine)?,
            lease,
        };
        self.opts.etcd.txn_if_mod(&[], &[put]).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vip(weights: &[u32]) -> Vip {
        let mut text = String::from(
            "interface = \"eth0\"\n[encap]\nsource_v4 = \"10.0.0.2\"\n[[vip]]\naddress = \"10.0.0.100\"\nport = 80\nprotocol = \"tcp\"\n[vip.health]\n",
        );
        for (i, w) in weights.iter().enumerate() {
            text.push_str(&format!(
                "[[vip.backend]]\naddress = \"10.0.1.{}\"\nweight = {w}\n",
                i + 1
            ));
        }
        crate::Config::parse(&text).unwrap().vips.remove(0)
    }

    #[test]
    fn followers_take_the_leaders_weights_only_for_the_same_revision() {
        let key = "/lb/config/vips/10.0.0.100:80/tcp".to_string();
        let desired = Desired {
            revision: 7,
            vips: vec![(key.clone(), vip(&[2, 2, 2]))],
            read: vec![(key.clone(), 7)],
        };
        let weights = |v: &[(String, Vip)]| -> Vec<u32> {
            v[0].1.backends.iter().map(|b| b.weight).collect()
        };
        // No leader yet: the configured weights, without health checks of their own.
        let out = follower_vips(&desired, None);
        assert_eq!(weights(&out), [2, 2, 2]);
        assert!(out[0].1.health.is_none() && out[0].1.learning.is_none());
        // The leader's weights for this revision (a backend down: 0).
        let p = Published {
            leader: "n0".into(),
            config_revision: 7,
            vips: vec![vip(&[2, 0, 2])],
            down: Vec::new(),
        };
        let out = follower_vips(&desired, Some(&(9, p.clone())));
        assert_eq!(weights(&out), [2, 0, 2]);
        assert_eq!(out[0].0, key);
        assert!(out[0].1.health.is_none());
        // Weights computed for another revision are not applied to this one.
        let stale = Published {
            config_revision: 6,
            ..p
        };
        assert_eq!(
            weights(&follower_vips(&desired, Some(&(9, stale)))),
            [2, 2, 2]
        );
    }

    #[test]
    fn a_new_leader_takes_the_published_down_backends() {
        let key = "/lb/config/vips/10.0.0.100:80/tcp".to_string();
        let desired = Desired {
            revision: 7,
            vips: vec![(key.clone(), vip(&[2, 2, 2]))],
            read: vec![(key, 7)],
        };
        assert!(published_down(&desired, None).is_empty());
        let p = Published {
            leader: "n0".into(),
            config_revision: 6,
            vips: vec![vip(&[2, 0, 1])],
            down: Vec::new(),
        };
        let down = published_down(&desired, Some(&(9, p)));
        let addrs: Vec<String> = down.iter().map(|(_, a)| a.to_string()).collect();
        // Down only where the published weight is 0 (a slow start is not down).
        assert_eq!(addrs, ["10.0.1.2"]);
    }
}
