//! A model's parameters on their way to and from the servers: the pull of
//! a batch's rows (through the row cache when the job has one), the
//! updates a step's gradients make, and the push that sends them.

use std::sync::Arc;

use ps_common::PsError;
use ps_common::config::{DEFAULT_ROW_CACHE_ROWS, JobConfig};

use super::{Gradients, Model, Pulled, TableUse, Update, UpdateKind};
use crate::cache::{CachedTable, RowCache, hot_rows};
use crate::client::{PsClient, PushTable};
use crate::data::Batch;

/// Pushes `updates` asynchronously in one coalesced push
/// ([`PsClient::push_many`]); an update with no rows sends nothing.
pub async fn push_updates(client: &PsClient, updates: &[Update]) -> Result<(), PsError> {
    let tables: Vec<PushTable<'_>> = updates
        .iter()
        .filter(|u| !u.keys.is_empty())
        .map(|u| PushTable {
            table: &u.table,
            keys: &u.keys,
            grads: &u.values,
            lr_scale: u.lr_scale,
        })
        .collect();
    if tables.is_empty() {
        return Ok(());
    }
    client.push_many(&tables).await
}

impl Model {
    /// Pulls every row the batch needs, all tables in parallel.
    pub async fn pull(&self, client: &PsClient, batch: &Batch) -> Result<Pulled, PsError> {
        self.pull_through(client, batch, None).await
    }

    /// [`Model::pull`] for step `cache.1`, serving sparse rows from the
    /// row cache `cache.0` where it holds them fresh.
    pub async fn pull_through(
        &self,
        client: &PsClient,
        batch: &Batch,
        cache: Option<(&RowCache, u64)>,
    ) -> Result<Pulled, PsError> {
        self.pull_batch(client, batch, cache, true).await
    }

    /// The batch's plan and its sparse tables' rows (through `cache`, as
    /// in [`Model::pull_through`]); `dense` is left empty for
    /// [`Model::pull_dense`] (hybrid consistency pulls them apart).
    pub async fn pull_sparse(
        &self,
        client: &PsClient,
        batch: &Batch,
        cache: Option<(&RowCache, u64)>,
    ) -> Result<Pulled, PsError> {
        self.pull_batch(client, batch, cache, false).await
    }

    /// The batch's plan, its sparse rows (through `cache`) and, with
    /// `dense`, every dense table, pulled in parallel.
    async fn pull_batch(
        &self,
        client: &PsClient,
        batch: &Batch,
        cache: Option<(&RowCache, u64)>,
        dense: bool,
    ) -> Result<Pulled, PsError> {
        let (keys, plan) = self.plan(batch);
        let hot = cache.map_or_else(Vec::new, |_| hot_rows(&plan.entry_row, plan.unique));
        let dense_tables: &[TableUse] = if dense { &self.dense } else { &[] };
        let (sparse, dense) = tokio::try_join!(
            self.pull_sparse_rows(client, &keys, &hot, cache),
            self.pull_tables(client, dense_tables, &[])
        )?;
        Ok(Pulled {
            keys,
            plan,
            labels: batch.labels.clone(),
            sparse,
            dense,
            inputs: batch.dense.clone(),
            hot,
        })
    }

    /// The sparse tables' rows of `keys`, those at `hot` that `cache`
    /// holds fresh for its step taken from it.
    async fn pull_sparse_rows(
        &self,
        client: &PsClient,
        keys: &[u64],
        hot: &[u32],
        cache: Option<(&RowCache, u64)>,
    ) -> Result<Vec<Vec<f32>>, PsError> {
        let Some((cache, step)) = cache else {
            return self.pull_tables(client, &self.sparse, keys).await;
        };
        let lookup = cache.lookup(keys, hot, step);
        let pulled = if lookup.keys.is_empty() {
            vec![Vec::new(); self.sparse.len()]
        } else {
            self.pull_tables(client, &self.sparse, &lookup.keys).await?
        };
        Ok(cache.fill(lookup, keys, hot, pulled, step))
    }

    /// The job's row cache (`communication.row_cache_steps`), over this
    /// model's sparse tables; `None` when it is off or there are none.
    pub fn row_cache(&self, job: &JobConfig) -> Option<Arc<RowCache>> {
        let c = &job.communication;
        if c.row_cache_steps == 0 || self.sparse.is_empty() {
            return None;
        }
        let tables = self
            .sparse
            .iter()
            .map(|t| CachedTable {
                name: t.name.clone(),
                dim: t.dim,
                pushed: !self.frozen.contains(&t.name),
            })
            .collect();
        Some(Arc::new(RowCache::new(
            tables,
            c.row_cache_steps,
            c.row_cache_rows.unwrap_or(DEFAULT_ROW_CACHE_ROWS),
        )))
    }

    /// Pulls every dense table into `pulled.dense`.
    pub async fn pull_dense(&self, client: &PsClient, pulled: &mut Pulled) -> Result<(), PsError> {
        pulled.dense = self.pull_tables(client, &self.dense, &[]).await?;
        Ok(())
    }

    /// Rows of `tables` in one coalesced pull ([`PsClient::pull_many`]):
    /// the rows of `keys` for a sparse table, every row for a dense one.
    async fn pull_tables(
        &self,
        client: &PsClient,
        tables: &[TableUse],
        keys: &[u64],
    ) -> Result<Vec<Vec<f32>>, PsError> {
        let all_rows: Vec<Option<Vec<u64>>> = tables
            .iter()
            .map(|t| t.rows.map(|n| (0..n as u64).collect()))
            .collect();
        let requests: Vec<(&str, &[u64])> = tables
            .iter()
            .zip(&all_rows)
            .map(|(t, rows)| (t.name.as_str(), rows.as_deref().unwrap_or(keys)))
            .collect();
        if requests.is_empty() {
            return Ok(Vec::new());
        }
        client.pull_many(&requests).await
    }

    /// Pushes gradients asynchronously (see [`PsClient::push_unique`]),
    /// skipping frozen tables; `lr_scale` (the schedule's factor) scales
    /// every table's learning rate except the batch-norm statistics'.
    pub async fn push(
        &self,
        client: &PsClient,
        pulled: &Pulled,
        grads: Gradients,
        lr_scale: Option<f32>,
    ) -> Result<(), PsError> {
        push_updates(client, &self.updates(pulled, grads, lr_scale)).await
    }

    /// What a step pushes, table by table (frozen tables left out): the
    /// batch's keys for sparse tables, every row for dense ones.
    pub fn updates(&self, pulled: &Pulled, grads: Gradients, lr_scale: Option<f32>) -> Vec<Update> {
        let mut out = Vec::new();
        for (table, grad) in self.sparse.iter().zip(grads.sparse) {
            if !self.frozen.contains(&table.name) {
                out.push(Update {
                    table: table.name.clone(),
                    kind: UpdateKind::Sparse,
                    dim: table.dim,
                    keys: pulled.keys.clone(),
                    values: grad,
                    lr_scale,
                });
            }
        }
        for (table, grad) in self.dense.iter().zip(grads.dense) {
            if !self.frozen.contains(&table.name) {
                out.push(Update {
                    table: table.name.clone(),
                    kind: if table.statistic {
                        UpdateKind::Statistic
                    } else {
                        UpdateKind::Dense
                    },
                    dim: table.dim,
                    keys: (0..table.rows.unwrap_or(1) as u64).collect(),
                    values: grad,
                    lr_scale: if table.statistic { None } else { lr_scale },
                });
            }
        }
        out
    }
}
