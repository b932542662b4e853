//! What the disk tier costs a pull: latency of pulls of rows in memory
//! (without a tier, and with one) and of rows on disk (brought back to
//! memory, as a trainer's pull does, or read where they lie, as a read
//! replica's does), at 1 and at 256 keys per pull.
//!
//! One shard in this process, so the figures are the store's alone (a pull
//! over gRPC on loopback adds about 100 us). Rows are created by pulls;
//! then `cold_share` of them move to disk. Each timed pull of rows on disk
//! picks keys still on disk and, untimed, moves them back afterwards, so
//! every timed pull reads from disk (redb's page cache, 16 MiB by default,
//! holds only part of the file).

use std::time::Instant;

use anyhow::{Context, ensure};
use ps_common::OptimizerSpec;
use ps_common::lifecycle::{Eviction, Lifecycle};
use ps_common::routing::mix64;
use ps_server::Shard;
use ps_server::store::disk::{DEFAULT_CACHE_BYTES, DiskTier};
use serde::Serialize;

/// What to measure.
#[derive(Debug, Clone, Serialize)]
pub struct Setup {
    /// Rows in the table.
    pub rows: u64,
    /// Weights per row (Adagrad: as many floats of state).
    pub dim: u32,
    /// Share of the rows on disk.
    pub cold_share: f64,
    /// Timed pulls per kind and batch size.
    pub pulls: usize,
}

/// Latency of one kind of pull, in microseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    /// Median.
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// Mean.
    pub mean_us: f64,
}

impl Latency {
    fn of(mut micros: Vec<f64>) -> Latency {
        micros.sort_by(f64::total_cmp);
        let at = |q: f64| micros[((micros.len() - 1) as f64 * q).round() as usize];
        Latency {
            p50_us: at(0.5),
            p99_us: at(0.99),
            mean_us: micros.iter().sum::<f64>() / micros.len() as f64,
        }
    }
}

/// Latencies at one batch size.
#[derive(Debug, Clone, Serialize)]
pub struct AtBatch {
    /// Keys per pull.
    pub keys: usize,
    /// Rows in memory, no disk tier.
    pub memory: Latency,
    /// Rows in memory, on a shard with a disk tier.
    pub tier_hot: Latency,
    /// Rows on disk, brought back to memory by the pull.
    pub tier_cold: Latency,
    /// Rows on disk, read where they lie (a read-only shard).
    pub tier_cold_read_only: Latency,
}

/// The JSON line of `ps-bench tier`.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Latencies at 1 and at 256 keys per pull.
    pub batches: Vec<AtBatch>,
    /// Rows on disk when measuring.
    pub rows_on_disk: u64,
    /// The tier's file once the cold rows had moved to it.
    pub spilled_file_bytes: u64,
    /// The tier's file at the end.
    pub disk_file_bytes: u64,
    /// Seconds it took to move the cold rows to disk.
    pub spill_seconds: f64,
    /// What ran.
    pub setup: Setup,
}

fn table(dim: u32) -> ps_common::TableSpec {
    ps_common::TableSpec {
        lifecycle: Lifecycle {
            admission: None,
            eviction: Some(Eviction::default()),
        },
        ..crate::emb_table(dim, OptimizerSpec::adagrad(0.05))
    }
}

/// A shard holding rows `0..rows` of [`table`], all in memory.
fn filled(shard: Shard, setup: &Setup) -> anyhow::Result<Shard> {
    shard.create_table(table(setup.dim))?;
    let keys: Vec<u64> = (0..setup.rows).collect();
    for chunk in keys.chunks(65_536) {
        shard.pull("emb", chunk, &mut Vec::new())?;
    }
    Ok(shard)
}

/// Whether row `key` is among the cold ones.
fn is_cold(key: u64, cold_share: f64) -> bool {
    (mix64(key ^ 0x7ee7) >> 11) as f64 / (1u64 << 53) as f64 <= cold_share
}

/// `setup.pulls` timed pulls of `keys` keys each, drawn from `pool` (a
/// pull's keys distinct), with `after` run untimed after each.
fn time_pulls(
    shard: &Shard,
    pool: &[u64],
    keys: usize,
    setup: &Setup,
    seed: u64,
    mut after: impl FnMut(&Shard, &[u64]) -> anyhow::Result<()>,
) -> anyhow::Result<Latency> {
    let mut micros = Vec::with_capacity(setup.pulls);
    let mut out = Vec::new();
    for p in 0..setup.pulls as u64 {
        let mut batch: Vec<u64> = (0..keys as u64)
            .map(|i| pool[(mix64(seed ^ p << 20 ^ i) % pool.len() as u64) as usize])
            .collect();
        batch.sort_unstable();
        batch.dedup();
        out.clear();
        let started = Instant::now();
        shard.pull("emb", &batch, &mut out)?;
        micros.push(started.elapsed().as_secs_f64() * 1e6);
        after(shard, &batch)?;
    }
    Ok(Latency::of(micros))
}

/// Runs the measurement; `dir` holds the tier's file meanwhile.
pub fn measure(setup: Setup, dir: &std::path::Path) -> anyhow::Result<Report> {
    ensure!(
        setup.cold_share > 0.0 && setup.cold_share < 1.0 && setup.rows >= 1_000,
        "--cold-share must be in (0, 1) and --rows at least 1000"
    );
    let plain = filled(Shard::new(0, 1), &setup)?;
    let tier = DiskTier::create(dir, 0, DEFAULT_CACHE_BYTES).context("cannot create the tier")?;
    let tiered = filled(Shard::new(0, 1).with_disk_tier(tier.clone()), &setup)?;
    let (cold, hot): (Vec<u64>, Vec<u64>) =
        (0..setup.rows).partition(|&k| is_cold(k, setup.cold_share));
    let started = Instant::now();
    for chunk in cold.chunks(4096) {
        tiered.evict("emb", chunk, true)?;
    }
    tier.settle()?;
    let spill_seconds = started.elapsed().as_secs_f64();
    let spilled_file_bytes = tier.file_bytes();
    let rows_on_disk = tiered.table("emb")?.rows_on_disk();
    // The server's evictor commits durably once per pass, so the file
    // reuses freed pages; so does this, every 64 moves.
    let mut moves = 0u64;
    let mut back_to_disk = |shard: &Shard, keys: &[u64]| {
        shard.evict("emb", keys, true)?;
        moves += 1;
        if moves.is_multiple_of(64) {
            tier.settle()?;
        }
        Ok(())
    };
    let nothing = |_: &Shard, _: &[u64]| Ok(());
    let mut batches = Vec::new();
    for keys in [1, 256] {
        let memory = time_pulls(&plain, &hot, keys, &setup, 1, nothing)?;
        let tier_hot = time_pulls(&tiered, &hot, keys, &setup, 1, nothing)?;
        let tier_cold = time_pulls(&tiered, &cold, keys, &setup, 2, &mut back_to_disk)?;
        tiered.set_read_only(true);
        let tier_cold_read_only = time_pulls(&tiered, &cold, keys, &setup, 3, nothing)?;
        tiered.set_read_only(false);
        batches.push(AtBatch {
            keys,
            memory,
            tier_hot,
            tier_cold,
            tier_cold_read_only,
        });
    }
    ensure!(
        tiered.table("emb")?.rows_on_disk() == rows_on_disk,
        "rows left the disk unexpectedly"
    );
    Ok(Report {
        batches,
        rows_on_disk,
        spilled_file_bytes,
        disk_file_bytes: tier.file_bytes(),
        spill_seconds,
        setup,
    })
}
