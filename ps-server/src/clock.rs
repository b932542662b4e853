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
//!
//! Memory is bounded and returned: a job holds one entry per rank that
//! reported (not per declared rank), at most [`MAX_JOBS`] jobs and
//! [`MAX_MEMBERS`] reported ranks are kept, and a job's clocks are freed
//! when its last rank finishes or when no rank is live any more.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ps_common::PsError;
use tokio::sync::Notify;

/// Largest number of workers one job may declare.
pub const MAX_WORKERS: u32 = 65_536;

/// Largest number of jobs one shard keeps clocks for at once.
pub const MAX_JOBS: usize = 1024;

/// Largest number of workers that have reported, over all jobs, that one
/// shard keeps clocks for (about 40 bytes each).
pub const MAX_MEMBERS: usize = 1 << 20;

#[derive(Debug, Clone, Copy)]
struct Member {
    clock: u64,
    last_seen: Instant,
    finished: bool,
    /// Calls of this worker waiting right now (a waiting worker is alive).
    waiting: u32,
}

/// One job's clocks. Only ranks that reported hold memory: a rank that
/// never reported is at clock 0 and live for one lease from the job's
/// first report.
#[derive(Debug)]
struct JobClocks {
    workers: u32,
    members: HashMap<u32, Member>,
    started: Instant,
    lease: Duration,
}

impl JobClocks {
    fn live(&self, m: &Member, now: Instant) -> bool {
        !m.finished && (m.waiting > 0 || now.duration_since(m.last_seen) < self.lease)
    }

    /// Whether the ranks that never reported still count as live.
    fn silent_ranks_live(&self, now: Instant) -> bool {
        (self.members.len() as u32) < self.workers && now.duration_since(self.started) < self.lease
    }

    /// The slowest live worker's clock (`u64::MAX` when none is live), and
    /// when the next live worker blocking `target` would expire.
    fn slowest(&self, target: u64, now: Instant) -> (u64, Option<Instant>) {
        let mut min = u64::MAX;
        let mut next_expiry: Option<Instant> = None;
        let mut blocks = |clock: u64, expiry: Instant| {
            if clock < target {
                next_expiry = Some(next_expiry.map_or(expiry, |n| n.min(expiry)));
            }
        };
        if self.silent_ranks_live(now) {
            min = 0;
            blocks(0, self.started + self.lease);
        }
        for m in self.members.values().filter(|m| self.live(m, now)) {
            min = min.min(m.clock);
            if m.waiting == 0 {
                blocks(m.clock, m.last_seen + self.lease);
            }
        }
        (min, next_expiry)
    }

    /// Ranks presumed dead: reported and silent past the lease, or never
    /// reported a lease after the job started.
    fn expired(&self, now: Instant) -> Vec<u32> {
        let silent_expired = !self.silent_ranks_live(now);
        let mut expired: Vec<u32> = (0..self.workers)
            .filter(|rank| match self.members.get(rank) {
                Some(m) => !m.finished && !self.live(m, now),
                None => silent_expired,
            })
            .collect();
        expired.sort_unstable();
        expired
    }

    /// The slowest clock of every rank that has not finished, live or not
    /// (a rank that never reported is at 0).
    fn slowest_unfinished(&self) -> u64 {
        let silent = (self.members.len() as u32) < self.workers;
        self.members
            .values()
            .filter(|m| !m.finished)
            .map(|m| m.clock)
            .chain(silent.then_some(0))
            .min()
            .unwrap_or(u64::MAX)
    }

    /// Every rank reported finished: nobody will wait on this job again.
    fn finished(&self) -> bool {
        self.members.len() as u32 == self.workers && self.members.values().all(|m| m.finished)
    }

    /// No rank is live and none waits: the job is over (finished, or every
    /// worker gone), so its clocks can be freed.
    fn over(&self, now: Instant) -> bool {
        !self.silent_ranks_live(now)
            && self
                .members
                .values()
                .all(|m| m.waiting == 0 && !self.live(m, now))
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
    /// The slowest clock of every worker that has not finished, live or
    /// not (`u64::MAX` if all finished): the staleness a released pull
    /// really has, measured apart from the liveness the wait is decided on.
    pub min_clock_unfinished: u64,
}

/// Undoes a worker's `waiting` mark when its call ends (or is dropped).
struct Waiting<'a> {
    clocks: &'a Clocks,
    job: &'a str,
    worker: u32,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if let Some(m) = self
            .clocks
            .lock()
            .jobs
            .get_mut(self.job)
            .and_then(|job| job.members.get_mut(&self.worker))
        {
            m.waiting = m.waiting.saturating_sub(1);
            m.last_seen = Instant::now();
        }
        // Whether this worker is live may matter to the others' timers.
        self.clocks.changed.notify_waiters();
    }
}

#[derive(Debug, Default)]
struct Jobs {
    jobs: HashMap<String, JobClocks>,
    /// Reported workers over all jobs.
    members: usize,
}

impl Jobs {
    /// Frees the clocks of every job that is over.
    fn sweep(&mut self, now: Instant) {
        let mut freed = 0;
        self.jobs.retain(|_, job| {
            let over = job.over(now);
            if over {
                freed += job.members.len();
            }
            !over
        });
        self.members -= freed;
    }

    fn remove(&mut self, job: &str) {
        if let Some(job) = self.jobs.remove(job) {
            self.members -= job.members.len();
        }
    }
}

/// Clocks of every job that reported to this shard. A job's clocks are
/// freed once every rank reported finished, or once no rank is live any
/// more (checked when a new job starts); a job reporting again afterwards
/// starts over, as a rerun does.
#[derive(Debug, Default)]
pub struct Clocks {
    jobs: Mutex<Jobs>,
    changed: Notify,
}

impl Clocks {
    /// Records `report` and waits (at most `max_wait`) until every live
    /// worker's clock is at least `report.wait_for`.
    pub async fn report(&self, report: Report, max_wait: Duration) -> Result<Answer, PsError> {
        if let Some(answer) = self.record(&report)? {
            self.changed.notify_waiters();
            return Ok(answer);
        }
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
                let Some(job) = jobs.jobs.get_mut(&report.job) else {
                    // Every rank finished meanwhile (this one too, from a
                    // newer report): nobody is left to wait for.
                    return Ok(Answer {
                        min_clock: u64::MAX,
                        reached: true,
                        expired: Vec::new(),
                        min_clock_unfinished: u64::MAX,
                    });
                };
                let (min, next_expiry) = job.slowest(report.wait_for, now);
                if min >= report.wait_for || tokio::time::Instant::now() >= deadline {
                    if let Some(m) = job.members.get_mut(&report.worker) {
                        m.last_seen = now;
                    }
                    return Ok(Answer {
                        min_clock: min,
                        reached: min >= report.wait_for,
                        expired: job.expired(now),
                        min_clock_unfinished: job.slowest_unfinished(),
                    });
                }
                if waiting.is_none() {
                    if let Some(m) = job.members.get_mut(&report.worker) {
                        m.waiting += 1;
                    }
                    waiting = Some(Waiting {
                        clocks: self,
                        job: &report.job,
                        worker: report.worker,
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

    /// Records a report. Answers at once (`Some`) when the report finished
    /// the job: its clocks are freed and nobody is left to wait for.
    fn record(&self, r: &Report) -> Result<Option<Answer>, PsError> {
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
        let mut guard = self.lock();
        let jobs = &mut *guard;
        if !jobs.jobs.contains_key(&r.job) {
            jobs.sweep(now);
            if jobs.jobs.len() >= MAX_JOBS {
                return Err(PsError::ResourceExhausted(format!(
                    "this shard already keeps clocks for {MAX_JOBS} running jobs"
                )));
            }
        }
        if let Some(job) = jobs.jobs.get(&r.job)
            && job.workers != r.workers
        {
            return Err(PsError::invalid(format!(
                "job '{}' has {} workers, this report says {}",
                r.job, job.workers, r.workers
            )));
        }
        let job = jobs.jobs.get(&r.job);
        let new_member = job.is_none_or(|job| !job.members.contains_key(&r.worker));
        if new_member && jobs.members >= MAX_MEMBERS {
            jobs.sweep(now);
            if jobs.members >= MAX_MEMBERS {
                return Err(PsError::ResourceExhausted(format!(
                    "this shard already keeps clocks for {MAX_MEMBERS} workers"
                )));
            }
        }
        let job = jobs.jobs.entry(r.job.clone()).or_insert_with(|| JobClocks {
            workers: r.workers,
            members: HashMap::new(),
            started: now,
            lease: r.lease,
        });
        job.lease = r.lease;
        // The latest report wins: a worker reports in order, and one that
        // restarts (or a rerun of a finished job) starts over from its
        // report rather than from the old clock.
        let m = job.members.entry(r.worker).or_insert(Member {
            clock: 0,
            last_seen: now,
            finished: false,
            waiting: 0,
        });
        m.clock = r.clock;
        m.last_seen = now;
        m.finished = r.finished;
        if new_member {
            jobs.members += 1;
        }
        if job.finished() {
            jobs.remove(&r.job);
            return Ok(Some(Answer {
                min_clock: u64::MAX,
                reached: true,
                expired: Vec::new(),
                min_clock_unfinished: u64::MAX,
            }));
        }
        Ok(None)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Jobs> {
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
    async fn finished_jobs_are_freed_so_new_jobs_never_run_out() {
        let clocks = Clocks::default();
        for j in 0..(3 * MAX_JOBS) {
            for worker in 0..2 {
                let done = Report {
                    job: format!("run-{j}"),
                    finished: true,
                    ..report(worker, 10, 0)
                };
                clocks.report(done, Duration::ZERO).await.unwrap();
            }
        }
        let jobs = clocks.lock();
        assert!(jobs.jobs.is_empty(), "{} jobs kept", jobs.jobs.len());
        assert_eq!(jobs.members, 0);
    }

    #[tokio::test]
    async fn a_job_whose_workers_all_went_silent_is_freed_when_a_new_job_starts() {
        let clocks = Clocks::default();
        let lease = Duration::from_millis(20);
        for j in 0..MAX_JOBS {
            let r = Report {
                job: format!("gone-{j}"),
                lease,
                ..report(0, 1, 0)
            };
            clocks.report(r, Duration::ZERO).await.unwrap();
        }
        let full = Report {
            job: "next".into(),
            ..report(0, 0, 0)
        };
        let refused = clocks.report(full.clone(), Duration::ZERO).await;
        assert!(
            matches!(refused, Err(PsError::ResourceExhausted(_))),
            "{refused:?}: {MAX_JOBS} live jobs fill the table"
        );
        tokio::time::sleep(lease * 2).await;
        clocks.report(full, Duration::ZERO).await.unwrap();
        assert_eq!(clocks.lock().jobs.len(), 1, "the expired jobs were freed");
    }

    #[tokio::test]
    async fn a_job_declaring_many_workers_holds_memory_only_for_those_that_reported() {
        let clocks = Clocks::default();
        let wide = Report {
            workers: MAX_WORKERS,
            ..report(7, 3, 0)
        };
        let answer = clocks.report(wide, Duration::ZERO).await.unwrap();
        assert_eq!(answer.min_clock, 0, "the silent ranks are at 0");
        let jobs = clocks.lock();
        assert_eq!(jobs.jobs["j"].members.len(), 1);
        assert_eq!(jobs.members, 1);
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
        assert_eq!(clocks.lock().jobs["j"].members[&0].clock, 1);
    }
}
