//! The touch records of a table with eviction: sampled to find the
//! coldest rows, walked for the expired ones, and faded for LFU
//! ([`crate::store::lifecycle`] decides with them).

use std::sync::atomic::Ordering;

use super::{META, SparseRows, read};

impl SparseRows {
    /// Up to about `most` rows' `(last touch, touches)`, spread evenly over
    /// the segments (every row when the table holds no more than `most`).
    pub(crate) fn sample_meta(&self, most: usize) -> Vec<(u32, u32)> {
        let stride = self.len().div_ceil(most.max(1)).max(1);
        let mut sample = Vec::with_capacity(most.min(self.len()));
        for lock in self.segments.iter() {
            let segment = read(lock);
            sample.extend(
                (0..segment.len)
                    .step_by(stride)
                    .map(|row| segment.meta(row)),
            );
        }
        sample
    }

    /// Up to `most` keys whose `(last touch, touches)` `pick` accepts, one
    /// segment at a time under its read lock.
    pub(crate) fn keys_where(&self, most: usize, pick: impl Fn(u32, u32) -> bool) -> Vec<u64> {
        let mut keys = Vec::new();
        for lock in self.segments.iter() {
            let segment = read(lock);
            for row in 0..segment.len {
                if keys.len() >= most {
                    return keys;
                }
                let (touch, hits) = segment.meta(row);
                if pick(touch, hits) {
                    keys.push(segment.key(row));
                }
            }
        }
        keys
    }

    /// Halves every row's touch count (LFU's fading), one segment at a time.
    pub(crate) fn halve_touches(&self) {
        for lock in self.segments.iter() {
            let segment = read(lock);
            if segment.tracks {
                for chunk in &segment.chunks {
                    for hits in chunk.meta.iter().skip(1).step_by(META) {
                        hits.store(hits.load(Ordering::Relaxed) / 2, Ordering::Relaxed);
                    }
                }
            }
        }
    }

    /// Row `key`'s last touch and touch count, if it exists.
    #[cfg(test)]
    pub(crate) fn meta_of(&self, key: u64) -> Option<(u32, u32)> {
        let hash = ps_common::routing::mix64(key);
        let segment = read(self.segment(hash));
        segment.find(key, hash).map(|row| segment.meta(row))
    }
}
