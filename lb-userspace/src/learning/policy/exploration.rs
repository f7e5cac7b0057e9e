//! Stage: exploration. An estimate bound by a backend's own load grows with the weight it is
//! given; it is explored (followed upward) only while a peer needs relief.
use std::fmt;

use super::{capacity::mean_noise, Backend, Step, WeightPolicy};
use crate::learning::Reason;

/// A backend carrying at least this share of its capacity mean is under pressure: its peers'
/// estimates bound by their own load may grow to relieve it.
const PRESSURE_SHARE: f64 = 0.8;
/// Steps with every peer at ease before an explored estimate stops growing. Pressure is judged
/// on a few seconds' means, which dip below the threshold in the load's troughs: stopping at
/// the first dip would leave the weights to move again at the next peak.
const EASE_STEPS: u32 = 20;
/// A peer this many times slower than a backend is relieved by giving that backend more.
const SLOWER_PEER: f64 = 2.0;

/// Counts, per backend, the consecutive steps in which no peer needed relief from it: none
/// under pressure (missing the target, or loaded near its capacity mean) nor `SLOWER_PEER`
/// times slower than it.
pub(super) fn count_ease(s: &mut Step) {
    let p = s.p;
    let pressed: Vec<bool> = s
        .all
        .iter()
        .map(|b| {
            b.in_group
                && (b.misses_target(p)
                    || b.state
                        .capacity
                        .zip(b.input.observed)
                        .is_some_and(|(c, o)| o.load >= PRESSURE_SHARE * c))
        })
        .collect();
    let n = s.all.len();
    for i in 0..n {
        let needed = (0..n).any(|j| {
            j != i
                && (pressed[j]
                    || s.all[j].in_group
                        && s.all[j]
                            .input
                            .observed
                            .zip(s.all[i].input.observed)
                            .is_some_and(|(oj, oi)| oj.latency_ms > SLOWER_PEER * oi.latency_ms))
        });
        let st = &mut s.all[i].state;
        st.at_ease_steps = if needed {
            0
        } else {
            st.at_ease_steps.saturating_add(1)
        };
    }
}

/// Holds the capacity mean of a backend whose estimate is bound by its own load once it has its
/// configured share and no peer has needed relief for `EASE_STEPS` steps: more of it would only
/// move flows nobody needs moved, and the window's peak load it follows walks with the load's
/// noise. Not when the estimate falls as news.
pub(super) fn held(
    b: &mut Backend,
    p: &WeightPolicy,
    raw: f64,
    falls_as_news: impl Fn(f64) -> bool,
) -> bool {
    let Some(c) = b.state.capacity.filter(|&c| {
        b.load_bound
            && f64::from(b.input.current_weight) >= b.configured
            && b.state.at_ease_steps >= EASE_STEPS
            && !falls_as_news(c)
    }) else {
        return false;
    };
    if let Some(var) = b.state.capacity_var {
        b.cap_noise = mean_noise(p, var, c);
    }
    b.cap = c;
    b.reasons.push(Reason::ExplorationHeld {
        capacity: c,
        estimate: raw,
    });
    true
}

pub(super) fn describe(r: &Reason, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    match r {
        Reason::ExplorationHeld { capacity, estimate } => write!(
            f,
            "capacity kept at {capacity:.1}/s (this step's {estimate:.1}/s is bound by its own load, it has at least its configured share, and for {EASE_STEPS} steps no peer has missed the target, run above {:.0}% of its capacity or been {SLOWER_PEER}x slower)",
            PRESSURE_SHARE * 100.0
        ),
        _ => unreachable!("not an exploration reason: {r:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::learning::testkit::*;
    use crate::learning::*;

    #[test]
    fn an_explored_capacity_grows_only_while_a_peer_needs_relief() {
        // The fitted backends (50/s at the target) carry 30/s at 33 ms; the flat one carries
        // 50/s at 25 ms, explored at twice its load: 100/s, more than its configured third.
        let p = unbudgeted();
        let mut inputs = two_fitted_and_a_flat_one();
        for b in &mut inputs[..2] {
            b.observed = Some(observed(30.0, 1000.0 / 30.0));
        }
        inputs[2].observed = Some(observed(50.0, 25.0));
        let mut state = PolicyState::default();
        // The weights reach their targets (step-limited to 25% a step), and every peer has
        // been at ease for EASE_STEPS steps.
        run(&mut inputs, &p, &mut state, 4 + EASE_STEPS as usize);
        let c0 = state.backends[&3].capacity.unwrap();
        assert!((c0 - 100.0).abs() < 1e-9, "{c0}");
        assert!(inputs[2].current_weight > 100);
        // Its window's peak rises (the load's noise, or the weight it was given): with every
        // peer at ease its capacity stays, and so do the weights.
        inputs[2].peak_load = Some(80.0);
        let d = decide(&inputs, &p, &state);
        assert_eq!(d.state.backends[&3].capacity, Some(c0));
        assert!(
            reasons(&d, 3).iter().any(
                |r| matches!(r, Reason::ExplorationHeld { capacity, estimate }
                    if *capacity == c0 && (*estimate - 160.0).abs() < 1e-9)
            ),
            "{:?}",
            reasons(&d, 3)
        );
        assert!(!d.changed(), "{:?}", d.weights());
        // A peer near its capacity (45 of 50/s), a peer 2.2x slower (55 ms), or a peer
        // missing the target: the estimate grows to relieve it; 1.6x slower (40 ms) is noise.
        let mut noisy = inputs.clone();
        noisy[0].observed = Some(observed(30.0, 40.0));
        assert_eq!(
            decide(&noisy, &p, &state).state.backends[&3].capacity,
            Some(c0)
        );
        for (load, latency_ms) in [(45.0, 30.0), (30.0, 55.0), (30.0, 120.0)] {
            let mut pressed = inputs.clone();
            pressed[0].observed = Some(observed(load, latency_ms));
            let d = decide(&pressed, &p, &state);
            let c = d.state.backends[&3].capacity.unwrap();
            assert!(
                c > c0,
                "{load}/s at {latency_ms} ms: {c} {:?}",
                reasons(&d, 3)
            );
            // And it goes on growing until its peers have been at ease for EASE_STEPS steps.
            let (mut grown, mut st) = (inputs.clone(), d.state.clone());
            let ds = run(&mut grown, &p, &mut st, EASE_STEPS as usize);
            let caps: Vec<f64> = ds
                .iter()
                .map(|d| d.state.backends[&3].capacity.unwrap())
                .collect();
            let e = EASE_STEPS as usize;
            assert!(caps[..e - 1].windows(2).all(|w| w[1] > w[0]), "{caps:?}");
            assert_eq!(caps[e - 1], caps[e - 2], "{caps:?}");
        }
        // Below its configured share it is explored freely (a backend ramping back after a
        // slowdown must be able to regain its share with everyone at ease).
        let mut below = inputs.clone();
        below[2].current_weight = 90;
        let d = decide(&below, &p, &state);
        assert!(d.state.backends[&3].capacity.unwrap() > c0);
        // A fall is news only past NEWS_FALL (or missing the target): a small one is held too.
        let mut fell = inputs.clone();
        fell[2].peak_load = Some(45.0);
        fell[2].observed = Some(observed(45.0, 25.0));
        let d = decide(&fell, &p, &state);
        assert_eq!(d.state.backends[&3].capacity, Some(c0));
        fell[2].peak_load = Some(30.0);
        fell[2].observed = Some(observed(30.0, 25.0));
        let d = decide(&fell, &p, &state);
        assert!(d.state.backends[&3].capacity.unwrap() < c0);
    }
}
