//! The factorization machine's pairwise term: one score per example for a
//! binary model; for a multi-class one, the term per factor dimension
//! weighed per class by the dense `{embeddings}.classes` table (`k x C`),
//! so class `c` scores `sum_{i<j} <v_i, diag(p_c) v_j> x_i x_j`.

use super::{Model, Pulled};
use crate::backend::{Backend, BackendError};

/// How a model uses FM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Fm {
    /// One pairwise score per example (a sigmoid head).
    Summed,
    /// Per class: the index of `{embeddings}.classes` among the dense tables.
    PerClass(usize),
}

/// What the forward pass keeps for the backward pass.
pub(super) struct FmTape<T> {
    /// `sum_i x_i v_i` per example.
    sums: T,
    /// Per class: the index of the class weights among the dense tables,
    /// the per-dimension terms `[n, k]` and the weights `[k, C]`.
    per_class: Option<(usize, T, T)>,
}

impl Model {
    /// The pairwise term of each example, `[n, 1]` or `[n, C]`.
    pub(super) fn fm_forward<B: Backend>(
        &self,
        backend: &B,
        fm: Fm,
        v: &B::Tensor,
        plan: &B::Plan,
        pulled: &Pulled,
    ) -> Result<(B::Tensor, FmTape<B::Tensor>), BackendError> {
        match fm {
            Fm::Summed => {
                let (interaction, sums) = backend.fm_forward(v, plan)?;
                let tape = FmTape {
                    sums,
                    per_class: None,
                };
                Ok((interaction, tape))
            }
            Fm::PerClass(table) => {
                let (pairs, sums) = backend.fm_pairs(v, plan)?;
                let weights = self.upload_dense(backend, pulled, table)?;
                let scores = backend.matmul(&pairs, &weights, false, false)?;
                let tape = FmTape {
                    sums,
                    per_class: Some((table, pairs, weights)),
                };
                Ok((scores, tape))
            }
        }
    }

    /// The gradient of the embeddings' rows from the scores' gradient `dz`;
    /// a multi-class FM also fills its class weights' gradient.
    pub(super) fn fm_backward<B: Backend>(
        backend: &B,
        (dz, tape): (&B::Tensor, &FmTape<B::Tensor>),
        v: &B::Tensor,
        plan: &B::Plan,
        dense_grads: &mut [Vec<f32>],
    ) -> Result<B::Tensor, BackendError> {
        match &tape.per_class {
            Some((table, pairs, weights)) => {
                dense_grads[*table] =
                    backend.download_owned(backend.matmul(pairs, dz, true, false)?)?;
                let dpairs = backend.matmul(dz, weights, false, true)?;
                backend.fm_backward(&dpairs, &tape.sums, v, plan)
            }
            None => backend.fm_backward(dz, &tape.sums, v, plan),
        }
    }
}
