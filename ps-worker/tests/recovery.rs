//! Restarts of real processes: servers restored from checkpoints, workers
//! resuming where they stopped, both after `kill -9`.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::workers::*;
use common::{Server, binary, temp_dir};

#[tokio::test]
async fn a_server_restored_from_a_checkpoint_serves_the_same_weights() {
    use ps_common::{InitializerSpec, OptimizerSpec, TableKind, TableSpec};
    use ps_worker::{ClientConfig, PsClient};

    let dir = temp_dir("restore");
    let spec = TableSpec {
        name: "emb".into(),
        kind: TableKind::Sparse,
        dim: 3,
        initializer: InitializerSpec::Normal {
            mean: 0.0,
            std: 0.1,
        },
        optimizer: OptimizerSpec::Adagrad {
            lr: 0.1,
            initial_accumulator: 0.1,
            eps: 1e-8,
            l2: 0.0,
            weight_decay: 0.0,
        },
        seed: 4,
        lifecycle: Default::default(),
    };
    let keys: Vec<u64> = (0..500).collect();
    let ckpt_root = dir.join("ckpt");
    let server = Server::start_with(
        0,
        1,
        &[
            "--checkpoint-dir",
            ckpt_root.to_str().unwrap(),
            "--drain-timeout-secs",
            "1",
        ],
    );
    let client = PsClient::connect(std::slice::from_ref(&server.addr), &ClientConfig::default())
        .await
        .unwrap();
    client.create_table(&spec).await.unwrap();
    client
        .push("emb", &keys, &vec![0.5; 500 * 3])
        .await
        .unwrap();
    client.flush().await.unwrap();
    let trained = client.pull("emb", &keys).await.unwrap();

    let out = worker(&["checkpoint", "--servers", &server.addr, "--name", "c1"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("500 rows"));
    // `client` still holds a connection this (blocked) test task cannot close:
    // SIGTERM must still stop the server, after the drain timeout.
    assert!(server.terminate().success());

    let restored = Server::start_with(0, 1, &["--restore", ckpt_root.join("c1").to_str().unwrap()]);
    assert!(
        restored.before[0].starts_with("restored 500 rows in "),
        "the recovery time is reported: {:?}",
        restored.before
    );
    let client = PsClient::connect(
        std::slice::from_ref(&restored.addr),
        &ClientConfig::default(),
    )
    .await
    .unwrap();
    client.create_table(&spec).await.unwrap(); // idempotent: the restored table has this spec
    assert_eq!(client.pull("emb", &keys).await.unwrap(), trained);
    drop(restored);

    // A corrupted checkpoint is refused at start-up with a message.
    let file = ckpt_root.join("c1/shard-0.bin");
    let mut bytes = std::fs::read(&file).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&file, bytes).unwrap();
    let out = Command::new(binary("ps-server"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--shard-id",
            "0",
            "--num-shards",
            "1",
            "--restore",
        ])
        .arg(ckpt_root.join("c1"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr_of(&out).contains("checksum mismatch"),
        "{}",
        stderr_of(&out)
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn separate_workers_start_from_a_checkpoint_after_worker_0_loads_it() {
    // Job 1: two shards with a checkpoint folder; one worker; checkpoint "one".
    let dir = temp_dir("init-from");
    let job = a9a_job(&dir);
    let ckpt_root = dir.join("ckpt");
    let root = ckpt_root.to_str().unwrap();
    let first = [
        Server::start_with(0, 2, &["--checkpoint-dir", root]),
        Server::start_with(1, 2, &["--checkpoint-dir", root]),
    ];
    let addrs = format!("{},{}", first[0].addr, first[1].addr);
    let report = dir.join("first.json");
    let out = worker(&[
        "train",
        "--config",
        job.to_str().unwrap(),
        "--servers",
        &addrs,
        "--rank",
        "0",
        "--world",
        "1",
        "--report",
        report.to_str().unwrap(),
    ])
    .output()
    .unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    let out = worker(&["checkpoint", "--servers", &addrs, "--name", "one"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    let recorded: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let recorded = recorded["val_auc"].as_f64().unwrap();

    // Job 2: three fresh shards, two workers, everything loaded and frozen.
    let edit = format!(
        "epochs = 1\ninit_from = \"{}\"\nfreeze = [\"weights\", \"bias\"]",
        ckpt_root.join("one").display()
    );
    let job2 = a9a_job_edited(&dir, "job2.toml", &[("epochs = 5", &edit)]);
    let second: Vec<Server> = (0..3).map(|i| Server::start(i, 3)).collect();
    let addrs: Vec<&str> = second.iter().map(|s| s.addr.as_str()).collect();
    let addrs = addrs.join(",");
    for report in run_workers(&job2, &addrs, 2, &dir, "second") {
        let auc = report["val_auc"].as_f64().unwrap();
        assert!(
            (auc - recorded).abs() < 1e-9,
            "{auc} vs {recorded} before the checkpoint"
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// The data position rank `rank` of `world` of `job` has recorded on the
/// servers `addrs`, as the report's `resumed_from` writes it.
fn recorded_position(job: &Path, addrs: &str, rank: usize, world: usize) -> serde_json::Value {
    let text = std::fs::read_to_string(job).unwrap();
    let config = ps_common::config::JobConfig::from_toml(&text, job.parent().unwrap()).unwrap();
    let servers: Vec<String> = addrs.split(',').map(String::from).collect();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let client =
                ps_worker::PsClient::connect(&servers, &ps_worker::ClientConfig::default())
                    .await
                    .unwrap();
            let positions = ps_worker::resume::Positions::open(&client, &config, rank, world)
                .await
                .unwrap();
            let position = positions
                .load(&client)
                .await
                .unwrap()
                .expect("a recorded position");
            serde_json::to_value(position).unwrap()
        })
}

#[test]
fn a_worker_killed_mid_epoch_and_restarted_resumes_and_the_job_completes() {
    let dir = temp_dir("resume");
    let job = a9a_job_edited(
        &dir,
        "job.toml",
        &[("epochs = 5", "epochs = 2\nprogress_every_steps = 20")],
    );
    let servers = [Server::start(0, 2), Server::start(1, 2)];
    let addrs = format!("{},{}", servers[0].addr, servers[1].addr);
    let reports: Vec<PathBuf> = ["w0", "w1", "w1-again"]
        .iter()
        .map(|name| dir.join(format!("{name}.json")))
        .collect();
    let first = spawn_worker(&job, &addrs, 0, 2, &reports[0]);
    let mut second = spawn_worker(&job, &addrs, 1, 2, &reports[1]);
    wait_for_pushes(&servers[0].addr, 400);
    second.kill().unwrap(); // SIGKILL: no chance to clean up
    second.wait().unwrap();
    let recorded = recorded_position(&job, &addrs, 1, 2);
    let restarted = report_of(spawn_worker(&job, &addrs, 1, 2, &reports[2]), &reports[2]);
    let untouched = report_of(first, &reports[0]);

    assert_eq!(
        restarted["resumed_from"], recorded,
        "the restarted worker resumed where the killed one recorded"
    );
    let resumed_steps = restarted["resumed_from"]["steps"].as_u64().unwrap();
    assert!(resumed_steps >= 20, "resumed at step {resumed_steps}");
    // Rank 1 reads every other line of the 32,561: 16,280 per epoch.
    assert_eq!(
        restarted["skipped_samples"].as_u64().unwrap()
            + restarted["train_samples"].as_u64().unwrap(),
        16_280 * 2,
        "the earlier run's recorded samples plus this run's are rank 1's data: {restarted}"
    );
    assert_eq!(untouched["train_samples"].as_u64().unwrap(), 16_281 * 2);
    let auc = restarted["val_auc"].as_f64().unwrap();
    assert!(auc >= 0.895, "AUC {auc}");
    eprintln!(
        "resume: rank 1 restarted at step {resumed_steps} (epoch {}), AUC {auc:.4}",
        restarted["resumed_from"]["epoch"]
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn after_kill_9_of_server_and_worker_both_recover_from_the_periodic_checkpoint() {
    let dir = temp_dir("periodic");
    let root = dir.join("ckpt");
    let root_arg = root.to_str().unwrap().to_string();
    // Small batches: the run must outlast a checkpoint interval.
    let job = a9a_job_edited(
        &dir,
        "job.toml",
        &[
            ("epochs = 5", "epochs = 2\nprogress_every_steps = 20"),
            ("batch_size = 32", "batch_size = 4"),
        ],
    );
    let flags = [
        "--checkpoint-dir",
        &root_arg,
        "--checkpoint-every-secs",
        "1",
    ];
    let mut server = Server::start_with(0, 1, &flags);
    let reports = [dir.join("first.json"), dir.join("again.json")];
    let mut first = spawn_worker(&job, &server.addr, 0, 1, &reports[0]);
    wait_for_pushes(&server.addr, 300);
    // A checkpoint written after those pushes.
    let file = root.join("periodic/shard-0.bin");
    let modified = |f: &Path| std::fs::metadata(f).and_then(|m| m.modified()).ok();
    let before = modified(&file);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while modified(&file) == before {
        assert!(
            std::time::Instant::now() < deadline,
            "no periodic checkpoint"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // Lose everything but the checkpoint.
    assert!(
        first.try_wait().unwrap().is_none(),
        "the worker finished too soon"
    );
    first.kill().unwrap();
    first.wait().unwrap();
    server.child.kill().unwrap();
    server.child.wait().unwrap();

    let started = std::time::Instant::now();
    let restore = root.join("periodic");
    let restored = Server::start_with(0, 1, &["--restore", restore.to_str().unwrap()]);
    let recovery = started.elapsed();
    assert!(
        restored.before[0].starts_with("restored "),
        "{:?}",
        restored.before
    );
    let recorded = recorded_position(&job, &restored.addr, 0, 1);
    let again = report_of(
        spawn_worker(&job, &restored.addr, 0, 1, &reports[1]),
        &reports[1],
    );
    assert_eq!(
        again["resumed_from"], recorded,
        "the worker resumed at the position the restored checkpoint holds"
    );
    let resumed = again["resumed_from"]["steps"].as_u64().unwrap();
    assert!(resumed >= 20, "resumed at step {resumed}");
    assert_eq!(
        again["skipped_samples"].as_u64().unwrap() + again["train_samples"].as_u64().unwrap(),
        32_561 * 2,
        "{again}"
    );
    let auc = again["val_auc"].as_f64().unwrap();
    assert!(auc >= 0.895, "AUC {auc}");
    eprintln!(
        "periodic checkpoint: server back in {recovery:?} ({}), worker resumed at step {resumed}, AUC {auc:.4}",
        restored.before[0]
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// A client of the server at `addr`, with table `emb` (4 floats that count
/// the pushes applied to them) made there.
async fn counting_client(addr: &str) -> ps_worker::PsClient {
    let client =
        ps_worker::PsClient::connect(&[addr.to_string()], &ps_worker::ClientConfig::default())
            .await
            .unwrap();
    client
        .create_table(&common::counting_table("emb", 4))
        .await
        .unwrap();
    client
}

/// Periodic checkpoints as a chain (a base, then deltas of what changed):
/// after `kill -9`, the server restored from the chain holds every row the
/// last delta saw, and a delta of a few changed rows is a fraction of the
/// base.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incremental_periodic_checkpoint_restores_every_row_after_kill_9() {
    use std::time::{Duration, Instant, SystemTime};
    let dir = temp_dir("incremental");
    let root = dir.join("ckpt");
    let flags = [
        "--checkpoint-dir",
        root.to_str().unwrap(),
        "--checkpoint-every-secs",
        "1",
        "--checkpoint-deltas-per-base",
        "5",
    ];
    let mut server = Server::start_with(0, 1, &flags);
    let client = counting_client(&server.addr).await;
    let all: Vec<u64> = (0..20_000).collect();
    client
        .push("emb", &all, &vec![-1.0; all.len() * 4])
        .await
        .unwrap();
    client.flush().await.unwrap();
    // A few rows change after the base: the next periodic checkpoint is a
    // delta holding them.
    let base = root.join("periodic/shard-0.bin");
    let waited = |path: &Path, after: SystemTime| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let written = std::fs::metadata(path).and_then(|m| m.modified()).ok();
            if written.is_some_and(|w| w > after) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no checkpoint at {}",
                path.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    waited(&base, SystemTime::UNIX_EPOCH);
    let few: Vec<u64> = (0..50).collect();
    client
        .push("emb", &few, &vec![-1.0; few.len() * 4])
        .await
        .unwrap();
    client.flush().await.unwrap();
    let pushed = SystemTime::now();
    let delta = root.join("periodic/shard-0.delta-000001.bin");
    waited(&delta, pushed - Duration::from_millis(1));
    let held = client.pull("emb", &all).await.unwrap();
    let size = |p: &Path| std::fs::metadata(p).unwrap().len();
    assert!(
        size(&delta) * 20 < size(&base),
        "delta {} bytes, base {}",
        size(&delta),
        size(&base)
    );
    server.child.kill().unwrap();
    server.child.wait().unwrap();

    let restored = Server::start_with(
        0,
        1,
        &["--restore", root.join("periodic").to_str().unwrap()],
    );
    let client = counting_client(&restored.addr).await;
    assert_eq!(client.pull("emb", &all).await.unwrap(), held);
    assert_eq!(held[0], 2.0, "the delta's rows are in");
    std::fs::remove_dir_all(&dir).ok();
}

/// A job checkpointed by 2 servers restarts on 3 (`--restore` of the same
/// folder): every row of a sparse and a dense table is served exactly as
/// it was, from its new owner (optimizer state too: the unit test
/// `checkpoint::tests::a_checkpoint_of_two_shards_restores_into_three_...`
/// compares whole rows).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_of_two_shards_restored_into_three_serves_every_row_exactly() {
    use ps_common::{InitializerSpec, OptimizerSpec, TableKind, TableSpec};
    use ps_worker::{ClientConfig, PsClient};

    let dir = temp_dir("reshard");
    let root = dir.join("ckpt");
    let table = |name: &str, kind| TableSpec {
        name: name.into(),
        kind,
        dim: 4,
        initializer: InitializerSpec::Normal {
            mean: 0.0,
            std: 0.1,
        },
        optimizer: OptimizerSpec::Adagrad {
            lr: 0.1,
            initial_accumulator: 0.1,
            eps: 1e-8,
            l2: 0.0,
            weight_decay: 0.0,
        },
        seed: 9,
        lifecycle: Default::default(),
    };
    let specs = [
        table("emb", TableKind::Sparse),
        table(
            "dense",
            TableKind::Dense {
                rows: 1000,
                block_rows: 16,
            },
        ),
    ];
    let sparse_keys: Vec<u64> = (0..5000).map(|k| k * 7919).collect();
    let dense_keys: Vec<u64> = (0..1000).collect();
    let connect = |servers: &[Server]| {
        let addrs: Vec<String> = servers.iter().map(|s| s.addr.clone()).collect();
        async move {
            PsClient::connect(&addrs, &ClientConfig::default())
                .await
                .unwrap()
        }
    };
    let flags = ["--checkpoint-dir", root.to_str().unwrap()];
    let two = [
        Server::start_with(0, 2, &flags),
        Server::start_with(1, 2, &flags),
    ];
    let client = connect(&two).await;
    for spec in &specs {
        client.create_table(spec).await.unwrap();
    }
    for step in 0..3 {
        let grads: Vec<f32> = (0..sparse_keys.len() * 4)
            .map(|i| ((i + step) % 13) as f32 - 6.0)
            .collect();
        client.push("emb", &sparse_keys, &grads).await.unwrap();
        let grads: Vec<f32> = (0..dense_keys.len() * 4)
            .map(|i| ((i * 3 + step) % 7) as f32 - 3.0)
            .collect();
        client.push("dense", &dense_keys, &grads).await.unwrap();
    }
    client.flush().await.unwrap();
    let sparse = client.pull("emb", &sparse_keys).await.unwrap();
    let dense = client.pull("dense", &dense_keys).await.unwrap();
    client.checkpoint("two").await.unwrap();
    drop(client);
    drop(two);

    let saved = root.join("two");
    let restore = ["--restore", saved.to_str().unwrap()];
    let three: Vec<Server> = (0..3).map(|i| Server::start_with(i, 3, &restore)).collect();
    let rows: usize = three
        .iter()
        .map(|s| {
            let line = &s.before[0];
            assert!(line.starts_with("restored "), "{line}");
            line.split(' ').nth(1).unwrap().parse::<usize>().unwrap()
        })
        .sum();
    assert_eq!(
        rows,
        sparse_keys.len() + dense_keys.len(),
        "every row restored once"
    );
    let client = connect(&three).await;
    for spec in &specs {
        client.create_table(spec).await.unwrap(); // the restored tables have these specs
    }
    assert_eq!(client.pull("emb", &sparse_keys).await.unwrap(), sparse);
    assert_eq!(client.pull("dense", &dense_keys).await.unwrap(), dense);
    std::fs::remove_dir_all(&dir).ok();
}
