//! Where a process's workers report while they train: training metrics
//! (samples, steps, loss, bytes) updated every step and served as
//! Prometheus text by `--metrics-listen`, and the terminal's progress bars
//! (the workers of `ps-worker local` share one terminal). The binary makes
//! one [`Telemetry`] and hands it to every worker; nothing is process-wide.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use indicatif::{MultiProgress, ProgressDrawTarget};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use ps_common::prometheus::{counter, gauge};

use crate::client::ByteCounts;

/// Training counters of every worker in this process, summed.
#[derive(Debug)]
pub struct WorkerMetrics {
    started: Instant,
    samples: AtomicU64,
    steps: AtomicU64,
    /// `f64` bits of the latest running epoch loss.
    loss: AtomicU64,
    pull_bytes: AtomicU64,
    push_bytes: AtomicU64,
}

impl Default for WorkerMetrics {
    fn default() -> Self {
        WorkerMetrics {
            started: Instant::now(),
            samples: AtomicU64::new(0),
            steps: AtomicU64::new(0),
            loss: AtomicU64::new(f64::NAN.to_bits()),
            pull_bytes: AtomicU64::new(0),
            push_bytes: AtomicU64::new(0),
        }
    }
}

/// What the workers of one process report to (cheap to clone: shared).
#[derive(Debug, Clone)]
pub struct Telemetry {
    metrics: Arc<WorkerMetrics>,
    bars: MultiProgress,
}

impl Default for Telemetry {
    fn default() -> Self {
        Telemetry {
            metrics: Arc::default(),
            bars: MultiProgress::with_draw_target(ProgressDrawTarget::stdout()),
        }
    }
}

impl Telemetry {
    /// The training counters, summed over the workers reporting here.
    pub fn metrics(&self) -> &WorkerMetrics {
        &self.metrics
    }

    /// The progress bars the workers draw on the terminal.
    pub fn bars(&self) -> &MultiProgress {
        &self.bars
    }

    /// The counters as a Prometheus collector (read at scrape time).
    pub fn collector(&self) -> MetricsCollector {
        MetricsCollector(Arc::clone(&self.metrics))
    }
}

impl WorkerMetrics {
    /// One trained step of `samples` examples; `loss` is the epoch's running
    /// mean, `bytes` the step's client's totals so far, `last` what this
    /// worker reported before (so several workers sum).
    pub fn step(&self, samples: u64, loss: f64, bytes: ByteCounts, last: &mut ByteCounts) {
        self.samples.fetch_add(samples, Ordering::Relaxed);
        self.steps.fetch_add(1, Ordering::Relaxed);
        self.loss.store(loss.to_bits(), Ordering::Relaxed);
        self.pull_bytes.fetch_add(
            bytes.pull_bytes.saturating_sub(last.pull_bytes),
            Ordering::Relaxed,
        );
        self.push_bytes.fetch_add(
            bytes.push_bytes.saturating_sub(last.push_bytes),
            Ordering::Relaxed,
        );
        *last = bytes;
    }
}

/// The workers' training metrics as a Prometheus collector (read at
/// scrape time).
#[derive(Debug, Clone)]
pub struct MetricsCollector(Arc<WorkerMetrics>);

impl Collector for MetricsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let m = &self.0;
        let samples = m.samples.load(Ordering::Relaxed);
        let seconds = m.started.elapsed().as_secs_f64().max(1e-9);
        counter(
            &mut encoder,
            "ps_worker_samples",
            "Examples trained on",
            samples,
        )?;
        counter(
            &mut encoder,
            "ps_worker_steps",
            "Batches trained on",
            m.steps.load(Ordering::Relaxed),
        )?;
        gauge(
            &mut encoder,
            "ps_worker_samples_per_second",
            "Examples per second since start",
            samples as f64 / seconds,
        )?;
        gauge(
            &mut encoder,
            "ps_worker_loss",
            "Running mean training loss of the current epoch",
            f64::from_bits(m.loss.load(Ordering::Relaxed)),
        )?;
        counter(
            &mut encoder,
            "ps_worker_pull_bytes",
            "Payload bytes of pulls (sent and received)",
            m.pull_bytes.load(Ordering::Relaxed),
        )?;
        counter(
            &mut encoder,
            "ps_worker_push_bytes",
            "Payload bytes of pushes (sent and received)",
            m.push_bytes.load(Ordering::Relaxed),
        )
    }
}
