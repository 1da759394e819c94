// relu forward and backward: memory-bound, so 16-byte vector accesses when
// the pointers allow them (CuPy allocations do), scalar otherwise.
// relu(NaN) is NaN; the gradient passes where x > 0 or x is NaN.
#include "ops.cuh"

namespace convkern::cuda {
namespace {

template <class T> struct Vec16;
template <> struct Vec16<float> { typedef float4 type; static constexpr int n = 4; };
template <> struct Vec16<double> { typedef double2 type; static constexpr int n = 2; };

template <class T> __device__ inline T relu1(T v) { return (v > T(0) || v != v) ? v : T(0); }
template <class T> __device__ inline T relu_grad1(T g, T v) { return v <= T(0) ? T(0) : g; }

__device__ inline float4 relu_v(float4 v) { return make_float4(relu1(v.x), relu1(v.y), relu1(v.z), relu1(v.w)); }
__device__ inline double2 relu_v(double2 v) { return make_double2(relu1(v.x), relu1(v.y)); }
__device__ inline float4 relu_grad_v(float4 g, float4 v) {
    return make_float4(relu_grad1(g.x, v.x), relu_grad1(g.y, v.y), relu_grad1(g.z, v.z), relu_grad1(g.w, v.w));
}
__device__ inline double2 relu_grad_v(double2 g, double2 v) {
    return make_double2(relu_grad1(g.x, v.x), relu_grad1(g.y, v.y));
}

template <class T>
__global__ void relu_forward_vec(const typename Vec16<T>::type* x, typename Vec16<T>::type* y, i64 nv) {
    CK_GRID_STRIDE(i64, i, nv) y[i] = relu_v(x[i]);
}

template <class T>
__global__ void relu_forward_scalar(const T* x, T* y, i64 begin, i64 n) {
    CK_GRID_STRIDE(i64, i, n - begin) y[begin + i] = relu1(x[begin + i]);
}

template <class T>
__global__ void relu_backward_vec(const typename Vec16<T>::type* gy, const typename Vec16<T>::type* x,
                                  typename Vec16<T>::type* gx, i64 nv) {
    CK_GRID_STRIDE(i64, i, nv) gx[i] = relu_grad_v(gy[i], x[i]);
}

template <class T>
__global__ void relu_backward_scalar(const T* gy, const T* x, T* gx, i64 begin, i64 n) {
    CK_GRID_STRIDE(i64, i, n - begin) gx[begin + i] = relu_grad1(gy[begin + i], x[begin + i]);
}

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
