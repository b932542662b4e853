//! Process-wide logging set-up shared by the `ps-server` and `ps-worker` binaries.

/// Sends `tracing` events to stderr, filtered by `RUST_LOG` (default `info`),
/// so stdout stays free for machine-read lines such as `listening on ADDR`.
pub fn init() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
}
