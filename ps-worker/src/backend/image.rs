//! The image ops' shapes ([`Window`], [`PoolKind`]) and their host
//! implementations, which the CPU backend runs and the CUDA kernels in
//! `kernels/image.cu` follow element for element.
//!
//! Images travel as 2-D tensors in NHWC order: a batch of `n` images of
//! `h x w` pixels and `c` channels is `[n * h * w, c]`, one row per pixel.
//! That layout makes a convolution one matrix product (`im2col(x) @ W`,
//! `W` being `[kh * kw * c, c_out]`), lets batch normalization and the
//! fused bias + ReLU work per channel unchanged (they work per column),
//! and makes concatenation along channels a concatenation of columns.

use super::{BackendError, shape_error};

/// A sliding window over a batch of NHWC images: a convolution's or a
/// pooling's geometry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Images in the batch.
    pub images: usize,
    /// Input height in pixels.
    pub height: usize,
    /// Input width in pixels.
    pub width: usize,
    /// Input channels.
    pub channels: usize,
    /// Window height and width.
    pub kernel: [usize; 2],
    /// Step between windows, both directions (>= 1).
    pub stride: usize,
    /// Zero padding on every side.
    pub padding: usize,
}

impl Window {
    /// A square `kernel x kernel` window.
    pub fn square(
        [images, height, width, channels]: [usize; 4],
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Window {
        Window {
            images,
            height,
            width,
            channels,
            kernel: [kernel, kernel],
            stride,
            padding,
        }
    }

    /// Output height: `(h + 2p - kh) / s + 1`.
    pub fn out_height(&self) -> usize {
        (self.height + 2 * self.padding).saturating_sub(self.kernel[0]) / self.stride.max(1) + 1
    }

    /// Output width: `(w + 2p - kw) / s + 1`.
    pub fn out_width(&self) -> usize {
        (self.width + 2 * self.padding).saturating_sub(self.kernel[1]) / self.stride.max(1) + 1
    }

    /// Rows of the input tensor: `n * h * w`.
    pub fn in_rows(&self) -> usize {
        self.images * self.height * self.width
    }

    /// Rows of the output tensor: `n * oh * ow`.
    pub fn out_rows(&self) -> usize {
        self.images * self.out_height() * self.out_width()
    }

    /// Columns of [`im2col`]'s output: `kh * kw * c`.
    pub fn patch(&self) -> usize {
        self.kernel[0] * self.kernel[1] * self.channels
    }

    /// Checks that the window fits its input and that `[rows, cols]` is
    /// the input's shape.
    pub fn check_input(&self, op: &'static str, shape: [usize; 2]) -> Result<(), BackendError> {
        let fits = self.stride >= 1
            && self.kernel[0] >= 1
            && self.kernel[1] >= 1
            && self.padding < self.kernel[0].min(self.kernel[1])
            && self.kernel[0] <= self.height + 2 * self.padding
            && self.kernel[1] <= self.width + 2 * self.padding;
        if !fits {
            return Err(shape_error(op, format!("window {self:?} does not fit")));
        }
        if shape != [self.in_rows(), self.channels] {
            return Err(shape_error(
                op,
                format!(
                    "input {shape:?}, the window expects [{}, {}]",
                    self.in_rows(),
                    self.channels
                ),
            ));
        }
        Ok(())
    }

    /// Checks a tensor of the output's rows and `cols` columns.
    pub fn check_output(
        &self,
        op: &'static str,
        shape: [usize; 2],
        cols: usize,
    ) -> Result<(), BackendError> {
        if shape == [self.out_rows(), cols] {
            Ok(())
        } else {
            Err(shape_error(
                op,
                format!(
                    "{shape:?}, the window's output is [{}, {cols}]",
                    self.out_rows()
                ),
            ))
        }
    }

    /// The input pixel `(y, x)` of image `b` that output pixel `(oy, ox)`'s
    /// window covers at offset `(ky, kx)`, or `None` in the padding.
    #[inline]
    fn source(&self, oy: usize, ox: usize, ky: usize, kx: usize) -> Option<(usize, usize)> {
        let y = (oy * self.stride + ky).checked_sub(self.padding)?;
        let x = (ox * self.stride + kx).checked_sub(self.padding)?;
        (y < self.height && x < self.width).then_some((y, x))
    }
}

/// What a pooling window computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolKind {
    /// The largest value (padding never wins).
    Max,
    /// The mean over the window's pixels inside the image (padding is
    /// not counted).
    Average,
}

/// Walks every patch entry in [`im2col`]'s order (image, oy, ox, ky, kx):
/// `each(at, pixel)` with `at` the entry's offset into the patches and
/// `pixel` the offset of the input pixel it copies, `None` in the padding.
fn each_patch_entry(win: &Window, mut each: impl FnMut(usize, Option<usize>)) {
    let c = win.channels;
    let mut at = 0;
    for b in 0..win.images {
        for oy in 0..win.out_height() {
            for ox in 0..win.out_width() {
                for ky in 0..win.kernel[0] {
                    for kx in 0..win.kernel[1] {
                        let pixel = win
                            .source(oy, ox, ky, kx)
                            .map(|(y, x)| ((b * win.height + y) * win.width + x) * c);
                        each(at, pixel);
                        at += c;
                    }
                }
            }
        }
    }
}

/// `[n * oh * ow, kh * kw * c]`: each output pixel's window, flattened in
/// (ky, kx, channel) order, zeros in the padding.
pub fn im2col(x: &[f32], win: &Window) -> Vec<f32> {
    let c = win.channels;
    let mut cols = vec![0f32; win.out_rows() * win.patch()];
    each_patch_entry(win, |at, pixel| {
        if let Some(from) = pixel {
            cols[at..at + c].copy_from_slice(&x[from..from + c]);
        }
    });
    cols
}

/// The adjoint of [`im2col`]: each input pixel gets the sum of the
/// patch entries that copied it, in (oy, ox, ky, kx) order.
pub fn col2im(cols: &[f32], win: &Window) -> Vec<f32> {
    let c = win.channels;
    let mut x = vec![0f32; win.in_rows() * c];
    each_patch_entry(win, |at, pixel| {
        if let Some(to) = pixel {
            for (o, v) in x[to..to + c].iter_mut().zip(&cols[at..at + c]) {
                *o += v;
            }
        }
    });
    x
}

/// For each output pixel and channel: the window's maximum (and the
/// flat input index it came from, the first in scan order) or mean.
fn pool_windows(
    x: &[f32],
    win: &Window,
    kind: PoolKind,
    mut each: impl FnMut(usize, f32, &[usize]),
) {
    let (c, oh, ow) = (win.channels, win.out_height(), win.out_width());
    let mut sources = Vec::with_capacity(win.kernel[0] * win.kernel[1]);
    let mut out = 0;
    for b in 0..win.images {
        for oy in 0..oh {
            for ox in 0..ow {
                sources.clear();
                for ky in 0..win.kernel[0] {
                    for kx in 0..win.kernel[1] {
                        if let Some((y, xx)) = win.source(oy, ox, ky, kx) {
                            sources.push(((b * win.height + y) * win.width + xx) * c);
                        }
                    }
                }
                for ch in 0..c {
                    let value = match kind {
                        PoolKind::Max => sources
                            .iter()
                            .map(|&s| x[s + ch])
                            .fold(f32::NEG_INFINITY, f32::max),
                        PoolKind::Average => {
                            sources.iter().map(|&s| x[s + ch]).sum::<f32>()
                                / sources.len().max(1) as f32
                        }
                    };
                    each(out * c + ch, value, &sources);
                }
                out += 1;
            }
        }
    }
}

/// Max or average pooling, `[n * oh * ow, c]`.
pub fn pool2d(x: &[f32], win: &Window, kind: PoolKind) -> Vec<f32> {
    let mut y = vec![0f32; win.out_rows() * win.channels];
    pool_windows(x, win, kind, |i, v, _| y[i] = v);
    y
}

/// The gradient of [`pool2d`] with respect to its input: a max window
/// passes its gradient to the first input pixel that holds the maximum,
/// an average window spreads it evenly over its pixels.
pub fn pool2d_backward(dy: &[f32], x: &[f32], win: &Window, kind: PoolKind) -> Vec<f32> {
    let c = win.channels;
    let mut dx = vec![0f32; win.in_rows() * c];
    pool_windows(x, win, kind, |i, value, sources| {
        let ch = i % c;
        match kind {
            PoolKind::Max => {
                if let Some(&s) = sources.iter().find(|&&s| x[s + ch] == value) {
                    dx[s + ch] += dy[i];
                }
            }
            PoolKind::Average => {
                let share = dy[i] / sources.len().max(1) as f32;
                for &s in sources {
                    dx[s + ch] += share;
                }
            }
        }
    });
    dx
}

/// Mean softmax cross-entropy of `logits` (`[n, k]`) against class
/// indices `labels` (`[n]`): the summed loss and the gradient of the mean
/// loss, `(softmax(z) - onehot(y)) / n`. A label outside `0..k` is an
/// error.
pub fn softmax_cross_entropy(
    logits: &[f32],
    labels: &[f32],
    classes: usize,
) -> Result<(f64, Vec<f32>), BackendError> {
    let n = labels.len();
    let mut grad = vec![0f32; logits.len()];
    let mut total = 0f64;
    for (b, (row, g)) in logits
        .chunks(classes.max(1))
        .zip(grad.chunks_mut(classes.max(1)))
        .enumerate()
    {
        let y = class_of(labels[b], classes)?;
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f32 = row.iter().map(|z| (z - max).exp()).sum();
        total += f64::from(sum.ln() + max - row[y]);
        for (k, (gk, z)) in g.iter_mut().zip(row).enumerate() {
            let p = (z - max).exp() / sum;
            *gk = (p - if k == y { 1.0 } else { 0.0 }) / n as f32;
        }
    }
    Ok((total, grad))
}

/// The class a label names, checked against the number of classes.
pub fn class_of(label: f32, classes: usize) -> Result<usize, BackendError> {
    if label >= 0.0 && label.fract() == 0.0 && (label as usize) < classes {
        Ok(label as usize)
    } else {
        Err(shape_error(
            "softmax_cross_entropy",
            format!("label {label} is not a class index in 0..{classes}"),
        ))
    }
}

/// Columns `parts` side by side: `[rows, sum of widths]`.
pub fn concat_cols(parts: &[(&[f32], usize)], rows: usize) -> Vec<f32> {
    let width: usize = parts.iter().map(|(_, w)| w).sum();
    let mut out = Vec::with_capacity(rows * width);
    for r in 0..rows {
        for (data, w) in parts {
            out.extend_from_slice(&data[r * w..(r + 1) * w]);
        }
    }
    out
}

/// Columns `start..start + width` of a `[rows, cols]` tensor.
pub fn slice_cols(x: &[f32], cols: usize, start: usize, width: usize) -> Vec<f32> {
    x.chunks(cols.max(1))
        .flat_map(|row| row[start..start + width].iter().copied())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn win(h: usize, w: usize, c: usize, k: usize, s: usize, p: usize) -> Window {
        Window::square([1, h, w, c], k, s, p)
    }

    #[test]
    fn output_sizes_follow_the_convolution_formula() {
        let w = win(8, 8, 1, 3, 1, 1);
        assert_eq!((w.out_height(), w.out_width()), (8, 8));
        let w = win(8, 8, 1, 3, 2, 1);
        assert_eq!((w.out_height(), w.out_width()), (4, 4));
        let w = win(7, 5, 1, 2, 2, 0);
        assert_eq!((w.out_height(), w.out_width()), (3, 2));
    }

    #[test]
    fn im2col_copies_windows_with_zero_padding() {
        // A 2x2 single-channel image, 2x2 windows, padding 1: 3x3 outputs.
        let x = [1.0, 2.0, 3.0, 4.0];
        let w = win(2, 2, 1, 2, 1, 1);
        let cols = im2col(&x, &w);
        assert_eq!(cols.len(), 9 * 4);
        assert_eq!(&cols[..4], &[0.0, 0.0, 0.0, 1.0], "top-left window");
        assert_eq!(&cols[16..20], &[1.0, 2.0, 3.0, 4.0], "centre window");
        assert_eq!(&cols[32..], &[4.0, 0.0, 0.0, 0.0], "bottom-right window");
    }

    #[test]
    fn col2im_is_the_adjoint_of_im2col() {
        // <im2col(x), c> == <x, col2im(c)> for any x and c.
        let w = Window::square([2, 5, 4, 3], 3, 2, 1);
        let x: Vec<f32> = (0..w.in_rows() * 3)
            .map(|i| (i as f32 * 0.37).sin())
            .collect();
        let c: Vec<f32> = (0..w.out_rows() * w.patch())
            .map(|i| (i as f32 * 0.11).cos())
            .collect();
        let lhs: f64 = im2col(&x, &w)
            .iter()
            .zip(&c)
            .map(|(a, b)| f64::from(a * b))
            .sum();
        let rhs: f64 = x
            .iter()
            .zip(col2im(&c, &w))
            .map(|(a, b)| f64::from(a * b))
            .sum();
        assert!((lhs - rhs).abs() < 1e-3, "{lhs} vs {rhs}");
    }

    #[test]
    fn pooling_by_hand() {
        // 4x4, one channel, 2x2 windows of stride 2.
        let x: Vec<f32> = (0..16).map(|i| i as f32).collect();
        let w = win(4, 4, 1, 2, 2, 0);
        assert_eq!(pool2d(&x, &w, PoolKind::Max), [5.0, 7.0, 13.0, 15.0]);
        assert_eq!(pool2d(&x, &w, PoolKind::Average), [2.5, 4.5, 10.5, 12.5]);
        let dx = pool2d_backward(&[1.0, 2.0, 3.0, 4.0], &x, &w, PoolKind::Max);
        assert_eq!(dx[5], 1.0);
        assert_eq!(dx[15], 4.0);
        assert_eq!(dx.iter().sum::<f32>(), 10.0);
        let dx = pool2d_backward(&[4.0, 0.0, 0.0, 0.0], &x, &w, PoolKind::Average);
        assert_eq!(&dx[..2], &[1.0, 1.0]);
        assert_eq!(&dx[4..6], &[1.0, 1.0]);
    }

    #[test]
    fn average_pooling_does_not_count_padding() {
        let x = [2.0, 4.0, 6.0, 8.0];
        let w = win(2, 2, 1, 3, 1, 1);
        assert_eq!(pool2d(&x, &w, PoolKind::Average), [5.0; 4]);
    }

    #[test]
    fn cross_entropy_by_hand_and_a_bad_label() {
        let (loss, grad) = softmax_cross_entropy(&[0.0, 0.0, 1.0, 3.0], &[1.0, 0.0], 2).unwrap();
        let expected = 2f64.ln() + (1.0 + (-2f64).exp()).ln() + 2.0;
        assert!((loss - expected).abs() < 1e-5, "{loss} vs {expected}");
        assert!((grad[0] - 0.25).abs() < 1e-6 && (grad[1] + 0.25).abs() < 1e-6);
        assert!(softmax_cross_entropy(&[0.0, 0.0], &[2.0], 2).is_err());
        assert!(softmax_cross_entropy(&[0.0, 0.0], &[0.5], 2).is_err());
    }

    #[test]
    fn columns_concatenate_and_slice_back() {
        let a = [1.0, 2.0, 3.0, 4.0]; // [2, 2]
        let b = [5.0, 6.0]; // [2, 1]
        let joined = concat_cols(&[(&a, 2), (&b, 1)], 2);
        assert_eq!(joined, [1.0, 2.0, 5.0, 3.0, 4.0, 6.0]);
        assert_eq!(slice_cols(&joined, 3, 2, 1), b);
        assert_eq!(slice_cols(&joined, 3, 0, 2), a);
    }
}
