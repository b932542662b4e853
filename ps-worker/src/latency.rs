//! `Latencies`: a lock-free log-bucketed histogram of request durations, from
//! which a client reports quantiles (p50, p99) of its pulls and pushes.
//!
//! Buckets are 16 per power of two of microseconds (relative error under
//! 4.5%), from 1 µs to about 70 minutes; the quantile is the bucket's
//! geometric midpoint.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

const SUB: usize = 16;
const OCTAVES: usize = 32;

/// Durations recorded by many threads; quantiles read at any time.
#[derive(Debug)]
pub struct Latencies {
    buckets: Vec<AtomicU64>,
}

impl Default for Latencies {
    fn default() -> Self {
        Latencies {
            buckets: (0..SUB * OCTAVES).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

fn bucket_of(d: Duration) -> usize {
    let micros = d.as_secs_f64() * 1e6;
    if micros <= 1.0 {
        return 0;
    }
    ((micros.log2() * SUB as f64) as usize).min(SUB * OCTAVES - 1)
}

impl Latencies {
    /// Records one request.
    pub fn record(&self, d: Duration) {
        self.buckets[bucket_of(d)].fetch_add(1, Ordering::Relaxed);
    }

    /// Requests recorded.
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    /// The `q`-quantile (0..=1) in seconds; `None` before any request.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, n) in counts.iter().enumerate() {
            seen += n;
            if seen >= rank {
                let micros = 2f64.powf((i as f64 + 0.5) / SUB as f64);
                return Some(micros / 1e6);
            }
        }
        None
    }

    /// Adds every request recorded by `other`.
    pub fn merge(&self, other: &Latencies) {
        for (mine, theirs) in self.buckets.iter().zip(&other.buckets) {
            mine.fetch_add(theirs.load(Ordering::Relaxed), Ordering::Relaxed);
        }
    }

    /// Forgets every recorded request.
    pub fn reset(&self) {
        for b in &self.buckets {
            b.store(0, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_within_the_bucket_resolution() {
        let l = Latencies::default();
        assert_eq!(l.quantile(0.5), None);
        for ms in 1..=100u64 {
            l.record(Duration::from_millis(ms));
        }
        assert_eq!(l.count(), 100);
        let p50 = l.quantile(0.5).unwrap();
        let p99 = l.quantile(0.99).unwrap();
        assert!((p50 / 0.050 - 1.0).abs() < 0.05, "p50 {p50}");
        assert!((p99 / 0.099 - 1.0).abs() < 0.05, "p99 {p99}");
        l.reset();
        assert_eq!(l.count(), 0);
    }

    #[test]
    fn extreme_durations_land_in_the_end_buckets() {
        let l = Latencies::default();
        l.record(Duration::ZERO);
        l.record(Duration::from_secs(1 << 40));
        assert_eq!(l.count(), 2);
        assert!(l.quantile(0.0).unwrap() < 2e-6);
    }
}
