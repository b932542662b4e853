//! Real `ps-server` and `ps-worker` processes on loopback ports: a job end to end, the
//! command line's errors and help, shutdown, health, metrics, a soak.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use common::workers::*;
use common::{Server, binary, counting_table, rss_bytes, temp_dir};

#[test]
fn two_server_and_two_worker_processes_train_a9a_and_servers_stop_on_sigterm() {
    let dir = temp_dir("a9a");
    let job = a9a_job(&dir);
    let servers = [Server::start(0, 2), Server::start(1, 2)];
    let addrs = format!("{},{}", servers[0].addr, servers[1].addr);
    let mut total_samples = 0;
    for report in run_workers(&job, &addrs, 2, &dir, "report") {
        let auc = report["val_auc"].as_f64().unwrap();
        let acc = report["val_accuracy"].as_f64().unwrap();
        assert!(auc >= 0.895, "AUC {auc}: {report}");
        assert!(acc >= 0.845, "accuracy {acc}: {report}");
        assert!(report["samples_per_sec"].as_f64().unwrap() > 0.0);
        for key in [
            "val_logloss",
            "train_samples",
            "wall_seconds",
            "push_bytes",
            "pull_bytes",
        ] {
            assert!(report[key].as_f64().unwrap() > 0.0, "{key}: {report}");
        }
        total_samples += report["train_samples"].as_u64().unwrap();
    }
    assert_eq!(
        total_samples,
        32_561 * 5,
        "each line trained by one worker per epoch"
    );
    for server in servers {
        assert!(
            server.terminate().success(),
            "server did not shut down cleanly on SIGTERM"
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_worker_exits_non_zero_naming_an_unreachable_server() {
    let dir = temp_dir("unreachable");
    let job = a9a_job(&dir);
    // Port 1 (tcpmux) is closed on any test machine: connections are refused.
    // (A port freed by a bound-then-dropped listener can be taken by a
    // concurrent test's server before the worker connects.)
    let addr = "127.0.0.1:1".to_string();
    let out = worker(&[
        "train",
        "--config",
        job.to_str().unwrap(),
        "--servers",
        &addr,
        "--rank",
        "0",
        "--world",
        "1",
        "--connect-timeout-secs",
        "1",
    ])
    .output()
    .unwrap();
    assert!(!out.status.success());
    let err = stderr_of(&out);
    assert!(
        err.contains(&addr) && err.contains("unreachable after"),
        "{err}"
    );
}

#[test]
fn a_malformed_job_file_is_reported_with_its_key_and_line() {
    let dir = temp_dir("badjob");
    let job = a9a_job_edited(&dir, "job.toml", &[("batch_size = 32", "batch_size = -4")]);
    // A user's mistake: its message, without a backtrace even when asked
    // for one, and without colour codes in a pipe.
    let out = worker(&["local", "--config", job.to_str().unwrap()])
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr_of(&out);
    assert!(
        err.contains("invalid job file") && err.contains("job.toml"),
        "{err}"
    );
    assert!(err.contains("line 19"), "{err}");
    assert!(err.contains("key `train.batch_size`"), "{err}");
    assert!(!err.to_lowercase().contains("backtrace"), "{err}");
    assert!(!err.contains('\u{1b}'), "colour codes in a pipe: {err:?}");
}

/// Logs written to a pipe or a file carry no colour codes; a shuffled job
/// (every epoch in its own order) trains as well as the file's order.
#[test]
fn a_shuffled_local_run_logs_plain_text_to_a_pipe() {
    let dir = temp_dir("plainlogs");
    let job = a9a_job_edited(
        &dir,
        "job.toml",
        &[
            ("epochs = 5", "epochs = 2"),
            ("[data]", "[data]\nshuffle_buffer = 5000"),
        ],
    );
    let out = worker(&["local", "--config", job.to_str().unwrap()])
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    let err = stderr_of(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("INFO"), "{err}");
    assert!(!err.contains('\u{1b}'), "colour codes in a pipe: {err:?}");
    let printed = format!("{}{err}", String::from_utf8_lossy(&out.stdout));
    let auc: f64 = printed
        .split("): auc ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no AUC in {printed}"));
    assert!(auc > 0.89, "AUC {auc}");
}

/// The job file's lifecycle reaches the servers: a9a trained by two
/// server processes whose weights table admits at the second push and keeps
/// at most 40 rows per shard (of a9a's 123 features) still learns, and the
/// servers count what they admitted, filtered and evicted.
#[test]
fn a_job_whose_table_admits_and_evicts_trains_and_the_servers_count_it() {
    let dir = temp_dir("lifecycle");
    let job = a9a_job_edited(
        &dir,
        "job.toml",
        &[
            ("epochs = 5", "epochs = 2"),
            (
                "kind = \"sparse\"\ndim = 1",
                "kind = \"sparse\"\ndim = 1\nlifecycle = { admission = { kind = \"count\", min_count = 2, sketch_width = 4096 }, eviction = { max_rows = 40 } }",
            ),
        ],
    );
    let servers = [
        Server::start_with(0, 2, &["--evict-interval-ms", "5"]),
        Server::start_with(1, 2, &["--evict-interval-ms", "5"]),
    ];
    let addrs = format!("{},{}", servers[0].addr, servers[1].addr);
    let reports = run_workers(&job, &addrs, 1, &dir, "lifecycle");
    let auc = reports[0]["val_auc"].as_f64().unwrap();
    assert!(auc > 0.8, "AUC {auc}");
    // The evictor's next pass (every 5 ms) has the tables within their cap.
    std::thread::sleep(std::time::Duration::from_millis(200));
    let (mut admitted, mut filtered, mut evicted) = (0, 0, 0);
    for server in &servers {
        let stats = common::stats_of(&server.addr);
        let weights = stats.tables.iter().find(|t| t.name == "weights").unwrap();
        assert!(weights.rows <= 40, "{weights:?}");
        admitted += weights.admitted_rows;
        filtered += weights.filtered_pushes;
        evicted += weights.evicted_rows;
    }
    assert!(
        admitted > 80 && filtered > 0 && evicted > 0,
        "{admitted} {filtered} {evicted}"
    );
    eprintln!(
        "lifecycle job: AUC {auc:.4}, admitted {admitted}, filtered {filtered}, evicted {evicted}"
    );
}

/// The same table capped at 40 rows in memory, on servers with a disk
/// tier: evicted rows move to disk and come back when touched, so no
/// weight is lost and the model trains as an unbounded one does.
#[test]
fn with_a_disk_tier_a_capped_table_keeps_every_row_and_trains_as_an_unbounded_one() {
    let dir = temp_dir("disk-tier");
    let job = a9a_job_edited(
        &dir,
        "job.toml",
        &[
            ("epochs = 5", "epochs = 2"),
            (
                "kind = \"sparse\"\ndim = 1",
                "kind = \"sparse\"\ndim = 1\nlifecycle = { eviction = { max_rows = 40 } }",
            ),
        ],
    );
    let tier = |shard: u32| {
        dir.join(format!("tier-{shard}"))
            .to_str()
            .unwrap()
            .to_string()
    };
    let servers = [0, 1].map(|shard| {
        let tier = tier(shard);
        Server::start_with(
            shard,
            2,
            &["--evict-interval-ms", "5", "--disk-tier", &tier],
        )
    });
    let addrs = format!("{},{}", servers[0].addr, servers[1].addr);
    let reports = run_workers(&job, &addrs, 1, &dir, "disk-tier");
    let auc = reports[0]["val_auc"].as_f64().unwrap();
    assert!(auc > 0.895, "AUC {auc}");
    std::thread::sleep(std::time::Duration::from_millis(200));
    let (mut in_memory, mut on_disk) = (0, 0);
    for server in &servers {
        let stats = common::stats_of(&server.addr);
        let weights = stats.tables.iter().find(|t| t.name == "weights").unwrap();
        assert!(weights.rows_in_memory <= 40, "{weights:?}");
        assert_eq!(weights.rows, weights.rows_in_memory + weights.rows_on_disk);
        in_memory += weights.rows_in_memory;
        on_disk += weights.rows_on_disk;
    }
    assert!(
        on_disk > 0 && in_memory + on_disk > 100,
        "{in_memory} + {on_disk}"
    );
    eprintln!("disk tier job: AUC {auc:.4}, {in_memory} rows in memory, {on_disk} on disk");
}

#[test]
fn a_missing_data_file_is_reported_before_anything_starts() {
    let dir = temp_dir("nodata");
    let job = a9a_job_edited(&dir, "job.toml", &[("a9a.train.libsvm", "missing.libsvm")]);
    let out = worker(&["local", "--config", job.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr_of(&out).contains("missing.libsvm: cannot open"),
        "{}",
        stderr_of(&out)
    );
}

#[test]
fn every_flag_is_documented_in_help() {
    for (bin, sub, flags) in [
        (
            "ps-server",
            None,
            &[
                "--listen",
                "--shard-id",
                "--num-shards",
                "--max-request-bytes",
                "--max-keys-per-request",
                "--max-response-bytes",
                "--memory-budget",
                "--max-rows-per-table",
                "--disk-tier",
                "--disk-tier-cache-bytes",
                "--checkpoint-dir",
                "--restore",
                "--restore-latest",
                "--drain-timeout-secs",
                "--checkpoint-on-shutdown",
                "--metrics-listen",
                "--log-format",
                "--auth-token-file",
                "--peer-token-file",
                "--join",
                "--advertise",
                "--join-timeout-secs",
                "--checkpoint-every-secs",
                "--tls-cert",
                "--tls-key",
                "--tls-ca",
                "--tls-require-client-cert",
                "--checkpoint-deltas-per-base",
                "--evict-interval-ms",
            ][..],
        ),
        (
            "ps-worker",
            Some("train"),
            &[
                "--config",
                "--servers",
                "--rank",
                "--world",
                "--report",
                "--connect-timeout-secs",
                "--backups",
                "--request-timeout-secs",
                "--device",
                "--run-id",
                "--tls-ca",
            ][..],
        ),
        (
            "ps-worker",
            Some("eval"),
            &[
                "--config",
                "--checkpoints",
                "--data",
                "--device",
                "--report",
            ][..],
        ),
        (
            "ps-worker",
            Some("health"),
            &["--servers", "--timeout-secs", "--auth-token-file"][..],
        ),
        (
            "ps-worker",
            Some("local"),
            &[
                "--config",
                "--servers",
                "--workers",
                "--report",
                "--device",
                "--checkpoint-dir",
            ][..],
        ),
        (
            "ps-worker",
            Some("checkpoint"),
            &[
                "--servers",
                "--name",
                "--incremental",
                "--connect-timeout-secs",
            ][..],
        ),
    ] {
        let mut cmd = Command::new(binary(bin));
        cmd.args(sub).arg("--help");
        let help = String::from_utf8(cmd.output().unwrap().stdout).unwrap();
        for flag in flags {
            assert!(
                help.contains(flag),
                "{bin} {sub:?} --help lacks {flag}:\n{help}"
            );
        }
    }
}

#[test]
fn worker_0_s_early_stop_reaches_workers_in_other_processes() {
    let dir = temp_dir("early-stop");
    let job = a9a_job_edited(
        &dir,
        "job-stop.toml",
        &[
            ("epochs = 5", "epochs = 12\nearly_stopping_patience = 1"),
            ("lr = 0.1", "lr = 0.5"),
        ],
    );
    let servers = [Server::start(0, 2), Server::start(1, 2)];
    let addrs = format!("{},{}", servers[0].addr, servers[1].addr);
    let reports = run_workers(&job, &addrs, 2, &dir, "stop");
    let epochs = reports[0]["epochs"].as_array().unwrap().len();
    assert!(
        reports[0]["stopped_early"].as_bool().unwrap(),
        "{}",
        reports[0]
    );
    assert!(epochs < 12);
    // Worker 1 stops within its next poll, not after 12 epochs.
    assert!(
        reports[1]["stopped_early"].as_bool().unwrap(),
        "{}",
        reports[1]
    );
    let samples = reports[1]["train_samples"].as_u64().unwrap();
    assert!(samples < 12 * 16_280, "worker 1 trained {samples} samples");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn sigterm_drains_then_writes_the_shutdown_checkpoint_and_json_logs_parse() {
    let dir = temp_dir("shutdown");
    let root = dir.join("ckpt");
    let mut child = Command::new(binary("ps-server"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--shard-id",
            "0",
            "--num-shards",
            "1",
        ])
        .args(["--checkpoint-dir", root.to_str().unwrap()])
        .args(["--checkpoint-on-shutdown", "final", "--log-format", "json"])
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap()
        .to_string();
    // Train one epoch so the shard holds rows.
    let job = a9a_job_edited(&dir, "job.toml", &[("epochs = 5", "epochs = 1")]);
    let out = worker(&[
        "train",
        "--config",
        job.to_str().unwrap(),
        "--servers",
        &addr,
        "--rank",
        "0",
        "--world",
        "1",
    ])
    .output()
    .unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "server exit: {}", stderr_of(&out));
    assert!(
        root.join("final").join("shard-0.bin").exists(),
        "no shutdown checkpoint"
    );
    let logs = String::from_utf8_lossy(&out.stderr);
    let events: Vec<serde_json::Value> = logs
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(
        events
            .iter()
            .any(|e| e["fields"]["message"] == "shutdown checkpoint written"),
        "{logs}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// `GET /metrics` from `addr`, the body.
fn scrape(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
        .unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    reply
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_string()
}

/// The value of the sample line starting with `series` (name and labels).
fn sample(body: &str, series: &str) -> f64 {
    body.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no {series} in\n{body}"))
}

#[test]
fn servers_and_workers_serve_prometheus_metrics_that_move() {
    let dir = temp_dir("metrics");
    // Killed on drop, also when an assertion below fails.
    let mut server = Server::start_with(0, 1, &["--metrics-listen", "127.0.0.1:0"]);
    let addr = server.addr.clone();
    let server_metrics = server
        .wait_for_line("metrics on ")
        .replace("metrics on ", "");
    let job = a9a_job(&dir);
    let mut child = worker(&[
        "train",
        "--config",
        job.to_str().unwrap(),
        "--servers",
        &addr,
        "--rank",
        "0",
        "--world",
        "1",
        "--metrics-listen",
        "127.0.0.1:0",
    ])
    .stdout(Stdio::piped())
    .spawn()
    .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    let worker_metrics = out.next().unwrap().unwrap().replace("metrics on ", "");
    // The worker's samples counter moves while it trains.
    let mut seen = Vec::new();
    while seen.len() < 2 || seen[seen.len() - 1] <= seen[0] {
        assert!(
            child.try_wait().unwrap().is_none(),
            "worker finished before its metrics moved: {seen:?}"
        );
        seen.push(sample(&scrape(&worker_metrics), "ps_worker_samples_total "));
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let body = scrape(&worker_metrics);
    assert!(sample(&body, "ps_worker_loss ") > 0.0, "{body}");
    assert!(sample(&body, "ps_worker_pull_bytes_total ") > 0.0, "{body}");
    assert!(child.wait().unwrap().success());

    let body = scrape(&server_metrics);
    assert!(
        sample(&body, "ps_requests_total{rpc=\"pull\",status=\"ok\"} ") > 100.0,
        "{body}"
    );
    // A step's pushes of the weights and the bias travel in one PushMany.
    assert!(sample(&body, "ps_requests_total{rpc=\"push_many\",status=\"ok\"} ") > 100.0);
    assert!(
        sample(
            &body,
            "ps_request_duration_seconds_count{rpc=\"push_many\"} "
        ) > 100.0
    );
    assert!(sample(&body, "ps_table_rows{table=\"weights\"} ") > 100.0);
    assert!(sample(&body, "ps_rows_pushed_total ") > 0.0);
    drop(server);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn the_health_command_passes_for_a_serving_shard_and_names_a_dead_one() {
    let server = Server::start(0, 1);
    let out = worker(&["health", "--servers", &server.addr])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("{}: SERVING", server.addr)
    );
    let addr = server.addr.clone();
    assert!(server.terminate().success());
    let out = worker(&["health", "--servers", &addr, "--timeout-secs", "2"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr_of(&out).contains(&addr), "{}", stderr_of(&out));
}

/// Eight clients push and pull against one shard process for a bounded
/// time (`PS_SOAK_SECS`, default 15, at most 60): no call fails, the
/// server's memory stops growing once every row exists, and every row ends
/// holding exactly the pushes applied to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn soak_eight_clients_against_one_shard_with_bounded_memory_and_exact_rows() {
    use ps_worker::{ClientConfig, PsClient};
    use std::collections::HashMap;
    use std::time::{Duration, Instant};

    const CLIENTS: usize = 8;
    const IDS: f64 = 200_000.0;
    let secs: u64 = std::env::var("PS_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(15)
        .clamp(1, 60);
    let server = Server::start(0, 1);
    let pid = server.child.id();
    let spec = counting_table("soak", 4);
    let config = ClientConfig::default();
    let until = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let client = PsClient::connect(std::slice::from_ref(&server.addr), &config)
            .await
            .unwrap();
        client.create_table(&spec).await.unwrap();
        tasks.push(tokio::spawn(async move {
            // xorshift64*; ids log-uniform in [1, IDS): a few hot, many cold.
            let mut state = 0x9E37_79B9_7F4A_7C15u64 ^ (c as u64 + 1);
            let mut next = move || {
                state ^= state >> 12;
                state ^= state << 25;
                state ^= state >> 27;
                (state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
            };
            let mut pushed: HashMap<u64, u64> = HashMap::new();
            let (mut pushes, mut pulls) = (0u64, 0u64);
            while Instant::now() < until {
                let keys: Vec<u64> = (0..256).map(|_| IDS.powf(next()) as u64).collect();
                // Gradient -1 with lr 1: each occurrence adds exactly 1.
                client
                    .push("soak", &keys, &vec![-1.0; keys.len() * 4])
                    .await
                    .unwrap();
                for &k in &keys {
                    *pushed.entry(k).or_default() += 1;
                }
                pushes += 1;
                let rows = client.pull("soak", &keys[..64]).await.unwrap();
                assert!(rows.iter().all(|v| v.is_finite() && *v >= 0.0));
                pulls += 1;
            }
            client.flush().await.unwrap();
            (
                pushed,
                pushes,
                pulls,
                client.push_latency().quantile(0.99).unwrap_or(0.0),
            )
        }));
    }
    let mut rss = Vec::new();
    while Instant::now() < until {
        rss.push(rss_bytes(pid));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let mut expected: HashMap<u64, u64> = HashMap::new();
    let (mut pushes, mut pulls, mut p99) = (0, 0, 0f64);
    for task in tasks {
        let (pushed, n_push, n_pull, latency) = task.await.unwrap();
        for (k, n) in pushed {
            *expected.entry(k).or_default() += n;
        }
        (pushes, pulls, p99) = (pushes + n_push, pulls + n_pull, p99.max(latency));
    }
    rss.push(rss_bytes(pid));

    let checker = PsClient::connect(std::slice::from_ref(&server.addr), &config)
        .await
        .unwrap();
    checker.create_table(&spec).await.unwrap();
    let keys: Vec<u64> = expected.keys().copied().collect();
    let rows = checker.pull("soak", &keys).await.unwrap();
    for (i, k) in keys.iter().enumerate() {
        let want = expected[k] as f32;
        assert_eq!(&rows[i * 4..i * 4 + 4], &[want; 4], "row {k}");
    }
    let stats = checker.stats().await.unwrap()[0].clone();
    assert_eq!(stats.requests.unwrap().errors, 0);
    let quarter = rss[rss.len() / 4];
    let last = *rss.last().unwrap();
    let peak = *rss.iter().max().unwrap();
    eprintln!(
        "soak: {CLIENTS} clients x {secs} s: {pushes} pushes + {pulls} pulls ({:.0} calls/s), {} rows, push p99 {:.1} ms, server RSS {} MiB at 1/4 time, {} MiB at the end, peak {} MiB",
        (pushes + pulls) as f64 / secs as f64,
        keys.len(),
        p99 * 1e3,
        quarter >> 20,
        last >> 20,
        peak >> 20
    );
    assert!(peak < 1 << 30, "server RSS peaked at {peak} bytes");
    assert!(
        last <= quarter + (64 << 20),
        "server memory kept growing: {quarter} -> {last} bytes"
    );
}
