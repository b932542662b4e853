//! The CUDA backend against the CPU backend, op by op, on random inputs with
//! the edge cases (empty batch, single row, duplicate keys, sizes that are
//! not a multiple of the block size). Without a CUDA driver or device the
//! tests print `SKIPPED (no CUDA driver)` or `SKIPPED (no CUDA device)` and
//! check the error a user would see instead; with a device, every error
//! (NVRTC missing, a kernel that does not compile or load) fails them. The
//! NVRTC check fails instead of skipping when `PS_REQUIRE_NVRTC=1` (CI).
#![allow(clippy::unwrap_used)]

use ps_worker::backend::conformance;
use ps_worker::backend::cpu::CpuBackend;
use ps_worker::backend::cuda::{
    Availability, CudaBackend, KERNEL_NAMES, availability, compile_kernels, nvrtc_present,
};
use ps_worker::backend::{Backend, BackendError};

#[test]
fn every_kernel_agrees_with_the_cpu_backend() {
    if let Some(why) = availability().unwrap().skip_reason() {
        println!("SKIPPED ({why})");
        return;
    }
    let cuda = CudaBackend::new(0).unwrap();
    let results = conformance::compare(&cuda, &CpuBackend, 2026).unwrap();
    let worst = results.iter().fold(0f32, |m, a| m.max(a.relative_error));
    let mut sorted: Vec<_> = results.iter().collect();
    sorted.sort_by(|a, b| b.relative_error.total_cmp(&a.relative_error));
    for a in sorted.iter().take(8) {
        println!("  {:<40} {:.2e}", a.name, a.relative_error);
    }
    let failed: Vec<String> = sorted
        .iter()
        .filter(|a| a.relative_error.is_nan() || a.relative_error > 1e-4)
        .map(|a| format!("{} ({:.2e})", a.name, a.relative_error))
        .collect();
    assert!(
        failed.is_empty(),
        "relative error above 1e-4 on {}: {}",
        cuda.name(),
        failed.join(", ")
    );
    println!(
        "{} op/case pairs agree on {} (worst relative error {worst:.2e})",
        results.len(),
        cuda.name()
    );
}

#[test]
fn a_missing_device_is_one_clear_error() {
    let (err, expected) = match availability().unwrap() {
        Availability::NoDriver => {
            println!("SKIPPED (no CUDA driver): checking the error instead");
            (CudaBackend::new(0).unwrap_err(), "no CUDA driver found")
        }
        Availability::NoDevice => {
            println!("SKIPPED (no CUDA device): checking the error instead");
            (CudaBackend::new(0).unwrap_err(), "no such CUDA device")
        }
        Availability::Devices(n) => (
            CudaBackend::new(n + 1000).unwrap_err(),
            "no such CUDA device",
        ),
    };
    let BackendError::Unavailable(message) = &err else {
        panic!("expected Unavailable, got {err:?}");
    };
    assert!(message.contains(expected), "{message}");
}

#[test]
fn every_kernel_compiles_with_nvrtc() {
    // NVRTC needs no GPU: with libnvrtc.so.13 on the library path (e.g. the
    // `nvidia-cuda-nvrtc` wheel's lib folder in LD_LIBRARY_PATH) this checks
    // the kernel sources on any machine.
    if !nvrtc_present() {
        assert!(
            std::env::var("PS_REQUIRE_NVRTC").as_deref() != Ok("1"),
            "PS_REQUIRE_NVRTC=1 but libnvrtc.so.13 cannot be loaded"
        );
        println!("SKIPPED (no NVRTC library)");
        return;
    }
    let ptx = compile_kernels().unwrap().to_src();
    for name in KERNEL_NAMES {
        assert!(
            ptx.contains(&format!(".entry {name}(")),
            "kernel {name} missing from the PTX"
        );
    }
    println!(
        "{} kernels compile ({} bytes of PTX)",
        KERNEL_NAMES.len(),
        ptx.len()
    );
}
