// conv2d forward on channels_last (NHWC) data by Winograd's F(m x m, 3x3),
// the transforms and rule of conv2d_winograd.hpp in the layout that suits
// them best: channels in vector lanes. A tile's (m+2)^2 input positions are
// (m+2)^2 runs of C contiguous channels, so the input transform is plain
// vector arithmetic on whole runs (no lane shuffles, no padded copy of the
// batch), and its (m+2)^2 results are rows of (m+2)^2 matrices V[xi]
// (tiles x C), which the in-place GEMM kernels read as they are:
//     M[xi] (tiles x K) = V[xi] (tiles x C) U[xi] (C x K),
// U[xi] the transformed filters, packed as gemm_rows' B once per call, or
// once for many calls (winograd_nhwc_filters: the caller keeps them). The
// output transform reads K contiguous values per tile and plane and writes
// NHWC output pixels directly, with the bias and relu.
//
// Tiles go in blocks, each on one thread with its own scratch (V and M of
// the block, sized to stay in L2): transform, XI GEMMs, transform back. Each
// block reads all of U; where U outweighs the whole batch's V and M (small
// maps, many channels) the batch is one block instead, and the threads split
// its GEMMs by plane, so U is read once. Every output is reduced over C in a
// fixed order by the same micro-kernel steps either way: deterministic for
// any thread count.
//
// Inf and NaN: the transforms subtract inputs, so an inf in x or w can give a
// NaN where the direct sum gives +-inf. Such an input always leaves some
// computed output non-finite, so the output transform tests what it
// computes (before relu) and the call returns false if anything was not
// finite; the caller then runs the GEMM form, which overwrites y.

template <class T, int M>
struct WinogradNhwcLayout {
    static constexpr int kSide = M + 2, kXi = kSide * kSide;
    static constexpr idx kPlanePad = 16;  // planes a multiple of 4 KiB apart would share cache sets
    static constexpr idx kMaxTiles = 240;
    idx tH, tW, tiles;   // output tiles per image column/row, in the batch
    idx ldv, ldm;        // row strides of V (C) and M (K), whole vectors
    bool whole;          // the batch is one block, its GEMMs split by plane
    idx tb, blocks;      // tiles per block (whole MR-row panels), blocks
    idx vplane, mplane;  // one plane of V and of M in a block
    idx block_elems;
    WinogradNhwcLayout(const ConvGeom& s) {
        constexpr idx L = CK_VEC_BYTES / sizeof(T), MR = GemmBlocking<T>::MR;
        tH = (s.Ho + M - 1) / M;
        tW = (s.Wo + M - 1) / M;
        tiles = s.N * tH * tW;
        ldv = (s.C + L - 1) / L * L;
        ldm = (s.K + L - 1) / L * L;
        whole = tiles * (ldv + ldm) <= s.C * s.K;
        if (whole) {
            tb = (tiles + MR - 1) / MR * MR;
            blocks = 1;
        } else {
            // a block's V and M in half of L2, at most kMaxTiles tiles, and
            // at least two blocks per thread where the batch has the tiles
            const idx per_tile = kXi * (ldv + ldm) * static_cast<idx>(sizeof(T));
            idx t = imin(kMaxTiles, imax(MR, cache_sizes().l2 / 2 / per_tile));
            t = imin(t, imax(MR, (tiles + 2 * num_threads() - 1) / (2 * num_threads())));
            blocks = (tiles + t - 1) / t;
            tb = ((tiles + blocks - 1) / blocks + MR - 1) / MR * MR;
            blocks = (tiles + tb - 1) / tb;
        }
        vplane = tb * ldv + kPlanePad;
        mplane = tb * ldm + kPlanePad;
        block_elems = (kXi * (vplane + mplane) + 15) / 16 * 16;
    }
};

// V rows [0, t1 - t0) for tiles [t0, t1): each tile's (M+2)^2 channel runs,
// zeros where the patch leaves the input, transformed a vector at a time.
template <class T, int M>
void winograd_input_nhwc(const T* x, const ConvGeom& s, const WinogradNhwcLayout<T, M>& lay, idx t0, idx t1, T* V) {
    typedef typename Vec<T>::type Vt;
    constexpr int L = CK_VEC_BYTES / sizeof(T), A = M + 2, XI = A * A;
    for (idx t = t0; t < t1; ++t) {
        const idx n = t / (lay.tH * lay.tW), th = (t / lay.tW) % lay.tH, tw = t % lay.tW;
        const idx ih0 = M * th - s.ph, iw0 = M * tw - s.pw;
        const bool inside = ih0 >= 0 && ih0 + A <= s.H && iw0 >= 0 && iw0 + A <= s.W;
        const T* img = x + n * s.H * s.W * s.C;
        T* v = V + (t - t0) * lay.ldv;
        for (idx c0 = 0; c0 < s.C; c0 += L) {
            const idx live = imin(L, s.C - c0);
            Vt d[A][A], out[XI];
            for (int r = 0; r < A; ++r)
                for (int q = 0; q < A; ++q) {
                    const idx ih = ih0 + r, iw = iw0 + q;
                    if (!inside && (ih < 0 || ih >= s.H || iw < 0 || iw >= s.W)) {
                        d[r][q] = Vt{};
                        continue;
                    }
                    const T* p = img + (ih * s.W + iw) * s.C + c0;
                    d[r][q] = live == L ? vload<Vt>(p) : vload_first(p, live);
                }
            winograd_in_tile<T>(d, out);
            for (int xi = 0; xi < XI; ++xi) vstore(v + xi * lay.vplane + c0, out[xi]);
        }
    }
}

// y for tiles [t0, t1) from M's rows, + bias, relu where asked. Returns
// false if any computed output (stored or not, before relu) is not finite.
template <class T, int M>
bool winograd_output_nhwc(const T* Mt, const T* b, const ConvGeom& s, const WinogradNhwcLayout<T, M>& lay, idx t0,
                          idx t1, T* y, bool relu) {
    typedef typename Vec<T>::type Vt;
    constexpr int L = CK_VEC_BYTES / sizeof(T), XI = (M + 2) * (M + 2);
    Vt check{};  // v - v summed: 0 while every v is finite, NaN after an inf or NaN
    for (idx t = t0; t < t1; ++t) {
        const idx n = t / (lay.tH * lay.tW), th = (t / lay.tW) % lay.tH, tw = t % lay.tW;
        const idx ho = M * th, wo = M * tw;
        const int rows = static_cast<int>(imin(M, s.Ho - ho)), cols = static_cast<int>(imin(M, s.Wo - wo));
        const T* m = Mt + (t - t0) * lay.ldm;
        for (idx k0 = 0; k0 < s.K; k0 += L) {
            const idx live = imin(L, s.K - k0);
            Vt mv[XI], yv[M][M];
            for (int xi = 0; xi < XI; ++xi) mv[xi] = vload<Vt>(m + xi * lay.mplane + k0);
            winograd_out_tile<T>(mv, yv);
            const Vt bias = b ? (live == L ? vload<Vt>(b + k0) : vload_first(b + k0, live)) : Vt{};
            for (int r = 0; r < M; ++r)
                for (int j = 0; j < M; ++j) {
                    Vt v = yv[r][j] + bias;
                    check += v - v;
                    if (r >= rows || j >= cols) continue;
                    if (relu) v = v < Vt{} ? Vt{} : v;  // NaN compares false: kept
                    T* dst = y + ((n * s.Ho + ho + r) * s.Wo + wo + j) * s.K + k0;
                    if (live == L)
                        vstore(dst, v);
                    else
                        vstore_first(dst, v, live);
                }
        }
    }
    for (int l = 0; l < L; ++l)
        if (check[l] != T(0)) return false;
    return true;
}

// The block's GEMMs M[xi] = V[xi] U[xi] for planes [xi0, xi1), with
// gemm_rows' micro-kernels reading V's rows in place. Rows of the last panel
// past the block's tiles read the block's first row; their results land in M
// rows never used.
template <class T, int M>
void winograd_gemms_nhwc(const T* V, const T* Upk, idx upk, const ConvGeom& s, const WinogradNhwcLayout<T, M>& lay,
                         idx nb, T* Mt, int xi0, int xi1) {
    typedef GemmBlocking<T> GB;
    constexpr int MR = GB::MR, NR = GB::NR;
    const idx KC = rows_kc<T>(), npanels = (s.K + NR - 1) / NR, Npad = npanels * NR, mpanels = (nb + MR - 1) / MR;
    idx iota[kRowsKCMax];
    for (idx k = 0; k < KC; ++k) iota[k] = k;
    for (int xi = xi0; xi < xi1; ++xi) {
        const T* Vx = V + xi * lay.vplane;
        T* Mx = Mt + xi * lay.mplane;
        for (idx pc = 0; pc < s.C; pc += KC) {
            const idx kc = imin(KC, s.C - pc);
            const T* Bblk = Upk + xi * upk + pc * Npad;
            for (idx jp = 0; jp < npanels; ++jp) {
                const bool pair = kIndirectWide<T> && jp + 1 < npanels && s.K - jp * NR >= 2 * NR;
                const idx nr = imin(NR, s.K - jp * NR);
                for (idx ip = 0; ip < mpanels; ++ip) {
                    const T* rows[MR];
                    for (int i = 0; i < MR; ++i) {
                        const idx r = ip * MR + i;
                        rows[i] = Vx + (r < nb ? r : 0) * lay.ldv + pc;
                    }
                    gemm_micro_indirect_panel(kc, rows, iota, Bblk, jp, nr, pair, Mx + ip * MR * lay.ldm + jp * NR,
                                              lay.ldm, pc > 0);
                }
                if (pair) ++jp;
            }
        }
    }
}

// One plane of U (C x K in gemm_rows' packed B layout, which depends on the
// SIMD level's NR and the caches' KC), and all of them.
template <class T, int M>
idx winograd_nhwc_plane(idx K, idx C) {
    return packed_b_elems<T>(C, K) + WinogradNhwcLayout<T, M>::kPlanePad;
}

template <class T>
idx winograd_nhwc_filter_elems(idx K, idx C, int m) {
    return m == 4 ? WinogradNhwcLayout<T, 4>::kXi * winograd_nhwc_plane<T, 4>(K, C)
                  : WinogradNhwcLayout<T, 2>::kXi * winograd_nhwc_plane<T, 2>(K, C);
}

// U[xi] of F(m x m, 3x3) for (K, C, 3, 3) weights, or (K, 3, 3, C) memory
// with krsc (channels_last weights).
template <class T>
void winograd_nhwc_filters(const T* w, idx K, idx C, int m, bool krsc, T* U) {
    const idx cs = krsc ? idx(1) : idx(9), js = krsc ? C : idx(1);
    if (m == 4)
        winograd_filter_panels<T, 4, GemmBlocking<T>::NR>(w, K, C, cs, js, rows_kc<T>(), U,
                                                          winograd_nhwc_plane<T, 4>(K, C));
    else
        winograd_filter_panels<T, 2, GemmBlocking<T>::NR>(w, K, C, cs, js, rows_kc<T>(), U,
                                                          winograd_nhwc_plane<T, 2>(K, C));
}

// Returns false (y then holds no defined values) where an input or weight
// is not finite, see above.
// krsc: w is (K, 3, 3, C) memory (channels_last weights), else (K, C, 3, 3).
// U: w's transformed filters (winograd_nhwc_filters at this SIMD level), or
// nullptr to transform w here.
template <class T, int M>
bool conv2d_forward_winograd_nhwc(const T* x, const T* w, const T* b, T* y, const ConvGeom& s, bool relu,
                                  bool krsc, const T* U) {
    typedef WinogradNhwcLayout<T, M> Lay;
    constexpr int XI = Lay::kXi;
    const Lay lay(s);
    const idx upk = winograd_nhwc_plane<T, M>(s.K, s.C);
    const T* Upk = U;
    if (!Upk) {
        T* fresh = static_cast<T*>(workspace(static_cast<std::size_t>(XI * upk) * sizeof(T), 1));
        winograd_nhwc_filters(w, s.K, s.C, M, krsc, fresh);
        Upk = fresh;
    }
    int bad = 0;
    if (lay.whole) {
        // (tile chunks of a few vectors' work each for the transforms)
        constexpr idx kChunk = 4;
        const idx chunks = (lay.tiles + kChunk - 1) / kChunk;
        T* V = static_cast<T*>(workspace(static_cast<std::size_t>(lay.block_elems) * sizeof(T), 0));
        T* Mt = V + XI * lay.vplane;
        if (lay.ldm != s.K) std::memset(Mt, 0, static_cast<std::size_t>(XI * lay.mplane) * sizeof(T));
#pragma omp parallel num_threads(threads_for(chunks)) reduction(| : bad)
        {
#pragma omp for schedule(static)
            for (idx c = 0; c < chunks; ++c) {
                const idx t0 = c * kChunk, t1 = imin(lay.tiles, t0 + kChunk);
                winograd_input_nhwc(x, s, lay, t0, t1, V + t0 * lay.ldv);
            }
#pragma omp for schedule(static)
            for (int xi = 0; xi < XI; ++xi) winograd_gemms_nhwc(V, Upk, upk, s, lay, lay.tiles, Mt, xi, xi + 1);
#pragma omp for schedule(static)
            for (idx c = 0; c < chunks; ++c) {
                const idx t0 = c * kChunk, t1 = imin(lay.tiles, t0 + kChunk);
                bad |= !winograd_output_nhwc(Mt + t0 * lay.ldm, b, s, lay, t0, t1, y, relu);
            }
        }
    } else {
        const int nt = threads_for(lay.blocks);
        T* scratch = static_cast<T*>(workspace(static_cast<std::size_t>(nt * lay.block_elems) * sizeof(T), 0));
#pragma omp parallel num_threads(nt) reduction(| : bad)
        {
            T* V = scratch + omp_get_thread_num() * lay.block_elems;
            T* Mt = V + XI * lay.vplane;
            // the GEMMs write K columns of M; the output transform reads
            // whole vectors, whose lanes past K must be finite
            if (lay.ldm != s.K) std::memset(Mt, 0, static_cast<std::size_t>(XI * lay.mplane) * sizeof(T));
#pragma omp for schedule(dynamic, 1)
            for (idx blk = 0; blk < lay.blocks; ++blk) {
                const idx t0 = blk * lay.tb, t1 = imin(lay.tiles, t0 + lay.tb);
                winograd_input_nhwc(x, s, lay, t0, t1, V);
                winograd_gemms_nhwc(V, Upk, upk, s, lay, t1 - t0, Mt, 0, XI);
                bad |= !winograd_output_nhwc(Mt, b, s, lay, t0, t1, y, relu);
            }
        }
    }
    if (bad) return false;
    note_conv_algo(M == 2 ? ConvAlgo::winograd : ConvAlgo::winograd4);
    return true;
}
