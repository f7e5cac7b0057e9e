//! `lbctl`: the operator's command line for a running `lbd` (over its control socket).
//!
//! Exit status: 0 done; 1 lbd refused the request (the reason, naming the field and the fix,
//! is on stderr); 2 the command line is wrong; 3 lbd could not be reached (not running, wrong
//! socket, or no permission on the socket); 4 `backend drain --wait` timed out with active
//! connections left (how many is on stderr).
use clap::Parser as _;
use lb_userspace::{
    cli::{
        BackendCommand, ConnCommand, LbctlCli as Cli, LbctlCommand as Command, ModelCommand,
        NodeCommand, VipCommand,
    },
    control::{
        BackendEntry, BgpStatus, Changed, Client, ClientError, ConnEntry, ConnList, DryRun, Lookup,
        ModelVip, NodeChanged, Request, StatsSnapshot, Status, VipEntry,
    },
};
use serde::de::DeserializeOwned;

#[path = "lbctl/fleet.rs"]
mod fleet;
use std::{io::Write as _, process::ExitCode, time::Duration};

/// What ends the command early, and with which exit status.
enum Failure {
    /// lbd answered with an error (exit 1).
    Refused(String),
    /// lbd could not be reached or did not answer (exit 3).
    Unreachable(String),
    /// The command line asks for something this mode cannot do (exit 2).
    Usage(String),
    /// `backend drain --wait` timed out with active connections left (exit 4).
    DrainTimeout(String),
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        Failure::Unreachable(e.to_string())
    }
}

struct Ctl {
    client: Client,
    /// `--dry-run`: changes are sent as `Request::DryRun`.
    dry_run: bool,
}

impl Ctl {
    fn call<T: DeserializeOwned>(&mut self, req: Request) -> Result<T, Failure> {
        let resp = self.client.call(&req)?;
        if !resp.ok {
            return Err(Failure::Refused(resp.error.unwrap_or_else(|| {
                "lbd refused the request without a reason".into()
            })));
        }
        serde_json::from_value(resp.result).map_err(|e| {
            Failure::Unreachable(format!(
                "lbd's answer does not have the expected shape ({e}); are lbd and lbctl the same version?"
            ))
        })
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let changes = matches!(
        cli.command,
        Command::Vip(VipCommand::Add { .. } | VipCommand::Remove { .. })
            | Command::Backend(
                BackendCommand::Add { .. }
                    | BackendCommand::Remove { .. }
                    | BackendCommand::SetWeight { .. }
                    | BackendCommand::Drain { .. }
                    | BackendCommand::Undrain { .. }
            )
    );
    if cli.dry_run && !changes {
        eprintln!("lbctl: --dry-run goes with a change (vip add/remove, backend add/remove/set-weight/drain/undrain); this command changes nothing");
        return ExitCode::from(2);
    }
    if let (Some(urls), Some(prefix)) = (&cli.etcd, &cli.prefix) {
        if matches!(
            cli.command,
            Command::Backend(BackendCommand::Drain { wait: true, .. })
        ) {
            eprintln!("lbctl: --wait counts one node's connections and goes without --etcd: write the drain with --etcd (without --wait), then watch conns_active in `lbctl backend list VIP --json` on each node");
            return ExitCode::from(2);
        }
        if cli.dry_run {
            eprintln!("lbctl: --dry-run asks one lbd what a change would do to its tables; with --etcd, run the same command with --dry-run against any node's socket (without --etcd) instead");
            return ExitCode::from(2);
        }
        return exit(fleet::run(urls, prefix, cli.command, cli.json));
    }
    let client = match Client::connect(&cli.socket) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("lbctl: {e}");
            return ExitCode::from(3);
        }
    };
    let mut ctl = Ctl {
        client,
        dry_run: cli.dry_run,
    };
    exit(run(&mut ctl, cli.command, cli.json))
}

fn exit(result: Result<(), Failure>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(msg)) => {
            eprintln!("lbctl: {msg}");
            ExitCode::from(2)
        }
        Err(Failure::Refused(msg)) => {
            eprintln!("lbctl: error: {msg}");
            ExitCode::from(1)
        }
        Err(Failure::Unreachable(msg)) => {
            eprintln!("lbctl: {msg}");
            ExitCode::from(3)
        }
        Err(Failure::DrainTimeout(msg)) => {
            eprintln!("lbctl: {msg}");
            ExitCode::from(4)
        }
    }
}

fn print_json(v: &impl serde::Serialize) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).expect("results serialize")
    );
}

/// The change a command asks for, if it is one (the same request goes to one lbd or, with
/// `--etcd`, to the fleet's store).
fn change_of(command: &Command) -> Option<Request> {
    match command {
        Command::Vip(VipCommand::Add {
            vip,
            forwarding,
            table_size,
            force,
        }) => Some(Request::VipAdd {
            vip: vip.to_string(),
            forwarding: Some((*forwarding).into()),
            table_size: *table_size,
            force: *force,
        }),
        Command::Vip(VipCommand::Remove { vip }) => Some(Request::VipRemove {
            vip: vip.to_string(),
        }),
        Command::Backend(b) => backend_change(b),
        _ => None,
    }
}

fn run(ctl: &mut Ctl, command: Command, json: bool) -> Result<(), Failure> {
    if let Command::Backend(BackendCommand::Drain {
        vip,
        address,
        wait: true,
        timeout,
        ..
    }) = &command
    {
        if !ctl.dry_run {
            let req = change_of(&command).expect("a drain is a change");
            change(ctl, json, req)?;
            return drain_wait(ctl, &vip.to_string(), &address.to_string(), *timeout, json);
        }
    }
    if let Some(req) = change_of(&command) {
        return change(ctl, json, req);
    }
    match command {
        Command::Vip(VipCommand::List) => {
            let vips: Vec<VipEntry> = ctl.call(Request::VipList)?;
            if json {
                print_json(&vips);
            } else {
                print_vips(&vips);
            }
            Ok(())
        }
        Command::Backend(BackendCommand::List { vip }) => {
            let list: Vec<BackendEntry> = ctl.call(Request::BackendList {
                vip: vip.map(|v| v.to_string()),
            })?;
            if json {
                print_json(&list);
            } else {
                print_backends(&list);
            }
            Ok(())
        }
        Command::Model(ModelCommand::Show { vip }) => {
            let vips: Vec<ModelVip> = ctl.call(Request::ModelShow {
                vip: vip.map(|v| v.to_string()),
            })?;
            if json {
                print_json(&vips);
            } else {
                print_model(&vips);
            }
            Ok(())
        }
        Command::Status => {
            let s: Status = ctl.call(Request::Status)?;
            if json {
                print_json(&s);
            } else {
                print_status(&s);
            }
            Ok(())
        }
        Command::Stats { watch, interval } => stats(ctl, watch, interval, json),
        Command::Conn(ConnCommand::List {
            vip,
            backend,
            limit,
        }) => {
            let list: ConnList = ctl.call(Request::ConnList {
                vip: vip.map(|v| v.to_string()),
                backend: backend.map(|b| b.to_string()),
                limit,
            })?;
            if json {
                print_json(&list);
            } else {
                print_conns(&list.connections);
                if list.matched > list.connections.len() as u64 {
                    println!(
                        "({} of {} connections shown; --limit)",
                        list.connections.len(),
                        list.matched
                    );
                }
            }
            Ok(())
        }
        Command::Lookup { vip, client } => {
            let l: Lookup = ctl.call(Request::Lookup {
                vip: vip.to_string(),
                client,
            })?;
            if json {
                print_json(&l);
            } else {
                print_lookup(&l);
            }
            Ok(())
        }
        Command::Cluster(_) => Err(Failure::Usage(
            "lbctl cluster status reads the fleet's store: give --etcd URL --prefix PREFIX".into(),
        )),
        Command::Vip(_) | Command::Backend(_) => unreachable!("changes are handled above"),
        Command::Node(n) => {
            let req = match n {
                NodeCommand::Drain { timeout } => Request::NodeDrain {
                    timeout_seconds: timeout,
                },
                NodeCommand::Undrain => Request::NodeUndrain,
            };
            let c: NodeChanged = ctl.call(req)?;
            if json {
                print_json(&c);
            } else {
                println!("{} (node {})", c.message, c.node);
            }
            Ok(())
        }
    }
}

/// `lbctl status`'s BGP part.
fn print_bgp(b: &BgpStatus) {
    let left = b
        .drain_remaining_seconds
        .map(|s| format!(", {s} s left"))
        .unwrap_or_default();
    println!("node       {}{left}", b.node);
    println!("bgp        speaker {}", b.speaker);
    for s in &b.sessions {
        println!("  peer {:<28} {:<12} {}", s.peer, s.state, s.info);
    }
    let announced = if b.announced.is_empty() {
        "nothing".to_string()
    } else {
        b.announced.join(", ")
    };
    println!("  announced {announced}");
    for w in &b.withheld {
        println!("  withheld  {} ({})", w.prefix, w.reason);
    }
}

/// Sends a change and prints lbd's answer: its message and the tables it moved.
fn change(ctl: &mut Ctl, json: bool, req: Request) -> Result<(), Failure> {
    if ctl.dry_run {
        let d: DryRun = ctl.call(Request::DryRun {
            request: Box::new(req),
        })?;
        if json {
            print_json(&d);
        } else {
            print!("{d}");
        }
        return Ok(());
    }
    let c: Changed = ctl.call(req)?;
    if json {
        print_json(&c);
    } else {
        println!("{}", c.message);
        for t in &c.tables {
            println!(
                "  table of {}: generation {}, {} slots moved",
                t.vip, t.generation, t.slots_moved
            );
        }
    }
    Ok(())
}

/// `lbctl backend ...`: the change to one backend of a VIP (None for a list).
fn backend_change(b: &BackendCommand) -> Option<Request> {
    let (vip, address) = match b {
        BackendCommand::Add { vip, address, .. }
        | BackendCommand::Remove { vip, address, .. }
        | BackendCommand::SetWeight { vip, address, .. }
        | BackendCommand::Drain { vip, address, .. }
        | BackendCommand::Undrain { vip, address } => (vip.to_string(), address.to_string()),
        BackendCommand::List { .. } => return None,
    };
    Some(match *b {
        BackendCommand::Add { weight, .. } => Request::BackendAdd {
            vip,
            address,
            weight: Some(weight),
        },
        BackendCommand::Remove { force, .. } => Request::BackendRemove {
            vip,
            address,
            force,
        },
        BackendCommand::SetWeight { weight, force, .. } => Request::BackendSetWeight {
            vip,
            address,
            weight,
            force,
        },
        BackendCommand::Drain { force, .. } => Request::BackendDrain {
            vip,
            address,
            force,
        },
        BackendCommand::Undrain { .. } => Request::BackendUndrain { vip, address },
        BackendCommand::List { .. } => return None,
    })
}

/// How often `drain --wait` counts: a backend found empty is reported within this.
const DRAIN_POLL: Duration = Duration::from_millis(200);

/// `backend drain --wait`: counts the backend's connections until none is active (progress on
/// stderr when it is a terminal), or the timeout passes (exit 4, with how many are left).
fn drain_wait(
    ctl: &mut Ctl,
    vip: &str,
    address: &str,
    timeout: Option<f64>,
    json: bool,
) -> Result<(), Failure> {
    let started = std::time::Instant::now();
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    loop {
        let list: Vec<BackendEntry> = ctl.call(Request::BackendList {
            vip: Some(vip.to_string()),
        })?;
        let addr: std::net::IpAddr = address
            .parse()
            .map_err(|_| Failure::Refused(format!("backend {address:?} is not an IP address")))?;
        let Some(b) = list.iter().find(|b| b.address == addr) else {
            return Err(Failure::Refused(format!(
                "backend {address} of {vip} is gone (removed while draining)"
            )));
        };
        let c = b.conns;
        let waited = started.elapsed().as_secs_f64();
        let done = c.conns_active == 0;
        let timed_out = !done && timeout.is_some_and(|t| waited >= t);
        if done || timed_out {
            if terminal {
                eprint!("\r\x1b[K");
            }
            if json {
                print_json(&serde_json::json!({
                    "vip": vip,
                    "backend": address,
                    "empty": done,
                    "waited_seconds": lb_userspace::control::round::decimals(waited, 3),
                    "conns_active": c.conns_active,
                    "conns_idle": c.conns_idle,
                    "conns_closing": c.conns_closing,
                }));
            }
        }
        if done {
            if !json {
                println!(
                    "backend {address} of {vip} has no active connection (after {waited:.1}s; {} idle, {} closing)",
                    c.conns_idle, c.conns_closing
                );
            }
            return Ok(());
        }
        if timed_out {
            return Err(Failure::DrainTimeout(format!(
                "drain of {address} ({vip}) timed out after {waited:.1}s: {} active connections left ({} idle, {} closing)",
                c.conns_active, c.conns_idle, c.conns_closing
            )));
        }
        if terminal {
            eprint!(
                "\r\x1b[Kwaiting for {address}: {} active, {} idle, {} closing ({waited:.0}s)",
                c.conns_active, c.conns_idle, c.conns_closing
            );
        }
        std::thread::sleep(DRAIN_POLL);
    }
}

fn print_conns(list: &[ConnEntry]) {
    if list.is_empty() {
        println!("no tracked connection");
        return;
    }
    println!(
        "{:<46} {:<32} {:<28} {:<11} {:>6} {:>10}",
        "CLIENT", "VIP", "BACKEND", "STATE", "ACTIVE", "LAST SEEN"
    );
    for c in list {
        println!(
            "{:<46} {:<32} {:<28} {:<11} {:>6} {:>9.1}s",
            c.client.to_string(),
            c.vip,
            c.backend.to_string(),
            c.state,
            if c.active { "yes" } else { "no" },
            c.last_seen_seconds
        );
    }
}

fn print_lookup(l: &Lookup) {
    match (l.slot, l.new_flow_backend) {
        (Some(slot), Some(b)) => println!(
            "new flow {} -> {}: backend {b} (slot {slot})",
            l.client, l.vip
        ),
        (Some(slot), None) => println!(
            "new flow {} -> {}: no backend (slot {slot} is empty: the VIP has no serving backend)",
            l.client, l.vip
        ),
        _ => {
            println!("new flows from {} to {} by source port (the choice depends on it; give CLIENT:PORT for one flow):", l.client, l.vip);
            for (b, share) in &l.shares_by_port {
                println!("  {b}: {:.1}% of ports", share * 100.0);
            }
        }
    }
    if l.tracked.is_empty() {
        println!("tracked: none");
    } else {
        println!("tracked:");
        print_conns(&l.tracked);
    }
}

/// `lbctl stats`: rates between two snapshots, once or every `--watch` seconds.
fn stats(ctl: &mut Ctl, watch: Option<f64>, interval: f64, json: bool) -> Result<(), Failure> {
    let mut prev: StatsSnapshot = ctl.call(Request::Stats)?;
    let wait = watch.unwrap_or(interval);
    loop {
        std::thread::sleep(Duration::from_secs_f64(wait));
        let now: StatsSnapshot = ctl.call(Request::Stats)?;
        let report = now.clone().with_rates_since(&prev);
        if json {
            if watch.is_some() {
                // One JSON document per line while watching.
                println!(
                    "{}",
                    serde_json::to_string(&report).expect("results serialize")
                );
            } else {
                print_json(&report);
            }
        } else {
            if watch.is_some() {
                // Clear the screen and go home, like top; into a file or a pipe, a blank line
                // between reports instead of escape codes.
                if std::io::IsTerminal::is_terminal(&std::io::stdout()) {
                    print!("\x1b[H\x1b[2J");
                } else {
                    println!();
                }
                println!(
                    "lbctl stats: every {wait}s, Ctrl-C to quit (lbd up {})\n",
                    human_duration(report.uptime_ms / 1000)
                );
            }
            print_stats(&report);
        }
        let _ = std::io::stdout().flush();
        if watch.is_none() {
            return Ok(());
        }
        prev = now;
    }
}

fn print_model(vips: &[ModelVip]) {
    if vips.is_empty() {
        println!("no VIP learns its weights (add [vip.learning] with enabled = true, and [vip.health], to a VIP)");
        return;
    }
    let opt = |v: Option<f64>, prec: usize| v.map_or("-".to_string(), |x| format!("{x:.prec$}"));
    for v in vips {
        println!(
            "{}: step {} every {} ms, latency target {} ms; last step moved {} slots ({} gradual, budget {} of {}; most gradual so far {}); fit p99 {} us of the last {}, slowest {} us; slowest step {} us",
            v.vip,
            v.step,
            v.interval_ms,
            v.latency_target_ms,
            v.last_slots_moved,
            v.last_slots_moved_gradual,
            v.slots_budget,
            v.table_size,
            v.max_slots_moved_gradual,
            v.fit_p99_us,
            v.fits,
            v.max_fit_us,
            v.max_step_us
        );
        for b in &v.backends {
            // Weights in configured units, as `backend list` and `stats` show them; the
            // table's units (configured x 100, what --json holds) in brackets.
            let unit = f64::from(lb_userspace::learning::WEIGHT_SCALE);
            let cfg_units = |w: f64| lb_userspace::control::round::decimals(w / unit, 3);
            let mut flags = vec![b.health.clone()];
            if b.pinned {
                flags.push("pinned".into());
            }
            if b.drained_by_model {
                flags.push("drained by the model".into());
            }
            if let Some(f) = b.trial_flows {
                flags.push(format!("on trial, {f:.0} flows judged"));
            }
            if let Some(w) = b.carry_weight {
                flags.push(format!("carried at {:.2} while slow", w / unit));
            }
            if b.failed_trials > 0 {
                flags.push(format!("{} failed trials", b.failed_trials));
            }
            match (b.readmission.returns_in_ms, b.readmission.ramp) {
                (Some(ms), _) => flags.push(format!("held {:.1}s", ms / 1e3)),
                (None, Some(r)) => flags.push(format!("ramp {:.0}%", r * 100.0)),
                _ => {}
            }
            if let Some(n) = b.readmission.ejections.filter(|&n| n > 0) {
                flags.push(format!("{n} recent ejections"));
            }
            println!(
                "  {} [{}]: weight configured {}, current {} (table {}), target {}",
                b.address,
                flags.join(", "),
                b.configured_weight,
                cfg_units(f64::from(b.current_weight)),
                b.current_weight,
                b.target_weight.map_or("-".to_string(), |t| format!(
                    "{} (table {t:.1})",
                    cfg_units(t)
                ))
            );
            match (&b.fit, &b.refusal) {
                (Some(f), _) => println!(
                    "    model: 1000/latency_ms = {:.3} {:+.4} x load; R² {:.3}, n {}, load {:.1}..{:.1}/s; capacity at target {}/s",
                    f.intercept,
                    f.slope,
                    f.r2,
                    f.n,
                    f.load_min,
                    f.load_max,
                    opt(b.capacity_at_target, 1)
                ),
                (None, Some(r)) => println!("    no model ({} samples): {r}", b.samples),
                (None, None) => println!("    no model ({} samples)", b.samples),
            }
            if let Some(o) = &b.observed {
                println!(
                    "    observed: load {:.1}/s, latency {:.2} ms (predicted {}), errors {:.0}%, SYN retries {:.2}/s, RSTs {:.2}/s",
                    o.load,
                    o.latency_ms,
                    opt(b.predicted_latency_ms, 2),
                    o.error_rate * 100.0,
                    o.syn_retries_per_s,
                    o.rsts_per_s
                );
            }
            for d in &b.decisions {
                println!(
                    "    step {}: {} -> {}: {}",
                    d.step,
                    cfg_units(f64::from(d.from_weight)),
                    cfg_units(f64::from(d.to_weight)),
                    if d.reasons.is_empty() {
                        "unchanged".to_string()
                    } else {
                        d.reasons.join("; ")
                    }
                );
            }
        }
    }
}

fn print_vips(vips: &[VipEntry]) {
    if vips.is_empty() {
        println!("no VIPs configured (add one with `lbctl vip add ADDRESS:PORT/PROTOCOL`)");
        return;
    }
    println!(
        "{:<32} {:<10} {:>10} {:>10} {:>8} {:>7}",
        "VIP", "FORWARDING", "TABLE_SIZE", "GENERATION", "BACKENDS", "DRAINED"
    );
    for v in vips {
        println!(
            "{:<32} {:<10} {:>10} {:>10} {:>8} {:>7}",
            v.vip,
            v.forwarding.config_value(),
            v.table_size,
            v.generation,
            v.backends,
            v.drained
        );
    }
}

fn print_backends(list: &[BackendEntry]) {
    if list.is_empty() {
        println!("no backends (add one with `lbctl backend add VIP ADDRESS`)");
        return;
    }
    println!(
        "{:<32} {:<28} {:>6} {:<9} {:>9} {:>6} {:>8} {:>7} {:>7} {:>7} {:<20}  LAST PROBE",
        "VIP",
        "BACKEND",
        "WEIGHT",
        "STATE",
        "EFFECTIVE",
        "TABLE",
        "SLOTS",
        "ACTIVE",
        "IDLE",
        "CLOSING",
        "READMISSION"
    );
    for b in list {
        let state = if !b.health.is_empty() {
            b.health.as_str()
        } else if b.drained {
            "draining"
        } else if b.up {
            "up"
        } else {
            "down"
        };
        let probe = match (&b.last_error, b.last_probe_ms) {
            (Some(e), _) => format!("failed: {e}"),
            (None, Some(ms)) => format!("ok in {ms:.1} ms"),
            (None, None) => "-".to_string(),
        };
        println!(
            "{:<32} {:<28} {:>6} {:<9} {:>9} {:>6} {:>8} {:>7} {:>7} {:>7} {:<20}  {}",
            b.vip,
            b.address.to_string(),
            b.weight,
            state,
            lb_userspace::control::round::decimals(b.effective_weight, 3),
            b.table_weight,
            b.slots,
            b.conns.conns_active,
            b.conns.conns_idle,
            b.conns.conns_closing,
            readmission(b),
            probe
        );
    }
}

/// Where a health-checked backend is in coming back: its ramp, or the hold left and the
/// ejections behind it.
fn readmission(b: &BackendEntry) -> String {
    let carried = if b.carried {
        "carried while slow, "
    } else {
        ""
    };
    format!("{carried}{}", health_readmission(b))
}

fn health_readmission(b: &BackendEntry) -> String {
    let ejections = match b.readmission.ejections {
        None => return "-".into(),
        Some(0) => String::new(),
        Some(1) => " (1 ejection)".into(),
        Some(n) => format!(" ({n} ejections)"),
    };
    match (b.readmission.returns_in_ms, b.readmission.ramp) {
        (Some(ms), _) => format!("held {:.1}s{ejections}", ms / 1e3),
        (None, Some(r)) => format!("ramp {:.0}%{ejections}", r * 100.0),
        (None, None) if ejections.is_empty() => "-".into(),
        (None, None) => ejections.trim().to_string(),
    }
}

fn human_duration(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    if d > 0 {
        format!("{d}d {h}h {m}m")
    } else if h > 0 {
        format!("{h}h {m}m {s}s")
    } else if m > 0 {
        format!("{m}m {s}s")
    } else {
        format!("{s}s")
    }
}

fn print_status(s: &Status) {
    println!(
        "lbd {} (pid {}), up {}",
        s.version,
        s.pid,
        human_duration(s.uptime_seconds)
    );
    println!(
        "interface  {} ({} XDP, program id {})",
        s.interface, s.xdp_mode, s.program_id
    );
    for fault in &s.datapath_faults {
        println!("DATAPATH   {fault}");
    }
    println!("config     {}", s.config_file);
    println!("control    {}", s.control_socket);
    println!("metrics    http://{}/metrics", s.metrics_listen);
    if let Some(f) = &s.fleet {
        println!(
            "fleet      node {} ({}), etcd {} prefix {}: {}, revision {} applied{}",
            f.node,
            f.role,
            f.etcd,
            f.prefix,
            if f.store_connected {
                "connected"
            } else {
                "UNREACHABLE, forwarding on the last applied revision"
            },
            f.applied_revision,
            f.leader
                .as_ref()
                .map(|l| format!(", leader {l}"))
                .unwrap_or_default()
        );
        if let Some(e) = &f.last_error {
            println!("FLEET      {e}");
        }
    }
    if let Some(b) = &s.bgp {
        print_bgp(b);
    }
    if s.apply.applies > 0 {
        println!(
            "apply      last {:.1} ms ({} backends), slowest {:.1} ms, {} applies",
            s.apply.last_us as f64 / 1e3,
            s.apply.last_backends,
            s.apply.max_us as f64 / 1e3,
            s.apply.applies
        );
    }
    if s.vips.is_empty() {
        println!("no VIPs configured");
    } else {
        println!(
            "\n{:<32} {:>10} {:>10} {:>8} {:>8}",
            "VIP", "GENERATION", "TABLE_SIZE", "BACKENDS", "SERVING"
        );
        for v in &s.vips {
            println!(
                "{:<32} {:>10} {:>10} {:>8} {:>8}{}",
                v.vip,
                v.generation,
                v.table_size,
                v.backends,
                v.serving_backends,
                if v.serving_backends == 0 {
                    "  no serving backend: traffic dropped"
                } else {
                    ""
                }
            );
        }
    }
    print!(
        "{}",
        lb_userspace::control::events::format_recent(s, STATUS_EVENTS)
    );
}

/// Events `lbctl status` prints (the JSON has every one lbd keeps).
const STATUS_EVENTS: usize = 20;

/// 1234567 -> "1.23M".
fn si(x: f64) -> String {
    let (v, unit) = if x >= 1e9 {
        (x / 1e9, "G")
    } else if x >= 1e6 {
        (x / 1e6, "M")
    } else if x >= 1e3 {
        (x / 1e3, "k")
    } else {
        return format!("{x:.0}");
    };
    format!("{v:.2}{unit}")
}

fn print_stats(s: &StatsSnapshot) {
    println!(
        "{:<34} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "VIP / BACKEND", "PACKETS", "PKT/S", "BYTES", "BYTES/S", "NEW_FLOWS", "FLOWS/S"
    );
    let row = |name: &str, p: u64, b: u64, n: u64, r: Option<lb_userspace::control::Rates>| {
        let r = r.unwrap_or(lb_userspace::control::Rates {
            packets_per_second: 0.0,
            bytes_per_second: 0.0,
            new_flows_per_second: 0.0,
        });
        println!(
            "{:<34} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
            name,
            si(p as f64),
            si(r.packets_per_second),
            si(b as f64),
            si(r.bytes_per_second),
            si(n as f64),
            si(r.new_flows_per_second)
        );
    };
    for v in &s.vips {
        row(&v.vip, v.packets, v.bytes, v.new_flows, v.rates);
        for b in &v.backends {
            let tag = if b.drained {
                format!("  {} (drained)", b.address)
            } else {
                format!("  {} (w {})", b.address, b.weight)
            };
            row(&tag, b.packets, b.bytes, b.new_flows, b.rates);
        }
    }
    // Connection-table pressure, always shown: a flood shows in `new` (first packets), lost
    // state in `lost` (packets past the SYN of flows no table knew), full tables in the
    // insert failures.
    println!("\nconnections (active / idle / closing):");
    for v in &s.vips {
        for b in &v.backends {
            let c = b.conns;
            println!(
                "  {:<32} {:<28} {} / {} / {}",
                v.vip,
                b.address.to_string(),
                c.conns_active,
                c.conns_idle,
                c.conns_closing
            );
        }
    }
    if let Some(f) = &s.conntrack {
        let tables: Vec<String> = f
            .tables()
            .iter()
            .zip(["CT4 (IPv4)", "CT (IPv6)", "CT_NEW"])
            .map(|((_, n, cap, fill), label)| {
                format!("{label} {n} of {cap} ({:.1}%)", fill * 100.0)
            })
            .collect();
        println!(
            "table fill: {}; counted in {:.1} ms; SYNs of untracked tuples looking in CT4/CT: {:.2}%",
            tables.join(", "),
            f.scan_ms,
            f.syn_filter_probe * 100.0
        );
    }
    let c = |name: &str| s.counters.get(name).copied().unwrap_or(0);
    println!(
        "\nconnection tables: {} new, {} promoted, {} lost (state evicted or older than the maps), {} re-steered; insert failures: {} established, {} new, {} fragments",
        si(c("ct_new") as f64),
        si(c("ct_promoted") as f64),
        c("ct_lost"),
        c("ct_resteered"),
        c("ct_insert_failed"),
        c("ct_new_insert_failed"),
        c("frag_insert_failed"),
    );
    let nonzero: Vec<String> = s
        .counters
        .iter()
        .filter(|(_, v)| **v > 0)
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    println!(
        "counters: {}",
        if nonzero.is_empty() {
            "all zero".to_string()
        } else {
            nonzero.join(", ")
        }
    );
}
