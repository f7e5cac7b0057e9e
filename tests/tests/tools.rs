//! The benchmark tools `lb-workpool` and `lb-loadgen` against each other, in a network
//! namespace of the test's own over loopback (real TCP, real processes, real clocks):
//!
//! * `capacity_queue_and_overload`: K = 2 workers of S = 20 ms at 40 req/s serve everything
//!   with p50 in 20–35 ms; the CSV is complete and agrees with the summary. At 200 req/s
//!   (twice the capacity) with Q = 20 the pool answers 503s, p99 is far above S, and a probe
//!   on the second port sees the same queue. The workpool's own SIGTERM counts match the
//!   loadgen's.
//! * `control_file_slow_errors_refuse`: `slow=5` raises p50 about five times, `error_rate=0.5`
//!   gives 30–70% http5xx, `refuse=1` gives refused connects and `refuse=0` recovers.
//! * `keepalive_conns_stay_and_do_not_hold_workers`: 20 keep-alive connections at 200 ms
//!   intervals (more connections than workers) get every answer, none moved, while an
//!   open-loop load on the same pool still succeeds entirely.
//!
//! Every namespace is a [`NetNs`] guard and every scratch directory a [`RemoveOnDrop`], so
//! both go on success, failure and panic; the processes inside are killed with the namespace.
use serde_json::Value;
use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};
use tests::{
    netns::NetNs,
    procs::{scratch, RemoveOnDrop},
    require_root,
};

const WORKPOOL: &str = env!("CARGO_BIN_EXE_lb-workpool");
const LOADGEN: &str = env!("CARGO_BIN_EXE_lb-loadgen");

/// A namespace with loopback up.
fn namespace(role: &str) -> NetNs {
    let ns = NetNs::new(role).expect("creating a namespace");
    ns.ip(["link", "set", "lo", "up"]).unwrap();
    ns
}

/// A running `lb-workpool`; killed on drop (and by the namespace guard in any case).
struct Workpool {
    child: Option<Child>,
    lines: mpsc::Receiver<String>,
}

impl Workpool {
    /// Starts it with `args` and waits (at most 10 s) for its `ready` line.
    fn start(ns: &NetNs, args: &[&str]) -> Workpool {
        let mut cmd = ns.command(WORKPOOL);
        cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped());
        let mut child = ns.spawn_command(&mut cmd).expect("starting lb-workpool");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let first = lines.recv_timeout(Duration::from_secs(10));
        assert_eq!(
            first.as_deref(),
            Ok("ready"),
            "lb-workpool {args:?} did not print `ready`"
        );
        Workpool {
            child: Some(child),
            lines,
        }
    }

    /// SIGTERM; returns the JSON counts it prints, after checking it exits 0.
    fn stop(mut self) -> Value {
        let mut child = self.child.take().unwrap();
        // SAFETY: signalling our own child.
        assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
        let line = self
            .lines
            .recv_timeout(Duration::from_secs(5))
            .expect("lb-workpool printed its counts on SIGTERM");
        let status = wait_bounded(&mut child, Duration::from_secs(5));
        assert!(status.success(), "lb-workpool exited {status}");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line}: {e}"))
    }
}

impl Drop for Workpool {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Waits for `child` at most `limit`, killing it and failing after that.
fn wait_bounded(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let end = Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            panic!("process {} still running after {limit:?}", child.id());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A started `lb-loadgen` run.
struct Loadgen {
    child: Child,
    limit: Duration,
    started: Instant,
    duration_s: f64,
}

impl Loadgen {
    /// Starts `lb-loadgen --target TARGET --rate RATE --duration-s D --seed 1 EXTRA...`.
    fn start(ns: &NetNs, target: &str, rate: f64, duration_s: f64, extra: &[&str]) -> Loadgen {
        let mut cmd = ns.command(LOADGEN);
        cmd.args(["--target", target, "--seed", "1"])
            .args(["--rate", &rate.to_string()])
            .args(["--duration-s", &duration_s.to_string()])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped());
        let child = ns.spawn_command(&mut cmd).expect("starting lb-loadgen");
        Loadgen {
            child,
            // Its promise is D + timeout (2 s default) + 2 s; the rest is slack for a busy host.
            limit: Duration::from_secs_f64(duration_s + 2.0 + 2.0 + 3.0),
            started: Instant::now(),
            duration_s,
        }
    }

    /// Waits for it (bounded), checks exit 0 and that it kept its time promise; returns the
    /// summary.
    fn finish(mut self) -> Value {
        let status = wait_bounded(&mut self.child, self.limit);
        let took = self.started.elapsed();
        let mut out = String::new();
        std::io::Read::read_to_string(self.child.stdout.as_mut().unwrap(), &mut out).unwrap();
        assert!(status.success(), "lb-loadgen exited {status}: {out}");
        assert!(
            took.as_secs_f64() < self.duration_s + 2.0 + 2.0 + 1.0,
            "lb-loadgen took {took:?} for a {} s run",
            self.duration_s
        );
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 1, "one summary line: {out}");
        let v: Value = serde_json::from_str(lines[0]).unwrap_or_else(|e| panic!("{out}: {e}"));
        eprintln!("lb-loadgen: {}", lines[0]);
        v
    }
}

fn run_loadgen(ns: &NetNs, target: &str, rate: f64, duration_s: f64, extra: &[&str]) -> Value {
    Loadgen::start(ns, target, rate, duration_s, extra).finish()
}

fn n(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("{key} in {v}"))
}

fn f(v: &Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or_else(|| panic!("{key} in {v}"))
}

fn err(v: &Value, kind: &str) -> u64 {
    v["errors"][kind]
        .as_u64()
        .unwrap_or_else(|| panic!("errors.{kind} in {v}"))
}

/// Writes the control file atomically (the workpool may read it at any moment).
fn control(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
    // Re-read every 100 ms: 300 ms is three chances.
    std::thread::sleep(Duration::from_millis(300));
}

/// `sched_ms,latency_us,status,backend,error` rows of a loadgen CSV.
fn csv_rows(path: &PathBuf) -> Vec<(u64, u64, u16, String, String)> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines = text.lines();
    assert_eq!(
        lines.next(),
        Some("sched_ms,latency_us,status,backend,error")
    );
    lines
        .map(|l| {
            let c: Vec<&str> = l.split(',').collect();
            assert_eq!(c.len(), 5, "{l}");
            (
                c[0].parse().unwrap(),
                c[1].parse().unwrap(),
                c[2].parse().unwrap(),
                c[3].to_string(),
                c[4].to_string(),
            )
        })
        .collect()
}

#[test]
fn capacity_queue_and_overload() {
    require_root();
    let ns = namespace("tools-cap");
    let dir = RemoveOnDrop(scratch("tools-cap"));
    // 10.200.0.1 is not configured yet: IP_FREEBIND lets it be bound anyway (a VIP on loopback
    // added later), and `[::]` beside `0.0.0.0` on the same port needs v6-only.
    let wp = Workpool::start(
        &ns,
        &[
            "--listen",
            "10.200.0.1:8080",
            "--listen",
            "0.0.0.0:8081",
            "--listen",
            "[::]:8081",
            "--workers",
            "2",
            "--service-ms",
            "20",
            "--queue",
            "20",
            "--name",
            "b1",
        ],
    );
    ns.ip(["addr", "add", "10.200.0.1/32", "dev", "lo"])
        .unwrap();

    // Under capacity (40/s of 100/s): everything served, latency about S.
    let csv = dir.0.join("light.csv");
    let light = run_loadgen(
        &ns,
        "10.200.0.1:8080",
        40.0,
        3.0,
        &["--out", csv.to_str().unwrap()],
    );
    let sent = n(&light, "sent");
    assert!((80..=160).contains(&sent), "about 120 requests: {light}");
    assert_eq!(n(&light, "ok"), sent, "{light}");
    let p50 = f(&light, "p50_ms");
    assert!((20.0..=35.0).contains(&p50), "p50 {p50} ms for S = 20 ms");
    assert!(f(&light, "max_sched_lag_ms") < 50.0, "{light}");
    let rows = csv_rows(&csv);
    assert_eq!(rows.len() as u64, sent, "one CSV row per request");
    assert!(
        rows.windows(2).all(|w| w[0].0 <= w[1].0),
        "in schedule order"
    );
    assert!(rows
        .iter()
        .all(|r| r.2 == 200 && r.3 == "b1" && r.4.is_empty()));
    assert!(rows.iter().all(|r| r.1 >= 20_000), "nothing faster than S");
    assert!(rows.last().unwrap().0 < 3000);

    // IPv6 on the other port goes to the same server.
    let v6 = run_loadgen(&ns, "[::1]:8081", 20.0, 1.0, &[]);
    assert!(n(&v6, "sent") > 0 && n(&v6, "ok") == n(&v6, "sent"), "{v6}");

    // Twice the capacity for 3 s, and a 5/s probe on the other port at the same time.
    let heavy = Loadgen::start(&ns, "10.200.0.1:8080", 200.0, 3.0, &[]);
    let probe = Loadgen::start(&ns, "127.0.0.1:8081", 5.0, 3.0, &[]);
    let heavy = heavy.finish();
    let probe = probe.finish();
    let (hsent, h5xx) = (n(&heavy, "sent"), err(&heavy, "http5xx"));
    assert!(h5xx * 4 > hsent, "a quarter or more answered 503: {heavy}");
    assert_eq!(
        err(&heavy, "timeout") + err(&heavy, "refused") + err(&heavy, "reset"),
        0,
        "{heavy}"
    );
    let p99 = f(&heavy, "p99_ms");
    assert!(p99 > 100.0, "p99 {p99} ms should be far above S = 20 ms");
    // The probe port shares the queue: its requests wait (or are rejected) like the traffic.
    let probe_p50 = f(&probe, "p50_ms");
    assert!(
        n(&probe, "ok") == 0 || probe_p50 > 60.0,
        "probe p50 {probe_p50} ms shows no queueing: {probe}"
    );

    let counts = wp.stop();
    eprintln!("lb-workpool: {counts}");
    let ok_total = n(&light, "ok") + n(&v6, "ok") + n(&heavy, "ok") + n(&probe, "ok");
    assert_eq!(n(&counts, "served"), ok_total, "{counts}");
    assert_eq!(
        n(&counts, "rejected503"),
        err(&heavy, "http5xx") + err(&probe, "http5xx"),
        "{counts}"
    );
    assert_eq!(n(&counts, "errors500"), 0);
}

#[test]
fn control_file_slow_errors_refuse() {
    require_root();
    let ns = namespace("tools-ctl");
    let dir = RemoveOnDrop(scratch("tools-ctl"));
    let ctl = dir.0.join("control");
    let wp = Workpool::start(
        &ns,
        &[
            "--listen",
            "127.0.0.1:8080",
            "--workers",
            "2",
            "--service-ms",
            "20",
            "--queue",
            "50",
            "--name",
            "b2",
            "--control",
            ctl.to_str().unwrap(),
        ],
    );
    let target = "127.0.0.1:8080";

    // Missing file: defaults. Low load so the p50s are service time, not queueing.
    let base = run_loadgen(&ns, target, 8.0, 3.0, &[]);
    assert_eq!(n(&base, "ok"), n(&base, "sent"), "{base}");
    control(&ctl, "slow=5\n# comment\nunknown=3\n");
    let slow = run_loadgen(&ns, target, 8.0, 3.0, &[]);
    assert_eq!(n(&slow, "ok"), n(&slow, "sent"), "{slow}");
    let ratio = f(&slow, "p50_ms") / f(&base, "p50_ms");
    assert!(
        (3.5..=7.0).contains(&ratio),
        "slow=5 raised p50 {ratio:.2}× ({} → {} ms)",
        f(&base, "p50_ms"),
        f(&slow, "p50_ms")
    );

    control(&ctl, "slow=1\nerror_rate=0.5\n");
    let errs = run_loadgen(&ns, target, 40.0, 3.0, &[]);
    let share = err(&errs, "http5xx") as f64 / n(&errs, "sent") as f64;
    assert!(
        (0.3..=0.7).contains(&share),
        "http5xx share {share}: {errs}"
    );
    assert_eq!(n(&errs, "ok") + err(&errs, "http5xx"), n(&errs, "sent"));

    control(&ctl, "refuse=1\n");
    let refused = run_loadgen(&ns, target, 20.0, 1.0, &[]);
    assert!(n(&refused, "sent") > 0);
    assert_eq!(err(&refused, "refused"), n(&refused, "sent"), "{refused}");

    // Deleting the file restores every default, refuse=0 included.
    std::fs::remove_file(&ctl).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let back = run_loadgen(&ns, target, 20.0, 1.0, &[]);
    assert!(n(&back, "sent") > 0);
    assert_eq!(n(&back, "ok"), n(&back, "sent"), "{back}");
    control(&ctl, "refuse=1\n");
    let refused = run_loadgen(&ns, target, 20.0, 1.0, &[]);
    assert_eq!(err(&refused, "refused"), n(&refused, "sent"), "{refused}");
    control(&ctl, "refuse=0\n");
    let back = run_loadgen(&ns, target, 20.0, 1.0, &[]);
    assert_eq!(n(&back, "ok"), n(&back, "sent"), "{back}");

    let counts = wp.stop();
    eprintln!("lb-workpool: {counts}");
    assert_eq!(n(&counts, "errors500"), err(&errs, "http5xx"), "{counts}");
}

#[test]
fn keepalive_conns_stay_and_do_not_hold_workers() {
    require_root();
    let ns = namespace("tools-ka");
    // 8 workers × 50/s = 400/s of capacity; 20 connections × 5/s + 100/s open loop is half.
    // 20 connections > 8 workers: if an idle keep-alive connection held a worker, the pool
    // would be starved and the open-loop requests would wait or be rejected.
    let wp = Workpool::start(
        &ns,
        &[
            "--listen",
            "127.0.0.1:8080",
            "--workers",
            "8",
            "--service-ms",
            "20",
            "--queue",
            "50",
            "--name",
            "b3",
        ],
    );
    let run = run_loadgen(
        &ns,
        "127.0.0.1:8080",
        100.0,
        4.0,
        &["--keepalive-conns", "20", "--keepalive-interval-ms", "200"],
    );
    let ka = &run["keepalive"];
    assert_eq!(n(ka, "conns"), 20, "{run}");
    // Connection i starts at i × 10 ms (spread over one interval) and sends every 200 ms
    // until 4 s: 20 each, 400 in all (fewer only if a tick was skipped behind a request
    // slower than 200 ms).
    assert!((390..=400).contains(&n(ka, "requests")), "{run}");
    assert_eq!(n(ka, "failed"), 0, "{run}");
    assert_eq!(n(ka, "moved"), 0, "{run}");
    assert_eq!(n(&run, "ok"), n(&run, "sent"), "{run}");
    assert!(f(&run, "p99_ms") < 100.0, "{run}");

    // Keep-alive only (`--rate 0`): no open-loop requests at all.
    let only = run_loadgen(
        &ns,
        "127.0.0.1:8080",
        0.0,
        2.0,
        &["--keepalive-conns", "4", "--keepalive-interval-ms", "100"],
    );
    assert_eq!(n(&only, "sent"), 0, "{only}");
    // Connections start at 0, 25, 50, 75 ms: 20 requests each.
    assert!(
        (76..=80).contains(&n(&only["keepalive"], "requests")),
        "{only}"
    );
    assert_eq!(n(&only["keepalive"], "failed"), 0, "{only}");

    let counts = wp.stop();
    eprintln!("lb-workpool: {counts}");
    assert_eq!(
        n(&counts, "served"),
        n(&run, "ok") + n(ka, "requests") + n(&only["keepalive"], "requests"),
        "{counts}"
    );
}
