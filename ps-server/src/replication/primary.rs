//! The primary's side: who may join, the join answer, the forwarder that
//! streams writes to the backup, the lease it grants, and dropping a
//! backup that stopped answering.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ps_common::PsError;
use ps_common::pb::{self, parameter_server_client::ParameterServerClient};
use tonic::transport::Channel;

use super::{
    Attached, BACKUP_TIMEOUT, HEARTBEAT, JoinSnapshot, PRIMARY_HOLD, Replication, lock, random_id,
};

/// Most writes sent in one Replicate call.
const MAX_BATCH: usize = 256;
/// Bytes per Join chunk.
const CHUNK_BYTES: usize = 4 << 20;
/// How long a joining backup may leave a chunk of its snapshot unread
/// before the primary gives the join up (and frees the snapshot).
const JOIN_STALL: Duration = Duration::from_secs(10);
/// How long the primary waits for the joining server to answer Describe.
const JOIN_PROBE: Duration = Duration::from_secs(2);

/// The stream of a Join answer.
pub type JoinStream = std::pin::Pin<
    Box<
        dyn tonic::codegen::tokio_stream::Stream<Item = Result<pb::JoinChunk, tonic::Status>>
            + Send,
    >,
>;

/// A server asking to become this primary's backup, as its Join said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Joiner {
    /// Where the primary reaches it.
    pub addr: String,
    /// The shard it was started as.
    pub shard_id: u32,
    /// The shard count it was started with.
    pub num_shards: u32,
    /// Its Describe.server_id.
    pub server_id: u64,
}

impl TryFrom<pb::JoinRequest> for Joiner {
    type Error = PsError;

    fn try_from(request: pb::JoinRequest) -> Result<Joiner, PsError> {
        if request.addr.is_empty() || request.addr.len() > 1024 {
            return Err(PsError::invalid(
                "Join needs the backup's address (1-1024 bytes)",
            ));
        }
        if request.server_id == 0 {
            return Err(PsError::invalid("Join needs the backup's server_id"));
        }
        Ok(Joiner {
            addr: request.addr,
            shard_id: request.shard_id,
            num_shards: request.num_shards,
            server_id: request.server_id,
        })
    }
}

/// How an attached backup ended.
enum Ending {
    /// It stopped answering: drop it once its lease has surely run out.
    Failed(String),
    /// It never got far enough to hold a lease (a join given up).
    Abandoned(String),
}

impl Replication {
    /// Primary: answers `joiner`'s Join. Refuses a joiner of another shard,
    /// one that arrives while a backup is attached (a live backup is never
    /// displaced; a replacement joins once the primary has dropped it), and
    /// one whose address does not answer as a backup of this shard with its
    /// id (a mistyped address, this server's own). Then snapshots the shard
    /// and streams it; writes follow as Replicate calls on a new stream.
    pub async fn answer_join(self: &Arc<Self>, joiner: Joiner) -> Result<JoinStream, PsError> {
        let (shard_id, num_shards) = (self.shard.shard_id(), self.shard.num_shards());
        if (joiner.shard_id, joiner.num_shards) != (shard_id, num_shards) {
            return Err(PsError::FailedPrecondition(format!(
                "this is shard {shard_id} of {num_shards}; a backup started as shard {} of {} cannot join it",
                joiner.shard_id, joiner.num_shards
            )));
        }
        self.check_free_for(&joiner)?;
        match self.describe_peer(&joiner.addr, JOIN_PROBE).await {
            Some(d)
                if d.role == "backup"
                    && d.server_id == joiner.server_id
                    && (d.shard_id, d.num_shards) == (shard_id, num_shards) => {}
            Some(d) => {
                return Err(PsError::FailedPrecondition(format!(
                    "{} answers as a {} of shard {} of {} with id {:x}, not as the backup that asked to join (id {:x})",
                    joiner.addr, d.role, d.shard_id, d.num_shards, d.server_id, joiner.server_id
                )));
            }
            None => {
                return Err(PsError::FailedPrecondition(format!(
                    "{} does not answer: a backup must be reachable at the address it joins with (--advertise)",
                    joiner.addr
                )));
            }
        }
        let this = Arc::clone(self);
        let addr = joiner.addr.clone();
        let (bytes, seq, stream, generation) =
            tokio::task::spawn_blocking(move || this.attach(&joiner))
                .await
                .map_err(|e| PsError::Internal(format!("snapshot task failed: {e}")))??;
        tokio::spawn(Arc::clone(self).forward(addr, generation));
        let this = Arc::clone(self);
        let epoch = self.epoch();
        Ok(stream_snapshot(bytes, (seq, stream, epoch), async move {
            this.end_backup(
                generation,
                Ending::Abandoned("the joining backup stopped reading its snapshot".into()),
            )
            .await;
        }))
    }

    /// Refuses a join on a server that is not a serving primary, or that
    /// already has a backup.
    fn check_free_for(&self, joiner: &Joiner) -> Result<(), PsError> {
        let state = lock(&self.state);
        if let Some(err) = self.refusal(&state) {
            return Err(err);
        }
        if let Some(backup) = &state.backup {
            return Err(PsError::FailedPrecondition(format!(
                "shard {} already replicates to backup {}; {} can join once that one is dropped",
                self.shard.shard_id(),
                backup.addr,
                joiner.addr
            )));
        }
        Ok(())
    }

    /// Attaches `joiner` and returns the snapshot it starts from, encoded,
    /// with the number of the last write it holds, its stream and the
    /// generation to forward. Runs store work: call it on a blocking thread.
    fn attach(&self, joiner: &Joiner) -> Result<(Vec<u8>, u64, u64, u64), PsError> {
        let _exclusive = self.order.write().unwrap_or_else(|p| p.into_inner());
        self.check_free_for(joiner)?;
        let bytes = self.encoded_snapshot()?;
        let mut state = lock(&self.state);
        state.generation += 1;
        let stream = random_id();
        state.backup = Some(Attached {
            addr: joiner.addr.clone(),
            server_id: joiner.server_id,
            stream,
            generation: state.generation,
            granted: None,
            dropping: false,
        });
        state.queue.clear();
        tracing::info!(backup = %joiner.addr, through = state.next_seq - 1, bytes = bytes.len(), "backup attached");
        Ok((bytes, state.next_seq - 1, stream, state.generation))
    }

    /// The shard and its applied pushes, encoded for a joining backup or
    /// follower. The caller holds the order lock exclusively.
    pub(super) fn encoded_snapshot(&self) -> Result<Vec<u8>, PsError> {
        let snapshot = JoinSnapshot {
            shard: self.shard.snapshot()?,
            writers: self.applied.snapshot(),
        };
        bincode::serde::encode_to_vec(&snapshot, bincode::config::standard())
            .map_err(|e| PsError::Internal(format!("cannot encode the snapshot: {e}")))
    }

    /// Primary: the backup on `stream` renews its lease. Granted while this
    /// primary serves and replicates to that stream (and is not dropping
    /// it); a grant holds this primary to its backup for [`PRIMARY_HOLD`].
    pub fn grant_lease(&self, stream: u64) -> bool {
        let mut state = lock(&self.state);
        if self.refusal(&state).is_some() {
            return false;
        }
        match &mut state.backup {
            Some(backup) if backup.stream == stream && !backup.dropping => {
                backup.granted = Some(Instant::now());
                true
            }
            _ => false,
        }
    }

    /// Primary: sends queued writes to the backup at `addr` until this
    /// generation ends: the backup is replaced, promoted (this primary is
    /// then deposed), or fails (it is dropped).
    pub async fn forward(self: Arc<Self>, addr: String, generation: u64) {
        let client = match self.peer_client(&addr) {
            Ok(client) => client,
            Err(e) => {
                self.end_backup(generation, Ending::Abandoned(e.to_string()))
                    .await;
                return;
            }
        };
        // The first call carries no write: it returns once the backup has
        // loaded the snapshot, which acknowledges the writes it holds.
        let mut first = true;
        // Coordinated: whether etcd names this backup standby yet.
        let mut recorded = false;
        loop {
            let (first_seq, entries, (stream, epoch, server_id)) = {
                let notified = self.queued.notified();
                let batch = {
                    let mut state = lock(&self.state);
                    let stream = match &state.backup {
                        Some(b) if b.generation == generation && !self.is_closed() => {
                            (b.stream, state.epoch, b.server_id)
                        }
                        _ => return,
                    };
                    let n = state.queue.len().min(MAX_BATCH);
                    let first_seq = state.queue.front().map_or(state.next_seq, |(seq, _)| *seq);
                    (
                        first_seq,
                        state.queue.drain(..n).map(|(_, w)| w).collect::<Vec<_>>(),
                        stream,
                    )
                };
                if batch.1.is_empty() && !first {
                    // Idle: wait for writes, but check on the backup every
                    // HEARTBEAT (an empty call), so a promotion or a dead
                    // backup is noticed without a write.
                    if tokio::time::timeout(HEARTBEAT, notified).await.is_ok() {
                        continue;
                    }
                }
                batch
            };
            let catching_up = std::mem::replace(&mut first, false);
            let request = pb::ReplicateRequest {
                first_seq,
                entries: entries.iter().map(|w| w.to_entry()).collect(),
                stream,
                epoch,
            };
            match self.send(&client, request, catching_up).await {
                Ok(answer) if answer.promoted => {
                    self.depose(generation, &addr);
                    return;
                }
                Ok(answer) => {
                    self.replicated.send_if_modified(|r| {
                        let grew = answer.applied_through > *r;
                        *r = (*r).max(answer.applied_through);
                        grew
                    });
                    if !recorded && let Some(standbys) = self.standbys.get() {
                        // The backup holds every write acknowledged so far
                        // and every later one waits for it: record it as
                        // the standby. Inline, so a later drop (by this
                        // same task) always comes after the record.
                        match standbys.caught_up(addr.clone(), server_id).await {
                            Ok(true) => {
                                recorded = true;
                                tracing::info!(standby = %addr, "recorded as the shard's standby");
                            }
                            Ok(false) => {
                                recorded = true;
                                tracing::warn!(standby = %addr, "not recorded as standby: this server no longer holds the shard");
                            }
                            Err(e) => {
                                tracing::warn!(standby = %addr, "cannot record the standby yet: {e}")
                            }
                        }
                    }
                }
                Err(status) => {
                    self.end_backup(generation, Ending::Failed(status.message().to_string()))
                        .await;
                    return;
                }
            }
        }
    }

    /// This primary's backup (of `generation`) was promoted: stop serving.
    fn depose(&self, generation: u64, addr: &str) {
        let mut state = lock(&self.state);
        if state.generation != generation {
            return;
        }
        let why = format!(
            "this server is no longer the primary of shard {}: its backup {addr} was promoted",
            self.shard.shard_id()
        );
        tracing::error!("{why}");
        state.deposed = Some(why);
        state.backup = None;
        state.queue.clear();
        state.generation += 1;
        self.role_changed(&state);
        drop(state);
        self.replicated.send_modify(|_| {});
    }

    /// Sends one batch, retrying failures for up to [`BACKUP_TIMEOUT`] (see
    /// [`Retries`]). The first call of a backup (`catching_up`) may wait
    /// while it loads its snapshot; later ones get [`BACKUP_TIMEOUT`] each,
    /// so a hung backup fails after about twice that.
    async fn send(
        &self,
        client: &ParameterServerClient<Channel>,
        request: pb::ReplicateRequest,
        catching_up: bool,
    ) -> Result<pb::ReplicateResponse, tonic::Status> {
        let mut retries = Retries::new(tokio::time::Instant::now(), BACKUP_TIMEOUT);
        loop {
            let mut call = tonic::Request::new(request.clone());
            self.peer.auth.attach_peer(&mut call);
            // A backup still loading its snapshot holds the first call.
            call.set_timeout(if catching_up {
                BACKUP_TIMEOUT * 10
            } else {
                BACKUP_TIMEOUT
            });
            match client.clone().replicate(call).await {
                Ok(answer) => return Ok(answer.into_inner()),
                Err(_) if retries.failed(tokio::time::Instant::now(), self.backup_leased()) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(status) => return Err(status),
            }
        }
    }

    /// Whether the attached backup was ever granted a lease.
    fn backup_leased(&self) -> bool {
        lock(&self.state)
            .backup
            .as_ref()
            .is_some_and(|b| b.granted.is_some())
    }

    /// Stops replicating to the backup of `generation`. A backup that held
    /// a lease is first refused further grants and waited out until
    /// [`PRIMARY_HOLD`] after the last one, so it can no longer be promoted
    /// when this primary acknowledges its queued writes alone.
    async fn end_backup(&self, generation: u64, ending: Ending) {
        let (why, hold_until) = {
            let mut state = lock(&self.state);
            let Some(backup) = state.backup.as_mut().filter(|b| b.generation == generation) else {
                return;
            };
            backup.dropping = true;
            match ending {
                Ending::Failed(why) => (why, backup.granted.map(|at| at + PRIMARY_HOLD)),
                Ending::Abandoned(why) => (why, None),
            }
        };
        if let Some(standbys) = self.standbys.get() {
            // Coordinated: the backup can be promoted only while etcd names
            // it standby; remove it there before acknowledging alone. If
            // etcd cannot be reached, writes stall, then the fence stops
            // them and another server may be promoted.
            tracing::warn!(
                "backup failing ({why}); removing it as standby before acknowledging alone"
            );
            loop {
                match standbys.dropped().await {
                    Ok(true) => break,
                    Ok(false) => {
                        tracing::error!(
                            "this server no longer holds its shard in etcd; not acknowledging alone"
                        );
                        return;
                    }
                    Err(e) if !self.is_closed() => {
                        tracing::warn!("cannot remove the standby yet: {e}");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    Err(_) => return,
                }
            }
        } else if let Some(until) = hold_until {
            tracing::warn!(
                "backup failing ({why}); acknowledging writes alone once its lease has run out"
            );
            tokio::time::sleep_until(tokio::time::Instant::from_std(until)).await;
        }
        let _exclusive = self.order.write().unwrap_or_else(|p| p.into_inner());
        let mut state = lock(&self.state);
        if state.generation != generation {
            return;
        }
        tracing::error!(backup = ?state.backup.as_ref().map(|b| &b.addr), "backup dropped, serving without a replica: {why}");
        state.backup = None;
        state.queue.clear();
        state.generation += 1;
        self.replicated.send_replace(state.next_seq - 1);
    }
}

/// When the primary stops retrying a Replicate call: once `timeout` has
/// passed since the first attempt, and, for a backup this primary has
/// granted a lease, once at least two attempts failed.
///
/// For a leased backup one failure is never enough, however late it comes.
/// A primary whose process was stalled (stopped, swapped out) past the
/// timeout finds its in-flight call timed out as it wakes; meanwhile its
/// backup may have been promoted. Dropping the backup then would leave two
/// primaries; the second attempt is answered `promoted`, and the primary
/// deposes itself. A backup never granted a lease cannot have been
/// promoted: its first failure past the deadline drops it.
#[derive(Debug)]
struct Retries {
    deadline: tokio::time::Instant,
    failures: u32,
}

impl Retries {
    fn new(now: tokio::time::Instant, timeout: Duration) -> Retries {
        Retries {
            deadline: now + timeout,
            failures: 0,
        }
    }

    /// Counts a failed attempt (at `now`, to a backup that holds or held a
    /// lease if `leased`): whether to try again.
    fn failed(&mut self, now: tokio::time::Instant, leased: bool) -> bool {
        self.failures += 1;
        now < self.deadline || (leased && self.failures < 2)
    }
}

/// Streams a snapshot (`bytes`, through write `seq`, for `stream`) as
/// Join chunks, at most two ahead of the reader; a reader that leaves a
/// chunk unread for [`JOIN_STALL`] is given up, and `stalled` runs.
pub(super) fn stream_snapshot(
    bytes: Vec<u8>,
    (seq, stream, epoch): (u64, u64, u64),
    stalled: impl std::future::Future<Output = ()> + Send + 'static,
) -> JoinStream {
    let (sender, receiver) = tokio::sync::mpsc::channel(2);
    tokio::spawn(async move {
        for chunk in join_chunks(bytes, seq, stream, epoch) {
            let sent = tokio::time::timeout(JOIN_STALL, sender.send(Ok(chunk))).await;
            if !matches!(sent, Ok(Ok(()))) {
                stalled.await;
                return;
            }
        }
    });
    Box::pin(tonic::codegen::tokio_stream::wrappers::ReceiverStream::new(
        receiver,
    ))
}

/// A primary's answer to Join, cut into chunks.
fn join_chunks(bytes: Vec<u8>, seq: u64, stream: u64, epoch: u64) -> Vec<pb::JoinChunk> {
    let bytes = bytes::Bytes::from(bytes);
    let n = bytes.len().div_ceil(CHUNK_BYTES).max(1);
    (0..n)
        .map(|i| pb::JoinChunk {
            data: bytes.slice(i * CHUNK_BYTES..((i + 1) * CHUNK_BYTES).min(bytes.len())),
            seq,
            last: i + 1 == n,
            stream,
            epoch,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_retried_until_the_timeout() {
        let start = tokio::time::Instant::now();
        for leased in [false, true] {
            let mut retries = Retries::new(start, BACKUP_TIMEOUT);
            assert!(retries.failed(start + Duration::from_millis(10), leased));
            assert!(retries.failed(start + Duration::from_millis(60), leased));
            let late = start + BACKUP_TIMEOUT - Duration::from_millis(1);
            assert!(retries.failed(late, leased));
            assert!(!retries.failed(start + BACKUP_TIMEOUT, leased));
        }
    }

    #[test]
    fn a_leased_backup_s_first_failure_past_the_timeout_is_tried_once_more() {
        // The process stalled for 10 s with a call in flight: as it wakes
        // the call has timed out, long past the deadline.
        let start = tokio::time::Instant::now();
        let mut retries = Retries::new(start, BACKUP_TIMEOUT);
        let woke = start + Duration::from_secs(10);
        assert!(
            retries.failed(woke, true),
            "the first late failure is retried"
        );
        assert!(
            !retries.failed(woke + Duration::from_millis(50), true),
            "a second failure past the deadline gives up"
        );
    }

    /// A snapshot of four chunks (two wait in the channel), read no further
    /// than its first: the stream is given up once a chunk has waited
    /// [`JOIN_STALL`], not before, and one read to the end is never given up.
    #[tokio::test(start_paused = true)]
    async fn a_snapshot_left_unread_is_given_up_after_the_join_stall() {
        use std::sync::atomic::{AtomicBool, Ordering};
        use tonic::codegen::tokio_stream::StreamExt;
        let bytes = vec![7u8; 3 * CHUNK_BYTES + 1];
        let stalled = |flag: Arc<AtomicBool>| async move {
            flag.store(true, Ordering::SeqCst);
        };
        let given_up = Arc::new(AtomicBool::new(false));
        let mut unread = stream_snapshot(bytes.clone(), (1, 2, 3), stalled(Arc::clone(&given_up)));
        let first = unread
            .next()
            .await
            .expect("a first chunk")
            .expect("no error");
        assert_eq!((first.data.len(), first.last), (CHUNK_BYTES, false));
        tokio::time::sleep(JOIN_STALL - Duration::from_millis(100)).await;
        assert!(!given_up.load(Ordering::SeqCst), "not before the stall");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(given_up.load(Ordering::SeqCst), "given up after it");

        let read_through = Arc::new(AtomicBool::new(false));
        let chunks: Vec<_> = stream_snapshot(bytes, (1, 2, 3), stalled(Arc::clone(&read_through)))
            .collect()
            .await;
        tokio::time::sleep(JOIN_STALL * 2).await;
        assert_eq!(chunks.len(), 4);
        assert!(
            chunks
                .last()
                .and_then(|c| c.as_ref().ok())
                .is_some_and(|c| c.last)
        );
        assert!(!read_through.load(Ordering::SeqCst));
    }

    #[test]
    fn a_backup_never_leased_is_given_up_at_its_first_late_failure() {
        // A joining backup that never renewed cannot have been promoted.
        let start = tokio::time::Instant::now();
        let mut retries = Retries::new(start, BACKUP_TIMEOUT);
        assert!(!retries.failed(start + BACKUP_TIMEOUT * 10, false));
    }
}
