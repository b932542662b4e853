//! The shard's memory budget (`--memory-budget`): how many bytes its tables
//! may hold, and the reservations that keep a request from passing it.
//!
//! A request that may create rows reserves their memory before it creates
//! any (at worst every key is new), and returns what it did not use when it
//! is done; a request that cannot reserve is refused with
//! RESOURCE_EXHAUSTED and creates nothing. The budget counts rows as the
//! store lays them out ([`crate::store::SPARSE_ROW_OVERHEAD`] per sparse
//! row beyond its floats), not transient copies: checkpoints and a joining
//! backup's snapshot need about as much again while they run.

use std::sync::atomic::{AtomicU64, Ordering};

use ps_common::PsError;

/// Above this share of the budget, the evictor evicts ([`crate::evictor`]).
pub const HIGH_WATER: f64 = 0.95;
/// The share of the budget an evictor pass frees memory down to, and a
/// restore into a shard with a disk tier fills memory up to (the rest of
/// the rows of its tables with eviction go to disk).
pub const LOW_WATER: f64 = 0.85;

/// Bytes the shard's tables may hold, and bytes held or reserved now.
#[derive(Debug)]
pub struct MemoryBudget {
    limit: AtomicU64,
    used: AtomicU64,
    /// The largest reservation refused since [`MemoryBudget::take_refused`]
    /// last read it (what an evictor must free for it to fit).
    refused: AtomicU64,
}

impl Default for MemoryBudget {
    /// No limit.
    fn default() -> Self {
        MemoryBudget {
            limit: AtomicU64::new(u64::MAX),
            used: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        }
    }
}

impl MemoryBudget {
    /// The limit in bytes (`u64::MAX`: none).
    pub fn limit(&self) -> u64 {
        self.limit.load(Ordering::Relaxed)
    }

    /// Bytes held or reserved now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// The largest reservation refused since the last call (0: none), and
    /// forgets it.
    pub fn take_refused(&self) -> u64 {
        self.refused.swap(0, Ordering::Relaxed)
    }

    /// Sets the limit (rows already held stay).
    pub fn set_limit(&self, limit: u64) {
        self.limit.store(limit, Ordering::Relaxed);
    }

    /// Reserves `bytes` if they fit under the limit, for `what` (named in
    /// the error).
    pub fn reserve(
        &self,
        bytes: u64,
        what: impl FnOnce() -> String,
    ) -> Result<Reservation<'_>, PsError> {
        if self.try_reserve(bytes) {
            return Ok(Reservation {
                budget: self,
                bytes,
            });
        }
        self.refused.fetch_max(bytes, Ordering::Relaxed);
        Err(PsError::ResourceExhausted(format!(
            "{} needs {bytes} bytes; this shard holds {} of its {} byte memory budget (--memory-budget)",
            what(),
            self.used(),
            self.limit()
        )))
    }

    fn try_reserve(&self, bytes: u64) -> bool {
        let limit = self.limit();
        self.used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                used.checked_add(bytes).filter(|&after| after <= limit)
            })
            .is_ok()
    }

    /// Counts `bytes` as held whatever the limit (rows loaded from a
    /// snapshot that was checked against the limit as a whole).
    pub(crate) fn charge(&self, bytes: u64) {
        self.used.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Returns `bytes` no longer held.
    pub(crate) fn release(&self, bytes: u64) {
        let _ = self
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                Some(used.saturating_sub(bytes))
            });
    }
}

/// Memory set aside for one request; what it does not [`keep`](Reservation::keep)
/// is returned when it drops.
#[derive(Debug)]
pub struct Reservation<'a> {
    budget: &'a MemoryBudget,
    bytes: u64,
}

impl Reservation<'_> {
    /// `bytes` of the reservation are now held by rows: they stay counted.
    /// Bytes kept beyond the reservation (rows a racing request made
    /// admissible, see `Shard::make_room_for_push`) are charged, so the
    /// budget never undercounts what is held.
    pub fn keep(&mut self, bytes: u64) {
        if bytes > self.bytes {
            self.budget.charge(bytes - self.bytes);
        }
        self.bytes = self.bytes.saturating_sub(bytes);
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.budget.release(self.bytes);
    }
}

/// Memory this process may use: the smallest of the machine's memory and
/// its cgroup's limit (a container's), if either can be read.
pub fn machine_memory() -> Option<u64> {
    let read = |path: &str| std::fs::read_to_string(path).ok();
    let mem_total = read("/proc/meminfo").and_then(|text| {
        text.lines()
            .find_map(|line| line.strip_prefix("MemTotal:"))
            .and_then(|rest| rest.trim().strip_suffix("kB"))
            .and_then(|kb| kb.trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
    });
    let cgroup = [
        "/sys/fs/cgroup/memory.max",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
    ]
    .iter()
    .filter_map(|path| read(path))
    .filter_map(|text| text.trim().parse::<u64>().ok())
    .min();
    match (mem_total, cgroup) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The default budget of one shard process: half of [`machine_memory`]
/// (the other half is for checkpoints, a joining backup's snapshot and
/// requests in flight), or none if the machine's memory cannot be read.
pub fn default_budget() -> Option<u64> {
    machine_memory().map(|bytes| bytes / 2)
}

/// Parses a byte count: a number with an optional unit `K`, `M`, `G`, `T`
/// (powers of 1024, also written `KiB`, `MiB`, ...), e.g. `512MiB` or `8G`.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a byte count (e.g. 8589934592, 512MiB, 8G)"))?;
    let shift = match unit.trim() {
        "" | "B" => 0,
        "K" | "KiB" => 10,
        "M" | "MiB" => 20,
        "G" | "GiB" => 30,
        "T" | "TiB" => 40,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {text:?} (use K, M, G or T)"
            ));
        }
    };
    number
        .checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{text:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reservation_past_the_limit_is_refused_and_unused_bytes_return() {
        let budget = MemoryBudget::default();
        budget.set_limit(1000);
        {
            let mut r = budget.reserve(600, || "a pull".into()).unwrap();
            assert_eq!(budget.used(), 600);
            let err = budget.reserve(500, || "another pull".into()).unwrap_err();
            assert!(
                err.to_string().contains("another pull needs 500 bytes"),
                "{err}"
            );
            r.keep(100);
        }
        assert_eq!(budget.used(), 100, "only the kept bytes stay held");
        budget.release(100);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn byte_counts_parse_with_binary_units() {
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert_eq!(parse_bytes("512MiB"), Ok(512 << 20));
        assert_eq!(parse_bytes("8G"), Ok(8 << 30));
        assert!(parse_bytes("8 GB").is_err());
        assert!(parse_bytes("-1").is_err());
        assert!(parse_bytes("99999999999T").is_err());
    }

    #[test]
    fn this_machine_s_memory_is_known() {
        let bytes = machine_memory().expect("Linux reports its memory");
        assert!(bytes > 64 << 20, "{bytes}");
    }
}
