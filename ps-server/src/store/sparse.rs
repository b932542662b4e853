//! A sparse table's rows on one shard: contiguous slabs and a compact index.
//!
//! The rows are split over [`SEGMENTS`] segments by the top bits of the
//! key's hash ([`mix64`]), one lock each: a push holds its row's segment
//! for writing, so it never tears a row, and a pull waits only for writes
//! to the same segment, as with a concurrent map. Batch reads and writes
//! take each segment they touch once per request, not once per row
//! ([`batch`]).
//!
//! Within a segment, rows are numbered `0..len` in order of creation and
//! stored in slabs of about 64 KiB (a power of two rows, [`chunk_rows`]):
//! each slab holds its rows' keys and, back to back, their floats. No row
//! is a heap allocation of its own. The first slab starts at one row and
//! doubles as it fills, so small tables stay small; a segment holds at most
//! one partly filled slab ([`slack_bytes`], which the memory budget charges
//! to the table up front).
//!
//! The index is open addressing with linear probing over `u32` entries (a
//! 6-bit tag from the hash, which spares nearly every key comparison, and
//! the row's number). It grows by a quarter when three quarters full, so it
//! costs 5.3 to 6.7 bytes per row: with the key's 8 bytes a row costs at
//! most [`ROW_OVERHEAD`] (16) bytes beyond its floats. A segment past 2^26
//! rows switches to `u64` entries (21 bytes per row beyond its floats), so
//! a table is bounded only by the memory budget.
//!
//! Removing a row moves the segment's last row into its place (rows stay
//! dense); the index deletes by shifting the probe run back, so no
//! tombstones accumulate.
//!
//! A lookup is three dependent reads at random places (index entry, key,
//! floats): in a table larger than the CPU's caches each one misses. Batch
//! reads and writes on segments past [`PREFETCH_ROWS`] rows therefore
//! prefetch: the index entry of the key [`AHEAD`] x 2 places on, the key and
//! every cache line of the floats of the key [`AHEAD`] places on, so the
//! misses of several keys overlap (ctr26 over gRPC: about +20%). Smaller
//! tables stay cached and skip it. A batch write visits rows segment by
//! segment, not in request order, so it also lets its caller prefetch the
//! input of the key [`AHEAD`] places on (a push's gradient), which would
//! otherwise be read at random.
//!
//! A worker pushes the keys it pulled a step before, in the same order: a
//! large pull leaves the row numbers it found, and the push of the same
//! key list goes straight to them, skipping the index ([`hints`]). A
//! hinted row is written only if it still holds the key, checked under
//! the segment's write lock, so a row that moved in between is looked up.
//!
//! With a disk tier ([`super::disk`]) a table's cold rows can move to disk
//! ([`SparseRows::spill`]) and come back when touched. Both moves happen
//! under the row's segment write lock, and every lookup that misses in
//! memory looks on disk under the same lock it missed under (read or
//! write), so a row is always found in exactly one tier. A write or a
//! storing pull loads the rows it misses back into memory; a pull that
//! stores nothing (a read replica) reads them where they lie.

use std::sync::RwLock;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};

use ps_common::routing::mix64;

use super::disk::{ColdRows, DiskError};
pub(crate) use tiers::Dropped;
use tiers::Loaded;

mod batch;
mod hints;
mod index;
mod segment;
mod tiers;
mod touches;
mod walk;

use batch::{Batch, Written};
use hints::{MAX_ROWS, MIN_KEYS, NO_ROW, PulledRows};
use index::Entry;
use segment::Segment;

/// Segments per table (a power of two).
pub(crate) const SEGMENTS: usize = 64;
const SEGMENT_SHIFT: u32 = 64 - SEGMENTS.trailing_zeros();
/// Bytes a full slab holds at most (keys and floats); its rows are the
/// largest power of two that fits, at least [`MIN_CHUNK_ROWS`] (a row of
/// more than 64 KiB is a slab of its own) and at most [`MAX_CHUNK_ROWS`].
const CHUNK_BYTES: usize = 64 << 10;
const MIN_CHUNK_ROWS: usize = 1;
/// How many keys ahead a batch lookup loads a row (and twice as far ahead
/// its index entry), so the random reads of a large table overlap.
const AHEAD: usize = 8;
/// Segments holding fewer rows than this are looked up without prefetching:
/// a table that small stays in the CPU's caches, where the hints only cost.
const PREFETCH_ROWS: usize = 4096;
/// Rows of a slab at most: small rows waste less in partly filled slabs.
const MAX_CHUNK_ROWS: usize = 1024;

/// Rows of a full slab of rows of `row_len` floats (a power of two).
pub(crate) fn chunk_rows(row_len: usize) -> usize {
    let fit = (CHUNK_BYTES / (row_len * 4 + 8)).clamp(MIN_CHUNK_ROWS, MAX_CHUNK_ROWS);
    1 << fit.ilog2()
}

/// Bytes of slab a table may hold beyond its rows, at most: a segment's
/// first slab starts at one row and doubles until full (so it is less than
/// twice its rows), later slabs are full but the last; either way, less than
/// one full slab per segment.
pub fn slack_bytes(row_len: usize) -> u64 {
    (SEGMENTS * chunk_rows(row_len) * (row_len * 4 + 8)) as u64
}

/// Rows a segment numbers with narrow (`u32`) index entries.
const NARROW_ROWS: usize = <u32 as Entry>::MAX_ROWS;

/// Bytes a row costs beyond its floats, at most: its key and its share of
/// the index at the lowest load (three fifths full, after a growth).
pub const ROW_OVERHEAD: u64 = 16;

/// Bytes a row of a table that tracks touches (for eviction) costs beyond
/// [`ROW_OVERHEAD`]: its last touch and its touch count.
pub const TRACKING_OVERHEAD: u64 = 8;

/// Per-row touch record of a tracking table: `[last touch, touches]`.
pub(crate) const META: usize = 2;

/// Bytes a table's segments cost before any row (locks, empty vectors).
pub const SEGMENTS_OVERHEAD: u64 = (SEGMENTS * std::mem::size_of::<RwLock<Segment>>()) as u64;

/// A sparse table's rows on one shard.
#[derive(Debug)]
pub(crate) struct SparseRows {
    segments: Box<[RwLock<Segment>]>,
    /// Rows held, so that stats never walk the segments.
    len: AtomicUsize,
    /// Whether changes (a bit per changed row, the keys of removed rows)
    /// are recorded for checkpoint deltas: set once an incremental
    /// checkpoint chain starts, so no list grows unread and writes pay
    /// nothing for it until then.
    record_changes: std::sync::atomic::AtomicBool,
    /// Floats per row.
    row_len: usize,
    /// The clock touches are recorded at (a tracking table's; its owner
    /// advances it).
    now: AtomicU32,
    /// The table's rows on disk (a table with eviction on a shard with a
    /// disk tier).
    cold: Option<ColdRows>,
    /// Moves to disk so far (one per segment a move touched, counted
    /// before its lock is released): a request that brought its rows back
    /// skips looking again under a segment's lock if no move came since.
    moves_out: AtomicU64,
    /// The rows recent large pulls found, for the pushes of the same keys.
    pulled: PulledRows,
    /// Rows that pushes found through those hints, without an index lookup.
    hinted: AtomicU64,
}

/// How a write found its row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Added {
    /// In memory.
    Found,
    /// On disk: it came back to memory.
    Loaded,
    /// Nowhere: it was created.
    Created,
}

impl SparseRows {
    /// No rows yet, each `row_len` floats; `tracks`: rows record their
    /// touches (for eviction); `cold`: where cold rows may move to.
    pub(crate) fn new(row_len: usize, tracks: bool, cold: Option<ColdRows>) -> SparseRows {
        let mut rows = Self::with_narrow_rows(row_len, NARROW_ROWS, tracks);
        rows.cold = cold;
        rows
    }

    fn with_narrow_rows(row_len: usize, narrow_rows: usize, tracks: bool) -> SparseRows {
        let narrow_rows = narrow_rows.min(NARROW_ROWS);
        SparseRows {
            segments: (0..SEGMENTS)
                .map(|_| RwLock::new(Segment::new(row_len, narrow_rows, tracks)))
                .collect(),
            len: AtomicUsize::new(0),
            record_changes: std::sync::atomic::AtomicBool::new(false),
            row_len,
            now: AtomicU32::new(0),
            cold: None,
            moves_out: AtomicU64::new(0),
            pulled: PulledRows::default(),
            hinted: AtomicU64::new(0),
        }
    }

    /// The clock touches are recorded at.
    pub(crate) fn now(&self) -> u32 {
        self.now.load(Ordering::Relaxed)
    }

    /// Sets the clock (it only moves forward).
    pub(crate) fn set_now(&self, now: u32) {
        self.now.fetch_max(now, Ordering::Relaxed);
    }

    /// Advances the clock by one tick and returns the tick it left.
    #[cfg(test)]
    pub(crate) fn tick(&self) -> u32 {
        self.now.fetch_add(1, Ordering::Relaxed)
    }

    /// Rows held.
    pub(crate) fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    /// Rows that pushes found through the row numbers of the pull before
    /// them (see [`hints`]), so far.
    pub(crate) fn hinted_rows(&self) -> u64 {
        self.hinted.load(Ordering::Relaxed)
    }

    #[inline]
    fn segment(&self, hash: u64) -> &RwLock<Segment> {
        &self.segments[(hash >> SEGMENT_SHIFT) as usize]
    }

    /// The segments that the mixed keys `hashes` fall in, each locked once
    /// with `lock` (`read` or `write`), in segment order, so that two
    /// callers locking several segments cannot deadlock (a writer holds
    /// one segment at a time); `None` for the segments not touched.
    fn lock_touched<'a, G>(
        &'a self,
        hashes: impl Iterator<Item = u64>,
        lock: fn(&'a RwLock<Segment>) -> G,
    ) -> Vec<Option<G>> {
        let touched = hashes.fold(0u64, |set, h| set | 1 << (h >> SEGMENT_SHIFT));
        (self.segments.iter().enumerate())
            .map(|(s, segment)| (touched >> s & 1 == 1).then(|| lock(segment)))
            .collect()
    }

    /// Calls `f` with the floats of row `key`, if it exists.
    #[inline]
    pub(crate) fn read<R>(&self, key: u64, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
        let hash = mix64(key);
        let segment = read(self.segment(hash));
        let row = segment.find(key, hash)?;
        Some(f(segment.row(row)))
    }

    /// Calls `f` with the floats of row `key` for writing, bringing it
    /// back from disk or creating it first with `fresh` if it is not in
    /// memory. Says how it found the row.
    #[inline]
    pub(crate) fn update(
        &self,
        key: u64,
        fresh: impl FnOnce(&mut [f32]),
        f: impl FnOnce(&mut [f32]),
    ) -> Result<Added, DiskError> {
        let hash = mix64(key);
        let mut segment = write(self.segment(hash));
        if self.load_into(&mut segment, std::iter::once((key, hash)))? == 1 {
            self.write_locked(&mut segment, key, hash, None, |_| (), f);
            return Ok(Added::Loaded);
        }
        Ok(
            match self.write_locked(&mut segment, key, hash, None, fresh, f) {
                true => Added::Created,
                false => Added::Found,
            },
        )
    }

    /// [`SparseRows::update`] in a segment already locked for writing;
    /// `known` is the key's row if the caller knows it (checked).
    #[inline]
    fn write_locked(
        &self,
        segment: &mut Segment,
        key: u64,
        hash: u64,
        known: Option<usize>,
        fresh: impl FnOnce(&mut [f32]),
        f: impl FnOnce(&mut [f32]),
    ) -> bool {
        let (row, created) = match known.or_else(|| segment.find(key, hash)) {
            Some(row) => (row, false),
            None => {
                let row = segment.insert(key, hash);
                fresh(segment.row_mut(row));
                self.len.fetch_add(1, Ordering::Relaxed);
                (row, true)
            }
        };
        f(segment.row_mut(row));
        segment.touch(row, self.now());
        if self.record_changes.load(Ordering::Relaxed) {
            segment.mark_changed(row);
        }
        created
    }

    /// Updates the rows of `request.keys[i]` for every `i` of `run`, all
    /// in `segment`, as [`SparseRows::update_many`] does, first bringing
    /// back those on disk (unless `request.loaded` did and no row moved to
    /// disk since). Returns the number of rows created or brought back.
    fn write_run(
        &self,
        segment: &mut Segment,
        run: &[usize],
        request: &Written<'_>,
        fresh: &impl Fn(u64, &mut [f32]),
        ahead: &impl Fn(usize),
        f: &mut impl FnMut(usize, &mut [f32]),
    ) -> Result<usize, DiskError> {
        let (keys, hashes) = (request.keys, request.hashes);
        let mut created = 0;
        if self.moves_out.load(Ordering::Relaxed) != request.loaded.moves_out {
            created += self.load_into(segment, run.iter().map(|&i| (keys[i], hashes[i])))?;
        }
        let prefetching = segment.len >= PREFETCH_ROWS;
        let mut hinted = 0;
        for (n, &i) in run.iter().enumerate() {
            if prefetching {
                // As in `read_many`: entries 2 x AHEAD keys on, rows AHEAD
                // on; a hinted row needs no entry.
                if let Some(&j) = run.get(n + 2 * AHEAD)
                    && request.hint(j).is_none()
                {
                    segment.prefetch_entry(hashes[j]);
                }
                if let Some(&j) = run.get(n + AHEAD) {
                    match request.hint(j) {
                        Some(row) => segment.prefetch_row_at(row),
                        None => segment.prefetch_row(hashes[j]),
                    }
                    ahead(j);
                }
            }
            let key = keys[i];
            let known = request.hint(i).filter(|&row| segment.holds(row, key));
            hinted += u64::from(known.is_some());
            let made = self.write_locked(
                segment,
                key,
                hashes[i],
                known,
                |row| fresh(key, row),
                |row| f(i, row),
            );
            created += usize::from(made);
        }
        if hinted > 0 {
            self.hinted.fetch_add(hinted, Ordering::Relaxed);
        }
        Ok(created)
    }

    /// Calls `f(i, floats)` with the row of every `keys[i]`, creating a
    /// missing row first with `fresh(key, floats)` (with `create` false, a
    /// missing row is filled by `fresh` and handed over, not stored). A row
    /// on disk is brought back to memory with `load`, else read where it
    /// lies. The segments the keys touch are read-locked together (in
    /// segment order, so two callers cannot deadlock; a writer holds one
    /// segment at a time) and the rows are handed over in request order;
    /// then the rows that were missing in memory are handed over, each
    /// segment under one lock. Returns the number of rows created or
    /// brought back to memory.
    pub(crate) fn read_many(
        &self,
        keys: &[u64],
        create: bool,
        load: bool,
        fresh: impl Fn(u64, &mut [f32]),
        mut f: impl FnMut(usize, &[f32]),
    ) -> Result<usize, DiskError> {
        let now = self.now();
        let hashes: Vec<u64> = keys.iter().map(|&k| mix64(k)).collect();
        let mut missing = Vec::new();
        // The rows found, for the push of these keys (a training pull of
        // a large table: one that creates rows).
        let mut found = Vec::new();
        let mut found_rows = 0;
        {
            let guards = self.lock_touched(hashes.iter().copied(), read);
            // Small tables stay in the CPU's caches: no hints for them.
            let prefetching = guards.iter().flatten().any(|s| s.len >= PREFETCH_ROWS);
            // Past MAX_ROWS the memo would not keep the list: none is made.
            let record = create && prefetching && (MIN_KEYS..=MAX_ROWS).contains(&keys.len());
            let ahead = |i: usize, step: fn(&Segment, u64)| {
                if let Some(&hash) = hashes.get(i)
                    && let Some(segment) = &guards[(hash >> SEGMENT_SHIFT) as usize]
                {
                    step(segment, hash);
                }
            };
            for (i, (&key, &hash)) in keys.iter().zip(&hashes).enumerate() {
                if prefetching {
                    // Keys 2 x AHEAD on: their index entries; AHEAD on: their rows.
                    ahead(i + 2 * AHEAD, Segment::prefetch_entry);
                    ahead(i + AHEAD, Segment::prefetch_row);
                }
                let Some(segment) = &guards[(hash >> SEGMENT_SHIFT) as usize] else {
                    continue;
                };
                match segment.find(key, hash) {
                    Some(row) => {
                        f(i, segment.row(row));
                        segment.touch(row, now);
                        if record {
                            // Allocated at the first row found: a pull of
                            // new keys allocates nothing for hints.
                            if found.is_empty() {
                                found = vec![NO_ROW; keys.len()];
                            }
                            found[i] = u32::try_from(row).unwrap_or(NO_ROW);
                            found_rows += 1;
                        }
                    }
                    None => missing.push(i),
                }
            }
        }
        // A pull of mostly new keys (a table filling up) leaves nothing:
        // its push would mostly look its keys up anyway.
        if found_rows * 2 >= keys.len() && found_rows > 0 {
            self.pulled.keep(&hashes, found);
        }
        let mut row = Vec::new();
        let mut fresh_row = |i: usize, f: &mut dyn FnMut(usize, &[f32])| {
            row.clear();
            row.resize(self.row_len, 0.0);
            fresh(keys[i], &mut row);
            f(i, &row);
        };
        if !create && (self.cold.is_none() || missing.is_empty()) {
            for i in missing {
                fresh_row(i, &mut f);
            }
            return Ok(0);
        }
        let mut added = 0;
        let mut loaded = Loaded::NOTHING;
        if create || load {
            loaded = self.load_batch(keys, &hashes, missing.iter().copied())?;
            added += loaded.rows;
        }
        missing.sort_by_key(|&i| hashes[i] >> SEGMENT_SHIFT);
        for run in
            missing.chunk_by(|&a, &b| hashes[a] >> SEGMENT_SHIFT == hashes[b] >> SEGMENT_SHIFT)
        {
            let lock = self.segment(hashes[run[0]]);
            if create {
                let mut segment = write(lock);
                let mut hand_over = |i: usize, row: &mut [f32]| f(i, row);
                let request = Written {
                    keys,
                    hashes: &hashes,
                    hints: None,
                    loaded,
                };
                added +=
                    self.write_run(&mut segment, run, &request, &fresh, &|_| {}, &mut hand_over)?;
            } else if load {
                let mut segment = write(lock);
                if self.moves_out.load(Ordering::Relaxed) != loaded.moves_out {
                    added +=
                        self.load_into(&mut segment, run.iter().map(|&i| (keys[i], hashes[i])))?;
                }
                for &i in run {
                    match segment.find(keys[i], hashes[i]) {
                        Some(at) => {
                            f(i, segment.row(at));
                            segment.touch(at, now);
                        }
                        None => fresh_row(i, &mut f),
                    }
                }
            } else {
                // Read where they lie: memory and disk under one read lock,
                // so no move between them is half seen.
                let segment = read(lock);
                let on_disk = match self.cold() {
                    Some(cold) => {
                        cold.get_many(&run.iter().map(|&i| hashes[i]).collect::<Vec<_>>())?
                    }
                    None => vec![None; run.len()],
                };
                for (&i, disk) in run.iter().zip(on_disk) {
                    match (segment.find(keys[i], hashes[i]), disk) {
                        (Some(at), _) => f(i, segment.row(at)),
                        (None, Some(disk)) => f(i, &disk.floats),
                        (None, None) => fresh_row(i, &mut f),
                    }
                }
            }
        }
        Ok(added)
    }

    /// Calls `f(i, floats)` with the row of every `keys[i]` for writing,
    /// bringing a row back from disk or creating a missing one first with
    /// `fresh(key, floats)`: segment by segment, each under one write
    /// lock, and within a segment in request order (so repeats of a key
    /// apply in order). Returns the number of rows created or brought back.
    ///
    /// On a table past [`PREFETCH_ROWS`] rows, `ahead(i)` is called a few
    /// keys before `f(i, ..)`, when the row of `keys[i]` is prefetched: the
    /// caller prefetches what `f` will read for `i` (a push's gradient,
    /// which segment order visits out of request order).
    ///
    /// If a recent pull had the same key list, its rows are tried first
    /// (each checked to hold its key), before the index (see [`hints`]).
    pub(crate) fn update_many(
        &self,
        keys: &[u64],
        fresh: impl Fn(u64, &mut [f32]),
        ahead: impl Fn(usize),
        mut f: impl FnMut(usize, &mut [f32]),
    ) -> Result<usize, DiskError> {
        let batch = Batch::of(keys);
        let loaded = self.load_batch(keys, &batch.hashes, 0..keys.len())?;
        let hints = (keys.len() >= MIN_KEYS)
            .then(|| self.pulled.take(&batch.hashes))
            .flatten();
        let request = Written {
            keys,
            hashes: &batch.hashes,
            hints: hints.as_deref(),
            loaded,
        };
        let mut added = loaded.rows;
        for (lock, run) in batch.runs(&self.segments) {
            let segment = &mut write(lock);
            added += self.write_run(segment, run, &request, &fresh, &ahead, &mut f)?;
        }
        Ok(added)
    }

    /// Whether row `key` is in memory.
    pub(crate) fn in_memory(&self, key: u64) -> bool {
        self.read(key, |_| ()).is_some()
    }

    /// Removes row `key` if `remove(row)` says so. Returns whether it did.
    pub(crate) fn remove_if(&self, key: u64, remove: impl FnOnce(&[f32]) -> bool) -> bool {
        let hash = mix64(key);
        let record = self.record_changes.load(Ordering::Relaxed);
        let removed = write(self.segment(hash)).remove_if(key, hash, record, remove);
        if removed {
            self.len.fetch_sub(1, Ordering::Relaxed);
        }
        removed
    }

    /// Bytes the slabs and indexes hold now (allocated, whether filled or not).
    #[cfg(test)]
    pub(crate) fn allocated_bytes(&self) -> u64 {
        self.segments
            .iter()
            .map(|lock| {
                let segment = read(lock);
                let slabs: usize = (segment.chunks.iter())
                    .map(|c| c.keys.len() * 8 + c.rows.allocated_bytes())
                    .sum();
                (slabs + segment.index.bytes()) as u64
            })
            .sum()
    }
}

fn read(lock: &RwLock<Segment>) -> std::sync::RwLockReadGuard<'_, Segment> {
    lock.read().unwrap_or_else(|p| p.into_inner())
}

fn write(lock: &RwLock<Segment>) -> std::sync::RwLockWriteGuard<'_, Segment> {
    lock.write().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests;
