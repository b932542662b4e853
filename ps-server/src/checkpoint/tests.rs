//! Checkpoint files: exact restores, refusals, concurrent writers, the
//! newest loadable one, and incremental chains.

use super::*;
use ps_common::{InitializerSpec, OptimizerSpec, TableKind, TableSpec};

fn trained_shard() -> Shard {
    trained(1, 2)
}

/// Shard `shard_id` of `num_shards` with a sparse and a dense Adam table,
/// the sparse one trained on the keys below 200 that the shard owns.
fn trained(shard_id: u32, num_shards: u32) -> Shard {
    let shard = Shard::new(shard_id, num_shards);
    for (name, kind) in [
        ("emb", TableKind::Sparse),
        (
            "mlp",
            TableKind::Dense {
                rows: 40,
                block_rows: 4,
            },
        ),
    ] {
        shard
            .create_table(TableSpec {
                name: name.into(),
                kind,
                dim: 3,
                initializer: InitializerSpec::Normal {
                    mean: 0.0,
                    std: 1.0,
                },
                optimizer: OptimizerSpec::Adam {
                    lr: 0.1,
                    beta1: 0.9,
                    beta2: 0.999,
                    eps: 1e-8,
                    l2: 0.0,
                    weight_decay: 0.0,
                },
                seed: 3,
                lifecycle: Default::default(),
            })
            .unwrap();
    }
    let router = ps_common::ShardRouter::new(num_shards);
    let keys: Vec<u64> = (0..200)
        .filter(|&k| router.shard_of(ps_common::routing::Placement::Sparse, k) == shard_id)
        .collect();
    shard
        .push("emb", &keys, &vec![0.5; keys.len() * 3])
        .unwrap();
    shard
}

fn temp_root(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ps-ckpt-{tag}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    dir
}

#[test]
fn a_checkpoint_restores_weights_and_optimizer_state_exactly() {
    let shard = trained_shard();
    let root = temp_root("roundtrip");
    let written = Checkpoints::new(root.clone()).save(&shard, "c1").unwrap();
    assert_eq!(written.path, root.join("c1/shard-1.bin"));
    assert!(root.join("c1/shard-1.json").exists());
    let restored = Shard::restore(load(&root.join("c1"), 1, 2).unwrap()).unwrap();
    assert_eq!(
        restored.snapshot().unwrap(),
        shard.snapshot().unwrap(),
        "weights and optimizer state"
    );
    // Training continues identically from the restored state.
    let key = shard.snapshot().unwrap().tables[0].keys[0];
    for s in [&shard, &restored] {
        s.push("emb", &[key], &[1.0, -1.0, 0.25]).unwrap();
    }
    assert_eq!(restored.snapshot().unwrap(), shard.snapshot().unwrap());
    fs::remove_dir_all(&root).ok();
}

#[test]
fn a_corrupted_or_foreign_checkpoint_is_refused() {
    let shard = trained_shard();
    let root = temp_root("corrupt");
    let written = Checkpoints::new(root.clone()).save(&shard, "c1").unwrap();
    let err = load(&root.join("c1"), 0, 2).unwrap_err();
    assert!(err.to_string().contains("cannot read checkpoint"), "{err}");
    fs::copy(&written.path, shard_file(&root.join("c1"), 0)).unwrap();
    let err = load(&root.join("c1"), 0, 2).unwrap_err();
    assert!(
        err.to_string()
            .contains("written by shard 1 of 2, this is shard 0 of 2"),
        "{err}"
    );

    let mut bytes = fs::read(&written.path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    fs::write(&written.path, &bytes).unwrap();
    let err = load(&root.join("c1"), 1, 2).unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(err.to_string().contains("checksum mismatch"), "{err}");
    fs::write(&written.path, &bytes[..bytes.len() - 10]).unwrap();
    assert!(
        load(&root.join("c1"), 1, 2)
            .unwrap_err()
            .to_string()
            .contains("truncated")
    );
    fs::remove_dir_all(&root).ok();
}

#[test]
fn a_checkpoint_name_that_is_a_path_is_invalid_and_writes_nothing() {
    let root = temp_root("name");
    let outside = root.join("shard-1.bin");
    let checkpoints = Checkpoints::new(root.join("inner"));
    for name in ["../escape", "..", ".", ".hidden", "a/b"] {
        let err = checkpoints.save(&trained_shard(), name).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{name}: {err}");
    }
    assert!(!outside.exists(), "nothing written beside the root");
    assert!(!root.join("inner").exists(), "nor under it");
}

#[test]
fn concurrent_checkpoints_of_one_name_all_succeed_and_leave_a_loadable_file() {
    let shard = std::sync::Arc::new(trained_shard());
    let root = temp_root("concurrent");
    let checkpoints = std::sync::Arc::new(Checkpoints::new(root.clone()));
    let writers: Vec<_> = (0..8)
        .map(|_| {
            let (shard, checkpoints) = (shard.clone(), checkpoints.clone());
            std::thread::spawn(move || checkpoints.save(&shard, "same"))
        })
        .collect();
    for writer in writers {
        writer.join().unwrap().unwrap();
    }
    let restored = load(&root.join("same"), 1, 2).unwrap();
    assert_eq!(restored, shard.snapshot().unwrap());
    let leftovers: Vec<_> = fs::read_dir(root.join("same"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    fs::remove_dir_all(&root).ok();
}

#[test]
fn the_newest_loadable_checkpoint_is_found_and_a_damaged_newer_one_skipped() {
    let root = temp_root("latest");
    let checkpoints = Checkpoints::new(root.clone());
    let empty = checkpoints.latest(1, 2).unwrap();
    assert!(empty.restored.is_none(), "no checkpoint yet: start empty");
    let shard = trained_shard();
    checkpoints.save(&shard, "old").unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    shard
        .push(
            "emb",
            &[shard.snapshot().unwrap().tables[0].keys[0]],
            &[1.0; 3],
        )
        .unwrap();
    checkpoints.save(&shard, "new").unwrap();
    let latest = checkpoints.latest(1, 2).unwrap();
    let (dir, snapshot) = latest.restored.unwrap();
    assert_eq!(dir, root.join("new"));
    assert_eq!(snapshot, shard.snapshot().unwrap());
    // Damage the newest: the one before it is restored, and the damage named.
    std::thread::sleep(std::time::Duration::from_millis(20));
    fs::write(root.join("new/shard-1.bin"), b"PSCKPT01 truncated").unwrap();
    let latest = checkpoints.latest(1, 2).unwrap();
    assert_eq!(latest.restored.unwrap().0, root.join("old"));
    assert_eq!(latest.skipped.len(), 1);
    assert_eq!(latest.skipped[0].0, root.join("new"));
    // Another shard layout: none fits, which is an error, not an empty start.
    let err = checkpoints.latest(1, 3).unwrap_err();
    assert!(err.to_string().contains("none can be restored"), "{err}");
    fs::remove_dir_all(&root).ok();
}

#[test]
fn shard_count_counts_the_shard_files_and_refuses_a_folder_without_any() {
    let root = temp_root("count");
    Checkpoints::new(root.clone())
        .save(&trained_shard(), "c1")
        .unwrap();
    assert_eq!(shard_count(&root.join("c1")), Ok(1));
    // An incremental chain's deltas are not shards.
    let chain = Checkpoints::new(root.clone());
    let shard = trained_shard();
    for _ in 0..3 {
        chain.save_incremental(&shard, "chain", 8).unwrap();
    }
    assert!(root.join("chain/shard-1.delta-000002.bin").exists());
    assert_eq!(shard_count(&root.join("chain")), Ok(1));
    assert!(matches!(
        shard_count(&root),
        Err(PsError::FailedPrecondition(_))
    ));
    let err = shard_count(&root.join("missing")).unwrap_err();
    assert!(err.to_string().contains("cannot read checkpoint"), "{err}");
}

/// A shard (1 of 1) with a table that admits at the second push and evicts,
/// and a dense one.
fn lifecycle_shard() -> Shard {
    use ps_common::lifecycle::{Admission, Eviction, Lifecycle};
    let shard = Shard::new(0, 1);
    let spec = |name: &str, kind, lifecycle| TableSpec {
        name: name.into(),
        kind,
        dim: 2,
        initializer: InitializerSpec::Zeros,
        optimizer: OptimizerSpec::Adagrad {
            lr: 0.1,
            initial_accumulator: 0.1,
            eps: 1e-8,
            l2: 0.0,
            weight_decay: 0.0,
        },
        seed: 1,
        lifecycle,
    };
    let stream = Lifecycle {
        admission: Some(Admission::Count {
            min_count: 2,
            sketch_width: 1 << 16,
        }),
        eviction: Some(Eviction::default()),
    };
    shard
        .create_table(spec("stream", TableKind::Sparse, stream))
        .unwrap();
    let dense = TableKind::Dense {
        rows: 8,
        block_rows: 4,
    };
    shard
        .create_table(spec("mlp", dense, Lifecycle::default()))
        .unwrap();
    shard
}

fn push(shard: &Shard, table: &str, keys: std::ops::Range<u64>, grad: f32) {
    let keys: Vec<u64> = keys.collect();
    shard
        .push(table, &keys, &vec![grad; keys.len() * 2])
        .unwrap();
}

#[test]
fn base_plus_deltas_restores_bit_for_bit_the_same_shard_as_a_full_checkpoint() {
    let shard = lifecycle_shard();
    let root = temp_root("chain");
    let checkpoints = Checkpoints::new(root.clone());
    for _ in 0..2 {
        push(&shard, "stream", 0..1_000, 0.5); // admitted at the second
    }
    let base = checkpoints.save_incremental(&shard, "p", 10).unwrap();
    assert_eq!(base.path, root.join("p/shard-0.bin"));
    assert_eq!(base.rows, 1_000 + 8);

    // Delta 1: a few rows change, some are evicted, one evicted id comes
    // back, the dense table moves, a table is created.
    push(&shard, "stream", 10..20, -1.0);
    shard
        .evict("stream", &(500..600).collect::<Vec<_>>(), false)
        .unwrap();
    for _ in 0..2 {
        push(&shard, "stream", 550..551, 0.25);
    }
    push(&shard, "mlp", 0..8, 0.1);
    let delta = checkpoints.save_incremental(&shard, "p", 10).unwrap();
    assert_eq!(delta.path, root.join("p/shard-0.delta-000001.bin"));
    assert_eq!(delta.rows, 10 + 1 + 8, "changed rows and the dense table");
    assert!(delta.bytes * 10 < base.bytes, "{delta:?} against {base:?}");

    // Delta 2: an id admitted, another evicted again, a new table.
    push(&shard, "stream", 2_000..2_001, 1.0);
    push(&shard, "stream", 2_000..2_001, 1.0);
    shard.evict("stream", &[550, 7], false).unwrap();
    let mut other = shard.table_stats()[0].spec.clone();
    other.name = "later".into();
    other.lifecycle = Default::default();
    shard.create_table(other).unwrap();
    push(&shard, "later", 0..5, 0.5);
    checkpoints.save_incremental(&shard, "p", 10).unwrap();

    let full_root = temp_root("chain-full");
    Checkpoints::new(full_root.clone())
        .save(&shard, "full")
        .unwrap();
    let from_chain = load(&root.join("p"), 0, 1).unwrap();
    assert_eq!(from_chain, load(&full_root.join("full"), 0, 1).unwrap());
    assert_eq!(from_chain, shard.snapshot().unwrap());
    let restored = Shard::restore(from_chain).unwrap();
    assert_eq!(
        restored.snapshot().unwrap(),
        shard.snapshot().unwrap(),
        "rows, state and admission counts"
    );
    fs::remove_dir_all(&root).ok();
    fs::remove_dir_all(&full_root).ok();
}

#[test]
fn a_chain_starts_a_new_base_every_so_many_deltas_and_after_another_checkpoint() {
    let shard = lifecycle_shard();
    let root = temp_root("chain-bases");
    let checkpoints = Checkpoints::new(root.clone());
    let dir = root.join("p");
    let deltas = || chain::deltas_of(&dir, 0);
    let mut paths = Vec::new();
    for step in 0..5 {
        push(&shard, "mlp", 0..8, 0.1 * step as f32);
        paths.push(checkpoints.save_incremental(&shard, "p", 2).unwrap().path);
    }
    // base, delta 1, delta 2, base (the deltas removed), delta 1.
    let base = dir.join("shard-0.bin");
    assert_eq!(paths[0], base);
    assert_eq!(paths[3], base);
    assert_eq!(deltas(), [chain::delta_file(&dir, 0, 1)]);
    assert_eq!(load(&dir, 0, 1).unwrap(), shard.snapshot().unwrap());

    // A checkpoint of another name took the change records: the next
    // incremental one must be a base.
    checkpoints.save(&shard, "other").unwrap();
    push(&shard, "mlp", 0..8, 1.0);
    let written = checkpoints.save_incremental(&shard, "p", 2).unwrap();
    assert_eq!(written.path, base);
    assert!(deltas().is_empty());
    assert_eq!(load(&dir, 0, 1).unwrap(), shard.snapshot().unwrap());
    fs::remove_dir_all(&root).ok();
}

#[test]
fn a_stale_delta_is_skipped_and_a_damaged_or_missing_one_refuses_the_chain() {
    let shard = lifecycle_shard();
    let root = temp_root("chain-damage");
    let checkpoints = Checkpoints::new(root.clone());
    let dir = root.join("p");
    push(&shard, "mlp", 0..8, 0.1);
    checkpoints.save_incremental(&shard, "p", 10).unwrap();
    push(&shard, "mlp", 0..8, 0.2);
    checkpoints.save_incremental(&shard, "p", 10).unwrap();
    let first = fs::read(chain::delta_file(&dir, 0, 1)).unwrap();

    // A crash after a new base, before the old deltas were removed.
    checkpoints.save(&shard, "p").unwrap();
    fs::write(chain::delta_file(&dir, 0, 1), &first).unwrap();
    assert_eq!(
        load(&dir, 0, 1).unwrap(),
        shard.snapshot().unwrap(),
        "stale delta skipped"
    );

    // A delta of this base, damaged.
    checkpoints.save_incremental(&shard, "p", 10).unwrap();
    push(&shard, "mlp", 0..8, 0.3);
    let path = checkpoints.save_incremental(&shard, "p", 10).unwrap().path;
    let mut bytes = fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    fs::write(&path, &bytes).unwrap();
    let err = load(&dir, 0, 1).unwrap_err().to_string();
    assert!(err.contains("checksum mismatch"), "{err}");

    // A gap in the numbers.
    fs::remove_file(&path).unwrap();
    push(&shard, "mlp", 0..8, 0.3);
    checkpoints.save_incremental(&shard, "p", 10).unwrap(); // delta 2
    fs::remove_file(chain::delta_file(&dir, 0, 1)).ok();
    fs::rename(chain::delta_file(&dir, 0, 2), chain::delta_file(&dir, 0, 3)).unwrap();
    let err = load(&dir, 0, 1).unwrap_err().to_string();
    assert!(err.contains("delta 3 follows delta 0"), "{err}");
    fs::remove_dir_all(&root).ok();
}

/// Every row of `shards`, by table and key (weights and optimizer state).
fn rows_by_key(shards: &[ShardSnapshot]) -> std::collections::BTreeMap<(String, u64), Vec<f32>> {
    let mut rows = std::collections::BTreeMap::new();
    for shard in shards {
        for t in &shard.tables {
            for (key, row) in t.keys.iter().zip(t.values.chunks_exact(t.row_len as usize)) {
                let old = rows.insert((t.spec.name.clone(), *key), row.to_vec());
                assert!(
                    old.is_none(),
                    "row {key} of '{}' on two shards",
                    t.spec.name
                );
            }
        }
    }
    rows
}

#[test]
fn a_checkpoint_of_two_shards_restores_into_three_with_every_row_exact_on_its_new_owner() {
    let root = temp_root("reshard");
    let old: Vec<Shard> = (0..2).map(|i| trained(i, 2)).collect();
    let checkpoints = Checkpoints::new(root.clone());
    for shard in &old {
        checkpoints.save(shard, "c").unwrap();
    }
    let dir = root.join("c");
    let before = rows_by_key(
        &old.iter()
            .map(|s| s.snapshot().unwrap())
            .collect::<Vec<_>>(),
    );
    let restored: Vec<Shard> = (0..3)
        .map(|i| Shard::restore(load_resharded(&dir, i, 3).unwrap()).unwrap())
        .collect();
    let after = rows_by_key(
        &restored
            .iter()
            .map(|s| s.snapshot().unwrap())
            .collect::<Vec<_>>(),
    );
    assert_eq!(after.len(), 40 + 200, "every dense and sparse row");
    assert_eq!(after, before, "every row exact, on exactly one new shard");
    // With the count that wrote it, it is the plain load.
    assert_eq!(
        load_resharded(&dir, 1, 2).unwrap(),
        load(&dir, 1, 2).unwrap()
    );
    fs::remove_dir_all(&root).ok();
}
