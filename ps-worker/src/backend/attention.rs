//! Scaled dot-product multi-head attention over short sequences: the
//! shapes ([`Heads`]) and the host implementation, which the CPU backend
//! runs and `kernels/attention.cu` follows element for element.
//!
//! A batch of `n` sequences of `positions` tokens of `width` values is a
//! `[positions * n, width]` tensor, position `p` of sequence `b` in row
//! `p * n + b` (the layout `stack_rows` of one `[n, width]` tensor per
//! position gives). Head `h` owns columns `h * d .. (h + 1) * d`,
//! `d = width / heads`, and attends with `softmax(q k^T / sqrt(d)) v`.

use super::{BackendError, shape_error};

/// The shape of an attention: sequences, positions, heads, width.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heads {
    /// Sequences in the batch.
    pub sequences: usize,
    /// Tokens per sequence.
    pub positions: usize,
    /// Attention heads.
    pub heads: usize,
    /// Values per token (all heads).
    pub width: usize,
}

impl Heads {
    /// The shape of `[rows, width]` operands of `positions` tokens per
    /// sequence and `heads` heads, checked.
    pub fn of(
        op: &'static str,
        [rows, width]: [usize; 2],
        positions: usize,
        heads: usize,
    ) -> Result<Heads, BackendError> {
        if positions == 0 || heads == 0 || !rows.is_multiple_of(positions) {
            return Err(shape_error(
                op,
                format!("{rows} rows are not sequences of {positions} positions"),
            ));
        }
        if !width.is_multiple_of(heads) {
            return Err(shape_error(
                op,
                format!("width {width} does not split into {heads} heads"),
            ));
        }
        Ok(Heads {
            sequences: rows / positions,
            positions,
            heads,
            width,
        })
    }

    /// Values per head.
    pub fn head_width(&self) -> usize {
        self.width / self.heads
    }

    /// `1 / sqrt(d)`.
    pub fn scale(&self) -> f32 {
        1.0 / (self.head_width().max(1) as f32).sqrt()
    }

    /// Elements of the attention weights: `n * heads * positions^2`.
    pub fn weights(&self) -> usize {
        self.sequences * self.heads * self.positions * self.positions
    }

    /// Where head `h` of token `p` of sequence `b` starts.
    #[inline]
    fn at(&self, p: usize, b: usize, h: usize) -> usize {
        (p * self.sequences + b) * self.width + h * self.head_width()
    }

    /// Where the weights of query `i` of head `h` of sequence `b` start.
    #[inline]
    fn row(&self, b: usize, h: usize, i: usize) -> usize {
        ((b * self.heads + h) * self.positions + i) * self.positions
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// The attention's output (the shape of `q`) and its weights, row
/// `(b, h, i)` over keys `j`.
pub fn attention(q: &[f32], k: &[f32], v: &[f32], s: &Heads) -> (Vec<f32>, Vec<f32>) {
    let (d, l, scale) = (s.head_width(), s.positions, s.scale());
    let mut out = vec![0f32; q.len()];
    let mut weights = vec![0f32; s.weights()];
    for b in 0..s.sequences {
        for h in 0..s.heads {
            for i in 0..l {
                let qi = &q[s.at(i, b, h)..][..d];
                let w = &mut weights[s.row(b, h, i)..][..l];
                for (j, wj) in w.iter_mut().enumerate() {
                    *wj = scale * dot(qi, &k[s.at(j, b, h)..][..d]);
                }
                let max = w.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0f32;
                for wj in w.iter_mut() {
                    *wj = (*wj - max).exp();
                    sum += *wj;
                }
                let o = &mut out[s.at(i, b, h)..][..d];
                for (j, wj) in w.iter_mut().enumerate() {
                    *wj /= sum;
                    for (o, vj) in o.iter_mut().zip(&v[s.at(j, b, h)..][..d]) {
                        *o += *wj * vj;
                    }
                }
            }
        }
    }
    (out, weights)
}

/// The gradients `(d q, d k, d v)` of [`attention`] given the gradient of
/// its output and its weights.
pub fn attention_backward(
    grad: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    weights: &[f32],
    s: &Heads,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (d, l, scale) = (s.head_width(), s.positions, s.scale());
    let (mut dq, mut dk, mut dv) = (
        vec![0f32; q.len()],
        vec![0f32; k.len()],
        vec![0f32; v.len()],
    );
    // d scores, row (b, h, i) over j: w_ij (g_i . v_j - sum_j' w_ij' g_i . v_j').
    let mut ds = vec![0f32; s.weights()];
    for b in 0..s.sequences {
        for h in 0..s.heads {
            for i in 0..l {
                let gi = &grad[s.at(i, b, h)..][..d];
                let w = &weights[s.row(b, h, i)..][..l];
                let dsi = &mut ds[s.row(b, h, i)..][..l];
                let mut mean = 0f32;
                for (j, dsj) in dsi.iter_mut().enumerate() {
                    *dsj = dot(gi, &v[s.at(j, b, h)..][..d]);
                    mean += w[j] * *dsj;
                }
                let dqi = &mut dq[s.at(i, b, h)..][..d];
                for (j, dsj) in dsi.iter_mut().enumerate() {
                    *dsj = w[j] * (*dsj - mean);
                    for (o, kj) in dqi.iter_mut().zip(&k[s.at(j, b, h)..][..d]) {
                        *o += scale * *dsj * kj;
                    }
                }
            }
            for j in 0..l {
                let (at, dkj) = (s.at(j, b, h), &mut dk[s.at(j, b, h)..][..d]);
                for i in 0..l {
                    let dsij = ds[s.row(b, h, i) + j];
                    for (o, qi) in dkj.iter_mut().zip(&q[s.at(i, b, h)..][..d]) {
                        *o += scale * dsij * qi;
                    }
                }
                let dvj = &mut dv[at..][..d];
                for i in 0..l {
                    let wij = weights[s.row(b, h, i) + j];
                    for (o, gi) in dvj.iter_mut().zip(&grad[s.at(i, b, h)..][..d]) {
                        *o += wij * gi;
                    }
                }
            }
        }
    }
    (dq, dk, dv)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_keys_average_the_values() {
        // One sequence of 2 tokens, one head of width 2: identical keys
        // give weights 1/2 each, so each output is the mean of the values.
        let s = Heads::of("t", [2, 2], 2, 1).unwrap();
        let (q, k, v) = (
            [1.0, 0.0, 0.0, 1.0],
            [1.0, 1.0, 1.0, 1.0],
            [2.0, 0.0, 4.0, 6.0],
        );
        let (out, weights) = attention(&q, &k, &v, &s);
        assert_eq!(weights, [0.5; 4]);
        assert_eq!(out, [3.0, 3.0, 3.0, 3.0]);
    }

    #[test]
    fn a_query_picks_the_key_it_matches_per_head() {
        // Two heads of width 1 over 2 positions: head 0 matches position
        // 1's key strongly, head 1 position 0's.
        let s = Heads::of("t", [2, 2], 2, 2).unwrap();
        let q = [10.0, 10.0, 10.0, 10.0];
        let k = [-10.0, 10.0, 10.0, -10.0];
        let v = [1.0, 2.0, 3.0, 4.0];
        let (out, _) = attention(&q, &k, &v, &s);
        for row in out.chunks(2) {
            assert!(
                (row[0] - 3.0).abs() < 1e-4 && (row[1] - 2.0).abs() < 1e-4,
                "{row:?}"
            );
        }
    }

    #[test]
    fn shapes_that_do_not_split_are_errors() {
        assert!(Heads::of("t", [5, 4], 2, 1).is_err(), "5 rows, 2 positions");
        assert!(Heads::of("t", [4, 6], 2, 4).is_err(), "6 columns, 4 heads");
        assert!(Heads::of("t", [4, 6], 0, 1).is_err());
        let s = Heads::of("t", [6, 8], 3, 2).unwrap();
        assert_eq!((s.sequences, s.head_width(), s.weights()), (2, 4, 36));
    }
}
