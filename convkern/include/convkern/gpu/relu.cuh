// relu forward and backward kernels: relu(NaN) is NaN; the gradient passes
// where x > 0 or x is NaN. The vector forms take 16-byte accesses where the
// pointers allow them (the CUDA module's launcher checks).
#pragma once
#include "device.cuh"

namespace convkern::cuda {

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

}  // namespace convkern::cuda
