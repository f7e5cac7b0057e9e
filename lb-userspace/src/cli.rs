//! Command lines of the shipped binaries, kept in the library so that `cargo xtask install`
//! can generate their man pages and shell completions from the same definitions the binaries
//! parse (`clap::CommandFactory`), with nothing duplicated.
//!
//! Adding a binary: define its `Parser` here, give it a `*_command()` builder and list it in
//! [`shipped_commands`]; the binary parses with `Cli::parse()` as usual.
use crate::config::XdpMode;
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
    /// Configuration file (TOML).
    #[arg(long, short, default_value = "/etc/lb/lbd.toml", value_hint = clap::ValueHint::FilePath)]
    pub config: PathBuf,
    /// Validate the configuration and exit.
    #[arg(long)]
    pub check: bool,
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
    Cleanup,
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

/// `lbd`'s command definition (for man pages and completions).
pub fn lbd_command() -> clap::Command {
    LbdCli::command()
}

/// Every shipped binary whose command line lives here, by binary name. `cargo xtask install`
/// writes a man page and bash/zsh/fish completions for each.
pub fn shipped_commands() -> Vec<clap::Command> {
    vec![lbd_command()]
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
    fn lbd_parses_its_flags() {
        let cli = LbdCli::parse_from(["lbd", "--config", "x.toml", "--check"]);
        assert!(cli.check && cli.config == std::path::Path::new("x.toml"));
        let cli = LbdCli::parse_from(["lbd", "decap", "--interface", "eth0", "--vip", "10.0.0.1"]);
        assert!(matches!(cli.command, Some(LbdCommand::Decap { .. })));
    }
}
