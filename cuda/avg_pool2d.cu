// avg_pool2d with PyTorch's divisor rules (count_include_pad, divisor_override,
// ceil-mode windows clipped to the padded input). Backward gathers: each input
// sums the outputs whose window holds it, in a fixed order; deterministic.
#include "ops.cuh"

namespace convkern::cuda {
namespace {

constexpr int kThreads = 256;

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
__global__ void avg_pool_forward_kernel(const T* x, T* y, I planes, I H, I W, I kh, I kw, I sh, I sw, I ph, I pw,
                                        I Ho, I Wo, bool count_include_pad, i64 divisor_override) {
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
__global__ void avg_pool_backward_kernel(const T* gy, T* gx, I planes, I H, I W, I kh, I kw, I sh, I sw, I ph, I pw,
                                         I Ho, I Wo, bool count_include_pad, i64 divisor_override) {
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

bool fits32(const PoolGeom& p) {
    return fits_int32(p.planes * p.H * p.W + p.ph + p.pw + p.kh + p.kw) && fits_int32(p.planes * p.Ho * p.Wo);
}

}  // namespace

template <class T>
void avg_pool2d_forward(const T* x, T* y, const PoolGeom& p, bool count_include_pad, i64 divisor_override,
                        cudaStream_t stream) {
    const i64 n = p.planes * p.Ho * p.Wo;
    if (n <= 0) return;
    with_index_type(fits32(p), [&](auto zero) {
        typedef decltype(zero) I;
        avg_pool_forward_kernel<T, I><<<grid_for(n, kThreads), kThreads, 0, stream>>>(
            x, y, I(p.planes), I(p.H), I(p.W), I(p.kh), I(p.kw), I(p.sh), I(p.sw), I(p.ph), I(p.pw), I(p.Ho),
            I(p.Wo), count_include_pad, divisor_override);
    });
    check_launch("avg_pool2d_forward");
}

template <class T>
void avg_pool2d_backward(const T* gy, T* gx, const PoolGeom& p, bool count_include_pad, i64 divisor_override,
                         cudaStream_t stream) {
    const i64 n = p.planes * p.H * p.W;
    if (n <= 0) return;
    with_index_type(fits32(p), [&](auto zero) {
        typedef decltype(zero) I;
        avg_pool_backward_kernel<T, I><<<grid_for(n, kThreads), kThreads, 0, stream>>>(
            gy, gx, I(p.planes), I(p.H), I(p.W), I(p.kh), I(p.kw), I(p.sh), I(p.sw), I(p.ph), I(p.pw), I(p.Ho),
            I(p.Wo), count_include_pad, divisor_override);
    });
    check_launch("avg_pool2d_backward");
}

template void avg_pool2d_forward<float>(const float*, float*, const PoolGeom&, bool, i64, cudaStream_t);
template void avg_pool2d_forward<double>(const double*, double*, const PoolGeom&, bool, i64, cudaStream_t);
template void avg_pool2d_backward<float>(const float*, float*, const PoolGeom&, bool, i64, cudaStream_t);
template void avg_pool2d_backward<double>(const double*, double*, const PoolGeom&, bool, i64, cudaStream_t);

}  // namespace convkern::cuda
