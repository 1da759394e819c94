// Device-side basics of the GPU kernels, which two compilers build: nvcc for
// the CUDA module (cuda/, whose host launchers include these headers) and
// NVRTC for the CuPy backend (convkern/backend/cupy_gpu.py compiles them at
// run time). So: no host code and no standard-library headers, which NVRTC
// does not have.
//
// Conventions: NCHW, C-contiguous; index arithmetic in the kernel's type I:
// int where every index of the problem fits (the CUDA module's launchers
// decide; 32-bit division is several times cheaper than 64-bit on the GPU),
// long long otherwise and always under CuPy. Kernels take the geometry struct
// by value and unpack it into locals of type I.
#pragma once
#include "../geometry.h"

namespace convkern::cuda {

typedef long long i64;

// The output position whose window tap t reads input position i (stride s,
// padding p, dilation d), or -1 if none does: the gather form of backward.
template <class I>
__device__ inline I tap_output(I i, I p, I t, I d, I s, I out) {
    const I v = i + p - t * d;
    if (v < 0 || v % s) return -1;
    const I o = v / s;
    return o < out ? o : -1;
}

}  // namespace convkern::cuda

#define CK_GRID_STRIDE(I, i, n) \
    for (I i = static_cast<I>(blockIdx.x) * blockDim.x + threadIdx.x; i < (n); i += static_cast<I>(blockDim.x) * gridDim.x)

// The conv geometry's fields as locals of type I, named as in ConvGeom.
#define CK_CONV_LOCALS(I, geom)                                                                                    \
    [[maybe_unused]] const I N = I(geom.N), C = I(geom.C), H = I(geom.H), W = I(geom.W), K = I(geom.K),            \
                             R = I(geom.R), S = I(geom.S), G = I(geom.G), sh = I(geom.sh), sw = I(geom.sw),        \
                             ph = I(geom.ph), pw = I(geom.pw), dh = I(geom.dh), dw = I(geom.dw), Ho = I(geom.Ho),  \
                             Wo = I(geom.Wo)

// The pool geometry's window fields as locals of type I, named as in PoolGeom.
#define CK_POOL_LOCALS(I, geom)                                                                                    \
    [[maybe_unused]] const I planes = I(geom.planes), H = I(geom.H), W = I(geom.W), kh = I(geom.kh),               \
                             kw = I(geom.kw), sh = I(geom.sh), sw = I(geom.sw), ph = I(geom.ph), pw = I(geom.pw),  \
                             dh = I(geom.dh), dw = I(geom.dw), Ho = I(geom.Ho), Wo = I(geom.Wo)
