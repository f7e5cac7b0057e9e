//! Network-namespace harness for lb's end-to-end tests (in `tests/tests/`) and for `xtask`.
//!
//! * [`NetNs`]: a namespace guard; run commands, spawn tracked processes, or run Rust code on a
//!   thread inside it ([`NetNs::run_in`], [`NetNs::thread`]).
//! * [`Lab`]: client, balancer and N backends bridged on one segment, with the VIPs
//!   [`VIP_V4`]/[`VIP_V6`] on the backends and routed via the balancer from the client.
//! * [`TcpServer`], [`client_once`], [`client_many`], [`LongLived`]: real TCP traffic with a
//!   tiny protocol (server sends its name line, then echoes lines).
//!
//! Everything here needs root; tests call [`require_root`] first so that running them
//! unprivileged fails loudly instead of silently skipping.
//!
//! ```no_run
//! use std::{net::SocketAddr, time::Duration};
//! use tests::{client_once, require_root, Lab, LabSpec, TcpServer};
//!
//! require_root();
//! let lab = Lab::new(LabSpec { backends: 2 }).unwrap();
//! let b0 = lab.backend(0);
//! let _srv = TcpServer::start(b0.ns(), &b0.sockaddrs(7000), "b0").unwrap();
//! let name = client_once(lab.client().ns(), SocketAddr::new(b0.v4().into(), 7000), Duration::from_secs(2)).unwrap();
//! assert_eq!(name, "b0");
//! lab.shutdown().unwrap();
//! ```

pub mod etcd;
pub mod fleet;
pub mod flood;
pub mod fuzz;
pub mod lab;
pub mod model;
pub mod netns;
pub mod plot;
pub mod procs;
pub mod promql;
pub mod tcp;
pub mod xdp;

pub use anyhow;
pub use lab::{
    backend_v4, backend_v6, root_links_named, Host, Lab, LabSpec, MacAddr, Role, BRIDGE,
    CLIENT_MTU, CLIENT_V4, CLIENT_V6, FABRIC_MTU, LB_V4, LB_V6, MAX_BACKENDS, NET_V4, NET_V6,
    PREFIX_V4, PREFIX_V6, VIP_V4, VIP_V6,
};
pub use netns::{cleanup_stale_namespaces, list_namespaces, unique_prefix, NetNs, NS_PREFIX};
pub use tcp::{client_many, client_once, tally, ConnFailure, ConnStatus, LongLived, TcpServer};

/// Whether the process runs as root (effective uid 0).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Fails unless running as root, naming the command (`cargo xtask <what>`) to run with sudo:
/// for xtask and the tools it runs (`lb-fuzz`, `lb-bpf-bench`).
pub fn ensure_root(what: &str) -> anyhow::Result<()> {
    if !is_root() {
        anyhow::bail!(
            "`cargo xtask {what}` needs root (network namespaces, veth, XDP, apt-get): \
             run `sudo cargo xtask {what}`"
        );
    }
    Ok(())
}

/// Panics unless running as root. Privileged tests call this first so that they fail (never
/// skip) when run without the privileges they need.
pub fn require_root() {
    if !is_root() {
        panic!(
            "privileged tests need root (network namespaces, veth, XDP): \
             run them with `sudo cargo xtask test`"
        );
    }
}
