//! Stage: the learned target. A backend of the learning group is given its capacity's share of
//! the group's configured weight, within floor and ceiling (and at most its configured weight
//! on probation); the deadband and the reversal hold then decide whether it moves there.
use std::fmt;

use super::{Backend, Mode, Step, WeightPolicy};
use crate::{
    health::HealthStatus,
    learning::{Reason, WEIGHT_SCALE},
};

/// Sets the learned target of every backend no earlier stage settled, or holds it when there is
/// nothing to compare capacities with.
pub(super) fn choose(s: &mut Step) {
    let (p, group_len, pool_cap, group_cfg) = (s.p, s.group_len, s.pool_cap, s.group_cfg);
    for b in s.all.iter_mut().filter(|b| !b.settled) {
        if b.input.fit.is_ok() && group_len < 2 {
            b.reasons.push(Reason::NoPeers { fitted: group_len });
        } else if pool_cap <= 0.0 {
            b.reasons.push(Reason::NoCapacity);
        } else {
            let t = target(b, p, group_cfg, pool_cap);
            b.target = Some(t);
            if let Some(Reason::LowerBound { .. }) = b.reasons.last() {
                // Not a learned move: no deadband, no reversal hold, as any return's ramp.
                b.mode = Mode::Gradual {
                    target: t,
                    learned: false,
                };
            } else {
                b.learned = Some(t);
            }
        }
    }
}

/// The capacity's share of the group's configured weight, clamped to floor and ceiling.
fn target(b: &mut Backend, p: &WeightPolicy, group_cfg: f64, pool_cap: f64) -> f64 {
    if let (Err(refusal), Some(capacity)) = (&b.input.fit, b.headroom) {
        b.reasons.push(Reason::Headroom {
            refusal: refusal.clone(),
            capacity_estimate: capacity,
        });
    }
    let raw = group_cfg * b.cap / pool_cap;
    let lo = p.floor * b.configured;
    let mut hi = p.ceiling * b.configured;
    let probation = b.input.health == HealthStatus::Probation;
    if probation {
        hi = hi.min(b.configured);
        b.reasons.push(Reason::Probation);
    }
    let mut t = raw.clamp(lo, hi);
    // Returning, meeting the target, with an estimate bound by its own load: that load is
    // the ramp's, so the estimate is a lower bound, no evidence against its configured share
    // (held there by the deadband, a recovered backend stayed at 76% of it for minutes).
    if b.state.ramping_back && b.load_bound && !b.misses_target(p) && t < b.configured {
        t = b.configured.min(hi);
        b.reasons.push(Reason::LowerBound {
            capacity: b.cap,
            weight: t,
        });
        return t;
    }
    if raw < lo {
        b.reasons.push(Reason::AtFloor { floor_weight: lo });
    } else if raw > hi && !probation {
        b.reasons.push(Reason::AtCeiling { ceiling_weight: hi });
    }
    t
}

/// Moves every backend whose learned target neither the deadband nor the reversal hold held.
pub(super) fn follow(s: &mut Step) {
    for b in &mut s.all {
        if let Some(target) = b.learned {
            b.mode = Mode::Gradual {
                target,
                learned: true,
            };
        }
    }
}

pub(super) fn describe(r: &Reason, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    let s = f64::from(WEIGHT_SCALE);
    match r {
        Reason::AtFloor { floor_weight } => write!(f, "at floor {:.2}", floor_weight / s),
        Reason::AtCeiling { ceiling_weight } => {
            write!(f, "at ceiling {:.2}", ceiling_weight / s)
        }
        Reason::NoPeers { fitted } => write!(
            f,
            "held: {fitted} backend(s) with a model, capacities need at least 2 to compare"
        ),
        Reason::NoCapacity => f.write_str("held: no backend meets the latency target at any load"),
        Reason::Probation => f.write_str("probation: at most the configured weight"),
        Reason::Headroom {
            refusal,
            capacity_estimate,
        } => write!(
            f,
            "no model ({refusal}), but below the latency target at its load: capacity taken as load x min(target / latency, max_extrapolation) = {capacity_estimate:.1}/s"
        ),
        Reason::LowerBound { capacity, weight } => write!(
            f,
            "returning: its capacity estimate {capacity:.1}/s is bound by its own ramping load, a lower bound: ramping back to the configured {:.2}",
            weight / s
        ),
        _ => unreachable!("not a target reason: {r:?}"),
    }
}

#[cfg(test)]
mod tests {
    use crate::learning::testkit::*;
    use crate::learning::*;

    #[test]
    fn floor_and_ceiling_bound_learned_weights() {
        let p = WeightPolicy {
            ceiling: 2.0,
            ..unbudgeted()
        };
        // Capacities at the 100 ms target: 10, 100 and 1000 per second.
        let mut inputs = vec![
            input(1, 100, Ok(mm1_fit(20.0))),
            input(2, 100, Ok(mm1_fit(110.0))),
            input(3, 100, Ok(mm1_fit(1010.0))),
        ];
        let mut state = PolicyState::default();
        let ds = run(&mut inputs, &p, &mut state, 30);
        let last = ds.last().unwrap();
        assert_eq!(weight(last, 1), 2_500, "floor: 0.25 × configured");
        // Approached from below, the ceiling is reached to within the deadband.
        let top = weight(last, 3);
        assert!(
            (19_000..=20_000).contains(&top),
            "ceiling: 2 × configured: {top}"
        );
        assert!(reasons(last, 1).contains(&Reason::AtFloor {
            floor_weight: 2_500.0
        }));
        assert!(reasons(last, 3).contains(&Reason::AtCeiling {
            ceiling_weight: 20_000.0
        }));
        for d in &ds {
            for b in &d.backends {
                assert!((2_500..=40_000).contains(&b.weight));
            }
        }
    }
}
