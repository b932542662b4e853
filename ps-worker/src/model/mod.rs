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
//! - [`build`]: the shape a job's configuration gives it;
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

use ps_common::table::TableSpec;

use crate::backend::SparsePlan;
use crate::data::Batch;
use crate::dedup::UniqueKeys;

mod build;
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
