//! Which pushes a shard has applied, by `(writer, seq)`, so that a push
//! retried after a lost answer is applied at most once.
//!
//! A writer is one client process (a random 64-bit id); `seq` numbers its
//! push calls to this shard, from 1. For each writer the shard remembers the
//! last [`WINDOW`] sequence numbers it applied (a client retries only the
//! few calls it has in flight) and, for each, the replication number of the
//! write that applied it, so that a duplicate can wait until that write is
//! on the backup before it is acknowledged. At most [`MAX_WRITERS`] writers
//! are remembered; past that, the one unused longest is forgotten.
//!
//! A seq below the window is [`Claim::Forgotten`]: the shard cannot tell
//! whether it was applied, so the push is refused rather than acknowledged
//! unapplied or applied twice. A writer the shard does not know (first
//! contact, a restore from a checkpoint, or forgotten as above) starts with
//! its window ending at the seq it sends, so older calls still in flight
//! arrive inside it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// Sequence numbers remembered per writer.
pub const WINDOW: usize = 1024;
/// Writers remembered per shard.
pub const MAX_WRITERS: usize = 4096;

/// What [`Applied::claim`] found for a `(writer, seq)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// Not applied before: recorded now; apply it.
    New,
    /// Applied before, by the write with this replication number.
    Repeat(u64),
    /// Below the writer's window: whether it was applied is not known.
    Forgotten {
        /// Every seq at or below this is outside the window.
        floor: u64,
    },
}

/// One writer's applied sequence numbers.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WriterRecord {
    /// Seqs at or below this fell out of the window: unknown whether applied.
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
    /// already was ([`Claim::Repeat`]) or is too old to tell
    /// ([`Claim::Forgotten`]). `writer = 0` is never recorded (always
    /// [`Claim::New`]).
    pub fn claim(&self, writer: u64, seq: u64, replica_seq: u64) -> Claim {
        if writer == 0 {
            return Claim::New;
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
        let record = writers.entry(writer).or_insert_with(|| WriterRecord {
            floor: seq.saturating_sub(WINDOW as u64),
            ..WriterRecord::default()
        });
        record.last_used = *clock;
        if seq <= record.floor {
            return Claim::Forgotten {
                floor: record.floor,
            };
        }
        if let Some(&earlier) = record.recent.get(&seq) {
            return Claim::Repeat(earlier);
        }
        record.recent.insert(seq, replica_seq);
        while record.recent.len() > WINDOW {
            if let Some((old, _)) = record.recent.pop_first() {
                record.floor = old;
            }
        }
        Claim::New
    }

    /// Forgets `(writer, seq)` again: the call it claimed was refused.
    pub fn cancel(&self, writer: u64, seq: u64) {
        if writer == 0 {
            return;
        }
        let mut guard = self
            .writers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(record) = guard.1.get_mut(&writer) {
            record.recent.remove(&seq);
        }
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
        assert_eq!(applied.claim(7, 1, 100), Claim::New);
        assert_eq!(applied.claim(7, 2, 101), Claim::New);
        assert_eq!(applied.claim(7, 1, 102), Claim::Repeat(100));
        assert_eq!(
            applied.claim(8, 1, 103),
            Claim::New,
            "writers are independent"
        );
        assert_eq!(
            applied.claim(0, 1, 104),
            Claim::New,
            "writer 0 is never deduplicated"
        );
        assert_eq!(applied.claim(0, 1, 105), Claim::New);
    }

    #[test]
    fn out_of_order_seqs_are_each_applied_once_and_old_ones_are_never_acknowledged_unapplied() {
        let applied = Applied::default();
        // Calls in flight together arrive in any order.
        let last = WINDOW as u64 + 64;
        for block in (1..=last).collect::<Vec<_>>().chunks(8) {
            for &seq in block.iter().rev() {
                assert_eq!(applied.claim(1, seq, seq), Claim::New, "seq {seq} is new");
            }
        }
        for seq in 1..=64 {
            assert_eq!(
                applied.claim(1, seq, 0),
                Claim::Forgotten { floor: 64 },
                "seq {seq} fell out of the window: neither applied again nor called a repeat"
            );
        }
        for seq in 65..=last {
            assert_eq!(applied.claim(1, seq, 0), Claim::Repeat(seq), "seq {seq}");
        }
        let records = applied.snapshot();
        assert_eq!(records[0].1.recent.len(), WINDOW);
    }

    #[test]
    fn a_writer_first_seen_mid_stream_accepts_the_calls_still_in_flight_before_it() {
        let applied = Applied::default();
        // After a restore the shard knows no writer; a client goes on at seq 5000.
        assert_eq!(applied.claim(9, 5000, 1), Claim::New);
        assert_eq!(
            applied.claim(9, 4998, 2),
            Claim::New,
            "in flight, arrived late"
        );
        let floor = 5000 - WINDOW as u64;
        assert_eq!(applied.claim(9, floor, 3), Claim::Forgotten { floor });
    }

    #[test]
    fn past_the_writer_limit_the_longest_unused_writer_is_forgotten() {
        let applied = Applied::default();
        for writer in 1..=MAX_WRITERS as u64 {
            applied.claim(writer, 1, 0);
        }
        applied.claim(1, 2, 0); // writer 1 is now the most recent
        applied.claim(MAX_WRITERS as u64 + 1, 1, 0);
        assert_eq!(applied.claim(1, 1, 0), Claim::Repeat(0), "writer 1 kept");
        assert_eq!(applied.claim(2, 1, 0), Claim::New, "writer 2 forgotten");
    }

    #[test]
    fn a_restored_snapshot_knows_the_same_pairs() {
        let applied = Applied::default();
        applied.claim(3, 9, 42);
        let copy = Applied::default();
        copy.restore(applied.snapshot());
        assert_eq!(copy.claim(3, 9, 0), Claim::Repeat(42));
    }
}
