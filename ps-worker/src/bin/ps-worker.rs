//! `ps-worker`: train a model against parameter servers.
//!
//! - `train`: one worker of a job whose servers run elsewhere.
//! - `local`: servers and workers inside this process (loopback gRPC).
//! - `eval`: metrics of checkpoints and of their averaged ensemble.
//! - `checkpoint`: ask every shard of a running job to write a checkpoint.
//! - `health`: exit 0 if every server answers SERVING (container health checks).
//! - `serve`: online predictions over REST and gRPC, from servers or a bundle.
//! - `export`: a checkpoint's model as a self-contained serving bundle.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use ps_common::auth::read_token_file;
use ps_common::config::{DataSource, Device, JobConfig};
use ps_common::logging::LogFormat;
use ps_worker::job::{self, Report};
use ps_worker::telemetry::Telemetry;

/// Train sparse models whose weights live on parameter servers.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log format on stderr: text, or json (one object per line).
    #[arg(long, value_enum, global = true, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Serve training metrics at http://ADDR/metrics (Prometheus text; port
    /// 0 picks a free port, printed as `metrics on ADDR`).
    #[arg(long, global = true, value_name = "ADDR")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Send this bearer token (the file's text) with every call to the
    /// servers (`train`, `checkpoint`); they must have been started with it.
    #[arg(long, global = true, value_name = "FILE")]
    auth_token_file: Option<PathBuf>,
    /// Reach the servers over TLS, trusting this CA bundle (PEM)
    /// (`train`, `checkpoint`, `health`).
    #[arg(long, global = true, value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for servers that require one (mutual TLS);
    /// needs --tls-key.
    #[arg(long, global = true, value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, global = true, value_name = "FILE")]
    tls_key: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run one worker of a job against running `ps-server` shards.
    Train {
        /// The job file (TOML).
        #[arg(long)]
        config: PathBuf,
        /// Server addresses in shard-id order, comma-separated (HOST:PORT,...).
        #[arg(
            long,
            value_delimiter = ',',
            required_unless_present = "etcd",
            conflicts_with = "etcd"
        )]
        servers: Vec<String>,
        /// Backup server of each shard, in the same order (HOST:PORT,...):
        /// when a primary dies, the worker promotes its backup and goes on.
        /// Default: the backups the primaries report when the worker connects.
        #[arg(long, value_delimiter = ',', conflicts_with = "etcd")]
        backups: Vec<String>,
        /// Find the shards' primaries in etcd at these client URLs
        /// (HOST:PORT,...), and follow failovers there (servers started
        /// with `ps-server --etcd`).
        #[arg(long, value_name = "URLS", value_delimiter = ',', requires = "job")]
        etcd: Vec<String>,
        /// The job's name in etcd (as given to its servers).
        #[arg(long, value_name = "NAME")]
        job: Option<String>,
        /// This worker's rank in [0, --world); it reads lines i with i % world == rank.
        #[arg(long)]
        rank: usize,
        /// Number of workers in the job.
        #[arg(long)]
        world: usize,
        /// Write the job's report (metrics, throughput, bytes) as JSON to this file.
        #[arg(long)]
        report: Option<PathBuf>,
        /// Seconds to keep retrying servers that do not accept connections yet.
        #[arg(long, default_value_t = 30)]
        connect_timeout_secs: u64,
        /// Deadline of each call to a server, in seconds: a primary that
        /// hangs (rather than dies) is failed over after this.
        #[arg(long, default_value_t = 60)]
        request_timeout_secs: u64,
        /// Compute device, overriding the job's `train.device`: cpu, cuda or cuda:N.
        #[arg(long)]
        device: Option<Device>,
        /// This run's id, shared by all its workers (e.g. the Kubernetes Job's
        /// uid): keeps a rerun on the same servers from seeing an earlier
        /// run's signals. Overrides `train.run_id`.
        #[arg(long)]
        run_id: Option<String>,
    },
    /// Run servers and workers inside this process over loopback gRPC.
    Local {
        /// The job file (TOML); without it, an embedded default job trains
        /// logistic regression on the built-in a9a data.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Number of server shards.
        #[arg(long, default_value_t = 2)]
        servers: u32,
        /// Number of workers.
        #[arg(long, default_value_t = 2)]
        workers: usize,
        /// Write the job's report (metrics, throughput, bytes) as JSON to this file.
        #[arg(long)]
        report: Option<PathBuf>,
        /// Compute device, overriding the job's `train.device`: cpu, cuda or cuda:N.
        #[arg(long)]
        device: Option<Device>,
        /// Folder the local shards write checkpoints to (`train.best_checkpoint`).
        #[arg(long)]
        checkpoint_dir: Option<PathBuf>,
    },
    /// Evaluate checkpoints (DIR/NAME, as written by `checkpoint` or
    /// `train.best_checkpoint`) and their averaged ensemble on a data file.
    Eval {
        /// The job file whose model and tables the checkpoints hold
        /// (default: the embedded a9a job).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Checkpoint directories, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        checkpoints: Vec<PathBuf>,
        /// Data to evaluate on, in the job's format (default: the job's validation data).
        #[arg(long)]
        data: Option<String>,
        /// Compute device, overriding the job's `train.device`.
        #[arg(long)]
        device: Option<Device>,
        /// Write the metrics as a JSON array to this file.
        #[arg(long)]
        report: Option<PathBuf>,
    },
    /// Serve predictions of a job's model: REST in TensorFlow Serving's
    /// shape (POST /v1/models/NAME:predict) and, with --grpc-listen, the
    /// gRPC Predictor service. Rows come from --servers (read replicas:
    /// `ps-server --follow`) or from a --bundle.
    Serve {
        /// The job file whose model is served (default: the embedded a9a
        /// job); not with --bundle, which holds its job.
        #[arg(long, conflicts_with = "bundle")]
        config: Option<PathBuf>,
        /// Servers holding the tables, in shard-id order (HOST:PORT,...).
        #[arg(
            long,
            value_delimiter = ',',
            required_unless_present = "bundle",
            conflicts_with = "bundle"
        )]
        servers: Vec<String>,
        /// Serve a bundle written by `ps-worker export`, without servers.
        #[arg(long)]
        bundle: Option<PathBuf>,
        /// The REST endpoint's address (port 0 picks one, printed as
        /// `serving NAME on http://ADDR`).
        #[arg(long)]
        listen: std::net::SocketAddr,
        /// Also serve gRPC `ps.v1.Predictor` here (printed as `grpc on ADDR`).
        #[arg(long)]
        grpc_listen: Option<std::net::SocketAddr>,
        /// The model's name in URLs and requests (default: the bundle's
        /// name; the job file's name without `.toml`; `default` for the
        /// embedded job).
        #[arg(long)]
        model_name: Option<String>,
        /// Longest a batch is held open for more requests (microseconds;
        /// 0: a batch takes the requests already waiting when it starts).
        #[arg(long, default_value_t = 0)]
        batch_wait_us: u64,
        /// Most instances computed in one batch.
        #[arg(long, default_value_t = 1024)]
        max_batch: usize,
        /// Hot rows pulled from the servers are reused for this long (ms;
        /// 0: no cache, every row is pulled).
        #[arg(long, default_value_t = 200)]
        cache_freshness_ms: u64,
        /// Most rows the cache holds.
        #[arg(long, default_value_t = 1_000_000)]
        cache_rows: usize,
        /// Largest request body (bytes).
        #[arg(long, default_value_t = 16 << 20)]
        max_body_bytes: usize,
        /// Prediction requests must carry `authorization: Bearer TOKEN`
        /// (this file's text), REST and gRPC alike; `/metrics` stays open.
        #[arg(long, value_name = "FILE")]
        predict_token_file: Option<PathBuf>,
        /// Seconds to keep retrying servers that do not accept connections yet.
        #[arg(long, default_value_t = 30)]
        connect_timeout_secs: u64,
    },
    /// Write a checkpoint's model as a serving bundle: the job and the
    /// weights of only the tables its model reads, checksummed.
    Export {
        /// The job file (default: the embedded a9a job).
        #[arg(long)]
        config: Option<PathBuf>,
        /// The checkpoint (DIR/NAME, as written by `checkpoint`).
        #[arg(long)]
        checkpoint: PathBuf,
        /// The bundle file to write.
        #[arg(long)]
        out: PathBuf,
        /// The model's name (default: the job file's name without `.toml`).
        #[arg(long)]
        model_name: Option<String>,
    },
    /// Exit 0 if every server answers SERVING on the standard gRPC health
    /// service (for container health checks), 1 otherwise.
    Health {
        /// Server addresses, comma-separated (HOST:PORT,...).
        #[arg(long, value_delimiter = ',', required = true)]
        servers: Vec<String>,
        /// Seconds to wait for each answer.
        #[arg(long, default_value_t = 3)]
        timeout_secs: u64,
    },
    /// Ask every shard of a running job to write checkpoint NAME under its
    /// --checkpoint-dir (restore with `ps-server --restore DIR/NAME`).
    Checkpoint {
        /// Server addresses in shard-id order, comma-separated (HOST:PORT,...).
        #[arg(
            long,
            value_delimiter = ',',
            required_unless_present = "etcd",
            conflicts_with = "etcd"
        )]
        servers: Vec<String>,
        /// Checkpoint the primaries etcd names at these client URLs
        /// (HOST:PORT,...) instead of listed servers.
        #[arg(long, value_name = "URLS", value_delimiter = ',', requires = "job")]
        etcd: Vec<String>,
        /// The job's name in etcd.
        #[arg(long, value_name = "NAME")]
        job: Option<String>,
        /// Checkpoint name: 1-128 characters from [A-Za-z0-9_.-].
        #[arg(long)]
        name: String,
        /// Write only what changed since each server's last checkpoint of
        /// this name (a delta beside its base).
        #[arg(long)]
        incremental: bool,
        /// Seconds to keep retrying servers that do not accept connections yet.
        #[arg(long, default_value_t = 30)]
        connect_timeout_secs: u64,
    },
}

/// The job `--job` names in the etcd at `--etcd` (`None` without them).
fn coordinator_of(
    etcd: &[String],
    job: Option<String>,
) -> anyhow::Result<Option<ps_common::coordinator::Job>> {
    match job {
        Some(name) if !etcd.is_empty() => {
            let etcd =
                std::sync::Arc::new(ps_common::coordinator::Etcd::new(etcd).context("--etcd")?);
            Ok(Some(
                ps_common::coordinator::Job::new(etcd, &name).context("--job")?,
            ))
        }
        _ => Ok(None),
    }
}

fn main() -> anyhow::Result<()> {
    ps_common::memory::keep_freed_memory();
    let cli = Cli::parse();
    ps_common::logging::init(cli.log_format);
    // What this process's workers report to; the metrics endpoint serves it.
    let telemetry = Telemetry::default();
    // Kept alive for the whole run: the metrics endpoint's runtime.
    let _metrics = cli
        .metrics_listen
        .map(|addr| serve_metrics(addr, &telemetry))
        .transpose()?;
    let auth_token = cli
        .auth_token_file
        .as_deref()
        .map(read_token_file)
        .transpose()
        .context("--auth-token-file")?;
    let tls = ps_common::tls::TlsFiles {
        cert: cli.tls_cert,
        key: cli.tls_key,
        ca: cli.tls_ca,
    }
    .client()?;
    match cli.command {
        Command::Train {
            config,
            servers,
            backups,
            etcd,
            job: job_name,
            rank,
            world,
            report,
            connect_timeout_secs,
            request_timeout_secs,
            device,
            run_id,
        } => {
            if request_timeout_secs == 0 {
                bail!("--request-timeout-secs must be >= 1");
            }
            if world == 0 || rank >= world {
                bail!("--rank must be in [0, --world), got rank {rank} of world {world}");
            }
            let mut job = job_or_default(Some(&config), device)?;
            if run_id.is_some() {
                job.train.run_id = run_id;
            }
            if !backups.is_empty() && backups.len() != servers.len() {
                bail!(
                    "--backups lists {} servers for {} shards: give one per shard, in the order of --servers",
                    backups.len(),
                    servers.len()
                );
            }
            let coordinator = coordinator_of(&etcd, job_name)?;
            let client = ps_worker::ClientConfig {
                auth_token,
                backups,
                tls,
                coordinator,
                request_timeout: Duration::from_secs(request_timeout_secs),
                ..job::client_config(&job, Duration::from_secs(connect_timeout_secs))
            };
            let result = job::run_train(&job, &servers, rank, world, &client, &telemetry)
                .with_context(|| format!("worker {rank} of {world} failed"))?;
            finish(&result, report.as_deref())
        }
        Command::Local {
            config,
            servers,
            workers,
            report,
            device,
            checkpoint_dir,
        } => {
            if servers == 0 || workers == 0 {
                bail!("--servers and --workers must be >= 1");
            }
            let job = job_or_default(config.as_deref(), device)?;
            let client = job::client_config(&job, Duration::from_secs(10));
            let result = job::run_local_reporting(
                &job,
                servers,
                workers,
                &client,
                checkpoint_dir,
                &telemetry,
            )
            .context("local job failed")?;
            finish(&result, report.as_deref())
        }
        Command::Eval {
            config,
            checkpoints,
            data,
            device,
            report,
        } => {
            let job = job_or_default(config.as_deref(), device)?;
            let source = match data {
                Some(text) => DataSource::from(text),
                None => job
                    .data
                    .validation
                    .clone()
                    .context("--data is required: the job has no data.validation")?,
            };
            let entries =
                job::run_eval(&job, &checkpoints, &source).context("evaluation failed")?;
            for e in &entries {
                println!(
                    "{}: auc {:.4} logloss {:.4} accuracy {:.4} ({} examples)",
                    e.checkpoint, e.auc, e.logloss, e.accuracy, e.examples
                );
            }
            if let Some(path) = report {
                let json = serde_json::to_string_pretty(&entries)?;
                std::fs::write(&path, json + "\n")
                    .with_context(|| format!("cannot write --report {}", path.display()))?;
            }
            Ok(())
        }
        Command::Serve {
            config,
            servers,
            bundle,
            listen,
            grpc_listen,
            model_name,
            batch_wait_us,
            max_batch,
            cache_freshness_ms,
            cache_rows,
            max_body_bytes,
            predict_token_file,
            connect_timeout_secs,
        } => {
            let predict_token = predict_token_file
                .as_deref()
                .map(read_token_file)
                .transpose()
                .context("--predict-token-file")?;
            if max_batch == 0 || max_body_bytes == 0 {
                bail!("--max-batch and --max-body-bytes must be >= 1");
            }
            let runtime =
                tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
            let (job, rows, name) = match &bundle {
                Some(path) => {
                    let bundle = ps_worker::serving::bundle::Bundle::read(path)
                        .with_context(|| format!("cannot serve --bundle {}", path.display()))?;
                    let job = bundle
                        .job()
                        .with_context(|| format!("--bundle {}", path.display()))?;
                    let name = model_name.unwrap_or_else(|| bundle.name.clone());
                    let rows = ps_worker::serving::bundle::BundleRows::new(bundle)
                        .with_context(|| format!("--bundle {}", path.display()))?;
                    (job, ps_worker::serving::Rows::Bundle(rows), name)
                }
                None => {
                    let job = job_or_default(config.as_deref(), Some(Device::Cpu))?;
                    let client = ps_worker::ClientConfig {
                        auth_token,
                        tls,
                        ..job::client_config(&job, Duration::from_secs(connect_timeout_secs))
                    };
                    let cache = (cache_freshness_ms > 0 && cache_rows > 0).then(|| {
                        ps_worker::serving::rows::FreshRows::new(
                            Duration::from_millis(cache_freshness_ms),
                            cache_rows,
                        )
                    });
                    let rows = runtime
                        .block_on(ps_worker::serving::server_rows(
                            &job, &servers, &client, cache,
                        ))
                        .context("cannot reach the servers")?;
                    (
                        job,
                        rows,
                        model_name.unwrap_or_else(|| default_name(config.as_deref())),
                    )
                }
            };
            let serve = ps_worker::serving::ServeConfig {
                batch_wait: Duration::from_micros(batch_wait_us),
                max_batch,
                token: predict_token,
                ..ps_worker::serving::ServeConfig::new(name.clone())
            };
            let limits = ps_worker::serving::http::HttpLimits {
                max_body_bytes,
                ..Default::default()
            };
            runtime.block_on(async {
                let metrics = std::sync::Arc::new(ps_worker::serving::ServeMetrics::default());
                let predictor = ps_worker::serving::Predictor::start(&job, rows, &serve, metrics);
                let listening = ps_worker::serving::listen(predictor, listen, grpc_listen, limits)
                    .await
                    .with_context(|| {
                        format!("cannot listen on --listen {listen} or --grpc-listen")
                    })?;
                // Tests and scripts read these lines; keep them stable.
                println!("serving {name} on http://{}", listening.http);
                if let Some(grpc) = listening.grpc {
                    println!("grpc on {grpc}");
                }
                ps_common::shutdown::signal().await;
                drop(listening);
                Ok::<_, anyhow::Error>(())
            })
        }
        Command::Export {
            config,
            checkpoint,
            out,
            model_name,
        } => {
            let (job, text) = match &config {
                Some(path) => (
                    load_job(path)?,
                    std::fs::read_to_string(path)
                        .with_context(|| format!("cannot read job file {}", path.display()))?,
                ),
                None => (job_or_default(None, None)?, job::DEFAULT_JOB.to_string()),
            };
            let name = model_name.unwrap_or_else(|| default_name(config.as_deref()));
            let bundle =
                ps_worker::serving::bundle::Bundle::export(&job, &text, &name, &checkpoint)
                    .with_context(|| {
                        format!("cannot export --checkpoint {}", checkpoint.display())
                    })?;
            let bytes = bundle
                .write(&out)
                .with_context(|| format!("cannot write --out {}", out.display()))?;
            let rows: usize = bundle.tables.iter().map(|t| t.keys.len()).sum();
            println!(
                "wrote bundle {name} to {} ({} tables, {rows} rows, {bytes} bytes)",
                out.display(),
                bundle.tables.len()
            );
            Ok(())
        }
        Command::Health {
            servers,
            timeout_secs,
        } => {
            let runtime =
                tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
            let timeout = Duration::from_secs(timeout_secs);
            for server in &servers {
                runtime
                    .block_on(async {
                        tokio::time::timeout(timeout, check_health(server, tls.clone())).await
                    })
                    .map_err(|_| {
                        anyhow::anyhow!("{server}: no health answer within {timeout:?}")
                    })??;
                println!("{server}: SERVING");
            }
            Ok(())
        }
        Command::Checkpoint {
            servers,
            etcd,
            job: job_name,
            name,
            incremental,
            connect_timeout_secs,
        } => {
            let config = ps_worker::ClientConfig {
                connect_timeout: Duration::from_secs(connect_timeout_secs),
                auth_token,
                tls,
                coordinator: coordinator_of(&etcd, job_name)?,
                ..ps_worker::ClientConfig::default()
            };
            let runtime =
                tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
            let written = runtime
                .block_on(async {
                    let client = ps_worker::PsClient::connect(&servers, &config).await?;
                    client.checkpoint_as(&name, incremental).await
                })
                .with_context(|| format!("checkpoint {name:?} failed"))?;
            for (shard, w) in written.iter().enumerate() {
                println!(
                    "shard {shard}: wrote {} ({} rows, {} bytes)",
                    w.path, w.rows, w.bytes
                );
            }
            Ok(())
        }
    }
}

/// Fails unless `server` reports SERVING for `ps.v1.ParameterServer`.
async fn check_health(
    server: &str,
    tls: Option<tonic::transport::ClientTlsConfig>,
) -> anyhow::Result<()> {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let channel = ps_common::tls::endpoint(server, tls)
        .with_context(|| format!("invalid server address or TLS settings for {server:?}"))?
        .connect()
        .await
        .with_context(|| format!("{server}: unreachable"))?;
    let status = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: "ps.v1.ParameterServer".into(),
        })
        .await
        .with_context(|| format!("{server}: health check failed"))?
        .into_inner()
        .status;
    if status != ServingStatus::Serving as i32 {
        bail!("{server}: not serving (status {status})");
    }
    Ok(())
}

/// Serves the workers' metrics on `addr` from a runtime of its own.
fn serve_metrics(
    addr: std::net::SocketAddr,
    telemetry: &Telemetry,
) -> anyhow::Result<tokio::runtime::Runtime> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("cannot start the metrics runtime")?;
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register_collector(Box::new(telemetry.collector()));
    let bound = runtime
        .block_on(ps_common::prometheus::listen(
            addr,
            std::sync::Arc::new(registry),
        ))
        .with_context(|| format!("cannot listen on --metrics-listen {addr}"))?;
    println!("metrics on {bound}");
    Ok(runtime)
}

/// The job file at `path` (the embedded default job without one), with
/// `--device` overriding `train.device`.
fn job_or_default(path: Option<&Path>, device: Option<Device>) -> anyhow::Result<JobConfig> {
    let mut job = match path {
        Some(path) => load_job(path)?,
        None => JobConfig::from_toml(job::DEFAULT_JOB, Path::new("."))
            .context("the embedded default job is invalid")?,
    };
    if let Some(device) = device {
        job.train.device = device;
    }
    Ok(job)
}

/// A served model's default name: the job file's name without `.toml`,
/// `default` for the embedded job.
fn default_name(config: Option<&Path>) -> String {
    config
        .and_then(|p| p.file_stem())
        .map_or_else(|| "default".into(), |s| s.to_string_lossy().into_owned())
}

fn load_job(path: &Path) -> anyhow::Result<JobConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read job file {}", path.display()))?;
    let base = path.parent().unwrap_or(Path::new("."));
    JobConfig::from_toml(&text, base)
        .with_context(|| format!("invalid job file {}", path.display()))
}

fn finish(report: &Report, path: Option<&Path>) -> anyhow::Result<()> {
    println!("{}", report.summary());
    if let Some(path) = path {
        let json = serde_json::to_string_pretty(report)?;
        std::fs::write(path, json + "\n")
            .with_context(|| format!("cannot write --report {}", path.display()))?;
    }
    Ok(())
}
