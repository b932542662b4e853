//! The CUDA backend's kernel program: the sources in `kernels/`, their
//! NVRTC compilation (once per process), the functions the backend
//! launches, and the probes for the driver, the devices and NVRTC that
//! let callers skip or fail with one clear message. The backend itself is
//! in `cuda.rs`.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, DriverError};

use super::{BackendError, device_error};

/// All kernel sources, concatenated into one NVRTC program.
const KERNELS: [&str; 6] = [
    include_str!("../../kernels/common.cuh"),
    include_str!("../../kernels/sparse.cu"),
    include_str!("../../kernels/dense.cu"),
    include_str!("../../kernels/norm_loss.cu"),
    include_str!("../../kernels/image.cu"),
    include_str!("../../kernels/attention.cu"),
];

/// The kernel functions, loaded from the compiled module.
pub(super) struct Kernels {
    pub(super) gather_pool: CudaFunction,
    pub(super) gather_pool4: CudaFunction,
    pub(super) scatter_chunks: CudaFunction,
    pub(super) scatter_chunks4: CudaFunction,
    pub(super) reduce_chunks: CudaFunction,
    pub(super) fm_sums: CudaFunction,
    pub(super) fm_reduce: CudaFunction,
    pub(super) fm_backward_chunks: CudaFunction,
    pub(super) matmul: CudaFunction,
    pub(super) add: CudaFunction,
    pub(super) scale: CudaFunction,
    pub(super) softmax_rows: CudaFunction,
    pub(super) softmax_rows_backward: CudaFunction,
    pub(super) mix: CudaFunction,
    pub(super) mix_backward_experts: CudaFunction,
    pub(super) mix_backward_gates: CudaFunction,
    pub(super) bias_act: CudaFunction,
    pub(super) bias_act_backward: CudaFunction,
    pub(super) col_sums: CudaFunction,
    pub(super) col_dots: CudaFunction,
    pub(super) bn_stats: CudaFunction,
    pub(super) bn_apply: CudaFunction,
    pub(super) bn_backward: CudaFunction,
    pub(super) bce_with_logits: CudaFunction,
    pub(super) sigmoid: CudaFunction,
    pub(super) im2col: CudaFunction,
    pub(super) col2im: CudaFunction,
    pub(super) pool2d: CudaFunction,
    pub(super) pool2d_backward: CudaFunction,
    pub(super) copy_cols: CudaFunction,
    pub(super) softmax_xent: CudaFunction,
    pub(super) attention_forward: CudaFunction,
    pub(super) attention_backward_queries: CudaFunction,
    pub(super) attention_backward_keys: CudaFunction,
}

impl Kernels {
    pub(super) fn load(module: &Arc<CudaModule>) -> Result<Kernels, DriverError> {
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
pub(super) fn kernels_ptx() -> Result<cudarc::nvrtc::Ptx, BackendError> {
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
