//! Small facts about interfaces and the kernel's neighbour table that the datapath relies on.
use anyhow::{anyhow, bail, Context as _, Result};
use aya::programs::XdpMode as AyaXdpMode;
use netlink_packet_route::RouteNetlinkMessage;
use std::{ffi::CString, net::IpAddr};

/// Index of an interface, with an error that says what to check.
pub fn ifindex(name: &str) -> Result<u32> {
    let c = CString::new(name).map_err(|_| anyhow!("interface: {name:?} is not a valid name"))?;
    // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 {
        bail!("interface: no interface named {name:?} here; check `ip link` (and the network namespace)");
    }
    Ok(idx)
}

/// An interface's state as lbd watches it: administratively up, and running (carrier).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkState {
    pub up: bool,
    pub running: bool,
}

impl LinkState {
    /// Whether packets can arrive: up and with carrier.
    pub fn is_usable(self) -> bool {
        self.up && self.running
    }
}

/// The state of interface `name` (SIOCGIFFLAGS). An ioctl rather than /sys/class/net: sysfs
/// shows the network namespace it was mounted in, the ioctl the caller's (lbd may be started
/// with `nsenter --net`).
pub fn link_state(name: &str) -> Result<LinkState> {
    let c = CString::new(name).map_err(|_| anyhow!("interface: {name:?} is not a valid name"))?;
    let bytes = c.as_bytes_with_nul();
    if bytes.len() > libc::IFNAMSIZ {
        bail!("interface: {name:?} is longer than an interface name can be");
    }
    // SAFETY: plain socket(2); closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("socket for SIOCGIFFLAGS");
    }
    // SAFETY: ifreq is a plain C struct; all-zero is valid.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: `ifr` is a valid ifreq naming the interface; the kernel fills ifru_flags.
    let rc = unsafe { libc::ioctl(fd, libc::SIOCGIFFLAGS as _, &mut ifr) };
    let err = std::io::Error::last_os_error();
    // SAFETY: closing the socket opened above.
    unsafe { libc::close(fd) };
    if rc != 0 {
        return Err(err).with_context(|| format!("reading the flags of interface {name}"));
    }
    // SAFETY: after SIOCGIFFLAGS the union holds the flags.
    let flags = i32::from(unsafe { ifr.ifr_ifru.ifru_flags });
    Ok(LinkState {
        up: flags & libc::IFF_UP != 0,
        running: flags & libc::IFF_RUNNING != 0,
    })
}

/// `bpf_fib_lookup` answers only for interfaces with forwarding enabled.
pub fn enable_forwarding(name: &str) -> Result<()> {
    for path in [
        format!("/proc/sys/net/ipv4/conf/{name}/forwarding"),
        format!("/proc/sys/net/ipv6/conf/{name}/forwarding"),
    ] {
        if std::path::Path::new(&path).exists() {
            std::fs::write(&path, "1").with_context(|| format!("enabling forwarding ({path})"))?;
        }
    }
    Ok(())
}

/// Addresses configured on an interface.
pub fn interface_addrs(name: &str) -> Result<Vec<IpAddr>> {
    Ok(all_addrs()?
        .into_iter()
        .filter(|(ifname, _)| ifname == name)
        .map(|(_, a)| a)
        .collect())
}

/// This host's addresses as the checks of [`crate::config::Config::host_problems`] need them:
/// those of `interface` and those of every interface in this network namespace.
pub fn host_addrs(interface: &str) -> Result<crate::config::HostAddrs> {
    let all = all_addrs()?;
    Ok(crate::config::HostAddrs {
        interface: all
            .iter()
            .filter(|(ifname, _)| ifname == interface)
            .map(|(_, a)| *a)
            .collect(),
        all: all.into_iter().map(|(_, a)| a).collect(),
    })
}

/// Every IPv4 and IPv6 address of every interface in this network namespace, with the
/// interface's name.
fn all_addrs() -> Result<Vec<(String, IpAddr)>> {
    let mut out = Vec::new();
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `ifap` with a list we free below.
    if unsafe { libc::getifaddrs(&mut ifap) } != 0 {
        return Err(std::io::Error::last_os_error()).context("getifaddrs");
    }
    let mut cur = ifap;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list returned by getifaddrs.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let ifname = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: ifa_addr points to a sockaddr whose family says which struct it is.
        unsafe {
            match (*ifa.ifa_addr).sa_family as i32 {
                libc::AF_INET => {
                    let sa = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                    let a = IpAddr::from(u32::from_be(sa.sin_addr.s_addr).to_be_bytes());
                    out.push((ifname, a));
                }
                libc::AF_INET6 => {
                    let sa = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                    out.push((ifname, IpAddr::from(sa.sin6_addr.s6_addr)));
                }
                _ => {}
            }
        }
    }
    // SAFETY: frees the list returned by getifaddrs above.
    unsafe { libc::freeifaddrs(ifap) };
    Ok(out)
}

/// An XDP program attached to an interface, as the kernel says: the mode (`Default` for
/// several at once) and the program's id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelXdp {
    pub mode: AyaXdpMode,
    pub program_id: u32,
}

/// [`Rtnl::xdp_of`] for interface `name`, in the calling thread's network namespace.
pub fn kernel_xdp(name: &str) -> Result<Option<KernelXdp>> {
    let index = ifindex(name)?;
    Rtnl::open()?.xdp_of(index)
}

/// The protocol tag (NDA_PROTOCOL) of the neighbour entries lbd installs, as `ip neigh`
/// shows it (`proto 76`): what tells lbd's entries from the host's own when lbd removes them.
pub const NEIGH_PROTOCOL: u8 = 76;

/// Where the kernel sends packets for a backend, as `ip route get ADDR` says: the neighbour to
/// resolve (the gateway, or the backend itself when it is on-link) and the interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct NextHop {
    pub neighbour: IpAddr,
    pub ifindex: u32,
}

/// A route netlink socket (`NETLINK_ROUTE`), opened in the calling thread's network namespace:
/// route lookups and managed neighbour entries without forking iproute2. Blocking, one
/// request at a time; each answer takes microseconds (no sleeping in the kernel: a managed
/// entry is resolved in the background).
pub struct Rtnl {
    socket: netlink_sys::Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl Rtnl {
    pub fn open() -> Result<Rtnl> {
        let mut socket = netlink_sys::Socket::new(netlink_sys::protocols::NETLINK_ROUTE)
            .context("opening a route netlink socket")?;
        socket
            .bind_auto()
            .context("binding the route netlink socket")?;
        socket
            .connect(&netlink_sys::SocketAddr::new(0, 0))
            .context("connecting the route netlink socket to the kernel")?;
        Ok(Rtnl {
            socket,
            seq: 0,
            buf: vec![0; 16 * 1024],
        })
    }

    /// Sends one request and returns the kernel's answer: the message it carried, or `None`
    /// for an acknowledgement. A netlink error comes back as the OS error it names.
    fn request(
        &mut self,
        flags: u16,
        msg: RouteNetlinkMessage,
    ) -> std::io::Result<Option<RouteNetlinkMessage>> {
        use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload};
        self.seq = self.seq.wrapping_add(1);
        let mut req = NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::from(msg));
        req.header.flags = flags;
        req.header.sequence_number = self.seq;
        req.finalize();
        let mut out = vec![0; req.buffer_len()];
        req.serialize(&mut out);
        self.socket.send(&out, 0)?;
        loop {
            let n = self.socket.recv(&mut &mut self.buf[..], 0)?;
            let mut at = 0;
            while at < n {
                let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&self.buf[at..n])
                    .map_err(|e| {
                        std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            format!("undecodable netlink answer: {e}"),
                        )
                    })?;
                let len = reply.header.length as usize;
                at += len.div_ceil(4) * 4;
                if reply.header.sequence_number != self.seq {
                    continue; // an answer to an earlier request that gave up
                }
                return match reply.payload {
                    NetlinkPayload::Error(e) if e.code.is_some() => Err(e.to_io()),
                    NetlinkPayload::Error(_) | NetlinkPayload::Done(_) => Ok(None),
                    NetlinkPayload::InnerMessage(m) => Ok(Some(m)),
                    _ => continue,
                };
            }
        }
    }

    /// `ip route get ADDR` (RTM_GETROUTE): the neighbour packets to `addr` go to, and the
    /// interface they leave by.
    pub fn route_get(&mut self, addr: IpAddr) -> Result<NextHop> {
        use netlink_packet_route::{
            route::{RouteAddress, RouteAttribute, RouteMessage, RouteVia},
            AddressFamily,
        };
        let mut m = RouteMessage::default();
        (m.header.address_family, m.header.destination_prefix_length) = match addr {
            IpAddr::V4(_) => (AddressFamily::Inet, 32),
            IpAddr::V6(_) => (AddressFamily::Inet6, 128),
        };
        m.attributes
            .push(RouteAttribute::Destination(RouteAddress::from(addr)));
        let answer = self
            .request(
                netlink_packet_core::NLM_F_REQUEST,
                RouteNetlinkMessage::GetRoute(m),
            )
            .map_err(|e| anyhow!("no route to {addr}: {e}"))?;
        let Some(RouteNetlinkMessage::NewRoute(route)) = answer else {
            bail!("no route to {addr}: the kernel answered the route lookup with no route");
        };
        let mut hop = NextHop {
            neighbour: addr,
            ifindex: 0,
        };
        for a in route.attributes {
            match a {
                RouteAttribute::Gateway(RouteAddress::Inet(g)) => hop.neighbour = g.into(),
                RouteAttribute::Gateway(RouteAddress::Inet6(g)) => hop.neighbour = g.into(),
                RouteAttribute::Via(RouteVia::Inet(g)) => hop.neighbour = g.into(),
                RouteAttribute::Via(RouteVia::Inet6(g)) => hop.neighbour = g.into(),
                RouteAttribute::Oif(i) => hop.ifindex = i,
                _ => {}
            }
        }
        if hop.ifindex == 0 {
            bail!("no route to {addr}: the route the kernel chose has no output interface");
        }
        Ok(hop)
    }

    /// Sends a dump request and collects every message of the answer (until NLMSG_DONE).
    fn dump(&mut self, msg: RouteNetlinkMessage) -> std::io::Result<Vec<RouteNetlinkMessage>> {
        use netlink_packet_core::{
            NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST,
        };
        self.seq = self.seq.wrapping_add(1);
        let mut req = NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::from(msg));
        req.header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        req.header.sequence_number = self.seq;
        req.finalize();
        let mut out = vec![0; req.buffer_len()];
        req.serialize(&mut out);
        self.socket.send(&out, 0)?;
        let mut got = Vec::new();
        loop {
            let n = self.socket.recv(&mut &mut self.buf[..], 0)?;
            let mut at = 0;
            while at < n {
                let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&self.buf[at..n])
                    .map_err(|e| {
                        std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            format!("undecodable netlink answer: {e}"),
                        )
                    })?;
                at += (reply.header.length as usize).div_ceil(4) * 4;
                if reply.header.sequence_number != self.seq {
                    continue;
                }
                match reply.payload {
                    NetlinkPayload::Error(e) if e.code.is_some() => return Err(e.to_io()),
                    NetlinkPayload::Done(_) | NetlinkPayload::Error(_) => return Ok(got),
                    NetlinkPayload::InnerMessage(m) => got.push(m),
                    _ => {}
                }
            }
        }
    }

    /// The neighbour entries lbd installed (tagged [`NEIGH_PROTOCOL`]), in every interface of
    /// this network namespace: `ip neigh show proto 76`.
    pub fn lbd_neighbours(&mut self) -> Result<Vec<NextHop>> {
        use netlink_packet_route::neighbour::{
            NeighbourAddress, NeighbourAttribute, NeighbourMessage,
        };
        let mut out = Vec::new();
        for family in [
            netlink_packet_route::AddressFamily::Inet,
            netlink_packet_route::AddressFamily::Inet6,
        ] {
            let mut m = NeighbourMessage::default();
            m.header.family = family;
            let answer = self
                .dump(RouteNetlinkMessage::GetNeighbour(m))
                .map_err(|e| anyhow!("listing the neighbour table: {e}"))?;
            for msg in answer {
                let RouteNetlinkMessage::NewNeighbour(n) = msg else {
                    continue;
                };
                let mut ours = false;
                let mut addr = None;
                for a in &n.attributes {
                    match a {
                        NeighbourAttribute::Protocol(p) => ours = u8::from(*p) == NEIGH_PROTOCOL,
                        NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => {
                            addr = Some(IpAddr::from(*a))
                        }
                        NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => {
                            addr = Some(IpAddr::from(*a))
                        }
                        _ => {}
                    }
                }
                if let (true, Some(neighbour)) = (ours, addr) {
                    out.push(NextHop {
                        neighbour,
                        ifindex: n.header.ifindex,
                    });
                }
            }
        }
        Ok(out)
    }

    /// `ip neigh del NEIGHBOUR dev IF` (RTM_DELNEIGH). An entry already gone is not an error.
    pub fn neigh_delete(&mut self, hop: NextHop) -> Result<()> {
        use netlink_packet_core::{NLM_F_ACK, NLM_F_REQUEST};
        use netlink_packet_route::{
            neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage},
            AddressFamily,
        };
        let mut m = NeighbourMessage::default();
        m.header.family = match hop.neighbour {
            IpAddr::V4(_) => AddressFamily::Inet,
            IpAddr::V6(_) => AddressFamily::Inet6,
        };
        m.header.ifindex = hop.ifindex;
        m.attributes
            .push(NeighbourAttribute::Destination(match hop.neighbour {
                IpAddr::V4(a) => NeighbourAddress::Inet(a),
                IpAddr::V6(a) => NeighbourAddress::Inet6(a),
            }));
        match self.request(
            NLM_F_REQUEST | NLM_F_ACK,
            RouteNetlinkMessage::DelNeighbour(m),
        ) {
            Ok(_) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            Err(e) => Err(anyhow!(
                "removing the neighbour entry for {} on {}: {e}",
                hop.neighbour,
                ifname(hop.ifindex)
            )),
        }
    }

    /// Removes those of `hops` that lbd installed (still tagged [`NEIGH_PROTOCOL`]: an entry an
    /// operator has replaced since is theirs and stays). Returns the ones removed.
    pub fn remove_lbd_neighbours(&mut self, hops: &[NextHop]) -> Result<Vec<NextHop>> {
        let ours = self.lbd_neighbours()?;
        let mut removed = Vec::new();
        for hop in hops.iter().filter(|h| ours.contains(h)) {
            self.neigh_delete(*hop)?;
            removed.push(*hop);
        }
        Ok(removed)
    }

    /// `ip neigh replace NEIGHBOUR dev IF managed protocol 76` (RTM_NEWNEIGH, create or
    /// replace, state NONE, NTF_EXT_MANAGED): the kernel resolves the entry and keeps it
    /// resolved. The protocol tag marks it as lbd's, so that lbd removes only its own entries.
    pub fn neigh_replace_managed(&mut self, hop: NextHop) -> Result<()> {
        use netlink_packet_core::{NLM_F_ACK, NLM_F_CREATE, NLM_F_REPLACE, NLM_F_REQUEST};
        use netlink_packet_route::{
            neighbour::{
                NeighbourAddress, NeighbourAttribute, NeighbourExtFlags, NeighbourMessage,
                NeighbourState,
            },
            AddressFamily,
        };
        let mut m = NeighbourMessage::default();
        m.header.family = match hop.neighbour {
            IpAddr::V4(_) => AddressFamily::Inet,
            IpAddr::V6(_) => AddressFamily::Inet6,
        };
        m.header.ifindex = hop.ifindex;
        m.header.state = NeighbourState::None;
        m.attributes
            .push(NeighbourAttribute::Destination(match hop.neighbour {
                IpAddr::V4(a) => NeighbourAddress::Inet(a),
                IpAddr::V6(a) => NeighbourAddress::Inet6(a),
            }));
        m.attributes
            .push(NeighbourAttribute::ExtFlags(NeighbourExtFlags::Managed));
        m.attributes.push(NeighbourAttribute::Protocol(
            netlink_packet_route::route::RouteProtocol::from(NEIGH_PROTOCOL),
        ));
        self.request(
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_REPLACE | NLM_F_CREATE,
            RouteNetlinkMessage::NewNeighbour(m),
        )
        .map_err(|e| {
            anyhow!(
                "managed neighbour entry for {} on {}: {e}",
                hop.neighbour,
                ifname(hop.ifindex)
            )
        })?;
        Ok(())
    }

    /// The XDP program on interface `ifindex` as the kernel reports it (RTM_GETLINK,
    /// IFLA_XDP: what `ip link` and `bpftool net show` print): its attach mode and program id,
    /// or `None` when no program is attached.
    pub fn xdp_of(&mut self, ifindex: u32) -> Result<Option<KernelXdp>> {
        use netlink_packet_route::link::{LinkAttribute, LinkMessage, LinkXdp, XdpAttached};
        let mut m = LinkMessage::default();
        m.header.index = ifindex;
        let answer = self
            .request(
                netlink_packet_core::NLM_F_REQUEST,
                RouteNetlinkMessage::GetLink(m),
            )
            .map_err(|e| anyhow!("reading {}'s XDP program: {e}", ifname(ifindex)))?;
        let Some(RouteNetlinkMessage::NewLink(link)) = answer else {
            bail!(
                "reading {}'s XDP program: the kernel sent no link",
                ifname(ifindex)
            );
        };
        let (mut mode, mut program_id) = (None, 0);
        for a in link.attributes {
            let LinkAttribute::Xdp(xdp) = a else { continue };
            for x in xdp {
                match x {
                    LinkXdp::Attached(XdpAttached::None) => mode = None,
                    LinkXdp::Attached(XdpAttached::Driver) => mode = Some(AyaXdpMode::Driver),
                    LinkXdp::Attached(XdpAttached::SocketBuffer) => mode = Some(AyaXdpMode::Skb),
                    LinkXdp::Attached(XdpAttached::Hardware) => mode = Some(AyaXdpMode::Hardware),
                    LinkXdp::Attached(_) => mode = Some(AyaXdpMode::Default),
                    LinkXdp::ProgId(id) => program_id = id,
                    _ => {}
                }
            }
        }
        Ok(mode.map(|mode| KernelXdp { mode, program_id }))
    }

    /// The next hop towards `addr`, and a managed neighbour entry for it.
    pub fn ensure_neighbour(&mut self, addr: IpAddr) -> Result<NextHop> {
        let hop = self.route_get(addr)?;
        self.neigh_replace_managed(hop)?;
        Ok(hop)
    }
}

/// An interface's name for messages (its index when it has none).
fn ifname(index: u32) -> String {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `buf` has room for IF_NAMESIZE bytes, as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if p.is_null() {
        return format!("interface {index}");
    }
    // SAFETY: on success the kernel wrote a NUL-terminated name into `buf`.
    unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

/// Asks the kernel to keep the next hop towards `addr` resolved ("managed" neighbour entry,
/// Linux 5.16+), so that `bpf_fib_lookup` finds its MAC address without traffic from the stack.
/// `_ifname` is kept for callers of the iproute2 version (the route names the interface).
pub fn ensure_neighbour(_ifname: &str, addr: IpAddr) -> Result<()> {
    Rtnl::open()?.ensure_neighbour(addr).map(|_| ())
}

/// `lbd cleanup`: removes every neighbour entry lbd installed in this network namespace
/// (tagged [`NEIGH_PROTOCOL`]); the host's own entries stay. Returns the ones removed.
pub fn remove_all_lbd_neighbours() -> Result<Vec<NextHop>> {
    let mut rtnl = Rtnl::open()?;
    let ours = rtnl.lbd_neighbours()?;
    for hop in &ours {
        rtnl.neigh_delete(*hop)?;
    }
    Ok(ours)
}

/// The managed neighbour entries `apply` asked the kernel for, by backend: an apply asks only
/// for backends it has not asked for yet (or whose request failed), so that a learning step
/// that changes weights does no kernel work at all. The kernel keeps a managed entry resolved
/// by itself; what can undo it (the interface going down flushes the entries, a route change
/// moves the next hop) shows as drops in `drop_fib`, and [`NextHops::resolve_all`] (called on
/// those, and when the interface comes back) asks for every backend again with fresh route
/// lookups.
#[derive(Debug, Default)]
pub struct NextHops {
    asked: std::collections::BTreeMap<IpAddr, NextHop>,
}

impl NextHops {
    /// Asks for the backends in `backends` not asked for yet, and forgets the ones no longer
    /// there. Returns the failures, by backend (they are asked for again next time).
    pub fn sync(
        &mut self,
        backends: &std::collections::BTreeSet<IpAddr>,
    ) -> Vec<(IpAddr, anyhow::Error)> {
        let gone: Vec<NextHop> = self
            .asked
            .iter()
            .filter(|(a, _)| !backends.contains(a))
            .map(|(_, h)| *h)
            .collect();
        self.asked.retain(|a, _| backends.contains(a));
        self.forget(gone);
        let todo: Vec<IpAddr> = backends
            .iter()
            .filter(|a| !self.asked.contains_key(a))
            .copied()
            .collect();
        self.ask(&todo)
    }

    /// Asks for every backend in `backends` again (route lookups included). Returns how many
    /// were asked for successfully, and the failures.
    pub fn resolve_all(
        &mut self,
        backends: &std::collections::BTreeSet<IpAddr>,
    ) -> (usize, Vec<(IpAddr, anyhow::Error)>) {
        self.asked.clear();
        let todo: Vec<IpAddr> = backends.iter().copied().collect();
        let failed = self.ask(&todo);
        (todo.len() - failed.len(), failed)
    }

    /// Removes the neighbour entries of removed backends' next hops that no remaining backend
    /// uses and that lbd installed: a removed backend leaves no `managed FAILED` entry behind.
    fn forget(&mut self, gone: Vec<NextHop>) {
        let mut gone: Vec<NextHop> = gone
            .into_iter()
            .filter(|h| !self.asked.values().any(|k| k == h))
            .collect();
        gone.sort();
        gone.dedup();
        if gone.is_empty() {
            return;
        }
        match Rtnl::open().and_then(|mut r| r.remove_lbd_neighbours(&gone)) {
            Ok(removed) => {
                for h in removed {
                    tracing::info!(neighbour = %h.neighbour, "removed the managed neighbour entry lbd installed for a removed backend");
                }
            }
            Err(e) => tracing::warn!("removing the neighbour entries of removed backends: {e:#}"),
        }
    }

    /// The backends asked for, with the next hop their route had then.
    pub fn asked(&self) -> impl Iterator<Item = (&IpAddr, &NextHop)> {
        self.asked.iter()
    }

    fn ask(&mut self, todo: &[IpAddr]) -> Vec<(IpAddr, anyhow::Error)> {
        if todo.is_empty() {
            return Vec::new();
        }
        // A socket per batch, opened by the calling thread: in its network namespace, as the
        // forked `ip` was.
        let mut rtnl = match Rtnl::open() {
            Ok(r) => r,
            Err(e) => {
                let msg = format!("{e:#}");
                return todo.iter().map(|a| (*a, anyhow!("{msg}"))).collect();
            }
        };
        let mut failed = Vec::new();
        for a in todo {
            match rtnl.ensure_neighbour(*a) {
                Ok(hop) => {
                    self.asked.insert(*a, hop);
                }
                Err(e) => failed.push((*a, e)),
            }
        }
        failed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_up_and_unknown_names_are_errors() {
        let lo = link_state("lo").expect("lo exists");
        assert!(lo.up, "{lo:?}");
        let e = link_state("no-such-if9").unwrap_err();
        assert!(format!("{e:#}").contains("no-such-if9"), "{e:#}");
        assert!(link_state("a-name-much-too-long-for-linux").is_err());
    }

    #[test]
    fn route_lookups_over_netlink_match_the_routing_table() {
        let mut rtnl = Rtnl::open().expect("route netlink socket");
        let lo = ifindex("lo").unwrap();
        let local: IpAddr = "127.0.0.1".parse().unwrap();
        assert_eq!(
            rtnl.route_get(local).unwrap(),
            NextHop {
                neighbour: local,
                ifindex: lo
            }
        );
        // Errors name what failed and why, as `ip neigh` would.
        let e = rtnl
            .neigh_replace_managed(NextHop {
                neighbour: "10.255.255.1".parse().unwrap(),
                ifindex: 0x7fff_fff0,
            })
            .unwrap_err();
        let msg = format!("{e:#}");
        assert!(
            msg.contains("managed neighbour entry for 10.255.255.1 on interface 2147483632"),
            "{msg}"
        );
    }
}
