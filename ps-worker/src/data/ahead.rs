//! Parsing ahead of the training loop, on a thread of its own with a
//! bounded queue, so it overlaps the pulls and the compute.

use std::sync::mpsc;

use super::{Batch, Batches, DataError};

impl Batches {
    /// Parses on a thread of its own, up to `depth` batches ahead.
    pub fn ahead(self, depth: usize) -> Ahead {
        let (tx, rx) = mpsc::sync_channel(depth.max(1));
        let thread = std::thread::Builder::new()
            .name("ps-parse".into())
            .spawn(move || {
                for item in self {
                    if tx.send(item).is_err() {
                        break; // the consumer is gone
                    }
                }
            });
        match thread {
            Ok(_) => Ahead {
                rx: Some(rx),
                error: None,
            },
            Err(e) => Ahead {
                rx: None,
                error: Some(DataError::Io {
                    source_name: "parser thread".into(),
                    message: format!("cannot start: {e}"),
                }),
            },
        }
    }
}

/// Batches parsed ahead on their own thread (see [`Batches::ahead`]).
/// Dropping it stops the thread at its next batch.
pub struct Ahead {
    rx: Option<mpsc::Receiver<Result<Batch, DataError>>>,
    error: Option<DataError>,
}

impl Iterator for Ahead {
    type Item = Result<Batch, DataError>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(e) = self.error.take() {
            return Some(Err(e));
        }
        self.rx.as_ref()?.recv().ok()
    }
}
