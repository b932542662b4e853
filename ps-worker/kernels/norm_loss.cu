// Batch normalization (statistics, apply, backward) and the loss:
// binary cross-entropy with logits and the sigmoid.

// stats[0, c] = mean, stats[1, c] = biased variance, inv_std[c]; with
// use_running, the mean and variance are params rows 2 and 3 instead.
extern "C" __global__ void bn_stats(
    float* stats, float* inv_std, const float* x, const float* params,
    int rows, int cols, int use_running, float eps) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    float mean, var;
    if (use_running) {
        mean = params[2 * cols + c];
        var = params[3 * cols + c];
    } else {
        float n = rows > 0 ? (float)rows : 1.0f;
        float s = 0.0f;
        for (int r = 0; r < rows; ++r) s += x[(long long)r * cols + c];
        mean = s / n;
        float q = 0.0f;
        for (int r = 0; r < rows; ++r) {
            float d = x[(long long)r * cols + c] - mean;
            q += d * d;
        }
        var = q / n;
    }
    stats[c] = mean;
    stats[cols + c] = var;
    inv_std[c] = 1.0f / sqrtf(var + eps);
}

// xhat = (x - mean) * inv_std; y = gamma * xhat + beta.
extern "C" __global__ void bn_apply(
    float* y, float* xhat, const float* x, const float* stats, const float* inv_std,
    const float* params, int rows, int cols) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)rows * cols) return;
    int c = (int)(i % cols);
    float h = (x[i] - stats[c]) * inv_std[c];
    xhat[i] = h;
    y[i] = params[c] * h + params[cols + c];
}

// dx = gamma * inv_std / n * (n g - dbeta - xhat dgamma); dparams = [dgamma; dbeta].
extern "C" __global__ void bn_backward(
    float* dx, const float* g, const float* xhat, const float* inv_std,
    const float* params, const float* dparams, int rows, int cols) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)rows * cols) return;
    int c = (int)(i % cols);
    float n = rows > 0 ? (float)rows : 1.0f;
    float scale = params[c] * inv_std[c] / n;
    dx[i] = (g[i] * n - dparams[cols + c] - xhat[i] * dparams[c]) * scale;
}

// loss[i] = bce(z, y); grad[i] = (sigmoid(z) - y) / n.
extern "C" __global__ void bce_with_logits(
    float* loss, float* grad, const float* z, const float* y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float v = z[i];
    loss[i] = fmaxf(v, 0.0f) - v * y[i] + log1pf(expf(-fabsf(v)));
    grad[i] = (1.0f / (1.0f + expf(-v)) - y[i]) / (float)n;
}

extern "C" __global__ void sigmoid(float* out, const float* x, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = 1.0f / (1.0f + expf(-x[i]));
}
