//! How the tasks of a multi-task model share beyond a shared bottom:
//! task embeddings joined to the shared layers' input ([`TaskEmbedding`])
//! and cross-attention among the towers before their output layers
//! ([`CrossAttention`]); forward and backward of each.

use super::{Pulled, TableUse};
use crate::backend::{Activation, Backend, BackendError};

/// Learned task vectors: task `t`'s shared-bottom input is `[x, e_t]`.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct TaskEmbedding {
    /// Index of the `tasks x dim` table among the dense tables.
    pub table: usize,
    /// Values per task vector.
    pub dim: usize,
}

impl TaskEmbedding {
    /// `[x, e_t]` for each of `tasks` tasks (`x` is `[n, width]`).
    pub fn inputs<B: Backend>(
        &self,
        backend: &B,
        x: &B::Tensor,
        tasks: usize,
        pulled: &Pulled,
    ) -> Result<Vec<B::Tensor>, BackendError> {
        let n = backend.shape(x)[0];
        let vectors = &pulled.dense[self.table];
        (0..tasks)
            .map(|t| {
                let e = &vectors[t * self.dim..(t + 1) * self.dim];
                let repeated: Vec<f32> = (0..n).flat_map(|_| e.iter().copied()).collect();
                let e = backend.upload(&repeated, n, self.dim)?;
                backend.concat_cols(&[x, &e])
            })
            .collect()
    }

    /// From each task's `d [x, e_t]`: fills the table's gradient (row `t`
    /// the column sums of `d e_t`) and returns `d x`, summed over tasks.
    pub fn backward<B: Backend>(
        &self,
        backend: &B,
        d_inputs: Vec<B::Tensor>,
        grads: &mut [Vec<f32>],
    ) -> Result<Option<B::Tensor>, BackendError> {
        let mut dx: Option<B::Tensor> = None;
        let mut de = vec![0f32; d_inputs.len() * self.dim];
        for (t, d) in d_inputs.into_iter().enumerate() {
            let width = backend.shape(&d)[1] - self.dim;
            let d_e = backend.download_owned(backend.slice_cols(&d, width, self.dim)?)?;
            for row in d_e.chunks(self.dim) {
                for (g, v) in de[t * self.dim..(t + 1) * self.dim].iter_mut().zip(row) {
                    *g += v;
                }
            }
            let d_x = backend.slice_cols(&d, 0, width)?;
            dx = Some(match dx {
                Some(acc) => backend.add(&acc, &d_x)?,
                None => d_x,
            });
        }
        grads[self.table] = de;
        Ok(dx)
    }
}

/// Cross-attention among the towers: task `t`'s last hidden layer `h_t`
/// becomes a token `h_t E_t + c_t`; an example's tokens attend to one
/// another; task `t`'s output layer reads `[h_t, token_t + attention_t
/// W_o]`, so what one tower learned reaches the others' outputs.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct CrossAttention {
    /// Attention heads.
    pub heads: usize,
    /// Values per token.
    pub dim: usize,
    /// Per task, the index of its encoder's `E_t` among the dense tables
    /// (`c_t` follows).
    pub encoders: Vec<usize>,
    /// The indices of `W_q`, `W_k`, `W_v`, `W_o`.
    pub projections: [usize; 4],
    /// Per task, the index of its output layer (`(width + dim) x classes`).
    pub outs: Vec<usize>,
}

/// The tasks' output-layer results, and what [`CrossAttention::backward`]
/// needs.
pub(super) type Crossed<T> = (Vec<T>, CrossTape<T>);

/// What [`CrossAttention::backward`] needs.
pub(super) struct CrossTape<T> {
    encoders: Vec<T>,
    /// Each task's token.
    tokens: Vec<T>,
    /// The tokens stacked, task-major: `[tasks * n, dim]`.
    stacked: T,
    projections: [T; 4],
    qkv: [T; 3],
    weights: T,
    attended: T,
    /// Each task's `[h_t, u_t]`, and its output layer.
    read: Vec<T>,
    out_ws: Vec<T>,
}

impl CrossAttention {
    /// The output layers' results from the towers' last hidden layers
    /// `inputs`.
    pub fn forward<B: Backend>(
        &self,
        backend: &B,
        inputs: &[&B::Tensor],
        dense: &[TableUse],
        pulled: &Pulled,
    ) -> Result<Crossed<B::Tensor>, BackendError> {
        let upload = |i: usize| {
            let t = &dense[i];
            backend.upload(&pulled.dense[i], t.rows.unwrap_or(1), t.dim)
        };
        let tasks = self.encoders.len();
        let n = inputs.first().map_or(0, |x| backend.shape(x)[0]);
        let mut encoders = Vec::with_capacity(tasks);
        let mut tokens = Vec::with_capacity(tasks);
        for (input, &enc) in inputs.iter().zip(&self.encoders) {
            let e = upload(enc)?;
            let pre = backend.matmul(input, &e, false, false)?;
            tokens.push(backend.bias_act(&pre, &upload(enc + 1)?, Activation::Identity, None)?);
            encoders.push(e);
        }
        let stacked = backend.stack_rows(&tokens.iter().collect::<Vec<_>>())?;
        let [q, k, v, o] = self.projections.map(upload);
        let projections = [q?, k?, v?, o?];
        let project = |w: &B::Tensor| backend.matmul(&stacked, w, false, false);
        let qkv = [
            project(&projections[0])?,
            project(&projections[1])?,
            project(&projections[2])?,
        ];
        let (attended, weights) =
            backend.attention(&qkv[0], &qkv[1], &qkv[2], tasks, self.heads)?;
        let mixed = backend.matmul(&attended, &projections[3], false, false)?;
        let out = backend.add(&stacked, &mixed)?;
        let (mut read, mut out_ws, mut zs) = (Vec::new(), Vec::new(), Vec::new());
        for (t, &o) in self.outs.iter().enumerate() {
            let r = backend.concat_cols(&[inputs[t], &backend.slice_rows(&out, t * n, n)?])?;
            let w = upload(o)?;
            zs.push(backend.matmul(&r, &w, false, false)?);
            read.push(r);
            out_ws.push(w);
        }
        let tape = CrossTape {
            encoders,
            tokens,
            stacked,
            projections,
            qkv,
            weights,
            attended,
            read,
            out_ws,
        };
        Ok((zs, tape))
    }

    /// From the gradients of the output layers' results: fills the output
    /// layers', encoders' and projections' gradients, returns each task's
    /// `d h_t`.
    pub fn backward<B: Backend>(
        &self,
        backend: &B,
        tape: CrossTape<B::Tensor>,
        d_zs: &[B::Tensor],
        inputs: &[&B::Tensor],
        grads: &mut [Vec<f32>],
    ) -> Result<Vec<B::Tensor>, BackendError> {
        let tasks = self.encoders.len();
        let n = inputs.first().map_or(0, |x| backend.shape(x)[0]);
        // Each output layer read [h_t, u_t]: split its input's gradient.
        let mut d_direct = Vec::with_capacity(tasks);
        let mut d_u = Vec::with_capacity(tasks);
        let reads = tape.read.iter().zip(&tape.out_ws).zip(&self.outs);
        for (((read, w), &o), (d_z, input)) in reads.zip(d_zs.iter().zip(inputs)) {
            grads[o] = backend.download_owned(backend.matmul(read, d_z, true, false)?)?;
            let d = backend.matmul(d_z, w, false, true)?;
            let width = backend.shape(input)[1];
            d_direct.push(backend.slice_cols(&d, 0, width)?);
            d_u.push(backend.slice_cols(&d, width, self.dim)?);
        }
        let d_out = backend.stack_rows(&d_u.iter().collect::<Vec<_>>())?;
        let [wq, wk, wv, wo] = &tape.projections;
        let [q, k, v] = &tape.qkv;
        let [iq, ik, iv, io] = self.projections;
        grads[io] =
            backend.download_owned(backend.matmul(&tape.attended, &d_out, true, false)?)?;
        let d_attended = backend.matmul(&d_out, wo, false, true)?;
        let (dq, dk, dv) =
            backend.attention_backward(&d_attended, q, k, v, &tape.weights, tasks, self.heads)?;
        let mut d_stacked = d_out;
        for (i, w, d) in [(iq, wq, &dq), (ik, wk, &dk), (iv, wv, &dv)] {
            grads[i] = backend.download_owned(backend.matmul(&tape.stacked, d, true, false)?)?;
            d_stacked = backend.add(&d_stacked, &backend.matmul(d, w, false, true)?)?;
        }
        let mut d_inputs = Vec::with_capacity(tasks);
        for (t, ((token, e), &enc)) in tape
            .tokens
            .iter()
            .zip(&tape.encoders)
            .zip(&self.encoders)
            .enumerate()
        {
            let d_token = backend.slice_rows(&d_stacked, t * n, n)?;
            let (d_pre, d_bias) =
                backend.bias_act_backward(&d_token, token, Activation::Identity, None)?;
            grads[enc + 1] = backend.download_owned(d_bias)?;
            grads[enc] = backend.download_owned(backend.matmul(inputs[t], &d_pre, true, false)?)?;
            let d_input = backend.matmul(&d_pre, e, false, true)?;
            d_inputs.push(backend.add(&d_input, &d_direct[t])?);
        }
        Ok(d_inputs)
    }
}
