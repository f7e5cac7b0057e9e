//! `lbctl --etcd URL --prefix P ...`: changes written to the fleet's configuration in etcd
//! (every node applies them), and `cluster status`.
use super::{change_of, print_json, Failure};
use lb_userspace::{
    cli::{ClusterCommand, LbctlCommand as Command},
    control::BgpStatus,
    fleet::{
        etcd::Etcd,
        store::{self, ClusterStatus},
    },
};

pub fn run(urls: &str, prefix: &str, command: Command, json: bool) -> Result<(), Failure> {
    let etcd = Etcd::try_new(urls).map_err(|e| Failure::Usage(format!("{e:#}")))?;
    let prefix = store::normalize_prefix(prefix).map_err(|e| Failure::Usage(format!("{e:#}")))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::Unreachable(format!("starting the runtime: {e}")))?;
    // An unreachable store is exit 3, like an unreachable lbd; anything else was refused.
    let failure = |e: anyhow::Error| {
        let msg = format!("{e:#}");
        if msg.starts_with("etcd unreachable") {
            Failure::Unreachable(msg)
        } else {
            Failure::Refused(msg)
        }
    };
    if let Command::Cluster(ClusterCommand::Status) = command {
        let s = rt
            .block_on(store::cluster_status(&etcd, &prefix))
            .map_err(failure)?;
        if json {
            print_json(&s);
        } else {
            print_cluster(&s);
        }
        return Ok(());
    }
    let Some(req) = change_of(&command) else {
        return Err(Failure::Usage(
            "with --etcd, lbctl writes changes to the fleet's configuration and shows `cluster status`; for lists, stats and status ask one node (without --etcd, with its --socket)".into(),
        ));
    };
    let c = rt
        .block_on(store::write(&etcd, &prefix, &req))
        .map_err(failure)?;
    if json {
        print_json(&c);
    } else {
        println!("{}", c.message);
    }
    Ok(())
}

fn print_cluster(s: &ClusterStatus) {
    println!("prefix     {}", s.prefix);
    println!("revision   {} (configuration)", s.config_revision);
    println!(
        "leader     {}",
        s.leader.as_deref().unwrap_or("none (election pending)")
    );
    if let Some(r) = s.weights_config_revision {
        println!("weights    published for revision {r}");
    }
    if let Some(e) = &s.config_error {
        println!("BAD DATA   {e}");
    }
    println!(
        "\n{:<20} {:<9} {:>9} {:>8} {:>5}  STATE",
        "NODE", "ROLE", "REVISION", "WEIGHTS", "VIPS"
    );
    for n in &s.nodes {
        let state = match &n.last_error {
            Some(e) => format!("error: {e}"),
            None if n.applied_revision == s.config_revision => "in sync".into(),
            None => "behind".into(),
        };
        println!(
            "{:<20} {:<9} {:>9} {:>8} {:>5}  {state}",
            n.node, n.role, n.applied_revision, n.applied_weights_revision, n.vips
        );
        if let Some(b) = &n.bgp {
            println!("{:<20} {}", "", bgp_line(b));
        }
    }
    if s.nodes.is_empty() {
        println!("(no node reports under this prefix)");
    }
}

/// A node's BGP side in one line: `bgp serving, sessions 2/2 established (...), announces ...`.
fn bgp_line(b: &BgpStatus) -> String {
    let up = b.sessions.iter().filter(|s| s.established).count();
    let down: Vec<String> = b
        .sessions
        .iter()
        .filter(|s| !s.established)
        .map(|s| format!("{} {}", s.peer, s.state))
        .collect();
    let mut line = format!(
        "bgp {}, sessions {up}/{} established",
        b.node,
        b.sessions.len()
    );
    if !down.is_empty() {
        line.push_str(&format!(" (DOWN: {})", down.join(", ")));
    }
    if b.announced.is_empty() {
        line.push_str(", announces nothing");
    } else {
        line.push_str(&format!(", announces {}", b.announced.join(" ")));
    }
    for w in &b.withheld {
        line.push_str(&format!(", withholds {} ({})", w.prefix, w.reason));
    }
    line
}
