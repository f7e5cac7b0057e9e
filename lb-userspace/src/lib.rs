//! The userspace side of lb: the agent `lbd` and its library (loading and attaching the XDP
//! programs, building Maglev tables, applying configuration).
pub mod agent;
pub mod cli;
pub mod config;
pub mod control;
pub mod datapath;
pub mod decap;
pub mod events;
pub mod health;
pub mod learning;
pub mod metrics;
pub mod netif;
pub mod notify;
pub mod pool;
pub mod security;
pub mod tables;

pub use config::Config;
pub use datapath::{Balancer, LoadOptions};
pub use decap::Decap;

/// The build script's BTF name fix, tested on the host (see `ebpf_btf.rs`).
#[cfg(test)]
#[path = "../ebpf_btf.rs"]
mod ebpf_btf;
