//! What a shard server counts as it serves: requests, rows and bytes per
//! kind of call, and the outcome and latency of every RPC. The service and
//! the writer add to them; [`super::ShardMetrics`] and `Stats` read them.
//! They live beside the tables, not in them: the store knows nothing of
//! requests.

use std::sync::atomic::{AtomicU64, Ordering};

use super::RpcMetrics;

/// Counters of the requests a shard server has served.
#[derive(Debug, Default)]
pub struct RequestCounters {
    /// CreateTable calls.
    pub create_table: AtomicU64,
    /// Pull calls.
    pub pull: AtomicU64,
    /// Push calls.
    pub push: AtomicU64,
    /// Stats calls.
    pub stats: AtomicU64,
    /// Checkpoint calls.
    pub checkpoint: AtomicU64,
    /// Assign requests.
    pub assign: AtomicU64,
    /// Clock calls.
    pub clock: AtomicU64,
    /// PullMany calls.
    pub pull_many: AtomicU64,
    /// PushMany calls.
    pub push_many: AtomicU64,
    /// Calls answered with an error.
    pub errors: AtomicU64,
    /// Rows returned by pulls.
    pub rows_pulled: AtomicU64,
    /// Rows updated by pushes.
    pub rows_pushed: AtomicU64,
    /// Encoded bytes of pull requests and their responses.
    pub pull_bytes: AtomicU64,
    /// Encoded bytes of push requests and their responses.
    pub push_bytes: AtomicU64,
    /// Push calls applied (a `PushMany` counts once), from workers or replicated.
    pub updates_applied: AtomicU64,
    /// Push calls acknowledged as duplicates of an applied `(writer, seq)`.
    pub duplicate_pushes: AtomicU64,
    /// Writes applied from the primary's Replicate calls (backup).
    pub replicated_entries: AtomicU64,
}

impl RequestCounters {
    /// Adds `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// Everything one shard server counts. Share it (in an `Arc`) between the
/// service and a [`super::ShardMetrics`] collector.
#[derive(Debug, Default)]
pub struct ShardCounters {
    /// Requests, rows and bytes.
    pub requests: RequestCounters,
    /// Per-RPC outcomes and latencies.
    pub rpcs: RpcMetrics,
}
