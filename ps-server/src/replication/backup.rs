//! The backup's side: joining a primary (and joining again after being
//! dropped), applying its stream of writes, renewing the lease, and the
//! checks that make a promotion safe.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ps_common::PsError;
use ps_common::pb;
use ps_common::pb::parameter_server_client::ParameterServerClient;
use tonic::transport::Channel;

use super::{BACKUP_LEASE, Following, JoinSnapshot, LEASE_RENEW, Replication, Role, lock};

/// How long a backup waits for its primary to answer a lease renewal, and
/// for a serving primary to answer the probe before a promotion.
const PEER_ANSWER: Duration = Duration::from_secs(1);

/// What a backup did with one Replicate call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replicated {
    /// Applied (or already held) every write through this number.
    Through(u64),
    /// This server was the backup of the call's stream and has been
    /// promoted: the caller is no longer primary.
    Promoted,
}

impl Replication {
    /// Backup: waits (at most `timeout`) until the primary's snapshot is loaded.
    pub async fn wait_caught_up(&self, timeout: Duration) -> Result<(), PsError> {
        let mut caught_up = self.caught_up.subscribe();
        tokio::time::timeout(timeout, caught_up.wait_for(|&ready| ready))
            .await
            .map_err(|_| {
                PsError::Unavailable("this backup is not following its primary's stream".into())
            })?
            .map(drop)
            .map_err(|_| PsError::Internal("replication state dropped".into()))
    }

    /// Backup: applies the writes numbered `first_seq..first_seq + n` of
    /// `stream` in order with `apply(index, seq)`, skipping any it has
    /// already applied (a resent batch). A call on another stream than the
    /// one this backup follows is refused (FAILED_PRECONDITION: a stale or
    /// forged call, or one to a server that is no backup); one reaching the
    /// server promoted from that stream is answered [`Replicated::Promoted`].
    pub fn apply_replicated(
        &self,
        (stream, epoch): (u64, u64),
        first_seq: u64,
        n: usize,
        mut apply: impl FnMut(usize, u64) -> Result<(), PsError>,
    ) -> Result<Replicated, PsError> {
        let _exclusive = self.order.write().unwrap_or_else(|p| p.into_inner());
        let mut state = lock(&self.state);
        if state.promoted_from == Some(stream) {
            return Ok(Replicated::Promoted);
        }
        if epoch < state.epoch {
            return Err(PsError::FailedPrecondition(format!(
                "fenced: these writes come from epoch {epoch} of shard {}, and this server knows epoch {}",
                self.shard.shard_id(),
                state.epoch
            )));
        }
        match &state.following {
            Some(f) if state.role != Role::Primary && f.stream == stream => {}
            _ => {
                return Err(PsError::FailedPrecondition(format!(
                    "this server does not follow replication stream {stream:x} of shard {}",
                    self.shard.shard_id()
                )));
            }
        }
        if first_seq > state.next_seq {
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
        Ok(Replicated::Through(state.next_seq - 1))
    }

    /// Backup: asks the primary at `primary` to replicate to `advertised`
    /// (this server's address as the primary reaches it), retrying until
    /// `timeout`, and loads its snapshot. From then on the backup renews its
    /// lease, and joins again by itself if the primary drops it. Returns
    /// the number of the snapshot's last write and its size in bytes.
    pub async fn join(
        self: &Arc<Self>,
        primary: &str,
        advertised: &str,
        timeout: Duration,
    ) -> Result<(u64, usize), PsError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut backoff = Duration::from_millis(50);
        let joined = loop {
            match self.join_once(primary, advertised).await {
                Ok(joined) => break joined,
                Err(e) if tokio::time::Instant::now() + backoff < deadline => {
                    tracing::info!(%primary, "cannot join yet: {e}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
                Err(e) => return Err(e),
            }
        };
        if !self.is_coordinated() && !self.leasing.swap(true, Ordering::Relaxed) {
            // A backup that just joined can be promoted at once: renew now.
            if let Ok(client) = self.peer_client(primary) {
                self.renew_lease(&client, primary).await;
            }
            tokio::spawn(Arc::clone(self).keep_lease(primary.to_string(), advertised.to_string()));
        }
        Ok(joined)
    }

    async fn join_once(&self, primary: &str, advertised: &str) -> Result<(u64, usize), PsError> {
        let mut client = self.peer_client(primary)?;
        let mut request = tonic::Request::new(pb::JoinRequest {
            addr: advertised.to_string(),
            shard_id: self.shard.shard_id(),
            num_shards: self.shard.num_shards(),
            server_id: self.server_id,
        });
        self.peer.auth.attach_peer(&mut request);
        let failed = |s: tonic::Status| match s.code() {
            // Refusals the joiner cannot wait out name themselves.
            tonic::Code::PermissionDenied | tonic::Code::Unauthenticated => {
                PsError::FailedPrecondition(format!("Join {primary}: {}", s.message()))
            }
            _ => PsError::Unavailable(format!("Join {primary}: {}", s.message())),
        };
        let chunks = client.join(request).await.map_err(failed)?.into_inner();
        self.receive_snapshot(chunks, primary, failed).await
    }

    /// Reads a snapshot's chunks from `primary` and loads it; returns the
    /// number of its last write and its size in bytes.
    pub(super) async fn receive_snapshot(
        &self,
        mut chunks: tonic::Streaming<pb::JoinChunk>,
        primary: &str,
        failed: impl Fn(tonic::Status) -> PsError,
    ) -> Result<(u64, usize), PsError> {
        let mut bytes = Vec::new();
        while let Some(chunk) = chunks.message().await.map_err(&failed)? {
            bytes.extend_from_slice(&chunk.data);
            if chunk.last {
                self.load(&bytes, (chunk.seq, chunk.stream, chunk.epoch), primary)?;
                return Ok((chunk.seq, bytes.len()));
            }
        }
        Err(PsError::Unavailable(format!(
            "{primary}: the snapshot stream ended early"
        )))
    }

    /// Backup or follower: loads a snapshot received from `primary` on
    /// `stream`.
    pub(super) fn load(
        &self,
        bytes: &[u8],
        (seq, stream, epoch): (u64, u64, u64),
        primary: &str,
    ) -> Result<(), PsError> {
        let (snapshot, _): (JoinSnapshot, usize) =
            bincode::serde::decode_from_slice(bytes, bincode::config::standard())
                .map_err(|e| PsError::invalid(format!("the primary's snapshot is corrupt: {e}")))?;
        let _exclusive = self.order.write().unwrap_or_else(|p| p.into_inner());
        let mut state = lock(&self.state);
        if state.role == Role::Primary || state.deposed.is_some() {
            return Err(PsError::FailedPrecondition(
                "this server is already primary; it cannot join another".into(),
            ));
        }
        self.shard.load(snapshot.shard)?;
        self.applied.restore(snapshot.writers);
        state.next_seq = seq + 1;
        state.epoch = epoch;
        state.detached = None;
        state.following = Some(Following {
            primary: primary.to_string(),
            stream,
            promotable_until: None,
        });
        self.caught_up.send_replace(true);
        Ok(())
    }

    /// Backup: renews the lease every [`LEASE_RENEW`] while it follows its
    /// primary; detached, joins again. Ends when this server is promoted.
    async fn keep_lease(self: Arc<Self>, primary: String, advertised: String) {
        let Ok(client) = self.peer_client(&primary) else {
            return;
        };
        loop {
            tokio::time::sleep(LEASE_RENEW).await;
            let stream = {
                let state = lock(&self.state);
                if state.role != Role::Backup || state.deposed.is_some() || self.is_closed() {
                    return;
                }
                state.following.as_ref().map(|f| f.stream)
            };
            if stream.is_none() {
                match self.join_once(&primary, &advertised).await {
                    Ok((seq, bytes)) => {
                        tracing::warn!(%primary, seq, bytes, "joined again from a fresh snapshot")
                    }
                    Err(e) => tracing::info!(%primary, "cannot join again yet: {e}"),
                }
            }
            self.renew_lease(&client, &primary).await;
        }
    }

    /// Backup: asks `primary` once to renew the lease of the stream this
    /// backup follows: a grant extends it, a refusal detaches the backup,
    /// no answer leaves it to run out.
    async fn renew_lease(&self, client: &ParameterServerClient<Channel>, primary: &str) {
        let Some(stream) = lock(&self.state).following.as_ref().map(|f| f.stream) else {
            return;
        };
        let sent = Instant::now();
        let mut request = tonic::Request::new(pb::LeaseRequest { stream });
        self.peer.auth.attach_peer(&mut request);
        request.set_timeout(PEER_ANSWER);
        match client.clone().lease(request).await {
            Ok(answer) if answer.get_ref().granted => self.extend_lease(stream, sent),
            Ok(_) => self.detach(
                stream,
                format!("its primary {primary} dropped it; it misses writes until it joins again"),
            ),
            // No answer: the lease runs out on its own.
            Err(_) => {}
        }
    }

    fn extend_lease(&self, stream: u64, sent: Instant) {
        let mut state = lock(&self.state);
        if let Some(f) = state.following.as_mut().filter(|f| f.stream == stream) {
            let until = sent + BACKUP_LEASE;
            f.promotable_until = Some(f.promotable_until.map_or(until, |u| u.max(until)));
        }
    }

    /// Backup: stops following `stream` (the primary dropped this backup).
    fn detach(&self, stream: u64, why: String) {
        let mut state = lock(&self.state);
        if state.following.as_ref().is_some_and(|f| f.stream == stream) {
            tracing::warn!("this backup is detached: {why}");
            state.following = None;
            state.detached = Some(why);
            self.caught_up.send_replace(false);
        }
    }

    /// Makes this server primary, if that is safe. Returns whether it was a
    /// backup (a primary answers `false`). A backup refuses with
    /// FAILED_PRECONDITION, saying why, when it has not loaded its
    /// primary's snapshot, when its primary dropped it, when its lease ran
    /// out (its primary may have acknowledged writes without it since), or
    /// when its primary still answers as a serving primary.
    pub async fn promote(&self) -> Result<bool, PsError> {
        if self.is_coordinated() && lock(&self.state).role != Role::Primary {
            return Err(PsError::FailedPrecondition(
                "this shard's failover is decided by its coordinator (etcd): a backup is promoted there, not by Promote".into(),
            ));
        }
        let primary = self.promotable()?;
        let Some(primary) = primary else {
            return Ok(false);
        };
        if let Some(d) = self.describe_peer(&primary, PEER_ANSWER).await
            && d.role == "primary"
        {
            return Err(PsError::FailedPrecondition(format!(
                "this backup's primary {primary} still serves; only a backup whose primary is gone is promoted"
            )));
        }
        // The lease was valid when the probe started: the primary cannot
        // acknowledge alone until PRIMARY_HOLD after its last grant, a
        // second past the lease, and the probe takes at most PEER_ANSWER.
        let _exclusive = self.order.write().unwrap_or_else(|p| p.into_inner());
        let mut state = lock(&self.state);
        if state.role == Role::Primary {
            return Ok(false);
        }
        if state.deposed.is_some()
            || state
                .following
                .as_ref()
                .is_none_or(|f| f.primary != primary)
        {
            return Err(PsError::FailedPrecondition(
                "this backup stopped following its primary while it was being promoted".into(),
            ));
        }
        let stream = state.following.take().map(|f| f.stream);
        state.role = Role::Primary;
        state.promoted_from = stream;
        self.replicated.send_replace(state.next_seq - 1);
        self.role_changed(&state);
        tracing::warn!(
            shard = self.shard.shard_id(),
            through = state.next_seq - 1,
            "promoted to primary"
        );
        Ok(true)
    }

    /// Coordinated: makes this server primary at `epoch`, which it won in
    /// etcd (as the recorded standby, or as a fresh server with no
    /// standby). A backup must follow its primary's stream (it then holds
    /// every acknowledged write); a server that never joined starts from
    /// what it restored. Refused for a follower and a deposed primary.
    pub fn promote_to(&self, epoch: u64) -> Result<(), PsError> {
        let _exclusive = self.order.write().unwrap_or_else(|p| p.into_inner());
        let mut state = lock(&self.state);
        if state.deposed.is_some() || state.role != Role::Backup {
            return Err(PsError::FailedPrecondition(format!(
                "a {} cannot be promoted",
                Self::role_of(&state)
            )));
        }
        state.promoted_from = state.following.take().map(|f| f.stream);
        state.detached = None;
        state.role = Role::Primary;
        state.epoch = epoch;
        self.replicated.send_replace(state.next_seq - 1);
        self.caught_up.send_replace(true);
        self.role_changed(&state);
        tracing::warn!(
            shard = self.shard.shard_id(),
            epoch,
            through = state.next_seq - 1,
            "primary by the coordinator's decision"
        );
        Ok(())
    }

    /// Backup: whether it follows a primary's stream (has loaded its
    /// snapshot and was not dropped since), and which.
    pub fn following(&self) -> Option<String> {
        lock(&self.state)
            .following
            .as_ref()
            .map(|f| f.primary.clone())
    }

    /// Coordinated backup: stops following its primary (it was dropped as
    /// standby, or another server was promoted), so that it joins again.
    pub fn unfollow(&self, why: String) {
        let stream = lock(&self.state).following.as_ref().map(|f| f.stream);
        if let Some(stream) = stream {
            self.detach(stream, why);
        }
    }

    /// The primary this backup follows, if promoting it is safe as far as
    /// it alone can tell (`None`: it is primary already).
    fn promotable(&self) -> Result<Option<String>, PsError> {
        let state = lock(&self.state);
        if let Some(why) = &state.deposed {
            return Err(PsError::Unavailable(why.clone()));
        }
        if state.role == Role::Primary {
            return Ok(None);
        }
        if state.role == Role::Follower {
            return Err(PsError::FailedPrecondition(
                "this server is a read replica (ps-server --follow): it is never promoted".into(),
            ));
        }
        let Some(following) = &state.following else {
            return Err(PsError::FailedPrecondition(match &state.detached {
                Some(why) => format!(
                    "this backup cannot be promoted: {why}; promoting it would lose them"
                ),
                None => "this backup has not loaded its primary's snapshot yet; promoting it would lose data".into(),
            }));
        };
        let now = Instant::now();
        match following.promotable_until {
            Some(until) if now < until => Ok(Some(following.primary.clone())),
            Some(until) => Err(PsError::FailedPrecondition(format!(
                "this backup last renewed its lease with its primary {} {:.1} s ago, past its {} s lease: the primary may have acknowledged writes without it since",
                following.primary,
                (now - until + BACKUP_LEASE).as_secs_f64(),
                BACKUP_LEASE.as_secs()
            ))),
            None => Err(PsError::FailedPrecondition(format!(
                "this backup has not yet renewed a lease with its primary {}; promoting it could lose writes",
                following.primary
            ))),
        }
    }
}
