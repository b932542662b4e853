//! `Auth`: the interceptor in front of every ParameterServer RPC that checks
//! the caller's bearer token (`--auth-token-file`) in constant time. A call
//! without the right token is refused with UNAUTHENTICATED before the
//! service sees it, so nothing is read or applied. The gRPC health service
//! stays open (probes carry no token).

use std::sync::Arc;

use ps_common::auth::{HEADER, constant_time_eq};
use tonic::{Request, Status};

/// The expected token, or none (every call allowed).
#[derive(Clone, Default)]
pub struct Auth {
    expected: Option<Arc<[u8]>>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the token.
        f.debug_struct("Auth")
            .field("required", &self.expected.is_some())
            .finish()
    }
}

impl Auth {
    /// Calls must carry `Bearer token`.
    pub fn bearer(token: &str) -> Auth {
        Auth {
            expected: Some(format!("Bearer {token}").into_bytes().into()),
        }
    }

    /// Puts the token on `request` (a call to a peer server), if there is one.
    pub fn attach<T>(&self, request: &mut Request<T>) {
        if let Some(value) = self
            .expected
            .as_ref()
            .and_then(|e| tonic::metadata::AsciiMetadataValue::try_from(&e[..]).ok())
        {
            request.metadata_mut().insert(HEADER, value);
        }
    }

    /// Whether a token is required.
    pub fn required(&self) -> bool {
        self.expected.is_some()
    }
}

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = &self.expected else {
            return Ok(request);
        };
        match request.metadata().get(HEADER) {
            Some(given) if constant_time_eq(given.as_bytes(), expected) => Ok(request),
            Some(_) => Err(Status::unauthenticated("invalid bearer token")),
            None => Err(Status::unauthenticated(
                "missing bearer token: this server requires --auth-token-file on its clients",
            )),
        }
    }
}
