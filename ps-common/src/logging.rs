//! Logging set-up shared by the `ps-server` and `ps-worker` binaries
//! (called once, by `main`: it installs the process's subscriber), and how
//! their `main` reports the error that ends a run.

use std::error::Error;
use std::io::IsTerminal;
use std::process::ExitCode;

use crate::PsError;

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
/// `listening on ADDR`. Text is coloured only on a terminal (and not under
/// `NO_COLOR`): a log file or a pipe gets no escape codes.
pub fn init(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// How a binary's `main` ends: on an error, prints it with its causes
/// (`Error: ...` then `Caused by:`) and fails. A user's mistake (a bad flag,
/// job file or data line) is told without a backtrace, even under
/// `RUST_BACKTRACE`; an internal error ([`PsError::Internal`] somewhere in
/// the chain: a bug) keeps the full report, backtrace included.
pub fn exit_code<E>(result: Result<(), E>) -> ExitCode
where
    E: std::fmt::Debug + AsRef<dyn Error + Send + Sync + 'static>,
{
    let Err(error) = result else {
        return ExitCode::SUCCESS;
    };
    eprintln!("{}", error_report(&error));
    ExitCode::FAILURE
}

/// The text [`exit_code`] prints for `error`.
pub fn error_report<E>(error: &E) -> String
where
    E: std::fmt::Debug + AsRef<dyn Error + Send + Sync + 'static>,
{
    let root: &(dyn Error + 'static) = error.as_ref();
    let chain = || std::iter::successors(Some(root), |&e| e.source());
    let internal =
        chain().any(|e| matches!(e.downcast_ref::<PsError>(), Some(PsError::Internal(_))));
    if internal {
        return format!("Error: {error:?}");
    }
    let mut text = format!("Error: {root}");
    let causes: Vec<_> = chain().skip(1).collect();
    if !causes.is_empty() {
        text.push_str("\n\nCaused by:");
        for (i, cause) in causes.iter().enumerate() {
            text.push_str(&format!("\n    {i}: {cause}"));
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("{message}")]
    struct Context {
        message: &'static str,
        #[source]
        source: PsError,
    }

    /// Stands in for `anyhow::Error`: its Debug is the full report (with a
    /// backtrace when enabled), its Display the message alone.
    struct Report(Box<dyn Error + Send + Sync + 'static>);

    impl std::fmt::Debug for Report {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "{} [full report with backtrace]", self.0)
        }
    }

    impl AsRef<dyn Error + Send + Sync + 'static> for Report {
        fn as_ref(&self) -> &(dyn Error + Send + Sync + 'static) {
            &*self.0
        }
    }

    #[test]
    fn a_users_mistake_is_told_with_its_causes_and_no_backtrace() {
        let error = Report(Box::new(Context {
            message: "--config job.toml",
            source: PsError::invalid("line 3: key `train.epochs`: must be >= 1"),
        }));
        assert_eq!(
            error_report(&error),
            "Error: --config job.toml\n\nCaused by:\n    0: line 3: key `train.epochs`: must be >= 1"
        );
    }

    #[test]
    fn an_internal_error_keeps_the_full_report() {
        let error = Report(Box::new(Context {
            message: "training failed",
            source: PsError::Internal("push task panicked".into()),
        }));
        assert_eq!(
            error_report(&error),
            "Error: training failed [full report with backtrace]"
        );
        assert_eq!(exit_code(Ok::<(), Report>(())), ExitCode::SUCCESS);
    }
}
