//! A small etcd v3 client over tonic: the KV, Lease and Watch calls the
//! coordinator makes, against a list of endpoints (one etcd cluster's
//! members). A call that fails in transport moves on to the next member,
//! so losing a member of a 3-member cluster costs a retry, not the job.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tonic::transport::Channel;

use super::pb;
use super::pb::kv_client::KvClient;
use super::pb::lease_client::LeaseClient;
use super::pb::watch_client::WatchClient;
use crate::PsError;

/// How long one etcd call may take before the next member is tried.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// A connection to an etcd cluster, given its members' client URLs.
#[derive(Debug)]
pub struct Etcd {
    endpoints: Vec<String>,
    /// The members' endpoints, checked when given.
    configured: Vec<tonic::transport::Endpoint>,
    /// Their channels, made on first use (inside a runtime).
    channels: std::sync::OnceLock<Vec<Channel>>,
    /// The member the last call succeeded on (tried first next time).
    current: AtomicUsize,
    /// One lease keep-alive stream at a time (it is bidirectional).
    keepalive: tokio::sync::Mutex<Option<KeepAlive>>,
    /// The member a keep-alive stream is open to.
    keepalive_member: Mutex<usize>,
}

#[derive(Debug)]
struct KeepAlive {
    send: tokio::sync::mpsc::Sender<pb::LeaseKeepAliveRequest>,
    answers: tonic::Streaming<pb::LeaseKeepAliveResponse>,
}

impl Etcd {
    /// Connects lazily to the members at `endpoints` (`http://host:port`
    /// or `host:port`, comma-separated lists split by the caller).
    pub fn new(endpoints: &[String]) -> Result<Etcd, PsError> {
        if endpoints.is_empty() {
            return Err(PsError::invalid(
                "--etcd needs at least one endpoint (host:port)",
            ));
        }
        let configured = endpoints
            .iter()
            .map(|e| {
                crate::tls::endpoint(e, None)
                    .map(|ep| ep.connect_timeout(Duration::from_secs(1)).tcp_nodelay(true))
                    .map_err(|err| PsError::invalid(format!("etcd endpoint {e:?}: {err}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Etcd {
            endpoints: endpoints.to_vec(),
            configured,
            channels: std::sync::OnceLock::new(),
            current: AtomicUsize::new(0),
            keepalive: tokio::sync::Mutex::new(None),
            keepalive_member: Mutex::new(0),
        })
    }

    /// The endpoints, as given.
    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// A channel per member (lazy: each connects on first use); called
    /// from async code only, which runs inside a runtime.
    fn channels(&self) -> &[Channel] {
        self.channels
            .get_or_init(|| self.configured.iter().map(|e| e.connect_lazy()).collect())
    }

    /// Runs `call` on the members in turn, starting with the last good
    /// one, until one answers; each try is bounded by [`CALL_TIMEOUT`].
    async fn on_members<T, F, Fut>(&self, what: &str, call: F) -> Result<T, PsError>
    where
        F: Fn(Channel) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let n = self.configured.len();
        let first = self.current.load(Ordering::Relaxed) % n;
        let mut last = String::new();
        for i in 0..n {
            let member = (first + i) % n;
            match tokio::time::timeout(CALL_TIMEOUT, call(self.channels()[member].clone())).await {
                Ok(Ok(answer)) => {
                    self.current.store(member, Ordering::Relaxed);
                    return Ok(answer.into_inner());
                }
                Ok(Err(status)) if !member_failed(status.code()) => {
                    return Err(PsError::FailedPrecondition(format!(
                        "etcd {what} at {}: {}",
                        self.endpoints[member],
                        status.message()
                    )));
                }
                Ok(Err(status)) => {
                    last = format!("{}: {}", self.endpoints[member], status.message())
                }
                Err(_) => {
                    last = format!(
                        "{}: no answer within {CALL_TIMEOUT:?}",
                        self.endpoints[member]
                    )
                }
            }
        }
        Err(PsError::Unavailable(format!(
            "etcd {what}: no member answered (last: {last})"
        )))
    }

    /// The keys in `[key, range_end)` (`range_end` empty: `key` alone).
    pub async fn range(&self, key: &str, range_end: &str) -> Result<pb::RangeResponse, PsError> {
        let request = pb::RangeRequest {
            key: key.as_bytes().to_vec(),
            range_end: range_end.as_bytes().to_vec(),
            ..Default::default()
        };
        self.on_members("range", |c| {
            let request = request.clone();
            async move { KvClient::new(c).range(request).await }
        })
        .await
    }

    /// The value of `key` and its revisions, if it exists.
    pub async fn get(&self, key: &str) -> Result<Option<pb::KeyValue>, PsError> {
        Ok(self.range(key, "").await?.kvs.into_iter().next())
    }

    /// Sets `key` to `value`, under `lease` (0: none).
    pub async fn put(&self, key: &str, value: &str, lease: i64) -> Result<(), PsError> {
        let request = pb::PutRequest {
            key: key.as_bytes().to_vec(),
            value: value.as_bytes().to_vec(),
            lease,
            ..Default::default()
        };
        self.on_members("put", |c| {
            let request = request.clone();
            async move { KvClient::new(c).put(request).await }
        })
        .await
        .map(drop)
    }

    /// Applies `success` if every comparison holds, else `failure`;
    /// returns whether the comparisons held and the answers.
    pub async fn txn(&self, request: pb::TxnRequest) -> Result<pb::TxnResponse, PsError> {
        self.on_members("txn", |c| {
            let request = request.clone();
            async move { KvClient::new(c).txn(request).await }
        })
        .await
    }

    /// A new lease of `ttl` seconds; returns its id and granted TTL.
    pub async fn grant(&self, ttl: i64) -> Result<(i64, i64), PsError> {
        let answer = self
            .on_members("lease grant", |c| async move {
                LeaseClient::new(c)
                    .lease_grant(pb::LeaseGrantRequest { ttl, id: 0 })
                    .await
            })
            .await?;
        if !answer.error.is_empty() {
            return Err(PsError::Unavailable(format!(
                "etcd refused a lease: {}",
                answer.error
            )));
        }
        Ok((answer.id, answer.ttl))
    }

    /// Ends `lease` now (its keys go with it).
    pub async fn revoke(&self, lease: i64) -> Result<(), PsError> {
        self.on_members("lease revoke", |c| async move {
            LeaseClient::new(c)
                .lease_revoke(pb::LeaseRevokeRequest { id: lease })
                .await
        })
        .await
        .map(drop)
    }

    /// Renews `lease` once. Returns the TTL it now has (`<= 0`: the lease
    /// is gone: it expired or was revoked). The keep-alive stream is kept
    /// open between calls and reopened on the next member when it fails.
    pub async fn keep_alive(&self, lease: i64) -> Result<i64, PsError> {
        let mut slot = self.keepalive.lock().await;
        let request = pb::LeaseKeepAliveRequest { id: lease };
        for _ in 0..self.configured.len() {
            let renewed = async {
                match slot.as_mut() {
                    Some(stream) => {
                        stream.send.send(request).await.ok()?;
                        stream.answers.message().await.ok().flatten()
                    }
                    None => {
                        // etcd answers the stream's headers with its first
                        // message: queue the renewal before opening it.
                        let member = *self
                            .keepalive_member
                            .lock()
                            .unwrap_or_else(|p| p.into_inner());
                        let (send, receive) = tokio::sync::mpsc::channel(4);
                        send.send(request).await.ok()?;
                        let mut answers = LeaseClient::new(self.channels()[member].clone())
                            .lease_keep_alive(tokio_stream_of(receive))
                            .await
                            .ok()?
                            .into_inner();
                        let answer = answers.message().await.ok().flatten()?;
                        *slot = Some(KeepAlive { send, answers });
                        Some(answer)
                    }
                }
            };
            match tokio::time::timeout(CALL_TIMEOUT, renewed).await {
                Ok(Some(answer)) => return Ok(answer.ttl),
                _ => {
                    *slot = None;
                    self.next_keepalive_member();
                }
            }
        }
        Err(PsError::Unavailable(format!(
            "etcd: no member renewed lease {lease:x} ({})",
            self.endpoints.join(",")
        )))
    }

    fn next_keepalive_member(&self) {
        let mut member = self
            .keepalive_member
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        *member = (*member + 1) % self.configured.len();
    }

    /// Waits (at most `timeout`) for a change to a key in `[key,
    /// range_end)` after revision `after`. Returns whether one came; a
    /// watch that fails (a member lost) returns `false` early, and the
    /// caller reads the keys again.
    pub async fn wait_change(
        &self,
        key: &str,
        range_end: &str,
        after: i64,
        timeout: Duration,
    ) -> bool {
        let member = self.current.load(Ordering::Relaxed) % self.configured.len();
        let create = pb::WatchRequest {
            request_union: Some(pb::watch_request::RequestUnion::CreateRequest(
                pb::WatchCreateRequest {
                    key: key.as_bytes().to_vec(),
                    range_end: range_end.as_bytes().to_vec(),
                    start_revision: after + 1,
                    ..Default::default()
                },
            )),
        };
        let (send, receive) = tokio::sync::mpsc::channel(1);
        if send.send(create).await.is_err() {
            return false;
        }
        let watched = async {
            let mut answers = WatchClient::new(self.channels()[member].clone())
                .watch(tokio_stream_of(receive))
                .await
                .ok()?
                .into_inner();
            loop {
                let answer = answers.message().await.ok()??;
                if answer.canceled {
                    return None;
                }
                if !answer.events.is_empty() {
                    return Some(());
                }
            }
        };
        let changed = tokio::time::timeout(timeout, watched).await;
        drop(send);
        match changed {
            Ok(Some(())) => true,
            Ok(None) => {
                // The watch failed on this member: try another next time,
                // after a pause so a dead member is not spun on.
                self.current
                    .store((member + 1) % self.configured.len(), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
                false
            }
            Err(_) => false,
        }
    }
}

/// Whether a status means the member failed (try another), not that etcd
/// refused the request.
fn member_failed(code: tonic::Code) -> bool {
    use tonic::Code;
    matches!(
        code,
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded
    )
}

fn tokio_stream_of<T: Send + 'static>(
    receive: tokio::sync::mpsc::Receiver<T>,
) -> impl tonic::codegen::tokio_stream::Stream<Item = T> + Send + 'static {
    tonic::codegen::tokio_stream::wrappers::ReceiverStream::new(receive)
}
