//! A batch request's keys as the segments see them: grouped by segment
//! ([`Batch`], one lock per segment touched), and what a batch write
//! carries into each segment ([`Written`]: keys, hashes, the rows a pull
//! found them in, what came back from disk).

use std::sync::RwLock;

use ps_common::routing::mix64;

use super::hints::NO_ROW;
use super::segment::Segment;
use super::tiers::Loaded;
use super::{SEGMENT_SHIFT, SEGMENTS};

/// The keys a batch write updates, their hashes, for each the row a pull
/// found it in if one did (a hint, to be checked), and what was already
/// brought back from disk for them.
pub(super) struct Written<'a> {
    pub(super) keys: &'a [u64],
    pub(super) hashes: &'a [u64],
    pub(super) hints: Option<&'a [u32]>,
    pub(super) loaded: Loaded,
}

impl Written<'_> {
    /// The hinted row of `keys[i]`, if any.
    #[inline]
    pub(super) fn hint(&self, i: usize) -> Option<usize> {
        let row = *self.hints?.get(i)?;
        (row != NO_ROW).then_some(row as usize)
    }
}

/// A request's keys grouped by segment: their hashes, and their positions
/// ordered by segment (a stable counting sort).
pub(super) struct Batch {
    pub(super) hashes: Vec<u64>,
    order: Vec<usize>,
    starts: [usize; SEGMENTS + 1],
}

impl Batch {
    pub(super) fn of(keys: &[u64]) -> Batch {
        let hashes: Vec<u64> = keys.iter().map(|&k| mix64(k)).collect();
        let mut starts = [0usize; SEGMENTS + 1];
        for &h in &hashes {
            starts[(h >> SEGMENT_SHIFT) as usize + 1] += 1;
        }
        for s in 1..=SEGMENTS {
            starts[s] += starts[s - 1];
        }
        let mut next = starts;
        let mut order = vec![0; keys.len()];
        for (i, &h) in hashes.iter().enumerate() {
            let s = (h >> SEGMENT_SHIFT) as usize;
            order[next[s]] = i;
            next[s] += 1;
        }
        Batch {
            hashes,
            order,
            starts,
        }
    }

    /// Each segment the request touches, with the positions of its keys.
    pub(super) fn runs<'a>(
        &'a self,
        segments: &'a [RwLock<Segment>],
    ) -> impl Iterator<Item = (&'a RwLock<Segment>, &'a [usize])> {
        segments
            .iter()
            .zip(self.starts.windows(2))
            .filter(|(_, w)| w[0] < w[1])
            .map(|(lock, w)| (lock, &self.order[w[0]..w[1]]))
    }
}

#[cfg(test)]
mod tests {
    use super::super::SparseRows;
    use super::*;

    #[test]
    fn runs_visit_each_touched_segment_once_with_its_keys_in_request_order() {
        let keys: Vec<u64> = (0..5_000u64).map(|i| i * 7_919 % 1_201).collect();
        let batch = Batch::of(&keys);
        let segments = &SparseRows::new(1, false, None).segments;
        let mut seen = vec![false; keys.len()];
        let mut last_segment = None;
        for (lock, run) in batch.runs(segments) {
            let s = segments
                .iter()
                .position(|l| std::ptr::eq(l, lock))
                .expect("a segment of the table");
            assert!(last_segment < Some(s), "segments in order, each once");
            last_segment = Some(s);
            assert!(!run.is_empty(), "only segments the request touches");
            assert!(run.is_sorted(), "request order within a segment");
            for &i in run {
                assert_eq!(batch.hashes[i], mix64(keys[i]));
                assert_eq!((batch.hashes[i] >> SEGMENT_SHIFT) as usize, s);
                assert!(!std::mem::replace(&mut seen[i], true), "each key once");
            }
        }
        assert!(seen.iter().all(|&s| s), "every key in some run");
    }

    #[test]
    fn an_empty_request_touches_no_segment() {
        let table = SparseRows::new(1, false, None);
        assert_eq!(Batch::of(&[]).runs(&table.segments).count(), 0);
    }
}
