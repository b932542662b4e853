//! A shard's tables as plain data (bincode-serializable), for checkpoints
//! and for a joining backup: taking one from a shard, and loading one into
//! a shard whole or not at all.

use std::sync::Arc;

use ps_common::{PsError, TableSpec};
use serde::{Deserialize, Serialize};

use super::disk::DiskError;
use super::{MAX_TABLES, Shard, Table};
use crate::budget::LOW_WATER;

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
    /// Row keys, ascending.
    pub keys: Vec<u64>,
    /// `keys.len() * row_len` floats, row after row.
    pub values: Vec<f32>,
    /// The admission sketch's counters (empty when the table has none), so
    /// that a restored shard or a joining backup admits what the shard it
    /// copies would have.
    pub admission: Vec<u8>,
}

/// [`ShardSnapshot`] as checkpoint format 1 wrote it (before admission).
#[derive(Debug, Deserialize)]
pub struct ShardSnapshotV1 {
    shard_id: u32,
    num_shards: u32,
    tables: Vec<TableSnapshotV1>,
}

#[derive(Debug, Deserialize)]
struct TableSnapshotV1 {
    #[serde(with = "spec_as_protobuf")]
    spec: TableSpec,
    row_len: u32,
    keys: Vec<u64>,
    values: Vec<f32>,
}

impl From<ShardSnapshotV1> for ShardSnapshot {
    fn from(v1: ShardSnapshotV1) -> Self {
        ShardSnapshot {
            shard_id: v1.shard_id,
            num_shards: v1.num_shards,
            tables: (v1.tables.into_iter())
                .map(|t| TableSnapshot {
                    spec: t.spec,
                    row_len: t.row_len,
                    keys: t.keys,
                    values: t.values,
                    admission: Vec::new(),
                })
                .collect(),
        }
    }
}

impl TableSnapshot {
    /// `table`'s spec, its admission counters and the rows `rows` hands to
    /// its argument, sorted by key (one pass keeps keys and rows aligned
    /// even while pushes create rows).
    pub(super) fn of(
        table: &Table,
        rows: impl FnOnce(&mut dyn FnMut(u64, &[f32])) -> Result<(), DiskError>,
    ) -> Result<Self, DiskError> {
        let (mut unsorted_keys, mut unsorted) = (Vec::new(), Vec::new());
        rows(&mut |key, row| {
            unsorted_keys.push(key);
            unsorted.extend_from_slice(row);
        })?;
        let mut order: Vec<usize> = (0..unsorted_keys.len()).collect();
        order.sort_unstable_by_key(|&i| unsorted_keys[i]);
        let keys: Vec<u64> = order.iter().map(|&i| unsorted_keys[i]).collect();
        let mut values = Vec::with_capacity(unsorted.len());
        for &i in &order {
            values.extend_from_slice(&unsorted[i * table.row_len..(i + 1) * table.row_len]);
        }
        Ok(TableSnapshot {
            spec: table.spec.clone(),
            row_len: table.row_len as u32,
            keys,
            values,
            admission: (table.admitter.as_ref()).map_or_else(Vec::new, |a| a.counters()),
        })
    }
}

impl Shard {
    /// A copy of every table (rows sorted by key, those on the disk tier
    /// too), for a joining backup; unlike a checkpoint's base
    /// ([`Shard::take_base`]) it leaves the records of what changed as they
    /// are.
    pub fn snapshot(&self) -> Result<ShardSnapshot, PsError> {
        Ok(ShardSnapshot {
            shard_id: self.shard_id(),
            num_shards: self.num_shards(),
            tables: (self.tables_by_name().iter())
                .map(|table| TableSnapshot::of(table, |each| table.for_each_row(each)))
                .collect::<Result<_, _>>()?,
        })
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

    /// Replaces every table of this shard with the snapshot's (a restore,
    /// or a backup catching up). The whole snapshot is checked first
    /// (specs, row layout, keys, finiteness, the memory budget): a refused
    /// one changes nothing. On a shard with a disk tier, the tables with
    /// eviction fill memory up to [`LOW_WATER`] of the budget and their
    /// other rows go to disk.
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
        if snapshot.tables.len() > MAX_TABLES {
            return Err(PsError::invalid(format!(
                "the snapshot holds {} tables, more than a shard's {MAX_TABLES}",
                snapshot.tables.len()
            )));
        }
        let _one_at_a_time = self.creating.lock().unwrap_or_else(|p| p.into_inner());
        let before: u64 = self.tables.iter().map(|t| t.memory_bytes()).sum();
        // With a disk tier, tables with eviction fill memory up to the
        // budget's low water, and their other rows go to disk.
        let limit = self.budget.limit();
        let room = match limit {
            u64::MAX => u64::MAX,
            limit => ((limit as f64 * LOW_WATER) as u64)
                .saturating_sub(self.budget.used().saturating_sub(before)),
        };
        let mut taken = 0u64;
        let mut tables = Vec::with_capacity(snapshot.tables.len());
        for t in snapshot.tables {
            t.spec.validate()?;
            let owned = Table::owned_blocks(&t.spec, &self.owner);
            let mut table = Table::empty(t.spec, self.disk.as_ref());
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
            if !(table.admitter.as_ref())
                .map_or(t.admission.is_empty(), |a| a.load_counters(&t.admission))
            {
                return Err(PsError::invalid(format!(
                    "table '{name}': the snapshot's {} admission counters do not fit the spec's sketch",
                    t.admission.len()
                )));
            }
            table.fill_dense(&owned);
            let in_memory = match table.has_disk() {
                true => {
                    let left = room.saturating_sub(taken + table.memory_bytes());
                    usize::try_from(left / table.sparse_row_bytes()).unwrap_or(usize::MAX)
                }
                false => usize::MAX,
            }
            .min(t.keys.len());
            for (&key, row) in
                (t.keys.iter().zip(t.values.chunks_exact(table.row_len))).take(in_memory)
            {
                table.set(key, row)?;
            }
            let row_len = table.row_len;
            for (keys, rows) in (t.keys[in_memory..].chunks(4096))
                .zip(t.values[in_memory * row_len..].chunks(4096 * row_len))
            {
                table.put_on_disk(keys, rows)?;
            }
            taken += table.memory_bytes();
            tables.push((name, Arc::new(table)));
        }
        let after: u64 = tables.iter().map(|(_, t)| t.memory_bytes()).sum();
        let growth = after.saturating_sub(before);
        let limit = self.budget.limit();
        if self.budget.used().saturating_add(growth) > limit {
            return Err(PsError::ResourceExhausted(format!(
                "the snapshot's tables need {after} bytes; with this shard's other holdings that passes its {limit} byte memory budget (--memory-budget)"
            )));
        }
        self.tables.clear();
        for (name, table) in tables {
            self.tables.insert(name, table);
        }
        self.budget.release(before);
        self.budget.charge(after);
        Ok(())
    }
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
