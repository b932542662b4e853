//! Where a pull found its rows, kept for the push that follows it.
//!
//! A worker pushes the gradients of the keys it pulled, in the same order,
//! one step later. The pull has already looked every key up in its
//! segment's index; the push would look it up again, and in a table larger
//! than the CPU's caches each lookup is a chain of misses (the index entry,
//! then the key it points to). So a large pull leaves the row numbers it
//! found, under a fingerprint of its key list ([`fingerprint`]); a push
//! whose key list has the same fingerprint takes them and goes straight to
//! each row.
//!
//! A row number is a hint, never trusted. Rows move between a pull and its
//! push (removing a row moves its segment's last row into the hole; a spill
//! to disk removes rows), and two key lists may share a fingerprint. Under
//! the segment's write lock the push takes a hinted row only if it is one
//! of the segment's rows and holds the key; otherwise it looks the key up.
//! A key has at most one row in a segment, so a hint that passes is the
//! key's row: hints change what a push reads first, never what it writes.
//!
//! The memo is bounded: at most [`MAX_LISTS`] key lists and [`MAX_ROWS`]
//! row numbers (4 MiB) per table, the oldest dropped first, and a push
//! takes its list out. Pulls of fewer than [`MIN_KEYS`] keys leave nothing,
//! nor do pulls that found fewer than half their keys (a table filling up).

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

/// A key the pull did not find in memory (it was created or brought back
/// from disk after the lookup), or a row number past `u32`.
pub(super) const NO_ROW: u32 = u32::MAX;

/// Key lists kept at most: a few steps' pulls of a few workers.
pub(super) const MAX_LISTS: usize = 16;

/// Row numbers kept at most, over all lists.
pub(super) const MAX_ROWS: usize = 1 << 20;

/// Pulls of fewer keys leave no hints: their lookups cost little.
pub(super) const MIN_KEYS: usize = 256;

/// The fingerprint of a key list, from its keys' hashes in order.
fn fingerprint(hashes: &[u64]) -> u64 {
    let folded = hashes
        .iter()
        .fold(hashes.len() as u64, |fp, &h| fp.rotate_left(5) ^ h);
    ps_common::routing::mix64(folded)
}

/// The row numbers of recent large pulls, newest last.
#[derive(Debug, Default)]
pub(super) struct PulledRows {
    lists: Mutex<VecDeque<Found>>,
    /// `lists.len()`, read without the lock: a shard that never pulls (a
    /// backup applying its primary's pushes) skips the fingerprint.
    held: AtomicUsize,
}

/// One pull's rows: `rows[i]` is the row number the pull found for its
/// `i`-th key in that key's segment, or [`NO_ROW`].
#[derive(Debug)]
struct Found {
    fingerprint: u64,
    rows: Vec<u32>,
}

impl PulledRows {
    /// Keeps `rows`, the rows a pull of the keys of `hashes` found (one
    /// per key), dropping the oldest lists to stay within [`MAX_LISTS`]
    /// and [`MAX_ROWS`].
    pub(super) fn keep(&self, hashes: &[u64], rows: Vec<u32>) {
        if rows.len() > MAX_ROWS || rows.len() != hashes.len() {
            return;
        }
        let fingerprint = fingerprint(hashes);
        let mut lists = self.lists.lock().unwrap_or_else(|p| p.into_inner());
        let mut held: usize = lists.iter().map(|f| f.rows.len()).sum();
        while lists.len() >= MAX_LISTS || held + rows.len() > MAX_ROWS {
            match lists.pop_front() {
                Some(oldest) => held -= oldest.rows.len(),
                None => break,
            }
        }
        lists.push_back(Found { fingerprint, rows });
        self.held.store(lists.len(), Ordering::Relaxed);
    }

    /// Takes out the newest rows kept for a key list with the fingerprint
    /// and the length of `hashes`' keys, if any.
    pub(super) fn take(&self, hashes: &[u64]) -> Option<Vec<u32>> {
        if self.held.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let fingerprint = fingerprint(hashes);
        let mut lists = self.lists.lock().unwrap_or_else(|p| p.into_inner());
        let at = (lists.iter())
            .rposition(|f| f.fingerprint == fingerprint && f.rows.len() == hashes.len())?;
        let rows = lists.remove(at).map(|f| f.rows);
        self.held.store(lists.len(), Ordering::Relaxed);
        rows
    }

    /// Key lists and row numbers held.
    #[cfg(test)]
    pub(super) fn held(&self) -> (usize, usize) {
        let lists = self.lists.lock().unwrap_or_else(|p| p.into_inner());
        (lists.len(), lists.iter().map(|f| f.rows.len()).sum())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fingerprint_depends_on_the_order_and_the_length() {
        let a = fingerprint(&[1, 2, 3]);
        assert_eq!(a, fingerprint(&[1, 2, 3]));
        assert_ne!(a, fingerprint(&[3, 2, 1]));
        assert_ne!(a, fingerprint(&[1, 2, 3, 0]));
        assert_ne!(fingerprint(&[]), fingerprint(&[0]));
    }

    #[test]
    fn a_list_is_taken_once_and_only_for_the_same_keys() {
        let memo = PulledRows::default();
        memo.keep(&[10, 20, 30], vec![1, 2, 3]);
        assert_eq!(memo.take(&[10, 20, 30, 40]), None, "longer");
        assert_eq!(memo.take(&[10, 30, 20]), None, "another order");
        assert_eq!(memo.take(&[10, 20, 30]), Some(vec![1, 2, 3]));
        assert_eq!(memo.take(&[10, 20, 30]), None, "taken");
    }

    #[test]
    fn the_oldest_lists_go_first_past_either_bound() {
        let memo = PulledRows::default();
        let list = |n: u64| [n; 10];
        for n in 0..MAX_LISTS as u64 + 4 {
            memo.keep(&list(n), vec![0; 10]);
        }
        assert_eq!(memo.held(), (MAX_LISTS, MAX_LISTS * 10));
        assert_eq!(memo.take(&list(3)), None, "dropped");
        assert!(memo.take(&list(MAX_LISTS as u64 + 3)).is_some(), "kept");
        let long = vec![5; MAX_ROWS - 5];
        memo.keep(&long, vec![0; long.len()]);
        assert_eq!(
            memo.held(),
            (1, MAX_ROWS - 5),
            "rows past the bound dropped the rest"
        );
        let too_long = vec![6; MAX_ROWS + 1];
        memo.keep(&too_long, vec![0; too_long.len()]);
        assert_eq!(
            memo.held(),
            (1, MAX_ROWS - 5),
            "a list past the bound is not kept"
        );
    }
}
