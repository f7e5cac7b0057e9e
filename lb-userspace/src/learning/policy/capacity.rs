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
/// A backend missing the target with a latency past this multiple of its pool's median is
/// not pooled (`pool`).
const POOL_LATENCY_SPREAD: f64 = 1.5;

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
    pool(s);
    s.pool_cap = s.all.iter().filter(|b| b.in_group).map(|b| b.cap).sum();
    s.group_cfg = s
        .all
        .iter()
        .filter(|b| b.in_group)
        .map(|b| b.configured)
        .sum();
}

/// Gives backends whose estimates cannot be told apart one capacity: sorted by capacity per
/// configured unit, runs of the group within `pool_ratio` (first to last) share their mean.
/// Equal workpools' running means spread up to 1.33x in the e2e slowdown (the default is
/// 1.35); two hardware generations (1.5x) stay apart.
///
/// Equal backends' fits differ by up to a third from step to step and the difference lasts
/// (a fit against a headroom, a window with a burst): without pooling, the one estimated
/// highest carries the most and its p99 is everyone's, and the deadband, widened by the same
/// noise, keeps the spread. Pooled, their weights follow their configured ones and move
/// together with the pool's capacity. The sum is kept, so the other backends' shares do not
/// change. A backend whose estimate fell as news, or that misses the target with a latency
/// past `POOL_LATENCY_SPREAD` times the others' (lower) median, is left out: its own estimate is the
/// news. (Near their knee equal backends take turns just missing the target; leaving each
/// out in its turn cut it and spread the weights as much as no pooling at all.)
fn pool(s: &mut Step) {
    let p = s.p;
    if p.pool_ratio < 1.0 {
        return;
    }
    let candidates: Vec<usize> = (0..s.all.len())
        .filter(|&i| {
            let b = &s.all[i];
            b.in_group && b.cap > 0.0 && b.configured > 0.0 && !b.news
        })
        .collect();
    let latency = |i: usize| s.all[i].input.observed.map(|o| o.latency_ms);
    let others_median = |i: usize| {
        let mut v: Vec<f64> = candidates
            .iter()
            .filter(|&&j| j != i)
            .filter_map(|&j| latency(j))
            .collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len().saturating_sub(1) / 2).copied()
    };
    let mut members: Vec<usize> = candidates
        .iter()
        .copied()
        .filter(|&i| {
            // The others' median only for a backend missing the target: the rest stay.
            let outlying = || match (latency(i), others_median(i)) {
                (Some(l), Some(m)) => l > POOL_LATENCY_SPREAD * m,
                _ => false,
            };
            !(s.all[i].misses_target(p) && outlying())
        })
        .collect();
    let unit = |b: &Backend| b.cap / b.configured;
    members.sort_by(|&i, &j| unit(&s.all[i]).total_cmp(&unit(&s.all[j])));
    let mut start = 0;
    while start < members.len() {
        let low = unit(&s.all[members[start]]);
        let end = start
            + members[start + 1..]
                .iter()
                .take_while(|&&i| unit(&s.all[i]) <= p.pool_ratio * low)
                .count()
            + 1;
        let run = &members[start..end];
        if run.len() >= 2 {
            let (cap, cfg) = run.iter().fold((0.0, 0.0), |(c, w), &i| {
                (c + s.all[i].cap, w + s.all[i].configured)
            });
            for &i in run {
                let b = &mut s.all[i];
                let pooled = cap / cfg * b.configured;
                b.reasons.push(Reason::Pooled {
                    own: b.cap,
                    pooled,
                    members: run.len(),
                    ratio: p.pool_ratio,
                });
                b.cap = pooled;
                b.pooled = true;
            }
        }
        start = end;
    }
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
            b.news = true;
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
        Reason::Pooled {
            own,
            pooled,
            members,
            ratio,
        } => write!(
            f,
            "capacity {own:.1}/s taken as {pooled:.1}/s, the mean of {members} backends within {ratio:.2}x of each other (equal backends' estimates spread that far)"
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
                pool_ratio: 0.0,
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

    /// Three equal backends whose fits disagree by up to 30% and swap places every 7 steps
    /// (one estimated high, one low), run for 60 steps; the spread of their weights at the end
    /// (highest over lowest) and the steps that changed a weight.
    fn equal_backends_with_disagreeing_fits(pool_ratio: f64) -> (f64, usize) {
        let p = WeightPolicy {
            pool_ratio,
            ..unbudgeted()
        };
        let mut inputs: Vec<_> = (1..=3)
            .map(|id| input(id, 100, Ok(mm1_fit(150.0))))
            .collect();
        let mut state = PolicyState::default();
        let mut changes = 0;
        for k in 0..60 {
            let shift = k / 7;
            for (i, b) in inputs.iter_mut().enumerate() {
                let mu = [130.0, 150.0, 170.0][(i + shift) % 3];
                b.fit = Ok(mm1_fit(mu));
                b.observed = Some(observed(80.0, 20.0));
            }
            let d = decide(&inputs, &p, &state);
            changes += usize::from(d.changed());
            apply(&mut inputs, &d);
            state = d.state;
        }
        let w: Vec<f64> = inputs.iter().map(|b| f64::from(b.current_weight)).collect();
        let spread =
            w.iter().cloned().fold(f64::MIN, f64::max) / w.iter().cloned().fold(f64::MAX, f64::min);
        (spread, changes)
    }

    #[test]
    fn equal_backends_whose_fits_disagree_keep_equal_weights() {
        let (own, own_changes) = equal_backends_with_disagreeing_fits(0.0);
        let (pooled, pooled_changes) =
            equal_backends_with_disagreeing_fits(WeightPolicy::default().pool_ratio);
        println!(
            "weights' spread: {own:.3} each on its own estimate ({own_changes} steps changed a weight), {pooled:.3} pooled ({pooled_changes})"
        );
        assert!(own > 1.05, "{own}");
        assert_eq!(pooled, 1.0);
        assert!(pooled_changes < own_changes);
    }

    #[test]
    fn only_backends_within_the_pool_ratio_share_a_capacity() {
        // Capacities 1:1.2:3 at the target: the first two pool (their mean, 110/s each; the
        // pool's sum unchanged), the third is three times as fast and keeps its own.
        let p = unbudgeted();
        let inputs = vec![
            input(1, 100, Ok(mm1_fit(110.0))),
            input(2, 100, Ok(mm1_fit(130.0))),
            input(3, 100, Ok(mm1_fit(310.0))),
        ];
        let d = decide(&inputs, &p, &PolicyState::default());
        for id in [1, 2] {
            assert!(
                reasons(&d, id).iter().any(|r| matches!(
                    r,
                    Reason::Pooled { pooled, members: 2, .. } if (*pooled - 110.0).abs() < 1e-9
                )),
                "{:?}",
                reasons(&d, id)
            );
        }
        assert!(!reasons(&d, 3)
            .iter()
            .any(|r| matches!(r, Reason::Pooled { .. })));
        let t: Vec<f64> = d
            .backends
            .iter()
            .map(|b| b.target_weight.unwrap())
            .collect();
        assert!((t[0] - t[1]).abs() < 1e-9, "{t:?}");
        assert!((t[2] / t[0] - 300.0 / 110.0).abs() < 1e-6, "{t:?}");
        assert!((t.iter().sum::<f64>() - 30_000.0).abs() < 1e-6, "{t:?}");
    }

    #[test]
    fn a_backend_missing_the_target_keeps_its_own_estimate() {
        // Backend 2's estimate is within the pool ratio, but it misses the latency target
        // at 4x its peer's latency: that is news about it, not noise to average away. Just
        // missing it, as equal backends near their knee take turns to, it stays pooled.
        let p = unbudgeted();
        let mut inputs = vec![
            input(1, 100, Ok(mm1_fit(130.0))),
            input(2, 100, Ok(mm1_fit(110.0))),
        ];
        assert_eq!(p.latency_target_ms, 100.0);
        inputs[0].observed = Some(observed(100.0, 90.0));
        inputs[1].observed = Some(observed(100.0, 110.0));
        let near = decide(&inputs, &p, &PolicyState::default());
        assert!(reasons(&near, 2)
            .iter()
            .any(|r| matches!(r, Reason::Pooled { .. })));
        inputs[0].observed = Some(observed(100.0, 30.0));
        inputs[1].observed = Some(observed(100.0, 120.0));
        let d = decide(&inputs, &p, &PolicyState::default());
        for id in [1, 2] {
            assert!(
                !reasons(&d, id)
                    .iter()
                    .any(|r| matches!(r, Reason::Pooled { .. })),
                "{:?}",
                reasons(&d, id)
            );
        }
    }
}
