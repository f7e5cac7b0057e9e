//! Stage: the outcome. Records the changes made (direction memory, the reasons for a raise or
//! a cut, drain steps), the audit events, and the decision with the state for the next step.
use std::fmt;

use super::{budget::Budgeted, step_limit::Weights, Backend, Mode, PolicyState, Step};
use crate::learning::{
    AuditEvent, AuditKind, BackendDecision, Decision, Reason, WeightPolicy, WEIGHT_SCALE,
};

/// Builds the decision from what the stages found and the weights within the budget.
pub(super) fn record(s: Step, w: &Weights, budgeted: Budgeted) -> Decision {
    let (p, step, pool_cap) = (s.p, s.step, s.pool_cap);
    let mut backends = Vec::with_capacity(s.all.len());
    let mut events = Vec::new();
    let mut states = Vec::with_capacity(s.all.len());
    for (i, mut b) in s.all.into_iter().enumerate() {
        let (from, to) = (w.current[i], budgeted.weights[i]);
        remember_change(&mut b, step, from, to, pool_cap);
        if let Some(kind) = audit_kind(&b, from, to) {
            events.push(AuditEvent {
                step,
                kind,
                backend: b.input.id,
                addr: b.input.addr,
                from_weight: b.reported,
                to_weight: to,
                configured_weight: b.input.configured_weight,
                reasons: b.reasons.clone(),
                inputs: b.input.clone(),
                latency_target_ms: p.latency_target_ms,
            });
        }
        backends.push(backend_decision(&mut b, p, to));
        states.push((b.input.id, b.state));
    }
    Decision {
        step,
        backends,
        slots_moved: budgeted.slots_moved,
        slots_moved_gradual: budgeted.slots_moved_gradual,
        slots_budget: budgeted.slots_budget,
        table_size: p.table_size,
        table_error: budgeted.table_error,
        events,
        state: PolicyState {
            step,
            backends: states.into_iter().collect(),
        },
    }
}

/// Remembers the direction of a learned change (a turn starts the reversal hold) and says why
/// the weight moved; remembers when any weight last changed; counts a drain's step.
fn remember_change(b: &mut Backend, step: u64, from: u32, to: u32, pool_cap: f64) {
    let st = &mut b.state;
    if let (Mode::Gradual { learned, target }, true) = (b.mode, to != from) {
        if learned {
            let dir: i8 = if to > from { 1 } else { -1 };
            if dir != st.last_direction {
                st.reverse_steps = 0;
                if st.last_direction != 0 {
                    st.last_reversal = Some(step);
                }
            }
            st.last_direction = dir;
            let (capacity_at_target, pool_capacity_at_target) = (b.cap, pool_cap);
            b.reasons.insert(
                0,
                if to > from {
                    Reason::Raised {
                        from,
                        to,
                        target,
                        capacity_at_target,
                        pool_capacity_at_target,
                    }
                } else {
                    Reason::Cut {
                        from,
                        to,
                        target,
                        capacity_at_target,
                        pool_capacity_at_target,
                    }
                },
            );
        }
    }
    if to != from {
        st.last_change = Some(step);
    }
    if b.mode == Mode::Drain {
        b.reasons.push(Reason::DrainStep {
            remaining_weight: to,
        });
    }
}

/// What the audit journal records of `b` this step, if anything.
fn audit_kind(b: &Backend, from: u32, to: u32) -> Option<AuditKind> {
    if b.newly_drained {
        Some(AuditKind::Drain)
    } else if b.undrained {
        Some(AuditKind::Undrain)
    } else if to != from && !matches!(b.mode, Mode::Urgent) {
        Some(AuditKind::Reweight)
    } else if b.newly_suspected {
        Some(AuditKind::Suspect)
    } else {
        None
    }
}

fn backend_decision(b: &mut Backend, p: &WeightPolicy, to: u32) -> BackendDecision {
    let input = &b.input;
    let fit = input.fit.as_ref().ok().copied();
    BackendDecision {
        id: input.id,
        addr: input.addr,
        configured_weight: input.configured_weight,
        previous_weight: b.reported,
        weight: to,
        target_weight: b.target,
        drained: b.state.drained_at.is_some(),
        health: input.health,
        fit,
        refusal: input.fit.as_ref().err().cloned(),
        capacity_at_target: fit.map(|f| f.capacity_at(p.latency_target_ms)),
        predicted_latency_ms: fit
            .zip(input.observed)
            .map(|(f, o)| f.predict_latency_ms(o.load)),
        observed: input.observed,
        reasons: std::mem::take(&mut b.reasons),
    }
}

pub(super) fn describe(r: &Reason, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    let s = f64::from(WEIGHT_SCALE);
    match r {
        Reason::Raised {
            from,
            to,
            target,
            capacity_at_target,
            pool_capacity_at_target,
        }
        | Reason::Cut {
            from,
            to,
            target,
            capacity_at_target,
            pool_capacity_at_target,
        } => write!(
            f,
            "{} {:.2} -> {:.2} (target {:.2}): capacity {:.1}/s of the pool's {:.1}/s at the latency target",
            if to > from { "raised" } else { "cut" },
            f64::from(*from) / s,
            f64::from(*to) / s,
            target / s,
            capacity_at_target,
            pool_capacity_at_target
        ),
        Reason::DrainStep { remaining_weight } => write!(
            f,
            "draining within the disruption budget: {:.2} left",
            f64::from(*remaining_weight) / s
        ),
        _ => unreachable!("not an outcome reason: {r:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::learning::policy::{budget, step_limit};
    use crate::learning::testkit::*;
    use crate::learning::{table_weight, Refusal};

    /// Two backends through `propose`, the budget and `record`, with `modes` set by hand.
    fn outcome(modes: [Mode; 2], prev: &PolicyState) -> Decision {
        let p = unbudgeted();
        let inputs: Vec<_> = (1..=2)
            .map(|id| input(id, 1, Err(Refusal::TooFewSamples { have: 0, need: 30 })))
            .collect();
        let mut s = Step::new(&inputs, &p, prev);
        for (b, m) in s.all.iter_mut().zip(modes) {
            b.mode = m;
        }
        let w = step_limit::propose(&mut s);
        let budgeted = budget::limit(&mut s, &w);
        record(s, &w, budgeted)
    }

    #[test]
    fn a_learned_raise_is_explained_remembered_and_audited() {
        let cur = f64::from(table_weight(1));
        let d = outcome(
            [
                Mode::Gradual {
                    target: cur * 1.2,
                    learned: true,
                },
                Mode::Hold,
            ],
            &PolicyState::default(),
        );
        let raised = &d.backends[0];
        assert_eq!(raised.weight, (cur * 1.2).round() as u32);
        assert!(
            matches!(raised.reasons[0], Reason::Raised { from, to, .. } if from < to),
            "{:?}",
            raised.reasons
        );
        let st = &d.state.backends[&1];
        assert_eq!((st.last_direction, st.last_change), (1, Some(1)));
        assert_eq!(d.events.len(), 1);
        assert_eq!(
            (d.events[0].kind, d.events[0].backend),
            (AuditKind::Reweight, 1)
        );
        // The held backend: no reason, no event, no change remembered.
        assert!(d.backends[1].reasons.is_empty());
        assert_eq!(d.state.backends[&2].last_change, None);
    }

    #[test]
    fn a_turn_starts_the_reversal_hold_and_a_drain_counts_its_step() {
        let cur = f64::from(table_weight(1));
        let up = outcome(
            [
                Mode::Gradual {
                    target: cur * 1.2,
                    learned: true,
                },
                Mode::Hold,
            ],
            &PolicyState::default(),
        );
        let down = outcome(
            [
                Mode::Gradual {
                    target: cur * 0.8,
                    learned: true,
                },
                Mode::Drain,
            ],
            &up.state,
        );
        let st = &down.state.backends[&1];
        assert_eq!(st.last_direction, -1);
        assert_eq!(st.last_reversal, Some(2), "the cut after a raise is a turn");
        assert!(matches!(down.backends[0].reasons[0], Reason::Cut { .. }));
        assert!(down.backends[1].reasons.iter().any(|r| matches!(
            r,
            Reason::DrainStep {
                remaining_weight: 0
            }
        )));
    }
}
