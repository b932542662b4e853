//! The MLP of `[model]` (DeepFM, Wide&Deep, DNN, and a multi-task model's
//! shared bottom, experts and towers) and the dense tables its layers
//! read; [`dense_spec`], the spec of any table a model generates.

use serde::Deserialize;

use crate::routing::{fnv1a64, mix64};
use crate::table::{InitializerSpec, OptimizerSpec, TableKind, TableSpec};

/// The MLP of DeepFM and Wide&Deep. Its weights are dense tables the job
/// creates itself, named `{name}.{i}.w` (`in x out`), `{name}.{i}.b`
/// (`1 x out`), `{name}.{i}.bn` and `{name}.{i}.bn_stats` with batch norm,
/// and `{name}.out.w` (`last x outputs`: 1, or the classes of a
/// multi-class model).
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

fn default_mlp_name() -> String {
    "mlp".into()
}
fn default_bn_momentum() -> f32 {
    0.9
}
fn default_true() -> bool {
    true
}

/// A dense table generated for a model, seeded from the job seed and its name.
pub(super) fn dense_spec(
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
        lifecycle: Default::default(),
    }
}

impl MlpConfig {
    /// The dense tables of an MLP over `input` features, in layer order,
    /// named after `self.name`, with an output layer of `outputs` columns.
    pub fn table_specs(&self, input: u32, outputs: u32, seed: u64) -> Vec<TableSpec> {
        self.layer_specs(&self.name, input, seed, Some(outputs))
    }

    /// The dense tables of the layers named `{prefix}.{i}.*`, and with
    /// `Some(outputs)` the output layer `{prefix}.out.w` (`last x outputs`).
    pub fn layer_specs(
        &self,
        prefix: &str,
        input: u32,
        seed: u64,
        outputs: Option<u32>,
    ) -> Vec<TableSpec> {
        let dense = |name: String, rows: u32, dim: u32, initializer, optimizer| {
            dense_spec(name, rows, dim, initializer, optimizer, seed)
        };
        let stats_optimizer = OptimizerSpec::sgd(1.0);
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
        if let Some(outputs) = outputs {
            specs.push(self.output_spec(prefix, width, outputs, seed));
        }
        specs
    }

    /// The output layer `{prefix}.out.w` over `input` values (the last
    /// hidden layer's, and whatever is read beside it).
    pub fn output_spec(&self, prefix: &str, input: u32, outputs: u32, seed: u64) -> TableSpec {
        dense_spec(
            format!("{prefix}.out.w"),
            input,
            outputs,
            self.initializer.unwrap_or_else(|| he_normal(input)),
            self.optimizer,
            seed,
        )
    }
}

/// He initialization for a layer with `fan_in` inputs.
fn he_normal(fan_in: u32) -> InitializerSpec {
    InitializerSpec::Normal {
        mean: 0.0,
        std: (2.0 / fan_in.max(1) as f32).sqrt(),
    }
}
