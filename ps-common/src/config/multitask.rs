//! `[model]` of `kind = "multitask"`: two more ways for tasks to share
//! what they learn, beside a shared bottom and MMoE: learned task
//! embeddings fed to the shared layers, and cross-attention among the
//! towers, before their output layers. Their keys, checks and generated
//! tables.

use serde::Deserialize;

use super::{MlpConfig, TaskConfig, dense_spec};
use crate::table::{InitializerSpec, TableSpec};

/// `task_embedding = { dim }`: one learned vector of `dim` values per
/// task (table `{tower.name}.task_emb`, a row per task in task order),
/// joined to the embeddings at the shared bottom's input, so the shared
/// layers compute one representation per task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskEmbeddingConfig {
    /// Values per task vector.
    pub dim: u32,
}

/// `cross_attention = { heads, dim }`: between each tower's hidden
/// layers and its output layer. Task `t`'s last hidden layer `h_t` is
/// projected to a token of `dim` values, `h_t E_t + c_t`
/// (`{tower}.{task}.enc.w`, `.b`); the tokens of an example attend to one
/// another (every task's, its own included) with `heads` heads
/// (`{tower}.attn.q`, `.k`, `.v`, `.o`, each `dim x dim`); each task's
/// output layer (`{tower}.{task}.out.w`, `last + dim` rows) reads
/// `[h_t, token_t + attention_t W_o]`: what its own tower computed and
/// what it gathered from the other towers. So a task with few positive
/// labels (a purchase after a click) can read what a task with many
/// learned, rather than learn it again in its own tower.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CrossAttentionConfig {
    /// Attention heads (`dim` must split evenly among them).
    pub heads: u32,
    /// Values per token.
    pub dim: u32,
}

/// The widest task embedding or attention token.
pub const MAX_TASK_WIDTH: u32 = 1024;

impl TaskEmbeddingConfig {
    /// The table of the task vectors.
    pub fn table(tower: &MlpConfig) -> String {
        format!("{}.task_emb", tower.name)
    }

    pub(super) fn table_spec(&self, tower: &MlpConfig, tasks: usize, seed: u64) -> TableSpec {
        dense_spec(
            Self::table(tower),
            tasks as u32,
            self.dim,
            InitializerSpec::Normal {
                mean: 0.0,
                std: 0.1,
            },
            tower.optimizer,
            seed,
        )
    }
}

impl CrossAttentionConfig {
    /// Task `task`'s token projection table (`{prefix}.enc.w`; `.enc.b`
    /// is its bias).
    pub fn encoder(tower: &MlpConfig, task: &str) -> String {
        format!("{}.{task}.enc", tower.name)
    }

    /// The attention's projection `which` (`q`, `k`, `v` or `o`).
    pub fn projection(tower: &MlpConfig, which: &str) -> String {
        format!("{}.attn.{which}", tower.name)
    }

    /// The task encoders over the towers' last hidden layers of `width`
    /// values, then the four projections. An output layer then reads
    /// `width + dim` values.
    pub(super) fn table_specs(
        &self,
        tower: &MlpConfig,
        tasks: &[TaskConfig],
        width: u32,
        seed: u64,
    ) -> Vec<TableSpec> {
        let dense = |name: String, rows: u32, dim: u32, init| {
            dense_spec(name, rows, dim, init, tower.optimizer, seed)
        };
        let normal = |fan_in: u32, gain: f32| InitializerSpec::Normal {
            mean: 0.0,
            std: (gain / fan_in.max(1) as f32).sqrt(),
        };
        let mut specs = Vec::new();
        for task in tasks {
            let enc = Self::encoder(tower, &task.name);
            specs.push(dense(
                format!("{enc}.w"),
                width,
                self.dim,
                normal(width, 2.0),
            ));
            specs.push(dense(
                format!("{enc}.b"),
                1,
                self.dim,
                InitializerSpec::Zeros,
            ));
        }
        for which in ["q", "k", "v", "o"] {
            // W_o starts at zero: an output layer first reads [h_t, token_t], and
            // what the tasks gather from one another grows in as it helps.
            let init = if which == "o" {
                InitializerSpec::Zeros
            } else {
                normal(self.dim, 1.0)
            };
            specs.push(dense(
                Self::projection(tower, which),
                self.dim,
                self.dim,
                init,
            ));
        }
        specs
    }
}

/// Checks the two keys against the rest of a multi-task model: the key
/// at fault and what is wrong.
pub(super) fn validate(
    task_embedding: Option<&TaskEmbeddingConfig>,
    cross_attention: Option<&CrossAttentionConfig>,
    has_shared: bool,
    tower: &MlpConfig,
    tasks: usize,
) -> Result<(), (String, String)> {
    if let Some(te) = task_embedding {
        if !has_shared {
            return Err((
                "model.task_embedding".into(),
                "feeds the shared bottom: set `shared` (not experts) with it".into(),
            ));
        }
        if !(1..=MAX_TASK_WIDTH).contains(&te.dim) {
            return Err((
                "model.task_embedding.dim".into(),
                format!("must be between 1 and {MAX_TASK_WIDTH}"),
            ));
        }
    }
    if let Some(ca) = cross_attention {
        if tasks < 2 {
            return Err((
                "model.cross_attention".into(),
                "needs at least two tasks to attend to".into(),
            ));
        }
        if !(1..=MAX_TASK_WIDTH).contains(&ca.dim) {
            return Err((
                "model.cross_attention.dim".into(),
                format!("must be between 1 and {MAX_TASK_WIDTH}"),
            ));
        }
        if ca.heads == 0 || !ca.dim.is_multiple_of(ca.heads) {
            return Err((
                "model.cross_attention.heads".into(),
                format!("must be >= 1 and divide dim = {}", ca.dim),
            ));
        }
        if tower.hidden.is_empty() {
            return Err((
                "model.tower.hidden".into(),
                "cross-attention sits between the towers' hidden layers and their output \
                 layers: give the tower at least one hidden layer"
                    .into(),
            ));
        }
    }
    Ok(())
}
