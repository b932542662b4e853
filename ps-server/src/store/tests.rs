//! The store's specifications: validation, atomicity, finiteness, dense
//! ownership, memory budget and concurrency.

use super::*;
use finite::{Magnitudes, provably_finite, scan_magnitudes};
use ps_common::routing::Placement;
use ps_common::{InitializerSpec, OptimizerSpec, TableKind};

#[test]
fn a_row_cap_refuses_requests_that_would_create_rows_past_it() {
    let shard = Shard::new(0, 1);
    shard
        .create_table(TableSpec {
            name: "emb".into(),
            kind: TableKind::Sparse,
            dim: 1,
            initializer: InitializerSpec::Zeros,
            optimizer: OptimizerSpec::sgd(1.0),
            seed: 0,
            lifecycle: Default::default(),
        })
        .unwrap();
    shard.set_row_cap(Some(3));
    let mut out = Vec::new();
    shard.pull("emb", &[1, 2, 2], &mut out).unwrap();
    let err = shard.pull("emb", &[3, 4], &mut out).unwrap_err();
    assert!(matches!(err, PsError::ResourceExhausted(_)), "{err}");
    assert!(err.to_string().contains("cap of 3"), "{err}");
    assert_eq!(shard.table("emb").unwrap().len(), 2, "nothing created");
    shard.pull("emb", &[1, 3], &mut out).unwrap();
    assert!(
        shard.push("emb", &[9], &[1.0]).is_err(),
        "a push creates rows too"
    );
    assert!(
        shard.assign("emb", &[9], &[1.0]).is_err(),
        "and so does assign"
    );
    assert_eq!(
        shard.push("emb", &[1, 2, 3], &[1.0; 3]),
        Ok(3),
        "existing rows"
    );
    shard.set_row_cap(None);
    shard.pull("emb", &[4, 5], &mut out).unwrap();
}

fn spec(name: &str, kind: TableKind, dim: u32) -> TableSpec {
    TableSpec {
        name: name.into(),
        kind,
        dim,
        initializer: InitializerSpec::Normal {
            mean: 0.0,
            std: 1.0,
        },
        optimizer: OptimizerSpec::sgd(1.0),
        seed: 9,
        lifecycle: Default::default(),
    }
}

/// Regularization is lazy, as in sparse systems: a push decays the rows it
/// touches, once per occurrence, and no other row.
#[test]
fn weight_decay_shrinks_only_the_rows_a_push_touches() {
    let shard = Shard::new(0, 1);
    let mut decayed = spec("w", TableKind::Sparse, 1);
    decayed.optimizer = OptimizerSpec::Sgd {
        lr: 0.5,
        l2: 0.0,
        weight_decay: 0.2,
    };
    shard.create_table(decayed).unwrap();
    let mut before = Vec::new();
    shard.pull("w", &[1, 2], &mut before).unwrap();
    shard.push("w", &[1, 1], &[0.0, 0.0]).unwrap();
    let mut after = Vec::new();
    shard.pull("w", &[1, 2], &mut after).unwrap();
    assert!(
        (after[0] - before[0] * 0.9 * 0.9).abs() < 1e-6,
        "{before:?} -> {after:?}"
    );
    assert_eq!(after[1], before[1], "an untouched row keeps its weight");
}

#[test]
fn assign_sets_weights_with_fresh_state_all_or_nothing() {
    let shard = Shard::new(0, 1);
    let mut adagrad = spec("w", TableKind::Sparse, 2);
    adagrad.optimizer = OptimizerSpec::Adagrad {
        lr: 0.1,
        initial_accumulator: 0.5,
        eps: 1e-8,
        l2: 0.0,
        weight_decay: 0.0,
    };
    shard.create_table(adagrad).unwrap();
    shard.push("w", &[3], &[1.0, 1.0]).unwrap();
    assert_eq!(shard.assign("w", &[3, 4], &[1.0, 2.0, 3.0, 4.0]), Ok(2));
    let mut out = Vec::new();
    shard.pull("w", &[3, 4], &mut out).unwrap();
    assert_eq!(out, [1.0, 2.0, 3.0, 4.0]);
    let mut row = [0f32; 4];
    assert!(shard.table("w").unwrap().copy_row(3, &mut row));
    assert_eq!(&row[2..], [0.5, 0.5], "optimizer state reset");
    let err = shard
        .assign("w", &[3, 5], &[9.0, 9.0, f32::NAN, 0.0])
        .unwrap_err();
    assert!(err.to_string().contains("not finite"), "{err}");
    out.clear();
    shard.pull("w", &[3], &mut out).unwrap();
    assert_eq!(out, [1.0, 2.0], "nothing assigned from a refused request");
    assert!(shard.assign("w", &[3], &[1.0]).is_err(), "wrong dim");
}

#[test]
fn a_push_s_lr_scale_multiplies_the_learning_rate() {
    let shard = Shard::new(0, 1);
    shard.create_table(spec("w", TableKind::Sparse, 1)).unwrap();
    let pull = || {
        let mut out = Vec::new();
        shard.pull("w", &[7], &mut out).unwrap();
        out
    };
    let before = pull();
    shard.push_scaled("w", &[7], &[2.0], 0.25).unwrap();
    let after = pull();
    // SGD with lr 1 scaled by 0.25: w -= 0.25 * 2.
    assert!((before[0] - after[0] - 0.5).abs() < 1e-6);
    for bad in [-1.0, f32::NAN, f32::INFINITY] {
        let err = shard.push_scaled("w", &[7], &[2.0], bad).unwrap_err();
        assert!(err.to_string().contains("lr_scale"), "{err}");
    }
    assert_eq!(pull(), after, "refused pushes change nothing");
}

#[test]
fn create_table_is_idempotent_and_names_a_conflicting_field() {
    let shard = Shard::new(0, 1);
    assert_eq!(
        shard.create_table(spec("emb", TableKind::Sparse, 4)),
        Ok(true)
    );
    assert_eq!(
        shard.create_table(spec("emb", TableKind::Sparse, 4)),
        Ok(false)
    );
    let err = shard
        .create_table(spec("emb", TableKind::Sparse, 8))
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("different dim: existing 4, requested 8"),
        "{err}"
    );
}

#[test]
fn a_sparse_row_is_the_same_on_any_shard_that_creates_it() {
    let (a, b) = (Shard::new(0, 1), Shard::new(0, 1));
    for s in [&a, &b] {
        s.create_table(spec("emb", TableKind::Sparse, 4)).unwrap();
    }
    let (mut ra, mut rb) = (vec![], vec![]);
    a.pull("emb", &[17, 4], &mut ra).unwrap();
    b.pull("emb", &[4, 17], &mut rb).unwrap();
    assert_eq!(ra[..4], rb[4..]);
    assert_eq!(ra[4..], rb[..4]);
    assert_eq!(a.table("emb").unwrap().len(), 2);
}

#[test]
fn a_push_applies_every_occurrence_of_a_key() {
    let shard = Shard::new(0, 1);
    shard
        .create_table(spec("emb", TableKind::Sparse, 2))
        .unwrap();
    let mut before = vec![];
    shard.pull("emb", &[5], &mut before).unwrap();
    shard.push("emb", &[5, 5], &[1.0, 0.0, 0.5, 2.0]).unwrap();
    let mut after = vec![];
    shard.pull("emb", &[5], &mut after).unwrap();
    assert!((after[0] - (before[0] - 1.5)).abs() < 1e-6);
    assert!((after[1] - (before[1] - 2.0)).abs() < 1e-6);
}

#[test]
fn an_invalid_push_changes_nothing() {
    let shard = Shard::new(0, 1);
    shard
        .create_table(spec("emb", TableKind::Sparse, 2))
        .unwrap();
    let mut before = vec![];
    shard.pull("emb", &[1, 2], &mut before).unwrap();

    let nan = shard
        .push("emb", &[1, 2], &[1.0, 1.0, f32::NAN, 1.0])
        .unwrap_err();
    assert!(nan.to_string().contains("not finite"), "{nan}");
    let inf = shard
        .push("emb", &[1, 2], &[1.0, 1.0, 1.0, f32::INFINITY])
        .unwrap_err();
    assert_eq!(inf.code(), tonic::Code::InvalidArgument);
    let short = shard.push("emb", &[1, 2], &[1.0, 1.0, 1.0]).unwrap_err();
    assert!(
        short.to_string().contains("need 4 gradient values, got 3"),
        "{short}"
    );
    let unknown = shard.push("nope", &[1], &[1.0, 1.0]).unwrap_err();
    assert_eq!(unknown, PsError::UnknownTable("nope".into()));

    let mut after = vec![];
    shard.pull("emb", &[1, 2], &mut after).unwrap();
    assert_eq!(before, after);
    assert_eq!(
        shard.table("emb").unwrap().len(),
        2,
        "no row was created either"
    );
}

#[test]
fn an_update_that_would_make_a_row_non_finite_is_refused_whole() {
    let optimizers = [
        OptimizerSpec::sgd(1.0),
        OptimizerSpec::Adagrad {
            lr: 0.1,
            initial_accumulator: 0.1,
            eps: 1e-8,
            l2: 0.0,
            weight_decay: 0.0,
        },
        OptimizerSpec::Adam {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            l2: 0.0,
            weight_decay: 0.0,
        },
        OptimizerSpec::Ftrl {
            alpha: 0.1,
            beta: 1.0,
            l1: 0.0,
            l2: 0.0,
        },
    ];
    // (keys, gradients, refused by [SGD, Adagrad, Adam, FTRL])
    let hostile: [(&[u64], &[f32], [bool; 4]); 3] = [
        // A huge gradient: g^2 overflows the accumulators; SGD's weight
        // stays finite (|w| + 3e38 < f32::MAX).
        (&[1, 2], &[0.5, 3e38], [false, true, true, true]),
        // g^2 = 1e40 overflows; Adam computes (1 - beta2) * g * g = 1e37.
        (&[3], &[1e20], [false, true, false, true]),
        // A finite gradient repeated until even SGD's weight overflows.
        (&[4, 4, 4], &[-3e38, -3e38, -3e38], [true, true, true, true]),
    ];
    for (o, optimizer) in optimizers.into_iter().enumerate() {
        let shard = Shard::new(0, 1);
        let mut s = spec("emb", TableKind::Sparse, 1);
        s.optimizer = optimizer;
        shard.create_table(s).unwrap();
        shard.push("emb", &[1, 2], &[0.5, -0.5]).unwrap();
        for (keys, grads, refusals) in hostile {
            let refused = refusals[o];
            let before = shard.snapshot().unwrap();
            match shard.push("emb", keys, grads) {
                Err(err) => {
                    assert!(refused, "{optimizer:?} {grads:?}: {err}");
                    assert_eq!(err.code(), tonic::Code::InvalidArgument);
                    assert!(err.to_string().contains("non-finite"), "{err}");
                    assert_eq!(
                        shard.snapshot().unwrap(),
                        before,
                        "{optimizer:?}: refused whole"
                    );
                }
                Ok(_) => assert!(!refused, "{optimizer:?} accepted {grads:?}"),
            }
            let after = shard.snapshot().unwrap();
            assert!(
                after.tables[0].values.iter().all(|v| v.is_finite()),
                "{optimizer:?}: a row went non-finite"
            );
        }
    }
    let ftrl = Shard::new(0, 1);
    let mut s = spec("f", TableKind::Sparse, 1);
    s.optimizer = optimizers[3];
    ftrl.create_table(s).unwrap();
    let err = ftrl.push_scaled("f", &[1], &[1.0], 0.0).unwrap_err();
    assert!(err.to_string().contains("alpha"), "{err}");
}

#[test]
fn a_request_with_one_key_another_shard_owns_is_refused_whole_naming_it() {
    let shard = Shard::new(0, 2);
    shard
        .create_table(spec("emb", TableKind::Sparse, 2))
        .unwrap();
    let router = ShardRouter::new(2);
    let owned = |k: &u64| router.shard_of(Placement::Sparse, *k) == 0;
    let mut keys: Vec<u64> = (0..100).filter(owned).take(19).collect();
    let foreign = (0..100).find(|k| !owned(k)).unwrap();
    // Eighth key of the second block of eight routed together.
    keys.insert(15, foreign);
    let err = shard.pull("emb", &keys, &mut vec![]).unwrap_err();
    assert!(
        err.to_string()
            .contains(&format!("key {foreign} of table 'emb' belongs to shard 1")),
        "{err}"
    );
    assert_eq!(shard.table("emb").unwrap().len(), 0, "no row was created");
}

#[test]
fn a_dense_table_holds_exactly_the_rows_this_shard_owns() {
    let kind = TableKind::Dense {
        rows: 100,
        block_rows: 8,
    };
    let shards: Vec<Shard> = (0..3).map(|i| Shard::new(i, 3)).collect();
    for s in &shards {
        s.create_table(spec("mlp", kind, 3)).unwrap();
    }
    let total: usize = shards.iter().map(|s| s.table("mlp").unwrap().len()).sum();
    assert_eq!(total, 100);
    let router = ShardRouter::new(3);
    let placement = Placement::dense("mlp", 8);
    let owner = router.shard_of(placement, 42) as usize;
    let mut out = vec![];
    shards[owner].pull("mlp", &[42], &mut out).unwrap();
    let other = (owner + 1) % 3;
    let err = shards[other].pull("mlp", &[42], &mut out).unwrap_err();
    assert!(err.to_string().contains("belongs to shard"), "{err}");
    let err = shards[owner].pull("mlp", &[100], &mut out).unwrap_err();
    assert!(err.to_string().contains("out of range"), "{err}");
}

#[test]
fn concurrent_pushes_never_tear_a_row() {
    // Every push adds the same gradient to all coordinates of one row, so the
    // row must stay uniform at every moment and end at exactly -total.
    let shard = Arc::new(Shard::new(0, 1));
    let mut s = spec("emb", TableKind::Sparse, 64);
    s.initializer = InitializerSpec::Zeros;
    shard.create_table(s).unwrap();
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let shard = Arc::clone(&shard);
            std::thread::spawn(move || {
                let grad = vec![1.0f32; 64];
                let mut seen = vec![];
                for i in 0..2000 {
                    if (i + t) % 2 == 0 {
                        shard.push("emb", &[7], &grad).unwrap();
                    } else {
                        seen.clear();
                        shard.pull("emb", &[7], &mut seen).unwrap();
                        assert!(seen.iter().all(|&x| x == seen[0]), "torn row: {seen:?}");
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let mut row = vec![];
    shard.pull("emb", &[7], &mut row).unwrap();
    assert!(row.iter().all(|&x| x == -4000.0), "{:?}", &row[..4]);
}

#[test]
fn a_pull_of_new_ids_past_the_memory_budget_is_refused_and_creates_nothing() {
    let shard = Shard::new(0, 1);
    shard
        .create_table(spec("emb", TableKind::Sparse, 16))
        .unwrap();
    let per_row = 16 * 4 + SPARSE_ROW_OVERHEAD;
    shard.budget.set_limit(shard.budget.used() + 100 * per_row);
    let mut out = Vec::new();
    let keys: Vec<u64> = (0..60).collect();
    shard.pull("emb", &keys, &mut out).unwrap();
    let empty = table::TABLE_OVERHEAD + sparse::SEGMENTS_OVERHEAD + sparse::slack_bytes(16);
    assert_eq!(shard.budget.used(), empty + 60 * per_row);
    let more: Vec<u64> = (60..120).collect();
    let err = shard.pull("emb", &more, &mut out).unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err}");
    assert!(err.to_string().contains("--memory-budget"), "{err}");
    assert_eq!(shard.table("emb").unwrap().len(), 60, "nothing created");
    // Keys already held cost nothing: a pull mixing old and new ids that
    // fits exactly is served, even though its worst case would not.
    let mixed: Vec<u64> = (0..100).collect();
    shard.pull("emb", &mixed, &mut out).unwrap();
    assert_eq!(shard.table("emb").unwrap().len(), 100);
    assert!(
        shard.push("emb", &[100], &[0.0; 16]).is_err(),
        "a push creates rows too"
    );
    assert!(
        shard.assign("emb", &[100], &[0.0; 16]).is_err(),
        "and so does assign"
    );
    assert!(
        shard.push("emb", &[1, 2], &[0.0; 32]).is_ok(),
        "existing rows"
    );
}

/// A pull mixing held rows, new rows and repeats answers in request
/// order, whatever order the store reads them in (new rows come last).
#[test]
fn a_pull_answers_in_request_order_with_new_and_repeated_keys() {
    let shard = Shard::new(0, 1);
    shard
        .create_table(spec("emb", TableKind::Sparse, 3))
        .unwrap();
    let mut out = Vec::new();
    shard.pull("emb", &[10, 20, 30], &mut out).unwrap();
    let keys = [40, 10, 50, 40, 30, 60, 20, 50];
    let mut together = vec![7.0]; // a pull appends after what `out` holds
    shard.pull("emb", &keys, &mut together).unwrap();
    let mut one_by_one = vec![7.0];
    for key in keys {
        shard.pull("emb", &[key], &mut one_by_one).unwrap();
    }
    assert_eq!(together, one_by_one);
    assert_eq!(shard.table("emb").unwrap().len(), 6);
}

/// Pushers and pullers on overlapping rows: with SGD at rate 1, zero
/// weights and a gradient of -1 on every float, each push adds 1 to every
/// weight of its row, so a row read whole holds one value repeated, and at
/// the end every row holds the number of pushes.
#[test]
fn concurrent_pushes_and_pulls_never_tear_a_row_or_lose_an_update() {
    const DIM: usize = 8;
    const ROUNDS: usize = 30;
    const PUSHERS: usize = 4;
    let shard = Shard::new(0, 1);
    let mut s = spec("emb", TableKind::Sparse, DIM as u32);
    s.initializer = InitializerSpec::Zeros;
    shard.create_table(s).unwrap();
    let keys: Vec<u64> = (0..3000).map(|k| k * 7919).collect();
    let done = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for p in 0..PUSHERS {
            let (shard, keys, done) = (&shard, &keys, &done);
            scope.spawn(move || {
                // Each pusher walks the keys in its own order and batch size.
                let batch = 50 + 37 * p;
                for round in 0..ROUNDS {
                    let mut order = keys.clone();
                    order.rotate_left((round * 101 + p * 977) % keys.len());
                    for chunk in order.chunks(batch) {
                        shard
                            .push("emb", chunk, &vec![-1.0; chunk.len() * DIM])
                            .unwrap();
                    }
                }
                done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            });
        }
        for _ in 0..2 {
            let (shard, keys, done) = (&shard, &keys, &done);
            scope.spawn(move || {
                let mut out = Vec::new();
                while done.load(std::sync::atomic::Ordering::SeqCst) < PUSHERS {
                    for chunk in keys.chunks(256) {
                        out.clear();
                        shard.pull("emb", chunk, &mut out).unwrap();
                        for (row, key) in out.chunks_exact(DIM).zip(chunk) {
                            assert!(row.iter().all(|&v| v == row[0]), "row {key} torn: {row:?}");
                            assert!(row[0] <= (PUSHERS * ROUNDS) as f32);
                        }
                    }
                }
            });
        }
    });
    let mut out = Vec::new();
    shard.pull("emb", &keys, &mut out).unwrap();
    let want = (PUSHERS * ROUNDS) as f32;
    for (row, key) in out.chunks_exact(DIM).zip(&keys) {
        assert!(
            row.iter().all(|&v| v == want),
            "row {key}: {row:?}, want {want}"
        );
    }
    assert_eq!(shard.table("emb").unwrap().len(), keys.len());
}

#[test]
fn a_dense_table_that_cannot_fit_is_refused_before_anything_is_allocated() {
    let shard = Shard::new(0, 1);
    shard.budget.set_limit(1 << 20);
    let kind = TableKind::Dense {
        rows: 1 << 20,
        block_rows: 64,
    };
    let err = shard.create_table(spec("big", kind, 4)).unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err}");
    assert_eq!(shard.budget.used(), 0, "nothing reserved");
    assert!(shard.table("big").is_err());
    let small = TableKind::Dense {
        rows: 1000,
        block_rows: 64,
    };
    shard.create_table(spec("small", small, 4)).unwrap();
    let stats = &shard.table_stats()[0];
    assert_eq!(stats.bytes, 1000 * 4 * 4, "dense rows cost their floats");
    assert!(stats.memory_bytes - stats.bytes < 8192, "{stats:?}");
    assert_eq!(shard.budget.used(), stats.memory_bytes);
}

#[test]
fn loading_a_snapshot_replaces_the_budget_s_holdings_and_refuses_one_that_cannot_fit() {
    let shard = Shard::new(0, 1);
    shard
        .create_table(spec("emb", TableKind::Sparse, 2))
        .unwrap();
    shard.pull("emb", &[1, 2, 3], &mut Vec::new()).unwrap();
    let snapshot = shard.snapshot().unwrap();
    let used = shard.budget.used();
    let copy = Shard::new(0, 1);
    copy.load(snapshot.clone()).unwrap();
    assert_eq!(copy.budget.used(), used);
    copy.load(snapshot.clone()).unwrap();
    assert_eq!(copy.budget.used(), used, "loading again replaces, not adds");
    let tight = Shard::new(0, 1);
    tight.budget.set_limit(used - 1);
    let err = tight.load(snapshot).unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err}");
    assert!(tight.table("emb").is_err(), "nothing loaded");
}

mod proofs {
    //! The bound a push is proven within holds: from rows anywhere within
    //! the table's bounds (any state, not only one a history could make),
    //! a proven push leaves every value finite and within its proof.

    use super::*;
    use proptest::prelude::*;

    /// An L2 strength (often none) and a decay share of the weight per
    /// update (`lr * weight_decay`, so the pair is always valid).
    fn regularization() -> impl Strategy<Value = (f32, f32)> {
        (
            prop_oneof![Just(0.0f32), 0.0f32..10.0],
            prop_oneof![Just(0.0f32), 0.0f32..1.0],
        )
    }

    fn optimizer() -> impl Strategy<Value = OptimizerSpec> {
        prop_oneof![
            (1e-4f32..10.0, regularization()).prop_map(|(lr, (l2, share))| OptimizerSpec::Sgd {
                lr,
                l2,
                weight_decay: share / lr,
            }),
            (
                1e-4f32..10.0,
                0.0f32..10.0,
                1e-10f32..1e-2,
                regularization()
            )
                .prop_map(|(lr, initial_accumulator, eps, (l2, share))| {
                    OptimizerSpec::Adagrad {
                        lr,
                        initial_accumulator,
                        eps,
                        l2,
                        weight_decay: share / lr,
                    }
                }),
            (
                1e-4f32..1.0,
                0.0f32..0.999,
                0.0f32..0.9999,
                1e-10f32..1e-2,
                regularization()
            )
                .prop_map(|(lr, beta1, beta2, eps, (l2, share))| OptimizerSpec::Adam {
                    lr,
                    beta1,
                    beta2,
                    eps,
                    l2,
                    weight_decay: share / lr,
                }),
            (1e-3f32..10.0, 0.0f32..2.0, 0.0f32..1.0, 0.0f32..1.0).prop_map(
                |(alpha, beta, l1, l2)| OptimizerSpec::Ftrl {
                    alpha,
                    beta,
                    l1,
                    l2,
                }
            ),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn a_proven_push_stays_finite_and_within_its_proof(
            optimizer in optimizer(),
            weight in -1e12f32..1e12,
            moment in -1e12f32..1e12,
            second in prop_oneof![0.0f32..1e-6, 0.0f32..1e12],
            power in 1e-6f32..1.0,
            grads in prop::collection::vec(prop_oneof![-1e9f32..1e9, -1e-6f32..1e-6], 1..4),
            lr_scale in 1e-3f32..100.0,
        ) {
            let shard = Shard::new(0, 1);
            let mut s = spec("t", TableKind::Sparse, 1);
            s.optimizer = optimizer;
            shard.create_table(s.clone()).unwrap();
            // One row holding extreme but finite state, loaded as a
            // snapshot could hold it.
            // Adagrad: [w, acc]; Adam: [w, m, v, beta1^t, beta2^t]; FTRL: [w, z, n].
            let row = match optimizer {
                OptimizerSpec::Sgd { .. } => vec![weight],
                OptimizerSpec::Adagrad { .. } => vec![weight, second],
                OptimizerSpec::Ftrl { .. } => vec![weight, moment, second],
                _ => vec![weight, moment, second, power, power],
            };
            let row_len = row.len();
            shard.load(ShardSnapshot {
                shard_id: 0,
                num_shards: 1,
                tables: vec![TableSnapshot { spec: s, row_len: row_len as u32, keys: vec![5], values: row, admission: Vec::new() }],
            }).unwrap();
            let keys = vec![5u64; grads.len()];
            let push = Push { table: "t", keys: &keys, grads: &grads, lr_scale };
            let table = shard.table("t").unwrap();
            let (max, sum, _) = scan_magnitudes(&grads);
            if let Some(proof) = provably_finite(&table, &push, Magnitudes { max, sum }) {
                shard.push_scaled("t", &keys, &grads, lr_scale).unwrap();
                let after = shard.snapshot().unwrap().tables[0].values.clone();
                prop_assert!(after.iter().all(|v| v.is_finite()), "{after:?}");
                prop_assert!(f64::from(after[0].abs()) <= proof.weight * 1.0001, "{after:?} vs {proof:?}");
                prop_assert!(after[1..].iter().all(|v| f64::from(v.abs()) <= proof.state * 1.0001), "{after:?} vs {proof:?}");
            }
        }
    }
}
