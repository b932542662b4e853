// Sparse ops over a SparsePlan: embedding gather with pooling, the
// deterministic gradient scatter (segment sum per distinct row), and the
// factorization-machine interaction. One thread per (output row, column):
// adjacent threads read adjacent floats of the same table row.

// out[o, d] = sum over occurrences e of segments [o*stride, (o+1)*stride) of
// value[e] * rows[row[e], d].
extern "C" __global__ void gather_pool(
    float* out, const float* rows, const unsigned int* entry_row,
    const float* entry_value, const unsigned int* segment_offsets,
    int out_rows, int dim, int stride) {
    long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (long long)out_rows * dim) return;
    int o = (int)(t / dim), d = (int)(t % dim);
    unsigned int begin = segment_offsets[(long long)o * stride];
    unsigned int end = segment_offsets[(long long)(o + 1) * stride];
    float acc = 0.0f;
    for (unsigned int e = begin; e < end; ++e) {
        acc += entry_value[e] * rows[(long long)entry_row[e] * dim + d];
    }
    out[t] = acc;
}

// The gradient scatter runs in two deterministic phases so that a hot row
// with thousands of occurrences does not serialize on one thread: each
// chunk of at most 32 occurrences of a row is summed into partial[c, d],
// then each row sums its chunks in order.

// partial[c, d] = sum over occurrences e of chunk c of
// value[e] * grad[segment[e] / stride, d].
extern "C" __global__ void scatter_chunks(
    float* partial, const float* grad, const unsigned int* chunk_offsets,
    const unsigned int* row_entries, const unsigned int* entry_segment,
    const float* entry_value, int chunks, int dim, int stride) {
    long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (long long)chunks * dim) return;
    int c = (int)(t / dim), d = (int)(t % dim);
    float acc = 0.0f;
    for (unsigned int i = chunk_offsets[c]; i < chunk_offsets[c + 1]; ++i) {
        unsigned int e = row_entries[i];
        acc += entry_value[e] * grad[(long long)(entry_segment[e] / stride) * dim + d];
    }
    partial[t] = acc;
}

// out[u, d] = sum of partial[c, d] over row u's chunks, in order.
extern "C" __global__ void reduce_chunks(
    float* out, const float* partial, const unsigned int* row_chunks, int unique, int dim) {
    long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (long long)unique * dim) return;
    int u = (int)(t / dim), d = (int)(t % dim);
    float acc = 0.0f;
    for (unsigned int c = row_chunks[u]; c < row_chunks[u + 1]; ++c) {
        acc += partial[(long long)c * dim + d];
    }
    out[t] = acc;
}

// Per (example, column): sums[b, d] = sum_e x v, and
// terms[b, d] = sums^2 - sum_e x^2 v^2.
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
    terms[t] = s * s - q;
}

// out[b] = 0.5 * sum_d terms[b, d], summed in column order.
extern "C" __global__ void fm_reduce(float* out, const float* terms, int examples, int dim) {
    int b = blockIdx.x * blockDim.x + threadIdx.x;
    if (b >= examples) return;
    float acc = 0.0f;
    for (int d = 0; d < dim; ++d) acc += terms[(long long)b * dim + d];
    out[b] = 0.5f * acc;
}

// FM gradient, phase one of the chunked scatter: partial[c, d] = sum over
// occurrences e of chunk c (all of row u) of g[b] * (x sums[b, d] - x^2 rows[u, d]).
extern "C" __global__ void fm_backward_chunks(
    float* partial, const float* grad, const float* sums, const float* rows,
    const unsigned int* chunk_offsets, const unsigned int* row_entries,
    const unsigned int* entry_row, const unsigned int* entry_segment,
    const float* entry_value, int chunks, int dim, int fields) {
    long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (long long)chunks * dim) return;
    int c = (int)(t / dim), d = (int)(t % dim);
    unsigned int begin = chunk_offsets[c], end = chunk_offsets[c + 1];
    if (begin == end) { partial[t] = 0.0f; return; }
    float v = rows[(long long)entry_row[row_entries[begin]] * dim + d];
    float acc = 0.0f;
    for (unsigned int i = begin; i < end; ++i) {
        unsigned int e = row_entries[i];
        unsigned int b = entry_segment[e] / fields;
        float x = entry_value[e];
        acc += grad[b] * (x * sums[(long long)b * dim + d] - x * x * v);
    }
    partial[t] = acc;
}
