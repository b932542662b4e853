//! `Holdback`: the gradients a worker keeps instead of pushing, to move
//! fewer bytes (`[communication]`), with the kept part carried into later
//! pushes so that nothing is lost, only delayed (error feedback).
//!
//! - Significance filter (`significance_threshold`, sparse tables): a row
//!   is pushed once some component of its accumulated gradient reaches the
//!   threshold; below it, the row's gradient is added to a residual here.
//! - Top-k (`dense_top_k`, dense tables): each step pushes the fraction k of
//!   a table's rows with the largest accumulated L2 norm and keeps the rest.
//!
//! Batch-norm statistics are never held back. [`Holdback::drain`] returns
//! every residual, for the worker to push when it finishes.
//!
//! [`push_step`] is the one way a step's gradients leave the worker: the
//! row cache ([`crate::cache`]) sums those of the rows it holds, then the
//! filters here apply to the rest.

use std::collections::HashMap;

use ps_common::PsError;
use ps_common::config::JobConfig;

use crate::cache::RowCache;
use crate::client::PsClient;
use crate::model::{Update, UpdateKind, push_updates};

/// A step as the row cache sees it.
#[derive(Debug, Clone, Copy)]
pub struct CachedStep<'a> {
    /// The worker's row cache.
    pub cache: &'a RowCache,
    /// The step.
    pub step: u64,
    /// The rows the cache covers this step ([`crate::model::Pulled::hot`]).
    pub hot: &'a [u32],
}

/// Pushes a step's `updates`, less the gradients of rows the row cache
/// holds (plus the sums of rows whose time there ends), less what
/// `holdback` keeps, plus what it releases.
pub async fn push_step(
    client: &PsClient,
    mut updates: Vec<Update>,
    cache: Option<CachedStep<'_>>,
    holdback: Option<&mut Holdback>,
) -> Result<(), PsError> {
    if let Some(c) = cache {
        c.cache.hold(&mut updates, c.hot, c.step);
    }
    if let Some(h) = holdback {
        h.apply(&mut updates);
    }
    push_updates(client, &updates).await
}

/// Residual gradients of one worker.
#[derive(Debug, Default)]
pub struct Holdback {
    threshold: Option<f32>,
    top_k: Option<f32>,
    /// Sparse tables: row -> accumulated gradient not yet pushed.
    sparse: HashMap<String, HashMap<u64, Box<[f32]>>>,
    /// Dense tables: dim and the accumulated gradient of every row.
    dense: HashMap<String, (usize, Vec<f32>)>,
    /// Rows offered by the model and rows actually pushed, for reports.
    rows_offered: u64,
    rows_pushed: u64,
}

impl Holdback {
    /// The job's filters; `None` when it sets neither.
    pub fn for_job(job: &JobConfig) -> Option<Holdback> {
        let c = &job.communication;
        (c.significance_threshold.is_some() || c.dense_top_k.is_some())
            .then(|| Holdback::new(c.significance_threshold, c.dense_top_k))
    }

    /// Filters with a significance threshold and/or a dense top-k fraction.
    pub fn new(threshold: Option<f32>, top_k: Option<f32>) -> Holdback {
        Holdback {
            threshold,
            top_k,
            ..Holdback::default()
        }
    }

    /// Rows the model asked to push and rows pushed, so far.
    pub fn rows(&self) -> (u64, u64) {
        (self.rows_offered, self.rows_pushed)
    }

    /// Keeps back what the filters hold and adds earlier residuals to what
    /// goes out.
    pub fn apply(&mut self, updates: &mut [Update]) {
        for u in updates.iter_mut() {
            self.rows_offered += u.keys.len() as u64;
            match (u.kind, self.threshold, self.top_k) {
                (UpdateKind::Sparse, Some(threshold), _) => self.filter_sparse(u, threshold),
                (UpdateKind::Dense, _, Some(k)) => self.top_k_dense(u, k),
                _ => {}
            }
            self.rows_pushed += u.keys.len() as u64;
        }
    }

    fn filter_sparse(&mut self, u: &mut Update, threshold: f32) {
        let dim = u.dim;
        let residual = self.sparse.entry(u.table.clone()).or_default();
        let (mut keys, mut values) = (Vec::new(), Vec::new());
        for (&key, grad) in u.keys.iter().zip(u.values.chunks_exact(dim)) {
            let acc: Box<[f32]> = match residual.remove(&key) {
                Some(mut r) => {
                    r.iter_mut().zip(grad).for_each(|(r, g)| *r += g);
                    r
                }
                None => grad.into(),
            };
            if acc.iter().any(|v| v.abs() >= threshold) {
                keys.push(key);
                values.extend_from_slice(&acc);
            } else {
                residual.insert(key, acc);
            }
        }
        (u.keys, u.values) = (keys, values);
    }

    fn top_k_dense(&mut self, u: &mut Update, k: f32) {
        let dim = u.dim;
        let (_, acc) = self
            .dense
            .entry(u.table.clone())
            .or_insert_with(|| (dim, vec![0.0; u.values.len()]));
        if acc.len() != u.values.len() {
            *acc = vec![0.0; u.values.len()];
        }
        acc.iter_mut().zip(&u.values).for_each(|(a, g)| *a += g);
        let rows = u.keys.len();
        let keep = ((rows as f32 * k).ceil() as usize).clamp(1, rows.max(1));
        let norm = |r: usize| {
            acc[r * dim..(r + 1) * dim]
                .iter()
                .map(|v| v * v)
                .sum::<f32>()
        };
        let mut order: Vec<usize> = (0..rows).collect();
        if keep < rows {
            order.select_nth_unstable_by(keep - 1, |&a, &b| norm(b).total_cmp(&norm(a)));
            order.truncate(keep);
            order.sort_unstable();
        }
        let (mut keys, mut values) = (Vec::with_capacity(keep), Vec::with_capacity(keep * dim));
        for r in order.into_iter().filter(|&r| r < rows) {
            keys.push(u.keys[r]);
            let row = &mut acc[r * dim..(r + 1) * dim];
            values.extend_from_slice(row);
            row.iter_mut().for_each(|v| *v = 0.0);
        }
        (u.keys, u.values) = (keys, values);
    }

    /// Every residual as updates (at `lr_scale`), leaving nothing held.
    pub fn drain(&mut self, lr_scale: Option<f32>) -> Vec<Update> {
        let mut out = Vec::new();
        for (table, rows) in self.sparse.drain() {
            let Some(dim) = rows.values().next().map(|r| r.len()) else {
                continue;
            };
            let mut keys: Vec<u64> = rows.keys().copied().collect();
            keys.sort_unstable();
            let values = keys.iter().flat_map(|k| rows[k].iter().copied()).collect();
            out.push(Update {
                table,
                kind: UpdateKind::Sparse,
                dim,
                keys,
                values,
                lr_scale,
            });
        }
        for (table, (dim, acc)) in self.dense.drain() {
            out.push(Update {
                table,
                kind: UpdateKind::Dense,
                dim,
                keys: (0..(acc.len() / dim.max(1)) as u64).collect(),
                values: acc,
                lr_scale,
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sparse(keys: &[u64], values: &[f32]) -> Update {
        Update {
            table: "emb".into(),
            kind: UpdateKind::Sparse,
            dim: 2,
            keys: keys.to_vec(),
            values: values.to_vec(),
            lr_scale: None,
        }
    }

    #[test]
    fn small_sparse_gradients_wait_until_their_sum_is_significant() {
        let mut h = Holdback::new(Some(0.5), None);
        let mut step = [sparse(&[1, 2], &[0.3, 0.0, 0.9, -0.1])];
        h.apply(&mut step);
        assert_eq!(step[0].keys, [2], "row 1 (0.3) is held back");
        assert_eq!(step[0].values, [0.9, -0.1]);
        let mut step = [sparse(&[1], &[0.3, 0.1])];
        h.apply(&mut step);
        assert_eq!(step[0].keys, [1], "0.3 + 0.3 reaches 0.5");
        assert!((step[0].values[0] - 0.6).abs() < 1e-6);
        assert!((step[0].values[1] - 0.1).abs() < 1e-6);
        assert_eq!(h.rows(), (3, 2));
        assert!(h.drain(None).is_empty(), "nothing left");
    }

    #[test]
    fn dense_top_k_pushes_the_largest_rows_and_keeps_the_rest_for_later() {
        let mut h = Holdback::new(None, Some(0.5));
        let dense = |values: &[f32]| Update {
            table: "w".into(),
            kind: UpdateKind::Dense,
            dim: 1,
            keys: vec![0, 1, 2, 3],
            values: values.to_vec(),
            lr_scale: None,
        };
        let mut step = [dense(&[0.1, -3.0, 0.2, 2.0])];
        h.apply(&mut step);
        assert_eq!(step[0].keys, [1, 3]);
        assert_eq!(step[0].values, [-3.0, 2.0]);
        let mut step = [dense(&[0.1, 0.0, 0.2, 0.0])];
        h.apply(&mut step);
        assert_eq!(step[0].keys, [0, 2], "the kept rows accumulated");
        assert!((step[0].values[0] - 0.2).abs() < 1e-6);
        assert!((step[0].values[1] - 0.4).abs() < 1e-6);
        let left = h.drain(None);
        assert_eq!(left.len(), 1);
        assert!(left[0].values.iter().all(|&v| v == 0.0));
    }

    #[test]
    fn pushed_plus_held_equals_every_gradient_given() {
        let mut h = Holdback::new(Some(1.0), None);
        let mut pushed = HashMap::<u64, f32>::new();
        let mut given = HashMap::<u64, f32>::new();
        for step in 0..50u64 {
            let keys: Vec<u64> = (0..5).map(|i| (step * 7 + i * 3) % 11).collect();
            let values: Vec<f32> = keys.iter().flat_map(|&k| [k as f32 * 0.05, -0.2]).collect();
            for (k, v) in keys.iter().zip(values.chunks(2)) {
                *given.entry(*k).or_default() += v[0];
            }
            let mut u = [sparse(&keys, &values)];
            h.apply(&mut u);
            for (k, v) in u[0].keys.iter().zip(u[0].values.chunks(2)) {
                *pushed.entry(*k).or_default() += v[0];
            }
        }
        for u in h.drain(None) {
            for (k, v) in u.keys.iter().zip(u.values.chunks(2)) {
                *pushed.entry(*k).or_default() += v[0];
            }
        }
        for (k, g) in given {
            assert!(
                (pushed[&k] - g).abs() < 1e-4,
                "row {k}: {} vs {g}",
                pushed[&k]
            );
        }
    }
}
