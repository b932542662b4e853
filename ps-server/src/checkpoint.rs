//! Shard checkpoints: every table's rows (weights and optimizer state) in one
//! file per shard, written atomically and checked on load.
//!
//! Layout of `DIR/NAME/shard-I.bin`:
//! `b"PSCKPT02"` | payload length (u64 LE) | FNV-1a-64 of the payload (u64 LE)
//! | payload = bincode (standard config) of [`ShardSnapshot`]. Format 1
//! (`PSCKPT01`, before admission sketches were kept) is still read.
//! Beside it, `shard-I.json` is a human-readable manifest (tables, rows,
//! checksum). The file is written to a temporary name of its own, fsynced,
//! then renamed, so a crash never leaves a half-written checkpoint under the
//! final name; one writer per server ([`Checkpoints`]) means two requests
//! for one name never share a temporary file.
//!
//! A snapshot is taken row by row while the shard keeps serving: each row is
//! consistent, but rows are not captured at one instant (the usual guarantee
//! of asynchronous parameter servers).

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use ps_common::PsError;
use ps_common::routing::fnv1a64;
use serde::Serialize;

use crate::store::{Shard, ShardSnapshot, ShardSnapshotV1};

const MAGIC: &[u8; 8] = b"PSCKPT02";
/// Format 1: the same, without the tables' admission counters.
const MAGIC_V1: &[u8; 8] = b"PSCKPT01";
const HEADER_LEN: usize = 8 + 8 + 8;

#[derive(Debug, Serialize)]
struct Manifest<'a> {
    format: &'static str,
    shard_id: u32,
    num_shards: u32,
    checksum_fnv1a64: String,
    bytes: u64,
    tables: Vec<ManifestTable<'a>>,
}

#[derive(Debug, Serialize)]
struct ManifestTable<'a> {
    name: &'a str,
    rows: usize,
}

/// What a written checkpoint contains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    /// The shard file.
    pub path: PathBuf,
    /// Rows over all tables.
    pub rows: u64,
    /// File size.
    pub bytes: u64,
}

/// Path of shard `shard_id`'s file in checkpoint directory `dir` (= `ROOT/NAME`).
pub fn shard_file(dir: &Path, shard_id: u32) -> PathBuf {
    dir.join(format!("shard-{shard_id}.bin"))
}

/// Number of shard files (`shard-I.bin`) in checkpoint directory `dir`
/// (`DIR/NAME`): the shard count of the job that wrote it.
pub fn shard_count(dir: &Path) -> Result<u32, PsError> {
    let count = fs::read_dir(dir)
        .map_err(|e| storage("cannot read checkpoint", dir, e))?
        .filter_map(Result::ok)
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.starts_with("shard-") && name.ends_with(".bin")
        })
        .count() as u32;
    if count == 0 {
        return Err(PsError::FailedPrecondition(format!(
            "{} holds no shard-I.bin checkpoint files",
            dir.display()
        )));
    }
    Ok(count)
}

fn storage(what: &str, path: &Path, e: impl std::fmt::Display) -> PsError {
    PsError::Storage(format!("{what} {}: {e}", path.display()))
}

/// The checkpoints of one server: where they go, and the one writer.
///
/// Every checkpoint of a server (the Checkpoint RPC, `--checkpoint-every-secs`,
/// the shutdown checkpoint) is written through here, one at a time, so two
/// requests for the same name never interleave: each call writes a whole
/// file of its own and the last rename wins.
#[derive(Debug)]
pub struct Checkpoints {
    root: PathBuf,
    /// Held for the whole of one save.
    writer: Mutex<()>,
    /// Numbers this process's temporary files, so no two writes share one.
    temp_files: AtomicU64,
}

impl Checkpoints {
    /// Checkpoints under `root` (`--checkpoint-dir`).
    pub fn new(root: PathBuf) -> Checkpoints {
        Checkpoints {
            root,
            writer: Mutex::new(()),
            temp_files: AtomicU64::new(0),
        }
    }

    /// The checkpoint root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Writes `shard` to `ROOT/name/shard-I.bin` (plus its manifest),
    /// atomically; waits for any other checkpoint of this server to finish
    /// first. Runs file I/O: call it on a blocking thread.
    pub fn save(&self, shard: &Shard, name: &str) -> Result<Written, PsError> {
        ps_common::names::validate_checkpoint_name(name)?;
        let _one_writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let dir = self.root.join(name);
        fs::create_dir_all(&dir).map_err(|e| storage("cannot create", &dir, e))?;
        let snapshot = shard.snapshot();
        let payload = bincode::serde::encode_to_vec(&snapshot, bincode::config::standard())
            .map_err(|e| PsError::Storage(format!("cannot encode checkpoint: {e}")))?;
        let checksum = fnv1a64(&payload);
        let path = shard_file(&dir, shard.shard_id());
        let mut file_bytes = Vec::with_capacity(HEADER_LEN);
        file_bytes.extend_from_slice(MAGIC);
        file_bytes.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        file_bytes.extend_from_slice(&checksum.to_le_bytes());
        self.write_atomically(&path, &[&file_bytes, &payload])?;
        let manifest = Manifest {
            format: "PSCKPT02",
            shard_id: snapshot.shard_id,
            num_shards: snapshot.num_shards,
            checksum_fnv1a64: format!("{checksum:016x}"),
            bytes: (HEADER_LEN + payload.len()) as u64,
            tables: snapshot
                .tables
                .iter()
                .map(|t| ManifestTable {
                    name: &t.spec.name,
                    rows: t.keys.len(),
                })
                .collect(),
        };
        let json =
            serde_json::to_vec_pretty(&manifest).map_err(|e| PsError::Storage(e.to_string()))?;
        self.write_atomically(
            &dir.join(format!("shard-{}.json", shard.shard_id())),
            &[&json],
        )?;
        Ok(Written {
            path,
            rows: snapshot.tables.iter().map(|t| t.keys.len() as u64).sum(),
            bytes: manifest.bytes,
        })
    }

    /// Writes `parts` to `path` through a temporary file of its own: write,
    /// fsync, rename, fsync the folder. A failed write removes its
    /// temporary file and leaves `path` as it was.
    fn write_atomically(&self, path: &Path, parts: &[&[u8]]) -> Result<(), PsError> {
        let n = self.temp_files.fetch_add(1, Ordering::Relaxed);
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".tmp-{}-{n}", std::process::id()));
        let tmp = PathBuf::from(tmp);
        let written = write_then_rename(&tmp, path, parts);
        if written.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        written
    }
}

/// What [`Checkpoints::latest`] found.
#[derive(Debug)]
pub struct Latest {
    /// The checkpoint folder restored (`ROOT/NAME`) and its snapshot.
    pub restored: Option<(PathBuf, ShardSnapshot)>,
    /// Newer checkpoints of this shard that were refused, and why.
    pub skipped: Vec<(PathBuf, PsError)>,
}

impl Checkpoints {
    /// The newest complete checkpoint of shard `shard_id` of `num_shards`
    /// under the root: every `ROOT/NAME/shard-I.bin`, newest first (by the
    /// time its file was written), the first that loads and verifies. A
    /// root without any is `restored: None` (a first start). Checkpoints
    /// exist but none loads (damaged, or written by another shard layout):
    /// an error naming each, since starting empty would silently lose them.
    pub fn latest(&self, shard_id: u32, num_shards: u32) -> Result<Latest, PsError> {
        let entries = match fs::read_dir(&self.root) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Latest {
                    restored: None,
                    skipped: Vec::new(),
                });
            }
            Err(e) => return Err(storage("cannot read checkpoint root", &self.root, e)),
        };
        let mut candidates: Vec<(std::time::SystemTime, PathBuf)> = entries
            .filter_map(Result::ok)
            .filter(|e| e.path().is_dir())
            .filter_map(|e| {
                let written = fs::metadata(shard_file(&e.path(), shard_id))
                    .and_then(|m| m.modified())
                    .ok()?;
                Some((written, e.path()))
            })
            .collect();
        candidates.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| b.1.cmp(&a.1)));
        let mut skipped = Vec::new();
        for (_, dir) in candidates {
            match load(&dir, shard_id, num_shards) {
                Ok(snapshot) => {
                    return Ok(Latest {
                        restored: Some((dir, snapshot)),
                        skipped,
                    });
                }
                Err(e) => skipped.push((dir, e)),
            }
        }
        if skipped.is_empty() {
            return Ok(Latest {
                restored: None,
                skipped,
            });
        }
        let reasons: Vec<String> = skipped.iter().map(|(_, e)| e.to_string()).collect();
        Err(PsError::FailedPrecondition(format!(
            "{} holds checkpoints of shard {shard_id} but none can be restored: {}",
            self.root.display(),
            reasons.join("; ")
        )))
    }
}

/// The steps of [`Checkpoints::write_atomically`].
fn write_then_rename(tmp: &Path, path: &Path, parts: &[&[u8]]) -> Result<(), PsError> {
    let mut file = File::create(tmp).map_err(|e| storage("cannot create", tmp, e))?;
    for part in parts {
        file.write_all(part)
            .map_err(|e| storage("cannot write", tmp, e))?;
    }
    file.sync_all()
        .map_err(|e| storage("cannot sync", tmp, e))?;
    drop(file);
    fs::rename(tmp, path).map_err(|e| storage("cannot rename into", path, e))?;
    if let Some(parent) = path.parent() {
        File::open(parent)
            .and_then(|d| d.sync_all())
            .map_err(|e| storage("cannot sync", parent, e))?;
    }
    Ok(())
}

/// Reads and verifies shard `shard_id`'s file of checkpoint directory `dir`.
pub fn load(dir: &Path, shard_id: u32, num_shards: u32) -> Result<ShardSnapshot, PsError> {
    let path = shard_file(dir, shard_id);
    let bytes = fs::read(&path).map_err(|e| storage("cannot read checkpoint", &path, e))?;
    let refuse = |why: String| {
        PsError::FailedPrecondition(format!("checkpoint {} refused: {why}", path.display()))
    };
    if bytes.len() < HEADER_LEN || (&bytes[..8] != MAGIC && &bytes[..8] != MAGIC_V1) {
        return Err(refuse(
            "not a PSCKPT02 (or PSCKPT01) checkpoint file".into(),
        ));
    }
    let word = |at: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&bytes[at..at + 8]);
        u64::from_le_bytes(w)
    };
    let (len, checksum) = (word(8), word(16));
    let payload = &bytes[HEADER_LEN..];
    if payload.len() as u64 != len {
        return Err(refuse(format!(
            "truncated: header says {len} payload bytes, file has {}",
            payload.len()
        )));
    }
    if fnv1a64(payload) != checksum {
        return Err(refuse("checksum mismatch (the file is corrupted)".into()));
    }
    let decoded = if &bytes[..8] == MAGIC_V1 {
        bincode::serde::decode_from_slice(payload, bincode::config::standard())
            .map(|(v1, _): (ShardSnapshotV1, usize)| ShardSnapshot::from(v1))
    } else {
        bincode::serde::decode_from_slice(payload, bincode::config::standard())
            .map(|(snapshot, _)| snapshot)
    };
    let snapshot = decoded.map_err(|e| refuse(format!("cannot decode: {e}")))?;
    if snapshot.shard_id != shard_id || snapshot.num_shards != num_shards {
        return Err(refuse(format!(
            "it was written by shard {} of {}, this is shard {shard_id} of {num_shards}",
            snapshot.shard_id, snapshot.num_shards
        )));
    }
    Ok(snapshot)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ps_common::{InitializerSpec, OptimizerSpec, TableKind, TableSpec};

    fn trained_shard() -> Shard {
        let shard = Shard::new(1, 2);
        for (name, kind) in [
            ("emb", TableKind::Sparse),
            (
                "mlp",
                TableKind::Dense {
                    rows: 40,
                    block_rows: 4,
                },
            ),
        ] {
            shard
                .create_table(TableSpec {
                    name: name.into(),
                    kind,
                    dim: 3,
                    initializer: InitializerSpec::Normal {
                        mean: 0.0,
                        std: 1.0,
                    },
                    optimizer: OptimizerSpec::Adam {
                        lr: 0.1,
                        beta1: 0.9,
                        beta2: 0.999,
                        eps: 1e-8,
                    },
                    seed: 3,
                    lifecycle: Default::default(),
                })
                .unwrap();
        }
        let router = ps_common::ShardRouter::new(2);
        let keys: Vec<u64> = (0..200)
            .filter(|&k| router.shard_of(ps_common::routing::Placement::Sparse, k) == 1)
            .collect();
        shard
            .push("emb", &keys, &vec![0.5; keys.len() * 3])
            .unwrap();
        shard
    }

    fn temp_root(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ps-ckpt-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn a_checkpoint_restores_weights_and_optimizer_state_exactly() {
        let shard = trained_shard();
        let root = temp_root("roundtrip");
        let written = Checkpoints::new(root.clone()).save(&shard, "c1").unwrap();
        assert_eq!(written.path, root.join("c1/shard-1.bin"));
        assert!(root.join("c1/shard-1.json").exists());
        let restored = Shard::restore(load(&root.join("c1"), 1, 2).unwrap()).unwrap();
        assert_eq!(
            restored.snapshot(),
            shard.snapshot(),
            "weights and optimizer state"
        );
        // Training continues identically from the restored state.
        let key = shard.snapshot().tables[0].keys[0];
        for s in [&shard, &restored] {
            s.push("emb", &[key], &[1.0, -1.0, 0.25]).unwrap();
        }
        assert_eq!(restored.snapshot(), shard.snapshot());
        fs::remove_dir_all(&root).ok();
    }

    #[test]
    fn a_corrupted_or_foreign_checkpoint_is_refused() {
        let shard = trained_shard();
        let root = temp_root("corrupt");
        let written = Checkpoints::new(root.clone()).save(&shard, "c1").unwrap();
        let err = load(&root.join("c1"), 0, 2).unwrap_err();
        assert!(err.to_string().contains("cannot read checkpoint"), "{err}");
        fs::copy(&written.path, shard_file(&root.join("c1"), 0)).unwrap();
        let err = load(&root.join("c1"), 0, 2).unwrap_err();
        assert!(
            err.to_string()
                .contains("written by shard 1 of 2, this is shard 0 of 2"),
            "{err}"
        );

        let mut bytes = fs::read(&written.path).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x40;
        fs::write(&written.path, &bytes).unwrap();
        let err = load(&root.join("c1"), 1, 2).unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition);
        assert!(err.to_string().contains("checksum mismatch"), "{err}");
        fs::write(&written.path, &bytes[..bytes.len() - 10]).unwrap();
        assert!(
            load(&root.join("c1"), 1, 2)
                .unwrap_err()
                .to_string()
                .contains("truncated")
        );
        fs::remove_dir_all(&root).ok();
    }

    #[test]
    fn a_checkpoint_name_that_is_a_path_is_invalid_and_writes_nothing() {
        let root = temp_root("name");
        let outside = root.join("shard-1.bin");
        let checkpoints = Checkpoints::new(root.join("inner"));
        for name in ["../escape", "..", ".", ".hidden", "a/b"] {
            let err = checkpoints.save(&trained_shard(), name).unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument, "{name}: {err}");
        }
        assert!(!outside.exists(), "nothing written beside the root");
        assert!(!root.join("inner").exists(), "nor under it");
    }

    #[test]
    fn concurrent_checkpoints_of_one_name_all_succeed_and_leave_a_loadable_file() {
        let shard = std::sync::Arc::new(trained_shard());
        let root = temp_root("concurrent");
        let checkpoints = std::sync::Arc::new(Checkpoints::new(root.clone()));
        let writers: Vec<_> = (0..8)
            .map(|_| {
                let (shard, checkpoints) = (shard.clone(), checkpoints.clone());
                std::thread::spawn(move || checkpoints.save(&shard, "same"))
            })
            .collect();
        for writer in writers {
            writer.join().unwrap().unwrap();
        }
        let restored = load(&root.join("same"), 1, 2).unwrap();
        assert_eq!(restored, shard.snapshot());
        let leftovers: Vec<_> = fs::read_dir(root.join("same"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| name.contains(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
        fs::remove_dir_all(&root).ok();
    }

    #[test]
    fn the_newest_loadable_checkpoint_is_found_and_a_damaged_newer_one_skipped() {
        let root = temp_root("latest");
        let checkpoints = Checkpoints::new(root.clone());
        let empty = checkpoints.latest(1, 2).unwrap();
        assert!(empty.restored.is_none(), "no checkpoint yet: start empty");
        let shard = trained_shard();
        checkpoints.save(&shard, "old").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        shard
            .push("emb", &[shard.snapshot().tables[0].keys[0]], &[1.0; 3])
            .unwrap();
        checkpoints.save(&shard, "new").unwrap();
        let latest = checkpoints.latest(1, 2).unwrap();
        let (dir, snapshot) = latest.restored.unwrap();
        assert_eq!(dir, root.join("new"));
        assert_eq!(snapshot, shard.snapshot());
        // Damage the newest: the one before it is restored, and the damage named.
        std::thread::sleep(std::time::Duration::from_millis(20));
        fs::write(root.join("new/shard-1.bin"), b"PSCKPT01 truncated").unwrap();
        let latest = checkpoints.latest(1, 2).unwrap();
        assert_eq!(latest.restored.unwrap().0, root.join("old"));
        assert_eq!(latest.skipped.len(), 1);
        assert_eq!(latest.skipped[0].0, root.join("new"));
        // Another shard layout: none fits, which is an error, not an empty start.
        let err = checkpoints.latest(1, 3).unwrap_err();
        assert!(err.to_string().contains("none can be restored"), "{err}");
        fs::remove_dir_all(&root).ok();
    }

    #[test]
    fn shard_count_counts_the_shard_files_and_refuses_a_folder_without_any() {
        let root = temp_root("count");
        Checkpoints::new(root.clone())
            .save(&trained_shard(), "c1")
            .unwrap();
        assert_eq!(shard_count(&root.join("c1")), Ok(1));
        assert!(matches!(
            shard_count(&root),
            Err(PsError::FailedPrecondition(_))
        ));
        let err = shard_count(&root.join("missing")).unwrap_err();
        assert!(err.to_string().contains("cannot read checkpoint"), "{err}");
    }
}
