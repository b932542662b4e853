//! The CUDA backend's ops of MMoE's gates (`kernels/dense.cu`): the
//! row-wise softmax and the gated mix of the experts, with their backward
//! passes. The [`Backend`](super::Backend) impl in `cuda.rs` calls these.

use cudarc::driver::PushKernelArg;

use super::{BackendError, CudaBackend, CudaTensor, device_error, int, linear, shape_error};

impl CudaBackend {
    pub(super) fn softmax_rows_op(&self, x: &CudaTensor) -> Result<CudaTensor, BackendError> {
        if x.rows * x.cols == 0 {
            return self.zeros(x.rows, x.cols);
        }
        let mut y = self.uninit(x.rows, x.cols)?;
        let (rows, cols) = (int(x.rows, "softmax_rows")?, int(x.cols, "softmax_rows")?);
        let mut b = self.stream.launch_builder(&self.k.softmax_rows);
        b.arg(&mut y.buf).arg(&x.buf).arg(&rows).arg(&cols);
        // SAFETY: one thread per row of two [rows, cols] buffers.
        unsafe { b.launch(linear(x.rows)) }.map_err(device_error)?;
        Ok(y)
    }

    pub(super) fn softmax_rows_backward_op(
        &self,
        grad: &CudaTensor,
        y: &CudaTensor,
    ) -> Result<CudaTensor, BackendError> {
        Self::same_shape("softmax_rows_backward", grad, y)?;
        if y.rows * y.cols == 0 {
            return self.zeros(y.rows, y.cols);
        }
        let mut dx = self.uninit(y.rows, y.cols)?;
        let (rows, cols) = (int(y.rows, "softmax")?, int(y.cols, "softmax")?);
        let mut b = self.stream.launch_builder(&self.k.softmax_rows_backward);
        b.arg(&mut dx.buf)
            .arg(&grad.buf)
            .arg(&y.buf)
            .arg(&rows)
            .arg(&cols);
        // SAFETY: one thread per row of three [rows, cols] buffers.
        unsafe { b.launch(linear(y.rows)) }.map_err(device_error)?;
        Ok(dx)
    }

    pub(super) fn mix_op(
        &self,
        stacked: &CudaTensor,
        gates: &CudaTensor,
    ) -> Result<CudaTensor, BackendError> {
        let (n, experts) = (gates.rows, gates.cols);
        if stacked.rows != n * experts {
            return Err(shape_error(
                "mix",
                format!(
                    "stacked [{}, {}] for gates [{n}, {experts}]",
                    stacked.rows, stacked.cols
                ),
            ));
        }
        if n * stacked.cols == 0 || experts == 0 {
            return self.zeros(n, stacked.cols);
        }
        let mut out = self.uninit(n, stacked.cols)?;
        let (e, rows, cols) = (
            int(experts, "mix")?,
            int(n, "mix")?,
            int(stacked.cols, "mix")?,
        );
        let mut b = self.stream.launch_builder(&self.k.mix);
        b.arg(&mut out.buf)
            .arg(&stacked.buf)
            .arg(&gates.buf)
            .arg(&e)
            .arg(&rows)
            .arg(&cols);
        // SAFETY: shapes checked above; writes [n, cols].
        unsafe { b.launch(linear(out.rows * out.cols)) }.map_err(device_error)?;
        Ok(out)
    }

    pub(super) fn mix_backward_op(
        &self,
        grad: &CudaTensor,
        stacked: &CudaTensor,
        gates: &CudaTensor,
    ) -> Result<(CudaTensor, CudaTensor), BackendError> {
        let (n, experts) = (gates.rows, gates.cols);
        if stacked.rows != n * experts || (grad.rows, grad.cols) != (n, stacked.cols) {
            return Err(shape_error(
                "mix_backward",
                format!(
                    "grad [{}, {}], stacked [{}, {}], gates [{n}, {experts}]",
                    grad.rows, grad.cols, stacked.rows, stacked.cols
                ),
            ));
        }
        if n * experts * stacked.cols == 0 {
            return Ok((
                self.zeros(stacked.rows, stacked.cols)?,
                self.zeros(n, experts)?,
            ));
        }
        let mut dstacked = self.uninit(stacked.rows, stacked.cols)?;
        let mut dgates = self.uninit(n, experts)?;
        let (e, rows, cols) = (
            int(experts, "mix")?,
            int(n, "mix")?,
            int(stacked.cols, "mix")?,
        );
        let mut b = self.stream.launch_builder(&self.k.mix_backward_experts);
        b.arg(&mut dstacked.buf)
            .arg(&grad.buf)
            .arg(&gates.buf)
            .arg(&e)
            .arg(&rows)
            .arg(&cols);
        // SAFETY: shapes checked above; writes [experts * n, cols].
        unsafe { b.launch(linear(dstacked.rows * dstacked.cols)) }.map_err(device_error)?;
        let mut b = self.stream.launch_builder(&self.k.mix_backward_gates);
        b.arg(&mut dgates.buf)
            .arg(&grad.buf)
            .arg(&stacked.buf)
            .arg(&e)
            .arg(&rows)
            .arg(&cols);
        // SAFETY: shapes checked above; writes [n, experts].
        unsafe { b.launch(linear(dgates.rows * dgates.cols)) }.map_err(device_error)?;
        Ok((dstacked, dgates))
    }
}
