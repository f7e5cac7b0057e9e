//! Stage: the step limit. Urgent weights apply at once; gradual ones move at most
//! `max_step_ratio` of the current weight per step.
use std::fmt;

use super::{Mode, Step};
use crate::learning::{table_weight, Reason, WEIGHT_SCALE};

/// The weights of one step, by position: as they are, with the urgent changes applied, and as
/// proposed (urgent and step-limited gradual changes).
pub(super) struct Weights {
    pub(super) current: Vec<u32>,
    pub(super) baseline: Vec<u32>,
    pub(super) proposed: Vec<u32>,
}

/// Proposes this step's weights from the modes the earlier stages chose.
pub(super) fn propose(s: &mut Step) -> Weights {
    let p = s.p;
    let current: Vec<u32> = s.all.iter().map(|b| b.input.current_weight).collect();
    let mut baseline = current.clone();
    let mut proposed = current.clone();
    for (i, b) in s.all.iter_mut().enumerate() {
        match b.mode {
            Mode::Urgent => {
                let w = if !b.serving_now() {
                    0
                } else if let Some(pw) = b.input.pinned {
                    table_weight(pw)
                } else {
                    0
                };
                baseline[i] = w;
                proposed[i] = w;
            }
            Mode::Drain => proposed[i] = 0,
            Mode::Gradual { target, learned: _ } => {
                let cur = f64::from(b.input.current_weight);
                let next = if b.input.current_weight == 0 {
                    target
                } else {
                    let lo = cur * (1.0 - p.max_step_ratio);
                    let hi = cur * (1.0 + p.max_step_ratio);
                    if target < lo || target > hi {
                        b.reasons.push(Reason::StepLimited {
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
    Weights {
        current,
        baseline,
        proposed,
    }
}

pub(super) fn describe(r: &Reason, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    let s = f64::from(WEIGHT_SCALE);
    match r {
        Reason::StepLimited {
            wanted,
            max_step_ratio,
        } => write!(
            f,
            "step limited to {:.0}% (wanted {:.2})",
            max_step_ratio * 100.0,
            wanted / s
        ),
        _ => unreachable!("not a step-limit reason: {r:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::learning::testkit::*;
    use crate::learning::{PolicyState, Refusal, WeightPolicy};

    fn inputs(n: u32) -> Vec<crate::learning::BackendInput> {
        (1..=n)
            .map(|id| input(id, 1, Err(Refusal::TooFewSamples { have: 0, need: 30 })))
            .collect()
    }

    #[test]
    fn gradual_changes_move_at_most_the_step_ratio_urgent_and_drains_at_once() {
        let p = unbudgeted();
        let mut inputs = inputs(4);
        inputs[3].pinned = Some(2);
        let prev = PolicyState::default();
        let mut s = Step::new(&inputs, &p, &prev);
        let cur = f64::from(inputs[0].current_weight);
        s.all[0].mode = Mode::Gradual {
            target: cur * 3.0,
            learned: true,
        };
        s.all[1].mode = Mode::Gradual {
            target: cur * 1.1,
            learned: true,
        };
        s.all[2].mode = Mode::Drain;
        s.all[3].mode = Mode::Urgent;
        let w = propose(&mut s);
        let limited = (cur * (1.0 + p.max_step_ratio)).round() as u32;
        assert_eq!(w.current, vec![cur as u32; 4]);
        assert_eq!(
            w.proposed,
            vec![limited, (cur * 1.1).round() as u32, 0, table_weight(2)]
        );
        // Urgent weights are part of the baseline the budget measures gradual moves from.
        assert_eq!(
            w.baseline,
            vec![cur as u32, cur as u32, cur as u32, table_weight(2)]
        );
        let limited_reasons = |i: usize| {
            s.all[i]
                .reasons
                .iter()
                .filter(|r| matches!(r, Reason::StepLimited { .. }))
                .count()
        };
        assert_eq!((limited_reasons(0), limited_reasons(1)), (1, 0));
    }

    #[test]
    fn an_integer_weight_always_makes_a_unit_of_progress() {
        let p = WeightPolicy {
            max_step_ratio: 0.2,
            ..unbudgeted()
        };
        let mut inputs = inputs(3);
        for (b, w) in inputs.iter_mut().zip([1, 2, 3]) {
            b.current_weight = w;
        }
        let prev = PolicyState::default();
        let mut s = Step::new(&inputs, &p, &prev);
        // 1 -> 1.6 is limited to 1.2 and 2 -> 1.0 to 1.6, both of which round back: each
        // still moves one unit. 3 -> 2.8 is within half a unit: it stays.
        for (b, target) in s.all.iter_mut().zip([1.6, 1.0, 2.8]) {
            b.mode = Mode::Gradual {
                target,
                learned: true,
            };
        }
        let w = propose(&mut s);
        assert_eq!(w.proposed, vec![2, 1, 3]);
    }
}
