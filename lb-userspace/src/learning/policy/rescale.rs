//! Stage: rescaling of coarse weights.
use std::fmt;

use super::Step;
use crate::learning::{table_weight, Reason};

/// Scales every weight of the pool back up to about its configured total when they have
/// become too coarse for any change within the disruption budget.
///
/// Health downs are urgent and leave the others' weights as they are, so a pool can end up
/// with its serving backends at a few units each: then any change moves more slots than the
/// budget allows, the budget's fraction of it rounds to no change, and the pool is stuck.
/// Multiplying every weight by one integer leaves the table exactly as it is (Maglev depends
/// on the weights' ratios only). Not with a pinned backend or learning off anywhere: their
/// weights are set, not scaled.
pub(super) fn rescale_coarse_weights(s: &mut Step) {
    let p = s.p;
    let in_table_cfg: u64 = s
        .all
        .iter()
        .filter(|b| b.serving_now())
        .map(|b| u64::from(table_weight(b.input.configured_weight)))
        .sum();
    let in_table_cur: u64 = s.all.iter().map(|b| u64::from(b.reported)).sum();
    let scale = if p.learning
        && s.all
            .iter()
            .all(|b| b.input.learning && b.input.pinned.is_none())
        && in_table_cur > 0
    {
        (in_table_cfg / in_table_cur).clamp(1, u64::from(u32::MAX))
    } else {
        1
    };
    if scale >= 2 {
        for b in &mut s.all {
            if b.input.current_weight > 0 {
                b.input.current_weight =
                    u32::try_from(u64::from(b.input.current_weight) * scale).unwrap_or(u32::MAX);
                b.reasons.push(Reason::Rescaled {
                    factor: scale as u32,
                });
            }
        }
    }
}

pub(super) fn describe(r: &Reason, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    match r {
        Reason::Rescaled { factor } => write!(
            f,
            "the pool's weights had fallen far below their configured total: all multiplied by {factor} (the same table) so that changes fit the disruption budget"
        ),
        _ => unreachable!("not a rescaling reason: {r:?}"),
    }
}

#[cfg(test)]
mod tests {
    use crate::learning::policy::table;
    use crate::learning::testkit::*;
    use crate::learning::*;
    use lb_common::maglev;

    #[test]
    fn coarse_weights_are_scaled_up_so_that_changes_fit_the_budget() {
        // The lab's SYN-drop cascade left backend 1 back up at 0, backend 2 at 1 and backend
        // 3 (drained by the model, still dropping SYNs) at 7 of a configured 100 each, holding
        // 87% of the slots. Every change moved more than the budget and its fraction rounded
        // to nothing: stuck.
        let p = policy();
        let mut inputs: Vec<BackendInput> = (1..=3)
            .map(|id| input(id, 1, Err(Refusal::TooFewSamples { have: 5, need: 30 })))
            .collect();
        for (b, w) in inputs.iter_mut().zip([0, 1, 7]) {
            b.current_weight = w;
            b.observed = Some(observed(20.0, 20.0));
        }
        inputs[2].observed = Some(Observed {
            syn_retries_per_s: 18.0,
            ..observed(20.0, 20.0)
        });
        let mut state = third_drained_at_step_1();
        let before = {
            let w: Vec<u32> = inputs.iter().map(|b| b.current_weight).collect();
            table(&inputs, &w, p.table_size).unwrap()
        };
        let ds = run(&mut inputs, &p, &mut state, 40);
        let first = &ds[0];
        assert!(
            reasons(first, 2)
                .iter()
                .any(|r| matches!(r, Reason::Rescaled { factor: 25 })),
            "{:?}",
            reasons(first, 2)
        );
        // Reported against the weights in force, and the slots counted from their table (the
        // scaled one is the same).
        assert_eq!(first.backends[2].previous_weight, 7);
        assert!(first.changed());
        let w: Vec<u32> = first.weights().iter().map(|w| w.1).collect();
        let after = table(&inputs, &w, p.table_size).unwrap();
        assert_eq!(maglev::slots_changed(&before, &after), first.slots_moved);
        assert!(first.slots_moved > 0, "progress at once: {w:?}");
        for d in &ds {
            assert!(d.slots_moved_gradual <= d.slots_budget, "{:?}", d.weights());
        }
        let last = ds.last().unwrap();
        assert_eq!(
            weight(last, 3),
            0,
            "drained in the end: {:?}",
            last.weights()
        );
        assert!(
            weight(last, 1) >= 25 && weight(last, 2) >= 25,
            "slow start and ramp back: {:?}",
            last.weights()
        );
    }
}
