//! `ps-bench serve`: online predictions against a read replica while a
//! worker trains, all in this process over loopback.
//!
//! A primary shard and its follower (`ps-server --follow`) hold the ctr26
//! model; a worker trains it on ctr26 batches against the primary the whole
//! time; `ps-worker serve`'s predictor reads the follower through its row
//! cache and answers REST on loopback. Client threads send requests of 1
//! and of 256 instances over keep-alive connections for a fixed time each:
//! predictions/s and p50/p99 latency. Freshness: a row is set on the
//! primary (a fresh id's embedding), and from the moment the write is
//! acknowledged a client asks for the prediction of an instance holding
//! that id until it changes; repeated, p50/p99/max.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use ps_common::auth::read_token_file;
use ps_common::config::JobConfig;
use ps_server::auth::Auth;
use ps_server::{ServerConfig, Shard};
use ps_worker::backend::cpu::CpuBackend;
use ps_worker::model::{Mode, Model};
use ps_worker::serving::rows::FreshRows;
use ps_worker::serving::{self, Predictor, ServeConfig, ServeMetrics};
use ps_worker::{ClientConfig, PsClient};
use serde::Serialize;

use crate::ctr26::{FIELDS, Generator, ROWS};

/// What is measured, and for how long.
#[derive(Debug, Clone)]
pub struct Setup {
    /// Seconds each load phase runs.
    pub seconds: f64,
    /// Client threads per phase.
    pub clients: usize,
    /// Freshness probes.
    pub probes: usize,
    /// The row cache's freshness bound.
    pub cache_freshness: Duration,
    /// Examples per training step.
    pub train_batch: usize,
    /// Train while serving (false: serving alone, for comparison).
    pub train: bool,
    /// How long the predictor waits to batch requests together.
    pub batch_wait: Duration,
}

/// One load phase.
#[derive(Debug, Clone, Serialize)]
pub struct Phase {
    /// Instances per request.
    pub batch: usize,
    /// Requests answered.
    pub requests: u64,
    /// Instances predicted per second.
    pub predictions_per_sec: f64,
    /// Median request latency, ms.
    pub p50_ms: f64,
    /// 99th percentile request latency, ms.
    pub p99_ms: f64,
    /// Requests that failed.
    pub errors: u64,
}

/// The whole measurement.
#[derive(Debug, Clone, Serialize)]
pub struct Measured {
    /// Requests of one instance.
    pub batch_1: Phase,
    /// Requests of 256 instances.
    pub batch_256: Phase,
    /// From an acknowledged write on the primary to a prediction that
    /// reflects it, ms.
    pub freshness_p50_ms: f64,
    /// 99th percentile of the same.
    pub freshness_p99_ms: f64,
    /// Largest.
    pub freshness_max_ms: f64,
    /// The row cache's freshness bound, ms.
    pub cache_freshness_ms: u64,
    /// Training throughput meanwhile (samples/s).
    pub training_samples_per_sec: f64,
}

const PEER_TOKEN: &str = "ps-bench-serve-peer-token";

/// Runs the measurement.
pub fn run(job: &JobConfig, setup: &Setup) -> anyhow::Result<Measured> {
    let runtime = tokio::runtime::Runtime::new().context("cannot start the runtime")?;
    let (primary, follower) = runtime.block_on(start_shards())?;
    let trainer = runtime.block_on(async {
        let client =
            PsClient::connect(std::slice::from_ref(&primary), &ClientConfig::default()).await?;
        for spec in job.table_specs() {
            client.create_table(&spec).await?;
        }
        Ok::<_, ps_common::PsError>(client)
    })?;
    let stop = Arc::new(AtomicBool::new(false));
    let trained = Arc::new(AtomicU64::new(0));
    let training = setup.train.then(|| {
        let (handle, client, stop, trained) = (
            runtime.handle().clone(),
            trainer.clone(),
            Arc::clone(&stop),
            Arc::clone(&trained),
        );
        let (model, batch) = (Model::from_job(job), setup.train_batch);
        std::thread::spawn(move || train(&handle, &client, &model, batch, &stop, &trained))
    });
    // Serving has its own runtime, as `ps-worker serve` has its own
    // process: its requests never queue behind the trainer's or the
    // shards' tasks on one runtime's threads.
    let serving_runtime = tokio::runtime::Runtime::new().context("cannot start the runtime")?;
    let cache = FreshRows::new(setup.cache_freshness, 1 << 20);
    let rows = serving_runtime.block_on(serving::server_rows(
        job,
        std::slice::from_ref(&follower),
        &ClientConfig::default(),
        Some(cache),
    ))?;
    let listening = serving_runtime.block_on(async {
        let predictor = Predictor::start(
            job,
            rows,
            &ServeConfig {
                batch_wait: setup.batch_wait,
                ..ServeConfig::new("ctr26")
            },
            Arc::new(ServeMetrics::default()),
        );
        serving::listen(
            predictor,
            "127.0.0.1:0".parse()?,
            None,
            Default::default(),
            None,
        )
        .await
        .context("cannot listen")
    })?;
    let addr = listening.http.to_string();
    // Let the follower load its snapshot and the model take shape.
    std::thread::sleep(Duration::from_secs(1));
    let started = Instant::now();
    let trained_before = trained.load(Ordering::Relaxed);
    let batch_1 = phase(&addr, 1, setup)?;
    let batch_256 = phase(&addr, 256, setup)?;
    let mut freshness = Vec::new();
    for probe in 0..setup.probes {
        freshness.push(fresh_after_write(&runtime, &trainer, &addr, probe as u64)?);
    }
    let training_samples_per_sec =
        (trained.load(Ordering::Relaxed) - trained_before) as f64 / started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    if let Some(training) = training {
        training
            .join()
            .map_err(|_| anyhow::anyhow!("the training thread panicked"))??;
    }
    drop(listening);
    freshness.sort_by(f64::total_cmp);
    Ok(Measured {
        batch_1,
        batch_256,
        freshness_p50_ms: percentile(&freshness, 0.5),
        freshness_p99_ms: percentile(&freshness, 0.99),
        freshness_max_ms: freshness.last().copied().unwrap_or(f64::NAN),
        cache_freshness_ms: setup.cache_freshness.as_millis() as u64,
        training_samples_per_sec,
    })
}

/// A primary and its follower on loopback; their addresses.
async fn start_shards() -> anyhow::Result<(String, String)> {
    let dir = std::env::temp_dir().join(format!("ps-bench-serve-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let token_file = dir.join("peer.token");
    std::fs::write(&token_file, PEER_TOKEN)?;
    let auth = Auth::default().with_peer_token(&read_token_file(&token_file)?);
    std::fs::remove_dir_all(&dir).ok();
    let config = ServerConfig {
        auth,
        ..ServerConfig::new(0, 1)
    };
    let bind = || tokio::net::TcpListener::bind("127.0.0.1:0");
    let listener = bind().await?;
    let primary = listener.local_addr()?.to_string();
    let shard = Arc::new(Shard::new(0, 1));
    tokio::spawn(ps_server::run(
        listener,
        config.clone(),
        shard,
        std::future::pending(),
    ));
    let listener = bind().await?;
    let follower = listener.local_addr()?.to_string();
    let config = ServerConfig {
        follow: vec![primary.clone()],
        ..config
    };
    ps_server::server::start_follower(listener, config, std::future::pending());
    Ok((primary, follower))
}

/// Trains `model` on ctr26 batches until `stop`, counting samples.
fn train(
    runtime: &tokio::runtime::Handle,
    client: &PsClient,
    model: &Model,
    batch: usize,
    stop: &AtomicBool,
    trained: &AtomicU64,
) -> anyhow::Result<()> {
    let mut generator = Generator::new(7);
    let mut step = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let batch = generator.batch(batch);
        let pulled = runtime.block_on(model.pull(client, &batch))?;
        let output = model.compute(&CpuBackend, &pulled, Mode::Train { seed: step })?;
        let grads = output.grads.context("training computes gradients")?;
        runtime.block_on(model.push(client, &pulled, grads, None))?;
        trained.fetch_add(batch.len() as u64, Ordering::Relaxed);
        step += 1;
    }
    runtime.block_on(client.flush())?;
    Ok(())
}

/// A ctr26 sample as an instance (a libffm line without its label).
fn instance(generator: &mut Generator) -> String {
    let (ids, _) = generator.sample();
    let fields: Vec<String> = (ids.iter().enumerate())
        .map(|(f, id)| format!("{f}:{id}:1"))
        .collect();
    fields.join(" ")
}

/// `{"instances": [...]}` of `n` ctr26 samples.
fn body(generator: &mut Generator, n: usize) -> String {
    let instances: Vec<String> = (0..n).map(|_| instance(generator)).collect();
    serde_json::json!({ "instances": instances }).to_string()
}

/// A keep-alive HTTP/1.1 connection to the endpoint.
struct Connection {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Connection {
    fn open(addr: &str) -> anyhow::Result<Connection> {
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        Ok(Connection {
            writer: stream.try_clone()?,
            reader: BufReader::new(stream),
        })
    }

    /// POSTs `body` to the model's predict URL; the status and the body.
    fn predict(&mut self, body: &str) -> anyhow::Result<(u16, String)> {
        write!(
            self.writer,
            "POST /v1/models/ctr26:predict HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )?;
        let mut status_line = String::new();
        self.reader.read_line(&mut status_line)?;
        let status: u16 = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("bad status line {status_line:?}"))?;
        let mut length = 0usize;
        loop {
            let mut line = String::new();
            self.reader.read_line(&mut line)?;
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse()?;
            }
        }
        let mut answer = vec![0u8; length];
        self.reader.read_exact(&mut answer)?;
        Ok((status, String::from_utf8(answer)?))
    }
}

/// `setup.clients` threads sending requests of `batch` instances for
/// `setup.seconds`.
fn phase(addr: &str, batch: usize, setup: &Setup) -> anyhow::Result<Phase> {
    let deadline = Instant::now() + Duration::from_secs_f64(setup.seconds);
    let started = Instant::now();
    let threads: Vec<_> = (0..setup.clients)
        .map(|c| {
            let addr = addr.to_string();
            std::thread::spawn(move || -> anyhow::Result<(Vec<f64>, u64)> {
                let mut generator = Generator::new(100 + c as u64);
                let bodies: Vec<String> = (0..16).map(|_| body(&mut generator, batch)).collect();
                let mut connection = Connection::open(&addr)?;
                let (mut latencies, mut errors) = (Vec::new(), 0);
                for i in 0.. {
                    if Instant::now() >= deadline {
                        break;
                    }
                    let sent = Instant::now();
                    let (status, _) = connection.predict(&bodies[i % bodies.len()])?;
                    latencies.push(sent.elapsed().as_secs_f64() * 1e3);
                    if status != 200 {
                        errors += 1;
                    }
                }
                Ok((latencies, errors))
            })
        })
        .collect();
    let (mut latencies, mut errors) = (Vec::new(), 0);
    for thread in threads {
        let (l, e) = thread
            .join()
            .map_err(|_| anyhow::anyhow!("a client thread panicked"))??;
        latencies.extend(l);
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort_by(f64::total_cmp);
    Ok(Phase {
        batch,
        requests: latencies.len() as u64,
        predictions_per_sec: (latencies.len() - errors as usize) as f64 * batch as f64 / elapsed,
        p50_ms: percentile(&latencies, 0.5),
        p99_ms: percentile(&latencies, 0.99),
        errors,
    })
}

/// Sets the embedding of a fresh id (probe `n`) on the primary and waits
/// for a prediction that reflects it; ms from the acknowledgement.
fn fresh_after_write(
    runtime: &tokio::runtime::Runtime,
    client: &PsClient,
    addr: &str,
    n: u64,
) -> anyhow::Result<f64> {
    // An id of field 0 outside the ids ctr26 draws.
    let id = ROWS * FIELDS + n;
    let probe = serde_json::json!({ "instances": [format!("0:{id}:1")] }).to_string();
    let mut connection = Connection::open(addr)?;
    let read = |connection: &mut Connection| -> anyhow::Result<f64> {
        let (status, answer) = connection.predict(&probe)?;
        if status != 200 {
            bail!("probe answered {status}: {answer}");
        }
        let value: serde_json::Value = serde_json::from_str(&answer)?;
        value["predictions"][0]
            .as_f64()
            .with_context(|| format!("no prediction in {answer}"))
    };
    let before = read(&mut connection)?;
    runtime.block_on(client.assign("embeddings", &[id], &[3.0; 16]))?;
    let acknowledged = Instant::now();
    while (read(&mut connection)? - before).abs() < 1e-6 {
        if acknowledged.elapsed() > Duration::from_secs(30) {
            bail!("a write on the primary did not show in predictions within 30 s");
        }
    }
    Ok(acknowledged.elapsed().as_secs_f64() * 1e3)
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}
