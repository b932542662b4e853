//! Stateless training workers for the parameter-server system.
//!
//! A training step reads as one straight path: [`trainer`] pulls the
//! parameters of a batch through [`client::PsClient`] (de-duplicated by
//! [`dedup`], routed and fanned out to every shard), computes the model in
//! [`model`] on a [`backend`] (CPU or CUDA), and pushes the gradients back
//! asynchronously.
//!
//! # Layout
//! - [`client`]: `PsClient`: connect, create tables, pull, push, flush, stats.
//! - [`dedup`]: distinct keys of a batch; gather rows, sum gradients.
//! - [`cache`]: hot sparse rows kept for a few steps, their gradients summed meanwhile.
//! - [`data`]: streaming libsvm/libffm/Criteo readers, sharding, parse-ahead.
//! - [`backend`]: the compute-backend trait; CPU (ndarray) and CUDA (cudarc) implementations.
//! - [`model`]: LR, FM, DeepFM, Wide&Deep, DNN and multi-task/MMoE over server tables.
//! - [`synthetic`]: generated data with planted structure.
//! - [`metrics`]: logloss, AUC, accuracy.
//! - [`trainer`]: the training loop with pull prefetch, and evaluation.
//! - [`progress`]: a progress bar on terminals, periodic log lines elsewhere.
//! - [`resume`]: each worker's data position, kept on the servers for restarts.
//! - [`signal`]: job-wide flags between worker processes, kept on the servers.
//! - [`telemetry`]: where the workers of a process report (Prometheus metrics, progress bars); made by the binary, not global.
//! - [`cluster`]: `LocalCluster`, shards in process on loopback ports.
//! - [`job`]: whole jobs (`train`, `local`, `eval`).
//! - [`report`]: the [`report::Report`] a job ends in.
//! - [`serving`]: online predictions (`serve`): REST and gRPC, batching, a
//!   freshness-bounded row cache, serving bundles.

pub mod backend;
pub mod barrier;
pub mod cache;
pub mod client;
pub mod cluster;
pub mod consistency;
pub mod data;
pub mod dedup;
pub mod job;
pub mod latency;
pub mod metrics;
pub mod model;
pub mod progress;
pub mod report;
pub mod resume;
pub mod serving;
pub mod signal;
pub mod synthetic;
pub mod telemetry;
pub mod traffic;
pub mod trainer;

pub use client::{ClientConfig, PsClient};
pub use cluster::LocalCluster;
