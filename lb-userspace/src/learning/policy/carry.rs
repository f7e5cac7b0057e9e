//! Stage: carrying a slow backend. A backend drained for latency that misses the target even
//! unloaded is out for good while it stays slow, and its share goes to its peers. When that
//! share takes them past their knee (the pool's load above `carry_knee` of their capacity at
//! the target), their queues cost more than its slowness: it is carried instead, at the share
//! it can serve, found by feedback from its own latency against its unloaded latency (about
//! 70% of its capacity for a pool of a few workers). It serves correctly, only slowly; a
//! backend that fails (errors, probes timing out, passive signals) is drained as before.
use std::fmt;

use serde::{Deserialize, Serialize};

use super::{outliers::floor_weight, Backend, Step, WeightPolicy};
use crate::learning::{Reason, WEIGHT_SCALE};

/// Share of its configured weight a carried backend starts at.
const CARRY_START: f64 = 0.1;
/// Latency over unloaded latency a carried backend is held under: about 70% of the capacity
/// of a pool of 3 workers (M/D/3), less for fewer, more for many.
const CARRY_RATIO: f64 = 1.4;
/// Below this ratio it is given a little more.
const CARRY_RAISE_BELOW: f64 = 1.2;
/// Below this ratio (far from its knee) it is given more.
const CARRY_RAISE_FAST_BELOW: f64 = 1.1;
/// At this ratio (this step's, not smoothed) it is cut at once.
const CARRY_CUT_AT_ONCE: f64 = 2.0;
/// Weight of this step's ratio in the smoothed one: a 5 s mean of a few probes of a queue is
/// noisy, and the band above is narrow.
const RATIO_SMOOTHING: f64 = 0.3;
/// Its peers' load share below `carry_knee` times this ends the carry: the band keeps a load
/// near the knee from carrying and draining it in turn.
const RELEASE_FACTOR: f64 = 0.8;
/// Raises stay under this share of the weight it was last cut from: its latency is flat until
/// the knee and then steep (a worker pool at 65% of its capacity measured 1.03x its unloaded
/// latency, at 76% three probes in a row timed out), so a raise that finds the knee again
/// costs a queue or a health failure.
const KNEE_MARGIN: f64 = 0.9;
/// Cuts this close together are one excursion past the knee.
const KNEE_EXCURSION_STEPS: u64 = 10;
/// Steps the weight it was cut from is remembered: the load's mix and the backend change.
const KNEE_MEMORY_STEPS: u64 = 60;
/// A carried backend taken down by its health checks comes back carried at no more than this
/// share of the weight it failed at.
const FAILED_AT_SHARE: f64 = 0.7;

/// A slow backend carried at a share it can serve.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Carry {
    /// Its probes' latency with no load, measured while drained: the base of `ratio`.
    pub unloaded_ms: f64,
    /// The table weight it is carried at.
    pub weight: f64,
    /// Smoothed latency over `unloaded_ms` while it carries load.
    pub ratio: Option<f64>,
    /// Step of the last change of `weight`.
    pub moved_at: u64,
    /// The weight it was last cut from for missing its band (or failing probes), and when:
    /// raises stay under `KNEE_MARGIN` of it for `KNEE_MEMORY_STEPS`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub knee: Option<(f64, u64)>,
}

/// The pool's load (serving backends, and `i`) over the capacity at the target of the serving
/// backends other than `i` that are not carried themselves (a carried backend's capacity mean
/// is the one it had before it slowed down); `None` unless every one of them has a capacity
/// mean.
fn peers_load_share(s: &Step, i: usize) -> Option<f64> {
    let load = |b: &Backend| b.input.observed.map_or(0.0, |o| o.load);
    let others = (0..s.all.len()).filter(|&j| j != i && s.all[j].serving_now());
    let cap: f64 = others
        .clone()
        .filter(|&j| s.all[j].state.carry.is_none())
        .map(|j| s.all[j].state.capacity)
        .sum::<Option<f64>>()?;
    let pool: f64 = others.map(|j| load(&s.all[j])).sum::<f64>() + load(&s.all[i]);
    (cap > 0.0).then(|| pool / cap)
}

/// The highest weight it may be carried at: its floor (above it the weight rule has a say),
/// and less than what its health checks failed at.
fn ceiling(b: &Backend, p: &WeightPolicy) -> f64 {
    let w = floor_weight(&b.input, p).max(1.0);
    b.state.carry_limit.map_or(w, |l| w.min(l))
}

/// Starts carrying the backends drained for latency that are slow unloaded, not failing, and
/// whose peers are past their knee without them. Runs after `drains`.
pub(super) fn begin(s: &mut Step) {
    let (p, step) = (s.p, s.step);
    let Some(knee) = p.carry_knee else { return };
    for i in 0..s.all.len() {
        let b = &s.all[i];
        if b.state.drained_at.is_none()
            || b.state.drained_for.is_some()
            || !b.learning(p)
            || b.input.pinned.is_some()
            || !b.input.health.serving()
        {
            continue;
        }
        let Some(obs) = b.input.observed else {
            continue;
        };
        let share = peers_load_share(s, i);
        let b = &mut s.all[i];
        // Slow with no load: the base its carried latency is judged against.
        if b.input.current_weight == 0 && obs.load < 1.0 && obs.latency_ms > p.latency_target_ms {
            b.state.unloaded_ms = Some(obs.latency_ms);
        }
        let Some(unloaded_ms) = b.state.unloaded_ms else {
            continue;
        };
        let Some(share) = share else { continue };
        if obs.latency_ms <= p.latency_target_ms
            || obs.error_rate >= p.suspect_min_error_rate
            || share < knee
        {
            continue;
        }
        let weight = (CARRY_START * b.configured)
            .round()
            .max(1.0)
            .min(ceiling(b, p));
        let st = &mut b.state;
        st.drained_at = None;
        st.clean_steps = 0;
        st.carry = Some(Carry {
            unloaded_ms,
            weight,
            ratio: None,
            moved_at: step,
            knee: None,
        });
        b.undrained = true;
        b.reasons
            .retain(|r| !matches!(r, Reason::StillDrained { .. }));
        b.reasons.push(Reason::CarryStarted {
            unloaded_ms,
            peers_load_share: share,
            knee,
        });
    }
}

/// Steers every carried backend's weight by its latency against its unloaded latency, and
/// ends the carry when it recovers, fails its health checks, is pinned or no longer learns,
/// or its peers can take its share. Runs before `drains`.
pub(super) fn steer(s: &mut Step) {
    let (p, step) = (s.p, s.step);
    for i in 0..s.all.len() {
        let Some(mut c) = s.all[i].state.carry else {
            continue;
        };
        let share = peers_load_share(s, i);
        let b = &mut s.all[i];
        let end = |b: &mut Backend, why: CarryEnd| {
            b.state.carry = None;
            b.reasons.push(Reason::CarryEnded { why });
        };
        // Slow as it is, it is drained again (its unloaded latency measured afresh).
        let drain_again = |b: &mut Backend, why: CarryEnd| {
            let st = &mut b.state;
            st.drained_at = Some(step);
            st.clean_steps = 0;
            st.unloaded_ms = None;
            end(b, why);
        };
        if !b.learning(p) || b.input.pinned.is_some() || b.input.configured_weight == 0 {
            end(b, CarryEnd::Released);
            continue;
        }
        if !b.input.health.serving() {
            b.state.carry_limit = Some((FAILED_AT_SHARE * c.weight).round().max(1.0));
            end(b, CarryEnd::HealthDown);
            continue;
        }
        let Some(obs) = b.input.observed else {
            b.reasons.push(carried(&c, None));
            continue;
        };
        if obs.latency_ms <= p.latency_target_ms {
            b.state.carry_limit = None;
            b.state.ramping_back = true;
            end(b, CarryEnd::Recovered);
            continue;
        }
        let Some(knee) = p.carry_knee else {
            drain_again(b, CarryEnd::Off);
            continue;
        };
        if let Some(share) = share.filter(|&x| x < RELEASE_FACTOR * knee) {
            drain_again(
                b,
                CarryEnd::NotNeeded {
                    peers_load_share: share,
                },
            );
            continue;
        }
        let now = (obs.load >= 1.0).then(|| obs.latency_ms / c.unloaded_ms);
        if let Some(r) = now {
            c.ratio = Some(c.ratio.map_or(r, |x| x + RATIO_SMOOTHING * (r - x)));
        }
        // Small moves, each given time to show in the probes' 5 s mean: near the knee a few
        // requests a second more double the queue.
        let since = step.saturating_sub(c.moved_at);
        let factor = match (now, c.ratio) {
            _ if obs.error_rate > 0.0 => 0.5,
            (Some(r), _) if r >= CARRY_CUT_AT_ONCE && since >= 2 => 0.8,
            (_, Some(r)) if since < 3 || r > CARRY_CUT_AT_ONCE => 1.0,
            (_, Some(r)) if r > CARRY_RATIO => 0.93,
            (Some(_), Some(r)) if r < CARRY_RAISE_FAST_BELOW => 1.15,
            (Some(_), Some(r)) if r < CARRY_RAISE_BELOW => 1.05,
            _ => 1.0,
        };
        c.knee = c
            .knee
            .filter(|&(_, at)| step.saturating_sub(at) < KNEE_MEMORY_STEPS);
        if factor < 1.0 {
            // Cuts follow each other while the 5 s mean catches up: the knee is the weight
            // the first of them started from.
            let first = c
                .knee
                .filter(|&(_, at)| step.saturating_sub(at) <= KNEE_EXCURSION_STEPS)
                .map_or(c.weight, |(w, _)| w.max(c.weight));
            c.knee = Some((first, step));
        }
        if factor != 1.0 {
            let most = c
                .knee
                .map_or(f64::INFINITY, |(w, _)| (KNEE_MARGIN * w).round())
                .min(ceiling(b, p))
                .max(1.0);
            // A raise never lowers it (the cap is for raises only).
            let w = if factor > 1.0 {
                (c.weight * factor).min(most).max(c.weight)
            } else {
                (c.weight * factor).max(1.0)
            };
            if w != c.weight {
                c.weight = w;
                c.moved_at = step;
            }
        }
        b.reasons.push(carried(&c, Some(obs.latency_ms)));
        b.state.carry = Some(c);
    }
}

fn carried(c: &Carry, latency_ms: Option<f64>) -> Reason {
    Reason::Carried {
        weight: c.weight,
        unloaded_ms: c.unloaded_ms,
        latency_ms,
        ratio: c.ratio,
        hold_under: CARRY_RATIO,
    }
}

/// Why a carry ended.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "why", rename_all = "snake_case")]
pub enum CarryEnd {
    /// It meets the latency target again: it ramps back like any return.
    Recovered,
    /// Its health checks took it down; it comes back carried at less than it failed at.
    HealthDown,
    /// Pinned, learning off or configured 0: the weight is set elsewhere.
    Released,
    /// Its peers can take its share: drained again.
    NotNeeded { peers_load_share: f64 },
    /// Carrying was switched off (`carry_knee` unset): drained again.
    Off,
}

pub(super) fn describe(r: &Reason, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    let s = f64::from(WEIGHT_SCALE);
    match r {
        Reason::CarryStarted {
            unloaded_ms,
            peers_load_share,
            knee,
        } => write!(
            f,
            "carried: it misses the latency target even unloaded ({unloaded_ms:.1} ms), but without it the pool's load is {:.0}% of its peers' capacity at the target (knee {:.0}%): it keeps the share it can serve",
            peers_load_share * 100.0,
            knee * 100.0
        ),
        Reason::Carried {
            weight,
            unloaded_ms,
            latency_ms,
            ratio,
            hold_under,
        } => {
            write!(
                f,
                "carried at {:.2} while slow: latency held under {hold_under:.2}x its unloaded {unloaded_ms:.1} ms",
                weight / s
            )?;
            match (latency_ms, ratio) {
                (Some(l), Some(r)) => write!(f, " (now {l:.1} ms, smoothed ratio {r:.2})"),
                (Some(l), None) => write!(f, " (now {l:.1} ms, no load yet)"),
                _ => Ok(()),
            }
        }
        Reason::CarryEnded { why } => match why {
            CarryEnd::Recovered => f.write_str("carry ended: it meets the latency target again"),
            CarryEnd::HealthDown => write!(
                f,
                "carry ended: health took it down; carried again at most at {:.0}% of that weight",
                FAILED_AT_SHARE * 100.0
            ),
            CarryEnd::Released => f.write_str("carry ended: pinned, learning off or configured 0"),
            CarryEnd::Off => f.write_str("carry ended: carrying switched off (no carry_knee): drained"),
            CarryEnd::NotNeeded { peers_load_share } => write!(
                f,
                "carry ended: its peers can take its share ({:.0}% of their capacity at the target): drained",
                peers_load_share * 100.0
            ),
        },
        _ => unreachable!("not a carry reason: {r:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::CarryEnd;
    use crate::health::HealthStatus;
    use crate::learning::testkit::*;
    use crate::learning::*;

    /// The knee the lab's scenario carries at.
    const KNEE: Option<f64> = Some(0.7);

    /// Each step's (weights, loads), and the decisions.
    type Run = (Vec<([u32; 4], [f64; 4])>, Vec<Decision>);

    /// Four worker pools of 3 workers of 20 ms (150/s each) under a 40 ms target share
    /// `total` requests/s by weight, one sample a second; backend 4's service time becomes
    /// `slow_ms` from step 100 to step `until`. Returns each step's (weights, loads) and
    /// decisions.
    fn pool(total: f64, slow_ms: f64, until: u64, steps: u64) -> Run {
        pool_with(|_| total, slow_ms, until, steps, |_| HealthStatus::Up, KNEE)
    }

    /// `pool` with the load's level and backend 4's health by step.
    fn pool_with(
        total: impl Fn(u64) -> f64,
        slow_ms: f64,
        until: u64,
        steps: u64,
        health: impl Fn(u64) -> HealthStatus,
        carry_knee: Option<f64>,
    ) -> Run {
        let p = WeightPolicy {
            latency_target_ms: 40.0,
            table_size: SMALL_M,
            carry_knee,
            ..WeightPolicy::default()
        };
        let mut windows = vec![Window::new(120.0, 120); 4];
        let mut inputs: Vec<BackendInput> = (1..=4)
            .map(|id| input(id, 1, Err(Refusal::TooFewSamples { have: 0, need: 30 })))
            .collect();
        let mut state = PolicyState::default();
        let (mut trace, mut ds) = (Vec::new(), Vec::new());
        for t in 0..steps {
            // A load that moves ±20% over 30 s, so that the fits have something to relate.
            let level = total(t) * (1.0 + 0.2 * tri(t, 30));
            inputs[3].health = health(t);
            if !inputs[3].health.serving() {
                // lbd clears the window of a backend that is down.
                windows[3] = Window::new(120.0, 120);
            }
            let sum: f64 = inputs
                .iter()
                .filter(|b| b.health.serving())
                .map(|b| f64::from(b.current_weight))
                .sum();
            let mut loads = [0.0; 4];
            for (i, b) in inputs.iter_mut().enumerate() {
                if !b.health.serving() {
                    b.observed = None;
                    continue;
                }
                let service = if i == 3 && (100..until).contains(&t) {
                    slow_ms
                } else {
                    20.0
                };
                let load = level * f64::from(b.current_weight) / sum;
                let lat = workers_ms(3.0, service, load) * (1.0 + 0.1 * noise(t, i as u64));
                windows[i].push(sample(t as f64, load, lat));
                b.fit = fit_with(&windows[i].samples(), &p.fit);
                b.observed = windows[i].observed(5.0);
                b.peak_load = windows[i].peak_load();
                loads[i] = load;
            }
            let d = decide(&inputs, &p, &state);
            apply(&mut inputs, &d);
            state = d.state.clone();
            trace.push(([0, 1, 2, 3].map(|i| inputs[i].current_weight), loads));
            ds.push(d);
        }
        (trace, ds)
    }

    fn has(d: &Decision, f: impl Fn(&Reason) -> bool) -> bool {
        reasons(d, 4).iter().any(f)
    }

    fn mean(v: impl Iterator<Item = f64>) -> f64 {
        let v: Vec<f64> = v.collect();
        v.iter().sum::<f64>() / v.len().max(1) as f64
    }

    #[test]
    fn a_slow_backend_is_carried_at_what_it_can_serve_when_its_peers_are_near_their_knee() {
        // 60% load; 5x slower, backend 4 serves 30/s at most and misses the target at any load.
        let (trace, ds) = pool(360.0, 100.0, 400, 260);
        let w4: Vec<u32> = trace.iter().step_by(5).map(|x| x.0[3]).collect();
        println!("backend 4's weight every 5 steps: {w4:?}");
        let drained = (100..)
            .zip(&trace[100..])
            .find(|(_, x)| x.0[3] == 0)
            .map(|x| x.0);
        assert!(drained.is_some(), "drained first: {w4:?}");
        assert!(ds.iter().any(|d| reasons(d, 4)
            .iter()
            .any(|r| matches!(r, Reason::CarryStarted { .. }))));
        let late = &trace[180..];
        let its = mean(late.iter().map(|x| x.1[3]));
        let others = mean(late.iter().map(|x| (x.1[0] + x.1[1] + x.1[2]) / 3.0));
        println!("steps 180-260: backend 4 carried {its:.1}/s of its 30, the others {others:.1}/s each of 150");
        assert!((15.0..=25.5).contains(&its), "carried {its:.1}/s: {w4:?}");
        assert!(late.iter().all(|x| x.0[3] > 0 && x.0[3] <= 25), "{w4:?}");
        // Without it, the others would carry 120/s each.
        assert!(others < 116.0, "{others:.1}");
    }

    #[test]
    fn a_slow_backend_is_drained_when_its_peers_have_room() {
        // 40% load: the other three carry its share at 53% of their capacity.
        let (trace, ds) = pool(240.0, 100.0, 400, 220);
        let w4: Vec<u32> = trace.iter().step_by(5).map(|x| x.0[3]).collect();
        assert!(trace[150..].iter().all(|x| x.0[3] == 0), "{w4:?}");
        assert!(!ds.iter().any(|d| reasons(d, 4)
            .iter()
            .any(|r| matches!(r, Reason::CarryStarted { .. }))));
    }

    #[test]
    fn a_carried_backend_that_recovers_ramps_back_to_its_share() {
        let (trace, ds) = pool(360.0, 100.0, 200, 300);
        let w4: Vec<u32> = trace.iter().step_by(5).map(|x| x.0[3]).collect();
        println!("backend 4's weight every 5 steps: {w4:?}");
        assert!(
            trace[190].0[3] > 0 && trace[190].0[3] <= 25,
            "carried: {w4:?}"
        );
        assert!(ds[200..]
            .iter()
            .any(|d| reasons(d, 4).iter().any(|r| matches!(
                r,
                Reason::CarryEnded {
                    why: CarryEnd::Recovered
                }
            ))));
        let back = (200..).zip(&trace[200..]).find(|(_, x)| {
            let w = x.0;
            f64::from(w[3]) >= 0.9 * f64::from(w[0].min(w[1]).min(w[2]))
        });
        println!(
            "back at 90% of the others' weight at step {:?}",
            back.map(|b| b.0)
        );
        assert!(back.is_some_and(|b| b.0 <= 260), "{w4:?}");
    }

    #[test]
    fn a_carry_ends_with_a_drain_when_the_load_falls() {
        // 60% load, then 35% from step 200: the others take its share at 47% of their capacity.
        let (trace, ds) = pool_with(
            |t| if t < 200 { 360.0 } else { 210.0 },
            100.0,
            400,
            260,
            |_| HealthStatus::Up,
            KNEE,
        );
        let w4: Vec<u32> = trace.iter().step_by(5).map(|x| x.0[3]).collect();
        assert!(trace[195].0[3] > 0, "carried: {w4:?}");
        assert!(
            ds[200..].iter().any(|d| has(d, |r| matches!(
                r,
                Reason::CarryEnded {
                    why: CarryEnd::NotNeeded { .. }
                }
            ))),
            "{w4:?}"
        );
        assert!(trace[240..].iter().all(|x| x.0[3] == 0), "{w4:?}");
    }

    #[test]
    fn a_carried_backend_taken_down_by_health_is_carried_again_at_less() {
        let down = 180..186;
        let (trace, ds) = pool_with(
            |_| 360.0,
            100.0,
            400,
            300,
            |t| {
                if down.contains(&t) {
                    HealthStatus::Down
                } else {
                    HealthStatus::Up
                }
            },
            KNEE,
        );
        let w4: Vec<u32> = trace.iter().step_by(5).map(|x| x.0[3]).collect();
        println!("backend 4's weight every 5 steps: {w4:?}");
        let failed_at = f64::from(trace[179].0[3]);
        assert!(failed_at > 0.0, "carried before: {w4:?}");
        assert!(has(&ds[180], |r| matches!(
            r,
            Reason::CarryEnded {
                why: CarryEnd::HealthDown
            }
        )));
        let again = (186..300)
            .find(|&t| has(&ds[t], |r| matches!(r, Reason::CarryStarted { .. })))
            .expect("carried again");
        let most = trace[again..].iter().map(|x| x.0[3]).max().unwrap();
        assert!(
            f64::from(most) <= (0.7 * failed_at).round(),
            "failed at {failed_at}, carried again up to {most}: {w4:?}"
        );
    }

    #[test]
    fn without_a_carry_knee_a_slow_backend_stays_drained() {
        let (trace, ds) = pool_with(|_| 360.0, 100.0, 400, 220, |_| HealthStatus::Up, None);
        let w4: Vec<u32> = trace.iter().step_by(5).map(|x| x.0[3]).collect();
        assert!(trace[150..].iter().all(|x| x.0[3] == 0), "{w4:?}");
        assert!(!ds
            .iter()
            .any(|d| has(d, |r| matches!(r, Reason::CarryStarted { .. }))));
    }
}
