//! What recovering one shard costs: writing its checkpoint, restoring it
//! (`ps-server --restore`), and a new backup catching up through `Join`;
//! what an incremental checkpoint costs when 1% of the rows changed; and
//! restoring the same rows checkpointed by 2 shards into 3 (resharding).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use ps_common::OptimizerSpec;
use ps_server::{ServerConfig, Shard, checkpoint};
use serde::Serialize;

/// The measured costs, in milliseconds.
#[derive(Debug, Serialize)]
pub struct Recovery {
    /// Rows in the shard.
    pub rows: u64,
    /// Floats per row's weights.
    pub dim: u32,
    /// Size of the checkpoint file.
    pub checkpoint_bytes: u64,
    /// Writing the checkpoint (encode, checksum, fsync, rename).
    pub save_ms: f64,
    /// Reading, verifying and loading it into a fresh shard.
    pub restore_ms: f64,
    /// A backup's start and Join: snapshot, transfer over loopback gRPC,
    /// load (the snapshot is about `checkpoint_bytes`).
    pub join_ms: f64,
    /// Writing the base of an incremental chain.
    pub base_save_ms: f64,
    /// Writing a delta after 1% of the rows changed.
    pub delta_save_ms: f64,
    /// Size of that delta.
    pub delta_bytes: u64,
    /// Restoring the base and the delta.
    pub chain_restore_ms: f64,
    /// The same rows checkpointed by 2 shards, restored into 3: the
    /// slowest new shard (each reads both files and keeps its rows).
    pub reshard_shard_ms: f64,
    /// All 3 new shards, one after another.
    pub reshard_total_ms: f64,
}

/// A shard of `rows` rows of `dim` weights (Adagrad), every row touched.
fn filled_shard(rows: u64, dim: u32) -> anyhow::Result<Shard> {
    filled_part(rows, dim, (0, 1))
}

/// Shard `id` of `n` holding its part of [`filled_shard`]'s rows.
fn filled_part(rows: u64, dim: u32, (id, n): (u32, u32)) -> anyhow::Result<Shard> {
    let shard = Shard::new(id, n);
    let router = ps_common::ShardRouter::new(n);
    shard.create_table(crate::emb_table(
        dim,
        OptimizerSpec::Adagrad {
            lr: 0.05,
            initial_accumulator: 0.1,
            eps: 1e-8,
            l2: 0.0,
            weight_decay: 0.0,
        },
    ))?;
    let chunk: Vec<u64> = (0..4096).collect();
    let grads = vec![0.01f32; chunk.len() * dim as usize];
    for start in (0..rows).step_by(chunk.len()) {
        let keys: Vec<u64> = (start..(start + chunk.len() as u64).min(rows))
            .filter(|&k| router.shard_of(ps_common::routing::Placement::Sparse, k) == id)
            .collect();
        shard.push("emb", &keys, &grads[..keys.len() * dim as usize])?;
    }
    Ok(shard)
}

/// Checkpoints `rows` rows on 2 shards, then restores them into 3;
/// returns the slowest new shard's time and the sum.
fn reshard(rows: u64, dim: u32, dir: &std::path::Path) -> anyhow::Result<(f64, f64)> {
    let checkpoints = checkpoint::Checkpoints::new(dir.to_path_buf());
    for id in 0..2 {
        checkpoints.save(&filled_part(rows, dim, (id, 2))?, "two")?;
    }
    let (mut slowest, mut total, mut restored_rows) = (0f64, 0f64, 0);
    for id in 0..3 {
        let started = Instant::now();
        let shard = Shard::restore(checkpoint::load_resharded(&dir.join("two"), id, 3)?)?;
        let took = ms(started.elapsed());
        restored_rows += shard.table_stats()[0].rows;
        slowest = slowest.max(took);
        total += took;
    }
    anyhow::ensure!(restored_rows == rows, "resharding lost rows");
    std::fs::remove_dir_all(dir).ok();
    Ok((slowest, total))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Measures the three costs for a shard of `rows` x `dim`.
pub fn measure(rows: u64, dim: u32) -> anyhow::Result<Recovery> {
    let shard = Arc::new(filled_shard(rows, dim)?);
    let dir = std::env::temp_dir().join(format!("ps-recovery-{}", std::process::id()));
    let started = Instant::now();
    let written = checkpoint::Checkpoints::new(dir.clone()).save(&shard, "bench")?;
    let save_ms = ms(started.elapsed());
    let started = Instant::now();
    let restored = Shard::restore(checkpoint::load(&dir.join("bench"), 0, 1)?)?;
    let restore_ms = ms(started.elapsed());
    anyhow::ensure!(
        restored.table_stats()[0].rows == rows,
        "the restored shard lost rows"
    );
    std::fs::remove_dir_all(&dir).ok();

    let chain = checkpoint::Checkpoints::new(dir.clone());
    let started = Instant::now();
    chain.save_incremental(&shard, "chain", 8)?;
    let base_save_ms = ms(started.elapsed());
    let changed: Vec<u64> = (0..rows).step_by(100).collect();
    shard.push("emb", &changed, &vec![0.01; changed.len() * dim as usize])?;
    let started = Instant::now();
    let delta = chain.save_incremental(&shard, "chain", 8)?;
    let delta_save_ms = ms(started.elapsed());
    let started = Instant::now();
    let restored = Shard::restore(checkpoint::load(&dir.join("chain"), 0, 1)?)?;
    let chain_restore_ms = ms(started.elapsed());
    anyhow::ensure!(
        restored.snapshot()? == shard.snapshot()?,
        "the chain restored another shard"
    );
    std::fs::remove_dir_all(&dir).ok();

    let (reshard_shard_ms, reshard_total_ms) = reshard(rows, dim, &dir)?;

    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    let join_ms = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let primary = listener.local_addr()?.to_string();
        // Joins are server-to-server calls: both sides hold the peer token.
        let auth = ps_server::auth::Auth::default().with_peer_token("recovery-bench-peer-token");
        let server = tokio::spawn(ps_server::run(
            listener,
            ServerConfig {
                auth: auth.clone(),
                ..ServerConfig::new(0, 1)
            },
            Arc::clone(&shard),
            std::future::pending(),
        ));
        let backup_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let started = Instant::now();
        let (_, backup) = ps_server::server::start_backup(
            backup_listener,
            ServerConfig {
                auth,
                ..ServerConfig::new(0, 1)
            },
            &primary,
            Duration::from_secs(30),
            std::future::pending(),
        )
        .await?;
        let elapsed = started.elapsed();
        backup.abort();
        server.abort();
        anyhow::Ok(ms(elapsed))
    })?;
    Ok(Recovery {
        rows,
        dim,
        checkpoint_bytes: written.bytes,
        save_ms,
        restore_ms,
        join_ms,
        base_save_ms,
        delta_save_ms,
        delta_bytes: delta.bytes,
        chain_restore_ms,
        reshard_shard_ms,
        reshard_total_ms,
    })
}
