//! [`Lab`]: client, balancer and backends on one bridged L2 segment, each in its own namespace.
//!
//! ```text
//!   client (eth0) ──┐
//!   lb     (eth0) ──┤  switch namespace: bridge br0 (stp off, no multicast snooping)
//!   backend0 (eth0)─┤  switch-side veth ports: lbp-client, lbp-lb, lbp-b0, lbp-b1, ...
//!   backendN (eth0)─┘
//! ```
//!
//! Addresses: 10.200.0.0/24 and fd00:200::/64 on the segment (client .1/::1, lb .2/::2,
//! backend i .(11+i)/::(0x11+i)); the VIPs [`VIP_V4`]/[`VIP_V6`] sit on every backend's `lo`
//! and the client routes them via the lb. The lb's switch port has GRO on and an `XDP_PASS`
//! program so that frames the balancer sends back with `XDP_TX` are delivered (see
//! [`crate::xdp`]); the client's eth0 computes full checksums (tx offload off) because XDP
//! forwarding of a veth's CHECKSUM_PARTIAL packets would leave their TCP checksums wrong.
//! Veth pairs are created inside the switch namespace
//! with their host end moved straight into the host namespace, so the root namespace never
//! holds any of them.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::netns::{list_namespaces, unique_prefix, NetNs, Veth};
use crate::xdp::attach_xdp_pass;

/// The IPv4 VIP, configured (as /32) on every backend's `lo`.
pub const VIP_V4: Ipv4Addr = Ipv4Addr::new(10, 200, 100, 1);
/// The IPv6 VIP, configured (as /128) on every backend's `lo`.
pub const VIP_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x200, 0x100, 0, 0, 0, 0, 1);
/// The segment's IPv4 network (/[`PREFIX_V4`]).
pub const NET_V4: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 0);
/// Prefix length of [`NET_V4`].
pub const PREFIX_V4: u8 = 24;
/// The segment's IPv6 network (/[`PREFIX_V6`]).
pub const NET_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 0);
/// Prefix length of [`NET_V6`].
pub const PREFIX_V6: u8 = 64;
/// The client's addresses.
pub const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
/// The client's IPv6 address.
pub const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 1);
/// The balancer's IPv4 address (also the encapsulation source the xtask configures).
pub const LB_V4: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 2);
/// The balancer's IPv6 address.
pub const LB_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 2);
/// Most backends a lab can have (addresses .11 ..= .250).
pub const MAX_BACKENDS: usize = 240;
/// MTU of the client's eth0 and its switch port: what a client on the internet would have.
pub const CLIENT_MTU: u32 = 1500;
/// MTU of every other link (lb, backends, their switch ports): big enough that a full-sized
/// client packet still fits after IPv4 (+20) or IPv6 (+40) encapsulation by the balancer, as on
/// a real load-balancer fabric.
pub const FABRIC_MTU: u32 = 1600;
/// The bridge inside the switch namespace.
pub const BRIDGE: &str = "br0";

/// IPv4 address of backend `i` (10.200.0.(11+i)).
pub fn backend_v4(i: usize) -> Ipv4Addr {
    assert!(i < MAX_BACKENDS, "backend index {i} out of range");
    Ipv4Addr::new(10, 200, 0, 11 + i as u8)
}

/// IPv6 address of backend `i` (fd00:200::(0x11+i)).
pub fn backend_v6(i: usize) -> Ipv6Addr {
    assert!(i < MAX_BACKENDS, "backend index {i} out of range");
    Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 0x11 + i as u16)
}

/// What to build.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LabSpec {
    /// Number of backend hosts (1 ..= [`MAX_BACKENDS`]).
    pub backends: usize,
}

/// Which host of the lab.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// Sends traffic to the VIPs.
    Client,
    /// The load balancer.
    Lb,
    /// Backend `i` (0-based).
    Backend(usize),
    /// A further load-balancer node of a fleet (`i` from 1; the [`Role::Lb`] is node 0), at
    /// .(2+i) / ::(2+i), set up like the lb ([`Lab::add_host`]).
    Node(usize),
    /// The host running the fleet's store (etcd), at .9 / ::9.
    Store,
}

impl Role {
    /// Short name: `client`, `lb`, `backend<i>` (used in namespace names).
    pub fn name(self) -> String {
        match self {
            Role::Client => "client".into(),
            Role::Lb => "lb".into(),
            Role::Backend(i) => format!("backend{i}"),
            Role::Node(i) => format!("node{i}"),
            Role::Store => "store".into(),
        }
    }

    fn port_name(self) -> String {
        match self {
            Role::Client => "lbp-client".into(),
            Role::Lb => "lbp-lb".into(),
            Role::Backend(i) => format!("lbp-b{i}"),
            Role::Node(i) => format!("lbp-n{i}"),
            Role::Store => "lbp-store".into(),
        }
    }

    fn last_byte(self) -> u8 {
        match self {
            Role::Client => 1,
            Role::Lb => 2,
            Role::Backend(i) => 0x11 + i as u8,
            Role::Node(i) => 2 + i as u8,
            Role::Store => 9,
        }
    }

    fn v4(self) -> Ipv4Addr {
        match self {
            Role::Client => CLIENT_V4,
            Role::Lb => LB_V4,
            Role::Backend(i) => backend_v4(i),
            Role::Node(_) | Role::Store => {
                let o = NET_V4.octets();
                Ipv4Addr::new(o[0], o[1], o[2], self.last_byte())
            }
        }
    }

    fn v6(self) -> Ipv6Addr {
        match self {
            Role::Client => CLIENT_V6,
            Role::Lb => LB_V6,
            Role::Backend(i) => backend_v6(i),
            Role::Node(_) | Role::Store => {
                let mut o = NET_V6.octets();
                o[15] = self.last_byte();
                Ipv6Addr::from(o)
            }
        }
    }
}

/// An Ethernet address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// Parses `aa:bb:cc:dd:ee:ff`.
    pub fn parse(s: &str) -> Option<Self> {
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for b in &mut out {
            *b = u8::from_str_radix(parts.next()?, 16).ok()?;
        }
        parts.next().is_none().then_some(Self(out))
    }

    /// The six bytes.
    pub fn octets(self) -> [u8; 6] {
        self.0
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// One host of the lab: its namespace and the facts about its `eth0`.
#[derive(Debug)]
pub struct Host {
    role: Role,
    ns: NetNs,
    mac: MacAddr,
    ifindex: u32,
    port: String,
    port_mac: MacAddr,
    port_ifindex: u32,
    /// Keeps the `XDP_PASS` program on the lb's switch port attached (see [`crate::xdp`]).
    port_xdp: Option<OwnedFd>,
}

impl Host {
    /// Which host this is.
    pub fn role(&self) -> Role {
        self.role
    }
    /// The host's namespace guard.
    pub fn ns(&self) -> &NetNs {
        &self.ns
    }
    /// The namespace's name (for `ip netns exec`).
    pub fn ns_name(&self) -> &str {
        self.ns.name()
    }
    /// The host's IPv4 address on eth0.
    pub fn v4(&self) -> Ipv4Addr {
        self.role.v4()
    }
    /// The host's IPv6 address on eth0.
    pub fn v6(&self) -> Ipv6Addr {
        self.role.v6()
    }
    /// The host's address of the same family as `like`.
    pub fn addr_like(&self, like: IpAddr) -> IpAddr {
        match like {
            IpAddr::V4(_) => self.v4().into(),
            IpAddr::V6(_) => self.v6().into(),
        }
    }
    /// `v4:port` and `[v6]:port`.
    pub fn sockaddrs(&self, port: u16) -> [SocketAddr; 2] {
        [
            SocketAddr::new(self.v4().into(), port),
            SocketAddr::new(self.v6().into(), port),
        ]
    }
    /// MAC address of the host's eth0.
    pub fn mac(&self) -> MacAddr {
        self.mac
    }
    /// ifindex of eth0 inside the host's namespace.
    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }
    /// Name of the switch-side veth (in the switch namespace) whose peer is this eth0.
    pub fn switch_port(&self) -> &str {
        &self.port
    }
    /// MAC address of the switch-side veth.
    pub fn switch_port_mac(&self) -> MacAddr {
        self.port_mac
    }
    /// ifindex of the switch-side veth inside the switch namespace.
    pub fn switch_port_ifindex(&self) -> u32 {
        self.port_ifindex
    }
    /// Whether the switch-side veth has the lab's `XDP_PASS` program (only the lb's port, so
    /// that frames the balancer sends with `XDP_TX` are delivered; see [`crate::xdp`]).
    pub fn switch_port_has_xdp(&self) -> bool {
        self.port_xdp.is_some()
    }
    /// Attaches the minimal forwarder ([`crate::xdp::attach_xdp_reflector`]) to this host's
    /// eth0, spreading over the first `backends` backends; attached while the link lives.
    pub fn attach_reflector(&self, backends: u8) -> Result<OwnedFd> {
        self.ns
            .run_in(|| {
                crate::xdp::attach_xdp_reflector(self.ifindex, self.mac.octets()[5], backends)
            })
            .with_context(|| format!("attaching the minimal forwarder in {}", self.ns.name()))
    }
}

/// The topology; see the module docs. Dropping it tears everything down (namespaces deleted in
/// reverse order of creation, processes inside killed); [`Lab::shutdown`] does the same and
/// also verifies nothing leaked.
#[derive(Debug)]
pub struct Lab {
    prefix: String,
    switch: Option<NetNs>,
    hosts: Vec<Host>,
    backends: usize,
}

impl Lab {
    /// Builds the lab and returns once it works: IPv6 addresses are usable (none tentative) and
    /// the client can ping every backend over IPv4 and IPv6. Needs root, iproute2, ethtool and
    /// ping (`cargo xtask setup` installs them).
    pub fn new(spec: LabSpec) -> Result<Self> {
        if spec.backends == 0 || spec.backends > MAX_BACKENDS {
            bail!(
                "a lab needs 1..={MAX_BACKENDS} backends, not {}",
                spec.backends
            );
        }
        let prefix = unique_prefix();
        let switch = NetNs::with_name(format!("{prefix}-sw"))?;
        // Partially built labs are torn down by Drop if a later step fails.
        let mut lab = Lab {
            prefix,
            switch: Some(switch),
            hosts: Vec::new(),
            backends: spec.backends,
        };
        lab.build()
            .with_context(|| format!("building lab {}", lab.prefix))?;
        Ok(lab)
    }

    fn build(&mut self) -> Result<()> {
        let sw = self.switch.as_ref().unwrap();
        // The switch is a pure L2 device: keep IPv6 (link-local addresses, RS, MLD) off it.
        sw.run_in(|| {
            write_sysctl("net/ipv6/conf/all/disable_ipv6", "1")?;
            write_sysctl("net/ipv6/conf/default/disable_ipv6", "1")
        })?;
        sw.ip(["link", "set", "lo", "up"])?;
        sw.ip([
            "link",
            "add",
            BRIDGE,
            "type",
            "bridge",
            "stp_state",
            "0",
            "forward_delay",
            "0",
            "mcast_snooping",
            "0",
        ])?;
        sw.ip(["link", "set", BRIDGE, "up"])?;

        let roles = [Role::Client, Role::Lb]
            .into_iter()
            .chain((0..self.backends).map(Role::Backend));
        for role in roles {
            let host = self.add_host(role)?;
            self.hosts.push(host);
        }
        self.wait_ready()?;
        Ok(())
    }

    /// Adds a host to a built lab (a fleet's further nodes, the store) and waits until its
    /// link and addresses are usable.
    pub fn add(&mut self, role: Role) -> Result<&Host> {
        if self.hosts.iter().any(|h| h.role == role) {
            bail!("the lab already has a {}", role.name());
        }
        let host = self.add_host(role)?;
        self.hosts.push(host);
        self.wait_ready()?;
        Ok(self.hosts.last().expect("just added"))
    }

    /// The host of `role`; panics if the lab has none.
    pub fn host(&self, role: Role) -> &Host {
        self.hosts
            .iter()
            .find(|h| h.role == role)
            .unwrap_or_else(|| panic!("the lab has no {}", role.name()))
    }

    fn add_host(&self, role: Role) -> Result<Host> {
        let sw = self.switch.as_ref().unwrap();
        let ns = NetNs::with_name(format!("{}-{}", self.prefix, role.name()))?;
        let port = role.port_name();
        debug_assert!(port.len() <= 15);
        ns.sysctls(EARLY_SYSCTLS)?;
        let mtu = match role {
            Role::Client => CLIENT_MTU,
            _ => FABRIC_MTU,
        };
        let b = role.last_byte();
        let host_mac = MacAddr([0x02, 0, 0, 0, 0, b]).to_string();
        let port_mac = MacAddr([0x02, 0, 0, 0, 1, b]).to_string();
        let veth = Veth {
            name: &port,
            peer: "eth0",
            mtu,
            mac: Some(&port_mac),
            peer_mac: Some(&host_mac),
            peer_ns: Some(&ns),
        };
        let v4 = format!("{}/{PREFIX_V4}", role.v4());
        let v6 = format!("{}/{PREFIX_V6}", role.v6());
        plug(sw, &veth, &v4, &v6)?;

        match role {
            Role::Client => {
                route_vips(&ns, Role::Lb)?;
                // Packets from a veth carry CHECKSUM_PARTIAL (checksum left to "hardware").
                // A native XDP program that forwards them (XDP_TX) turns them into plain
                // frames and the backend would see a bad TCP checksum. Real clients' packets
                // arrive from a wire with complete checksums, so make the client compute them.
                ns.exec_ok("ethtool", ["-K", "eth0", "tx", "off"])?;
            }
            Role::Store => {}
            Role::Lb | Role::Node(_) => {
                ns.run_in(|| -> Result<()> {
                    for key in [
                        "net/ipv4/conf/all/forwarding",
                        "net/ipv4/conf/eth0/forwarding",
                        "net/ipv6/conf/all/forwarding",
                        "net/ipv6/conf/eth0/forwarding",
                    ] {
                        write_sysctl(key, "1")?;
                    }
                    write_sysctl("net/ipv4/conf/eth0/rp_filter", "0")
                })?;
                // A frame sent with XDP_TX on the lb's eth0 is only received by its veth peer if
                // the peer runs NAPI, which it does with GRO enabled or an XDP program; and the
                // kernel only kicks that NAPI after XDP_TX if the peer has an XDP program, so
                // both are set up (the program is attached below, see crate::xdp).
                sw.exec_ok("ethtool", ["-K", &port, "gro", "on"])?;
            }
            Role::Backend(_) => hold_vips(&ns, VIP_V4, VIP_V6)?,
        }

        let (mac, ifindex) = link_info(&ns, "eth0")?;
        let (port_mac, port_ifindex) = link_info(sw, &port)?;
        let port_xdp = match role {
            Role::Lb | Role::Node(_) => Some(
                sw.run_in(|| attach_xdp_pass(port_ifindex))
                    .with_context(|| format!("attaching XDP_PASS to {port}"))?,
            ),
            _ => None,
        };
        Ok(Host {
            port_xdp,
            role,
            ns,
            mac,
            ifindex,
            port,
            port_mac,
            port_ifindex,
        })
    }

    fn wait_ready(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        for host in &self.hosts {
            loop {
                let link = host.ns.ip(["-o", "link", "show", "dev", "eth0"])?;
                let tentative = host.ns.ip(["-6", "-o", "addr", "show", "tentative"])?;
                if link.contains("LOWER_UP") && tentative.trim().is_empty() {
                    break;
                }
                if Instant::now() > deadline {
                    bail!(
                        "{}: eth0 not ready (link: {}; tentative: {})",
                        host.role.name(),
                        link.trim(),
                        tentative.trim()
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let client = self.client();
        let targets = self
            .hosts
            .iter()
            .filter(|h| h.role != Role::Client)
            .flat_map(|h| [IpAddr::from(h.v4()), IpAddr::from(h.v6())]);
        for target in targets {
            ping(client.ns(), target, deadline)?;
        }
        Ok(())
    }

    /// The unique prefix of every namespace in this lab (`lbt-<pid>-<n>`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }
    /// The client host.
    pub fn client(&self) -> &Host {
        &self.hosts[0]
    }
    /// The balancer host.
    pub fn lb(&self) -> &Host {
        &self.hosts[1]
    }
    /// All backends, in index order.
    pub fn backends(&self) -> &[Host] {
        &self.hosts[2..2 + self.backends]
    }
    /// Backend `i`.
    pub fn backend(&self, i: usize) -> &Host {
        &self.backends()[i]
    }
    /// Every host: client, lb, backends.
    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }
    /// Routes the client's traffic for the VIPs through `via`'s host (the lb's from the start).
    pub fn route_vips_via(&self, via: Role) -> Result<()> {
        route_vips(self.client().ns(), via)
    }
    /// Makes the switch forward the balancer hosts' frames for the backends in XDP (the lb's and
    /// those of the [`Role::Node`]s added so far), straight from their ports to the backends'
    /// ([`crate::xdp::attach_xdp_switch`]), instead of building an skb for each and passing it
    /// through the bridge; the rest still goes through the bridge. A hardware switch costs the
    /// hosts no CPU; the bridge costs the lab's cores for every frame a balancer sends back, so
    /// `bench lab` uses this to measure the balancer rather than the lab's switch. The balancer
    /// hosts then compute full checksums (tx offload off: a redirected frame loses an skb's
    /// pending checksum), and the backends' eth0 get GRO, so that they run NAPI and receive
    /// redirected frames even without an XDP program.
    pub fn switch_lb_frames_in_xdp(&mut self) -> Result<()> {
        let mut ports = Vec::new();
        for b in self.backends() {
            b.ns.exec_ok("ethtool", ["-K", "eth0", "gro", "on"])?;
            ports.push((b.role.last_byte(), b.port_ifindex));
        }
        let sw = self.switch.as_ref().expect("lab already torn down");
        for host in &mut self.hosts {
            if !matches!(host.role, Role::Lb | Role::Node(_)) {
                continue;
            }
            host.ns.exec_ok("ethtool", ["-K", "eth0", "tx", "off"])?;
            let port_ifindex = host.port_ifindex;
            // One XDP program per device: the pass program's link goes first.
            host.port_xdp = None;
            let link = sw
                .run_in(|| crate::xdp::attach_xdp_switch(port_ifindex, &ports))
                .with_context(|| format!("attaching the XDP switch to {}", host.port))?;
            host.port_xdp = Some(link);
        }
        Ok(())
    }
    /// The switch namespace (holds `br0` and the `lbp-*` ports).
    pub fn switch(&self) -> &NetNs {
        self.switch.as_ref().expect("lab already torn down")
    }
    /// Names of all namespaces of this lab, in creation order.
    pub fn namespace_names(&self) -> Vec<String> {
        self.switch
            .iter()
            .map(|s| s.name().to_owned())
            .chain(self.hosts.iter().map(|h| h.ns_name().to_owned()))
            .collect()
    }

    /// `ip addr`, `ip route`, `ip neigh` and `ip link` of every namespace, for failure messages.
    pub fn diagnostics(&self) -> String {
        let mut out = String::new();
        let all = self
            .switch
            .iter()
            .map(|s| ("switch".to_owned(), s))
            .chain(self.hosts.iter().map(|h| (h.role.name(), &h.ns)));
        for (label, ns) in all {
            out.push_str(&format!("=== {label} ({})\n", ns.name()));
            for args in [
                &["-br", "link"][..],
                &["-br", "addr"],
                &["route"],
                &["-6", "route"],
                &["neigh"],
            ] {
                match ns.ip(args) {
                    Ok(s) => out.push_str(&s),
                    Err(e) => out.push_str(&format!("{e:#}\n")),
                }
            }
        }
        out
    }

    /// Tears the lab down and verifies that nothing is left: no namespace of ours in
    /// `ip netns list`, no `lbp-*` veth in the root namespace.
    pub fn shutdown(mut self) -> Result<()> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<()> {
        let mut errors = Vec::new();
        while let Some(host) = self.hosts.pop() {
            if let Err(e) = host.ns.delete() {
                errors.push(format!("{e:#}"));
            }
        }
        if let Some(sw) = self.switch.take() {
            if let Err(e) = sw.delete() {
                errors.push(format!("{e:#}"));
            }
        }
        let prefix = format!("{}-", self.prefix);
        match list_namespaces() {
            Ok(names) => {
                let left: Vec<_> = names.iter().filter(|n| n.starts_with(&prefix)).collect();
                if !left.is_empty() {
                    errors.push(format!("namespaces left behind: {left:?}"));
                }
            }
            Err(e) => errors.push(format!("{e:#}")),
        }
        match root_links_named("lbp-") {
            Ok(left) if !left.is_empty() => {
                errors.push(format!("veths left in the root namespace: {left:?}"))
            }
            Ok(_) => {}
            Err(e) => errors.push(format!("{e:#}")),
        }
        if errors.is_empty() {
            Ok(())
        } else {
            bail!("tearing down lab {}: {}", self.prefix, errors.join("; "))
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            eprintln!("warning: {e:#}");
        }
    }
}

/// Names of links in the root namespace that start with `prefix`.
pub fn root_links_named(prefix: &str) -> Result<Vec<String>> {
    let out = std::process::Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
        .context("running `ip link show`")?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_owned())
        .filter(|n| n.starts_with(prefix))
        .collect())
}

/// MAC and ifindex of `dev` from `ip -o link show dev DEV`
/// (`7: eth0@if8: <...> ... link/ether 02:00:00:00:00:01 brd ...`).
fn link_info(ns: &NetNs, dev: &str) -> Result<(MacAddr, u32)> {
    let line = ns.ip(["-o", "link", "show", "dev", dev])?;
    let ifindex = line
        .split(':')
        .next()
        .and_then(|s| s.trim().parse().ok())
        .with_context(|| format!("no ifindex in {line:?}"))?;
    let mac = line
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .and_then(MacAddr::parse)
        .with_context(|| format!("no MAC in {line:?}"))?;
    Ok((mac, ifindex))
}

/// Writes `/proc/sys/<key>` for the calling thread's network namespace.
/// Sysctls set in a namespace before its devices arrive (a device moved into a namespace
/// takes the defaults then): no duplicate address detection, no reverse-path filter.
pub(crate) const EARLY_SYSCTLS: &[(&str, &str)] = &[
    ("net/ipv6/conf/all/accept_dad", "0"),
    ("net/ipv6/conf/default/accept_dad", "0"),
    ("net/ipv4/conf/all/rp_filter", "0"),
    ("net/ipv4/conf/default/rp_filter", "0"),
];

/// Plugs `veth` (created in `sw`, its peer `eth0` in the host's namespace) into [`BRIDGE`] and
/// gives `eth0` the addresses `v4` and `v6`, loopback and `eth0` up.
pub(crate) fn plug(sw: &NetNs, veth: &Veth, v4: &str, v6: &str) -> Result<()> {
    let ns = veth.peer_ns.expect("the port's peer in a host namespace");
    sw.add_veth(veth)?;
    sw.ip(["link", "set", veth.name, "master", BRIDGE, "up"])?;
    ns.ip(["link", "set", "lo", "up"])?;
    ns.addrs_up(veth.peer, v4, v6)
}

/// A backend's side of direct server return: the VIPs `v4` and `v6` on its loopback, answered
/// for by no ARP on eth0 and not dropped by the reverse-path filter.
pub(crate) fn hold_vips(ns: &NetNs, v4: Ipv4Addr, v6: Ipv6Addr) -> Result<()> {
    ns.ip(["addr", "add", &format!("{v4}/32"), "dev", "lo"])?;
    let v6 = format!("{v6}/128");
    ns.ip(["-6", "addr", "add", &v6, "dev", "lo", "nodad"])?;
    let mut keys = Vec::new();
    for dev in ["all", "eth0"] {
        keys.push((format!("net/ipv4/conf/{dev}/rp_filter"), "0"));
        keys.push((format!("net/ipv4/conf/{dev}/arp_ignore"), "1"));
        keys.push((format!("net/ipv4/conf/{dev}/arp_announce"), "2"));
    }
    keys.push(("net/ipv4/conf/lo/rp_filter".to_string(), "0"));
    let pairs: Vec<(&str, &str)> = keys.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    ns.sysctls(&pairs)
}

/// Routes `client`'s traffic for the VIPs through the host of `via`.
fn route_vips(client: &NetNs, via: Role) -> Result<()> {
    client.ip([
        "route",
        "replace",
        &format!("{VIP_V4}/32"),
        "via",
        &via.v4().to_string(),
    ])?;
    client.ip([
        "-6",
        "route",
        "replace",
        &format!("{VIP_V6}/128"),
        "via",
        &via.v6().to_string(),
    ])?;
    Ok(())
}

fn write_sysctl(key: &str, value: &str) -> Result<()> {
    let path = format!("/proc/sys/{key}");
    std::fs::write(&path, value).with_context(|| format!("writing {value} to {path}"))
}

/// Pings `target` from `ns` until it answers or `deadline` passes.
fn ping(ns: &NetNs, target: IpAddr, deadline: Instant) -> Result<()> {
    let target_s = target.to_string();
    loop {
        let out = ns.exec("ping", ["-n", "-q", "-c", "1", "-W", "1", &target_s]);
        if out.status.success() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "no ping reply from {target} in {}: {}{}",
                ns.name(),
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
