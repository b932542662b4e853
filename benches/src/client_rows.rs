//! `ps-bench client`: rows/s of the Rust client's pull and push against
//! running servers, batch by batch as a training loop calls them. The
//! Python package's benchmark (`ps-python/bench/rows.py`) runs the same
//! loop through `ps_client` beside it on the same tables.

use std::time::Instant;

use anyhow::Context;
use ps_common::OptimizerSpec;
use ps_worker::{ClientConfig, PsClient};
use serde::Serialize;

/// What is measured.
#[derive(Debug, Clone)]
pub struct Setup {
    /// The shards, in shard order.
    pub servers: Vec<String>,
    /// Distinct ids per call.
    pub batch: usize,
    /// Floats per row.
    pub dim: u32,
    /// Timed calls of each kind.
    pub iters: usize,
}

/// Rows per second of each call, over the timed calls.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Distinct ids per call.
    pub batch: usize,
    /// Floats per row.
    pub dim: u32,
    /// Rows pulled per second, one pull at a time.
    pub pull_rows_per_s: f64,
    /// Rows pushed per second (asynchronous pushes, then a flush).
    pub push_rows_per_s: f64,
}

/// Batches cycle over this many disjoint id blocks: after the warm-up
/// every pulled row exists, as in a training loop past its first steps.
pub const BLOCKS: u64 = 16;

/// The ids of call `i`: `batch` distinct ids, spread over every shard.
/// `ps-python/bench/rows.py` computes the same ids.
pub fn batch_ids(i: u64, batch: usize) -> Vec<u64> {
    let first = (i % BLOCKS) * batch as u64;
    (first..first + batch as u64)
        .map(|j| (j + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .collect()
}

/// Connects, creates `bench.emb` (dim `setup.dim`, Adagrad) if absent, warms
/// every block up, then times `iters` pulls and `iters` pushes.
pub async fn measure(setup: &Setup) -> anyhow::Result<Report> {
    let client = PsClient::connect(&setup.servers, &ClientConfig::default())
        .await
        .context("cannot connect to --servers")?;
    let mut spec = crate::emb_table(
        setup.dim,
        OptimizerSpec::Adagrad {
            lr: 0.05,
            initial_accumulator: 0.1,
            eps: 1e-8,
            l2: 0.0,
            weight_decay: 0.0,
        },
    );
    spec.name = "bench.emb".into();
    client.create_table(&spec).await?;
    let grads = vec![1e-3f32; setup.batch * setup.dim as usize];
    for i in 0..BLOCKS {
        client
            .pull_unique(&spec.name, &batch_ids(i, setup.batch))
            .await?;
    }
    let iters = setup.iters.max(1) as u64;
    let started = Instant::now();
    for i in 0..iters {
        let rows = client
            .pull_unique(&spec.name, &batch_ids(i, setup.batch))
            .await?;
        std::hint::black_box(rows);
    }
    let pull_s = started.elapsed().as_secs_f64();
    let started = Instant::now();
    for i in 0..iters {
        client
            .push_unique(&spec.name, &batch_ids(i, setup.batch), &grads)
            .await?;
    }
    client.flush().await?;
    let push_s = started.elapsed().as_secs_f64();
    let rows = (iters * setup.batch as u64) as f64;
    Ok(Report {
        batch: setup.batch,
        dim: setup.dim,
        pull_rows_per_s: rows / pull_s,
        push_rows_per_s: rows / push_s,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_has_distinct_ids_and_blocks_repeat() {
        let a = batch_ids(3, 4096);
        let mut sorted = a.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 4096);
        assert_eq!(batch_ids(3 + BLOCKS, 4096), a);
        assert!(batch_ids(4, 4096).iter().all(|k| !a.contains(k)));
    }
}
