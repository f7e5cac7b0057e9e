//! Fleet mode (`lbd --etcd URL[,URL] --prefix P`): many lbd nodes, one configuration in etcd.
//! `etcd` is the client (etcd's JSON gateway over plain HTTP), `store` the layout under the
//! prefix and `lbctl`'s writes, `node` each lbd's loop (watch, apply, election, the leader's
//! published weights, the node's report). See docs/cluster.md.
pub mod etcd;
pub mod node;
pub mod store;
