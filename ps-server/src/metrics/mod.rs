//! Prometheus metrics of a shard: per-RPC outcome counts and latency
//! histograms recorded lock-free on the request path, and a collector
//! ([`ShardMetrics`]) that reads them, the server's counters and its tables
//! at scrape time. prometheus-client renders the text format;
//! [`ps_common::prometheus`] serves it for servers and workers alike.
//!
//! - [`counters`]: what the server counts (requests, rows, bytes, RPCs).

pub mod counters;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use ps_common::prometheus::{counter, gauge};

use crate::replication::Replication;
use crate::store::{Shard, TableStats};

pub use counters::{RequestCounters, ShardCounters};

/// The RPCs a shard serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rpc {
    /// `Describe`.
    Describe,
    /// `CreateTable`.
    CreateTable,
    /// `Pull`.
    Pull,
    /// `Push`.
    Push,
    /// `Stats`.
    Stats,
    /// `Checkpoint`.
    Checkpoint,
    /// `Assign`.
    Assign,
    /// `Clock`.
    Clock,
    /// `PullMany`.
    PullMany,
    /// `PushMany`.
    PushMany,
    /// `Replicate`.
    Replicate,
    /// `Promote`.
    Promote,
    /// `Join`.
    Join,
    /// `Lease`.
    Lease,
    /// `Follow`.
    Follow,
    /// `Tail`.
    Tail,
}

const RPCS: [(Rpc, &str); 16] = [
    (Rpc::Describe, "describe"),
    (Rpc::CreateTable, "create_table"),
    (Rpc::Pull, "pull"),
    (Rpc::Push, "push"),
    (Rpc::Stats, "stats"),
    (Rpc::Checkpoint, "checkpoint"),
    (Rpc::Assign, "assign"),
    (Rpc::Clock, "clock"),
    (Rpc::PullMany, "pull_many"),
    (Rpc::PushMany, "push_many"),
    (Rpc::Replicate, "replicate"),
    (Rpc::Promote, "promote"),
    (Rpc::Join, "join"),
    (Rpc::Lease, "lease"),
    (Rpc::Follow, "follow"),
    (Rpc::Tail, "tail"),
];

/// Upper bounds (seconds) of the latency histogram buckets.
const BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

#[derive(Debug, Default)]
struct RpcStats {
    ok: AtomicU64,
    errors: AtomicU64,
    /// Non-cumulative counts per bucket, plus one for +Inf.
    buckets: [AtomicU64; BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
}

/// Request outcomes and latencies of every RPC.
#[derive(Debug, Default)]
pub struct RpcMetrics {
    rpcs: [RpcStats; RPCS.len()],
}

impl RpcMetrics {
    /// Records one request.
    pub fn record(&self, rpc: Rpc, elapsed: Duration, ok: bool) {
        let stats = &self.rpcs[rpc as usize];
        let outcome = if ok { &stats.ok } else { &stats.errors };
        outcome.fetch_add(1, Ordering::Relaxed);
        let seconds = elapsed.as_secs_f64();
        let bucket = BUCKETS
            .iter()
            .position(|&b| seconds <= b)
            .unwrap_or(BUCKETS.len());
        stats.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        stats
            .sum_nanos
            .fetch_add(elapsed.as_nanos() as u64, Ordering::Relaxed);
    }

    /// Encodes `ps_requests_total{rpc,status}` and
    /// `ps_request_duration_seconds{rpc}`.
    fn encode(&self, encoder: &mut DescriptorEncoder) -> std::fmt::Result {
        let mut requests = encoder.encode_descriptor(
            "ps_requests",
            "Requests served, by RPC and outcome",
            None,
            MetricType::Counter,
        )?;
        for ((_, name), stats) in RPCS.iter().zip(&self.rpcs) {
            for (status, n) in [("ok", &stats.ok), ("error", &stats.errors)] {
                let labels = [("rpc", *name), ("status", status)];
                ConstCounter::new(n.load(Ordering::Relaxed))
                    .encode(requests.encode_family(&labels)?)?;
            }
        }
        let mut durations = encoder.encode_descriptor(
            "ps_request_duration_seconds",
            "Time to serve a request",
            None,
            MetricType::Histogram,
        )?;
        for ((_, name), stats) in RPCS.iter().zip(&self.rpcs) {
            let buckets: Vec<(f64, u64)> = BUCKETS
                .iter()
                .chain(std::iter::once(&f64::INFINITY))
                .zip(&stats.buckets)
                .map(|(&le, n)| (le, n.load(Ordering::Relaxed)))
                .collect();
            let count = buckets.iter().map(|(_, n)| n).sum();
            let sum = stats.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
            durations
                .encode_family(&[("rpc", *name)])?
                .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
        }
        Ok(())
    }
}

/// A shard's metrics, read at scrape time: request outcomes and
/// latencies, row and byte counters, each table's rows and bytes, and the
/// memory budget. Register it in the process's registry.
#[derive(Debug, Clone)]
pub struct ShardMetrics {
    /// The tables and their memory budget.
    pub shard: Arc<Shard>,
    /// What the server serving them counts.
    pub counters: Arc<ShardCounters>,
    /// The server's replication: a follower reports its lag.
    pub replication: Option<Arc<Replication>>,
}

impl Collector for ShardMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let shard = &self.shard;
        self.counters.rpcs.encode(&mut encoder)?;
        let c = &self.counters.requests;
        for (name, help, value) in [
            ("ps_rows_pulled", "Rows returned by pulls", &c.rows_pulled),
            ("ps_rows_pushed", "Rows updated by pushes", &c.rows_pushed),
            (
                "ps_pull_bytes",
                "Encoded bytes of pull requests and their answers",
                &c.pull_bytes,
            ),
            (
                "ps_push_bytes",
                "Encoded bytes of push requests and their answers",
                &c.push_bytes,
            ),
        ] {
            counter(&mut encoder, name, help, value.load(Ordering::Relaxed))?;
        }
        let tables = shard.table_stats();
        type Of = fn(&TableStats) -> u64;
        let families: [(&str, &str, MetricType, Of); 8] = [
            (
                "ps_table_rows",
                "Rows held by this shard, in memory and on its disk tier",
                MetricType::Gauge,
                |t| t.rows + t.rows_on_disk,
            ),
            (
                "ps_table_bytes",
                "Bytes of rows (weights and optimizer state)",
                MetricType::Gauge,
                |t| t.bytes,
            ),
            (
                "ps_table_rows_in_memory",
                "Rows held in memory",
                MetricType::Gauge,
                |t| t.rows,
            ),
            (
                "ps_table_rows_on_disk",
                "Rows held on the shard's disk tier (--disk-tier)",
                MetricType::Gauge,
                |t| t.rows_on_disk,
            ),
            (
                "ps_table_admitted_rows",
                "Ids given a row by the table's admission policy",
                MetricType::Counter,
                |t| t.admitted_rows,
            ),
            (
                "ps_table_filtered_pushes",
                "Pushed rows dropped because their id was not admitted",
                MetricType::Counter,
                |t| t.filtered_pushes,
            ),
            (
                "ps_table_evicted_rows",
                "Rows evicted (TTL, row cap or memory budget)",
                MetricType::Counter,
                |t| t.evicted_rows,
            ),
            (
                "ps_table_push_rows_hinted",
                "Pushed rows found where their pull found them, without an index lookup",
                MetricType::Counter,
                |t| t.hinted_rows,
            ),
        ];
        for (name, help, kind, of) in families {
            let mut family = encoder.encode_descriptor(name, help, None, kind)?;
            for t in &tables {
                let labels = [("table", t.spec.name.as_str())];
                match kind {
                    MetricType::Counter => {
                        ConstCounter::new(of(t)).encode(family.encode_family(&labels)?)?
                    }
                    _ => ConstGauge::new(of(t) as i64).encode(family.encode_family(&labels)?)?,
                }
            }
        }
        gauge(
            &mut encoder,
            "ps_memory_used_bytes",
            "Bytes the tables hold or have reserved, as the memory budget counts them",
            shard.budget.used() as f64,
        )?;
        let limit = shard.budget.limit();
        if limit != u64::MAX {
            gauge(
                &mut encoder,
                "ps_memory_budget_bytes",
                "The shard's memory budget (--memory-budget)",
                limit as f64,
            )?;
        }
        if let Some(lag) = self.replication.as_ref().and_then(|r| r.lag()) {
            gauge(
                &mut encoder,
                "ps_follower_lag_seconds",
                "A read replica's staleness: it held every write its primary had applied this long ago",
                lag.as_secs_f64(),
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::registry::Registry;

    fn render(shard: Arc<Shard>, counters: Arc<ShardCounters>) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(ShardMetrics {
            shard,
            counters,
            replication: None,
        }));
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &registry).unwrap();
        out
    }

    #[test]
    fn histograms_are_cumulative_and_count_outcomes() {
        let counters = Arc::new(ShardCounters::default());
        let m = &counters.rpcs;
        m.record(Rpc::Pull, Duration::from_micros(50), true);
        m.record(Rpc::Pull, Duration::from_millis(3), true);
        m.record(Rpc::Pull, Duration::from_secs(10), false);
        let out = render(Arc::new(Shard::new(0, 1)), counters);
        assert!(
            out.contains("ps_requests_total{rpc=\"pull\",status=\"ok\"} 2"),
            "{out}"
        );
        assert!(out.contains("ps_requests_total{rpc=\"pull\",status=\"error\"} 1"));
        assert!(
            out.contains("ps_request_duration_seconds_bucket{rpc=\"pull\",le=\"0.0001\"} 1"),
            "{out}"
        );
        assert!(out.contains("ps_request_duration_seconds_bucket{rpc=\"pull\",le=\"0.005\"} 2"));
        assert!(out.contains("ps_request_duration_seconds_bucket{rpc=\"pull\",le=\"+Inf\"} 3"));
        assert!(out.contains("ps_request_duration_seconds_count{rpc=\"pull\"} 3"));
        assert_eq!(
            out.matches("le=\"+Inf\"").count(),
            RPCS.len(),
            "one +Inf bucket per RPC"
        );
    }

    #[test]
    fn tables_and_the_budget_are_read_at_scrape_time() {
        let shard = Arc::new(Shard::new(0, 1));
        let spec = ps_common::TableSpec {
            name: "emb".into(),
            kind: ps_common::TableKind::Sparse,
            dim: 2,
            initializer: ps_common::InitializerSpec::Zeros,
            optimizer: ps_common::OptimizerSpec::sgd(1.0),
            seed: 0,
            lifecycle: Default::default(),
        };
        shard.create_table(spec).unwrap();
        shard.budget.set_limit(1 << 30);
        shard.pull("emb", &[1, 2, 3], &mut Vec::new()).unwrap();
        let out = render(shard, Arc::default());
        assert!(out.contains("ps_table_rows{table=\"emb\"} 3"), "{out}");
        assert!(out.contains("ps_table_bytes{table=\"emb\"} 24"), "{out}");
        assert!(
            out.contains("ps_table_rows_in_memory{table=\"emb\"} 3"),
            "{out}"
        );
        assert!(
            out.contains("ps_table_evicted_rows_total{table=\"emb\"} 0"),
            "{out}"
        );
        assert!(
            out.contains("ps_table_admitted_rows_total{table=\"emb\"} 0"),
            "{out}"
        );
        assert!(
            out.contains("ps_table_push_rows_hinted_total{table=\"emb\"} 0"),
            "{out}"
        );
        assert!(out.contains("ps_memory_budget_bytes 1073741824"), "{out}");
        assert!(out.contains("# TYPE ps_rows_pulled_total counter"), "{out}");
    }
}
