//! The training loop of one worker, and evaluation on a held-out file.
//!
//! The loop runs on a plain thread (the math stays off the async runtime)
//! and hands network work to the runtime: while batch `t` is computed, the
//! pull for batch `t + 1` is already in flight, and pushes go out
//! asynchronously through the client's bounded window.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use ps_common::PsError;
use ps_common::config::{DataSource, Device, JobConfig};
use ps_common::routing::mix64;
use tokio::runtime::Handle;

use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::CudaBackend;
use crate::backend::{Backend, BackendError};
use crate::barrier::{EpochBarrier, ends_epochs};
use crate::cache::{CacheStats, RowCache};
use crate::client::PsClient;
use crate::consistency::Gate;
use crate::data::{Batches, DataError};
use crate::metrics::BinaryMetrics;
use crate::model::{Mode, Model, push_updates};
use crate::progress::Progress;
use crate::resume::{Position, Positions};
use crate::signal::Signal;
use crate::telemetry::Telemetry;
use crate::traffic::{CachedStep, Holdback, push_step};

mod prefetch;

pub use prefetch::Prefetched;

/// Steps between two checks of worker 0's stop signal by the others.
const STOP_POLL_STEPS: u64 = 256;

/// Batches parsed ahead of the training loop.
const PARSE_AHEAD: usize = 8;

/// Why training or evaluation stopped.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// Reading the data failed.
    #[error(transparent)]
    Data(#[from] DataError),
    /// A parameter server refused a request or could not be reached.
    #[error(transparent)]
    Ps(#[from] PsError),
    /// The compute backend failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// A background task panicked or was cancelled.
    #[error("background task failed: {0}")]
    Task(String),
}

/// What one worker did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TrainSummary {
    /// Examples trained on (all epochs).
    pub samples: u64,
    /// Batches trained on.
    pub steps: u64,
    /// Seconds spent training.
    pub seconds: f64,
    /// Mean loss over the last epoch.
    pub last_epoch_loss: f64,
    /// Malformed lines skipped (`on_bad_line = "skip"`).
    pub bad_lines: u64,
    /// Per-epoch records (worker 0 validates after each epoch).
    pub epochs: Vec<EpochRecord>,
    /// The epoch with the best validation AUC, if any was validated.
    pub best_epoch: Option<usize>,
    /// True when early stopping ended training before `train.epochs`.
    pub stopped_early: bool,
    /// Under ssp/bsp/hybrid: the largest staleness any pull of this worker
    /// was released with (steps the slowest live worker had not finished).
    pub max_staleness: Option<u64>,
    /// With `[communication]` filters: rows the model offered to push and
    /// rows pushed (the rest was held back, then pushed at the end).
    pub rows_offered_pushed: Option<(u64, u64)>,
    /// The position an earlier run of this rank had recorded, resumed from.
    pub resumed_from: Option<Position>,
    /// Examples skipped to reach that position (trained by the earlier run).
    pub skipped_samples: u64,
    /// With `communication.row_cache_steps`: what the row cache served and held.
    pub row_cache: Option<CacheStats>,
}

/// One epoch of one worker.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct EpochRecord {
    /// 1-based epoch number.
    pub epoch: usize,
    /// Mean training loss of the epoch.
    pub train_loss: f64,
    /// Validation AUC after the epoch (worker 0 only).
    pub val_auc: Option<f64>,
    /// Validation logloss after the epoch.
    pub val_logloss: Option<f64>,
    /// Validation accuracy after the epoch.
    pub val_accuracy: Option<f64>,
    /// Validation AUC of every task (multi-task models; the fields above
    /// are the first task's).
    pub val_task_auc: Vec<f64>,
}

/// Trains worker `rank` of `world` on its shard of the job's training data,
/// computing on the job's device. Worker 0 validates after each epoch, writes
/// the best checkpoint and decides early stopping; it raises `stop`, which
/// the other workers of this process check before every step, and a stop
/// signal on the servers, which workers in other processes check every
/// epoch and every 256 steps.
/// Must be called from a thread that is not a runtime worker.
pub fn train_worker(
    runtime: &Handle,
    client: &PsClient,
    job: &JobConfig,
    rank: usize,
    world: usize,
    stop: &AtomicBool,
    telemetry: &Telemetry,
) -> Result<TrainSummary, TrainError> {
    let run = Run {
        runtime,
        client,
        job,
        rank,
        world,
        stop,
        telemetry,
    };
    match job.train.device {
        Device::Cpu => run.train_on(&CpuBackend),
        Device::Cuda(ordinal) => run.train_on(&CudaBackend::new(ordinal)?),
    }
}

/// One worker's training run.
struct Run<'a> {
    runtime: &'a Handle,
    client: &'a PsClient,
    job: &'a JobConfig,
    rank: usize,
    world: usize,
    stop: &'a AtomicBool,
    /// Where this worker reports its steps (metrics, progress bar).
    telemetry: &'a Telemetry,
}

impl Run<'_> {
    /// Pushes every gradient sum the row cache holds and empties it.
    fn push_cached(&self, cache: Option<&RowCache>, steps: u64) -> Result<(), TrainError> {
        if let Some(cache) = cache {
            let lr_scale = self.job.train.lr_schedule.push_scale(steps);
            self.runtime
                .block_on(push_updates(self.client, &cache.drain(lr_scale)))?;
        }
        Ok(())
    }

    /// Whether training should stop: worker 0 of this process said so, or
    /// (for the other workers) worker 0 of the job raised the stop signal.
    fn stop_requested(&self, stopped: &Signal) -> Result<bool, TrainError> {
        if self.stop.load(Ordering::Relaxed) {
            return Ok(true);
        }
        if self.rank != 0 && self.runtime.block_on(stopped.is_raised(self.client))? {
            tracing::info!(worker = self.rank, "worker 0 stopped early; stopping");
            self.stop.store(true, Ordering::Relaxed);
            return Ok(true);
        }
        Ok(false)
    }

    /// Worker 0 after `epoch`: its checkpoint (`epoch_checkpoint`),
    /// validation into `record`, the best epoch and its checkpoint, and
    /// whether early stopping ends training now (the others are told
    /// through `stopped` before they go on).
    fn end_epoch<B: Backend>(
        &self,
        backend: &B,
        epoch: usize,
        record: &mut EpochRecord,
        summary: &mut TrainSummary,
        since_best: &mut usize,
        stopped: &Signal,
    ) -> Result<bool, TrainError> {
        let (job, train, client, runtime) = (self.job, &self.job.train, self.client, self.runtime);
        runtime.block_on(client.flush())?;
        if let Some(name) = train.epoch_checkpoint_name(epoch) {
            runtime.block_on(client.checkpoint(&name))?;
            tracing::info!(epoch, checkpoint = %name, "epoch checkpoint written");
        }
        let Some(source) = &job.data.validation else {
            return Ok(false);
        };
        let per_task = evaluate_on(backend, runtime, client, job, source)?;
        let m = per_task[0];
        (record.val_auc, record.val_logloss, record.val_accuracy) =
            (Some(m.auc), Some(m.logloss), Some(m.accuracy));
        if per_task.len() > 1 {
            record.val_task_auc = per_task.iter().map(|m| m.auc).collect();
        }
        let best_auc = summary
            .best_epoch
            .and_then(|e| summary.epochs.get(e - 1))
            .and_then(|r| r.val_auc);
        if best_auc.is_none_or(|best| m.auc > best) {
            summary.best_epoch = Some(epoch);
            *since_best = 0;
            if let Some(name) = &train.best_checkpoint {
                runtime.block_on(client.checkpoint(name))?;
                tracing::info!(epoch, auc = format_args!("{:.4}", m.auc), checkpoint = %name, "new best");
            }
        } else {
            *since_best += 1;
        }
        if train.early_stopping_patience > 0 && *since_best >= train.early_stopping_patience {
            tracing::info!(
                epoch,
                "early stopping: no validation improvement for {since_best} epochs"
            );
            runtime.block_on(stopped.raise(client))?;
            return Ok(true);
        }
        Ok(false)
    }

    fn train_on<B: Backend>(&self, backend: &B) -> Result<TrainSummary, TrainError> {
        let (job, train, client, runtime) = (self.job, &self.job.train, self.client, self.runtime);
        let model = Arc::new(Model::from_job(job));
        let started = Instant::now();
        let bad_lines = Arc::new(AtomicU64::new(0));
        let mut summary = TrainSummary::default();
        let mut since_best = 0;
        let progress = Progress::new(self.rank, train.log_every, self.telemetry.bars());
        let stopped = Signal::new(job, "stop");
        let mut reported_bytes = client.bytes();
        let gate = Gate::for_job(client, job, self.rank, self.world).map(Arc::new);
        let barrier = EpochBarrier::for_job(client, job, self.rank, self.world);
        let mut holdback = Holdback::for_job(job);
        let cache = model.row_cache(job);
        let positions = match train.progress_every_steps {
            0 => None,
            _ => Some(runtime.block_on(Positions::open(client, job, self.rank, self.world))?),
        };
        if let Some(positions) = &positions {
            summary.resumed_from = runtime.block_on(positions.load(client))?;
        }
        if let Some(at) = summary.resumed_from {
            summary.steps = at.steps;
            tracing::info!(
                worker = self.rank,
                epoch = at.epoch,
                batch = at.batch,
                steps = at.steps,
                "resuming where an earlier run of this rank stopped"
            );
        }
        for epoch in 1..=train.epochs {
            let at = summary
                .resumed_from
                .filter(|at| at.epoch == epoch as u64)
                .map_or(0, |at| at.batch);
            if summary
                .resumed_from
                .is_some_and(|at| (epoch as u64) < at.epoch)
            {
                continue;
            }
            if self.stop_requested(&stopped)? {
                summary.stopped_early |= self.rank != 0;
                break;
            }
            let mut batches = Batches::for_job(
                job,
                &job.data.train,
                self.rank,
                self.world,
                train.batch_size,
                &bad_lines,
            )?
            .shuffled(
                job.data.shuffle_buffer,
                mix64(train.seed ^ mix64(epoch as u64 ^ ((self.rank as u64) << 32))),
            )
            .sampled(
                &job.data,
                mix64(train.seed ^ mix64(epoch as u64) ^ 0x5341_4d50),
            )
            .augmented(
                &job.data,
                mix64(train.seed ^ mix64(epoch as u64 ^ ((self.rank as u64) << 32)) ^ 0x0041_5547),
            );
            for _ in 0..at {
                match batches.next() {
                    Some(batch) => summary.skipped_samples += batch?.len() as u64,
                    None => break,
                }
            }
            let mut batch_in_epoch = at;
            let mut pulled = Prefetched::new(runtime, client, &model, batches.ahead(PARSE_AHEAD))
                .with_gate(gate.clone(), summary.steps)
                .with_cache(cache.clone());
            let (mut epoch_loss, mut epoch_samples) = (0f64, 0u64);
            while let Some(params) = pulled.next_pulled()? {
                if self.stop.load(Ordering::Relaxed)
                    || (summary.steps % STOP_POLL_STEPS == STOP_POLL_STEPS - 1
                        && self.stop_requested(&stopped)?)
                {
                    summary.stopped_early |= self.rank != 0;
                    break;
                }
                let seed = mix64(train.seed ^ mix64(summary.steps ^ ((self.rank as u64) << 48)));
                let output = model.compute(backend, &params, Mode::Train { seed })?;
                if let Some(mut grads) = output.grads {
                    model.clip(&mut grads, train.clip_norm, train.clip_row_norm);
                    let lr_scale = train.lr_schedule.push_scale(summary.steps);
                    let updates = model.updates(&params, grads, lr_scale);
                    let cached = cache.as_deref().map(|cache| CachedStep {
                        cache,
                        step: summary.steps,
                        hot: &params.hot,
                    });
                    runtime.block_on(push_step(client, updates, cached, holdback.as_mut()))?;
                }
                let n = params.plan.examples as u64;
                epoch_loss += output.loss_sum;
                epoch_samples += n;
                summary.samples += n;
                summary.steps += 1;
                batch_in_epoch += 1;
                if let Some(positions) = &positions
                    && summary.steps % train.progress_every_steps == 0
                {
                    // The position says these steps are trained: their
                    // gradients must be on the servers, not in the cache.
                    self.push_cached(cache.as_deref(), summary.steps)?;
                    let here = Position {
                        epoch: epoch as u64,
                        batch: batch_in_epoch,
                        steps: summary.steps,
                    };
                    runtime.block_on(positions.record(client, here))?;
                }
                let running = epoch_loss / epoch_samples.max(1) as f64;
                progress.step(epoch, summary.steps, summary.samples, running);
                self.telemetry
                    .metrics()
                    .step(n, running, client.bytes(), &mut reported_bytes);
            }
            summary.last_epoch_loss = epoch_loss / epoch_samples.max(1) as f64;
            // Validation, checkpoints and the next epoch read every update.
            drop(pulled);
            self.push_cached(cache.as_deref(), summary.steps)?;
            if let Some(positions) = &positions
                && !self.stop.load(Ordering::Relaxed)
            {
                let next = Position {
                    epoch: epoch as u64 + 1,
                    batch: 0,
                    steps: summary.steps,
                };
                runtime.block_on(positions.record(client, next))?;
            }
            let mut record = EpochRecord {
                epoch,
                train_loss: summary.last_epoch_loss,
                val_auc: None,
                val_logloss: None,
                val_accuracy: None,
                val_task_auc: Vec::new(),
            };
            // Validation reads the model at one point: every worker's
            // pushes of this epoch applied, none of the next one's.
            if let Some(barrier) = &barrier {
                runtime.block_on(barrier.trained(epoch as u64))?;
            }
            let mut stop_now = false;
            if self.rank == 0 && ends_epochs(job) {
                let mut end = || {
                    self.end_epoch(
                        backend,
                        epoch,
                        &mut record,
                        &mut summary,
                        &mut since_best,
                        &stopped,
                    )
                };
                stop_now = match &barrier {
                    Some(barrier) => barrier.validating(runtime, epoch as u64, end)??,
                    None => end()?,
                };
            }
            tracing::info!(
                worker = self.rank,
                epoch,
                samples = epoch_samples,
                loss = format_args!("{:.4}", summary.last_epoch_loss),
                val_auc = record
                    .val_auc
                    .map(|a| format!("{a:.4}"))
                    .unwrap_or_default(),
                "epoch done"
            );
            summary.epochs.push(record);
            if stop_now {
                summary.stopped_early = epoch < train.epochs;
                self.stop.store(true, Ordering::Relaxed);
                break;
            }
        }
        progress.finish();
        self.push_cached(cache.as_deref(), summary.steps)?;
        summary.row_cache = cache.as_deref().map(RowCache::stats);
        if let Some(h) = &mut holdback {
            let lr_scale = train.lr_schedule.push_scale(summary.steps);
            runtime.block_on(push_updates(client, &h.drain(lr_scale)))?;
            summary.rows_offered_pushed = Some(h.rows());
        }
        runtime.block_on(client.flush())?;
        if let Some(positions) = &positions {
            // Done: a later run of this job starts from the beginning.
            runtime.block_on(positions.record(client, Position::default()))?;
        }
        if let Some(gate) = &gate {
            runtime.block_on(gate.finish())?;
            summary.max_staleness = Some(gate.max_staleness());
        }
        if let Some(barrier) = &barrier {
            runtime.block_on(barrier.finish())?;
        }
        summary.bad_lines = bad_lines.load(Ordering::Relaxed);
        summary.seconds = started.elapsed().as_secs_f64();
        Ok(summary)
    }
}

/// Evaluates the current server-side model on every example of `source`:
/// metrics per task (one for single-task models).
/// Must be called from a thread that is not a runtime worker.
pub fn evaluate(
    runtime: &Handle,
    client: &PsClient,
    job: &JobConfig,
    source: &DataSource,
) -> Result<Vec<BinaryMetrics>, TrainError> {
    let (probs, labels) = predict(runtime, client, job, source)?;
    Ok(BinaryMetrics::for_job(&probs, &labels, job))
}

/// Predicted probabilities and labels of every example of `source`, in
/// file order (example-major, one per task). Must be called from a thread that is not a runtime worker.
pub fn predict(
    runtime: &Handle,
    client: &PsClient,
    job: &JobConfig,
    source: &DataSource,
) -> Result<(Vec<f32>, Vec<f32>), TrainError> {
    match job.train.device {
        Device::Cpu => predict_on(&CpuBackend, runtime, client, job, source),
        Device::Cuda(ordinal) => {
            let backend = CudaBackend::new(ordinal)?;
            predict_on(&backend, runtime, client, job, source)
        }
    }
}

fn evaluate_on<B: Backend>(
    backend: &B,
    runtime: &Handle,
    client: &PsClient,
    job: &JobConfig,
    source: &DataSource,
) -> Result<Vec<BinaryMetrics>, TrainError> {
    let (probs, labels) = predict_on(backend, runtime, client, job, source)?;
    Ok(BinaryMetrics::for_job(&probs, &labels, job))
}

fn predict_on<B: Backend>(
    backend: &B,
    runtime: &Handle,
    client: &PsClient,
    job: &JobConfig,
    source: &DataSource,
) -> Result<(Vec<f32>, Vec<f32>), TrainError> {
    let model = Arc::new(Model::from_job(job));
    let skipped = Arc::new(AtomicU64::new(0));
    let batches = Batches::for_job(job, source, 0, 1, 4096, &skipped)?.ahead(PARSE_AHEAD);
    let mut pulled = Prefetched::new(runtime, client, &model, batches);
    let (mut probs, mut labels) = (Vec::new(), Vec::new());
    while let Some(params) = pulled.next_pulled()? {
        probs.extend(model.compute(backend, &params, Mode::Eval)?.probs);
        labels.extend_from_slice(&params.labels);
    }
    Ok((probs, labels))
}
