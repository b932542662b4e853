//! Walks over a whole table, one segment at a time: every row (for a
//! snapshot or a checkpoint), and the record of the rows changed and
//! removed since the last take (for incremental checkpoints), in memory
//! and on disk alike.

use std::sync::atomic::Ordering;

use ps_common::routing::mix64;

use super::tiers::segment_hashes;
use super::{SparseRows, read, write};
use crate::store::disk::DiskError;

impl SparseRows {
    /// From now on, records which rows change and the keys of removed rows
    /// for [`SparseRows::take_changes`] (the next take clears what was
    /// recorded before, so it starts from a clean record).
    pub(crate) fn record_changes(&self) {
        self.record_changes.store(true, Ordering::Relaxed);
    }

    /// The changes since they were last taken, one segment at a time under
    /// its write lock (so each segment's changes are taken whole): hands
    /// every row that changed to `row` (`only_changed` false: every row),
    /// in memory or on disk, and every key removed to `removed`, and clears
    /// both records. A key removed and then created again is handed to both.
    pub(crate) fn take_changes(
        &self,
        only_changed: bool,
        mut row: impl FnMut(u64, &[f32]),
        mut removed: impl FnMut(u64),
    ) -> Result<(), DiskError> {
        for (s, lock) in self.segments.iter().enumerate() {
            let mut segment = write(lock);
            let segment = &mut *segment;
            for key in segment.removed.drain(..) {
                removed(key);
            }
            let mut left = segment.len;
            for chunk in &mut segment.chunks {
                let rows = chunk.rows.chunks_exact(segment.row_len);
                for (at, (&key, values)) in chunk.keys.iter().zip(rows).take(left).enumerate() {
                    if !only_changed || chunk.changed[at / 64] >> (at % 64) & 1 == 1 {
                        row(key, values);
                    }
                }
                chunk.changed.fill(0);
                left = left.saturating_sub(chunk.keys.len());
            }
            if let Some(cold) = self.cold() {
                let mut taken = Vec::new();
                cold.for_range(segment_hashes(s), |r| {
                    if !only_changed || r.changed {
                        row(r.key, &r.floats);
                    }
                    if r.changed {
                        taken.push(mix64(r.key));
                    }
                })?;
                cold.mark_unchanged(&taken)?;
            }
        }
        Ok(())
    }

    /// Hands every row to `each` as `(key, floats)`, in memory or on disk,
    /// one segment at a time under its read lock (rows are not captured at
    /// one instant).
    pub(crate) fn for_each(&self, mut each: impl FnMut(u64, &[f32])) -> Result<(), DiskError> {
        for (s, lock) in self.segments.iter().enumerate() {
            let segment = read(lock);
            let mut left = segment.len;
            for chunk in &segment.chunks {
                let rows = chunk.rows.chunks_exact(segment.row_len);
                for (&key, row) in chunk.keys.iter().zip(rows).take(left) {
                    each(key, row);
                }
                left = left.saturating_sub(chunk.keys.len());
            }
            if let Some(cold) = self.cold() {
                cold.for_range(segment_hashes(s), |r| each(r.key, &r.floats))?;
            }
        }
        Ok(())
    }
}
