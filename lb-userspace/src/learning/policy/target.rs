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
    let peer_scale = peer_scale(s);
    for b in s.all.iter_mut().filter(|b| !b.settled) {
        if b.input.fit.is_ok() && group_len < 2 {
            b.reasons.push(Reason::NoPeers { fitted: group_len });
        } else if pool_cap <= 0.0 {
            b.reasons.push(Reason::NoCapacity);
        } else {
            let t = target(b, p, group_cfg, pool_cap, peer_scale);
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

/// The weight per configured unit of the group's backends in the table that are not
/// returning (1 when there are none): a returning backend's configured share at the pool's
/// scale.
fn peer_scale(s: &Step) -> f64 {
    let (current, configured) = s
        .all
        .iter()
        .filter(|b| b.in_group && !b.state.ramping_back && b.input.current_weight > 0)
        .fold((0.0, 0.0), |(w, c), b| {
            (w + f64::from(b.input.current_weight), c + b.configured)
        });
    if configured > 0.0 {
        current / configured
    } else {
        1.0
    }
}

/// The capacity's share of the group's configured weight, clamped to floor and ceiling.
/// `peer_scale`: see [`peer_scale`].
fn target(
    b: &mut Backend,
    p: &WeightPolicy,
    group_cfg: f64,
    pool_cap: f64,
    peer_scale: f64,
) -> f64 {
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
    // Returned, meeting the target, with an estimate bound by its own load: that load is the
    // ramp's, or the share it was given back, so the estimate is a lower bound, no evidence
    // against its configured share (held by the deadband, a recovered backend stayed at 76%
    // of it for minutes; back at it, the peers' estimates, bound by the higher loads they
    // carried while it was out, cut it to 70%). Its configured share is at the pool's scale:
    // the peers were raised while it was out, and at its configured weight it stayed at 85%
    // of an equal share. Missing the target ends the return: the weight rule takes over.
    if b.misses_target(p) {
        b.state.ramping_back = false;
    }
    let share = b.configured * peer_scale.max(1.0);
    if b.state.ramping_back && b.load_bound && t < share {
        t = share.min(hi);
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
            "returning: its capacity estimate {capacity:.1}/s is bound by its own ramping load, a lower bound: ramping back to its configured share at the pool's scale, {:.2}",
            weight / s
        ),
        _ => unreachable!("not a target reason: {r:?}"),
    }
}

#[cfg(test)]
mod tests {
    use crate::learning::testkit::*;
    use crate::learning::*;

    /// A fit that extrapolates past the loads it saw (up to `load_max`): an estimate bound by
    /// the load.
    fn load_bound_fit(load_max: f64) -> Fit {
        let mut f = mm1_fit(1000.0);
        (f.load_min, f.load_max, f.load_mean) = (0.5 * load_max, load_max, 0.75 * load_max);
        f
    }

    /// Four equal backends meeting the target, their estimates bound by their loads; backend
    /// 4 carried less (it is the one returning).
    fn returned_pool() -> Vec<BackendInput> {
        (1..=4)
            .map(|id| {
                let load_max = if id == 4 { 30.0 } else { 50.0 };
                let mut b = input(id, 100, Ok(load_bound_fit(load_max)));
                b.observed = Some(observed(40.0, 20.0));
                b
            })
            .collect()
    }

    /// Four equal backends whose fits extrapolate past their loads (estimates bound by the
    /// load, twice the highest seen); backend 4 is back from a drain and has carried less
    /// (its peers took its share meanwhile). Its lower estimate is no reason to cut it below
    /// its configured weight while it meets the target; missing the target is.
    #[test]
    fn a_returned_backend_is_not_cut_on_an_estimate_bound_by_its_own_load() {
        let p = unbudgeted();
        let mut inputs = returned_pool();
        let mut returned = PolicyState::default();
        returned.backends.entry(4).or_default().ramping_back = true;
        let d = decide(&inputs, &p, &returned);
        assert_eq!(weight(&d, 4), 10_000, "{:?}", reasons(&d, 4));
        assert!(reasons(&d, 4)
            .iter()
            .any(|r| matches!(r, Reason::LowerBound { .. })));
        // Without the return, the same estimates cut it (60 of the pool's 360 per second).
        let d = decide(&inputs, &p, &PolicyState::default());
        assert!(weight(&d, 4) < 9_000, "{:?}", d.weights());
        // Missing the target ends the return.
        inputs[3].observed = Some(observed(40.0, 150.0));
        let d = decide(&inputs, &p, &returned);
        assert!(!d.state.backends[&4].ramping_back);
    }

    /// The same return in a pool whose peers were raised while it was out (117 per configured
    /// 100): its lower bound is its configured share at that scale, an equal share, not its
    /// configured weight (which left it at 85% of an equal share).
    #[test]
    fn a_returned_backend_ramps_to_its_configured_share_at_the_pools_scale() {
        let p = unbudgeted();
        let mut inputs = returned_pool();
        for b in &mut inputs {
            b.current_weight = if b.id == 4 { 5_000 } else { 11_700 };
        }
        let mut returned = PolicyState::default();
        returned.backends.entry(4).or_default().ramping_back = true;
        let d = decide(&inputs, &p, &returned);
        let lower = reasons(&d, 4)
            .iter()
            .find_map(|r| match r {
                Reason::LowerBound { weight, .. } => Some(*weight),
                _ => None,
            })
            .expect("a lower bound");
        assert_eq!(lower, 11_700.0, "{:?}", reasons(&d, 4));
        assert_eq!(d.backends[3].target_weight, Some(11_700.0));
    }

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
