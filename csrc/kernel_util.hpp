// Small helpers shared by the kernel headers (included inside the per-ISA
// anonymous namespace; see isa.hpp).
#pragma once

// GCC vector extensions: one source, vectorized for whatever CK_VEC_BYTES the
// translation unit is compiled for. aligned(alignof(T)) permits unaligned use
// through memcpy-based load/store below.
typedef float vfloat __attribute__((vector_size(CK_VEC_BYTES)));
typedef double vdouble __attribute__((vector_size(CK_VEC_BYTES)));

template <class T> struct Vec;
template <> struct Vec<float> { typedef vfloat type; };
template <> struct Vec<double> { typedef vdouble type; };

template <class V, class T> inline V vload(const T* p) {
    V v;
    std::memcpy(&v, p, sizeof(V));
    return v;
}
template <class V, class T> inline void vstore(T* p, V v) { std::memcpy(p, &v, sizeof(V)); }

inline idx imin(idx a, idx b) { return a < b ? a : b; }
inline idx imax(idx a, idx b) { return a > b ? a : b; }
// floor division for possibly negative numerators, positive denominators
inline idx floordiv(idx a, idx b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }
inline idx ceildiv(idx a, idx b) { return -floordiv(-a, b); }

// Range [lo, hi) of output positions o in [0, out) whose input position
// o*stride + offset lies in [0, in).
inline void valid_range(idx in, idx out, idx stride, idx offset, idx& lo, idx& hi) {
    lo = imax(0, ceildiv(-offset, stride));
    hi = imin(out, floordiv(in - 1 - offset, stride) + 1);
    if (hi < lo) hi = lo;
}

inline int threads_for(idx work_items) {
    int nt = num_threads();
    if (work_items < nt) nt = static_cast<int>(work_items < 1 ? 1 : work_items);
    return nt;
}
