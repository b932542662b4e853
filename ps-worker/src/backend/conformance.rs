//! Backend conformance: run every op of two backends on the same random
//! inputs and report how far apart their results are.
//!
//! The CUDA parity tests and `benches/gpu.sh` call [`compare`] with the CPU
//! backend as the reference. Inputs are drawn from a seeded generator and
//! include the edge cases kernels get wrong: an empty batch, a single row,
//! many duplicate keys, and sizes that are not a multiple of the block size.

use std::sync::Arc;

use ps_common::routing::mix64;

use super::{
    Activation, Backend, BackendError, BatchNormMode, Dropout, PoolKind, Pooling, SparsePlan,
    Window,
};

/// One op's result on both backends.
#[derive(Debug, Clone, PartialEq)]
pub struct Agreement {
    /// `op/case`, e.g. `gather_pool/duplicates`.
    pub name: String,
    /// `max |a - b| / max(max |b|, 1e-6)` over the op's outputs.
    pub relative_error: f32,
}

/// A seeded stream of uniform floats and integers.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix64(self.0)
    }

    /// Uniform in `[-1, 1)`.
    pub fn signed(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / 16_777_216.0) * 2.0 - 1.0
    }

    /// Uniform in `0..n` (`n >= 1`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    /// `n` values uniform in `[-1, 1)`.
    pub fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.signed()).collect()
    }
}

/// A random batch layout: `examples` examples with up to `per_example`
/// occurrences each over `unique` distinct rows and `fields` fields.
pub fn random_plan(
    rng: &mut Rng,
    examples: usize,
    per_example: usize,
    unique: usize,
    fields: usize,
) -> SparsePlan {
    let mut offsets = vec![0usize];
    let (mut rows, mut values, mut field_ids) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..examples {
        let count = if unique == 0 {
            0
        } else {
            1 + rng.below(per_example.max(1))
        };
        for _ in 0..count {
            rows.push(rng.below(unique) as u32);
            values.push(rng.signed());
            field_ids.push(rng.below(fields) as u32);
        }
        offsets.push(rows.len());
    }
    SparsePlan::new(&offsets, &rows, &values, Some(&field_ids), fields, unique)
}

/// The cases every op is checked on: (name, examples, occurrences per
/// example, distinct rows, fields, embedding dim).
pub const CASES: &[(&str, usize, usize, usize, usize, usize)] = &[
    ("empty", 0, 0, 0, 3, 8),
    ("single", 1, 1, 1, 1, 1),
    ("duplicates", 37, 9, 3, 4, 16),
    ("odd_sizes", 257, 13, 1001, 5, 13),
    ("wide", 130, 40, 5000, 26, 33),
];

fn relative(a: &[f32], b: &[f32]) -> f32 {
    if a.len() != b.len() {
        return f32::INFINITY;
    }
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| {
        if x.is_nan() || y.is_nan() {
            f32::INFINITY
        } else {
            m.max((x - y).abs())
        }
    });
    diff / scale
}

/// Runs every op of `test` and `reference` on the same inputs.
pub fn compare<T: Backend, R: Backend>(
    test: &T,
    reference: &R,
    seed: u64,
) -> Result<Vec<Agreement>, BackendError> {
    let mut out = Vec::new();
    let mut rng = Rng::new(seed);
    for &(case, examples, per, unique, fields, dim) in CASES {
        let plan = Arc::new(random_plan(&mut rng, examples, per, unique, fields));
        let rows = rng.vec(unique * dim);
        let mut record = |op: &str, a: Vec<f32>, b: Vec<f32>| {
            out.push(Agreement {
                name: format!("{op}/{case}"),
                relative_error: relative(&a, &b),
            });
        };
        // Sparse ops.
        let (tp, rp) = (test.upload_plan(&plan)?, reference.upload_plan(&plan)?);
        let (tr, rr) = (
            test.upload(&rows, unique, dim)?,
            reference.upload(&rows, unique, dim)?,
        );
        for (label, pooling) in [("example", Pooling::Example), ("field", Pooling::Field)] {
            let pooled = plan.pooled_rows(pooling);
            let g = rng.vec(pooled * dim);
            record(
                &format!("gather_pool_{label}"),
                test.download(&test.gather_pool(&tr, &tp, pooling)?)?,
                reference.download(&reference.gather_pool(&rr, &rp, pooling)?)?,
            );
            record(
                &format!("scatter_pool_{label}"),
                test.download(&test.scatter_pool(&test.upload(&g, pooled, dim)?, &tp, pooling)?)?,
                reference.download(&reference.scatter_pool(
                    &reference.upload(&g, pooled, dim)?,
                    &rp,
                    pooling,
                )?)?,
            );
        }
        let (tf, ts) = test.fm_forward(&tr, &tp)?;
        let (rf, rs) = reference.fm_forward(&rr, &rp)?;
        record("fm_forward", test.download(&tf)?, reference.download(&rf)?);
        let (tpairs, _) = test.fm_pairs(&tr, &tp)?;
        let (rpairs, _) = reference.fm_pairs(&rr, &rp)?;
        record(
            "fm_pairs",
            test.download(&tpairs)?,
            reference.download(&rpairs)?,
        );
        let g = rng.vec(examples * dim);
        record(
            "fm_backward_per_dim",
            test.download(&test.fm_backward(&test.upload(&g, examples, dim)?, &ts, &tr, &tp)?)?,
            reference.download(&reference.fm_backward(
                &reference.upload(&g, examples, dim)?,
                &rs,
                &rr,
                &rp,
            )?)?,
        );
        let g = rng.vec(examples);
        record(
            "fm_backward",
            test.download(&test.fm_backward(&test.upload(&g, examples, 1)?, &ts, &tr, &tp)?)?,
            reference.download(&reference.fm_backward(
                &reference.upload(&g, examples, 1)?,
                &rs,
                &rr,
                &rp,
            )?)?,
        );

        // Dense ops on [examples, width] activations.
        let width = fields * dim;
        let x = rng.vec(examples * width);
        let w = rng.vec(width * 17);
        let (tx, rx) = (
            test.upload(&x, examples, width)?,
            reference.upload(&x, examples, width)?,
        );
        let (tw, rw) = (
            test.upload(&w, width, 17)?,
            reference.upload(&w, width, 17)?,
        );
        record(
            "matmul",
            test.download(&test.matmul(&tx, &tw, false, false)?)?,
            reference.download(&reference.matmul(&rx, &rw, false, false)?)?,
        );
        record(
            "matmul_ta",
            test.download(&test.matmul(&tx, &tx, true, false)?)?,
            reference.download(&reference.matmul(&rx, &rx, true, false)?)?,
        );
        record(
            "matmul_tb",
            test.download(&test.matmul(&tw, &tw, false, true)?)?,
            reference.download(&reference.matmul(&rw, &rw, false, true)?)?,
        );
        record(
            "add",
            test.download(&test.add(&tx, &tx)?)?,
            reference.download(&reference.add(&rx, &rx)?)?,
        );
        record(
            "scale",
            test.download(&test.scale(&tx, -0.7)?)?,
            reference.download(&reference.scale(&rx, -0.7)?)?,
        );
        // Mixture of experts: 3 experts of [examples, 17] outputs, gates [examples, 3].
        let gate_logits = rng.vec(examples * 3);
        let (tgl, rgl) = (
            test.upload(&gate_logits, examples, 3)?,
            reference.upload(&gate_logits, examples, 3)?,
        );
        let (tgs, rgs) = (test.softmax_rows(&tgl)?, reference.softmax_rows(&rgl)?);
        record(
            "softmax_rows",
            test.download(&tgs)?,
            reference.download(&rgs)?,
        );
        let dgate = rng.vec(examples * 3);
        record(
            "softmax_rows_backward",
            test.download(&test.softmax_rows_backward(&test.upload(&dgate, examples, 3)?, &tgs)?)?,
            reference.download(
                &reference.softmax_rows_backward(&reference.upload(&dgate, examples, 3)?, &rgs)?,
            )?,
        );
        let expert_out: Vec<Vec<f32>> = (0..3).map(|_| rng.vec(examples * 17)).collect();
        let texp: Vec<_> = expert_out
            .iter()
            .map(|e| test.upload(e, examples, 17))
            .collect::<Result<_, _>>()?;
        let rexp: Vec<_> = expert_out
            .iter()
            .map(|e| reference.upload(e, examples, 17))
            .collect::<Result<_, _>>()?;
        let tst = test.stack_rows(&texp.iter().collect::<Vec<_>>())?;
        let rst = reference.stack_rows(&rexp.iter().collect::<Vec<_>>())?;
        record(
            "stack_rows",
            test.download(&tst)?,
            reference.download(&rst)?,
        );
        record(
            "slice_rows",
            test.download(&test.slice_rows(&tst, examples, examples)?)?,
            reference.download(&reference.slice_rows(&rst, examples, examples)?)?,
        );
        record(
            "mix",
            test.download(&test.mix(&tst, &tgs)?)?,
            reference.download(&reference.mix(&rst, &rgs)?)?,
        );
        let dmix = rng.vec(examples * 17);
        let (tds, tdg) = test.mix_backward(&test.upload(&dmix, examples, 17)?, &tst, &tgs)?;
        let (rds, rdg) =
            reference.mix_backward(&reference.upload(&dmix, examples, 17)?, &rst, &rgs)?;
        record(
            "mix_backward_experts",
            test.download(&tds)?,
            reference.download(&rds)?,
        );
        record(
            "mix_backward_gates",
            test.download(&tdg)?,
            reference.download(&rdg)?,
        );
        record(
            "copy",
            test.download(&test.copy(&tx)?)?,
            reference.download(&reference.copy(&rx)?)?,
        );
        let bias = rng.vec(width);
        let (tb, rb) = (
            test.upload(&bias, 1, width)?,
            reference.upload(&bias, 1, width)?,
        );
        let g = rng.vec(examples * width);
        let (tg, rg) = (
            test.upload(&g, examples, width)?,
            reference.upload(&g, examples, width)?,
        );
        for (label, act, dropout) in [
            ("identity", Activation::Identity, None),
            ("relu", Activation::Relu, None),
            (
                "relu_dropout",
                Activation::Relu,
                Some(Dropout {
                    rate: 0.3,
                    seed: rng.next_u64(),
                }),
            ),
        ] {
            let ty = test.bias_act(&tx, &tb, act, dropout)?;
            let ry = reference.bias_act(&rx, &rb, act, dropout)?;
            record(
                &format!("bias_act_{label}"),
                test.download(&ty)?,
                reference.download(&ry)?,
            );
            let (tdx, tdb) = test.bias_act_backward(&tg, &ty, act, dropout)?;
            let (rdx, rdb) = reference.bias_act_backward(&rg, &ry, act, dropout)?;
            record(
                &format!("bias_act_backward_{label}"),
                test.download(&tdx)?,
                reference.download(&rdx)?,
            );
            record(
                &format!("bias_grad_{label}"),
                test.download(&tdb)?,
                reference.download(&rdb)?,
            );
        }
        let mut params = rng.vec(4 * width);
        params[3 * width..]
            .iter_mut()
            .for_each(|v| *v = v.abs() + 0.5);
        let (tpar, rpar) = (
            test.upload(&params, 4, width)?,
            reference.upload(&params, 4, width)?,
        );
        for (label, mode) in [
            ("batch", BatchNormMode::Batch),
            ("running", BatchNormMode::Running),
        ] {
            let (ty, tstats, tsaved) = test.batch_norm(&tx, &tpar, mode, 1e-5)?;
            let (ry, rstats, rsaved) = reference.batch_norm(&rx, &rpar, mode, 1e-5)?;
            record(
                &format!("batch_norm_{label}"),
                test.download(&ty)?,
                reference.download(&ry)?,
            );
            record(
                &format!("batch_norm_stats_{label}"),
                test.download(&tstats)?,
                reference.download(&rstats)?,
            );
            if mode == BatchNormMode::Batch {
                let (tdx, tdp) = test.batch_norm_backward(&tg, &tpar, &tsaved)?;
                let (rdx, rdp) = reference.batch_norm_backward(&rg, &rpar, &rsaved)?;
                record(
                    "batch_norm_backward",
                    test.download(&tdx)?,
                    reference.download(&rdx)?,
                );
                record(
                    "batch_norm_param_grad",
                    test.download(&tdp)?,
                    reference.download(&rdp)?,
                );
            }
        }
        let logits: Vec<f32> = rng.vec(examples).iter().map(|v| v * 20.0).collect();
        let labels: Vec<f32> = (0..examples).map(|_| (rng.below(2)) as f32).collect();
        let (tz, rz) = (
            test.upload(&logits, examples, 1)?,
            reference.upload(&logits, examples, 1)?,
        );
        let (ty, ry) = (
            test.upload(&labels, examples, 1)?,
            reference.upload(&labels, examples, 1)?,
        );
        let (tl, tgrad) = test.bce_with_logits(&tz, &ty)?;
        let (rl, rgrad) = reference.bce_with_logits(&rz, &ry)?;
        record("bce_loss", vec![tl as f32], vec![rl as f32]);
        record(
            "bce_grad",
            test.download(&tgrad)?,
            reference.download(&rgrad)?,
        );
        record(
            "sigmoid",
            test.download(&test.sigmoid(&tz)?)?,
            reference.download(&reference.sigmoid(&rz)?)?,
        );
    }
    compare_image_ops(test, reference, &mut rng, &mut out)?;
    compare_attention(test, reference, &mut rng, &mut out)?;
    Ok(out)
}

/// Attention cases: `name, sequences, positions, heads, head width`.
const ATTENTION_CASES: &[(&str, usize, usize, usize, usize)] = &[
    ("tasks", 37, 3, 2, 4),
    ("one_token", 5, 1, 1, 3),
    ("many_heads", 9, 6, 4, 5),
    ("empty", 0, 2, 2, 2),
];

/// Attention forward and backward on both backends.
fn compare_attention<T: Backend, R: Backend>(
    test: &T,
    reference: &R,
    rng: &mut Rng,
    out: &mut Vec<Agreement>,
) -> Result<(), BackendError> {
    for &(case, n, positions, heads, d) in ATTENTION_CASES {
        let (rows, width) = (n * positions, heads * d);
        let inputs: Vec<Vec<f32>> = (0..4).map(|_| rng.vec(rows * width)).collect();
        let t: Vec<T::Tensor> = inputs
            .iter()
            .map(|x| test.upload(x, rows, width))
            .collect::<Result<_, _>>()?;
        let r: Vec<R::Tensor> = inputs
            .iter()
            .map(|x| reference.upload(x, rows, width))
            .collect::<Result<_, _>>()?;
        let (to, tw) = test.attention(&t[0], &t[1], &t[2], positions, heads)?;
        let (ro, rw) = reference.attention(&r[0], &r[1], &r[2], positions, heads)?;
        let (tdq, tdk, tdv) =
            test.attention_backward(&t[3], &t[0], &t[1], &t[2], &tw, positions, heads)?;
        let (rdq, rdk, rdv) =
            reference.attention_backward(&r[3], &r[0], &r[1], &r[2], &rw, positions, heads)?;
        for (op, a, b) in [
            ("attention", &to, &ro),
            ("attention_weights", &tw, &rw),
            ("attention_dq", &tdq, &rdq),
            ("attention_dk", &tdk, &rdk),
            ("attention_dv", &tdv, &rdv),
        ] {
            out.push(Agreement {
                name: format!("{op}/{case}"),
                relative_error: relative(&test.download(a)?, &reference.download(b)?),
            });
        }
    }
    Ok(())
}

/// Image cases: `name, [images, height, width, channels], kernel, stride,
/// padding`; a kernel of 0 is the whole image (global pooling).
const IMAGE_CASES: &[(&str, [usize; 4], usize, usize, usize)] = &[
    ("3x3_same", [3, 5, 6, 3], 3, 1, 1),
    ("3x3_stride2", [2, 7, 7, 2], 3, 2, 1),
    ("2x2_stride2", [2, 8, 8, 5], 2, 2, 0),
    ("1x1", [4, 3, 3, 7], 1, 1, 0),
    ("global", [5, 4, 4, 6], 0, 1, 0),
    ("one_image", [1, 1, 1, 1], 1, 1, 0),
];

/// The image ops (convolution through im2col, col2im, pooling, column
/// concatenation, softmax cross-entropy) on both backends.
fn compare_image_ops<T: Backend, R: Backend>(
    test: &T,
    reference: &R,
    rng: &mut Rng,
    out: &mut Vec<Agreement>,
) -> Result<(), BackendError> {
    let mut record = |op: &str, case: &str, a: Vec<f32>, b: Vec<f32>| {
        out.push(Agreement {
            name: format!("{op}/{case}"),
            relative_error: relative(&a, &b),
        });
    };
    for &(case, shape, kernel, stride, padding) in IMAGE_CASES {
        let mut win = Window::square(shape, kernel, stride, padding);
        if kernel == 0 {
            win.kernel = [shape[1], shape[2]];
        }
        let c_out = 1 + rng.below(6);
        let x = rng.vec(win.in_rows() * win.channels);
        let w = rng.vec(win.patch() * c_out);
        let dy = rng.vec(win.out_rows() * c_out);
        let (tx, rx) = (
            test.upload(&x, win.in_rows(), win.channels)?,
            reference.upload(&x, win.in_rows(), win.channels)?,
        );
        let (tw, rw) = (
            test.upload(&w, win.patch(), c_out)?,
            reference.upload(&w, win.patch(), c_out)?,
        );
        let (tdy, rdy) = (
            test.upload(&dy, win.out_rows(), c_out)?,
            reference.upload(&dy, win.out_rows(), c_out)?,
        );
        let (ty, tcols) = test.conv2d(&tx, &tw, &win)?;
        let (ry, rcols) = reference.conv2d(&rx, &rw, &win)?;
        record(
            "conv2d",
            case,
            test.download(&ty)?,
            reference.download(&ry)?,
        );
        let (tdx, tdw) = test.conv2d_backward(&tdy, &tcols, &tw, &win)?;
        let (rdx, rdw) = reference.conv2d_backward(&rdy, &rcols, &rw, &win)?;
        record(
            "conv2d_dx",
            case,
            test.download(&tdx)?,
            reference.download(&rdx)?,
        );
        record(
            "conv2d_dw",
            case,
            test.download(&tdw)?,
            reference.download(&rdw)?,
        );
        record(
            "im2col",
            case,
            test.download(&test.im2col(&tx, &win)?)?,
            reference.download(&reference.im2col(&rx, &win)?)?,
        );
        let cols = rng.vec(win.out_rows() * win.patch());
        record(
            "col2im",
            case,
            test.download(&test.col2im(&test.upload(&cols, win.out_rows(), win.patch())?, &win)?)?,
            reference.download(
                &reference.col2im(&reference.upload(&cols, win.out_rows(), win.patch())?, &win)?,
            )?,
        );
        let g = rng.vec(win.out_rows() * win.channels);
        let (tg, rg) = (
            test.upload(&g, win.out_rows(), win.channels)?,
            reference.upload(&g, win.out_rows(), win.channels)?,
        );
        for (label, kind) in [("max", PoolKind::Max), ("avg", PoolKind::Average)] {
            record(
                &format!("pool2d_{label}"),
                case,
                test.download(&test.pool2d(&tx, &win, kind)?)?,
                reference.download(&reference.pool2d(&rx, &win, kind)?)?,
            );
            record(
                &format!("pool2d_{label}_backward"),
                case,
                test.download(&test.pool2d_backward(&tg, &tx, &win, kind)?)?,
                reference.download(&reference.pool2d_backward(&rg, &rx, &win, kind)?)?,
            );
        }
        let (tj, rj) = (
            test.concat_cols(&[&tx, &tdx, &tx])?,
            reference.concat_cols(&[&rx, &rdx, &rx])?,
        );
        record(
            "concat_cols",
            case,
            test.download(&tj)?,
            reference.download(&rj)?,
        );
        record(
            "slice_cols",
            case,
            test.download(&test.slice_cols(&tj, win.channels, win.channels)?)?,
            reference.download(&reference.slice_cols(&rj, win.channels, win.channels)?)?,
        );
        let (n, k) = (win.out_rows(), c_out);
        let labels: Vec<f32> = (0..n).map(|_| rng.below(k) as f32).collect();
        let logits: Vec<f32> = rng.vec(n * k).iter().map(|v| v * 8.0).collect();
        let (tl, tgrad) =
            test.softmax_cross_entropy(&test.upload(&logits, n, k)?, &test.upload(&labels, n, 1)?)?;
        let (rl, rgrad) = reference.softmax_cross_entropy(
            &reference.upload(&logits, n, k)?,
            &reference.upload(&labels, n, 1)?,
        )?;
        record("softmax_xent_loss", case, vec![tl as f32], vec![rl as f32]);
        record(
            "softmax_xent_grad",
            case,
            test.download(&tgrad)?,
            reference.download(&rgrad)?,
        );
    }
    Ok(())
}

/// How far a backward pass may be from a central finite difference of a
/// loss computed in `f32`: 1% of the larger of the two (the difference's
/// truncation error, O(h^2)), plus the rounding noise of the two losses
/// `lp`, `lm` divided by `2h` (a few `f32` ulps of each). A sign or scale
/// error in a small gradient is far outside it, where an absolute floor of
/// 0.02 let one of 0.1 or less through.
pub fn gradient_tolerance(numeric: f64, analytic: f64, lp: f64, lm: f64, h: f32) -> f64 {
    let noise = 16.0 * f64::from(f32::EPSILON) * (lp.abs() + lm.abs()) / (2.0 * f64::from(h));
    1e-2 * numeric.abs().max(analytic.abs()) + noise + 1e-7
}
