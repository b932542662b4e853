//! `ps-bench ctr26` and `ps-bench bytes`: the ctr26 workload end to end
//! through real shards, with the job's `[communication]` options from the
//! command line, and the bytes it moves against collectives'.

use anyhow::{Context, bail};
use clap::Args;
use ps_benches::{ctr26, throughput};
use ps_common::config::{CommunicationConfig, JobConfig, WireValues};
use ps_worker::data::Batch;
use std::path::Path;

/// `[communication]` options of the measured job.
#[derive(Debug, Clone, Args)]
pub(crate) struct TrafficArgs {
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

fn wire_values(s: &str) -> Result<WireValues, String> {
    match s {
        "f32" => Ok(WireValues::F32),
        "f16" => Ok(WireValues::F16),
        "bf16" => Ok(WireValues::Bf16),
        other => Err(format!("expected f32, f16 or bf16, got {other:?}")),
    }
}

/// The ctr26 job: `examples/ctr26.toml` (its data path is not read).
pub(crate) fn ctr26_job() -> anyhow::Result<JobConfig> {
    JobConfig::from_toml(
        include_str!("../../../../examples/ctr26.toml"),
        Path::new("."),
    )
    .context("examples/ctr26.toml no longer parses")
}

pub(crate) fn ctr26_bench(
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

pub(crate) fn bytes_bench(
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
