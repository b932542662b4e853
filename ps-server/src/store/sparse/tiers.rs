//! Rows moving between a table's memory and its disk tier
//! ([`crate::store::disk`]): moved out by eviction, brought back by the
//! requests that touch them, looked up, dropped and swept.
//!
//! Every move runs under the row's segment write lock, and every lookup
//! that misses in memory looks on disk under the lock it missed under, so
//! a row is always in exactly one tier (see the parent module's doc).

use std::ops::RangeInclusive;
use std::sync::atomic::Ordering;

use ps_common::routing::mix64;

use super::batch::Batch;
use super::segment::Segment;
use super::{SEGMENT_SHIFT, SEGMENTS, SparseRows, read, write};
use crate::store::disk::{ColdRows, DiskError};

/// What [`SparseRows::load_batch`] brought back from disk.
#[derive(Debug, Clone, Copy)]
pub(super) struct Loaded {
    /// Rows brought back.
    pub(super) rows: usize,
    /// [`SparseRows::moves_out`] when it did.
    pub(super) moves_out: u64,
}

impl Loaded {
    /// Nothing brought back, and every run looks on disk itself.
    pub(super) const NOTHING: Loaded = Loaded {
        rows: 0,
        moves_out: u64::MAX,
    };
}

/// Rows an eviction that drops rows removed, by tier.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Dropped {
    pub(crate) memory: usize,
    pub(crate) disk: usize,
}

/// The mixed keys of segment `s`'s rows: its range of keys on disk.
pub(super) fn segment_hashes(s: usize) -> RangeInclusive<u64> {
    let low = (s as u64) << SEGMENT_SHIFT;
    low..=low | ((1u64 << SEGMENT_SHIFT) - 1)
}

impl SparseRows {
    /// The rows on disk, if there are any. Ask under the segment lock a
    /// lookup holds: a move to disk counts its rows before it releases the
    /// lock, so a lookup that missed in memory then sees them.
    pub(super) fn cold(&self) -> Option<&ColdRows> {
        self.cold.as_ref().filter(|c| c.len() > 0)
    }

    /// Rows on disk.
    pub(crate) fn on_disk(&self) -> u64 {
        self.cold.as_ref().map_or(0, ColdRows::len)
    }

    /// Whether cold rows can move to disk.
    pub(crate) fn has_disk(&self) -> bool {
        self.cold.is_some()
    }

    /// Brings the rows of `positions` (in `keys`, whose mixed keys are
    /// `hashes`) that are on disk back into memory in one commit: the
    /// segments they fall in are write-locked together, in segment order
    /// (as batch reads take their read locks; no lock is taken while the
    /// disk's writer is held). A request that would bring rows back one
    /// segment at a time would commit once per segment. Returns how many
    /// came back, and the count of moves to disk then ([`Loaded`]): rows
    /// moved to disk again before the request reaches them come back in
    /// its own pass ([`SparseRows::write_run`]).
    pub(super) fn load_batch(
        &self,
        keys: &[u64],
        hashes: &[u64],
        positions: impl Iterator<Item = usize> + Clone,
    ) -> Result<Loaded, DiskError> {
        if self.cold().is_none() {
            let moves_out = self.moves_out.load(Ordering::Relaxed);
            return Ok(Loaded { rows: 0, moves_out });
        }
        let mut guards = self.lock_touched(positions.clone().map(|i| hashes[i]), write);
        let moves_out = self.moves_out.load(Ordering::Relaxed);
        let Some(cold) = self.cold() else {
            return Ok(Loaded { rows: 0, moves_out });
        };
        let missing: Vec<(u64, u64)> = positions
            .map(|i| (hashes[i], keys[i]))
            .filter(|&(h, k)| {
                let segment = guards[(h >> SEGMENT_SHIFT) as usize].as_ref();
                segment.is_some_and(|s| s.find(k, h).is_none())
            })
            .collect();
        let mut segments: Vec<Option<&mut Segment>> =
            guards.iter_mut().map(|g| g.as_deref_mut()).collect();
        let rows = self.take_back(cold, missing, &mut segments)?;
        Ok(Loaded { rows, moves_out })
    }

    /// Takes the rows of `missing` (`(mixed key, key)`) that are on disk
    /// off it in one commit and inserts each into its segment (locked for
    /// writing by the caller, `segments[s]`), with its touch record and
    /// changed mark. Returns how many came back.
    fn take_back(
        &self,
        cold: &ColdRows,
        mut missing: Vec<(u64, u64)>,
        segments: &mut [Option<&mut Segment>],
    ) -> Result<usize, DiskError> {
        missing.sort_unstable();
        missing.dedup();
        if missing.is_empty() {
            return Ok(0);
        }
        let hashes: Vec<u64> = missing.iter().map(|&(h, _)| h).collect();
        let mut loaded = 0;
        for ((hash, key), row) in missing.into_iter().zip(cold.take_many(&hashes)?) {
            if let (Some(row), Some(segment)) =
                (row, &mut segments[(hash >> SEGMENT_SHIFT) as usize])
            {
                let at = segment.insert(key, hash);
                segment.row_mut(at).copy_from_slice(&row.floats);
                segment.set_meta(at, row.meta);
                segment.set_changed(at, row.changed);
                loaded += 1;
            }
        }
        self.len.fetch_add(loaded, Ordering::Relaxed);
        Ok(loaded)
    }

    /// Brings the rows of `pairs` (`(key, mixed key)`, all in `segment`,
    /// locked for writing) that are on disk back into memory, with their
    /// touch records and changed marks. Returns how many came back.
    pub(super) fn load_into(
        &self,
        segment: &mut Segment,
        pairs: impl Iterator<Item = (u64, u64)>,
    ) -> Result<usize, DiskError> {
        let Some(cold) = self.cold() else {
            return Ok(0);
        };
        let missing: Vec<(u64, u64)> = pairs
            .filter(|&(k, h)| segment.find(k, h).is_none())
            .map(|(k, h)| (h, k))
            .collect();
        let Some(&(hash, _)) = missing.first() else {
            return Ok(0);
        };
        let mut segments: Vec<Option<&mut Segment>> = (0..SEGMENTS).map(|_| None).collect();
        segments[(hash >> SEGMENT_SHIFT) as usize] = Some(segment);
        self.take_back(cold, missing, &mut segments)
    }

    /// Whether each row of `keys` exists, in memory or on disk: the
    /// segments the keys touch are read-locked together (in segment order,
    /// as batch reads do) and the keys missing in memory looked up on disk
    /// in one read, so no row moving between the tiers is missed.
    pub(crate) fn contains_many(&self, keys: &[u64]) -> Result<Vec<bool>, DiskError> {
        let hashes: Vec<u64> = keys.iter().map(|&k| mix64(k)).collect();
        let guards = self.lock_touched(hashes.iter().copied(), read);
        let mut held: Vec<bool> = (keys.iter().zip(&hashes))
            .map(|(&k, &h)| {
                let segment = guards[(h >> SEGMENT_SHIFT) as usize].as_ref();
                segment.is_some_and(|s| s.find(k, h).is_some())
            })
            .collect();
        if let Some(cold) = self.cold() {
            let missing: Vec<usize> = (0..keys.len()).filter(|&i| !held[i]).collect();
            let on_disk = cold.get_many(&missing.iter().map(|&i| hashes[i]).collect::<Vec<_>>())?;
            for (i, row) in missing.into_iter().zip(on_disk) {
                held[i] = row.is_some();
            }
        }
        Ok(held)
    }

    /// Writes `rows` (`(key, floats)`) straight to disk, in one commit: a
    /// restore's rows past the memory budget, into a table no request sees
    /// yet. A row already in memory is skipped (it stays the one). Returns
    /// the rows written.
    pub(crate) fn put_on_disk<'r>(
        &self,
        rows: impl Iterator<Item = (u64, &'r [f32])>,
    ) -> Result<usize, DiskError> {
        let Some(cold) = &self.cold else {
            return Ok(0);
        };
        let rows: Vec<(u64, &[f32])> = rows.filter(|&(k, _)| !self.in_memory(k)).collect();
        cold.put_many(rows.iter().map(|&(k, r)| (mix64(k), k, (0, 0), false, r)))?;
        Ok(rows.len())
    }

    /// Moves the rows of `keys` that are in memory to disk, with their
    /// touch records and changed marks (a move is not a removal: deltas do
    /// not record it). Segment by segment: the rows are written to disk,
    /// then removed from memory, under the segment's write lock. Returns
    /// the rows moved.
    pub(crate) fn spill(&self, keys: &[u64]) -> Result<usize, DiskError> {
        let Some(cold) = &self.cold else {
            return Ok(0);
        };
        let batch = Batch::of(keys);
        let mut moved = 0;
        for (lock, run) in batch.runs(&self.segments) {
            let mut segment = write(lock);
            let mut rows: Vec<(u64, u64, usize)> = (run.iter())
                .filter_map(|&i| {
                    let (key, hash) = (keys[i], batch.hashes[i]);
                    segment.find(key, hash).map(|at| (hash, key, at))
                })
                .collect();
            rows.sort_unstable();
            rows.dedup();
            if rows.is_empty() {
                continue;
            }
            let segment_ref = &*segment;
            cold.put_many(rows.iter().map(|&(hash, key, at)| {
                (
                    hash,
                    key,
                    segment_ref.meta(at),
                    segment_ref.is_changed(at),
                    segment_ref.row(at),
                )
            }))?;
            for &(hash, key, _) in &rows {
                segment.remove_if(key, hash, false, |_| true);
            }
            self.moves_out.fetch_add(1, Ordering::Relaxed);
            self.len.fetch_sub(rows.len(), Ordering::Relaxed);
            moved += rows.len();
        }
        Ok(moved)
    }

    /// Removes the rows of `keys` from whichever tier holds them (an
    /// eviction that drops rows; deltas record the removals). Returns the
    /// rows removed from each tier.
    pub(crate) fn drop_rows(&self, keys: &[u64]) -> Result<Dropped, DiskError> {
        let batch = Batch::of(keys);
        let record = self.record_changes.load(Ordering::Relaxed);
        let mut dropped = Dropped::default();
        for (lock, run) in batch.runs(&self.segments) {
            let mut segment = write(lock);
            let mut elsewhere = Vec::new();
            for &i in run {
                let (key, hash) = (keys[i], batch.hashes[i]);
                if segment.remove_if(key, hash, record, |_| true) {
                    self.len.fetch_sub(1, Ordering::Relaxed);
                    dropped.memory += 1;
                } else {
                    elsewhere.push(hash);
                }
            }
            let Some(cold) = self.cold() else {
                continue;
            };
            elsewhere.sort_unstable();
            elsewhere.dedup();
            let on_disk: Vec<(u64, u64)> = (elsewhere.iter().zip(cold.get_many(&elsewhere)?))
                .filter_map(|(&hash, row)| row.map(|r| (hash, r.key)))
                .collect();
            let hashes: Vec<u64> = on_disk.iter().map(|&(h, _)| h).collect();
            dropped.disk += cold.remove(&hashes)? as usize;
            if record {
                segment.removed.extend(on_disk.iter().map(|&(_, key)| key));
            }
        }
        Ok(dropped)
    }

    /// Up to `most` keys of rows on disk whose `(last touch, touches)`
    /// `pick` accepts, one segment at a time under its read lock.
    pub(crate) fn keys_on_disk_where(
        &self,
        most: usize,
        pick: impl Fn(u32, u32) -> bool,
    ) -> Result<Vec<u64>, DiskError> {
        let mut keys = Vec::new();
        for (s, lock) in self.segments.iter().enumerate() {
            let _segment = read(lock);
            let Some(cold) = self.cold() else {
                return Ok(keys);
            };
            cold.for_range(segment_hashes(s), |row| {
                if keys.len() < most && pick(row.meta.0, row.meta.1) {
                    keys.push(row.key);
                }
            })?;
            if keys.len() >= most {
                break;
            }
        }
        Ok(keys)
    }
}
