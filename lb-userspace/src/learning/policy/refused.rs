//! Stage: backends without a model (refused fit, and no headroom or no peers to compare with).
//! Held by default; cut while overloaded; ramped back after a slow start; returned to the
//! configured weight once stale.
use std::fmt;

use super::{outliers::median, Backend, Mode, Step, WeightPolicy};
use crate::learning::{Reason, Refusal, WEIGHT_SCALE};

/// Chooses the weight of every unsettled backend whose fit was refused, unless its headroom
/// stands in for a model among at least two in the learning group.
pub(super) fn choose(s: &mut Step) {
    let (p, step) = (s.p, s.step);
    for i in 0..s.all.len() {
        let b = &s.all[i];
        let Err(refusal) = &b.input.fit else { continue };
        if b.settled || (b.headroom.is_some() && s.group_len >= 2) {
            continue;
        }
        let refusal = refusal.clone();
        let peers_latency = median(s.peers(i).iter().map(|o| o.latency_ms).collect());
        let b = &mut s.all[i];
        b.settled = true;
        let overloaded = match (b.input.observed, peers_latency) {
            (Some(o), Some(pl))
                if o.latency_ms > p.latency_target_ms && pl <= p.latency_target_ms =>
            {
                Some((o.latency_ms, pl))
            }
            _ => None,
        };
        if let Some((latency_ms, peers_latency_ms)) = overloaded {
            cut_overloaded(b, p, step, refusal, latency_ms, peers_latency_ms);
        } else if ramps_back(b, p) {
            // Back from a slow start with its window still filling (cleared while it was
            // down): without a model it returns, gradually, to where a backend without one
            // starts, rather than staying at the floor until the window refills.
            b.mode = Mode::Gradual {
                target: b.configured,
                learned: false,
            };
            let steps = b.state.refused_steps;
            b.reasons.push(Reason::FitRefused { refusal, steps });
            b.reasons.push(Reason::RampBack {
                weight: b.configured,
            });
        } else if b.state.unsupported_steps >= p.stale_steps {
            b.mode = Mode::Gradual {
                target: b.configured,
                learned: false,
            };
            let steps = b.state.refused_steps;
            b.reasons.push(Reason::Stale { steps });
        } else {
            let steps = b.state.refused_steps;
            b.reasons.push(Reason::FitRefused { refusal, steps });
        }
    }
}

/// Returning (after a health failure, a drain or a passed trial) below its configured weight
/// and meeting the target, without a model: any refusal, not only too few samples (a passed
/// trial's window holds the drain's idle samples, and its fit is refused as flat).
fn ramps_back(b: &Backend, p: &WeightPolicy) -> bool {
    b.state.ramping_back
        && f64::from(b.input.current_weight) < b.configured
        && b.input
            .observed
            .is_none_or(|o| o.latency_ms <= p.latency_target_ms)
}

/// Cuts a backend without a model whose latency is above the target while its peers' median
/// meets it: a model needs unsaturated data, and an overloaded backend never produces any.
///
/// A backend that was learning (it has a capacity mean) has reached its knee: near it a
/// queue's latency falls steeply with its load, and the probes' mean lags each cut by a few
/// steps, so full cuts every step overshoot. It is cut by sqrt(target / latency) at most every
/// `hysteresis_steps`. Without a model ever (saturated from the start), the full step each time.
fn cut_overloaded(
    b: &mut Backend,
    p: &WeightPolicy,
    step: u64,
    refusal: Refusal,
    latency_ms: f64,
    peers_latency_ms: f64,
) {
    let cur = f64::from(b.input.current_weight);
    let st = &mut b.state;
    st.unsupported_steps = 0;
    st.ramping_back = false;
    let lo = p.floor * b.configured;
    let learner = st.capacity.is_some();
    let waiting = learner
        && st
            .last_change
            .is_some_and(|at| step < at + u64::from(p.hysteresis_steps.max(1)));
    let ratio = if learner {
        (p.latency_target_ms / latency_ms).sqrt()
    } else {
        0.0
    };
    let t = if waiting {
        cur
    } else {
        (cur * ratio.max(1.0 - p.max_step_ratio)).max(lo)
    };
    let steps = st.refused_steps;
    b.reasons.push(Reason::FitRefused { refusal, steps });
    let overloaded = Reason::Overloaded {
        latency_ms,
        peers_latency_ms,
        target: t,
    };
    if waiting {
        b.reasons.push(overloaded);
    } else if t <= cur - 0.5 {
        b.target = Some(t);
        b.mode = Mode::Gradual {
            target: t,
            learned: true,
        };
        b.reasons.push(overloaded);
    } else {
        b.reasons.push(Reason::AtFloor { floor_weight: lo });
    }
}

pub(super) fn describe(r: &Reason, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    let s = f64::from(WEIGHT_SCALE);
    match r {
        Reason::FitRefused { refusal, steps } => {
            write!(f, "held: no model for {steps} steps: {refusal}")
        }
        Reason::Stale { steps } => write!(
            f,
            "no model for {steps} steps: returning to the configured weight"
        ),
        Reason::RampBack { weight } => write!(
            f,
            "no model yet, meeting the target: ramping back to the configured {:.2}",
            weight / s
        ),
        Reason::Overloaded {
            latency_ms,
            peers_latency_ms,
            target,
        } => write!(
            f,
            "overloaded: latency {latency_ms:.1} ms above the target while peers' median is {peers_latency_ms:.1} ms; cut toward {:.2}",
            target / s
        ),
        _ => unreachable!("not a reason of a backend without a model: {r:?}"),
    }
}

#[cfg(test)]
mod tests {
    use crate::learning::testkit::*;
    use crate::learning::*;

    #[test]
    fn refused_fit_keeps_the_configured_weight_and_says_why() {
        let p = policy();
        let inputs = vec![
            input(1, 100, Ok(mm1_fit(100.0))),
            input(2, 100, Ok(mm1_fit(300.0))),
            input(
                3,
                100,
                Err(Refusal::NoLoadVariation {
                    cv: 0.01,
                    need: 0.1,
                }),
            ),
        ];
        let d = decide(&inputs, &p, &PolicyState::default());
        assert_eq!(weight(&d, 3), 10_000);
        assert!(matches!(reasons(&d, 3)[0], Reason::FitRefused { .. }));
        assert!(reasons(&d, 3)[0].to_string().contains("load variation"));
        // The two with a model share their own configured total.
        assert!(weight(&d, 1) < 10_000 && weight(&d, 2) > 10_000);
        // Only one backend with a model: nothing to compare with, held.
        let one = vec![
            input(1, 100, Ok(mm1_fit(100.0))),
            input(2, 100, Err(Refusal::TooFewSamples { have: 3, need: 30 })),
        ];
        let d = decide(&one, &p, &PolicyState::default());
        assert_eq!(d.weights(), vec![(1, 10_000), (2, 10_000)]);
        assert_eq!(reasons(&d, 1), &[Reason::NoPeers { fitted: 1 }]);
        assert!(d.events.is_empty());
    }

    #[test]
    fn stale_learned_weights_return_to_configured() {
        let p = WeightPolicy {
            stale_steps: 3,
            ..policy()
        };
        let refused = || Err(Refusal::PoorFit { r2: 0.1, need: 0.6 });
        let mut inputs = vec![input(1, 100, refused()), input(2, 100, refused())];
        inputs[0].current_weight = 5_000;
        let mut state = PolicyState::default();
        let ds = run(&mut inputs, &p, &mut state, 10);
        assert_eq!(weight(&ds[0], 1), 5_000, "held at first");
        assert!(matches!(reasons(&ds[2], 1)[0], Reason::Stale { steps: 3 }));
        assert_eq!(weight(&ds[9], 1), 10_000, "back to configured");
    }

    #[test]
    fn an_overloaded_backend_without_a_model_is_cut_until_the_floor_then_drained() {
        // No backend has enough samples for a model (a saturated backend never provides
        // them); backend 1 misses the 100 ms target while its peers meet it.
        let refusal = || Err(Refusal::TooFewSamples { have: 3, need: 30 });
        let mut inputs: Vec<BackendInput> = (1..=3).map(|id| input(id, 1, refusal())).collect();
        // Not an outlier (150 ms is not 5 times the peers' 42.5 ms): this is load, not failure.
        inputs[0].observed = Some(observed(120.0, 150.0));
        inputs[1].observed = Some(observed(120.0, 40.0));
        inputs[2].observed = Some(observed(120.0, 45.0));
        let p = unbudgeted();
        let mut state = PolicyState::default();
        let ds = run(&mut inputs, &p, &mut state, 8);
        let w: Vec<u32> = ds.iter().map(|d| weight(d, 1)).collect();
        // 25% per step down to the floor (a quarter of the configured 100); still missing the
        // target there for outlier_steps steps, drained (no cut can help any more).
        assert_eq!(w[0], 75, "{w:?}");
        assert!(w.windows(2).all(|p| p[1] <= p[0]), "{w:?}");
        let at_floor = w.iter().position(|&x| x == 25).expect("reaches the floor");
        assert_eq!(w[at_floor + p.outlier_steps as usize - 1], 25, "{w:?}");
        assert_eq!(w[at_floor + p.outlier_steps as usize], 0, "{w:?}");
        assert!(reasons(&ds[0], 1)
            .iter()
            .any(|r| matches!(r, Reason::Overloaded { .. })));
        assert!(reasons(&ds[at_floor + 1], 1)
            .iter()
            .any(|r| matches!(r, Reason::AtFloor { .. })));
        assert!(reasons(&ds[at_floor + p.outlier_steps as usize], 1)
            .iter()
            .any(|r| matches!(
                r,
                Reason::Drained { outlier, .. } if outlier.reference_kind == Reference::Target
            )));
        for id in [2, 3] {
            assert!(ds.iter().all(|d| weight(d, id) == 100), "peers held");
        }
        // Every backend over the target: nobody to hand load to, nothing cut.
        let mut all_slow: Vec<BackendInput> = (1..=3).map(|id| input(id, 1, refusal())).collect();
        for b in &mut all_slow {
            b.observed = Some(observed(120.0, 400.0));
        }
        let d = decide(&all_slow, &p, &PolicyState::default());
        assert!(!d.changed(), "{:?}", d.weights());
    }

    #[test]
    fn a_learning_backend_at_its_knee_is_cut_gently_and_keeps_its_capacity() {
        // Backend 3 learned by headroom (flat latency), then reaches its knee: no fit, 130 ms
        // against the 100 ms target while its peers meet it.
        let p = unbudgeted();
        let mut inputs = two_fitted_and_a_flat_one();
        let mut state = PolicyState::default();
        run(&mut inputs, &p, &mut state, 10);
        let c0 = state.backends[&3].capacity.expect("a capacity mean");
        inputs[2].observed = Some(observed(60.0, 130.0));
        let before = inputs[2].current_weight;
        let ds = run(&mut inputs, &p, &mut state, 7);
        let w: Vec<u32> = ds.iter().map(|d| weight(d, 3)).collect();
        // sqrt(100 / 130) = 0.877 of its weight, then held for hysteresis_steps while the
        // probes catch up, then cut again: not 25% a step.
        let first = (f64::from(before) * (100.0f64 / 130.0).sqrt()).round() as u32;
        assert_eq!(w[0], first, "{w:?}");
        assert_eq!(&w[1..3], &[first, first], "{w:?}");
        assert!(w[3] < first, "{w:?}");
        assert!(
            reasons(&ds[1], 3)
                .iter()
                .any(|r| matches!(r, Reason::Overloaded { .. })),
            "{:?}",
            reasons(&ds[1], 3)
        );
        // Its capacity mean falls toward the load it misses the target at, three tenths a step.
        let c1 = ds[0].state.backends[&3].capacity.unwrap();
        assert!((c1 - (c0 + 0.3 * (60.0 - c0))).abs() < 1e-9, "{c0} -> {c1}");
        assert!(ds[6].state.backends[&3].capacity.unwrap() < c1);
        // A backend that never had a model is cut the full step every time (see
        // an_overloaded_backend_without_a_model_is_cut_until_the_floor_then_drained).
    }
}
