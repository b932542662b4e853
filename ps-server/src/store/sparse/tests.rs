//! The sparse row store against a `HashMap` model (with and without a
//! disk tier), its memory bound, and its switch to wide index entries.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};

use proptest::prelude::*;

use super::*;
use index::Entries;

/// Fills a fresh row with values derived from its key, so a row read back
/// under the wrong key is caught.
fn fill(key: u64, row: &mut [f32]) {
    for (i, v) in row.iter_mut().enumerate() {
        *v = (key % 1000) as f32 + i as f32 * 0.5;
    }
}

fn expected(key: u64, len: usize) -> Vec<f32> {
    let mut row = vec![0.0; len];
    fill(key, &mut row);
    row
}

/// Every row `rows` holds, in memory or on disk, by key.
fn contents(rows: &SparseRows) -> HashMap<u64, Vec<f32>> {
    let mut all = HashMap::new();
    rows.for_each(|key, row| {
        assert!(all.insert(key, row.to_vec()).is_none(), "key {key} twice");
    })
    .unwrap();
    all
}

#[derive(Debug, Clone)]
enum Op {
    /// One batch read (rows created as needed).
    Pull(Vec<u64>),
    /// One batch update adding the delta to every float of each row, once
    /// per occurrence of its key.
    Push(Vec<u64>, f32),
    /// One key, updated alone.
    PushOne(u64, f32),
    Remove(u64),
    /// Rows moved to disk (a no-op without a disk tier).
    Spill(Vec<u64>),
    /// Rows dropped from whichever tier holds them.
    Drop(Vec<u64>),
    /// One batch read that neither creates nor brings rows back (a read
    /// replica's).
    Peek(Vec<u64>),
}

fn op(keys: u64) -> impl Strategy<Value = Op> {
    // Few distinct keys, some at the ends of the range, so rows collide,
    // repeat (within a batch too) and are removed and re-created.
    let key = prop_oneof![0..keys, Just(u64::MAX), Just(u64::MAX - 1), any::<u64>()];
    let batch = prop::collection::vec(key.clone(), 1..80);
    prop_oneof![
        batch.clone().prop_map(Op::Pull),
        (batch.clone(), -4.0f32..4.0).prop_map(|(k, d)| Op::Push(k, d)),
        (key.clone(), -4.0f32..4.0).prop_map(|(k, d)| Op::PushOne(k, d)),
        key.prop_map(Op::Remove),
        batch.clone().prop_map(Op::Spill),
        batch.clone().prop_map(Op::Drop),
        batch.prop_map(Op::Peek),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Any sequence of creations, updates, removals, moves to disk and
    /// back, and drops leaves the store holding exactly what a map would,
    /// narrow or wide index alike, with or without a disk tier; every
    /// row's touch record (last touch, touches) follows its row through
    /// slab growth, removals and the disk.
    #[test]
    fn the_store_holds_what_a_map_would(
        ops in prop::collection::vec(op(3000), 1..400),
        row_len in 1usize..5,
        narrow_rows in prop_oneof![Just(NARROW_ROWS), 1usize..40],
        disk in any::<bool>(),
    ) {
        let (_dir, tier) = crate::store::disk::scratch::tier();
        let mut rows = SparseRows::with_narrow_rows(row_len, narrow_rows, true);
        if disk {
            rows.cold = Some(tier.table(row_len));
        }
        let mut model: HashMap<u64, Vec<f32>> = HashMap::new();
        let mut on_disk: HashSet<u64> = HashSet::new();
        let mut touches: HashMap<u64, (u32, u32)> = HashMap::new();
        for op in ops {
            let now = rows.tick() + 1;
            let touch = |touches: &mut HashMap<u64, (u32, u32)>, key: u64| {
                let t = touches.entry(key).or_insert((0, 0));
                *t = (now, t.1 + 1);
            };
            // Rows a write or a storing read creates or brings back.
            let added = |keys: &[u64], model: &HashMap<u64, Vec<f32>>, on_disk: &HashSet<u64>| {
                let mut new: Vec<u64> = (keys.iter().copied())
                    .filter(|k| !model.contains_key(k) || on_disk.contains(k))
                    .collect();
                new.sort_unstable();
                new.dedup();
                new.len()
            };
            match op {
                Op::Pull(keys) => {
                    let want_added = added(&keys, &model, &on_disk);
                    let mut seen = vec![Vec::new(); keys.len()];
                    let created = rows.read_many(&keys, true, true, fill, |i, r| seen[i] = r.to_vec()).unwrap();
                    prop_assert_eq!(created, want_added);
                    keys.iter().for_each(|k| { on_disk.remove(k); });
                    for (key, seen) in keys.iter().zip(&seen) {
                        let want = model.entry(*key).or_insert_with(|| expected(*key, row_len));
                        prop_assert_eq!(seen, want);
                        touch(&mut touches, *key);
                    }
                }
                Op::Push(keys, delta) => {
                    let want_added = added(&keys, &model, &on_disk);
                    let created = rows.update_many(&keys, fill, |_| {}, |_, r| r.iter_mut().for_each(|v| *v += delta)).unwrap();
                    prop_assert_eq!(created, want_added);
                    keys.iter().for_each(|k| { on_disk.remove(k); });
                    for key in &keys {
                        let want = model.entry(*key).or_insert_with(|| expected(*key, row_len));
                        want.iter_mut().for_each(|v| *v += delta);
                        touch(&mut touches, *key);
                    }
                }
                Op::PushOne(key, delta) => {
                    let how = match (model.contains_key(&key), on_disk.remove(&key)) {
                        (false, _) => Added::Created,
                        (true, true) => Added::Loaded,
                        (true, false) => Added::Found,
                    };
                    let created = rows.update(key, |r| fill(key, r), |r| r.iter_mut().for_each(|v| *v += delta)).unwrap();
                    prop_assert_eq!(created, how);
                    let want = model.entry(key).or_insert_with(|| expected(key, row_len));
                    want.iter_mut().for_each(|v| *v += delta);
                    touch(&mut touches, key);
                }
                Op::Remove(key) => {
                    // Only a row in memory: a refused push's row is never on disk.
                    let in_memory = model.contains_key(&key) && !on_disk.contains(&key);
                    prop_assert_eq!(rows.remove_if(key, |_| true), in_memory);
                    if in_memory {
                        model.remove(&key);
                        touches.remove(&key);
                    }
                }
                Op::Spill(keys) => {
                    let mut moving: Vec<u64> = (keys.iter().copied())
                        .filter(|k| disk && model.contains_key(k) && !on_disk.contains(k))
                        .collect();
                    moving.sort_unstable();
                    moving.dedup();
                    prop_assert_eq!(rows.spill(&keys).unwrap(), moving.len());
                    on_disk.extend(moving);
                }
                Op::Drop(keys) => {
                    let mut want = Dropped::default();
                    for k in keys.iter().copied().collect::<HashSet<_>>() {
                        if model.remove(&k).is_some() {
                            touches.remove(&k);
                            match on_disk.remove(&k) {
                                true => want.disk += 1,
                                false => want.memory += 1,
                            }
                        }
                    }
                    prop_assert_eq!(rows.drop_rows(&keys).unwrap(), want);
                }
                Op::Peek(keys) => {
                    let mut seen = vec![Vec::new(); keys.len()];
                    let added = rows.read_many(&keys, false, false, fill, |i, r| seen[i] = r.to_vec()).unwrap();
                    prop_assert_eq!(added, 0);
                    for (key, seen) in keys.iter().zip(&seen) {
                        let want = model.get(key).cloned().unwrap_or_else(|| expected(*key, row_len));
                        prop_assert_eq!(seen, &want);
                        if model.contains_key(key) && !on_disk.contains(key) {
                            touch(&mut touches, *key);
                        }
                    }
                }
            }
            prop_assert_eq!(rows.len(), model.len() - on_disk.len());
            prop_assert_eq!(rows.on_disk(), on_disk.len() as u64);
        }
        prop_assert_eq!(contents(&rows), model.clone());
        let probe: Vec<u64> = model.keys().copied().chain([1 << 40, 7 << 40]).collect();
        let held: Vec<bool> = probe.iter().map(|k| model.contains_key(k)).collect();
        prop_assert_eq!(rows.contains_many(&probe).unwrap(), held);
        if let Some(cold) = &rows.cold {
            prop_assert_eq!(cold.stored(), on_disk.len() as u64);
        }
        for (key, want) in &model {
            if on_disk.contains(key) {
                let cold = rows.cold.as_ref().unwrap().get_many(&[mix64(*key)]).unwrap();
                let row = cold[0].as_ref().unwrap();
                prop_assert_eq!(&row.floats, want);
                prop_assert_eq!(Some(row.meta), touches.get(key).copied());
                continue;
            }
            let held = rows.read(*key, <[f32]>::to_vec);
            prop_assert_eq!(held.as_ref(), Some(want));
            prop_assert_eq!(rows.meta_of(*key), touches.get(key).copied());
        }
    }
}

#[test]
fn a_refused_removal_keeps_the_row() {
    let rows = SparseRows::new(2, false, None);
    rows.update(7, |r| fill(7, r), |_| ()).unwrap();
    assert!(!rows.remove_if(7, |_| false));
    assert_eq!(rows.read(7, <[f32]>::to_vec), Some(expected(7, 2)));
    assert!(!rows.remove_if(8, |_| true), "no row 8");
    assert!(rows.remove_if(7, |r| r == expected(7, 2).as_slice()));
    assert_eq!(rows.len(), 0);
    assert_eq!(rows.contains_many(&[7]).unwrap(), vec![false]);
}

#[test]
fn segments_past_the_narrow_limit_switch_to_wide_entries_and_keep_every_row() {
    let rows = SparseRows::with_narrow_rows(1, 8, false);
    for key in 0..5000u64 {
        rows.update(key, |r| fill(key, r), |_| ()).unwrap();
    }
    let wide = rows
        .segments
        .iter()
        .filter(|s| matches!(read(s).index, Entries::Wide(_)))
        .count();
    assert_eq!(wide, SEGMENTS, "every segment holds more than 8 rows");
    for key in (0..5000u64).step_by(3) {
        assert!(rows.remove_if(key, |_| true));
    }
    for key in 0..5000u64 {
        let held = rows.read(key, <[f32]>::to_vec);
        let want = (key % 3 != 0).then(|| expected(key, 1));
        assert_eq!(held, want, "key {key}");
    }
}

#[test]
fn a_row_costs_at_most_sixteen_bytes_beyond_its_floats() {
    // Row lengths of dim 1 and dim 16 under Adagrad; enough rows that each
    // segment fills several full slabs.
    for row_len in [2usize, 32] {
        for n in [200_000u64, 300_000] {
            let rows = SparseRows::new(row_len, false, None);
            for i in 0..n {
                let key = mix64(i);
                rows.update(key, |r| fill(key, r), |_| ()).unwrap();
            }
            let floats = n * row_len as u64 * 4;
            let overhead = rows.allocated_bytes() - floats;
            // Per segment, at most one partly filled slab.
            let slack = slack_bytes(row_len);
            assert!(
                overhead <= n * ROW_OVERHEAD + slack,
                "{n} rows of {row_len} floats: {overhead} bytes beyond the floats"
            );
        }
    }
}

#[test]
fn rows_of_a_cache_line_s_multiple_start_on_a_line() {
    // 16 floats (dim 16, SGD) fill a 64-byte line; 32 (dim 16, Adagrad) two.
    for row_len in [16usize, 32] {
        let rows = SparseRows::new(row_len, false, None);
        for key in 0..20_000u64 {
            rows.update(key, |r| fill(key, r), |_| ()).unwrap();
        }
        for key in 0..20_000u64 {
            let offset = rows.read(key, |r| r.as_ptr().addr() % 64);
            assert_eq!(offset, Some(0), "row_len {row_len}, key {key}");
        }
    }
}

#[test]
fn a_small_table_stays_small() {
    for row_len in [2usize, 300] {
        let rows = SparseRows::new(row_len, false, None);
        let n = 1000u64;
        for key in 0..n {
            rows.update(key, |r| fill(key, r), |_| ()).unwrap();
        }
        // About 16 rows per segment: each first slab holds less than twice
        // its rows; each index fewer than 64 entries.
        let slabs = 2 * n as usize * (8 + row_len * 4);
        let most = (slabs + SEGMENTS * 64 * 4) as u64;
        assert!(rows.allocated_bytes() <= most, "{}", rows.allocated_bytes());
        for key in 0..n {
            assert_eq!(
                rows.read(key, <[f32]>::to_vec),
                Some(expected(key, row_len))
            );
        }
    }
}

#[test]
fn slabs_hold_about_64_kib_and_at_least_one_row() {
    assert_eq!(chunk_rows(1), 1024);
    assert_eq!(chunk_rows(32), 256);
    assert_eq!(chunk_rows(100_000), 1);
    for row_len in [1usize, 2, 7, 32, 300, 5000] {
        let bytes = chunk_rows(row_len) * (row_len * 4 + 8);
        let rows = chunk_rows(row_len);
        assert!(bytes <= CHUNK_BYTES || rows == MIN_CHUNK_ROWS);
        assert!(bytes * 2 > CHUNK_BYTES || rows == MAX_CHUNK_ROWS);
    }
}

#[test]
fn removing_every_row_frees_the_slabs() {
    let rows = SparseRows::new(4, false, None);
    for key in 0..10_000u64 {
        rows.update(key, |r| fill(key, r), |_| ()).unwrap();
    }
    for key in 0..10_000u64 {
        assert!(rows.remove_if(key, |_| true));
    }
    assert_eq!(rows.len(), 0);
    assert!(rows.segments.iter().all(|s| read(s).chunks.is_empty()));
}

#[test]
fn a_table_large_enough_to_prefetch_reads_and_writes_every_row_under_its_key() {
    // Past PREFETCH_ROWS rows in every segment, batch reads and writes
    // load entries and rows ahead of the key they serve: they must still
    // hand each key its own row, whatever is missing or repeated, with
    // narrow and with wide index entries.
    for narrow_rows in [NARROW_ROWS, PREFETCH_ROWS] {
        prefetched_rows_are_the_keys_own(narrow_rows);
    }
}

fn prefetched_rows_are_the_keys_own(narrow_rows: usize) {
    let (rows, n) = large_table_with(narrow_rows);
    // Mostly held keys, some missing (>= n), some repeated.
    let probe: Vec<u64> = (0..20_000u64)
        .map(|i| mix64(i ^ 0xabc) % (n + n / 4))
        .collect();
    let mut seen = vec![None; probe.len()];
    rows.read_many(&probe, true, true, fill, |i, row| {
        seen[i] = Some(row.to_vec())
    })
    .unwrap();
    for (key, row) in probe.iter().zip(&seen) {
        assert_eq!(
            row.as_deref(),
            Some(expected(*key, 2).as_slice()),
            "key {key}"
        );
    }
    // The caller's hint for position i (a push prefetches its gradient)
    // comes once, before i is written; only the first few positions of
    // each segment's run come unannounced.
    let hinted = RefCell::new(vec![false; probe.len()]);
    let written = RefCell::new(vec![false; probe.len()]);
    let mut unannounced = 0;
    rows.update_many(
        &probe,
        fill,
        |i| {
            assert!(!written.borrow()[i], "position {i} hinted after its write");
            assert!(!hinted.borrow()[i], "position {i} hinted twice");
            hinted.borrow_mut()[i] = true;
        },
        |i, row| {
            row[1] += 1.0;
            written.borrow_mut()[i] = true;
            unannounced += usize::from(!hinted.borrow()[i]);
        },
    )
    .unwrap();
    assert!(
        written.borrow().iter().all(|&w| w),
        "every position written"
    );
    assert!(
        unannounced <= SEGMENTS * AHEAD,
        "{unannounced} positions written without a hint"
    );
    assert_pushed_once_per_occurrence(&rows, &probe);
}

/// A table past the prefetch size (where pulls leave hints), its rows
/// `0..n` created by a write, so no pull has left any hint yet.
fn large_table() -> (SparseRows, u64) {
    large_table_with(NARROW_ROWS)
}

/// [`large_table`] with wide index entries past `narrow_rows` rows a segment.
fn large_table_with(narrow_rows: usize) -> (SparseRows, u64) {
    let n = (SEGMENTS * PREFETCH_ROWS * 5 / 4) as u64;
    let rows = SparseRows::with_narrow_rows(2, narrow_rows, false);
    let keys: Vec<u64> = (0..n).collect();
    rows.update_many(&keys, fill, |_| {}, |_, _| {}).unwrap();
    assert!(rows.segments.iter().all(|s| read(s).len >= PREFETCH_ROWS));
    assert_eq!(rows.pulled.held(), (0, 0), "a write leaves no hints");
    (rows, n)
}

/// Pulls `keys` (creating missing rows), then pushes them, adding 1 to the
/// second float of a row per occurrence of its key; returns the rows the
/// push found through hints.
fn pull_then_push(rows: &SparseRows, pulled: &[u64], pushed: &[u64]) -> u64 {
    rows.read_many(pulled, true, true, fill, |_, _| {}).unwrap();
    let before = rows.hinted_rows();
    rows.update_many(pushed, fill, |_| {}, |_, row| row[1] += 1.0)
        .unwrap();
    rows.hinted_rows() - before
}

/// Every key's row is its fresh row plus one on the second float per
/// occurrence of the key in `pushed`.
fn assert_pushed_once_per_occurrence(rows: &SparseRows, pushed: &[u64]) {
    let mut counts = HashMap::new();
    for &key in pushed {
        *counts.entry(key).or_insert(0.0f32) += 1.0;
    }
    for (&key, &times) in &counts {
        let mut want = expected(key, 2);
        want[1] += times;
        assert_eq!(rows.read(key, <[f32]>::to_vec), Some(want), "key {key}");
    }
}

#[test]
fn a_push_of_the_keys_a_pull_found_writes_the_rows_it_found() {
    let (rows, n) = large_table();
    // Mostly held keys, some missing (created by the pull), some repeated.
    let keys: Vec<u64> = (0..20_000u64)
        .map(|i| mix64(i ^ 0x77) % (n + n / 4))
        .collect();
    let found_by_pull = keys.iter().filter(|&&k| k < n).count() as u64;
    assert!(found_by_pull < keys.len() as u64, "some keys are new");
    let hinted = pull_then_push(&rows, &keys, &keys);
    assert_eq!(hinted, found_by_pull, "every row the pull found");
    assert_pushed_once_per_occurrence(&rows, &keys);
    assert_eq!(rows.pulled.held(), (0, 0), "the push took its hints");
}

#[test]
fn a_pull_of_mostly_new_keys_leaves_no_hints() {
    let (rows, n) = large_table();
    let new: Vec<u64> = (n..n + 5_000).collect();
    rows.read_many(&new, true, true, fill, |_, _| {}).unwrap();
    assert_eq!(
        rows.pulled.held(),
        (0, 0),
        "a table filling up keeps no row numbers"
    );
    let half: Vec<u64> = (n - 2_500..n + 7_500).collect();
    rows.read_many(&half, true, true, fill, |_, _| {}).unwrap();
    assert_eq!(rows.pulled.held(), (1, half.len()), "most found: kept");
}

#[test]
fn a_push_of_other_keys_takes_no_hint() {
    let (rows, _) = large_table();
    let keys: Vec<u64> = (0..5_000u64).map(|i| i * 31).collect();
    let mut reversed = keys.clone();
    reversed.reverse();
    assert_eq!(pull_then_push(&rows, &keys, &reversed), 0);
    assert_eq!(rows.pulled.held(), (1, keys.len()), "the pull's hints stay");
    assert_eq!(pull_then_push(&rows, &keys[..300], &keys[..300]), 300);
    assert_pushed_once_per_occurrence(&rows, &[reversed.as_slice(), &keys[..300]].concat());
}

#[test]
fn a_hint_to_a_row_that_moved_is_checked_and_the_key_looked_up() {
    let (rows, n) = large_table();
    let keys: Vec<u64> = (0..20_000u64).map(|i| mix64(i ^ 0x99) % n).collect();
    rows.read_many(&keys, true, true, fill, |_, _| {}).unwrap();
    // Removing rows moves each segment's last rows into the holes: some
    // hinted rows now hold other keys, some are past the segment's end.
    let removed: HashSet<u64> = keys.iter().copied().filter(|k| k % 3 == 0).collect();
    for k in (0..n).filter(|k| k % 3 == 0) {
        assert!(rows.remove_if(k, |_| true));
    }
    let before = rows.hinted_rows();
    rows.update_many(&keys, fill, |_| {}, |_, row| row[1] += 1.0)
        .unwrap();
    let hinted = rows.hinted_rows() - before;
    assert!(hinted > 0, "rows that did not move are still hinted");
    let kept = keys.iter().filter(|k| !removed.contains(k)).count() as u64;
    assert!(
        hinted < kept,
        "{hinted} of {kept} kept rows hinted: some moved"
    );
    // Removed keys came back fresh; every row is its own key's.
    assert_pushed_once_per_occurrence(&rows, &keys);
    assert_eq!(rows.len() as u64, n - n.div_ceil(3) + removed.len() as u64);
}

/// Pulls and pushes of one key list from two threads while a third removes
/// and re-creates other rows of the same segments, moving the pushed rows
/// about: a push never writes through a stale hint, so every pushed row
/// ends with exactly the pushes made to it.
#[test]
fn hints_stay_right_while_rows_move_under_concurrent_removals() {
    const ROUNDS: usize = 20;
    const PUSHERS: usize = 2;
    let (rows, n) = large_table();
    let pushed: Vec<u64> = (0..n).filter(|k| k % 40 == 1).collect();
    let churned: Vec<u64> = (0..n).filter(|k| k % 40 == 2).collect();
    let done = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for _ in 0..PUSHERS {
            let (rows, pushed, done) = (&rows, &pushed, &done);
            scope.spawn(move || {
                for _ in 0..ROUNDS {
                    for chunk in pushed.chunks(4096) {
                        pull_then_push(rows, chunk, chunk);
                    }
                }
                done.fetch_add(1, Ordering::SeqCst);
            });
        }
        let (rows, churned, done) = (&rows, &churned, &done);
        scope.spawn(move || {
            while done.load(Ordering::SeqCst) < PUSHERS {
                for &k in churned {
                    rows.remove_if(k, |_| true);
                }
                for &k in churned {
                    rows.update(k, |row| fill(k, row), |_| {}).unwrap();
                }
            }
        });
    });
    assert!(rows.hinted_rows() > 0, "pushes went through hints");
    for &key in &pushed {
        let mut want = expected(key, 2);
        want[1] += (PUSHERS * ROUNDS) as f32;
        assert_eq!(rows.read(key, <[f32]>::to_vec), Some(want), "key {key}");
    }
}
