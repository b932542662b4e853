//! One parameter-server shard.
//!
//! A push travels: [`service`] (the gRPC call) -> [`request`] (decode and
//! check, once) -> [`writer`] (order, claim its `(writer, seq)`, queue for
//! the backup) -> [`store`] (validate against the table, find rows) ->
//! [`optimizer`] (update the row in place). A backup's writes take the same
//! path from [`request`] on.
//!
//! # Layout
//! - [`service`]: the thin tonic adapter.
//! - [`request`]: requests decoded and checked into typed reads and writes,
//!   against the request [`Limits`].
//! - [`writer`]: the one apply of a write, on a primary and a backup alike.
//! - [`store`]: the shard's tables (sparse rows in slabs with a compact index,
//!   dense rows in blocks); transport-free.
//! - [`optimizer`]: SGD, Adagrad, Adam and FTRL-proximal on one row.
//! - [`evictor`]: the background passes that keep tables with eviction
//!   within their TTL, row cap and the memory budget, as replicated writes.
//! - [`dedup`]: the `(writer, seq)` pairs applied, so a retried push applies once.
//! - [`replication`]: primary-backup roles, write order, the stream to the backup,
//!   the follower log.
//! - [`coordination`]: a server's part in a job coordinated by etcd (lease,
//!   join or restore at start, standby promotion).
//! - [`follower`]: a read replica's loop: snapshot, then tail the primary's log.
//! - [`checkpoint`]: shard files written atomically with a checksum, and restore.
//! - [`limits`]: a tower layer giving oversized messages their gRPC status.
//! - [`metrics`]: what the server counts (requests, rows, bytes, RPC latencies), as a Prometheus collector.
//! - [`server`]: [`server::run`] binds the service to a listener until shutdown.

pub mod auth;
pub mod budget;
pub mod checkpoint;
pub mod clock;
pub mod coordination;
pub mod dedup;
pub mod evictor;
pub mod follower;
pub mod limits;
pub mod metrics;
pub mod optimizer;
pub mod replication;
pub mod request;
pub mod server;
pub mod service;
pub mod store;
pub mod writer;

pub use request::Limits;
pub use server::{ServerConfig, run};
pub use store::Shard;
