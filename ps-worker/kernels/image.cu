// Image ops over NHWC batches stored as [n * h * w, c] (one row per pixel).
// Each kernel follows backend/image.rs element for element, summing in the
// same order, so the CPU and CUDA backends agree to rounding.
//
// Geometry arguments: n images of h x w pixels and c channels, a kh x kw
// window moved by `stride` over an input padded by `pad` on every side,
// giving oh x ow outputs.

// cols[((b, oy, ox), (ky, kx, ch))] = x[b, oy*s + ky - p, ox*s + kx - p, ch],
// zero in the padding. One thread per element of cols.
extern "C" __global__ void im2col(
    float* cols, const float* x, int n, int h, int w, int c,
    int kh, int kw, int stride, int pad, int oh, int ow) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    long long total = (long long)n * oh * ow * kh * kw * c;
    if (i >= total) return;
    int ch = (int)(i % c);
    long long r = i / c;
    int kx = (int)(r % kw); r /= kw;
    int ky = (int)(r % kh); r /= kh;
    int ox = (int)(r % ow); r /= ow;
    int oy = (int)(r % oh);
    int b = (int)(r / oh);
    int y = oy * stride + ky - pad;
    int xx = ox * stride + kx - pad;
    cols[i] = (y >= 0 && y < h && xx >= 0 && xx < w)
        ? x[(((long long)b * h + y) * w + xx) * c + ch] : 0.0f;
}

// First and last output index (inclusive) whose window covers input
// coordinate `v` along one axis.
__device__ __forceinline__ void ps_covering(
    int v, int pad, int k, int stride, int out, int* first, int* last) {
    int hi = v + pad;            // o * stride <= v + pad
    int lo = v + pad - k + 1;    // o * stride >= v + pad - k + 1
    *first = lo <= 0 ? 0 : (lo + stride - 1) / stride;
    *last = min(out - 1, hi / stride);
}

// The adjoint of im2col: each input element sums the patch entries that
// copied it, in (oy, ox) order. One thread per input element.
extern "C" __global__ void col2im(
    float* x, const float* cols, int n, int h, int w, int c,
    int kh, int kw, int stride, int pad, int oh, int ow) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    long long total = (long long)n * h * w * c;
    if (i >= total) return;
    int ch = (int)(i % c);
    long long r = i / c;
    int xx = (int)(r % w); r /= w;
    int y = (int)(r % h);
    int b = (int)(r / h);
    int oy0, oy1, ox0, ox1;
    ps_covering(y, pad, kh, stride, oh, &oy0, &oy1);
    ps_covering(xx, pad, kw, stride, ow, &ox0, &ox1);
    float acc = 0.0f;
    for (int oy = oy0; oy <= oy1; ++oy) {
        int ky = y + pad - oy * stride;
        for (int ox = ox0; ox <= ox1; ++ox) {
            int kx = xx + pad - ox * stride;
            long long at = ((((long long)b * oh + oy) * ow + ox) * kh + ky) * kw + kx;
            acc += cols[at * c + ch];
        }
    }
    x[i] = acc;
}

// The max (kind 0) or mean over in-image pixels (kind 1) of output element
// (b, oy, ox, ch)'s window; with `argmax`, the flat pixel index of the
// first maximum in scan order.
__device__ float ps_pool_window(
    const float* x, int b, int oy, int ox, int ch, int h, int w, int c,
    int kh, int kw, int stride, int pad, int kind, long long* argmax) {
    float best = -__int_as_float(0x7f800000);
    float sum = 0.0f;
    int count = 0;
    long long at = -1;
    for (int ky = 0; ky < kh; ++ky) {
        int y = oy * stride + ky - pad;
        if (y < 0 || y >= h) continue;
        for (int kx = 0; kx < kw; ++kx) {
            int xx = ox * stride + kx - pad;
            if (xx < 0 || xx >= w) continue;
            long long pixel = ((long long)b * h + y) * w + xx;
            float v = x[pixel * c + ch];
            if (kind == 0) {
                if (v > best || at < 0) { best = v; at = pixel; }
            } else {
                sum += v;
                count += 1;
            }
        }
    }
    if (argmax) *argmax = at;
    if (kind == 0) return best;
    return sum / (float)(count > 0 ? count : 1);
}

// One thread per output element.
extern "C" __global__ void pool2d(
    float* y, const float* x, int n, int h, int w, int c,
    int kh, int kw, int stride, int pad, int oh, int ow, int kind) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    long long total = (long long)n * oh * ow * c;
    if (i >= total) return;
    int ch = (int)(i % c);
    long long r = i / c;
    int ox = (int)(r % ow); r /= ow;
    int oy = (int)(r % oh);
    int b = (int)(r / oh);
    y[i] = ps_pool_window(x, b, oy, ox, ch, h, w, c, kh, kw, stride, pad, kind, 0);
}

// dx: each input element gathers, in (oy, ox) order, the gradient of the
// windows that cover it: all of a max window's when it is that window's
// first maximum, a 1/count share of an average window's. One thread per
// input element.
extern "C" __global__ void pool2d_backward(
    float* dx, const float* dy, const float* x, int n, int h, int w, int c,
    int kh, int kw, int stride, int pad, int oh, int ow, int kind) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    long long total = (long long)n * h * w * c;
    if (i >= total) return;
    int ch = (int)(i % c);
    long long pixel = i / c;
    int xx = (int)(pixel % w);
    int y = (int)((pixel / w) % h);
    int b = (int)(pixel / ((long long)w * h));
    int oy0, oy1, ox0, ox1;
    ps_covering(y, pad, kh, stride, oh, &oy0, &oy1);
    ps_covering(xx, pad, kw, stride, ow, &ox0, &ox1);
    float acc = 0.0f;
    for (int oy = oy0; oy <= oy1; ++oy) {
        for (int ox = ox0; ox <= ox1; ++ox) {
            float g = dy[((((long long)b * oh + oy) * ow) + ox) * c + ch];
            if (kind == 0) {
                long long at;
                ps_pool_window(x, b, oy, ox, ch, h, w, c, kh, kw, stride, pad, 0, &at);
                if (at == pixel) acc += g;
            } else {
                int ys = max(0, oy * stride - pad), ye = min(h, oy * stride - pad + kh);
                int xs = max(0, ox * stride - pad), xe = min(w, ox * stride - pad + kw);
                int count = (ye - ys) * (xe - xs);
                acc += g / (float)(count > 0 ? count : 1);
            }
        }
    }
    dx[i] = acc;
}

// dst[:, dst_start .. dst_start + width] = src[:, src_start .. src_start + width]
// for `rows` rows: one part of a concatenation, or a slice of columns.
extern "C" __global__ void copy_cols(
    float* dst, int dst_cols, int dst_start,
    const float* src, int src_cols, int src_start, long long rows, int width) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= rows * width) return;
    long long r = i / width;
    int j = (int)(i % width);
    dst[r * dst_cols + dst_start + j] = src[r * src_cols + src_start + j];
}

// Per row of logits z [n, k] with class label y: loss = log(sum exp(z - max))
// + max - z[y]; grad = (softmax(z) - onehot(y)) / n. Labels were checked on
// the host. One thread per row.
extern "C" __global__ void softmax_xent(
    float* loss, float* grad, const float* z, const float* labels, int n, int k) {
    int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= n) return;
    const float* row = z + (long long)r * k;
    float* g = grad + (long long)r * k;
    int y = (int)labels[r];
    float m = -__int_as_float(0x7f800000);
    for (int j = 0; j < k; ++j) m = fmaxf(m, row[j]);
    float sum = 0.0f;
    for (int j = 0; j < k; ++j) sum += expf(row[j] - m);
    loss[r] = logf(sum) + m - row[y];
    for (int j = 0; j < k; ++j) {
        float p = expf(row[j] - m) / sum;
        g[j] = (p - (j == y ? 1.0f : 0.0f)) / (float)n;
    }
}
