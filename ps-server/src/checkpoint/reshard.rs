//! Restoring a checkpoint written by another shard count: each new shard
//! reads every old shard's file (base and deltas) and keeps the rows it
//! owns under the new count, so a job can change its number of servers
//! between runs.
//!
//! Rows move by the same routing workers use ([`ShardRouter`]): a sparse
//! key by its jump hash, a dense row by its block. A table must have the
//! same spec in every file. Admission sketches merge by the larger counter
//! of each cell: a merged sketch never counts an id fewer times than the
//! shard that owned it did (count-min estimates only err upwards).

use std::collections::BTreeMap;
use std::path::Path;

use ps_common::{PsError, ShardRouter};

use super::{load, shard_count};
use crate::store::{ShardSnapshot, TableSnapshot};

/// Shard `shard_id` of `num_shards`' part of the checkpoint in `dir`,
/// whatever shard count wrote it. With the same count this is [`load`].
pub fn load_resharded(
    dir: &Path,
    shard_id: u32,
    num_shards: u32,
) -> Result<ShardSnapshot, PsError> {
    let old = shard_count(dir)?;
    if old == num_shards {
        return load(dir, shard_id, num_shards);
    }
    let router = ShardRouter::new(num_shards);
    let mut tables: BTreeMap<String, TableSnapshot> = BTreeMap::new();
    for j in 0..old {
        let part = load(dir, j, old)?;
        for table in part.tables {
            let placement = table.spec.placement();
            let row_len = table.row_len as usize;
            let merged = tables
                .entry(table.spec.name.clone())
                .or_insert_with(|| TableSnapshot {
                    spec: table.spec.clone(),
                    row_len: table.row_len,
                    keys: Vec::new(),
                    values: Vec::new(),
                    admission: Vec::new(),
                });
            if merged.spec != table.spec || merged.row_len != table.row_len {
                return Err(PsError::FailedPrecondition(format!(
                    "checkpoint {}: table '{}' has another spec in shard-{j}.bin than in an earlier file",
                    dir.display(),
                    table.spec.name
                )));
            }
            for (&key, row) in table.keys.iter().zip(table.values.chunks_exact(row_len)) {
                if router.shard_of(placement, key) == shard_id {
                    merged.keys.push(key);
                    merged.values.extend_from_slice(row);
                }
            }
            merge_counters(&mut merged.admission, &table.admission);
        }
    }
    let tables = tables
        .into_values()
        .map(|mut t| {
            sort_rows(&mut t);
            t
        })
        .collect();
    Ok(ShardSnapshot {
        shard_id,
        num_shards,
        tables,
    })
}

/// Keeps the larger of each pair of admission counters (`into` empty:
/// takes `from`; lengths that differ: the sketch starts over, empty).
fn merge_counters(into: &mut Vec<u8>, from: &[u8]) {
    if into.is_empty() {
        into.extend_from_slice(from);
    } else if into.len() == from.len() {
        for (a, &b) in into.iter_mut().zip(from) {
            *a = (*a).max(b);
        }
    } else {
        into.clear();
    }
}

/// Sorts a table's rows by key (snapshots keep them ascending).
fn sort_rows(t: &mut TableSnapshot) {
    let row_len = t.row_len as usize;
    let mut order: Vec<usize> = (0..t.keys.len()).collect();
    order.sort_unstable_by_key(|&i| t.keys[i]);
    let keys = order.iter().map(|&i| t.keys[i]).collect();
    let mut values = Vec::with_capacity(t.values.len());
    for &i in &order {
        values.extend_from_slice(&t.values[i * row_len..(i + 1) * row_len]);
    }
    t.keys = keys;
    t.values = values;
}
