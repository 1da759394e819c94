// Shared pieces of the CUDA kernels: index types, geometry, launch checks.
//
// Conventions (the same as csrc/ and the CuPy backend): NCHW, C-contiguous,
// padding given for the top/left side (bottom/right follow from Ho/Wo),
// max-pool windows with no input give -inf and index -1. Every kernel runs on
// the stream it is given. Index arithmetic is done in the type I: int32 when
// every index of the problem fits (32-bit division is several times cheaper
// than 64-bit on the GPU), int64 otherwise; the host launcher picks.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>

namespace convkern::cuda {

typedef long long i64;

struct ConvGeom {
    i64 N, C, H, W, K, R, S, G, sh, sw, ph, pw, dh, dw, Ho, Wo;
    i64 Cg() const { return C / G; }
    i64 Kg() const { return K / G; }
    i64 P() const { return Ho * Wo; }
    i64 CRS() const { return Cg() * R * S; }
};

struct PoolGeom {
    i64 planes, H, W, kh, kw, sh, sw, ph, pw, dh, dw, Ho, Wo;
};

// Throws std::runtime_error naming `kernel` if its launch (or an earlier
// asynchronous error) failed; a GPU the module was not built for gets a hint.
void check_launch(const char* kernel);
// Throws std::runtime_error if no device is usable (no driver, no GPU).
void require_device();
// Multiprocessors of the current device (asked once per device), 0 if unknown.
int current_multiprocessors();

// The most blocks a grid-stride launch takes (more only adds scheduling); the
// CPU emulator's tests set it to 3 so that every grid-stride loop wraps.
#ifndef CK_MAX_GRID_BLOCKS
#define CK_MAX_GRID_BLOCKS (65535LL * 32)
#endif
// The most threads a grid-stride launch's block has (grid_for refuses more).
constexpr int kMaxGridStrideThreads = 256;
// The largest step of a grid-stride loop: blockDim.x * gridDim.x.
constexpr i64 kMaxGridStride = CK_MAX_GRID_BLOCKS * kMaxGridStrideThreads;

// Whether an index bound v can be int32: every index below v fits, and so
// does the last pass of a grid-stride loop over v (i + stride with i < v),
// which for v near 2^31 would wrap negative and still compare below v.
inline bool fits_int32(i64 v) { return v + kMaxGridStride < static_cast<i64>(std::numeric_limits<int>::max()); }

inline unsigned grid_for(i64 work, int threads) {
    if (threads > kMaxGridStrideThreads)
        throw std::logic_error("grid_for: more threads per block than kMaxGridStrideThreads, "
                               "which fits_int32's headroom assumes");
    const i64 blocks = (work + threads - 1) / threads;
    const i64 cap = CK_MAX_GRID_BLOCKS;  // grid-stride loops cover the rest
    return static_cast<unsigned>(blocks < 1 ? 1 : (blocks > cap ? cap : blocks));
}

// Runs f(int(0)) when every index of a problem fits int32, else f(i64(0)):
// kernels templated on the index type I take it from the argument's type.
template <class F>
void with_index_type(bool fits32, F f) {
#ifdef CK_CUDA_EMU
    if (ck_emu::force_index64()) fits32 = false;  // the emulator's tests run the 64-bit path on small problems
#endif
    if (fits32)
        f(int(0));
    else
        f(i64(0));
}

#ifdef __CUDACC__
// The output position whose window tap t reads input position i (stride s,
// padding p, dilation d), or -1 if none does: the gather form of backward.
template <class I>
__device__ inline I tap_output(I i, I p, I t, I d, I s, I out) {
    const I v = i + p - t * d;
    if (v < 0 || v % s) return -1;
    const I o = v / s;
    return o < out ? o : -1;
}
#endif

}  // namespace convkern::cuda

#define CK_GRID_STRIDE(I, i, n) \
    for (I i = static_cast<I>(blockIdx.x) * blockDim.x + threadIdx.x; i < (n); i += static_cast<I>(blockDim.x) * gridDim.x)
