//! Benchmarks of the parameter server (criterion benches under `benches/`,
//! the `ps-bench` binary).
//!
//! This library holds the workload generators the benches share, so every
//! bench draws keys the same way: [`zipf_keys`] and the [`ctr26`] workload
//! of `../shared/bench/ctr26.md`; and [`proc_status`], how the memory
//! benches read a process's resident set.

use anyhow::Context;
use ps_common::init::RowRng;
use ps_common::{InitializerSpec, OptimizerSpec, TableKind, TableSpec};

pub mod client_rows;
pub mod ctr26;
pub mod memory;
pub mod recovery;
pub mod serve;
pub mod stream;
pub mod throughput;
pub mod tier;

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

/// A size line (`VmRSS:`, `VmHWM:`, `RssAnon:`) of the status of process
/// `process` (a pid, or `self`), in bytes.
pub fn proc_status(process: &str, field: &str) -> anyhow::Result<u64> {
    let path = format!("/proc/{process}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    let kib = status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .with_context(|| format!("{path} has no {field} line"))?;
    Ok(kib * 1024)
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
