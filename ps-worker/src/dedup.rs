//! De-duplication of a batch's keys.
//!
//! A batch touches the same id many times (hot features). The client pulls
//! and pushes each distinct key once: [`UniqueKeys`] maps every occurrence to
//! its distinct key, gathers pulled rows back into occurrence order and sums
//! the gradients of repeated keys before they are sent.

use std::collections::HashMap;

use ps_common::routing::IdBuildHasher;

/// The distinct keys of a key list and where each occurrence maps.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UniqueKeys {
    /// Distinct keys, in order of first occurrence.
    pub keys: Vec<u64>,
    /// For occurrence `i` of the input, `keys[index[i]]` is its key.
    pub index: Vec<u32>,
}

impl UniqueKeys {
    /// De-duplicates `keys`.
    pub fn new(keys: &[u64]) -> Self {
        let mut position: HashMap<u64, u32, IdBuildHasher> =
            HashMap::with_capacity_and_hasher(keys.len(), IdBuildHasher::default());
        let mut unique = Vec::with_capacity(keys.len());
        let index = keys
            .iter()
            .map(|&k| {
                *position.entry(k).or_insert_with(|| {
                    unique.push(k);
                    (unique.len() - 1) as u32
                })
            })
            .collect();
        UniqueKeys {
            keys: unique,
            index,
        }
    }

    /// Number of occurrences (the input's length).
    pub fn occurrences(&self) -> usize {
        self.index.len()
    }

    /// Expands rows of the distinct keys (`keys.len() * dim`) to one row per occurrence.
    pub fn gather(&self, unique_rows: &[f32], dim: usize) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.index.len() * dim);
        for &u in &self.index {
            let start = u as usize * dim;
            out.extend_from_slice(&unique_rows[start..start + dim]);
        }
        out
    }

    /// Sums per-occurrence rows (`occurrences() * dim`) into one row per distinct key.
    pub fn sum(&self, rows: &[f32], dim: usize) -> Vec<f32> {
        let mut out = vec![0f32; self.keys.len() * dim];
        for (&u, row) in self.index.iter().zip(rows.chunks_exact(dim)) {
            let start = u as usize * dim;
            for (acc, &g) in out[start..start + dim].iter_mut().zip(row) {
                *acc += g;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicates_collapse_in_first_occurrence_order() {
        let u = UniqueKeys::new(&[9, 3, 9, 9, 1, 3]);
        assert_eq!(u.keys, [9, 3, 1]);
        assert_eq!(u.index, [0, 1, 0, 0, 2, 1]);
    }

    #[test]
    fn gather_and_sum_are_the_expansion_and_its_adjoint() {
        let u = UniqueKeys::new(&[5, 6, 5]);
        let rows = [1.0, 2.0, 3.0, 4.0]; // key 5 -> [1, 2], key 6 -> [3, 4]
        assert_eq!(u.gather(&rows, 2), [1.0, 2.0, 3.0, 4.0, 1.0, 2.0]);
        let grads = [1.0, 1.0, 0.5, 0.5, 2.0, 3.0];
        assert_eq!(u.sum(&grads, 2), [3.0, 4.0, 0.5, 0.5]);
    }

    #[test]
    fn an_empty_batch_has_no_keys() {
        let u = UniqueKeys::new(&[]);
        assert!(u.keys.is_empty() && u.index.is_empty());
        assert!(u.sum(&[], 4).is_empty());
    }
}
