//! Prometheus plumbing shared by servers and workers: the `GET /metrics`
//! endpoint ([`http`]: hyper, with timeouts and a connection cap) and the
//! helpers collectors encode single values with.
//!
//! - [`http`]: the endpoint.

pub mod http;

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

pub use http::{EndpointLimits, listen, serve};

/// Encodes one unlabeled counter (`name` gets its `_total` suffix).
pub fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: u64,
) -> std::fmt::Result {
    ConstCounter::new(value).encode(encoder.encode_descriptor(
        name,
        help,
        None,
        MetricType::Counter,
    )?)
}

/// Encodes one unlabeled gauge.
pub fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: f64,
) -> std::fmt::Result {
    ConstGauge::new(value).encode(encoder.encode_descriptor(name, help, None, MetricType::Gauge)?)
}
