//! `ps-bench`: measured numbers for the README and the issue notes.
//!
//! - `kernels`: gather/scatter kernels at realistic sizes against the
//!   device's measured copy bandwidth (CUDA), with CPU timings beside them.
//! - `compute`: a worker's forward+backward samples/s for a job's model on a
//!   device, with parameters in memory (no servers): the compute part of a
//!   training step, CPU against GPU.
//! - `ctr26`: the benchmark workload of `shared/bench/ctr26.md`, end to end
//!   through real shards (loopback gRPC, or `--in-memory`).
//! - `memory`: resident bytes per sparse row against the row's floats.
//! - `client`: rows/s of the Rust client's pulls and pushes against running
//!   servers (the reference of the Python package's benchmark).
//! - `gen-ctr26`: writes ctr26 samples as a libffm file for end-to-end runs.
//! - `gen-tasks`: writes the planted two-task data of the multi-task example;
//! - `gen-related-tasks`: the three related tasks of the cross-attention example.
//! - `gen-classes`: the planted 5-class data of the multi-class example.
//!
//! Every subcommand prints one JSON object per line.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use ps_benches::{ctr26, throughput};
use ps_common::config::Device;

mod compute;
mod stream;
mod traffic;

use compute::{compute, kernels};
use stream::{StreamArgs, stream_bench};
use traffic::{TrafficArgs, bytes_bench, ctr26_bench, ctr26_job};

#[derive(Debug, Parser)]
#[command(version, about = "Benchmarks of the parameter-server system")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Embedding gather and gradient scatter at realistic sizes, in GB/s.
    Kernels {
        /// cpu, cuda or cuda:N.
        #[arg(long, default_value = "cuda:0")]
        device: Device,
        /// Examples per launch (26 ids each, ctr26 layout).
        #[arg(long, default_value_t = 65_536)]
        examples: usize,
        /// Embedding dimension.
        #[arg(long, default_value_t = 16)]
        dim: usize,
        /// Timed launches per kernel.
        #[arg(long, default_value_t = 20)]
        iters: usize,
    },
    /// Forward+backward samples/s of a job's model, parameters in memory.
    Compute {
        /// The job file whose model is measured; `ctr26` uses the ctr26 batches.
        #[arg(long)]
        config: PathBuf,
        /// cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: Device,
        /// Examples per step.
        #[arg(long, default_value_t = 4096)]
        batch_size: usize,
        /// Timed steps (after 3 warm-up steps).
        #[arg(long, default_value_t = 50)]
        steps: usize,
        /// Where batches come from: `ctr26` (generated) or `job` (the job's training data).
        #[arg(long, default_value = "ctr26")]
        data: String,
    },
    /// The ctr26 workload end to end: M shards, N workers, batch 4096,
    /// warm-up then three timed windows; one JSON line.
    Ctr26 {
        /// Shards.
        #[arg(long, default_value_t = 2)]
        servers: u32,
        /// Workers.
        #[arg(long, default_value_t = 2)]
        workers: usize,
        /// Steps per worker in each of the three timed windows.
        #[arg(long, default_value_t = 200)]
        steps: usize,
        /// Warm-up steps per worker.
        #[arg(long, default_value_t = 20)]
        warmup: usize,
        /// Call the shards' services in this process (no network, no encoding).
        #[arg(long)]
        in_memory: bool,
        /// Give every shard a backup: pushes are acknowledged once it applied them.
        #[arg(long, conflicts_with = "in_memory")]
        replicated: bool,
        /// Give every shard a read replica (`ps-server --follow`).
        #[arg(long, conflicts_with = "in_memory")]
        followers: bool,
        /// Pre-generated batches per worker, reused in a cycle.
        #[arg(long, default_value_t = 32)]
        pool: usize,
        #[command(flatten)]
        traffic: TrafficArgs,
    },
    /// Bytes per worker step: a ring all-reduce of the ctr26 model's dense
    /// gradient (PyTorch DDP, dense) and an all-gather of each rank's
    /// coalesced sparse gradient (PyTorch DDP with sparse gradients, gloo)
    /// against the sparse pull + push measured through the real client and
    /// services (in memory), for N = 2, 4, .., 64 workers.
    Bytes {
        /// Shards.
        #[arg(long, default_value_t = 2)]
        servers: u32,
        /// Largest worker count (powers of two from 2).
        #[arg(long, default_value_t = 64)]
        max_workers: usize,
        /// Measured steps per worker in each of the three windows.
        #[arg(long, default_value_t = 2)]
        steps: usize,
        #[command(flatten)]
        traffic: TrafficArgs,
    },
    /// Recovery costs of one shard of `--rows` rows (Adagrad, `--dim`):
    /// writing its checkpoint, restoring it (what `ps-server --restore`
    /// does), and a new backup joining over loopback gRPC; one JSON line.
    Recovery {
        /// Rows in the shard.
        #[arg(long, default_value_t = 1_000_000)]
        rows: u64,
        /// Floats per row (the stored row is twice that with Adagrad).
        #[arg(long, default_value_t = 16)]
        dim: u32,
    },
    /// Resident memory per sparse row: RSS growth while pulls create
    /// `--rows` rows in one in-process shard, against the rows' raw floats;
    /// one JSON line.
    Memory {
        /// Rows to create.
        #[arg(long, default_value_t = 2_000_000)]
        rows: u64,
        /// Weights per row.
        #[arg(long, default_value_t = 16)]
        dim: u32,
        /// sgd, adagrad, adam or ftrl (its state is part of the raw bytes).
        #[arg(long, default_value = "adagrad")]
        optimizer: String,
    },
    /// An id stream that never ends (new ids arrive hottest and fade),
    /// trained unbounded, then within a memory budget of `--budget-share`
    /// of the unbounded run's peak (admission and LRU eviction), each run
    /// in a fresh process; one JSON line.
    Stream(StreamArgs),
    /// Pull latency of rows in memory and on the disk tier (one shard in
    /// this process), at 1 and 256 keys per pull; one JSON line.
    Tier {
        /// Rows in the table.
        #[arg(long, default_value_t = 1_000_000)]
        rows: u64,
        /// Weights per row (Adagrad).
        #[arg(long, default_value_t = 16)]
        dim: u32,
        /// Share of the rows moved to disk.
        #[arg(long, default_value_t = 0.9)]
        cold_share: f64,
        /// Timed pulls per kind and batch size.
        #[arg(long, default_value_t = 2_000)]
        pulls: usize,
    },
    /// Online predictions against a read replica while a worker trains
    /// (ctr26 model, in this process over loopback): predictions/s and
    /// p50/p99 latency at 1 and 256 instances per request, and freshness
    /// from an acknowledged write to a prediction that reflects it; one
    /// JSON line.
    Serve {
        /// Seconds each load phase runs.
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        /// Client threads (keep-alive connections) per phase.
        #[arg(long, default_value_t = 4)]
        clients: usize,
        /// Freshness probes.
        #[arg(long, default_value_t = 50)]
        probes: usize,
        /// The serving row cache's freshness bound (ms).
        #[arg(long, default_value_t = 200)]
        cache_freshness_ms: u64,
        /// Examples per training step.
        #[arg(long, default_value_t = 1024)]
        train_batch: usize,
        /// How long the predictor waits to batch requests together (us).
        #[arg(long, default_value_t = 0)]
        batch_wait_us: u64,
        /// Serve without training meanwhile (for comparison).
        #[arg(long)]
        no_training: bool,
    },
    /// Rows/s of the Rust client's pulls and pushes of `--batch` distinct
    /// ids against running servers (table `bench.emb`, created if absent);
    /// one JSON line. `ps-python/bench/rows.py` runs it beside the Python
    /// client.
    Client {
        /// The shards' addresses, comma-separated, in shard order.
        #[arg(long, value_delimiter = ',', required = true)]
        servers: Vec<String>,
        /// Distinct ids per call.
        #[arg(long, default_value_t = 4096)]
        batch: usize,
        /// Floats per row.
        #[arg(long, default_value_t = 16)]
        dim: u32,
        /// Timed calls of each kind.
        #[arg(long, default_value_t = 200)]
        iters: usize,
    },
    /// Write the planted two-task data (`label_a,label_b field:id:1 ...`)
    /// used by `examples/multitask-mmoe.toml`.
    GenTasks(GenArgs),
    /// Write the three related tasks (`click,buy,stay field:id:1 ...`)
    /// used by `examples/multitask-cross-attention.toml`; prints each
    /// task's oracle AUC.
    GenRelatedTasks(GenArgs),
    /// Write the planted 5-class data (`class field:id:1 ...`) used by
    /// `examples/multiclass-dnn.toml`; prints the oracle's top-1 accuracy.
    GenClasses(GenArgs),
    /// Write ctr26 samples as libffm lines.
    GenCtr26(GenArgs),
}

/// What a data generator writes.
#[derive(Debug, Args)]
struct GenArgs {
    /// Samples to write.
    #[arg(long)]
    rows: usize,
    /// Output file.
    #[arg(long)]
    out: PathBuf,
    /// Generator seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    ps_common::memory::keep_freed_memory();
    if let Command::Stream(args) = &cli.command
        && args.serves_disk_tier()
    {
        // As ps-server does with a disk tier.
        ps_common::memory::one_arena();
    }
    match cli.command {
        Command::Kernels {
            device,
            examples,
            dim,
            iters,
        } => kernels(device, examples, dim, iters),
        Command::Compute {
            config,
            device,
            batch_size,
            steps,
            data,
        } => compute(&config, device, batch_size, steps, &data),
        Command::Ctr26 {
            servers,
            workers,
            steps,
            warmup,
            in_memory,
            replicated,
            followers,
            pool,
            traffic,
        } => ctr26_bench(
            &throughput::Setup {
                servers,
                workers,
                warmup,
                steps,
                in_memory,
                replicated,
                followers,
            },
            pool,
            &traffic,
        ),
        Command::Bytes {
            servers,
            max_workers,
            steps,
            traffic,
        } => bytes_bench(servers, max_workers, steps, &traffic),
        Command::Serve {
            seconds,
            clients,
            probes,
            cache_freshness_ms,
            train_batch,
            batch_wait_us,
            no_training,
        } => {
            if clients == 0 || train_batch == 0 || !seconds.is_finite() || seconds <= 0.0 {
                bail!("--clients, --train-batch and --seconds must be > 0");
            }
            let setup = ps_benches::serve::Setup {
                seconds,
                clients,
                probes,
                cache_freshness: Duration::from_millis(cache_freshness_ms),
                train_batch,
                batch_wait: Duration::from_micros(batch_wait_us),
                train: !no_training,
            };
            let measured = ps_benches::serve::run(&ctr26_job()?, &setup)?;
            println!("{}", serde_json::to_string(&measured)?);
            Ok(())
        }
        Command::Recovery { rows, dim } => {
            let measured = ps_benches::recovery::measure(rows, dim)?;
            println!("{}", serde_json::to_string(&measured)?);
            Ok(())
        }
        Command::Memory {
            rows,
            dim,
            optimizer,
        } => {
            let measured = ps_benches::memory::measure(rows, dim, &optimizer)?;
            println!("{}", serde_json::to_string(&measured)?);
            Ok(())
        }
        Command::Stream(args) => stream_bench(&args),
        Command::Tier {
            rows,
            dim,
            cold_share,
            pulls,
        } => {
            let dir = std::env::temp_dir().join(format!("ps-bench-tier-{}", std::process::id()));
            let setup = ps_benches::tier::Setup {
                rows,
                dim,
                cold_share,
                pulls,
            };
            let report = ps_benches::tier::measure(setup, &dir);
            std::fs::remove_dir_all(&dir).ok();
            println!("{}", serde_json::to_string(&report?)?);
            Ok(())
        }
        Command::Client {
            servers,
            batch,
            dim,
            iters,
        } => {
            if !(1..=1 << 20).contains(&batch) {
                bail!("--batch must be between 1 and 1048576");
            }
            let setup = ps_benches::client_rows::Setup {
                servers,
                batch,
                dim,
                iters,
            };
            let runtime = tokio::runtime::Runtime::new()?;
            let report = runtime.block_on(ps_benches::client_rows::measure(&setup))?;
            println!("{}", serde_json::to_string(&report)?);
            Ok(())
        }
        Command::GenCtr26(GenArgs { rows, out, seed }) => write_data(&out, rows, |w| {
            ctr26::Generator::new(seed).write_libffm(rows, w)
        }),
        Command::GenTasks(GenArgs { rows, out, seed }) => write_data(&out, rows, |w| {
            ps_worker::synthetic::write_shared_tasks(w, None, rows, seed)
        }),
        Command::GenRelatedTasks(GenArgs { rows, out, seed }) => write_data(&out, rows, |w| {
            let truth = ps_worker::synthetic::write_related_tasks(w, rows, seed)?;
            for (task, (probs, labels)) in ["click", "buy", "stay"].iter().zip(&truth) {
                let auc = ps_worker::metrics::auc(probs, labels);
                println!("{{\"task\":\"{task}\",\"oracle_auc\":{auc:.4}}}");
            }
            Ok(())
        }),
        Command::GenClasses(GenArgs { rows, out, seed }) => write_data(&out, rows, |w| {
            let (probs, labels) = ps_worker::synthetic::write_classes(w, rows, seed)?;
            let oracle = ps_worker::metrics::BinaryMetrics::multiclass(
                &probs,
                &labels,
                ps_worker::synthetic::PLANTED_CLASSES,
            );
            println!(
                "{{\"oracle_top1\":{:.4},\"oracle_logloss\":{:.4}}}",
                oracle.accuracy, oracle.logloss
            );
            Ok(())
        }),
    }
}

/// Creates `out` (and its folder) and fills it with `write`.
fn write_data(
    out: &Path,
    rows: usize,
    write: impl FnOnce(&mut BufWriter<std::fs::File>) -> std::io::Result<()>,
) -> anyhow::Result<()> {
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let file = std::fs::File::create(out)
        .with_context(|| format!("cannot create --out {}", out.display()))?;
    let mut w = BufWriter::new(file);
    write(&mut w).with_context(|| format!("cannot write {}", out.display()))?;
    w.flush()?;
    println!(
        "{{\"wrote\":{rows},\"file\":{:?}}}",
        out.display().to_string()
    );
    Ok(())
}
