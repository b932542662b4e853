//! The one place a Rust error becomes a Python exception:
//! `ps_client.PsError(code, message)`, where `code` is the gRPC status name
//! (`INVALID_ARGUMENT`, `NOT_FOUND`, `UNAVAILABLE`, ...).

use ps_common::PsError;
use pyo3::prelude::*;
use tonic::Code;

/// The canonical name of a gRPC status code, as gRPC's own libraries print it.
pub(crate) fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// `err` as a `ps_client.PsError` carrying its status code and message.
pub(crate) fn to_py(py: Python<'_>, err: PsError) -> PyErr {
    let code = match &err {
        PsError::Shard { code, .. } => *code,
        other => other.code(),
    };
    raise(py, code_name(code), &err.to_string())
}

/// A `ps_client.PsError` with a status name and message of our own (for
/// arguments refused before any request is made).
pub(crate) fn raise(py: Python<'_>, code: &str, message: &str) -> PyErr {
    let made = py
        .import("ps_client.errors")
        .and_then(|m| m.getattr("PsError"))
        .and_then(|class| class.call1((code, message)));
    match made {
        Ok(value) => PyErr::from_value(value),
        // The package's Python half is missing: still say what went wrong.
        Err(_) => pyo3::exceptions::PyRuntimeError::new_err(format!("{code}: {message}")),
    }
}
