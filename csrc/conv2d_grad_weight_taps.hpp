// conv2d grad weight for filters of few taps (a first layer on one to a few
// channels) at column stride 1, NCHW: a direct sum with output columns in
// vector lanes.
//
//   gw[k, c, r, s] = sum over n, ho, wo of gy[n, k, ho, wo] * xpad[n, c, ho*sh + r*dh, wo + s*dw]
//
// As a GEMM this has a reduction of N*Ho*Wo and a few panels' worth of
// columns (C*R*S): the column matrix is written, packed and read again for a
// few dozen products per pixel. Here a task holds KB filters x S taps of one
// (c, r) as KB*S vector accumulators and walks the pixels: per vector of
// output columns, KB loads of gy, S shifted loads of the padded input and
// KB*S FMAs, nothing written; the lanes are summed at the end.
//
// Tasks are (channel, filter block). Each runs the batch in chunks of images
// whose gy rows (its KB filters) and input planes fit half of L2, the R rows
// of taps in turn per chunk, so a chunk is read R times from L2 rather than
// from memory; the accumulators wait in the task's memory between chunks.
// Every output is summed in the same order for any thread count.

// Where auto takes it: at most 5 taps a row (7 leave blocks of 3 filters,
// whose passes over L2 outweigh their products: slower than the GEMM on a
// 3-channel 7x7 layer), at most 112 taps in all (measured faster up to
// 4 channels of 5x5, even at 16 channels of 3x3), and more than one: a 1x1
// filter's task holds one accumulator per filter and rereads its channel's
// plane for each block of filters, where the GEMM over the input as its
// own column matrix was 1.3-5.5x faster from 16 to 96 channels.
template <class T>
bool grad_weight_taps_applies(const ConvGeom& s) {
    return s.G == 1 && s.sw == 1 && s.S <= 5 && s.R * s.S > 1 && s.C * s.R * s.S <= 112;
}

// acc[i][q] += the products of one output row: gy rows g[i] (Wo columns) and
// the padded input row xr shifted by q*dw. The last, partial vector loads
// both operands masked, so neither reads past the row and a zero lane never
// meets an input value (0 * inf would be a NaN the sum does not have).
template <class T, int KB, int S>
__attribute__((always_inline)) inline void taps_row(const T* const (&g)[KB], const T* xr, idx Wo, idx dw,
                                                   typename Vec<T>::type (&acc)[KB][S]) {
    typedef typename Vec<T>::type V;
    constexpr idx L = CK_VEC_BYTES / sizeof(T);
    idx w0 = 0;
    for (; w0 + L <= Wo; w0 += L) {
        V gv[KB];
        for (int i = 0; i < KB; ++i) gv[i] = vload<V>(g[i] + w0);
        for (int q = 0; q < S; ++q) {
            const V xv = vload<V>(xr + w0 + q * dw);
            for (int i = 0; i < KB; ++i) acc[i][q] += gv[i] * xv;
        }
    }
    if (w0 < Wo) {
        const idx n = Wo - w0;
        V gv[KB];
        for (int i = 0; i < KB; ++i) gv[i] = vload_first(g[i] + w0, n);
        for (int q = 0; q < S; ++q) {
            const V xv = vload_first(xr + w0 + q * dw, n);
            for (int i = 0; i < KB; ++i) acc[i][q] += gv[i] * xv;
        }
    }
}

template <class T, int S>
void grad_weight_taps(const T* gy, const T* x, T* gw, const ConvGeom& s) {
    typedef typename Vec<T>::type V;
    constexpr int KB = 24 / S > 8 ? 8 : 24 / S;  // KB*S accumulators beside KB gy vectors and one input vector
    constexpr idx L = CK_VEC_BYTES / sizeof(T);
    idx Hp, Wp;
    padded_extent(s, Hp, Wp);
    const idx plane = Hp * Wp, P = s.Ho * s.Wo, kblocks = (s.K + KB - 1) / KB, tasks = s.C * kblocks;
    if (s.N * P == 0) {  // no pixels: a zero gradient
        for (idx i = 0; i < s.K * s.C * s.R * s.S; ++i) gw[i] = T(0);
        return;
    }
    const idx per_image = (KB * P + plane) * static_cast<idx>(sizeof(T));
    const idx chunk = imax(1, imin(s.N, cache_sizes().l2 / 2 / imax(1, per_image)));
    T* xpad = static_cast<T*>(workspace(static_cast<std::size_t>(s.N * s.C * plane + 16) * sizeof(T), 0));
    V* store = static_cast<V*>(workspace(static_cast<std::size_t>(tasks * s.R * KB * S) * sizeof(V), 1));
    pad_nchw_planes(x, s, Hp, Wp, xpad);
#pragma omp parallel for num_threads(threads_for(tasks)) schedule(dynamic, 1)
    for (idx t = 0; t < tasks; ++t) {
        const idx c = t / kblocks, k0 = (t % kblocks) * KB, live = imin(KB, s.K - k0);
        V* st = store + t * s.R * KB * S;
        for (idx n0 = 0; n0 < s.N; n0 += chunk) {
            const idx n1 = imin(s.N, n0 + chunk);
            for (idx r = 0; r < s.R; ++r) {
                V acc[KB][S];
                for (int i = 0; i < KB; ++i)
                    for (int q = 0; q < S; ++q) acc[i][q] = n0 > 0 ? st[(r * KB + i) * S + q] : V{};
                for (idx n = n0; n < n1; ++n)
                    for (idx ho = 0; ho < s.Ho; ++ho) {
                        // a block's rows past K repeat its last filter; their sums are dropped
                        const T* g[KB];
                        for (int i = 0; i < KB; ++i) g[i] = gy + (n * s.K + k0 + imin(i, live - 1)) * P + ho * s.Wo;
                        const T* xr = xpad + (n * s.C + c) * plane + (ho * s.sh + r * s.dh) * Wp;
                        taps_row<T, KB, S>(g, xr, s.Wo, s.dw, acc);
                    }
                for (int i = 0; i < KB; ++i)
                    for (int q = 0; q < S; ++q) st[(r * KB + i) * S + q] = acc[i][q];
            }
        }
        for (idx i = 0; i < live; ++i)
            for (idx r = 0; r < s.R; ++r)
                for (int q = 0; q < S; ++q) {
                    const V v = st[(r * KB + i) * S + q];
                    T sum = v[0];
                    for (idx l = 1; l < L; ++l) sum += v[l];
                    gw[(((k0 + i) * s.C + c) * s.R + r) * s.S + q] = sum;
                }
    }
}

// gw of s (grad_weight_taps_applies) from NCHW gy and x
template <class T>
void conv2d_grad_weight_taps(const T* gy, const T* x, T* gw, const ConvGeom& s) {
    switch (s.S) {
        case 1: return grad_weight_taps<T, 1>(gy, x, gw, s);
        case 2: return grad_weight_taps<T, 2>(gy, x, gw, s);
        case 3: return grad_weight_taps<T, 3>(gy, x, gw, s);
        case 4: return grad_weight_taps<T, 4>(gy, x, gw, s);
        default: return grad_weight_taps<T, 5>(gy, x, gw, s);
    }
}

// The same sum on channels_last data, with output channels in vector lanes
// instead: per output pixel, KV vectors of gy (its K gradients, the last
// masked) and one broadcast of the padded input per tap feed TG*KV FMAs, for
// TG taps at a time, so a pixel's gy row is read ceil(taps / TG) times
// (while its image's rows are in L2). Tasks are a fixed number of image
// chunks (a function of the batch), each summing its images in order into its
// own partial; the partials are then summed in chunk order: the same bits for
// any thread count.
template <class T>
bool grad_weight_taps_nhwc_applies(const ConvGeom& s) {
    constexpr idx L = CK_VEC_BYTES / sizeof(T);
    return s.G == 1 && s.C * s.R * s.S <= 112 && s.K <= 4 * L;
}

template <class T, int KV>
void grad_weight_taps_nhwc(const T* gy, const T* x, T* gw, const ConvGeom& s) {
    typedef typename Vec<T>::type V;
    constexpr idx L = CK_VEC_BYTES / sizeof(T);
    constexpr int TG = (CK_VEC_BYTES == 64 ? 24 : 12) / KV;  // TG*KV accumulators, KV gy vectors, a broadcast
    const idx taps = s.C * s.R * s.S, K = s.K, Kpad = KV * L, P = s.Ho * s.Wo, C = s.C;
    idx Hp, Wp;
    padded_extent(s, Hp, Wp);
    const idx image = Hp * Wp * C, chunks = imin(s.N, idx(16));
    T* xpad = static_cast<T*>(workspace(static_cast<std::size_t>(s.N * image + 16) * sizeof(T), 0));
    const std::size_t part_bytes = static_cast<std::size_t>(chunks * taps * Kpad) * sizeof(T);
    T* parts = static_cast<T*>(workspace(part_bytes + static_cast<std::size_t>(taps + TG) * sizeof(idx), 1));
    // tap j = (c, r, q), gw's order within a filter: its offset from a
    // pixel's corner in the padded image; the last group's spare slots read
    // the corner itself and their sums are dropped
    idx* toff = reinterpret_cast<idx*>(reinterpret_cast<char*>(parts) + part_bytes);
    for (idx j = 0; j < taps + TG; ++j) {
        const idx c = j / (s.R * s.S), r = j / s.S % s.R, q = j % s.S;
        toff[j] = j < taps ? (r * s.dh * Wp + q * s.dw) * C + c : 0;
    }
    pad_nhwc_images(x, s, s.N, Hp, Wp, xpad);
#pragma omp parallel for num_threads(threads_for(chunks)) schedule(static)
    for (idx ch = 0; ch < chunks; ++ch) {
        T* part = parts + ch * taps * Kpad;
        for (idx i = 0; i < taps * Kpad; ++i) part[i] = T(0);
        for (idx n = ch * s.N / chunks; n < (ch + 1) * s.N / chunks; ++n) {
            const T* xi = xpad + n * image;
            const T* gi = gy + n * P * K;
            for (idx t0 = 0; t0 < taps; t0 += TG) {
                V acc[TG][KV] = {};
                const idx* to = toff + t0;
                for (idx ho = 0; ho < s.Ho; ++ho)
                    for (idx wo = 0; wo < s.Wo; ++wo) {
                        const T* g = gi + (ho * s.Wo + wo) * K;
                        V gv[KV];
                        for (int v = 0; v < KV; ++v)
                            gv[v] = (v + 1) * L <= K ? vload<V>(g + v * L) : vload_first(g + v * L, K - v * L);
                        const T* xb = xi + (ho * s.sh * Wp + wo * s.sw) * C;
                        for (int j = 0; j < TG; ++j) {
                            const T a = xb[to[j]];
                            for (int v = 0; v < KV; ++v) acc[j][v] += a * gv[v];
                        }
                    }
                for (int j = 0; j < TG && t0 + j < taps; ++j)
                    for (int v = 0; v < KV; ++v) {
                        T* dst = part + (t0 + j) * Kpad + v * L;
                        vstore(dst, vload<V>(dst) + acc[j][v]);
                    }
            }
        }
    }
    for (idx k = 0; k < K; ++k)
        for (idx j = 0; j < taps; ++j) {
            T sum = parts[j * Kpad + k];
            for (idx ch = 1; ch < chunks; ++ch) sum += parts[(ch * taps + j) * Kpad + k];
            gw[k * taps + j] = sum;
        }
}

// gw of s (grad_weight_taps_nhwc_applies) from NHWC gy and x
template <class T>
void conv2d_grad_weight_taps_nhwc(const T* gy, const T* x, T* gw, const ConvGeom& s) {
    constexpr idx L = CK_VEC_BYTES / sizeof(T);
    if (s.K <= L) return grad_weight_taps_nhwc<T, 1>(gy, x, gw, s);
    if (s.K <= 2 * L) return grad_weight_taps_nhwc<T, 2>(gy, x, gw, s);
    if (s.K <= 3 * L) return grad_weight_taps_nhwc<T, 3>(gy, x, gw, s);
    return grad_weight_taps_nhwc<T, 4>(gy, x, gw, s);
}
