// conv2d grad weight for 3x3, stride-1, undilated, ungrouped layers by
// Winograd's F(3x3, 2x2). The weight gradient of one 2x2 tile of grad_output
// gy_t over its 4x4 input patch d_t is a correlation with 3x3 outputs:
//
//     gw[k, c] = G^T [ sum_t (A gy_t[k] A^T) . (B^T d_t[c] B) ] G
//
// with the forward F(2x2, 3x3)'s matrices in new roles (the same trilinear
// form, differentiated by the filter instead of the input): B^T transforms
// the input patch exactly as the forward does, A (4x2) spreads the 2x2
// gradient tile, and G^T (3x4) folds the 4x4 sum back to the 3x3 filter.
// The 16 elementwise products, summed over the tiles, are 16 GEMMs
// (K x tiles) x (tiles x C): 16 multiplications per tile where the direct
// sum takes 36, 2.25x fewer on maps of even size. The transforms only add,
// subtract and halve.
//
// Both transforms run on NHWC data with the channels in vector lanes: V[xi]
// goes straight into the micro-kernel's packed B layout, GY[xi] into rows
// (tiles x K) whose MR consecutive filters the micro-kernel reads in place as
// its A panel. From NCHW each image is transposed first. The batch goes in a
// fixed number of chunks of images (a function of the shape only), each
// summed serially into its own partial of the 16 products, the partials then
// added in order: the same bits for any thread count.

// Where it runs: channels a multiple of the vector width (no scalar tails
// in the transforms).
template <class T>
bool grad_weight_winograd_applies(const ConvGeom& s) {
    constexpr idx L = CK_VEC_BYTES / sizeof(T);
    return conv_winograd_applies(s) && s.C % L == 0 && s.K % L == 0;
}

// Where auto takes it: measured faster than the implicit and band-by-band
// GEMMs from 16 channels each way up, and from 64 tiles in the batch (the
// 16 GEMMs' reduction); with fewer (512 filters on a batch of 8 4x4 maps: 32
// tiles) each tile's products cost more than the direct sum's.
template <class T>
bool grad_weight_winograd_pays(const ConvGeom& s) {
    constexpr idx kMinTiles = 64, kMinChannels = 16;
    const idx tiles = s.N * ((s.Ho + 1) / 2) * ((s.Wo + 1) / 2);
    return grad_weight_winograd_applies<T>(s) && s.C >= kMinChannels && s.K >= kMinChannels && tiles >= kMinTiles;
}

// (A g A^T) of a 2x2 gradient tile g, A = [1 0; 1 1; 1 -1; 0 -1]
template <class X>
inline void winograd_grad_tile(const X (&g)[2][2], X (&out)[16]) {
    X a[4][2];
    for (int j = 0; j < 2; ++j) {
        a[0][j] = g[0][j];
        a[1][j] = g[0][j] + g[1][j];
        a[2][j] = g[0][j] - g[1][j];
        a[3][j] = -g[1][j];
    }
    for (int q = 0; q < 4; ++q) {
        out[q * 4 + 0] = a[q][0];
        out[q * 4 + 1] = a[q][0] + a[q][1];
        out[q * 4 + 2] = a[q][0] - a[q][1];
        out[q * 4 + 3] = -a[q][1];
    }
}

// G^T m G of the 4x4 sum m: the 3x3 filter gradient, G^T = [1 .5 .5 0; 0 .5 -.5 0; 0 .5 .5 1]
template <class T, class X>
inline void winograd_grad_weight_out(const X (&m)[16], X (&out)[9]) {
    const T h = T(0.5);
    X r[3][4];
    for (int j = 0; j < 4; ++j) {
        const X p = (m[4 + j] + m[8 + j]) * h;
        r[0][j] = m[j] + p;
        r[1][j] = (m[4 + j] - m[8 + j]) * h;
        r[2][j] = p + m[12 + j];
    }
    for (int q = 0; q < 3; ++q) {
        const X p = (r[q][1] + r[q][2]) * h;
        out[q * 3 + 0] = r[q][0] + p;
        out[q * 3 + 1] = (r[q][1] - r[q][2]) * h;
        out[q * 3 + 2] = p + r[q][3];
    }
}

template <class T>
struct GradWeightWinogradLayout {
    static constexpr idx kPad = 16;  // between the 16 planes, so their streams do not share cache sets
    idx tH, tW, tpi;                 // 2x2 tiles per column, row and image
    idx Hx, Wx, Hg, Wg;              // padded NHWC input (tile (th, tw) reads rows 2th.., columns 2tw..) and gy
    idx chunks, stage;               // chunks of the batch; images staged (copied) at a time
    idx tb;                          // tiles per block: the GEMMs' reduction, one KC slab
    idx x_elems, g_elems, t_elems;   // per image: padded input, padded gy, the NCHW transpose's scratch
    idx vs, gs;                      // plane strides of V (packed B: C/NR panels of tb x NR) and GY (tb x K)
    idx scratch;                     // one chunk's scratch
    idx msize;                       // one partial: 16 planes of K x C
    GradWeightWinogradLayout(const ConvGeom& s, bool nchw) {
        constexpr idx kMinChunkTiles = 128, kMaxChunks = 8, kPartialBytes = idx(32) << 20;
        constexpr idx NR = GemmBlocking<T>::NR;
        tH = (s.Ho + 1) / 2;
        tW = (s.Wo + 1) / 2;
        tpi = tH * tW;
        Hx = 2 * tH + 2;
        Wx = 2 * tW + 2;
        Hg = 2 * tH;
        Wg = 2 * tW;
        msize = 16 * s.K * s.C;
        const idx by_memory = kPartialBytes / imax(1, (msize + kPad) * static_cast<idx>(sizeof(T)));
        chunks = imax(1, imin(imin(imin(s.N, kMaxChunks), s.N * tpi / kMinChunkTiles), by_memory));
        const idx imgs = (s.N + chunks - 1) / chunks;
        // the B panel (tb x NR) stays in L1 while the K/MR row panels stream
        // past it: the packed GEMM's L1 rule for KC. A chunk's images are
        // staged a few at a time, as many as one block of tiles needs (small
        // maps side by side), so the copies stay a block's worth, not a chunk's.
        const idx kc = gemm_dims<T>().kc;
        stage = imax(1, imin(imgs, (kc + tpi - 1) / imax(1, tpi)));
        tb = imax(1, imin(kc, stage * tpi));
        x_elems = (Hx * Wx * s.C + 15) / 16 * 16;
        g_elems = (Hg * Wg * s.K + 15) / 16 * 16;
        t_elems = nchw ? (imax(s.C * s.H * s.W, s.K * s.Ho * s.Wo) + 15) / 16 * 16 : 0;
        vs = (s.C + NR - 1) / NR * NR * tb + kPad;
        gs = tb * s.K + kPad;
        scratch = stage * (x_elems + g_elems) + t_elems + 16 * (vs + gs);
    }
};

// One image into the chunk's padded NHWC copies: the input with the conv's
// top/left padding, gy with zeros past its last row and column (tiles of odd
// maps reach one past them). src_x / src_g: the image, NCHW or NHWC.
template <class T>
void winograd_gw_stage_image(const T* src_x, const T* src_g, const ConvGeom& s, const GradWeightWinogradLayout<T>& lay,
                             bool nchw, T* tmp, T* xp, T* gp) {
    ConvGeom one = s;
    one.N = 1;
    if (nchw) {
        transpose_batched(src_x, tmp, idx(1), s.C, s.H * s.W);
        src_x = tmp;
    }
    pad_nhwc_images(src_x, one, idx(1), lay.Hx, lay.Wx, xp);
    if (nchw) {
        transpose_batched(src_g, tmp, idx(1), s.K, s.Ho * s.Wo);
        src_g = tmp;
    }
    ConvGeom og = one;  // gy as an NHWC image of K channels, no padding
    og.C = s.K, og.H = s.Ho, og.W = s.Wo, og.ph = og.pw = 0;
    pad_nhwc_images(src_g, og, idx(1), lay.Hg, lay.Wg, gp);
}

// For the tiles [t0, t1) of a chunk's staged images (tile t: image t / tpi,
// row (t % tpi) / tW, column t % tW), at rows t - tb0 of the block:
// V[xi] in the packed GEMM's B layout (NR-channel panels, tile-major inside)
// and GY[xi] row-major (tiles x K).
template <class T>
void winograd_gw_transform(const T* xp, const T* gp, const ConvGeom& s, const GradWeightWinogradLayout<T>& lay,
                           idx t0, idx t1, idx tb0, T* V, T* GY) {
    typedef typename Vec<T>::type Vt;
    constexpr idx L = CK_VEC_BYTES / sizeof(T), NR = GemmBlocking<T>::NR;
    const idx C = s.C, K = s.K, xrow = lay.Wx * C, grow = lay.Wg * K, panel = NR * lay.tb;
    for (idx t = t0; t < t1; ++t) {
        const idx i = t / lay.tpi, th = (t % lay.tpi) / lay.tW, tw = t % lay.tW, at = t - tb0;
        const T* xb = xp + i * lay.x_elems + (2 * th * lay.Wx + 2 * tw) * C;
        for (idx c = 0; c < C; c += L) {
            Vt d[4][4], out[16];
            for (int r = 0; r < 4; ++r)
                for (int j = 0; j < 4; ++j) d[r][j] = vload<Vt>(xb + r * xrow + j * C + c);
            winograd_in_tile<T>(d, out);
            T* v = V + (c / NR) * panel + at * NR + c % NR;
            for (int xi = 0; xi < 16; ++xi) vstore(v + xi * lay.vs, out[xi]);
        }
        const T* gb = gp + i * lay.g_elems + (2 * th * lay.Wg + 2 * tw) * K;
        for (idx k = 0; k < K; k += L) {
            Vt g[2][2], out[16];
            for (int r = 0; r < 2; ++r)
                for (int j = 0; j < 2; ++j) g[r][j] = vload<Vt>(gb + r * grow + j * K + k);
            winograd_grad_tile(g, out);
            for (int xi = 0; xi < 16; ++xi) vstore(GY + xi * lay.gs + at * K + k, out[xi]);
        }
    }
}

// C (mr x nr) (+)= A (mr x kc) B (kc x nr, a packed panel), A's column k the
// RT values at a + k * lda: the GY block's rows read in place (row panels of
// MR filters are MR consecutive values of each tile's row). An edge tile
// reads past its mr rows into the next row or the plane's padding; those
// lanes are not stored.
template <class T, int RT, int NV>
__attribute__((always_inline)) inline void micro_a_strided(idx kc, const T* a, idx lda, const T* __restrict Bp, T* C,
                                                           idx ldc, idx mr, idx nr, bool accumulate) {
    typedef GemmBlocking<T> GB;
    typename GB::V c[RT][NV] = {};
    for (idx k = 0; k < kc; ++k) {
        tile_step<T, RT, NV>(c, a, Bp);
        a += lda;
        Bp += GB::NR;
    }
    store_tile<T, RT, NV>(c, C, ldc, mr, nr, accumulate);
}

template <class T>
void gemm_micro_strided(idx kc, const T* a, idx lda, const T* Bp, T* C, idx ldc, idx mr, idx nr, bool accumulate) {
    typedef GemmBlocking<T> GB;
    constexpr int MR = GB::MR;
    static_assert(MR % 3 == 0, "edge tiles of a third and two thirds of MR");
    const bool one = nr <= GB::L;
    if (mr > 2 * MR / 3) {
        if (one) return micro_a_strided<T, MR, 1>(kc, a, lda, Bp, C, ldc, mr, nr, accumulate);
        return micro_a_strided<T, MR, 2>(kc, a, lda, Bp, C, ldc, mr, nr, accumulate);
    }
    if (mr > MR / 3) {
        if (one) return micro_a_strided<T, 2 * MR / 3, 1>(kc, a, lda, Bp, C, ldc, mr, nr, accumulate);
        return micro_a_strided<T, 2 * MR / 3, 2>(kc, a, lda, Bp, C, ldc, mr, nr, accumulate);
    }
    if (one) return micro_a_strided<T, MR / 3, 1>(kc, a, lda, Bp, C, ldc, mr, nr, accumulate);
    return micro_a_strided<T, MR / 3, 2>(kc, a, lda, Bp, C, ldc, mr, nr, accumulate);
}

// gw of s (grad_weight_winograd_applies) from x and gy, NCHW (`nchw`) or
// NHWC. Returns false, having written nothing to gw, where the result is not
// finite (an inf or NaN in x or gy, or an overflow in the transforms): the
// transforms subtract, so an inf can come out as a NaN where the direct sum
// gives +-inf; the caller then takes another algorithm.
template <class T>
bool conv2d_grad_weight_winograd(const T* gy, const T* x, T* gw, const ConvGeom& s, bool nchw) {
    typedef typename Vec<T>::type Vt;
    typedef GemmBlocking<T> GB;
    constexpr idx L = CK_VEC_BYTES / sizeof(T), MR = GB::MR, NR = GB::NR;
    const GradWeightWinogradLayout<T> lay(s, nchw);
    const idx C = s.C, K = s.K, HWx = s.C * s.H * s.W, HWg = s.K * s.Ho * s.Wo;
    const idx mstride = lay.msize + GradWeightWinogradLayout<T>::kPad;
    const idx kpanels = (K + MR - 1) / MR, cpanels = (C + NR - 1) / NR;
    const int nt = num_threads();
    const bool outer = nt > 1 && lay.chunks > 1;
    T* buf = static_cast<T*>(workspace(static_cast<std::size_t>((outer ? nt : 1) * lay.scratch) * sizeof(T), 0));
    T* part = static_cast<T*>(workspace(static_cast<std::size_t>((lay.chunks + 1) * mstride) * sizeof(T), 1));
    // inner: the chunk's work split over the threads, block by block (each
    // tile of a product still summed over the blocks in order)
    auto run_chunk = [&](idx j, T* sc, bool inner) {
        const idx n0 = j * s.N / lay.chunks, n1 = (j + 1) * s.N / lay.chunks;
        const int team = inner ? nt : 1;
        T* xp = sc;
        T* gp = xp + lay.stage * lay.x_elems;
        T* tmp = gp + lay.stage * lay.g_elems;
        T* V = tmp + lay.t_elems;
        T* GY = V + 16 * lay.vs;
        T* Mx = part + j * mstride;
        if (n0 == n1)
            for (idx i = 0; i < lay.msize; ++i) Mx[i] = T(0);
        for (idx ns = n0; ns < n1; ns += lay.stage) {
            const idx ne = imin(n1, ns + lay.stage), tiles = (ne - ns) * lay.tpi;
            for (idx n = ns; n < ne; ++n)
                winograd_gw_stage_image(x + n * HWx, gy + n * HWg, s, lay, nchw, tmp, xp + (n - ns) * lay.x_elems,
                                        gp + (n - ns) * lay.g_elems);
            for (idx t0 = 0; t0 < tiles; t0 += lay.tb) {
                const idx t1 = imin(tiles, t0 + lay.tb), kc = t1 - t0;
                const bool acc = ns > n0 || t0 > 0;
#pragma omp parallel for num_threads(team) if (inner) schedule(static)
                for (int q = 0; q < team; ++q)
                    winograd_gw_transform(xp, gp, s, lay, t0 + q * kc / team, t0 + (q + 1) * kc / team, t0, V, GY);
                // Mx[xi] (K x C) (+)= GY[xi]^T (K x tiles) V[xi] (tiles x C)
#pragma omp parallel for collapse(2) num_threads(team) if (inner) schedule(static)
                for (idx xi = 0; xi < 16; ++xi)
                    for (idx jp = 0; jp < cpanels; ++jp) {
                        const T* bp = V + xi * lay.vs + jp * NR * lay.tb;
                        T* m = Mx + xi * K * C + jp * NR;
                        for (idx ip = 0; ip < kpanels; ++ip)
                            gemm_micro_strided(kc, GY + xi * lay.gs + ip * MR, K, bp, m + ip * MR * C, C,
                                               imin(MR, K - ip * MR), imin(NR, C - jp * NR), acc);
                    }
            }
        }
    };
    if (outer) {
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
        for (idx j = 0; j < lay.chunks; ++j) run_chunk(j, buf + omp_get_thread_num() * lay.scratch, false);
    } else {
        for (idx j = 0; j < lay.chunks; ++j) run_chunk(j, buf, true);
    }
    T* sum = part;
    if (lay.chunks > 1) {
        sum = part + lay.chunks * mstride;
        sum_chunks(part, lay.chunks, mstride, sum);
    }
    // an inf or NaN anywhere in V or GY leaves a whole row or column of some
    // plane's sum non-finite (0 * inf is NaN): checking the sums finds it
    if (!all_finite(sum, lay.msize)) return false;
    // gw[k][c][r][s], one k and L channels at a time, through a KRSC staging
    // row (the 3x3 results of L channels land as 9 vectors)
    T* krsc = part + (lay.chunks > 1 ? 0 : mstride);
#pragma omp parallel for num_threads(threads_for(K * C / 1024 + 1)) schedule(static)
    for (idx k = 0; k < K; ++k) {
        for (idx c = 0; c < C; c += L) {
            Vt m[16], out[9];
            for (int xi = 0; xi < 16; ++xi) m[xi] = vload<Vt>(sum + xi * K * C + k * C + c);
            winograd_grad_weight_out<T>(m, out);
            for (int rs = 0; rs < 9; ++rs) vstore(krsc + (k * 9 + rs) * C + c, out[rs]);
        }
    }
    weights_from_krsc(krsc, gw, s);
    return true;
}
