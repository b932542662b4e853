//! `ps-bench kernels` and `ps-bench compute`: a worker's compute measured
//! without servers, the embedding kernels alone and a job's whole
//! forward + backward step, on the CPU and on a CUDA device.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use ps_benches::ctr26;
use ps_common::config::{Device, JobConfig};
use ps_worker::backend::conformance::Rng;
use ps_worker::backend::cpu::CpuBackend;
use ps_worker::backend::cuda::CudaBackend;
use ps_worker::backend::{Backend, Pooling, SparsePlan};
use ps_worker::data::Batch;
use ps_worker::model::{Mode, Model};

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

pub(crate) fn kernels(
    device: Device,
    examples: usize,
    dim: usize,
    iters: usize,
) -> anyhow::Result<()> {
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

pub(crate) fn compute(
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
