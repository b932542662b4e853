//! Replicated shards on loopback ports (in-process servers): writes reach
//! the backup before they are acknowledged, clients fail over when the
//! primary dies or is replaced, retries apply once, and a replacement
//! backup catches up.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::sync::Arc;
use std::time::Duration;

use ps_common::pb::parameter_server_client::ParameterServerClient;
use ps_common::pb::{self};
use ps_common::{InitializerSpec, OptimizerSpec, TableKind, TableSpec};
use ps_server::auth::Auth;
use ps_server::metrics::ShardCounters;
use ps_server::replication::{Peer, Replication, Role};
use ps_server::{ServerConfig, Shard};
use ps_worker::{ClientConfig, PsClient};
use tokio::task::JoinHandle;

/// One shard server in this process. Dropping it aborts the server like a
/// crash: connections close, nothing is drained.
struct Node {
    addr: String,
    shard: Arc<Shard>,
    replication: Arc<Replication>,
    counters: Arc<ShardCounters>,
    task: JoinHandle<()>,
}

impl Drop for Node {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The servers' credentials: no worker token, a peer token for replication.
fn auth() -> Auth {
    Auth::default().with_peer_token("peer-token-for-these-tests")
}

async fn node(role: Role) -> Node {
    node_on(role, Shard::new(0, 1)).await
}

/// A node serving `shard` (which may have a disk tier).
async fn node_on(role: Role, shard: Shard) -> Node {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let shard = Arc::new(shard);
    let peer = Peer {
        auth: auth(),
        tls: None,
    };
    let replication = Replication::new(Arc::clone(&shard), role, peer);
    let config = ServerConfig {
        auth: auth(),
        evict_every: Duration::from_millis(10),
        ..ServerConfig::new(0, 1)
    };
    let counters = Arc::clone(&config.counters);
    let task = tokio::spawn({
        let (shard, replication) = (Arc::clone(&shard), Arc::clone(&replication));
        async move {
            ps_server::server::run_replicated(
                listener,
                config,
                shard,
                replication,
                std::future::pending(),
            )
            .await
            .unwrap();
        }
    });
    Node {
        addr,
        shard,
        replication,
        counters,
        task,
    }
}

/// A primary, a backup that joined it, and a client of the primary (which
/// learns the backup from it) that created the test table.
async fn replicated() -> (Node, Node, PsClient) {
    let primary = node(Role::Primary).await;
    let backup = backup_of(&primary).await;
    let client = PsClient::connect(
        std::slice::from_ref(&primary.addr),
        &ClientConfig::default(),
    )
    .await
    .unwrap();
    client.create_table(&table()).await.unwrap();
    (primary, backup, client)
}

/// A backup that has joined `primary`.
async fn backup_of(primary: &Node) -> Node {
    let backup = node(Role::Backup).await;
    backup
        .replication
        .join(&primary.addr, &backup.addr, Duration::from_secs(10))
        .await
        .unwrap();
    backup
}

fn table() -> TableSpec {
    TableSpec {
        name: "emb".into(),
        kind: TableKind::Sparse,
        dim: 2,
        initializer: InitializerSpec::Constant { value: 0.5 },
        optimizer: OptimizerSpec::Adagrad {
            lr: 0.1,
            initial_accumulator: 0.1,
            eps: 1e-8,
            l2: 0.0,
            weight_decay: 0.0,
        },
        seed: 1,
        lifecycle: Default::default(),
    }
}

fn rows(shard: &Shard, keys: &[u64]) -> Vec<f32> {
    let mut out = Vec::new();
    shard.pull("emb", keys, &mut out).unwrap();
    out
}

/// The bits of `values`: replicas must agree to the bit, not only
/// compare equal as floats (which would let -0.0 pass for 0.0).
fn bits(values: Vec<f32>) -> Vec<u32> {
    values.into_iter().map(f32::to_bits).collect()
}

/// Push calls a node applied, and those it answered as duplicates.
fn counters(node: &Node) -> (u64, u64) {
    use std::sync::atomic::Ordering::Relaxed;
    let requests = &node.counters.requests;
    (
        requests.updates_applied.load(Relaxed),
        requests.duplicate_pushes.load(Relaxed),
    )
}

/// Pushes `steps` steps of gradients for keys 0..50 and waits for the acks.
async fn train(client: &PsClient, steps: usize) {
    let keys: Vec<u64> = (0..50).collect();
    for step in 0..steps {
        let grads: Vec<f32> = (0..100).map(|i| ((i + step) % 7) as f32 - 3.0).collect();
        client.push_unique("emb", &keys, &grads).await.unwrap();
    }
    client.flush().await.unwrap();
}

/// Each push is on the backup, with the same bits, by the time it is
/// acknowledged (checked after every acknowledgement, not after a final
/// flush), for an order-dependent optimizer (Adagrad) and for per-row Adam.
#[tokio::test]
async fn every_acknowledged_push_is_on_the_backup_with_the_same_values() {
    let (primary, backup, client) = replicated().await;
    let adam = TableSpec {
        name: "adam".into(),
        optimizer: OptimizerSpec::Adam {
            lr: 0.05,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            l2: 0.0,
            weight_decay: 0.0,
        },
        ..table()
    };
    client.create_table(&adam).await.unwrap();
    let keys: Vec<u64> = (0..50).collect();
    let read = |shard: &Shard, table: &str| {
        let mut out = Vec::new();
        shard.pull(table, &keys, &mut out).unwrap();
        out
    };
    for step in 0..40u64 {
        let grads: Vec<f32> = (0..100).map(|i| ((i + step) % 7) as f32 - 3.0).collect();
        let table = if step % 2 == 0 { "emb" } else { "adam" };
        client.push_unique(table, &keys, &grads).await.unwrap();
        client.flush().await.unwrap();
        let acked = client.push_acks().acked;
        assert_eq!(acked, step + 1);
        assert_eq!(
            counters(&backup).0,
            acked,
            "step {step}: the backup applied every ack"
        );
        for table in ["emb", "adam"] {
            assert_eq!(
                bits(read(&primary.shard, table)),
                bits(read(&backup.shard, table)),
                "step {step}, table {table}: the same bits, applied in the same order"
            );
        }
    }
    assert_eq!(backup.replication.describe().0, "backup");
    assert_eq!(
        primary.replication.describe(),
        ("primary", Some(backup.addr.clone()))
    );
}

/// Admissions and evictions replicate: after a stream of new ids through
/// a table that admits at the second push and keeps at most 30 rows, the
/// backup holds the primary's rows (and admission counts) exactly.
#[tokio::test]
async fn a_backup_equals_its_primary_row_for_row_after_admissions_and_evictions() {
    use ps_common::lifecycle::{Admission, Eviction, Lifecycle};
    let (primary, backup, client) = replicated().await;
    let stream = TableSpec {
        name: "stream".into(),
        lifecycle: Lifecycle {
            admission: Some(Admission::Count {
                min_count: 2,
                sketch_width: 1 << 10,
            }),
            eviction: Some(Eviction {
                max_rows: Some(30),
                ..Eviction::default()
            }),
        },
        ..table()
    };
    client.create_table(&stream).await.unwrap();
    push_drifting_ids(&client, false).await;
    let stats = |node: &Node| {
        let t = node.shard.table_stats();
        let s = t.iter().find(|t| t.spec.name == "stream").unwrap().clone();
        (s.rows, s.admitted_rows, s.filtered_pushes, s.evicted_rows)
    };
    let (rows, admitted, filtered, evicted) = stats(&primary);
    assert!(rows <= 30, "{rows} rows past the cap");
    assert!(evicted > 0 && admitted > 30 && filtered > 0);
    assert_eq!(stats(&backup), (rows, admitted, filtered, evicted));
    assert_eq!(
        primary.shard.snapshot().unwrap(),
        backup.shard.snapshot().unwrap()
    );
}

/// Pushes to table "stream" 60 steps of drifting ids (20 a step, 4 of them
/// new; with `revisit`, every tenth step the first ten ids again), then,
/// once the evictor has caught up, one more push: its acknowledgement
/// means the backup applied every write before it, evictions included.
async fn push_drifting_ids(client: &PsClient, revisit: bool) {
    for step in 0..60u64 {
        let mut keys: Vec<u64> = (step * 4..step * 4 + 20).collect();
        if revisit && step % 10 == 9 {
            keys.extend(0..10);
        }
        client
            .push_unique("stream", &keys, &vec![0.5; keys.len() * 2])
            .await
            .unwrap();
        client.flush().await.unwrap();
        if step % 10 == 0 {
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    client.push_unique("emb", &[1], &[0.0, 0.0]).await.unwrap();
    client.flush().await.unwrap();
}

/// With a disk tier on both, the rows the primary's row cap moves to disk
/// move on the backup too (the eviction is a replicated write that says
/// so), and come back on both when pushes touch them.
#[tokio::test]
async fn a_backup_with_a_disk_tier_moves_the_rows_its_primary_moves() {
    use ps_common::lifecycle::{Eviction, Lifecycle};
    use ps_server::store::disk::DiskTier;
    let dir = std::env::temp_dir().join(format!("ps-tier-replication-{}", std::process::id()));
    let tiered = |shard: u32| {
        let tier = DiskTier::create(&dir.join(shard.to_string()), 0, 1 << 20).unwrap();
        Shard::new(0, 1).with_disk_tier(tier)
    };
    let primary = node_on(Role::Primary, tiered(0)).await;
    let backup = node_on(Role::Backup, tiered(1)).await;
    backup
        .replication
        .join(&primary.addr, &backup.addr, Duration::from_secs(10))
        .await
        .unwrap();
    let client = PsClient::connect(
        std::slice::from_ref(&primary.addr),
        &ClientConfig::default(),
    )
    .await
    .unwrap();
    let stream = TableSpec {
        name: "stream".into(),
        lifecycle: Lifecycle {
            admission: None,
            eviction: Some(Eviction {
                max_rows: Some(30),
                ..Eviction::default()
            }),
        },
        ..table()
    };
    client.create_table(&table()).await.unwrap();
    client.create_table(&stream).await.unwrap();
    push_drifting_ids(&client, true).await;
    let stats = |node: &Node| {
        let t = node.shard.table_stats();
        let s = t.iter().find(|t| t.spec.name == "stream").unwrap().clone();
        (s.rows, s.rows_on_disk, s.evicted_rows)
    };
    let (rows, on_disk, evicted) = stats(&primary);
    assert!(
        rows <= 31 && on_disk > 150 && evicted >= on_disk,
        "{:?}",
        stats(&primary)
    );
    assert_eq!(stats(&backup), (rows, on_disk, evicted));
    assert_eq!(
        primary.shard.snapshot().unwrap(),
        backup.shard.snapshot().unwrap()
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test]
async fn when_the_primary_dies_the_client_fails_over_and_loses_no_acknowledged_push() {
    let (primary, backup, client) = replicated().await;
    train(&client, 20).await;
    let primary_addr = primary.addr.clone();
    drop(primary); // crash: no drain, connections cut
    train(&client, 20).await;
    let acks = client.push_acks();
    assert_eq!(acks.acked, 40);
    assert_eq!(acks.failovers, 1);
    assert_eq!(backup.replication.describe().0, "primary");
    assert_eq!(
        counters(&backup).0,
        acks.acked,
        "the survivor applied each acknowledged push exactly once"
    );

    // A replacement joins the promoted server and catches up.
    let replacement = backup_of(&backup).await;
    let acked_before_it = client.push_acks().acked;
    train(&client, 5).await;
    let keys: Vec<u64> = (0..50).collect();
    assert_eq!(
        bits(rows(&backup.shard, &keys)),
        bits(rows(&replacement.shard, &keys))
    );

    // A worker restarted with the original addresses finds the promoted
    // backup when the listed primary is gone.
    let dead_primary = primary_addr.clone();
    let restarted = PsClient::connect(
        std::slice::from_ref(&dead_primary),
        &ClientConfig {
            backups: vec![backup.addr.clone()],
            connect_timeout: Duration::from_secs(1),
            ..ClientConfig::default()
        },
    )
    .await
    .unwrap();
    restarted.create_table(&table()).await.unwrap();
    assert_eq!(
        restarted.pull("emb", &keys).await.unwrap(),
        rows(&backup.shard, &keys)
    );

    // The client learns the replacement (it asks every 2 s while it knows
    // no backup) and survives a second failure.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    train(&client, 1).await;
    drop(backup);
    train(&client, 5).await;
    let acks = client.push_acks();
    assert_eq!(acks.failovers, 2);
    assert_eq!(replacement.replication.describe().0, "primary");
    assert_eq!(
        counters(&replacement).0,
        acks.acked - acked_before_it,
        "every push acknowledged since it joined was applied on it (the rest came in its snapshot)"
    );
}

#[tokio::test]
async fn a_backup_refuses_promotion_while_its_primary_serves() {
    let (primary, backup, client) = replicated().await;
    train(&client, 5).await;
    // Someone asks the backup to take over while the primary is alive.
    let mut raw = ParameterServerClient::connect(format!("http://{}", backup.addr))
        .await
        .unwrap();
    let refused = raw.promote(pb::PromoteRequest {}).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(refused.message().contains("still serves"), "{refused:?}");
    // Nothing changed: the primary serves, the backup follows.
    train(&client, 5).await;
    assert_eq!(primary.replication.describe().0, "primary");
    assert_eq!(backup.replication.describe().0, "backup");
    assert_eq!(client.push_acks().failovers, 0);
    assert_eq!(counters(&backup).0, 10);
}

#[tokio::test]
async fn a_push_whose_answer_is_lost_is_applied_once_when_retried() {
    let primary = node(Role::Primary).await;
    let backup = backup_of(&primary).await;
    let mut raw = ParameterServerClient::connect(format!("http://{}", primary.addr))
        .await
        .unwrap();
    raw.create_table(pb::CreateTableRequest {
        spec: Some((&table()).into()),
    })
    .await
    .unwrap();
    let push = pb::PushRequest {
        table: "emb".into(),
        keys: vec![9],
        gradients: ps_common::wire::encode_f32s(&[1.0, -1.0]),
        writer: 1234,
        seq: 1,
        ..Default::default()
    };
    // The first answer "is lost": the caller does not look at it and sends again.
    let _lost = raw.push(push.clone()).await.unwrap();
    let retried = raw.push(push).await.unwrap().into_inner();
    assert!(retried.duplicate);
    assert_eq!(counters(&primary), (1, 1));
    assert_eq!(counters(&backup).0, 1, "replicated once");
    assert_eq!(
        bits(rows(&primary.shard, &[9])),
        bits(rows(&backup.shard, &[9]))
    );
}

#[tokio::test]
async fn when_the_backup_dies_the_primary_drops_it_and_serves_alone() {
    let (primary, backup, client) = replicated().await;
    train(&client, 5).await;
    drop(backup);
    let started = std::time::Instant::now();
    train(&client, 5).await;
    let stalled = started.elapsed();
    assert_eq!(primary.replication.describe(), ("primary", None));
    assert_eq!(client.push_acks().acked, 10);
    assert_eq!(counters(&primary).0, 10);
    // Not before the backup's lease can have run out (it could still be
    // promoted until then), and not much past the primary's hold.
    assert!(
        stalled >= ps_server::replication::BACKUP_LEASE,
        "acknowledged alone after {stalled:?}, inside the dead backup's lease"
    );
    let bound = ps_server::replication::BACKUP_TIMEOUT + ps_server::replication::PRIMARY_HOLD;
    assert!(
        stalled < 3 * bound,
        "writes stalled {stalled:?}, far past the {bound:?} a dead backup holds them"
    );
    eprintln!("backup lost: writes stalled {stalled:?} before the primary went on alone");
}
