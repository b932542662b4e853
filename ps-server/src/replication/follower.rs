//! Read replicas. On the primary: the follower log (every write it applies,
//! in order, capped in bytes), the snapshot a follower starts from, and the
//! Tail answer. On the follower: loading that snapshot, asking for what
//! follows, and how stale its rows may be.
//!
//! Nothing on the primary waits for a follower. The log is trimmed from
//! its start when it passes its cap; a follower whose position was trimmed
//! is answered OUT_OF_RANGE and starts again from a fresh snapshot. A log
//! no follower has read for [`FOLLOWER_IDLE`] is dropped, and the primary
//! applies writes concurrently again.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ps_common::PsError;
use ps_common::pb;

use super::primary::stream_snapshot;
use super::{JoinStream, Replication, Role, State, lock, random_id};
use crate::request::Write;

/// The follower log's default byte cap (`ps-server --follower-log-bytes`).
pub const DEFAULT_FOLLOWER_LOG_BYTES: usize = 256 << 20;
/// A log no Tail has read for this long is dropped.
pub const FOLLOWER_IDLE: Duration = Duration::from_secs(30);
/// Longest a Tail call is held while there is nothing new.
const MAX_TAIL_WAIT: Duration = Duration::from_secs(1);
/// Most writes, and bytes of writes, in one Tail answer.
const MAX_TAIL_WRITES: usize = 512;
const MAX_TAIL_BYTES: usize = 8 << 20;

/// The writes a primary applied since its followers' snapshots.
#[derive(Debug)]
pub(super) struct FollowerLog {
    /// The log's id (JoinChunk.stream of its snapshots).
    id: u64,
    /// The number of `writes[0]` (or of the next write, when empty).
    start: u64,
    writes: VecDeque<Arc<Write>>,
    bytes: usize,
    last_read: Instant,
}

/// What a Tail call found: writes from `first_seq`, and the primary's
/// newest write when it answered.
#[derive(Debug)]
pub struct Tailed {
    /// The number of `writes[0]`.
    pub first_seq: u64,
    /// Consecutive writes.
    pub writes: Vec<Arc<Write>>,
    /// The primary's last write.
    pub newest: u64,
    /// How long the call was held before this answer.
    pub held: Duration,
}

impl Replication {
    /// Primary: the byte cap of the follower log.
    pub fn set_follower_log_bytes(&self, cap: usize) {
        self.log_cap.store(cap.max(1), Ordering::Relaxed);
    }

    /// Primary, in write order (the order lock held exclusively): keeps
    /// write `seq` in the follower log, if there is one; drops a log no
    /// follower has read for [`FOLLOWER_IDLE`].
    pub(super) fn log_write(&self, state: &mut State, seq: u64, write: &Arc<Write>) {
        let Some(log) = state.log.as_mut() else {
            return;
        };
        if log.last_read.elapsed() > FOLLOWER_IDLE {
            tracing::info!(
                "no follower read the follower log for {} s: dropped",
                FOLLOWER_IDLE.as_secs()
            );
            state.log = None;
            return;
        }
        debug_assert_eq!(log.start + log.writes.len() as u64, seq);
        log.bytes += write.bytes();
        log.writes.push_back(Arc::clone(write));
        let cap = self.log_cap.load(Ordering::Relaxed);
        // The newest write stays, whatever its size.
        while log.bytes > cap && log.writes.len() > 1 {
            let Some(old) = log.writes.pop_front() else {
                break;
            };
            log.bytes -= old.bytes();
            log.start += 1;
        }
        self.logged.send_replace(seq);
    }

    /// Primary: answers a follower's Follow. Snapshots the shard (holding
    /// writes for as long as that takes, as for a joining backup), starts
    /// the follower log if there is none, and streams the snapshot; the
    /// follower then tails the log from the snapshot's last write.
    pub async fn answer_follow(
        self: &Arc<Self>,
        shard_id: u32,
        num_shards: u32,
    ) -> Result<JoinStream, PsError> {
        let (mine, count) = (self.shard.shard_id(), self.shard.num_shards());
        if (shard_id, num_shards) != (mine, count) {
            return Err(PsError::FailedPrecondition(format!(
                "this is shard {mine} of {count}; a follower started as shard {shard_id} of {num_shards} cannot follow it"
            )));
        }
        let this = Arc::clone(self);
        let (bytes, seq, log) = tokio::task::spawn_blocking(move || this.snapshot_for_follower())
            .await
            .map_err(|e| PsError::Internal(format!("snapshot task failed: {e}")))??;
        // A follower that stops reading holds nothing: the log outlives it.
        Ok(stream_snapshot(bytes, (seq, log, 0), async {}))
    }

    fn snapshot_for_follower(&self) -> Result<(Vec<u8>, u64, u64), PsError> {
        let _exclusive = self.order.write().unwrap_or_else(|p| p.into_inner());
        if let Some(err) = self.refusal(&lock(&self.state)) {
            return Err(err);
        }
        let bytes = self.encoded_snapshot()?;
        let mut state = lock(&self.state);
        let next = state.next_seq;
        let log = state.log.get_or_insert_with(|| {
            tracing::info!("a follower joined: writes are applied in order and logged for it");
            FollowerLog {
                id: random_id(),
                start: next,
                writes: VecDeque::new(),
                bytes: 0,
                last_read: Instant::now(),
            }
        });
        log.last_read = Instant::now();
        Ok((bytes, next - 1, log.id))
    }

    /// Primary: the writes of log `log` after `after`, waiting up to
    /// `wait` (at most a second) for one when there is none yet.
    /// OUT_OF_RANGE when the log is not here (a restarted primary, or one
    /// idle past [`FOLLOWER_IDLE`]) or no longer holds `after + 1`.
    pub async fn answer_tail(
        &self,
        log: u64,
        after: u64,
        wait: Duration,
    ) -> Result<Tailed, PsError> {
        let mut logged = self.logged.subscribe();
        let arrived = tokio::time::Instant::now();
        let deadline = tokio::time::Instant::now() + wait.min(MAX_TAIL_WAIT);
        loop {
            logged.borrow_and_update();
            {
                let mut state = lock(&self.state);
                if let Some(err) = self.refusal(&state) {
                    return Err(err);
                }
                let newest = state.next_seq - 1;
                let Some(held) = state.log.as_mut().filter(|l| l.id == log) else {
                    return Err(PsError::OutOfRange(format!(
                        "this primary holds no follower log {log:x} (it restarted, or no follower read it for {} s): follow again from a snapshot",
                        FOLLOWER_IDLE.as_secs()
                    )));
                };
                held.last_read = Instant::now();
                let next = after.saturating_add(1);
                if next < held.start {
                    return Err(PsError::OutOfRange(format!(
                        "the follower log starts at write {}, after this follower's {after} (it fell more than --follower-log-bytes behind): follow again from a snapshot",
                        held.start
                    )));
                }
                if after < newest {
                    let skip = usize::try_from(next - held.start).unwrap_or(usize::MAX);
                    let mut bytes = 0;
                    let writes = held
                        .writes
                        .iter()
                        .skip(skip)
                        .take(MAX_TAIL_WRITES)
                        .take_while(|w| {
                            let first = bytes == 0;
                            bytes += w.bytes();
                            first || bytes <= MAX_TAIL_BYTES
                        })
                        .cloned()
                        .collect();
                    return Ok(Tailed {
                        first_seq: next,
                        writes,
                        newest,
                        held: arrived.elapsed(),
                    });
                }
                if tokio::time::Instant::now() >= deadline {
                    return Ok(Tailed {
                        first_seq: next,
                        writes: Vec::new(),
                        newest,
                        held: arrived.elapsed(),
                    });
                }
            }
            if tokio::time::timeout_at(deadline, logged.changed())
                .await
                .is_ok_and(|r| r.is_err())
            {
                return Err(PsError::Internal("replication state dropped".into()));
            }
        }
    }

    /// Follower: loads a fresh snapshot from `primary`; returns the number
    /// of its last write, its size in bytes and the log to tail.
    pub async fn follow_snapshot(&self, primary: &str) -> Result<(u64, usize, u64), PsError> {
        let mut client = self.peer_client(primary)?;
        let mut request = tonic::Request::new(pb::FollowRequest {
            shard_id: self.shard.shard_id(),
            num_shards: self.shard.num_shards(),
        });
        self.peer.auth.attach_peer(&mut request);
        let failed = |s: tonic::Status| match s.code() {
            tonic::Code::PermissionDenied
            | tonic::Code::Unauthenticated
            | tonic::Code::FailedPrecondition => {
                PsError::FailedPrecondition(format!("Follow {primary}: {}", s.message()))
            }
            _ => PsError::Unavailable(format!("Follow {primary}: {}", s.message())),
        };
        let chunks = client.follow(request).await.map_err(failed)?.into_inner();
        let (seq, bytes) = self.receive_snapshot(chunks, primary, failed).await?;
        let log = lock(&self.state).following.as_ref().map_or(0, |f| f.stream);
        self.mark_fresh(Instant::now());
        Ok((seq, bytes, log))
    }

    /// Follower: asks `primary` for the writes of `log` after `after`.
    pub async fn tail(
        &self,
        primary: &str,
        log: u64,
        after: u64,
        wait: Duration,
    ) -> Result<pb::TailResponse, tonic::Status> {
        let mut client = self
            .peer_client(primary)
            .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
        let mut request = tonic::Request::new(pb::TailRequest {
            log,
            after,
            wait_ms: wait.as_millis().min(u128::from(u32::MAX)) as u32,
        });
        self.peer.auth.attach_peer(&mut request);
        request.set_timeout(wait + Duration::from_secs(5));
        client.tail(request).await.map(tonic::Response::into_inner)
    }

    /// The number of the last write applied here (a backup or follower:
    /// of its primary's stream).
    pub fn applied_through(&self) -> u64 {
        lock(&self.state).next_seq - 1
    }

    /// Follower: it held every write its primary had applied at `at`.
    pub fn mark_fresh(&self, at: Instant) {
        let mut state = lock(&self.state);
        if state.role == Role::Follower {
            state.fresh_at = Some(state.fresh_at.map_or(at, |was| was.max(at)));
        }
    }

    /// Follower: how stale its rows may be: it held every write its
    /// primary had applied this long ago (`None` before its first
    /// snapshot, and on other roles).
    pub fn lag(&self) -> Option<Duration> {
        Self::lag_of(&lock(&self.state))
    }

    pub(super) fn lag_of(state: &State) -> Option<Duration> {
        (state.role == Role::Follower)
            .then(|| state.fresh_at.map(|at| at.elapsed()))
            .flatten()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

    use super::*;
    use crate::metrics::ShardCounters;
    use crate::replication::Peer;
    use crate::store::Shard;
    use crate::writer::Writer;
    use ps_common::{InitializerSpec, OptimizerSpec, TableKind, TableSpec};

    fn table(name: &str) -> Arc<Write> {
        Arc::new(Write::CreateTable(TableSpec {
            name: name.into(),
            kind: TableKind::Sparse,
            dim: 4,
            initializer: InitializerSpec::Zeros,
            optimizer: OptimizerSpec::sgd(1.0),
            seed: 0,
            lifecycle: Default::default(),
        }))
    }

    #[tokio::test]
    async fn the_log_keeps_writes_in_order_and_a_follower_left_behind_its_cap_must_start_again() {
        let shard = Arc::new(Shard::new(0, 1));
        let primary = Replication::new(Arc::clone(&shard), Role::Primary, Peer::default());
        let writer = Writer::new(
            shard,
            Arc::clone(&primary),
            Arc::new(ShardCounters::default()),
        );
        writer.write(table("before")).unwrap();
        let (_, through, log) = primary.snapshot_for_follower().unwrap();
        assert_eq!(through, 1, "the snapshot holds the write before it");
        for name in ["a", "b"] {
            writer.write(table(name)).unwrap();
        }
        let tailed = primary.answer_tail(log, 1, Duration::ZERO).await.unwrap();
        assert_eq!(
            (tailed.first_seq, tailed.writes.len(), tailed.newest),
            (2, 2, 3)
        );
        assert!(matches!(&*tailed.writes[1], Write::CreateTable(s) if s.name == "b"));
        // Caught up: the call waits for a write, then answers nothing new.
        let idle = primary
            .answer_tail(log, 3, Duration::from_millis(20))
            .await
            .unwrap();
        assert!(idle.writes.is_empty() && idle.held >= Duration::from_millis(20));
        // A log over its cap drops its oldest writes: a follower that still
        // needs them is told to start again; the primary never waited.
        primary.set_follower_log_bytes(1);
        writer.write(table("c")).unwrap();
        let err = primary
            .answer_tail(log, 1, Duration::ZERO)
            .await
            .unwrap_err();
        assert!(matches!(err, PsError::OutOfRange(_)), "{err}");
        let latest = primary.answer_tail(log, 3, Duration::ZERO).await.unwrap();
        assert_eq!((latest.first_seq, latest.writes.len()), (4, 1));
        let unknown = primary
            .answer_tail(log ^ 1, 3, Duration::ZERO)
            .await
            .unwrap_err();
        assert!(matches!(unknown, PsError::OutOfRange(_)), "{unknown}");
    }
}
