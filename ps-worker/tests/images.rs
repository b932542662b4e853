//! The image models through the parameter servers: the shipped digits
//! examples reach their accuracy targets, and a ResNet trains under every
//! consistency mode.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::path::Path;

use ps_common::config::JobConfig;
use ps_worker::job;

/// `examples/{name}` (its data is compiled in) with each `(from, to)` of
/// `edits` applied to its text.
fn example(name: &str, edits: &[(&str, &str)]) -> JobConfig {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut text = std::fs::read_to_string(dir.join(name)).unwrap();
    for (from, to) in edits {
        assert!(text.contains(from), "{name} has {from:?}");
        text = text.replace(from, to);
    }
    JobConfig::from_toml(&text, &dir).unwrap()
}

fn train(job: &JobConfig, servers: u32, workers: usize) -> job::Report {
    let config = job::client_config(job, std::time::Duration::from_secs(10));
    job::run_local(job, servers, workers, &config, None).unwrap()
}

#[test]
fn the_digits_examples_reach_97_percent_top1_accuracy() {
    for name in ["digits-resnet.toml", "digits-inception.toml"] {
        let report = train(&example(name, &[]), 2, 2);
        let top1 = report.val_accuracy.unwrap();
        eprintln!(
            "{name}: top-1 {top1:.4}, logloss {:.4}, macro AUC {:.4}, {:.1}s",
            report.val_logloss.unwrap(),
            report.val_auc.unwrap(),
            report.train_seconds
        );
        assert_eq!((report.classes, report.val_examples), (10, 359), "{name}");
        assert!(top1 >= 0.97, "{name}: top-1 accuracy {top1}");
    }
}

#[test]
fn a_resnet_trains_under_every_consistency_mode() {
    for consistency in [
        "consistency = \"ssp\"\nstaleness = 1",
        "consistency = \"bsp\"",
        "consistency = \"hybrid\"",
    ] {
        let job = example(
            "digits-resnet.toml",
            &[
                ("[train]\n", &format!("[train]\n{consistency}\n")),
                ("epochs = 12", "epochs = 4"),
            ],
        );
        let report = train(&job, 2, 2);
        let top1 = report.val_accuracy.unwrap();
        eprintln!("resnet under {consistency:?}: top-1 {top1:.4} after 4 epochs");
        assert!(top1 >= 0.9, "{consistency}: top-1 accuracy {top1}");
    }
}
