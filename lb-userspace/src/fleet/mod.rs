//! The fleet room: what makes one lbd a node among several behind ECMP. [`bgp`] announces the
//! VIPs this node can serve through a node-local BIRD. It sits beside `control`, below the
//! agent, which owns it.
pub mod bgp;
