//! Online serving: predictions equal `ps-worker eval`'s for the same
//! checkpoint (from a bundle and from live servers), a read replica equals
//! its primary row for row and serves while workers train, a push shows in
//! predictions within the freshness bound, and bad requests get their status.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::workers::*;
use common::{Server, peer_token_file, stats_of, temp_dir};
use ps_common::config::{DataSource, JobConfig};
use ps_worker::serving::bundle::{Bundle, BundleRows};
use ps_worker::serving::{self, Instance, Predictor, Rows, ServeConfig, ServeMetrics};
use ps_worker::{ClientConfig, LocalCluster, PsClient};

/// One HTTP/1.1 exchange on a fresh connection: the status and the body.
fn http(addr: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    let status = reply
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = reply
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

fn predict(addr: &str, model: &str, instances: &serde_json::Value) -> (u16, serde_json::Value) {
    let (status, body) = http(
        addr,
        "POST",
        &format!("/v1/models/{model}:predict"),
        &serde_json::json!({ "instances": instances }).to_string(),
    );
    (status, serde_json::from_str(&body).unwrap_or_default())
}

/// The FM example for one epoch, writing checkpoint `best`; its text.
fn fm_job() -> (JobConfig, String) {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/a9a-fm.toml"),
    )
    .unwrap()
    .replace("epochs = 4", "epochs = 1\nbest_checkpoint = \"best\"");
    (JobConfig::from_toml(&text, Path::new(".")).unwrap(), text)
}

/// The test lines of a9a without their labels.
fn test_instances(n: usize) -> Vec<Instance> {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/a9a/a9a.test.libsvm"),
    )
    .unwrap();
    text.lines()
        .take(n)
        .map(|l| Instance::Line(l.split_once(' ').unwrap().1.to_string()))
        .collect()
}

fn predictions(
    runtime: &tokio::runtime::Runtime,
    job: &JobConfig,
    rows: Rows,
    instances: &[Instance],
) -> Vec<f32> {
    runtime.block_on(async {
        let predictor = Predictor::start(
            job,
            rows,
            &ServeConfig::new("m"),
            Arc::new(ServeMetrics::default()),
        );
        let mut out = Vec::new();
        for chunk in instances.chunks(997) {
            for p in predictor.predict("m", chunk).await.unwrap() {
                out.extend(p);
            }
        }
        out
    })
}

/// `job`'s model from `checkpoint` on in-process shards: the shards, what
/// `ps-worker eval` predicts for `data` (a source as a job names it:
/// `builtin:NAME` or a path) (probabilities, labels), and those shards'
/// rows for serving.
fn eval_and_live_rows(
    runtime: &tokio::runtime::Runtime,
    job: &JobConfig,
    checkpoint: &Path,
    data: &str,
) -> (LocalCluster, Vec<f32>, Vec<f32>, Rows) {
    let cluster = runtime
        .block_on(LocalCluster::restore(checkpoint, Default::default()))
        .unwrap();
    let eval_client = runtime
        .block_on(async {
            let c = PsClient::connect(cluster.addrs(), &ClientConfig::default()).await?;
            for spec in job.table_specs() {
                let restored = cluster.shard(0).table(&spec.name)?.spec().clone();
                c.create_table(&restored).await?;
            }
            Ok::<_, ps_common::PsError>(c)
        })
        .unwrap();
    let source = DataSource::from(data.to_string());
    let (probs, labels) =
        ps_worker::trainer::predict(runtime.handle(), &eval_client, job, &source).unwrap();
    let rows = runtime
        .block_on(serving::server_rows(
            job,
            cluster.addrs(),
            &ClientConfig::default(),
            None,
        ))
        .unwrap();
    (cluster, probs, labels, rows)
}

/// Serves `job`'s model (named `m`) from `rows` and checks that each of
/// `instances` is answered with a distribution over `classes` classes,
/// equal to `eval`'s; the predictor.
async fn served_distributions_equal_eval(
    job: &JobConfig,
    rows: Rows,
    instances: &[Instance],
    classes: usize,
    eval: &[f32],
    what: &str,
) -> Predictor {
    let predictor = Predictor::start(
        job,
        rows,
        &ServeConfig::new("m"),
        Arc::new(ServeMetrics::default()),
    );
    assert_eq!(predictor.outputs(), classes, "{what}");
    let served = predictor.predict("m", instances).await.unwrap();
    for dist in &served {
        assert_eq!(dist.len(), classes, "{what}");
        assert!(
            (dist.iter().sum::<f32>() - 1.0).abs() < 1e-5,
            "{what}: {dist:?}"
        );
    }
    let flat: Vec<f32> = served.into_iter().flatten().collect();
    assert_close(&flat, eval, what);
    predictor
}

/// The job in `text`, trained by one worker on 2 in-process shards
/// writing their checkpoints into `dir`.
fn trained(text: &str, dir: &Path) -> JobConfig {
    let job = JobConfig::from_toml(text, Path::new(".")).unwrap();
    let client = ps_worker::job::client_config(&job, Duration::from_secs(10));
    ps_worker::job::run_local(&job, 2, 1, &client, Some(dir.to_path_buf())).unwrap();
    job
}

fn assert_close(served: &[f32], eval: &[f32], what: &str) {
    assert_eq!(served.len(), eval.len(), "{what}");
    let worst = served
        .iter()
        .zip(eval)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(worst <= 1e-6, "{what}: largest difference {worst}");
}

#[test]
fn served_predictions_equal_eval_for_the_same_checkpoint_from_a_bundle_and_from_live_servers() {
    let dir = temp_dir("serve-eval");
    let (job, text) = fm_job();
    let telemetry = ps_worker::telemetry::Telemetry::default();
    let client = ps_worker::job::client_config(&job, Duration::from_secs(10));
    ps_worker::job::run_local_reporting(&job, 2, 1, &client, Some(dir.clone()), &telemetry)
        .unwrap();
    let checkpoint = dir.join("best");
    let runtime = tokio::runtime::Runtime::new().unwrap();

    // What `ps-worker eval` computes: the model on shards restored from the
    // checkpoint; and live servers (here, the same restored shards).
    let (cluster, eval, _, live) =
        eval_and_live_rows(&runtime, &job, &checkpoint, "builtin:a9a/test");
    let instances = test_instances(eval.len());
    assert_eq!(instances.len(), 16_281);
    assert_close(
        &predictions(&runtime, &job, live, &instances),
        &eval,
        "live servers",
    );

    // A bundle exported from the checkpoint, served without servers.
    let path = dir.join("model.bundle");
    let bundle = Bundle::export(&job, &text, "m", &checkpoint).unwrap();
    let names: Vec<String> = bundle
        .tables
        .iter()
        .map(|t| t.keys.len().to_string())
        .collect();
    assert_eq!(
        bundle.tables.len(),
        3,
        "weights, factors and bias only: {names:?}"
    );
    bundle.write(&path).unwrap();
    let read = Bundle::read(&path).unwrap();
    let from_bundle = Rows::Bundle(BundleRows::new(read).unwrap());
    assert_close(
        &predictions(&runtime, &job, from_bundle, &instances),
        &eval,
        "bundle",
    );

    // A damaged bundle is refused, naming the file.
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&path, bytes).unwrap();
    let err = Bundle::read(&path).unwrap_err().to_string();
    assert!(
        err.contains("model.bundle") && err.contains("checksum"),
        "{err}"
    );

    runtime.block_on(cluster.shutdown()).unwrap();
    std::fs::remove_dir_all(&dir).ok();
}

/// An image model is served like the others: each instance, a line of
/// pixel values, gets its distribution over the classes, equal to what
/// `ps-worker eval` computes from the same checkpoint; a line of the wrong
/// length is a bad request naming the instance.
#[test]
fn a_served_image_model_answers_each_instance_with_its_distribution_over_the_classes() {
    let dir = temp_dir("serve-images");
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/digits-resnet.toml"),
    )
    .unwrap()
    .replace("epochs = 12", "epochs = 2\nbest_checkpoint = \"best\"");
    let job = trained(&text, &dir);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (cluster, eval, labels, rows) =
        eval_and_live_rows(&runtime, &job, &dir.join("best"), "builtin:digits/test");
    assert_eq!((eval.len(), labels.len()), (359 * 10, 359));
    let lines = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/digits/digits.test.csv"),
    )
    .unwrap();
    let instances: Vec<Instance> = lines
        .lines()
        .map(|l| Instance::Line(l.split_once(',').unwrap().1.to_string()))
        .collect();
    runtime.block_on(async {
        let predictor =
            served_distributions_equal_eval(&job, rows, &instances, 10, &eval, "image model").await;
        let short = [Instance::Line("0,1,2".into())];
        let err = predictor
            .predict("m", &short)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("instance 0") && err.contains("3 pixel values"),
            "{err}"
        );
    });
    runtime.block_on(cluster.shutdown()).unwrap();
    std::fs::remove_dir_all(&dir).ok();
}

/// A multi-class DNN over sparse features is served like the image
/// models: each libffm line without its label gets its distribution over
/// the classes, equal to what `ps-worker eval` computes from the same
/// checkpoint. So is a multi-class FM (its per-class pairwise term reads
/// a generated table).
#[test]
fn a_served_multiclass_dnn_answers_each_line_with_its_distribution_over_the_classes() {
    let example = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/multiclass-dnn.toml"),
    )
    .unwrap();
    let fm = format!(
        "{}\n[tables.weights]\nkind = \"sparse\"\ndim = 5\ninitializer = {{ kind = \"zeros\" }}\n\
         optimizer = {{ kind = \"adagrad\", lr = 0.1 }}\n",
        example
            .replace("kind = \"dnn\"", "kind = \"fm\"")
            .lines()
            .filter(|l| !l.starts_with("mlp = "))
            .collect::<Vec<_>>()
            .join("\n")
    );
    served_multiclass(&example, "multi-class dnn");
    served_multiclass(&fm, "multi-class fm");
}

/// Trains the multi-class job `example` on generated classes and checks
/// its served distributions against eval's.
fn served_multiclass(example: &str, what: &str) {
    let dir = temp_dir("serve-classes");
    let (train, test) = (dir.join("train.ffm"), dir.join("test.ffm"));
    for (path, rows, seed) in [(&train, 5_000, 1), (&test, 300, 2)] {
        let mut out = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
        ps_worker::synthetic::write_classes(&mut out, rows, seed).unwrap();
        out.flush().unwrap();
    }
    let text = example
        .replace("../target/classes/train.ffm", &train.display().to_string())
        .replace("../target/classes/test.ffm", &test.display().to_string())
        .replace("epochs = 4", "epochs = 1\nbest_checkpoint = \"best\"");
    let job = trained(&text, &dir);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (cluster, eval, labels, rows) = eval_and_live_rows(
        &runtime,
        &job,
        &dir.join("best"),
        &test.display().to_string(),
    );
    assert_eq!((eval.len(), labels.len()), (300 * 5, 300));
    let instances: Vec<Instance> = std::fs::read_to_string(&test)
        .unwrap()
        .lines()
        .map(|l| Instance::Line(l.split_once(' ').unwrap().1.to_string()))
        .collect();
    runtime.block_on(served_distributions_equal_eval(
        &job, rows, &instances, 5, &eval, what,
    ));
    runtime.block_on(cluster.shutdown()).unwrap();
    std::fs::remove_dir_all(&dir).ok();
}

/// A `ps-worker serve` process; its REST and gRPC addresses.
struct Serve {
    child: Child,
    http: String,
    grpc: String,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(args: &[&str]) -> Serve {
    let mut child = worker(
        &[
            &[
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--grpc-listen",
                "127.0.0.1:0",
            ],
            args,
        ]
        .concat(),
    )
    .stdout(Stdio::piped())
    .spawn()
    .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut read = || {
        let mut line = String::new();
        assert!(stdout.read_line(&mut line).unwrap() > 0, "serve exited");
        line.trim().to_string()
    };
    let http = read().rsplit_once("http://").unwrap().1.to_string();
    let grpc = read().strip_prefix("grpc on ").unwrap().to_string();
    Serve { child, http, grpc }
}

fn rows_of(addr: &str, keys: &[u64]) -> Vec<f32> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let client = PsClient::connect(&[addr.to_string()], &ClientConfig::default())
            .await
            .unwrap();
        let job = JobConfig::from_toml(ps_worker::job::DEFAULT_JOB, Path::new(".")).unwrap();
        let mut rows = Vec::new();
        for spec in job.table_specs() {
            client.register_table(&spec).unwrap();
            let keys: Vec<u64> = if spec.name == "bias" {
                vec![0]
            } else {
                keys.to_vec()
            };
            rows.extend(client.pull(&spec.name, &keys).await.unwrap());
        }
        rows
    })
}

#[test]
fn a_follower_serves_while_workers_train_equals_its_primary_and_shows_a_push_within_the_bound() {
    let dir = temp_dir("follow");
    let job = a9a_job(&dir);
    let primary = Server::primary(&dir, 0, 1);
    let follower = Server::start_with(
        0,
        1,
        &[
            "--peer-token-file",
            &peer_token_file(&dir),
            "--follow",
            &primary.addr,
        ],
    );
    let served = serve(&[
        "--config",
        job.to_str().unwrap(),
        "--servers",
        &follower.addr,
        "--model-name",
        "ctr",
        "--cache-freshness-ms",
        "50",
    ]);
    let reports: Vec<PathBuf> = (0..2).map(|r| dir.join(format!("report-{r}"))).collect();
    let workers: Vec<Child> = (0..2)
        .map(|r| spawn_worker(&job, &primary.addr, r, 2, &reports[r]))
        .collect();

    // Serving goes on while both workers train, and no request fails once
    // the workers have created the tables (before, the rows are unavailable).
    let instances = serde_json::json!(["3:1 11:1 14:1 19:1 39:1", {"ids": [5, 7, 42]}]);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = predict(&served.http, "ctr", &instances);
        if status == 200 {
            break;
        }
        assert_eq!(status, 503, "{body}");
        assert!(body.to_string().contains("does not exist"), "{body}");
        assert!(
            Instant::now() < deadline,
            "the tables never appeared: {body}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (mut requests, mut changes, mut last) = (0, 0, None);
    let mut workers = workers;
    while workers.iter_mut().any(|w| w.try_wait().unwrap().is_none()) {
        let (status, body) = predict(&served.http, "ctr", &instances);
        assert_eq!(
            status, 200,
            "a served request failed while training: {body}"
        );
        let p = body["predictions"].clone();
        assert_eq!(p.as_array().unwrap().len(), 2, "{body}");
        if last.as_ref().is_some_and(|l| *l != p) {
            changes += 1;
        }
        last = Some(p);
        requests += 1;
    }
    for (w, report) in workers.into_iter().zip(&reports) {
        let r = report_of(w, report);
        assert!(r["val_auc"].as_f64().unwrap() > 0.89, "{r}");
    }
    assert!(
        requests > 10 && changes > 0,
        "{requests} requests, {changes} saw training move"
    );

    // Once drained, the follower holds exactly the primary's rows (a9a's
    // ids are 1..=123: a pull of another id would create a row on the
    // primary, one the follower answers without storing).
    let keys: Vec<u64> = (1..=123).collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    let want = rows_of(&primary.addr, &keys);
    while rows_of(&follower.addr, &keys) != want {
        assert!(Instant::now() < deadline, "the follower never caught up");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (p, f) = (stats_of(&primary.addr), stats_of(&follower.addr));
    let rows = |s: &ps_common::pb::StatsResponse, t: &str| {
        s.tables.iter().find(|x| x.name == t).map(|x| x.rows)
    };
    assert_eq!(rows(&p, "weights"), rows(&f, "weights"));

    // Freshness: a write acknowledged on the primary shows in a prediction.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let client = runtime
        .block_on(PsClient::connect(
            std::slice::from_ref(&primary.addr),
            &ClientConfig::default(),
        ))
        .unwrap();
    for spec in JobConfig::from_toml(ps_worker::job::DEFAULT_JOB, Path::new("."))
        .unwrap()
        .table_specs()
    {
        client.register_table(&spec).unwrap();
    }
    let probe = serde_json::json!(["77:1"]);
    let before = predict(&served.http, "ctr", &probe).1["predictions"][0]
        .as_f64()
        .unwrap();
    runtime
        .block_on(client.assign("weights", &[77], &[6.0]))
        .unwrap();
    let acknowledged = Instant::now();
    loop {
        let now = predict(&served.http, "ctr", &probe).1["predictions"][0]
            .as_f64()
            .unwrap();
        if now > before + 0.1 {
            break;
        }
        assert!(
            acknowledged.elapsed() < Duration::from_secs(5),
            "the push did not show in 5 s"
        );
    }
    let freshness = acknowledged.elapsed();
    eprintln!(
        "freshness: a push acknowledged on the primary showed in a prediction after {freshness:?}"
    );
    assert!(freshness < Duration::from_secs(2), "{freshness:?}");

    // Bad requests get 400 with a message that says what was wrong.
    for (path, body, says) in [
        (
            "/v1/models/other:predict",
            r#"{"instances": ["3:1"]}"#,
            "unknown model",
        ),
        ("/v1/models/ctr:predict", r#"{"instances": ["#, "not JSON"),
        ("/v1/models/ctr:predict", r#"{"rows": []}"#, "unknown key"),
        (
            "/v1/models/ctr:predict",
            r#"{"instances": ["3:1 x:2"]}"#,
            "instance 0",
        ),
        (
            "/v1/models/ctr:predict",
            r#"{"instances": [{"ids": [1], "values": [1, 2]}]}"#,
            "values for",
        ),
    ] {
        let (status, answer) = http(&served.http, "POST", path, body);
        assert_eq!(status, 400, "{path} {body}: {answer}");
        assert!(answer.contains(says), "{body}: {answer}");
    }
    let (status, answer) = http(&served.http, "GET", "/v1/models/ctr", "");
    assert_eq!(status, 200, "{answer}");
    assert!(answer.contains("AVAILABLE"), "{answer}");
    let (_, metrics) = http(&served.http, "GET", "/metrics", "");
    assert!(
        metrics.contains("ps_serve_request_duration_seconds_bucket{")
            && metrics.contains("api=\"http\""),
        "{metrics}"
    );

    // The gRPC twin answers the same, and refuses a bad instance.
    let grpc = runtime.block_on(async {
        let mut c = ps_common::pb::predictor_client::PredictorClient::connect(format!(
            "http://{}",
            served.grpc
        ))
        .await
        .unwrap();
        let line = |l: &str| ps_common::pb::Instance {
            features: Some(ps_common::pb::instance::Features::Line(l.into())),
        };
        let ok = c
            .predict(ps_common::pb::PredictRequest {
                model: "ctr".into(),
                instances: vec![line("77:1")],
            })
            .await
            .unwrap()
            .into_inner();
        let bad = c
            .predict(ps_common::pb::PredictRequest {
                model: "ctr".into(),
                instances: vec![line("77")],
            })
            .await
            .unwrap_err();
        (ok, bad)
    });
    assert_eq!(grpc.0.predictions.len(), 1);
    assert!(grpc.0.predictions[0].probabilities[0] > before as f32 + 0.1);
    assert_eq!(grpc.1.code(), tonic::Code::InvalidArgument, "{:?}", grpc.1);

    // A follower takes no writes, and is never promoted.
    let err = runtime
        .block_on(async {
            let c = PsClient::connect(
                std::slice::from_ref(&follower.addr),
                &ClientConfig::default(),
            )
            .await?;
            for spec in JobConfig::from_toml(ps_worker::job::DEFAULT_JOB, Path::new("."))
                .unwrap()
                .table_specs()
            {
                c.register_table(&spec)?;
            }
            c.assign("weights", &[1], &[1.0]).await
        })
        .unwrap_err()
        .to_string();
    assert!(err.contains("read replica"), "{err}");
    let promote = runtime.block_on(async {
        let mut c = ps_common::pb::parameter_server_client::ParameterServerClient::connect(
            format!("http://{}", follower.addr),
        )
        .await
        .unwrap();
        let described = c
            .describe(ps_common::pb::DescribeRequest {})
            .await
            .unwrap()
            .into_inner();
        let refused = c
            .promote(ps_common::pb::PromoteRequest {})
            .await
            .unwrap_err();
        (described, refused)
    });
    assert_eq!(promote.0.role, "follower");
    assert_eq!(promote.0.primary, primary.addr);
    assert!(
        (0.0..5.0).contains(&promote.0.lag_seconds),
        "lag {}",
        promote.0.lag_seconds
    );
    assert_eq!(promote.1.code(), tonic::Code::FailedPrecondition);
    assert!(
        promote.1.message().contains("never promoted"),
        "{:?}",
        promote.1
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_follower_given_the_primary_and_its_backup_follows_the_backup_after_a_failover() {
    let dir = temp_dir("follow-failover");
    let mut primary = Server::primary(&dir, 0, 1);
    let backup = Server::backup_of(&dir, &primary, 0, 1);
    let both = format!("{},{}", primary.addr, backup.addr);
    let follower = Server::start_with(
        0,
        1,
        &[
            "--peer-token-file",
            &peer_token_file(&dir),
            "--follow",
            &both,
        ],
    );
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let config = ClientConfig {
        backups: vec![backup.addr.clone()],
        ..ClientConfig::default()
    };
    let client = runtime
        .block_on(async {
            let c = PsClient::connect(std::slice::from_ref(&primary.addr), &config).await?;
            c.create_table(&common::counting_table("t", 1)).await?;
            c.assign("t", &[1], &[1.0]).await?;
            Ok::<_, ps_common::PsError>(c)
        })
        .unwrap();
    let value_on_follower = |key: u64| -> Option<f32> {
        runtime.block_on(async {
            let c = PsClient::connect(
                std::slice::from_ref(&follower.addr),
                &ClientConfig::default(),
            )
            .await
            .ok()?;
            c.register_table(&common::counting_table("t", 1)).ok()?;
            c.pull("t", &[key]).await.ok()?.first().copied()
        })
    };
    let wait_for = |key: u64, want: f32| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while value_on_follower(key) != Some(want) {
            assert!(
                Instant::now() < deadline,
                "the follower never showed row {key} = {want}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    wait_for(1, 1.0);
    // The primary dies; the worker fails over to the backup and writes there.
    primary.child.kill().unwrap();
    primary.child.wait().unwrap();
    runtime.block_on(client.assign("t", &[2], &[2.0])).unwrap();
    wait_for(2, 2.0);
    wait_for(1, 1.0);
    std::fs::remove_dir_all(&dir).ok();
}

/// The embedded LR job served from a bundle (weight 1 for id 3, bias 0,
/// so `"3:1"` predicts sigmoid(1)) with `config`, on free ports for REST
/// and gRPC, with `tls`.
fn serve_lr(
    runtime: &tokio::runtime::Runtime,
    config: ServeConfig,
    tls: Option<serving::ServingTls>,
) -> serving::Listening {
    use prost::Message;
    let job = JobConfig::from_toml(ps_worker::job::DEFAULT_JOB, Path::new(".")).unwrap();
    let tables = job
        .table_specs()
        .iter()
        .map(|spec| serving::bundle::BundleTable {
            spec: ps_common::pb::TableSpec::from(spec).encode_to_vec(),
            keys: if spec.name == "bias" {
                vec![0]
            } else {
                vec![3]
            },
            weights: if spec.name == "bias" {
                vec![0.0]
            } else {
                vec![1.0]
            },
        })
        .collect();
    let bundle = Bundle {
        name: "lr".into(),
        job: ps_worker::job::DEFAULT_JOB.into(),
        tables,
    };
    runtime.block_on(async {
        let predictor = Predictor::start(
            &job,
            Rows::Bundle(BundleRows::new(bundle).unwrap()),
            &config,
            Arc::new(ServeMetrics::default()),
        );
        serving::listen(
            predictor,
            "127.0.0.1:0".parse().unwrap(),
            Some("127.0.0.1:0".parse().unwrap()),
            Default::default(),
            tls,
        )
        .await
        .unwrap()
    })
}

#[test]
fn with_a_serving_token_only_requests_carrying_it_are_answered() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let token = "a-serving-token-of-the-test";
    let config = ServeConfig {
        token: Some(token.into()),
        ..ServeConfig::new("lr")
    };
    let listening = serve_lr(&runtime, config, None);
    let addr = listening.http.to_string();
    let post = |auth: Option<&str>| {
        let mut stream = std::net::TcpStream::connect(&addr).unwrap();
        let body = r#"{"instances": ["3:1"]}"#;
        let header = auth.map_or(String::new(), |a| format!("authorization: {a}\r\n"));
        write!(
            stream,
            "POST /v1/models/lr:predict HTTP/1.1\r\nhost: x\r\nconnection: close\r\n{header}content-length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut reply = String::new();
        stream.read_to_string(&mut reply).unwrap();
        reply
    };
    let missing = post(None);
    assert!(missing.starts_with("HTTP/1.1 401"), "{missing}");
    assert!(missing.contains("--predict-token-file"), "{missing}");
    assert!(post(Some("Bearer not-the-token-at-all")).starts_with("HTTP/1.1 401"));
    let ok = post(Some(&format!("Bearer {token}")));
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    // sigmoid(0 + 1 * 1)
    assert!(ok.contains("0.731058"), "{ok}");
    let (status, _) = http(&addr, "GET", "/metrics", "");
    assert_eq!(status, 200, "/metrics stays open");
    let (status, body) = http(&addr, "GET", "/healthz", "");
    assert_eq!(
        (status, body.as_str()),
        (200, "ok\n"),
        "/healthz stays open"
    );
    let (status, _) = http(&addr, "GET", "/v1/models/lr", "");
    assert_eq!(status, 401, "the model's status needs the token");
    let grpc = listening.grpc.unwrap();
    let refused = runtime.block_on(async {
        let mut c =
            ps_common::pb::predictor_client::PredictorClient::connect(format!("http://{grpc}"))
                .await
                .unwrap();
        c.predict(ps_common::pb::PredictRequest {
            model: "lr".into(),
            instances: Vec::new(),
        })
        .await
        .unwrap_err()
    });
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
}

/// One HTTPS exchange with the TLS client `tls` (trusting a CA, perhaps
/// presenting a certificate): the reply, or the error that ended it.
fn https_predict(
    runtime: &tokio::runtime::Runtime,
    addr: std::net::SocketAddr,
    tls: tokio_rustls::rustls::ClientConfig,
) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    runtime.block_on(async {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        let name = tokio_rustls::rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
            .connect(name, stream)
            .await?;
        let body = r#"{"instances": ["3:1"]}"#;
        let request = format!(
            "POST /v1/models/lr:predict HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).await?;
        let mut reply = String::new();
        stream.read_to_string(&mut reply).await?;
        Ok(reply)
    })
}

/// A TLS client trusting `ca`, presenting `identity` (certificate, key).
fn tls_client(ca: &Path, identity: Option<&[PathBuf; 2]>) -> tokio_rustls::rustls::ClientConfig {
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let builder = tokio_rustls::rustls::ClientConfig::builder_with_provider(Arc::new(
        tokio_rustls::rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    match identity {
        Some([cert, key]) => builder
            .with_client_auth_cert(
                CertificateDer::pem_file_iter(cert)
                    .unwrap()
                    .map(Result::unwrap)
                    .collect(),
                PrivateKeyDer::from_pem_file(key).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    }
}

#[test]
fn over_tls_predictions_reach_only_clients_that_speak_it_and_with_mutual_tls_only_certified_ones() {
    let dir = temp_dir("serving-tls");
    let (ours, other) = (
        common::pki::pki(&dir, "ours"),
        common::pki::pki(&dir, "other"),
    );
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let files = |require: bool| ps_common::tls::TlsFiles {
        cert: Some(ours.server[0].clone()),
        key: Some(ours.server[1].clone()),
        ca: require.then(|| ours.ca.clone()),
    };
    let sigmoid_1 = "0.731058";

    // TLS only: an HTTPS client trusting our CA is answered; plain HTTP and
    // a client trusting another CA are not.
    let tls = serving::ServingTls::from_files(&files(false), false).unwrap();
    let listening = serve_lr(&runtime, ServeConfig::new("lr"), tls);
    let ok = https_predict(&runtime, listening.http, tls_client(&ours.ca, None)).unwrap();
    assert!(
        ok.starts_with("HTTP/1.1 200") && ok.contains(sigmoid_1),
        "{ok}"
    );
    let plain = {
        let mut stream = std::net::TcpStream::connect(listening.http).unwrap();
        // The endpoint closes on a request that is no TLS handshake: the
        // write or the read may end in a reset.
        let _ = stream.write_all(b"GET /v1/models/lr HTTP/1.1\r\nhost: x\r\n\r\n");
        let mut reply = String::new();
        let _ = stream.read_to_string(&mut reply);
        reply
    };
    assert!(
        !plain.contains("HTTP/1.1"),
        "plain HTTP got an answer: {plain}"
    );
    assert!(https_predict(&runtime, listening.http, tls_client(&other.ca, None)).is_err());
    let grpc = |listening: &serving::Listening, identity: Option<&[PathBuf; 2]>| {
        let files = ps_common::tls::TlsFiles {
            ca: Some(ours.ca.clone()),
            cert: identity.map(|i| i[0].clone()),
            key: identity.map(|i| i[1].clone()),
        };
        let addr = format!("localhost:{}", listening.grpc.unwrap().port());
        runtime.block_on(async {
            let channel = ps_common::tls::endpoint(&addr, files.client().unwrap())
                .unwrap()
                .connect()
                .await
                .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
            let request = ps_common::pb::PredictRequest {
                model: "lr".into(),
                instances: vec![ps_common::pb::Instance {
                    features: Some(ps_common::pb::instance::Features::Line("3:1".into())),
                }],
            };
            ps_common::pb::predictor_client::PredictorClient::new(channel)
                .predict(request)
                .await
        })
    };
    let answer = grpc(&listening, None).unwrap().into_inner();
    assert!(
        (answer.predictions[0].probabilities[0] - 0.731_058_6).abs() < 1e-6,
        "{answer:?}"
    );
    drop(listening);

    // Mutual TLS: only a client with a certificate of our CA gets in.
    let tls = serving::ServingTls::from_files(&files(true), true).unwrap();
    let listening = serve_lr(&runtime, ServeConfig::new("lr"), tls);
    let certified = https_predict(
        &runtime,
        listening.http,
        tls_client(&ours.ca, Some(&ours.client)),
    )
    .unwrap();
    assert!(certified.contains(sigmoid_1), "{certified}");
    for refused in [
        https_predict(&runtime, listening.http, tls_client(&ours.ca, None)),
        https_predict(
            &runtime,
            listening.http,
            tls_client(&ours.ca, Some(&other.client)),
        ),
    ] {
        assert!(
            refused
                .as_ref()
                .map_or(true, |reply| !reply.contains("200")),
            "{refused:?}"
        );
    }
    assert!(grpc(&listening, Some(&ours.client)).is_ok());
    assert!(grpc(&listening, None).is_err());
    assert!(grpc(&listening, Some(&other.client)).is_err());

    // Files that do not fit are refused naming the flag.
    let err = serving::ServingTls::from_files(
        &ps_common::tls::TlsFiles {
            cert: Some(ours.server[0].clone()),
            ..Default::default()
        },
        false,
    )
    .unwrap_err();
    assert!(err.to_string().contains("--predict-tls-key"), "{err}");
    let err = serving::ServingTls::from_files(&files(false), true).unwrap_err();
    assert!(err.to_string().contains("--predict-tls-ca"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}
