// conv2d's direct launchers (the kernels: convkern/gpu/conv2d_direct.cuh).
#include "ops.cuh"
#include "convkern/gpu/conv2d_direct.cuh"

namespace convkern::cuda {
namespace {

constexpr int kThreads = 256;

bool fits32(const ConvGeom& g) {
    const i64 biggest = g.N * (g.C > g.K ? g.C : g.K) * (g.H * g.W > g.Ho * g.Wo ? g.H * g.W : g.Ho * g.Wo);
    return fits_int32(biggest + g.K * g.CRS()) && fits_int32(g.H + g.W + g.ph + g.pw + (g.R + g.S) * (g.dh + g.dw));
}

}  // namespace

template <class T>
void conv2d_forward_direct(const T* x, const T* w, const T* b, T* y, const ConvGeom& g, cudaStream_t stream) {
    const i64 n = g.N * g.K * g.Ho * g.Wo;
    if (n <= 0) return;
    if (g.Cg() == 1) {  // depthwise: stage the input tile if it fits comfortably in shared memory
        const i64 in_tw = (kTW - 1) * g.sw + (g.S - 1) * g.dw + 1, in_th = (kTH - 1) * g.sh + (g.R - 1) * g.dh + 1;
        // each side bounded before the product: with a stride near 2^31 both
        // sides are ~1e10 and their product overflows into a "small" size
        const bool tile_fits = in_tw <= 32 * 1024 && in_th <= 32 * 1024 &&
                               in_tw * in_th * static_cast<i64>(sizeof(T)) <= 32 * 1024;
        const i64 bytes = tile_fits ? in_tw * in_th * static_cast<i64>(sizeof(T)) : 0;
        if (tile_fits && g.N * g.K <= 65535LL * 32768) {
            const dim3 grid(static_cast<unsigned>((g.Wo + kTW - 1) / kTW), static_cast<unsigned>((g.Ho + kTH - 1) / kTH),
                            static_cast<unsigned>(g.N * g.K));
            if (grid.y <= 65535 && grid.z <= 65535) {
                conv_forward_depthwise_kernel<T><<<grid, dim3(kTW, kTH), static_cast<size_t>(bytes), stream>>>(
                    x, w, b, y, g, static_cast<int>(in_tw), static_cast<int>(in_th));
                check_launch("conv2d_forward_depthwise");
                return;
            }
        }
    }
    with_index_type(fits32(g), [&](auto zero) {
        typedef decltype(zero) I;
        conv_forward_direct_kernel<T, I><<<grid_for(n, kThreads), kThreads, 0, stream>>>(x, w, b, y, g);
    });
    check_launch("conv2d_forward_direct");
}

template <class T>
void conv2d_grad_input_direct(const T* gy, const T* w, T* gx, const ConvGeom& g, cudaStream_t stream) {
    const i64 n = g.N * g.C * g.H * g.W;
    if (n <= 0) return;
    with_index_type(fits32(g), [&](auto zero) {
        typedef decltype(zero) I;
        conv_grad_input_direct_kernel<T, I><<<grid_for(n, kThreads), kThreads, 0, stream>>>(gy, w, gx, g);
    });
    check_launch("conv2d_grad_input_direct");
}

template <class T>
void conv2d_grad_weight_direct(const T* gy, const T* x, T* gw, const ConvGeom& g, cudaStream_t stream) {
    const i64 n = g.K * g.CRS();
    if (n <= 0) return;
    with_index_type(fits32(g), [&](auto zero) {
        typedef decltype(zero) I;
        conv_grad_weight_direct_kernel<T, I><<<grid_for(n, kThreads), kThreads, 0, stream>>>(gy, x, gw, g);
    });
    check_launch("conv2d_grad_weight_direct");
}

template <class T>
void conv2d_grad_bias(const T* gy, T* gb, const ConvGeom& g, cudaStream_t stream) {
    if (g.K <= 0) return;
    conv_grad_bias_kernel<T><<<static_cast<unsigned>(g.K), kBiasThreads, 0, stream>>>(gy, gb, g);
    check_launch("conv2d_grad_bias");
}

template void conv2d_forward_direct<float>(const float*, const float*, const float*, float*, const ConvGeom&, cudaStream_t);
template void conv2d_forward_direct<double>(const double*, const double*, const double*, double*, const ConvGeom&,
                                            cudaStream_t);
template void conv2d_grad_input_direct<float>(const float*, const float*, float*, const ConvGeom&, cudaStream_t);
template void conv2d_grad_input_direct<double>(const double*, const double*, double*, const ConvGeom&, cudaStream_t);
template void conv2d_grad_weight_direct<float>(const float*, const float*, float*, const ConvGeom&, cudaStream_t);
template void conv2d_grad_weight_direct<double>(const double*, const double*, double*, const ConvGeom&, cudaStream_t);
template void conv2d_grad_bias<float>(const float*, float*, const ConvGeom&, cudaStream_t);
template void conv2d_grad_bias<double>(const double*, double*, const ConvGeom&, cudaStream_t);

}  // namespace convkern::cuda
