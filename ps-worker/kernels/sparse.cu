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

// out[u, d] = sum over the occurrences e of distinct row u (ascending) of
// value[e] * grad[segment[e] / stride, d].
extern "C" __global__ void scatter_pool(
    float* out, const float* grad, const unsigned int* row_offsets,
    const unsigned int* row_entries, const unsigned int* entry_segment,
    const float* entry_value, int unique, int dim, int stride) {
    long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (long long)unique * dim) return;
    int u = (int)(t / dim), d = (int)(t % dim);
    float acc = 0.0f;
    for (unsigned int i = row_offsets[u]; i < row_offsets[u + 1]; ++i) {
        unsigned int e = row_entries[i];
        acc += entry_value[e] * grad[(long long)(entry_segment[e] / stride) * dim + d];
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

// out[u, d] = sum over occurrences e of row u of
// g[b] * (x sums[b, d] - x^2 rows[u, d]), b the occurrence's example.
extern "C" __global__ void fm_backward(
    float* out, const float* grad, const float* sums, const float* rows,
    const unsigned int* row_offsets, const unsigned int* row_entries,
    const unsigned int* entry_segment, const float* entry_value,
    int unique, int dim, int fields) {
    long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (long long)unique * dim) return;
    int u = (int)(t / dim), d = (int)(t % dim);
    float v = rows[t];
    float acc = 0.0f;
    for (unsigned int i = row_offsets[u]; i < row_offsets[u + 1]; ++i) {
        unsigned int e = row_entries[i];
        unsigned int b = entry_segment[e] / fields;
        float x = entry_value[e];
        acc += grad[b] * (x * sums[(long long)b * dim + d] - x * x * v);
    }
    out[t] = acc;
}
