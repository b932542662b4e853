//! Where training data comes from: files, streamed, and the data sets
//! compiled into the binary (`builtin:NAME`).

use std::fs::File;
use std::io::{BufRead, BufReader};

use ps_common::config::DataSource;

use super::DataError;

/// The a9a data set (UCI Adult, CC BY 4.0), compiled in for the default
/// job, and the UCI handwritten digits (CC BY 4.0) for the image models.
const BUILTIN: &[(&str, &[u8])] = &[
    (
        "a9a/train",
        include_bytes!("../../../data/a9a/a9a.train.libsvm"),
    ),
    (
        "a9a/test",
        include_bytes!("../../../data/a9a/a9a.test.libsvm"),
    ),
    (
        "digits/train",
        include_bytes!("../../../data/digits/digits.train.csv"),
    ),
    (
        "digits/test",
        include_bytes!("../../../data/digits/digits.test.csv"),
    ),
];

/// Opens a data source for streaming.
pub fn open(source: &DataSource) -> Result<Box<dyn BufRead + Send>, DataError> {
    match source {
        DataSource::File(path) => {
            let file = File::open(path).map_err(|e| DataError::Io {
                source_name: path.display().to_string(),
                message: format!("cannot open: {e}"),
            })?;
            Ok(Box::new(BufReader::with_capacity(1 << 16, file)))
        }
        DataSource::Builtin(name) => BUILTIN
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, bytes)| Box::new(*bytes) as Box<dyn BufRead + Send>)
            .ok_or_else(|| DataError::Io {
                source_name: format!("builtin:{name}"),
                message: format!(
                    "no such builtin data set (available: {})",
                    BUILTIN
                        .iter()
                        .map(|(n, _)| *n)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            }),
    }
}

/// Fails early if a source cannot be opened.
pub fn check_readable(source: &DataSource) -> Result<(), DataError> {
    open(source).map(drop)
}
