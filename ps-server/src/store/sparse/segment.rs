//! One segment of a sparse table: its rows in slabs, their index, and each
//! row's records (changed since the last checkpoint; last touch and touch
//! count in a table with eviction).

use std::sync::atomic::{AtomicU32, Ordering};

use ps_common::prefetch;
use ps_common::routing::mix64;

use super::index::{Entries, Entry, Index};
use super::{META, chunk_rows};

/// Up to a full slab's rows of a segment: their keys, their floats back to
/// back, a bit per row set when the row changes while changes are recorded
/// (cleared when a checkpoint takes it) and, in a table that tracks touches, each row's last touch and
/// touch count (atomics, so a pull records its touch under a read lock).
#[derive(Debug)]
pub(super) struct Chunk {
    pub(super) keys: Box<[u64]>,
    pub(super) rows: LineFloats,
    pub(super) changed: Box<[u64]>,
    pub(super) meta: Box<[AtomicU32]>,
}

impl Chunk {
    pub(super) fn with_rows(rows: usize, row_len: usize, tracks: bool) -> Chunk {
        Chunk {
            keys: vec![0; rows].into_boxed_slice(),
            rows: LineFloats::zeroed(rows * row_len),
            changed: vec![0; rows.div_ceil(64)].into_boxed_slice(),
            meta: (0..if tracks { rows * META } else { 0 })
                .map(|_| AtomicU32::new(0))
                .collect(),
        }
    }
}

/// Bytes of a cache line.
const LINE: usize = 64;

/// A slab's floats, the first of them at the start of a cache line, so a
/// row of 16 floats (dim 16, SGD) lies in one line and a row of 32 in two.
/// The allocator aligns to 16 bytes only: from there, every such row of a
/// slab could straddle a line boundary, and a random pull or push of it
/// would miss the cache twice.
#[derive(Debug)]
pub(super) struct LineFloats {
    /// Up to a line's worth more than `len` floats.
    buf: Box<[f32]>,
    /// Where the floats start in `buf`: its first line boundary.
    start: usize,
    len: usize,
}

impl LineFloats {
    /// `len` zeros, starting on a cache line.
    pub(super) fn zeroed(len: usize) -> LineFloats {
        let per_line = LINE / size_of::<f32>();
        let buf = vec![0.0f32; len + per_line - 1].into_boxed_slice();
        // An f32 allocation is 4-byte aligned: skip whole floats to the
        // line. The heap block does not move with the box, so this holds.
        let into_line = buf.as_ptr().addr() % LINE / size_of::<f32>();
        let start = (per_line - into_line) % per_line;
        LineFloats { buf, start, len }
    }

    /// Bytes allocated, the padding included.
    #[cfg(test)]
    pub(super) fn allocated_bytes(&self) -> usize {
        self.buf.len() * size_of::<f32>()
    }
}

impl std::ops::Deref for LineFloats {
    type Target = [f32];

    #[inline]
    fn deref(&self) -> &[f32] {
        &self.buf[self.start..self.start + self.len]
    }
}

impl std::ops::DerefMut for LineFloats {
    #[inline]
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.buf[self.start..self.start + self.len]
    }
}

/// One segment: rows `0..len` in slabs, and their index.
#[derive(Debug)]
pub(crate) struct Segment {
    pub(super) chunks: Vec<Chunk>,
    pub(super) len: usize,
    pub(super) index: Entries,
    /// Floats per row.
    pub(super) row_len: usize,
    /// A full slab holds `1 << chunk_bits` rows.
    pub(super) chunk_bits: u32,
    /// Rows the segment numbers with narrow index entries ([`super::NARROW_ROWS`];
    /// tests lower it to reach the switch to wide ones).
    pub(super) narrow_rows: usize,
    /// Whether rows record their touches (tables with eviction).
    pub(super) tracks: bool,
    /// Keys removed since the changes were last taken (kept only while
    /// changes are recorded, see `SparseRows::record_changes`).
    pub(super) removed: Vec<u64>,
}

impl Segment {
    pub(super) fn new(row_len: usize, narrow_rows: usize, tracks: bool) -> Segment {
        Segment {
            chunks: Vec::new(),
            len: 0,
            index: Entries::default(),
            row_len,
            chunk_bits: chunk_rows(row_len).ilog2(),
            narrow_rows,
            tracks,
            removed: Vec::new(),
        }
    }

    /// Marks row `row` changed since the last checkpoint.
    #[inline]
    pub(super) fn mark_changed(&mut self, row: usize) {
        let (chunk, at) = self.locate(row);
        self.chunks[chunk].changed[at / 64] |= 1 << (at % 64);
    }

    /// Whether row `row` changed since the last checkpoint took it.
    #[inline]
    pub(super) fn is_changed(&self, row: usize) -> bool {
        let (chunk, at) = self.locate(row);
        self.chunks[chunk].changed[at / 64] >> (at % 64) & 1 == 1
    }

    /// Sets row `row`'s changed bit to `changed`.
    #[inline]
    pub(super) fn set_changed(&mut self, row: usize, changed: bool) {
        let (chunk, at) = self.locate(row);
        let word = &mut self.chunks[chunk].changed[at / 64];
        *word = (*word & !(1 << (at % 64))) | (u64::from(changed) << (at % 64));
    }

    /// Records a touch of row `row` at clock `now`.
    #[inline]
    pub(super) fn touch(&self, row: usize, now: u32) {
        if self.tracks {
            let (chunk, at) = self.locate(row);
            let meta = &self.chunks[chunk].meta[at * META..(at + 1) * META];
            meta[0].store(now, Ordering::Relaxed);
            let hits = meta[1].load(Ordering::Relaxed);
            meta[1].store(hits.saturating_add(1), Ordering::Relaxed);
        }
    }

    /// Sets row `row`'s last touch and touch count (a row back from disk).
    #[inline]
    pub(super) fn set_meta(&self, row: usize, (touch, hits): (u32, u32)) {
        if self.tracks {
            let (chunk, at) = self.locate(row);
            let meta = &self.chunks[chunk].meta[at * META..(at + 1) * META];
            meta[0].store(touch, Ordering::Relaxed);
            meta[1].store(hits, Ordering::Relaxed);
        }
    }

    /// Row `row`'s last touch and touch count (zeros when not tracking).
    #[inline]
    pub(super) fn meta(&self, row: usize) -> (u32, u32) {
        if !self.tracks {
            return (0, 0);
        }
        let (chunk, at) = self.locate(row);
        let meta = &self.chunks[chunk].meta[at * META..(at + 1) * META];
        (
            meta[0].load(Ordering::Relaxed),
            meta[1].load(Ordering::Relaxed),
        )
    }

    /// Which slab row `row` lies in, and where in it.
    #[inline]
    pub(super) fn locate(&self, row: usize) -> (usize, usize) {
        (row >> self.chunk_bits, row & ((1 << self.chunk_bits) - 1))
    }

    #[inline]
    pub(super) fn key(&self, row: usize) -> u64 {
        let (chunk, at) = self.locate(row);
        self.chunks[chunk].keys[at]
    }

    #[inline]
    pub(super) fn row(&self, row: usize) -> &[f32] {
        let (chunk, at) = self.locate(row);
        &self.chunks[chunk].rows[at * self.row_len..(at + 1) * self.row_len]
    }

    #[inline]
    pub(super) fn row_mut(&mut self, row: usize) -> &mut [f32] {
        let (chunk, at) = self.locate(row);
        &mut self.chunks[chunk].rows[at * self.row_len..(at + 1) * self.row_len]
    }

    /// First step of a lookup issued ahead: load the index entry.
    #[inline]
    pub(super) fn prefetch_entry(&self, hash: u64) {
        match &self.index {
            Entries::Narrow(ix) => ix.prefetch_home(hash),
            Entries::Wide(ix) => ix.prefetch_home(hash),
        }
    }

    /// Second step, once the entry is (likely) loaded: load the key and
    /// the floats of the row it points to.
    #[inline]
    pub(super) fn prefetch_row(&self, hash: u64) {
        let row = match &self.index {
            Entries::Narrow(ix) => ix.likely_row(hash),
            Entries::Wide(ix) => ix.likely_row(hash),
        };
        if let Some(row) = row {
            self.prefetch_row_at(row);
        }
    }

    /// Loads the key and the floats of row number `row`, if there is one.
    #[inline]
    pub(super) fn prefetch_row_at(&self, row: usize) {
        let (chunk, at) = self.locate(row);
        if let Some(c) = self.chunks.get(chunk)
            && let Some(key) = c.keys.get(at)
            && let Some(floats) = c.rows.get(at * self.row_len..(at + 1) * self.row_len)
        {
            prefetch::line(key);
            prefetch::floats(floats);
        }
    }

    /// Whether row number `row` is one of the segment's rows and holds
    /// `key` (so it is `key`'s row: a key has at most one).
    #[inline]
    pub(super) fn holds(&self, row: usize, key: u64) -> bool {
        row < self.len && self.key(row) == key
    }

    /// The number of the row of `key`, if present.
    #[inline]
    pub(super) fn find(&self, key: u64, hash: u64) -> Option<usize> {
        self.find_entry(key, hash).map(|(_, row)| row)
    }

    /// Where the index holds `key` and the number of its row, if present.
    #[inline]
    pub(super) fn find_entry(&self, key: u64, hash: u64) -> Option<(usize, usize)> {
        let key_of = |row| self.key(row);
        match &self.index {
            Entries::Narrow(ix) => ix
                .find(key, hash, key_of)
                .map(|at| (at, ix.entries[at].row())),
            Entries::Wide(ix) => ix
                .find(key, hash, key_of)
                .map(|at| (at, ix.entries[at].row())),
        }
    }

    /// Appends a row for `key` (its floats zero) and returns its number.
    pub(super) fn insert(&mut self, key: u64, hash: u64) -> usize {
        let (row, row_len) = (self.len, self.row_len);
        let narrow_full = matches!(self.index, Entries::Narrow(_)) && row >= self.narrow_rows;
        if (row + 1) * 4 > self.index.len() * 3 || narrow_full {
            self.grow_index();
        }
        let (chunk, at) = self.locate(row);
        if chunk == self.chunks.len() {
            // The first slab starts at one row; later ones are full size.
            let rows = if chunk == 0 { 1 } else { 1 << self.chunk_bits };
            self.chunks
                .push(Chunk::with_rows(rows, row_len, self.tracks));
        } else if at == self.chunks[chunk].keys.len() {
            // Only the first slab grows; it doubles.
            let old = &self.chunks[chunk];
            let mut bigger = Chunk::with_rows(at * 2, row_len, self.tracks);
            bigger.keys[..at].copy_from_slice(&old.keys);
            bigger.rows[..old.rows.len()].copy_from_slice(&old.rows);
            bigger.changed[..old.changed.len()].copy_from_slice(&old.changed);
            for (to, from) in bigger.meta.iter().zip(old.meta.iter()) {
                to.store(from.load(Ordering::Relaxed), Ordering::Relaxed);
            }
            self.chunks[chunk] = bigger;
        }
        self.chunks[chunk].keys[at] = key;
        if self.tracks {
            for m in &self.chunks[chunk].meta[at * META..(at + 1) * META] {
                m.store(0, Ordering::Relaxed);
            }
        }
        self.len += 1;
        match &mut self.index {
            Entries::Narrow(ix) => ix.insert(hash, row),
            Entries::Wide(ix) => ix.insert(hash, row),
        }
        row
    }

    /// Rebuilds the index for one more row: a quarter larger (at least 16
    /// entries) when three quarters full, with wide entries once narrow
    /// ones cannot number the rows.
    pub(super) fn grow_index(&mut self) {
        let mut len = self.index.len().max(16);
        while (self.len + 1) * 4 > len * 3 {
            len += len / 4;
        }
        let hashes = (0..self.len).map(|row| (mix64(self.key(row)), row));
        self.index = if self.len < self.narrow_rows {
            let mut ix = Index::<u32>::with_len(len);
            hashes.for_each(|(h, row)| ix.insert(h, row));
            Entries::Narrow(ix)
        } else {
            let mut ix = Index::<u64>::with_len(len);
            hashes.for_each(|(h, row)| ix.insert(h, row));
            Entries::Wide(ix)
        };
    }

    /// Removes the row of `key` if `remove` says so: the last row moves into
    /// its place, and a slab left empty is freed. `record`: the key is kept
    /// in the removals a checkpoint's delta takes.
    pub(super) fn remove_if(
        &mut self,
        key: u64,
        hash: u64,
        record: bool,
        remove: impl FnOnce(&[f32]) -> bool,
    ) -> bool {
        let Some((at, row)) = self.find_entry(key, hash) else {
            return false;
        };
        if !remove(self.row(row)) {
            return false;
        }
        let (chunks, bits, row_len) = (&self.chunks, self.chunk_bits, self.row_len);
        let key_of = |row: usize| chunks[row >> bits].keys[row & ((1 << bits) - 1)];
        match &mut self.index {
            Entries::Narrow(ix) => ix.delete(at, key_of),
            Entries::Wide(ix) => ix.delete(at, key_of),
        }
        if record {
            self.removed.push(key);
        }
        let last = self.len - 1;
        if row != last {
            let moved_changed = self.is_changed(last);
            self.set_changed(row, moved_changed);
            let (to_chunk, to) = self.locate(row);
            let (from_chunk, from) = self.locate(last);
            let moved = self.chunks[from_chunk].keys[from];
            self.chunks[to_chunk].keys[to] = moved;
            if self.tracks {
                for m in 0..META {
                    let value =
                        self.chunks[from_chunk].meta[from * META + m].load(Ordering::Relaxed);
                    self.chunks[to_chunk].meta[to * META + m].store(value, Ordering::Relaxed);
                }
            }
            let (to, from) = (to * row_len, from * row_len);
            if to_chunk == from_chunk {
                self.chunks[to_chunk]
                    .rows
                    .copy_within(from..from + row_len, to);
            } else {
                let (head, tail) = self.chunks.split_at_mut(from_chunk);
                head[to_chunk].rows[to..to + row_len]
                    .copy_from_slice(&tail[0].rows[from..from + row_len]);
            }
            match &mut self.index {
                Entries::Narrow(ix) => ix.renumber(mix64(moved), last, row),
                Entries::Wide(ix) => ix.renumber(mix64(moved), last, row),
            }
        }
        self.len = last;
        let needed = match self.len {
            0 => 0,
            len => self.locate(len - 1).0 + 1,
        };
        self.chunks.truncate(needed);
        true
    }
}
