//! What [`decide`](super::decide) returns: per backend the weight and its [`Reason`]s, the
//! audit events, and the state for the next step. Serialized as they are by `lbctl model show`,
//! `lbctl stats` and the events journal: their JSON and text are an interface.
use std::{fmt, net::IpAddr};

use serde::{Deserialize, Serialize};

use super::{
    fit::{Fit, Refusal},
    policy::{self, BackendInput, Outlier, PolicyState},
    window::Observed,
};
use crate::health::HealthStatus;

/// Why a backend's weight or state is what it is. Numbers are in table weights unless named
/// otherwise. Grouped by the policy stage that gives them (which also prints them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum Reason {
    // Rescaling of coarse weights: `policy/rescale.rs`.
    /// Every weight of the pool was multiplied by `factor` (the table stays exactly as it is)
    /// because they had fallen far below the configured total, too coarse for a change within
    /// the disruption budget.
    Rescaled { factor: u32 },
    // Outlier detection: `policy/outliers.rs`.
    /// Its error rate is well above its peers' but below the drain threshold.
    Suspected { outlier: Outlier, since_step: u64 },
    // Drains and undrains: `policy/drains.rs`.
    /// An outlier, not yet for long enough.
    OutlierPending {
        outlier: Outlier,
        steps: u32,
        need: u32,
    },
    /// An outlier that was not drained: the pool's drained share, the last serving backend,
    /// or (a latency outlier) the others' capacity below the pool's load.
    DrainDeferred { outlier: Outlier, why: String },
    /// Drained by the model this step.
    Drained { outlier: Outlier, steps: u32 },
    /// Still drained by the model (until at least step `until_step`, and clean for
    /// `outlier_steps` steps).
    StillDrained {
        since_step: u64,
        until_step: u64,
        outlier: Option<Outlier>,
    },
    /// Drain ended: signals back within bounds.
    Undrained { drained_for_steps: u64 },
    /// Back from a drain on a passive signal: on trial at a small share until `need` flows
    /// (per second, summed over its steps with traffic) judge it; `flows` so far.
    Trial { flows: f64, need: f64 },
    /// The trial's flows were clean: it ramps back as after any return.
    TrialPassed { flows: f64 },
    /// Drained on a passive signal, its service port checked: `failures` in a row (no trial
    /// while it fails, and no failed trial either), or `passes` in a row of the `need` that
    /// show the fault the check saw has ended (the trial then waits no longer than a first
    /// drain's minimum, whatever failed before).
    ServiceCheck {
        passes: u32,
        failures: u32,
        need: u32,
    },
    // Carrying a slow backend: `policy/carry.rs`.
    /// Drained for latency and slow even unloaded (`unloaded_ms`), but without it the pool's
    /// load is `peers_load_share` of its peers' capacity at the target, past `knee`: it is
    /// carried at the share it can serve instead.
    CarryStarted {
        unloaded_ms: f64,
        peers_load_share: f64,
        knee: f64,
    },
    /// Carried at table weight `weight`, steered to keep its latency under `hold_under` times
    /// its unloaded latency (`ratio`: the smoothed latency over unloaded latency).
    Carried {
        weight: f64,
        unloaded_ms: f64,
        latency_ms: Option<f64>,
        ratio: Option<f64>,
        hold_under: f64,
    },
    /// The carry ended, and why.
    CarryEnded {
        #[serde(flatten)]
        why: policy::CarryEnd,
    },
    // Capacity estimation: `policy/capacity.rs`.
    /// The fitted capacity at the target is beyond `max_extrapolation` times the highest load
    /// in the window: taken as that limit.
    Extrapolation { fitted: f64, limit: f64 },
    /// This step's capacity estimate is bound by the backend's own load; the capacity measured
    /// by an earlier fit is kept: the backend carries no more than it, meets the target and is
    /// not clearly faster than that fit predicts.
    Remembered {
        capacity: f64,
        load: f64,
        latency_ms: f64,
        predicted_ms: f64,
    },
    /// Its capacity per configured unit is within `ratio` (`pool_ratio`) of those of the
    /// other `members - 1`: the estimates of equal backends spread that far, so they share
    /// one capacity, their mean, and their weights stay in proportion to their configured ones.
    Pooled {
        own: f64,
        pooled: f64,
        members: usize,
        ratio: f64,
    },
    // Exploration hold: `policy/exploration.rs`.
    /// This step's capacity estimate is bound by the backend's own load, which is at or above
    /// its configured share, and no peer has needed relief for `EASE_STEPS` steps: the running
    /// mean stays (more exploration would only move flows nobody needs moved).
    ExplorationHeld { capacity: f64, estimate: f64 },
    // Weights set outright (health, configuration, pins, slow start): `policy/modes.rs`.
    /// Health checks or the operator keep it out of the table.
    Health { status: HealthStatus },
    /// Configured weight 0.
    ConfiguredZero,
    /// Operator's pin (configuration units).
    Pinned { weight: u32 },
    /// Back in the table: starts at the floor and ramps up.
    SlowStart { weight: u32 },
    /// Learning off (VIP or backend): configured weight.
    LearningOff,
    // Backends without a model: `policy/refused.rs`.
    /// No usable model: weight held.
    FitRefused { refusal: Refusal, steps: u32 },
    /// No model, but its latency is above the target while its peers' median meets it: the
    /// backend is given less until it meets the target too (a model needs unsaturated data,
    /// and an overloaded backend never produces any).
    Overloaded {
        latency_ms: f64,
        peers_latency_ms: f64,
        target: f64,
    },
    /// Back in the table with too few samples for a model yet, meeting the target: ramping
    /// back to the configured weight (what a backend without a model has at the start).
    RampBack { weight: f64 },
    /// Refused for `steps` steps: returning to the configured weight.
    Stale { steps: u32 },
    // The learned target: `policy/target.rs`.
    /// Fewer than two backends with a model: nothing to compare capacities with.
    NoPeers { fitted: usize },
    /// No backend with a model meets the latency target at any load: weights held.
    NoCapacity,
    /// No model, but its latency is under half the target (flat, far from saturation): its
    /// capacity at the target is taken to be at least load x target / latency.
    Headroom {
        refusal: Refusal,
        capacity_estimate: f64,
    },
    /// Probation after being down: the learned target is capped at the configured weight.
    Probation,
    /// Target clamped to floor × configured.
    AtFloor { floor_weight: f64 },
    /// Target clamped to ceiling × configured.
    AtCeiling { ceiling_weight: f64 },
    /// Back from a drain or from down, meeting the target, its capacity estimate bound by
    /// its own (ramping) load: a lower bound, no reason to keep it under its configured
    /// weight, to which it ramps back.
    LowerBound { capacity: f64, weight: f64 },
    // Deadband: `policy/deadband.rs`.
    /// Target within the deadband: held.
    Deadband {
        target: f64,
        current: u32,
        deadband: f64,
    },
    // Hysteresis and reversal hold: `policy/reversal.rs`.
    /// Target points the other way for fewer than `need` steps: held.
    Hysteresis { target: f64, steps: u32, need: u32 },
    /// Target points the other way, but the weight turned at `since_step`: held until
    /// `until_step` (at most one change of direction per `reversal_hold_steps`).
    ReversalHold {
        target: f64,
        since_step: u64,
        until_step: u64,
    },
    // Step limit: `policy/step_limit.rs`.
    /// The step would have gone further than `max_step_ratio`.
    StepLimited { wanted: f64, max_step_ratio: f64 },
    // Disruption budget: `policy/budget.rs`.
    /// The step was shortened to stay within the disruption budget.
    BudgetLimited {
        fraction_applied: f64,
        slots_budget: usize,
    },
    // The change made: `policy/outcome.rs`.
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
    /// Drained by the model: its weight goes to 0 over as many steps as the disruption budget
    /// needs (a health failure or an operator's drain is immediate instead).
    DrainStep { remaining_weight: u32 },
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        policy::describe(self, f)
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

/// What [`decide`](super::decide) returns: the new weights with their reasons, the audit events, the slots
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::learning::*;

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
            Reason::Trial {
                flows: 12.5,
                need: 30.0,
            },
            Reason::TrialPassed { flows: 31.25 },
            Reason::ServiceCheck {
                passes: 0,
                failures: 4,
                need: 3,
            },
            Reason::ServiceCheck {
                passes: 1,
                failures: 0,
                need: 3,
            },
            Reason::ServiceCheck {
                passes: 3,
                failures: 0,
                need: 3,
            },
            Reason::LowerBound {
                capacity: 45.5,
                weight: 10_000.0,
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
            Reason::Pooled {
                own: 165.5,
                pooled: 152.25,
                members: 3,
                ratio: 1.35,
            },
            Reason::Rescaled { factor: 14 },
            Reason::ExplorationHeld {
                capacity: 150.5,
                estimate: 180.25,
            },
            Reason::CarryStarted {
                unloaded_ms: 101.25,
                peers_load_share: 0.8125,
                knee: 0.7,
            },
            Reason::Carried {
                weight: 18.5,
                unloaded_ms: 101.25,
                latency_ms: Some(125.5),
                ratio: Some(1.1875),
                hold_under: 1.4,
            },
            Reason::Carried {
                weight: 10.0,
                unloaded_ms: 101.25,
                latency_ms: Some(101.5),
                ratio: None,
                hold_under: 1.4,
            },
            Reason::CarryEnded {
                why: policy::CarryEnd::Recovered,
            },
            Reason::CarryEnded {
                why: policy::CarryEnd::HealthDown,
            },
            Reason::CarryEnded {
                why: policy::CarryEnd::Released,
            },
            Reason::CarryEnded {
                why: policy::CarryEnd::Off,
            },
            Reason::CarryEnded {
                why: policy::CarryEnd::NotNeeded {
                    peers_load_share: 0.5,
                },
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
}
