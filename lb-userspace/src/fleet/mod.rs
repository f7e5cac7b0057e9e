//! The fleet room: what makes one lbd a node among several behind ECMP. [`bgp`] announces the
//! VIPs this node can serve through a node-local BIRD. It sits above the agent: its loops ask
//! the agent ([`crate::agent::Agent::node_inputs`]) and report back to it.
pub mod bgp;
