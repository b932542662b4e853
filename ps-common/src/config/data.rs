//! `[data]`: the input files, their format and how lines become
//! examples (CSV columns, numeric features, bad lines, shuffling,
//! sampling), and the checks of those keys.

use std::path::PathBuf;

use serde::Deserialize;

/// Input files.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// File format of `train` and `validation`.
    #[serde(default)]
    pub format: DataFormat,
    /// Training examples: a path (relative to the job file) or `builtin:NAME`.
    pub train: DataSource,
    /// Held-out examples evaluated after training.
    #[serde(default)]
    pub validation: Option<DataSource>,
    /// Fields per example for the models' per-field pooling. libsvm has no
    /// fields: every feature is in field 0 and the deep models see the sum of
    /// an example's embeddings.
    #[serde(default = "default_fields")]
    pub fields: u32,
    /// What a malformed line does: `fail` (stop with its file and line) or
    /// `skip` (log it with its line number, count it, go on).
    #[serde(default)]
    pub on_bad_line: OnBadLine,
    /// How numeric columns (Criteo's 13 integer columns, CSV's `numeric`
    /// ones) become features.
    #[serde(default)]
    pub integers: IntegerFeatures,
    /// Clipping and normalisation of numeric columns fed as values
    /// (`integers = "log"` or `"value"`).
    #[serde(default)]
    pub numeric: NumericConfig,
    /// CSV only: the columns' roles, by the header's names.
    #[serde(default)]
    pub csv: Option<CsvConfig>,
    /// Pixels only: the images' shape and scale.
    #[serde(default)]
    pub image: Option<ImageConfig>,
    /// Pixels only: random changes to each training image, drawn from
    /// `train.seed`, the epoch and the worker (validation is never
    /// augmented).
    #[serde(default)]
    pub augment: Option<AugmentConfig>,
    /// With `on_bad_line = "skip"`: the share of a worker's lines that may
    /// be malformed. Past it (checked from the 1,000th line on, and at the
    /// end of the file) reading fails: a file of wrong format does not
    /// train on nothing.
    #[serde(default = "default_max_bad_line_fraction")]
    pub max_bad_line_fraction: f64,
    /// Training lines a worker shuffles among: each line read goes into a
    /// buffer of this many and a random one comes out (as TensorFlow's
    /// `shuffle(buffer_size)`), seeded by `train.seed`, the epoch and the
    /// rank, so each epoch has its own order and a resumed epoch the same
    /// one. 0 (the default): file order. Validation is never shuffled.
    #[serde(default)]
    pub shuffle_buffer: usize,
    /// Negative down-sampling of training lines: each negative line is
    /// kept with this probability, every positive one is (single-task
    /// models). Predictions are corrected back to the true base rate,
    /// `p / (p + (1 - p) / rate)`, in validation, evaluation, serving and
    /// the report's logloss. Decided per line before it is parsed, seeded
    /// by `train.seed` and the epoch (each epoch keeps other negatives).
    #[serde(default)]
    pub negative_sampling: Option<f64>,
    /// Sampling by a feature: training lines holding the feature are kept
    /// with probability `rate` (e.g. a fraction of one country's rows).
    #[serde(default)]
    pub sample_by_feature: Vec<FeatureSampling>,
}

/// One rule of `data.sample_by_feature`: lines whose field `field` holds
/// `id` (libsvm, libffm; libsvm features are all in field 0) or `value`
/// (Criteo: a categorical column, fields 13-38, and its hexadecimal text;
/// CSV: a categorical column's field and its text) are kept with
/// probability `rate`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureSampling {
    /// The field (libffm's field, Criteo's column: 0-12 integers, 13-38
    /// categories).
    #[serde(default)]
    pub field: u32,
    /// The feature id (libsvm, libffm).
    #[serde(default)]
    pub id: Option<u64>,
    /// The column's text (Criteo and CSV categories).
    #[serde(default)]
    pub value: Option<String>,
    /// Share of the matching lines kept, in (0, 1].
    pub rate: f64,
}

/// The largest `data.shuffle_buffer`: lines held in memory at once.
pub const MAX_SHUFFLE_BUFFER: usize = 10_000_000;

fn default_max_bad_line_fraction() -> f64 {
    0.01
}

/// How numeric columns become features.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IntegerFeatures {
    /// One id per (column, bucket), buckets `floor(v)` for `v <= 2` and
    /// `floor(ln(v)^2)` above, value 1.
    #[default]
    Bucketize,
    /// One id per column with value `ln(1 + v)` (negative values as 0): a
    /// dense input scaling that column's weight and embedding.
    Log,
    /// One id per column with the number itself as its value.
    Value,
}

/// What happens to a numeric column's value (`integers = "log"` or
/// `"value"`) before it scales the column's weight and embedding.
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NumericConfig {
    /// `[low, high]`: values outside are set to the nearer bound.
    #[serde(default)]
    pub clip: Option<[f32; 2]>,
    /// `none`, or `min_max`: `(v - low) / (high - low)` into [0, 1] (needs
    /// `clip`).
    #[serde(default)]
    pub normalize: Normalize,
    /// The values go straight into the MLP's input, beside the pooled
    /// embeddings (a missing value is 0), instead of being features.
    #[serde(default)]
    pub dense: bool,
}

/// Normalisation of numeric values (see [`NumericConfig`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Normalize {
    /// The value as transformed and clipped.
    #[default]
    None,
    /// Onto [0, 1] from the clip range.
    MinMax,
}

/// The columns of a CSV file with a header line, by name. Numeric columns
/// are fields `0..numeric.len()` in their listed order, categorical ones
/// follow; other columns are ignored.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CsvConfig {
    /// The one-character separator (default `,`; `"\t"` for TSV).
    #[serde(default = "default_delimiter")]
    pub delimiter: char,
    /// The label column, or one per task (a number; > 0 is positive).
    pub label: Labels,
    /// Numbers (empty: missing), as `data.integers` says.
    #[serde(default)]
    pub numeric: Vec<String>,
    /// Values of any text hashed with their field (empty: the field's
    /// "missing" id).
    #[serde(default)]
    pub categorical: Vec<String>,
}

/// One label column name, or a list of them.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum Labels {
    /// One task.
    One(String),
    /// One column per task.
    Many(Vec<String>),
}

impl Labels {
    /// The label columns, in task order.
    pub fn names(&self) -> Vec<&str> {
        match self {
            Labels::One(name) => vec![name],
            Labels::Many(names) => names.iter().map(String::as_str).collect(),
        }
    }
}

impl CsvConfig {
    /// Fields of an example: numeric columns, then categorical ones.
    pub fn fields(&self) -> u32 {
        (self.numeric.len() + self.categorical.len()) as u32
    }
}

fn default_delimiter() -> char {
    ','
}

/// The policy for malformed input lines.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnBadLine {
    /// Stop with an error naming the file and line.
    #[default]
    Fail,
    /// Log and count the line, then go on.
    Skip,
}

fn default_fields() -> u32 {
    1
}

/// Supported input formats.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataFormat {
    /// `label idx:value idx:value ...` with labels in {-1, 0, 1} (+1 positive).
    #[default]
    Libsvm,
    /// `label field:idx:value ...`; fields must be below `data.fields`.
    Libffm,
    /// Criteo's TSV: label, 13 integer columns, 26 categorical (hex)
    /// columns, empty fields allowed; 39 fields.
    Criteo,
    /// Delimited text with a header line; the columns' roles by name in
    /// `[data.csv]`.
    Csv,
    /// Images, one per line: `label,p0,p1,...` (commas or spaces), the
    /// label a class index and then `[data.image]`'s height x width x
    /// channels pixels, row by row, channels last.
    Pixels,
}

/// The shape of `format = "pixels"` images.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageConfig {
    /// Rows of pixels.
    pub height: u32,
    /// Pixels per row.
    pub width: u32,
    /// Values per pixel (1 for grey, 3 for RGB).
    #[serde(default = "default_channels")]
    pub channels: u32,
    /// Every pixel value is divided by this (e.g. 255, or 16 for the
    /// digits), so that inputs are about [0, 1].
    #[serde(default = "default_scale")]
    pub scale: f32,
}

impl ImageConfig {
    /// Values per image.
    pub fn pixels(&self) -> usize {
        self.height as usize * self.width as usize * self.channels as usize
    }
}

/// The largest image: `height * width * channels` values.
pub const MAX_IMAGE_VALUES: usize = 1 << 20;

fn default_channels() -> u32 {
    1
}
fn default_scale() -> f32 {
    1.0
}

/// Data augmentation of training images, on the parsing thread.
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AugmentConfig {
    /// Each image is moved by up to this many pixels in each direction
    /// (drawn per image; uncovered pixels are 0): a random crop of the
    /// image padded by `shift`.
    #[serde(default)]
    pub shift: u32,
    /// Mirror each image left-right with probability 1/2 (not for data
    /// whose meaning changes in a mirror, such as digits).
    #[serde(default)]
    pub flip: bool,
    /// Standard deviation of Gaussian noise added to every scaled pixel.
    #[serde(default)]
    pub noise: f32,
}

/// Criteo's integer columns (fields 0-12, after the label).
pub const CRITEO_INTEGERS: usize = 13;
/// Criteo's categorical columns (fields 13-38).
pub const CRITEO_CATEGORIES: usize = 26;

/// Where a data file comes from.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(from = "String")]
pub enum DataSource {
    /// A file on disk (resolved against the job file's folder on load).
    File(PathBuf),
    /// A data set compiled into the worker binary, e.g. `builtin:a9a/train`.
    Builtin(String),
}

impl From<String> for DataSource {
    fn from(s: String) -> Self {
        match s.strip_prefix("builtin:") {
            Some(name) => DataSource::Builtin(name.to_string()),
            None => DataSource::File(PathBuf::from(s)),
        }
    }
}

impl std::fmt::Display for DataSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DataSource::File(p) => write!(f, "{}", p.display()),
            DataSource::Builtin(name) => write!(f, "builtin:{name}"),
        }
    }
}

impl DataConfig {
    /// The numeric columns an example feeds straight to the MLP
    /// (`data.numeric.dense`): Criteo's 13, a CSV's `numeric`; 0 without.
    pub fn dense_inputs(&self) -> u32 {
        match (self.numeric.dense, self.format, &self.csv) {
            (false, _, _) => 0,
            (true, DataFormat::Csv, Some(csv)) => csv.numeric.len() as u32,
            (true, _, _) => CRITEO_INTEGERS as u32,
        }
    }

    /// The fields of categorical columns, where the format has them.
    fn categorical_fields(&self) -> Option<std::ops::Range<u32>> {
        match (self.format, &self.csv) {
            (DataFormat::Criteo, _) => {
                Some(CRITEO_INTEGERS as u32..(CRITEO_INTEGERS + CRITEO_CATEGORIES) as u32)
            }
            (DataFormat::Csv, Some(csv)) => Some(csv.numeric.len() as u32..csv.fields()),
            _ => None,
        }
    }

    /// Checks `[data]` for a model of `tasks` tasks: the key at fault and
    /// what is wrong.
    pub(super) fn validate(&self, tasks: usize) -> Result<(), (String, String)> {
        let fraction = self.max_bad_line_fraction;
        if !(0.0..=1.0).contains(&fraction) {
            return Err((
                "data.max_bad_line_fraction".into(),
                "must be between 0 and 1".into(),
            ));
        }
        if let Some(rate) = self.negative_sampling {
            if !(rate > 0.0 && rate <= 1.0) {
                return Err((
                    "data.negative_sampling".into(),
                    "must be a share of negatives kept, in (0, 1]".into(),
                ));
            }
            if tasks > 1 {
                return Err((
                    "data.negative_sampling".into(),
                    "needs a single-task model (a multi-task line has no one label to call negative)"
                        .into(),
                ));
            }
        }
        for (i, rule) in self.sample_by_feature.iter().enumerate() {
            let key = format!("data.sample_by_feature[{i}]");
            if !(rule.rate > 0.0 && rule.rate <= 1.0) {
                return Err((key, "rate must be in (0, 1]".into()));
            }
            let by_text = matches!(self.format, DataFormat::Criteo | DataFormat::Csv);
            match (&rule.id, &rule.value, by_text) {
                (Some(_), None, false) | (None, Some(_), true) => {}
                _ => {
                    return Err((
                        key,
                        "give `id` (libsvm, libffm) or `value` (criteo, csv), one of them".into(),
                    ));
                }
            }
            if let Some(categorical) = self.categorical_fields()
                && !categorical.contains(&rule.field)
            {
                return Err((
                    key,
                    format!(
                        "{} samples by a categorical column: field {}-{}",
                        if self.format == DataFormat::Csv {
                            "csv"
                        } else {
                            "criteo"
                        },
                        categorical.start,
                        categorical.end.saturating_sub(1)
                    ),
                ));
            }
            if self.format == DataFormat::Libsvm && rule.field != 0 {
                return Err((key, "libsvm has no fields: use field = 0".into()));
            }
        }
        if self.shuffle_buffer > MAX_SHUFFLE_BUFFER {
            return Err((
                "data.shuffle_buffer".into(),
                format!("must be at most {MAX_SHUFFLE_BUFFER} lines"),
            ));
        }
        if self.format == DataFormat::Criteo && tasks > 1 {
            return Err((
                "data.format".into(),
                "Criteo data has one label; a multitask model needs libsvm or libffm lines with comma-separated labels".into(),
            ));
        }
        if self.format == DataFormat::Criteo
            && self.fields as usize != CRITEO_INTEGERS + CRITEO_CATEGORIES
        {
            return Err((
                "data.fields".into(),
                "Criteo data has 39 fields (13 integer + 26 categorical): set fields = 39".into(),
            ));
        }
        if self.fields == 0 {
            return Err(("data.fields".into(), "must be >= 1".into()));
        }
        self.validate_image(tasks)?;
        self.validate_csv(tasks)?;
        self.validate_numeric()
    }

    fn validate_image(&self, tasks: usize) -> Result<(), (String, String)> {
        let pixels = self.format == DataFormat::Pixels;
        let Some(image) = &self.image else {
            if pixels {
                return Err((
                    "data.image".into(),
                    "format = \"pixels\" needs [data.image]: height, width (and channels, scale)"
                        .into(),
                ));
            }
            if self.augment.is_some() {
                return Err(("data.augment".into(), "is for format = \"pixels\"".into()));
            }
            return Ok(());
        };
        if !pixels {
            return Err(("data.image".into(), "is for format = \"pixels\"".into()));
        }
        let dims = [image.height, image.width, image.channels];
        let values = dims.iter().map(|&d| d as usize).product::<usize>();
        if dims.contains(&0) || values > MAX_IMAGE_VALUES {
            return Err((
                "data.image".into(),
                format!(
                    "height, width and channels must be >= 1 with at most {MAX_IMAGE_VALUES} values per image"
                ),
            ));
        }
        if !(image.scale.is_finite() && image.scale > 0.0) {
            return Err(("data.image.scale".into(), "must be finite and > 0".into()));
        }
        if tasks > 1 || self.negative_sampling.is_some() || !self.sample_by_feature.is_empty() {
            return Err((
                "data.format".into(),
                "pixels data has one class label per image: no multitask model, negative_sampling or sample_by_feature".into(),
            ));
        }
        if let Some(augment) = &self.augment {
            if augment.shift >= image.height.min(image.width) {
                return Err((
                    "data.augment.shift".into(),
                    "must be smaller than the image's height and width".into(),
                ));
            }
            if !(augment.noise.is_finite() && augment.noise >= 0.0) {
                return Err((
                    "data.augment.noise".into(),
                    "must be finite and >= 0".into(),
                ));
            }
        }
        Ok(())
    }

    fn validate_csv(&self, tasks: usize) -> Result<(), (String, String)> {
        let Some(csv) = &self.csv else {
            if self.format == DataFormat::Csv {
                return Err((
                    "data.csv".into(),
                    "format = \"csv\" needs [data.csv]: label, and numeric and/or categorical column names".into(),
                ));
            }
            return Ok(());
        };
        if self.format != DataFormat::Csv {
            return Err(("data.csv".into(), "is for format = \"csv\"".into()));
        }
        if !csv.delimiter.is_ascii() || matches!(csv.delimiter, '"' | '\n' | '\r') {
            return Err((
                "data.csv.delimiter".into(),
                "must be one ASCII character other than a quote or a line break".into(),
            ));
        }
        let labels = csv.label.names();
        if labels.len() != tasks {
            return Err((
                "data.csv.label".into(),
                format!(
                    "{} label column(s) for a model of {tasks} task(s)",
                    labels.len()
                ),
            ));
        }
        if csv.fields() == 0 {
            return Err((
                "data.csv".into(),
                "name at least one numeric or categorical column".into(),
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        for name in labels
            .iter()
            .copied()
            .chain(csv.numeric.iter().map(String::as_str))
            .chain(csv.categorical.iter().map(String::as_str))
        {
            if !seen.insert(name) {
                return Err((
                    "data.csv".into(),
                    format!("column {name:?} has two roles (or is listed twice)"),
                ));
            }
        }
        if self.fields != csv.fields() {
            return Err((
                "data.fields".into(),
                format!(
                    "a CSV example has {} fields ({} numeric + {} categorical columns): set fields = {}",
                    csv.fields(),
                    csv.numeric.len(),
                    csv.categorical.len(),
                    csv.fields()
                ),
            ));
        }
        Ok(())
    }

    fn validate_numeric(&self) -> Result<(), (String, String)> {
        let numeric = &self.numeric;
        if *numeric == NumericConfig::default() {
            return Ok(());
        }
        if self.integers == IntegerFeatures::Bucketize {
            return Err((
                "data.numeric".into(),
                "applies to values: set data.integers = \"log\" or \"value\" (bucketized columns are ids)".into(),
            ));
        }
        if !matches!(self.format, DataFormat::Criteo | DataFormat::Csv) {
            return Err((
                "data.numeric".into(),
                "is for the numeric columns of criteo or csv data".into(),
            ));
        }
        match numeric.clip {
            Some([low, high]) if !(low.is_finite() && high.is_finite() && low < high) => Err((
                "data.numeric.clip".into(),
                format!("must be [low, high] with finite low < high, got [{low}, {high}]"),
            )),
            None if numeric.normalize == Normalize::MinMax => Err((
                "data.numeric.normalize".into(),
                "min_max maps data.numeric.clip's range onto [0, 1]: set clip".into(),
            )),
            _ => Ok(()),
        }
    }
}
