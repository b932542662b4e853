//! The worker side of the consistency models (`train.consistency`): when a
//! worker may pull, told by the job's clocks on shard 0
//! ([`ps_server::clock`]).
//!
//! Clocks tick twice per step: `2s + 1` once step `s` is pulled, `2s + 2`
//! once its pushes are acknowledged. So "every live worker has finished
//! step s - 1" is `min clock >= 2s`, and "every live worker has pulled step
//! s" is `min clock >= 2s + 1`.
//!
//! - `ssp` with staleness K >= 1 ([`Schedule::Ahead`]): the pull of step s
//!   is issued while step s - 1 computes (as in async training) and first
//!   waits for this worker's earlier pushes and for `min clock >= 2(s - K)`.
//! - `bsp`, or `ssp` with K = 0 ([`Schedule::Lockstep`]): before the pull of
//!   step s, every live worker has finished step s - 1; before anyone pushes
//!   step s, every live worker has pulled it. Each step reads exactly the
//!   updates of the steps before it, as one worker on the union of the
//!   batches would.
//! - `hybrid` ([`Schedule::Hybrid`]): sparse rows are pulled ahead with no
//!   wait; the dense tables are pulled in lockstep as under `bsp`.

use std::sync::atomic::{AtomicU64, Ordering};

use ps_common::PsError;
use ps_common::config::{Consistency, JobConfig};
use ps_common::pb;

use crate::client::PsClient;
use crate::signal::run_identity;

/// Longest one clock call waits on the server before it is renewed.
const MAX_WAIT_MS: u32 = 5_000;

/// How a worker's pulls are ordered against the others' pushes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    /// Pulls run one step ahead, at most `staleness` steps past the slowest.
    Ahead {
        /// K of SSP, >= 1.
        staleness: u64,
    },
    /// Every step in lockstep (BSP).
    Lockstep,
    /// Sparse tables ahead, dense tables in lockstep.
    Hybrid,
}

/// One worker's reports to a job's clocks on the servers (the `Clock`
/// RPC of shard 0); the gates here and [`crate::barrier`] tick their own.
#[derive(Debug, Clone)]
pub struct JobClock {
    client: PsClient,
    job: String,
    worker: u32,
    workers: u32,
    lease_ms: u32,
}

impl JobClock {
    /// Worker `rank` of `world` on the clocks of `job` (any name its
    /// workers agree on); a worker silent for `lease_ms` is presumed dead.
    pub fn new(client: &PsClient, job: String, rank: usize, world: usize, lease_ms: u32) -> Self {
        JobClock {
            client: client.clone(),
            job,
            worker: rank as u32,
            workers: world as u32,
            lease_ms: lease_ms.max(1),
        }
    }

    /// This worker's rank.
    pub fn worker(&self) -> u32 {
        self.worker
    }

    /// How long a silent worker stays live.
    pub fn lease(&self) -> std::time::Duration {
        std::time::Duration::from_millis(u64::from(self.lease_ms))
    }

    /// The client the clocks are reached through.
    pub fn client(&self) -> &PsClient {
        &self.client
    }

    /// Reports this worker at `clock` and returns once every live worker
    /// is at `wait_for` or past it (0: at once), or this one `finished`.
    pub async fn report(
        &self,
        clock: u64,
        wait_for: u64,
        finished: bool,
    ) -> Result<pb::ClockResponse, PsError> {
        let answer = self
            .client
            .clock(pb::ClockRequest {
                job: self.job.clone(),
                worker: self.worker,
                workers: self.workers,
                clock,
                wait_for,
                finished,
                lease_ms: self.lease_ms,
                max_wait_ms: MAX_WAIT_MS,
            })
            .await?;
        if !answer.expired.is_empty() {
            tracing::warn!(
                worker = self.worker,
                job = %self.job,
                expired = ?answer.expired,
                "workers presumed dead (lease ran out); not waiting for them"
            );
        }
        Ok(answer)
    }
}

/// One worker's view of the job's clocks.
#[derive(Debug)]
pub struct Gate {
    clock: JobClock,
    schedule: Schedule,
    max_staleness: AtomicU64,
}

impl Gate {
    /// The gate of worker `rank` of `world` for `job`; `None` for async jobs.
    pub fn for_job(client: &PsClient, job: &JobConfig, rank: usize, world: usize) -> Option<Gate> {
        let t = &job.train;
        let schedule = match (t.consistency, t.staleness.unwrap_or(0)) {
            (Consistency::Async, _) => return None,
            (Consistency::Ssp, k) if k >= 1 => Schedule::Ahead {
                staleness: k.into(),
            },
            (Consistency::Ssp | Consistency::Bsp, _) => Schedule::Lockstep,
            (Consistency::Hybrid, _) => Schedule::Hybrid,
        };
        Some(Gate::new(
            client,
            format!("{}.{:016x}", t.consistency.name(), run_identity(job)),
            rank,
            world,
            (t.worker_lease_seconds * 1000.0).round() as u32,
            schedule,
        ))
    }

    /// A gate on the clocks of `job` (any name its workers agree on).
    pub fn new(
        client: &PsClient,
        job: String,
        rank: usize,
        world: usize,
        lease_ms: u32,
        schedule: Schedule,
    ) -> Gate {
        Gate {
            clock: JobClock::new(client, job, rank, world, lease_ms),
            schedule,
            max_staleness: AtomicU64::new(0),
        }
    }

    /// This gate's schedule.
    pub fn schedule(&self) -> Schedule {
        self.schedule
    }

    /// Largest staleness a pull of this worker was released with: steps the
    /// slowest unfinished worker had not finished, counted back from the
    /// pulled step. Measured on the server's clocks of *every* unfinished
    /// worker, not only the live ones the wait is decided on, so a worker
    /// wrongly given up for dead (or a wait that was skipped) shows here.
    pub fn max_staleness(&self) -> u64 {
        self.max_staleness.load(Ordering::Relaxed)
    }

    async fn report(&self, clock: u64, wait_for: u64, finished: bool) -> Result<u64, PsError> {
        let answer = self.clock.report(clock, wait_for, finished).await?;
        Ok(answer.min_clock_unfinished)
    }

    /// Records the staleness of the pull of `step`, released when the
    /// slowest unfinished worker's clock was `slowest`.
    fn observe(&self, step: u64, slowest: u64) {
        let done = if slowest == u64::MAX {
            step
        } else {
            slowest / 2
        };
        self.max_staleness
            .fetch_max(step.saturating_sub(done), Ordering::Relaxed);
    }

    /// [`Schedule::Ahead`]: before the pull of `step`, issued while step
    /// `step - 1` computes: this worker's earlier pushes are acknowledged
    /// and every live worker has finished step `step - K - 1`.
    pub async fn ahead(&self, step: u64) -> Result<(), PsError> {
        let Schedule::Ahead { staleness } = self.schedule else {
            return Err(PsError::Internal(
                "Gate::ahead on a lockstep schedule".into(),
            ));
        };
        self.clock.client().flush().await?;
        let finished_steps = step.saturating_sub(1);
        let min = self
            .report(
                2 * finished_steps,
                2 * step.saturating_sub(staleness),
                false,
            )
            .await?;
        self.observe(step, min);
        Ok(())
    }

    /// Lockstep: before the pull of `step` (this worker's pushes of the
    /// step before were issued): every live worker has finished step `step - 1`.
    pub async fn before_pull(&self, step: u64) -> Result<(), PsError> {
        self.clock.client().flush().await?;
        let min = self.report(2 * step, 2 * step, false).await?;
        self.observe(step, min);
        Ok(())
    }

    /// Lockstep: after the pull of `step`, before its pushes: every live
    /// worker has pulled `step`.
    pub async fn after_pull(&self, step: u64) -> Result<(), PsError> {
        self.report(2 * step + 1, 2 * step + 1, false).await?;
        Ok(())
    }

    /// This worker is done: its pushes are acknowledged and nobody waits
    /// for it any more.
    pub async fn finish(&self) -> Result<(), PsError> {
        self.clock.client().flush().await?;
        self.report(u64::MAX, 0, true).await?;
        Ok(())
    }
}
