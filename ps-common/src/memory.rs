//! Process-wide allocator settings for the binaries.
//!
//! A training step allocates and frees buffers of megabytes (pooled
//! embeddings, gradients, request payloads). glibc serves allocations above
//! its mmap threshold with fresh mappings and returns freed heap tops to the
//! kernel, so every step pays page faults to zero new pages: measured on
//! ctr26, worker compute ran 3-4x slower that way. Raising both thresholds
//! keeps such buffers in the heap for reuse.

/// Allocations above this still get their own mapping.
pub const MMAP_THRESHOLD: usize = 64 << 20;
/// Free memory kept at the top of the heap before it is returned.
pub const TRIM_THRESHOLD: usize = 256 << 20;

/// Applies the settings; call first thing in `main`, before any thread
/// starts. A no-op on other C libraries than glibc.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[allow(unsafe_code)]
    // SAFETY: mallopt only changes allocator parameters; it is called
    // before other threads exist, and the values are valid sizes.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as libc::c_int);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD as libc::c_int);
    }
}
