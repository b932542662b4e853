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

/// Three tasks whose labels depend on one another's latent scores, as a
/// purchase depends on the click before it: each of 10 fields x 80 ids
/// has an 8-d vector, an example's representation `r` is the sum over its
/// fields, and with the scores `s_k = p_k . r` of three fixed directions,
/// task `click`'s logit is `s_1`, task `buy`'s `1.5 tanh(s_1) s_2 - 0.5`
/// (the buy direction only matters with a click score) and task `stay`'s
/// `0.7 s_3 + 0.8 |s_1|`. Writes `click,buy,stay field:id:1 ...` lines and
/// returns each task's true probabilities and labels, task-major (for
/// the oracle AUC).
pub fn write_related_tasks(
    out: &mut impl Write,
    rows: usize,
    seed: u64,
) -> std::io::Result<[(Vec<f32>, Vec<f32>); 3]> {
    const FIELDS: u64 = 10;
    const VOCAB: u64 = 80;
    const DIM: usize = 8;
    let vector = |id: u64| {
        let mut rng = RowRng::new(9, id);
        [0; DIM].map(|_| rng.next_normal() as f32 * 0.3)
    };
    let direction = |k: u64| {
        let mut rng = RowRng::new(10, k);
        let v = [0; DIM].map(|_| rng.next_normal() as f32);
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.map(|x| x / norm * 1.6)
    };
    let p = [direction(1), direction(2), direction(3)];
    let mut rng = RowRng::new(seed, 0);
    let mut truth: [(Vec<f32>, Vec<f32>); 3] = Default::default();
    for _ in 0..rows {
        let ids: Vec<u64> = (0..FIELDS)
            .map(|f| f * VOCAB + rng.next_u64() % VOCAB)
            .collect();
        let mut r = [0f32; DIM];
        for &id in &ids {
            for (d, v) in vector(id).iter().enumerate() {
                r[d] += v;
            }
        }
        let s = p.map(|pk| (0..DIM).map(|d| pk[d] * r[d]).sum::<f32>());
        let logits = [
            s[0],
            1.5 * s[0].tanh() * s[1] - 0.5,
            0.7 * s[2] + 0.8 * s[0].abs(),
        ];
        let mut labels = [0u8; 3];
        for (k, z) in logits.iter().enumerate() {
            let prob = 1.0 / (1.0 + (-z).exp());
            labels[k] = u8::from(rng.next_f64() < f64::from(prob));
            truth[k].0.push(prob);
            truth[k].1.push(f32::from(labels[k]));
        }
        let features: String = ids
            .iter()
            .enumerate()
            .map(|(f, id)| format!(" {f}:{id}:1"))
            .collect();
        writeln!(out, "{},{},{}{features}", labels[0], labels[1], labels[2])?;
    }
    Ok(truth)
}
