//! One table's rows on one shard, and what they cost in memory.
//!
//! A row is one contiguous slice `[weights (dim) | optimizer state]`.
//! **Sparse** rows live in slabs with a compact index ([`super::sparse`]),
//! created on first touch; an update holds its segment's write lock, so
//! concurrent pushes to one row serialize and a pull never observes a
//! half-written row. **Dense** rows live in contiguous blocks of
//! `block_rows` rows (the routing unit), one lock per block, allocated once
//! when the table is made: a dense row costs its floats and nothing more.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use ps_common::init::init_row;
use ps_common::routing::{IdBuildHasher, Placement};
use ps_common::{ShardRouter, TableKind, TableSpec};

use super::admission::Admitter;
use super::disk::{DiskError, DiskTier};
pub(crate) use super::sparse::Added;
use super::sparse::{self, Dropped, SparseRows};
use crate::optimizer;

/// Bytes a sparse row costs beyond its floats, at most: its key and its
/// share of the index ([`sparse::ROW_OVERHEAD`]).
pub const SPARSE_ROW_OVERHEAD: u64 = sparse::ROW_OVERHEAD;

/// Bytes a dense block costs beyond its floats (its map slot, lock and
/// allocation header).
pub const DENSE_BLOCK_OVERHEAD: u64 = 64;

/// Bytes every table costs whatever its rows (spec, maps, counters); a
/// sparse table adds its segments and their unfilled slab
/// ([`sparse::SEGMENTS_OVERHEAD`], [`sparse::slack_bytes`]).
pub const TABLE_OVERHEAD: u64 = 4096;

/// Which keys this shard owns.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Owner {
    pub(crate) shard_id: u32,
    pub(crate) router: ShardRouter,
}

impl Owner {
    pub(crate) fn owns(&self, placement: Placement, key: u64) -> bool {
        self.router.shard_of(placement, key) == self.shard_id
    }
}

/// The rows of one table on this shard.
#[derive(Debug)]
enum Rows {
    Sparse(SparseRows),
    Dense(DenseBlocks),
}

/// A dense table's blocks owned by this shard; the set of blocks is fixed
/// when the table is made, only their values change.
#[derive(Debug)]
struct DenseBlocks {
    rows: u64,
    block_rows: u64,
    blocks: HashMap<u64, RwLock<Box<[f32]>>, IdBuildHasher>,
}

/// One table's rows on this shard.
#[derive(Debug)]
pub struct Table {
    pub(crate) spec: TableSpec,
    pub(crate) placement: Placement,
    /// Floats per stored row: `dim` weights plus optimizer state.
    pub(crate) row_len: usize,
    rows: Rows,
    /// Dense rows held (sparse rows count themselves).
    dense_len: AtomicUsize,
    /// Upper bounds on the magnitude of every weight and of every value of
    /// optimizer state the table holds (the bits of non-negative `f32`s,
    /// which order as the numbers do): only ever raised, they let a push
    /// prove it cannot overflow a row. Kept apart because an optimizer's
    /// state bounds its steps (Adam's moments) without growing with them.
    max_weight: AtomicU32,
    max_state: AtomicU32,
    /// Pushes proven finite write holding it shared, others exclusively
    /// (see `Shard::push_many_once`).
    pub(crate) writers: Writers,
    /// The admission policy's state (sparse tables with admission).
    pub(crate) admitter: Option<Admitter>,
    /// Rows evicted since the table was made here.
    pub(crate) evicted: AtomicU64,
    /// Push calls applied here to a table with a lifecycle (its push
    /// clock; tables without one do not count, so pushes to them share no
    /// counter).
    pub(crate) pushes: AtomicU32,
    /// When the table was made here: the origin of a seconds clock.
    born: Instant,
}

/// The table's writer lock (poisoning ignored: the guarded data is `()`).
#[derive(Debug, Default)]
pub(crate) struct Writers(RwLock<()>);

impl Writers {
    pub(crate) fn read(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        self.0.read().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn write(&self) -> std::sync::RwLockWriteGuard<'_, ()> {
        self.0.write().unwrap_or_else(|p| p.into_inner())
    }
}

impl Table {
    /// An empty table: no sparse row yet, no dense block allocated. A
    /// sparse table with eviction moves its cold rows to `disk`, if given.
    pub(crate) fn empty(spec: TableSpec, disk: Option<&Arc<DiskTier>>) -> Table {
        let dim = spec.dim as usize;
        let row_len = dim + optimizer::state_len(&spec.optimizer, dim);
        let evicts = spec.lifecycle.eviction.is_some();
        let rows = match spec.kind {
            TableKind::Sparse => Rows::Sparse(SparseRows::new(
                row_len,
                evicts,
                disk.filter(|_| evicts).map(|tier| tier.table(row_len)),
            )),
            TableKind::Dense { rows, block_rows } => Rows::Dense(DenseBlocks {
                rows,
                block_rows: u64::from(block_rows),
                blocks: HashMap::default(),
            }),
        };
        Table {
            placement: spec.placement(),
            row_len,
            rows,
            dense_len: AtomicUsize::new(0),
            max_weight: AtomicU32::new(fresh_bounds(&spec).0.to_bits()),
            max_state: AtomicU32::new(fresh_bounds(&spec).1.to_bits()),
            writers: Writers::default(),
            admitter: (spec.lifecycle.admission).map(|a| Admitter::new(a, spec.seed)),
            evicted: AtomicU64::new(0),
            pushes: AtomicU32::new(0),
            born: Instant::now(),
            spec,
        }
    }

    /// The dense blocks `owner` owns, and the rows in them. Walks the
    /// table's blocks (bounded by `ps_common::table::MAX_DENSE_BLOCKS`).
    pub(crate) fn owned_blocks(spec: &TableSpec, owner: &Owner) -> Vec<(u64, u64)> {
        let TableKind::Dense { rows, block_rows } = spec.kind else {
            return Vec::new();
        };
        let block_rows = u64::from(block_rows);
        let placement = spec.placement();
        (0..rows.div_ceil(block_rows))
            .filter(|&b| owner.owns(placement, b * block_rows))
            .map(|b| (b, block_rows.min(rows - b * block_rows)))
            .collect()
    }

    /// Memory the table costs on this shard before any sparse row exists:
    /// the fixed part plus every dense block `owned_blocks` names.
    pub(crate) fn base_bytes(spec: &TableSpec, owned_blocks: &[(u64, u64)]) -> u64 {
        let dim = spec.dim as usize;
        let row_len = (dim + optimizer::state_len(&spec.optimizer, dim)) as u64;
        TABLE_OVERHEAD
            + (spec.lifecycle.admission.as_ref()).map_or(0, Admitter::bytes)
            + sparse_base(spec.kind, row_len as usize)
            + owned_blocks
                .iter()
                .map(|&(_, rows)| rows * row_len * 4 + DENSE_BLOCK_OVERHEAD)
                .sum::<u64>()
    }

    /// Allocates and initializes the dense blocks `owned_blocks` names.
    pub(crate) fn fill_dense(&mut self, owned_blocks: &[(u64, u64)]) {
        let row_len = self.row_len;
        let mut filled = HashMap::default();
        for &(block, rows) in owned_blocks {
            let first = match &self.rows {
                Rows::Dense(d) => block * d.block_rows,
                Rows::Sparse(_) => return,
            };
            let mut values = vec![0f32; rows as usize * row_len].into_boxed_slice();
            for (i, row) in values.chunks_exact_mut(row_len).enumerate() {
                self.fill_fresh_row(first + i as u64, row);
            }
            filled.insert(block, RwLock::new(values));
        }
        let owned: u64 = owned_blocks.iter().map(|&(_, rows)| rows).sum();
        if let Rows::Dense(d) = &mut self.rows {
            d.blocks = filled;
        }
        self.dense_len.store(owned as usize, Ordering::Relaxed);
    }

    /// Upper bounds on the magnitude of every weight, and of every value
    /// of optimizer state, the table holds.
    pub(crate) fn bounds(&self) -> (f32, f32) {
        (
            f32::from_bits(self.max_weight.load(Ordering::Relaxed)),
            f32::from_bits(self.max_state.load(Ordering::Relaxed)),
        )
    }

    /// Raises [`Table::bounds`] to cover `weight` and `state` magnitudes.
    pub(crate) fn raise_bounds(&self, weight: f32, state: f32) {
        for (bound, value) in [(&self.max_weight, weight), (&self.max_state, state)] {
            let bits = value.abs().to_bits();
            if bits > bound.load(Ordering::Relaxed) {
                bound.fetch_max(bits, Ordering::Relaxed);
            }
        }
    }

    /// Raises [`Table::bounds`] to cover the values of `row`.
    pub(crate) fn raise_bounds_to(&self, row: &[f32]) {
        let largest = |values: &[f32]| values.iter().fold(0f32, |m, v| m.max(v.abs()));
        let (w, state) = row.split_at(self.spec.dim as usize);
        self.raise_bounds(largest(w), largest(state));
    }

    /// The table's spec.
    pub fn spec(&self) -> &TableSpec {
        &self.spec
    }

    /// Rows held on this shard's disk tier.
    pub fn rows_on_disk(&self) -> u64 {
        self.sparse().map_or(0, SparseRows::on_disk)
    }

    /// Pushed rows found through the rows their pull found (no index
    /// lookup), so far.
    pub fn hinted_rows(&self) -> u64 {
        self.sparse().map_or(0, SparseRows::hinted_rows)
    }

    /// Whether the table's cold rows move to disk when evicted.
    pub fn has_disk(&self) -> bool {
        self.sparse().is_some_and(SparseRows::has_disk)
    }

    /// Rows held in memory on this shard.
    pub fn len(&self) -> usize {
        match &self.rows {
            Rows::Sparse(rows) => rows.len(),
            Rows::Dense(_) => self.dense_len.load(Ordering::Relaxed),
        }
    }

    /// True when this shard holds no row of the table.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of weights and optimizer state held on this shard.
    pub fn bytes(&self) -> u64 {
        (self.len() * self.row_len * std::mem::size_of::<f32>()) as u64
    }

    /// Whether this is a sparse table (rows created on touch).
    pub(crate) fn is_sparse(&self) -> bool {
        matches!(self.rows, Rows::Sparse(_))
    }

    /// What one more sparse row costs in memory.
    pub(crate) fn sparse_row_bytes(&self) -> u64 {
        let tracking = match self.spec.lifecycle.eviction {
            Some(_) => sparse::TRACKING_OVERHEAD,
            None => 0,
        };
        self.row_len as u64 * 4 + SPARSE_ROW_OVERHEAD + tracking
    }

    /// Memory the rows hold now, as the shard's budget counts it.
    pub(crate) fn memory_bytes(&self) -> u64 {
        match &self.rows {
            Rows::Sparse(_) => {
                TABLE_OVERHEAD
                    + (self.spec.lifecycle.admission.as_ref()).map_or(0, Admitter::bytes)
                    + sparse_base(self.spec.kind, self.row_len)
                    + self.len() as u64 * self.sparse_row_bytes()
            }
            Rows::Dense(d) => {
                TABLE_OVERHEAD + self.bytes() + d.blocks.len() as u64 * DENSE_BLOCK_OVERHEAD
            }
        }
    }

    /// Writes row `key` as the initializer creates it (weights and state) into `row`.
    pub(crate) fn fill_fresh_row(&self, key: u64, row: &mut [f32]) {
        let (w, state) = row.split_at_mut(self.spec.dim as usize);
        init_row(&self.spec.initializer, self.spec.seed, key, w);
        optimizer::init_state(&self.spec.optimizer, w, state);
    }

    /// Whether each row of `keys` exists on this shard, in memory or on
    /// disk (dense rows owned here always do).
    pub(crate) fn contains_many(&self, keys: &[u64]) -> Result<Vec<bool>, DiskError> {
        match &self.rows {
            Rows::Sparse(rows) => rows.contains_many(keys),
            Rows::Dense(_) => Ok(vec![true; keys.len()]),
        }
    }

    /// Whether row `key` is in memory on this shard.
    pub(crate) fn in_memory(&self, key: u64) -> bool {
        match &self.rows {
            Rows::Sparse(rows) => rows.in_memory(key),
            Rows::Dense(_) => true,
        }
    }

    /// Where dense row `key` lies: its block and the offset of its floats.
    #[inline]
    fn locate(d: &DenseBlocks, key: u64, row_len: usize) -> Option<(&RwLock<Box<[f32]>>, usize)> {
        let block = d.blocks.get(&(key / d.block_rows))?;
        Some((block, (key % d.block_rows) as usize * row_len))
    }

    /// Calls `f(i, row)` (read-only) with the row of every `keys[i]`,
    /// creating missing sparse rows first: in request order, except that
    /// rows missing in memory come last. Without `create` (and on a table
    /// with admission) none is created: a missing row is answered as the
    /// initializer makes it. With `load`, rows on disk come back to memory
    /// (else they are read where they lie). Returns the rows created or
    /// brought back. Dense keys must be owned here (the caller checked).
    pub(crate) fn read_many(
        &self,
        keys: &[u64],
        create: bool,
        load: bool,
        mut f: impl FnMut(usize, &[f32]),
    ) -> Result<usize, DiskError> {
        match &self.rows {
            Rows::Sparse(rows) => rows.read_many(
                keys,
                create && self.admitter.is_none(),
                load,
                |k, row| self.fill_fresh_row(k, row),
                f,
            ),
            Rows::Dense(d) => {
                for (i, &key) in keys.iter().enumerate() {
                    if let Some((block, at)) = Self::locate(d, key, self.row_len) {
                        let values = block.read().unwrap_or_else(|p| p.into_inner());
                        f(i, &values[at..at + self.row_len]);
                    }
                }
                Ok(0)
            }
        }
    }

    /// Calls `f(i, row)` for writing with the row of every `keys[i]`,
    /// bringing sparse rows back from disk or creating missing ones first;
    /// repeats of a key are applied in request order. Returns the rows
    /// created or brought back. `ahead(i)` comes a few keys before
    /// `f(i, ..)` on a large sparse table, for the caller to prefetch what
    /// `f` reads (see [`SparseRows::update_many`]); dense rows are written
    /// in request order and get no hints.
    pub(crate) fn update_many(
        &self,
        keys: &[u64],
        ahead: impl Fn(usize),
        mut f: impl FnMut(usize, &mut [f32]),
    ) -> Result<usize, DiskError> {
        match &self.rows {
            Rows::Sparse(rows) => {
                rows.update_many(keys, |k, row| self.fill_fresh_row(k, row), ahead, f)
            }
            Rows::Dense(_) => {
                for (i, &key) in keys.iter().enumerate() {
                    self.update(key, |row| f(i, row))?;
                }
                Ok(0)
            }
        }
    }

    /// Copies row `key` into `out` if it exists; `false` if it does not.
    #[cfg(test)]
    pub(crate) fn copy_row(&self, key: u64, out: &mut [f32]) -> bool {
        match &self.rows {
            Rows::Sparse(rows) => rows.read(key, |row| out.copy_from_slice(row)).is_some(),
            Rows::Dense(d) => match Self::locate(d, key, self.row_len) {
                Some((block, at)) => {
                    let values = block.read().unwrap_or_else(|p| p.into_inner());
                    out.copy_from_slice(&values[at..at + self.row_len]);
                    true
                }
                None => false,
            },
        }
    }

    /// Calls `f` with row `key` for writing, bringing a sparse row back
    /// from disk or creating a missing one first. Says how it found the
    /// row (`None`: a dense key this shard does not hold).
    #[inline]
    pub(crate) fn update(
        &self,
        key: u64,
        f: impl FnOnce(&mut [f32]),
    ) -> Result<Option<Added>, DiskError> {
        match &self.rows {
            Rows::Sparse(rows) => rows
                .update(key, |row| self.fill_fresh_row(key, row), f)
                .map(Some),
            Rows::Dense(d) => {
                let Some((block, at)) = Self::locate(d, key, self.row_len) else {
                    return Ok(None);
                };
                let mut values = block.write().unwrap_or_else(|p| p.into_inner());
                f(&mut values[at..at + self.row_len]);
                Ok(Some(Added::Found))
            }
        }
    }

    /// Replaces row `key` with `row` (`row_len` floats). Says how it found
    /// the row.
    pub(crate) fn set(&self, key: u64, row: &[f32]) -> Result<Option<Added>, DiskError> {
        self.raise_bounds_to(row);
        match &self.rows {
            Rows::Sparse(rows) => rows
                .update(key, |_| (), |r| r.copy_from_slice(row))
                .map(Some),
            Rows::Dense(_) => self.update(key, |r| r.copy_from_slice(row)),
        }
    }

    /// Writes `keys`' rows (`rows`: `row_len` floats each) straight to the
    /// disk tier: a restore's rows past the memory budget. Returns the rows
    /// written (none without a tier).
    pub(crate) fn put_on_disk(&self, keys: &[u64], rows: &[f32]) -> Result<usize, DiskError> {
        let Some(sparse) = self.sparse() else {
            return Ok(0);
        };
        let rows: Vec<&[f32]> = rows.chunks_exact(self.row_len).collect();
        // Rows on disk come back into memory under the table's bounds.
        rows.iter().for_each(|row| self.raise_bounds_to(row));
        sparse.put_on_disk(keys.iter().copied().zip(rows))
    }

    /// Moves the rows of `keys` that are in memory to disk (`spill`, on a
    /// table with a disk tier), or removes them from either tier. Returns
    /// the rows that left memory and those dropped from disk.
    pub(crate) fn evict(&self, keys: &[u64], spill: bool) -> Result<Dropped, DiskError> {
        match self.sparse() {
            Some(rows) if spill && rows.has_disk() => Ok(Dropped {
                memory: rows.spill(keys)?,
                disk: 0,
            }),
            Some(rows) => rows.drop_rows(keys),
            None => Ok(Dropped::default()),
        }
    }

    /// Removes sparse row `key` if `remove(row)` says so (a row a
    /// refused push created). Returns whether it was removed.
    pub(crate) fn remove_if(&self, key: u64, remove: impl FnOnce(&[f32]) -> bool) -> bool {
        let Rows::Sparse(rows) = &self.rows else {
            return false;
        };
        rows.remove_if(key, remove)
    }

    /// Hands every row to `each` as `(key, row)`, in memory or on disk,
    /// each row read whole under its lock (rows are not captured at one
    /// instant).
    pub(crate) fn for_each_row(&self, mut each: impl FnMut(u64, &[f32])) -> Result<(), DiskError> {
        match &self.rows {
            Rows::Sparse(rows) => rows.for_each(each),
            Rows::Dense(d) => {
                for (&block, values) in &d.blocks {
                    let values = values.read().unwrap_or_else(|p| p.into_inner());
                    let first = block * d.block_rows;
                    for (i, row) in values.chunks_exact(self.row_len).enumerate() {
                        each(first + i as u64, row);
                    }
                }
                Ok(())
            }
        }
    }

    /// A sparse table's rows (`None` for a dense table).
    pub(super) fn sparse(&self) -> Option<&SparseRows> {
        match &self.rows {
            Rows::Sparse(rows) => Some(rows),
            Rows::Dense(_) => None,
        }
    }

    /// Seconds since the table was made on this shard (saturating).
    pub(super) fn age_seconds(&self) -> u32 {
        u32::try_from(self.born.elapsed().as_secs()).unwrap_or(u32::MAX)
    }

    /// The rows that changed since the last call (`only_changed` false:
    /// every row) to `row`, and a sparse table's removed keys to
    /// `removed`; clears both records (see [`SparseRows::take_changes`]).
    /// A dense table hands every row each time (it keeps no record).
    pub(crate) fn take_changes(
        &self,
        only_changed: bool,
        row: impl FnMut(u64, &[f32]),
        removed: impl FnMut(u64),
    ) -> Result<(), DiskError> {
        match &self.rows {
            Rows::Sparse(rows) => rows.take_changes(only_changed, row, removed),
            Rows::Dense(_) => self.for_each_row(row),
        }
    }

    /// From now on, records changed rows and removed keys for
    /// [`Table::take_changes`].
    pub(crate) fn record_changes(&self) {
        if let Rows::Sparse(rows) = &self.rows {
            rows.record_changes();
        }
    }

    /// Dense: the number of rows of the whole tensor (all shards).
    pub(crate) fn dense_rows(&self) -> Option<u64> {
        match &self.rows {
            Rows::Dense(d) => Some(d.rows),
            Rows::Sparse(_) => None,
        }
    }
}

/// What a sparse table costs beyond [`TABLE_OVERHEAD`] and its rows: its
/// segments and the slab they may hold unfilled.
fn sparse_base(kind: TableKind, row_len: usize) -> u64 {
    match kind {
        TableKind::Sparse => sparse::SEGMENTS_OVERHEAD + sparse::slack_bytes(row_len),
        TableKind::Dense { .. } => 0,
    }
}

/// The largest magnitudes a fresh row of `spec` can hold: its weights (from
/// the initializer) and its optimizer's starting state, with margin.
fn fresh_bounds(spec: &TableSpec) -> (f32, f32) {
    use ps_common::{InitializerSpec, OptimizerSpec};
    let weights = match spec.initializer {
        InitializerSpec::Zeros => 0.0,
        InitializerSpec::Constant { value } => value.abs(),
        InitializerSpec::Uniform { low, high } => low.abs().max(high.abs()),
        // A Box-Muller sample from 53 random bits is within 8.6 std.
        InitializerSpec::Normal { mean, std } => mean.abs() + 10.0 * std,
    };
    let state = match spec.optimizer {
        OptimizerSpec::Sgd { .. } => 0.0,
        OptimizerSpec::Adagrad {
            initial_accumulator,
            ..
        } => initial_accumulator,
        OptimizerSpec::Adam { .. } => 1.0,
        OptimizerSpec::Ftrl {
            alpha,
            beta,
            l1,
            l2,
        } => weights * (beta / alpha + l2) + l1,
    };
    (weights * 1.01, state * 1.01)
}
