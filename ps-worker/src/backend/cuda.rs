//! The CUDA backend: the [`Backend`] ops as custom kernels launched with cudarc.
//!
//! Kernel sources live in `ps-worker/kernels/*.cu` and are compiled once per
//! backend with NVRTC. cudarc loads `libcuda` and `libnvrtc` at run time, so
//! this module builds on machines with no CUDA toolkit; [`CudaBackend::new`]
//! checks for the libraries and the device first and returns
//! [`BackendError::Unavailable`] with one clear message instead of letting
//! cudarc panic. Host-device copies are whole tensors (one per pulled table,
//! one per gradient), never per row.
//!
//! This file holds the tensors, the backend's construction and memory, the
//! row copies and the [`Backend`] impl; the impl calls the ops of the
//! submodules, one per group of kernels: `kernels` (the program and the
//! probes), `dense`, `sparse`, `mixture`, `norm_loss`, `image` and
//! `attention_ops`.
#![allow(unsafe_code)] // kernel launches and the library probes are `unsafe` in cudarc

use std::sync::Arc;

use cudarc::driver::{
    CudaContext, CudaSlice, CudaStream, DeviceRepr, LaunchConfig, ValidAsZeroBits,
};

use super::{
    Activation, Backend, BackendError, BatchNormMode, BatchNormSaved, Dropout, PoolKind, Pooling,
    SparsePlan, Window, check_plan_rows, check_same_shape, shape_error,
};

#[path = "cuda_attention.rs"]
mod attention_ops;
#[path = "cuda_dense.rs"]
mod dense;
#[path = "cuda_image.rs"]
mod image;
#[path = "cuda_kernels.rs"]
mod kernels;
#[path = "cuda_mixture.rs"]
mod mixture;
#[path = "cuda_norm_loss.rs"]
mod norm_loss;
#[path = "cuda_sparse.rs"]
mod sparse;

pub use kernels::{Availability, KERNEL_NAMES, availability, compile_kernels, nvrtc_present};
use kernels::{Kernels, kernels_ptx};

const THREADS: u32 = 256;

/// A row-major `[rows, cols]` f32 matrix in device memory.
#[derive(Debug)]
pub struct CudaTensor {
    buf: CudaSlice<f32>,
    rows: usize,
    cols: usize,
}

impl CudaTensor {
    fn len(&self) -> usize {
        self.rows * self.cols
    }
}

/// A [`SparsePlan`] in device memory.
#[derive(Debug)]
pub struct CudaPlan {
    examples: usize,
    fields: usize,
    unique: usize,
    entry_row: CudaSlice<u32>,
    entry_value: CudaSlice<f32>,
    segment_offsets: CudaSlice<u32>,
    row_entry_segment: CudaSlice<u32>,
    row_entry_value: CudaSlice<f32>,
    chunks: usize,
    chunk_offsets: CudaSlice<u32>,
    row_chunks: CudaSlice<u32>,
    chunk_row: CudaSlice<u32>,
    multi_chunk_rows: usize,
    multi_rows: CudaSlice<u32>,
}

/// Compute on one CUDA device.
pub struct CudaBackend {
    name: String,
    stream: Arc<CudaStream>,
    k: Kernels,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBackend")
            .field("name", &self.name)
            .finish()
    }
}

fn device_error(e: impl std::fmt::Display) -> BackendError {
    BackendError::Device(e.to_string())
}

fn blocks(n: usize) -> u32 {
    n.div_ceil(THREADS as usize).max(1) as u32
}

fn linear(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks(n), 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn int(n: usize, what: &'static str) -> Result<i32, BackendError> {
    i32::try_from(n).map_err(|_| shape_error(what, format!("{n} does not fit in i32")))
}

impl CudaBackend {
    /// Opens device `ordinal` and compiles the kernels, or explains why not.
    pub fn new(ordinal: usize) -> Result<CudaBackend, BackendError> {
        let count = match availability()? {
            Availability::NoDriver => {
                return Err(BackendError::Unavailable(format!(
                    "cuda:{ordinal}: no CUDA driver found (libcuda.so could not be loaded); use device = \"cpu\""
                )));
            }
            Availability::NoDevice => 0,
            Availability::Devices(n) => n,
        };
        if ordinal >= count {
            return Err(BackendError::Unavailable(format!(
                "cuda:{ordinal}: no such CUDA device ({count} found); use device = \"cpu\""
            )));
        }
        if !nvrtc_present() {
            return Err(BackendError::Unavailable(format!(
                "cuda:{ordinal}: the CUDA runtime compiler libnvrtc.so (CUDA 13) could not be loaded; add the CUDA toolkit's lib64 to LD_LIBRARY_PATH or use device = \"cpu\""
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(device_error)?;
        let name = format!("cuda:{ordinal} ({})", ctx.name().map_err(device_error)?);
        let ptx = kernels_ptx()?;
        let module = ctx.load_module(ptx).map_err(device_error)?;
        let k = Kernels::load(&module).map_err(device_error)?;
        Ok(CudaBackend {
            name,
            stream: ctx.default_stream(),
            k,
        })
    }

    /// The stream every op runs on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Waits for every queued op.
    pub fn synchronize(&self) -> Result<(), BackendError> {
        self.stream.synchronize().map_err(device_error)
    }

    /// Measured device-to-device copy bandwidth in bytes per second (bytes
    /// read plus bytes written), copying a `bytes`-sized buffer `iters` times:
    /// the ceiling the gather and scatter kernels are compared with.
    pub fn copy_bandwidth(&self, bytes: usize, iters: usize) -> Result<f64, BackendError> {
        let n = (bytes / 4).max(1);
        let src = self.stream.alloc_zeros::<f32>(n).map_err(device_error)?;
        let mut dst = self.stream.alloc_zeros::<f32>(n).map_err(device_error)?;
        self.stream
            .memcpy_dtod(&src, &mut dst)
            .map_err(device_error)?;
        self.synchronize()?;
        let started = std::time::Instant::now();
        for _ in 0..iters {
            self.stream
                .memcpy_dtod(&src, &mut dst)
                .map_err(device_error)?;
        }
        self.synchronize()?;
        let seconds = started.elapsed().as_secs_f64().max(1e-12);
        Ok((2 * n * 4 * iters) as f64 / seconds)
    }

    fn zeros(&self, rows: usize, cols: usize) -> Result<CudaTensor, BackendError> {
        let buf = self
            .stream
            .alloc_zeros::<f32>((rows * cols).max(1))
            .map_err(device_error)?;
        Ok(CudaTensor { buf, rows, cols })
    }

    /// `data` on the device; an empty slice gets a one-element buffer (CUDA
    /// allocations of zero bytes fail), never read.
    fn upload_slice<T: DeviceRepr + ValidAsZeroBits>(
        &self,
        data: &[T],
    ) -> Result<CudaSlice<T>, BackendError> {
        if data.is_empty() {
            return self.stream.alloc_zeros::<T>(1).map_err(device_error);
        }
        self.stream.clone_htod(data).map_err(device_error)
    }

    /// A tensor whose every element the caller's kernel writes.
    fn uninit(&self, rows: usize, cols: usize) -> Result<CudaTensor, BackendError> {
        // SAFETY: callers launch a kernel that writes all rows * cols
        // elements before anything reads them.
        let buf =
            unsafe { self.stream.alloc::<f32>((rows * cols).max(1)) }.map_err(device_error)?;
        Ok(CudaTensor { buf, rows, cols })
    }

    fn same_shape(op: &'static str, a: &CudaTensor, b: &CudaTensor) -> Result<(), BackendError> {
        check_same_shape(op, [a.rows, a.cols], [b.rows, b.cols])
    }
}

impl Backend for CudaBackend {
    type Tensor = CudaTensor;
    type Plan = CudaPlan;

    fn name(&self) -> String {
        self.name.clone()
    }

    fn upload(&self, data: &[f32], rows: usize, cols: usize) -> Result<CudaTensor, BackendError> {
        if data.len() != rows * cols {
            return Err(shape_error(
                "upload",
                format!("{} values as [{rows}, {cols}]", data.len()),
            ));
        }
        if data.is_empty() {
            return self.zeros(rows, cols);
        }
        let buf = self.stream.clone_htod(data).map_err(device_error)?;
        Ok(CudaTensor { buf, rows, cols })
    }

    fn download(&self, t: &CudaTensor) -> Result<Vec<f32>, BackendError> {
        if t.len() == 0 {
            return Ok(Vec::new());
        }
        self.stream
            .clone_dtoh(&t.buf.slice(0..t.len()))
            .map_err(device_error)
    }

    fn shape(&self, t: &CudaTensor) -> [usize; 2] {
        [t.rows, t.cols]
    }

    fn reshape(&self, t: CudaTensor, rows: usize, cols: usize) -> Result<CudaTensor, BackendError> {
        if t.len() != rows * cols {
            return Err(shape_error(
                "reshape",
                format!("[{}, {}] to [{rows}, {cols}]", t.rows, t.cols),
            ));
        }
        Ok(CudaTensor {
            buf: t.buf,
            rows,
            cols,
        })
    }

    fn upload_plan(&self, plan: &Arc<SparsePlan>) -> Result<CudaPlan, BackendError> {
        let entry_value = self.upload_slice(&plan.entry_value)?;
        // Built ahead by the prefetcher of a CUDA worker; here otherwise.
        let by_row = plan.by_row();
        Ok(CudaPlan {
            examples: plan.examples,
            fields: plan.fields,
            unique: plan.unique,
            entry_row: self.upload_slice(&plan.entry_row)?,
            entry_value,
            segment_offsets: self.upload_slice(&plan.segment_offsets)?,
            row_entry_segment: self.upload_slice(&by_row.row_entry_segment)?,
            row_entry_value: self.upload_slice(&by_row.row_entry_value)?,
            chunks: by_row.chunks(),
            chunk_offsets: self.upload_slice(&by_row.chunk_offsets)?,
            row_chunks: self.upload_slice(&by_row.row_chunks)?,
            chunk_row: self.upload_slice(&by_row.chunk_row)?,
            multi_chunk_rows: by_row.multi_chunk_rows.len(),
            multi_rows: self.upload_slice(&by_row.multi_chunk_rows)?,
        })
    }

    fn gather_pool(
        &self,
        rows: &CudaTensor,
        plan: &CudaPlan,
        pooling: Pooling,
    ) -> Result<CudaTensor, BackendError> {
        self.gather_pool_op(rows, plan, pooling)
    }

    fn scatter_pool(
        &self,
        grad: &CudaTensor,
        plan: &CudaPlan,
        pooling: Pooling,
    ) -> Result<CudaTensor, BackendError> {
        self.scatter_pool_op(grad, plan, pooling)
    }

    fn fm_forward(
        &self,
        rows: &CudaTensor,
        plan: &CudaPlan,
    ) -> Result<(CudaTensor, CudaTensor), BackendError> {
        self.fm_forward_op(rows, plan)
    }

    fn fm_pairs(
        &self,
        rows: &CudaTensor,
        plan: &CudaPlan,
    ) -> Result<(CudaTensor, CudaTensor), BackendError> {
        self.fm_pairs_op(rows, plan)
    }

    fn fm_backward(
        &self,
        grad: &CudaTensor,
        sums: &CudaTensor,
        rows: &CudaTensor,
        plan: &CudaPlan,
    ) -> Result<CudaTensor, BackendError> {
        self.fm_backward_op(grad, sums, rows, plan)
    }

    fn matmul(
        &self,
        a: &CudaTensor,
        b: &CudaTensor,
        transpose_a: bool,
        transpose_b: bool,
    ) -> Result<CudaTensor, BackendError> {
        self.matmul_op(a, b, transpose_a, transpose_b)
    }

    fn softmax_rows(&self, x: &CudaTensor) -> Result<CudaTensor, BackendError> {
        self.softmax_rows_op(x)
    }

    fn softmax_rows_backward(
        &self,
        grad: &CudaTensor,
        y: &CudaTensor,
    ) -> Result<CudaTensor, BackendError> {
        self.softmax_rows_backward_op(grad, y)
    }

    fn stack_rows(&self, parts: &[&CudaTensor]) -> Result<CudaTensor, BackendError> {
        let cols = parts.first().map_or(0, |p| p.cols);
        if let Some(p) = parts.iter().find(|p| p.cols != cols) {
            return Err(shape_error(
                "stack_rows",
                format!("{} columns vs {cols}", p.cols),
            ));
        }
        let rows: usize = parts.iter().map(|p| p.rows).sum();
        if rows * cols == 0 {
            return self.zeros(rows, cols);
        }
        // Every element is copied in below.
        let mut out = self.uninit(rows, cols)?;
        let mut at = 0;
        for p in parts {
            let len = p.rows * p.cols;
            if len > 0 {
                let mut dst = out.buf.slice_mut(at..at + len);
                self.stream
                    .memcpy_dtod(&p.buf.slice(0..len), &mut dst)
                    .map_err(device_error)?;
            }
            at += len;
        }
        Ok(out)
    }

    fn slice_rows(
        &self,
        t: &CudaTensor,
        start: usize,
        count: usize,
    ) -> Result<CudaTensor, BackendError> {
        if start + count > t.rows {
            return Err(shape_error(
                "slice_rows",
                format!("rows {start}..{} of {}", start + count, t.rows),
            ));
        }
        let len = count * t.cols;
        if len == 0 {
            return self.zeros(count, t.cols);
        }
        let mut out = self.uninit(count, t.cols)?;
        {
            let from = start * t.cols;
            let mut dst = out.buf.slice_mut(0..len);
            self.stream
                .memcpy_dtod(&t.buf.slice(from..from + len), &mut dst)
                .map_err(device_error)?;
        }
        Ok(out)
    }

    fn mix(&self, stacked: &CudaTensor, gates: &CudaTensor) -> Result<CudaTensor, BackendError> {
        self.mix_op(stacked, gates)
    }

    fn mix_backward(
        &self,
        grad: &CudaTensor,
        stacked: &CudaTensor,
        gates: &CudaTensor,
    ) -> Result<(CudaTensor, CudaTensor), BackendError> {
        self.mix_backward_op(grad, stacked, gates)
    }

    fn copy(&self, t: &CudaTensor) -> Result<CudaTensor, BackendError> {
        let buf = self.stream.clone_dtod(&t.buf).map_err(device_error)?;
        Ok(CudaTensor {
            buf,
            rows: t.rows,
            cols: t.cols,
        })
    }

    fn scale(&self, x: &CudaTensor, alpha: f32) -> Result<CudaTensor, BackendError> {
        self.scale_op(x, alpha)
    }

    fn add(&self, a: &CudaTensor, b: &CudaTensor) -> Result<CudaTensor, BackendError> {
        self.add_op(a, b)
    }

    fn bias_act(
        &self,
        x: &CudaTensor,
        bias: &CudaTensor,
        act: Activation,
        dropout: Option<Dropout>,
    ) -> Result<CudaTensor, BackendError> {
        self.bias_act_op(x, bias, act, dropout)
    }

    fn bias_act_backward(
        &self,
        grad: &CudaTensor,
        y: &CudaTensor,
        act: Activation,
        dropout: Option<Dropout>,
    ) -> Result<(CudaTensor, CudaTensor), BackendError> {
        self.bias_act_backward_op(grad, y, act, dropout)
    }

    fn batch_norm(
        &self,
        x: &CudaTensor,
        params: &CudaTensor,
        mode: BatchNormMode,
        eps: f32,
    ) -> Result<(CudaTensor, CudaTensor, BatchNormSaved<CudaTensor>), BackendError> {
        self.batch_norm_op(x, params, mode, eps)
    }

    fn batch_norm_backward(
        &self,
        grad: &CudaTensor,
        params: &CudaTensor,
        saved: &BatchNormSaved<CudaTensor>,
    ) -> Result<(CudaTensor, CudaTensor), BackendError> {
        self.batch_norm_backward_op(grad, params, saved)
    }

    fn bce_with_logits(
        &self,
        logits: &CudaTensor,
        labels: &CudaTensor,
    ) -> Result<(f64, CudaTensor), BackendError> {
        self.bce_with_logits_op(logits, labels)
    }

    fn sigmoid(&self, x: &CudaTensor) -> Result<CudaTensor, BackendError> {
        self.sigmoid_op(x)
    }

    fn im2col(&self, x: &CudaTensor, win: &Window) -> Result<CudaTensor, BackendError> {
        self.im2col_op(x, win)
    }

    fn col2im(&self, cols: &CudaTensor, win: &Window) -> Result<CudaTensor, BackendError> {
        self.col2im_op(cols, win)
    }

    fn pool2d(
        &self,
        x: &CudaTensor,
        win: &Window,
        kind: PoolKind,
    ) -> Result<CudaTensor, BackendError> {
        self.pool2d_op(x, win, kind)
    }

    fn pool2d_backward(
        &self,
        grad: &CudaTensor,
        x: &CudaTensor,
        win: &Window,
        kind: PoolKind,
    ) -> Result<CudaTensor, BackendError> {
        self.pool2d_backward_op(grad, x, win, kind)
    }

    fn concat_cols(&self, parts: &[&CudaTensor]) -> Result<CudaTensor, BackendError> {
        self.concat_cols_op(parts)
    }

    fn slice_cols(
        &self,
        t: &CudaTensor,
        start: usize,
        width: usize,
    ) -> Result<CudaTensor, BackendError> {
        self.slice_cols_op(t, start, width)
    }

    fn softmax_cross_entropy(
        &self,
        logits: &CudaTensor,
        labels: &CudaTensor,
    ) -> Result<(f64, CudaTensor), BackendError> {
        self.softmax_cross_entropy_op(logits, labels)
    }

    fn attention(
        &self,
        q: &CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        positions: usize,
        heads: usize,
    ) -> Result<(CudaTensor, CudaTensor), BackendError> {
        self.attention_op([q, k, v], positions, heads)
    }

    fn attention_backward(
        &self,
        grad: &CudaTensor,
        q: &CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        weights: &CudaTensor,
        positions: usize,
        heads: usize,
    ) -> Result<(CudaTensor, CudaTensor, CudaTensor), BackendError> {
        self.attention_backward_op([grad, q, k, v, weights], positions, heads)
    }
}
