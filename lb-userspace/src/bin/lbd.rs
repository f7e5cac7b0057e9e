//! `lbd`: the load balancer agent.
//!
//! `lbd --config FILE` loads the XDP balancer, attaches it to the configured interface, builds
//! every VIP's Maglev table and keeps running until SIGINT or SIGTERM; SIGHUP re-reads the
//! configuration and applies the difference (a rejected file changes nothing). While running it
//! serves `lbctl` on its control socket (every accepted change is applied and written back to
//! the configuration file) and Prometheus metrics on `metrics_listen`. What happens to it (how
//! it started, what a killed predecessor left unfinished, interface flaps, backends going down)
//! is kept for `lbctl status` (see `lb_userspace::control::events`).
//! `lbd decap --interface IF --vip ADDR...` runs on a backend host instead: it attaches the
//! decapsulation program so the host accepts IP-in-IP for its VIPs without a tunnel device.
use anyhow::{Context as _, Result};
use clap::Parser as _;
use lb_userspace::{
    agent::{xdp_mode_name, Agent},
    cli::{LbdCli as Cli, LbdCommand as Command},
    config::XdpMode,
    control::{
        events::{self, Journal, Kind},
        ControlSocket,
    },
    fleet::{bgp, etcd::Etcd, node::NodeOptions},
    metrics, netif, notify, Balancer, Config, Decap, LoadOptions,
};
use std::{
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info, warn};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
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
        Some(Command::Cleanup { force }) => cleanup(&cli.config, force),
        None if cli.check => check(&cli.config).and_then(|()| {
            if cli.diff {
                check_diff(&cli.config)
            } else {
                Ok(())
            }
        }),
        None => match fleet_options(&cli) {
            Ok(fleet) => run_balancer(&cli.config, fleet).await,
            Err(e) => Err(e),
        },
    };
    if let Err(e) = result {
        // Once, on stderr, where the journal reads it too (not also as a log record).
        eprintln!("lbd: error: {e:#}");
        // 2: understood and deliberately not done (see `Refused`); 1: anything else.
        let code = if e.downcast_ref::<Refused>().is_some() {
            2
        } else {
            1
        };
        std::process::exit(code);
    }
}

/// A command lbd understood and refuses to carry out as things stand (exit status 2), e.g.
/// `lbd cleanup` while an lbd runs on the datapath it would remove.
#[derive(Debug)]
struct Refused(String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

/// The lbd answering on `socket`, if one does: its `lbctl status`.
fn running_lbd(socket: &std::path::Path) -> Option<lb_userspace::control::Status> {
    let mut client = lb_userspace::control::Client::connect(socket).ok()?;
    let resp = client.call(&lb_userspace::control::Request::Status).ok()?;
    serde_json::from_value(resp.result).ok()
}

/// `lbd --check`: every validation `lbd` runs on the file at start, before touching anything
/// (in the same order, with the same errors), and, when an lbd answers on the file's control
/// socket, the one a reload runs: no key that only changes on restart may differ from what that
/// lbd runs with. Creates, mounts and binds nothing.
fn check(path: &std::path::Path) -> Result<()> {
    // Read first, so that a missing file is said as such; refused before anything is done.
    let cfg = Config::load(path)?;
    lb_userspace::security::check_config_path(path)?;
    lb_userspace::security::check_state_dirs(&cfg)?;
    netif::ifindex(&cfg.interface)?;
    lb_userspace::agent::check_host(&cfg)?;
    if let Some(g) = &cfg.control_group {
        lb_userspace::control::group_id(g)?;
    }
    if !cfg.pin_dir.is_empty() {
        lb_userspace::datapath::check_pin_dir(std::path::Path::new(&cfg.pin_dir))?;
    }
    if let Some((pid, running)) = running_config(&cfg.control_socket) {
        let fixed = running.restart_only_changes(&cfg);
        if !fixed.is_empty() {
            anyhow::bail!(
                "{} differ from what the lbd running on {} (pid {pid}) runs with, and only change on restart: a reload would be refused; restart lbd to apply them (systemctl restart lbd)",
                fixed.join(", "),
                cfg.control_socket.display()
            );
        }
    }
    // What start would log as a `config_warning`: said here too, on stderr, without failing.
    for (_, warning) in cfg.warnings() {
        eprintln!("lbd: warning: {warning}");
    }
    println!("{}: ok", path.display());
    Ok(())
}

/// `lbd --check --diff`: what a reload with the file would do to the running lbd's tables.
fn check_diff(path: &std::path::Path) -> Result<()> {
    let text = std::fs::read_to_string(path)?;
    let cfg = Config::parse(&text)?;
    let mut client = lb_userspace::control::Client::connect(&cfg.control_socket).map_err(|e| {
        anyhow::anyhow!("--diff compares with the running lbd, and none answers: {e}")
    })?;
    let resp = client.call(&lb_userspace::control::Request::ConfigDiff { text })?;
    if !resp.ok {
        anyhow::bail!("{}", resp.error.unwrap_or_default());
    }
    let d: lb_userspace::control::DryRun = serde_json::from_value(resp.result)?;
    print!("{d}");
    Ok(())
}

/// The configuration the lbd answering on `socket` runs with, and its pid.
fn running_config(socket: &std::path::Path) -> Option<(u32, Config)> {
    let pid = running_lbd(socket)?.pid;
    let mut client = lb_userspace::control::Client::connect(socket).ok()?;
    let resp = client
        .call(&lb_userspace::control::Request::RunningConfig)
        .ok()?;
    Some((pid, serde_json::from_value(resp.result).ok()?))
}

/// Runs the balancer; whatever the outcome, leaves lbd's run-state file saying how it ended
/// (removed on a clean exit, the error on a failed one), for the next lbd's journal.
async fn run_balancer(path: &std::path::Path, fleet: Option<NodeOptions>) -> Result<()> {
    let journal = Arc::new(Journal::new());
    let result = balance(path, &journal, fleet).await;
    match &result {
        Ok(()) => journal.clean_exit(),
        Err(e) => journal.exit_failed(&format!("{e:#}")),
    }
    result
}

/// `--etcd`, `--prefix`, `--node`: fleet mode's options, None without `--etcd`.
fn fleet_options(cli: &Cli) -> Result<Option<NodeOptions>> {
    let (Some(urls), Some(prefix)) = (&cli.etcd, &cli.prefix) else {
        return Ok(None);
    };
    let node = match &cli.node {
        Some(n) => n.clone(),
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .context("reading the host name for --node")?
            .trim()
            .to_string(),
    };
    if node.is_empty() || node.contains(['/', ' ']) {
        anyhow::bail!("--node {node:?}: give a name without '/' or spaces");
    }
    Ok(Some(NodeOptions {
        etcd: Etcd::try_new(urls)?,
        endpoints: urls.clone(),
        prefix: lb_userspace::fleet::store::normalize_prefix(prefix)?,
        node,
        lease: Arc::default(),
    }))
}

async fn balance(
    path: &std::path::Path,
    journal: &Arc<Journal>,
    fleet: Option<NodeOptions>,
) -> Result<()> {
    // Read first, so that a missing file is said as such (`--check` runs these in this order).
    let mut cfg = Config::load(path)?;
    if let Some(opts) = &fleet {
        // The store's VIPs from the first table on (a restart over pins keeps its tables).
        if let Some(vips) = lb_userspace::fleet::node::initial_vips(opts, &cfg).await {
            cfg.vips = vips;
        }
    }
    lb_userspace::security::check_config_path(path)?;
    lb_userspace::security::check_state_dirs(&cfg)?;
    // A missing interface is the likeliest mistake: say so before anything else is set up.
    netif::ifindex(&cfg.interface)?;
    lb_userspace::agent::check_host(&cfg)?;
    // The control socket and the metrics port next: if either is unusable, fail before the
    // datapath is touched.
    let control = ControlSocket::bind(&cfg)?;
    // No other lbd serves this socket now: what the run-state file holds is the last one's.
    let previous = journal.begin_run(&events::state_path(control.path()))?;
    // The operator's history: the events of the lbds before this one come first.
    if let Err(e) = journal.open_history(&events::history_path(control.path())) {
        warn!("{e:#}; lbctl status shows only this lbd's events");
    }
    let metrics_listener = metrics::bind(cfg.metrics_listen).await?;
    let mut lb = Balancer::load(LoadOptions::from(&cfg))?;
    let notes = journal.clone();
    lb.on_table_write(move |w| notes.table_write(w));
    // As found in the pins, before this lbd writes anything: tells whether a table write the
    // previous lbd was killed in had been published.
    let restored_generations = lb.vips().map(|v| (v.config.name(), v.generation)).collect();
    // The health the datapath had (restart from pins): kept, so that the restart is hitless;
    // a health-checked backend it did not have serving gets no flow before its first pass.
    let pins = lb_userspace::agent::PinnedHealth::read(&lb);
    let first = pins.startup_config(&cfg);
    forward_datapath_log(&mut lb)?;
    // Tables first, then attach: the first packet already sees every VIP.
    let report = lb.apply(&first)?;
    let mode = lb.attach(&cfg.interface, cfg.xdp_mode)?;
    let lb_mode_changed = lb.mode_changed_from();
    // Now that the interface is known, keep every backend's next hop resolved.
    lb.apply(&first)?;
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
    events::record_start(
        journal,
        &events::StartFacts {
            pins: lb.pin_report(),
            interface: &cfg.interface,
            xdp_mode: xdp_mode_name(mode),
            vips: cfg.vips.len(),
            backends: cfg.vips.iter().map(|v| v.backends.len()).sum(),
            restored_generations: &restored_generations,
            config_text: std::fs::read_to_string(path).ok().as_deref(),
            previous: previous.as_ref(),
        },
    );
    if let Some(from) = lb_mode_changed {
        journal.record(
            Kind::XdpModeChanged,
            format!(
                "the pinned XDP link on {} was in {} mode, xdp_mode asks for {}: attached anew in {} mode (established flows kept; packets arriving during the switch reached the kernel's stack)",
                cfg.interface,
                xdp_mode_name(from),
                format!("{:?}", cfg.xdp_mode).to_lowercase(),
                xdp_mode_name(mode)
            ),
        );
    }
    notify::balancer_ready(&cfg);
    let _watchdog = notify::spawn_watchdog();
    let interface = cfg.interface.clone();
    // From here on the agent owns the balancer and the configuration: lbctl changes, SIGHUP
    // reloads and metrics scrapes go through it one at a time.
    let agent = Agent::new(path, cfg, lb, journal.clone());
    // Health checks of the VIPs with [vip.health]; their transitions re-apply the datapath.
    agent.start_health(&pins).await?;
    if let Some(opts) = &fleet {
        // Before the control socket serves: its service changes are refused from the start.
        agent.set_fleet_status(opts.initial_status());
        info!(node = %opts.node, etcd = %opts.endpoints, prefix = %opts.prefix, "fleet mode: VIPs come from etcd");
    }
    let fleet_task = fleet
        .clone()
        .map(|opts| tokio::spawn(lb_userspace::fleet::node::run(agent.clone(), opts)));
    // [bgp]: the node-local BIRD, started here (a refused configuration fails the start); the
    // announcer tells it what this node can serve from its first tick.
    let announcer = start_bgp(&agent).await?;
    let control_task = tokio::spawn(control.serve(agent.clone()));
    let metrics_task = tokio::spawn(metrics::serve(metrics_listener, agent.clone()));
    serve_until_stopped(&agent, journal, &interface).await?;
    if let Some(task) = announcer {
        // Routers first: no new flows are sent to a node that is going away. Dropping the
        // announcer stops BIRD, which tells its peers.
        task.abort();
        let _ = task.await;
        info!("BGP speaker stopped: this node's routes are withdrawn");
    }
    if let (Some(task), Some(opts)) = (fleet_task, &fleet) {
        // Then the store: the lease is revoked, so leadership moves at once.
        task.abort();
        let _ = task.await;
        lb_userspace::fleet::node::leave(opts).await;
    }
    shut_down(&agent, control_task, metrics_task, &interface).await
}

/// With `[bgp]`: starts the node-local BIRD and the announcer that drives it
/// (`lb_userspace::fleet::bgp`).
async fn start_bgp(agent: &Arc<Agent>) -> Result<Option<tokio::task::JoinHandle<()>>> {
    let cfg = agent.config().await;
    let Some(bgp) = cfg.bgp else { return Ok(None) };
    let speaker = bgp::Speaker::try_start(&bgp, &cfg.control_socket)?;
    info!(pid = speaker.pid(), peers = ?bgp.peers, "BGP speaker (BIRD) started");
    Ok(Some(tokio::spawn(bgp::announce(
        agent.clone(),
        bgp,
        cfg.control_socket,
        speaker,
    ))))
}

/// The datapath's rare events (aya-log records) go to lbd's log.
fn forward_datapath_log(lb: &mut Balancer) -> Result<()> {
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
    Ok(())
}

/// Keeps next hops resolved and follows the interface's state until SIGTERM or SIGINT;
/// SIGHUP reloads the configuration.
async fn serve_until_stopped(agent: &Agent, journal: &Journal, interface: &str) -> Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    // Next hops flushed under the datapath (an interface flap) are resolved again within 1 s.
    let mut heal = tokio::time::interval(Duration::from_secs(1));
    let mut heals = HealEvents::default();
    // The interface's state, for the journal, and to resolve next hops as soon as it is back.
    let mut link_tick = tokio::time::interval(Duration::from_millis(250));
    let mut link = netif::link_state(interface).ok();
    // What is missing from the datapath (detached, replaced, unpinned), checked on the same
    // tick: reported within 250 ms.
    let mut faults: Vec<String> = Vec::new();
    // The connection tables' fill, counted now and then so that a table passing 80% is
    // journaled (conntrack_fill) even when nobody asks for statistics.
    let mut fill_tick = tokio::time::interval(Duration::from_secs(10));
    loop {
        tokio::select! {
            _ = fill_tick.tick() => {
                if let Err(e) = agent.census().await {
                    error!("counting the connection tables: {e:#}");
                }
            }
            _ = heal.tick() => {
                match agent.with_balancer(|lb, _| lb.heal_next_hops()).await {
                    Ok(true) => {
                        info!("the datapath dropped packets for want of a next hop: resolved the backends' next hops again");
                        heals.healed(journal);
                    }
                    Ok(false) => {}
                    Err(e) => error!("checking the datapath's next hops: {e:#}"),
                }
            }
            _ = link_tick.tick() => {
                if let Ok(now) = netif::link_state(interface) {
                    if link != Some(now) {
                        on_link_change(agent, journal, interface, now).await;
                        link = Some(now);
                    }
                }
                let now = agent.with_balancer(|lb, _| lb.datapath_faults()).await;
                if now != faults {
                    on_datapath_change(journal, &now);
                    faults = now;
                }

            }
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                reload(agent, journal).await;
            }
        }
    }
    Ok(())
}

/// SIGHUP: reads the configuration file again and applies it, saying what changed.
async fn reload(agent: &Agent, journal: &Journal) {
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
            journal.record(Kind::Reloaded, format!(
                "configuration reloaded (SIGHUP): {} VIPs added, {} removed; {} backends added, {} removed; {} tables changed",
                r.vips_added, r.vips_removed, r.backends_added, r.backends_removed, r.tables.len()
            ));
        }
        Err(e) => {
            error!("{e:#}");
            journal.record(Kind::ReloadRefused, format!("{e:#}"));
        }
    }
    notify::balancer_ready(&agent.config().await);
}

/// Stops serving (the control socket's file is removed as its task drops) and leaves the
/// datapath pinned, or detaches it.
async fn shut_down(
    agent: &Agent,
    control_task: tokio::task::JoinHandle<Result<()>>,
    metrics_task: tokio::task::JoinHandle<()>,
    interface: &str,
) -> Result<()> {
    notify::stopping();
    // No more changes: stop serving.
    control_task.abort();
    metrics_task.abort();
    let _ = control_task.await;
    let _ = metrics_task.await;
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

/// Next-hop re-resolutions for the journal: the first is recorded, repeats at most once a
/// minute with their count, so an unreachable backend cannot push every other event out.
#[derive(Default)]
struct HealEvents {
    last: Option<Instant>,
    since: u32,
}

impl HealEvents {
    fn healed(&mut self, journal: &Journal) {
        self.since += 1;
        if self
            .last
            .is_some_and(|t| t.elapsed() < Duration::from_secs(60))
        {
            return;
        }
        let repeats = if self.since > 1 {
            format!(" ({} times since the last such event)", self.since)
        } else {
            String::new()
        };
        journal.record(
            Kind::NextHopsResolved,
            format!("the datapath dropped packets for want of a next hop (drop_fib grew): resolved the backends' next hops again{repeats}"),
        );
        self.last = Some(Instant::now());
        self.since = 0;
    }
}

/// The interface went down or came back: journal it; when back, ask for every backend's next
/// hop at once (going down flushed the neighbour entries) instead of waiting for drops.
async fn on_link_change(agent: &Agent, journal: &Journal, ifname: &str, now: netif::LinkState) {
    if now.is_usable() {
        let n = agent.with_balancer(|lb, _| lb.resolve_next_hops()).await;
        info!(
            interface = ifname,
            backends = n,
            "interface up again: resolving the backends' next hops"
        );
        journal.record(
            Kind::InterfaceUp,
            format!("interface {ifname} is up again: XDP still attached; next hops of {n} backends re-resolved (going down flushed their neighbour entries)"),
        );
    } else {
        let why = if now.up {
            "no carrier"
        } else {
            "administratively down"
        };
        warn!(
            interface = ifname,
            "interface down ({why}): no traffic arrives until it is up again"
        );
        journal.record(
            Kind::InterfaceDown,
            format!("interface {ifname} went down ({why}): no traffic arrives until it is up again; XDP stays attached"),
        );
    }
}

/// The datapath lost something behind lbd's back, or is whole again: said in the log (an
/// error) and the journal; `lbctl status` (`datapath_faults`) and the `lb_datapath_intact`
/// metric read the faults themselves. lbd does not put the datapath back by itself: whoever
/// took it (`lbd cleanup --force`, bpftool, an `rm` in bpffs) meant something, and a restart of
/// lbd rebuilds it from the configuration.
fn on_datapath_change(journal: &Journal, faults: &[String]) {
    if faults.is_empty() {
        info!("the datapath is whole again");
        journal.record(
            Kind::DatapathRestored,
            "the datapath is whole again: lbd's program is on the interface and every pin is in place".to_string(),
        );
        return;
    }
    let what = faults.join("; ");
    let consequence = if faults.iter().all(|f| f.starts_with("unpinned")) {
        "lbd still balances, but its datapath no longer outlives it: a restart starts from fresh maps (tracked flows are lost)"
    } else {
        "lbd balances nothing until it is restarted (systemctl restart lbd)"
    };
    error!("the datapath was taken away behind lbd's back: {what}; {consequence}");
    journal.record(
        Kind::DatapathLost,
        format!("the datapath was taken away behind lbd's back: {what}; {consequence}"),
    );
}

/// `lbd cleanup`: detach and remove everything pinned in the configured pin_dir. Refused while
/// an lbd answers on the configured control socket, unless `force`.
fn cleanup(path: &std::path::Path, force: bool) -> Result<()> {
    let cfg = Config::load(path)?;
    let socket = cfg.control_socket.display();
    match running_lbd(&cfg.control_socket) {
        Some(running) if !force => {
            return Err(Refused(format!(
                "an lbd (pid {}, program id {}) is running on control socket {socket}: cleanup would detach its program and unpin the maps it writes, and it would go on as if nothing happened. Stop it first (systemctl stop lbd), or run `lbd cleanup --force` to take its datapath away anyway",
                running.pid, running.program_id
            ))
            .into());
        }
        Some(running) => eprintln!(
            "lbd cleanup --force: the lbd running on {socket} (pid {}) loses its datapath: no traffic is balanced and its changes reach no map until it is restarted",
            running.pid
        ),
        None => {}
    }
    // The managed neighbour entries lbd installed for backends' next hops (tagged with lbd's
    // protocol): without a datapath they only make the kernel probe addresses nobody uses.
    let neighbours: Vec<String> = netif::remove_all_lbd_neighbours()?
        .iter()
        .map(|h| h.neighbour.to_string())
        .collect();
    if !neighbours.is_empty() {
        println!(
            "removed the neighbour entries lbd had installed: {}",
            neighbours.join(", ")
        );
    }
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
