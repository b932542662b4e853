//! The replication calls of the service: Replicate and Join (from peers),
//! Lease (from this primary's backup) and Promote (from workers or peers).
//! They convert and delegate to [`crate::replication`]; who may call them
//! is decided before they run ([`crate::auth`]).

use std::sync::Arc;

use ps_common::pb;
use ps_common::{PsError, TableSpec};
use tonic::{Request, Response, Status};

use super::{ShardService, apply_assign, apply_pushes};
use crate::replication::{JoinStream, Joiner, Replicated};
use crate::store::{RequestCounters, Shard};

/// How long a Replicate call waits for this backup to load its snapshot.
const CATCH_UP_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

impl ShardService {
    pub(super) async fn replicate_inner(
        &self,
        request: Request<pb::ReplicateRequest>,
    ) -> Result<Response<pb::ReplicateResponse>, Status> {
        let req = request.into_inner();
        if self.replication.description().role == "backup" {
            self.replication
                .wait_caught_up(CATCH_UP_WAIT)
                .await
                .map_err(|e| self.fail(e))?;
        }
        let (service, replication) = (self.clone(), Arc::clone(&self.replication));
        let applied = self
            .blocking(move |shard| {
                replication.apply_replicated(
                    req.stream,
                    req.first_seq,
                    req.entries.len(),
                    |i, seq| service.apply_entry(shard, &req.entries[i], seq),
                )
            })
            .await?;
        Ok(Response::new(match applied {
            Replicated::Through(applied_through) => pb::ReplicateResponse {
                applied_through,
                promoted: false,
            },
            Replicated::Promoted => pb::ReplicateResponse {
                applied_through: 0,
                promoted: true,
            },
        }))
    }

    /// Applies one of the primary's writes, numbered `seq`, exactly as the
    /// primary did (the same checks, the same `(writer, seq)` records).
    fn apply_entry(
        &self,
        shard: &Shard,
        entry: &pb::ReplicaEntry,
        seq: u64,
    ) -> Result<(), PsError> {
        use pb::replica_entry::Write as Entry;
        match &entry.write {
            Some(Entry::CreateTable(spec)) => {
                shard.create_table(TableSpec::try_from(spec.clone())?)?;
            }
            Some(Entry::Push(call)) => {
                let parts = call
                    .pushes
                    .iter()
                    .map(|p| self.push_part(p.clone()))
                    .collect::<Result<Vec<_>, _>>()?;
                apply_pushes(shard, &parts, call.writer, call.seq, seq)?;
            }
            Some(Entry::Assign(req)) => {
                self.check_keys(&req.table, req.keys.len())?;
                apply_assign(shard, req)?;
            }
            None => return Err(PsError::invalid(format!("replicated write {seq} is empty"))),
        }
        RequestCounters::add(&shard.counters.replicated_entries, 1);
        Ok(())
    }

    pub(super) async fn promote_inner(
        &self,
        _request: Request<pb::PromoteRequest>,
    ) -> Result<Response<pb::PromoteResponse>, Status> {
        let promoted = self.replication.promote().await.map_err(|e| self.fail(e))?;
        Ok(Response::new(pb::PromoteResponse { promoted }))
    }

    pub(super) async fn join_inner(
        &self,
        request: Request<pb::JoinRequest>,
    ) -> Result<Response<JoinStream>, Status> {
        let joiner = Joiner::try_from(request.into_inner()).map_err(|e| self.fail(e))?;
        let chunks = self
            .replication
            .answer_join(joiner)
            .await
            .map_err(|e| self.fail(e))?;
        Ok(Response::new(chunks))
    }

    pub(super) async fn lease_inner(
        &self,
        request: Request<pb::LeaseRequest>,
    ) -> Result<Response<pb::LeaseResponse>, Status> {
        let granted = self.replication.grant_lease(request.into_inner().stream);
        Ok(Response::new(pb::LeaseResponse { granted }))
    }
}
