//! Where the shards' primaries are when a coordinator (etcd) decides:
//! every shard's primary at connect ([`PsClient::discover`]), and a failed
//! primary's replacement ([`Replicas::follow_coordinator`]). The client
//! only reads etcd; it never promotes.

use super::*;

impl PsClient {
    /// The primary of every shard of `job`, in shard order, as etcd names
    /// them; waits up to `timeout` for the job's servers to register and
    /// every shard to have a primary.
    pub async fn discover(
        job: &ps_common::coordinator::Job,
        timeout: Duration,
    ) -> Result<Vec<String>, PsError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let found = async {
                let Some(n) = job.num_shards().await? else {
                    return Ok((
                        Err("no server of the job has registered yet".to_string()),
                        0,
                    ));
                };
                let (primaries, revision) = job.primaries(n).await?;
                let missing: Vec<usize> = (0..primaries.len())
                    .filter(|&i| primaries[i].is_none())
                    .collect();
                Ok::<_, PsError>(if missing.is_empty() {
                    (
                        Ok(primaries.into_iter().flatten().map(|p| p.addr).collect()),
                        revision,
                    )
                } else {
                    (
                        Err(format!("shards {missing:?} of {n} have no primary yet")),
                        revision,
                    )
                })
            };
            let (last, revision) = match found.await {
                Ok((Ok(addrs), _)) => return Ok(addrs),
                Ok((Err(why), revision)) => (why, revision),
                Err(e) => (e.to_string(), 0),
            };
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return Err(PsError::Unavailable(format!(
                    "job {} in etcd ({}): {last}",
                    job.name(),
                    job.etcd().endpoints().join(",")
                )));
            }
            if revision == 0
                || !job
                    .wait_shards_change(revision, left.min(Duration::from_secs(1)))
                    .await
            {
                tokio::time::sleep(Duration::from_millis(100).min(left)).await;
            }
        }
    }
}

impl Replicas {
    /// Coordinated: waits (up to the connect timeout) for etcd to name a
    /// primary of this shard other than the one that failed, and sends
    /// later calls to it. The standby is promoted by etcd once the failed
    /// primary's lease runs out; nothing is promoted from here.
    pub(super) async fn follow_coordinator(
        &self,
        job: &ps_common::coordinator::Job,
        generation: u64,
        stats: &Inner,
        failed: std::time::Instant,
    ) {
        let old = self.conn().1.addr;
        let deadline = tokio::time::Instant::now() + self.config.connect_timeout;
        let shard = self.id as u32;
        let mut why = String::from("etcd named no other primary in time");
        while tokio::time::Instant::now() < deadline {
            let view = match job.shard(shard).await {
                Ok(view) => view,
                Err(e) => {
                    why = e.to_string();
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            if let Some(primary) = view.primary.filter(|p| p.addr != old) {
                let mut config = self.config.clone();
                config.connect_timeout = config.connect_timeout.min(Duration::from_secs(5));
                match connect_one(self.id, primary.addr.clone(), &config).await {
                    Ok((conn, described)) if described.role == "primary" => {
                        *self
                            .current
                            .write()
                            .unwrap_or_else(|poisoned| poisoned.into_inner()) =
                            (generation + 1, conn);
                        let ms = failed.elapsed().as_millis() as u64;
                        stats.failovers.fetch_add(1, Ordering::Relaxed);
                        stats.max_failover_ms.fetch_max(ms, Ordering::Relaxed);
                        tracing::warn!(shard = self.id, from = %old, to = %primary.addr, epoch = primary.epoch, ms, "the coordinator named a new primary");
                        return;
                    }
                    Ok((_, described)) => {
                        why = format!("{} answers as {}", primary.addr, described.role)
                    }
                    Err(e) => why = e.to_string(),
                }
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if !job
                .wait_shard_change(shard, view.revision, left.min(Duration::from_secs(1)))
                .await
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        *self
            .failover_refused
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(why);
    }
}
