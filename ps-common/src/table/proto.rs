//! A [`TableSpec`]'s protobuf form, `pb::TableSpec`: converted at the
//! boundary, and validated on the way in.

use super::{InitializerSpec, OptimizerSpec, TableKind, TableSpec};
use crate::error::PsError;
use crate::lifecycle::Lifecycle;
use crate::pb;

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
