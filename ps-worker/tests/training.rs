//! Training quality through the in-process cluster (`ps-worker local`'s path).

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::io::Write;
use std::path::{Path, PathBuf};

use ps_common::config::JobConfig;
use ps_common::init::RowRng;
use ps_worker::job::{self, DEFAULT_JOB};
use ps_worker::metrics::auc;

fn client_config(job: &JobConfig) -> ps_worker::ClientConfig {
    job::client_config(job, std::time::Duration::from_secs(10))
}

fn default_job() -> JobConfig {
    JobConfig::from_toml(DEFAULT_JOB, Path::new(".")).unwrap()
}

#[test]
fn logistic_regression_on_a9a_with_one_worker_reaches_reference_quality() {
    let job = default_job();
    let report = job::run_local(&job, 1, 1, &client_config(&job), None).unwrap();
    let (auc, acc) = (report.val_auc.unwrap(), report.val_accuracy.unwrap());
    assert!(auc >= 0.895, "AUC {auc}");
    assert!(acc >= 0.845, "accuracy {acc}");
    assert_eq!(report.train_samples, 32_561 * job.train.epochs as u64);
    assert!(report.push_bytes > 0 && report.pull_bytes > 0);
}

#[test]
fn logistic_regression_on_a9a_with_two_async_workers_and_two_shards_reaches_reference_quality() {
    let job = default_job();
    let report = job::run_local(&job, 2, 2, &client_config(&job), None).unwrap();
    let (auc, acc) = (report.val_auc.unwrap(), report.val_accuracy.unwrap());
    assert!(auc >= 0.895, "AUC {auc}");
    assert!(acc >= 0.845, "accuracy {acc}");
    assert_eq!(
        report.train_samples,
        32_561 * job.train.epochs as u64,
        "every line read by exactly one worker"
    );
}

/// Writes `rows` examples of a planted sparse logistic model to `path` and
/// returns the oracle AUC (true probabilities as scores).
fn write_planted(path: &Path, rows: usize, seed: u64) -> f64 {
    const FEATURES: u64 = 500;
    let weight = |id: u64| {
        let mut rng = RowRng::new(1234, id);
        (rng.next_normal() * 1.5) as f32
    };
    let mut rng = RowRng::new(seed, 0);
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let (mut probs, mut labels) = (Vec::new(), Vec::new());
    for _ in 0..rows {
        let mut ids: Vec<u64> = (0..8).map(|_| 1 + rng.next_u64() % FEATURES).collect();
        ids.sort_unstable();
        ids.dedup();
        let logit: f32 = -0.5 + ids.iter().map(|&id| weight(id) * 0.5).sum::<f32>();
        let p = 1.0 / (1.0 + (-logit).exp());
        let label = if rng.next_f64() < f64::from(p) {
            1.0
        } else {
            0.0
        };
        write!(out, "{}", if label > 0.0 { "+1" } else { "-1" }).unwrap();
        for id in ids {
            write!(out, " {id}:0.5").unwrap();
        }
        writeln!(out).unwrap();
        probs.push(p);
        labels.push(label);
    }
    auc(&probs, &labels)
}

#[test]
fn logistic_regression_recovers_a_planted_model() {
    let dir = std::env::temp_dir().join(format!("ps-planted-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (train, test): (PathBuf, PathBuf) = (dir.join("train.libsvm"), dir.join("test.libsvm"));
    write_planted(&train, 40_000, 1);
    let oracle = write_planted(&test, 10_000, 2);
    let job_text = DEFAULT_JOB
        .replace("builtin:a9a/train", &train.display().to_string())
        .replace("builtin:a9a/test", &test.display().to_string());
    let job = JobConfig::from_toml(&job_text, &dir).unwrap();
    let report = job::run_local(&job, 2, 2, &client_config(&job), None).unwrap();
    let learned = report.val_auc.unwrap();
    assert!(
        learned > oracle - 0.01,
        "learned AUC {learned} vs oracle {oracle}"
    );
    std::fs::remove_dir_all(&dir).ok();
}
