//! Stage: the deadband. A learned target close to the current weight is not worth the flows a
//! change moves.
use std::fmt;

use super::{Backend, Step, WeightPolicy};
use crate::learning::{Reason, WEIGHT_SCALE};

/// Holds every learned target within the deadband of its current weight.
pub(super) fn hold(s: &mut Step) {
    let p = s.p;
    for b in &mut s.all {
        let Some(t) = b.learned else { continue };
        let cur = f64::from(b.input.current_weight);
        let deadband = width(b, p, t, cur);
        if (t - cur).abs() <= deadband * cur || (t - cur).abs() < 0.5 {
            b.state.reverse_steps = 0;
            b.reasons.push(Reason::Deadband {
                target: t,
                current: b.input.current_weight,
                deadband,
            });
            b.learned = None;
        }
    }
}

/// The deadband of `b`'s target `t`, as a share of its current weight `cur`.
///
/// It widens to `deadband_noise_factor` times the noise of the capacity estimate: a target
/// that moves within the estimate's own noise is not a reason to move flows. An estimate bound
/// by the backend's own load confirms whatever weight it sets, so only a clearly different
/// target (`load_bound_deadband`) moves it, except a cut of a backend missing the target.
/// A pooled backend's is the plain deadband.
fn width(b: &Backend, p: &WeightPolicy, t: f64, cur: f64) -> f64 {
    if b.pooled {
        // A pooled target is the mean of several estimates and moves with the pool's:
        // neither its own noise nor its own load says anything against it.
        return p.deadband;
    }
    let mut deadband = p.deadband.max(p.deadband_noise_factor * b.cap_noise);
    if b.load_bound && !(t < cur && b.misses_target(p)) {
        deadband = deadband.max(p.load_bound_deadband);
    }
    deadband.min(0.5)
}

pub(super) fn describe(r: &Reason, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    let s = f64::from(WEIGHT_SCALE);
    match r {
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
        _ => unreachable!("not a deadband reason: {r:?}"),
    }
}

#[cfg(test)]
mod tests {
    use crate::learning::testkit::*;
    use crate::learning::*;

    #[test]
    fn deadband_ignores_small_changes() {
        // Each its own estimate (pooled, the two would share one and have equal targets).
        let p = WeightPolicy {
            pool_ratio: 0.0,
            ..policy()
        };
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

    #[test]
    fn noisy_capacity_estimates_widen_the_deadband() {
        // Backend 1's estimate alternates ±30% around the steady 100 of backend 2: after a
        // warm-up the weights stay where they are, held by a deadband wider than 5%.
        let p = WeightPolicy {
            hysteresis_steps: 1,
            reversal_hold_steps: 0,
            pool_ratio: 0.0,
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
}
