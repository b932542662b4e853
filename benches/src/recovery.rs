//! What recovering one shard costs: writing its checkpoint, restoring it
//! (`ps-server --restore`), and a new backup catching up through `Join`;
//! and what an incremental checkpoint costs when 1% of the rows changed.

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
}

/// A shard of `rows` rows of `dim` weights (Adagrad), every row touched.
fn filled_shard(rows: u64, dim: u32) -> anyhow::Result<Shard> {
    let shard = Shard::new(0, 1);
    shard.create_table(crate::emb_table(
        dim,
        OptimizerSpec::Adagrad {
            lr: 0.05,
            initial_accumulator: 0.1,
            eps: 1e-8,
        },
    ))?;
    let chunk: Vec<u64> = (0..4096).collect();
    let grads = vec![0.01f32; chunk.len() * dim as usize];
    for start in (0..rows).step_by(chunk.len()) {
        let keys: Vec<u64> = (start..(start + chunk.len() as u64).min(rows)).collect();
        shard.push("emb", &keys, &grads[..keys.len() * dim as usize])?;
    }
    Ok(shard)
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
        restored.snapshot() == shard.snapshot(),
        "the chain restored another shard"
    );
    std::fs::remove_dir_all(&dir).ok();

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
    })
}
