//! The service's specifications, called without a network.

use super::*;
use ps_common::{InitializerSpec, OptimizerSpec, TableSpec, wire};
use tonic::Code;

fn service(limits: Limits) -> ShardService {
    ShardService::new(Arc::new(Shard::new(0, 1)), limits, None)
}

async fn create(svc: &ShardService, dim: u32) {
    let spec = TableSpec {
        name: "emb".into(),
        kind: TableKind::Sparse,
        dim,
        initializer: InitializerSpec::Zeros,
        optimizer: OptimizerSpec::sgd(1.0),
        seed: 0,
        lifecycle: Default::default(),
    };
    let req = pb::CreateTableRequest {
        spec: Some((&spec).into()),
    };
    svc.create_table(Request::new(req)).await.unwrap();
}

fn push(keys: Vec<u64>, grads: &[f32]) -> Request<pb::PushRequest> {
    Request::new(pb::PushRequest {
        table: "emb".into(),
        keys,
        gradients: wire::encode_f32s(grads),
        ..Default::default()
    })
}

#[tokio::test]
async fn bad_requests_get_their_status_and_are_counted() {
    let svc = service(Limits {
        max_request_bytes: 1 << 20,
        max_keys_per_request: 4,
        ..Limits::default()
    });
    create(&svc, 2).await;
    let missing = pb::PullRequest {
        table: "nope".into(),
        keys: vec![1],
        ..Default::default()
    };
    assert_eq!(
        svc.pull(Request::new(missing)).await.unwrap_err().code(),
        Code::NotFound
    );
    let wrong_dim = svc.push(push(vec![1], &[1.0, 2.0, 3.0])).await.unwrap_err();
    assert_eq!(wrong_dim.code(), Code::InvalidArgument);
    let ragged = pb::PushRequest {
        table: "emb".into(),
        keys: vec![1],
        gradients: vec![0u8; 7].into(),
        ..Default::default()
    };
    assert_eq!(
        svc.push(Request::new(ragged)).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let too_many = svc
        .push(push(vec![1, 2, 3, 4, 5], &[0.0; 10]))
        .await
        .unwrap_err();
    assert_eq!(too_many.code(), Code::ResourceExhausted);
    assert!(
        too_many.message().contains("limit of 4"),
        "{}",
        too_many.message()
    );
    let no_spec = svc
        .create_table(Request::new(pb::CreateTableRequest { spec: None }))
        .await
        .unwrap_err();
    assert_eq!(no_spec.code(), Code::InvalidArgument);

    let stats = svc
        .stats(Request::new(pb::StatsRequest {}))
        .await
        .unwrap()
        .into_inner();
    let requests = stats.requests.unwrap();
    assert_eq!(requests.errors, 5);
    assert_eq!(stats.tables[0].rows, 0, "no failed request created a row");
}

#[tokio::test]
async fn pull_returns_rows_in_request_order_with_their_dim() {
    let svc = service(Limits::default());
    create(&svc, 2).await;
    svc.push(push(vec![3], &[-1.0, -2.0])).await.unwrap();
    let resp = svc
        .pull(Request::new(pb::PullRequest {
            table: "emb".into(),
            keys: vec![4, 3, 3],
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.dim, 2);
    assert_eq!(
        wire::decode_f32s(&resp.values).unwrap(),
        [0.0, 0.0, 1.0, 2.0, 1.0, 2.0]
    );
}

#[tokio::test]
async fn values_and_keys_travel_in_the_requested_encodings() {
    let svc = service(Limits::default());
    create(&svc, 2).await;
    let push = pb::PushRequest {
        table: "emb".into(),
        gradients: wire::encode_values(&[-1.0, -2.0, -0.5, 4.0], pb::ValueEncoding::Bf16),
        encoding: pb::ValueEncoding::Bf16 as i32,
        delta_keys: wire::encode_delta_keys(&[3, 9]).unwrap(),
        ..Default::default()
    };
    svc.push(Request::new(push)).await.unwrap();
    let resp = svc
        .pull(Request::new(pb::PullRequest {
            table: "emb".into(),
            encoding: pb::ValueEncoding::F16 as i32,
            delta_keys: wire::encode_delta_keys(&[3, 9, 9]).unwrap(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.encoding, pb::ValueEncoding::F16 as i32);
    assert_eq!(resp.values.len(), 3 * 2 * 2, "2 bytes per value");
    assert_eq!(
        wire::decode_values(&resp.values, pb::ValueEncoding::F16).unwrap(),
        [1.0, 2.0, 0.5, -4.0, 0.5, -4.0]
    );
}

#[tokio::test]
async fn malformed_encodings_are_refused_and_apply_nothing() {
    let svc = service(Limits {
        max_request_bytes: 1 << 20,
        max_keys_per_request: 2,
        ..Limits::default()
    });
    create(&svc, 1).await;
    let cases = [
        (
            "unknown encoding",
            pb::PushRequest {
                table: "emb".into(),
                keys: vec![1],
                gradients: wire::encode_f32s(&[1.0]),
                encoding: 7,
                ..Default::default()
            },
            Code::InvalidArgument,
        ),
        (
            "keys and delta_keys",
            pb::PushRequest {
                table: "emb".into(),
                keys: vec![1],
                gradients: wire::encode_f32s(&[1.0]),
                delta_keys: wire::encode_delta_keys(&[1]).unwrap(),
                ..Default::default()
            },
            Code::InvalidArgument,
        ),
        (
            "truncated varint",
            pb::PushRequest {
                table: "emb".into(),
                gradients: wire::encode_f32s(&[1.0]),
                delta_keys: vec![0x81].into(),
                ..Default::default()
            },
            Code::InvalidArgument,
        ),
        (
            "over the key limit",
            pb::PushRequest {
                table: "emb".into(),
                gradients: wire::encode_f32s(&[1.0; 3]),
                delta_keys: wire::encode_delta_keys(&[1, 2, 3]).unwrap(),
                ..Default::default()
            },
            Code::ResourceExhausted,
        ),
        (
            "f16 bytes for an f32 push",
            pb::PushRequest {
                table: "emb".into(),
                keys: vec![1, 2],
                gradients: wire::encode_values(&[1.0, 1.0], pb::ValueEncoding::F16),
                ..Default::default()
            },
            Code::InvalidArgument,
        ),
    ];
    for (what, request, code) in cases {
        let err = svc.push(Request::new(request)).await.unwrap_err();
        assert_eq!(err.code(), code, "{what}: {}", err.message());
    }
    let stats = svc
        .stats(Request::new(pb::StatsRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.tables[0].rows, 0, "no refused push created a row");
}

#[tokio::test]
async fn push_many_applies_every_part_or_none() {
    let svc = service(Limits::default());
    create(&svc, 1).await;
    let part = |table: &str, key: u64| pb::PushRequest {
        table: table.into(),
        keys: vec![key],
        gradients: wire::encode_f32s(&[1.0]),
        ..Default::default()
    };
    let bad = pb::PushManyRequest {
        pushes: vec![part("emb", 1), part("nope", 2)],
        ..Default::default()
    };
    let err = svc.push_many(Request::new(bad)).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let good = pb::PushManyRequest {
        pushes: vec![part("emb", 1), part("emb", 2)],
        ..Default::default()
    };
    let answer = svc
        .push_many(Request::new(good))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.pushes.len(), 2);
    let pulled = svc
        .pull_many(Request::new(pb::PullManyRequest {
            pulls: vec![
                pb::PullRequest {
                    table: "emb".into(),
                    keys: vec![1],
                    ..Default::default()
                },
                pb::PullRequest {
                    table: "emb".into(),
                    keys: vec![2, 3],
                    ..Default::default()
                },
            ],
        }))
        .await
        .unwrap()
        .into_inner();
    let values: Vec<Vec<f32>> = pulled
        .pulls
        .iter()
        .map(|p| wire::decode_f32s(&p.values).unwrap())
        .collect();
    assert_eq!(
        values,
        [vec![-1.0], vec![-1.0, 0.0]],
        "key 1 pushed once, not twice"
    );
}

#[tokio::test]
async fn a_push_retried_with_the_same_writer_and_seq_is_applied_once() {
    let svc = service(Limits::default());
    create(&svc, 1).await;
    let push = |seq: u64, grad: f32| pb::PushRequest {
        table: "emb".into(),
        keys: vec![4],
        gradients: wire::encode_f32s(&[grad]),
        writer: 77,
        seq,
        ..Default::default()
    };
    let first = svc
        .push(Request::new(push(1, 1.0)))
        .await
        .unwrap()
        .into_inner();
    assert!(!first.duplicate);
    assert_eq!(first.rows_applied, 1);
    // The answer was lost; the client sends the same call again.
    let again = svc
        .push(Request::new(push(1, 1.0)))
        .await
        .unwrap()
        .into_inner();
    assert!(again.duplicate, "a retry is recognized");
    assert_eq!(again.rows_applied, 0);
    // A refused call claims nothing: the corrected retry is applied.
    let refused = svc.push(Request::new(push(2, f32::NAN))).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    let corrected = svc
        .push(Request::new(push(2, 1.0)))
        .await
        .unwrap()
        .into_inner();
    assert!(!corrected.duplicate);
    let mut row = Vec::new();
    svc.shard.pull("emb", &[4], &mut row).unwrap();
    assert_eq!(row, [-2.0], "seq 1 once and seq 2 once, with lr 1");
    let counters = &svc.counters.requests;
    assert_eq!(
        counters
            .updates_applied
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );
    assert_eq!(
        counters
            .duplicate_pushes
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

#[tokio::test]
async fn a_writer_s_seq_0_is_malformed_and_a_forgotten_seq_is_refused_not_acknowledged() {
    let svc = service(Limits::default());
    create(&svc, 1).await;
    let push = |seq: u64| pb::PushRequest {
        table: "emb".into(),
        keys: vec![4],
        gradients: wire::encode_f32s(&[1.0]),
        writer: 5,
        seq,
        ..Default::default()
    };
    let zero = svc.push(Request::new(push(0))).await.unwrap_err();
    assert_eq!(zero.code(), Code::InvalidArgument);
    assert!(zero.message().contains("seq >= 1"), "{}", zero.message());
    let many = pb::PushManyRequest {
        pushes: vec![push(0)],
        writer: 5,
        seq: 0,
    };
    let zero = svc.push_many(Request::new(many)).await.unwrap_err();
    assert_eq!(zero.code(), Code::InvalidArgument);
    let last = crate::dedup::WINDOW as u64 + 10;
    for seq in 1..=last {
        svc.push(Request::new(push(seq))).await.unwrap();
    }
    let old = svc.push(Request::new(push(3))).await.unwrap_err();
    assert_eq!(old.code(), Code::FailedPrecondition, "{}", old.message());
    let mut row = Vec::new();
    svc.shard.pull("emb", &[4], &mut row).unwrap();
    assert_eq!(
        row,
        [-(last as f32)],
        "each seq applied once, seq 0 and the old retry not at all"
    );
}

#[tokio::test]
async fn a_backup_refuses_workers_and_cannot_be_promoted_before_it_caught_up() {
    let shard = Arc::new(Shard::new(0, 1));
    let backup = Replication::new(Arc::clone(&shard), Role::Backup, Peer::default());
    let svc = ShardService::new(shard, Limits::default(), None).with_replication(backup);
    let pull = pb::PullRequest {
        table: "emb".into(),
        keys: vec![1],
        ..Default::default()
    };
    let refused = svc.pull(Request::new(pull)).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable);
    assert!(
        refused.message().contains("backup of shard 0"),
        "{refused:?}"
    );
    let early = svc
        .promote(Request::new(pb::PromoteRequest {}))
        .await
        .unwrap_err();
    assert_eq!(early.code(), Code::FailedPrecondition);
    let described = svc
        .describe(Request::new(pb::DescribeRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(described.role, "backup");
}

mod properties {
    use super::*;
    use proptest::collection::vec;
    use proptest::prelude::*;
    use proptest::strategy::ValueTree;

    /// A push as a hostile or buggy client might send it.
    fn hostile_push() -> impl Strategy<Value = pb::PushRequest> {
        (
            prop::sample::select(vec!["emb", "nope", "", "emb/../x"]),
            vec(0u64..8, 0..6),
            prop_oneof![
                vec(any::<f32>(), 0..10).prop_map(|g| wire::encode_f32s(&g)),
                vec(any::<u8>(), 0..24).prop_map(bytes::Bytes::from),
            ],
            prop::option::of(prop_oneof![Just(f32::NAN), Just(-1.0f32), 0.0f32..2.0]),
            -1i32..4,
            prop_oneof![Just(Vec::new()), vec(any::<u8>(), 0..8)],
        )
            .prop_map(|(table, keys, gradients, lr_scale, encoding, delta)| {
                pb::PushRequest {
                    table: table.into(),
                    keys,
                    gradients,
                    lr_scale,
                    encoding,
                    delta_keys: delta.into(),
                    ..Default::default()
                }
            })
    }

    /// A push a correct client sends (keys listed, or sorted as delta
    /// keys), which the shard must apply.
    fn well_formed_push() -> impl Strategy<Value = pb::PushRequest> {
        vec(0u64..8, 1..=5)
            .prop_flat_map(|keys| {
                let n = keys.len() * 2;
                (
                    Just(keys),
                    vec(-4.0f32..4.0, n),
                    prop::option::of(0.0f32..2.0),
                    any::<bool>(),
                )
            })
            .prop_map(|(mut keys, grads, lr_scale, delta)| {
                let mut push = pb::PushRequest {
                    table: "emb".into(),
                    lr_scale,
                    ..Default::default()
                };
                if delta {
                    keys.sort_unstable();
                    push.delta_keys = wire::encode_delta_keys(&keys).unwrap();
                } else {
                    push.keys = keys;
                }
                push.gradients = wire::encode_f32s(&grads);
                push
            })
    }

    fn any_push() -> impl Strategy<Value = pb::PushRequest> {
        prop_oneof![well_formed_push(), hostile_push()]
    }

    /// The shard's rows after `push` by SGD with rate 1, computed here.
    fn reference(
        before: &crate::store::ShardSnapshot,
        push: &pb::PushRequest,
    ) -> Vec<(u64, Vec<f32>)> {
        let mut rows: std::collections::BTreeMap<u64, Vec<f32>> = before.tables[0]
            .keys
            .iter()
            .zip(before.tables[0].values.chunks_exact(2))
            .map(|(&k, v)| (k, v.to_vec()))
            .collect();
        let keys = if push.keys.is_empty() {
            wire::decode_delta_keys(&push.delta_keys, usize::MAX).unwrap()
        } else {
            push.keys.clone()
        };
        let encoding = pb::ValueEncoding::try_from(push.encoding).unwrap();
        let grads = wire::decode_values(&push.gradients, encoding).unwrap();
        let lr = 1.0f32 * push.lr_scale.unwrap_or(1.0);
        for (key, g) in keys.iter().zip(grads.chunks_exact(2)) {
            let row = rows.entry(*key).or_insert_with(|| vec![0.0; 2]);
            for (w, g) in row.iter_mut().zip(g) {
                *w -= lr * g;
            }
        }
        rows.into_iter().collect()
    }

    fn rows_of(snapshot: &crate::store::ShardSnapshot) -> Vec<(u64, Vec<f32>)> {
        snapshot.tables[0]
            .keys
            .iter()
            .zip(snapshot.tables[0].values.chunks_exact(2))
            .map(|(&k, v)| (k, v.to_vec()))
            .collect()
    }

    /// A shard whose table `emb` (dim 2, SGD rate 1) holds rows 0..4.
    fn shard_with_rows(runtime: &tokio::runtime::Runtime) -> ShardService {
        let svc = service(Limits {
            max_request_bytes: 1 << 20,
            max_keys_per_request: 5,
            ..Limits::default()
        });
        runtime.block_on(create(&svc, 2));
        runtime
            .block_on(svc.push(push(
                vec![0, 1, 2, 3],
                &[-1.0, 0.5, 2.0, -3.0, 0.25, 0.0, -0.5, 1.5],
            )))
            .unwrap();
        svc
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        #[test]
        fn a_push_is_applied_whole_or_refused_with_the_shard_unchanged(
            push in any_push()
        ) {
            let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let svc = shard_with_rows(&runtime);
            let before = svc.shard.snapshot().unwrap();
            match runtime.block_on(svc.push(Request::new(push.clone()))) {
                Ok(_) => prop_assert_eq!(rows_of(&svc.shard.snapshot().unwrap()), reference(&before, &push)),
                Err(status) => {
                    prop_assert!(!status.message().is_empty());
                    prop_assert_eq!(svc.shard.snapshot().unwrap(), before);
                }
            }
        }
    }

    #[test]
    fn the_push_property_reaches_its_accept_path() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let mut runner = proptest::test_runner::TestRunner::deterministic();
        let strategy = any_push();
        let accepted = (0..400)
            .filter(|_| {
                let push = strategy.new_tree(&mut runner).unwrap().current();
                let svc = shard_with_rows(&runtime);
                runtime.block_on(svc.push(Request::new(push))).is_ok()
            })
            .count();
        assert!(
            accepted >= 150,
            "only {accepted} of 400 generated pushes were accepted"
        );
    }
}
