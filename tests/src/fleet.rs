//! The fleet topology: a client, a router running BIRD 2 with ECMP over the lbd nodes that
//! peer with it by BGP, the nodes, and backends reached by IP-in-IP (each running `lbd decap`).
//!
//! ```text
//!  client ── router (BIRD 2: multipath, L4 hash) ── fabric bridge ─┬─ node0..nodeN-1 (lbd + BIRD)
//!                                                                 └─ backend0..M-1 (lbd decap)
//! ```
//!
//! Every node gets the same service configuration (VIPs, backends, weights), so their Maglev
//! tables agree; only node-local keys differ (encap source, router id). With a store
//! ([`Fleet::with_store`]), a real etcd runs on the fabric (`store` namespace), the nodes run
//! `lbd --etcd URL --prefix P --node nI` with only node-local keys in their files, and the
//! service configuration is written once to etcd with `lbctl --etcd`. Nodes are created
//! up front and started with [`Fleet::start_node`], so a test can add one later. Backends
//! answer the client directly through the router (direct server return). Namespaces, BIRD,
//! etcd and lbd processes, pinned maps and scratch files go on drop, on success, failure and
//! panic.
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::etcd::{fleet_applied, pinned_tables, EtcdServer};
use crate::lab::{hold_vips, plug, BRIDGE, EARLY_SYSCTLS};
use crate::netns::{unique_prefix, NetNs, Veth};
use crate::procs::{bin_path, poll_until, start_decap, Lbd, LbdOptions};
use crate::tcp::TcpServer;

pub const VIP_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
pub const VIP_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 0x10);
pub const PORT: u16 = 8080;
pub const ROUTER_AS: u32 = 65000;
pub const NODE_AS: u32 = 65001;
/// The VIPs' table size with a store: small enough that a test reads every slot of every
/// node's tables from the pins many times a second (about 340 slots per backend).
const STORE_TABLE_SIZE: &str = "1021";
const FABRIC_MTU: u32 = 1500;
/// Room for the IP-in-IP header on the fabric.
const CLIENT_MTU: u32 = 1400;

pub fn router_v4() -> Ipv4Addr {
    Ipv4Addr::new(10, 80, 0, 1)
}
pub fn router_v6() -> Ipv6Addr {
    Ipv6Addr::new(0xfd80, 0, 0, 0, 0, 0, 0, 1)
}
pub fn node_v4(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 80, 0, 11 + i as u8)
}
pub fn node_v6(i: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd80, 0, 0, 0, 0, 0, 0, 0x11 + i as u16)
}
pub fn backend_v4(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 80, 0, 21 + i as u8)
}
pub fn backend_v6(i: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd80, 0, 0, 0, 0, 0, 0, 0x21 + i as u16)
}
pub fn store_v4() -> Ipv4Addr {
    Ipv4Addr::new(10, 80, 0, 5)
}
pub fn store_v6() -> Ipv6Addr {
    Ipv6Addr::new(0xfd80, 0, 0, 0, 0, 0, 0, 5)
}
pub fn client_v4() -> Ipv4Addr {
    Ipv4Addr::new(10, 81, 0, 2)
}

/// A node's address of the family of `vip`.
pub fn node_addr(i: usize, vip: IpAddr) -> IpAddr {
    if vip.is_ipv4() {
        node_v4(i).into()
    } else {
        node_v6(i).into()
    }
}

/// One lbd node: its namespace, files and (once started) its lbd.
pub struct FleetNode {
    pub ns: NetNs,
    pub index: usize,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub pin_dir: PathBuf,
    pub lbd: Option<Lbd>,
    /// The switch port's XDP_PASS (XDP_TX from the node needs one on its veth peer).
    _port_xdp: OwnedFd,
}

/// A running fleet; see the module docs.
pub struct Fleet {
    pub prefix: String,
    /// Where `lbd` and `lbctl` are.
    pub bin_dir: PathBuf,
    pub dir: PathBuf,
    pub weights: Vec<u32>,
    /// Keep `dir` (configs, logs) after drop, as the lab does; tests remove it on success.
    pub keep_dir: bool,
    // Dropped in this order: nodes (lbds and their BIRDs) first, then servers, then the rest.
    pub nodes: Vec<FleetNode>,
    /// The fleet's etcd (with [`Fleet::with_store`]), killed before its namespace goes.
    pub etcd: Option<EtcdServer>,
    /// The key prefix of the fleet's configuration in etcd.
    pub etcd_prefix: String,
    pub servers: Vec<Option<TcpServer>>,
    pub backends: Vec<NetNs>,
    pub router: NetNs,
    pub client: NetNs,
    pub switch: NetNs,
    store_ns: Option<NetNs>,
    router_bird: Option<Child>,
}

impl Fleet {
    /// Builds the topology with `nodes` node namespaces (none started) and one backend per
    /// weight, starts the router's BIRD, the backends' `lbd decap` and their TCP servers
    /// (named `backend0`, ...).
    pub fn new(nodes: usize, weights: &[u32]) -> Result<Fleet> {
        let lbd = bin_path("lbd");
        Fleet::with_bins(nodes, weights, lbd.parent().unwrap())
    }

    /// [`Fleet::new`] with the `lbd` and `lbctl` of `bin_dir` (the lab's release build).
    pub fn with_bins(nodes: usize, weights: &[u32], bin_dir: &Path) -> Result<Fleet> {
        Fleet::build(nodes, weights, bin_dir, false)
    }

    /// [`Fleet::new`] in fleet mode: a real etcd on the fabric holds the service
    /// configuration, written there once (`lbctl --etcd`); the nodes' files hold only their
    /// own settings.
    pub fn with_store(nodes: usize, weights: &[u32]) -> Result<Fleet> {
        let lbd = bin_path("lbd");
        Fleet::build(nodes, weights, lbd.parent().unwrap(), true)
    }

    /// [`Fleet::with_store`] with the `lbd` and `lbctl` of `bin_dir`.
    pub fn with_bins_and_store(nodes: usize, weights: &[u32], bin_dir: &Path) -> Result<Fleet> {
        Fleet::build(nodes, weights, bin_dir, true)
    }

    fn build(nodes: usize, weights: &[u32], bin_dir: &Path, store: bool) -> Result<Fleet> {
        assert!(nodes <= 9 && weights.len() <= 9);
        let prefix = unique_prefix();
        let dir = std::env::temp_dir().join(format!("{prefix}-fleet"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let switch = NetNs::with_name(format!("{prefix}-sw"))?;
        switch.ip([
            "link",
            "add",
            BRIDGE,
            "type",
            "bridge",
            "forward_delay",
            "0",
        ])?;
        switch.ip(["link", "set", BRIDGE, "up"])?;
        let router = NetNs::with_name(format!("{prefix}-rt"))?;
        let client = NetNs::with_name(format!("{prefix}-cl"))?;
        let mut fleet = Fleet {
            bin_dir: bin_dir.to_path_buf(),
            etcd_prefix: format!("/lbtest/{prefix}"),
            prefix,
            dir,
            weights: weights.to_vec(),
            keep_dir: false,
            nodes: Vec::new(),
            etcd: None,
            servers: Vec::new(),
            backends: Vec::new(),
            router,
            client,
            switch,
            store_ns: None,
            router_bird: None,
        };
        fleet.build_router_and_client()?;
        if store {
            fleet.start_store()?;
        }
        for i in 0..nodes {
            let node = fleet.add_node(i)?;
            fleet.nodes.push(node);
        }
        for i in 0..weights.len() {
            let b = fleet.add_backend(i)?;
            fleet.backends.push(b);
        }
        fleet.start_router_bird(nodes)?;
        if store {
            fleet.write_service_to_store()?;
        }
        Ok(fleet)
    }

    /// The store's namespace on the fabric, and etcd in it.
    fn start_store(&mut self) -> Result<()> {
        let ns = NetNs::with_name(format!("{}-st", self.prefix))?;
        self.plug(&ns, "st", store_v4(), store_v6())?;
        self.store_ns = Some(ns);
        let etcd = EtcdServer::start(self.store_ns.as_ref().unwrap(), store_v4().into())?;
        self.etcd = Some(etcd);
        Ok(())
    }

    /// The fleet's etcd; panics without a store.
    pub fn store(&self) -> &EtcdServer {
        self.etcd.as_ref().expect("a fleet with a store")
    }

    /// The service configuration ([`Fleet::service_config`]'s VIPs and backends), written
    /// once to the store as an operator would: `lbctl --etcd ... vip add`, `backend add`.
    fn write_service_to_store(&self) -> Result<()> {
        for vip in [IpAddr::from(VIP_V4), IpAddr::from(VIP_V6)] {
            let name = vip_name(vip);
            self.try_ctl_store(&["vip", "add", &name, "--table-size", STORE_TABLE_SIZE])?;
            for (i, w) in self.weights.iter().enumerate() {
                let b: IpAddr = if vip.is_ipv4() {
                    backend_v4(i).into()
                } else {
                    backend_v6(i).into()
                };
                self.try_ctl_store(&[
                    "backend",
                    "add",
                    &name,
                    &b.to_string(),
                    "--weight",
                    &w.to_string(),
                ])?;
            }
        }
        Ok(())
    }

    /// `lbctl --etcd URL --prefix P ARGS` (run in the store's namespace); its stdout.
    pub fn try_ctl_store(&self, args: &[&str]) -> Result<String> {
        let ns = self.store_ns.as_ref().context("a fleet with a store")?;
        let out = ns
            .command(self.bin_dir.join("lbctl"))
            .args(["--etcd", &self.store().url, "--prefix", &self.etcd_prefix])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("running lbctl --etcd")?;
        if !out.status.success() {
            bail!(
                "lbctl --etcd {} --prefix {} {}: {}",
                self.store().url,
                self.etcd_prefix,
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).to_string())
    }

    /// [`Fleet::try_ctl_store`], asserted to succeed.
    pub fn ctl_store(&self, args: &[&str]) -> String {
        self.try_ctl_store(args).unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// `lbctl --etcd ... cluster status --json`.
    pub fn cluster(&self) -> serde_json::Value {
        serde_json::from_str(&self.ctl_store(&["cluster", "status", "--json"])).unwrap()
    }

    /// Waits until nodes `nodes` apply the store's configuration revision (followers with the
    /// leader's weights for it), the store reachable and nothing refused; that revision.
    pub fn try_wait_in_sync(&self, nodes: &[usize], timeout: Duration) -> Result<i64> {
        let (mut rev, mut last, mut cluster) =
            (0, serde_json::Value::Null, serde_json::Value::Null);
        let synced = poll_until(timeout, || {
            let c = self.cluster();
            rev = c["config_revision"].as_i64().unwrap_or(0);
            let synced = nodes.iter().all(|&i| {
                let f = self.try_lbctl(i, &["status"]).unwrap_or_default()["fleet"].clone();
                let ok = fleet_applied(&f, rev);
                last = f;
                ok
            });
            let done = synced && c["weights_config_revision"].as_i64() == Some(rev);
            cluster = c;
            done.then_some(rev)
        });
        synced.ok_or_else(|| anyhow!("nodes {nodes:?} not in sync on revision {rev} within {timeout:?}; last node status {last:#}; cluster {cluster:#}"))
    }

    /// Waits until `lbctl cluster status` lists exactly nodes `nodes`, each serving with every
    /// session established and both VIPs announced (a node rewrites its report in etcd on its
    /// loop, at least once a second, so the store's view lags the node's own).
    pub fn try_wait_reported(&self, nodes: &[usize], timeout: Duration) -> Result<()> {
        let want: BTreeSet<String> = nodes.iter().map(|i| format!("n{i}")).collect();
        let mut last = serde_json::Value::Null;
        let reported = poll_until(timeout, || {
            let c = self.cluster();
            let reported = c["nodes"].as_array().cloned().unwrap_or_default();
            let names: BTreeSet<String> = reported
                .iter()
                .filter_map(|n| n["node"].as_str().map(String::from))
                .collect();
            let serving = reported.iter().all(|n| {
                let b = &n["bgp"];
                b["node"] == "serving"
                    && b["announced"].as_array().map(Vec::len) == Some(2)
                    && b["sessions"]
                        .as_array()
                        .is_some_and(|s| s.len() == 2 && s.iter().all(|s| s["established"] == true))
            });
            last = c;
            (names == want && serving).then_some(())
        });
        reported.ok_or_else(|| anyhow!("cluster status does not show nodes {nodes:?} serving with every session up after {timeout:?}: {last:#}"))
    }

    /// [`Fleet::try_wait_in_sync`], panicking on timeout.
    pub fn wait_in_sync(&self, nodes: &[usize], timeout: Duration) -> i64 {
        self.try_wait_in_sync(nodes, timeout)
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Node `i`'s Maglev tables from its pinned maps (see [`pinned_tables`]).
    pub fn tables(&self, i: usize) -> BTreeMap<String, Vec<IpAddr>> {
        pinned_tables(&self.nodes[i].pin_dir)
    }

    /// A fabric port on the bridge and its peer `eth0` in `ns`, with addresses and up.
    fn plug(&self, ns: &NetNs, port: &str, v4: Ipv4Addr, v6: Ipv6Addr) -> Result<()> {
        ns.sysctls(EARLY_SYSCTLS)?;
        let veth = Veth {
            name: port,
            peer: "eth0",
            mtu: FABRIC_MTU,
            mac: None,
            peer_mac: None,
            peer_ns: Some(ns),
        };
        plug(
            &self.switch,
            &veth,
            &format!("{v4}/24"),
            &format!("{v6}/64"),
        )
    }

    fn build_router_and_client(&self) -> Result<()> {
        let (rt, cl) = (&self.router, &self.client);
        self.plug(rt, "rt", router_v4(), router_v6())?;
        cl.sysctls(EARLY_SYSCTLS)?;
        rt.add_veth(&Veth {
            name: "eth1",
            peer: "eth0",
            mtu: CLIENT_MTU,
            mac: None,
            peer_mac: None,
            peer_ns: Some(cl),
        })?;
        rt.addrs_up("eth1", "10.81.0.1/24", "fd81::1/64")?;
        rt.sysctls(&[
            ("net/ipv4/ip_forward", "1"),
            ("net/ipv6/conf/all/forwarding", "1"),
            // ECMP by the 5-tuple (L4 hash), for both families.
            ("net/ipv4/fib_multipath_hash_policy", "1"),
            ("net/ipv6/fib_multipath_hash_policy", "1"),
            ("net/ipv4/conf/eth0/rp_filter", "0"),
            ("net/ipv4/conf/eth1/rp_filter", "0"),
        ])?;
        cl.ip(["link", "set", "lo", "up"])?;
        cl.addrs_up("eth0", &format!("{}/24", client_v4()), "fd81::2/64")?;
        cl.ip(["route", "add", "default", "via", "10.81.0.1"])?;
        cl.ip(["-6", "route", "add", "default", "via", "fd81::1"])?;
        // Packets leaving a veth carry CHECKSUM_PARTIAL; a node's XDP_TX would send them on
        // with a bad checksum. Real clients' packets arrive complete: make the client's so.
        cl.exec_ok("ethtool", ["-K", "eth0", "tx", "off"])?;
        Ok(())
    }

    fn add_node(&self, i: usize) -> Result<FleetNode> {
        let ns = NetNs::with_name(format!("{}-n{i}", self.prefix))?;
        let port = format!("n{i}");
        self.plug(&ns, &port, node_v4(i), node_v6(i))?;
        ns.sysctls(&[
            ("net/ipv4/conf/all/forwarding", "1"),
            ("net/ipv6/conf/all/forwarding", "1"),
            ("net/ipv4/conf/eth0/rp_filter", "0"),
        ])?;
        ns.ip(["route", "add", "default", "via", &router_v4().to_string()])?;
        // XDP_TX on a veth reaches its peer only if the peer runs NAPI: GRO and an XDP program.
        self.switch.exec_ok("ethtool", ["-K", &port, "gro", "on"])?;
        let ifindex: u32 = self
            .switch
            .exec_ok("cat", [format!("/sys/class/net/{port}/ifindex")])?
            .trim()
            .parse()?;
        let port_xdp = self
            .switch
            .run_in(|| crate::xdp::attach_xdp_pass(ifindex))
            .with_context(|| format!("attaching XDP_PASS to {port}"))?;
        let dir = self.dir.join(format!("node{i}"));
        std::fs::create_dir_all(dir.join("run"))?;
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/{}-n{i}", self.prefix));
        let config = dir.join("lbd.toml");
        std::fs::write(&config, self.node_config(i, &dir, &pin_dir))?;
        Ok(FleetNode {
            ns,
            index: i,
            socket: dir.join("run/lbd.sock"),
            config,
            pin_dir,
            lbd: None,
            _port_xdp: port_xdp,
        })
    }

    /// Node `i`'s lbd.toml: node-local keys, then the service part every node shares.
    pub fn node_config(&self, i: usize, dir: &Path, pin_dir: &Path) -> String {
        let mut c = format!(
            "interface = \"eth0\"\nxdp_mode = \"native\"\npin_dir = \"{}\"\ncontrol_socket = \"{}\"\n\n[encap]\nsource_v4 = \"{}\"\nsource_v6 = \"{}\"\n\n[bgp]\nlocal_as = {NODE_AS}\npeer_as = {ROUTER_AS}\npeers = [\"{}\", \"{}\"]\nrouter_id = \"{}\"\nhold_time = 3\nbird = \"bird\"\n",
            pin_dir.display(),
            dir.join("run/lbd.sock").display(),
            node_v4(i),
            node_v6(i),
            router_v4(),
            router_v6(),
            node_v4(i),
        );
        if self.etcd.is_none() {
            c.push_str(&self.service_config());
        }
        c
    }

    /// The VIPs and backends, identical on every node.
    pub fn service_config(&self) -> String {
        let mut c = String::new();
        for vip in [IpAddr::from(VIP_V4), IpAddr::from(VIP_V6)] {
            let _ = write!(
                c,
                "\n[[vip]]\naddress = \"{vip}\"\nport = {PORT}\nprotocol = \"tcp\"\n"
            );
            for (i, w) in self.weights.iter().enumerate() {
                let b: IpAddr = if vip.is_ipv4() {
                    backend_v4(i).into()
                } else {
                    backend_v6(i).into()
                };
                let _ = write!(c, "\n[[vip.backend]]\naddress = \"{b}\"\nweight = {w}\n");
            }
        }
        c
    }

    fn add_backend(&mut self, i: usize) -> Result<NetNs> {
        let ns = NetNs::with_name(format!("{}-b{i}", self.prefix))?;
        self.plug(&ns, &format!("b{i}"), backend_v4(i), backend_v6(i))?;
        hold_vips(&ns, VIP_V4, VIP_V6)?;
        ns.ip(["route", "add", "default", "via", &router_v4().to_string()])?;
        ns.ip([
            "-6",
            "route",
            "add",
            "default",
            "via",
            &router_v6().to_string(),
        ])?;
        let log = self.dir.join(format!("decap{i}.log"));
        start_decap(
            &ns,
            &self.bin_dir.join("lbd"),
            &[VIP_V4.into(), VIP_V6.into()],
            Some(&log),
        )?;
        // The backend's own addresses too: health probes go there.
        let addrs = [
            SocketAddr::new(VIP_V4.into(), PORT),
            SocketAddr::new(VIP_V6.into(), PORT),
            SocketAddr::new(backend_v4(i).into(), PORT),
            SocketAddr::new(backend_v6(i).into(), PORT),
        ];
        self.servers
            .push(Some(TcpServer::start(&ns, &addrs, &format!("backend{i}"))?));
        Ok(ns)
    }

    /// The router's BIRD: a session per node and family (nodes `0..nodes`, started or not),
    /// routes merged into ECMP in the kernel.
    fn start_router_bird(&mut self, nodes: usize) -> Result<()> {
        let mut c = format!(
            "router id {};\nlog stderr all;\nprotocol device {{ }}\n\
             protocol kernel {{ ipv4 {{ import none; export all; }}; merge paths on; }}\n\
             protocol kernel {{ ipv6 {{ import none; export all; }}; merge paths on; }}\n\
             template bgp lbnode {{ local as {ROUTER_AS}; hold time 3; keepalive time 1; connect retry time 1; error wait time 1, 10; graceful restart off; }}\n",
            router_v4()
        );
        for i in 0..nodes {
            let _ = writeln!(
                c,
                "protocol bgp node{i}v4 from lbnode {{ neighbor {} as {NODE_AS}; ipv4 {{ import all; export none; }}; }}\n\
                 protocol bgp node{i}v6 from lbnode {{ neighbor {} as {NODE_AS}; ipv6 {{ import all; export none; next hop prefer global; }}; }}",
                node_v4(i),
                node_v6(i)
            );
        }
        let conf = self.dir.join("router-bird.conf");
        std::fs::write(&conf, c)?;
        let mut cmd = self.router.command("bird");
        cmd.arg("-f")
            .arg("-c")
            .arg(&conf)
            .arg("-s")
            .arg(self.dir.join("router-bird.ctl"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.join("router-bird.log"))?);
        let child = self
            .router
            .spawn_command(&mut cmd)
            .context("starting the router's BIRD (cargo xtask setup installs bird2)")?;
        self.router_bird = Some(child);
        Ok(())
    }

    /// The router's BIRD log.
    pub fn router_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("router-bird.log")).unwrap_or_default()
    }

    /// Starts lbd on node `i` (its BIRD with it) and waits until it serves its control socket.
    /// Panics with its log if it does not.
    pub fn start_node(&mut self, i: usize) {
        if let Err(e) = self.try_start_node(i) {
            panic!("{e:#}");
        }
    }

    /// [`Fleet::start_node`], as a Result.
    pub fn try_start_node(&mut self, i: usize) -> Result<()> {
        let opts = LbdOptions {
            bin: Some(self.bin_dir.join("lbd")),
            // The root mount namespace: the pins (in /sys/fs/bpf) outlive a killed lbd, so its
            // datapath keeps forwarding the packets that still arrive.
            nsenter: true,
            env: vec![("RUST_LOG".into(), "info".into())],
            ..LbdOptions::default()
        };
        let mut opts = opts;
        if let Some(etcd) = &self.etcd {
            opts.args = vec![
                "--etcd".into(),
                etcd.url.clone(),
                "--prefix".into(),
                self.etcd_prefix.clone(),
                "--node".into(),
                format!("n{i}"),
            ];
        }
        let n = &self.nodes[i];
        let mut lbd = Lbd::spawn(&n.ns, &n.config, &n.socket, &opts);
        if let Err(e) = lbd.try_wait_serving() {
            bail!("node{i}: {e}");
        }
        self.nodes[i].lbd = Some(lbd);
        Ok(())
    }

    /// The next hops the router's kernel has for `vip` (empty without a route).
    pub fn next_hops(&self, vip: IpAddr) -> BTreeSet<IpAddr> {
        let fam = if vip.is_ipv4() { "-4" } else { "-6" };
        let out = self
            .router
            .ip([fam, "route", "show", &vip.to_string()])
            .unwrap_or_default();
        let words: Vec<&str> = out.split_whitespace().collect();
        words
            .windows(2)
            .filter(|w| w[0] == "via")
            .filter_map(|w| w[1].parse().ok())
            .collect()
    }

    /// Waits until the router's next hops for both VIPs are exactly nodes `want`; returns how
    /// long that took. Panics with the router's routes and log after `timeout`.
    pub fn wait_next_hops(&self, want: &[usize], timeout: Duration) -> Duration {
        self.try_wait_next_hops(want, timeout)
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// [`Fleet::wait_next_hops`], as a Result.
    pub fn try_wait_next_hops(&self, want: &[usize], timeout: Duration) -> Result<Duration> {
        let t = Instant::now();
        loop {
            let ok = [IpAddr::from(VIP_V4), IpAddr::from(VIP_V6)]
                .into_iter()
                .all(|vip| {
                    let expect: BTreeSet<IpAddr> =
                        want.iter().map(|&i| node_addr(i, vip)).collect();
                    self.next_hops(vip) == expect
                });
            if ok {
                return Ok(t.elapsed());
            }
            if t.elapsed() > timeout {
                bail!(
                    "the router's next hops for the VIPs did not become nodes {want:?} within {timeout:?}: v4 {:?}, v6 {:?}\nrouter BIRD log (end):\n{}",
                    self.next_hops(VIP_V4.into()),
                    self.next_hops(VIP_V6.into()),
                    tail(&self.router_log(), 30)
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits until node `i`'s status says it serves, every session is established and both
    /// VIPs are announced; returns that status.
    pub fn try_wait_announcing(&self, i: usize, timeout: Duration) -> Result<serde_json::Value> {
        let mut last = Ok(serde_json::Value::Null);
        let announcing = poll_until(timeout, || {
            let s = match self.try_lbctl(i, &["status"]) {
                Ok(s) => s,
                Err(e) => {
                    last = Err(e);
                    return Some(None);
                }
            };
            let b = &s["bgp"];
            let ok = b["node"] == "serving"
                && b["announced"].as_array().map(Vec::len) == Some(2)
                && b["sessions"]
                    .as_array()
                    .is_some_and(|s| s.iter().all(|s| s["established"] == true));
            last = Ok(b.clone());
            ok.then_some(Some(s))
        });
        match (announcing, last) {
            (Some(Some(s)), _) => Ok(s),
            (_, Err(e)) => Err(e),
            (_, Ok(b)) => bail!(
                "node{i} does not announce both VIPs with every session up after {timeout:?}: {b}"
            ),
        }
    }

    /// `lbctl --json ARGS` on node `i`; panics unless it succeeds.
    pub fn lbctl(&self, i: usize, args: &[&str]) -> serde_json::Value {
        self.try_lbctl(i, args).unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// `lbctl --json ARGS` on node `i`.
    pub fn try_lbctl(&self, i: usize, args: &[&str]) -> Result<serde_json::Value> {
        let out = std::process::Command::new(self.bin_dir.join("lbctl"))
            .arg("--socket")
            .arg(&self.nodes[i].socket)
            .arg("--json")
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("running lbctl")?;
        if !out.status.success() {
            bail!(
                "node{i}: lbctl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// New flows node `i`'s datapath gave a backend, per VIP address, since its program was
    /// loaded.
    pub fn node_new_flows(&self, i: usize) -> u64 {
        let s = self.lbctl(i, &["stats", "--interval", "0.1"]);
        s["vips"]
            .as_array()
            .map(|v| v.iter().map(|v| v["new_flows"].as_u64().unwrap_or(0)).sum())
            .unwrap_or(0)
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            n.lbd = None;
            let _ = std::fs::remove_dir_all(&n.pin_dir);
        }
        if let Some(mut c) = self.router_bird.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if !std::thread::panicking() && !self.keep_dir {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Fails unless `bird` (BIRD 2) is installed.
pub fn require_bird() -> Result<()> {
    match std::process::Command::new("bird").arg("--version").output() {
        Ok(o) if String::from_utf8_lossy(&o.stderr).contains("BIRD version 2") => Ok(()),
        Ok(o) => bail!(
            "bird is not BIRD 2: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => bail!("bird not found ({e}): cargo xtask setup installs bird2"),
    }
}

/// `ADDRESS:PORT/tcp` of a VIP as lbctl names it (`[v6]:PORT/tcp`).
pub fn vip_name(vip: IpAddr) -> String {
    format!("{}/tcp", SocketAddr::new(vip, PORT))
}
