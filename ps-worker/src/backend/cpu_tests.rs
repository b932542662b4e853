//! Every CPU op's backward pass against central finite differences of
//! `L = sum(out * r)` for a random `r`.

use std::sync::Arc;

use ndarray::Array2;

use super::*;
use crate::backend::conformance;
use crate::backend::conformance::{Rng, random_plan};

const B: CpuBackend = CpuBackend;

fn arr(data: Vec<f32>, rows: usize, cols: usize) -> Array2<f32> {
    B.upload(&data, rows, cols).unwrap()
}

/// Asserts that `analytic` is the gradient of `loss` at `x`, within
/// [`crate::backend::conformance::gradient_tolerance`].
fn check(name: &str, x: &[f32], analytic: &[f32], loss: impl Fn(&[f32]) -> f64) {
    assert_eq!(x.len(), analytic.len(), "{name}: gradient length");
    let h = 1e-2f32;
    for i in 0..x.len() {
        let (mut plus, mut minus) = (x.to_vec(), x.to_vec());
        plus[i] += h;
        minus[i] -= h;
        let (lp, lm) = (loss(&plus), loss(&minus));
        let numeric = (lp - lm) / (2.0 * f64::from(h));
        let tol = conformance::gradient_tolerance(numeric, f64::from(analytic[i]), lp, lm, h);
        assert!(
            (numeric - f64::from(analytic[i])).abs() <= tol,
            "{name}[{i}]: finite difference {numeric} vs backward {} (tolerance {tol:.1e})",
            analytic[i]
        );
    }
}

fn dot(a: &Array2<f32>, r: &[f32]) -> f64 {
    a.iter()
        .zip(r)
        .map(|(&x, &y)| f64::from(x) * f64::from(y))
        .sum()
}

#[test]
fn gather_pool_backward_is_scatter_pool() {
    let mut rng = Rng::new(1);
    let plan = Arc::new(random_plan(&mut rng, 5, 4, 3, 2));
    let rows = rng.vec(3 * 4);
    for pooling in [Pooling::Example, Pooling::Field] {
        let r = rng.vec(plan.pooled_rows(pooling) * 4);
        let grad = B
            .scatter_pool(
                &arr(r.clone(), plan.pooled_rows(pooling), 4),
                &plan,
                pooling,
            )
            .unwrap();
        check("gather_pool", &rows, grad.as_slice().unwrap(), |x| {
            dot(
                &B.gather_pool(&arr(x.to_vec(), 3, 4), &plan, pooling)
                    .unwrap(),
                &r,
            )
        });
    }
}

#[test]
fn scatter_pool_sums_each_row_in_the_order_row_entries_lists() {
    // Many occurrences over few rows, so rows are read by many examples.
    let mut rng = Rng::new(7);
    let plan = Arc::new(random_plan(&mut rng, 64, 4, 5, 3));
    for pooling in [Pooling::Example, Pooling::Field] {
        let (pooled, dim) = (plan.pooled_rows(pooling), 4);
        let grad = rng.vec(pooled * dim);
        let stride = plan.stride(pooling) as u32;
        let groups = plan.by_row();
        let mut expected = vec![0f32; plan.unique * dim];
        for u in 0..plan.unique {
            let range = groups.row_offsets[u] as usize..groups.row_offsets[u + 1] as usize;
            for &e in &groups.row_entries[range] {
                let (x, o) = (
                    plan.entry_value[e as usize],
                    (plan.entry_segment[e as usize] / stride) as usize,
                );
                for d in 0..dim {
                    expected[u * dim + d] += x * grad[o * dim + d];
                }
            }
        }
        let got = B
            .scatter_pool(&arr(grad, pooled, dim), &plan, pooling)
            .unwrap();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(got.as_slice().unwrap()),
            bits(&expected),
            "{pooling:?}"
        );
    }
}

#[test]
fn download_owned_hands_over_the_values_row_major() {
    let whole = arr((0..12).map(|x| x as f32).collect(), 3, 4);
    assert_eq!(
        B.download_owned(whole.clone()).unwrap(),
        B.download(&whole).unwrap()
    );
    // Rows 1.. of the buffer: standard layout at an offset.
    let tail = whole.clone().slice_move(ndarray::s![1.., ..]);
    assert_eq!(
        B.download_owned(tail).unwrap(),
        (4..12).map(|x| x as f32).collect::<Vec<_>>()
    );
    // Columns 1..3: neither contiguous nor starting at the buffer's front.
    let middle = whole.clone().slice_move(ndarray::s![.., 1..3]);
    assert_eq!(B.download_owned(middle).unwrap(), [1., 2., 5., 6., 9., 10.]);
    let transposed = whole.reversed_axes();
    assert_eq!(
        B.download_owned(transposed).unwrap(),
        [0., 4., 8., 1., 5., 9., 2., 6., 10., 3., 7., 11.]
    );
}

#[test]
fn fm_backward_matches_finite_differences() {
    let mut rng = Rng::new(2);
    let plan = Arc::new(random_plan(&mut rng, 6, 5, 4, 3));
    let rows = rng.vec(4 * 3);
    let r = rng.vec(6);
    let (_, sums) = B.fm_forward(&arr(rows.clone(), 4, 3), &plan).unwrap();
    let grad = B
        .fm_backward(
            &arr(r.clone(), 6, 1),
            &sums,
            &arr(rows.clone(), 4, 3),
            &plan,
        )
        .unwrap();
    check("fm", &rows, grad.as_slice().unwrap(), |x| {
        dot(&B.fm_forward(&arr(x.to_vec(), 4, 3), &plan).unwrap().0, &r)
    });
}

#[test]
fn fm_backward_per_dimension_matches_finite_differences() {
    let mut rng = Rng::new(3);
    let plan = Arc::new(random_plan(&mut rng, 6, 5, 4, 3));
    let rows = rng.vec(4 * 3);
    let r = rng.vec(6 * 3);
    let (_, sums) = B.fm_pairs(&arr(rows.clone(), 4, 3), &plan).unwrap();
    let grad = B
        .fm_backward(
            &arr(r.clone(), 6, 3),
            &sums,
            &arr(rows.clone(), 4, 3),
            &plan,
        )
        .unwrap();
    check("fm_pairs", &rows, grad.as_slice().unwrap(), |x| {
        dot(&B.fm_pairs(&arr(x.to_vec(), 4, 3), &plan).unwrap().0, &r)
    });
}

#[test]
fn fm_pairs_are_the_interaction_per_dimension() {
    // Features (row 0, x = 1), (row 1, x = 2): v0_d * v1_d * 1 * 2 per d,
    // and their sum is fm_forward's interaction.
    let plan = Arc::new(SparsePlan::new(&[0, 2], &[0, 1], &[1.0, 2.0], None, 1, 2));
    let rows = arr(vec![1.0, 2.0, 3.0, -1.0], 2, 2);
    let (pairs, sums) = B.fm_pairs(&rows, &plan).unwrap();
    assert_eq!(pairs.as_slice().unwrap(), [3.0 * 2.0, -2.0 * 2.0]);
    assert_eq!(sums.as_slice().unwrap(), [1.0 + 6.0, 2.0 - 2.0]);
    let (total, _) = B.fm_forward(&rows, &plan).unwrap();
    assert_eq!(total.as_slice().unwrap(), [pairs.sum()]);
}

#[test]
fn fm_backward_refuses_a_gradient_of_another_width() {
    let plan = Arc::new(SparsePlan::new(&[0, 2], &[0, 1], &[1.0, 2.0], None, 1, 2));
    let rows = arr(vec![1.0, 2.0, 3.0, -1.0, 0.5, 0.5], 2, 3);
    let (_, sums) = B.fm_pairs(&rows, &plan).unwrap();
    let err = B.fm_backward(&arr(vec![1.0, 1.0], 1, 2), &sums, &rows, &plan);
    assert!(err.is_err(), "a [1, 2] gradient for dim 3 is refused");
}

#[test]
fn fm_forward_is_the_sum_over_pairs() {
    // One example, features (row 0, x = 1), (row 1, x = 2): <v0, v1> * 1 * 2.
    let plan = Arc::new(SparsePlan::new(&[0, 2], &[0, 1], &[1.0, 2.0], None, 1, 2));
    let (out, _) = B
        .fm_forward(&arr(vec![1.0, 2.0, 3.0, -1.0], 2, 2), &plan)
        .unwrap();
    assert_eq!(out.as_slice().unwrap(), [(3.0 - 2.0) * 2.0]);
}

#[test]
fn matmul_backward_is_two_matmuls() {
    let mut rng = Rng::new(3);
    let (a, b, r) = (rng.vec(3 * 4), rng.vec(4 * 2), rng.vec(3 * 2));
    let (ta, tb, tr) = (
        arr(a.clone(), 3, 4),
        arr(b.clone(), 4, 2),
        arr(r.clone(), 3, 2),
    );
    // d/dA = R B^T, d/dB = A^T R
    let da = B.matmul(&tr, &tb, false, true).unwrap();
    let db = B.matmul(&ta, &tr, true, false).unwrap();
    check("matmul a", &a, da.as_slice().unwrap(), |x| {
        dot(
            &B.matmul(&arr(x.to_vec(), 3, 4), &tb, false, false).unwrap(),
            &r,
        )
    });
    check("matmul b", &b, db.as_slice().unwrap(), |x| {
        dot(
            &B.matmul(&ta, &arr(x.to_vec(), 4, 2), false, false).unwrap(),
            &r,
        )
    });
}

#[test]
fn bias_act_backward_matches_finite_differences() {
    let mut rng = Rng::new(4);
    // Keep inputs away from the ReLU kink so differences are smooth.
    let x: Vec<f32> = rng
        .vec(6 * 5)
        .into_iter()
        .map(|v| if v.abs() < 0.1 { v + 0.3 } else { v })
        .collect();
    let bias = vec![0.0f32; 5];
    let r = rng.vec(6 * 5);
    for (act, dropout) in [
        (Activation::Identity, None),
        (Activation::Relu, None),
        (Activation::Relu, Some(Dropout { rate: 0.4, seed: 9 })),
        (Activation::Identity, Some(Dropout { rate: 0.2, seed: 3 })),
    ] {
        let y = B
            .bias_act(
                &arr(x.clone(), 6, 5),
                &arr(bias.clone(), 1, 5),
                act,
                dropout,
            )
            .unwrap();
        let (dx, db) = B
            .bias_act_backward(&arr(r.clone(), 6, 5), &y, act, dropout)
            .unwrap();
        check("bias_act x", &x, dx.as_slice().unwrap(), |v| {
            dot(
                &B.bias_act(
                    &arr(v.to_vec(), 6, 5),
                    &arr(bias.clone(), 1, 5),
                    act,
                    dropout,
                )
                .unwrap(),
                &r,
            )
        });
        check("bias_act bias", &bias, db.as_slice().unwrap(), |v| {
            dot(
                &B.bias_act(&arr(x.clone(), 6, 5), &arr(v.to_vec(), 1, 5), act, dropout)
                    .unwrap(),
                &r,
            )
        });
    }
}

#[test]
fn dropout_keeps_about_one_minus_rate_and_rescales() {
    let d = Dropout {
        rate: 0.25,
        seed: 7,
    };
    let kept = (0..100_000).filter(|&i| d.keeps(i)).count();
    assert!((kept as f64 / 100_000.0 - 0.75).abs() < 0.01, "{kept}");
    let y = B
        .bias_act(
            &arr(vec![1.0; 8], 2, 4),
            &arr(vec![0.0; 4], 1, 4),
            Activation::Identity,
            Some(d),
        )
        .unwrap();
    assert!(y.iter().all(|&v| v == 0.0 || (v - 4.0 / 3.0).abs() < 1e-6));
}

#[test]
fn batch_norm_backward_matches_finite_differences() {
    let mut rng = Rng::new(5);
    let x = rng.vec(7 * 3);
    let mut params = rng.vec(4 * 3);
    params[9..].iter_mut().for_each(|v| *v = v.abs() + 0.5);
    let r = rng.vec(7 * 3);
    let (_, _, saved) = B
        .batch_norm(
            &arr(x.clone(), 7, 3),
            &arr(params.clone(), 4, 3),
            BatchNormMode::Batch,
            1e-5,
        )
        .unwrap();
    let (dx, dp) = B
        .batch_norm_backward(&arr(r.clone(), 7, 3), &arr(params.clone(), 4, 3), &saved)
        .unwrap();
    let loss = |x: &[f32], p: &[f32]| {
        let (y, _, _) = B
            .batch_norm(
                &arr(x.to_vec(), 7, 3),
                &arr(p.to_vec(), 4, 3),
                BatchNormMode::Batch,
                1e-5,
            )
            .unwrap();
        dot(&y, &r)
    };
    check("batch_norm x", &x, dx.as_slice().unwrap(), |v| {
        loss(v, &params)
    });
    check(
        "batch_norm gamma, beta",
        &params[..6],
        dp.as_slice().unwrap(),
        |v| {
            let mut p = params.clone();
            p[..6].copy_from_slice(v);
            loss(&x, &p)
        },
    );
}

#[test]
fn batch_norm_in_running_mode_uses_the_given_statistics() {
    // gamma 2, beta 1, mean 3, var 4: (5 - 3) / 2 * 2 + 1 = 3.
    let (y, stats, _) = B
        .batch_norm(
            &arr(vec![5.0], 1, 1),
            &arr(vec![2.0, 1.0, 3.0, 4.0], 4, 1),
            BatchNormMode::Running,
            0.0,
        )
        .unwrap();
    assert_eq!(y.as_slice().unwrap(), [3.0]);
    assert_eq!(stats.as_slice().unwrap(), [3.0, 4.0]);
}

#[test]
fn bce_gradient_is_the_mean_loss_derivative() {
    let z = vec![0.3f32, -2.0, 4.0];
    let labels = arr(vec![1.0, 0.0, 0.0], 3, 1);
    let (_, grad) = B.bce_with_logits(&arr(z.clone(), 3, 1), &labels).unwrap();
    check("bce", &z, grad.as_slice().unwrap(), |v| {
        B.bce_with_logits(&arr(v.to_vec(), 3, 1), &labels)
            .unwrap()
            .0
            / 3.0
    });
    assert!(bce(100.0, 1.0).abs() < 1e-6);
    assert!((bce(-100.0, 1.0) - 100.0).abs() < 1e-3);
}

#[test]
fn mismatched_shapes_are_errors_not_panics() {
    let a = arr(vec![0.0; 6], 2, 3);
    assert!(matches!(
        B.matmul(&a, &a, false, false),
        Err(BackendError::Shape { .. })
    ));
    assert!(matches!(
        B.add(&a, &arr(vec![0.0; 3], 1, 3)),
        Err(BackendError::Shape { .. })
    ));
    assert!(B.upload(&[1.0], 2, 2).is_err());
    let plan = Arc::new(SparsePlan::new(&[0, 1], &[0], &[1.0], None, 1, 1));
    assert!(B.gather_pool(&a, &plan, Pooling::Example).is_err());
}

#[test]
fn the_cpu_backend_agrees_with_itself() {
    // The conformance harness itself: identical backends agree exactly.
    for a in conformance::compare(&B, &B, 11).unwrap() {
        assert_eq!(a.relative_error, 0.0, "{}", a.name);
    }
}

#[test]
fn softmax_backward_matches_finite_differences() {
    let mut rng = Rng::new(6);
    let x = rng.vec(4 * 3);
    let r = rng.vec(4 * 3);
    let y = B.softmax_rows(&arr(x.clone(), 4, 3)).unwrap();
    for row in y.outer_iter() {
        assert!((row.sum() - 1.0).abs() < 1e-6);
    }
    let dx = B.softmax_rows_backward(&arr(r.clone(), 4, 3), &y).unwrap();
    check("softmax", &x, dx.as_slice().unwrap(), |v| {
        dot(&B.softmax_rows(&arr(v.to_vec(), 4, 3)).unwrap(), &r)
    });
}

#[test]
fn mix_backward_matches_finite_differences() {
    let mut rng = Rng::new(7);
    // 2 experts of [3, 4] outputs stacked; gates [3, 2].
    let (stacked, gates, r) = (rng.vec(6 * 4), rng.vec(3 * 2), rng.vec(3 * 4));
    let (ds, dg) = B
        .mix_backward(
            &arr(r.clone(), 3, 4),
            &arr(stacked.clone(), 6, 4),
            &arr(gates.clone(), 3, 2),
        )
        .unwrap();
    check("mix experts", &stacked, ds.as_slice().unwrap(), |v| {
        dot(
            &B.mix(&arr(v.to_vec(), 6, 4), &arr(gates.clone(), 3, 2))
                .unwrap(),
            &r,
        )
    });
    check("mix gates", &gates, dg.as_slice().unwrap(), |v| {
        dot(
            &B.mix(&arr(stacked.clone(), 6, 4), &arr(v.to_vec(), 3, 2))
                .unwrap(),
            &r,
        )
    });
    let parts = [
        arr(vec![1.0, 2.0], 1, 2),
        arr(vec![3.0, 4.0, 5.0, 6.0], 2, 2),
    ];
    let stacked = B.stack_rows(&[&parts[0], &parts[1]]).unwrap();
    assert_eq!(stacked.as_slice().unwrap(), [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    assert_eq!(B.slice_rows(&stacked, 1, 2).unwrap(), parts[1]);
    assert!(B.slice_rows(&stacked, 2, 2).is_err());
}

/// A random NHWC batch for `win` and a weight of `c_out` output channels.
fn image_inputs(rng: &mut Rng, win: &Window, c_out: usize) -> (Vec<f32>, Vec<f32>) {
    (
        rng.vec(win.in_rows() * win.channels),
        rng.vec(win.patch() * c_out),
    )
}

#[test]
fn conv2d_backward_matches_finite_differences() {
    let mut rng = Rng::new(8);
    for win in [
        Window::square([2, 4, 5, 2], 3, 1, 1),
        Window::square([1, 5, 5, 3], 3, 2, 1),
        Window::square([2, 3, 3, 4], 1, 1, 0),
    ] {
        let c_out = 3;
        let (x, w) = image_inputs(&mut rng, &win, c_out);
        let r = rng.vec(win.out_rows() * c_out);
        let conv = |x: &[f32], w: &[f32]| {
            let (y, _) = B
                .conv2d(
                    &arr(x.to_vec(), win.in_rows(), win.channels),
                    &arr(w.to_vec(), win.patch(), c_out),
                    &win,
                )
                .unwrap();
            dot(&y, &r)
        };
        let (_, cols) = B
            .conv2d(
                &arr(x.clone(), win.in_rows(), win.channels),
                &arr(w.clone(), win.patch(), c_out),
                &win,
            )
            .unwrap();
        let (dx, dw) = B
            .conv2d_backward(
                &arr(r.clone(), win.out_rows(), c_out),
                &cols,
                &arr(w.clone(), win.patch(), c_out),
                &win,
            )
            .unwrap();
        check("conv2d x", &x, dx.as_slice().unwrap(), |v| conv(v, &w));
        check("conv2d w", &w, dw.as_slice().unwrap(), |v| conv(&x, v));
    }
}

#[test]
fn a_convolution_by_hand() {
    // One 3x3 image, one channel, a 2x2 kernel of ones, no padding: each
    // output is the sum of a 2x2 block.
    let x = arr((1..=9).map(|v| v as f32).collect(), 9, 1);
    let win = Window::square([1, 3, 3, 1], 2, 1, 0);
    let (y, _) = B.conv2d(&x, &arr(vec![1.0; 4], 4, 1), &win).unwrap();
    assert_eq!(y.as_slice().unwrap(), [12.0, 16.0, 24.0, 28.0]);
}

#[test]
fn pooling_backward_matches_finite_differences() {
    let mut rng = Rng::new(9);
    for (win, kind) in [
        (Window::square([2, 4, 4, 3], 2, 2, 0), PoolKind::Max),
        (Window::square([1, 5, 5, 2], 3, 1, 1), PoolKind::Max),
        (Window::square([2, 5, 4, 2], 3, 2, 1), PoolKind::Average),
        (
            Window {
                kernel: [3, 4],
                ..Window::square([3, 3, 4, 2], 1, 1, 0)
            },
            PoolKind::Average,
        ),
    ] {
        // Values at least 0.05 apart, so that the finite difference's
        // steps of 0.01 never change which pixel is a window's maximum.
        let n = win.in_rows() * win.channels;
        let mut x: Vec<f32> = (0..n).map(|i| i as f32 * 0.05).collect();
        for i in (1..n).rev() {
            x.swap(i, rng.below(i + 1));
        }
        let r = rng.vec(win.out_rows() * win.channels);
        let dx = B
            .pool2d_backward(
                &arr(r.clone(), win.out_rows(), win.channels),
                &arr(x.clone(), win.in_rows(), win.channels),
                &win,
                kind,
            )
            .unwrap();
        check(&format!("{kind:?} pool"), &x, dx.as_slice().unwrap(), |v| {
            let y = B
                .pool2d(&arr(v.to_vec(), win.in_rows(), win.channels), &win, kind)
                .unwrap();
            dot(&y, &r)
        });
    }
}

#[test]
fn softmax_cross_entropy_matches_finite_differences() {
    let mut rng = Rng::new(10);
    let (n, k) = (5, 4);
    let logits: Vec<f32> = rng.vec(n * k).iter().map(|v| v * 3.0).collect();
    let labels = arr(vec![0.0, 3.0, 1.0, 1.0, 2.0], n, 1);
    let (_, grad) = B
        .softmax_cross_entropy(&arr(logits.clone(), n, k), &labels)
        .unwrap();
    check("softmax_xent", &logits, grad.as_slice().unwrap(), |v| {
        let (loss, _) = B
            .softmax_cross_entropy(&arr(v.to_vec(), n, k), &labels)
            .unwrap();
        loss / n as f64
    });
    let bad = arr(vec![4.0, 0.0, 0.0, 0.0, 0.0], n, 1);
    assert!(
        B.softmax_cross_entropy(&arr(logits, n, k), &bad)
            .unwrap_err()
            .to_string()
            .contains("label 4 is not a class index in 0..4")
    );
}

#[test]
fn image_ops_refuse_shapes_that_do_not_fit() {
    let win = Window::square([2, 4, 4, 3], 3, 1, 1);
    let wrong = arr(vec![0.0; 2 * 16 * 2], 32, 2);
    assert!(B.im2col(&wrong, &win).is_err());
    assert!(B.pool2d(&wrong, &win, PoolKind::Max).is_err());
    let too_big = Window::square([1, 2, 2, 1], 5, 1, 0);
    assert!(B.im2col(&arr(vec![0.0; 4], 4, 1), &too_big).is_err());
    assert!(B.slice_cols(&wrong, 1, 2).is_err());
    let rows = [arr(vec![0.0; 4], 2, 2), arr(vec![0.0; 3], 3, 1)];
    assert!(B.concat_cols(&[&rows[0], &rows[1]]).is_err());
}

#[test]
fn attention_backward_matches_finite_differences() {
    let mut rng = Rng::new(11);
    // 3 sequences of 4 tokens, width 6 in 2 heads.
    let (positions, heads, rows, width) = (4, 2, 12, 6);
    let (q, k, v, r) = (
        rng.vec(rows * width),
        rng.vec(rows * width),
        rng.vec(rows * width),
        rng.vec(rows * width),
    );
    let t = |x: &[f32]| arr(x.to_vec(), rows, width);
    let (out, weights) = B
        .attention(&t(&q), &t(&k), &t(&v), positions, heads)
        .unwrap();
    for row in weights.outer_iter() {
        assert!(
            (row.sum() - 1.0).abs() < 1e-5,
            "each query's weights sum to 1"
        );
    }
    assert_eq!(out.dim(), (rows, width));
    let (dq, dk, dv) = B
        .attention_backward(&t(&r), &t(&q), &t(&k), &t(&v), &weights, positions, heads)
        .unwrap();
    let loss = |q: &[f32], k: &[f32], v: &[f32]| {
        dot(
            &B.attention(&t(q), &t(k), &t(v), positions, heads)
                .unwrap()
                .0,
            &r,
        )
    };
    check("attention q", &q, dq.as_slice().unwrap(), |x| {
        loss(x, &k, &v)
    });
    check("attention k", &k, dk.as_slice().unwrap(), |x| {
        loss(&q, x, &v)
    });
    check("attention v", &v, dv.as_slice().unwrap(), |x| {
        loss(&q, &k, x)
    });
    assert!(
        B.attention(&t(&q), &t(&k), &t(&v), 5, heads).is_err(),
        "12 rows, 5 positions"
    );
    assert!(
        B.attention(&t(&q), &t(&k), &t(&v), positions, 4).is_err(),
        "6 columns, 4 heads"
    );
}
