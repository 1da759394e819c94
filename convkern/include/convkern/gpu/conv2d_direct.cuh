// conv2d kernels of the direct algorithm: one thread per output element
// (forward), input element (grad input, a gather over the outputs that read
// it) or weight (grad weight, a reduction over batch and output). No atomics:
// every result is written by one thread in a fixed order, so results are
// deterministic. Depthwise layers (one input channel per group) have a tiled
// forward kernel that stages the input tile and its halo in shared memory.
#pragma once
#include "device.cuh"

namespace convkern::cuda {

template <class T, class I>
__global__ void conv_forward_direct_kernel(const T* x, const T* w, const T* b, T* y, ConvGeom geom) {
    CK_CONV_LOCALS(I, geom);
    const I Cg = C / G, Kg = K / G;
    CK_GRID_STRIDE(I, i, N * K * Ho * Wo) {
        const I wo = i % Wo, ho = (i / Wo) % Ho, k = (i / (Wo * Ho)) % K, n = i / (Wo * Ho * K);
        const I g = k / Kg;
        T acc = b ? b[k] : T(0);
        for (I c = 0; c < Cg; ++c) {
            const T* xp = x + (static_cast<i64>(n) * C + g * Cg + c) * H * W;
            const T* wp = w + (static_cast<i64>(k) * Cg + c) * R * S;
            // taps on padding multiply a zero, as a padded input would: a NaN or
            // inf weight there gives NaN, as in PyTorch (no host-side check needed)
            for (I r = 0; r < R; ++r) {
                const I h = ho * sh - ph + r * dh;
                const bool row_in = h >= 0 && h < H;
                for (I s = 0; s < S; ++s) {
                    const I iw = wo * sw - pw + s * dw;
                    const T v = row_in && iw >= 0 && iw < W ? xp[h * W + iw] : T(0);
                    acc += wp[r * S + s] * v;
                }
            }
        }
        y[i] = acc;
    }
}

// Depthwise: a block computes a TW x TH tile of one output plane; the input
// tile it reads (with halo, zero where it is padding) sits in shared memory.
constexpr int kTW = 32, kTH = 8;  // the CUDA module's launcher sizes the grid and tile

template <class T>
__global__ void conv_forward_depthwise_kernel(const T* x, const T* w, const T* b, T* y, ConvGeom g, int in_tw,
                                              int in_th) {
    extern __shared__ unsigned char smem_raw[];
    T* tile = reinterpret_cast<T*>(smem_raw);
    const i64 Kg = g.K / g.G;
    const i64 plane = blockIdx.z;  // n * K + k
    const i64 n = plane / g.K, k = plane % g.K, c = k / Kg;
    const i64 ho0 = static_cast<i64>(blockIdx.y) * kTH, wo0 = static_cast<i64>(blockIdx.x) * kTW;
    const i64 h_base = ho0 * g.sh - g.ph, w_base = wo0 * g.sw - g.pw;
    const T* xp = x + (n * g.C + c) * g.H * g.W;
    for (int t = threadIdx.y * kTW + threadIdx.x; t < in_th * in_tw; t += kTW * kTH) {
        const i64 h = h_base + t / in_tw, iw = w_base + t % in_tw;
        tile[t] = (h >= 0 && h < g.H && iw >= 0 && iw < g.W) ? xp[h * g.W + iw] : T(0);
    }
    __syncthreads();
    const i64 ho = ho0 + threadIdx.y, wo = wo0 + threadIdx.x;
    if (ho >= g.Ho || wo >= g.Wo) return;
    const T* wp = w + k * g.R * g.S;
    T acc = b ? b[k] : T(0);
    for (i64 r = 0; r < g.R; ++r) {
        const T* row = tile + (threadIdx.y * g.sh + r * g.dh) * in_tw + threadIdx.x * g.sw;
        for (i64 s = 0; s < g.S; ++s) acc += wp[r * g.S + s] * row[s * g.dw];
    }
    y[(plane * g.Ho + ho) * g.Wo + wo] = acc;
}

template <class T, class I>
__global__ void conv_grad_input_direct_kernel(const T* gy, const T* w, T* gx, ConvGeom geom) {
    CK_CONV_LOCALS(I, geom);
    const I Cg = C / G, Kg = K / G;
    CK_GRID_STRIDE(I, i, N * C * H * W) {
        const I iw = i % W, h = (i / W) % H, c = (i / (W * H)) % C, n = i / (W * H * C);
        const I g = c / Cg, cc = c % Cg;
        T acc = T(0);
        for (I r = 0; r < R; ++r) {
            const I ho = tap_output(h, ph, r, dh, sh, Ho);
            if (ho < 0) continue;
            for (I s = 0; s < S; ++s) {
                const I wo = tap_output(iw, pw, s, dw, sw, Wo);
                if (wo < 0) continue;
                for (I k = g * Kg; k < (g + 1) * Kg; ++k)
                    acc += gy[((static_cast<i64>(n) * K + k) * Ho + ho) * Wo + wo] *
                           w[((static_cast<i64>(k) * Cg + cc) * R + r) * S + s];
            }
        }
        gx[i] = acc;
    }
}

template <class T, class I>
__global__ void conv_grad_weight_direct_kernel(const T* gy, const T* x, T* gw, ConvGeom geom) {
    CK_CONV_LOCALS(I, geom);
    const I Cg = C / G, Kg = K / G;
    CK_GRID_STRIDE(I, i, K * Cg * R * S) {
        const I s = i % S, r = (i / S) % R, cc = (i / (S * R)) % Cg, k = i / (S * R * Cg);
        const I c = (k / Kg) * Cg + cc;
        T acc = T(0);
        for (I n = 0; n < N; ++n)
            for (I ho = 0; ho < Ho; ++ho) {  // padding multiplies a zero, as in forward
                const I h = ho * sh - ph + r * dh;
                const bool row_in = h >= 0 && h < H;
                for (I wo = 0; wo < Wo; ++wo) {
                    const I iw = wo * sw - pw + s * dw;
                    const T v = row_in && iw >= 0 && iw < W ? x[((static_cast<i64>(n) * C + c) * H + h) * W + iw] : T(0);
                    acc += gy[((static_cast<i64>(n) * K + k) * Ho + ho) * Wo + wo] * v;
                }
            }
        gw[i] = acc;
    }
}

// gb[k]: one block per channel; each thread sums a fixed strided subset in
// double, then a fixed-shape tree in shared memory: deterministic.
constexpr int kBiasThreads = 256;  // the block size conv_grad_bias_kernel must be launched with

template <class T>
__global__ void conv_grad_bias_kernel(const T* gy, T* gb, ConvGeom geom) {
    const i64 N = geom.N, K = geom.K, P = geom.Ho * geom.Wo;
    constexpr int kThreads = kBiasThreads;
    __shared__ double part[kThreads];
    const i64 k = blockIdx.x;
    double acc = 0.0;
    for (i64 n = 0; n < N; ++n) {
        const T* row = gy + (n * K + k) * P;
        for (i64 p = threadIdx.x; p < P; p += kThreads) acc += static_cast<double>(row[p]);
    }
    part[threadIdx.x] = acc;
    __syncthreads();
    for (int half = kThreads / 2; half > 0; half /= 2) {
        if (threadIdx.x < half) part[threadIdx.x] += part[threadIdx.x + half];
        __syncthreads();
    }
    if (threadIdx.x == 0) gb[k] = static_cast<T>(part[0]);
}

}  // namespace convkern::cuda
