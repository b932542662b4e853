//! What a sparse row costs in resident memory: the growth of this process's
//! RSS while pulls create `rows` rows in one shard, per row, against the
//! row's raw floats (weights plus optimizer state).
//!
//! The shard runs in this process with the `ps-server` binary's allocator
//! settings; the request buffers are allocated before the first reading and
//! reused, so the growth is the store's.

use std::time::Instant;

use anyhow::bail;
use ps_common::OptimizerSpec;
use ps_common::routing::mix64;
use ps_server::Shard;
use serde::Serialize;

/// Keys per pull request.
const KEYS_PER_PULL: usize = 65_536;

/// One measurement.
#[derive(Debug, Serialize)]
pub struct RowMemory {
    /// Rows created.
    pub rows: u64,
    /// Weights per row.
    pub dim: u32,
    /// The table's optimizer.
    pub optimizer: String,
    /// Bytes of a row's floats (weights plus optimizer state).
    pub raw_bytes_per_row: f64,
    /// Growth of the process's resident memory, per row.
    pub rss_bytes_per_row: f64,
    /// `rss_bytes_per_row / raw_bytes_per_row`.
    pub ratio: f64,
    /// `rss_bytes_per_row - raw_bytes_per_row`.
    pub overhead_bytes_per_row: f64,
    /// Rows created per second by the pulls.
    pub created_rows_per_s: f64,
}

/// The optimizers the bench knows, by name, with the defaults of the docs.
pub fn optimizer(name: &str) -> anyhow::Result<OptimizerSpec> {
    Ok(match name {
        "sgd" => OptimizerSpec::sgd(0.05),
        "adagrad" => OptimizerSpec::Adagrad {
            lr: 0.05,
            initial_accumulator: 0.1,
            eps: 1e-8,
            l2: 0.0,
            weight_decay: 0.0,
        },
        "adam" => OptimizerSpec::Adam {
            lr: 0.001,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            l2: 0.0,
            weight_decay: 0.0,
        },
        "ftrl" => OptimizerSpec::Ftrl {
            alpha: 0.05,
            beta: 1.0,
            l1: 0.0,
            l2: 0.0,
        },
        other => bail!("--optimizer: expected sgd, adagrad, adam or ftrl, got {other:?}"),
    })
}

/// Creates `rows` rows of `dim` weights by pulls of distinct random ids and
/// reports the resident memory they added.
pub fn measure(rows: u64, dim: u32, optimizer_name: &str) -> anyhow::Result<RowMemory> {
    let optimizer = optimizer(optimizer_name)?;
    let shard = Shard::new(0, 1);
    shard.create_table(crate::emb_table(dim, optimizer))?;
    let mut keys = vec![0u64; KEYS_PER_PULL];
    let mut checksum = 0f32;
    let before = crate::proc_status("self", "VmRSS:")?;
    let started = Instant::now();
    let mut next = 0u64;
    while next < rows {
        let n = KEYS_PER_PULL.min((rows - next) as usize);
        for (i, key) in keys[..n].iter_mut().enumerate() {
            // mix64 is a bijection: distinct, scattered ids.
            *key = mix64(next + i as u64);
        }
        shard.pull_each("emb", &keys[..n], |_, row| checksum += row[0])?;
        next += n as u64;
    }
    let seconds = started.elapsed().as_secs_f64();
    let after = crate::proc_status("self", "VmRSS:")?;
    let stats = &shard.table_stats()[0];
    if stats.rows != rows {
        bail!("the table holds {} rows, {rows} were pulled", stats.rows);
    }
    std::hint::black_box(checksum);
    let raw = stats.bytes as f64 / rows as f64;
    let rss = after.saturating_sub(before) as f64 / rows as f64;
    Ok(RowMemory {
        rows,
        dim,
        optimizer: optimizer_name.to_string(),
        raw_bytes_per_row: raw,
        rss_bytes_per_row: rss,
        ratio: rss / raw,
        overhead_bytes_per_row: rss - raw,
        created_rows_per_s: rows as f64 / seconds,
    })
}
