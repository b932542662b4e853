//! Pulls: rows of one or more tables, de-duplicated, split per shard and
//! under each shard's limits, coalesced into few requests, and put back in
//! the caller's order.

use super::*;

impl PsClient {
    /// Rows of `keys` in the caller's order (`keys.len() * dim` floats);
    /// duplicate keys are fetched once.
    pub async fn pull(&self, table: &str, keys: &[u64]) -> Result<Vec<f32>, PsError> {
        let info = self.table(table)?;
        let unique = UniqueKeys::new(keys);
        let rows = self.pull_rows(table, info, &unique.keys).await?;
        if unique.keys.len() == keys.len() {
            // No duplicates: the rows are already in the caller's order.
            return Ok(rows);
        }
        Ok(unique.gather(&rows, info.dim))
    }

    /// Rows of `keys` in order, one request per shard (and chunk); `keys`
    /// should already be distinct.
    pub async fn pull_unique(&self, table: &str, keys: &[u64]) -> Result<Vec<f32>, PsError> {
        self.pull_rows(table, self.table(table)?, keys).await
    }

    pub(super) async fn pull_rows(
        &self,
        table: &str,
        info: TableInfo,
        keys: &[u64],
    ) -> Result<Vec<f32>, PsError> {
        let mut rows = self.pull_tables(&[(table, info, keys)]).await?;
        Ok(rows.pop().unwrap_or_default())
    }

    /// Rows of several tables at once (`(table, distinct keys)` each), in
    /// each table's key order. The small requests of all tables to one
    /// shard travel together in `PullMany` calls of at most
    /// `coalesce_bytes`; larger ones go alone.
    pub async fn pull_many(&self, tables: &[(&str, &[u64])]) -> Result<Vec<Vec<f32>>, PsError> {
        let tables = tables
            .iter()
            .map(|&(name, keys)| Ok((name, self.table(name)?, keys)))
            .collect::<Result<Vec<_>, PsError>>()?;
        self.pull_tables(&tables).await
    }

    pub(super) async fn pull_tables(
        &self,
        tables: &[(&str, TableInfo, &[u64])],
    ) -> Result<Vec<Vec<f32>>, PsError> {
        let wire = self.inner.wire;
        let mut parts = Vec::new();
        for (t, &(name, info, keys)) in tables.iter().enumerate() {
            for (shard_id, positions, shard_keys) in self.split(info, keys, wire.delta_keys) {
                let chunk = self.inner.shards[shard_id].chunk_keys(info.dim);
                for (pos, chunk_keys) in chunked(positions, chunk)
                    .into_iter()
                    .zip(chunked(shard_keys, chunk))
                {
                    let count = pos.len();
                    let (keys, delta_keys) = encode_keys(chunk_keys, wire.delta_keys)?;
                    let request = pb::PullRequest {
                        table: name.to_string(),
                        keys,
                        encoding: wire.pull_values as i32,
                        delta_keys,
                    };
                    let placed = Placed {
                        table: t,
                        dim: info.dim,
                        positions: pos,
                    };
                    let answer = count * info.dim * wire::value_bytes(wire.pull_values);
                    parts.push((shard_id, request, placed, count, answer));
                }
            }
        }
        let mut tasks = JoinSet::new();
        for (shard_id, group) in self.coalesce(parts) {
            let (shard, inner) = (
                Arc::clone(&self.inner.shards[shard_id]),
                Arc::clone(&self.inner),
            );
            tasks.spawn(async move {
                let (requests, placed): (Vec<_>, Vec<_>) = group.into_iter().unzip();
                let started = std::time::Instant::now();
                let (sent, received, responses) = if requests.len() == 1 {
                    let request = requests.into_iter().next().unwrap_or_default();
                    let sent = request.encoded_len();
                    let response = shard
                        .call(&inner, |conn| {
                            let request = request.clone();
                            async move { call!(&conn, pull, request) }
                        })
                        .await?;
                    (sent, response.encoded_len(), vec![response])
                } else {
                    let request = pb::PullManyRequest { pulls: requests };
                    let sent = request.encoded_len();
                    let response = shard
                        .call(&inner, |conn| {
                            let request = request.clone();
                            async move { call!(&conn, pull_many, request) }
                        })
                        .await?;
                    (sent, response.encoded_len(), response.pulls)
                };
                inner.pull_latency.record(started.elapsed());
                inner
                    .pull_bytes
                    .fetch_add((sent + received) as u64, Ordering::Relaxed);
                if responses.len() != placed.len() {
                    return Err(shard.error(format!(
                        "answered {} of {} pulls",
                        responses.len(),
                        placed.len()
                    )));
                }
                let width = wire::value_bytes(wire.pull_values);
                let mut out = Vec::with_capacity(placed.len());
                for (response, placed) in responses.into_iter().zip(placed) {
                    let dim = placed.dim;
                    if response.dim as usize != dim
                        || response.encoding != wire.pull_values as i32
                        || response.values.len() != placed.positions.len() * dim * width
                    {
                        return Err(shard.error(format!(
                            "answered {} bytes of dim {} (encoding {}) for {} keys of dim {dim} in {}",
                            response.values.len(),
                            response.dim,
                            response.encoding,
                            placed.positions.len(),
                            wire.pull_values.as_str_name()
                        )));
                    }
                    out.push((placed, response.values));
                }
                Ok(out)
            });
        }
        let mut out: Vec<Vec<f32>> = tables
            .iter()
            .map(|(_, info, keys)| vec![0f32; keys.len() * info.dim])
            .collect();
        // Each answered row is decoded straight into its place.
        let width = wire::value_bytes(wire.pull_values);
        for (placed, values) in join_all_ok(tasks).await?.into_iter().flatten() {
            let (dim, rows) = (placed.dim, &mut out[placed.table]);
            for (&pos, row) in placed
                .positions
                .iter()
                .zip(values.chunks_exact(dim * width))
            {
                wire::decode_values_into(
                    row,
                    wire.pull_values,
                    &mut rows[pos * dim..(pos + 1) * dim],
                )?;
            }
        }
        Ok(out)
    }

    /// Groups per-shard parts into calls: parts of at least `coalesce_bytes`
    /// go alone, smaller ones to the same shard together up to that size,
    /// the shard's key limit and its answer limit. Each part is
    /// `(shard, request, placement, keys, bytes of values in its answer)`;
    /// returns `(shard, parts of one call)`.
    pub(super) fn coalesce<R: Message, P>(
        &self,
        parts: Vec<(usize, R, P, usize, usize)>,
    ) -> Vec<(usize, Vec<(R, P)>)> {
        let limit = self.inner.coalesce_bytes;
        let mut open: HashMap<usize, Group<R, P>> = HashMap::new();
        let mut calls = Vec::new();
        for (shard_id, request, placed, keys, answer) in parts {
            let bytes = request.encoded_len();
            if bytes >= limit {
                calls.push((shard_id, vec![(request, placed)]));
                continue;
            }
            let (max_keys, max_bytes) = self.inner.shards[shard_id].limits();
            let group = open.entry(shard_id).or_insert_with(|| Group {
                parts: Vec::new(),
                bytes: 0,
                keys: 0,
                answer: 0,
            });
            if !group.parts.is_empty()
                && (group.bytes + bytes > limit
                    || group.keys + keys > max_keys
                    || group.answer + answer > max_bytes)
            {
                calls.push((shard_id, std::mem::take(&mut group.parts)));
                (group.bytes, group.keys, group.answer) = (0, 0, 0);
            }
            group.parts.push((request, placed));
            group.bytes += bytes;
            group.keys += keys;
            group.answer += answer;
        }
        calls.extend(
            open.into_iter()
                .filter(|(_, g)| !g.parts.is_empty())
                .map(|(shard, g)| (shard, g.parts)),
        );
        calls
    }
}
