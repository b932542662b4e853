//! How requests reach a shard: over gRPC or by calling its service in this
//! process, each with the job's bearer token; and connecting to a shard
//! (and its standby) by address.

use super::*;

/// How requests reach a shard.
#[derive(Debug, Clone)]
pub(super) enum Link {
    /// Over the network.
    Grpc(ParameterServerClient<Channel>),
    /// By calling the shard's service in this process: no encoding, no socket.
    InProcess(ShardService),
}

/// Calls RPC `$rpc` with `$request` on shard connection `$shard` (its
/// bearer token attached, if any); the answer's message or status.
macro_rules! call {
    ($shard:expr, $rpc:ident, $request:expr) => {{
        let shard: &ShardConn = $shard;
        let request = $crate::client::link::authorized(shard.auth.as_ref(), $request);
        match &shard.link {
            Link::Grpc(client) => client.clone().$rpc(request).await,
            Link::InProcess(service) => service.$rpc(request).await,
        }
        .map(tonic::Response::into_inner)
    }};
}

#[derive(Debug, Clone)]
pub(super) struct ShardConn {
    pub(super) addr: String,
    pub(super) link: Link,
    /// `Bearer TOKEN`, sent with every call when the job has a token.
    pub(super) auth: Option<AsciiMetadataValue>,
    /// Most keys one request to this shard may carry.
    pub(super) max_keys: usize,
    /// Largest request this shard accepts, and largest answer it gives, in bytes.
    pub(super) max_bytes: usize,
}

impl ShardConn {
    pub(super) fn new(
        addr: String,
        link: Link,
        auth: Option<AsciiMetadataValue>,
        described: &pb::DescribeResponse,
    ) -> ShardConn {
        ShardConn {
            addr,
            link,
            auth,
            max_keys: usize::try_from(described.max_keys_per_request)
                .unwrap_or(usize::MAX)
                .max(1),
            max_bytes: usize::try_from(described.max_request_bytes)
                .unwrap_or(usize::MAX)
                .min(match described.max_response_bytes {
                    // A server from before the answer limit.
                    0 => usize::MAX,
                    n => usize::try_from(n).unwrap_or(usize::MAX),
                }),
        }
    }

    pub(super) fn error(&self, shard: usize, status: tonic::Status) -> PsError {
        PsError::Shard {
            shard,
            addr: self.addr.clone(),
            code: status.code(),
            message: status.message().to_string(),
        }
    }

    /// Keys per request so that a request of rows of `dim` floats stays under both limits.
    pub(super) fn chunk_keys(&self, dim: usize) -> usize {
        // 8 bytes per key (worst-case varint is 10) + 4 per float, with headroom for framing.
        let per_key = 10 + 4 * dim;
        let by_bytes = self.max_bytes.saturating_sub(1024) / per_key;
        self.max_keys.min(by_bytes).max(1)
    }
}

/// Connects to shard `i`: its primary at `addr`, or, if that cannot be
/// reached, its listed `backup` when the backup already serves as primary
/// (an earlier failover). Returns the connection, what the server said of
/// itself, and the backup to fail over to later.
pub(super) async fn connect_shard(
    i: usize,
    addr: String,
    backup: Option<String>,
    config: &ClientConfig,
) -> Result<(ShardConn, pb::DescribeResponse, Option<String>), PsError> {
    let unreachable = match connect_one(i, addr, config).await {
        Ok((conn, described)) => {
            let standby = backup.or_else(|| Some(described.backup.clone()));
            return Ok((conn, described, standby));
        }
        Err(e) => e,
    };
    let Some(backup) = backup else {
        return Err(unreachable);
    };
    let mut quick = config.clone();
    quick.connect_timeout = quick.connect_timeout.min(Duration::from_secs(5));
    match connect_one(i, backup, &quick).await {
        Ok((conn, described)) if described.role == "primary" => {
            tracing::warn!(shard = i, primary = %conn.addr, "the listed primary is unreachable; its backup serves as primary");
            let standby = Some(described.backup.clone());
            Ok((conn, described, standby))
        }
        _ => Err(unreachable),
    }
}

/// Connects to shard `i` at `addr`, retrying with backoff until the deadline,
/// and asks it who it is.
pub(super) async fn connect_one(
    i: usize,
    addr: String,
    config: &ClientConfig,
) -> Result<(ShardConn, pb::DescribeResponse), PsError> {
    let fail = |code, message: String| PsError::Shard {
        shard: i,
        addr: addr.clone(),
        code,
        message,
    };
    let invalid = |e: &dyn std::fmt::Display| {
        fail(
            tonic::Code::InvalidArgument,
            format!("invalid server address: {e}"),
        )
    };
    let endpoint = ps_common::tls::endpoint(&addr, config.tls.clone())
        .map_err(|e| invalid(&e))?
        .connect_timeout(config.connect_timeout.min(Duration::from_secs(5)))
        .timeout(config.request_timeout)
        .tcp_nodelay(true);
    let deadline = tokio::time::Instant::now() + config.connect_timeout;
    let mut backoff = Duration::from_millis(50);
    let mut attempts = 0u32;
    let channel = loop {
        attempts += 1;
        match endpoint.connect().await {
            Ok(channel) => break channel,
            Err(e) => {
                if tokio::time::Instant::now() + backoff > deadline {
                    return Err(fail(
                        tonic::Code::Unavailable,
                        format!(
                            "unreachable after {attempts} attempts over {:?}: {e}",
                            config.connect_timeout
                        ),
                    ));
                }
                tracing::debug!(%addr, attempts, "server not reachable yet: {e}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    };
    let mut client = ParameterServerClient::new(channel)
        .max_decoding_message_size(1 << 30)
        .max_encoding_message_size(usize::MAX);
    let auth = config
        .auth_token
        .as_ref()
        .map(|t| format!("Bearer {t}").parse::<AsciiMetadataValue>())
        .transpose()
        .map_err(|_| {
            fail(
                tonic::Code::InvalidArgument,
                "the auth token must be visible ASCII characters".into(),
            )
        })?;
    let described = client
        .describe(authorized(auth.as_ref(), pb::DescribeRequest {}))
        .await
        .map_err(|s| fail(s.code(), s.message().to_string()))?
        .into_inner();
    let conn = ShardConn::new(addr.clone(), Link::Grpc(client), auth, &described);
    Ok((conn, described))
}

/// `message` as a request carrying the bearer token `auth`, if any.
pub(super) fn authorized<T>(auth: Option<&AsciiMetadataValue>, message: T) -> Request<T> {
    let mut request = Request::new(message);
    if let Some(token) = auth {
        request
            .metadata_mut()
            .insert(ps_common::auth::HEADER, token.clone());
    }
    request
}
