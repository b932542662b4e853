//! A model's forward and backward passes on a compute [`Backend`]: the
//! linear part, FM, the MLP tower (with batch norm, dropout, residuals)
//! and the task heads.

use ps_common::routing::mix64;

use super::norm::{Norm, norm_backward, norm_forward};
use super::{Gradients, Mlp, Mode, Model, Output, Pulled};
use crate::backend::{Activation, Backend, BackendError, Dropout, Pooling};

impl Model {
    /// Forward pass, and in training the backward pass, on `backend`.
    pub fn compute<B: Backend>(
        &self,
        backend: &B,
        pulled: &Pulled,
        mode: Mode,
    ) -> Result<Output, BackendError> {
        if let Some(conv) = &self.conv {
            return conv.compute(backend, &self.dense, pulled, mode);
        }
        let plan_host = &pulled.plan;
        let (n, unique, tasks) = (plan_host.examples, plan_host.unique, self.heads.len());
        let plan = backend.upload_plan(plan_host)?;
        let w = match self.linear {
            Some(i) => Some(backend.upload(&pulled.sparse[i], unique, self.sparse[i].dim)?),
            None => None,
        };
        let v = match self.embeddings {
            Some(i) => Some(backend.upload(&pulled.sparse[i], unique, self.sparse[i].dim)?),
            None => None,
        };
        // Head 0's wide part: linear and FM terms.
        let mut wide = match &w {
            Some(w) => Some(backend.gather_pool(w, &plan, Pooling::Example)?),
            None => None,
        };
        let mut fm_tape = None;
        if let (Some(fm), Some(v)) = (self.fm, &v) {
            let (interaction, tape) = self.fm_forward(backend, fm, v, &plan, pulled)?;
            wide = Some(match wide {
                Some(z) => backend.add(&z, &interaction)?,
                None => interaction,
            });
            fm_tape = Some(tape);
        }
        // The deep input: per-field pooled embeddings, through the shared bottom.
        let deep = self.heads.iter().any(|h| h.tower.is_some())
            || self.shared.is_some()
            || !self.experts.is_empty();
        let x = match (&v, deep) {
            (Some(v), true) => {
                let pooled = backend.gather_pool(v, &plan, Pooling::Field)?;
                let pooled = backend.reshape(pooled, n, self.fields * self.embedding_dim())?;
                Some(self.beside_dense_inputs(backend, pooled, pulled)?)
            }
            _ => None,
        };
        // With task embeddings the shared bottom runs once per task, on
        // [x, e_t]; without, once.
        let task_x = match (&self.task_embedding, &x) {
            (Some(te), Some(x)) => Some(te.inputs(backend, x, tasks, pulled)?),
            _ => None,
        };
        let mut shared = Vec::new();
        if let (Some(mlp), Some(x)) = (&self.shared, &x) {
            for input in task_x.as_ref().map_or(vec![x], |xs| xs.iter().collect()) {
                shared.push(self.mlp_forward(backend, mlp, input, pulled, mode)?);
            }
        }
        // Task t's representation before any gate: its shared output, the
        // one shared output, or x.
        let h = |t: usize| {
            shared
                .get(t)
                .or(shared.first())
                .map(|(out, _)| out)
                .or(x.as_ref())
        };
        // MMoE: every expert over x, then per task a softmax gate mixes them.
        let mut expert_tapes = Vec::with_capacity(self.experts.len());
        let mut stacked = None;
        let mut gating = Vec::with_capacity(self.heads.len());
        if let (false, Some(x)) = (self.experts.is_empty(), &x) {
            let mut outs = Vec::with_capacity(self.experts.len());
            for expert in &self.experts {
                let (out, tape) = self.mlp_forward(backend, expert, x, pulled, mode)?;
                outs.push(out);
                expert_tapes.push(tape);
            }
            let all = backend.stack_rows(&outs.iter().collect::<Vec<_>>())?;
            for head in &self.heads {
                gating.push(match head.gate {
                    Some(g) => {
                        let w_gate = self.upload_dense(backend, pulled, g)?;
                        let gates =
                            backend.softmax_rows(&backend.matmul(x, &w_gate, false, false)?)?;
                        let mixed = backend.mix(&all, &gates)?;
                        Some((w_gate, gates, mixed))
                    }
                    None => None,
                });
            }
            stacked = Some(all);
        }
        let mut loss_sum = 0f64;
        // Probabilities are for evaluation; training needs only the loss and
        // its gradient (no sigmoid kernel and no copy back per step).
        let outputs = self.outputs();
        let mut probs = match mode {
            Mode::Eval => vec![0f32; n * outputs],
            Mode::Train { .. } => Vec::new(),
        };
        // Where each head's probabilities start within an example's.
        let mut first_output = 0;
        // Each task's representation: MMoE's mix, or h.
        let reps: Vec<Option<&B::Tensor>> = (0..tasks)
            .map(|t| {
                gating
                    .get(t)
                    .and_then(|g| g.as_ref())
                    .map(|(_, _, mixed)| mixed)
                    .or(h(t))
            })
            .collect();
        // Each task's tower over its representation.
        let mut tower_outs = Vec::with_capacity(tasks);
        let mut tower_tapes = Vec::with_capacity(tasks);
        for (head, rep) in self.heads.iter().zip(&reps) {
            let (out, tape) = match (&head.tower, rep) {
                (Some(mlp), Some(input)) => {
                    let (out, tape) = self.mlp_forward(backend, mlp, input, pulled, mode)?;
                    (Some(out), Some(tape))
                }
                _ => (None, None),
            };
            tower_outs.push(out);
            tower_tapes.push(tape);
        }
        // Cross-attention: the towers' last hidden layers attend to one
        // another, then each task's output layer; its tape keeps the
        // hidden layers for the backward pass.
        let (zs, crossed) = match (
            &self.cross,
            tower_outs
                .iter()
                .map(Option::as_ref)
                .collect::<Option<Vec<_>>>(),
        ) {
            (Some(cross), Some(hidden)) => {
                let (zs, tape) = cross.forward(backend, &hidden, &self.dense, pulled)?;
                (zs.into_iter().map(Some).collect(), Some((tower_outs, tape)))
            }
            _ => (tower_outs, None),
        };
        let mut heads = Vec::with_capacity(tasks);
        for ((t, head), mut z) in self.heads.iter().enumerate().zip(zs) {
            if t == 0 {
                z = match (z, wide.take()) {
                    (Some(a), Some(b)) => Some(backend.add(&a, &b)?),
                    (a, b) => a.or(b),
                };
            }
            let z = match z {
                Some(z) => z,
                None => backend.upload(&vec![0.0; n * head.classes], n, head.classes)?,
            };
            let bias = self.upload_dense(backend, pulled, head.bias)?;
            let logits = backend.bias_act(&z, &bias, Activation::Identity, None)?;
            let labels: Vec<f32> = (0..n).map(|b| pulled.labels[b * tasks + t]).collect();
            let (loss, dlogits) = head_loss(backend, &logits, &labels)?;
            loss_sum += f64::from(head.weight) * loss;
            if mode == Mode::Eval {
                let classes = head.classes;
                for (b, p) in head_probs(backend, &logits)?.chunks(classes).enumerate() {
                    let at = b * outputs + first_output;
                    probs[at..at + classes].copy_from_slice(p);
                    if classes == 1 {
                        probs[at] = self.corrected(p[0]);
                    }
                }
            }
            first_output += head.classes;
            heads.push((logits, dlogits));
        }
        let Mode::Train { .. } = mode else {
            return Ok(Output {
                loss_sum,
                probs,
                grads: None,
            });
        };

        let mut dense_grads: Vec<Vec<f32>> = self.dense.iter().map(|_| Vec::new()).collect();
        let mut sparse_grads: Vec<Vec<f32>> = self.sparse.iter().map(|_| Vec::new()).collect();
        let mut dh: Option<B::Tensor> = None;
        let mut dv: Option<B::Tensor> = None;
        // MMoE: gradients of the stacked expert outputs, and of x via the gates.
        let mut dstacked: Option<B::Tensor> = None;
        let mut dx_gates: Option<B::Tensor> = None;
        let sum = |acc: Option<B::Tensor>, d: B::Tensor| -> Result<B::Tensor, BackendError> {
            match acc {
                Some(acc) => backend.add(&acc, &d),
                None => Ok(d),
            }
        };
        // The gradient of each tower's result.
        let mut d_zs: Vec<B::Tensor> = Vec::with_capacity(tasks);
        for (t, (head, (logits, dlogits))) in self.heads.iter().zip(heads).enumerate() {
            let dlogits = if head.weight == 1.0 {
                dlogits
            } else {
                backend.scale(&dlogits, head.weight)?
            };
            let (dz, dbias) =
                backend.bias_act_backward(&dlogits, &logits, Activation::Identity, None)?;
            dense_grads[head.bias] = backend.download_owned(dbias)?;
            if t == 0 {
                if let Some(i) = self.linear {
                    let dw = backend.scatter_pool(&dz, &plan, Pooling::Example)?;
                    sparse_grads[i] = backend.download_owned(dw)?;
                }
                if let (Some(tape), Some(v)) = (&fm_tape, &v) {
                    dv = Some(Self::fm_backward(
                        backend,
                        (&dz, tape),
                        v,
                        &plan,
                        &mut dense_grads,
                    )?);
                }
            }
            d_zs.push(dz);
        }
        // Cross-attention: back to each tower's last hidden layer.
        let d_outs = match (&self.cross, crossed) {
            (Some(cross), Some((hidden, tape))) => {
                let hidden: Vec<&B::Tensor> = hidden.iter().flatten().collect();
                cross.backward(backend, tape, &d_zs, &hidden, &mut dense_grads)?
            }
            _ => d_zs,
        };
        // Through each tower, back to each task's representation.
        let mut d_reps: Vec<Option<B::Tensor>> = Vec::with_capacity(tasks);
        for (((head, tape), rep), d) in self.heads.iter().zip(tower_tapes).zip(&reps).zip(d_outs) {
            d_reps.push(match (&head.tower, tape, rep) {
                (Some(mlp), Some(tape), Some(input)) => Some(self.mlp_backward(
                    backend,
                    mlp,
                    tape,
                    d,
                    input,
                    pulled,
                    &mut dense_grads,
                )?),
                _ => None,
            });
        }
        // With task embeddings, each task's gradient of its shared output.
        let mut d_shared: Vec<Option<B::Tensor>> = Vec::with_capacity(tasks);
        for (t, (head, d)) in self.heads.iter().zip(d_reps).enumerate() {
            let gate = gating.get(t).and_then(|g| g.as_ref());
            if let Some(d) = d {
                match (gate, &stacked, &x, head.gate) {
                    (Some((w_gate, gates, _)), Some(all), Some(x), Some(g)) => {
                        let (ds, dgates) = backend.mix_backward(&d, all, gates)?;
                        dstacked = Some(sum(dstacked, ds)?);
                        let dlogits = backend.softmax_rows_backward(&dgates, gates)?;
                        dense_grads[g] =
                            backend.download_owned(backend.matmul(x, &dlogits, true, false)?)?;
                        let dx = backend.matmul(&dlogits, w_gate, false, true)?;
                        dx_gates = Some(sum(dx_gates, dx)?);
                    }
                    _ if task_x.is_some() => d_shared.push(Some(d)),
                    _ => dh = Some(sum(dh, d)?),
                }
            } else if task_x.is_some() {
                d_shared.push(None);
            }
        }
        if let (Some(ds), Some(x)) = (dstacked, &x) {
            for (e, (expert, tape)) in self.experts.iter().zip(expert_tapes).enumerate() {
                let dout = backend.slice_rows(&ds, e * n, n)?;
                let d =
                    self.mlp_backward(backend, expert, tape, dout, x, pulled, &mut dense_grads)?;
                dh = Some(sum(dh, d)?);
            }
        }
        if let Some(d) = dx_gates {
            dh = Some(sum(dh, d)?);
        }
        let dx = match (&self.shared, &x, task_x, &self.task_embedding) {
            (Some(mlp), Some(_), Some(xs), Some(te)) => {
                // One shared bottom ran once per task: its gradients add
                // up, its running-statistics pushes are averaged.
                let mut d_task_x = Vec::with_capacity(tasks);
                for (((_, tape), input), d) in shared.into_iter().zip(&xs).zip(d_shared) {
                    let d = d.ok_or_else(|| {
                        crate::backend::shape_error("task embedding", "a task has no tower".into())
                    })?;
                    let mut own: Vec<Vec<f32>> = self.dense.iter().map(|_| Vec::new()).collect();
                    d_task_x
                        .push(self.mlp_backward(backend, mlp, tape, d, input, pulled, &mut own)?);
                    for ((acc, g), table) in dense_grads.iter_mut().zip(own).zip(&self.dense) {
                        let share = if table.statistic {
                            1.0 / tasks as f32
                        } else {
                            1.0
                        };
                        if acc.is_empty() {
                            *acc = g.iter().map(|v| v * share).collect();
                        } else {
                            acc.iter_mut().zip(&g).for_each(|(a, v)| *a += v * share);
                        }
                    }
                }
                te.backward(backend, d_task_x, &mut dense_grads)?
            }
            (Some(mlp), Some(x), _, _) => match (shared.pop(), dh) {
                (Some((_, tape)), Some(dh)) => {
                    Some(self.mlp_backward(backend, mlp, tape, dh, x, pulled, &mut dense_grads)?)
                }
                (_, dh) => dh,
            },
            _ => dh,
        };
        if let Some(dx) = dx {
            let dx = self.without_dense_inputs(backend, dx, n)?;
            let de = backend.reshape(dx, n * self.fields, self.embedding_dim())?;
            let from_deep = backend.scatter_pool(&de, &plan, Pooling::Field)?;
            dv = Some(match dv {
                Some(fm) => backend.add(&fm, &from_deep)?,
                None => from_deep,
            });
        }
        if let (Some(dv), Some(i)) = (dv, self.embeddings) {
            sparse_grads[i] = backend.download_owned(dv)?;
        }
        Ok(Output {
            loss_sum,
            probs,
            grads: Some(Gradients {
                sparse: sparse_grads,
                dense: dense_grads,
            }),
        })
    }

    /// The MLP over `input`: the output layer's `[n, 1]` when it has one,
    /// else the last hidden activation; and what its backward pass needs.
    fn mlp_forward<B: Backend>(
        &self,
        backend: &B,
        mlp: &Mlp,
        input: &B::Tensor,
        pulled: &Pulled,
        mode: Mode,
    ) -> Result<(B::Tensor, Tape<B::Tensor>), BackendError> {
        let mut h: Option<B::Tensor> = None;
        let mut steps = Vec::with_capacity(mlp.layers.len());
        for (i, layer) in mlp.layers.iter().enumerate() {
            let current = h.as_ref().unwrap_or(input);
            let weight = self.upload_dense(backend, pulled, layer.dense)?;
            let bias = self.upload_dense(backend, pulled, layer.dense + 1)?;
            let pre = backend.matmul(current, &weight, false, false)?;
            let (pre, norm) = if mlp.batch_norm {
                let (y, norm) = norm_forward(backend, pre, pulled, layer, mode)?;
                (y, Some(norm))
            } else {
                (pre, None)
            };
            let dropout = match mode {
                Mode::Train { seed } if mlp.dropout > 0.0 => Some(Dropout {
                    rate: mlp.dropout,
                    seed: mix64(seed ^ mlp.salt ^ (i as u64 + 1)),
                }),
                _ => None,
            };
            let act = backend.bias_act(&pre, &bias, Activation::Relu, dropout)?;
            let residual = mlp.residual && layer.input == layer.output;
            let (next, act) = if residual {
                (backend.add(current, &act)?, Some(act))
            } else {
                (act, None)
            };
            steps.push(Step {
                input: h.replace(next),
                weight,
                act,
                dropout,
                norm,
            });
        }
        let (out, out_w) = match mlp.out {
            Some(o) => {
                let out_w = self.upload_dense(backend, pulled, o)?;
                let out = backend.matmul(h.as_ref().unwrap_or(input), &out_w, false, false)?;
                (Some(out), Some(out_w))
            }
            None => (None, None),
        };
        let (out, last) = match (out, h) {
            (Some(out), last) => (out, last),
            (None, Some(last)) => {
                // No output layer: the last activation is the result; the
                // backward pass keeps its own copy.
                let copy = backend.copy(&last)?;
                (last, Some(copy))
            }
            (None, None) => {
                return Err(crate::backend::shape_error(
                    "mlp",
                    "an MLP with neither hidden layers nor an output layer".into(),
                ));
            }
        };
        Ok((out, Tape { steps, last, out_w }))
    }

    /// Backward of [`Model::mlp_forward`] given `dout` and the same `input`:
    /// fills the MLP's dense gradients, returns `d input`.
    #[allow(clippy::too_many_arguments)]
    fn mlp_backward<B: Backend>(
        &self,
        backend: &B,
        mlp: &Mlp,
        tape: Tape<B::Tensor>,
        dout: B::Tensor,
        input: &B::Tensor,
        pulled: &Pulled,
        grads: &mut [Vec<f32>],
    ) -> Result<B::Tensor, BackendError> {
        let mut dh = match (mlp.out, &tape.out_w) {
            (Some(o), Some(out_w)) => {
                let last = tape.last.as_ref().unwrap_or(input);
                grads[o] = backend.download_owned(backend.matmul(last, &dout, true, false)?)?;
                backend.matmul(&dout, out_w, false, true)?
            }
            _ => dout,
        };
        // The output of layer i is the input of layer i + 1 (or `last`).
        let mut output = tape.last;
        for (layer, step) in mlp.layers.iter().zip(tape.steps).rev() {
            let act = match (&step.act, &output) {
                (Some(act), _) | (None, Some(act)) => act,
                (None, None) => {
                    return Err(crate::backend::shape_error(
                        "mlp",
                        "missing activation".into(),
                    ));
                }
            };
            let (dpre, dbias) =
                backend.bias_act_backward(&dh, act, Activation::Relu, step.dropout)?;
            grads[layer.dense + 1] = backend.download_owned(dbias)?;
            let dlin = match &step.norm {
                Some(norm) => {
                    norm_backward(backend, dpre, norm, pulled, layer, mlp.momentum, grads)?
                }
                None => dpre,
            };
            let layer_input = step.input.as_ref().unwrap_or(input);
            grads[layer.dense] =
                backend.download_owned(backend.matmul(layer_input, &dlin, true, false)?)?;
            let dinput = backend.matmul(&dlin, &step.weight, false, true)?;
            dh = if step.act.is_some() {
                backend.add(&dinput, &dh)?
            } else {
                dinput
            };
            output = step.input;
        }
        Ok(dh)
    }

    /// The MLP's input: each example's pooled embeddings, then its dense
    /// inputs (`data.numeric.dense`). Joined on the host (the backends
    /// have no column concatenation): one download and upload a step.
    fn beside_dense_inputs<B: Backend>(
        &self,
        backend: &B,
        pooled: B::Tensor,
        pulled: &Pulled,
    ) -> Result<B::Tensor, BackendError> {
        let (n, d) = (pulled.plan.examples, self.dense_inputs);
        if d == 0 {
            return Ok(pooled);
        }
        if pulled.inputs.len() != n * d {
            return Err(crate::backend::shape_error(
                "dense inputs",
                format!(
                    "the model takes {d} numeric inputs per example, the batch has {} for {n} examples",
                    pulled.inputs.len()
                ),
            ));
        }
        let width = self.fields * self.embedding_dim();
        let pooled = backend.download(&pooled)?;
        let mut joined = Vec::with_capacity(n * (width + d));
        for (row, inputs) in pooled.chunks(width.max(1)).zip(pulled.inputs.chunks(d)) {
            joined.extend_from_slice(&row[..width]);
            joined.extend_from_slice(inputs);
        }
        backend.upload(&joined, n, width + d)
    }

    /// The gradient of the pooled embeddings from that of the MLP's input
    /// (the dense inputs' part is dropped: they are data).
    fn without_dense_inputs<B: Backend>(
        &self,
        backend: &B,
        dx: B::Tensor,
        n: usize,
    ) -> Result<B::Tensor, BackendError> {
        let d = self.dense_inputs;
        if d == 0 {
            return Ok(dx);
        }
        let width = self.fields * self.embedding_dim();
        let dx = backend.download(&dx)?;
        let de: Vec<f32> = dx
            .chunks(width + d)
            .flat_map(|row| row[..width].iter().copied())
            .collect();
        backend.upload(&de, n, width)
    }

    fn embedding_dim(&self) -> usize {
        self.embeddings.map_or(0, |i| self.sparse[i].dim)
    }

    pub(super) fn upload_dense<B: Backend>(
        &self,
        backend: &B,
        pulled: &Pulled,
        i: usize,
    ) -> Result<B::Tensor, BackendError> {
        let t = &self.dense[i];
        backend.upload(&pulled.dense[i], t.rows.unwrap_or(1), t.dim)
    }
}

/// The loss summed over a head's logits `[n, classes]` against its labels
/// (0/1, or class indices) and the gradient of its mean: binary
/// cross-entropy for one column, softmax cross-entropy for several.
pub(super) fn head_loss<B: Backend>(
    backend: &B,
    logits: &B::Tensor,
    labels: &[f32],
) -> Result<(f64, B::Tensor), BackendError> {
    let [n, classes] = backend.shape(logits);
    let labels = backend.upload(labels, n, 1)?;
    if classes > 1 {
        backend.softmax_cross_entropy(logits, &labels)
    } else {
        backend.bce_with_logits(logits, &labels)
    }
}

/// A head's probabilities, example-major: the sigmoid of one logit, or the
/// softmax over the classes.
pub(super) fn head_probs<B: Backend>(
    backend: &B,
    logits: &B::Tensor,
) -> Result<Vec<f32>, BackendError> {
    let [_, classes] = backend.shape(logits);
    let probs = if classes > 1 {
        backend.softmax_rows(logits)?
    } else {
        backend.sigmoid(logits)?
    };
    backend.download(&probs)
}

/// What the MLP's forward pass keeps for the backward pass.
struct Tape<T> {
    steps: Vec<Step<T>>,
    /// The last hidden activation (`None` without hidden layers).
    last: Option<T>,
    out_w: Option<T>,
}

struct Step<T> {
    /// The layer's input, except for the first layer (whose input the
    /// caller passes to the backward pass).
    input: Option<T>,
    weight: T,
    /// With a residual connection, the layer's own activation
    /// `dropout(relu(...))` (without, it is the next layer's input).
    act: Option<T>,
    dropout: Option<Dropout>,
    norm: Option<Norm<T>>,
}
