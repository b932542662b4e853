//! How a job's configuration becomes a [`Model`]: which tables it reads,
//! the MLP layers, towers, experts and heads over them, and the image
//! models' dense-only shape.

use ps_common::config::{
    ConvNet, CrossAttentionConfig, Device, ImageConfig, JobConfig, MlpConfig, ModelConfig,
    TaskEmbeddingConfig,
};

use super::{Head, Layer, Mlp, Model, TableUse, convnet, fm, tasks};

impl Model {
    /// The model a job configures.
    pub fn from_job(job: &JobConfig) -> Model {
        if let Some(image) = job.data.image
            && let Some(net) = job.model.conv_net(image.channels)
        {
            return Model::images(job, net, image);
        }
        let mut sparse = Vec::new();
        let mut dense = Vec::new();
        let classes = job.model.classes().max(1) as usize;
        let linear = job.model.weights_table().map(|weights| {
            sparse.push(TableUse {
                name: weights.into(),
                rows: None,
                dim: classes,
                statistic: false,
            });
            sparse.len() - 1
        });
        let declared_bias = job.model.bias_table().map(|bias| {
            dense.push(TableUse {
                name: bias.into(),
                rows: Some(1),
                dim: classes,
                statistic: false,
            });
            dense.len() - 1
        });
        let k = job
            .model
            .embeddings_table()
            .and_then(|e| job.tables.get(e).map(|t| (e, t.dim as usize)));
        let embeddings = k.map(|(name, dim)| {
            sparse.push(TableUse {
                name: name.into(),
                rows: None,
                dim,
                statistic: false,
            });
            sparse.len() - 1
        });
        let fields = job.data.fields as usize;
        let dense_inputs = job.data.dense_inputs() as usize;
        let input = fields * k.map_or(0, |(_, d)| d) + dense_inputs;
        // The generated tables, in the order the config lists them.
        let first = dense.len();
        dense.extend(
            job.model
                .generated_table_specs(input as u32, job.train.seed)
                .iter()
                .map(TableUse::generated),
        );
        // A multi-class FM's class weights.
        let fm_classes = job
            .model
            .fm_classes_spec(&job.tables, job.train.seed)
            .map(|spec| {
                dense.push(TableUse::generated(&spec));
                dense.len() - 1
            });
        let fm = match (&job.model, fm_classes) {
            (_, Some(table)) => Some(fm::Fm::PerClass(table)),
            (ModelConfig::Fm { .. } | ModelConfig::Deepfm { .. }, None) => Some(fm::Fm::Summed),
            _ => None,
        };
        let index = |name: &str| dense.iter().position(|t| t.name == name);
        let mlp = |config: &MlpConfig, prefix: &str, input: usize, salt: u64| {
            let mut width = input;
            let layers = config
                .hidden
                .iter()
                .enumerate()
                .map(|(i, &out)| {
                    let layer = Layer {
                        input: width,
                        output: out as usize,
                        dense: index(&format!("{prefix}.{i}.w")).unwrap_or(first),
                    };
                    width = out as usize;
                    layer
                })
                .collect();
            Mlp {
                layers,
                out: index(&format!("{prefix}.out.w")),
                dropout: config.dropout,
                batch_norm: config.batch_norm,
                momentum: config.bn_momentum,
                residual: config.residual,
                salt,
            }
        };
        let (mut task_embedding, mut cross) = (None, None);
        let (shared, experts, heads) = match &job.model {
            ModelConfig::Multitask {
                tasks,
                shared: shared_config,
                tower,
                experts: experts_config,
                task_embedding: task_embedding_config,
                cross_attention,
                ..
            } => {
                task_embedding = task_embedding_config.map(|te| tasks::TaskEmbedding {
                    table: index(&TaskEmbeddingConfig::table(tower)).unwrap_or(first),
                    dim: te.dim as usize,
                });
                let shared_input = input + task_embedding.as_ref().map_or(0, |te| te.dim);
                let shared = shared_config
                    .as_ref()
                    .map(|c| mlp(c, &c.name, shared_input, 1 << 40));
                let experts: Vec<Mlp> = experts_config
                    .iter()
                    .flat_map(|c| {
                        (0..c.count).map(move |e| {
                            mlp(
                                &c.mlp,
                                &format!("{}.{e}", c.mlp.name),
                                input,
                                (u64::from(e) + 1) << 48,
                            )
                        })
                    })
                    .collect();
                let width = shared_config
                    .as_ref()
                    .and_then(|c| c.hidden.last())
                    .or(experts_config.as_ref().and_then(|c| c.mlp.hidden.last()))
                    .map_or(input, |&w| w as usize);
                cross = cross_attention.map(|ca| tasks::CrossAttention {
                    heads: ca.heads as usize,
                    dim: ca.dim as usize,
                    encoders: tasks
                        .iter()
                        .map(|t| {
                            let enc = CrossAttentionConfig::encoder(tower, &t.name);
                            index(&format!("{enc}.w")).unwrap_or(first)
                        })
                        .collect(),
                    projections: ["q", "k", "v", "o"].map(|which| {
                        index(&CrossAttentionConfig::projection(tower, which)).unwrap_or(first)
                    }),
                    // Filled as the heads are built: each tower's output layer.
                    outs: Vec::new(),
                });
                let heads = tasks
                    .iter()
                    .enumerate()
                    .map(|(t, task)| {
                        let prefix = format!("{}.{}", tower.name, task.name);
                        let mut tower = mlp(tower, &prefix, width, (t as u64 + 2) << 40);
                        if let Some(cross) = &mut cross {
                            // The output layer reads what the towers
                            // gathered from one another too.
                            cross.outs.push(tower.out.take().unwrap_or(first));
                        }
                        Head {
                            tower: Some(tower),
                            bias: index(&format!("{prefix}.bias")).unwrap_or(first),
                            classes: task.classes.unwrap_or(1).max(1) as usize,
                            weight: task.weight,
                            gate: index(&format!("{prefix}.gate")),
                        }
                    })
                    .collect();
                (shared, experts, heads)
            }
            config => (
                None,
                Vec::new(),
                vec![Head {
                    tower: config.mlp().map(|c| mlp(c, &c.name, input, 0)),
                    bias: declared_bias.unwrap_or(0),
                    classes,
                    weight: 1.0,
                    gate: None,
                }],
            ),
        };
        Model {
            sparse,
            dense,
            linear,
            embeddings,
            fm,
            fields,
            dense_inputs,
            shared,
            experts,
            heads,
            task_embedding,
            cross,
            frozen: job.train.freeze.iter().cloned().collect(),
            negative_rate: job.data.negative_sampling,
            conv: None,
            group_by_row: job.train.device != Device::Cpu,
        }
    }

    /// An image model: dense tables only, one softmax head.
    fn images(job: &JobConfig, net: ConvNet, image: ImageConfig) -> Model {
        let dense: Vec<TableUse> = net
            .table_specs(job.train.seed)
            .iter()
            .map(TableUse::generated)
            .collect();
        let conv = convnet::ConvModel::new(net, image, &dense);
        Model {
            sparse: Vec::new(),
            dense,
            linear: None,
            embeddings: None,
            fm: None,
            fields: 1,
            dense_inputs: image.pixels(),
            shared: None,
            experts: Vec::new(),
            task_embedding: None,
            cross: None,
            heads: vec![Head {
                tower: None,
                bias: 0,
                classes: conv.classes(),
                weight: 1.0,
                gate: None,
            }],
            frozen: job.train.freeze.iter().cloned().collect(),
            negative_rate: None,
            conv: Some(conv),
            group_by_row: false,
        }
    }
}
