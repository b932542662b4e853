//! Primary-backup replication of one shard: the role a server plays, the
//! order of its writes, and the stream of those writes to its backup.
//!
//! A **primary** numbers every write (table creation, push, assign) as it
//! applies it. With a backup attached, writes are applied one at a time in
//! that order and queued; a forwarder task sends the queue to the backup in
//! `Replicate` calls, and a write is acknowledged to its worker only once
//! the backup has applied it ([`Replication::acknowledged`]). With no backup
//! attached, writes run concurrently and are acknowledged at once.
//!
//! A **backup** serves nothing to workers. It first loads a snapshot from
//! the primary (`Join`), then applies the primary's writes strictly in
//! order. A worker that finds the primary dead calls `Promote` on the
//! backup, which becomes primary and from then on refuses `Replicate`: an
//! old primary that is still alive learns from that refusal that it was
//! replaced and stops serving (it is *deposed*), so no worker can be
//! acknowledged by two primaries.
//!
//! If the backup stops answering for [`BACKUP_TIMEOUT`], the primary drops
//! it and serves alone (acknowledging what it had queued); a replacement
//! joins with `ps-server --join PRIMARY`. An idle primary sends an empty
//! `Replicate` every [`HEARTBEAT`], so it notices a promoted or dead backup
//! without waiting for a write.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use ps_common::PsError;
use ps_common::pb::parameter_server_client::ParameterServerClient;
use ps_common::pb::{self, ReplicaEntry};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};
use tonic::transport::{Channel, ClientTlsConfig};

use crate::auth::Auth;
use crate::dedup::WriterRecord;
use crate::store::{Shard, ShardSnapshot};

/// How long a primary keeps retrying an unresponsive backup before it
/// drops it and serves alone.
pub const BACKUP_TIMEOUT: Duration = Duration::from_secs(3);
/// How often an idle primary checks on its backup.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// Most writes sent in one Replicate call.
const MAX_BATCH: usize = 256;
/// Bytes per Join chunk.
const CHUNK_BYTES: usize = 4 << 20;

/// The part a server plays for its shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Serves workers; replicates to its backup, if any.
    Primary,
    /// Applies the primary's writes; serves workers once promoted.
    Backup,
}

impl Role {
    /// `"primary"` or `"backup"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Backup => "backup",
        }
    }
}

#[derive(Debug)]
struct State {
    role: Role,
    /// Why this primary stopped serving: its backup was promoted.
    deposed: Option<String>,
    /// Primary: the number the next write gets. Backup: the number of the
    /// next write it expects.
    next_seq: u64,
    /// The backup this primary replicates to.
    backup: Option<String>,
    /// Bumped whenever a backup is attached or dropped; a forwarder of an
    /// older generation stops.
    generation: u64,
    /// Writes applied here and not yet sent to the backup.
    queue: VecDeque<(u64, ReplicaEntry)>,
    /// Backup: the primary's snapshot is loaded.
    caught_up: bool,
}

/// What a joining backup receives: the shard and its applied pushes.
#[derive(Debug, Serialize, Deserialize)]
struct JoinSnapshot {
    shard: ShardSnapshot,
    writers: Vec<(u64, WriterRecord)>,
}

/// One write's outcome, as [`Replication::write`] hands it back.
#[derive(Debug)]
pub enum Write<T> {
    /// Applied now: it is replicated.
    Fresh(T),
    /// Applied before, by write number `.1`: acknowledged once that write is
    /// on the backup, not replicated again.
    Repeat(T, u64),
}

/// How a server reaches its peer (the primary it joins, or its backup).
#[derive(Debug, Clone, Default)]
pub struct Peer {
    /// The token sent to the peer.
    pub auth: Auth,
    /// TLS towards the peer (`None`: plain TCP).
    pub tls: Option<ClientTlsConfig>,
}

/// The replication state of one shard server.
#[derive(Debug)]
pub struct Replication {
    shard: Arc<Shard>,
    /// Writes hold it shared while no backup is attached and exclusively
    /// while one is (so they are applied and queued in one order); a
    /// snapshot for a joining backup holds it exclusively.
    order: RwLock<()>,
    state: Mutex<State>,
    /// Every write numbered at or below this is on the backup (or was
    /// acknowledged while there was none).
    replicated: watch::Sender<u64>,
    /// Wakes the forwarder when the queue grows.
    queued: Notify,
    /// Backup: set once the primary's snapshot is loaded.
    caught_up: watch::Sender<bool>,
    /// How to reach the peer.
    peer: Peer,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Replication {
    /// The state of a server starting as `role` for `shard`, reaching its
    /// peer as `peer` says.
    pub fn new(shard: Arc<Shard>, role: Role, peer: Peer) -> Arc<Replication> {
        Arc::new(Replication {
            shard,
            order: RwLock::new(()),
            state: Mutex::new(State {
                role,
                deposed: None,
                next_seq: 1,
                backup: None,
                generation: 0,
                queue: VecDeque::new(),
                caught_up: role == Role::Primary,
            }),
            replicated: watch::Sender::new(0),
            queued: Notify::new(),
            caught_up: watch::Sender::new(role == Role::Primary),
            peer,
        })
    }

    /// The role now (`"primary"`, `"backup"`, or `"deposed"` for a primary
    /// that was replaced), and the backup replicated to (primary).
    pub fn describe(&self) -> (&'static str, Option<String>) {
        let state = lock(&self.state);
        let role = match (state.role, &state.deposed) {
            (_, Some(_)) => "deposed",
            (role, None) => role.as_str(),
        };
        (role, state.backup.clone())
    }

    fn refusal(&self, state: &State) -> Option<PsError> {
        if let Some(why) = &state.deposed {
            return Some(PsError::Unavailable(why.clone()));
        }
        (state.role == Role::Backup).then(|| {
            PsError::Unavailable(format!(
                "this server is the backup of shard {}: it serves workers only after Promote",
                self.shard.shard_id()
            ))
        })
    }

    /// Whether this server may serve workers: a backup and a deposed
    /// primary refuse with UNAVAILABLE (a client then tries the other replica).
    pub fn check_serving(&self) -> Result<(), PsError> {
        match self.refusal(&lock(&self.state)) {
            Some(err) => Err(err),
            None => Ok(()),
        }
    }

    /// Applies one write on a primary. `apply` gets the write's number; a
    /// fresh write is queued for the backup as `entry()`. Returns the
    /// outcome and the number to pass to [`Replication::acknowledged`].
    /// Runs store work: call it on a blocking thread.
    pub fn write<T>(
        &self,
        apply: impl FnOnce(u64) -> Result<Write<T>, PsError>,
        entry: impl FnOnce() -> ReplicaEntry,
    ) -> Result<(T, u64), PsError> {
        {
            let _shared = self.order.read().unwrap_or_else(|p| p.into_inner());
            let (replicating, seq) = {
                let mut state = lock(&self.state);
                if let Some(err) = self.refusal(&state) {
                    return Err(err);
                }
                if state.backup.is_none() {
                    // Numbers stay increasing so a backup joining later
                    // compares them with its own; nothing waits on them.
                    let seq = state.next_seq;
                    state.next_seq += 1;
                    (false, seq)
                } else {
                    (true, 0)
                }
            };
            if !replicating {
                return match apply(seq)? {
                    Write::Fresh(value) | Write::Repeat(value, _) => Ok((value, 0)),
                };
            }
        }
        let _exclusive = self.order.write().unwrap_or_else(|p| p.into_inner());
        let mut state = lock(&self.state);
        if let Some(err) = self.refusal(&state) {
            return Err(err);
        }
        let seq = state.next_seq;
        match apply(seq)? {
            Write::Fresh(value) => {
                state.next_seq += 1;
                if state.backup.is_some() {
                    state.queue.push_back((seq, entry()));
                    self.queued.notify_one();
                    Ok((value, seq))
                } else {
                    Ok((value, 0))
                }
            }
            Write::Repeat(value, earlier) => Ok((value, earlier)),
        }
    }

    /// Waits until write `seq` is on the backup (at once for 0, or when
    /// there is no backup). Fails if this primary is deposed meanwhile.
    pub async fn acknowledged(&self, seq: u64) -> Result<(), PsError> {
        let mut replicated = self.replicated.subscribe();
        loop {
            if let Some(why) = &lock(&self.state).deposed {
                return Err(PsError::Unavailable(format!(
                    "{why}; the write may not have been replicated: retry it on the new primary"
                )));
            }
            if *replicated.borrow_and_update() >= seq {
                return Ok(());
            }
            if replicated.changed().await.is_err() {
                return Err(PsError::Internal("replication state dropped".into()));
            }
        }
    }

    /// Backup: waits (at most `timeout`) until the primary's snapshot is loaded.
    pub async fn wait_caught_up(&self, timeout: Duration) -> Result<(), PsError> {
        let mut caught_up = self.caught_up.subscribe();
        tokio::time::timeout(timeout, caught_up.wait_for(|&ready| ready))
            .await
            .map_err(|_| {
                PsError::Unavailable("this backup is still loading the primary's snapshot".into())
            })?
            .map(drop)
            .map_err(|_| PsError::Internal("replication state dropped".into()))
    }

    /// Backup: applies the writes numbered `first_seq..first_seq + n` in
    /// order with `apply(index, seq)`, skipping any it has already applied
    /// (a resent batch). Returns the last number applied. A call reaching a
    /// promoted server is refused with FAILED_PRECONDITION (the primary was
    /// replaced), a gap with INTERNAL (the primary drops this backup).
    pub fn apply_replicated(
        &self,
        first_seq: u64,
        n: usize,
        mut apply: impl FnMut(usize, u64) -> Result<(), PsError>,
    ) -> Result<u64, PsError> {
        let _exclusive = self.order.write().unwrap_or_else(|p| p.into_inner());
        let mut state = lock(&self.state);
        if state.role != Role::Backup {
            return Err(PsError::FailedPrecondition(format!(
                "this server was promoted to primary of shard {}: it no longer accepts Replicate",
                self.shard.shard_id()
            )));
        }
        if first_seq > state.next_seq {
            // Not FAILED_PRECONDITION: that tells a primary it was replaced.
            return Err(PsError::Internal(format!(
                "replication gap: expected write {}, got {first_seq}",
                state.next_seq
            )));
        }
        for (i, seq) in (first_seq..).take(n).enumerate() {
            if seq < state.next_seq {
                continue;
            }
            apply(i, seq)?;
            state.next_seq = seq + 1;
        }
        Ok(state.next_seq - 1)
    }

    /// Makes this server primary. Returns whether it was a backup. A
    /// backup that has not loaded the primary's snapshot refuses: promoting
    /// it would lose the shard's data.
    pub fn promote(&self) -> Result<bool, PsError> {
        let _exclusive = self.order.write().unwrap_or_else(|p| p.into_inner());
        let mut state = lock(&self.state);
        if let Some(why) = &state.deposed {
            return Err(PsError::Unavailable(why.clone()));
        }
        if state.role == Role::Primary {
            return Ok(false);
        }
        if !state.caught_up {
            return Err(PsError::FailedPrecondition(
                "this backup has not loaded its primary's snapshot yet; promoting it would lose data"
                    .into(),
            ));
        }
        state.role = Role::Primary;
        self.replicated.send_replace(state.next_seq - 1);
        tracing::warn!(
            shard = self.shard.shard_id(),
            through = state.next_seq - 1,
            "promoted to primary"
        );
        Ok(true)
    }

    /// Primary: attaches the backup at `addr` (replacing any other) and
    /// returns the snapshot it starts from, encoded, with the number of the
    /// last write it holds. Start [`Replication::forward`] with the
    /// returned generation.
    pub fn attach(&self, addr: String) -> Result<(Vec<u8>, u64, u64), PsError> {
        let _exclusive = self.order.write().unwrap_or_else(|p| p.into_inner());
        let mut state = lock(&self.state);
        if let Some(err) = self.refusal(&state) {
            return Err(err);
        }
        let snapshot = JoinSnapshot {
            shard: self.shard.snapshot(),
            writers: self.shard.applied.snapshot(),
        };
        let bytes = bincode::serde::encode_to_vec(&snapshot, bincode::config::standard())
            .map_err(|e| PsError::Internal(format!("cannot encode the snapshot: {e}")))?;
        if let Some(old) = state.backup.replace(addr.clone()) {
            tracing::warn!(old = %old, new = %addr, "a new backup replaces the old one");
        }
        state.generation += 1;
        state.queue.clear();
        tracing::info!(backup = %addr, through = state.next_seq - 1, bytes = bytes.len(), "backup attached");
        Ok((bytes, state.next_seq - 1, state.generation))
    }

    /// Backup: loads a snapshot received from the primary.
    fn load(&self, bytes: &[u8], seq: u64) -> Result<(), PsError> {
        let (snapshot, _): (JoinSnapshot, usize) =
            bincode::serde::decode_from_slice(bytes, bincode::config::standard())
                .map_err(|e| PsError::invalid(format!("the primary's snapshot is corrupt: {e}")))?;
        let _exclusive = self.order.write().unwrap_or_else(|p| p.into_inner());
        let mut state = lock(&self.state);
        if state.role != Role::Backup {
            return Err(PsError::FailedPrecondition(
                "this server is already primary; it cannot join another".into(),
            ));
        }
        self.shard.load(snapshot.shard)?;
        self.shard.applied.restore(snapshot.writers);
        state.next_seq = seq + 1;
        state.caught_up = true;
        self.caught_up.send_replace(true);
        Ok(())
    }

    /// Backup: asks the primary at `primary` to replicate to `advertised`
    /// (this server's address as the primary reaches it), retrying until
    /// `timeout`, and loads its snapshot. Returns the number of the
    /// snapshot's last write and its size in bytes.
    pub async fn join(
        &self,
        primary: &str,
        advertised: &str,
        timeout: Duration,
    ) -> Result<(u64, usize), PsError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut backoff = Duration::from_millis(50);
        loop {
            match self.join_once(primary, advertised).await {
                Ok(joined) => return Ok(joined),
                Err(e) if tokio::time::Instant::now() + backoff < deadline => {
                    tracing::info!(%primary, "cannot join yet: {e}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn join_once(&self, primary: &str, advertised: &str) -> Result<(u64, usize), PsError> {
        let mut client = self.peer_client(primary)?;
        let mut request = tonic::Request::new(pb::JoinRequest {
            addr: advertised.to_string(),
        });
        self.peer.auth.attach(&mut request);
        let failed = |s: tonic::Status| PsError::Unavailable(format!("Join {primary}: {s}"));
        let mut chunks = client.join(request).await.map_err(failed)?.into_inner();
        let mut bytes = Vec::new();
        while let Some(chunk) = chunks.message().await.map_err(failed)? {
            bytes.extend_from_slice(&chunk.data);
            if chunk.last {
                self.load(&bytes, chunk.seq)?;
                return Ok((chunk.seq, bytes.len()));
            }
        }
        Err(PsError::Unavailable(format!(
            "Join {primary}: the snapshot stream ended early"
        )))
    }

    /// Primary: sends queued writes to the backup at `addr` until this
    /// generation ends: the backup is replaced, promoted (this primary is
    /// then deposed), or silent for [`BACKUP_TIMEOUT`] (it is dropped).
    pub async fn forward(self: Arc<Self>, addr: String, generation: u64) {
        let client = match self.peer_client(&addr) {
            Ok(client) => client,
            Err(e) => {
                self.drop_backup(generation, &format!("{e}"));
                return;
            }
        };
        // The first call carries no write: it returns once the backup has
        // loaded the snapshot, which acknowledges the writes it holds.
        let mut first = true;
        loop {
            let (first_seq, entries) = {
                let notified = self.queued.notified();
                let batch = {
                    let mut state = lock(&self.state);
                    if state.generation != generation {
                        return;
                    }
                    let n = state.queue.len().min(MAX_BATCH);
                    let first_seq = state.queue.front().map_or(state.next_seq, |(seq, _)| *seq);
                    (
                        first_seq,
                        state.queue.drain(..n).map(|(_, e)| e).collect::<Vec<_>>(),
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
            let request = pb::ReplicateRequest { first_seq, entries };
            match self.send(&client, request, catching_up).await {
                Ok(through) => {
                    self.replicated.send_if_modified(|r| {
                        let grew = through > *r;
                        *r = (*r).max(through);
                        grew
                    });
                }
                Err(status) if status.code() == tonic::Code::FailedPrecondition => {
                    let mut state = lock(&self.state);
                    if state.generation == generation {
                        let why = format!(
                            "this server is no longer the primary of shard {}: its backup {addr} refused replication ({})",
                            self.shard.shard_id(),
                            status.message()
                        );
                        tracing::error!("{why}");
                        state.deposed = Some(why);
                        state.backup = None;
                        state.queue.clear();
                        state.generation += 1;
                    }
                    drop(state);
                    self.replicated.send_modify(|_| {});
                    return;
                }
                Err(status) => {
                    self.drop_backup(generation, status.message());
                    return;
                }
            }
        }
    }

    /// Sends one batch, retrying transport failures for up to
    /// [`BACKUP_TIMEOUT`]. The first call of a backup (`catching_up`) may
    /// wait while it loads its snapshot; later ones get [`BACKUP_TIMEOUT`]
    /// each, so a hung backup is dropped after about twice that.
    async fn send(
        &self,
        client: &ParameterServerClient<Channel>,
        request: pb::ReplicateRequest,
        catching_up: bool,
    ) -> Result<u64, tonic::Status> {
        let deadline = tokio::time::Instant::now() + BACKUP_TIMEOUT;
        loop {
            let mut call = tonic::Request::new(request.clone());
            self.peer.auth.attach(&mut call);
            // A backup still loading its snapshot holds the first call.
            call.set_timeout(if catching_up {
                BACKUP_TIMEOUT * 10
            } else {
                BACKUP_TIMEOUT
            });
            match client.clone().replicate(call).await {
                Ok(answer) => return Ok(answer.into_inner().applied_through),
                Err(status)
                    if status.code() != tonic::Code::FailedPrecondition
                        && tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(status) => return Err(status),
            }
        }
    }

    /// Stops replicating to an unresponsive backup: queued writes are
    /// acknowledged, later ones applied by this primary alone.
    fn drop_backup(&self, generation: u64, why: &str) {
        let _exclusive = self.order.write().unwrap_or_else(|p| p.into_inner());
        let mut state = lock(&self.state);
        if state.generation != generation {
            return;
        }
        tracing::error!(backup = ?state.backup, "backup dropped, serving without a replica: {why}");
        state.backup = None;
        state.queue.clear();
        state.generation += 1;
        self.replicated.send_replace(state.next_seq - 1);
    }
}

/// A primary's answer to Join, cut into chunks.
pub fn join_chunks(bytes: Vec<u8>, seq: u64) -> Vec<pb::JoinChunk> {
    let bytes = bytes::Bytes::from(bytes);
    let n = bytes.len().div_ceil(CHUNK_BYTES).max(1);
    (0..n)
        .map(|i| pb::JoinChunk {
            data: bytes.slice(i * CHUNK_BYTES..((i + 1) * CHUNK_BYTES).min(bytes.len())),
            seq,
            last: i + 1 == n,
        })
        .collect()
}

impl Replication {
    /// A client to a peer server (lazy: connects on first use, reconnects after failures).
    fn peer_client(&self, addr: &str) -> Result<ParameterServerClient<Channel>, PsError> {
        let invalid = |e: &dyn std::fmt::Display| {
            PsError::invalid(format!("invalid peer address {addr:?}: {e}"))
        };
        let endpoint = ps_common::tls::endpoint(addr, self.peer.tls.clone())
            .map_err(|e| invalid(&e))?
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true);
        Ok(ParameterServerClient::new(endpoint.connect_lazy())
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX))
    }
}
