//! Reports oversized messages with the status gRPC specifies for them.
//!
//! The gRPC status-code guide says a message larger than the receiver's
//! configured limit is RESOURCE_EXHAUSTED. tonic rejects such a message
//! before any handler runs, but reports it as OUT_OF_RANGE with the message
//! "Error, decoded message length too large ...". This tower layer rewrites
//! exactly that status, so clients see one code for every size limit.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tonic::codegen::http::{HeaderValue, Request, Response};

/// The message prefix tonic uses for an over-limit request.
const TONIC_TOO_LARGE: &[u8] = b"Error, decoded message length too large";

/// Layer that applies [`OversizeStatus`].
#[derive(Debug, Clone, Copy, Default)]
pub struct OversizeStatusLayer;

impl<S> tower_layer::Layer<S> for OversizeStatusLayer {
    type Service = OversizeStatus<S>;

    fn layer(&self, inner: S) -> Self::Service {
        OversizeStatus { inner }
    }
}

/// Rewrites tonic's OUT_OF_RANGE "message too large" status to RESOURCE_EXHAUSTED.
#[derive(Debug, Clone)]
pub struct OversizeStatus<S> {
    inner: S,
}

impl<S, ReqBody, ResBody> tower_service::Service<Request<ReqBody>> for OversizeStatus<S>
where
    S: tower_service::Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let response = self.inner.call(request);
        Box::pin(async move {
            let mut response = response.await?;
            let headers = response.headers_mut();
            let too_large = headers.get("grpc-status").map(|v| v.as_bytes()) == Some(b"11")
                && headers
                    .get("grpc-message")
                    .is_some_and(|m| percent_decoded_starts_with(m.as_bytes(), TONIC_TOO_LARGE));
            if too_large {
                headers.insert("grpc-status", HeaderValue::from_static("8"));
            }
            Ok(response)
        })
    }
}

/// Whether the percent-encoded `value` decodes to something starting with `prefix`.
fn percent_decoded_starts_with(value: &[u8], prefix: &[u8]) -> bool {
    let mut decoded = Vec::with_capacity(prefix.len());
    let mut rest = value;
    while decoded.len() < prefix.len() {
        match rest {
            [b'%', hi, lo, tail @ ..] => {
                let hex = std::str::from_utf8(&[*hi, *lo])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                let Some(byte) = hex else { return false };
                decoded.push(byte);
                rest = tail;
            }
            [byte, tail @ ..] => {
                decoded.push(*byte);
                rest = tail;
            }
            [] => break,
        }
    }
    decoded == prefix
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_encoded_messages_are_matched_after_decoding() {
        assert!(percent_decoded_starts_with(
            b"Error,%20decoded%20message%20length%20too%20large: x",
            TONIC_TOO_LARGE
        ));
        assert!(percent_decoded_starts_with(
            b"Error, decoded message length too large: x",
            TONIC_TOO_LARGE
        ));
        assert!(!percent_decoded_starts_with(
            b"Error, decoded",
            TONIC_TOO_LARGE
        ));
        assert!(!percent_decoded_starts_with(b"%zz", TONIC_TOO_LARGE));
    }
}
