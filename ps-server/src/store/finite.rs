//! Whether a push keeps its rows finite: the proof from a table's bounds
//! that lets most pushes skip any per-row check, the per-row check and
//! fingerprint for the others, and the undo record that puts a refused
//! call's rows back.

use std::sync::Arc;

use ps_common::OptimizerSpec;

use super::{Push, Table};
use crate::budget::MemoryBudget;

/// Whether every value of `row` is finite, and a fingerprint of its bits
/// (one pass of plain reductions, so it vectorizes: no early exit, no
/// multiplication). The fingerprint only tells whether another push changed
/// a row since: any change of one value changes it.
pub(super) fn finite_and_fingerprint(row: &[f32]) -> (bool, u64) {
    let (bad, sum, xor) = row.iter().fold((0u32, 0u64, 0u32), |(bad, sum, xor), v| {
        let bits = v.to_bits();
        (
            bad | u32::from(bits & 0x7f80_0000 == 0x7f80_0000),
            sum.wrapping_add(u64::from(bits)),
            xor ^ bits,
        )
    });
    (bad == 0, sum ^ (u64::from(xor) << 32))
}

/// Lanes the magnitude scans keep apart, so the compiler can use vector
/// instructions (a single running max or sum is a serial chain).
const LANES: usize = 8;

/// The largest magnitude of `values`, the sum of their magnitudes, and
/// whether every one is finite (one pass, in [`LANES`] independent lanes).
pub(super) fn scan_magnitudes(values: &[f32]) -> (f32, f32, bool) {
    let (mut max, mut sum, mut bad) = ([0f32; LANES], [0f32; LANES], [0u32; LANES]);
    let mut chunks = values.chunks_exact(LANES);
    for chunk in &mut chunks {
        for i in 0..LANES {
            let a = chunk[i].abs();
            max[i] = if a > max[i] { a } else { max[i] };
            sum[i] += a;
            bad[i] |= u32::from(chunk[i].to_bits() & 0x7f80_0000 == 0x7f80_0000);
        }
    }
    for (i, &v) in chunks.remainder().iter().enumerate() {
        let a = v.abs();
        max[i] = if a > max[i] { a } else { max[i] };
        sum[i] += a;
        bad[i] |= u32::from(v.to_bits() & 0x7f80_0000 == 0x7f80_0000);
    }
    (
        max.iter().fold(0f32, |m, &v| if v > m { v } else { m }),
        sum.iter().sum(),
        bad.iter().all(|&b| b == 0),
    )
}

/// Magnitudes a push may reach and still take the fast path: far below
/// `f32::MAX` (3.4e38), so the bound's own rounding cannot matter.
pub(super) const SAFE_MAGNITUDE: f64 = 1e30;

/// The largest magnitude and the sum of magnitudes of a push's gradients.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Magnitudes {
    pub(super) max: f32,
    pub(super) sum: f32,
}

/// What a push that provably keeps its rows finite may leave in them: the
/// largest weight and the largest optimizer state, over every row it writes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Proof {
    pub(super) weight: f64,
    pub(super) state: f64,
}

/// Whether `push` provably leaves every row of `table` finite, given the
/// table's bounds on its weights and its optimizer state: the largest
/// result of the optimizer's update, and every intermediate product,
/// applied once per key occurrence, stays below [`SAFE_MAGNITUDE`]. SGD
/// with `lr * l2 > 1` and Adam with `l2 > 0` are proven for at most
/// [`MAX_STEPPED_KEYS`] keys (their bound compounds per step). FTRL
/// (whose weight divides by its accumulators) is proven only when
/// `beta / alpha + l2` keeps that divisor away from zero, for at most
/// [`MAX_STEPPED_KEYS`] keys. The bounds hold for any stored state, not only for states a
/// gradient history could produce.
pub(super) fn provably_finite(table: &Table, push: &Push<'_>, grads: Magnitudes) -> Option<Proof> {
    let (w, s) = table.bounds();
    let (w, s) = (f64::from(w), f64::from(s));
    let n = push.keys.len() as f64;
    // Summed in f32 (rounding stays far inside the margin to f32::MAX).
    let (g_max, g_sum) = (f64::from(grads.max), f64::from(grads.sum));
    let (proof, intermediate) = match table.spec.optimizer.with_lr_scale(push.lr_scale) {
        // With l2 the step is w (keep - lr l2) - lr g, keep = 1 - lr wd in
        // [0, 1], so |w'| <= k |w| + lr |g| with k = max(1, lr l2); k = 1
        // gives |w| + lr sum|g| (lr g is part of that sum).
        OptimizerSpec::Sgd { lr, l2, .. } => {
            let (lr, l2) = (f64::from(lr), f64::from(l2));
            let k = (lr * l2).max(1.0);
            let weight = if k == 1.0 {
                w + lr * g_sum
            } else {
                stepped(push, w, |w| k * w + lr * g_max)?
            };
            (Proof { weight, state: s }, lr * (g_max + l2 * weight))
        }
        // acc grows by g'^2 per occurrence (g' = g + l2 w) and acc >= g'^2
        // when it divides, so each update moves w by at most lr (decay only
        // shrinks it); lr g' is computed first.
        OptimizerSpec::Adagrad { lr, l2, .. } => {
            let (lr, l2) = (f64::from(lr), f64::from(l2));
            let weight = w + lr * n;
            let g = g_max + l2 * weight;
            (
                Proof {
                    weight,
                    state: s + n * g * g,
                },
                lr * g,
            )
        }
        // m and v stay within max(|m|, |g'|) and max(v, g'^2), the step
        // powers within 1; the bias corrections divide by at least
        // 1 - beta, and sqrt(v^) + eps >= eps. With l2 > 0, g' = g + l2 w
        // grows with the weight: followed step by step.
        OptimizerSpec::Adam {
            lr,
            beta1,
            beta2,
            eps,
            l2,
            ..
        } => {
            let (lr, l2) = (f64::from(lr), f64::from(l2));
            let (beta1, beta2, eps) = (f64::from(beta1), f64::from(beta2), f64::from(eps));
            let moment = |w: f64| s.max(g_max + l2 * w) / (1.0 - beta1);
            let weight = if l2 == 0.0 {
                w + n * lr * moment(w) / eps
            } else {
                stepped(push, w, |w| w + lr * moment(w) / eps)?
            };
            let g = g_max + l2 * weight;
            (
                Proof {
                    weight,
                    state: s.max(g).max(g * g),
                },
                (lr * moment(weight)).max(s.max(g * g) / (1.0 - beta2)),
            )
        }
        // sigma = (sqrt(n + g^2) - sqrt(n)) / alpha <= |g| / alpha, so z
        // moves by at most |g| + |g| |w| / alpha; n grows by g^2; the
        // weight is |z| (at most) over beta / alpha + sqrt(n) / alpha + l2,
        // which needs beta / alpha + l2 > 0 to stay bounded.
        OptimizerSpec::Ftrl {
            alpha, beta, l2, ..
        } => {
            let (alpha, beta, l2) = (f64::from(alpha), f64::from(beta), f64::from(l2));
            let floor = beta / alpha + l2;
            if !(floor >= 1e-6 && alpha > 0.0) {
                return None;
            }
            let z = stepped(push, s, |z| z + g_max + g_max * (z / floor).max(w) / alpha)?;
            let state = z.max(s + n * g_max * g_max);
            (
                Proof {
                    weight: w.max(z / floor),
                    state,
                },
                (g_max * g_max).max((beta + state.sqrt()) / alpha),
            )
        }
    };
    (proof.weight.max(proof.state).max(intermediate) < SAFE_MAGNITUDE).then_some(proof)
}

/// Keys a push may have for a bound that compounds per update to be
/// followed step by step.
const MAX_STEPPED_KEYS: usize = 64;

/// A bound followed through one `step` per key occurrence of `push`, from
/// `start`; `None` past [`MAX_STEPPED_KEYS`] keys (the push is then checked
/// row by row).
fn stepped(push: &Push<'_>, start: f64, step: impl Fn(f64) -> f64) -> Option<f64> {
    (push.keys.len() <= MAX_STEPPED_KEYS).then(|| (0..push.keys.len()).fold(start, |b, _| step(b)))
}

/// The fingerprint of row `key` as the initializer creates it.
pub(super) fn fingerprint_of_fresh(table: &Table, key: u64) -> u64 {
    let mut row = vec![0f32; table.row_len];
    table.fill_fresh_row(key, &mut row);
    finite_and_fingerprint(&row).1
}

/// The rows one push call changed, as they were, so that a call refused
/// part-way can be put back.
#[derive(Debug)]
pub(super) struct Undo {
    /// (table index, key, whether the call created the row, fingerprint
    /// of the row as the call left it), in order.
    pub(super) rows: Vec<(usize, u64, bool, u64)>,
    /// The changed rows' floats before the call, row after row.
    pub(super) before: Vec<f32>,
}

impl Undo {
    /// Room for `rows` row changes of `floats` floats in all.
    pub(super) fn with_room(rows: usize, floats: usize) -> Undo {
        Undo {
            rows: Vec::with_capacity(rows),
            before: Vec::with_capacity(floats),
        }
    }

    /// Puts back every row the call changed, newest first. A row another
    /// push changed since (its fingerprint differs) is left as it is:
    /// putting it back would lose that push. A row the call created is
    /// removed.
    pub(super) fn roll_back(&self, tables: &[Arc<Table>], budget: &MemoryBudget) {
        let mut at = self.before.len();
        for &(t, key, created, left) in self.rows.iter().rev() {
            let table = &tables[t];
            at -= table.row_len;
            let before = &self.before[at..at + table.row_len];
            if created {
                if table.remove_if(key, |row| finite_and_fingerprint(row).1 == left) {
                    budget.release(table.sparse_row_bytes());
                }
            } else if let Err(e) = table.update(key, |row| {
                if finite_and_fingerprint(row).1 == left {
                    row.copy_from_slice(before);
                }
            }) {
                // The row went to disk meanwhile and cannot come back: it
                // keeps the refused push's (finite) update.
                tracing::error!(table = %table.spec.name, key, "cannot put a row back: {e}");
            }
        }
    }
}
