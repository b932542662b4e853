//! One shard as the client sees it: the replica serving it now, the backup
//! to fail over to, retries of calls that failed in transport, and the
//! numbering of this client's push calls to it.

use super::*;

/// Most times one call is sent before its error is returned (without a
/// coordinator; with one, the connect timeout bounds a call's retries).
pub(super) const MAX_ATTEMPTS: u32 = 8;
/// How often a client asks the serving replica of a shard for its backup.
pub(super) const BACKUP_REFRESH: Duration = Duration::from_secs(2);
/// How long a call may go unanswered before the client checks that the
/// replica still answers at all.
pub(super) const HANG_PROBE_AFTER: Duration = Duration::from_secs(1);

/// One shard: the replica serving it now, the backup to fail over to, and
/// the numbering of this client's push calls to it.
#[derive(Debug)]
pub(super) struct Replicas {
    pub(super) id: usize,
    pub(super) current: RwLock<(u64, ShardConn)>,
    /// The backup to promote if the serving replica fails: listed, reported
    /// at connect, or learned later ([`Replicas::learn_backup`]).
    pub(super) standby: Mutex<Option<String>>,
    /// Held while failing over, so concurrent failures promote once.
    pub(super) failing_over: tokio::sync::Mutex<()>,
    /// When the serving replica was last asked for its backup.
    pub(super) asked_for_backup: Mutex<std::time::Instant>,
    /// Why the last failover did not happen (the backup's refusal), for
    /// the error a call ends with.
    pub(super) failover_refused: Mutex<Option<String>>,
    /// Sequence number of this client's next push call to the shard.
    pub(super) next_seq: AtomicU64,
    pub(super) config: ClientConfig,
}

impl Replicas {
    pub(super) fn new(
        id: usize,
        conn: ShardConn,
        standby: Option<String>,
        config: ClientConfig,
    ) -> Replicas {
        Replicas {
            id,
            current: RwLock::new((0, conn)),
            standby: Mutex::new(standby.filter(|s| !s.is_empty())),
            failing_over: tokio::sync::Mutex::new(()),
            asked_for_backup: Mutex::new(std::time::Instant::now()),
            failover_refused: Mutex::new(None),
            next_seq: AtomicU64::new(1),
            config,
        }
    }

    /// The replica serving now, and its generation.
    pub(super) fn conn(&self) -> (u64, ShardConn) {
        self.current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Keys per request for rows of `dim` floats, under the serving replica's limits.
    pub(super) fn chunk_keys(&self, dim: usize) -> usize {
        let current = self
            .current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        current.1.chunk_keys(dim)
    }

    /// Most keys in one request to the serving replica, and most bytes in
    /// one of its requests or answers.
    pub(super) fn limits(&self) -> (usize, usize) {
        let current = self
            .current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        (current.1.max_keys, current.1.max_bytes)
    }

    /// An error about this shard, naming the serving replica.
    pub(super) fn error(&self, message: String) -> PsError {
        let addr = self.conn().1.addr;
        PsError::Shard {
            shard: self.id,
            addr,
            code: tonic::Code::Internal,
            message,
        }
    }

    /// Runs `call` against the serving replica. A transport failure or a
    /// refusal (UNAVAILABLE, a lost connection, a deadline) is retried
    /// with backoff; when the replica is dead, or alive but no longer
    /// primary, the client fails over to the backup first. A call left
    /// unanswered for [`HANG_PROBE_AFTER`] makes the client probe the
    /// replica; one that does not answer the probe is taken for hung, so a
    /// hung primary is failed over within seconds (well inside the backup's
    /// lease) whatever `request_timeout` is. Only idempotent calls go
    /// through here: pulls, table creation, assignments, and pushes
    /// carrying (writer, seq).
    pub(super) async fn call<T, F, Fut>(&self, stats: &Inner, call: F) -> Result<T, PsError>
    where
        F: Fn(ShardConn) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let mut attempt = 0;
        let mut backoff = Duration::from_millis(20);
        let mut failed_at = None;
        self.learn_backup().await;
        loop {
            let (generation, conn) = self.conn();
            let mut hung = false;
            let answer = {
                let sent = call(conn.clone());
                tokio::pin!(sent);
                tokio::select! {
                    answer = &mut sent => answer,
                    () = self.stopped_answering(&conn) => {
                        hung = true;
                        Err(Status::unavailable(format!(
                            "{} stopped answering: a call went unanswered for {HANG_PROBE_AFTER:?} and so did a probe",
                            conn.addr
                        )))
                    }
                }
            };
            let status = match answer {
                Ok(answer) => return Ok(answer),
                Err(status) => status,
            };
            attempt += 1;
            let failed = *failed_at.get_or_insert_with(std::time::Instant::now);
            // With a coordinator, a primary may refuse for a while and then
            // serve again (its lease renewal delayed by an etcd election)
            // or be replaced after its lease: retry for the connect
            // timeout, not a number of attempts.
            let spent = match self.config.coordinator {
                Some(_) => failed.elapsed() >= self.config.connect_timeout,
                None => attempt >= MAX_ATTEMPTS,
            };
            if !retryable(status.code()) || spent {
                let refused = self
                    .failover_refused
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .take();
                let standby = self
                    .standby
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .clone();
                let status = match (refused, standby) {
                    _ if !retryable(status.code()) => status,
                    (Some(why), _) if self.config.coordinator.is_some() => {
                        tonic::Status::new(status.code(), format!("{}; {why}", status.message()))
                    }
                    _ if self.config.coordinator.is_some() => status,
                    (Some(why), _) => tonic::Status::new(
                        status.code(),
                        format!("{}; failing over was refused: {why}", status.message()),
                    ),
                    (None, None) => tonic::Status::new(
                        status.code(),
                        format!(
                            "{}; the shard has no backup to fail over to",
                            status.message()
                        ),
                    ),
                    (None, Some(_)) => status,
                };
                return Err(conn.error(self.id, status));
            }
            stats.retries.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(shard = self.id, addr = %conn.addr, attempt, "retrying after: {status}");
            if hung || !self.serving(&conn).await {
                self.fail_over(generation, stats, failed).await;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }

    /// Asks the serving replica for its backup every [`BACKUP_REFRESH`]:
    /// a replacement that joined after a failover, or none when the primary
    /// dropped its backup (which can no longer be promoted).
    pub(super) async fn learn_backup(&self) {
        if self.config.coordinator.is_some() {
            // etcd decides failovers; the client never promotes.
            return;
        }
        {
            let mut asked = self
                .asked_for_backup
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if asked.elapsed() < BACKUP_REFRESH {
                return;
            }
            *asked = std::time::Instant::now();
        }
        let conn = self.conn().1;
        let probe = async { call!(&conn, describe, pb::DescribeRequest {}) };
        if let Ok(Ok(described)) = tokio::time::timeout(Duration::from_secs(1), probe).await
            && described.role == "primary"
        {
            let backup = Some(described.backup).filter(|b| !b.is_empty() && *b != conn.addr);
            let mut standby = self
                .standby
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if *standby != backup {
                tracing::info!(shard = self.id, backup = ?backup, "the shard's backup changed");
                *standby = backup;
            }
        }
    }

    /// Resolves once `conn` stops answering: after [`HANG_PROBE_AFTER`],
    /// and then every [`HANG_PROBE_AFTER`], it is probed; the first probe
    /// without an answer as a serving primary ends the wait.
    pub(super) async fn stopped_answering(&self, conn: &ShardConn) {
        loop {
            tokio::time::sleep(HANG_PROBE_AFTER).await;
            if !self.serving(conn).await {
                return;
            }
        }
    }

    /// Whether `conn` answers as a serving primary within a second.
    pub(super) async fn serving(&self, conn: &ShardConn) -> bool {
        let probe = async { call!(conn, describe, pb::DescribeRequest {}) };
        matches!(
            tokio::time::timeout(Duration::from_secs(1), probe).await,
            Ok(Ok(described)) if described.role.is_empty() || described.role == "primary"
        )
    }

    /// Promotes the backup and sends later calls to it, unless another
    /// call already moved past `generation` or there is no backup left.
    pub(super) async fn fail_over(
        &self,
        generation: u64,
        stats: &Inner,
        failed: std::time::Instant,
    ) {
        let _one_at_a_time = self.failing_over.lock().await;
        if self.conn().0 != generation {
            return;
        }
        if let Some(job) = &self.config.coordinator {
            return self
                .follow_coordinator(job, generation, stats, failed)
                .await;
        }
        let Some(addr) = self
            .standby
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
        else {
            return;
        };
        let mut config = self.config.clone();
        config.connect_timeout = config.connect_timeout.min(Duration::from_secs(5));
        let promoted = async {
            let (conn, _) = connect_one(self.id, addr.clone(), &config).await?;
            call!(&conn, promote, pb::PromoteRequest {}).map_err(|s| conn.error(self.id, s))?;
            Ok::<_, PsError>(conn)
        };
        match promoted.await {
            Ok(conn) => {
                let old = std::mem::replace(
                    &mut *self
                        .current
                        .write()
                        .unwrap_or_else(|poisoned| poisoned.into_inner()),
                    (generation + 1, conn),
                );
                *self
                    .standby
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner()) = None;
                let ms = failed.elapsed().as_millis() as u64;
                stats.failovers.fetch_add(1, Ordering::Relaxed);
                stats.max_failover_ms.fetch_max(ms, Ordering::Relaxed);
                tracing::warn!(shard = self.id, from = %old.1.addr, to = %addr, ms, "failed over to the backup");
            }
            Err(e) => {
                tracing::warn!(shard = self.id, backup = %addr, "cannot fail over yet: {e}");
                *self
                    .failover_refused
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(e.to_string());
            }
        }
    }
}

/// Whether a failed call may succeed when sent again (possibly elsewhere).
pub(super) fn retryable(code: tonic::Code) -> bool {
    use tonic::Code;
    matches!(
        code,
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded
    )
}
