//! `GET /metrics` over HTTP/1.1 (hyper), for servers and workers alike.
//!
//! One request per connection. A client has [`EndpointLimits::header_timeout`]
//! to send its request and [`EndpointLimits::connection_timeout`] for the
//! whole exchange; at most [`EndpointLimits::max_connections`] are open at
//! once (the next ones wait in the kernel's backlog), so idle or slow
//! clients cannot use up the process's file descriptors. The registry is
//! rendered on a blocking thread: a scrape never stalls the async threads
//! that serve gRPC.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::prometheus_text;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// How much of the process the endpoint may take.
#[derive(Debug, Clone, Copy)]
pub struct EndpointLimits {
    /// Connections served at once.
    pub max_connections: usize,
    /// Time to receive a request's head.
    pub header_timeout: Duration,
    /// Time for a whole connection (request and answer).
    pub connection_timeout: Duration,
}

impl Default for EndpointLimits {
    fn default() -> Self {
        EndpointLimits {
            max_connections: 64,
            header_timeout: Duration::from_secs(2),
            connection_timeout: Duration::from_secs(10),
        }
    }
}

/// Binds `addr` and serves `registry` there on the current runtime with
/// the default limits; returns the bound address (port 0 picks one).
pub async fn listen(addr: SocketAddr, registry: Arc<Registry>) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(serve(listener, registry, EndpointLimits::default()));
    Ok(bound)
}

/// Serves `GET /metrics` on `listener` until the task is dropped. Other
/// paths get 404, other methods 405.
pub async fn serve(listener: TcpListener, registry: Arc<Registry>, limits: EndpointLimits) {
    accept_capped(listener, limits.max_connections, "metrics", move |stream| {
        let registry = Arc::clone(&registry);
        async move {
            let service =
                hyper::service::service_fn(move |request| answer(request, Arc::clone(&registry)));
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(limits.connection_timeout, connection).await;
        }
    })
    .await
}

/// Accepts connections on `listener` until the task is dropped, serving
/// each with `serve` on a task of its own, at most `max_connections` at
/// once (the next ones wait in the kernel's backlog). A failing accept
/// (out of file descriptors, say) is logged once and retried after a
/// pause instead of spinning. `what` names the endpoint in the log.
pub async fn accept_capped<F, Fut>(
    listener: TcpListener,
    max_connections: usize,
    what: &'static str,
    mut serve: F,
) where
    F: FnMut(tokio::net::TcpStream) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let open = Arc::new(Semaphore::new(max_connections.max(1)));
    let mut failures = 0u32;
    loop {
        let Ok(permit) = Arc::clone(&open).acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => {
                failures = 0;
                stream
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                if failures == 1 {
                    tracing::warn!("{what} endpoint cannot accept connections: {e}");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let served = serve(stream);
        tokio::spawn(async move {
            let _open = permit;
            served.await;
        });
    }
}

async fn answer(
    request: Request<Incoming>,
    registry: Arc<Registry>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let plain = |status: StatusCode, text: &'static str| {
        let mut response = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
        *response.status_mut() = status;
        response
    };
    if request.uri().path() != "/metrics" {
        return Ok(plain(
            StatusCode::NOT_FOUND,
            "only GET /metrics is served\n",
        ));
    }
    if request.method() != Method::GET {
        return Ok(plain(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET /metrics is served\n",
        ));
    }
    let rendered = tokio::task::spawn_blocking(move || {
        let mut text = String::new();
        prometheus_text::encode(&mut text, &registry).map(|()| text)
    })
    .await;
    Ok(match rendered {
        Ok(Ok(text)) => {
            let mut response = Response::new(Full::new(Bytes::from(text)));
            if let Ok(content_type) = prometheus_text::CONTENT_TYPE.parse() {
                response
                    .headers_mut()
                    .insert(hyper::header::CONTENT_TYPE, content_type);
            }
            response
        }
        _ => plain(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the metrics could not be rendered\n",
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn registry() -> Arc<Registry> {
        let mut registry = Registry::default();
        let counter: Counter = Counter::default();
        counter.inc_by(7);
        registry.register("x", "An example", counter);
        Arc::new(registry)
    }

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut reply = String::new();
        s.read_to_string(&mut reply).await.unwrap();
        reply
    }

    #[tokio::test]
    async fn the_endpoint_serves_metrics_and_refuses_other_paths() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve(listener, registry(), EndpointLimits::default()));
        let reply = get(addr, "/metrics").await;
        assert!(reply.starts_with("HTTP/1.1 200 OK"), "{reply}");
        assert!(reply.contains("x_total 7\n"), "{reply}");
        assert!(get(addr, "/").await.starts_with("HTTP/1.1 404"));
        server.abort();
    }

    #[tokio::test]
    async fn idle_connections_past_the_cap_are_closed_and_scrapes_go_on() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = EndpointLimits {
            max_connections: 4,
            header_timeout: Duration::from_millis(200),
            connection_timeout: Duration::from_secs(2),
        };
        let server = tokio::spawn(serve(listener, registry(), limits));
        // Many clients connect and never send a byte.
        let mut idle = Vec::new();
        for _ in 0..32 {
            idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        let reply = tokio::time::timeout(Duration::from_secs(20), get(addr, "/metrics"))
            .await
            .expect("a scrape is answered once the idle connections time out");
        assert!(reply.contains("x_total 7"), "{reply}");
        // The server closed the idle ones: reading them ends.
        let mut buf = [0u8; 64];
        let first = &mut idle[0];
        let read = tokio::time::timeout(Duration::from_secs(5), first.read(&mut buf)).await;
        assert!(
            matches!(read, Ok(Ok(_)) | Ok(Err(_))),
            "an idle connection was closed by the server"
        );
        server.abort();
    }
}
