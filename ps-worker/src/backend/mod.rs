//! The compute backend: every forward and backward op the models use.
//!
//! Models are written once against [`Backend`]; [`cpu::CpuBackend`] runs the
//! ops with ndarray and [`cuda::CudaBackend`] with custom CUDA kernels. A
//! backend owns its tensors (host arrays or device buffers): a model uploads
//! the pulled rows once per step, chains ops on the backend, and downloads
//! only the loss, the predictions and the gradients it pushes.
//!
//! Sparse inputs travel as a [`SparsePlan`]: the batch's feature occurrences
//! sorted by (example, field), plus the transposed index (occurrences per
//! distinct row) that makes gradient scatter a deterministic segment sum.
//! Dropout masks come from a counter-based hash of (seed, element), so both
//! backends draw the same mask and can be compared bit for bit.

pub mod attention;
pub mod conformance;
pub mod cpu;
pub mod cuda;
pub mod image;
mod plan;

pub use attention::Heads;
pub use image::{PoolKind, Window};
pub use plan::SparsePlan;

use std::sync::Arc;

/// A backend op that could not run.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BackendError {
    /// The requested device does not exist or cannot be used.
    #[error("{0}")]
    Unavailable(String),
    /// Operand shapes do not fit the op (a bug in the caller).
    #[error("shape mismatch in {op}: {detail}")]
    Shape {
        /// The op.
        op: &'static str,
        /// The shapes involved.
        detail: String,
    },
    /// The device reported an error.
    #[error("device error: {0}")]
    Device(String),
}

/// Elementwise activation of a layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `y = x`.
    Identity,
    /// `y = max(x, 0)`.
    Relu,
}

/// Inverted dropout: each element is kept with probability `1 - rate` and
/// scaled by `1 / (1 - rate)`; which ones is decided by `hash(seed, index)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dropout {
    /// Probability of dropping an element, in `[0, 1)`.
    pub rate: f32,
    /// Mask seed; a fresh one per step and layer.
    pub seed: u64,
}

impl Dropout {
    /// Whether element `index` is kept. Shared by both backends (the CUDA
    /// kernel implements the same hash).
    #[inline]
    pub fn keeps(&self, index: u64) -> bool {
        let h = ps_common::routing::mix64(self.seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        // Top 24 bits as a uniform in [0, 1).
        ((h >> 40) as f32) * (1.0 / 16_777_216.0) >= self.rate
    }

    /// The scale applied to kept elements.
    #[inline]
    pub fn scale(&self) -> f32 {
        1.0 / (1.0 - self.rate)
    }
}

/// How [`Backend::gather_pool`] pools occurrences.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// One output row per example: the sum over all its features.
    Example,
    /// One output row per (example, field): `[examples * fields, dim]`, which
    /// is the same memory as `[examples, fields * dim]`.
    Field,
}

/// What batch normalization saves for its backward pass.
#[derive(Debug)]
pub struct BatchNormSaved<T> {
    /// Normalized input `(x - mean) * inv_std`, `[batch, width]`.
    pub normalized: T,
    /// `1 / sqrt(var + eps)` per column, `[1, width]`.
    pub inv_std: T,
}

/// Batch statistics or running statistics for batch normalization.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchNormMode {
    /// Normalize with the batch's own mean and variance (training).
    Batch,
    /// Normalize with the given running mean and variance (evaluation).
    Running,
}

/// Forward and backward ops over 2-D row-major f32 tensors.
///
/// Every op checks its operands' shapes and returns
/// [`BackendError::Shape`] rather than panicking.
pub trait Backend {
    /// A row-major `[rows, cols]` f32 matrix owned by the backend.
    type Tensor;
    /// A [`SparsePlan`] in the backend's memory.
    type Plan;

    /// Human-readable device name (`cpu`, `cuda:0 (NVIDIA H200)`).
    fn name(&self) -> String;
    /// Copies host data in as a `[rows, cols]` tensor.
    fn upload(&self, data: &[f32], rows: usize, cols: usize) -> Result<Self::Tensor, BackendError>;
    /// Copies a tensor out, row-major.
    fn download(&self, t: &Self::Tensor) -> Result<Vec<f32>, BackendError>;
    /// A tensor's values, row-major, for a tensor no longer needed: a
    /// backend whose tensors live in host memory hands over the buffer
    /// instead of copying it.
    fn download_owned(&self, t: Self::Tensor) -> Result<Vec<f32>, BackendError> {
        self.download(&t)
    }
    /// `[rows, cols]` of a tensor.
    fn shape(&self, t: &Self::Tensor) -> [usize; 2];
    /// Reinterprets a tensor with the same number of elements.
    fn reshape(
        &self,
        t: Self::Tensor,
        rows: usize,
        cols: usize,
    ) -> Result<Self::Tensor, BackendError>;
    /// Copies a sparse plan in.
    fn upload_plan(&self, plan: &Arc<SparsePlan>) -> Result<Self::Plan, BackendError>;

    /// Embedding gather with pooling: for each example (or example and
    /// field), the sum of `value * rows[row]` over its occurrences.
    /// `rows` is `[plan.unique, dim]`.
    fn gather_pool(
        &self,
        rows: &Self::Tensor,
        plan: &Self::Plan,
        pooling: Pooling,
    ) -> Result<Self::Tensor, BackendError>;
    /// The gradient of [`Backend::gather_pool`] with respect to `rows`:
    /// `[plan.unique, dim]`, summed per distinct row in a fixed order.
    fn scatter_pool(
        &self,
        grad: &Self::Tensor,
        plan: &Self::Plan,
        pooling: Pooling,
    ) -> Result<Self::Tensor, BackendError>;
    /// Factorization-machine interaction per example,
    /// `sum_d 0.5 [(sum_i x_i v_id)^2 - sum_i x_i^2 v_id^2]`, as `[examples, 1]`,
    /// and the per-example sums `sum_i x_i v_i` (`[examples, dim]`) its backward needs.
    fn fm_forward(
        &self,
        rows: &Self::Tensor,
        plan: &Self::Plan,
    ) -> Result<(Self::Tensor, Self::Tensor), BackendError>;
    /// The FM interaction per factor dimension, before the sum over `d`
    /// that [`Backend::fm_forward`] takes: `[examples, dim]` (each
    /// dimension's `sum_{i<j} x_i x_j v_id v_jd`), and the sums.
    fn fm_pairs(
        &self,
        rows: &Self::Tensor,
        plan: &Self::Plan,
    ) -> Result<(Self::Tensor, Self::Tensor), BackendError>;
    /// Gradient of the FM interaction with respect to `rows`, given the
    /// sums from the forward pass and the upstream gradient: `[examples,
    /// 1]` for [`Backend::fm_forward`]'s sum, `[examples, dim]` for
    /// [`Backend::fm_pairs`].
    fn fm_backward(
        &self,
        grad: &Self::Tensor,
        sums: &Self::Tensor,
        rows: &Self::Tensor,
        plan: &Self::Plan,
    ) -> Result<Self::Tensor, BackendError>;

    /// `op(a) @ op(b)`, where `op` transposes when asked.
    fn matmul(
        &self,
        a: &Self::Tensor,
        b: &Self::Tensor,
        transpose_a: bool,
        transpose_b: bool,
    ) -> Result<Self::Tensor, BackendError>;
    /// Row-wise softmax of a `[rows, cols]` tensor.
    fn softmax_rows(&self, x: &Self::Tensor) -> Result<Self::Tensor, BackendError>;
    /// Backward of [`Backend::softmax_rows`] from its output `y`:
    /// `dx = y * (dy - sum_c dy * y)` per row.
    fn softmax_rows_backward(
        &self,
        grad: &Self::Tensor,
        y: &Self::Tensor,
    ) -> Result<Self::Tensor, BackendError>;
    /// The tensors (same column count) one below the other.
    fn stack_rows(&self, parts: &[&Self::Tensor]) -> Result<Self::Tensor, BackendError>;
    /// Rows `start..start + count` as a new tensor.
    fn slice_rows(
        &self,
        t: &Self::Tensor,
        start: usize,
        count: usize,
    ) -> Result<Self::Tensor, BackendError>;
    /// Mixture of experts: `stacked` is `E` experts' `[n, cols]` outputs one
    /// below the other, `gates` is `[n, E]`; returns
    /// `out[b] = sum_e gates[b, e] * expert_e[b]`.
    fn mix(
        &self,
        stacked: &Self::Tensor,
        gates: &Self::Tensor,
    ) -> Result<Self::Tensor, BackendError>;
    /// Backward of [`Backend::mix`]: `(d stacked, d gates)`.
    fn mix_backward(
        &self,
        grad: &Self::Tensor,
        stacked: &Self::Tensor,
        gates: &Self::Tensor,
    ) -> Result<(Self::Tensor, Self::Tensor), BackendError>;
    /// A copy of `t`.
    fn copy(&self, t: &Self::Tensor) -> Result<Self::Tensor, BackendError>;
    /// `alpha * x` elementwise.
    fn scale(&self, x: &Self::Tensor, alpha: f32) -> Result<Self::Tensor, BackendError>;
    /// Elementwise `a + b` (same shapes).
    fn add(&self, a: &Self::Tensor, b: &Self::Tensor) -> Result<Self::Tensor, BackendError>;
    /// Fused `dropout(act(x + bias))` with `bias` of shape `[1, cols]`.
    fn bias_act(
        &self,
        x: &Self::Tensor,
        bias: &Self::Tensor,
        act: Activation,
        dropout: Option<Dropout>,
    ) -> Result<Self::Tensor, BackendError>;
    /// Backward of [`Backend::bias_act`] from its output `y`: returns
    /// `(d x, d bias)`, the latter `[1, cols]`.
    fn bias_act_backward(
        &self,
        grad: &Self::Tensor,
        y: &Self::Tensor,
        act: Activation,
        dropout: Option<Dropout>,
    ) -> Result<(Self::Tensor, Self::Tensor), BackendError>;
    /// Batch normalization `gamma * (x - mean) / sqrt(var + eps) + beta` per
    /// column. `params` is `[4, cols]`: rows gamma, beta, running mean,
    /// running variance. Returns the output, the batch mean and (biased)
    /// variance as `[2, cols]`, and what the backward pass needs.
    #[allow(clippy::type_complexity)]
    fn batch_norm(
        &self,
        x: &Self::Tensor,
        params: &Self::Tensor,
        mode: BatchNormMode,
        eps: f32,
    ) -> Result<(Self::Tensor, Self::Tensor, BatchNormSaved<Self::Tensor>), BackendError>;
    /// Backward of [`Backend::batch_norm`] in batch mode: returns `d x` and
    /// `[2, cols]` holding `d gamma` and `d beta`.
    fn batch_norm_backward(
        &self,
        grad: &Self::Tensor,
        params: &Self::Tensor,
        saved: &BatchNormSaved<Self::Tensor>,
    ) -> Result<(Self::Tensor, Self::Tensor), BackendError>;
    /// Binary cross-entropy with logits, `logits` and `labels` `[n, 1]`:
    /// returns the summed loss and `d (mean loss) / d logits`.
    fn bce_with_logits(
        &self,
        logits: &Self::Tensor,
        labels: &Self::Tensor,
    ) -> Result<(f64, Self::Tensor), BackendError>;
    /// `sigmoid(x)` elementwise.
    fn sigmoid(&self, x: &Self::Tensor) -> Result<Self::Tensor, BackendError>;

    /// Each output pixel's window of an NHWC batch `[n * h * w, c]`,
    /// flattened in (ky, kx, channel) order with zeros in the padding:
    /// `[n * oh * ow, kh * kw * c]` (see [`image::im2col`]).
    fn im2col(&self, x: &Self::Tensor, win: &Window) -> Result<Self::Tensor, BackendError>;
    /// The adjoint of [`Backend::im2col`]: `[n * h * w, c]`.
    fn col2im(&self, cols: &Self::Tensor, win: &Window) -> Result<Self::Tensor, BackendError>;
    /// Max or average pooling of an NHWC batch: `[n * oh * ow, c]`.
    fn pool2d(
        &self,
        x: &Self::Tensor,
        win: &Window,
        kind: PoolKind,
    ) -> Result<Self::Tensor, BackendError>;
    /// The gradient of [`Backend::pool2d`] with respect to `x`.
    fn pool2d_backward(
        &self,
        grad: &Self::Tensor,
        x: &Self::Tensor,
        win: &Window,
        kind: PoolKind,
    ) -> Result<Self::Tensor, BackendError>;
    /// The tensors (same row count) side by side: concatenation along
    /// channels for NHWC images.
    fn concat_cols(&self, parts: &[&Self::Tensor]) -> Result<Self::Tensor, BackendError>;
    /// Columns `start..start + width` as a new tensor.
    fn slice_cols(
        &self,
        t: &Self::Tensor,
        start: usize,
        width: usize,
    ) -> Result<Self::Tensor, BackendError>;
    /// Softmax cross-entropy of `logits` `[n, k]` against class indices
    /// `labels` `[n, 1]`: the summed loss and `d (mean loss) / d logits`.
    /// A label that is not a class index is an error.
    fn softmax_cross_entropy(
        &self,
        logits: &Self::Tensor,
        labels: &Self::Tensor,
    ) -> Result<(f64, Self::Tensor), BackendError>;

    /// Scaled dot-product attention with `heads` heads over sequences of
    /// `positions` tokens: `q`, `k`, `v` are `[positions * n, width]`,
    /// position `p` of sequence `b` in row `p * n + b` (see
    /// [`attention::attention`]). Returns the output (the shape of `q`) and
    /// the attention weights `[n * heads * positions, positions]` that
    /// [`Backend::attention_backward`] needs.
    fn attention(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        positions: usize,
        heads: usize,
    ) -> Result<(Self::Tensor, Self::Tensor), BackendError>;
    /// Backward of [`Backend::attention`]: `(d q, d k, d v)`.
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    fn attention_backward(
        &self,
        grad: &Self::Tensor,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        weights: &Self::Tensor,
        positions: usize,
        heads: usize,
    ) -> Result<(Self::Tensor, Self::Tensor, Self::Tensor), BackendError>;

    /// 2-D convolution of an NHWC batch with `weight` `[kh * kw * c, c_out]`
    /// as `im2col(x) @ weight`: `[n * oh * ow, c_out]`, and the patches
    /// [`Backend::conv2d_backward`] needs.
    fn conv2d(
        &self,
        x: &Self::Tensor,
        weight: &Self::Tensor,
        win: &Window,
    ) -> Result<(Self::Tensor, Self::Tensor), BackendError> {
        let cols = if win.kernel == [1, 1] && win.stride == 1 && win.padding == 0 {
            // A 1x1 convolution's patches are its input.
            win.check_input("conv2d", self.shape(x))?;
            self.copy(x)?
        } else {
            self.im2col(x, win)?
        };
        let y = self.matmul(&cols, weight, false, false)?;
        Ok((y, cols))
    }
    /// Backward of [`Backend::conv2d`] from the patches it returned:
    /// `(d x, d weight)`.
    fn conv2d_backward(
        &self,
        grad: &Self::Tensor,
        cols: &Self::Tensor,
        weight: &Self::Tensor,
        win: &Window,
    ) -> Result<(Self::Tensor, Self::Tensor), BackendError> {
        let dweight = self.matmul(cols, grad, true, false)?;
        let dcols = self.matmul(grad, weight, false, true)?;
        let dx = if win.kernel == [1, 1] && win.stride == 1 && win.padding == 0 {
            dcols
        } else {
            self.col2im(&dcols, win)?
        };
        Ok((dx, dweight))
    }
}

/// A shape error for `op`.
pub(crate) fn shape_error(op: &'static str, detail: String) -> BackendError {
    BackendError::Shape { op, detail }
}

/// The shape of an attention's operands, all of `q`'s shape (both backends).
pub(crate) fn attention_shape(
    op: &'static str,
    shapes: &[[usize; 2]],
    positions: usize,
    heads: usize,
) -> Result<Heads, BackendError> {
    let first = shapes.first().copied().unwrap_or([0, 0]);
    for &other in shapes {
        check_same_shape(op, first, other)?;
    }
    Heads::of(op, first, positions, heads)
}

/// Checks that two `[rows, cols]` shapes are equal (both backends).
pub(crate) fn check_same_shape(
    op: &'static str,
    a: [usize; 2],
    b: [usize; 2],
) -> Result<(), BackendError> {
    if a == b {
        Ok(())
    } else {
        Err(shape_error(op, format!("{a:?} vs {b:?}")))
    }
}

/// Checks that a tensor of `rows` rows holds one row per distinct row of a
/// plan over `unique` (both backends).
pub(crate) fn check_plan_rows(
    op: &'static str,
    rows: usize,
    unique: usize,
) -> Result<(), BackendError> {
    if rows == unique {
        Ok(())
    } else {
        Err(shape_error(
            op,
            format!("{rows} rows for a plan over {unique} distinct rows"),
        ))
    }
}

pub use ps_common::config::Device;
