//! `ps-server`: one parameter-server shard process.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use ps_common::auth::read_token_file;
use ps_server::auth::Auth;
use ps_server::logging::LogFormat;
use ps_server::{Limits, ServerConfig, Shard, checkpoint};

/// Serve one shard of a parameter-server job over gRPC.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Address to listen on, e.g. 0.0.0.0:7000 (port 0 picks a free port;
    /// the bound address is printed as `listening on ADDR`).
    #[arg(long)]
    listen: SocketAddr,
    /// This shard's index in [0, --num-shards).
    #[arg(long)]
    shard_id: u32,
    /// Number of shards in the job; every worker must list this many servers.
    #[arg(long)]
    num_shards: u32,
    /// Largest request message accepted, in bytes; larger ones get RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = Limits::default().max_request_bytes)]
    max_request_bytes: usize,
    /// Largest number of keys in one pull or push; more get RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = Limits::default().max_keys_per_request)]
    max_keys_per_request: usize,
    /// Folder where the Checkpoint RPC writes NAME/shard-I.bin (and its
    /// manifest); without it, checkpoints are refused.
    #[arg(long)]
    checkpoint_dir: Option<PathBuf>,
    /// Start from a checkpoint folder (DIR/NAME) instead of empty tables;
    /// refused if its checksum, shard id or shard count do not match.
    #[arg(long)]
    restore: Option<PathBuf>,
    /// On SIGINT/SIGTERM, seconds to let in-flight requests and open
    /// connections finish before exiting anyway.
    #[arg(long, default_value_t = 10)]
    drain_timeout_secs: u64,
    /// After draining on SIGINT/SIGTERM, write checkpoint NAME under
    /// --checkpoint-dir (e.g. within a Kubernetes pod's grace period).
    #[arg(long, value_name = "NAME")]
    checkpoint_on_shutdown: Option<String>,
    /// Serve Prometheus metrics at http://ADDR/metrics (port 0 picks a free
    /// port, printed as `metrics on ADDR` after the `listening on` line).
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
    /// Log format on stderr: text, or json (one object per line).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Require this bearer token (the file's text, 16-4096 visible ASCII
    /// characters) on every ParameterServer call; others get UNAUTHENTICATED.
    #[arg(long, value_name = "FILE")]
    auth_token_file: Option<std::path::PathBuf>,
    /// Most rows each sparse table may hold on this shard; pulls and pushes
    /// that would create more get RESOURCE_EXHAUSTED (default: no cap).
    #[arg(long, value_name = "N")]
    max_rows_per_table: Option<usize>,
}

fn main() -> anyhow::Result<()> {
    ps_common::memory::keep_freed_memory();
    tokio::runtime::Runtime::new()
        .context("cannot start the async runtime")?
        .block_on(serve(Args::parse()))
}

async fn serve(args: Args) -> anyhow::Result<()> {
    ps_server::logging::init(args.log_format);
    let auth = match &args.auth_token_file {
        Some(file) => Auth::bearer(&read_token_file(file).context("--auth-token-file")?),
        None => Auth::default(),
    };
    let config = ServerConfig {
        shard_id: args.shard_id,
        num_shards: args.num_shards,
        limits: Limits {
            max_request_bytes: args.max_request_bytes,
            max_keys_per_request: args.max_keys_per_request,
        },
        checkpoint_dir: args.checkpoint_dir.clone(),
        drain_timeout: std::time::Duration::from_secs(args.drain_timeout_secs),
        checkpoint_on_shutdown: args.checkpoint_on_shutdown.clone(),
        auth,
    };
    config.validate()?;
    let shard = match &args.restore {
        Some(dir) => {
            let snapshot = checkpoint::load(dir, args.shard_id, args.num_shards)
                .with_context(|| format!("cannot --restore {}", dir.display()))?;
            let shard = Shard::restore(snapshot)
                .with_context(|| format!("cannot --restore {}", dir.display()))?;
            let rows: usize = shard.table_stats().iter().map(|t| t.rows as usize).sum();
            tracing::info!(from = %dir.display(), rows, "restored checkpoint");
            shard
        }
        None => Shard::new(args.shard_id, args.num_shards),
    };
    shard.set_row_cap(args.max_rows_per_table);
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on --listen {}", args.listen))?;
    let addr = listener.local_addr()?;
    // Tests and scripts read this line to learn the port; keep it stable.
    println!("listening on {addr}");
    let shard = Arc::new(shard);
    if let Some(metrics_addr) = args.metrics_listen {
        let shard = Arc::clone(&shard);
        let bound =
            ps_server::metrics::listen(metrics_addr, Arc::new(move || shard.render_metrics()))
                .await
                .with_context(|| format!("cannot listen on --metrics-listen {metrics_addr}"))?;
        println!("metrics on {bound}");
    }
    tracing::info!(%addr, shard = args.shard_id, shards = args.num_shards, "serving");
    ps_server::run(listener, config, shard, shutdown_signal()).await?;
    tracing::info!("shut down");
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {},
                    _ = term.recv() => {},
                }
            }
            Err(e) => {
                tracing::warn!("cannot watch SIGTERM ({e}); only SIGINT stops the server");
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutdown signal received; draining in-flight requests");
}
