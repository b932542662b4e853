//! The CPU backend: every op on ndarray arrays in host memory.
//!
//! Reductions run in a fixed order so results are deterministic; the CUDA
//! kernels follow the same order where they can, and the parity tests
//! compare the two within 1e-4 relative error.

use std::sync::Arc;

use ndarray::{Array2, Axis};

use super::{
    Activation, Backend, BackendError, BatchNormMode, BatchNormSaved, Dropout, PoolKind, Pooling,
    SparsePlan, Window, check_plan_rows, check_same_shape, image, shape_error,
};

#[path = "cpu_attention.rs"]
mod attention_ops;
#[path = "cpu_matvec.rs"]
mod matvec;
#[path = "cpu_sparse.rs"]
mod sparse;

use matvec::matvec;

/// Host compute with ndarray.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuBackend;

fn same_shape(op: &'static str, a: &Array2<f32>, b: &Array2<f32>) -> Result<(), BackendError> {
    check_same_shape(op, [a.nrows(), a.ncols()], [b.nrows(), b.ncols()])
}

fn rows_match_plan(
    op: &'static str,
    rows: &Array2<f32>,
    plan: &SparsePlan,
) -> Result<(), BackendError> {
    check_plan_rows(op, rows.nrows(), plan.unique)
}

/// `values` (row-major, `dim` per row) as a matrix.
fn from_rows(op: &'static str, values: Vec<f32>, dim: usize) -> Result<Array2<f32>, BackendError> {
    let rows = values.len().checked_div(dim).unwrap_or(0);
    Array2::from_shape_vec((rows, dim), values)
        .map_err(|e| shape_error(op, format!("{rows} x {dim}: {e}")))
}

impl Backend for CpuBackend {
    type Tensor = Array2<f32>;
    type Plan = Arc<SparsePlan>;

    fn name(&self) -> String {
        "cpu".into()
    }

    fn upload(&self, data: &[f32], rows: usize, cols: usize) -> Result<Array2<f32>, BackendError> {
        Array2::from_shape_vec((rows, cols), data.to_vec()).map_err(|e| {
            shape_error(
                "upload",
                format!("{} values as [{rows}, {cols}]: {e}", data.len()),
            )
        })
    }

    fn download(&self, t: &Array2<f32>) -> Result<Vec<f32>, BackendError> {
        // One copy of the slice where the layout allows it; the iterator
        // copies a value at a time (4% of a ctr26 step for its gradients).
        Ok(match t.as_slice() {
            Some(values) => values.to_vec(),
            None => t.iter().copied().collect(),
        })
    }

    fn download_owned(&self, t: Array2<f32>) -> Result<Vec<f32>, BackendError> {
        if !t.is_standard_layout() {
            return self.download(&t);
        }
        let n = t.len();
        let (mut values, offset) = t.into_raw_vec_and_offset();
        // A standard-layout array is `n` values in a row from its offset;
        // only a view cut out of a larger buffer has anything around them.
        let start = offset.unwrap_or(0);
        if start != 0 || values.len() != n {
            values = values[start..start + n].to_vec();
        }
        Ok(values)
    }

    fn shape(&self, t: &Array2<f32>) -> [usize; 2] {
        [t.nrows(), t.ncols()]
    }

    fn reshape(
        &self,
        t: Array2<f32>,
        rows: usize,
        cols: usize,
    ) -> Result<Array2<f32>, BackendError> {
        let dim = t.dim();
        let data: Vec<f32> = if t.is_standard_layout() {
            t.into_raw_vec_and_offset().0
        } else {
            t.iter().copied().collect()
        };
        Array2::from_shape_vec((rows, cols), data)
            .map_err(|e| shape_error("reshape", format!("{dim:?} to [{rows}, {cols}]: {e}")))
    }

    fn upload_plan(&self, plan: &Arc<SparsePlan>) -> Result<Arc<SparsePlan>, BackendError> {
        Ok(Arc::clone(plan))
    }

    fn gather_pool(
        &self,
        rows: &Array2<f32>,
        plan: &Arc<SparsePlan>,
        pooling: Pooling,
    ) -> Result<Array2<f32>, BackendError> {
        sparse::gather_pool(rows, plan, pooling)
    }

    fn scatter_pool(
        &self,
        grad: &Array2<f32>,
        plan: &Arc<SparsePlan>,
        pooling: Pooling,
    ) -> Result<Array2<f32>, BackendError> {
        sparse::scatter_pool(grad, plan, pooling)
    }

    fn fm_forward(
        &self,
        rows: &Array2<f32>,
        plan: &Arc<SparsePlan>,
    ) -> Result<(Array2<f32>, Array2<f32>), BackendError> {
        sparse::fm_forward(rows, plan)
    }

    fn fm_pairs(
        &self,
        rows: &Array2<f32>,
        plan: &Arc<SparsePlan>,
    ) -> Result<(Array2<f32>, Array2<f32>), BackendError> {
        rows_match_plan("fm_pairs", rows, plan)?;
        Ok(sparse::fm_pairs(rows, plan))
    }

    fn fm_backward(
        &self,
        grad: &Array2<f32>,
        sums: &Array2<f32>,
        rows: &Array2<f32>,
        plan: &Arc<SparsePlan>,
    ) -> Result<Array2<f32>, BackendError> {
        sparse::fm_backward(grad, sums, rows, plan)
    }

    fn matmul(
        &self,
        a: &Array2<f32>,
        b: &Array2<f32>,
        transpose_a: bool,
        transpose_b: bool,
    ) -> Result<Array2<f32>, BackendError> {
        let a = if transpose_a { a.t() } else { a.view() };
        let b = if transpose_b { b.t() } else { b.view() };
        if a.ncols() != b.nrows() {
            return Err(shape_error(
                "matmul",
                format!("{:?} @ {:?}", a.dim(), b.dim()),
            ));
        }
        if b.ncols() == 1 {
            return Ok(matvec(&a, &b.column(0)));
        }
        if a.ncols() == 1 {
            // An outer product (the gradient into an output layer's input).
            let (col, row) = (a.column(0), b.row(0));
            let mut c = Array2::<f32>::zeros((a.nrows(), b.ncols()));
            for (mut out, &x) in c.outer_iter_mut().zip(col) {
                out.zip_mut_with(&row, |o, &w| *o = x * w);
            }
            return Ok(c);
        }
        // Written into a row-major output: `dot` picks a column-major one
        // when both operands are (a column vector is), and every consumer
        // (reshape, row iteration, download) wants row-major.
        let mut c = Array2::<f32>::zeros((a.nrows(), b.ncols()));
        ndarray::linalg::general_mat_mul(1.0, &a, &b, 0.0, &mut c);
        Ok(c)
    }

    fn softmax_rows(&self, x: &Array2<f32>) -> Result<Array2<f32>, BackendError> {
        let mut y = x.clone();
        for mut row in y.outer_iter_mut() {
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            let mut sum = 0f32;
            for v in row.iter_mut() {
                *v = (*v - max).exp();
                sum += *v;
            }
            row.iter_mut().for_each(|v| *v /= sum);
        }
        Ok(y)
    }

    fn softmax_rows_backward(
        &self,
        grad: &Array2<f32>,
        y: &Array2<f32>,
    ) -> Result<Array2<f32>, BackendError> {
        same_shape("softmax_rows_backward", grad, y)?;
        let mut dx = Array2::<f32>::zeros(y.dim());
        for ((mut d, g), yr) in dx
            .outer_iter_mut()
            .zip(grad.outer_iter())
            .zip(y.outer_iter())
        {
            let mut dot = 0f32;
            for (a, b) in g.iter().zip(yr.iter()) {
                dot += a * b;
            }
            for ((d, &g), &y) in d.iter_mut().zip(g.iter()).zip(yr.iter()) {
                *d = y * (g - dot);
            }
        }
        Ok(dx)
    }

    fn stack_rows(&self, parts: &[&Array2<f32>]) -> Result<Array2<f32>, BackendError> {
        let views: Vec<_> = parts.iter().map(|p| p.view()).collect();
        ndarray::concatenate(Axis(0), &views).map_err(|e| shape_error("stack_rows", e.to_string()))
    }

    fn slice_rows(
        &self,
        t: &Array2<f32>,
        start: usize,
        count: usize,
    ) -> Result<Array2<f32>, BackendError> {
        if start + count > t.nrows() {
            return Err(shape_error(
                "slice_rows",
                format!("rows {start}..{} of {}", start + count, t.nrows()),
            ));
        }
        Ok(t.slice(ndarray::s![start..start + count, ..]).to_owned())
    }

    fn mix(&self, stacked: &Array2<f32>, gates: &Array2<f32>) -> Result<Array2<f32>, BackendError> {
        let (n, experts) = gates.dim();
        if stacked.nrows() != n * experts {
            return Err(shape_error(
                "mix",
                format!("stacked {:?} for gates {:?}", stacked.dim(), gates.dim()),
            ));
        }
        let cols = stacked.ncols();
        let mut out = Array2::<f32>::zeros((n, cols));
        for b in 0..n {
            for c in 0..cols {
                let mut acc = 0f32;
                for e in 0..experts {
                    acc += gates[[b, e]] * stacked[[e * n + b, c]];
                }
                out[[b, c]] = acc;
            }
        }
        Ok(out)
    }

    fn mix_backward(
        &self,
        grad: &Array2<f32>,
        stacked: &Array2<f32>,
        gates: &Array2<f32>,
    ) -> Result<(Array2<f32>, Array2<f32>), BackendError> {
        let (n, experts) = gates.dim();
        if stacked.nrows() != n * experts || grad.dim() != (n, stacked.ncols()) {
            return Err(shape_error(
                "mix_backward",
                format!(
                    "grad {:?}, stacked {:?}, gates {:?}",
                    grad.dim(),
                    stacked.dim(),
                    gates.dim()
                ),
            ));
        }
        let cols = stacked.ncols();
        let mut dstacked = Array2::<f32>::zeros(stacked.dim());
        let mut dgates = Array2::<f32>::zeros(gates.dim());
        for e in 0..experts {
            for b in 0..n {
                let mut dot = 0f32;
                for c in 0..cols {
                    dstacked[[e * n + b, c]] = gates[[b, e]] * grad[[b, c]];
                    dot += grad[[b, c]] * stacked[[e * n + b, c]];
                }
                dgates[[b, e]] = dot;
            }
        }
        Ok((dstacked, dgates))
    }

    fn copy(&self, t: &Array2<f32>) -> Result<Array2<f32>, BackendError> {
        Ok(t.clone())
    }

    fn scale(&self, x: &Array2<f32>, alpha: f32) -> Result<Array2<f32>, BackendError> {
        Ok(x.mapv(|v| alpha * v))
    }

    fn add(&self, a: &Array2<f32>, b: &Array2<f32>) -> Result<Array2<f32>, BackendError> {
        same_shape("add", a, b)?;
        Ok(a + b)
    }

    fn bias_act(
        &self,
        x: &Array2<f32>,
        bias: &Array2<f32>,
        act: Activation,
        dropout: Option<Dropout>,
    ) -> Result<Array2<f32>, BackendError> {
        if bias.dim() != (1, x.ncols()) {
            return Err(shape_error(
                "bias_act",
                format!("x {:?}, bias {:?}", x.dim(), bias.dim()),
            ));
        }
        let mut y = x + bias;
        for (i, v) in y.iter_mut().enumerate() {
            if act == Activation::Relu && *v < 0.0 {
                *v = 0.0;
            }
            if let Some(d) = dropout {
                *v = if d.keeps(i as u64) {
                    *v * d.scale()
                } else {
                    0.0
                };
            }
        }
        Ok(y)
    }

    fn bias_act_backward(
        &self,
        grad: &Array2<f32>,
        y: &Array2<f32>,
        act: Activation,
        dropout: Option<Dropout>,
    ) -> Result<(Array2<f32>, Array2<f32>), BackendError> {
        same_shape("bias_act_backward", grad, y)?;
        let mut dx = grad.clone();
        for (i, (g, &out)) in dx.iter_mut().zip(y.iter()).enumerate() {
            let mut factor = 1.0;
            if let Some(d) = dropout {
                factor = if d.keeps(i as u64) { d.scale() } else { 0.0 };
            }
            if act == Activation::Relu && out <= 0.0 {
                factor = 0.0;
            }
            *g *= factor;
        }
        let dbias = dx.sum_axis(Axis(0)).insert_axis(Axis(0));
        Ok((dx, dbias))
    }

    fn batch_norm(
        &self,
        x: &Array2<f32>,
        params: &Array2<f32>,
        mode: BatchNormMode,
        eps: f32,
    ) -> Result<(Array2<f32>, Array2<f32>, BatchNormSaved<Array2<f32>>), BackendError> {
        if params.dim() != (4, x.ncols()) {
            return Err(shape_error(
                "batch_norm",
                format!("x {:?}, params {:?}", x.dim(), params.dim()),
            ));
        }
        let n = x.nrows().max(1) as f32;
        let (mean, var) = match mode {
            BatchNormMode::Batch => {
                let mean = x.sum_axis(Axis(0)) / n;
                let var =
                    x.outer_iter()
                        .fold(ndarray::Array1::<f32>::zeros(x.ncols()), |acc, row| {
                            let d = &row - &mean;
                            acc + &d * &d
                        })
                        / n;
                (mean, var)
            }
            BatchNormMode::Running => (params.row(2).to_owned(), params.row(3).to_owned()),
        };
        let inv_std = var.mapv(|v| 1.0 / (v + eps).sqrt());
        let normalized = (x - &mean) * &inv_std;
        let y = &normalized * &params.row(0) + params.row(1);
        let mut stats = Array2::<f32>::zeros((2, x.ncols()));
        stats.row_mut(0).assign(&mean);
        stats.row_mut(1).assign(&var);
        Ok((
            y,
            stats,
            BatchNormSaved {
                normalized,
                inv_std: inv_std.insert_axis(Axis(0)),
            },
        ))
    }

    fn batch_norm_backward(
        &self,
        grad: &Array2<f32>,
        params: &Array2<f32>,
        saved: &BatchNormSaved<Array2<f32>>,
    ) -> Result<(Array2<f32>, Array2<f32>), BackendError> {
        same_shape("batch_norm_backward", grad, &saved.normalized)?;
        let n = grad.nrows().max(1) as f32;
        let dbeta = grad.sum_axis(Axis(0));
        let dgamma = (grad * &saved.normalized).sum_axis(Axis(0));
        // dx = gamma * inv_std / n * (n * g - sum(g) - xhat * sum(g * xhat))
        let scale = &params.row(0) * &saved.inv_std.row(0) / n;
        let dx = (grad * n - &dbeta - &saved.normalized * &dgamma) * &scale;
        let mut dparams = Array2::<f32>::zeros((2, grad.ncols()));
        dparams.row_mut(0).assign(&dgamma);
        dparams.row_mut(1).assign(&dbeta);
        Ok((dx, dparams))
    }

    fn bce_with_logits(
        &self,
        logits: &Array2<f32>,
        labels: &Array2<f32>,
    ) -> Result<(f64, Array2<f32>), BackendError> {
        same_shape("bce_with_logits", logits, labels)?;
        let n = logits.len().max(1) as f32;
        let mut loss = 0f64;
        let mut grad = Array2::<f32>::zeros(logits.dim());
        for ((g, &z), &y) in grad.iter_mut().zip(logits.iter()).zip(labels.iter()) {
            loss += f64::from(bce(z, y));
            *g = (sigmoid(z) - y) / n;
        }
        Ok((loss, grad))
    }

    fn sigmoid(&self, x: &Array2<f32>) -> Result<Array2<f32>, BackendError> {
        Ok(x.mapv(sigmoid))
    }

    fn im2col(&self, x: &Array2<f32>, win: &Window) -> Result<Array2<f32>, BackendError> {
        win.check_input("im2col", self.shape(x))?;
        from_rows("im2col", image::im2col(&flat(x), win), win.patch())
    }

    fn col2im(&self, cols: &Array2<f32>, win: &Window) -> Result<Array2<f32>, BackendError> {
        win.check_output("col2im", self.shape(cols), win.patch())?;
        from_rows("col2im", image::col2im(&flat(cols), win), win.channels)
    }

    fn pool2d(&self, x: &Array2<f32>, win: &Window, kind: PoolKind) -> CpuResult {
        win.check_input("pool2d", self.shape(x))?;
        from_rows("pool2d", image::pool2d(&flat(x), win, kind), win.channels)
    }

    fn pool2d_backward(
        &self,
        grad: &Array2<f32>,
        x: &Array2<f32>,
        win: &Window,
        kind: PoolKind,
    ) -> CpuResult {
        win.check_input("pool2d_backward", self.shape(x))?;
        win.check_output("pool2d_backward", self.shape(grad), win.channels)?;
        let dx = image::pool2d_backward(&flat(grad), &flat(x), win, kind);
        from_rows("pool2d_backward", dx, win.channels)
    }

    fn concat_cols(&self, parts: &[&Array2<f32>]) -> CpuResult {
        let views: Vec<_> = parts.iter().map(|p| p.view()).collect();
        ndarray::concatenate(Axis(1), &views)
            .map(|t| t.as_standard_layout().into_owned())
            .map_err(|e| shape_error("concat_cols", e.to_string()))
    }

    fn slice_cols(&self, t: &Array2<f32>, start: usize, width: usize) -> CpuResult {
        if start + width > t.ncols() {
            return Err(shape_error(
                "slice_cols",
                format!("columns {start}..{} of {}", start + width, t.ncols()),
            ));
        }
        Ok(t.slice(ndarray::s![.., start..start + width])
            .as_standard_layout()
            .into_owned())
    }

    fn softmax_cross_entropy(
        &self,
        logits: &Array2<f32>,
        labels: &Array2<f32>,
    ) -> Result<(f64, Array2<f32>), BackendError> {
        check_same_shape(
            "softmax_cross_entropy",
            [labels.nrows(), labels.ncols()],
            [logits.nrows(), 1],
        )?;
        let (loss, grad) =
            image::softmax_cross_entropy(&flat(logits), &flat(labels), logits.ncols())?;
        Ok((
            loss,
            from_rows("softmax_cross_entropy", grad, logits.ncols())?,
        ))
    }

    fn attention(
        &self,
        q: &Array2<f32>,
        k: &Array2<f32>,
        v: &Array2<f32>,
        positions: usize,
        heads: usize,
    ) -> Result<(Array2<f32>, Array2<f32>), BackendError> {
        self.attention_op([q, k, v], positions, heads)
    }

    fn attention_backward(
        &self,
        grad: &Array2<f32>,
        q: &Array2<f32>,
        k: &Array2<f32>,
        v: &Array2<f32>,
        weights: &Array2<f32>,
        positions: usize,
        heads: usize,
    ) -> Result<(Array2<f32>, Array2<f32>, Array2<f32>), BackendError> {
        self.attention_backward_op([grad, q, k, v, weights], positions, heads)
    }
}

type CpuResult = Result<Array2<f32>, BackendError>;

/// A tensor's elements in row-major order (borrowed when it is laid out so).
fn flat(t: &Array2<f32>) -> std::borrow::Cow<'_, [f32]> {
    match t.as_slice() {
        Some(s) => std::borrow::Cow::Borrowed(s),
        None => std::borrow::Cow::Owned(t.iter().copied().collect()),
    }
}

/// The logistic function.
#[inline]
pub fn sigmoid(z: f32) -> f32 {
    1.0 / (1.0 + (-z).exp())
}

/// Binary cross-entropy of logit `z` against label `y`, computed without overflow.
#[inline]
pub fn bce(z: f32, y: f32) -> f32 {
    z.max(0.0) - z * y + (-z.abs()).exp().ln_1p()
}

#[cfg(test)]
#[path = "cpu_tests.rs"]
mod tests;
