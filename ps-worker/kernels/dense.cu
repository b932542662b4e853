// Dense ops of the MLP: tiled matrix product with optional transposes, the
// fused bias + activation + dropout and its backward, elementwise add, and
// column sums (bias gradients), summed in row order for determinism.

#define TILE 16

// C[M, N] = op(A)[M, K] @ op(B)[K, N]; A is stored [K, M] when ta, B [N, K] when tb.
extern "C" __global__ void matmul(
    float* c, const float* a, const float* b, int m, int n, int k, int ta, int tb) {
    __shared__ float as[TILE][TILE];
    __shared__ float bs[TILE][TILE + 1];
    int row = blockIdx.y * TILE + threadIdx.y;
    int col = blockIdx.x * TILE + threadIdx.x;
    float acc = 0.0f;
    for (int k0 = 0; k0 < k; k0 += TILE) {
        int ka = k0 + threadIdx.x;
        as[threadIdx.y][threadIdx.x] = (row < m && ka < k)
            ? (ta ? a[(long long)ka * m + row] : a[(long long)row * k + ka]) : 0.0f;
        int kb = k0 + threadIdx.y;
        bs[threadIdx.y][threadIdx.x] = (kb < k && col < n)
            ? (tb ? b[(long long)col * k + kb] : b[(long long)kb * n + col]) : 0.0f;
        __syncthreads();
#pragma unroll
        for (int i = 0; i < TILE; ++i) acc += as[threadIdx.y][i] * bs[i][threadIdx.x];
        __syncthreads();
    }
    if (row < m && col < n) c[(long long)row * n + col] = acc;
}

extern "C" __global__ void scale(float* out, const float* x, float alpha, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = alpha * x[i];
}

extern "C" __global__ void add(float* out, const float* a, const float* b, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = a[i] + b[i];
}

// y = dropout(act(x + bias)); act 0 = identity, 1 = relu.
extern "C" __global__ void bias_act(
    float* y, const float* x, const float* bias, int rows, int cols, int act,
    int use_dropout, float rate, unsigned long long seed) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)rows * cols) return;
    float v = x[i] + bias[i % cols];
    if (act == 1 && v < 0.0f) v = 0.0f;
    if (use_dropout) v = ps_keeps(seed, (unsigned long long)i, rate) ? v * (1.0f / (1.0f - rate)) : 0.0f;
    y[i] = v;
}

// dx = g * dropout scale * relu'(y).
extern "C" __global__ void bias_act_backward(
    float* dx, const float* g, const float* y, long long n, int act,
    int use_dropout, float rate, unsigned long long seed) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float factor = 1.0f;
    if (use_dropout) factor = ps_keeps(seed, (unsigned long long)i, rate) ? 1.0f / (1.0f - rate) : 0.0f;
    if (act == 1 && y[i] <= 0.0f) factor = 0.0f;
    dx[i] = g[i] * factor;
}

// out[c] = sum_r x[r, c].
extern "C" __global__ void col_sums(float* out, const float* x, int rows, int cols) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    float s = 0.0f;
    for (int r = 0; r < rows; ++r) s += x[(long long)r * cols + c];
    out[c] = s;
}

// out[c] = sum_r x[r, c] * y[r, c].
extern "C" __global__ void col_dots(float* out, const float* x, const float* y, int rows, int cols) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    float s = 0.0f;
    for (int r = 0; r < rows; ++r) s += x[(long long)r * cols + c] * y[(long long)r * cols + c];
    out[c] = s;
}

// Row-wise softmax, one thread per row (rows are the few gates of MMoE).
extern "C" __global__ void softmax_rows(float* y, const float* x, int rows, int cols) {
    int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= rows) return;
    const float* xr = x + (long long)r * cols;
    float* yr = y + (long long)r * cols;
    float m = __int_as_float(0xff800000);  // -infinity (NVRTC has no math headers)
    for (int c = 0; c < cols; ++c) m = fmaxf(m, xr[c]);
    float sum = 0.0f;
    for (int c = 0; c < cols; ++c) {
        float e = expf(xr[c] - m);
        yr[c] = e;
        sum += e;
    }
    for (int c = 0; c < cols; ++c) yr[c] /= sum;
}

// dx = y * (dy - sum_c dy * y), one thread per row.
extern "C" __global__ void softmax_rows_backward(
    float* dx, const float* dy, const float* y, int rows, int cols) {
    int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= rows) return;
    long long o = (long long)r * cols;
    float dot = 0.0f;
    for (int c = 0; c < cols; ++c) dot += dy[o + c] * y[o + c];
    for (int c = 0; c < cols; ++c) dx[o + c] = y[o + c] * (dy[o + c] - dot);
}

// out[b, c] = sum_e gates[b, e] * stacked[e * rows + b, c].
extern "C" __global__ void mix(
    float* out, const float* stacked, const float* gates, int experts, int rows, int cols) {
    long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (long long)rows * cols) return;
    int b = (int)(t / cols), c = (int)(t % cols);
    float acc = 0.0f;
    for (int e = 0; e < experts; ++e) {
        acc += gates[(long long)b * experts + e] * stacked[((long long)e * rows + b) * cols + c];
    }
    out[t] = acc;
}

// dstacked[e * rows + b, c] = gates[b, e] * grad[b, c].
extern "C" __global__ void mix_backward_experts(
    float* dstacked, const float* grad, const float* gates, int experts, int rows, int cols) {
    long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (long long)experts * rows * cols) return;
    long long er = t / cols;
    int c = (int)(t % cols);
    int e = (int)(er / rows), b = (int)(er % rows);
    dstacked[t] = gates[(long long)b * experts + e] * grad[(long long)b * cols + c];
}

// dgates[b, e] = sum_c grad[b, c] * stacked[e * rows + b, c].
extern "C" __global__ void mix_backward_gates(
    float* dgates, const float* grad, const float* stacked, int experts, int rows, int cols) {
    long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (long long)rows * experts) return;
    int b = (int)(t / experts), e = (int)(t % experts);
    float dot = 0.0f;
    for (int c = 0; c < cols; ++c) {
        dot += grad[(long long)b * cols + c] * stacked[((long long)e * rows + b) * cols + c];
    }
    dgates[t] = dot;
}
