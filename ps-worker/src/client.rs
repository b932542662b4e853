//! `PsClient`: one worker's connection to every shard.
//!
//! It routes keys with the shared [`ShardRouter`], de-duplicates them,
//! splits requests per shard (and into chunks under each shard's limits),
//! sends them to all shards in parallel and puts pulled rows back in the
//! caller's order. Pushes are asynchronous: [`PsClient::push`] returns once
//! the requests are handed to background tasks, with at most
//! `max_pushes_in_flight` requests outstanding. The first push error is kept
//! and returned by the next `push` or by [`PsClient::flush`]; none is dropped.
//!
//! A shard is reached over gRPC ([`PsClient::connect`]) or, for benchmarks
//! and tests that want no network, by calling its service in this process
//! ([`PsClient::in_process`]); everything above the link is the same code.
//! The client counts payload bytes and times every pull and push request.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use prost::Message;
use ps_common::pb::parameter_server_client::ParameterServerClient;
use ps_common::pb::parameter_server_server::ParameterServer;
use ps_common::pb::{self, ValueEncoding};
use ps_common::routing::Placement;
use ps_common::{PsError, ShardRouter, TableSpec, wire};
use ps_server::service::ShardService;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tonic::metadata::AsciiMetadataValue;
use tonic::transport::Channel;
use tonic::{Request, Status};

use crate::dedup::UniqueKeys;
use crate::latency::Latencies;

/// How keys and values travel (`[communication]` in the job file).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WireFormat {
    /// Encoding of pulled values (servers keep `f32`).
    pub pull_values: ValueEncoding,
    /// Encoding of pushed gradients.
    pub push_values: ValueEncoding,
    /// Send each request's keys sorted, delta + varint encoded.
    pub delta_keys: bool,
}

/// How a client connects and how many pushes it keeps in flight.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Push requests outstanding before the next push waits.
    pub max_pushes_in_flight: usize,
    /// How keys and values are encoded on the wire.
    pub wire: WireFormat,
    /// Requests to one shard smaller than this travel together in one
    /// `PullMany` / `PushMany` call of at most this size.
    pub coalesce_bytes: usize,
    /// Bearer token sent with every call (`--auth-token-file`).
    pub auth_token: Option<String>,
    /// How long to keep retrying a shard that does not accept connections.
    pub connect_timeout: Duration,
    /// Deadline of every RPC.
    pub request_timeout: Duration,
    /// Backup of each shard, in shard order (empty: the backups the
    /// primaries report when the client connects, if any).
    pub backups: Vec<String>,
    /// TLS to the servers (`--tls-ca`, and `--tls-cert`/`--tls-key` for
    /// mutual TLS); `None` is plain TCP.
    pub tls: Option<tonic::transport::ClientTlsConfig>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            max_pushes_in_flight: 4,
            wire: WireFormat::default(),
            coalesce_bytes: 256 << 10,
            auth_token: None,
            connect_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(60),
            backups: Vec::new(),
            tls: None,
        }
    }
}

/// Payload bytes this client sent and received, per RPC family.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ByteCounts {
    /// Encoded Pull requests sent plus Pull responses received.
    pub pull_bytes: u64,
    /// Encoded Push requests sent plus Push responses received.
    pub push_bytes: u64,
}

/// Push calls this client had acknowledged, and failovers it made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct PushAcks {
    /// Push and PushMany calls acknowledged (each once, however often retried).
    pub acked: u64,
    /// Of those, calls a shard acknowledged as already applied (a retry).
    pub duplicates: u64,
    /// Calls sent again after a failure.
    pub retries: u64,
    /// Shards this client moved to their backup.
    pub failovers: u64,
    /// Longest failover: from the failed call to the promoted backup's answer, in ms.
    pub max_failover_ms: u64,
}

/// How requests reach a shard.
#[derive(Debug, Clone)]
enum Link {
    /// Over the network.
    Grpc(ParameterServerClient<Channel>),
    /// By calling the shard's service in this process: no encoding, no socket.
    InProcess(ShardService),
}

/// Calls RPC `$rpc` with `$request` on shard connection `$shard` (its
/// bearer token attached, if any); the answer's message or status.
macro_rules! call {
    ($shard:expr, $rpc:ident, $request:expr) => {{
        let shard: &ShardConn = $shard;
        let request = authorized(shard.auth.as_ref(), $request);
        match &shard.link {
            Link::Grpc(client) => client.clone().$rpc(request).await,
            Link::InProcess(service) => service.$rpc(request).await,
        }
        .map(tonic::Response::into_inner)
    }};
}

#[derive(Debug, Clone)]
struct ShardConn {
    addr: String,
    link: Link,
    /// `Bearer TOKEN`, sent with every call when the job has a token.
    auth: Option<AsciiMetadataValue>,
    /// Most keys one request to this shard may carry.
    max_keys: usize,
    /// Largest request this shard accepts, and largest answer it gives, in bytes.
    max_bytes: usize,
}

impl ShardConn {
    fn new(
        addr: String,
        link: Link,
        auth: Option<AsciiMetadataValue>,
        described: &pb::DescribeResponse,
    ) -> ShardConn {
        ShardConn {
            addr,
            link,
            auth,
            max_keys: usize::try_from(described.max_keys_per_request)
                .unwrap_or(usize::MAX)
                .max(1),
            max_bytes: usize::try_from(described.max_request_bytes)
                .unwrap_or(usize::MAX)
                .min(match described.max_response_bytes {
                    // A server from before the answer limit.
                    0 => usize::MAX,
                    n => usize::try_from(n).unwrap_or(usize::MAX),
                }),
        }
    }

    fn error(&self, shard: usize, status: tonic::Status) -> PsError {
        PsError::Shard {
            shard,
            addr: self.addr.clone(),
            code: status.code(),
            message: status.message().to_string(),
        }
    }

    /// Keys per request so that a request of rows of `dim` floats stays under both limits.
    fn chunk_keys(&self, dim: usize) -> usize {
        // 8 bytes per key (worst-case varint is 10) + 4 per float, with headroom for framing.
        let per_key = 10 + 4 * dim;
        let by_bytes = self.max_bytes.saturating_sub(1024) / per_key;
        self.max_keys.min(by_bytes).max(1)
    }
}

/// Most times one call is sent before its error is returned.
const MAX_ATTEMPTS: u32 = 8;
/// How often a client asks the serving replica of a shard for its backup.
const BACKUP_REFRESH: Duration = Duration::from_secs(2);
/// How long a call may go unanswered before the client checks that the
/// replica still answers at all.
const HANG_PROBE_AFTER: Duration = Duration::from_secs(1);

/// One shard: the replica serving it now, the backup to fail over to, and
/// the numbering of this client's push calls to it.
#[derive(Debug)]
struct Replicas {
    id: usize,
    current: RwLock<(u64, ShardConn)>,
    /// The backup to promote if the serving replica fails: listed, reported
    /// at connect, or learned later ([`Replicas::learn_backup`]).
    standby: Mutex<Option<String>>,
    /// Held while failing over, so concurrent failures promote once.
    failing_over: tokio::sync::Mutex<()>,
    /// When the serving replica was last asked for its backup.
    asked_for_backup: Mutex<std::time::Instant>,
    /// Why the last failover did not happen (the backup's refusal), for
    /// the error a call ends with.
    failover_refused: Mutex<Option<String>>,
    /// Sequence number of this client's next push call to the shard.
    next_seq: AtomicU64,
    config: ClientConfig,
}

impl Replicas {
    fn new(id: usize, conn: ShardConn, standby: Option<String>, config: ClientConfig) -> Replicas {
        Replicas {
            id,
            current: RwLock::new((0, conn)),
            standby: Mutex::new(standby.filter(|s| !s.is_empty())),
            failing_over: tokio::sync::Mutex::new(()),
            asked_for_backup: Mutex::new(std::time::Instant::now()),
            failover_refused: Mutex::new(None),
            next_seq: AtomicU64::new(1),
            config,
        }
    }

    /// The replica serving now, and its generation.
    fn conn(&self) -> (u64, ShardConn) {
        self.current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Keys per request for rows of `dim` floats, under the serving replica's limits.
    fn chunk_keys(&self, dim: usize) -> usize {
        let current = self
            .current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        current.1.chunk_keys(dim)
    }

    /// Most keys in one request to the serving replica, and most bytes in
    /// one of its requests or answers.
    fn limits(&self) -> (usize, usize) {
        let current = self
            .current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        (current.1.max_keys, current.1.max_bytes)
    }

    /// An error about this shard, naming the serving replica.
    fn error(&self, message: String) -> PsError {
        let addr = self.conn().1.addr;
        PsError::Shard {
            shard: self.id,
            addr,
            code: tonic::Code::Internal,
            message,
        }
    }

    /// Runs `call` against the serving replica. A transport failure or a
    /// refusal (UNAVAILABLE, a lost connection, a deadline) is retried
    /// with backoff; when the replica is dead, or alive but no longer
    /// primary, the client fails over to the backup first. A call left
    /// unanswered for [`HANG_PROBE_AFTER`] makes the client probe the
    /// replica; one that does not answer the probe is taken for hung, so a
    /// hung primary is failed over within seconds (well inside the backup's
    /// lease) whatever `request_timeout` is. Only idempotent calls go
    /// through here: pulls, table creation, assignments, and pushes
    /// carrying (writer, seq).
    async fn call<T, F, Fut>(&self, stats: &Inner, call: F) -> Result<T, PsError>
    where
        F: Fn(ShardConn) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let mut attempt = 0;
        let mut backoff = Duration::from_millis(20);
        let mut failed_at = None;
        self.learn_backup().await;
        loop {
            let (generation, conn) = self.conn();
            let mut hung = false;
            let answer = {
                let sent = call(conn.clone());
                tokio::pin!(sent);
                tokio::select! {
                    answer = &mut sent => answer,
                    () = self.stopped_answering(&conn) => {
                        hung = true;
                        Err(Status::unavailable(format!(
                            "{} stopped answering: a call went unanswered for {HANG_PROBE_AFTER:?} and so did a probe",
                            conn.addr
                        )))
                    }
                }
            };
            let status = match answer {
                Ok(answer) => return Ok(answer),
                Err(status) => status,
            };
            attempt += 1;
            if !retryable(status.code()) || attempt >= MAX_ATTEMPTS {
                let refused = self
                    .failover_refused
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .take();
                let standby = self
                    .standby
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .clone();
                let status = match (refused, standby) {
                    _ if !retryable(status.code()) => status,
                    (Some(why), _) => tonic::Status::new(
                        status.code(),
                        format!("{}; failing over was refused: {why}", status.message()),
                    ),
                    (None, None) => tonic::Status::new(
                        status.code(),
                        format!(
                            "{}; the shard has no backup to fail over to",
                            status.message()
                        ),
                    ),
                    (None, Some(_)) => status,
                };
                return Err(conn.error(self.id, status));
            }
            stats.retries.fetch_add(1, Ordering::Relaxed);
            let failed = *failed_at.get_or_insert_with(std::time::Instant::now);
            tracing::debug!(shard = self.id, addr = %conn.addr, attempt, "retrying after: {status}");
            if hung || !self.serving(&conn).await {
                self.fail_over(generation, stats, failed).await;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }

    /// Asks the serving replica for its backup every [`BACKUP_REFRESH`]:
    /// a replacement that joined after a failover, or none when the primary
    /// dropped its backup (which can no longer be promoted).
    async fn learn_backup(&self) {
        {
            let mut asked = self
                .asked_for_backup
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if asked.elapsed() < BACKUP_REFRESH {
                return;
            }
            *asked = std::time::Instant::now();
        }
        let conn = self.conn().1;
        let probe = async { call!(&conn, describe, pb::DescribeRequest {}) };
        if let Ok(Ok(described)) = tokio::time::timeout(Duration::from_secs(1), probe).await
            && described.role == "primary"
        {
            let backup = Some(described.backup).filter(|b| !b.is_empty() && *b != conn.addr);
            let mut standby = self
                .standby
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if *standby != backup {
                tracing::info!(shard = self.id, backup = ?backup, "the shard's backup changed");
                *standby = backup;
            }
        }
    }

    /// Resolves once `conn` stops answering: after [`HANG_PROBE_AFTER`],
    /// and then every [`HANG_PROBE_AFTER`], it is probed; the first probe
    /// without an answer as a serving primary ends the wait.
    async fn stopped_answering(&self, conn: &ShardConn) {
        loop {
            tokio::time::sleep(HANG_PROBE_AFTER).await;
            if !self.serving(conn).await {
                return;
            }
        }
    }

    /// Whether `conn` answers as a serving primary within a second.
    async fn serving(&self, conn: &ShardConn) -> bool {
        let probe = async { call!(conn, describe, pb::DescribeRequest {}) };
        matches!(
            tokio::time::timeout(Duration::from_secs(1), probe).await,
            Ok(Ok(described)) if described.role.is_empty() || described.role == "primary"
        )
    }

    /// Promotes the backup and sends later calls to it, unless another
    /// call already moved past `generation` or there is no backup left.
    async fn fail_over(&self, generation: u64, stats: &Inner, failed: std::time::Instant) {
        let _one_at_a_time = self.failing_over.lock().await;
        if self.conn().0 != generation {
            return;
        }
        let Some(addr) = self
            .standby
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
        else {
            return;
        };
        let mut config = self.config.clone();
        config.connect_timeout = config.connect_timeout.min(Duration::from_secs(5));
        let promoted = async {
            let (conn, _) = connect_one(self.id, addr.clone(), &config).await?;
            call!(&conn, promote, pb::PromoteRequest {}).map_err(|s| conn.error(self.id, s))?;
            Ok::<_, PsError>(conn)
        };
        match promoted.await {
            Ok(conn) => {
                let old = std::mem::replace(
                    &mut *self
                        .current
                        .write()
                        .unwrap_or_else(|poisoned| poisoned.into_inner()),
                    (generation + 1, conn),
                );
                *self
                    .standby
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner()) = None;
                let ms = failed.elapsed().as_millis() as u64;
                stats.failovers.fetch_add(1, Ordering::Relaxed);
                stats.max_failover_ms.fetch_max(ms, Ordering::Relaxed);
                tracing::warn!(shard = self.id, from = %old.1.addr, to = %addr, ms, "failed over to the backup");
            }
            Err(e) => {
                tracing::warn!(shard = self.id, backup = %addr, "cannot fail over yet: {e}");
                *self
                    .failover_refused
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(e.to_string());
            }
        }
    }
}

/// Whether a failed call may succeed when sent again (possibly elsewhere).
fn retryable(code: tonic::Code) -> bool {
    use tonic::Code;
    matches!(
        code,
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded
    )
}

/// One table's part of [`PsClient::push_many`].
#[derive(Debug, Clone, Copy)]
pub struct PushTable<'a> {
    /// The table.
    pub table: &'a str,
    /// Distinct keys.
    pub keys: &'a [u64],
    /// `keys.len() * dim` gradients, key order.
    pub grads: &'a [f32],
    /// Learning-rate factor for this push (`None`: 1).
    pub lr_scale: Option<f32>,
}

/// Requests to one shard waiting to be sent together.
struct Group<R, P> {
    parts: Vec<(R, P)>,
    bytes: usize,
    keys: usize,
    /// Bytes of values the parts' answers carry (pulls).
    answer: usize,
}

/// Where a pulled part's rows go: table index among the call's tables,
/// its dim, and positions in that table's key list.
#[derive(Debug)]
struct Placed {
    table: usize,
    dim: usize,
    positions: Vec<usize>,
}

#[derive(Debug, Clone, Copy)]
struct TableInfo {
    dim: usize,
    placement: Placement,
}

#[derive(Debug)]
struct Inner {
    shards: Vec<Arc<Replicas>>,
    /// This client's id on its push calls.
    writer: u64,
    acked: AtomicU64,
    duplicates: AtomicU64,
    retries: AtomicU64,
    failovers: AtomicU64,
    max_failover_ms: AtomicU64,
    router: ShardRouter,
    tables: RwLock<HashMap<String, TableInfo>>,
    push_slots: Arc<Semaphore>,
    max_pushes_in_flight: u32,
    wire: WireFormat,
    coalesce_bytes: usize,
    push_error: Mutex<Option<PsError>>,
    pull_bytes: AtomicU64,
    push_bytes: AtomicU64,
    pull_latency: Latencies,
    push_latency: Latencies,
}

/// A connection to all shards of a job. Cheap to clone; clones share state.
#[derive(Debug, Clone)]
pub struct PsClient {
    inner: Arc<Inner>,
}

impl PsClient {
    /// Connects to every shard, in shard order, retrying each for up to
    /// `config.connect_timeout`, and checks that each server is the shard its
    /// position says.
    pub async fn connect(addrs: &[String], config: &ClientConfig) -> Result<PsClient, PsError> {
        if addrs.is_empty() {
            return Err(PsError::invalid("at least one server address is required"));
        }
        if !config.backups.is_empty() && config.backups.len() != addrs.len() {
            return Err(PsError::invalid(format!(
                "{} backups were listed for {} shards: list one per shard, in shard order",
                config.backups.len(),
                addrs.len()
            )));
        }
        let mut tasks = JoinSet::new();
        for (i, addr) in addrs.iter().enumerate() {
            let (addr, config) = (addr.clone(), config.clone());
            let backup = config.backups.get(i).cloned().filter(|b| !b.is_empty());
            tasks.spawn(async move { (i, connect_shard(i, addr, backup, &config).await) });
        }
        let mut shards: Vec<Option<Replicas>> = (0..addrs.len()).map(|_| None).collect();
        while let Some(joined) = tasks.join_next().await {
            let (i, conn) =
                joined.map_err(|e| PsError::Internal(format!("connect task failed: {e}")))?;
            let (conn, described, standby) = conn?;
            if described.shard_id as usize != i || described.num_shards as usize != addrs.len() {
                return Err(PsError::invalid(format!(
                    "server {} is shard {} of {}, but was listed at position {i} of {} servers: \
                     list every shard once, in shard-id order",
                    conn.addr,
                    described.shard_id,
                    described.num_shards,
                    addrs.len()
                )));
            }
            shards[i] = Some(Replicas::new(i, conn, standby, config.clone()));
        }
        Ok(Self::over(shards.into_iter().flatten().collect(), config))
    }

    /// A client calling the services of `shards` (in shard order) directly,
    /// in this process. Limits are taken from each service, as over gRPC.
    pub async fn in_process(
        shards: Vec<ShardService>,
        config: &ClientConfig,
    ) -> Result<PsClient, PsError> {
        let mut conns = Vec::with_capacity(shards.len());
        for (i, service) in shards.into_iter().enumerate() {
            let described = service
                .describe(Request::new(pb::DescribeRequest {}))
                .await
                .map_err(|s| PsError::Internal(format!("in-process shard {i}: {s}")))?
                .into_inner();
            // In process there is no interceptor: no token to send.
            let conn = ShardConn::new(
                format!("in-process:{i}"),
                Link::InProcess(service),
                None,
                &described,
            );
            conns.push(Replicas::new(i, conn, None, config.clone()));
        }
        if conns.is_empty() {
            return Err(PsError::invalid("at least one shard is required"));
        }
        Ok(Self::over(conns, config))
    }

    fn over(shards: Vec<Replicas>, config: &ClientConfig) -> PsClient {
        let in_flight = config.max_pushes_in_flight.clamp(1, Semaphore::MAX_PERMITS) as u32;
        PsClient {
            inner: Arc::new(Inner {
                router: ShardRouter::new(shards.len() as u32),
                shards: shards.into_iter().map(Arc::new).collect(),
                writer: ps_common::ids::random_id(),
                acked: AtomicU64::new(0),
                duplicates: AtomicU64::new(0),
                retries: AtomicU64::new(0),
                failovers: AtomicU64::new(0),
                max_failover_ms: AtomicU64::new(0),
                tables: RwLock::new(HashMap::new()),
                push_slots: Arc::new(Semaphore::new(in_flight as usize)),
                max_pushes_in_flight: in_flight,
                wire: config.wire,
                coalesce_bytes: config.coalesce_bytes,
                push_error: Mutex::new(None),
                pull_bytes: AtomicU64::new(0),
                push_bytes: AtomicU64::new(0),
                pull_latency: Latencies::default(),
                push_latency: Latencies::default(),
            }),
        }
    }

    /// Number of shards.
    pub fn num_shards(&self) -> usize {
        self.inner.shards.len()
    }

    /// Creates `spec` on every shard (idempotent) and remembers its layout.
    pub async fn create_table(&self, spec: &TableSpec) -> Result<(), PsError> {
        spec.validate()?;
        let request = pb::CreateTableRequest {
            spec: Some(spec.into()),
        };
        self.on_every_shard(move |shard| {
            let request = request.clone();
            async move { call!(&shard, create_table, request) }
        })
        .await?;
        self.inner
            .tables
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(
                spec.name.clone(),
                TableInfo {
                    dim: spec.dim as usize,
                    placement: spec.placement(),
                },
            );
        Ok(())
    }

    fn table(&self, name: &str) -> Result<TableInfo, PsError> {
        self.inner
            .tables
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(name)
            .copied()
            .ok_or_else(|| {
                PsError::invalid(format!(
                    "table '{name}' was not created through this client (call create_table first)"
                ))
            })
    }

    /// Rows of `keys` in the caller's order (`keys.len() * dim` floats);
    /// duplicate keys are fetched once.
    pub async fn pull(&self, table: &str, keys: &[u64]) -> Result<Vec<f32>, PsError> {
        let info = self.table(table)?;
        let unique = UniqueKeys::new(keys);
        let rows = self.pull_rows(table, info, &unique.keys).await?;
        Ok(unique.gather(&rows, info.dim))
    }

    /// Rows of `keys` in order, one request per shard (and chunk); `keys`
    /// should already be distinct.
    pub async fn pull_unique(&self, table: &str, keys: &[u64]) -> Result<Vec<f32>, PsError> {
        self.pull_rows(table, self.table(table)?, keys).await
    }

    async fn pull_rows(
        &self,
        table: &str,
        info: TableInfo,
        keys: &[u64],
    ) -> Result<Vec<f32>, PsError> {
        let mut rows = self.pull_tables(&[(table, info, keys)]).await?;
        Ok(rows.pop().unwrap_or_default())
    }

    /// Rows of several tables at once (`(table, distinct keys)` each), in
    /// each table's key order. The small requests of all tables to one
    /// shard travel together in `PullMany` calls of at most
    /// `coalesce_bytes`; larger ones go alone.
    pub async fn pull_many(&self, tables: &[(&str, &[u64])]) -> Result<Vec<Vec<f32>>, PsError> {
        let tables = tables
            .iter()
            .map(|&(name, keys)| Ok((name, self.table(name)?, keys)))
            .collect::<Result<Vec<_>, PsError>>()?;
        self.pull_tables(&tables).await
    }

    async fn pull_tables(
        &self,
        tables: &[(&str, TableInfo, &[u64])],
    ) -> Result<Vec<Vec<f32>>, PsError> {
        let wire = self.inner.wire;
        let mut parts = Vec::new();
        for (t, &(name, info, keys)) in tables.iter().enumerate() {
            for (shard_id, positions, shard_keys) in self.split(info, keys, wire.delta_keys) {
                let chunk = self.inner.shards[shard_id].chunk_keys(info.dim);
                for (pos, chunk_keys) in positions.chunks(chunk).zip(shard_keys.chunks(chunk)) {
                    let (keys, delta_keys) = encode_keys(chunk_keys, wire.delta_keys)?;
                    let request = pb::PullRequest {
                        table: name.to_string(),
                        keys,
                        encoding: wire.pull_values as i32,
                        delta_keys,
                    };
                    let placed = Placed {
                        table: t,
                        dim: info.dim,
                        positions: pos.to_vec(),
                    };
                    let answer = pos.len() * info.dim * wire::value_bytes(wire.pull_values);
                    parts.push((shard_id, request, placed, pos.len(), answer));
                }
            }
        }
        let mut tasks = JoinSet::new();
        for (shard_id, group) in self.coalesce(parts) {
            let (shard, inner) = (
                Arc::clone(&self.inner.shards[shard_id]),
                Arc::clone(&self.inner),
            );
            tasks.spawn(async move {
                let (requests, placed): (Vec<_>, Vec<_>) = group.into_iter().unzip();
                let started = std::time::Instant::now();
                let (sent, received, responses) = if requests.len() == 1 {
                    let request = requests.into_iter().next().unwrap_or_default();
                    let sent = request.encoded_len();
                    let response = shard
                        .call(&inner, |conn| {
                            let request = request.clone();
                            async move { call!(&conn, pull, request) }
                        })
                        .await?;
                    (sent, response.encoded_len(), vec![response])
                } else {
                    let request = pb::PullManyRequest { pulls: requests };
                    let sent = request.encoded_len();
                    let response = shard
                        .call(&inner, |conn| {
                            let request = request.clone();
                            async move { call!(&conn, pull_many, request) }
                        })
                        .await?;
                    (sent, response.encoded_len(), response.pulls)
                };
                inner.pull_latency.record(started.elapsed());
                inner
                    .pull_bytes
                    .fetch_add((sent + received) as u64, Ordering::Relaxed);
                if responses.len() != placed.len() {
                    return Err(shard.error(format!(
                        "answered {} of {} pulls",
                        responses.len(),
                        placed.len()
                    )));
                }
                let width = wire::value_bytes(wire.pull_values);
                let mut out = Vec::with_capacity(placed.len());
                for (response, placed) in responses.into_iter().zip(placed) {
                    let dim = placed.dim;
                    if response.dim as usize != dim
                        || response.encoding != wire.pull_values as i32
                        || response.values.len() != placed.positions.len() * dim * width
                    {
                        return Err(shard.error(format!(
                            "answered {} bytes of dim {} (encoding {}) for {} keys of dim {dim} in {}",
                            response.values.len(),
                            response.dim,
                            response.encoding,
                            placed.positions.len(),
                            wire.pull_values.as_str_name()
                        )));
                    }
                    out.push((placed, wire::decode_values(&response.values, wire.pull_values)?));
                }
                Ok(out)
            });
        }
        let mut out: Vec<Vec<f32>> = tables
            .iter()
            .map(|(_, info, keys)| vec![0f32; keys.len() * info.dim])
            .collect();
        for (placed, values) in join_all_ok(tasks).await?.into_iter().flatten() {
            let (dim, rows) = (placed.dim, &mut out[placed.table]);
            for (&pos, row) in placed.positions.iter().zip(values.chunks_exact(dim)) {
                rows[pos * dim..(pos + 1) * dim].copy_from_slice(row);
            }
        }
        Ok(out)
    }

    /// Groups per-shard parts into calls: parts of at least `coalesce_bytes`
    /// go alone, smaller ones to the same shard together up to that size,
    /// the shard's key limit and its answer limit. Each part is
    /// `(shard, request, placement, keys, bytes of values in its answer)`;
    /// returns `(shard, parts of one call)`.
    fn coalesce<R: Message, P>(
        &self,
        parts: Vec<(usize, R, P, usize, usize)>,
    ) -> Vec<(usize, Vec<(R, P)>)> {
        let limit = self.inner.coalesce_bytes;
        let mut open: HashMap<usize, Group<R, P>> = HashMap::new();
        let mut calls = Vec::new();
        for (shard_id, request, placed, keys, answer) in parts {
            let bytes = request.encoded_len();
            if bytes >= limit {
                calls.push((shard_id, vec![(request, placed)]));
                continue;
            }
            let (max_keys, max_bytes) = self.inner.shards[shard_id].limits();
            let group = open.entry(shard_id).or_insert_with(|| Group {
                parts: Vec::new(),
                bytes: 0,
                keys: 0,
                answer: 0,
            });
            if !group.parts.is_empty()
                && (group.bytes + bytes > limit
                    || group.keys + keys > max_keys
                    || group.answer + answer > max_bytes)
            {
                calls.push((shard_id, std::mem::take(&mut group.parts)));
                (group.bytes, group.keys, group.answer) = (0, 0, 0);
            }
            group.parts.push((request, placed));
            group.bytes += bytes;
            group.keys += keys;
            group.answer += answer;
        }
        calls.extend(
            open.into_iter()
                .filter(|(_, g)| !g.parts.is_empty())
                .map(|(shard, g)| (shard, g.parts)),
        );
        calls
    }

    /// Sets the weights of `keys` (`values`: `keys.len() * dim`, key order)
    /// on their shards, optimizer state reset; waits for every shard.
    pub async fn assign(&self, table: &str, keys: &[u64], values: &[f32]) -> Result<(), PsError> {
        let info = self.table(table)?;
        check_gradient_len(table, info.dim, keys, values)?;
        let mut tasks = JoinSet::new();
        for (shard_id, keys, rows) in self.chunks_with_rows(info, keys, values, false) {
            let request = pb::AssignRequest {
                table: table.to_string(),
                keys,
                values: wire::encode_f32s(&rows),
            };
            let (shard, inner) = (
                Arc::clone(&self.inner.shards[shard_id]),
                Arc::clone(&self.inner),
            );
            tasks.spawn(async move {
                shard
                    .call(&inner, |conn| {
                        let request = request.clone();
                        async move { call!(&conn, assign, request) }
                    })
                    .await
                    .map(drop)
            });
        }
        join_all_ok(tasks).await.map(drop)
    }

    /// Sums the gradients of duplicate keys and pushes them asynchronously.
    /// `grads` holds `keys.len() * dim` values in key order.
    pub async fn push(&self, table: &str, keys: &[u64], grads: &[f32]) -> Result<(), PsError> {
        let info = self.table(table)?;
        check_gradient_len(table, info.dim, keys, grads)?;
        let unique = UniqueKeys::new(keys);
        self.push_rows(
            table,
            info,
            &unique.keys,
            &unique.sum(grads, info.dim),
            None,
        )
        .await
    }

    /// Pushes gradients of distinct `keys` asynchronously: returns once every
    /// per-shard request has a slot among the `max_pushes_in_flight`. Returns
    /// the error of an earlier failed push, if any.
    pub async fn push_unique(
        &self,
        table: &str,
        keys: &[u64],
        grads: &[f32],
    ) -> Result<(), PsError> {
        self.push_unique_scaled(table, keys, grads, None).await
    }

    /// [`PsClient::push_unique`] with the servers' learning rate for this
    /// push multiplied by `lr_scale` (a learning-rate schedule); `None` is 1.
    pub async fn push_unique_scaled(
        &self,
        table: &str,
        keys: &[u64],
        grads: &[f32],
        lr_scale: Option<f32>,
    ) -> Result<(), PsError> {
        let info = self.table(table)?;
        check_gradient_len(table, info.dim, keys, grads)?;
        self.push_rows(table, info, keys, grads, lr_scale).await
    }

    async fn push_rows(
        &self,
        table: &str,
        info: TableInfo,
        keys: &[u64],
        grads: &[f32],
        lr_scale: Option<f32>,
    ) -> Result<(), PsError> {
        let push = PushTable {
            table,
            keys,
            grads,
            lr_scale,
        };
        self.push_tables(&[(push, info)]).await
    }

    /// Pushes the gradients of several tables (`(table, distinct keys,
    /// keys.len() * dim gradients, lr_scale)` each) asynchronously, the
    /// small requests to one shard coalesced into `PushMany` calls (applied
    /// all or nothing). Returns once every call has a push slot.
    pub async fn push_many(&self, tables: &[PushTable<'_>]) -> Result<(), PsError> {
        let tables = tables
            .iter()
            .map(|&t| {
                let info = self.table(t.table)?;
                check_gradient_len(t.table, info.dim, t.keys, t.grads)?;
                Ok((t, info))
            })
            .collect::<Result<Vec<_>, PsError>>()?;
        self.push_tables(&tables).await
    }

    async fn push_tables(&self, tables: &[(PushTable<'_>, TableInfo)]) -> Result<(), PsError> {
        self.take_push_error()?;
        for &(
            PushTable {
                table, keys, grads, ..
            },
            info,
        ) in tables
        {
            if let Some(i) = grads.iter().position(|g| !g.is_finite()) {
                return Err(PsError::invalid(format!(
                    "gradient for key {} of '{table}' is not finite ({})",
                    keys[i / info.dim],
                    grads[i]
                )));
            }
        }
        let wire = self.inner.wire;
        let mut parts = Vec::new();
        for &(
            PushTable {
                table,
                keys,
                grads,
                lr_scale,
            },
            info,
        ) in tables
        {
            for (shard_id, chunk_keys, values) in
                self.chunks_with_rows(info, keys, grads, wire.delta_keys)
            {
                let (keys, delta_keys) = encode_keys(&chunk_keys, wire.delta_keys)?;
                let request = pb::PushRequest {
                    table: table.to_string(),
                    keys,
                    gradients: wire::encode_values(&values, wire.push_values),
                    lr_scale,
                    encoding: wire.push_values as i32,
                    delta_keys,
                    ..Default::default()
                };
                parts.push((shard_id, request, (), chunk_keys.len(), 0));
            }
        }
        for (shard_id, group) in self.coalesce(parts) {
            let shard = Arc::clone(&self.inner.shards[shard_id]);
            let permit = Arc::clone(&self.inner.push_slots)
                .acquire_owned()
                .await
                .map_err(|_| PsError::Internal("push window closed".into()))?;
            let inner = Arc::clone(&self.inner);
            let mut requests: Vec<pb::PushRequest> = group.into_iter().map(|(r, ())| r).collect();
            // One number per call: a retry of the call is recognized as one.
            let (writer, seq) = (inner.writer, shard.next_seq.fetch_add(1, Ordering::Relaxed));
            tokio::spawn(async move {
                let started = std::time::Instant::now();
                let answer = if requests.len() == 1 {
                    let mut request = requests.pop().unwrap_or_default();
                    (request.writer, request.seq) = (writer, seq);
                    let sent = request.encoded_len();
                    shard
                        .call(&inner, |conn| {
                            let request = request.clone();
                            async move { call!(&conn, push, request) }
                        })
                        .await
                        .map(|r| (sent, r.encoded_len(), r.duplicate))
                } else {
                    let request = pb::PushManyRequest {
                        pushes: requests,
                        writer,
                        seq,
                    };
                    let sent = request.encoded_len();
                    shard
                        .call(&inner, |conn| {
                            let request = request.clone();
                            async move { call!(&conn, push_many, request) }
                        })
                        .await
                        .map(|r| {
                            let duplicate = r.pushes.iter().any(|p| p.duplicate);
                            (sent, r.encoded_len(), duplicate)
                        })
                };
                match answer {
                    Ok((sent, received, duplicate)) => {
                        inner.push_latency.record(started.elapsed());
                        inner
                            .push_bytes
                            .fetch_add((sent + received) as u64, Ordering::Relaxed);
                        inner.acked.fetch_add(1, Ordering::Relaxed);
                        if duplicate {
                            inner.duplicates.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Err(err) => {
                        tracing::warn!("push failed: {err}");
                        let mut slot = inner
                            .push_error
                            .lock()
                            .unwrap_or_else(|poisoned| poisoned.into_inner());
                        slot.get_or_insert(err);
                    }
                }
                drop(permit);
            });
        }
        Ok(())
    }

    /// Waits until every push issued so far has been answered; returns the
    /// first push error since the last check.
    pub async fn flush(&self) -> Result<(), PsError> {
        let all = self
            .inner
            .push_slots
            .acquire_many(self.inner.max_pushes_in_flight)
            .await
            .map_err(|_| PsError::Internal("push window closed".into()))?;
        drop(all);
        self.take_push_error()
    }

    fn take_push_error(&self) -> Result<(), PsError> {
        match self
            .inner
            .push_error
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take()
        {
            Some(err) => Err(err),
            None => Ok(()),
        }
    }

    /// Reports this worker's clock to shard 0, which keeps the job's
    /// clocks, and waits until every live worker's clock is at least
    /// `request.wait_for`; a server-side wait that times out is renewed
    /// (which also renews this worker's lease) until the bound is reached.
    pub async fn clock(&self, request: pb::ClockRequest) -> Result<pb::ClockResponse, PsError> {
        let shard = &self.inner.shards[0];
        loop {
            let answer = shard
                .call(&self.inner, |conn| {
                    let request = request.clone();
                    async move { call!(&conn, clock, request) }
                })
                .await?;
            if answer.reached {
                return Ok(answer);
            }
        }
    }

    /// Asks every shard to write checkpoint `name` (each under its own
    /// `--checkpoint-dir`); returns each shard's answer, in shard order.
    /// Call [`PsClient::flush`] first so this worker's pushes are included.
    pub async fn checkpoint(&self, name: &str) -> Result<Vec<pb::CheckpointResponse>, PsError> {
        let request = pb::CheckpointRequest {
            name: name.to_string(),
        };
        self.on_every_shard(move |shard| {
            let request = request.clone();
            async move { call!(&shard, checkpoint, request) }
        })
        .await
    }

    /// Stats of every shard, in shard order.
    pub async fn stats(&self) -> Result<Vec<pb::StatsResponse>, PsError> {
        self.on_every_shard(|shard| async move { call!(&shard, stats, pb::StatsRequest {}) })
            .await
    }

    /// Sends one RPC to every shard in parallel; answers in shard order.
    async fn on_every_shard<T, F, Fut>(&self, call: F) -> Result<Vec<T>, PsError>
    where
        T: Send + 'static,
        F: Fn(ShardConn) -> Fut + Clone + Send + 'static,
        Fut: Future<Output = Result<T, Status>> + Send + 'static,
    {
        let mut tasks = JoinSet::new();
        for (i, shard) in self.inner.shards.iter().enumerate() {
            let (shard, inner, call) = (Arc::clone(shard), Arc::clone(&self.inner), call.clone());
            tasks.spawn(async move { shard.call(&inner, call).await.map(|r| (i, r)) });
        }
        let mut all = join_all_ok(tasks).await?;
        all.sort_by_key(|(i, _)| *i);
        Ok(all.into_iter().map(|(_, r)| r).collect())
    }

    /// Latency of this client's pull requests (one per shard and chunk),
    /// from sending to the decoded answer.
    pub fn pull_latency(&self) -> &Latencies {
        &self.inner.pull_latency
    }

    /// Latency of this client's push requests, from sending to the ack.
    pub fn push_latency(&self) -> &Latencies {
        &self.inner.push_latency
    }

    /// Push calls acknowledged, retries and failovers so far.
    pub fn push_acks(&self) -> PushAcks {
        let i = &self.inner;
        PushAcks {
            acked: i.acked.load(Ordering::Relaxed),
            duplicates: i.duplicates.load(Ordering::Relaxed),
            retries: i.retries.load(Ordering::Relaxed),
            failovers: i.failovers.load(Ordering::Relaxed),
            max_failover_ms: i.max_failover_ms.load(Ordering::Relaxed),
        }
    }

    /// Payload bytes sent and received so far.
    pub fn bytes(&self) -> ByteCounts {
        ByteCounts {
            pull_bytes: self.inner.pull_bytes.load(Ordering::Relaxed),
            push_bytes: self.inner.push_bytes.load(Ordering::Relaxed),
        }
    }

    /// `keys` with their `values` rows (`dim` each), split by owning shard
    /// (sorted by key if `sorted`) and cut into chunks under each shard's
    /// limits: (shard id, keys, rows).
    fn chunks_with_rows(
        &self,
        info: TableInfo,
        keys: &[u64],
        values: &[f32],
        sorted: bool,
    ) -> Vec<(usize, Vec<u64>, Vec<f32>)> {
        let dim = info.dim;
        let mut out = Vec::new();
        for (shard_id, positions, shard_keys) in self.split(info, keys, sorted) {
            let shard = &self.inner.shards[shard_id];
            let chunk = shard.chunk_keys(dim);
            for (chunk_pos, chunk_keys) in positions.chunks(chunk).zip(shard_keys.chunks(chunk)) {
                let mut rows = Vec::with_capacity(chunk_pos.len() * dim);
                for &p in chunk_pos {
                    rows.extend_from_slice(&values[p * dim..(p + 1) * dim]);
                }
                out.push((shard_id, chunk_keys.to_vec(), rows));
            }
        }
        out
    }

    /// Groups `keys` by owning shard: (shard, positions in `keys`, keys),
    /// each group in ascending key order if `sorted`.
    fn split(
        &self,
        info: TableInfo,
        keys: &[u64],
        sorted: bool,
    ) -> Vec<(usize, Vec<usize>, Vec<u64>)> {
        let n = self.inner.shards.len();
        let mut groups: Vec<(Vec<usize>, Vec<u64>)> = vec![(Vec::new(), Vec::new()); n];
        for (pos, &key) in keys.iter().enumerate() {
            let shard = self.inner.router.shard_of(info.placement, key) as usize;
            groups[shard].0.push(pos);
            groups[shard].1.push(key);
        }
        groups
            .into_iter()
            .enumerate()
            .filter(|(_, (p, _))| !p.is_empty())
            .map(|(i, (mut p, mut k))| {
                if sorted && !k.is_sorted() {
                    let mut pairs: Vec<(u64, usize)> = k.iter().copied().zip(p).collect();
                    pairs.sort_unstable();
                    (k, p) = pairs.into_iter().unzip();
                }
                (i, p, k)
            })
            .collect()
    }
}

/// Connects to shard `i`: its primary at `addr`, or, if that cannot be
/// reached, its listed `backup` when the backup already serves as primary
/// (an earlier failover). Returns the connection, what the server said of
/// itself, and the backup to fail over to later.
async fn connect_shard(
    i: usize,
    addr: String,
    backup: Option<String>,
    config: &ClientConfig,
) -> Result<(ShardConn, pb::DescribeResponse, Option<String>), PsError> {
    let unreachable = match connect_one(i, addr, config).await {
        Ok((conn, described)) => {
            let standby = backup.or_else(|| Some(described.backup.clone()));
            return Ok((conn, described, standby));
        }
        Err(e) => e,
    };
    let Some(backup) = backup else {
        return Err(unreachable);
    };
    let mut quick = config.clone();
    quick.connect_timeout = quick.connect_timeout.min(Duration::from_secs(5));
    match connect_one(i, backup, &quick).await {
        Ok((conn, described)) if described.role == "primary" => {
            tracing::warn!(shard = i, primary = %conn.addr, "the listed primary is unreachable; its backup serves as primary");
            let standby = Some(described.backup.clone());
            Ok((conn, described, standby))
        }
        _ => Err(unreachable),
    }
}

/// Connects to shard `i` at `addr`, retrying with backoff until the deadline,
/// and asks it who it is.
async fn connect_one(
    i: usize,
    addr: String,
    config: &ClientConfig,
) -> Result<(ShardConn, pb::DescribeResponse), PsError> {
    let fail = |code, message: String| PsError::Shard {
        shard: i,
        addr: addr.clone(),
        code,
        message,
    };
    let invalid = |e: &dyn std::fmt::Display| {
        fail(
            tonic::Code::InvalidArgument,
            format!("invalid server address: {e}"),
        )
    };
    let endpoint = ps_common::tls::endpoint(&addr, config.tls.clone())
        .map_err(|e| invalid(&e))?
        .connect_timeout(config.connect_timeout.min(Duration::from_secs(5)))
        .timeout(config.request_timeout)
        .tcp_nodelay(true);
    let deadline = tokio::time::Instant::now() + config.connect_timeout;
    let mut backoff = Duration::from_millis(50);
    let mut attempts = 0u32;
    let channel = loop {
        attempts += 1;
        match endpoint.connect().await {
            Ok(channel) => break channel,
            Err(e) => {
                if tokio::time::Instant::now() + backoff > deadline {
                    return Err(fail(
                        tonic::Code::Unavailable,
                        format!(
                            "unreachable after {attempts} attempts over {:?}: {e}",
                            config.connect_timeout
                        ),
                    ));
                }
                tracing::debug!(%addr, attempts, "server not reachable yet: {e}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    };
    let mut client = ParameterServerClient::new(channel)
        .max_decoding_message_size(1 << 30)
        .max_encoding_message_size(usize::MAX);
    let auth = config
        .auth_token
        .as_ref()
        .map(|t| format!("Bearer {t}").parse::<AsciiMetadataValue>())
        .transpose()
        .map_err(|_| {
            fail(
                tonic::Code::InvalidArgument,
                "the auth token must be visible ASCII characters".into(),
            )
        })?;
    let described = client
        .describe(authorized(auth.as_ref(), pb::DescribeRequest {}))
        .await
        .map_err(|s| fail(s.code(), s.message().to_string()))?
        .into_inner();
    let conn = ShardConn::new(addr.clone(), Link::Grpc(client), auth, &described);
    Ok((conn, described))
}

/// `message` as a request carrying the bearer token `auth`, if any.
fn authorized<T>(auth: Option<&AsciiMetadataValue>, message: T) -> Request<T> {
    let mut request = Request::new(message);
    if let Some(token) = auth {
        request
            .metadata_mut()
            .insert(ps_common::auth::HEADER, token.clone());
    }
    request
}

/// A request's key fields: plain `keys`, or sorted keys as `delta_keys`.
fn encode_keys(keys: &[u64], delta: bool) -> Result<(Vec<u64>, bytes::Bytes), PsError> {
    if delta {
        Ok((Vec::new(), wire::encode_delta_keys(keys)?))
    } else {
        Ok((keys.to_vec(), bytes::Bytes::new()))
    }
}

fn check_gradient_len(table: &str, dim: usize, keys: &[u64], grads: &[f32]) -> Result<(), PsError> {
    if grads.len() == keys.len() * dim {
        return Ok(());
    }
    Err(PsError::invalid(format!(
        "push to '{table}' (dim {dim}): {} keys need {} gradient values, got {}",
        keys.len(),
        keys.len() * dim,
        grads.len()
    )))
}

/// Awaits every task; returns all results or the first error.
async fn join_all_ok<T: 'static>(
    mut tasks: JoinSet<Result<T, PsError>>,
) -> Result<Vec<T>, PsError> {
    let mut out = Vec::with_capacity(tasks.len());
    while let Some(joined) = tasks.join_next().await {
        out.push(joined.map_err(|e| PsError::Internal(format!("request task failed: {e}")))??);
    }
    Ok(out)
}
