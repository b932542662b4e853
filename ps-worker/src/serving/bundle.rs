//! Serving bundles: one self-contained, checksummed file holding a job's
//! model (the job file's text) and the weights of the tables the model
//! reads, nothing else (no optimizer state, no other table). Written by
//! `ps-worker export` from a checkpoint, served by `ps-worker serve
//! --bundle` without any server.
//!
//! The file is framed as checkpoints are (magic `PSBNDL01`, payload
//! length, FNV-1a checksum; written to a temporary name, fsynced and
//! renamed); the payload is bincode. A sparse row the bundle does not
//! hold is answered as the table's initializer makes it, as a server
//! answers the pull of a new id.

use std::collections::HashMap;
use std::path::Path;

use prost::Message;
use ps_common::config::JobConfig;
use ps_common::init::init_row;
use ps_common::{PsError, TableKind, TableSpec, pb};
use serde::{Deserialize, Serialize};

use crate::model::Model;

/// The magic of a bundle file.
const MAGIC: &[u8; 8] = b"PSBNDL01";

/// What a bundle holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Bundle {
    /// The model's name.
    pub name: String,
    /// The job file's text (its `[model]`, `[data]` format and `[tables]`
    /// say what the weights are and how instances read).
    pub job: String,
    /// The tables the model reads.
    pub tables: Vec<BundleTable>,
}

/// One table's weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BundleTable {
    /// The table's spec as its `ps.v1.TableSpec` protobuf encoding.
    pub spec: Vec<u8>,
    /// Row keys, ascending.
    pub keys: Vec<u64>,
    /// `keys.len() * dim` weights, row after row.
    pub weights: Vec<f32>,
}

impl Bundle {
    /// The bundle of `job`'s model (`text` is the job file's text) from
    /// the checkpoint in `dir`, written by any number of shards. Fails,
    /// naming it, on a table the model reads that the checkpoint lacks or
    /// holds with another kind or dim.
    pub fn export(job: &JobConfig, text: &str, name: &str, dir: &Path) -> Result<Bundle, PsError> {
        let model = Model::from_job(job);
        let wanted: Vec<&str> = (model.sparse_tables().iter())
            .chain(model.dense_tables())
            .map(|t| t.name.as_str())
            .collect();
        let specs: HashMap<String, TableSpec> = job
            .table_specs()
            .into_iter()
            .map(|s| (s.name.clone(), s))
            .collect();
        let num_shards = ps_server::checkpoint::shard_count(dir)?;
        let mut found: HashMap<String, Gathered> = HashMap::new();
        for shard in 0..num_shards {
            let snapshot = ps_server::checkpoint::load(dir, shard, num_shards)?;
            for table in snapshot.tables {
                if !wanted.contains(&table.spec.name.as_str()) {
                    continue;
                }
                let dim = table.spec.dim as usize;
                let row_len = (table.row_len as usize).max(1);
                let entry = found
                    .entry(table.spec.name.clone())
                    .or_insert_with(|| (table.spec.clone(), Vec::new()));
                for (key, row) in table.keys.iter().zip(table.values.chunks_exact(row_len)) {
                    entry.1.push((*key, row[..dim].to_vec()));
                }
            }
        }
        let mut tables = Vec::new();
        for name in wanted {
            let Some((spec, mut rows)) = found.remove(name) else {
                return Err(PsError::FailedPrecondition(format!(
                    "checkpoint {} has no table '{name}', which the job's model reads",
                    dir.display()
                )));
            };
            if let Some(want) = specs.get(name)
                && (want.kind, want.dim) != (spec.kind, spec.dim)
            {
                return Err(PsError::FailedPrecondition(format!(
                    "checkpoint {}: table '{name}' is {:?} x dim {}, the job's model needs {:?} x dim {}",
                    dir.display(),
                    spec.kind,
                    spec.dim,
                    want.kind,
                    want.dim
                )));
            }
            rows.sort_unstable_by_key(|(key, _)| *key);
            tables.push(BundleTable {
                spec: pb::TableSpec::from(&spec).encode_to_vec(),
                keys: rows.iter().map(|(k, _)| *k).collect(),
                weights: rows.into_iter().flat_map(|(_, w)| w).collect(),
            });
        }
        Ok(Bundle {
            name: name.to_string(),
            job: text.to_string(),
            tables,
        })
    }

    /// Writes the bundle to `path`, atomically.
    pub fn write(&self, path: &Path) -> Result<u64, PsError> {
        let payload = bincode::serde::encode_to_vec(self, bincode::config::standard())
            .map_err(|e| PsError::Internal(format!("cannot encode the bundle: {e}")))?;
        ps_server::checkpoint::write_framed(path, MAGIC, &payload)?;
        Ok(payload.len() as u64)
    }

    /// Reads and verifies the bundle at `path`.
    pub fn read(path: &Path) -> Result<Bundle, PsError> {
        let payload = ps_server::checkpoint::read_framed(path, MAGIC)?;
        let (bundle, _): (Bundle, usize) = bincode::serde::decode_from_slice(
            &payload,
            bincode::config::standard(),
        )
        .map_err(|e| {
            PsError::FailedPrecondition(format!("bundle {} cannot be decoded: {e}", path.display()))
        })?;
        Ok(bundle)
    }

    /// The bundle's job, parsed.
    pub fn job(&self) -> Result<JobConfig, PsError> {
        JobConfig::from_toml(&self.job, Path::new("."))
            .map_err(|e| PsError::FailedPrecondition(format!("the bundle's job is invalid: {e}")))
    }
}

/// A table's spec and its `(key, weights)` rows, gathered from shards.
type Gathered = (TableSpec, Vec<(u64, Vec<f32>)>);

/// A bundle's tables, ready to answer rows.
#[derive(Debug)]
pub struct BundleRows {
    tables: HashMap<String, HeldTable>,
}

#[derive(Debug)]
struct HeldTable {
    spec: TableSpec,
    keys: Vec<u64>,
    weights: Vec<f32>,
}

impl BundleRows {
    /// Checks `bundle`'s tables and holds them.
    pub fn new(bundle: Bundle) -> Result<BundleRows, PsError> {
        let mut tables = HashMap::new();
        for table in bundle.tables {
            let spec = pb::TableSpec::decode(table.spec.as_slice())
                .map_err(|e| PsError::FailedPrecondition(format!("a bundle table spec: {e}")))
                .and_then(TableSpec::try_from)?;
            let dim = spec.dim as usize;
            if table.weights.len() != table.keys.len() * dim
                || table.keys.windows(2).any(|w| w[0] >= w[1])
            {
                return Err(PsError::FailedPrecondition(format!(
                    "bundle table '{}': {} keys (ascending) need {} weights, it has {}",
                    spec.name,
                    table.keys.len(),
                    table.keys.len() * dim,
                    table.weights.len()
                )));
            }
            tables.insert(
                spec.name.clone(),
                HeldTable {
                    spec,
                    keys: table.keys,
                    weights: table.weights,
                },
            );
        }
        Ok(BundleRows { tables })
    }

    /// The weights of `keys` of `table`, row after row; a sparse row not
    /// held is the initializer's, a dense one is an error.
    pub fn rows(&self, table: &str, keys: &[u64]) -> Result<Vec<f32>, PsError> {
        let held = self
            .tables
            .get(table)
            .ok_or_else(|| PsError::UnknownTable(table.to_string()))?;
        let dim = held.spec.dim as usize;
        let mut out = vec![0.0f32; keys.len() * dim];
        for (row, &key) in out.chunks_exact_mut(dim.max(1)).zip(keys) {
            match held.keys.binary_search(&key) {
                Ok(at) => row.copy_from_slice(&held.weights[at * dim..(at + 1) * dim]),
                Err(_) if held.spec.kind == TableKind::Sparse => {
                    init_row(&held.spec.initializer, held.spec.seed, key, row)
                }
                Err(_) => {
                    return Err(PsError::FailedPrecondition(format!(
                        "the bundle lacks row {key} of dense table '{table}'"
                    )));
                }
            }
        }
        Ok(out)
    }
}
