// Weight gradient of a 1x1 conv (stride 1, no padding, ungrouped) on
// channels_last arrays, both operands read where they lie:
//
//   gw[k, c] = sum over pixels m of gy[m, k] * x[m, c]
//
// As a GEMM, gy^T (K x M) times x (M x C): the reduction runs over the batch's
// pixels, tens of thousands of them, and the result is small. Each pixel's
// gy row holds a tile's MR filters side by side and its x row the tile's
// channels, so a register tile walks the pixels reading both in place: per
// pixel MR broadcasts, NV vector loads and MR*NV FMAs, with nothing packed or
// written. (The packed GEMM copies every gy element once, transposed, for
// the one or two column panels an expansion layer's few input channels make:
// about as much work as the FMAs it feeds.)
//
// The pixels go in bands whose x and gy rows for one tile fit half of L1,
// so a band's channels are reread from L1 by each filter tile; tiles keep
// their sums in memory between bands. The batch's pixels split into a fixed
// number of chunks (a function of the shape), each summed in pixel order,
// then the chunks in order: the same bits for any thread count.

// x's rows are read a tile of NV vectors at a time; the last vector of a row
// may be partial (`tail` lanes, masked, so nothing past the row is read).
template <class T, int RT, int NV, bool Tail>
void pointwise_gw_tile(idx pixels, const T* __restrict gy, idx K, const T* __restrict x, idx C, idx tail, T* out,
                       idx ldo, bool accumulate) {
    typedef typename Vec<T>::type V;
    constexpr int L = CK_VEC_BYTES / sizeof(T);
    V c[RT][NV] = {};
    for (idx m = 0; m < pixels; ++m) {
        const T* a = gy + m * K;
        const T* b = x + m * C;
        V bv[NV];
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) bv[v] = (Tail && v == NV - 1) ? vload_first(b + v * L, tail) : vload<V>(b + v * L);
#pragma GCC unroll 12
        for (int i = 0; i < RT; ++i) {
            const T ai = a[i];
#pragma GCC unroll 4
            for (int v = 0; v < NV; ++v) c[i][v] += ai * bv[v];
        }
    }
    store_tile<T, RT, NV>(c, out, ldo, RT, (NV - 1) * L + (Tail ? tail : L), accumulate);
}

// One tile of RT filters (RT <= MR) and `cols` channels (at most NR).
template <class T, int RT>
void pointwise_gw_cols(idx pixels, const T* gy, idx K, const T* x, idx C, idx cols, T* out, idx ldo, bool acc) {
    constexpr int L = CK_VEC_BYTES / sizeof(T), NV = GemmBlocking<T>::NR / L;
    const idx vecs = (cols + L - 1) / L, tail = cols - (vecs - 1) * L;
    const bool part = tail < L;
    static_assert(NV == 2, "the NR of every SIMD level is two vectors");
    if (vecs == 2)
        return part ? pointwise_gw_tile<T, RT, 2, true>(pixels, gy, K, x, C, tail, out, ldo, acc)
                    : pointwise_gw_tile<T, RT, 2, false>(pixels, gy, K, x, C, L, out, ldo, acc);
    return part ? pointwise_gw_tile<T, RT, 1, true>(pixels, gy, K, x, C, tail, out, ldo, acc)
                : pointwise_gw_tile<T, RT, 1, false>(pixels, gy, K, x, C, L, out, ldo, acc);
}

// Filters [k0, k1) by whole tiles of MR, the rest by halving tiles (MR 6:
// 5 = 4 + 1; MR 12: 11 = 8 + 2 + 1), each another pass over the band's x rows
// in L1 rather than a wasted broadcast per pixel.
template <class T>
void pointwise_gw_rows(idx pixels, const T* gy, idx K, const T* x, idx C, idx c0, idx cols, idx k0, idx k1, T* gw,
                       bool acc) {
    constexpr int MR = GemmBlocking<T>::MR;
    idx k = k0;
    for (; k + MR <= k1; k += MR) pointwise_gw_cols<T, MR>(pixels, gy + k, K, x + c0, C, cols, gw + k * C + c0, C, acc);
    if constexpr (MR >= 8) {
        if (k + 8 <= k1) {
            pointwise_gw_cols<T, 8>(pixels, gy + k, K, x + c0, C, cols, gw + k * C + c0, C, acc);
            k += 8;
        }
    }
    if (k + 4 <= k1) {
        pointwise_gw_cols<T, 4>(pixels, gy + k, K, x + c0, C, cols, gw + k * C + c0, C, acc);
        k += 4;
    }
    if (k + 2 <= k1) {
        pointwise_gw_cols<T, 2>(pixels, gy + k, K, x + c0, C, cols, gw + k * C + c0, C, acc);
        k += 2;
    }
    if (k < k1) pointwise_gw_cols<T, 1>(pixels, gy + k, K, x + c0, C, cols, gw + k * C + c0, C, acc);
}

template <class T>
bool grad_weight_pointwise_nhwc_applies(const ConvGeom& s) {
    return s.G == 1 && conv_is_pointwise(s);
}

// gw (K x C; for a 1x1 filter both weight orders) = gy^T x over the batch.
template <class T>
void grad_weight_pointwise_nhwc(const T* gy, const T* x, T* gw, const ConvGeom& s) {
    constexpr int MR = GemmBlocking<T>::MR, NR = GemmBlocking<T>::NR;
    constexpr idx kMinReduce = 256;
    const idx K = s.K, C = s.C, M = s.N * s.H * s.W, wsize = K * C;
    const idx chunks = imax(1, imin(gw_chunks<T>(s, wsize), M / kMinReduce));
    const idx band = imax(32, imin(idx(1024), cache_sizes().l1d / 2 / ((MR + NR) * static_cast<idx>(sizeof(T)))));
    // filter blocks per chunk: enough tasks for the threads (which block a
    // tile falls in changes no sum, only who computes it)
    const idx ktiles = (K + MR - 1) / MR, nt = num_threads();
    const idx kblocks = imin(ktiles, imax(1, (2 * nt + chunks - 1) / chunks));
    T* part = chunks == 1 ? gw : static_cast<T*>(workspace(static_cast<std::size_t>(chunks * wsize) * sizeof(T), 1));
#pragma omp parallel for num_threads(threads_for(chunks * kblocks)) schedule(dynamic, 1)
    for (idx t = 0; t < chunks * kblocks; ++t) {
        const idx j = t / kblocks, kb = t % kblocks;
        const idx k0 = kb * ktiles / kblocks * MR, k1 = imin(K, (kb + 1) * ktiles / kblocks * MR);
        const idx m0 = j * M / chunks, m1 = (j + 1) * M / chunks;
        T* dst = part + j * wsize;
        for (idx b0 = m0; b0 < m1; b0 += band) {
            const idx n = imin(band, m1 - b0);
            for (idx c0 = 0; c0 < C; c0 += NR)
                pointwise_gw_rows(n, gy + b0 * K, K, x + b0 * C, C, c0, imin(idx(NR), C - c0), k0, k1, dst,
                                  b0 > m0);
        }
        if (m1 == m0)
            for (idx k = k0; k < k1; ++k)
                for (idx c = 0; c < C; ++c) dst[k * C + c] = T(0);
    }
    if (chunks > 1) sum_chunks(part, chunks, wsize, gw);
}
