//! Worker processes for the process tests: the a9a job on disk (and edited
//! copies), `ps-worker` commands, their reports, and waiting on servers.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use super::{Server, binary, stats_of};

/// The example job with the a9a files read from disk (not the built-in copy).
pub fn a9a_job(dir: &Path) -> PathBuf {
    a9a_job_edited(dir, "job.toml", &[])
}

/// [`a9a_job`] with each `(from, to)` text replacement applied, written to
/// `dir/name`.
pub fn a9a_job_edited(dir: &Path, name: &str, edits: &[(&str, &str)]) -> PathBuf {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/a9a");
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/a9a-lr.toml"),
    )
    .unwrap()
    .replace(
        "builtin:a9a/train",
        &data.join("a9a.train.libsvm").display().to_string(),
    )
    .replace(
        "builtin:a9a/test",
        &data.join("a9a.test.libsvm").display().to_string(),
    );
    let text = edits
        .iter()
        .fold(text, |text, (from, to)| text.replace(from, to));
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

pub fn worker(args: &[&str]) -> Command {
    let mut cmd = Command::new(binary("ps-worker"));
    cmd.args(args).env("RUST_LOG", "warn");
    cmd
}

/// Starts worker `rank` of `world` of `job`, its report going to `report`.
pub fn spawn_worker(job: &Path, addrs: &str, rank: usize, world: usize, report: &Path) -> Child {
    worker(&[
        "train",
        "--config",
        job.to_str().unwrap(),
        "--servers",
        addrs,
        "--rank",
        &rank.to_string(),
        "--world",
        &world.to_string(),
        "--report",
        report.to_str().unwrap(),
    ])
    .stdout(Stdio::null())
    .spawn()
    .unwrap()
}

/// Waits for a worker; returns its report.
pub fn report_of(mut child: Child, report: &Path) -> serde_json::Value {
    assert!(child.wait().unwrap().success(), "worker failed");
    serde_json::from_str(&std::fs::read_to_string(report).unwrap()).unwrap()
}

/// Starts `world` `ps-worker train` processes of `job`; each writes its
/// report to `dir/{prefix}-{rank}.json`. Waits for them; returns the reports.
pub fn run_workers(
    job: &Path,
    addrs: &str,
    world: usize,
    dir: &Path,
    prefix: &str,
) -> Vec<serde_json::Value> {
    let workers: Vec<(Child, PathBuf)> = (0..world)
        .map(|rank| {
            let report = dir.join(format!("{prefix}-{rank}.json"));
            (spawn_worker(job, addrs, rank, world, &report), report)
        })
        .collect();
    workers
        .into_iter()
        .map(|(child, report)| report_of(child, &report))
        .collect()
}

pub fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Two primaries, each with a backup process that has joined it.
pub fn replicated_shards(dir: &Path) -> ([Server; 2], [Server; 2]) {
    let primaries = [Server::primary(dir, 0, 2), Server::primary(dir, 1, 2)];
    let backups = [
        Server::backup_of(dir, &primaries[0], 0, 2),
        Server::backup_of(dir, &primaries[1], 1, 2),
    ];
    (primaries, backups)
}

/// Waits until shard `addr` has applied `n` push calls.
pub fn wait_for_pushes(addr: &str, n: u64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while stats_of(addr).requests.unwrap().updates_applied < n {
        assert!(
            std::time::Instant::now() < deadline,
            "training never got going"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
