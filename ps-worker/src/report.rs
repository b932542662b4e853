//! The [`Report`] a job ends in: what it trained, how fast, what it
//! moved over the wire and how it validated, written as one JSON object by
//! `--report` and summed up in one line on stderr.

use ps_common::config::JobConfig;
use serde::Serialize;

use crate::cache::CacheStats;
use crate::client::{PsClient, PushAcks};
use crate::metrics::{BinaryMetrics, TaskMetrics};
use crate::trainer::{EpochRecord, TrainSummary};

/// The result of a job, written as one JSON object by `--report`.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// `local` or `train`.
    pub mode: &'static str,
    /// The model kind (`lr`, `fm`, `deepfm`, `wide_deep`, `dnn`,
    /// `multitask`, `resnet`, `inception`).
    pub model: String,
    /// Classes of a multi-class model (its `val_accuracy` is top-1 and
    /// its `val_auc` the macro one-vs-rest AUC); 1 for binary tasks.
    pub classes: u32,
    /// Where the workers computed (`cpu`, `cuda:0`).
    pub device: String,
    /// This worker's rank (`train` only).
    pub rank: Option<usize>,
    /// Workers in the job.
    pub workers: usize,
    /// Shards in the job.
    pub servers: usize,
    /// Examples trained on, by the workers this report covers.
    pub train_samples: u64,
    /// Batches trained on, likewise.
    pub train_steps: u64,
    /// Seconds from the start of training to its end (pushes flushed).
    pub train_seconds: f64,
    /// `train_samples / train_seconds`.
    pub samples_per_sec: f64,
    /// Mean training loss over each worker's last epoch (mean over workers).
    pub final_train_loss: f64,
    /// Validation examples (0 without a validation file).
    pub val_examples: usize,
    /// Validation ROC AUC.
    pub val_auc: Option<f64>,
    /// Validation mean logloss.
    pub val_logloss: Option<f64>,
    /// Validation accuracy at threshold 0.5; top-1 for multi-class models.
    pub val_accuracy: Option<f64>,
    /// Validation predicted positives over observed ones (1: calibrated
    /// on average); none for multi-class models.
    pub val_calibration: Option<f64>,
    /// Multi-task models: validation metrics of every task (the `val_*`
    /// fields above are the first task's).
    pub val_tasks: Vec<TaskMetrics>,
    /// Payload bytes of Pull requests and responses.
    pub pull_bytes: u64,
    /// Payload bytes of Push requests and responses.
    pub push_bytes: u64,
    /// The data position an earlier, interrupted run of this rank had
    /// recorded, where this run started (`train` only).
    pub resumed_from: Option<crate::resume::Position>,
    /// Examples skipped to get there (trained by the earlier run).
    pub skipped_samples: u64,
    /// Push calls the servers acknowledged (each once, however often it
    /// was retried), and how retries and failovers went.
    pub pushes: PushAcks,
    /// Seconds from start-up to the end of validation.
    pub wall_seconds: f64,
    /// Malformed input lines skipped (`data.on_bad_line = "skip"`).
    pub bad_lines_skipped: u64,
    /// Worker 0's epochs, with validation metrics after each.
    pub epochs: Vec<EpochRecord>,
    /// The epoch with the best validation AUC.
    pub best_epoch: Option<usize>,
    /// Whether early stopping ended training before `train.epochs`.
    pub stopped_early: bool,
    /// `train.consistency`: async, ssp, bsp or hybrid.
    pub consistency: &'static str,
    /// Under ssp/bsp/hybrid: the largest staleness any worker's pull was
    /// released with (at most `train.staleness` under ssp, 0 under bsp).
    pub max_staleness: Option<u64>,
    /// With `communication.significance_threshold` or `dense_top_k`: rows
    /// pushed over rows the model offered to push (the rest was held back
    /// and pushed later, at the latest when the worker finished).
    pub pushed_row_fraction: Option<f64>,
    /// With `communication.row_cache_steps`: rows served from the workers'
    /// row caches, rows pulled, the hit rate, row gradients summed there and
    /// the value bytes that saved (all workers together).
    pub row_cache: Option<RowCacheReport>,
}

/// What the workers' row caches did (`communication.row_cache_steps`).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct RowCacheReport {
    /// Row lookups answered by a cache, and by the servers.
    #[serde(flatten)]
    pub stats: CacheStats,
    /// `hits / (hits + misses)`.
    pub hit_rate: f64,
}

impl Report {
    pub(crate) fn new(
        mode: &'static str,
        job: &JobConfig,
        workers: usize,
        servers: usize,
        summaries: &[TrainSummary],
    ) -> Self {
        let samples = summaries.iter().map(|s| s.samples).sum::<u64>();
        let seconds = summaries.iter().map(|s| s.seconds).fold(0.0, f64::max);
        Report {
            mode,
            model: job.model.kind_name().to_string(),
            classes: job.model.classes(),
            device: job.train.device.to_string(),
            rank: None,
            workers,
            servers,
            train_samples: samples,
            train_steps: summaries.iter().map(|s| s.steps).sum(),
            train_seconds: seconds,
            samples_per_sec: samples as f64 / seconds.max(1e-9),
            final_train_loss: summaries.iter().map(|s| s.last_epoch_loss).sum::<f64>()
                / summaries.len().max(1) as f64,
            val_examples: 0,
            val_auc: None,
            val_logloss: None,
            val_accuracy: None,
            val_calibration: None,
            val_tasks: Vec::new(),
            pull_bytes: 0,
            push_bytes: 0,
            resumed_from: summaries.iter().find_map(|s| s.resumed_from),
            skipped_samples: summaries.iter().map(|s| s.skipped_samples).sum(),
            pushes: PushAcks::default(),
            wall_seconds: 0.0,
            bad_lines_skipped: summaries.iter().map(|s| s.bad_lines).sum(),
            epochs: summaries
                .first()
                .map(|s| s.epochs.clone())
                .unwrap_or_default(),
            best_epoch: summaries.first().and_then(|s| s.best_epoch),
            stopped_early: summaries.iter().any(|s| s.stopped_early),
            consistency: job.train.consistency.name(),
            max_staleness: summaries.iter().filter_map(|s| s.max_staleness).max(),
            pushed_row_fraction: summaries
                .iter()
                .filter_map(|s| s.rows_offered_pushed)
                .reduce(|a, b| (a.0 + b.0, a.1 + b.1))
                .map(|(offered, pushed)| pushed as f64 / offered.max(1) as f64),
            row_cache: summaries
                .iter()
                .filter_map(|s| s.row_cache)
                .reduce(|a, b| CacheStats {
                    hits: a.hits + b.hits,
                    misses: a.misses + b.misses,
                    pull_bytes_saved: a.pull_bytes_saved + b.pull_bytes_saved,
                    rows_held: a.rows_held + b.rows_held,
                    rows_flushed: a.rows_flushed + b.rows_flushed,
                    push_bytes_saved: a.push_bytes_saved + b.push_bytes_saved,
                })
                .map(|stats| RowCacheReport {
                    stats,
                    hit_rate: stats.hit_rate(),
                }),
        }
    }

    pub(crate) fn set_validation(&mut self, job: &JobConfig, metrics: Option<Vec<BinaryMetrics>>) {
        if let Some(m) = metrics.as_ref().and_then(|m| m.first()) {
            self.val_examples = m.count;
            self.val_auc = Some(m.auc);
            self.val_logloss = Some(m.logloss);
            self.val_accuracy = Some(m.accuracy);
            self.val_calibration = (self.classes <= 1).then_some(m.calibration);
        }
        if let Some(metrics) = metrics.filter(|m| m.len() > 1) {
            let names: Vec<String> = job.model.tasks().into_iter().map(|t| t.name).collect();
            self.val_tasks = TaskMetrics::named(&names, &metrics);
        }
    }

    /// Adds `client`'s traffic and push acknowledgements.
    pub(crate) fn add_traffic(&mut self, client: &PsClient) {
        let bytes = client.bytes();
        self.pull_bytes += bytes.pull_bytes;
        self.push_bytes += bytes.push_bytes;
        let (acks, total) = (client.push_acks(), &mut self.pushes);
        total.acked += acks.acked;
        total.duplicates += acks.duplicates;
        total.retries += acks.retries;
        total.failovers += acks.failovers;
        total.max_failover_ms = total.max_failover_ms.max(acks.max_failover_ms);
    }

    /// A human-readable summary of the metrics.
    pub fn summary(&self) -> String {
        let fmt = |v: Option<f64>| v.map_or_else(|| "n/a".to_string(), |v| format!("{v:.4}"));
        let tasks: String = self
            .val_tasks
            .iter()
            .map(|t| {
                format!(
                    "; task {}: auc {:.4} logloss {:.4}",
                    t.task, t.auc, t.logloss
                )
            })
            .collect();
        let validation = if self.classes > 1 {
            format!(
                "top-1 accuracy {} logloss {} macro auc {} ({} classes)",
                fmt(self.val_accuracy),
                fmt(self.val_logloss),
                fmt(self.val_auc),
                self.classes
            )
        } else {
            format!(
                "auc {} logloss {} accuracy {} calibration {}{tasks}",
                fmt(self.val_auc),
                fmt(self.val_logloss),
                fmt(self.val_accuracy),
                fmt(self.val_calibration)
            )
        };
        format!(
            "trained {} samples in {:.2}s ({:.0} samples/s) on {} worker(s) x {} server(s); \
             validation ({} examples): {validation}",
            self.train_samples,
            self.train_seconds,
            self.samples_per_sec,
            self.workers,
            self.servers,
            self.val_examples,
        )
    }
}
