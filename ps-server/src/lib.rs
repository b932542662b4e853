//! One parameter-server shard.
//!
//! A push travels: [`service`] (decode, limits) -> [`store`] (validate, find
//! rows) -> [`optimizer`] (update the row in place).
//!
//! # Layout
//! - [`store`]: the shard's tables (sparse rows in slabs with a compact index,
//!   dense rows in blocks); transport-free.
//! - [`optimizer`]: SGD, Adagrad, Adam and FTRL-proximal on one row.
//! - [`dedup`]: the `(writer, seq)` pairs applied, so a retried push applies once.
//! - [`replication`]: primary-backup roles, write order, the stream to the backup.
//! - [`checkpoint`]: shard files written atomically with a checksum, and restore.
//! - [`service`]: the thin tonic adapter and its request [`Limits`](service::Limits).
//! - [`limits`]: a tower layer giving oversized messages their gRPC status.
//! - [`logging`]: stderr logging (text or JSON) with `RUST_LOG`, shared by both binaries.
//! - [`metrics`]: per-RPC outcome counts and latency histograms; the Prometheus endpoint.
//! - [`server`]: [`server::run`] binds the service to a listener until shutdown.

pub mod auth;
pub mod budget;
pub mod checkpoint;
pub mod clock;
pub mod dedup;
pub mod limits;
pub mod logging;
pub mod metrics;
pub mod optimizer;
pub mod replication;
pub mod server;
pub mod service;
pub mod store;

pub use server::{ServerConfig, run};
pub use service::Limits;
pub use store::Shard;
