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
