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
//!
//! - [`link`]: how requests reach a shard (gRPC or in process, with the
//!   bearer token), and connecting to one.
//! - [`replicas`]: one shard's serving replica and backup: retries,
//!   failover, the numbering of push calls.
//! - [`discovery`]: the primaries a coordinator (etcd) names, at connect
//!   and after a failure.
//! - [`pull`] and [`push`]: the data path (planning per shard, coalescing,
//!   the window of pushes in flight).

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

#[macro_use]
mod link;
mod discovery;
mod pull;
mod push;
mod replicas;

use link::{Link, ShardConn, connect_one, connect_shard};
use replicas::Replicas;

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
    /// The job's coordinator (`--etcd`, `--job`): the primaries are found
    /// there, and a failed primary's replacement is awaited there (the
    /// client never promotes). `None`: the listed servers and backups.
    pub coordinator: Option<ps_common::coordinator::Job>,
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
            coordinator: None,
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
    /// With a coordinator and no addresses, the primaries etcd names are
    /// used ([`PsClient::discover`]).
    pub async fn connect(addrs: &[String], config: &ClientConfig) -> Result<PsClient, PsError> {
        let discovered;
        let addrs = match &config.coordinator {
            Some(job) if addrs.is_empty() => {
                discovered = Self::discover(job, config.connect_timeout).await?;
                &discovered
            }
            _ => addrs,
        };
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
        self.register_table(spec)
    }

    /// Remembers the layout of `spec`, a table the servers already hold,
    /// without asking them to create it (reading from read replicas, which
    /// take no writes). A pull answered with another dim fails.
    pub fn register_table(&self, spec: &TableSpec) -> Result<(), PsError> {
        spec.validate()?;
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

    /// Floats per row of `name`, a table created or registered through
    /// this client.
    pub fn table_dim(&self, name: &str) -> Result<usize, PsError> {
        self.table(name).map(|info| info.dim)
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
        self.checkpoint_as(name, false).await
    }

    /// [`PsClient::checkpoint`], `incremental`ly: each shard writes only
    /// what changed since its last checkpoint of this name (a delta beside
    /// its base), or a full base when it has none to follow.
    pub async fn checkpoint_as(
        &self,
        name: &str,
        incremental: bool,
    ) -> Result<Vec<pb::CheckpointResponse>, PsError> {
        let request = pb::CheckpointRequest {
            name: name.to_string(),
            incremental,
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
            for (chunk_pos, chunk_keys) in positions.chunks(chunk).zip(chunked(shard_keys, chunk)) {
                let mut rows = Vec::with_capacity(chunk_pos.len() * dim);
                for &p in chunk_pos {
                    rows.extend_from_slice(&values[p * dim..(p + 1) * dim]);
                }
                out.push((shard_id, chunk_keys, rows));
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
        // Owners first (routed eight keys at a time), then groups of exactly
        // their size.
        let mut owners = Vec::new();
        self.inner
            .router
            .shards_of(info.placement, keys, &mut owners);
        let mut sizes = vec![0usize; self.inner.shards.len()];
        for &shard in &owners {
            sizes[shard as usize] += 1;
        }
        let mut groups: Vec<(Vec<usize>, Vec<u64>)> = sizes
            .iter()
            .map(|&size| (Vec::with_capacity(size), Vec::with_capacity(size)))
            .collect();
        for (pos, (&key, &shard)) in keys.iter().zip(&owners).enumerate() {
            groups[shard as usize].0.push(pos);
            groups[shard as usize].1.push(key);
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

/// A request's key fields: plain `keys` (moved, not copied), or sorted
/// keys as `delta_keys`.
fn encode_keys(keys: Vec<u64>, delta: bool) -> Result<(Vec<u64>, bytes::Bytes), PsError> {
    if delta {
        Ok((Vec::new(), wire::encode_delta_keys(&keys)?))
    } else {
        Ok((keys, bytes::Bytes::new()))
    }
}

/// `items` cut into pieces of at most `size` (at least 1), as
/// `slice::chunks` does: `items` itself, moved, when it fits in one.
fn chunked<T: Clone>(items: Vec<T>, size: usize) -> Vec<Vec<T>> {
    if items.is_empty() {
        Vec::new()
    } else if items.len() <= size {
        vec![items]
    } else {
        items.chunks(size.max(1)).map(<[T]>::to_vec).collect()
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

#[cfg(test)]
mod tests {
    use super::chunked;

    #[test]
    fn keys_that_fit_one_request_are_moved_into_it_not_copied() {
        let keys: Vec<u64> = (0..1000).collect();
        let at = keys.as_ptr();
        let pieces = chunked(keys, 1000);
        assert_eq!(pieces.len(), 1);
        assert_eq!(pieces[0].as_ptr(), at, "the same allocation");
    }

    #[test]
    fn keys_past_the_limit_are_cut_in_order() {
        assert_eq!(
            chunked(vec![1, 2, 3, 4, 5], 2),
            [vec![1, 2], vec![3, 4], vec![5]]
        );
        assert!(chunked(Vec::<u64>::new(), 2).is_empty());
    }
}
