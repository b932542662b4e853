//! Job-wide signals between workers in separate processes ("worker 0 has
//! loaded `init_from`", "worker 0 stopped early"), kept on the servers as
//! marker tables named per job, so no extra coordination service is needed.

use ps_common::config::JobConfig;
use ps_common::routing::fnv1a64;
use ps_common::{InitializerSpec, OptimizerSpec, PsError, TableKind, TableSpec};

use crate::client::PsClient;

/// A flag every worker of one job can raise and read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signal {
    table: String,
}

impl Signal {
    /// Signal `what` of `job`. Workers of the same job file derive the same
    /// name; another job on the same servers derives another.
    pub fn new(job: &JobConfig, what: &str) -> Signal {
        let id = fnv1a64(format!("{job:?}").as_bytes());
        Signal {
            table: format!("_ps.{what}.{id:016x}"),
        }
    }

    /// Raises the signal (idempotent).
    pub async fn raise(&self, client: &PsClient) -> Result<(), PsError> {
        client
            .create_table(&TableSpec {
                name: self.table.clone(),
                kind: TableKind::Dense {
                    rows: 1,
                    block_rows: 1,
                },
                dim: 1,
                initializer: InitializerSpec::Zeros,
                optimizer: OptimizerSpec::Sgd { lr: 1.0 },
                seed: 0,
            })
            .await
    }

    /// Whether some worker raised it (it exists on every shard).
    pub async fn is_raised(&self, client: &PsClient) -> Result<bool, PsError> {
        Ok(client
            .stats()
            .await?
            .iter()
            .all(|s| s.tables.iter().any(|t| t.name == self.table)))
    }
}
