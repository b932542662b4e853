//! A sparse table's lifecycle, specified with exact counts on small
//! generated streams: admission, TTL, row caps by LRU and LFU, snapshots of
//! the admission state, and eviction racing pushes.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use ps_common::lifecycle::{Admission, Eviction, EvictionPolicy, Lifecycle};
use ps_common::{InitializerSpec, OptimizerSpec, TableKind, TableSpec};

use crate::store::Shard;

fn table(lifecycle: Lifecycle, dim: u32) -> Shard {
    let shard = Shard::new(0, 1);
    shard
        .create_table(TableSpec {
            name: "emb".into(),
            kind: TableKind::Sparse,
            dim,
            initializer: InitializerSpec::Constant { value: 0.5 },
            optimizer: OptimizerSpec::sgd(1.0),
            seed: 3,
            lifecycle,
        })
        .unwrap();
    shard
}

fn admit_at(min_count: u32) -> Lifecycle {
    Lifecycle {
        admission: Some(Admission::Count {
            min_count,
            sketch_width: 1 << 12,
        }),
        eviction: None,
    }
}

fn evict(eviction: Eviction) -> Lifecycle {
    Lifecycle {
        admission: None,
        eviction: Some(eviction),
    }
}

fn weights(shard: &Shard, keys: &[u64]) -> Vec<f32> {
    let mut out = Vec::new();
    shard.pull("emb", keys, &mut out).unwrap();
    out
}

fn stats(shard: &Shard) -> crate::store::TableStats {
    shard.table_stats().remove(0)
}

#[test]
fn an_id_gets_a_row_at_its_min_count_th_push_and_pulls_before_store_nothing() {
    let shard = table(admit_at(3), 1);
    assert_eq!(
        shard.push("emb", &[7], &[1.0]),
        Ok(0),
        "1st: counted, dropped"
    );
    assert_eq!(
        weights(&shard, &[7]),
        [0.5],
        "a pull answers the initializer"
    );
    assert_eq!(shard.push("emb", &[7], &[1.0]), Ok(0), "2nd: dropped");
    let s = stats(&shard);
    assert_eq!((s.rows, s.admitted_rows, s.filtered_pushes), (0, 0, 2));
    assert_eq!(
        shard.push("emb", &[7, 8], &[2.0, 1.0]),
        Ok(1),
        "3rd admits 7"
    );
    assert_eq!(
        weights(&shard, &[7]),
        [0.5 - 2.0],
        "the admitting push applies"
    );
    assert_eq!(
        shard.push("emb", &[7], &[1.0]),
        Ok(1),
        "a held id always may"
    );
    let s = stats(&shard);
    assert_eq!((s.rows, s.admitted_rows, s.filtered_pushes), (1, 1, 3));
}

#[test]
fn repeats_of_an_id_admitted_in_the_same_push_are_all_applied() {
    let shard = table(admit_at(2), 1);
    assert_eq!(shard.push("emb", &[4, 4, 4], &[1.0, 1.0, 1.0]), Ok(2));
    assert_eq!(weights(&shard, &[4]), [0.5 - 2.0]);
}

#[test]
fn probability_admission_admits_about_p_of_new_ids() {
    let shard = table(
        Lifecycle {
            admission: Some(Admission::Probability { p: 0.5 }),
            eviction: None,
        },
        1,
    );
    let keys: Vec<u64> = (0..10_000).collect();
    shard.push("emb", &keys, &vec![1.0; keys.len()]).unwrap();
    let s = stats(&shard);
    assert_eq!(s.admitted_rows + s.filtered_pushes, 10_000);
    assert_eq!(s.rows, s.admitted_rows);
    assert!((4_700..5_300).contains(&s.rows), "{} rows", s.rows);
}

#[test]
fn rows_untouched_for_ttl_pushes_expire_and_no_other() {
    let shard = table(
        evict(Eviction {
            ttl_pushes: Some(3),
            ..Eviction::default()
        }),
        1,
    );
    shard.push("emb", &[1, 2], &[1.0, 1.0]).unwrap(); // push clock 1
    shard.push("emb", &[2], &[1.0]).unwrap(); // 2
    weights(&shard, &[3]); // a pull touches (and creates) 3 at clock 2
    shard.push("emb", &[2], &[1.0]).unwrap(); // 3
    let t = shard.table("emb").unwrap();
    assert!(t.expired_keys(100).is_empty(), "1 was touched 2 pushes ago");
    shard.push("emb", &[2], &[1.0]).unwrap(); // 4: 1 is 3 pushes old
    assert_eq!(t.expired_keys(100), [1]);
    shard.push("emb", &[2], &[1.0]).unwrap(); // 5: 3 is 3 pushes old
    let mut expired = t.expired_keys(100);
    expired.sort_unstable();
    assert_eq!(expired, [1, 3]);
    assert_eq!(shard.evict("emb", &expired, false), Ok(2));
    assert_eq!(shard.evict("emb", &expired, false), Ok(0), "gone already");
    let s = stats(&shard);
    assert_eq!((s.rows, s.evicted_rows), (1, 2));
    assert_eq!(weights(&shard, &[1]), [0.5], "an evicted id starts afresh");
}

#[test]
fn past_max_rows_the_least_recently_touched_go_first() {
    let shard = table(
        evict(Eviction {
            max_rows: Some(6),
            policy: EvictionPolicy::Lru,
            ..Eviction::default()
        }),
        2,
    );
    for k in 0..10u64 {
        shard.push("emb", &[k], &[1.0, 1.0]).unwrap();
    }
    weights(&shard, &[1]); // touched again: no longer among the coldest
    let t = shard.table("emb").unwrap();
    let mut coldest = t.coldest_keys(4);
    coldest.sort_unstable();
    assert_eq!(coldest, [0, 2, 3, 4]);
}

#[test]
fn past_max_rows_the_least_frequently_touched_go_first() {
    let shard = table(
        evict(Eviction {
            max_rows: Some(3),
            policy: EvictionPolicy::Lfu,
            ..Eviction::default()
        }),
        1,
    );
    // Key k is touched k + 1 times; key 0 last, so LRU would keep it.
    for k in (0..6u64).rev() {
        for _ in 0..=k {
            shard.push("emb", &[k], &[1.0]).unwrap();
        }
    }
    let t = shard.table("emb").unwrap();
    let mut coldest = t.coldest_keys(3);
    coldest.sort_unstable();
    assert_eq!(coldest, [0, 1, 2]);
    t.halve_touches();
    let mut coldest = t.coldest_keys(2);
    coldest.sort_unstable();
    assert_eq!(coldest, [0, 1], "halving keeps the order");
}

#[test]
fn eviction_is_charged_and_released_in_the_memory_budget() {
    let shard = table(evict(Eviction::default()), 4);
    let t = shard.table("emb").unwrap();
    let before = shard.budget.used();
    let keys: Vec<u64> = (0..100).collect();
    weights(&shard, &keys);
    let per_row = t.sparse_row_bytes();
    assert_eq!(
        per_row,
        4 * 4 + 16 + 8,
        "floats, key and index, touch record"
    );
    assert_eq!(shard.budget.used() - before, 100 * per_row);
    shard.evict("emb", &keys[..40], false).unwrap();
    assert_eq!(shard.budget.used() - before, 60 * per_row);
}

#[test]
fn a_snapshot_keeps_the_admission_counts() {
    let shard = table(admit_at(3), 1);
    shard.push("emb", &[7, 7], &[1.0, 1.0]).unwrap();
    let restored = Shard::restore(shard.snapshot().unwrap()).unwrap();
    assert_eq!(
        restored.push("emb", &[7], &[1.0]),
        Ok(1),
        "the restored sketch remembers two pushes"
    );
}

#[test]
fn dense_tables_and_unknown_tables_cannot_be_evicted() {
    let shard = table(Lifecycle::default(), 1);
    shard
        .create_table(TableSpec {
            name: "bias".into(),
            kind: TableKind::Dense {
                rows: 1,
                block_rows: 1,
            },
            dim: 1,
            initializer: InitializerSpec::Zeros,
            optimizer: OptimizerSpec::sgd(1.0),
            seed: 0,
            lifecycle: Lifecycle::default(),
        })
        .unwrap();
    assert!(shard.evict("bias", &[0], false).is_err());
    assert!(shard.evict("nope", &[0], false).is_err());
}

/// Pushes race evictions: no row is ever torn (every float of a row moves
/// together), and a row never evicted keeps every update pushed to it.
#[test]
fn eviction_during_concurrent_pushes_never_tears_a_row_or_loses_an_update_to_a_kept_row() {
    const DIM: usize = 8;
    const ROUNDS: usize = 300;
    let shard = Arc::new(table(evict(Eviction::default()), DIM as u32));
    // Even keys are kept; odd keys are evicted again and again.
    let keys: Vec<u64> = (0..2_000).collect();
    let pushers: Vec<_> = (0..3)
        .map(|_| {
            let (shard, keys) = (Arc::clone(&shard), keys.clone());
            std::thread::spawn(move || {
                let grads = vec![-1.0f32; keys.len() * DIM];
                for _ in 0..ROUNDS {
                    shard.push("emb", &keys, &grads).unwrap();
                }
            })
        })
        .collect();
    let evictor = {
        let shard = Arc::clone(&shard);
        std::thread::spawn(move || {
            let odd: Vec<u64> = (0..2_000).filter(|k| k % 2 == 1).collect();
            let mut evicted = 0;
            for round in 0..200 {
                let batch: Vec<u64> = odd.iter().copied().skip(round % 7).step_by(7).collect();
                evicted += shard.evict("emb", &batch, false).unwrap();
                for row in weights(&shard, &[1, 2, 3]).chunks(DIM) {
                    assert!(row.iter().all(|&v| v == row[0]), "torn row {row:?}");
                }
            }
            evicted
        })
    };
    for p in pushers {
        p.join().unwrap();
    }
    let evicted = evictor.join().unwrap();
    assert!(evicted > 0);
    let t = shard.table("emb").unwrap();
    assert_eq!(t.evicted.load(Ordering::Relaxed), evicted as u64);
    let mut rows = std::collections::HashMap::new();
    t.for_each_row(|k, row| {
        rows.insert(k, row.to_vec());
    })
    .unwrap();
    assert_eq!(rows.len(), t.len());
    for (k, row) in rows {
        assert!(row.iter().all(|&v| v == row[0]), "torn row {k}: {row:?}");
        if k % 2 == 0 {
            assert_eq!(
                row[0],
                0.5 + (3 * ROUNDS) as f32,
                "kept row {k} lost updates"
            );
        } else {
            assert!(row[0] <= 0.5 + (3 * ROUNDS) as f32);
        }
    }
}
