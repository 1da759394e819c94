// max_pool2d kernels with PyTorch's rules: padding reads as -inf, NaN wins and
// propagates, ties keep the first position, indices are h*W + w within the
// plane, a window with no input gives -inf and index -1.
//
// Backward is a gather (each input sums the outputs whose index names it): no
// atomics, deterministic. A check pass comes first: an index outside its plane
// is an error; indices inside the plane but outside their own window (not
// produced by this pooling) take an in-order scatter, one thread per plane,
// which is slow but gives the same answer as PyTorch's scatter.
#pragma once
#include "device.cuh"

namespace convkern::cuda {

template <class T> __device__ inline T neg_inf();
template <> __device__ inline float neg_inf<float>() { return __int_as_float(0xff800000); }
template <> __device__ inline double neg_inf<double>() { return __longlong_as_double(0xfff0000000000000LL); }

template <class T, class I>
__global__ void max_pool_forward_kernel(const T* x, T* y, geom_int* ind, PoolGeom geom) {
    CK_POOL_LOCALS(I, geom);
    CK_GRID_STRIDE(I, i, planes * Ho * Wo) {
        const I wo = i % Wo, ho = (i / Wo) % Ho, t = i / (Wo * Ho);
        const T* xp = x + static_cast<i64>(t) * H * W;
        T m = neg_inf<T>();
        I best = -1;
        for (I a = 0; a < kh; ++a) {
            const I h = ho * sh - ph + a * dh;
            if (h < 0 || h >= H) continue;
            for (I c = 0; c < kw; ++c) {
                const I w = wo * sw - pw + c * dw;
                if (w < 0 || w >= W) continue;
                const T v = xp[h * W + w];
                if (best == -1 || v > m || v != v) {  // first real position, then larger or NaN
                    m = v;
                    best = h * W + w;
                }
            }
        }
        y[i] = m;
        if (ind) ind[i] = best;
    }
}

// flags bit 0: an index outside [-1, H*W); bit 1: an index outside its own window
template <class I>
__global__ void max_pool_check_kernel(const geom_int* ind, int* flags, PoolGeom geom) {
    CK_POOL_LOCALS(I, geom);
    CK_GRID_STRIDE(I, o, planes * Ho * Wo) {
        const geom_int j = ind[o];
        if (j == -1) continue;
        if (j < -1 || j >= static_cast<geom_int>(H) * W) {
            atomicOr(flags, 1);
            continue;
        }
        const I wo = o % Wo, ho = (o / Wo) % Ho;
        const I h = static_cast<I>(j / W), w = static_cast<I>(j % W);
        const I dh0 = h - (ho * sh - ph), dw0 = w - (wo * sw - pw);
        const bool inside = dh0 >= 0 && dw0 >= 0 && dh0 % dh == 0 && dw0 % dw == 0 && dh0 / dh < kh && dw0 / dw < kw;
        if (!inside) atomicOr(flags, 2);
    }
}

template <class T, class I>
__global__ void max_pool_backward_gather(const T* gy, const geom_int* ind, T* gx, PoolGeom geom) {
    CK_POOL_LOCALS(I, geom);
    CK_GRID_STRIDE(I, i, planes * H * W) {
        const I w = i % W, h = (i / W) % H, t = i / (W * H), self = h * W + w;
        T acc = T(0);
        for (I a = 0; a < kh; ++a) {
            const I ho = tap_output(h, ph, a, dh, sh, Ho);
            if (ho < 0) continue;
            for (I c = 0; c < kw; ++c) {
                const I wo = tap_output(w, pw, c, dw, sw, Wo);
                if (wo < 0) continue;
                const I o = (t * Ho + ho) * Wo + wo;
                if (ind[o] == self) acc += gy[o];
            }
        }
        gx[i] = acc;
    }
}

template <class T>
__global__ void max_pool_backward_scatter(const T* gy, const geom_int* ind, T* gx, PoolGeom geom) {
    const i64 HW = geom.H * geom.W, P = geom.Ho * geom.Wo;
    CK_GRID_STRIDE(i64, t, geom.planes) {
        T* gp = gx + t * HW;
        for (i64 i = 0; i < HW; ++i) gp[i] = T(0);
        for (i64 o = t * P; o < (t + 1) * P; ++o)
            if (ind[o] >= 0) gp[ind[o]] += gy[o];
    }
}

}  // namespace convkern::cuda
