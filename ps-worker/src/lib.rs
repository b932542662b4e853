//! Stateless training workers for the parameter-server system.
//!
//! A training step reads as one straight path: [`trainer`] pulls the
//! parameters of a batch through [`client::PsClient`] (de-duplicated by
//! [`dedup`], routed and fanned out to every shard), computes the model in
//! [`model`] on the CPU with ndarray, and pushes the gradients back
//! asynchronously.
//!
//! # Layout
//! - [`client`]: `PsClient`: connect, create tables, pull, push, flush, stats.
//! - [`dedup`]: distinct keys of a batch; gather rows, sum gradients.
//! - [`data`]: the streaming libsvm reader with per-worker sharding.
//! - [`model`]: sparse logistic regression (forward, backward).
//! - [`metrics`]: logloss, AUC, accuracy.
//! - [`trainer`]: the training loop with pull prefetch, and evaluation.
//! - [`cluster`]: `LocalCluster`, shards in process on loopback ports.
//! - [`job`]: whole jobs (`train`, `local`) and their [`job::Report`].

pub mod backend;
pub mod client;
pub mod cluster;
pub mod data;
pub mod dedup;
pub mod job;
pub mod metrics;
pub mod model;
pub mod trainer;

pub use client::{ClientConfig, PsClient};
pub use cluster::LocalCluster;
