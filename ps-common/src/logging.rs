//! Logging set-up shared by the `ps-server` and `ps-worker` binaries
//! (called once, by `main`: it installs the process's subscriber).

/// How log events are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line (for log collectors in clusters).
    Json,
}

/// Sends `tracing` events to stderr in `format`, filtered by `RUST_LOG`
/// (default `info`), so stdout stays free for machine-read lines such as
/// `listening on ADDR`.
pub fn init(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
