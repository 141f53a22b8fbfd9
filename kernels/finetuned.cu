// The CUDA kernels of the device-generic training ops (src/model/ops/device_ops.rs), launched from
// src/model/ops/cuda.rs and compiled to PTX by build.rs. Each kernel computes the same function as
// its op's `cpu_fwd`: the same indexing, the same order of f32 operations per element (build.rs
// passes -fmad=false so that no a*b+c is fused where the CPU rounds twice), f32 accumulation, and
// the same dropout bits (src/model/ops/rng.rs). Only sums over a row are added in another order
// (a warp's lanes, then a butterfly), and erff/expf are CUDA's, not libm's.
//
// Storage types: float, __nv_bfloat16, __half; arithmetic is in f32 and a result is rounded to
// nearest-even once, as `half::{bf16, f16}::from_f32` do.

#include <cuda_bf16.h>
#include <cuda_fp16.h>

typedef unsigned int u32;
typedef unsigned long long u64;

// SplitMix64's index-th output from `seed`, upper 32 bits: `rng::bits`. Unsigned arithmetic
// wraps modulo 2^64 as Rust's wrapping_* do.
__device__ __forceinline__ u32 ft_bits(u64 seed, u64 index) {
    u64 z = seed + (index + 1ull) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return (u32)((z ^ (z >> 31)) >> 32);
}

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Butterfly reductions: every lane ends with the same bits (a+b == b+a), so all lanes of a row
// use one mean, one max, one sum.
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

#define GRID_STRIDE(i, n) for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (u64)blockDim.x * gridDim.x)

// Row kernels: one warp per row, blockDim = (32, rows per block). A warp past the last row
// returns as a whole, so the shuffles always see 32 active lanes.
#define ROW_OR_RETURN(row, rows) \
    const u64 row = (u64)blockIdx.x * blockDim.y + threadIdx.y; \
    if (row >= (rows)) return; \
    const u32 lane = threadIdx.x

// ---------------------------------------------------------------- dropout
template <typename T>
__device__ void dropout(const T *x, T *y, u64 n, u32 keep_below, float scale, u64 seed) {
    GRID_STRIDE(i, n) {
        y[i] = from_f<T>(ft_bits(seed, i) < keep_below ? to_f(x[i]) * scale : 0.0f);
    }
}

// ---------------------------------------------------------------- layer norm
// Two passes for the mean and the variance, as `layer_norm_row`.
template <typename T>
__device__ __forceinline__ void row_stats(const T *x, u32 h, u32 lane, float eps, float &mean, float &rstd) {
    float s = 0.0f;
    for (u32 i = lane; i < h; i += 32) s += to_f(x[i]);
    mean = warp_sum(s) / (float)h;
    float q = 0.0f;
    for (u32 i = lane; i < h; i += 32) {
        const float d = to_f(x[i]) - mean;
        q += d * d;
    }
    const float var = warp_sum(q) / (float)h;
    rstd = 1.0f / sqrtf(var + eps);
}

template <typename T>
__device__ void layer_norm_fwd(const T *x, const T *w, const T *b, T *y, u64 rows, u32 h, float eps) {
    ROW_OR_RETURN(row, rows);
    const T *xr = x + row * h;
    T *yr = y + row * h;
    float mean, rstd;
    row_stats(xr, h, lane, eps, mean, rstd);
    for (u32 i = lane; i < h; i += 32) {
        yr[i] = from_f<T>((to_f(xr[i]) - mean) * rstd * to_f(w[i]) + to_f(b[i]));
    }
}

// out: [2*rows, h]; row r of the first half is dx, row r of the second half is g*xhat.
template <typename T>
__device__ void layer_norm_bwd(const T *x, const T *w, const T *g, T *out, u64 rows, u32 h, float eps) {
    ROW_OR_RETURN(row, rows);
    const T *xr = x + row * h;
    const T *gr = g + row * h;
    T *dx = out + row * h;
    T *gx = out + (rows + row) * h;
    float mean, rstd;
    row_stats(xr, h, lane, eps, mean, rstd);
    float sum_gw = 0.0f, sum_gwx = 0.0f;
    for (u32 i = lane; i < h; i += 32) {
        const float xhat = (to_f(xr[i]) - mean) * rstd;
        const float gi = to_f(gr[i]);
        sum_gw += gi * to_f(w[i]);
        sum_gwx += gi * to_f(w[i]) * xhat;
        gx[i] = from_f<T>(gi * xhat);
    }
    const float m1 = warp_sum(sum_gw) / (float)h;
    const float m2 = warp_sum(sum_gwx) / (float)h;
    for (u32 i = lane; i < h; i += 32) {
        const float xhat = (to_f(xr[i]) - mean) * rstd;
        dx[i] = from_f<T>(rstd * (to_f(gr[i]) * to_f(w[i]) - m1 - xhat * m2));
    }
}

// ---------------------------------------------------------------- bias + GELU (erf)
// The same f32 literals as device_ops.rs (FRAC_1_SQRT_2 and INV_SQRT_2PI rounded to f32).
#define FT_SQRT_2_INV 0.70710678118654752440f
#define FT_INV_SQRT_2PI 0.3989423f

__device__ __forceinline__ float gelu(float x) { return 0.5f * x * (1.0f + erff(x * FT_SQRT_2_INV)); }

__device__ __forceinline__ float gelu_grad(float x) {
    return 0.5f * (1.0f + erff(x * FT_SQRT_2_INV)) + x * FT_INV_SQRT_2PI * expf(-0.5f * x * x);
}

// bias == nullptr (nb == 0): no bias; 0.0f is still added, as the CPU reference does.
template <typename T>
__device__ __forceinline__ float biased(const T *x, const T *bias, u64 nb, u64 n, u64 i) {
    if (bias == nullptr) return to_f(x[i]) + 0.0f;
    // 32-bit modulo where it fits: a 64-bit one costs several times more.
    const u64 j = (n | nb) <= 0xffffffffull ? (u64)((u32)i % (u32)nb) : i % nb;
    return to_f(x[i]) + to_f(bias[j]);
}

template <typename T>
__device__ void bias_gelu_fwd(const T *x, const T *bias, u64 nb, T *y, u64 n) {
    GRID_STRIDE(i, n) { y[i] = from_f<T>(gelu(biased(x, bias, nb, n, i))); }
}

template <typename T>
__device__ void bias_gelu_bwd(const T *x, const T *bias, u64 nb, const T *g, T *dx, u64 n) {
    GRID_STRIDE(i, n) { dx[i] = from_f<T>(to_f(g[i]) * gelu_grad(biased(x, bias, nb, n, i))); }
}

// ---------------------------------------------------------------- masked softmax
// s: [B, H, S, S] as rows of length S; bias: f32 [B, S]; row r uses bias row r / (H*S).
// Dropout (use_drop != 0) keeps element j of row r when bits(seed, r*S + j) < keep_below.
// Sliding window: query i = row % S sees only keys j with |i - j| <= window (0xffffffff: all).
__device__ __forceinline__ bool in_window(u32 i, u32 j, u32 window) {
    return (u64)j + window >= i && (u64)j <= (u64)i + window;
}

template <typename T>
__device__ void masked_softmax_fwd(const T *s, const float *bias, T *y, u64 rows, u32 seq, u32 heads, float scale,
                                   u32 use_drop, u32 keep_below, float drop_scale, u64 seed, u32 window) {
    ROW_OR_RETURN(row, rows);
    const T *sr = s + row * seq;
    const float *br = bias + (row / ((u64)heads * seq)) * seq;
    T *yr = y + row * seq;
    const u32 qi = (u32)(row % seq);
    float mx = -INFINITY;
    for (u32 j = lane; j < seq; j += 32) {
        if (in_window(qi, j, window)) mx = fmaxf(mx, to_f(sr[j]) * scale + br[j]);
    }
    mx = warp_max(mx);
    float sum = 0.0f;
    for (u32 j = lane; j < seq; j += 32) {
        if (in_window(qi, j, window)) sum += expf(to_f(sr[j]) * scale + br[j] - mx);
    }
    sum = warp_sum(sum);
    for (u32 j = lane; j < seq; j += 32) {
        float p = in_window(qi, j, window) ? expf(to_f(sr[j]) * scale + br[j] - mx) / sum : 0.0f;
        if (use_drop) p = ft_bits(seed, row * seq + j) < keep_below ? p * drop_scale : 0.0f;
        yr[j] = from_f<T>(p);
    }
}

// p: the probabilities before dropout, g: the output's gradient, both [rows, S].
template <typename T>
__device__ __forceinline__ float dropped_grad(const T *gr, u64 row, u32 seq, u32 j, u32 use_drop, u32 keep_below,
                                              float drop_scale, u64 seed) {
    const float g = to_f(gr[j]);
    if (!use_drop) return g;
    return ft_bits(seed, row * seq + j) < keep_below ? g * drop_scale : 0.0f;
}

template <typename T>
__device__ void masked_softmax_bwd(const T *p, const T *g, T *ds, u64 rows, u32 seq, float scale, u32 use_drop,
                                   u32 keep_below, float drop_scale, u64 seed) {
    ROW_OR_RETURN(row, rows);
    const T *pr = p + row * seq;
    const T *gr = g + row * seq;
    T *dr = ds + row * seq;
    float dot = 0.0f;
    for (u32 j = lane; j < seq; j += 32) {
        dot += to_f(pr[j]) * dropped_grad(gr, row, seq, j, use_drop, keep_below, drop_scale, seed);
    }
    dot = warp_sum(dot);
    for (u32 j = lane; j < seq; j += 32) {
        const float gj = dropped_grad(gr, row, seq, j, use_drop, keep_below, drop_scale, seed);
        dr[j] = from_f<T>(scale * to_f(pr[j]) * (gj - dot));
    }
}

// ---------------------------------------------------------------- rotary embedding
// x: [rows, hidden], rows = batch*seq, position = row % seq; table: f32 [seq, 2*hd], each
// position's cosines then its sines. sign -1: the transposed rotation (the backward pass).
template <typename T>
__device__ void rotary(const T *x, const float *table, T *y, u64 n, u32 seq, u32 hidden, u32 hd, float sign) {
    const u32 half = hd / 2;
    GRID_STRIDE(i, n) {
        const u64 row = i / hidden;
        const u32 d = (u32)(i % hidden) % hd;
        const float *t = table + (row % seq) * 2 * hd;
        const float cs = t[d], sn = t[hd + d];
        const float out = d < half ? to_f(x[i]) * cs - sign * to_f(x[i + half]) * sn
                                   : to_f(x[i]) * cs + sign * to_f(x[i - half]) * sn;
        y[i] = from_f<T>(out);
    }
}

// ---------------------------------------------------------------- GeGLU
// x: [rows, 2w]; y: [rows, w] = gelu(x[:, :w]) * x[:, w:]; n = rows * w.
template <typename T>
__device__ void geglu_fwd(const T *x, T *y, u64 n, u32 w) {
    GRID_STRIDE(i, n) {
        const T *xr = x + (i / w) * 2 * w;
        const u32 c = (u32)(i % w);
        y[i] = from_f<T>(gelu(to_f(xr[c])) * to_f(xr[w + c]));
    }
}

template <typename T>
__device__ void geglu_bwd(const T *x, const T *g, T *dx, u64 n, u32 w) {
    GRID_STRIDE(i, n) {
        const T *xr = x + (i / w) * 2 * w;
        T *dr = dx + (i / w) * 2 * w;
        const u32 c = (u32)(i % w);
        const float a = to_f(xr[c]), gi = to_f(g[i]);
        dr[c] = from_f<T>(gi * to_f(xr[w + c]) * gelu_grad(a));
        dr[w + c] = from_f<T>(gi * gelu(a));
    }
}

// ---------------------------------------------------------------- disentangled attention's lookups
// c: [T, S, R] (T = batch*heads); y: [T, S, S]; y[t][i][j] = c[t][i][idx[i*S + j]], or with
// transpose c[t][j][idx[j*S + i]].
template <typename T>
__device__ void rel_gather(const T *c, const u32 *idx, T *y, u64 n, u32 seq, u32 rows, u32 transpose) {
    GRID_STRIDE(m, n) {
        const u64 t = m / ((u64)seq * seq);
        const u32 i = (u32)(m / seq % seq), j = (u32)(m % seq);
        const u32 a = transpose ? j : i, b = transpose ? i : j;
        y[m] = c[(t * seq + a) * rows + idx[(u64)a * seq + b]];
    }
}

// The backward pass: one thread per row a of dc ([T, S, R], f32), summing its S sources in order.
template <typename T>
__device__ void rel_scatter(const T *g, const u32 *idx, float *dc, u64 owners, u32 seq, u32 rows, u32 transpose) {
    GRID_STRIDE(o, owners) {
        const u64 t = o / seq;
        const u32 a = (u32)(o % seq);
        float *d = dc + o * rows;
        for (u32 k = 0; k < rows; ++k) d[k] = 0.0f;
        for (u32 u = 0; u < seq; ++u) {
            const float v = transpose ? to_f(g[(t * seq + u) * seq + a]) : to_f(g[(t * seq + a) * seq + u]);
            d[idx[(u64)a * seq + u]] += v;
        }
    }
}

// ---------------------------------------------------------------- AdamW (f32 state)
// mv: [2n] f32, m then v; g: [n] in any of the three types.
template <typename T>
__device__ void adamw_moments(float *mv, const T *g, u64 n, float grad_scale, float beta1, float beta2) {
    GRID_STRIDE(i, n) {
        const float gi = to_f(g[i]) * grad_scale;
        mv[i] = beta1 * mv[i] + (1.0f - beta1) * gi;
        mv[n + i] = beta2 * mv[n + i] + (1.0f - beta2) * gi * gi;
    }
}

// shrink = 1 - lr*decay and step = lr/bc1 come from the host, computed as the CPU reference does.
extern "C" __global__ void __launch_bounds__(256)
    ft_adamw_apply(float *p, const float *mv, u64 n, float shrink, float step, float bc2, float eps) {
    GRID_STRIDE(i, n) { p[i] = p[i] * shrink - step * mv[i] / (sqrtf(mv[n + i] / bc2) + eps); }
}

// ---------------------------------------------------------------- entry points
#define FT_KERNELS(T, S)                                                                                            \
    extern "C" __global__ void __launch_bounds__(256)                                                               \
        ft_dropout_##S(const T *x, T *y, u64 n, u32 keep_below, float scale, u64 seed) {                            \
        dropout(x, y, n, keep_below, scale, seed);                                                                  \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(256)                                                               \
        ft_layer_norm_fwd_##S(const T *x, const T *w, const T *b, T *y, u64 rows, u32 h, float eps) {               \
        layer_norm_fwd(x, w, b, y, rows, h, eps);                                                                   \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(256)                                                               \
        ft_layer_norm_bwd_##S(const T *x, const T *w, const T *g, T *out, u64 rows, u32 h, float eps) {             \
        layer_norm_bwd(x, w, g, out, rows, h, eps);                                                                 \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(256)                                                               \
        ft_bias_gelu_fwd_##S(const T *x, const T *bias, u64 nb, T *y, u64 n) {                                      \
        bias_gelu_fwd(x, bias, nb, y, n);                                                                           \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(256)                                                               \
        ft_bias_gelu_bwd_##S(const T *x, const T *bias, u64 nb, const T *g, T *dx, u64 n) {                         \
        bias_gelu_bwd(x, bias, nb, g, dx, n);                                                                       \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(256)                                                               \
        ft_masked_softmax_fwd_##S(const T *s, const float *bias, T *y, u64 rows, u32 seq, u32 heads, float scale,   \
                                  u32 use_drop, u32 keep_below, float drop_scale, u64 seed, u32 window) {           \
        masked_softmax_fwd(s, bias, y, rows, seq, heads, scale, use_drop, keep_below, drop_scale, seed, window);    \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(256)                                                               \
        ft_masked_softmax_bwd_##S(const T *p, const T *g, T *ds, u64 rows, u32 seq, float scale, u32 use_drop,      \
                                  u32 keep_below, float drop_scale, u64 seed) {                                     \
        masked_softmax_bwd(p, g, ds, rows, seq, scale, use_drop, keep_below, drop_scale, seed);                     \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(256)                                                               \
        ft_adamw_moments_##S(float *mv, const T *g, u64 n, float grad_scale, float beta1, float beta2) {            \
        adamw_moments(mv, g, n, grad_scale, beta1, beta2);                                                          \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(256)                                                               \
        ft_rotary_##S(const T *x, const float *table, T *y, u64 n, u32 seq, u32 hidden, u32 hd, float sign) {       \
        rotary(x, table, y, n, seq, hidden, hd, sign);                                                              \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(256) ft_geglu_fwd_##S(const T *x, T *y, u64 n, u32 w) {            \
        geglu_fwd(x, y, n, w);                                                                                      \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(256)                                                               \
        ft_geglu_bwd_##S(const T *x, const T *g, T *dx, u64 n, u32 w) {                                             \
        geglu_bwd(x, g, dx, n, w);                                                                                  \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(256)                                                               \
        ft_rel_gather_##S(const T *c, const u32 *idx, T *y, u64 n, u32 seq, u32 rows, u32 transpose) {              \
        rel_gather(c, idx, y, n, seq, rows, transpose);                                                             \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(256)                                                               \
        ft_rel_scatter_##S(const T *g, const u32 *idx, float *dc, u64 owners, u32 seq, u32 rows, u32 transpose) {   \
        rel_scatter(g, idx, dc, owners, seq, rows, transpose);                                                      \
    }

FT_KERNELS(float, f32)
FT_KERNELS(__nv_bfloat16, bf16)
FT_KERNELS(__half, f16)
