//! Training data: streaming libsvm and libffm readers, per-worker sharding,
//! batching, and parsing ahead on a thread of its own.
//!
//! The reader never holds the file in memory: it streams lines, keeps those
//! of this worker's shard (line `i` goes to worker `i % world`) and emits
//! [`Batch`]es in CSR form. A malformed line is an error naming the source and
//! the line number. [`Batches::ahead`] moves parsing to its own thread with a
//! bounded queue, so it overlaps the pulls and the compute.

use std::fs::File;
use std::io::{BufRead, BufReader};

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, mpsc};

use ps_common::config::{DataFormat, DataSource, IntegerFeatures, JobConfig, OnBadLine};
use ps_common::routing::{fnv1a64, mix64};

/// The a9a data set (UCI Adult, CC BY 4.0), compiled in for the default job.
const BUILTIN: &[(&str, &[u8])] = &[
    (
        "a9a/train",
        include_bytes!("../../data/a9a/a9a.train.libsvm"),
    ),
    ("a9a/test", include_bytes!("../../data/a9a/a9a.test.libsvm")),
];

/// Errors reading training data.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The source could not be opened or read.
    #[error("{source_name}: {message}")]
    Io {
        /// The file or builtin name.
        source_name: String,
        /// What failed.
        message: String,
    },
    /// A line does not parse.
    #[error("{source_name}:{line}: {message}")]
    Parse {
        /// The file or builtin name.
        source_name: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        message: String,
    },
}

/// A batch of examples in compressed-sparse-row form.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Batch {
    /// Labels, 0 or 1: `tasks` per example (example-major).
    pub labels: Vec<f32>,
    /// Example `i`'s features are `ids[offsets[i]..offsets[i + 1]]`.
    pub offsets: Vec<usize>,
    /// Feature ids.
    pub ids: Vec<u64>,
    /// Feature values, parallel to `ids`.
    pub values: Vec<f32>,
    /// Field of each feature, parallel to `ids`; empty when the format has
    /// no fields (every feature is then in field 0).
    pub fields: Vec<u32>,
}

impl Batch {
    fn new() -> Self {
        Batch {
            offsets: vec![0],
            ..Batch::default()
        }
    }

    /// Number of examples.
    pub fn len(&self) -> usize {
        self.offsets.len().saturating_sub(1)
    }

    /// True when the batch has no example.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn push_example(&mut self, labels: &[f32]) {
        self.labels.extend_from_slice(labels);
        self.offsets.push(self.ids.len());
    }
}

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

/// Streams one worker's shard of a libsvm or libffm source as batches.
pub struct Batches {
    reader: Box<dyn BufRead + Send>,
    format: DataFormat,
    fields: u32,
    integers: IntegerFeatures,
    tasks: usize,
    source_name: String,
    rank: usize,
    world: usize,
    batch_size: usize,
    /// Lines read so far (the next line's number minus one).
    line: usize,
    buf: String,
    done: bool,
    /// With `Some`, malformed lines are counted here and skipped instead of
    /// ending the stream with an error.
    skipped: Option<Arc<AtomicU64>>,
}

impl Batches {
    /// Batches of `source` read as the job's `[data]` section says (format,
    /// fields, integer features, `on_bad_line`), skipped lines counted in
    /// `skipped`.
    pub fn for_job(
        job: &JobConfig,
        source: &DataSource,
        rank: usize,
        world: usize,
        batch_size: usize,
        skipped: &Arc<AtomicU64>,
    ) -> Result<Self, DataError> {
        let data = &job.data;
        let batches = Self::open_format(source, data.format, data.fields, rank, world, batch_size)?
            .integers(data.integers)
            .tasks(job.model.tasks().len());
        Ok(match data.on_bad_line {
            OnBadLine::Fail => batches,
            OnBadLine::Skip => batches.skip_bad_lines(Arc::clone(skipped)),
        })
    }

    /// Labels per line (multi-task data: `1,0 ...`); default 1.
    pub fn tasks(mut self, tasks: usize) -> Self {
        self.tasks = tasks.max(1);
        self
    }

    /// How Criteo integer columns become features (default: bucketize).
    pub fn integers(mut self, integers: IntegerFeatures) -> Self {
        self.integers = integers;
        self
    }

    /// Skips malformed lines (each logged with its number, the first ones
    /// in full) and counts them in `counter`, instead of failing.
    pub fn skip_bad_lines(mut self, counter: Arc<AtomicU64>) -> Self {
        self.skipped = Some(counter);
        self
    }

    /// Batches of `batch_size` examples of a libsvm source from the lines
    /// `i` with `i % world == rank`.
    pub fn open(
        source: &DataSource,
        rank: usize,
        world: usize,
        batch_size: usize,
    ) -> Result<Self, DataError> {
        Self::open_format(source, DataFormat::Libsvm, 1, rank, world, batch_size)
    }

    /// As [`Batches::open`] for a given format; libffm field ids must be
    /// below `fields`.
    pub fn open_format(
        source: &DataSource,
        format: DataFormat,
        fields: u32,
        rank: usize,
        world: usize,
        batch_size: usize,
    ) -> Result<Self, DataError> {
        Ok(Batches {
            reader: open(source)?,
            format,
            fields,
            integers: IntegerFeatures::default(),
            tasks: 1,
            source_name: source.to_string(),
            rank,
            world: world.max(1),
            batch_size: batch_size.max(1),
            line: 0,
            buf: String::new(),
            done: false,
            skipped: None,
        })
    }

    fn next_batch(&mut self) -> Result<Option<Batch>, DataError> {
        let mut batch = Batch::new();
        while batch.len() < self.batch_size {
            self.buf.clear();
            let n = self
                .reader
                .read_line(&mut self.buf)
                .map_err(|e| DataError::Io {
                    source_name: self.source_name.clone(),
                    message: format!("read error after line {}: {e}", self.line),
                })?;
            if n == 0 {
                self.done = true;
                break;
            }
            let index = self.line;
            self.line += 1;
            if index % self.world != self.rank {
                continue;
            }
            let text = self.buf.trim();
            if text.is_empty() || text.starts_with('#') {
                continue;
            }
            let parsed = match self.format {
                DataFormat::Libsvm => parse_libsvm_line(text, self.tasks, &mut batch),
                DataFormat::Libffm => parse_libffm_line(text, self.fields, self.tasks, &mut batch),
                DataFormat::Criteo => parse_criteo_line(&self.buf, self.integers, &mut batch),
            };
            if let Err(message) = parsed {
                let error = DataError::Parse {
                    source_name: self.source_name.clone(),
                    line: self.line,
                    message,
                };
                match &self.skipped {
                    None => return Err(error),
                    Some(counter) => {
                        let n = counter.fetch_add(1, Ordering::Relaxed) + 1;
                        if n <= 10 || n.is_power_of_two() {
                            tracing::warn!(skipped = n, "skipping malformed line: {error}");
                        }
                    }
                }
            }
        }
        Ok((!batch.is_empty()).then_some(batch))
    }
}

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

impl Iterator for Batches {
    type Item = Result<Batch, DataError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        match self.next_batch() {
            Ok(Some(batch)) => Some(Ok(batch)),
            Ok(None) => None,
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

/// Parses `label idx:val idx:val ...` and appends it to `batch`; on error the
/// batch is left unchanged.
fn parse_libsvm_line(text: &str, tasks: usize, batch: &mut Batch) -> Result<(), String> {
    let mut fields = text.split_ascii_whitespace();
    let labels = parse_labels(fields.next().unwrap_or_default(), tasks)?;
    let start = batch.ids.len();
    for field in fields {
        let parsed = field
            .split_once(':')
            .and_then(|(i, v)| Some((i.parse::<u64>().ok()?, v.parse::<f32>().ok()?)));
        match parsed {
            Some((id, value)) if value.is_finite() => {
                batch.ids.push(id);
                batch.values.push(value);
            }
            _ => {
                batch.ids.truncate(start);
                batch.values.truncate(start);
                return Err(format!(
                    "feature {field:?} is not index:value with a finite value"
                ));
            }
        }
    }
    batch.push_example(&labels);
    Ok(())
}

/// Parses a label token: `tasks` comma-separated numbers, each positive
/// (> 0) meaning 1 and anything else 0 (libsvm's -1/+1 and 0/1 alike).
fn parse_labels(token: &str, tasks: usize) -> Result<Vec<f32>, String> {
    let labels = token
        .split(',')
        .map(|t| match t.parse::<f32>() {
            Ok(v) if v.is_finite() => Ok(if v > 0.0 { 1.0 } else { 0.0 }),
            Ok(_) => Err(format!("label {t:?} is not finite")),
            Err(_) => Err(format!("label {t:?} is not a number")),
        })
        .collect::<Result<Vec<f32>, String>>()?;
    if labels.len() != tasks {
        return Err(format!(
            "{} label(s) in {token:?}, the model has {tasks} task(s)",
            labels.len()
        ));
    }
    Ok(labels)
}

/// Parses `label field:id:value ...` and appends it to `batch`; on error the
/// batch is left unchanged.
fn parse_libffm_line(
    text: &str,
    fields: u32,
    tasks: usize,
    batch: &mut Batch,
) -> Result<(), String> {
    let mut tokens = text.split_ascii_whitespace();
    let labels = parse_labels(tokens.next().unwrap_or_default(), tasks)?;
    // `fields` may be shorter than `ids` (examples without fields).
    let (start, fields_start) = (batch.ids.len(), batch.fields.len());
    let fail = |batch: &mut Batch, message: String| {
        batch.ids.truncate(start);
        batch.values.truncate(start);
        batch.fields.truncate(fields_start);
        Err(message)
    };
    for token in tokens {
        let mut parts = token.splitn(3, ':');
        let parsed = (|| {
            let field = parts.next()?.parse::<u32>().ok()?;
            let id = parts.next()?.parse::<u64>().ok()?;
            let value = parts.next()?.parse::<f32>().ok()?;
            Some((field, id, value))
        })();
        match parsed {
            Some((field, _, _)) if field >= fields => {
                return fail(
                    batch,
                    format!("feature {token:?}: field {field} is not below data.fields = {fields}"),
                );
            }
            Some((field, id, value)) if value.is_finite() => {
                batch.fields.push(field);
                batch.ids.push(id);
                batch.values.push(value);
            }
            _ => {
                return fail(
                    batch,
                    format!("feature {token:?} is not field:index:value with a finite value"),
                );
            }
        }
    }
    batch.push_example(&labels);
    Ok(())
}

/// Criteo's integer and categorical column counts.
const CRITEO_INTEGERS: usize = 13;
const CRITEO_CATEGORIES: usize = 26;

/// The id of `token` in field `field`: both hashed into 64 bits.
fn hashed_id(field: usize, token: &[u8]) -> u64 {
    mix64(fnv1a64(token) ^ (field as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// Parses a Criteo TSV line (`label`, 13 integers, 26 hex categories, tab
/// separated, empty fields allowed) and appends it to `batch`; on error the
/// batch is left unchanged. Fields 0-12 are the integer columns, 13-38 the
/// categorical ones; an empty categorical value is its field's "missing" id,
/// an empty integer is left out.
fn parse_criteo_line(
    line: &str,
    integers: IntegerFeatures,
    batch: &mut Batch,
) -> Result<(), String> {
    let line = line.trim_end_matches(['\n', '\r']);
    let columns: Vec<&str> = line.split('\t').collect();
    if columns.len() != 1 + CRITEO_INTEGERS + CRITEO_CATEGORIES {
        return Err(format!(
            "{} tab-separated columns, expected 40 (label, 13 integers, 26 categories)",
            columns.len()
        ));
    }
    let label = match columns[0] {
        "0" => 0.0,
        "1" => 1.0,
        other => return Err(format!("label {other:?} is not 0 or 1")),
    };
    let mut features = Vec::with_capacity(CRITEO_INTEGERS + CRITEO_CATEGORIES);
    for (i, text) in columns[1..=CRITEO_INTEGERS].iter().enumerate() {
        if text.is_empty() {
            continue;
        }
        let v: i64 = text
            .parse()
            .map_err(|_| format!("integer column I{} = {text:?} is not an integer", i + 1))?;
        features.push(match integers {
            IntegerFeatures::Bucketize => {
                let bucket = if v <= 2 {
                    v
                } else {
                    ((v as f64).ln().powi(2)) as i64
                };
                (i, hashed_id(i, &bucket.to_le_bytes()), 1.0)
            }
            IntegerFeatures::Log => (i, hashed_id(i, b"log"), (v.max(0) as f32).ln_1p()),
        });
    }
    for (j, text) in columns[1 + CRITEO_INTEGERS..].iter().enumerate() {
        if !text.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!(
                "categorical column C{} = {text:?} is not hexadecimal",
                j + 1
            ));
        }
        let field = CRITEO_INTEGERS + j;
        features.push((field, hashed_id(field, text.as_bytes()), 1.0));
    }
    for (field, id, value) in features {
        batch.fields.push(field as u32);
        batch.ids.push(id);
        batch.values.push(value);
    }
    batch.push_example(&[label]);
    Ok(())
}

/// Fails early if a source cannot be opened.
pub fn check_readable(source: &DataSource) -> Result<(), DataError> {
    open(source).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A bounded fuzz harness (no extra tooling): random lines, some valid,
    /// most malformed, through every parser. A parser never panics; a line
    /// it refuses leaves the batch exactly as it was (nothing half-applied);
    /// a line it accepts adds exactly one consistent example.
    #[test]
    fn fuzzed_lines_never_panic_and_refused_lines_change_nothing() {
        const ALPHABET: &[u8] = b"0123456789012345:::   \t,.-+eEnaNiIf#\x7f";
        let mut rng = ps_common::init::RowRng::new(99, 0);
        let mut next = |n: u64| (rng.next_u64() % n) as usize;
        let (mut accepted, mut refused) = (0, 0);
        for case in 0..30_000 {
            let len = next(40);
            let mut line: String = (0..len)
                .map(|_| ALPHABET[next(ALPHABET.len() as u64)] as char)
                .collect();
            if case % 7 == 0 {
                // Near-valid lines, so the accepting paths are fuzzed too.
                line = format!("{} {}:{}:{}", next(2), next(3), next(50), next(9));
            }
            if case % 11 == 0 {
                line.push(char::from_u32(0x80 + next(0x700) as u32).unwrap_or('x'));
            }
            for format in 0..3 {
                let mut batch = Batch::new();
                let tasks = 1 + case % 2;
                let before = batch.clone();
                let result = match format {
                    0 => parse_libsvm_line(&line, tasks, &mut batch),
                    1 => parse_libffm_line(&line, 3, tasks, &mut batch),
                    _ => parse_criteo_line(&line, IntegerFeatures::default(), &mut batch),
                };
                match result {
                    Err(_) => {
                        refused += 1;
                        assert_eq!(batch, before, "{line:?} (format {format}) half-applied");
                    }
                    Ok(()) => {
                        accepted += 1;
                        let width = if format == 2 { 1 } else { tasks };
                        assert_eq!(batch.len(), 1, "{line:?}");
                        assert_eq!(batch.labels.len(), width, "{line:?}");
                        assert_eq!(batch.ids.len(), batch.values.len(), "{line:?}");
                        assert_eq!(batch.offsets[1], batch.ids.len(), "{line:?}");
                        assert!(batch.fields.is_empty() || batch.fields.len() == batch.ids.len());
                        assert!(batch.values.iter().all(|v| v.is_finite()), "{line:?}");
                    }
                }
            }
        }
        assert!(
            accepted > 1_000 && refused > 10_000,
            "{accepted} / {refused}"
        );
    }

    fn write_temp(name: &str, text: &str) -> DataSource {
        let path = std::env::temp_dir().join(format!("ps-data-{}-{name}", std::process::id()));
        File::create(&path)
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        DataSource::File(path)
    }

    #[test]
    fn worker_r_of_w_reads_lines_i_mod_w() {
        let src = write_temp("shard", "1 1:1\n-1 2:1\n+1 3:1\n0 4:1\n1 5:0.5\n");
        let all: Vec<Batch> = Batches::open(&src, 1, 2, 10)
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].ids, [2, 4]);
        assert_eq!(all[0].labels, [0.0, 0.0]);
        let zero: Vec<Batch> = Batches::open(&src, 0, 2, 2)
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(zero.iter().map(Batch::len).collect::<Vec<_>>(), [2, 1]);
        assert_eq!(zero[0].labels, [1.0, 1.0]);
        assert_eq!(zero[1].values, [0.5]);
        assert_eq!(zero[0].offsets, [0, 1, 2]);
    }

    #[test]
    fn a_malformed_line_is_reported_with_its_number() {
        let src = write_temp("bad", "1 1:1\n1 2:x\n");
        let err = Batches::open(&src, 0, 1, 10)
            .unwrap()
            .find_map(Result::err)
            .unwrap();
        let msg = err.to_string();
        assert!(
            msg.ends_with(":2: feature \"2:x\" is not index:value with a finite value"),
            "{msg}"
        );
        let src = write_temp("label", "yes 1:1\n");
        let err = Batches::open(&src, 0, 1, 10)
            .unwrap()
            .find_map(Result::err)
            .unwrap();
        assert!(err.to_string().contains(":1: label \"yes\""), "{err}");
    }

    #[test]
    fn with_skip_a_malformed_line_is_counted_and_the_rest_is_read() {
        let src = write_temp("skip", "1 1:1\n1 2:x\nnope\n0 3:1\n");
        let counter = Arc::new(AtomicU64::new(0));
        let batches: Vec<Batch> = Batches::open(&src, 0, 1, 10)
            .unwrap()
            .skip_bad_lines(Arc::clone(&counter))
            .map(Result::unwrap)
            .collect();
        assert_eq!(batches[0].ids, [1, 3]);
        assert_eq!(batches[0].labels, [1.0, 0.0]);
        assert_eq!(counter.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn a_missing_file_or_builtin_is_an_error_naming_it() {
        let err = check_readable(&DataSource::File("/no/such/file.libsvm".into())).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("/no/such/file.libsvm: cannot open"),
            "{err}"
        );
        let err = check_readable(&DataSource::Builtin("mnist".into())).unwrap_err();
        assert!(
            err.to_string().contains("available: a9a/train, a9a/test"),
            "{err}"
        );
    }

    #[test]
    fn libffm_lines_carry_fields_and_bad_fields_are_refused() {
        let src = write_temp("ffm", "1 0:5:1 2:7:0.5\n0 1:5:1\n");
        let b: Vec<Batch> = Batches::open_format(&src, DataFormat::Libffm, 3, 0, 1, 10)
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(b[0].ids, [5, 7, 5]);
        assert_eq!(b[0].fields, [0, 2, 1]);
        assert_eq!(b[0].values, [1.0, 0.5, 1.0]);
        assert_eq!(b[0].labels, [1.0, 0.0]);
        let src = write_temp("ffm-bad", "1 0:5:1\n1 3:1:1\n");
        let err = Batches::open_format(&src, DataFormat::Libffm, 3, 0, 1, 10)
            .unwrap()
            .find_map(Result::err)
            .unwrap();
        assert!(
            err.to_string()
                .contains(":2: feature \"3:1:1\": field 3 is not below"),
            "{err}"
        );
    }

    /// A line in Criteo's published layout.
    fn criteo_line(label: u8, ints: &[&str], cats: &[&str]) -> String {
        let mut cols = vec![label.to_string()];
        cols.extend(ints.iter().map(|s| s.to_string()));
        cols.extend(cats.iter().map(|s| s.to_string()));
        cols.join("\t") + "\n"
    }

    #[test]
    fn criteo_lines_hash_categories_per_field_and_bucketize_or_log_integers() {
        let mut ints = vec![""; 13];
        ints[0] = "1";
        ints[1] = "100";
        ints[2] = "-1";
        let mut cats = vec!["68fd1e64"; 26];
        cats[3] = "";
        let text = criteo_line(1, &ints, &cats) + &criteo_line(0, &ints, &cats);
        let src = write_temp("criteo", &text);
        let b = Batches::open_format(&src, DataFormat::Criteo, 39, 0, 1, 10)
            .unwrap()
            .next()
            .unwrap()
            .unwrap();
        assert_eq!(b.labels, [1.0, 0.0]);
        assert_eq!(
            b.offsets,
            [0, 29, 58],
            "3 integers + 26 categories (one missing)"
        );
        assert_eq!(&b.fields[..4], [0, 1, 2, 13]);
        // The same hex value in two fields is two different ids.
        assert_ne!(b.ids[3], b.ids[4]);
        assert_eq!(b.ids[..29], b.ids[29..]);
        assert_eq!(
            b.ids[1],
            hashed_id(1, &21i64.to_le_bytes()),
            "ln(100)^2 = 21.2"
        );
        let logged = Batches::open_format(&src, DataFormat::Criteo, 39, 0, 1, 10)
            .unwrap()
            .integers(IntegerFeatures::Log)
            .next()
            .unwrap()
            .unwrap();
        assert!((logged.values[1] - 101f32.ln()).abs() < 1e-6);
        assert_eq!(logged.values[2], 0.0, "negative integers count as 0");
    }

    #[test]
    fn malformed_criteo_lines_name_the_column() {
        let cats = vec!["a"; 26];
        for (line, expect) in [
            (criteo_line(1, &[""; 12], &cats), "39 tab-separated columns"),
            (
                criteo_line(1, &["x"; 13], &cats),
                "I1 = \"x\" is not an integer",
            ),
            (
                criteo_line(1, &[""; 13], &["zz"; 26]),
                "C1 = \"zz\" is not hexadecimal",
            ),
            (
                "2".to_string() + &criteo_line(1, &[""; 13], &cats)[1..],
                "label \"2\"",
            ),
        ] {
            let src = write_temp("criteo-bad", &line);
            let err = Batches::open_format(&src, DataFormat::Criteo, 39, 0, 1, 10)
                .unwrap()
                .find_map(Result::err)
                .unwrap();
            assert!(err.to_string().contains(expect), "{err}");
            assert!(err.to_string().contains(":1:"), "{err}");
        }
    }

    #[test]
    fn multi_task_lines_carry_one_label_per_task() {
        let src = write_temp("tasks", "1,0 1:1\n0,1 2:1\n1 3:1\n");
        let mut batches = Batches::open(&src, 0, 1, 10).unwrap().tasks(2);
        let err = batches.next().unwrap().unwrap_err();
        assert!(
            err.to_string()
                .contains(":3: 1 label(s) in \"1\", the model has 2 task(s)"),
            "{err}"
        );
        let src = write_temp("tasks2", "1,0 1:1\n0,1 2:1 3:1\n");
        let b = Batches::open(&src, 0, 1, 10)
            .unwrap()
            .tasks(2)
            .next()
            .unwrap()
            .unwrap();
        assert_eq!(b.labels, [1.0, 0.0, 0.0, 1.0]);
        assert_eq!(b.len(), 2);
    }

    #[test]
    fn parsing_ahead_yields_the_same_batches() {
        let direct: Vec<Batch> = Batches::open(&DataSource::Builtin("a9a/test".into()), 1, 3, 100)
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let ahead: Vec<Batch> = Batches::open(&DataSource::Builtin("a9a/test".into()), 1, 3, 100)
            .unwrap()
            .ahead(4)
            .map(Result::unwrap)
            .collect();
        assert_eq!(direct, ahead);
    }

    #[test]
    fn the_builtin_a9a_has_the_published_row_counts() {
        let count = |name: &str| -> usize {
            Batches::open(&DataSource::Builtin(name.into()), 0, 1, 4096)
                .unwrap()
                .map(|b| b.unwrap().len())
                .sum()
        };
        assert_eq!(count("a9a/train"), 32_561);
        assert_eq!(count("a9a/test"), 16_281);
    }
}

/// Properties of the line parsers over generated lines (proptest).
#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    /// Lines near the formats' grammar, and arbitrary text.
    fn any_line() -> impl Strategy<Value = String> {
        let token = prop_oneof![
            (0u32..3).prop_map(|l| l.to_string()),
            (0u64..1000, -5.0f32..5.0).prop_map(|(i, v)| format!("{i}:{v}")),
            (0u32..4, 0u64..1000, -5.0f32..5.0).prop_map(|(f, i, v)| format!("{f}:{i}:{v}")),
            prop::sample::select(vec![
                "nan", "inf", "-", ":", "::", "1e999", "\t", "é", "1,0", ""
            ])
            .prop_map(str::to_string),
            "[ -~]{0,12}",
        ];
        prop::collection::vec(token, 0..8).prop_map(|tokens| tokens.join(" "))
    }

    /// Criteo TSV lines, mostly well formed: 40 columns of a 0/1 label, 13
    /// integers and 26 hexadecimal categories (any may be empty), with now
    /// and then a column too many or too few, a bad label or a bad field.
    fn criteo_line() -> impl Strategy<Value = String> {
        let label = prop_oneof![8 => Just("0"), 8 => Just("1"), 1 => Just("2"), 1 => Just("")];
        let integer = prop_oneof![
            30 => Just(String::new()),
            60 => (-5i64..100_000).prop_map(|v| v.to_string()),
            5 => any::<i64>().prop_map(|v| v.to_string()),
            1 => prop::sample::select(vec!["1.5", "x", " 3", "999999999999999999999999999999"])
                .prop_map(str::to_string),
        ];
        let category = prop_oneof![
            30 => Just(String::new()),
            60 => "[0-9a-f]{8}",
            5 => "[0-9a-fA-F]{1,16}",
            1 => prop::sample::select(vec!["zz", "é", "0x1f", "12 34"]).prop_map(str::to_string),
        ];
        let integers = prop_oneof![8 => Just(13usize), 1 => Just(12), 1 => Just(14)];
        let categories = prop_oneof![8 => Just(26usize), 1 => Just(25), 1 => Just(27)];
        (label, integers, categories)
            .prop_flat_map(move |(label, n, m)| {
                (
                    Just(label),
                    prop::collection::vec(integer.clone(), n),
                    prop::collection::vec(category.clone(), m),
                )
            })
            .prop_map(|(label, integers, categories)| {
                std::iter::once(label.to_string())
                    .chain(integers)
                    .chain(categories)
                    .collect::<Vec<_>>()
                    .join("\t")
            })
    }

    /// Parses `line` as Criteo into a batch already holding one Criteo
    /// example; checks it added one consistent example or changed nothing.
    /// Returns whether it was accepted.
    fn check_criteo(line: &str, integers: IntegerFeatures) -> Result<bool, TestCaseError> {
        let mut batch = Batch::new();
        let first = ["1"]
            .into_iter()
            .chain(["7"; CRITEO_INTEGERS])
            .chain(["68fd1e64"; CRITEO_CATEGORIES])
            .collect::<Vec<_>>()
            .join("\t");
        prop_assert!(parse_criteo_line(&first, integers, &mut batch).is_ok());
        let before = batch.clone();
        match parse_criteo_line(line, integers, &mut batch) {
            Err(message) => {
                prop_assert!(!message.is_empty());
                prop_assert_eq!(batch, before);
                Ok(false)
            }
            Ok(()) => {
                prop_assert_eq!(batch.len(), 2);
                prop_assert_eq!(batch.ids.len(), batch.values.len());
                prop_assert_eq!(batch.fields.len(), batch.ids.len(), "a field per feature");
                prop_assert_eq!(*batch.offsets.last().unwrap_or(&0), batch.ids.len());
                let added = &batch.fields[before.ids.len()..];
                prop_assert!(added.len() >= CRITEO_CATEGORIES && added.len() <= 39);
                prop_assert!(
                    added.windows(2).all(|w| w[0] < w[1]),
                    "fields in column order"
                );
                prop_assert!(added.iter().all(|&f| (f as usize) < 39));
                prop_assert!(batch.values.iter().all(|v| v.is_finite()));
                Ok(true)
            }
        }
    }

    #[test]
    fn the_criteo_property_reaches_its_accept_path() {
        use proptest::strategy::ValueTree;
        let mut runner = proptest::test_runner::TestRunner::deterministic();
        let strategy = criteo_line();
        let accepted = (0..500)
            .filter(|_| {
                let line = strategy.new_tree(&mut runner).unwrap().current();
                check_criteo(&line, IntegerFeatures::Bucketize).unwrap()
            })
            .count();
        assert!(
            accepted >= 100,
            "only {accepted} of 500 generated lines were accepted"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]
        #[test]
        fn a_line_adds_one_consistent_example_or_changes_nothing(
            line in any_line(),
            tasks in 1usize..3,
            format in 0usize..3,
        ) {
            // A batch that already holds an example.
            let mut batch = Batch::new();
            let first = if tasks == 2 { "1,0 3:1" } else { "1 3:1" };
            prop_assert!(parse_libsvm_line(first, tasks, &mut batch).is_ok());
            let before = batch.clone();
            let result = match format {
                0 => parse_libsvm_line(&line, tasks, &mut batch),
                1 => parse_libffm_line(&line, 4, tasks, &mut batch),
                _ => parse_criteo_line(&line, IntegerFeatures::default(), &mut batch),
            };
            match result {
                Err(message) => {
                    prop_assert!(!message.is_empty());
                    prop_assert_eq!(batch, before);
                }
                Ok(()) => {
                    prop_assert_eq!(batch.len(), before.len() + 1);
                    prop_assert_eq!(batch.ids.len(), batch.values.len());
                    prop_assert_eq!(*batch.offsets.last().unwrap_or(&0), batch.ids.len());
                    prop_assert!(batch.values.iter().all(|v| v.is_finite()));
                }
            }
        }

        #[test]
        fn a_criteo_line_adds_one_consistent_example_or_changes_nothing(
            line in criteo_line(),
            log in any::<bool>(),
        ) {
            let integers = if log { IntegerFeatures::Log } else { IntegerFeatures::Bucketize };
            check_criteo(&line, integers)?;
        }
    }
}
