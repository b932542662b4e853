//! Replicated shards under operator mistakes and hostile peers, as real
//! `ps-server` processes: a hung backup, a mis-numbered or bogus Join, a
//! Join naming the primary itself, Replicate sent straight to a backup, and
//! peer calls made with a worker's token. After each, `kill -9` of the
//! primary either fails over to a backup holding every acknowledged push,
//! or the workers stop with an error saying why: never a silent loss.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use std::time::{Duration, Instant};

use common::{PEER_TOKEN, Server, counting_table, temp_dir};
use ps_common::pb::{self, parameter_server_client::ParameterServerClient};
use ps_worker::{ClientConfig, PsClient};

/// Keys every test push adds 1 to: their rows count the pushes applied.
const KEYS: [u64; 3] = [1, 2, 3];

/// A client of `primary` (it learns the backup from it) that created the
/// counting table.
async fn client_of(primary: &Server) -> PsClient {
    let config = ClientConfig {
        request_timeout: Duration::from_secs(2),
        ..ClientConfig::default()
    };
    let client = PsClient::connect(std::slice::from_ref(&primary.addr), &config)
        .await
        .unwrap();
    client
        .create_table(&counting_table("emb", 1))
        .await
        .unwrap();
    client
}

/// Pushes `n` calls of +1 to [`KEYS`] and waits for their acknowledgements.
async fn push(client: &PsClient, n: usize) -> Result<(), ps_common::PsError> {
    for _ in 0..n {
        client.push("emb", &KEYS, &[-1.0; 3]).await?;
    }
    client.flush().await
}

/// What `addr` says of itself.
async fn describe(addr: &str) -> pb::DescribeResponse {
    ParameterServerClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
        .describe(pb::DescribeRequest {})
        .await
        .unwrap()
        .into_inner()
}

/// The counting rows of `addr`'s shard, read straight from the server (it
/// must be a serving primary).
async fn rows(addr: &str) -> Vec<f32> {
    let pulled = ParameterServerClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
        .pull(pb::PullRequest {
            table: "emb".into(),
            keys: KEYS.to_vec(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    ps_common::wire::decode_f32s(&pulled.values).unwrap()
}

/// `message` as a request carrying `token` as its bearer token.
fn with_token<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        ps_common::auth::HEADER,
        format!("Bearer {token}").parse().unwrap(),
    );
    request
}

/// Waits (at most 30 s) until `check` holds for what `addr` says of itself.
async fn wait_until(addr: &str, what: &str, check: impl Fn(&pb::DescribeResponse) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let described = describe(addr).await;
        if check(&described) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: {described:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A backup hung past the primary's patience is dropped; the primary goes
/// on alone. Woken and never rejoined, it must not be promoted when the
/// primary then dies: the worker stops with the backup's reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_dropped_while_hung_is_never_promoted_and_the_worker_says_why() {
    let dir = temp_dir("hung-backup");
    let mut primary = Server::primary(&dir, 0, 1);
    let backup = Server::backup_of(&dir, &primary, 0, 1);
    let client = client_of(&primary).await;
    push(&client, 20).await.unwrap();

    backup.signal("-STOP");
    let started = Instant::now();
    push(&client, 10).await.unwrap();
    let stalled = started.elapsed();
    // The primary waited out the backup's lease before acknowledging alone.
    assert!(
        stalled >= ps_server::replication::BACKUP_LEASE,
        "acknowledged alone after {stalled:?}, inside the backup's lease"
    );
    assert_eq!(describe(&primary.addr).await.backup, "", "backup dropped");
    push(&client, 20).await.unwrap();
    let acked = client.push_acks().acked;

    backup.signal("-CONT");
    primary.child.kill().unwrap(); // SIGKILL before the backup can rejoin
    primary.child.wait().unwrap();
    // The worker learned that the primary dropped its backup, so it has none
    // to fail over to; a worker that still names the old backup is refused
    // by the backup itself, which knows its lease ran out.
    let stopped = push(&client, 1).await.unwrap_err().to_string();
    assert!(stopped.contains("no backup to fail over to"), "{stopped}");
    let refused = ParameterServerClient::connect(format!("http://{}", backup.addr))
        .await
        .unwrap()
        .promote(pb::PromoteRequest {})
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    let why = refused.message();
    assert!(why.contains("lease") || why.contains("dropped"), "{why}");
    let backup_says = describe(&backup.addr).await;
    assert_eq!(
        backup_says.role, "backup",
        "the stale backup was not promoted"
    );
    eprintln!(
        "hung backup: writes stalled {stalled:?}, {acked} pushes acknowledged, then the worker stopped: {stopped}; the backup refused: {why}"
    );
}

/// A backup dropped while hung joins again from a fresh snapshot once it
/// wakes; from then on it counts, and a failover to it loses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_backup_rejoins_from_a_fresh_snapshot_and_then_takes_over_losing_nothing() {
    let dir = temp_dir("rejoin");
    let mut primary = Server::primary(&dir, 0, 1);
    let backup = Server::backup_of(&dir, &primary, 0, 1);
    let client = client_of(&primary).await;
    push(&client, 10).await.unwrap();
    backup.signal("-STOP");
    push(&client, 10).await.unwrap();
    assert_eq!(describe(&primary.addr).await.backup, "");
    backup.signal("-CONT");
    wait_until(&primary.addr, "the woken backup joins again", |d| {
        d.backup == backup.addr
    })
    .await;
    wait_until(&backup.addr, "and loads the fresh snapshot", |d| {
        d.caught_up
    })
    .await;
    push(&client, 9).await.unwrap();
    // Workers ask for the shard's backup every 2 s: this one learns it is back.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    push(&client, 1).await.unwrap();
    primary.child.kill().unwrap();
    primary.child.wait().unwrap();
    push(&client, 5).await.unwrap();
    let acks = client.push_acks();
    assert_eq!((acks.acked, acks.failovers), (35, 1));
    assert_eq!(
        rows(&backup.addr).await,
        [35.0; 3],
        "every acknowledged push"
    );
}

/// A second backup started for another shard count, or for a shard that
/// already has a live backup, is refused and exits; the live backup keeps
/// its place and a failover to it loses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mis_started_second_backup_is_refused_and_the_live_one_keeps_its_place() {
    let dir = temp_dir("second-backup");
    let peer = common::peer_token_file(&dir);
    let mut primary = Server::primary(&dir, 0, 1);
    let backup = Server::backup_of(&dir, &primary, 0, 1);
    let client = client_of(&primary).await;
    push(&client, 10).await.unwrap();
    for (shards, why) in [
        ("2", "cannot join it"),
        ("1", "already replicates to backup"),
    ] {
        let out = std::process::Command::new(common::binary("ps-server"))
            .args([
                "--listen",
                "127.0.0.1:0",
                "--shard-id",
                "0",
                "--num-shards",
                shards,
            ])
            .args(["--peer-token-file", &peer, "--join", &primary.addr])
            .args(["--join-timeout-secs", "2"])
            .env("RUST_LOG", "error")
            .output()
            .unwrap();
        assert!(
            !out.status.success(),
            "a mis-started backup ({shards} shards) joined"
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(why), "{shards} shards: {stderr}");
        assert_eq!(describe(&primary.addr).await.backup, backup.addr);
    }
    push(&client, 10).await.unwrap();
    primary.child.kill().unwrap();
    primary.child.wait().unwrap();
    push(&client, 5).await.unwrap();
    assert_eq!(client.push_acks().failovers, 1);
    assert_eq!(rows(&backup.addr).await, [25.0; 3]);
}

/// Joins naming the primary itself, an address where nothing listens, or
/// made without the peer token are refused: the primary keeps serving and
/// says so on its health service, then takes a real backup, which the same
/// bogus joins no longer displace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bogus_joins_are_refused_and_leave_the_primary_serving() {
    let dir = temp_dir("bogus-join");
    let primary = Server::primary(&dir, 0, 1);
    let client = client_of(&primary).await;
    push(&client, 5).await.unwrap();
    let me = describe(&primary.addr).await;
    let join = |addr: &str, server_id: u64| pb::JoinRequest {
        addr: addr.into(),
        shard_id: 0,
        num_shards: 1,
        server_id,
    };
    let mut raw = ParameterServerClient::connect(format!("http://{}", primary.addr))
        .await
        .unwrap();
    let mut try_bogus_joins = async |why_when_attached: Option<&str>| {
        let cases = [
            (
                with_token(join(&primary.addr, me.server_id), PEER_TOKEN),
                tonic::Code::FailedPrecondition,
                "answers as a primary",
            ),
            (
                with_token(join("127.0.0.1:1", 7), PEER_TOKEN),
                tonic::Code::FailedPrecondition,
                "does not answer",
            ),
            (
                tonic::Request::new(join("127.0.0.1:1", 7)),
                tonic::Code::Unauthenticated,
                "peer token",
            ),
            (
                with_token(join("127.0.0.1:1", 7), "a-worker-token-0123456789"),
                tonic::Code::Unauthenticated,
                "peer token",
            ),
        ];
        for (request, code, why) in cases {
            let what = format!("{:?}", request.get_ref());
            let refused = raw.join(request).await.map(|_| ()).unwrap_err();
            assert_eq!(refused.code(), code, "{what}: {refused:?}");
            let why = match (code, why_when_attached) {
                (tonic::Code::FailedPrecondition, Some(attached)) => attached,
                _ => why,
            };
            assert!(refused.message().contains(why), "{what}: {refused:?}");
        }
    };
    try_bogus_joins(None).await;
    assert_eq!(describe(&primary.addr).await.role, "primary");
    let health = std::process::Command::new(common::binary("ps-worker"))
        .args(["health", "--servers", &primary.addr])
        .output()
        .unwrap();
    assert!(health.status.success(), "the primary reports SERVING");
    push(&client, 5).await.unwrap();
    assert_eq!(rows(&primary.addr).await, [10.0; 3]);

    let backup = Server::backup_of(&dir, &primary, 0, 1);
    try_bogus_joins(Some("already replicates to backup")).await;
    assert_eq!(describe(&primary.addr).await.backup, backup.addr);
    push(&client, 5).await.unwrap();
}

/// Replicate sent straight to a backup, by a worker or with the peer
/// token on a made-up stream, is refused and changes nothing: the backup
/// still applies the primary's real writes and takes over losing nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicate_sent_straight_to_a_backup_is_refused_and_changes_nothing() {
    let dir = temp_dir("forged-replicate");
    let mut primary = Server::primary(&dir, 0, 1);
    let backup = Server::backup_of(&dir, &primary, 0, 1);
    let client = client_of(&primary).await;
    push(&client, 7).await.unwrap();
    let forged = || pb::ReplicateRequest {
        first_seq: 1_000_000,
        stream: 12345,
        epoch: 0,
        entries: vec![pb::ReplicaEntry {
            write: Some(pb::replica_entry::Write::Push(pb::PushManyRequest {
                pushes: vec![pb::PushRequest {
                    table: "emb".into(),
                    keys: KEYS.to_vec(),
                    gradients: ps_common::wire::encode_f32s(&[2000.0; 3]),
                    ..Default::default()
                }],
                ..Default::default()
            })),
        }],
    };
    let mut raw = ParameterServerClient::connect(format!("http://{}", backup.addr))
        .await
        .unwrap();
    for (request, code) in [
        (tonic::Request::new(forged()), tonic::Code::Unauthenticated),
        (
            with_token(forged(), PEER_TOKEN),
            tonic::Code::FailedPrecondition,
        ),
    ] {
        let refused = raw.replicate(request).await.unwrap_err();
        assert_eq!(refused.code(), code, "{refused:?}");
    }
    push(&client, 3).await.unwrap();
    primary.child.kill().unwrap();
    primary.child.wait().unwrap();
    push(&client, 1).await.unwrap();
    assert_eq!(
        rows(&backup.addr).await,
        [11.0; 3],
        "no forged write, no skipped one"
    );
}

/// Ten Join calls whose snapshot streams are never read: one is taken (the
/// others are refused, as the shard has a backup), its snapshot is the only
/// one held, and the primary gives the join up, after which a real backup
/// joins. This 13 MB snapshot fits in the connection's buffers, so what
/// gives it up here is the joiner's first Replicate call going unanswered
/// (10 x BACKUP_TIMEOUT, 30 s), not the 10 s of an unread chunk; that one
/// is `replication::primary`'s paused-clock unit test in ps-server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_join_streams_hold_one_snapshot_and_are_given_up() {
    let dir = temp_dir("unread-joins");
    let peer = common::peer_token_file(&dir);
    let primary = Server::primary(&dir, 0, 1);
    let client = client_of(&primary).await;
    let wide = ps_common::TableSpec {
        name: "wide".into(),
        ..counting_table("wide", 32)
    };
    client.create_table(&wide).await.unwrap();
    let keys: Vec<u64> = (0..100_000).collect();
    client.pull("wide", &keys).await.unwrap();
    // A server that says it is a backup of this shard but never reads a snapshot.
    let idle = Server::start_with(
        0,
        1,
        &[
            "--peer-token-file",
            &peer,
            "--join",
            "127.0.0.1:1",
            "--join-timeout-secs",
            "300",
        ],
    );
    let idle_id = describe(&idle.addr).await.server_id;
    let rss_before = common::rss_bytes(primary.child.id());
    let mut raw = ParameterServerClient::connect(format!("http://{}", primary.addr))
        .await
        .unwrap();
    let mut taken = Vec::new();
    let mut refused = 0;
    for _ in 0..10 {
        let join = pb::JoinRequest {
            addr: idle.addr.clone(),
            shard_id: 0,
            num_shards: 1,
            server_id: idle_id,
        };
        match raw.join(with_token(join, PEER_TOKEN)).await {
            Ok(stream) => taken.push(stream),
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
                refused += 1;
            }
        }
    }
    assert_eq!((taken.len(), refused), (1, 9));
    let grown = common::rss_bytes(primary.child.id()).saturating_sub(rss_before);
    assert!(
        grown < 64 << 20,
        "ten joins grew the primary by {grown} bytes"
    );
    wait_until(&primary.addr, "the unread join is given up", |d| {
        d.backup.is_empty()
    })
    .await;
    drop(taken);
    let backup = Server::backup_of(&dir, &primary, 0, 1);
    assert_eq!(describe(&primary.addr).await.backup, backup.addr);
    eprintln!("unread joins: the primary grew by {} MiB", grown >> 20);
}
