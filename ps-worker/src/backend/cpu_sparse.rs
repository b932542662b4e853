//! The CPU backend's sparse ops: pooling rows into examples and its
//! adjoint (the gradient of each distinct row), and the FM pairwise terms.

use std::sync::Arc;

use ndarray::{Array2, Axis};

use super::{from_rows, rows_match_plan};
use crate::backend::{BackendError, Pooling, SparsePlan, shape_error};

/// `rows` rows of `dim` sums, row-major: each row starts at zero and
/// `add(row, sums)` adds its terms. The buffer grows a row at a time, so
/// every page is first touched by a write. A zeroed allocation
/// (`vec![0.0; n]`) of a step's size is fresh pages mapped to the kernel's
/// shared zero page: the first `+=` reads it, and the write then faults
/// again to copy it, with a TLB shootdown across cores. A ctr26 run had
/// about 50,000 such shootdowns (interrupts on a VM), some 3% of its
/// profile; with this, about 200.
fn sums_by_row(rows: usize, dim: usize, mut add: impl FnMut(usize, &mut [f32])) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows * dim);
    for row in 0..rows {
        let start = out.len();
        out.resize(start + dim, 0.0);
        add(row, &mut out[start..]);
    }
    out
}

/// Per distinct row, `dim` sums: `add(e, sums)` adds occurrence `e`'s
/// terms to the sums of the row it reads. Occurrences are taken in their
/// own order, so whatever an occurrence reads per example is read front to
/// back and each row's sums are written where they lie. That is about four
/// times faster for a ctr26 batch's gradient scatter (0.5-1.3 ms against
/// 2.2-5.4 ms, `ps-bench kernels --device cpu --examples 4096`) than
/// summing a row at a time through the plan's grouping by row
/// ([`SparsePlan::by_row`]), which reads the gradients at random. A row's
/// occurrences still arrive in ascending order, the order that grouping
/// lists them in, so every sum is the same to the bit.
fn sums_by_entry(
    plan: &SparsePlan,
    dim: usize,
    mut add: impl FnMut(usize, &mut [f32]),
) -> Vec<f32> {
    // Written, not `vec![0.0; n]`: see `sums_by_row`.
    let mut out = Vec::with_capacity(plan.unique * dim);
    out.resize(plan.unique * dim, 0.0);
    for (e, &u) in plan.entry_row.iter().enumerate() {
        let u = u as usize;
        add(e, &mut out[u * dim..(u + 1) * dim]);
    }
    out
}

/// Each example's FM pairwise term per factor dimension (`0.5 (s_d^2 -
/// q_d)`, `s = sum_i x_i v_i`, `q = sum_i x_i^2 v_i^2`) and its sums `s`,
/// with the same operations in the same order as the CUDA kernel.
pub(super) fn fm_pairs(rows: &Array2<f32>, plan: &SparsePlan) -> (Array2<f32>, Array2<f32>) {
    let dim = rows.ncols();
    let mut sums = Array2::<f32>::zeros((plan.examples, dim));
    let mut pairs = Array2::<f32>::zeros((plan.examples, dim));
    let mut squares = vec![0f32; dim];
    for b in 0..plan.examples {
        squares.iter_mut().for_each(|q| *q = 0.0);
        let range = plan.segment_offsets[b * plan.fields] as usize
            ..plan.segment_offsets[(b + 1) * plan.fields] as usize;
        let mut sum = sums.row_mut(b);
        for e in range {
            let x = plan.entry_value[e];
            let v = rows.row(plan.entry_row[e] as usize);
            for d in 0..dim {
                let xv = x * v[d];
                sum[d] += xv;
                squares[d] += xv * xv;
            }
        }
        for (d, p) in pairs.row_mut(b).iter_mut().enumerate() {
            *p = 0.5 * (sum[d] * sum[d] - squares[d]);
        }
    }
    (pairs, sums)
}

/// Per example and field (or per example), the sum of its rows times
/// their values.
pub(super) fn gather_pool(
    rows: &Array2<f32>,
    plan: &Arc<SparsePlan>,
    pooling: Pooling,
) -> Result<Array2<f32>, BackendError> {
    rows_match_plan("gather_pool", rows, plan)?;
    let stride = plan.stride(pooling);
    let dim = rows.ncols();
    let rows = rows.as_standard_layout();
    let table = rows.as_slice().unwrap_or_default();
    // Plain slices: ndarray row views cost more than the 16 adds they hold.
    let out = sums_by_row(plan.pooled_rows(pooling), dim, |o, target| {
        let range = plan.segment_offsets[o * stride] as usize
            ..plan.segment_offsets[(o + 1) * stride] as usize;
        for e in range {
            let (x, r) = (plan.entry_value[e], plan.entry_row[e] as usize);
            for (t, v) in target.iter_mut().zip(&table[r * dim..(r + 1) * dim]) {
                *t += x * v;
            }
        }
    });
    from_rows("gather_pool", out, dim)
}

/// The adjoint of [`gather_pool`]: per distinct row, the sum of the pooled
/// gradients it went into, times its values.
pub(super) fn scatter_pool(
    grad: &Array2<f32>,
    plan: &Arc<SparsePlan>,
    pooling: Pooling,
) -> Result<Array2<f32>, BackendError> {
    if grad.nrows() != plan.pooled_rows(pooling) {
        return Err(shape_error(
            "scatter_pool",
            format!(
                "{} gradient rows, expected {}",
                grad.nrows(),
                plan.pooled_rows(pooling)
            ),
        ));
    }
    let stride = plan.stride(pooling) as u32;
    let dim = grad.ncols();
    let grad = grad.as_standard_layout();
    let pooled = grad.as_slice().unwrap_or_default();
    let out = sums_by_entry(plan, dim, |e, target| {
        let (x, o) = (
            plan.entry_value[e],
            (plan.entry_segment[e] / stride) as usize,
        );
        for (t, g) in target.iter_mut().zip(&pooled[o * dim..(o + 1) * dim]) {
            *t += x * g;
        }
    });
    from_rows("scatter_pool", out, dim)
}

/// Each example's FM pairwise term, summed over the factor dimensions, and
/// the sums [`fm_backward`] needs.
pub(super) fn fm_forward(
    rows: &Array2<f32>,
    plan: &Arc<SparsePlan>,
) -> Result<(Array2<f32>, Array2<f32>), BackendError> {
    rows_match_plan("fm_forward", rows, plan)?;
    let (pairs, sums) = fm_pairs(rows, plan);
    // Summed in column order, as the CUDA kernel does.
    let out = pairs.map_axis(Axis(1), |p| p.iter().sum::<f32>());
    Ok((out.insert_axis(Axis(1)), sums))
}

/// Per distinct row, the gradient of the FM pairwise terms it took part in.
pub(super) fn fm_backward(
    grad: &Array2<f32>,
    sums: &Array2<f32>,
    rows: &Array2<f32>,
    plan: &Arc<SparsePlan>,
) -> Result<Array2<f32>, BackendError> {
    rows_match_plan("fm_backward", rows, plan)?;
    // [examples, 1]: the summed term's gradient; [examples, dim]: per dimension.
    let per_dim = grad.ncols() != 1;
    if grad.nrows() != plan.examples
        || (per_dim && grad.ncols() != rows.ncols())
        || sums.dim() != (plan.examples, rows.ncols())
    {
        return Err(shape_error(
            "fm_backward",
            format!(
                "grad {:?}, sums {:?} for {} examples",
                grad.dim(),
                sums.dim(),
                plan.examples
            ),
        ));
    }
    let fields = plan.fields as u32;
    let dim = rows.ncols();
    let out = sums_by_entry(plan, dim, |e, target| {
        let v = rows.row(plan.entry_row[e] as usize);
        let b = (plan.entry_segment[e] / fields) as usize;
        let (x, g) = (plan.entry_value[e], grad.row(b));
        let s = sums.row(b);
        for d in 0..dim {
            let g = if per_dim { g[d] } else { g[0] };
            target[d] += g * (x * s[d] - x * x * v[d]);
        }
    });
    from_rows("fm_backward", out, dim)
}
