//! A segment's index: open addressing with linear probing from a key's
//! hash to its row number. Entries hold a tag (high bits of the hash, so
//! most probes need no key) and the row number; the keys themselves live
//! beside the rows and are read through a `key_of` function. Deletion
//! shifts the rest of the probe run back, so there are no tombstones.

use ps_common::prefetch;
use ps_common::routing::mix64;

/// One index entry: a tag (high bits of the hash) and a row number.
pub(super) trait Entry: Copy + Eq {
    const EMPTY: Self;
    /// Bits of the row number; the rest hold the tag.
    const ROW_BITS: u32;
    /// Rows an index of this entry can number (all-ones marks an empty entry).
    const MAX_ROWS: usize = (1 << Self::ROW_BITS) - 1;
    fn new(hash: u64, row: usize) -> Self;
    fn tag_matches(self, hash: u64) -> bool;
    fn row(self) -> usize;
    fn with_row(self, row: usize) -> Self;
}

impl Entry for u32 {
    const EMPTY: u32 = u32::MAX;
    const ROW_BITS: u32 = 26;
    #[inline]
    fn new(hash: u64, row: usize) -> u32 {
        (((hash >> 52) as u32 & 0x3f) << Self::ROW_BITS) | row as u32
    }
    #[inline]
    fn tag_matches(self, hash: u64) -> bool {
        self >> Self::ROW_BITS == (hash >> 52) as u32 & 0x3f
    }
    #[inline]
    fn row(self) -> usize {
        (self & ((1 << Self::ROW_BITS) - 1)) as usize
    }
    #[inline]
    fn with_row(self, row: usize) -> u32 {
        (self & !((1 << Self::ROW_BITS) - 1)) | row as u32
    }
}

impl Entry for u64 {
    const EMPTY: u64 = u64::MAX;
    const ROW_BITS: u32 = 48;
    #[inline]
    fn new(hash: u64, row: usize) -> u64 {
        (((hash >> 40) & 0xffff) << Self::ROW_BITS) | row as u64
    }
    #[inline]
    fn tag_matches(self, hash: u64) -> bool {
        self >> Self::ROW_BITS == (hash >> 40) & 0xffff
    }
    #[inline]
    fn row(self) -> usize {
        (self & ((1 << Self::ROW_BITS) - 1)) as usize
    }
    #[inline]
    fn with_row(self, row: usize) -> u64 {
        (self & !((1 << Self::ROW_BITS) - 1)) | row as u64
    }
}

/// Where a key's probe starts in an index of `len` entries (a multiply
/// maps the hash's low 32 bits onto any length, not only powers of two).
#[inline]
fn home(hash: u64, len: usize) -> usize {
    (((hash & 0xffff_ffff) * len as u64) >> 32) as usize
}

/// An open-addressing index from keys to row numbers. The keys live in the
/// rows, so lookups read them through `key_of`.
#[derive(Debug, Default)]
pub(super) struct Index<E> {
    pub(super) entries: Vec<E>,
}

impl<E: Entry> Index<E> {
    pub(super) fn with_len(len: usize) -> Self {
        Index {
            entries: vec![E::EMPTY; len],
        }
    }

    /// Asks the CPU to load the entry where `hash`'s probe starts.
    #[inline]
    pub(super) fn prefetch_home(&self, hash: u64) {
        if let Some(e) = self.entries.get(home(hash, self.entries.len())) {
            prefetch::line(e);
        }
    }

    /// The row the entry where `hash`'s probe starts holds, if its tag
    /// matches (most often the key's row: the caller prefetches it).
    #[inline]
    pub(super) fn likely_row(&self, hash: u64) -> Option<usize> {
        let e = *self.entries.get(home(hash, self.entries.len()))?;
        (e != E::EMPTY && e.tag_matches(hash)).then(|| e.row())
    }

    /// The position of the entry of `key`, if present.
    #[inline]
    pub(super) fn find(&self, key: u64, hash: u64, key_of: impl Fn(usize) -> u64) -> Option<usize> {
        let len = self.entries.len();
        if len == 0 {
            return None;
        }
        let mut at = home(hash, len);
        loop {
            let e = self.entries[at];
            if e == E::EMPTY {
                return None;
            }
            if e.tag_matches(hash) && key_of(e.row()) == key {
                return Some(at);
            }
            at += 1;
            if at == len {
                at = 0;
            }
        }
    }

    /// Records `row` under `hash` (the caller keeps the load below one).
    #[inline]
    pub(super) fn insert(&mut self, hash: u64, row: usize) {
        let len = self.entries.len();
        let mut at = home(hash, len);
        while self.entries[at] != E::EMPTY {
            at += 1;
            if at == len {
                at = 0;
            }
        }
        self.entries[at] = E::new(hash, row);
    }

    /// Empties entry `at`, shifting back the entries after it in its probe
    /// run that may take its place (no tombstones).
    pub(super) fn delete(&mut self, at: usize, key_of: impl Fn(usize) -> u64) {
        let len = self.entries.len();
        let mut hole = at;
        let mut next = at;
        loop {
            next += 1;
            if next == len {
                next = 0;
            }
            let e = self.entries[next];
            if e == E::EMPTY {
                break;
            }
            let start = home(mix64(key_of(e.row())), len);
            // `e` may move back to `hole` unless its probe starts after the
            // hole (cyclically) within the run.
            if (next + len - start) % len >= (next + len - hole) % len {
                self.entries[hole] = e;
                hole = next;
            }
        }
        self.entries[hole] = E::EMPTY;
    }

    /// Renumbers the entry of `key` from row `from` to row `to`.
    pub(super) fn renumber(&mut self, hash: u64, from: usize, to: usize) {
        let len = self.entries.len();
        let mut at = home(hash, len);
        while self.entries[at].row() != from {
            at += 1;
            if at == len {
                at = 0;
            }
        }
        self.entries[at] = self.entries[at].with_row(to);
    }
}

/// A segment's index: narrow entries until it numbers more rows than they
/// can.
#[derive(Debug)]
pub(super) enum Entries {
    Narrow(Index<u32>),
    Wide(Index<u64>),
}

impl Default for Entries {
    fn default() -> Self {
        Entries::Narrow(Index::default())
    }
}

impl Entries {
    pub(super) fn len(&self) -> usize {
        match self {
            Entries::Narrow(ix) => ix.entries.len(),
            Entries::Wide(ix) => ix.entries.len(),
        }
    }

    #[cfg(test)]
    pub(super) fn bytes(&self) -> usize {
        match self {
            Entries::Narrow(ix) => ix.entries.len() * 4,
            Entries::Wide(ix) => ix.entries.len() * 8,
        }
    }
}
