//! Requests an attacker or an unlucky operator sends to a real `ps-server`
//! process: answers and tables too large for the server, names that are
//! paths, checkpoints racing each other, values that would overflow a row,
//! clock jobs that never end, idle connections to the metrics port, and a
//! server killed and restarted on its checkpoints. Each gets a clear status
//! and leaves the server serving, within its memory.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use std::time::Duration;

use common::{Server, counting_table, rss_bytes, temp_dir};
use ps_common::pb::{self, parameter_server_client::ParameterServerClient};
use ps_common::{InitializerSpec, OptimizerSpec, TableKind, TableSpec};
use tonic::Code;

type Client = ParameterServerClient<tonic::transport::Channel>;

async fn client(addr: &str) -> Client {
    ParameterServerClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
        .max_decoding_message_size(256 << 20)
        .max_encoding_message_size(256 << 20)
}

async fn create(client: &mut Client, spec: &TableSpec) -> Result<(), tonic::Status> {
    client
        .create_table(pb::CreateTableRequest {
            spec: Some(spec.into()),
        })
        .await
        .map(drop)
}

async fn stats(client: &mut Client) -> pb::StatsResponse {
    client
        .stats(pb::StatsRequest {})
        .await
        .unwrap()
        .into_inner()
}

/// A 1 MiB pull of one key 2^20 times from a dim-65536 table asks for a
/// 256 GiB answer: it is refused before anything is allocated, and the
/// server goes on. A flood of new ids past the memory budget creates
/// nothing; the default budget is half the machine's memory.
#[tokio::test]
async fn answers_and_new_rows_past_the_server_s_bounds_are_refused_before_allocating() {
    let server = Server::start_with(0, 1, &["--memory-budget", "32MiB"]);
    let mut c = client(&server.addr).await;
    create(&mut c, &counting_table("wide", 65536))
        .await
        .unwrap();
    create(&mut c, &counting_table("narrow", 1)).await.unwrap();
    let rss_before = rss_bytes(server.child.id());
    let huge = pb::PullRequest {
        table: "wide".into(),
        keys: vec![1; 1 << 20],
        ..Default::default()
    };
    let refused = c.pull(huge.clone()).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("--max-response-bytes"),
        "{refused:?}"
    );
    let many = pb::PullManyRequest {
        pulls: vec![huge.clone(); 1],
    };
    assert_eq!(
        c.pull_many(many).await.unwrap_err().code(),
        Code::ResourceExhausted
    );
    // 2^20 new ids of dim 1 would take 20 MiB (16 bytes per row beyond
    // its float), more than the two tables leave of the budget (19 MiB is
    // charged up front for the slabs they may leave unfilled).
    let flood = pb::PullRequest {
        table: "narrow".into(),
        keys: (0..1 << 20).collect(),
        ..Default::default()
    };
    let refused = c.pull(flood).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("--memory-budget"), "{refused:?}");
    let after = stats(&mut c).await;
    assert!(after.tables.iter().all(|t| t.rows == 0), "nothing created");
    assert_eq!(after.memory_budget_bytes, 32 << 20);
    let grown = rss_bytes(server.child.id()).saturating_sub(rss_before);
    assert!(
        grown < 48 << 20,
        "the refused requests grew the server by {grown} bytes"
    );

    let default = Server::start(0, 1);
    let budget = stats(&mut client(&default.addr).await)
        .await
        .memory_budget_bytes;
    let machine = ps_server::budget::machine_memory().unwrap();
    assert_eq!(budget, machine / 2, "half of the machine's memory");
}

/// A dense table that cannot fit is refused before allocating; one that
/// fits costs about its floats, and while it is being made the server
/// answers other calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dense_tables_are_refused_before_allocating_and_made_without_blocking_the_server() {
    let server = Server::start_with(0, 1, &["--memory-budget", "1GiB"]);
    let mut c = client(&server.addr).await;
    let dense = |name: &str, rows: u64| TableSpec {
        name: name.into(),
        kind: TableKind::Dense {
            rows,
            block_rows: 1024,
        },
        dim: 1,
        initializer: InitializerSpec::Normal {
            mean: 0.0,
            std: 0.01,
        },
        optimizer: OptimizerSpec::Adagrad {
            lr: 0.1,
            initial_accumulator: 0.1,
            eps: 1e-8,
            l2: 0.0,
            weight_decay: 0.0,
        },
        seed: 1,
        lifecycle: Default::default(),
    };
    // 2^30 floats of weights plus as many of Adagrad state: 8 GiB.
    let started = std::time::Instant::now();
    let refused = create(&mut c, &dense("huge", 1 << 30)).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    eprintln!(
        "a dense table past the budget refused in {:?}",
        started.elapsed()
    );

    let rss_before = rss_bytes(server.child.id());
    let making = {
        let mut c = c.clone();
        tokio::spawn(async move {
            create(&mut c, &dense("big", 1 << 25)).await.unwrap();
            std::time::Instant::now()
        })
    };
    // Calls made while the 256 MiB table is being filled are answered
    // before it is done.
    let mut answered = Vec::new();
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        stats(&mut c).await;
        c.describe(pb::DescribeRequest {}).await.unwrap();
        answered.push(std::time::Instant::now());
    }
    let made = making.await.unwrap();
    assert!(
        answered[0] < made,
        "Stats and Describe waited for the table to be made"
    );
    let table = stats(&mut c).await.tables.into_iter().next().unwrap();
    assert_eq!(table.bytes, (1 << 25) * 2 * 4);
    let grown = rss_bytes(server.child.id()).saturating_sub(rss_before);
    assert!(
        grown < table.bytes + (table.bytes >> 3),
        "{} MiB of floats took {} MiB",
        table.bytes >> 20,
        grown >> 20
    );
}

/// Values that would overflow a row are refused whole; initializers that
/// would serve infinities are refused at creation; a writer's seq 0 is
/// malformed; a 10 KB name is not echoed back in full.
#[tokio::test]
async fn values_that_would_make_rows_non_finite_and_malformed_names_get_invalid_argument() {
    let server = Server::start(0, 1);
    let mut c = client(&server.addr).await;
    let mut ftrl = counting_table("ftrl", 1);
    ftrl.optimizer = OptimizerSpec::Ftrl {
        alpha: 0.1,
        beta: 1.0,
        l1: 0.0,
        l2: 0.0,
    };
    create(&mut c, &ftrl).await.unwrap();
    create(&mut c, &counting_table("sgd", 1)).await.unwrap();
    let push = |table: &str, keys: Vec<u64>, grads: &[f32]| pb::PushRequest {
        table: table.into(),
        keys,
        gradients: ps_common::wire::encode_f32s(grads),
        ..Default::default()
    };
    let before = stats(&mut c).await.requests.unwrap().updates_applied;
    for request in [
        push("ftrl", vec![1], &[1e20]),
        push("sgd", vec![2, 2, 2], &[-3e38, -3e38, -3e38]),
    ] {
        let refused = c.push(request).await.unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
        assert!(refused.message().contains("non-finite"), "{refused:?}");
    }
    let after = stats(&mut c).await;
    assert_eq!(after.requests.unwrap().updates_applied, before);
    assert!(after.tables.iter().all(|t| t.rows == 0), "no row created");
    let mut inf = counting_table("inf", 1);
    inf.initializer = InitializerSpec::Normal {
        mean: 3e38,
        std: 1.0,
    };
    assert_eq!(
        create(&mut c, &inf).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let seq_zero = pb::PushRequest {
        writer: 9,
        seq: 0,
        ..push("sgd", vec![1], &[1.0])
    };
    assert_eq!(
        c.push(seq_zero).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let long = pb::PullRequest {
        table: "t".repeat(10_000),
        keys: vec![1],
        ..Default::default()
    };
    let refused = c.pull(long).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(
        refused.message().len() < 200,
        "{} bytes echoed",
        refused.message().len()
    );
}

/// A checkpoint named `..` or `.` is refused and writes nothing outside the
/// checkpoint folder; eight concurrent checkpoints of one name all succeed
/// and leave a file that restores.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_names_stay_inside_the_folder_and_concurrent_ones_all_land() {
    let dir = temp_dir("hostile-ckpt");
    let root = dir.join("checkpoints");
    let server = Server::start_with(0, 1, &["--checkpoint-dir", root.to_str().unwrap()]);
    let mut c = client(&server.addr).await;
    create(&mut c, &counting_table("emb", 4)).await.unwrap();
    c.pull(pb::PullRequest {
        table: "emb".into(),
        keys: (0..1000).collect(),
        ..Default::default()
    })
    .await
    .unwrap();
    for name in ["..", ".", ".hidden", "../x"] {
        let refused = c
            .checkpoint(pb::CheckpointRequest {
                name: name.into(),
                incremental: false,
            })
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument, "{name}");
    }
    assert!(
        !dir.join("shard-0.bin").exists(),
        "nothing written beside the folder"
    );
    let writers: Vec<_> = (0..8)
        .map(|_| {
            let mut c = c.clone();
            tokio::spawn(async move {
                c.checkpoint(pb::CheckpointRequest {
                    name: "same".into(),
                    incremental: false,
                })
                .await
            })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap().unwrap();
    }
    let restored = Server::start_with(0, 1, &["--restore", root.join("same").to_str().unwrap()]);
    assert!(
        restored.before[0].starts_with("restored 1000 rows"),
        "{:?}",
        restored.before
    );
}

/// A server killed with SIGKILL and restarted with `--restore-latest`
/// serves the rows of its newest checkpoint and says which one.
#[tokio::test]
async fn a_server_restarted_with_restore_latest_serves_its_newest_checkpoint() {
    let dir = temp_dir("restore-latest");
    let root = dir.join("checkpoints");
    let flags = [
        "--checkpoint-dir",
        root.to_str().unwrap(),
        "--restore-latest",
    ];
    let mut server = Server::start_with(0, 1, &flags);
    assert_eq!(server.before, ["no checkpoint to restore; starting empty"]);
    let mut c = client(&server.addr).await;
    create(&mut c, &counting_table("emb", 1)).await.unwrap();
    let push = |n: usize| pb::PushRequest {
        table: "emb".into(),
        keys: (0..n as u64).collect(),
        gradients: ps_common::wire::encode_f32s(&vec![-1.0; n]),
        ..Default::default()
    };
    c.push(push(10)).await.unwrap();
    c.checkpoint(pb::CheckpointRequest {
        name: "older".into(),
        incremental: false,
    })
    .await
    .unwrap();
    std::thread::sleep(Duration::from_millis(20));
    c.push(push(20)).await.unwrap();
    c.checkpoint(pb::CheckpointRequest {
        name: "newer".into(),
        incremental: false,
    })
    .await
    .unwrap();
    server.child.kill().unwrap(); // SIGKILL
    server.child.wait().unwrap();

    let restarted = Server::start_with(0, 1, &flags);
    assert!(
        restarted.before[0].starts_with("restored 20 rows"),
        "{:?}",
        restarted.before
    );
    let mut c = client(&restarted.addr).await;
    let described = c
        .describe(pb::DescribeRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(described.restored_from.ends_with("newer"), "{described:?}");
    let pulled = c
        .pull(pb::PullRequest {
            table: "emb".into(),
            keys: vec![0, 19],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        ps_common::wire::decode_f32s(&pulled.values).unwrap(),
        [2.0, 1.0]
    );
}

/// Clock calls for many jobs that each declare 65,536 workers hold memory
/// only for the ranks that reported, and finished jobs are freed: after
/// thousands, a new bsp job still starts.
#[tokio::test]
async fn clock_jobs_hold_little_memory_and_finished_ones_are_freed() {
    let server = Server::start(0, 1);
    let mut c = client(&server.addr).await;
    let report = |job: String, finished: bool| pb::ClockRequest {
        job,
        worker: 0,
        workers: 65_536,
        clock: 1,
        wait_for: 0,
        finished,
        lease_ms: 60_000,
        max_wait_ms: 0,
    };
    let rss_before = rss_bytes(server.child.id());
    for j in 0..100 {
        c.clock(report(format!("wide-{j}"), false)).await.unwrap();
    }
    let grown = rss_bytes(server.child.id()).saturating_sub(rss_before);
    assert!(
        grown < 16 << 20,
        "100 jobs grew the server by {grown} bytes"
    );
    for j in 0..2000 {
        let done = pb::ClockRequest {
            workers: 1,
            ..report(format!("done-{j}"), true)
        };
        c.clock(done).await.unwrap();
    }
    let fresh = pb::ClockRequest {
        workers: 1,
        ..report("fresh".into(), false)
    };
    c.clock(fresh).await.unwrap();
}

/// Hundreds of idle connections to the metrics port neither stop scrapes
/// nor gRPC calls: idle ones are closed, at most 64 are served at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_to_the_metrics_port_starve_neither_scrapes_nor_grpc() {
    let mut server = Server::start_with(0, 1, &["--metrics-listen", "127.0.0.1:0"]);
    let metrics = server
        .wait_for_line("metrics on ")
        .trim_start_matches("metrics on ")
        .to_string();
    let mut idle = Vec::new();
    for _ in 0..300 {
        idle.push(tokio::net::TcpStream::connect(&metrics).await.unwrap());
    }
    let mut c = client(&server.addr).await;
    stats(&mut c).await;
    let scrape = tokio::time::timeout(Duration::from_secs(30), async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(&metrics).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut reply = String::new();
        s.read_to_string(&mut reply).await.unwrap();
        reply
    })
    .await
    .expect("a scrape is answered once idle connections time out");
    assert!(scrape.contains("ps_requests_total"), "{scrape}");
    drop(idle);
}

/// A server killed (SIGKILL) while it writes a checkpoint leaves the
/// previous checkpoint of that name whole: it restores the rows it held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_mid_checkpoint_leaves_the_previous_one_restorable() {
    let dir = temp_dir("kill-mid-checkpoint");
    let root = dir.join("checkpoints");
    let keys: Vec<u64> = (0..1_000_000).collect();
    let push = |value: f32| pb::PushRequest {
        table: "emb".into(),
        keys: keys.clone(),
        gradients: ps_common::wire::encode_f32s(&vec![-value; keys.len() * 16]),
        ..Default::default()
    };
    for attempt in 1..=5 {
        let mut server = Server::start_with(0, 1, &["--checkpoint-dir", root.to_str().unwrap()]);
        let mut c = client(&server.addr).await;
        create(&mut c, &counting_table("emb", 16)).await.unwrap();
        c.push(push(1.0)).await.unwrap();
        let checkpoint = |c: &mut Client| {
            let mut c = c.clone();
            async move {
                c.checkpoint(pb::CheckpointRequest {
                    name: "c".into(),
                    incremental: false,
                })
                .await
            }
        };
        checkpoint(&mut c).await.unwrap();
        c.push(push(1.0)).await.unwrap(); // every row now holds 2
        let writing = tokio::spawn(checkpoint(&mut c));
        // Kill the server as soon as its temporary file appears.
        let folder = root.join("c");
        let caught = loop {
            let temporary = std::fs::read_dir(&folder)
                .unwrap()
                .filter_map(Result::ok)
                .any(|e| e.file_name().to_string_lossy().contains(".tmp"));
            if temporary {
                server.child.kill().unwrap();
                break true;
            }
            if writing.is_finished() {
                break false;
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        };
        server.child.wait().unwrap();
        let _ = writing.await;
        if !caught {
            eprintln!("attempt {attempt}: the write finished before the kill; again");
            std::fs::remove_dir_all(&root).ok();
            continue;
        }
        let restored = Server::start_with(0, 1, &["--restore", folder.to_str().unwrap()]);
        assert!(
            restored.before[0].starts_with("restored 1000000 rows"),
            "{:?}",
            restored.before
        );
        let pulled = client(&restored.addr)
            .await
            .pull(pb::PullRequest {
                table: "emb".into(),
                keys: vec![0, 999_999],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let values = ps_common::wire::decode_f32s(&pulled.values).unwrap();
        assert!(
            values.iter().all(|&v| v == 1.0),
            "the first checkpoint's rows"
        );
        eprintln!("killed mid-write on attempt {attempt}; the previous checkpoint restored");
        return;
    }
    panic!("five checkpoints finished before the kill: the write window was never caught");
}
