//! One SVG per scenario, next to its runs' artifacts in [`results_dir`]: p50 and p99 latency
//! over time for every configuration the scenario ran (static-equal, oracle, learned; the
//! first seed), and the learned weights per backend over time with the model's reweights and
//! drains marked. Drawn from the files each run left (requests CSV, table trace), so a plot
//! can be redrawn from an old run's directory.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::load::{percentile, read_csv, Req};
use super::results_dir;
use ::tests::plot::{timeline, Marks, Panel, Series, PALETTE};

/// Width of the latency windows, seconds.
const BIN_S: f64 = 2.0;

/// The runs of scenario `name` (request CSVs `NAME*.csv`, the first seed where there are
/// several), by label.
fn runs(dir: &Path, name: &str) -> Result<Vec<String>> {
    let mut labels: Vec<String> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter_map(|f| f.strip_suffix(".csv").map(str::to_string))
        .filter(|l| l.starts_with(name) && !l.ends_with(".trace"))
        .collect();
    labels.sort();
    if labels.iter().any(|l| l.ends_with("-1")) {
        labels.retain(|l| l.ends_with("-1"));
    }
    Ok(labels)
}

/// The configuration a run label names (`capacity-static-equal-1` -> `static-equal`).
fn config_of(label: &str) -> &str {
    ["static-equal", "oracle", "learned"]
        .into_iter()
        .find(|c| label.contains(c))
        .unwrap_or(label)
}

/// Points of a line: (seconds, value).
type Points = Vec<(f64, f64)>;

/// p50 and p99 of the successful requests per window of [`BIN_S`].
pub(super) fn latency_over_time(reqs: &[Req]) -> (Points, Points) {
    let end = reqs.iter().map(|r| r.sched_s).fold(0.0f64, f64::max);
    let (mut p50, mut p99) = (Vec::new(), Vec::new());
    let mut t = 0.0;
    while t < end {
        let mut lat: Vec<f64> = reqs
            .iter()
            .filter(|r| r.ok && r.sched_s >= t && r.sched_s < t + BIN_S)
            .map(|r| r.latency_ms)
            .collect();
        if !lat.is_empty() {
            lat.sort_by(f64::total_cmp);
            let mid = t + BIN_S / 2.0;
            p50.push((mid, percentile(&lat, 0.5)));
            p99.push((mid, percentile(&lat, 0.99)));
        }
        t += BIN_S;
    }
    (p50, p99)
}

/// One row of a table trace (`t,slots0..2,weight0..2,health0..2,drained0..2`).
pub(super) struct TraceRow {
    pub(super) t: f64,
    pub(super) weights: [f64; 3],
    pub(super) drained: [bool; 3],
}

pub(super) fn read_trace(path: &Path) -> Result<Vec<TraceRow>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    let mut out = Vec::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        if f.len() < 13 {
            continue;
        }
        let num = |i: usize| f[i].parse::<f64>().unwrap_or(f64::NAN);
        out.push(TraceRow {
            t: num(0),
            weights: [num(4), num(5), num(6)],
            drained: [f[10] == "true", f[11] == "true", f[12] == "true"],
        });
    }
    Ok(out)
}

/// The learned weights per backend, and the model's changes: reweights (a weight that moved
/// since the previous sample) and drains/undrains (the model's drained flag flipping).
pub(super) fn weights_panel(trace: &[TraceRow]) -> Panel {
    let mut series = Vec::new();
    let mut reweights = Vec::new();
    let mut drains = Vec::new();
    let mut undrains = Vec::new();
    for (i, &color) in PALETTE.iter().enumerate().take(3) {
        series.push(Series {
            name: format!("backend{i}"),
            points: trace.iter().map(|r| (r.t, r.weights[i])).collect(),
            color,
            dashed: false,
        });
        for w in trace.windows(2) {
            let (a, b) = (&w[0], &w[1]);
            if !a.drained[i] && b.drained[i] {
                drains.push((b.t, b.weights[i]));
            } else if a.drained[i] && !b.drained[i] {
                undrains.push((b.t, b.weights[i]));
            } else if a.weights[i] != b.weights[i] {
                reweights.push((b.t, b.weights[i]));
            }
        }
    }
    Panel {
        title: "learned table weights (configured x 100) and the model's changes".into(),
        y_label: "table weight".into(),
        log_y: false,
        series,
        marks: vec![
            Marks {
                name: format!("reweight ({})", reweights.len()),
                points: reweights,
                color: PALETTE[4],
                cross: false,
            },
            Marks {
                name: format!("drain ({})", drains.len()),
                points: drains,
                color: PALETTE[3],
                cross: true,
            },
            Marks {
                name: format!("undrain ({})", undrains.len()),
                points: undrains,
                color: PALETTE[2],
                cross: true,
            },
        ],
    }
}

/// Draws `NAME.svg` in the results directory from the scenario's runs; the path, or `None`
/// when the scenario left no run.
pub(super) fn scenario(name: &str) -> Result<Option<PathBuf>> {
    let dir = results_dir();
    let labels = runs(&dir, name)?;
    if labels.is_empty() {
        return Ok(None);
    }
    let mut latency = Vec::new();
    for (k, label) in labels.iter().enumerate() {
        let reqs = read_csv(&dir.join(format!("{label}.csv")))?;
        let (p50, p99) = latency_over_time(&reqs);
        let color = match config_of(label) {
            "static-equal" => PALETTE[0],
            "oracle" => PALETTE[2],
            "learned" => PALETTE[1],
            _ => PALETTE[k % PALETTE.len()],
        };
        let config = config_of(label);
        latency.push(Series {
            name: format!("{config} p99"),
            points: p99,
            color,
            dashed: false,
        });
        latency.push(Series {
            name: format!("{config} p50 (dashed)"),
            points: p50,
            color,
            dashed: true,
        });
    }
    let mut panels = vec![Panel {
        title: format!("latency per {BIN_S:.0} s window (successful requests)"),
        y_label: "ms (log)".into(),
        log_y: true,
        series: latency,
        marks: Vec::new(),
    }];
    // The weights of the learned run (or of the only run, when it learned something).
    let learned = labels
        .iter()
        .find(|l| config_of(l) == "learned")
        .or(labels.first().filter(|_| labels.len() == 1));
    if let Some(label) = learned {
        let trace = read_trace(&dir.join(format!("{label}.trace.csv")))?;
        if trace.iter().any(|r| r.weights.iter().any(|w| *w > 0.0)) {
            panels.push(weights_panel(&trace));
        }
    }
    let path = dir.join(format!("{name}.svg"));
    timeline(
        &path,
        &format!("bench adaptive: {name} ({})", labels.join(", ")),
        &panels,
    )?;
    Ok(Some(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_and_changes() {
        let reqs: Vec<Req> = (0..400)
            .map(|i| Req {
                sched_s: i as f64 / 100.0,
                latency_ms: if i < 200 { 10.0 } else { 100.0 },
                ok: true,
                backend: String::new(),
            })
            .collect();
        let (p50, p99) = latency_over_time(&reqs);
        assert_eq!(p50, vec![(1.0, 10.0), (3.0, 100.0)]);
        assert_eq!(p99.len(), 2);
        let row = |t, w: [f64; 3], d: [bool; 3]| TraceRow {
            t,
            weights: w,
            drained: d,
        };
        let trace = [
            row(0.0, [100.0, 100.0, 100.0], [false; 3]),
            row(1.0, [75.0, 100.0, 125.0], [false; 3]),
            row(2.0, [0.0, 100.0, 125.0], [true, false, false]),
        ];
        let p = weights_panel(&trace);
        assert_eq!(p.marks[0].points, vec![(1.0, 75.0), (1.0, 125.0)]);
        assert_eq!(p.marks[1].points, vec![(2.0, 0.0)]);
        assert_eq!(config_of("capacity-static-equal-1"), "static-equal");
    }
}
