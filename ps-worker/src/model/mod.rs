//! The models: LR, FM, DeepFM and Wide&Deep over server-side tables.
//!
//! One [`Model`] covers all four: a linear part (sparse `weights`, dim 1) and
//! a `bias`, optionally an FM interaction over a sparse `embeddings` table,
//! optionally an MLP over the per-field pooled embeddings whose weights are
//! dense tables. The worker holds nothing between steps: [`Model::pull`]
//! fetches what a batch touches, [`Model::compute`] runs forward (and in
//! training backward) on any [`Backend`], and [`Model::push`] sends the
//! gradients.
//!
//! Layer order in the MLP: `x W` -> batch norm (optional) -> `+ b` -> ReLU
//! -> dropout, plus the layer's input when `residual` and the width is kept.

use std::collections::BTreeSet;
use std::sync::Arc;

use ps_common::PsError;
use ps_common::config::{DEFAULT_ROW_CACHE_ROWS, JobConfig, MlpConfig, ModelConfig};
use ps_common::routing::mix64;

use crate::backend::{
    Activation, Backend, BackendError, BatchNormMode, BatchNormSaved, Dropout, Pooling, SparsePlan,
};
use crate::cache::{CachedTable, RowCache, hot_rows};
use crate::client::{PsClient, PushTable};
use crate::data::Batch;
use crate::dedup::UniqueKeys;

/// A table the model reads, with the shape it expects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableUse {
    /// Table name.
    pub name: String,
    /// Rows pulled: `None` for sparse tables (the batch's ids).
    pub rows: Option<usize>,
    /// Floats per row.
    pub dim: usize,
    /// What is pushed is a moving-average update (batch-norm running
    /// statistics), not a gradient: never clipped.
    pub statistic: bool,
}

/// One hidden layer's tables.
#[derive(Debug, Clone, PartialEq)]
struct Layer {
    input: usize,
    output: usize,
    /// Index of the weight table among the dense tables; the bias follows,
    /// then (with batch norm) `bn` and `bn_stats`.
    dense: usize,
}

/// An MLP: hidden layers and, for a tower, the output layer.
#[derive(Debug, Clone, PartialEq)]
struct Mlp {
    layers: Vec<Layer>,
    /// Index of the output layer's weights (`last x 1`) among the dense tables.
    out: Option<usize>,
    dropout: f32,
    batch_norm: bool,
    momentum: f32,
    residual: bool,
    /// Mixed into dropout seeds so that MLPs draw different masks.
    salt: u64,
}

/// One task's output: its tower over the shared representation (if any),
/// its bias, its weight in the joint loss.
#[derive(Debug, Clone, PartialEq)]
struct Head {
    tower: Option<Mlp>,
    /// Index of the head's 1 x 1 bias among the dense tables.
    bias: usize,
    weight: f32,
    /// MMoE: index of the head's gate (`input x experts`) among the dense tables.
    gate: Option<usize>,
}

/// LR, FM, DeepFM, Wide&Deep, DNN or multi-task, as a job configures it.
#[derive(Debug, Clone, PartialEq)]
pub struct Model {
    sparse: Vec<TableUse>,
    dense: Vec<TableUse>,
    /// Index of the linear `weights` table among the sparse tables.
    linear: Option<usize>,
    /// Index of the `embeddings` table among the sparse tables.
    embeddings: Option<usize>,
    fm: bool,
    fields: usize,
    /// Shared bottom layers over the pooled embeddings (multi-task).
    shared: Option<Mlp>,
    /// MMoE experts over the pooled embeddings (multi-task).
    experts: Vec<Mlp>,
    /// One per task; the linear and FM parts add to head 0's logit.
    heads: Vec<Head>,
    frozen: BTreeSet<String>,
}

/// Epsilon of batch normalization.
const BN_EPS: f32 = 1e-5;

/// What a batch needs from the servers, pulled.
#[derive(Debug, Clone)]
pub struct Pulled {
    /// The batch's distinct ids.
    pub keys: Vec<u64>,
    /// Occurrences laid out for the backend.
    pub plan: Arc<SparsePlan>,
    /// Labels, one per example.
    pub labels: Vec<f32>,
    /// Rows of each sparse table (model order), `keys.len() * dim`.
    pub sparse: Vec<Vec<f32>>,
    /// All rows of each dense table (model order), `rows * dim`.
    pub dense: Vec<Vec<f32>>,
    /// With a row cache: the rows it covers this step (ascending indices
    /// into `keys`, see [`crate::cache::hot_rows`]); empty without one.
    pub hot: Vec<u32>,
}

/// Gradients in the layout of [`Pulled`].
#[derive(Debug, Clone, PartialEq)]
pub struct Gradients {
    /// Per sparse table, `keys.len() * dim`.
    pub sparse: Vec<Vec<f32>>,
    /// Per dense table, `rows * dim`.
    pub dense: Vec<Vec<f32>>,
}

/// What an [`Update`] carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpdateKind {
    /// Gradients of a sparse table's rows.
    Sparse,
    /// Gradients of a dense table (every row).
    Dense,
    /// Batch-norm running-statistics moves: never filtered or scaled.
    Statistic,
}

/// One table's push of a step.
#[derive(Debug, Clone, PartialEq)]
pub struct Update {
    /// The table.
    pub table: String,
    /// What the values are.
    pub kind: UpdateKind,
    /// Floats per row.
    pub dim: usize,
    /// Distinct rows.
    pub keys: Vec<u64>,
    /// `keys.len() * dim` values, key order.
    pub values: Vec<f32>,
    /// The schedule's learning-rate factor.
    pub lr_scale: Option<f32>,
}

/// Pushes `updates` asynchronously in one coalesced push
/// ([`PsClient::push_many`]); an update with no rows sends nothing.
pub async fn push_updates(client: &PsClient, updates: &[Update]) -> Result<(), PsError> {
    let tables: Vec<PushTable<'_>> = updates
        .iter()
        .filter(|u| !u.keys.is_empty())
        .map(|u| PushTable {
            table: &u.table,
            keys: &u.keys,
            grads: &u.values,
            lr_scale: u.lr_scale,
        })
        .collect();
    if tables.is_empty() {
        return Ok(());
    }
    client.push_many(&tables).await
}

/// Training (backward, dropout, batch statistics) or evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forward and backward; `seed` drives this step's dropout masks.
    Train {
        /// Dropout seed of the step.
        seed: u64,
    },
    /// Forward only, with running batch-norm statistics and no dropout.
    Eval,
}

/// The result of one forward (and backward) pass.
#[derive(Debug, Clone)]
pub struct Output {
    /// Summed binary cross-entropy over the batch.
    pub loss_sum: f64,
    /// Predicted probabilities, example-major, one per task (evaluation
    /// only: empty in training).
    pub probs: Vec<f32>,
    /// Gradients of the mean loss (training only).
    pub grads: Option<Gradients>,
}

impl Model {
    /// The model a job configures.
    pub fn from_job(job: &JobConfig) -> Model {
        let mut sparse = Vec::new();
        let mut dense = Vec::new();
        let linear = job.model.weights_table().map(|weights| {
            sparse.push(TableUse {
                name: weights.into(),
                rows: None,
                dim: 1,
                statistic: false,
            });
            sparse.len() - 1
        });
        let declared_bias = job.model.bias_table().map(|bias| {
            dense.push(TableUse {
                name: bias.into(),
                rows: Some(1),
                dim: 1,
                statistic: false,
            });
            dense.len() - 1
        });
        let k = job
            .model
            .embeddings_table()
            .and_then(|e| job.tables.get(e).map(|t| (e, t.dim as usize)));
        let embeddings = k.map(|(name, dim)| {
            sparse.push(TableUse {
                name: name.into(),
                rows: None,
                dim,
                statistic: false,
            });
            sparse.len() - 1
        });
        let fields = job.data.fields as usize;
        let input = fields * k.map_or(0, |(_, d)| d);
        // The generated tables, in the order the config lists them.
        let first = dense.len();
        dense.extend(
            job.model
                .generated_table_specs(input as u32, job.train.seed)
                .iter()
                .map(|s| TableUse {
                    name: s.name.clone(),
                    rows: Some(s.kind.rows().unwrap_or(1) as usize),
                    dim: s.dim as usize,
                    statistic: s.name.ends_with(".bn_stats"),
                }),
        );
        let index = |name: &str| dense.iter().position(|t| t.name == name);
        let mlp = |config: &MlpConfig, prefix: &str, input: usize, salt: u64| {
            let mut width = input;
            let layers = config
                .hidden
                .iter()
                .enumerate()
                .map(|(i, &out)| {
                    let layer = Layer {
                        input: width,
                        output: out as usize,
                        dense: index(&format!("{prefix}.{i}.w")).unwrap_or(first),
                    };
                    width = out as usize;
                    layer
                })
                .collect();
            Mlp {
                layers,
                out: index(&format!("{prefix}.out.w")),
                dropout: config.dropout,
                batch_norm: config.batch_norm,
                momentum: config.bn_momentum,
                residual: config.residual,
                salt,
            }
        };
        let (shared, experts, heads) = match &job.model {
            ModelConfig::Multitask {
                tasks,
                shared: shared_config,
                tower,
                experts: experts_config,
                ..
            } => {
                let shared = shared_config
                    .as_ref()
                    .map(|c| mlp(c, &c.name, input, 1 << 40));
                let experts: Vec<Mlp> = experts_config
                    .iter()
                    .flat_map(|c| {
                        (0..c.count).map(move |e| {
                            mlp(
                                &c.mlp,
                                &format!("{}.{e}", c.mlp.name),
                                input,
                                (u64::from(e) + 1) << 48,
                            )
                        })
                    })
                    .collect();
                let width = shared_config
                    .as_ref()
                    .and_then(|c| c.hidden.last())
                    .or(experts_config.as_ref().and_then(|c| c.mlp.hidden.last()))
                    .map_or(input, |&w| w as usize);
                let heads = tasks
                    .iter()
                    .enumerate()
                    .map(|(t, task)| {
                        let prefix = format!("{}.{}", tower.name, task.name);
                        Head {
                            tower: Some(mlp(tower, &prefix, width, (t as u64 + 2) << 40)),
                            bias: index(&format!("{prefix}.bias")).unwrap_or(first),
                            weight: task.weight,
                            gate: index(&format!("{prefix}.gate")),
                        }
                    })
                    .collect();
                (shared, experts, heads)
            }
            config => (
                None,
                Vec::new(),
                vec![Head {
                    tower: config.mlp().map(|c| mlp(c, &c.name, input, 0)),
                    bias: declared_bias.unwrap_or(0),
                    weight: 1.0,
                    gate: None,
                }],
            ),
        };
        Model {
            sparse,
            dense,
            linear,
            embeddings,
            fm: matches!(
                job.model,
                ModelConfig::Fm { .. } | ModelConfig::Deepfm { .. }
            ),
            fields,
            shared,
            experts,
            heads,
            frozen: job.train.freeze.iter().cloned().collect(),
        }
    }

    /// Number of tasks (labels per example).
    pub fn tasks(&self) -> usize {
        self.heads.len()
    }

    /// Clips gradients in place: the dense tables' together to global L2
    /// norm `dense_norm`, each sparse row to L2 norm `row_norm`. Returns the
    /// dense gradients' norm before clipping.
    pub fn clip(
        &self,
        grads: &mut Gradients,
        dense_norm: Option<f32>,
        row_norm: Option<f32>,
    ) -> f32 {
        if let Some(limit) = row_norm {
            for (table, grad) in self.sparse.iter().zip(&mut grads.sparse) {
                for row in grad.chunks_mut(table.dim.max(1)) {
                    let norm = row.iter().map(|g| g * g).sum::<f32>().sqrt();
                    if norm > limit {
                        row.iter_mut().for_each(|g| *g *= limit / norm);
                    }
                }
            }
        }
        let gradients = || {
            self.dense
                .iter()
                .zip(grads.dense.iter())
                .filter(|(t, _)| !t.statistic)
        };
        let norm = gradients()
            .flat_map(|(_, g)| g.iter())
            .map(|g| f64::from(*g) * f64::from(*g))
            .sum::<f64>()
            .sqrt() as f32;
        if let Some(limit) = dense_norm.filter(|&l| norm > l) {
            let scale = limit / norm;
            for (table, grad) in self.dense.iter().zip(grads.dense.iter_mut()) {
                if !table.statistic {
                    grad.iter_mut().for_each(|g| *g *= scale);
                }
            }
        }
        norm
    }

    /// Keeps these tables fixed: their gradients are never pushed.
    pub fn freeze(mut self, tables: impl IntoIterator<Item = String>) -> Model {
        self.frozen.extend(tables);
        self
    }

    /// The sparse tables, in the order of [`Pulled::sparse`].
    pub fn sparse_tables(&self) -> &[TableUse] {
        &self.sparse
    }

    /// The dense tables, in the order of [`Pulled::dense`].
    pub fn dense_tables(&self) -> &[TableUse] {
        &self.dense
    }

    /// Lays out a batch's occurrences for the backend.
    pub fn plan(&self, batch: &Batch) -> (Vec<u64>, Arc<SparsePlan>) {
        let unique = UniqueKeys::new(&batch.ids);
        let plan = SparsePlan::new(
            &batch.offsets,
            &unique.index,
            &batch.values,
            (!batch.fields.is_empty()).then_some(batch.fields.as_slice()),
            self.fields,
            unique.keys.len(),
        );
        (unique.keys, Arc::new(plan))
    }

    /// A batch's [`Pulled`] with each table's values from
    /// `values(table, len)` instead of the servers (benchmarks and tests).
    pub fn pulled_from(
        &self,
        batch: &Batch,
        mut values: impl FnMut(&TableUse, usize) -> Vec<f32>,
    ) -> Pulled {
        let (keys, plan) = self.plan(batch);
        let sparse = self
            .sparse
            .iter()
            .map(|t| values(t, keys.len() * t.dim))
            .collect();
        let dense = self
            .dense
            .iter()
            .map(|t| values(t, t.rows.unwrap_or(1) * t.dim))
            .collect();
        Pulled {
            keys,
            plan,
            labels: batch.labels.clone(),
            sparse,
            dense,
            hot: Vec::new(),
        }
    }

    /// Pulls every row the batch needs, all tables in parallel.
    pub async fn pull(&self, client: &PsClient, batch: &Batch) -> Result<Pulled, PsError> {
        self.pull_through(client, batch, None).await
    }

    /// [`Model::pull`] for step `cache.1`, serving sparse rows from the
    /// row cache `cache.0` where it holds them fresh.
    pub async fn pull_through(
        &self,
        client: &PsClient,
        batch: &Batch,
        cache: Option<(&RowCache, u64)>,
    ) -> Result<Pulled, PsError> {
        let (keys, plan) = self.plan(batch);
        let hot = cache.map_or_else(Vec::new, |_| hot_rows(&plan.row_offsets));
        let (sparse, dense) = tokio::try_join!(
            self.pull_sparse_rows(client, &keys, &hot, cache),
            self.pull_tables(client, &self.dense, &[])
        )?;
        Ok(Pulled {
            keys,
            plan,
            labels: batch.labels.clone(),
            sparse,
            dense,
            hot,
        })
    }

    /// The batch's plan and its sparse tables' rows (through `cache`, as
    /// in [`Model::pull_through`]); `dense` is left empty for
    /// [`Model::pull_dense`] (hybrid consistency pulls them apart).
    pub async fn pull_sparse(
        &self,
        client: &PsClient,
        batch: &Batch,
        cache: Option<(&RowCache, u64)>,
    ) -> Result<Pulled, PsError> {
        let (keys, plan) = self.plan(batch);
        let hot = cache.map_or_else(Vec::new, |_| hot_rows(&plan.row_offsets));
        let sparse = self.pull_sparse_rows(client, &keys, &hot, cache).await?;
        Ok(Pulled {
            keys,
            plan,
            labels: batch.labels.clone(),
            sparse,
            dense: Vec::new(),
            hot,
        })
    }

    /// The sparse tables' rows of `keys`, those at `hot` that `cache`
    /// holds fresh for its step taken from it.
    async fn pull_sparse_rows(
        &self,
        client: &PsClient,
        keys: &[u64],
        hot: &[u32],
        cache: Option<(&RowCache, u64)>,
    ) -> Result<Vec<Vec<f32>>, PsError> {
        let Some((cache, step)) = cache else {
            return self.pull_tables(client, &self.sparse, keys).await;
        };
        let lookup = cache.lookup(keys, hot, step);
        let pulled = if lookup.keys.is_empty() {
            vec![Vec::new(); self.sparse.len()]
        } else {
            self.pull_tables(client, &self.sparse, &lookup.keys).await?
        };
        Ok(cache.fill(lookup, keys, hot, pulled, step))
    }

    /// The job's row cache (`communication.row_cache_steps`), over this
    /// model's sparse tables; `None` when it is off or there are none.
    pub fn row_cache(&self, job: &JobConfig) -> Option<Arc<RowCache>> {
        let c = &job.communication;
        if c.row_cache_steps == 0 || self.sparse.is_empty() {
            return None;
        }
        let tables = self
            .sparse
            .iter()
            .map(|t| CachedTable {
                name: t.name.clone(),
                dim: t.dim,
                pushed: !self.frozen.contains(&t.name),
            })
            .collect();
        Some(Arc::new(RowCache::new(
            tables,
            c.row_cache_steps,
            c.row_cache_rows.unwrap_or(DEFAULT_ROW_CACHE_ROWS),
        )))
    }

    /// Pulls every dense table into `pulled.dense`.
    pub async fn pull_dense(&self, client: &PsClient, pulled: &mut Pulled) -> Result<(), PsError> {
        pulled.dense = self.pull_tables(client, &self.dense, &[]).await?;
        Ok(())
    }

    /// Rows of `tables` in one coalesced pull ([`PsClient::pull_many`]):
    /// the rows of `keys` for a sparse table, every row for a dense one.
    async fn pull_tables(
        &self,
        client: &PsClient,
        tables: &[TableUse],
        keys: &[u64],
    ) -> Result<Vec<Vec<f32>>, PsError> {
        let all_rows: Vec<Option<Vec<u64>>> = tables
            .iter()
            .map(|t| t.rows.map(|n| (0..n as u64).collect()))
            .collect();
        let requests: Vec<(&str, &[u64])> = tables
            .iter()
            .zip(&all_rows)
            .map(|(t, rows)| (t.name.as_str(), rows.as_deref().unwrap_or(keys)))
            .collect();
        if requests.is_empty() {
            return Ok(Vec::new());
        }
        client.pull_many(&requests).await
    }

    /// Pushes gradients asynchronously (see [`PsClient::push_unique`]),
    /// skipping frozen tables; `lr_scale` (the schedule's factor) scales
    /// every table's learning rate except the batch-norm statistics'.
    pub async fn push(
        &self,
        client: &PsClient,
        pulled: &Pulled,
        grads: Gradients,
        lr_scale: Option<f32>,
    ) -> Result<(), PsError> {
        push_updates(client, &self.updates(pulled, grads, lr_scale)).await
    }

    /// What a step pushes, table by table (frozen tables left out): the
    /// batch's keys for sparse tables, every row for dense ones.
    pub fn updates(&self, pulled: &Pulled, grads: Gradients, lr_scale: Option<f32>) -> Vec<Update> {
        let mut out = Vec::new();
        for (table, grad) in self.sparse.iter().zip(grads.sparse) {
            if !self.frozen.contains(&table.name) {
                out.push(Update {
                    table: table.name.clone(),
                    kind: UpdateKind::Sparse,
                    dim: table.dim,
                    keys: pulled.keys.clone(),
                    values: grad,
                    lr_scale,
                });
            }
        }
        for (table, grad) in self.dense.iter().zip(grads.dense) {
            if !self.frozen.contains(&table.name) {
                out.push(Update {
                    table: table.name.clone(),
                    kind: if table.statistic {
                        UpdateKind::Statistic
                    } else {
                        UpdateKind::Dense
                    },
                    dim: table.dim,
                    keys: (0..table.rows.unwrap_or(1) as u64).collect(),
                    values: grad,
                    lr_scale: if table.statistic { None } else { lr_scale },
                });
            }
        }
        out
    }

    /// Forward pass, and in training the backward pass, on `backend`.
    pub fn compute<B: Backend>(
        &self,
        backend: &B,
        pulled: &Pulled,
        mode: Mode,
    ) -> Result<Output, BackendError> {
        let plan_host = &pulled.plan;
        let (n, unique, tasks) = (plan_host.examples, plan_host.unique, self.heads.len());
        let plan = backend.upload_plan(plan_host)?;
        let w = match self.linear {
            Some(i) => Some(backend.upload(&pulled.sparse[i], unique, 1)?),
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
        let mut fm_sums = None;
        if let (true, Some(v)) = (self.fm, &v) {
            let (interaction, sums) = backend.fm_forward(v, &plan)?;
            wide = Some(match wide {
                Some(z) => backend.add(&z, &interaction)?,
                None => interaction,
            });
            fm_sums = Some(sums);
        }
        // The deep input: per-field pooled embeddings, through the shared bottom.
        let deep = self.heads.iter().any(|h| h.tower.is_some())
            || self.shared.is_some()
            || !self.experts.is_empty();
        let x = match (&v, deep) {
            (Some(v), true) => {
                let pooled = backend.gather_pool(v, &plan, Pooling::Field)?;
                Some(backend.reshape(pooled, n, self.fields * self.embedding_dim())?)
            }
            _ => None,
        };
        let shared = match (&self.shared, &x) {
            (Some(mlp), Some(x)) => Some(self.mlp_forward(backend, mlp, x, pulled, mode)?),
            _ => None,
        };
        let h = match (&shared, &x) {
            (Some((out, _)), _) => Some(out),
            (None, Some(x)) => Some(x),
            _ => None,
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
        let mut probs = match mode {
            Mode::Eval => vec![0f32; n * tasks],
            Mode::Train { .. } => Vec::new(),
        };
        let mut heads = Vec::with_capacity(tasks);
        for (t, head) in self.heads.iter().enumerate() {
            let input = gating
                .get(t)
                .and_then(|g| g.as_ref())
                .map(|(_, _, mixed)| mixed)
                .or(h);
            let (mut z, tape) = match (&head.tower, input) {
                (Some(mlp), Some(input)) => {
                    let (out, tape) = self.mlp_forward(backend, mlp, input, pulled, mode)?;
                    (Some(out), Some(tape))
                }
                _ => (None, None),
            };
            if t == 0 {
                z = match (z, wide.take()) {
                    (Some(a), Some(b)) => Some(backend.add(&a, &b)?),
                    (a, b) => a.or(b),
                };
            }
            let z = match z {
                Some(z) => z,
                None => backend.upload(&vec![0.0; n], n, 1)?,
            };
            let bias = self.upload_dense(backend, pulled, head.bias)?;
            let logits = backend.bias_act(&z, &bias, Activation::Identity, None)?;
            let labels: Vec<f32> = (0..n).map(|b| pulled.labels[b * tasks + t]).collect();
            let labels = backend.upload(&labels, n, 1)?;
            let (loss, dlogits) = backend.bce_with_logits(&logits, &labels)?;
            loss_sum += f64::from(head.weight) * loss;
            if mode == Mode::Eval {
                for (b, p) in backend
                    .download(&backend.sigmoid(&logits)?)?
                    .into_iter()
                    .enumerate()
                {
                    probs[b * tasks + t] = p;
                }
            }
            heads.push((logits, dlogits, tape));
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
        for (t, (head, (logits, dlogits, tape))) in self.heads.iter().zip(heads).enumerate() {
            let dlogits = if head.weight == 1.0 {
                dlogits
            } else {
                backend.scale(&dlogits, head.weight)?
            };
            let (dz, dbias) =
                backend.bias_act_backward(&dlogits, &logits, Activation::Identity, None)?;
            dense_grads[head.bias] = backend.download(&dbias)?;
            if t == 0 {
                if let Some(i) = self.linear {
                    let dw = backend.scatter_pool(&dz, &plan, Pooling::Example)?;
                    sparse_grads[i] = backend.download(&dw)?;
                }
                if let (Some(sums), Some(v)) = (&fm_sums, &v) {
                    dv = Some(backend.fm_backward(&dz, sums, v, &plan)?);
                }
            }
            let gate = gating.get(t).and_then(|g| g.as_ref());
            let input = gate.map(|(_, _, mixed)| mixed).or(h);
            if let (Some(mlp), Some(tape), Some(input)) = (&head.tower, tape, input) {
                let d =
                    self.mlp_backward(backend, mlp, tape, dz, input, pulled, &mut dense_grads)?;
                match (gate, &stacked, &x, head.gate) {
                    (Some((w_gate, gates, _)), Some(all), Some(x), Some(g)) => {
                        let (ds, dgates) = backend.mix_backward(&d, all, gates)?;
                        dstacked = Some(sum(dstacked, ds)?);
                        let dlogits = backend.softmax_rows_backward(&dgates, gates)?;
                        dense_grads[g] =
                            backend.download(&backend.matmul(x, &dlogits, true, false)?)?;
                        let dx = backend.matmul(&dlogits, w_gate, false, true)?;
                        dx_gates = Some(sum(dx_gates, dx)?);
                    }
                    _ => dh = Some(sum(dh, d)?),
                }
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
        let dx = match (&self.shared, shared, &x, dh) {
            (Some(mlp), Some((_, tape)), Some(x), Some(dh)) => {
                Some(self.mlp_backward(backend, mlp, tape, dh, x, pulled, &mut dense_grads)?)
            }
            (_, _, _, dh) => dh,
        };
        if let Some(dx) = dx {
            let de = backend.reshape(dx, n * self.fields, self.embedding_dim())?;
            let from_deep = backend.scatter_pool(&de, &plan, Pooling::Field)?;
            dv = Some(match dv {
                Some(fm) => backend.add(&fm, &from_deep)?,
                None => from_deep,
            });
        }
        if let (Some(dv), Some(i)) = (dv, self.embeddings) {
            sparse_grads[i] = backend.download(&dv)?;
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
                let params = bn_params(pulled, layer);
                let params = backend.upload(&params, 4, layer.output)?;
                let bn_mode = match mode {
                    Mode::Train { .. } => BatchNormMode::Batch,
                    Mode::Eval => BatchNormMode::Running,
                };
                let (y, stats, saved) = backend.batch_norm(&pre, &params, bn_mode, BN_EPS)?;
                (y, Some((params, stats, saved)))
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
                grads[o] = backend.download(&backend.matmul(last, &dout, true, false)?)?;
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
            grads[layer.dense + 1] = backend.download(&dbias)?;
            let dlin = match &step.norm {
                Some((params, stats, saved)) => {
                    let (dx, dparams) = backend.batch_norm_backward(&dpre, params, saved)?;
                    let dparams = backend.download(&dparams)?;
                    grads[layer.dense + 2] = dparams[..layer.output].to_vec();
                    grads[layer.dense + 3] =
                        running_stats_push(pulled, layer, &backend.download(stats)?, mlp.momentum);
                    dx
                }
                None => dpre,
            };
            let layer_input = step.input.as_ref().unwrap_or(input);
            grads[layer.dense] =
                backend.download(&backend.matmul(layer_input, &dlin, true, false)?)?;
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

    fn embedding_dim(&self) -> usize {
        self.embeddings.map_or(0, |i| self.sparse[i].dim)
    }

    fn upload_dense<B: Backend>(
        &self,
        backend: &B,
        pulled: &Pulled,
        i: usize,
    ) -> Result<B::Tensor, BackendError> {
        let t = &self.dense[i];
        backend.upload(&pulled.dense[i], t.rows.unwrap_or(1), t.dim)
    }
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
    norm: Option<(T, T, BatchNormSaved<T>)>,
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

#[cfg(test)]
mod tests;
