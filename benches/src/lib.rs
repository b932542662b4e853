//! Benchmarks of the parameter server (criterion benches under `benches/`,
//! the `ps-bench` binary).
//!
//! This library holds the workload generators the benches share, so every
//! bench draws keys the same way: [`zipf_keys`] and the [`ctr26`] workload
//! of `../shared/bench/ctr26.md`.

use ps_common::init::RowRng;
use ps_common::{InitializerSpec, OptimizerSpec, TableKind, TableSpec};

pub mod ctr26;
pub mod memory;
pub mod recovery;
pub mod stream;
pub mod throughput;

/// The sparse table the store benches fill: `emb`, `dim` weights drawn
/// from N(0, 0.01), updated by `optimizer`.
pub fn emb_table(dim: u32, optimizer: OptimizerSpec) -> TableSpec {
    TableSpec {
        name: "emb".into(),
        kind: TableKind::Sparse,
        dim,
        initializer: InitializerSpec::Normal {
            mean: 0.0,
            std: 0.01,
        },
        optimizer,
        seed: 1,
        lifecycle: Default::default(),
    }
}

/// `n` ids drawn log-uniformly from `[0, range)` (close to Zipf(1): a few
/// ids are very hot), as the ctr26 workload draws them.
pub fn zipf_keys(n: usize, range: u64, seed: u64) -> Vec<u64> {
    let mut rng = RowRng::new(seed, 0);
    let range_f = range as f64;
    (0..n)
        .map(|_| {
            let u = rng.next_f64();
            (((range_f + 1.0).powf(u) - 1.0) as u64).min(range.saturating_sub(1))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zipf_keys_stay_in_range_and_favour_small_ids() {
        let keys = zipf_keys(100_000, 1000, 1);
        assert!(keys.iter().all(|&k| k < 1000));
        let small = keys.iter().filter(|&&k| k < 10).count();
        let large = keys.iter().filter(|&&k| (990..1000).contains(&k)).count();
        assert!(small > 20 * large.max(1), "small {small}, large {large}");
    }
}
