//! HTTP/2 flow control for the parameter-server RPCs, on both ends: one
//! place that sizes windows and frames for messages of rows.
//!
//! A ctr26 push or pull carries 1.7 MB per shard. hyper's defaults (a 1 MB
//! stream and connection window on a server, 16 KB frames both ways) made
//! such a message wait for window updates halfway and cross the connection
//! in a hundred frames. Windows of a few messages and 1 MB frames let it go
//! in one pass: `ps-bench ctr26` over loopback gained about 15% (README,
//! Performance). A window only bounds what a peer may send unread; a
//! request is still refused past `--max-request-bytes` before it is
//! decoded.

use tonic::transport::{Endpoint, Server};

/// Bytes one stream (one call) may send before the receiver reads them.
pub const STREAM_WINDOW: u32 = 4 << 20;
/// Bytes all streams of a connection together may send unread.
pub const CONNECTION_WINDOW: u32 = 16 << 20;
/// Largest HTTP/2 frame either end accepts.
pub const MAX_FRAME: u32 = 1 << 20;

/// `endpoint` with the windows and frame size above.
pub fn client(endpoint: Endpoint) -> Endpoint {
    endpoint
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
}

/// A gRPC server builder with the windows and frame size above.
pub fn server() -> Server {
    Server::builder()
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
}
