//! The command line of `ps-worker`: its subcommands and their flags
//! (clap), as `--help` shows them.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use ps_common::config::Device;
use ps_common::logging::LogFormat;

/// Train sparse models whose weights live on parameter servers.
#[derive(Debug, Parser)]
#[command(version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log format on stderr: text, or json (one object per line).
    #[arg(long, value_enum, global = true, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Serve training metrics at http://ADDR/metrics (Prometheus text; port
    /// 0 picks a free port, printed as `metrics on ADDR`).
    #[arg(long, global = true, value_name = "ADDR")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Send this bearer token (the file's text) with every call to the
    /// servers (`train`, `checkpoint`); they must have been started with it.
    #[arg(long, global = true, value_name = "FILE")]
    pub auth_token_file: Option<PathBuf>,
    /// Reach the servers over TLS, trusting this CA bundle (PEM)
    /// (`train`, `checkpoint`, `health`).
    #[arg(long, global = true, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for servers that require one (mutual TLS);
    /// needs --tls-key.
    #[arg(long, global = true, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, global = true, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run one worker of a job against running `ps-server` shards.
    Train {
        /// The job file (TOML).
        #[arg(long)]
        config: PathBuf,
        #[command(flatten)]
        shards: Shards,
        /// Backup server of each shard, in the same order (HOST:PORT,...):
        /// when a primary dies, the worker promotes its backup and goes on.
        /// Default: the backups the primaries report when the worker connects.
        #[arg(long, value_delimiter = ',', conflicts_with = "etcd")]
        backups: Vec<String>,
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
        /// Serve predictions over TLS (REST and gRPC) with this
        /// certificate chain (PEM); needs --predict-tls-key. The global
        /// --tls-* flags are for reaching the servers.
        #[arg(long, value_name = "FILE")]
        predict_tls_cert: Option<PathBuf>,
        /// The private key of --predict-tls-cert (PEM).
        #[arg(long, value_name = "FILE")]
        predict_tls_key: Option<PathBuf>,
        /// With --predict-require-client-cert: the CA bundle (PEM) that
        /// clients' certificates must be signed by.
        #[arg(long, value_name = "FILE")]
        predict_tls_ca: Option<PathBuf>,
        /// Only clients with a certificate signed by --predict-tls-ca
        /// get in (mutual TLS).
        #[arg(long)]
        predict_require_client_cert: bool,
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
        #[command(flatten)]
        shards: Shards,
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

/// Where a job's shards are: listed, or the primaries etcd names (servers
/// started with `ps-server --etcd`, failovers followed there).
#[derive(Debug, clap::Args)]
pub struct Shards {
    /// Server addresses in shard-id order, comma-separated (HOST:PORT,...).
    #[arg(
        long,
        value_delimiter = ',',
        required_unless_present = "etcd",
        conflicts_with = "etcd"
    )]
    pub servers: Vec<String>,
    /// Find the shards' primaries in etcd at these client URLs
    /// (HOST:PORT,...) instead.
    #[arg(long, value_name = "URLS", value_delimiter = ',', requires = "job")]
    pub etcd: Vec<String>,
    /// The job's name in etcd (as given to its servers).
    #[arg(long, value_name = "NAME")]
    pub job: Option<String>,
}
