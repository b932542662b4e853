//! The ctr26 benchmark workload, exactly as `shared/bench/ctr26.md` defines
//! it: 26 fields of one id each over a 1M-row table, ids log-uniform within
//! each field's range, labels drawn from a planted logit.

use std::io::Write;

use ps_common::init::RowRng;
use ps_worker::data::Batch;

/// Rows of the embedding table.
pub const ROWS: u64 = 1_000_000;
/// Categorical fields per sample.
pub const FIELDS: u64 = 26;
/// Ids per field: `floor(ROWS / FIELDS)`.
pub const PER_FIELD: u64 = ROWS / FIELDS;

/// `h(id)` of the planted logit.
pub fn h(id: u64) -> f64 {
    (id.wrapping_mul(2_654_435_761) % 1000) as f64 / 1000.0 - 0.5
}

/// A deterministic stream of ctr26 samples.
#[derive(Debug, Clone)]
pub struct Generator {
    rng: RowRng,
}

impl Generator {
    /// The stream for `seed`.
    pub fn new(seed: u64) -> Generator {
        Generator {
            rng: RowRng::new(seed, 0x0c72_6000),
        }
    }

    /// One sample: the 26 ids and the label.
    pub fn sample(&mut self) -> ([u64; FIELDS as usize], f32) {
        let mut ids = [0u64; FIELDS as usize];
        let mut logit = 0f64;
        for (f, id) in ids.iter_mut().enumerate() {
            let u = self.rng.next_f64();
            let local = (((PER_FIELD + 1) as f64).powf(u) - 1.0).floor() as u64;
            *id = f as u64 * PER_FIELD + local.min(PER_FIELD - 1);
            logit += h(*id);
        }
        let p = 1.0 / (1.0 + (-2.0 * logit).exp());
        let label = if self.rng.next_f64() < p { 1.0 } else { 0.0 };
        (ids, label)
    }

    /// A batch of `n` samples (field `f` holds the `f`-th id).
    pub fn batch(&mut self, n: usize) -> Batch {
        let mut batch = Batch {
            offsets: vec![0],
            ..Batch::default()
        };
        for _ in 0..n {
            let (ids, label) = self.sample();
            for (f, id) in ids.into_iter().enumerate() {
                batch.ids.push(id);
                batch.values.push(1.0);
                batch.fields.push(f as u32);
            }
            batch.labels.push(label);
            batch.offsets.push(batch.ids.len());
        }
        batch
    }

    /// Writes `n` samples as libffm lines (`label field:id:1 ...`).
    pub fn write_libffm(&mut self, n: usize, out: &mut impl Write) -> std::io::Result<()> {
        for _ in 0..n {
            let (ids, label) = self.sample();
            write!(out, "{}", label as u8)?;
            for (f, id) in ids.iter().enumerate() {
                write!(out, " {f}:{id}:1")?;
            }
            writeln!(out)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_stay_in_their_field_and_favour_the_field_s_first_ids() {
        let mut g = Generator::new(1);
        let b = g.batch(2000);
        for (i, &id) in b.ids.iter().enumerate() {
            let f = b.fields[i] as u64;
            assert!((f * PER_FIELD..(f + 1) * PER_FIELD).contains(&id));
        }
        let hot = b.ids.iter().filter(|&&id| id % PER_FIELD < 10).count();
        assert!(
            hot > b.ids.len() / 5,
            "log-uniform: {hot} of {} in the first 10",
            b.ids.len()
        );
    }

    #[test]
    fn labels_follow_the_planted_logit() {
        let mut g = Generator::new(2);
        let (mut agree, n) = (0, 20_000);
        for _ in 0..n {
            let (ids, label) = g.sample();
            let logit: f64 = ids.iter().map(|&id| h(id)).sum();
            if (logit > 0.0) == (label > 0.5) {
                agree += 1;
            }
        }
        assert!(agree as f64 / n as f64 > 0.6, "{agree} of {n}");
    }

    #[test]
    fn libffm_output_parses_back() {
        let mut out = Vec::new();
        Generator::new(3).write_libffm(2, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let line = text.lines().next().unwrap();
        assert_eq!(line.split(' ').count(), 27);
        assert!(line.split(' ').nth(1).unwrap().starts_with("0:"));
    }
}
