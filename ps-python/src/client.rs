//! `ps_client._native.Client`: a [`PsClient`] and the runtime it runs on.
//!
//! Every method that waits on the network releases the GIL for the wait.
//! Arguments are checked before anything is sent: a refused call leaves
//! the servers as they were.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use numpy::{IntoPyArray, PyArray2, PyArrayMethods, PyReadonlyArray1, PyReadonlyArray2};
use ps_common::config::TableConfig;
use ps_common::{PsError, pb};
use ps_worker::{ClientConfig, PsClient};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use crate::errors::{raise, to_py};

/// Rows of one pull or push, at most: 2^24 keys (a 64 MiB key array). A
/// larger batch is refused before anything is allocated for it.
const MAX_KEYS: usize = 1 << 24;

/// A connection to every shard of a job (see `ps_client.Client`).
#[pyclass(module = "ps_client._native", frozen)]
pub struct Client {
    /// Declared before `runtime`: dropped first, while its tasks can
    /// still be cancelled on a live runtime.
    client: PsClient,
    runtime: tokio::runtime::Runtime,
}

/// How to reach the servers; the keyword arguments of `Client(...)`.
#[derive(FromPyObject)]
#[pyo3(from_item_all)]
struct Connect {
    servers: Vec<String>,
    backups: Vec<String>,
    etcd: Vec<String>,
    job: Option<String>,
    token_file: Option<PathBuf>,
    tls_ca: Option<PathBuf>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    connect_timeout: f64,
    request_timeout: f64,
    max_pushes_in_flight: usize,
    threads: usize,
}

impl Connect {
    /// The client configuration these settings describe; runs inside the
    /// runtime (the etcd client connects lazily on it).
    fn config(&self) -> Result<ClientConfig, PsError> {
        let seconds = |name: &str, s: f64| {
            if s.is_finite() && s > 0.0 && s <= 86_400.0 {
                Ok(Duration::from_secs_f64(s))
            } else {
                Err(PsError::invalid(format!(
                    "{name} must be between 0 and 86400 seconds, not {s}"
                )))
            }
        };
        if !(1..=1024).contains(&self.max_pushes_in_flight) {
            return Err(PsError::invalid(format!(
                "max_pushes_in_flight must be between 1 and 1024, not {}",
                self.max_pushes_in_flight
            )));
        }
        let auth_token = self
            .token_file
            .as_deref()
            .map(ps_common::auth::read_token_file)
            .transpose()?;
        let tls = ps_common::tls::TlsFiles {
            cert: self.tls_cert.clone(),
            key: self.tls_key.clone(),
            ca: self.tls_ca.clone(),
        }
        .client()
        .map_err(|e| PsError::invalid(e.to_string()))?;
        let coordinator = match (&self.job, self.etcd.is_empty()) {
            (Some(job), false) => {
                let etcd = Arc::new(ps_common::coordinator::Etcd::new(&self.etcd)?);
                Some(ps_common::coordinator::Job::new(etcd, job)?)
            }
            (None, true) => None,
            _ => return Err(PsError::invalid("etcd and job go together")),
        };
        if coordinator.is_none() && self.servers.is_empty() {
            return Err(PsError::invalid(
                "name the servers (servers=[...], in shard order) or a coordinator (etcd=..., job=...)",
            ));
        }
        Ok(ClientConfig {
            max_pushes_in_flight: self.max_pushes_in_flight,
            auth_token,
            tls,
            coordinator,
            backups: self.backups.clone(),
            connect_timeout: seconds("connect_timeout", self.connect_timeout)?,
            request_timeout: seconds("request_timeout", self.request_timeout)?,
            ..ClientConfig::default()
        })
    }
}

impl Client {
    /// Runs `work` on the runtime with the GIL released.
    fn wait<T: Send>(
        &self,
        py: Python<'_>,
        work: impl Future<Output = Result<T, PsError>> + Send,
    ) -> PyResult<T> {
        py.detach(|| self.runtime.block_on(work))
            .map_err(|e| to_py(py, e))
    }
}

/// The keys of a call as `u64`s, refused past [`MAX_KEYS`].
fn keys_of(py: Python<'_>, keys: &PyReadonlyArray1<'_, u64>) -> PyResult<Vec<u64>> {
    let keys = keys.as_array();
    if keys.len() > MAX_KEYS {
        return Err(raise(
            py,
            "INVALID_ARGUMENT",
            &format!("{} keys in one call; at most {MAX_KEYS}", keys.len()),
        ));
    }
    Ok(owned(keys))
}

/// The elements of `array` in order, copied (one `memcpy` when contiguous).
fn owned<T: Copy, D: numpy::ndarray::Dimension>(
    array: numpy::ndarray::ArrayView<'_, T, D>,
) -> Vec<T> {
    match array.as_slice() {
        Some(slice) => slice.to_vec(),
        None => array.iter().copied().collect(),
    }
}

#[pymethods]
impl Client {
    /// Connects to every shard (see `ps_client.Client` for the arguments).
    #[new]
    fn new(py: Python<'_>, settings: &Bound<'_, PyDict>) -> PyResult<Self> {
        let settings: Connect = settings.extract()?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(settings.threads.clamp(1, 64))
            .thread_name("ps-client")
            .enable_all()
            .build()
            .map_err(|e| raise(py, "INTERNAL", &format!("cannot start a runtime: {e}")))?;
        let client = py
            .detach(|| {
                runtime.block_on(async {
                    let config = settings.config()?;
                    PsClient::connect(&settings.servers, &config).await
                })
            })
            .map_err(|e| to_py(py, e))?;
        Ok(Client { client, runtime })
    }

    /// Number of shards.
    #[getter]
    fn num_shards(&self) -> usize {
        self.client.num_shards()
    }

    /// Creates `name` on every shard from a job file's table keys, given as
    /// JSON; idempotent for the same spec. Returns the table's dim.
    fn create_table(
        &self,
        py: Python<'_>,
        name: &str,
        spec_json: &str,
        seed: u64,
    ) -> PyResult<usize> {
        let config: TableConfig = serde_json::from_str(spec_json)
            .map_err(|e| raise(py, "INVALID_ARGUMENT", &format!("table '{name}': {e}")))?;
        config.validate().map_err(|(key, msg)| {
            raise(
                py,
                "INVALID_ARGUMENT",
                &format!("table '{name}': {key}: {msg}"),
            )
        })?;
        let spec = config.spec(name, seed);
        self.wait(py, self.client.create_table(&spec))?;
        Ok(spec.dim as usize)
    }

    /// Floats per row of a table created through this client.
    fn dim(&self, py: Python<'_>, table: &str) -> PyResult<usize> {
        self.client.table_dim(table).map_err(|e| to_py(py, e))
    }

    /// Rows of `keys` (uint64, any order, duplicates allowed) as a new
    /// `(len(keys), dim)` float32 array.
    fn pull<'py>(
        &self,
        py: Python<'py>,
        table: &str,
        keys: PyReadonlyArray1<'py, u64>,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let dim = self.client.table_dim(table).map_err(|e| to_py(py, e))?;
        let keys = keys_of(py, &keys)?;
        let rows = self.wait(py, self.client.pull(table, &keys))?;
        // The Vec becomes the array's memory: no copy.
        rows.into_pyarray(py).reshape([keys.len(), dim])
    }

    /// Pushes `grads` (`(len(keys), dim)` float32) for `keys`; duplicate
    /// keys' gradients are summed. Asynchronous: returns once the requests
    /// are on their way; an error shows in a later push or in `flush`.
    #[pyo3(signature = (table, keys, grads, lr_scale=None))]
    fn push(
        &self,
        py: Python<'_>,
        table: &str,
        keys: PyReadonlyArray1<'_, u64>,
        grads: PyReadonlyArray2<'_, f32>,
        lr_scale: Option<f32>,
    ) -> PyResult<()> {
        let dim = self.client.table_dim(table).map_err(|e| to_py(py, e))?;
        let keys = keys_of(py, &keys)?;
        let grads = grads.as_array();
        let shape = grads.shape();
        if shape != [keys.len(), dim] {
            return Err(raise(
                py,
                "INVALID_ARGUMENT",
                &format!(
                    "gradients for '{table}' have shape ({}, {}); {} keys of dim {dim} need ({}, {dim})",
                    shape[0],
                    shape[1],
                    keys.len(),
                    keys.len()
                ),
            ));
        }
        if lr_scale.is_some_and(|s| !(s.is_finite() && s >= 0.0)) {
            return Err(raise(
                py,
                "INVALID_ARGUMENT",
                "lr_scale must be a finite number >= 0",
            ));
        }
        let grads = owned(grads);
        self.wait(py, self.client.push_scaled(table, &keys, &grads, lr_scale))
    }

    /// Waits for every push so far; raises the first push error since the
    /// last check.
    fn flush(&self, py: Python<'_>) -> PyResult<()> {
        self.wait(py, self.client.flush())
    }

    /// Writes a checkpoint called `name` on every shard (after the pushes
    /// so far); returns one dict per shard: path, rows, bytes.
    fn checkpoint<'py>(&self, py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyList>> {
        let written = self.wait(py, async {
            self.client.flush().await?;
            self.client.checkpoint(name).await
        })?;
        let shards = PyList::empty(py);
        for w in written {
            let d = PyDict::new(py);
            d.set_item("path", w.path)?;
            d.set_item("rows", w.rows)?;
            d.set_item("bytes", w.bytes)?;
            shards.append(d)?;
        }
        Ok(shards)
    }

    /// Each shard's statistics: one dict per shard with its tables.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let shards = self.wait(py, self.client.stats())?;
        let list = PyList::empty(py);
        for s in shards {
            list.append(stats_dict(py, s)?)?;
        }
        Ok(list)
    }

    /// Push calls acknowledged, retried and failed over so far.
    fn push_acks<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let acks = self.client.push_acks();
        let d = PyDict::new(py);
        d.set_item("acked", acks.acked)?;
        d.set_item("duplicates", acks.duplicates)?;
        d.set_item("retries", acks.retries)?;
        d.set_item("failovers", acks.failovers)?;
        Ok(d)
    }
}

/// One shard's `StatsResponse` as a dict.
fn stats_dict(py: Python<'_>, s: pb::StatsResponse) -> PyResult<Bound<'_, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("shard", s.shard_id)?;
    d.set_item("role", s.role)?;
    d.set_item("memory_budget_bytes", s.memory_budget_bytes)?;
    d.set_item("memory_used_bytes", s.memory_used_bytes)?;
    let tables = PyDict::new(py);
    for t in s.tables {
        let table = PyDict::new(py);
        table.set_item("dim", t.dim)?;
        table.set_item("rows", t.rows)?;
        table.set_item("bytes", t.bytes)?;
        table.set_item("memory_bytes", t.memory_bytes)?;
        table.set_item("rows_in_memory", t.rows_in_memory)?;
        table.set_item("rows_on_disk", t.rows_on_disk)?;
        table.set_item("admitted_rows", t.admitted_rows)?;
        table.set_item("filtered_pushes", t.filtered_pushes)?;
        table.set_item("evicted_rows", t.evicted_rows)?;
        tables.set_item(t.name, table)?;
    }
    d.set_item("tables", tables)?;
    if let Some(r) = s.requests {
        let requests = PyDict::new(py);
        requests.set_item("pull", r.pull)?;
        requests.set_item("push", r.push)?;
        requests.set_item("errors", r.errors)?;
        requests.set_item("rows_pulled", r.rows_pulled)?;
        d.set_item("requests", requests)?;
    }
    Ok(d)
}
