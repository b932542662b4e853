//! `ps-worker`: train a model against parameter servers.
//!
//! - `train`: one worker of a job whose servers run elsewhere.
//! - `local`: servers and workers inside this process (loopback gRPC).
//! - `eval`: metrics of checkpoints and of their averaged ensemble.
//! - `checkpoint`: ask every shard of a running job to write a checkpoint.
//! - `health`: exit 0 if every server answers SERVING (container health checks).
//! - `serve`: online predictions over REST and gRPC, from servers or a bundle.
//! - `export`: a checkpoint's model as a self-contained serving bundle.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use ps_common::auth::read_token_file;
use ps_common::config::{DataSource, Device, JobConfig};
use ps_worker::job::{self, Report};
use ps_worker::telemetry::Telemetry;

mod cli;

use cli::{Cli, Command, Shards};

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

fn main() -> std::process::ExitCode {
    ps_common::logging::exit_code(run())
}

fn run() -> anyhow::Result<()> {
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
            shards:
                Shards {
                    servers,
                    etcd,
                    job: job_name,
                },
            backups,
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
            let classes = job.model.classes();
            for e in &entries {
                if classes > 1 {
                    println!(
                        "{}: top-1 accuracy {:.4} logloss {:.4} macro auc {:.4} ({} classes, {} examples)",
                        e.checkpoint, e.accuracy, e.logloss, e.auc, classes, e.examples
                    );
                } else {
                    println!(
                        "{}: auc {:.4} logloss {:.4} accuracy {:.4} ({} examples)",
                        e.checkpoint, e.auc, e.logloss, e.accuracy, e.examples
                    );
                }
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
            predict_tls_cert,
            predict_tls_key,
            predict_tls_ca,
            predict_require_client_cert,
            connect_timeout_secs,
        } => {
            let predict_tls = ps_worker::serving::ServingTls::from_files(
                &ps_common::tls::TlsFiles {
                    cert: predict_tls_cert,
                    key: predict_tls_key,
                    ca: predict_tls_ca,
                },
                predict_require_client_cert,
            )?;
            let scheme = if predict_tls.is_some() {
                "https"
            } else {
                "http"
            };
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
                let listening =
                    ps_worker::serving::listen(predictor, listen, grpc_listen, limits, predict_tls)
                        .await
                        .with_context(|| {
                            format!("cannot listen on --listen {listen} or --grpc-listen")
                        })?;
                // Tests and scripts read these lines; keep them stable.
                println!("serving {name} on {scheme}://{}", listening.http);
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
            shards:
                Shards {
                    servers,
                    etcd,
                    job: job_name,
                },
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
