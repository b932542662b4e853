//! Failover decided by a real etcd: servers started with `--etcd` hold a
//! lease, the standby is promoted by a compare-and-swap when the primary's
//! lease runs out, a primary past its lease acknowledges nothing, a
//! restarted server rejoins or restores, and losing an etcd member does not
//! stop training.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use std::time::{Duration, Instant};

use common::etcd::{EtcdCluster, LEASE_TTL_SECS, coordinated_server, etcd_available};
use common::{Server, counting_table, stats_of, temp_dir};
use ps_worker::{ClientConfig, PsClient};

/// A client that finds the job's primaries in `etcd`.
fn coordinated_client(etcd: &EtcdCluster, job: &str) -> ClientConfig {
    ClientConfig {
        coordinator: Some(etcd.job(job)),
        ..ClientConfig::default()
    }
}

/// Describe of the server at `addr`.
async fn describe(addr: &str) -> ps_common::pb::DescribeResponse {
    let mut client = ps_common::pb::parameter_server_client::ParameterServerClient::connect(
        format!("http://{addr}"),
    )
    .await
    .unwrap();
    client
        .describe(ps_common::pb::DescribeRequest {})
        .await
        .unwrap()
        .into_inner()
}

/// Starts two servers of shard 0 of 1 in `job`: the first becomes primary,
/// the second joins it; returns once etcd names the second standby.
async fn primary_and_standby(
    dir: &std::path::Path,
    etcd: &EtcdCluster,
    job: &str,
) -> (Server, Server) {
    let mut primary = coordinated_server(dir, etcd, job, (0, 1), &[]);
    primary.wait_for_line("primary of shard 0 at epoch 1");
    let standby = standby_of(dir, etcd, job).await;
    (primary, standby)
}

/// Starts a server of shard 0 in `job` that joins the primary; returns
/// once etcd names it standby.
async fn standby_of(dir: &std::path::Path, etcd: &EtcdCluster, job: &str) -> Server {
    let mut standby = coordinated_server(dir, etcd, job, (0, 1), &[]);
    standby.wait_for_line("joined ");
    let keys = etcd.job(job);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let view = keys.shard(0).await.unwrap();
        if view
            .standby
            .as_ref()
            .is_some_and(|(s, _)| s.addr == standby.addr)
        {
            return standby;
        }
        assert!(
            Instant::now() < deadline,
            "{} never became standby: {view:?}",
            standby.addr
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A primary hung (SIGSTOP) past its lease while a client pushes: etcd's
/// lease runs out, the standby is promoted, the client follows etcd to it,
/// and every acknowledged push is applied there exactly once. Woken, the
/// old primary acknowledges nothing: a push that reached it while it was
/// stopped is refused, and it exits saying it lost its lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_hung_past_its_lease_is_replaced_and_acknowledges_nothing_when_it_wakes() {
    if !etcd_available() {
        return;
    }
    let dir = temp_dir("etcd-partition");
    let etcd = EtcdCluster::start(&dir, 1);
    let (mut primary, standby) = primary_and_standby(&dir, &etcd, "partition").await;
    let client = PsClient::connect(&[], &coordinated_client(&etcd, "partition"))
        .await
        .unwrap();
    let spec = counting_table("emb", 1);
    client.create_table(&spec).await.unwrap();
    // A raw gRPC client of the old primary alone (no retries, no
    // failover): its push, sent while the primary is stopped, is the one
    // the woken primary must not acknowledge.
    let mut stale = ps_common::pb::parameter_server_client::ParameterServerClient::connect(
        format!("http://{}", primary.addr),
    )
    .await
    .unwrap();

    let pushes = |n: usize| {
        let client = client.clone();
        async move {
            for _ in 0..n {
                client.push("emb", &[1, 2, 3], &[-1.0; 3]).await.unwrap();
            }
            client.flush().await.unwrap();
        }
    };
    pushes(20).await;
    primary.signal("-STOP");
    let stopped = Instant::now();
    let stale_push = tokio::spawn(async move {
        stale
            .push(ps_common::pb::PushRequest {
                table: "emb".into(),
                keys: vec![1, 2, 3],
                gradients: ps_common::wire::encode_f32s(&[-1.0; 3]),
                writer: 42,
                seq: 1,
                ..Default::default()
            })
            .await
    });
    pushes(20).await;
    let failover = stopped.elapsed();
    // Hold the old primary stopped well past its lease, then wake it.
    tokio::time::sleep(Duration::from_secs(LEASE_TTL_SECS)).await;
    primary.signal("-CONT");
    let refused = stale_push.await.unwrap();
    assert!(
        refused.is_err(),
        "the woken primary acknowledged a push: {refused:?}"
    );
    let exited = tokio::task::spawn_blocking(move || {
        let status = primary.child.wait().unwrap();
        let said = primary.wait_for_line("coordination ended");
        (status, said)
    })
    .await
    .unwrap();
    assert_eq!(exited.0.code(), Some(3), "{}", exited.1);

    let acks = client.push_acks();
    assert_eq!(acks.acked, 40);
    assert_eq!(acks.failovers, 1);
    let survivor = describe(&standby.addr).await;
    assert_eq!((survivor.role.as_str(), survivor.epoch), ("primary", 2));
    let addr = standby.addr.clone();
    let applied = tokio::task::spawn_blocking(move || stats_of(&addr))
        .await
        .unwrap()
        .requests
        .unwrap()
        .updates_applied;
    assert_eq!(
        applied, acks.acked,
        "the survivor applied every acknowledged push once"
    );
    assert_eq!(client.pull("emb", &[1, 2, 3]).await.unwrap(), [40.0; 3]);
    eprintln!(
        "hung primary: 20 pushes through the failover took {failover:?} ({} ms from the first failed call; lease {LEASE_TTL_SECS} s)",
        acks.max_failover_ms
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// Kill -9 the primary: the standby takes over; the killed server,
/// restarted as it was, rejoins as the new primary's standby; kill -9 the
/// new primary: the restarted one takes over holding every acknowledged
/// push, while a client pushed throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_failovers_in_a_row_with_the_first_primary_restarted_lose_nothing_acknowledged() {
    if !etcd_available() {
        return;
    }
    let dir = temp_dir("etcd-two-failovers");
    let etcd = EtcdCluster::start(&dir, 1);
    let (mut first, mut second) = primary_and_standby(&dir, &etcd, "twice").await;
    let client = PsClient::connect(&[], &coordinated_client(&etcd, "twice"))
        .await
        .unwrap();
    client
        .create_table(&counting_table("emb", 2))
        .await
        .unwrap();
    let running = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let pusher = tokio::spawn({
        let (client, running) = (client.clone(), running.clone());
        async move {
            let mut n = 0u64;
            while running.load(std::sync::atomic::Ordering::Relaxed) {
                client.push("emb", &[7, 8], &[-1.0; 4]).await.unwrap();
                n += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            client.flush().await.unwrap();
            n
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    let killed_at = Instant::now();
    let mut second = tokio::task::spawn_blocking(move || {
        second.wait_for_line("primary of shard 0 at epoch 2");
        second
    })
    .await
    .unwrap();
    let first_failover = killed_at.elapsed();
    // The first server restarted with the same flags rejoins.
    let restarted = standby_of(&dir, &etcd, "twice").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    second.child.kill().unwrap();
    second.child.wait().unwrap();
    let killed_at = Instant::now();
    let restarted = tokio::task::spawn_blocking(move || {
        let mut restarted = restarted;
        restarted.wait_for_line("primary of shard 0 at epoch 3");
        restarted
    })
    .await
    .unwrap();
    let second_failover = killed_at.elapsed();
    tokio::time::sleep(Duration::from_millis(300)).await;
    running.store(false, std::sync::atomic::Ordering::Relaxed);
    let pushed = pusher.await.unwrap();

    let acks = client.push_acks();
    assert_eq!(acks.acked, pushed);
    assert_eq!(acks.failovers, 2);
    let rows = client.pull("emb", &[7, 8]).await.unwrap();
    assert_eq!(
        rows,
        vec![pushed as f32; 4],
        "every acknowledged push is in the rows"
    );
    let addr = restarted.addr.clone();
    let applied = tokio::task::spawn_blocking(move || stats_of(&addr))
        .await
        .unwrap()
        .requests
        .unwrap()
        .updates_applied;
    // The restarted server joined from a snapshot: it applied the pushes
    // after its join, and its rows hold all of them.
    assert!(applied <= pushed);
    eprintln!(
        "two failovers: {pushed} pushes acknowledged and held; kill -9 to promotion {first_failover:?} then {second_failover:?} (lease {LEASE_TTL_SECS} s)"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// A lone server checkpointed through etcd (`ps-worker checkpoint --etcd`),
/// killed by SIGKILL and restarted as it was, restores its newest checkpoint (there is no primary to rejoin) and says so in its
/// log and Describe; a client then reads every row the checkpoint held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_server_restarted_alone_restores_its_newest_checkpoint() {
    if !etcd_available() {
        return;
    }
    let dir = temp_dir("etcd-restore");
    let etcd = EtcdCluster::start(&dir, 1);
    let checkpoints = dir.join("checkpoints");
    let flags = ["--checkpoint-dir", checkpoints.to_str().unwrap()];
    let mut server = coordinated_server(&dir, &etcd, "restore", (0, 1), &flags);
    server.wait_for_line("primary of shard 0 at epoch 1");
    let client = PsClient::connect(&[], &coordinated_client(&etcd, "restore"))
        .await
        .unwrap();
    client
        .create_table(&counting_table("emb", 1))
        .await
        .unwrap();
    let keys: Vec<u64> = (0..1000).collect();
    client.push("emb", &keys, &vec![-1.0; 1000]).await.unwrap();
    client.flush().await.unwrap();
    // The operator's checkpoint, of the primaries etcd names.
    let out = common::workers::worker(&[
        "checkpoint",
        "--etcd",
        &etcd.flag(),
        "--job",
        "restore",
        "--name",
        "saved",
    ])
    .output()
    .unwrap();
    assert!(out.status.success(), "{}", common::workers::stderr_of(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("1000 rows"));
    server.child.kill().unwrap();
    server.child.wait().unwrap();

    let mut restarted = coordinated_server(&dir, &etcd, "restore", (0, 1), &flags);
    let restored = restarted.wait_for_line("restored from ");
    assert!(restored.ends_with("saved"), "{restored}");
    restarted.wait_for_line("primary of shard 0 at epoch 2");
    let described = describe(&restarted.addr).await;
    assert!(described.restored_from.ends_with("saved"), "{described:?}");
    let client = PsClient::connect(&[], &coordinated_client(&etcd, "restore"))
        .await
        .unwrap();
    client.register_table(&counting_table("emb", 1)).unwrap();
    assert_eq!(client.pull("emb", &keys).await.unwrap(), vec![1.0; 1000]);
    std::fs::remove_dir_all(&dir).ok();
}

/// With a 3-member etcd, killing a member (the one listed first) while a
/// client pushes costs no failover and no failed push: the servers renew
/// their leases through the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn training_goes_on_when_an_etcd_member_is_killed() {
    if !etcd_available() {
        return;
    }
    let dir = temp_dir("etcd-member");
    let mut etcd = EtcdCluster::start(&dir, 3);
    let (primary, _standby) = primary_and_standby(&dir, &etcd, "members").await;
    let client = PsClient::connect(&[], &coordinated_client(&etcd, "members"))
        .await
        .unwrap();
    client
        .create_table(&counting_table("emb", 1))
        .await
        .unwrap();
    let started = Instant::now();
    let mut pushed = 0u64;
    let mut killed = false;
    // Three lease periods after the kill.
    while started.elapsed() < Duration::from_secs(4 * LEASE_TTL_SECS) {
        client.push("emb", &[5], &[-1.0]).await.unwrap();
        pushed += 1;
        if !killed && started.elapsed() > Duration::from_secs(LEASE_TTL_SECS) {
            etcd.kill(0);
            killed = true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    client.flush().await.unwrap();
    let acks = client.push_acks();
    assert_eq!((acks.acked, acks.failovers), (pushed, 0));
    let described = describe(&primary.addr).await;
    assert_eq!((described.role.as_str(), described.epoch), ("primary", 1));
    assert_eq!(client.pull("emb", &[5]).await.unwrap(), [pushed as f32]);
    std::fs::remove_dir_all(&dir).ok();
}

/// A primary stopped with SIGTERM (a rolling update, a node drain) gives
/// its lease back: the standby takes over without waiting for the lease to
/// run out, and the old primary drains and exits cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_of_a_primary_hands_its_shard_to_the_standby_at_once() {
    if !etcd_available() {
        return;
    }
    let dir = temp_dir("etcd-sigterm");
    let etcd = EtcdCluster::start(&dir, 1);
    let (primary, standby) = primary_and_standby(&dir, &etcd, "sigterm").await;
    let client = PsClient::connect(&[], &coordinated_client(&etcd, "sigterm"))
        .await
        .unwrap();
    client
        .create_table(&counting_table("emb", 1))
        .await
        .unwrap();
    client.push("emb", &[1], &[-1.0]).await.unwrap();
    client.flush().await.unwrap();
    let started = Instant::now();
    let (status, _standby) = tokio::task::spawn_blocking(move || {
        let status = primary.terminate();
        let mut standby = standby;
        standby.wait_for_line("primary of shard 0 at epoch 2");
        (status, standby)
    })
    .await
    .unwrap();
    let handed_over = started.elapsed();
    assert!(status.success(), "the old primary exited with {status}");
    assert!(
        handed_over < Duration::from_secs(LEASE_TTL_SECS),
        "the handover took {handed_over:?}, as long as the lease"
    );
    client.push("emb", &[1], &[-1.0]).await.unwrap();
    client.flush().await.unwrap();
    assert_eq!(client.pull("emb", &[1]).await.unwrap(), [2.0]);
    eprintln!("SIGTERM handover: {handed_over:?}");
    std::fs::remove_dir_all(&dir).ok();
}

/// A read replica started with `--follow-etcd` follows whichever server
/// etcd names primary: after the primary's kill -9 and the standby's
/// promotion, a write acknowledged by the new primary shows on it, and the
/// rows it held stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_of_the_coordinator_follows_the_promoted_standby() {
    if !etcd_available() {
        return;
    }
    let dir = temp_dir("etcd-follower");
    let etcd = EtcdCluster::start(&dir, 1);
    let (mut primary, _standby) = primary_and_standby(&dir, &etcd, "follow").await;
    let follower = common::Server::start_with(
        0,
        1,
        &[
            "--peer-token-file",
            &common::peer_token_file(&dir),
            "--etcd",
            &etcd.flag(),
            "--job",
            "follow",
            "--follow-etcd",
        ],
    );
    let client = PsClient::connect(&[], &coordinated_client(&etcd, "follow"))
        .await
        .unwrap();
    client.create_table(&counting_table("t", 1)).await.unwrap();
    client.assign("t", &[1], &[1.0]).await.unwrap();
    let on_follower = |key: u64, want: f32| {
        let addr = follower.addr.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let seen = async {
                    let c =
                        PsClient::connect(std::slice::from_ref(&addr), &ClientConfig::default())
                            .await
                            .ok()?;
                    c.register_table(&counting_table("t", 1)).ok()?;
                    c.pull("t", &[key]).await.ok()?.first().copied()
                }
                .await;
                if seen == Some(want) {
                    return;
                }
                assert!(
                    Instant::now() < deadline,
                    "the follower never showed row {key} = {want} (saw {seen:?})"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    on_follower(1, 1.0).await;
    primary.child.kill().unwrap();
    primary.child.wait().unwrap();
    client.assign("t", &[2], &[2.0]).await.unwrap();
    on_follower(2, 2.0).await;
    on_follower(1, 1.0).await;
    assert_eq!(describe(&follower.addr).await.role, "follower");
    std::fs::remove_dir_all(&dir).ok();
}

/// Operator mistakes are refused at start with a message that names them:
/// a server of the job started with another shard count, a job name that
/// is not one, and a coordinated server listening on 0.0.0.0 without the
/// address its peers reach it at.
#[test]
fn a_server_started_with_another_shard_count_or_a_bad_job_name_is_refused() {
    if !etcd_available() {
        return;
    }
    let dir = temp_dir("etcd-mistakes");
    let etcd = EtcdCluster::start(&dir, 1);
    let mut first = coordinated_server(&dir, &etcd, "mistakes", (0, 2), &[]);
    first.wait_for_line("primary of shard 0 at epoch 1");
    let refused = |shard: &str, shards: &str, job: &str, listen: &str| {
        let out = std::process::Command::new(common::binary("ps-server"))
            .args([
                "--listen",
                listen,
                "--shard-id",
                shard,
                "--num-shards",
                shards,
            ])
            .args(["--peer-token-file", &common::peer_token_file(&dir)])
            .args(["--etcd", &etcd.flag(), "--job", job])
            .output()
            .unwrap();
        assert!(!out.status.success(), "started: {out:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let said = refused("1", "3", "mistakes", "127.0.0.1:0");
    assert!(
        said.contains("runs 2 shards in etcd") && said.contains("--num-shards 3"),
        "{said}"
    );
    let said = refused("0", "1", "no/such job", "127.0.0.1:0");
    assert!(said.contains("job name"), "{said}");
    let said = refused("0", "1", "mistakes-2", "0.0.0.0:0");
    assert!(said.contains("--advertise"), "{said}");
    std::fs::remove_dir_all(&dir).ok();
}
