//! Primary-backup replication of one shard: the role a server plays, the
//! order of its writes, and when a backup may take over.
//!
//! A **primary** numbers every write (table creation, push, assign) as it
//! applies it. With a backup attached, writes are applied one at a time in
//! that order and queued; a forwarder sends the queue to the backup in
//! `Replicate` calls on the backup's *stream* (a random id per attachment),
//! and a write is acknowledged to its worker only once the backup has
//! applied it ([`Replication::acknowledged`]). With no backup attached,
//! writes run concurrently and are acknowledged at once.
//!
//! A **backup** serves nothing to workers. It joins ([`backup`]): the
//! primary checks who is asking, then streams a snapshot; the backup then
//! applies the primary's writes of its stream strictly in order.
//!
//! **When a backup may be promoted.** A primary whose backup stops
//! answering goes on alone after a while and acknowledges writes the backup
//! never sees, so a backup may only take over while that cannot have
//! happened. The backup renews a lease with its primary every
//! [`LEASE_RENEW`]; a grant lets it be promoted until [`BACKUP_LEASE`]
//! after it *sent* the renewal, and the primary promises not to go on alone
//! until [`PRIMARY_HOLD`] (longer) after it *answered* it. Since the send
//! comes before the answer, the backup's lease always ends before the
//! primary may acknowledge alone. A backup the primary dropped or replaced
//! learns so at its next renewal, is *detached* (never promotable) and joins
//! again from a fresh snapshot. Promotion also needs the old primary to be
//! gone: a backup refuses while its primary answers as a serving primary.
//!
//! A promoted backup answers its old primary's `Replicate` with
//! `promoted`: the old primary learns it was replaced and stops serving (it
//! is *deposed*), so no worker is acknowledged by two primaries through the
//! same backup. An idle primary sends an empty `Replicate` every
//! [`HEARTBEAT`], so it notices without waiting for a write.
//!
//! A **follower** (a read replica, `ps-server --follow`) loads a snapshot
//! and then tails the primary's log of writes ([`follower`]): it never
//! counts for durability, is never promoted, and a slow one never holds
//! the primary up. While a follower log exists the primary applies writes
//! one at a time, as with a backup, so the log is in the order the rows
//! saw them and a follower equals its primary row for row.
//!
//! **With a coordinator** (`ps-server --etcd`, [`crate::coordination`])
//! etcd decides instead of the peer lease: a backup is promoted by a
//! compare-and-swap in etcd, never by a worker's Promote, and only while
//! etcd names it the standby; the primary names its backup standby once it
//! has caught up and removes it there before it acknowledges a write
//! without it ([`Standbys`]). A primary acknowledges only until its
//! *fence* (the end of its etcd lease as far as it can know) and every
//! write carries its epoch: a replica that knows a newer epoch refuses it.
//!
//! - [`primary`]: attaching a backup, the join answer, the forwarder, dropping.
//! - [`backup`]: joining, applying the stream, the lease, promotion.
//! - [`follower`]: the follower log on the primary, and the follower's side.

mod backup;
mod follower;
mod primary;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use ps_common::PsError;
use ps_common::ids::random_id;
use ps_common::pb::parameter_server_client::ParameterServerClient;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};
use tonic::transport::{Channel, ClientTlsConfig};

use crate::auth::Auth;
use crate::dedup::{Applied, WriterRecord};
use crate::request::Write;
use crate::store::{Shard, ShardSnapshot};

pub use backup::Replicated;
pub use follower::{DEFAULT_FOLLOWER_LOG_BYTES, FOLLOWER_IDLE, Tailed};
pub use primary::{JoinStream, Joiner};

/// How long a primary keeps retrying an unresponsive backup before it
/// starts dropping it.
pub const BACKUP_TIMEOUT: Duration = Duration::from_secs(3);
/// How often an idle primary checks on its backup.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// How often a backup renews its lease with its primary.
pub const LEASE_RENEW: Duration = Duration::from_millis(500);
/// How long after sending a granted renewal a backup may be promoted.
pub const BACKUP_LEASE: Duration = Duration::from_secs(4);
/// How long after granting a renewal a primary keeps waiting for its
/// backup before it acknowledges writes alone (longer than
/// [`BACKUP_LEASE`], with a second of margin for clocks and scheduling).
pub const PRIMARY_HOLD: Duration = Duration::from_secs(5);

/// The part a server plays for its shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Serves workers; replicates to its backup, if any.
    Primary,
    /// Applies the primary's writes; serves workers once promoted.
    Backup,
    /// A read replica: applies the primary's writes from its log and
    /// serves pulls; never promoted, never written to by workers.
    Follower,
}

impl Role {
    /// `"primary"` or `"backup"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Backup => "backup",
            Role::Follower => "follower",
        }
    }
}

/// Where a coordinated primary records its standby (etcd, through
/// [`crate::coordination`]). Both calls answer once the record is written
/// (or fail, and are retried).
pub trait Standbys: Send + Sync + std::fmt::Debug {
    /// The backup at `addr` (server `server_id`) holds every write: it may
    /// be promoted. `Ok(false)`: this server no longer holds the shard.
    fn caught_up(
        &self,
        addr: String,
        server_id: u64,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<bool, PsError>> + Send>>;
    /// The backup is being dropped: after this answers `Ok`, it can no
    /// longer be promoted and the primary may acknowledge without it.
    fn dropped(
        &self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<bool, PsError>> + Send>>;
}

/// A primary's backup.
#[derive(Debug)]
struct Attached {
    addr: String,
    /// Its Describe.server_id (as its Join said).
    server_id: u64,
    stream: u64,
    generation: u64,
    /// When the primary last granted the backup's lease (`None`: never;
    /// a backup that never held a lease cannot be promoted).
    granted: Option<Instant>,
    /// The primary stopped granting (the backup is failing): it drops the
    /// backup once [`PRIMARY_HOLD`] has passed since the last grant.
    dropping: bool,
}

/// A backup's primary, once the backup has loaded its snapshot.
#[derive(Debug)]
struct Following {
    primary: String,
    stream: u64,
    /// Until when this backup may be promoted (its lease).
    promotable_until: Option<Instant>,
}

#[derive(Debug)]
struct State {
    role: Role,
    /// Why this primary stopped serving: its backup was promoted.
    deposed: Option<String>,
    /// Primary: the number the next write gets. Backup: the number of the
    /// next write it expects.
    next_seq: u64,
    /// Primary: the backup it replicates to.
    backup: Option<Attached>,
    /// Bumped whenever a backup is attached or dropped; a forwarder of an
    /// older generation stops.
    generation: u64,
    /// Writes applied here and not yet sent to the backup, as the typed
    /// writes they are (encoded by the forwarder, off the write path).
    queue: VecDeque<(u64, Arc<Write>)>,
    /// Backup: the primary it follows (`None` while joining or detached).
    following: Option<Following>,
    /// Backup: why it no longer follows its primary (until it rejoins).
    detached: Option<String>,
    /// The stream this server was the backup of before it was promoted.
    promoted_from: Option<u64>,
    /// Primary: the log its followers tail (`None`: no follower).
    log: Option<follower::FollowerLog>,
    /// Follower: when it last held every write its primary had applied.
    fresh_at: Option<Instant>,
    /// With a coordinator: this primary's epoch, or (backup) that of the
    /// primary it follows; 0 without one.
    epoch: u64,
    /// With a coordinator: a primary acknowledges nothing from this
    /// instant on (when its etcd lease may have run out) until it renews.
    fence: Option<Instant>,
    /// The lease was given back: the fence no longer moves.
    resigned: bool,
}

/// What a joining backup receives: the shard and its applied pushes.
#[derive(Debug, Serialize, Deserialize)]
struct JoinSnapshot {
    shard: ShardSnapshot,
    writers: Vec<(u64, WriterRecord)>,
}

/// One write's outcome, as [`Replication::write`] hands it back.
#[derive(Debug)]
pub enum Ordered<T> {
    /// Applied now: it is replicated.
    Fresh(T),
    /// Applied before, by write number `.1`: acknowledged once that write is
    /// on the backup, not replicated again.
    Repeat(T, u64),
}

/// How a server reaches its peers (the primary it joins, or its backup).
#[derive(Debug, Clone, Default)]
pub struct Peer {
    /// The server's tokens: the peer token for Join, Replicate and Lease,
    /// the worker token for Describe.
    pub auth: Auth,
    /// TLS towards the peer (`None`: plain TCP).
    pub tls: Option<ClientTlsConfig>,
}

/// What a server says of its replication (Describe).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Description {
    /// `"primary"`, `"backup"` or `"deposed"`.
    pub role: &'static str,
    /// Primary: the backup replicated to.
    pub backup: Option<String>,
    /// Backup: it has loaded its primary's snapshot and follows it.
    pub caught_up: bool,
    /// Follower: the primary it follows.
    pub primary: Option<String>,
    /// Follower: how stale its rows may be ([`Replication::lag`]).
    pub lag: Option<Duration>,
    /// With a coordinator: the epoch (0 without).
    pub epoch: u64,
}

/// The replication state of one shard server.
#[derive(Debug)]
pub struct Replication {
    shard: Arc<Shard>,
    /// A random id of this server (Describe.server_id).
    server_id: u64,
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
    /// Backup: its snapshot is loaded and it follows its primary.
    caught_up: watch::Sender<bool>,
    /// The role as Describe reports it, for the health service.
    role: watch::Sender<&'static str>,
    /// The `(writer, seq)` pairs of the pushes applied, in write order:
    /// it travels with the snapshot a backup joins from.
    applied: Applied,
    /// How to reach the peer.
    peer: Peer,
    /// Backup: its lease task runs (started by the first join).
    leasing: std::sync::atomic::AtomicBool,
    /// The server stopped: background tasks (the lease, forwarders) end.
    closed: std::sync::atomic::AtomicBool,
    /// Primary: the newest write in its follower log (wakes Tail calls).
    logged: watch::Sender<u64>,
    /// Primary: the byte cap of its follower log.
    log_cap: std::sync::atomic::AtomicUsize,
    /// With a coordinator: where the standby is recorded (set once).
    standbys: std::sync::OnceLock<Arc<dyn Standbys>>,
    /// The checkpoint folder the shard was restored from after start (a
    /// coordinated server restores only once it knows it must).
    restored_from: Mutex<Option<String>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Replication {
    /// The state of a server starting as `role` for `shard`, reaching its
    /// peers as `peer` says.
    pub fn new(shard: Arc<Shard>, role: Role, peer: Peer) -> Arc<Replication> {
        Arc::new(Replication {
            shard,
            server_id: random_id(),
            order: RwLock::new(()),
            state: Mutex::new(State {
                role,
                deposed: None,
                next_seq: 1,
                backup: None,
                generation: 0,
                queue: VecDeque::new(),
                following: None,
                detached: None,
                promoted_from: None,
                log: None,
                fresh_at: None,
                epoch: 0,
                fence: None,
                resigned: false,
            }),
            replicated: watch::Sender::new(0),
            queued: Notify::new(),
            caught_up: watch::Sender::new(role == Role::Primary),
            role: watch::Sender::new(role.as_str()),
            applied: Applied::default(),
            peer,
            leasing: std::sync::atomic::AtomicBool::new(false),
            closed: std::sync::atomic::AtomicBool::new(false),
            logged: watch::Sender::new(0),
            log_cap: std::sync::atomic::AtomicUsize::new(DEFAULT_FOLLOWER_LOG_BYTES),
            standbys: std::sync::OnceLock::new(),
            restored_from: Mutex::new(None),
        })
    }

    /// Hands promotion to a coordinator: the standby is recorded through
    /// `standbys`, Promote is refused, and acknowledgements stop at the
    /// fence ([`Replication::set_fence`]). Set before the server serves.
    pub fn coordinate(&self, standbys: Arc<dyn Standbys>) {
        let _ = self.standbys.set(standbys);
    }

    /// Whether a coordinator decides promotions.
    pub fn is_coordinated(&self) -> bool {
        self.standbys.get().is_some()
    }

    /// A coordinated primary may acknowledge writes until `until` (its
    /// etcd lease, renewed, as far as it can know it holds).
    pub fn set_fence(&self, until: Instant) {
        let mut state = lock(&self.state);
        if !state.resigned {
            state.fence = Some(state.fence.map_or(until, |f| f.max(until)));
        }
    }

    /// A coordinated primary giving its lease back: it acknowledges nothing
    /// from now on, whatever renewal answers later.
    pub fn set_fence_now(&self) {
        let mut state = lock(&self.state);
        state.resigned = true;
        state.fence = Some(Instant::now());
    }

    /// The epoch (0 without a coordinator).
    pub fn epoch(&self) -> u64 {
        lock(&self.state).epoch
    }

    /// Records the checkpoint folder the shard was restored from (Describe).
    pub fn set_restored_from(&self, dir: String) {
        *lock(&self.restored_from) = Some(dir);
    }

    /// The checkpoint folder recorded by [`Replication::set_restored_from`].
    pub fn restored_from(&self) -> Option<String> {
        lock(&self.restored_from).clone()
    }

    /// The server stopped serving: its lease renewals and forwarders end
    /// (as they would with its process).
    pub fn close(&self) {
        self.closed
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.queued.notify_waiters();
    }

    /// Whether the server stopped serving.
    pub fn is_closed(&self) -> bool {
        self.closed.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The record of applied pushes (claimed by the writer).
    pub fn applied(&self) -> &Applied {
        &self.applied
    }

    /// This server's random id.
    pub fn server_id(&self) -> u64 {
        self.server_id
    }

    /// The role now and what goes with it.
    pub fn description(&self) -> Description {
        let state = lock(&self.state);
        let follower = state.role == Role::Follower;
        Description {
            role: Self::role_of(&state),
            backup: state.backup.as_ref().map(|b| b.addr.clone()),
            caught_up: state.following.is_some(),
            primary: follower
                .then(|| state.following.as_ref().map(|f| f.primary.clone()))
                .flatten(),
            lag: Self::lag_of(&state),
            epoch: state.epoch,
        }
    }

    /// The role now (`"primary"`, `"backup"`, or `"deposed"` for a primary
    /// that was replaced), and the backup replicated to (primary).
    pub fn describe(&self) -> (&'static str, Option<String>) {
        let d = self.description();
        (d.role, d.backup)
    }

    fn role_of(state: &State) -> &'static str {
        match (state.role, &state.deposed) {
            (_, Some(_)) => "deposed",
            (role, None) => role.as_str(),
        }
    }

    /// Follows the role as Describe reports it (for the health service).
    pub fn watch_role(&self) -> watch::Receiver<&'static str> {
        self.role.subscribe()
    }

    /// Publishes the role after a change of `state`.
    fn role_changed(&self, state: &State) {
        self.role.send_replace(Self::role_of(state));
    }

    fn refusal(&self, state: &State) -> Option<PsError> {
        if let Some(why) = &state.deposed {
            return Some(PsError::Unavailable(why.clone()));
        }
        match state.role {
            Role::Primary => match state.fence {
                Some(fence) if Instant::now() >= fence => Some(PsError::Unavailable(format!(
                    "this primary of shard {} has not renewed its coordinator lease in time: it acknowledges nothing until it does (or another server is promoted)",
                    self.shard.shard_id()
                ))),
                _ => None,
            },
            Role::Backup => Some(PsError::Unavailable(format!(
                "this server is the backup of shard {}: it serves workers only after Promote",
                self.shard.shard_id()
            ))),
            Role::Follower => Some(PsError::Unavailable(format!(
                "this server is a read replica of shard {} (ps-server --follow): it serves pulls only; send writes to its primary",
                self.shard.shard_id()
            ))),
        }
    }

    /// Whether this server may serve pulls: a primary, or a follower that
    /// has loaded its snapshot.
    pub fn check_reading(&self) -> Result<(), PsError> {
        let state = lock(&self.state);
        if state.role == Role::Follower && state.deposed.is_none() {
            return match state.following {
                Some(_) => Ok(()),
                None => Err(PsError::Unavailable(format!(
                    "this read replica of shard {} has not loaded its primary's snapshot yet",
                    self.shard.shard_id()
                ))),
            };
        }
        match self.refusal(&state) {
            Some(err) => Err(err),
            None => Ok(()),
        }
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
    /// fresh write is queued for the backup as `write()`. Returns the
    /// outcome and the number to pass to [`Replication::acknowledged`].
    /// Runs store work: call it on a blocking thread.
    pub fn write<T>(
        &self,
        apply: impl FnOnce(u64) -> Result<Ordered<T>, PsError>,
        write: impl FnOnce() -> Arc<Write>,
    ) -> Result<(T, u64), PsError> {
        {
            let _shared = self.order.read().unwrap_or_else(|p| p.into_inner());
            let (replicating, seq) = {
                let mut state = lock(&self.state);
                if let Some(err) = self.refusal(&state) {
                    return Err(err);
                }
                if state.backup.is_none() && state.log.is_none() {
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
                    Ordered::Fresh(value) | Ordered::Repeat(value, _) => Ok((value, 0)),
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
            Ordered::Fresh(value) => {
                state.next_seq += 1;
                let write = write();
                self.log_write(&mut state, seq, &write);
                if state.backup.is_some() {
                    state.queue.push_back((seq, write));
                    self.queued.notify_one();
                    Ok((value, seq))
                } else {
                    Ok((value, 0))
                }
            }
            Ordered::Repeat(value, earlier) => Ok((value, earlier)),
        }
    }

    /// Waits until write `seq` is on the backup (at once for 0, or when
    /// there is no backup). Fails if this primary is deposed meanwhile.
    pub async fn acknowledged(&self, seq: u64) -> Result<(), PsError> {
        let mut replicated = self.replicated.subscribe();
        loop {
            {
                let state = lock(&self.state);
                if let Some(why) = &state.deposed {
                    return Err(PsError::Unavailable(format!(
                        "{why}; the write may not have been replicated: retry it on the new primary"
                    )));
                }
                if *replicated.borrow_and_update() >= seq {
                    // A coordinated primary past its fence may have been
                    // replaced: the write may be lost with it, so no ack.
                    return match self.refusal(&state) {
                        Some(err) => Err(err),
                        None => Ok(()),
                    };
                }
            }
            if replicated.changed().await.is_err() {
                return Err(PsError::Internal("replication state dropped".into()));
            }
        }
    }

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

    /// What the server at `addr` says of itself, within `timeout` (`None`:
    /// no answer).
    async fn describe_peer(
        &self,
        addr: &str,
        timeout: Duration,
    ) -> Option<ps_common::pb::DescribeResponse> {
        let mut client = self.peer_client(addr).ok()?;
        let mut request = tonic::Request::new(ps_common::pb::DescribeRequest {});
        self.peer.auth.attach(&mut request);
        request.set_timeout(timeout);
        match tokio::time::timeout(timeout, client.describe(request)).await {
            Ok(Ok(answer)) => Some(answer.into_inner()),
            _ => None,
        }
    }
}
