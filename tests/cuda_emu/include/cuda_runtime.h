// A CPU stand-in for <cuda_runtime.h>: just enough of CUDA for the sources in
// cuda/ to compile with g++ and run their kernels on the host (tests only).
//
// A launch runs its blocks one after another. A kernel without __syncthreads
// runs its threads as plain calls; one with barriers runs each thread of a
// block as a fiber (ucontext), and __syncthreads switches to the next thread
// until all have arrived. So __shared__ data is per block (blocks never
// overlap), dynamic shared memory is poisoned with NaN bytes before each
// block, and the launch checks CUDA's limits (block size, grid size, shared
// memory) and reports a violation through cudaGetLastError, as a GPU would.
// Launches hold one lock: calls from several host threads are serialised.
//
// What it cannot find: most data races between threads of a block (threads
// run in order between barriers, so a missing barrier shows only where a
// reader runs before its writer; tests run the barrier kernels in both
// orders), warp-level behaviour, and anything about speed. tests/cuda_emu/build.py rewrites `k<<<g, b, s, st>>>(a)`
// into ck_emu::launch and `extern __shared__ T n[]` into a pointer.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>

#define __CUDACC__ 1
#define CK_CUDA_EMU 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __restrict__ __restrict
#define __align__(n) __attribute__((aligned(n)))

struct uint3 {
    unsigned x, y, z;
};
struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) float4 {
    float x, y, z, w;
};
struct alignas(16) double2 {
    double x, y;
};
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
inline double2 make_double2(double x, double y) { return double2{x, y}; }

extern uint3 threadIdx, blockIdx;
extern dim3 blockDim, gridDim;

typedef struct CUstream_st* cudaStream_t;
enum cudaError_t {
    cudaSuccess = 0,
    cudaErrorInvalidValue = 1,
    cudaErrorMemoryAllocation = 2,
    cudaErrorInvalidConfiguration = 9,
    cudaErrorMisalignedAddress = 716,
};
enum cudaMemcpyKind { cudaMemcpyHostToHost, cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost, cudaMemcpyDeviceToDevice };

cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
const char* cudaGetErrorName(cudaError_t e);
const char* cudaGetErrorString(cudaError_t e);
cudaError_t cudaMallocAsync(void** p, std::size_t bytes, cudaStream_t);
cudaError_t cudaFreeAsync(void* p, cudaStream_t);
cudaError_t cudaMemsetAsync(void* p, int value, std::size_t bytes, cudaStream_t);
cudaError_t cudaMemcpyAsync(void* dst, const void* src, std::size_t bytes, cudaMemcpyKind, cudaStream_t);
cudaError_t cudaStreamSynchronize(cudaStream_t);

// device intrinsics the kernels use
template <class A, class B> inline auto min(A a, B b) -> std::common_type_t<A, B> { return b < a ? b : a; }
template <class A, class B> inline auto max(A a, B b) -> std::common_type_t<A, B> { return a < b ? b : a; }
inline float __int_as_float(int v) {
    float f;
    std::memcpy(&f, &v, sizeof f);
    return f;
}
inline double __longlong_as_double(long long v) {
    double d;
    std::memcpy(&d, &v, sizeof d);
    return d;
}
inline int atomicOr(int* p, int v) { return __atomic_fetch_or(p, v, __ATOMIC_RELAXED); }
inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
inline int atomicExch(int* p, int v) { return __atomic_exchange_n(p, v, __ATOMIC_RELAXED); }

namespace ck_emu {

void syncthreads();
// with_index_type (cuda/common.cuh) takes 64-bit indices whatever the size
// while this is set (ck_emu_force_index64 in runtime.cpp sets it)
bool force_index64();
// a fault a GPU would raise (a misaligned vector access): the next
// cudaGetLastError reports it
void fault(const char* what);
// the current block's dynamic shared memory (launch's smem bytes)
void* dynamic_smem_bytes();
template <class T> T* dynamic_smem() { return static_cast<T*>(dynamic_smem_bytes()); }

// Runs body() once per thread of every block; `barriers`: the kernel calls
// __syncthreads, so its threads need fibers.
void run_grid(bool barriers, dim3 grid, dim3 block, std::size_t smem, const std::function<void()>& body);

// k<<<grid, block, smem, stream>>>(args...) becomes
// launch(barriers, grid, block, smem, stream, [](auto&&... a) { k(a...); }, args...):
// the arguments are evaluated once and copied, as a launch copies them.
template <class F, class... A>
void launch(bool barriers, dim3 grid, dim3 block, std::size_t smem, cudaStream_t, F call, A&&... args) {
    const std::tuple<std::decay_t<A>...> params(std::forward<A>(args)...);
    run_grid(barriers, grid, block, smem, [&] { std::apply(call, params); });
}

// A launch the way CuPy's RawKernel makes one: args[i] points at the i-th
// argument's bytes and sizes[i] is their count. Returns 0, a cudaError_t, or
// -1 when the count of arguments is wrong and -(2 + i) when argument i's size
// is not its parameter's (CuPy would pass such a launch garbage silently).
template <class... P, std::size_t... I>
int launch_packed_impl(bool barriers, void (*kernel)(P...), dim3 grid, dim3 block, void** args,
                       std::index_sequence<I...>) {
    const std::tuple<std::decay_t<P>...> params(*static_cast<const std::decay_t<P>*>(args[I])...);
    run_grid(barriers, grid, block, 0, [&] { std::apply(kernel, params); });
    return static_cast<int>(cudaGetLastError());
}
template <class... P>
int launch_packed(bool barriers, void (*kernel)(P...), unsigned grid, unsigned block, void** args,
                  const std::size_t* sizes, int nargs) {
    constexpr std::size_t want[] = {sizeof(std::decay_t<P>)..., 0};
    if (nargs != static_cast<int>(sizeof...(P))) return -1;
    for (int i = 0; i < nargs; ++i)
        if (sizes[i] != want[i]) return -(2 + i);
    return launch_packed_impl(barriers, kernel, dim3(grid), dim3(block), args, std::index_sequence_for<P...>{});
}

}  // namespace ck_emu

#define __syncthreads() ::ck_emu::syncthreads()
