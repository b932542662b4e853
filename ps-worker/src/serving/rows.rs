//! Where a served model's rows come from: parameter servers (through a
//! cache of hot rows with a freshness bound) or a bundle in memory.
//!
//! The cache keeps a row for at most `freshness`: a row older than that is
//! pulled again, so a prediction never uses a row older than the bound
//! (plus, on a read replica, the replica's own lag). A row read when older
//! than half the bound is pulled again in the background (one refresh at a
//! time, at most [`MAX_REFRESH_ROWS`] rows), so hot rows are renewed before
//! they expire and a request waits only for rows it is the first to ask
//! for. It holds at most `max_rows` rows; when full, rows past their
//! freshness are swept, and new rows are not kept until there is room.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
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
        cache: Option<Arc<FreshRows>>,
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

/// Most rows one background refresh pulls.
pub const MAX_REFRESH_ROWS: usize = 1 << 16;

/// Hot rows, each kept for at most `freshness`.
#[derive(Debug)]
pub struct FreshRows {
    rows: DashMap<(u32, u64), Held>,
    /// Table names, their index in the keys above.
    tables: Mutex<Vec<String>>,
    freshness: Duration,
    /// A row read older than this is pulled again in the background.
    refresh_after: Duration,
    /// A background refresh is running.
    refreshing: AtomicBool,
    max_rows: usize,
    /// When rows past their freshness were last swept (ms since `born`).
    swept_ms: AtomicU64,
    born: Instant,
}

/// Rows of each table to pull again in the background: its name, index
/// here, dim, and keys.
type Aging = Vec<(String, u32, usize, Vec<u64>)>;

impl FreshRows {
    /// A cache of at most `max_rows` rows, each used for `freshness`.
    pub fn new(freshness: Duration, max_rows: usize) -> FreshRows {
        FreshRows {
            rows: DashMap::new(),
            tables: Mutex::new(Vec::new()),
            freshness,
            refresh_after: freshness / 2,
            refreshing: AtomicBool::new(false),
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
    /// in one call and kept; rows past half their freshness are pulled
    /// again in the background.
    async fn fetch(
        self: &Arc<Self>,
        client: &PsClient,
        tables: &[(&TableUse, &[u64])],
        metrics: &ServeMetrics,
    ) -> Result<Vec<Vec<f32>>, PsError> {
        let now = Instant::now();
        let mut out: Vec<Vec<f32>> = Vec::with_capacity(tables.len());
        // Per table: its index here, and the positions and keys it misses.
        let mut missing: Vec<(u32, Vec<usize>, Vec<u64>)> = Vec::with_capacity(tables.len());
        let (mut hits, mut misses) = (0u64, 0u64);
        let refresh = !self.refreshing.load(Ordering::Acquire);
        let mut aging: Aging = Vec::new();
        let mut aging_rows = 0;
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
                        if refresh
                            && aging_rows < MAX_REFRESH_ROWS
                            && now.duration_since(entry.0) > self.refresh_after
                        {
                            match aging.last_mut() {
                                Some((_, at, _, keys)) if *at == index => keys.push(key),
                                _ => aging.push((table.name.clone(), index, table.dim, vec![key])),
                            }
                            aging_rows += 1;
                        }
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
        if !aging.is_empty() {
            self.refresh_in_background(client, aging, metrics);
        }
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

    /// Pulls `aging` again on a task of its own, unless a refresh is
    /// running, and replaces the rows it finds still held by older pulls.
    fn refresh_in_background(
        self: &Arc<Self>,
        client: &PsClient,
        aging: Aging,
        metrics: &ServeMetrics,
    ) {
        if self.refreshing.swap(true, Ordering::AcqRel) {
            return;
        }
        /// The cache, for the refresh; lets the next refresh start however
        /// this one ends.
        struct Refreshing(Arc<FreshRows>);
        impl Drop for Refreshing {
            fn drop(&mut self) {
                self.0.refreshing.store(false, Ordering::Release);
            }
        }
        let cache = Refreshing(Arc::clone(self));
        let (client, metrics) = (client.clone(), metrics.clone());
        tokio::spawn(async move {
            let requests: Vec<(&str, &[u64])> = aging
                .iter()
                .map(|(name, _, _, keys)| (name.as_str(), keys.as_slice()))
                .collect();
            let pulled_at = Instant::now();
            let pulled = match client.pull_many(&requests).await {
                Ok(pulled) => pulled,
                Err(e) => {
                    // The rows expire as they would without a refresh.
                    tracing::debug!("background refresh of the row cache failed: {e}");
                    return;
                }
            };
            let mut refreshed = 0;
            for ((_, index, dim, keys), values) in aging.iter().zip(pulled) {
                if values.len() != keys.len() * dim {
                    continue;
                }
                for (&key, row) in keys.iter().zip(values.chunks_exact((*dim).max(1))) {
                    if let Some(mut held) = cache.0.rows.get_mut(&(*index, key))
                        && held.0 < pulled_at
                    {
                        *held = (pulled_at, row.into());
                        refreshed += 1;
                    }
                }
            }
            metrics.cache_refreshed.inc_by(refreshed);
        });
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::LocalCluster;
    use ps_common::config::JobConfig;
    use std::path::Path;

    /// A row read past half its freshness is pulled again in the
    /// background: a change on the servers shows before the row would
    /// have expired, without a request waiting for a pull.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_row_read_past_half_its_freshness_is_renewed_in_the_background() {
        let job = JobConfig::from_toml(crate::job::DEFAULT_JOB, Path::new(".")).unwrap();
        let model = Model::from_job(&job);
        let cluster = LocalCluster::start(2, Default::default()).await.unwrap();
        let client = cluster.client(&Default::default()).await.unwrap();
        for spec in job.table_specs() {
            client.create_table(&spec).await.unwrap();
        }
        let freshness = Duration::from_secs(4);
        let rows = Rows::Servers {
            client: client.clone(),
            cache: Some(Arc::new(FreshRows::new(freshness, 1 << 10))),
        };
        let metrics = ServeMetrics::default();
        let weight = |fetched: Fetched| fetched.0[0][0];
        client.assign("weights", &[7], &[0.5]).await.unwrap();
        let pulled = Instant::now();
        assert_eq!(
            weight(rows.fetch(&model, &[7], &metrics).await.unwrap()),
            0.5
        );
        client.assign("weights", &[7], &[-2.0]).await.unwrap();
        // Fresh and young: the cached row.
        assert_eq!(
            weight(rows.fetch(&model, &[7], &metrics).await.unwrap()),
            0.5
        );
        tokio::time::sleep(freshness / 2 + Duration::from_millis(200)).await;
        // Older than half the bound: still served, and renewed meanwhile.
        assert_eq!(
            weight(rows.fetch(&model, &[7], &metrics).await.unwrap()),
            0.5
        );
        let misses = metrics.cache_misses.get();
        let mut seen = 0.5;
        while seen != -2.0 && pulled.elapsed() < freshness - Duration::from_millis(300) {
            tokio::time::sleep(Duration::from_millis(20)).await;
            seen = weight(rows.fetch(&model, &[7], &metrics).await.unwrap());
        }
        assert_eq!(seen, -2.0, "the change showed before the row expired");
        assert!(pulled.elapsed() < freshness);
        assert_eq!(
            metrics.cache_misses.get(),
            misses,
            "no request pulled a row"
        );
        assert!(metrics.cache_refreshed.get() >= 1);
        cluster.shutdown().await.unwrap();
    }
}
