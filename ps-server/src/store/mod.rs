//! The tables of one shard, knowing nothing of gRPC.
//!
//! A [`Shard`] owns its tables ([`table`]: sparse rows in slabs, dense rows
//! in blocks) and its memory budget ([`crate::budget`]). It knows nothing of
//! requests, replication or who wrote what: the writer ([`crate::writer`])
//! decides whether a push is applied, the store applies it. Every operation validates
//! its whole input before changing anything, so a request is either applied
//! completely or not at all; a request that may create rows reserves their
//! memory first. Rows are always finite. A table keeps bounds on the
//! magnitudes of its weights and optimizer state; a push whose worst case
//! (its optimizer's update, applied once per key, from those bounds) stays
//! far below `f32::MAX` is applied as is and raises the bounds. Any other
//! push writes its tables alone (proven pushes share them, so no proof reads
//! bounds an unbounded write is passing) and is checked row by row as it is
//! written, with an undo record: if a row would leave the finite range the
//! push is refused and the rows it had changed are put back (a concurrent
//! pull may see them for those microseconds; a row an `Assign` changed
//! meanwhile keeps both, as putting it back would lose that write).
//!
//! - [`table`]: one table's rows and what they cost.
//! - [`finite`]: the proof that a push keeps its rows finite, the per-row
//!   check and the undo record for pushes it cannot prove.
//! - [`sparse`]: a sparse table's rows in slabs, with a compact index.
//! - [`admission`]: which pushed ids get a row (count-min sketch or chance).
//! - [`lifecycle`]: a sparse table's clock, and which rows are cold or expired.
//! - [`push`]: pushes checked, admitted and applied.
//! - [`snapshot`]: the tables as plain data, for checkpoints and joins.
//! - [`delta`]: what changed since the last checkpoint, for incremental ones.
//! - [`disk`]: the disk tier, where evicted rows of a shard started with
//!   `--disk-tier` move to and come back from.

mod admission;
mod delta;
pub mod disk;
mod finite;
mod lifecycle;
mod push;
mod snapshot;
mod sparse;
mod table;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use dashmap::DashMap;
use ps_common::routing::IdBuildHasher;
use ps_common::{PsError, ShardRouter, TableSpec};

use crate::budget::{MemoryBudget, Reservation};
use crate::optimizer;

pub use delta::{ShardDelta, TableDelta};
use disk::DiskTier;
pub use push::{PreparedPushes, Push};
pub use snapshot::{ShardSnapshot, ShardSnapshotV1, TableSnapshot};
use table::Added;
use table::Owner;
pub use table::{SPARSE_ROW_OVERHEAD, Table};

/// Most tables one shard holds.
pub const MAX_TABLES: usize = 4096;

/// Rows and bytes of one table, as reported by [`Shard::table_stats`].
#[derive(Debug, Clone, PartialEq)]
pub struct TableStats {
    /// The table's spec.
    pub spec: TableSpec,
    /// Rows held in memory on this shard.
    pub rows: u64,
    /// Bytes of weights and optimizer state in memory.
    pub bytes: u64,
    /// Memory the rows take as the budget counts it (with the store's overhead).
    pub memory_bytes: u64,
    /// Ids given a row by the table's admission policy.
    pub admitted_rows: u64,
    /// Pushed rows dropped because their id was not admitted.
    pub filtered_pushes: u64,
    /// Rows evicted (dropped, or moved to the disk tier).
    pub evicted_rows: u64,
    /// Rows on the disk tier.
    pub rows_on_disk: u64,
    /// Pushed rows found through the rows their pull found, without an
    /// index lookup.
    pub hinted_rows: u64,
}

/// Checks that `values` values of `what` fit `keys` rows of `table`.
fn check_len(table: &Table, keys: usize, values: usize, what: &str) -> Result<(), PsError> {
    let dim = table.spec.dim as usize;
    if values != keys * dim {
        return Err(PsError::invalid(format!(
            "table '{}' has dim {dim}: {keys} keys need {} {what}, got {values}",
            table.spec.name,
            keys * dim,
        )));
    }
    Ok(())
}

/// Puts `values` at `at` in `out`, which holds everything before `at` (or
/// more, when `values` fills a gap left earlier): rows handed over in
/// request order are appended, a late one fills its gap.
#[inline]
fn place(out: &mut Vec<f32>, at: usize, values: &[f32]) {
    if out.len() < at {
        out.resize(at, 0.0);
    }
    if out.len() == at {
        out.extend_from_slice(values);
    } else {
        out[at..at + values.len()].copy_from_slice(values);
    }
}

/// All tables of one shard. Cheap to share: wrap it in an `Arc`.
#[derive(Debug)]
pub struct Shard {
    owner: Owner,
    tables: DashMap<String, Arc<Table>>,
    /// Held while a table is made, so the tables map is never locked for
    /// the time it takes to allocate one (other requests go on).
    creating: Mutex<()>,
    /// The bytes the tables may hold (`--memory-budget`).
    pub budget: MemoryBudget,
    /// Most rows a sparse table may hold on this shard (`usize::MAX`: no cap).
    row_cap: AtomicUsize,
    /// Pulls create no rows (a read replica: its rows come from its primary).
    read_only: std::sync::atomic::AtomicBool,
    /// Where evicted rows move to instead of being dropped (`--disk-tier`).
    disk: Option<Arc<DiskTier>>,
}

impl Shard {
    /// An empty shard `shard_id` of `num_shards`, with no memory limit
    /// (see [`Shard::budget`]).
    pub fn new(shard_id: u32, num_shards: u32) -> Self {
        Shard {
            owner: Owner {
                shard_id,
                router: ShardRouter::new(num_shards),
            },
            tables: DashMap::new(),
            creating: Mutex::new(()),
            budget: MemoryBudget::default(),
            row_cap: AtomicUsize::new(usize::MAX),
            read_only: std::sync::atomic::AtomicBool::new(false),
            disk: None,
        }
    }

    /// This shard with a disk tier: tables with eviction made from now on
    /// move the rows their row cap or the memory budget gives up to `tier`
    /// instead of dropping them, and bring them back when touched.
    pub fn with_disk_tier(mut self, tier: Arc<DiskTier>) -> Self {
        self.disk = Some(tier);
        self
    }

    /// The shard's disk tier, if it has one.
    pub fn disk_tier(&self) -> Option<&Arc<DiskTier>> {
        self.disk.as_ref()
    }

    /// Pulls create no rows: a missing sparse row is answered as the
    /// table's initializer makes it and not stored (a read replica, whose
    /// rows come only from its primary's writes).
    pub fn set_read_only(&self, read_only: bool) {
        self.read_only.store(read_only, Ordering::Relaxed);
    }

    /// Caps the rows each sparse table may hold on this shard (`None`: no
    /// cap). A pull, push or assign that would create rows past the cap is
    /// refused with RESOURCE_EXHAUSTED and creates nothing. Concurrent
    /// requests are checked independently: a table can pass the cap by at
    /// most the new rows of requests in flight together (the memory
    /// budget, in contrast, is exact).
    pub fn set_row_cap(&self, cap: Option<usize>) {
        self.row_cap
            .store(cap.unwrap_or(usize::MAX), Ordering::Relaxed);
    }

    /// The distinct keys of `keys` that `table` does not hold in memory
    /// yet and `may_create` accepts.
    fn fresh_keys(table: &Table, keys: &[u64], may_create: &impl Fn(u64) -> bool) -> usize {
        let mut fresh: std::collections::HashSet<u64, IdBuildHasher> =
            std::collections::HashSet::default();
        for &k in keys {
            if !table.in_memory(k) && may_create(k) {
                fresh.insert(k);
            }
        }
        fresh.len()
    }

    /// Checks the row cap and reserves the memory of the rows a request on
    /// `keys` may create: at worst every key is new; when that does not fit,
    /// the keys the table lacks are counted (with their repeats, so no
    /// memory is needed to count). Refuses with RESOURCE_EXHAUSTED, before
    /// anything is created, a request that cannot fit.
    fn make_room(&self, table: &Table, keys: &[u64]) -> Result<Reservation<'_>, PsError> {
        self.make_room_for(table, keys, |_| true)
    }

    /// Room for the rows a push may create: in a table with admission, only
    /// for ids its policy may admit now ([`admission::Admitter::may_admit`]; an id
    /// admitted by a push racing this one, or a row brought back from disk,
    /// is charged when it enters memory, so the budget never undercounts).
    fn make_room_for_push(&self, table: &Table, keys: &[u64]) -> Result<Reservation<'_>, PsError> {
        match &table.admitter {
            Some(admitter) => self.make_room_for(table, keys, |k| admitter.may_admit(k)),
            None => self.make_room(table, keys),
        }
    }

    /// [`Shard::make_room`] for the keys `may_create` accepts.
    fn make_room_for(
        &self,
        table: &Table,
        keys: &[u64],
        may_create: impl Fn(u64) -> bool,
    ) -> Result<Reservation<'_>, PsError> {
        if !table.is_sparse() {
            return self.budget.reserve(0, String::new);
        }
        let cap = self.row_cap.load(Ordering::Relaxed);
        let mut fresh = None;
        if cap != usize::MAX {
            let new = Self::fresh_keys(table, keys, &may_create);
            let held = table.len();
            if held + new > cap {
                return Err(PsError::ResourceExhausted(format!(
                    "table '{}' holds {held} rows on this shard; {new} new rows would pass its cap of {cap} (--max-rows-per-table)",
                    table.spec.name
                )));
            }
            fresh = Some(new);
        }
        let per_row = table.sparse_row_bytes();
        let worst = keys.len() as u64 * per_row;
        if fresh.is_none()
            && let Ok(reservation) = self.budget.reserve(worst, String::new)
        {
            return Ok(reservation);
        }
        // Keys the table lacks, counted with their repeats (an upper bound
        // on the rows created that needs no memory to count).
        let new = fresh.unwrap_or_else(|| {
            (keys.iter())
                .filter(|&&k| !table.in_memory(k) && may_create(k))
                .count()
        }) as u64;
        self.budget.reserve(new * per_row, || {
            format!("creating up to {new} rows of table '{}'", table.spec.name)
        })
    }

    /// This shard's index.
    pub fn shard_id(&self) -> u32 {
        self.owner.shard_id
    }

    /// Number of shards in the job.
    pub fn num_shards(&self) -> u32 {
        self.owner.router.num_shards()
    }

    /// Creates a table. Returns `Ok(true)` if it was created, `Ok(false)` if an
    /// identical table already existed, and an error naming the first differing
    /// field if a different one did. A table whose rows would not fit in the
    /// memory budget is refused before anything is allocated; a dense
    /// table's rows are allocated without holding the tables map, so other
    /// requests go on meanwhile.
    pub fn create_table(&self, spec: TableSpec) -> Result<bool, PsError> {
        spec.validate()?;
        let _one_at_a_time = self.creating.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(existing) = self.tables.get(&spec.name) {
            return match existing.spec.first_difference(&spec) {
                None => Ok(false),
                Some((field, existing, requested)) => Err(PsError::TableConflict {
                    table: spec.name,
                    field,
                    existing,
                    requested,
                }),
            };
        }
        if self.tables.len() >= MAX_TABLES {
            return Err(PsError::ResourceExhausted(format!(
                "this shard already holds {MAX_TABLES} tables"
            )));
        }
        let owned = Table::owned_blocks(&spec, &self.owner);
        let bytes = Table::base_bytes(&spec, &owned);
        let mut reservation = self
            .budget
            .reserve(bytes, || format!("table '{}'", spec.name))?;
        let mut table = Table::empty(spec, self.disk.as_ref());
        table.fill_dense(&owned);
        reservation.keep(bytes);
        self.tables.insert(table.spec.name.clone(), Arc::new(table));
        Ok(true)
    }

    /// The named table.
    pub fn table(&self, name: &str) -> Result<Arc<Table>, PsError> {
        self.tables
            .get(name)
            .map(|t| Arc::clone(t.value()))
            .ok_or_else(|| PsError::UnknownTable(name.to_string()))
    }

    /// Checks that every key belongs to this shard (and, for dense tables, to the tensor).
    fn check_keys(&self, table: &Table, keys: &[u64]) -> Result<(), PsError> {
        if let Some(rows) = table.dense_rows()
            && let Some(&bad) = keys.iter().find(|&&k| k >= rows)
        {
            return Err(PsError::invalid(format!(
                "row {bad} is out of range for dense table '{}' with {rows} rows",
                table.spec.name
            )));
        }
        if let Some(bad) =
            self.owner
                .router
                .first_foreign(table.placement, keys, self.owner.shard_id)
        {
            return Err(PsError::invalid(format!(
                "key {bad} of table '{}' belongs to shard {}, not shard {} (client routing mismatch: check the order and count of --servers)",
                table.spec.name,
                self.owner.router.shard_of(table.placement, bad),
                self.owner.shard_id
            )));
        }
        Ok(())
    }

    /// Appends the weights of `keys` (in order) to `out`; creates missing
    /// sparse rows. Returns the table's dim.
    pub fn pull(&self, table: &str, keys: &[u64], out: &mut Vec<f32>) -> Result<u32, PsError> {
        let table = self.table(table)?;
        let (start, dim) = (out.len(), table.spec.dim as usize);
        self.check_keys(&table, keys)?;
        // Nothing is handed over unless the pull is admitted, so `out` grows
        // only then.
        self.pull_rows(&table, keys, |i, row| {
            if out.len() == start {
                out.reserve(keys.len() * dim);
            }
            place(out, start + i * dim, row);
        })
    }

    /// Hands the weights of every `keys[i]` to `each(i, weights)`, in
    /// request order except for the rows the call creates, which come last;
    /// creates missing sparse rows.
    /// Returns the table's dim. Lets a caller encode rows straight from the
    /// table.
    pub fn pull_each(
        &self,
        table: &str,
        keys: &[u64],
        each: impl FnMut(usize, &[f32]),
    ) -> Result<u32, PsError> {
        let table = self.table(table)?;
        self.check_keys(&table, keys)?;
        self.pull_rows(&table, keys, each)
    }

    /// [`Shard::pull_each`] on checked keys.
    fn pull_rows(
        &self,
        table: &Table,
        keys: &[u64],
        mut each: impl FnMut(usize, &[f32]),
    ) -> Result<u32, PsError> {
        // A table with admission, or a read-only shard, creates no row on a
        // pull; only a read-only one leaves rows on disk where they lie.
        let read_only = self.read_only.load(Ordering::Relaxed);
        let create = table.admitter.is_none() && !read_only;
        let mut room = match create || (!read_only && table.rows_on_disk() > 0) {
            false => self.budget.reserve(0, String::new)?,
            true => self.make_room(table, keys)?,
        };
        let dim = table.spec.dim as usize;
        let added = table.read_many(keys, create, !read_only, |i, row| each(i, &row[..dim]))?;
        room.keep(added as u64 * table.sparse_row_bytes());
        Ok(table.spec.dim)
    }

    /// Sets the weights of `keys` (`values` holds `keys.len() * dim`), with
    /// optimizer state reset as for a fresh row. Nothing changes unless the
    /// whole request is valid.
    pub fn assign(&self, table: &str, keys: &[u64], values: &[f32]) -> Result<usize, PsError> {
        let table = self.table(table)?;
        let dim = table.spec.dim as usize;
        check_len(&table, keys.len(), values.len(), "values")?;
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(PsError::invalid(format!(
                "value for key {} of table '{}' is not finite ({}); nothing was assigned",
                keys[i / dim],
                table.spec.name,
                values[i]
            )));
        }
        self.check_keys(&table, keys)?;
        let mut room = self.make_room(&table, keys)?;
        let per_row = table.sparse_row_bytes();
        let mut row = vec![0f32; table.row_len];
        for (&key, weights) in keys.iter().zip(values.chunks_exact(dim)) {
            let (w, state) = row.split_at_mut(dim);
            w.copy_from_slice(weights);
            optimizer::init_state(&table.spec.optimizer, w, state);
            if matches!(table.set(key, &row)?, Some(Added::Created | Added::Loaded)) {
                room.keep(per_row);
            }
        }
        Ok(keys.len())
    }

    /// Evicts the rows of `keys` from sparse table `table` (the primary's
    /// evictor chose them, a backup repeats it): with `spill`, on a table
    /// with a disk tier, the rows in memory move to disk; otherwise they
    /// are removed from whichever tier holds them. Releases the memory of
    /// the rows that leave it. Returns the rows evicted.
    pub fn evict(&self, table: &str, keys: &[u64], spill: bool) -> Result<usize, PsError> {
        let table = self.table(table)?;
        if !table.is_sparse() {
            return Err(PsError::invalid(format!(
                "table '{}' is dense: its rows cannot be evicted",
                table.spec.name
            )));
        }
        let dropped = table.evict(keys, spill)?;
        let evicted = dropped.memory + dropped.disk;
        table.evicted.fetch_add(evicted as u64, Ordering::Relaxed);
        self.budget
            .release(dropped.memory as u64 * table.sparse_row_bytes());
        Ok(evicted)
    }

    /// The tables that evict, by name order.
    pub fn evicting_tables(&self) -> Vec<Arc<Table>> {
        let mut tables = self.tables_by_name();
        tables.retain(|t| t.eviction().is_some());
        tables
    }

    /// Every table, by name order.
    fn tables_by_name(&self) -> Vec<Arc<Table>> {
        let mut tables: Vec<Arc<Table>> =
            self.tables.iter().map(|t| Arc::clone(t.value())).collect();
        tables.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
        tables
    }

    /// Rows and bytes of every table, sorted by name. Reads counters only
    /// (no table is walked).
    pub fn table_stats(&self) -> Vec<TableStats> {
        let mut stats: Vec<TableStats> = self
            .tables
            .iter()
            .map(|t| TableStats {
                spec: t.spec.clone(),
                rows: t.len() as u64,
                bytes: t.bytes(),
                memory_bytes: t.memory_bytes(),
                admitted_rows: (t.admitter.as_ref())
                    .map_or(0, |a| a.admitted.load(Ordering::Relaxed)),
                filtered_pushes: (t.admitter.as_ref())
                    .map_or(0, |a| a.filtered.load(Ordering::Relaxed)),
                evicted_rows: t.evicted_rows(),
                rows_on_disk: t.rows_on_disk(),
                hinted_rows: t.hinted_rows(),
            })
            .collect();
        stats.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
        stats
    }
}

#[cfg(test)]
mod tests;
