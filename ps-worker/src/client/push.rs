//! Pushes and assigns: gradients split per shard, sent by background tasks
//! with at most `max_pushes_in_flight` outstanding; the first error is kept
//! for the next push or [`PsClient::flush`].

use super::*;

impl PsClient {
    /// Sets the weights of `keys` (`values`: `keys.len() * dim`, key order)
    /// on their shards, optimizer state reset; waits for every shard.
    pub async fn assign(&self, table: &str, keys: &[u64], values: &[f32]) -> Result<(), PsError> {
        let info = self.table(table)?;
        check_gradient_len(table, info.dim, keys, values)?;
        let mut tasks = JoinSet::new();
        for (shard_id, keys, rows) in self.chunks_with_rows(info, keys, values, false) {
            let request = pb::AssignRequest {
                table: table.to_string(),
                keys,
                values: wire::values_into_bytes(rows, ValueEncoding::F32),
            };
            let (shard, inner) = (
                Arc::clone(&self.inner.shards[shard_id]),
                Arc::clone(&self.inner),
            );
            tasks.spawn(async move {
                shard
                    .call(&inner, |conn| {
                        let request = request.clone();
                        async move { call!(&conn, assign, request) }
                    })
                    .await
                    .map(drop)
            });
        }
        join_all_ok(tasks).await.map(drop)
    }

    /// Sums the gradients of duplicate keys and pushes them asynchronously.
    /// `grads` holds `keys.len() * dim` values in key order.
    pub async fn push(&self, table: &str, keys: &[u64], grads: &[f32]) -> Result<(), PsError> {
        self.push_scaled(table, keys, grads, None).await
    }

    /// [`PsClient::push`] with the servers' learning rate for this push
    /// multiplied by `lr_scale`; `None` is 1.
    pub async fn push_scaled(
        &self,
        table: &str,
        keys: &[u64],
        grads: &[f32],
        lr_scale: Option<f32>,
    ) -> Result<(), PsError> {
        let dim = self.table(table)?.dim;
        check_gradient_len(table, dim, keys, grads)?;
        let unique = UniqueKeys::new(keys);
        if unique.keys.len() == keys.len() {
            // No duplicates: nothing to sum.
            return self.push_unique_scaled(table, keys, grads, lr_scale).await;
        }
        let summed = unique.sum(grads, dim);
        self.push_unique_scaled(table, &unique.keys, &summed, lr_scale)
            .await
    }

    /// Pushes gradients of distinct `keys` asynchronously: returns once every
    /// per-shard request has a slot among the `max_pushes_in_flight`. Returns
    /// the error of an earlier failed push, if any.
    pub async fn push_unique(
        &self,
        table: &str,
        keys: &[u64],
        grads: &[f32],
    ) -> Result<(), PsError> {
        self.push_unique_scaled(table, keys, grads, None).await
    }

    /// [`PsClient::push_unique`] with the servers' learning rate for this
    /// push multiplied by `lr_scale` (a learning-rate schedule); `None` is 1.
    pub async fn push_unique_scaled(
        &self,
        table: &str,
        keys: &[u64],
        grads: &[f32],
        lr_scale: Option<f32>,
    ) -> Result<(), PsError> {
        let info = self.table(table)?;
        check_gradient_len(table, info.dim, keys, grads)?;
        self.push_rows(table, info, keys, grads, lr_scale).await
    }

    pub(super) async fn push_rows(
        &self,
        table: &str,
        info: TableInfo,
        keys: &[u64],
        grads: &[f32],
        lr_scale: Option<f32>,
    ) -> Result<(), PsError> {
        let push = PushTable {
            table,
            keys,
            grads,
            lr_scale,
        };
        self.push_tables(&[(push, info)]).await
    }

    /// Pushes the gradients of several tables (`(table, distinct keys,
    /// keys.len() * dim gradients, lr_scale)` each) asynchronously, the
    /// small requests to one shard coalesced into `PushMany` calls (applied
    /// all or nothing). Returns once every call has a push slot.
    pub async fn push_many(&self, tables: &[PushTable<'_>]) -> Result<(), PsError> {
        let tables = tables
            .iter()
            .map(|&t| {
                let info = self.table(t.table)?;
                check_gradient_len(t.table, info.dim, t.keys, t.grads)?;
                Ok((t, info))
            })
            .collect::<Result<Vec<_>, PsError>>()?;
        self.push_tables(&tables).await
    }

    pub(super) async fn push_tables(
        &self,
        tables: &[(PushTable<'_>, TableInfo)],
    ) -> Result<(), PsError> {
        self.take_push_error()?;
        for &(
            PushTable {
                table, keys, grads, ..
            },
            info,
        ) in tables
        {
            if let Some(i) = grads.iter().position(|g| !g.is_finite()) {
                return Err(PsError::invalid(format!(
                    "gradient for key {} of '{table}' is not finite ({})",
                    keys[i / info.dim],
                    grads[i]
                )));
            }
        }
        let wire = self.inner.wire;
        let mut parts = Vec::new();
        for &(
            PushTable {
                table,
                keys,
                grads,
                lr_scale,
            },
            info,
        ) in tables
        {
            for (shard_id, chunk_keys, values) in
                self.chunks_with_rows(info, keys, grads, wire.delta_keys)
            {
                let count = chunk_keys.len();
                let (keys, delta_keys) = encode_keys(chunk_keys, wire.delta_keys)?;
                let request = pb::PushRequest {
                    table: table.to_string(),
                    keys,
                    // Each shard's rows are gathered once; in f32 that
                    // vector is the request's bytes, not copied again.
                    gradients: wire::values_into_bytes(values, wire.push_values),
                    lr_scale,
                    encoding: wire.push_values as i32,
                    delta_keys,
                    ..Default::default()
                };
                parts.push((shard_id, request, (), count, 0));
            }
        }
        for (shard_id, group) in self.coalesce(parts) {
            let shard = Arc::clone(&self.inner.shards[shard_id]);
            let permit = Arc::clone(&self.inner.push_slots)
                .acquire_owned()
                .await
                .map_err(|_| PsError::Internal("push window closed".into()))?;
            let inner = Arc::clone(&self.inner);
            let mut requests: Vec<pb::PushRequest> = group.into_iter().map(|(r, ())| r).collect();
            // One number per call: a retry of the call is recognized as one.
            let (writer, seq) = (inner.writer, shard.next_seq.fetch_add(1, Ordering::Relaxed));
            tokio::spawn(async move {
                let started = std::time::Instant::now();
                let answer = if requests.len() == 1 {
                    let mut request = requests.pop().unwrap_or_default();
                    (request.writer, request.seq) = (writer, seq);
                    let sent = request.encoded_len();
                    shard
                        .call(&inner, |conn| {
                            let request = request.clone();
                            async move { call!(&conn, push, request) }
                        })
                        .await
                        .map(|r| (sent, r.encoded_len(), r.duplicate))
                } else {
                    let request = pb::PushManyRequest {
                        pushes: requests,
                        writer,
                        seq,
                    };
                    let sent = request.encoded_len();
                    shard
                        .call(&inner, |conn| {
                            let request = request.clone();
                            async move { call!(&conn, push_many, request) }
                        })
                        .await
                        .map(|r| {
                            let duplicate = r.pushes.iter().any(|p| p.duplicate);
                            (sent, r.encoded_len(), duplicate)
                        })
                };
                match answer {
                    Ok((sent, received, duplicate)) => {
                        inner.push_latency.record(started.elapsed());
                        inner
                            .push_bytes
                            .fetch_add((sent + received) as u64, Ordering::Relaxed);
                        inner.acked.fetch_add(1, Ordering::Relaxed);
                        if duplicate {
                            inner.duplicates.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Err(err) => {
                        tracing::warn!("push failed: {err}");
                        let mut slot = inner
                            .push_error
                            .lock()
                            .unwrap_or_else(|poisoned| poisoned.into_inner());
                        slot.get_or_insert(err);
                    }
                }
                drop(permit);
            });
        }
        Ok(())
    }

    /// Waits until every push issued so far has been answered; returns the
    /// first push error since the last check.
    pub async fn flush(&self) -> Result<(), PsError> {
        let all = self
            .inner
            .push_slots
            .acquire_many(self.inner.max_pushes_in_flight)
            .await
            .map_err(|_| PsError::Internal("push window closed".into()))?;
        drop(all);
        self.take_push_error()
    }

    pub(super) fn take_push_error(&self) -> Result<(), PsError> {
        match self
            .inner
            .push_error
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take()
        {
            Some(err) => Err(err),
            None => Ok(()),
        }
    }
}
