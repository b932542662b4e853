//! The REST endpoint, in TensorFlow Serving's shape:
//!
//! - `POST /v1/models/{name}:predict` with `{"instances": [...]}` answers
//!   `{"predictions": [...]}`: one probability per instance, or for a
//!   multi-task model one array of probabilities (in task order) each.
//! - `GET /v1/models/{name}` answers the model's status.
//! - `GET /metrics` answers the serving metrics (Prometheus text).
//! - `GET /healthz` answers `ok` while the endpoint serves: what a
//!   probe that holds no token reads.
//!
//! With a serving token, the model's URLs need `authorization: Bearer
//! TOKEN` (401 otherwise; `/metrics` and `/healthz` stay open, as the
//! servers' metrics do).
//! A malformed body, an unknown model or an instance that does not parse
//! gets 400 with `{"error": "..."}` saying what was wrong; too many waiting
//! requests get 503, rows the servers cannot give 503. A body is read up
//! to `max_body_bytes` (413 past it). Connections are kept alive, at most
//! `max_connections` at once, each given `header_timeout` to send a
//! request's head (and, with TLS, to finish its handshake).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::text::encode;
use prometheus_client::registry::Registry;
use ps_common::prometheus::http::accept_capped;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;

use super::{Instance, Predictor, ServeError};

/// How much of the process the endpoint may take.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// Connections open at once.
    pub max_connections: usize,
    /// Time to receive a request's head.
    pub header_timeout: Duration,
    /// Largest request body.
    pub max_body_bytes: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            max_connections: 1024,
            header_timeout: Duration::from_secs(10),
            max_body_bytes: 16 << 20,
        }
    }
}

struct Endpoint {
    predictor: Predictor,
    registry: Registry,
    limits: HttpLimits,
}

/// Serves `predictor` on `listener` until the task is dropped; with `tls`,
/// every connection is TLS (a handshake not done within the header
/// timeout closes it).
pub async fn serve(
    listener: TcpListener,
    predictor: Predictor,
    limits: HttpLimits,
    tls: Option<Arc<ServerConfig>>,
) {
    let registry = predictor.metrics().registry();
    let endpoint = Arc::new(Endpoint {
        predictor,
        registry,
        limits,
    });
    let acceptor = tls.map(TlsAcceptor::from);
    accept_capped(listener, limits.max_connections, "serving", move |stream| {
        let _ = stream.set_nodelay(true);
        let endpoint = Arc::clone(&endpoint);
        let acceptor = acceptor.clone();
        async move {
            let Some(acceptor) = acceptor else {
                return serve_connection(stream, endpoint).await;
            };
            let timeout = endpoint.limits.header_timeout;
            match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
                Ok(Ok(stream)) => serve_connection(stream, endpoint).await,
                Ok(Err(e)) => tracing::debug!("serving: TLS handshake failed: {e}"),
                Err(_) => tracing::debug!("serving: no TLS handshake within {timeout:?}"),
            }
        }
    })
    .await
}

/// Answers the requests of one connection, plain or TLS.
async fn serve_connection<S>(stream: S, endpoint: Arc<Endpoint>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let timeout = endpoint.limits.header_timeout;
    let service = hyper::service::service_fn(move |request| {
        let endpoint = Arc::clone(&endpoint);
        async move { Ok::<_, Infallible>(endpoint.answer(request).await) }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(timeout)
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

fn json_response(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

fn error_response(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    json_response(status, &json!({ "error": message }))
}

fn status_of(e: &ServeError) -> StatusCode {
    match e {
        ServeError::BadRequest(_) => StatusCode::BAD_REQUEST,
        ServeError::Overloaded(_) | ServeError::Rows(_) => StatusCode::SERVICE_UNAVAILABLE,
        ServeError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        ServeError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
    }
}

impl Endpoint {
    async fn answer(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        let path = request.uri().path().to_string();
        if path == "/metrics" {
            return self.metrics();
        }
        if path == "/healthz" {
            return Response::new(Full::new(Bytes::from_static(b"ok\n")));
        }
        let Some(rest) = path.strip_prefix("/v1/models/") else {
            return error_response(
                StatusCode::NOT_FOUND,
                "not found: the API is POST /v1/models/NAME:predict, GET /v1/models/NAME, GET /metrics and GET /healthz",
            );
        };
        let token = request
            .headers()
            .get(ps_common::auth::HEADER)
            .map(|v| v.as_bytes());
        if let Err(e) = self.predictor.check_token(token) {
            self.predictor.metrics().refused(e.kind());
            return error_response(StatusCode::UNAUTHORIZED, &e.to_string());
        }
        if let Some(name) = rest.strip_suffix(":predict") {
            if request.method() != Method::POST {
                return error_response(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "predictions are asked for with POST",
                );
            }
            let started = Instant::now();
            let answer = self.predict(name, request.into_body()).await;
            let seconds = started.elapsed().as_secs_f64();
            return match answer {
                Ok(body) => {
                    self.predictor.metrics().request("http", seconds, None);
                    json_response(StatusCode::OK, &body)
                }
                Err((status, e)) => {
                    self.predictor
                        .metrics()
                        .request("http", seconds, Some(e.kind()));
                    error_response(status, &e.to_string())
                }
            };
        }
        if request.method() != Method::GET {
            return error_response(
                StatusCode::METHOD_NOT_ALLOWED,
                "a model's status is read with GET",
            );
        }
        match self.predictor.check_model(rest) {
            Ok(()) => json_response(
                StatusCode::OK,
                &json!({
                    "model_version_status": [{
                        "version": "1",
                        "state": "AVAILABLE",
                        "status": { "error_code": "OK", "error_message": "" }
                    }]
                }),
            ),
            Err(e) => error_response(StatusCode::BAD_REQUEST, &e.to_string()),
        }
    }

    async fn predict(&self, name: &str, body: Incoming) -> Result<Value, (StatusCode, ServeError)> {
        let bad = |m: String| (StatusCode::BAD_REQUEST, ServeError::BadRequest(m));
        self.predictor
            .check_model(name)
            .map_err(|e| (StatusCode::BAD_REQUEST, e))?;
        let limit = self.limits.max_body_bytes;
        let bytes = match Limited::new(body, limit).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                return Err((
                    StatusCode::PAYLOAD_TOO_LARGE,
                    ServeError::BadRequest(format!(
                        "the body is over {limit} bytes (--max-body-bytes)"
                    )),
                ));
            }
            Err(e) => return Err(bad(format!("cannot read the body: {e}"))),
        };
        let body: Value = serde_json::from_slice(&bytes)
            .map_err(|e| bad(format!("the body is not JSON: {e}")))?;
        let Some(object) = body.as_object() else {
            return Err(bad(
                "the body must be an object {\"instances\": [...]}".into()
            ));
        };
        if let Some(key) = object.keys().find(|k| *k != "instances") {
            return Err(bad(format!(
                "unknown key {key:?}: the body is {{\"instances\": [...]}}"
            )));
        }
        let Some(Value::Array(items)) = object.get("instances") else {
            return Err(bad(
                "the body needs \"instances\": an array of instances".into()
            ));
        };
        let instances = items
            .iter()
            .enumerate()
            .map(|(i, v)| Instance::from_json(v).map_err(|why| bad(format!("instance {i}: {why}"))))
            .collect::<Result<Vec<_>, _>>()?;
        let predictions = self
            .predictor
            .predict(name, &instances)
            .await
            .map_err(|e| (status_of(&e), e))?;
        let outputs = self.predictor.outputs();
        let predictions: Vec<Value> = predictions
            .into_iter()
            .map(|p| {
                if outputs == 1 {
                    json!(p.first().copied().unwrap_or(f32::NAN))
                } else {
                    json!(p)
                }
            })
            .collect();
        Ok(json!({ "predictions": predictions }))
    }

    fn metrics(&self) -> Response<Full<Bytes>> {
        let mut text = String::new();
        if encode(&mut text, &self.registry).is_err() {
            return error_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the metrics could not be rendered",
            );
        }
        let mut response = Response::new(Full::new(Bytes::from(text)));
        response.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static(
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            ),
        );
        response
    }
}
