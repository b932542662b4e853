//! `ps_client._native`: the Python extension module behind the `ps_client`
//! package (its Python half is `python/ps_client/`).
//!
//! It wraps the workers' own [`ps_worker::PsClient`], so routing,
//! de-duplication, chunking, asynchronous pushes, retries, failover, auth
//! and TLS are the Rust ones. Each `Client` owns its tokio runtime; every
//! call that waits on the network releases the GIL. Arrays cross as numpy
//! arrays: keys are read in place, pulled rows are handed to numpy without
//! a copy.
//!
//! - [`client`]: the `Client` class.
//! - [`errors`]: how a [`ps_common::PsError`] becomes `ps_client.PsError`.

use pyo3::prelude::*;

mod client;
mod errors;

/// The native half of `ps_client`; import `ps_client` instead.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<client::Client>()?;
    Ok(())
}
