//! `kind = "resnet"` and `kind = "inception"`: the convolutional image
//! models, expanded from their `[model]` keys into the layers a worker
//! runs ([`ConvNet`]) and the dense tables those layers read.
//!
//! One expansion serves both sides: the job's table specs and the
//! worker's network come from one [`ConvNet`] ([`ConvNet::resnet`] or
//! [`ConvNet::inception`], then [`ConvNet::table_specs`]), so the two
//! cannot disagree on a name or a shape.

use serde::Deserialize;

use super::{ModelConfig, dense_spec};
use crate::table::{InitializerSpec, OptimizerSpec, TableSpec};

/// `kind = "resnet"`: a stem convolution, stages of basic blocks.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResnetConfig {
    /// Prefix of the generated table names (default `resnet`).
    #[serde(default = "default_resnet_name")]
    pub name: String,
    /// Classes of the softmax output (labels `0..classes`).
    pub classes: u32,
    /// Channels of the stem's 3x3 convolution.
    #[serde(default = "default_stem")]
    pub stem: u32,
    /// Channels of each stage; every stage after the first halves the
    /// resolution (stride 2 in its first block).
    pub stages: Vec<u32>,
    /// Basic blocks per stage.
    #[serde(default = "default_blocks")]
    pub blocks: u32,
    /// Batch normalization after every convolution.
    #[serde(default = "default_true")]
    pub batch_norm: bool,
    /// Momentum of the running batch-norm statistics.
    #[serde(default = "default_bn_momentum")]
    pub bn_momentum: f32,
    /// Server-side optimizer of every table.
    pub optimizer: OptimizerSpec,
}

/// `kind = "inception"`: a stem convolution, then Inception modules.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InceptionConfig {
    /// Prefix of the generated table names (default `inception`).
    #[serde(default = "default_inception_name")]
    pub name: String,
    /// Classes of the softmax output (labels `0..classes`).
    pub classes: u32,
    /// Channels of the stem's 3x3 convolution.
    #[serde(default = "default_stem")]
    pub stem: u32,
    /// The modules, in order.
    pub modules: Vec<InceptionModuleConfig>,
    /// Batch normalization after every convolution.
    #[serde(default = "default_true")]
    pub batch_norm: bool,
    /// Momentum of the running batch-norm statistics.
    #[serde(default = "default_bn_momentum")]
    pub bn_momentum: f32,
    /// Server-side optimizer of every table.
    pub optimizer: OptimizerSpec,
}

/// One Inception module's branch widths: a 1x1 convolution; a 1x1
/// reduction then a 3x3; a 1x1 reduction then two 3x3 (a 5x5's field of
/// view); a 3x3 max pooling then a 1x1 projection. Their outputs are
/// concatenated along channels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InceptionModuleConfig {
    /// Channels of the 1x1 branch.
    pub b1: u32,
    /// Channels of the 3x3 branch's 1x1 reduction.
    pub b3_reduce: u32,
    /// Channels of the 3x3 branch.
    pub b3: u32,
    /// Channels of the double-3x3 branch's 1x1 reduction.
    pub b5_reduce: u32,
    /// Channels of the double-3x3 branch.
    pub b5: u32,
    /// Channels of the pooling branch's 1x1 projection.
    pub pool: u32,
    /// A 2x2 max pooling of stride 2 after the module (halves the
    /// resolution).
    #[serde(default)]
    pub downsample: bool,
}

impl InceptionModuleConfig {
    /// Channels out of the module.
    pub fn width(&self) -> u32 {
        self.b1 + self.b3 + self.b5 + self.pool
    }
}

fn default_resnet_name() -> String {
    "resnet".into()
}
fn default_inception_name() -> String {
    "inception".into()
}
fn default_stem() -> u32 {
    16
}
fn default_blocks() -> u32 {
    1
}
fn default_true() -> bool {
    true
}
fn default_bn_momentum() -> f32 {
    0.9
}

/// The widest layer an image model may have: bounds the tables a job
/// file can ask for.
pub const MAX_CHANNELS: u32 = 2048;

/// One convolution and what follows it: batch norm (optional), a bias,
/// and a ReLU unless `relu` is false. Its tables are `{name}.w`
/// (`[kernel * kernel * input, output]`, rows in (ky, kx, channel) order),
/// `{name}.b` (`1 x output`), and with batch norm `{name}.bn` (gamma - 1)
/// and `{name}.bn_stats` (running mean, variance - 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvSpec {
    /// Table prefix.
    pub name: String,
    /// Input channels.
    pub input: u32,
    /// Output channels.
    pub output: u32,
    /// Square kernel size.
    pub kernel: u32,
    /// Stride.
    pub stride: u32,
    /// Zero padding (kernel / 2: "same" at stride 1).
    pub padding: u32,
    /// ReLU after the bias.
    pub relu: bool,
}

/// A ResNet basic block: `relu(second(first(x)) + shortcut(x))`, the
/// shortcut being `x` or, when the block changes width or resolution, a
/// 1x1 projection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResidualBlock {
    /// 3x3, ReLU; stride 2 in a stage's first block after the first stage.
    pub first: ConvSpec,
    /// 3x3, no ReLU (it follows the sum).
    pub second: ConvSpec,
    /// The 1x1 projection shortcut, if any.
    pub projection: Option<ConvSpec>,
}

/// An Inception module's four branches (see [`InceptionModuleConfig`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InceptionModule {
    /// 1x1.
    pub one: ConvSpec,
    /// 1x1 reduction, 3x3.
    pub three: [ConvSpec; 2],
    /// 1x1 reduction, 3x3, 3x3.
    pub five: [ConvSpec; 3],
    /// 1x1 after a 3x3 max pooling of stride 1.
    pub pool: ConvSpec,
    /// 2x2 max pooling of stride 2 after the module.
    pub downsample: bool,
}

/// What follows the stem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    /// Residual blocks.
    Resnet(Vec<ResidualBlock>),
    /// Inception modules.
    Inception(Vec<InceptionModule>),
}

/// An image model's layers: stem, body, then global average pooling and
/// the output layer `{name}.out.w` (`width x classes`) and `{name}.out.b`.
#[derive(Debug, Clone, PartialEq)]
pub struct ConvNet {
    /// Table prefix.
    pub name: String,
    /// The first convolution (3x3, ReLU).
    pub stem: ConvSpec,
    /// The blocks or modules.
    pub body: Body,
    /// Channels into the output layer.
    pub width: u32,
    /// Classes.
    pub classes: u32,
    /// Batch normalization after every convolution.
    pub batch_norm: bool,
    /// Momentum of the running statistics.
    pub bn_momentum: f32,
    /// Optimizer of every table.
    pub optimizer: OptimizerSpec,
}

fn conv(name: String, input: u32, output: u32, kernel: u32, stride: u32, relu: bool) -> ConvSpec {
    ConvSpec {
        name,
        input,
        output,
        kernel,
        stride,
        padding: kernel / 2,
        relu,
    }
}

impl ConvNet {
    /// The ResNet of `config` over images of `channels` channels.
    pub fn resnet(config: &ResnetConfig, channels: u32) -> ConvNet {
        let name = &config.name;
        let stem = conv(format!("{name}.stem"), channels, config.stem, 3, 1, true);
        let mut width = config.stem;
        let mut blocks = Vec::new();
        for (s, &out) in config.stages.iter().enumerate() {
            for b in 0..config.blocks {
                let stride = if s > 0 && b == 0 { 2 } else { 1 };
                let prefix = format!("{name}.s{s}b{b}");
                blocks.push(ResidualBlock {
                    first: conv(format!("{prefix}.a"), width, out, 3, stride, true),
                    second: conv(format!("{prefix}.b"), out, out, 3, 1, false),
                    projection: (stride != 1 || width != out)
                        .then(|| conv(format!("{prefix}.proj"), width, out, 1, stride, false)),
                });
                width = out;
            }
        }
        ConvNet {
            name: name.clone(),
            stem,
            body: Body::Resnet(blocks),
            width,
            classes: config.classes,
            batch_norm: config.batch_norm,
            bn_momentum: config.bn_momentum,
            optimizer: config.optimizer,
        }
    }

    /// The Inception network of `config` over images of `channels` channels.
    pub fn inception(config: &InceptionConfig, channels: u32) -> ConvNet {
        let name = &config.name;
        let stem = conv(format!("{name}.stem"), channels, config.stem, 3, 1, true);
        let mut width = config.stem;
        let mut modules = Vec::new();
        for (i, m) in config.modules.iter().enumerate() {
            let p = format!("{name}.m{i}");
            modules.push(InceptionModule {
                one: conv(format!("{p}.1x1"), width, m.b1, 1, 1, true),
                three: [
                    conv(format!("{p}.3x3r"), width, m.b3_reduce, 1, 1, true),
                    conv(format!("{p}.3x3"), m.b3_reduce, m.b3, 3, 1, true),
                ],
                five: [
                    conv(format!("{p}.5x5r"), width, m.b5_reduce, 1, 1, true),
                    conv(format!("{p}.5x5a"), m.b5_reduce, m.b5, 3, 1, true),
                    conv(format!("{p}.5x5b"), m.b5, m.b5, 3, 1, true),
                ],
                pool: conv(format!("{p}.pool"), width, m.pool, 1, 1, true),
                downsample: m.downsample,
            });
            width = m.width();
        }
        ConvNet {
            name: name.clone(),
            stem,
            body: Body::Inception(modules),
            width,
            classes: config.classes,
            batch_norm: config.batch_norm,
            bn_momentum: config.bn_momentum,
            optimizer: config.optimizer,
        }
    }

    /// Every convolution, in the order their tables are listed.
    pub fn convs(&self) -> Vec<&ConvSpec> {
        let mut all = vec![&self.stem];
        match &self.body {
            Body::Resnet(blocks) => {
                for b in blocks {
                    all.extend([&b.first, &b.second]);
                    all.extend(&b.projection);
                }
            }
            Body::Inception(modules) => {
                for m in modules {
                    all.push(&m.one);
                    all.extend(&m.three);
                    all.extend(&m.five);
                    all.push(&m.pool);
                }
            }
        }
        all
    }

    /// The dense tables: per convolution `w`, `b` (and `bn`, `bn_stats`),
    /// then the output layer's `out.w` and `out.b`.
    pub fn table_specs(&self, seed: u64) -> Vec<TableSpec> {
        let dense = |name: String, rows: u32, dim: u32, init| {
            dense_spec(name, rows, dim, init, self.optimizer, seed)
        };
        let mut specs = Vec::new();
        for c in self.convs() {
            let fan_in = c.kernel * c.kernel * c.input;
            specs.push(dense(format!("{}.w", c.name), fan_in, c.output, he(fan_in)));
            specs.push(dense(
                format!("{}.b", c.name),
                1,
                c.output,
                InitializerSpec::Zeros,
            ));
            if self.batch_norm {
                specs.push(dense(
                    format!("{}.bn", c.name),
                    1,
                    c.output,
                    InitializerSpec::Zeros,
                ));
                specs.push(dense_spec(
                    format!("{}.bn_stats", c.name),
                    2,
                    c.output,
                    InitializerSpec::Zeros,
                    OptimizerSpec::sgd(1.0),
                    seed,
                ));
            }
        }
        specs.push(dense(
            format!("{}.out.w", self.name),
            self.width,
            self.classes,
            // Glorot-like: a softmax layer starts near uniform.
            InitializerSpec::Normal {
                mean: 0.0,
                std: (1.0 / self.width.max(1) as f32).sqrt(),
            },
        ));
        specs.push(dense(
            format!("{}.out.b", self.name),
            1,
            self.classes,
            InitializerSpec::Zeros,
        ));
        specs
    }
}

impl ModelConfig {
    /// Checks the image models' keys.
    pub(super) fn validate_conv_net(&self) -> Result<(), (String, String)> {
        let (name, momentum, optimizer) = match self {
            ModelConfig::Resnet(c) => {
                if c.stages.is_empty() {
                    return Err(("model.stages".into(), "needs at least one stage".into()));
                }
                if !(1..=64).contains(&c.blocks) {
                    return Err(("model.blocks".into(), "must be between 1 and 64".into()));
                }
                let stages = c.stages.iter().map(|&w| ("stages".to_string(), w));
                validate_widths(
                    c.classes,
                    std::iter::once(("stem".to_string(), c.stem)).chain(stages),
                )?;
                (&c.name, c.bn_momentum, &c.optimizer)
            }
            ModelConfig::Inception(c) => {
                if c.modules.is_empty() || c.modules.len() > 64 {
                    return Err((
                        "model.modules".into(),
                        "needs between 1 and 64 modules".into(),
                    ));
                }
                let mut widths = vec![("stem".to_string(), c.stem)];
                for (i, m) in c.modules.iter().enumerate() {
                    for (key, w) in [
                        ("b1", m.b1),
                        ("b3_reduce", m.b3_reduce),
                        ("b3", m.b3),
                        ("b5_reduce", m.b5_reduce),
                        ("b5", m.b5),
                        ("pool", m.pool),
                        ("(their sum)", m.width()),
                    ] {
                        widths.push((format!("modules[{i}].{key}"), w));
                    }
                }
                validate_widths(c.classes, widths)?;
                (&c.name, c.bn_momentum, &c.optimizer)
            }
            _ => return Ok(()),
        };
        if name.len() > 100 || crate::names::validate_table_name(name).is_err() {
            return Err((
                "model.name".into(),
                "must be 1-100 characters from [A-Za-z0-9_.-]".into(),
            ));
        }
        if !(0.0..1.0).contains(&momentum) {
            return Err(("model.bn_momentum".into(), "must be in [0, 1)".into()));
        }
        optimizer
            .validate()
            .map_err(|e| ("model.optimizer".into(), e.to_string()))
    }
}

/// He initialization for `fan_in` inputs.
fn he(fan_in: u32) -> InitializerSpec {
    InitializerSpec::Normal {
        mean: 0.0,
        std: (2.0 / fan_in.max(1) as f32).sqrt(),
    }
}

/// Checks a multi-class model's `classes`.
pub(super) fn validate_classes(classes: u32) -> Result<(), (String, String)> {
    if !(2..=65_536).contains(&classes) {
        return Err(("model.classes".into(), "must be between 2 and 65536".into()));
    }
    Ok(())
}

/// Checks an image model's keys: the key at fault and what is wrong.
pub(super) fn validate_widths(
    classes: u32,
    widths: impl IntoIterator<Item = (String, u32)>,
) -> Result<(), (String, String)> {
    validate_classes(classes)?;
    for (field, width) in widths {
        if !(1..=MAX_CHANNELS).contains(&width) {
            return Err((
                format!("model.{field}"),
                format!("a layer needs between 1 and {MAX_CHANNELS} channels, got {width}"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resnet() -> ResnetConfig {
        ResnetConfig {
            name: "r".into(),
            classes: 10,
            stem: 8,
            stages: vec![8, 16],
            blocks: 2,
            batch_norm: true,
            bn_momentum: 0.9,
            optimizer: OptimizerSpec::sgd(0.1),
        }
    }

    #[test]
    fn a_resnet_projects_only_where_width_or_resolution_changes() {
        let net = ConvNet::resnet(&resnet(), 1);
        let Body::Resnet(blocks) = &net.body else {
            panic!("a resnet has residual blocks");
        };
        assert_eq!(blocks.len(), 4);
        let strides: Vec<u32> = blocks.iter().map(|b| b.first.stride).collect();
        assert_eq!(strides, [1, 1, 2, 1]);
        let projected: Vec<bool> = blocks.iter().map(|b| b.projection.is_some()).collect();
        assert_eq!(projected, [false, false, true, false]);
        assert_eq!(net.width, 16);
        assert!(blocks.iter().all(|b| b.first.relu && !b.second.relu));
    }

    #[test]
    fn tables_follow_the_layers_with_their_shapes() {
        let net = ConvNet::resnet(&resnet(), 3);
        let specs = net.table_specs(1);
        // The stem, 4 blocks of 2 and one projection: 10 convolutions x 4
        // tables, then the output layer's 2.
        assert_eq!(specs.len(), 10 * 4 + 2);
        assert_eq!(specs[0].name, "r.stem.w");
        assert_eq!(specs[0].kind.rows(), Some(27), "3x3 kernel over 3 channels");
        assert_eq!(specs[0].dim, 8);
        let out = &specs[specs.len() - 2];
        assert_eq!(
            (out.name.as_str(), out.kind.rows(), out.dim),
            ("r.out.w", Some(16), 10)
        );
    }

    #[test]
    fn an_inception_module_concatenates_its_branches() {
        let m = InceptionModuleConfig {
            b1: 4,
            b3_reduce: 2,
            b3: 6,
            b5_reduce: 2,
            b5: 3,
            pool: 5,
            downsample: true,
        };
        let net = ConvNet::inception(
            &InceptionConfig {
                name: "i".into(),
                classes: 3,
                stem: 8,
                modules: vec![m, m],
                batch_norm: false,
                bn_momentum: 0.9,
                optimizer: OptimizerSpec::sgd(0.1),
            },
            1,
        );
        assert_eq!(net.width, 18);
        let Body::Inception(modules) = &net.body else {
            panic!("an inception net has modules");
        };
        assert_eq!(
            modules[1].one.input, 18,
            "the second module reads the first's concat"
        );
        assert_eq!(modules[0].five[2].kernel, 3);
        assert_eq!(net.convs().len(), 1 + 2 * 7);
        assert_eq!(net.table_specs(1).len(), 15 * 2 + 2, "no batch-norm tables");
    }
}
