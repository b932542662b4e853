//! [`EpochBarrier`]: the consistent point where an epoch's validation reads
//! the model. Every worker's pushes of the epoch are applied and none of
//! the next epoch's, so the per-epoch AUCs (and the best epoch, early
//! stopping and `best_checkpoint` decided on them) measure one model, the
//! one the checkpoints written there (`best_checkpoint`,
//! `epoch_checkpoint`) hold.
//!
//! It runs on the servers' job clocks (the `Clock` RPC of shard 0), as the
//! consistency gates do, on clocks of its own: after epoch `e` a worker
//! flushes its pushes and reports `2e`; worker 0 waits for every live
//! worker at `2e`, validates (renewing its lease meanwhile), then reports
//! `2e + 1`, which the others wait for. A worker whose lease runs out is
//! not waited for.

use ps_common::PsError;
use ps_common::config::{Consistency, JobConfig};
use tokio::runtime::Handle;

use crate::client::PsClient;
use crate::consistency::JobClock;
use crate::signal::run_identity;

/// Whether worker 0 has work at the end of each epoch: validation, or a
/// per-epoch checkpoint.
pub fn ends_epochs(job: &JobConfig) -> bool {
    job.data.validation.is_some() || job.train.epoch_checkpoint.is_some()
}

/// One worker's part in the end-of-epoch barrier.
#[derive(Debug, Clone)]
pub struct EpochBarrier {
    clock: JobClock,
}

impl EpochBarrier {
    /// The barrier of worker `rank` of `world`; `None` when nothing needs
    /// it: a single worker, nothing to do at an epoch's end, or a
    /// consistency model whose clocks order the epochs already (`bsp`: no
    /// worker pushes a step worker 0 has not pulled; `ssp`: the others run
    /// at most `staleness` steps ahead of validation; a barrier there would
    /// also hold a worker whose last step the others wait for).
    pub fn for_job(client: &PsClient, job: &JobConfig, rank: usize, world: usize) -> Option<Self> {
        let asynchronous = job.train.consistency == Consistency::Async;
        (ends_epochs(job) && world > 1 && asynchronous).then(|| EpochBarrier {
            clock: JobClock::new(
                client,
                format!("epochs.{:016x}", run_identity(job)),
                rank,
                world,
                (job.train.worker_lease_seconds * 1000.0).round() as u32,
            ),
        })
    }

    /// This worker trained `epoch`: flushes its pushes, then worker 0
    /// waits until every worker has, and the others until worker 0 has
    /// validated.
    pub async fn trained(&self, epoch: u64) -> Result<(), PsError> {
        self.clock.client().flush().await?;
        let at = if self.clock.worker() == 0 {
            2 * epoch
        } else {
            2 * epoch + 1
        };
        self.clock.report(at, at, false).await.map(drop)
    }

    /// Worker 0: runs `validate` (on this thread, which must not be a
    /// runtime worker) with its lease renewed meanwhile, then releases the
    /// others into the next epoch.
    pub fn validating<T>(
        &self,
        runtime: &Handle,
        epoch: u64,
        validate: impl FnOnce() -> T,
    ) -> Result<T, PsError> {
        let clock = self.clock.clone();
        let renew = runtime.spawn(async move {
            let every = clock.lease() / 3;
            loop {
                tokio::time::sleep(every).await;
                if let Err(e) = clock.report(2 * epoch, 0, false).await {
                    tracing::warn!("renewing the lease while validating: {e}");
                }
            }
        });
        let result = validate();
        renew.abort();
        runtime.block_on(self.clock.report(2 * epoch + 1, 0, false))?;
        Ok(result)
    }

    /// This worker is done: nobody waits for it any more.
    pub async fn finish(&self) -> Result<(), PsError> {
        self.clock.report(u64::MAX, 0, true).await.map(drop)
    }
}
