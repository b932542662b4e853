//! The one way a write reaches a shard's tables, on a primary and on a
//! backup alike.
//!
//! A [`Writer`] takes a checked [`Write`] ([`crate::request`]) and applies
//! it to the store: a push's gradients are read from the request's buffer,
//! the whole call is checked by the store, its `(writer, seq)` is claimed in
//! the applied-push record ([`crate::dedup`]) and the store applies it. On a
//! primary the write is numbered and queued for the backup as the typed
//! write it is ([`Replication::write`]; encoded only when forwarded); on a
//! backup the primary's writes arrive decoded by the same
//! [`crate::request::Decoder`] and go through the same
//! [`Writer::apply`], so both hold the same rows and the same record.
//! The writer counts what it applies; the store counts nothing.

use std::sync::Arc;

use ps_common::{PsError, wire};

use crate::dedup::{self, Claim};
use crate::metrics::{RequestCounters, ShardCounters};
use crate::replication::{Ordered, Replicated, Replication};
use crate::request::{Assign, PushCall, Write};
use crate::store::{Push, Shard};

/// What a write did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A table: `true` if it was created, `false` if an identical one existed.
    Created(bool),
    /// A push call: rows applied per part.
    Pushed(Vec<usize>),
    /// A push call whose `(writer, seq)` was applied before: nothing now.
    Duplicate,
    /// Rows assigned.
    Assigned(usize),
    /// Rows evicted.
    Evicted(usize),
}

/// Applies writes to one shard (cheap to clone: it shares its parts).
#[derive(Debug, Clone)]
pub struct Writer {
    shard: Arc<Shard>,
    replication: Arc<Replication>,
    counters: Arc<ShardCounters>,
}

impl Writer {
    /// The writer of `shard`, ordering writes through `replication` and
    /// counting into `counters`.
    pub fn new(
        shard: Arc<Shard>,
        replication: Arc<Replication>,
        counters: Arc<ShardCounters>,
    ) -> Writer {
        Writer {
            shard,
            replication,
            counters,
        }
    }

    /// Primary: applies `write` in the shard's write order and queues it for
    /// the backup. Returns its outcome and the number to pass to
    /// [`Replication::acknowledged`] before answering. Runs store work:
    /// call it on a blocking thread.
    pub fn write(&self, write: Arc<Write>) -> Result<(Outcome, u64), PsError> {
        self.replication
            .write(|seq| self.apply(seq, &write), || Arc::clone(&write))
    }

    /// Backup: applies the primary's writes `first_seq..` of `stream` (its
    /// id and the sender's epoch), in
    /// order, skipping those already applied (see
    /// [`Replication::apply_replicated`]). Runs store work: call it on a
    /// blocking thread.
    pub fn replicate(
        &self,
        stream: (u64, u64),
        first_seq: u64,
        writes: &[Write],
    ) -> Result<Replicated, PsError> {
        self.replication
            .apply_replicated(stream, first_seq, writes.len(), |i, seq| {
                self.apply(seq, &writes[i])?;
                RequestCounters::add(&self.counters.requests.replicated_entries, 1);
                Ok(())
            })
    }

    /// Applies write number `seq`: the single apply of primary and backup.
    fn apply(&self, seq: u64, write: &Write) -> Result<Ordered<Outcome>, PsError> {
        match write {
            Write::CreateTable(spec) => Ok(Ordered::Fresh(Outcome::Created(
                self.shard.create_table(spec.clone())?,
            ))),
            Write::Push(call) => self.push(seq, call),
            Write::Assign(a) => Ok(Ordered::Fresh(Outcome::Assigned(self.assign(a)?))),
            Write::Evict(e) => Ok(Ordered::Fresh(Outcome::Evicted(
                self.shard.evict(&e.table, &e.keys, e.spill)?,
            ))),
        }
    }

    /// A push call: checked in full by the store, then claimed, then
    /// applied; a call refused at either step claims nothing.
    fn push(&self, seq: u64, call: &PushCall) -> Result<Ordered<Outcome>, PsError> {
        // The request's own bytes where they can be read as floats (always
        // over the in-process link), a decoded copy otherwise.
        let grads = call
            .parts
            .iter()
            .map(|p| wire::values_view(&p.gradients, p.encoding))
            .collect::<Result<Vec<_>, _>>()?;
        let pushes: Vec<Push<'_>> = call
            .parts
            .iter()
            .zip(&grads)
            .map(|(p, g)| Push {
                table: &p.table,
                keys: &p.keys,
                grads: g,
                lr_scale: p.lr_scale,
            })
            .collect();
        let prepared = self.shard.prepare_pushes(&pushes)?;
        let applied = self.replication.applied();
        let requests = &self.counters.requests;
        match applied.claim(call.writer, call.seq, seq) {
            Claim::New => {}
            Claim::Repeat(earlier) => {
                RequestCounters::add(&requests.duplicate_pushes, 1);
                return Ok(Ordered::Repeat(Outcome::Duplicate, earlier));
            }
            Claim::Forgotten { floor } => {
                return Err(PsError::FailedPrecondition(format!(
                    "push (writer {:x}, seq {}) is older than the last {} calls this shard remembers of its writer (seq <= {floor}): it cannot tell whether it was applied, so it applies nothing",
                    call.writer,
                    call.seq,
                    dedup::WINDOW
                )));
            }
        }
        match prepared.apply() {
            Ok(rows) => {
                RequestCounters::add(&requests.updates_applied, 1);
                RequestCounters::add(&requests.rows_pushed, rows.iter().sum::<usize>() as u64);
                Ok(Ordered::Fresh(Outcome::Pushed(rows)))
            }
            Err(e) => {
                applied.cancel(call.writer, call.seq);
                Err(e)
            }
        }
    }

    fn assign(&self, a: &Assign) -> Result<usize, PsError> {
        let values = wire::values_view(&a.values, ps_common::pb::ValueEncoding::F32)?;
        self.shard.assign(&a.table, &a.keys, &values)
    }
}
