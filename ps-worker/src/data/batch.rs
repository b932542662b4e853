//! [`Batch`]: examples in compressed-sparse-row form, as the readers
//! build them and the models read them.

/// A batch of examples in compressed-sparse-row form.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Batch {
    /// Labels, example-major: 0 or 1 per task, or a multi-class example's
    /// class index.
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
    /// Numeric columns fed straight to the MLP (`data.numeric.dense`), the
    /// same number per example, example-major; empty without.
    pub dense: Vec<f32>,
}

impl Batch {
    /// A batch with no example.
    pub fn new() -> Self {
        Batch {
            offsets: vec![0],
            ..Batch::default()
        }
    }

    /// Appends one example given as feature ids with their values and
    /// (empty, or one per id) fields, labelled 0 for each of `tasks`.
    /// The caller checked the lengths.
    pub fn push_features(&mut self, ids: &[u64], values: &[f32], fields: &[u32], tasks: usize) {
        self.extend_features(ids, values, fields);
        self.labels.extend(std::iter::repeat_n(0.0, tasks.max(1)));
        self.offsets.push(self.ids.len());
    }

    /// Appends every example of `other`, labels included.
    pub fn append(&mut self, other: &Batch) {
        let base = self.ids.len();
        self.extend_features(&other.ids, &other.values, &other.fields);
        self.labels.extend_from_slice(&other.labels);
        self.dense.extend_from_slice(&other.dense);
        self.offsets
            .extend(other.offsets.iter().skip(1).map(|&at| base + at));
    }

    /// Appends features (`fields` empty, or one per id), keeping `fields`
    /// either empty or parallel to `ids` (a feature without one is in
    /// field 0).
    fn extend_features(&mut self, ids: &[u64], values: &[f32], fields: &[u32]) {
        if !fields.is_empty() && self.fields.len() < self.ids.len() {
            self.fields.resize(self.ids.len(), 0);
        }
        self.ids.extend_from_slice(ids);
        self.values.extend_from_slice(values);
        if !fields.is_empty() {
            self.fields.extend_from_slice(fields);
        } else if !self.fields.is_empty() {
            self.fields.resize(self.ids.len(), 0);
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

    /// Keeps the first `examples` examples.
    pub fn truncate(&mut self, examples: usize) {
        if examples >= self.len() {
            return;
        }
        let tasks = self.labels.len() / self.len().max(1);
        let dense = self.dense.len() / self.len().max(1);
        let features = self.offsets[examples];
        self.labels.truncate(examples * tasks);
        self.dense.truncate(examples * dense);
        self.offsets.truncate(examples + 1);
        self.ids.truncate(features);
        self.values.truncate(features);
        self.fields.truncate(features.min(self.fields.len()));
    }

    /// Appends one example of `(field, id, value)` features, its dense
    /// MLP inputs and its labels (a parser's last step, once the whole
    /// line is known to be good).
    pub(super) fn push_fielded_example(
        &mut self,
        features: &[(usize, u64, f32)],
        dense: &[f32],
        labels: &[f32],
    ) {
        for &(field, id, value) in features {
            self.fields.push(field as u32);
            self.ids.push(id);
            self.values.push(value);
        }
        self.dense.extend_from_slice(dense);
        self.push_example(labels);
    }

    pub(super) fn push_example(&mut self, labels: &[f32]) {
        self.labels.extend_from_slice(labels);
        self.offsets.push(self.ids.len());
    }
}
