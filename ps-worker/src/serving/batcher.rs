//! Bounded-time batching: the requests waiting when a batch starts, and
//! those that arrive within `batch_wait` of the first one, share one
//! executed batch (up to `max_batch` instances), so concurrent small
//! requests cost one pull and one forward pass. Under load requests queue
//! while batches run, so they batch with no wait at all (the default). At most `max_waiting` requests wait; more are refused at once
//! rather than queued without bound. At most `max_running` batches are
//! computed at a time.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{Semaphore, mpsc, oneshot};

use super::{Engine, ServeConfig, ServeError, ServeMetrics};
use crate::data::Batch;

type Reply = oneshot::Sender<Result<Vec<f32>, ServeError>>;

/// A request waiting for its batch.
struct Waiting {
    batch: Batch,
    reply: Reply,
}

/// The front of the batching task (cheap to clone).
#[derive(Debug, Clone)]
pub struct Batcher {
    queue: mpsc::Sender<Waiting>,
}

impl std::fmt::Debug for Waiting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Waiting")
            .field("instances", &self.batch.len())
            .finish()
    }
}

impl Batcher {
    /// Starts batching for `engine` on the current runtime; the task ends
    /// when every clone of the batcher is dropped.
    pub fn start(engine: Arc<Engine>, config: &ServeConfig, metrics: Arc<ServeMetrics>) -> Batcher {
        let (queue, waiting) = mpsc::channel(config.max_waiting.max(1));
        tokio::spawn(run(engine, waiting, config.clone(), metrics));
        Batcher { queue }
    }

    /// The probabilities of `batch`'s examples, computed in a batch shared
    /// with the requests that arrive meanwhile.
    pub async fn predict(&self, batch: Batch) -> Result<Vec<f32>, ServeError> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .try_send(Waiting { batch, reply })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => ServeError::Overloaded(
                    "too many prediction requests are waiting: retry later".into(),
                ),
                mpsc::error::TrySendError::Closed(_) => {
                    ServeError::Internal("the batcher stopped".into())
                }
            })?;
        answer
            .await
            .map_err(|_| ServeError::Internal("the batch was dropped".into()))?
    }
}

async fn run(
    engine: Arc<Engine>,
    mut waiting: mpsc::Receiver<Waiting>,
    config: ServeConfig,
    metrics: Arc<ServeMetrics>,
) {
    let running = Arc::new(Semaphore::new(config.max_running.max(1)));
    while let Some(first) = waiting.recv().await {
        let group = gather(first, &mut waiting, &config).await;
        let Ok(permit) = Arc::clone(&running).acquire_owned().await else {
            return;
        };
        let (engine, metrics) = (Arc::clone(&engine), Arc::clone(&metrics));
        tokio::spawn(async move {
            let _running = permit;
            execute(&engine, group, &metrics).await;
        });
    }
}

/// `first` and the requests that share its batch: those queued, and those
/// arriving within `batch_wait`, up to `max_batch` instances.
async fn gather(
    first: Waiting,
    waiting: &mut mpsc::Receiver<Waiting>,
    config: &ServeConfig,
) -> Vec<Waiting> {
    let deadline = tokio::time::Instant::now() + config.batch_wait;
    let mut instances = first.batch.len();
    let mut group = vec![first];
    while instances < config.max_batch {
        // Without a wait, only the requests already queued join: a timeout
        // of zero would still sleep until the timer's next tick (up to a
        // millisecond, which was most of a lone prediction's latency).
        let next = if config.batch_wait.is_zero() {
            waiting.try_recv().ok()
        } else {
            tokio::time::timeout_at(deadline, waiting.recv())
                .await
                .ok()
                .flatten()
        };
        let Some(next) = next else { break };
        instances += next.batch.len();
        group.push(next);
    }
    group
}

/// Computes one batch of requests and answers each with its share.
async fn execute(engine: &Engine, group: Vec<Waiting>, metrics: &ServeMetrics) {
    let started = Instant::now();
    let merged = if group.len() == 1 {
        None
    } else {
        let mut merged = Batch::new();
        for w in &group {
            merged.append(&w.batch);
        }
        Some(merged)
    };
    let batch = merged.as_ref().unwrap_or(&group[0].batch);
    let result = engine.predict(batch).await;
    let instances = batch.len();
    metrics.batch_instances.observe(instances as f64);
    metrics
        .batch_seconds
        .observe(started.elapsed().as_secs_f64());
    let outputs = engine.outputs();
    match result {
        Ok(probs) => {
            let mut at = 0;
            for w in group {
                let n = w.batch.len() * outputs;
                let share = probs.get(at..at + n).map(<[f32]>::to_vec).ok_or_else(|| {
                    ServeError::Internal(format!(
                        "the model answered {} probabilities for a batch of {} examples",
                        probs.len(),
                        instances
                    ))
                });
                at += n;
                let _ = w.reply.send(share);
            }
        }
        Err(e) => {
            for w in group {
                let _ = w.reply.send(Err(e.clone()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn request() -> Waiting {
        Waiting {
            batch: Batch::new(),
            reply: oneshot::channel().0,
        }
    }

    fn config(batch_wait: Duration) -> ServeConfig {
        ServeConfig {
            batch_wait,
            ..ServeConfig::new("m")
        }
    }

    /// Under a paused clock, any timer the batcher set would move time on
    /// (the runtime skips ahead to it when idle): time standing still
    /// shows that no request waited for one.
    #[tokio::test(start_paused = true)]
    async fn without_a_wait_a_batch_takes_the_queued_requests_and_sets_no_timer() {
        // Between two ticks of the timer, where a zero timeout would sleep
        // to the next one.
        tokio::time::advance(Duration::from_micros(300)).await;
        let (queue, mut waiting) = mpsc::channel(8);
        for _ in 0..2 {
            queue.try_send(request()).unwrap();
        }
        let started = tokio::time::Instant::now();
        let group = gather(request(), &mut waiting, &config(Duration::ZERO)).await;
        assert_eq!(group.len(), 3, "the first and the two queued");
        assert_eq!(tokio::time::Instant::now(), started, "no timer ran");
        let alone = gather(request(), &mut waiting, &config(Duration::ZERO)).await;
        assert_eq!(alone.len(), 1);
        assert_eq!(tokio::time::Instant::now(), started, "no timer ran");
    }

    #[tokio::test(start_paused = true)]
    async fn with_a_wait_requests_arriving_within_it_join_and_later_ones_do_not() {
        let (queue, mut waiting) = mpsc::channel(8);
        let sender = queue.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(3)).await;
            sender.try_send(request()).unwrap();
            tokio::time::sleep(Duration::from_millis(10)).await;
            sender.try_send(request()).unwrap();
        });
        let started = tokio::time::Instant::now();
        let group = gather(request(), &mut waiting, &config(Duration::from_millis(5))).await;
        assert_eq!(
            group.len(),
            2,
            "the one at 3 ms joined, the one at 13 ms did not"
        );
        assert_eq!(started.elapsed(), Duration::from_millis(5));
    }
}
