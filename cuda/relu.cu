// relu forward and backward: memory-bound, so 16-byte vector accesses when
// the pointers allow them (CuPy allocations do), scalar otherwise.
// relu(NaN) is NaN; the gradient passes where x > 0 or x is NaN.
#include "ops.cuh"
#include "convkern/gpu/relu.cuh"

namespace convkern::cuda {
namespace {

bool aligned16(const void* p) { return (reinterpret_cast<std::uintptr_t>(p) & 15u) == 0; }

constexpr int kThreads = 256;

}  // namespace

template <class T>
void relu_forward(const T* x, T* y, i64 n, cudaStream_t stream) {
    if (n <= 0) return;
    typedef typename Vec16<T>::type V;
    constexpr int L = Vec16<T>::n;
    i64 done = 0;
    if (aligned16(x) && aligned16(y) && n >= L) {
        const i64 nv = n / L;
        relu_forward_vec<T><<<grid_for(nv, kThreads), kThreads, 0, stream>>>(reinterpret_cast<const V*>(x),
                                                                              reinterpret_cast<V*>(y), nv);
        check_launch("relu_forward_vec");
        done = nv * L;
    }
    if (done < n) {
        relu_forward_scalar<T><<<grid_for(n - done, kThreads), kThreads, 0, stream>>>(x, y, done, n);
        check_launch("relu_forward_scalar");
    }
}

template <class T>
void relu_backward(const T* gy, const T* x, T* gx, i64 n, cudaStream_t stream) {
    if (n <= 0) return;
    typedef typename Vec16<T>::type V;
    constexpr int L = Vec16<T>::n;
    i64 done = 0;
    if (aligned16(gy) && aligned16(x) && aligned16(gx) && n >= L) {
        const i64 nv = n / L;
        relu_backward_vec<T><<<grid_for(nv, kThreads), kThreads, 0, stream>>>(
            reinterpret_cast<const V*>(gy), reinterpret_cast<const V*>(x), reinterpret_cast<V*>(gx), nv);
        check_launch("relu_backward_vec");
        done = nv * L;
    }
    if (done < n) {
        relu_backward_scalar<T><<<grid_for(n - done, kThreads), kThreads, 0, stream>>>(gy, x, gx, done, n);
        check_launch("relu_backward_scalar");
    }
}

template void relu_forward<float>(const float*, float*, i64, cudaStream_t);
template void relu_forward<double>(const double*, double*, i64, cudaStream_t);
template void relu_backward<float>(const float*, const float*, float*, i64, cudaStream_t);
template void relu_backward<double>(const double*, const double*, double*, i64, cudaStream_t);

}  // namespace convkern::cuda
