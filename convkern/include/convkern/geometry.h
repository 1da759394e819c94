// The conv2d and pooling geometry: one layout for the C++ kernels (csrc/), the
// CUDA module (cuda/), the GPU kernels CuPy compiles at run time with NVRTC,
// and Python, where convkern.geometry packs ConvGeometry.as_tuple() and
// PoolGeometry.as_tuple() field for field and checks its names against
// CK_CONV_GEOM_FIELDS / CK_POOL_GEOM_FIELDS (a compiled module reports them).
//
// NCHW; padding is top/left only: bottom/right padding is implied by Ho/Wo
// (positions past H/W read as zero), which is how "same" with an odd total
// works without a separate code path. Every field is a signed 64-bit integer,
// so the structs have no padding and pass by value to a GPU kernel as 8-byte
// words. Plain C++ only: NVRTC has no standard library headers.
#pragma once

#if defined(__CUDACC__)
#define CK_HD __host__ __device__
#else
#define CK_HD
#endif

#if defined(__CUDACC_RTC__)
namespace convkern { typedef long geom_int; }  // LP64: the same type as std::int64_t on the host
#else
#include <cstdint>
#include <cstring>
namespace convkern { typedef std::int64_t geom_int; }
#endif

namespace convkern {

static_assert(sizeof(geom_int) == 8, "geometry fields are 64-bit");

#define CK_CONV_GEOM_FIELDS "N,C,H,W,K,R,S,G,sh,sw,ph,pw,dh,dw,Ho,Wo"
struct ConvGeom {
    geom_int N, C, H, W;  // input
    geom_int K, R, S;     // weight (K, C/G, R, S)
    geom_int G;           // groups
    geom_int sh, sw;      // stride
    geom_int ph, pw;      // top/left padding
    geom_int dh, dw;      // dilation
    geom_int Ho, Wo;      // output size
    CK_HD geom_int Cg() const { return C / G; }
    CK_HD geom_int Kg() const { return K / G; }
    CK_HD geom_int P() const { return Ho * Wo; }
    CK_HD geom_int CRS() const { return Cg() * R * S; }
};
static_assert(sizeof(ConvGeom) == 16 * 8, "ConvGeom is 16 packed 64-bit fields");

// planes = N*C, each pooled independently. count_include_pad (0/1) and
// divisor_override (0: none) matter to average pooling only.
#define CK_POOL_GEOM_FIELDS "planes,H,W,kh,kw,sh,sw,ph,pw,dh,dw,Ho,Wo,count_include_pad,divisor_override"
struct PoolGeom {
    geom_int planes, H, W;
    geom_int kh, kw, sh, sw, ph, pw, dh, dw;
    geom_int Ho, Wo;
    geom_int count_include_pad;
    geom_int divisor_override;
};
static_assert(sizeof(PoolGeom) == 15 * 8, "PoolGeom is 15 packed 64-bit fields");

#if !defined(__CUDACC_RTC__)
// The one check of a geometry that arrives from Python, for every compiled
// module: nullptr when it is well formed, else what is wrong.
inline const char* conv_geom_error(const ConvGeom& g) {
    geom_int v[16];
    std::memcpy(v, &g, sizeof v);
    for (int i = 0; i < 16; ++i)
        if (v[i] < 0) return "conv geometry: negative entry";
    if (g.G <= 0 || g.C % g.G || g.K % g.G) return "conv geometry: groups must be positive and divide C and K";
    if (g.sh <= 0 || g.sw <= 0 || g.dh <= 0 || g.dw <= 0) return "conv geometry: stride and dilation must be positive";
    return nullptr;
}

inline const char* pool_geom_error(const PoolGeom& p) {
    geom_int v[14];  // divisor_override may be negative
    std::memcpy(v, &p, sizeof v);
    for (int i = 0; i < 14; ++i)
        if (v[i] < 0) return "pool geometry: negative entry";
    if (p.kh <= 0 || p.kw <= 0 || p.sh <= 0 || p.sw <= 0 || p.dh <= 0 || p.dw <= 0)
        return "pool geometry: kernel, stride and dilation must be positive";
    if (p.count_include_pad > 1) return "pool geometry: count_include_pad must be 0 or 1";
    return nullptr;
}
#endif

}  // namespace convkern
