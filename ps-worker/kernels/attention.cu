// Scaled dot-product multi-head attention over short sequences, following
// backend/attention.rs element for element. q, k, v and the output are
// [positions * n, width]: token p of sequence b is row p * n + b, head h
// owns columns h * d .. (h + 1) * d. The weights are [n * heads * L, L],
// row (b, h, i) over keys j.

__device__ __forceinline__ long long ps_token(int p, int b, int h, int n, int width, int d) {
    return ((long long)p * n + b) * width + (long long)h * d;
}

// One thread per (b, h, i): the weights of query i and its output.
extern "C" __global__ void attention_forward(
    float* out, float* weights, const float* q, const float* k, const float* v,
    int n, int positions, int heads, int width, float scale) {
    long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (long long)n * heads * positions) return;
    int i = (int)(t % positions);
    int h = (int)((t / positions) % heads);
    int b = (int)(t / ((long long)positions * heads));
    int d = width / heads;
    float* w = weights + t * positions;
    const float* qi = q + ps_token(i, b, h, n, width, d);
    float m = -__int_as_float(0x7f800000);
    for (int j = 0; j < positions; ++j) {
        const float* kj = k + ps_token(j, b, h, n, width, d);
        float s = 0.0f;
        for (int c = 0; c < d; ++c) s += qi[c] * kj[c];
        w[j] = scale * s;
        m = fmaxf(m, w[j]);
    }
    float sum = 0.0f;
    for (int j = 0; j < positions; ++j) {
        w[j] = expf(w[j] - m);
        sum += w[j];
    }
    float* o = out + ps_token(i, b, h, n, width, d);
    for (int c = 0; c < d; ++c) o[c] = 0.0f;
    for (int j = 0; j < positions; ++j) {
        w[j] = w[j] / sum;
        const float* vj = v + ps_token(j, b, h, n, width, d);
        for (int c = 0; c < d; ++c) o[c] += w[j] * vj[c];
    }
}

// One thread per (b, h, i): d scores of query i (into ds, laid out as the
// weights) and d q_i.
extern "C" __global__ void attention_backward_queries(
    float* dq, float* ds, const float* g, const float* k, const float* v,
    const float* weights, int n, int positions, int heads, int width, float scale) {
    long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (long long)n * heads * positions) return;
    int i = (int)(t % positions);
    int h = (int)((t / positions) % heads);
    int b = (int)(t / ((long long)positions * heads));
    int d = width / heads;
    const float* w = weights + t * positions;
    float* dsi = ds + t * positions;
    const float* gi = g + ps_token(i, b, h, n, width, d);
    float mean = 0.0f;
    for (int j = 0; j < positions; ++j) {
        const float* vj = v + ps_token(j, b, h, n, width, d);
        float s = 0.0f;
        for (int c = 0; c < d; ++c) s += gi[c] * vj[c];
        dsi[j] = s;
        mean += w[j] * s;
    }
    float* dqi = dq + ps_token(i, b, h, n, width, d);
    for (int c = 0; c < d; ++c) dqi[c] = 0.0f;
    for (int j = 0; j < positions; ++j) {
        dsi[j] = w[j] * (dsi[j] - mean);
        const float* kj = k + ps_token(j, b, h, n, width, d);
        for (int c = 0; c < d; ++c) dqi[c] += scale * dsi[j] * kj[c];
    }
}

// One thread per (b, h, j): d k_j and d v_j, summed over queries i in order.
extern "C" __global__ void attention_backward_keys(
    float* dk, float* dv, const float* g, const float* q, const float* ds,
    const float* weights, int n, int positions, int heads, int width, float scale) {
    long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (long long)n * heads * positions) return;
    int j = (int)(t % positions);
    int h = (int)((t / positions) % heads);
    int b = (int)(t / ((long long)positions * heads));
    int d = width / heads;
    long long first = ((long long)b * heads + h) * positions;
    float* dkj = dk + ps_token(j, b, h, n, width, d);
    float* dvj = dv + ps_token(j, b, h, n, width, d);
    for (int c = 0; c < d; ++c) {
        dkj[c] = 0.0f;
        dvj[c] = 0.0f;
    }
    for (int i = 0; i < positions; ++i) {
        float dsij = ds[(first + i) * positions + j];
        const float* qi = q + ps_token(i, b, h, n, width, d);
        for (int c = 0; c < d; ++c) dkj[c] += scale * dsij * qi[c];
    }
    for (int i = 0; i < positions; ++i) {
        float wij = weights[(first + i) * positions + j];
        const float* gi = g + ps_token(i, b, h, n, width, d);
        for (int c = 0; c < d; ++c) dvj[c] += wij * gi[c];
    }
}
