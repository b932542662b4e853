//! The gRPC adapter of one shard: converts `ps.v1` messages to typed
//! requests and back, and runs the work they ask for off the async runtime.
//!
//! A push goes: [`crate::request::Decoder`] (decode, check) ->
//! [`Writer`] (order, claim, apply, queue for the backup) -> [`Shard`]
//! (rows) -> [`crate::optimizer`]. No table logic lives here.
//!
//! - [`rows`]: Pull, PullMany, Push, PushMany, Assign, CreateTable.
//! - [`peer`]: Replicate, Join, Lease, Promote.
//! - this file: the service, Describe, Clock, Checkpoint, Stats.

mod peer;
mod rows;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use ps_common::PsError;
use ps_common::TableKind;
use ps_common::pb::parameter_server_server::ParameterServer;
use ps_common::pb::{self, TableStats as PbTableStats};
use tonic::{Request, Response, Status};

use crate::checkpoint::Checkpoints;
use crate::clock::{self, Clocks};
use crate::evictor::Evictor;
use crate::metrics::{RequestCounters, Rpc, ShardCounters};
use crate::replication::{Peer, Replication, Role};
use crate::request::Decoder;
pub use crate::request::Limits;
use crate::store::Shard;
use crate::writer::Writer;

/// The `ParameterServer` service of one shard.
#[derive(Debug, Clone)]
pub struct ShardService {
    shard: Arc<Shard>,
    /// Checks requests against the shard's limits.
    decoder: Decoder,
    /// Where Checkpoint writes; `None` refuses checkpoints.
    checkpoints: Option<Arc<Checkpoints>>,
    /// Workers' clocks (SSP/BSP), shared by every clone of this service.
    clocks: Arc<Clocks>,
    /// This server's role and its replication to a backup.
    replication: Arc<Replication>,
    /// Applies writes, here and (as a backup) from the primary.
    writer: Writer,
    /// What this server counts.
    counters: Arc<ShardCounters>,
    /// The checkpoint the shard was restored from, for Describe.
    restored_from: Option<String>,
    /// Frees memory for tables with eviction when a request finds the
    /// budget full (`None`: such requests are refused at once).
    evictor: Option<Arc<Evictor>>,
}

/// Deltas between two bases of an incremental Checkpoint call's chain.
const DELTAS_PER_BASE: u64 = 15;

/// Passes of the evictor a request refused for memory waits for at most.
const RELIEF_TRIES: u32 = 3;

/// Longest one Clock call waits.
const MAX_CLOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

impl ShardService {
    /// A service over `shard` enforcing `limits`, writing checkpoints through `checkpoints`.
    /// The service is a primary with no backup; see [`ShardService::with_replication`].
    pub fn new(shard: Arc<Shard>, limits: Limits, checkpoints: Option<Arc<Checkpoints>>) -> Self {
        let replication = Replication::new(Arc::clone(&shard), Role::Primary, Peer::default());
        let counters = Arc::new(ShardCounters::default());
        ShardService {
            writer: Writer::new(
                Arc::clone(&shard),
                Arc::clone(&replication),
                Arc::clone(&counters),
            ),
            shard,
            decoder: Decoder::new(limits),
            checkpoints,
            clocks: Arc::new(Clocks::default()),
            replication,
            counters,
            restored_from: None,
            evictor: None,
        }
    }

    /// The service asking `evictor` to free memory when a request finds
    /// the budget full.
    pub fn with_evictor(mut self, evictor: Arc<Evictor>) -> Self {
        self.evictor = Some(evictor);
        self
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
        self.rebuild_writer()
    }

    /// The service counting into `counters` (shared with a metrics collector).
    pub fn with_counters(mut self, counters: Arc<ShardCounters>) -> Self {
        self.counters = counters;
        self.rebuild_writer()
    }

    /// What this service counts.
    pub fn counters(&self) -> &Arc<ShardCounters> {
        &self.counters
    }

    fn rebuild_writer(mut self) -> Self {
        self.writer = Writer::new(
            Arc::clone(&self.shard),
            Arc::clone(&self.replication),
            Arc::clone(&self.counters),
        );
        self
    }

    /// Refuses worker calls on a backup, a follower or a deposed primary.
    fn check_serving(&self) -> Result<(), Status> {
        self.replication.check_serving().map_err(|e| self.fail(e))
    }

    /// Refuses pulls on a backup, a deposed primary or a follower that has
    /// not loaded its snapshot.
    fn check_reading(&self) -> Result<(), Status> {
        self.replication.check_reading().map_err(|e| self.fail(e))
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

    /// Runs the store work `make()` returns on a blocking thread, as
    /// [`ShardService::blocking`] does; when it is refused for memory while
    /// the shard is near its budget and has tables with eviction, asks the
    /// evictor for a pass and runs it again (at most [`RELIEF_TRIES`]
    /// times). Only the refused request waits; a refused write claimed and
    /// changed nothing, so running it again is safe.
    async fn relieving<T, F>(&self, make: impl Fn() -> F) -> Result<T, Status>
    where
        T: Send + 'static,
        F: FnOnce(&Shard) -> Result<T, PsError> + Send + 'static,
    {
        let mut tries = 0;
        loop {
            let (shard, f) = (Arc::clone(&self.shard), make());
            let result = tokio::task::spawn_blocking(move || f(&shard))
                .await
                .map_err(|e| Status::internal(format!("shard task failed: {e}")))?;
            match (result, &self.evictor) {
                (Err(PsError::ResourceExhausted(_)), Some(evictor))
                    if tries < RELIEF_TRIES && self.near_budget() && evictor.can_relieve() =>
                {
                    tries += 1;
                    evictor.relieve().await;
                }
                (result, _) => return result.map_err(|e| self.fail(e)),
            }
        }
    }

    /// Whether the shard holds more than the evictor's low-water share of
    /// its memory budget.
    fn near_budget(&self) -> bool {
        let budget = &self.shard.budget;
        budget.limit() != u64::MAX
            && budget.used() as f64 >= crate::evictor::LOW_WATER * budget.limit() as f64
    }

    /// Runs an RPC, recording its latency and outcome.
    async fn observed<T>(
        &self,
        rpc: Rpc,
        call: impl std::future::Future<Output = Result<T, Status>>,
    ) -> Result<T, Status> {
        let started = std::time::Instant::now();
        let result = call.await;
        self.counters
            .rpcs
            .record(rpc, started.elapsed(), result.is_ok());
        result
    }

    fn fail(&self, err: PsError) -> Status {
        RequestCounters::add(&self.counters.requests.errors, 1);
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
            max_keys_per_request: self.decoder.limits().max_keys_per_request as u64,
            max_request_bytes: self.decoder.limits().max_request_bytes as u64,
            max_response_bytes: self.decoder.limits().max_response_bytes as u64,
            role: described.role.to_string(),
            backup: described.backup.unwrap_or_default(),
            restored_from: self
                .replication
                .restored_from()
                .or_else(|| self.restored_from.clone())
                .unwrap_or_default(),
            server_id: self.replication.server_id(),
            caught_up: described.caught_up,
            lag_seconds: described.lag.map_or(-1.0, |lag| lag.as_secs_f64()),
            primary: described.primary.unwrap_or_default(),
            epoch: described.epoch,
        }))
    }

    async fn clock_inner(
        &self,
        request: Request<pb::ClockRequest>,
    ) -> Result<Response<pb::ClockResponse>, Status> {
        RequestCounters::add(&self.counters.requests.clock, 1);
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
        RequestCounters::add(&self.counters.requests.checkpoint, 1);
        self.check_serving()?;
        let Some(checkpoints) = self.checkpoints.clone() else {
            return Err(self.fail(PsError::FailedPrecondition(
                "this server was started without --checkpoint-dir".into(),
            )));
        };
        let pb::CheckpointRequest { name, incremental } = request.into_inner();
        let written = self
            .blocking(move |shard| match incremental {
                true => checkpoints.save_incremental(shard, &name, DELTAS_PER_BASE),
                false => checkpoints.save(shard, &name),
            })
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
        let c = &self.counters.requests;
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
                rows: t.rows + t.rows_on_disk,
                bytes: t.bytes,
                memory_bytes: t.memory_bytes,
                rows_in_memory: t.rows,
                rows_on_disk: t.rows_on_disk,
                admitted_rows: t.admitted_rows,
                filtered_pushes: t.filtered_pushes,
                evicted_rows: t.evicted_rows,
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

    type FollowStream = crate::replication::JoinStream;

    async fn follow(
        &self,
        request: Request<pb::FollowRequest>,
    ) -> Result<Response<crate::replication::JoinStream>, Status> {
        self.observed(Rpc::Follow, self.follow_inner(request)).await
    }

    async fn tail(
        &self,
        request: Request<pb::TailRequest>,
    ) -> Result<Response<pb::TailResponse>, Status> {
        self.observed(Rpc::Tail, self.tail_inner(request)).await
    }
}
