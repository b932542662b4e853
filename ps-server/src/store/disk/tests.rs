//! The disk tier: its rows bit for bit, and a shard whose evicted rows
//! move to disk and back.

use super::*;
use crate::store::disk::scratch::tier;

#[test]
fn rows_round_trip_bit_for_bit_with_their_touch_record_and_changed_mark() {
    let (_dir, tier) = tier();
    let rows = tier.table(3);
    let floats = [1.5f32, -0.0, f32::MIN_POSITIVE];
    rows.put_many([(11, 7, (5, 9), true, &floats[..])]).unwrap();
    assert_eq!(rows.len(), 1);
    let got = rows.get_many(&[11, 12]).unwrap();
    assert_eq!(
        got,
        vec![
            Some(ColdRow {
                key: 7,
                meta: (5, 9),
                changed: true,
                floats: floats.to_vec()
            }),
            None
        ]
    );
    assert_eq!(
        got[0].as_ref().unwrap().floats[1].to_bits(),
        (-0.0f32).to_bits()
    );
    rows.mark_unchanged(&[11]).unwrap();
    assert!(!rows.get_many(&[11]).unwrap()[0].as_ref().unwrap().changed);
    assert_eq!(
        rows.take_many(&[11, 12]).unwrap()[0].as_ref().unwrap().key,
        7
    );
    assert_eq!((rows.len(), rows.stored()), (0, 0));
}

#[test]
fn a_range_walk_sees_only_its_keys_in_order_and_a_dropped_table_leaves_nothing() {
    let (_dir, tier) = tier();
    let rows = tier.table(1);
    let one = [1.0f32];
    rows.put_many([
        (30, 3, (0, 0), false, &one[..]),
        (10, 1, (0, 0), false, &one[..]),
        (20, 2, (0, 0), false, &one[..]),
    ])
    .unwrap();
    let mut seen = Vec::new();
    rows.for_range(10..=20, |r| seen.push(r.key)).unwrap();
    assert_eq!(seen, vec![1, 2]);
    drop(rows);
    let again = tier.table(1);
    assert_eq!(again.stored(), 0);
    tier.settle().unwrap();
    assert!(tier.file_bytes() > 0);
}

#[test]
fn a_row_of_the_wrong_length_is_an_error_naming_the_file() {
    let (_dir, tier) = tier();
    let rows = tier.table(2);
    rows.put_many([(1, 1, (0, 0), false, &[1.0f32][..])])
        .unwrap();
    let err = rows.get_many(&[1]).unwrap_err().to_string();
    assert!(
        err.contains("shard-0.tier.redb") && err.contains("2-float row"),
        "{err}"
    );
}

mod shard {
    //! A shard with a disk tier, against a twin without one.

    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use ps_common::lifecycle::{Eviction, Lifecycle};
    use ps_common::{InitializerSpec, OptimizerSpec, TableKind, TableSpec};

    use super::tier;
    use crate::store::Shard;

    fn spec(optimizer: OptimizerSpec, eviction: Eviction) -> TableSpec {
        TableSpec {
            name: "emb".into(),
            kind: TableKind::Sparse,
            dim: 3,
            initializer: InitializerSpec::Normal {
                mean: 0.0,
                std: 0.1,
            },
            optimizer,
            seed: 7,
            lifecycle: Lifecycle {
                admission: None,
                eviction: Some(eviction),
            },
        }
    }

    fn adam() -> OptimizerSpec {
        OptimizerSpec::Adam {
            lr: 0.01,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            l2: 0.0,
            weight_decay: 0.0,
        }
    }

    fn stats(shard: &Shard) -> (u64, u64) {
        let t = &shard.table_stats()[0];
        (t.rows, t.rows_on_disk)
    }

    fn grads(keys: &[u64], step: u64) -> Vec<f32> {
        (keys.iter())
            .flat_map(|&k| (0..3).map(move |j| ((k * 7 + j + step) % 11) as f32 * 0.1 - 0.5))
            .collect()
    }

    #[test]
    fn a_row_moved_to_disk_and_back_keeps_its_weights_and_optimizer_state_exactly() {
        let (_dir, disk) = tier();
        let tiered = Shard::new(0, 1).with_disk_tier(disk);
        let twin = Shard::new(0, 1);
        for (optimizer, name) in [(adam(), "adam"), (OptimizerSpec::adagrad(0.1), "adagrad")] {
            let spec = TableSpec {
                name: name.into(),
                ..spec(optimizer, Eviction::default())
            };
            tiered.create_table(spec.clone()).unwrap();
            twin.create_table(spec).unwrap();
        }
        let keys: Vec<u64> = (0..200).collect();
        let step = |shard: &Shard, s: u64| {
            for table in ["adam", "adagrad"] {
                shard.push(table, &keys, &grads(&keys, s)).unwrap();
            }
        };
        for s in 0..3 {
            step(&tiered, s);
            step(&twin, s);
        }
        let used = tiered.budget.used();
        for table in ["adam", "adagrad"] {
            assert_eq!(tiered.evict(table, &keys[..150], true), Ok(150));
        }
        let held = tiered.table_stats();
        assert!(
            held.iter().all(|t| (t.rows, t.rows_on_disk) == (50, 150)),
            "{held:?}"
        );
        assert!(
            tiered.budget.used() < used,
            "moving rows to disk frees their memory"
        );
        assert_eq!(
            tiered.snapshot().unwrap(),
            twin.snapshot().unwrap(),
            "on disk"
        );
        // A pull brings rows back; pushes to rows on disk apply to their
        // moved state: the twin, which never moved a row, agrees bit for bit.
        let (mut a, mut b) = (Vec::new(), Vec::new());
        tiered.pull("adam", &keys[..100], &mut a).unwrap();
        twin.pull("adam", &keys[..100], &mut b).unwrap();
        assert_eq!(a, b);
        let adam_rows = tiered
            .table_stats()
            .into_iter()
            .find(|t| t.spec.name == "adam");
        assert_eq!(
            adam_rows.map(|t| t.rows_on_disk),
            Some(50),
            "pulled rows came back"
        );
        for s in 3..6 {
            step(&tiered, s);
            step(&twin, s);
            for table in ["adam", "adagrad"] {
                tiered
                    .evict(table, &keys[(s as usize * 30)..], true)
                    .unwrap();
            }
        }
        assert_eq!(
            tiered.snapshot().unwrap(),
            twin.snapshot().unwrap(),
            "after moves both ways"
        );
        assert_eq!(tiered.budget.used() > 0, twin.budget.used() > 0);
    }

    #[test]
    fn pushes_racing_moves_to_disk_lose_no_update_and_pulls_never_see_a_row_go_back() {
        let (_dir, disk) = tier();
        let shard = Arc::new(Shard::new(0, 1).with_disk_tier(disk));
        let spec = TableSpec {
            initializer: InitializerSpec::Zeros,
            ..spec(OptimizerSpec::sgd(1.0), Eviction::default())
        };
        shard.create_table(spec).unwrap();
        let keys: Vec<u64> = (0..2_000).collect();
        let (pushers, rounds) = (3, 40);
        let done = Arc::new(AtomicBool::new(false));
        let mover = {
            let (shard, done) = (Arc::clone(&shard), Arc::clone(&done));
            std::thread::spawn(move || {
                let mut moved = 0;
                let mut at = 0u64;
                while !done.load(Ordering::Relaxed) {
                    let some: Vec<u64> = (0..500).map(|i| (at * 7919 + i * 13) % 2_000).collect();
                    moved += shard.evict("emb", &some, true).unwrap();
                    at += 1;
                }
                moved
            })
        };
        let reader = {
            let (shard, done) = (Arc::clone(&shard), Arc::clone(&done));
            let keys = keys.clone();
            std::thread::spawn(move || {
                // Each push adds 1 to every float: a row only ever grows.
                let mut last = vec![0f32; keys.len() * 3];
                while !done.load(Ordering::Relaxed) {
                    let mut now = Vec::new();
                    shard.pull("emb", &keys, &mut now).unwrap();
                    for (i, (a, b)) in last.iter().zip(&now).enumerate() {
                        assert!(b >= a, "key {} went back from {a} to {b}", keys[i / 3]);
                        assert_eq!(b.fract(), 0.0, "torn or partial row");
                    }
                    last = now;
                }
            })
        };
        let writers: Vec<_> = (0..pushers)
            .map(|_| {
                let (shard, keys) = (Arc::clone(&shard), keys.clone());
                std::thread::spawn(move || {
                    for _ in 0..rounds {
                        for chunk in keys.chunks(256) {
                            shard
                                .push("emb", chunk, &vec![-1.0; chunk.len() * 3])
                                .unwrap();
                        }
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        done.store(true, Ordering::Relaxed);
        let moved = mover.join().unwrap();
        reader.join().unwrap();
        assert!(moved > 0, "rows moved while pushes ran");
        let snapshot = shard.snapshot().unwrap();
        let table = &snapshot.tables[0];
        assert_eq!(table.keys, keys);
        assert!(
            table.values.iter().all(|&v| v == (pushers * rounds) as f32),
            "every push applied once"
        );
        let (rows, on_disk) = stats(&shard);
        assert_eq!(rows + on_disk, 2_000);
    }

    #[test]
    fn a_base_and_its_deltas_carry_rows_on_disk_and_moves_are_not_removals() {
        let (_dir, disk) = tier();
        let shard = Shard::new(0, 1).with_disk_tier(disk);
        shard
            .create_table(spec(adam(), Eviction::default()))
            .unwrap();
        let keys: Vec<u64> = (0..300).collect();
        shard.push("emb", &keys, &grads(&keys, 0)).unwrap();
        shard.evict("emb", &keys[..100], true).unwrap();
        let mut chain = shard.take_base(true).unwrap();
        assert_eq!(
            chain,
            shard.snapshot().unwrap(),
            "the base holds rows on disk"
        );
        // Changed rows move to disk; unchanged rows move; rows come back and
        // change; rows are dropped from memory and from disk.
        shard
            .push("emb", &keys[100..200], &grads(&keys[100..200], 1))
            .unwrap();
        shard.evict("emb", &keys[100..250], true).unwrap();
        let delta = shard.take_delta().unwrap();
        assert!(
            delta.tables[0].removed.is_empty(),
            "a move is not a removal"
        );
        assert_eq!(
            delta.tables[0].rows.keys,
            keys[100..200].to_vec(),
            "changed rows only"
        );
        chain.apply(delta).unwrap();
        assert_eq!(chain, shard.snapshot().unwrap());
        shard
            .push("emb", &keys[50..120], &grads(&keys[50..120], 2))
            .unwrap();
        shard.evict("emb", &[0, 1, 260, 261], false).unwrap();
        let delta = shard.take_delta().unwrap();
        assert_eq!(delta.tables[0].removed.len(), 4);
        chain.apply(delta).unwrap();
        assert_eq!(chain, shard.snapshot().unwrap());
        assert_eq!(
            shard.take_delta().unwrap().tables[0].rows.keys,
            Vec::<u64>::new()
        );
        // A restore into a shard with a tier holds it all in memory.
        let (_dir2, disk2) = tier();
        let restored = Shard::new(0, 1).with_disk_tier(disk2);
        restored.load(chain.clone()).unwrap();
        assert_eq!(restored.snapshot().unwrap(), chain);
        assert_eq!(stats(&restored), (296, 0));
    }

    #[test]
    fn a_restore_larger_than_the_budget_puts_the_rows_past_it_on_disk() {
        let source = Shard::new(0, 1);
        source
            .create_table(spec(adam(), Eviction::default()))
            .unwrap();
        let keys: Vec<u64> = (0..50_000).collect();
        source.push("emb", &keys, &grads(&keys, 0)).unwrap();
        let snapshot = source.snapshot().unwrap();
        // Room for the table and half its rows.
        let empty = Shard::new(0, 1);
        empty
            .create_table(spec(adam(), Eviction::default()))
            .unwrap();
        let base = empty.budget.used();
        let budget = base + (source.budget.used() - base) / 2;
        // Without a tier: refused, nothing loaded.
        let plain = Shard::new(0, 1);
        plain.budget.set_limit(budget);
        let refused = plain.load(snapshot.clone()).unwrap_err();
        assert!(refused.to_string().contains("--memory-budget"), "{refused}");
        // With one: memory up to the low water, the rest on disk, all there.
        let (_dir, disk) = tier();
        let tiered = Shard::new(0, 1).with_disk_tier(disk);
        tiered.budget.set_limit(budget);
        tiered.load(snapshot.clone()).unwrap();
        let (rows, on_disk) = stats(&tiered);
        assert_eq!(rows + on_disk, 50_000);
        assert!(
            rows > 10_000 && on_disk > 25_000,
            "{rows} in memory, {on_disk} on disk"
        );
        let used = tiered.budget.used();
        assert!(
            used as f64 <= crate::budget::LOW_WATER * budget as f64,
            "{used} of {budget}, {rows} rows"
        );
        assert_eq!(tiered.snapshot().unwrap(), snapshot);
        // Rows restored to disk come back under the table's bounds: a push
        // to them is applied as on the source.
        let cold: Vec<u64> = (49_900..50_000).collect();
        tiered.push("emb", &cold, &grads(&cold, 1)).unwrap();
        source.push("emb", &cold, &grads(&cold, 1)).unwrap();
        assert_eq!(tiered.snapshot().unwrap(), source.snapshot().unwrap());
    }

    #[test]
    fn rows_on_disk_past_their_ttl_are_found_and_dropped() {
        let (_dir, disk) = tier();
        let shard = Shard::new(0, 1).with_disk_tier(disk);
        let ttl = Eviction {
            ttl_pushes: Some(3),
            ..Eviction::default()
        };
        shard.create_table(spec(adam(), ttl)).unwrap();
        shard
            .push("emb", &[1, 2, 3], &grads(&[1, 2, 3], 0))
            .unwrap();
        shard.evict("emb", &[1, 2], true).unwrap();
        let table = shard.table("emb").unwrap();
        assert_eq!(table.expired_keys_on_disk(10).unwrap(), Vec::<u64>::new());
        for s in 0..3 {
            shard.push("emb", &[9], &grads(&[9], s)).unwrap();
        }
        let mut expired = table.expired_keys_on_disk(10).unwrap();
        expired.sort_unstable();
        assert_eq!(expired, vec![1, 2]);
        assert_eq!(table.expired_keys(10), vec![3], "in memory, as before");
        assert_eq!(shard.evict("emb", &expired, false), Ok(2));
        assert_eq!(stats(&shard), (2, 0));
        let mut pulled = Vec::new();
        shard.pull("emb", &[1], &mut pulled).unwrap();
        let fresh = Shard::new(0, 1);
        fresh
            .create_table(spec(adam(), Eviction::default()))
            .unwrap();
        let mut want = Vec::new();
        fresh.pull("emb", &[1], &mut want).unwrap();
        assert_eq!(
            pulled, want,
            "a dropped row comes back fresh, not from disk"
        );
    }

    #[test]
    fn a_read_only_shard_reads_rows_on_disk_where_they_lie() {
        let (_dir, disk) = tier();
        let shard = Shard::new(0, 1).with_disk_tier(disk);
        shard
            .create_table(spec(adam(), Eviction::default()))
            .unwrap();
        shard.push("emb", &[4, 5], &grads(&[4, 5], 0)).unwrap();
        let mut before = Vec::new();
        shard.pull("emb", &[4, 5, 6], &mut before).unwrap();
        shard.evict("emb", &[4, 5, 6], true).unwrap();
        shard.set_read_only(true);
        let mut after = Vec::new();
        shard.pull("emb", &[5, 4, 6, 7], &mut after).unwrap();
        assert_eq!(&after[..3], &before[3..6]);
        assert_eq!(&after[3..6], &before[..3]);
        assert_eq!(&after[6..9], &before[6..9]);
        assert_eq!(stats(&shard), (0, 3), "nothing came back or was created");
    }
}
