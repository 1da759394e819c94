// conv2d by the direct algorithm: loops over the output, no column buffer.
// Every output plane (forward), input plane (grad input) and filter slice
// (grad weight) is owned by exactly one thread, so there are no atomics and
// the result does not depend on the thread count. The backward loops run
// along an output row; with stride 1 that is a contiguous axpy or dot the
// compiler vectorizes.

// Forward micro-kernel: KB output channels x NV vectors of one output row
// live in registers while the reduction runs over (c, r, s); each input vector
// loaded feeds KB FMAs. Weights are pre-packed as [k-block][c][r][s][KB] so
// the KB weights of one tap are adjacent. Tiles whose taps all fall inside
// the input (stride-1 rows) take this path; edges and strided rows take the
// scalar path below.
template <class T, int KB>
struct DirectTile {
    static constexpr int L = CK_VEC_BYTES / sizeof(T);
    static constexpr int NV = KB >= 4 ? 1 : 2;  // enough independent FMA chains
    static constexpr idx TW = NV * L;           // output columns per tile
};

template <class T, int KB>
void direct_tile_vector(const T* xg, const T* wpk, const T* bias, T* y, idx P, idx ho, idx wo0, idx Cg,
                        const ConvGeom& s) {
    typedef typename Vec<T>::type V;
    constexpr int L = DirectTile<T, KB>::L, NV = DirectTile<T, KB>::NV;
    V acc[KB][NV];
    for (int j = 0; j < KB; ++j) {
        const T b = bias ? bias[j] : T(0);
        for (int v = 0; v < NV; ++v) acc[j][v] = V{} + b;
    }
    const idx HW = s.H * s.W;
    for (idx c = 0; c < Cg; ++c) {
        const T* xp = xg + c * HW;
        for (idx r = 0; r < s.R; ++r) {
            const idx h = ho * s.sh - s.ph + r * s.dh;
            if (h < 0 || h >= s.H) continue;
            const T* xrow = xp + h * s.W + wo0 - s.pw;
            const T* wr = wpk + (c * s.R + r) * s.S * KB;
            for (idx q = 0; q < s.S; ++q) {
                const T* xq = xrow + q * s.dw;
                V xv[NV];
                for (int v = 0; v < NV; ++v) xv[v] = vload<V>(xq + v * L);
#pragma GCC unroll 8
                for (int j = 0; j < KB; ++j) {
                    const T wv = wr[q * KB + j];
                    for (int v = 0; v < NV; ++v) acc[j][v] += wv * xv[v];
                }
            }
        }
    }
    for (int j = 0; j < KB; ++j) {
        T* out = y + j * P + ho * s.Wo + wo0;
        for (int v = 0; v < NV; ++v) vstore(out + v * L, acc[j][v]);
    }
}

// Outputs [wo_begin, wo_end) of row ho for KB channels, any stride, with bounds checks.
template <class T, int KB>
void direct_tile_scalar(const T* xg, const T* wpk, const T* bias, T* y, idx P, idx ho, idx wo_begin, idx wo_end,
                        idx Cg, const ConvGeom& s) {
    const idx HW = s.H * s.W;
    for (idx wo = wo_begin; wo < wo_end; ++wo) {
        T acc[KB];
        for (int j = 0; j < KB; ++j) acc[j] = bias ? bias[j] : T(0);
        for (idx c = 0; c < Cg; ++c)
            for (idx r = 0; r < s.R; ++r) {
                const idx h = ho * s.sh - s.ph + r * s.dh;
                if (h < 0 || h >= s.H) continue;
                const T* xrow = xg + c * HW + h * s.W;
                const T* wr = wpk + (c * s.R + r) * s.S * KB;
                for (idx q = 0; q < s.S; ++q) {
                    const idx w = wo * s.sw - s.pw + q * s.dw;
                    if (w < 0 || w >= s.W) continue;
                    const T xv = xrow[w];
                    for (int j = 0; j < KB; ++j) acc[j] += wr[q * KB + j] * xv;
                }
            }
        for (int j = 0; j < KB; ++j) y[j * P + ho * s.Wo + wo] = acc[j];
    }
}

// KB output planes y[j] (j < KB, plane stride P) from one image-group xg (Cg, H, W).
template <class T, int KB>
void direct_block(const T* xg, const T* wpk, const T* bias, T* y, idx Cg, const ConvGeom& s) {
    constexpr idx TW = DirectTile<T, KB>::TW;
    const idx P = s.Ho * s.Wo;
    // interior output columns: every tap of every s reads inside the row
    idx lo_first, hi_first, lo_last, hi_last;
    valid_range(s.W, s.Wo, s.sw, -s.pw, lo_first, hi_first);
    valid_range(s.W, s.Wo, s.sw, (s.S - 1) * s.dw - s.pw, lo_last, hi_last);
    const idx lo = imax(lo_first, lo_last), hi = imin(hi_first, hi_last);
    for (idx ho = 0; ho < s.Ho; ++ho) {
        idx wo = 0;
        if (s.sw == 1 && hi - lo >= TW) {
            direct_tile_scalar<T, KB>(xg, wpk, bias, y, P, ho, 0, lo, Cg, s);
            for (wo = lo; wo + TW <= hi; wo += TW) direct_tile_vector<T, KB>(xg, wpk, bias, y, P, ho, wo, Cg, s);
            // a last, overlapping tile ending at hi: recomputed columns get the same values
            if (wo < hi) direct_tile_vector<T, KB>(xg, wpk, bias, y, P, ho, hi - TW, Cg, s);
            wo = hi;
        }
        direct_tile_scalar<T, KB>(xg, wpk, bias, y, P, ho, wo, s.Wo, Cg, s);
    }
}

// wpk[kb][c][r][s][j] = w[kb*KB + j][c][r][s]: KB weights of one tap adjacent.
template <class T, int KB>
void pack_direct_weights(const T* w, T* wpk, idx kblocks, idx CRS) {
    for (idx kb = 0; kb < kblocks; ++kb)
        for (idx i = 0; i < CRS; ++i)
            for (int j = 0; j < KB; ++j) wpk[(kb * CRS + i) * KB + j] = w[(kb * KB + j) * CRS + i];
}

template <class T, int KB>
void conv2d_forward_direct_kb(const T* x, const T* w, const T* b, T* y, const ConvGeom& s) {
    const idx Cg = s.C / s.G, Kg = s.K / s.G, P = s.Ho * s.Wo, CRS = Cg * s.R * s.S;
    const idx kblocks = s.K / KB;  // KB divides K/G, so blocks never straddle groups
    T* wpk = static_cast<T*>(workspace(static_cast<std::size_t>(s.K * CRS) * sizeof(T), 0));
    pack_direct_weights<T, KB>(w, wpk, kblocks, CRS);
    const idx tasks = s.N * kblocks;
#pragma omp parallel for num_threads(threads_for(tasks)) schedule(dynamic, 1)
    for (idx t = 0; t < tasks; ++t) {
        const idx n = t / kblocks, kb = t % kblocks, k0 = kb * KB, g = k0 / Kg;
        direct_block<T, KB>(x + (n * s.C + g * Cg) * s.H * s.W, wpk + kb * CRS * KB, b ? b + k0 : nullptr,
                            y + (n * s.K + k0) * P, Cg, s);
    }
}

// Depthwise (one input channel per group): each input plane is copied once
// into a zero-padded buffer that fits L1, so every tap of every output vector
// is an unchecked load at a fixed offset. With a column stride sw the copy is
// split into sw phase planes (phase p holds the padded columns p, p + sw,
// ...), so a tap's inputs for consecutive outputs are again consecutive.
// Output rows go in blocks of up to DW_NV vectors, each an independent FMA
// chain over the taps. Memory-bound: one read of x, one write of y.
constexpr int DW_NV = 4;

// The planes a depthwise task will touch next, asked for a row at a time while
// the current plane is summed: its output with intent to write (a store that
// misses waits for its line's read; a plane of such misses fills the store
// buffer) and its input, which the padded copy otherwise reads on demand.
template <class T>
struct PlaneAhead {
    static constexpr idx kLine = 64 / sizeof(T);
    T* y = nullptr;
    const T* x = nullptr;
    idx x_step = 0, x_end = 0;  // input elements asked for per output row, and in all
    void set(T* y_next, const T* x_next, const ConvGeom& s) {
        y = y_next;
        x = x_next;
        x_end = s.H * s.W;
        x_step = (x_end + s.Ho * kLine - 1) / (s.Ho * kLine) * kLine;
    }
    // the lines of output row ho of the next plane and an Ho-th of its input
    __attribute__((always_inline)) void row(idx ho, const ConvGeom& s) const {
        if (y)
            for (idx i = ho * s.Wo; i < (ho + 1) * s.Wo; i += kLine) __builtin_prefetch(y + i, 1, 3);
        if (x)
            for (idx i = ho * x_step, e = imin(x_end, i + x_step); i < e; i += kLine) __builtin_prefetch(x + i, 0, 3);
    }
};

template <class T>
struct DepthwiseLayout {
    // padded rows, row stride of a phase plane (whole vectors + the taps'
    // reach), elements per phase plane, in all
    idx Hp, Ws, pstride, elems;
    DepthwiseLayout(const ConvGeom& s) {
        constexpr idx L = CK_VEC_BYTES / sizeof(T);
        Hp = (s.Ho - 1) * s.sh + (s.R - 1) * s.dh + 1;
        Ws = (s.Wo + L - 1) / L * L + (s.S - 1) * s.dw / s.sw;
        pstride = (Hp * Ws + 15) / 16 * 16;
        elems = s.sw * pstride;
    }
    // the padded plane of x (H x W, padding ph, pw) into buf, phase by phase
    void fill(const T* x, const ConvGeom& s, T* buf) const {
        if (s.sw == 1)  // unit steps as constants: the copy's strided paths fold away
            return (void)copy_padded_plane<false>(x, s.H, s.W, -s.ph, -s.pw, 1, 1, buf, Hp, Ws, pstride);
        for (idx p = 0; p < s.sw; ++p)
            copy_padded_plane<false>(x, s.H, s.W, -s.ph, p - s.pw, 1, s.sw, buf + p * pstride, Hp, Ws, pstride);
    }
};

// The depthwise forward and grad weight kernels run any stride; grad input
// is a depthwise conv at stride 1, a zero-inserted one (or the direct
// gather) when strided.
inline bool conv_is_depthwise(const ConvGeom& s) { return s.C == s.G; }

// NV output vectors of one row from wo on; NV is a compile-time count so the
// accumulators stay in registers (indexed by a run-time count they lived on
// the stack, and every tap's FMA waited on a store-to-load round trip).
// K3 = sw (an undilated 3x3 kernel of column stride 1 or 2) unrolls the
// taps at compile time; 0 is any kernel. The row's last, partial vector is a
// masked store (a memcpy per row through a tile cost an eighth of a 56-wide
// layer's time in the C library's memmove).
template <class T, int NV, int K3 = 0>
__attribute__((always_inline)) inline void depthwise_run(const T* xrow, idx Ws, idx pstride, const T* w, T bias,
                                                         T* yrow, idx wo, const ConvGeom& s) {
    typedef typename Vec<T>::type V;
    constexpr idx L = CK_VEC_BYTES / sizeof(T);
    V acc[NV];
    for (int v = 0; v < NV; ++v) acc[v] = V{} + bias;
    if constexpr (K3 > 0) {
#pragma GCC unroll 3
        for (int r = 0; r < 3; ++r)
#pragma GCC unroll 3
            for (int q = 0; q < 3; ++q) {
                const T wv = w[r * 3 + q];
                const T* xq = xrow + (q % K3) * pstride + r * Ws + q / K3 + wo;
#pragma GCC unroll 4
                for (int v = 0; v < NV; ++v) acc[v] += wv * vload<V>(xq + v * L);
            }
    } else {
        for (idx r = 0; r < s.R; ++r)
            for (idx q = 0; q < s.S; ++q) {
                const T wv = w[r * s.S + q];
                const idx tap = q * s.dw;
                const T* xq = xrow + (tap % s.sw) * pstride + r * s.dh * Ws + tap / s.sw + wo;
#pragma GCC unroll 4
                for (int v = 0; v < NV; ++v) acc[v] += wv * vload<V>(xq + v * L);
            }
    }
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
        const idx at = wo + v * L;
        if (at + L <= s.Wo)
            vstore(yrow + at, acc[v]);
        else
            vstore_first(yrow + at, acc[v], s.Wo - at);
    }
}

// (always inlined, with depthwise_run: once the strided grad input below
// called it too, GCC kept it out of line and the forward ran 5% more
// instructions)
template <class T, int K3, bool Ahead>
__attribute__((always_inline)) inline void depthwise_plane_k(const T* xpad, const DepthwiseLayout<T>& lay, const T* w,
                                                             T bias, T* y, const ConvGeom& s, const PlaneAhead<T>& ahead) {
    constexpr idx L = CK_VEC_BYTES / sizeof(T);
    static_assert(DW_NV == 4, "the tail dispatch below covers 1-3 vectors");
    const idx Ws = lay.Ws, ps = lay.pstride;
    for (idx ho = 0; ho < s.Ho; ++ho) {
        const T* xrow = xpad + ho * s.sh * Ws;
        T* yrow = y + ho * s.Wo;
        if constexpr (Ahead) ahead.row(ho, s);
        for (idx wo = 0; wo < s.Wo; wo += DW_NV * L) {
            switch (imin(DW_NV, (s.Wo - wo + L - 1) / L)) {
                case 4: depthwise_run<T, 4, K3>(xrow, Ws, ps, w, bias, yrow, wo, s); break;
                case 3: depthwise_run<T, 3, K3>(xrow, Ws, ps, w, bias, yrow, wo, s); break;
                case 2: depthwise_run<T, 2, K3>(xrow, Ws, ps, w, bias, yrow, wo, s); break;
                default: depthwise_run<T, 1, K3>(xrow, Ws, ps, w, bias, yrow, wo, s); break;
            }
        }
    }
}

template <class T, bool Ahead>
__attribute__((always_inline)) inline void depthwise_plane_of(const T* xpad, const DepthwiseLayout<T>& lay,
                                                              const T* w, T bias, T* y, const ConvGeom& s,
                                                              const PlaneAhead<T>& ahead) {
    if (s.R == 3 && s.S == 3 && s.dh == 1 && s.dw == 1 && s.sw <= 2)
        return s.sw == 1 ? depthwise_plane_k<T, 1, Ahead>(xpad, lay, w, bias, y, s, ahead)
                         : depthwise_plane_k<T, 2, Ahead>(xpad, lay, w, bias, y, s, ahead);
    depthwise_plane_k<T, 0, Ahead>(xpad, lay, w, bias, y, s, ahead);
}

template <class T>
void depthwise_plane(const T* xpad, const DepthwiseLayout<T>& lay, const T* w, T bias, T* y, const ConvGeom& s,
                     const PlaneAhead<T>& ahead = PlaneAhead<T>()) {
    // (a separate copy asks ahead: the plain loops stay as tight as before)
    if (ahead.y) return depthwise_plane_of<T, true>(xpad, lay, w, bias, y, s, ahead);
    depthwise_plane_of<T, false>(xpad, lay, w, bias, y, s, ahead);
}

// (conv2d_nhwc.hpp) Run s where its output planes are small on the
// channels-last kernels instead, and say whether they did.
template <class T>
bool depthwise_nchw_via_nhwc(const T* x, const T* w, const T* b, T* y, const ConvGeom& s);
template <class T>
bool depthwise_nchw_grad_weight_via_nhwc(const T* gy, const T* x, T* gw, const ConvGeom& s);
template <class T>
bool depthwise_nchw_grad_input_via_nhwc(const T* gy, const T* w, T* gx, const ConvGeom& s);

template <class T>
void conv2d_forward_depthwise(const T* x, const T* w, const T* b, T* y, const ConvGeom& s) {
    if (depthwise_nchw_via_nhwc(x, w, b, y, s)) return;
    note_conv_algo(ConvAlgo::depthwise);
    const idx Kg = s.K / s.G, P = s.Ho * s.Wo, RS = s.R * s.S;
    const DepthwiseLayout<T> lay(s);
    const idx tasks = s.N * s.G;
    const int nt = threads_for(tasks);
    T* buf = static_cast<T*>(workspace(static_cast<std::size_t>(nt * lay.elems) * sizeof(T), 0));
    // (a conv whose input and output fit L2 finds them there: asking costs more)
    const bool ahead_pays = (s.N * s.C * s.H * s.W + s.N * s.K * P) * static_cast<idx>(sizeof(T)) > cache_sizes().l2;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (idx t = 0; t < tasks; ++t) {
        const idx n = t / s.G, g = t % s.G;
        T* xpad = buf + omp_get_thread_num() * lay.elems;
        lay.fill(x + (n * s.C + g) * s.H * s.W, s, xpad);
        for (idx k = g * Kg; k < (g + 1) * Kg; ++k) {
            // while this plane is summed: the next output plane (the next k, or
            // the next task's first) and, with the last k, the next task's input
            PlaneAhead<T> ahead;
            if (ahead_pays && t + 1 < tasks)
                ahead.set(y + (n * s.K + k + 1) * P, k + 1 == (g + 1) * Kg ? x + (n * s.C + g + 1) * s.H * s.W : nullptr,
                          s);
            depthwise_plane(xpad, lay, w + k * RS, b ? b[k] : T(0), y + (n * s.K + k) * P, s, ahead);
        }
    }
}

// Whether conv2d_forward_direct hands s to the depthwise kernel: a padded
// plane per thread, so only while that plane stays small.
template <class T>
bool depthwise_plane_fits(const ConvGeom& s) {
    constexpr idx kMaxPlaneBytes = idx(4) << 20;
    return conv_is_depthwise(s) && DepthwiseLayout<T>(s).elems * static_cast<idx>(sizeof(T)) <= kMaxPlaneBytes;
}

// y (N, K, Ho, Wo) = conv(x (N, C, H, W), w (K, C/G, R, S)) + b; depthwise
// problems go to the depthwise kernel unless `generic` (algo "direct" named)
template <class T>
void conv2d_forward_direct(const T* x, const T* w, const T* b, T* y, const ConvGeom& s, bool generic = false) {
    const idx Kg = s.K / s.G;
    if (!generic && depthwise_plane_fits<T>(s)) return conv2d_forward_depthwise(x, w, b, y, s);
    note_conv_algo(ConvAlgo::direct);
    if (Kg % 8 == 0)
        conv2d_forward_direct_kb<T, 8>(x, w, b, y, s);
    else if (Kg % 4 == 0)
        conv2d_forward_direct_kb<T, 4>(x, w, b, y, s);
    else if (Kg % 2 == 0)
        conv2d_forward_direct_kb<T, 2>(x, w, b, y, s);
    else
        conv2d_forward_direct_kb<T, 1>(x, w, b, y, s);
}

// gx (N, C, H, W): each input plane gathers from the output planes of its group.
template <class T>
void conv2d_grad_input_direct_planes(const T* gy, const T* w, T* gx, const ConvGeom& s) {
    const idx Cg = s.C / s.G, Kg = s.K / s.G, P = s.Ho * s.Wo, HW = s.H * s.W;
    const idx planes = s.N * s.C;
#pragma omp parallel for num_threads(threads_for(planes)) schedule(dynamic, 1)
    for (idx t = 0; t < planes; ++t) {
        const idx n = t / s.C, c = t % s.C, g = c / Cg, cc = c % Cg;
        T* gxp = gx + t * HW;
        for (idx i = 0; i < HW; ++i) gxp[i] = T(0);
        for (idx k = g * Kg; k < (g + 1) * Kg; ++k) {
            const T* gyp = gy + (n * s.K + k) * P;
            const T* wc = w + (k * Cg + cc) * s.R * s.S;
            for (idx ho = 0; ho < s.Ho; ++ho) {
                const T* gyrow = gyp + ho * s.Wo;
                for (idx r = 0; r < s.R; ++r) {
                    const idx h = ho * s.sh - s.ph + r * s.dh;
                    if (h < 0 || h >= s.H) continue;
                    T* gxrow = gxp + h * s.W;
                    for (idx q = 0; q < s.S; ++q) {
                        const T wv = wc[r * s.S + q];
                        const idx off = q * s.dw - s.pw;
                        idx lo, hi;
                        valid_range(s.W, s.Wo, s.sw, off, lo, hi);
                        if (s.sw == 1) {
                            T* gs = gxrow + off;
                            for (idx wo = lo; wo < hi; ++wo) gs[wo] += wv * gyrow[wo];
                        } else {
                            for (idx wo = lo; wo < hi; ++wo) gxrow[wo * s.sw + off] += wv * gyrow[wo];
                        }
                    }
                }
            }
        }
    }
}

// A strided depthwise conv's input gradient (one filter per channel) as
// the stride-1 depthwise conv of its grad_output with zeros inserted
// between the values ((Ho-1)*sh+1 x (Wo-1)*sw+1) by the flipped filter:
// each channel's zero-inserted plane is written into the depthwise kernel's
// padded buffer (in L1/L2), which the vector kernel then reads at unit
// steps. Of its FMAs 1/(sh*sw) meet a value, against the gather's scalar
// stride-sw stores into every tap's input row.
// The zero-inserted conv, t: padding (R-1)*dh - ph (at least 0).
inline bool depthwise_upsampled_shape(const ConvGeom& s, ConvGeom& t) {
    t = s;
    t.H = (s.Ho - 1) * s.sh + 1, t.W = (s.Wo - 1) * s.sw + 1;
    t.Ho = s.H, t.Wo = s.W;
    t.sh = t.sw = 1;
    t.ph = (s.R - 1) * s.dh - s.ph, t.pw = (s.S - 1) * s.dw - s.pw;
    return conv_is_depthwise(s) && s.K == s.C && (s.sh > 1 || s.sw > 1) && t.ph >= 0 && t.pw >= 0 &&
           s.R * s.S <= 64;
}

template <class T>
bool depthwise_grad_input_upsampled_applies(const ConvGeom& s) {
    ConvGeom t;
    return depthwise_upsampled_shape(s, t) && depthwise_plane_fits<T>(t);
}

template <class T>
void depthwise_grad_input_upsampled(const T* gy, const T* w, T* gx, const ConvGeom& s) {
    note_conv_algo(ConvAlgo::depthwise);
    ConvGeom t;
    depthwise_upsampled_shape(s, t);
    const DepthwiseLayout<T> lay(t);
    const idx RS = s.R * s.S, P = s.Ho * s.Wo, planes = s.N * s.C;
    const int nt = threads_for(planes);
    T* buf = static_cast<T*>(workspace(static_cast<std::size_t>(nt * lay.elems) * sizeof(T), 0));
#pragma omp parallel for num_threads(nt) schedule(static)
    for (idx p = 0; p < planes; ++p) {
        const idx c = p % s.C;
        T* up = buf + omp_get_thread_num() * lay.elems;
        std::memset(up, 0, static_cast<std::size_t>(lay.elems) * sizeof(T));
        const T* g = gy + p * P;
        for (idx i = 0; i < s.Ho; ++i) {
            T* row = up + (t.ph + i * s.sh) * lay.Ws + t.pw;
            for (idx j = 0; j < s.Wo; ++j) row[j * s.sw] = g[i * s.Wo + j];
        }
        T wf[64];
        for (idx i = 0; i < RS; ++i) wf[i] = w[c * RS + RS - 1 - i];
        depthwise_plane(up, lay, wf, T(0), gx + p * s.H * s.W, t);
    }
}

// Stride 1: the input gradient as a forward conv (grad_input_conv_shape) on
// the register-tiled forward kernel. Strided depthwise: the zero-inserted
// stride-1 conv above. Otherwise each input plane gathers.
template <class T>
void conv2d_grad_input_direct(const T* gy, const T* w, T* gx, const ConvGeom& s, bool generic = false) {
    ConvGeom t;
    if (!grad_input_conv_shape(s, t)) {
        if (!generic && depthwise_nchw_grad_input_via_nhwc(gy, w, gx, s)) return;
        // (finite weights only: the inserted zeros times an inf weight would be NaN where the
        // gather, like torch, adds no product)
        if (!generic && depthwise_grad_input_upsampled_applies<T>(s) && all_finite(w, s.K * s.R * s.S))
            return depthwise_grad_input_upsampled(gy, w, gx, s);
        note_conv_algo(ConvAlgo::direct);
        conv2d_grad_input_direct_planes(gy, w, gx, s);
        return;
    }
    T* wt = static_cast<T*>(workspace(static_cast<std::size_t>(s.K * (s.C / s.G) * s.R * s.S) * sizeof(T), 1));
    flip_transpose_filters(w, s, wt);
    conv2d_forward_direct(gy, wt, static_cast<const T*>(nullptr), gx, t, generic);
}

// gw (K, C/G, R, S): a task owns KB filters x one input channel; for each tap
// (r, s) it reduces over the batch and the output with KB vector accumulators
// that share every input vector loaded, then sums each across lanes once.
template <class T, int KB>
void conv2d_grad_weight_direct_kb(const T* gy, const T* x, T* gw, const ConvGeom& s) {
    typedef typename Vec<T>::type V;
    constexpr int L = CK_VEC_BYTES / sizeof(T);
    const idx Cg = s.C / s.G, Kg = s.K / s.G, P = s.Ho * s.Wo, HW = s.H * s.W, RS = s.R * s.S;
    // with fewer than 4 channels a block, U independent chains per channel:
    // one chain (depthwise) waited on each FMA's latency
    constexpr int U = KB >= 4 ? 1 : 4 / KB;
    const idx kblocks = s.K / KB, tasks = kblocks * Cg;
#pragma omp parallel for num_threads(threads_for(tasks)) schedule(dynamic, 1)
    for (idx t = 0; t < tasks; ++t) {
        const idx kb = t / Cg, cc = t % Cg, k0 = kb * KB, c = (k0 / Kg) * Cg + cc;
        for (idx r = 0; r < s.R; ++r)
            for (idx q = 0; q < s.S; ++q) {
                const idx off = q * s.dw - s.pw;
                idx lo, hi;
                valid_range(s.W, s.Wo, s.sw, off, lo, hi);
                V acc[U][KB];
                T tail[KB];
                for (int j = 0; j < KB; ++j) {
                    for (int u = 0; u < U; ++u) acc[u][j] = V{};
                    tail[j] = T(0);
                }
                for (idx n = 0; n < s.N; ++n) {
                    const T* gyp = gy + (n * s.K + k0) * P;
                    const T* xp = x + (n * s.C + c) * HW;
                    for (idx ho = 0; ho < s.Ho; ++ho) {
                        const idx h = ho * s.sh - s.ph + r * s.dh;
                        if (h < 0 || h >= s.H) continue;
                        const T* xrow = xp + h * s.W;
                        const T* gyrow = gyp + ho * s.Wo;
                        idx wo = lo;
                        if (s.sw == 1) {
                            for (; wo + U * L <= hi; wo += U * L) {
#pragma GCC unroll 4
                                for (int u = 0; u < U; ++u) {
                                    const V xv = vload<V>(xrow + wo + u * L + off);
#pragma GCC unroll 8
                                    for (int j = 0; j < KB; ++j)
                                        acc[u][j] += vload<V>(gyrow + j * P + wo + u * L) * xv;
                                }
                            }
                            for (; wo + L <= hi; wo += L) {
                                const V xv = vload<V>(xrow + wo + off);
#pragma GCC unroll 8
                                for (int j = 0; j < KB; ++j) acc[0][j] += vload<V>(gyrow + j * P + wo) * xv;
                            }
                        }
                        for (; wo < hi; ++wo) {
                            const T xv = xrow[wo * s.sw + off];
                            for (int j = 0; j < KB; ++j) tail[j] += gyrow[j * P + wo] * xv;
                        }
                    }
                }
                for (int j = 0; j < KB; ++j) {
                    V a = acc[0][j];
                    for (int u = 1; u < U; ++u) a += acc[u][j];
                    T sum = tail[j];
                    for (int i = 0; i < L; ++i) sum += a[i];
                    gw[((k0 + j) * Cg + cc) * RS + r * s.S + q] = sum;
                }
            }
    }
}

// Depthwise (one filter per channel), R <= 8, any stride: a task owns a
// channel. Each image's x plane is copied with its zero halo (the forward's
// DepthwiseLayout, phase planes and all) and its gy plane padded with zeros
// to whole vectors, so every tap reads whole vectors with no edge cases;
// then for each filter row r one pass over the rows feeds all S taps from
// each gy vector (S x U chains). The general kernel above reads x and gy once
// per tap, R*S passes with scalar edges (depthwise_3x3 grad weight: 1.5x the
// time on AVX2).
template <class T, int S>
void conv2d_grad_weight_depthwise(const T* gy, const T* x, T* gw, const ConvGeom& s) {
    typedef typename Vec<T>::type V;
    constexpr idx L = CK_VEC_BYTES / sizeof(T);
    constexpr int U = S <= 4 ? 2 : 1;  // chains per tap, within the 16 vector registers of AVX2
    const DepthwiseLayout<T> lay(s);
    const idx P = s.Ho * s.Wo, HW = s.H * s.W, RS = s.R * S;
    const idx nv = (s.Wo + L - 1) / L, Wp = nv * L, gelems = (s.Ho * Wp + 15) / 16 * 16;
    idx tap[S];  // where tap q's inputs for consecutive outputs start: its phase plane, then its column
    for (int q = 0; q < S; ++q) tap[q] = (q * s.dw) % s.sw * lay.pstride + (q * s.dw) / s.sw;
    const int nt = threads_for(s.C);
    T* buf = static_cast<T*>(workspace(static_cast<std::size_t>(nt * (lay.elems + gelems)) * sizeof(T), 0));
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
    for (idx c = 0; c < s.C; ++c) {
        T* xpad = buf + omp_get_thread_num() * (lay.elems + gelems);
        T* gpad = xpad + lay.elems;
        V sum[8][S];  // [r][q], summed over the images in order
        for (idx r = 0; r < s.R; ++r)
            for (int q = 0; q < S; ++q) sum[r][q] = V{};
        for (idx n = 0; n < s.N; ++n) {
            lay.fill(x + (n * s.C + c) * HW, s, xpad);
            copy_padded_plane<false>(gy + (n * s.C + c) * P, s.Ho, s.Wo, 0, 0, 1, 1, gpad, s.Ho, Wp, gelems);
            for (idx r = 0; r < s.R; ++r) {
                V acc[U][S];
                for (int u = 0; u < U; ++u)
                    for (int q = 0; q < S; ++q) acc[u][q] = V{};
                for (idx ho = 0; ho < s.Ho; ++ho) {
                    const T* grow = gpad + ho * Wp;
                    const T* xrow = xpad + (ho * s.sh + r * s.dh) * lay.Ws;
                    idx v = 0;
                    for (; v + U <= nv; v += U)
#pragma GCC unroll 2
                        for (int u = 0; u < U; ++u) {
                            const V g = vload<V>(grow + (v + u) * L);
#pragma GCC unroll 8
                            for (int q = 0; q < S; ++q) acc[u][q] += vload<V>(xrow + tap[q] + (v + u) * L) * g;
                        }
                    for (; v < nv; ++v) {
                        const V g = vload<V>(grow + v * L);
#pragma GCC unroll 8
                        for (int q = 0; q < S; ++q) acc[0][q] += vload<V>(xrow + tap[q] + v * L) * g;
                    }
                }
                for (int q = 0; q < S; ++q)
                    for (int u = 0; u < U; ++u) sum[r][q] += acc[u][q];
            }
        }
        for (idx r = 0; r < s.R; ++r)
            for (int q = 0; q < S; ++q) {
                T t = T(0);
                for (idx i = 0; i < L; ++i) t += sum[r][q][i];
                gw[c * RS + r * S + q] = t;
            }
    }
}

template <class T>
void conv2d_grad_weight_direct(const T* gy, const T* x, T* gw, const ConvGeom& s, bool generic = false) {
    const idx Kg = s.K / s.G;
    if (!generic && depthwise_nchw_grad_weight_via_nhwc(gy, x, gw, s)) return;
    if (!generic && conv_is_depthwise(s) && s.K == s.C && s.R <= 8) {
        switch (s.S) {
            case 3: return conv2d_grad_weight_depthwise<T, 3>(gy, x, gw, s);
            case 5: return conv2d_grad_weight_depthwise<T, 5>(gy, x, gw, s);
            case 7: return conv2d_grad_weight_depthwise<T, 7>(gy, x, gw, s);
            default: break;  // the general kernel
        }
    }
    if (Kg % 8 == 0)
        conv2d_grad_weight_direct_kb<T, 8>(gy, x, gw, s);
    else if (Kg % 4 == 0)
        conv2d_grad_weight_direct_kb<T, 4>(gy, x, gw, s);
    else if (Kg % 2 == 0)
        conv2d_grad_weight_direct_kb<T, 2>(gy, x, gw, s);
    else
        conv2d_grad_weight_direct_kb<T, 1>(gy, x, gw, s);
}

// Depthwise problems take the depthwise kernels unless `generic`.
template <class T>
void conv2d_backward_direct(const T* gy, const T* x, const T* w, T* gx, T* gw, T* gb, const ConvGeom& s,
                            bool generic = false) {
    if (gx) conv2d_grad_input_direct(gy, w, gx, s, generic);
    if (gw) conv2d_grad_weight_direct(gy, x, gw, s, generic);
    if (gb) bias_grad(gy, gb, s);
}
