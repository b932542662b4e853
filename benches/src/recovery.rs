//! What recovering one shard costs: writing its checkpoint, restoring it
//! (`ps-server --restore`), and a new backup catching up through `Join`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use ps_common::OptimizerSpec;
use ps_server::replication::{Peer, Replication, Role};
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
    /// A backup's Join: snapshot, transfer over loopback gRPC, load.
    pub join_ms: f64,
    /// Bytes of the Join snapshot.
    pub join_bytes: usize,
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

    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    let (join_ms, join_bytes) = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let primary = listener.local_addr()?.to_string();
        let server = tokio::spawn(ps_server::run(
            listener,
            ServerConfig::new(0, 1),
            Arc::clone(&shard),
            std::future::pending(),
        ));
        let backup = Replication::new(Arc::new(Shard::new(0, 1)), Role::Backup, Peer::default());
        let started = Instant::now();
        // The backup's own address only matters for the stream that follows.
        let (_, bytes) = backup
            .join(&primary, "127.0.0.1:1", Duration::from_secs(30))
            .await?;
        let elapsed = started.elapsed();
        server.abort();
        anyhow::Ok((ms(elapsed), bytes))
    })?;
    Ok(Recovery {
        rows,
        dim,
        checkpoint_bytes: written.bytes,
        save_ms,
        restore_ms,
        join_ms,
        join_bytes,
    })
}
