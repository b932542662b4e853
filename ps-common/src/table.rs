//! Validated table specs, converted from and to `pb::TableSpec` at the boundary.
//!
//! A [`TableSpec`] that exists has passed [`TableSpec::validate`]: the store
//! never sees a zero dim, a NaN learning rate or an empty name.

use serde::{Deserialize, Serialize};

use crate::error::PsError;
use crate::lifecycle::Lifecycle;
use crate::names::validate_table_name;
use crate::pb;
use crate::routing::Placement;

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

impl TryFrom<pb::TableSpec> for TableSpec {
    type Error = PsError;

    fn try_from(p: pb::TableSpec) -> Result<Self, PsError> {
        let kind = match pb::TableKind::try_from(p.kind) {
            Ok(pb::TableKind::Sparse) => {
                if p.rows != 0 || p.block_rows != 0 {
                    return Err(PsError::invalid(format!(
                        "table '{}': rows and block_rows are for dense tables only",
                        p.name
                    )));
                }
                TableKind::Sparse
            }
            Ok(pb::TableKind::Dense) => TableKind::Dense {
                rows: p.rows,
                block_rows: p.block_rows,
            },
            _ => {
                return Err(PsError::invalid(format!(
                    "table '{}': kind must be SPARSE or DENSE, got {}",
                    p.name, p.kind
                )));
            }
        };
        let initializer = match p.initializer.and_then(|i| i.kind) {
            Some(pb::initializer::Kind::Zeros(_)) => InitializerSpec::Zeros,
            Some(pb::initializer::Kind::Constant(c)) => {
                InitializerSpec::Constant { value: c.value }
            }
            Some(pb::initializer::Kind::Uniform(u)) => InitializerSpec::Uniform {
                low: u.low,
                high: u.high,
            },
            Some(pb::initializer::Kind::Normal(n)) => InitializerSpec::Normal {
                mean: n.mean,
                std: n.std,
            },
            None => {
                return Err(PsError::invalid(format!(
                    "table '{}': initializer is missing",
                    p.name
                )));
            }
        };
        let optimizer = match p.optimizer.and_then(|o| o.kind) {
            Some(pb::optimizer::Kind::Sgd(o)) => OptimizerSpec::Sgd {
                lr: o.lr,
                l2: o.l2,
                weight_decay: o.weight_decay,
            },
            Some(pb::optimizer::Kind::Adagrad(o)) => OptimizerSpec::Adagrad {
                lr: o.lr,
                initial_accumulator: o.initial_accumulator,
                eps: o.eps,
                l2: o.l2,
                weight_decay: o.weight_decay,
            },
            Some(pb::optimizer::Kind::Adam(o)) => OptimizerSpec::Adam {
                lr: o.lr,
                beta1: o.beta1,
                beta2: o.beta2,
                eps: o.eps,
                l2: o.l2,
                weight_decay: o.weight_decay,
            },
            Some(pb::optimizer::Kind::Ftrl(o)) => OptimizerSpec::Ftrl {
                alpha: o.alpha,
                beta: o.beta,
                l1: o.l1,
                l2: o.l2,
            },
            None => {
                return Err(PsError::invalid(format!(
                    "table '{}': optimizer is missing",
                    p.name
                )));
            }
        };
        let lifecycle = Lifecycle::try_from(p.lifecycle)
            .map_err(|e| PsError::invalid(format!("table '{}': {e}", p.name)))?;
        let spec = TableSpec {
            name: p.name,
            kind,
            dim: p.dim,
            initializer,
            optimizer,
            seed: p.seed,
            lifecycle,
        };
        spec.validate()?;
        Ok(spec)
    }
}

impl From<&TableSpec> for pb::TableSpec {
    fn from(s: &TableSpec) -> Self {
        let (kind, rows, block_rows) = match s.kind {
            TableKind::Sparse => (pb::TableKind::Sparse, 0, 0),
            TableKind::Dense { rows, block_rows } => (pb::TableKind::Dense, rows, block_rows),
        };
        let initializer = match s.initializer {
            InitializerSpec::Zeros => pb::initializer::Kind::Zeros(pb::Zeros {}),
            InitializerSpec::Constant { value } => {
                pb::initializer::Kind::Constant(pb::Constant { value })
            }
            InitializerSpec::Uniform { low, high } => {
                pb::initializer::Kind::Uniform(pb::Uniform { low, high })
            }
            InitializerSpec::Normal { mean, std } => {
                pb::initializer::Kind::Normal(pb::Normal { mean, std })
            }
        };
        let optimizer = match s.optimizer {
            OptimizerSpec::Sgd {
                lr,
                l2,
                weight_decay,
            } => pb::optimizer::Kind::Sgd(pb::Sgd {
                lr,
                l2,
                weight_decay,
            }),
            OptimizerSpec::Adagrad {
                lr,
                initial_accumulator,
                eps,
                l2,
                weight_decay,
            } => pb::optimizer::Kind::Adagrad(pb::Adagrad {
                lr,
                initial_accumulator,
                eps,
                l2,
                weight_decay,
            }),
            OptimizerSpec::Adam {
                lr,
                beta1,
                beta2,
                eps,
                l2,
                weight_decay,
            } => pb::optimizer::Kind::Adam(pb::Adam {
                lr,
                beta1,
                beta2,
                eps,
                l2,
                weight_decay,
            }),
            OptimizerSpec::Ftrl {
                alpha,
                beta,
                l1,
                l2,
            } => pb::optimizer::Kind::Ftrl(pb::Ftrl {
                alpha,
                beta,
                l1,
                l2,
            }),
        };
        pb::TableSpec {
            name: s.name.clone(),
            kind: kind as i32,
            dim: s.dim,
            rows,
            block_rows,
            initializer: Some(pb::Initializer {
                kind: Some(initializer),
            }),
            optimizer: Some(pb::Optimizer {
                kind: Some(optimizer),
            }),
            seed: s.seed,
            lifecycle: (&s.lifecycle).into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sparse(name: &str) -> TableSpec {
        TableSpec {
            name: name.into(),
            kind: TableKind::Sparse,
            dim: 8,
            initializer: InitializerSpec::Normal {
                mean: 0.0,
                std: 0.01,
            },
            optimizer: OptimizerSpec::Adagrad {
                lr: 0.1,
                initial_accumulator: 0.1,
                eps: 1e-8,
                l2: 0.0,
                weight_decay: 0.0,
            },
            seed: 1,
            lifecycle: Default::default(),
        }
    }

    #[test]
    fn specs_round_trip_through_protobuf() {
        let mut dense = sparse("mlp.w0");
        dense.kind = TableKind::Dense {
            rows: 416,
            block_rows: 32,
        };
        dense.optimizer = OptimizerSpec::Ftrl {
            alpha: 0.1,
            beta: 1.0,
            l1: 0.5,
            l2: 0.0,
        };
        for spec in [sparse("emb"), dense] {
            let wire = pb::TableSpec::from(&spec);
            assert_eq!(TableSpec::try_from(wire).unwrap(), spec);
        }
    }

    #[test]
    fn invalid_specs_are_refused_with_the_field_named() {
        type Mutation = Box<dyn Fn(&mut TableSpec)>;
        let cases: Vec<(Mutation, &str)> = vec![
            (Box::new(|s| s.dim = 0), "dim must be in"),
            (Box::new(|s| s.name = "a b".into()), "table name"),
            (Box::new(|s| s.name = String::new()), "table name"),
            (
                Box::new(|s| s.optimizer = OptimizerSpec::sgd(f32::NAN)),
                "optimizer lr must be > 0",
            ),
            (
                Box::new(|s| {
                    s.optimizer = OptimizerSpec::Adam {
                        lr: 0.1,
                        beta1: 1.0,
                        beta2: 0.9,
                        eps: 1e-8,
                        l2: 0.0,
                        weight_decay: 0.0,
                    }
                }),
                "beta1 must be in [0, 1)",
            ),
            (
                Box::new(|s| {
                    s.initializer = InitializerSpec::Uniform {
                        low: 1.0,
                        high: 1.0,
                    }
                }),
                "low < high",
            ),
            (
                Box::new(|s| {
                    s.initializer = InitializerSpec::Normal {
                        mean: 3e38,
                        std: 1.0,
                    }
                }),
                "initializer mean must be within",
            ),
            (
                Box::new(|s| {
                    s.initializer = InitializerSpec::Normal {
                        mean: 0.0,
                        std: 1e30,
                    }
                }),
                "initializer std must be >= 0 and <=",
            ),
            (
                Box::new(|s| s.initializer = InitializerSpec::Constant { value: -2e6 }),
                "initializer value must be within",
            ),
            (
                Box::new(|s| {
                    s.optimizer = OptimizerSpec::Adagrad {
                        lr: 0.1,
                        initial_accumulator: 3e38,
                        eps: 1e-8,
                        l2: 0.0,
                        weight_decay: 0.0,
                    }
                }),
                "initial_accumulator must be >= 0 and <=",
            ),
            (
                Box::new(|s| {
                    s.optimizer = OptimizerSpec::Ftrl {
                        alpha: 1e-30,
                        beta: 1.0,
                        l1: 0.0,
                        l2: 0.0,
                    }
                }),
                "alpha must be >= 1e-12",
            ),
            (
                Box::new(|s| {
                    s.kind = TableKind::Dense {
                        rows: 0,
                        block_rows: 1,
                    }
                }),
                "rows >= 1",
            ),
        ];
        for (mutate, expected) in cases {
            let mut spec = sparse("t");
            mutate(&mut spec);
            let err = spec.validate().unwrap_err().to_string();
            assert!(
                err.contains(expected),
                "{err:?} should contain {expected:?}"
            );
        }
    }

    #[test]
    fn a_wire_spec_without_optimizer_or_with_unknown_kind_is_invalid() {
        let mut wire = pb::TableSpec::from(&sparse("t"));
        wire.optimizer = None;
        assert!(
            TableSpec::try_from(wire)
                .unwrap_err()
                .to_string()
                .contains("optimizer is missing")
        );
        let mut wire = pb::TableSpec::from(&sparse("t"));
        wire.kind = 7;
        assert!(
            TableSpec::try_from(wire)
                .unwrap_err()
                .to_string()
                .contains("kind must be")
        );
    }

    #[test]
    fn first_difference_names_the_field() {
        let a = sparse("t");
        let mut b = a.clone();
        assert_eq!(a.first_difference(&b), None);
        b.dim = 16;
        let (field, was, now) = a.first_difference(&b).unwrap();
        assert_eq!((field, was.as_str(), now.as_str()), ("dim", "8", "16"));
    }
}
