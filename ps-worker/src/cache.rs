//! `RowCache`: hot sparse rows kept on the worker for a bounded number of
//! steps (`communication.row_cache_steps`, N), with their gradients summed
//! locally meanwhile, so a hot row costs one pull and one push per N + 1
//! steps instead of one of each per step.
//!
//! - **Reads.** A row pulled at step s serves the batches of steps s..=s+N
//!   from here. The pull of a step asks the servers only for the rows the
//!   cache does not hold fresh for it.
//! - **Writes.** The gradient of a cached row is added to the row's entry
//!   instead of being pushed; at the last step the entry serves (s + N) the
//!   sum is pushed and the entry dropped. The pull of step s + 1 runs while
//!   step s computes, so a hot row is often pulled again before its sum
//!   went out: the sum is then pushed with the next step's gradients, not
//!   carried over. Nothing is lost, only delayed by at most N + 1 steps;
//!   [`RowCache::drain`] hands back every sum (epoch ends, progress
//!   records, the end of training).
//! - **Admission.** A row is cached when it is hot: it occurs at least
//!   [`HOT_OCCURRENCES`] times in the batch (such rows are nearly always in
//!   the next batch too), while the cache holds fewer rows than its capacity
//!   (`communication.row_cache_rows`). Other rows skip the cache entirely,
//!   so its bookkeeping costs only the hot rows.
//!
//! What it costs: a cached row read at step s + j is j steps older than a
//! fresh pull would be, so under `ssp` with staleness K (where N <= K) a
//! row may lag the slowest worker by up to K + N steps; the job file turns
//! the cache on explicitly.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use ps_common::routing::IdBuildHasher;

use crate::model::{Update, UpdateKind};

/// What the cache did, for the report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct CacheStats {
    /// Row lookups served from the cache (one per distinct key per step).
    pub hits: u64,
    /// Row lookups sent to the servers.
    pub misses: u64,
    /// Value bytes not pulled thanks to hits (f32 on the wire).
    pub pull_bytes_saved: u64,
    /// Row gradients added to a cached row instead of being pushed.
    pub rows_held: u64,
    /// Summed row gradients pushed when their entry expired or was drained.
    pub rows_flushed: u64,
    /// Value bytes not pushed thanks to the sums.
    pub push_bytes_saved: u64,
}

impl CacheStats {
    /// Hits over lookups (0 with no lookups).
    pub fn hit_rate(&self) -> f64 {
        self.hits as f64 / (self.hits + self.misses).max(1) as f64
    }
}

/// One sparse table the cache covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedTable {
    /// The table.
    pub name: String,
    /// Floats per row.
    pub dim: usize,
    /// Whether the worker pushes it (frozen tables are read, never pushed).
    pub pushed: bool,
}

/// A cached row: the rows of every covered table for one key.
#[derive(Debug)]
struct Entry {
    /// The step it was pulled for; it serves through `pulled_at + steps`.
    pulled_at: u64,
    /// Weights of every table, table after table.
    weights: Box<[f32]>,
    /// Gradients summed since it was pulled (same layout); `None`: none yet.
    grads: Option<Box<[f32]>>,
}

#[derive(Debug, Default)]
struct Inner {
    rows: HashMap<u64, Entry, IdBuildHasher>,
    /// `(last step served, key)` in the order entries were made.
    expiries: VecDeque<(u64, u64)>,
    /// Sums of entries replaced by a newer pull before their last step's
    /// push (the pull of step s + 1 runs while step s computes): pushed
    /// with the next step's gradients, not carried into the new entry.
    due: Sums,
    /// Counts only: the byte fields are derived in [`RowCache::stats`].
    stats: CacheStats,
}

/// The rows a step found in the cache, and those to pull.
#[derive(Debug)]
pub struct Lookup {
    /// Per table, `keys.len() * dim` values; hits filled in.
    rows: Vec<Vec<f32>>,
    /// Indices (into the step's keys) of the rows to pull.
    missing: Vec<usize>,
    /// The keys to pull, in that order.
    pub keys: Vec<u64>,
}

/// Hot rows of one worker's sparse tables.
#[derive(Debug)]
pub struct RowCache {
    tables: Vec<CachedTable>,
    /// Offsets of each table in an entry's layout.
    offsets: Vec<usize>,
    width: usize,
    steps: u64,
    capacity: usize,
    inner: Mutex<Inner>,
}

impl RowCache {
    /// A cache of `tables` whose rows serve `steps` steps after the one
    /// they were pulled for, holding at most `capacity` keys.
    pub fn new(tables: Vec<CachedTable>, steps: u64, capacity: usize) -> RowCache {
        let mut offsets = Vec::with_capacity(tables.len());
        let mut width = 0;
        for t in &tables {
            offsets.push(width);
            width += t.dim;
        }
        RowCache {
            tables,
            offsets,
            width,
            steps,
            capacity,
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What the cache did so far. The saved bytes follow from the counts:
    /// each hit and each row gradient summed (less the sums pushed) is a
    /// row of f32s that did not travel.
    pub fn stats(&self) -> CacheStats {
        let counts = self.lock().stats;
        let row_bytes = self.width as u64 * 4;
        CacheStats {
            pull_bytes_saved: counts.hits * row_bytes,
            push_bytes_saved: counts.rows_held.saturating_sub(counts.rows_flushed) * row_bytes,
            ..counts
        }
    }

    /// Rows held now.
    pub fn len(&self) -> usize {
        self.lock().rows.len()
    }

    /// Whether no row is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Step `step`'s distinct `keys`, of which those at `hot` (ascending
    /// indices, see [`hot_rows`]) may be cached: the rows cached fresh for
    /// the step are copied out, the others are listed to pull.
    pub fn lookup(&self, keys: &[u64], hot: &[u32], step: u64) -> Lookup {
        let mut rows: Vec<Vec<f32>> = self
            .tables
            .iter()
            .map(|t| vec![0.0; keys.len() * t.dim])
            .collect();
        let mut found = Vec::new();
        {
            let inner = self.lock();
            for &i in hot {
                let i = i as usize;
                if let Some(e) = inner.rows.get(&keys[i])
                    && e.pulled_at + self.steps >= step
                {
                    for ((t, out), &at) in self.tables.iter().zip(&mut rows).zip(&self.offsets) {
                        out[i * t.dim..(i + 1) * t.dim].copy_from_slice(&e.weights[at..at + t.dim]);
                    }
                    found.push(i);
                }
            }
        }
        let (mut missing, mut to_pull) = (Vec::with_capacity(keys.len() - found.len()), Vec::new());
        let mut hits = found.iter().peekable();
        for (i, &key) in keys.iter().enumerate() {
            if hits.next_if_eq(&&i).is_none() {
                missing.push(i);
                to_pull.push(key);
            }
        }
        let mut inner = self.lock();
        let n = found.len() as u64;
        inner.stats.hits += n;
        inner.stats.misses += missing.len() as u64;
        Lookup {
            rows,
            missing,
            keys: to_pull,
        }
    }

    /// Completes `lookup` with the pulled rows (`pulled[t]` holds the rows
    /// of `lookup.keys` for table t) and returns every table's rows in the
    /// order of step `step`'s `keys`. The pulled rows at `hot` are cached
    /// (within capacity); a replaced entry's gradient sum is pushed with
    /// the next step's gradients.
    pub fn fill(
        &self,
        lookup: Lookup,
        keys: &[u64],
        hot: &[u32],
        pulled: Vec<Vec<f32>>,
        step: u64,
    ) -> Vec<Vec<f32>> {
        let Lookup {
            mut rows, missing, ..
        } = lookup;
        for ((t, out), got) in self.tables.iter().zip(&mut rows).zip(&pulled) {
            for (j, &i) in missing.iter().enumerate() {
                out[i * t.dim..(i + 1) * t.dim].copy_from_slice(&got[j * t.dim..(j + 1) * t.dim]);
            }
        }
        let mut inner = self.lock();
        let inner = &mut *inner;
        let mut pulled_here = missing.iter().peekable();
        for &i in hot {
            let i = i as usize;
            while pulled_here.next_if(|&&m| m < i).is_some() {}
            if pulled_here.next_if_eq(&&i).is_none() {
                continue; // served from the cache
            }
            let key = keys[i];
            if inner.rows.len() >= self.capacity && !inner.rows.contains_key(&key) {
                continue;
            }
            let mut weights = vec![0.0; self.width].into_boxed_slice();
            for ((t, out), &at) in self.tables.iter().zip(&rows).zip(&self.offsets) {
                weights[at..at + t.dim].copy_from_slice(&out[i * t.dim..(i + 1) * t.dim]);
            }
            if let Some(sum) = inner.rows.remove(&key).and_then(|e| e.grads) {
                add_sum(&mut inner.due, key, sum);
            }
            inner.rows.insert(
                key,
                Entry {
                    pulled_at: step,
                    weights,
                    grads: None,
                },
            );
            inner.expiries.push_back((step + self.steps, key));
        }
        rows
    }

    /// Step `step`'s updates (sparse ones in the order of the step's keys,
    /// as the model makes them): the gradients of the rows at `hot` that
    /// the cache holds are added to their entries and taken out; the sums
    /// of entries whose last step this is are added. Other tables and
    /// kinds pass through untouched.
    pub fn hold(&self, updates: &mut [Update], hot: &[u32], step: u64) {
        let mut inner = self.lock();
        let inner = &mut *inner;
        let mut held = 0u64;
        let mut taken = Vec::new();
        for u in updates.iter_mut().filter(|u| u.kind == UpdateKind::Sparse) {
            let Some(t) = self.table_index(&u.table, u.dim) else {
                continue;
            };
            let (at, dim) = (self.offsets[t], u.dim);
            taken.clear();
            for &i in hot {
                let i = i as usize;
                let Some(&key) = u.keys.get(i) else { break };
                if let Some(e) = inner.rows.get_mut(&key) {
                    let sum = e
                        .grads
                        .get_or_insert_with(|| vec![0.0; self.width].into_boxed_slice());
                    sum[at..at + dim]
                        .iter_mut()
                        .zip(&u.values[i * dim..(i + 1) * dim])
                        .for_each(|(s, g)| *s += g);
                    taken.push(i);
                }
            }
            if taken.is_empty() {
                continue;
            }
            held += taken.len() as u64;
            let mut next = taken.iter().peekable();
            let (mut keys, mut values) = (
                Vec::with_capacity(u.keys.len() - taken.len()),
                Vec::with_capacity(u.values.len() - taken.len() * dim),
            );
            for (i, (&key, grad)) in u.keys.iter().zip(u.values.chunks_exact(dim)).enumerate() {
                if next.next_if_eq(&&i).is_none() {
                    keys.push(key);
                    values.extend_from_slice(grad);
                }
            }
            (u.keys, u.values) = (keys, values);
        }
        let mut expired = std::mem::take(&mut inner.due);
        while let Some(&(last, key)) = inner.expiries.front() {
            if last > step {
                break;
            }
            inner.expiries.pop_front();
            if inner
                .rows
                .get(&key)
                .is_some_and(|e| e.pulled_at + self.steps == last)
                && let Some(sum) = inner.rows.remove(&key).and_then(|e| e.grads)
            {
                add_sum(&mut expired, key, sum);
            }
        }
        inner.stats.rows_held += held;
        let flushed = self.append_sums(updates, expired);
        inner.stats.rows_flushed += flushed;
    }

    /// Every gradient sum held, as sparse updates (at `lr_scale`); the
    /// cache is emptied, so the next pulls read the rows with them applied.
    pub fn drain(&self, lr_scale: Option<f32>) -> Vec<Update> {
        let mut inner = self.lock();
        let mut sums = std::mem::take(&mut inner.due);
        let held: Vec<(u64, Box<[f32]>)> = inner
            .rows
            .drain()
            .filter_map(|(k, e)| e.grads.map(|g| (k, g)))
            .collect();
        for (key, sum) in held {
            add_sum(&mut sums, key, sum);
        }
        inner.expiries.clear();
        let mut updates: Vec<Update> = self
            .tables
            .iter()
            .filter(|t| t.pushed)
            .map(|t| Update {
                table: t.name.clone(),
                kind: UpdateKind::Sparse,
                dim: t.dim,
                keys: Vec::new(),
                values: Vec::new(),
                lr_scale,
            })
            .collect();
        let flushed = self.append_sums(&mut updates, sums);
        inner.stats.rows_flushed += flushed;
        updates.retain(|u| !u.keys.is_empty());
        updates
    }

    /// Adds the gradient sums `(key, sum)` to the sparse updates of their
    /// tables. Returns the row sums added.
    fn append_sums(&self, updates: &mut [Update], sums: Sums) -> u64 {
        let mut added = 0;
        for u in updates.iter_mut().filter(|u| u.kind == UpdateKind::Sparse) {
            let Some(t) = self.table_index(&u.table, u.dim) else {
                continue;
            };
            let at = self.offsets[t];
            for (key, sum) in &sums {
                u.keys.push(*key);
                u.values.extend_from_slice(&sum[at..at + u.dim]);
                added += 1;
            }
        }
        added
    }

    fn table_index(&self, name: &str, dim: usize) -> Option<usize> {
        self.tables
            .iter()
            .position(|t| t.pushed && t.name == name && t.dim == dim)
    }
}

/// Rows occurring at least this often in a batch are hot: the cache
/// covers them (rows seen this often in one batch are nearly always seen
/// in the next; the rest would cost the cache's bookkeeping for nothing).
pub const HOT_OCCURRENCES: u32 = 2;

/// The hot rows of a batch (ascending indices into its `unique` distinct
/// keys), from the distinct row of each occurrence (`entry_row`, each
/// `< unique`).
pub fn hot_rows(entry_row: &[u32], unique: usize) -> Vec<u32> {
    let mut occurrences = vec![0u32; unique];
    for &r in entry_row {
        occurrences[r as usize] += 1;
    }
    (0..unique as u32)
        .filter(|&u| occurrences[u as usize] >= HOT_OCCURRENCES)
        .collect()
}

/// Gradient sums by key.
type Sums = HashMap<u64, Box<[f32]>, IdBuildHasher>;

/// Adds `sum` to `key`'s sum in `sums` (one sum per key, so a push names
/// each key once).
fn add_sum(sums: &mut Sums, key: u64, sum: Box<[f32]>) {
    match sums.entry(key) {
        std::collections::hash_map::Entry::Occupied(mut held) => {
            held.get_mut()
                .iter_mut()
                .zip(&sum[..])
                .for_each(|(a, b)| *a += b);
        }
        std::collections::hash_map::Entry::Vacant(slot) => {
            slot.insert(sum);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(steps: u64, capacity: usize) -> RowCache {
        RowCache::new(
            vec![CachedTable {
                name: "emb".into(),
                dim: 2,
                pushed: true,
            }],
            steps,
            capacity,
        )
    }

    /// Pulls `keys` for `step` through the cache, the keys at `hot` hot,
    /// from a "server" whose row k holds `[k, version]`; returns the rows
    /// and the keys asked of the server.
    fn pull_hot(
        c: &RowCache,
        keys: &[u64],
        hot: &[u32],
        step: u64,
        version: f32,
    ) -> (Vec<f32>, Vec<u64>) {
        let lookup = c.lookup(keys, hot, step);
        let asked = lookup.keys.clone();
        let pulled: Vec<f32> = asked.iter().flat_map(|&k| [k as f32, version]).collect();
        let mut rows = c.fill(lookup, keys, hot, vec![pulled], step);
        (rows.remove(0), asked)
    }

    /// [`pull_hot`] with every key hot.
    fn pull(c: &RowCache, keys: &[u64], step: u64, version: f32) -> (Vec<f32>, Vec<u64>) {
        let hot: Vec<u32> = (0..keys.len() as u32).collect();
        pull_hot(c, keys, &hot, step, version)
    }

    fn grads(keys: &[u64], g: f32) -> Vec<Update> {
        vec![Update {
            table: "emb".into(),
            kind: UpdateKind::Sparse,
            dim: 2,
            keys: keys.to_vec(),
            values: keys.iter().flat_map(|_| [g, -g]).collect(),
            lr_scale: None,
        }]
    }

    fn hold(c: &RowCache, keys: &[u64], g: f32, step: u64) -> Update {
        let mut updates = grads(keys, g);
        let hot: Vec<u32> = (0..keys.len() as u32).collect();
        c.hold(&mut updates, &hot, step);
        updates.remove(0)
    }

    #[test]
    fn hot_rows_are_those_occurring_at_least_twice_in_the_batch() {
        // Row 0 occurs once, row 1 three times, row 2 twice.
        assert_eq!(hot_rows(&[1, 0, 2, 1, 2, 1], 3), [1, 2]);
        assert!(hot_rows(&[], 0).is_empty());
    }

    #[test]
    fn a_hot_row_serves_the_next_n_steps_then_is_pulled_again() {
        let c = cache(2, 100);
        let (_, asked) = pull_hot(&c, &[1, 2], &[1], 0, 0.0);
        assert_eq!(asked, [1, 2], "nothing cached yet; 2 is hot and admitted");
        let (rows, asked) = pull_hot(&c, &[1, 2], &[1], 1, 1.0);
        assert_eq!(asked, [1], "2 served from the cache; 1 is not hot");
        assert_eq!(rows, [1.0, 1.0, 2.0, 0.0], "2 as pulled at step 0");
        assert_eq!(pull(&c, &[2], 2, 2.0).1, Vec::<u64>::new(), "step 0 + 2");
        assert_eq!(pull(&c, &[2], 3, 3.0).1, [2], "expired after step 2");
        let s = c.stats();
        assert_eq!((s.hits, s.misses), (2, 4));
        assert_eq!(s.pull_bytes_saved, 2 * 2 * 4);
        assert_eq!(c.len(), 1, "1 was never hot");
    }

    #[test]
    fn gradients_of_cached_rows_are_summed_and_pushed_once_at_expiry() {
        let c = cache(1, 100);
        let step0 = hold(&c, &[5, 6], 1.0, 0);
        assert_eq!(step0.keys, [5, 6], "nothing cached: pushed as is");
        pull(&c, &[5], 1, 1.0); // admitted at step 1: serves 1..=2
        let step1 = hold(&c, &[5, 6], 1.0, 1);
        assert_eq!(step1.keys, [6], "5 held");
        assert_eq!(step1.values, [1.0, -1.0]);
        pull(&c, &[5], 2, 2.0);
        let step2 = hold(&c, &[5], 0.5, 2);
        assert_eq!(step2.keys, [5], "its last step: the sum goes out");
        assert_eq!(step2.values, [1.5, -1.5]);
        assert!(c.is_empty());
        let s = c.stats();
        assert_eq!((s.rows_held, s.rows_flushed), (2, 1));
        assert_eq!(s.push_bytes_saved, 8, "one row push of 2 floats saved");
    }

    #[test]
    fn drain_hands_back_every_sum_and_empties_the_cache() {
        let c = cache(8, 100);
        pull(&c, &[1, 2], 0, 0.0);
        assert!(hold(&c, &[1, 2], 2.0, 0).keys.is_empty());
        let mut out = c.drain(Some(0.5));
        assert_eq!(out.len(), 1);
        let u = out.remove(0);
        assert_eq!(u.lr_scale, Some(0.5));
        let mut got: Vec<(u64, Vec<f32>)> = u
            .keys
            .iter()
            .zip(u.values.chunks(2))
            .map(|(&k, v)| (k, v.to_vec()))
            .collect();
        got.sort_by_key(|(k, _)| *k);
        assert_eq!(got, [(1, vec![2.0, -2.0]), (2, vec![2.0, -2.0])]);
        assert!(c.is_empty());
        assert!(c.drain(None).is_empty(), "nothing twice");
    }

    #[test]
    fn a_full_cache_admits_nothing_more_and_frozen_tables_keep_their_gradients_out() {
        let c = cache(4, 1);
        pull(&c, &[1, 2], 0, 0.0);
        assert_eq!(c.len(), 1, "capacity 1");
        let frozen = RowCache::new(
            vec![CachedTable {
                name: "emb".into(),
                dim: 2,
                pushed: false,
            }],
            4,
            10,
        );
        pull(&frozen, &[1], 0, 0.0);
        assert_eq!(
            hold(&frozen, &[1], 1.0, 0).keys,
            [1],
            "a table the worker does not push is not summed"
        );
        assert!(frozen.drain(None).is_empty());
    }

    #[test]
    fn a_row_re_pulled_before_its_sum_went_out_still_pushes_it_on_time() {
        let c = cache(1, 100);
        pull(&c, &[7], 1, 1.0); // serves 1..=2
        assert!(hold(&c, &[7], 1.0, 1).keys.is_empty());
        // The pull of step 3 runs before step 2's push (the pipeline).
        assert_eq!(pull(&c, &[7], 3, 3.0).1, [7], "expired for step 3");
        let step2 = hold(&c, &[7], 1.0, 2);
        assert_eq!(step2.keys, [7], "the old entry's sum goes out on time");
        assert_eq!(step2.values, [1.0, -1.0], "step 1's gradient");
        let out = c.drain(None);
        assert_eq!(out[0].values, [1.0, -1.0], "step 2's, in the new entry");
    }
}
