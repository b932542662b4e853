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
//!
//! **Incremental checkpoints** ([`chain`]): a checkpoint may instead be a
//! chain, a full base (`shard-I.bin`) followed by deltas
//! (`shard-I.delta-NNNNNN.bin`), each holding only the rows that changed and
//! the keys evicted since the one before. Restoring loads the base and
//! applies the deltas in order. A periodic checkpoint then costs what
//! changed, not the whole shard.
//!
//! **Resharding** ([`load_resharded`]): a checkpoint written by N shards
//! restores into M; each new shard keeps the rows it owns from every file.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use ps_common::PsError;
use ps_common::routing::fnv1a64;
use serde::Serialize;

use crate::store::{Shard, ShardSnapshot, ShardSnapshotV1};

mod chain;
mod reshard;

pub use reshard::load_resharded;

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
            // `shard-I.bin` only: not an incremental chain's deltas
            // (`shard-I.delta-NNNNNN.bin`) or temporary files.
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_prefix("shard-")
                .and_then(|rest| rest.strip_suffix(".bin"))
                .is_some_and(|i| !i.is_empty() && i.bytes().all(|b| b.is_ascii_digit()))
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
    /// Held for the whole of one save; names the incremental chain the
    /// shard's change records belong to, if any.
    writer: Mutex<Option<chain::Chain>>,
    /// Numbers this process's temporary files, so no two writes share one.
    temp_files: AtomicU64,
}

impl Checkpoints {
    /// Checkpoints under `root` (`--checkpoint-dir`).
    pub fn new(root: PathBuf) -> Checkpoints {
        Checkpoints {
            root,
            writer: Mutex::new(None),
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
        let mut chain = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        // Taking a base clears the shard's change records: a chain that
        // relied on them ends here.
        *chain = None;
        let (written, _) = self.save_base(shard, name, false)?;
        Ok(written)
    }

    /// Writes a full base of `shard` under `name` (with `chain`, the start
    /// of an incremental chain). Returns what was written and the base's
    /// checksum. The caller holds the writer lock.
    fn save_base(&self, shard: &Shard, name: &str, chain: bool) -> Result<(Written, u64), PsError> {
        let dir = self.root.join(name);
        fs::create_dir_all(&dir).map_err(|e| storage("cannot create", &dir, e))?;
        let snapshot = shard.take_base(chain)?;
        let payload = bincode::serde::encode_to_vec(&snapshot, bincode::config::standard())
            .map_err(|e| PsError::Storage(format!("cannot encode checkpoint: {e}")))?;
        let checksum = fnv1a64(&payload);
        let path = shard_file(&dir, shard.shard_id());
        self.write_atomically(&path, &[&header(MAGIC, &payload), &payload])?;
        // Deltas of an earlier base no longer apply (their base checksum
        // says so, should removing one fail).
        chain::remove_deltas(&dir, shard.shard_id());
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
        let written = Written {
            path,
            rows: snapshot.tables.iter().map(|t| t.keys.len() as u64).sum(),
            bytes: manifest.bytes,
        };
        Ok((written, checksum))
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
            .filter_map(|e| Some((chain::last_written(&e.path(), shard_id)?, e.path())))
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

impl Checkpoints {
    /// [`Checkpoints::latest`] for a restore at start: each newer
    /// checkpoint it had to skip is logged as a warning, and the one to
    /// restore (if any) is returned.
    pub fn newest(
        &self,
        shard_id: u32,
        num_shards: u32,
    ) -> Result<Option<(PathBuf, ShardSnapshot)>, PsError> {
        let latest = self.latest(shard_id, num_shards)?;
        for (dir, why) in &latest.skipped {
            tracing::warn!(checkpoint = %dir.display(), "skipped a newer checkpoint: {why}");
        }
        Ok(latest.restored)
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

/// Writes `payload` to `path` framed as checkpoint files are (`magic`,
/// length, checksum), atomically: through `path` + `.tmp`, fsynced, then
/// renamed (other files in this format, such as serving bundles).
pub fn write_framed(path: &Path, magic: &[u8; 8], payload: &[u8]) -> Result<(), PsError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let written = write_then_rename(&tmp, path, &[&header(magic, payload), payload]);
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written
}

/// Reads a file written by [`write_framed`] with `magic`, checking its
/// length and checksum; returns its payload.
pub fn read_framed(path: &Path, magic: &[u8; 8]) -> Result<Vec<u8>, PsError> {
    let mut verified = read_verified(path, &[magic])?;
    verified.bytes.drain(..HEADER_LEN);
    Ok(verified.bytes)
}

/// A file's header: magic, payload length, payload checksum.
fn header(magic: &[u8; 8], payload: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(HEADER_LEN);
    bytes.extend_from_slice(magic);
    bytes.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&fnv1a64(payload).to_le_bytes());
    bytes
}

/// A checkpoint file read whole and verified: which magic it starts with,
/// its bytes and its payload's checksum.
struct Verified {
    magic: [u8; 8],
    bytes: Vec<u8>,
    checksum: u64,
}

impl Verified {
    fn payload(&self) -> &[u8] {
        &self.bytes[HEADER_LEN..]
    }
}

/// The refusal of checkpoint file `path`, saying why.
fn refused(path: &Path, why: impl std::fmt::Display) -> PsError {
    PsError::FailedPrecondition(format!("checkpoint {} refused: {why}", path.display()))
}

/// Reads `path` and checks its header (one of `magics`), length and checksum.
fn read_verified(path: &Path, magics: &[&[u8; 8]]) -> Result<Verified, PsError> {
    let bytes = fs::read(path).map_err(|e| storage("cannot read checkpoint", path, e))?;
    let Some(magic) = (magics.iter()).find(|m| bytes.len() >= HEADER_LEN && bytes[..8] == m[..])
    else {
        let names: Vec<String> = (magics.iter())
            .map(|m| String::from_utf8_lossy(&m[..]).into_owned())
            .collect();
        return Err(refused(
            path,
            format!("not a {} checkpoint file", names.join(" or ")),
        ));
    };
    let word = |at: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&bytes[at..at + 8]);
        u64::from_le_bytes(w)
    };
    let (len, checksum) = (word(8), word(16));
    let payload = &bytes[HEADER_LEN..];
    if payload.len() as u64 != len {
        return Err(refused(
            path,
            format!(
                "truncated: header says {len} payload bytes, file has {}",
                payload.len()
            ),
        ));
    }
    if fnv1a64(payload) != checksum {
        return Err(refused(path, "checksum mismatch (the file is corrupted)"));
    }
    Ok(Verified {
        magic: **magic,
        bytes,
        checksum,
    })
}

/// Reads and verifies shard `shard_id`'s checkpoint in directory `dir`:
/// its base file and, for an incremental chain, the deltas that follow it,
/// applied in order.
pub fn load(dir: &Path, shard_id: u32, num_shards: u32) -> Result<ShardSnapshot, PsError> {
    let (mut snapshot, checksum) = load_base(dir, shard_id, num_shards)?;
    chain::apply_deltas(dir, &mut snapshot, checksum)?;
    Ok(snapshot)
}

/// The base file alone, and its checksum.
fn load_base(dir: &Path, shard_id: u32, num_shards: u32) -> Result<(ShardSnapshot, u64), PsError> {
    let path = shard_file(dir, shard_id);
    let file = read_verified(&path, &[MAGIC, MAGIC_V1])?;
    let refuse = |why: String| refused(&path, why);
    let payload = file.payload();
    let decoded = if &file.magic == MAGIC_V1 {
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
    Ok((snapshot, file.checksum))
}

#[cfg(test)]
mod tests;
