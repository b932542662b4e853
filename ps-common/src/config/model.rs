//! `[model]`: the model kinds, their MLP and multi-task settings, and the
//! tables each model reads (generated from these settings).

use super::convnet::{ConvNet, InceptionConfig, ResnetConfig};
use super::multitask::{CrossAttentionConfig, TaskEmbeddingConfig};
use super::*;

/// The model and the tables it reads.
///
/// Every model has a sparse `weights` table (dim 1, the linear part) and a
/// dense `bias` table (1 x 1); with `classes = C` they hold a value per
/// class (dim C, 1 x C) and the MLP's output layer has C columns, under a
/// softmax; FM and DeepFM then weigh the factor dimensions per class (see
/// [`ModelConfig::fm_classes_spec`]). FM, DeepFM and Wide&Deep add a sparse
/// `embeddings` table (dim k); DeepFM and Wide&Deep add an MLP whose weights
/// are dense tables generated from `[model.mlp]` (see [`MlpConfig`]).
// One per job, read once: the size of its largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ModelConfig {
    /// Sparse logistic regression: `p = sigmoid(bias + sum_j w[j] * x_j)`.
    Lr {
        /// Classes of a softmax output (labels `0..classes`); absent: one
        /// probability of the positive label.
        #[serde(default)]
        classes: Option<u32>,
        /// Sparse table of dim 1 (or `classes`) holding one weight per
        /// feature id (and class).
        #[serde(default = "default_weights_table")]
        weights: String,
        /// Dense table of 1 row x dim 1 (or `classes`) holding the bias.
        #[serde(default = "default_bias_table")]
        bias: String,
    },
    /// Factorization machine: LR plus `sum_{i<j} <v_i, v_j> x_i x_j`.
    Fm {
        /// Classes of a softmax output (labels `0..classes`); absent: one
        /// probability of the positive label.
        #[serde(default)]
        classes: Option<u32>,
        /// Sparse table of dim 1 (linear part).
        #[serde(default = "default_weights_table")]
        weights: String,
        /// Dense 1 x 1 table (bias).
        #[serde(default = "default_bias_table")]
        bias: String,
        /// Sparse table of dim k: one factor vector per feature id.
        #[serde(default = "default_embeddings_table")]
        embeddings: String,
    },
    /// DeepFM: FM plus an MLP over the per-field pooled embeddings.
    Deepfm {
        /// Classes of a softmax output (labels `0..classes`); absent: one
        /// probability of the positive label.
        #[serde(default)]
        classes: Option<u32>,
        /// Sparse table of dim 1 (linear part).
        #[serde(default = "default_weights_table")]
        weights: String,
        /// Dense 1 x 1 table (bias).
        #[serde(default = "default_bias_table")]
        bias: String,
        /// Sparse table of dim k shared by the FM and the MLP.
        #[serde(default = "default_embeddings_table")]
        embeddings: String,
        /// The deep part.
        mlp: MlpConfig,
    },
    /// Wide&Deep: the linear (wide) part plus an MLP over the per-field
    /// pooled embeddings.
    WideDeep {
        /// Classes of a softmax output (labels `0..classes`); absent: one
        /// probability of the positive label.
        #[serde(default)]
        classes: Option<u32>,
        /// Sparse table of dim 1 (wide part).
        #[serde(default = "default_weights_table")]
        weights: String,
        /// Dense 1 x 1 table (bias).
        #[serde(default = "default_bias_table")]
        bias: String,
        /// Sparse table of dim k feeding the MLP.
        #[serde(default = "default_embeddings_table")]
        embeddings: String,
        /// The deep part.
        mlp: MlpConfig,
    },
    /// A plain deep model: the per-field pooled embeddings through the MLP
    /// (no linear part; `hidden = []` is a single linear layer, as in the
    /// ctr26 benchmark).
    Dnn {
        /// Classes of a softmax output (labels `0..classes`); absent: one
        /// probability of the positive label.
        #[serde(default)]
        classes: Option<u32>,
        /// Dense 1 x 1 table (bias).
        #[serde(default = "default_bias_table")]
        bias: String,
        /// Sparse table of dim k feeding the MLP.
        #[serde(default = "default_embeddings_table")]
        embeddings: String,
        /// The deep part.
        mlp: MlpConfig,
    },
    /// Multi-task: shared embeddings, an optional shared bottom MLP, one
    /// tower per task; the loss is the weighted sum of the tasks' mean
    /// binary cross-entropies. Data lines carry one label per task,
    /// comma-separated (`1,0 ...`).
    Multitask {
        /// Sparse table of dim k shared by every task.
        #[serde(default = "default_embeddings_table")]
        embeddings: String,
        /// The tasks, in the order of the labels in the data.
        tasks: Vec<TaskConfig>,
        /// Shared bottom layers (`hidden` only; no output layer), optional.
        #[serde(default)]
        shared: Option<MlpConfig>,
        /// Each task's tower; its tables are named `{name}.{task}.*`, plus a
        /// `{name}.{task}.bias` output bias.
        tower: MlpConfig,
        /// MMoE instead of a shared bottom: expert MLPs over the embeddings,
        /// mixed per task by a softmax gate (`{tower.name}.{task}.gate`).
        #[serde(default)]
        experts: Option<ExpertsConfig>,
        /// Learned task vectors fed to the shared bottom (needs `shared`).
        #[serde(default)]
        task_embedding: Option<TaskEmbeddingConfig>,
        /// Cross-attention among the tasks' representations before the
        /// towers.
        #[serde(default)]
        cross_attention: Option<CrossAttentionConfig>,
    },
    /// A convolutional residual network over images (`format = "pixels"`),
    /// with a softmax over `classes`; see [`ResnetConfig`].
    Resnet(ResnetConfig),
    /// An Inception network over images (`format = "pixels"`), with a
    /// softmax over `classes`; see [`InceptionConfig`].
    Inception(InceptionConfig),
}

/// The experts of a multi-gate mixture-of-experts model.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpertsConfig {
    /// Number of experts.
    pub count: u32,
    /// Each expert's layers (`hidden` only); tables `{name}.{e}.*`.
    pub mlp: MlpConfig,
}

/// One task of a multi-task model.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskConfig {
    /// Task name (used in table names and reports).
    pub name: String,
    /// Weight of the task's loss in the joint loss.
    #[serde(default = "default_task_weight")]
    pub weight: f32,
    /// Classes of the task's softmax head (its label is then a class
    /// index `0..classes`); absent: one probability of a 0/1 label.
    #[serde(default)]
    pub classes: Option<u32>,
}

fn default_task_weight() -> f32 {
    1.0
}

fn default_weights_table() -> String {
    "weights".into()
}
fn default_bias_table() -> String {
    "bias".into()
}
fn default_embeddings_table() -> String {
    "embeddings".into()
}

impl ModelConfig {
    /// The tasks: one unnamed (`label`) task for single-task models.
    pub fn tasks(&self) -> Vec<TaskConfig> {
        match self {
            ModelConfig::Multitask { tasks, .. } => tasks.clone(),
            _ => vec![TaskConfig {
                name: "label".into(),
                weight: 1.0,
                classes: self.declared_classes(),
            }],
        }
    }

    /// Classes of each task's head, in task order (1: a binary task).
    pub fn task_classes(&self) -> Vec<u32> {
        match self {
            ModelConfig::Multitask { tasks, .. } => {
                tasks.iter().map(|t| t.classes.unwrap_or(1)).collect()
            }
            _ => vec![self.classes()],
        }
    }

    /// Whether some head is a softmax over classes.
    pub fn has_classes(&self) -> bool {
        self.task_classes().iter().any(|&c| c > 1)
    }

    /// The model's `kind` as written in the job file.
    pub fn kind_name(&self) -> &'static str {
        match self {
            ModelConfig::Multitask { .. } => "multitask",
            ModelConfig::Lr { .. } => "lr",
            ModelConfig::Fm { .. } => "fm",
            ModelConfig::Deepfm { .. } => "deepfm",
            ModelConfig::WideDeep { .. } => "wide_deep",
            ModelConfig::Dnn { .. } => "dnn",
            ModelConfig::Resnet(_) => "resnet",
            ModelConfig::Inception(_) => "inception",
        }
    }

    /// The image model's layers over images of `channels` channels, for
    /// the image models.
    pub fn conv_net(&self, channels: u32) -> Option<ConvNet> {
        match self {
            ModelConfig::Resnet(c) => Some(ConvNet::resnet(c, channels)),
            ModelConfig::Inception(c) => Some(ConvNet::inception(c, channels)),
            _ => None,
        }
    }

    /// Whether the model reads images (`format = "pixels"`).
    pub fn reads_images(&self) -> bool {
        matches!(self, ModelConfig::Resnet(_) | ModelConfig::Inception(_))
    }

    /// Classes of a multi-class model's softmax; 1 for the binary models
    /// (one probability per task).
    pub fn classes(&self) -> u32 {
        match self {
            ModelConfig::Resnet(c) => c.classes,
            ModelConfig::Inception(c) => c.classes,
            _ => self.declared_classes().unwrap_or(1),
        }
    }

    /// The `classes` a single-task model sets (`None`: binary).
    pub(super) fn declared_classes(&self) -> Option<u32> {
        match self {
            ModelConfig::Lr { classes, .. }
            | ModelConfig::Fm { classes, .. }
            | ModelConfig::Deepfm { classes, .. }
            | ModelConfig::WideDeep { classes, .. }
            | ModelConfig::Dnn { classes, .. } => *classes,
            _ => None,
        }
    }

    /// The declared bias table of single-task models (multi-task models
    /// generate one per task).
    pub fn bias_table(&self) -> Option<&str> {
        match self {
            ModelConfig::Lr { bias, .. }
            | ModelConfig::Fm { bias, .. }
            | ModelConfig::Deepfm { bias, .. }
            | ModelConfig::WideDeep { bias, .. }
            | ModelConfig::Dnn { bias, .. } => Some(bias),
            _ => None,
        }
    }

    /// The linear part's sparse `weights` table, for models that have one.
    pub fn weights_table(&self) -> Option<&str> {
        match self {
            ModelConfig::Lr { weights, .. }
            | ModelConfig::Fm { weights, .. }
            | ModelConfig::Deepfm { weights, .. }
            | ModelConfig::WideDeep { weights, .. } => Some(weights),
            _ => None,
        }
    }

    /// The embeddings table, for models that have one.
    pub fn embeddings_table(&self) -> Option<&str> {
        match self {
            ModelConfig::Lr { .. } | ModelConfig::Resnet(_) | ModelConfig::Inception(_) => None,
            ModelConfig::Fm { embeddings, .. }
            | ModelConfig::Deepfm { embeddings, .. }
            | ModelConfig::WideDeep { embeddings, .. }
            | ModelConfig::Dnn { embeddings, .. }
            | ModelConfig::Multitask { embeddings, .. } => Some(embeddings),
        }
    }

    /// Every MLP of the model with its key in the job file.
    pub(super) fn mlps(&self) -> Vec<(&'static str, &MlpConfig)> {
        match self {
            ModelConfig::Multitask {
                shared,
                tower,
                experts,
                ..
            } => shared
                .iter()
                .map(|m| ("shared", m))
                .chain(experts.iter().map(|e| ("experts.mlp", &e.mlp)))
                .chain([("tower", tower)])
                .collect(),
            _ => self.mlp().map(|m| ("mlp", m)).into_iter().collect(),
        }
    }

    /// The generated dense tables of the model's MLPs, for `fields x k`
    /// embedding inputs, in the order the model reads them: shared bottom,
    /// then per task its tower and its output bias. For the image models,
    /// `input` is the images' channels and the tables are the layers'.
    pub fn generated_table_specs(&self, input: u32, seed: u64) -> Vec<TableSpec> {
        if let Some(net) = self.conv_net(input) {
            return net.table_specs(seed);
        }
        match self {
            ModelConfig::Multitask {
                tasks,
                shared,
                tower,
                experts,
                task_embedding,
                cross_attention,
                ..
            } => {
                let mut specs = Vec::new();
                let mut width = input;
                if let Some(shared) = shared {
                    let shared_input = input + task_embedding.map_or(0, |te| te.dim);
                    specs.extend(shared.layer_specs(&shared.name, shared_input, seed, None));
                    width = shared.hidden.last().copied().unwrap_or(input);
                }
                if let Some(te) = task_embedding {
                    specs.push(te.table_spec(tower, tasks.len(), seed));
                }
                if let Some(experts) = experts {
                    for e in 0..experts.count {
                        let prefix = format!("{}.{e}", experts.mlp.name);
                        specs.extend(experts.mlp.layer_specs(&prefix, input, seed, None));
                    }
                    width = experts.mlp.hidden.last().copied().unwrap_or(input);
                }
                // Cross-attention sits between each tower's hidden layers
                // and its output layer, which reads `last + dim` values.
                let last = tower.hidden.last().copied().unwrap_or(width);
                if let Some(ca) = cross_attention {
                    specs.extend(ca.table_specs(tower, tasks, last, seed));
                }
                for task in tasks {
                    let prefix = format!("{}.{}", tower.name, task.name);
                    let classes = task.classes.unwrap_or(1);
                    let read = last + cross_attention.map_or(0, |ca| ca.dim);
                    specs.extend(tower.layer_specs(&prefix, width, seed, None));
                    specs.push(tower.output_spec(&prefix, read, classes, seed));
                    specs.push(dense_spec(
                        format!("{prefix}.bias"),
                        1,
                        classes,
                        InitializerSpec::Zeros,
                        tower.optimizer,
                        seed,
                    ));
                    if let Some(experts) = experts {
                        // Zeros: every task starts with uniform gates.
                        specs.push(dense_spec(
                            format!("{prefix}.gate"),
                            input,
                            experts.count,
                            InitializerSpec::Zeros,
                            tower.optimizer,
                            seed,
                        ));
                    }
                }
                specs
            }
            _ => self
                .mlp()
                .map(|m| m.table_specs(input, self.classes(), seed))
                .unwrap_or_default(),
        }
    }

    /// A multi-class FM or DeepFM's weights of the factor dimensions per
    /// class, the dense table `{embeddings}.classes` (`k x C`): class `c`'s
    /// pairwise term is `sum_{i<j} <v_i, diag(p_c) v_j> x_i x_j`, where a
    /// binary FM has one term with `p = 1`. (A single shared term would add
    /// the same score to every class, which a softmax ignores.) Normal(0,
    /// 1), so the classes start apart; trained with the embeddings table's
    /// optimizer. `None` for other models and for binary ones.
    pub fn fm_classes_spec(
        &self,
        tables: &BTreeMap<String, TableConfig>,
        seed: u64,
    ) -> Option<TableSpec> {
        let (ModelConfig::Fm {
            classes: Some(classes),
            embeddings,
            ..
        }
        | ModelConfig::Deepfm {
            classes: Some(classes),
            embeddings,
            ..
        }) = self
        else {
            return None;
        };
        let table = tables.get(embeddings)?;
        (*classes > 1).then(|| {
            dense_spec(
                format!("{embeddings}.classes"),
                table.dim,
                *classes,
                InitializerSpec::Normal {
                    mean: 0.0,
                    std: 1.0,
                },
                table.optimizer,
                seed,
            )
        })
    }

    /// The single-task models' MLP, for models that have one.
    pub fn mlp(&self) -> Option<&MlpConfig> {
        match self {
            ModelConfig::Deepfm { mlp, .. }
            | ModelConfig::WideDeep { mlp, .. }
            | ModelConfig::Dnn { mlp, .. } => Some(mlp),
            _ => None,
        }
    }
}
