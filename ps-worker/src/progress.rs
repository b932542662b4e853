//! Training progress: a live bar per worker when stdout is a terminal,
//! plain periodic log lines otherwise (files, pipes, Kubernetes logs).

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

/// One worker's progress reporter.
#[derive(Debug)]
pub struct Progress {
    rank: usize,
    log_every: u64,
    started: Instant,
    bar: Option<ProgressBar>,
}

impl Progress {
    /// A reporter for worker `rank`, drawing its bar among `bars` (the
    /// workers of one process share a terminal); `log_every` steps between
    /// log lines (0: no progress output at all).
    pub fn new(rank: usize, log_every: usize, bars: &MultiProgress) -> Progress {
        let bar = (log_every > 0 && std::io::stdout().is_terminal()).then(|| {
            let bar = bars.add(ProgressBar::new_spinner());
            bar.set_style(
                ProgressStyle::with_template("{spinner} worker {prefix}: {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            bar.set_prefix(rank.to_string());
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Progress {
            rank,
            log_every: log_every as u64,
            started: Instant::now(),
            bar,
        }
    }

    /// After each step: `samples` and `steps` so far, the epoch's running loss.
    pub fn step(&self, epoch: usize, steps: u64, samples: u64, loss: f64) {
        if self.log_every == 0 || (self.bar.is_none() && !steps.is_multiple_of(self.log_every)) {
            return;
        }
        let rate = samples as f64 / self.started.elapsed().as_secs_f64().max(1e-9);
        match &self.bar {
            // Formatting every step would cost more than small steps do.
            Some(_) if !steps.is_multiple_of(16) => {}
            Some(bar) => bar.set_message(format!(
                "epoch {epoch} step {steps} loss {loss:.4} {rate:.0} samples/s"
            )),
            None => tracing::info!(
                worker = self.rank,
                epoch,
                step = steps,
                loss = format_args!("{loss:.4}"),
                samples_per_sec = format_args!("{rate:.0}"),
                "training"
            ),
        }
    }

    /// Clears the bar (log lines stay as they are).
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}
