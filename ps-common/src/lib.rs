//! Everything a parameter-server process and its clients must agree on.
//!
//! This crate is the vocabulary shared by `ps-server` and `ps-worker`, plus
//! the process plumbing both binaries use (logging, the metrics endpoint),
//! so that neither reaches into the other for it.
//!
//! # Layout
//! - [`pb`]: the generated gRPC API (`proto/ps.proto`, package `ps.v1`).
//! - [`codec`]: the gRPC codec `pb` uses: prost's, each message encoded into one allocation.
//! - [`table`]: validated table specs ([`TableSpec`]), converted from and to
//!   the protobuf types at the boundary.
//! - [`ids`]: random ids for writers, servers and replication streams.
//! - [`lifecycle`]: a sparse table's admission and eviction policies.
//! - [`init`]: the deterministic row initializer, seeded by (table seed, key).
//! - [`names`]: the rules for table and checkpoint names, and how a refused one is quoted.
//! - [`prefetch`]: cache hints for batch code that touches memory at random places.
//! - [`routing`]: the one function that maps a key to its shard.
//! - [`wire`]: the little-endian `f32` codec for row values on the wire.
//! - [`config`]: the job file (TOML) that drives every way of running a job.
//! - [`error`]: [`PsError`] and its mapping to gRPC status codes.
//! - [`tls`]: TLS files (`--tls-cert`, `--tls-key`, `--tls-ca`) as rustls configurations.
//! - [`logging`]: stderr logging (text or JSON) with `RUST_LOG`, for both binaries.
//! - [`prometheus`]: the `GET /metrics` endpoint and the collectors' helpers.
//! - [`shutdown`]: the signals that stop a server process.
//! - [`coordinator`]: etcd as a job's coordinator (primaries, epochs, standbys).

pub mod auth;
pub mod codec;
pub mod config;
pub mod coordinator;
pub mod error;
pub mod http2;
pub mod ids;
pub mod init;
pub mod lifecycle;
pub mod logging;
pub mod memory;
pub mod names;
pub mod prefetch;
pub mod prometheus;
pub mod routing;
pub mod shutdown;
pub mod table;
pub mod tls;
pub mod wire;

/// Generated protobuf and gRPC types of package `ps.v1`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("ps.v1");
}

pub use error::PsError;
pub use lifecycle::Lifecycle;
pub use routing::ShardRouter;
pub use table::{InitializerSpec, OptimizerSpec, TableKind, TableSpec};
