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
