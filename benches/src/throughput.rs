//! End-to-end training throughput: W workers train a job's model on
//! pre-generated batches against M shards, through the real client and
//! service code, over loopback gRPC or (in memory) by calling the shards'
//! services directly; the `ps-bench ctr26` measurement.
//!
//! Every worker runs warm-up steps, then three timed windows of the same
//! number of steps; the workers meet at a barrier (after flushing their
//! pushes) between windows, so a window is the wall time for all workers to
//! do its steps with every push acknowledged.

use std::sync::{Arc, Barrier};
use std::time::Instant;

use anyhow::Context;
use ps_common::config::JobConfig;
use ps_common::routing::mix64;
use ps_server::service::ShardService;
use ps_server::{Limits, Shard};
use ps_worker::backend::cpu::CpuBackend;
use ps_worker::client::{ByteCounts, PsClient};
use ps_worker::cluster::LocalCluster;
use ps_worker::data::Batch;
use ps_worker::job::client_config;
use ps_worker::model::{Mode, Model};
use ps_worker::traffic::{CachedStep, Holdback, push_step};
use ps_worker::trainer::Prefetched;
use tokio::runtime::Runtime;

/// Timed windows per run.
pub const WINDOWS: usize = 3;

/// What to run.
#[derive(Debug, Clone)]
pub struct Setup {
    /// Shards.
    pub servers: u32,
    /// Workers (threads, each with its own client as a worker process has).
    pub workers: usize,
    /// Warm-up steps per worker.
    pub warmup: usize,
    /// Steps per worker in each timed window.
    pub steps: usize,
    /// Call the shards' services in process instead of over loopback gRPC.
    pub in_memory: bool,
    /// Give every shard a backup (gRPC only): each push is acknowledged
    /// once the backup has applied it.
    pub replicated: bool,
    /// Give every shard a read replica (gRPC only): the primaries then
    /// apply writes one at a time and log them for it.
    pub followers: bool,
}

/// What was measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Measured {
    /// Samples per second of all workers together, per window.
    pub windows: Vec<f64>,
    /// Median of `windows`.
    pub samples_per_sec: f64,
    /// Timed steps (all workers).
    pub steps: u64,
    /// Pull payload bytes (sent + received) per worker step.
    pub pull_bytes_per_step: f64,
    /// Push payload bytes (sent + received) per worker step.
    pub push_bytes_per_step: f64,
    /// Pull request latency quantiles over the timed windows, milliseconds.
    pub pull_p50_ms: f64,
    /// 99th percentile.
    pub pull_p99_ms: f64,
    /// Push request latency (send to ack) median, milliseconds.
    pub push_p50_ms: f64,
    /// 99th percentile.
    pub push_p99_ms: f64,
    /// Mean training loss of the first 10 timed steps of every worker.
    pub loss_start: f64,
    /// Mean training loss of the last 10 timed steps of every worker.
    pub loss_end: f64,
}

/// What every worker thread shares.
struct Shared {
    job: JobConfig,
    model: Arc<Model>,
    setup: Setup,
    barrier: Barrier,
    runtime: tokio::runtime::Handle,
}

/// Runs `job`'s model on `setup`, worker `w` cycling through `pools[w]`.
pub fn run(job: &JobConfig, setup: &Setup, pools: Vec<Vec<Batch>>) -> anyhow::Result<Measured> {
    anyhow::ensure!(
        pools.len() == setup.workers && pools.iter().all(|p| !p.is_empty()),
        "one non-empty batch pool per worker is needed"
    );
    let runtime = Runtime::new().context("cannot start the async runtime")?;
    let config = client_config(job, std::time::Duration::from_secs(30));
    let (clients, cluster) = runtime.block_on(async {
        let mut clients = Vec::new();
        let cluster = if setup.in_memory {
            let services: Vec<ShardService> = (0..setup.servers)
                .map(|i| {
                    ShardService::new(
                        Arc::new(Shard::new(i, setup.servers)),
                        Limits::default(),
                        None,
                    )
                })
                .collect();
            for _ in 0..setup.workers {
                clients.push(PsClient::in_process(services.clone(), &config).await?);
            }
            None
        } else {
            let mut cluster = LocalCluster::start(setup.servers, Limits::default()).await?;
            if setup.replicated {
                cluster.add_backups().await?;
            }
            if setup.followers {
                cluster.add_followers().await?;
            }
            for _ in 0..setup.workers {
                clients.push(cluster.client(&config).await?);
            }
            Some(cluster)
        };
        // Every client learns the tables' layout (creation is idempotent).
        for client in &clients {
            for spec in job.table_specs() {
                client.create_table(&spec).await?;
            }
        }
        anyhow::Ok((clients, cluster))
    })?;

    // The main thread plus every worker meet before warm-up, after warm-up
    // and after each window.
    let shared = Arc::new(Shared {
        job: job.clone(),
        model: Arc::new(Model::from_job(job)),
        setup: setup.clone(),
        barrier: Barrier::new(setup.workers + 1),
        runtime: runtime.handle().clone(),
    });
    let barrier = &shared.barrier;
    let mut handles = Vec::new();
    for (rank, (client, pool)) in clients.iter().cloned().zip(pools).enumerate() {
        let shared = Arc::clone(&shared);
        handles.push(std::thread::spawn(move || {
            worker(&shared, rank, &client, pool)
        }));
    }
    let mut marks = Vec::new();
    let mut bytes_at = Vec::new();
    let total_bytes = |clients: &[PsClient]| {
        clients.iter().fold(ByteCounts::default(), |acc, c| {
            let b = c.bytes();
            ByteCounts {
                pull_bytes: acc.pull_bytes + b.pull_bytes,
                push_bytes: acc.push_bytes + b.push_bytes,
            }
        })
    };
    for phase in 0..WINDOWS + 2 {
        barrier.wait();
        if phase == 1 {
            for c in &clients {
                c.pull_latency().reset();
                c.push_latency().reset();
            }
        }
        marks.push(Instant::now());
        bytes_at.push(total_bytes(&clients));
    }
    let mut losses = Vec::new();
    for h in handles {
        losses.push(
            h.join()
                .map_err(|_| anyhow::anyhow!("a worker thread panicked"))??,
        );
    }
    drop(cluster);

    let per_window = (setup.workers * setup.steps) as f64;
    let batch = job.train.batch_size as f64;
    let windows: Vec<f64> = marks
        .windows(2)
        .skip(1)
        .map(|w| per_window * batch / (w[1] - w[0]).as_secs_f64())
        .collect();
    let mut sorted = windows.clone();
    sorted.sort_by(f64::total_cmp);
    let steps = (setup.workers * setup.steps * WINDOWS) as u64;
    let (first, last) = (bytes_at[1], bytes_at[WINDOWS + 1]);
    // Every worker's requests together.
    let merged = |pick: fn(&PsClient) -> &ps_worker::latency::Latencies, q: f64| {
        let all = ps_worker::latency::Latencies::default();
        for c in &clients {
            all.merge(pick(c));
        }
        all.quantile(q).unwrap_or(f64::NAN) * 1e3
    };
    let mean = |f: &dyn Fn(&Vec<f64>) -> &[f64]| {
        let v: Vec<f64> = losses.iter().flat_map(|l| f(l).to_vec()).collect();
        v.iter().sum::<f64>() / v.len().max(1) as f64
    };
    let head = setup.steps.min(10);
    Ok(Measured {
        samples_per_sec: sorted[WINDOWS / 2],
        windows,
        steps,
        pull_bytes_per_step: (last.pull_bytes - first.pull_bytes) as f64 / steps as f64,
        push_bytes_per_step: (last.push_bytes - first.push_bytes) as f64 / steps as f64,
        pull_p50_ms: merged(PsClient::pull_latency, 0.5),
        pull_p99_ms: merged(PsClient::pull_latency, 0.99),
        push_p50_ms: merged(PsClient::push_latency, 0.5),
        push_p99_ms: merged(PsClient::push_latency, 0.99),
        loss_start: mean(&|l| &l[..head]),
        loss_end: mean(&|l| &l[l.len() - head..]),
    })
}

/// One worker: warm-up, then the timed windows; the mean loss of every
/// timed step. A failed worker still meets the others at every barrier, so
/// the run ends and reports its error.
fn worker(
    shared: &Shared,
    rank: usize,
    client: &PsClient,
    pool: Vec<Batch>,
) -> anyhow::Result<Vec<f64>> {
    let Shared {
        job,
        model,
        setup,
        barrier,
        runtime,
    } = shared;
    let cache = model.row_cache(job);
    let mut pulled = Prefetched::new(runtime, client, model, pool.into_iter().cycle().map(Ok))
        .with_cache(cache.clone());
    let backend = CpuBackend;
    let mut losses = Vec::new();
    let mut step = 0u64;
    let mut failure = None;
    let mut holdback = Holdback::for_job(job);
    barrier.wait();
    for phase in 0..WINDOWS + 1 {
        let n = if phase == 0 {
            setup.warmup
        } else {
            setup.steps
        };
        let mut run_phase = || -> anyhow::Result<()> {
            for _ in 0..n {
                let params = pulled.next_pulled()?.context("the batch pool ran dry")?;
                let seed = mix64(step ^ ((rank as u64) << 48));
                let output = model.compute(&backend, &params, Mode::Train { seed })?;
                let grads = output.grads.context("training produced no gradients")?;
                let updates = model.updates(&params, grads, None);
                let cached = cache.as_deref().map(|cache| CachedStep {
                    cache,
                    step,
                    hot: &params.hot,
                });
                runtime.block_on(push_step(client, updates, cached, holdback.as_mut()))?;
                if phase > 0 {
                    losses.push(output.loss_sum / params.plan.examples.max(1) as f64);
                }
                step += 1;
            }
            runtime.block_on(client.flush())?;
            Ok(())
        };
        if failure.is_none() {
            failure = run_phase().err();
        }
        barrier.wait();
    }
    match failure {
        Some(e) => Err(e.context(format!("worker {rank}"))),
        None => Ok(losses),
    }
}
