//! Stage: what supports a backend's weight this step, its fit or its headroom, and how long it
//! has gone without either.
use super::{capacity::MEASURED_REACH, BackendInput, Step, WeightPolicy};
use crate::learning::Refusal;

/// Estimates the capacity of backends whose latency is flat while they meet the target.
///
/// A backend without a model whose latency is flat (refused as a poor fit, for too little load
/// variation, or with latency not rising with load) while it meets the target can take at least
/// its load × target / latency: exact for a backend whose latency grows in proportion to its
/// load, low for a queue, whose latency stays flat until near its capacity. Among several such
/// backends it hands load to the one with the lowest latency, so it settles where latencies
/// are equal.
pub(super) fn estimate_headroom(s: &mut Step) {
    let p = s.p;
    for b in &mut s.all {
        b.headroom = headroom(&b.input, p);
    }
}

fn headroom(b: &BackendInput, p: &WeightPolicy) -> Option<f64> {
    match (&b.fit, b.observed) {
        (
            Err(
                Refusal::PoorFit { .. }
                | Refusal::NoLoadVariation { .. }
                | Refusal::NonPhysical { .. },
            ),
            Some(o),
        ) if o.load > 0.0 && o.latency_ms > 0.0 && o.latency_ms < p.latency_target_ms => {
            // The window's peak rather than the recent load: an estimate proportional to
            // the recent load follows the load's noise, and moves the weights with it.
            let load = b.peak_load.unwrap_or(o.load).max(o.load);
            Some(load * (p.latency_target_ms / o.latency_ms).min(p.max_extrapolation))
        }
        _ => None,
    }
}

/// Counts refused and unsupported steps and keeps the last accepted fit (the outlier
/// reference) until it is `stale_steps` old.
///
/// A backend meeting the target with headroom supports its weight without a fit: it does not
/// go stale (which would hand a relieved backend back the load that saturated it).
pub(super) fn track_fits(s: &mut Step) {
    let (p, step) = (s.p, s.step);
    for b in &mut s.all {
        let st = &mut b.state;
        match &b.input.fit {
            Ok(f) => {
                st.refused_steps = 0;
                st.unsupported_steps = 0;
                st.last_fit = Some((step, *f));
                // A returning backend's fit that measured its capacity sets its weight from
                // now on; one extrapolated past its (ramping) load does not end the ramp.
                if f.capacity_at(p.latency_target_ms) <= MEASURED_REACH * f.load_max {
                    st.ramping_back = false;
                }
            }
            Err(_) => {
                st.refused_steps = st.refused_steps.saturating_add(1);
                st.unsupported_steps = if b.headroom.is_some() {
                    0
                } else {
                    st.unsupported_steps.saturating_add(1)
                };
            }
        }
        if st
            .last_fit
            .is_some_and(|(at, _)| step.saturating_sub(at) > u64::from(p.stale_steps))
        {
            st.last_fit = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::learning::testkit::*;
    use crate::learning::*;

    #[test]
    fn a_flat_backend_far_below_the_target_is_given_load_by_its_headroom() {
        // Two backends with models (50 per second at the 100 ms target); the third has no
        // model because its latency is flat (10 ms at 50 per second): 50 x 100 / 10 = 500 per
        // second, limited to twice its load (max_extrapolation), so it gains weight instead
        // of keeping a third.
        let p = unbudgeted();
        let mut inputs = two_fitted_and_a_flat_one();
        let d = decide(&inputs, &p, &PolicyState::default());
        assert!(weight(&d, 3) > 100, "{:?}", d.weights());
        assert!(
            weight(&d, 1) < 100 && weight(&d, 2) < 100,
            "{:?}",
            d.weights()
        );
        assert!(reasons(&d, 3).iter().any(|r| matches!(
            r,
            Reason::Headroom { capacity_estimate, .. } if (*capacity_estimate - 100.0).abs() < 1e-9
        )));
        // The load it has been seen to carry is the window's peak, not the last few seconds'
        // (which follow the load's noise).
        let mut peaked = inputs.clone();
        peaked[2].peak_load = Some(80.0);
        let d = decide(&peaked, &p, &PolicyState::default());
        assert!(reasons(&d, 3).iter().any(|r| matches!(
            r,
            Reason::Headroom { capacity_estimate, .. } if (*capacity_estimate - 160.0).abs() < 1e-9
        )), "{:?}", reasons(&d, 3));
        // At the target, a flat latency proves nothing: held.
        inputs[2].observed = Some(observed(50.0, 100.0));
        let d = decide(&inputs, &p, &PolicyState::default());
        assert_eq!(weight(&d, 3), 100, "{:?}", d.weights());
        // With no fitted backend at all there is nothing to learn: every flat backend holds
        // its configured weight, and (meeting the target) never goes stale.
        let mut flat: Vec<BackendInput> = (1..=3)
            .map(|id| {
                let mut b = input(id, 1, Err(Refusal::PoorFit { r2: 0.1, need: 0.6 }));
                b.observed = Some(observed(20.0 * f64::from(id), 10.0));
                b
            })
            .collect();
        flat[0].current_weight = 60;
        let mut state = PolicyState::default();
        for _ in 0..2 * p.stale_steps {
            let d = decide(&flat, &p, &state);
            assert_eq!(d.weights(), vec![(1, 60), (2, 100), (3, 100)]);
            state = d.state;
        }
    }
}
