//! `ps-bench stream`: a drifting id stream trained against an unbounded
//! shard and one held to a memory budget (`ps_benches::stream`), each in a
//! server process of its own.

use anyhow::{Context, bail};
use clap::Args;

/// The stream measured by `ps-bench stream` (see `ps_benches::stream`).
#[derive(Debug, Clone, Args)]
pub(crate) struct StreamArgs {
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
    /// Whether this process is a run's server with a disk tier.
    pub(crate) fn serves_disk_tier(&self) -> bool {
        self.serve_disk_tier.is_some()
    }

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

pub(crate) fn stream_bench(args: &StreamArgs) -> anyhow::Result<()> {
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

fn eviction_policy(s: &str) -> Result<ps_common::lifecycle::EvictionPolicy, String> {
    match s {
        "lru" => Ok(ps_common::lifecycle::EvictionPolicy::Lru),
        "lfu" => Ok(ps_common::lifecycle::EvictionPolicy::Lfu),
        other => Err(format!("expected lru or lfu, got {other:?}")),
    }
}
