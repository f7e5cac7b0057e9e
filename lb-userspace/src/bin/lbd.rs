//! `lbd`: the load balancer agent.
//!
//! `lbd --config FILE` loads the XDP balancer, attaches it to the configured interface, builds
//! every VIP's Maglev table and keeps running until SIGINT or SIGTERM; SIGHUP re-reads the
//! configuration and applies the difference (a rejected file changes nothing). While running it
//! serves `lbctl` on its control socket (every accepted change is applied and written back to
//! the configuration file) and Prometheus metrics on `metrics_listen`.
//! `lbd decap --interface IF --vip ADDR...` runs on a backend host instead: it attaches the
//! decapsulation program so the host accepts IP-in-IP for its VIPs without a tunnel device.
use anyhow::{Context as _, Result};
use clap::Parser as _;
use lb_userspace::{
    agent::{Agent, ControlSocket},
    cli::{LbdCli as Cli, LbdCommand as Command},
    config::XdpMode,
    metrics, netif, notify, Balancer, Config, Decap, LoadOptions,
};
use std::net::IpAddr;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                // aya::bpf warns, with a full BTF dump, that the kernel rejects the object's
                // BTF (a union type from aya-log's globals) before loading without it, which
                // works: keep that out of operators' logs unless RUST_LOG asks for it.
                .unwrap_or_else(|_| "info,aya::bpf=error".into()),
        )
        .with_writer(std::io::stderr)
        // Colours only for a person at a terminal; journald and log files get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Decap {
            interface,
            vips,
            locals,
            xdp_mode,
        }) => run_decap(&interface, &vips, &locals, xdp_mode.into()).await,
        Some(Command::Cleanup) => cleanup(&cli.config),
        None if cli.check => Config::load(&cli.config)
            .map(|_| {
                println!("{}: ok", cli.config.display());
            })
            .map_err(Into::into),
        None => run_balancer(&cli.config).await,
    };
    if let Err(e) = result {
        error!("{e:#}");
        eprintln!("lbd: error: {e:#}");
        std::process::exit(1);
    }
}

async fn run_balancer(path: &std::path::Path) -> Result<()> {
    lb_userspace::security::check_config_path(path)?;
    let cfg = Config::load(path)?;
    lb_userspace::security::check_state_dirs(&cfg)?;
    // A missing interface is the likeliest mistake: say so before anything else is set up.
    netif::ifindex(&cfg.interface)?;
    // The control socket and the metrics port next: if either is unusable, fail before the
    // datapath is touched.
    let control = ControlSocket::bind(&cfg)?;
    let metrics_listener = metrics::bind(cfg.metrics_listen).await?;
    let mut lb = Balancer::load(LoadOptions::from(&cfg))?;
    // The datapath's rare events (aya-log records) go to lbd's log.
    if let Some(logger) = lb.take_logger() {
        // SAFETY: the logger owns its ring buffer's fd, which stays open and the same for as
        // long as the AsyncFd owns the logger.
        let mut logger = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
        }
        .map_err(|e| anyhow::anyhow!("watching the datapath's log: {e}"))?;
        tokio::spawn(async move {
            while let Ok(mut guard) = logger.readable_mut().await {
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
        });
    }
    // Tables first, then attach: the first packet already sees every VIP.
    let report = lb.apply(&cfg)?;
    let mode = lb.attach(&cfg.interface, cfg.xdp_mode)?;
    // Now that the interface is known, keep every backend's next hop resolved.
    lb.apply(&cfg)?;
    info!(
        interface = %cfg.interface,
        mode = ?mode,
        vips = cfg.vips.len(),
        tables_changed = report.tables.len(),
        resumed = lb.resumed(),
        pinned = lb.pin_dir().is_some(),
        control_socket = %control.path().display(),
        metrics = %cfg.metrics_listen,
        "lbd ready"
    );
    notify::balancer_ready(&cfg);
    let _watchdog = notify::spawn_watchdog();
    // From here on the agent owns the balancer and the configuration: lbctl changes, SIGHUP
    // reloads and metrics scrapes go through it one at a time.
    let agent = Agent::new(path, cfg, lb);
    // Health checks of the VIPs with [vip.health]; their transitions re-apply the datapath.
    agent.start_health().await?;
    let control_task = tokio::spawn(control.serve(agent.clone()));
    let metrics_task = tokio::spawn(metrics::serve(metrics_listener, agent.clone()));
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    // Next hops flushed under the datapath (an interface flap) are resolved again within 1 s.
    let mut heal = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = heal.tick() => {
                match agent.with_balancer(|lb, _| lb.heal_next_hops()).await {
                    Ok(true) => info!("the datapath dropped packets for want of a next hop: resolved the backends' next hops again"),
                    Ok(false) => {}
                    Err(e) => error!("checking the datapath's next hops: {e:#}"),
                }
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                notify::reloading();
                match agent.reload().await {
                    Ok(r) => {
                        for (vip, moved, generation) in &r.tables {
                            info!(%vip, moved, generation, "table updated");
                        }
                        info!(
                            vips_added = r.vips_added,
                            vips_removed = r.vips_removed,
                            backends_added = r.backends_added,
                            backends_removed = r.backends_removed,
                            "configuration reloaded"
                        );
                    }
                    Err(e) => error!("{e:#}"),
                }
                notify::balancer_ready(&agent.config().await);
            }
        }
    }
    notify::stopping();
    // No more changes: stop serving (the control socket's file is removed as its task drops).
    control_task.abort();
    metrics_task.abort();
    let _ = control_task.await;
    let _ = metrics_task.await;
    let interface = agent.config().await.interface;
    agent
        .with_balancer(|lb, _| {
            match lb.pin_dir() {
                Some(dir) => info!(
                    "stopping; the datapath keeps running, pinned in {} (`lbd cleanup` removes it)",
                    dir.display()
                ),
                None => info!("stopping: detaching from {interface}"),
            }
            lb.detach()
        })
        .await?;
    Ok(())
}

/// `lbd cleanup`: detach and remove everything pinned in the configured pin_dir.
fn cleanup(path: &std::path::Path) -> Result<()> {
    let cfg = Config::load(path)?;
    if cfg.pin_dir.is_empty() {
        println!("pin_dir is empty: nothing is pinned, nothing to remove");
        return Ok(());
    }
    let removed = lb_userspace::datapath::remove_pins(std::path::Path::new(&cfg.pin_dir))?;
    println!(
        "removed {} pinned objects from {}",
        removed.len(),
        cfg.pin_dir
    );
    Ok(())
}

async fn run_decap(
    interface: &str,
    vips: &[IpAddr],
    locals: &[IpAddr],
    mode: XdpMode,
) -> Result<()> {
    let mut d = Decap::load()?;
    for v in vips {
        d.add_vip(*v)?;
    }
    let mut all_locals =
        netif::interface_addrs(interface).context("reading the interface's addresses")?;
    all_locals.extend_from_slice(locals);
    for a in &all_locals {
        d.add_local(*a)?;
    }
    let used = d.attach(interface, mode)?;
    info!(%interface, mode = ?used, vips = vips.len(), locals = all_locals.len(), "lbd decap ready");
    notify::decap_ready(interface, vips.len());
    let _watchdog = notify::spawn_watchdog();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
    notify::stopping();
    Ok(())
}
