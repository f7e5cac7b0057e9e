//! The fleet room: what makes one lbd a node among several behind ECMP, with one
//! configuration in etcd (`lbd --etcd URL[,URL] --prefix P`). `etcd` is the client (etcd's JSON
//! gateway over plain HTTP), `store` the layout under the prefix and `lbctl`'s writes, `node`
//! each lbd's loop (watch, apply, election, the leader's published weights, the node's report);
//! [`bgp`] announces the VIPs this node can serve through a node-local BIRD. It sits above the
//! agent: its loops drive the agent like the control socket does ([`crate::agent::Agent::node_inputs`]
//! for BGP) and report back to it. See docs/cluster.md.
pub mod bgp;
pub mod etcd;
pub mod node;
pub mod store;
