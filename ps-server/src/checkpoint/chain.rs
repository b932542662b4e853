//! Incremental checkpoints: a base followed by deltas of what changed.
//!
//! Layout beside the base `DIR/NAME/shard-I.bin`:
//! `shard-I.delta-NNNNNN.bin` = `b"PSDELT01"` | payload length | FNV-1a-64 |
//! payload = bincode of [`DeltaFile`]: the checksum of the base it follows,
//! its number in the chain (from 1), and the [`ShardDelta`].
//!
//! A server keeps one chain at a time (its shard records changes once):
//! the chain's name, its base's checksum and the next delta's number. An
//! incremental save of that name writes the next delta; of any other name,
//! or every `full_every` deltas, or first of all, it writes a new base,
//! which then removes the deltas of the one before. A plain (full) save of
//! any name ends the chain, since taking a base clears the shard's change
//! records.
//!
//! Restoring applies the deltas that follow the base, in order: a delta of
//! an older base (left by a crash between writing a base and removing
//! them) is skipped; a damaged one, or a gap in the numbers, refuses the
//! checkpoint, since the state after it is unknown (removing the delta
//! files restores the state of the base).

use std::fs;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use ps_common::PsError;
use serde::{Deserialize, Serialize};

use super::{Checkpoints, HEADER_LEN, Written, header, read_verified, refused, shard_file};
use crate::store::{Shard, ShardDelta, ShardSnapshot};

const DELTA_MAGIC: &[u8; 8] = b"PSDELT01";

/// The chain this server's shard records changes for.
#[derive(Debug)]
pub(super) struct Chain {
    name: String,
    base_checksum: u64,
    /// The next delta's number.
    next: u64,
}

/// One delta file's payload.
#[derive(Debug, Serialize, Deserialize)]
struct DeltaFile {
    base_checksum: u64,
    seq: u64,
    delta: ShardDelta,
}

/// Path of delta `seq` of shard `shard_id` in checkpoint directory `dir`.
pub fn delta_file(dir: &Path, shard_id: u32, seq: u64) -> PathBuf {
    dir.join(format!("shard-{shard_id}.delta-{seq:06}.bin"))
}

/// The delta files of shard `shard_id` in `dir`, by number.
fn deltas(dir: &Path, shard_id: u32) -> Vec<(u64, PathBuf)> {
    let prefix = format!("shard-{shard_id}.delta-");
    let mut found: Vec<(u64, PathBuf)> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let seq = name
                .strip_prefix(&prefix)?
                .strip_suffix(".bin")?
                .parse()
                .ok()?;
            Some((seq, e.path()))
        })
        .collect();
    found.sort();
    found
}

/// The paths of shard `shard_id`'s delta files in `dir`, by number.
#[cfg(test)]
pub(super) fn deltas_of(dir: &Path, shard_id: u32) -> Vec<PathBuf> {
    deltas(dir, shard_id).into_iter().map(|(_, p)| p).collect()
}

/// Removes shard `shard_id`'s delta files from `dir` (best effort: one
/// left behind names another base's checksum and is skipped on restore).
pub(super) fn remove_deltas(dir: &Path, shard_id: u32) {
    for (_, path) in deltas(dir, shard_id) {
        if let Err(e) = fs::remove_file(&path) {
            tracing::warn!(path = %path.display(), "cannot remove an old delta: {e}");
        }
    }
}

/// When shard `shard_id`'s checkpoint in `dir` was last written (its base
/// or its newest delta); `None` without a base.
pub(super) fn last_written(dir: &Path, shard_id: u32) -> Option<SystemTime> {
    let modified = |path: &Path| fs::metadata(path).and_then(|m| m.modified()).ok();
    let base = modified(&shard_file(dir, shard_id))?;
    Some(
        (deltas(dir, shard_id).iter())
            .filter_map(|(_, path)| modified(path))
            .fold(base, SystemTime::max),
    )
}

/// Applies to `snapshot` (the base, of checksum `base_checksum`) the deltas
/// of its chain in `dir`, in order.
pub(super) fn apply_deltas(
    dir: &Path,
    snapshot: &mut ShardSnapshot,
    base_checksum: u64,
) -> Result<(), PsError> {
    let mut expected = 1;
    for (seq, path) in deltas(dir, snapshot.shard_id) {
        let file = read_verified(&path, &[DELTA_MAGIC])?;
        let (delta, _): (DeltaFile, usize) =
            bincode::serde::decode_from_slice(file.payload(), bincode::config::standard())
                .map_err(|e| refused(&path, format!("cannot decode: {e}")))?;
        if delta.base_checksum != base_checksum {
            tracing::warn!(path = %path.display(), "skipping a delta of an earlier base");
            continue;
        }
        if delta.seq != seq || seq != expected {
            return Err(refused(
                &path,
                format!("delta {seq} follows delta {} of its chain", expected - 1),
            ));
        }
        snapshot.apply(delta.delta).map_err(|e| refused(&path, e))?;
        expected += 1;
    }
    Ok(())
}

impl Checkpoints {
    /// Writes `shard` under `name` incrementally: the next delta of the
    /// chain of that name, or a new base when there is none, when the last
    /// checkpoint was of another name, or after `full_every` deltas (see
    /// the module doc). Runs file I/O: call it on a blocking thread.
    pub fn save_incremental(
        &self,
        shard: &Shard,
        name: &str,
        full_every: u64,
    ) -> Result<Written, PsError> {
        ps_common::names::validate_checkpoint_name(name)?;
        let mut chain = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        match chain.as_mut() {
            Some(c) if c.name == name && c.next <= full_every => {
                let dir = self.root.join(name);
                let path = delta_file(&dir, shard.shard_id(), c.next);
                let delta = match shard.take_delta() {
                    Ok(delta) => delta,
                    Err(e) => {
                        // Some changes were taken and are in no file: only
                        // a new base holds them now.
                        *chain = None;
                        return Err(e);
                    }
                };
                let rows = (delta.tables.iter())
                    .map(|t| t.rows.keys.len() as u64)
                    .sum();
                let file = DeltaFile {
                    base_checksum: c.base_checksum,
                    seq: c.next,
                    delta,
                };
                let payload = bincode::serde::encode_to_vec(&file, bincode::config::standard())
                    .map_err(|e| PsError::Storage(format!("cannot encode a delta: {e}")))?;
                match self.write_atomically(&path, &[&header(DELTA_MAGIC, &payload), &payload]) {
                    Ok(()) => {
                        c.next += 1;
                        Ok(Written {
                            path,
                            rows,
                            bytes: (HEADER_LEN + payload.len()) as u64,
                        })
                    }
                    Err(e) => {
                        // The changes taken are in no file: only a new
                        // base holds them now.
                        *chain = None;
                        Err(e)
                    }
                }
            }
            _ => {
                *chain = None;
                let (written, base_checksum) = self.save_base(shard, name, true)?;
                *chain = Some(Chain {
                    name: name.to_string(),
                    base_checksum,
                    next: 1,
                });
                Ok(written)
            }
        }
    }
}
