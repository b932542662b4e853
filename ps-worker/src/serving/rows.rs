//! Where a served model's rows come from: parameter servers (through a
//! cache of hot rows with a freshness bound) or a bundle in memory.
//!
//! The cache keeps a row for at most `freshness`: a row older than that is
//! pulled again, so a prediction never uses a row older than the bound
//! (plus, on a read replica, the replica's own lag). It holds at most
//! `max_rows` rows; when full, rows past their freshness are swept, and
//! new rows are not kept until there is room.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use ps_common::PsError;

use super::ServeMetrics;
use super::bundle::BundleRows;
use crate::client::PsClient;
use crate::model::{Model, TableUse};

/// A source of rows.
#[derive(Debug)]
pub enum Rows {
    /// Pulled from servers (read replicas or primaries), through the cache.
    Servers {
        /// The connection to every shard, the model's tables registered.
        client: PsClient,
        /// Hot rows (`None`: every row is pulled).
        cache: Option<FreshRows>,
    },
    /// Held in memory from a serving bundle.
    Bundle(BundleRows),
}

/// The rows a batch needs: each sparse table's rows of `keys`, and every
/// row of each dense table, in the model's table order.
pub type Fetched = (Vec<Vec<f32>>, Vec<Vec<f32>>);

impl Rows {
    /// The rows of `keys` (distinct) for `model`'s sparse tables, and all
    /// rows of its dense tables.
    pub async fn fetch(
        &self,
        model: &Model,
        keys: &[u64],
        metrics: &ServeMetrics,
    ) -> Result<Fetched, PsError> {
        let dense_keys: Vec<Vec<u64>> = model
            .dense_tables()
            .iter()
            .map(|t| (0..t.rows.unwrap_or(1) as u64).collect())
            .collect();
        let tables: Vec<(&TableUse, &[u64])> = (model.sparse_tables().iter())
            .map(|t| (t, keys))
            .chain(
                model
                    .dense_tables()
                    .iter()
                    .zip(&dense_keys)
                    .map(|(t, k)| (t, k.as_slice())),
            )
            .collect();
        let mut all = match self {
            Rows::Bundle(bundle) => tables
                .iter()
                .map(|(t, keys)| bundle.rows(&t.name, keys))
                .collect::<Result<Vec<_>, PsError>>()?,
            Rows::Servers {
                client,
                cache: None,
            } => {
                let requests: Vec<(&str, &[u64])> =
                    tables.iter().map(|(t, k)| (t.name.as_str(), *k)).collect();
                client.pull_many(&requests).await?
            }
            Rows::Servers {
                client,
                cache: Some(cache),
            } => cache.fetch(client, &tables, metrics).await?,
        };
        let dense = all.split_off(model.sparse_tables().len());
        Ok((all, dense))
    }
}

/// A cached row: when it was pulled, and its weights.
type Held = (Instant, Box<[f32]>);

/// Hot rows, each kept for at most `freshness`.
#[derive(Debug)]
pub struct FreshRows {
    rows: DashMap<(u32, u64), Held>,
    /// Table names, their index in the keys above.
    tables: Mutex<Vec<String>>,
    freshness: Duration,
    max_rows: usize,
    /// When rows past their freshness were last swept (ms since `born`).
    swept_ms: AtomicU64,
    born: Instant,
}

impl FreshRows {
    /// A cache of at most `max_rows` rows, each used for `freshness`.
    pub fn new(freshness: Duration, max_rows: usize) -> FreshRows {
        FreshRows {
            rows: DashMap::new(),
            tables: Mutex::new(Vec::new()),
            freshness,
            max_rows,
            swept_ms: AtomicU64::new(0),
            born: Instant::now(),
        }
    }

    fn table_index(&self, name: &str) -> u32 {
        let mut tables = self.tables.lock().unwrap_or_else(|p| p.into_inner());
        match tables.iter().position(|t| t == name) {
            Some(i) => i as u32,
            None => {
                tables.push(name.to_string());
                (tables.len() - 1) as u32
            }
        }
    }

    /// The rows of `tables`: fresh ones from the cache, the others pulled
    /// in one call and kept.
    async fn fetch(
        &self,
        client: &PsClient,
        tables: &[(&TableUse, &[u64])],
        metrics: &ServeMetrics,
    ) -> Result<Vec<Vec<f32>>, PsError> {
        let now = Instant::now();
        let mut out: Vec<Vec<f32>> = Vec::with_capacity(tables.len());
        // Per table: its index here, and the positions and keys it misses.
        let mut missing: Vec<(u32, Vec<usize>, Vec<u64>)> = Vec::with_capacity(tables.len());
        let (mut hits, mut misses) = (0u64, 0u64);
        for (table, keys) in tables {
            let index = self.table_index(&table.name);
            let mut rows = vec![0.0f32; keys.len() * table.dim];
            let (mut positions, mut wanted) = (Vec::new(), Vec::new());
            for (i, &key) in keys.iter().enumerate() {
                match self.rows.get(&(index, key)) {
                    Some(entry)
                        if now.duration_since(entry.0) <= self.freshness
                            && entry.1.len() == table.dim =>
                    {
                        rows[i * table.dim..(i + 1) * table.dim].copy_from_slice(&entry.1);
                        hits += 1;
                    }
                    _ => {
                        positions.push(i);
                        wanted.push(key);
                        misses += 1;
                    }
                }
            }
            out.push(rows);
            missing.push((index, positions, wanted));
        }
        metrics.cache_hits.inc_by(hits);
        metrics.cache_misses.inc_by(misses);
        if misses == 0 {
            return Ok(out);
        }
        let requests: Vec<(&str, &[u64])> = (tables.iter().zip(&missing))
            .filter(|(_, (_, _, keys))| !keys.is_empty())
            .map(|((t, _), (_, _, keys))| (t.name.as_str(), keys.as_slice()))
            .collect();
        // Rows pulled now are as fresh as the pull's start.
        let pulled_at = Instant::now();
        let mut pulled = client.pull_many(&requests).await?.into_iter();
        self.make_room(pulled_at);
        for (((table, _), (index, positions, keys)), rows) in
            tables.iter().zip(&missing).zip(out.iter_mut())
        {
            if keys.is_empty() {
                continue;
            }
            let values = pulled.next().unwrap_or_default();
            let dim = table.dim;
            for (j, (&at, &key)) in positions.iter().zip(keys).enumerate() {
                let Some(row) = values.get(j * dim..(j + 1) * dim) else {
                    return Err(PsError::Internal(format!(
                        "table '{}': the servers answered {} values for {} rows of dim {dim}",
                        table.name,
                        values.len(),
                        keys.len()
                    )));
                };
                rows[at * dim..(at + 1) * dim].copy_from_slice(row);
                if self.rows.len() < self.max_rows {
                    self.rows.insert((*index, key), (pulled_at, row.into()));
                }
            }
        }
        Ok(out)
    }

    /// When full, drops the rows past their freshness (at most once per
    /// freshness period: a sweep walks every row).
    fn make_room(&self, now: Instant) {
        if self.rows.len() < self.max_rows {
            return;
        }
        let now_ms = now.duration_since(self.born).as_millis() as u64;
        let last = self.swept_ms.load(Ordering::Relaxed);
        let period = (self.freshness.as_millis() as u64).max(1);
        if now_ms.saturating_sub(last) < period
            || self
                .swept_ms
                .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        self.rows
            .retain(|_, (at, _)| now.duration_since(*at) <= self.freshness);
    }

    /// Rows held.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether no row is held.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}
