//! Chaos: faults under load, each with the recovery it must show and the flows it must not lose.
//!
//! * `sigkill_mid_table_write_never_publishes_a_half_table`: lbd is SIGKILLed while it writes a
//!   1048573-slot table into the ring pool (an `lbctl backend set-weight` in progress). The
//!   datapath keeps serving (no reset, every new connection succeeds while lbd is dead), the VIP
//!   entry still points at a complete table of live backends, the configuration file is whole
//!   (the old one, or the new one if the change had been saved), and a new lbd resumes from the
//!   pins and applies changes again.
//! * `map_pins_removed_under_the_link_recover`: with lbd stopped, an older build's COUNTERS pin
//!   is replaced alone (connection tables kept); then part of the map pins are removed (the
//!   rest is dropped, fresh maps: established flows keep their backend, and count `ct_lost`);
//!   then every map pin is removed but the link pin is left; a new lbd creates fresh maps and
//!   swaps its program into the link.
//! * `stale_pins_of_other_sizes_are_refused_naming_cleanup`: pins made with conntrack_size 4096
//!   are refused by an lbd configured with 8192, with the exact message naming `lbd cleanup`;
//!   after `lbd cleanup` it starts and traffic flows.
//! * `pins_of_an_older_conntrack_layout_are_refused_naming_cleanup`: the `CT` pin is replaced by
//!   one with the previous value layout (8-byte values, before the SYN's sequence number and the
//!   re-steered flag): lbd refuses it, naming the other map layout and `lbd cleanup`; the old
//!   datapath keeps serving; after `lbd cleanup` it starts and traffic flows.
//! * `interface_flap_keeps_xdp_and_flows`: eth0 of the balancer goes down for 1 s and up again:
//!   XDP stays attached, long-lived connections survive (TCP retransmits across the flap), new
//!   connections succeed.
//! * `backend_namespace_deleted_under_load`: a backend's namespace disappears while a client
//!   opens connections; health checks (200 ms, fall 2) take it down within 1.5 s, then every new
//!   connection succeeds and long-lived connections on the other backends see no reset.
//!
//! After each fault the test also asserts that `lbctl status` says what happened (the event
//! in `--json` and on a line of the text's "recent events"): the kill and the unfinished table
//! write and change, the pins found missing or from an older build, the failed start, the
//! interface going down and up, the backend going down.
//!
//! lbd runs with `nsenter --net` (root mount namespace: pins land in the host's /sys/fs/bpf),
//! each test with its own pin_dir, control socket and scratch directory, all removed by
//! [`Fixture`]'s Drop even when an assertion fails.
use aya::maps::{Array, HashMap as BpfHashMap, Map, MapData};
use lb_common::{BackendInfo, CtValue, FlowKey, VipKey, VipMeta, BACKEND_F_ACTIVE};
use serde_json::Value;
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    mem::size_of,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};
use tests::{
    lab::{backend_v4, Lab, LabSpec, LB_V4, LB_V6, VIP_V4},
    procs::{bin_path, lbctl, lbd_cleanup, start_decaps, wait_for, xdp_attached, Lbd, LbdOptions},
    require_root,
    tcp::{client_many, client_once, tally, LongLived, TcpServer},
};

const VIP: &str = "10.200.100.1:80/tcp";
const BIG_TABLE: u32 = 1_048_573;

fn vip() -> SocketAddr {
    SocketAddr::new(IpAddr::from(VIP_V4), 80)
}

/// What goes into lbd.toml.
#[derive(Clone)]
struct Settings {
    table_size: u32,
    table_pool: u32,
    conntrack_size: u32,
    health: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            table_size: 4099,
            table_pool: 65_536,
            conntrack_size: 65_536,
            health: false,
        }
    }
}

/// One lab (3 backends with servers and decap), one scratch directory, one pin_dir; Drop kills
/// lbd, removes the pins and the scratch directory, then the lab goes (namespaces deleted).
struct Fixture {
    name: String,
    dir: PathBuf,
    pin_dir: PathBuf,
    socket: PathBuf,
    lbd: Option<Lbd>,
    /// When the running lbd was spawned (ms since the epoch): the journal keeps the events of
    /// earlier lbds too (its history file), and these tests look at the running one's.
    spawned_ms: u64,
    starts: usize,
    servers: Vec<Option<TcpServer>>,
    decaps: Vec<Option<Child>>,
    lab: Lab,
}

impl Fixture {
    fn new(name: &str) -> Fixture {
        require_root();
        let lab = Lab::new(LabSpec { backends: 3 }).expect("building the lab");
        let dir = std::env::temp_dir().join(format!("{}-chaos-{name}", lab.prefix()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        let pin_dir = Path::new("/sys/fs/bpf").join(format!("{}-chaos-{name}", lab.prefix()));
        let servers = (0..3)
            .map(|i| {
                let addrs = [vip(), SocketAddr::new(IpAddr::from(backend_v4(i)), 80)];
                Some(TcpServer::start(lab.backend(i).ns(), &addrs, &format!("backend{i}")).unwrap())
            })
            .collect();
        let decaps = start_decaps(&lab, 3).into_iter().map(Some).collect();
        Fixture {
            name: name.to_string(),
            socket: dir.join("lbd.sock"),
            dir,
            pin_dir,
            lbd: None,
            spawned_ms: 0,
            starts: 0,
            servers,
            decaps,
            lab,
        }
    }

    fn config(&self) -> PathBuf {
        self.dir.join("lbd.toml")
    }

    fn write_config(&self, s: &Settings) {
        let mut text = format!(
            "interface = \"eth0\"\nxdp_mode = \"native\"\npin_dir = \"{}\"\ncontrol_socket = \"{}\"\n\
             table_pool = {}\nconntrack_size = {}\nconntrack_new_size = 1024\n\
             [encap]\nsource_v4 = \"{LB_V4}\"\nsource_v6 = \"{LB_V6}\"\n\
             [[vip]]\naddress = \"{VIP_V4}\"\nport = 80\nprotocol = \"tcp\"\ntable_size = {}\n",
            self.pin_dir.display(),
            self.socket.display(),
            s.table_pool,
            s.conntrack_size,
            s.table_size,
        );
        if s.health {
            text.push_str(
                "[vip.health]\nkind = \"tcp\"\ninterval_ms = 200\ntimeout_ms = 200\nrise = 2\nfall = 2\n",
            );
        }
        for i in 0..3 {
            text.push_str(&format!(
                "[[vip.backend]]\naddress = \"{}\"\nweight = 1\n",
                backend_v4(i)
            ));
        }
        fs::write(self.config(), text).unwrap();
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join(format!("lbd-{}.log", self.starts))
    }

    fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Starts lbd (debug records of the datapath module on: they bracket table writes), with
    /// `nsenter --net` so that its pins land in the host's bpffs, logging to a file per start.
    fn spawn_lbd(&mut self) -> &mut Lbd {
        assert!(self.lbd.is_none(), "lbd already running");
        self.starts += 1;
        self.spawned_ms = tests::procs::now_ms();
        let opts = LbdOptions {
            nsenter: true,
            env: vec![(
                "RUST_LOG".into(),
                "info,aya::bpf=error,lb_userspace::datapath=debug".into(),
            )],
            log: Some(self.log_path()),
            ..LbdOptions::default()
        };
        let lbd = Lbd::spawn(self.lab.lb().ns(), &self.config(), &self.socket, &opts);
        self.lbd.insert(lbd)
    }

    /// Starts lbd and waits until it serves lbctl; returns how long that took.
    fn start_lbd(&mut self) -> Duration {
        let t = Instant::now();
        self.spawn_lbd().wait_serving();
        t.elapsed()
    }

    fn stop_lbd(&mut self) {
        let s = self.lbd.take().expect("lbd running").stop();
        assert!(s.success(), "lbd exited with {s}:\n{}", self.log());
    }

    fn sigkill_lbd(&mut self) {
        self.lbd.take().expect("lbd running").sigkill();
    }

    /// `lbd --config FILE cleanup`, asserted to succeed.
    fn cleanup(&self) {
        lbd_cleanup(self.lab.lb().ns(), &self.config());
    }

    fn xdp_on_lb(&self) -> bool {
        xdp_attached(self.lab.lb().ns())
    }

    /// `lbctl status --json`'s events recorded by the running lbd (not the history of the
    /// ones before it) and `lbctl status`'s text.
    fn status_events(&self) -> (Vec<Value>, String) {
        let json: Value = serde_json::from_str(&lbctl_ok(&self.socket, &["status", "--json"]))
            .expect("status JSON");
        let text = lbctl_ok(&self.socket, &["status"]);
        let mine = json["events"]
            .as_array()
            .expect("events")
            .iter()
            .filter(|e| e["timestamp_ms"].as_u64() >= Some(self.spawned_ms))
            .cloned()
            .collect();
        (mine, text)
    }

    /// The message of the event of `kind` that mentions every one of `words`, asserted to be
    /// in `lbctl status --json` (with a current wall-clock time) and, on one line with its
    /// kind, in the "recent events" of `lbctl status`.
    fn expect_event(&self, kind: &str, words: &[&str]) -> String {
        let (events, text) = self.status_events();
        let found = events.iter().find(|e| {
            e["kind"] == kind
                && words
                    .iter()
                    .all(|w| e["message"].as_str().unwrap_or("").contains(w))
        });
        let e = found.unwrap_or_else(|| {
            panic!("no {kind:?} event mentioning {words:?} in lbctl status --json: {events:#?}")
        });
        let msg = e["message"].as_str().unwrap().to_string();
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let at = e["timestamp_ms"].as_u64().expect("timestamp_ms");
        assert!(
            at <= now_ms && now_ms - at < 600_000,
            "event time {at} is not within the last 10 minutes of {now_ms}: {e}"
        );
        let time = e["time"].as_str().unwrap();
        assert!(
            time.ends_with('Z') && time.len() == 24,
            "RFC 3339 UTC: {time}"
        );
        assert!(
            text.contains("recent events")
                && text.lines().any(|l| l.contains(kind) && l.contains(&msg)),
            "lbctl status does not show the {kind} event {msg:?}:\n{text}"
        );
        msg
    }

    /// Kinds of the events `lbctl status --json` shows.
    /// After lbd refused to start on the pins: its stderr has the `expected` line, the old
    /// datapath still serves, `lbd cleanup` removes the pins, a new lbd starts fresh and serves
    /// every backend, and `lbctl status` tells why the last start failed (`words`). Returns the
    /// new start's duration, the backends' counts and the event's text.
    fn refused_then_cleaned_up(
        &mut self,
        expected: &str,
        words: &[&str],
    ) -> (Duration, BTreeMap<String, usize>, String) {
        let log = self.log();
        assert!(
            log.lines().any(|l| l == expected),
            "expected the line\n{expected}\nin lbd's stderr:\n{log}"
        );
        assert!(
            self.xdp_on_lb(),
            "refusing must leave the old datapath running"
        );
        self.all_new_succeed(50, "after the refusal (old datapath)");
        self.cleanup();
        assert!(!self.pin_dir.exists());
        let took = self.start_lbd();
        let counts = self.all_new_succeed(200, "after cleanup and start");
        assert_eq!(counts.len(), 3, "{counts:?}");
        let why = self.expect_event("previous_start_failed", words);
        self.expect_event("start", &["started (fresh)", "fresh maps pinned in"]);
        (took, counts, why)
    }

    fn event_kinds(&self) -> Vec<String> {
        self.status_events()
            .0
            .iter()
            .map(|e| e["kind"].as_str().unwrap().to_string())
            .collect()
    }

    /// A datapath counter from `lbctl stats --json`.
    fn counter(&self, name: &str) -> u64 {
        let v: Value = serde_json::from_str(&lbctl_ok(
            &self.socket,
            &["stats", "--json", "--interval", "0.1"],
        ))
        .expect("stats JSON");
        v["counters"][name]
            .as_u64()
            .unwrap_or_else(|| panic!("no counter {name}: {v}"))
    }

    fn prog_id(&self) -> Option<String> {
        let s = self
            .lab
            .lb()
            .ns()
            .ip(["-d", "link", "show", "dev", "eth0"])
            .ok()?;
        s.split("prog/xdp id ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .map(str::to_string)
    }

    /// `count` new connections from the client; all must succeed. Returns the tally.
    fn all_new_succeed(&self, count: usize, when: &str) -> BTreeMap<String, usize> {
        let results = client_many(self.lab.client().ns(), vip(), count, Duration::from_secs(3));
        let failed: Vec<String> = results
            .iter()
            .filter_map(|r| r.as_ref().err().map(|e| e.to_string()))
            .collect();
        assert!(
            failed.is_empty(),
            "{when}: {} of {count} new connections failed: {:?}",
            failed.len(),
            failed.first()
        );
        tally(&results)
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.lbd = None;
        if self.pin_dir.exists() {
            if let Err(e) = lb_userspace::datapath::remove_pins(&self.pin_dir) {
                eprintln!("warning: removing pins of {}: {e:#}", self.name);
            }
        }
        for d in self.decaps.iter_mut().flatten() {
            let _ = d.kill();
            let _ = d.wait();
        }
        self.servers.clear();
        if std::thread::panicking() {
            eprintln!("lbd log ({}):\n{}", self.name, self.log());
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

fn lbctl_ok(socket: &Path, args: &[&str]) -> String {
    let out = lbctl(socket, args);
    assert!(
        out.status.success(),
        "lbctl {args:?}: {}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn open_map(pin_dir: &Path, name: &str) -> Map {
    let data = MapData::from_pin(pin_dir.join(name))
        .unwrap_or_else(|e| panic!("opening pinned {name}: {e}"));
    Map::from_map_data(data).unwrap()
}

/// What the kernel reads: the VIP entry and every RING slot of its region. Every slot must be
/// the id of an active backend whose address is one of the lab's backends. Returns the VIP
/// entry and the slot count per backend address.
fn published_table(pin_dir: &Path) -> (VipMeta, BTreeMap<Ipv4Addr, usize>) {
    let vips: BpfHashMap<MapData, VipKey, VipMeta> =
        BpfHashMap::try_from(open_map(pin_dir, "VIPS")).unwrap();
    let entries: Vec<(VipKey, VipMeta)> = vips.iter().map(|r| r.unwrap()).collect();
    assert_eq!(entries.len(), 1, "one VIP published: {entries:?}");
    let meta = entries[0].1;
    let ring: Array<MapData, u32> = Array::try_from(open_map(pin_dir, "RING")).unwrap();
    let backends: Array<MapData, BackendInfo> =
        Array::try_from(open_map(pin_dir, "BACKENDS")).unwrap();
    let lab_backends: BTreeSet<Ipv4Addr> = (0..3).map(backend_v4).collect();
    let mut live: BTreeMap<u32, Ipv4Addr> = BTreeMap::new();
    let mut counts: BTreeMap<Ipv4Addr, usize> = BTreeMap::new();
    for i in 0..meta.ring_size {
        let id = ring.get(&(meta.ring_offset + i), 0).unwrap();
        assert_ne!(id, 0, "slot {i} of the published table is empty: {meta:?}");
        let addr = *live.entry(id).or_insert_with(|| {
            let b = backends.get(&id, 0).unwrap();
            assert!(
                b.flags & BACKEND_F_ACTIVE != 0,
                "slot {i} holds backend id {id}, which is not active: {b:?}"
            );
            let a = Ipv4Addr::new(b.addr[0], b.addr[1], b.addr[2], b.addr[3]);
            assert!(lab_backends.contains(&a), "backend id {id} is {a}");
            a
        });
        *counts.entry(addr).or_default() += 1;
    }
    (meta, counts)
}

/// Zeroes RING slots `[offset, offset + size)` (a region no VIP entry points at).
fn zero_slots(pin_dir: &Path, offset: u32, size: u32) {
    let mut ring: Array<MapData, u32> = Array::try_from(open_map(pin_dir, "RING")).unwrap();
    for i in offset..offset + size {
        ring.set(i, 0, 0).unwrap();
    }
}

/// Non-zero RING slots in `[offset, offset + size)`.
fn written_slots(pin_dir: &Path, offset: u32, size: u32) -> usize {
    let ring: Array<MapData, u32> = Array::try_from(open_map(pin_dir, "RING")).unwrap();
    (offset..offset + size)
        .filter(|i| ring.get(i, 0).unwrap() != 0)
        .count()
}

fn count(text: &str, needle: &str) -> usize {
    text.matches(needle).count()
}

#[test]
fn sigkill_mid_table_write_never_publishes_a_half_table() {
    let mut fx = Fixture::new("kill");
    let settings = Settings {
        table_size: BIG_TABLE,
        table_pool: 4 * BIG_TABLE,
        ..Settings::default()
    };
    fx.write_config(&settings);
    let first_start = fx.start_lbd();
    println!("lbd with a {BIG_TABLE}-slot table ready in {first_start:?}");
    let mut long = LongLived::open(fx.lab.client().ns(), vip(), 100, Duration::from_secs(3))
        .expect("opening long-lived connections");
    long.assert_intact(&[], "at the start");
    let (meta0, counts0) = published_table(&fx.pin_dir);
    assert_eq!(meta0.ring_size, BIG_TABLE);
    println!("published before: {meta0:?} {counts0:?}");
    let b0 = backend_v4(0).to_string();

    // Kill at several delays after lbd logs that it started writing, until one lands before
    // the table is published with part of its slots written. Before each attempt every region
    // of the ring pool an earlier write used, except the published one, is zeroed (the
    // restarted lbd knows such a region is free, not what it holds), so the write goes to zero
    // slots and what it reached can be counted. A table write is a few batch syscalls (about
    // 100 ms for these 1M slots), so the log is watched closely.
    let offsets = |log: &str| -> Vec<u32> {
        log.lines()
            .filter(|l| l.contains("writing table"))
            .filter_map(|l| l.split("offset=").nth(1))
            .filter_map(|r| r.split_whitespace().next())
            .filter_map(|n| n.parse().ok())
            .collect()
    };
    let mut used: BTreeSet<u32> = offsets(&fx.log()).into_iter().collect();
    let mut landed = None;
    for (attempt, delay_ms) in [30u64, 60, 15, 100, 5, 150].into_iter().enumerate() {
        // What is published before this attempt (an earlier attempt that landed after
        // publishing has changed it, and the restart after it may have too).
        let (meta_before, counts_before) = published_table(&fx.pin_dir);
        for off in std::mem::take(&mut used) {
            if off == meta_before.ring_offset {
                used.insert(off);
            } else {
                zero_slots(&fx.pin_dir, off, BIG_TABLE);
            }
        }
        let log_before = fx.log();
        let (writes, publishes) = (
            count(&log_before, "writing table"),
            count(&log_before, "table published"),
        );
        let weight = (attempt + 2).to_string();
        // The file as lbd last wrote it, and what it would be with this change saved.
        let cfg_before = lb_userspace::Config::load(&fx.config()).expect("config before");
        let mut cfg_changed = cfg_before.clone();
        cfg_changed.vips[0]
            .backends
            .iter_mut()
            .find(|b| b.address.to_string() == b0)
            .expect("backend0 configured")
            .weight = attempt as u32 + 2;
        let killed_pid = fx.lbd.as_ref().expect("lbd running").pid();
        let mut change = Command::new(bin_path("lbctl"))
            .arg("--socket")
            .arg(&fx.socket)
            .args(["backend", "set-weight", VIP, &b0, &weight])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let triggered = Instant::now();
        while count(&fx.log(), "writing table") <= writes {
            assert!(
                triggered.elapsed() < Duration::from_secs(30),
                "timed out waiting for lbd to start writing the table"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        let started_writing = triggered.elapsed();
        // The kill point inside the write, drawn per attempt (the scenario's parameter).
        std::thread::sleep(Duration::from_millis(delay_ms));
        fx.sigkill_lbd();
        let killed_at = Instant::now();
        let _ = change.wait();
        let kill_log = fx.log();
        let mid_write = count(&kill_log, "table published") == publishes;
        let offset = *offsets(&kill_log)
            .get(writes)
            .expect("the attempt's write record has an offset");
        used.extend(offsets(&kill_log));
        println!(
            "attempt {attempt}: writing began {started_writing:?} after set-weight, SIGKILL {delay_ms} ms later: {} (region at {offset})",
            if mid_write { "mid-write" } else { "after publishing" },
        );
        // The configuration file is whole: the old or the new one (replaced by a rename),
        // never a mix; the old one as long as the table was not even published.
        let text = fs::read_to_string(fx.config()).expect("config file after the SIGKILL");
        let after = lb_userspace::Config::parse(&text).unwrap_or_else(|e| {
            panic!("the config file is not valid after the SIGKILL ({e}):\n{text}")
        });
        let saved = after == cfg_changed;
        assert!(
            after == cfg_before || saved,
            "the config file is neither the old nor the new configuration:\n{text}"
        );
        assert!(
            !(mid_write && saved),
            "the change was saved although its table was never published"
        );
        println!(
            "  config file after the kill: {} configuration, parses",
            if saved { "the new" } else { "the old" }
        );

        // lbd is dead: the datapath serves on its own.
        assert!(fx.xdp_on_lb(), "XDP detached by the SIGKILL");
        long.assert_intact(&[], "lbd SIGKILLed");
        let t = Instant::now();
        let dead = fx.all_new_succeed(200, "lbd SIGKILLed");
        println!(
            "  while dead: 100 long-lived ok, 200/200 new ok in {:?} {dead:?}",
            t.elapsed()
        );
        let (meta, counts) = published_table(&fx.pin_dir);
        assert_eq!(meta.ring_size, BIG_TABLE, "{meta:?}");
        assert_eq!(counts.values().sum::<usize>(), BIG_TABLE as usize);
        assert_eq!(
            counts.len(),
            3,
            "all three backends in the table: {counts:?}"
        );
        // Cut short with part of its slots written: the case this test is about. A kill
        // before the first slot or after the last (but before publishing) must not publish
        // either, and is checked the same way, but another attempt follows.
        let mut partial = false;
        if mid_write {
            let written = written_slots(&fx.pin_dir, offset, BIG_TABLE);
            println!(
                "  the cut-short table at offset {offset}: {written} of {BIG_TABLE} slots written"
            );
            partial = written > 0 && written < BIG_TABLE as usize;
            assert_eq!(
                (meta.ring_offset, meta.generation),
                (meta_before.ring_offset, meta_before.generation),
                "a table whose write was cut short was published"
            );
            assert_eq!(counts, counts_before, "the published table changed");
        }

        // Restart: resumes from the pins, applies the configuration, serves lbctl.
        let restart = fx.start_lbd();
        let since_kill = killed_at.elapsed();
        let log = fx.log();
        assert!(log.contains("resumed=true"), "lbd did not resume:\n{log}");
        let status: Value = serde_json::from_str(&lbctl_ok(&fx.socket, &["status", "--json"]))
            .expect("status JSON");
        assert_eq!(status["vips"][0]["table_size"], BIG_TABLE, "{status}");
        // lbctl status says what happened: the kill, and what the killed lbd left unfinished.
        let pid = format!("previous lbd (pid {killed_pid},");
        let mut words = vec![pid.as_str(), "stopped without cleanup (killed?)"];
        if mid_write {
            words.extend([
                "it was writing the table of vip 10.200.100.1:80/tcp",
                "that write was never published",
                "the unfinished table write was discarded",
                "a change was in progress (backend 10.200.0.11 of vip 10.200.100.1:80/tcp: weight ",
                "holds the configuration from before the change (it had not been saved)",
                "state rebuilt from the pins",
            ]);
        }
        let unclean = fx.expect_event("unclean_stop", &words);
        fx.expect_event(
            "start",
            &["started (restored from pins)", "1 VIPs, 3 backends"],
        );
        println!("  lbctl status: {unclean}");
        println!("  restart: serving lbctl after {restart:?} ({since_kill:?} after the SIGKILL)");
        long.assert_intact(&[], "after the restart");
        used.extend(offsets(&fx.log()));
        if partial {
            landed = Some((attempt, delay_ms));
            break;
        }
    }
    let (attempt, delay_ms) =
        landed.expect("no SIGKILL landed mid-write with part of the table written");

    // The change cut short can be made again, in full.
    let t = Instant::now();
    lbctl_ok(&fx.socket, &["backend", "set-weight", VIP, &b0, "3"]);
    let took = t.elapsed();
    let (meta, counts) = published_table(&fx.pin_dir);
    assert!(meta.generation > meta0.generation, "{meta:?}");
    let share = counts[&backend_v4(0)] as f64 / BIG_TABLE as f64;
    assert!(
        (share - 0.6).abs() < 0.02,
        "weight 3 of 5: {share} {counts:?}"
    );
    long.assert_intact(&[], "after the change");
    let after = fx.all_new_succeed(200, "after the change");
    println!(
        "landed on attempt {attempt} ({delay_ms} ms); the full {BIG_TABLE}-slot change then took {took:?}; \
         {meta:?}; new connections {after:?}"
    );
}

#[test]
fn map_pins_removed_under_the_link_recover() {
    let mut fx = Fixture::new("nomaps");
    fx.write_config(&Settings::default());
    fx.start_lbd();
    let mut long = LongLived::open(fx.lab.client().ns(), vip(), 60, Duration::from_secs(3))
        .expect("opening long-lived connections");
    long.assert_intact(&[], "at the start");
    fx.expect_event("start", &["started (fresh)", "fresh maps pinned in"]);

    // 1. An older build's COUNTERS (one slot per counter, 17 then) is replaced alone: the
    //    connection tables are taken over, only the counters restart.
    fx.stop_lbd();
    let counters_pin = fx.pin_dir.join("COUNTERS");
    fs::remove_file(&counters_pin).unwrap();
    let out = Command::new("bpftool")
        .args(["map", "create"])
        .arg(&counters_pin)
        .args([
            "type",
            "percpu_array",
            "key",
            "4",
            "value",
            "8",
            "entries",
            "17",
            "name",
            "COUNTERS",
        ])
        .output()
        .expect("running bpftool (cargo xtask setup installs it)");
    assert!(out.status.success(), "bpftool map create: {out:?}");
    fx.start_lbd();
    assert!(fx.log().contains("resumed=true"), "{}", fx.log());
    let info = aya::maps::MapInfo::from_pin(&counters_pin).unwrap();
    assert_eq!(
        info.max_entries(),
        lb_common::COUNTER_SLOTS,
        "COUNTERS replaced"
    );
    assert_eq!(
        fx.event_kinds()
            .iter()
            .filter(|k| *k == "unclean_stop")
            .count(),
        0
    );
    let replaced = fx.expect_event(
        "counters_replaced",
        &[
            "has 17 slots (another build)",
            "counters restart from zero",
            "connection tables were kept",
        ],
    );
    fx.expect_event(
        "start",
        &["started (restored from pins)", "connection tables kept"],
    );
    let kept = long.assert_intact(&[], "after replacing the old COUNTERS");
    assert_eq!(
        fx.counter("ct_lost"),
        0,
        "CT was kept: no established flow lost its state"
    );
    println!("old COUNTERS: {replaced}; {kept} long-lived, zero resets, ct_lost 0");

    // 2. Part of the set removed (VIPS and CT): the rest cannot be taken over consistently, so
    //    it goes too and every map starts fresh.
    fx.stop_lbd();
    for m in ["VIPS", "CT"] {
        fs::remove_file(fx.pin_dir.join(m)).unwrap();
    }
    let took = fx.start_lbd();
    assert!(fx.log().contains("resumed=false"), "{}", fx.log());
    let partial = fx.expect_event(
        "pins_missing",
        &[
            "pinned maps missing in",
            "VIPS, CT",
            "the rest were removed",
            "created fresh maps",
        ],
    );
    fx.expect_event("start", &["started (fresh)"]);
    let counts = fx.all_new_succeed(100, "after a partial pin set");
    assert_eq!(counts.len(), 3, "{counts:?}");
    let kept = long.assert_intact(&[], "after a partial pin set");
    // Their state went with the old maps: each established connection's next packet found
    // neither table (and went, by the identical table, to the same backend).
    let lost = fx.counter("ct_lost");
    assert!(
        lost >= kept as u64,
        "ct_lost {lost}: each of the {kept} long-lived connections lost its state"
    );
    println!(
        "partial pins ({took:?}): {partial}; {kept} long-lived kept their backend, ct_lost {lost}"
    );

    // 3. Every map pin removed, the link pin left.
    fx.stop_lbd();
    let prog_before = fx.prog_id();
    let mut removed = Vec::new();
    for e in fs::read_dir(&fx.pin_dir).unwrap().flatten() {
        if e.file_name() != "link" {
            fs::remove_file(e.path()).unwrap();
            removed.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    assert!(removed.len() >= 10, "map pins removed: {removed:?}");
    assert!(
        fx.xdp_on_lb(),
        "the link pin keeps the old program attached"
    );
    long.assert_intact(&[], "map pins removed, lbd stopped");

    let took = fx.start_lbd();
    let log = fx.log();
    assert!(log.contains("resumed=false"), "fresh maps expected:\n{log}");
    for m in &removed {
        assert!(fx.pin_dir.join(m).exists(), "{m} not pinned again");
    }
    assert!(fx.xdp_on_lb());
    let prog_after = fx.prog_id();
    assert_ne!(
        prog_before, prog_after,
        "the new program must be swapped into the pinned link"
    );
    let missing = fx.expect_event(
        "pins_missing",
        &[
            "no pinned maps in",
            "the pinned XDP link was there",
            "created fresh maps",
            "Tracked connections were forgotten",
        ],
    );
    fx.expect_event(
        "start",
        &["started (fresh)", "replaced in place (no detach)"],
    );
    // lbd was stopped cleanly each time: no unclean stop reported.
    assert!(!fx.event_kinds().contains(&"unclean_stop".to_string()));
    let t = Instant::now();
    let counts = fx.all_new_succeed(200, "after recovery");
    assert_eq!(counts.len(), 3, "{counts:?}");
    // Fresh connection tables, same Maglev table (same backends, same ids): flows stay put.
    let kept = long.assert_intact(&[], "after recovery with fresh maps");
    println!(
        "map pins removed ({}), link kept: lbd recovered in {took:?} (prog {prog_before:?} -> {prog_after:?}); \
         200/200 new in {:?} {counts:?}; {kept} long-lived, zero resets; lbctl status: {missing}",
        removed.len(),
        t.elapsed()
    );
}

#[test]
fn stale_pins_of_other_sizes_are_refused_naming_cleanup() {
    let mut fx = Fixture::new("stale");
    let small = Settings {
        conntrack_size: 4096,
        ..Settings::default()
    };
    fx.write_config(&small);
    fx.start_lbd();
    fx.all_new_succeed(50, "conntrack_size 4096");
    fx.stop_lbd();

    fx.write_config(&Settings {
        conntrack_size: 8192,
        ..Settings::default()
    });
    let t = Instant::now();
    let status = fx.spawn_lbd().wait_exit(Duration::from_secs(30));
    fx.lbd = None;
    let refused = t.elapsed();
    assert_eq!(status.code(), Some(1), "lbd must refuse the stale pins");
    let (k, v) = (size_of::<FlowKey>(), size_of::<CtValue>());
    let expected = format!(
        "lbd: error: pinned map {}/CT has key/value size {k}/{v} and 4096 entries, this lbd needs {k}/{v} and 8192: \
         the pins come from another build or other map sizes (conntrack_size, conntrack_new_size, table_pool). \
         Restart with the old settings, or run `lbd cleanup` (drops established flows) and start again",
        fx.pin_dir.display()
    );
    let (took, counts, why) = fx.refused_then_cleaned_up(
        &expected,
        &[
            "exited with an error",
            "/CT has key/value size",
            "`lbd cleanup`",
        ],
    );
    assert!(!fx.event_kinds().contains(&"unclean_stop".to_string()));
    println!("lbctl status: {why}");
    println!("stale pins refused in {refused:?}; after cleanup started in {took:?}; {counts:?}");
}

#[test]
fn pins_of_an_older_conntrack_layout_are_refused_naming_cleanup() {
    let mut fx = Fixture::new("layout");
    let settings = Settings::default();
    fx.write_config(&settings);
    fx.start_lbd();
    fx.all_new_succeed(50, "fresh start");
    fx.stop_lbd();

    // The connection table of a build before `CtValue` carried the SYN's sequence number and
    // the flags: same key, 8-byte values, same capacity.
    let ct_pin = fx.pin_dir.join("CT");
    fs::remove_file(&ct_pin).unwrap();
    let (k, v) = (size_of::<FlowKey>(), size_of::<CtValue>());
    let entries = settings.conntrack_size.to_string();
    let out = Command::new("bpftool")
        .args(["map", "create"])
        .arg(&ct_pin)
        .args([
            "type",
            "lru_hash",
            "key",
            &k.to_string(),
            "value",
            "8",
            "entries",
            &entries,
            "name",
            "CT",
        ])
        .output()
        .expect("running bpftool (cargo xtask setup installs it)");
    assert!(out.status.success(), "bpftool map create: {out:?}");

    let t = Instant::now();
    let status = fx.spawn_lbd().wait_exit(Duration::from_secs(30));
    fx.lbd = None;
    let refused = t.elapsed();
    assert_eq!(status.code(), Some(1), "lbd must refuse the old layout");
    let expected = format!(
        "lbd: error: pinned map {}/CT has key/value size {k}/8 and {entries} entries, this lbd needs {k}/{v} and {entries}: \
         the pins come from another build with another map layout. \
         Run `lbd cleanup` (drops established flows) and start again",
        fx.pin_dir.display()
    );
    let (took, counts, why) = fx.refused_then_cleaned_up(
        &expected,
        &[
            "/CT has key/value size",
            "another map layout",
            "`lbd cleanup`",
        ],
    );
    println!("lbctl status: {why}");
    println!("old CT layout refused in {refused:?}; after cleanup started in {took:?}; {counts:?}");
}

#[test]
fn interface_flap_keeps_xdp_and_flows() {
    let mut fx = Fixture::new("flap");
    fx.write_config(&Settings::default());
    fx.start_lbd();
    let mut long = LongLived::open(fx.lab.client().ns(), vip(), 100, Duration::from_secs(6))
        .expect("opening long-lived connections");
    long.assert_intact(&[], "at the start");
    let prog = fx.prog_id();
    let lb = fx.lab.lb().ns();
    // Probes go out while eth0 is down: their echoes need TCP retransmits after it comes up.
    let (statuses, up_at) = std::thread::scope(|s| {
        lb.ip(["link", "set", "eth0", "down"]).unwrap();
        let probe = s.spawn(|| {
            let st = long.check();
            (st, Instant::now())
        });
        // The fault itself: eth0 stays down for a second (a duration, not a wait for state).
        std::thread::sleep(Duration::from_secs(1));
        assert!(xdp_attached(lb), "XDP gone while eth0 is down");
        lb.ip(["link", "set", "eth0", "up"]).unwrap();
        let up_at = Instant::now();
        let (st, done) = probe.join().unwrap();
        (st, (up_at, done))
    });
    let failed: Vec<_> = statuses.iter().filter(|s| !s.is_ok()).collect();
    assert!(
        failed.is_empty(),
        "{} of 100 long-lived connections failed across the flap: {:?}",
        failed.len(),
        failed.first()
    );
    let (up_at, echoes_done) = up_at;
    assert!(xdp_attached(lb), "XDP detached by the flap");
    assert_eq!(fx.prog_id(), prog, "the program changed");
    let first_new = wait_for(
        "a new connection after the flap",
        Duration::from_secs(10),
        || client_once(fx.lab.client().ns(), vip(), Duration::from_secs(1)).is_ok(),
    );
    let since_up = up_at.elapsed();
    let counts = fx.all_new_succeed(200, "after the flap");
    long.assert_intact(&[], "after the flap");
    // The flap flushed the managed neighbour entries: lbd saw eth0 come back and resolved
    // them again (without that, every backend stays blackholed until the next change), and
    // lbctl status says so, in order.
    let down = fx.expect_event(
        "interface_down",
        &[
            "interface eth0 went down (administratively down)",
            "XDP stays attached",
        ],
    );
    let up = fx.expect_event(
        "interface_up",
        &[
            "interface eth0 is up again",
            "next hops of 3 backends re-resolved",
        ],
    );
    let kinds = fx.event_kinds();
    let pos = |k: &str| kinds.iter().position(|x| x == k).unwrap();
    assert!(pos("interface_down") < pos("interface_up"), "{kinds:?}");
    println!("lbctl status: {down} / {up}");
    println!(
        "flap 1 s: 100 long-lived echoed {:?} after up (zero resets); first new connection ok {first_new:?} \
         after polling began; 200/200 new ok within {since_up:?} of up {counts:?}",
        echoes_done.saturating_duration_since(up_at)
    );
}

#[test]
fn backend_namespace_deleted_under_load() {
    let mut fx = Fixture::new("nsdel");
    fx.write_config(&Settings {
        health: true,
        ..Settings::default()
    });
    fx.start_lbd();
    let b0 = backend_v4(0).to_string();
    let socket = fx.socket.clone();
    let list = || -> BTreeMap<String, Value> {
        let v: Value =
            serde_json::from_str(&lbctl_ok(&socket, &["backend", "list", VIP, "--json"])).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|b| (b["address"].as_str().unwrap().to_string(), b.clone()))
            .collect()
    };
    wait_for("every backend probed up", Duration::from_secs(5), || {
        list().values().all(|b| b["health"] == "up")
    });
    let mut long = LongLived::open(fx.lab.client().ns(), vip(), 60, Duration::from_secs(3))
        .expect("opening long-lived connections");
    let on_others = long.assert_intact(&["backend0"], "at the start");
    assert!(on_others >= 20, "{:?}", long.backend_counts());

    let stop = AtomicBool::new(false);
    let client_ns = fx.lab.client().ns();
    let ns_name = fx.lab.backend(0).ns_name().to_string();
    let (decap0, server0) = (fx.decaps[0].take(), fx.servers[0].take());
    // Every connection's start and outcome; the main thread counts them to size its windows.
    let made: std::sync::Mutex<Vec<(Instant, bool)>> = std::sync::Mutex::new(Vec::new());
    let (results, fault_at, down_after, down_at) = std::thread::scope(|s| {
        // Stops the load thread even when an assertion below fails (the scope joins it).
        let _stop = StopOnDrop(&stop);
        let load = s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let r = client_once(client_ns, vip(), Duration::from_millis(300));
                made.lock().unwrap().push((t, r.is_ok()));
            }
        });
        // Windows of load counted in connections started after a point, not in time: a slow
        // machine gets as many.
        let load_after = |what: &str, from: Instant, n: usize| {
            wait_for(what, Duration::from_secs(30), || {
                made.lock()
                    .unwrap()
                    .iter()
                    .filter(|(t, _)| *t >= from)
                    .count()
                    >= n
            })
        };
        load_after("load before the fault", Instant::now(), 50);
        let fault_at = Instant::now();
        // The backend host vanishes: its processes, its sockets, its link, its namespace.
        // The kernel keeps a deleted namespace (and its veth) alive while orphaned TCP sockets
        // in it linger (FIN_WAIT of the closed server side, whose ACKs no longer get
        // decapsulated), so eth0 is deleted explicitly: the host is off the segment at once.
        if let Some(mut d) = decap0 {
            let _ = d.kill();
            let _ = d.wait();
        }
        drop(server0);
        let out = Command::new("ip")
            .args(["-n", &ns_name, "link", "del", "eth0"])
            .output()
            .unwrap();
        assert!(out.status.success(), "ip link del eth0: {out:?}");
        let out = Command::new("ip")
            .args(["netns", "del", &ns_name])
            .output()
            .unwrap();
        assert!(out.status.success(), "ip netns del: {out:?}");
        let deleted_at = Instant::now();
        wait_for(
            "backend0's switch port to go",
            Duration::from_secs(5),
            || {
                fx.lab
                    .switch()
                    .ip(["link", "show", "dev", "lbp-b0"])
                    .is_err()
            },
        );
        let gone_after = deleted_at - fault_at;
        wait_for("backend0 down", Duration::from_secs(5), || {
            list()[&b0]["health"] == "down"
        });
        let down_at = Instant::now();
        let down_after = down_at - deleted_at;
        // After the 100 ms the table switch may take (see `settle` below), enough connections
        // to show that none fails.
        load_after(
            "load after backend0 is down",
            down_at + Duration::from_millis(100),
            100,
        );
        stop.store(true, Ordering::Relaxed);
        load.join().unwrap();
        (
            std::mem::take(&mut *made.lock().unwrap()),
            fault_at,
            (gone_after, down_after),
            down_at,
        )
    });
    let (gone_after, down_after) = down_after;
    assert!(
        down_after <= Duration::from_millis(1500),
        "backend0 down only {down_after:?} after its namespace was deleted"
    );
    let settle = down_at + Duration::from_millis(100);
    let (before, after): (Vec<_>, Vec<_>) = results.iter().partition(|(t, _)| *t < settle);
    let lost_before = before
        .iter()
        .filter(|(t, ok)| !ok && *t >= fault_at)
        .count();
    let in_window = before.iter().filter(|(t, _)| *t >= fault_at).count();
    let failed_after = after.iter().filter(|(_, ok)| !ok).count();
    assert!(
        after.len() >= 20,
        "too few connections after down: {}",
        after.len()
    );
    assert_eq!(
        failed_after,
        0,
        "{failed_after} of {} new connections failed after backend0 was marked down",
        after.len()
    );
    let kept = long.assert_intact(&["backend0"], "after the deletion");
    let l = list();
    assert_eq!(l[&b0]["up"], false, "{}", l[&b0]);
    assert_eq!(l[&b0]["slots"], 0, "{}", l[&b0]);
    let text = lbctl_ok(&fx.socket, &["backend", "list", VIP]);
    assert!(
        text.lines()
            .any(|line| line.contains(&b0) && line.contains("down")),
        "{text}"
    );
    // lbctl status says which backend went down, why, and what that did.
    let event = fx.expect_event(
        "backend_down",
        &[
            &format!("backend {b0} of vip {VIP} down (was up) after 2 failed probes in a row"),
            "its established flows are steered to other backends",
        ],
    );
    println!("lbctl status: {event}");
    let counts = fx.all_new_succeed(200, "after backend0 is down");
    assert!(!counts.contains_key("backend0"), "{counts:?}");
    println!(
        "namespace deleted ({gone_after:?} to kill, close and delete): backend0 down {down_after:?} after the deletion (bound 1.5 s); {} connections during the \
         window from the fault to down + 100 ms, {lost_before} failed (to backend0); {} after, 0 failed; {kept} long-lived on others, zero resets; {counts:?}",
        in_window,
        after.len()
    );
}
