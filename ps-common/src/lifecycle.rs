//! How a sparse table's rows come and go: which ids get a row
//! ([`Admission`]) and which rows are given up ([`Eviction`]).
//!
//! These are the policies as a job file and the wire state them, validated;
//! `ps-server`'s store carries them out.

use serde::{Deserialize, Serialize};

use crate::pb;

/// Largest `min_count` (the sketch counts in bytes).
pub const MAX_MIN_COUNT: u32 = 255;
/// Counters per sketch row when the spec leaves it out.
pub const DEFAULT_SKETCH_WIDTH: u32 = 1 << 20;
/// Smallest and largest sketch width (powers of two).
pub const SKETCH_WIDTHS: std::ops::RangeInclusive<u32> = (1 << 10)..=(1 << 24);

/// A sparse table's admission and eviction policies (both off by default:
/// every touched id gets a row, kept for good).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lifecycle {
    /// Which ids get a row (`None`: all, on first touch).
    #[serde(default)]
    pub admission: Option<Admission>,
    /// Which rows are given up (`None`: none).
    #[serde(default)]
    pub eviction: Option<Eviction>,
}

/// Which ids get a row. Until an id is admitted, a pull answers the
/// initializer's values without storing them, and its pushes are counted
/// and dropped.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Admission {
    /// An id gets a row at its `min_count`-th pushed occurrence, counted in
    /// a count-min sketch of 4 x `sketch_width` bytes.
    Count {
        /// Pushed occurrences that admit an id (1..=255).
        min_count: u32,
        /// Counters per sketch row (a power of two).
        #[serde(default = "default_sketch_width")]
        sketch_width: u32,
    },
    /// Each pushed occurrence of an id without a row admits it with
    /// probability `p`, decided by a hash so that replicas agree.
    Probability {
        /// The chance, in (0, 1].
        p: f32,
    },
}

fn default_sketch_width() -> u32 {
    DEFAULT_SKETCH_WIDTH
}

/// Which rows go first when a table must shrink.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EvictionPolicy {
    /// Least recently touched (pulled or pushed).
    #[default]
    Lru,
    /// Least frequently touched (counts halve at each eviction pass, so old
    /// popularity fades).
    Lfu,
}

/// When rows are evicted. A table with eviction also gives up its coldest
/// rows to keep its shard within the memory budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Eviction {
    /// Rows not touched during the table's last `ttl_pushes` push calls on
    /// this shard are evicted (each worker step sends one per shard).
    #[serde(default)]
    pub ttl_pushes: Option<u64>,
    /// Rows not touched for this many seconds are evicted.
    #[serde(default)]
    pub ttl_seconds: Option<u64>,
    /// Most rows the table keeps on each shard; the coldest go first.
    #[serde(default)]
    pub max_rows: Option<u64>,
    /// What "coldest" means.
    #[serde(default)]
    pub policy: EvictionPolicy,
}

impl Lifecycle {
    /// True when neither policy is set.
    pub fn is_default(&self) -> bool {
        *self == Lifecycle::default()
    }

    /// Checks both policies; the error says which field broke which rule.
    pub fn validate(&self) -> Result<(), String> {
        match self.admission {
            None => {}
            Some(Admission::Count {
                min_count,
                sketch_width,
            }) => {
                if !(1..=MAX_MIN_COUNT).contains(&min_count) {
                    return Err(format!(
                        "admission min_count must be in 1..={MAX_MIN_COUNT}, got {min_count}"
                    ));
                }
                if !sketch_width.is_power_of_two() || !SKETCH_WIDTHS.contains(&sketch_width) {
                    return Err(format!(
                        "admission sketch_width must be a power of two in {}..={}, got {sketch_width}",
                        SKETCH_WIDTHS.start(),
                        SKETCH_WIDTHS.end()
                    ));
                }
            }
            Some(Admission::Probability { p }) if !(p > 0.0 && p <= 1.0) => {
                return Err(format!("admission p must be in (0, 1], got {p}"));
            }
            Some(Admission::Probability { .. }) => {}
        }
        if let Some(e) = self.eviction {
            for (name, value) in [
                ("ttl_pushes", e.ttl_pushes),
                ("ttl_seconds", e.ttl_seconds),
                ("max_rows", e.max_rows),
            ] {
                if value == Some(0) {
                    return Err(format!(
                        "eviction {name} must be >= 1 (leave it out for none)"
                    ));
                }
            }
            if e.ttl_seconds.is_some_and(|s| s > u64::from(u32::MAX)) {
                return Err(format!(
                    "eviction ttl_seconds must be at most {}, got {:?}",
                    u32::MAX,
                    e.ttl_seconds
                ));
            }
            if e.ttl_pushes.is_some_and(|s| s > u64::from(u32::MAX)) {
                return Err(format!(
                    "eviction ttl_pushes must be at most {}, got {:?}",
                    u32::MAX,
                    e.ttl_pushes
                ));
            }
            if e.ttl_pushes.is_some() && e.ttl_seconds.is_some() {
                return Err(
                    "eviction takes ttl_pushes or ttl_seconds, not both (one clock per table)"
                        .into(),
                );
            }
        }
        Ok(())
    }
}

impl From<&Lifecycle> for Option<pb::Lifecycle> {
    fn from(l: &Lifecycle) -> Self {
        if l.is_default() {
            return None;
        }
        let admission = l.admission.map(|a| match a {
            Admission::Count {
                min_count,
                sketch_width,
            } => pb::Admission {
                kind: Some(pb::admission::Kind::MinCount(min_count)),
                sketch_width,
            },
            Admission::Probability { p } => pb::Admission {
                kind: Some(pb::admission::Kind::Probability(p)),
                sketch_width: 0,
            },
        });
        let eviction = l.eviction.map(|e| pb::Eviction {
            ttl_pushes: e.ttl_pushes.unwrap_or(0),
            ttl_seconds: e.ttl_seconds.unwrap_or(0),
            max_rows: e.max_rows.unwrap_or(0),
            policy: match e.policy {
                EvictionPolicy::Lru => pb::EvictionPolicy::Lru,
                EvictionPolicy::Lfu => pb::EvictionPolicy::Lfu,
            } as i32,
        });
        Some(pb::Lifecycle {
            admission,
            eviction,
        })
    }
}

impl TryFrom<Option<pb::Lifecycle>> for Lifecycle {
    type Error = String;

    fn try_from(p: Option<pb::Lifecycle>) -> Result<Self, String> {
        let Some(p) = p else {
            return Ok(Lifecycle::default());
        };
        let admission = match p.admission {
            None => None,
            Some(a) => Some(match a.kind {
                Some(pb::admission::Kind::MinCount(min_count)) => Admission::Count {
                    min_count,
                    sketch_width: match a.sketch_width {
                        0 => DEFAULT_SKETCH_WIDTH,
                        w => w,
                    },
                },
                Some(pb::admission::Kind::Probability(p)) => {
                    if a.sketch_width != 0 {
                        return Err("admission sketch_width is for min_count only".into());
                    }
                    Admission::Probability { p }
                }
                None => return Err("admission needs min_count or probability".into()),
            }),
        };
        let eviction = match p.eviction {
            None => None,
            Some(e) => Some(Eviction {
                ttl_pushes: (e.ttl_pushes != 0).then_some(e.ttl_pushes),
                ttl_seconds: (e.ttl_seconds != 0).then_some(e.ttl_seconds),
                max_rows: (e.max_rows != 0).then_some(e.max_rows),
                policy: match pb::EvictionPolicy::try_from(e.policy) {
                    Ok(pb::EvictionPolicy::Lru) => EvictionPolicy::Lru,
                    Ok(pb::EvictionPolicy::Lfu) => EvictionPolicy::Lfu,
                    Err(_) => {
                        return Err(format!(
                            "eviction policy must be LRU or LFU, got {}",
                            e.policy
                        ));
                    }
                },
            }),
        };
        let lifecycle = Lifecycle {
            admission,
            eviction,
        };
        lifecycle.validate()?;
        Ok(lifecycle)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(l: Lifecycle) -> Lifecycle {
        Lifecycle::try_from(Option::<pb::Lifecycle>::from(&l)).unwrap()
    }

    #[test]
    fn every_policy_survives_the_wire() {
        let all = [
            Lifecycle::default(),
            Lifecycle {
                admission: Some(Admission::Count {
                    min_count: 3,
                    sketch_width: 1 << 12,
                }),
                eviction: Some(Eviction {
                    ttl_pushes: Some(100),
                    ttl_seconds: None,
                    max_rows: Some(5000),
                    policy: EvictionPolicy::Lfu,
                }),
            },
            Lifecycle {
                admission: Some(Admission::Probability { p: 0.25 }),
                eviction: Some(Eviction {
                    ttl_seconds: Some(60),
                    ..Eviction::default()
                }),
            },
        ];
        for l in all {
            assert_eq!(round_trip(l), l);
        }
    }

    #[test]
    fn out_of_range_policies_are_refused_with_the_field_named() {
        let count = |min_count, sketch_width| Lifecycle {
            admission: Some(Admission::Count {
                min_count,
                sketch_width,
            }),
            eviction: None,
        };
        let evict = |e: Eviction| Lifecycle {
            admission: None,
            eviction: Some(e),
        };
        let cases = [
            (count(0, 1 << 12), "min_count"),
            (count(256, 1 << 12), "min_count"),
            (count(2, 1000), "sketch_width"),
            (count(2, 1 << 30), "sketch_width"),
            (
                Lifecycle {
                    admission: Some(Admission::Probability { p: 0.0 }),
                    eviction: None,
                },
                "admission p",
            ),
            (
                Lifecycle {
                    admission: Some(Admission::Probability { p: f32::NAN }),
                    eviction: None,
                },
                "admission p",
            ),
            (
                evict(Eviction {
                    max_rows: Some(0),
                    ..Eviction::default()
                }),
                "max_rows",
            ),
            (
                evict(Eviction {
                    ttl_pushes: Some(5),
                    ttl_seconds: Some(5),
                    ..Eviction::default()
                }),
                "not both",
            ),
        ];
        for (l, field) in cases {
            let err = l.validate().unwrap_err();
            assert!(err.contains(field), "{err} should name {field}");
        }
    }
}
