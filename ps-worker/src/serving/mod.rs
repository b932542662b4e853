//! Online predictions: `ps-worker serve`.
//!
//! A request travels: [`http`] (TensorFlow Serving's REST shape) or
//! [`grpc`] (`ps.v1.Predictor`) -> [`instance`] (JSON or protobuf
//! instances checked and parsed into a [`Batch`]) -> [`batcher`] (requests
//! that arrive within `batch_wait` share one batch) -> [`Engine`] (the
//! batch's rows from [`rows`], then the model's forward pass on the CPU).
//!
//! Rows come from parameter servers (point `--servers` at read replicas,
//! `ps-server --follow`, so serving never touches the training path)
//! through a cache of hot rows with a freshness bound, or from a serving
//! [`bundle`] held in memory.
//!
//! - [`instance`]: what an instance may be, and its parsing.
//! - [`rows`]: where rows come from; the freshness-bounded row cache.
//! - [`batcher`]: bounded-time batching of concurrent requests.
//! - [`bundle`]: export of a checkpoint to a self-contained bundle, and loading one.
//! - [`http`]: the REST endpoint (and `/metrics`).
//! - [`grpc`]: the gRPC `Predict` service.
//! - [`metrics`]: latency histograms and counters.

pub mod batcher;
pub mod bundle;
pub mod grpc;
pub mod http;
pub mod instance;
pub mod metrics;
pub mod rows;

use std::sync::Arc;
use std::time::Duration;

use ps_common::PsError;
use ps_common::config::JobConfig;

use crate::backend::cpu::CpuBackend;
use crate::data::{Batch, LineFormat};
use crate::model::{Mode, Model, Pulled};

pub use batcher::Batcher;
pub use instance::Instance;
pub use metrics::ServeMetrics;
pub use rows::Rows;

/// Why a prediction request failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ServeError {
    /// The request is wrong (HTTP 400, INVALID_ARGUMENT): a malformed
    /// body, an unknown model, an instance that does not parse.
    #[error("{0}")]
    BadRequest(String),
    /// Too many requests are waiting (HTTP 503, RESOURCE_EXHAUSTED).
    #[error("{0}")]
    Overloaded(String),
    /// The rows could not be read (HTTP 503, UNAVAILABLE).
    #[error("cannot read the model's rows: {0}")]
    Rows(PsError),
    /// The request lacks the serving token or carries another (HTTP 401,
    /// UNAUTHENTICATED).
    #[error("{0}")]
    Unauthenticated(String),
    /// A failure inside this process (HTTP 500, INTERNAL).
    #[error("internal error: {0}")]
    Internal(String),
}

impl ServeError {
    /// The metric label of this kind of failure.
    pub fn kind(&self) -> &'static str {
        match self {
            ServeError::BadRequest(_) => "bad_request",
            ServeError::Overloaded(_) => "overloaded",
            ServeError::Rows(_) => "rows",
            ServeError::Unauthenticated(_) => "unauthenticated",
            ServeError::Internal(_) => "internal",
        }
    }
}

/// How predictions are batched and bounded.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// The model's name in URLs and requests.
    pub name: String,
    /// Longest a request waits for others to share its batch.
    pub batch_wait: Duration,
    /// Most instances in one executed batch (a larger request runs alone).
    pub max_batch: usize,
    /// Most instances in one request.
    pub max_instances: usize,
    /// Requests waiting for a batch before new ones are refused.
    pub max_waiting: usize,
    /// Batches computed at once.
    pub max_running: usize,
    /// The bearer token prediction requests must carry (`None`: open).
    pub token: Option<String>,
}

impl ServeConfig {
    /// Defaults for the model `name`: no batching wait (requests waiting
    /// when a batch starts share it), batches of up to 1,024 instances,
    /// requests of up to 10,000.
    pub fn new(name: impl Into<String>) -> ServeConfig {
        ServeConfig {
            name: name.into(),
            batch_wait: Duration::ZERO,
            max_batch: 1024,
            max_instances: 10_000,
            max_waiting: 4096,
            max_running: 4,
            token: None,
        }
    }
}

/// Batches of at most this many instances are computed on the serving
/// task itself; larger ones on a blocking thread.
const INLINE_INSTANCES: usize = 16;

/// A model's forward pass over rows from a [`Rows`] source.
#[derive(Debug)]
pub struct Engine {
    model: Arc<Model>,
    rows: Rows,
    metrics: Arc<ServeMetrics>,
}

impl Engine {
    /// The model `job` configures, reading rows from `rows`.
    pub fn new(job: &JobConfig, rows: Rows, metrics: Arc<ServeMetrics>) -> Engine {
        Engine {
            model: Arc::new(Model::from_job(job)),
            rows,
            metrics,
        }
    }

    /// Probabilities of every example of `batch`, example-major: one per
    /// task, or a distribution over the classes of a multi-class model.
    pub async fn predict(&self, batch: &Batch) -> Result<Vec<f32>, ServeError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let (keys, plan) = self.model.plan(batch);
        let (sparse, dense) = self
            .rows
            .fetch(&self.model, &keys, &self.metrics)
            .await
            .map_err(ServeError::Rows)?;
        let pulled = Pulled {
            keys,
            plan,
            labels: batch.labels.clone(),
            sparse,
            dense,
            inputs: batch.dense.clone(),
            hot: Vec::new(),
        };
        // A small batch computes in well under a millisecond: on this
        // task, rather than waiting for a blocking thread to wake.
        let output = if batch.len() <= INLINE_INSTANCES {
            self.model.compute(&CpuBackend, &pulled, Mode::Eval)
        } else {
            let model = Arc::clone(&self.model);
            tokio::task::spawn_blocking(move || model.compute(&CpuBackend, &pulled, Mode::Eval))
                .await
                .map_err(|e| ServeError::Internal(format!("the compute task failed: {e}")))?
        }
        .map_err(|e| ServeError::Internal(e.to_string()))?;
        Ok(output.probs)
    }

    /// Probabilities per example: the tasks, or the classes.
    pub fn outputs(&self) -> usize {
        self.model.outputs().max(1)
    }
}

/// A served model: its name, how its instances parse, and the batcher
/// its requests go through.
#[derive(Debug, Clone)]
pub struct Predictor {
    name: String,
    /// `Bearer TOKEN` that requests must carry, if any.
    bearer: Option<Arc<[u8]>>,
    format: LineFormat,
    outputs: usize,
    max_instances: usize,
    batcher: Batcher,
    metrics: Arc<ServeMetrics>,
}

impl Predictor {
    /// Serves `job`'s model from `rows` as `config` says. Starts the
    /// batcher on the current runtime.
    pub fn start(
        job: &JobConfig,
        rows: Rows,
        config: &ServeConfig,
        metrics: Arc<ServeMetrics>,
    ) -> Predictor {
        let engine = Arc::new(Engine::new(job, rows, Arc::clone(&metrics)));
        Predictor {
            name: config.name.clone(),
            bearer: (config.token.as_ref()).map(|t| Arc::from(format!("Bearer {t}").into_bytes())),
            format: LineFormat::of_job(job),
            outputs: engine.outputs(),
            max_instances: config.max_instances,
            batcher: Batcher::start(engine, config, Arc::clone(&metrics)),
            metrics,
        }
    }

    /// The model's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Probabilities per instance: one per task, or one per class.
    pub fn outputs(&self) -> usize {
        self.outputs
    }

    /// What this server counts.
    pub fn metrics(&self) -> &Arc<ServeMetrics> {
        &self.metrics
    }

    /// Checks the `authorization` header or metadata value of a request
    /// (compared in constant time) when a token is set.
    pub fn check_token(&self, given: Option<&[u8]>) -> Result<(), ServeError> {
        match (&self.bearer, given) {
            (None, _) => Ok(()),
            (Some(want), Some(given)) if ps_common::auth::constant_time_eq(given, want) => Ok(()),
            (Some(_), Some(_)) => Err(ServeError::Unauthenticated(
                "the authorization header does not carry this server's token".into(),
            )),
            (Some(_), None) => Err(ServeError::Unauthenticated(
                "this server needs `authorization: Bearer TOKEN` (--predict-token-file)".into(),
            )),
        }
    }

    /// Checks that `model` names the served model.
    pub fn check_model(&self, model: &str) -> Result<(), ServeError> {
        if model != self.name {
            return Err(ServeError::BadRequest(format!(
                "unknown model {model:?}: this server serves {:?}",
                self.name
            )));
        }
        Ok(())
    }

    /// The probabilities of each of `instances` of model `model` (one per
    /// task, or one per class, each). Nothing is predicted unless every instance parses.
    pub async fn predict(
        &self,
        model: &str,
        instances: &[Instance],
    ) -> Result<Vec<Vec<f32>>, ServeError> {
        self.check_model(model)?;
        if instances.len() > self.max_instances {
            return Err(ServeError::BadRequest(format!(
                "{} instances in one request; at most {} are taken",
                instances.len(),
                self.max_instances
            )));
        }
        let batch = instance::to_batch(instances, &self.format)?;
        let probs = self.batcher.predict(batch).await?;
        self.metrics.predictions.inc_by(instances.len() as u64);
        Ok(probs.chunks(self.outputs).map(<[f32]>::to_vec).collect())
    }
}

/// `job`'s tables read from the servers at `addrs` (in shard order;
/// read replicas or primaries), through `cache`. The tables are not
/// created: they must exist on the servers.
pub async fn server_rows(
    job: &JobConfig,
    addrs: &[String],
    client: &crate::ClientConfig,
    cache: Option<rows::FreshRows>,
) -> Result<Rows, PsError> {
    let client = crate::PsClient::connect(addrs, client).await?;
    for spec in job.table_specs() {
        client.register_table(&spec)?;
    }
    Ok(Rows::Servers {
        client,
        cache: cache.map(std::sync::Arc::new),
    })
}

/// Where a serving process answers; dropping it stops the endpoints.
#[derive(Debug)]
pub struct Listening {
    /// The REST endpoint's address.
    pub http: std::net::SocketAddr,
    /// The gRPC endpoint's address, if one was asked for.
    pub grpc: Option<std::net::SocketAddr>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Listening {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// TLS of the prediction endpoints (`ps-worker serve --predict-tls-*`).
#[derive(Debug, Clone)]
pub struct ServingTls {
    /// The REST endpoint's (hyper over tokio-rustls).
    pub rest: Arc<tokio_rustls::rustls::ServerConfig>,
    /// The gRPC endpoint's (tonic).
    pub grpc: tonic::transport::ServerTlsConfig,
}

/// The flags that name the prediction endpoints' TLS files.
pub const TLS_FLAGS: [&str; 3] = [
    "--predict-tls-cert",
    "--predict-tls-key",
    "--predict-tls-ca",
];

impl ServingTls {
    /// From `files`: the certificate and key, and with
    /// `require_client_cert`, the CA that clients' certificates must be
    /// signed by. `None` when no file was given.
    pub fn from_files(
        files: &ps_common::tls::TlsFiles,
        require_client_cert: bool,
    ) -> Result<Option<ServingTls>, ps_common::tls::TlsError> {
        let Some(rest) = files.rustls_server(require_client_cert, TLS_FLAGS)? else {
            return Ok(None);
        };
        // The files were read and checked above, under their own flags.
        let grpc = files.server(require_client_cert)?.ok_or_else(|| {
            ps_common::tls::TlsError::Flags("TLS files for REST but not gRPC".into())
        })?;
        Ok(Some(ServingTls { rest, grpc }))
    }
}

/// Serves `predictor` over REST on `http` and, if given, over gRPC on
/// `grpc`, on the current runtime (port 0 picks a free port); with `tls`,
/// both endpoints take TLS connections only.
pub async fn listen(
    predictor: Predictor,
    http: std::net::SocketAddr,
    grpc: Option<std::net::SocketAddr>,
    limits: http::HttpLimits,
    tls: Option<ServingTls>,
) -> std::io::Result<Listening> {
    let listener = tokio::net::TcpListener::bind(http).await?;
    let http = listener.local_addr()?;
    let mut tasks = vec![tokio::spawn(http::serve(
        listener,
        predictor.clone(),
        limits,
        tls.as_ref().map(|t| Arc::clone(&t.rest)),
    ))];
    let grpc = match grpc {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr).await?;
            let bound = listener.local_addr()?;
            let incoming =
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
            let service = ps_common::pb::predictor_server::PredictorServer::new(
                grpc::PredictorService::new(predictor),
            );
            let mut builder = ps_common::http2::server();
            if let Some(tls) = &tls {
                builder = builder
                    .tls_config(tls.grpc.clone())
                    .map_err(|e| std::io::Error::other(format!("gRPC TLS: {e}")))?;
            }
            tasks.push(tokio::spawn(async move {
                if let Err(e) = builder
                    .add_service(service)
                    .serve_with_incoming(incoming)
                    .await
                {
                    tracing::error!("the gRPC predictor endpoint stopped: {e}");
                }
            }));
            Some(bound)
        }
        None => None,
    };
    Ok(Listening { http, grpc, tasks })
}
