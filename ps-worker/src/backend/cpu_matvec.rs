//! The CPU backend's matrix-vector product: a layer with one output
//! column (every output layer) is a row of dot products, which a general
//! matrix product's packing makes slow.

use ndarray::{Array1, Array2, ArrayView1, ArrayView2, Axis};

/// `a @ v` as a column, for the output layers (one column), which the
/// packing of a general matrix product makes slow: row dot products when
/// `a` is row-major, row-scaled sums when it is a transposed row-major one.
pub(super) fn matvec(a: &ArrayView2<f32>, v: &ArrayView1<f32>) -> Array2<f32> {
    let mut out = vec![0f32; a.nrows()];
    if let (Some(rows), Some(v)) = (a.as_slice(), v.as_slice()) {
        let k = a.ncols();
        for (o, row) in out.iter_mut().zip(rows.chunks_exact(k.max(1))) {
            *o = dot(row, v);
        }
    } else if let (Some(cols), Some(v)) = (a.t().as_slice(), v.as_slice()) {
        // a = xᵀ with x row-major: out = Σ_k v[k] · x[k, :].
        let n = a.nrows();
        for (x_row, &vk) in cols.chunks_exact(n.max(1)).zip(v) {
            for (o, x) in out.iter_mut().zip(x_row) {
                *o += vk * x;
            }
        }
    } else {
        for (o, row) in out.iter_mut().zip(a.outer_iter()) {
            *o = row.dot(v);
        }
    }
    Array1::from(out).insert_axis(Axis(1))
}

/// A dot product in 8 independent lanes (so it vectorizes), lanes summed
/// in order at the end.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a8
        .remainder()
        .iter()
        .zip(b8.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in a8.zip(b8) {
        for l in 0..8 {
            lanes[l] += x[l] * y[l];
        }
    }
    lanes.iter().sum::<f32>() + tail
}
