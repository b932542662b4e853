//! The image models' gradients against finite differences of their loss,
//! their predicted distributions, and their CUDA parity, on small random
//! networks over a batch of 4 images of 5 x 4 pixels and 2 channels.

use std::path::Path;

use ps_common::config::JobConfig;

use super::tests::{assert_agree, check_gradients};
use super::*;
use crate::backend::Backend;
use crate::backend::conformance::Rng;
use crate::backend::cpu::CpuBackend;

/// Small image models (`[model]` bodies), 3 classes each.
const IMAGE_MODELS: &[(&str, &str)] = &[
    (
        "resnet",
        "kind = \"resnet\"\nclasses = 3\nstem = 3\nstages = [3, 4]\noptimizer = { kind = \"sgd\", lr = 0.1 }",
    ),
    (
        "resnet_two_blocks_no_bn",
        "kind = \"resnet\"\nclasses = 3\nstem = 2\nstages = [3]\nblocks = 2\nbatch_norm = false\noptimizer = { kind = \"sgd\", lr = 0.1 }",
    ),
    (
        "inception",
        "kind = \"inception\"\nclasses = 3\nstem = 3\noptimizer = { kind = \"sgd\", lr = 0.1 }\nmodules = [{ b1 = 2, b3_reduce = 2, b3 = 3, b5_reduce = 1, b5 = 2, pool = 2, downsample = true }, { b1 = 1, b3_reduce = 1, b3 = 2, b5_reduce = 1, b5 = 1, pool = 1 }]",
    ),
];

const IMAGE: (usize, usize, usize) = (5, 4, 2);

fn image_job(model: &str) -> JobConfig {
    let (h, w, c) = IMAGE;
    let src = format!(
        "[data]\nformat = \"pixels\"\ntrain = \"x.csv\"\n\
         image = {{ height = {h}, width = {w}, channels = {c} }}\n[model]\n{model}\n"
    );
    JobConfig::from_toml(&src, Path::new(".")).unwrap()
}

/// 4 random images with labels 0, 2, 1, 2 and random tables.
fn image_pulled(model: &Model, seed: u64) -> Pulled {
    let mut rng = Rng::new(seed);
    let (h, w, c) = IMAGE;
    let mut batch = Batch::new();
    for label in [0.0, 2.0, 1.0, 2.0] {
        batch.dense.extend(rng.vec(h * w * c));
        batch.push_features(&[], &[], &[], 1);
        let last = batch.labels.len() - 1;
        batch.labels[last] = label;
    }
    model.pulled_from(&batch, |t, n| {
        // Weights of the scale of their initialization.
        let scale = if t.name.ends_with(".w") { 0.5 } else { 0.2 };
        rng.vec(n).into_iter().map(|v| v * scale).collect()
    })
}

#[test]
fn every_image_model_s_gradients_match_finite_differences() {
    for &(name, body) in IMAGE_MODELS {
        let model = Model::from_job(&image_job(body));
        assert!(
            model.sparse_tables().is_empty(),
            "{name}: dense tables only"
        );
        check_gradients(name, &model, &image_pulled(&model, 3));
    }
}

#[test]
fn an_image_model_predicts_a_distribution_over_its_classes() {
    let model = Model::from_job(&image_job(IMAGE_MODELS[0].1));
    assert_eq!((model.tasks(), model.outputs()), (1, 3));
    let p = image_pulled(&model, 4);
    let out = model.compute(&CpuBackend, &p, Mode::Eval).unwrap();
    assert_eq!(out.probs.len(), 4 * 3);
    for dist in out.probs.chunks(3) {
        assert!((dist.iter().sum::<f32>() - 1.0).abs() < 1e-5, "{dist:?}");
        assert!(dist.iter().all(|&q| q > 0.0));
    }
    // The loss is the cross-entropy of those probabilities.
    let loss: f64 = out
        .probs
        .chunks(3)
        .zip(&p.labels)
        .map(|(dist, &y)| -f64::from(dist[y as usize]).ln())
        .sum();
    assert!(
        (loss - out.loss_sum).abs() < 1e-4 * loss,
        "{loss} vs {}",
        out.loss_sum
    );
}

#[test]
fn wrong_images_or_labels_are_errors_not_panics() {
    let model = Model::from_job(&image_job(IMAGE_MODELS[0].1));
    let mut p = image_pulled(&model, 5);
    p.labels[1] = 3.0;
    let err = model.compute(&CpuBackend, &p, Mode::Eval).unwrap_err();
    assert!(
        err.to_string()
            .contains("label 3 is not a class index in 0..3"),
        "{err}"
    );
    let mut p = image_pulled(&model, 5);
    p.inputs.pop();
    let err = model.compute(&CpuBackend, &p, Mode::Eval).unwrap_err();
    assert!(
        err.to_string().contains("for 4 images of 5 x 4 x 2"),
        "{err}"
    );
}

#[test]
fn every_image_model_on_cuda_agrees_with_the_cpu() {
    use crate::backend::cuda::{CudaBackend, availability};
    if let Some(why) = availability().unwrap().skip_reason() {
        println!("SKIPPED ({why})");
        return;
    }
    let cuda = CudaBackend::new(0).unwrap();
    for &(name, body) in IMAGE_MODELS {
        let model = Model::from_job(&image_job(body));
        let p = image_pulled(&model, 6);
        for mode in [Mode::Train { seed: 1 }, Mode::Eval] {
            let want = model.compute(&CpuBackend, &p, mode).unwrap();
            let got = model.compute(&cuda, &p, mode).unwrap();
            assert_agree(&format!("{name} {mode:?}"), &model, &got, &want);
        }
    }
    println!(
        "{} image models agree on {}",
        IMAGE_MODELS.len(),
        cuda.name()
    );
}
