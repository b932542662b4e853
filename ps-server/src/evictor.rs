//! Keeping tables with eviction within their limits: the shard's evictor.
//!
//! A background task runs a pass every `--evict-interval-ms` (and at once
//! when a request finds the memory budget full). On a serving primary a
//! pass, for each table with eviction:
//! 1. brings a seconds clock up to date;
//! 2. evicts the rows whose last touch is at least the TTL old;
//! 3. evicts the coldest rows past `max_rows`;
//! 4. halves an LFU table's touch counts once a minute, so old popularity
//!    fades.
//!
//! Then, when the shard holds more than [`HIGH_WATER`] of its memory
//! budget, it evicts the coldest rows of the tables with eviction, each in
//! proportion to the memory it holds, until the shard is down to
//! [`LOW_WATER`].
//!
//! On a shard with a disk tier ([`crate::store::disk`]), rows evicted for
//! `max_rows` or the budget move to disk instead of being dropped (so
//! `max_rows` bounds the rows in memory), and once every
//! [`DISK_SWEEP_EVERY`] the rows on disk past their TTL are dropped. A
//! pass that moved rows ends with one durable commit of the tier, so its
//! file reuses the pages the moves freed.
//!
//! Every eviction is a write ([`crate::request::Evict`]) of at most
//! [`BATCH`] rows through the shard's [`Writer`]: ordered with the pushes
//! and forwarded to the backup, so a backup equals its primary row for row.
//! Requests go on between batches: eviction never holds a table. A backup
//! evicts only what its primary sends it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ps_common::lifecycle::EvictionPolicy;
use tokio::sync::{Notify, watch};

use crate::metrics::ShardCounters;
use crate::replication::Replication;
use crate::request::{Evict, Write};
use crate::store::{Shard, Table};
use crate::writer::{Outcome, Writer};

pub use crate::budget::{HIGH_WATER, LOW_WATER};
/// Rows evicted by one write at most.
pub const BATCH: usize = 4096;
/// How often an LFU table's touch counts halve.
pub const LFU_HALF_LIFE: Duration = Duration::from_secs(60);
/// Longest a request waits for a pass to free memory before it is refused.
pub const RELIEF_WAIT: Duration = Duration::from_secs(5);
/// How often a pass walks the disk tier for rows past their TTL.
pub const DISK_SWEEP_EVERY: Duration = Duration::from_secs(60);

/// What one pass evicted.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pass {
    /// Rows past their TTL.
    pub expired: u64,
    /// Rows past a table's `max_rows`.
    pub over_cap: u64,
    /// Rows given up for the memory budget.
    pub for_budget: u64,
    /// Rows past their TTL dropped from the disk tier.
    pub expired_on_disk: u64,
}

/// The shard's evictor (share it: `Arc`).
#[derive(Debug)]
pub struct Evictor {
    shard: Arc<Shard>,
    replication: Arc<Replication>,
    writer: Writer,
    wake: Notify,
    /// A request found the budget full: the next pass frees memory down to
    /// [`LOW_WATER`] even below [`HIGH_WATER`].
    relief_asked: AtomicBool,
    passes: watch::Sender<u64>,
    last_halving: Mutex<Instant>,
    last_disk_sweep: Mutex<Instant>,
}

impl Evictor {
    /// The evictor of `shard`, writing through a writer of `replication`
    /// that counts into `counters` (the service's own).
    pub fn new(
        shard: Arc<Shard>,
        replication: Arc<Replication>,
        counters: Arc<ShardCounters>,
    ) -> Arc<Evictor> {
        Arc::new(Evictor {
            writer: Writer::new(Arc::clone(&shard), Arc::clone(&replication), counters),
            shard,
            replication,
            wake: Notify::new(),
            relief_asked: AtomicBool::new(false),
            passes: watch::channel(0).0,
            last_halving: Mutex::new(Instant::now()),
            last_disk_sweep: Mutex::new(Instant::now()),
        })
    }

    /// Runs a pass every `every`, or sooner when [`Evictor::relieve`]
    /// asks, until the task is dropped.
    pub async fn run(self: Arc<Self>, every: Duration) {
        loop {
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                () = self.wake.notified() => {}
            }
            let me = Arc::clone(&self);
            match tokio::task::spawn_blocking(move || me.pass()).await {
                Ok(pass) if pass != Pass::default() => tracing::debug!(?pass, "evicted"),
                Ok(_) => {}
                Err(e) => tracing::error!("eviction pass failed: {e}"),
            }
            self.passes.send_modify(|n| *n += 1);
        }
    }

    /// Whether a pass could free memory: the shard has a budget and a table
    /// with eviction.
    pub fn can_relieve(&self) -> bool {
        self.shard.budget.limit() != u64::MAX && !self.shard.evicting_tables().is_empty()
    }

    /// Asks for a pass now, one that frees memory down to [`LOW_WATER`],
    /// and waits (at most [`RELIEF_WAIT`]) until one has finished. Returns
    /// whether one did.
    pub async fn relieve(&self) -> bool {
        let mut passes = self.passes.subscribe();
        passes.mark_unchanged();
        self.relief_asked.store(true, Ordering::Relaxed);
        self.wake.notify_one();
        matches!(
            tokio::time::timeout(RELIEF_WAIT, passes.changed()).await,
            Ok(Ok(()))
        )
    }

    /// One pass (store work: run it on a blocking thread). Evicts only on
    /// a serving primary.
    pub fn pass(&self) -> Pass {
        let tables = self.shard.evicting_tables();
        for table in &tables {
            table.advance_clock();
        }
        let mut pass = Pass::default();
        if self.replication.check_serving().is_err() {
            return pass;
        }
        let halve = due(&self.last_halving, LFU_HALF_LIFE);
        let sweep_disk = due(&self.last_disk_sweep, DISK_SWEEP_EVERY);
        for table in &tables {
            let Some(policy) = table.eviction() else {
                continue;
            };
            pass.expired += self.evict_while(table, false, |t| t.expired_keys(BATCH));
            if sweep_disk {
                pass.expired_on_disk += self.evict_while(table, false, |t| {
                    t.expired_keys_on_disk(BATCH).unwrap_or_else(|e| {
                        tracing::warn!(table = %t.spec().name, "cannot sweep the disk tier: {e}");
                        Vec::new()
                    })
                });
            }
            if let Some(cap) = policy.max_rows {
                let cap = usize::try_from(cap).unwrap_or(usize::MAX);
                pass.over_cap += self.evict_while(table, true, |t| {
                    t.coldest_keys(t.len().saturating_sub(cap).min(BATCH))
                });
            }
            if halve && policy.policy == EvictionPolicy::Lfu {
                table.halve_touches();
            }
        }
        pass.for_budget = self.evict_for_budget(&tables);
        if pass.over_cap + pass.for_budget > 0
            && let Some(tier) = self.shard.disk_tier()
            && let Err(e) = tier.settle()
        {
            tracing::warn!("cannot commit the disk tier durably: {e}");
        }
        pass
    }

    /// Evicts the coldest rows of `tables`, each in proportion to its
    /// memory, down to [`LOW_WATER`] of the budget when the shard holds
    /// more than [`HIGH_WATER`] of it; asked for relief, down to whichever
    /// is lower of [`LOW_WATER`] and what leaves room for the largest
    /// reservation refused (with an eighth to spare).
    fn evict_for_budget(&self, tables: &[Arc<Table>]) -> u64 {
        let budget = &self.shard.budget;
        let limit = budget.limit();
        let refused = budget.take_refused();
        let asked = self.relief_asked.swap(false, Ordering::Relaxed);
        if limit == u64::MAX {
            return 0;
        }
        let (used, limit) = (budget.used() as f64, limit as f64);
        let target = if asked {
            (LOW_WATER * limit).min(limit - 1.125 * refused as f64)
        } else if used > HIGH_WATER * limit {
            LOW_WATER * limit
        } else {
            return 0;
        };
        if used <= target {
            return 0;
        }
        let need = used - target;
        let held: u64 = tables
            .iter()
            .map(|t| t.len() as u64 * t.sparse_row_bytes())
            .sum();
        if held == 0 {
            return 0;
        }
        let mut evicted = 0;
        for table in tables {
            let share = need * (table.len() as u64 * table.sparse_row_bytes()) as f64 / held as f64;
            let mut left = (share / table.sparse_row_bytes() as f64).ceil() as usize;
            evicted += self.evict_while(table, true, |t| {
                let keys = t.coldest_keys(left.min(BATCH));
                left -= keys.len().min(left);
                keys
            });
        }
        evicted
    }

    /// Evicts the rows `choose` names, batch after batch, until it names
    /// none (or an eviction fails: logged, the pass goes on elsewhere).
    /// `spill`: to the disk tier, where the table has one.
    fn evict_while(
        &self,
        table: &Table,
        spill: bool,
        mut choose: impl FnMut(&Table) -> Vec<u64>,
    ) -> u64 {
        let mut evicted = 0;
        loop {
            let keys = choose(table);
            if keys.is_empty() {
                return evicted;
            }
            let write = Arc::new(Write::Evict(Evict {
                table: table.spec().name.clone(),
                keys,
                spill: spill && table.has_disk(),
            }));
            match self.writer.write(write) {
                Ok((Outcome::Evicted(0), _)) => return evicted,
                Ok((Outcome::Evicted(n), _)) => evicted += n as u64,
                Ok((other, _)) => {
                    tracing::error!(?other, "an eviction was answered as another write");
                    return evicted;
                }
                Err(e) => {
                    tracing::warn!(table = %table.spec().name, "eviction refused: {e}");
                    return evicted;
                }
            }
        }
    }
}

/// Whether `period` has passed since `last`; if so, `last` becomes now.
fn due(last: &Mutex<Instant>, period: Duration) -> bool {
    let mut last = last.lock().unwrap_or_else(|p| p.into_inner());
    let due = last.elapsed() >= period;
    if due {
        *last = Instant::now();
    }
    due
}

#[cfg(test)]
mod tests {
    use ps_common::lifecycle::{Eviction, Lifecycle};
    use ps_common::{InitializerSpec, OptimizerSpec, TableKind, TableSpec};

    use super::*;
    use crate::replication::{Peer, Role};

    fn spec(name: &str, eviction: Option<Eviction>) -> TableSpec {
        TableSpec {
            name: name.into(),
            kind: TableKind::Sparse,
            dim: 4,
            initializer: InitializerSpec::Zeros,
            optimizer: OptimizerSpec::sgd(0.1),
            seed: 0,
            lifecycle: Lifecycle {
                admission: None,
                eviction,
            },
        }
    }

    fn evictor(role: Role, tables: &[TableSpec]) -> (Arc<Shard>, Arc<Evictor>) {
        let shard = Arc::new(Shard::new(0, 1));
        for t in tables {
            shard.create_table(t.clone()).unwrap();
        }
        let replication = Replication::new(Arc::clone(&shard), role, Peer::default());
        let evictor = Evictor::new(Arc::clone(&shard), replication, Arc::default());
        (shard, evictor)
    }

    fn touch(shard: &Shard, table: &str, keys: std::ops::Range<u64>) {
        let keys: Vec<u64> = keys.collect();
        shard.pull(table, &keys, &mut Vec::new()).unwrap();
    }

    #[test]
    fn a_pass_brings_a_full_budget_down_to_low_water_from_the_evicting_tables_only() {
        let (shard, evictor) = evictor(
            Role::Primary,
            &[
                spec("stream", Some(Eviction::default())),
                spec("fixed", None),
            ],
        );
        touch(&shard, "fixed", 0..1_000);
        touch(&shard, "stream", 0..20_000);
        shard.budget.set_limit(shard.budget.used() + 100);
        let pass = evictor.pass();
        assert!(pass.for_budget > 0, "{pass:?}");
        let (used, limit) = (shard.budget.used() as f64, shard.budget.limit() as f64);
        assert!(used <= LOW_WATER * limit, "{used} of {limit}");
        assert!(
            used >= (LOW_WATER - 0.02) * limit,
            "evicted far too much: {used}"
        );
        assert_eq!(shard.table("fixed").unwrap().len(), 1_000);
        assert_eq!(
            shard.table("stream").unwrap().evicted_rows(),
            pass.for_budget
        );
        assert_eq!(evictor.pass(), Pass::default(), "below high water: nothing");
    }

    #[test]
    fn a_pass_evicts_down_to_max_rows_in_batches() {
        let cap = Eviction {
            max_rows: Some(1_000),
            ..Eviction::default()
        };
        let (shard, evictor) = evictor(Role::Primary, &[spec("t", Some(cap))]);
        touch(&shard, "t", 0..10_000);
        // The hottest: pushed (a push advances the table's clock).
        let hot: Vec<u64> = (0..500).collect();
        shard.push("t", &hot, &vec![1.0; 500 * 4]).unwrap();
        let pass = evictor.pass();
        assert_eq!(pass.over_cap, 9_000);
        let t = shard.table("t").unwrap();
        assert_eq!(t.len(), 1_000);
        let mut held = Vec::new();
        t.for_each_row(|k, _| held.push(k)).unwrap();
        assert!(
            (0..500).all(|k| held.contains(&k)),
            "the rows touched last stay"
        );
    }

    #[test]
    fn with_a_disk_tier_rows_past_max_rows_and_the_budget_move_to_disk_and_stay_readable() {
        let (_dir, tier) = crate::store::disk::scratch::tier();
        let shard = Arc::new(Shard::new(0, 1).with_disk_tier(tier));
        let cap = Eviction {
            max_rows: Some(1_000),
            ..Eviction::default()
        };
        shard.create_table(spec("t", Some(cap))).unwrap();
        let replication = Replication::new(Arc::clone(&shard), Role::Primary, Peer::default());
        let evictor = Evictor::new(Arc::clone(&shard), replication, Arc::default());
        let keys: Vec<u64> = (0..5_000).collect();
        shard.push("t", &keys, &vec![-1.0; 5_000 * 4]).unwrap();
        assert_eq!(evictor.pass().over_cap, 4_000);
        let t = shard.table("t").unwrap();
        assert_eq!((t.len(), t.rows_on_disk()), (1_000, 4_000));
        // The budget: down to low water, by moving more rows to disk.
        shard.budget.set_limit(shard.budget.used() * 100 / 97);
        let pass = evictor.pass();
        assert!(pass.for_budget > 0, "{pass:?}");
        assert_eq!(t.len() as u64 + t.rows_on_disk(), 5_000, "nothing dropped");
        let snapshot = shard.snapshot().unwrap();
        assert_eq!(snapshot.tables[0].keys, keys);
        assert!(
            snapshot.tables[0].values.iter().all(|&w| w == 0.1),
            "every row kept its push"
        );
        // Rows on disk need memory to come back: past the budget, a pull
        // of them is refused like one that would create rows.
        let mut all = Vec::new();
        let refused = shard.pull("t", &keys, &mut all).unwrap_err();
        assert!(
            matches!(refused, ps_common::PsError::ResourceExhausted(_)),
            "{refused}"
        );
    }

    #[test]
    fn a_pass_evicts_rows_past_their_ttl() {
        let ttl = Eviction {
            ttl_pushes: Some(2),
            ..Eviction::default()
        };
        let (shard, evictor) = evictor(Role::Primary, &[spec("t", Some(ttl))]);
        shard.push("t", &[1], &[1.0; 4]).unwrap();
        for _ in 0..2 {
            shard.push("t", &[2], &[1.0; 4]).unwrap();
        }
        assert_eq!(evictor.pass().expired, 1);
        assert_eq!(shard.table("t").unwrap().len(), 1);
    }

    #[test]
    fn a_backup_evicts_only_what_its_primary_sends() {
        let cap = Eviction {
            max_rows: Some(10),
            ..Eviction::default()
        };
        let (shard, evictor) = evictor(Role::Backup, &[spec("t", Some(cap))]);
        touch(&shard, "t", 0..100);
        assert_eq!(evictor.pass(), Pass::default());
        assert_eq!(shard.table("t").unwrap().len(), 100);
    }
}
