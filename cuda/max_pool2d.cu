// max_pool2d's launchers (the kernels and their rules: convkern/gpu/max_pool2d.cuh).
#include "ops.cuh"
#include "convkern/gpu/max_pool2d.cuh"

namespace convkern::cuda {
namespace {

constexpr int kThreads = 256;

bool fits32(const PoolGeom& p) { return fits_int32(p.planes * p.H * p.W) && fits_int32(p.planes * p.Ho * p.Wo); }

}  // namespace

template <class T>
void max_pool2d_forward(const T* x, T* y, std::int64_t* ind, const PoolGeom& p, cudaStream_t stream) {
    const i64 n = p.planes * p.Ho * p.Wo;
    if (n <= 0) return;
    with_index_type(fits32(p), [&](auto zero) {
        typedef decltype(zero) I;
        max_pool_forward_kernel<T, I><<<grid_for(n, kThreads), kThreads, 0, stream>>>(x, y, ind, p);
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
            max_pool_check_kernel<I><<<grid_for(n_out, kThreads), kThreads, 0, stream>>>(ind, flags, p);
        });
        check_launch("max_pool2d_backward (index check)");
        cudaMemcpyAsync(&host_flags, flags, sizeof(int), cudaMemcpyDeviceToHost, stream);
        cudaFreeAsync(flags, stream);
        if (cudaStreamSynchronize(stream) != cudaSuccess) check_launch("max_pool2d_backward (index check)");
    }
    if (host_flags & 1) return 1;
    if (host_flags & 2) {
        max_pool_backward_scatter<T><<<grid_for(p.planes, 64), 64, 0, stream>>>(gy, ind, gx, p);
        check_launch("max_pool2d_backward (scatter)");
        return 0;
    }
    with_index_type(fits32(p), [&](auto zero) {
        typedef decltype(zero) I;
        max_pool_backward_gather<T, I><<<grid_for(n_in, kThreads), kThreads, 0, stream>>>(gy, ind, gx, p);
    });
    check_launch("max_pool2d_backward");
    return 0;
}

template void max_pool2d_forward<float>(const float*, float*, std::int64_t*, const PoolGeom&, cudaStream_t);
template void max_pool2d_forward<double>(const double*, double*, std::int64_t*, const PoolGeom&, cudaStream_t);
template int max_pool2d_backward<float>(const float*, const std::int64_t*, float*, const PoolGeom&, cudaStream_t);
template int max_pool2d_backward<double>(const double*, const std::int64_t*, double*, const PoolGeom&, cudaStream_t);

}  // namespace convkern::cuda
