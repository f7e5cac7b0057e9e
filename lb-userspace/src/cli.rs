//! Command lines of the shipped binaries, kept in the library so that `cargo xtask install`
//! can generate their man pages and shell completions from the same definitions the binaries
//! parse (`clap::CommandFactory`), with nothing duplicated.
//!
//! Adding a binary: define its `Parser` here, give it a `*_command()` builder and list it in
//! [`shipped_commands`]; the binary parses with `Cli::parse()` as usual.
use crate::{
    config::{Forwarding, XdpMode, DEFAULT_CONTROL_SOCKET},
    control::{parse_backend_address, VipName},
};
use clap::{CommandFactory, Parser, Subcommand};
use std::{net::IpAddr, path::PathBuf};

/// `lbd`: the load balancer agent.
#[derive(Parser, Debug)]
#[command(
    name = "lbd",
    version,
    about = "XDP Maglev load balancer agent",
    long_about = "XDP Maglev load balancer agent.\n\n\
        Without a subcommand, lbd loads the balancer, attaches it to the configured interface, \
        builds every VIP's Maglev table and runs until SIGTERM or SIGINT (which detach it). \
        SIGHUP re-reads the configuration file and applies the difference; a rejected file \
        changes nothing. Under systemd (Type=notify) it reports readiness, reloads and \
        watchdog keep-alives through $NOTIFY_SOCKET."
)]
pub struct LbdCli {
    /// Configuration file (TOML). Also accepted after the subcommand (`lbd cleanup --config X`).
    #[arg(long, short, global = true, default_value = "/etc/lb/lbd.toml", value_hint = clap::ValueHint::FilePath)]
    pub config: PathBuf,
    /// Validate the configuration and exit.
    #[arg(long)]
    pub check: bool,
    /// Fleet mode: take the VIPs and backends from etcd (endpoints http://HOST:PORT, comma
    /// separated) instead of the file, which keeps the node's own settings.
    #[arg(long, value_name = "URL[,URL]", requires = "prefix")]
    pub etcd: Option<String>,
    /// Fleet mode: the key prefix of this fleet in etcd (e.g. /lb/fleet1).
    #[arg(long, value_name = "PREFIX", requires = "etcd")]
    pub prefix: Option<String>,
    /// Fleet mode: this node's name in the fleet (default: the host name).
    #[arg(long, value_name = "NAME")]
    pub node: Option<String>,
    /// With --check: also say what reloading the running lbd with this file would do to the
    /// Maglev tables (slots gained or lost per backend, share of new flows that would move).
    #[arg(long, requires = "check")]
    pub diff: bool,
    #[command(subcommand)]
    pub command: Option<LbdCommand>,
}

#[derive(Subcommand, Debug)]
pub enum LbdCommand {
    /// Run on a backend host: decapsulate IP-in-IP addressed to this host for the given VIPs.
    Decap {
        /// Interface that receives the balancer's packets.
        #[arg(long)]
        interface: String,
        /// A VIP served by this host (repeat for several).
        #[arg(long = "vip", required = true)]
        vips: Vec<IpAddr>,
        /// Extra local addresses accepted as outer destination (the interface's own are added).
        #[arg(long = "local")]
        locals: Vec<IpAddr>,
        #[arg(long, value_enum, default_value = "auto")]
        xdp_mode: ModeArg,
    },
    /// Take the datapath down for good: detach the program and remove the pinned maps (and
    /// with them every established flow) from the configuration's pin_dir. A stopped lbd
    /// leaves its datapath running on purpose, so that restarts and upgrades are hitless.
    ///
    /// Refused (exit status 2) while an lbd answers on the configuration's control_socket:
    /// that lbd would go on writing to maps that no longer exist. Stop it first.
    Cleanup {
        /// Clean up even though an lbd is running: it is left without a datapath (no program
        /// attached, its maps unpinned) until it is restarted.
        #[arg(long)]
        force: bool,
    },
}

/// XDP attach mode on the command line.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum ModeArg {
    Auto,
    Native,
    Generic,
}

impl From<ModeArg> for XdpMode {
    fn from(m: ModeArg) -> Self {
        match m {
            ModeArg::Auto => XdpMode::Auto,
            ModeArg::Native => XdpMode::Native,
            ModeArg::Generic => XdpMode::Generic,
        }
    }
}

/// `lbctl`: the operator's command line for a running lbd (`src/bin/lbctl.rs`).
#[derive(Parser, Debug)]
#[command(
    name = "lbctl",
    version,
    about = "Control a running lbd: VIPs, backends, weights, drains, statistics",
    long_about = "Control a running lbd over its control socket: add and remove VIPs and \
        backends, change weights, drain backends, read statistics and status. Every change is \
        applied to the datapath and written to lbd's configuration file, or refused whole.\n\n\
        VIPs are written ADDRESS:PORT/PROTOCOL: 10.0.0.1:80/tcp, [2001:db8::1]:443/udp.\n\n\
        Exit status: 0 done, 1 refused by lbd (reason on stderr), 2 bad command line, \
        3 lbd not reachable (not running, wrong --socket, or no permission), \
        4 backend drain --wait timed out with active connections left (how many on stderr)."
)]
pub struct LbctlCli {
    /// lbd's control socket (control_socket in lbd.toml).
    #[arg(long, global = true, default_value = DEFAULT_CONTROL_SOCKET, value_name = "PATH")]
    pub socket: PathBuf,
    /// Print JSON for scripts (field names are stable; see the README).
    #[arg(long, global = true)]
    pub json: bool,
    /// Fleet mode: write changes to the fleet's configuration in etcd (http://HOST:PORT,
    /// comma separated) instead of one lbd; every node applies them.
    #[arg(long, global = true, value_name = "URL[,URL]", requires = "prefix")]
    pub etcd: Option<String>,
    /// Fleet mode: the fleet's key prefix in etcd (as given to lbd --prefix).
    #[arg(long, global = true, value_name = "PREFIX", requires = "etcd")]
    pub prefix: Option<String>,
    /// With a change (vip add/remove, backend add/remove/set-weight/drain/undrain): say what
    /// it would do to the tables (slots each backend gains or loses, share of new flows that
    /// would move) after the same checks, and change nothing.
    #[arg(long, global = true)]
    pub dry_run: bool,
    #[command(subcommand)]
    pub command: LbctlCommand,
}

#[derive(Subcommand, Debug)]
pub enum LbctlCommand {
    /// Add, remove or list VIPs.
    #[command(subcommand)]
    Vip(VipCommand),
    /// Add, remove, reweight, drain or list backends.
    #[command(subcommand)]
    Backend(BackendCommand),
    /// Learned weights ([vip.learning]): models, fit quality, weights and their reasons.
    #[command(subcommand)]
    Model(ModelCommand),
    /// Packets, bytes and new flows per VIP and backend, with rates.
    Stats {
        /// Refresh every SECS seconds (default 2) until Ctrl-C.
        #[arg(long, value_name = "SECS", num_args = 0..=1, default_missing_value = "2", value_parser = parse_secs)]
        watch: Option<f64>,
        /// Seconds between the two samples rates are computed from (without --watch).
        #[arg(long, value_name = "SECS", default_value = "1", value_parser = parse_secs)]
        interval: f64,
    },
    /// Interface, XDP mode, program id, uptime and table generation per VIP; with [bgp], the
    /// sessions and the announced VIPs.
    Status,
    /// Tracked connections: client, VIP, backend, state, age and last packet.
    #[command(subcommand)]
    Conn(ConnCommand),
    /// Which backend a new flow from CLIENT would get now (the Maglev choice), and which it
    /// has if it is tracked. Without a port: each backend's share of the client's source
    /// ports, and the client's tracked flows.
    Lookup {
        vip: VipName,
        /// ADDRESS or ADDRESS:PORT ([ADDRESS]:PORT for IPv6).
        client: String,
    },
    /// The fleet (with --etcd and --prefix): nodes, their role and applied revision, leader.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// This node in a fleet ([bgp]): take it out of the routers' ECMP and back.
    #[command(subcommand)]
    Node(NodeCommand),
}

#[derive(Subcommand, Debug)]
pub enum ClusterCommand {
    /// Every node reporting under the prefix, the leader and the configuration's revision.
    Status,
}

#[derive(Subcommand, Debug)]
pub enum NodeCommand {
    /// Withdraw this node's BGP routes (routers send it no new flows) and keep forwarding the
    /// flows that still arrive; after the timeout the node reports `drained` (safe to stop).
    Drain {
        /// Seconds in `draining` (default: bgp.drain_timeout_seconds, 30).
        #[arg(long, value_name = "SECS")]
        timeout: Option<u64>,
    },
    /// Announce the VIPs this node can serve again.
    Undrain,
}

#[derive(Subcommand, Debug)]
pub enum ConnCommand {
    /// List tracked connections (like ipvsadm -Lnc), of one VIP or all.
    List {
        vip: Option<VipName>,
        /// Only the connections of this backend.
        #[arg(long, value_parser = parse_backend_address)]
        backend: Option<IpAddr>,
        /// At most N connections (the total that matched is still said).
        #[arg(long, value_name = "N")]
        limit: Option<u32>,
    },
}

#[derive(Subcommand, Debug)]
pub enum ModelCommand {
    /// Per backend: the fitted latency model or why there is none, predicted and observed
    /// latency, configured/current/target weight, pin and learning flags, and the last
    /// decisions with their reasons. Of one VIP, or of every VIP with learning enabled.
    Show { vip: Option<VipName> },
}

#[derive(Subcommand, Debug)]
pub enum VipCommand {
    /// Add a VIP (without backends).
    Add {
        /// ADDRESS:PORT/PROTOCOL, e.g. 10.0.0.1:80/tcp or [2001:db8::1]:443/tcp.
        vip: VipName,
        /// How packets reach backends.
        #[arg(long, value_enum, default_value = "ipip")]
        forwarding: ForwardingArg,
        /// Maglev table size: a prime from 7 to 1048573 (default 65537).
        #[arg(long, value_parser = parse_table_size, allow_negative_numbers = true)]
        table_size: Option<u32>,
        /// Accept a VIP that is an address of the balancer's own interface: its port is taken
        /// over from this host's own service (such as SSH).
        #[arg(long)]
        force: bool,
    },
    /// Remove a VIP and its backends (their connections end).
    Remove { vip: VipName },
    /// List VIPs.
    List,
}

#[derive(Subcommand, Debug)]
pub enum BackendCommand {
    /// Add a backend to a VIP.
    Add {
        vip: VipName,
        #[arg(value_parser = parse_backend_address)]
        address: IpAddr,
        /// Relative weight, 0 to 10000.
        #[arg(long, default_value = "1", value_parser = parse_weight, allow_negative_numbers = true)]
        weight: u32,
    },
    /// Remove a backend (its connections are steered to others).
    Remove {
        vip: VipName,
        #[arg(value_parser = parse_backend_address)]
        address: IpAddr,
        /// Do it even if it leaves the VIP no serving backend (all its traffic dropped).
        #[arg(long)]
        force: bool,
    },
    /// Change a backend's weight (0 to 10000).
    SetWeight {
        vip: VipName,
        #[arg(value_parser = parse_backend_address)]
        address: IpAddr,
        #[arg(value_parser = parse_weight, allow_negative_numbers = true)]
        weight: u32,
        /// Do it even if it leaves the VIP no serving backend (all its traffic dropped).
        #[arg(long)]
        force: bool,
    },
    /// Stop sending new flows to a backend; its established flows continue. With --wait,
    /// return when it has no active connection left (exit 0), or at --timeout with exit
    /// status 4 and how many are left.
    Drain {
        vip: VipName,
        #[arg(value_parser = parse_backend_address)]
        address: IpAddr,
        /// Do it even if it leaves the VIP no serving backend (all its traffic dropped).
        #[arg(long)]
        force: bool,
        /// Wait until the backend has no active connection (closing and idle ones do not
        /// count; see conn_idle_tcp_seconds).
        #[arg(long)]
        wait: bool,
        /// With --wait: give up after SECS seconds (exit status 4). Default: wait for ever.
        #[arg(long, value_name = "SECS", requires = "wait", value_parser = parse_drain_timeout)]
        timeout: Option<f64>,
    },
    /// Give a drained backend new flows again, at its weight.
    Undrain {
        vip: VipName,
        #[arg(value_parser = parse_backend_address)]
        address: IpAddr,
    },
    /// List the backends of one VIP, or of all.
    List { vip: Option<VipName> },
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum ForwardingArg {
    /// IP-in-IP to the backend, which decapsulates (`lbd decap`).
    Ipip,
    /// MAC rewrite: the backend is on the same segment, with the VIP on its loopback.
    L2,
}

impl From<ForwardingArg> for Forwarding {
    fn from(f: ForwardingArg) -> Self {
        match f {
            ForwardingArg::Ipip => Forwarding::Ipip,
            ForwardingArg::L2 => Forwarding::L2,
        }
    }
}

pub fn parse_weight(s: &str) -> Result<u32, String> {
    s.parse::<u32>()
        .map_err(|_| format!("weight {s:?} is not a whole number; use 0 to 10000"))
}

pub fn parse_table_size(s: &str) -> Result<u32, String> {
    s.parse::<u32>().map_err(|_| {
        format!(
            "table_size {s:?} is not a whole number; use a prime from 7 to 1048573, such as 65537"
        )
    })
}

pub fn parse_secs(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if (0.1..=3600.0).contains(&x) => Ok(x),
        _ => Err(format!("{s:?} is not a number of seconds from 0.1 to 3600")),
    }
}

/// `backend drain --wait --timeout`: up to a day (long-lived connections take long).
pub fn parse_drain_timeout(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if (0.1..=86_400.0).contains(&x) => Ok(x),
        _ => Err(format!(
            "--timeout {s:?} is not a number of seconds from 0.1 to 86400"
        )),
    }
}

/// `lbd`'s command definition (for man pages and completions).
pub fn lbd_command() -> clap::Command {
    LbdCli::command()
}

/// `lbctl`'s command definition (for man pages and completions).
pub fn lbctl_command() -> clap::Command {
    LbctlCli::command()
}

/// Every shipped binary whose command line lives here, by binary name. `cargo xtask install`
/// writes a man page and bash/zsh/fish completions for each.
pub fn shipped_commands() -> Vec<clap::Command> {
    vec![lbd_command(), lbctl_command()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_consistent() {
        for cmd in shipped_commands() {
            cmd.debug_assert();
        }
    }

    #[test]
    fn the_config_file_may_follow_the_subcommand() {
        for args in [
            ["lbd", "--config", "x.toml", "cleanup"],
            ["lbd", "cleanup", "--config", "x.toml"],
        ] {
            let cli = LbdCli::try_parse_from(args).expect("both orders parse");
            assert!(
                matches!(cli.command, Some(LbdCommand::Cleanup { force: false })),
                "{args:?}"
            );
            assert_eq!(cli.config, std::path::Path::new("x.toml"), "{args:?}");
        }
    }

    #[test]
    fn lbd_parses_its_flags() {
        let cli = LbdCli::parse_from(["lbd", "--config", "x.toml", "--check"]);
        assert!(cli.check && cli.config == std::path::Path::new("x.toml"));
        let cli = LbdCli::parse_from(["lbd", "decap", "--interface", "eth0", "--vip", "10.0.0.1"]);
        assert!(matches!(cli.command, Some(LbdCommand::Decap { .. })));
    }

    #[test]
    fn lbctl_parses_its_commands() {
        let cli = LbctlCli::parse_from([
            "lbctl",
            "--json",
            "backend",
            "set-weight",
            "[2001:db8::1]:443/tcp",
            "2001:db8::11",
            "7",
        ]);
        assert!(cli.json);
        assert!(matches!(
            cli.command,
            LbctlCommand::Backend(BackendCommand::SetWeight { weight: 7, .. })
        ));
        let cli = LbctlCli::parse_from(["lbctl", "stats", "--watch"]);
        assert!(matches!(
            cli.command,
            LbctlCommand::Stats {
                watch: Some(w),
                ..
            } if w == 2.0
        ));
        let err = |args: &[&str]| LbctlCli::try_parse_from(args).unwrap_err().to_string();
        assert!(err(&["lbctl", "vip", "add", "10.0.0.1:80"]).contains("the protocol is missing"));
        assert!(err(&[
            "lbctl",
            "backend",
            "set-weight",
            "10.0.0.1:80/tcp",
            "10.0.0.2",
            "-1"
        ])
        .contains("weight \"-1\" is not a whole number; use 0 to 10000"));
        assert!(err(&[
            "lbctl",
            "vip",
            "add",
            "10.0.0.1:80/tcp",
            "--forwarding",
            "gre"
        ])
        .contains("possible values: ipip, l2"));
    }
}
