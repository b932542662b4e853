//! [`SparsePlan`]: a batch's sparse occurrences laid out for gather and
//! scatter, and [`RowGroups`]: the same occurrences grouped by distinct
//! row, for a backend that scatters a row at a time (CUDA).

use std::sync::OnceLock;

/// The feature occurrences of a batch, laid out for pooling and for a
/// deterministic gradient scatter.
///
/// Occurrences are sorted (stably) by segment `example * fields + field`.
/// `segment_offsets[s]..segment_offsets[s + 1]` are the occurrences of segment
/// `s`; example `b`'s are `segment_offsets[b * fields]..segment_offsets[(b + 1) * fields]`.
/// [`SparsePlan::by_row`] groups them by distinct row.
#[derive(Debug, Clone, PartialEq)]
pub struct SparsePlan {
    /// Examples in the batch.
    pub examples: usize,
    /// Fields per example (1 when the data has none).
    pub fields: usize,
    /// Distinct rows the occurrences index.
    pub unique: usize,
    /// Distinct-row index of each occurrence.
    pub entry_row: Vec<u32>,
    /// Feature value of each occurrence.
    pub entry_value: Vec<f32>,
    /// Segment (`example * fields + field`) of each occurrence.
    pub entry_segment: Vec<u32>,
    /// `examples * fields + 1` offsets into the occurrences.
    pub segment_offsets: Vec<u32>,
    /// Built on first use: the CPU backend walks the occurrences in order
    /// and never needs it.
    by_row: OnceLock<RowGroups>,
}

/// A plan's occurrences grouped by distinct row, in ascending order within
/// a row: for each distinct row `u`, the occurrences that read it are
/// `row_entries[row_offsets[u]..row_offsets[u + 1]]`.
#[derive(Debug, Clone, PartialEq)]
pub struct RowGroups {
    /// `unique + 1` offsets into `row_entries`.
    pub row_offsets: Vec<u32>,
    /// Occurrence ids grouped by distinct row.
    pub row_entries: Vec<u32>,
    /// Each distinct row's occurrences split into chunks of at most
    /// [`SparsePlan::CHUNK`], so a parallel scatter can sum a hot row's
    /// thousands of occurrences in pieces (in a fixed order):
    /// chunk `c` covers `row_entries[chunk_offsets[c]..chunk_offsets[c + 1]]`.
    pub chunk_offsets: Vec<u32>,
    /// `unique + 1` offsets into the chunks: row `u` has chunks
    /// `row_chunks[u]..row_chunks[u + 1]`.
    pub row_chunks: Vec<u32>,
    /// The distinct row of each chunk.
    pub chunk_row: Vec<u32>,
    /// Rows without exactly one chunk: only these need the second pass
    /// that sums their chunks (a row with one chunk is written directly, a
    /// row with none gets zeros).
    pub multi_chunk_rows: Vec<u32>,
    /// `entry_segment` in the order of `row_entries` (saves the GPU scatter
    /// one dependent load per occurrence).
    pub row_entry_segment: Vec<u32>,
    /// `entry_value` in the order of `row_entries`.
    pub row_entry_value: Vec<f32>,
}

impl SparsePlan {
    /// Builds the plan of a CSR batch.
    ///
    /// `offsets` (length `examples + 1`) delimit each example's occurrences in
    /// `rows` (distinct-row index, each `< unique`), `values` and `fields`
    /// (each `< num_fields`; `None` puts every occurrence in field 0).
    pub fn new(
        offsets: &[usize],
        rows: &[u32],
        values: &[f32],
        fields: Option<&[u32]>,
        num_fields: usize,
        unique: usize,
    ) -> SparsePlan {
        let examples = offsets.len().saturating_sub(1);
        let num_fields = num_fields.max(1);
        let segments = examples * num_fields;
        // Counting sort of occurrences by segment (stable).
        let segment_of = |i: usize, b: usize| -> usize {
            let f = fields.map_or(0, |f| f[i] as usize).min(num_fields - 1);
            b * num_fields + f
        };
        let mut counts = vec![0u32; segments + 1];
        for b in 0..examples {
            for i in offsets[b]..offsets[b + 1] {
                counts[segment_of(i, b) + 1] += 1;
            }
        }
        for s in 0..segments {
            counts[s + 1] += counts[s];
        }
        let segment_offsets = counts.clone();
        let n = offsets.last().copied().unwrap_or(0);
        let mut entry_row = vec![0u32; n];
        let mut entry_value = vec![0f32; n];
        let mut entry_segment = vec![0u32; n];
        let mut next = counts;
        for b in 0..examples {
            for i in offsets[b]..offsets[b + 1] {
                let s = segment_of(i, b);
                let at = next[s] as usize;
                next[s] += 1;
                entry_row[at] = rows[i];
                entry_value[at] = values[i];
                entry_segment[at] = s as u32;
            }
        }
        SparsePlan {
            examples,
            fields: num_fields,
            unique,
            entry_row,
            entry_value,
            entry_segment,
            segment_offsets,
            by_row: OnceLock::new(),
        }
    }

    /// The occurrences grouped by distinct row, built on the first call.
    /// Whoever lays out a batch for a backend that needs them (the
    /// prefetcher, for a CUDA worker) calls it ahead, off the step's path.
    pub fn by_row(&self) -> &RowGroups {
        self.by_row.get_or_init(|| RowGroups::new(self))
    }

    /// Whether [`SparsePlan::by_row`] has been built.
    pub fn is_grouped_by_row(&self) -> bool {
        self.by_row.get().is_some()
    }

    /// Most occurrences one scatter chunk sums.
    pub const CHUNK: u32 = 32;

    /// Number of occurrences.
    pub fn entries(&self) -> usize {
        self.entry_row.len()
    }

    /// Output rows of a gather with this pooling.
    pub fn pooled_rows(&self, pooling: super::Pooling) -> usize {
        match pooling {
            super::Pooling::Example => self.examples,
            super::Pooling::Field => self.examples * self.fields,
        }
    }

    /// Segments per pooled output row (`fields` for per-example pooling).
    pub fn stride(&self, pooling: super::Pooling) -> usize {
        match pooling {
            super::Pooling::Example => self.fields,
            super::Pooling::Field => 1,
        }
    }
}

impl RowGroups {
    /// Groups `plan`'s occurrences by distinct row (a counting sort, so
    /// each row's occurrences stay in ascending order) and cuts each row's
    /// into chunks.
    fn new(plan: &SparsePlan) -> RowGroups {
        let (unique, n) = (plan.unique, plan.entries());
        let mut row_offsets = vec![0u32; unique + 1];
        for &r in &plan.entry_row {
            row_offsets[r as usize + 1] += 1;
        }
        for u in 0..unique {
            row_offsets[u + 1] += row_offsets[u];
        }
        let mut fill = row_offsets.clone();
        let mut row_entries = vec![0u32; n];
        for (e, &r) in plan.entry_row.iter().enumerate() {
            row_entries[fill[r as usize] as usize] = e as u32;
            fill[r as usize] += 1;
        }
        let mut chunk_offsets = vec![0u32];
        let mut row_chunks = vec![0u32];
        let mut chunk_row = Vec::new();
        let mut multi_chunk_rows = Vec::new();
        for u in 0..unique {
            let (begin, end) = (row_offsets[u], row_offsets[u + 1]);
            let mut at = begin;
            while at < end {
                at = (at + SparsePlan::CHUNK).min(end);
                chunk_offsets.push(at);
                chunk_row.push(u as u32);
            }
            row_chunks.push((chunk_offsets.len() - 1) as u32);
            if row_chunks[u + 1] - row_chunks[u] != 1 {
                multi_chunk_rows.push(u as u32);
            }
        }
        let row_entry_segment = row_entries
            .iter()
            .map(|&e| plan.entry_segment[e as usize])
            .collect();
        let row_entry_value = row_entries
            .iter()
            .map(|&e| plan.entry_value[e as usize])
            .collect();
        RowGroups {
            row_offsets,
            row_entries,
            chunk_offsets,
            row_chunks,
            chunk_row,
            multi_chunk_rows,
            row_entry_segment,
            row_entry_value,
        }
    }

    /// Number of scatter chunks.
    pub fn chunks(&self) -> usize {
        self.chunk_offsets.len() - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn occurrences_are_sorted_by_example_then_field_and_indexed_by_row() {
        // Example 0: rows 2 (field 1), 0 (field 0); example 1: row 2 (field 0).
        let plan = SparsePlan::new(
            &[0, 2, 3],
            &[2, 0, 2],
            &[1.0, 2.0, 3.0],
            Some(&[1, 0, 0]),
            2,
            3,
        );
        assert_eq!(plan.entry_row, [0, 2, 2]);
        assert_eq!(plan.entry_value, [2.0, 1.0, 3.0]);
        assert_eq!(plan.entry_segment, [0, 1, 2]);
        assert_eq!(plan.segment_offsets, [0, 1, 2, 3, 3]);
        assert_eq!(plan.by_row().row_offsets, [0, 1, 1, 3]);
        assert_eq!(plan.by_row().row_entries, [0, 1, 2]);
        assert_eq!(plan.by_row().chunk_offsets, [0, 1, 3]);
        assert_eq!(plan.by_row().row_chunks, [0, 1, 1, 2]);
        assert_eq!(plan.by_row().chunk_row, [0, 2]);
        assert_eq!(
            plan.by_row().multi_chunk_rows,
            [1],
            "row 1 has no occurrence"
        );
        assert_eq!(plan.by_row().row_entry_segment, [0, 1, 2]);
        assert_eq!(plan.by_row().row_entry_value, [2.0, 1.0, 3.0]);
    }

    #[test]
    fn a_hot_row_is_split_into_chunks() {
        let n = SparsePlan::CHUNK as usize * 2 + 5;
        let offsets: Vec<usize> = (0..=n).collect();
        let plan = SparsePlan::new(&offsets, &vec![0; n], &vec![1.0; n], None, 1, 1);
        assert_eq!(plan.by_row().row_chunks, [0, 3]);
        assert_eq!(plan.by_row().chunk_offsets, [0, 32, 64, n as u32]);
        assert_eq!(plan.by_row().chunk_row, [0, 0, 0]);
        assert_eq!(plan.by_row().multi_chunk_rows, [0]);
    }

    #[test]
    fn an_empty_batch_has_an_empty_plan() {
        let plan = SparsePlan::new(&[0], &[], &[], None, 3, 0);
        assert_eq!(plan.examples, 0);
        assert_eq!(plan.segment_offsets, [0]);
        assert_eq!(plan.by_row().row_offsets, [0]);
        assert_eq!(plan.by_row().chunks(), 0);
    }
}
