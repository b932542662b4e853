//! `Clocks`: the workers' progress per job, for bounded-staleness (SSP) and
//! bulk-synchronous (BSP) training, with membership by leases.
//!
//! A worker reports its clock (a count in the job's own unit; the trainer
//! uses two ticks per step) and may wait until every *live* worker's clock
//! has reached a bound. A worker is live until it says it finished or its
//! lease runs out: it has not reported for `lease` and is not waiting here
//! right now. Ranks that never reported count from the job's first report,
//! so a worker that never starts delays the others by one lease, not for
//! ever. A worker presumed dead (or finished) that reports again is live
//! again, at the clock it reports: the latest report wins.
//!
//! Waits are bounded by the caller's `max_wait`; the answer says whether the
//! bound was reached, so a client can report again (which renews its lease)
//! and keep waiting.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ps_common::PsError;
use tokio::sync::Notify;

/// Largest number of workers one job may declare.
pub const MAX_WORKERS: u32 = 65_536;

/// Largest number of jobs one shard keeps clocks for.
pub const MAX_JOBS: usize = 1024;

#[derive(Debug, Clone, Copy)]
struct Member {
    clock: u64,
    last_seen: Instant,
    finished: bool,
    /// Calls of this worker waiting right now (a waiting worker is alive).
    waiting: u32,
}

#[derive(Debug)]
struct JobClocks {
    members: Vec<Member>,
    lease: Duration,
}

impl JobClocks {
    fn live(&self, i: usize, now: Instant) -> bool {
        let m = &self.members[i];
        !m.finished && (m.waiting > 0 || now.duration_since(m.last_seen) < self.lease)
    }

    /// The slowest live worker's clock (`u64::MAX` when none is live), and
    /// when the next live worker blocking `target` would expire.
    fn slowest(&self, target: u64, now: Instant) -> (u64, Option<Instant>) {
        let mut min = u64::MAX;
        let mut next_expiry: Option<Instant> = None;
        for (i, m) in self.members.iter().enumerate() {
            if !self.live(i, now) {
                continue;
            }
            min = min.min(m.clock);
            if m.clock < target && m.waiting == 0 {
                let at = m.last_seen + self.lease;
                next_expiry = Some(next_expiry.map_or(at, |n| n.min(at)));
            }
        }
        (min, next_expiry)
    }
}

/// One report of a worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// The job (its run id).
    pub job: String,
    /// This worker's rank.
    pub worker: u32,
    /// Workers in the job.
    pub workers: u32,
    /// This worker's clock.
    pub clock: u64,
    /// Return once every live worker's clock is at least this.
    pub wait_for: u64,
    /// This worker is done and holds nobody back any more.
    pub finished: bool,
    /// How long a silent worker stays live.
    pub lease: Duration,
}

/// The answer to a report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The slowest live worker's clock (`u64::MAX` if none is live).
    pub min_clock: u64,
    /// Whether `min_clock >= wait_for` (false: `max_wait` ran out first).
    pub reached: bool,
    /// Ranks presumed dead when the call returned.
    pub expired: Vec<u32>,
}

/// Undoes a worker's `waiting` mark when its call ends (or is dropped).
struct Waiting<'a> {
    clocks: &'a Clocks,
    job: &'a str,
    worker: usize,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if let Some(job) = self.clocks.lock().get_mut(self.job) {
            let m = &mut job.members[self.worker];
            m.waiting = m.waiting.saturating_sub(1);
            m.last_seen = Instant::now();
        }
        // Whether this worker is live may matter to the others' timers.
        self.clocks.changed.notify_waiters();
    }
}

/// Clocks of every job that reported to this shard.
#[derive(Debug, Default)]
pub struct Clocks {
    jobs: Mutex<HashMap<String, JobClocks>>,
    changed: Notify,
}

impl Clocks {
    /// Records `report` and waits (at most `max_wait`) until every live
    /// worker's clock is at least `report.wait_for`.
    pub async fn report(&self, report: Report, max_wait: Duration) -> Result<Answer, PsError> {
        self.record(&report)?;
        self.changed.notify_waiters();
        let deadline = tokio::time::Instant::now() + max_wait;
        // Marks this worker as waiting (so alive) until the call ends, even
        // if the caller goes away mid-wait.
        let mut waiting: Option<Waiting<'_>> = None;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let now = Instant::now();
            let next_expiry = {
                let mut jobs = self.lock();
                let job = jobs
                    .get_mut(&report.job)
                    .ok_or_else(|| PsError::Internal("job clocks vanished".into()))?;
                let (min, next_expiry) = job.slowest(report.wait_for, now);
                if min >= report.wait_for || tokio::time::Instant::now() >= deadline {
                    job.members[report.worker as usize].last_seen = now;
                    let expired = (0..job.members.len())
                        .filter(|&i| !job.live(i, now) && !job.members[i].finished)
                        .map(|i| i as u32)
                        .collect();
                    return Ok(Answer {
                        min_clock: min,
                        reached: min >= report.wait_for,
                        expired,
                    });
                }
                if waiting.is_none() {
                    job.members[report.worker as usize].waiting += 1;
                    waiting = Some(Waiting {
                        clocks: self,
                        job: &report.job,
                        worker: report.worker as usize,
                    });
                }
                next_expiry
            };
            let wake = next_expiry
                .map(|at| tokio::time::Instant::from_std(at).min(deadline))
                .unwrap_or(deadline);
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep_until(wake) => {}
            }
        }
    }

    fn record(&self, r: &Report) -> Result<(), PsError> {
        if r.job.is_empty() || r.job.len() > 256 {
            return Err(PsError::invalid(format!(
                "job name must be 1-256 bytes, got {}",
                r.job.len()
            )));
        }
        if r.workers == 0 || r.workers > MAX_WORKERS {
            return Err(PsError::invalid(format!(
                "workers must be in 1..={MAX_WORKERS}, got {}",
                r.workers
            )));
        }
        if r.worker >= r.workers {
            return Err(PsError::invalid(format!(
                "worker rank {} is not below workers = {}",
                r.worker, r.workers
            )));
        }
        if r.lease.is_zero() {
            return Err(PsError::invalid("lease must be positive"));
        }
        let now = Instant::now();
        let mut jobs = self.lock();
        if !jobs.contains_key(&r.job) && jobs.len() >= MAX_JOBS {
            return Err(PsError::ResourceExhausted(format!(
                "this shard already keeps clocks for {MAX_JOBS} jobs"
            )));
        }
        let job = jobs.entry(r.job.clone()).or_insert_with(|| JobClocks {
            members: vec![
                Member {
                    clock: 0,
                    last_seen: now,
                    finished: false,
                    waiting: 0,
                };
                r.workers as usize
            ],
            lease: r.lease,
        });
        if job.members.len() != r.workers as usize {
            return Err(PsError::invalid(format!(
                "job '{}' has {} workers, this report says {}",
                r.job,
                job.members.len(),
                r.workers
            )));
        }
        job.lease = r.lease;
        // The latest report wins: a worker reports in order, and one that
        // restarts (or a rerun of a finished job) starts over from its
        // report rather than from the old clock.
        let m = &mut job.members[r.worker as usize];
        m.clock = r.clock;
        m.last_seen = now;
        m.finished = r.finished;
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, JobClocks>> {
        self.jobs
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn report(worker: u32, clock: u64, wait_for: u64) -> Report {
        Report {
            job: "j".into(),
            worker,
            workers: 2,
            clock,
            wait_for,
            finished: false,
            lease: Duration::from_secs(30),
        }
    }

    #[tokio::test]
    async fn a_wait_ends_when_the_slowest_worker_catches_up() {
        let clocks = Arc::new(Clocks::default());
        clocks
            .report(report(1, 0, 0), Duration::ZERO)
            .await
            .unwrap();
        let waiter = {
            let clocks = Arc::clone(&clocks);
            tokio::spawn(async move {
                clocks
                    .report(report(0, 4, 4), Duration::from_secs(10))
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "worker 1 is at 0 < 4");
        clocks
            .report(report(1, 4, 0), Duration::ZERO)
            .await
            .unwrap();
        let answer = waiter.await.unwrap().unwrap();
        assert!(answer.reached);
        assert_eq!(answer.min_clock, 4);
    }

    #[tokio::test]
    async fn max_wait_bounds_a_wait_and_says_the_bound_was_not_reached() {
        let clocks = Clocks::default();
        clocks
            .report(report(1, 0, 0), Duration::ZERO)
            .await
            .unwrap();
        let answer = clocks
            .report(report(0, 2, 2), Duration::from_millis(30))
            .await
            .unwrap();
        assert!(!answer.reached);
        assert_eq!(answer.min_clock, 0);
        assert!(answer.expired.is_empty());
    }

    #[tokio::test]
    async fn finished_and_silent_workers_hold_nobody_back() {
        let clocks = Clocks::default();
        let finished = Report {
            finished: true,
            ..report(1, 0, 0)
        };
        clocks.report(finished, Duration::ZERO).await.unwrap();
        let answer = clocks
            .report(report(0, 9, 9), Duration::from_secs(5))
            .await
            .unwrap();
        assert!(answer.reached, "the finished worker is not waited for");
        // It reports again (a rerun under the same job name): waited for again.
        clocks
            .report(report(1, 0, 0), Duration::ZERO)
            .await
            .unwrap();
        let answer = clocks
            .report(report(0, 9, 9), Duration::from_millis(30))
            .await
            .unwrap();
        assert!(!answer.reached, "worker 1 is back at clock 0");

        // Worker 1 of job k never reports: it expires one lease after the
        // job's first report.
        let started = Instant::now();
        let lease = Duration::from_millis(200);
        let silent = Report {
            job: "k".into(),
            lease,
            ..report(0, 3, 3)
        };
        let answer = clocks.report(silent, Duration::from_secs(5)).await.unwrap();
        assert!(answer.reached);
        assert_eq!(answer.expired, [1]);
        assert!(started.elapsed() >= lease);
    }

    #[tokio::test]
    async fn bad_reports_are_refused_and_change_nothing() {
        let clocks = Clocks::default();
        let rank = Report {
            worker: 2,
            ..report(0, 0, 0)
        };
        assert!(clocks.report(rank, Duration::ZERO).await.is_err());
        let none = Report {
            workers: 0,
            ..report(0, 0, 0)
        };
        assert!(clocks.report(none, Duration::ZERO).await.is_err());
        clocks
            .report(report(0, 1, 0), Duration::ZERO)
            .await
            .unwrap();
        let other_size = Report {
            workers: 3,
            ..report(0, 5, 0)
        };
        let err = clocks.report(other_size, Duration::ZERO).await.unwrap_err();
        assert!(err.to_string().contains("has 2 workers"), "{err}");
        assert!(clocks.lock()["j"].members[0].clock == 1);
    }
}
