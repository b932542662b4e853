//! The image models (`resnet`, `inception`): their forward and backward
//! passes on a compute [`Backend`], over the layers
//! [`ps_common::config::ConvNet`] expands from the job file.
//!
//! Feature maps are NHWC tensors `[n * h * w, c]`. A convolution is
//! `im2col` and a matrix product, then batch norm (per channel: per
//! column), the bias and a ReLU: the MLP's layer with patches for rows.
//! The head is global average pooling, a dense layer and a softmax
//! cross-entropy over the classes.

use std::collections::BTreeMap;

use ps_common::config::{Body, ConvNet, ConvSpec, ImageConfig, InceptionModule, ResidualBlock};

use super::compute::{head_loss, head_probs};
use super::norm::{Norm, norm_backward, norm_forward};
use super::{Gradients, Layer, Mode, Output, Pulled, TableUse};
use crate::backend::{Activation, Backend, BackendError, PoolKind, Window, shape_error};

/// An image model with its tables resolved among the dense tables.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct ConvModel {
    net: ConvNet,
    image: ImageConfig,
    /// The dense index of each convolution's weight table (bias, then
    /// with batch norm `bn` and `bn_stats` follow).
    tables: BTreeMap<String, usize>,
    /// The dense index of `out.w` (`out.b` follows).
    out: usize,
}

/// Feature maps of a batch: `[n * height * width, channels]`.
struct Maps<T> {
    t: T,
    height: usize,
    width: usize,
    channels: usize,
}

/// What a convolution's backward pass needs.
struct ConvTape<T> {
    layer: Layer,
    win: Window,
    relu: bool,
    weight: T,
    cols: T,
    /// The output (the ReLU's mask).
    output: T,
    norm: Option<Norm<T>>,
}

/// What a block's or module's backward pass needs.
enum BlockTape<T> {
    Residual(Box<ResidualTape<T>>),
    Inception(Box<InceptionTape<T>>),
}

/// What a residual block's backward pass needs.
struct ResidualTape<T> {
    first: ConvTape<T>,
    second: ConvTape<T>,
    projection: Option<ConvTape<T>>,
    /// `relu(second + shortcut)`.
    output: T,
}

/// What an Inception module's backward pass needs.
struct InceptionTape<T> {
    one: ConvTape<T>,
    three: [ConvTape<T>; 2],
    five: [ConvTape<T>; 3],
    pool: ConvTape<T>,
    /// The module's input and its 3x3 pooling window.
    input: Maps<T>,
    pool_win: Window,
    widths: [usize; 4],
    /// With downsampling: the concatenation and the 2x2 window.
    concat: Option<(T, Window)>,
}

/// A layer's output maps and what its backward pass needs.
type Forward<T, Tape> = Result<(Maps<T>, Tape), BackendError>;

impl ConvModel {
    /// The model over `net`'s tables, found by name in `dense`.
    pub(super) fn new(net: ConvNet, image: ImageConfig, dense: &[TableUse]) -> ConvModel {
        let index = |name: &str| dense.iter().position(|t| t.name == name).unwrap_or(0);
        let tables = net
            .convs()
            .iter()
            .map(|c| (c.name.clone(), index(&format!("{}.w", c.name))))
            .collect();
        let out = index(&format!("{}.out.w", net.name));
        ConvModel {
            net,
            image,
            tables,
            out,
        }
    }

    /// Classes of the softmax.
    pub(super) fn classes(&self) -> usize {
        self.net.classes as usize
    }

    /// Forward pass, and in training the backward pass.
    pub(super) fn compute<B: Backend>(
        &self,
        backend: &B,
        dense: &[TableUse],
        pulled: &Pulled,
        mode: Mode,
    ) -> Result<Output, BackendError> {
        let n = pulled.plan.examples;
        let (h, w, c) = (
            self.image.height as usize,
            self.image.width as usize,
            self.image.channels as usize,
        );
        if pulled.inputs.len() != n * h * w * c || pulled.labels.len() != n {
            return Err(shape_error(
                "images",
                format!(
                    "{} pixel values and {} labels for {n} images of {h} x {w} x {c}",
                    pulled.inputs.len(),
                    pulled.labels.len()
                ),
            ));
        }
        let net = Net {
            model: self,
            backend,
            dense,
            pulled,
            mode,
            n,
        };
        let x = Maps {
            t: backend.upload(&pulled.inputs, n * h * w, c)?,
            height: h,
            width: w,
            channels: c,
        };
        let (stem, stem_tape) = net.conv(&self.net.stem, &x)?;
        let mut maps = stem;
        let mut tapes = Vec::new();
        match &self.net.body {
            Body::Resnet(blocks) => {
                for block in blocks {
                    let (next, tape) = net.residual(block, &maps)?;
                    maps = next;
                    tapes.push(tape);
                }
            }
            Body::Inception(modules) => {
                for module in modules {
                    let (next, tape) = net.inception(module, maps)?;
                    maps = next;
                    tapes.push(tape);
                }
            }
        }
        // Head: global average pooling, the output layer, the softmax.
        let gap_win = Window {
            kernel: [maps.height, maps.width],
            ..Window::square([n, maps.height, maps.width, maps.channels], 1, 1, 0)
        };
        let pooled = backend.pool2d(&maps.t, &gap_win, PoolKind::Average)?;
        let out_w = net.upload(self.out)?;
        let out_b = net.upload(self.out + 1)?;
        let logits = backend.bias_act(
            &backend.matmul(&pooled, &out_w, false, false)?,
            &out_b,
            Activation::Identity,
            None,
        )?;
        let (loss_sum, dlogits) = head_loss(backend, &logits, &pulled.labels)?;
        if mode == Mode::Eval {
            return Ok(Output {
                loss_sum,
                probs: head_probs(backend, &logits)?,
                grads: None,
            });
        }
        let mut grads: Vec<Vec<f32>> = dense.iter().map(|_| Vec::new()).collect();
        let (dz, dbias) =
            backend.bias_act_backward(&dlogits, &logits, Activation::Identity, None)?;
        grads[self.out + 1] = backend.download_owned(dbias)?;
        grads[self.out] = backend.download_owned(backend.matmul(&pooled, &dz, true, false)?)?;
        let dpooled = backend.matmul(&dz, &out_w, false, true)?;
        let mut d = backend.pool2d_backward(&dpooled, &maps.t, &gap_win, PoolKind::Average)?;
        for tape in tapes.into_iter().rev() {
            d = net.block_backward(tape, d, &mut grads)?;
        }
        net.conv_backward(stem_tape, d, &mut grads)?;
        Ok(Output {
            loss_sum,
            probs: Vec::new(),
            grads: Some(Gradients {
                sparse: Vec::new(),
                dense: grads,
            }),
        })
    }
}

/// One pass of a model over one batch.
struct Net<'a, B> {
    model: &'a ConvModel,
    backend: &'a B,
    dense: &'a [TableUse],
    pulled: &'a Pulled,
    mode: Mode,
    n: usize,
}

impl<B: Backend> Net<'_, B> {
    fn upload(&self, i: usize) -> Result<B::Tensor, BackendError> {
        let t = &self.dense[i];
        self.backend
            .upload(&self.pulled.dense[i], t.rows.unwrap_or(1), t.dim)
    }

    /// Convolution, batch norm, bias, ReLU.
    fn conv(
        &self,
        spec: &ConvSpec,
        x: &Maps<B::Tensor>,
    ) -> Forward<B::Tensor, ConvTape<B::Tensor>> {
        let backend = self.backend;
        let (k, stride, padding) = (
            spec.kernel as usize,
            spec.stride as usize,
            spec.padding as usize,
        );
        let win = Window::square([self.n, x.height, x.width, x.channels], k, stride, padding);
        let dense = self.model.tables.get(&spec.name).copied().unwrap_or(0);
        let layer = Layer {
            input: win.patch(),
            output: spec.output as usize,
            dense,
        };
        let weight = self.upload(dense)?;
        let (pre, cols) = backend.conv2d(&x.t, &weight, &win)?;
        let (pre, norm) = if self.model.net.batch_norm {
            let (y, norm) = norm_forward(backend, pre, self.pulled, &layer, self.mode)?;
            (y, Some(norm))
        } else {
            (pre, None)
        };
        let act = if spec.relu {
            Activation::Relu
        } else {
            Activation::Identity
        };
        let y = backend.bias_act(&pre, &self.upload(dense + 1)?, act, None)?;
        let tape = ConvTape {
            layer,
            win,
            relu: spec.relu,
            weight,
            cols,
            output: backend.copy(&y)?,
            norm,
        };
        let maps = Maps {
            t: y,
            height: win.out_height(),
            width: win.out_width(),
            channels: spec.output as usize,
        };
        Ok((maps, tape))
    }

    /// Backward of [`Net::conv`]: fills its tables' gradients, returns
    /// `d input`.
    fn conv_backward(
        &self,
        tape: ConvTape<B::Tensor>,
        grad: B::Tensor,
        grads: &mut [Vec<f32>],
    ) -> Result<B::Tensor, BackendError> {
        let backend = self.backend;
        let act = if tape.relu {
            Activation::Relu
        } else {
            Activation::Identity
        };
        let (dpre, dbias) = backend.bias_act_backward(&grad, &tape.output, act, None)?;
        let layer = &tape.layer;
        grads[layer.dense + 1] = backend.download_owned(dbias)?;
        let dlin = match &tape.norm {
            Some(norm) => norm_backward(
                backend,
                dpre,
                norm,
                self.pulled,
                layer,
                self.model.net.bn_momentum,
                grads,
            )?,
            None => dpre,
        };
        let (dx, dweight) = backend.conv2d_backward(&dlin, &tape.cols, &tape.weight, &tape.win)?;
        grads[layer.dense] = backend.download_owned(dweight)?;
        Ok(dx)
    }

    /// `relu(second(first(x)) + shortcut(x))`.
    fn residual(
        &self,
        block: &ResidualBlock,
        x: &Maps<B::Tensor>,
    ) -> Forward<B::Tensor, BlockTape<B::Tensor>> {
        let backend = self.backend;
        let (a, first) = self.conv(&block.first, x)?;
        let (b, second) = self.conv(&block.second, &a)?;
        let (sum, projection) = match &block.projection {
            Some(spec) => {
                let (s, tape) = self.conv(spec, x)?;
                (backend.add(&b.t, &s.t)?, Some(tape))
            }
            None => (backend.add(&b.t, &x.t)?, None),
        };
        let zeros = backend.upload(&vec![0.0; b.channels], 1, b.channels)?;
        let y = backend.bias_act(&sum, &zeros, Activation::Relu, None)?;
        let tape = BlockTape::Residual(Box::new(ResidualTape {
            first,
            second,
            projection,
            output: backend.copy(&y)?,
        }));
        Ok((Maps { t: y, ..b }, tape))
    }

    /// The four branches, concatenated, then the optional downsampling.
    fn inception(
        &self,
        module: &InceptionModule,
        x: Maps<B::Tensor>,
    ) -> Forward<B::Tensor, BlockTape<B::Tensor>> {
        let backend = self.backend;
        let (o1, one) = self.conv(&module.one, &x)?;
        let (r3, three_a) = self.conv(&module.three[0], &x)?;
        let (o3, three_b) = self.conv(&module.three[1], &r3)?;
        let (r5, five_a) = self.conv(&module.five[0], &x)?;
        let (m5, five_b) = self.conv(&module.five[1], &r5)?;
        let (o5, five_c) = self.conv(&module.five[2], &m5)?;
        let pool_win = Window::square([self.n, x.height, x.width, x.channels], 3, 1, 1);
        let pooled = Maps {
            t: backend.pool2d(&x.t, &pool_win, PoolKind::Max)?,
            height: x.height,
            width: x.width,
            channels: x.channels,
        };
        let (op, pool) = self.conv(&module.pool, &pooled)?;
        let widths = [o1.channels, o3.channels, o5.channels, op.channels];
        let concat = backend.concat_cols(&[&o1.t, &o3.t, &o5.t, &op.t])?;
        let channels = widths.iter().sum();
        let (height, width) = (o1.height, o1.width);
        let (t, concat, height, width) = if module.downsample && height >= 2 && width >= 2 {
            let win = Window::square([self.n, height, width, channels], 2, 2, 0);
            let y = backend.pool2d(&concat, &win, PoolKind::Max)?;
            (y, Some((concat, win)), win.out_height(), win.out_width())
        } else {
            (concat, None, height, width)
        };
        let tape = BlockTape::Inception(Box::new(InceptionTape {
            one,
            three: [three_a, three_b],
            five: [five_a, five_b, five_c],
            pool,
            input: x,
            pool_win,
            widths,
            concat,
        }));
        let maps = Maps {
            t,
            height,
            width,
            channels,
        };
        Ok((maps, tape))
    }

    /// Backward of a block or module: `d input`.
    fn block_backward(
        &self,
        tape: BlockTape<B::Tensor>,
        grad: B::Tensor,
        grads: &mut [Vec<f32>],
    ) -> Result<B::Tensor, BackendError> {
        let backend = self.backend;
        match tape {
            BlockTape::Residual(tape) => {
                let ResidualTape {
                    first,
                    second,
                    projection,
                    output,
                } = *tape;
                let (dsum, _) =
                    backend.bias_act_backward(&grad, &output, Activation::Relu, None)?;
                let dshortcut = match projection {
                    Some(tape) => self.conv_backward(tape, backend.copy(&dsum)?, grads)?,
                    None => backend.copy(&dsum)?,
                };
                let da = self.conv_backward(second, dsum, grads)?;
                let dx = self.conv_backward(first, da, grads)?;
                backend.add(&dx, &dshortcut)
            }
            BlockTape::Inception(tape) => {
                let InceptionTape {
                    one,
                    three,
                    five,
                    pool,
                    input,
                    pool_win,
                    widths,
                    concat,
                } = *tape;
                let dconcat = match concat {
                    Some((concat, win)) => {
                        backend.pool2d_backward(&grad, &concat, &win, PoolKind::Max)?
                    }
                    None => grad,
                };
                let mut parts = Vec::with_capacity(4);
                let mut at = 0;
                for w in widths {
                    parts.push(backend.slice_cols(&dconcat, at, w)?);
                    at += w;
                }
                let mut parts = parts.into_iter();
                let mut next = || {
                    parts
                        .next()
                        .ok_or_else(|| shape_error("inception", "a branch is missing".into()))
                };
                let mut dx = self.conv_backward(one, next()?, grads)?;
                let [three_a, three_b] = three;
                let d = self.conv_backward(three_b, next()?, grads)?;
                dx = backend.add(&dx, &self.conv_backward(three_a, d, grads)?)?;
                let [five_a, five_b, five_c] = five;
                let d = self.conv_backward(five_c, next()?, grads)?;
                let d = self.conv_backward(five_b, d, grads)?;
                dx = backend.add(&dx, &self.conv_backward(five_a, d, grads)?)?;
                let dpooled = self.conv_backward(pool, next()?, grads)?;
                let d = backend.pool2d_backward(&dpooled, &input.t, &pool_win, PoolKind::Max)?;
                backend.add(&dx, &d)
            }
        }
    }
}
