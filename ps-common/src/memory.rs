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

/// Serves every thread from one heap arena; call before any thread starts
/// (after [`keep_freed_memory`]). A server with a disk tier frees and
/// allocates its store's 4 KiB pages from many threads: with an arena per
/// thread, each keeps its own freed pages (up to [`TRIM_THRESHOLD`]), and
/// `ps-bench stream --disk-tier` measured the server's anonymous memory
/// at 102 MB for a 12.6 MB budget; with one arena, 34 MB (16 MiB of it the
/// tier's page cache). A no-op on other C libraries than glibc.
pub fn one_arena() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[allow(unsafe_code)]
    // SAFETY: as in `keep_freed_memory`: a valid parameter, set before
    // other threads exist.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

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
