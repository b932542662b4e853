//! The CUDA backend's dense ops (`kernels/dense.cu`): the tiled matmul,
//! the fused bias + activation (+ dropout) with its backward pass, and the
//! element-wise scale and add. The [`Backend`](super::Backend) impl in
//! `cuda.rs` calls these.

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::{
    Activation, BackendError, CudaBackend, CudaTensor, Dropout, device_error, int, linear,
    shape_error,
};

impl CudaBackend {
    pub(super) fn matmul_op(
        &self,
        a: &CudaTensor,
        b: &CudaTensor,
        transpose_a: bool,
        transpose_b: bool,
    ) -> Result<CudaTensor, BackendError> {
        let (m, ka) = if transpose_a {
            (a.cols, a.rows)
        } else {
            (a.rows, a.cols)
        };
        let (kb, n) = if transpose_b {
            (b.cols, b.rows)
        } else {
            (b.rows, b.cols)
        };
        if ka != kb {
            return Err(shape_error("matmul", format!("[{m}, {ka}] @ [{kb}, {n}]")));
        }
        let mut c = self.zeros(m, n)?;
        if c.len() == 0 || ka == 0 {
            return Ok(c);
        }
        let (mi, ni, ki) = (int(m, "matmul")?, int(n, "matmul")?, int(ka, "matmul")?);
        let (ta, tb) = (i32::from(transpose_a), i32::from(transpose_b));
        let mut builder = self.stream.launch_builder(&self.k.matmul);
        builder
            .arg(&mut c.buf)
            .arg(&a.buf)
            .arg(&b.buf)
            .arg(&mi)
            .arg(&ni)
            .arg(&ki)
            .arg(&ta)
            .arg(&tb);
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(16) as u32, m.div_ceil(16) as u32, 1),
            block_dim: (16, 16, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: bounds are checked in the kernel against m, n, k, which match
        // the operands' shapes checked above.
        unsafe { builder.launch(cfg) }.map_err(device_error)?;
        Ok(c)
    }

    pub(super) fn scale_op(&self, x: &CudaTensor, alpha: f32) -> Result<CudaTensor, BackendError> {
        if x.rows * x.cols == 0 {
            return self.zeros(x.rows, x.cols);
        }
        let mut out = self.uninit(x.rows, x.cols)?;
        let n = (x.rows * x.cols) as i64;
        let mut b = self.stream.launch_builder(&self.k.scale);
        b.arg(&mut out.buf).arg(&x.buf).arg(&alpha).arg(&n);
        // SAFETY: two buffers of n elements.
        unsafe { b.launch(linear(out.rows * out.cols)) }.map_err(device_error)?;
        Ok(out)
    }

    pub(super) fn add_op(
        &self,
        a: &CudaTensor,
        b: &CudaTensor,
    ) -> Result<CudaTensor, BackendError> {
        Self::same_shape("add", a, b)?;
        if a.rows * a.cols == 0 {
            return self.zeros(a.rows, a.cols);
        }
        let mut out = self.uninit(a.rows, a.cols)?;
        let n = out.len() as i64;
        let mut builder = self.stream.launch_builder(&self.k.add);
        builder.arg(&mut out.buf).arg(&a.buf).arg(&b.buf).arg(&n);
        // SAFETY: three buffers of n elements.
        unsafe { builder.launch(linear(out.rows * out.cols)) }.map_err(device_error)?;
        Ok(out)
    }

    pub(super) fn bias_act_op(
        &self,
        x: &CudaTensor,
        bias: &CudaTensor,
        act: Activation,
        dropout: Option<Dropout>,
    ) -> Result<CudaTensor, BackendError> {
        if (bias.rows, bias.cols) != (1, x.cols) {
            return Err(shape_error(
                "bias_act",
                format!(
                    "x [{}, {}], bias [{}, {}]",
                    x.rows, x.cols, bias.rows, bias.cols
                ),
            ));
        }
        if x.rows * x.cols == 0 {
            return self.zeros(x.rows, x.cols);
        }
        let mut y = self.uninit(x.rows, x.cols)?;
        let (rows, cols) = (int(x.rows, "bias_act")?, int(x.cols, "bias_act")?);
        let act = i32::from(act == Activation::Relu);
        let (use_dropout, rate, seed) = dropout.map_or((0i32, 0f32, 0u64), |d| (1, d.rate, d.seed));
        let mut b = self.stream.launch_builder(&self.k.bias_act);
        b.arg(&mut y.buf)
            .arg(&x.buf)
            .arg(&bias.buf)
            .arg(&rows)
            .arg(&cols)
            .arg(&act);
        b.arg(&use_dropout).arg(&rate).arg(&seed);
        // SAFETY: x and y hold rows*cols elements, bias cols.
        unsafe { b.launch(linear(y.rows * y.cols)) }.map_err(device_error)?;
        Ok(y)
    }

    pub(super) fn bias_act_backward_op(
        &self,
        grad: &CudaTensor,
        y: &CudaTensor,
        act: Activation,
        dropout: Option<Dropout>,
    ) -> Result<(CudaTensor, CudaTensor), BackendError> {
        Self::same_shape("bias_act_backward", grad, y)?;
        let mut dx = self.zeros(grad.rows, grad.cols)?;
        let mut dbias = self.zeros(1, grad.cols)?;
        if dx.len() == 0 {
            return Ok((dx, dbias));
        }
        let n = dx.len() as i64;
        let act = i32::from(act == Activation::Relu);
        let (use_dropout, rate, seed) = dropout.map_or((0i32, 0f32, 0u64), |d| (1, d.rate, d.seed));
        let mut b = self.stream.launch_builder(&self.k.bias_act_backward);
        b.arg(&mut dx.buf)
            .arg(&grad.buf)
            .arg(&y.buf)
            .arg(&n)
            .arg(&act);
        b.arg(&use_dropout).arg(&rate).arg(&seed);
        // SAFETY: three buffers of n elements.
        unsafe { b.launch(linear(dx.rows * dx.cols)) }.map_err(device_error)?;
        let (rows, cols) = (
            int(grad.rows, "bias_act_backward")?,
            int(grad.cols, "bias_act_backward")?,
        );
        let mut b = self.stream.launch_builder(&self.k.col_sums);
        b.arg(&mut dbias.buf).arg(&dx.buf).arg(&rows).arg(&cols);
        // SAFETY: reads rows*cols, writes cols.
        unsafe { b.launch(linear(grad.cols)) }.map_err(device_error)?;
        Ok((dx, dbias))
    }
}
