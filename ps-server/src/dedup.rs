//! Which pushes a shard has applied, by `(writer, seq)`, so that a push
//! retried after a lost answer is applied at most once.
//!
//! A writer is one client process (a random 64-bit id); `seq` numbers its
//! push calls to this shard. For each writer the shard remembers the last
//! [`WINDOW`] sequence numbers it applied (a client retries only the few
//! calls it has in flight) and, for each, the replication number of the
//! write that applied it, so that a duplicate can wait until that write is
//! on the backup before it is acknowledged. At most [`MAX_WRITERS`] writers
//! are remembered; past that, the one unused longest is forgotten.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// Sequence numbers remembered per writer.
pub const WINDOW: usize = 1024;
/// Writers remembered per shard.
pub const MAX_WRITERS: usize = 4096;

/// One writer's applied sequence numbers.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WriterRecord {
    /// Every seq at or below this is treated as applied (it fell out of the window).
    pub floor: u64,
    /// Applied seqs above `floor`, each with the replication number of its write.
    pub recent: BTreeMap<u64, u64>,
    /// Logical time of the last claim, for eviction.
    #[serde(skip)]
    last_used: u64,
}

/// The applied `(writer, seq)` pairs of one shard.
#[derive(Debug, Default)]
pub struct Applied {
    writers: Mutex<(u64, HashMap<u64, WriterRecord>)>,
}

impl Applied {
    /// Records `(writer, seq)` as applied by write `replica_seq`, unless it
    /// already was: then returns the replication number of the write that
    /// applied it. `writer = 0` is never recorded (`None`: apply).
    pub fn claim(&self, writer: u64, seq: u64, replica_seq: u64) -> Option<u64> {
        if writer == 0 {
            return None;
        }
        let mut guard = self
            .writers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let (clock, writers) = &mut *guard;
        *clock += 1;
        if !writers.contains_key(&writer) && writers.len() >= MAX_WRITERS {
            let oldest = writers
                .iter()
                .min_by_key(|(_, r)| r.last_used)
                .map(|(&w, _)| w);
            if let Some(oldest) = oldest {
                writers.remove(&oldest);
            }
        }
        let record = writers.entry(writer).or_default();
        record.last_used = *clock;
        if seq <= record.floor {
            return Some(0);
        }
        if let Some(&earlier) = record.recent.get(&seq) {
            return Some(earlier);
        }
        record.recent.insert(seq, replica_seq);
        while record.recent.len() > WINDOW {
            if let Some((old, _)) = record.recent.pop_first() {
                record.floor = old;
            }
        }
        None
    }

    /// A copy of every writer's record (for a joining backup).
    pub fn snapshot(&self) -> Vec<(u64, WriterRecord)> {
        let guard = self
            .writers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        guard.1.iter().map(|(&w, r)| (w, r.clone())).collect()
    }

    /// Replaces every record with `records`.
    pub fn restore(&self, records: Vec<(u64, WriterRecord)>) {
        let mut guard = self
            .writers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        guard.1 = records.into_iter().collect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pair_is_claimed_once_and_a_repeat_names_the_write_that_applied_it() {
        let applied = Applied::default();
        assert_eq!(applied.claim(7, 1, 100), None);
        assert_eq!(applied.claim(7, 2, 101), None);
        assert_eq!(applied.claim(7, 1, 102), Some(100));
        assert_eq!(applied.claim(8, 1, 103), None, "writers are independent");
        assert_eq!(
            applied.claim(0, 1, 104),
            None,
            "writer 0 is never deduplicated"
        );
        assert_eq!(applied.claim(0, 1, 105), None);
    }

    #[test]
    fn out_of_order_seqs_are_each_applied_once_and_old_ones_stay_applied() {
        let applied = Applied::default();
        // Calls in flight together arrive in any order.
        let last = WINDOW as u64 + 64;
        for block in (1..=last).collect::<Vec<_>>().chunks(8) {
            for &seq in block.iter().rev() {
                assert_eq!(applied.claim(1, seq, seq), None, "seq {seq} is new");
            }
        }
        for seq in 1..=last {
            assert!(
                applied.claim(1, seq, 0).is_some(),
                "seq {seq} applied twice"
            );
        }
        let records = applied.snapshot();
        assert_eq!(records[0].1.recent.len(), WINDOW);
    }

    #[test]
    fn past_the_writer_limit_the_longest_unused_writer_is_forgotten() {
        let applied = Applied::default();
        for writer in 1..=MAX_WRITERS as u64 {
            applied.claim(writer, 1, 0);
        }
        applied.claim(1, 2, 0); // writer 1 is now the most recent
        applied.claim(MAX_WRITERS as u64 + 1, 1, 0);
        assert_eq!(applied.claim(1, 1, 0), Some(0), "writer 1 kept");
        assert_eq!(applied.claim(2, 1, 0), None, "writer 2 forgotten");
    }

    #[test]
    fn a_restored_snapshot_knows_the_same_pairs() {
        let applied = Applied::default();
        applied.claim(3, 9, 42);
        let copy = Applied::default();
        copy.restore(applied.snapshot());
        assert_eq!(copy.claim(3, 9, 0), Some(42));
    }
}
