//! `ps-server`: one parameter-server shard process.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use ps_common::auth::read_token_file;
use ps_common::logging::LogFormat;
use ps_common::tls::TlsFiles;
use ps_server::auth::Auth;
use ps_server::coordination::{Coordinated, Coordination};
use ps_server::replication::{Peer, Replication, Role};
use ps_server::{Limits, ServerConfig, Shard, checkpoint};

/// Serve one shard of a parameter-server job over gRPC.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Address to listen on, e.g. 0.0.0.0:7000 (port 0 picks a free port;
    /// the bound address is printed as `listening on ADDR`).
    #[arg(long)]
    listen: SocketAddr,
    /// This shard's index in [0, --num-shards).
    #[arg(long)]
    shard_id: u32,
    /// Number of shards in the job; every worker must list this many servers.
    #[arg(long)]
    num_shards: u32,
    /// Largest request message accepted, in bytes; larger ones get RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = Limits::default().max_request_bytes)]
    max_request_bytes: usize,
    /// Largest number of keys in one pull or push; more get RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = Limits::default().max_keys_per_request)]
    max_keys_per_request: usize,
    /// Largest answer one pull (or PullMany) may carry, in bytes of values
    /// (keys x dim x value width); larger ones get RESOURCE_EXHAUSTED before
    /// anything is read.
    #[arg(long, default_value_t = Limits::default().max_response_bytes)]
    max_response_bytes: usize,
    /// Bytes this shard's tables may hold (e.g. 8G, 512MiB): requests that
    /// would create rows or tables past it get RESOURCE_EXHAUSTED and create
    /// nothing. Default: half of the machine's (or container's) memory; the
    /// other half is for checkpoints, a joining backup's snapshot and
    /// requests in flight.
    #[arg(long, value_name = "BYTES", value_parser = ps_server::budget::parse_bytes)]
    memory_budget: Option<u64>,
    /// Folder where the Checkpoint RPC writes NAME/shard-I.bin (and its
    /// manifest); without it, checkpoints are refused.
    #[arg(long)]
    checkpoint_dir: Option<PathBuf>,
    /// Start from a checkpoint folder (DIR/NAME) instead of empty tables;
    /// refused if a checksum does not match. A checkpoint written by
    /// another shard count is resharded: this shard reads every file and
    /// keeps the rows it owns.
    #[arg(long, conflicts_with = "restore_latest")]
    restore: Option<PathBuf>,
    /// Start from the newest complete checkpoint of this shard under
    /// --checkpoint-dir (any NAME; a damaged newer one is skipped with a
    /// warning), or empty if there is none yet. Refuses to start if
    /// checkpoints exist but none can be restored. Meant for restarts: a
    /// pod that comes back resumes where its last checkpoint left off.
    #[arg(long, requires = "checkpoint_dir")]
    restore_latest: bool,
    /// On SIGINT/SIGTERM, seconds to let in-flight requests and open
    /// connections finish before exiting anyway.
    #[arg(long, default_value_t = 10)]
    drain_timeout_secs: u64,
    /// After draining on SIGINT/SIGTERM, write checkpoint NAME under
    /// --checkpoint-dir (e.g. within a Kubernetes pod's grace period).
    #[arg(long, value_name = "NAME")]
    checkpoint_on_shutdown: Option<String>,
    /// Serve Prometheus metrics at http://ADDR/metrics (port 0 picks a free
    /// port, printed as `metrics on ADDR` after the `listening on` line).
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
    /// Log format on stderr: text, or json (one object per line).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Require this bearer token (the file's text, 16-4096 visible ASCII
    /// characters) on every ParameterServer call; others get UNAUTHENTICATED.
    #[arg(long, value_name = "FILE")]
    auth_token_file: Option<std::path::PathBuf>,
    /// The token of server-to-server calls (Join, Replicate, Lease): a
    /// primary takes backups, and a backup joins, only with it; workers'
    /// tokens do not open those calls. Same file on a shard's primary and
    /// backups; without it, a server takes no backup.
    #[arg(long, value_name = "FILE")]
    peer_token_file: Option<std::path::PathBuf>,
    /// Most rows each sparse table may hold on this shard; pulls and pushes
    /// that would create more get RESOURCE_EXHAUSTED (default: no cap).
    #[arg(long, value_name = "N")]
    max_rows_per_table: Option<usize>,
    /// Start as the backup of the primary at ADDR (same --shard-id and
    /// --num-shards): load its snapshot, then apply its writes; serve
    /// workers once a worker promotes this server (failover).
    #[arg(long, value_name = "ADDR")]
    join: Option<String>,
    /// The address peers (and, with --etcd, workers) reach this server at
    /// (default: the bound --listen address; required when listening on
    /// 0.0.0.0 or [::]).
    #[arg(long, value_name = "ADDR")]
    advertise: Option<String>,
    /// Coordinate the job through etcd at these client URLs
    /// (HOST:PORT,...): the server joins its shard's primary as backup, or
    /// restores its newest checkpoint under --checkpoint-dir and becomes
    /// primary; the standby is promoted when the primary's lease runs out.
    /// Workers find the primaries with `ps-worker train --etcd`.
    #[arg(long, value_name = "URLS", value_delimiter = ',', conflicts_with_all = ["join", "follow", "restore", "restore_latest"], requires = "job")]
    etcd: Vec<String>,
    /// With --etcd: start as a read replica (as --follow does) of whichever
    /// server etcd names the shard's primary, asking again after a failover.
    #[arg(long, requires = "etcd")]
    follow_etcd: bool,
    /// The job's name in etcd (keys under /ps/NAME/); every server and
    /// worker of a job gives the same one.
    #[arg(long, value_name = "NAME")]
    job: Option<String>,
    /// Seconds the etcd lease lives unrenewed: how long a dead or hung
    /// primary holds its shard before the standby takes over.
    #[arg(long, value_name = "SECS", default_value_t = 3)]
    lease_ttl_secs: u64,
    /// Start as a read replica of the shard's primary at ADDR (same
    /// --shard-id and --num-shards): load its snapshot, then apply its
    /// writes as they come, without acknowledging them; serve pulls (for
    /// inference) and refuse writes. Give the primary and its backup
    /// (ADDR,ADDR) to follow whichever serves after a failover. Needs
    /// --peer-token-file.
    #[arg(long, value_name = "ADDR", value_delimiter = ',', conflicts_with_all = ["join", "restore", "restore_latest"])]
    follow: Vec<String>,
    /// A primary keeps the writes its followers have not read in memory,
    /// up to this many bytes; a follower further behind starts again from
    /// a snapshot.
    #[arg(long, value_name = "BYTES", value_parser = ps_server::budget::parse_bytes, default_value = "256MiB")]
    follower_log_bytes: u64,
    /// Seconds a backup keeps trying to reach its primary at start.
    #[arg(long, default_value_t = 60)]
    join_timeout_secs: u64,
    /// Write checkpoint `periodic` under --checkpoint-dir every N seconds
    /// (atomically replacing the last one).
    #[arg(long, value_name = "N")]
    checkpoint_every_secs: Option<u64>,
    /// Serve over TLS with this certificate chain (PEM); needs --tls-key.
    #[arg(long, value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// CA bundle (PEM) trusted for peer servers (replication) and, with
    /// --tls-require-client-cert, for workers' client certificates;
    /// required with --tls-cert.
    #[arg(long, value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// Mutual TLS: refuse clients without a certificate signed by --tls-ca.
    #[arg(long)]
    tls_require_client_cert: bool,
    /// Make the periodic checkpoints incremental: each writes only the rows
    /// changed since the last, beside a full base written every N + 1
    /// checkpoints (needs --checkpoint-every-secs).
    #[arg(long, value_name = "N")]
    checkpoint_deltas_per_base: Option<u64>,
    /// How often tables with eviction are checked against their TTL, row
    /// cap and the memory budget (milliseconds).
    #[arg(long, value_name = "MS", default_value_t = 100)]
    evict_interval_ms: u64,
    /// Folder of this shard's disk tier: rows that tables with eviction
    /// give up for `max_rows` or --memory-budget move to a file here
    /// (shard-I.tier.redb, created anew at start) instead of being
    /// dropped, and come back to memory when touched. Checkpoints carry
    /// them. Backups and followers should have one too (without, they drop
    /// such rows).
    #[arg(long, value_name = "DIR")]
    disk_tier: Option<PathBuf>,
    /// Page cache of the disk tier's file (outside --memory-budget). With a
    /// disk tier the process allocates from one heap arena (see
    /// `ps_common::memory::one_arena`).
    #[arg(long, value_name = "BYTES", value_parser = ps_server::budget::parse_bytes,
          default_value_t = ps_server::store::disk::DEFAULT_CACHE_BYTES as u64)]
    disk_tier_cache_bytes: u64,
}

fn main() -> std::process::ExitCode {
    ps_common::logging::exit_code(run())
}

fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    ps_common::memory::keep_freed_memory();
    if args.disk_tier.is_some() {
        ps_common::memory::one_arena();
    }
    tokio::runtime::Runtime::new()
        .context("cannot start the async runtime")?
        .block_on(serve(args))
}

async fn serve(args: Args) -> anyhow::Result<()> {
    ps_common::logging::init(args.log_format);
    let mut auth = match &args.auth_token_file {
        Some(file) => Auth::bearer(&read_token_file(file).context("--auth-token-file")?),
        None => Auth::default(),
    };
    if let Some(file) = &args.peer_token_file {
        let peer = read_token_file(file).context("--peer-token-file")?;
        if args
            .auth_token_file
            .as_ref()
            .and_then(|f| read_token_file(f).ok())
            .is_some_and(|worker| worker == peer)
        {
            anyhow::bail!(
                "--peer-token-file holds the same token as --auth-token-file: give servers a token workers do not have"
            );
        }
        auth = auth.with_peer_token(&peer);
    }
    if !args.etcd.is_empty() && !auth.takes_peers() {
        anyhow::bail!(
            "--etcd needs --peer-token-file: the shard's servers replicate to each other with the peer token"
        );
    }
    if !args.etcd.is_empty() && !(2..=3600).contains(&args.lease_ttl_secs) {
        anyhow::bail!("--lease-ttl-secs must be in [2, 3600] (etcd's shortest lease is about 2 s)");
    }
    if args.join.is_some() && !auth.takes_peers() {
        anyhow::bail!(
            "--join needs --peer-token-file: the primary takes backups only with the peer token"
        );
    }
    if (!args.follow.is_empty() || args.follow_etcd) && !auth.takes_peers() {
        anyhow::bail!(
            "--follow needs --peer-token-file: the primary takes followers only with the peer token"
        );
    }
    let tls = TlsFiles {
        cert: args.tls_cert.clone(),
        key: args.tls_key.clone(),
        ca: args.tls_ca.clone(),
    };
    let config = ServerConfig {
        shard_id: args.shard_id,
        num_shards: args.num_shards,
        limits: Limits {
            max_request_bytes: args.max_request_bytes,
            max_keys_per_request: args.max_keys_per_request,
            max_response_bytes: args.max_response_bytes,
        },
        checkpoint_dir: args.checkpoint_dir.clone(),
        drain_timeout: std::time::Duration::from_secs(args.drain_timeout_secs),
        checkpoint_on_shutdown: args.checkpoint_on_shutdown.clone(),
        auth,
        checkpoint_every: args
            .checkpoint_every_secs
            .map(std::time::Duration::from_secs),
        tls: tls.server(args.tls_require_client_cert)?,
        // A TLS server reaches its peers over TLS too, trusting --tls-ca
        // (required: replication would otherwise fail later).
        peer_tls: tls.client()?,
        restored_from: None,
        counters: Arc::default(),
        evict_every: std::time::Duration::from_millis(args.evict_interval_ms),
        checkpoint_deltas_per_base: args.checkpoint_deltas_per_base,
        follow: args.follow.clone(),
        follow_coordinator: None,
        follower_log_bytes: usize::try_from(args.follower_log_bytes).unwrap_or(usize::MAX),
    };
    config.validate()?;
    if args.join.is_some() && (args.restore.is_some() || args.restore_latest) {
        anyhow::bail!(
            "--join excludes --restore and --restore-latest: a backup starts from its primary's snapshot"
        );
    }
    let (shard, restored_from) = restore(&args)?;
    let mut config = config;
    config.restored_from = restored_from.as_ref().map(|dir| dir.display().to_string());
    shard.set_row_cap(args.max_rows_per_table);
    match args
        .memory_budget
        .or_else(ps_server::budget::default_budget)
    {
        Some(budget) => {
            if shard.budget.used() > budget {
                anyhow::bail!(
                    "--memory-budget {budget}: the restored tables already hold {} bytes",
                    shard.budget.used()
                );
            }
            shard.budget.set_limit(budget);
            tracing::info!(bytes = budget, "memory budget");
        }
        None => tracing::warn!(
            "cannot read this machine's memory; the tables have no memory budget (set --memory-budget)"
        ),
    }
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on --listen {}", args.listen))?;
    let addr = listener.local_addr()?;
    // Tests and scripts read this line to learn the port; keep it stable.
    println!("listening on {addr}");
    let shard = Arc::new(shard);
    let role = if args.follow_etcd || !args.follow.is_empty() {
        Role::Follower
    } else if args.join.is_some() || !args.etcd.is_empty() {
        // With etcd, a server serves nothing until it knows its role.
        Role::Backup
    } else {
        Role::Primary
    };
    let peer = Peer {
        auth: config.auth.clone(),
        tls: config.peer_tls.clone(),
    };
    let replication = Replication::new(Arc::clone(&shard), role, peer);
    if let Some(metrics_addr) = args.metrics_listen {
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(ps_server::metrics::ShardMetrics {
            shard: Arc::clone(&shard),
            counters: Arc::clone(&config.counters),
            replication: Some(Arc::clone(&replication)),
        }));
        let bound = ps_common::prometheus::listen(metrics_addr, Arc::new(registry))
            .await
            .with_context(|| format!("cannot listen on --metrics-listen {metrics_addr}"))?;
        println!("metrics on {bound}");
    }
    let advertised = match &args.advertise {
        Some(advertised) => advertised.clone(),
        None if addr.ip().is_unspecified() && (args.join.is_some() || !args.etcd.is_empty()) => {
            anyhow::bail!(
                "--join or --etcd with --listen {addr} needs --advertise ADDR: the address peers reach this server at"
            )
        }
        None => addr.to_string(),
    };
    let job = match &args.job {
        Some(job) if !args.etcd.is_empty() => {
            let etcd = Arc::new(ps_common::coordinator::Etcd::new(&args.etcd)?);
            Some(ps_common::coordinator::Job::new(etcd, job).context("--job")?)
        }
        _ => None,
    };
    if args.follow_etcd {
        config.follow_coordinator = job.clone();
    }
    let coordinated = match job {
        Some(job) if !args.follow_etcd => {
            let coordination = Coordination {
                job,
                advertised: advertised.clone(),
                ttl: std::time::Duration::from_secs(args.lease_ttl_secs),
                checkpoint_root: args.checkpoint_dir.clone(),
                join_timeout: std::time::Duration::from_secs(args.join_timeout_secs),
            };
            let coordinated =
                Coordinated::register(coordination, Arc::clone(&shard), Arc::clone(&replication))
                    .await
                    .with_context(|| {
                        format!("cannot register with etcd at {}", args.etcd.join(","))
                    })?;
            let coordinated = Arc::new(coordinated);
            let running = Arc::clone(&coordinated);
            tokio::spawn(async move {
                let ended = running.run().await;
                if matches!(ended, ps_server::coordination::Ended::Resigned) {
                    // Shutting down: the drain and the shutdown checkpoint go on.
                    return;
                }
                tracing::error!("{ended}; exiting so that a restart rejoins the shard");
                // Tests and scripts read this line; keep it stable.
                println!("coordination ended: {ended}");
                std::process::exit(3);
            });
            Some(coordinated)
        }
        _ => None,
    };
    if let Some(primary) = args.join.clone() {
        let advertised = advertised.clone();
        let replication = Arc::clone(&replication);
        let timeout = std::time::Duration::from_secs(args.join_timeout_secs);
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            match replication.join(&primary, &advertised, timeout).await {
                Ok((seq, bytes)) => {
                    let ms = started.elapsed().as_secs_f64() * 1e3;
                    tracing::info!(%primary, seq, bytes, ms, "joined as backup");
                    // Tests and scripts read this line; keep it stable.
                    println!(
                        "joined {primary} as backup through write {seq} ({bytes} bytes in {ms:.1} ms)"
                    );
                }
                Err(e) => {
                    tracing::error!(%primary, "cannot join the primary: {e}");
                    std::process::exit(1);
                }
            }
        });
    }
    tracing::info!(%addr, shard = args.shard_id, shards = args.num_shards, role = role.as_str(), "serving");
    let shutdown = async move {
        shutdown_signal().await;
        if let Some(coordinated) = coordinated {
            coordinated.resign().await;
        }
    };
    ps_server::server::run_replicated(listener, config, shard, replication, shutdown).await?;
    tracing::info!("shut down");
    Ok(())
}

/// The shard `--restore` or `--restore-latest` asks for (empty without
/// either), and the checkpoint folder it came from.
fn restore(args: &Args) -> anyhow::Result<(Shard, Option<PathBuf>)> {
    let started = std::time::Instant::now();
    let (dir, snapshot) = match (&args.restore, &args.checkpoint_dir) {
        (Some(dir), _) => {
            // Any shard count: each shard keeps the rows it owns now.
            let snapshot = checkpoint::load_resharded(dir, args.shard_id, args.num_shards)
                .with_context(|| format!("cannot --restore {}", dir.display()))?;
            (dir.clone(), snapshot)
        }
        (None, Some(root)) if args.restore_latest => {
            let newest = checkpoint::Checkpoints::new(root.clone())
                .newest(args.shard_id, args.num_shards)
                .with_context(|| format!("cannot --restore-latest from {}", root.display()))?;
            match newest {
                Some(found) => found,
                None => {
                    tracing::info!(root = %root.display(), shard = args.shard_id, "no checkpoint of this shard yet; starting empty");
                    println!("no checkpoint to restore; starting empty");
                    return Ok((empty_shard(args)?, None));
                }
            }
        }
        _ => return Ok((empty_shard(args)?, None)),
    };
    let shard = empty_shard(args)?;
    shard
        .load(snapshot)
        .with_context(|| format!("cannot restore {}", dir.display()))?;
    let rows: usize = shard.table_stats().iter().map(|t| t.rows as usize).sum();
    let ms = started.elapsed().as_secs_f64() * 1e3;
    tracing::info!(from = %dir.display(), rows, ms, "restored checkpoint");
    // Scripts read these lines to measure recovery; keep them stable.
    println!("restored {rows} rows in {ms:.1} ms");
    println!("restored from {}", dir.display());
    Ok((shard, Some(dir)))
}

/// This server's shard with no tables yet, with its disk tier if
/// `--disk-tier` names one.
fn empty_shard(args: &Args) -> anyhow::Result<Shard> {
    let shard = Shard::new(args.shard_id, args.num_shards);
    // Set before a restore loads the tables, so that it refuses tables
    // that do not fit, or, with a disk tier, moves rows past it to disk.
    if let Some(budget) = args
        .memory_budget
        .or_else(ps_server::budget::default_budget)
    {
        shard.budget.set_limit(budget);
    }
    let Some(dir) = &args.disk_tier else {
        return Ok(shard);
    };
    let cache = usize::try_from(args.disk_tier_cache_bytes).unwrap_or(usize::MAX);
    let tier = ps_server::store::disk::DiskTier::create(dir, args.shard_id, cache)
        .with_context(|| format!("--disk-tier {}", dir.display()))?;
    tracing::info!(dir = %dir.display(), "disk tier");
    Ok(shard.with_disk_tier(tier))
}

/// SIGINT or SIGTERM, logged.
async fn shutdown_signal() {
    ps_common::shutdown::signal().await;
    tracing::info!("shutdown signal received; draining in-flight requests");
}
