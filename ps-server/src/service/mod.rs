//! The gRPC adapter: converts `ps.v1` messages to store calls and back.
//!
//! It checks the request limits, decodes values, delegates to [`Shard`] on a
//! blocking thread (pulls and pushes are CPU work) and counts requests. No
//! table logic lives here.

use std::sync::Arc;

use prost::Message;
use ps_common::names::validate_table_name;
use ps_common::pb::parameter_server_server::ParameterServer;
use ps_common::pb::{self, TableStats as PbTableStats};
use ps_common::{PsError, TableKind, TableSpec, wire};
use tonic::{Request, Response, Status};

use crate::checkpoint::Checkpoints;
use crate::clock::{self, Clocks};
use crate::metrics::Rpc;
use crate::replication::{Peer, Replication, Role, Write};
use crate::store::{Push, PushOutcome, RequestCounters, Shard};

/// Limits a shard enforces on every request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest encoded request message, in bytes.
    pub max_request_bytes: usize,
    /// Largest number of keys in one pull or push.
    pub max_keys_per_request: usize,
    /// Largest response values one Pull or PullMany may return, in bytes
    /// (keys x dim x value width, summed over a PullMany's parts), checked
    /// before anything is read or allocated.
    pub max_response_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_request_bytes: 64 << 20,
            max_keys_per_request: 1 << 20,
            max_response_bytes: 64 << 20,
        }
    }
}

/// The `ParameterServer` service of one shard.
#[derive(Debug, Clone)]
pub struct ShardService {
    shard: Arc<Shard>,
    limits: Limits,
    /// Where Checkpoint writes; `None` refuses checkpoints.
    checkpoints: Option<Arc<Checkpoints>>,
    /// Workers' clocks (SSP/BSP), shared by every clone of this service.
    clocks: Arc<Clocks>,
    /// This server's role and its replication to a backup.
    replication: Arc<Replication>,
    /// The checkpoint the shard was restored from, for Describe.
    restored_from: Option<String>,
}

/// Longest one Clock call waits.
const MAX_CLOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

impl ShardService {
    /// A service over `shard` enforcing `limits`, writing checkpoints through `checkpoints`.
    /// The service is a primary with no backup; see [`ShardService::with_replication`].
    pub fn new(shard: Arc<Shard>, limits: Limits, checkpoints: Option<Arc<Checkpoints>>) -> Self {
        let replication = Replication::new(Arc::clone(&shard), Role::Primary, Peer::default());
        ShardService {
            shard,
            limits,
            checkpoints,
            clocks: Arc::new(Clocks::default()),
            replication,
            restored_from: None,
        }
    }

    /// The service reporting in Describe that its tables were restored
    /// from checkpoint `from`.
    pub fn with_restored_from(mut self, from: Option<String>) -> Self {
        self.restored_from = from;
        self
    }

    /// The service playing the role (and replicating as) `replication` says.
    pub fn with_replication(mut self, replication: Arc<Replication>) -> Self {
        self.replication = replication;
        self
    }

    /// Refuses worker calls on a backup or a deposed primary.
    fn check_serving(&self) -> Result<(), Status> {
        self.replication.check_serving().map_err(|e| self.fail(e))
    }

    fn check_keys(&self, table: &str, keys: usize) -> Result<(), PsError> {
        validate_table_name(table)?;
        self.check_key_count(keys, "request")
    }

    /// `keys` in one `what` (a request, or a call bundling several) must
    /// stay under the key limit.
    fn check_key_count(&self, keys: usize, what: &str) -> Result<(), PsError> {
        if keys > self.limits.max_keys_per_request {
            return Err(PsError::ResourceExhausted(format!(
                "{keys} keys in one {what} is over this shard's limit of {}",
                self.limits.max_keys_per_request
            )));
        }
        Ok(())
    }

    /// A request's keys for `table`: `keys`, or `delta_keys` decoded (under
    /// the key limit; setting both is an error), checked with the table name
    /// against this shard's limits.
    fn request_keys(
        &self,
        table: &str,
        keys: Vec<u64>,
        delta_keys: &[u8],
    ) -> Result<Vec<u64>, PsError> {
        let keys = match (keys.is_empty(), delta_keys.is_empty()) {
            (_, true) => keys,
            (true, false) => wire::decode_delta_keys(delta_keys, self.limits.max_keys_per_request)?,
            (false, false) => {
                return Err(PsError::invalid(
                    "a request sets keys or delta_keys, not both",
                ));
            }
        };
        self.check_keys(table, keys.len())?;
        Ok(keys)
    }

    /// Runs `f` (store work) on a blocking thread and counts errors.
    async fn blocking<T, F>(&self, f: F) -> Result<T, Status>
    where
        T: Send + 'static,
        F: FnOnce(&Shard) -> Result<T, PsError> + Send + 'static,
    {
        let shard = Arc::clone(&self.shard);
        let result = tokio::task::spawn_blocking(move || f(&shard))
            .await
            .map_err(|e| Status::internal(format!("shard task failed: {e}")))?;
        result.map_err(|e| self.fail(e))
    }

    /// Runs an RPC, recording its latency and outcome.
    async fn observed<T>(
        &self,
        rpc: Rpc,
        call: impl std::future::Future<Output = Result<T, Status>>,
    ) -> Result<T, Status> {
        let started = std::time::Instant::now();
        let result = call.await;
        self.shard
            .rpc_metrics
            .record(rpc, started.elapsed(), result.is_ok());
        result
    }

    fn fail(&self, err: PsError) -> Status {
        RequestCounters::add(&self.shard.counters.errors, 1);
        err.into()
    }
}

impl ShardService {
    async fn describe_inner(
        &self,
        _request: Request<pb::DescribeRequest>,
    ) -> Result<Response<pb::DescribeResponse>, Status> {
        let described = self.replication.description();
        Ok(Response::new(pb::DescribeResponse {
            shard_id: self.shard.shard_id(),
            num_shards: self.shard.num_shards(),
            max_keys_per_request: self.limits.max_keys_per_request as u64,
            max_request_bytes: self.limits.max_request_bytes as u64,
            max_response_bytes: self.limits.max_response_bytes as u64,
            role: described.role.to_string(),
            backup: described.backup.unwrap_or_default(),
            restored_from: self.restored_from.clone().unwrap_or_default(),
            server_id: self.replication.server_id(),
            caught_up: described.caught_up,
        }))
    }

    async fn create_table_inner(
        &self,
        request: Request<pb::CreateTableRequest>,
    ) -> Result<Response<pb::CreateTableResponse>, Status> {
        RequestCounters::add(&self.shard.counters.create_table, 1);
        let spec = request
            .into_inner()
            .spec
            .ok_or_else(|| PsError::invalid("CreateTable needs a spec"))
            .and_then(TableSpec::try_from)
            .map_err(|e| self.fail(e))?;
        let name = spec.name.clone();
        let replication = Arc::clone(&self.replication);
        let (created, seq) = self
            .blocking(move |shard| {
                replication.write(
                    |_| shard.create_table(spec.clone()).map(Write::Fresh),
                    || pb::ReplicaEntry {
                        write: Some(pb::replica_entry::Write::CreateTable((&spec).into())),
                    },
                )
            })
            .await?;
        self.acknowledged(seq).await?;
        if created {
            tracing::info!(table = %name, "created table");
        }
        Ok(Response::new(pb::CreateTableResponse { created }))
    }

    /// A pull's table, keys and answer encoding, checked.
    fn pull_part(&self, mut req: pb::PullRequest) -> Result<PullPart, PsError> {
        let encoding = value_encoding(req.encoding)?;
        let keys = self.request_keys(&req.table, std::mem::take(&mut req.keys), &req.delta_keys)?;
        Ok(PullPart {
            table: req.table,
            keys,
            encoding,
        })
    }

    /// A push's parts, checked as far as the service can (the store checks
    /// the rest: table, dims, values, ownership).
    fn push_part(&self, mut req: pb::PushRequest) -> Result<PushPart, PsError> {
        let encoding = value_encoding(req.encoding)?;
        let keys = self.request_keys(&req.table, std::mem::take(&mut req.keys), &req.delta_keys)?;
        Ok(PushPart {
            table: req.table,
            keys,
            gradients: req.gradients,
            encoding,
            lr_scale: req.lr_scale.unwrap_or(1.0),
        })
    }

    async fn pull_inner(
        &self,
        request: Request<pb::PullRequest>,
    ) -> Result<Response<pb::PullResponse>, Status> {
        let counters = &self.shard.counters;
        RequestCounters::add(&counters.pull, 1);
        self.check_serving()?;
        let req = request.into_inner();
        let request_bytes = req.encoded_len() as u64;
        let part = self.pull_part(req).map_err(|e| self.fail(e))?;
        let rows = part.keys.len() as u64;
        let limit = self.limits.max_response_bytes;
        let response = self
            .blocking(move |shard| {
                check_response_bytes(shard, std::slice::from_ref(&part), limit)?;
                part.serve(shard)
            })
            .await?;
        RequestCounters::add(&counters.rows_pulled, rows);
        RequestCounters::add(
            &counters.pull_bytes,
            request_bytes + response.encoded_len() as u64,
        );
        Ok(Response::new(response))
    }

    async fn pull_many_inner(
        &self,
        request: Request<pb::PullManyRequest>,
    ) -> Result<Response<pb::PullManyResponse>, Status> {
        let counters = &self.shard.counters;
        RequestCounters::add(&counters.pull_many, 1);
        self.check_serving()?;
        let req = request.into_inner();
        let request_bytes = req.encoded_len() as u64;
        RequestCounters::add(&counters.pull, req.pulls.len() as u64);
        let parts = req
            .pulls
            .into_iter()
            .map(|p| self.pull_part(p))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.fail(e))?;
        let rows: usize = parts.iter().map(|p| p.keys.len()).sum();
        self.check_key_count(rows, "call")
            .map_err(|e| self.fail(e))?;
        let limit = self.limits.max_response_bytes;
        let response = self
            .blocking(move |shard| {
                check_response_bytes(shard, &parts, limit)?;
                let pulls = parts
                    .iter()
                    .map(|p| p.serve(shard))
                    .collect::<Result<_, _>>()?;
                Ok(pb::PullManyResponse { pulls })
            })
            .await?;
        RequestCounters::add(&counters.rows_pulled, rows as u64);
        RequestCounters::add(
            &counters.pull_bytes,
            request_bytes + response.encoded_len() as u64,
        );
        Ok(Response::new(response))
    }

    async fn push_inner(
        &self,
        request: Request<pb::PushRequest>,
    ) -> Result<Response<pb::PushResponse>, Status> {
        RequestCounters::add(&self.shard.counters.push, 1);
        let req = request.into_inner();
        let bytes = req.encoded_len() as u64;
        let (writer, seq) = (req.writer, req.seq);
        check_writer(writer, seq).map_err(|e| self.fail(e))?;
        let part = self.push_part(req).map_err(|e| self.fail(e))?;
        let mut pushes = self.write_pushes(vec![part], writer, seq).await?;
        let response = pushes.pop().unwrap_or_default();
        RequestCounters::add(
            &self.shard.counters.push_bytes,
            bytes + response.encoded_len() as u64,
        );
        Ok(Response::new(response))
    }

    async fn push_many_inner(
        &self,
        request: Request<pb::PushManyRequest>,
    ) -> Result<Response<pb::PushManyResponse>, Status> {
        let counters = &self.shard.counters;
        RequestCounters::add(&counters.push_many, 1);
        let req = request.into_inner();
        let bytes = req.encoded_len() as u64;
        RequestCounters::add(&counters.push, req.pushes.len() as u64);
        check_writer(req.writer, req.seq).map_err(|e| self.fail(e))?;
        let parts = req
            .pushes
            .into_iter()
            .map(|p| self.push_part(p))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.fail(e))?;
        self.check_key_count(parts.iter().map(|p| p.keys.len()).sum(), "call")
            .map_err(|e| self.fail(e))?;
        let response = pb::PushManyResponse {
            pushes: self.write_pushes(parts, req.writer, req.seq).await?,
        };
        RequestCounters::add(&counters.push_bytes, bytes + response.encoded_len() as u64);
        Ok(Response::new(response))
    }

    /// Applies checked pushes as one write, at most once per `(writer,
    /// seq)`, and answers once the write is on the backup (if any).
    async fn write_pushes(
        &self,
        parts: Vec<PushPart>,
        writer: u64,
        seq: u64,
    ) -> Result<Vec<pb::PushResponse>, Status> {
        let replication = Arc::clone(&self.replication);
        let n = parts.len();
        let (outcome, replica_seq) = self
            .blocking(move |shard| {
                replication.write(
                    |replica_seq| match apply_pushes(shard, &parts, writer, seq, replica_seq)? {
                        PushOutcome::Applied(rows) => Ok(Write::Fresh(Some(rows))),
                        PushOutcome::Duplicate { replica_seq } => {
                            Ok(Write::Repeat(None, replica_seq))
                        }
                    },
                    || pb::ReplicaEntry {
                        write: Some(pb::replica_entry::Write::Push(pb::PushManyRequest {
                            pushes: parts.iter().map(PushPart::to_request).collect(),
                            writer,
                            seq,
                        })),
                    },
                )
            })
            .await?;
        self.acknowledged(replica_seq).await?;
        Ok(match outcome {
            Some(rows) => {
                RequestCounters::add(
                    &self.shard.counters.rows_pushed,
                    rows.iter().sum::<usize>() as u64,
                );
                rows.into_iter()
                    .map(|n| pb::PushResponse {
                        rows_applied: n as u64,
                        duplicate: false,
                    })
                    .collect()
            }
            None => vec![
                pb::PushResponse {
                    rows_applied: 0,
                    duplicate: true,
                };
                n
            ],
        })
    }

    /// Waits until write `seq` is on the backup.
    async fn acknowledged(&self, seq: u64) -> Result<(), Status> {
        self.replication
            .acknowledged(seq)
            .await
            .map_err(|e| self.fail(e))
    }

    async fn assign_inner(
        &self,
        request: Request<pb::AssignRequest>,
    ) -> Result<Response<pb::AssignResponse>, Status> {
        RequestCounters::add(&self.shard.counters.assign, 1);
        let req = request.into_inner();
        self.check_keys(&req.table, req.keys.len())
            .map_err(|e| self.fail(e))?;
        let replication = Arc::clone(&self.replication);
        let (assigned, seq) = self
            .blocking(move |shard| {
                replication.write(
                    |_| apply_assign(shard, &req).map(Write::Fresh),
                    || pb::ReplicaEntry {
                        write: Some(pb::replica_entry::Write::Assign(req.clone())),
                    },
                )
            })
            .await?;
        self.acknowledged(seq).await?;
        Ok(Response::new(pb::AssignResponse {
            rows_assigned: assigned as u64,
        }))
    }

    async fn clock_inner(
        &self,
        request: Request<pb::ClockRequest>,
    ) -> Result<Response<pb::ClockResponse>, Status> {
        RequestCounters::add(&self.shard.counters.clock, 1);
        self.check_serving()?;
        let req = request.into_inner();
        let report = clock::Report {
            job: req.job,
            worker: req.worker,
            workers: req.workers,
            clock: req.clock,
            wait_for: req.wait_for,
            finished: req.finished,
            lease: std::time::Duration::from_millis(req.lease_ms.into()),
        };
        let max_wait = std::time::Duration::from_millis(req.max_wait_ms.into()).min(MAX_CLOCK_WAIT);
        let answer = self
            .clocks
            .report(report, max_wait)
            .await
            .map_err(|e| self.fail(e))?;
        Ok(Response::new(pb::ClockResponse {
            min_clock: answer.min_clock,
            min_clock_unfinished: answer.min_clock_unfinished,
            reached: answer.reached,
            expired: answer.expired,
        }))
    }

    async fn checkpoint_inner(
        &self,
        request: Request<pb::CheckpointRequest>,
    ) -> Result<Response<pb::CheckpointResponse>, Status> {
        RequestCounters::add(&self.shard.counters.checkpoint, 1);
        self.check_serving()?;
        let Some(checkpoints) = self.checkpoints.clone() else {
            return Err(self.fail(PsError::FailedPrecondition(
                "this server was started without --checkpoint-dir".into(),
            )));
        };
        let name = request.into_inner().name;
        let written = self
            .blocking(move |shard| checkpoints.save(shard, &name))
            .await?;
        tracing::info!(path = %written.path.display(), rows = written.rows, bytes = written.bytes, "checkpoint written");
        Ok(Response::new(pb::CheckpointResponse {
            path: written.path.display().to_string(),
            rows: written.rows,
            bytes: written.bytes,
        }))
    }

    async fn stats_inner(
        &self,
        _request: Request<pb::StatsRequest>,
    ) -> Result<Response<pb::StatsResponse>, Status> {
        use std::sync::atomic::Ordering::Relaxed;
        let c = &self.shard.counters;
        RequestCounters::add(&c.stats, 1);
        let tables = self
            .blocking(|shard| Ok(shard.table_stats()))
            .await?
            .into_iter()
            .map(|t| PbTableStats {
                kind: match t.spec.kind {
                    TableKind::Sparse => pb::TableKind::Sparse,
                    TableKind::Dense { .. } => pb::TableKind::Dense,
                } as i32,
                dim: t.spec.dim,
                name: t.spec.name,
                rows: t.rows,
                bytes: t.bytes,
                memory_bytes: t.memory_bytes,
            })
            .collect();
        Ok(Response::new(pb::StatsResponse {
            shard_id: self.shard.shard_id(),
            tables,
            requests: Some(pb::RequestCounts {
                create_table: c.create_table.load(Relaxed),
                pull: c.pull.load(Relaxed),
                push: c.push.load(Relaxed),
                stats: c.stats.load(Relaxed),
                errors: c.errors.load(Relaxed),
                rows_pulled: c.rows_pulled.load(Relaxed),
                rows_pushed: c.rows_pushed.load(Relaxed),
                pull_bytes: c.pull_bytes.load(Relaxed),
                push_bytes: c.push_bytes.load(Relaxed),
                checkpoint: c.checkpoint.load(Relaxed),
                assign: c.assign.load(Relaxed),
                clock: c.clock.load(Relaxed),
                pull_many: c.pull_many.load(Relaxed),
                push_many: c.push_many.load(Relaxed),
                updates_applied: c.updates_applied.load(Relaxed),
                duplicate_pushes: c.duplicate_pushes.load(Relaxed),
                replicated_entries: c.replicated_entries.load(Relaxed),
            }),
            role: self.replication.describe().0.to_string(),
            memory_budget_bytes: self.shard.budget.limit(),
            memory_used_bytes: self.shard.budget.used(),
        }))
    }
}

/// Refuses pulls whose answer would pass `limit` bytes of values, before
/// a row is read or a byte of the answer allocated.
fn check_response_bytes(shard: &Shard, parts: &[PullPart], limit: usize) -> Result<(), PsError> {
    let mut total: u64 = 0;
    for part in parts {
        let dim = u64::from(shard.table(&part.table)?.spec().dim);
        let width = wire::value_bytes(part.encoding) as u64;
        total = total.saturating_add((part.keys.len() as u64).saturating_mul(dim * width));
    }
    if total > limit as u64 {
        return Err(PsError::ResourceExhausted(format!(
            "the answer would hold {total} bytes of values, over this shard's limit of {limit} (--max-response-bytes): pull fewer keys per call"
        )));
    }
    Ok(())
}

/// A checked pull, ready for the store.
struct PullPart {
    table: String,
    keys: Vec<u64>,
    encoding: pb::ValueEncoding,
}

impl PullPart {
    /// Reads the rows and encodes them straight from the table.
    fn serve(&self, shard: &Shard) -> Result<pb::PullResponse, PsError> {
        let width = wire::value_bytes(self.encoding);
        let mut out = bytes::BytesMut::new();
        let dim = shard.pull_each(&self.table, &self.keys, |i, row| {
            let bytes = row.len() * width;
            if out.capacity() == 0 {
                out.reserve(self.keys.len() * bytes);
            }
            wire::place_values(&mut out, i * bytes, row, self.encoding)
        })?;
        Ok(pb::PullResponse {
            values: out.freeze(),
            dim,
            encoding: self.encoding as i32,
        })
    }
}

/// A push checked by the service; gradients still encoded.
struct PushPart {
    table: String,
    keys: Vec<u64>,
    gradients: bytes::Bytes,
    encoding: pb::ValueEncoding,
    lr_scale: f32,
}

impl PushPart {
    /// The part as a plain request (keys listed), for the backup.
    fn to_request(&self) -> pb::PushRequest {
        pb::PushRequest {
            table: self.table.clone(),
            keys: self.keys.clone(),
            gradients: self.gradients.clone(),
            lr_scale: Some(self.lr_scale),
            encoding: self.encoding as i32,
            ..Default::default()
        }
    }
}

/// Decodes the gradients of checked pushes and applies them as one call
/// (at most once per `(writer, seq)`), recorded as write `replica_seq`.
fn apply_pushes(
    shard: &Shard,
    parts: &[PushPart],
    writer: u64,
    seq: u64,
    replica_seq: u64,
) -> Result<PushOutcome, PsError> {
    let grads = parts
        .iter()
        .map(|p| wire::decode_values(&p.gradients, p.encoding))
        .collect::<Result<Vec<_>, _>>()?;
    let pushes: Vec<Push<'_>> = parts
        .iter()
        .zip(&grads)
        .map(|(p, g)| Push {
            table: &p.table,
            keys: &p.keys,
            grads: g,
            lr_scale: p.lr_scale,
        })
        .collect();
    shard.push_many_once(writer, seq, replica_seq, &pushes)
}

/// Applies an Assign request (its keys already checked against the limits).
fn apply_assign(shard: &Shard, req: &pb::AssignRequest) -> Result<usize, PsError> {
    let values = wire::decode_f32s(&req.values)?;
    shard.assign(&req.table, &req.keys, &values)
}

/// A push's `(writer, seq)`: seqs number a writer's calls from 1, so a
/// writer with seq 0 is a malformed call, not one to deduplicate.
fn check_writer(writer: u64, seq: u64) -> Result<(), PsError> {
    if writer != 0 && seq == 0 {
        return Err(PsError::invalid(
            "a push with a writer id needs seq >= 1 (a writer numbers its calls from 1; writer 0 turns deduplication off)",
        ));
    }
    Ok(())
}

/// A request's `ValueEncoding`; an unknown number is an error.
fn value_encoding(value: i32) -> Result<pb::ValueEncoding, PsError> {
    pb::ValueEncoding::try_from(value)
        .map_err(|_| PsError::invalid(format!("unknown value encoding {value}")))
}

/// Every RPC is timed and its outcome counted ([`crate::metrics`]).
#[tonic::async_trait]
impl ParameterServer for ShardService {
    async fn describe(
        &self,
        request: Request<pb::DescribeRequest>,
    ) -> Result<Response<pb::DescribeResponse>, Status> {
        self.observed(Rpc::Describe, self.describe_inner(request))
            .await
    }

    async fn create_table(
        &self,
        request: Request<pb::CreateTableRequest>,
    ) -> Result<Response<pb::CreateTableResponse>, Status> {
        self.observed(Rpc::CreateTable, self.create_table_inner(request))
            .await
    }

    async fn pull(
        &self,
        request: Request<pb::PullRequest>,
    ) -> Result<Response<pb::PullResponse>, Status> {
        self.observed(Rpc::Pull, self.pull_inner(request)).await
    }

    async fn push(
        &self,
        request: Request<pb::PushRequest>,
    ) -> Result<Response<pb::PushResponse>, Status> {
        self.observed(Rpc::Push, self.push_inner(request)).await
    }

    async fn assign(
        &self,
        request: Request<pb::AssignRequest>,
    ) -> Result<Response<pb::AssignResponse>, Status> {
        self.observed(Rpc::Assign, self.assign_inner(request)).await
    }

    async fn pull_many(
        &self,
        request: Request<pb::PullManyRequest>,
    ) -> Result<Response<pb::PullManyResponse>, Status> {
        self.observed(Rpc::PullMany, self.pull_many_inner(request))
            .await
    }

    async fn push_many(
        &self,
        request: Request<pb::PushManyRequest>,
    ) -> Result<Response<pb::PushManyResponse>, Status> {
        self.observed(Rpc::PushMany, self.push_many_inner(request))
            .await
    }

    async fn clock(
        &self,
        request: Request<pb::ClockRequest>,
    ) -> Result<Response<pb::ClockResponse>, Status> {
        self.observed(Rpc::Clock, self.clock_inner(request)).await
    }

    async fn checkpoint(
        &self,
        request: Request<pb::CheckpointRequest>,
    ) -> Result<Response<pb::CheckpointResponse>, Status> {
        self.observed(Rpc::Checkpoint, self.checkpoint_inner(request))
            .await
    }

    async fn stats(
        &self,
        request: Request<pb::StatsRequest>,
    ) -> Result<Response<pb::StatsResponse>, Status> {
        self.observed(Rpc::Stats, self.stats_inner(request)).await
    }

    async fn replicate(
        &self,
        request: Request<pb::ReplicateRequest>,
    ) -> Result<Response<pb::ReplicateResponse>, Status> {
        self.observed(Rpc::Replicate, self.replicate_inner(request))
            .await
    }

    async fn promote(
        &self,
        request: Request<pb::PromoteRequest>,
    ) -> Result<Response<pb::PromoteResponse>, Status> {
        self.observed(Rpc::Promote, self.promote_inner(request))
            .await
    }

    type JoinStream = crate::replication::JoinStream;

    async fn join(
        &self,
        request: Request<pb::JoinRequest>,
    ) -> Result<Response<crate::replication::JoinStream>, Status> {
        self.observed(Rpc::Join, self.join_inner(request)).await
    }

    async fn lease(
        &self,
        request: Request<pb::LeaseRequest>,
    ) -> Result<Response<pb::LeaseResponse>, Status> {
        self.observed(Rpc::Lease, self.lease_inner(request)).await
    }
}

mod peer;
#[cfg(test)]
mod tests;
