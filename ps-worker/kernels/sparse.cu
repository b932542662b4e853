// Sparse ops over a SparsePlan: embedding gather with pooling, the
// deterministic gradient scatter (segment sum per distinct row), and the
// factorization-machine interaction. One thread per (output row, column):
// adjacent threads read adjacent floats of the same table row.

// Columns are processed V at a time (V = 4 with float4 loads when the
// dimension is a multiple of 4, else 1): "lane" l of a row covers columns
// [l*V, l*V + V).

__device__ __forceinline__ void ps_axpy(float& acc, float x, float r) { acc += x * r; }
__device__ __forceinline__ void ps_axpy(float4& acc, float x, float4 r) {
    acc.x += x * r.x; acc.y += x * r.y; acc.z += x * r.z; acc.w += x * r.w;
}
__device__ __forceinline__ void ps_add(float& acc, float r) { acc += r; }
__device__ __forceinline__ void ps_add(float4& acc, float4 r) {
    acc.x += r.x; acc.y += r.y; acc.z += r.z; acc.w += r.w;
}
template <typename T> __device__ __forceinline__ T ps_zero();
template <> __device__ __forceinline__ float ps_zero<float>() { return 0.0f; }
template <> __device__ __forceinline__ float4 ps_zero<float4>() { return make_float4(0.f, 0.f, 0.f, 0.f); }

// out[o, :] = sum over occurrences e of segments [o*stride, (o+1)*stride) of
// value[e] * rows[row[e], :].
template <typename T>
__device__ void gather_pool_impl(
    float* __restrict__ out, const float* __restrict__ rows,
    const unsigned int* __restrict__ entry_row, const float* __restrict__ entry_value,
    const unsigned int* __restrict__ segment_offsets, int out_rows, int dim, int stride) {
    const int lanes = dim / (int)(sizeof(T) / sizeof(float));
    long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (long long)out_rows * lanes) return;
    int o = (int)(t / lanes), l = (int)(t % lanes);
    unsigned int begin = segment_offsets[(long long)o * stride];
    unsigned int end = segment_offsets[(long long)(o + 1) * stride];
    T acc = ps_zero<T>();
    for (unsigned int e = begin; e < end; ++e) {
        const T* row = reinterpret_cast<const T*>(rows + (long long)entry_row[e] * dim);
        ps_axpy(acc, entry_value[e], row[l]);
    }
    reinterpret_cast<T*>(out + (long long)o * dim)[l] = acc;
}

extern "C" __global__ void gather_pool(
    float* out, const float* rows, const unsigned int* entry_row, const float* entry_value,
    const unsigned int* segment_offsets, int out_rows, int dim, int stride) {
    gather_pool_impl<float>(out, rows, entry_row, entry_value, segment_offsets, out_rows, dim, stride);
}

extern "C" __global__ void gather_pool4(
    float* out, const float* rows, const unsigned int* entry_row, const float* entry_value,
    const unsigned int* segment_offsets, int out_rows, int dim, int stride) {
    gather_pool_impl<float4>(out, rows, entry_row, entry_value, segment_offsets, out_rows, dim, stride);
}

// The gradient scatter runs in two deterministic phases so that a hot row
// with thousands of occurrences does not serialize on one thread: each
// chunk of at most 32 occurrences of a row is summed (in order); a row with
// one chunk writes its result directly, the chunks of the other rows go to
// partial[c, :] and a second kernel sums them in chunk order.

// Chunk c's sum of value[e] * grad[segment[e] / stride, :].
template <typename T>
__device__ void scatter_chunks_impl(
    float* __restrict__ out, float* __restrict__ partial, const float* __restrict__ grad,
    const unsigned int* __restrict__ chunk_offsets, const unsigned int* __restrict__ chunk_row,
    const unsigned int* __restrict__ row_chunks, const unsigned int* __restrict__ row_entry_segment,
    const float* __restrict__ row_entry_value, int chunks, int dim, int stride) {
    const int lanes = dim / (int)(sizeof(T) / sizeof(float));
    long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (long long)chunks * lanes) return;
    int c = (int)(t / lanes), l = (int)(t % lanes);
    T acc = ps_zero<T>();
    for (unsigned int i = chunk_offsets[c]; i < chunk_offsets[c + 1]; ++i) {
        const T* g = reinterpret_cast<const T*>(grad + (long long)(row_entry_segment[i] / stride) * dim);
        ps_axpy(acc, row_entry_value[i], g[l]);
    }
    unsigned int u = chunk_row[c];
    bool alone = row_chunks[u + 1] - row_chunks[u] == 1;
    float* dst = alone ? out + (long long)u * dim : partial + (long long)c * dim;
    reinterpret_cast<T*>(dst)[l] = acc;
}

extern "C" __global__ void scatter_chunks(
    float* out, float* partial, const float* grad, const unsigned int* chunk_offsets,
    const unsigned int* chunk_row, const unsigned int* row_chunks,
    const unsigned int* row_entry_segment, const float* row_entry_value, int chunks, int dim, int stride) {
    scatter_chunks_impl<float>(out, partial, grad, chunk_offsets, chunk_row, row_chunks,
        row_entry_segment, row_entry_value, chunks, dim, stride);
}

extern "C" __global__ void scatter_chunks4(
    float* out, float* partial, const float* grad, const unsigned int* chunk_offsets,
    const unsigned int* chunk_row, const unsigned int* row_chunks,
    const unsigned int* row_entry_segment, const float* row_entry_value, int chunks, int dim, int stride) {
    scatter_chunks_impl<float4>(out, partial, grad, chunk_offsets, chunk_row, row_chunks,
        row_entry_segment, row_entry_value, chunks, dim, stride);
}

// For each row u without exactly one chunk: out[u, d] = sum of partial[c, d]
// over its chunks, in order (0 for a row with none).
extern "C" __global__ void reduce_chunks(
    float* out, const float* partial, const unsigned int* row_chunks,
    const unsigned int* multi_rows, int count, int dim) {
    long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (long long)count * dim) return;
    unsigned int u = multi_rows[t / dim];
    int d = (int)(t % dim);
    float acc = 0.0f;
    for (unsigned int c = row_chunks[u]; c < row_chunks[u + 1]; ++c) {
        acc += partial[(long long)c * dim + d];
    }
    out[(long long)u * dim + d] = acc;
}

// Per (example, column): sums[b, d] = sum_e x v, and
// terms[b, d] = 0.5 (sums^2 - sum_e x^2 v^2).
extern "C" __global__ void fm_sums(
    float* sums, float* terms, const float* rows, const unsigned int* entry_row,
    const float* entry_value, const unsigned int* segment_offsets,
    int examples, int dim, int fields) {
    long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (long long)examples * dim) return;
    int b = (int)(t / dim), d = (int)(t % dim);
    unsigned int begin = segment_offsets[(long long)b * fields];
    unsigned int end = segment_offsets[(long long)(b + 1) * fields];
    float s = 0.0f, q = 0.0f;
    for (unsigned int e = begin; e < end; ++e) {
        float xv = entry_value[e] * rows[(long long)entry_row[e] * dim + d];
        s += xv;
        q += xv * xv;
    }
    sums[t] = s;
    terms[t] = 0.5f * (s * s - q);
}

// out[b] = sum_d terms[b, d], summed in column order.
extern "C" __global__ void fm_reduce(float* out, const float* terms, int examples, int dim) {
    int b = blockIdx.x * blockDim.x + threadIdx.x;
    if (b >= examples) return;
    float acc = 0.0f;
    for (int d = 0; d < dim; ++d) acc += terms[(long long)b * dim + d];
    out[b] = acc;
}

// FM gradient, phase one of the chunked scatter: chunk c (of row u) sums
// g * (x sums[b, d] - x^2 rows[u, d]) over its occurrences, g = grad[b]
// (grad_cols 1: the summed interaction) or grad[b, d] (grad_cols dim: per
// dimension); single-chunk rows write out[u, d] directly, the others
// partial[c, d].
extern "C" __global__ void fm_backward_chunks(
    float* out, float* partial, const float* grad, const float* sums, const float* rows,
    const unsigned int* chunk_offsets, const unsigned int* chunk_row,
    const unsigned int* row_chunks, const unsigned int* row_entry_segment,
    const float* row_entry_value, int chunks, int dim, int fields, int grad_cols) {
    long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (long long)chunks * dim) return;
    int c = (int)(t / dim), d = (int)(t % dim);
    unsigned int u = chunk_row[c];
    float v = rows[(long long)u * dim + d];
    float acc = 0.0f;
    for (unsigned int i = chunk_offsets[c]; i < chunk_offsets[c + 1]; ++i) {
        unsigned int b = row_entry_segment[i] / fields;
        float x = row_entry_value[i];
        float g = grad_cols == 1 ? grad[b] : grad[(long long)b * dim + d];
        acc += g * (x * sums[(long long)b * dim + d] - x * x * v);
    }
    bool alone = row_chunks[u + 1] - row_chunks[u] == 1;
    if (alone) out[(long long)u * dim + d] = acc; else partial[t] = acc;
}
