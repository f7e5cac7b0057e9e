//! Small facts about interfaces and the kernel's neighbour table that the datapath relies on.
use anyhow::{anyhow, bail, Context as _, Result};
use std::{ffi::CString, net::IpAddr, process::Command};

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
        let ifname = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }.to_string_lossy();
        if ifname != name {
            continue;
        }
        // SAFETY: ifa_addr points to a sockaddr whose family says which struct it is.
        unsafe {
            match (*ifa.ifa_addr).sa_family as i32 {
                libc::AF_INET => {
                    let sa = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                    out.push(IpAddr::from(u32::from_be(sa.sin_addr.s_addr).to_be_bytes()));
                }
                libc::AF_INET6 => {
                    let sa = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                    out.push(IpAddr::from(sa.sin6_addr.s6_addr));
                }
                _ => {}
            }
        }
    }
    // SAFETY: frees the list returned by getifaddrs above.
    unsafe { libc::freeifaddrs(ifap) };
    Ok(out)
}

/// Asks the kernel to keep the next hop towards `addr` resolved ("managed" neighbour entry,
/// Linux 5.16+), so that `bpf_fib_lookup` finds its MAC address without traffic from the stack.
pub fn ensure_neighbour(ifname: &str, addr: IpAddr) -> Result<()> {
    let out = Command::new("ip")
        .arg("route")
        .arg("get")
        .arg(addr.to_string())
        .output()
        .context("running `ip route get` (is iproute2 installed?)")?;
    if !out.status.success() {
        bail!(
            "no route to {addr}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let words: Vec<&str> = text.split_whitespace().collect();
    let after = |w: &str| {
        words
            .iter()
            .position(|x| *x == w)
            .and_then(|i| words.get(i + 1))
            .copied()
    };
    let via = after("via").unwrap_or(&addr.to_string()).to_string();
    let dev = after("dev").unwrap_or(ifname).to_string();
    let st = Command::new("ip")
        .args(["neigh", "replace", &via, "dev", &dev, "managed"])
        .output()?;
    if !st.status.success() {
        bail!(
            "ip neigh replace {via} dev {dev} managed: {}",
            String::from_utf8_lossy(&st.stderr).trim()
        );
    }
    Ok(())
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
}
