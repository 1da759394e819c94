// conv2d on channels_last (NHWC) arrays, forward and backward, with the
// output and input gradient in NHWC too: no transposes on the way in or out.
//
// In NHWC an output pixel's receptive field is R*S runs of C contiguous
// input channels, and the output is a row-major (pixels x K) matrix. So the
// forward conv is Y (M x K) = col (M x R*S*C) * W' (R*S*C x K), M = N*Ho*Wo,
// where a column-matrix row is a copy of those runs (for stride-1 undilated
// rows, S*C contiguous elements per kernel row), built in bands of output
// pixels that stay in L2 and handed to the packed GEMM. A 1x1 stride-1
// unpadded conv reads the input as the column matrix directly. The weights are
// reordered once per call to (K, R, S, C/G), in the patch's order.
//
// Bands are spread over threads, each output row written by one band: the
// reduction order per output is fixed, so results do not depend on the thread
// count. The grad weight sums images in a fixed number of chunks (a function of
// the shape only); grad input gathers each input pixel's contributions in a
// fixed tap order. Depthwise convs (groups == C == K) run direct loops that
// vectorize across channels.

template <class T>
inline void copy_run(T* dst, const T* src, idx n) {
    if (n >= 16) {
        std::memcpy(dst, src, static_cast<std::size_t>(n) * sizeof(T));
        return;
    }
    for (idx i = 0; i < n; ++i) dst[i] = src[i];
}

template <class T>
inline void zero_run(T* dst, idx n) {
    for (idx i = 0; i < n; ++i) dst[i] = T(0);
}

// Output pixel m = (n, ho, wo) of an NHWC conv, found by division once and
// then stepped row by row: with a short patch (a stem's 27 values) two
// divisions per row cost as much as the row's own work.
struct PixelWalk {
    idx n, ho, wo, Ho, Wo;
    PixelWalk(idx m, const ConvGeom& s)
        : n(m / (s.Ho * s.Wo)), ho(m % (s.Ho * s.Wo) / s.Wo), wo(m % s.Wo), Ho(s.Ho), Wo(s.Wo) {}
    void next() {
        if (++wo < Wo) return;
        wo = 0;
        if (++ho < Ho) return;
        ho = 0;
        ++n;
    }
};

// Rows [m0, m1) of group g's column matrix: row m = (n, ho, wo), columns
// (r, q, c) with zeros where the tap reads padding.
template <class T>
void nhwc_im2col(const T* x, T* col, idx m0, idx m1, idx g, const ConvGeom& s) {
    const idx Cg = s.C / s.G, SC = s.S * Cg, RSC = s.R * SC;
    const bool runs = s.G == 1 && s.dw == 1;  // a kernel row's S taps are one run of S*C elements
    PixelWalk px(m0, s);
    for (idx m = m0; m < m1; ++m, px.next()) {
        const idx n = px.n, ho = px.ho, wo = px.wo;
        T* row = col + (m - m0) * RSC;
        const idx iw0 = wo * s.sw - s.pw;
        for (idx r = 0; r < s.R; ++r) {
            const idx ih = ho * s.sh - s.ph + r * s.dh;
            T* dst = row + r * SC;
            if (ih < 0 || ih >= s.H) {
                zero_run(dst, SC);
                continue;
            }
            const T* xrow = x + (n * s.H + ih) * s.W * s.C + g * Cg;
            if (runs) {
                const idx q0 = imax(0, -iw0), q1 = imin(s.S, s.W - iw0);
                if (q1 <= q0) {
                    zero_run(dst, SC);
                    continue;
                }
                zero_run(dst, q0 * Cg);
                copy_run(dst + q0 * Cg, xrow + (iw0 + q0) * s.C, (q1 - q0) * Cg);
                zero_run(dst + q1 * Cg, (s.S - q1) * Cg);
                continue;
            }
            for (idx q = 0; q < s.S; ++q) {
                const idx iw = iw0 + q * s.dw;
                if (iw < 0 || iw >= s.W)
                    zero_run(dst + q * Cg, Cg);
                else
                    copy_run(dst + q * Cg, xrow + iw * s.C, Cg);
            }
        }
    }
}

// Output pixels per band: a column-matrix band of a quarter of L2 (a share
// beside the GEMM's packed panels), a whole number of the GEMM's row panels,
// at least one.
template <class T>
idx nhwc_band_rows(idx rsc, idx M) {
    constexpr idx MR = GemmBlocking<T>::MR;
    const idx band_bytes = cache_sizes().l2 / 4;
    idx rows = band_bytes / imax(rsc * static_cast<idx>(sizeof(T)), 1);
    rows = imax(MR, rows / MR * MR);
    return imin(rows, M);
}

// fn(ho, wo, tap) for every output pixel whose tap (r, q) (tap = r*S + q)
// reads input pixel (ih, iw), in tap order: the gather form of grad input.
template <class Fn>
inline void for_each_tap_into(const ConvGeom& s, idx ih, idx iw, const Fn& fn) {
    for (idx r = 0; r < s.R; ++r) {
        const idx hnum = ih + s.ph - r * s.dh;
        if (hnum < 0 || hnum % s.sh) continue;
        const idx ho = hnum / s.sh;
        if (ho >= s.Ho) continue;
        for (idx q = 0; q < s.S; ++q) {
            const idx wnum = iw + s.pw - q * s.dw;
            if (wnum < 0 || wnum % s.sw) continue;
            const idx wo = wnum / s.sw;
            if (wo < s.Wo) fn(ho, wo, r * s.S + q);
        }
    }
}

inline bool nhwc_is_depthwise(const ConvGeom& s) { return s.G == s.C && s.K == s.C && s.G > 1; }

// ---- depthwise: y[n, ho, wo, c] = sum_rq x[n, ih, iw, c] * w[c, r, q]

// The interior of a 3x3 undilated depthwise row (stride sw): every tap in
// range. For each block of NV channel vectors, the nine taps' weights stay in
// registers while the row's pixels are walked with one pointer per input row;
// a tap (r, q) is that pointer plus q * C, which x86 addressing reaches with
// one index register (scale 1 and 2), so the inputs feed the FMAs straight
// from L1 and no address is spilled. Consecutive pixels' sums are independent,
// which covers the FMA latency. The pixels go in chunks whose three input rows
// stay in L1 across the channel blocks. Taps are summed in the same (r, q)
// order as the general loop. `next` (or null): a row to prefetch at the same
// pixels, the one the next row of output reads first; streamed from memory
// it otherwise arrives only as the loads ask for it. out_next (or 0): how far
// the next output row lies, whose lines are asked for with intent to write:
// a store that misses waits for its line's read, and a row of such misses
// fills the store buffer.
template <class T, int NV>
void depthwise3x3_row_block(const T* const rows[3], const T* wt, const T* b, T* out, idx C, idx c0, idx w0, idx w1,
                            idx pw, idx sw, const T* next = nullptr, idx out_next = 0) {
    typedef typename Vec<T>::type V;
    constexpr int L = CK_VEC_BYTES / sizeof(T);
    V wr[9][NV], bias[NV];
    for (int t = 0; t < 9; ++t)
        for (int v = 0; v < NV; ++v) wr[t][v] = vload<V>(wt + t * C + c0 + v * L);
    for (int v = 0; v < NV; ++v) bias[v] = b ? vload<V>(b + c0 + v * L) : V{};
    const T* in[3];
    for (int r = 0; r < 3; ++r) in[r] = rows[r] + (w0 * sw - pw) * C + c0;
    const idx step = sw * C;
    T* o = out + w0 * C + c0;
    const T* nx = next ? next + (w0 * sw - pw) * C + c0 : nullptr;
    for (idx wo = w0; wo < w1; ++wo) {
        V acc[NV];
        if (nx) {
            for (int v = 0; v < NV; ++v) __builtin_prefetch(nx + v * L, 0, 3);
            nx += step;
        }
        if (out_next)
            for (int v = 0; v < NV; ++v) __builtin_prefetch(o + out_next + v * L, 1, 3);
        for (int v = 0; v < NV; ++v) acc[v] = bias[v];
        for (int r = 0; r < 3; ++r)
            for (int q = 0; q < 3; ++q)
                for (int v = 0; v < NV; ++v) acc[v] += vload<V>(in[r] + q * C + v * L) * wr[r * 3 + q][v];
        for (int v = 0; v < NV; ++v) vstore(o + v * L, acc[v]);
        for (int r = 0; r < 3; ++r) in[r] += step;
        o += C;
    }
}

// The register budget picks NV: 9 * NV weights + NV sums fit 32 zmm with
// NV = 2 (leaving room for the loads), 16 ymm with NV = 1. C is a multiple of
// the lanes.
template <class T>
void depthwise3x3_row(const T* const rows[3], const T* wt, const T* b, T* out, idx C, idx wo0, idx wo1, idx pw,
                      idx sw, const T* next = nullptr, idx out_next = 0) {
    constexpr int L = CK_VEC_BYTES / sizeof(T), NV = CK_VEC_BYTES == 64 ? 2 : 1;
    // the rows a chunk touches in half of L1: its three input rows (at stride
    // 2, twice the pixels), the next input row asked for ahead, its output row
    // and the next one's (sized by the three input rows alone, the chunks of
    // 144 channels at 56x56 ran slower)
    const idx chunk = imax(4, cache_sizes().l1d / 2 / imax(1, (4 * sw + 2) * C * static_cast<idx>(sizeof(T))));
    for (idx w0 = wo0; w0 < wo1; w0 += chunk) {
        const idx w1 = imin(wo1, w0 + chunk);
        idx c0 = 0;
        for (; c0 + NV * L <= C; c0 += NV * L)
            depthwise3x3_row_block<T, NV>(rows, wt, b, out, C, c0, w0, w1, pw, sw, next, out_next);
        for (; c0 < C; c0 += L) depthwise3x3_row_block<T, 1>(rows, wt, b, out, C, c0, w0, w1, pw, sw, next, out_next);
    }
}

// Whether a depthwise conv is 3x3, undilated, of stride 1 or 2, with whole
// vectors of channels: the shape the register-blocked rows take (padding up
// to 2, so that at stride 1 grad input is such a conv too).
inline bool depthwise3x3_fast(const ConvGeom& s, idx lanes) {
    return s.R == 3 && s.S == 3 && s.sh <= 2 && s.sw <= 2 && s.dh == 1 && s.dw == 1 && s.C % lanes == 0 &&
           s.ph <= 2 && s.pw <= 2;
}

// Output positions [lo, hi) whose three taps (stride st, padding p) all fall
// inside an input of n.
inline void depthwise3x3_interior(idx n, idx out, idx st, idx p, idx& lo, idx& hi) {
    lo = imin(out, (p + st - 1) / st);
    hi = imax(lo, n - 3 + p >= 0 ? imin(out, (n - 3 + p) / st + 1) : 0);
}

template <class T>
void depthwise_nhwc_forward(const T* x, const T* w, const T* b, T* y, const ConvGeom& s, bool relu) {
    const idx C = s.C, RS = s.R * s.S, rows = s.N * s.Ho;
    T* wt = static_cast<T*>(workspace(static_cast<std::size_t>(RS * C) * sizeof(T), 2));
    for (idx c = 0; c < C; ++c)  // (r, q, c): a tap's weights contiguous across channels
        for (idx rs = 0; rs < RS; ++rs) wt[rs * C + c] = w[c * RS + rs];
    typedef typename Vec<T>::type V;
    constexpr int L = CK_VEC_BYTES / sizeof(T);
    const bool fast3x3 = depthwise3x3_fast(s, L);
#pragma omp parallel for num_threads(threads_for(rows)) schedule(static)
    for (idx t = 0; t < rows; ++t) {
        const idx n = t / s.Ho, ho = t % s.Ho;
        constexpr int NV = 4, CB = NV * L;
        idx taps[64][2];  // (input offset, weight offset) of the window's in-range taps; R*S <= 64 here
        T* const yrow = y + (n * s.Ho + ho) * s.Wo * C;
        // output pixels [wo0, wo1) of this row have every tap in range
        idx wo0 = s.Wo, wo1 = s.Wo;
        const idx ih0 = ho * s.sh - s.ph;
        if (fast3x3 && ih0 >= 0 && ih0 + 2 < s.H) {
            depthwise3x3_interior(s.W, s.Wo, s.sw, s.pw, wo0, wo1);
            const T* in_rows[3];
            for (int r = 0; r < 3; ++r) in_rows[r] = x + (n * s.H + ih0 + r) * s.W * C;
            // the input row the thread's next output row adds (its rows are
            // consecutive), asked for pixel by pixel while this one is summed
            const T* next = ih0 + 2 + s.sh < s.H ? x + (n * s.H + ih0 + 2 + s.sh) * s.W * C : nullptr;
            depthwise3x3_row(in_rows, wt, b, yrow, C, wo0, wo1, s.pw, s.sw, next, t + 1 < rows ? s.Wo * C : 0);
        }
        for (idx wo = 0; wo < s.Wo; ++wo) {
            T* out = yrow + wo * C;
            if (wo == wo0 && wo1 > wo0) {  // the interior, done above
                if (relu)
                    for (idx cc = 0; cc < (wo1 - wo0) * C; ++cc)
                        out[cc] = (out[cc] > T(0) || out[cc] != out[cc]) ? out[cc] : T(0);
                wo = wo1 - 1;
                continue;
            }
            idx nt = 0;
            for (idx r = 0; r < s.R; ++r) {
                const idx ih = ho * s.sh - s.ph + r * s.dh;
                if (ih < 0 || ih >= s.H) continue;
                for (idx q = 0; q < s.S; ++q) {
                    const idx iw = wo * s.sw - s.pw + q * s.dw;
                    if (iw < 0 || iw >= s.W) continue;
                    taps[nt][0] = ((n * s.H + ih) * s.W + iw) * C;
                    taps[nt][1] = (r * s.S + q) * C;
                    ++nt;
                }
            }
            idx c = 0;
            for (; c + CB <= C; c += CB) {  // CB channels in registers across all taps
                V acc[NV];
                for (int v = 0; v < NV; ++v) acc[v] = b ? vload<V>(b + c + v * L) : V{};
                for (idx k = 0; k < nt; ++k) {
                    const T* in = x + taps[k][0] + c;
                    const T* wv = wt + taps[k][1] + c;
                    for (int v = 0; v < NV; ++v) acc[v] += vload<V>(in + v * L) * vload<V>(wv + v * L);
                }
                for (int v = 0; v < NV; ++v) vstore(out + c + v * L, acc[v]);
            }
            for (; c + L <= C; c += L) {
                V acc = b ? vload<V>(b + c) : V{};
                for (idx k = 0; k < nt; ++k) acc += vload<V>(x + taps[k][0] + c) * vload<V>(wt + taps[k][1] + c);
                vstore(out + c, acc);
            }
            for (idx cc = c; cc < C; ++cc) {
                T a = b ? b[cc] : T(0);
                for (idx k = 0; k < nt; ++k) a += x[taps[k][0] + cc] * wt[taps[k][1] + cc];
                out[cc] = a;
            }
            if (relu)
                for (idx cc = 0; cc < C; ++cc) out[cc] = (out[cc] > T(0) || out[cc] != out[cc]) ? out[cc] : T(0);
        }
    }
}

// run(n0, t) for each chunk of m images from n0, t: s over those images.
template <class F>
void over_image_chunks(const ConvGeom& s, idx m, const F& run) {
    for (idx n0 = 0; n0 < s.N; n0 += m) {
        ConvGeom t = s;
        t.N = imin(m, s.N - n0);
        run(n0, t);
    }
}

// The NCHW depthwise forward on channels-last copies of its images where
// the output planes are small (at most kViaNhwcPlane outputs): the plane
// kernel's fixed cost per plane (the padded copy, rows of one or two partial
// vectors) then outweighs its sums, while the channels-last rows fill whole
// vectors with channels. In chunks of images whose two copies fit the
// threads' L2, so the copies are written and read in cache and the workspace
// stays bounded.
constexpr idx kViaNhwcPlane = 64;

template <class T>
bool depthwise_small_planes(const ConvGeom& s) {
    return nhwc_is_depthwise(s) && depthwise3x3_fast(s, CK_VEC_BYTES / sizeof(T)) && s.Ho * s.Wo <= kViaNhwcPlane;
}

template <class T>
bool depthwise_nchw_via_nhwc(const T* x, const T* w, const T* b, T* y, const ConvGeom& s) {
    if (!depthwise_small_planes<T>(s)) return false;
    // (the channels-last loops skip padding taps; the plane kernel multiplies
    // the zeros, as torch does: a NaN or inf weight meeting padding is NaN)
    if ((s.ph > 0 || s.pw > 0) && !all_finite(w, s.C * s.R * s.S)) return false;
    note_conv_algo(ConvAlgo::depthwise);
    const idx in = s.C * s.H * s.W, out = s.C * s.Ho * s.Wo;
    const idx budget = cache_sizes().l2 * num_threads() / static_cast<idx>(sizeof(T));
    const idx m = imax(1, imin(s.N, budget / (in + out)));
    const idx in_elems = (m * in + 15) / 16 * 16;
    T* xt = static_cast<T*>(workspace(static_cast<std::size_t>(in_elems + m * out) * sizeof(T), 0));
    T* yt = xt + in_elems;
    over_image_chunks(s, m, [&](idx n0, const ConvGeom& t) {
        transpose_batched(x + n0 * in, xt, t.N, s.C, s.H * s.W);
        depthwise_nhwc_forward(xt, w, b, yt, t, false);
        transpose_batched(yt, y + n0 * out, t.N, s.Ho * s.Wo, s.C);
    });
    return true;
}

// grad weight over the interior [wo0, wo1) of one 3x3 output row (stride sw),
// for the NV channel vectors at c0: the nine taps' sums over the row (9 * NV
// independent chains) stay in registers, then are added to acc (r, q, c)
// once; the pixels are walked with one pointer per input row, as in the
// forward. (Pixel chunks that keep the rows in L1, as the forward takes,
// were slower here: each chunk stores and reloads the 18 sums.)
template <class T, int NV>
void depthwise3x3_weight_block(const T* const rows[3], const T* gyrow, T* acc, idx C, idx c0, idx wo0, idx wo1,
                               idx pw, idx sw) {
    typedef typename Vec<T>::type V;
    constexpr int L = CK_VEC_BYTES / sizeof(T);
    V sum[9][NV];
    for (int k = 0; k < 9; ++k)
        for (int v = 0; v < NV; ++v) sum[k][v] = V{};
    const T* in[3];
    for (int r = 0; r < 3; ++r) in[r] = rows[r] + (wo0 * sw - pw) * C + c0;
    const T* g = gyrow + wo0 * C + c0;
    const idx step = sw * C;
    for (idx wo = wo0; wo < wo1; ++wo) {
        V gv[NV];
        for (int v = 0; v < NV; ++v) gv[v] = vload<V>(g + v * L);
        for (int r = 0; r < 3; ++r)
            for (int q = 0; q < 3; ++q)
                for (int v = 0; v < NV; ++v) sum[r * 3 + q][v] += gv[v] * vload<V>(in[r] + q * C + v * L);
        for (int r = 0; r < 3; ++r) in[r] += step;
        g += C;
    }
    for (int k = 0; k < 9; ++k)
        for (int v = 0; v < NV; ++v) {
            T* a = acc + k * C + c0 + v * L;
            vstore(a, vload<V>(a) + sum[k][v]);
        }
}

// Blocks of two channel vectors with AVX-512 (18 sums, 2 gradients and a load
// fit 32 zmm), one otherwise; one-vector tails.
template <class T>
void depthwise3x3_weight_row(const T* const rows[3], const T* gyrow, T* acc, idx C, idx wo0, idx wo1, idx pw,
                             idx sw) {
    constexpr int L = CK_VEC_BYTES / sizeof(T), NV = CK_VEC_BYTES == 64 ? 2 : 1;
    idx c0 = 0;
    for (; c0 + NV * L <= C; c0 += NV * L) depthwise3x3_weight_block<T, NV>(rows, gyrow, acc, C, c0, wo0, wo1, pw, sw);
    for (; c0 < C; c0 += L) depthwise3x3_weight_block<T, 1>(rows, gyrow, acc, C, c0, wo0, wo1, pw, sw);
}

template <class T>
void depthwise_nhwc_backward(const T* gy, const T* x, const T* w, T* gx, T* gw, const ConvGeom& s) {
    const idx C = s.C, RS = s.R * s.S;
    if (gx) {
        T* wt = static_cast<T*>(workspace(static_cast<std::size_t>(RS * C) * sizeof(T), 2));
        for (idx c = 0; c < C; ++c)
            for (idx rs = 0; rs < RS; ++rs) wt[rs * C + c] = w[c * RS + rs];
        const idx rows = s.N * s.H;
        // a 3x3 stride-1 grad input is the forward conv of grad_output with the
        // flipped filters and padding 2 - p: its rows' interiors go through the
        // register-blocked loops (tap (r, q) weighs w[2 - r][2 - q])
        constexpr idx L = CK_VEC_BYTES / sizeof(T);
        const bool fast3x3 = depthwise3x3_fast(s, L) && s.sh == 1 && s.sw == 1;
        const idx fph = 2 - s.ph, fpw = 2 - s.pw;
        T* wf = fast3x3 ? static_cast<T*>(workspace(static_cast<std::size_t>(9 * C) * sizeof(T), 3)) : nullptr;
        if (fast3x3)
            for (idx c = 0; c < C; ++c)
                for (idx k = 0; k < 9; ++k) wf[k * C + c] = w[c * 9 + 8 - k];
        // gather: input pixel (ih, iw) takes tap (r, q) of output (ho, wo) where
        // ih = ho*sh - ph + r*dh; taps in a fixed order
#pragma omp parallel for num_threads(threads_for(rows)) schedule(static)
        for (idx t = 0; t < rows; ++t) {
            const idx n = t / s.H, ih = t % s.H;
            idx iw0 = s.W, iw1 = s.W;  // [iw0, iw1): done by the register-blocked loops
            if (fast3x3 && ih - fph >= 0 && ih - fph + 2 < s.Ho) {
                iw0 = imin(s.W, fpw);
                iw1 = imax(iw0, imin(s.W, s.Wo - 2 + fpw));
                const T* g_rows[3];
                for (int r = 0; r < 3; ++r) g_rows[r] = gy + (n * s.Ho + ih - fph + r) * s.Wo * C;
                const T* next = ih - fph + 3 < s.Ho ? gy + (n * s.Ho + ih - fph + 3) * s.Wo * C : nullptr;
                depthwise3x3_row(g_rows, wf, static_cast<const T*>(nullptr), gx + (n * s.H + ih) * s.W * C, C, iw0,
                                 iw1, fpw, idx(1), next, t + 1 < rows ? s.W * C : 0);
            }
            for (idx iw = 0; iw < s.W; ++iw) {
                if (iw == iw0 && iw1 > iw0) {
                    iw = iw1 - 1;
                    continue;
                }
                T* out = gx + ((n * s.H + ih) * s.W + iw) * C;
                for (idx c = 0; c < C; ++c) out[c] = T(0);
                for_each_tap_into(s, ih, iw, [&](idx ho, idx wo, idx tap) {
                    const T* g = gy + ((n * s.Ho + ho) * s.Wo + wo) * C;
                    const T* wv = wt + tap * C;
#pragma omp simd
                    for (idx c = 0; c < C; ++c) out[c] += g[c] * wv[c];
                });
            }
        }
    }
    if (gw) {
        // (r, q, c) partial sums per fixed chunk of images, then chunks in order
        const idx wsize = RS * C, chunks = imax(1, imin(s.N, 8));
        const bool fast3x3 = depthwise3x3_fast(s, CK_VEC_BYTES / sizeof(T));
        T* part = static_cast<T*>(workspace(static_cast<std::size_t>(chunks * wsize) * sizeof(T), 1));
#pragma omp parallel for num_threads(threads_for(chunks)) schedule(dynamic, 1)
        for (idx j = 0; j < chunks; ++j) {
            T* acc = part + j * wsize;
            for (idx i = 0; i < wsize; ++i) acc[i] = T(0);
            for (idx n = j * s.N / chunks; n < (j + 1) * s.N / chunks; ++n)
                for (idx ho = 0; ho < s.Ho; ++ho) {
                    idx wo0 = s.Wo, wo1 = s.Wo;  // [wo0, wo1): summed by the register-blocked loop
                    const idx ih0 = ho * s.sh - s.ph;
                    if (fast3x3 && ih0 >= 0 && ih0 + 2 < s.H) {
                        depthwise3x3_interior(s.W, s.Wo, s.sw, s.pw, wo0, wo1);
                        const T* in_rows[3];
                        for (int r = 0; r < 3; ++r) in_rows[r] = x + (n * s.H + ih0 + r) * s.W * C;
                        depthwise3x3_weight_row(in_rows, gy + (n * s.Ho + ho) * s.Wo * C, acc, C, wo0, wo1, s.pw,
                                                s.sw);
                    }
                    for (idx wo = 0; wo < s.Wo; ++wo) {
                        if (wo == wo0 && wo1 > wo0) {
                            wo = wo1 - 1;
                            continue;
                        }
                        const T* g = gy + ((n * s.Ho + ho) * s.Wo + wo) * C;
                        for (idx r = 0; r < s.R; ++r) {
                            const idx ih = ho * s.sh - s.ph + r * s.dh;
                            if (ih < 0 || ih >= s.H) continue;
                            for (idx q = 0; q < s.S; ++q) {
                                const idx iw = wo * s.sw - s.pw + q * s.dw;
                                if (iw < 0 || iw >= s.W) continue;
                                const T* in = x + ((n * s.H + ih) * s.W + iw) * C;
                                T* a = acc + (r * s.S + q) * C;
#pragma omp simd
                                for (idx c = 0; c < C; ++c) a[c] += g[c] * in[c];
                            }
                        }
                    }
                }
        }
        for (idx c = 0; c < C; ++c)
            for (idx rs = 0; rs < RS; ++rs) {
                T v = part[rs * C + c];
                for (idx j = 1; j < chunks; ++j) v += part[j * wsize + rs * C + c];
                gw[c * RS + rs] = v;
            }
    }
}

// The NCHW depthwise grad weight on channels-last copies where the forward
// takes them (small output planes; the plane kernel spent most of a
// MobileNetV2 layer's backward here). Chunks of images sized by L2 alone,
// their sums added in order: the result does not depend on the thread count.
template <class T>
bool depthwise_nchw_grad_weight_via_nhwc(const T* gy, const T* x, T* gw, const ConvGeom& s) {
    if (!depthwise_small_planes<T>(s)) return false;
    const idx in = s.C * s.H * s.W, out = s.C * s.Ho * s.Wo, wsize = s.C * s.R * s.S;
    const idx m = imax(1, imin(s.N, cache_sizes().l2 / static_cast<idx>(sizeof(T)) / (in + out)));
    const idx in_elems = (m * in + 15) / 16 * 16, out_elems = (m * out + 15) / 16 * 16;
    T* xt = static_cast<T*>(workspace(static_cast<std::size_t>(in_elems + out_elems + wsize) * sizeof(T), 0));
    T* gyt = xt + in_elems;
    T* part = gyt + out_elems;
    over_image_chunks(s, m, [&](idx n0, const ConvGeom& t) {
        transpose_batched(x + n0 * in, xt, t.N, s.C, s.H * s.W);
        transpose_batched(gy + n0 * out, gyt, t.N, s.C, s.Ho * s.Wo);
        depthwise_nhwc_backward(gyt, xt, static_cast<const T*>(nullptr), static_cast<T*>(nullptr),
                                n0 == 0 ? gw : part, t);
        if (n0 > 0)
            for (idx i = 0; i < wsize; ++i) gw[i] += part[i];
    });
    return true;
}

// The strided NCHW depthwise grad input likewise (the stride-1 one is a
// depthwise forward conv, which takes the copies itself): image chunks of
// grad_output and grad input copies that fit L2.
template <class T>
bool depthwise_nchw_grad_input_via_nhwc(const T* gy, const T* w, T* gx, const ConvGeom& s) {
    if (!depthwise_small_planes<T>(s)) return false;
    note_conv_algo(ConvAlgo::depthwise);
    const idx in = s.C * s.H * s.W, out = s.C * s.Ho * s.Wo;
    const idx m = imax(1, imin(s.N, cache_sizes().l2 * num_threads() / static_cast<idx>(sizeof(T)) / (in + out)));
    const idx out_elems = (m * out + 15) / 16 * 16;
    T* gyt = static_cast<T*>(workspace(static_cast<std::size_t>(out_elems + m * in) * sizeof(T), 0));
    T* gxt = gyt + out_elems;
    over_image_chunks(s, m, [&](idx n0, const ConvGeom& t) {
        transpose_batched(gy + n0 * out, gyt, t.N, s.C, s.Ho * s.Wo);
        depthwise_nhwc_backward(gyt, static_cast<const T*>(nullptr), w, gxt, static_cast<T*>(nullptr), t);
        transpose_batched(gxt, gx + n0 * in, t.N, s.H * s.W, s.C);
    });
    return true;
}

// ---- the GEMM forms

// Per patch column j = (r, q, c) of a group: its offset from the patch's
// first element in the NHWC input, and its tap's row and column offsets (for
// the bounds test at the borders). Made once per call.
struct PatchTable {
    idx* off;
    idx* dr;
    idx* dq;
};

inline PatchTable patch_table(const ConvGeom& s, void* mem) {
    const idx Cg = s.C / s.G, RSC = s.R * s.S * Cg;
    PatchTable t{static_cast<idx*>(mem), static_cast<idx*>(mem) + RSC, static_cast<idx*>(mem) + 2 * RSC};
    for (idx j = 0; j < RSC; ++j) {
        const idx rs = j / Cg, c = j % Cg;
        t.dr[j] = (rs / s.S) * s.dh;
        t.dq[j] = (rs % s.S) * s.dw;
        t.off[j] = (t.dr[j] * s.W + t.dq[j]) * s.C + c;
    }
    return t;
}

// Group g's (virtual) column matrix, read from the NHWC input in place: an
// MR-row panel whose patches all lie inside the input goes to the indirect
// micro-kernel (row pointers plus the table's offsets, no copy); a panel
// touching the border is packed, with zeros for padding.
template <class T>
struct NhwcPatches {
    const T* x;
    const ConvGeom& s;
    idx g;
    PatchTable t;
    const T* patch(const PixelWalk& q, idx& ih0, idx& iw0) const {
        ih0 = q.ho * s.sh - s.ph;
        iw0 = q.wo * s.sw - s.pw;
        return x + ((q.n * s.H + ih0) * s.W + iw0) * s.C + g * (s.C / s.G);
    }
    bool inside(idx ih0, idx iw0) const {
        return ih0 >= 0 && ih0 + (s.R - 1) * s.dh < s.H && iw0 >= 0 && iw0 + (s.S - 1) * s.dw < s.W;
    }
    bool indirect(idx i0, idx live, const T** rows) const {
        constexpr int MR = GemmBlocking<T>::MR;
        if (live < MR) return false;
        PixelWalk q(i0, s);
        for (int i = 0; i < MR; ++i, q.next()) {
            idx ih0, iw0;
            rows[i] = patch(q, ih0, iw0);
            if (!inside(ih0, iw0)) return false;
        }
        return true;
    }
    const idx* offsets(idx pc) const { return t.off + pc; }
    void panel(idx i0, idx live, idx pc, idx kc, T* Ap) const {
        constexpr int MR = GemmBlocking<T>::MR;
        const idx* off = t.off + pc;
        const idx* dr = t.dr + pc;
        const idx* dq = t.dq + pc;
        PixelWalk q(i0, s);
        for (idx i = 0; i < MR; ++i, q.next()) {
            T* dst = Ap + i;
            if (i >= live) {
                for (idx k = 0; k < kc; ++k) dst[k * MR] = T(0);
                continue;
            }
            idx ih0, iw0;
            const T* base = patch(q, ih0, iw0);
            if (inside(ih0, iw0)) {
                for (idx k = 0; k < kc; ++k) dst[k * MR] = base[off[k]];
                continue;
            }
            for (idx k = 0; k < kc; ++k) {
                const idx ih = ih0 + dr[k], iw = iw0 + dq[k];
                dst[k * MR] = (ih >= 0 && ih < s.H && iw >= 0 && iw < s.W) ? base[off[k]] : T(0);
            }
        }
    }
};

// The NHWC forward's epilogue on columns [j0, j1) of one output row: + bias,
// then relu (NaN kept), each where asked.
template <class T>
inline void bias_relu_row(T* row, const T* b, bool relu, idx j0, idx j1) {
    if (b)
        for (idx k = j0; k < j1; ++k) row[k] += b[k];
    if (relu)
        for (idx k = j0; k < j1; ++k) row[k] = (row[k] > T(0) || row[k] != row[k]) ? row[k] : T(0);
}

// A small map whose weights outnumber the batch's pixels
// (im2col_weights_in_place): the input (no larger than the column matrix)
// goes to NCHW, forward_weight_rows reads the weights in place (a, ld,
// offset_of as there), and the (K x pixels) result is transposed back.
template <class T, class Offset>
void nhwc_forward_weight_rows(const T* x, const T* a, idx ld, const Offset& offset_of, const T* b, T* y,
                              const ConvGeom& s, bool relu, bool rsc = false) {
    T* xc = static_cast<T*>(workspace(static_cast<std::size_t>(s.N * s.C * s.H * s.W) * sizeof(T), 2));
    transpose_batched(x, xc, s.N, s.H * s.W, s.C);
    forward_weight_rows(xc, a, ld, offset_of, s, [&](const T* out) {
        const idx pixels = s.N * s.Ho * s.Wo;
        transpose_batched(out, y, idx(1), s.K, pixels);
        if (!b && !relu) return;
#pragma omp parallel for num_threads(threads_for(pixels / 64 + 1)) schedule(static)
        for (idx m = 0; m < pixels; ++m) bias_relu_row(y + m * s.K, b, relu, idx(0), s.K);
    }, rsc);
}

// wino: which Winograd tile a 3x3 stride-1 conv takes: 2 (F(2x2, 3x3)), 4
// (F(4x4, 3x3)), 0 none (a GEMM), -1 the rule's choice; kNhwcPixelRows a
// GEMM with output pixels as its rows only (below).
// The rule: F(2x2) once a tile's transforms are shared by enough channels
// (16 in and 16 out, or 32 in), and the call has enough tiles to pay for its
// filter transform (C*K filters each call, whatever the batch: a batch of
// one on a 7x7 or 4x4 map, 16 or 4 tiles, ran slower than the GEMM); with
// fewer, the transforms cost more than the multiplications they save. F(4x4)
// is faster still on large maps, but its float32 rounding is larger: it runs
// where named or measured (the autotuner's candidates).
template <class T>
int nhwc_winograd_rule(const ConvGeom& s) {
    constexpr idx kMinTiles = 32;
    const idx tiles = s.N * ((s.Ho + 1) / 2) * ((s.Wo + 1) / 2);
    return conv_winograd_applies(s) && s.C >= 16 && (s.K >= 16 || s.C >= 32) && tiles >= kMinTiles ? 2 : 0;
}

// krsc: the weights are (K, R, S, C/G) memory (channels_last weights, the
// order the GEMM wants: read in place), else (K, C/G, R, S). U: with wino 2
// or 4, w's transformed filters for it (winograd_nhwc_filters), or nullptr.
// The GEMM takes output pixels as its rows (patches read in place), or where
// the weights outnumber the pixels (im2col_weights_in_place) output channels
// (weights read in place, the input and output transposed); which is faster
// depends on the shape and the machine (a 1x1 conv from many channels to few
// loses by the transposes), so wino = kNhwcPixelRows asks for the first
// whatever the shape, for the autotuner to time against the rule.
template <class T>
void conv2d_forward_nhwc(const T* x, const T* w, const T* b, T* y, const ConvGeom& s, bool relu, int wino,
                         bool krsc, const T* U) {
    if (nhwc_is_depthwise(s) && s.R * s.S <= 64) {  // (one channel a group: both orders are one)
        note_conv_algo(ConvAlgo::depthwise);
        return depthwise_nhwc_forward(x, w, b, y, s, relu);
    }
    if (wino < 0) wino = nhwc_winograd_rule<T>(s);
    if ((wino == 2 || wino == 4) && conv_winograd_applies(s) &&
        (wino == 4 ? conv2d_forward_winograd_nhwc<T, 4>(x, w, b, y, s, relu, krsc, U)
                   : conv2d_forward_winograd_nhwc<T, 2>(x, w, b, y, s, relu, krsc, U)))
        return;
    note_conv_algo(ConvAlgo::im2col);
    if (wino != kNhwcPixelRows && im2col_weights_in_place<T>(s)) {
        // A's row k, column j = (c, r, s) of the group's patch, or (r, s, c)
        // for channels_last weights: each row read front to back (in the
        // other order its taps lie C/G apart, a cache line per FMA step, 4-5x
        // slower on a 512-channel 4x4 map). The two orders round differently
        // (and are one where R*S or C/G is 1).
        return nhwc_forward_weight_rows(x, w, s.C / s.G * s.R * s.S, [](idx j) { return j; }, b, y, s, relu, krsc);
    }
    const idx Cg = s.C / s.G, Kg = s.K / s.G, RSC = s.R * s.S * Cg, M = s.N * s.Ho * s.Wo;
    const idx wr_elems = (s.K * RSC + 15) / 16 * 16;
    T* wr = static_cast<T*>(workspace(static_cast<std::size_t>(wr_elems) * sizeof(T) + 3 * RSC * sizeof(idx), 2));
    // (K, R, S, C/G) is (K, C/G, R, S) where R*S or C/G is 1: no copy then
    const bool in_order = krsc || s.R * s.S == 1 || Cg == 1;
    if (!in_order) weights_to_krsc(w, wr, s);
    const T* wk = in_order ? w : wr;
    T* bp = static_cast<T*>(workspace(static_cast<std::size_t>(packed_b_elems<T>(RSC, Kg)) * sizeof(T), 1));
    // With padding, a zero-padded copy of the input (one pass, against R*S
    // reads of every element by the GEMM) leaves no border rows: every full
    // panel goes to the indirect micro-kernel.
    ConvGeom sp = s;
    const T* xs = x;
    idx Hp, Wp;
    padded_extent(s, Hp, Wp);
    if (Hp != s.H || Wp != s.W) {
        T* xp = static_cast<T*>(workspace(static_cast<std::size_t>(s.N * Hp * Wp * s.C) * sizeof(T), 0));
        pad_nhwc_images(x, s, s.N, Hp, Wp, xp);
        sp.H = Hp;
        sp.W = Wp;
        sp.ph = sp.pw = 0;
        xs = xp;
    }
    const PatchTable table = patch_table(sp, wr + wr_elems);
    for (idx g = 0; g < s.G; ++g) {
        // B (RSC x Kg): B[j, k] = wk[(g*Kg + k) * RSC + j]
        pack_b_full(RSC, Kg, wk + g * Kg * RSC, idx(1), RSC, bp);
        T* yg = y + g * Kg;
        const T* bg = b ? b + g * Kg : nullptr;
        const auto epilogue = [&](idx i0, idx i1, idx j0, idx j1) {
            for (idx m = i0; m < i1; ++m) bias_relu_row(yg + m * s.K, bg, relu, j0, j1);
        };
        if (conv_is_pointwise(s))  // a pixel's patch is its own row of the input: no index arithmetic per row
            gemm_rows(M, Kg, RSC, InPlaceRows<T>{xs + g * Cg, s.C, table.off}, bp, yg, s.K, epilogue);
        else
            gemm_rows(M, Kg, RSC, NhwcPatches<T>{xs, sp, g, table}, bp, yg, s.K, epilogue);
    }
}

// gW_g (Kg x RSC) = gy_g^T (Kg x M) col_g (M x RSC): patches are rows of
// NHWC pixels, so neither GEMM operand needs a transposing pack. Images are
// summed in a fixed number of chunks, each serially, then the chunks in order.
// Bands of output pixels run on across images (a chunk's pixels are
// consecutive rows of gy and of the patch matrix), and each is at least
// kMinReduce rows where 8 MB of patches allow: every band's GEMM reads and
// writes the whole weight gradient, which for a deep layer (9.4 MB at
// 512->512 3x3) outweighs a reduction of a few pixels. For the same reason a
// chunk holds at least kMinReduce pixels: a small map's batch is one chunk,
// its GEMM split across the threads.
// nchw: x and gy are NCHW; each image is transposed to NHWC in the chunk's
// scratch as its turn comes (bands then stop at image boundaries), so the
// copies stay one image large. krsc: gw is written (K, R, S, C/G), the
// order the GEMMs produce.
template <class T>
void nhwc_grad_weight(const T* gy, const T* x, T* gw, const ConvGeom& s, bool nchw, bool krsc) {
    const idx Cg = s.C / s.G, Kg = s.K / s.G, RSC = s.R * s.S * Cg, P = s.Ho * s.Wo, M = s.N * P;
    const bool pointwise = s.G == 1 && conv_is_pointwise(s);
    constexpr idx kMinReduce = 256, kMaxBandBytes = idx(8) << 20;
    const idx wsize = s.K * RSC, chunks = imax(1, imin(gw_chunks<T>(s, wsize), M / kMinReduce));
    const idx chunk_rows = nchw ? P : (s.N + chunks - 1) / chunks * P;
    const idx band = imin(chunk_rows, imax(nhwc_band_rows<T>(RSC, P),
                                           imin(kMinReduce, kMaxBandBytes / (RSC * static_cast<idx>(sizeof(T))))));
    const idx col_elems = (band * RSC + 15) / 16 * 16;
    const idx image_elems = nchw ? (s.C * s.H * s.W + 15) / 16 * 16 + (s.K * P + 15) / 16 * 16 : 0;
    const idx scratch = col_elems + image_elems + (gemm_pack_elems<T>() + 15) / 16 * 16;
    const int nt = num_threads();
    const bool outer = nt > 1 && chunks > 1;
    T* buf = static_cast<T*>(workspace(static_cast<std::size_t>((outer ? nt : 1) * scratch) * sizeof(T), 0));
    T* part = static_cast<T*>(workspace(static_cast<std::size_t>((chunks + 1) * wsize) * sizeof(T), 1));
    // pixels [p0, p1) of gy rows / patches starting at xs, gys
    auto bands = [&](const T* xs, const T* gys, const ConvGeom& sv, idx p0, idx p1, T* dst, T* sbuf, bool inner,
                     bool acc) {
        for (idx m0 = p0; m0 < p1; m0 += band) {
            const idx m1 = imin(p1, m0 + band);
            for (idx g = 0; g < s.G; ++g) {
                const T* col = xs + m0 * s.C;
                if (!pointwise) {
                    nhwc_im2col(xs, sbuf, m0, m1, g, sv);
                    col = sbuf;
                }
                gemm_blocked(Kg, RSC, m1 - m0, gys + m0 * s.K + g * Kg, idx(1), s.K, col, pointwise ? s.C : RSC,
                             idx(1), dst + g * Kg * RSC, RSC, acc || m0 > p0, sbuf + col_elems + image_elems, inner);
            }
        }
    };
    auto accumulate = [&](idx n0, idx n1, T* dst, T* sbuf, bool inner) {
        if (n0 == n1)
            for (idx i = 0; i < wsize; ++i) dst[i] = T(0);
        if (!nchw) return bands(x, gy, s, n0 * P, n1 * P, dst, sbuf, inner, false);
        ConvGeom one = s;
        one.N = 1;
        T* xn = sbuf + col_elems;
        T* gn = xn + (s.C * s.H * s.W + 15) / 16 * 16;
        for (idx n = n0; n < n1; ++n) {
            transpose_batched(x + n * s.C * s.H * s.W, xn, idx(1), s.C, s.H * s.W);
            transpose_batched(gy + n * s.K * P, gn, idx(1), s.K, P);
            bands(xn, gn, one, 0, P, dst, sbuf, inner, n > n0);
        }
    };
    if (outer) {
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
        for (idx j = 0; j < chunks; ++j)
            accumulate(j * s.N / chunks, (j + 1) * s.N / chunks, part + j * wsize, buf + omp_get_thread_num() * scratch,
                       false);
    } else {
        for (idx j = 0; j < chunks; ++j)
            accumulate(j * s.N / chunks, (j + 1) * s.N / chunks, part + j * wsize, buf, true);
    }
    T* sum = part;
    if (chunks > 1) {
        sum = part + chunks * wsize;
        sum_chunks(part, chunks, wsize, sum);
    }
    if (krsc)
        std::memcpy(gw, sum, static_cast<std::size_t>(wsize) * sizeof(T));
    else
        weights_from_krsc(sum, gw, s);
}

// grad weight of an NHWC conv by the fastest route that applies. The taps,
// Winograd and implicit-GEMM routes give (K, C/G, R, S); with krsc (gw
// wanted (K, R, S, C/G)) they write a scratch copy, transposed once after.
template <class T>
void nhwc_grad_weight_routes(const T* gy, const T* x, T* gw, const ConvGeom& s, bool krsc) {
    std::unique_ptr<T[]> kcrs;
    const auto dst = [&]() -> T* {
        if (!krsc) return gw;
        if (!kcrs) kcrs.reset(new T[static_cast<std::size_t>(s.K * (s.C / s.G) * s.R * s.S)]);
        return kcrs.get();
    };
    if (grad_weight_pointwise_nhwc_applies<T>(s))  // (a 1x1 filter's two weight orders are one)
        return grad_weight_pointwise_nhwc(gy, x, gw, s);
    if (grad_weight_taps_nhwc_applies<T>(s))
        conv2d_grad_weight_taps_nhwc(gy, x, dst(), s);
    else if (grad_weight_winograd_pays<T>(s) && conv2d_grad_weight_winograd(gy, x, dst(), s, false)) {
    } else if (grad_weight_implicit_applies<T>(s))
        conv2d_grad_weight_implicit(gy, x, dst(), s, false);
    else
        return nhwc_grad_weight(gy, x, gw, s, false, krsc);
    if (krsc) weights_to_krsc(kcrs.get(), gw, s);
}

// gb = the column sums of gy (M x K), in double: a fixed number of row
// chunks (a function of M), each summed in row order by one thread with k
// in vector lanes, then the chunks in order: the same bits for any thread
// count, and no single chain of M adds.
template <class T>
void bias_grad_nhwc(const T* gy, T* gb, idx M, idx K) {
    const idx chunks = imax(1, imin(idx(16), M / 256));
    double* acc = static_cast<double*>(workspace(static_cast<std::size_t>(chunks * K) * sizeof(double), 1));
#pragma omp parallel for num_threads(threads_for(chunks)) schedule(static)
    for (idx c = 0; c < chunks; ++c) {
        double* a = acc + c * K;
        for (idx k = 0; k < K; ++k) a[k] = 0.0;
        for (idx m = c * M / chunks; m < (c + 1) * M / chunks; ++m) {
            const T* row = gy + m * K;
#pragma omp simd
            for (idx k = 0; k < K; ++k) a[k] += static_cast<double>(row[k]);
        }
    }
    for (idx k = 0; k < K; ++k) {
        double sum = acc[k];
        for (idx c = 1; c < chunks; ++c) sum += acc[c * K + k];
        gb[k] = static_cast<T>(sum);
    }
}

// Input row ih of image n (n0 the chunk's first) of grad input from gcol
// (pixels x R*S*C, one group, undilated rows): for each kernel row r that
// reaches ih, each output pixel's S taps cover S*C consecutive floats of the
// row, added as one run. Contributions to an element come in a fixed order
// (r, then output column), so the result does not depend on the threads.
template <class T>
void nhwc_grad_input_row_runs(const T* gcol, T* gx, const ConvGeom& s, idx n0, idx n, idx ih) {
    const idx C = s.C, RSC = s.R * s.S * C;
    T* grow = gx + (n * s.H + ih) * s.W * C;
    for (idx j = 0; j < s.W * C; ++j) grow[j] = T(0);
    for (idx r = 0; r < s.R; ++r) {
        const idx num = ih + s.ph - r * s.dh;
        if (num < 0 || num % s.sh) continue;
        const idx ho = num / s.sh;
        if (ho >= s.Ho) continue;
        const T* src_row = gcol + ((n - n0) * s.Ho + ho) * s.Wo * RSC + r * s.S * C;
        for (idx wo = 0; wo < s.Wo; ++wo) {
            const idx iw0 = wo * s.sw - s.pw, q0 = imax(idx(0), -iw0), q1 = imin(s.S, s.W - iw0);
            if (q0 >= q1) continue;
            const T* src = src_row + wo * RSC + q0 * C;
            T* dst = grow + (iw0 + q0) * C;
#pragma omp simd
            for (idx j = 0; j < (q1 - q0) * C; ++j) dst[j] += src[j];
        }
    }
}

// krsc: w is (K, R, S, C/G) memory and gw is written so (channels_last
// weights), else both are (K, C/G, R, S).
template <class T>
void conv2d_backward_nhwc(const T* gy, const T* x, const T* w, T* gx, T* gw, T* gb, const ConvGeom& s, bool krsc) {
    if (gb) bias_grad_nhwc(gy, gb, s.N * s.Ho * s.Wo, s.K);
    // (one channel a group: both weight orders are one)
    if (nhwc_is_depthwise(s)) return depthwise_nhwc_backward(gy, x, w, gx, gw, s);
    const idx Cg = s.C / s.G, Kg = s.K / s.G, RSC = s.R * s.S * Cg, P = s.Ho * s.Wo, M = s.N * P;
    const bool pointwise = s.G == 1 && conv_is_pointwise(s);
    if (gw) nhwc_grad_weight_routes(gy, x, gw, s, krsc);
    if (gx && s.G == 1 && !pointwise && s.sh == 1 && s.sw == 1 && s.dh == 1 && s.dw == 1 && s.ph < s.R &&
        s.pw < s.S) {
        // At stride 1 grad input is the forward conv of grad_output with the
        // filters flipped and transposed (C x K x R x S) and top/left padding
        // R-1-ph, S-1-pw, whose output is the input's size: the forward's
        // indirect GEMM, where the general path below writes a column matrix
        // of every pixel's R*S*C gradients and gathers it back.
        ConvGeom t = s;
        t.C = s.K, t.H = s.Ho, t.W = s.Wo, t.K = s.C;
        t.ph = s.R - 1 - s.ph, t.pw = s.S - 1 - s.pw;
        t.Ho = s.H, t.Wo = s.W;
        if (im2col_weights_in_place<T>(t)) {
            // the flipped filters read where they lie: t's row c, column
            // (k, r, s) is w[k, c, R-1-r, S-1-s] (w[k, R-1-r, S-1-s, c] with krsc)
            const idx RS = s.R * s.S, CRS = s.C * RS;
            if (krsc)
                return nhwc_forward_weight_rows(
                    gy, w, idx(1), [RS, CRS, &s](idx j) { return j / RS * CRS + (RS - 1 - j % RS) * s.C; },
                    static_cast<const T*>(nullptr), gx, t, false);
            return nhwc_forward_weight_rows(gy, w, RS, [RS, CRS](idx j) { return j / RS * CRS + (RS - 1 - j % RS); },
                                            static_cast<const T*>(nullptr), gx, t, false);
        }
        // (not a workspace slot: the forward uses all of them; not zeroed:
        // every element is written)
        std::unique_ptr<T[]> wf(new T[static_cast<std::size_t>(s.K * s.C * s.R * s.S)]);
        flip_transpose_filters(w, s, wf.get(), krsc);
        conv2d_forward_nhwc(gy, wf.get(), static_cast<const T*>(nullptr), gx, t, false, -1, false,
                            static_cast<const T*>(nullptr));
        return;
    }
    if (gx) {
        const T* wr = w;
        if (!krsc && s.R * s.S > 1 && Cg > 1) {  // (else both orders are one)
            T* fresh = static_cast<T*>(workspace(static_cast<std::size_t>(s.K * RSC) * sizeof(T), 2));
            weights_to_krsc(w, fresh, s);
            wr = fresh;
        }
        if (pointwise) {  // gx (M x C) = gy (M x K) W (K x C)
            T* bp = static_cast<T*>(workspace(static_cast<std::size_t>(packed_b_elems<T>(s.K, s.C)) * sizeof(T) +
                                              static_cast<std::size_t>(s.K) * sizeof(idx), 1));
            pack_b_full(s.K, s.C, wr, s.C, idx(1), bp);
            // gy's rows read in place: with few input channels (an expansion
            // layer's) each packed row of A would serve one or two B panels,
            // so packing would cost about as much as the FMAs
            idx* iota = reinterpret_cast<idx*>(bp + packed_b_elems<T>(s.K, s.C));
            for (idx k = 0; k < s.K; ++k) iota[k] = k;
            gemm_rows(M, s.C, s.K, InPlaceRows<T>{gy, s.K, iota}, bp, gx, s.C, [](idx, idx, idx, idx) {});
            return;
        }
        // gcol (pixels x RSC) = gy (pixels x Kg) W_g (Kg x RSC) for a chunk of
        // images, then each input pixel gathers its taps in a fixed order
        const idx per_image = P * RSC;
        const idx imgs = imax(1, imin(s.N, (idx(32) << 20) / imax(per_image * static_cast<idx>(sizeof(T)), 1)));
        T* gcol = static_cast<T*>(workspace(static_cast<std::size_t>(imgs * per_image) * sizeof(T), 0));
        T* bp = static_cast<T*>(workspace(static_cast<std::size_t>(packed_b_elems<T>(Kg, RSC)) * sizeof(T), 1));
        const auto no_epilogue = [](idx, idx, idx, idx) {};
        // With one group and undilated rows, each output pixel adds its kernel
        // rows' runs (S*C consecutive floats of gcol and of an input row) in
        // place of each input pixel gathering its taps C floats at a time:
        // long runs vectorize where a first layer's few channels do not, and
        // gcol is read front to back.
        const bool row_runs = s.G == 1 && s.dw == 1;
        for (idx g = 0; g < s.G; ++g) {
            pack_b_full(Kg, RSC, wr + g * Kg * RSC, RSC, idx(1), bp);  // B (Kg x RSC) = W_g
            for (idx n0 = 0; n0 < s.N; n0 += imgs) {
                const idx n1 = imin(s.N, n0 + imgs), rows = (n1 - n0) * P;
                gemm_rows(rows, RSC, Kg, StridedRows<T>{gy + n0 * P * s.K + g * Kg, s.K, idx(1)}, bp, gcol, RSC,
                          no_epilogue);
                const idx prow = (n1 - n0) * s.H;
#pragma omp parallel for num_threads(threads_for(prow)) schedule(static)
                for (idx t = 0; t < prow; ++t) {
                    const idx n = n0 + t / s.H, ih = t % s.H;
                    if (row_runs) {
                        nhwc_grad_input_row_runs(gcol, gx, s, n0, n, ih);
                        continue;
                    }
                    for (idx iw = 0; iw < s.W; ++iw) {
                        T* out = gx + ((n * s.H + ih) * s.W + iw) * s.C + g * Cg;
                        for (idx c = 0; c < Cg; ++c) out[c] = T(0);
                        for_each_tap_into(s, ih, iw, [&](idx ho, idx wo, idx tap) {
                            const T* src = gcol + (((n - n0) * s.Ho + ho) * s.Wo + wo) * RSC + tap * Cg;
#pragma omp simd
                            for (idx c = 0; c < Cg; ++c) out[c] += src[c];
                        });
                    }
                }
            }
        }
    }
}
