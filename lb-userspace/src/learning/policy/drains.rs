//! Stage: drains. An outlier for `outlier_steps` steps is drained (within the pool's drained
//! share, never the last serving backend); a drain that has served its time and whose signals
//! are clean ends on a slow start.
use std::fmt;

use super::{
    outliers::{fmt_outlier, median},
    Backend, Signal, Step, WeightPolicy,
};
use crate::learning::Reason;

/// Share of its configured weight a backend returns with on trial.
pub(super) const TRIAL_SHARE: f64 = 0.05;
/// Flows (per second, summed over the trial's steps with traffic) that judge a trial clean.
pub(super) const TRIAL_MIN_FLOWS: f64 = 30.0;
/// Each failed trial multiplies the wait before the next one by this.
const TRIAL_WAIT_GROWTH: u64 = 6;
/// Longest wait before a trial, in steps.
const MAX_TRIAL_WAIT_STEPS: u64 = 3600;
/// Passes in a row of the service check, after it failed during the drain, that end the wait
/// for a trial.
pub(super) const SERVICE_CHECK_PASSES: u32 = 3;

/// Signals that only traffic can show: measured while drained they say nothing.
fn passive(signal: Signal) -> bool {
    matches!(
        signal,
        Signal::SynRetryRatio | Signal::RstRatio | Signal::ErrorRate
    )
}

/// Judges the backends on trial: their flows with traffic add up; enough of them without an
/// outlier pass the trial (a passive outlier fails it in `drain`, at once).
pub(super) fn judge_trials(s: &mut Step) {
    for b in &mut s.all {
        let Some(flows) = b.state.trial_flows else {
            continue;
        };
        if !b.serving_now() {
            continue;
        }
        let load = b.input.observed.map_or(0.0, |o| o.load);
        // A step without traffic is no evidence either way.
        let flows = if load >= 1.0 { flows + load } else { flows };
        b.state.trial_flows = Some(flows);
        if b.outlier.is_some_and(|o| passive(o.signal)) {
            continue;
        }
        if flows >= TRIAL_MIN_FLOWS {
            let st = &mut b.state;
            st.trial_flows = None;
            st.failed_trials = 0;
            st.ramping_back = true;
            (st.last_direction, st.reverse_steps, st.last_reversal) = (0, 0, None);
            b.reasons.push(Reason::TrialPassed { flows });
        } else {
            b.reasons.push(Reason::Trial {
                flows,
                need: TRIAL_MIN_FLOWS,
            });
        }
    }
}

/// Ends the drains that have served their time with clean signals, and every drain of a
/// backend whose learning was switched off or that was pinned.
///
/// Clean also means meeting the latency target (or the peers' median, when they miss it too)
/// at no load: a backend drained for latency that is still slow unloaded would only be drained
/// again once its slow start gave it load.
pub(super) fn undrain(s: &mut Step) {
    let (p, step) = (s.p, s.step);
    for i in 0..s.all.len() {
        if s.all[i].state.drained_at.is_none() {
            continue;
        }
        let peers_latency = median(s.peers(i).iter().map(|o| o.latency_ms).collect());
        end_drain(&mut s.all[i], p, step, peers_latency);
    }
}

fn end_drain(b: &mut Backend, p: &WeightPolicy, step: u64, peers_latency: Option<f64>) {
    let learning = b.learning(p);
    let Some(at) = b.state.drained_at else { return };
    let check = service_check(b);
    let st = &mut b.state;
    let until = if st.drained_for.is_some() {
        let growth = TRIAL_WAIT_GROWTH.saturating_pow(st.failed_trials);
        at + (u64::from(p.min_drain_steps).saturating_mul(growth)).min(MAX_TRIAL_WAIT_STEPS)
    } else {
        at + u64::from(p.min_drain_steps) * (1u64 << st.drains.clamp(1, 6).saturating_sub(1))
    };
    let clean = b.outlier.is_none()
        && b.input
            .observed
            .is_some_and(|o| o.latency_ms <= p.latency_target_ms.max(peers_latency.unwrap_or(0.0)));
    st.clean_steps = if clean { st.clean_steps + 1 } else { 0 };
    if !learning || b.input.pinned.is_some() {
        // Learning switched off or pinned: the model gives the backend back at once.
        st.drained_at = None;
        b.undrained = true;
        b.reasons.push(Reason::Undrained {
            drained_for_steps: step - at,
        });
    } else if check == Check::Waits {
        // The check sees the fault: no trial yet, and none failed.
        b.reasons.push(Reason::StillDrained {
            since_step: at,
            until_step: until,
            outlier: b.outlier,
        });
    } else if (step >= until || check == Check::Recovered)
        && st.clean_steps >= p.outlier_steps.max(1)
    {
        st.drained_at = None;
        st.clean_steps = 0;
        st.check_failed = false;
        // Drained on a signal only traffic shows: back on trial, not back.
        if st.drained_for.take().is_some() {
            st.trial_flows = Some(0.0);
        }
        b.undrained = true;
        b.reasons.push(Reason::Undrained {
            drained_for_steps: step - at,
        });
    } else {
        b.reasons.push(Reason::StillDrained {
            since_step: at,
            until_step: until,
            outlier: b.outlier,
        });
    }
}

/// What the service check of a backend drained on a passive signal says of its return.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Check {
    /// No evidence: not checked, no conclusive answer, or a check that never failed during
    /// the drain (the fault shows only under load, or not on that path): the waits as they are.
    Silent,
    /// Failing, or not yet passing `SERVICE_CHECK_PASSES` times in a row since it failed.
    Waits,
    /// It failed during the drain and has passed `SERVICE_CHECK_PASSES` times in a row since:
    /// the fault it saw has ended, so the trial waits no longer than a first drain's minimum.
    Recovered,
}

/// Reads backend `b`'s service check (drained on a passive signal only), remembers whether it
/// failed during the drain, and says what it means for the trial.
fn service_check(b: &mut Backend) -> Check {
    let (Some(_), Some(c)) = (b.state.drained_for, b.input.service_check) else {
        return Check::Silent;
    };
    if c.failures > 0 {
        b.state.check_failed = true;
    }
    if !b.state.check_failed {
        return Check::Silent;
    }
    b.reasons.push(Reason::ServiceCheck {
        passes: c.passes,
        failures: c.failures,
        need: SERVICE_CHECK_PASSES,
    });
    if c.passes >= SERVICE_CHECK_PASSES {
        // Its earlier failed trials were failures of a fault that has ended.
        b.state.failed_trials = 0;
        Check::Recovered
    } else {
        Check::Waits
    }
}

/// Drains the serving backends that have been outliers for `outlier_steps` steps, the most
/// severe first, while the pool's drained share allows.
pub(super) fn drain(s: &mut Step) {
    let p = s.p;
    let n = s.all.len();
    let pool = s
        .all
        .iter()
        .filter(|b| b.input.configured_weight > 0)
        .count();
    let max_out = (p.max_drained_share * pool as f64 + 1e-9).floor() as usize;
    let mut out = s
        .all
        .iter()
        .filter(|b| b.input.configured_weight > 0 && !b.serving_now())
        .count();
    let candidates = drain_candidates(s);
    // The load the serving backends carry, for the capacity check of latency drains.
    let pool_load: f64 = (0..n)
        .filter(|&j| s.all[j].serving_now())
        .filter_map(|j| s.all[j].input.observed.map(|o| o.load))
        .sum();
    for (_, i) in candidates {
        let o = s.all[i].outlier.expect("candidates are outliers");
        let why = if out + 1 > max_out {
            Some(format!(
                "{out} of {pool} already out, at most {:.0}% may be",
                p.max_drained_share * 100.0
            ))
        } else if pool - out <= 1 {
            Some("last serving backend".to_string())
        } else {
            overloads_the_others(s, i, o.signal, pool_load)
        };
        let step = s.step;
        let b = &mut s.all[i];
        match why {
            Some(why) => b.reasons.push(Reason::DrainDeferred { outlier: o, why }),
            None => {
                out += 1;
                let st = &mut b.state;
                if st.trial_flows.take().is_some() {
                    st.failed_trials = st.failed_trials.saturating_add(1);
                }
                st.drained_for = passive(o.signal).then_some(o.signal);
                st.check_failed = false;
                st.drained_at = Some(step);
                st.unloaded_ms = None;
                st.carry = None;
                st.drains = st.drains.saturating_add(1);
                st.clean_steps = 0;
                b.newly_drained = true;
                b.reasons.push(Reason::Drained {
                    outlier: o,
                    steps: st.outlier_steps,
                });
                st.outlier_steps = 0;
            }
        }
    }
}

/// Counts outlier streaks of serving backends; those long enough, as (severity, index), most
/// severe first, then by id.
fn drain_candidates(s: &mut Step) -> Vec<(f64, usize)> {
    let mut candidates: Vec<(f64, usize)> = Vec::new();
    for (i, b) in s.all.iter_mut().enumerate() {
        if b.state.drained_at.is_some() || b.undrained {
            continue;
        }
        // On trial, one step of a passive outlier with traffic decides: that is what it was
        // let back in to show.
        let on_trial = b.state.trial_flows.is_some()
            && b.outlier.is_some_and(|o| passive(o.signal))
            && b.input.observed.is_some_and(|o| o.load >= 1.0);
        let need = if on_trial {
            1
        } else {
            s.p.outlier_steps.max(1)
        };
        match (&b.outlier, b.serving_now()) {
            // Carried: slow is why; failing is not.
            (Some(o), true) if b.state.carry.is_some() && o.signal == Signal::Latency => {
                b.state.outlier_steps = 0;
            }
            (Some(o), true) => {
                b.state.outlier_steps += 1;
                if b.state.outlier_steps >= need {
                    candidates.push((o.severity(), i));
                } else {
                    b.reasons.push(Reason::OutlierPending {
                        outlier: *o,
                        steps: b.state.outlier_steps,
                        need,
                    });
                }
            }
            _ => b.state.outlier_steps = 0,
        }
    }
    candidates.sort_by(|a, b| {
        b.0.total_cmp(&a.0)
            .then(s.all[a.1].input.id.cmp(&s.all[b.1].input.id))
    });
    candidates
}

/// Why a latency outlier `i` waits: the others' capacity means fall short of the pool's load.
///
/// A slow backend still serves: draining it onto peers that cannot carry the load only moves
/// the slowness, and overloaded peers fail their health checks next. So a latency outlier
/// waits while the others' capacities (known for all of them) fall short of the pool's load;
/// the weights shift what they can meanwhile. A failing backend (errors, retried SYNs,
/// resets) fails its share anyway: drained regardless.
fn overloads_the_others(s: &Step, i: usize, signal: Signal, pool_load: f64) -> Option<String> {
    let others_capacity = (signal == Signal::Latency)
        .then(|| {
            (0..s.all.len())
                .filter(|&j| j != i && s.all[j].serving_now())
                .map(|j| s.all[j].state.capacity)
                .sum::<Option<f64>>()
        })
        .flatten();
    others_capacity.filter(|&c| c < pool_load).map(|c| {
        format!(
            "the others' capacity at the target, {c:.1}/s, is below the pool's load of {pool_load:.1}/s"
        )
    })
}

pub(super) fn describe(r: &Reason, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    match r {
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
            write!(
                f,
                "drained since step {since_step}, at least until {until_step}"
            )?;
            if let Some(o) = outlier {
                f.write_str("; still ")?;
                fmt_outlier(f, o)?;
            }
            Ok(())
        }
        Reason::Undrained { drained_for_steps } => {
            write!(
                f,
                "undrained after {drained_for_steps} steps: signals back within bounds"
            )
        }
        Reason::Trial { flows, need } => write!(
            f,
            "on trial at {:.0}% of its weight: {flows:.0} of {need:.0} flows judged (signals measured while drained are no evidence)",
            TRIAL_SHARE * 100.0
        ),
        Reason::TrialPassed { flows } => write!(
            f,
            "trial passed: {flows:.0} flows without an outlier; ramping back"
        ),
        Reason::ServiceCheck {
            passes,
            failures,
            need,
        } => {
            if *failures > 0 {
                write!(
                    f,
                    "service port check failing ({failures} in a row): no trial while it fails (and no failed trial)"
                )
            } else if passes >= need {
                write!(
                    f,
                    "service port check passing again ({passes} in a row): the fault it saw has ended, trial without further wait"
                )
            } else {
                write!(
                    f,
                    "service port check passing again ({passes} of {need} in a row needed for a trial)"
                )
            }
        }
        _ => unreachable!("not a drain reason: {r:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::SERVICE_CHECK_PASSES;
    use crate::learning::testkit::*;
    use crate::learning::*;

    #[test]
    fn a_backend_drained_for_latency_returns_only_once_it_meets_the_target() {
        let p = policy();
        let mut inputs = healthy_pool(100);
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

    /// A backend that drops SYNs only while it carries traffic: each trial fails at its first
    /// step with traffic, and the wait before the next one grows sixfold.
    #[test]
    fn failed_trials_drain_at_once_and_wait_longer_each_time() {
        let p = WeightPolicy {
            min_drain_steps: 5,
            outlier_steps: 2,
            ..unbudgeted()
        };
        let clean = |load: f64| Observed {
            syn_retries_per_s: 0.01 * load,
            ..observed(load, 20.0)
        };
        let dropping = |load: f64| Observed {
            syn_retries_per_s: 1.5 * load,
            ..observed(load, 20.0)
        };
        let mut inputs: Vec<BackendInput> = (1..=4)
            .map(|id| {
                let mut b = input(id, 100, Ok(mm1_fit(100.0)));
                b.observed = Some(clean(50.0));
                b
            })
            .collect();
        inputs[3].observed = Some(dropping(50.0));
        let mut state = PolicyState::default();
        let mut trials = Vec::new();
        let mut drains = Vec::new();
        for step in 0..300u64 {
            let d = decide(&inputs, &p, &state);
            apply(&mut inputs, &d);
            state = d.state.clone();
            let b = &d.backends[3];
            if b.reasons
                .iter()
                .any(|r| matches!(r, Reason::Drained { .. }))
            {
                drains.push(step);
            }
            if b.reasons
                .iter()
                .any(|r| matches!(r, Reason::Undrained { .. }))
            {
                trials.push(step);
            }
            // Its signals show only while it carries flows: drained, it looks clean.
            let load = if b.weight > 0 { 3.0 } else { 0.0 };
            inputs[3].observed = Some(if load > 0.0 {
                dropping(load)
            } else {
                clean(0.0)
            });
            assert!(
                b.drained || b.weight == 0 || b.weight <= 500 || step < 2,
                "step {step}: on trial above 5%: {}",
                b.weight
            );
        }
        // Drained after outlier_steps, each trial drained again at once, waits 5, 30, 180.
        assert_eq!(drains.len(), trials.len() + 1, "{drains:?} {trials:?}");
        let waits: Vec<u64> = trials.iter().zip(&drains).map(|(t, d)| t - d).collect();
        assert!(waits.len() >= 3, "{waits:?}");
        assert!(
            waits[0] >= 5 && waits[1] >= 30 && waits[2] >= 180,
            "{waits:?}"
        );
        for (t, d) in trials.iter().zip(&drains[1..]) {
            assert!(
                d - t <= 2,
                "a failed trial lasts a step with traffic: {trials:?} {drains:?}"
            );
        }
    }

    /// The SYN-dropping backend of the test above, its service port checked while drained:
    /// first a fault the check cannot see (two failed trials), then one it sees (no trial
    /// while the check fails, however long), then the fault ends: the check's passes start a
    /// trial at once, past the 180 steps the failed trials had made it wait, and the passed
    /// trial ramps it back to its configured weight.
    #[test]
    fn a_service_check_holds_trials_while_it_fails_and_starts_one_when_it_passes_again() {
        let p = WeightPolicy {
            min_drain_steps: 5,
            outlier_steps: 2,
            ..unbudgeted()
        };
        let syn = |load: f64, ratio: f64| Observed {
            syn_retries_per_s: ratio * load,
            ..observed(load, 20.0)
        };
        let mut inputs: Vec<BackendInput> = (1..=4)
            .map(|id| {
                let mut b = input(id, 100, Err(Refusal::PoorFit { r2: 0.1, need: 0.6 }));
                b.observed = Some(syn(50.0, 0.01));
                b
            })
            .collect();
        let mut state = PolicyState::default();
        let (mut trials, mut drains) = (Vec::new(), Vec::new());
        // (from step, the check's outcome while drained, dropping SYNs under traffic)
        let phases = [
            (0u64, None, true),
            (45, Some(false), true),
            (150, Some(true), false),
        ];
        let mut check = ServiceCheck::default();
        let mut weights = Vec::new();
        for step in 0..210u64 {
            let &(_, outcome, dropping) = phases.iter().rev().find(|p| p.0 <= step).unwrap();
            let d = decide(&inputs, &p, &state);
            apply(&mut inputs, &d);
            state = d.state.clone();
            let b = &d.backends[3];
            weights.push(b.weight);
            let has = |f: fn(&Reason) -> bool| b.reasons.iter().any(f);
            if has(|r| matches!(r, Reason::Drained { .. })) {
                drains.push(step);
            }
            if has(|r| matches!(r, Reason::Undrained { .. })) {
                trials.push(step);
            }
            let load = if b.weight > 0 { 3.0 } else { 0.0 };
            let ratio = if dropping && load > 0.0 { 1.5 } else { 0.01 };
            inputs[3].observed = Some(syn(load, ratio));
            // The agent checks while the model keeps it drained on a passive signal.
            check = match (outcome, state.backends[&4].drained_for.is_some()) {
                (Some(true), true) => ServiceCheck {
                    passes: check.passes + 1,
                    failures: 0,
                },
                (Some(false), true) => ServiceCheck {
                    passes: 0,
                    failures: check.failures + 1,
                },
                _ => ServiceCheck::default(),
            };
            inputs[3].service_check = (check != ServiceCheck::default()).then_some(check);
        }
        // Two failed trials while the check saw nothing (waits 5 and 30), then none while it
        // failed, though the next was due 180 steps after the third drain.
        assert_eq!(drains.len(), 3, "{drains:?} {trials:?}");
        assert!(trials[..2].iter().all(|&t| t < 45), "{trials:?}");
        assert_eq!(
            state.backends[&4].failed_trials, 0,
            "the check's recovery forgives the failed trials"
        );
        // Recovered at 150: trial after the check's 3 passes, not at drain + 180.
        assert_eq!(trials.len(), 3, "{trials:?}");
        assert!(
            (150..=150 + u64::from(SERVICE_CHECK_PASSES) + 2).contains(&trials[2]),
            "{trials:?} {drains:?}"
        );
        assert!(
            drains[2] + 180 > trials[2] + 10,
            "the hard case: {drains:?}"
        );
        assert_eq!(*weights.last().unwrap(), 10_000, "{:?}", &weights[150..]);
    }

    /// A backend failing its flows (here: retried SYNs) leaves the table in the step it is
    /// drained, whatever the disruption budget: each step it kept slots would fail the new
    /// connections they send it. (A slow one leaves gradually: the test below.)
    #[test]
    fn a_backend_drained_for_a_passive_signal_leaves_the_table_at_once() {
        let p = policy();
        let mut inputs = healthy_pool(100);
        inputs[3].observed = Some(Observed {
            syn_retries_per_s: 1.5 * 50.0,
            ..observed(50.0, 20.0)
        });
        let mut state = PolicyState::default();
        let ds = run(&mut inputs, &p, &mut state, p.outlier_steps as usize);
        let last = ds.last().unwrap();
        assert!(
            reasons(last, 4)
                .iter()
                .any(|r| matches!(r, Reason::Drained { .. })),
            "{:?}",
            reasons(last, 4)
        );
        assert_eq!(weight(last, 4), 0, "{:?}", reasons(last, 4));
        assert!(
            last.slots_moved > last.slots_budget,
            "a quarter of the table, past the budget: {} of {}",
            last.slots_moved,
            last.slots_budget
        );
        assert!(last.slots_moved_gradual <= last.slots_budget);
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
}
