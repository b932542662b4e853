//! Serving one shard: binds the service to a listener until shutdown.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ps_common::PsError;
use ps_common::pb::parameter_server_server::ParameterServerServer;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{ClientTlsConfig, ServerTlsConfig};

use crate::auth::{Auth, AuthLayer};
use crate::checkpoint::Checkpoints;
use crate::evictor::Evictor;
use crate::limits::OversizeStatusLayer;
use crate::metrics::ShardCounters;
use crate::replication::{Peer, Replication, Role};
use crate::request::{Decoder, Limits};
use crate::service::ShardService;
use crate::store::Shard;
use crate::writer::Writer;

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
    /// Write checkpoint [`PERIODIC_CHECKPOINT`] under `checkpoint_dir` this
    /// often (a primary only; each write replaces the last, atomically).
    pub checkpoint_every: Option<Duration>,
    /// Serve over TLS (`--tls-cert`, `--tls-key`; with a client CA, mutual TLS).
    pub tls: Option<ServerTlsConfig>,
    /// TLS towards peer servers (replication), trusting `--tls-ca`.
    pub peer_tls: Option<ClientTlsConfig>,
    /// The checkpoint this server's tables were restored from, reported by
    /// Describe (`None`: it started empty or joined a primary).
    pub restored_from: Option<String>,
    /// Where the server counts what it serves; share it with a
    /// [`crate::metrics::ShardMetrics`] collector to export it.
    pub counters: Arc<ShardCounters>,
    /// How often the evictor checks tables with eviction against their
    /// TTL, row cap and the memory budget ([`crate::evictor`]).
    pub evict_every: Duration,
    /// Periodic checkpoints are incremental: a delta of what changed, with
    /// a full base after this many deltas (`None`: every one is full).
    pub checkpoint_deltas_per_base: Option<u64>,
    /// A read replica of the shard's primary, found among these addresses
    /// (the primary, and its backup) ([`crate::follower`]); its replication
    /// must have the follower role. Empty: not a follower (unless
    /// `follow_coordinator` is set).
    pub follow: Vec<String>,
    /// A read replica of the primary this job's etcd names (instead of `follow`).
    pub follow_coordinator: Option<ps_common::coordinator::Job>,
    /// Primary: the byte cap of its follower log.
    pub follower_log_bytes: usize,
}

/// The name periodic checkpoints are written under.
pub const PERIODIC_CHECKPOINT: &str = "periodic";

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
    /// Shard `shard_id` of `num_shards` with default limits, no
    /// checkpoints, no token and a 5 s drain.
    pub fn new(shard_id: u32, num_shards: u32) -> ServerConfig {
        ServerConfig {
            shard_id,
            num_shards,
            limits: Limits::default(),
            checkpoint_dir: None,
            drain_timeout: Duration::from_secs(5),
            checkpoint_on_shutdown: None,
            auth: Auth::default(),
            checkpoint_every: None,
            tls: None,
            peer_tls: None,
            restored_from: None,
            counters: Arc::default(),
            evict_every: Duration::from_millis(100),
            checkpoint_deltas_per_base: None,
            follow: Vec::new(),
            follow_coordinator: None,
            follower_log_bytes: crate::replication::DEFAULT_FOLLOWER_LOG_BYTES,
        }
    }

    /// Checks the shard id against the shard count and the limits against zero.
    pub fn validate(&self) -> Result<(), ServeError> {
        if self.num_shards == 0 || self.shard_id >= self.num_shards {
            return Err(ServeError::Config(format!(
                "--shard-id must be in [0, --num-shards), got shard {} of {}",
                self.shard_id, self.num_shards
            )));
        }
        if self.limits.max_keys_per_request == 0
            || self.limits.max_request_bytes == 0
            || self.limits.max_response_bytes == 0
        {
            return Err(ServeError::Config("request limits must be >= 1".into()));
        }
        if self.checkpoint_every.is_some() && self.checkpoint_dir.is_none() {
            return Err(ServeError::Config(
                "--checkpoint-every-secs needs --checkpoint-dir".into(),
            ));
        }
        if self.checkpoint_deltas_per_base.is_some() && self.checkpoint_every.is_none() {
            return Err(ServeError::Config(
                "--checkpoint-deltas-per-base needs --checkpoint-every-secs".into(),
            ));
        }
        if self.evict_every.is_zero() {
            return Err(ServeError::Config(
                "--evict-interval-ms must be >= 1".into(),
            ));
        }
        if self.checkpoint_every.is_some_and(|every| every.is_zero()) {
            return Err(ServeError::Config(
                "--checkpoint-every-secs must be >= 1".into(),
            ));
        }
        if let Some(name) = &self.checkpoint_on_shutdown {
            if self.checkpoint_dir.is_none() {
                return Err(ServeError::Config(
                    "--checkpoint-on-shutdown needs --checkpoint-dir".into(),
                ));
            }
            ps_common::names::validate_checkpoint_name(name).map_err(|_| {
                ServeError::Config(format!(
                    "--checkpoint-on-shutdown {} {}",
                    ps_common::names::quoted(name),
                    ps_common::names::CHECKPOINT_NAME_RULE
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
/// answers for `ps.v1.ParameterServer` whether this server serves
/// (SERVING as a primary that was not deposed, and as a follower, which
/// serves pulls; a backup or a deposed primary is NOT_SERVING) and for `""` whether the process is up (SERVING
/// until shutdown: liveness, where restarting a backup or a deposed primary
/// would not help).
pub async fn run(
    listener: TcpListener,
    config: ServerConfig,
    shard: Arc<Shard>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let replication = Replication::new(
        Arc::clone(&shard),
        Role::Primary,
        Peer {
            auth: config.auth.clone(),
            tls: config.peer_tls.clone(),
        },
    );
    run_replicated(listener, config, shard, replication, shutdown).await
}

/// Starts a backup of shard `config.shard_id` serving on `listener` until
/// `shutdown`, and joins it to the primary at `primary` (which reaches it
/// at the listener's address). Returns once the backup has loaded the
/// primary's snapshot: its store and its serving task.
pub async fn start_backup(
    listener: TcpListener,
    config: ServerConfig,
    primary: &str,
    join_timeout: Duration,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(Arc<Shard>, tokio::task::JoinHandle<Result<(), ServeError>>), PsError> {
    let addr = listener
        .local_addr()
        .map_err(|e| PsError::Internal(format!("a backup's listener has no address: {e}")))?
        .to_string();
    let (shard, replication, task) = spawn_empty(listener, config, Role::Backup, shutdown);
    if let Err(e) = replication.join(primary, &addr, join_timeout).await {
        task.abort();
        return Err(e);
    }
    Ok((shard, task))
}

/// Starts a read replica of shard `config.shard_id` serving on `listener`
/// until `shutdown`; it follows the primaries `config.follow` names (or
/// the coordinator's) and loads a snapshot right after it starts. Returns
/// its store and its serving task once it is listening.
pub fn start_follower(
    listener: TcpListener,
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> (Arc<Shard>, tokio::task::JoinHandle<Result<(), ServeError>>) {
    let (shard, _, task) = spawn_empty(listener, config, Role::Follower, shutdown);
    (shard, task)
}

/// A server of an empty store in `role`, spawned: its store, its
/// replication and its serving task.
fn spawn_empty(
    listener: TcpListener,
    config: ServerConfig,
    role: Role,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> (
    Arc<Shard>,
    Arc<Replication>,
    tokio::task::JoinHandle<Result<(), ServeError>>,
) {
    let shard = Arc::new(Shard::new(config.shard_id, config.num_shards));
    let peer = Peer {
        auth: config.auth.clone(),
        tls: config.peer_tls.clone(),
    };
    let replication = Replication::new(Arc::clone(&shard), role, peer);
    let task = tokio::spawn(run_replicated(
        listener,
        config,
        Arc::clone(&shard),
        Arc::clone(&replication),
        shutdown,
    ));
    (shard, replication, task)
}

/// [`run`] for a server whose role and replication `replication` holds (a
/// backup, or a primary that backups may join).
pub async fn run_replicated(
    listener: TcpListener,
    config: ServerConfig,
    shard: Arc<Shard>,
    replication: Arc<Replication>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    config.validate()?;
    // However this ends (shutdown, an error, the task dropped), the
    // replication's background tasks end with it.
    let _close_replication = CloseOnDrop(Arc::clone(&replication));
    let checkpoints = config
        .checkpoint_dir
        .clone()
        .map(|root| Arc::new(Checkpoints::new(root)));
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let roles = replication.watch_role();
    if matches!(*roles.borrow(), "primary" | "follower") {
        health
            .set_serving::<ParameterServerServer<ShardService>>()
            .await;
    } else {
        health
            .set_not_serving::<ParameterServerServer<ShardService>>()
            .await;
    }
    let health_follows_role = tokio::spawn(report_role(health.clone(), roles));
    let evictor = Evictor::new(
        Arc::clone(&shard),
        Arc::clone(&replication),
        Arc::clone(&config.counters),
    );
    let evicting = AbortOnDrop(tokio::spawn(Arc::clone(&evictor).run(config.evict_every)));
    replication.set_follower_log_bytes(config.follower_log_bytes);
    let primaries = match &config.follow_coordinator {
        Some(job) => Some(crate::follower::Primaries::Coordinator(job.clone())),
        None if !config.follow.is_empty() => {
            Some(crate::follower::Primaries::Listed(config.follow.clone()))
        }
        None => None,
    };
    let _following = primaries.map(|primaries| {
        shard.set_read_only(true);
        let writer = Writer::new(
            Arc::clone(&shard),
            Arc::clone(&replication),
            Arc::clone(&config.counters),
        );
        AbortOnDrop(tokio::spawn(crate::follower::follow(
            Arc::clone(&replication),
            writer,
            Decoder::new(config.limits),
            (config.shard_id, primaries),
        )))
    });
    let service = ParameterServerServer::new(
        ShardService::new(Arc::clone(&shard), config.limits, checkpoints.clone())
            .with_replication(Arc::clone(&replication))
            .with_counters(Arc::clone(&config.counters))
            .with_restored_from(config.restored_from.clone())
            .with_evictor(evictor),
    )
    .max_decoding_message_size(config.limits.max_request_bytes)
    // Values are bounded by max_response_bytes before they are read; the
    // rest of a message (keys, framing, a Join chunk) is small beside them.
    .max_encoding_message_size(config.limits.max_response_bytes.saturating_add(16 << 20));
    let periodic = match (config.checkpoint_every, &checkpoints) {
        (Some(every), Some(checkpoints)) => Some(tokio::spawn(checkpoint_periodically(
            Arc::clone(&shard),
            Arc::clone(&replication),
            Arc::clone(checkpoints),
            every,
            config.checkpoint_deltas_per_base,
        ))),
        _ => None,
    };
    // Small pulls and pushes are latency-bound: never let Nagle's algorithm hold them.
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let (requested, drain_started) = tokio::sync::oneshot::channel::<()>();
    let mut builder = ps_common::http2::server();
    if let Some(tls) = config.tls.clone() {
        builder = builder.tls_config(tls)?;
    }
    let serve = builder
        .layer(OversizeStatusLayer)
        .layer(AuthLayer(config.auth.clone()))
        .add_service(health_service)
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, async move {
            shutdown.await;
            health_follows_role.abort();
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
    if let Some(periodic) = periodic {
        periodic.abort();
    }
    drop(evicting);
    if let (Some(name), Some(checkpoints)) = (&config.checkpoint_on_shutdown, checkpoints) {
        let (shard, name) = (Arc::clone(&shard), name.clone());
        let written = tokio::task::spawn_blocking(move || checkpoints.save(&shard, &name))
            .await
            .map_err(|e| ServeError::Checkpoint(ps_common::PsError::Internal(e.to_string())))?
            .map_err(ServeError::Checkpoint)?;
        tracing::info!(path = %written.path.display(), rows = written.rows, "shutdown checkpoint written");
    }
    Ok(())
}

/// Stops a background task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Closes a replication when dropped.
struct CloseOnDrop(Arc<Replication>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// Keeps the health status of `ps.v1.ParameterServer` on the role: SERVING
/// while this server is a primary that serves workers, or a follower.
async fn report_role(
    health: tonic_health::server::HealthReporter,
    mut roles: tokio::sync::watch::Receiver<&'static str>,
) {
    loop {
        let role = *roles.borrow_and_update();
        if matches!(role, "primary" | "follower") {
            health
                .set_serving::<ParameterServerServer<ShardService>>()
                .await;
        } else {
            tracing::info!(role, "not serving workers");
            health
                .set_not_serving::<ParameterServerServer<ShardService>>()
                .await;
        }
        if roles.changed().await.is_err() {
            return;
        }
    }
}

/// Writes checkpoint [`PERIODIC_CHECKPOINT`] every `every` while this
/// server is a serving primary (with `deltas_per_base`, incrementally). A
/// failed write is logged and retried at the next tick.
async fn checkpoint_periodically(
    shard: Arc<Shard>,
    replication: Arc<Replication>,
    checkpoints: Arc<Checkpoints>,
    every: Duration,
    deltas_per_base: Option<u64>,
) {
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        if replication.check_serving().is_err() {
            continue;
        }
        let (shard, checkpoints) = (Arc::clone(&shard), Arc::clone(&checkpoints));
        let started = std::time::Instant::now();
        match tokio::task::spawn_blocking(move || match deltas_per_base {
            Some(n) => checkpoints.save_incremental(&shard, PERIODIC_CHECKPOINT, n),
            None => checkpoints.save(&shard, PERIODIC_CHECKPOINT),
        })
        .await
        {
            Ok(Ok(written)) => tracing::info!(
                path = %written.path.display(),
                rows = written.rows,
                bytes = written.bytes,
                ms = started.elapsed().as_millis() as u64,
                "periodic checkpoint written"
            ),
            Ok(Err(e)) => tracing::error!("periodic checkpoint failed: {e}"),
            Err(e) => tracing::error!("periodic checkpoint task failed: {e}"),
        }
    }
}
