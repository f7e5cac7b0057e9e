//! A real etcd (Debian's etcd-server) for fleet tests: one member in a namespace the test
//! created, listening only on the address given (client port 2379, peer port 2380), its data
//! in a scratch directory. [`EtcdServer::kill`] and [`EtcdServer::restart`] take it away and
//! bring it back with its data (an outage); Drop kills it and removes the data.
//!
//! Also the fleet's view as tests read it: `etcdctl` in the namespace ([`EtcdServer::put`],
//! [`EtcdServer::get`]), and [`pinned_tables`], a node's Maglev tables from its pinned maps.
use crate::netns::NetNs;
use crate::procs::bin_path;
use anyhow::{bail, Context as _, Result};
use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

/// How long etcd may take to answer after (re)start.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

pub struct EtcdServer {
    child: Option<Child>,
    ns_name: String,
    addr: IpAddr,
    dir: PathBuf,
    /// `http://ADDR:2379`.
    pub url: String,
}

fn host(addr: IpAddr) -> String {
    match addr {
        IpAddr::V4(a) => a.to_string(),
        IpAddr::V6(a) => format!("[{a}]"),
    }
}

impl EtcdServer {
    /// Starts etcd in `ns` on `addr` and waits until it answers.
    pub fn start(ns: &NetNs, addr: IpAddr) -> Result<EtcdServer> {
        let dir = std::env::temp_dir().join(format!("{}-etcd", ns.name()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let mut server = EtcdServer {
            child: None,
            ns_name: ns.name().to_string(),
            addr,
            url: format!("http://{}:2379", host(addr)),
            dir,
        };
        server.spawn()?;
        Ok(server)
    }

    fn ns_command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns_name, program]);
        c
    }

    fn spawn(&mut self) -> Result<()> {
        let h = host(self.addr);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("etcd.log"))?;
        let child = self
            .ns_command("etcd")
            .args([
                "--name",
                "store",
                "--data-dir",
                &self.dir.join("data").display().to_string(),
                "--listen-client-urls",
                &self.url,
                "--advertise-client-urls",
                &self.url,
                "--listen-peer-urls",
                &format!("http://{h}:2380"),
                "--initial-advertise-peer-urls",
                &format!("http://{h}:2380"),
                "--initial-cluster",
                &format!("store=http://{h}:2380"),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting etcd (is etcd-server installed? cargo xtask setup)")?;
        self.child = Some(child);
        let mut last = String::new();
        let ok = (0..(READY_TIMEOUT.as_millis() / 100)).any(|_| {
            std::thread::sleep(Duration::from_millis(100));
            match self.etcdctl(&["endpoint", "health"]) {
                Ok(_) => true,
                Err(e) => {
                    last = format!("{e:#}");
                    false
                }
            }
        });
        if !ok {
            bail!(
                "etcd did not become healthy within {READY_TIMEOUT:?}: {last}\n{}",
                self.log()
            );
        }
        Ok(())
    }

    /// etcd's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("etcd.log")).unwrap_or_default()
    }

    /// SIGKILLs etcd (its data stays for [`EtcdServer::restart`]).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts etcd again on its data and waits until it answers.
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        self.spawn()
    }

    /// `etcdctl --endpoints URL ARGS...` in the namespace; its stdout, or the error with stderr.
    pub fn etcdctl(&self, args: &[&str]) -> Result<String> {
        let out = self
            .ns_command("etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &self.url, "--command-timeout=2s"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("running etcdctl (is etcd-client installed? cargo xtask setup)")?;
        if !out.status.success() {
            bail!(
                "etcdctl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).to_string())
    }

    pub fn put(&self, key: &str, value: &str) -> Result<()> {
        self.etcdctl(&["put", key, value]).map(|_| ())
    }

    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Result<Option<String>> {
        let out = self.etcdctl(&["get", "--print-value-only", key])?;
        Ok((!out.is_empty()).then(|| out.trim_end_matches('\n').to_string()))
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `lbctl --etcd URL --prefix PREFIX ARGS...` run in `ns` (where the store is reachable).
pub fn lbctl_fleet(ns: &NetNs, url: &str, prefix: &str, args: &[&str]) -> std::process::Output {
    ns.command(bin_path("lbctl"))
        .args(["--etcd", url, "--prefix", prefix])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running lbctl")
}

/// Like [`lbctl_fleet`], asserted to succeed; its stdout.
pub fn lbctl_fleet_ok(ns: &NetNs, url: &str, prefix: &str, args: &[&str]) -> String {
    let out = lbctl_fleet(ns, url, prefix, args);
    assert!(
        out.status.success(),
        "lbctl --etcd {url} --prefix {prefix} {}: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Whether a node's `lbctl status` `fleet` section shows store revision `rev` applied: store
/// connected, no error, and (a follower) the leader's weights for it.
pub fn fleet_applied(f: &serde_json::Value, rev: i64) -> bool {
    f["store_connected"] == true
        && f["applied_revision"].as_i64() == Some(rev)
        && f["last_error"].is_null()
        && (f["role"] == "leader" || f["applied_weights_revision"].as_i64() > Some(0))
}

/// Asserts that every node's tables ([`pinned_tables`]) equal the first's, slot for slot (by
/// the backend address each slot leads to); `tables` names each node. Returns the first's.
pub fn assert_same_tables(
    tables: Vec<(String, BTreeMap<String, Vec<IpAddr>>)>,
) -> BTreeMap<String, Vec<IpAddr>> {
    let mut it = tables.into_iter();
    let (first_name, first) = it.next().expect("at least one node");
    for (name, t) in it {
        assert_eq!(
            t.keys().collect::<Vec<_>>(),
            first.keys().collect::<Vec<_>>(),
            "{name}'s VIPs and {first_name}'s"
        );
        for (vip, slots) in &first {
            let differ = slots.iter().zip(&t[vip]).filter(|(a, b)| a != b).count();
            assert_eq!(
                differ, 0,
                "{name}'s table of {vip} differs from {first_name}'s in {differ} slots"
            );
        }
    }
    first
}

/// Every VIP's Maglev table as a node's kernel reads it, from its pinned maps: per VIP (as
/// "address:port/protocol-number"), the backend address of each slot of the published RING
/// region, in slot order. Backend ids may differ between nodes (they follow each node's
/// history); the addresses they lead to are what a flow sees.
pub fn pinned_tables(pin_dir: &Path) -> BTreeMap<String, Vec<IpAddr>> {
    use aya::maps::{Array, HashMap as BpfHashMap, Map, MapData};
    use lb_common::{BackendInfo, VipKey, VipMeta};
    let open = |name: &str| {
        let data = MapData::from_pin(pin_dir.join(name))
            .unwrap_or_else(|e| panic!("opening pinned {name} in {}: {e}", pin_dir.display()));
        Map::from_map_data(data).unwrap()
    };
    let vips: BpfHashMap<MapData, VipKey, VipMeta> = BpfHashMap::try_from(open("VIPS")).unwrap();
    let ring: Array<MapData, u32> = Array::try_from(open("RING")).unwrap();
    let backends: Array<MapData, BackendInfo> = Array::try_from(open("BACKENDS")).unwrap();
    let mut out = BTreeMap::new();
    for entry in vips.iter() {
        let (key, meta) = entry.unwrap();
        let mut addr_of: BTreeMap<u32, IpAddr> = BTreeMap::new();
        let slots = (0..meta.ring_size)
            .map(|i| {
                let id = ring.get(&(meta.ring_offset + i), 0).unwrap();
                *addr_of.entry(id).or_insert_with(|| {
                    let b = backends.get(&id, 0).unwrap();
                    backend_addr(&b)
                })
            })
            .collect();
        out.insert(format!("{key:?}"), slots);
    }
    out
}

fn backend_addr(b: &lb_common::BackendInfo) -> IpAddr {
    let a = b.addr;
    if b.family == lb_common::FAMILY_V4 {
        IpAddr::from([a[0], a[1], a[2], a[3]])
    } else {
        IpAddr::from(a)
    }
}

/// Slots per backend address in a table (from [`pinned_tables`]).
pub fn shares(slots: &[IpAddr]) -> BTreeMap<IpAddr, usize> {
    let mut m = BTreeMap::new();
    for a in slots {
        *m.entry(*a).or_default() += 1;
    }
    m
}

/// The IPv4 VIP's table among a node's tables (from [`pinned_tables`]).
pub fn v4_table(tables: &BTreeMap<String, Vec<IpAddr>>) -> &Vec<IpAddr> {
    tables
        .values()
        .find(|t| t.first().is_some_and(IpAddr::is_ipv4))
        .expect("the IPv4 VIP's table")
}
