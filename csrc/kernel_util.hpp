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
    // clamped to out: with padding past a dilated tap's reach (a 1-wide input,
    // 3 taps of dilation 2, padding 2) no output reads the input and the
    // first valid index would lie beyond the output row
    lo = imin(out, imax(0, ceildiv(-offset, stride)));
    hi = imin(out, floordiv(in - 1 - offset, stride) + 1);
    if (hi < lo) hi = lo;
}

// no inf or NaN among a[0, n) (v - v is 0 only for finite v; no branch per value)
template <class T>
bool all_finite(const T* a, idx n) {
    int bad = 0;
    for (idx i = 0; i < n; ++i) bad |= !(a[i] - a[i] == T(0));
    return bad == 0;
}

inline int threads_for(idx work_items) {
    int nt = num_threads();
    if (work_items < nt) nt = static_cast<int>(work_items < 1 ? 1 : work_items);
    return nt;
}

// Short rows (a 14-wide feature map is shorter than one AVX-512 vector) spend
// their time in scalar remainder loops unless the tail is masked. These two
// helpers move a row in whole vectors with masked loads and stores; masked-off
// lanes are never read, so `src` may point outside its array there.
//   gather_row: dst[j] = j in [lo, hi) ? src[j] : 0 for j in [0, n)
//   add_row:    dst[j] += src[j]                   for j in [lo, hi)
#if defined(__AVX512F__)
inline __mmask16 lane_mask16(idx from, idx to) {  // lanes l with from <= l < to, clamped to [0, 16)
    from = imax(from, 0);
    to = imin(to, 16);
    return to <= from ? __mmask16(0) : __mmask16(((1u << to) - 1u) & ~((1u << from) - 1u));
}
inline __mmask8 lane_mask8(idx from, idx to) {
    from = imax(from, 0);
    to = imin(to, 8);
    return to <= from ? __mmask8(0) : __mmask8(((1u << to) - 1u) & ~((1u << from) - 1u));
}
inline void gather_row(float* dst, const float* src, idx lo, idx hi, idx n) {
    for (idx j = 0; j < n; j += 16)
        _mm512_mask_storeu_ps(dst + j, lane_mask16(0, n - j),
                              _mm512_maskz_loadu_ps(lane_mask16(lo - j, hi - j), src + j));
}
inline void gather_row(double* dst, const double* src, idx lo, idx hi, idx n) {
    for (idx j = 0; j < n; j += 8)
        _mm512_mask_storeu_pd(dst + j, lane_mask8(0, n - j), _mm512_maskz_loadu_pd(lane_mask8(lo - j, hi - j), src + j));
}
inline void add_row(float* dst, const float* src, idx lo, idx hi) {
    for (idx j = lo - lo % 16; j < hi; j += 16) {
        const __mmask16 m = lane_mask16(lo - j, hi - j);
        _mm512_mask_storeu_ps(dst + j, m,
                              _mm512_add_ps(_mm512_maskz_loadu_ps(m, dst + j), _mm512_maskz_loadu_ps(m, src + j)));
    }
}
inline void add_row(double* dst, const double* src, idx lo, idx hi) {
    for (idx j = lo - lo % 8; j < hi; j += 8) {
        const __mmask8 m = lane_mask8(lo - j, hi - j);
        _mm512_mask_storeu_pd(dst + j, m,
                              _mm512_add_pd(_mm512_maskz_loadu_pd(m, dst + j), _mm512_maskz_loadu_pd(m, src + j)));
    }
}
#elif defined(__AVX2__)
inline __m256i lane_mask32(idx from, idx to, idx j) {  // 8 x 32-bit lanes: from <= j + l < to
    const __m256i l = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(j)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    return _mm256_and_si256(_mm256_cmpgt_epi32(l, _mm256_set1_epi32(static_cast<int>(from - 1))),
                            _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(to)), l));
}
inline __m256i lane_mask64(idx from, idx to, idx j) {  // 4 x 64-bit lanes
    const __m256i l = _mm256_add_epi64(_mm256_set1_epi64x(j), _mm256_setr_epi64x(0, 1, 2, 3));
    return _mm256_and_si256(_mm256_cmpgt_epi64(l, _mm256_set1_epi64x(from - 1)),
                            _mm256_cmpgt_epi64(_mm256_set1_epi64x(to), l));
}
// Masks only on the vectors that straddle lo, hi or n: AVX2 masked stores
// (vmaskmovps) are slow on AMD cores, and whole vectors need none.
inline void gather_row(float* dst, const float* src, idx lo, idx hi, idx n) {
    for (idx j = 0; j < n; j += 8) {
        if (j >= lo && j + 8 <= hi)
            _mm256_storeu_ps(dst + j, _mm256_loadu_ps(src + j));
        else if (j + 8 <= n && (j + 8 <= lo || j >= hi))
            _mm256_storeu_ps(dst + j, _mm256_setzero_ps());
        else
            _mm256_maskstore_ps(dst + j, lane_mask32(0, n, j), _mm256_maskload_ps(src + j, lane_mask32(lo, hi, j)));
    }
}
inline void gather_row(double* dst, const double* src, idx lo, idx hi, idx n) {
    for (idx j = 0; j < n; j += 4) {
        if (j >= lo && j + 4 <= hi)
            _mm256_storeu_pd(dst + j, _mm256_loadu_pd(src + j));
        else if (j + 4 <= n && (j + 4 <= lo || j >= hi))
            _mm256_storeu_pd(dst + j, _mm256_setzero_pd());
        else
            _mm256_maskstore_pd(dst + j, lane_mask64(0, n, j), _mm256_maskload_pd(src + j, lane_mask64(lo, hi, j)));
    }
}
inline void add_row(float* dst, const float* src, idx lo, idx hi) {
    for (idx j = lo - lo % 8; j < hi; j += 8) {
        if (j >= lo && j + 8 <= hi) {
            _mm256_storeu_ps(dst + j, _mm256_add_ps(_mm256_loadu_ps(dst + j), _mm256_loadu_ps(src + j)));
            continue;
        }
        const __m256i m = lane_mask32(lo, hi, j);
        _mm256_maskstore_ps(dst + j, m, _mm256_add_ps(_mm256_maskload_ps(dst + j, m), _mm256_maskload_ps(src + j, m)));
    }
}
inline void add_row(double* dst, const double* src, idx lo, idx hi) {
    for (idx j = lo - lo % 4; j < hi; j += 4) {
        if (j >= lo && j + 4 <= hi) {
            _mm256_storeu_pd(dst + j, _mm256_add_pd(_mm256_loadu_pd(dst + j), _mm256_loadu_pd(src + j)));
            continue;
        }
        const __m256i m = lane_mask64(lo, hi, j);
        _mm256_maskstore_pd(dst + j, m, _mm256_add_pd(_mm256_maskload_pd(dst + j, m), _mm256_maskload_pd(src + j, m)));
    }
}
#else
template <class T> inline void gather_row(T* dst, const T* src, idx lo, idx hi, idx n) {
    for (idx j = 0; j < lo; ++j) dst[j] = T(0);
    for (idx j = lo; j < hi; ++j) dst[j] = src[j];
    for (idx j = hi; j < n; ++j) dst[j] = T(0);
}
template <class T> inline void add_row(T* dst, const T* src, idx lo, idx hi) {
    for (idx j = lo; j < hi; ++j) dst[j] += src[j];
}
#endif

// Lanes [0, n) of v to p, 0 < n <= lanes; p[n..] is neither read nor written.
#if defined(__AVX512F__)
inline void vstore_first(float* p, vfloat v, idx n) { _mm512_mask_storeu_ps(p, lane_mask16(0, n), (__m512)v); }
inline void vstore_first(double* p, vdouble v, idx n) { _mm512_mask_storeu_pd(p, lane_mask8(0, n), (__m512d)v); }
#elif defined(__AVX2__)
inline void vstore_first(float* p, vfloat v, idx n) { _mm256_maskstore_ps(p, lane_mask32(0, n, 0), (__m256)v); }
inline void vstore_first(double* p, vdouble v, idx n) { _mm256_maskstore_pd(p, lane_mask64(0, n, 0), (__m256d)v); }
#else
template <class T, class V> inline void vstore_first(T* p, V v, idx n) {
    for (idx l = 0; l < n; ++l) p[l] = v[l];
}
#endif

// The lanes of v whose bits are set in mask, packed into the lowest lanes in
// order (the rest zero): one instruction with AVX-512. Other ISAs have no such
// instruction, and their callers (kVcompressNative false) take another road.
#if defined(__AVX512F__)
constexpr bool kVcompressNative = true;
inline vfloat vcompress(vfloat v, std::uint32_t mask) {
    return (vfloat)_mm512_maskz_compress_ps(static_cast<__mmask16>(mask), (__m512)v);
}
inline vdouble vcompress(vdouble v, std::uint32_t mask) {
    return (vdouble)_mm512_maskz_compress_pd(static_cast<__mmask8>(mask), (__m512d)v);
}
#else
constexpr bool kVcompressNative = false;
#endif

// Lanes [0, n) of a vector from p, the rest zero, 0 < n <= lanes; p[n..] is not read.
#if defined(__AVX512F__)
inline vfloat vload_first(const float* p, idx n) { return (vfloat)_mm512_maskz_loadu_ps(lane_mask16(0, n), p); }
inline vdouble vload_first(const double* p, idx n) { return (vdouble)_mm512_maskz_loadu_pd(lane_mask8(0, n), p); }
#elif defined(__AVX2__)
inline vfloat vload_first(const float* p, idx n) { return (vfloat)_mm256_maskload_ps(p, lane_mask32(0, n, 0)); }
inline vdouble vload_first(const double* p, idx n) { return (vdouble)_mm256_maskload_pd(p, lane_mask64(0, n, 0)); }
#else
template <class T> inline typename Vec<T>::type vload_first(const T* p, idx n) {
    typename Vec<T>::type v = {};
    for (idx l = 0; l < n; ++l) v[l] = p[l];
    return v;
}
#endif

// `rows` rows of gather_row: dst rows are contiguous (n apart), src rows are
// src_stride apart. Rows of at most one vector reuse their masks (the common
// small feature map); longer rows go through gather_row.
#if defined(__AVX512F__)
inline void gather_rows(float* dst, const float* src, idx src_stride, idx rows, idx lo, idx hi, idx n) {
    if (n > 16) {
        for (idx i = 0; i < rows; ++i) gather_row(dst + i * n, src + i * src_stride, lo, hi, n);
        return;
    }
    const __mmask16 load = lane_mask16(lo, hi), store = lane_mask16(0, n);
    for (idx i = 0; i < rows; ++i)
        _mm512_mask_storeu_ps(dst + i * n, store, _mm512_maskz_loadu_ps(load, src + i * src_stride));
}
inline void gather_rows(double* dst, const double* src, idx src_stride, idx rows, idx lo, idx hi, idx n) {
    if (n > 8) {
        for (idx i = 0; i < rows; ++i) gather_row(dst + i * n, src + i * src_stride, lo, hi, n);
        return;
    }
    const __mmask8 load = lane_mask8(lo, hi), store = lane_mask8(0, n);
    for (idx i = 0; i < rows; ++i)
        _mm512_mask_storeu_pd(dst + i * n, store, _mm512_maskz_loadu_pd(load, src + i * src_stride));
}
#else
template <class T>
inline void gather_rows(T* dst, const T* src, idx src_stride, idx rows, idx lo, idx hi, idx n) {
    for (idx i = 0; i < rows; ++i) gather_row(dst + i * n, src + i * src_stride, lo, hi, n);
}
#endif
