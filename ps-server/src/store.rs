//! The tables of one shard: concurrent maps of rows, knowing nothing of gRPC.
//!
//! Every table is a `DashMap<u64, Box<[f32]>>` whose values are whole rows
//! `[weights | optimizer state]`. A push updates a row while holding that
//! map shard's write lock, so concurrent pushes to one row serialize and a
//! pull never observes a half-written row. Sparse tables create rows on first
//! touch; dense tables create the rows this shard owns when the table is made.
//!
//! Every operation validates its whole input before changing anything, so a
//! request is either applied completely or not at all.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use ps_common::init::init_row;
use ps_common::routing::{IdBuildHasher, Placement};
use ps_common::{OptimizerSpec, PsError, ShardRouter, TableKind, TableSpec};
use serde::{Deserialize, Serialize};

use crate::dedup::Claim;
use crate::optimizer;

/// One table's rows on this shard.
#[derive(Debug)]
pub struct Table {
    spec: TableSpec,
    placement: Placement,
    /// Floats per stored row: `dim` weights plus optimizer state.
    row_len: usize,
    rows: DashMap<u64, Box<[f32]>, IdBuildHasher>,
}

impl Table {
    fn new_empty(spec: TableSpec) -> Self {
        let dim = spec.dim as usize;
        Table {
            placement: spec.placement(),
            row_len: dim + optimizer::state_len(&spec.optimizer, dim),
            rows: DashMap::with_hasher(IdBuildHasher::default()),
            spec,
        }
    }

    fn new(spec: TableSpec, owner: &Owner) -> Self {
        let table = Table::new_empty(spec);
        if let TableKind::Dense { rows, .. } = table.spec.kind {
            for key in (0..rows).filter(|&k| owner.owns(table.placement, k)) {
                table.rows.insert(key, table.fresh_row(key));
            }
        }
        table
    }

    /// The table's spec.
    pub fn spec(&self) -> &TableSpec {
        &self.spec
    }

    /// Rows held on this shard.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// True when this shard holds no row of the table.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Bytes of weights and optimizer state held on this shard.
    pub fn bytes(&self) -> u64 {
        (self.rows.len() * self.row_len * std::mem::size_of::<f32>()) as u64
    }

    fn fresh_row(&self, key: u64) -> Box<[f32]> {
        let mut row = vec![0f32; self.row_len].into_boxed_slice();
        self.fill_fresh_row(key, &mut row);
        row
    }

    /// Writes row `key` as the initializer creates it (weights and state) into `row`.
    fn fill_fresh_row(&self, key: u64, row: &mut [f32]) {
        let (w, state) = row.split_at_mut(self.spec.dim as usize);
        init_row(&self.spec.initializer, self.spec.seed, key, w);
        optimizer::init_state(&self.spec.optimizer, w, state);
    }
}

/// Which keys this shard owns.
#[derive(Debug, Clone, Copy)]
struct Owner {
    shard_id: u32,
    router: ShardRouter,
}

impl Owner {
    fn owns(&self, placement: Placement, key: u64) -> bool {
        self.router.shard_of(placement, key) == self.shard_id
    }
}

/// Counters of the requests a shard has served.
#[derive(Debug, Default)]
pub struct RequestCounters {
    /// CreateTable calls.
    pub create_table: AtomicU64,
    /// Pull calls.
    pub pull: AtomicU64,
    /// Push calls.
    pub push: AtomicU64,
    /// Stats calls.
    pub stats: AtomicU64,
    /// Checkpoint calls.
    pub checkpoint: AtomicU64,
    /// Assign requests.
    pub assign: AtomicU64,
    /// Clock calls.
    pub clock: AtomicU64,
    /// PullMany calls.
    pub pull_many: AtomicU64,
    /// PushMany calls.
    pub push_many: AtomicU64,
    /// Calls answered with an error.
    pub errors: AtomicU64,
    /// Rows returned by pulls.
    pub rows_pulled: AtomicU64,
    /// Rows updated by pushes.
    pub rows_pushed: AtomicU64,
    /// Encoded bytes of pull requests and their responses.
    pub pull_bytes: AtomicU64,
    /// Encoded bytes of push requests and their responses.
    pub push_bytes: AtomicU64,
    /// Push calls applied (a `PushMany` counts once), from workers or replicated.
    pub updates_applied: AtomicU64,
    /// Push calls acknowledged as duplicates of an applied `(writer, seq)`.
    pub duplicate_pushes: AtomicU64,
    /// Writes applied from the primary's Replicate calls (backup).
    pub replicated_entries: AtomicU64,
    /// Row updates dropped because they would have made the row
    /// non-finite after the push was checked (a concurrent push moved the
    /// row in between); rows themselves are never non-finite.
    pub nonfinite_skipped: AtomicU64,
}

impl RequestCounters {
    /// Adds `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

impl Shard {
    /// The shard's metrics in Prometheus text format.
    pub fn render_metrics(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        self.rpc_metrics.render(&mut out);
        let c = &self.counters;
        for (name, help, counter) in [
            (
                "ps_rows_pulled_total",
                "Rows returned by pulls.",
                &c.rows_pulled,
            ),
            (
                "ps_rows_pushed_total",
                "Rows updated by pushes.",
                &c.rows_pushed,
            ),
            (
                "ps_pull_bytes_total",
                "Encoded bytes of pull responses.",
                &c.pull_bytes,
            ),
            (
                "ps_push_bytes_total",
                "Encoded bytes of push requests.",
                &c.push_bytes,
            ),
        ] {
            crate::metrics::gauge(
                &mut out,
                name,
                "counter",
                help,
                counter.load(Ordering::Relaxed) as f64,
            );
        }
        let tables = self.table_stats();
        out.push_str("# HELP ps_table_rows Rows held by this shard.\n# TYPE ps_table_rows gauge\n");
        for t in &tables {
            let _ = writeln!(out, "ps_table_rows{{table=\"{}\"}} {}", t.spec.name, t.rows);
        }
        out.push_str("# HELP ps_table_bytes Bytes of rows (weights and optimizer state).\n# TYPE ps_table_bytes gauge\n");
        for t in &tables {
            let _ = writeln!(
                out,
                "ps_table_bytes{{table=\"{}\"}} {}",
                t.spec.name, t.bytes
            );
        }
        out
    }
}

/// Rows and bytes of one table, as reported by [`Shard::table_stats`].
#[derive(Debug, Clone, PartialEq)]
pub struct TableStats {
    /// The table's spec.
    pub spec: TableSpec,
    /// Rows held on this shard.
    pub rows: u64,
    /// Bytes of weights and optimizer state.
    pub bytes: u64,
}

/// Everything a shard holds, in a form bincode can write.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardSnapshot {
    /// The shard that wrote it.
    pub shard_id: u32,
    /// Shards in the job that wrote it.
    pub num_shards: u32,
    /// Tables, by name order.
    pub tables: Vec<TableSnapshot>,
}

/// One table's rows on one shard.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TableSnapshot {
    /// The table's spec (stored as its `ps.v1.TableSpec` protobuf encoding:
    /// the versioned wire format, and one bincode can carry).
    #[serde(with = "spec_as_protobuf")]
    pub spec: TableSpec,
    /// Floats per stored row (weights plus optimizer state).
    pub row_len: u32,
    /// Row keys.
    pub keys: Vec<u64>,
    /// `keys.len() * row_len` floats, row after row.
    pub values: Vec<f32>,
}

mod spec_as_protobuf {
    use prost::Message;
    use ps_common::{TableSpec, pb};
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(spec: &TableSpec, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&pb::TableSpec::from(spec).encode_to_vec())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<TableSpec, D::Error> {
        let bytes = <Vec<u8>>::deserialize(d)?;
        let wire = pb::TableSpec::decode(bytes.as_slice()).map_err(D::Error::custom)?;
        TableSpec::try_from(wire).map_err(D::Error::custom)
    }
}

/// Refuses pushes whose updates would leave a row they touch non-finite
/// (weights or optimizer state: an overflowing gradient, a key repeated
/// until its weight overflows, an accumulator at infinity). The updates are
/// computed on copies, in request order (a key repeated within the pushes
/// sees its earlier updates), so a refused call changes nothing. Needs
/// transient memory of one row per distinct key, bounded by the request.
fn check_stays_finite(tables: &[Arc<Table>], pushes: &[Push<'_>]) -> Result<(), PsError> {
    use std::collections::hash_map::Entry as Slot;
    let distinct_floats: usize = tables
        .iter()
        .zip(pushes)
        .map(|(t, p)| p.keys.len() * t.row_len)
        .sum();
    let mut copies: Vec<f32> = Vec::with_capacity(distinct_floats);
    let mut slots: std::collections::HashMap<(usize, u64), usize, IdBuildHasher> =
        std::collections::HashMap::with_capacity_and_hasher(
            pushes.iter().map(|p| p.keys.len()).sum(),
            IdBuildHasher::default(),
        );
    for (table, push) in tables.iter().zip(pushes) {
        let dim = table.spec.dim as usize;
        let spec = table.spec.optimizer.with_lr_scale(push.lr_scale);
        let id = Arc::as_ptr(table) as usize;
        for (&key, grad) in push.keys.iter().zip(push.grads.chunks_exact(dim)) {
            let at = match slots.entry((id, key)) {
                Slot::Occupied(slot) => *slot.get(),
                Slot::Vacant(slot) => {
                    let at = copies.len();
                    match table.rows.get(&key) {
                        Some(row) => copies.extend_from_slice(&row),
                        None => {
                            copies.resize(at + table.row_len, 0.0);
                            table.fill_fresh_row(key, &mut copies[at..]);
                        }
                    }
                    *slot.insert(at)
                }
            };
            let row = &mut copies[at..at + table.row_len];
            optimizer::apply(&spec, row, grad);
            if let Some(i) = row.iter().position(|v| !v.is_finite()) {
                let part = if i < dim {
                    "weights"
                } else {
                    "optimizer state"
                };
                return Err(PsError::invalid(format!(
                    "the update of key {key} of table '{}' would make its {part} non-finite ({}); nothing was applied",
                    table.spec.name, row[i]
                )));
            }
        }
    }
    Ok(())
}

/// One push of [`Shard::push_many`].
#[derive(Debug, Clone, Copy)]
pub struct Push<'a> {
    /// The table.
    pub table: &'a str,
    /// Rows, in order.
    pub keys: &'a [u64],
    /// `keys.len() * dim` gradients.
    pub grads: &'a [f32],
    /// Learning-rate factor.
    pub lr_scale: f32,
}

/// What [`Shard::push_many_once`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PushOutcome {
    /// Applied: rows per push.
    Applied(Vec<usize>),
    /// The `(writer, seq)` was applied before, by write `replica_seq`;
    /// nothing was applied now.
    Duplicate {
        /// Replication number of the write that applied it.
        replica_seq: u64,
    },
}

/// All tables of one shard. Cheap to share: wrap it in an `Arc`.
#[derive(Debug)]
pub struct Shard {
    owner: Owner,
    tables: DashMap<String, Arc<Table>>,
    /// The `(writer, seq)` pairs of the pushes applied.
    pub applied: crate::dedup::Applied,
    /// Request counters, updated by the service layer.
    pub counters: RequestCounters,
    /// Per-RPC outcomes and latencies, updated by the service layer.
    pub rpc_metrics: crate::metrics::RpcMetrics,
    /// Most rows a sparse table may hold on this shard (`usize::MAX`: no cap).
    row_cap: std::sync::atomic::AtomicUsize,
}

impl Shard {
    /// An empty shard `shard_id` of `num_shards`.
    pub fn new(shard_id: u32, num_shards: u32) -> Self {
        Shard {
            owner: Owner {
                shard_id,
                router: ShardRouter::new(num_shards),
            },
            tables: DashMap::new(),
            applied: crate::dedup::Applied::default(),
            counters: RequestCounters::default(),
            rpc_metrics: crate::metrics::RpcMetrics::default(),
            row_cap: std::sync::atomic::AtomicUsize::new(usize::MAX),
        }
    }

    /// Caps the rows each sparse table may hold on this shard (`None`: no
    /// cap). A pull, push or assign that would create rows past the cap is
    /// refused with RESOURCE_EXHAUSTED and creates nothing, so a flood of
    /// fresh ids cannot exhaust the server's memory. Concurrent requests
    /// are checked independently: a table can pass the cap by at most the
    /// new rows of requests in flight together.
    pub fn set_row_cap(&self, cap: Option<usize>) {
        self.row_cap
            .store(cap.unwrap_or(usize::MAX), Ordering::Relaxed);
    }

    /// Refuses a request that would grow `table` past the row cap.
    fn check_room(&self, table: &Table, keys: &[u64]) -> Result<(), PsError> {
        let cap = self.row_cap.load(Ordering::Relaxed);
        if cap == usize::MAX || table.spec.kind != TableKind::Sparse {
            return Ok(());
        }
        let fresh: std::collections::HashSet<u64> = keys
            .iter()
            .copied()
            .filter(|k| !table.rows.contains_key(k))
            .collect();
        let held = table.rows.len();
        if held + fresh.len() > cap {
            return Err(PsError::ResourceExhausted(format!(
                "table '{}' holds {held} rows on this shard; {} new rows would pass its cap of {cap} (--max-rows-per-table)",
                table.spec.name,
                fresh.len()
            )));
        }
        Ok(())
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
    /// field if a different one did.
    pub fn create_table(&self, spec: TableSpec) -> Result<bool, PsError> {
        spec.validate()?;
        match self.tables.entry(spec.name.clone()) {
            Entry::Occupied(existing) => match existing.get().spec.first_difference(&spec) {
                None => Ok(false),
                Some((field, existing, requested)) => Err(PsError::TableConflict {
                    table: spec.name,
                    field,
                    existing,
                    requested,
                }),
            },
            Entry::Vacant(slot) => {
                slot.insert(Arc::new(Table::new(spec, &self.owner)));
                Ok(true)
            }
        }
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
        if let TableKind::Dense { rows, .. } = table.spec.kind
            && let Some(&bad) = keys.iter().find(|&&k| k >= rows)
        {
            return Err(PsError::invalid(format!(
                "row {bad} is out of range for dense table '{}' with {rows} rows",
                table.spec.name
            )));
        }
        if let Some(&bad) = keys.iter().find(|&&k| !self.owner.owns(table.placement, k)) {
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
        let start = out.len();
        self.pull_each(table, keys, |row| {
            if out.len() == start {
                out.reserve(keys.len() * row.len());
            }
            out.extend_from_slice(row)
        })
    }

    /// Hands the weights of `keys` (in order) to `each`; creates missing
    /// sparse rows. Returns the table's dim. Lets a caller encode rows
    /// straight from the table.
    pub fn pull_each(
        &self,
        table: &str,
        keys: &[u64],
        mut each: impl FnMut(&[f32]),
    ) -> Result<u32, PsError> {
        let table = self.table(table)?;
        self.check_keys(&table, keys)?;
        self.check_room(&table, keys)?;
        let dim = table.spec.dim as usize;
        for &key in keys {
            // Fast path under a read lock; create under the write lock only when missing.
            if let Some(row) = table.rows.get(&key) {
                each(&row[..dim]);
                continue;
            }
            let row = table
                .rows
                .entry(key)
                .or_insert_with(|| table.fresh_row(key));
            each(&row[..dim]);
        }
        Ok(table.spec.dim)
    }

    /// Applies `grads` (`keys.len() * dim` values, key after key) with the
    /// table's optimizer. Nothing is applied unless the whole request is valid.
    pub fn push(&self, table: &str, keys: &[u64], grads: &[f32]) -> Result<usize, PsError> {
        self.push_scaled(table, keys, grads, 1.0)
    }

    /// Sets the weights of `keys` (`values` holds `keys.len() * dim`), with
    /// optimizer state reset as for a fresh row. Nothing changes unless the
    /// whole request is valid.
    pub fn assign(&self, table: &str, keys: &[u64], values: &[f32]) -> Result<usize, PsError> {
        let table = self.table(table)?;
        let dim = table.spec.dim as usize;
        if values.len() != keys.len() * dim {
            return Err(PsError::invalid(format!(
                "table '{}' has dim {dim}: {} keys need {} values, got {}",
                table.spec.name,
                keys.len(),
                keys.len() * dim,
                values.len()
            )));
        }
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(PsError::invalid(format!(
                "value for key {} of table '{}' is not finite ({}); nothing was assigned",
                keys[i / dim],
                table.spec.name,
                values[i]
            )));
        }
        self.check_keys(&table, keys)?;
        self.check_room(&table, keys)?;
        for (&key, weights) in keys.iter().zip(values.chunks_exact(dim)) {
            let mut row = vec![0f32; table.row_len].into_boxed_slice();
            let (w, state) = row.split_at_mut(dim);
            w.copy_from_slice(weights);
            optimizer::init_state(&table.spec.optimizer, w, state);
            table.rows.insert(key, row);
        }
        Ok(keys.len())
    }

    /// [`Shard::push`] with the optimizer's learning rate multiplied by
    /// `lr_scale` (the worker's schedule).
    pub fn push_scaled(
        &self,
        table: &str,
        keys: &[u64],
        grads: &[f32],
        lr_scale: f32,
    ) -> Result<usize, PsError> {
        let push = Push {
            table,
            keys,
            grads,
            lr_scale,
        };
        Ok(self.push_many(&[push])?.iter().sum())
    }

    /// Several pushes (to any tables) applied as one: every push is
    /// validated before any is applied, so a refused one applies nothing.
    /// Returns the rows applied per push.
    pub fn push_many(&self, pushes: &[Push<'_>]) -> Result<Vec<usize>, PsError> {
        match self.push_many_once(0, 0, 0, pushes)? {
            PushOutcome::Applied(rows) => Ok(rows),
            // Writer 0 is never deduplicated.
            PushOutcome::Duplicate { .. } => Ok(vec![0; pushes.len()]),
        }
    }

    /// [`Shard::push_many`] applied at most once per `(writer, seq)`
    /// (`writer = 0`: always applied): every push is validated, then the
    /// pair is claimed, recorded as applied by write `replica_seq`, and the
    /// pushes are applied. A refused call claims nothing.
    pub fn push_many_once(
        &self,
        writer: u64,
        seq: u64,
        replica_seq: u64,
        pushes: &[Push<'_>],
    ) -> Result<PushOutcome, PsError> {
        let tables = pushes
            .iter()
            .map(|p| self.check_push(p.table, p.keys, p.grads, p.lr_scale))
            .collect::<Result<Vec<_>, _>>()?;
        check_stays_finite(&tables, pushes)?;
        match self.applied.claim(writer, seq, replica_seq) {
            Claim::New => {}
            Claim::Repeat(replica_seq) => {
                RequestCounters::add(&self.counters.duplicate_pushes, 1);
                return Ok(PushOutcome::Duplicate { replica_seq });
            }
            Claim::Forgotten { floor } => {
                return Err(PsError::FailedPrecondition(format!(
                    "push (writer {writer:x}, seq {seq}) is older than the last {} calls this shard remembers of its writer (seq <= {floor}): it cannot tell whether it was applied, so it applies nothing",
                    crate::dedup::WINDOW
                )));
            }
        }
        RequestCounters::add(&self.counters.updates_applied, 1);
        Ok(PushOutcome::Applied(
            tables
                .iter()
                .zip(pushes)
                .map(|(table, p)| self.apply_push(table, p.keys, p.grads, p.lr_scale))
                .collect(),
        ))
    }

    /// The table a push goes to, if the push is valid in every respect.
    fn check_push(
        &self,
        table: &str,
        keys: &[u64],
        grads: &[f32],
        lr_scale: f32,
    ) -> Result<Arc<Table>, PsError> {
        if !(lr_scale.is_finite() && lr_scale >= 0.0) {
            return Err(PsError::invalid(format!(
                "lr_scale must be finite and >= 0, got {lr_scale}"
            )));
        }
        let table = self.table(table)?;
        if lr_scale == 0.0 && matches!(table.spec.optimizer, OptimizerSpec::Ftrl { .. }) {
            return Err(PsError::invalid(format!(
                "table '{}' uses FTRL, whose lr_scale multiplies alpha, a divisor: it must be > 0",
                table.spec.name
            )));
        }
        let dim = table.spec.dim as usize;
        if grads.len() != keys.len() * dim {
            return Err(PsError::invalid(format!(
                "table '{}' has dim {dim}: {} keys need {} gradient values, got {}",
                table.spec.name,
                keys.len(),
                keys.len() * dim,
                grads.len()
            )));
        }
        if let Some(i) = grads.iter().position(|g| !g.is_finite()) {
            return Err(PsError::invalid(format!(
                "gradient for key {} of table '{}' is not finite ({}); nothing was applied",
                keys[i / dim],
                table.spec.name,
                grads[i]
            )));
        }
        self.check_keys(&table, keys)?;
        self.check_room(&table, keys)?;
        Ok(table)
    }

    /// Applies a checked push. Each row is updated under its lock and kept
    /// only if it stays finite: [`check_stays_finite`] refused the pushes
    /// that would break that, so a row is skipped (and counted in
    /// `nonfinite_skipped`) only if a concurrent push moved it in between.
    fn apply_push(&self, table: &Table, keys: &[u64], grads: &[f32], lr_scale: f32) -> usize {
        let dim = table.spec.dim as usize;
        let spec = table.spec.optimizer.with_lr_scale(lr_scale);
        let mut before = vec![0f32; table.row_len];
        for (&key, grad) in keys.iter().zip(grads.chunks_exact(dim)) {
            let mut row = table
                .rows
                .entry(key)
                .or_insert_with(|| table.fresh_row(key));
            before.copy_from_slice(&row);
            optimizer::apply(&spec, &mut row, grad);
            if !row.iter().all(|v| v.is_finite()) {
                row.copy_from_slice(&before);
                RequestCounters::add(&self.counters.nonfinite_skipped, 1);
            }
        }
        keys.len()
    }

    /// A copy of every table (rows sorted by key), for checkpoints.
    pub fn snapshot(&self) -> ShardSnapshot {
        let mut names: Vec<String> = self.tables.iter().map(|t| t.key().clone()).collect();
        names.sort();
        let tables = names
            .into_iter()
            .filter_map(|name| self.table(&name).ok())
            .map(|table| {
                // One pass keeps keys and rows aligned even while pushes create rows.
                let (mut unsorted_keys, mut unsorted) = (Vec::new(), Vec::new());
                for row in table.rows.iter() {
                    unsorted_keys.push(*row.key());
                    unsorted.extend_from_slice(row.value());
                }
                let mut order: Vec<usize> = (0..unsorted_keys.len()).collect();
                order.sort_unstable_by_key(|&i| unsorted_keys[i]);
                let keys: Vec<u64> = order.iter().map(|&i| unsorted_keys[i]).collect();
                let mut values = Vec::with_capacity(unsorted.len());
                for &i in &order {
                    values.extend_from_slice(&unsorted[i * table.row_len..(i + 1) * table.row_len]);
                }
                TableSnapshot {
                    spec: table.spec.clone(),
                    row_len: table.row_len as u32,
                    keys,
                    values,
                }
            })
            .collect();
        ShardSnapshot {
            shard_id: self.shard_id(),
            num_shards: self.num_shards(),
            tables,
        }
    }

    /// A shard holding exactly the snapshot's tables and rows. Refuses a
    /// snapshot whose specs, row layout or keys do not fit this shard.
    pub fn restore(snapshot: ShardSnapshot) -> Result<Shard, PsError> {
        if snapshot.shard_id >= snapshot.num_shards.max(1) {
            return Err(PsError::invalid(format!(
                "snapshot of shard {} of {} is inconsistent",
                snapshot.shard_id, snapshot.num_shards
            )));
        }
        let shard = Shard::new(snapshot.shard_id, snapshot.num_shards);
        shard.load(snapshot)?;
        Ok(shard)
    }

    /// Replaces every table of this shard with the snapshot's (a backup
    /// catching up). The whole snapshot is checked first: a refused one
    /// changes nothing.
    pub fn load(&self, snapshot: ShardSnapshot) -> Result<(), PsError> {
        if (snapshot.shard_id, snapshot.num_shards) != (self.shard_id(), self.num_shards()) {
            return Err(PsError::invalid(format!(
                "snapshot of shard {} of {} does not fit shard {} of {}",
                snapshot.shard_id,
                snapshot.num_shards,
                self.shard_id(),
                self.num_shards()
            )));
        }
        let mut tables = Vec::with_capacity(snapshot.tables.len());
        for t in snapshot.tables {
            t.spec.validate()?;
            let table = Table::new_empty(t.spec);
            let name = table.spec.name.clone();
            if t.row_len as usize != table.row_len || t.values.len() != t.keys.len() * table.row_len
            {
                return Err(PsError::invalid(format!(
                    "table '{name}': snapshot rows of {} floats do not match the spec's {} (or are truncated)",
                    t.row_len, table.row_len
                )));
            }
            self.check_keys(&table, &t.keys)?;
            if let Some(i) = t.values.iter().position(|v| !v.is_finite()) {
                return Err(PsError::invalid(format!(
                    "table '{name}': the snapshot's row of key {} holds a non-finite value ({}); rows are always finite",
                    t.keys[i / table.row_len],
                    t.values[i]
                )));
            }
            for (&key, row) in t.keys.iter().zip(t.values.chunks_exact(table.row_len)) {
                table.rows.insert(key, row.into());
            }
            tables.push((name, Arc::new(table)));
        }
        self.tables.clear();
        for (name, table) in tables {
            self.tables.insert(name, table);
        }
        Ok(())
    }

    /// Rows and bytes of every table, sorted by name.
    pub fn table_stats(&self) -> Vec<TableStats> {
        let mut stats: Vec<TableStats> = self
            .tables
            .iter()
            .map(|t| TableStats {
                spec: t.spec.clone(),
                rows: t.len() as u64,
                bytes: t.bytes(),
            })
            .collect();
        stats.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
        stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_cap_refuses_requests_that_would_create_rows_past_it() {
        let shard = Shard::new(0, 1);
        shard
            .create_table(TableSpec {
                name: "emb".into(),
                kind: TableKind::Sparse,
                dim: 1,
                initializer: InitializerSpec::Zeros,
                optimizer: OptimizerSpec::Sgd { lr: 1.0 },
                seed: 0,
            })
            .unwrap();
        shard.set_row_cap(Some(3));
        let mut out = Vec::new();
        shard.pull("emb", &[1, 2, 2], &mut out).unwrap();
        let err = shard.pull("emb", &[3, 4], &mut out).unwrap_err();
        assert!(matches!(err, PsError::ResourceExhausted(_)), "{err}");
        assert!(err.to_string().contains("cap of 3"), "{err}");
        assert_eq!(shard.table("emb").unwrap().len(), 2, "nothing created");
        shard.pull("emb", &[1, 3], &mut out).unwrap();
        assert!(
            shard.push("emb", &[9], &[1.0]).is_err(),
            "a push creates rows too"
        );
        assert!(
            shard.assign("emb", &[9], &[1.0]).is_err(),
            "and so does assign"
        );
        assert_eq!(
            shard.push("emb", &[1, 2, 3], &[1.0; 3]),
            Ok(3),
            "existing rows"
        );
        shard.set_row_cap(None);
        shard.pull("emb", &[4, 5], &mut out).unwrap();
    }
    use ps_common::{InitializerSpec, OptimizerSpec};

    fn spec(name: &str, kind: TableKind, dim: u32) -> TableSpec {
        TableSpec {
            name: name.into(),
            kind,
            dim,
            initializer: InitializerSpec::Normal {
                mean: 0.0,
                std: 1.0,
            },
            optimizer: OptimizerSpec::Sgd { lr: 1.0 },
            seed: 9,
        }
    }

    #[test]
    fn assign_sets_weights_with_fresh_state_all_or_nothing() {
        let shard = Shard::new(0, 1);
        let mut adagrad = spec("w", TableKind::Sparse, 2);
        adagrad.optimizer = OptimizerSpec::Adagrad {
            lr: 0.1,
            initial_accumulator: 0.5,
            eps: 1e-8,
        };
        shard.create_table(adagrad).unwrap();
        shard.push("w", &[3], &[1.0, 1.0]).unwrap();
        assert_eq!(shard.assign("w", &[3, 4], &[1.0, 2.0, 3.0, 4.0]), Ok(2));
        let mut out = Vec::new();
        shard.pull("w", &[3, 4], &mut out).unwrap();
        assert_eq!(out, [1.0, 2.0, 3.0, 4.0]);
        let row = shard.table("w").unwrap().rows.get(&3).unwrap().clone();
        assert_eq!(&row[2..], [0.5, 0.5], "optimizer state reset");
        let err = shard
            .assign("w", &[3, 5], &[9.0, 9.0, f32::NAN, 0.0])
            .unwrap_err();
        assert!(err.to_string().contains("not finite"), "{err}");
        out.clear();
        shard.pull("w", &[3], &mut out).unwrap();
        assert_eq!(out, [1.0, 2.0], "nothing assigned from a refused request");
        assert!(shard.assign("w", &[3], &[1.0]).is_err(), "wrong dim");
    }

    #[test]
    fn a_push_s_lr_scale_multiplies_the_learning_rate() {
        let shard = Shard::new(0, 1);
        shard.create_table(spec("w", TableKind::Sparse, 1)).unwrap();
        let pull = || {
            let mut out = Vec::new();
            shard.pull("w", &[7], &mut out).unwrap();
            out
        };
        let before = pull();
        shard.push_scaled("w", &[7], &[2.0], 0.25).unwrap();
        let after = pull();
        // SGD with lr 1 scaled by 0.25: w -= 0.25 * 2.
        assert!((before[0] - after[0] - 0.5).abs() < 1e-6);
        for bad in [-1.0, f32::NAN, f32::INFINITY] {
            let err = shard.push_scaled("w", &[7], &[2.0], bad).unwrap_err();
            assert!(err.to_string().contains("lr_scale"), "{err}");
        }
        assert_eq!(pull(), after, "refused pushes change nothing");
    }

    #[test]
    fn create_table_is_idempotent_and_names_a_conflicting_field() {
        let shard = Shard::new(0, 1);
        assert_eq!(
            shard.create_table(spec("emb", TableKind::Sparse, 4)),
            Ok(true)
        );
        assert_eq!(
            shard.create_table(spec("emb", TableKind::Sparse, 4)),
            Ok(false)
        );
        let err = shard
            .create_table(spec("emb", TableKind::Sparse, 8))
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("different dim: existing 4, requested 8"),
            "{err}"
        );
    }

    #[test]
    fn a_sparse_row_is_the_same_on_any_shard_that_creates_it() {
        let (a, b) = (Shard::new(0, 1), Shard::new(0, 1));
        for s in [&a, &b] {
            s.create_table(spec("emb", TableKind::Sparse, 4)).unwrap();
        }
        let (mut ra, mut rb) = (vec![], vec![]);
        a.pull("emb", &[17, 4], &mut ra).unwrap();
        b.pull("emb", &[4, 17], &mut rb).unwrap();
        assert_eq!(ra[..4], rb[4..]);
        assert_eq!(ra[4..], rb[..4]);
        assert_eq!(a.table("emb").unwrap().len(), 2);
    }

    #[test]
    fn a_push_applies_every_occurrence_of_a_key() {
        let shard = Shard::new(0, 1);
        shard
            .create_table(spec("emb", TableKind::Sparse, 2))
            .unwrap();
        let mut before = vec![];
        shard.pull("emb", &[5], &mut before).unwrap();
        shard.push("emb", &[5, 5], &[1.0, 0.0, 0.5, 2.0]).unwrap();
        let mut after = vec![];
        shard.pull("emb", &[5], &mut after).unwrap();
        assert!((after[0] - (before[0] - 1.5)).abs() < 1e-6);
        assert!((after[1] - (before[1] - 2.0)).abs() < 1e-6);
    }

    #[test]
    fn an_invalid_push_changes_nothing() {
        let shard = Shard::new(0, 1);
        shard
            .create_table(spec("emb", TableKind::Sparse, 2))
            .unwrap();
        let mut before = vec![];
        shard.pull("emb", &[1, 2], &mut before).unwrap();

        let nan = shard
            .push("emb", &[1, 2], &[1.0, 1.0, f32::NAN, 1.0])
            .unwrap_err();
        assert!(nan.to_string().contains("not finite"), "{nan}");
        let inf = shard
            .push("emb", &[1, 2], &[1.0, 1.0, 1.0, f32::INFINITY])
            .unwrap_err();
        assert_eq!(inf.code(), tonic::Code::InvalidArgument);
        let short = shard.push("emb", &[1, 2], &[1.0, 1.0, 1.0]).unwrap_err();
        assert!(
            short.to_string().contains("need 4 gradient values, got 3"),
            "{short}"
        );
        let unknown = shard.push("nope", &[1], &[1.0, 1.0]).unwrap_err();
        assert_eq!(unknown, PsError::UnknownTable("nope".into()));

        let mut after = vec![];
        shard.pull("emb", &[1, 2], &mut after).unwrap();
        assert_eq!(before, after);
        assert_eq!(
            shard.table("emb").unwrap().len(),
            2,
            "no row was created either"
        );
    }

    #[test]
    fn an_update_that_would_make_a_row_non_finite_is_refused_whole() {
        let optimizers = [
            OptimizerSpec::Sgd { lr: 1.0 },
            OptimizerSpec::Adagrad {
                lr: 0.1,
                initial_accumulator: 0.1,
                eps: 1e-8,
            },
            OptimizerSpec::Adam {
                lr: 0.1,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
            },
            OptimizerSpec::Ftrl {
                alpha: 0.1,
                beta: 1.0,
                l1: 0.0,
                l2: 0.0,
            },
        ];
        // (keys, gradients, refused by [SGD, Adagrad, Adam, FTRL])
        let hostile: [(&[u64], &[f32], [bool; 4]); 3] = [
            // A huge gradient: g^2 overflows the accumulators; SGD's weight
            // stays finite (|w| + 3e38 < f32::MAX).
            (&[1, 2], &[0.5, 3e38], [false, true, true, true]),
            // g^2 = 1e40 overflows; Adam computes (1 - beta2) * g * g = 1e37.
            (&[3], &[1e20], [false, true, false, true]),
            // A finite gradient repeated until even SGD's weight overflows.
            (&[4, 4, 4], &[-3e38, -3e38, -3e38], [true, true, true, true]),
        ];
        for (o, optimizer) in optimizers.into_iter().enumerate() {
            let shard = Shard::new(0, 1);
            let mut s = spec("emb", TableKind::Sparse, 1);
            s.optimizer = optimizer;
            shard.create_table(s).unwrap();
            shard.push("emb", &[1, 2], &[0.5, -0.5]).unwrap();
            for (keys, grads, refusals) in hostile {
                let refused = refusals[o];
                let before = shard.snapshot();
                match shard.push("emb", keys, grads) {
                    Err(err) => {
                        assert!(refused, "{optimizer:?} {grads:?}: {err}");
                        assert_eq!(err.code(), tonic::Code::InvalidArgument);
                        assert!(err.to_string().contains("non-finite"), "{err}");
                        assert_eq!(shard.snapshot(), before, "{optimizer:?}: refused whole");
                    }
                    Ok(_) => assert!(!refused, "{optimizer:?} accepted {grads:?}"),
                }
                let after = shard.snapshot();
                assert!(
                    after.tables[0].values.iter().all(|v| v.is_finite()),
                    "{optimizer:?}: a row went non-finite"
                );
            }
        }
        let ftrl = Shard::new(0, 1);
        let mut s = spec("f", TableKind::Sparse, 1);
        s.optimizer = optimizers[3];
        ftrl.create_table(s).unwrap();
        let err = ftrl.push_scaled("f", &[1], &[1.0], 0.0).unwrap_err();
        assert!(err.to_string().contains("alpha"), "{err}");
    }

    #[test]
    fn a_dense_table_holds_exactly_the_rows_this_shard_owns() {
        let kind = TableKind::Dense {
            rows: 100,
            block_rows: 8,
        };
        let shards: Vec<Shard> = (0..3).map(|i| Shard::new(i, 3)).collect();
        for s in &shards {
            s.create_table(spec("mlp", kind, 3)).unwrap();
        }
        let total: usize = shards.iter().map(|s| s.table("mlp").unwrap().len()).sum();
        assert_eq!(total, 100);
        let router = ShardRouter::new(3);
        let placement = Placement::dense("mlp", 8);
        let owner = router.shard_of(placement, 42) as usize;
        let mut out = vec![];
        shards[owner].pull("mlp", &[42], &mut out).unwrap();
        let other = (owner + 1) % 3;
        let err = shards[other].pull("mlp", &[42], &mut out).unwrap_err();
        assert!(err.to_string().contains("belongs to shard"), "{err}");
        let err = shards[owner].pull("mlp", &[100], &mut out).unwrap_err();
        assert!(err.to_string().contains("out of range"), "{err}");
    }

    #[test]
    fn concurrent_pushes_never_tear_a_row() {
        // Every push adds the same gradient to all coordinates of one row, so the
        // row must stay uniform at every moment and end at exactly -total.
        let shard = Arc::new(Shard::new(0, 1));
        let mut s = spec("emb", TableKind::Sparse, 64);
        s.initializer = InitializerSpec::Zeros;
        shard.create_table(s).unwrap();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let shard = Arc::clone(&shard);
                std::thread::spawn(move || {
                    let grad = vec![1.0f32; 64];
                    let mut seen = vec![];
                    for i in 0..2000 {
                        if (i + t) % 2 == 0 {
                            shard.push("emb", &[7], &grad).unwrap();
                        } else {
                            seen.clear();
                            shard.pull("emb", &[7], &mut seen).unwrap();
                            assert!(seen.iter().all(|&x| x == seen[0]), "torn row: {seen:?}");
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let mut row = vec![];
        shard.pull("emb", &[7], &mut row).unwrap();
        assert!(row.iter().all(|&x| x == -4000.0), "{:?}", &row[..4]);
    }
}
