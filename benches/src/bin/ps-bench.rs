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
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use ps_benches::{ctr26, throughput};
use ps_common::config::{CommunicationConfig, Device, JobConfig, WireValues};
use ps_worker::backend::conformance::Rng;
use ps_worker::backend::cpu::CpuBackend;
use ps_worker::backend::cuda::CudaBackend;
use ps_worker::backend::{Backend, Pooling, SparsePlan};
use ps_worker::data::Batch;
use ps_worker::model::{Mode, Model};

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

/// The stream measured by `ps-bench stream` (see `ps_benches::stream`).
#[derive(Debug, Clone, Args)]
struct StreamArgs {
    /// Training steps.
    #[arg(long, default_value_t = 12_000)]
    steps: u64,
    /// Samples per step (8 ids each).
    #[arg(long, default_value_t = 1024)]
    batch: usize,
    /// Ages an id is drawn from (log-uniform).
    #[arg(long, default_value_t = 20_000)]
    window: u64,
    /// Ids per field the head of the stream moves per step (the default
    /// turns the window over 12 times in 12,000 steps).
    #[arg(long, default_value_t = 20)]
    drift: u64,
    /// Held-back samples scored after training.
    #[arg(long, default_value_t = 20_000)]
    val_samples: usize,
    /// Pushes an id needs before it gets a row (bounded run; 1: no admission).
    #[arg(long, default_value_t = 2)]
    min_count: u32,
    /// The budget as a share of the unbounded run's peak table bytes.
    #[arg(long, default_value_t = 0.25)]
    budget_share: f64,
    /// Which rows the bounded run evicts first: lru or lfu.
    #[arg(long, default_value = "lru", value_parser = eviction_policy)]
    policy: ps_common::lifecycle::EvictionPolicy,
    /// Stream seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// The bounded run's server moves evicted rows to a disk tier (in a
    /// temporary folder) instead of dropping them.
    #[arg(long)]
    disk_tier: bool,
    /// Serve the measured shard with this budget in bytes (0: none) until
    /// killed: the server process of a run.
    #[arg(long, hide = true)]
    serve: Option<u64>,
    /// The served shard's disk tier folder (with --serve).
    #[arg(long, hide = true)]
    serve_disk_tier: Option<std::path::PathBuf>,
}

impl StreamArgs {
    fn setup(&self, memory_budget: Option<u64>) -> ps_benches::stream::Setup {
        ps_benches::stream::Setup {
            steps: self.steps,
            batch: self.batch,
            window: self.window,
            drift: self.drift,
            val_samples: self.val_samples,
            min_count: self.min_count,
            policy: self.policy,
            memory_budget,
            disk_tier: self.disk_tier && memory_budget.is_some(),
            seed: self.seed,
        }
    }

    /// One run with `budget` bytes (0: none), against a fresh server process.
    fn run(&self, budget: u64) -> anyhow::Result<ps_benches::stream::Run> {
        let exe = std::env::current_exe().context("cannot find this executable")?;
        let mut serve = std::process::Command::new(exe);
        serve.args(["stream", "--serve", &budget.to_string()]);
        // The server's policy comes with the table spec; the budget and
        // the disk tier are its own.
        let disk = (self.disk_tier && budget > 0).then(|| {
            std::env::temp_dir().join(format!("ps-bench-stream-tier-{}", std::process::id()))
        });
        if let Some(dir) = &disk {
            serve.arg("--serve-disk-tier").arg(dir);
        }
        let run = ps_benches::stream::run(&self.setup((budget > 0).then_some(budget)), serve);
        if let Some(dir) = &disk {
            std::fs::remove_dir_all(dir).ok();
        }
        run
    }
}

fn stream_bench(args: &StreamArgs) -> anyhow::Result<()> {
    if !(args.budget_share > 0.0 && args.budget_share <= 1.0) {
        bail!(
            "--budget-share must be in (0, 1], got {}",
            args.budget_share
        );
    }
    if let Some(budget) = args.serve {
        return ps_benches::stream::serve(
            (budget > 0).then_some(budget),
            args.serve_disk_tier.as_deref(),
        );
    }
    let unbounded = args.run(0)?;
    let budget = ((unbounded.peak_table_bytes as f64 * args.budget_share) as u64).max(1);
    let bounded = args.run(budget)?;
    let report = ps_benches::stream::Report::of(args.setup(Some(budget)), &bounded, &unbounded);
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// `[communication]` options of the measured job.
#[derive(Debug, Clone, Args)]
struct TrafficArgs {
    /// Encoding of pulled values: f32, f16 or bf16.
    #[arg(long, default_value = "f32", value_parser = wire_values)]
    pull_values: WireValues,
    /// Encoding of pushed gradients: f32, f16 or bf16.
    #[arg(long, default_value = "f32", value_parser = wire_values)]
    push_values: WireValues,
    /// Send keys sorted, delta + varint encoded.
    #[arg(long)]
    delta_keys: bool,
    /// Push a sparse row only once a component of its accumulated gradient reaches this.
    #[arg(long)]
    significance_threshold: Option<f32>,
    /// Push this fraction of each dense table's rows (largest first), keep the rest.
    #[arg(long)]
    dense_top_k: Option<f32>,
    /// Keep rows seen in two steps in a row on the worker for this many
    /// steps, summing their gradients (0: off).
    #[arg(long, default_value_t = 0)]
    row_cache_steps: u64,
}

impl TrafficArgs {
    fn config(&self) -> CommunicationConfig {
        CommunicationConfig {
            pull_values: self.pull_values,
            push_values: self.push_values,
            delta_keys: self.delta_keys,
            significance_threshold: self.significance_threshold,
            dense_top_k: self.dense_top_k,
            row_cache_steps: self.row_cache_steps,
            row_cache_rows: None,
        }
    }
}

fn eviction_policy(s: &str) -> Result<ps_common::lifecycle::EvictionPolicy, String> {
    match s {
        "lru" => Ok(ps_common::lifecycle::EvictionPolicy::Lru),
        "lfu" => Ok(ps_common::lifecycle::EvictionPolicy::Lfu),
        other => Err(format!("expected lru or lfu, got {other:?}")),
    }
}

fn wire_values(s: &str) -> Result<WireValues, String> {
    match s {
        "f32" => Ok(WireValues::F32),
        "f16" => Ok(WireValues::F16),
        "bf16" => Ok(WireValues::Bf16),
        other => Err(format!("expected f32, f16 or bf16, got {other:?}")),
    }
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
    if let Command::Stream(StreamArgs {
        serve_disk_tier: Some(_),
        ..
    }) = &cli.command
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

fn cuda(device: Device) -> anyhow::Result<CudaBackend> {
    match device {
        Device::Cuda(i) => Ok(CudaBackend::new(i)?),
        Device::Cpu => bail!("this measurement needs --device cuda[:N]"),
    }
}

/// Median seconds of `iters` runs of `f` (after one warm-up run).
fn median_seconds(iters: usize, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<f64> {
    f()?;
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters.max(1) {
        let started = Instant::now();
        f()?;
        times.push(started.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

fn kernels(device: Device, examples: usize, dim: usize, iters: usize) -> anyhow::Result<()> {
    let batch = ctr26::Generator::new(7).batch(examples);
    let unique_keys = ps_worker::dedup::UniqueKeys::new(&batch.ids);
    let unique = unique_keys.keys.len();
    let plan = Arc::new(SparsePlan::new(
        &batch.offsets,
        &unique_keys.index,
        &batch.values,
        Some(&batch.fields),
        ctr26::FIELDS as usize,
        unique,
    ));
    let entries = plan.entries();
    let mut rng = Rng::new(1);
    let rows = rng.vec(unique * dim);
    let grad = rng.vec(entries * dim);
    // Bytes each kernel must move at least: table rows read per occurrence,
    // the occurrence's index and value, and the output written.
    let gather_bytes = entries * (dim * 4 + 8) + entries * dim * 4;
    let scatter_bytes = entries * (dim * 4 + 12) + unique * dim * 4;
    let report = |name: &str, device: &str, seconds: f64, bytes: usize, ceiling: Option<f64>| {
        let gbs = bytes as f64 / seconds / 1e9;
        let mut line = format!(
            "{{\"kernel\":\"{name}\",\"device\":{device:?},\"rows_touched\":{entries},\"distinct_rows\":{unique},\"dim\":{dim},\"median_ms\":{:.4},\"gb_per_s\":{gbs:.1}",
            seconds * 1e3
        );
        if let Some(c) = ceiling {
            line += &format!(
                ",\"copy_gb_per_s\":{:.1},\"fraction_of_copy\":{:.3}",
                c / 1e9,
                gbs * 1e9 / c
            );
        }
        println!("{line}}}");
    };
    let cpu = CpuBackend;
    let (cr, cg) = (
        cpu.upload(&rows, unique, dim)?,
        cpu.upload(&grad, entries, dim)?,
    );
    let cp = cpu.upload_plan(&plan)?;
    let t = median_seconds(iters.min(5), || {
        cpu.gather_pool(&cr, &cp, Pooling::Field)?;
        Ok(())
    })?;
    report("gather_pool", "cpu", t, gather_bytes, None);
    let t = median_seconds(iters.min(5), || {
        cpu.scatter_pool(&cg, &cp, Pooling::Field)?;
        Ok(())
    })?;
    report("scatter_pool", "cpu", t, scatter_bytes, None);
    if device == Device::Cpu {
        return Ok(());
    }
    let gpu = cuda(device)?;
    let name = gpu.name();
    let copy = gpu.copy_bandwidth(1 << 30, 20)?;
    println!(
        "{{\"kernel\":\"device_copy\",\"device\":{name:?},\"bytes\":{},\"gb_per_s\":{:.1}}}",
        1u64 << 30,
        copy / 1e9
    );
    let (gr, gg) = (
        gpu.upload(&rows, unique, dim)?,
        gpu.upload(&grad, entries, dim)?,
    );
    let gp = gpu.upload_plan(&plan)?;
    // Launches are timed in groups of 10 (one synchronize per group) so the
    // host round trip does not count; the result is per launch.
    let t = median_seconds(iters, || {
        for _ in 0..10 {
            gpu.gather_pool(&gr, &gp, Pooling::Field)?;
        }
        gpu.synchronize()?;
        Ok(())
    })? / 10.0;
    report("gather_pool", &name, t, gather_bytes, Some(copy));
    // Each scatter allocates its chunk partials and output; their bytes are
    // not counted.
    let t = median_seconds(iters, || {
        for _ in 0..10 {
            gpu.scatter_pool(&gg, &gp, Pooling::Field)?;
        }
        gpu.synchronize()?;
        Ok(())
    })? / 10.0;
    report("scatter_pool", &name, t, scatter_bytes, Some(copy));
    let agree = ps_worker::backend::conformance::compare(&gpu, &cpu, 3)?;
    let worst = agree.iter().fold(0f32, |m, a| m.max(a.relative_error));
    println!(
        "{{\"parity_pairs\":{},\"worst_relative_error\":{worst:.3e}}}",
        agree.len()
    );
    Ok(())
}

fn load_job(path: &Path) -> anyhow::Result<JobConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read job file {}", path.display()))?;
    JobConfig::from_toml(&text, path.parent().unwrap_or(Path::new(".")))
        .with_context(|| format!("invalid job file {}", path.display()))
}

fn compute(
    config: &Path,
    device: Device,
    batch_size: usize,
    steps: usize,
    data: &str,
) -> anyhow::Result<()> {
    let job = load_job(config)?;
    let model = Model::from_job(&job);
    let batches: Vec<Batch> = match data {
        "ctr26" => {
            let mut g = ctr26::Generator::new(11);
            (0..8).map(|_| g.batch(batch_size)).collect()
        }
        "job" => ps_worker::data::Batches::for_job(
            &job,
            &job.data.train,
            0,
            1,
            batch_size,
            &Default::default(),
        )?
        .take(8)
        .collect::<Result<_, _>>()?,
        other => bail!("--data must be ctr26 or job, got {other:?}"),
    };
    let mut rng = Rng::new(5);
    let pulled: Vec<_> = batches
        .iter()
        .map(|b| {
            model.pulled_from(b, |t, n| {
                let scale = if t.rows.is_some() { 0.1 } else { 0.01 };
                rng.vec(n).into_iter().map(|v| v * scale).collect()
            })
        })
        .collect();
    let samples: usize = batches.iter().map(Batch::len).sum::<usize>() / batches.len().max(1);
    // Seconds for `steps` steps after 3 warm-up steps.
    let run = |step_fn: &dyn Fn(usize) -> anyhow::Result<f64>| -> anyhow::Result<f64> {
        for step in 0..3 {
            step_fn(step)?;
        }
        let started = Instant::now();
        for step in 0..steps {
            step_fn(step)?;
        }
        Ok(started.elapsed().as_secs_f64())
    };
    let seconds = match device {
        Device::Cpu => {
            let b = CpuBackend;
            run(&|step| {
                let p = &pulled[step % pulled.len()];
                Ok(model
                    .compute(&b, p, Mode::Train { seed: step as u64 })?
                    .loss_sum)
            })?
        }
        Device::Cuda(_) => {
            let b = cuda(device)?;
            run(&|step| {
                let p = &pulled[step % pulled.len()];
                Ok(model
                    .compute(&b, p, Mode::Train { seed: step as u64 })?
                    .loss_sum)
            })?
        }
    };
    println!(
        "{{\"bench\":\"compute\",\"model\":\"{}\",\"config\":{:?},\"data\":\"{data}\",\"device\":\"{device}\",\"batch_size\":{samples},\"steps\":{steps},\"samples_per_sec\":{:.0},\"ms_per_step\":{:.3}}}",
        job.model.kind_name(),
        config.display().to_string(),
        (samples * steps) as f64 / seconds,
        seconds * 1e3 / steps as f64
    );
    Ok(())
}

/// The ctr26 job: `examples/ctr26.toml` (its data path is not read).
fn ctr26_job() -> anyhow::Result<JobConfig> {
    JobConfig::from_toml(include_str!("../../../examples/ctr26.toml"), Path::new("."))
        .context("examples/ctr26.toml no longer parses")
}

fn ctr26_bench(
    setup: &throughput::Setup,
    pool: usize,
    traffic: &TrafficArgs,
) -> anyhow::Result<()> {
    if setup.servers == 0 || setup.workers == 0 || setup.steps == 0 || pool == 0 {
        bail!("--servers, --workers, --steps and --pool must be at least 1");
    }
    let job = ctr26_job_with(traffic)?;
    let m = throughput::run(&job, setup, ctr26_pools(&job, setup.workers, pool))?;
    let mut line = serde_json::json!({
        "bench": "ctr26",
        "transport": if setup.in_memory { "in_memory" } else { "grpc" },
        "servers": setup.servers,
        "workers": setup.workers,
        "batch_size": job.train.batch_size,
        "warmup_steps": setup.warmup,
        "communication": job.communication,
    });
    if let (Some(obj), serde_json::Value::Object(measured)) =
        (line.as_object_mut(), serde_json::to_value(&m)?)
    {
        obj.extend(measured);
    }
    println!("{line}");
    Ok(())
}

/// The ctr26 job with `traffic`'s options, checked.
fn ctr26_job_with(traffic: &TrafficArgs) -> anyhow::Result<JobConfig> {
    let mut job = ctr26_job()?;
    job.communication = traffic.config();
    if let Err((flag, message)) = job.communication.validate() {
        bail!("--{}: {message}", flag.replace('_', "-"));
    }
    Ok(job)
}

/// `pool` ctr26 batches for each of `workers` workers (distinct seeds).
fn ctr26_pools(job: &JobConfig, workers: usize, pool: usize) -> Vec<Vec<Batch>> {
    (0..workers)
        .map(|w| {
            let mut g = ctr26::Generator::new(1000 + w as u64);
            (0..pool).map(|_| g.batch(job.train.batch_size)).collect()
        })
        .collect()
}

fn bytes_bench(
    servers: u32,
    max_workers: usize,
    steps: usize,
    traffic: &TrafficArgs,
) -> anyhow::Result<()> {
    if servers == 0 || max_workers < 2 || steps == 0 {
        bail!("--servers >= 1, --max-workers >= 2 and --steps >= 1 are needed");
    }
    let job = ctr26_job_with(traffic)?;
    // What each collective moves, from the tables once: an all-reduce the
    // gradient of every parameter; PyTorch DDP with sparse gradients (gloo)
    // all-gathers each rank's coalesced sparse gradient (an int64 index and
    // the row's floats per distinct row) and all-reduces the dense tables.
    let (mut model_bytes, mut dense_bytes, mut sparse_row_bytes) = (0u64, 0u64, 0u64);
    for spec in job.table_specs() {
        let row = u64::from(spec.dim) * 4;
        match spec.kind {
            ps_common::TableKind::Dense { rows, .. } => {
                model_bytes += rows * row;
                dense_bytes += rows * row;
            }
            ps_common::TableKind::Sparse => {
                model_bytes += ctr26::ROWS * row;
                sparse_row_bytes += 8 + row;
            }
        }
    }
    let mut workers = 2;
    while workers <= max_workers {
        let pools = ctr26_pools(&job, workers, 2);
        let batches = pools.iter().flatten().count().max(1) as f64;
        let distinct_rows = pools
            .iter()
            .flatten()
            .map(|b| ps_worker::dedup::UniqueKeys::new(&b.ids).keys.len() as f64)
            .sum::<f64>()
            / batches;
        let setup = throughput::Setup {
            servers,
            workers,
            warmup: 1,
            steps,
            in_memory: true,
            replicated: false,
            followers: false,
        };
        let m = throughput::run(&job, &setup, pools)?;
        let n = workers as f64;
        // Bytes in + out per rank, as the pull + push beside them: a ring
        // all-reduce sends and receives 2(N-1)/N of the gradient; in an
        // all-gather every other rank's share passes through each rank
        // once, in and out.
        let allreduce = 4.0 * (n - 1.0) / n * model_bytes as f64;
        let allgather = 2.0 * (n - 1.0) * distinct_rows * sparse_row_bytes as f64
            + 4.0 * (n - 1.0) / n * dense_bytes as f64;
        let ps = m.pull_bytes_per_step + m.push_bytes_per_step;
        println!(
            "{}",
            serde_json::json!({
                "bench": "bytes",
                "workers": workers,
                "batch_size": job.train.batch_size,
                "model_bytes": model_bytes,
                "allreduce_bytes_per_worker_step": allreduce.round(),
                "ps_pull_bytes_per_step": m.pull_bytes_per_step.round(),
                "ps_push_bytes_per_step": m.push_bytes_per_step.round(),
                "allreduce_over_ps": allreduce / ps,
                "distinct_rows_per_worker_step": distinct_rows.round(),
                "sparse_allgather_bytes_per_worker_step": allgather.round(),
                "sparse_allgather_over_ps": allgather / ps,
                "communication": job.communication,
            })
        );
        workers *= 2;
    }
    Ok(())
}
