//! Cache hints for batch code that reads or writes memory at random places.
//!
//! A hint changes no result: it asks the CPU to start loading a cache line
//! that the caller will touch a few items later, so the misses of several
//! items overlap instead of following each other. Off x86_64 the hints are
//! no-ops.

/// Hints the CPU to bring the cache line holding `value` into its caches.
#[inline(always)]
pub fn line<T>(value: &T) {
    #[cfg(target_arch = "x86_64")]
    #[allow(unsafe_code)]
    // SAFETY: `_mm_prefetch` is a hint: it reads nothing architecturally and
    // cannot fault, and `value` is a valid reference besides; SSE, which it
    // needs, is part of every x86_64 CPU.
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(
            (value as *const T).cast(),
        );
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = value;
}

/// Hints every cache line of `floats` (16 floats each) and its end, which
/// may start a line of its own.
#[inline(always)]
pub fn floats(floats: &[f32]) {
    for first in floats.iter().step_by(16) {
        line(first);
    }
    if let Some(last) = floats.last() {
        line(last);
    }
}
