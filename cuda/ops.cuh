// Host launchers of the CUDA kernels (convkern._cuda). Pointers are device
// pointers; every launcher runs on `stream`, checks its launches and throws
// std::runtime_error naming the kernel on failure. T is float or double.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "common.cuh"

namespace convkern::cuda {

// relu.cu
template <class T> void relu_forward(const T* x, T* y, i64 n, cudaStream_t stream);
template <class T> void relu_backward(const T* gy, const T* x, T* gx, i64 n, cudaStream_t stream);

// max_pool2d.cu. ind may be null (values only). backward returns 0, or 1 if
// an index lies outside its plane (nothing is written then: the caller raises).
template <class T> void max_pool2d_forward(const T* x, T* y, std::int64_t* ind, const PoolGeom& p, cudaStream_t stream);
template <class T>
int max_pool2d_backward(const T* gy, const std::int64_t* ind, T* gx, const PoolGeom& p, cudaStream_t stream);

// avg_pool2d.cu
template <class T>
void avg_pool2d_forward(const T* x, T* y, const PoolGeom& p, cudaStream_t stream);
template <class T>
void avg_pool2d_backward(const T* gy, T* gx, const PoolGeom& p, cudaStream_t stream);

// conv2d_direct.cu: one thread per output (forward, grad input) or weight
// (grad weight); depthwise layers get a shared-memory tiled kernel.
template <class T> void conv2d_forward_direct(const T* x, const T* w, const T* b, T* y, const ConvGeom& g, cudaStream_t stream);
template <class T> void conv2d_grad_input_direct(const T* gy, const T* w, T* gx, const ConvGeom& g, cudaStream_t stream);
template <class T> void conv2d_grad_weight_direct(const T* gy, const T* x, T* gw, const ConvGeom& g, cudaStream_t stream);
template <class T> void conv2d_grad_bias(const T* gy, T* gb, const ConvGeom& g, cudaStream_t stream);

// conv2d_gemm.cu: the tiled GEMM, either on an explicit column buffer
// (im2col / col2im, `work` of work_elems elements) or with the column tile
// built in shared memory on the fly (implicit GEMM, no buffer).
template <class T>
void conv2d_forward_im2col(const T* x, const T* w, const T* b, T* y, const ConvGeom& g, T* work, i64 work_elems,
                           cudaStream_t stream);
template <class T> void conv2d_forward_implicit(const T* x, const T* w, const T* b, T* y, const ConvGeom& g, cudaStream_t stream);
template <class T>
void conv2d_grad_input_im2col(const T* gy, const T* w, T* gx, const ConvGeom& g, T* work, i64 work_elems,
                              cudaStream_t stream);
// grad weight as an implicit GEMM over (image, position), split into
// `splits` fixed slices of the reduction summed in order afterwards
// (deterministic); `work` holds splits * K * CRS elements when splits > 1.
template <class T>
void conv2d_grad_weight_implicit(const T* gy, const T* x, T* gw, const ConvGeom& g, int splits, T* work,
                                 cudaStream_t stream);
// elements of work the im2col launchers need for a chunk of `images` images
i64 im2col_work_elems(const ConvGeom& g, i64 images);
// how many reduction slices grad weight uses for g (a function of the shape)
int grad_weight_splits(const ConvGeom& g);

// The tile every float launch of the tiled GEMM takes while it is not 0: 1-4
// are 64x64, 64x128, 128x64, 128x128 (GemmTile in gemm_tiled.cuh); 0 lets
// the GEMM pick per problem. Process-wide, for tuning and tests; the result's
// bits do not depend on it. set_gemm_tile throws std::invalid_argument
// outside 0-4.
int forced_gemm_tile();
void set_gemm_tile(int tile);
// The tile (1-4, as above) the float GEMM picks for an M x N problem over
// zcount batches and splits on `sms` multiprocessors (gemm_tile_for).
int gemm_tile_choice(i64 M, i64 N, i64 zcount, int sms);

// C (M, N) = A (M, K) B (K, N), row-major with leading dimensions (tests and bench)
template <class T>
void gemm(const T* a, const T* b, T* c, i64 M, i64 N, i64 K, cudaStream_t stream);

}  // namespace convkern::cuda
