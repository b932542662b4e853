//! The job file: one TOML document that drives `ps-worker local`, separate
//! `ps-worker train` processes and, later, Kubernetes jobs.
//!
//! Parsing is strict (unknown keys are errors) and every error names the
//! offending key and its line, so a typo never silently falls back to a
//! default. Relative data paths are resolved against the job file's folder.
//!
//! - this module: the document, `[communication]`, `[tables]`,
//!   parsing and validation, and locating a key's line in the source;
//! - [`data`]: `[data]`, the input files and how lines become examples;
//! - [`model`]: `[model]` and the tables a model reads;
//! - [`mlp`]: the MLP's keys and its layers' tables;
//! - [`multitask`]: task embeddings and cross-attention of multi-task models;
//! - [`convnet`]: the image models (ResNet, Inception) and their layers;
//! - [`train`]: `[train]`, consistency modes, schedules, the device.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::routing::{fnv1a64, mix64};
use crate::table::{InitializerSpec, OptimizerSpec, TableKind, TableSpec};

mod convnet;
mod data;
mod mlp;
mod model;
mod model_checks;
mod multitask;
mod train;

pub use convnet::*;
pub use data::*;
pub use mlp::*;
pub use model::*;
pub use multitask::*;
pub use train::*;

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
    /// Tables by name (the image models generate all of theirs).
    #[serde(default)]
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
        if self.row_cache_steps > MAX_ROW_CACHE_STEPS {
            return Err((
                "row_cache_steps".into(),
                format!("must be at most {MAX_ROW_CACHE_STEPS}"),
            ));
        }
        if self.row_cache_rows.is_some_and(|n| n == 0 || n > 1 << 26) {
            return Err((
                "row_cache_rows".into(),
                "must be between 1 and 67108864".into(),
            ));
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
    /// Sparse rows seen in two steps in a row are kept on the worker and
    /// serve this many steps after the one they were pulled for (0: off);
    /// their gradients are summed meanwhile and pushed once, when the row
    /// expires (`ps_worker::cache`). Under ssp at most the staleness K;
    /// bsp refuses it (every step reads exactly the updates before it).
    pub row_cache_steps: u64,
    /// Most rows that cache holds per worker (default 262,144).
    pub row_cache_rows: Option<usize>,
}

/// Rows a worker's row cache holds unless `row_cache_rows` says otherwise.
pub const DEFAULT_ROW_CACHE_ROWS: usize = 1 << 18;

/// Most steps a cached row may serve.
pub const MAX_ROW_CACHE_STEPS: u64 = 1024;

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
    /// Sparse only: admission and eviction (see [`crate::lifecycle`]).
    #[serde(default)]
    pub lifecycle: crate::Lifecycle,
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

impl TableConfig {
    /// The spec of the table called `name`; without a `seed` key, the
    /// initializer's seed is derived from `job_seed` and the name.
    pub fn spec(&self, name: &str, job_seed: u64) -> TableSpec {
        TableSpec {
            name: name.to_string(),
            kind: match self.kind {
                TableKindConfig::Sparse => TableKind::Sparse,
                TableKindConfig::Dense => {
                    let rows = self.rows.unwrap_or(0);
                    TableKind::Dense {
                        rows,
                        block_rows: self
                            .block_rows
                            .unwrap_or(rows.min(u64::from(u32::MAX)) as u32),
                    }
                }
            },
            dim: self.dim,
            initializer: self.initializer,
            optimizer: self.optimizer,
            seed: self
                .seed
                .unwrap_or_else(|| mix64(job_seed ^ fnv1a64(name.as_bytes()))),
            lifecycle: self.lifecycle,
        }
    }

    /// Checks the keys that only one kind of table has; errors are
    /// (key, message).
    pub fn validate(&self) -> Result<(), (String, String)> {
        match self.kind {
            TableKindConfig::Sparse => {
                for (field, set) in [
                    ("rows", self.rows.is_some()),
                    ("block_rows", self.block_rows.is_some()),
                ] {
                    if set {
                        return Err((field.into(), "only dense tables have this key".into()));
                    }
                }
            }
            TableKindConfig::Dense => {
                if self.rows.is_none() {
                    return Err(("kind".into(), "a dense table needs `rows`".into()));
                }
            }
        }
        Ok(())
    }
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
    /// `[tables]`, the model's generated MLP tables and a multi-class FM's
    /// per-class weights.
    pub fn table_specs(&self) -> Vec<TableSpec> {
        let mut specs = self.declared_table_specs();
        if let Some(image) = &self.data.image
            && self.model.reads_images()
        {
            specs.extend(
                self.model
                    .generated_table_specs(image.channels, self.train.seed),
            );
        } else if let Some(embeddings) = self.model.embeddings_table() {
            let dim = self.tables.get(embeddings).map_or(0, |t| t.dim);
            specs.extend(self.model.generated_table_specs(
                self.data.fields * dim + self.data.dense_inputs(),
                self.train.seed,
            ));
        }
        specs.extend(self.model.fm_classes_spec(&self.tables, self.train.seed));
        specs
    }

    fn declared_table_specs(&self) -> Vec<TableSpec> {
        self.tables
            .iter()
            .map(|(name, t)| t.spec(name, self.train.seed))
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
        if self.tables.is_empty() && !self.model.reads_images() {
            return Err(("tables".into(), "at least one table is required".into()));
        }
        self.data.validate(self.model.tasks().len())?;
        if self.model.has_classes() && !self.model.reads_images() {
            if self.data.format == DataFormat::Criteo {
                return Err((
                    "model.classes".into(),
                    "criteo's label is a click (0 or 1): a multi-class model reads libsvm, libffm or csv lines whose label is a class index".into(),
                ));
            }
            if self.data.negative_sampling.is_some() {
                return Err((
                    "data.negative_sampling".into(),
                    "needs a binary model (a multi-class label has no one class to call negative)"
                        .into(),
                ));
            }
        }
        match (
            self.data.format == DataFormat::Pixels,
            self.model.reads_images(),
        ) {
            (true, false) => {
                return Err((
                    "model.kind".into(),
                    "pixels data feeds the image models: kind = \"resnet\" or \"inception\"".into(),
                ));
            }
            (false, true) => {
                return Err((
                    "data.format".into(),
                    format!(
                        "the {} model reads images: set format = \"pixels\" and [data.image]",
                        self.model.kind_name()
                    ),
                ));
            }
            _ => {}
        }
        if self.data.numeric.dense
            && matches!(self.model, ModelConfig::Lr { .. } | ModelConfig::Fm { .. })
        {
            return Err((
                "data.numeric.dense".into(),
                "feeds an MLP: use deepfm, wide_deep, dnn or multitask (lr and fm take numeric columns as features)".into(),
            ));
        }
        for (name, table) in &self.tables {
            table
                .validate()
                .map_err(|(field, msg)| (format!("tables.{name}.{field}"), msg))?;
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
        let cached = self.communication.row_cache_steps;
        match (t.consistency, t.staleness) {
            (Consistency::Bsp, _) | (Consistency::Ssp, Some(0)) if cached > 0 => {
                return Err((
                    "communication.row_cache_steps".into(),
                    "a bulk-synchronous job reads exactly the updates before each step: it cannot serve rows from a cache (set 0)".into(),
                ));
            }
            (Consistency::Ssp, Some(k)) if cached > u64::from(k) => {
                return Err((
                    "communication.row_cache_steps".into(),
                    format!("must be at most train.staleness ({k}) under ssp"),
                ));
            }
            _ => {}
        }
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
        if let Some(template) = &t.epoch_checkpoint {
            let key = || "train.epoch_checkpoint".to_string();
            if !template.contains("{epoch}") {
                return Err((
                    key(),
                    "needs {epoch} in the name, or each epoch would overwrite the last (e.g. \"epoch-{epoch}\")".into(),
                ));
            }
            let example = template.replace("{epoch}", "1");
            crate::names::validate_checkpoint_name(&example).map_err(|_| {
                (
                    key(),
                    format!(
                        "{} {}",
                        crate::names::quoted(template),
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
        for spec in self.declared_table_specs() {
            if let Err(e) = spec.validate() {
                let msg = e.to_string();
                let field = if msg.contains("admission") || msg.contains("eviction") {
                    "lifecycle"
                } else {
                    ["dim", "rows", "block_rows", "initializer", "optimizer"]
                        .into_iter()
                        .find(|f| msg.contains(f))
                        .unwrap_or("kind")
                };
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
mod tests;
