//! The replication calls of the service: Replicate and Join (from peers),
//! Lease (from this primary's backup), Follow and Tail (from followers)
//! and Promote (from workers or peers).
//! They convert and delegate to [`crate::replication`]; who may call them
//! is decided before they run ([`crate::auth`]).

use ps_common::pb;
use tonic::{Request, Response, Status};

use super::ShardService;
use crate::replication::{JoinStream, Joiner, Replicated};

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
        let writes = req
            .entries
            .into_iter()
            .zip(req.first_seq..)
            .map(|(entry, seq)| self.decoder.replicated(entry, seq))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.fail(e))?;
        let (writer, stream, first_seq) =
            (self.writer.clone(), (req.stream, req.epoch), req.first_seq);
        let applied = self
            .blocking(move |_| writer.replicate(stream, first_seq, &writes))
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

    pub(super) async fn follow_inner(
        &self,
        request: Request<pb::FollowRequest>,
    ) -> Result<Response<JoinStream>, Status> {
        let req = request.into_inner();
        let chunks = self
            .replication
            .answer_follow(req.shard_id, req.num_shards)
            .await
            .map_err(|e| self.fail(e))?;
        Ok(Response::new(chunks))
    }

    pub(super) async fn tail_inner(
        &self,
        request: Request<pb::TailRequest>,
    ) -> Result<Response<pb::TailResponse>, Status> {
        let req = request.into_inner();
        let tailed = self
            .replication
            .answer_tail(
                req.log,
                req.after,
                std::time::Duration::from_millis(u64::from(req.wait_ms)),
            )
            .await
            .map_err(|e| self.fail(e))?;
        Ok(Response::new(pb::TailResponse {
            first_seq: tailed.first_seq,
            entries: tailed.writes.iter().map(|w| w.to_entry()).collect(),
            newest: tailed.newest,
            held_ms: tailed.held.as_millis().min(u128::from(u32::MAX)) as u32,
        }))
    }
}
