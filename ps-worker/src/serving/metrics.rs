//! What a serving process counts, for `/metrics`: request latency
//! histograms per API, the size and time of executed batches,
//! predictions, failures by kind, and the row cache's hits, misses and
//! background refreshes.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of one series (`api`, or `kind`).
type Labels = Vec<(&'static str, &'static str)>;

fn latency() -> Histogram {
    // 50 us .. ~3.3 s.
    Histogram::new(exponential_buckets(0.00005, 2.0, 17))
}

/// The serving metrics (cheap to clone: clones share the series).
#[derive(Debug, Clone)]
pub struct ServeMetrics {
    /// Time from a request's arrival to its answer, by `api` (http, grpc).
    pub requests: Family<Labels, Histogram, fn() -> Histogram>,
    /// Time to read an executed batch's rows and compute it.
    pub batch_seconds: Histogram,
    /// Instances per executed batch.
    pub batch_instances: Histogram,
    /// Instances predicted.
    pub predictions: Counter,
    /// Failed requests, by `kind` (bad_request, overloaded, rows, internal).
    pub errors: Family<Labels, Counter>,
    /// Rows served from the row cache.
    pub cache_hits: Counter,
    /// Rows pulled from the servers.
    pub cache_misses: Counter,
    /// Cached rows pulled again in the background before they expired.
    pub cache_refreshed: Counter,
}

impl Default for ServeMetrics {
    fn default() -> Self {
        ServeMetrics {
            requests: Family::new_with_constructor(latency),
            batch_seconds: latency(),
            batch_instances: Histogram::new(exponential_buckets(1.0, 2.0, 14)),
            predictions: Counter::default(),
            errors: Family::default(),
            cache_hits: Counter::default(),
            cache_misses: Counter::default(),
            cache_refreshed: Counter::default(),
        }
    }
}

impl ServeMetrics {
    /// Records a request of `api` answered after `seconds`, failed with
    /// `error` if it did.
    pub fn request(&self, api: &'static str, seconds: f64, error: Option<&'static str>) {
        self.requests
            .get_or_create(&vec![("api", api)])
            .observe(seconds);
        if let Some(kind) = error {
            self.refused(kind);
        }
    }

    /// Counts a failed request of `kind` without timing it (one refused
    /// before it was served: no token).
    pub fn refused(&self, kind: &'static str) {
        self.errors.get_or_create(&vec![("kind", kind)]).inc();
    }

    /// A registry holding every series.
    pub fn registry(&self) -> Registry {
        let mut registry = Registry::default();
        registry.register(
            "ps_serve_request_duration_seconds",
            "Time from a prediction request's arrival to its answer",
            self.requests.clone(),
        );
        registry.register(
            "ps_serve_batch_duration_seconds",
            "Time to read an executed batch's rows and compute its predictions",
            self.batch_seconds.clone(),
        );
        registry.register(
            "ps_serve_batch_instances",
            "Instances per executed batch",
            self.batch_instances.clone(),
        );
        registry.register(
            "ps_serve_predictions",
            "Instances predicted",
            self.predictions.clone(),
        );
        registry.register(
            "ps_serve_errors",
            "Failed prediction requests, by kind",
            self.errors.clone(),
        );
        registry.register(
            "ps_serve_cache_hits",
            "Rows served from the row cache",
            self.cache_hits.clone(),
        );
        registry.register(
            "ps_serve_cache_misses",
            "Rows pulled from the servers",
            self.cache_misses.clone(),
        );
        registry.register(
            "ps_serve_cache_refreshed_rows",
            "Cached rows pulled again in the background before they expired",
            self.cache_refreshed.clone(),
        );
        registry
    }
}
