//! The client against real shards on loopback ports (in-process harness).

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::time::Duration;

use ps_common::pb::parameter_server_client::ParameterServerClient;
use ps_common::pb::{self};
use ps_common::routing::Placement;
use ps_common::{InitializerSpec, OptimizerSpec, ShardRouter, TableKind, TableSpec, wire};
use ps_server::Limits;
use ps_worker::{ClientConfig, LocalCluster, PsClient};
use tonic::Code;

fn sparse(name: &str, dim: u32) -> TableSpec {
    TableSpec {
        name: name.into(),
        kind: TableKind::Sparse,
        dim,
        initializer: InitializerSpec::Normal {
            mean: 0.0,
            std: 1.0,
        },
        optimizer: OptimizerSpec::sgd(1.0),
        seed: 5,
        lifecycle: Default::default(),
    }
}

async fn cluster(shards: u32, limits: Limits) -> (LocalCluster, PsClient) {
    let cluster = LocalCluster::start(shards, limits).await.unwrap();
    let client = cluster.client(&ClientConfig::default()).await.unwrap();
    (cluster, client)
}

#[tokio::test]
async fn pulled_rows_come_back_in_the_callers_order_across_shards() {
    let (_cluster, client) = cluster(3, Limits::default()).await;
    client.create_table(&sparse("emb", 4)).await.unwrap();
    let keys: Vec<u64> = (0..200).chain([7, 7, 3]).collect();
    let rows = client.pull("emb", &keys).await.unwrap();
    assert_eq!(rows.len(), keys.len() * 4);
    let mut expected = [0f32; 4];
    for (i, &k) in keys.iter().enumerate() {
        ps_common::init::init_row(
            &InitializerSpec::Normal {
                mean: 0.0,
                std: 1.0,
            },
            5,
            k,
            &mut expected,
        );
        assert_eq!(
            &rows[i * 4..i * 4 + 4],
            &expected,
            "key {k} at position {i}"
        );
    }
}

#[tokio::test]
async fn keys_are_spread_over_shards_by_the_shared_router() {
    let (cluster, client) = cluster(4, Limits::default()).await;
    client.create_table(&sparse("emb", 2)).await.unwrap();
    let keys: Vec<u64> = (1000..1400).collect();
    client.pull("emb", &keys).await.unwrap();
    let router = ShardRouter::new(4);
    for shard in 0..4 {
        let expected = keys
            .iter()
            .filter(|&&k| router.shard_of(Placement::Sparse, k) == shard as u32)
            .count();
        assert_eq!(cluster.shard(shard).table("emb").unwrap().len(), expected);
        assert!(expected > 50, "every shard gets a share");
    }
}

#[tokio::test]
async fn duplicate_keys_are_pushed_once_with_summed_gradients() {
    let (cluster, client) = cluster(2, Limits::default()).await;
    client.create_table(&sparse("emb", 2)).await.unwrap();
    let before = client.pull("emb", &[11]).await.unwrap();
    client
        .push("emb", &[11, 11, 11], &[1.0, 0.0, 2.0, 1.0, 0.5, 0.5])
        .await
        .unwrap();
    client.flush().await.unwrap();
    let after = client.pull("emb", &[11]).await.unwrap();
    assert!((after[0] - (before[0] - 3.5)).abs() < 1e-5);
    assert!((after[1] - (before[1] - 1.5)).abs() < 1e-5);
    let stats = client.stats().await.unwrap();
    let rows_pushed: u64 = stats.iter().map(|s| s.requests.unwrap().rows_pushed).sum();
    assert_eq!(rows_pushed, 1, "three occurrences travel as one row");
    let pushes: u64 = stats.iter().map(|s| s.requests.unwrap().push).sum();
    assert_eq!(pushes, 1, "only the owning shard is contacted");
    drop(cluster);
}

#[tokio::test]
async fn a_dense_table_is_split_into_blocks_over_shards() {
    let (cluster, client) = cluster(3, Limits::default()).await;
    let mut spec = sparse("mlp", 3);
    spec.kind = TableKind::Dense {
        rows: 64,
        block_rows: 4,
    };
    client.create_table(&spec).await.unwrap();
    let rows: Vec<u64> = (0..64).collect();
    let all = client.pull("mlp", &rows).await.unwrap();
    assert_eq!(all.len(), 64 * 3);
    let held: Vec<usize> = (0..3)
        .map(|i| cluster.shard(i).table("mlp").unwrap().len())
        .collect();
    assert_eq!(held.iter().sum::<usize>(), 64);
    assert!(
        held.iter().all(|&n| n % 4 == 0 && n > 0),
        "whole blocks on every shard: {held:?}"
    );
    let err = client.pull("mlp", &[64]).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.to_string().contains("out of range"), "{err}");
}

#[tokio::test]
async fn requests_over_the_shard_key_limit_are_split_by_the_client() {
    let limits = Limits {
        max_keys_per_request: 10,
        ..Limits::default()
    };
    let (cluster, client) = cluster(2, limits).await;
    client.create_table(&sparse("emb", 1)).await.unwrap();
    let keys: Vec<u64> = (0..95).collect();
    client.push("emb", &keys, &vec![0.5; 95]).await.unwrap();
    client.flush().await.unwrap();
    assert_eq!(client.pull("emb", &keys).await.unwrap().len(), 95);
    let stats = client.stats().await.unwrap();
    assert!(stats.iter().map(|s| s.requests.unwrap().push).sum::<u64>() >= 10);
    assert_eq!(
        stats
            .iter()
            .map(|s| s.requests.unwrap().errors)
            .sum::<u64>(),
        0
    );
    drop(cluster);
}

#[tokio::test]
async fn a_failed_async_push_surfaces_at_flush() {
    let (cluster, client) = cluster(1, Limits::default()).await;
    client.create_table(&sparse("emb", 1)).await.unwrap();
    cluster.shutdown().await.unwrap();
    client.push("emb", &[1], &[1.0]).await.unwrap();
    let err = client.flush().await.unwrap_err();
    assert!(err.to_string().starts_with("shard 0 (127.0.0.1:"), "{err}");
    // The error is reported once, not lost and not repeated forever.
    client.flush().await.unwrap();
}

#[tokio::test]
async fn servers_listed_in_the_wrong_order_are_refused() {
    let cluster = LocalCluster::start(2, Limits::default()).await.unwrap();
    let reversed: Vec<String> = cluster.addrs().iter().rev().cloned().collect();
    let err = PsClient::connect(&reversed, &ClientConfig::default())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("shard-id order"), "{err}");
}

#[tokio::test]
async fn an_unreachable_server_fails_after_bounded_retries_naming_it() {
    // Port 1 (tcpmux) is closed on any test machine: connections are
    // refused. (A bound-then-dropped ephemeral port can be taken by a
    // concurrent test's server.)
    let addr = "127.0.0.1:1".to_string();
    let config = ClientConfig {
        connect_timeout: Duration::from_millis(400),
        ..ClientConfig::default()
    };
    let err = PsClient::connect(std::slice::from_ref(&addr), &config)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(err.to_string().contains(&addr), "{err}");
    assert!(err.to_string().contains("attempts"), "{err}");
}

/// A raw gRPC client, to send requests the typed client would refuse to build.
async fn raw(cluster: &LocalCluster) -> ParameterServerClient<tonic::transport::Channel> {
    ParameterServerClient::connect(format!("http://{}", cluster.addrs()[0]))
        .await
        .unwrap()
        .max_encoding_message_size(usize::MAX)
}

#[tokio::test]
async fn bad_requests_get_clear_statuses_and_change_nothing() {
    let limits = Limits {
        max_request_bytes: 4096,
        max_keys_per_request: 100,
        ..Limits::default()
    };
    let (cluster, client) = cluster(1, limits).await;
    client.create_table(&sparse("emb", 2)).await.unwrap();
    let mut raw = raw(&cluster).await;
    let snapshot = client.pull("emb", &[1, 2]).await.unwrap();
    let push = |table: &str, keys: Vec<u64>, grads: &[f32]| pb::PushRequest {
        table: table.into(),
        keys,
        gradients: wire::encode_f32s(grads),
        ..Default::default()
    };

    let s = raw
        .push(push("nope", vec![1], &[0.0, 0.0]))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::NotFound);
    assert_eq!(s.message(), "table 'nope' does not exist");

    let s = raw
        .push(push("emb", vec![1, 2], &[1.0, 1.0, 1.0]))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(
        s.message().contains("2 keys need 4 gradient values, got 3"),
        "{}",
        s.message()
    );

    let s = raw
        .push(push("emb", vec![1, 2], &[1.0, 1.0, f32::NAN, 1.0]))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(s.message().contains("not finite"), "{}", s.message());

    let s = raw
        .push(push("emb", (0..101).collect(), &[0.0; 202]))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::ResourceExhausted);

    let s = raw
        .pull(pb::PullRequest {
            table: "emb".into(),
            keys: (0..2000).map(|k| k << 40).collect(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::ResourceExhausted, "{}", s.message());
    assert!(s.message().contains("too large"), "{}", s.message());

    let bad_spec = pb::CreateTableRequest {
        spec: Some(pb::TableSpec {
            dim: 0,
            ..(&sparse("emb2", 1)).into()
        }),
    };
    let s = raw.create_table(bad_spec).await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(s.message().contains("dim must be in"), "{}", s.message());

    let s = raw
        .create_table(pb::CreateTableRequest {
            spec: Some((&sparse("emb", 3)).into()),
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::AlreadyExists);
    assert!(
        s.message()
            .contains("different dim: existing 2, requested 3"),
        "{}",
        s.message()
    );

    // Nothing changed, and the server still serves.
    assert_eq!(client.pull("emb", &[1, 2]).await.unwrap(), snapshot);
    assert_eq!(cluster.shard(0).table("emb").unwrap().len(), 2);
    client.push("emb", &[1], &[1.0, 1.0]).await.unwrap();
    client.flush().await.unwrap();
    let moved = client.pull("emb", &[1]).await.unwrap();
    assert!((moved[0] - (snapshot[0] - 1.0)).abs() < 1e-6);
}

#[tokio::test]
async fn a_checkpoint_captures_every_shards_rows_and_needs_a_directory() {
    let dir = std::env::temp_dir().join(format!("ps-cluster-ckpt-{}", std::process::id()));
    let cluster = LocalCluster::start_with_checkpoints(2, Limits::default(), Some(dir.clone()))
        .await
        .unwrap();
    let client = cluster.client(&ClientConfig::default()).await.unwrap();
    client.create_table(&sparse("emb", 4)).await.unwrap();
    let keys: Vec<u64> = (0..300).collect();
    client
        .push("emb", &keys, &vec![0.1; 300 * 4])
        .await
        .unwrap();
    client.flush().await.unwrap();
    let written = client.checkpoint("c1").await.unwrap();
    assert_eq!(written.iter().map(|w| w.rows).sum::<u64>(), 300);
    for shard in 0..2u32 {
        let saved = ps_server::checkpoint::load(&dir.join("c1"), shard, 2).unwrap();
        assert_eq!(saved, cluster.shard(shard as usize).snapshot().unwrap());
    }

    let (_plain, client) = self::cluster(1, Limits::default()).await;
    let err = client.checkpoint("c1").await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.to_string().contains("--checkpoint-dir"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test]
async fn every_shard_answers_the_standard_grpc_health_check() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let cluster = LocalCluster::start(2, Limits::default()).await.unwrap();
    for addr in cluster.addrs() {
        let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut health = HealthClient::new(channel);
        for service in ["", "ps.v1.ParameterServer"] {
            let status = health
                .check(HealthCheckRequest {
                    service: service.into(),
                })
                .await
                .unwrap()
                .into_inner()
                .status;
            assert_eq!(status, ServingStatus::Serving as i32, "{addr} {service:?}");
        }
        let unknown = health
            .check(HealthCheckRequest {
                service: "no.such.Service".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(unknown.code(), Code::NotFound);
    }
    cluster.shutdown().await.unwrap();
}

#[tokio::test]
async fn without_the_right_bearer_token_calls_are_refused_and_nothing_is_applied() {
    use ps_server::auth::Auth;
    use ps_server::{ServerConfig, Shard};
    use std::sync::Arc;

    const TOKEN: &str = "0123456789abcdef-token";
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let shard = Arc::new(Shard::new(0, 1));
    let config = ServerConfig {
        drain_timeout: Duration::from_secs(1),
        auth: Auth::bearer(TOKEN),
        ..ServerConfig::new(0, 1)
    };
    let counters = Arc::clone(&config.counters);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(ps_server::run(
        listener,
        config,
        Arc::clone(&shard),
        async {
            let _ = stopped.await;
        },
    ));
    let with = |token: Option<&str>| ClientConfig {
        auth_token: token.map(str::to_string),
        connect_timeout: Duration::from_secs(2),
        ..ClientConfig::default()
    };

    let good = PsClient::connect(std::slice::from_ref(&addr), &with(Some(TOKEN)))
        .await
        .unwrap();
    good.create_table(&sparse("emb", 2)).await.unwrap();
    let before = good.pull("emb", &[1]).await.unwrap();

    for token in [None, Some("wrong-token-0123456789")] {
        let refused = PsClient::connect(std::slice::from_ref(&addr), &with(token))
            .await
            .unwrap_err();
        assert!(
            matches!(
                refused,
                ps_common::PsError::Shard {
                    code: Code::Unauthenticated,
                    ..
                }
            ),
            "{refused}"
        );
    }
    // A push that reaches the server with a wrong token changes nothing.
    let mut raw = ParameterServerClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let mut push = tonic::Request::new(pb::PushRequest {
        table: "emb".into(),
        keys: vec![1],
        gradients: wire::encode_f32s(&[5.0, 5.0]),
        ..Default::default()
    });
    push.metadata_mut().insert(
        "authorization",
        "Bearer wrong-token-0123456789".parse().unwrap(),
    );
    let status = raw.push(push).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert_eq!(
        status.message(),
        "invalid bearer token",
        "nothing internal leaks"
    );
    assert_eq!(good.pull("emb", &[1]).await.unwrap(), before);
    assert_eq!(
        counters
            .requests
            .push
            .load(std::sync::atomic::Ordering::Relaxed),
        0,
        "refused before the service counted it"
    );

    // Health probes carry no token and stay open.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let answer = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();
    assert_eq!(answer.into_inner().status, 1, "SERVING");
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_flood_of_fresh_ids_past_the_row_cap_is_refused_with_resource_exhausted() {
    let (cluster, client) = cluster(1, Limits::default()).await;
    client.create_table(&sparse("emb", 4)).await.unwrap();
    cluster.shard(0).set_row_cap(Some(100));
    client
        .pull("emb", &(0..100).collect::<Vec<u64>>())
        .await
        .unwrap();
    let err = client
        .pull("emb", &(1000..1010).collect::<Vec<u64>>())
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            ps_common::PsError::Shard {
                code: Code::ResourceExhausted,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(cluster.shard(0).table("emb").unwrap().len(), 100);
    // Rows that exist are still served.
    assert_eq!(client.pull("emb", &[5, 6]).await.unwrap().len(), 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_shard_s_follower_ends_with_its_primary_s_rows_after_concurrent_pushes() {
    let (mut cluster, client) = cluster(2, Limits::default()).await;
    cluster.add_followers().await.unwrap();
    let table = TableSpec {
        optimizer: OptimizerSpec::Adagrad {
            lr: 0.1,
            initial_accumulator: 0.1,
            eps: 1e-8,
            l2: 0.0,
            weight_decay: 0.0,
        },
        ..sparse("emb", 4)
    };
    client.create_table(&table).await.unwrap();
    // Two writers push overlapping keys at once: the order the rows saw
    // them is the order the followers apply them (Adagrad depends on it).
    let mut writers = Vec::new();
    for w in 0..2u64 {
        let c = cluster.client(&ClientConfig::default()).await.unwrap();
        c.create_table(&table).await.unwrap();
        writers.push(tokio::spawn(async move {
            for step in 0..50u64 {
                let keys: Vec<u64> = (0..64).map(|k| (k * 7 + step + w) % 100).collect();
                let grads: Vec<f32> = (0..keys.len() * 4)
                    .map(|i| ((i as u64 + step) % 5) as f32 * 0.1 - 0.2)
                    .collect();
                c.push("emb", &keys, &grads).await.unwrap();
            }
            c.flush().await.unwrap();
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    let keys: Vec<u64> = (0..100).collect();
    let want = client.pull("emb", &keys).await.unwrap();
    let followers: Vec<String> = cluster.followers().iter().map(|(a, _)| a.clone()).collect();
    let reader = PsClient::connect(&followers, &ClientConfig::default())
        .await
        .unwrap();
    reader.register_table(&table).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let got = reader.pull("emb", &keys).await.unwrap();
        if got == want {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the followers never caught up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
