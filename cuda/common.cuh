// The host side of the CUDA module's launchers: index-type choice, grid sizes,
// launch checks. The kernels themselves are in convkern/include/convkern/gpu/
// (shared with the CuPy backend, which compiles them with NVRTC), the
// geometry in convkern/include/convkern/geometry.h.
//
// Conventions (the same as csrc/): NCHW, C-contiguous, padding given for the
// top/left side (bottom/right follow from Ho/Wo), max-pool windows with no
// input give -inf and index -1. Every kernel runs on the stream it is given.
// Index arithmetic is done in the type I: int32 when every index of the
// problem fits, int64 otherwise; the launcher picks (with_index_type).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>

#include "convkern/geometry.h"
#ifdef __CUDACC__
#include "convkern/gpu/device.cuh"  // the kernels' side: CK_GRID_STRIDE, tap_output
#endif

namespace convkern::cuda {

typedef long long i64;

using convkern::ConvGeom;  // convkern/include/convkern/geometry.h, shared with csrc/ and Python
using convkern::PoolGeom;

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


}  // namespace convkern::cuda
