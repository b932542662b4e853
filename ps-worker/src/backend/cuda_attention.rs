//! The CUDA backend's attention ops (`kernels/attention.cu`); the
//! [`Backend`](super::Backend) impl in `cuda.rs` calls these.

use cudarc::driver::PushKernelArg;

use super::{BackendError, CudaBackend, CudaTensor, device_error, int, linear};
use crate::backend::{Heads, attention_shape, check_same_shape};

/// `n, positions, heads, width` as the kernels take them.
fn sizes(op: &'static str, s: &Heads) -> Result<[i32; 4], BackendError> {
    Ok([
        int(s.sequences, op)?,
        int(s.positions, op)?,
        int(s.heads, op)?,
        int(s.width, op)?,
    ])
}

impl CudaBackend {
    pub(super) fn attention_op(
        &self,
        [q, k, v]: [&CudaTensor; 3],
        positions: usize,
        heads: usize,
    ) -> Result<(CudaTensor, CudaTensor), BackendError> {
        let shapes = [[q.rows, q.cols], [k.rows, k.cols], [v.rows, v.cols]];
        let s = attention_shape("attention", &shapes, positions, heads)?;
        let mut out = self.zeros(q.rows, q.cols)?;
        let mut weights = self.zeros(s.weights() / positions, positions)?;
        let threads = s.sequences * s.heads * s.positions;
        if threads == 0 || s.width == 0 {
            return Ok((out, weights));
        }
        let [n, l, h, w] = sizes("attention", &s)?;
        let scale = s.scale();
        let mut b = self.stream.launch_builder(&self.k.attention_forward);
        b.arg(&mut out.buf).arg(&mut weights.buf);
        b.arg(&q.buf).arg(&k.buf).arg(&v.buf);
        b.arg(&n).arg(&l).arg(&h).arg(&w).arg(&scale);
        // SAFETY: q, k, v and out are [l * n, w], weights [n * h * l, l];
        // one thread per (sequence, head, query).
        unsafe { b.launch(linear(threads)) }.map_err(device_error)?;
        Ok((out, weights))
    }

    pub(super) fn attention_backward_op(
        &self,
        [grad, q, k, v, weights]: [&CudaTensor; 5],
        positions: usize,
        heads: usize,
    ) -> Result<(CudaTensor, CudaTensor, CudaTensor), BackendError> {
        let op = "attention_backward";
        let shapes = [
            [grad.rows, grad.cols],
            [q.rows, q.cols],
            [k.rows, k.cols],
            [v.rows, v.cols],
        ];
        let s = attention_shape(op, &shapes, positions, heads)?;
        check_same_shape(
            op,
            [weights.rows, weights.cols],
            [s.weights() / positions, positions],
        )?;
        let (mut dq, mut dk, mut dv) = (
            self.zeros(q.rows, q.cols)?,
            self.zeros(q.rows, q.cols)?,
            self.zeros(q.rows, q.cols)?,
        );
        let threads = s.sequences * s.heads * s.positions;
        if threads == 0 || s.width == 0 {
            return Ok((dq, dk, dv));
        }
        let mut ds = self.zeros(s.weights() / positions, positions)?;
        let [n, l, h, w] = sizes(op, &s)?;
        let scale = s.scale();
        let mut b = self
            .stream
            .launch_builder(&self.k.attention_backward_queries);
        b.arg(&mut dq.buf).arg(&mut ds.buf);
        b.arg(&grad.buf).arg(&k.buf).arg(&v.buf).arg(&weights.buf);
        b.arg(&n).arg(&l).arg(&h).arg(&w).arg(&scale);
        // SAFETY: shapes checked above; ds is laid out as the weights.
        unsafe { b.launch(linear(threads)) }.map_err(device_error)?;
        let mut b = self.stream.launch_builder(&self.k.attention_backward_keys);
        b.arg(&mut dk.buf).arg(&mut dv.buf);
        b.arg(&grad.buf).arg(&q.buf).arg(&ds.buf).arg(&weights.buf);
        b.arg(&n).arg(&l).arg(&h).arg(&w).arg(&scale);
        // SAFETY: as above; one thread per (sequence, head, key).
        unsafe { b.launch(linear(threads)) }.map_err(device_error)?;
        Ok((dq, dk, dv))
    }
}
