//! Training data: streaming readers of libsvm, libffm, Criteo TSV, CSV and
//! rows of pixels,
//! per-worker sharding, shuffling, sampling, batching, and parsing ahead on
//! a thread of its own.
//!
//! The reader never holds the file in memory: it streams lines, keeps those
//! of this worker's shard (line `i` goes to worker `i % world`; a CSV
//! file's header is every worker's, and its data lines are counted from
//! the line after) and emits
//! [`Batch`]es in CSR form. A malformed line is an error naming the source and
//! the line number. [`Batches::ahead`] moves parsing to its own thread with a
//! bounded queue, so it overlaps the pulls and the compute.
//!
//! - [`parse`]: the line parsers of libsvm, libffm and Criteo TSV, and
//!   numeric columns' features;
//! - [`csv`]: CSV with a header, columns by name;
//! - [`batch`]: the batches the readers emit;
//! - [`select`]: sampling and the shuffle buffer;
//! - [`image`]: the pixels format and augmentation;
//! - [`source`]: files and the built-in data sets;
//! - [`ahead`]: parsing on a thread of its own.

use std::borrow::Cow;
use std::io::BufRead;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use ps_common::config::{CsvConfig, DataConfig, DataFormat, DataSource, JobConfig, OnBadLine};

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
    /// More lines were malformed than `data.max_bad_line_fraction` allows.
    #[error(
        "{source_name}: {bad} of the {lines} lines read are malformed, more than \
         data.max_bad_line_fraction = {max_fraction} (is data.format right? the first \
         bad lines are logged above)"
    )]
    TooManyBadLines {
        /// The file or builtin name.
        source_name: String,
        /// Malformed lines so far.
        bad: u64,
        /// This worker's lines read so far.
        lines: u64,
        /// The allowed share.
        max_fraction: f64,
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

/// How lines of a job's data format read, for one line at a time
/// (serving: examples without their label).
#[derive(Debug, Clone, PartialEq)]
pub struct LineFormat {
    /// The format.
    pub format: DataFormat,
    /// libffm: fields are below this.
    pub fields: u32,
    /// What a label holds (not read: served lines have none).
    pub labels: LabelFormat,
    /// Numeric columns (Criteo, CSV).
    pub numeric: Numeric,
    /// CSV: the job's numeric then categorical columns, in its order.
    pub csv: Option<CsvLayout>,
    /// Pixels: the images' shape and the classes.
    pub pixels: Option<Pixels>,
}

impl LineFormat {
    /// The format of `job`'s data.
    pub fn of_job(job: &JobConfig) -> LineFormat {
        LineFormat {
            format: job.data.format,
            fields: job.data.fields,
            labels: LabelFormat::of(&job.model),
            numeric: Numeric::of(&job.data),
            csv: job.data.csv.as_ref().map(CsvLayout::unlabeled),
            pixels: Pixels::of_job(job),
        }
    }

    /// Appends `text`, a line of this format without its label, to
    /// `batch` (labelled 0); a malformed line leaves `batch` as it was
    /// and says what is wrong with it.
    pub fn parse_unlabeled(&self, text: &str, batch: &mut Batch) -> Result<(), String> {
        let labelled = || format!("{} {text}", self.labels.placeholder());
        match self.format {
            DataFormat::Libsvm => parse_libsvm_line(&labelled(), &self.labels, batch),
            DataFormat::Libffm => parse_libffm_line(&labelled(), self.fields, &self.labels, batch),
            DataFormat::Criteo => parse_criteo_line(&format!("0\t{text}"), self.numeric, batch),
            DataFormat::Csv => match &self.csv {
                Some(layout) => layout.parse(text, self.numeric, &self.labels, batch),
                None => Err("the job's format is csv but it has no [data.csv]".into()),
            },
            DataFormat::Pixels => match &self.pixels {
                Some(pixels) => pixels.parse_line(&format!("0,{text}"), batch),
                None => Err(NO_IMAGE.into()),
            },
        }
    }
}

/// Streams one worker's shard of a libsvm or libffm source as batches.
pub struct Batches {
    reader: Box<dyn BufRead + Send>,
    format: DataFormat,
    fields: u32,
    numeric: Numeric,
    labels: LabelFormat,
    /// CSV: the configured columns, and where the header put them.
    csv: Option<(CsvConfig, Option<CsvLayout>)>,
    source_name: String,
    rank: usize,
    world: usize,
    batch_size: usize,
    /// Lines read so far (the next line's number minus one).
    line: usize,
    /// The line being parsed, and its 1-based number.
    buf: String,
    current: usize,
    /// The source has no more lines.
    eof: bool,
    done: bool,
    /// With `Some`, malformed lines are counted and skipped instead of
    /// ending the stream with an error.
    skipped: Option<SkipBadLines>,
    /// Lines of this worker's shard handed to a parser.
    parsed_lines: u64,
    shuffle: Option<Shuffle>,
    sampling: Option<Sampling>,
    /// Pixels: the images' shape and the classes.
    pixels: Option<Pixels>,
    /// Random changes to each image (training only).
    augment: Option<Augment>,
}

const NO_IMAGE: &str = "format pixels needs [data.image]";

/// Skipping malformed lines, within a share of them.
struct SkipBadLines {
    /// The job's count of skipped lines (all workers and epochs).
    counter: Arc<AtomicU64>,
    /// This stream's.
    bad: u64,
    max_fraction: f64,
}

/// Lines checked before the bad-line share is held against a stream (a
/// bad line among the first few says little).
const BAD_LINE_GRACE: u64 = 1000;

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
        let mut batches =
            Self::open_format(source, data.format, data.fields, rank, world, batch_size)?
                .numeric(Numeric::of(data))
                .labels(LabelFormat::of(&job.model));
        batches.pixels = Pixels::of_job(job);
        if let Some(csv) = &data.csv {
            batches = batches.csv(csv.clone());
        }
        Ok(match data.on_bad_line {
            OnBadLine::Fail => batches,
            OnBadLine::Skip => {
                batches.skip_bad_lines(Arc::clone(skipped), data.max_bad_line_fraction)
            }
        })
    }

    /// Keeps only the lines `data`'s `negative_sampling` and
    /// `sample_by_feature` keep, decided by coins drawn from `seed` (for
    /// training data; validation is read whole).
    pub fn sampled(mut self, data: &DataConfig, seed: u64) -> Self {
        let rules: Vec<(u32, u64, f64)> = data
            .sample_by_feature
            .iter()
            .map(|rule| {
                let id = match (&rule.value, rule.id) {
                    (Some(value), _) => parse::hashed_id(rule.field as usize, value.as_bytes()),
                    (None, id) => id.unwrap_or_default(),
                };
                (rule.field, id, rule.rate)
            })
            .collect();
        self.sampling =
            (data.negative_sampling.is_some() || !rules.is_empty()).then_some(Sampling {
                negative_rate: data.negative_sampling,
                rules,
                seed,
            });
        self
    }

    /// Changes each image as `data.augment` says, drawn from `seed` (for
    /// training data; validation is read as it is).
    pub fn augmented(mut self, data: &DataConfig, seed: u64) -> Self {
        self.augment = match (data.augment, data.image) {
            (Some(config), Some(image)) => Some(Augment::new(config, image, seed)),
            _ => None,
        };
        self
    }

    /// Hands out lines through a shuffle buffer of `capacity` lines (0:
    /// file order), in an order drawn from `seed`.
    pub fn shuffled(mut self, capacity: usize, seed: u64) -> Self {
        self.shuffle = (capacity > 1).then(|| Shuffle {
            capacity,
            lines: Vec::with_capacity(capacity.min(1 << 16)),
            rng: ps_common::init::RowRng::new(seed, 0x5348_5546),
        });
        self
    }

    /// Binary labels per line (multi-task data: `1,0 ...`); default 1.
    pub fn tasks(self, tasks: usize) -> Self {
        self.labels(LabelFormat::binary(tasks))
    }

    /// What a line's label holds (default: one binary label).
    pub fn labels(mut self, labels: LabelFormat) -> Self {
        self.labels = labels;
        self
    }

    /// How numeric columns become features (default: bucketize).
    pub fn numeric(mut self, numeric: impl Into<Numeric>) -> Self {
        self.numeric = numeric.into();
        self
    }

    /// CSV: the columns by name (the layout comes from the header).
    pub fn csv(mut self, csv: CsvConfig) -> Self {
        self.csv = Some((csv, None));
        self
    }

    /// Skips malformed lines (each logged with its number, the first ones
    /// in full) and counts them in `counter`, instead of failing, unless
    /// more than `max_fraction` of the lines are malformed.
    pub fn skip_bad_lines(mut self, counter: Arc<AtomicU64>, max_fraction: f64) -> Self {
        self.skipped = Some(SkipBadLines {
            counter,
            bad: 0,
            max_fraction,
        });
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
        let mut reader = open(source)?;
        if format == DataFormat::Pixels {
            reader = idx::images_as_lines(source, reader)?;
        }
        Ok(Batches {
            reader,
            format,
            fields,
            numeric: Numeric::default(),
            labels: LabelFormat::binary(1),
            csv: None,
            source_name: source.to_string(),
            rank,
            world: world.max(1),
            batch_size: batch_size.max(1),
            line: 0,
            buf: String::new(),
            current: 0,
            eof: false,
            done: false,
            skipped: None,
            parsed_lines: 0,
            shuffle: None,
            sampling: None,
            pixels: None,
            augment: None,
        })
    }

    /// Reads the next line of this worker's shard that holds an example
    /// into `buf` (its number in `current`); false at the end.
    fn read_shard_line(&mut self) -> Result<bool, DataError> {
        loop {
            self.buf.clear();
            let n = self
                .reader
                .read_line(&mut self.buf)
                .map_err(|e| DataError::Io {
                    source_name: self.source_name.clone(),
                    message: format!("read error after line {}: {e}", self.line),
                })?;
            if n == 0 {
                self.eof = true;
                return Ok(false);
            }
            let index = self.line;
            self.line += 1;
            // A CSV file's first line is its header, read by every worker;
            // its data lines are dealt out from the line after.
            let csv = self.format == DataFormat::Csv;
            if index == 0 && csv {
                self.read_header()?;
                continue;
            }
            if (index - usize::from(csv)) % self.world != self.rank {
                continue;
            }
            let text = self.buf.trim();
            if text.is_empty() || text.starts_with('#') {
                continue;
            }
            self.current = self.line;
            return Ok(true);
        }
    }

    /// Resolves the CSV columns from the header line in `buf`.
    fn read_header(&mut self) -> Result<(), DataError> {
        let error = |message: String| DataError::Parse {
            source_name: self.source_name.clone(),
            line: 1,
            message,
        };
        let Some((csv, layout)) = &mut self.csv else {
            return Err(error("format csv needs [data.csv] column names".into()));
        };
        *layout = Some(CsvLayout::from_header(&self.buf, csv).map_err(error)?);
        Ok(())
    }

    /// The next line to parse, into `buf`: straight from the source, or
    /// a random one of the shuffle buffer; false at the end.
    fn next_line(&mut self) -> Result<bool, DataError> {
        let Some(mut shuffle) = self.shuffle.take() else {
            return self.read_shard_line();
        };
        let filled = (|| {
            while shuffle.lines.len() < shuffle.capacity && !self.eof {
                if self.read_shard_line()? {
                    shuffle
                        .lines
                        .push((self.current, std::mem::take(&mut self.buf)));
                }
            }
            Ok::<_, DataError>(())
        })();
        let picked = match filled {
            Ok(()) if !shuffle.lines.is_empty() => {
                let j = (shuffle.rng.next_u64() % shuffle.lines.len() as u64) as usize;
                let (line, text) = shuffle.lines.swap_remove(j);
                (self.current, self.buf) = (line, text);
                Ok(true)
            }
            Ok(()) => Ok(false),
            Err(e) => Err(e),
        };
        self.shuffle = Some(shuffle);
        picked
    }

    /// Fails when more than the allowed share of lines were malformed:
    /// from [`BAD_LINE_GRACE`] lines on, or at the end of the source.
    fn check_bad_share(&self, at_end: bool) -> Result<(), DataError> {
        let Some(skip) = &self.skipped else {
            return Ok(());
        };
        let lines = self.parsed_lines;
        let over = skip.bad as f64 > skip.max_fraction * lines as f64;
        if over && (at_end || lines >= BAD_LINE_GRACE) {
            return Err(DataError::TooManyBadLines {
                source_name: self.source_name.clone(),
                bad: skip.bad,
                lines,
                max_fraction: skip.max_fraction,
            });
        }
        Ok(())
    }

    fn next_batch(&mut self) -> Result<Option<Batch>, DataError> {
        let mut batch = Batch::new();
        while batch.len() < self.batch_size {
            if !self.next_line()? {
                self.done = true;
                self.check_bad_share(true)?;
                break;
            }
            self.parsed_lines += 1;
            let text = self.buf.trim();
            if let Some(sampling) = &self.sampling {
                let label = match (self.format, &self.csv) {
                    (DataFormat::Criteo, _) => self.buf.split('\t').next().map(Cow::Borrowed),
                    (DataFormat::Csv, Some((_, Some(layout)))) => layout.first_label(&self.buf),
                    _ => text.split_ascii_whitespace().next().map(Cow::Borrowed),
                };
                if sampling.drops_negative(label.as_deref().unwrap_or_default(), self.current) {
                    continue;
                }
            }
            let parsed = match self.format {
                DataFormat::Libsvm => parse_libsvm_line(text, &self.labels, &mut batch),
                DataFormat::Libffm => {
                    parse_libffm_line(text, self.fields, &self.labels, &mut batch)
                }
                DataFormat::Criteo => parse_criteo_line(&self.buf, self.numeric, &mut batch),
                DataFormat::Csv => match &self.csv {
                    Some((_, Some(layout))) => {
                        layout.parse(&self.buf, self.numeric, &self.labels, &mut batch)
                    }
                    _ => Err("no header read".into()),
                },
                DataFormat::Pixels => match &self.pixels {
                    Some(pixels) => pixels.parse_line(text, &mut batch),
                    None => Err(NO_IMAGE.into()),
                },
            };
            if parsed.is_ok()
                && let Some(sampling) = &self.sampling
                && sampling.drops_example(&batch, self.current)
            {
                batch.truncate(batch.len() - 1);
            }
            if let Err(message) = parsed {
                let error = DataError::Parse {
                    source_name: self.source_name.clone(),
                    line: self.current,
                    message,
                };
                let Some(skip) = &mut self.skipped else {
                    return Err(error);
                };
                skip.bad += 1;
                let n = skip.counter.fetch_add(1, Ordering::Relaxed) + 1;
                if n <= 10 || n.is_power_of_two() {
                    tracing::warn!(skipped = n, "skipping malformed line: {error}");
                }
                self.check_bad_share(false)?;
            }
        }
        if let Some(augment) = &mut self.augment {
            augment.apply(&mut batch);
        }
        Ok((!batch.is_empty()).then_some(batch))
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

mod ahead;
mod batch;
mod csv;
mod idx;
mod image;
mod parse;
mod select;
mod source;
#[cfg(test)]
mod tests;

pub use ahead::Ahead;
pub use batch::Batch;
pub use csv::CsvLayout;
pub use image::{Augment, Pixels};
pub use parse::{LabelFormat, Numeric};
use parse::{parse_criteo_line, parse_libffm_line, parse_libsvm_line};
use select::{Sampling, Shuffle};
pub use source::{check_readable, open};
