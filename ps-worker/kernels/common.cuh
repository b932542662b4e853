// Shared helpers of the ps-worker kernels. Compiled at run time by NVRTC
// (cudarc), so only built-in CUDA headers are available.

// splitmix64's finalizer: ps_common::routing::mix64.
__device__ __forceinline__ unsigned long long ps_mix64(unsigned long long x) {
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

// Whether dropout keeps element `i`: backend::Dropout::keeps.
__device__ __forceinline__ bool ps_keeps(unsigned long long seed, unsigned long long i, float rate) {
    unsigned long long h = ps_mix64(seed ^ (i * 0x9E3779B97F4A7C15ULL));
    return (float)(h >> 40) * (1.0f / 16777216.0f) >= rate;
}
