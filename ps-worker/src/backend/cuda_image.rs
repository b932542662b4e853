//! The CUDA backend's image ops (`kernels/image.cu`): im2col and its
//! adjoint, pooling, column concatenation and softmax cross-entropy. The
//! [`Backend`] impl in `cuda.rs` calls these.

use cudarc::driver::PushKernelArg;

use super::{
    Backend, BackendError, CudaBackend, CudaTensor, PoolKind, Window, check_same_shape,
    device_error, int, linear, shape_error,
};
use crate::backend::image::class_of;

/// A window's sizes as the kernels take them:
/// `n, h, w, c, kh, kw, stride, pad, oh, ow`.
fn geometry(op: &'static str, win: &Window) -> Result<[i32; 10], BackendError> {
    let sizes = [
        win.images,
        win.height,
        win.width,
        win.channels,
        win.kernel[0],
        win.kernel[1],
        win.stride,
        win.padding,
        win.out_height(),
        win.out_width(),
    ];
    let mut out = [0i32; 10];
    for (o, s) in out.iter_mut().zip(sizes) {
        *o = int(s, op)?;
    }
    Ok(out)
}

fn pool_kind(kind: PoolKind) -> i32 {
    match kind {
        PoolKind::Max => 0,
        PoolKind::Average => 1,
    }
}

impl CudaBackend {
    pub(super) fn im2col_op(
        &self,
        x: &CudaTensor,
        win: &Window,
    ) -> Result<CudaTensor, BackendError> {
        win.check_input("im2col", [x.rows, x.cols])?;
        let g = geometry("im2col", win)?;
        let mut cols = self.uninit(win.out_rows(), win.patch())?;
        if cols.len() == 0 {
            return Ok(cols);
        }
        let mut b = self.stream.launch_builder(&self.k.im2col);
        b.arg(&mut cols.buf).arg(&x.buf);
        for v in &g {
            b.arg(v);
        }
        // SAFETY: the window was checked against x's shape; cols holds
        // out_rows * patch elements, one thread each.
        unsafe { b.launch(linear(win.out_rows() * win.patch())) }.map_err(device_error)?;
        Ok(cols)
    }

    pub(super) fn col2im_op(
        &self,
        cols: &CudaTensor,
        win: &Window,
    ) -> Result<CudaTensor, BackendError> {
        win.check_output("col2im", [cols.rows, cols.cols], win.patch())?;
        let g = geometry("col2im", win)?;
        let mut x = self.uninit(win.in_rows(), win.channels)?;
        if x.len() == 0 {
            return Ok(x);
        }
        let mut b = self.stream.launch_builder(&self.k.col2im);
        b.arg(&mut x.buf).arg(&cols.buf);
        for v in &g {
            b.arg(v);
        }
        // SAFETY: cols is [out_rows, patch]; x has in_rows * channels
        // elements, one thread each.
        unsafe { b.launch(linear(win.in_rows() * win.channels)) }.map_err(device_error)?;
        Ok(x)
    }

    pub(super) fn pool2d_op(
        &self,
        x: &CudaTensor,
        win: &Window,
        kind: PoolKind,
    ) -> Result<CudaTensor, BackendError> {
        win.check_input("pool2d", [x.rows, x.cols])?;
        let g = geometry("pool2d", win)?;
        let mut y = self.uninit(win.out_rows(), win.channels)?;
        if y.len() == 0 {
            return Ok(y);
        }
        let kind = pool_kind(kind);
        let mut b = self.stream.launch_builder(&self.k.pool2d);
        b.arg(&mut y.buf).arg(&x.buf);
        for v in &g {
            b.arg(v);
        }
        b.arg(&kind);
        // SAFETY: x checked against the window; y has out_rows * channels
        // elements, one thread each.
        unsafe { b.launch(linear(win.out_rows() * win.channels)) }.map_err(device_error)?;
        Ok(y)
    }

    pub(super) fn pool2d_backward_op(
        &self,
        grad: &CudaTensor,
        x: &CudaTensor,
        win: &Window,
        kind: PoolKind,
    ) -> Result<CudaTensor, BackendError> {
        win.check_input("pool2d_backward", [x.rows, x.cols])?;
        win.check_output("pool2d_backward", [grad.rows, grad.cols], win.channels)?;
        let g = geometry("pool2d_backward", win)?;
        let mut dx = self.uninit(win.in_rows(), win.channels)?;
        if dx.len() == 0 {
            return Ok(dx);
        }
        let kind = pool_kind(kind);
        let mut b = self.stream.launch_builder(&self.k.pool2d_backward);
        b.arg(&mut dx.buf).arg(&grad.buf).arg(&x.buf);
        for v in &g {
            b.arg(v);
        }
        b.arg(&kind);
        // SAFETY: x and grad checked against the window; dx has in_rows *
        // channels elements, one thread each.
        unsafe { b.launch(linear(win.in_rows() * win.channels)) }.map_err(device_error)?;
        Ok(dx)
    }

    /// Copies `src`'s columns `src_start..+width` into `dst`'s columns
    /// `dst_start..+width`, every row.
    fn copy_cols(
        &self,
        dst: &mut CudaTensor,
        dst_start: usize,
        src: &CudaTensor,
        src_start: usize,
        width: usize,
    ) -> Result<(), BackendError> {
        if src.rows != dst.rows || src_start + width > src.cols || dst_start + width > dst.cols {
            return Err(shape_error(
                "copy_cols",
                format!(
                    "columns {src_start}..+{width} of [{}, {}] into {dst_start}.. of [{}, {}]",
                    src.rows, src.cols, dst.rows, dst.cols
                ),
            ));
        }
        if src.rows * width == 0 {
            return Ok(());
        }
        let (dst_cols, dst_start, src_cols, src_start, w) = (
            int(dst.cols, "copy_cols")?,
            int(dst_start, "copy_cols")?,
            int(src.cols, "copy_cols")?,
            int(src_start, "copy_cols")?,
            int(width, "copy_cols")?,
        );
        let rows = src.rows as i64;
        let mut b = self.stream.launch_builder(&self.k.copy_cols);
        b.arg(&mut dst.buf).arg(&dst_cols).arg(&dst_start);
        b.arg(&src.buf)
            .arg(&src_cols)
            .arg(&src_start)
            .arg(&rows)
            .arg(&w);
        // SAFETY: the column ranges were checked against both shapes.
        unsafe { b.launch(linear(src.rows * width)) }.map_err(device_error)?;
        Ok(())
    }

    pub(super) fn concat_cols_op(&self, parts: &[&CudaTensor]) -> Result<CudaTensor, BackendError> {
        let rows = parts.first().map_or(0, |p| p.rows);
        if let Some(p) = parts.iter().find(|p| p.rows != rows) {
            return Err(shape_error(
                "concat_cols",
                format!("{} rows beside {rows}", p.rows),
            ));
        }
        let width = parts.iter().map(|p| p.cols).sum();
        let mut out = self.uninit(rows, width)?;
        let mut at = 0;
        for part in parts {
            self.copy_cols(&mut out, at, part, 0, part.cols)?;
            at += part.cols;
        }
        Ok(out)
    }

    pub(super) fn slice_cols_op(
        &self,
        t: &CudaTensor,
        start: usize,
        width: usize,
    ) -> Result<CudaTensor, BackendError> {
        let mut out = self.uninit(t.rows, width)?;
        self.copy_cols(&mut out, 0, t, start, width)?;
        Ok(out)
    }

    pub(super) fn softmax_cross_entropy_op(
        &self,
        logits: &CudaTensor,
        labels: &CudaTensor,
    ) -> Result<(f64, CudaTensor), BackendError> {
        check_same_shape(
            "softmax_cross_entropy",
            [labels.rows, labels.cols],
            [logits.rows, 1],
        )?;
        let classes = logits.cols;
        // A wrong label is an error, not an out-of-bounds read: checked
        // here, on the n labels.
        for &y in &self.download(labels)? {
            class_of(y, classes)?;
        }
        let mut grad = self.zeros(logits.rows, classes)?;
        let mut loss = self.zeros(logits.rows, 1)?;
        if logits.rows * classes == 0 {
            return Ok((0.0, grad));
        }
        let (n, k) = (
            int(logits.rows, "softmax_cross_entropy")?,
            int(classes, "softmax_cross_entropy")?,
        );
        let mut b = self.stream.launch_builder(&self.k.softmax_xent);
        b.arg(&mut loss.buf).arg(&mut grad.buf).arg(&logits.buf);
        b.arg(&labels.buf).arg(&n).arg(&k);
        // SAFETY: logits and grad are [n, k], loss and labels [n, 1]; every
        // label is a class index < k.
        unsafe { b.launch(linear(logits.rows)) }.map_err(device_error)?;
        let total = self.download(&loss)?.iter().map(|&l| f64::from(l)).sum();
        Ok((total, grad))
    }
}
