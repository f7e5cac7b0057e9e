//! Learned weights against backends whose capacity is real, in a namespace lab: three
//! `lb-workpool` servers with 2, 2 and 6 workers of 20 ms (100, 100 and 300 requests/s), equal
//! configured weights, HTTP probes through the same worker pools, `[vip.learning]` on, and
//! open-loop load from `lb-loadgen` ramping up to 60% of the pool's capacity.
//!
//! * the learned table moves toward the capacities: the big backend ends with at least 45% of
//!   the slots (configured: a third), each small one with less than 30%;
//! * every learned step stayed within the disruption budget (5% of the slots), as the audit log
//!   (`lb::audit`) and `lbctl model show` report, and the model explains every backend;
//! * the load was served: errors are a small fraction of the requests.
use serde_json::Value;
use std::{
    fs,
    net::{IpAddr, SocketAddr},
    process::{Child, Stdio},
    time::{Duration, Instant},
};
use tests::{
    lab::{backend_v4, Lab, LabSpec, VIP_V4},
    procs::{lab_config, scratch, start_decaps, wait_for, Lbd},
    require_root,
};

const WORKPOOL: &str = env!("CARGO_BIN_EXE_lb-workpool");
const LOADGEN: &str = env!("CARGO_BIN_EXE_lb-loadgen");
const VIP: &str = "10.200.100.1:80/tcp";
const WORKERS: [usize; 3] = [2, 2, 6];
const SERVICE_MS: u64 = 20;
const PROBE_PORT: u16 = 8080;
const TABLE_SIZE: u64 = 65537;
/// Load at the end of the ramp: 60% of the pool (500 requests/s).
const RATE: f64 = 300.0;
const RAMP_SECS: f64 = 40.0;
const RUN_SECS: u64 = 70;

fn json(lbd: &Lbd, args: &[&str]) -> Value {
    tests::procs::lbctl_json(&lbd.socket, args)
}

/// Slots of each backend in the VIP's table, by backend index.
fn slots(lbd: &Lbd) -> [u64; 3] {
    let mut out = [0; 3];
    for b in json(lbd, &["backend", "list"]).as_array().unwrap() {
        let i = (0..3)
            .find(|&i| b["address"] == backend_v4(i).to_string())
            .expect("a lab backend");
        out[i] = b["slots"].as_u64().unwrap();
    }
    out
}

fn kill(children: &mut [Child]) {
    for c in children {
        let _ = c.kill();
        let _ = c.wait();
    }
}

#[test]
fn learned_weights_follow_worker_pool_capacities_within_the_budget() {
    require_root();
    let t0 = Instant::now();
    let lab = Lab::new(LabSpec { backends: 3 }).expect("building the lab");
    let dir = scratch("adaptive-e2e");
    let mut servers: Vec<Child> = (0..3)
        .map(|i| {
            let ns = lab.backend(i).ns();
            let mut cmd = ns.command(WORKPOOL);
            cmd.args(["--listen", &format!("{VIP_V4}:80")])
                .args(["--listen", &format!("{}:{PROBE_PORT}", backend_v4(i))])
                .args(["--workers", &WORKERS[i].to_string()])
                .args(["--service-ms", &SERVICE_MS.to_string()])
                .args(["--queue", "40", "--name", &format!("backend{i}")])
                .stdin(Stdio::null())
                .stdout(Stdio::piped());
            let mut child = ns.spawn_command(&mut cmd).expect("starting lb-workpool");
            let mut ready = [0u8; 6];
            std::io::Read::read_exact(child.stdout.as_mut().unwrap(), &mut ready).unwrap();
            assert_eq!(&ready, b"ready\n");
            child
        })
        .collect();
    let mut decaps = start_decaps(&lab, 3);
    fs::write(
        dir.join("lbd.toml"),
        lab_config(
            &dir,
            &format!(
            "[[vip]]\naddress = \"{VIP_V4}\"\nport = 80\nprotocol = \"tcp\"\ntable_size = {TABLE_SIZE}\n\
             [vip.health]\nkind = \"http\"\ninterval_ms = 400\ntimeout_ms = 400\nrise = 2\nfall = 3\n\
             port = {PROBE_PORT}\npath = \"/health\"\n\
             [vip.learning]\nenabled = true\ninterval_ms = 1000\nlatency_target_ms = 40\n\
             [[vip.backend]]\naddress = \"{}\"\n[[vip.backend]]\naddress = \"{}\"\n[[vip.backend]]\naddress = \"{}\"\n",
            backend_v4(0),
            backend_v4(1),
            backend_v4(2)
        ),
        ),
    )
    .unwrap();
    let mut lbd = Lbd::start(lab.lb().ns(), &dir);
    // The scratch directory goes with lbd, on success, failure and panic.
    lbd.own_dir = true;
    // Backends are pending (no slots) until their first probe passes, sent at once.
    wait_for(
        "every backend probed into the table",
        Duration::from_secs(10),
        || slots(&lbd).iter().all(|&n| n > 0),
    );
    assert_eq!(slots(&lbd).iter().sum::<u64>(), TABLE_SIZE);

    // The ramp: lb-loadgen re-reads its rate from this file every 200 ms.
    let rate_file = dir.join("rate");
    let csv = dir.join("requests.csv");
    fs::write(&rate_file, format!("{}", RATE * 0.3)).unwrap();
    let client = lab.client().ns();
    client
        .exec_ok("sysctl", ["-qw", "net.ipv4.ip_local_port_range=1024 65535"])
        .unwrap();
    let mut cmd = client.command(LOADGEN);
    cmd.args([
        "--target",
        &SocketAddr::new(IpAddr::from(VIP_V4), 80).to_string(),
    ])
    .args(["--rate", &(RATE * 0.3).to_string()])
    .args(["--duration-s", &RUN_SECS.to_string()])
    .args(["--seed", "5", "--noise", "0.15", "--noise-period-s", "5"])
    .args(["--timeout-ms", "2000"])
    .arg("--out")
    .arg(&csv)
    .arg("--rate-file")
    .arg(&rate_file)
    .stdin(Stdio::null())
    .stdout(Stdio::piped());
    let mut load = client.spawn_command(&mut cmd).expect("starting lb-loadgen");
    let started = Instant::now();
    let mut trace = Vec::new();
    while started.elapsed() < Duration::from_secs(RUN_SECS) {
        let t = started.elapsed().as_secs_f64();
        let f = if t >= RAMP_SECS {
            1.0
        } else {
            0.3 + 0.7 * t / RAMP_SECS
        };
        fs::write(dir.join("rate.tmp"), format!("{:.1}", RATE * f)).unwrap();
        fs::rename(dir.join("rate.tmp"), &rate_file).unwrap();
        if trace.len() < (t / 5.0) as usize + 1 {
            trace.push((t, slots(&lbd)));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let mut out = String::new();
    std::io::Read::read_to_string(load.stdout.as_mut().unwrap(), &mut out).unwrap();
    assert!(load.wait().unwrap().success(), "lb-loadgen: {out}");
    let summary: Value = serde_json::from_str(out.lines().last().unwrap()).expect("summary");
    let end = slots(&lbd);
    let model = json(&lbd, &["model", "show", VIP]);
    let log = lbd.log();
    println!("table (slots per backend) every 5 s: {trace:?}, at the end {end:?}");
    println!("load: {summary}");

    // Toward the capacities (1:1:3 is 20/20/60%).
    let share = |i: usize| end[i] as f64 / TABLE_SIZE as f64;
    assert!(
        share(2) >= 0.45,
        "the 6-worker backend's share grew from a third: {end:?}\n{model:#}"
    );
    for i in [0, 1] {
        assert!(
            share(i) < 0.3,
            "backend{i}'s share shrank from a third: {end:?}\n{model:#}"
        );
    }
    // Every learned step within the budget, and explained.
    let steps: Vec<Value> = log
        .lines()
        .filter(|l| l.contains("learned weights applied"))
        .map(|l| {
            let at = l.find("audit_step=").expect("audit_step") + "audit_step=".len();
            serde_json::from_str(&l[at..]).unwrap_or_else(|e| panic!("{e}: {l}"))
        })
        .collect();
    assert!(steps.len() >= 3, "the model changed weights: {log}");
    let budget = TABLE_SIZE * 5 / 100;
    for s in &steps {
        assert_eq!(s["slots_budget"], budget, "{s}");
        assert!(
            s["slots_moved_gradual"].as_u64().unwrap() <= budget,
            "a step over the budget: {s}"
        );
    }
    let m = &model[0];
    assert!(m["max_slots_moved_gradual"].as_u64().unwrap() <= budget);
    assert!(
        m["max_fit_us"].as_u64().unwrap() < 5000,
        "a fit within 5 ms (the tests run lbd's debug build, about 0.6 ms per fit under load; \
         `cargo xtask bench adaptive` measures the release build): {m}"
    );
    for b in m["backends"].as_array().unwrap() {
        assert!(
            b["fit"].is_object() || b["refusal"].is_string(),
            "every backend explained: {b}"
        );
        assert!(!b["decisions"].as_array().unwrap().is_empty(), "{b}");
    }
    // The load was served.
    let sent = summary["sent"].as_f64().unwrap();
    let ok = summary["ok"].as_f64().unwrap();
    assert!(sent > 10_000.0, "{summary}");
    assert!(ok / sent > 0.97, "requests served: {summary}");
    println!(
        "learned: {} steps, largest gradual move {} slots (budget {budget}), slowest fit {} us; {:.1}% of {sent} requests ok; {:?}",
        steps.len(),
        m["max_slots_moved_gradual"],
        m["max_fit_us"],
        100.0 * ok / sent,
        t0.elapsed()
    );
    drop(lbd);
    kill(&mut servers);
    kill(&mut decaps);
    lab.shutdown().expect("tearing the lab down");
}
