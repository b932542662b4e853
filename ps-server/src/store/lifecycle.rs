//! A sparse table's lifecycle on one shard: the clock its rows' touches are
//! recorded at, which pushed ids are admitted, and which rows are the
//! coldest or expired.
//!
//! The store only answers these questions and removes the rows it is told
//! to ([`super::Shard::evict`]); when to evict is decided outside it
//! ([`crate::evictor`]), so that on a primary every eviction is a write
//! like any other, ordered with the pushes and replicated.
//!
//! **The clock.** A table with `ttl_seconds` counts seconds since it was
//! made on this shard (advanced by the evictor); any other counts push
//! calls to the table on this shard. A pull or push records the clock's
//! value in each row it touches, and counts the touch.
//!
//! **Choosing the coldest rows.** Coldness is the age of the last touch
//! (LRU) or the fewness of touches (LFU). To evict `n` of `len` rows, up to
//! [`SAMPLE`] rows' coldness is sampled evenly, the cutoff is the sample's
//! `n / len` quantile, and rows strictly colder than it are taken first,
//! then rows at it: exact when the table holds no more than [`SAMPLE`]
//! rows, and close to it otherwise.

use ps_common::lifecycle::{Eviction, EvictionPolicy};
use ps_common::routing::IdBuildHasher;

use super::disk::DiskError;
use super::table::Table;

/// The keys of a push an admission policy let through, and their gradients.
pub(crate) type Admitted = (Vec<u64>, Vec<f32>);

/// Rows sampled to find a coldness cutoff.
pub const SAMPLE: usize = 16_384;

impl Table {
    /// The table's eviction policy, if it evicts.
    pub fn eviction(&self) -> Option<Eviction> {
        self.spec.lifecycle.eviction
    }

    /// Whether the table's clock counts seconds (else push calls).
    fn clock_in_seconds(&self) -> bool {
        self.eviction().is_some_and(|e| e.ttl_seconds.is_some())
    }

    /// Marks the start of a push call to a table with a lifecycle: returns
    /// the call's number (which probability admission hashes), and advances
    /// a push clock.
    pub(crate) fn begin_push(&self) -> u32 {
        let step = self
            .pushes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Some(rows) = self.sparse()
            && !self.clock_in_seconds()
        {
            rows.set_now(step.wrapping_add(1));
        }
        step
    }

    /// Brings a seconds clock up to date (a push clock moves by itself).
    pub fn advance_clock(&self) {
        if let Some(rows) = self.sparse()
            && self.clock_in_seconds()
        {
            rows.set_now(self.age_seconds());
        }
    }

    /// The rows of `keys` (with `grads`, `dim` floats per key) that may be
    /// pushed, after the admission policy has seen them: `None` when all
    /// may, else the admitted ones. An id the table holds (in memory or on disk) always may; one
    /// it lacks is counted and admitted or dropped (a repeat of an id
    /// admitted earlier in the same call is kept).
    pub(crate) fn admit(
        &self,
        keys: &[u64],
        grads: &[f32],
        dim: usize,
        step: u32,
    ) -> Result<Option<Admitted>, DiskError> {
        let Some(admitter) = self.admitter.as_ref() else {
            return Ok(None);
        };
        let mut admitted_now: std::collections::HashSet<u64, IdBuildHasher> =
            std::collections::HashSet::default();
        let held = self.contains_many(keys)?;
        let keep: Vec<bool> = (keys.iter().zip(held))
            .map(|(&k, held)| {
                held || admitted_now.contains(&k)
                    || (admitter.admits(k, step) && admitted_now.insert(k))
            })
            .collect();
        if keep.iter().all(|&k| k) {
            return Ok(None);
        }
        let (mut kept_keys, mut kept_grads) = (Vec::new(), Vec::new());
        for ((&k, g), keep) in keys.iter().zip(grads.chunks_exact(dim)).zip(keep) {
            if keep {
                kept_keys.push(k);
                kept_grads.extend_from_slice(g);
            }
        }
        Ok(Some((kept_keys, kept_grads)))
    }

    /// Up to `most` rows in memory whose last touch is at least the TTL old.
    pub fn expired_keys(&self, most: usize) -> Vec<u64> {
        match (self.sparse(), self.ttl()) {
            (Some(rows), Some(ttl)) => {
                let now = rows.now();
                rows.keys_where(most, |touch, _| now.wrapping_sub(touch) >= ttl)
            }
            _ => Vec::new(),
        }
    }

    /// Up to `most` rows on disk whose last touch is at least the TTL old
    /// (a walk of the table's disk rows).
    pub fn expired_keys_on_disk(&self, most: usize) -> Result<Vec<u64>, DiskError> {
        match (self.sparse(), self.ttl()) {
            (Some(rows), Some(ttl)) if rows.on_disk() > 0 => {
                let now = rows.now();
                rows.keys_on_disk_where(most, |touch, _| now.wrapping_sub(touch) >= ttl)
            }
            _ => Ok(Vec::new()),
        }
    }

    /// The TTL in the clock's units, if the table has one.
    fn ttl(&self) -> Option<u32> {
        let e = self.eviction()?;
        let ttl = e.ttl_pushes.or(e.ttl_seconds)?;
        Some(u32::try_from(ttl).unwrap_or(u32::MAX))
    }

    /// About the `n` coldest rows by the table's policy (exactly, when it
    /// holds no more than [`SAMPLE`] rows).
    pub fn coldest_keys(&self, n: usize) -> Vec<u64> {
        let (Some(rows), Some(e)) = (self.sparse(), self.eviction()) else {
            return Vec::new();
        };
        let len = rows.len();
        if n == 0 || len == 0 {
            return Vec::new();
        }
        if n >= len {
            return rows.keys_where(n, |_, _| true);
        }
        let now = rows.now();
        let coldness = move |touch: u32, hits: u32| match e.policy {
            EvictionPolicy::Lru => now.wrapping_sub(touch),
            EvictionPolicy::Lfu => u32::MAX - hits,
        };
        let mut sample: Vec<u32> = (rows.sample_meta(SAMPLE).into_iter())
            .map(|(t, h)| coldness(t, h))
            .collect();
        if sample.is_empty() {
            return Vec::new();
        }
        sample.sort_unstable_by(|a, b| b.cmp(a));
        let at = ((n as f64 / len as f64) * sample.len() as f64).ceil() as usize;
        let cutoff = sample[at.clamp(1, sample.len()) - 1];
        let mut keys = rows.keys_where(n, |t, h| coldness(t, h) > cutoff);
        if keys.len() < n {
            keys.extend(rows.keys_where(n - keys.len(), |t, h| coldness(t, h) == cutoff));
        }
        keys
    }

    /// Halves every row's touch count, so an LFU table's old popularity fades.
    pub fn halve_touches(&self) {
        if let Some(rows) = self.sparse() {
            rows.halve_touches();
        }
    }

    /// Rows removed by [`super::Shard::evict`] so far.
    pub fn evicted_rows(&self) -> u64 {
        self.evicted.load(std::sync::atomic::Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests;
