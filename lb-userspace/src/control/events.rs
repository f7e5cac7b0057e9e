//! lbd's journal: the last [`KEPT`] things that happened to it, each with its wall-clock time,
//! a stable kind and a message for a person, served by `lbctl status` (the "recent events"
//! section; `events` in `--json`).
//!
//! Logs say the same, but an operator asking "why did my connections reset at 03:12" should not
//! need the journal of a host that may have rotated it: lbd itself says that it was started
//! after being killed, that the pins were incomplete and the connection tables lost, that the
//! interface went down, that a backend failed its probes.
//!
//! Some of these can only be known by the *next* lbd: a SIGKILL runs no code. So lbd keeps a
//! small run-state file next to its control socket (`<control_socket>.state`, see
//! [`state_path`]): created at start, rewritten when a change or a table write begins and
//! ends, removed on a clean exit, and left with the error when lbd exits on one. A new lbd that
//! finds the file knows the previous one did not stop cleanly, and what it was doing: the table
//! write it cut short (was it published? the pinned VIP entry says) and the change it was
//! applying (is it in the configuration file? a hash of the file before and after says).
//!
//! The journal itself is the operator's history, so it outlives lbd too: every event is
//! appended to `<control_socket>.events` (one JSON object per line, see [`history_path`]),
//! trimmed to the last [`KEPT`] when it reaches twice that, and read back by the next lbd.
use crate::{control::Status, health::HealthStatus};
use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};
use std::{
    collections::{BTreeMap, VecDeque},
    fs,
    io::Write as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    sync::Mutex,
    time::{SystemTime, UNIX_EPOCH},
};

/// Events kept: enough for a day of faults, small enough to print.
pub const KEPT: usize = 64;

/// One event, as `lbctl status --json` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Wall clock, UTC, RFC 3339 with milliseconds (`2025-01-31T12:00:00.123Z`).
    pub time: String,
    /// The same instant, milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
    /// What kind of event ([`Kind::name`]); stable, for scripts.
    pub kind: String,
    /// What happened and what lbd did about it.
    pub message: String,
}

/// Kinds of events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// lbd started: fresh maps or restored from pins, with what it found.
    Start,
    /// The previous lbd stopped without cleaning up (SIGKILL, crash, power loss of the process).
    UncleanStop,
    /// The previous lbd exited with an error (its message).
    PreviousStartFailed,
    /// Pinned maps were missing: fresh maps were created.
    PinsMissing,
    /// The pinned counters map came from another build and was replaced.
    CountersReplaced,
    /// The interface lost its up or running (carrier) state.
    InterfaceDown,
    /// The interface is up and running again.
    InterfaceUp,
    /// lbd asked the kernel again to resolve the backends' next hops.
    NextHopsResolved,
    /// A health-checked backend went down, came back on probation, or is up.
    BackendDown,
    BackendProbation,
    BackendUp,
    /// An lbctl change was applied: the request as the lbctl command, who asked, what it did.
    ChangeApplied,
    /// An lbctl change was refused (bad input, or it conflicts with the file or the datapath).
    ChangeRefused,
    /// An lbctl change failed half-way and was rolled back.
    ChangeRolledBack,
    /// A SIGHUP reload was refused (nothing changed) or applied.
    ReloadRefused,
    Reloaded,
    /// The pinned XDP link was in another mode than `xdp_mode`: attached anew in the new one.
    XdpModeChanged,
    /// The datapath was taken away behind lbd's back: its program detached or replaced on the
    /// interface, or its pins removed.
    DatapathLost,
    /// The datapath is whole again after `DatapathLost` (put back by hand).
    DatapathRestored,
    /// An accepted configuration has something worth a warning (a small Maglev table).
    ConfigWarning,
    /// Fleet mode: the store became unreachable (forwarding goes on with the last revision),
    /// or reachable again.
    FleetStoreLost,
    FleetStoreBack,
    /// Fleet mode: a store revision was applied, or refused whole (the key and the fix).
    FleetApplied,
    FleetRefused,
    /// Fleet mode: this node became the leader, or stopped being it.
    FleetLeader,
    /// The VIPs this node announces by BGP changed (served, drained, datapath lost, ...).
    RoutesChanged,
    /// A BGP session came up or went down.
    BgpSessionUp,
    BgpSessionDown,
    /// The node-local BIRD exited (it is restarted).
    BgpSpeakerFailed,
    /// `lbctl node drain`, its timeout passing, `lbctl node undrain`.
    NodeDraining,
    NodeDrained,
    NodeUndrained,
    /// A connection table passed 80% of its capacity (or went back under).
    ConntrackFill,
}

impl Kind {
    /// Every kind, for counters that must exist (at 0) before the first event.
    pub const ALL: [Kind; 33] = [
        Kind::Start,
        Kind::UncleanStop,
        Kind::PreviousStartFailed,
        Kind::PinsMissing,
        Kind::CountersReplaced,
        Kind::InterfaceDown,
        Kind::InterfaceUp,
        Kind::NextHopsResolved,
        Kind::BackendDown,
        Kind::BackendProbation,
        Kind::BackendUp,
        Kind::ChangeApplied,
        Kind::ChangeRefused,
        Kind::ChangeRolledBack,
        Kind::ReloadRefused,
        Kind::Reloaded,
        Kind::XdpModeChanged,
        Kind::DatapathLost,
        Kind::DatapathRestored,
        Kind::ConfigWarning,
        Kind::FleetStoreLost,
        Kind::FleetStoreBack,
        Kind::FleetApplied,
        Kind::FleetRefused,
        Kind::FleetLeader,
        Kind::RoutesChanged,
        Kind::BgpSessionUp,
        Kind::BgpSessionDown,
        Kind::BgpSpeakerFailed,
        Kind::NodeDraining,
        Kind::NodeDrained,
        Kind::NodeUndrained,
        Kind::ConntrackFill,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Kind::Start => "start",
            Kind::UncleanStop => "unclean_stop",
            Kind::PreviousStartFailed => "previous_start_failed",
            Kind::PinsMissing => "pins_missing",
            Kind::CountersReplaced => "counters_replaced",
            Kind::InterfaceDown => "interface_down",
            Kind::InterfaceUp => "interface_up",
            Kind::NextHopsResolved => "next_hops_resolved",
            Kind::BackendDown => "backend_down",
            Kind::BackendProbation => "backend_probation",
            Kind::BackendUp => "backend_up",
            Kind::ChangeApplied => "change_applied",
            Kind::ChangeRefused => "change_refused",
            Kind::ChangeRolledBack => "change_rolled_back",
            Kind::ReloadRefused => "reload_refused",
            Kind::Reloaded => "reloaded",
            Kind::XdpModeChanged => "xdp_mode_changed",
            Kind::DatapathLost => "datapath_lost",
            Kind::DatapathRestored => "datapath_restored",
            Kind::ConfigWarning => "config_warning",
            Kind::FleetStoreLost => "fleet_store_lost",
            Kind::FleetStoreBack => "fleet_store_back",
            Kind::FleetApplied => "fleet_applied",
            Kind::FleetRefused => "fleet_refused",
            Kind::FleetLeader => "fleet_leader",
            Kind::RoutesChanged => "routes_changed",
            Kind::BgpSessionUp => "bgp_session_up",
            Kind::BgpSessionDown => "bgp_session_down",
            Kind::BgpSpeakerFailed => "bgp_speaker_failed",
            Kind::NodeDraining => "node_draining",
            Kind::NodeDrained => "node_drained",
            Kind::NodeUndrained => "node_undrained",
            Kind::ConntrackFill => "conntrack_fill",
        }
    }
}

/// Marks an lbctl change's error as one that was rolled back after touching the datapath or
/// the file (as opposed to refused before anything was touched); the journal tells them apart
/// with `downcast_ref`. Displays as its message, so error texts are unchanged.
#[derive(Debug)]
pub struct RolledBack(pub &'static str);

impl std::fmt::Display for RolledBack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

/// Kept here under its old name: the journal records it in the run-state file.
pub use crate::datapath::TableWrite;

/// A configuration change in progress: what it does, and the hashes ([`text_hash`]) of the
/// configuration file's text before it and of the text it would write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Operation {
    pub what: String,
    pub old_hash: Option<u64>,
    pub new_hash: Option<u64>,
}

/// The run-state file's content.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunState {
    pub pid: u32,
    pub started_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation: Option<Operation>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table_write: Option<TableWrite>,
    /// Set when lbd exits on an error (the file is then left behind on purpose).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_error: Option<String>,
}

/// The run-state file of the lbd serving `control_socket`: next to it, on the same (runtime)
/// file system, so it goes with a reboot just like the pins in bpffs.
pub fn state_path(control_socket: &Path) -> PathBuf {
    let mut s = control_socket.as_os_str().to_owned();
    s.push(".state");
    PathBuf::from(s)
}

/// FNV-1a, 64 bits: enough to tell two versions of a configuration file apart, and stable
/// across builds (unlike `DefaultHasher`), so a new lbd can compare with an old one's record.
pub fn text_hash(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `ms` since the epoch as RFC 3339 UTC with milliseconds (days to civil date: Howard
/// Hinnant's algorithm), without a date-time dependency.
pub fn rfc3339(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        ms % 1000
    )
}

/// The journal and the run-state file. Shared (`Arc`) by the agent, the balancer (table
/// writes) and lbd's main loop.
#[derive(Default)]
pub struct Journal {
    events: Mutex<VecDeque<Event>>,
    /// Events recorded since lbd started, by kind (not capped like `events`): alerting rules
    /// see a refused reload however many events followed it.
    counts: Mutex<BTreeMap<&'static str, u64>>,
    run: Mutex<Option<(PathBuf, RunState)>>,
    /// The history file events are appended to, once [`Journal::begin_run`] opened it.
    history: Mutex<Option<History>>,
}

/// The events file of the lbd serving `control_socket` (`<control_socket>.events`): one JSON
/// event per line, so that the operator's history survives a restart (it goes with a reboot,
/// like the pins).
pub fn history_path(control_socket: &Path) -> PathBuf {
    let mut s = control_socket.as_os_str().to_owned();
    s.push(".events");
    PathBuf::from(s)
}

/// Lines the history file may hold before it is rewritten with the last [`KEPT`] events.
const HISTORY_LINES: usize = 2 * KEPT;

/// The history file and how many lines it holds.
struct History {
    path: PathBuf,
    lines: usize,
}

impl History {
    /// Appends one event; past [`HISTORY_LINES`], rewrites the file with `kept` instead (atomic),
    /// so it stays bounded.
    fn append(&mut self, ev: &Event, kept: &VecDeque<Event>) -> Result<()> {
        if self.lines >= HISTORY_LINES {
            let text: String = kept
                .iter()
                .filter_map(|e| serde_json::to_string(e).ok())
                .map(|l| l + "\n")
                .collect();
            write_private(&self.path, text.as_bytes())?;
            self.lines = kept.len();
            return Ok(());
        }
        let mut f = fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&self.path)
            .with_context(|| format!("opening lbd's event history {}", self.path.display()))?;
        let mut line = serde_json::to_vec(ev)?;
        line.push(b'\n');
        f.write_all(&line)
            .with_context(|| format!("appending to lbd's event history {}", self.path.display()))?;
        self.lines += 1;
        Ok(())
    }
}

impl Journal {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an event (the oldest goes beyond [`KEPT`]), and appends it to the history file.
    pub fn record(&self, kind: Kind, message: impl Into<String>) {
        let ms = now_ms();
        *self
            .counts
            .lock()
            .expect("journal counts lock")
            .entry(kind.name())
            .or_default() += 1;
        let mut ev = self.events.lock().expect("journal lock");
        let event = Event {
            time: rfc3339(ms),
            timestamp_ms: ms,
            kind: kind.name().to_string(),
            message: message.into(),
        };
        ev.push_back(event.clone());
        while ev.len() > KEPT {
            ev.pop_front();
        }
        if let Some(h) = self.history.lock().expect("history lock").as_mut() {
            if let Err(e) = h.append(&event, &ev) {
                tracing::warn!("{e:#}");
            }
        }
    }

    /// Takes over the history file at `path`: the events a previous lbd recorded there come
    /// first (the last [`KEPT`]), then every event from now on is appended. Lines that do not
    /// parse (a write cut short by a kill) are skipped. Returns how many events were read.
    pub fn open_history(&self, path: &Path) -> Result<usize> {
        let text = match fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("reading lbd's event history {}", path.display()))
            }
        };
        let old: Vec<Event> = text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        let n = old.len();
        let mut ev = self.events.lock().expect("journal lock");
        let mine: Vec<Event> = ev.drain(..).collect();
        ev.extend(old.into_iter().chain(mine));
        while ev.len() > KEPT {
            ev.pop_front();
        }
        *self.history.lock().expect("history lock") = Some(History {
            path: path.to_path_buf(),
            lines: text.lines().count(),
        });
        Ok(n)
    }

    /// How many events of each kind were recorded since lbd started, every kind present.
    pub fn counts(&self) -> Vec<(&'static str, u64)> {
        let counts = self.counts.lock().expect("journal counts lock");
        Kind::ALL
            .iter()
            .map(|k| (k.name(), counts.get(k.name()).copied().unwrap_or(0)))
            .collect()
    }

    /// The events kept, oldest first.
    pub fn recent(&self) -> Vec<Event> {
        self.events
            .lock()
            .expect("journal lock")
            .iter()
            .cloned()
            .collect()
    }

    /// Takes over the run-state file at `path`: returns what a previous lbd left there (it
    /// did not stop cleanly, or it exited on an error) and writes this lbd's. Call it once the
    /// control socket is bound: no other lbd serves this socket then.
    pub fn begin_run(&self, path: &Path) -> Result<Option<RunState>> {
        let previous = match fs::read_to_string(path) {
            Ok(text) => Some(serde_json::from_str(&text).unwrap_or_else(|e| RunState {
                // Unreadable (written by something else?): still proof of an unclean stop.
                exit_error: Some(format!("(run-state file unreadable: {e})")),
                ..RunState::default()
            })),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("reading lbd's run state {}", path.display()))
            }
        };
        let state = RunState {
            pid: std::process::id(),
            started_ms: now_ms(),
            ..RunState::default()
        };
        write_state(path, &state)?;
        *self.run.lock().expect("run lock") = Some((path.to_path_buf(), state));
        Ok(previous)
    }

    fn update(&self, f: impl FnOnce(&mut RunState)) {
        let mut run = self.run.lock().expect("run lock");
        let Some((path, state)) = run.as_mut() else {
            return;
        };
        f(state);
        if let Err(e) = write_state(path, state) {
            tracing::warn!("updating lbd's run state {}: {e:#}", path.display());
        }
    }

    /// Notes the table write about to start (`Some`) or just published (`None`).
    pub fn table_write(&self, w: Option<TableWrite>) {
        self.update(|s| s.table_write = w);
    }

    /// Notes a configuration change about to be applied; the note goes when the returned guard
    /// drops (the change done or refused). `old_text` is the configuration file as lbd last
    /// read or wrote it, `new_text` the file as it is once the change is saved.
    pub fn begin_change(
        &self,
        what: &str,
        old_text: Option<&str>,
        new_text: Option<&str>,
    ) -> Busy<'_> {
        self.update(|s| {
            s.operation = Some(Operation {
                what: what.to_string(),
                old_hash: old_text.map(text_hash),
                new_hash: new_text.map(text_hash),
            })
        });
        Busy(self)
    }

    /// Records a health transition of a backend (where the agent logs it).
    #[allow(clippy::too_many_arguments)]
    pub fn health(
        &self,
        vip: &str,
        backend: std::net::IpAddr,
        from: HealthStatus,
        to: HealthStatus,
        error: &str,
        consecutive_failures: u32,
        latency_ms: f64,
    ) {
        let (kind, msg) = match to {
            HealthStatus::Down => (
                Kind::BackendDown,
                format!(
                    "backend {backend} of vip {vip} down (was {from}) after {consecutive_failures} failed probes in a row, last: {}: no new flows, its established flows are steered to other backends",
                    if error.is_empty() { "failed" } else { error }
                ),
            ),
            HealthStatus::Probation => (
                Kind::BackendProbation,
                format!(
                    "backend {backend} of vip {vip} passing probes again ({latency_ms:.1} ms): on probation at a reduced weight (slow start)"
                ),
            ),
            _ => (
                Kind::BackendUp,
                format!("backend {backend} of vip {vip} up (was {from}): full weight"),
            ),
        };
        self.record(kind, msg);
    }

    /// lbd exits cleanly: the run-state file goes.
    pub fn clean_exit(&self) {
        if let Some((path, _)) = self.run.lock().expect("run lock").take() {
            if let Err(e) = fs::remove_file(&path) {
                tracing::warn!("removing lbd's run state {}: {e}", path.display());
            }
        }
    }

    /// lbd exits on an error: the run-state file stays, with the error, for the next lbd.
    pub fn exit_failed(&self, error: &str) {
        self.update(|s| {
            s.exit_error = Some(error.to_string());
            s.operation = None;
        });
        self.run.lock().expect("run lock").take();
    }
}

/// Clears the change noted by [`Journal::begin_change`] when dropped.
pub struct Busy<'a>(&'a Journal);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.update(|s| s.operation = None);
    }
}

/// Writes the run-state file atomically (temporary file, rename): a kill in the middle leaves
/// the previous version, never half of one. The temporary file is created exclusively, so a
/// link planted at its name is not followed.
fn write_state(path: &Path, state: &RunState) -> Result<()> {
    let bytes = serde_json::to_vec(state)?;
    write_private(path, &bytes).map_err(|e| anyhow::anyhow!("writing lbd's run state: {e:#}"))
}

/// Writes `bytes` to `path` atomically, mode 0600 (temporary file created exclusively, not
/// following links, then renamed over `path`).
fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let _ = fs::remove_file(&tmp);
    let write = || -> std::io::Result<()> {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        f.write_all(bytes)?;
        drop(f);
        fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&tmp);
        anyhow::anyhow!("writing {}: {e}", path.display())
    })
}

/// What a starting lbd knows, for its start events.
pub struct StartFacts<'a> {
    pub pins: &'a crate::datapath::PinReport,
    /// The interface and the XDP mode in use.
    pub interface: &'a str,
    pub xdp_mode: &'a str,
    pub vips: usize,
    pub backends: usize,
    /// Each restored VIP's table generation as found in the pinned VIP map (before this lbd
    /// applied its configuration): a table write cut short is published iff this reached it.
    pub restored_generations: &'a BTreeMap<String, u32>,
    /// The configuration file's text as this lbd read it.
    pub config_text: Option<&'a str>,
    /// What the previous lbd left in the run-state file.
    pub previous: Option<&'a RunState>,
}

/// The events of a start, recorded in `journal`: how it found the pins, and what the previous
/// lbd left unfinished.
pub fn record_start(journal: &Journal, f: &StartFacts) {
    let p = f.pins;
    let dir = p
        .dir
        .as_ref()
        .map_or_else(String::new, |d| d.display().to_string());
    let state = if p.resumed {
        format!(
            "state rebuilt from the pins in {dir} ({} VIPs, {} backends; connection tables kept)",
            p.restored_vips, p.restored_backends
        )
    } else if p.dir.is_some() {
        format!("fresh maps pinned in {dir}")
    } else {
        "fresh maps, not pinned (pin_dir is empty)".to_string()
    };
    if let Some(prev) = f.previous {
        record_previous(journal, prev, f, &state);
    }
    if !p.missing.is_empty() && (!p.found.is_empty() || p.link) {
        let what = if p.found.is_empty() {
            format!("no pinned maps in {dir} although the pinned XDP link was there (removed?)")
        } else {
            format!(
                "pinned maps missing in {dir}: {} (found {}); an incomplete set cannot be taken over, so the rest were removed",
                p.missing.join(", "),
                p.dropped.join(", ")
            )
        };
        journal.record(
            Kind::PinsMissing,
            format!(
                "{what}; created fresh maps and pinned them again. Tracked connections were forgotten: established flows keep their backend while their table is unchanged (the rebuilt table is the same for the same configuration)"
            ),
        );
    }
    if let Some(slots) = p.counters_replaced {
        journal.record(
            Kind::CountersReplaced,
            format!(
                "the pinned COUNTERS map in {dir} has {slots} slots (another build), this lbd uses {}: replaced it, so the datapath counters restart from zero; tables and connection tables were kept",
                lb_common::COUNTER_SLOTS
            ),
        );
    }
    let how = if p.resumed {
        "restored from pins".to_string()
    } else {
        "fresh".to_string()
    };
    let link = if p.link {
        "; the program in the pinned XDP link was replaced in place (no detach)"
    } else {
        ""
    };
    journal.record(
        Kind::Start,
        format!(
            "started ({how}) on {} ({} XDP): {} VIPs, {} backends; {state}{link}",
            f.interface, f.xdp_mode, f.vips, f.backends
        ),
    );
}

fn record_previous(journal: &Journal, prev: &RunState, f: &StartFacts, state: &str) {
    let who = if prev.pid != 0 {
        format!(
            "previous lbd (pid {}, started {})",
            prev.pid,
            rfc3339(prev.started_ms)
        )
    } else {
        "previous lbd".to_string()
    };
    if let Some(err) = &prev.exit_error {
        let msg = format!("{who} exited with an error: {err}");
        tracing::warn!("{msg}");
        journal.record(Kind::PreviousStartFailed, msg);
        return;
    }
    let mut msg = format!("{who} stopped without cleanup (killed?)");
    if let Some(w) = &prev.table_write {
        let found = f.restored_generations.get(&w.vip).copied();
        let outcome = match found {
            Some(g) if g >= w.generation => format!(
                "that table had been published (the pinned VIP entry has generation {g})"
            ),
            Some(g) => format!(
                "that write was never published (the pinned VIP entry still has generation {g}, a complete table), so the unfinished table write was discarded"
            ),
            None if f.pins.resumed => {
                "the VIP was not in the pinned VIP map, so the unfinished table write was discarded".to_string()
            }
            None => "the pins were not taken over, so the unfinished table write is gone with them".to_string(),
        };
        msg.push_str(&format!(
            "; it was writing the table of vip {} (generation {}, {} slots at ring offset {}): {outcome}",
            w.vip, w.generation, w.slots, w.offset
        ));
    }
    if let Some(op) = &prev.operation {
        let now = f.config_text.map(text_hash);
        let file = if now.is_some() && now == op.new_hash {
            "the configuration file holds the changed configuration (it had been saved)"
        } else if now.is_some() && now == op.old_hash {
            "the configuration file holds the configuration from before the change (it had not been saved), and that is what was applied now"
        } else {
            "the configuration file holds neither the configuration before nor after it (edited since?), and that is what was applied now"
        };
        msg.push_str(&format!("; a change was in progress ({}): {file}", op.what));
    }
    msg.push_str(&format!("; {state}"));
    tracing::warn!("{msg}");
    journal.record(Kind::UncleanStop, msg);
}

/// The kind of a failed lbctl change: rolled back, or refused before anything was touched.
pub fn change_failure_kind(e: &anyhow::Error) -> Kind {
    if e.downcast_ref::<RolledBack>().is_some() {
        Kind::ChangeRolledBack
    } else {
        Kind::ChangeRefused
    }
}

/// The "recent events" section of `lbctl status`: the last `n` events, oldest first.
pub fn format_recent(s: &Status, n: usize) -> String {
    let mut out = String::new();
    if s.events.is_empty() {
        return out;
    }
    out.push_str("\nrecent events (UTC):\n");
    let skip = s.events.len().saturating_sub(n);
    if skip > 0 {
        out.push_str(&format!(
            "  ({skip} earlier events: lbctl status --json shows all {})\n",
            s.events.len()
        ));
    }
    for e in &s.events[skip..] {
        // "2025-01-31T12:00:00.123Z" -> "2025-01-31 12:00:00"
        let t = e.time.get(..19).unwrap_or(&e.time).replace('T', " ");
        out.push_str(&format!("  {t}  {:<20} {}\n", e.kind, e.message));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn every_kind_is_counted_and_in_the_readme() {
        let readme = include_str!("../../../README.md");
        let line = readme
            .lines()
            .find(|l| l.contains("`kind` one of"))
            .expect("README lists the event kinds");
        let listed: Vec<&str> = line
            .split("`kind` one of")
            .nth(1)
            .unwrap()
            .split(';')
            .next()
            .unwrap()
            .split('`')
            .skip(1)
            .step_by(2)
            .collect();
        let all: Vec<&str> = Kind::ALL.iter().map(|k| k.name()).collect();
        assert_eq!(listed, all, "README's event kinds and Kind::ALL differ");
    }

    #[test]
    fn rfc3339_matches_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
    }

    #[test]
    fn rolled_back_changes_are_told_apart_and_read_the_same() {
        let e = anyhow::anyhow!("disk full").context(RolledBack("the change was rolled back"));
        assert_eq!(change_failure_kind(&e), Kind::ChangeRolledBack);
        assert_eq!(format!("{e:#}"), "the change was rolled back: disk full");
        let refused = anyhow::anyhow!("weight 10001 is out of range");
        assert_eq!(change_failure_kind(&refused), Kind::ChangeRefused);
    }

    #[test]
    fn journal_keeps_the_last_events() {
        let j = Journal::new();
        for i in 0..KEPT + 5 {
            j.record(Kind::BackendDown, format!("event {i}"));
        }
        let ev = j.recent();
        assert_eq!(ev.len(), KEPT);
        assert_eq!(ev[0].message, "event 5");
        assert_eq!(ev[KEPT - 1].kind, "backend_down");
    }

    #[test]
    fn the_history_survives_a_restart_and_stays_bounded() {
        let dir = std::env::temp_dir().join(format!("lb-history-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = history_path(&dir.join("lbd.sock"));
        let _ = fs::remove_file(&path);
        let j = Journal::new();
        j.record(Kind::Start, "before the file was opened");
        assert_eq!(j.open_history(&path).unwrap(), 0);
        j.record(
            Kind::ChangeApplied,
            "lbctl backend drain x y (by uid 0 pid 1): drained",
        );
        drop(j);
        // A write cut short by a kill leaves half a line: skipped.
        let mut f = fs::OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"time\":\"20").unwrap();
        drop(f);
        let j = Journal::new();
        j.record(Kind::Start, "second start");
        assert_eq!(j.open_history(&path).unwrap(), 1);
        let ev = j.recent();
        let msgs: Vec<&str> = ev.iter().map(|e| e.message.as_str()).collect();
        assert_eq!(
            msgs,
            [
                "lbctl backend drain x y (by uid 0 pid 1): drained",
                "second start"
            ]
        );
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // Bounded: however many events, the file holds at most twice KEPT lines and the
        // journal the last KEPT.
        for i in 0..5 * KEPT {
            j.record(Kind::BackendDown, format!("event {i}"));
        }
        let lines = fs::read_to_string(&path).unwrap().lines().count();
        assert!(lines <= HISTORY_LINES + 1, "{lines} lines");
        let again = Journal::new();
        again.open_history(&path).unwrap();
        let ev = again.recent();
        assert_eq!(ev.len(), KEPT);
        assert_eq!(ev[KEPT - 1].message, format!("event {}", 5 * KEPT - 1));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn run_state_survives_a_kill_and_says_what_was_unfinished() {
        let dir = std::env::temp_dir().join(format!("lb-events-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = state_path(&dir.join("lbd.sock"));
        let _ = fs::remove_file(&path);
        // First run: a table write and a change in flight, then "killed" (no clean_exit).
        let j = Journal::new();
        assert_eq!(j.begin_run(&path).unwrap(), None);
        j.table_write(Some(TableWrite {
            vip: "10.0.0.1:80/tcp".into(),
            generation: 4,
            slots: 7,
            offset: 14,
        }));
        let busy = j.begin_change("weight 1 -> 2", Some("old"), Some("new"));
        std::mem::forget(busy);
        drop(j);
        // Second run finds it.
        let j2 = Journal::new();
        let prev = j2.begin_run(&path).unwrap().expect("left behind");
        assert_eq!(prev.table_write.as_ref().unwrap().generation, 4);
        assert_eq!(
            prev.operation.as_ref().unwrap().old_hash,
            Some(text_hash("old"))
        );
        let pins = crate::datapath::PinReport {
            resumed: true,
            restored_vips: 1,
            restored_backends: 3,
            ..Default::default()
        };
        let gens = BTreeMap::from([("10.0.0.1:80/tcp".to_string(), 3)]);
        record_start(
            &j2,
            &StartFacts {
                pins: &pins,
                interface: "eth0",
                xdp_mode: "native",
                vips: 1,
                backends: 3,
                restored_generations: &gens,
                config_text: Some("old"),
                previous: Some(&prev),
            },
        );
        let ev = j2.recent();
        assert_eq!(ev[0].kind, "unclean_stop");
        for want in [
            "stopped without cleanup",
            "never published",
            "unfinished table write was discarded",
            "from before the change (it had not been saved)",
            "state rebuilt from the pins",
        ] {
            assert!(
                ev[0].message.contains(want),
                "{want:?} in {}",
                ev[0].message
            );
        }
        assert_eq!(ev[1].kind, "start");
        // A clean exit removes the file; an error exit leaves it with the error.
        j2.clean_exit();
        assert!(!path.exists());
        let j3 = Journal::new();
        assert_eq!(j3.begin_run(&path).unwrap(), None);
        j3.exit_failed("pinned map CT has other sizes");
        let prev = Journal::new().begin_run(&path).unwrap().unwrap();
        assert_eq!(
            prev.exit_error.as_deref(),
            Some("pinned map CT has other sizes")
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
