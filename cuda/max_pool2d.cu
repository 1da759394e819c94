// max_pool2d with PyTorch's rules: padding reads as -inf, NaN wins and
// propagates, ties keep the first position, indices are h*W + w within the
// plane, a window with no input gives -inf and index -1.
//
// Backward is a gather (each input sums the outputs whose index names it): no
// atomics, deterministic. A check pass first: an index outside its plane is an
// error; indices inside the plane but outside their own window (not produced
// by this pooling) take an in-order scatter, one thread per plane, which is
// slow but gives the same answer as PyTorch's scatter.
#include "ops.cuh"

namespace convkern::cuda {
namespace {

constexpr int kThreads = 256;

template <class T> __device__ inline T neg_inf();
template <> __device__ inline float neg_inf<float>() { return __int_as_float(0xff800000); }
template <> __device__ inline double neg_inf<double>() { return __longlong_as_double(0xfff0000000000000LL); }

template <class T, class I>
__global__ void max_pool_forward_kernel(const T* x, T* y, std::int64_t* ind, I planes, I H, I W, I kh, I kw, I sh,
                                        I sw, I ph, I pw, I dh, I dw, I Ho, I Wo) {
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

// bit 0: an index outside [-1, H*W); bit 1: an index outside its own window
template <class I>
__global__ void max_pool_check_kernel(const std::int64_t* ind, int* flags, I planes, I H, I W, I kh, I kw, I sh,
                                      I sw, I ph, I pw, I dh, I dw, I Ho, I Wo) {
    CK_GRID_STRIDE(I, o, planes * Ho * Wo) {
        const std::int64_t j = ind[o];
        if (j == -1) continue;
        if (j < -1 || j >= static_cast<std::int64_t>(H) * W) {
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
__global__ void max_pool_backward_gather(const T* gy, const std::int64_t* ind, T* gx, I planes, I H, I W, I kh, I kw,
                                         I sh, I sw, I ph, I pw, I dh, I dw, I Ho, I Wo) {
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
__global__ void max_pool_backward_scatter(const T* gy, const std::int64_t* ind, T* gx, i64 planes, i64 HW, i64 P) {
    CK_GRID_STRIDE(i64, t, planes) {
        T* gp = gx + t * HW;
        for (i64 i = 0; i < HW; ++i) gp[i] = T(0);
        for (i64 o = t * P; o < (t + 1) * P; ++o)
            if (ind[o] >= 0) gp[ind[o]] += gy[o];
    }
}

bool fits32(const PoolGeom& p) { return fits_int32(p.planes * p.H * p.W) && fits_int32(p.planes * p.Ho * p.Wo); }

}  // namespace

template <class T>
void max_pool2d_forward(const T* x, T* y, std::int64_t* ind, const PoolGeom& p, cudaStream_t stream) {
    const i64 n = p.planes * p.Ho * p.Wo;
    if (n <= 0) return;
    with_index_type(fits32(p), [&](auto zero) {
        typedef decltype(zero) I;
        max_pool_forward_kernel<T, I><<<grid_for(n, kThreads), kThreads, 0, stream>>>(
            x, y, ind, I(p.planes), I(p.H), I(p.W), I(p.kh), I(p.kw), I(p.sh), I(p.sw), I(p.ph), I(p.pw), I(p.dh),
            I(p.dw), I(p.Ho), I(p.Wo));
    });
    check_launch("max_pool2d_forward");
}

template <class T>
int max_pool2d_backward(const T* gy, const std::int64_t* ind, T* gx, const PoolGeom& p, cudaStream_t stream) {
    const i64 n_in = p.planes * p.H * p.W, n_out = p.planes * p.Ho * p.Wo;
    if (n_in <= 0) return 0;
    int* flags = nullptr;
    int host_flags = 0;
    if (n_out > 0) {
        if (cudaMallocAsync(reinterpret_cast<void**>(&flags), sizeof(int), stream) != cudaSuccess)
            check_launch("max_pool2d_backward (flag allocation)");
        cudaMemsetAsync(flags, 0, sizeof(int), stream);
        with_index_type(fits32(p), [&](auto zero) {
            typedef decltype(zero) I;
            max_pool_check_kernel<I><<<grid_for(n_out, kThreads), kThreads, 0, stream>>>(
                ind, flags, I(p.planes), I(p.H), I(p.W), I(p.kh), I(p.kw), I(p.sh), I(p.sw), I(p.ph), I(p.pw),
                I(p.dh), I(p.dw), I(p.Ho), I(p.Wo));
        });
        check_launch("max_pool2d_backward (index check)");
        cudaMemcpyAsync(&host_flags, flags, sizeof(int), cudaMemcpyDeviceToHost, stream);
        cudaFreeAsync(flags, stream);
        if (cudaStreamSynchronize(stream) != cudaSuccess) check_launch("max_pool2d_backward (index check)");
    }
    if (host_flags & 1) return 1;
    if (host_flags & 2) {
        max_pool_backward_scatter<T><<<grid_for(p.planes, 64), 64, 0, stream>>>(gy, ind, gx, p.planes, p.H * p.W,
                                                                                p.Ho * p.Wo);
        check_launch("max_pool2d_backward (scatter)");
        return 0;
    }
    with_index_type(fits32(p), [&](auto zero) {
        typedef decltype(zero) I;
        max_pool_backward_gather<T, I><<<grid_for(n_in, kThreads), kThreads, 0, stream>>>(
            gy, ind, gx, I(p.planes), I(p.H), I(p.W), I(p.kh), I(p.kw), I(p.sh), I(p.sw), I(p.ph), I(p.pw), I(p.dh),
            I(p.dw), I(p.Ho), I(p.Wo));
    });
    check_launch("max_pool2d_backward");
    return 0;
}

template void max_pool2d_forward<float>(const float*, float*, std::int64_t*, const PoolGeom&, cudaStream_t);
template void max_pool2d_forward<double>(const double*, double*, std::int64_t*, const PoolGeom&, cudaStream_t);
template int max_pool2d_backward<float>(const float*, const std::int64_t*, float*, const PoolGeom&, cudaStream_t);
template int max_pool2d_backward<double>(const double*, const std::int64_t*, double*, const PoolGeom&, cudaStream_t);

}  // namespace convkern::cuda
