//! Learned weights: a per-backend model of latency against load, and the policy that turns the
//! models into Maglev weights and automatic drains. Design note: `docs/model.md`.
//!
//! * [`Window`] keeps a backend's recent [`Sample`]s (load given to it, probe latency with
//!   failures counted at the timeout, error rate, passive signals).
//! * [`fit`] regresses the service rate `1000 / latency_ms` on the load (the M/M/1
//!   linearisation `1/latency = mu - lambda`) with linfa's least squares, and refuses, with the
//!   reason, when the data cannot support a model.
//! * [`decide`] is a pure function of its inputs and of the previous [`PolicyState`]: weights
//!   proportional to each backend's capacity at the latency target, within floor and ceiling,
//!   step-limited, deadbanded, with hysteresis and a disruption budget checked on the real
//!   Maglev tables; drains of outliers within a share of the pool. No clock, no randomness,
//!   inputs sorted by backend id: every node fed the same inputs computes the same weights.
//!
//! Weights out of [`decide`] are *table weights*: configured weight × [`WEIGHT_SCALE`], so that a
//! backend configured with weight 1 can still be cut to 0.25 of it. Maglev tables depend only on
//! weight ratios, so a table built from configured × `WEIGHT_SCALE` is the configured table.
use std::{
    collections::{BTreeMap, VecDeque},
    fmt,
    net::IpAddr,
};

use lb_common::{maglev, FAMILY_V4, FAMILY_V6};
use linfa::{traits::Fit as _, Dataset};
use linfa_linear::LinearRegression;
use ndarray::{Array1, Array2};
use serde::{Deserialize, Serialize};

use crate::health::HealthStatus;

/// Table weight of one unit of configured weight.
pub const WEIGHT_SCALE: u32 = 100;

/// The table weight a configured weight stands for.
pub fn table_weight(configured: u32) -> u32 {
    configured.saturating_mul(WEIGHT_SCALE)
}

// ---------------------------------------------------------------------------------------------
// Samples and windows
// ---------------------------------------------------------------------------------------------

/// One observation of one backend over a short interval (for example one probe interval).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// Time of the observation in seconds on any clock shared by the nodes (only differences
    /// matter; the model never reads a clock itself).
    pub t_secs: f64,
    /// New flows (or requests) per second given to the backend.
    pub load: f64,
    /// Probe latency in milliseconds, failed probes counted at the probe timeout.
    pub latency_ms: f64,
    /// Share of failed probes, 0..=1.
    pub errors: f64,
    /// SYNs the clients retried (nobody answered the first), per second.
    pub syn_retries_per_s: f64,
    /// RSTs sent by clients, per second.
    pub rsts_per_s: f64,
}

impl Sample {
    fn usable(&self) -> bool {
        self.t_secs.is_finite()
            && self.load.is_finite()
            && self.load >= 0.0
            && self.latency_ms.is_finite()
            && self.latency_ms > 0.0
    }
}

/// A backend's recent samples: at most `max_len`, none older than `max_age_secs` before the
/// newest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Window {
    max_age_secs: f64,
    max_len: usize,
    samples: VecDeque<Sample>,
}

impl Window {
    pub fn new(max_age_secs: f64, max_len: usize) -> Self {
        Window {
            max_age_secs,
            max_len: max_len.max(1),
            samples: VecDeque::new(),
        }
    }

    /// Adds a sample; ignores one with a non-finite or negative load, a latency that is not
    /// positive, or a time before the newest sample's.
    pub fn push(&mut self, s: Sample) {
        if !s.usable() || self.samples.back().is_some_and(|b| s.t_secs < b.t_secs) {
            return;
        }
        self.samples.push_back(s);
        while self.samples.len() > self.max_len {
            self.samples.pop_front();
        }
        let oldest = s.t_secs - self.max_age_secs;
        while self.samples.front().is_some_and(|f| f.t_secs < oldest) {
            self.samples.pop_front();
        }
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    pub fn clear(&mut self) {
        self.samples.clear();
    }

    /// The samples, oldest first.
    pub fn samples(&self) -> Vec<Sample> {
        self.samples.iter().copied().collect()
    }

    /// The highest load among the usable samples, if any.
    pub fn peak_load(&self) -> Option<f64> {
        self.samples.iter().map(|s| s.load).max_by(f64::total_cmp)
    }

    /// Means over the samples of the last `secs` seconds (before the newest), if any.
    pub fn observed(&self, secs: f64) -> Option<Observed> {
        let newest = self.samples.back()?.t_secs;
        let recent: Vec<Sample> = self
            .samples
            .iter()
            .filter(|s| s.t_secs >= newest - secs)
            .copied()
            .collect();
        Observed::mean(&recent)
    }
}

/// What a backend did recently (means over a few samples).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Observed {
    pub load: f64,
    pub latency_ms: f64,
    pub error_rate: f64,
    pub syn_retries_per_s: f64,
    pub rsts_per_s: f64,
    /// Samples averaged.
    pub n: usize,
}

impl Observed {
    pub fn mean(samples: &[Sample]) -> Option<Observed> {
        let ok: Vec<&Sample> = samples.iter().filter(|s| s.usable()).collect();
        if ok.is_empty() {
            return None;
        }
        let n = ok.len() as f64;
        let m = |f: fn(&Sample) -> f64| ok.iter().map(|s| f(s)).sum::<f64>() / n;
        Some(Observed {
            load: m(|s| s.load),
            latency_ms: m(|s| s.latency_ms),
            error_rate: m(|s| s.errors),
            syn_retries_per_s: m(|s| s.syn_retries_per_s),
            rsts_per_s: m(|s| s.rsts_per_s),
            n: ok.len(),
        })
    }

    /// Retried SYNs per new flow (`None` below one new flow per second: too noisy).
    pub fn syn_retry_ratio(&self) -> Option<f64> {
        (self.load >= 1.0).then(|| self.syn_retries_per_s / self.load)
    }

    /// Client RSTs per new flow (`None` below one new flow per second).
    pub fn rst_ratio(&self) -> Option<f64> {
        (self.load >= 1.0).then(|| self.rsts_per_s / self.load)
    }
}

// ---------------------------------------------------------------------------------------------
// The fit
// ---------------------------------------------------------------------------------------------

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
    let mut sorted = ok.clone();
    sorted.sort_by(|a, b| a.load.total_cmp(&b.load));
    let bins = (n / 5).clamp(3, 12);
    let points: Vec<(f64, f64)> = (0..bins)
        .map(|k| {
            let group = &sorted[k * n / bins..(k + 1) * n / bins];
            let m = group.len() as f64;
            (
                group.iter().map(|s| s.load).sum::<f64>() / m,
                group.iter().map(|s| 1000.0 / s.latency_ms).sum::<f64>() / m,
            )
        })
        .collect();
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

// ---------------------------------------------------------------------------------------------
// The policy
// ---------------------------------------------------------------------------------------------

/// How learned models become weights and drains (one per VIP).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WeightPolicy {
    /// Learning on for this VIP. Off: configured weights (reached gradually if learned weights
    /// were in force), no automatic drains.
    pub learning: bool,
    /// The VIP's Maglev table size (prime), for the disruption budget.
    pub table_size: u32,
    /// Latency a backend should stay under; capacities are loads at this latency.
    pub latency_target_ms: f64,
    /// When a fit is accepted.
    pub fit: FitConfig,
    /// Lowest learned weight, as a share of the configured weight.
    pub floor: f64,
    /// Highest learned weight, as a multiple of the configured weight.
    pub ceiling: f64,
    /// Largest change of one weight in one step, as a share of its current weight.
    pub max_step_ratio: f64,
    /// Learned targets within this share of the current weight are ignored.
    pub deadband: f64,
    /// Steps a learned target must stay on the other side before a weight reverses direction.
    pub hysteresis_steps: u32,
    /// Largest share of table slots one step's gradual changes may move (drains, pins and
    /// health changes are not gradual: they apply at once).
    pub disruption_budget: f64,
    /// Largest share of the pool out of rotation (down, draining or drained) before the model
    /// drains more; the last serving backend is never drained.
    pub max_drained_share: f64,
    /// A signal this many times its reference is an outlier.
    pub outlier_factor: f64,
    /// The same for latency. Higher: a backend a little past its capacity has a latency several
    /// times its peers' (queueing), which the weight rule answers by cutting it; a drain is for
    /// a backend far beyond what its load explains.
    pub latency_outlier_factor: f64,
    /// Consecutive outlier steps before a drain (and clean steps before an undrain).
    pub outlier_steps: u32,
    /// Error rates below this never count as outliers.
    pub outlier_min_error_rate: f64,
    /// SYN-retry or RST ratios (per new flow) below this never count as outliers.
    pub outlier_min_passive_ratio: f64,
    /// Client-RST ratios below this never count as outliers. Higher than for SYN retries:
    /// clients reset connections for reasons of their own (a cancelled request, a timeout,
    /// a late segment after a close), measured at 0.2-0.3 per new flow on a healthy backend
    /// of the adaptive bench's keep-alive run.
    pub outlier_min_rst_ratio: f64,
    /// An error rate at least this, and above `outlier_factor` times the peers' median, makes
    /// a backend *suspected* (shown and audited, not drained) while it is below
    /// `outlier_min_error_rate`: a few per cent of fast errors is worth an operator's look
    /// before it is worth a drain.
    pub suspect_min_error_rate: f64,
    /// Steps a drained backend stays out at least (doubled per drain of the same backend, up to
    /// 32 times).
    pub min_drain_steps: u32,
    /// Steps of refused fits after which a learned weight returns to the configured weight;
    /// also the age at which a backend's last accepted fit stops serving as its reference.
    pub stale_steps: u32,
    /// Weight of a new capacity estimate in each backend's running mean (1: no smoothing);
    /// three times this (at most 1) for an estimate below the mean.
    /// Capacities fitted over a sliding window move with the load's noise; the weights follow
    /// the running mean, so noise does not become table churn.
    #[serde(default = "default_capacity_smoothing")]
    pub capacity_smoothing: f64,
    /// Steps a learned weight keeps its direction after turning (cuts of an overloaded backend
    /// excepted): at most one change of direction per this many steps.
    #[serde(default = "default_reversal_hold_steps")]
    pub reversal_hold_steps: u32,
    /// A capacity estimate is at most this multiple of the load the backend has been seen to
    /// carry (the window's highest for a fit, the recent load for headroom): a line fitted to
    /// a flat latency extrapolates to capacities far past anything measured, and a backend
    /// proves capacity by carrying load.
    #[serde(default = "default_max_extrapolation")]
    pub max_extrapolation: f64,
    /// The deadband widens to this many times the relative noise of a backend's capacity
    /// estimate (0: the fixed `deadband` only).
    #[serde(default = "default_deadband_noise_factor")]
    pub deadband_noise_factor: f64,
    /// The deadband when a backend's capacity estimate is bound by its own load (headroom, or
    /// a fit capped at `max_extrapolation` times its load): such an estimate grows with the
    /// load the backend is given, so a weight it sets confirms itself, and the load's noise
    /// walks it up and down (seen in the stability run: small backends' weights wandering
    /// 44-58 over minutes while their latency stayed flat). Only a clearly different target
    /// moves it. Cuts of a backend missing the latency target keep the plain deadband.
    #[serde(default = "default_load_bound_deadband")]
    pub load_bound_deadband: f64,
}

fn default_load_bound_deadband() -> f64 {
    0.15
}

fn default_deadband_noise_factor() -> f64 {
    2.0
}

fn default_max_extrapolation() -> f64 {
    2.0
}

fn default_capacity_smoothing() -> f64 {
    0.1
}

fn default_reversal_hold_steps() -> u32 {
    60
}

impl Default for WeightPolicy {
    fn default() -> Self {
        WeightPolicy {
            learning: true,
            table_size: lb_common::DEFAULT_TABLE_SIZE,
            latency_target_ms: 100.0,
            fit: FitConfig::default(),
            floor: 0.25,
            ceiling: 4.0,
            max_step_ratio: 0.25,
            deadband: 0.05,
            hysteresis_steps: 3,
            disruption_budget: 0.05,
            max_drained_share: 0.34,
            outlier_factor: 5.0,
            latency_outlier_factor: 10.0,
            outlier_steps: 3,
            outlier_min_error_rate: 0.1,
            outlier_min_passive_ratio: 0.05,
            outlier_min_rst_ratio: 0.5,
            suspect_min_error_rate: 0.02,
            min_drain_steps: 10,
            stale_steps: 60,
            capacity_smoothing: default_capacity_smoothing(),
            reversal_hold_steps: default_reversal_hold_steps(),
            max_extrapolation: default_max_extrapolation(),
            deadband_noise_factor: default_deadband_noise_factor(),
            load_bound_deadband: default_load_bound_deadband(),
        }
    }
}

impl WeightPolicy {
    /// The problem with these settings, phrased for the operator, if any.
    pub fn validate(&self) -> Result<(), String> {
        let share = |name: &str, v: f64| {
            if (0.0..=1.0).contains(&v) {
                Ok(())
            } else {
                Err(format!("{name} {v} must be within 0..=1"))
            }
        };
        if !lb_common::is_prime(self.table_size) {
            return Err(format!("table_size {} is not prime", self.table_size));
        }
        if !(self.latency_target_ms > 0.0 && self.latency_target_ms.is_finite()) {
            return Err("latency_target_ms must be above 0".into());
        }
        if !(0.0 < self.floor && self.floor <= 1.0 && 1.0 <= self.ceiling) {
            return Err(format!(
                "floor {} and ceiling {} must satisfy 0 < floor <= 1 <= ceiling",
                self.floor, self.ceiling
            ));
        }
        if !(self.max_step_ratio > 0.0 && self.max_step_ratio < 1.0) {
            return Err("max_step_ratio must be within (0, 1)".into());
        }
        share("deadband", self.deadband)?;
        share("load_bound_deadband", self.load_bound_deadband)?;
        share("disruption_budget", self.disruption_budget)?;
        share("max_drained_share", self.max_drained_share)?;
        if self.max_extrapolation.is_nan() || self.max_extrapolation < 1.0 {
            return Err("max_extrapolation must be at least 1".into());
        }
        if !(self.capacity_smoothing > 0.0 && self.capacity_smoothing <= 1.0) {
            return Err("capacity_smoothing must be within (0, 1]".into());
        }
        share("fit.min_r2", self.fit.min_r2)?;
        if self.outlier_factor <= 1.0 {
            return Err("outlier_factor must be above 1".into());
        }
        Ok(())
    }

    fn slots_budget(&self) -> usize {
        (self.disruption_budget * f64::from(self.table_size)).floor() as usize
    }
}

/// One backend of the VIP, as [`decide`] sees it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BackendInput {
    /// Backend id (the value in the table's slots, not 0).
    pub id: u32,
    /// Identity in the Maglev table.
    pub addr: IpAddr,
    /// Configured weight (configuration units, 0..=10000).
    pub configured_weight: u32,
    /// Table weight in the current table (configured × `WEIGHT_SCALE` before any learning;
    /// 0 while the backend is out of the table).
    pub current_weight: u32,
    /// Operator's pin, in configuration units: the weight is this, whatever the model says.
    pub pinned: Option<u32>,
    /// Learning on for this backend.
    pub learning: bool,
    /// Health checks' verdict, operator drains as `Draining`.
    pub health: HealthStatus,
    /// The backend's model, or why there is none (`fit_with(window, &policy.fit)`).
    pub fit: Result<Fit, Refusal>,
    /// Recent behaviour (for outliers and explanations), if there are samples.
    pub observed: Option<Observed>,
    /// Highest load in the backend's window: the load it has been seen to carry (headroom).
    #[serde(default)]
    pub peak_load: Option<f64>,
    /// The probes' timeout, at which failed probes are counted in `observed.latency_ms`: what
    /// separates the latency of the probes that succeeded from the failures' share of it.
    #[serde(default)]
    pub probe_timeout_ms: Option<f64>,
}

/// What the policy remembers between steps (per VIP). Feed a decision's `state` into the next
/// call; every node that starts from the same state and inputs stays in step.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PolicyState {
    /// Steps taken so far.
    pub step: u64,
    pub backends: BTreeMap<u32, BackendState>,
}

/// Per-backend memory of the policy.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BackendState {
    /// Direction of the last learned change: -1, 0 (none yet) or +1.
    pub last_direction: i8,
    /// Consecutive steps whose learned target pointed against `last_direction`.
    pub reverse_steps: u32,
    /// Consecutive steps with a refused fit.
    pub refused_steps: u32,
    /// The last accepted fit and the step it was accepted in (outlier reference).
    pub last_fit: Option<(u64, Fit)>,
    /// Consecutive steps as an outlier.
    pub outlier_steps: u32,
    /// Consecutive clean steps while drained.
    pub clean_steps: u32,
    /// Step of the model's drain in force, if any.
    pub drained_at: Option<u64>,
    /// Model drains of this backend so far (lengthens the next one).
    pub drains: u32,
    /// Step of the last weight change.
    pub last_change: Option<u64>,
    /// Suspected (error rate above its peers', below the drain threshold) since this step.
    #[serde(default)]
    pub suspected_at: Option<u64>,
    /// Consecutive steps with neither an accepted fit nor overload evidence: what makes a
    /// learned weight stale (an overloaded backend's cut stays while the overload lasts).
    #[serde(default)]
    pub unsupported_steps: u32,
    /// Running mean of the capacity at the target while in the learning group.
    #[serde(default)]
    pub capacity: Option<f64>,
    /// Running mean of the squared deviation of new estimates from `capacity`: how noisy the
    /// estimates are, which widens the deadband.
    #[serde(default)]
    pub capacity_var: Option<f64>,
    /// Consecutive steps with no peer needing relief from this backend (see `EASE_STEPS`).
    #[serde(default)]
    pub at_ease_steps: u32,
    /// Step of the last change of direction of a learned weight.
    #[serde(default)]
    pub last_reversal: Option<u64>,
    /// Returned on a slow start and not yet back to a model or its configured weight.
    #[serde(default)]
    pub ramping_back: bool,
    /// The last fit whose capacity was measured (not bound by the backend's own load) while
    /// `capacity` holds a measured mean: what an estimate bound by its own load is checked
    /// against before it may replace that mean.
    #[serde(default)]
    pub measured: Option<Fit>,
}

/// Which signal made a backend an outlier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Signal {
    Latency,
    ErrorRate,
    SynRetryRatio,
    RstRatio,
}

/// What an outlier's signal is compared with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reference {
    /// The backend's own (last accepted) fit, at the load it carries.
    Model,
    /// The median of the other serving backends.
    Peers,
    /// The latency target itself: the backend misses it at its floor weight (or returning at
    /// no weight) while its peers meet it, so no cut can help.
    Target,
}

/// One signal's verdict: `value` against `factor` × `reference`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Outlier {
    pub signal: Signal,
    pub value: f64,
    pub reference: f64,
    pub reference_kind: Reference,
    pub factor: f64,
}

impl Outlier {
    fn severity(&self) -> f64 {
        if self.reference > 0.0 {
            self.value / self.reference
        } else {
            f64::INFINITY
        }
    }
}

/// Why a backend's weight or state is what it is. Numbers are in table weights unless named
/// otherwise.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum Reason {
    /// Learned target above the current weight: raised.
    Raised {
        from: u32,
        to: u32,
        target: f64,
        capacity_at_target: f64,
        pool_capacity_at_target: f64,
    },
    /// Learned target below the current weight: cut.
    Cut {
        from: u32,
        to: u32,
        target: f64,
        capacity_at_target: f64,
        pool_capacity_at_target: f64,
    },
    /// Target clamped to floor × configured.
    AtFloor { floor_weight: f64 },
    /// Target clamped to ceiling × configured.
    AtCeiling { ceiling_weight: f64 },
    /// The step would have gone further than `max_step_ratio`.
    StepLimited { wanted: f64, max_step_ratio: f64 },
    /// The step was shortened to stay within the disruption budget.
    BudgetLimited {
        fraction_applied: f64,
        slots_budget: usize,
    },
    /// Target within the deadband: held.
    Deadband {
        target: f64,
        current: u32,
        deadband: f64,
    },
    /// Target points the other way for fewer than `need` steps: held.
    Hysteresis { target: f64, steps: u32, need: u32 },
    /// The fitted capacity at the target is beyond `max_extrapolation` times the highest load
    /// in the window: taken as that limit.
    Extrapolation { fitted: f64, limit: f64 },
    /// Target points the other way, but the weight turned at `since_step`: held until
    /// `until_step` (at most one change of direction per `reversal_hold_steps`).
    ReversalHold {
        target: f64,
        since_step: u64,
        until_step: u64,
    },
    /// No usable model: weight held.
    FitRefused { refusal: Refusal, steps: u32 },
    /// Refused for `steps` steps: returning to the configured weight.
    Stale { steps: u32 },
    /// Fewer than two backends with a model: nothing to compare capacities with.
    NoPeers { fitted: usize },
    /// No backend with a model meets the latency target at any load: weights held.
    NoCapacity,
    /// Learning off (VIP or backend): configured weight.
    LearningOff,
    /// Operator's pin (configuration units).
    Pinned { weight: u32 },
    /// Configured weight 0.
    ConfiguredZero,
    /// Probation after being down: the learned target is capped at the configured weight.
    Probation,
    /// Back in the table: starts at the floor and ramps up.
    SlowStart { weight: u32 },
    /// Back in the table with too few samples for a model yet, meeting the target: ramping
    /// back to the configured weight (what a backend without a model has at the start).
    RampBack { weight: f64 },
    /// Health checks or the operator keep it out of the table.
    Health { status: HealthStatus },
    /// Drained by the model this step.
    Drained { outlier: Outlier, steps: u32 },
    /// An outlier, not yet for long enough.
    OutlierPending {
        outlier: Outlier,
        steps: u32,
        need: u32,
    },
    /// An outlier that was not drained: the pool's drained share, the last serving backend,
    /// or (a latency outlier) the others' capacity below the pool's load.
    DrainDeferred { outlier: Outlier, why: String },
    /// Still drained by the model (until at least step `until_step`, and clean for
    /// `outlier_steps` steps).
    StillDrained {
        since_step: u64,
        until_step: u64,
        outlier: Option<Outlier>,
    },
    /// Drain ended: signals back within bounds.
    Undrained { drained_for_steps: u64 },
    /// Its error rate is well above its peers' but below the drain threshold.
    Suspected { outlier: Outlier, since_step: u64 },
    /// No model, but its latency is above the target while its peers' median meets it: the
    /// backend is given less until it meets the target too (a model needs unsaturated data,
    /// and an overloaded backend never produces any).
    Overloaded {
        latency_ms: f64,
        peers_latency_ms: f64,
        target: f64,
    },
    /// Drained by the model: its weight goes to 0 over as many steps as the disruption budget
    /// needs (a health failure or an operator's drain is immediate instead).
    DrainStep { remaining_weight: u32 },
    /// No model, but its latency is under half the target (flat, far from saturation): its
    /// capacity at the target is taken to be at least load x target / latency.
    Headroom {
        refusal: Refusal,
        capacity_estimate: f64,
    },
    /// This step's capacity estimate is bound by the backend's own load; the capacity measured
    /// by an earlier fit is kept: the backend carries no more than it, meets the target and is
    /// not clearly faster than that fit predicts.
    Remembered {
        capacity: f64,
        load: f64,
        latency_ms: f64,
        predicted_ms: f64,
    },
    /// Every weight of the pool was multiplied by `factor` (the table stays exactly as it is)
    /// because they had fallen far below the configured total, too coarse for a change within
    /// the disruption budget.
    Rescaled { factor: u32 },
    /// This step's capacity estimate is bound by the backend's own load, which is at or above
    /// its configured share, and no peer has needed relief for `EASE_STEPS` steps: the running
    /// mean stays (more exploration would only move flows nobody needs moved).
    ExplorationHeld { capacity: f64, estimate: f64 },
}

fn fmt_outlier(f: &mut fmt::Formatter<'_>, o: &Outlier) -> fmt::Result {
    write!(
        f,
        "{:?} {:.3} > {} × {:?} {:.3}",
        o.signal, o.value, o.factor, o.reference_kind, o.reference
    )
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = f64::from(WEIGHT_SCALE);
        match self {
            Reason::Raised {
                from,
                to,
                target,
                capacity_at_target,
                pool_capacity_at_target,
            }
            | Reason::Cut {
                from,
                to,
                target,
                capacity_at_target,
                pool_capacity_at_target,
            } => write!(
                f,
                "{} {:.2} -> {:.2} (target {:.2}): capacity {:.1}/s of the pool's {:.1}/s at the latency target",
                if to > from { "raised" } else { "cut" },
                f64::from(*from) / s,
                f64::from(*to) / s,
                target / s,
                capacity_at_target,
                pool_capacity_at_target
            ),
            Reason::AtFloor { floor_weight } => write!(f, "at floor {:.2}", floor_weight / s),
            Reason::AtCeiling { ceiling_weight } => {
                write!(f, "at ceiling {:.2}", ceiling_weight / s)
            }
            Reason::StepLimited {
                wanted,
                max_step_ratio,
            } => write!(
                f,
                "step limited to {:.0}% (wanted {:.2})",
                max_step_ratio * 100.0,
                wanted / s
            ),
            Reason::BudgetLimited {
                fraction_applied,
                slots_budget,
            } => write!(
                f,
                "{:.0}% of the step applied to move at most {slots_budget} slots",
                fraction_applied * 100.0
            ),
            Reason::Deadband {
                target,
                current,
                deadband,
            } => write!(
                f,
                "held: target {:.2} within {:.0}% of {:.2}",
                target / s,
                deadband * 100.0,
                f64::from(*current) / s
            ),
            Reason::Hysteresis {
                target,
                steps,
                need,
            } => write!(
                f,
                "held: target {:.2} reverses the last change ({steps} of {need} steps)",
                target / s
            ),
            Reason::Extrapolation { fitted, limit } => write!(
                f,
                "fitted capacity {fitted:.1}/s is past what its load shows: taken as {limit:.1}/s"
            ),
            Reason::ReversalHold {
                target,
                since_step,
                until_step,
            } => write!(
                f,
                "held: target {:.2} reverses the last change, but the weight turned at step {since_step}; not again before step {until_step}",
                target / s
            ),
            Reason::FitRefused { refusal, steps } => {
                write!(f, "held: no model for {steps} steps: {refusal}")
            }
            Reason::Stale { steps } => write!(
                f,
                "no model for {steps} steps: returning to the configured weight"
            ),
            Reason::NoPeers { fitted } => write!(
                f,
                "held: {fitted} backend(s) with a model, capacities need at least 2 to compare"
            ),
            Reason::NoCapacity => {
                f.write_str("held: no backend meets the latency target at any load")
            }
            Reason::LearningOff => f.write_str("learning off: configured weight"),
            Reason::Pinned { weight } => write!(f, "pinned at {weight}"),
            Reason::ConfiguredZero => f.write_str("configured weight 0"),
            Reason::Probation => f.write_str("probation: at most the configured weight"),
            Reason::SlowStart { weight } => write!(
                f,
                "back in the table: slow start at {:.2}",
                f64::from(*weight) / s
            ),
            Reason::RampBack { weight } => write!(
                f,
                "no model yet, meeting the target: ramping back to the configured {:.2}",
                weight / s
            ),
            Reason::Health { status } => write!(f, "out of the table: {status}"),
            Reason::Drained { outlier, steps } => {
                f.write_str("drained: ")?;
                fmt_outlier(f, outlier)?;
                write!(f, " for {steps} steps")
            }
            Reason::OutlierPending {
                outlier,
                steps,
                need,
            } => {
                f.write_str("outlier: ")?;
                fmt_outlier(f, outlier)?;
                write!(f, " ({steps} of {need} steps)")
            }
            Reason::DrainDeferred { outlier, why } => {
                f.write_str("not drained (")?;
                f.write_str(why)?;
                f.write_str("): ")?;
                fmt_outlier(f, outlier)
            }
            Reason::StillDrained {
                since_step,
                until_step,
                outlier,
            } => {
                write!(f, "drained since step {since_step}, at least until {until_step}")?;
                if let Some(o) = outlier {
                    f.write_str("; still ")?;
                    fmt_outlier(f, o)?;
                }
                Ok(())
            }
            Reason::Undrained { drained_for_steps } => {
                write!(f, "undrained after {drained_for_steps} steps: signals back within bounds")
            }
            Reason::Suspected {
                outlier,
                since_step,
            } => {
                write!(f, "suspected since step {since_step}: ")?;
                fmt_outlier(f, outlier)
            }
            Reason::Overloaded {
                latency_ms,
                peers_latency_ms,
                target,
            } => write!(
                f,
                "overloaded: latency {latency_ms:.1} ms above the target while peers' median is {peers_latency_ms:.1} ms; cut toward {:.2}",
                target / s
            ),
            Reason::Remembered {
                capacity,
                load,
                latency_ms,
                predicted_ms,
            } => write!(
                f,
                "capacity {capacity:.1}/s as last measured: at its load {load:.1}/s its latency {latency_ms:.1} ms meets the target and the measured model's {predicted_ms:.1} ms (this step's estimate only reflects its own load)"
            ),
            Reason::Rescaled { factor } => write!(
                f,
                "the pool's weights had fallen far below their configured total: all multiplied by {factor} (the same table) so that changes fit the disruption budget"
            ),
            Reason::ExplorationHeld { capacity, estimate } => write!(
                f,
                "capacity kept at {capacity:.1}/s (this step's {estimate:.1}/s is bound by its own load, it has at least its configured share, and for {EASE_STEPS} steps no peer has missed the target, run above {:.0}% of its capacity or been {SLOWER_PEER}x slower)",
                PRESSURE_SHARE * 100.0
            ),
            Reason::Headroom {
                refusal,
                capacity_estimate,
            } => write!(
                f,
                "no model ({refusal}), but below the latency target at its load: capacity taken as load x min(target / latency, max_extrapolation) = {capacity_estimate:.1}/s"
            ),
            Reason::DrainStep { remaining_weight } => write!(
                f,
                "draining within the disruption budget: {:.2} left",
                f64::from(*remaining_weight) / s
            ),
        }
    }
}

/// The outcome for one backend.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BackendDecision {
    pub id: u32,
    pub addr: IpAddr,
    pub configured_weight: u32,
    /// Table weight before this step.
    pub previous_weight: u32,
    /// Table weight to build the table with (0 when out of the table).
    pub weight: u32,
    /// What the model wants (table weight) before step, deadband and budget, if it has a say.
    pub target_weight: Option<f64>,
    /// Drained by the model (in force after this step).
    pub drained: bool,
    pub health: HealthStatus,
    pub fit: Option<Fit>,
    pub refusal: Option<Refusal>,
    /// Capacity at the latency target (load/s), from the fit.
    pub capacity_at_target: Option<f64>,
    /// The fit's latency at the observed load (ms).
    pub predicted_latency_ms: Option<f64>,
    pub observed: Option<Observed>,
    pub reasons: Vec<Reason>,
}

/// What [`decide`] returns: the new weights with their reasons, the audit events, the slots
/// the change moves, and the state for the next step.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decision {
    /// This step's number (`prev.step + 1`).
    pub step: u64,
    /// One per backend, by id.
    pub backends: Vec<BackendDecision>,
    /// Slots that differ between the table of the current weights and the new one.
    pub slots_moved: usize,
    /// Of those, slots that held a backend and were moved by gradual changes (bounded by
    /// `slots_budget`; slots of an empty table disturb no flow and are not counted).
    pub slots_moved_gradual: usize,
    pub slots_budget: usize,
    pub table_size: u32,
    /// Why weights could not be checked against a table, if they could not (changes held).
    pub table_error: Option<String>,
    pub events: Vec<AuditEvent>,
    pub state: PolicyState,
}

impl Decision {
    /// (id, table weight) for the table build, by id.
    pub fn weights(&self) -> Vec<(u32, u32)> {
        self.backends.iter().map(|b| (b.id, b.weight)).collect()
    }

    pub fn changed(&self) -> bool {
        self.backends.iter().any(|b| b.weight != b.previous_weight)
    }
}

/// What kind of change an audit event records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditKind {
    Reweight,
    Drain,
    Undrain,
    /// A backend became suspected (see [`Reason::Suspected`]); its weight is unchanged.
    Suspect,
}

/// One change the model made, with everything it was based on (log it as JSON).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuditEvent {
    pub step: u64,
    pub kind: AuditKind,
    pub backend: u32,
    pub addr: IpAddr,
    pub from_weight: u32,
    pub to_weight: u32,
    pub configured_weight: u32,
    pub reasons: Vec<Reason>,
    pub inputs: BackendInput,
    pub latency_target_ms: f64,
}

// ---------------------------------------------------------------------------------------------
// decide
// ---------------------------------------------------------------------------------------------

/// How a backend's weight is set this step.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    /// Fixed at once (out of the table, pinned, configured 0): not budgeted.
    Urgent,
    /// Moves gradually toward `target`; `learned` adds deadband and hysteresis.
    Gradual { target: f64, learned: bool },
    /// Drained by the model, still in the table: to 0 within the disruption budget (no step
    /// limit).
    Drain,
    /// Stays where it is.
    Hold,
}

/// Table builds at most when a change must be cut to the disruption budget.
const BUDGET_TRIES: u32 = 8;
/// A backend failing at least this share of its probes is failing, whatever its queue.
const OVERLOAD_MAX_ERRORS: f64 = 0.5;
/// A fit measures a capacity (which is then remembered) when the capacity is at most this
/// multiple of the highest load in its window.
const MEASURED_REACH: f64 = 1.25;
/// A remembered capacity is dropped when the backend's latency falls below this share of what
/// the measured model predicts at its load: it has become faster than it was measured.
const REMEMBERED_LATENCY_SHARE: f64 = 0.7;
/// A backend carrying at least this share of its capacity mean is under pressure: its peers'
/// estimates bound by their own load may grow to relieve it.
const PRESSURE_SHARE: f64 = 0.8;
/// Steps with every peer at ease before an explored estimate stops growing. Pressure is
/// judged on a few seconds' means, which dip below the threshold in the load's troughs: frozen
/// at the first dip, the large backend stopped where the small ones still neared their knee at
/// the load's peaks, and the next peak, minutes later, moved the weights again.
const EASE_STEPS: u32 = 20;
/// A peer this many times slower than a backend is relieved by giving that backend more.
/// (1.5 let the probes' noise at the small backends' load peaks keep the large one exploring
/// in the stability run.)
const SLOWER_PEER: f64 = 2.0;

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// The worst outlying signal of `b`, if any. `peers`: the other serving backends' observations.
fn outlier(
    b: &BackendInput,
    reference_fit: Option<&Fit>,
    peers: &[Observed],
    policy: &WeightPolicy,
) -> Option<Outlier> {
    let obs = b.observed?;
    let k = policy.outlier_factor;
    let kl = policy.latency_outlier_factor;
    let mut found: Vec<Outlier> = Vec::new();
    // Latency: against the backend's own model at the load it carries, else the peers' median.
    // Never while it meets the latency target.
    let model_ref = reference_fit
        .map(|f| f.predict_latency_ms(obs.load))
        .filter(|l| l.is_finite());
    let (lat_ref, kind) = match model_ref {
        Some(l) => (Some(l), Reference::Model),
        None => (
            median(peers.iter().map(|p| p.latency_ms).collect()),
            Reference::Peers,
        ),
    };
    if let Some(r) = lat_ref {
        if obs.latency_ms > policy.latency_target_ms && obs.latency_ms > kl * r {
            found.push(Outlier {
                signal: Signal::Latency,
                value: obs.latency_ms,
                reference: r,
                reference_kind: kind,
                factor: kl,
            });
        }
    }
    // Missing the target at the floor weight (or at none, returning) while the peers meet it:
    // the overload rule's cuts are exhausted, and a backend that cannot meet the target with
    // the least load it can be given does not belong in a latency-targeted pool. (A backend 5x
    // slower is under 10x its peers while lightly loaded, so the rule above never sees it.)
    let floor_weight = floor_weight(b, policy);
    let peers_latency = median(peers.iter().map(|p| p.latency_ms).collect());
    if f64::from(b.current_weight) <= floor_weight + 0.5
        && obs.latency_ms > policy.latency_target_ms
        && peers_latency.is_some_and(|l| l <= policy.latency_target_ms)
    {
        found.push(Outlier {
            signal: Signal::Latency,
            value: obs.latency_ms,
            reference: policy.latency_target_ms,
            reference_kind: Reference::Target,
            factor: 1.0,
        });
    }
    // Error rate and passive ratios: against the peers' median (the same client population
    // reaches every backend through the hash, so these ratios should match across backends).
    let checks: [(Signal, Option<f64>, Vec<f64>, f64); 3] = [
        (
            Signal::ErrorRate,
            (!overload_errors(b, obs, policy)).then_some(obs.error_rate),
            peers.iter().map(|p| p.error_rate).collect(),
            policy.outlier_min_error_rate,
        ),
        (
            Signal::SynRetryRatio,
            obs.syn_retry_ratio(),
            peers.iter().filter_map(|p| p.syn_retry_ratio()).collect(),
            policy.outlier_min_passive_ratio,
        ),
        (
            Signal::RstRatio,
            obs.rst_ratio(),
            peers.iter().filter_map(|p| p.rst_ratio()).collect(),
            policy.outlier_min_rst_ratio,
        ),
    ];
    for (signal, value, peer_values, min) in checks {
        let (Some(v), Some(r)) = (value, median(peer_values)) else {
            continue;
        };
        if v >= min && v > k * r {
            found.push(Outlier {
                signal,
                value: v,
                reference: r,
                reference_kind: Reference::Peers,
                factor: k,
            });
        }
    }
    found
        .into_iter()
        .max_by(|a, b| a.severity().total_cmp(&b.severity()))
}

/// The lowest table weight learning gives `b`.
fn floor_weight(b: &BackendInput, policy: &WeightPolicy) -> f64 {
    policy.floor * f64::from(table_weight(b.configured_weight))
}

/// Failed probes of a backend queueing past the latency target, above its floor weight, and
/// failing fewer than `OVERLOAD_MAX_ERRORS` of its probes: timeouts of its queue, which is the
/// weights' doing and which the weight rule answers by cutting it, not a failure to drain (the
/// stability run drained a small backend that the end of the ramp had overloaded, 10% of its
/// probes timing out behind a 277 ms queue). At its floor, or failing most probes, its errors
/// count again.
fn overload_errors(b: &BackendInput, obs: Observed, policy: &WeightPolicy) -> bool {
    let floor_weight = floor_weight(b, policy);
    // The probes that succeeded queue past the target (failed ones count at the timeout in
    // the mean: 5% of fast 500s at a 400 ms timeout raise a 22 ms mean past a 40 ms target).
    let answered_ms = match b.probe_timeout_ms {
        Some(t) if obs.error_rate < 1.0 => {
            (obs.latency_ms - obs.error_rate * t) / (1.0 - obs.error_rate)
        }
        _ => obs.latency_ms,
    };
    answered_ms > policy.latency_target_ms
        && obs.error_rate < OVERLOAD_MAX_ERRORS
        && f64::from(b.current_weight) > floor_weight + 0.5
}

/// `b`'s error rate as a suspicion (see [`WeightPolicy::suspect_min_error_rate`]), if it is one.
fn suspicion(b: &BackendInput, peers: &[Observed], policy: &WeightPolicy) -> Option<Outlier> {
    let obs = b.observed?;
    if overload_errors(b, obs, policy) {
        return None;
    }
    let reference = median(peers.iter().map(|p| p.error_rate).collect())?;
    let k = policy.outlier_factor;
    (obs.error_rate >= policy.suspect_min_error_rate && obs.error_rate > k * reference).then_some(
        Outlier {
            signal: Signal::ErrorRate,
            value: obs.error_rate,
            reference,
            reference_kind: Reference::Peers,
            factor: k,
        },
    )
}

fn maglev_addr(addr: IpAddr) -> ([u8; 16], u8) {
    let mut a = [0u8; 16];
    match addr {
        IpAddr::V4(v4) => {
            a[..4].copy_from_slice(&v4.octets());
            (a, FAMILY_V4)
        }
        IpAddr::V6(v6) => (v6.octets(), FAMILY_V6),
    }
}

/// The Maglev table of `weights` (by position in `inputs`).
fn table(inputs: &[BackendInput], weights: &[u32], size: u32) -> Result<Vec<u32>, String> {
    let backends: Vec<maglev::Backend> = inputs
        .iter()
        .zip(weights)
        .map(|(b, &w)| {
            let (addr, family) = maglev_addr(b.addr);
            maglev::Backend {
                addr,
                family,
                id: b.id,
                weight: w,
            }
        })
        .collect();
    crate::tables::build(&backends, size).map_err(|e| e.to_string())
}

/// One step of the policy. Pure: the result depends only on the arguments, not on the order of
/// `inputs` (they are taken by backend id).
pub fn decide(inputs: &[BackendInput], policy: &WeightPolicy, prev: &PolicyState) -> Decision {
    let mut inputs = inputs.to_vec();
    inputs.sort_by_key(|b| b.id);
    let n = inputs.len();
    let step = prev.step + 1;
    let p = policy;

    let mut states: Vec<BackendState> = inputs
        .iter()
        .map(|b| prev.backends.get(&b.id).cloned().unwrap_or_default())
        .collect();
    let mut reasons: Vec<Vec<Reason>> = vec![Vec::new(); n];

    // Coarse weights. Health downs are urgent and keep the others' weights as they are, so a
    // pool can end up with its serving backends at a few units each (the lab's SYN-drop
    // cascade left 0, 1 and 7 of a configured 100 each): then any change moves more slots
    // than the budget allows, the budget's fraction of it rounds to no change, and the pool
    // is stuck (the returning backend stayed at 0 and the drained one kept 87% of the slots).
    // Multiplying every weight by one integer leaves the table exactly as it is (the quotas
    // and the turns depend on the weights' ratios only), so such weights are scaled back up
    // to about their configured total first. Not with a pinned backend or learning off
    // anywhere: their weights are set, not scaled.
    let serving_now = |b: &BackendInput, st: &BackendState| {
        b.health.serving() && b.configured_weight > 0 && st.drained_at.is_none()
    };
    let reported: Vec<u32> = inputs.iter().map(|b| b.current_weight).collect();
    let in_table_cfg: u64 = inputs
        .iter()
        .zip(&states)
        .filter(|(b, st)| serving_now(b, st))
        .map(|(b, _)| u64::from(table_weight(b.configured_weight)))
        .sum();
    let in_table_cur: u64 = reported.iter().map(|&w| u64::from(w)).sum();
    let scale = if p.learning
        && inputs.iter().all(|b| b.learning && b.pinned.is_none())
        && in_table_cur > 0
    {
        (in_table_cfg / in_table_cur).clamp(1, u64::from(u32::MAX))
    } else {
        1
    };
    if scale >= 2 {
        for (b, r) in inputs.iter_mut().zip(&mut reasons) {
            if b.current_weight > 0 {
                b.current_weight =
                    u32::try_from(u64::from(b.current_weight) * scale).unwrap_or(u32::MAX);
                r.push(Reason::Rescaled {
                    factor: scale as u32,
                });
            }
        }
    }
    let learning = |b: &BackendInput| p.learning && b.learning;
    // Its recent probes' latency is above the target (no observation: not known to miss it).
    let misses_target = |b: &BackendInput| {
        b.observed
            .is_some_and(|o| o.latency_ms > p.latency_target_ms)
    };

    // Headroom: a backend without a model whose latency is flat (refused as a poor fit, for
    // too little load variation, or with latency not rising with load) while it meets the
    // target can take at least its load x target / latency: the estimate is exact for a
    // backend whose latency would grow in proportion to its load, and low for a queue, whose
    // latency stays flat until near its capacity. Among several such backends it hands load
    // to the one with the lowest latency, so it settles where latencies are equal.
    let headroom: Vec<Option<f64>> = inputs
        .iter()
        .map(|b| match (&b.fit, b.observed) {
            (
                Err(
                    Refusal::PoorFit { .. }
                    | Refusal::NoLoadVariation { .. }
                    | Refusal::NonPhysical { .. },
                ),
                Some(o),
            ) if o.load > 0.0 && o.latency_ms > 0.0 && o.latency_ms < p.latency_target_ms => {
                // The window's peak rather than the recent load: an estimate proportional to
                // the recent load follows the load's noise, and moves the weights with it.
                let load = b.peak_load.unwrap_or(o.load).max(o.load);
                Some(load * (p.latency_target_ms / o.latency_ms).min(p.max_extrapolation))
            }
            _ => None,
        })
        .collect();

    // Fit bookkeeping: refused streaks and the last accepted fit (the outlier reference).
    // A backend meeting the target with headroom supports its weight without a fit: it
    // does not go stale (which would hand a relieved backend back the load that saturated it).
    for ((b, st), h) in inputs.iter().zip(states.iter_mut()).zip(&headroom) {
        match &b.fit {
            Ok(f) => {
                st.refused_steps = 0;
                st.unsupported_steps = 0;
                st.last_fit = Some((step, *f));
                st.ramping_back = false;
            }
            Err(_) => {
                st.refused_steps = st.refused_steps.saturating_add(1);
                st.unsupported_steps = if h.is_some() {
                    0
                } else {
                    st.unsupported_steps.saturating_add(1)
                };
            }
        }
        if st
            .last_fit
            .is_some_and(|(at, _)| step.saturating_sub(at) > u64::from(p.stale_steps))
        {
            st.last_fit = None;
        }
    }

    // --- Drains: outliers among serving backends, within the pool's drained share. ---
    let peer_obs = |i: usize, states: &[BackendState]| -> Vec<Observed> {
        inputs
            .iter()
            .zip(states)
            .enumerate()
            .filter(|(j, (b, st))| *j != i && serving_now(b, st))
            .filter_map(|(_, (b, _))| b.observed)
            .collect()
    };
    let outliers: Vec<Option<Outlier>> = (0..n)
        .map(|i| {
            if !learning(&inputs[i]) || inputs[i].pinned.is_some() {
                return None;
            }
            let reference = states[i].last_fit.as_ref().map(|(_, f)| f);
            outlier(&inputs[i], reference, &peer_obs(i, &states), p)
        })
        .collect();
    // Suspicions: error rates above the peers' that do not (yet) justify a drain.
    let mut newly_suspected = vec![false; n];
    for i in 0..n {
        let s = if !learning(&inputs[i]) || inputs[i].pinned.is_some() || outliers[i].is_some() {
            None
        } else {
            suspicion(&inputs[i], &peer_obs(i, &states), p)
        };
        match s {
            Some(outlier) => {
                let since_step = *states[i].suspected_at.get_or_insert_with(|| {
                    newly_suspected[i] = true;
                    step
                });
                reasons[i].push(Reason::Suspected {
                    outlier,
                    since_step,
                });
            }
            None => states[i].suspected_at = None,
        }
    }
    let mut newly_drained = vec![false; n];
    let mut undrained = vec![false; n];
    // Undrains first: a drain that has served its time and whose signals are clean ends.
    for i in 0..n {
        if states[i].drained_at.is_none() {
            continue;
        }
        // Clean also means meeting the latency target (or the peers' median, when they miss
        // it too) at no load: a backend drained for latency that is still slow unloaded would
        // only be drained again once its slow start gave it load.
        let peers_latency = median(peer_obs(i, &states).iter().map(|o| o.latency_ms).collect());
        let st = &mut states[i];
        let Some(at) = st.drained_at else { continue };
        let until =
            at + u64::from(p.min_drain_steps) * (1u64 << st.drains.clamp(1, 6).saturating_sub(1));
        let clean = outliers[i].is_none()
            && inputs[i].observed.is_some_and(|o| {
                o.latency_ms <= p.latency_target_ms.max(peers_latency.unwrap_or(0.0))
            });
        st.clean_steps = if clean { st.clean_steps + 1 } else { 0 };
        if !learning(&inputs[i]) || inputs[i].pinned.is_some() {
            // Learning switched off or pinned: the model gives the backend back at once.
            st.drained_at = None;
            undrained[i] = true;
            reasons[i].push(Reason::Undrained {
                drained_for_steps: step - at,
            });
        } else if step >= until && st.clean_steps >= p.outlier_steps.max(1) {
            st.drained_at = None;
            st.clean_steps = 0;
            undrained[i] = true;
            reasons[i].push(Reason::Undrained {
                drained_for_steps: step - at,
            });
        } else {
            reasons[i].push(Reason::StillDrained {
                since_step: at,
                until_step: until,
                outlier: outliers[i],
            });
        }
    }
    // Outlier streaks of serving backends; drain candidates in order of severity, then id.
    let mut candidates: Vec<(f64, usize)> = Vec::new();
    for i in 0..n {
        if states[i].drained_at.is_some() || undrained[i] {
            continue;
        }
        match (&outliers[i], serving_now(&inputs[i], &states[i])) {
            (Some(o), true) => {
                states[i].outlier_steps += 1;
                if states[i].outlier_steps >= p.outlier_steps.max(1) {
                    candidates.push((o.severity(), i));
                } else {
                    reasons[i].push(Reason::OutlierPending {
                        outlier: *o,
                        steps: states[i].outlier_steps,
                        need: p.outlier_steps.max(1),
                    });
                }
            }
            _ => states[i].outlier_steps = 0,
        }
    }
    candidates.sort_by(|a, b| {
        b.0.total_cmp(&a.0)
            .then(inputs[a.1].id.cmp(&inputs[b.1].id))
    });
    let pool = inputs.iter().filter(|b| b.configured_weight > 0).count();
    let max_out = (p.max_drained_share * pool as f64 + 1e-9).floor() as usize;
    let mut out = inputs
        .iter()
        .zip(&states)
        .filter(|(b, st)| b.configured_weight > 0 && !serving_now(b, st))
        .count();
    // The load the serving backends carry, for the capacity check of latency drains.
    let pool_load: f64 = (0..n)
        .filter(|&j| serving_now(&inputs[j], &states[j]))
        .filter_map(|j| inputs[j].observed.map(|o| o.load))
        .sum();
    for (_, i) in candidates {
        let o = outliers[i].expect("candidates are outliers");
        let serving_left = pool - out;
        // A slow backend still serves: draining it onto peers that cannot carry the load only
        // moves the slowness, and overloaded peers fail their health checks next (the lab's
        // cascade). So a latency outlier waits while the others' capacity means (known for
        // all of them) fall short of the pool's load; the model's weights shift what they can
        // meanwhile. A failing backend (errors, retried SYNs, resets) fails its share anyway:
        // drained regardless.
        let others_capacity = (o.signal == Signal::Latency)
            .then(|| {
                (0..n)
                    .filter(|&j| j != i && serving_now(&inputs[j], &states[j]))
                    .map(|j| states[j].capacity)
                    .sum::<Option<f64>>()
            })
            .flatten();
        let why = if out + 1 > max_out {
            Some(format!(
                "{out} of {pool} already out, at most {:.0}% may be",
                p.max_drained_share * 100.0
            ))
        } else if serving_left <= 1 {
            Some("last serving backend".to_string())
        } else {
            others_capacity.filter(|&c| c < pool_load).map(|c| {
                format!(
                    "the others' capacity at the target, {c:.1}/s, is below the pool's load of {pool_load:.1}/s"
                )
            })
        };
        match why {
            Some(why) => reasons[i].push(Reason::DrainDeferred { outlier: o, why }),
            None => {
                out += 1;
                let st = &mut states[i];
                st.drained_at = Some(step);
                st.drains = st.drains.saturating_add(1);
                st.clean_steps = 0;
                newly_drained[i] = true;
                reasons[i].push(Reason::Drained {
                    outlier: o,
                    steps: st.outlier_steps,
                });
                st.outlier_steps = 0;
            }
        }
    }

    // --- Targets. ---
    let cfg_t: Vec<f64> = inputs
        .iter()
        .map(|b| f64::from(table_weight(b.configured_weight)))
        .collect();
    let in_table = |i: usize, states: &[BackendState]| serving_now(&inputs[i], &states[i]);
    // The learning group: backends whose model (or headroom) sets their weight. Only with a
    // fitted backend (or one with a remembered measurement) among them: when no backend's
    // latency depends on its load there is nothing to learn, and the weights stay.
    let mut group: Vec<usize> = (0..n)
        .filter(|&i| {
            in_table(i, &states)
                && learning(&inputs[i])
                && inputs[i].pinned.is_none()
                && (inputs[i].fit.is_ok() || headroom[i].is_some())
        })
        .collect();
    if !group
        .iter()
        .any(|&i| inputs[i].fit.is_ok() || states[i].measured.is_some())
    {
        group.clear();
    }
    // Capacities at the target: running means over the steps in the group, and the noise of
    // each mean (relative standard deviation).
    let mut caps = vec![0.0f64; n];
    let mut cap_noise = vec![0.0f64; n];
    // This step's estimate is bound by the backend's own load (headroom, or a capped fit).
    let mut load_bound = vec![false; n];
    // The running means' weight for news (see below), and the spread of a running mean with
    // smoothing a: sd x sqrt(a / (2 - a)), relative to the mean `c`.
    let news_smoothing = (3.0 * p.capacity_smoothing).min(1.0);
    let mean_noise = |var: f64, c: f64| {
        let a = p.capacity_smoothing;
        (var * a / (2.0 - a)).sqrt() / c
    };
    // Under pressure (from the last step's means): missing the target, or loaded near capacity.
    let pressed: Vec<bool> = (0..n)
        .map(|i| {
            group.contains(&i)
                && (misses_target(&inputs[i])
                    || states[i]
                        .capacity
                        .zip(inputs[i].observed)
                        .is_some_and(|(c, o)| o.load >= PRESSURE_SHARE * c))
        })
        .collect();
    // Consecutive steps with no peer needing relief from this backend: pressed, or twice as
    // slow as it is.
    for i in 0..n {
        let needed = (0..n).any(|j| {
            j != i
                && (pressed[j]
                    || group.contains(&j)
                        && inputs[j]
                            .observed
                            .zip(inputs[i].observed)
                            .is_some_and(|(oj, oi)| oj.latency_ms > SLOWER_PEER * oi.latency_ms))
        });
        states[i].at_ease_steps = if needed {
            0
        } else {
            states[i].at_ease_steps.saturating_add(1)
        };
    }
    for i in 0..n {
        let (raw, bound, measured_now) = match &inputs[i].fit {
            Ok(f) => {
                let fitted = f.capacity_at(p.latency_target_ms);
                let limit = p.max_extrapolation * f.load_max;
                if fitted > limit && group.contains(&i) {
                    reasons[i].push(Reason::Extrapolation { fitted, limit });
                }
                (
                    Some(fitted.min(limit)),
                    fitted > limit,
                    fitted <= MEASURED_REACH * f.load_max,
                )
            }
            Err(_) => (headroom[i], headroom[i].is_some(), false),
        };
        load_bound[i] = bound;
        // Measured: a fit whose capacity lies within MEASURED_REACH of the highest load in the
        // window, so the load came near it. Anything else (headroom, a capped fit, a line
        // through a nearly flat latency extrapolated far past the loads seen) is weaker
        // evidence, and mostly evidence of the backend's own load: a capacity bound by it grows
        // with the weight it is given, so a weight it sets confirms itself and the load's
        // noise walks it (the stability run's small backends wandered between 49 and 62 for
        // minutes, between fits of a window that no longer held loaded samples and
        // headroom). Such an estimate only says the backend carries its load, which the
        // measurement already explains: the measured mean stays while the backend carries
        // no more than it, meets the target, and is not clearly faster than the measured
        // model predicts at its load (a backend that recovered from a slowdown is, and is
        // explored again).
        let remembered = match (states[i].measured, states[i].capacity, inputs[i].observed) {
            (Some(f), Some(c), Some(o)) if !measured_now && group.contains(&i) => {
                let predicted_ms = f.predict_latency_ms(o.load);
                (o.load <= c
                    && !misses_target(&inputs[i])
                    && o.latency_ms >= REMEMBERED_LATENCY_SHARE * predicted_ms)
                    .then_some((c, predicted_ms, o))
            }
            _ => None,
        };
        if let Some((c, predicted_ms, o)) = remembered {
            load_bound[i] = false;
            caps[i] = c;
            if let Some(var) = states[i].capacity_var {
                cap_noise[i] = mean_noise(var, c);
            }
            reasons[i].push(Reason::Remembered {
                capacity: c,
                load: o.load,
                latency_ms: o.latency_ms,
                predicted_ms,
            });
            continue;
        }
        states[i].measured = match &inputs[i].fit {
            Ok(f) if measured_now => Some(*f),
            _ => None,
        };
        // A learning backend that reached its knee (no fit, no headroom: it misses the target
        // while serving) keeps its capacity mean, falling toward the load it misses the target
        // at as news does; the overload rule below cuts it gently while it has one, and it
        // rejoins the group from there rather than from a fresh, optimistic estimate.
        if let (None, Some(c), Some(o)) = (
            raw,
            states[i].capacity,
            inputs[i].observed.filter(|_| misses_target(&inputs[i])),
        ) {
            if in_table(i, &states) && learning(&inputs[i]) && inputs[i].pinned.is_none() {
                states[i].capacity = Some(if o.load < c {
                    c + news_smoothing * (o.load - c)
                } else {
                    c
                });
                states[i].measured = None;
                continue;
            }
        }
        states[i].capacity = match raw {
            Some(raw) if group.contains(&i) => {
                // Falls count three times as much as rises when they are news: the backend
                // misses the latency target, or the new estimate is below NEWS_FALL of the
                // mean (a 5x slowdown; the stability run's noise rarely goes that far). A
                // backend losing capacity is relieved sooner than one gaining it is given
                // more. Not for falls within the noise: an asymmetric mean of a noisy estimate
                // settles below the estimate's mean, the more so the noisier it is, and that
                // bias handed the least noisy backend (the large pool) more than its share
                // (15/15/70% against the oracle's 20/20/60% in the capacity run).
                const NEWS_FALL: f64 = 0.7;
                let news = misses_target(&inputs[i]);
                let falls_as_news = |c: f64| raw < c && (news || raw < NEWS_FALL * c);
                // An estimate bound by the backend's own load grows with the weight it is
                // given: past its configured share, and with every peer at ease, more of it
                // would only move flows nobody needs moved, and the window's peak load (which
                // it follows) walks with the load's noise: the stability run's large backend
                // made one late 15% step after three minutes. The mean stays then, unless the
                // estimate falls as news.
                if let Some(c) = states[i].capacity.filter(|&c| {
                    load_bound[i]
                        && f64::from(inputs[i].current_weight) >= cfg_t[i]
                        && states[i].at_ease_steps >= EASE_STEPS
                        && !falls_as_news(c)
                }) {
                    if let Some(var) = states[i].capacity_var {
                        cap_noise[i] = mean_noise(var, c);
                    }
                    caps[i] = c;
                    reasons[i].push(Reason::ExplorationHeld {
                        capacity: c,
                        estimate: raw,
                    });
                    continue;
                }
                let c = states[i].capacity.map_or(raw, |c| {
                    let a = if falls_as_news(c) {
                        news_smoothing
                    } else {
                        p.capacity_smoothing
                    };
                    c + a * (raw - c)
                });
                let dev2 = states[i].capacity.map_or(0.0, |prev| (raw - prev).powi(2));
                let var = states[i]
                    .capacity_var
                    .map_or(dev2, |v| v + p.capacity_smoothing * (dev2 - v));
                states[i].capacity_var = Some(var);
                if c > 0.0 {
                    cap_noise[i] = mean_noise(var, c);
                }
                caps[i] = c;
                Some(c)
            }
            _ => None,
        };
        if states[i].capacity.is_none() {
            states[i].capacity_var = None;
            states[i].measured = None;
        }
    }
    let pool_cap: f64 = group.iter().map(|&i| caps[i]).sum();
    let group_cfg: f64 = group.iter().map(|&i| cfg_t[i]).sum();

    for i in 0..n {
        if inputs[i].current_weight >= table_weight(inputs[i].configured_weight) {
            states[i].ramping_back = false;
        }
    }
    let mut modes = vec![Mode::Hold; n];
    let mut targets: Vec<Option<f64>> = vec![None; n];
    for i in 0..n {
        let b = &inputs[i];
        let cur = f64::from(b.current_weight);
        if !b.health.serving() {
            modes[i] = Mode::Urgent;
            reasons[i].push(Reason::Health { status: b.health });
            continue;
        }
        if b.configured_weight == 0 {
            modes[i] = Mode::Urgent;
            reasons[i].push(Reason::ConfiguredZero);
            continue;
        }
        if states[i].drained_at.is_some() {
            // The model's drains are spread over steps within the disruption budget.
            modes[i] = if b.current_weight > 0 {
                Mode::Drain
            } else {
                Mode::Urgent
            };
            continue;
        }
        if let Some(w) = b.pinned {
            modes[i] = Mode::Urgent;
            reasons[i].push(Reason::Pinned { weight: w });
            continue;
        }
        if b.current_weight == 0
            && reasons[i]
                .iter()
                .any(|r| matches!(r, Reason::OutlierPending { .. }))
        {
            // Returning (after down, or added) as an outlier: no slow start until the outlier
            // is decided (drained, deferred or clean), or its floor share would suffer first.
            continue;
        }
        if b.current_weight == 0 {
            // Back in the table (after a drain, down, or added): slow start from the floor,
            // gradual from there.
            let w = (p.floor * cfg_t[i]).round().max(1.0);
            modes[i] = Mode::Gradual {
                target: w,
                learned: false,
            };
            reasons[i].push(Reason::SlowStart { weight: w as u32 });
            // A new start: the last learned direction says nothing about this one.
            let st = &mut states[i];
            (st.last_direction, st.reverse_steps, st.last_reversal) = (0, 0, None);
            st.ramping_back = true;
            continue;
        }
        if !learning(b) {
            modes[i] = Mode::Gradual {
                target: cfg_t[i],
                learned: false,
            };
            reasons[i].push(Reason::LearningOff);
            continue;
        }
        match &b.fit {
            Err(refusal) if headroom[i].is_none() || group.len() < 2 => {
                let steps = states[i].refused_steps;
                let peers_latency =
                    median(peer_obs(i, &states).iter().map(|o| o.latency_ms).collect());
                let overloaded = match (b.observed, peers_latency) {
                    (Some(o), Some(pl))
                        if o.latency_ms > p.latency_target_ms && pl <= p.latency_target_ms =>
                    {
                        Some((o.latency_ms, pl))
                    }
                    _ => None,
                };
                if let Some((latency_ms, peers_latency_ms)) = overloaded {
                    states[i].unsupported_steps = 0;
                    states[i].ramping_back = false;
                    let lo = p.floor * cfg_t[i];
                    // A backend that was learning (it has a capacity mean) has reached its
                    // knee: near it a queue's latency falls steeply with its load, and the
                    // probes' mean lags each cut by a few steps, so full cuts every step
                    // overshot (the capacity run's large backend went from 62% to 43% of the
                    // table in six steps, and the small ones took the overload). It is cut
                    // by sqrt(target / latency) at most every `hysteresis_steps`. Without a
                    // model ever (saturated from the start), the full step each time.
                    let learner = states[i].capacity.is_some();
                    let waiting = learner
                        && states[i]
                            .last_change
                            .is_some_and(|at| step < at + u64::from(p.hysteresis_steps.max(1)));
                    let ratio = if learner {
                        (p.latency_target_ms / latency_ms).sqrt()
                    } else {
                        0.0
                    };
                    let t = if waiting {
                        cur
                    } else {
                        (cur * ratio.max(1.0 - p.max_step_ratio)).max(lo)
                    };
                    reasons[i].push(Reason::FitRefused {
                        refusal: refusal.clone(),
                        steps,
                    });
                    if waiting {
                        reasons[i].push(Reason::Overloaded {
                            latency_ms,
                            peers_latency_ms,
                            target: t,
                        });
                    } else if t <= cur - 0.5 {
                        targets[i] = Some(t);
                        modes[i] = Mode::Gradual {
                            target: t,
                            learned: true,
                        };
                        reasons[i].push(Reason::Overloaded {
                            latency_ms,
                            peers_latency_ms,
                            target: t,
                        });
                    } else {
                        reasons[i].push(Reason::AtFloor { floor_weight: lo });
                    }
                } else if states[i].ramping_back
                    && matches!(refusal, Refusal::TooFewSamples { .. })
                    && cur < cfg_t[i]
                    && b.observed
                        .is_none_or(|o| o.latency_ms <= p.latency_target_ms)
                {
                    // Back from a slow start with its window still filling (cleared while it
                    // was down): without a model it returns to where a backend without one
                    // starts, gradually; holding it at the floor until the window refilled
                    // kept it there for half a minute.
                    modes[i] = Mode::Gradual {
                        target: cfg_t[i],
                        learned: false,
                    };
                    reasons[i].push(Reason::FitRefused {
                        refusal: refusal.clone(),
                        steps,
                    });
                    reasons[i].push(Reason::RampBack { weight: cfg_t[i] });
                } else if states[i].unsupported_steps >= p.stale_steps {
                    modes[i] = Mode::Gradual {
                        target: cfg_t[i],
                        learned: false,
                    };
                    reasons[i].push(Reason::Stale { steps });
                } else {
                    reasons[i].push(Reason::FitRefused {
                        refusal: refusal.clone(),
                        steps,
                    });
                }
            }
            Ok(_) if group.len() < 2 => reasons[i].push(Reason::NoPeers {
                fitted: group.len(),
            }),
            _ if pool_cap <= 0.0 => reasons[i].push(Reason::NoCapacity),
            fit => {
                if let (Err(refusal), Some(capacity)) = (fit, headroom[i]) {
                    reasons[i].push(Reason::Headroom {
                        refusal: refusal.clone(),
                        capacity_estimate: capacity,
                    });
                }
                let raw = group_cfg * caps[i] / pool_cap;
                let lo = p.floor * cfg_t[i];
                let mut hi = p.ceiling * cfg_t[i];
                if b.health == HealthStatus::Probation {
                    hi = hi.min(cfg_t[i]);
                    reasons[i].push(Reason::Probation);
                }
                let t = raw.clamp(lo, hi);
                if raw < lo {
                    reasons[i].push(Reason::AtFloor { floor_weight: lo });
                } else if raw > hi && b.health != HealthStatus::Probation {
                    reasons[i].push(Reason::AtCeiling { ceiling_weight: hi });
                }
                targets[i] = Some(t);
                let dir: i8 = if t > cur { 1 } else { -1 };
                let st = &mut states[i];
                // The deadband widens to twice the noise of the capacity estimate: a target
                // that moves within the estimate's own noise is not a reason to move flows.
                let mut deadband = p.deadband.max(p.deadband_noise_factor * cap_noise[i]);
                if load_bound[i] && !(t < cur && misses_target(b)) {
                    deadband = deadband.max(p.load_bound_deadband);
                }
                let deadband = deadband.min(0.5);
                if (t - cur).abs() <= deadband * cur || (t - cur).abs() < 0.5 {
                    st.reverse_steps = 0;
                    reasons[i].push(Reason::Deadband {
                        target: t,
                        current: b.current_weight,
                        deadband,
                    });
                } else if st.last_direction != 0 && dir != st.last_direction {
                    st.reverse_steps += 1;
                    // Not held: a cut of a backend missing the target (safety before
                    // steadiness). A raise can always wait: cutting the others raises its share
                    // anyway. (Exempting any large cut as well let drifting capacity estimates
                    // turn small backends twice a minute in the stability run.)
                    let urgent = dir < 0 && misses_target(b);
                    let hold_until = st
                        .last_reversal
                        .map(|at| at + u64::from(p.reversal_hold_steps))
                        .filter(|&until| step < until && !urgent);
                    if st.reverse_steps < p.hysteresis_steps {
                        reasons[i].push(Reason::Hysteresis {
                            target: t,
                            steps: st.reverse_steps,
                            need: p.hysteresis_steps,
                        });
                    } else if let Some(until_step) = hold_until {
                        reasons[i].push(Reason::ReversalHold {
                            target: t,
                            since_step: st.last_reversal.unwrap_or(0),
                            until_step,
                        });
                    } else {
                        modes[i] = Mode::Gradual {
                            target: t,
                            learned: true,
                        };
                    }
                } else {
                    st.reverse_steps = 0;
                    modes[i] = Mode::Gradual {
                        target: t,
                        learned: true,
                    };
                }
            }
        }
    }

    // --- Proposed weights: urgent ones final, gradual ones step-limited. ---
    let current: Vec<u32> = inputs.iter().map(|b| b.current_weight).collect();
    let mut baseline = current.clone(); // current with the urgent changes applied
    let mut proposed = current.clone();
    for i in 0..n {
        let b = &inputs[i];
        match modes[i] {
            Mode::Urgent => {
                let w = if !in_table(i, &states) {
                    0
                } else if let Some(pw) = b.pinned {
                    table_weight(pw)
                } else {
                    0
                };
                baseline[i] = w;
                proposed[i] = w;
            }
            Mode::Drain => proposed[i] = 0,
            Mode::Gradual { target, learned: _ } => {
                let cur = f64::from(b.current_weight);
                let next = if b.current_weight == 0 {
                    target
                } else {
                    let lo = cur * (1.0 - p.max_step_ratio);
                    let hi = cur * (1.0 + p.max_step_ratio);
                    if target < lo || target > hi {
                        reasons[i].push(Reason::StepLimited {
                            wanted: target,
                            max_step_ratio: p.max_step_ratio,
                        });
                    }
                    let mut next = target.clamp(lo, hi).round();
                    // Integer weights: always make at least one unit of progress.
                    if next == cur && (target - cur).abs() >= 0.5 {
                        next = cur + (target - cur).signum();
                    }
                    next
                };
                proposed[i] = next.clamp(0.0, f64::from(u32::MAX)) as u32;
            }
            Mode::Hold => {}
        }
    }

    // --- Disruption budget: gradual changes move at most `slots_budget` slots. ---
    let budget = p.slots_budget();
    let mut final_w = proposed.clone();
    let mut table_error = None;
    let mut slots_moved = 0;
    let mut slots_moved_gradual = 0;
    if proposed != current {
        let built = table(&inputs, &current, p.table_size).and_then(|t_cur| {
            let t_base = if baseline == current {
                t_cur.clone()
            } else {
                table(&inputs, &baseline, p.table_size)?
            };
            Ok((t_cur, t_base))
        });
        match built {
            Ok((t_cur, t_base)) => {
                let interp = |a: f64| -> Vec<u32> {
                    (0..n)
                        .map(|i| {
                            let (b0, b1) = (f64::from(baseline[i]), f64::from(proposed[i]));
                            (b0 + a * (b1 - b0)).round() as u32
                        })
                        .collect()
                };
                // Slots whose flows a change disturbs: those that held a backend. A slot that
                // drops packets today (an empty table) disturbs nothing when it gets one; counting
                // those kept a pool whose every backend had gone down and come back at an empty
                // table for good (any start moved all of it, and the budget's share rounded to
                // nothing).
                let moved = |w: &[u32]| -> Result<(usize, Vec<u32>), String> {
                    let t = table(&inputs, w, p.table_size)?;
                    let disturbed = t_base
                        .iter()
                        .zip(&t)
                        .filter(|&(a, b)| *a != 0 && a != b)
                        .count();
                    Ok((disturbed, t))
                };
                let result = moved(&proposed).and_then(|(full, t_full)| {
                    if full <= budget {
                        return Ok((proposed.clone(), t_full, full));
                    }
                    // The largest fraction of the step within the budget. The slots a weight
                    // change moves grow about in proportion to its size, so each try scales
                    // the fraction by budget / moved (a little under, to land inside), and
                    // the first try within 90% of the budget is taken: a few table builds
                    // rather than a bisection's ten.
                    let (mut lo, mut hi) = (0.0f64, 1.0f64);
                    let mut best = (baseline.clone(), t_base.clone(), 0);
                    let mut guess = 0.97 * budget as f64 / full as f64;
                    for _ in 0..BUDGET_TRIES {
                        let a = guess.clamp(lo + (hi - lo) * 0.05, hi - (hi - lo) * 0.05);
                        let w = interp(a);
                        let (m, t) = moved(&w)?;
                        if m <= budget {
                            lo = a;
                            best = (w, t, m);
                            if m as f64 >= 0.9 * budget as f64 {
                                break;
                            }
                        } else {
                            hi = a;
                        }
                        guess = a * 0.97 * budget as f64 / (m.max(1)) as f64;
                    }
                    for i in 0..n {
                        if matches!(modes[i], Mode::Gradual { .. } | Mode::Drain)
                            && proposed[i] != baseline[i]
                        {
                            reasons[i].push(Reason::BudgetLimited {
                                fraction_applied: lo,
                                slots_budget: budget,
                            });
                        }
                    }
                    Ok(best)
                });
                match result {
                    Ok((w, t_new, m)) => {
                        final_w = w;
                        slots_moved = maglev::slots_changed(&t_cur, &t_new);
                        slots_moved_gradual = m;
                    }
                    Err(e) => table_error = Some(e),
                }
            }
            Err(e) => table_error = Some(e),
        }
        if table_error.is_some() {
            // Inputs the table builder rejects (duplicate address or id, id 0, bad size):
            // nothing gradual moves; urgent changes still apply.
            final_w = baseline.clone();
        }
    }

    // --- Results, state, audit events. ---
    let mut backends = Vec::with_capacity(n);
    let mut events = Vec::new();
    for i in 0..n {
        let b = &inputs[i];
        let (from, to) = (current[i], final_w[i]);
        let st = &mut states[i];
        if let (Mode::Gradual { learned, target }, true) = (modes[i], to != from) {
            if learned {
                let dir: i8 = if to > from { 1 } else { -1 };
                if dir != st.last_direction {
                    st.reverse_steps = 0;
                    if st.last_direction != 0 {
                        st.last_reversal = Some(step);
                    }
                }
                st.last_direction = dir;
                let (capacity_at_target, pool_capacity_at_target) = (caps[i], pool_cap);
                reasons[i].insert(
                    0,
                    if to > from {
                        Reason::Raised {
                            from,
                            to,
                            target,
                            capacity_at_target,
                            pool_capacity_at_target,
                        }
                    } else {
                        Reason::Cut {
                            from,
                            to,
                            target,
                            capacity_at_target,
                            pool_capacity_at_target,
                        }
                    },
                );
            }
        }
        if to != from {
            st.last_change = Some(step);
        }
        if modes[i] == Mode::Drain {
            reasons[i].push(Reason::DrainStep {
                remaining_weight: to,
            });
        }
        let kind = if newly_drained[i] {
            Some(AuditKind::Drain)
        } else if undrained[i] {
            Some(AuditKind::Undrain)
        } else if to != from && !matches!(modes[i], Mode::Urgent) {
            Some(AuditKind::Reweight)
        } else if newly_suspected[i] {
            Some(AuditKind::Suspect)
        } else {
            None
        };
        if let Some(kind) = kind {
            events.push(AuditEvent {
                step,
                kind,
                backend: b.id,
                addr: b.addr,
                from_weight: reported[i],
                to_weight: to,
                configured_weight: b.configured_weight,
                reasons: reasons[i].clone(),
                inputs: b.clone(),
                latency_target_ms: p.latency_target_ms,
            });
        }
        let fit = b.fit.as_ref().ok().copied();
        backends.push(BackendDecision {
            id: b.id,
            addr: b.addr,
            configured_weight: b.configured_weight,
            previous_weight: reported[i],
            weight: to,
            target_weight: targets[i],
            drained: st.drained_at.is_some(),
            health: b.health,
            fit,
            refusal: b.fit.as_ref().err().cloned(),
            capacity_at_target: fit.map(|f| f.capacity_at(p.latency_target_ms)),
            predicted_latency_ms: fit
                .zip(b.observed)
                .map(|(f, o)| f.predict_latency_ms(o.load)),
            observed: b.observed,
            reasons: std::mem::take(&mut reasons[i]),
        });
    }
    Decision {
        step,
        backends,
        slots_moved,
        slots_moved_gradual,
        slots_budget: budget,
        table_size: p.table_size,
        table_error,
        events,
        state: PolicyState {
            step,
            backends: inputs.iter().map(|b| b.id).zip(states).collect(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;
    use std::time::Instant;

    /// Deterministic noise in [-1, 1] (splitmix64 of the index and a seed).
    fn noise(i: u64, seed: u64) -> f64 {
        let mut z = i
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .wrapping_add(seed.wrapping_mul(0xbf58_476d_1ce4_e5b9));
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    }

    /// Triangle wave in [-1, 1] with the given period.
    fn tri(k: u64, period: u64) -> f64 {
        let x = (k % period) as f64 / period as f64;
        if x < 0.5 {
            4.0 * x - 1.0
        } else {
            3.0 - 4.0 * x
        }
    }

    /// M/M/1 latency (ms) at `load` for service rate `mu`, with ±`noise_frac` relative noise;
    /// at or beyond capacity, the 1 s probe timeout.
    fn mm1_ms(mu: f64, load: f64, noise_frac: f64, i: u64, seed: u64) -> f64 {
        if load >= mu {
            return 1000.0;
        }
        (1000.0 / (mu - load) * (1.0 + noise_frac * noise(i, seed))).min(1000.0)
    }

    fn sample(t: f64, load: f64, latency_ms: f64) -> Sample {
        Sample {
            t_secs: t,
            load,
            latency_ms,
            errors: 0.0,
            syn_retries_per_s: 0.0,
            rsts_per_s: 0.0,
        }
    }

    /// `n` samples of an M/M/1 backend with loads swept between 20% and 80% of `mu`.
    fn series(mu: f64, n: u64, seed: u64) -> Vec<Sample> {
        (0..n)
            .map(|k| {
                let load = mu * (0.5 + 0.3 * tri(k, 24));
                sample(k as f64, load, mm1_ms(mu, load, 0.02, k, seed))
            })
            .collect()
    }

    fn addr(id: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 0, (id >> 8) as u8, id as u8))
    }

    fn input(id: u32, configured: u32, fit: Result<Fit, Refusal>) -> BackendInput {
        BackendInput {
            id,
            addr: addr(id),
            configured_weight: configured,
            current_weight: table_weight(configured),
            pinned: None,
            learning: true,
            health: HealthStatus::Up,
            fit,
            observed: None,
            peak_load: None,
            probe_timeout_ms: None,
        }
    }

    /// An exact M/M/1 model of service rate `mu`.
    fn mm1_fit(mu: f64) -> Fit {
        Fit {
            intercept: mu,
            slope: -1.0,
            r2: 0.99,
            rmse: 0.1,
            n: 100,
            load_min: 0.2 * mu,
            load_max: 0.8 * mu,
            load_mean: 0.5 * mu,
            load_cv: 0.35,
        }
    }

    fn observed(load: f64, latency_ms: f64) -> Observed {
        Observed {
            load,
            latency_ms,
            error_rate: 0.0,
            syn_retries_per_s: 0.0,
            rsts_per_s: 0.0,
            n: 10,
        }
    }

    /// A prime table size that keeps table builds cheap in unoptimised tests.
    const SMALL_M: u32 = 10_007;

    fn policy() -> WeightPolicy {
        WeightPolicy {
            table_size: SMALL_M,
            ..WeightPolicy::default()
        }
    }

    /// `policy()` without a disruption budget, for tests about something else.
    fn unbudgeted() -> WeightPolicy {
        WeightPolicy {
            disruption_budget: 1.0,
            ..policy()
        }
    }

    /// Feeds each decision's weights and state back; returns every decision.
    fn run(
        inputs: &mut [BackendInput],
        p: &WeightPolicy,
        state: &mut PolicyState,
        steps: usize,
    ) -> Vec<Decision> {
        (0..steps)
            .map(|_| {
                let d = decide(inputs, p, state);
                apply(inputs, &d);
                *state = d.state.clone();
                d
            })
            .collect()
    }

    fn apply(inputs: &mut [BackendInput], d: &Decision) {
        for b in inputs.iter_mut() {
            b.current_weight = d.backends.iter().find(|x| x.id == b.id).unwrap().weight;
        }
    }

    fn weight(d: &Decision, id: u32) -> u32 {
        d.backends.iter().find(|b| b.id == id).unwrap().weight
    }

    fn reasons(d: &Decision, id: u32) -> &[Reason] {
        &d.backends.iter().find(|b| b.id == id).unwrap().reasons
    }

    #[test]
    fn m_m_1_series_fit_recovers_capacity_and_weights_come_out_proportional() {
        let mus = [100.0, 100.0, 300.0];
        let fits: Vec<Fit> = mus
            .iter()
            .enumerate()
            .map(|(i, &mu)| fit(&series(mu, 120, i as u64)).expect("a clean M/M/1 series fits"))
            .collect();
        for (f, mu) in fits.iter().zip(mus) {
            println!(
                "mu {mu}: capacity {:.1} slope {:.3} R² {:.3} n {} load {:.0}..{:.0}",
                f.capacity(),
                f.slope,
                f.r2,
                f.n,
                f.load_min,
                f.load_max
            );
            assert!((f.capacity() / mu - 1.0).abs() < 0.10, "{f:?}");
            assert!((f.slope + 1.0).abs() < 0.10, "{f:?}");
            assert!(f.r2 > 0.9);
        }
        // A latency target of 250 ms (4/s) puts capacities at 96, 96 and 296: about 1:1:3.
        let p = WeightPolicy {
            latency_target_ms: 250.0,
            ..policy()
        };
        let mut inputs: Vec<BackendInput> = fits
            .iter()
            .enumerate()
            .map(|(i, f)| input(i as u32 + 1, 100, Ok(*f)))
            .collect();
        let mut state = PolicyState::default();
        let ds = run(&mut inputs, &p, &mut state, 40);
        // Converged: no change over the last 10 steps, and reached well before.
        let settled_at = ds.iter().rposition(|d| d.changed()).map_or(0, |i| i + 1);
        println!("settled after {settled_at} steps");
        assert!(settled_at <= 25, "still moving at step {settled_at}");
        let last = ds.last().unwrap();
        let w: Vec<f64> = (1..=3).map(|id| f64::from(weight(last, id))).collect();
        println!("weights {w:?}");
        let want = [96.0 / 96.0, 96.0 / 96.0, 296.0 / 96.0];
        for (wi, want) in w.iter().zip(want) {
            assert!((wi / w[0] / want - 1.0).abs() < 0.10, "{w:?}");
        }
        assert!((w[2] / w[1] / 3.0 - 1.0).abs() < 0.10);
        // Every step within the step limit.
        for d in &ds {
            for b in &d.backends {
                let (a, z) = (f64::from(b.previous_weight), f64::from(b.weight));
                assert!((z - a).abs() <= p.max_step_ratio * a + 1.0, "{b:?}");
            }
        }
    }

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

    #[test]
    fn refused_fit_keeps_the_configured_weight_and_says_why() {
        let p = policy();
        let inputs = vec![
            input(1, 100, Ok(mm1_fit(100.0))),
            input(2, 100, Ok(mm1_fit(300.0))),
            input(
                3,
                100,
                Err(Refusal::NoLoadVariation {
                    cv: 0.01,
                    need: 0.1,
                }),
            ),
        ];
        let d = decide(&inputs, &p, &PolicyState::default());
        assert_eq!(weight(&d, 3), 10_000);
        assert!(matches!(reasons(&d, 3)[0], Reason::FitRefused { .. }));
        assert!(reasons(&d, 3)[0].to_string().contains("load variation"));
        // The two with a model share their own configured total.
        assert!(weight(&d, 1) < 10_000 && weight(&d, 2) > 10_000);
        // Only one backend with a model: nothing to compare with, held.
        let one = vec![
            input(1, 100, Ok(mm1_fit(100.0))),
            input(2, 100, Err(Refusal::TooFewSamples { have: 3, need: 30 })),
        ];
        let d = decide(&one, &p, &PolicyState::default());
        assert_eq!(d.weights(), vec![(1, 10_000), (2, 10_000)]);
        assert_eq!(reasons(&d, 1), &[Reason::NoPeers { fitted: 1 }]);
        assert!(d.events.is_empty());
    }

    #[test]
    fn stale_learned_weights_return_to_configured() {
        let p = WeightPolicy {
            stale_steps: 3,
            ..policy()
        };
        let refused = || Err(Refusal::PoorFit { r2: 0.1, need: 0.6 });
        let mut inputs = vec![input(1, 100, refused()), input(2, 100, refused())];
        inputs[0].current_weight = 5_000;
        let mut state = PolicyState::default();
        let ds = run(&mut inputs, &p, &mut state, 10);
        assert_eq!(weight(&ds[0], 1), 5_000, "held at first");
        assert!(matches!(reasons(&ds[2], 1)[0], Reason::Stale { steps: 3 }));
        assert_eq!(weight(&ds[9], 1), 10_000, "back to configured");
    }

    #[test]
    fn pinned_weight_applies_at_once_and_learning_off_returns_to_configured() {
        let p = unbudgeted();
        let mut inputs = vec![
            input(1, 100, Ok(mm1_fit(100.0))),
            input(2, 100, Ok(mm1_fit(100.0))),
            input(3, 100, Ok(mm1_fit(1000.0))),
        ];
        inputs[0].pinned = Some(300);
        let d = decide(&inputs, &p, &PolicyState::default());
        assert_eq!(weight(&d, 1), 30_000);
        assert_eq!(reasons(&d, 1), &[Reason::Pinned { weight: 300 }]);
        // 2 and 3 learn; 3 rises within the step limit.
        assert_eq!(weight(&d, 3), 12_500);
        // Learning off for the VIP: back to configured, gradually.
        let off = WeightPolicy {
            learning: false,
            ..p.clone()
        };
        inputs[0].pinned = None;
        apply(&mut inputs, &d);
        let mut state = d.state.clone();
        let ds = run(&mut inputs, &off, &mut state, 12);
        assert!(reasons(&ds[0], 3).contains(&Reason::LearningOff));
        assert_eq!(
            ds.last().unwrap().weights(),
            vec![(1, 10_000), (2, 10_000), (3, 10_000)]
        );
    }

    #[test]
    fn floor_and_ceiling_bound_learned_weights() {
        let p = WeightPolicy {
            ceiling: 2.0,
            ..unbudgeted()
        };
        // Capacities at the 100 ms target: 10, 100 and 1000 per second.
        let mut inputs = vec![
            input(1, 100, Ok(mm1_fit(20.0))),
            input(2, 100, Ok(mm1_fit(110.0))),
            input(3, 100, Ok(mm1_fit(1010.0))),
        ];
        let mut state = PolicyState::default();
        let ds = run(&mut inputs, &p, &mut state, 30);
        let last = ds.last().unwrap();
        assert_eq!(weight(last, 1), 2_500, "floor: 0.25 × configured");
        // Approached from below, the ceiling is reached to within the deadband.
        let top = weight(last, 3);
        assert!(
            (19_000..=20_000).contains(&top),
            "ceiling: 2 × configured: {top}"
        );
        assert!(reasons(last, 1).contains(&Reason::AtFloor {
            floor_weight: 2_500.0
        }));
        assert!(reasons(last, 3).contains(&Reason::AtCeiling {
            ceiling_weight: 20_000.0
        }));
        for d in &ds {
            for b in &d.backends {
                assert!((2_500..=40_000).contains(&b.weight));
            }
        }
    }

    #[test]
    fn deadband_ignores_small_changes() {
        let p = policy();
        // Capacities at target 200 and 206: targets within 5% of the equal weights.
        let inputs = vec![
            input(1, 100, Ok(mm1_fit(210.0))),
            input(2, 100, Ok(mm1_fit(216.0))),
        ];
        let d = decide(&inputs, &p, &PolicyState::default());
        assert!(!d.changed());
        assert!(matches!(reasons(&d, 1)[0], Reason::Deadband { .. }));
        assert!(reasons(&d, 1)[0].to_string().contains("within 5%"));
        assert_eq!(d.slots_moved, 0);
    }

    /// Flips between two sets of models every step; returns how often backend 1's weight
    /// changed direction.
    fn reversals(p: &WeightPolicy) -> usize {
        let mut inputs = vec![
            input(1, 100, Ok(mm1_fit(100.0))),
            input(2, 100, Ok(mm1_fit(100.0))),
        ];
        let mut state = PolicyState::default();
        let mut dirs = Vec::new();
        for k in 0..20 {
            let (a, b) = if k % 2 == 0 {
                (160.0, 100.0)
            } else {
                (100.0, 160.0)
            };
            inputs[0].fit = Ok(mm1_fit(a));
            inputs[1].fit = Ok(mm1_fit(b));
            let d = decide(&inputs, p, &state);
            let (from, to) = (inputs[0].current_weight, weight(&d, 1));
            if to != from {
                dirs.push(to > from);
            }
            apply(&mut inputs, &d);
            state = d.state;
        }
        dirs.windows(2).filter(|w| w[0] != w[1]).count()
    }

    #[test]
    fn hysteresis_keeps_oscillating_input_from_flipping_weights() {
        let without = reversals(&WeightPolicy {
            hysteresis_steps: 1,
            reversal_hold_steps: 0,
            capacity_smoothing: 1.0,
            deadband_noise_factor: 0.0,
            ..policy()
        });
        let with = reversals(&WeightPolicy {
            reversal_hold_steps: 0,
            capacity_smoothing: 1.0,
            deadband_noise_factor: 0.0,
            ..policy()
        });
        println!("direction reversals over 20 oscillating steps: {without} without hysteresis, {with} with");
        assert!(without >= 10);
        assert_eq!(with, 0);
    }

    #[test]
    fn a_weight_turns_at_most_once_per_reversal_hold() {
        // Input that flips every 4 steps gets past a 3-step hysteresis; the hold lets the
        // weight turn at most once per 10 steps. The targets differ by about 7%: past the 5%
        // deadband, within what the hold applies to (a change beyond four deadbands is not
        // held).
        let flipping = |p: &WeightPolicy, hi: f64| {
            let mut inputs = vec![
                input(1, 100, Ok(mm1_fit(100.0))),
                input(2, 100, Ok(mm1_fit(100.0))),
            ];
            let mut state = PolicyState::default();
            let mut turns = Vec::new();
            let mut last = 0i8;
            for k in 0..40u64 {
                let (a, b) = if (k / 4) % 2 == 0 {
                    (hi, 110.0)
                } else {
                    (110.0, hi)
                };
                inputs[0].fit = Ok(mm1_fit(a));
                inputs[1].fit = Ok(mm1_fit(b));
                let d = decide(&inputs, p, &state);
                let (from, to) = (inputs[0].current_weight, weight(&d, 1));
                if to != from {
                    let dir = if to > from { 1 } else { -1 };
                    if last != 0 && dir != last {
                        turns.push(k);
                    }
                    last = dir;
                }
                apply(&mut inputs, &d);
                state = d.state;
            }
            turns
        };
        let base = WeightPolicy {
            hysteresis_steps: 1,
            capacity_smoothing: 1.0,
            deadband_noise_factor: 0.0,
            ..policy()
        };
        let free = flipping(
            &WeightPolicy {
                reversal_hold_steps: 0,
                ..base.clone()
            },
            125.0,
        );
        let held_policy = WeightPolicy {
            reversal_hold_steps: 10,
            ..base
        };
        let held = flipping(&held_policy, 125.0);
        println!("turns without a hold at steps {free:?}, with a 10-step hold at {held:?}");
        assert!(free.len() >= 8, "{free:?}");
        assert!(!held.is_empty(), "the weight still turns: {held:?}");
        assert!(held.windows(2).all(|w| w[1] - w[0] >= 10), "{held:?}");
        // Targets twice apart are held too: only a backend missing the latency target is cut
        // past the hold.
        let far = flipping(&held_policy, 220.0);
        println!("with targets far apart: turns at {far:?}");
        assert!(far.windows(2).all(|w| w[1] - w[0] >= 10), "{far:?}");
    }

    #[test]
    fn fitted_capacities_are_limited_to_what_the_load_shows() {
        // Backend 1's line extrapolates to 990/s at the target, but it was never seen above
        // 80/s: taken as 160/s (max_extrapolation 2), so it gets 160 / (160 + 90) of the pool,
        // not 990 / (990 + 90).
        let p = unbudgeted();
        let mut wide = mm1_fit(1000.0);
        (wide.load_min, wide.load_max, wide.load_mean) = (20.0, 80.0, 50.0);
        let inputs = vec![input(1, 1, Ok(wide)), input(2, 1, Ok(mm1_fit(100.0)))];
        let d = decide(&inputs, &p, &PolicyState::default());
        assert!(reasons(&d, 1).iter().any(|r| matches!(
            r,
            Reason::Extrapolation { fitted, limit } if (*fitted - 990.0).abs() < 1e-6 && (*limit - 160.0).abs() < 1e-9
        )), "{:?}", reasons(&d, 1));
        let target = d.backends[0].target_weight.unwrap();
        assert!((target - 200.0 * 160.0 / 250.0).abs() < 1e-6, "{target}");
    }

    #[test]
    fn noisy_capacity_estimates_widen_the_deadband() {
        // Backend 1's estimate alternates ±30% around the steady 100 of backend 2: after a
        // warm-up the weights stay where they are, held by a deadband wider than 5%.
        let p = WeightPolicy {
            hysteresis_steps: 1,
            reversal_hold_steps: 0,
            ..unbudgeted()
        };
        let mut inputs = vec![
            input(1, 100, Ok(mm1_fit(110.0))),
            input(2, 100, Ok(mm1_fit(110.0))),
        ];
        let mut state = PolicyState::default();
        let mut changes = 0;
        let mut widest: f64 = 0.0;
        for k in 0..60 {
            let mu = 10.0 + if k % 2 == 0 { 130.0 } else { 70.0 };
            let mut f = mm1_fit(mu);
            (f.load_max, f.load_mean) = (200.0, 100.0);
            inputs[0].fit = Ok(f);
            let d = decide(&inputs, &p, &state);
            if k >= 20 && d.changed() {
                changes += 1;
            }
            for r in reasons(&d, 1) {
                if let Reason::Deadband { deadband, .. } = r {
                    widest = widest.max(*deadband);
                }
            }
            apply(&mut inputs, &d);
            state = d.state;
        }
        println!("changes after the warm-up: {changes}; widest deadband {widest:.3}");
        assert_eq!(changes, 0);
        assert!(widest > p.deadband, "{widest}");
    }

    #[test]
    fn capacities_are_smoothed_across_steps() {
        // Capacity estimates alternating 150/50 against a steady 100: with smoothing the
        // target swings far less than the raw estimates do.
        let swing = |smoothing: f64| {
            let p = WeightPolicy {
                capacity_smoothing: smoothing,
                ..unbudgeted()
            };
            let mut inputs = vec![
                input(1, 100, Ok(mm1_fit(110.0))),
                input(2, 100, Ok(mm1_fit(110.0))),
            ];
            let mut state = PolicyState::default();
            let mut targets = Vec::new();
            for k in 0..30 {
                inputs[0].fit = Ok(mm1_fit(if k % 2 == 0 { 160.0 } else { 60.0 }));
                let d = decide(&inputs, &p, &state);
                targets.push(d.backends[0].target_weight.unwrap());
                state = d.state;
            }
            let tail = &targets[10..];
            tail.iter().cloned().fold(f64::MIN, f64::max)
                - tail.iter().cloned().fold(f64::MAX, f64::min)
        };
        let (raw, smoothed) = (swing(1.0), swing(0.2));
        println!("target swing: {raw:.1} raw, {smoothed:.1} smoothed");
        assert!(smoothed < 0.4 * raw, "raw {raw}, smoothed {smoothed}");
    }

    #[test]
    fn decisions_are_deterministic_and_ignore_input_order() {
        let p = policy();
        let mut inputs = vec![
            input(3, 100, Ok(mm1_fit(300.0))),
            input(1, 50, Ok(mm1_fit(100.0))),
            input(2, 100, Err(Refusal::TooFewSamples { have: 1, need: 30 })),
            input(4, 200, Ok(mm1_fit(150.0))),
        ];
        inputs[1].observed = Some(observed(40.0, 20.0));
        inputs[3].observed = Some(observed(60.0, 11.0));
        let state = PolicyState::default();
        let a = decide(&inputs, &p, &state);
        let b = decide(&inputs, &p, &state);
        inputs.reverse();
        inputs.swap(0, 2);
        let c = decide(&inputs, &p, &state);
        assert_eq!(a, b);
        assert_eq!(a, c);
        assert_eq!(
            serde_json::to_string(&a).unwrap(),
            serde_json::to_string(&c).unwrap()
        );
        assert_eq!(
            a.backends.iter().map(|b| b.id).collect::<Vec<_>>(),
            vec![1, 2, 3, 4]
        );
    }

    /// Four backends with models; `slow` of them now answer 20× slower than predicted.
    fn outlier_pool(slow: u32, p: &WeightPolicy) -> Vec<Decision> {
        let mut inputs: Vec<BackendInput> = (1..=4)
            .map(|id| {
                let mut b = input(id, 100, Ok(mm1_fit(100.0)));
                b.observed = Some(observed(50.0, 20.0));
                b
            })
            .collect();
        for b in inputs.iter_mut().take(slow as usize) {
            // Predicted 20 ms at load 50; observed up to 400 ms.
            b.observed = Some(observed(50.0, 300.0 + 20.0 * f64::from(b.id)));
        }
        let mut state = PolicyState::default();
        run(&mut inputs, p, &mut state, p.outlier_steps as usize + 12)
    }

    #[test]
    fn a_backend_drained_for_latency_returns_only_once_it_meets_the_target() {
        let p = policy();
        let mut inputs: Vec<BackendInput> = (1..=4)
            .map(|id| {
                let mut b = input(id, 100, Ok(mm1_fit(100.0)));
                b.observed = Some(observed(50.0, 20.0));
                b
            })
            .collect();
        inputs[0].observed = Some(observed(50.0, 400.0));
        let mut state = PolicyState::default();
        let ds = run(&mut inputs, &p, &mut state, p.outlier_steps as usize);
        assert!(ds.last().unwrap().backends[0].drained);
        // Unloaded it answers in 120 ms: under 10x its peers (no outlier), over the 100 ms
        // target: still slow, so it stays out past min_drain_steps.
        inputs[0].observed = Some(observed(0.0, 120.0));
        let ds = run(&mut inputs, &p, &mut state, 3 * p.min_drain_steps as usize);
        assert!(ds.iter().all(|d| d.backends[0].drained));
        // Fast again: back after outlier_steps clean steps, on a slow start.
        inputs[0].observed = Some(observed(0.0, 20.0));
        let ds = run(&mut inputs, &p, &mut state, p.outlier_steps as usize);
        assert!(!ds.last().unwrap().backends[0].drained);
        assert!(matches!(
            reasons(ds.last().unwrap(), 1)[0],
            Reason::Undrained { .. }
        ));
    }

    #[test]
    fn outliers_are_drained_within_the_pool_share() {
        let p = policy();
        let ds = outlier_pool(3, &p);
        // Pending for outlier_steps - 1 steps, then drained: the worst one only (0.34 of 4).
        assert!(matches!(
            reasons(&ds[0], 1)[0],
            Reason::OutlierPending {
                steps: 1,
                need: 3,
                ..
            }
        ));
        let at = p.outlier_steps as usize - 1;
        let drained: Vec<u32> = ds[at]
            .backends
            .iter()
            .filter(|b| b.drained)
            .map(|b| b.id)
            .collect();
        assert_eq!(drained, vec![3], "the worst outlier, and only one");
        // Out of the table over several steps, each within the disruption budget (a quarter
        // of the table is five times the budget).
        let w: Vec<u32> = ds[at..].iter().map(|d| weight(d, 3)).collect();
        assert!(
            w[0] > 0 && w[0] < table_weight(100),
            "first drain step {w:?}"
        );
        assert!(
            w.windows(2).all(|p| p[1] <= p[0]),
            "drain never reverses: {w:?}"
        );
        assert_eq!(*w.last().unwrap(), 0, "drained to 0 in the end: {w:?}");
        let steps_to_zero = w.iter().position(|&x| x == 0).unwrap() + 1;
        assert!(steps_to_zero >= 4, "spread over steps: {w:?}");
        for d in &ds {
            assert!(d.slots_moved_gradual <= d.slots_budget, "{d:?}");
        }
        assert!(reasons(&ds[at], 3)
            .iter()
            .any(|r| matches!(r, Reason::DrainStep { .. })));
        println!("drain weights per step: {w:?}");
        let ev: Vec<_> = ds[at]
            .events
            .iter()
            .filter(|e| e.kind == AuditKind::Drain)
            .collect();
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].backend, 3);
        assert!(ev[0].inputs.observed.is_some());
        let json = serde_json::to_string(ev[0]).unwrap();
        assert!(json.contains("\"kind\":\"drain\"") && json.contains("\"signal\":\"latency\""));
        for id in [1, 2] {
            assert!(reasons(&ds[at], id)
                .iter()
                .any(|r| matches!(r, Reason::DrainDeferred { .. })));
        }
        // Still one drained afterwards.
        for d in &ds[at..] {
            assert_eq!(d.backends.iter().filter(|b| b.drained).count(), 1);
        }
        // A fast backend is never drained.
        assert!(ds.iter().all(|d| !d.backends[3].drained));
    }

    #[test]
    fn a_latency_outlier_is_drained_only_if_the_others_can_carry_the_load() {
        // Backends 1 and 2: 50/s each at the 100 ms target (M/M/1, 60/s); backend 3: 190/s.
        let p = unbudgeted();
        let mus = [60.0, 60.0, 200.0];
        let pool = |loads: [f64; 3]| -> Vec<BackendInput> {
            (0..3)
                .map(|i| {
                    let mut b = input(i as u32 + 1, 1, Ok(mm1_fit(mus[i])));
                    b.observed = Some(observed(loads[i], 1000.0 / (mus[i] - loads[i])));
                    b
                })
                .collect()
        };
        for (loads, drained) in [([40.0, 40.0, 100.0], false), ([20.0, 20.0, 50.0], true)] {
            let mut inputs = pool(loads);
            let mut state = PolicyState::default();
            run(&mut inputs, &p, &mut state, 2);
            // Backend 3 answers 20 times slower than its model predicts.
            let o = inputs[2].observed.unwrap();
            inputs[2].observed = Some(observed(o.load, 20.0 * o.latency_ms));
            let ds = run(&mut inputs, &p, &mut state, p.outlier_steps as usize + 2);
            let last = ds.last().unwrap();
            assert_eq!(
                last.backends[2].drained,
                drained,
                "{loads:?}: {:?}",
                reasons(last, 3)
            );
            if !drained {
                // 180/s against the others' 100/s: deferred, and says why.
                assert!(
                    reasons(last, 3).iter().any(|r| matches!(
                        r,
                        Reason::DrainDeferred { outlier, why }
                            if outlier.signal == Signal::Latency && why.contains("100.0/s")
                    )),
                    "{:?}",
                    reasons(last, 3)
                );
                // A failing backend is drained whatever the others can carry.
                let mut failing = inputs.clone();
                failing[2].observed = Some(Observed {
                    error_rate: 0.6,
                    ..observed(o.load, o.latency_ms)
                });
                let mut st = state.clone();
                let ds = run(&mut failing, &p, &mut st, p.outlier_steps as usize);
                assert!(
                    ds.last().unwrap().backends[2].drained,
                    "{:?}",
                    reasons(ds.last().unwrap(), 3)
                );
            }
        }
    }

    /// A policy state two steps in, backend 3 drained by the model since step 1.
    fn third_drained_at_step_1() -> PolicyState {
        let drained = BackendState {
            drained_at: Some(1),
            drains: 1,
            ..BackendState::default()
        };
        PolicyState {
            step: 2,
            backends: [(3, drained)].into_iter().collect(),
        }
    }

    #[test]
    fn coarse_weights_are_scaled_up_so_that_changes_fit_the_budget() {
        // The lab's SYN-drop cascade left backend 1 back up at 0, backend 2 at 1 and backend
        // 3 (drained by the model, still dropping SYNs) at 7 of a configured 100 each, holding
        // 87% of the slots. Every change moved more than the budget and its fraction rounded
        // to nothing: stuck.
        let p = policy();
        let mut inputs: Vec<BackendInput> = (1..=3)
            .map(|id| input(id, 1, Err(Refusal::TooFewSamples { have: 5, need: 30 })))
            .collect();
        for (b, w) in inputs.iter_mut().zip([0, 1, 7]) {
            b.current_weight = w;
            b.observed = Some(observed(20.0, 20.0));
        }
        inputs[2].observed = Some(Observed {
            syn_retries_per_s: 18.0,
            ..observed(20.0, 20.0)
        });
        let mut state = third_drained_at_step_1();
        let before = {
            let w: Vec<u32> = inputs.iter().map(|b| b.current_weight).collect();
            table(&inputs, &w, p.table_size).unwrap()
        };
        let ds = run(&mut inputs, &p, &mut state, 40);
        let first = &ds[0];
        assert!(
            reasons(first, 2)
                .iter()
                .any(|r| matches!(r, Reason::Rescaled { factor: 25 })),
            "{:?}",
            reasons(first, 2)
        );
        // Reported against the weights in force, and the slots counted from their table (the
        // scaled one is the same).
        assert_eq!(first.backends[2].previous_weight, 7);
        assert!(first.changed());
        let w: Vec<u32> = first.weights().iter().map(|w| w.1).collect();
        let after = table(&inputs, &w, p.table_size).unwrap();
        assert_eq!(maglev::slots_changed(&before, &after), first.slots_moved);
        assert!(first.slots_moved > 0, "progress at once: {w:?}");
        for d in &ds {
            assert!(d.slots_moved_gradual <= d.slots_budget, "{:?}", d.weights());
        }
        let last = ds.last().unwrap();
        assert_eq!(
            weight(last, 3),
            0,
            "drained in the end: {:?}",
            last.weights()
        );
        assert!(
            weight(last, 1) >= 25 && weight(last, 2) >= 25,
            "slow start and ramp back: {:?}",
            last.weights()
        );
    }

    #[test]
    fn an_empty_table_is_refilled_at_once() {
        // Every backend went down (the SYN-drop cascade's overloaded small backends; the
        // third drained by the model) and the first two are back: their slow start fills a
        // table that drops everything, which disturbs no flow.
        let p = policy();
        let mut inputs: Vec<BackendInput> = (1..=3)
            .map(|id| input(id, 1, Err(Refusal::TooFewSamples { have: 5, need: 30 })))
            .collect();
        for b in &mut inputs {
            b.current_weight = 0;
            b.observed = Some(observed(0.0, 20.0));
        }
        let state = third_drained_at_step_1();
        let d = decide(&inputs, &p, &state);
        assert_eq!(
            d.weights(),
            vec![(1, 25), (2, 25), (3, 0)],
            "{:?}",
            reasons(&d, 1)
        );
        assert_eq!(d.slots_moved, p.table_size as usize);
        assert_eq!(d.slots_moved_gradual, 0);
    }

    #[test]
    fn an_overloaded_backend_without_a_model_is_cut_until_the_floor_then_drained() {
        // No backend has enough samples for a model (a saturated backend never provides
        // them); backend 1 misses the 100 ms target while its peers meet it.
        let refusal = || Err(Refusal::TooFewSamples { have: 3, need: 30 });
        let mut inputs: Vec<BackendInput> = (1..=3).map(|id| input(id, 1, refusal())).collect();
        // Not an outlier (150 ms is not 5 times the peers' 42.5 ms): this is load, not failure.
        inputs[0].observed = Some(observed(120.0, 150.0));
        inputs[1].observed = Some(observed(120.0, 40.0));
        inputs[2].observed = Some(observed(120.0, 45.0));
        let p = unbudgeted();
        let mut state = PolicyState::default();
        let ds = run(&mut inputs, &p, &mut state, 8);
        let w: Vec<u32> = ds.iter().map(|d| weight(d, 1)).collect();
        // 25% per step down to the floor (a quarter of the configured 100); still missing the
        // target there for outlier_steps steps, drained (no cut can help any more).
        assert_eq!(w[0], 75, "{w:?}");
        assert!(w.windows(2).all(|p| p[1] <= p[0]), "{w:?}");
        let at_floor = w.iter().position(|&x| x == 25).expect("reaches the floor");
        assert_eq!(w[at_floor + p.outlier_steps as usize - 1], 25, "{w:?}");
        assert_eq!(w[at_floor + p.outlier_steps as usize], 0, "{w:?}");
        assert!(reasons(&ds[0], 1)
            .iter()
            .any(|r| matches!(r, Reason::Overloaded { .. })));
        assert!(reasons(&ds[at_floor + 1], 1)
            .iter()
            .any(|r| matches!(r, Reason::AtFloor { .. })));
        assert!(reasons(&ds[at_floor + p.outlier_steps as usize], 1)
            .iter()
            .any(|r| matches!(
                r,
                Reason::Drained { outlier, .. } if outlier.reference_kind == Reference::Target
            )));
        for id in [2, 3] {
            assert!(ds.iter().all(|d| weight(d, id) == 100), "peers held");
        }
        // Every backend over the target: nobody to hand load to, nothing cut.
        let mut all_slow: Vec<BackendInput> = (1..=3).map(|id| input(id, 1, refusal())).collect();
        for b in &mut all_slow {
            b.observed = Some(observed(120.0, 400.0));
        }
        let d = decide(&all_slow, &p, &PolicyState::default());
        assert!(!d.changed(), "{:?}", d.weights());
    }

    #[test]
    fn a_learning_backend_at_its_knee_is_cut_gently_and_keeps_its_capacity() {
        // Backend 3 learned by headroom (flat latency), then reaches its knee: no fit, 130 ms
        // against the 100 ms target while its peers meet it.
        let p = unbudgeted();
        let mut inputs = two_fitted_and_a_flat_one();
        let mut state = PolicyState::default();
        run(&mut inputs, &p, &mut state, 10);
        let c0 = state.backends[&3].capacity.expect("a capacity mean");
        inputs[2].observed = Some(observed(60.0, 130.0));
        let before = inputs[2].current_weight;
        let ds = run(&mut inputs, &p, &mut state, 7);
        let w: Vec<u32> = ds.iter().map(|d| weight(d, 3)).collect();
        // sqrt(100 / 130) = 0.877 of its weight, then held for hysteresis_steps while the
        // probes catch up, then cut again: not 25% a step.
        let first = (f64::from(before) * (100.0f64 / 130.0).sqrt()).round() as u32;
        assert_eq!(w[0], first, "{w:?}");
        assert_eq!(&w[1..3], &[first, first], "{w:?}");
        assert!(w[3] < first, "{w:?}");
        assert!(
            reasons(&ds[1], 3)
                .iter()
                .any(|r| matches!(r, Reason::Overloaded { .. })),
            "{:?}",
            reasons(&ds[1], 3)
        );
        // Its capacity mean falls toward the load it misses the target at, three tenths a step.
        let c1 = ds[0].state.backends[&3].capacity.unwrap();
        assert!((c1 - (c0 + 0.3 * (60.0 - c0))).abs() < 1e-9, "{c0} -> {c1}");
        assert!(ds[6].state.backends[&3].capacity.unwrap() < c1);
        // A backend that never had a model is cut the full step every time (see
        // an_overloaded_backend_without_a_model_is_cut_until_the_floor_then_drained).
    }

    /// Backends 1 and 2 with models (50 per second at the 100 ms target, at 50 per second and
    /// 20 ms); backend 3 without one, its latency flat (10 ms at 50 per second).
    fn two_fitted_and_a_flat_one() -> Vec<BackendInput> {
        let mut inputs: Vec<BackendInput> = (1..=2)
            .map(|id| {
                let mut b = input(id, 1, Ok(mm1_fit(60.0)));
                b.observed = Some(observed(50.0, 20.0));
                b
            })
            .collect();
        let mut flat = input(3, 1, Err(Refusal::PoorFit { r2: 0.1, need: 0.6 }));
        flat.observed = Some(observed(50.0, 10.0));
        inputs.push(flat);
        inputs
    }

    #[test]
    fn a_flat_backend_far_below_the_target_is_given_load_by_its_headroom() {
        // Two backends with models (50 per second at the 100 ms target); the third has no
        // model because its latency is flat (10 ms at 50 per second): 50 x 100 / 10 = 500 per
        // second, limited to twice its load (max_extrapolation), so it gains weight instead
        // of keeping a third.
        let p = unbudgeted();
        let mut inputs = two_fitted_and_a_flat_one();
        let d = decide(&inputs, &p, &PolicyState::default());
        assert!(weight(&d, 3) > 100, "{:?}", d.weights());
        assert!(
            weight(&d, 1) < 100 && weight(&d, 2) < 100,
            "{:?}",
            d.weights()
        );
        assert!(reasons(&d, 3).iter().any(|r| matches!(
            r,
            Reason::Headroom { capacity_estimate, .. } if (*capacity_estimate - 100.0).abs() < 1e-9
        )));
        // The load it has been seen to carry is the window's peak, not the last few seconds'
        // (which follow the load's noise).
        let mut peaked = inputs.clone();
        peaked[2].peak_load = Some(80.0);
        let d = decide(&peaked, &p, &PolicyState::default());
        assert!(reasons(&d, 3).iter().any(|r| matches!(
            r,
            Reason::Headroom { capacity_estimate, .. } if (*capacity_estimate - 160.0).abs() < 1e-9
        )), "{:?}", reasons(&d, 3));
        // At the target, a flat latency proves nothing: held.
        inputs[2].observed = Some(observed(50.0, 100.0));
        let d = decide(&inputs, &p, &PolicyState::default());
        assert_eq!(weight(&d, 3), 100, "{:?}", d.weights());
        // With no fitted backend at all there is nothing to learn: every flat backend holds
        // its configured weight, and (meeting the target) never goes stale.
        let mut flat: Vec<BackendInput> = (1..=3)
            .map(|id| {
                let mut b = input(id, 1, Err(Refusal::PoorFit { r2: 0.1, need: 0.6 }));
                b.observed = Some(observed(20.0 * f64::from(id), 10.0));
                b
            })
            .collect();
        flat[0].current_weight = 60;
        let mut state = PolicyState::default();
        for _ in 0..2 * p.stale_steps {
            let d = decide(&flat, &p, &state);
            assert_eq!(d.weights(), vec![(1, 60), (2, 100), (3, 100)]);
            state = d.state;
        }
    }

    #[test]
    fn a_capacity_bound_by_its_own_load_moves_only_past_the_wider_deadband() {
        // As above: the flat backend's headroom (100/s, twice its load) against the fitted
        // backends' 50/s makes its target 150. At 135 (11% below) a fitted estimate would move
        // it; an estimate bound by its own load does not.
        let mut p = unbudgeted();
        let mut inputs = two_fitted_and_a_flat_one();
        inputs[2].current_weight = 135;
        let d = decide(&inputs, &p, &PolicyState::default());
        assert_eq!(weight(&d, 3), 135, "{:?}", reasons(&d, 3));
        assert!(
            reasons(&d, 3).iter().any(|r| matches!(
                r,
                Reason::Deadband { deadband, .. } if (*deadband - 0.15).abs() < 1e-9
            )),
            "{:?}",
            reasons(&d, 3)
        );
        // The fitted backends (uncapped estimates) are cut as before.
        assert!(
            weight(&d, 1) < 100 && weight(&d, 2) < 100,
            "{:?}",
            d.weights()
        );
        // With the plain deadband it moves toward 150.
        p.load_bound_deadband = 0.0;
        let d = decide(&inputs, &p, &PolicyState::default());
        assert!(weight(&d, 3) > 135, "{:?}", reasons(&d, 3));
        // A fit capped at twice the load seen is bound by the load too; but a cut of a backend
        // missing the latency target is never held by the wider deadband.
        p.load_bound_deadband = 0.15;
        let mut capped = inputs.clone();
        // Capacity 190/s at the target, capped at 96/s: target 300 x 96 / 196 = 147.
        let mut f = mm1_fit(200.0);
        f.load_max = 48.0;
        capped[2].fit = Ok(f);
        capped[2].current_weight = 165;
        let d = decide(&capped, &p, &PolicyState::default());
        assert!(
            reasons(&d, 3)
                .iter()
                .any(|r| matches!(r, Reason::Extrapolation { .. })),
            "{:?}",
            reasons(&d, 3)
        );
        assert_eq!(
            weight(&d, 3),
            165,
            "held: a capped fit, within 15%: {:?}",
            reasons(&d, 3)
        );
        capped[2].observed = Some(observed(50.0, 150.0));
        let d = decide(&capped, &p, &PolicyState::default());
        assert!(
            weight(&d, 3) < 165,
            "cut past the wider deadband: {:?}",
            reasons(&d, 3)
        );
    }

    #[test]
    fn an_explored_capacity_grows_only_while_a_peer_needs_relief() {
        // The fitted backends (50/s at the target) carry 30/s at 33 ms; the flat one carries
        // 50/s at 25 ms, explored at twice its load: 100/s, more than its configured third.
        let p = unbudgeted();
        let mut inputs = two_fitted_and_a_flat_one();
        for b in &mut inputs[..2] {
            b.observed = Some(observed(30.0, 1000.0 / 30.0));
        }
        inputs[2].observed = Some(observed(50.0, 25.0));
        let mut state = PolicyState::default();
        // The weights reach their targets (step-limited to 25% a step), and every peer has
        // been at ease for EASE_STEPS steps.
        run(&mut inputs, &p, &mut state, 4 + EASE_STEPS as usize);
        let c0 = state.backends[&3].capacity.unwrap();
        assert!((c0 - 100.0).abs() < 1e-9, "{c0}");
        assert!(inputs[2].current_weight > 100);
        // Its window's peak rises (the load's noise, or the weight it was given): with every
        // peer at ease its capacity stays, and so do the weights.
        inputs[2].peak_load = Some(80.0);
        let d = decide(&inputs, &p, &state);
        assert_eq!(d.state.backends[&3].capacity, Some(c0));
        assert!(
            reasons(&d, 3).iter().any(
                |r| matches!(r, Reason::ExplorationHeld { capacity, estimate }
                    if *capacity == c0 && (*estimate - 160.0).abs() < 1e-9)
            ),
            "{:?}",
            reasons(&d, 3)
        );
        assert!(!d.changed(), "{:?}", d.weights());
        // A peer near its capacity (45 of 50/s), a peer 2.2x slower (55 ms), or a peer
        // missing the target: the estimate grows to relieve it; 1.6x slower (40 ms) is noise.
        let mut noisy = inputs.clone();
        noisy[0].observed = Some(observed(30.0, 40.0));
        assert_eq!(
            decide(&noisy, &p, &state).state.backends[&3].capacity,
            Some(c0)
        );
        for (load, latency_ms) in [(45.0, 30.0), (30.0, 55.0), (30.0, 120.0)] {
            let mut pressed = inputs.clone();
            pressed[0].observed = Some(observed(load, latency_ms));
            let d = decide(&pressed, &p, &state);
            let c = d.state.backends[&3].capacity.unwrap();
            assert!(
                c > c0,
                "{load}/s at {latency_ms} ms: {c} {:?}",
                reasons(&d, 3)
            );
            // And it goes on growing until its peers have been at ease for EASE_STEPS steps.
            let (mut grown, mut st) = (inputs.clone(), d.state.clone());
            let ds = run(&mut grown, &p, &mut st, EASE_STEPS as usize);
            let caps: Vec<f64> = ds
                .iter()
                .map(|d| d.state.backends[&3].capacity.unwrap())
                .collect();
            let e = EASE_STEPS as usize;
            assert!(caps[..e - 1].windows(2).all(|w| w[1] > w[0]), "{caps:?}");
            assert_eq!(caps[e - 1], caps[e - 2], "{caps:?}");
        }
        // Below its configured share it is explored freely (a backend ramping back after a
        // slowdown must be able to regain its share with everyone at ease).
        let mut below = inputs.clone();
        below[2].current_weight = 90;
        let d = decide(&below, &p, &state);
        assert!(d.state.backends[&3].capacity.unwrap() > c0);
        // A fall is news only past NEWS_FALL (or missing the target): a small one is held too.
        let mut fell = inputs.clone();
        fell[2].peak_load = Some(45.0);
        fell[2].observed = Some(observed(45.0, 25.0));
        let d = decide(&fell, &p, &state);
        assert_eq!(d.state.backends[&3].capacity, Some(c0));
        fell[2].peak_load = Some(30.0);
        fell[2].observed = Some(observed(30.0, 25.0));
        let d = decide(&fell, &p, &state);
        assert!(d.state.backends[&3].capacity.unwrap() < c0);
    }

    /// Two backends whose capacity was measured (M/M/1, 60/s: 50/s at the 100 ms target) and
    /// a flat third; then the two measured ones go flat at a lower share (their fits refused,
    /// as once the window no longer holds loaded samples).
    fn measured_then_flat() -> (Vec<BackendInput>, WeightPolicy, PolicyState) {
        let p = unbudgeted();
        let mut inputs = two_fitted_and_a_flat_one();
        for b in &mut inputs[..2] {
            b.observed = Some(observed(30.0, 1000.0 / 30.0));
        }
        let mut state = PolicyState::default();
        run(&mut inputs, &p, &mut state, 3);
        for b in &mut inputs[..2] {
            b.fit = Err(Refusal::PoorFit { r2: 0.2, need: 0.6 });
            b.peak_load = Some(40.0);
        }
        (inputs, p, state)
    }

    #[test]
    fn a_measured_capacity_stays_while_an_estimate_bound_by_the_load_agrees_with_it() {
        let (mut inputs, p, state) = measured_then_flat();
        let before = state.backends[&1].capacity.unwrap();
        assert!((before - 50.0).abs() < 1e-6, "{before}");
        // Headroom alone would say 2 x 40 = 80/s; the measured 50/s stays.
        let d = decide(&inputs, &p, &state);
        assert_eq!(d.state.backends[&1].capacity, Some(before));
        assert!(
            reasons(&d, 1).iter().any(|r| matches!(
                r,
                Reason::Remembered { capacity, .. } if (*capacity - 50.0).abs() < 1e-6
            )),
            "{:?}",
            reasons(&d, 1)
        );
        // Clearly faster than the measured model predicts at its load (10 ms against 33):
        // measured again, from the headroom.
        inputs[0].observed = Some(observed(30.0, 10.0));
        let d = decide(&inputs, &p, &state);
        assert!(d.state.backends[&1].capacity.unwrap() > before);
        assert!(d.state.backends[&1].measured.is_none());
        // Carrying more than the measured capacity while meeting the target: the same.
        inputs[0].observed = Some(observed(55.0, 90.0));
        let d = decide(&inputs, &p, &state);
        assert!(d.state.backends[&1].capacity.unwrap() > before);
        // Missing the target is news too: not remembered.
        inputs[0].observed = Some(observed(30.0, 120.0));
        let d = decide(&inputs, &p, &state);
        assert!(!reasons(&d, 1)
            .iter()
            .any(|r| matches!(r, Reason::Remembered { .. })));
    }

    /// Latency (ms) of `workers` workers of `service_ms` each at `load` per second: M/D/c by
    /// halving Sakasegawa's M/M/c queueing delay; flat well below capacity, like the bench's
    /// worker pools. At or past capacity, the probe timeout.
    fn workers_ms(workers: f64, service_ms: f64, load: f64) -> f64 {
        let rho = load * service_ms / 1000.0 / workers;
        if rho >= 0.99 {
            return 400.0;
        }
        let wait = 0.5 * service_ms * rho.powf((2.0 * (workers + 1.0)).sqrt() - 1.0)
            / (workers * (1.0 - rho));
        (service_ms + wait).min(400.0)
    }

    #[test]
    fn learned_weights_settle_and_stay_under_a_noisy_load() {
        // The stability run's failure, in a closed loop: worker pools of 2, 2 and 6 workers of
        // 20 ms (100, 100 and 300 per second) under a 40 ms target, a load ramped over 60 s
        // to 250 per second and then ±30% in 5 s periods, shared by the table's weights; one
        // sample a second into 120 s windows, fitted every step. Once the small backends'
        // windows forget the loaded samples of the ramp, their fits turn to flat extrapolations
        // and headroom, estimates bound by their own load: without the measured capacity
        // remembered, their weights walked (last off at 196 s). The large backend's capacity
        // is never measured at this load: it is explored at twice the load it carries, which
        // creeps up with the window's peak; while that could grow, its weight made one late
        // 15% step (at 182 s). Settled: every weight stays within 10% of its median over the
        // second half from a minute after the ramp on.
        let p = WeightPolicy {
            latency_target_ms: 40.0,
            table_size: SMALL_M,
            ..WeightPolicy::default()
        };
        let workers = [2.0, 2.0, 6.0];
        let mut windows = vec![Window::new(120.0, 120); 3];
        let mut inputs: Vec<BackendInput> = (1..=3)
            .map(|id| input(id, 1, Err(Refusal::TooFewSamples { have: 0, need: 30 })))
            .collect();
        let mut state = PolicyState::default();
        let mut trace: Vec<[u32; 3]> = Vec::new();
        for t in 0..600u64 {
            let level = if t < 60 {
                0.3 + 0.7 * t as f64 / 60.0
            } else {
                1.0 + 0.3 * noise(t / 5, 11)
            };
            let sum: f64 = inputs.iter().map(|b| f64::from(b.current_weight)).sum();
            for (i, b) in inputs.iter_mut().enumerate() {
                let load = 250.0 * level * f64::from(b.current_weight) / sum;
                let lat = workers_ms(workers[i], 20.0, load) * (1.0 + 0.1 * noise(t, i as u64));
                windows[i].push(sample(t as f64, load, lat));
                b.fit = fit_with(&windows[i].samples(), &p.fit);
                b.observed = windows[i].observed(5.0);
                b.peak_load = windows[i].peak_load();
            }
            let d = decide(&inputs, &p, &state);
            apply(&mut inputs, &d);
            state = d.state;
            trace.push([0, 1, 2].map(|i| inputs[i].current_weight));
        }
        for i in 0..3 {
            let mut second: Vec<u32> = trace[300..].iter().map(|w| w[i]).collect();
            second.sort_unstable();
            let steady = f64::from(second[second.len() / 2]);
            let last_off = (0..trace.len())
                .rev()
                .find(|&t| (f64::from(trace[t][i]) - steady).abs() > 0.1 * steady);
            assert!(
                last_off.is_none_or(|t| t < 120),
                "backend {} last off its steady weight {steady} at {last_off:?} s: {:?}",
                i + 1,
                trace.iter().step_by(10).map(|w| w[i]).collect::<Vec<_>>()
            );
        }
        // Toward the true capacities' 20/20/60%: the small backends below a third each.
        let last = trace.last().unwrap();
        let total: u32 = last.iter().sum();
        assert!(
            last[2] > total / 2 && last[0] < total / 3 && last[1] < total / 3,
            "{last:?}"
        );
    }

    #[test]
    fn a_few_percent_of_errors_is_suspected_not_drained() {
        let p = policy();
        let mut inputs: Vec<BackendInput> = (1..=4)
            .map(|id| {
                let mut b = input(id, 1, Ok(mm1_fit(100.0)));
                b.observed = Some(observed(50.0, 20.0));
                b
            })
            .collect();
        let mut o = observed(50.0, 20.0);
        o.error_rate = 0.05;
        inputs[1].observed = Some(o);
        let mut state = PolicyState::default();
        let ds = run(&mut inputs, &p, &mut state, 6);
        let suspects: Vec<&AuditEvent> = ds
            .iter()
            .flat_map(|d| &d.events)
            .filter(|e| e.kind == AuditKind::Suspect)
            .collect();
        assert_eq!(suspects.len(), 1, "one event when suspicion starts");
        assert_eq!(suspects[0].backend, 2);
        assert_eq!(suspects[0].step, 1);
        for d in &ds {
            assert!(!d.backends[1].drained);
            assert!(reasons(d, 2)
                .iter()
                .any(|r| matches!(r, Reason::Suspected { since_step: 1, .. })));
            assert!(reasons(d, 1)
                .iter()
                .all(|r| !matches!(r, Reason::Suspected { .. })));
        }
        // Errors gone: the suspicion ends with them.
        inputs[1].observed = Some(observed(50.0, 20.0));
        let d = decide(&inputs, &p, &state);
        assert!(reasons(&d, 2)
            .iter()
            .all(|r| !matches!(r, Reason::Suspected { .. })));
    }

    #[test]
    fn the_last_serving_backend_is_never_drained() {
        let p = WeightPolicy {
            max_drained_share: 1.0,
            ..policy()
        };
        // Both slow; 20/s each, so that either can carry the other's load (see
        // a_latency_outlier_is_drained_only_if_the_others_can_carry_the_load).
        let mut inputs: Vec<BackendInput> = (1..=2)
            .map(|id| {
                let mut b = input(id, 100, Ok(mm1_fit(100.0)));
                b.observed = Some(observed(20.0, 500.0));
                b
            })
            .collect();
        let mut state = PolicyState::default();
        let ds = run(&mut inputs, &p, &mut state, 5);
        let last = ds.last().unwrap();
        assert_eq!(last.backends.iter().filter(|b| b.drained).count(), 1);
        assert!(last.backends.iter().any(|b| b.reasons.iter().any(
            |r| matches!(r, Reason::DrainDeferred { why, .. } if why == "last serving backend")
        )));
    }

    #[test]
    fn error_and_passive_outliers_and_undrain_with_slow_start() {
        let p = WeightPolicy {
            min_drain_steps: 4,
            outlier_steps: 2,
            ..unbudgeted()
        };
        let mut inputs: Vec<BackendInput> = (1..=4)
            .map(|id| {
                let mut b = input(id, 100, Ok(mm1_fit(100.0)));
                b.observed = Some(Observed {
                    syn_retries_per_s: 0.5,
                    ..observed(50.0, 20.0)
                });
                b
            })
            .collect();
        // Backend 2: clients retry a third of their SYNs (latency from probes looks fine).
        inputs[1].observed = Some(Observed {
            syn_retries_per_s: 16.0,
            ..observed(50.0, 20.0)
        });
        let mut state = PolicyState::default();
        let ds = run(&mut inputs, &p, &mut state, 2);
        let d = &ds[1];
        assert!(d.backends[1].drained);
        match &reasons(d, 2)[0] {
            Reason::Drained { outlier, .. } => {
                assert_eq!(outlier.signal, Signal::SynRetryRatio);
                assert_eq!(outlier.reference_kind, Reference::Peers);
            }
            r => panic!("{r:?}"),
        }
        // It recovers (probes at no load look normal): stays out for min_drain_steps, then
        // comes back at the floor and ramps.
        inputs[1].observed = Some(observed(0.0, 10.0));
        let ds = run(&mut inputs, &p, &mut state, 12);
        let back = ds.iter().position(|d| !d.backends[1].drained).unwrap();
        assert!(matches!(
            reasons(&ds[back], 2)[0],
            Reason::Undrained {
                drained_for_steps: 4
            }
        ));
        assert_eq!(weight(&ds[back], 2), 2_500, "slow start at the floor");
        assert!(ds[back].events.iter().any(|e| e.kind == AuditKind::Undrain));
        assert!(weight(&ds[back + 1], 2) > 2_500, "ramping up");
        // Errors: one backend failing half its probes.
        let mut inputs: Vec<BackendInput> = (1..=4)
            .map(|id| {
                let mut b = input(id, 100, Ok(mm1_fit(100.0)));
                b.observed = Some(observed(50.0, 20.0));
                b
            })
            .collect();
        inputs[3].observed = Some(Observed {
            error_rate: 0.5,
            ..observed(50.0, 20.0)
        });
        let mut state = PolicyState::default();
        let ds = run(&mut inputs, &p, &mut state, 2);
        assert!(ds[1].backends[3].drained);
        assert!(reasons(&ds[1], 4)[0].to_string().contains("ErrorRate"));
        // 5% of fast errors, counted at a 400 ms timeout, raise a 22 ms mean to 41 ms: the
        // answered probes meet the target, so this is no overload, and it is suspected.
        let mut fast = inputs.clone();
        for b in &mut fast {
            b.probe_timeout_ms = Some(400.0);
            b.current_weight = 10_000;
        }
        let p40 = WeightPolicy {
            latency_target_ms: 40.0,
            ..p.clone()
        };
        fast[3].observed = Some(Observed {
            error_rate: 0.05,
            ..observed(50.0, 0.95 * 22.0 + 0.05 * 400.0)
        });
        let d = decide(&fast, &p40, &PolicyState::default());
        assert!(
            reasons(&d, 4)
                .iter()
                .any(|r| matches!(r, Reason::Suspected { .. })),
            "{:?}",
            reasons(&d, 4)
        );
        // A fifth of its probes timing out behind a queue past the target: overload (for the
        // weight rule), neither drained nor suspected, until it reaches its floor; failing most
        // of them is failure.
        for (errors, weight, drained) in [
            (0.2, 10_000, false),
            (0.2, 2_500, true),
            (0.6, 10_000, true),
        ] {
            let mut inputs = inputs.clone();
            inputs[3].current_weight = weight;
            if weight == 2_500 {
                // Without a model, the overload rule keeps it at the floor.
                inputs[3].fit = Err(Refusal::PoorFit { r2: 0.1, need: 0.6 });
            }
            inputs[3].observed = Some(Observed {
                error_rate: errors,
                ..observed(90.0, 300.0)
            });
            let mut state = PolicyState::default();
            let ds = run(&mut inputs, &p, &mut state, 2);
            assert_eq!(
                ds[1].backends[3].drained,
                drained,
                "errors {errors} at weight {weight}: {:?}",
                reasons(&ds[1], 4)
            );
            if !drained {
                assert!(!reasons(&ds[1], 4)
                    .iter()
                    .any(|r| matches!(r, Reason::Suspected { .. })));
            }
        }
    }

    #[test]
    fn health_down_leaves_at_once_and_returns_on_a_slow_start() {
        let p = policy();
        let free = unbudgeted();
        let mut inputs = vec![
            input(1, 100, Ok(mm1_fit(100.0))),
            input(2, 100, Ok(mm1_fit(100.0))),
        ];
        inputs[1].health = HealthStatus::Down;
        let d = decide(&inputs, &p, &PolicyState::default());
        assert_eq!(d.weights(), vec![(1, 10_000), (2, 0)]);
        assert!(
            d.slots_moved > p.slots_budget(),
            "health changes are not budgeted"
        );
        assert_eq!(d.slots_moved_gradual, 0);
        apply(&mut inputs, &d);
        inputs[1].health = HealthStatus::Probation;
        let back = decide(&inputs, &free, &d.state);
        assert_eq!(weight(&back, 2), 2_500);
        assert!(matches!(
            reasons(&back, 2)[0],
            Reason::SlowStart { weight: 2_500 }
        ));
        // Within the budget, the return itself is spread: 2 500 of 12 500 is 20% of the slots.
        let back = decide(&inputs, &p, &d.state);
        assert!(weight(&back, 2) > 0 && weight(&back, 2) < 2_500);
        assert!(back.slots_moved <= p.slots_budget());
        assert!(reasons(&back, 2)
            .iter()
            .any(|r| matches!(r, Reason::BudgetLimited { .. })));
        // Its window was cleared while down: with too few samples for a model, meeting the
        // target, it ramps back to the configured weight (25% per step), not held at the floor.
        let mut inputs2 = inputs.clone();
        let mut state = d.state.clone();
        inputs2[1].fit = Err(Refusal::TooFewSamples { have: 2, need: 30 });
        inputs2[1].observed = Some(observed(10.0, 20.0));
        let ws: Vec<u32> = run(&mut inputs2, &free, &mut state, 10)
            .iter()
            .map(|d| weight(d, 2))
            .collect();
        println!("weights after the return: {ws:?}");
        assert_eq!(ws[0], 2_500, "{ws:?}");
        assert!(ws.windows(2).all(|w| w[1] >= w[0]), "{ws:?}");
        assert_eq!(*ws.last().unwrap(), 10_000, "{ws:?}");
    }

    #[test]
    fn window_keeps_recent_samples() {
        let mut w = Window::new(10.0, 5);
        for k in 0..8 {
            w.push(sample(k as f64, 1.0, 1.0));
        }
        assert_eq!(w.len(), 5, "count bound");
        w.push(sample(20.0, 1.0, 1.0));
        assert_eq!(w.len(), 1, "age bound");
        w.push(sample(19.0, 1.0, 1.0));
        w.push(sample(21.0, f64::INFINITY, 1.0));
        assert_eq!(w.len(), 1, "out of order and unusable samples are ignored");
        w.push(sample(22.0, 3.0, 5.0));
        let o = w.observed(5.0).unwrap();
        assert_eq!((o.n, o.load, o.latency_ms), (2, 2.0, 3.0));
    }

    /// FNV-1a (64 bits): a stable digest of a transcript.
    fn fnv1a(s: &str) -> u64 {
        s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        })
    }

    /// Every decision as JSON, then each backend's reasons as displayed.
    fn transcribe(out: &mut String, d: &Decision) {
        out.push_str(&serde_json::to_string(d).unwrap());
        out.push('\n');
        for b in &d.backends {
            for r in &b.reasons {
                out.push_str(&format!("{} {r}\n", b.id));
            }
            if let Some(r) = &b.refusal {
                out.push_str(&format!("{} refusal {r}\n", b.id));
            }
        }
    }

    /// One of each reason and refusal, as JSON and as displayed: what `lbctl model show`,
    /// `lbctl stats` and the events journal print, byte for byte.
    #[test]
    fn reasons_and_refusals_print_as_they_always_have() {
        let o = Outlier {
            signal: Signal::Latency,
            value: 412.5,
            reference: 20.25,
            reference_kind: Reference::Model,
            factor: 10.0,
        };
        let refusal = Refusal::PoorFit {
            r2: 0.4321,
            need: 0.6,
        };
        let refusals = [
            Refusal::TooFewSamples { have: 3, need: 30 },
            Refusal::NoLoadVariation {
                cv: 0.01234,
                need: 0.1,
            },
            refusal.clone(),
            Refusal::NonPhysical {
                slope: 0.25,
                intercept: 123.456,
            },
            Refusal::Numerical {
                error: "singular".into(),
            },
        ];
        let reasons = [
            Reason::Raised {
                from: 10_000,
                to: 12_500,
                target: 13_333.3,
                capacity_at_target: 123.45,
                pool_capacity_at_target: 456.78,
            },
            Reason::Cut {
                from: 10_000,
                to: 7_500,
                target: 6_666.6,
                capacity_at_target: 23.45,
                pool_capacity_at_target: 456.78,
            },
            Reason::AtFloor {
                floor_weight: 2_500.0,
            },
            Reason::AtCeiling {
                ceiling_weight: 40_000.0,
            },
            Reason::StepLimited {
                wanted: 20_000.5,
                max_step_ratio: 0.25,
            },
            Reason::BudgetLimited {
                fraction_applied: 0.4567,
                slots_budget: 500,
            },
            Reason::Deadband {
                target: 10_200.0,
                current: 10_000,
                deadband: 0.05,
            },
            Reason::Hysteresis {
                target: 9_000.0,
                steps: 1,
                need: 3,
            },
            Reason::Extrapolation {
                fitted: 900.0,
                limit: 200.0,
            },
            Reason::ReversalHold {
                target: 9_000.0,
                since_step: 12,
                until_step: 72,
            },
            Reason::FitRefused {
                refusal: refusal.clone(),
                steps: 4,
            },
            Reason::Stale { steps: 60 },
            Reason::NoPeers { fitted: 1 },
            Reason::NoCapacity,
            Reason::LearningOff,
            Reason::Pinned { weight: 7 },
            Reason::ConfiguredZero,
            Reason::Probation,
            Reason::SlowStart { weight: 2_500 },
            Reason::RampBack { weight: 10_000.0 },
            Reason::Health {
                status: HealthStatus::Down,
            },
            Reason::Drained {
                outlier: o,
                steps: 3,
            },
            Reason::OutlierPending {
                outlier: o,
                steps: 1,
                need: 3,
            },
            Reason::DrainDeferred {
                outlier: o,
                why: "last serving backend".into(),
            },
            Reason::StillDrained {
                since_step: 5,
                until_step: 15,
                outlier: Some(o),
            },
            Reason::StillDrained {
                since_step: 5,
                until_step: 15,
                outlier: None,
            },
            Reason::Undrained {
                drained_for_steps: 10,
            },
            Reason::Suspected {
                outlier: Outlier {
                    signal: Signal::ErrorRate,
                    reference_kind: Reference::Peers,
                    ..o
                },
                since_step: 7,
            },
            Reason::Overloaded {
                latency_ms: 250.25,
                peers_latency_ms: 20.5,
                target: 7_500.0,
            },
            Reason::DrainStep {
                remaining_weight: 3_333,
            },
            Reason::Headroom {
                refusal,
                capacity_estimate: 321.0,
            },
            Reason::Remembered {
                capacity: 99.5,
                load: 45.25,
                latency_ms: 21.5,
                predicted_ms: 22.25,
            },
            Reason::Rescaled { factor: 14 },
            Reason::ExplorationHeld {
                capacity: 150.5,
                estimate: 180.25,
            },
        ];
        let mut out = String::new();
        for r in &refusals {
            out.push_str(&format!("{}\n{r}\n", serde_json::to_string(r).unwrap()));
        }
        for r in &reasons {
            out.push_str(&format!("{}\n{r}\n", serde_json::to_string(r).unwrap()));
            let back: Reason = serde_json::from_str(&serde_json::to_string(r).unwrap()).unwrap();
            assert_eq!(&back, r);
        }
        if let Ok(path) = std::env::var("LB_GOLDEN_DUMP") {
            std::fs::write(format!("{path}.reasons"), &out).unwrap();
        }
        let golden = include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/testdata/learning/reasons.txt"
        ));
        assert_eq!(out, golden);
    }

    /// Closed loops through most of the policy (learning, exploration, remembered capacities,
    /// overload cuts, outliers, drains, suspicions, health, pins, learning off, rescaling, the
    /// budget): every decision's JSON and reasons' text, digested. Any change of arithmetic,
    /// order or text changes the digest; `LB_GOLDEN_DUMP=/tmp/x` writes the transcript to diff.
    #[test]
    fn decisions_are_byte_for_byte_what_they_were() {
        let mut out = String::new();
        // A noisy load over worker pools, as in the stability run (400 steps).
        let p = WeightPolicy {
            latency_target_ms: 40.0,
            table_size: SMALL_M,
            ..WeightPolicy::default()
        };
        let workers = [2.0, 2.0, 6.0];
        let mut windows = vec![Window::new(120.0, 120); 3];
        let mut inputs: Vec<BackendInput> = (1..=3)
            .map(|id| input(id, 1, Err(Refusal::TooFewSamples { have: 0, need: 30 })))
            .collect();
        let mut state = PolicyState::default();
        for t in 0..400u64 {
            let level = if t < 60 {
                0.3 + 0.7 * t as f64 / 60.0
            } else {
                1.0 + 0.3 * noise(t / 5, 11)
            };
            // A slowdown of backend 3 in the middle, to exercise cuts and outliers.
            let slow = if (200..260).contains(&t) { 4.0 } else { 1.0 };
            let sum: f64 = inputs.iter().map(|b| f64::from(b.current_weight)).sum();
            for (i, b) in inputs.iter_mut().enumerate() {
                let load = 250.0 * level * f64::from(b.current_weight) / sum.max(1.0);
                let service = if i == 2 { 20.0 * slow } else { 20.0 };
                let lat = workers_ms(workers[i], service, load) * (1.0 + 0.1 * noise(t, i as u64));
                windows[i].push(Sample {
                    errors: if lat >= 400.0 { 0.3 } else { 0.0 },
                    ..sample(t as f64, load, lat)
                });
                b.fit = fit_with(&windows[i].samples(), &p.fit);
                b.observed = windows[i].observed(5.0);
                b.peak_load = windows[i].peak_load();
                b.probe_timeout_ms = Some(400.0);
            }
            let d = decide(&inputs, &p, &state);
            transcribe(&mut out, &d);
            apply(&mut inputs, &d);
            state = d.state;
        }
        // M/M/1 backends, one slowed, then down, back on probation, pinned, learning off,
        // configured 0; another with errors and passive signals.
        let p = policy();
        let mut mus = [300.0, 300.0, 300.0, 150.0];
        let mut windows = vec![Window::new(120.0, 60); 4];
        let mut inputs: Vec<BackendInput> = (1..=4)
            .map(|id| input(id, 100, Err(Refusal::TooFewSamples { have: 0, need: 30 })))
            .collect();
        let mut state = PolicyState::default();
        let mut t = 0u64;
        for step in 0..120u64 {
            match step {
                10 => mus[0] = 60.0,
                40 => inputs[1].health = HealthStatus::Down,
                45 => inputs[1].health = HealthStatus::Probation,
                55 => inputs[1].health = HealthStatus::Up,
                60 => inputs[2].pinned = Some(50),
                70 => inputs[2].pinned = None,
                75 => inputs[3].learning = false,
                85 => inputs[3].learning = true,
                90 => inputs[0].configured_weight = 0,
                95 => inputs[0].configured_weight = 100,
                100 => mus[0] = 300.0,
                _ => {}
            }
            for _ in 0..10 {
                t += 1;
                let total = 400.0 * (1.0 + 0.5 * tri(t, 20));
                let sum: f64 = inputs.iter().map(|b| f64::from(b.current_weight)).sum();
                for (i, b) in inputs.iter().enumerate() {
                    let load = total * f64::from(b.current_weight) / sum.max(1.0);
                    let lat = mm1_ms(mus[i], load, 0.05, t, i as u64);
                    windows[i].push(Sample {
                        errors: if i == 3 && (20..30).contains(&step) {
                            0.3
                        } else {
                            0.0
                        },
                        syn_retries_per_s: if i == 2 && (30..36).contains(&step) {
                            0.5 * load
                        } else {
                            0.01 * load
                        },
                        rsts_per_s: 0.1 * load,
                        ..sample(t as f64, load, lat)
                    });
                }
            }
            for (b, w) in inputs.iter_mut().zip(&windows) {
                b.fit = fit_with(&w.samples(), &p.fit);
                b.observed = w.observed(10.0);
                b.peak_load = w.peak_load();
            }
            let d = decide(&inputs, &p, &state);
            transcribe(&mut out, &d);
            apply(&mut inputs, &d);
            state = d.state;
        }
        // Coarse weights after a cascade are rescaled; outlier pools.
        let mut inputs: Vec<BackendInput> = (1..=3)
            .map(|id| {
                let mut b = input(id, 100, Ok(mm1_fit(100.0 * f64::from(id))));
                b.observed = Some(observed(30.0, 15.0));
                b
            })
            .collect();
        (
            inputs[0].current_weight,
            inputs[1].current_weight,
            inputs[2].current_weight,
        ) = (0, 1, 7);
        let mut state = PolicyState::default();
        for d in run(&mut inputs, &p, &mut state, 30) {
            transcribe(&mut out, &d);
        }
        for slow in 1..=3 {
            for d in outlier_pool(slow, &p) {
                transcribe(&mut out, &d);
            }
        }
        if let Ok(path) = std::env::var("LB_GOLDEN_DUMP") {
            std::fs::write(format!("{path}.decisions"), &out).unwrap();
        }
        assert_eq!(
            (out.len(), fnv1a(&out)),
            (3_498_141, 6_900_282_050_516_342_620),
            "transcript changed; LB_GOLDEN_DUMP=/tmp/x writes it to diff"
        );
    }

    /// The closed loop: three equal backends share a varying load by weight; backend 1 becomes
    /// 5× slower. Its weight is cut by at least half within a few steps, every step within the
    /// step limit and moving at most 5% of a 65537-slot table (checked with `maglev::build`).
    #[test]
    fn a_slowed_backend_is_cut_within_the_step_limit_and_the_disruption_budget() {
        // A 40 ms target: slowed, backend 1 misses it at the load's peaks (M/M/1 at 45 of 60
        // per second: 67 ms); at the default 100 ms it would still meet it, and a capacity
        // known only to within what the load shows (max_extrapolation) justifies less of a cut.
        let p = WeightPolicy {
            latency_target_ms: 40.0,
            ..WeightPolicy::default()
        };
        assert_eq!(p.table_size, 65_537);
        let mut mus = [300.0, 300.0, 300.0];
        let mut windows = vec![Window::new(120.0, 60); 3];
        let mut inputs: Vec<BackendInput> = (1..=3)
            .map(|id| input(id, 100, Err(Refusal::TooFewSamples { have: 0, need: 30 })))
            .collect();
        let mut state = PolicyState::default();
        let mut t = 0u64;
        let budget = (0.05 * 65_537.0) as usize;
        let table_of = |inputs: &[BackendInput]| {
            let w: Vec<u32> = inputs.iter().map(|b| b.current_weight).collect();
            table(inputs, &w, 65_537).unwrap()
        };
        let slowed_at = 10;
        let mut cut_after = None;
        for step in 0..40 {
            if step == slowed_at {
                mus[0] = 60.0;
            }
            for _ in 0..10 {
                t += 1;
                let total = 90.0 * (1.0 + 0.5 * tri(t, 20));
                let sum: f64 = inputs.iter().map(|b| f64::from(b.current_weight)).sum();
                for (i, b) in inputs.iter().enumerate() {
                    let load = total * f64::from(b.current_weight) / sum;
                    let lat = mm1_ms(mus[i], load, 0.01, t, i as u64);
                    windows[i].push(sample(t as f64, load, lat));
                }
            }
            for (b, w) in inputs.iter_mut().zip(&windows) {
                b.fit = fit_with(&w.samples(), &p.fit);
                b.observed = w.observed(10.0);
            }
            let before = table_of(&inputs);
            let d = decide(&inputs, &p, &state);
            apply(&mut inputs, &d);
            state = d.state.clone();
            let moved = maglev::slots_changed(&before, &table_of(&inputs));
            assert_eq!(moved, d.slots_moved);
            assert!(moved <= budget, "step {step}: {moved} slots moved");
            for b in &d.backends {
                let (a, z) = (f64::from(b.previous_weight), f64::from(b.weight));
                assert!((z - a).abs() <= p.max_step_ratio * a + 1.0, "{b:?}");
                assert!(
                    !b.drained,
                    "a slow backend meeting the target is reweighted, not drained"
                );
            }
            if step < slowed_at {
                assert!(
                    !d.changed(),
                    "step {step}: equal backends stay put: {:?}",
                    d.weights()
                );
            }
            let w1 = weight(&d, 1);
            println!(
                "step {step}: weights {:?} moved {moved} slots; backend 1: {}",
                d.weights().iter().map(|x| x.1).collect::<Vec<_>>(),
                d.backends[0]
                    .reasons
                    .iter()
                    .map(|r| r.to_string())
                    .collect::<Vec<_>>()
                    .join("; ")
            );
            if w1 <= 5_000 && cut_after.is_none() {
                cut_after = Some(step - slowed_at);
            }
        }
        let cut_after = cut_after.expect("backend 1 cut by half");
        println!("backend 1 cut by half {cut_after} steps after the slowdown (window: 6 steps)");
        assert!(cut_after <= 16, "{cut_after}");
        // The others took the load, and weights settled.
        let last = decide(&inputs, &p, &state);
        assert!(weight(&last, 2) > 10_000 && weight(&last, 3) > 10_000);
    }
}
