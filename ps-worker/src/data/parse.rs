//! The line parsers of libsvm, libffm and Criteo TSV, and what a numeric
//! column's number becomes ([`Numeric`]): each parser appends one example
//! to a [`Batch`] or, on a malformed line, leaves it exactly as it was and
//! says what was wrong.

pub(super) use ps_common::config::{CRITEO_CATEGORIES, CRITEO_INTEGERS};
use ps_common::config::{DataConfig, IntegerFeatures, ModelConfig, Normalize};
use ps_common::routing::{fnv1a64, mix64};

use super::Batch;

/// Parses `label idx:val idx:val ...` and appends it to `batch`; on error the
/// batch is left unchanged.
pub(super) fn parse_libsvm_line(
    text: &str,
    labels: &LabelFormat,
    batch: &mut Batch,
) -> Result<(), String> {
    let mut fields = text.split_ascii_whitespace();
    let labels = labels.parse(fields.next().unwrap_or_default())?;
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

/// What a line's label token holds: one label per task, each 0/1 or, for
/// a multi-class task (or model), a class index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelFormat {
    /// Classes of each task's label, one entry per label of an example
    /// (at least one); 1 for binary.
    classes: Vec<usize>,
}

impl LabelFormat {
    /// One binary label per task.
    pub fn binary(tasks: usize) -> LabelFormat {
        LabelFormat {
            classes: vec![1; tasks.max(1)],
        }
    }

    /// One class index below `classes`.
    pub fn multiclass(classes: usize) -> LabelFormat {
        LabelFormat {
            classes: vec![classes.max(1)],
        }
    }

    /// Labels per example (tasks of a multi-task model, else 1).
    pub fn tasks(&self) -> usize {
        self.classes.len()
    }

    /// The labels of `model`'s data.
    pub fn of(model: &ModelConfig) -> LabelFormat {
        let mut classes: Vec<usize> = model
            .task_classes()
            .into_iter()
            .map(|c| c.max(1) as usize)
            .collect();
        if classes.is_empty() {
            classes.push(1);
        }
        LabelFormat { classes }
    }

    /// A label token that parses (all zeros), for lines served without one.
    pub(super) fn placeholder(&self) -> String {
        vec!["0"; self.tasks()].join(",")
    }

    /// Parses a label token: `tasks` comma-separated labels, each read
    /// by [`LabelFormat::parse_one`] for its task.
    pub(super) fn parse(&self, token: &str) -> Result<Vec<f32>, String> {
        let labels = token
            .split(',')
            .enumerate()
            .map(|(t, label)| self.parse_one(t, label))
            .collect::<Result<Vec<f32>, String>>()?;
        if labels.len() != self.tasks() {
            return Err(format!(
                "{} label(s) in {token:?}, the model has {} task(s)",
                labels.len(),
                self.tasks()
            ));
        }
        Ok(labels)
    }

    /// Task `task`'s label: a class index of a multi-class task, else
    /// binary ([`parse_label`]). Past the last task: binary (the caller
    /// then finds too many labels).
    pub(super) fn parse_one(&self, task: usize, text: &str) -> Result<f32, String> {
        match self.classes.get(task) {
            Some(&classes) if classes > 1 => parse_class(text, classes),
            _ => parse_label(text),
        }
    }
}

/// A class index below `classes`.
pub(super) fn parse_class(text: &str, classes: usize) -> Result<f32, String> {
    match text.parse::<u32>() {
        Ok(c) if (c as usize) < classes => Ok(c as f32),
        _ => Err(format!(
            "label {text:?} is not a class index in 0..{classes}"
        )),
    }
}

/// One label: a positive number (> 0) is 1, any other number 0 (libsvm's
/// -1/+1 and 0/1 alike).
pub(super) fn parse_label(text: &str) -> Result<f32, String> {
    match text.parse::<f32>() {
        Ok(v) if v.is_finite() => Ok(if v > 0.0 { 1.0 } else { 0.0 }),
        Ok(_) => Err(format!("label {text:?} is not finite")),
        Err(_) => Err(format!("label {text:?} is not a number")),
    }
}

/// Parses `label field:id:value ...` and appends it to `batch`; on error the
/// batch is left unchanged.
pub(super) fn parse_libffm_line(
    text: &str,
    fields: u32,
    labels: &LabelFormat,
    batch: &mut Batch,
) -> Result<(), String> {
    let mut tokens = text.split_ascii_whitespace();
    let labels = labels.parse(tokens.next().unwrap_or_default())?;
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

/// An integer column's value: an integer, or a float with no fractional
/// part (`260.0`, as some exports write integer columns).
pub(super) fn parse_integer(text: &str) -> Option<i64> {
    text.parse::<i64>().ok().or_else(|| {
        let v = text.parse::<f64>().ok()?;
        // i64's range is [-2^63, 2^63): both bounds are exact in f64.
        (v.fract() == 0.0 && (-9.223_372_036_854_776e18..9.223_372_036_854_776e18).contains(&v))
            .then_some(v as i64)
    })
}

/// How a numeric column's number becomes a feature: `data.integers`,
/// then, for values, `data.numeric`'s clipping and normalisation; or,
/// with `dense`, an input of the MLP.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Numeric {
    /// Bucket ids, or one id per column with a value.
    pub mode: IntegerFeatures,
    /// Values outside `[low, high]` are set to the nearer bound.
    pub clip: Option<[f32; 2]>,
    /// Clipped values are mapped onto [0, 1].
    pub min_max: bool,
    /// Values go to [`Batch::dense`] (missing: 0), not to the features.
    pub dense: bool,
}

impl Numeric {
    /// As `data` says.
    pub fn of(data: &DataConfig) -> Numeric {
        Numeric {
            mode: data.integers,
            clip: data.numeric.clip,
            min_max: data.numeric.normalize == Normalize::MinMax,
            dense: data.numeric.dense,
        }
    }

    /// The feature `(id, value)` of the finite number `v` in `field`; an
    /// error when a value is past f32's range.
    pub(super) fn feature(&self, field: usize, v: f64) -> Result<(u64, f32), String> {
        if self.mode == IntegerFeatures::Bucketize {
            let bucket = if v <= 2.0 {
                v.floor() as i64
            } else {
                v.ln().powi(2) as i64
            };
            return Ok((hashed_id(field, &bucket.to_le_bytes()), 1.0));
        }
        let tag: &[u8] = match self.mode {
            IntegerFeatures::Log => b"log",
            _ => b"value",
        };
        Ok((hashed_id(field, tag), self.value(v)?))
    }

    /// Takes the finite number `v` of numeric column `field`: into
    /// `dense[field]` (with `dense`), or as a feature `(field, id, value)`.
    pub(super) fn take(
        &self,
        field: usize,
        v: f64,
        features: &mut Vec<(usize, u64, f32)>,
        dense: &mut [f32],
    ) -> Result<(), String> {
        if self.dense {
            dense[field] = self.value(v)?;
        } else {
            let (id, value) = self.feature(field, v)?;
            features.push((field, id, value));
        }
        Ok(())
    }

    /// The MLP inputs an example of `columns` numeric columns holds: all
    /// of them with `dense`, else none.
    pub(super) fn dense_inputs(&self, columns: usize) -> usize {
        if self.dense { columns } else { 0 }
    }

    /// The value of the finite number `v`: `ln(1 + max(v, 0))` under
    /// `log`, then clipped and normalised.
    pub(super) fn value(&self, v: f64) -> Result<f32, String> {
        let v = match self.mode {
            IntegerFeatures::Log => v.max(0.0).ln_1p(),
            IntegerFeatures::Value | IntegerFeatures::Bucketize => v,
        };
        let mut value = v as f32;
        if !value.is_finite() {
            return Err("past a 32-bit float's range".into());
        }
        if let Some([low, high]) = self.clip {
            value = value.clamp(low, high);
            if self.min_max {
                value = (value - low) / (high - low);
            }
        }
        Ok(value)
    }
}

impl From<IntegerFeatures> for Numeric {
    fn from(mode: IntegerFeatures) -> Numeric {
        Numeric {
            mode,
            ..Numeric::default()
        }
    }
}

/// The id of `token` in field `field`: both hashed into 64 bits.
pub(super) fn hashed_id(field: usize, token: &[u8]) -> u64 {
    mix64(fnv1a64(token) ^ (field as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// Parses a Criteo TSV line (`label`, 13 integers, 26 hex categories, tab
/// separated, empty fields allowed) and appends it to `batch`; on error the
/// batch is left unchanged. Fields 0-12 are the integer columns, 13-38 the
/// categorical ones; an empty categorical value is its field's "missing" id,
/// an empty integer is left out.
pub(super) fn parse_criteo_line(
    line: &str,
    numeric: Numeric,
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
    let mut dense = [0f32; CRITEO_INTEGERS];
    for (i, text) in columns[1..=CRITEO_INTEGERS].iter().enumerate() {
        if text.is_empty() {
            continue;
        }
        let v = parse_integer(text)
            .ok_or_else(|| format!("integer column I{} = {text:?} is not an integer", i + 1))?;
        numeric
            .take(i, v as f64, &mut features, &mut dense)
            .map_err(|e| format!("integer column I{} = {text:?}: {e}", i + 1))?;
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
    batch.push_fielded_example(
        &features,
        &dense[..numeric.dense_inputs(CRITEO_INTEGERS)],
        &[label],
    );
    Ok(())
}
