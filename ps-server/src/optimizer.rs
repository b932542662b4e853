//! Server-side optimizers: how a gradient becomes a weight update.
//!
//! A row is one contiguous slice `[weights (dim) | optimizer state]`, so the
//! weights and the state they need are updated together under one lock. Each
//! optimizer here is a pure function of (hyper-parameters, row, gradient),
//! unit-tested against steps computed by hand.

use ps_common::OptimizerSpec;

/// Floats of optimizer state kept after the `dim` weights of a row.
pub fn state_len(spec: &OptimizerSpec, dim: usize) -> usize {
    match spec {
        OptimizerSpec::Sgd { .. } => 0,
        OptimizerSpec::Adagrad { .. } => dim,
        // m, v, then beta1^t and beta2^t of this row.
        OptimizerSpec::Adam { .. } => 2 * dim + 2,
        // z, n.
        OptimizerSpec::Ftrl { .. } => 2 * dim,
    }
}

/// Sets up the state of a fresh row whose weights are already initialized.
pub fn init_state(spec: &OptimizerSpec, weights: &[f32], state: &mut [f32]) {
    match *spec {
        OptimizerSpec::Sgd { .. } => {}
        OptimizerSpec::Adagrad {
            initial_accumulator,
            ..
        } => state.fill(initial_accumulator),
        OptimizerSpec::Adam { .. } => {
            let dim = weights.len();
            state[..2 * dim].fill(0.0);
            state[2 * dim..].fill(1.0);
        }
        OptimizerSpec::Ftrl {
            alpha,
            beta,
            l1,
            l2,
        } => {
            // Choose z so that the proximal weight equals the initializer's
            // value with n = 0: w = -(z - sgn(z) l1) / (beta / alpha + l2).
            let (z, n) = state.split_at_mut(weights.len());
            n.fill(0.0);
            let denom = beta / alpha + l2;
            for (z, &w) in z.iter_mut().zip(weights) {
                *z = if w == 0.0 {
                    0.0
                } else {
                    -w * denom - w.signum() * l1
                };
            }
        }
    }
}

/// Applies one gradient to a row. `row` is `[weights | state]`; `grad` has `dim` values.
/// Always inlined: called once per row under the row's lock, where the
/// call and its dispatch would cost as much as a small row's update.
#[inline(always)]
pub fn apply(spec: &OptimizerSpec, row: &mut [f32], grad: &[f32]) {
    let dim = grad.len();
    let (w, state) = row.split_at_mut(dim);
    // Regularization of the rows a push touches: `l2 * w` joins the
    // gradient, and decoupled decay scales the weight before the step.
    let decay = |lr: f32, weight_decay: f32| (1.0 - lr * weight_decay).max(0.0);
    match *spec {
        OptimizerSpec::Sgd {
            lr,
            l2,
            weight_decay,
        } => {
            let keep = decay(lr, weight_decay);
            for (w, &g) in w.iter_mut().zip(grad) {
                let g = g + l2 * *w;
                *w = *w * keep - lr * g;
            }
        }
        OptimizerSpec::Adagrad {
            lr,
            eps,
            l2,
            weight_decay,
            ..
        } => {
            let keep = decay(lr, weight_decay);
            for ((w, acc), &g) in w.iter_mut().zip(state.iter_mut()).zip(grad) {
                let g = g + l2 * *w;
                *acc += g * g;
                *w = *w * keep - lr * g / (acc.sqrt() + eps);
            }
        }
        OptimizerSpec::Adam {
            lr,
            beta1,
            beta2,
            eps,
            l2,
            weight_decay,
        } => {
            let keep = decay(lr, weight_decay);
            let (m, rest) = state.split_at_mut(dim);
            let (v, powers) = rest.split_at_mut(dim);
            powers[0] *= beta1;
            powers[1] *= beta2;
            let (c1, c2) = (1.0 - powers[0], 1.0 - powers[1]);
            for (((w, m), v), &g) in w.iter_mut().zip(m).zip(v).zip(grad) {
                let g = g + l2 * *w;
                *m = beta1 * *m + (1.0 - beta1) * g;
                *v = beta2 * *v + (1.0 - beta2) * g * g;
                *w = *w * keep - lr * (*m / c1) / ((*v / c2).sqrt() + eps);
            }
        }
        OptimizerSpec::Ftrl {
            alpha,
            beta,
            l1,
            l2,
        } => {
            let (z, n) = state.split_at_mut(dim);
            for (((w, z), n), &g) in w.iter_mut().zip(z).zip(n).zip(grad) {
                let sigma = ((*n + g * g).sqrt() - n.sqrt()) / alpha;
                *z += g - sigma * *w;
                *n += g * g;
                *w = ftrl_weight(*z, *n, alpha, beta, l1, l2);
            }
        }
    }
}

/// FTRL-proximal's closed-form weight from its accumulators `z` and `n`.
#[inline]
fn ftrl_weight(z: f32, n: f32, alpha: f32, beta: f32, l1: f32, l2: f32) -> f32 {
    if z.abs() <= l1 {
        0.0
    } else {
        -(z - z.signum() * l1) / ((beta + n.sqrt()) / alpha + l2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f32, b: f32) -> bool {
        (a - b).abs() <= 1e-6 * b.abs().max(1.0)
    }

    fn row_for(spec: &OptimizerSpec, weights: &[f32]) -> Vec<f32> {
        let mut row = weights.to_vec();
        row.resize(weights.len() + state_len(spec, weights.len()), 0.0);
        let (w, s) = row.split_at_mut(weights.len());
        init_state(spec, w, s);
        row
    }

    #[test]
    fn sgd_step_matches_hand_computation() {
        let spec = OptimizerSpec::sgd(0.1);
        let mut row = row_for(&spec, &[1.0, -2.0]);
        apply(&spec, &mut row, &[0.5, -1.0]);
        // 1 - 0.1 * 0.5 = 0.95; -2 - 0.1 * -1 = -1.9
        assert!(close(row[0], 0.95) && close(row[1], -1.9), "{row:?}");
    }

    #[test]
    fn adagrad_steps_match_hand_computation() {
        let spec = OptimizerSpec::Adagrad {
            lr: 0.5,
            initial_accumulator: 0.1,
            eps: 0.0,
            l2: 0.0,
            weight_decay: 0.0,
        };
        let mut row = row_for(&spec, &[1.0]);
        apply(&spec, &mut row, &[2.0]);
        // acc = 0.1 + 4 = 4.1; w = 1 - 0.5 * 2 / sqrt(4.1) = 0.506154...
        assert!(close(row[1], 4.1));
        assert!(close(row[0], 1.0 - 1.0 / 4.1f32.sqrt()), "{row:?}");
        apply(&spec, &mut row, &[-1.0]);
        // acc = 5.1; w += 0.5 / sqrt(5.1)
        assert!(close(
            row[0],
            1.0 - 1.0 / 4.1f32.sqrt() + 0.5 / 5.1f32.sqrt()
        ));
    }

    #[test]
    fn adam_steps_match_hand_computation() {
        let spec = OptimizerSpec::Adam {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            l2: 0.0,
            weight_decay: 0.0,
        };
        let mut row = row_for(&spec, &[0.0]);
        // Step 1: m = 0.1 g, v = 0.001 g^2, m_hat = g, v_hat = g^2 -> w -= lr * sign(g).
        apply(&spec, &mut row, &[3.0]);
        assert!(close(row[0], -0.1), "{row:?}");
        // Step 2 with g = 1: m = 0.9*0.3 + 0.1 = 0.37, v = 0.999*0.009 + 0.001 = 0.009991,
        // m_hat = 0.37 / 0.19, v_hat = 0.009991 / 0.001999.
        apply(&spec, &mut row, &[1.0]);
        let m_hat = 0.37f32 / 0.19;
        let v_hat = 0.009991f32 / (1.0 - 0.999f32 * 0.999);
        let expected = -0.1 - 0.1 * m_hat / (v_hat.sqrt() + 1e-8);
        assert!((row[0] - expected).abs() < 1e-5, "{} vs {expected}", row[0]);
    }

    /// L2 adds `l2 * w` to the gradient before the optimizer's step; decay
    /// scales the weight by `1 - lr * weight_decay` beside it. With a zero
    /// gradient either one alone shrinks a touched row as specified.
    #[test]
    fn l2_and_weight_decay_shrink_exactly_as_specified_for_each_optimizer() {
        let sgd = |l2, weight_decay| OptimizerSpec::Sgd {
            lr: 0.1,
            l2,
            weight_decay,
        };
        // l2 0.2: g' = 0.5 + 0.2 * 1 = 0.7, w = 1 - 0.1 * 0.7.
        let mut row = row_for(&sgd(0.2, 0.0), &[1.0]);
        apply(&sgd(0.2, 0.0), &mut row, &[0.5]);
        assert!(close(row[0], 0.93), "{row:?}");
        // decay 0.5: w = 1 * (1 - 0.05) - 0.1 * 0.5.
        let mut row = row_for(&sgd(0.0, 0.5), &[1.0]);
        apply(&sgd(0.0, 0.5), &mut row, &[0.5]);
        assert!(close(row[0], 0.9), "{row:?}");

        let adagrad = |l2, weight_decay| OptimizerSpec::Adagrad {
            lr: 0.5,
            initial_accumulator: 0.0,
            eps: 1e-8,
            l2,
            weight_decay,
        };
        // l2 1, g 0: g' = 2 (w = 2), acc = 4, w = 2 - 0.5 * 2 / 2 = 1.5.
        let mut row = row_for(&adagrad(1.0, 0.0), &[2.0]);
        apply(&adagrad(1.0, 0.0), &mut row, &[0.0]);
        assert!(close(row[1], 4.0) && close(row[0], 1.5), "{row:?}");
        // decay 0.4, g 0: w = 2 * (1 - 0.2), the accumulator untouched.
        let mut row = row_for(&adagrad(0.0, 0.4), &[2.0]);
        apply(&adagrad(0.0, 0.4), &mut row, &[0.0]);
        assert!(close(row[1], 0.0) && close(row[0], 1.6), "{row:?}");

        let adam = |l2, weight_decay| OptimizerSpec::Adam {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            l2,
            weight_decay,
        };
        // l2 0.5, g 0, w 2: g' = 1; step 1 moves by lr * sign(g') (m^ = g',
        // v^ = g'^2): w = 1.9, m = 0.1, v = 0.001.
        let mut row = row_for(&adam(0.5, 0.0), &[2.0]);
        apply(&adam(0.5, 0.0), &mut row, &[0.0]);
        assert!(close(row[0], 1.9) && close(row[1], 0.1) && close(row[2], 0.001));
        // AdamW, decay 0.5, g 0: w = 2 * (1 - 0.05), moments stay 0.
        let mut row = row_for(&adam(0.0, 0.5), &[2.0]);
        apply(&adam(0.0, 0.5), &mut row, &[0.0]);
        assert!(
            close(row[0], 1.9) && row[1] == 0.0 && row[2] == 0.0,
            "{row:?}"
        );
        // Both, with a gradient: g' = 1 + 0.5 * 2 = 2; w = 2 * 0.95 - 0.1.
        let mut row = row_for(&adam(0.5, 0.5), &[2.0]);
        apply(&adam(0.5, 0.5), &mut row, &[1.0]);
        assert!(close(row[0], 1.8) && close(row[1], 0.2), "{row:?}");
    }

    #[test]
    fn ftrl_steps_match_hand_computation() {
        let spec = OptimizerSpec::Ftrl {
            alpha: 0.5,
            beta: 1.0,
            l1: 0.1,
            l2: 0.2,
        };
        let mut row = row_for(&spec, &[0.0]);
        // g = 1: sigma = (1 - 0) / 0.5 = 2; z = 1 - 2 * 0 = 1; n = 1;
        // w = -(1 - 0.1) / ((1 + 1) / 0.5 + 0.2) = -0.9 / 4.2
        apply(&spec, &mut row, &[1.0]);
        assert!(close(row[0], -0.9 / 4.2), "{row:?}");
        // g = -0.05: |z| stays above l1 -> still non-zero; a large opposite gradient
        // drives z inside [-l1, l1] and the weight to exactly 0 (L1 sparsity).
        apply(&spec, &mut row, &[-1.2]);
        let sigma = ((1.0f32 + 1.44).sqrt() - 1.0) / 0.5;
        let z = 1.0 - 1.2 - sigma * (-0.9 / 4.2);
        assert!(z.abs() <= 0.1, "z = {z}: test expects the L1 region");
        assert_eq!(row[0], 0.0);
    }

    #[test]
    fn ftrl_starts_from_the_initializers_weights() {
        let spec = OptimizerSpec::Ftrl {
            alpha: 0.1,
            beta: 1.0,
            l1: 0.3,
            l2: 2.0,
        };
        let weights = [0.25f32, -0.5, 0.0];
        let row = row_for(&spec, &weights);
        let (z, n) = row[3..].split_at(3);
        for ((&w, &z), &n) in weights.iter().zip(z).zip(n) {
            let derived = ftrl_weight(z, n, 0.1, 1.0, 0.3, 2.0);
            assert!(close(derived, w), "{derived} vs {w}");
        }
    }

    #[test]
    fn zero_gradients_leave_weights_unchanged() {
        for spec in [
            OptimizerSpec::sgd(1.0),
            OptimizerSpec::Adagrad {
                lr: 1.0,
                initial_accumulator: 0.1,
                eps: 1e-8,
                l2: 0.0,
                weight_decay: 0.0,
            },
            OptimizerSpec::Adam {
                lr: 1.0,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                l2: 0.0,
                weight_decay: 0.0,
            },
        ] {
            let mut row = row_for(&spec, &[0.5, -0.5]);
            apply(&spec, &mut row, &[0.0, 0.0]);
            assert_eq!(&row[..2], &[0.5, -0.5], "{spec:?}");
        }
    }
}
