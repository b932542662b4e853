//! Pulls running ahead of the training loop: each batch is handed out
//! with its parameters, and the pull of the next one is already in flight
//! (as far as the job's consistency model allows).

use std::sync::Arc;

use ps_common::PsError;
use tokio::runtime::Handle;
use tokio::task::JoinHandle;

use super::TrainError;
use crate::cache::RowCache;
use crate::client::PsClient;
use crate::consistency::{Gate, Schedule};
use crate::data::{Batch, DataError};
use crate::model::{Model, Pulled};

/// Batches paired with their pulled parameters, one pull running ahead
/// (as far as the job's consistency model allows: see [`Gate`]).
pub struct Prefetched<I> {
    runtime: Handle,
    client: PsClient,
    model: Arc<Model>,
    batches: I,
    gate: Option<Arc<Gate>>,
    /// Hot sparse rows served without a pull (`communication.row_cache_steps`).
    cache: Option<Arc<RowCache>>,
    /// The step of the next batch handed out.
    step: u64,
    pending: Option<JoinHandle<Result<Pulled, PsError>>>,
}

impl<I: Iterator<Item = Result<Batch, DataError>>> Prefetched<I> {
    /// Pulls for `model`'s tables through `client` on `runtime`, with no
    /// consistency gate (async training, evaluation).
    pub fn new(runtime: &Handle, client: &PsClient, model: &Arc<Model>, batches: I) -> Self {
        Prefetched {
            runtime: runtime.clone(),
            client: client.clone(),
            model: Arc::clone(model),
            batches,
            gate: None,
            cache: None,
            step: 0,
            pending: None,
        }
    }

    /// Serves sparse rows through `cache` (pulls of step s read what it
    /// holds fresh for s).
    pub fn with_cache(mut self, cache: Option<Arc<RowCache>>) -> Self {
        self.cache = cache;
        self
    }

    /// Orders pulls through `gate`; the first batch is step `first_step`
    /// of this worker.
    pub fn with_gate(mut self, gate: Option<Arc<Gate>>, first_step: u64) -> Self {
        self.gate = gate;
        self.step = first_step;
        self
    }

    fn schedule(&self) -> Option<Schedule> {
        self.gate.as_ref().map(|g| g.schedule())
    }

    /// Starts the pull of the next batch (step `step`), if there is one.
    fn start_next(&mut self, step: u64) -> Result<(), TrainError> {
        if let Some(batch) = self.batches.next().transpose()? {
            let (client, model, gate, cache) = (
                self.client.clone(),
                Arc::clone(&self.model),
                self.gate.clone(),
                self.cache.clone(),
            );
            self.pending = Some(self.runtime.spawn(async move {
                let cache = cache.as_deref().map(|c| (c, step));
                match gate {
                    Some(gate) if gate.schedule() == Schedule::Hybrid => {
                        model.pull_sparse(&client, &batch, cache).await
                    }
                    Some(gate) => {
                        gate.ahead(step).await?;
                        model.pull_through(&client, &batch, cache).await
                    }
                    None => model.pull_through(&client, &batch, cache).await,
                }
            }));
        }
        Ok(())
    }

    /// The next batch with its parameters; the pull after it is started
    /// first, except in lockstep, where it must wait for this step's pushes.
    /// Must be called from a thread that is not a runtime worker.
    pub fn next_pulled(&mut self) -> Result<Option<Pulled>, TrainError> {
        let step = self.step;
        if let (Some(Schedule::Lockstep), Some(gate)) = (self.schedule(), self.gate.clone()) {
            let Some(batch) = self.batches.next().transpose()? else {
                return Ok(None);
            };
            let model = Arc::clone(&self.model);
            let pulled = self.runtime.block_on(async {
                gate.before_pull(step).await?;
                let pulled = model.pull(&self.client, &batch).await?;
                gate.after_pull(step).await?;
                Ok::<_, PsError>(pulled)
            })?;
            self.step += 1;
            return Ok(Some(pulled));
        }
        if self.pending.is_none() {
            self.start_next(step)?;
        }
        let Some(current) = self.pending.take() else {
            return Ok(None);
        };
        self.start_next(step + 1)?;
        let mut pulled = self
            .runtime
            .block_on(current)
            .map_err(|e| TrainError::Task(e.to_string()))??;
        if let (Some(Schedule::Hybrid), Some(gate)) = (self.schedule(), self.gate.clone()) {
            let model = Arc::clone(&self.model);
            self.runtime.block_on(async {
                gate.before_pull(step).await?;
                model.pull_dense(&self.client, &mut pulled).await?;
                gate.after_pull(step).await
            })?;
        }
        self.step += 1;
        Ok(Some(pulled))
    }
}

impl<I> Drop for Prefetched<I> {
    fn drop(&mut self) {
        if let Some(pending) = self.pending.take() {
            pending.abort();
        }
    }
}
