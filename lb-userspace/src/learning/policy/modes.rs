//! Stage: weights set outright, before any model has a say: health, configuration, the model's
//! own drains, pins, slow starts and learning switched off.
use std::fmt;

use super::{Backend, Mode, Step, WeightPolicy};
use crate::learning::{Reason, WEIGHT_SCALE};

/// Settles every backend whose weight no model decides this step. (A return's ramp does not end
/// at the configured weight: see `target`'s lower bound.)
pub(super) fn fix(s: &mut Step) {
    let p = s.p;
    for b in &mut s.all {
        b.settled = fixed(b, p);
    }
}

/// Sets `b`'s mode if health, configuration, a drain, a pin, a return to the table or learning
/// off decides it; whether it did.
fn fixed(b: &mut Backend, p: &WeightPolicy) -> bool {
    let input = &b.input;
    if !input.health.serving() {
        b.mode = Mode::Urgent;
        b.reasons.push(Reason::Health {
            status: input.health,
        });
    } else if input.configured_weight == 0 {
        b.mode = Mode::Urgent;
        b.reasons.push(Reason::ConfiguredZero);
    } else if b.state.drained_at.is_some() {
        // A drain for latency is spread over steps within the disruption budget: a slow
        // backend still serves. One for a passive signal (retried SYNs, resets, errors) takes
        // the backend out at once, as health does: every step it keeps slots fails the new
        // connections they send it.
        b.mode = if input.current_weight > 0 && b.state.drained_for.is_none() {
            Mode::Drain
        } else {
            Mode::Urgent
        };
    } else if let Some(w) = input.pinned {
        b.mode = Mode::Urgent;
        b.reasons.push(Reason::Pinned { weight: w });
    } else if let Some(c) = b.state.carry {
        // Carried while slow (see `carry`): the weight its latency allows.
        b.mode = Mode::Gradual {
            target: c.weight.round().max(1.0),
            learned: false,
        };
    } else if b.state.trial_flows.is_some() {
        // On trial (see `drains`): a small share until its flows judge it.
        b.mode = Mode::Gradual {
            target: (super::drains::TRIAL_SHARE * b.configured).round().max(1.0),
            learned: false,
        };
    } else if input.current_weight == 0
        && b.reasons
            .iter()
            .any(|r| matches!(r, Reason::OutlierPending { .. }))
    {
        // Returning (after down, or added) as an outlier: no slow start until the outlier is
        // decided (drained, deferred or clean), or its floor share would suffer first.
    } else if input.current_weight == 0 {
        slow_start(b, p);
    } else if !b.learning(p) {
        b.mode = Mode::Gradual {
            target: b.configured,
            learned: false,
        };
        b.reasons.push(Reason::LearningOff);
    } else {
        return false;
    }
    true
}

/// Back in the table (after a drain, down, or added): from the floor, gradual from there.
/// A new start: the last learned direction says nothing about this one.
fn slow_start(b: &mut Backend, p: &WeightPolicy) {
    let w = (p.floor * b.configured).round().max(1.0);
    b.mode = Mode::Gradual {
        target: w,
        learned: false,
    };
    b.reasons.push(Reason::SlowStart { weight: w as u32 });
    let st = &mut b.state;
    (st.last_direction, st.reverse_steps, st.last_reversal) = (0, 0, None);
    st.ramping_back = true;
}

pub(super) fn describe(r: &Reason, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    let s = f64::from(WEIGHT_SCALE);
    match r {
        Reason::LearningOff => f.write_str("learning off: configured weight"),
        Reason::Pinned { weight } => write!(f, "pinned at {weight}"),
        Reason::ConfiguredZero => f.write_str("configured weight 0"),
        Reason::SlowStart { weight } => write!(
            f,
            "back in the table: slow start at {:.2}",
            f64::from(*weight) / s
        ),
        Reason::Health { status } => write!(f, "out of the table: {status}"),
        _ => unreachable!("not a reason of weights set outright: {r:?}"),
    }
}

#[cfg(test)]
mod tests {
    use crate::health::HealthStatus;
    use crate::learning::testkit::*;
    use crate::learning::*;

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
        assert!(
            reasons(&back, 2)
                .iter()
                .any(|r| matches!(r, Reason::SlowStart { weight: 2_500 })),
            "{:?}",
            reasons(&back, 2)
        );
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
}
