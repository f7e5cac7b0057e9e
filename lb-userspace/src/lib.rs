//! The userspace side of lb: the agent `lbd` and its library (loading and attaching the XDP
//! programs, building Maglev tables, applying configuration).
//!
//! Rooms, each importing only the ones before it (tests/architecture.rs checks there is no
//! circle): `health` (probes and backend states, and the `[vip.health]` settings), `config`,
//! `datapath` (the kernel side), `learning` (the weight model), `control` (the API, its socket
//! and the journal), `agent` (the owner that wires them), `fleet` (etcd, leadership, BGP
//! announcements: it drives the agent like the control socket does and its loops report back
//! to it), then `metrics`; `cli`, `notify` and `security` serve the binaries.
pub mod agent;
pub mod cli;
pub mod config;
pub mod control;
pub mod datapath;
pub mod fleet;
pub mod health;
pub mod learning;
pub mod metrics;
pub mod notify;
pub mod security;

pub use config::Config;
pub use datapath::decap::Decap;
pub use datapath::{Balancer, LoadOptions};
// Older paths, still used by tests/, xtask/ (`netif`) and the weight model (`tables`).
pub use datapath::{netif, tables};

/// The build script's BTF name fix, tested on the host (see `ebpf_btf.rs`).
#[cfg(test)]
#[path = "../ebpf_btf.rs"]
mod ebpf_btf;
