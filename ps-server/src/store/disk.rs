//! The disk tier: a shard's cold sparse rows in an embedded key-value store.
//!
//! With `ps-server --disk-tier DIR`, rows that a table's eviction policy
//! gives up for its row cap or for the memory budget move to disk instead
//! of being dropped, and come back to memory when a pull or push touches
//! them. A row lives in exactly one tier at a time: the moves both ways run
//! under the row's segment write lock ([`super::sparse`]), so a request
//! that misses in memory finds the row on disk, never neither nor both.
//! Rows expired by a TTL are dropped from either tier.
//!
//! The store is [redb](https://docs.rs/redb): pure Rust (no C toolchain in
//! the image), one file, MVCC reads that never wait for the writer, and
//! commits that need not reach the platters. The tier is not durable state:
//! checkpoints carry every row, on disk or not, and the file is created
//! anew when the server starts. So commits skip `fsync`
//! ([`Durability::None`]); [`DiskTier::settle`] commits durably once per
//! eviction pass only so that redb reuses the pages freed meanwhile and
//! the file stops growing.
//!
//! Each table gets a redb table of its own, keyed by the mixed key
//! ([`ps_common::routing::mix64`], a bijection), so the rows of one memory
//! segment are one key range: walks by segment read them in order. A value
//! is `key (u64) | last touch (u32) | touches (u32) | changed (u8) | floats
//! (f32)`, little-endian: the row keeps its touch record, and whether it
//! changed since the last checkpoint took it, across the move.

use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use ps_common::PsError;
use redb::{Builder, Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};

/// Bytes of a stored value before its floats.
const HEADER: usize = 8 + 4 + 4 + 1;
/// Where a stored value keeps its changed mark.
const CHANGED_AT: usize = 16;

/// Page cache of the tier's store, unless `--disk-tier-cache-bytes` says.
pub const DEFAULT_CACHE_BYTES: usize = 16 << 20;

/// A failure of the disk tier's store (I/O, a full disk).
#[derive(Debug, thiserror::Error)]
#[error("disk tier {path}: {message}")]
pub struct DiskError {
    path: String,
    message: String,
}

impl From<DiskError> for PsError {
    fn from(e: DiskError) -> Self {
        PsError::Storage(e.to_string())
    }
}

/// One shard's disk tier: a redb file that its evicting tables' cold rows
/// move to. Share it: `Arc`.
pub struct DiskTier {
    db: Database,
    path: PathBuf,
    /// Numbers the redb tables, so a table made again (a restore) never
    /// sees the rows of the one it replaces.
    tables: AtomicU64,
}

impl std::fmt::Debug for DiskTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskTier")
            .field("path", &self.path)
            .finish()
    }
}

impl DiskTier {
    /// Creates the tier of shard `shard_id` in `dir` (the directory is
    /// created; a file left by an earlier run is replaced: the tier holds
    /// nothing a restart needs). `cache_bytes`: redb's page cache.
    pub fn create(dir: &Path, shard_id: u32, cache_bytes: usize) -> Result<Arc<DiskTier>, PsError> {
        let path = dir.join(format!("shard-{shard_id}.tier.redb"));
        let failed = |message: String| DiskError {
            path: path.display().to_string(),
            message,
        };
        std::fs::create_dir_all(dir).map_err(|e| failed(format!("creating the directory: {e}")))?;
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(failed(format!("removing the previous run's file: {e}")).into()),
        }
        let db = Builder::new()
            .set_cache_size(cache_bytes)
            .create(&path)
            .map_err(|e| failed(e.to_string()))?;
        Ok(Arc::new(DiskTier {
            db,
            path,
            tables: AtomicU64::new(0),
        }))
    }

    /// A new, empty table of rows of `row_len` floats.
    pub(crate) fn table(self: &Arc<Self>, row_len: usize) -> ColdRows {
        let number = self.tables.fetch_add(1, Ordering::Relaxed);
        ColdRows {
            tier: Arc::clone(self),
            name: format!("t{number}"),
            row_len,
            len: AtomicU64::new(0),
        }
    }

    /// Commits durably, so that redb reuses the pages that commits without
    /// `fsync` freed (it keeps them until a durable commit).
    pub fn settle(&self) -> Result<(), PsError> {
        let mut txn = self.db.begin_write().map_err(|e| self.error(e))?;
        txn.set_durability(Durability::Immediate)
            .map_err(|e| self.error(e))?;
        txn.commit().map_err(|e| self.error(e))?;
        Ok(())
    }

    /// The tier's file size in bytes.
    pub fn file_bytes(&self) -> u64 {
        std::fs::metadata(&self.path).map_or(0, |m| m.len())
    }

    fn error(&self, e: impl std::fmt::Display) -> DiskError {
        DiskError {
            path: self.path.display().to_string(),
            message: e.to_string(),
        }
    }
}

/// A row as it lies on disk.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ColdRow {
    pub(crate) key: u64,
    /// `(last touch, touches)`.
    pub(crate) meta: (u32, u32),
    /// Changed since the last checkpoint took it.
    pub(crate) changed: bool,
    pub(crate) floats: Vec<f32>,
}

impl ColdRow {
    fn encode(key: u64, meta: (u32, u32), changed: bool, floats: &[f32], out: &mut Vec<u8>) {
        out.clear();
        out.reserve(HEADER + floats.len() * 4);
        out.extend_from_slice(&key.to_le_bytes());
        out.extend_from_slice(&meta.0.to_le_bytes());
        out.extend_from_slice(&meta.1.to_le_bytes());
        out.push(u8::from(changed));
        for f in floats {
            out.extend_from_slice(&f.to_le_bytes());
        }
    }

    /// The row `bytes` holds, if it is one of `row_len` floats.
    fn decode(bytes: &[u8], row_len: usize) -> Option<ColdRow> {
        if bytes.len() != HEADER + row_len * 4 {
            return None;
        }
        let u32_at = |at: usize| {
            u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
        };
        let mut key = [0u8; 8];
        key.copy_from_slice(&bytes[..8]);
        Some(ColdRow {
            key: u64::from_le_bytes(key),
            meta: (u32_at(8), u32_at(12)),
            changed: bytes[CHANGED_AT] != 0,
            floats: bytes[HEADER..]
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
        })
    }
}

/// One sparse table's rows on disk. The caller (the table's segments)
/// orders moves of a row between the tiers under the row's segment lock.
pub(crate) struct ColdRows {
    tier: Arc<DiskTier>,
    name: String,
    row_len: usize,
    /// Rows on disk.
    len: AtomicU64,
}

impl std::fmt::Debug for ColdRows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ColdRows")
            .field("table", &self.name)
            .field("rows", &self.len())
            .finish()
    }
}

type Rows<'a> = TableDefinition<'a, u64, &'static [u8]>;

impl ColdRows {
    fn def(&self) -> Rows<'_> {
        TableDefinition::new(&self.name)
    }

    /// Runs `body` on the table in one read transaction (`empty` when the
    /// table has no rows yet: redb makes it at its first write).
    fn reading<T>(
        &self,
        empty: impl FnOnce() -> T,
        body: impl FnOnce(&redb::ReadOnlyTable<u64, &'static [u8]>) -> Result<T, DiskError>,
    ) -> Result<T, DiskError> {
        let e = |e: redb::Error| self.tier.error(e);
        let txn = self.tier.db.begin_read().map_err(|x| e(x.into()))?;
        match txn.open_table(self.def()) {
            Ok(table) => body(&table),
            Err(redb::TableError::TableDoesNotExist(_)) => Ok(empty()),
            Err(x) => Err(e(x.into())),
        }
    }

    /// Runs `body` on the table in one write transaction, committed
    /// without `fsync` (see the module doc).
    fn writing<T>(
        &self,
        body: impl FnOnce(&mut redb::Table<'_, u64, &'static [u8]>) -> Result<T, redb::Error>,
    ) -> Result<T, DiskError> {
        let e = |e: redb::Error| self.tier.error(e);
        let mut txn = self.tier.db.begin_write().map_err(|x| e(x.into()))?;
        txn.set_durability(Durability::None)
            .map_err(|x| self.tier.error(x))?;
        let out = {
            let mut table = txn.open_table(self.def()).map_err(|x| e(x.into()))?;
            body(&mut table).map_err(e)?
        };
        txn.commit().map_err(|x| e(x.into()))?;
        Ok(out)
    }

    /// Rows on disk.
    pub(crate) fn len(&self) -> u64 {
        self.len.load(Ordering::Relaxed)
    }

    fn decode(&self, bytes: &[u8]) -> Result<ColdRow, DiskError> {
        ColdRow::decode(bytes, self.row_len).ok_or_else(|| {
            self.tier.error(format!(
                "a row of table {} is {} bytes, not the {} of a {}-float row",
                self.name,
                bytes.len(),
                HEADER + self.row_len * 4,
                self.row_len
            ))
        })
    }

    /// The rows of the mixed keys `hashes` that are on disk, in order
    /// (`None` where one is not), read without waiting for any writer.
    pub(crate) fn get_many(&self, hashes: &[u64]) -> Result<Vec<Option<ColdRow>>, DiskError> {
        self.reading(
            || vec![None; hashes.len()],
            |table| {
                (hashes.iter())
                    .map(|&h| match table.get(h).map_err(|x| self.tier.error(x))? {
                        Some(bytes) => self.decode(bytes.value()).map(Some),
                        None => Ok(None),
                    })
                    .collect()
            },
        )
    }

    /// Moves the rows of the mixed keys `hashes` that are on disk off it:
    /// returns them (in order, `None` where one is not) and deletes them
    /// in one commit (none when no key is on disk).
    pub(crate) fn take_many(&self, hashes: &[u64]) -> Result<Vec<Option<ColdRow>>, DiskError> {
        let found = self.get_many(hashes)?;
        let taken: Vec<u64> = (hashes.iter().zip(&found))
            .filter(|(_, row)| row.is_some())
            .map(|(&h, _)| h)
            .collect();
        self.remove(&taken)?;
        Ok(found)
    }

    /// Writes `rows` (`(mixed key, key, touch record, changed, floats)`)
    /// in one commit, replacing any row of the same key.
    pub(crate) fn put_many<'r>(
        &self,
        rows: impl IntoIterator<Item = (u64, u64, (u32, u32), bool, &'r [f32])>,
    ) -> Result<(), DiskError> {
        let added = self.writing(|table| {
            let (mut added, mut value) = (0, Vec::new());
            for (hash, key, meta, changed, floats) in rows {
                ColdRow::encode(key, meta, changed, floats, &mut value);
                added += u64::from(table.insert(hash, value.as_slice())?.is_none());
            }
            Ok(added)
        })?;
        self.len.fetch_add(added, Ordering::Relaxed);
        Ok(())
    }

    /// Deletes the rows of the mixed keys `hashes` in one commit. Returns
    /// how many were on disk.
    pub(crate) fn remove(&self, hashes: &[u64]) -> Result<u64, DiskError> {
        if hashes.is_empty() {
            return Ok(0);
        }
        let removed = self.writing(|table| {
            let mut removed = 0;
            for &h in hashes {
                removed += u64::from(table.remove(h)?.is_some());
            }
            Ok(removed)
        })?;
        self.len.fetch_sub(removed, Ordering::Relaxed);
        Ok(removed)
    }

    /// Hands every row whose mixed key lies in `range` to `each`, in key
    /// order, from one consistent read.
    pub(crate) fn for_range(
        &self,
        range: RangeInclusive<u64>,
        mut each: impl FnMut(ColdRow),
    ) -> Result<(), DiskError> {
        self.reading(
            || (),
            |table| {
                let e = |e: redb::StorageError| self.tier.error(e);
                for entry in table.range(range).map_err(e)? {
                    let (_, value) = entry.map_err(e)?;
                    each(self.decode(value.value())?);
                }
                Ok(())
            },
        )
    }

    /// Clears the changed mark of the rows of `hashes` in one commit.
    pub(crate) fn mark_unchanged(&self, hashes: &[u64]) -> Result<(), DiskError> {
        if hashes.is_empty() {
            return Ok(());
        }
        self.writing(|table| {
            for &h in hashes {
                let value = table.get(h)?.map(|v| v.value().to_vec());
                if let Some(mut value) = value
                    && value.len() > HEADER
                {
                    value[CHANGED_AT] = 0;
                    table.insert(h, value.as_slice())?;
                }
            }
            Ok(())
        })
    }

    /// Rows the store holds for this table, counted by redb (tests check
    /// the tier's own count against it).
    #[cfg(test)]
    pub(crate) fn stored(&self) -> u64 {
        use redb::ReadableTableMetadata;
        let Ok(txn) = self.tier.db.begin_read() else {
            return 0;
        };
        txn.open_table(self.def())
            .ok()
            .and_then(|t| t.len().ok())
            .unwrap_or(0)
    }
}

impl Drop for ColdRows {
    /// The table's rows go with it (a table replaced by a restore).
    fn drop(&mut self) {
        let dropped =
            (self.tier.db.begin_write().map_err(redb::Error::from)).and_then(|mut txn| {
                let _ = txn.set_durability(Durability::None);
                txn.delete_table(self.def())?;
                Ok(txn.commit()?)
            });
        if let Err(e) = dropped {
            tracing::warn!(table = %self.name, "could not delete a dropped table's disk rows: {e}");
        }
    }
}

#[cfg(test)]
mod tests;

/// A disk tier in a directory removed when dropped (tests only).
#[cfg(test)]
pub(crate) mod scratch {
    use std::sync::Arc;

    /// A tier with a 1 MiB page cache, and its directory (keep it alive
    /// as long as the tier).
    pub(crate) fn tier() -> (Dir, Arc<super::DiskTier>) {
        let dir = Dir::new();
        let tier = super::DiskTier::create(dir.path(), 0, 1 << 20).expect("a disk tier");
        (dir, tier)
    }

    pub(crate) struct Dir(std::path::PathBuf);
    impl Dir {
        pub(crate) fn new() -> Dir {
            static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Dir(std::env::temp_dir().join(format!("ps-tier-{}-{n}", std::process::id())))
        }
        pub(crate) fn path(&self) -> &std::path::Path {
            &self.0
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
