//! Batch normalization of a layer (an MLP's or a convolution's) with its
//! server-side tables: `bn` holds gamma - 1 and `bn_stats` the running
//! mean and variance - 1, moved by a push through SGD with lr 1, so that
//! any stateless worker evaluates with them.

use super::{BN_EPS, Layer, Mode, Pulled};
use crate::backend::{Backend, BackendError, BatchNormMode, BatchNormSaved};

/// What a layer's batch norm keeps for its backward pass: the parameters
/// `[4, width]`, the batch statistics `[2, width]`, and the op's own.
pub(super) type Norm<T> = (T, T, BatchNormSaved<T>);

/// Batch norm of a layer's `x W` with the layer's tables: the batch's
/// statistics in training, the running ones in evaluation.
pub(super) fn norm_forward<B: Backend>(
    backend: &B,
    pre: B::Tensor,
    pulled: &Pulled,
    layer: &Layer,
    mode: Mode,
) -> Result<(B::Tensor, Norm<B::Tensor>), BackendError> {
    let params = backend.upload(&bn_params(pulled, layer), 4, layer.output)?;
    let bn_mode = match mode {
        Mode::Train { .. } => BatchNormMode::Batch,
        Mode::Eval => BatchNormMode::Running,
    };
    let (y, stats, saved) = backend.batch_norm(&pre, &params, bn_mode, BN_EPS)?;
    Ok((y, (params, stats, saved)))
}

/// Backward of [`norm_forward`]: fills the layer's `bn` gradient and its
/// `bn_stats` push, returns `d (x W)`.
pub(super) fn norm_backward<B: Backend>(
    backend: &B,
    grad: B::Tensor,
    (params, stats, saved): &Norm<B::Tensor>,
    pulled: &Pulled,
    layer: &Layer,
    momentum: f32,
    grads: &mut [Vec<f32>],
) -> Result<B::Tensor, BackendError> {
    let (dx, dparams) = backend.batch_norm_backward(&grad, params, saved)?;
    grads[layer.dense + 2] = backend.download(&dparams)?[..layer.output].to_vec();
    grads[layer.dense + 3] = running_stats_push(pulled, layer, &backend.download(stats)?, momentum);
    Ok(dx)
}

/// `[gamma, beta = 0, running mean, running var]` of a layer from its tables
/// (which store gamma - 1 and var - 1 so that zeros are the identity).
fn bn_params(pulled: &Pulled, layer: &Layer) -> Vec<f32> {
    let (bn, stats) = (
        &pulled.dense[layer.dense + 2],
        &pulled.dense[layer.dense + 3],
    );
    let w = layer.output;
    let mut params = Vec::with_capacity(4 * w);
    params.extend(bn[..w].iter().map(|g| 1.0 + g));
    params.extend(std::iter::repeat_n(0.0, w));
    params.extend_from_slice(&stats[..w]);
    params.extend(stats[w..2 * w].iter().map(|v| 1.0 + v));
    params
}

/// The push that moves the running statistics toward the batch's: through
/// SGD with lr 1, `stored - (1 - m) (stored - batch)` is the moving average.
fn running_stats_push(pulled: &Pulled, layer: &Layer, batch: &[f32], momentum: f32) -> Vec<f32> {
    let stored = &pulled.dense[layer.dense + 3];
    let w = layer.output;
    (0..2 * w)
        .map(|i| {
            let target = if i < w { batch[i] } else { batch[i] - 1.0 };
            (1.0 - momentum) * (stored[i] - target)
        })
        .collect()
}
