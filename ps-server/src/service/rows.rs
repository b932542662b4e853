//! The calls that read and write rows: Pull and PullMany (served straight
//! from the store, encoded once from the rows), and Push, PushMany, Assign
//! and CreateTable (decoded into a [`Write`] and handed to the
//! [`crate::writer::Writer`], answered once the write is on the backup).

use std::sync::Arc;

use prost::Message;
use ps_common::pb;
use ps_common::{PsError, wire};
use tonic::{Request, Response, Status};

use super::ShardService;
use crate::metrics::RequestCounters;
use crate::request::{Read, Write};
use crate::store::Shard;
use crate::writer::Outcome;

impl ShardService {
    pub(super) async fn create_table_inner(
        &self,
        request: Request<pb::CreateTableRequest>,
    ) -> Result<Response<pb::CreateTableResponse>, Status> {
        RequestCounters::add(&self.counters.requests.create_table, 1);
        let write = self
            .decoder
            .create_table(request.into_inner())
            .map_err(|e| self.fail(e))?;
        let Write::CreateTable(spec) = &write else {
            return Err(Status::internal("CreateTable decoded to another write"));
        };
        let name = spec.name.clone();
        let created = match self.write(write).await? {
            Outcome::Created(created) => created,
            other => return Err(unexpected(&other)),
        };
        if created {
            tracing::info!(table = %name, "created table");
        }
        Ok(Response::new(pb::CreateTableResponse { created }))
    }

    pub(super) async fn pull_inner(
        &self,
        request: Request<pb::PullRequest>,
    ) -> Result<Response<pb::PullResponse>, Status> {
        RequestCounters::add(&self.counters.requests.pull, 1);
        self.check_reading()?;
        let req = request.into_inner();
        let request_bytes = req.encoded_len() as u64;
        let read = self.decoder.read(req).map_err(|e| self.fail(e))?;
        let mut pulls = self.read(vec![read], request_bytes).await?;
        Ok(Response::new(pulls.pop().unwrap_or_default()))
    }

    pub(super) async fn pull_many_inner(
        &self,
        request: Request<pb::PullManyRequest>,
    ) -> Result<Response<pb::PullManyResponse>, Status> {
        let counters = &self.counters.requests;
        RequestCounters::add(&counters.pull_many, 1);
        self.check_reading()?;
        let req = request.into_inner();
        let request_bytes = req.encoded_len() as u64;
        RequestCounters::add(&counters.pull, req.pulls.len() as u64);
        let reads = self.decoder.reads(req).map_err(|e| self.fail(e))?;
        let pulls = self.read(reads, request_bytes).await?;
        Ok(Response::new(pb::PullManyResponse { pulls }))
    }

    /// Serves checked reads on a blocking thread (refused whole if the
    /// answer would pass the response limit), counting rows and bytes.
    async fn read(
        &self,
        reads: Vec<Read>,
        request_bytes: u64,
    ) -> Result<Vec<pb::PullResponse>, Status> {
        let rows: usize = reads.iter().map(|r| r.keys.len()).sum();
        let limit = self.decoder.limits().max_response_bytes;
        let reads = Arc::new(reads);
        let pulls: Vec<pb::PullResponse> = self
            .relieving(|| {
                let reads = Arc::clone(&reads);
                move |shard: &Shard| {
                    check_response_bytes(shard, &reads, limit)?;
                    reads.iter().map(|r| serve(shard, r)).collect()
                }
            })
            .await?;
        let counters = &self.counters.requests;
        let answer_bytes: usize = pulls.iter().map(|p| p.encoded_len()).sum();
        RequestCounters::add(&counters.rows_pulled, rows as u64);
        RequestCounters::add(&counters.pull_bytes, request_bytes + answer_bytes as u64);
        Ok(pulls)
    }

    pub(super) async fn push_inner(
        &self,
        request: Request<pb::PushRequest>,
    ) -> Result<Response<pb::PushResponse>, Status> {
        let counters = &self.counters.requests;
        RequestCounters::add(&counters.push, 1);
        let req = request.into_inner();
        let bytes = req.encoded_len() as u64;
        let write = self.decoder.push(req).map_err(|e| self.fail(e))?;
        let response = push_answers(self.write(write).await?, 1)?
            .pop()
            .unwrap_or_default();
        RequestCounters::add(&counters.push_bytes, bytes + response.encoded_len() as u64);
        Ok(Response::new(response))
    }

    pub(super) async fn push_many_inner(
        &self,
        request: Request<pb::PushManyRequest>,
    ) -> Result<Response<pb::PushManyResponse>, Status> {
        let counters = &self.counters.requests;
        RequestCounters::add(&counters.push_many, 1);
        let req = request.into_inner();
        let bytes = req.encoded_len() as u64;
        RequestCounters::add(&counters.push, req.pushes.len() as u64);
        let parts = req.pushes.len();
        let write = self.decoder.push_many(req).map_err(|e| self.fail(e))?;
        let response = pb::PushManyResponse {
            pushes: push_answers(self.write(write).await?, parts)?,
        };
        RequestCounters::add(&counters.push_bytes, bytes + response.encoded_len() as u64);
        Ok(Response::new(response))
    }

    pub(super) async fn assign_inner(
        &self,
        request: Request<pb::AssignRequest>,
    ) -> Result<Response<pb::AssignResponse>, Status> {
        RequestCounters::add(&self.counters.requests.assign, 1);
        let write = self
            .decoder
            .assign(request.into_inner())
            .map_err(|e| self.fail(e))?;
        match self.write(write).await? {
            Outcome::Assigned(n) => Ok(Response::new(pb::AssignResponse {
                rows_assigned: n as u64,
            })),
            other => Err(unexpected(&other)),
        }
    }

    /// Applies `write` through the writer on a blocking thread and waits
    /// until it is on the backup (if any).
    async fn write(&self, write: Write) -> Result<Outcome, Status> {
        let write = Arc::new(write);
        let (outcome, seq) = self
            .relieving(|| {
                let (writer, write) = (self.writer.clone(), Arc::clone(&write));
                move |_: &Shard| writer.write(write)
            })
            .await?;
        self.replication
            .acknowledged(seq)
            .await
            .map_err(|e| self.fail(e))?;
        Ok(outcome)
    }
}

/// A push call's answers, one per part.
fn push_answers(outcome: Outcome, parts: usize) -> Result<Vec<pb::PushResponse>, Status> {
    match outcome {
        Outcome::Pushed(rows) => Ok(rows
            .into_iter()
            .map(|n| pb::PushResponse {
                rows_applied: n as u64,
                duplicate: false,
            })
            .collect()),
        Outcome::Duplicate => Ok(vec![
            pb::PushResponse {
                rows_applied: 0,
                duplicate: true,
            };
            parts
        ]),
        other => Err(unexpected(&other)),
    }
}

/// A write answered with another kind of outcome than it asks for: a bug.
fn unexpected(outcome: &Outcome) -> Status {
    Status::internal(format!(
        "the writer answered {outcome:?} for another kind of write"
    ))
}

/// Refuses pulls whose answer would pass `limit` bytes of values, before
/// a row is read or a byte of the answer allocated.
fn check_response_bytes(shard: &Shard, reads: &[Read], limit: usize) -> Result<(), PsError> {
    let mut total: u64 = 0;
    for read in reads {
        let dim = u64::from(shard.table(&read.table)?.spec().dim);
        let width = wire::value_bytes(read.encoding) as u64;
        total = total.saturating_add((read.keys.len() as u64).saturating_mul(dim * width));
    }
    if total > limit as u64 {
        return Err(PsError::ResourceExhausted(format!(
            "the answer would hold {total} bytes of values, over this shard's limit of {limit} (--max-response-bytes): pull fewer keys per call"
        )));
    }
    Ok(())
}

/// Reads the rows of `read` and encodes them straight from the table.
fn serve(shard: &Shard, read: &Read) -> Result<pb::PullResponse, PsError> {
    let width = wire::value_bytes(read.encoding);
    let mut out = bytes::BytesMut::new();
    let dim = shard.pull_each(&read.table, &read.keys, |i, row| {
        let bytes = row.len() * width;
        if out.capacity() == 0 {
            out.reserve(read.keys.len() * bytes);
        }
        wire::place_values(&mut out, i * bytes, row, read.encoding)
    })?;
    Ok(pb::PullResponse {
        values: out.freeze(),
        dim,
        encoding: read.encoding as i32,
    })
}
