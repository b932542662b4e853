//! What changed in a shard since its last checkpoint, as plain data: the
//! deltas of incremental checkpoints, taken from a shard and applied to a
//! base snapshot.
//!
//! Once an incremental chain has started, a sparse table records which rows
//! changed (a bit per row) and which keys were removed (before, writes pay
//! nothing for it); taking a delta or a base clears both, one segment at a time under its write lock, so a
//! write lands either in what is taken now or in the next delta. Dense
//! tables keep no record: every delta carries them whole (they are the
//! small tables of a model). A delta carries each table's admission counts
//! whole, as its nonzero counters (the sketch of a table that sees few new
//! ids is mostly zeros).

use std::collections::HashSet;

use ps_common::PsError;
use serde::{Deserialize, Serialize};

use super::Shard;
use super::snapshot::{ShardSnapshot, TableSnapshot};

/// The changes of every table of a shard since the last checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardDelta {
    /// The shard that wrote it.
    pub shard_id: u32,
    /// Shards in the job that wrote it.
    pub num_shards: u32,
    /// Every table the shard holds now, by name order.
    pub tables: Vec<TableDelta>,
}

/// One table's changes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TableDelta {
    /// The table as [`TableSnapshot`] carries it: its spec and its changed
    /// rows (keys ascending); its admission counts are in `admission`.
    pub rows: TableSnapshot,
    /// Keys removed (evicted) since the last checkpoint, before `rows` are
    /// applied (a key removed and created again is in both).
    pub removed: Vec<u64>,
    /// The admission sketch's size and its nonzero counters (position,
    /// value); `(0, [])` for a table without one.
    pub admission: (u32, Vec<(u32, u8)>),
}

/// A sketch's counters as their count and the nonzero ones.
fn nonzero(counters: Vec<u8>) -> (u32, Vec<(u32, u8)>) {
    let len = counters.len() as u32;
    let set = (counters.into_iter().enumerate())
        .filter(|&(_, c)| c != 0)
        .map(|(i, c)| (i as u32, c))
        .collect();
    (len, set)
}

/// The counters [`nonzero`] described, or `None` if a position is past their count.
fn counters((len, set): (u32, Vec<(u32, u8)>)) -> Option<Vec<u8>> {
    let mut counters = vec![0u8; len as usize];
    for (i, c) in set {
        *counters.get_mut(i as usize)? = c;
    }
    Some(counters)
}

impl Shard {
    /// Every table whole (rows sorted by key), as [`Shard::snapshot`],
    /// clearing the records of what changed: the base of an incremental
    /// chain. With `chain`, changes are recorded from now on, for the
    /// deltas that follow.
    pub fn take_base(&self, chain: bool) -> Result<ShardSnapshot, PsError> {
        Ok(ShardSnapshot {
            shard_id: self.shard_id(),
            num_shards: self.num_shards(),
            tables: (self.take(false, chain)?.into_iter())
                .map(|(rows, _)| rows)
                .collect(),
        })
    }

    /// The rows that changed and the keys removed since the last base or
    /// delta was taken, clearing those records. A delta that fails (the
    /// disk tier could not be read) has cleared some records: the chain
    /// must start again from a base.
    pub fn take_delta(&self) -> Result<ShardDelta, PsError> {
        Ok(ShardDelta {
            shard_id: self.shard_id(),
            num_shards: self.num_shards(),
            tables: (self.take(true, true)?.into_iter())
                .map(|(mut rows, removed)| TableDelta {
                    admission: nonzero(std::mem::take(&mut rows.admission)),
                    rows,
                    removed,
                })
                .collect(),
        })
    }

    /// Every table's changed rows (`only_changed` false: all its rows) and
    /// removed keys, clearing those records; with `record_changes`,
    /// changes are recorded from now on.
    fn take(
        &self,
        only_changed: bool,
        record_changes: bool,
    ) -> Result<Vec<(TableSnapshot, Vec<u64>)>, PsError> {
        (self.tables_by_name().iter())
            .map(|table| {
                // Recording starts before the walk, so a write to a segment
                // already walked is in the next delta.
                if record_changes {
                    table.record_changes();
                }
                let mut removed = Vec::new();
                let rows = TableSnapshot::of(table, |each| {
                    table.take_changes(only_changed, each, |key| removed.push(key))
                })?;
                Ok((rows, removed))
            })
            .collect()
    }
}

impl ShardSnapshot {
    /// Applies `delta` (the next of this snapshot's chain): per table, its
    /// removed keys go, then its rows replace or join the snapshot's; a
    /// table new since the base joins whole. Refuses a delta of another
    /// shard, or one whose table differs from the base's (its spec or row
    /// layout), changing nothing.
    pub fn apply(&mut self, delta: ShardDelta) -> Result<(), PsError> {
        if (delta.shard_id, delta.num_shards) != (self.shard_id, self.num_shards) {
            return Err(PsError::invalid(format!(
                "a delta of shard {} of {} does not apply to shard {} of {}",
                delta.shard_id, delta.num_shards, self.shard_id, self.num_shards
            )));
        }
        let mut admissions = Vec::with_capacity(delta.tables.len());
        for t in &delta.tables {
            let d = &t.rows;
            if d.values.len() != d.keys.len() * d.row_len as usize {
                return Err(PsError::invalid(format!(
                    "table '{}': the delta's rows are truncated",
                    d.spec.name
                )));
            }
            admissions.push(counters(t.admission.clone()).ok_or_else(|| {
                PsError::invalid(format!(
                    "table '{}': the delta's admission counters are out of range",
                    d.spec.name
                ))
            })?);
            if let Some(base) = self.tables.iter().find(|b| b.spec.name == d.spec.name)
                && let Some((field, was, now)) = base.spec.first_difference(&d.spec).or_else(|| {
                    (base.row_len != d.row_len)
                        .then(|| ("row_len", base.row_len.to_string(), d.row_len.to_string()))
                })
            {
                return Err(PsError::invalid(format!(
                    "table '{}' changed between the base and a delta ({field}: {was} -> {now})",
                    d.spec.name
                )));
            }
        }
        for (mut t, admission) in delta.tables.into_iter().zip(admissions) {
            t.rows.admission = admission;
            match self
                .tables
                .iter_mut()
                .find(|b| b.spec.name == t.rows.spec.name)
            {
                Some(base) => merge(base, t),
                None => self.tables.push(t.rows),
            }
        }
        self.tables.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
        Ok(())
    }
}

/// `base` with `delta`'s removed keys gone and its rows in place, keys
/// ascending.
fn merge(base: &mut TableSnapshot, delta: TableDelta) {
    let row_len = base.row_len as usize;
    let removed: HashSet<u64> = delta.removed.into_iter().collect();
    let (old_keys, old_values) = (
        std::mem::take(&mut base.keys),
        std::mem::take(&mut base.values),
    );
    let TableSnapshot {
        keys: new_keys,
        values: new_values,
        admission,
        ..
    } = delta.rows;
    let (mut keys, mut values) = (Vec::with_capacity(old_keys.len()), Vec::new());
    values.reserve(old_values.len());
    let (mut i, mut j) = (0, 0);
    while i < old_keys.len() || j < new_keys.len() {
        let take_new = j < new_keys.len() && (i == old_keys.len() || new_keys[j] <= old_keys[i]);
        if take_new {
            if i < old_keys.len() && old_keys[i] == new_keys[j] {
                i += 1;
            }
            keys.push(new_keys[j]);
            values.extend_from_slice(&new_values[j * row_len..(j + 1) * row_len]);
            j += 1;
        } else {
            if !removed.contains(&old_keys[i]) {
                keys.push(old_keys[i]);
                values.extend_from_slice(&old_values[i * row_len..(i + 1) * row_len]);
            }
            i += 1;
        }
    }
    base.keys = keys;
    base.values = values;
    base.admission = admission;
}
