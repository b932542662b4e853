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
    let space = FieldVectors::<4> {
        vocab: 60,
        seed: 5,
        scale: 0.35,
    };
    let (pa, pb) = ([1.0f32, -0.8, 0.6, 0.4], [0.5f32, -0.4, 0.3, 0.2]);
    let mut rng = RowRng::new(seed, 0);
    for _ in 0..rows {
        let (ids, r) = space.draw(&mut rng);
        let mut draw = |z: f32| u8::from(rng.next_f64() < f64::from(1.0 / (1.0 + (-z).exp())));
        let (a, b) = (draw(dot(&pa, &r)), draw(dot(&pb, &r)));
        let features = libffm_features(&ids);
        writeln!(both, "{a},{b}{features}")?;
        if let Some(out) = b_only.as_deref_mut() {
            writeln!(out, "{b}{features}")?;
        }
    }
    Ok(())
}

/// Three tasks in a funnel, as a purchase follows a click: each of 10
/// fields x 80 ids has an 8-d vector, an example's representation `r` is
/// the sum over its fields, and with the scores `s_k = p_k . r` of four
/// fixed directions:
/// - `click` has the logit `3 i`, with the interest `i = tanh(2 s_1)
///   tanh(2 s_2)`: an interaction that takes hidden layers to compute;
/// - `stay` has the logit `0.7 s_4 + 0.8 |s_1|`;
/// - `buy` needs a click: after one it happens with probability
///   `sigmoid(2 i + s_4 - 5)`, so about 3% of examples are purchases.
///
/// `buy` has few positives, and what predicts it is what the other two
/// tasks learn from many: a model whose `buy` tower can read the `click`
/// and `stay` towers' work need not learn it again. Writes
/// `click,buy,stay field:id:1 ...` lines and returns each task's true
/// probabilities and labels, task-major (for the oracle AUC).
pub fn write_related_tasks(
    out: &mut impl Write,
    rows: usize,
    seed: u64,
) -> std::io::Result<[(Vec<f32>, Vec<f32>); 3]> {
    let space = FieldVectors::<8> {
        vocab: 80,
        seed: 9,
        scale: 0.3,
    };
    let p = [1, 2, 3, 4].map(|k| direction(10, k, 1.6));
    let sigmoid = |z: f32| 1.0 / (1.0 + (-z).exp());
    let mut rng = RowRng::new(seed, 0);
    let mut truth: [(Vec<f32>, Vec<f32>); 3] = Default::default();
    for _ in 0..rows {
        let (ids, r) = space.draw(&mut rng);
        let s = p.map(|pk| dot(&pk, &r));
        let interest = (2.0 * s[0]).tanh() * (2.0 * s[1]).tanh();
        let click = sigmoid(3.0 * interest);
        let buy_after_click = sigmoid(2.0 * interest + s[3] - 5.0);
        let stay = sigmoid(0.7 * s[3] + 0.8 * s[0].abs());
        let mut draw = |prob: f32| rng.next_f64() < f64::from(prob);
        let clicked = draw(click);
        let labels = [clicked, clicked && draw(buy_after_click), draw(stay)].map(u8::from);
        for (k, prob) in [click, click * buy_after_click, stay]
            .into_iter()
            .enumerate()
        {
            truth[k].0.push(prob);
            truth[k].1.push(f32::from(labels[k]));
        }
        let features = libffm_features(&ids);
        writeln!(out, "{},{},{}{features}", labels[0], labels[1], labels[2])?;
    }
    Ok(truth)
}

/// Classes of [`write_classes`].
pub const PLANTED_CLASSES: usize = 5;

/// A multi-class problem no linear model solves: each of 10 fields x 100
/// ids has an 8-d vector, an example's representation `r` is the sum over
/// its fields, and class `k`'s logit is `|a_k . r|`, the size of `r`'s
/// projection on a planted direction: its sign says nothing, so a model
/// linear in the features learns little. Writes `class field:id:1 ...`
/// lines and returns the true class probabilities (example-major, 5 per
/// example) and the drawn labels, for the oracle's top-1 accuracy.
pub fn write_classes(
    out: &mut impl Write,
    rows: usize,
    seed: u64,
) -> std::io::Result<(Vec<f32>, Vec<f32>)> {
    let space = FieldVectors::<8> {
        vocab: 100,
        seed: 21,
        scale: 0.35,
    };
    let directions: Vec<[f32; 8]> = (0..PLANTED_CLASSES as u64)
        .map(|k| direction(22, k, 4.0))
        .collect();
    let mut rng = RowRng::new(seed, 0);
    let (mut probs, mut labels) = (Vec::new(), Vec::new());
    for _ in 0..rows {
        let (ids, r) = space.draw(&mut rng);
        let z: Vec<f32> = directions.iter().map(|a| dot(a, &r).abs()).collect();
        let top = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f32> = z.iter().map(|v| (v - top).exp()).collect();
        let total: f32 = e.iter().sum();
        let draw = rng.next_f64() as f32 * total;
        let mut class = PLANTED_CLASSES - 1;
        let mut acc = 0.0;
        for (k, v) in e.iter().enumerate() {
            acc += v;
            if draw < acc {
                class = k;
                break;
            }
        }
        probs.extend(e.iter().map(|v| v / total));
        labels.push(class as f32);
        writeln!(out, "{class}{}", libffm_features(&ids))?;
    }
    Ok((probs, labels))
}

/// Examples of 10 categorical fields of `vocab` ids each (field `f`'s ids
/// are `f * vocab ..`), each id a fixed random vector of N(0, scale^2)
/// values: an example's representation is the sum of its ids' vectors.
struct FieldVectors<const DIM: usize> {
    vocab: u64,
    /// Seeds the vectors.
    seed: u64,
    scale: f32,
}

impl<const DIM: usize> FieldVectors<DIM> {
    const FIELDS: u64 = 10;

    /// Draws an example: an id per field, and its representation.
    fn draw(&self, rng: &mut RowRng) -> (Vec<u64>, [f32; DIM]) {
        let ids: Vec<u64> = (0..Self::FIELDS)
            .map(|f| f * self.vocab + rng.next_u64() % self.vocab)
            .collect();
        let mut r = [0f32; DIM];
        for &id in &ids {
            let mut vector = RowRng::new(self.seed, id);
            for x in &mut r {
                *x += vector.next_normal() as f32 * self.scale;
            }
        }
        (ids, r)
    }
}

/// A fixed random direction `k` of the given length, drawn from `seed`.
fn direction<const DIM: usize>(seed: u64, k: u64, length: f32) -> [f32; DIM] {
    let mut rng = RowRng::new(seed, k);
    let v = [0; DIM].map(|_| rng.next_normal() as f32);
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.map(|x| x / norm * length)
}

fn dot<const DIM: usize>(a: &[f32; DIM], b: &[f32; DIM]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// An example's libffm features: ` f:id:1` for the id of each field `f`.
fn libffm_features(ids: &[u64]) -> String {
    ids.iter()
        .enumerate()
        .map(|(f, id)| format!(" {f}:{id}:1"))
        .collect()
}
