// max_pool2d with PyTorch's exact rules: padding reads as -inf, NaN wins and
// propagates, ties keep the first index, indices are h*W + w within the plane.
// A window that holds no real input (possible with dilation) yields -inf and
// index -1, and backward drops its gradient. (PyTorch reports an index outside
// the plane there, which its own backward then writes through.)

// first in-range position of a dilated window starting at `start`
inline idx window_first(idx start, idx dilation) {
    return start >= 0 ? start : start + ceildiv(-start, dilation) * dilation;
}

// The NaN-propagating, first-index-on-ties running max, branch-free: on random
// data a taken/not-taken max comparison mispredicts about half the time.
// Written with selects the compiler still made branches of them, so on x86
// the compares are SSE masks and the index a masked xor.
template <class T>
inline void max_step(T v, idx i, T& m, idx& best) {
#if defined(__SSE2__)
    idx take;
    if constexpr (sizeof(T) == sizeof(float)) {
        const __m128 a = _mm_set_ss(v), b = _mm_set_ss(m);
        const __m128 t = _mm_or_ps(_mm_cmpgt_ss(a, b), _mm_cmpunord_ss(a, a));
        m = _mm_cvtss_f32(_mm_or_ps(_mm_and_ps(t, a), _mm_andnot_ps(t, b)));
        take = _mm_movemask_ps(t) & 1;
    } else {
        const __m128d a = _mm_set_sd(v), b = _mm_set_sd(m);
        const __m128d t = _mm_or_pd(_mm_cmpgt_sd(a, b), _mm_cmpunord_sd(a, a));
        m = _mm_cvtsd_f64(_mm_or_pd(_mm_and_pd(t, a), _mm_andnot_pd(t, b)));
        take = _mm_movemask_pd(t) & 1;
    }
    best ^= (best ^ i) & -take;
#else
    const bool take = (v > m) | (v != v);
    m = take ? v : m;
    best = take ? i : best;
#endif
}

#if defined(__AVX512F__)
// 16 outputs of 2x2 / stride 2 windows at once: the row pair's even and odd
// columns are split apart with a two-source permute, then the same running
// max as max_step (greater, or NaN) picks value and index per lane. `n` <= 16
// lanes are live; masked loads never touch memory past the last window.
inline void max_pool_2x2s2_x16(const float* r0, const float* r1, std::int64_t i00, idx W, idx n, float* y,
                               std::int64_t* ind, const float* x_end) {
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    // Load unmasked whenever 32 floats from r1 stay inside x (lanes past the
    // row are never stored): on this AMD core a masked load here cost ~5x the
    // whole kernel's time (profiled). Only the array's very end masks.
    __m512 a0, b0, a1, b1;
    if (n == 16 || r1 + 32 <= x_end) {
        a0 = _mm512_loadu_ps(r0);
        b0 = _mm512_loadu_ps(r0 + 16);
        a1 = _mm512_loadu_ps(r1);
        b1 = _mm512_loadu_ps(r1 + 16);
    } else {
        const __mmask16 lo = lane_mask16(0, 2 * n), hi = lane_mask16(0, 2 * n - 16);
        a0 = _mm512_maskz_loadu_ps(lo, r0);
        b0 = _mm512_maskz_loadu_ps(hi, r0 + 16);
        a1 = _mm512_maskz_loadu_ps(lo, r1);
        b1 = _mm512_maskz_loadu_ps(hi, r1 + 16);
    }
    __m512 m = _mm512_permutex2var_ps(a0, even, b0);
    // indices in two halves of 8 int64 lanes: i00 + 2 * lane (+ 1, + W, + W + 1)
    const __m512i step2 = _mm512_setr_epi64(0, 2, 4, 6, 8, 10, 12, 14);
    __m512i blo = _mm512_add_epi64(_mm512_set1_epi64(i00), step2);
    __m512i bhi = _mm512_add_epi64(blo, _mm512_set1_epi64(16));
    const __m512 cand[3] = {_mm512_permutex2var_ps(a0, odd, b0), _mm512_permutex2var_ps(a1, even, b1),
                            _mm512_permutex2var_ps(a1, odd, b1)};
    const std::int64_t offs[3] = {1, W, W + 1};
    const __m512i ilo = blo, ihi = bhi;
    for (int c = 0; c < 3; ++c) {
        const __mmask16 take = _mm512_cmp_ps_mask(cand[c], m, _CMP_GT_OQ) |
                               _mm512_cmp_ps_mask(cand[c], cand[c], _CMP_UNORD_Q);
        m = _mm512_mask_blend_ps(take, m, cand[c]);
        const __m512i o = _mm512_set1_epi64(offs[c]);
        blo = _mm512_mask_blend_epi64(__mmask8(take), blo, _mm512_add_epi64(ilo, o));
        bhi = _mm512_mask_blend_epi64(__mmask8(take >> 8), bhi, _mm512_add_epi64(ihi, o));
    }
    _mm512_mask_storeu_ps(y, lane_mask16(0, n), m);
    if (ind) {
        _mm512_mask_storeu_epi64(ind, lane_mask8(0, n), blo);
        _mm512_mask_storeu_epi64(ind + 8, lane_mask8(0, n - 8), bhi);
    }
}
#endif

#if defined(__AVX512F__)
// 16 outputs of one output row, any window and dilation, column stride 1 or
// 2 (ResNet's 3x3 / 2 pooling): each tap's 16 inputs are one vector, or at
// stride 2 the even lanes of two, and max_step's running max (greater, or
// NaN; first in-range index on ties and for all -inf) runs lane-wise, lanes
// whose tap falls in the padding masked out. The scalar loop's compares
// compile to branches, which random data mispredicts about half the time.
// h0, w0: the first window's top-left tap (may lie in the padding); `n` <=
// 16 lanes are live; no load touches memory outside the plane's rows that a
// window reads, except unmasked loads of interior runs that stay inside x.
__attribute__((always_inline)) inline void max_pool_window_x16(const float* xp, const PoolGeom& p, idx h0, idx w0,
                                                               idx n, float* y, std::int64_t* ind,
                                                               const float* x_end) {
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const idx W = p.W, sw = p.sw, span = sw == 1 ? 16 : 32;  // floats a full load reads
    const idx hstart = window_first(h0, p.dh), hend = imin(h0 + (p.kh - 1) * p.dh + 1, p.H);
    const __m512i lane = _mm512_mullo_epi64(_mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7), _mm512_set1_epi64(sw));
    // every window's columns inside the row: no per-lane bounds
    const bool inside = w0 >= 0 && w0 + sw * (n - 1) + (p.kw - 1) * p.dw < W;
    __m512i blo, bhi;
    if (inside && hstart < hend) {
        blo = _mm512_add_epi64(_mm512_set1_epi64(hstart * W + w0), lane);
        bhi = _mm512_add_epi64(blo, _mm512_set1_epi64(8 * sw));
    } else if (p.dw == 1) {
        // each lane's first column in [0, W): with dilation 1 every window
        // holds one (padding is at most half the window, and ceil mode's last
        // window starts inside the input)
        const __m512i zero = _mm512_setzero_si512(), row = _mm512_set1_epi64(hstart * W);
        const __m512i wlo = _mm512_add_epi64(_mm512_set1_epi64(w0), lane);
        const __m512i whi = _mm512_add_epi64(wlo, _mm512_set1_epi64(8 * sw));
        const bool rows = hstart < hend;
        blo = rows ? _mm512_add_epi64(row, _mm512_max_epi64(wlo, zero)) : _mm512_set1_epi64(-1);
        bhi = rows ? _mm512_add_epi64(row, _mm512_max_epi64(whi, zero)) : _mm512_set1_epi64(-1);
    } else {
        alignas(64) std::int64_t first[16] = {};  // lanes past n are never stored
        for (idx j = 0; j < n; ++j) {
            const idx wj = w0 + sw * j, ws = window_first(wj, p.dw), we = imin(wj + (p.kw - 1) * p.dw + 1, W);
            first[j] = hstart < hend && ws < we ? hstart * W + ws : -1;
        }
        blo = _mm512_load_si512(first);
        bhi = _mm512_load_si512(first + 8);
    }
    __m512 m = _mm512_set1_ps(-__builtin_inff());
    for (idx h = hstart; h < hend; h += p.dh)
        for (idx q = 0; q < p.kw; ++q) {
            const idx w = w0 + q * p.dw;
            const float* src = xp + h * W + w;
            __mmask16 valid = lane_mask16(0, n);
            if (!inside) {  // lanes (and, at stride 2, loaded elements) whose column is in [0, W)
                const idx lane_lo = imax(0, sw == 1 ? -w : (1 - w) >> 1);
                const idx lane_hi = imin(n, sw == 1 ? W - w : ((W - 1 - w) >> 1) + 1);
                if (lane_lo >= lane_hi) continue;
                valid = lane_mask16(lane_lo, lane_hi);
            }
            const bool full = inside && src + span <= x_end;
            const idx e_lo = imax(0, -w), e_hi = imin(span, W - w);
            __m512 v;
            if (sw == 1) {
                v = full ? _mm512_loadu_ps(src) : _mm512_maskz_loadu_ps(lane_mask16(e_lo, imin(e_hi, n)), src);
            } else {
                const idx e_end = imin(e_hi, 2 * n - 1);
                const __m512 a = full ? _mm512_loadu_ps(src) : _mm512_maskz_loadu_ps(lane_mask16(e_lo, e_end), src);
                const __m512 b = full ? _mm512_loadu_ps(src + 16)
                                      : _mm512_maskz_loadu_ps(lane_mask16(e_lo - 16, e_end - 16), src + 16);
                v = _mm512_permutex2var_ps(a, even, b);
            }
            const __m512i ilo = _mm512_add_epi64(_mm512_set1_epi64(h * W + w), lane);
            const __m512i ihi = _mm512_add_epi64(ilo, _mm512_set1_epi64(8 * sw));
            const __mmask16 take =
                valid & (_mm512_cmp_ps_mask(v, m, _CMP_GT_OQ) | _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q));
            m = _mm512_mask_blend_ps(take, m, v);
            blo = _mm512_mask_blend_epi64(__mmask8(take), blo, ilo);
            bhi = _mm512_mask_blend_epi64(__mmask8(take >> 8), bhi, ihi);
        }
    _mm512_mask_storeu_ps(y, lane_mask16(0, n), m);
    if (ind) {
        _mm512_mask_storeu_epi64(ind, lane_mask8(0, n), blo);
        _mm512_mask_storeu_epi64(ind + 8, lane_mask8(0, n - 8), bhi);
    }
}
#endif

#if defined(__AVX2__) && !defined(__AVX512F__)
// AVX2's counterparts of the x16 kernels above, 8 outputs of one row. At
// column stride 2 a tap's 8 inputs are the even elements of two loads, taken
// by in-lane shuffles only: the lanes then hold outputs 0,1,4,5,2,3,6,7
// (kStride2Cols: their columns), put in order once, on store. max_step's
// running max (greater, or NaN; the first tap on ties and for all -inf) runs
// lane-wise, with indices as int32 (callers check the plane fits), widened
// on store. Compiled, max_step's compares became branches that random data
// mispredicts about half the time.
inline __m256i max_pool_lane_cols(idx sw) {
    return sw == 1 ? _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7) : _mm256_setr_epi32(0, 2, 8, 10, 4, 6, 12, 14);
}

inline __m256 even_cols_x8(const float* src) {
    return _mm256_shuffle_ps(_mm256_loadu_ps(src), _mm256_loadu_ps(src + 8), 0x88);
}

template <bool Ind>
__attribute__((always_inline)) inline void max_step_x8(__m256 v, __m256i at, __m256& m, __m256i& best) {
    const __m256 take = _mm256_or_ps(_mm256_cmp_ps(v, m, _CMP_GT_OQ), _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    m = _mm256_blendv_ps(m, v, take);
    if constexpr (Ind) best = _mm256_blendv_epi8(best, at, _mm256_castps_si256(take));
}

template <bool Ind>
__attribute__((always_inline)) inline void max_store_x8(__m256 m, __m256i best, bool scrambled, float* y,
                                                        std::int64_t* ind) {
    if (scrambled) m = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(m), 0xD8));
    _mm256_storeu_ps(y, m);
    if constexpr (Ind) {
        if (scrambled) best = _mm256_permute4x64_epi64(best, 0xD8);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(ind), _mm256_cvtepi32_epi64(_mm256_castsi256_si128(best)));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(ind + 4),
                            _mm256_cvtepi32_epi64(_mm256_extracti128_si256(best, 1)));
    }
}

// 2x2 / stride 2 windows whose top-left taps are r0[0], r0[2], ...: reads
// r0[0, 16) and r1[0, 16), exactly the windows' inputs.
template <bool Ind>
__attribute__((always_inline)) inline void max_pool_2x2s2_x8(const float* r0, const float* r1, idx i00, idx W,
                                                             float* y, std::int64_t* ind) {
    const __m256 a0 = _mm256_loadu_ps(r0), b0 = _mm256_loadu_ps(r0 + 8);
    const __m256 a1 = _mm256_loadu_ps(r1), b1 = _mm256_loadu_ps(r1 + 8);
    __m256 m = _mm256_shuffle_ps(a0, b0, 0x88);
    const __m256i base = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(i00)), max_pool_lane_cols(2));
    __m256i best = base;
    max_step_x8<Ind>(_mm256_shuffle_ps(a0, b0, 0xDD), _mm256_add_epi32(base, _mm256_set1_epi32(1)), m, best);
    max_step_x8<Ind>(_mm256_shuffle_ps(a1, b1, 0x88), _mm256_add_epi32(base, _mm256_set1_epi32(int(W))), m, best);
    max_step_x8<Ind>(_mm256_shuffle_ps(a1, b1, 0xDD), _mm256_add_epi32(base, _mm256_set1_epi32(int(W + 1))), m,
                     best);
    max_store_x8<Ind>(m, best, true, y, ind);
}

// V vectors of 8 outputs, any window and dilation, column stride 1 or 2,
// over rows [hstart, hend) of the window, every window's columns inside the
// row. Two vectors at once run two independent max chains. The caller keeps
// every load inside x: at stride 2 the last load reads one float past the
// last window's last tap.
template <bool Ind, int V>
__attribute__((always_inline)) inline void max_pool_inside_x8(const float* xp, const PoolGeom& p, idx hstart,
                                                              idx hend, idx w0, float* y, std::int64_t* ind) {
    const idx W = p.W, sw = p.sw;
    const __m256i lane = max_pool_lane_cols(sw);
    __m256 m[V];
    __m256i best[V];
    for (int j = 0; j < V; ++j) {
        m[j] = _mm256_set1_ps(-__builtin_inff());
        best[j] = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(hstart * W + w0 + 8 * j * sw)), lane);
    }
    for (idx h = hstart; h < hend; h += p.dh)
        for (idx q = 0; q < p.kw; ++q) {
            const idx w = w0 + q * p.dw;
            const float* src = xp + h * W + w;
            for (int j = 0; j < V; ++j) {
                const float* s = src + 8 * j * sw;
                const __m256 v = sw == 1 ? _mm256_loadu_ps(s) : even_cols_x8(s);
                const idx at = h * W + w + 8 * j * sw;
                max_step_x8<Ind>(v, _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(at)), lane), m[j], best[j]);
            }
        }
    for (int j = 0; j < V; ++j) max_store_x8<Ind>(m[j], best[j], sw == 2, y + 8 * j, Ind ? ind + 8 * j : nullptr);
}

// One row's inside columns [lo, hi), at least 8, V vectors a step; a run not
// a multiple of 8V ends with a step overlapping the one before (its outputs
// rewritten with the same values). Returns where it stopped: before a step
// whose last load would leave x.
template <bool Ind, int V>
inline idx max_pool_inside_run(const float* xp, const PoolGeom& p, idx hstart, idx hend, idx lo, idx hi,
                               float* yrow, std::int64_t* irow, const float* x_end) {
    const idx last_row = hstart + (hend - 1 - hstart) / p.dh * p.dh, span = 8 * V * p.sw;
    idx wo = lo;
    for (; wo < hi; wo += 8 * V) {
        const idx at = imin(wo, hi - 8 * V), w0 = at * p.sw - p.pw;
        if (xp + last_row * p.W + w0 + (p.kw - 1) * p.dw + span > x_end) return wo;
        max_pool_inside_x8<Ind, V>(xp, p, hstart, hend, w0, yrow + at, Ind ? irow + at : nullptr);
    }
    return hi;
}

// Whether one plane's rows run through max_pool_inside_x8: float, column
// stride 1 or 2, indices that fit int32.
template <class T>
inline bool max_pool_rows_x8(const PoolGeom& p) {
    return sizeof(T) == sizeof(float) && p.sw <= 2 && p.H * p.W <= idx(INT32_MAX);
}
#else
template <class T>
inline bool max_pool_rows_x8(const PoolGeom&) {
    return false;
}
#endif

// 2x2 windows, dilation 1, fully inside the row pair (the common pooling layer).
template <class T>
inline void max_pool_row_2x2(const T* r0, const T* r1, idx h, idx W, idx sw, idx pw, idx wo_begin, idx wo_end,
                             T* yrow, std::int64_t* irow, const T* x_end) {
#if defined(__AVX512F__)
    if constexpr (sizeof(T) == sizeof(float)) {
        if (sw == 2) {
            for (idx wo = wo_begin; wo < wo_end; wo += 16) {
                const idx w = wo * 2 - pw;
                max_pool_2x2s2_x16(r0 + w, r1 + w, h * W + w, W, imin(16, wo_end - wo), yrow + wo,
                                   irow ? irow + wo : nullptr, x_end);
            }
            return;
        }
    }
#elif defined(__AVX2__)
    if constexpr (sizeof(T) == sizeof(float)) {
        if (sw == 2 && wo_end - wo_begin >= 8 && (h + 2) * W <= idx(INT32_MAX)) {
            // a run not a multiple of 8 ends with a vector overlapping the one
            // before (its outputs rewritten with the same values)
            for (idx wo = wo_begin; wo < wo_end; wo += 8) {
                const idx at = imin(wo, wo_end - 8), w = at * 2 - pw;
                if (irow)
                    max_pool_2x2s2_x8<true>(r0 + w, r1 + w, h * W + w, W, yrow + at, irow + at);
                else
                    max_pool_2x2s2_x8<false>(r0 + w, r1 + w, h * W + w, W, yrow + at, nullptr);
            }
            return;
        }
    }
#endif
    for (idx wo = wo_begin; wo < wo_end; ++wo) {
        const idx w = wo * sw - pw;
        T m = r0[w];
        idx best = h * W + w;
        max_step(r0[w + 1], h * W + w + 1, m, best);
        max_step(r1[w], (h + 1) * W + w, m, best);
        max_step(r1[w + 1], (h + 1) * W + w + 1, m, best);
        yrow[wo] = m;
        if (irow) irow[wo] = best;
    }
}

// Outputs [lo, hi) of one row whose windows lie inside the input: max_step
// tap by tap, each tap one pass over a block of outputs (y and the indices
// hold the running max), so the selects become vector blends instead of a
// branch per element. Indices run as int32 within the block where the plane
// allows (lanes as wide as the floats' vectorize; int64 ones did not).
template <class T, class I>
void max_pool_block_inside(const T* xp, const PoolGeom& p, idx h0, idx lo, idx hi, T* y, I* bi) {
    bool first = true;
    for (idx r = 0; r < p.kh; ++r)
        for (idx q = 0; q < p.kw; ++q) {
            const idx off = (h0 + r * p.dh) * p.W + q * p.dw - p.pw;
            if (first) {
                for (idx wo = lo; wo < hi; ++wo) y[wo] = xp[off + wo * p.sw];
                if (bi)
                    for (idx wo = lo; wo < hi; ++wo) bi[wo - lo] = static_cast<I>(off + wo * p.sw);
                first = false;
                continue;
            }
            if (!bi) {
                for (idx wo = lo; wo < hi; ++wo) {
                    const T v = xp[off + wo * p.sw];
                    y[wo] = (v > y[wo]) | (v != v) ? v : y[wo];
                }
                continue;
            }
            for (idx wo = lo; wo < hi; ++wo) {
                const I i = static_cast<I>(off + wo * p.sw);
                const T v = xp[off + wo * p.sw];
                const bool take = (v > y[wo]) | (v != v);
                y[wo] = take ? v : y[wo];
                bi[wo - lo] = take ? i : bi[wo - lo];
            }
        }
}

template <class T>
void max_pool_row_inside(const T* xp, const PoolGeom& p, idx h0, idx lo, idx hi, T* y, std::int64_t* ind) {
    if (!ind) return max_pool_block_inside(xp, p, h0, lo, hi, y, static_cast<std::int32_t*>(nullptr));
    if (p.H * p.W > idx(INT32_MAX)) return max_pool_block_inside(xp, p, h0, lo, hi, y, ind + lo);
    constexpr idx kBlock = 256;
    std::int32_t bi[kBlock];
    for (idx b = lo; b < hi; b += kBlock) {
        const idx e = imin(hi, b + kBlock);
        max_pool_block_inside(xp, p, h0, b, e, y, bi);
        for (idx wo = b; wo < e; ++wo) ind[wo] = bi[wo - b];
    }
}

// One output's window, scalar: padding reads as -inf, the first in-range
// position when nothing beats it (-1 for a window with no input).
template <class T>
__attribute__((always_inline)) inline void max_pool_output(const T* xp, const PoolGeom& p, idx hstart, idx hend,
                                                           idx wo, T* y, std::int64_t* ind) {
    const idx w0 = wo * p.sw - p.pw;
    const idx wend = imin(w0 + (p.kw - 1) * p.dw + 1, p.W);
    const idx wstart = window_first(w0, p.dw);
    idx best = (hstart < hend && wstart < wend) ? hstart * p.W + wstart : -1;
    T m = -__builtin_inf();
    for (idx h = hstart; h < hend; h += p.dh)
        for (idx w = wstart; w < wend; w += p.dw) max_step(xp[h * p.W + w], h * p.W + w, m, best);
    y[wo] = m;
    if (ind) ind[wo] = best;
}

// One plane, any window but 2x2: per output row, the columns whose window
// lies inside the input one tap at a time over the run (vector blends), or on
// AVX-512 (float, column stride 1 or 2) whole rows 16 outputs a vector.
template <class T>
__attribute__((noinline)) void max_pool_plane(const T* xp, const PoolGeom& p, T* yp, std::int64_t* ip,
                                              const T* x_end) {
    idx lo = 0, hi = 0;
    valid_range(p.W - (p.kw - 1) * p.dw, p.Wo, p.sw, -p.pw, lo, hi);
    for (idx ho = 0; ho < p.Ho; ++ho) {
        const idx h0 = ho * p.sh - p.ph;
        const idx hend = imin(h0 + (p.kh - 1) * p.dh + 1, p.H), hstart = window_first(h0, p.dh);
        T* yrow = yp + ho * p.Wo;
        std::int64_t* irow = ip ? ip + ho * p.Wo : nullptr;
#if defined(__AVX512F__)
        if constexpr (sizeof(T) == sizeof(float)) {
            if (p.sw <= 2) {
                // the columns whose windows lie inside the row in runs of 16,
                // each border (usually one window) as a run of its own
                for (idx wo = 0; wo < p.Wo;) {
                    const idx end = wo < lo ? lo : wo < hi ? hi : p.Wo, n = imin(16, end - wo);
                    max_pool_window_x16(xp, p, h0, wo * p.sw - p.pw, n, yrow + wo, irow ? irow + wo : nullptr,
                                        x_end);
                    wo += n;
                }
                continue;
            }
        }
#endif
#if defined(__AVX2__) && !defined(__AVX512F__)
        if constexpr (sizeof(T) == sizeof(float)) {
            if (max_pool_rows_x8<T>(p)) {
                // the inside columns in runs of 8 while the last tap's load
                // stays inside x; the rest (borders, tail) scalar
                idx wo = lo;
                if (hstart < hend && hi - lo >= 8) {
                    const bool two = hi - lo >= 16;
                    if (irow)
                        wo = two ? max_pool_inside_run<true, 2>(xp, p, hstart, hend, lo, hi, yrow, irow, x_end)
                                 : max_pool_inside_run<true, 1>(xp, p, hstart, hend, lo, hi, yrow, irow, x_end);
                    else
                        wo = two ? max_pool_inside_run<false, 2>(xp, p, hstart, hend, lo, hi, yrow, irow, x_end)
                                 : max_pool_inside_run<false, 1>(xp, p, hstart, hend, lo, hi, yrow, irow, x_end);
                }
                for (idx c = 0; c < lo; ++c) max_pool_output(xp, p, hstart, hend, c, yrow, irow);
                for (idx c = wo; c < p.Wo; ++c) max_pool_output(xp, p, hstart, hend, c, yrow, irow);
                continue;
            }
        }
#endif
        (void)x_end;
        idx skip_begin = 0, skip_end = 0;
        if (h0 >= 0 && h0 + (p.kh - 1) * p.dh < p.H && lo < hi) {
            max_pool_row_inside(xp, p, h0, lo, hi, yrow, irow);
            skip_begin = lo;
            skip_end = hi;
        }
        for (idx wo = 0; wo < skip_begin; ++wo) max_pool_output(xp, p, hstart, hend, wo, yrow, irow);
        for (idx wo = skip_begin == skip_end ? 0 : skip_end; wo < p.Wo; ++wo)
            max_pool_output(xp, p, hstart, hend, wo, yrow, irow);
    }
}

template <class T>
void max_pool2d_forward(const T* x, T* y, std::int64_t* ind, const PoolGeom& p) {
    const idx HW = p.H * p.W, P = p.Ho * p.Wo;
    const T* x_end = x + p.planes * HW;
#pragma omp parallel for num_threads(threads_for(p.planes)) schedule(static)
    for (idx t = 0; t < p.planes; ++t) {
        const T* xp = x + t * HW;
        T* yp = y + t * P;
        std::int64_t* ip = ind ? ind + t * P : nullptr;
        // 2x2 windows here (the columns whose window lies inside the row on
        // the fast path), any other in max_pool_plane
        // (on AVX2 the 2x2 path's vectors take column stride 2 only)
        const bool fast2 =
            p.kh == 2 && p.kw == 2 && p.dh == 1 && p.dw == 1 && !(p.sw == 1 && max_pool_rows_x8<T>(p));
        if (!fast2) {
            max_pool_plane(xp, p, yp, ip, x_end);
            continue;
        }
        idx lo2 = 0, hi2 = 0;
        valid_range(p.W - 1, p.Wo, p.sw, -p.pw, lo2, hi2);
        for (idx ho = 0; ho < p.Ho; ++ho) {
            const idx h0 = ho * p.sh - p.ph;
            const idx hend = imin(h0 + (p.kh - 1) * p.dh + 1, p.H);
            const idx hstart = window_first(h0, p.dh);
            idx skip_begin = 0, skip_end = 0;  // columns done by the fast path
            if (h0 >= 0 && h0 + 1 < p.H && lo2 < hi2) {
                max_pool_row_2x2(xp + h0 * p.W, xp + (h0 + 1) * p.W, h0, p.W, p.sw, p.pw, lo2, hi2,
                                 yp + ho * p.Wo, ip ? ip + ho * p.Wo : nullptr, x_end);
                skip_begin = lo2;
                skip_end = hi2;
            }
            for (idx wo = 0; wo < p.Wo; ++wo) {
                if (wo == skip_begin && skip_end > skip_begin) {
                    wo = skip_end - 1;
                    continue;
                }
                max_pool_output(xp, p, hstart, hend, wo, yp + ho * p.Wo, ip ? ip + ho * p.Wo : nullptr);
            }
        }
    }
}

#if defined(__AVX512F__)
// Backward of whole 2x2 / stride-2 windows in gather form, 16 windows a step:
// each input of a window gets the gradient if it is the window's recorded
// index, else 0, so every element of the output rows is written once and no
// zero pass is needed. Returns false if some index lies outside its own
// window (indices not from this pooling): the caller then scatters instead.
inline bool max_pool_2x2s2_backward_plane(const float* g, const std::int64_t* ip, float* gp, idx H, idx W, idx Ho,
                                          idx Wo, const float* g_end) {
    const __m512i lo_mix = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i hi_mix = _mm512_add_epi32(lo_mix, _mm512_set1_epi32(8));
    const __m512i step2 = _mm512_setr_epi64(0, 2, 4, 6, 8, 10, 12, 14);
    __mmask16 stray = 0;
    for (idx ho = 0; ho < Ho; ++ho) {
        float* r0 = gp + 2 * ho * W;
        float* r1 = r0 + W;
        for (idx wo = 0; wo < Wo; wo += 16) {
            const idx n = imin(16, Wo - wo);
            // loads skip the masks (profiled slow here) wherever 16 lanes stay
            // inside gy (and so inside the indices, which have its layout);
            // lanes past n are never stored
            const bool full = n == 16, load_full = full || g + ho * Wo + wo + 16 <= g_end;
            const __mmask16 live = lane_mask16(0, n);
            const float* gsrc = g + ho * Wo + wo;
            const std::int64_t* isrc = ip + ho * Wo + wo;
            const __m512 gv = load_full ? _mm512_loadu_ps(gsrc) : _mm512_maskz_loadu_ps(live, gsrc);
            const __m512i ilo = load_full ? _mm512_loadu_si512(isrc) : _mm512_maskz_loadu_epi64(lane_mask8(0, n), isrc);
            const __m512i ihi =
                load_full ? _mm512_loadu_si512(isrc + 8) : _mm512_maskz_loadu_epi64(lane_mask8(0, n - 8), isrc + 8);
            const __m512i blo = _mm512_add_epi64(_mm512_set1_epi64(2 * ho * W + 2 * wo), step2);
            const __m512i bhi = _mm512_add_epi64(blo, _mm512_set1_epi64(16));
            __mmask16 hit[4];
            const std::int64_t offs[4] = {0, 1, W, W + 1};
            for (int c = 0; c < 4; ++c) {
                const __m512i o = _mm512_set1_epi64(offs[c]);
                hit[c] = __mmask16(_mm512_cmpeq_epi64_mask(ilo, _mm512_add_epi64(blo, o)) |
                                   (_mm512_cmpeq_epi64_mask(ihi, _mm512_add_epi64(bhi, o)) << 8));
            }
            const __mmask16 none = __mmask16(_mm512_cmpeq_epi64_mask(ilo, _mm512_set1_epi64(-1)) |
                                             (_mm512_cmpeq_epi64_mask(ihi, _mm512_set1_epi64(-1)) << 8));
            stray |= live & ~(hit[0] | hit[1] | hit[2] | hit[3] | none);
            const __m512 v00 = _mm512_maskz_mov_ps(hit[0], gv), v01 = _mm512_maskz_mov_ps(hit[1], gv);
            const __m512 v10 = _mm512_maskz_mov_ps(hit[2], gv), v11 = _mm512_maskz_mov_ps(hit[3], gv);
            if (full) {
                _mm512_storeu_ps(r0 + 2 * wo, _mm512_permutex2var_ps(v00, lo_mix, v01));
                _mm512_storeu_ps(r0 + 2 * wo + 16, _mm512_permutex2var_ps(v00, hi_mix, v01));
                _mm512_storeu_ps(r1 + 2 * wo, _mm512_permutex2var_ps(v10, lo_mix, v11));
                _mm512_storeu_ps(r1 + 2 * wo + 16, _mm512_permutex2var_ps(v10, hi_mix, v11));
                continue;
            }
            const __mmask16 first = lane_mask16(0, 2 * n), second = lane_mask16(0, 2 * n - 16);
            _mm512_mask_storeu_ps(r0 + 2 * wo, first, _mm512_permutex2var_ps(v00, lo_mix, v01));
            _mm512_mask_storeu_ps(r0 + 2 * wo + 16, second, _mm512_permutex2var_ps(v00, hi_mix, v01));
            _mm512_mask_storeu_ps(r1 + 2 * wo, first, _mm512_permutex2var_ps(v10, lo_mix, v11));
            _mm512_mask_storeu_ps(r1 + 2 * wo + 16, second, _mm512_permutex2var_ps(v10, hi_mix, v11));
        }
        for (idx w = 2 * Wo; w < W; ++w) r0[w] = r1[w] = 0.0f;  // columns no window covers
    }
    for (idx i = 2 * Ho * W; i < H * W; ++i) gp[i] = 0.0f;  // rows no window covers
    return stray == 0;
}
#endif

#if defined(__AVX2__) && !defined(__AVX512F__)
// Two vectors of 4 int64 compare masks as one mask of 8 float lanes, in order:
// the low halves in-lane by a shuffle, then the 64-bit quarters in order.
inline __m256 narrow_masks64(__m256i lo, __m256i hi) {
    const __m256 e = _mm256_shuffle_ps(_mm256_castsi256_ps(lo), _mm256_castsi256_ps(hi), 0x88);
    return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(e), 0xD8));
}

// AVX2's form of the gather backward above, 8 windows a step: each input of
// a window gets the gradient if it is the window's recorded index, else 0.
// A row not a multiple of 8 windows ends with a step overlapping the one
// before (the same values rewritten). Returns false if some index lies
// outside its own window, or for rows of fewer than 8 windows (the scatter
// was faster there): the caller then scatters.
inline bool max_pool_2x2s2_backward_plane_x8(const float* g, const std::int64_t* ip, float* gp, idx H, idx W,
                                             idx Ho, idx Wo) {
    const __m256i step2 = _mm256_setr_epi64x(0, 2, 4, 6), none = _mm256_set1_epi64x(-1);
    if (Wo < 8) return false;
    __m256 stray = _mm256_setzero_ps();
    for (idx ho = 0; ho < Ho; ++ho) {
        float* r0 = gp + 2 * ho * W;
        float* r1 = r0 + W;
        const float* grow = g + ho * Wo;
        const std::int64_t* irow = ip + ho * Wo;
        for (idx wo = 0; wo < Wo; wo += 8) {
            const idx at = imin(wo, Wo - 8);
            const __m256 gv = _mm256_loadu_ps(grow + at);
            const __m256i ilo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(irow + at));
            const __m256i ihi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(irow + at + 4));
            const __m256i blo = _mm256_add_epi64(_mm256_set1_epi64x(2 * ho * W + 2 * at), step2);
            const __m256i bhi = _mm256_add_epi64(blo, _mm256_set1_epi64x(8));
            const std::int64_t offs[4] = {0, 1, W, W + 1};
            __m256 v[4], named = narrow_masks64(_mm256_cmpeq_epi64(ilo, none), _mm256_cmpeq_epi64(ihi, none));
            for (int c = 0; c < 4; ++c) {
                const __m256i o = _mm256_set1_epi64x(offs[c]);
                const __m256 hit = narrow_masks64(_mm256_cmpeq_epi64(ilo, _mm256_add_epi64(blo, o)),
                                                  _mm256_cmpeq_epi64(ihi, _mm256_add_epi64(bhi, o)));
                named = _mm256_or_ps(named, hit);
                v[c] = _mm256_and_ps(hit, gv);
            }
            stray = _mm256_or_ps(stray, _mm256_andnot_ps(named, _mm256_castsi256_ps(_mm256_set1_epi32(-1))));
            // window j's left and right inputs interleaved: columns 2j, 2j + 1
            const __m256 a_lo = _mm256_unpacklo_ps(v[0], v[1]), a_hi = _mm256_unpackhi_ps(v[0], v[1]);
            const __m256 b_lo = _mm256_unpacklo_ps(v[2], v[3]), b_hi = _mm256_unpackhi_ps(v[2], v[3]);
            _mm256_storeu_ps(r0 + 2 * at, _mm256_permute2f128_ps(a_lo, a_hi, 0x20));
            _mm256_storeu_ps(r0 + 2 * at + 8, _mm256_permute2f128_ps(a_lo, a_hi, 0x31));
            _mm256_storeu_ps(r1 + 2 * at, _mm256_permute2f128_ps(b_lo, b_hi, 0x20));
            _mm256_storeu_ps(r1 + 2 * at + 8, _mm256_permute2f128_ps(b_lo, b_hi, 0x31));
        }
        for (idx w = 2 * Wo; w < W; ++w) r0[w] = r1[w] = 0.0f;  // columns no window covers
    }
    for (idx i = 2 * Ho * W; i < H * W; ++i) gp[i] = 0.0f;  // rows no window covers
    return _mm256_movemask_ps(stray) == 0;
}
#endif

// gx = 0, then each output's gradient goes to the input that won its window
// (index -1: none).
// A plane is owned by one thread and walked in order: deterministic.
template <class T>
bool max_pool2d_backward(const T* gy, const std::int64_t* ind, T* gx, const PoolGeom& p) {
    const idx HW = p.H * p.W, P = p.Ho * p.Wo;
    const T* g_end = gy + p.planes * P;
    // whole, non-overlapping 2x2 windows: the gather form above
    const bool tiles = p.kh == 2 && p.kw == 2 && p.sh == 2 && p.sw == 2 && p.dh == 1 && p.dw == 1 && p.ph == 0 &&
                       p.pw == 0 && 2 * p.Ho <= p.H && 2 * p.Wo <= p.W;
    idx bad = 0;
#pragma omp parallel for num_threads(threads_for(p.planes)) schedule(static) reduction(+ : bad)
    for (idx t = 0; t < p.planes; ++t) {
        T* gp = gx + t * HW;
        const T* g = gy + t * P;
        const std::int64_t* ip = ind + t * P;
#if defined(__AVX512F__)
        if constexpr (sizeof(T) == sizeof(float)) {
            if (tiles && max_pool_2x2s2_backward_plane(g, ip, gp, p.H, p.W, p.Ho, p.Wo, g_end)) continue;
        }
#elif defined(__AVX2__)
        if constexpr (sizeof(T) == sizeof(float)) {
            if (tiles && max_pool_2x2s2_backward_plane_x8(g, ip, gp, p.H, p.W, p.Ho, p.Wo)) continue;
        }
#endif
        (void)tiles;
        for (idx i = 0; i < HW; ++i) gp[i] = T(0);
        for (idx i = 0; i < P; ++i) {
            const std::int64_t j = ip[i];
            if (j == -1) continue;  // a window with no input
            if (j < 0 || j >= HW) {
                ++bad;
                continue;
            }
            gp[j] += g[i];
        }
    }
    return bad == 0;
}
