//! `[train]`: the training loop's settings, consistency modes, learning-rate
//! schedules and the compute device.

use super::*;

/// Training-loop settings.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Examples per step per worker.
    pub batch_size: usize,
    /// Passes over each worker's shard of the training data.
    pub epochs: usize,
    /// Seed of table initializers (unless a table sets its own) and of shuffling.
    pub seed: u64,
    /// Pushes a worker may have in flight before the next one waits.
    pub max_pushes_in_flight: usize,
    /// A progress line every this many steps (0: never).
    pub log_every: usize,
    /// Where the worker computes: `cpu`, `cuda` or `cuda:N`.
    pub device: Device,
    /// Stop when validation AUC has not improved for this many epochs
    /// (needs `data.validation`; 0: never stop early).
    pub early_stopping_patience: usize,
    /// Write a checkpoint of this name whenever validation AUC improves
    /// (needs `data.validation` and servers started with `--checkpoint-dir`).
    pub best_checkpoint: Option<String>,
    /// Write a checkpoint after every epoch, named by this template with
    /// `{epoch}` replaced by the epoch (e.g. `"epoch-{epoch}"`), at the
    /// point the epoch's validation reads (needs servers started with
    /// `--checkpoint-dir`).
    pub epoch_checkpoint: Option<String>,
    /// Clip the dense tables' gradients to this global L2 norm.
    pub clip_norm: Option<f32>,
    /// Clip each sparse row's gradient to this L2 norm.
    pub clip_row_norm: Option<f32>,
    /// Tables kept fixed: read, never updated (e.g. after `init_from`).
    pub freeze: Vec<String>,
    /// Transfer learning: a checkpoint directory (`DIR/NAME`, relative to the
    /// job file) whose weights initialize `init_tables` before training.
    pub init_from: Option<PathBuf>,
    /// Tables loaded from `init_from` (default: every table of the job the
    /// checkpoint holds); the others start fresh.
    pub init_tables: Vec<String>,
    /// Distinguishes runs of the same job on long-lived servers: the
    /// job-wide signals between worker processes (init_from loaded, early
    /// stop) are per run. `ps-worker train --run-id` sets it; `local` runs
    /// use a fresh one each time.
    pub run_id: Option<String>,
    /// Learning-rate schedule: a factor on every table optimizer's rate,
    /// sent with each push (batch-norm statistics are never scaled).
    pub lr_schedule: LrSchedule,
    /// How workers see each other's updates (see [`Consistency`]).
    pub consistency: Consistency,
    /// `ssp` only: steps the fastest worker may run ahead of the slowest
    /// live one (0 is bulk-synchronous).
    pub staleness: Option<u32>,
    /// Under ssp, bsp and hybrid: seconds a worker may stay silent before
    /// the others stop waiting for it (it rejoins when it reports again).
    pub worker_lease_seconds: f64,
    /// Every this many steps (and at each epoch's end) a worker records its
    /// data position on the servers, once its pushes are acknowledged; a
    /// worker restarted with the same rank resumes there. 0 turns it off.
    pub progress_every_steps: u64,
}

/// The consistency model of a job (`train.consistency`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Consistency {
    /// Every worker pulls and pushes at its own pace; the pull of step t+1
    /// overlaps the compute of step t.
    #[default]
    Async,
    /// Stale synchronous parallel: a worker's pull for step s waits until
    /// every live worker has finished step s - staleness - 1 (its pushes
    /// acknowledged).
    Ssp,
    /// Bulk synchronous: every worker's step s reads exactly the updates of
    /// steps before s, as one worker on the union of the batches would.
    Bsp,
    /// Dense tables bulk-synchronous, sparse tables asynchronous (Persia's
    /// hybrid): sparse rows are pulled ahead, dense tables in lockstep.
    Hybrid,
}

impl Consistency {
    /// The name used in job files.
    pub fn name(self) -> &'static str {
        match self {
            Consistency::Async => "async",
            Consistency::Ssp => "ssp",
            Consistency::Bsp => "bsp",
            Consistency::Hybrid => "hybrid",
        }
    }
}

/// A learning-rate schedule over a worker's steps (`[train.lr_schedule]`).
/// Every kind can start with a linear warm-up from 0 over `warmup_steps`.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum LrSchedule {
    /// Factor 1 (after the warm-up).
    Constant {
        /// Steps of linear warm-up.
        #[serde(default)]
        warmup_steps: u64,
    },
    /// Factor `gamma^(step / every)`.
    Step {
        /// Steps of linear warm-up.
        #[serde(default)]
        warmup_steps: u64,
        /// Steps between decays.
        every: u64,
        /// Decay factor in (0, 1].
        gamma: f32,
    },
    /// Cosine decay from 1 to `min_scale` over `decay_steps`, then flat.
    Cosine {
        /// Steps of linear warm-up.
        #[serde(default)]
        warmup_steps: u64,
        /// Steps from 1 down to `min_scale` (after the warm-up).
        decay_steps: u64,
        /// Final factor in [0, 1].
        #[serde(default)]
        min_scale: f32,
    },
}

impl Default for LrSchedule {
    fn default() -> Self {
        LrSchedule::Constant { warmup_steps: 0 }
    }
}

impl LrSchedule {
    /// The factor at 0-based `step`.
    pub fn scale(&self, step: u64) -> f32 {
        let warmup = match *self {
            LrSchedule::Constant { warmup_steps }
            | LrSchedule::Step { warmup_steps, .. }
            | LrSchedule::Cosine { warmup_steps, .. } => warmup_steps,
        };
        if step < warmup {
            return (step + 1) as f32 / warmup as f32;
        }
        let t = step - warmup;
        match *self {
            LrSchedule::Constant { .. } => 1.0,
            LrSchedule::Step { every, gamma, .. } => gamma.powf((t / every.max(1)) as f32),
            LrSchedule::Cosine {
                decay_steps,
                min_scale,
                ..
            } => {
                let progress = (t as f64 / decay_steps.max(1) as f64).min(1.0);
                let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
                min_scale + (1.0 - min_scale) * cosine as f32
            }
        }
    }

    /// Whether the schedule is the constant 1 (nothing to send).
    pub fn is_constant(&self) -> bool {
        *self == LrSchedule::Constant { warmup_steps: 0 }
    }

    /// The factor a push at `step` carries: `None` for the constant 1.
    pub fn push_scale(&self, step: u64) -> Option<f32> {
        (!self.is_constant()).then(|| self.scale(step))
    }

    pub(super) fn validate(&self) -> Result<(), String> {
        match *self {
            LrSchedule::Constant { .. } => Ok(()),
            LrSchedule::Step { every, gamma, .. } => {
                if every == 0 {
                    Err("step schedule needs every >= 1".into())
                } else if !(gamma > 0.0 && gamma <= 1.0) {
                    Err(format!("step schedule needs gamma in (0, 1], got {gamma}"))
                } else {
                    Ok(())
                }
            }
            LrSchedule::Cosine {
                decay_steps,
                min_scale,
                ..
            } => {
                if decay_steps == 0 {
                    Err("cosine schedule needs decay_steps >= 1".into())
                } else if !(0.0..=1.0).contains(&min_scale) {
                    Err(format!(
                        "cosine schedule needs min_scale in [0, 1], got {min_scale}"
                    ))
                } else {
                    Ok(())
                }
            }
        }
    }
}

/// The device a worker computes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(try_from = "String")]
pub enum Device {
    /// The host CPU.
    #[default]
    Cpu,
    /// A CUDA device by ordinal.
    Cuda(usize),
}

impl TryFrom<String> for Device {
    type Error = String;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl std::str::FromStr for Device {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(|| format!("unknown device {s:?} (expected cpu, cuda or cuda:N)")),
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            batch_size: 128,
            epochs: 1,
            seed: 1,
            max_pushes_in_flight: 4,
            log_every: 100,
            device: Device::Cpu,
            early_stopping_patience: 0,
            best_checkpoint: None,
            epoch_checkpoint: None,
            clip_norm: None,
            clip_row_norm: None,
            freeze: Vec::new(),
            init_from: None,
            init_tables: Vec::new(),
            run_id: None,
            lr_schedule: LrSchedule::default(),
            consistency: Consistency::Async,
            staleness: None,
            worker_lease_seconds: 30.0,
            progress_every_steps: 100,
        }
    }
}

impl TrainConfig {
    /// The name of `epoch`'s checkpoint under `epoch_checkpoint`.
    pub fn epoch_checkpoint_name(&self, epoch: usize) -> Option<String> {
        self.epoch_checkpoint
            .as_ref()
            .map(|template| template.replace("{epoch}", &epoch.to_string()))
    }
}
