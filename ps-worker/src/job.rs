//! Whole jobs: one worker process (`ps-worker train`) or a cluster inside
//! one process (`ps-worker local`), each ending in a [`Report`].

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use ps_common::config::{DataSource, Device, JobConfig};
use ps_server::Limits;
use serde::Serialize;
use tokio::runtime::Runtime;

use crate::backend::cuda::CudaBackend;
use crate::client::{ClientConfig, PsClient, WireFormat};
use crate::cluster::LocalCluster;
use crate::data;
use crate::metrics::{BinaryMetrics, TaskMetrics};
use crate::signal::Signal;
use crate::telemetry::Telemetry;
use crate::trainer::{self, TrainError, TrainSummary};

pub use crate::report::{Report, RowCacheReport};

/// The job file used by `ps-worker local` without `--config`: logistic
/// regression on the a9a data compiled into the binary.
pub const DEFAULT_JOB: &str = include_str!("../../examples/a9a-lr.toml");

/// Errors of a whole job.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// Training or evaluation failed.
    #[error(transparent)]
    Train(#[from] TrainError),
    /// The async runtime or a local server could not start.
    #[error("{0}")]
    Startup(String),
}

impl From<ps_common::PsError> for JobError {
    fn from(e: ps_common::PsError) -> Self {
        JobError::Train(e.into())
    }
}

impl From<data::DataError> for JobError {
    fn from(e: data::DataError) -> Self {
        JobError::Train(e.into())
    }
}

/// Client settings a job file implies.
pub fn client_config(job: &JobConfig, connect_timeout: Duration) -> ClientConfig {
    let c = &job.communication;
    ClientConfig {
        max_pushes_in_flight: job.train.max_pushes_in_flight,
        wire: WireFormat {
            pull_values: c.pull_values.into(),
            push_values: c.push_values.into(),
            delta_keys: c.delta_keys,
        },
        connect_timeout,
        ..ClientConfig::default()
    }
}

fn runtime() -> Result<Runtime, JobError> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| JobError::Startup(format!("cannot start the async runtime: {e}")))
}

/// Checks that every data source opens and the device works, before any
/// server state changes.
fn check_inputs(job: &JobConfig) -> Result<(), JobError> {
    data::check_readable(&job.data.train)?;
    if let Some(validation) = &job.data.validation {
        data::check_readable(validation)?;
    }
    check_device(job)?;
    if let Some(dir) = &job.train.init_from {
        ps_server::checkpoint::shard_count(dir)
            .map_err(|e| JobError::Startup(format!("init_from: {e}")))?;
    }
    Ok(())
}

/// Opens the job's CUDA device (and compiles the kernels, once per process)
/// so that a missing driver or device is reported before anything starts.
fn check_device(job: &JobConfig) -> Result<(), JobError> {
    if let Device::Cuda(ordinal) = job.train.device {
        CudaBackend::new(ordinal).map_err(TrainError::from)?;
    }
    Ok(())
}

/// Connects to the servers and creates the job's tables (idempotent).
async fn connect_and_create(
    servers: &[String],
    job: &JobConfig,
    config: &ClientConfig,
) -> Result<PsClient, JobError> {
    let client = PsClient::connect(servers, config).await?;
    for spec in job.table_specs() {
        client.create_table(&spec).await?;
    }
    Ok(client)
}

fn validate(
    runtime: &Runtime,
    client: &PsClient,
    job: &JobConfig,
) -> Result<Option<Vec<BinaryMetrics>>, JobError> {
    let metrics = job
        .data
        .validation
        .as_ref()
        .map(|source: &DataSource| trainer::evaluate(runtime.handle(), client, job, source))
        .transpose()?;
    Ok(metrics)
}

/// Loads `train.init_from` into the servers (worker 0, or `local` before
/// its workers start): for each chosen table, the checkpoint's weights are
/// assigned to the rows, optimizer state fresh. Any shard count on either
/// side. Returns the rows loaded.
async fn load_init_from(client: &PsClient, job: &JobConfig) -> Result<u64, JobError> {
    let Some(dir) = &job.train.init_from else {
        return Ok(0);
    };
    let fail = |msg: String| JobError::Startup(format!("init_from {}: {msg}", dir.display()));
    let count = ps_server::checkpoint::shard_count(dir).map_err(|e| fail(e.to_string()))?;
    let specs = job.table_specs();
    let chosen: Vec<&str> = if job.train.init_tables.is_empty() {
        specs.iter().map(|s| s.name.as_str()).collect()
    } else {
        job.train.init_tables.iter().map(String::as_str).collect()
    };
    let mut found = std::collections::BTreeSet::new();
    let mut rows = 0u64;
    for shard in 0..count {
        let snapshot = ps_server::checkpoint::load(dir, shard, count)?;
        for table in snapshot.tables {
            let name = table.spec.name.clone();
            if !chosen.contains(&name.as_str()) {
                continue;
            }
            let Some(want) = specs.iter().find(|s| s.name == name) else {
                continue;
            };
            if (table.spec.kind, table.spec.dim) != (want.kind, want.dim) {
                return Err(fail(format!(
                    "table '{name}' is {:?} x dim {} there, the job has {:?} x dim {}",
                    table.spec.kind, table.spec.dim, want.kind, want.dim
                )));
            }
            found.insert(name.clone());
            let (dim, row_len) = (want.dim as usize, table.row_len as usize);
            let weights: Vec<f32> = table
                .values
                .chunks_exact(row_len.max(1))
                .flat_map(|row| row[..dim].iter().copied())
                .collect();
            client.assign(&name, &table.keys, &weights).await?;
            rows += table.keys.len() as u64;
        }
    }
    if let Some(missing) = job
        .train
        .init_tables
        .iter()
        .find(|t| !found.contains(t.as_str()))
    {
        return Err(fail(format!("holds no table '{missing}'")));
    }
    tracing::info!(from = %dir.display(), rows, tables = ?found, "initialized from checkpoint");
    Ok(rows)
}

/// Workers other than 0 wait until worker 0 has loaded `init_from`.
async fn wait_for_init_from(
    client: &PsClient,
    job: &JobConfig,
    timeout: Duration,
) -> Result<(), JobError> {
    let loaded = Signal::new(job, "init_from");
    let deadline = Instant::now() + timeout;
    while !loaded.is_raised(client).await? {
        if Instant::now() >= deadline {
            return Err(JobError::Startup(format!(
                "worker 0 did not finish loading train.init_from within {timeout:?}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

/// `ps-worker train`: worker `rank` of `world` against running servers,
/// reporting its steps to `telemetry`.
pub fn run_train(
    job: &JobConfig,
    servers: &[String],
    rank: usize,
    world: usize,
    config: &ClientConfig,
    telemetry: &Telemetry,
) -> Result<Report, JobError> {
    let started = Instant::now();
    check_inputs(job)?;
    let runtime = runtime()?;
    let client = runtime.block_on(connect_and_create(servers, job, config))?;
    if job.train.init_from.is_some() {
        runtime.block_on(async {
            if rank == 0 {
                load_init_from(&client, job).await?;
                Ok(Signal::new(job, "init_from").raise(&client).await?)
            } else {
                wait_for_init_from(&client, job, config.connect_timeout).await
            }
        })?;
    }
    let stop = AtomicBool::new(false);
    let summary = trainer::train_worker(
        runtime.handle(),
        &client,
        job,
        rank,
        world,
        &stop,
        telemetry,
    )?;
    let mut report = Report::new("train", job, world, client.num_shards(), &[summary]);
    report.rank = Some(rank);
    report.add_traffic(&client); // training traffic only, before validation pulls
    report.set_validation(job, validate(&runtime, &client, job)?);
    report.wall_seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// `ps-worker local`: `servers` shards and `workers` workers in this process,
/// talking over loopback gRPC exactly as separate processes would.
/// With `checkpoint_dir`, the shards write checkpoints there (needed by
/// `train.best_checkpoint`). The workers report to a telemetry of their
/// own; see [`run_local_reporting`].
pub fn run_local(
    job: &JobConfig,
    servers: u32,
    workers: usize,
    config: &ClientConfig,
    checkpoint_dir: Option<PathBuf>,
) -> Result<Report, JobError> {
    let telemetry = Telemetry::default();
    run_local_reporting(job, servers, workers, config, checkpoint_dir, &telemetry)
}

/// [`run_local`] with the workers reporting their steps to `telemetry`
/// (the binary's `--metrics-listen` serves it).
pub fn run_local_reporting(
    job: &JobConfig,
    servers: u32,
    workers: usize,
    config: &ClientConfig,
    checkpoint_dir: Option<PathBuf>,
    telemetry: &Telemetry,
) -> Result<Report, JobError> {
    let started = Instant::now();
    check_inputs(job)?;
    // A fresh run id: signals of this run never meet another's.
    let mut job = job.clone();
    if job.train.run_id.is_none() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        job.train.run_id = Some(format!("local-{}-{nanos}", std::process::id()));
    }
    let job = &job;
    for (key, set) in [
        ("best_checkpoint", job.train.best_checkpoint.is_some()),
        ("epoch_checkpoint", job.train.epoch_checkpoint.is_some()),
    ] {
        if set && checkpoint_dir.is_none() {
            return Err(JobError::Startup(format!(
                "train.{key} needs --checkpoint-dir so the local servers can write it"
            )));
        }
    }
    let runtime = runtime()?;
    let cluster = runtime
        .block_on(LocalCluster::start_with_checkpoints(
            servers,
            Limits::default(),
            checkpoint_dir,
        ))
        .map_err(|e| JobError::Startup(format!("cannot start local servers: {e}")))?;
    let addrs = cluster.addrs().to_vec();
    if job.train.init_from.is_some() {
        runtime.block_on(async {
            let client = connect_and_create(&addrs, job, config).await?;
            load_init_from(&client, job).await
        })?;
    }
    let stop = &AtomicBool::new(false);
    let results: Vec<Result<(TrainSummary, PsClient), JobError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|rank| {
                let (runtime, addrs) = (&runtime, &addrs);
                scope.spawn(move || {
                    let client = runtime.block_on(connect_and_create(addrs, job, config))?;
                    let summary = trainer::train_worker(
                        runtime.handle(),
                        &client,
                        job,
                        rank,
                        workers,
                        stop,
                        telemetry,
                    )?;
                    Ok((summary, client))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(JobError::Startup("a worker thread panicked".into())))
            })
            .collect()
    });
    let mut summaries = Vec::new();
    let mut clients = Vec::new();
    for result in results {
        let (summary, client) = result?;
        summaries.push(summary);
        clients.push(client);
    }
    let mut report = Report::new("local", job, workers, servers as usize, &summaries);
    for client in &clients {
        report.add_traffic(client);
    }
    let evaluator = runtime.block_on(connect_and_create(&addrs, job, config))?;
    report.set_validation(job, validate(&runtime, &evaluator, job)?);
    report.wall_seconds = started.elapsed().as_secs_f64();
    runtime
        .block_on(cluster.shutdown())
        .map_err(|e| JobError::Startup(format!("local server failed: {e}")))?;
    Ok(report)
}

/// Metrics of one evaluated checkpoint, or of the ensemble.
#[derive(Debug, Clone, Serialize)]
pub struct EvalEntry {
    /// The checkpoint directory, or `ensemble`.
    pub checkpoint: String,
    /// Examples evaluated.
    pub examples: usize,
    /// ROC AUC.
    pub auc: f64,
    /// Mean logloss.
    pub logloss: f64,
    /// Accuracy at threshold 0.5.
    pub accuracy: f64,
    /// Predicted positives over observed ones.
    pub calibration: f64,
    /// Multi-task models: every task's metrics (the fields above are the
    /// first task's).
    pub tasks: Vec<TaskMetrics>,
}

impl EvalEntry {
    fn new(checkpoint: String, per_task: &[BinaryMetrics], job: &JobConfig) -> EvalEntry {
        let first = per_task.first().copied().unwrap_or(BinaryMetrics {
            count: 0,
            logloss: f64::NAN,
            auc: f64::NAN,
            accuracy: f64::NAN,
            calibration: f64::NAN,
        });
        let names: Vec<String> = job.model.tasks().into_iter().map(|t| t.name).collect();
        EvalEntry {
            checkpoint,
            examples: first.count,
            auc: first.auc,
            logloss: first.logloss,
            accuracy: first.accuracy,
            calibration: first.calibration,
            tasks: if per_task.len() > 1 {
                TaskMetrics::named(&names, per_task)
            } else {
                Vec::new()
            },
        }
    }
}

/// `ps-worker eval`: the job's model from each checkpoint (`DIR/NAME`) on
/// `data`, then the ensemble that averages their predicted probabilities.
/// Each checkpoint is served by in-process shards restored from its files;
/// one whose tables do not match the job's is refused with the differing
/// field named.
pub fn run_eval(
    job: &JobConfig,
    checkpoints: &[PathBuf],
    data: &DataSource,
) -> Result<Vec<EvalEntry>, JobError> {
    if checkpoints.is_empty() {
        return Err(JobError::Startup(
            "--checkpoints names no checkpoint".into(),
        ));
    }
    data::check_readable(data)?;
    check_device(job)?;
    let runtime = runtime()?;
    let config = client_config(job, Duration::from_secs(10));
    let mut entries = Vec::new();
    let mut sum: Vec<f64> = Vec::new();
    let mut reference_labels: Option<Vec<f32>> = None;
    for dir in checkpoints {
        let name = dir.display().to_string();
        let cluster = runtime
            .block_on(LocalCluster::restore(dir, Limits::default()))
            .map_err(|e| JobError::Startup(format!("checkpoint {name}: {e}")))?;
        // Tables are registered with the checkpoint's own specs (seeds and
        // optimizers may differ between runs); their shapes must be the job's.
        let mut specs = Vec::new();
        for want in job.table_specs() {
            let have = cluster
                .shard(0)
                .table(&want.name)
                .map_err(|_| {
                    JobError::Startup(format!("checkpoint {name} has no table '{}'", want.name))
                })?
                .spec()
                .clone();
            if (have.kind, have.dim) != (want.kind, want.dim) {
                return Err(JobError::Startup(format!(
                    "checkpoint {name}: table '{}' is {:?} x dim {}, the job's model needs {:?} x dim {}",
                    want.name, have.kind, have.dim, want.kind, want.dim
                )));
            }
            specs.push(have);
        }
        let client = runtime
            .block_on(async {
                let client = PsClient::connect(cluster.addrs(), &config).await?;
                for spec in &specs {
                    client.create_table(spec).await?;
                }
                Ok::<_, ps_common::PsError>(client)
            })
            .map_err(|e| JobError::Startup(format!("checkpoint {name}: {e}")))?;
        let (probs, labels) = trainer::predict(runtime.handle(), &client, job, data)?;
        runtime
            .block_on(cluster.shutdown())
            .map_err(|e| JobError::Startup(format!("local server failed: {e}")))?;
        entries.push(EvalEntry::new(
            name,
            &BinaryMetrics::for_job(&probs, &labels, job),
            job,
        ));
        if sum.is_empty() {
            sum = vec![0.0; probs.len()];
        }
        for (s, p) in sum.iter_mut().zip(&probs) {
            *s += f64::from(*p);
        }
        match &reference_labels {
            None => reference_labels = Some(labels),
            Some(reference) if *reference != labels => {
                return Err(JobError::Startup(
                    "the data read differently for two checkpoints".into(),
                ));
            }
            Some(_) => {}
        }
    }
    let mean: Vec<f32> = sum
        .iter()
        .map(|s| (s / checkpoints.len() as f64) as f32)
        .collect();
    let labels = reference_labels.unwrap_or_default();
    entries.push(EvalEntry::new(
        "ensemble".into(),
        &BinaryMetrics::for_job(&mean, &labels, job),
        job,
    ));
    Ok(entries)
}
