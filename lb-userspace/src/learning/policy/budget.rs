//! Stage: the disruption budget. Gradual changes move at most `slots_budget` slots of the real
//! Maglev table; a larger step is shortened to the largest fraction that fits.
use std::fmt;

use lb_common::maglev;

use super::{step_limit::Weights, BackendInput, Mode, Step};
use crate::datapath::addr_bytes;
use crate::learning::Reason;

/// Table builds at most when a change must be cut to the disruption budget.
const BUDGET_TRIES: u32 = 8;

/// The weights after the budget, and what they move.
pub(super) struct Budgeted {
    pub(super) weights: Vec<u32>,
    pub(super) slots_moved: usize,
    pub(super) slots_moved_gradual: usize,
    pub(super) slots_budget: usize,
    pub(super) table_error: Option<String>,
}

/// Applies the proposed weights if their gradual changes fit the budget, else the largest
/// fraction of them that does. Inputs the table builder rejects (duplicate address or id,
/// id 0, bad size): nothing gradual moves; urgent changes still apply.
pub(super) fn limit(s: &mut Step, w: &Weights) -> Budgeted {
    let mut out = Budgeted {
        weights: w.proposed.clone(),
        slots_moved: 0,
        slots_moved_gradual: 0,
        slots_budget: s.p.slots_budget(),
        table_error: None,
    };
    if w.proposed == w.current {
        return out;
    }
    let inputs: Vec<&BackendInput> = s.all.iter().map(|b| &b.input).collect();
    let size = s.p.table_size;
    let built = table(inputs.iter().copied(), &w.current, size).and_then(|t_cur| {
        let t_base = if w.baseline == w.current {
            t_cur.clone()
        } else {
            table(inputs.iter().copied(), &w.baseline, size)?
        };
        Ok((t_cur, t_base))
    });
    let result = built.and_then(|(t_cur, t_base)| {
        let (weights, t_new, m, cut) = within_budget(w, &inputs, &t_base, size, out.slots_budget)?;
        Ok((weights, maglev::slots_changed(&t_cur, &t_new), m, cut))
    });
    match result {
        Ok((weights, moved, moved_gradual, cut)) => {
            if let Some(fraction_applied) = cut {
                say_cut(s, w, fraction_applied, out.slots_budget);
            }
            out.weights = weights;
            out.slots_moved = moved;
            out.slots_moved_gradual = moved_gradual;
        }
        Err(e) => {
            out.table_error = Some(e);
            out.weights = w.baseline.clone();
        }
    }
    out
}

/// Tells every gradual change that was shortened by how much.
fn say_cut(s: &mut Step, w: &Weights, fraction_applied: f64, budget: usize) {
    for (b, (proposed, baseline)) in s.all.iter_mut().zip(w.proposed.iter().zip(&w.baseline)) {
        if matches!(b.mode, Mode::Gradual { .. } | Mode::Drain) && proposed != baseline {
            b.reasons.push(Reason::BudgetLimited {
                fraction_applied,
                slots_budget: budget,
            });
        }
    }
}

/// The weights within the budget, their table, the slots they disturb, and the fraction of
/// the step applied if it had to be shortened.
///
/// Slots whose flows a change disturbs are those that held a backend: a slot that drops
/// packets today (an empty table) disturbs nothing when it gets one, and counting those would
/// keep a pool that came back at an empty table stuck for good.
#[allow(clippy::type_complexity)]
fn within_budget(
    w: &Weights,
    inputs: &[&BackendInput],
    t_base: &[u32],
    size: u32,
    budget: usize,
) -> Result<(Vec<u32>, Vec<u32>, usize, Option<f64>), String> {
    let moved = |weights: &[u32]| -> Result<(usize, Vec<u32>), String> {
        let t = table(inputs.iter().copied(), weights, size)?;
        let disturbed = t_base
            .iter()
            .zip(&t)
            .filter(|&(a, b)| *a != 0 && a != b)
            .count();
        Ok((disturbed, t))
    };
    let (full, t_full) = moved(&w.proposed)?;
    if full <= budget {
        return Ok((w.proposed.clone(), t_full, full, None));
    }
    let (lo, (weights, t, m)) = search(w, t_base, budget, full, moved)?;
    Ok((weights, t, m, Some(lo)))
}

/// The largest fraction of the step within the budget, and its weights, table and slots. The
/// slots a weight change moves grow about in proportion to its size, so each try scales the
/// fraction by budget / moved (a little under, to land inside), and the first try within 90% of
/// the budget is taken: a few table builds rather than a bisection's ten.
#[allow(clippy::type_complexity)]
fn search(
    w: &Weights,
    t_base: &[u32],
    budget: usize,
    full: usize,
    moved: impl Fn(&[u32]) -> Result<(usize, Vec<u32>), String>,
) -> Result<(f64, (Vec<u32>, Vec<u32>, usize)), String> {
    let interp = |a: f64| -> Vec<u32> {
        (0..w.proposed.len())
            .map(|i| {
                let (b0, b1) = (f64::from(w.baseline[i]), f64::from(w.proposed[i]));
                (b0 + a * (b1 - b0)).round() as u32
            })
            .collect()
    };
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    let mut best = (w.baseline.clone(), t_base.to_vec(), 0);
    let mut guess = 0.97 * budget as f64 / full as f64;
    for _ in 0..BUDGET_TRIES {
        let a = guess.clamp(lo + (hi - lo) * 0.05, hi - (hi - lo) * 0.05);
        let weights = interp(a);
        let (m, t) = moved(&weights)?;
        if m <= budget {
            lo = a;
            best = (weights, t, m);
            if m as f64 >= 0.9 * budget as f64 {
                break;
            }
        } else {
            hi = a;
        }
        guess = a * 0.97 * budget as f64 / (m.max(1)) as f64;
    }
    Ok((lo, best))
}

/// The Maglev table of `weights` (by position in `inputs`).
pub(crate) fn table<'a>(
    inputs: impl IntoIterator<Item = &'a BackendInput>,
    weights: &[u32],
    size: u32,
) -> Result<Vec<u32>, String> {
    let backends: Vec<maglev::Backend> = inputs
        .into_iter()
        .zip(weights)
        .map(|(b, &w)| {
            let (addr, family) = addr_bytes(b.addr);
            maglev::Backend {
                addr,
                family,
                id: b.id,
                weight: w,
            }
        })
        .collect();
    crate::tables::build(&backends, size).map_err(|e| e.to_string())
}

pub(super) fn describe(r: &Reason, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    match r {
        Reason::BudgetLimited {
            fraction_applied,
            slots_budget,
        } => write!(
            f,
            "{:.0}% of the step applied to move at most {slots_budget} slots",
            fraction_applied * 100.0
        ),
        _ => unreachable!("not a budget reason: {r:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::learning::testkit::*;
    use crate::learning::*;

    #[test]
    fn an_empty_table_is_refilled_at_once() {
        // Every backend went down (the SYN-drop cascade's overloaded small backends; the
        // third drained by the model) and the first two are back: their slow start fills a
        // table that drops everything, which disturbs no flow.
        let p = policy();
        let mut inputs: Vec<BackendInput> = (1..=3)
            .map(|id| input(id, 1, Err(Refusal::TooFewSamples { have: 5, need: 30 })))
            .collect();
        for b in &mut inputs {
            b.current_weight = 0;
            b.observed = Some(observed(0.0, 20.0));
        }
        let state = third_drained_at_step_1();
        let d = decide(&inputs, &p, &state);
        assert_eq!(
            d.weights(),
            vec![(1, 25), (2, 25), (3, 0)],
            "{:?}",
            reasons(&d, 1)
        );
        assert_eq!(d.slots_moved, p.table_size as usize);
        assert_eq!(d.slots_moved_gradual, 0);
    }
}
