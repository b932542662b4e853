//! Serving one shard: binds the service to a listener until shutdown.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ps_common::pb::parameter_server_server::ParameterServerServer;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;

use crate::limits::OversizeStatusLayer;
use crate::service::{Limits, ShardService};
use crate::store::Shard;

/// Everything a shard process is configured with.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// This shard's index in `[0, num_shards)`.
    pub shard_id: u32,
    /// Number of shards in the job.
    pub num_shards: u32,
    /// Request limits.
    pub limits: Limits,
    /// Root folder of checkpoints (`ROOT/NAME/shard-I.bin`); `None` refuses them.
    pub checkpoint_dir: Option<PathBuf>,
    /// After shutdown is requested, how long to wait for in-flight requests
    /// and open connections to finish before stopping anyway (a client that
    /// never answers the GOAWAY must not keep the process alive).
    pub drain_timeout: Duration,
}

/// Errors that stop a shard from serving.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The configuration is inconsistent.
    #[error("invalid server configuration: {0}")]
    Config(String),
    /// The transport failed.
    #[error("gRPC transport error: {0}")]
    Transport(#[from] tonic::transport::Error),
}

impl ServerConfig {
    /// Checks the shard id against the shard count and the limits against zero.
    pub fn validate(&self) -> Result<(), ServeError> {
        if self.num_shards == 0 || self.shard_id >= self.num_shards {
            return Err(ServeError::Config(format!(
                "--shard-id must be in [0, --num-shards), got shard {} of {}",
                self.shard_id, self.num_shards
            )));
        }
        if self.limits.max_keys_per_request == 0 || self.limits.max_request_bytes == 0 {
            return Err(ServeError::Config("request limits must be >= 1".into()));
        }
        Ok(())
    }
}

/// Serves `shard` on `listener` until `shutdown` resolves, then lets in-flight
/// requests finish (for at most `config.drain_timeout`) and returns.
pub async fn run(
    listener: TcpListener,
    config: ServerConfig,
    shard: Arc<Shard>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    config.validate()?;
    let service = ParameterServerServer::new(ShardService::new(
        shard,
        config.limits,
        config.checkpoint_dir.clone(),
    ))
    .max_decoding_message_size(config.limits.max_request_bytes)
    .max_encoding_message_size(usize::MAX);
    // Small pulls and pushes are latency-bound: never let Nagle's algorithm hold them.
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let (requested, drain_started) = tokio::sync::oneshot::channel::<()>();
    let serve = tonic::transport::Server::builder()
        .layer(OversizeStatusLayer)
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, async move {
            shutdown.await;
            let _ = requested.send(());
        });
    tokio::pin!(serve);
    tokio::select! {
        served = &mut serve => served?,
        () = async {
            if drain_started.await.is_ok() {
                tokio::time::sleep(config.drain_timeout).await;
            } else {
                std::future::pending::<()>().await;
            }
        } => {
            tracing::warn!(timeout = ?config.drain_timeout, "connections still open after the drain timeout; stopping anyway");
        }
    }
    Ok(())
}
