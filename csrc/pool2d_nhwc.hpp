// max and average pooling on channels_last (NHWC) arrays, with the same rules
// as the plane kernels (max_pool2d.hpp, avg_pool2d.hpp): indices are
// h*W + w within each (n, c) plane, NaN wins, ties keep the first position
// (windows are read row by row, as there), an empty window yields -inf and
// index -1. The innermost loops run across channels, which are contiguous.
// PoolGeom.planes is the image count N here; `C` is passed beside it.

// Integer vectors beside the value vectors, of the values' lane width: masks
// and int32 indices for float, int64 for double. (A vector_size that depends
// on T is dropped inside a template, so the types are chosen by T below.)
typedef std::int32_t vint_f __attribute__((vector_size(CK_VEC_BYTES)));
typedef std::int64_t vint_d __attribute__((vector_size(CK_VEC_BYTES)));

// The L int64 indices beside a vector of L values, compared with a position
// as a lane mask of the values' width. For float they are two registers,
// whose compare results are narrowed with shuffles (the generic vector code
// for the double-width type was scalarized: 6x slower than the scatter).
struct IndicesF {
#if defined(__AVX512F__)
    __m512i lo, hi;
    explicit IndicesF(const std::int64_t* p) : lo(_mm512_loadu_si512(p)), hi(_mm512_loadu_si512(p + 8)) {}
    vint_f eq(std::int64_t v) const {
        const __m512i s = _mm512_set1_epi64(v);
        return (vint_f)_mm512_movm_epi32(
            __mmask16(_mm512_cmpeq_epi64_mask(lo, s) | (_mm512_cmpeq_epi64_mask(hi, s) << 8)));
    }
#elif defined(__AVX2__)
    __m256i lo, hi;
    explicit IndicesF(const std::int64_t* p)
        : lo(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))),
          hi(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 4))) {}
    vint_f eq(std::int64_t v) const {
        const __m256i s = _mm256_set1_epi64x(v);
        return (vint_f)_mm256_castps_si256(narrow_masks64(_mm256_cmpeq_epi64(lo, s), _mm256_cmpeq_epi64(hi, s)));
    }
#else
    std::int64_t i[CK_VEC_BYTES / 4];
    explicit IndicesF(const std::int64_t* p) { std::memcpy(i, p, sizeof(i)); }
    vint_f eq(std::int64_t v) const {
        vint_f m{};
        for (int j = 0; j < CK_VEC_BYTES / 4; ++j) m[j] = i[j] == v ? -1 : 0;
        return m;
    }
#endif
};

struct IndicesD {
    vint_d i;
    explicit IndicesD(const std::int64_t* p) : i(vload<vint_d>(p)) {}
    vint_d eq(std::int64_t v) const { return i == (vint_d{} + v); }
};

// int32 (float's) or int64 lanes stored as int64
inline void store_indices(std::int64_t* dst, vint_d b) { vstore(dst, b); }
inline void store_indices(std::int64_t* dst, vint_f b) {
#if defined(__AVX512F__)
    _mm512_storeu_si512(dst, _mm512_cvtepi32_epi64(_mm512_castsi512_si256((__m512i)b)));
    _mm512_storeu_si512(dst + 8, _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64((__m512i)b, 1)));
#elif defined(__AVX2__)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm256_cvtepi32_epi64(_mm256_castsi256_si128((__m256i)b)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 4),
                        _mm256_cvtepi32_epi64(_mm256_extracti128_si256((__m256i)b, 1)));
#else
    for (int j = 0; j < CK_VEC_BYTES / 4; ++j) dst[j] = b[j];
#endif
}

// out[c] = the window's max (NaN wins) for every channel, L channels a
// vector kept in registers over the window and stored once; with Ind,
// oi[c] = its index too, as integers of the values' width (int32 for float,
// so the plane must fit one) beside them, widened to int64 on store.
template <bool Ind, class T>
inline void max_window_nhwc(const T* px, T* out, std::int64_t* oi, idx hstart, idx hend, idx wstart, idx wend,
                            const PoolGeom& p, idx C, std::int64_t first) {
    typedef typename Vec<T>::type V;
    typedef std::conditional_t<sizeof(T) == 4, std::int32_t, std::int64_t> I;
    typedef std::conditional_t<sizeof(T) == 4, vint_f, vint_d> VI;
    constexpr int L = CK_VEC_BYTES / sizeof(T);
    idx c = 0;
    for (; c + L <= C; c += L) {
        V m = V{} - __builtin_inf();
        VI b = VI{} + static_cast<I>(first);
        for (idx h = hstart; h < hend; h += p.dh)
            for (idx w = wstart; w < wend; w += p.dw) {
                const V v = vload<V>(px + (h * p.W + w) * C + c);
                const VI take = (v > m) | (v != v);
                m = take ? v : m;
                if constexpr (Ind) b = take ? VI{} + static_cast<I>(h * p.W + w) : b;
            }
        vstore(out + c, m);
        if constexpr (Ind) store_indices(oi + c, b);
    }
    for (; c < C; ++c) {
        T m = -__builtin_inf();
        idx best = first;
        for (idx h = hstart; h < hend; h += p.dh)
            for (idx w = wstart; w < wend; w += p.dw) max_step(px[(h * p.W + w) * C + c], h * p.W + w, m, best);
        out[c] = m;
        if constexpr (Ind) oi[c] = best;
    }
}

template <class T>
void max_pool2d_forward_nhwc(const T* x, T* y, std::int64_t* ind, const PoolGeom& p, idx C) {
    const idx rows = p.planes * p.Ho;
#pragma omp parallel for num_threads(threads_for(rows)) schedule(static)
    for (idx t = 0; t < rows; ++t) {
        const idx n = t / p.Ho, ho = t % p.Ho;
        const idx h0 = ho * p.sh - p.ph, hend = imin(h0 + (p.kh - 1) * p.dh + 1, p.H), hstart = window_first(h0, p.dh);
        for (idx wo = 0; wo < p.Wo; ++wo) {
            const idx w0 = wo * p.sw - p.pw, wend = imin(w0 + (p.kw - 1) * p.dw + 1, p.W);
            const idx wstart = window_first(w0, p.dw);
            const std::int64_t first = (hstart < hend && wstart < wend) ? hstart * p.W + wstart : -1;
            T* out = y + ((n * p.Ho + ho) * p.Wo + wo) * C;
            std::int64_t* oi = ind ? ind + ((n * p.Ho + ho) * p.Wo + wo) * C : nullptr;
            const T* px = x + n * p.H * p.W * C;
            if (!oi) {
                max_window_nhwc<false>(px, out, oi, hstart, hend, wstart, wend, p, C, first);
                continue;
            }
            if (p.H * p.W <= idx(INT32_MAX)) {
                max_window_nhwc<true>(px, out, oi, hstart, hend, wstart, wend, p, C, first);
                continue;
            }
            for (idx c = 0; c < C; ++c) out[c] = -__builtin_inf();
            for (idx c = 0; c < C; ++c) oi[c] = first;
            for (idx h = hstart; h < hend; h += p.dh)
                for (idx w = wstart; w < wend; w += p.dw) {
                    const T* in = x + ((n * p.H + h) * p.W + w) * C;
                    const std::int64_t pos = h * p.W + w;
#pragma omp simd
                    for (idx c = 0; c < C; ++c) {  // max_step across channels
                        const T v = in[c];
                        const bool take = (v > out[c]) | (v != v);
                        out[c] = take ? v : out[c];
                        oi[c] = take ? pos : oi[c];
                    }
                }
        }
    }
}

// Backward of one image whose windows tile the input (kernel == stride, no
// padding or dilation: LeNet's and VGG's 2x2/2) in gather form: every input
// takes its window's gradient where the window's index names it, else 0, a
// vector of channels at a time, so each element of gx is written once, with
// no zero pass and no scattered adds. Returns false if an index other than -1
// lies outside its window (indices not from this pooling): the caller then
// scatters.
template <class T>
bool max_pool_tiles_backward_nhwc(const T* gy, const std::int64_t* ind, T* g, const PoolGeom& p, idx C) {
    typedef typename Vec<T>::type V;
    constexpr int L = CK_VEC_BYTES / sizeof(T);
    typedef std::conditional_t<sizeof(T) == 4, vint_f, vint_d> VM;
    typedef std::conditional_t<sizeof(T) == 4, IndicesF, IndicesD> Indices;
    VM stray = VM{};
    bool tail_ok = true;
    for (idx ho = 0; ho < p.Ho; ++ho)
        for (idx wo = 0; wo < p.Wo; ++wo) {
            const T* go = gy + (ho * p.Wo + wo) * C;
            const std::int64_t* io = ind + (ho * p.Wo + wo) * C;
            const idx h0 = ho * p.kh, w0 = wo * p.kw;
            idx c = 0;
            for (; c + L <= C; c += L) {
                const V gv = vload<V>(go + c);
                const Indices iv(io + c);
                VM named = iv.eq(-1);
                for (idx r = 0; r < p.kh; ++r)
                    for (idx q = 0; q < p.kw; ++q) {
                        const std::int64_t pos = (h0 + r) * p.W + w0 + q;
                        const VM hit = iv.eq(pos);
                        named |= hit;
                        vstore(g + pos * C + c, hit ? gv : V{});
                    }
                stray |= ~named;
            }
            for (; c < C; ++c) {
                const std::int64_t i = io[c];
                bool named = i == -1;
                for (idx r = 0; r < p.kh; ++r)
                    for (idx q = 0; q < p.kw; ++q) {
                        const std::int64_t pos = (h0 + r) * p.W + w0 + q;
                        g[pos * C + c] = i == pos ? go[c] : T(0);
                        named |= i == pos;
                    }
                tail_ok &= named;
            }
        }
    // rows and columns past the last whole window: no window covers them
    for (idx h = 0; h < p.H; ++h) {
        const idx w_from = h < p.Ho * p.kh ? p.Wo * p.kw : 0;
        for (idx i = (h * p.W + w_from) * C; i < (h + 1) * p.W * C; ++i) g[i] = T(0);
    }
    for (int j = 0; j < L; ++j) tail_ok &= stray[j] == 0;
    return tail_ok;
}

// each output's gradient goes to the input that won its window (index -1:
// none); an image is owned by one thread and walked in order: deterministic
template <class T>
bool max_pool2d_backward_nhwc(const T* gy, const std::int64_t* ind, T* gx, const PoolGeom& p, idx C) {
    const idx HW = p.H * p.W, OP = p.Ho * p.Wo;
    const bool tiles = p.kh == p.sh && p.kw == p.sw && p.ph == 0 && p.pw == 0 && p.dh == 1 && p.dw == 1 &&
                       p.Ho * p.kh <= p.H && p.Wo * p.kw <= p.W;
    bool ok = true;
#pragma omp parallel for num_threads(threads_for(p.planes)) schedule(static) reduction(&& : ok)
    for (idx n = 0; n < p.planes; ++n) {
        T* g = gx + n * HW * C;
        if (tiles && max_pool_tiles_backward_nhwc(gy + n * OP * C, ind + n * OP * C, g, p, C)) continue;
        for (idx i = 0; i < HW * C; ++i) g[i] = T(0);
        for (idx o = 0; o < OP; ++o) {
            const T* go = gy + (n * OP + o) * C;
            const std::int64_t* io = ind + (n * OP + o) * C;
            for (idx c = 0; c < C; ++c) {
                const std::int64_t i = io[c];
                if (i == -1) continue;  // an empty window has no input to send to
                if (i < 0 || i >= HW) {
                    ok = false;
                    continue;
                }
                g[i * C + c] += go[c];
            }
        }
    }
    return ok;
}

template <class T>
void avg_pool2d_forward_nhwc(const T* x, T* y, const PoolGeom& p, idx C) {
    const idx rows = p.planes * p.Ho;
#pragma omp parallel for num_threads(threads_for(rows)) schedule(static)
    for (idx t = 0; t < rows; ++t) {
        const idx n = t / p.Ho, ho = t % p.Ho;
        for (idx wo = 0; wo < p.Wo; ++wo) {
            const AvgWindow a = avg_window(ho, wo, p);
            T* out = y + ((n * p.Ho + ho) * p.Wo + wo) * C;
            for (idx c = 0; c < C; ++c) out[c] = T(0);
            for (idx h = a.h0; h < a.h1; ++h)
                for (idx w = a.w0; w < a.w1; ++w) {
                    const T* in = x + ((n * p.H + h) * p.W + w) * C;
#pragma omp simd
                    for (idx c = 0; c < C; ++c) out[c] += in[c];
                }
            const T div = a.divisor ? static_cast<T>(a.divisor) : T(0);
            for (idx c = 0; c < C; ++c) out[c] = a.divisor ? out[c] / div : T(0);
        }
    }
}

template <class T>
void avg_pool2d_backward_nhwc(const T* gy, T* gx, const PoolGeom& p, idx C) {
    const idx HW = p.H * p.W;
#pragma omp parallel for num_threads(threads_for(p.planes)) schedule(static)
    for (idx n = 0; n < p.planes; ++n) {
        T* g = gx + n * HW * C;
        for (idx i = 0; i < HW * C; ++i) g[i] = T(0);
        for (idx ho = 0; ho < p.Ho; ++ho)
            for (idx wo = 0; wo < p.Wo; ++wo) {
                const AvgWindow a = avg_window(ho, wo, p);
                if (!a.divisor) continue;
                const T* go = gy + ((n * p.Ho + ho) * p.Wo + wo) * C;
                const T div = static_cast<T>(a.divisor);
                for (idx h = a.h0; h < a.h1; ++h)
                    for (idx w = a.w0; w < a.w1; ++w) {
                        T* gi = g + (h * p.W + w) * C;
#pragma omp simd
                        for (idx c = 0; c < C; ++c) gi[c] += go[c] / div;
                    }
            }
    }
}
