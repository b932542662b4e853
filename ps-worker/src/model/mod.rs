//! The models: LR, FM, DeepFM, Wide&Deep, DNN, multi-task and the image
//! models (ResNet, Inception) over server-side tables.
//!
//! One [`Model`] covers them all: a linear part (sparse `weights`, dim 1)
//! and a `bias`, optionally an FM interaction over a sparse `embeddings`
//! table, optionally an MLP over the per-field pooled embeddings whose
//! weights are dense tables. Each head ends in one logit under a sigmoid,
//! or (`classes`) one per class under a softmax, the linear part and the
//! bias then holding a value per class. The worker holds nothing between
//! steps: [`Model::pull`] fetches what a batch touches, [`Model::compute`] runs forward (and in
//! training backward) on any [`crate::backend::Backend`], and
//! [`Model::push`] sends the gradients.
//!
//! - this file: the model's shape (tables, layers, heads) and its types.
//! - [`params`]: pulls (through the row cache), updates and pushes.
//! - [`compute`]: the forward and backward passes;
//! - [`fm`]: the FM pairwise term, summed or per class;
//! - [`norm`]: batch norm of a layer with its server-side tables;
//! - [`convnet`]: the image models' passes;
//! - [`tasks`]: task embeddings and cross-attention of multi-task models.
//!
//! Layer order in the MLP: `x W` -> batch norm (optional) -> `+ b` -> ReLU
//! -> dropout, plus the layer's input when `residual` and the width is kept.

use std::collections::BTreeSet;
use std::sync::Arc;

use ps_common::config::{
    ConvNet, CrossAttentionConfig, Device, ImageConfig, JobConfig, MlpConfig, ModelConfig,
    TaskEmbeddingConfig,
};
use ps_common::table::TableSpec;

use crate::backend::SparsePlan;
use crate::data::Batch;
use crate::dedup::UniqueKeys;

mod compute;
mod convnet;
mod fm;
mod norm;
mod params;
mod tasks;

pub use params::push_updates;

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

impl TableUse {
    /// A dense table a model generated (its MLP's, its layers').
    fn generated(spec: &TableSpec) -> TableUse {
        TableUse {
            name: spec.name.clone(),
            rows: Some(spec.kind.rows().unwrap_or(1) as usize),
            dim: spec.dim as usize,
            statistic: spec.name.ends_with(".bn_stats"),
        }
    }
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
    /// Index of the head's `1 x classes` bias among the dense tables.
    bias: usize,
    /// Logits of the head: 1 (a probability, binary cross-entropy) or the
    /// classes of a softmax.
    classes: usize,
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
    fm: Option<fm::Fm>,
    fields: usize,
    /// Numbers per example fed to the MLP beside the pooled embeddings
    /// (`data.numeric.dense`).
    dense_inputs: usize,
    /// Shared bottom layers over the pooled embeddings (multi-task).
    shared: Option<Mlp>,
    /// MMoE experts over the pooled embeddings (multi-task).
    experts: Vec<Mlp>,
    /// One per task; the linear and FM parts add to head 0's logit.
    heads: Vec<Head>,
    /// Multi-task: learned task vectors joined to the shared bottom's input.
    task_embedding: Option<tasks::TaskEmbedding>,
    /// Multi-task: cross-attention among the towers before their output
    /// layers.
    cross: Option<tasks::CrossAttention>,
    frozen: BTreeSet<String>,
    /// `data.negative_sampling`: the share of negatives training kept;
    /// predicted probabilities are corrected back to the true base rate.
    negative_rate: Option<f64>,
    /// The image models (`resnet`, `inception`): everything else is unused.
    conv: Option<convnet::ConvModel>,
    /// Whether [`Model::plan`] groups occurrences by row as well
    /// ([`SparsePlan::by_row`]): the job computes on a GPU, whose scatter
    /// reads them; the CPU backend does not.
    group_by_row: bool,
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
    /// The examples' dense MLP inputs ([`Batch::dense`]).
    pub inputs: Vec<f32>,
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
    /// Cross-entropy summed over the batch (binary per task, or over the
    /// classes), tasks weighted.
    pub loss_sum: f64,
    /// Predicted probabilities, example-major, [`Model::outputs`] per
    /// example: one per task, or a distribution over the classes
    /// (evaluation only: empty in training).
    pub probs: Vec<f32>,
    /// Gradients of the mean loss (training only).
    pub grads: Option<Gradients>,
}

impl Model {
    /// The model a job configures.
    pub fn from_job(job: &JobConfig) -> Model {
        if let Some(image) = job.data.image
            && let Some(net) = job.model.conv_net(image.channels)
        {
            return Model::images(job, net, image);
        }
        let mut sparse = Vec::new();
        let mut dense = Vec::new();
        let classes = job.model.classes().max(1) as usize;
        let linear = job.model.weights_table().map(|weights| {
            sparse.push(TableUse {
                name: weights.into(),
                rows: None,
                dim: classes,
                statistic: false,
            });
            sparse.len() - 1
        });
        let declared_bias = job.model.bias_table().map(|bias| {
            dense.push(TableUse {
                name: bias.into(),
                rows: Some(1),
                dim: classes,
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
        let dense_inputs = job.data.dense_inputs() as usize;
        let input = fields * k.map_or(0, |(_, d)| d) + dense_inputs;
        // The generated tables, in the order the config lists them.
        let first = dense.len();
        dense.extend(
            job.model
                .generated_table_specs(input as u32, job.train.seed)
                .iter()
                .map(TableUse::generated),
        );
        // A multi-class FM's class weights.
        let fm_classes = job
            .model
            .fm_classes_spec(&job.tables, job.train.seed)
            .map(|spec| {
                dense.push(TableUse::generated(&spec));
                dense.len() - 1
            });
        let fm = match (&job.model, fm_classes) {
            (_, Some(table)) => Some(fm::Fm::PerClass(table)),
            (ModelConfig::Fm { .. } | ModelConfig::Deepfm { .. }, None) => Some(fm::Fm::Summed),
            _ => None,
        };
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
        let (mut task_embedding, mut cross) = (None, None);
        let (shared, experts, heads) = match &job.model {
            ModelConfig::Multitask {
                tasks,
                shared: shared_config,
                tower,
                experts: experts_config,
                task_embedding: task_embedding_config,
                cross_attention,
                ..
            } => {
                task_embedding = task_embedding_config.map(|te| tasks::TaskEmbedding {
                    table: index(&TaskEmbeddingConfig::table(tower)).unwrap_or(first),
                    dim: te.dim as usize,
                });
                let shared_input = input + task_embedding.as_ref().map_or(0, |te| te.dim);
                let shared = shared_config
                    .as_ref()
                    .map(|c| mlp(c, &c.name, shared_input, 1 << 40));
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
                cross = cross_attention.map(|ca| tasks::CrossAttention {
                    heads: ca.heads as usize,
                    dim: ca.dim as usize,
                    encoders: tasks
                        .iter()
                        .map(|t| {
                            let enc = CrossAttentionConfig::encoder(tower, &t.name);
                            index(&format!("{enc}.w")).unwrap_or(first)
                        })
                        .collect(),
                    projections: ["q", "k", "v", "o"].map(|which| {
                        index(&CrossAttentionConfig::projection(tower, which)).unwrap_or(first)
                    }),
                    // Filled as the heads are built: each tower's output layer.
                    outs: Vec::new(),
                });
                let heads = tasks
                    .iter()
                    .enumerate()
                    .map(|(t, task)| {
                        let prefix = format!("{}.{}", tower.name, task.name);
                        let mut tower = mlp(tower, &prefix, width, (t as u64 + 2) << 40);
                        if let Some(cross) = &mut cross {
                            // The output layer reads what the towers
                            // gathered from one another too.
                            cross.outs.push(tower.out.take().unwrap_or(first));
                        }
                        Head {
                            tower: Some(tower),
                            bias: index(&format!("{prefix}.bias")).unwrap_or(first),
                            classes: task.classes.unwrap_or(1).max(1) as usize,
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
                    classes,
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
            fm,
            fields,
            dense_inputs,
            shared,
            experts,
            heads,
            task_embedding,
            cross,
            frozen: job.train.freeze.iter().cloned().collect(),
            negative_rate: job.data.negative_sampling,
            conv: None,
            group_by_row: job.train.device != Device::Cpu,
        }
    }

    /// An image model: dense tables only, one softmax head.
    fn images(job: &JobConfig, net: ConvNet, image: ImageConfig) -> Model {
        let dense: Vec<TableUse> = net
            .table_specs(job.train.seed)
            .iter()
            .map(TableUse::generated)
            .collect();
        let conv = convnet::ConvModel::new(net, image, &dense);
        Model {
            sparse: Vec::new(),
            dense,
            linear: None,
            embeddings: None,
            fm: None,
            fields: 1,
            dense_inputs: image.pixels(),
            shared: None,
            experts: Vec::new(),
            task_embedding: None,
            cross: None,
            heads: vec![Head {
                tower: None,
                bias: 0,
                classes: conv.classes(),
                weight: 1.0,
                gate: None,
            }],
            frozen: job.train.freeze.iter().cloned().collect(),
            negative_rate: None,
            conv: Some(conv),
            group_by_row: false,
        }
    }

    /// Values predicted per example: per task, one probability or (a
    /// multi-class head) a distribution over its classes, in task order.
    pub fn outputs(&self) -> usize {
        self.heads.iter().map(|h| h.classes).sum()
    }

    /// Each task's classes: 1 for a binary head.
    pub fn task_classes(&self) -> Vec<usize> {
        self.heads.iter().map(|h| h.classes).collect()
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

    /// A probability predicted by a model trained on negatives kept at
    /// `data.negative_sampling`, corrected back to the true base rate:
    /// `p / (p + (1 - p) / rate)`, i.e. `ln(rate)` added to the logit.
    pub fn corrected(&self, p: f32) -> f32 {
        match self.negative_rate {
            Some(rate) => {
                let p = f64::from(p);
                (p / (p + (1.0 - p) / rate)) as f32
            }
            None => p,
        }
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
        if self.group_by_row {
            // Here, in the prefetcher, rather than in the step.
            plan.by_row();
        }
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
            inputs: batch.dense.clone(),
            hot: Vec::new(),
        }
    }
}

#[cfg(test)]
mod image_tests;
#[cfg(test)]
pub(crate) mod tests;
