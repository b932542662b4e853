//! Failover between real server processes: a primary killed, hung or
//! unanswering while workers train, and what reaches both replicas.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use std::process::Command;

use common::workers::*;
use common::{Server, binary, counting_table, stats_of, temp_dir};

#[test]
fn kill_9_of_a_primary_mid_training_loses_no_acknowledged_push() {
    let dir = temp_dir("failover");
    let job = a9a_job_edited(&dir, "job.toml", &[("epochs = 5", "epochs = 2")]);

    // Undisturbed run, no replicas.
    let plain = [Server::start(0, 2), Server::start(1, 2)];
    let addrs = format!("{},{}", plain[0].addr, plain[1].addr);
    let baseline = run_workers(&job, &addrs, 2, &dir, "plain")[0]["val_auc"]
        .as_f64()
        .unwrap();
    drop(plain);

    // Each shard with a backup; the workers learn the backups from the primaries.
    let (mut primaries, backups) = replicated_shards(&dir);
    let addrs = format!("{},{}", primaries[0].addr, primaries[1].addr);
    let workers = {
        let (job, addrs, dir) = (job.clone(), addrs.clone(), dir.clone());
        std::thread::spawn(move || run_workers(&job, &addrs, 2, &dir, "replicated"))
    };
    // Kill shard 0's primary once it has applied a few hundred pushes.
    wait_for_pushes(&primaries[0].addr, 300);
    primaries[0].child.kill().unwrap(); // SIGKILL
    primaries[0].child.wait().unwrap();
    let reports = workers.join().unwrap();

    let acked: u64 = reports
        .iter()
        .map(|r| r["pushes"]["acked"].as_u64().unwrap())
        .sum();
    let survivor = stats_of(&backups[0].addr);
    assert_eq!(survivor.role, "primary", "the backup was promoted");
    let applied = survivor.requests.unwrap().updates_applied
        + stats_of(&primaries[1].addr)
            .requests
            .unwrap()
            .updates_applied;
    assert_eq!(
        applied, acked,
        "every acknowledged push applied exactly once on the surviving replicas"
    );
    let failovers: u64 = reports
        .iter()
        .map(|r| r["pushes"]["failovers"].as_u64().unwrap())
        .sum();
    assert_eq!(failovers, 2, "each worker failed over shard 0 once");
    let auc = reports[0]["val_auc"].as_f64().unwrap();
    let failover_ms: Vec<u64> = reports
        .iter()
        .map(|r| r["pushes"]["max_failover_ms"].as_u64().unwrap())
        .collect();
    eprintln!(
        "failover: AUC {auc:.5} vs undisturbed {baseline:.5}; {acked} pushes acked = applied; failover took {failover_ms:?} ms"
    );
    assert!(
        (auc - baseline).abs() <= 0.005 * baseline,
        "AUC {auc} vs undisturbed {baseline}"
    );
    // A failover later than the backup's lease would have been refused.
    let lease_ms = ps_server::replication::BACKUP_LEASE.as_millis() as u64;
    assert!(
        failover_ms.iter().all(|&ms| ms < lease_ms),
        "failovers took {failover_ms:?} ms, past the {lease_ms} ms lease"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// A primary that hangs (SIGSTOP) rather than dies is failed over once a
/// call has gone unanswered for a second and so has a probe (with the
/// default 60 s request timeout: within the backup's 4 s lease); when it
/// wakes up it learns it was replaced, serves no more, and its health check
/// says NOT_SERVING.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_primary_is_failed_over_within_the_lease_and_fenced_when_it_wakes() {
    use ps_worker::{ClientConfig, PsClient};
    use std::time::{Duration, Instant};

    let dir = temp_dir("hung-primary");
    let primary = Server::primary(&dir, 0, 1);
    let backup = Server::backup_of(&dir, &primary, 0, 1);
    let config = ClientConfig::default();
    assert_eq!(config.request_timeout, Duration::from_secs(60));
    let client = PsClient::connect(std::slice::from_ref(&primary.addr), &config)
        .await
        .unwrap();
    let spec = counting_table("emb", 1);
    client.create_table(&spec).await.unwrap();
    let push_all = |n: usize| {
        let client = client.clone();
        async move {
            for _ in 0..n {
                client.push("emb", &[1, 2, 3], &[-1.0; 3]).await.unwrap();
            }
            client.flush().await.unwrap();
        }
    };
    push_all(10).await;
    primary.signal("-STOP");
    let started = Instant::now();
    push_all(10).await;
    let took = started.elapsed();
    primary.signal("-CONT");
    let acks = client.push_acks();
    assert_eq!((acks.acked, acks.failovers), (20, 1));
    assert_eq!(client.pull("emb", &[1, 2, 3]).await.unwrap(), [20.0; 3]);
    let stats = |addr: &str| {
        let addr = addr.to_string();
        async move {
            tokio::task::spawn_blocking(move || stats_of(&addr))
                .await
                .unwrap()
        }
    };
    let survivor = stats(&backup.addr).await;
    assert_eq!(survivor.role, "primary");
    assert_eq!(survivor.requests.unwrap().updates_applied, 20);
    eprintln!(
        "hung primary: 10 pushes took {took:?} (failover after {} ms of the first failure)",
        acks.max_failover_ms
    );
    // The woken primary is fenced at its next write (or already was, when
    // its replication of the stalled write was refused).
    let deadline = Instant::now() + Duration::from_secs(10);
    while stats(&primary.addr).await.role != "deposed" {
        assert!(Instant::now() < deadline, "the old primary still serves");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let health = Command::new(binary("ps-worker"))
        .args(["health", "--servers", &primary.addr])
        .output()
        .unwrap();
    assert!(
        !health.status.success(),
        "a deposed primary reports NOT_SERVING"
    );
    assert!(
        String::from_utf8_lossy(&health.stderr).contains("not serving"),
        "{}",
        String::from_utf8_lossy(&health.stderr)
    );
}

/// A push whose answer is lost, sent again with the same (writer, seq), is
/// applied once on the primary and once on its backup (real processes).
#[tokio::test]
async fn a_retry_after_a_lost_ack_is_applied_once_on_both_replicas() {
    use ps_common::pb::{self, parameter_server_client::ParameterServerClient};

    let dir = temp_dir("lost-ack");
    let primary = Server::primary(&dir, 0, 1);
    let backup = Server::backup_of(&dir, &primary, 0, 1);
    let mut client = ParameterServerClient::connect(format!("http://{}", primary.addr))
        .await
        .unwrap();
    client
        .create_table(pb::CreateTableRequest {
            spec: Some((&counting_table("emb", 1)).into()),
        })
        .await
        .unwrap();
    let push = pb::PushRequest {
        table: "emb".into(),
        keys: vec![5],
        gradients: ps_common::wire::encode_f32s(&[-1.0]),
        writer: 42,
        seq: 7,
        ..Default::default()
    };
    // The first answer never reaches the worker; it sends the call again.
    drop(client.push(push.clone()).await.unwrap());
    let retried = client.push(push).await.unwrap().into_inner();
    assert!(retried.duplicate, "the retry is recognized");
    let pulled = client
        .pull(pb::PullRequest {
            table: "emb".into(),
            keys: vec![5],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ps_common::wire::decode_f32s(&pulled.values).unwrap(), [1.0]);
    for addr in [primary.addr.clone(), backup.addr.clone()] {
        let requests = tokio::task::spawn_blocking(move || stats_of(&addr))
            .await
            .unwrap()
            .requests
            .unwrap();
        assert_eq!(requests.updates_applied, 1, "applied once");
    }
}

/// Under bsp the workers' clocks live on shard 0 and are not replicated:
/// after shard 0's primary dies, the promoted backup rebuilds them from the
/// workers' next reports and lockstep training finishes.
#[test]
fn a_bsp_job_finishes_after_shard_0_fails_over() {
    let dir = temp_dir("bsp-failover");
    let job = a9a_job_edited(
        &dir,
        "job.toml",
        &[("epochs = 5", "epochs = 1\nconsistency = \"bsp\"")],
    );
    let (mut primaries, backups) = replicated_shards(&dir);
    let addrs = format!("{},{}", primaries[0].addr, primaries[1].addr);
    let workers = {
        let (job, addrs, dir) = (job.clone(), addrs.clone(), dir.clone());
        std::thread::spawn(move || run_workers(&job, &addrs, 2, &dir, "bsp"))
    };
    wait_for_pushes(&primaries[0].addr, 200);
    primaries[0].child.kill().unwrap(); // SIGKILL
    primaries[0].child.wait().unwrap();
    let reports = workers.join().unwrap();
    for report in &reports {
        assert_eq!(report["max_staleness"].as_u64(), Some(0), "{report}");
        assert_eq!(report["pushes"]["failovers"].as_u64(), Some(1), "{report}");
        assert!(report["val_auc"].as_f64().unwrap() >= 0.895, "{report}");
    }
    assert_eq!(stats_of(&backups[0].addr).role, "primary");
    std::fs::remove_dir_all(&dir).ok();
}
