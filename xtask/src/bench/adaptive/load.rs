//! The load: lb-loadgen in the client namespace, and the figures of the requests it recorded.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::Value;
use tests::VIP_V4;

use super::bench::Bench;
use super::{NOISE_PERIOD_S, RAMP_SECS, REQUEST_TIMEOUT_MS, VIP_PORT};

/// One request as lb-loadgen recorded it.
#[derive(Debug, Clone)]
pub(super) struct Req {
    pub(super) sched_s: f64,
    pub(super) latency_ms: f64,
    pub(super) ok: bool,
    pub(super) backend: String,
}

/// Latency, throughput and errors of a window of requests.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Figures {
    pub(super) p50: f64,
    pub(super) p99: f64,
    pub(super) rps: f64,
    pub(super) errors: usize,
    pub(super) sent: usize,
}

pub(super) fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

pub(super) fn figures(reqs: &[Req], from: f64, to: f64) -> Figures {
    let win: Vec<&Req> = reqs
        .iter()
        .filter(|r| r.sched_s >= from && r.sched_s < to)
        .collect();
    let mut lat: Vec<f64> = win.iter().filter(|r| r.ok).map(|r| r.latency_ms).collect();
    lat.sort_by(f64::total_cmp);
    Figures {
        p50: percentile(&lat, 0.5),
        p99: percentile(&lat, 0.99),
        rps: lat.len() as f64 / (to - from),
        errors: win.iter().filter(|r| !r.ok).count(),
        sent: win.len(),
    }
}

/// Shares of the successful requests in a window by the backend that answered, e.g. `20/20/60%`.
pub(super) fn served(reqs: &[Req], from: f64, to: f64) -> String {
    let mut n = [0usize; 3];
    for r in reqs
        .iter()
        .filter(|r| r.ok && r.sched_s >= from && r.sched_s < to)
    {
        if let Some(i) = r
            .backend
            .strip_prefix("backend")
            .and_then(|x| x.parse::<usize>().ok())
        {
            if i < 3 {
                n[i] += 1;
            }
        }
    }
    let total: usize = n.iter().sum::<usize>().max(1);
    n.iter()
        .map(|&x| format!("{:.0}", 100.0 * x as f64 / total as f64))
        .collect::<Vec<_>>()
        .join("/")
        + "%"
}

pub(super) fn read_csv(path: &Path) -> Result<Vec<Req>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    let mut out = Vec::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        if f.len() < 5 {
            continue;
        }
        let sched_ms: f64 = f[0].parse().context("sched_ms")?;
        let latency_us: f64 = f[1].parse().context("latency_us")?;
        out.push(Req {
            sched_s: sched_ms / 1000.0,
            latency_ms: latency_us / 1000.0,
            ok: f[4].is_empty(),
            backend: f[3].to_string(),
        });
    }
    Ok(out)
}

/// A running lb-loadgen.
pub(super) struct Load {
    pub(super) child: Child,
    pub(super) csv: PathBuf,
    pub(super) rate_file: PathBuf,
    pub(super) base_rate: f64,
    pub(super) started: Instant,
}

impl Load {
    pub(super) fn start(
        bench: &Bench,
        label: &str,
        rate: f64,
        secs: u64,
        seed: u64,
        noise: f64,
        extra: &[String],
    ) -> Result<Load> {
        let csv = bench.tmp.path().join(format!("{label}.csv"));
        let rate_file = bench.tmp.path().join(format!("{label}.rate"));
        std::fs::write(&rate_file, format!("{:.1}\n", rate * 0.3))?;
        let ns = bench.lab().client().ns();
        let mut cmd = ns.command(&bench.bins.loadgen);
        cmd.arg("--target")
            .arg(SocketAddr::new(IpAddr::from(VIP_V4), VIP_PORT).to_string())
            .args(["--rate", &format!("{:.1}", rate * 0.3)])
            .args(["--duration-s", &secs.to_string()])
            .args(["--seed", &seed.to_string()])
            .args(["--noise", &noise.to_string()])
            .args(["--noise-period-s", &NOISE_PERIOD_S.to_string()])
            .args(["--timeout-ms", &REQUEST_TIMEOUT_MS.to_string()])
            .arg("--out")
            .arg(&csv)
            .arg("--rate-file")
            .arg(&rate_file)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let child = ns.spawn_command(&mut cmd).context("starting lb-loadgen")?;
        Ok(Load {
            child,
            csv,
            rate_file,
            base_rate: rate,
            started: Instant::now(),
        })
    }

    /// Moves the rate along the ramp (call about once a second).
    pub(super) fn ramp(&self) -> Result<()> {
        let t = self.started.elapsed().as_secs_f64();
        let f = if t >= RAMP_SECS {
            1.0
        } else {
            0.3 + 0.7 * t / RAMP_SECS
        };
        let tmp = self.rate_file.with_extension("tmp");
        std::fs::write(&tmp, format!("{:.1}\n", self.base_rate * f))?;
        std::fs::rename(&tmp, &self.rate_file)?;
        Ok(())
    }

    pub(super) fn finish(mut self) -> Result<(Value, Vec<Req>)> {
        let mut out = String::new();
        std::io::Read::read_to_string(self.child.stdout.as_mut().unwrap(), &mut out)?;
        let status = self.child.wait()?;
        if !status.success() {
            bail!("lb-loadgen failed ({status}): {out}");
        }
        let summary: Value = serde_json::from_str(out.lines().last().unwrap_or(""))
            .with_context(|| format!("lb-loadgen's summary: {out:?}"))?;
        Ok((summary, read_csv(&self.csv)?))
    }
}

pub(super) fn median_spread(v: &[f64]) -> (f64, f64, f64) {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    (s[s.len() / 2], s[0], s[s.len() - 1])
}

pub(super) fn fmt_fig(f: &Figures) -> String {
    format!(
        "p50 {:6.1} ms  p99 {:7.1} ms  {:6.1} req/s  errors {:5} of {}",
        f.p50, f.p99, f.rps, f.errors, f.sent
    )
}

/// Rolling p99 over `win` seconds ending at `t`.
pub(super) fn p99_at(reqs: &[Req], t: f64, win: f64) -> f64 {
    figures(reqs, t - win, t).p99
}
