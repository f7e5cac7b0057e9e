//! Stage: capacity estimation. Each backend of the learning group gets a capacity at the latency
//! target, a running mean of its fit's (or headroom's) estimates; the group's weights are
//! shares of the sum.
use std::fmt;

use super::{exploration, Backend, Step, WeightPolicy};
use crate::learning::Reason;

/// A fit measures a capacity (which is then remembered) when the capacity is at most this
/// multiple of the highest load in its window.
pub(super) const MEASURED_REACH: f64 = 1.25;
/// A remembered capacity is dropped when the backend's latency falls below this share of what
/// the measured model predicts at its load: it has become faster than it was measured.
const REMEMBERED_LATENCY_SHARE: f64 = 0.7;
/// A new estimate below this share of the mean is news (a 5x slowdown), not noise.
const NEWS_FALL: f64 = 0.7;

/// Forms the learning group: serving, learning, unpinned backends whose model or headroom sets
/// their weight. Only with a fitted backend (or one with a remembered measurement) among them:
/// when no backend's latency depends on its load there is nothing to learn, and weights stay.
pub(super) fn form_group(s: &mut Step) {
    let p = s.p;
    for b in &mut s.all {
        b.in_group = b.serving_now()
            && b.learning(p)
            && b.input.pinned.is_none()
            && b.state.carry.is_none()
            && (b.input.fit.is_ok() || b.headroom.is_some());
    }
    if !s
        .all
        .iter()
        .any(|b| b.in_group && (b.input.fit.is_ok() || b.state.measured.is_some()))
    {
        for b in &mut s.all {
            b.in_group = false;
        }
    }
    s.group_len = s.all.iter().filter(|b| b.in_group).count();
}

/// The running means' weight for news: falls count three times as much as rises.
pub(super) fn news_smoothing(p: &WeightPolicy) -> f64 {
    (3.0 * p.capacity_smoothing).min(1.0)
}

/// The spread of a running mean with smoothing a, sd × sqrt(a / (2 - a)), relative to the
/// mean `c`: the noise that widens the deadband.
pub(super) fn mean_noise(p: &WeightPolicy, var: f64, c: f64) -> f64 {
    let a = p.capacity_smoothing;
    (var * a / (2.0 - a)).sqrt() / c
}

/// Updates every backend's capacity mean and its noise, then the group's sums.
pub(super) fn estimate(s: &mut Step) {
    let p = s.p;
    for b in &mut s.all {
        estimate_one(b, p);
    }
    s.pool_cap = s.all.iter().filter(|b| b.in_group).map(|b| b.cap).sum();
    s.group_cfg = s
        .all
        .iter()
        .filter(|b| b.in_group)
        .map(|b| b.configured)
        .sum();
}

fn estimate_one(b: &mut Backend, p: &WeightPolicy) {
    let (raw, measured_now) = raw_estimate(b, p);
    if remembered(b, p, measured_now) {
        return;
    }
    b.state.measured = match &b.input.fit {
        Ok(f) if measured_now => Some(*f),
        _ => None,
    };
    if at_knee(b, p, raw) {
        return;
    }
    match raw {
        Some(raw) if b.in_group => smooth(b, p, raw),
        _ => {
            b.state.capacity = None;
            b.state.capacity_var = None;
            b.state.measured = None;
        }
    }
}

/// This step's estimate, bounded by `max_extrapolation` times the load seen (which makes it
/// bound by the backend's own load), and whether the fit measured it.
fn raw_estimate(b: &mut Backend, p: &WeightPolicy) -> (Option<f64>, bool) {
    let (raw, bound, measured_now) = match &b.input.fit {
        Ok(f) => {
            let fitted = f.capacity_at(p.latency_target_ms);
            let limit = p.max_extrapolation * f.load_max;
            if fitted > limit && b.in_group {
                b.reasons.push(Reason::Extrapolation { fitted, limit });
            }
            (
                Some(fitted.min(limit)),
                fitted > limit,
                fitted <= MEASURED_REACH * f.load_max,
            )
        }
        Err(_) => (b.headroom, b.headroom.is_some(), false),
    };
    b.load_bound = bound;
    (raw, measured_now)
}

/// Keeps a measured capacity while this step's estimate is weaker evidence.
///
/// Measured: a fit whose capacity lies within `MEASURED_REACH` of the highest load in the
/// window. Anything else (headroom, a capped fit, a line through a nearly flat latency) is
/// mostly evidence of the backend's own load: a capacity bound by it grows with the weight it
/// is given, so a weight it sets confirms itself and the load's noise walks it. The measured
/// mean stays while the backend carries no more than it, meets the target, and is not clearly
/// faster than the measured model predicts (a backend that recovered from a slowdown is, and
/// is explored again).
fn remembered(b: &mut Backend, p: &WeightPolicy, measured_now: bool) -> bool {
    let found = match (b.state.measured, b.state.capacity, b.input.observed) {
        (Some(f), Some(c), Some(o)) if !measured_now && b.in_group => {
            let predicted_ms = f.predict_latency_ms(o.load);
            (o.load <= c
                && !b.misses_target(p)
                && o.latency_ms >= REMEMBERED_LATENCY_SHARE * predicted_ms)
                .then_some((c, predicted_ms, o))
        }
        _ => None,
    };
    let Some((c, predicted_ms, o)) = found else {
        return false;
    };
    b.load_bound = false;
    b.cap = c;
    if let Some(var) = b.state.capacity_var {
        b.cap_noise = mean_noise(p, var, c);
    }
    b.reasons.push(Reason::Remembered {
        capacity: c,
        load: o.load,
        latency_ms: o.latency_ms,
        predicted_ms,
    });
    true
}

/// A learning backend that reached its knee (no fit, no headroom: it misses the target while
/// serving) keeps its capacity mean, falling toward the load it misses the target at as news
/// does; the overload rule cuts it gently while it has one, and it rejoins the group from there
/// rather than from a fresh, optimistic estimate.
fn at_knee(b: &mut Backend, p: &WeightPolicy, raw: Option<f64>) -> bool {
    let missing = b.input.observed.filter(|_| b.misses_target(p));
    let (None, Some(c), Some(o)) = (raw, b.state.capacity, missing) else {
        return false;
    };
    if !(b.serving_now() && b.learning(p) && b.input.pinned.is_none()) {
        return false;
    }
    b.state.capacity = Some(if o.load < c {
        c + news_smoothing(p) * (o.load - c)
    } else {
        c
    });
    b.state.measured = None;
    true
}

/// Moves the running mean toward this step's estimate `raw`.
///
/// Falls count three times as much as rises when they are news: the backend misses the target,
/// or the estimate is below `NEWS_FALL` of the mean. A backend losing capacity is relieved
/// sooner than one gaining it is given more. Not for falls within the noise: an asymmetric
/// mean of a noisy estimate settles below the estimate's mean, the more so the noisier it is.
fn smooth(b: &mut Backend, p: &WeightPolicy, raw: f64) {
    let news = b.misses_target(p);
    let falls_as_news = |c: f64| raw < c && (news || raw < NEWS_FALL * c);
    if exploration::held(b, p, raw, falls_as_news) {
        return;
    }
    let st = &mut b.state;
    let c = st.capacity.map_or(raw, |c| {
        let a = if falls_as_news(c) {
            news_smoothing(p)
        } else {
            p.capacity_smoothing
        };
        c + a * (raw - c)
    });
    let dev2 = st.capacity.map_or(0.0, |prev| (raw - prev).powi(2));
    let var = st
        .capacity_var
        .map_or(dev2, |v| v + p.capacity_smoothing * (dev2 - v));
    st.capacity_var = Some(var);
    if c > 0.0 {
        b.cap_noise = mean_noise(p, var, c);
    }
    b.cap = c;
    st.capacity = Some(c);
}

pub(super) fn describe(r: &Reason, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    match r {
        Reason::Extrapolation { fitted, limit } => write!(
            f,
            "fitted capacity {fitted:.1}/s is past what its load shows: taken as {limit:.1}/s"
        ),
        Reason::Remembered {
            capacity,
            load,
            latency_ms,
            predicted_ms,
        } => write!(
            f,
            "capacity {capacity:.1}/s as last measured: at its load {load:.1}/s its latency {latency_ms:.1} ms meets the target and the measured model's {predicted_ms:.1} ms (this step's estimate only reflects its own load)"
        ),
        _ => unreachable!("not a capacity reason: {r:?}"),
    }
}

#[cfg(test)]
mod tests {
    use crate::learning::testkit::*;
    use crate::learning::*;

    #[test]
    fn fitted_capacities_are_limited_to_what_the_load_shows() {
        // Backend 1's line extrapolates to 990/s at the target, but it was never seen above
        // 80/s: taken as 160/s (max_extrapolation 2), so it gets 160 / (160 + 90) of the pool,
        // not 990 / (990 + 90).
        let p = unbudgeted();
        let mut wide = mm1_fit(1000.0);
        (wide.load_min, wide.load_max, wide.load_mean) = (20.0, 80.0, 50.0);
        let inputs = vec![input(1, 1, Ok(wide)), input(2, 1, Ok(mm1_fit(100.0)))];
        let d = decide(&inputs, &p, &PolicyState::default());
        assert!(reasons(&d, 1).iter().any(|r| matches!(
            r,
            Reason::Extrapolation { fitted, limit } if (*fitted - 990.0).abs() < 1e-6 && (*limit - 160.0).abs() < 1e-9
        )), "{:?}", reasons(&d, 1));
        let target = d.backends[0].target_weight.unwrap();
        assert!((target - 200.0 * 160.0 / 250.0).abs() < 1e-6, "{target}");
    }

    #[test]
    fn capacities_are_smoothed_across_steps() {
        // Capacity estimates alternating 150/50 against a steady 100: with smoothing the
        // target swings far less than the raw estimates do.
        let swing = |smoothing: f64| {
            let p = WeightPolicy {
                capacity_smoothing: smoothing,
                ..unbudgeted()
            };
            let mut inputs = vec![
                input(1, 100, Ok(mm1_fit(110.0))),
                input(2, 100, Ok(mm1_fit(110.0))),
            ];
            let mut state = PolicyState::default();
            let mut targets = Vec::new();
            for k in 0..30 {
                inputs[0].fit = Ok(mm1_fit(if k % 2 == 0 { 160.0 } else { 60.0 }));
                let d = decide(&inputs, &p, &state);
                targets.push(d.backends[0].target_weight.unwrap());
                state = d.state;
            }
            let tail = &targets[10..];
            tail.iter().cloned().fold(f64::MIN, f64::max)
                - tail.iter().cloned().fold(f64::MAX, f64::min)
        };
        let (raw, smoothed) = (swing(1.0), swing(0.2));
        println!("target swing: {raw:.1} raw, {smoothed:.1} smoothed");
        assert!(smoothed < 0.4 * raw, "raw {raw}, smoothed {smoothed}");
    }

    /// Two backends whose capacity was measured (M/M/1, 60/s: 50/s at the 100 ms target) and
    /// a flat third; then the two measured ones go flat at a lower share (their fits refused,
    /// as once the window no longer holds loaded samples).
    fn measured_then_flat() -> (Vec<BackendInput>, WeightPolicy, PolicyState) {
        let p = unbudgeted();
        let mut inputs = two_fitted_and_a_flat_one();
        for b in &mut inputs[..2] {
            b.observed = Some(observed(30.0, 1000.0 / 30.0));
        }
        let mut state = PolicyState::default();
        run(&mut inputs, &p, &mut state, 3);
        for b in &mut inputs[..2] {
            b.fit = Err(Refusal::PoorFit { r2: 0.2, need: 0.6 });
            b.peak_load = Some(40.0);
        }
        (inputs, p, state)
    }

    #[test]
    fn a_measured_capacity_stays_while_an_estimate_bound_by_the_load_agrees_with_it() {
        let (mut inputs, p, state) = measured_then_flat();
        let before = state.backends[&1].capacity.unwrap();
        assert!((before - 50.0).abs() < 1e-6, "{before}");
        // Headroom alone would say 2 x 40 = 80/s; the measured 50/s stays.
        let d = decide(&inputs, &p, &state);
        assert_eq!(d.state.backends[&1].capacity, Some(before));
        assert!(
            reasons(&d, 1).iter().any(|r| matches!(
                r,
                Reason::Remembered { capacity, .. } if (*capacity - 50.0).abs() < 1e-6
            )),
            "{:?}",
            reasons(&d, 1)
        );
        // Clearly faster than the measured model predicts at its load (10 ms against 33):
        // measured again, from the headroom.
        inputs[0].observed = Some(observed(30.0, 10.0));
        let d = decide(&inputs, &p, &state);
        assert!(d.state.backends[&1].capacity.unwrap() > before);
        assert!(d.state.backends[&1].measured.is_none());
        // Carrying more than the measured capacity while meeting the target: the same.
        inputs[0].observed = Some(observed(55.0, 90.0));
        let d = decide(&inputs, &p, &state);
        assert!(d.state.backends[&1].capacity.unwrap() > before);
        // Missing the target is news too: not remembered.
        inputs[0].observed = Some(observed(30.0, 120.0));
        let d = decide(&inputs, &p, &state);
        assert!(!reasons(&d, 1)
            .iter()
            .any(|r| matches!(r, Reason::Remembered { .. })));
    }
}
