//! Which ids of a sparse table get a row: the table's admission policy
//! ([`ps_common::lifecycle::Admission`]) and what it remembers.
//!
//! An id the table does not hold is admitted at a pushed occurrence when
//! its count in a count-min sketch reaches `min_count`, or with probability
//! `p` decided by a hash of (id, the table's push clock). Both decisions
//! depend only on the pushes applied before, in order, so a backup applying
//! the primary's writes in the primary's order admits the same ids.
//!
//! The sketch has [`DEPTH`] rows of `width` one-byte counters (saturating
//! at 255) with conservative update (only the counters at the minimum
//! grow), so a count is overestimated only when every row collides. After
//! `width` increments every counter is halved: counts of ids that stopped
//! arriving fade, and the sketch never fills up with a stream that never
//! ends.

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use ps_common::lifecycle::Admission;
use ps_common::routing::mix64;

/// Rows of the sketch (independent hashes).
pub(crate) const DEPTH: usize = 4;

/// A count-min sketch of pushed occurrences.
#[derive(Debug)]
pub(crate) struct Sketch {
    counters: Box<[AtomicU8]>,
    mask: u64,
    /// Increments since the last halving.
    since_halving: AtomicU64,
}

impl Sketch {
    fn new(width: u32) -> Sketch {
        Sketch {
            counters: (0..DEPTH * width as usize)
                .map(|_| AtomicU8::new(0))
                .collect(),
            mask: u64::from(width) - 1,
            since_halving: AtomicU64::new(0),
        }
    }

    fn slots(&self, key: u64) -> [usize; DEPTH] {
        let width = self.mask as usize + 1;
        let mut h = mix64(key ^ 0x5bd1_e995_9e37_79b9);
        std::array::from_fn(|row| {
            h = mix64(h.wrapping_add(row as u64));
            row * width + (h & self.mask) as usize
        })
    }

    /// The estimated count of `key` (never below its true count since the
    /// last halving, halved counts aside).
    pub(crate) fn estimate(&self, key: u64) -> u8 {
        (self.slots(key).iter())
            .map(|&s| self.counters[s].load(Ordering::Relaxed))
            .min()
            .unwrap_or(0)
    }

    /// Counts one occurrence of `key` and returns its new estimate.
    fn add(&self, key: u64) -> u8 {
        let slots = self.slots(key);
        let now = (slots.iter())
            .map(|&s| self.counters[s].load(Ordering::Relaxed))
            .min()
            .unwrap_or(0);
        let next = now.saturating_add(1);
        for &s in &slots {
            // Conservative update: raise only the counters below the new estimate.
            self.counters[s].fetch_max(next, Ordering::Relaxed);
        }
        if self.since_halving.fetch_add(1, Ordering::Relaxed) >= self.mask {
            self.since_halving.store(0, Ordering::Relaxed);
            for c in self.counters.iter() {
                c.store(c.load(Ordering::Relaxed) / 2, Ordering::Relaxed);
            }
        }
        next
    }

    /// Bytes the counters take.
    #[cfg(test)]
    fn bytes(&self) -> u64 {
        self.counters.len() as u64
    }
}

/// A table's admission policy and what it has counted.
#[derive(Debug)]
pub(crate) struct Admitter {
    policy: Admission,
    sketch: Option<Sketch>,
    seed: u64,
    /// Ids admitted (rows created by the policy's decision).
    pub(crate) admitted: AtomicU64,
    /// Pushed occurrences dropped because their id was not admitted.
    pub(crate) filtered: AtomicU64,
}

impl Admitter {
    /// The admitter of a table with `policy` and initializer seed `seed`.
    pub(crate) fn new(policy: Admission, seed: u64) -> Admitter {
        let sketch = match policy {
            Admission::Count { sketch_width, .. } => Some(Sketch::new(sketch_width)),
            Admission::Probability { .. } => None,
        };
        Admitter {
            policy,
            sketch,
            seed,
            admitted: AtomicU64::new(0),
            filtered: AtomicU64::new(0),
        }
    }

    /// Memory the policy's state takes (counted in the table's base cost).
    pub(crate) fn bytes(policy: &Admission) -> u64 {
        match policy {
            Admission::Count { sketch_width, .. } => DEPTH as u64 * u64::from(*sketch_width),
            Admission::Probability { .. } => 0,
        }
    }

    /// Whether a pushed occurrence of `key` could be admitted now (an
    /// upper bound for reserving memory; changes nothing).
    pub(crate) fn may_admit(&self, key: u64) -> bool {
        match (self.policy, &self.sketch) {
            (Admission::Count { min_count, .. }, Some(sketch)) => {
                u32::from(sketch.estimate(key)) + 1 >= min_count
            }
            _ => true,
        }
    }

    /// Decides a pushed occurrence of `key`, which the table does not hold,
    /// at push clock `step`: `true` admits it (the caller creates the row).
    pub(crate) fn admits(&self, key: u64, step: u32) -> bool {
        let admitted = match (self.policy, &self.sketch) {
            (Admission::Count { min_count, .. }, Some(sketch)) => {
                u32::from(sketch.add(key)) >= min_count
            }
            (Admission::Probability { p }, _) => {
                let draw = mix64(mix64(key ^ self.seed) ^ u64::from(step));
                // The top 24 bits as a fraction in [0, 1).
                ((draw >> 40) as f32) / ((1u64 << 24) as f32) < p
            }
            (Admission::Count { .. }, None) => true,
        };
        if admitted {
            self.admitted.fetch_add(1, Ordering::Relaxed);
        } else {
            self.filtered.fetch_add(1, Ordering::Relaxed);
        }
        admitted
    }

    /// The sketch's counters, for snapshots (empty without a sketch).
    pub(crate) fn counters(&self) -> Vec<u8> {
        (self.sketch.iter())
            .flat_map(|s| s.counters.iter().map(|c| c.load(Ordering::Relaxed)))
            .collect()
    }

    /// Sets the sketch's counters from a snapshot's. Returns `false` if
    /// their number does not fit this policy (nothing is changed).
    pub(crate) fn load_counters(&self, counters: &[u8]) -> bool {
        match &self.sketch {
            None => counters.is_empty(),
            Some(sketch) if counters.len() == sketch.counters.len() => {
                for (c, &v) in sketch.counters.iter().zip(counters) {
                    c.store(v, Ordering::Relaxed);
                }
                true
            }
            // An empty list: a snapshot from before admission was set
            // (counts start over).
            Some(_) => counters.is_empty(),
        }
    }

    /// Bytes of the sketch.
    #[cfg(test)]
    pub(crate) fn sketch_bytes(&self) -> u64 {
        self.sketch.as_ref().map_or(0, Sketch::bytes)
    }

    /// The sketch's estimate of `key`'s pushed occurrences (0 without one).
    #[cfg(test)]
    pub(crate) fn estimate(&self, key: u64) -> u8 {
        self.sketch.as_ref().map_or(0, |s| s.estimate(key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_is_admitted_at_its_min_count_th_occurrence() {
        let a = Admitter::new(
            Admission::Count {
                min_count: 3,
                sketch_width: 1 << 12,
            },
            7,
        );
        assert!(!a.admits(42, 0));
        assert!(!a.admits(42, 1));
        assert!(a.admits(42, 2));
        assert_eq!(a.admitted.load(Ordering::Relaxed), 1);
        assert_eq!(a.filtered.load(Ordering::Relaxed), 2);
        assert_eq!(a.sketch_bytes(), 4 << 12);
    }

    #[test]
    fn counts_halve_after_width_increments_so_old_ids_fade() {
        let width = 1 << 10;
        let a = Admitter::new(
            Admission::Count {
                min_count: 255,
                sketch_width: width,
            },
            0,
        );
        for _ in 0..8 {
            a.admits(1, 0);
        }
        assert_eq!(a.estimate(1), 8);
        // Other ids fill the rest of the period.
        for k in 0..(u64::from(width) - 8) {
            a.admits(1_000_000 + k, 0);
        }
        assert_eq!(a.estimate(1), 4);
    }

    #[test]
    fn probability_admission_admits_about_p_and_is_deterministic() {
        let a = Admitter::new(Admission::Probability { p: 0.25 }, 3);
        let b = Admitter::new(Admission::Probability { p: 0.25 }, 3);
        let n = 100_000u64;
        let admitted = (0..n)
            .filter(|&k| {
                let yes = a.admits(k, k as u32 % 7);
                assert_eq!(yes, b.admits(k, k as u32 % 7));
                yes
            })
            .count();
        let share = admitted as f64 / n as f64;
        assert!((share - 0.25).abs() < 0.01, "admitted {share}");
    }

    #[test]
    fn counters_round_trip_and_a_wrong_length_is_refused() {
        let policy = Admission::Count {
            min_count: 2,
            sketch_width: 1 << 10,
        };
        let a = Admitter::new(policy, 0);
        a.admits(5, 0);
        let b = Admitter::new(policy, 0);
        assert!(b.load_counters(&a.counters()));
        assert!(
            b.admits(5, 1),
            "the copied count admits at the second occurrence"
        );
        assert!(!b.load_counters(&[1, 2, 3]));
    }
}
