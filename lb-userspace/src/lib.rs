//! The userspace side of lb: the agent `lbd` and its library (loading and attaching the XDP
//! programs, building Maglev tables, applying configuration).
pub mod agent;
pub mod cli;
pub mod config;
pub mod control;
pub mod datapath;
pub mod health;
pub mod metrics;
pub mod model;
pub mod notify;
pub mod security;

pub use config::Config;
pub use datapath::decap::Decap;
pub use datapath::{Balancer, LoadOptions};
// Older paths, still used by tests/, xtask/ (`netif`) and the weight model (`tables`).
pub use datapath::{netif, tables};
