//! Who may call what: the bearer tokens in front of every ParameterServer RPC.
//!
//! Two credentials, each a token read from a file:
//! - the **worker** token (`--auth-token-file`): every worker call must
//!   carry it when one is set;
//! - the **peer** token (`--peer-token-file`): the server-to-server calls
//!   (Join, Replicate, Lease, and a follower's Follow and Tail) must carry it, and nothing else opens them; a
//!   server without one refuses them, so replication is never open to
//!   anyone who can reach the port, nor to a worker's token.
//!
//! Promote accepts either: workers ask for failover, and the backup itself
//! decides whether promoting it is safe (see `crate::replication`).
//! The check is a tower layer ([`AuthLayer`]) that reads the call's path and
//! its `authorization: Bearer ...` header, compares in constant time, and
//! refuses before the service sees the call, so nothing is read or applied.
//! The gRPC health service stays open (probes carry no token).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use ps_common::auth::{HEADER, constant_time_eq};
use tonic::Status;
use tonic::codegen::http;

/// The path prefix of the service's calls.
const SERVICE: &str = "/ps.v1.ParameterServer/";

/// The server-to-server calls.
const PEER_CALLS: [&str; 5] = ["Join", "Replicate", "Lease", "Follow", "Tail"];

/// The expected tokens (`Bearer TOKEN`), if any.
#[derive(Clone, Default)]
pub struct Auth {
    workers: Option<Arc<[u8]>>,
    peers: Option<Arc<[u8]>>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print a token.
        f.debug_struct("Auth")
            .field("workers", &self.workers.is_some())
            .field("peers", &self.peers.is_some())
            .finish()
    }
}

fn bearer(token: &str) -> Arc<[u8]> {
    format!("Bearer {token}").into_bytes().into()
}

/// Which credential a call needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Caller {
    Worker,
    Peer,
    WorkerOrPeer,
}

impl Auth {
    /// Worker calls must carry `Bearer token`.
    pub fn bearer(token: &str) -> Auth {
        Auth {
            workers: Some(bearer(token)),
            peers: None,
        }
    }

    /// The same, with peer calls taking (only) `Bearer peer_token`.
    pub fn with_peer_token(mut self, peer_token: &str) -> Auth {
        self.peers = Some(bearer(peer_token));
        self
    }

    /// Whether worker calls need a token.
    pub fn required(&self) -> bool {
        self.workers.is_some()
    }

    /// Whether this server takes peer calls (it has a peer token).
    pub fn takes_peers(&self) -> bool {
        self.peers.is_some()
    }

    /// Puts the worker token on `request`, if there is one.
    pub fn attach<T>(&self, request: &mut tonic::Request<T>) {
        attach(self.workers.as_ref(), request);
    }

    /// Puts the peer token on `request` (a call to a peer server), if there is one.
    pub fn attach_peer<T>(&self, request: &mut tonic::Request<T>) {
        attach(self.peers.as_ref(), request);
    }

    /// Whether a call to `method` carrying `given` may go on.
    fn check(&self, method: &str, given: Option<&[u8]>) -> Result<(), Status> {
        let caller = if PEER_CALLS.contains(&method) {
            Caller::Peer
        } else if method == "Promote" {
            Caller::WorkerOrPeer
        } else {
            Caller::Worker
        };
        let matches = |expected: &Option<Arc<[u8]>>| matches!((expected, given), (Some(e), Some(g)) if constant_time_eq(g, e));
        match caller {
            Caller::Peer if self.peers.is_none() => Err(Status::permission_denied(format!(
                "{method} is a server-to-server call and this server was started without --peer-token-file: it takes no peer calls"
            ))),
            Caller::Peer if matches(&self.peers) => Ok(()),
            Caller::Peer => Err(Status::unauthenticated(format!(
                "{method} needs the peer token (--peer-token-file); a worker's token does not open it"
            ))),
            _ if self.workers.is_none() => Ok(()),
            Caller::WorkerOrPeer if matches(&self.workers) || matches(&self.peers) => Ok(()),
            Caller::Worker if matches(&self.workers) => Ok(()),
            _ if given.is_none() => Err(Status::unauthenticated(
                "missing bearer token: this server requires --auth-token-file on its clients",
            )),
            _ => Err(Status::unauthenticated("invalid bearer token")),
        }
    }
}

fn attach<T>(token: Option<&Arc<[u8]>>, request: &mut tonic::Request<T>) {
    if let Some(value) =
        token.and_then(|t| tonic::metadata::AsciiMetadataValue::try_from(&t[..]).ok())
    {
        request.metadata_mut().insert(HEADER, value);
    }
}

/// A tower layer applying [`Auth`] to every ParameterServer call.
#[derive(Debug, Clone)]
pub struct AuthLayer(pub Auth);

impl<S> tower_layer::Layer<S> for AuthLayer {
    type Service = Authenticated<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Authenticated {
            auth: self.0.clone(),
            inner,
        }
    }
}

/// The service behind [`AuthLayer`].
#[derive(Debug, Clone)]
pub struct Authenticated<S> {
    auth: Auth,
    inner: S,
}

impl<S, ReqBody, ResBody> tower_service::Service<http::Request<ReqBody>> for Authenticated<S>
where
    S: tower_service::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Default,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        if let Some(method) = request.uri().path().strip_prefix(SERVICE) {
            let given = request.headers().get(HEADER).map(|v| v.as_bytes());
            if let Err(status) = self.auth.check(method, given) {
                return Box::pin(async move { Ok(status.into_http()) });
            }
        }
        Box::pin(self.inner.call(request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    const WORKER: &[u8] = b"Bearer worker-token-0123456789";
    const PEER: &[u8] = b"Bearer peer-token-0123456789ab";

    fn both() -> Auth {
        Auth::bearer("worker-token-0123456789").with_peer_token("peer-token-0123456789ab")
    }

    #[test]
    fn peer_calls_take_only_the_peer_token() {
        let auth = both();
        for call in PEER_CALLS {
            assert!(auth.check(call, Some(PEER)).is_ok(), "{call}");
            let err = auth.check(call, Some(WORKER)).unwrap_err();
            assert_eq!(err.code(), Code::Unauthenticated, "{call}");
            assert!(auth.check(call, None).is_err(), "{call}");
        }
        let err = auth.check("Pull", Some(PEER)).unwrap_err();
        assert_eq!(
            err.code(),
            Code::Unauthenticated,
            "the peer token is not a worker's"
        );
        assert!(auth.check("Pull", Some(WORKER)).is_ok());
        assert!(auth.check("Promote", Some(WORKER)).is_ok());
        assert!(auth.check("Promote", Some(PEER)).is_ok());
        assert!(auth.check("Promote", None).is_err());
    }

    #[test]
    fn without_a_peer_token_peer_calls_are_closed_even_with_no_worker_token() {
        let open = Auth::default();
        for call in PEER_CALLS {
            let err = open.check(call, None).unwrap_err();
            assert_eq!(err.code(), Code::PermissionDenied, "{call}");
            assert!(err.message().contains("--peer-token-file"), "{err:?}");
            assert!(open.check(call, Some(WORKER)).is_err());
        }
        assert!(open.check("Pull", None).is_ok(), "worker calls stay open");
        assert!(open.check("Promote", None).is_ok());
        let workers_only = Auth::bearer("worker-token-0123456789");
        assert_eq!(
            workers_only.check("Join", Some(WORKER)).unwrap_err().code(),
            Code::PermissionDenied
        );
    }
}
