//! Job-wide signals between workers in separate processes ("worker 0 has
//! loaded `init_from`", "worker 0 stopped early"), kept on the servers as
//! marker tables named per job, so no extra coordination service is needed.

use ps_common::config::JobConfig;
use ps_common::routing::fnv1a64;
use ps_common::{InitializerSpec, OptimizerSpec, PsError, TableKind, TableSpec};

use crate::client::PsClient;

/// The identity of `job`'s run that every worker derives alike, wherever
/// its files are: a hash of the model, the table specs and `train.run_id`.
pub fn run_identity(job: &JobConfig) -> u64 {
    let identity = format!(
        "{:?}|{:?}|{:?}",
        job.model,
        job.table_specs(),
        job.train.run_id
    );
    fnv1a64(identity.as_bytes())
}

/// A flag every worker of one job can raise and read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signal {
    table: String,
}

impl Signal {
    /// Signal `what` of `job`'s run. Workers of the same job and run id
    /// derive the same name wherever their files are (the identity is the
    /// model, the table specs and `train.run_id`, not paths); another job or
    /// run on the same servers derives another.
    pub fn new(job: &JobConfig, what: &str) -> Signal {
        Signal {
            table: format!("_ps.{what}.{:016x}", run_identity(job)),
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
                optimizer: OptimizerSpec::sgd(1.0),
                seed: 0,
                lifecycle: Default::default(),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn job(text: &str) -> JobConfig {
        JobConfig::from_toml(text, std::path::Path::new(".")).unwrap()
    }

    #[test]
    fn workers_agree_on_a_signal_wherever_their_files_are_but_runs_differ() {
        let base = crate::job::DEFAULT_JOB;
        let here = Signal::new(&job(base), "stop");
        let elsewhere = JobConfig::from_toml(base, std::path::Path::new("/mnt/jobs")).unwrap();
        assert_eq!(Signal::new(&elsewhere, "stop"), here);
        assert_ne!(Signal::new(&job(base), "init_from"), here);
        let mut rerun = job(base);
        rerun.train.run_id = Some("2".into());
        assert_ne!(Signal::new(&rerun, "stop"), here);
    }
}
