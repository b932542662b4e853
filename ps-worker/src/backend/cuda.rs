//! The CUDA backend: the [`Backend`] ops as custom kernels launched with cudarc.
//!
//! Kernel sources live in `ps-worker/kernels/*.cu` and are compiled once per
//! backend with NVRTC. cudarc loads `libcuda` and `libnvrtc` at run time, so
//! this module builds on machines with no CUDA toolkit; [`CudaBackend::new`]
//! checks for the libraries and the device first and returns
//! [`BackendError::Unavailable`] with one clear message instead of letting
//! cudarc panic. Host-device copies are whole tensors (one per pulled table,
//! one per gradient), never per row.
#![allow(unsafe_code)] // kernel launches and the library probes are `unsafe` in cudarc

use std::sync::Arc;

use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DeviceRepr, DriverError,
    LaunchConfig, PushKernelArg, ValidAsZeroBits,
};

use super::{
    Activation, Backend, BackendError, BatchNormMode, BatchNormSaved, Dropout, PoolKind, Pooling,
    SparsePlan, Window, check_plan_rows, check_same_shape, shape_error,
};

/// All kernel sources, concatenated into one NVRTC program.
const KERNELS: [&str; 6] = [
    include_str!("../../kernels/common.cuh"),
    include_str!("../../kernels/sparse.cu"),
    include_str!("../../kernels/dense.cu"),
    include_str!("../../kernels/norm_loss.cu"),
    include_str!("../../kernels/image.cu"),
    include_str!("../../kernels/attention.cu"),
];

#[path = "cuda_attention.rs"]
mod attention_ops;
#[path = "cuda_image.rs"]
mod image;

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

struct Kernels {
    gather_pool: CudaFunction,
    gather_pool4: CudaFunction,
    scatter_chunks: CudaFunction,
    scatter_chunks4: CudaFunction,
    reduce_chunks: CudaFunction,
    fm_sums: CudaFunction,
    fm_reduce: CudaFunction,
    fm_backward_chunks: CudaFunction,
    matmul: CudaFunction,
    add: CudaFunction,
    scale: CudaFunction,
    softmax_rows: CudaFunction,
    softmax_rows_backward: CudaFunction,
    mix: CudaFunction,
    mix_backward_experts: CudaFunction,
    mix_backward_gates: CudaFunction,
    bias_act: CudaFunction,
    bias_act_backward: CudaFunction,
    col_sums: CudaFunction,
    col_dots: CudaFunction,
    bn_stats: CudaFunction,
    bn_apply: CudaFunction,
    bn_backward: CudaFunction,
    bce_with_logits: CudaFunction,
    sigmoid: CudaFunction,
    im2col: CudaFunction,
    col2im: CudaFunction,
    pool2d: CudaFunction,
    pool2d_backward: CudaFunction,
    copy_cols: CudaFunction,
    softmax_xent: CudaFunction,
    attention_forward: CudaFunction,
    attention_backward_queries: CudaFunction,
    attention_backward_keys: CudaFunction,
}

impl Kernels {
    fn load(module: &Arc<CudaModule>) -> Result<Kernels, DriverError> {
        let f = |name: &str| module.load_function(name);
        Ok(Kernels {
            gather_pool: f("gather_pool")?,
            gather_pool4: f("gather_pool4")?,
            scatter_chunks: f("scatter_chunks")?,
            scatter_chunks4: f("scatter_chunks4")?,
            reduce_chunks: f("reduce_chunks")?,
            fm_sums: f("fm_sums")?,
            fm_reduce: f("fm_reduce")?,
            fm_backward_chunks: f("fm_backward_chunks")?,
            matmul: f("matmul")?,
            add: f("add")?,
            scale: f("scale")?,
            softmax_rows: f("softmax_rows")?,
            softmax_rows_backward: f("softmax_rows_backward")?,
            mix: f("mix")?,
            mix_backward_experts: f("mix_backward_experts")?,
            mix_backward_gates: f("mix_backward_gates")?,
            bias_act: f("bias_act")?,
            bias_act_backward: f("bias_act_backward")?,
            col_sums: f("col_sums")?,
            col_dots: f("col_dots")?,
            bn_stats: f("bn_stats")?,
            bn_apply: f("bn_apply")?,
            bn_backward: f("bn_backward")?,
            bce_with_logits: f("bce_with_logits")?,
            sigmoid: f("sigmoid")?,
            im2col: f("im2col")?,
            col2im: f("col2im")?,
            pool2d: f("pool2d")?,
            pool2d_backward: f("pool2d_backward")?,
            copy_cols: f("copy_cols")?,
            softmax_xent: f("softmax_xent")?,
            attention_forward: f("attention_forward")?,
            attention_backward_queries: f("attention_backward_queries")?,
            attention_backward_keys: f("attention_backward_keys")?,
        })
    }
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

/// What this machine has for the CUDA backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Availability {
    /// The driver library (`libcuda.so`) cannot be loaded: no GPU stack.
    NoDriver,
    /// The driver loads and reports no device.
    NoDevice,
    /// The driver reports this many devices.
    Devices(usize),
}

impl Availability {
    /// Why a test of the CUDA backend cannot run here, if it cannot: no
    /// driver or no device. Everything else (NVRTC missing, a kernel that
    /// does not compile or load) is a failure to report, not a skip.
    pub fn skip_reason(self) -> Option<&'static str> {
        match self {
            Availability::NoDriver => Some("no CUDA driver"),
            Availability::NoDevice => Some("no CUDA device"),
            Availability::Devices(_) => None,
        }
    }
}

/// Whether a CUDA driver and devices are present. Never panics; a driver
/// that loads but cannot count its devices is an error.
pub fn availability() -> Result<Availability, BackendError> {
    if !driver_present() {
        return Ok(Availability::NoDriver);
    }
    match CudaContext::device_count().map_err(device_error)? {
        n if n <= 0 => Ok(Availability::NoDevice),
        n => Ok(Availability::Devices(n as usize)),
    }
}

/// Whether the CUDA driver library can be loaded. Never panics.
fn driver_present() -> bool {
    // SAFETY: the probe only tries to dlopen the library.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Every kernel function the backend launches.
pub const KERNEL_NAMES: &[&str] = &[
    "gather_pool",
    "gather_pool4",
    "scatter_chunks",
    "scatter_chunks4",
    "reduce_chunks",
    "fm_sums",
    "fm_reduce",
    "fm_backward_chunks",
    "matmul",
    "add",
    "scale",
    "bias_act",
    "bias_act_backward",
    "col_sums",
    "col_dots",
    "bn_stats",
    "bn_apply",
    "bn_backward",
    "bce_with_logits",
    "sigmoid",
    "softmax_rows",
    "softmax_rows_backward",
    "mix",
    "mix_backward_experts",
    "mix_backward_gates",
    "im2col",
    "col2im",
    "pool2d",
    "pool2d_backward",
    "copy_cols",
    "softmax_xent",
    "attention_forward",
    "attention_backward_queries",
    "attention_backward_keys",
];

/// Whether the NVRTC library can be loaded (it needs no GPU). Never panics.
pub fn nvrtc_present() -> bool {
    // SAFETY: the probe only tries to dlopen the library.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// The kernels' PTX, compiled once per process (NVRTC takes about a second;
/// every backend of the process, e.g. one per local worker, loads the same).
fn kernels_ptx() -> Result<cudarc::nvrtc::Ptx, BackendError> {
    static PTX: std::sync::OnceLock<Result<cudarc::nvrtc::Ptx, BackendError>> =
        std::sync::OnceLock::new();
    PTX.get_or_init(compile_kernels).clone()
}

/// Compiles the kernel sources to PTX with NVRTC (no GPU needed).
pub fn compile_kernels() -> Result<cudarc::nvrtc::Ptx, BackendError> {
    if !nvrtc_present() {
        return Err(BackendError::Unavailable(
            "the CUDA runtime compiler libnvrtc.so (CUDA 13) could not be loaded".into(),
        ));
    }
    // No FMA contraction: the kernels then round exactly as the CPU
    // backend does wherever they sum in the same order.
    let options = cudarc::nvrtc::CompileOptions {
        fmad: Some(false),
        ..Default::default()
    };
    cudarc::nvrtc::compile_ptx_with_opts(KERNELS.concat(), options)
        .map_err(|e| BackendError::Device(format!("kernel compilation failed: {e:?}")))
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

    /// Writes the rows with several chunks: the sum of their partials, in
    /// chunk order.
    fn reduce_chunks(
        &self,
        out: &mut CudaTensor,
        partial: &CudaTensor,
        plan: &CudaPlan,
    ) -> Result<(), BackendError> {
        if plan.multi_chunk_rows == 0 {
            return Ok(());
        }
        let (count, dim) = (
            int(plan.multi_chunk_rows, "scatter")?,
            int(partial.cols, "scatter")?,
        );
        let mut b = self.stream.launch_builder(&self.k.reduce_chunks);
        b.arg(&mut out.buf)
            .arg(&partial.buf)
            .arg(&plan.row_chunks)
            .arg(&plan.multi_rows);
        b.arg(&count).arg(&dim);
        // SAFETY: multi_rows holds `count` row ids < unique; row_chunks indexes
        // partial's rows.
        unsafe { b.launch(linear(plan.multi_chunk_rows * partial.cols)) }.map_err(device_error)?;
        Ok(())
    }

    fn check_plan_rows(
        &self,
        op: &'static str,
        rows: &CudaTensor,
        plan: &CudaPlan,
    ) -> Result<(), BackendError> {
        check_plan_rows(op, rows.rows, plan.unique)
    }

    fn same_shape(op: &'static str, a: &CudaTensor, b: &CudaTensor) -> Result<(), BackendError> {
        check_same_shape(op, [a.rows, a.cols], [b.rows, b.cols])
    }
}

fn pooled_rows(plan: &CudaPlan, pooling: Pooling) -> (usize, usize) {
    match pooling {
        Pooling::Example => (plan.examples, plan.fields),
        Pooling::Field => (plan.examples * plan.fields, 1),
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
        Ok(CudaPlan {
            examples: plan.examples,
            fields: plan.fields,
            unique: plan.unique,
            entry_row: self.upload_slice(&plan.entry_row)?,
            entry_value,
            segment_offsets: self.upload_slice(&plan.segment_offsets)?,
            row_entry_segment: self.upload_slice(&plan.row_entry_segment)?,
            row_entry_value: self.upload_slice(&plan.row_entry_value)?,
            chunks: plan.chunks(),
            chunk_offsets: self.upload_slice(&plan.chunk_offsets)?,
            row_chunks: self.upload_slice(&plan.row_chunks)?,
            chunk_row: self.upload_slice(&plan.chunk_row)?,
            multi_chunk_rows: plan.multi_chunk_rows.len(),
            multi_rows: self.upload_slice(&plan.multi_chunk_rows)?,
        })
    }

    fn gather_pool(
        &self,
        rows: &CudaTensor,
        plan: &CudaPlan,
        pooling: Pooling,
    ) -> Result<CudaTensor, BackendError> {
        self.check_plan_rows("gather_pool", rows, plan)?;
        let (out_rows, stride) = pooled_rows(plan, pooling);
        if out_rows * rows.cols == 0 {
            return self.zeros(out_rows, rows.cols);
        }
        let mut out = self.uninit(out_rows, rows.cols)?;
        let (n, dim, stride) = (
            int(out_rows, "gather_pool")?,
            int(rows.cols, "gather_pool")?,
            int(stride, "gather_pool")?,
        );
        // float4 loads when rows are whole multiples of 16 bytes.
        let (kernel, lanes) = if rows.cols.is_multiple_of(4) {
            (&self.k.gather_pool4, rows.cols / 4)
        } else {
            (&self.k.gather_pool, rows.cols)
        };
        let mut b = self.stream.launch_builder(kernel);
        b.arg(&mut out.buf)
            .arg(&rows.buf)
            .arg(&plan.entry_row)
            .arg(&plan.entry_value);
        b.arg(&plan.segment_offsets).arg(&n).arg(&dim).arg(&stride);
        // SAFETY: the kernel reads `segment_offsets[0..=n*stride]` and the rows
        // they index, all sized by the plan, and writes `out[0..n*dim]`;
        // device allocations are 256-byte aligned, so float4 rows are aligned.
        unsafe { b.launch(linear(out_rows * lanes)) }.map_err(device_error)?;
        Ok(out)
    }

    fn scatter_pool(
        &self,
        grad: &CudaTensor,
        plan: &CudaPlan,
        pooling: Pooling,
    ) -> Result<CudaTensor, BackendError> {
        let (out_rows, stride) = pooled_rows(plan, pooling);
        if grad.rows != out_rows {
            return Err(shape_error(
                "scatter_pool",
                format!("{} gradient rows, expected {out_rows}", grad.rows),
            ));
        }
        if plan.unique * grad.cols == 0 || plan.chunks == 0 {
            return self.zeros(plan.unique, grad.cols);
        }
        // Every row is written: by its one chunk, or by the reduction.
        let mut out = self.uninit(plan.unique, grad.cols)?;
        let mut partial = self.uninit(plan.chunks, grad.cols)?;
        let (chunks, dim, stride) = (
            int(plan.chunks, "scatter_pool")?,
            int(grad.cols, "scatter_pool")?,
            int(stride, "scatter_pool")?,
        );
        let (kernel, lanes) = if grad.cols.is_multiple_of(4) {
            (&self.k.scatter_chunks4, grad.cols / 4)
        } else {
            (&self.k.scatter_chunks, grad.cols)
        };
        let mut b = self.stream.launch_builder(kernel);
        b.arg(&mut out.buf)
            .arg(&mut partial.buf)
            .arg(&grad.buf)
            .arg(&plan.chunk_offsets);
        b.arg(&plan.chunk_row)
            .arg(&plan.row_chunks)
            .arg(&plan.row_entry_segment);
        b.arg(&plan.row_entry_value)
            .arg(&chunks)
            .arg(&dim)
            .arg(&stride);
        // SAFETY: reads the plan's index arrays and `grad[0..out_rows*dim]`,
        // writes rows of `out` ([unique, dim]) and `partial` ([chunks, dim]).
        unsafe { b.launch(linear(plan.chunks * lanes)) }.map_err(device_error)?;
        self.reduce_chunks(&mut out, &partial, plan)?;
        Ok(out)
    }

    fn fm_forward(
        &self,
        rows: &CudaTensor,
        plan: &CudaPlan,
    ) -> Result<(CudaTensor, CudaTensor), BackendError> {
        self.check_plan_rows("fm_forward", rows, plan)?;
        let mut out = self.zeros(plan.examples, 1)?;
        let (terms, sums) = self.fm_pairs(rows, plan)?;
        if sums.len() == 0 {
            return Ok((out, sums));
        }
        let (n, dim) = (int(plan.examples, "fm")?, int(rows.cols, "fm")?);
        let mut b = self.stream.launch_builder(&self.k.fm_reduce);
        b.arg(&mut out.buf).arg(&terms.buf).arg(&n).arg(&dim);
        // SAFETY: reads terms[0..n*dim], writes out[0..n].
        unsafe { b.launch(linear(plan.examples)) }.map_err(device_error)?;
        Ok((out, sums))
    }

    fn fm_pairs(
        &self,
        rows: &CudaTensor,
        plan: &CudaPlan,
    ) -> Result<(CudaTensor, CudaTensor), BackendError> {
        self.check_plan_rows("fm_pairs", rows, plan)?;
        let mut sums = self.zeros(plan.examples, rows.cols)?;
        let mut terms = self.zeros(plan.examples, rows.cols)?;
        if sums.len() == 0 {
            return Ok((terms, sums));
        }
        let (n, dim, fields) = (
            int(plan.examples, "fm")?,
            int(rows.cols, "fm")?,
            int(plan.fields, "fm")?,
        );
        let mut b = self.stream.launch_builder(&self.k.fm_sums);
        b.arg(&mut sums.buf)
            .arg(&mut terms.buf)
            .arg(&rows.buf)
            .arg(&plan.entry_row);
        b.arg(&plan.entry_value)
            .arg(&plan.segment_offsets)
            .arg(&n)
            .arg(&dim)
            .arg(&fields);
        // SAFETY: as gather_pool with per-example pooling; writes [n, dim] twice.
        unsafe { b.launch(linear(sums.rows * sums.cols)) }.map_err(device_error)?;
        Ok((terms, sums))
    }

    fn fm_backward(
        &self,
        grad: &CudaTensor,
        sums: &CudaTensor,
        rows: &CudaTensor,
        plan: &CudaPlan,
    ) -> Result<CudaTensor, BackendError> {
        self.check_plan_rows("fm_backward", rows, plan)?;
        if grad.rows != plan.examples
            || !(grad.cols == 1 || grad.cols == rows.cols)
            || (sums.rows, sums.cols) != (plan.examples, rows.cols)
        {
            return Err(shape_error(
                "fm_backward",
                format!(
                    "grad [{}, {}], sums [{}, {}] for {} examples",
                    grad.rows, grad.cols, sums.rows, sums.cols, plan.examples
                ),
            ));
        }
        if plan.unique * rows.cols == 0 || plan.chunks == 0 {
            return self.zeros(plan.unique, rows.cols);
        }
        let mut out = self.uninit(plan.unique, rows.cols)?;
        let mut partial = self.uninit(plan.chunks, rows.cols)?;
        let (chunks, dim, fields, grad_cols) = (
            int(plan.chunks, "fm")?,
            int(rows.cols, "fm")?,
            int(plan.fields, "fm")?,
            int(grad.cols, "fm")?,
        );
        let mut b = self.stream.launch_builder(&self.k.fm_backward_chunks);
        b.arg(&mut out.buf)
            .arg(&mut partial.buf)
            .arg(&grad.buf)
            .arg(&sums.buf)
            .arg(&rows.buf);
        b.arg(&plan.chunk_offsets)
            .arg(&plan.chunk_row)
            .arg(&plan.row_chunks);
        b.arg(&plan.row_entry_segment).arg(&plan.row_entry_value);
        b.arg(&chunks).arg(&dim).arg(&fields).arg(&grad_cols);
        // SAFETY: reads the plan and the [examples, 1 or dim] / [examples,
        // dim] / [unique, dim] operands checked above, writes rows of out
        // and partial.
        unsafe { b.launch(linear(plan.chunks * rows.cols)) }.map_err(device_error)?;
        self.reduce_chunks(&mut out, &partial, plan)?;
        Ok(out)
    }

    fn matmul(
        &self,
        a: &CudaTensor,
        b: &CudaTensor,
        transpose_a: bool,
        transpose_b: bool,
    ) -> Result<CudaTensor, BackendError> {
        let (m, ka) = if transpose_a {
            (a.cols, a.rows)
        } else {
            (a.rows, a.cols)
        };
        let (kb, n) = if transpose_b {
            (b.cols, b.rows)
        } else {
            (b.rows, b.cols)
        };
        if ka != kb {
            return Err(shape_error("matmul", format!("[{m}, {ka}] @ [{kb}, {n}]")));
        }
        let mut c = self.zeros(m, n)?;
        if c.len() == 0 || ka == 0 {
            return Ok(c);
        }
        let (mi, ni, ki) = (int(m, "matmul")?, int(n, "matmul")?, int(ka, "matmul")?);
        let (ta, tb) = (i32::from(transpose_a), i32::from(transpose_b));
        let mut builder = self.stream.launch_builder(&self.k.matmul);
        builder
            .arg(&mut c.buf)
            .arg(&a.buf)
            .arg(&b.buf)
            .arg(&mi)
            .arg(&ni)
            .arg(&ki)
            .arg(&ta)
            .arg(&tb);
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(16) as u32, m.div_ceil(16) as u32, 1),
            block_dim: (16, 16, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: bounds are checked in the kernel against m, n, k, which match
        // the operands' shapes checked above.
        unsafe { builder.launch(cfg) }.map_err(device_error)?;
        Ok(c)
    }

    fn softmax_rows(&self, x: &CudaTensor) -> Result<CudaTensor, BackendError> {
        if x.rows * x.cols == 0 {
            return self.zeros(x.rows, x.cols);
        }
        let mut y = self.uninit(x.rows, x.cols)?;
        let (rows, cols) = (int(x.rows, "softmax_rows")?, int(x.cols, "softmax_rows")?);
        let mut b = self.stream.launch_builder(&self.k.softmax_rows);
        b.arg(&mut y.buf).arg(&x.buf).arg(&rows).arg(&cols);
        // SAFETY: one thread per row of two [rows, cols] buffers.
        unsafe { b.launch(linear(x.rows)) }.map_err(device_error)?;
        Ok(y)
    }

    fn softmax_rows_backward(
        &self,
        grad: &CudaTensor,
        y: &CudaTensor,
    ) -> Result<CudaTensor, BackendError> {
        Self::same_shape("softmax_rows_backward", grad, y)?;
        if y.rows * y.cols == 0 {
            return self.zeros(y.rows, y.cols);
        }
        let mut dx = self.uninit(y.rows, y.cols)?;
        let (rows, cols) = (int(y.rows, "softmax")?, int(y.cols, "softmax")?);
        let mut b = self.stream.launch_builder(&self.k.softmax_rows_backward);
        b.arg(&mut dx.buf)
            .arg(&grad.buf)
            .arg(&y.buf)
            .arg(&rows)
            .arg(&cols);
        // SAFETY: one thread per row of three [rows, cols] buffers.
        unsafe { b.launch(linear(y.rows)) }.map_err(device_error)?;
        Ok(dx)
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
        let (n, experts) = (gates.rows, gates.cols);
        if stacked.rows != n * experts {
            return Err(shape_error(
                "mix",
                format!(
                    "stacked [{}, {}] for gates [{n}, {experts}]",
                    stacked.rows, stacked.cols
                ),
            ));
        }
        if n * stacked.cols == 0 || experts == 0 {
            return self.zeros(n, stacked.cols);
        }
        let mut out = self.uninit(n, stacked.cols)?;
        let (e, rows, cols) = (
            int(experts, "mix")?,
            int(n, "mix")?,
            int(stacked.cols, "mix")?,
        );
        let mut b = self.stream.launch_builder(&self.k.mix);
        b.arg(&mut out.buf)
            .arg(&stacked.buf)
            .arg(&gates.buf)
            .arg(&e)
            .arg(&rows)
            .arg(&cols);
        // SAFETY: shapes checked above; writes [n, cols].
        unsafe { b.launch(linear(out.rows * out.cols)) }.map_err(device_error)?;
        Ok(out)
    }

    fn mix_backward(
        &self,
        grad: &CudaTensor,
        stacked: &CudaTensor,
        gates: &CudaTensor,
    ) -> Result<(CudaTensor, CudaTensor), BackendError> {
        let (n, experts) = (gates.rows, gates.cols);
        if stacked.rows != n * experts || (grad.rows, grad.cols) != (n, stacked.cols) {
            return Err(shape_error(
                "mix_backward",
                format!(
                    "grad [{}, {}], stacked [{}, {}], gates [{n}, {experts}]",
                    grad.rows, grad.cols, stacked.rows, stacked.cols
                ),
            ));
        }
        if n * experts * stacked.cols == 0 {
            return Ok((
                self.zeros(stacked.rows, stacked.cols)?,
                self.zeros(n, experts)?,
            ));
        }
        let mut dstacked = self.uninit(stacked.rows, stacked.cols)?;
        let mut dgates = self.uninit(n, experts)?;
        let (e, rows, cols) = (
            int(experts, "mix")?,
            int(n, "mix")?,
            int(stacked.cols, "mix")?,
        );
        let mut b = self.stream.launch_builder(&self.k.mix_backward_experts);
        b.arg(&mut dstacked.buf)
            .arg(&grad.buf)
            .arg(&gates.buf)
            .arg(&e)
            .arg(&rows)
            .arg(&cols);
        // SAFETY: shapes checked above; writes [experts * n, cols].
        unsafe { b.launch(linear(dstacked.rows * dstacked.cols)) }.map_err(device_error)?;
        let mut b = self.stream.launch_builder(&self.k.mix_backward_gates);
        b.arg(&mut dgates.buf)
            .arg(&grad.buf)
            .arg(&stacked.buf)
            .arg(&e)
            .arg(&rows)
            .arg(&cols);
        // SAFETY: shapes checked above; writes [n, experts].
        unsafe { b.launch(linear(dgates.rows * dgates.cols)) }.map_err(device_error)?;
        Ok((dstacked, dgates))
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
        if x.rows * x.cols == 0 {
            return self.zeros(x.rows, x.cols);
        }
        let mut out = self.uninit(x.rows, x.cols)?;
        let n = (x.rows * x.cols) as i64;
        let mut b = self.stream.launch_builder(&self.k.scale);
        b.arg(&mut out.buf).arg(&x.buf).arg(&alpha).arg(&n);
        // SAFETY: two buffers of n elements.
        unsafe { b.launch(linear(out.rows * out.cols)) }.map_err(device_error)?;
        Ok(out)
    }

    fn add(&self, a: &CudaTensor, b: &CudaTensor) -> Result<CudaTensor, BackendError> {
        Self::same_shape("add", a, b)?;
        if a.rows * a.cols == 0 {
            return self.zeros(a.rows, a.cols);
        }
        let mut out = self.uninit(a.rows, a.cols)?;
        let n = out.len() as i64;
        let mut builder = self.stream.launch_builder(&self.k.add);
        builder.arg(&mut out.buf).arg(&a.buf).arg(&b.buf).arg(&n);
        // SAFETY: three buffers of n elements.
        unsafe { builder.launch(linear(out.rows * out.cols)) }.map_err(device_error)?;
        Ok(out)
    }

    fn bias_act(
        &self,
        x: &CudaTensor,
        bias: &CudaTensor,
        act: Activation,
        dropout: Option<Dropout>,
    ) -> Result<CudaTensor, BackendError> {
        if (bias.rows, bias.cols) != (1, x.cols) {
            return Err(shape_error(
                "bias_act",
                format!(
                    "x [{}, {}], bias [{}, {}]",
                    x.rows, x.cols, bias.rows, bias.cols
                ),
            ));
        }
        if x.rows * x.cols == 0 {
            return self.zeros(x.rows, x.cols);
        }
        let mut y = self.uninit(x.rows, x.cols)?;
        let (rows, cols) = (int(x.rows, "bias_act")?, int(x.cols, "bias_act")?);
        let act = i32::from(act == Activation::Relu);
        let (use_dropout, rate, seed) = dropout.map_or((0i32, 0f32, 0u64), |d| (1, d.rate, d.seed));
        let mut b = self.stream.launch_builder(&self.k.bias_act);
        b.arg(&mut y.buf)
            .arg(&x.buf)
            .arg(&bias.buf)
            .arg(&rows)
            .arg(&cols)
            .arg(&act);
        b.arg(&use_dropout).arg(&rate).arg(&seed);
        // SAFETY: x and y hold rows*cols elements, bias cols.
        unsafe { b.launch(linear(y.rows * y.cols)) }.map_err(device_error)?;
        Ok(y)
    }

    fn bias_act_backward(
        &self,
        grad: &CudaTensor,
        y: &CudaTensor,
        act: Activation,
        dropout: Option<Dropout>,
    ) -> Result<(CudaTensor, CudaTensor), BackendError> {
        Self::same_shape("bias_act_backward", grad, y)?;
        let mut dx = self.zeros(grad.rows, grad.cols)?;
        let mut dbias = self.zeros(1, grad.cols)?;
        if dx.len() == 0 {
            return Ok((dx, dbias));
        }
        let n = dx.len() as i64;
        let act = i32::from(act == Activation::Relu);
        let (use_dropout, rate, seed) = dropout.map_or((0i32, 0f32, 0u64), |d| (1, d.rate, d.seed));
        let mut b = self.stream.launch_builder(&self.k.bias_act_backward);
        b.arg(&mut dx.buf)
            .arg(&grad.buf)
            .arg(&y.buf)
            .arg(&n)
            .arg(&act);
        b.arg(&use_dropout).arg(&rate).arg(&seed);
        // SAFETY: three buffers of n elements.
        unsafe { b.launch(linear(dx.rows * dx.cols)) }.map_err(device_error)?;
        let (rows, cols) = (
            int(grad.rows, "bias_act_backward")?,
            int(grad.cols, "bias_act_backward")?,
        );
        let mut b = self.stream.launch_builder(&self.k.col_sums);
        b.arg(&mut dbias.buf).arg(&dx.buf).arg(&rows).arg(&cols);
        // SAFETY: reads rows*cols, writes cols.
        unsafe { b.launch(linear(grad.cols)) }.map_err(device_error)?;
        Ok((dx, dbias))
    }

    fn batch_norm(
        &self,
        x: &CudaTensor,
        params: &CudaTensor,
        mode: BatchNormMode,
        eps: f32,
    ) -> Result<(CudaTensor, CudaTensor, BatchNormSaved<CudaTensor>), BackendError> {
        if (params.rows, params.cols) != (4, x.cols) {
            return Err(shape_error(
                "batch_norm",
                format!(
                    "x [{}, {}], params [{}, {}]",
                    x.rows, x.cols, params.rows, params.cols
                ),
            ));
        }
        let mut stats = self.zeros(2, x.cols)?;
        let mut inv_std = self.zeros(1, x.cols)?;
        let mut y = self.zeros(x.rows, x.cols)?;
        let mut xhat = self.zeros(x.rows, x.cols)?;
        if x.cols > 0 {
            let (rows, cols) = (int(x.rows, "batch_norm")?, int(x.cols, "batch_norm")?);
            let running = i32::from(mode == BatchNormMode::Running);
            let mut b = self.stream.launch_builder(&self.k.bn_stats);
            b.arg(&mut stats.buf)
                .arg(&mut inv_std.buf)
                .arg(&x.buf)
                .arg(&params.buf);
            b.arg(&rows).arg(&cols).arg(&running).arg(&eps);
            // SAFETY: reads x [rows, cols] and params [4, cols]; writes [2, cols] and [cols].
            unsafe { b.launch(linear(x.cols)) }.map_err(device_error)?;
            if y.len() > 0 {
                let mut b = self.stream.launch_builder(&self.k.bn_apply);
                b.arg(&mut y.buf)
                    .arg(&mut xhat.buf)
                    .arg(&x.buf)
                    .arg(&stats.buf);
                b.arg(&inv_std.buf).arg(&params.buf).arg(&rows).arg(&cols);
                // SAFETY: elementwise over [rows, cols] with per-column operands.
                unsafe { b.launch(linear(y.rows * y.cols)) }.map_err(device_error)?;
            }
        }
        Ok((
            y,
            stats,
            BatchNormSaved {
                normalized: xhat,
                inv_std,
            },
        ))
    }

    fn batch_norm_backward(
        &self,
        grad: &CudaTensor,
        params: &CudaTensor,
        saved: &BatchNormSaved<CudaTensor>,
    ) -> Result<(CudaTensor, CudaTensor), BackendError> {
        Self::same_shape("batch_norm_backward", grad, &saved.normalized)?;
        let mut dparams = self.zeros(2, grad.cols)?;
        let mut dx = self.zeros(grad.rows, grad.cols)?;
        if grad.cols == 0 {
            return Ok((dx, dparams));
        }
        let (rows, cols) = (
            int(grad.rows, "batch_norm_backward")?,
            int(grad.cols, "batch_norm_backward")?,
        );
        {
            let mut dgamma = dparams.buf.slice_mut(0..grad.cols);
            let mut b = self.stream.launch_builder(&self.k.col_dots);
            b.arg(&mut dgamma)
                .arg(&grad.buf)
                .arg(&saved.normalized.buf)
                .arg(&rows)
                .arg(&cols);
            // SAFETY: reads two [rows, cols] buffers, writes cols.
            unsafe { b.launch(linear(grad.cols)) }.map_err(device_error)?;
        }
        {
            let mut dbeta = dparams.buf.slice_mut(grad.cols..2 * grad.cols);
            let mut b = self.stream.launch_builder(&self.k.col_sums);
            b.arg(&mut dbeta).arg(&grad.buf).arg(&rows).arg(&cols);
            // SAFETY: reads [rows, cols], writes cols.
            unsafe { b.launch(linear(grad.cols)) }.map_err(device_error)?;
        }
        if dx.len() > 0 {
            let mut b = self.stream.launch_builder(&self.k.bn_backward);
            b.arg(&mut dx.buf)
                .arg(&grad.buf)
                .arg(&saved.normalized.buf)
                .arg(&saved.inv_std.buf);
            b.arg(&params.buf).arg(&dparams.buf).arg(&rows).arg(&cols);
            // SAFETY: elementwise over [rows, cols] with per-column operands.
            unsafe { b.launch(linear(dx.rows * dx.cols)) }.map_err(device_error)?;
        }
        Ok((dx, dparams))
    }

    fn bce_with_logits(
        &self,
        logits: &CudaTensor,
        labels: &CudaTensor,
    ) -> Result<(f64, CudaTensor), BackendError> {
        Self::same_shape("bce_with_logits", logits, labels)?;
        let mut loss = self.zeros(logits.rows, logits.cols)?;
        let mut grad = self.zeros(logits.rows, logits.cols)?;
        if loss.len() == 0 {
            return Ok((0.0, grad));
        }
        let n = int(loss.len(), "bce_with_logits")?;
        let mut b = self.stream.launch_builder(&self.k.bce_with_logits);
        b.arg(&mut loss.buf)
            .arg(&mut grad.buf)
            .arg(&logits.buf)
            .arg(&labels.buf)
            .arg(&n);
        // SAFETY: four buffers of n elements.
        unsafe { b.launch(linear(loss.rows * loss.cols)) }.map_err(device_error)?;
        let total = self.download(&loss)?.iter().map(|&l| f64::from(l)).sum();
        Ok((total, grad))
    }

    fn sigmoid(&self, x: &CudaTensor) -> Result<CudaTensor, BackendError> {
        if x.rows * x.cols == 0 {
            return self.zeros(x.rows, x.cols);
        }
        let mut out = self.uninit(x.rows, x.cols)?;
        let n = out.len() as i64;
        let mut b = self.stream.launch_builder(&self.k.sigmoid);
        b.arg(&mut out.buf).arg(&x.buf).arg(&n);
        // SAFETY: two buffers of n elements.
        unsafe { b.launch(linear(out.rows * out.cols)) }.map_err(device_error)?;
        Ok(out)
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
