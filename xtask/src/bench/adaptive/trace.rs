//! What lbd had in its table over a run: `lbctl backend list` and `model show` polled in the
//! background, and the table changes lbd logged.

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tests::backend_v4;

use super::bench::Bench;
use super::{TABLE_SIZE, WORKERS};

/// A sample of what lbd had in its table.
#[derive(Debug, Clone)]
pub(super) struct TracePoint {
    pub(super) t: f64,
    pub(super) slots: [u32; 3],
    /// Table weights the model has set (`model show`'s `current_weight`).
    pub(super) weights: [u32; 3],
    /// The model's last decision per backend: target weight and reasons (for the artifacts).
    pub(super) decisions: [String; 3],
    pub(super) health: [String; 3],
    pub(super) drained_by_model: [bool; 3],
    pub(super) suspected: [bool; 3],
}

/// Polls `lbctl backend list` and `model show` in the background.
pub(super) struct Tracer {
    pub(super) points: Arc<Mutex<Vec<TracePoint>>>,
    pub(super) stop: Arc<AtomicBool>,
    pub(super) thread: Option<std::thread::JoinHandle<()>>,
}

pub(super) fn backend_index(addr: &str) -> Option<usize> {
    (0..WORKERS.len()).find(|&i| backend_v4(i).to_string() == addr)
}

impl Tracer {
    pub(super) fn start(bench: &Bench, t0: Instant, every: Duration) -> Self {
        let points = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (lbctl, socket) = (bench.bins.lbctl.clone(), bench.socket.clone());
        let (p, s) = (points.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let run = |args: &[&str]| -> Option<Value> {
                let out = Command::new(&lbctl)
                    .arg("--socket")
                    .arg(&socket)
                    .args(args)
                    .arg("--json")
                    .output()
                    .ok()?;
                if !out.status.success() {
                    return None;
                }
                serde_json::from_slice(&out.stdout).ok()
            };
            while !s.load(Ordering::Relaxed) {
                let t = t0.elapsed().as_secs_f64();
                if let Some(list) = run(&["backend", "list"]) {
                    let mut pt = TracePoint {
                        t,
                        slots: [0; 3],
                        weights: [0; 3],
                        decisions: Default::default(),
                        health: Default::default(),
                        drained_by_model: [false; 3],
                        suspected: [false; 3],
                    };
                    for b in list.as_array().into_iter().flatten() {
                        if let Some(i) = b["address"].as_str().and_then(backend_index) {
                            pt.slots[i] = b["slots"].as_u64().unwrap_or(0) as u32;
                            pt.health[i] = b["health"].as_str().unwrap_or("").to_string();
                        }
                    }
                    if let Some(m) = run(&["model", "show"]) {
                        for v in m.as_array().into_iter().flatten() {
                            for b in v["backends"].as_array().into_iter().flatten() {
                                if let Some(i) = b["address"].as_str().and_then(backend_index) {
                                    pt.weights[i] =
                                        b["current_weight"].as_u64().unwrap_or(0) as u32;
                                    if let Some(d) =
                                        b["decisions"].as_array().and_then(|d| d.last())
                                    {
                                        pt.decisions[i] = format!(
                                            "step {} target {:.1}: {}",
                                            d["step"],
                                            d["target_weight"].as_f64().unwrap_or(f64::NAN),
                                            d["reasons"]
                                        );
                                    }
                                    pt.drained_by_model[i] =
                                        b["drained_by_model"].as_bool().unwrap_or(false);
                                    pt.suspected[i] = b["decisions"]
                                        .as_array()
                                        .and_then(|d| d.last())
                                        .map(|d| d["reasons"].to_string().contains("suspected"))
                                        .unwrap_or(false);
                                }
                            }
                        }
                    }
                    p.lock().unwrap().push(pt);
                }
                std::thread::sleep(every);
            }
        });
        Tracer {
            points,
            stop,
            thread: Some(thread),
        }
    }

    pub(super) fn finish(mut self) -> Vec<TracePoint> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        std::mem::take(&mut *self.points.lock().unwrap())
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Table changes lbd logged: (largest move of any cause, largest move by a learning step,
/// largest gradual part of a learning step), in slots.
pub(super) fn slots_moved(log: &str) -> (usize, usize, usize) {
    let field = |l: &str, key: &str| -> Option<usize> {
        let at = l.find(key)? + key.len();
        l[at..]
            .split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    };
    let mut any = 0;
    let mut learned = 0;
    let mut gradual = 0;
    for l in log.lines() {
        if l.contains("table updated") {
            any = any.max(field(l, " moved=").unwrap_or(0));
        }
        if l.contains("learned weights applied") {
            learned = learned.max(field(l, "slots_moved=").unwrap_or(0));
            gradual = gradual.max(field(l, "slots_moved_gradual=").unwrap_or(0));
        }
    }
    (any, learned, gradual)
}

pub(super) fn share(slots: usize) -> f64 {
    slots as f64 / f64::from(TABLE_SIZE)
}

pub(super) fn shares(p: &TracePoint) -> String {
    let total: u32 = p.slots.iter().sum();
    if total == 0 {
        return "-".into();
    }
    p.slots
        .iter()
        .map(|&s| format!("{:.0}", 100.0 * f64::from(s) / f64::from(total)))
        .collect::<Vec<_>>()
        .join("/")
        + "%"
}
