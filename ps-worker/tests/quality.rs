//! Models that learn well out of the box: the shipped examples' settings,
//! pointed at generated data whose answer is known, reach the oracle.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::io::Write;
use std::path::{Path, PathBuf};

use ps_common::config::JobConfig;
use ps_common::init::RowRng;
use ps_worker::job;
use ps_worker::metrics::auc;

/// A folder of this test's own, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("ps-quality-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.0).ok();
    }
}

/// Users and items of the planted interaction data.
const USERS: u64 = 100;
const ITEMS: u64 = 100;
const LATENT: usize = 4;

/// A latent vector of `id`, N(0, 1) per coordinate.
fn latent(id: u64) -> [f64; LATENT] {
    let mut rng = RowRng::new(77, id);
    std::array::from_fn(|_| rng.next_normal())
}

/// Writes `rows` libsvm examples `label user:1 item:1` whose label follows
/// only the user x item interaction, `sigmoid(1.5 <u, i>)` (no feature
/// carries signal alone), and returns the oracle AUC.
fn write_interactions(path: &Path, rows: usize, seed: u64) -> f64 {
    let mut rng = RowRng::new(seed, 0);
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let (mut probs, mut labels) = (Vec::new(), Vec::new());
    for _ in 0..rows {
        let user = 1 + rng.next_u64() % USERS;
        let item = 1 + USERS + rng.next_u64() % ITEMS;
        let (u, i) = (latent(user), latent(item));
        let dot: f64 = u.iter().zip(&i).map(|(a, b)| a * b).sum();
        let p = 1.0 / (1.0 + (-1.5 * dot).exp());
        let label = rng.next_f64() < p;
        writeln!(out, "{} {user}:1 {item}:1", if label { "+1" } else { "-1" }).unwrap();
        probs.push(p as f32);
        labels.push(if label { 1.0 } else { 0.0 });
    }
    auc(&probs, &labels)
}

/// `example` (a file under `examples/`) with its data paths changed to
/// `train` and `test`, as a user pointing it at their data would.
fn example_on(example: &str, train: &Path, test: &Path, dir: &Path) -> JobConfig {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../examples")
            .join(example),
    )
    .unwrap()
    .replace("builtin:a9a/train", &train.display().to_string())
    .replace("builtin:a9a/test", &test.display().to_string());
    JobConfig::from_toml(&text, dir).unwrap()
}

#[test]
fn fm_with_the_examples_settings_learns_a_planted_interaction() {
    let dir = TempDir::new("fm");
    let (train, test) = (dir.0.join("train.libsvm"), dir.0.join("test.libsvm"));
    write_interactions(&train, 60_000, 1);
    let oracle = write_interactions(&test, 10_000, 2);
    let job = example_on("a9a-fm.toml", &train, &test, &dir.0);
    let config = job::client_config(&job, std::time::Duration::from_secs(10));
    let report = job::run_local(&job, 1, 2, &config, None).unwrap();
    let learned = report.val_auc.unwrap();
    eprintln!("FM on planted interactions: AUC {learned:.4}, oracle {oracle:.4}");
    assert!(
        learned > oracle - 0.01,
        "learned AUC {learned} vs oracle {oracle}"
    );
}

/// Per-epoch validation reads the model at one point (every worker's pushes
/// of the epoch applied, none of the next one's): each epoch's AUC is
/// exactly the AUC of the checkpoint written for that epoch, re-evaluated,
/// though two asynchronous workers train on.
#[test]
fn each_epochs_validation_auc_is_its_checkpoints_auc() {
    let dir = TempDir::new("epochs");
    let mut job = JobConfig::from_toml(job::DEFAULT_JOB, &dir.0).unwrap();
    job.train.epochs = 3;
    job.train.epoch_checkpoint = Some("epoch-{epoch}".into());
    let config = job::client_config(&job, std::time::Duration::from_secs(10));
    let report = job::run_local(&job, 2, 2, &config, Some(dir.0.clone())).unwrap();
    let validation = job.data.validation.clone().unwrap();
    for record in &report.epochs {
        let validated = record.val_auc.unwrap();
        let checkpoint = dir.0.join(format!("epoch-{}", record.epoch));
        let evaluated = job::run_eval(&job, &[checkpoint], &validation).unwrap()[0].auc;
        eprintln!(
            "epoch {}: validated {validated}, its checkpoint {evaluated}",
            record.epoch
        );
        assert!(
            (evaluated - validated).abs() <= 1e-9,
            "epoch {}: validated {validated}, checkpoint {evaluated}",
            record.epoch
        );
    }
}
