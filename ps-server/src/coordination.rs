//! A server's part in a job coordinated by etcd (`ps-server --etcd`):
//! holding a lease, deciding at start whether to join the shard's primary
//! or to restore and campaign, promoting the standby when the primary's
//! lease runs out, and recording the standby for the primary.
//!
//! The keys and the compare-and-swap live in [`ps_common::coordinator`];
//! the roles and the fence in [`crate::replication`]. This module is the
//! loop between them:
//!
//! - **Lease.** The server holds one etcd lease of `ttl` seconds and renews
//!   it every third of that. A renewal sent at `t` and answered fences the
//!   server at `t + ttl - margin`: etcd cannot expire the lease before
//!   `t + ttl` (it renews on receipt), so a primary stops acknowledging
//!   before anyone else can be promoted. An answer saying the lease is gone
//!   ends the server ([`Ended::LeaseLost`]): restarted, it rejoins.
//! - **Start.** With a primary named in etcd, join it as backup. With none,
//!   and no live standby that could take over, restore the newest
//!   checkpoint under `--checkpoint-dir` and campaign; the loser of a race
//!   joins the winner.
//! - **Failover.** A backup watches the shard's keys. When the primary key
//!   disappears (its lease ran out), the standby campaigns: the swap needs
//!   the standby key to name it, so a backup that was dropped (and may
//!   have missed acknowledged writes) is never promoted.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ps_common::PsError;
use ps_common::coordinator::{Holder, Job, ShardView};

use crate::checkpoint::Checkpoints;
use crate::replication::{Replication, Standbys};
use crate::store::Shard;

/// How a coordinated server's loop ended.
#[derive(Debug, thiserror::Error)]
pub enum Ended {
    /// etcd says the server's lease is gone: another server may hold its
    /// role now. Restarted, it rejoins the shard.
    #[error("lost its etcd lease: {0}")]
    LeaseLost(String),
    /// Another server was promoted in its place.
    #[error("{0}")]
    Deposed(String),
    /// It could not take part (etcd refused, a bad checkpoint, a mismatch).
    #[error(transparent)]
    Failed(#[from] PsError),
    /// It gave its lease back ([`Coordinated::resign`], on shutdown).
    #[error("gave its etcd lease back")]
    Resigned,
}

/// What a server brings to its job's coordination.
#[derive(Debug, Clone)]
pub struct Coordination {
    /// The job's keys in etcd.
    pub job: Job,
    /// Where workers and peers reach this server.
    pub advertised: String,
    /// The lease's time to live (etcd's minimum is about 2 s).
    pub ttl: Duration,
    /// Restore the newest checkpoint here before campaigning as a fresh primary.
    pub checkpoint_root: Option<PathBuf>,
    /// How long a join may take before it is tried again.
    pub join_timeout: Duration,
}

/// How much earlier than its lease's end a primary stops acknowledging
/// (for the drift between its clock and etcd's).
fn margin(ttl: Duration) -> Duration {
    (ttl / 5).min(Duration::from_millis(500))
}

/// Records the standby in etcd for a primary ([`Standbys`]).
#[derive(Debug)]
struct EtcdStandbys {
    job: Job,
    shard: u32,
    /// This server as etcd names it primary (`None` before it is).
    me: Arc<Mutex<Option<Holder>>>,
}

impl Standbys for EtcdStandbys {
    fn caught_up(
        &self,
        addr: String,
        server_id: u64,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<bool, PsError>> + Send>> {
        let (job, shard, me) = (self.job.clone(), self.shard, current(&self.me));
        Box::pin(async move {
            let Some(me) = me else { return Ok(false) };
            let standby = Holder {
                epoch: me.epoch,
                server_id,
                addr,
            };
            job.set_standby(shard, &me, &standby).await
        })
    }

    fn dropped(
        &self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<bool, PsError>> + Send>> {
        let (job, shard, me) = (self.job.clone(), self.shard, current(&self.me));
        Box::pin(async move {
            let Some(me) = me else { return Ok(false) };
            job.clear_standby(shard, &me).await
        })
    }
}

fn current(me: &Mutex<Option<Holder>>) -> Option<Holder> {
    me.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// A server taking part in its job's coordination.
#[derive(Debug)]
pub struct Coordinated {
    config: Coordination,
    shard: Arc<Shard>,
    replication: Arc<Replication>,
    lease: i64,
    me: Arc<Mutex<Option<Holder>>>,
    resigned: std::sync::atomic::AtomicBool,
}

impl Coordinated {
    /// Registers the server with the job: takes a lease, checks the shard
    /// count, announces the server, and hands promotions of `replication`
    /// to etcd. Call before the server serves. While no etcd member
    /// answers (a cluster still starting), it tries again for up to
    /// `config.join_timeout`; a refusal (another shard count) ends it at once.
    pub async fn register(
        config: Coordination,
        shard: Arc<Shard>,
        replication: Arc<Replication>,
    ) -> Result<Coordinated, PsError> {
        let deadline = tokio::time::Instant::now() + config.join_timeout;
        let mut backoff = Duration::from_millis(100);
        loop {
            let attempt =
                Self::register_once(config.clone(), Arc::clone(&shard), Arc::clone(&replication));
            match attempt.await {
                Err(PsError::Unavailable(why))
                    if tokio::time::Instant::now() + backoff < deadline =>
                {
                    tracing::warn!("etcd does not answer yet: {why}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
                registered => return registered,
            }
        }
    }

    async fn register_once(
        config: Coordination,
        shard: Arc<Shard>,
        replication: Arc<Replication>,
    ) -> Result<Coordinated, PsError> {
        let ttl = i64::try_from(config.ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let sent = Instant::now();
        let (lease, granted) = config.job.etcd().grant(ttl).await?;
        replication.set_fence(sent + secs(granted) - margin(config.ttl));
        config.job.claim_num_shards(shard.num_shards()).await?;
        config
            .job
            .announce(
                shard.shard_id(),
                replication.server_id(),
                &config.advertised,
                0,
                lease,
            )
            .await?;
        let me = Arc::new(Mutex::new(None));
        replication.coordinate(Arc::new(EtcdStandbys {
            job: config.job.clone(),
            shard: shard.shard_id(),
            me: Arc::clone(&me),
        }));
        tracing::info!(
            job = config.job.name(),
            lease = format!("{lease:x}"),
            ttl = granted,
            "registered with etcd"
        );
        Ok(Coordinated {
            config,
            shard,
            replication,
            lease,
            me,
            resigned: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Runs the lease and the role loop until the server loses its lease,
    /// is deposed, or fails.
    pub async fn run(self: Arc<Self>) -> Ended {
        let ended = tokio::select! {
            ended = Arc::clone(&self).keep_lease() => ended,
            ended = Arc::clone(&self).roles() => ended,
        };
        if self.resigned.load(std::sync::atomic::Ordering::Relaxed) {
            Ended::Resigned
        } else {
            ended
        }
    }

    /// Gives the lease back (on shutdown): the primary stops acknowledging
    /// first, then its key goes at once and the standby takes over without
    /// waiting for the lease to run out.
    pub async fn resign(&self) {
        self.resigned
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.replication.set_fence_now();
        if let Err(e) = self.config.job.etcd().revoke(self.lease).await {
            tracing::warn!("cannot give the etcd lease back: {e}");
        }
    }

    /// Renews the lease every third of its TTL, moving the fence forward.
    async fn keep_lease(self: Arc<Self>) -> Ended {
        let every = self.config.ttl / 3;
        loop {
            tokio::time::sleep(every).await;
            if self.replication.is_closed() {
                return Ended::Failed(PsError::Unavailable("the server stopped".into()));
            }
            let sent = Instant::now();
            match self.config.job.etcd().keep_alive(self.lease).await {
                Ok(ttl) if ttl > 0 => {
                    self.replication
                        .set_fence(sent + secs(ttl) - margin(self.config.ttl));
                    if self.replication.description().role == "backup" {
                        // How far the standby has applied, for operators.
                        let applied = self.replication.applied_through();
                        let job = &self.config.job;
                        let announced = job
                            .announce(
                                self.shard.shard_id(),
                                self.replication.server_id(),
                                &self.config.advertised,
                                applied,
                                self.lease,
                            )
                            .await;
                        if let Err(e) = announced {
                            tracing::debug!("cannot announce progress: {e}");
                        }
                    }
                }
                Ok(_) => {
                    return Ended::LeaseLost(format!(
                        "etcd says lease {:x} expired (unrenewed for {} s)",
                        self.lease,
                        self.config.ttl.as_secs()
                    ));
                }
                Err(e) => tracing::warn!("cannot renew the etcd lease: {e}"),
            }
        }
    }

    /// Decides the server's role from the shard's keys, again on every change.
    async fn roles(self: Arc<Self>) -> Ended {
        let shard_id = self.shard.shard_id();
        let server_id = self.replication.server_id();
        // Restore at most once, and never over a primary's snapshot.
        let mut restored = false;
        // etcd has named this backup standby since it last joined.
        let mut recorded = false;
        loop {
            let view = match self.config.job.shard(shard_id).await {
                Ok(view) => view,
                Err(e) => {
                    tracing::warn!("cannot read the shard's keys: {e}");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            let role = self.replication.description().role;
            if role == "deposed" {
                return Ended::Deposed(format!(
                    "this server is no longer the primary of shard {shard_id}: another was promoted"
                ));
            }
            match &view.primary {
                Some(p) if p.server_id == server_id => {
                    if role != "primary" {
                        return Ended::Failed(PsError::Internal(
                            "etcd names this server primary but it does not serve".into(),
                        ));
                    }
                }
                Some(_) if role == "primary" => {
                    return Ended::Deposed(format!(
                        "etcd names another primary of shard {shard_id}"
                    ));
                }
                Some(p) => {
                    let standby_is_me = view
                        .standby
                        .as_ref()
                        .is_some_and(|(s, _)| s.server_id == server_id);
                    match self.replication.following() {
                        Some(addr) if addr == p.addr => {
                            if standby_is_me {
                                recorded = true;
                            } else if recorded {
                                // The primary dropped this backup: it may
                                // miss writes. Join again from a snapshot.
                                self.replication.unfollow(format!(
                                    "its primary {} no longer names it standby in etcd",
                                    p.addr
                                ));
                                recorded = false;
                                continue;
                            }
                        }
                        following => {
                            if let Some(old) = following {
                                self.replication
                                    .unfollow(format!("etcd names {} primary, not {old}", p.addr));
                            }
                            recorded = false;
                            self.join(p).await;
                            continue;
                        }
                    }
                }
                None if role == "primary" => {
                    return Ended::LeaseLost(format!(
                        "etcd no longer names this server primary of shard {shard_id}"
                    ));
                }
                None => {
                    if self.campaign(&view, &mut restored).await {
                        continue;
                    }
                }
            }
            self.config
                .job
                .wait_shard_change(shard_id, view.revision, Duration::from_secs(5))
                .await;
        }
    }

    /// Joins primary `p` as its backup (retrying for the join timeout).
    async fn join(&self, p: &Holder) {
        let started = Instant::now();
        match self
            .replication
            // A primary that does not answer may be dead with its lease
            // still running: try again after reading etcd anew.
            .join(
                &p.addr,
                &self.config.advertised,
                self.config.join_timeout.min(self.config.ttl),
            )
            .await
        {
            Ok((seq, bytes)) => {
                let ms = started.elapsed().as_secs_f64() * 1e3;
                tracing::info!(primary = %p.addr, epoch = p.epoch, seq, bytes, ms, "joined as backup");
                // Tests and scripts read this line; keep it stable.
                println!(
                    "joined {} as backup through write {seq} ({bytes} bytes in {ms:.1} ms)",
                    p.addr
                );
            }
            Err(e) => {
                tracing::warn!(primary = %p.addr, "cannot join: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }

    /// With no primary: waits while a live standby (another server) may
    /// take over; otherwise campaigns, as the standby if etcd names this
    /// server, else after restoring its newest checkpoint. Returns whether
    /// to read the keys again at once.
    async fn campaign(&self, view: &ShardView, restored: &mut bool) -> bool {
        let server_id = self.replication.server_id();
        let standby = view.standby.as_ref().map(|(s, _)| s);
        if let Some(s) = standby
            && s.server_id != server_id
            && view.members.contains(&s.server_id)
        {
            tracing::info!(standby = %s.addr, "no primary; waiting for the standby to take over");
            return false;
        }
        let as_standby = standby.is_some_and(|s| s.server_id == server_id)
            && self.replication.following().is_some();
        if !as_standby && !*restored && self.replication.following().is_none() {
            if let Err(e) = self.restore() {
                tracing::error!("cannot restore: {e}");
                return false;
            }
            *restored = true;
        }
        let me = (server_id, self.config.advertised.as_str());
        match self
            .config
            .job
            .campaign(self.shard.shard_id(), me, self.lease, view)
            .await
        {
            Ok(Some(epoch)) => {
                *self.me.lock().unwrap_or_else(|p| p.into_inner()) = Some(Holder {
                    epoch,
                    server_id,
                    addr: self.config.advertised.clone(),
                });
                if let Err(e) = self.replication.promote_to(epoch) {
                    tracing::error!("won the campaign but cannot serve: {e}");
                    return false;
                }
                // Tests and scripts read this line; keep it stable.
                println!(
                    "primary of shard {} at epoch {epoch}{}",
                    self.shard.shard_id(),
                    if as_standby {
                        " (promoted standby)"
                    } else {
                        ""
                    }
                );
                true
            }
            Ok(None) => true,
            Err(e) => {
                tracing::warn!("cannot campaign: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
                true
            }
        }
    }

    /// Loads the newest checkpoint of this shard under the checkpoint
    /// root, if there is one.
    fn restore(&self) -> Result<(), PsError> {
        let Some(root) = &self.config.checkpoint_root else {
            return Ok(());
        };
        let started = Instant::now();
        let newest = Checkpoints::new(root.clone())
            .newest(self.shard.shard_id(), self.shard.num_shards())?;
        let Some((dir, snapshot)) = newest else {
            // Scripts read this line; keep it stable.
            println!("no checkpoint to restore; starting empty");
            return Ok(());
        };
        self.shard.load(snapshot)?;
        let rows: usize = self
            .shard
            .table_stats()
            .iter()
            .map(|t| t.rows as usize)
            .sum();
        let ms = started.elapsed().as_secs_f64() * 1e3;
        tracing::info!(from = %dir.display(), rows, ms, "restored checkpoint");
        // Scripts read these lines to measure recovery; keep them stable.
        println!("restored {rows} rows in {ms:.1} ms");
        println!("restored from {}", dir.display());
        self.replication
            .set_restored_from(dir.display().to_string());
        Ok(())
    }
}

fn secs(ttl: i64) -> Duration {
    Duration::from_secs(u64::try_from(ttl).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::{Peer, Replicated, Role};

    /// Records nothing; answers that it did.
    #[derive(Debug)]
    struct Recorded;

    impl Standbys for Recorded {
        fn caught_up(
            &self,
            _addr: String,
            _server_id: u64,
        ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<bool, PsError>> + Send>>
        {
            Box::pin(async { Ok(true) })
        }

        fn dropped(
            &self,
        ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<bool, PsError>> + Send>>
        {
            Box::pin(async { Ok(true) })
        }
    }

    fn coordinated(role: Role) -> Arc<Replication> {
        let replication = Replication::new(Arc::new(Shard::new(0, 1)), role, Peer::default());
        replication.coordinate(Arc::new(Recorded));
        replication
    }

    #[tokio::test]
    async fn a_coordinated_backup_is_promoted_by_its_coordinator_not_by_promote() {
        let replication = coordinated(Role::Backup);
        let refused = replication.promote().await.unwrap_err();
        assert!(
            matches!(refused, PsError::FailedPrecondition(_)),
            "{refused}"
        );
        replication.set_fence(Instant::now() + Duration::from_secs(60));
        replication.promote_to(4).unwrap();
        assert_eq!(replication.description().role, "primary");
        assert_eq!(replication.epoch(), 4);
        replication.check_serving().unwrap();
    }

    #[test]
    fn a_primary_past_its_fence_serves_nothing_until_it_renews() {
        let replication = coordinated(Role::Backup);
        replication.promote_to(1).unwrap();
        replication.set_fence(Instant::now() - Duration::from_millis(1));
        assert!(matches!(
            replication.check_serving(),
            Err(PsError::Unavailable(_))
        ));
        replication.set_fence(Instant::now() + Duration::from_secs(60));
        replication.check_serving().unwrap();
        // Given back: no later renewal moves the fence again.
        replication.set_fence_now();
        replication.set_fence(Instant::now() + Duration::from_secs(60));
        assert!(matches!(
            replication.check_serving(),
            Err(PsError::Unavailable(_))
        ));
    }

    #[test]
    fn writes_of_an_older_epoch_are_refused() {
        let replication = coordinated(Role::Backup);
        replication.promote_to(3).unwrap();
        // A promoted server refuses an older primary's writes whatever
        // stream they name.
        let refused = replication
            .apply_replicated((77, 2), 1, 1, |_, _| Ok(()))
            .unwrap_err();
        assert!(refused.to_string().contains("fenced"), "{refused}");
        assert!(!matches!(
            replication.apply_replicated((77, 3), 1, 1, |_, _| Ok(())),
            Ok(Replicated::Through(_))
        ));
    }
}
