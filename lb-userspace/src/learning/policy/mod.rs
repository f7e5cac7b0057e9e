//! The weight policy: [`decide`] turns each backend's model, health and recent behaviour into
//! Maglev weights and drains, one step at a time, as a pipeline of named stages (one file each).
//! Each stage documents why it exists and gives its own [`Reason`]s; [`describe`] maps every
//! reason to the stage that prints it.
use std::{collections::BTreeMap, fmt, net::IpAddr};

use serde::{Deserialize, Serialize};

use super::{
    decision::{Decision, Reason},
    fit::{Fit, Refusal},
    table_weight,
    window::Observed,
};
use crate::health::HealthStatus;

mod budget;
mod capacity;
mod carry;
mod deadband;
mod drains;
mod evidence;
mod exploration;
mod modes;
mod outcome;
mod outliers;
mod refused;
mod rescale;
mod reversal;
pub mod settings;
mod step_limit;
mod target;

#[cfg(test)]
pub(crate) use budget::table;
pub use carry::{Carry, CarryEnd};
pub use outliers::{Outlier, Reference, Signal};
pub use settings::WeightPolicy;

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
    /// The active check of its service port while it is drained on a passive signal (`None`:
    /// not checked, or no conclusive answer yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_check: Option<ServiceCheck>,
}

/// Consecutive outcomes of the active check of a drained backend's service port (a TCP
/// connect to its address and the VIP's port, the port its clients' SYNs go to): only one of
/// the two counts is non-zero. A refused connection is no outcome (the service may listen on
/// the VIP's address only).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceCheck {
    pub passes: u32,
    pub failures: u32,
}

/// What the policy remembers between steps (per VIP). Feed a decision's `state` into the next
/// call; every node that starts from the same state and inputs stays in step.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PolicyState {
    /// Steps taken so far.
    pub step: u64,
    pub backends: BTreeMap<u32, BackendMemory>,
}

/// Per-backend memory of the policy.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BackendMemory {
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
    /// The signal of the model's drain in force when it is a passive one (retried SYNs,
    /// resets, errors): a drained backend carries no traffic, so its clean signals prove
    /// nothing and its return is a trial.
    #[serde(default)]
    pub drained_for: Option<Signal>,
    /// On trial: new flows per second summed over the trial's steps with traffic (the
    /// evidence it is judged on).
    #[serde(default)]
    pub trial_flows: Option<f64>,
    /// Trials failed since the last one that passed: each multiplies the next wait.
    #[serde(default)]
    pub failed_trials: u32,
    /// The service check failed during the drain in force: it sees the fault, so its passes
    /// are evidence that the fault ended.
    #[serde(default, skip_serializing_if = "is_false")]
    pub check_failed: bool,
    /// Carried while slow at the share it can serve (see `carry`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub carry: Option<Carry>,
    /// Drained for latency: its probes' latency while it carried no load.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unloaded_ms: Option<f64>,
    /// Carried and taken down by its health checks: the most it is carried at again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub carry_limit: Option<f64>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

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

/// One backend through one step: its input, the policy's memory of it, and what the stages
/// have found so far.
struct Backend {
    input: BackendInput,
    state: BackendMemory,
    reasons: Vec<Reason>,
    /// Table weight as reported, before any rescaling.
    reported: u32,
    /// Configured table weight.
    configured: f64,
    /// Capacity at the target from its flat latency, without a model (see `evidence`).
    headroom: Option<f64>,
    outlier: Option<Outlier>,
    newly_suspected: bool,
    newly_drained: bool,
    undrained: bool,
    /// In the learning group: its model (or headroom) sets its weight.
    in_group: bool,
    /// Capacity at the target this step (running mean) and its relative noise.
    cap: f64,
    cap_noise: f64,
    /// This step's estimate is bound by the backend's own load.
    load_bound: bool,
    /// Its capacity is its peers' mean (`capacity::pool`).
    pooled: bool,
    /// Its capacity estimate fell as news this step (`capacity::smooth`).
    news: bool,
    /// A stage has set (or held) its weight: later choosing stages leave it alone.
    settled: bool,
    /// The learned target not yet held by the deadband or the reversal hold.
    learned: Option<f64>,
    mode: Mode,
    /// Target weight reported in the decision.
    target: Option<f64>,
}

impl Backend {
    /// In the table now: serving, configured, not drained by the model.
    fn serving_now(&self) -> bool {
        self.input.health.serving()
            && self.input.configured_weight > 0
            && self.state.drained_at.is_none()
    }

    /// Learning on for the VIP and the backend.
    fn learning(&self, p: &WeightPolicy) -> bool {
        p.learning && self.input.learning
    }

    /// Its recent probes' latency is above the target (no observation: not known to miss it).
    fn misses_target(&self, p: &WeightPolicy) -> bool {
        self.input
            .observed
            .is_some_and(|o| o.latency_ms > p.latency_target_ms)
    }
}

/// One step of the policy in progress: the backends by id and what is known of the pool.
struct Step<'a> {
    p: &'a WeightPolicy,
    step: u64,
    all: Vec<Backend>,
    /// Backends in the learning group.
    group_len: usize,
    /// Sum of the group's capacities at the target, and of its configured table weights.
    pool_cap: f64,
    group_cfg: f64,
}

impl<'a> Step<'a> {
    fn new(inputs: &[BackendInput], p: &'a WeightPolicy, prev: &PolicyState) -> Self {
        let mut inputs = inputs.to_vec();
        inputs.sort_by_key(|b| b.id);
        let all = inputs
            .into_iter()
            .map(|input| Backend {
                state: prev.backends.get(&input.id).cloned().unwrap_or_default(),
                reasons: Vec::new(),
                reported: input.current_weight,
                configured: f64::from(table_weight(input.configured_weight)),
                headroom: None,
                outlier: None,
                newly_suspected: false,
                newly_drained: false,
                undrained: false,
                in_group: false,
                cap: 0.0,
                cap_noise: 0.0,
                load_bound: false,
                pooled: false,
                news: false,
                settled: false,
                learned: None,
                mode: Mode::Hold,
                target: None,
                input,
            })
            .collect();
        Step {
            p,
            step: prev.step + 1,
            all,
            group_len: 0,
            pool_cap: 0.0,
            group_cfg: 0.0,
        }
    }

    /// The other serving backends' observations (peers of backend `i`).
    fn peers(&self, i: usize) -> Vec<Observed> {
        self.all
            .iter()
            .enumerate()
            .filter(|(j, b)| *j != i && b.serving_now())
            .filter_map(|(_, b)| b.input.observed)
            .collect()
    }
}

/// One step of the policy. Pure: the result depends only on the arguments, not on the order of
/// `inputs` (they are taken by backend id). The stages run in this order; each one reads what
/// the ones before it found.
pub fn decide(inputs: &[BackendInput], policy: &WeightPolicy, prev: &PolicyState) -> Decision {
    let mut s = Step::new(inputs, policy, prev);
    rescale::rescale_coarse_weights(&mut s);
    evidence::estimate_headroom(&mut s);
    evidence::track_fits(&mut s);
    outliers::find_outliers(&mut s);
    outliers::suspect(&mut s);
    carry::steer(&mut s);
    drains::undrain(&mut s);
    drains::judge_trials(&mut s);
    drains::drain(&mut s);
    carry::begin(&mut s);
    capacity::form_group(&mut s);
    exploration::count_ease(&mut s);
    capacity::estimate(&mut s);
    modes::fix(&mut s);
    refused::choose(&mut s);
    target::choose(&mut s);
    deadband::hold(&mut s);
    reversal::hold(&mut s);
    target::follow(&mut s);
    let weights = step_limit::propose(&mut s);
    let budgeted = budget::limit(&mut s, &weights);
    outcome::record(s, &weights, budgeted)
}

/// Prints a reason; the stage that gives it holds its text.
pub(super) fn describe(r: &Reason, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    use Reason as R;
    match r {
        R::Rescaled { .. } => rescale::describe(r, f),
        R::Suspected { .. } => outliers::describe(r, f),
        R::OutlierPending { .. }
        | R::DrainDeferred { .. }
        | R::Drained { .. }
        | R::StillDrained { .. }
        | R::Undrained { .. }
        | R::Trial { .. }
        | R::TrialPassed { .. }
        | R::ServiceCheck { .. } => drains::describe(r, f),
        R::CarryStarted { .. } | R::Carried { .. } | R::CarryEnded { .. } => carry::describe(r, f),
        R::Extrapolation { .. } | R::Remembered { .. } | R::Pooled { .. } => {
            capacity::describe(r, f)
        }
        R::ExplorationHeld { .. } => exploration::describe(r, f),
        R::Health { .. }
        | R::ConfiguredZero
        | R::Pinned { .. }
        | R::SlowStart { .. }
        | R::LearningOff => modes::describe(r, f),
        R::FitRefused { .. } | R::Overloaded { .. } | R::RampBack { .. } | R::Stale { .. } => {
            refused::describe(r, f)
        }
        R::NoPeers { .. }
        | R::NoCapacity
        | R::Headroom { .. }
        | R::Probation
        | R::AtFloor { .. }
        | R::AtCeiling { .. }
        | R::LowerBound { .. } => target::describe(r, f),
        R::Deadband { .. } => deadband::describe(r, f),
        R::Hysteresis { .. } | R::ReversalHold { .. } => reversal::describe(r, f),
        R::StepLimited { .. } => step_limit::describe(r, f),
        R::BudgetLimited { .. } => budget::describe(r, f),
        R::Raised { .. } | R::Cut { .. } | R::DrainStep { .. } => outcome::describe(r, f),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::learning::testkit::*;
    use crate::learning::*;
    use lb_common::maglev;

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
            (3_756_296, 30_717_095_122_674_886),
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
