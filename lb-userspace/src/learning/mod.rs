//! Learned weights: a per-backend model of latency against load, and the policy that turns the
//! models into Maglev weights and automatic drains. Design note: `docs/model.md`.
//!
//! Where things are: `window.rs` (samples and their means), `fit.rs` (the regression and its
//! refusals), `policy/` ([`decide`] and its stages, one file each, in the order `decide` runs
//! them), `decision.rs` (what a step returns: weights, [`Reason`]s, audit events).
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

mod decision;
mod fit;
pub mod policy;
#[cfg(test)]
mod testkit;
mod window;

pub use decision::{AuditEvent, AuditKind, BackendDecision, Decision, Reason};
pub use fit::{fit, fit_with, Fit, FitConfig, Refusal};
pub use policy::{
    decide, BackendInput, BackendMemory, Outlier, PolicyState, Reference, ServiceCheck, Signal,
    WeightPolicy,
};
pub use window::{Observed, Sample, Window};

/// Table weight of one unit of configured weight.
pub const WEIGHT_SCALE: u32 = 100;

/// The table weight a configured weight stands for.
pub fn table_weight(configured: u32) -> u32 {
    configured.saturating_mul(WEIGHT_SCALE)
}
