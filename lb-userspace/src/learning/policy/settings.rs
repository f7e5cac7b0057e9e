//! The operator's knobs of the weight policy, per VIP, and their validation.
use serde::{Deserialize, Serialize};

use crate::learning::fit::FitConfig;

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
    /// a late segment after a close), a few tenths per new flow on a healthy backend.
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
    /// walks it up and down. Only a clearly different target moves it. Cuts of a backend missing the latency target keep the plain deadband.
    #[serde(default = "default_load_bound_deadband")]
    pub load_bound_deadband: f64,
    /// A backend drained for latency that is slow even unloaded is carried at the share it can
    /// serve while, without it, the pool's load is above this share of its peers' capacity at
    /// the target (their knee: past it their queues grow faster than its slowness costs).
    /// `None`: never carried (the default: a carried backend's own requests are slow, which
    /// the clients' overall p99 shows).
    #[serde(default)]
    pub carry_knee: Option<f64>,
    /// Learning backends whose capacities per configured unit lie within this ratio of each
    /// other (lowest to highest) share one capacity, their mean: equal backends' estimates
    /// spread that far (`capacity::pool`). 0: each keeps its own.
    #[serde(default = "default_pool_ratio")]
    pub pool_ratio: f64,
}

fn default_pool_ratio() -> f64 {
    1.35
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
    /// The knobs `[vip.learning]` has take its defaults (`config::Learning`), written once.
    fn default() -> Self {
        let l = crate::config::Learning::default();
        WeightPolicy {
            learning: true,
            table_size: lb_common::DEFAULT_TABLE_SIZE,
            latency_target_ms: l.latency_target_ms,
            fit: FitConfig::default(),
            floor: l.floor,
            ceiling: l.ceiling,
            max_step_ratio: l.max_step,
            deadband: l.deadband,
            hysteresis_steps: 3,
            disruption_budget: l.disruption_budget,
            max_drained_share: l.max_drained_share,
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
            carry_knee: l.carry_knee,
            pool_ratio: default_pool_ratio(),
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
        if let Some(k) = self.carry_knee.filter(|k| !(*k > 0.0 && *k <= 1.0)) {
            return Err(format!("carry_knee {k} must be above 0 and at most 1"));
        }
        if self.outlier_factor <= 1.0 {
            return Err("outlier_factor must be above 1".into());
        }
        Ok(())
    }

    /// Table slots one step's gradual changes may move.
    pub(crate) fn slots_budget(&self) -> usize {
        (self.disruption_budget * f64::from(self.table_size)).floor() as usize
    }
}
