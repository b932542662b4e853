//! Generated data with planted structure, for tests, examples and
//! benchmarks: its oracle is known, so quality can be asserted.

use std::io::Write;

use ps_common::init::RowRng;

/// Two tasks over one planted structure: each of 10 fields x 60 ids has a
/// 4-d vector, an example's representation is the sum over its fields,
/// task `a`'s logit a strong projection of it and task `b`'s a weak one.
/// Writes `label_a,label_b field:id:1 ...` lines to `both` and, if given,
/// `label_b`-only lines to `b_only`.
pub fn write_shared_tasks(
    both: &mut impl Write,
    mut b_only: Option<&mut dyn Write>,
    rows: usize,
    seed: u64,
) -> std::io::Result<()> {
    const FIELDS: u64 = 10;
    const VOCAB: u64 = 60;
    let vector = |id: u64| {
        let mut rng = RowRng::new(5, id);
        [0; 4].map(|_| rng.next_normal() as f32)
    };
    let (pa, pb) = ([1.0f32, -0.8, 0.6, 0.4], [0.5f32, -0.4, 0.3, 0.2]);
    let mut rng = RowRng::new(seed, 0);
    for _ in 0..rows {
        let ids: Vec<u64> = (0..FIELDS)
            .map(|f| f * VOCAB + rng.next_u64() % VOCAB)
            .collect();
        let mut r = [0f32; 4];
        for &id in &ids {
            for (d, v) in vector(id).iter().enumerate() {
                r[d] += v * 0.35;
            }
        }
        let logit = |p: &[f32; 4]| (0..4).map(|d| p[d] * r[d]).sum::<f32>();
        let mut draw = |z: f32| u8::from(rng.next_f64() < f64::from(1.0 / (1.0 + (-z).exp())));
        let (a, b) = (draw(logit(&pa)), draw(logit(&pb)));
        let features: String = ids
            .iter()
            .enumerate()
            .map(|(f, id)| format!(" {f}:{id}:1"))
            .collect();
        writeln!(both, "{a},{b}{features}")?;
        if let Some(out) = b_only.as_deref_mut() {
            writeln!(out, "{b}{features}")?;
        }
    }
    Ok(())
}
