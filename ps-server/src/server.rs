//! Serving one shard: binds the service to a listener until shutdown.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ps_common::pb::parameter_server_server::ParameterServerServer;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;

use tonic::service::interceptor::InterceptedService;

use crate::auth::Auth;
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
    /// After draining on shutdown, write a checkpoint of this name under
    /// `checkpoint_dir` (so a pod's grace period ends with its state saved).
    pub checkpoint_on_shutdown: Option<String>,
    /// The bearer token every ParameterServer call must carry.
    pub auth: Auth,
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
    /// The shutdown checkpoint could not be written.
    #[error("shutdown checkpoint failed: {0}")]
    Checkpoint(ps_common::PsError),
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
        if let Some(name) = &self.checkpoint_on_shutdown {
            if self.checkpoint_dir.is_none() {
                return Err(ServeError::Config(
                    "--checkpoint-on-shutdown needs --checkpoint-dir".into(),
                ));
            }
            ps_common::table::validate_table_name(name).map_err(|_| {
                ServeError::Config(format!(
                    "--checkpoint-on-shutdown {name:?} must be 1-128 characters from [A-Za-z0-9_.-]"
                ))
            })?;
        }
        Ok(())
    }
}

/// Serves `shard` on `listener` until `shutdown` resolves, then reports
/// NOT_SERVING on the gRPC health service, lets in-flight requests finish
/// (for at most `config.drain_timeout`), writes the shutdown checkpoint if
/// configured, and returns. The standard `grpc.health.v1.Health` service
/// answers SERVING for `""` and `ps.v1.ParameterServer` while serving.
pub async fn run(
    listener: TcpListener,
    config: ServerConfig,
    shard: Arc<Shard>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    config.validate()?;
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<ParameterServerServer<ShardService>>()
        .await;
    health
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let service = ParameterServerServer::new(ShardService::new(
        Arc::clone(&shard),
        config.limits,
        config.checkpoint_dir.clone(),
    ))
    .max_decoding_message_size(config.limits.max_request_bytes)
    .max_encoding_message_size(usize::MAX);
    let service = InterceptedService::new(service, config.auth.clone());
    // Small pulls and pushes are latency-bound: never let Nagle's algorithm hold them.
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let (requested, drain_started) = tokio::sync::oneshot::channel::<()>();
    let serve = tonic::transport::Server::builder()
        .layer(OversizeStatusLayer)
        .add_service(health_service)
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, async move {
            shutdown.await;
            health
                .set_not_serving::<ParameterServerServer<ShardService>>()
                .await;
            health
                .set_service_status("", tonic_health::ServingStatus::NotServing)
                .await;
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
    if let (Some(name), Some(root)) = (&config.checkpoint_on_shutdown, &config.checkpoint_dir) {
        let (shard, root, name) = (Arc::clone(&shard), root.clone(), name.clone());
        let written =
            tokio::task::spawn_blocking(move || crate::checkpoint::save(&shard, &root, &name))
                .await
                .map_err(|e| ServeError::Checkpoint(ps_common::PsError::Internal(e.to_string())))?
                .map_err(ServeError::Checkpoint)?;
        tracing::info!(path = %written.path.display(), rows = written.rows, "shutdown checkpoint written");
    }
    Ok(())
}
