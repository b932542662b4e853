//! The CPU backend's attention ops: shape checks around the host
//! implementation in [`crate::backend::attention`].

use ndarray::Array2;

use super::{BackendError, CpuBackend, flat, from_rows};
use crate::backend::{Backend, attention, attention_shape, check_same_shape};

impl CpuBackend {
    pub(super) fn attention_op(
        &self,
        [q, k, v]: [&Array2<f32>; 3],
        positions: usize,
        heads: usize,
    ) -> Result<(Array2<f32>, Array2<f32>), BackendError> {
        let s = attention_shape(
            "attention",
            &[self.shape(q), self.shape(k), self.shape(v)],
            positions,
            heads,
        )?;
        let (out, weights) = attention::attention(&flat(q), &flat(k), &flat(v), &s);
        Ok((
            from_rows("attention", out, s.width)?,
            from_rows("attention", weights, positions)?,
        ))
    }

    #[allow(clippy::type_complexity)]
    pub(super) fn attention_backward_op(
        &self,
        [grad, q, k, v, weights]: [&Array2<f32>; 5],
        positions: usize,
        heads: usize,
    ) -> Result<(Array2<f32>, Array2<f32>, Array2<f32>), BackendError> {
        let op = "attention_backward";
        let s = attention_shape(
            op,
            &[
                self.shape(grad),
                self.shape(q),
                self.shape(k),
                self.shape(v),
            ],
            positions,
            heads,
        )?;
        check_same_shape(
            op,
            self.shape(weights),
            [s.weights() / positions, positions],
        )?;
        let (dq, dk, dv) = attention::attention_backward(
            &flat(grad),
            &flat(q),
            &flat(k),
            &flat(v),
            &flat(weights),
            &s,
        );
        Ok((
            from_rows(op, dq, s.width)?,
            from_rows(op, dk, s.width)?,
            from_rows(op, dv, s.width)?,
        ))
    }
}
