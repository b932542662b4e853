//! A read replica's loop (`ps-server --follow PRIMARY`): load a snapshot
//! of the primary's shard, then tail the primary's follower log and apply
//! its writes through the shard's [`Writer`], in the primary's order.
//!
//! A follower may be given the shard's primary and its backup: it follows
//! whichever serves as primary, and after a failover (its primary
//! unreachable or deposed for [`GIVE_UP`]) it moves to the next address
//! and starts again from a snapshot there. Or it asks the job's
//! coordinator (etcd) which server is primary, each time it (re)starts.
//!
//! The follower never acknowledges anything: the primary does not wait for
//! it. It measures its own staleness: when a Tail answer brings it to the
//! primary's newest write, it held everything the primary had applied when
//! that answer was composed, which is no earlier than the call's send time
//! plus the time the primary held it ([`Replication::mark_fresh`]). A primary that cannot
//! be reached leaves it serving its rows as they are, its lag growing; a
//! follower that fell behind the log starts again from a fresh snapshot.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::replication::Replication;
use crate::request::Decoder;
use crate::writer::Writer;

/// How long a Tail call may wait at the primary for a new write.
const TAIL_WAIT: Duration = Duration::from_millis(500);
/// The pause after a failed call before the next.
const RETRY: Duration = Duration::from_millis(200);
/// How long Tail calls may fail in a row before the follower tries the
/// next address.
pub const GIVE_UP: Duration = Duration::from_secs(3);

/// Where a follower finds its shard's primary.
#[derive(Debug, Clone)]
pub enum Primaries {
    /// Among these addresses, tried in turn.
    Listed(Vec<String>),
    /// The server etcd names primary of the shard.
    Coordinator(ps_common::coordinator::Job),
}

impl Primaries {
    /// The address to follow next (the `attempt`-th try); `None` when
    /// there is none to try yet (etcd names no primary, or cannot be read).
    async fn next(&self, shard: u32, attempt: usize) -> Option<String> {
        match self {
            Primaries::Listed(addrs) if addrs.is_empty() => None,
            Primaries::Listed(addrs) => Some(addrs[attempt % addrs.len()].clone()),
            Primaries::Coordinator(job) => match job.shard(shard).await {
                Ok(view) => view.primary.map(|p| p.addr),
                Err(e) => {
                    tracing::warn!("cannot read the shard's primary from etcd: {e}");
                    None
                }
            },
        }
    }
}

/// Follows the shard's primary, found as `primaries` says, until the
/// replication is closed: snapshots, then tails, then snapshots again
/// whenever the log no longer serves it.
pub async fn follow(
    replication: Arc<Replication>,
    writer: Writer,
    decoder: Decoder,
    (shard, primaries): (u32, Primaries),
) {
    let mut backoff = RETRY;
    for attempt in 0.. {
        if replication.is_closed() {
            return;
        }
        let Some(primary) = primaries.next(shard, attempt).await else {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
            continue;
        };
        let primary = &primary;
        let log = match replication.follow_snapshot(primary).await {
            Ok((seq, bytes, log)) => {
                tracing::info!(%primary, through = seq, bytes, "follower loaded its primary's snapshot");
                backoff = RETRY;
                log
            }
            Err(e) => {
                tracing::warn!(%primary, "cannot follow yet: {e}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        tail(&replication, &writer, &decoder, primary, log).await;
    }
}

/// Applies log `log` until it no longer serves this follower (OUT_OF_RANGE,
/// or no answer for [`GIVE_UP`]) or the replication is closed.
async fn tail(
    replication: &Arc<Replication>,
    writer: &Writer,
    decoder: &Decoder,
    primary: &str,
    log: u64,
) {
    let mut failing_since: Option<Instant> = None;
    while !replication.is_closed() {
        let after = replication.applied_through();
        let sent = Instant::now();
        let answer = match replication.tail(primary, log, after, TAIL_WAIT).await {
            Ok(answer) => answer,
            Err(status) if status.code() == tonic::Code::OutOfRange => {
                tracing::warn!(%primary, "{}", status.message());
                return;
            }
            Err(status) => {
                let since = *failing_since.get_or_insert(sent);
                if since.elapsed() >= GIVE_UP {
                    tracing::warn!(%primary, "the primary has not answered for {} s ({}); trying the next address", GIVE_UP.as_secs(), status.message());
                    return;
                }
                tracing::debug!(%primary, "Tail failed: {}", status.message());
                tokio::time::sleep(RETRY).await;
                continue;
            }
        };
        failing_since = None;
        let writes = answer
            .entries
            .into_iter()
            .zip(answer.first_seq..)
            .map(|(entry, seq)| decoder.replicated(entry, seq))
            .collect::<Result<Vec<_>, _>>();
        let writes = match writes {
            Ok(writes) => writes,
            Err(e) => {
                tracing::error!(%primary, "the primary's log holds a write this follower cannot decode: {e}; following again from a snapshot");
                return;
            }
        };
        let (writer, first_seq) = (writer.clone(), answer.first_seq);
        let applied =
            tokio::task::spawn_blocking(move || writer.replicate((log, 0), first_seq, &writes))
                .await;
        match applied {
            Ok(Ok(_)) => {
                if replication.applied_through() >= answer.newest {
                    // The primary composed its answer at least `held_ms`
                    // after the call was sent.
                    let held = Duration::from_millis(u64::from(answer.held_ms)).min(sent.elapsed());
                    replication.mark_fresh(sent + held);
                }
            }
            Ok(Err(e)) => {
                tracing::error!(%primary, "applying the primary's log failed: {e}; following again from a snapshot");
                return;
            }
            Err(e) => {
                tracing::error!("follower apply task failed: {e}");
                return;
            }
        }
    }
}
