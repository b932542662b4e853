//! The job file: one TOML document that drives `ps-worker local`, separate
//! `ps-worker train` processes and, later, Kubernetes jobs.
//!
//! Parsing is strict (unknown keys are errors) and every error names the
//! offending key and its line, so a typo never silently falls back to a
//! default. Relative data paths are resolved against the job file's folder.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::routing::{fnv1a64, mix64};
use crate::table::{InitializerSpec, OptimizerSpec, TableKind, TableSpec};

/// A job file that could not be used, with the key and line at fault.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}{}{message}", line.map(|l| format!("line {l}: ")).unwrap_or_default(), key.as_ref().map(|k| format!("key `{k}`: ")).unwrap_or_default())]
pub struct ConfigError {
    /// 1-based line of the offending key, when known.
    pub line: Option<usize>,
    /// Dotted path of the offending key, when known.
    pub key: Option<String>,
    /// What is wrong.
    pub message: String,
}

/// A complete, validated job.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobConfig {
    /// Where the examples come from.
    pub data: DataConfig,
    /// Which model to train and which tables it uses.
    pub model: ModelConfig,
    /// Batch size, epochs, seed and client settings.
    #[serde(default)]
    pub train: TrainConfig,
    /// How much travels between workers and servers.
    #[serde(default)]
    pub communication: CommunicationConfig,
    /// Tables by name.
    pub tables: BTreeMap<String, TableConfig>,
}

/// How values travel on the wire (`pull_values`, `push_values`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WireValues {
    /// 4 bytes per value, exact.
    #[default]
    F32,
    /// IEEE half: 2 bytes, 11-bit mantissa, saturates at +-65504.
    F16,
    /// bfloat16: 2 bytes, 8-bit mantissa, the f32 range.
    Bf16,
}

impl CommunicationConfig {
    /// Checks the ranges; errors are (key, message).
    pub fn validate(&self) -> Result<(), (String, String)> {
        if self
            .significance_threshold
            .is_some_and(|v| !(v.is_finite() && v > 0.0))
        {
            return Err(("significance_threshold".into(), "must be > 0".into()));
        }
        if self
            .dense_top_k
            .is_some_and(|v| !(v.is_finite() && v > 0.0 && v <= 1.0))
        {
            return Err(("dense_top_k".into(), "must be a fraction in (0, 1]".into()));
        }
        Ok(())
    }
}

impl From<WireValues> for crate::pb::ValueEncoding {
    fn from(v: WireValues) -> Self {
        match v {
            WireValues::F32 => crate::pb::ValueEncoding::F32,
            WireValues::F16 => crate::pb::ValueEncoding::F16,
            WireValues::Bf16 => crate::pb::ValueEncoding::Bf16,
        }
    }
}

/// Traffic reduction between a worker and the servers (`[communication]`);
/// every option is off by default. Keys are always de-duplicated per batch.
#[derive(Debug, Clone, Copy, PartialEq, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CommunicationConfig {
    /// Encoding of pulled weights (servers keep f32).
    pub pull_values: WireValues,
    /// Encoding of pushed gradients.
    pub push_values: WireValues,
    /// Send keys sorted, delta + varint encoded.
    pub delta_keys: bool,
    /// Sparse tables: push a row only once its accumulated gradient has a
    /// component of magnitude >= this; the rest stays on the worker and is
    /// added to the row's next gradient.
    pub significance_threshold: Option<f32>,
    /// Dense tables: push only this fraction (0, 1] of each table's rows,
    /// those whose accumulated gradient has the largest L2 norm; the rest
    /// is kept and added to the next step's (error feedback).
    pub dense_top_k: Option<f32>,
}

/// Input files.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// File format of `train` and `validation`.
    #[serde(default)]
    pub format: DataFormat,
    /// Training examples: a path (relative to the job file) or `builtin:NAME`.
    pub train: DataSource,
    /// Held-out examples evaluated after training.
    #[serde(default)]
    pub validation: Option<DataSource>,
    /// Fields per example for the models' per-field pooling. libsvm has no
    /// fields: every feature is in field 0 and the deep models see the sum of
    /// an example's embeddings.
    #[serde(default = "default_fields")]
    pub fields: u32,
    /// What a malformed line does: `fail` (stop with its file and line) or
    /// `skip` (log it with its line number, count it, go on).
    #[serde(default)]
    pub on_bad_line: OnBadLine,
    /// Criteo only: how the 13 integer columns become features.
    #[serde(default)]
    pub integers: IntegerFeatures,
}

/// How Criteo's integer columns become features.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IntegerFeatures {
    /// One id per (column, bucket), buckets `v` for `v <= 2` and
    /// `floor(ln(v)^2)` above, value 1.
    #[default]
    Bucketize,
    /// One id per column with value `ln(1 + v)` (negative values as 0): a
    /// dense input scaling that column's weight and embedding.
    Log,
}

/// The policy for malformed input lines.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnBadLine {
    /// Stop with an error naming the file and line.
    #[default]
    Fail,
    /// Log and count the line, then go on.
    Skip,
}

fn default_fields() -> u32 {
    1
}

/// Supported input formats.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataFormat {
    /// `label idx:value idx:value ...` with labels in {-1, 0, 1} (+1 positive).
    #[default]
    Libsvm,
    /// `label field:idx:value ...`; fields must be below `data.fields`.
    Libffm,
    /// Criteo's TSV: label, 13 integer columns, 26 categorical (hex)
    /// columns, empty fields allowed; 39 fields.
    Criteo,
}

/// Where a data file comes from.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(from = "String")]
pub enum DataSource {
    /// A file on disk (resolved against the job file's folder on load).
    File(PathBuf),
    /// A data set compiled into the worker binary, e.g. `builtin:a9a/train`.
    Builtin(String),
}

impl From<String> for DataSource {
    fn from(s: String) -> Self {
        match s.strip_prefix("builtin:") {
            Some(name) => DataSource::Builtin(name.to_string()),
            None => DataSource::File(PathBuf::from(s)),
        }
    }
}

impl std::fmt::Display for DataSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DataSource::File(p) => write!(f, "{}", p.display()),
            DataSource::Builtin(name) => write!(f, "builtin:{name}"),
        }
    }
}

/// The model and the tables it reads.
///
/// Every model has a sparse `weights` table (dim 1, the linear part) and a
/// dense `bias` table (1 x 1). FM, DeepFM and Wide&Deep add a sparse
/// `embeddings` table (dim k); DeepFM and Wide&Deep add an MLP whose weights
/// are dense tables generated from `[model.mlp]` (see [`MlpConfig`]).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ModelConfig {
    /// Sparse logistic regression: `p = sigmoid(bias + sum_j w[j] * x_j)`.
    Lr {
        /// Sparse table of dim 1 holding one weight per feature id.
        #[serde(default = "default_weights_table")]
        weights: String,
        /// Dense table of 1 row x dim 1 holding the bias.
        #[serde(default = "default_bias_table")]
        bias: String,
    },
    /// Factorization machine: LR plus `sum_{i<j} <v_i, v_j> x_i x_j`.
    Fm {
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
    },
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
}

fn default_task_weight() -> f32 {
    1.0
}

/// The MLP of DeepFM and Wide&Deep. Its weights are dense tables the job
/// creates itself, named `{name}.{i}.w` (`in x out`), `{name}.{i}.b`
/// (`1 x out`), `{name}.{i}.bn` and `{name}.{i}.bn_stats` with batch norm,
/// and `{name}.out.w` (`last x 1`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MlpConfig {
    /// Prefix of the generated table names.
    #[serde(default = "default_mlp_name")]
    pub name: String,
    /// Widths of the hidden layers (ReLU), e.g. `[64, 32]`.
    pub hidden: Vec<u32>,
    /// Dropout rate after each hidden layer during training, in `[0, 1)`.
    #[serde(default)]
    pub dropout: f32,
    /// Batch normalization before each hidden layer's activation; running
    /// statistics live on the servers.
    #[serde(default)]
    pub batch_norm: bool,
    /// Momentum of the running batch-norm statistics.
    #[serde(default = "default_bn_momentum")]
    pub bn_momentum: f32,
    /// Add the layer's input to its output when a layer keeps the width.
    #[serde(default = "default_true")]
    pub residual: bool,
    /// Server-side optimizer of every MLP table.
    pub optimizer: OptimizerSpec,
    /// Initializer of the weight matrices (default: He normal,
    /// `std = sqrt(2 / fan_in)`); biases start at zero.
    #[serde(default)]
    pub initializer: Option<InitializerSpec>,
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
fn default_mlp_name() -> String {
    "mlp".into()
}
fn default_bn_momentum() -> f32 {
    0.9
}
fn default_true() -> bool {
    true
}

/// Training-loop settings.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Examples per step per worker.
    pub batch_size: usize,
    /// Passes over each worker's shard of the training data.
    pub epochs: usize,
    /// Seed of table initializers (unless a table sets its own) and of shuffling.
    pub seed: u64,
    /// Pushes a worker may have in flight before the next one waits.
    pub max_pushes_in_flight: usize,
    /// A progress line every this many steps (0: never).
    pub log_every: usize,
    /// Where the worker computes: `cpu`, `cuda` or `cuda:N`.
    pub device: Device,
    /// Stop when validation AUC has not improved for this many epochs
    /// (needs `data.validation`; 0: never stop early).
    pub early_stopping_patience: usize,
    /// Write a checkpoint of this name whenever validation AUC improves
    /// (needs `data.validation` and servers started with `--checkpoint-dir`).
    pub best_checkpoint: Option<String>,
    /// Clip the dense tables' gradients to this global L2 norm.
    pub clip_norm: Option<f32>,
    /// Clip each sparse row's gradient to this L2 norm.
    pub clip_row_norm: Option<f32>,
    /// Tables kept fixed: read, never updated (e.g. after `init_from`).
    pub freeze: Vec<String>,
    /// Transfer learning: a checkpoint directory (`DIR/NAME`, relative to the
    /// job file) whose weights initialize `init_tables` before training.
    pub init_from: Option<PathBuf>,
    /// Tables loaded from `init_from` (default: every table of the job the
    /// checkpoint holds); the others start fresh.
    pub init_tables: Vec<String>,
    /// Distinguishes runs of the same job on long-lived servers: the
    /// job-wide signals between worker processes (init_from loaded, early
    /// stop) are per run. `ps-worker train --run-id` sets it; `local` runs
    /// use a fresh one each time.
    pub run_id: Option<String>,
    /// Learning-rate schedule: a factor on every table optimizer's rate,
    /// sent with each push (batch-norm statistics are never scaled).
    pub lr_schedule: LrSchedule,
    /// How workers see each other's updates (see [`Consistency`]).
    pub consistency: Consistency,
    /// `ssp` only: steps the fastest worker may run ahead of the slowest
    /// live one (0 is bulk-synchronous).
    pub staleness: Option<u32>,
    /// Under ssp, bsp and hybrid: seconds a worker may stay silent before
    /// the others stop waiting for it (it rejoins when it reports again).
    pub worker_lease_seconds: f64,
    /// Every this many steps (and at each epoch's end) a worker records its
    /// data position on the servers, once its pushes are acknowledged; a
    /// worker restarted with the same rank resumes there. 0 turns it off.
    pub progress_every_steps: u64,
}

/// The consistency model of a job (`train.consistency`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Consistency {
    /// Every worker pulls and pushes at its own pace; the pull of step t+1
    /// overlaps the compute of step t.
    #[default]
    Async,
    /// Stale synchronous parallel: a worker's pull for step s waits until
    /// every live worker has finished step s - staleness - 1 (its pushes
    /// acknowledged).
    Ssp,
    /// Bulk synchronous: every worker's step s reads exactly the updates of
    /// steps before s, as one worker on the union of the batches would.
    Bsp,
    /// Dense tables bulk-synchronous, sparse tables asynchronous (Persia's
    /// hybrid): sparse rows are pulled ahead, dense tables in lockstep.
    Hybrid,
}

impl Consistency {
    /// The name used in job files.
    pub fn name(self) -> &'static str {
        match self {
            Consistency::Async => "async",
            Consistency::Ssp => "ssp",
            Consistency::Bsp => "bsp",
            Consistency::Hybrid => "hybrid",
        }
    }
}

/// A learning-rate schedule over a worker's steps (`[train.lr_schedule]`).
/// Every kind can start with a linear warm-up from 0 over `warmup_steps`.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum LrSchedule {
    /// Factor 1 (after the warm-up).
    Constant {
        /// Steps of linear warm-up.
        #[serde(default)]
        warmup_steps: u64,
    },
    /// Factor `gamma^(step / every)`.
    Step {
        /// Steps of linear warm-up.
        #[serde(default)]
        warmup_steps: u64,
        /// Steps between decays.
        every: u64,
        /// Decay factor in (0, 1].
        gamma: f32,
    },
    /// Cosine decay from 1 to `min_scale` over `decay_steps`, then flat.
    Cosine {
        /// Steps of linear warm-up.
        #[serde(default)]
        warmup_steps: u64,
        /// Steps from 1 down to `min_scale` (after the warm-up).
        decay_steps: u64,
        /// Final factor in [0, 1].
        #[serde(default)]
        min_scale: f32,
    },
}

impl Default for LrSchedule {
    fn default() -> Self {
        LrSchedule::Constant { warmup_steps: 0 }
    }
}

impl LrSchedule {
    /// The factor at 0-based `step`.
    pub fn scale(&self, step: u64) -> f32 {
        let warmup = match *self {
            LrSchedule::Constant { warmup_steps }
            | LrSchedule::Step { warmup_steps, .. }
            | LrSchedule::Cosine { warmup_steps, .. } => warmup_steps,
        };
        if step < warmup {
            return (step + 1) as f32 / warmup as f32;
        }
        let t = step - warmup;
        match *self {
            LrSchedule::Constant { .. } => 1.0,
            LrSchedule::Step { every, gamma, .. } => gamma.powf((t / every.max(1)) as f32),
            LrSchedule::Cosine {
                decay_steps,
                min_scale,
                ..
            } => {
                let progress = (t as f64 / decay_steps.max(1) as f64).min(1.0);
                let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
                min_scale + (1.0 - min_scale) * cosine as f32
            }
        }
    }

    /// Whether the schedule is the constant 1 (nothing to send).
    pub fn is_constant(&self) -> bool {
        *self == LrSchedule::Constant { warmup_steps: 0 }
    }

    /// The factor a push at `step` carries: `None` for the constant 1.
    pub fn push_scale(&self, step: u64) -> Option<f32> {
        (!self.is_constant()).then(|| self.scale(step))
    }

    fn validate(&self) -> Result<(), String> {
        match *self {
            LrSchedule::Constant { .. } => Ok(()),
            LrSchedule::Step { every, gamma, .. } => {
                if every == 0 {
                    Err("step schedule needs every >= 1".into())
                } else if !(gamma > 0.0 && gamma <= 1.0) {
                    Err(format!("step schedule needs gamma in (0, 1], got {gamma}"))
                } else {
                    Ok(())
                }
            }
            LrSchedule::Cosine {
                decay_steps,
                min_scale,
                ..
            } => {
                if decay_steps == 0 {
                    Err("cosine schedule needs decay_steps >= 1".into())
                } else if !(0.0..=1.0).contains(&min_scale) {
                    Err(format!(
                        "cosine schedule needs min_scale in [0, 1], got {min_scale}"
                    ))
                } else {
                    Ok(())
                }
            }
        }
    }
}

/// The device a worker computes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(try_from = "String")]
pub enum Device {
    /// The host CPU.
    #[default]
    Cpu,
    /// A CUDA device by ordinal.
    Cuda(usize),
}

impl TryFrom<String> for Device {
    type Error = String;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl std::str::FromStr for Device {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(|| format!("unknown device {s:?} (expected cpu, cuda or cuda:N)")),
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            batch_size: 128,
            epochs: 1,
            seed: 1,
            max_pushes_in_flight: 4,
            log_every: 100,
            device: Device::Cpu,
            early_stopping_patience: 0,
            best_checkpoint: None,
            clip_norm: None,
            clip_row_norm: None,
            freeze: Vec::new(),
            init_from: None,
            init_tables: Vec::new(),
            run_id: None,
            lr_schedule: LrSchedule::default(),
            consistency: Consistency::Async,
            staleness: None,
            worker_lease_seconds: 30.0,
            progress_every_steps: 100,
        }
    }
}

/// One table as written in the job file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableConfig {
    /// `sparse` or `dense`.
    pub kind: TableKindConfig,
    /// Floats per row.
    pub dim: u32,
    /// Dense only: number of rows.
    #[serde(default)]
    pub rows: Option<u64>,
    /// Dense only: rows per routing block (default: all rows in one block).
    #[serde(default)]
    pub block_rows: Option<u32>,
    /// Row initializer.
    pub initializer: InitializerSpec,
    /// Server-side optimizer.
    pub optimizer: OptimizerSpec,
    /// Initializer seed (default: derived from `train.seed` and the table name).
    #[serde(default)]
    pub seed: Option<u64>,
}

/// Table kind as written in the job file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TableKindConfig {
    /// Rows created on touch.
    Sparse,
    /// A fixed `rows x dim` tensor.
    Dense,
}

impl JobConfig {
    /// Parses and validates a job file's text. Relative file paths are
    /// resolved against `base_dir`.
    pub fn from_toml(src: &str, base_dir: &Path) -> Result<Self, ConfigError> {
        let mut job: JobConfig = toml::from_str(src).map_err(|e| ConfigError {
            line: e.span().map(|s| line_of_offset(src, s.start)),
            key: e.span().and_then(|s| key_at_offset(src, s.start)),
            message: e.message().trim().to_string(),
        })?;
        job.validate().map_err(|(key, message)| ConfigError {
            line: line_of_key(src, &key),
            key: Some(key),
            message,
        })?;
        if let Some(dir) = job.train.init_from.as_mut()
            && dir.is_relative()
        {
            *dir = base_dir.join(&*dir);
        }
        for source in [Some(&mut job.data.train), job.data.validation.as_mut()]
            .into_iter()
            .flatten()
        {
            if let DataSource::File(path) = source
                && path.is_relative()
            {
                *path = base_dir.join(&*path);
            }
        }
        Ok(job)
    }

    /// The table specs the servers are asked to create: the job's
    /// `[tables]` and the model's generated MLP tables.
    pub fn table_specs(&self) -> Vec<TableSpec> {
        let mut specs = self.declared_table_specs();
        if let Some(embeddings) = self.model.embeddings_table() {
            let dim = self.tables.get(embeddings).map_or(0, |t| t.dim);
            specs.extend(
                self.model
                    .generated_table_specs(self.data.fields * dim, self.train.seed),
            );
        }
        specs
    }

    fn declared_table_specs(&self) -> Vec<TableSpec> {
        self.tables
            .iter()
            .map(|(name, t)| TableSpec {
                name: name.clone(),
                kind: match t.kind {
                    TableKindConfig::Sparse => TableKind::Sparse,
                    TableKindConfig::Dense => {
                        let rows = t.rows.unwrap_or(0);
                        TableKind::Dense {
                            rows,
                            block_rows: t
                                .block_rows
                                .unwrap_or(rows.min(u64::from(u32::MAX)) as u32),
                        }
                    }
                },
                dim: t.dim,
                initializer: t.initializer,
                optimizer: t.optimizer,
                seed: t
                    .seed
                    .unwrap_or_else(|| mix64(self.train.seed ^ fnv1a64(name.as_bytes()))),
            })
            .collect()
    }

    /// Checks the rules serde cannot express; errors are (dotted key, message).
    fn validate(&self) -> Result<(), (String, String)> {
        let t = &self.train;
        if t.batch_size == 0 {
            return Err(("train.batch_size".into(), "must be >= 1".into()));
        }
        if t.epochs == 0 {
            return Err(("train.epochs".into(), "must be >= 1".into()));
        }
        if t.max_pushes_in_flight == 0 {
            return Err(("train.max_pushes_in_flight".into(), "must be >= 1".into()));
        }
        if self.tables.is_empty() {
            return Err(("tables".into(), "at least one table is required".into()));
        }
        for (name, table) in &self.tables {
            let key = |field: &str| format!("tables.{name}.{field}");
            match table.kind {
                TableKindConfig::Sparse => {
                    for (field, set) in [
                        ("rows", table.rows.is_some()),
                        ("block_rows", table.block_rows.is_some()),
                    ] {
                        if set {
                            return Err((key(field), "only dense tables have this key".into()));
                        }
                    }
                }
                TableKindConfig::Dense => {
                    if table.rows.is_none() {
                        return Err((key("kind"), "a dense table needs `rows`".into()));
                    }
                }
            }
        }
        for (key, value) in [
            ("clip_norm", t.clip_norm),
            ("clip_row_norm", t.clip_row_norm),
        ] {
            if value.is_some_and(|v| !(v.is_finite() && v > 0.0)) {
                return Err((format!("train.{key}"), "must be > 0".into()));
            }
        }
        t.lr_schedule
            .validate()
            .map_err(|e| ("train.lr_schedule".to_string(), e))?;
        self.communication
            .validate()
            .map_err(|(key, msg)| (format!("communication.{key}"), msg))?;
        match (t.consistency, t.staleness) {
            (Consistency::Ssp, None) => {
                return Err((
                    "train.staleness".into(),
                    "consistency = \"ssp\" needs staleness = K (steps a worker may run ahead)"
                        .into(),
                ));
            }
            (Consistency::Ssp, Some(_)) | (_, None) => {}
            (other, Some(_)) => {
                return Err((
                    "train.staleness".into(),
                    format!(
                        "only consistency = \"ssp\" takes a staleness (this job is {:?})",
                        other.name()
                    ),
                ));
            }
        }
        if !(t.worker_lease_seconds.is_finite()
            && t.worker_lease_seconds >= 0.001
            && t.worker_lease_seconds <= 86_400.0)
        {
            return Err((
                "train.worker_lease_seconds".into(),
                "must be between 0.001 and 86400".into(),
            ));
        }
        if let Some(name) = &t.best_checkpoint {
            if self.data.validation.is_none() {
                return Err((
                    "train.best_checkpoint".into(),
                    "needs data.validation to decide which epoch is best".into(),
                ));
            }
            crate::names::validate_checkpoint_name(name).map_err(|_| {
                (
                    "train.best_checkpoint".into(),
                    format!(
                        "{} {}",
                        crate::names::quoted(name),
                        crate::names::CHECKPOINT_NAME_RULE
                    ),
                )
            })?;
        }
        if t.early_stopping_patience > 0 && self.data.validation.is_none() {
            return Err((
                "train.early_stopping_patience".into(),
                "needs data.validation".into(),
            ));
        }
        if self.data.format == DataFormat::Criteo && self.model.tasks().len() > 1 {
            return Err((
                "data.format".into(),
                "Criteo data has one label; a multitask model needs libsvm or libffm lines with comma-separated labels".into(),
            ));
        }
        if self.data.format == DataFormat::Criteo && self.data.fields != 39 {
            return Err((
                "data.fields".into(),
                "Criteo data has 39 fields (13 integer + 26 categorical): set fields = 39".into(),
            ));
        }
        if self.data.fields == 0 {
            return Err(("data.fields".into(), "must be >= 1".into()));
        }
        for spec in self.declared_table_specs() {
            if let Err(e) = spec.validate() {
                let msg = e.to_string();
                let field = ["dim", "rows", "block_rows", "initializer", "optimizer"]
                    .into_iter()
                    .find(|f| msg.contains(f))
                    .unwrap_or("kind");
                return Err((format!("tables.{}.{field}", spec.name), msg));
            }
        }
        self.model.validate(&self.tables)?;
        let names: Vec<String> = self.table_specs().into_iter().map(|s| s.name).collect();
        for (key, list) in [("freeze", &t.freeze), ("init_tables", &t.init_tables)] {
            if let Some(unknown) = list.iter().find(|f| !names.contains(f)) {
                return Err((
                    format!("train.{key}"),
                    format!("no table named {unknown:?} (tables: {})", names.join(", ")),
                ));
            }
        }
        let mut sorted = names.clone();
        sorted.sort();
        if let Some(pair) = sorted.windows(2).find(|w| w[0] == w[1]) {
            return Err((
                "model".into(),
                format!(
                    "two generated tables are both named '{}': give the model's MLPs distinct `name`s",
                    pair[0]
                ),
            ));
        }
        if !t.init_tables.is_empty() && t.init_from.is_none() {
            return Err(("train.init_tables".into(), "needs train.init_from".into()));
        }
        Ok(())
    }
}

impl ModelConfig {
    /// The tasks: one unnamed (`label`) task for single-task models.
    pub fn tasks(&self) -> Vec<TaskConfig> {
        match self {
            ModelConfig::Multitask { tasks, .. } => tasks.clone(),
            _ => vec![TaskConfig {
                name: "label".into(),
                weight: 1.0,
            }],
        }
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
            ModelConfig::Multitask { .. } => None,
        }
    }

    /// The linear part's sparse `weights` table, for models that have one.
    pub fn weights_table(&self) -> Option<&str> {
        match self {
            ModelConfig::Lr { weights, .. }
            | ModelConfig::Fm { weights, .. }
            | ModelConfig::Deepfm { weights, .. }
            | ModelConfig::WideDeep { weights, .. } => Some(weights),
            ModelConfig::Dnn { .. } | ModelConfig::Multitask { .. } => None,
        }
    }

    /// The embeddings table, for models that have one.
    pub fn embeddings_table(&self) -> Option<&str> {
        match self {
            ModelConfig::Lr { .. } => None,
            ModelConfig::Fm { embeddings, .. }
            | ModelConfig::Deepfm { embeddings, .. }
            | ModelConfig::WideDeep { embeddings, .. }
            | ModelConfig::Dnn { embeddings, .. }
            | ModelConfig::Multitask { embeddings, .. } => Some(embeddings),
        }
    }

    /// Every MLP of the model with its key in the job file.
    fn mlps(&self) -> Vec<(&'static str, &MlpConfig)> {
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
    /// then per task its tower and its output bias.
    pub fn generated_table_specs(&self, input: u32, seed: u64) -> Vec<TableSpec> {
        match self {
            ModelConfig::Multitask {
                tasks,
                shared,
                tower,
                experts,
                ..
            } => {
                let mut specs = Vec::new();
                let mut width = input;
                if let Some(shared) = shared {
                    specs.extend(shared.layer_specs(&shared.name, input, seed, false));
                    width = shared.hidden.last().copied().unwrap_or(input);
                }
                if let Some(experts) = experts {
                    for e in 0..experts.count {
                        let prefix = format!("{}.{e}", experts.mlp.name);
                        specs.extend(experts.mlp.layer_specs(&prefix, input, seed, false));
                    }
                    width = experts.mlp.hidden.last().copied().unwrap_or(input);
                }
                for task in tasks {
                    let prefix = format!("{}.{}", tower.name, task.name);
                    specs.extend(tower.layer_specs(&prefix, width, seed, true));
                    specs.push(dense_spec(
                        format!("{prefix}.bias"),
                        1,
                        1,
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
                .map(|m| m.table_specs(input, seed))
                .unwrap_or_default(),
        }
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

    /// Checks that the tables the model reads exist with the shape it needs.
    fn validate(&self, tables: &BTreeMap<String, TableConfig>) -> Result<(), (String, String)> {
        let model = self.kind_name();
        let get = |field: &str, name: &str| {
            tables.get(name).ok_or_else(|| {
                (
                    format!("model.{field}"),
                    format!("table '{name}' is not defined under [tables]"),
                )
            })
        };
        if let Some(weights) = self.weights_table() {
            let w = get("weights", weights)?;
            if w.kind != TableKindConfig::Sparse || w.dim != 1 {
                return Err((
                    format!("tables.{weights}"),
                    format!("the {model} model needs a sparse table with dim = 1"),
                ));
            }
        }
        if let Some(bias) = self.bias_table() {
            let b = get("bias", bias)?;
            if b.kind != TableKindConfig::Dense || b.dim != 1 || b.rows != Some(1) {
                return Err((
                    format!("tables.{bias}"),
                    format!("the {model} model needs a dense table with rows = 1 and dim = 1"),
                ));
            }
        }
        if let ModelConfig::Multitask {
            tasks,
            shared,
            experts,
            ..
        } = self
        {
            if let Some(experts) = experts {
                if shared.is_some() {
                    return Err((
                        "model.experts".into(),
                        "experts (MMoE) replace the shared bottom: set one of shared and experts"
                            .into(),
                    ));
                }
                if experts.count == 0 {
                    return Err(("model.experts.count".into(), "must be >= 1".into()));
                }
                if experts.mlp.hidden.is_empty() {
                    return Err((
                        "model.experts.mlp.hidden".into(),
                        "an expert needs at least one layer".into(),
                    ));
                }
            }
            if tasks.is_empty() {
                return Err(("model.tasks".into(), "needs at least one task".into()));
            }
            for (i, task) in tasks.iter().enumerate() {
                crate::names::validate_table_name(&task.name).map_err(|_| {
                    (
                        "model.tasks".into(),
                        format!(
                            "task {i}: name {} must be 1-128 characters from [A-Za-z0-9_.-]",
                            crate::names::quoted(&task.name)
                        ),
                    )
                })?;
                if !(task.weight.is_finite() && task.weight >= 0.0) {
                    return Err((
                        "model.tasks".into(),
                        format!("task {:?}: weight must be finite and >= 0", task.name),
                    ));
                }
                if tasks[..i].iter().any(|t| t.name == task.name) {
                    return Err((
                        "model.tasks".into(),
                        format!("task {:?} appears twice", task.name),
                    ));
                }
            }
            if shared.as_ref().is_some_and(|s| s.hidden.is_empty()) {
                return Err((
                    "model.shared.hidden".into(),
                    "a shared bottom needs at least one layer".into(),
                ));
            }
        }
        if let Some(name) = self.embeddings_table() {
            let e = get("embeddings", name)?;
            if e.kind != TableKindConfig::Sparse {
                return Err((
                    format!("tables.{name}"),
                    format!("the {model} model needs a sparse embeddings table"),
                ));
            }
        }
        for (key, mlp) in self.mlps() {
            let at = |field: &str| format!("model.{key}.{field}");
            if mlp.hidden.contains(&0) {
                return Err((at("hidden"), "every layer needs a width >= 1".into()));
            }
            if mlp.hidden.is_empty()
                && matches!(
                    self,
                    ModelConfig::Deepfm { .. } | ModelConfig::WideDeep { .. }
                )
            {
                return Err((
                    at("hidden"),
                    format!("the {model} model needs at least one hidden layer"),
                ));
            }
            if let Some(init) = &mlp.initializer {
                init.validate().map_err(|e| (at("initializer"), e))?;
            }
            if !(0.0..1.0).contains(&mlp.dropout) {
                return Err((at("dropout"), "must be in [0, 1)".into()));
            }
            if !(0.0..1.0).contains(&mlp.bn_momentum) {
                return Err((at("bn_momentum"), "must be in [0, 1)".into()));
            }
            if mlp.name.is_empty() {
                return Err((at("name"), "must not be empty".into()));
            }
            mlp.optimizer
                .validate()
                .map_err(|e| (at("optimizer"), e.to_string()))?;
            if let Some(clash) = tables
                .keys()
                .find(|t| t.starts_with(&format!("{}.", mlp.name)))
            {
                return Err((
                    format!("tables.{clash}"),
                    format!(
                        "names starting with '{}.' are reserved for the MLP's generated tables",
                        mlp.name
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// A dense table generated for a model, seeded from the job seed and its name.
fn dense_spec(
    name: String,
    rows: u32,
    dim: u32,
    initializer: InitializerSpec,
    optimizer: OptimizerSpec,
    seed: u64,
) -> TableSpec {
    TableSpec {
        seed: mix64(seed ^ fnv1a64(name.as_bytes())),
        name,
        // Blocks of 16 rows spread a layer over the shards.
        kind: TableKind::Dense {
            rows: u64::from(rows),
            block_rows: rows.clamp(1, 16),
        },
        dim,
        initializer,
        optimizer,
    }
}

impl MlpConfig {
    /// The dense tables of an MLP over `input` features, in layer order,
    /// named after `self.name`, with the output layer.
    pub fn table_specs(&self, input: u32, seed: u64) -> Vec<TableSpec> {
        self.layer_specs(&self.name, input, seed, true)
    }

    /// The dense tables of the layers named `{prefix}.{i}.*`, and with
    /// `output` the output layer `{prefix}.out.w` (`last x 1`).
    pub fn layer_specs(&self, prefix: &str, input: u32, seed: u64, output: bool) -> Vec<TableSpec> {
        let dense = |name: String, rows: u32, dim: u32, initializer, optimizer| {
            dense_spec(name, rows, dim, initializer, optimizer, seed)
        };
        let stats_optimizer = OptimizerSpec::Sgd { lr: 1.0 };
        let mut specs = Vec::new();
        let mut width = input;
        for (i, &out) in self.hidden.iter().enumerate() {
            let name = prefix;
            specs.push(dense(
                format!("{name}.{i}.w"),
                width,
                out,
                self.initializer.unwrap_or_else(|| he_normal(width)),
                self.optimizer,
            ));
            specs.push(dense(
                format!("{name}.{i}.b"),
                1,
                out,
                InitializerSpec::Zeros,
                self.optimizer,
            ));
            if self.batch_norm {
                // Row 0 holds gamma - 1, so zeros start at the identity.
                specs.push(dense(
                    format!("{name}.{i}.bn"),
                    1,
                    out,
                    InitializerSpec::Zeros,
                    self.optimizer,
                ));
                // Running mean and variance - 1, moved by pushes through SGD
                // with lr 1: pushing (1 - m) (running - batch) is the EMA.
                specs.push(dense(
                    format!("{name}.{i}.bn_stats"),
                    2,
                    out,
                    InitializerSpec::Zeros,
                    stats_optimizer,
                ));
            }
            width = out;
        }
        if output {
            specs.push(dense(
                format!("{prefix}.out.w"),
                width,
                1,
                self.initializer.unwrap_or_else(|| he_normal(width)),
                self.optimizer,
            ));
        }
        specs
    }
}

/// He initialization for a layer with `fan_in` inputs.
fn he_normal(fan_in: u32) -> InitializerSpec {
    InitializerSpec::Normal {
        mean: 0.0,
        std: (2.0 / fan_in.max(1) as f32).sqrt(),
    }
}

/// 1-based line number of byte `offset` in `src`.
fn line_of_offset(src: &str, offset: usize) -> usize {
    src.as_bytes()[..offset.min(src.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// Dotted path of the deepest key whose name or value covers byte `offset`.
fn key_at_offset(src: &str, offset: usize) -> Option<String> {
    use toml::de::{DeTable, DeValue};
    // Container spans are unreliable for `[header]` tables, so search every
    // descendant instead of pruning by the parent's span.
    fn in_value(value: &DeValue<'_>, offset: usize) -> Option<Vec<String>> {
        match value {
            DeValue::Table(inner) => in_table(inner, offset),
            DeValue::Array(items) => items
                .iter()
                .find_map(|item| in_value(item.get_ref(), offset)),
            _ => None,
        }
    }
    fn in_table(table: &DeTable<'_>, offset: usize) -> Option<Vec<String>> {
        table.iter().find_map(|(key, value)| {
            let name = key.get_ref().to_string();
            if let Some(mut path) = in_value(value.get_ref(), offset) {
                path.insert(0, name);
                Some(path)
            } else if key.span().contains(&offset) || value.span().contains(&offset) {
                Some(vec![name])
            } else {
                None
            }
        })
    }
    let doc = DeTable::parse(src).ok()?;
    in_table(doc.get_ref(), offset).map(|path| path.join("."))
}

/// Line of the deepest key of `dotted` that exists in `src`.
fn line_of_key(src: &str, dotted: &str) -> Option<usize> {
    let doc = toml::de::DeTable::parse(src).ok()?;
    let mut table = doc.get_ref();
    let mut line = None;
    for part in dotted.split('.') {
        let (key, value) = table.get_key_value(part)?;
        line = Some(line_of_offset(src, key.span().start));
        match value.get_ref() {
            toml::de::DeValue::Table(t) => table = t,
            _ => break,
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    const JOB: &str = r#"
[data]
train = "train.libsvm"
validation = "builtin:a9a/test"

[model]
kind = "lr"

[train]
batch_size = 32
epochs = 2

[tables.weights]
kind = "sparse"
dim = 1
initializer = { kind = "zeros" }
optimizer = { kind = "adagrad", lr = 0.05 }

[tables.bias]
kind = "dense"
rows = 1
dim = 1
initializer = { kind = "zeros" }
optimizer = { kind = "sgd", lr = 0.01 }
"#;

    #[test]
    fn a_complete_job_parses_and_resolves_paths() {
        let job = JobConfig::from_toml(JOB, Path::new("/jobs")).unwrap();
        assert_eq!(
            job.data.train,
            DataSource::File("/jobs/train.libsvm".into())
        );
        assert_eq!(
            job.data.validation,
            Some(DataSource::Builtin("a9a/test".into()))
        );
        assert_eq!(job.train.batch_size, 32);
        assert_eq!(job.train.max_pushes_in_flight, 4, "defaults fill the rest");
        let specs = job.table_specs();
        assert_eq!(specs.len(), 2);
        let bias = specs.iter().find(|s| s.name == "bias").unwrap();
        assert_eq!(
            bias.kind,
            TableKind::Dense {
                rows: 1,
                block_rows: 1
            }
        );
        if let OptimizerSpec::Adagrad {
            initial_accumulator,
            ..
        } = specs
            .iter()
            .find(|s| s.name == "weights")
            .unwrap()
            .optimizer
        {
            assert_eq!(initial_accumulator, 0.1);
        } else {
            panic!("weights should use adagrad");
        }
    }

    fn error_of(src: &str) -> ConfigError {
        JobConfig::from_toml(src, Path::new(".")).unwrap_err()
    }

    #[test]
    fn an_unknown_key_is_named_with_its_line() {
        let err = error_of(&JOB.replace("epochs = 2", "epochs = 2\nepocs = 3"));
        assert_eq!(err.line, Some(12), "{err}");
        assert_eq!(err.key.as_deref(), Some("train.epocs"), "{err}");
        assert!(err.to_string().contains("unknown field `epocs`"), "{err}");
    }

    #[test]
    fn a_wrong_type_is_named_with_its_line() {
        let err = error_of(&JOB.replace("batch_size = 32", "batch_size = \"big\""));
        assert_eq!(err.line, Some(10), "{err}");
        assert_eq!(err.key.as_deref(), Some("train.batch_size"), "{err}");
        // Inside an inline `{ kind = ... }` table the error points at the table.
        let err = error_of(&JOB.replace("lr = 0.05", "lr = \"fast\""));
        assert_eq!(
            err.key.as_deref(),
            Some("tables.weights.optimizer"),
            "{err}"
        );
        assert_eq!(err.line, Some(17), "{err}");
    }

    #[test]
    fn an_invalid_value_names_the_key_and_line() {
        let err = error_of(&JOB.replace("lr = 0.05", "lr = -1.0"));
        assert_eq!(err.key.as_deref(), Some("tables.weights.optimizer"));
        assert_eq!(err.line, Some(17), "{err}");
        assert!(err.to_string().contains("lr must be > 0"), "{err}");

        let err = error_of(&JOB.replace("batch_size = 32", "batch_size = 0"));
        assert_eq!(err.key.as_deref(), Some("train.batch_size"));
        assert_eq!(err.line, Some(10));
    }

    #[test]
    fn a_model_whose_table_is_missing_or_misshapen_is_refused() {
        let err = error_of(&JOB.replace("kind = \"lr\"", "kind = \"lr\"\nweights = \"w\""));
        assert_eq!(err.key.as_deref(), Some("model.weights"));
        assert_eq!(err.line, Some(8));
        let err = error_of(&JOB.replace(
            "dim = 1\ninitializer = { kind = \"zeros\" }\noptimizer = { kind = \"adagrad\"",
            "dim = 4\ninitializer = { kind = \"zeros\" }\noptimizer = { kind = \"adagrad\"",
        ));
        assert_eq!(err.key.as_deref(), Some("tables.weights"));
        assert!(err.message.contains("sparse table with dim = 1"));
    }

    #[test]
    fn lr_schedules_warm_up_then_decay() {
        let constant = LrSchedule::Constant { warmup_steps: 4 };
        assert_eq!(
            [0, 1, 3, 4, 100].map(|s| constant.scale(s)),
            [0.25, 0.5, 1.0, 1.0, 1.0]
        );
        let step = LrSchedule::Step {
            warmup_steps: 0,
            every: 10,
            gamma: 0.5,
        };
        assert_eq!([0, 9, 10, 25].map(|s| step.scale(s)), [1.0, 1.0, 0.5, 0.25]);
        let cosine = LrSchedule::Cosine {
            warmup_steps: 2,
            decay_steps: 100,
            min_scale: 0.1,
        };
        assert_eq!(cosine.scale(2), 1.0);
        assert!((cosine.scale(52) - 0.55).abs() < 1e-6);
        assert!((cosine.scale(102) - 0.1).abs() < 1e-6);
        assert!((cosine.scale(10_000) - 0.1).abs() < 1e-6);
        assert_eq!(constant.push_scale(0), Some(0.25), "warm-up is sent");
        let plain = LrSchedule::Constant { warmup_steps: 0 };
        assert_eq!(plain.push_scale(7), None, "the constant 1 is not sent");
        let err = error_of(&JOB.replace(
            "epochs = 2",
            "epochs = 2\nlr_schedule = { kind = \"step\", every = 0, gamma = 0.5 }",
        ));
        assert_eq!(err.key.as_deref(), Some("train.lr_schedule"), "{err}");
    }

    #[test]
    fn malformed_toml_reports_the_line() {
        let err = error_of("[data]\ntrain = \n");
        assert_eq!(err.line, Some(2), "{err}");
    }
}
