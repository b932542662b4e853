//! Which training lines a worker reads, and in what order: the seeded
//! coins of `data.negative_sampling` and `data.sample_by_feature`, and the
//! shuffle buffer of `data.shuffle_buffer`.

use ps_common::routing::mix64;

use super::Batch;

/// Which training lines are kept: `data.negative_sampling` and
/// `data.sample_by_feature`, each decision a coin seeded by the line's
/// number, so a run (and a resumed epoch) keeps the same lines.
#[derive(Debug, Clone)]
pub(super) struct Sampling {
    pub(super) negative_rate: Option<f64>,
    /// (field, id, rate) of each rule.
    pub(super) rules: Vec<(u32, u64, f64)>,
    pub(super) seed: u64,
}

impl Sampling {
    /// A uniform draw in [0, 1) for `line` and decision `salt`.
    fn coin(&self, salt: u64, line: usize) -> f64 {
        let bits = mix64(self.seed ^ mix64(line as u64 ^ salt.wrapping_mul(0x9E37_79B9_7F4A_7C15)));
        (bits >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Whether a line labelled by `label` (its first token) is dropped as
    /// a sampled-out negative; a label that does not parse is left to the
    /// parser to report.
    pub(super) fn drops_negative(&self, label: &str, line: usize) -> bool {
        match (self.negative_rate, label.parse::<f32>()) {
            (Some(rate), Ok(v)) if v.is_finite() && v <= 0.0 => self.coin(0, line) >= rate,
            _ => false,
        }
    }

    /// Whether the last example of `batch` is dropped by a feature rule.
    pub(super) fn drops_example(&self, batch: &Batch, line: usize) -> bool {
        let Some(example) = batch.len().checked_sub(1) else {
            return false;
        };
        let (start, end) = (batch.offsets[example], batch.offsets[example + 1]);
        self.rules
            .iter()
            .enumerate()
            .any(|(r, &(field, id, rate))| {
                let holds = (start..end).any(|i| {
                    batch.ids[i] == id && batch.fields.get(i).copied().unwrap_or(0) == field
                });
                holds && self.coin(1 + r as u64, line) >= rate
            })
    }
}

/// A shuffle buffer of lines (`data.shuffle_buffer`).
pub(super) struct Shuffle {
    pub(super) capacity: usize,
    /// (1-based line number, text).
    pub(super) lines: Vec<(usize, String)>,
    pub(super) rng: ps_common::init::RowRng,
}
