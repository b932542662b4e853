//! The CUDA backend's batch norm and binary losses (`kernels/norm_loss.cu`):
//! batch norm forward and backward, BCE with logits and the sigmoid. The
//! [`Backend`] impl in `cuda.rs` calls these.

use cudarc::driver::PushKernelArg;

use super::{
    Backend, BackendError, BatchNormMode, BatchNormSaved, CudaBackend, CudaTensor, device_error,
    int, linear, shape_error,
};

impl CudaBackend {
    pub(super) fn batch_norm_op(
        &self,
        x: &CudaTensor,
        params: &CudaTensor,
        mode: BatchNormMode,
        eps: f32,
    ) -> Result<(CudaTensor, CudaTensor, BatchNormSaved<CudaTensor>), BackendError> {
        if (params.rows, params.cols) != (4, x.cols) {
            return Err(shape_error(
                "batch_norm",
                format!(
                    "x [{}, {}], params [{}, {}]",
                    x.rows, x.cols, params.rows, params.cols
                ),
            ));
        }
        let mut stats = self.zeros(2, x.cols)?;
        let mut inv_std = self.zeros(1, x.cols)?;
        let mut y = self.zeros(x.rows, x.cols)?;
        let mut xhat = self.zeros(x.rows, x.cols)?;
        if x.cols > 0 {
            let (rows, cols) = (int(x.rows, "batch_norm")?, int(x.cols, "batch_norm")?);
            let running = i32::from(mode == BatchNormMode::Running);
            let mut b = self.stream.launch_builder(&self.k.bn_stats);
            b.arg(&mut stats.buf)
                .arg(&mut inv_std.buf)
                .arg(&x.buf)
                .arg(&params.buf);
            b.arg(&rows).arg(&cols).arg(&running).arg(&eps);
            // SAFETY: reads x [rows, cols] and params [4, cols]; writes [2, cols] and [cols].
            unsafe { b.launch(linear(x.cols)) }.map_err(device_error)?;
            if y.len() > 0 {
                let mut b = self.stream.launch_builder(&self.k.bn_apply);
                b.arg(&mut y.buf)
                    .arg(&mut xhat.buf)
                    .arg(&x.buf)
                    .arg(&stats.buf);
                b.arg(&inv_std.buf).arg(&params.buf).arg(&rows).arg(&cols);
                // SAFETY: elementwise over [rows, cols] with per-column operands.
                unsafe { b.launch(linear(y.rows * y.cols)) }.map_err(device_error)?;
            }
        }
        Ok((
            y,
            stats,
            BatchNormSaved {
                normalized: xhat,
                inv_std,
            },
        ))
    }

    pub(super) fn batch_norm_backward_op(
        &self,
        grad: &CudaTensor,
        params: &CudaTensor,
        saved: &BatchNormSaved<CudaTensor>,
    ) -> Result<(CudaTensor, CudaTensor), BackendError> {
        Self::same_shape("batch_norm_backward", grad, &saved.normalized)?;
        let mut dparams = self.zeros(2, grad.cols)?;
        let mut dx = self.zeros(grad.rows, grad.cols)?;
        if grad.cols == 0 {
            return Ok((dx, dparams));
        }
        let (rows, cols) = (
            int(grad.rows, "batch_norm_backward")?,
            int(grad.cols, "batch_norm_backward")?,
        );
        {
            let mut dgamma = dparams.buf.slice_mut(0..grad.cols);
            let mut b = self.stream.launch_builder(&self.k.col_dots);
            b.arg(&mut dgamma)
                .arg(&grad.buf)
                .arg(&saved.normalized.buf)
                .arg(&rows)
                .arg(&cols);
            // SAFETY: reads two [rows, cols] buffers, writes cols.
            unsafe { b.launch(linear(grad.cols)) }.map_err(device_error)?;
        }
        {
            let mut dbeta = dparams.buf.slice_mut(grad.cols..2 * grad.cols);
            let mut b = self.stream.launch_builder(&self.k.col_sums);
            b.arg(&mut dbeta).arg(&grad.buf).arg(&rows).arg(&cols);
            // SAFETY: reads [rows, cols], writes cols.
            unsafe { b.launch(linear(grad.cols)) }.map_err(device_error)?;
        }
        if dx.len() > 0 {
            let mut b = self.stream.launch_builder(&self.k.bn_backward);
            b.arg(&mut dx.buf)
                .arg(&grad.buf)
                .arg(&saved.normalized.buf)
                .arg(&saved.inv_std.buf);
            b.arg(&params.buf).arg(&dparams.buf).arg(&rows).arg(&cols);
            // SAFETY: elementwise over [rows, cols] with per-column operands.
            unsafe { b.launch(linear(dx.rows * dx.cols)) }.map_err(device_error)?;
        }
        Ok((dx, dparams))
    }

    pub(super) fn bce_with_logits_op(
        &self,
        logits: &CudaTensor,
        labels: &CudaTensor,
    ) -> Result<(f64, CudaTensor), BackendError> {
        Self::same_shape("bce_with_logits", logits, labels)?;
        let mut loss = self.zeros(logits.rows, logits.cols)?;
        let mut grad = self.zeros(logits.rows, logits.cols)?;
        if loss.len() == 0 {
            return Ok((0.0, grad));
        }
        let n = int(loss.len(), "bce_with_logits")?;
        let mut b = self.stream.launch_builder(&self.k.bce_with_logits);
        b.arg(&mut loss.buf)
            .arg(&mut grad.buf)
            .arg(&logits.buf)
            .arg(&labels.buf)
            .arg(&n);
        // SAFETY: four buffers of n elements.
        unsafe { b.launch(linear(loss.rows * loss.cols)) }.map_err(device_error)?;
        let total = self.download(&loss)?.iter().map(|&l| f64::from(l)).sum();
        Ok((total, grad))
    }

    pub(super) fn sigmoid_op(&self, x: &CudaTensor) -> Result<CudaTensor, BackendError> {
        if x.rows * x.cols == 0 {
            return self.zeros(x.rows, x.cols);
        }
        let mut out = self.uninit(x.rows, x.cols)?;
        let n = out.len() as i64;
        let mut b = self.stream.launch_builder(&self.k.sigmoid);
        b.arg(&mut out.buf).arg(&x.buf).arg(&n);
        // SAFETY: two buffers of n elements.
        unsafe { b.launch(linear(out.rows * out.cols)) }.map_err(device_error)?;
        Ok(out)
    }
}
