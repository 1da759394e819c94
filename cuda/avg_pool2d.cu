// avg_pool2d's launchers (the kernels: convkern/gpu/avg_pool2d.cuh).
#include "ops.cuh"
#include "convkern/gpu/avg_pool2d.cuh"

namespace convkern::cuda {
namespace {

constexpr int kThreads = 256;

bool fits32(const PoolGeom& p) {
    return fits_int32(p.planes * p.H * p.W + p.ph + p.pw + p.kh + p.kw) && fits_int32(p.planes * p.Ho * p.Wo);
}

}  // namespace

template <class T>
void avg_pool2d_forward(const T* x, T* y, const PoolGeom& p, cudaStream_t stream) {
    const i64 n = p.planes * p.Ho * p.Wo;
    if (n <= 0) return;
    with_index_type(fits32(p), [&](auto zero) {
        typedef decltype(zero) I;
        avg_pool_forward_kernel<T, I><<<grid_for(n, kThreads), kThreads, 0, stream>>>(x, y, p);
    });
    check_launch("avg_pool2d_forward");
}

template <class T>
void avg_pool2d_backward(const T* gy, T* gx, const PoolGeom& p, cudaStream_t stream) {
    const i64 n = p.planes * p.H * p.W;
    if (n <= 0) return;
    with_index_type(fits32(p), [&](auto zero) {
        typedef decltype(zero) I;
        avg_pool_backward_kernel<T, I><<<grid_for(n, kThreads), kThreads, 0, stream>>>(gy, gx, p);
    });
    check_launch("avg_pool2d_backward");
}

template void avg_pool2d_forward<float>(const float*, float*, const PoolGeom&, cudaStream_t);
template void avg_pool2d_forward<double>(const double*, double*, const PoolGeom&, cudaStream_t);
template void avg_pool2d_backward<float>(const float*, float*, const PoolGeom&, cudaStream_t);
template void avg_pool2d_backward<double>(const double*, double*, const PoolGeom&, cudaStream_t);

}  // namespace convkern::cuda
