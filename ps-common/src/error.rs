//! The error type shared by the store, the service and the client, and the
//! single place where it becomes a gRPC status.

use tonic::{Code, Status};

/// What went wrong with a request or a table operation.
///
/// Each variant maps to one gRPC code (see the `From<PsError> for Status`
/// impl); the message always says what was wrong in the caller's terms.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PsError {
    /// The named table does not exist on this shard.
    #[error("table '{0}' does not exist")]
    UnknownTable(String),
    /// The request is malformed: lengths, dims, values or keys are wrong.
    #[error("{0}")]
    InvalidArgument(String),
    /// A table with this name exists with a different spec.
    #[error(
        "table '{table}' already exists with a different {field}: existing {existing}, requested {requested}"
    )]
    TableConflict {
        /// Table name.
        table: String,
        /// The first spec field that differs.
        field: &'static str,
        /// The existing value, formatted.
        existing: String,
        /// The requested value, formatted.
        requested: String,
    },
    /// The request is over one of the shard's configured limits.
    #[error("{0}")]
    ResourceExhausted(String),
    /// The operation needs server state or configuration that is missing.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The server cannot take the request now; retrying elsewhere or later may work.
    #[error("{0}")]
    Unavailable(String),
    /// A position past what is held (a follower behind its primary's log).
    #[error("{0}")]
    OutOfRange(String),
    /// Reading or writing persistent state (checkpoints) failed.
    #[error("{0}")]
    Storage(String),
    /// A failure inside this process (a task panicked, a channel closed).
    #[error("internal error: {0}")]
    Internal(String),
    /// A shard could not be reached or answered with an error.
    #[error("shard {shard} ({addr}): {message}")]
    Shard {
        /// Index of the shard.
        shard: usize,
        /// Address the client was given for it.
        addr: String,
        /// gRPC code of the failure.
        code: Code,
        /// What the shard or the transport said.
        message: String,
    },
}

impl PsError {
    /// Shorthand for [`PsError::InvalidArgument`].
    pub fn invalid(msg: impl Into<String>) -> Self {
        PsError::InvalidArgument(msg.into())
    }

    /// The gRPC code this error is reported with.
    pub fn code(&self) -> Code {
        match self {
            PsError::UnknownTable(_) => Code::NotFound,
            PsError::InvalidArgument(_) => Code::InvalidArgument,
            PsError::TableConflict { .. } => Code::AlreadyExists,
            PsError::ResourceExhausted(_) => Code::ResourceExhausted,
            PsError::FailedPrecondition(_) => Code::FailedPrecondition,
            PsError::Unavailable(_) => Code::Unavailable,
            PsError::OutOfRange(_) => Code::OutOfRange,
            PsError::Storage(_) | PsError::Internal(_) => Code::Internal,
            PsError::Shard { code, .. } => *code,
        }
    }
}

impl From<PsError> for Status {
    fn from(err: PsError) -> Self {
        Status::new(err.code(), err.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_error_maps_to_its_grpc_code() {
        let s: Status = PsError::UnknownTable("w".into()).into();
        assert_eq!(s.code(), Code::NotFound);
        assert_eq!(s.message(), "table 'w' does not exist");
        let s: Status = PsError::invalid("bad dim").into();
        assert_eq!(s.code(), Code::InvalidArgument);
        let s: Status = PsError::ResourceExhausted("too many keys".into()).into();
        assert_eq!(s.code(), Code::ResourceExhausted);
        let s: Status = PsError::FailedPrecondition("no --checkpoint-dir".into()).into();
        assert_eq!(s.code(), Code::FailedPrecondition);
        assert_eq!(
            PsError::Internal("task panicked".into()).code(),
            Code::Internal
        );
        let s: Status = PsError::TableConflict {
            table: "w".into(),
            field: "dim",
            existing: "8".into(),
            requested: "16".into(),
        }
        .into();
        assert_eq!(s.code(), Code::AlreadyExists);
        assert!(
            s.message()
                .contains("different dim: existing 8, requested 16")
        );
    }
}
