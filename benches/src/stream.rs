//! An id stream that never ends, trained within a memory budget: the
//! `ps-bench stream` measurement.
//!
//! **The stream.** Each sample has [`FIELDS`] ids, one per field. At step
//! `s` a field's id is `base(s) - a`, its age `a` drawn log-uniformly from
//! `[0, window)` (about Zipf(1)), with `base(s) = s * drift`: new ids keep
//! arriving at the head, where they are hottest, and fade as the stream
//! moves past them. Labels follow a planted logistic model: every id has a
//! fixed weight in `[-1, 1)` from a hash, and a sample's logit is the sum
//! of its ids' weights.
//!
//! **A run.** One shard serves over loopback gRPC in a process of its own
//! (`ps-bench stream --serve BUDGET`: the `ps-server` code, evictor
//! included, with the binary's allocator settings); one worker in this
//! process trains logistic
//! regression on the stream (a sparse dim-1 Adagrad table), pulling and
//! pushing every step, and is scored by AUC on the samples of the step
//! after its last ([`Setup::val_samples`], never trained on). A bounded run
//! gives the table admission (an id needs `min_count` pushes) and LRU
//! eviction, under `--memory-budget`; an unbounded run keeps every row.
//!
//! **Memory.** Each run has a fresh server process (the allocator keeps
//! what an earlier run freed): `rss_growth_bytes` is the growth of its peak
//! resident set (`VmHWM`) over its resident set before the table is made,
//! so it counts the rows and everything serving them allocates (request
//! buffers, the index, slabs freed but kept by the allocator), and nothing
//! of the worker's; it also counts the pages of the server's own code that
//! serving first touches (file-backed, shared). `anon_growth_bytes` leaves
//! those out: the most its anonymous resident memory (`RssAnon`, what it
//! allocated) grew, read every [`STATS_EVERY`] steps. `peak_table_bytes` is
//! the most the table held as the budget counts it, read from Stats as
//! often.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use ps_common::init::RowRng;
use ps_common::lifecycle::{Admission, Eviction, EvictionPolicy, Lifecycle};
use ps_common::routing::mix64;
use ps_common::{InitializerSpec, OptimizerSpec, TableKind, TableSpec};
use ps_server::{ServerConfig, Shard};
use ps_worker::{ClientConfig, PsClient};
use serde::{Deserialize, Serialize};

/// Ids per sample.
pub const FIELDS: usize = 8;
/// The table the runs train.
pub const TABLE: &str = "w";
/// The bounded run's disk tier page cache: small beside its budget (the
/// server's default, 16 MiB, is more than the whole budget of the default
/// stream; it is outside the budget).
pub const TIER_CACHE_BYTES: usize = 2 << 20;

/// Steps between two readings of the server's memory.
pub const STATS_EVERY: u64 = 10;

/// What to run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Setup {
    /// Training steps.
    pub steps: u64,
    /// Samples per step.
    pub batch: usize,
    /// Ages an id is drawn from (log-uniform).
    pub window: u64,
    /// How far the head of the stream moves per step, in ids per field.
    pub drift: u64,
    /// Validation samples (drawn at the step after the last).
    pub val_samples: usize,
    /// Pushes an id needs before it gets a row (bounded run; 1: no admission).
    pub min_count: u32,
    /// Which rows the bounded run evicts first.
    pub policy: EvictionPolicy,
    /// The shard's memory budget (`None`: the unbounded run).
    pub memory_budget: Option<u64>,
    /// The bounded run's server moves evicted rows to a disk tier instead
    /// of dropping them.
    pub disk_tier: bool,
    /// Stream seed.
    pub seed: u64,
}

/// What one run measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Run {
    /// Training samples per second.
    pub samples_per_sec: f64,
    /// AUC on the held-back samples.
    pub val_auc: f64,
    /// Most bytes the table held, as the memory budget counts them.
    pub peak_table_bytes: u64,
    /// Growth of the server's peak resident set over the start of the run.
    pub rss_growth_bytes: u64,
    /// Most the server's anonymous resident memory grew over the run.
    pub anon_growth_bytes: u64,
    /// Rows held in memory at the end.
    pub rows: u64,
    /// Rows on the disk tier at the end.
    pub rows_on_disk: u64,
    /// Ids admitted.
    pub admitted_rows: u64,
    /// Pushed rows dropped before their id was admitted.
    pub filtered_pushes: u64,
    /// Rows evicted.
    pub evicted_rows: u64,
}

/// The planted weight of `id`, in `[-1, 1)`.
fn planted(id: u64) -> f64 {
    (mix64(id ^ 0x00c0_ffee) >> 11) as f64 / (1u64 << 52) as f64 - 1.0
}

/// The drifting stream.
struct Stream {
    rng: RowRng,
    window: f64,
    drift: u64,
}

impl Stream {
    fn new(setup: &Setup, purpose: u64) -> Stream {
        Stream {
            rng: RowRng::new(setup.seed, purpose),
            window: setup.window as f64,
            drift: setup.drift,
        }
    }

    /// One sample of step `step`: its ids (appended to `ids`) and label.
    fn sample(&mut self, step: u64, ids: &mut Vec<u64>) -> f32 {
        let base = step * self.drift + self.window as u64;
        let mut logit = 0.0;
        for field in 0..FIELDS as u64 {
            let u = self.rng.next_f64();
            let age = ((self.window + 1.0).powf(u) - 1.0) as u64;
            let id = mix64(field << 56 ^ (base - age.min(base)));
            logit += planted(id);
            ids.push(id);
        }
        let p = 1.0 / (1.0 + (-logit).exp());
        if self.rng.next_f64() < p { 1.0 } else { 0.0 }
    }
}

/// The bounded run's policies: admission at `min_count` pushes, eviction
/// by `policy` under the memory budget.
pub fn lifecycle(min_count: u32, policy: EvictionPolicy) -> Lifecycle {
    Lifecycle {
        admission: (min_count > 1).then_some(Admission::Count {
            min_count,
            sketch_width: 1 << 16,
        }),
        eviction: Some(Eviction {
            policy,
            ..Eviction::default()
        }),
    }
}

/// Serves one shard on loopback with `budget` (`None`: none) and a disk
/// tier in `disk` (if given) until the process is killed: prints
/// `listening on ADDR` once it accepts calls.
pub fn serve(budget: Option<u64>, disk: Option<&std::path::Path>) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async {
        let mut shard = Shard::new(0, 1);
        if let Some(dir) = disk {
            shard = shard.with_disk_tier(ps_server::store::disk::DiskTier::create(
                dir,
                0,
                TIER_CACHE_BYTES,
            )?);
        }
        let shard = Arc::new(shard);
        if let Some(budget) = budget {
            shard.budget.set_limit(budget);
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        println!("listening on {}", listener.local_addr()?);
        ps_server::server::run(
            listener,
            ServerConfig::new(0, 1),
            shard,
            std::future::pending(),
        )
        .await?;
        Ok(())
    })
}

/// The server process of a run; killed when dropped.
struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `setup` against a server started as `serve_command` (this
/// benchmark's `--serve` mode; see the module doc).
pub fn run(setup: &Setup, mut serve_command: std::process::Command) -> anyhow::Result<Run> {
    let child = serve_command
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .context("cannot start the server process")?;
    let mut server = Server(child);
    let stdout = server.0.stdout.take().context("the server has no stdout")?;
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)
        .context("cannot read the server's address")?;
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .with_context(|| format!("the server printed {line:?}, not its address"))?
        .to_string();
    let process = server.0.id().to_string();
    let rss_start = crate::proc_status(&process, "VmRSS:")?;
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    let mut run = runtime.block_on(train(setup, addr, &process))?;
    run.rss_growth_bytes = crate::proc_status(&process, "VmHWM:")?.saturating_sub(rss_start);
    Ok(run)
}

/// Trains and scores one run against the server at `addr` (process
/// `process`).
async fn train(setup: &Setup, addr: String, process: &str) -> anyhow::Result<Run> {
    let anon_start = crate::proc_status(process, "RssAnon:")?;
    let mut anon_peak = anon_start;
    let client = PsClient::connect(&[addr], &ClientConfig::default()).await?;
    client
        .create_table(&TableSpec {
            name: TABLE.into(),
            kind: TableKind::Sparse,
            dim: 1,
            initializer: InitializerSpec::Zeros,
            optimizer: OptimizerSpec::Adagrad {
                lr: 0.1,
                initial_accumulator: 0.1,
                eps: 1e-8,
                l2: 0.0,
                weight_decay: 0.0,
            },
            seed: 1,
            lifecycle: match setup.memory_budget {
                Some(_) => lifecycle(setup.min_count, setup.policy),
                None => Lifecycle::default(),
            },
        })
        .await?;
    let memory_used = async || -> anyhow::Result<u64> {
        Ok(client
            .stats()
            .await?
            .iter()
            .map(|s| s.memory_used_bytes)
            .sum())
    };

    let mut stream = Stream::new(setup, 1);
    let (mut ids, mut labels) = (Vec::new(), Vec::new());
    let mut peak_table_bytes = 0;
    let started = Instant::now();
    for step in 0..setup.steps {
        ids.clear();
        labels.clear();
        for _ in 0..setup.batch {
            labels.push(stream.sample(step, &mut ids));
        }
        let weights = client.pull(TABLE, &ids).await?;
        let mut grads: std::collections::HashMap<u64, f32> =
            std::collections::HashMap::with_capacity(ids.len());
        for (sample, label) in labels.iter().enumerate() {
            let at = sample * FIELDS..(sample + 1) * FIELDS;
            let logit: f32 = weights[at.clone()].iter().sum();
            let error = 1.0 / (1.0 + (-logit).exp()) - label;
            for &id in &ids[at] {
                *grads.entry(id).or_default() += error;
            }
        }
        let (keys, values): (Vec<u64>, Vec<f32>) = grads.into_iter().unzip();
        client.push_unique(TABLE, &keys, &values).await?;
        if step % STATS_EVERY == 0 {
            peak_table_bytes = peak_table_bytes.max(memory_used().await?);
            anon_peak = anon_peak.max(crate::proc_status(process, "RssAnon:")?);
        }
    }
    client.flush().await?;
    let seconds = started.elapsed().as_secs_f64();
    peak_table_bytes = peak_table_bytes.max(memory_used().await?);
    anon_peak = anon_peak.max(crate::proc_status(process, "RssAnon:")?);

    let mut held_back = Stream::new(setup, 2);
    let (mut val_ids, mut val_labels) = (Vec::new(), Vec::new());
    for _ in 0..setup.val_samples {
        val_labels.push(held_back.sample(setup.steps, &mut val_ids));
    }
    let weights = client.pull(TABLE, &val_ids).await?;
    let scores: Vec<f32> = weights.chunks(FIELDS).map(|w| w.iter().sum()).collect();
    let val_auc = ps_worker::metrics::auc(&scores, &val_labels);

    let stats = client.stats().await?;
    let table = (stats.iter().flat_map(|s| &s.tables))
        .find(|t| t.name == TABLE)
        .context("the server's stats name no table w")?;
    Ok(Run {
        samples_per_sec: (setup.steps as usize * setup.batch) as f64 / seconds,
        val_auc,
        peak_table_bytes,
        rss_growth_bytes: 0,
        anon_growth_bytes: anon_peak - anon_start,
        rows: table.rows_in_memory,
        rows_on_disk: table.rows_on_disk,
        admitted_rows: table.admitted_rows,
        filtered_pushes: table.filtered_pushes,
        evicted_rows: table.evicted_rows,
    })
}

/// The JSON line of `ps-bench stream`: both runs side by side.
#[derive(Debug, Serialize)]
pub struct Report {
    /// The bounded run's growth of peak resident memory.
    pub max_rss_bytes: u64,
    /// The most the bounded run's table held, as the budget counts it.
    pub peak_table_bytes: u64,
    /// The bounded run's memory budget.
    pub memory_budget_bytes: u64,
    /// `max_rss_bytes / memory_budget_bytes` (goal: <= 1.1).
    pub rss_over_budget: f64,
    /// The bounded run's growth of anonymous resident memory (its
    /// allocations, without the pages of its code that serving touched).
    pub max_anon_rss_bytes: u64,
    /// `max_anon_rss_bytes / memory_budget_bytes`.
    pub anon_rss_over_budget: f64,
    /// The unbounded run's growth of anonymous resident memory.
    pub unbounded_max_anon_rss_bytes: u64,
    /// `memory_budget_bytes / unbounded_peak_table_bytes` (goal: <= 0.25).
    pub budget_over_unbounded_peak: f64,
    /// Rows evicted in the bounded run.
    pub evicted_rows: u64,
    /// Ids admitted in the bounded run.
    pub admitted_rows: u64,
    /// Pushed rows dropped before admission in the bounded run.
    pub filtered_pushes: u64,
    /// Rows held in memory at the end of the bounded run.
    pub rows: u64,
    /// Rows on the disk tier at the end of the bounded run.
    pub rows_on_disk: u64,
    /// The bounded run's validation AUC.
    pub val_auc: f64,
    /// The unbounded run's validation AUC (goal: `val_auc` within 0.005).
    pub unbounded_val_auc: f64,
    /// Training samples per second, bounded.
    pub samples_per_sec: f64,
    /// Training samples per second, unbounded.
    pub unbounded_samples_per_sec: f64,
    /// The unbounded run's table at its largest, as the budget counts it.
    pub unbounded_peak_table_bytes: u64,
    /// The unbounded run's growth of peak resident memory.
    pub unbounded_max_rss_bytes: u64,
    /// Rows held at the end of the unbounded run.
    pub unbounded_rows: u64,
    /// What ran.
    pub setup: Setup,
}

impl Report {
    /// The two runs side by side.
    pub fn of(setup: Setup, bounded: &Run, unbounded: &Run) -> Report {
        let budget = setup.memory_budget.unwrap_or(u64::MAX);
        Report {
            max_rss_bytes: bounded.rss_growth_bytes,
            peak_table_bytes: bounded.peak_table_bytes,
            memory_budget_bytes: budget,
            rss_over_budget: bounded.rss_growth_bytes as f64 / budget as f64,
            max_anon_rss_bytes: bounded.anon_growth_bytes,
            anon_rss_over_budget: bounded.anon_growth_bytes as f64 / budget as f64,
            unbounded_max_anon_rss_bytes: unbounded.anon_growth_bytes,
            budget_over_unbounded_peak: budget as f64 / unbounded.peak_table_bytes as f64,
            evicted_rows: bounded.evicted_rows,
            admitted_rows: bounded.admitted_rows,
            filtered_pushes: bounded.filtered_pushes,
            rows: bounded.rows,
            rows_on_disk: bounded.rows_on_disk,
            val_auc: bounded.val_auc,
            unbounded_val_auc: unbounded.val_auc,
            samples_per_sec: bounded.samples_per_sec,
            unbounded_samples_per_sec: unbounded.samples_per_sec,
            unbounded_peak_table_bytes: unbounded.peak_table_bytes,
            unbounded_max_rss_bytes: unbounded.rss_growth_bytes,
            unbounded_rows: unbounded.rows,
            setup,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_ids_arrive_hottest_and_old_ones_fade() {
        let setup = Setup {
            steps: 0,
            batch: 0,
            window: 10_000,
            drift: 100,
            val_samples: 0,
            min_count: 2,
            policy: EvictionPolicy::Lru,
            memory_budget: None,
            disk_tier: false,
            seed: 1,
        };
        let mut stream = Stream::new(&setup, 1);
        let draw = |stream: &mut Stream, step| {
            let mut ids = Vec::new();
            for _ in 0..2_000 {
                stream.sample(step, &mut ids);
            }
            ids.into_iter().collect::<std::collections::HashSet<u64>>()
        };
        let early = draw(&mut stream, 0);
        let late = draw(&mut stream, 1_000);
        let shared = early.intersection(&late).count();
        assert!(
            shared * 20 < early.len(),
            "{shared} of {} ids still seen",
            early.len()
        );
        // Hot ids repeat within a step.
        let mut ids = Vec::new();
        for _ in 0..2_000 {
            stream.sample(5, &mut ids);
        }
        let distinct = ids.iter().collect::<std::collections::HashSet<_>>().len();
        assert!(distinct * 2 < ids.len(), "{distinct} of {}", ids.len());
    }
}
