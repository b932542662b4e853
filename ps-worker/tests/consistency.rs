//! Consistency models as a user relies on them: bulk-synchronous training
//! equals one worker on the union of the batches; stale-synchronous pulls
//! never run more than K steps ahead of the slowest live worker; workers
//! that finish, die or never start hold nobody back for longer than a lease.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ps_common::config::JobConfig;
use ps_common::init::RowRng;
use ps_server::Limits;
use ps_worker::cluster::LocalCluster;
use ps_worker::consistency::{Gate, Schedule};
use ps_worker::job::{self, DEFAULT_JOB};
use ps_worker::{ClientConfig, PsClient};
use tokio::runtime::Runtime;

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ps-consistency-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `rows` libffm examples over 12 fields of 16 ids with a planted logit.
fn write_planted(path: &Path, rows: usize) {
    let mut rng = RowRng::new(5, 0);
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    for _ in 0..rows {
        let ids: Vec<u64> = (0..12).map(|f| f * 16 + rng.next_u64() % 16).collect();
        let logit: f64 = ids.iter().map(|&id| (id % 7) as f64 / 3.0 - 1.0).sum();
        let label = u8::from(rng.next_f64() < 1.0 / (1.0 + (-logit).exp()));
        write!(out, "{label}").unwrap();
        for (f, id) in ids.iter().enumerate() {
            write!(out, " {f}:{id}:1").unwrap();
        }
        writeln!(out).unwrap();
    }
}

/// A DeepFM job (no dropout, no batch norm: nothing couples the examples
/// of a batch) trained with plain SGD everywhere.
fn deepfm_job(train: &Path, consistency: &str, batch: usize, lr: f32) -> JobConfig {
    let sgd = format!("{{ kind = \"sgd\", lr = {lr} }}");
    let text = format!(
        r#"
[data]
format = "libffm"
fields = 12
train = "{}"
[model]
kind = "deepfm"
mlp = {{ hidden = [8], optimizer = {sgd} }}
[train]
batch_size = {batch}
log_every = 0
consistency = "{consistency}"
run_id = "{consistency}-{batch}"
[tables.weights]
kind = "sparse"
dim = 1
initializer = {{ kind = "zeros" }}
optimizer = {sgd}
[tables.bias]
kind = "dense"
rows = 1
dim = 1
initializer = {{ kind = "zeros" }}
optimizer = {sgd}
[tables.embeddings]
kind = "sparse"
dim = 4
initializer = {{ kind = "normal", std = 0.1 }}
optimizer = {sgd}
"#,
        train.display()
    );
    JobConfig::from_toml(&text, Path::new(".")).unwrap()
}

/// Trains `job` with `workers` worker threads against 2 in-process shards
/// and returns every row the shards hold, by (table, key).
fn train_and_dump(job: &JobConfig, workers: usize) -> BTreeMap<(String, u64), Vec<f32>> {
    let runtime = Runtime::new().unwrap();
    let cluster = runtime
        .block_on(LocalCluster::start(2, Limits::default()))
        .unwrap();
    let config = job::client_config(job, Duration::from_secs(10));
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|rank| {
                let (runtime, cluster, config, stop) = (&runtime, &cluster, &config, &stop);
                scope.spawn(move || {
                    let client = runtime.block_on(cluster.client(config)).unwrap();
                    for spec in job.table_specs() {
                        runtime.block_on(client.create_table(&spec)).unwrap();
                    }
                    ps_worker::trainer::train_worker(
                        runtime.handle(),
                        &client,
                        job,
                        rank,
                        workers,
                        stop,
                        &ps_worker::telemetry::Telemetry::default(),
                    )
                    .unwrap()
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
    });
    let mut rows = BTreeMap::new();
    for i in 0..2 {
        // The model's tables, not the job's bookkeeping (`_ps.*`).
        for table in cluster.shard(i).snapshot().unwrap().tables {
            if table.spec.name.starts_with("_ps.") {
                continue;
            }
            let (len, dim) = (table.row_len as usize, table.spec.dim as usize);
            for (k, key) in table.keys.iter().enumerate() {
                let weights = table.values[k * len..k * len + dim].to_vec();
                rows.insert((table.spec.name.clone(), *key), weights);
            }
        }
    }
    rows
}

fn max_difference(
    a: &BTreeMap<(String, u64), Vec<f32>>,
    b: &BTreeMap<(String, u64), Vec<f32>>,
) -> f32 {
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "both runs touched the same rows"
    );
    a.values()
        .zip(b.values())
        .flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs()))
        .fold(0.0, f32::max)
}

#[test]
fn bsp_with_two_workers_equals_one_worker_on_the_doubled_batch() {
    let dir = temp_dir("bsp");
    let train = dir.join("train.ffm");
    // 2048 = 32 steps of 2 x 32 lines: every batch full on both sides.
    write_planted(&train, 2048);
    // Each worker's loss is a mean over its 32 examples; the servers apply
    // both pushes, so lr 0.1 on two half batches is lr 0.2 on the whole one.
    let two = train_and_dump(&deepfm_job(&train, "bsp", 32, 0.1), 2);
    let one = train_and_dump(&deepfm_job(&train, "bsp", 64, 0.2), 1);
    let bsp = max_difference(&two, &one);
    assert!(
        bsp < 1e-4,
        "BSP differs from one worker by {bsp} (only summation order may differ)"
    );
    // The same comparison fails for asynchronous training, whose pulls run
    // a step ahead of the pushes: the test can tell them apart.
    let async_two = train_and_dump(&deepfm_job(&train, "async", 32, 0.1), 2);
    let stale = max_difference(&async_two, &one);
    assert!(
        stale > 100.0 * bsp.max(1e-6),
        "async training differs by only {stale}"
    );
    println!("max |BSP(2 workers) - 1 worker| = {bsp:e}; async: {stale:e}");
}

/// One shard and two workers' clients.
fn one_shard_two_clients() -> (Runtime, LocalCluster, PsClient, PsClient) {
    let runtime = Runtime::new().unwrap();
    let cluster = runtime
        .block_on(LocalCluster::start(1, Limits::default()))
        .unwrap();
    let config = ClientConfig::default();
    let a = runtime.block_on(cluster.client(&config)).unwrap();
    let b = runtime.block_on(cluster.client(&config)).unwrap();
    (runtime, cluster, a, b)
}

fn gate(client: &PsClient, rank: usize, lease_ms: u32, schedule: Schedule) -> Gate {
    Gate::new(client, "test-job".into(), rank, 2, lease_ms, schedule)
}

#[test]
fn ssp_pulls_never_run_more_than_k_steps_ahead_of_the_slowest_worker() {
    const K: u64 = 2;
    let (runtime, _cluster, fast, slow) = one_shard_two_clients();
    let ahead = Schedule::Ahead { staleness: K };
    let (fast_gate, slow_gate) = (gate(&fast, 0, 30_000, ahead), gate(&slow, 1, 30_000, ahead));
    // Steps the slow worker has finished, written before it reports them.
    let slow_done = Arc::new(AtomicU64::new(0));
    let slow_task = {
        let slow_done = Arc::clone(&slow_done);
        runtime.spawn(async move {
            for step in 0..12u64 {
                slow_done.store(step.saturating_sub(1), Ordering::SeqCst);
                slow_gate.ahead(step).await.unwrap();
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
            slow_done.store(u64::MAX, Ordering::SeqCst);
            slow_gate.finish().await.unwrap();
        })
    };
    let mut worst = 0;
    runtime.block_on(async {
        for step in 0..30u64 {
            fast_gate.ahead(step).await.unwrap();
            let behind = step.saturating_sub(slow_done.load(Ordering::SeqCst));
            worst = worst.max(behind);
            assert!(
                behind <= K,
                "pulled step {step} while the slow worker had finished {}",
                slow_done.load(Ordering::SeqCst)
            );
        }
    });
    runtime.block_on(slow_task).unwrap();
    assert_eq!(
        fast_gate.max_staleness(),
        K,
        "the fast worker ran as far ahead as allowed"
    );
    assert!(worst >= 1, "the fast worker was held back, not in lockstep");
}

#[test]
fn a_silent_worker_is_waited_for_one_lease_then_no_longer() {
    let (runtime, _cluster, alive, dying) = one_shard_two_clients();
    let ahead = Schedule::Ahead { staleness: 1 };
    let lease = Duration::from_millis(300);
    let (alive_gate, dying_gate) = (
        gate(&alive, 0, lease.as_millis() as u32, ahead),
        gate(&dying, 1, lease.as_millis() as u32, ahead),
    );
    runtime.block_on(async {
        dying_gate.ahead(0).await.unwrap();
        let started = Instant::now();
        for step in 0..6 {
            alive_gate.ahead(step).await.unwrap();
        }
        let waited = started.elapsed();
        assert!(
            waited >= lease - Duration::from_millis(20),
            "waited {waited:?}"
        );
        assert!(waited < Duration::from_secs(5), "waited {waited:?}");
    });
}

/// The staleness a worker reports is measured on every unfinished
/// worker's clock, not only the live ones the wait is decided on: a worker
/// presumed dead while it is merely slow shows in it.
#[test]
fn a_worker_given_up_for_dead_shows_in_the_staleness_the_others_report() {
    let (runtime, _cluster, alive, slow) = one_shard_two_clients();
    let ahead = Schedule::Ahead { staleness: 1 };
    let lease = Duration::from_millis(200);
    let (alive_gate, slow_gate) = (
        gate(&alive, 0, lease.as_millis() as u32, ahead),
        gate(&slow, 1, lease.as_millis() as u32, ahead),
    );
    runtime.block_on(async {
        slow_gate.ahead(0).await.unwrap();
        // The slow worker is alive but silent past its lease: the other goes on.
        for step in 0..6 {
            alive_gate.ahead(step).await.unwrap();
        }
    });
    assert_eq!(
        alive_gate.max_staleness(),
        5,
        "step 5 was pulled while the slow worker had finished nothing"
    );
}

/// a9a's test file (16,281 lines) as training data: worker 0 reads 8,141
/// lines, worker 1 8,140, so with batches of 4,070 worker 0 has one step
/// more, which it must take without waiting for the finished worker 1.
#[test]
fn under_bsp_a_worker_with_more_steps_is_not_held_by_a_finished_one() {
    let mut job = JobConfig::from_toml(DEFAULT_JOB, Path::new(".")).unwrap();
    job.data.train = job.data.validation.clone().unwrap();
    job.train.batch_size = 4070;
    job.train.epochs = 1;
    job.train.consistency = ps_common::config::Consistency::Bsp;
    job.train.worker_lease_seconds = 120.0;
    let config = job::client_config(&job, Duration::from_secs(10));
    let started = Instant::now();
    let report = job::run_local(&job, 2, 2, &config, None).unwrap();
    assert_eq!(report.train_steps, 5);
    assert_eq!(report.max_staleness, Some(0));
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "released by the finished worker, not by its lease"
    );
}

#[test]
fn ssp_and_hybrid_train_a9a_to_reference_quality_within_their_bounds() {
    for (consistency, staleness, bound) in [("ssp", Some(2), 2), ("hybrid", None, 0)] {
        let mut job = JobConfig::from_toml(DEFAULT_JOB, Path::new(".")).unwrap();
        job.train.consistency = match consistency {
            "ssp" => ps_common::config::Consistency::Ssp,
            _ => ps_common::config::Consistency::Hybrid,
        };
        job.train.staleness = staleness;
        let config = job::client_config(&job, Duration::from_secs(10));
        let report = job::run_local(&job, 2, 2, &config, None).unwrap();
        let auc = report.val_auc.unwrap();
        assert!(auc >= 0.895, "{consistency}: AUC {auc}");
        let seen = report.max_staleness.unwrap();
        assert!(seen <= bound, "{consistency}: staleness {seen} > {bound}");
        println!(
            "{consistency}: AUC {auc:.4}, max staleness {seen}, {:.0} samples/s",
            report.samples_per_sec
        );
    }
}
