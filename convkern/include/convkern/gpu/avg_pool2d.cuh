// avg_pool2d kernels with PyTorch's divisor rules (count_include_pad,
// divisor_override, ceil-mode windows clipped to the padded input). Backward
// gathers: each input sums the outputs whose window holds it, in a fixed
// order; deterministic.
#pragma once
#include "device.cuh"

namespace convkern::cuda {

template <class I>
struct AvgWindow {
    I h0, h1, w0, w1;
    i64 divisor;  // 0: the window holds no input
};

template <class I>
__device__ inline AvgWindow<I> avg_window(I ho, I wo, I H, I W, I kh, I kw, I sh, I sw, I ph, I pw,
                                          bool count_include_pad, i64 divisor_override) {
    I h0 = ho * sh - ph, w0 = wo * sw - pw;
    I h1 = min(h0 + kh, H + ph), w1 = min(w0 + kw, W + pw);
    const i64 pool_size = static_cast<i64>(h1 - h0) * (w1 - w0);
    h0 = max(h0, I(0));
    w0 = max(w0, I(0));
    h1 = min(h1, H);
    w1 = min(w1, W);
    AvgWindow<I> a{h0, h1, w0, w1, 0};
    if (h0 >= h1 || w0 >= w1) return a;
    a.divisor = divisor_override ? divisor_override
                                 : (count_include_pad ? pool_size : static_cast<i64>(h1 - h0) * (w1 - w0));
    return a;
}

template <class T, class I>
__global__ void avg_pool_forward_kernel(const T* x, T* y, PoolGeom geom) {
    CK_POOL_LOCALS(I, geom);
    const bool count_include_pad = geom.count_include_pad != 0;
    const i64 divisor_override = geom.divisor_override;
    CK_GRID_STRIDE(I, i, planes * Ho * Wo) {
        const I wo = i % Wo, ho = (i / Wo) % Ho, t = i / (Wo * Ho);
        const AvgWindow<I> a = avg_window(ho, wo, H, W, kh, kw, sh, sw, ph, pw, count_include_pad, divisor_override);
        const T* xp = x + static_cast<i64>(t) * H * W;
        T sum = T(0);
        for (I h = a.h0; h < a.h1; ++h)
            for (I w = a.w0; w < a.w1; ++w) sum += xp[h * W + w];
        y[i] = a.divisor ? sum / static_cast<T>(a.divisor) : T(0);
    }
}

template <class T, class I>
__global__ void avg_pool_backward_kernel(const T* gy, T* gx, PoolGeom geom) {
    CK_POOL_LOCALS(I, geom);
    const bool count_include_pad = geom.count_include_pad != 0;
    const i64 divisor_override = geom.divisor_override;
    CK_GRID_STRIDE(I, i, planes * H * W) {
        const I w = i % W, h = (i / W) % H, t = i / (W * H);
        // outputs whose unclipped window [o*s - p, o*s - p + k) holds h (resp. w)
        const I ho_lo = max(I(0), (h + ph - kh + sh) / sh), ho_hi = min(Ho - 1, (h + ph) / sh);
        const I wo_lo = max(I(0), (w + pw - kw + sw) / sw), wo_hi = min(Wo - 1, (w + pw) / sw);
        T acc = T(0);
        for (I ho = ho_lo; ho <= ho_hi; ++ho)
            for (I wo = wo_lo; wo <= wo_hi; ++wo) {
                const AvgWindow<I> a =
                    avg_window(ho, wo, H, W, kh, kw, sh, sw, ph, pw, count_include_pad, divisor_override);
                if (!a.divisor || h < a.h0 || h >= a.h1 || w < a.w0 || w >= a.w1) continue;
                acc += gy[(static_cast<i64>(t) * Ho + ho) * Wo + wo] / static_cast<T>(a.divisor);
            }
        gx[i] = acc;
    }
}

}  // namespace convkern::cuda
