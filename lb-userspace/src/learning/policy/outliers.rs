//! Stage: outlier detection. A backend whose latency, error rate or clients' retries stand far
//! out from its own model or its peers is an outlier (drained by `drains`); a few per cent of
//! errors above its peers' makes it suspected (shown and audited, not drained).
use std::fmt;

use serde::{Deserialize, Serialize};

use super::{BackendInput, Step, WeightPolicy};
use crate::learning::{table_weight, Fit, Observed, Reason};

/// A backend failing at least this share of its probes is failing, whatever its queue.
const OVERLOAD_MAX_ERRORS: f64 = 0.5;

/// Which signal made a backend an outlier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Signal {
    Latency,
    ErrorRate,
    SynRetryRatio,
    RstRatio,
}

/// What an outlier's signal is compared with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reference {
    /// The backend's own (last accepted) fit, at the load it carries.
    Model,
    /// The median of the other serving backends.
    Peers,
    /// The latency target itself: the backend misses it at its floor weight (or returning at
    /// no weight) while its peers meet it, so no cut can help.
    Target,
}

/// One signal's verdict: `value` against `factor` × `reference`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Outlier {
    pub signal: Signal,
    pub value: f64,
    pub reference: f64,
    pub reference_kind: Reference,
    pub factor: f64,
}

impl Outlier {
    pub(super) fn severity(&self) -> f64 {
        if self.reference > 0.0 {
            self.value / self.reference
        } else {
            f64::INFINITY
        }
    }
}

/// Finds each learning, unpinned backend's worst outlying signal, if any, against its last
/// accepted fit or its serving peers.
pub(super) fn find_outliers(s: &mut Step) {
    let outliers: Vec<Option<Outlier>> = (0..s.all.len())
        .map(|i| {
            let b = &s.all[i];
            if !b.learning(s.p) || b.input.pinned.is_some() {
                return None;
            }
            let reference = b.state.last_fit.as_ref().map(|(_, f)| f);
            outlier(&b.input, reference, &s.peers(i), s.p)
        })
        .collect();
    for (b, o) in s.all.iter_mut().zip(outliers) {
        b.outlier = o;
    }
}

/// Marks backends whose error rate is above their peers' but does not (yet) justify a drain:
/// worth an operator's look before it is worth a drain.
pub(super) fn suspect(s: &mut Step) {
    let step = s.step;
    for i in 0..s.all.len() {
        let b = &s.all[i];
        let found = if !b.learning(s.p) || b.input.pinned.is_some() || b.outlier.is_some() {
            None
        } else {
            suspicion(&b.input, &s.peers(i), s.p)
        };
        let b = &mut s.all[i];
        match found {
            Some(outlier) => {
                let since_step = *b.state.suspected_at.get_or_insert_with(|| {
                    b.newly_suspected = true;
                    step
                });
                b.reasons.push(Reason::Suspected {
                    outlier,
                    since_step,
                });
            }
            None => b.state.suspected_at = None,
        }
    }
}

pub(super) fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// The worst outlying signal of `b`, if any. `peers`: the other serving backends' observations.
fn outlier(
    b: &BackendInput,
    reference_fit: Option<&Fit>,
    peers: &[Observed],
    policy: &WeightPolicy,
) -> Option<Outlier> {
    let obs = b.observed?;
    let kl = policy.latency_outlier_factor;
    let mut found: Vec<Outlier> = Vec::new();
    // Latency: against the backend's own model at the load it carries, else the peers' median.
    // Never while it meets the latency target.
    let model_ref = reference_fit
        .map(|f| f.predict_latency_ms(obs.load))
        .filter(|l| l.is_finite());
    let (lat_ref, kind) = match model_ref {
        Some(l) => (Some(l), Reference::Model),
        None => (
            median(peers.iter().map(|p| p.latency_ms).collect()),
            Reference::Peers,
        ),
    };
    if let Some(r) = lat_ref {
        if obs.latency_ms > policy.latency_target_ms && obs.latency_ms > kl * r {
            found.push(Outlier {
                signal: Signal::Latency,
                value: obs.latency_ms,
                reference: r,
                reference_kind: kind,
                factor: kl,
            });
        }
    }
    // Missing the target at the floor weight (or at none, returning) while the peers meet it:
    // the overload rule's cuts are exhausted, and a backend that cannot meet the target with
    // the least load it can be given does not belong in a latency-targeted pool (unless its
    // peers need it: it is then drained and carried, see `carry`). (A backend 5x
    // slower is under 10x its peers while lightly loaded, so the rule above never sees it.)
    let floor_weight = floor_weight(b, policy);
    let peers_latency = median(peers.iter().map(|p| p.latency_ms).collect());
    if f64::from(b.current_weight) <= floor_weight + 0.5
        && obs.latency_ms > policy.latency_target_ms
        && peers_latency.is_some_and(|l| l <= policy.latency_target_ms)
    {
        found.push(Outlier {
            signal: Signal::Latency,
            value: obs.latency_ms,
            reference: policy.latency_target_ms,
            reference_kind: Reference::Target,
            factor: 1.0,
        });
    }
    ratio_outliers(b, obs, peers, policy, &mut found);
    found
        .into_iter()
        .max_by(|a, b| a.severity().total_cmp(&b.severity()))
}

/// Error rate and passive ratios against the peers' median: the same client population reaches
/// every backend through the hash, so these ratios should match across backends.
fn ratio_outliers(
    b: &BackendInput,
    obs: Observed,
    peers: &[Observed],
    policy: &WeightPolicy,
    found: &mut Vec<Outlier>,
) {
    let k = policy.outlier_factor;
    let checks: [(Signal, Option<f64>, Vec<f64>, f64); 3] = [
        (
            Signal::ErrorRate,
            (!overload_errors(b, obs, policy)).then_some(obs.error_rate),
            peers.iter().map(|p| p.error_rate).collect(),
            policy.outlier_min_error_rate,
        ),
        (
            Signal::SynRetryRatio,
            obs.syn_retry_ratio(),
            peers.iter().filter_map(|p| p.syn_retry_ratio()).collect(),
            policy.outlier_min_passive_ratio,
        ),
        (
            Signal::RstRatio,
            obs.rst_ratio(),
            peers.iter().filter_map(|p| p.rst_ratio()).collect(),
            policy.outlier_min_rst_ratio,
        ),
    ];
    for (signal, value, peer_values, min) in checks {
        let (Some(v), Some(r)) = (value, median(peer_values)) else {
            continue;
        };
        if v >= min && v > k * r {
            found.push(Outlier {
                signal,
                value: v,
                reference: r,
                reference_kind: Reference::Peers,
                factor: k,
            });
        }
    }
}

/// The lowest table weight learning gives `b`.
pub(super) fn floor_weight(b: &BackendInput, policy: &WeightPolicy) -> f64 {
    policy.floor * f64::from(table_weight(b.configured_weight))
}

/// Failed probes of a backend queueing past the latency target, above its floor weight, and
/// failing fewer than `OVERLOAD_MAX_ERRORS` of its probes: timeouts of its queue, which is the
/// weights' doing and which the weight rule answers by cutting it, not a failure to drain. At
/// its floor, or failing most probes, its errors count again.
fn overload_errors(b: &BackendInput, obs: Observed, policy: &WeightPolicy) -> bool {
    let floor_weight = floor_weight(b, policy);
    // The probes that succeeded queue past the target (failed ones count at the timeout in
    // the mean: 5% of fast 500s at a 400 ms timeout raise a 22 ms mean past a 40 ms target).
    let answered_ms = match b.probe_timeout_ms {
        Some(t) if obs.error_rate < 1.0 => {
            (obs.latency_ms - obs.error_rate * t) / (1.0 - obs.error_rate)
        }
        _ => obs.latency_ms,
    };
    answered_ms > policy.latency_target_ms
        && obs.error_rate < OVERLOAD_MAX_ERRORS
        && f64::from(b.current_weight) > floor_weight + 0.5
}

/// `b`'s error rate as a suspicion (see [`WeightPolicy::suspect_min_error_rate`]), if it is one.
fn suspicion(b: &BackendInput, peers: &[Observed], policy: &WeightPolicy) -> Option<Outlier> {
    let obs = b.observed?;
    if overload_errors(b, obs, policy) {
        return None;
    }
    let reference = median(peers.iter().map(|p| p.error_rate).collect())?;
    let k = policy.outlier_factor;
    (obs.error_rate >= policy.suspect_min_error_rate && obs.error_rate > k * reference).then_some(
        Outlier {
            signal: Signal::ErrorRate,
            value: obs.error_rate,
            reference,
            reference_kind: Reference::Peers,
            factor: k,
        },
    )
}

pub(super) fn fmt_outlier(f: &mut fmt::Formatter<'_>, o: &Outlier) -> fmt::Result {
    write!(
        f,
        "{:?} {:.3} > {} × {:?} {:.3}",
        o.signal, o.value, o.factor, o.reference_kind, o.reference
    )
}

pub(super) fn describe(r: &Reason, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    match r {
        Reason::Suspected {
            outlier,
            since_step,
        } => {
            write!(f, "suspected since step {since_step}: ")?;
            fmt_outlier(f, outlier)
        }
        _ => unreachable!("not an outlier reason: {r:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::learning::testkit::*;
    use crate::learning::*;

    #[test]
    fn a_few_percent_of_errors_is_suspected_not_drained() {
        let p = policy();
        let mut inputs = healthy_pool(1);
        let mut o = observed(50.0, 20.0);
        o.error_rate = 0.05;
        inputs[1].observed = Some(o);
        let mut state = PolicyState::default();
        let ds = run(&mut inputs, &p, &mut state, 6);
        let suspects: Vec<&AuditEvent> = ds
            .iter()
            .flat_map(|d| &d.events)
            .filter(|e| e.kind == AuditKind::Suspect)
            .collect();
        assert_eq!(suspects.len(), 1, "one event when suspicion starts");
        assert_eq!(suspects[0].backend, 2);
        assert_eq!(suspects[0].step, 1);
        for d in &ds {
            assert!(!d.backends[1].drained);
            assert!(reasons(d, 2)
                .iter()
                .any(|r| matches!(r, Reason::Suspected { since_step: 1, .. })));
            assert!(reasons(d, 1)
                .iter()
                .all(|r| !matches!(r, Reason::Suspected { .. })));
        }
        // Errors gone: the suspicion ends with them.
        inputs[1].observed = Some(observed(50.0, 20.0));
        let d = decide(&inputs, &p, &state);
        assert!(reasons(&d, 2)
            .iter()
            .all(|r| !matches!(r, Reason::Suspected { .. })));
    }

    #[test]
    fn error_and_passive_outliers_and_a_trial_before_the_slow_start() {
        let p = WeightPolicy {
            min_drain_steps: 4,
            outlier_steps: 2,
            ..unbudgeted()
        };
        let mut inputs: Vec<BackendInput> = (1..=4)
            .map(|id| {
                let mut b = input(id, 100, Ok(mm1_fit(100.0)));
                b.observed = Some(Observed {
                    syn_retries_per_s: 0.5,
                    ..observed(50.0, 20.0)
                });
                b
            })
            .collect();
        // Backend 2: clients retry a third of their SYNs (latency from probes looks fine).
        inputs[1].observed = Some(Observed {
            syn_retries_per_s: 16.0,
            ..observed(50.0, 20.0)
        });
        let mut state = PolicyState::default();
        let ds = run(&mut inputs, &p, &mut state, 2);
        let d = &ds[1];
        assert!(d.backends[1].drained);
        match &reasons(d, 2)[0] {
            Reason::Drained { outlier, .. } => {
                assert_eq!(outlier.signal, Signal::SynRetryRatio);
                assert_eq!(outlier.reference_kind, Reference::Peers);
            }
            r => panic!("{r:?}"),
        }
        // Drained, it carries nothing (probes at no load look normal, which proves nothing of
        // its SYNs): out for min_drain_steps, then back on trial at 5% of its weight.
        inputs[1].observed = Some(observed(0.0, 10.0));
        let ds = run(&mut inputs, &p, &mut state, 12);
        let back = ds.iter().position(|d| !d.backends[1].drained).unwrap();
        assert!(matches!(
            reasons(&ds[back], 2)[0],
            Reason::Undrained {
                drained_for_steps: 4
            }
        ));
        assert_eq!(weight(&ds[back], 2), 500, "on trial at 5%");
        assert!(ds[back].events.iter().any(|e| e.kind == AuditKind::Undrain));
        assert!(
            ds[back..].iter().all(|d| weight(d, 2) == 500),
            "held on trial while it carries no traffic"
        );
        // With traffic and clean SYNs, 30 flows pass the trial; then it ramps.
        inputs[1].observed = Some(observed(12.0, 10.0));
        let ds = run(&mut inputs, &p, &mut state, 4);
        assert!(
            reasons(&ds[2], 2)
                .iter()
                .any(|r| matches!(r, Reason::TrialPassed { .. })),
            "{:?}",
            reasons(&ds[2], 2)
        );
        assert!(weight(&ds[3], 2) > 500, "ramping up");
        // Errors: one backend failing half its probes.
        let mut inputs = healthy_pool(100);
        inputs[3].observed = Some(Observed {
            error_rate: 0.5,
            ..observed(50.0, 20.0)
        });
        let mut state = PolicyState::default();
        let ds = run(&mut inputs, &p, &mut state, 2);
        assert!(ds[1].backends[3].drained);
        assert!(reasons(&ds[1], 4)[0].to_string().contains("ErrorRate"));
        // 5% of fast errors, counted at a 400 ms timeout, raise a 22 ms mean to 41 ms: the
        // answered probes meet the target, so this is no overload, and it is suspected.
        let mut fast = inputs.clone();
        for b in &mut fast {
            b.probe_timeout_ms = Some(400.0);
            b.current_weight = 10_000;
        }
        let p40 = WeightPolicy {
            latency_target_ms: 40.0,
            ..p.clone()
        };
        fast[3].observed = Some(Observed {
            error_rate: 0.05,
            ..observed(50.0, 0.95 * 22.0 + 0.05 * 400.0)
        });
        let d = decide(&fast, &p40, &PolicyState::default());
        assert!(
            reasons(&d, 4)
                .iter()
                .any(|r| matches!(r, Reason::Suspected { .. })),
            "{:?}",
            reasons(&d, 4)
        );
        // A fifth of its probes timing out behind a queue past the target: overload (for the
        // weight rule), neither drained nor suspected, until it reaches its floor; failing most
        // of them is failure.
        for (errors, weight, drained) in [
            (0.2, 10_000, false),
            (0.2, 2_500, true),
            (0.6, 10_000, true),
        ] {
            let mut inputs = inputs.clone();
            inputs[3].current_weight = weight;
            if weight == 2_500 {
                // Without a model, the overload rule keeps it at the floor.
                inputs[3].fit = Err(Refusal::PoorFit { r2: 0.1, need: 0.6 });
            }
            inputs[3].observed = Some(Observed {
                error_rate: errors,
                ..observed(90.0, 300.0)
            });
            let mut state = PolicyState::default();
            let ds = run(&mut inputs, &p, &mut state, 2);
            assert_eq!(
                ds[1].backends[3].drained,
                drained,
                "errors {errors} at weight {weight}: {:?}",
                reasons(&ds[1], 4)
            );
            if !drained {
                assert!(!reasons(&ds[1], 4)
                    .iter()
                    .any(|r| matches!(r, Reason::Suspected { .. })));
            }
        }
    }
}
