//! The model of one backend: its service rate regressed on its load ([`fit_with`]), or the
//! [`Refusal`] saying why the window cannot support one. A refusal is the fit's reason, so it
//! lives here rather than with the policy's reasons.
use std::fmt;

use linfa::{traits::Fit as _, Dataset};
use linfa_linear::LinearRegression;
use ndarray::{Array1, Array2};
use serde::{Deserialize, Serialize};

use super::window::Sample;

/// When a fit is good enough to act on.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct FitConfig {
    /// Fewer usable samples than this: refused.
    pub min_samples: usize,
    /// Coefficient of variation (sd / mean) of the load below this: refused (a model of latency
    /// against load needs the load to have moved).
    pub min_load_cv: f64,
    /// R² below this: refused.
    pub min_r2: f64,
}

impl Default for FitConfig {
    fn default() -> Self {
        FitConfig {
            min_samples: 30,
            min_load_cv: 0.1,
            min_r2: 0.6,
        }
    }
}

/// A backend's fitted model: `rate(load) = intercept + slope × load`, where `rate` =
/// 1000 / latency_ms is the service rate the latency implies (per second).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Fit {
    /// Service rate at zero load (1/s): `mu` for an M/M/1 server.
    pub intercept: f64,
    /// Change of service rate per unit of load (−1 for an M/M/1 server; negative when sane).
    pub slope: f64,
    /// Coefficient of determination of the regression, 0..=1.
    pub r2: f64,
    /// Root mean square residual of the rate (1/s).
    pub rmse: f64,
    /// Samples used.
    pub n: usize,
    pub load_min: f64,
    pub load_max: f64,
    pub load_mean: f64,
    /// sd / mean of the load.
    pub load_cv: f64,
}

impl Fit {
    /// Load at which the predicted latency grows without bound (`-intercept / slope`).
    pub fn capacity(&self) -> f64 {
        self.intercept / -self.slope
    }

    /// Load the backend can carry while its predicted latency stays at most `target_ms` (0 if
    /// it misses the target even unloaded).
    pub fn capacity_at(&self, target_ms: f64) -> f64 {
        ((self.intercept - 1000.0 / target_ms) / -self.slope).max(0.0)
    }

    /// Predicted latency (ms) at `load`; infinite at or beyond capacity.
    pub fn predict_latency_ms(&self, load: f64) -> f64 {
        let rate = self.intercept + self.slope * load;
        if rate > 0.0 {
            1000.0 / rate
        } else {
            f64::INFINITY
        }
    }
}

/// Why no model is used for a backend.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "refusal", rename_all = "snake_case")]
pub enum Refusal {
    TooFewSamples {
        have: usize,
        need: usize,
    },
    NoLoadVariation {
        cv: f64,
        need: f64,
    },
    PoorFit {
        r2: f64,
        need: f64,
    },
    /// The fitted line contradicts queueing: the service rate rises with load, or is not
    /// positive without load.
    NonPhysical {
        slope: f64,
        intercept: f64,
    },
    /// The solver failed.
    Numerical {
        error: String,
    },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::TooFewSamples { have, need } => {
                write!(f, "too few samples ({have}, need {need})")
            }
            Refusal::NoLoadVariation { cv, need } => write!(
                f,
                "too little load variation (cv {cv:.3}, need {need}): latency cannot be related to load"
            ),
            Refusal::PoorFit { r2, need } => {
                write!(f, "poor fit (R² {r2:.2}, need {need}): latency does not follow load")
            }
            Refusal::NonPhysical { slope, intercept } => write!(
                f,
                "non-physical fit (service rate {intercept:.1}/s {slope:+.3} × load): latency does not grow with load"
            ),
            Refusal::Numerical { error } => write!(f, "solver failed: {error}"),
        }
    }
}

/// [`fit_with`] under the default [`FitConfig`].
pub fn fit(samples: &[Sample]) -> Result<Fit, Refusal> {
    fit_with(samples, &FitConfig::default())
}

/// Least-squares fit of `1000 / latency_ms` against load (load centred before fitting, so the
/// intercept is well conditioned whatever the load's magnitude). Unusable samples (non-finite,
/// negative load, latency not positive) are left out.
///
/// The fit is made on the means of equal-count load bins (a fifth of the samples, 3 to 12
/// bins), not on the samples: a sample's latency is the mean of a few probes, whose spread at a
/// loaded backend is as large as the trend the model is after; averaging the samples of similar
/// load keeps the trend and removes most of that noise. R² and the RMS residual are those of the
/// bin means.
pub fn fit_with(samples: &[Sample], cfg: &FitConfig) -> Result<Fit, Refusal> {
    let ok: Vec<&Sample> = samples.iter().filter(|s| s.usable()).collect();
    let n = ok.len();
    let need = cfg.min_samples.max(3);
    if n < need {
        return Err(Refusal::TooFewSamples { have: n, need });
    }
    let nf = n as f64;
    let load_mean = ok.iter().map(|s| s.load).sum::<f64>() / nf;
    let load_sd = (ok.iter().map(|s| (s.load - load_mean).powi(2)).sum::<f64>() / nf).sqrt();
    let load_cv = if load_mean > 0.0 {
        load_sd / load_mean
    } else {
        0.0
    };
    if load_cv < cfg.min_load_cv || load_sd == 0.0 {
        return Err(Refusal::NoLoadVariation {
            cv: load_cv,
            need: cfg.min_load_cv,
        });
    }
    let points = bin_means(&ok);
    let bins = points.len();
    let x = Array2::from_shape_fn((bins, 1), |(i, _)| points[i].0 - load_mean);
    let y = Array1::from_iter(points.iter().map(|p| p.1));
    let dataset = Dataset::new(x, y.clone());
    let model = LinearRegression::new()
        .fit(&dataset)
        .map_err(|e| Refusal::Numerical {
            error: e.to_string(),
        })?;
    let slope = model.params()[0];
    let centred_intercept = model.intercept();
    let intercept = centred_intercept - slope * load_mean;
    if !slope.is_finite() || !intercept.is_finite() {
        return Err(Refusal::Numerical {
            error: "non-finite coefficients".into(),
        });
    }
    let y_mean = y.sum() / bins as f64;
    let (mut ss_res, mut ss_tot) = (0.0, 0.0);
    for (p, yi) in points.iter().zip(y.iter()) {
        let pred = centred_intercept + slope * (p.0 - load_mean);
        ss_res += (yi - pred).powi(2);
        ss_tot += (yi - y_mean).powi(2);
    }
    let r2 = if ss_tot > 0.0 {
        1.0 - ss_res / ss_tot
    } else {
        0.0
    };
    if r2 < cfg.min_r2 {
        return Err(Refusal::PoorFit {
            r2,
            need: cfg.min_r2,
        });
    }
    if slope >= 0.0 || intercept <= 0.0 {
        return Err(Refusal::NonPhysical { slope, intercept });
    }
    let (load_min, load_max) = ok.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |a, s| {
        (a.0.min(s.load), a.1.max(s.load))
    });
    Ok(Fit {
        intercept,
        slope,
        r2,
        rmse: (ss_res / bins as f64).sqrt(),
        n,
        load_min,
        load_max,
        load_mean,
        load_cv,
    })
}

/// (mean load, mean service rate) of equal-count load bins: a fifth of the samples, 3 to 12
/// bins.
fn bin_means(ok: &[&Sample]) -> Vec<(f64, f64)> {
    let n = ok.len();
    let mut sorted = ok.to_vec();
    sorted.sort_by(|a, b| a.load.total_cmp(&b.load));
    let bins = (n / 5).clamp(3, 12);
    (0..bins)
        .map(|k| {
            let group = &sorted[k * n / bins..(k + 1) * n / bins];
            let m = group.len() as f64;
            (
                group.iter().map(|s| s.load).sum::<f64>() / m,
                group.iter().map(|s| 1000.0 / s.latency_ms).sum::<f64>() / m,
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::learning::testkit::*;
    use std::time::Instant;

    #[test]
    fn fit_of_600_samples_is_fast() {
        let s = series(200.0, 600, 7);
        let started = Instant::now();
        let rounds = 20;
        for _ in 0..rounds {
            fit(&s).unwrap();
        }
        let per = started.elapsed() / rounds;
        let build = if cfg!(debug_assertions) {
            "unoptimised"
        } else {
            "optimised"
        };
        println!("fit of a 600-sample window: {per:?} ({build} build)");
    }

    #[test]
    fn refusals() {
        // Too few samples.
        assert_eq!(
            fit(&series(100.0, 10, 1)),
            Err(Refusal::TooFewSamples { have: 10, need: 30 })
        );
        // No load variation.
        let flat: Vec<Sample> = (0..100)
            .map(|k| sample(k as f64, 50.0, mm1_ms(100.0, 50.0, 0.05, k, 2)))
            .collect();
        assert!(matches!(fit(&flat), Err(Refusal::NoLoadVariation { .. })));
        // Random latencies: no relation to load.
        let random: Vec<Sample> = (0..200)
            .map(|k| {
                let load = 50.0 + 30.0 * tri(k, 17);
                sample(k as f64, load, 5.0 + 495.0 * (noise(k, 3) + 1.0) / 2.0)
            })
            .collect();
        match fit(&random) {
            Err(Refusal::PoorFit { r2, need }) => assert!(r2 < need),
            other => panic!("{other:?}"),
        }
        // Latency falling as load rises: not a queue.
        let odd: Vec<Sample> = (0..100)
            .map(|k| {
                let load = 50.0 + 30.0 * tri(k, 17);
                sample(k as f64, load, 1000.0 / load)
            })
            .collect();
        assert!(matches!(fit(&odd), Err(Refusal::NonPhysical { .. })));
        // Unusable samples are left out, not fitted.
        let mut bad = series(100.0, 29, 4);
        bad.push(sample(30.0, f64::NAN, 10.0));
        bad.push(sample(31.0, 10.0, 0.0));
        assert_eq!(
            fit(&bad),
            Err(Refusal::TooFewSamples { have: 29, need: 30 })
        );
    }
}
