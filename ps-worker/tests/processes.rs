//! Real `ps-server` and `ps-worker` processes on loopback ports.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use common::{Server, binary, counting_table, peer_token_file, rss_bytes, stats_of, temp_dir};

/// The example job with the a9a files read from disk (not the built-in copy).
fn a9a_job(dir: &Path) -> PathBuf {
    a9a_job_edited(dir, "job.toml", &[])
}

/// [`a9a_job`] with each `(from, to)` text replacement applied, written to
/// `dir/name`.
fn a9a_job_edited(dir: &Path, name: &str, edits: &[(&str, &str)]) -> PathBuf {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/a9a");
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/a9a-lr.toml"),
    )
    .unwrap()
    .replace(
        "builtin:a9a/train",
        &data.join("a9a.train.libsvm").display().to_string(),
    )
    .replace(
        "builtin:a9a/test",
        &data.join("a9a.test.libsvm").display().to_string(),
    );
    let text = edits
        .iter()
        .fold(text, |text, (from, to)| text.replace(from, to));
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn worker(args: &[&str]) -> Command {
    let mut cmd = Command::new(binary("ps-worker"));
    cmd.args(args).env("RUST_LOG", "warn");
    cmd
}

/// Starts worker `rank` of `world` of `job`, its report going to `report`.
fn spawn_worker(job: &Path, addrs: &str, rank: usize, world: usize, report: &Path) -> Child {
    worker(&[
        "train",
        "--config",
        job.to_str().unwrap(),
        "--servers",
        addrs,
        "--rank",
        &rank.to_string(),
        "--world",
        &world.to_string(),
        "--report",
        report.to_str().unwrap(),
    ])
    .stdout(Stdio::null())
    .spawn()
    .unwrap()
}

/// Waits for a worker; returns its report.
fn report_of(mut child: Child, report: &Path) -> serde_json::Value {
    assert!(child.wait().unwrap().success(), "worker failed");
    serde_json::from_str(&std::fs::read_to_string(report).unwrap()).unwrap()
}

/// Starts `world` `ps-worker train` processes of `job`; each writes its
/// report to `dir/{prefix}-{rank}.json`. Waits for them; returns the reports.
fn run_workers(
    job: &Path,
    addrs: &str,
    world: usize,
    dir: &Path,
    prefix: &str,
) -> Vec<serde_json::Value> {
    let workers: Vec<(Child, PathBuf)> = (0..world)
        .map(|rank| {
            let report = dir.join(format!("{prefix}-{rank}.json"));
            (spawn_worker(job, addrs, rank, world, &report), report)
        })
        .collect();
    workers
        .into_iter()
        .map(|(child, report)| report_of(child, &report))
        .collect()
}

fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

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
    let out = worker(&["local", "--config", job.to_str().unwrap()])
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
            &["--servers", "--name", "--connect-timeout-secs"][..],
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

#[tokio::test]
async fn a_server_restored_from_a_checkpoint_serves_the_same_weights() {
    use ps_common::{InitializerSpec, OptimizerSpec, TableKind, TableSpec};
    use ps_worker::{ClientConfig, PsClient};

    let dir = temp_dir("restore");
    let spec = TableSpec {
        name: "emb".into(),
        kind: TableKind::Sparse,
        dim: 3,
        initializer: InitializerSpec::Normal {
            mean: 0.0,
            std: 0.1,
        },
        optimizer: OptimizerSpec::Adagrad {
            lr: 0.1,
            initial_accumulator: 0.1,
            eps: 1e-8,
        },
        seed: 4,
    };
    let keys: Vec<u64> = (0..500).collect();
    let ckpt_root = dir.join("ckpt");
    let server = Server::start_with(
        0,
        1,
        &[
            "--checkpoint-dir",
            ckpt_root.to_str().unwrap(),
            "--drain-timeout-secs",
            "1",
        ],
    );
    let client = PsClient::connect(std::slice::from_ref(&server.addr), &ClientConfig::default())
        .await
        .unwrap();
    client.create_table(&spec).await.unwrap();
    client
        .push("emb", &keys, &vec![0.5; 500 * 3])
        .await
        .unwrap();
    client.flush().await.unwrap();
    let trained = client.pull("emb", &keys).await.unwrap();

    let out = worker(&["checkpoint", "--servers", &server.addr, "--name", "c1"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("500 rows"));
    // `client` still holds a connection this (blocked) test task cannot close:
    // SIGTERM must still stop the server, after the drain timeout.
    assert!(server.terminate().success());

    let restored = Server::start_with(0, 1, &["--restore", ckpt_root.join("c1").to_str().unwrap()]);
    assert!(
        restored.before[0].starts_with("restored 500 rows in "),
        "the recovery time is reported: {:?}",
        restored.before
    );
    let client = PsClient::connect(
        std::slice::from_ref(&restored.addr),
        &ClientConfig::default(),
    )
    .await
    .unwrap();
    client.create_table(&spec).await.unwrap(); // idempotent: the restored table has this spec
    assert_eq!(client.pull("emb", &keys).await.unwrap(), trained);
    drop(restored);

    // A corrupted checkpoint is refused at start-up with a message.
    let file = ckpt_root.join("c1/shard-0.bin");
    let mut bytes = std::fs::read(&file).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&file, bytes).unwrap();
    let out = Command::new(binary("ps-server"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--shard-id",
            "0",
            "--num-shards",
            "1",
            "--restore",
        ])
        .arg(ckpt_root.join("c1"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr_of(&out).contains("checksum mismatch"),
        "{}",
        stderr_of(&out)
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn separate_workers_start_from_a_checkpoint_after_worker_0_loads_it() {
    // Job 1: two shards with a checkpoint folder; one worker; checkpoint "one".
    let dir = temp_dir("init-from");
    let job = a9a_job(&dir);
    let ckpt_root = dir.join("ckpt");
    let root = ckpt_root.to_str().unwrap();
    let first = [
        Server::start_with(0, 2, &["--checkpoint-dir", root]),
        Server::start_with(1, 2, &["--checkpoint-dir", root]),
    ];
    let addrs = format!("{},{}", first[0].addr, first[1].addr);
    let report = dir.join("first.json");
    let out = worker(&[
        "train",
        "--config",
        job.to_str().unwrap(),
        "--servers",
        &addrs,
        "--rank",
        "0",
        "--world",
        "1",
        "--report",
        report.to_str().unwrap(),
    ])
    .output()
    .unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    let out = worker(&["checkpoint", "--servers", &addrs, "--name", "one"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    let recorded: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let recorded = recorded["val_auc"].as_f64().unwrap();

    // Job 2: three fresh shards, two workers, everything loaded and frozen.
    let edit = format!(
        "epochs = 1\ninit_from = \"{}\"\nfreeze = [\"weights\", \"bias\"]",
        ckpt_root.join("one").display()
    );
    let job2 = a9a_job_edited(&dir, "job2.toml", &[("epochs = 5", &edit)]);
    let second: Vec<Server> = (0..3).map(|i| Server::start(i, 3)).collect();
    let addrs: Vec<&str> = second.iter().map(|s| s.addr.as_str()).collect();
    let addrs = addrs.join(",");
    for report in run_workers(&job2, &addrs, 2, &dir, "second") {
        let auc = report["val_auc"].as_f64().unwrap();
        assert!(
            (auc - recorded).abs() < 1e-9,
            "{auc} vs {recorded} before the checkpoint"
        );
    }
    std::fs::remove_dir_all(&dir).ok();
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

#[test]
fn a_server_with_a_token_file_serves_only_workers_with_the_same_token() {
    let dir = temp_dir("auth");
    let token = dir.join("token");
    std::fs::write(&token, "a-long-enough-token-0123\n").unwrap();
    let other = dir.join("other");
    std::fs::write(&other, "another-token-0123456789").unwrap();
    let server = Server::start_with(0, 1, &["--auth-token-file", token.to_str().unwrap()]);
    let job = a9a_job_edited(&dir, "job.toml", &[("epochs = 5", "epochs = 1")]);
    let train = |token: Option<&Path>| {
        let mut args = vec![
            "train",
            "--config",
            job.to_str().unwrap(),
            "--servers",
            &server.addr,
            "--rank",
            "0",
            "--world",
            "1",
            "--connect-timeout-secs",
            "2",
        ];
        if let Some(t) = token {
            args.extend(["--auth-token-file", t.to_str().unwrap()]);
        }
        worker(&args).output().unwrap()
    };
    for (token, expected) in [
        (None, "missing bearer token"),
        (Some(other.as_path()), "invalid bearer token"),
    ] {
        let out = train(token);
        assert!(!out.status.success());
        assert!(stderr_of(&out).contains(expected), "{}", stderr_of(&out));
    }
    let out = train(Some(&token));
    assert!(out.status.success(), "{}", stderr_of(&out));
    std::fs::remove_dir_all(&dir).ok();
}

/// Two primaries, each with a backup process that has joined it.
fn replicated_shards(dir: &Path) -> ([Server; 2], [Server; 2]) {
    let primaries = [Server::primary(dir, 0, 2), Server::primary(dir, 1, 2)];
    let backups = [
        Server::backup_of(dir, &primaries[0], 0, 2),
        Server::backup_of(dir, &primaries[1], 1, 2),
    ];
    (primaries, backups)
}

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

/// Waits until shard `addr` has applied `n` push calls.
fn wait_for_pushes(addr: &str, n: u64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while stats_of(addr).requests.unwrap().updates_applied < n {
        assert!(
            std::time::Instant::now() < deadline,
            "training never got going"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// The data position rank `rank` of `world` of `job` has recorded on the
/// servers `addrs`, as the report's `resumed_from` writes it.
fn recorded_position(job: &Path, addrs: &str, rank: usize, world: usize) -> serde_json::Value {
    let text = std::fs::read_to_string(job).unwrap();
    let config = ps_common::config::JobConfig::from_toml(&text, job.parent().unwrap()).unwrap();
    let servers: Vec<String> = addrs.split(',').map(String::from).collect();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let client =
                ps_worker::PsClient::connect(&servers, &ps_worker::ClientConfig::default())
                    .await
                    .unwrap();
            let positions = ps_worker::resume::Positions::open(&client, &config, rank, world)
                .await
                .unwrap();
            let position = positions
                .load(&client)
                .await
                .unwrap()
                .expect("a recorded position");
            serde_json::to_value(position).unwrap()
        })
}

#[test]
fn a_worker_killed_mid_epoch_and_restarted_resumes_and_the_job_completes() {
    let dir = temp_dir("resume");
    let job = a9a_job_edited(
        &dir,
        "job.toml",
        &[("epochs = 5", "epochs = 2\nprogress_every_steps = 20")],
    );
    let servers = [Server::start(0, 2), Server::start(1, 2)];
    let addrs = format!("{},{}", servers[0].addr, servers[1].addr);
    let reports: Vec<PathBuf> = ["w0", "w1", "w1-again"]
        .iter()
        .map(|name| dir.join(format!("{name}.json")))
        .collect();
    let first = spawn_worker(&job, &addrs, 0, 2, &reports[0]);
    let mut second = spawn_worker(&job, &addrs, 1, 2, &reports[1]);
    wait_for_pushes(&servers[0].addr, 400);
    second.kill().unwrap(); // SIGKILL: no chance to clean up
    second.wait().unwrap();
    let recorded = recorded_position(&job, &addrs, 1, 2);
    let restarted = report_of(spawn_worker(&job, &addrs, 1, 2, &reports[2]), &reports[2]);
    let untouched = report_of(first, &reports[0]);

    assert_eq!(
        restarted["resumed_from"], recorded,
        "the restarted worker resumed where the killed one recorded"
    );
    let resumed_steps = restarted["resumed_from"]["steps"].as_u64().unwrap();
    assert!(resumed_steps >= 20, "resumed at step {resumed_steps}");
    // Rank 1 reads every other line of the 32,561: 16,280 per epoch.
    assert_eq!(
        restarted["skipped_samples"].as_u64().unwrap()
            + restarted["train_samples"].as_u64().unwrap(),
        16_280 * 2,
        "the earlier run's recorded samples plus this run's are rank 1's data: {restarted}"
    );
    assert_eq!(untouched["train_samples"].as_u64().unwrap(), 16_281 * 2);
    let auc = restarted["val_auc"].as_f64().unwrap();
    assert!(auc >= 0.895, "AUC {auc}");
    eprintln!(
        "resume: rank 1 restarted at step {resumed_steps} (epoch {}), AUC {auc:.4}",
        restarted["resumed_from"]["epoch"]
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn after_kill_9_of_server_and_worker_both_recover_from_the_periodic_checkpoint() {
    let dir = temp_dir("periodic");
    let root = dir.join("ckpt");
    let root_arg = root.to_str().unwrap().to_string();
    // Small batches: the run must outlast a checkpoint interval.
    let job = a9a_job_edited(
        &dir,
        "job.toml",
        &[
            ("epochs = 5", "epochs = 2\nprogress_every_steps = 20"),
            ("batch_size = 32", "batch_size = 4"),
        ],
    );
    let flags = [
        "--checkpoint-dir",
        &root_arg,
        "--checkpoint-every-secs",
        "1",
    ];
    let mut server = Server::start_with(0, 1, &flags);
    let reports = [dir.join("first.json"), dir.join("again.json")];
    let mut first = spawn_worker(&job, &server.addr, 0, 1, &reports[0]);
    wait_for_pushes(&server.addr, 300);
    // A checkpoint written after those pushes.
    let file = root.join("periodic/shard-0.bin");
    let modified = |f: &Path| std::fs::metadata(f).and_then(|m| m.modified()).ok();
    let before = modified(&file);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while modified(&file) == before {
        assert!(
            std::time::Instant::now() < deadline,
            "no periodic checkpoint"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // Lose everything but the checkpoint.
    assert!(
        first.try_wait().unwrap().is_none(),
        "the worker finished too soon"
    );
    first.kill().unwrap();
    first.wait().unwrap();
    server.child.kill().unwrap();
    server.child.wait().unwrap();

    let started = std::time::Instant::now();
    let restore = root.join("periodic");
    let restored = Server::start_with(0, 1, &["--restore", restore.to_str().unwrap()]);
    let recovery = started.elapsed();
    assert!(
        restored.before[0].starts_with("restored "),
        "{:?}",
        restored.before
    );
    let recorded = recorded_position(&job, &restored.addr, 0, 1);
    let again = report_of(
        spawn_worker(&job, &restored.addr, 0, 1, &reports[1]),
        &reports[1],
    );
    assert_eq!(
        again["resumed_from"], recorded,
        "the worker resumed at the position the restored checkpoint holds"
    );
    let resumed = again["resumed_from"]["steps"].as_u64().unwrap();
    assert!(resumed >= 20, "resumed at step {resumed}");
    assert_eq!(
        again["skipped_samples"].as_u64().unwrap() + again["train_samples"].as_u64().unwrap(),
        32_561 * 2,
        "{again}"
    );
    let auc = again["val_auc"].as_f64().unwrap();
    assert!(auc >= 0.895, "AUC {auc}");
    eprintln!(
        "periodic checkpoint: server back in {recovery:?} ({}), worker resumed at step {resumed}, AUC {auc:.4}",
        restored.before[0]
    );
    std::fs::remove_dir_all(&dir).ok();
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

/// A CA and a server and a client certificate it signed, as PEM files.
struct Pki {
    ca: PathBuf,
    server: [PathBuf; 2],
    client: [PathBuf; 2],
}

fn pki(dir: &Path, tag: &str) -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, Issuer, KeyPair};
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
    let issuer: &Issuer<'_, KeyPair> = &ca;
    let write = |name: &str, text: String| {
        let path = dir.join(format!("{tag}-{name}.pem"));
        std::fs::write(&path, text).unwrap();
        path
    };
    let leaf = |name: &str, names: &[&str]| {
        let key = KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let cert = CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, issuer)
            .unwrap();
        [
            write(&format!("{name}-cert"), cert.pem()),
            write(&format!("{name}-key"), key.serialize_pem()),
        ]
    };
    Pki {
        server: leaf("server", &["127.0.0.1", "localhost"]),
        client: leaf("client", &["worker"]),
        ca: write("ca", ca.pem()),
    }
}

#[tokio::test]
async fn over_mutual_tls_only_clients_with_a_certificate_of_the_job_s_ca_get_in() {
    use ps_common::tls::TlsFiles;
    use ps_worker::{ClientConfig, PsClient};

    let dir = temp_dir("tls");
    let (job_ca, other_ca) = (pki(&dir, "job"), pki(&dir, "other"));
    let s = |p: &PathBuf| p.to_str().unwrap().to_string();
    let flags = [
        "--tls-cert".to_string(),
        s(&job_ca.server[0]),
        "--tls-key".into(),
        s(&job_ca.server[1]),
        "--tls-ca".into(),
        s(&job_ca.ca),
        "--tls-require-client-cert".into(),
    ];
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let peer = peer_token_file(&dir);
    let primary = Server::start_with(0, 1, &[&flags[..], &["--peer-token-file", &peer]].concat());
    // Replication runs over TLS too.
    let mut backup = Server::start_with(
        0,
        1,
        &[
            &flags[..],
            &["--peer-token-file", &peer, "--join", &primary.addr],
        ]
        .concat(),
    );
    backup.wait_for_line("joined ");

    let config = |files: TlsFiles| ClientConfig {
        tls: files.client().unwrap(),
        connect_timeout: std::time::Duration::from_secs(1),
        ..ClientConfig::default()
    };
    let worker_files = TlsFiles {
        ca: Some(job_ca.ca.clone()),
        cert: Some(job_ca.client[0].clone()),
        key: Some(job_ca.client[1].clone()),
    };
    let addrs = std::slice::from_ref(&primary.addr);
    let client = PsClient::connect(addrs, &config(worker_files.clone()))
        .await
        .unwrap();
    let spec = counting_table("emb", 1);
    client.create_table(&spec).await.unwrap();
    client.push("emb", &[3], &[-2.0]).await.unwrap();
    client.flush().await.unwrap();
    assert_eq!(client.pull("emb", &[3]).await.unwrap(), [2.0]);
    assert_eq!(
        stats_of_tls(&backup.addr, &worker_files).await,
        1,
        "replicated over TLS"
    );

    let refused = [
        ("plain TCP", TlsFiles::default()),
        (
            "no client certificate",
            TlsFiles {
                ca: Some(job_ca.ca.clone()),
                ..TlsFiles::default()
            },
        ),
        (
            "a certificate of another CA",
            TlsFiles {
                ca: Some(job_ca.ca.clone()),
                cert: Some(other_ca.client[0].clone()),
                key: Some(other_ca.client[1].clone()),
            },
        ),
        (
            "trusting another CA",
            TlsFiles {
                ca: Some(other_ca.ca.clone()),
                cert: Some(job_ca.client[0].clone()),
                key: Some(job_ca.client[1].clone()),
            },
        ),
    ];
    for (what, files) in refused {
        let attempt = PsClient::connect(addrs, &config(files)).await;
        assert!(attempt.is_err(), "{what}: connected");
    }

    let out = worker(&[
        "health",
        "--servers",
        &primary.addr,
        "--tls-ca",
        &s(&job_ca.ca),
        "--tls-cert",
        &s(&job_ca.client[0]),
        "--tls-key",
        &s(&job_ca.client[1]),
    ])
    .output()
    .unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    std::fs::remove_dir_all(&dir).ok();
}

/// Push calls applied by the shard at `addr`, asked over TLS.
async fn stats_of_tls(addr: &str, files: &ps_common::tls::TlsFiles) -> u64 {
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(files.client().unwrap().unwrap())
        .unwrap()
        .connect()
        .await
        .unwrap();
    ps_common::pb::parameter_server_client::ParameterServerClient::new(channel)
        .stats(ps_common::pb::StatsRequest {})
        .await
        .unwrap()
        .into_inner()
        .requests
        .unwrap()
        .updates_applied
}

/// Unauthenticated, wrong-token, oversized, NaN-carrying and wrong-dim
/// pushes to a real server: each gets its status, and the table is exactly
/// as it was.
#[tokio::test]
async fn hostile_requests_get_their_status_and_leave_the_table_unchanged() {
    use ps_common::pb::{self, parameter_server_client::ParameterServerClient};
    use ps_common::{InitializerSpec, OptimizerSpec, TableKind, TableSpec, wire};
    use tonic::Code;

    const TOKEN: &str = "hostile-test-token-0123";
    let dir = temp_dir("hostile");
    let token = dir.join("token");
    std::fs::write(&token, TOKEN).unwrap();
    let server = Server::start_with(
        0,
        1,
        &[
            "--auth-token-file",
            token.to_str().unwrap(),
            "--max-request-bytes",
            "4096",
        ],
    );
    let mut client = ParameterServerClient::connect(format!("http://{}", server.addr))
        .await
        .unwrap();
    /// `message` carrying `token`, if any, as the servers' peers send it.
    fn with_token<T>(token: Option<&str>, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Some(t) = token {
            ps_server::auth::Auth::bearer(t).attach(&mut request);
        }
        request
    }
    let spec = TableSpec {
        name: "emb".into(),
        kind: TableKind::Sparse,
        dim: 2,
        initializer: InitializerSpec::Constant { value: 0.5 },
        optimizer: OptimizerSpec::Adagrad {
            lr: 0.1,
            initial_accumulator: 0.1,
            eps: 1e-8,
        },
        seed: 0,
    };
    let create = pb::CreateTableRequest {
        spec: Some((&spec).into()),
    };
    client
        .create_table(with_token(Some(TOKEN), create))
        .await
        .unwrap();
    let push = |keys: Vec<u64>, grads: &[f32]| pb::PushRequest {
        table: "emb".into(),
        keys,
        gradients: wire::encode_f32s(grads),
        ..Default::default()
    };
    let keys: Vec<u64> = (0..8).collect();
    client
        .push(with_token(Some(TOKEN), push(keys.clone(), &[1.0; 16])))
        .await
        .unwrap();
    let read = {
        let client = client.clone();
        let keys = keys.clone();
        move || {
            let (mut client, keys) = (client.clone(), keys.clone());
            async move {
                let pull = pb::PullRequest {
                    table: "emb".into(),
                    keys,
                    ..Default::default()
                };
                let values = client
                    .pull(with_token(Some(TOKEN), pull))
                    .await
                    .unwrap()
                    .into_inner()
                    .values;
                let stats = client
                    .stats(with_token(Some(TOKEN), pb::StatsRequest {}))
                    .await
                    .unwrap()
                    .into_inner();
                (
                    values,
                    stats.tables,
                    stats.requests.unwrap().updates_applied,
                )
            }
        }
    };
    let before = read().await;
    let cases = [
        (
            "no token",
            None,
            push(vec![1], &[1.0, 1.0]),
            Code::Unauthenticated,
        ),
        (
            "wrong token",
            Some("not-the-token-0123456"),
            push(vec![1], &[1.0, 1.0]),
            Code::Unauthenticated,
        ),
        (
            "oversized",
            Some(TOKEN),
            push((0..2000).collect(), &[1.0; 4000]),
            Code::ResourceExhausted,
        ),
        (
            "NaN gradient",
            Some(TOKEN),
            push(vec![1, 2], &[1.0, 1.0, f32::NAN, 1.0]),
            Code::InvalidArgument,
        ),
        (
            "wrong dim",
            Some(TOKEN),
            push(vec![1, 2], &[1.0, 1.0, 1.0]),
            Code::InvalidArgument,
        ),
    ];
    for (what, token, request, code) in cases {
        let status = client.push(with_token(token, request)).await.unwrap_err();
        assert_eq!(status.code(), code, "{what}: {status:?}");
        assert!(
            !status.message().is_empty(),
            "{what}: a status says what was wrong"
        );
        assert_eq!(read().await, before, "{what} changed the table");
    }
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
