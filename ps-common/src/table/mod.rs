//! Validated table specs, converted from and to `pb::TableSpec` at the
//! boundary (`proto.rs`).
//!
//! A [`TableSpec`] that exists has passed [`TableSpec::validate`]: the store
//! never sees a zero dim, a NaN learning rate or an empty name.

use serde::{Deserialize, Serialize};

use crate::error::PsError;
use crate::lifecycle::Lifecycle;
use crate::names::validate_table_name;
use crate::routing::Placement;

mod proto;

/// Largest accepted row width (floats per row).
pub const MAX_DIM: u32 = 1 << 16;
/// Largest accepted dense table, in floats (4 GiB of weights).
pub const MAX_DENSE_FLOATS: u64 = 1 << 30;
/// Most routing blocks of one dense table (`rows / block_rows`, rounded
/// up): a shard walks them to find its own when the table is made.
pub const MAX_DENSE_BLOCKS: u64 = 1 << 22;

/// The shape and behaviour of one table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TableSpec {
    /// Unique name within a job; 1-128 characters from `[A-Za-z0-9_.-]`.
    pub name: String,
    /// Sparse (rows created on touch) or dense (fixed rows).
    pub kind: TableKind,
    /// Floats per row.
    pub dim: u32,
    /// How new rows are filled.
    pub initializer: InitializerSpec,
    /// How pushed gradients update rows.
    pub optimizer: OptimizerSpec,
    /// Seed of the initializer; rows depend on (seed, key) only.
    pub seed: u64,
    /// Sparse only: admission and eviction (default: neither).
    #[serde(default)]
    pub lifecycle: Lifecycle,
}

/// Sparse or dense, with the dense shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TableKind {
    /// u64 id -> row, created on first touch.
    Sparse,
    /// A fixed `rows x dim` tensor split into blocks of `block_rows` rows.
    Dense {
        /// Number of rows.
        rows: u64,
        /// Rows per routing block.
        block_rows: u32,
    },
}

impl TableKind {
    /// Rows of a dense table; `None` for sparse tables.
    pub fn rows(&self) -> Option<u64> {
        match self {
            TableKind::Sparse => None,
            TableKind::Dense { rows, .. } => Some(*rows),
        }
    }
}

/// Row initializer.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum InitializerSpec {
    /// All zeros.
    Zeros,
    /// Every value equal to `value`.
    Constant {
        /// The value.
        value: f32,
    },
    /// Uniform in `[low, high)`.
    Uniform {
        /// Lower bound (inclusive).
        low: f32,
        /// Upper bound (exclusive).
        high: f32,
    },
    /// Normal with the given mean and standard deviation.
    Normal {
        /// Mean.
        #[serde(default)]
        mean: f32,
        /// Standard deviation.
        std: f32,
    },
}

/// Server-side optimizer and its hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum OptimizerSpec {
    /// `w -= lr * g`.
    Sgd {
        /// Learning rate.
        lr: f32,
        /// L2 strength: `l2 * w` is added to the gradient.
        #[serde(default)]
        l2: f32,
        /// Decoupled weight decay: `w *= 1 - lr * weight_decay` per update.
        #[serde(default)]
        weight_decay: f32,
    },
    /// `acc += g^2; w -= lr * g / (sqrt(acc) + eps)`.
    Adagrad {
        /// Learning rate.
        lr: f32,
        /// Starting value of the accumulator.
        #[serde(default = "default_adagrad_initial")]
        initial_accumulator: f32,
        /// Added to the denominator.
        #[serde(default = "default_eps")]
        eps: f32,
        /// L2 strength: `l2 * w` is added to the gradient.
        #[serde(default)]
        l2: f32,
        /// Decoupled weight decay: `w *= 1 - lr * weight_decay` per update.
        #[serde(default)]
        weight_decay: f32,
    },
    /// Per-row Adam with bias correction.
    Adam {
        /// Learning rate.
        lr: f32,
        /// First-moment decay.
        #[serde(default = "default_beta1")]
        beta1: f32,
        /// Second-moment decay.
        #[serde(default = "default_beta2")]
        beta2: f32,
        /// Added to the denominator.
        #[serde(default = "default_eps")]
        eps: f32,
        /// L2 strength: `l2 * w` is added to the gradient.
        #[serde(default)]
        l2: f32,
        /// Decoupled weight decay (AdamW): `w *= 1 - lr * weight_decay`
        /// per update.
        #[serde(default)]
        weight_decay: f32,
    },
    /// FTRL-proximal.
    Ftrl {
        /// Learning-rate scale.
        alpha: f32,
        /// Learning-rate smoothing.
        #[serde(default = "default_ftrl_beta")]
        beta: f32,
        /// L1 strength (sparsity).
        #[serde(default)]
        l1: f32,
        /// L2 strength.
        #[serde(default)]
        l2: f32,
    },
}

fn default_adagrad_initial() -> f32 {
    0.0
}
fn default_eps() -> f32 {
    1e-8
}
fn default_beta1() -> f32 {
    0.9
}
fn default_beta2() -> f32 {
    0.999
}
fn default_ftrl_beta() -> f32 {
    1.0
}

impl TableSpec {
    /// How this table's keys are placed on shards.
    pub fn placement(&self) -> Placement {
        match self.kind {
            TableKind::Sparse => Placement::Sparse,
            TableKind::Dense { block_rows, .. } => Placement::dense(&self.name, block_rows),
        }
    }

    /// Checks every field; the error names the field and the rule it broke.
    pub fn validate(&self) -> Result<(), PsError> {
        validate_table_name(&self.name)?;
        let ctx = |msg: String| PsError::invalid(format!("table '{}': {msg}", self.name));
        if self.dim == 0 || self.dim > MAX_DIM {
            return Err(ctx(format!(
                "dim must be in 1..={MAX_DIM}, got {}",
                self.dim
            )));
        }
        if let TableKind::Dense { rows, block_rows } = self.kind {
            if rows == 0 {
                return Err(ctx("a dense table needs rows >= 1".into()));
            }
            if block_rows == 0 {
                return Err(ctx("a dense table needs block_rows >= 1".into()));
            }
            if rows.div_ceil(u64::from(block_rows)) > MAX_DENSE_BLOCKS {
                return Err(ctx(format!(
                    "rows / block_rows = {rows} / {block_rows} is over the limit of {MAX_DENSE_BLOCKS} blocks; use larger blocks"
                )));
            }
            if rows.saturating_mul(u64::from(self.dim)) > MAX_DENSE_FLOATS {
                return Err(ctx(format!(
                    "rows x dim = {rows} x {} is over the limit of {MAX_DENSE_FLOATS} floats",
                    self.dim
                )));
            }
        }
        self.initializer.validate().map_err(ctx)?;
        self.optimizer.validate().map_err(ctx)?;
        if !self.lifecycle.is_default() && self.kind != TableKind::Sparse {
            return Err(ctx(
                "admission and eviction are for sparse tables only (a dense table's rows are fixed)"
                    .into(),
            ));
        }
        self.lifecycle.validate().map_err(ctx)?;
        Ok(())
    }

    /// The first field in which `other` differs from `self`, as
    /// (field, self's value, other's value).
    pub fn first_difference(&self, other: &TableSpec) -> Option<(&'static str, String, String)> {
        fn diff<T: PartialEq + std::fmt::Debug>(
            field: &'static str,
            a: &T,
            b: &T,
        ) -> Option<(&'static str, String, String)> {
            (a != b).then(|| (field, format!("{a:?}"), format!("{b:?}")))
        }
        diff("name", &self.name, &other.name)
            .or_else(|| diff("kind", &self.kind, &other.kind))
            .or_else(|| diff("dim", &self.dim, &other.dim))
            .or_else(|| diff("initializer", &self.initializer, &other.initializer))
            .or_else(|| diff("optimizer", &self.optimizer, &other.optimizer))
            .or_else(|| diff("seed", &self.seed, &other.seed))
            .or_else(|| diff("lifecycle", &self.lifecycle, &other.lifecycle))
    }
}

/// Largest magnitude of an initializer or optimizer parameter. With every
/// parameter within it, a fresh row (weights and optimizer state) is finite
/// by construction: a normal sample is at most about 9 std from its mean,
/// and FTRL's starting `z` is at most `|w| (beta / alpha + l2) + l1`.
pub const MAX_PARAM: f32 = 1e6;

/// Smallest FTRL alpha (it divides beta when a row's `z` is set up).
pub const MIN_FTRL_ALPHA: f32 = 1e-12;

fn finite(name: &str, v: f32) -> Result<(), String> {
    if v.is_finite() && v.abs() <= MAX_PARAM {
        Ok(())
    } else {
        Err(format!("{name} must be within +-{MAX_PARAM:e}, got {v}"))
    }
}

fn positive(name: &str, v: f32) -> Result<(), String> {
    if v.is_finite() && v > 0.0 && v <= MAX_PARAM {
        Ok(())
    } else {
        Err(format!("{name} must be > 0 and <= {MAX_PARAM:e}, got {v}"))
    }
}

fn non_negative(name: &str, v: f32) -> Result<(), String> {
    if v.is_finite() && (0.0..=MAX_PARAM).contains(&v) {
        Ok(())
    } else {
        Err(format!("{name} must be >= 0 and <= {MAX_PARAM:e}, got {v}"))
    }
}

fn unit_interval(name: &str, v: f32) -> Result<(), String> {
    if (0.0..1.0).contains(&v) {
        Ok(())
    } else {
        Err(format!("{name} must be in [0, 1), got {v}"))
    }
}

impl InitializerSpec {
    /// Checks the parameters' ranges.
    pub fn validate(&self) -> Result<(), String> {
        match *self {
            InitializerSpec::Zeros => Ok(()),
            InitializerSpec::Constant { value } => finite("initializer value", value),
            InitializerSpec::Uniform { low, high } => {
                finite("initializer low", low)?;
                finite("initializer high", high)?;
                if low < high {
                    Ok(())
                } else {
                    Err(format!("initializer needs low < high, got [{low}, {high})"))
                }
            }
            InitializerSpec::Normal { mean, std } => {
                finite("initializer mean", mean)?;
                non_negative("initializer std", std)
            }
        }
    }
}

impl OptimizerSpec {
    /// Plain SGD at `lr`, no regularization.
    pub fn sgd(lr: f32) -> OptimizerSpec {
        OptimizerSpec::Sgd {
            lr,
            l2: 0.0,
            weight_decay: 0.0,
        }
    }

    /// Adagrad at `lr` with the default accumulator and epsilon, no
    /// regularization.
    pub fn adagrad(lr: f32) -> OptimizerSpec {
        OptimizerSpec::Adagrad {
            lr,
            initial_accumulator: default_adagrad_initial(),
            eps: default_eps(),
            l2: 0.0,
            weight_decay: 0.0,
        }
    }

    /// Adam at `lr` with the default betas and epsilon, no regularization.
    pub fn adam(lr: f32) -> OptimizerSpec {
        OptimizerSpec::Adam {
            lr,
            beta1: default_beta1(),
            beta2: default_beta2(),
            eps: default_eps(),
            l2: 0.0,
            weight_decay: 0.0,
        }
    }

    /// The L2 strength and the decoupled weight decay (FTRL's `l2` is part
    /// of its own update: (0, 0) here).
    pub fn regularization(&self) -> (f32, f32) {
        match *self {
            OptimizerSpec::Sgd {
                l2, weight_decay, ..
            }
            | OptimizerSpec::Adagrad {
                l2, weight_decay, ..
            }
            | OptimizerSpec::Adam {
                l2, weight_decay, ..
            } => (l2, weight_decay),
            OptimizerSpec::Ftrl { .. } => (0.0, 0.0),
        }
    }

    /// The same optimizer with its learning rate (FTRL: alpha) times `scale`.
    pub fn with_lr_scale(mut self, scale: f32) -> OptimizerSpec {
        match &mut self {
            OptimizerSpec::Sgd { lr, .. }
            | OptimizerSpec::Adagrad { lr, .. }
            | OptimizerSpec::Adam { lr, .. } => *lr *= scale,
            OptimizerSpec::Ftrl { alpha, .. } => *alpha *= scale,
        }
        self
    }

    /// Checks the hyper-parameters' ranges.
    pub fn validate(&self) -> Result<(), String> {
        match *self {
            OptimizerSpec::Sgd { lr, .. } => {
                positive("optimizer lr", lr)?;
                self.validate_regularization(lr)
            }
            OptimizerSpec::Adagrad {
                lr,
                initial_accumulator,
                eps,
                ..
            } => {
                positive("optimizer lr", lr)?;
                non_negative("optimizer initial_accumulator", initial_accumulator)?;
                positive("optimizer eps", eps)?;
                self.validate_regularization(lr)
            }
            OptimizerSpec::Adam {
                lr,
                beta1,
                beta2,
                eps,
                ..
            } => {
                positive("optimizer lr", lr)?;
                unit_interval("optimizer beta1", beta1)?;
                unit_interval("optimizer beta2", beta2)?;
                positive("optimizer eps", eps)?;
                self.validate_regularization(lr)
            }
            OptimizerSpec::Ftrl {
                alpha,
                beta,
                l1,
                l2,
            } => {
                positive("optimizer alpha", alpha)?;
                if alpha < MIN_FTRL_ALPHA {
                    return Err(format!(
                        "optimizer alpha must be >= {MIN_FTRL_ALPHA:e}, got {alpha}"
                    ));
                }
                non_negative("optimizer beta", beta)?;
                non_negative("optimizer l1", l1)?;
                non_negative("optimizer l2", l2)
            }
        }
    }
}

impl OptimizerSpec {
    /// `l2` and `weight_decay` in range, and a decay that shrinks a
    /// weight by at most all of it per update (`lr * weight_decay <= 1`).
    fn validate_regularization(&self, lr: f32) -> Result<(), String> {
        let (l2, weight_decay) = self.regularization();
        non_negative("optimizer l2", l2)?;
        non_negative("optimizer weight_decay", weight_decay)?;
        if lr * weight_decay > 1.0 {
            return Err(format!(
                "optimizer lr x weight_decay must be <= 1 (a decay past the whole weight), got {lr} x {weight_decay}"
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
