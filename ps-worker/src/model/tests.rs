//! Each model's gradients against finite differences of its loss, on the
//! CPU backend, with random parameters and a batch with duplicate ids.

use std::path::Path;

use ps_common::config::{Device, JobConfig};

use super::*;
use crate::backend::conformance::Rng;
use crate::backend::cpu::CpuBackend;
use crate::backend::{Backend, Pooling};

/// A job for `model` (a `[model]` body) with 4-dim embeddings and 3 fields.
pub(crate) fn job(model: &str) -> JobConfig {
    job_with("train = \"builtin:a9a/train\"\nfields = 3", model)
}

/// As [`job`], with `data` as the `[data]` section. With `classes = C` in
/// `model`, the weights and the bias hold C values.
fn job_with(data: &str, model: &str) -> JobConfig {
    let outputs = model
        .lines()
        .find_map(|line| line.strip_prefix("classes = "))
        .unwrap_or("1");
    let src = format!(
        r#"
[data]
{data}
[model]
{model}
[tables.weights]
kind = "sparse"
dim = {outputs}
initializer = {{ kind = "zeros" }}
optimizer = {{ kind = "sgd", lr = 0.1 }}
[tables.bias]
kind = "dense"
rows = 1
dim = {outputs}
initializer = {{ kind = "zeros" }}
optimizer = {{ kind = "sgd", lr = 0.1 }}
[tables.embeddings]
kind = "sparse"
dim = 4
initializer = {{ kind = "normal", std = 0.1 }}
optimizer = {{ kind = "sgd", lr = 0.1 }}
"#
    );
    JobConfig::from_toml(&src, Path::new(".")).unwrap()
}

pub(crate) const MODELS: &[(&str, &str)] = &[
    ("lr", "kind = \"lr\""),
    ("fm", "kind = \"fm\""),
    (
        "deepfm",
        "kind = \"deepfm\"\nmlp = { hidden = [6, 6], optimizer = { kind = \"sgd\", lr = 0.1 } }",
    ),
    (
        "deepfm_bn_dropout",
        "kind = \"deepfm\"\nmlp = { hidden = [5, 5, 3], dropout = 0.3, batch_norm = true, optimizer = { kind = \"sgd\", lr = 0.1 } }",
    ),
    (
        "wide_deep",
        "kind = \"wide_deep\"\nmlp = { hidden = [4], residual = false, optimizer = { kind = \"sgd\", lr = 0.1 } }",
    ),
    (
        "dnn_linear",
        "kind = \"dnn\"\nmlp = { hidden = [], optimizer = { kind = \"sgd\", lr = 0.1 } }",
    ),
    (
        "multitask_shared",
        "kind = \"multitask\"\ntasks = [{ name = \"click\" }, { name = \"buy\", weight = 0.5 }]\nshared = { hidden = [6], optimizer = { kind = \"sgd\", lr = 0.1 } }\ntower = { hidden = [4], optimizer = { kind = \"sgd\", lr = 0.1 } }",
    ),
    (
        "multitask_towers_bn_dropout",
        "kind = \"multitask\"\ntasks = [{ name = \"a\" }, { name = \"b\", weight = 2.0 }, { name = \"c\" }]\ntower = { hidden = [5, 5], batch_norm = true, dropout = 0.2, optimizer = { kind = \"sgd\", lr = 0.1 } }",
    ),
    (
        "mmoe",
        "kind = \"multitask\"\ntasks = [{ name = \"click\" }, { name = \"buy\", weight = 0.5 }]\nexperts = { count = 3, mlp = { name = \"expert\", hidden = [5], optimizer = { kind = \"sgd\", lr = 0.1 } } }\ntower = { hidden = [4], optimizer = { kind = \"sgd\", lr = 0.1 } }",
    ),
    (
        "dnn",
        "kind = \"dnn\"\nmlp = { hidden = [7, 7], batch_norm = true, optimizer = { kind = \"sgd\", lr = 0.1 } }",
    ),
    (
        "task_embedding",
        "kind = \"multitask\"\ntasks = [{ name = \"click\" }, { name = \"buy\", weight = 0.5 }]\nshared = { hidden = [6], optimizer = { kind = \"sgd\", lr = 0.1 } }\ntower = { hidden = [4], optimizer = { kind = \"sgd\", lr = 0.1 } }\ntask_embedding = { dim = 3 }",
    ),
    (
        "cross_attention",
        "kind = \"multitask\"\ntasks = [{ name = \"a\" }, { name = \"b\" }, { name = \"c\", weight = 2.0 }]\nshared = { hidden = [6], optimizer = { kind = \"sgd\", lr = 0.1 } }\ntower = { hidden = [4], optimizer = { kind = \"sgd\", lr = 0.1 } }\ncross_attention = { heads = 2, dim = 4 }",
    ),
    (
        "cross_attention_task_embedding",
        "kind = \"multitask\"\ntasks = [{ name = \"click\" }, { name = \"buy\" }]\nshared = { hidden = [5], optimizer = { kind = \"sgd\", lr = 0.1 } }\ntower = { hidden = [3], optimizer = { kind = \"sgd\", lr = 0.1 } }\ntask_embedding = { dim = 2 }\ncross_attention = { heads = 1, dim = 3 }",
    ),
    (
        "cross_attention_mmoe",
        "kind = \"multitask\"\ntasks = [{ name = \"click\" }, { name = \"buy\" }]\nexperts = { count = 2, mlp = { name = \"expert\", hidden = [5], optimizer = { kind = \"sgd\", lr = 0.1 } } }\ntower = { hidden = [3], optimizer = { kind = \"sgd\", lr = 0.1 } }\ncross_attention = { heads = 2, dim = 4 }",
    ),
    ("lr_classes", "kind = \"lr\"\nclasses = 3"),
    ("fm_classes", "kind = \"fm\"\nclasses = 3"),
    (
        "multitask_classes",
        "kind = \"multitask\"\ntasks = [{ name = \"click\" }, { name = \"topic\", classes = 3, weight = 0.5 }]\nshared = { hidden = [6], optimizer = { kind = \"sgd\", lr = 0.1 } }\ntower = { hidden = [4], optimizer = { kind = \"sgd\", lr = 0.1 } }",
    ),
    (
        "cross_attention_classes",
        "kind = \"multitask\"\ntasks = [{ name = \"a\", classes = 4 }, { name = \"b\" }]\nshared = { hidden = [5], optimizer = { kind = \"sgd\", lr = 0.1 } }\ntower = { hidden = [3], optimizer = { kind = \"sgd\", lr = 0.1 } }\ncross_attention = { heads = 1, dim = 3 }",
    ),
    (
        "deepfm_classes",
        "kind = \"deepfm\"\nclasses = 4\nmlp = { hidden = [5], optimizer = { kind = \"sgd\", lr = 0.1 } }",
    ),
    (
        "wide_deep_classes",
        "kind = \"wide_deep\"\nclasses = 4\nmlp = { hidden = [5], optimizer = { kind = \"sgd\", lr = 0.1 } }",
    ),
    (
        "dnn_classes",
        "kind = \"dnn\"\nclasses = 3\nmlp = { hidden = [6, 6], batch_norm = true, optimizer = { kind = \"sgd\", lr = 0.1 } }",
    ),
];

/// A batch of 6 examples over 5 distinct ids (with repeats) in 3 fields.
pub(crate) fn batch() -> Batch {
    Batch {
        labels: vec![1.0, 0.0, 1.0, 0.0, 0.0, 1.0],
        offsets: vec![0, 3, 5, 8, 9, 11, 14],
        ids: vec![1, 2, 3, 2, 4, 1, 1, 5, 3, 4, 2, 5, 3, 1],
        values: vec![
            1.0, 0.5, -1.0, 1.0, 2.0, 1.0, 0.5, 1.0, 1.0, -0.5, 1.0, 1.0, 1.5, 1.0,
        ],
        fields: vec![0, 1, 2, 1, 0, 0, 2, 1, 2, 0, 1, 1, 2, 0],
        dense: Vec::new(),
    }
}

/// Random values for every pulled table; labels for every task (class
/// indices for a multi-class model).
pub(crate) fn pulled(model: &Model, batch: &Batch, seed: u64) -> Pulled {
    let mut rng = Rng::new(seed);
    let mut batch = batch.clone();
    let tasks = model.tasks();
    let values: Vec<usize> = model.task_classes().iter().map(|&c| c.max(2)).collect();
    batch.labels = (0..batch.len() * tasks)
        .map(|i| ((i / tasks + i % tasks + (i / tasks) / 2) % values[i % tasks]) as f32)
        .collect();
    model.pulled_from(&batch, |t, n| {
        let scale = if t.rows.is_some() { 0.5 } else { 1.0 };
        rng.vec(n).into_iter().map(|v| v * scale).collect()
    })
}

fn mean_loss(model: &Model, p: &Pulled, mode: Mode) -> f64 {
    model.compute(&CpuBackend, p, mode).unwrap().loss_sum / p.plan.examples as f64
}

#[test]
fn every_model_s_gradients_match_finite_differences() {
    let b = batch();
    for &(name, body) in MODELS {
        let model = Model::from_job(&job(body));
        check_gradients(name, &model, &pulled(&model, &b, 7));
    }
}

/// Numeric columns fed to the MLP (`data.numeric.dense`): the first
/// layer takes them beside the pooled embeddings, they change the
/// prediction, and every gradient still matches finite differences.
#[test]
fn dense_inputs_join_the_mlp_input_and_gradients_still_match() {
    let data = |labels: &str| {
        format!(
            "format = \"csv\"\ntrain = \"x.csv\"\nfields = 3\nintegers = \"value\"\n\
             numeric = {{ dense = true }}\n\
             csv = {{ label = {labels}, numeric = [\"a\", \"b\"], categorical = [\"c\"] }}"
        )
    };
    let mut b = batch();
    b.dense = vec![
        0.5, -1.0, 2.0, 0.0, 1.0, 1.0, -0.5, 0.25, 0.0, 3.0, 1.5, -2.0,
    ];
    for &(name, body, labels) in &[
        (MODELS[2].0, MODELS[2].1, "\"y\""),
        (MODELS[8].0, MODELS[8].1, "[\"y\", \"z\"]"),
        (MODELS[9].0, MODELS[9].1, "\"y\""),
    ] {
        let model = Model::from_job(&job_with(&data(labels), body));
        let first = &model
            .dense_tables()
            .iter()
            .find(|t| t.name.ends_with(".0.w"));
        assert_eq!(first.and_then(|t| t.rows), Some(3 * 4 + 2), "{name}");
        let p = pulled(&model, &b, 7);
        check_gradients(name, &model, &p);
        let mut other = p.clone();
        other.inputs[0] += 1.0;
        let probs = |p: &Pulled| model.compute(&CpuBackend, p, Mode::Eval).unwrap().probs;
        assert_ne!(
            probs(&p)[0],
            probs(&other)[0],
            "{name}: the inputs are used"
        );
        other.inputs.pop();
        let err = model.compute(&CpuBackend, &other, Mode::Eval).unwrap_err();
        assert!(
            err.to_string().contains("2 numeric inputs per example"),
            "{err}"
        );
    }
}

/// Each gradient of `model` on `p` against central finite differences of
/// its mean loss. Where the loss bends within the step (a ReLU's kink: a
/// convolution has one per pixel and channel, so some lie that close), the
/// two one-sided differences disagree and the backward pass must match
/// one of them: the derivative on one side of the kink.
pub(crate) fn check_gradients(name: &str, model: &Model, p: &Pulled) {
    let mode = Mode::Train { seed: 42 };
    let grads = model.compute(&CpuBackend, p, mode).unwrap().grads.unwrap();
    // Small enough that batch norm over 6 examples stays locally linear.
    let h = 2e-3f32;
    let mut checked = 0;
    let l0 = mean_loss(model, p, mode);
    let tables = model.sparse_tables().len();
    for t in 0..tables + model.dense_tables().len() {
        let table = if t < tables {
            &model.sparse_tables()[t]
        } else {
            &model.dense_tables()[t - tables]
        };
        if table.name.ends_with(".bn_stats") {
            continue; // a moving-average push, not a gradient
        }
        let (values, grad) = if t < tables {
            (&p.sparse[t], &grads.sparse[t])
        } else {
            (&p.dense[t - tables], &grads.dense[t - tables])
        };
        assert_eq!(values.len(), grad.len(), "{name}: {}", table.name);
        for i in 0..values.len() {
            let at = |delta: f32| {
                let mut q = p.clone();
                let slot = if t < tables {
                    &mut q.sparse[t]
                } else {
                    &mut q.dense[t - tables]
                };
                slot[i] += delta;
                mean_loss(model, &q, mode)
            };
            let (lp, lm) = (at(h), at(-h));
            let numeric = (lp - lm) / (2.0 * f64::from(h));
            let analytic = f64::from(grad[i]);
            let tol = crate::backend::conformance::gradient_tolerance(numeric, analytic, lp, lm, h);
            let (right, left) = ((lp - l0) / f64::from(h), (l0 - lm) / f64::from(h));
            if (numeric - analytic).abs() > tol && (right - left).abs() > tol {
                let one_side = (right - analytic).abs().min((left - analytic).abs());
                assert!(
                    one_side <= 2.0 * tol,
                    "{name}: {}[{i}] at a kink: one-sided differences {right} and {left} vs backward {analytic}",
                    table.name,
                );
                checked += 1;
                continue;
            }
            assert!(
                (numeric - analytic).abs() <= tol,
                "{name}: {}[{i}]: finite difference {numeric} vs backward {analytic} (tolerance {tol:.1e})",
                table.name,
            );
            checked += 1;
        }
    }
    assert!(checked > 5, "{name}: checked {checked} values");
}

#[test]
fn lr_computes_bias_plus_weighted_features() {
    let model = Model::from_job(&job("kind = \"lr\""));
    let b = Batch {
        labels: vec![1.0, 0.0],
        offsets: vec![0, 2, 5],
        ids: vec![1, 2, 2, 2, 3],
        values: vec![1.0, 0.5, 1.0, 2.0, -1.0],
        fields: Vec::new(),
        dense: Vec::new(),
    };
    let mut p = pulled(&model, &b, 1);
    p.sparse[0] = vec![0.5, -1.0, 2.0];
    p.dense[0] = vec![0.25];
    let out = model.compute(&CpuBackend, &p, Mode::Eval).unwrap();
    // 0.25 + 0.5 - 0.5 = 0.25; 0.25 - 1 - 2 - 2 = -4.75
    let expect = [0.25f32, -4.75].map(crate::backend::cpu::sigmoid);
    assert!((out.probs[0] - expect[0]).abs() < 1e-6 && (out.probs[1] - expect[1]).abs() < 1e-6);
    assert!(out.grads.is_none(), "evaluation computes no gradients");
    let train = model
        .compute(&CpuBackend, &p, Mode::Train { seed: 1 })
        .unwrap();
    assert!(train.probs.is_empty(), "training computes no probabilities");
    assert!(
        (train.loss_sum - out.loss_sum).abs() < 1e-9,
        "same loss either way"
    );
}

#[test]
fn multiclass_lr_is_a_softmax_over_each_class_s_weighted_features() {
    let model = Model::from_job(&job("kind = \"lr\"\nclasses = 3"));
    assert_eq!(model.outputs(), 3);
    assert_eq!(model.sparse_tables()[0].dim, 3, "a weight per class");
    let b = Batch {
        labels: vec![2.0, 0.0],
        offsets: vec![0, 2, 3],
        ids: vec![1, 2, 2],
        values: vec![1.0, 2.0, -1.0],
        fields: Vec::new(),
        dense: Vec::new(),
    };
    let mut p = pulled(&model, &b, 1);
    p.labels = b.labels.clone();
    // id 1: (1, 0, 0); id 2: (0, 0.5, -1); bias (0, 0, 0.5).
    p.sparse[0] = vec![1.0, 0.0, 0.0, 0.0, 0.5, -1.0];
    p.dense[0] = vec![0.0, 0.0, 0.5];
    let out = model.compute(&CpuBackend, &p, Mode::Eval).unwrap();
    let softmax = |z: [f64; 3]| {
        let total: f64 = z.iter().map(|v| v.exp()).sum();
        z.map(|v| v.exp() / total)
    };
    // Example 0: 1 * id1 + 2 * id2 + bias; example 1: -1 * id2 + bias.
    let expect = [softmax([1.0, 1.0, -1.5]), softmax([0.0, -0.5, 1.5])];
    let want_loss = -(expect[0][2].ln() + expect[1][0].ln());
    for (got, want) in out.probs.iter().zip(expect.iter().flatten()) {
        assert!((f64::from(*got) - want).abs() < 1e-6, "{got} vs {want}");
    }
    assert!((out.loss_sum - want_loss).abs() < 1e-5, "{}", out.loss_sum);
}

#[test]
fn the_mlp_tables_follow_the_layers() {
    let model = Model::from_job(&job(MODELS[3].1));
    let names: Vec<(&str, Option<usize>, usize)> = model
        .dense_tables()
        .iter()
        .map(|t| (t.name.as_str(), t.rows, t.dim))
        .collect();
    assert_eq!(
        names,
        [
            ("bias", Some(1), 1),
            ("mlp.0.w", Some(12), 5), // 3 fields x dim 4
            ("mlp.0.b", Some(1), 5),
            ("mlp.0.bn", Some(1), 5),
            ("mlp.0.bn_stats", Some(2), 5),
            ("mlp.1.w", Some(5), 5),
            ("mlp.1.b", Some(1), 5),
            ("mlp.1.bn", Some(1), 5),
            ("mlp.1.bn_stats", Some(2), 5),
            ("mlp.2.w", Some(5), 3),
            ("mlp.2.b", Some(1), 3),
            ("mlp.2.bn", Some(1), 3),
            ("mlp.2.bn_stats", Some(2), 3),
            ("mlp.out.w", Some(3), 1),
        ]
    );
}

#[test]
fn running_statistics_move_toward_the_batch_by_one_minus_momentum() {
    let model = Model::from_job(&job(MODELS[3].1));
    let b = batch();
    let mut p = pulled(&model, &b, 3);
    let stats = model
        .dense_tables()
        .iter()
        .position(|t| t.name == "mlp.0.bn_stats")
        .unwrap();
    p.dense[stats] = vec![0.0; 10]; // mean 0, var 1
    let grads = model
        .compute(&CpuBackend, &p, Mode::Train { seed: 1 })
        .unwrap()
        .grads
        .unwrap();
    // The first layer's pre-activation, computed independently.
    let cpu = CpuBackend;
    let v = cpu.upload(&p.sparse[1], p.keys.len(), 4).unwrap();
    let pooled = cpu.gather_pool(&v, &p.plan, Pooling::Field).unwrap();
    let x = cpu.reshape(pooled, 6, 12).unwrap();
    let w = cpu.upload(&p.dense[1], 12, 5).unwrap();
    let pre = cpu.matmul(&x, &w, false, false).unwrap();
    let mean = pre.mean_axis(ndarray::Axis(0)).unwrap();
    let var = pre.var_axis(ndarray::Axis(0), 0.0);
    // SGD with lr 1 makes the stored values `stored - push`; from mean 0 and
    // var 1 (stored 0) that is 0.1 * batch mean and 0.1 * (batch var - 1).
    let push = &grads.dense[stats];
    for c in 0..5 {
        assert!((-push[c] - 0.1 * mean[c]).abs() < 1e-5, "mean[{c}]");
        assert!(
            (-push[5 + c] - 0.1 * (var[c] - 1.0)).abs() < 1e-5,
            "var[{c}]"
        );
    }
}

#[test]
fn every_model_on_cuda_agrees_with_the_cpu() {
    use crate::backend::cuda::{CudaBackend, availability};
    if let Some(why) = availability().unwrap().skip_reason() {
        println!("SKIPPED ({why})");
        return;
    }
    // A device is there: any error from here on is a failure.
    let cuda = CudaBackend::new(0).unwrap();
    let b = batch();
    for &(name, body) in MODELS {
        let model = Model::from_job(&job(body));
        let p = pulled(&model, &b, 5);
        for mode in [Mode::Train { seed: 9 }, Mode::Eval] {
            let want = model.compute(&CpuBackend, &p, mode).unwrap();
            let got = model.compute(&cuda, &p, mode).unwrap();
            assert_agree(&format!("{name} {mode:?}"), &model, &got, &want);
        }
    }
    println!("{} models agree on {}", MODELS.len(), cuda.name());
}

/// Asserts that `got` (CUDA) and `want` (CPU) agree within 1e-4
/// relative error: the loss, the probabilities and every gradient.
pub(crate) fn assert_agree(name: &str, model: &Model, got: &Output, want: &Output) {
    let close = |what: &str, a: &[f32], b: &[f32]| {
        assert_eq!(a.len(), b.len(), "{name} {what}");
        let scale = b.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() / scale <= 1e-4, "{name} {what}: {x} vs {y}");
        }
    };
    close("loss", &[got.loss_sum as f32], &[want.loss_sum as f32]);
    close("probs", &got.probs, &want.probs);
    if let (Some(g), Some(w)) = (&got.grads, &want.grads) {
        for (t, (a, b)) in g.sparse.iter().zip(&w.sparse).enumerate() {
            close(&format!("sparse grad {t}"), a, b);
        }
        for (t, (a, b)) in g.dense.iter().zip(&w.dense).enumerate() {
            close(&model.dense_tables()[t].name, a, b);
        }
    }
}

#[test]
fn clipping_bounds_the_dense_norm_and_each_sparse_row() {
    let model = Model::from_job(&job(MODELS[3].1));
    let p = pulled(&model, &batch(), 2);
    let mut grads = model
        .compute(&CpuBackend, &p, Mode::Train { seed: 1 })
        .unwrap()
        .grads
        .unwrap();
    grads
        .dense
        .iter_mut()
        .for_each(|g| g.iter_mut().for_each(|v| *v *= 100.0));
    let stats_before = grads.dense[4].clone(); // mlp.0.bn_stats
    let before = model.clip(&mut grads, Some(0.5), Some(0.01));
    assert!(before > 0.5);
    let after = model.clip(&mut grads, None, None);
    assert!(
        (after - 0.5).abs() < 1e-4,
        "dense norm after clipping: {after}"
    );
    assert_eq!(grads.dense[4], stats_before, "statistics are not gradients");
    for (t, g) in model.sparse_tables().iter().zip(&grads.sparse) {
        for row in g.chunks(t.dim) {
            let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt();
            assert!(norm <= 0.01 + 1e-6, "{}: row norm {norm}", t.name);
        }
    }
}

#[test]
fn a_gpu_job_s_plan_groups_occurrences_by_row_ahead_and_a_cpu_job_s_does_not() {
    let mut cpu = job(MODELS[2].1);
    let (_, plan) = Model::from_job(&cpu).plan(&batch());
    assert!(
        !plan.is_grouped_by_row(),
        "the CPU backend never reads them"
    );
    cpu.train.device = Device::Cuda(0);
    let (_, plan) = Model::from_job(&cpu).plan(&batch());
    assert!(
        plan.is_grouped_by_row(),
        "built in the prefetcher, off the step"
    );
    // Grouping on first use gives the same groups.
    let (_, lazy) = Model::from_job(&job(MODELS[2].1)).plan(&batch());
    assert_eq!(lazy.by_row(), plan.by_row());
}
