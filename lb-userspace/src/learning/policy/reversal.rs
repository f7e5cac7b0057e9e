//! Stage: hysteresis and the reversal hold. A learned weight turns only after its target has
//! pointed the other way for `hysteresis_steps`, and at most once per `reversal_hold_steps`.
use std::fmt;

use super::{Backend, Step, WeightPolicy};
use crate::learning::{Reason, WEIGHT_SCALE};

/// Holds every learned target that would reverse the last change too soon.
pub(super) fn hold(s: &mut Step) {
    let (p, step) = (s.p, s.step);
    for b in &mut s.all {
        let Some(t) = b.learned else { continue };
        let dir: i8 = if t > f64::from(b.input.current_weight) {
            1
        } else {
            -1
        };
        if b.state.last_direction != 0 && dir != b.state.last_direction {
            if held(b, p, step, t, dir) {
                b.learned = None;
            }
        } else {
            b.state.reverse_steps = 0;
        }
    }
}

/// Whether the reversal of `b` toward `t` waits. A cut of a backend missing the target is never
/// held by the reversal hold (safety before steadiness); a raise can always wait, since cutting
/// the others raises its share anyway.
fn held(b: &mut Backend, p: &WeightPolicy, step: u64, t: f64, dir: i8) -> bool {
    let urgent = dir < 0 && b.misses_target(p);
    let st = &mut b.state;
    st.reverse_steps += 1;
    let hold_until = st
        .last_reversal
        .map(|at| at + u64::from(p.reversal_hold_steps))
        .filter(|&until| step < until && !urgent);
    if st.reverse_steps < p.hysteresis_steps {
        b.reasons.push(Reason::Hysteresis {
            target: t,
            steps: st.reverse_steps,
            need: p.hysteresis_steps,
        });
    } else if let Some(until_step) = hold_until {
        b.reasons.push(Reason::ReversalHold {
            target: t,
            since_step: st.last_reversal.unwrap_or(0),
            until_step,
        });
    } else {
        return false;
    }
    true
}

pub(super) fn describe(r: &Reason, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    let s = f64::from(WEIGHT_SCALE);
    match r {
        Reason::Hysteresis {
            target,
            steps,
            need,
        } => write!(
            f,
            "held: target {:.2} reverses the last change ({steps} of {need} steps)",
            target / s
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
        _ => unreachable!("not a reversal reason: {r:?}"),
    }
}

#[cfg(test)]
mod tests {
    use crate::learning::testkit::*;
    use crate::learning::*;

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
            pool_ratio: 0.0,
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
}
