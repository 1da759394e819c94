// conv2d forward for 3x3, stride-1, undilated, ungrouped layers by Winograd's
// minimal filtering F(2x2, 3x3) (Lavin & Gray's formulation):
//     Y = A^T [ (G g G^T) . (B^T d B) ] A
// for every 2x2 output tile, whose 4x4 input patch is d. The 16 elementwise
// products over all channels become 16 GEMMs, (K x C) x (C x tiles): 2.25x
// fewer multiplications than the direct sum. Accuracy: the transforms only
// add, subtract and halve, so the error stays within a few ulps of the GEMM
// path's (the float32 tests bound it at the usual 1e-5 relative).
//
// Work per call: the batch is copied into zero-padded planes (tiles then need
// no bounds checks), the filters are transformed and packed once, and tiles
// are processed in blocks of at most kTileBlock: transform the block's input (V), run
// the 16 GEMMs (M = U V), transform M into y with the bias. Blocks run in
// parallel, each on its own scratch; the reduction order of every output is
// fixed, so results are deterministic for any thread count.

inline bool conv_winograd_applies(const ConvShape& s) {
    return s.R == 3 && s.S == 3 && s.sh == 1 && s.sw == 1 && s.dh == 1 && s.dw == 1 && s.G == 1;
}

// Where the transforms pay for themselves. Measured against the shifted GEMM
// (batch 8, float32, AVX-512, 2 threads): 1.8x faster on vgg_3x3 (128 -> 128
// at 112x112), 1.4x on resnet_l3_3x3 (256 at 14x14), 1.3-1.4x at 256 x 28x28,
// 128 x 56x56 and 64 -> 128 x 56x56, 1.06-1.16x at 96-128 channels x 28x28;
// slower with 64 -> 64 channels (0.93x, resnet_l1_3x3), 32 -> 64 (0.8x), and
// with few tiles, where the per-call filter transform dominates (batch 1 at
// 14x14: 0.82x; 7x7 maps: 0.92x).
inline bool conv_winograd_pays(const ConvShape& s) {
    const idx tiles = s.N * ((s.Ho + 1) / 2) * ((s.Wo + 1) / 2);
    return conv_winograd_applies(s) && s.C >= 32 && s.C * s.K >= 8192 && tiles >= 256;
}

template <class T>
struct WinogradLayout {
    static constexpr idx kTileBlock = 256;  // tiles per block, at most
    // the 16 planes of V and M are written and read together: a stride of a
    // multiple of 4 KiB would put all 16 streams in one cache set
    static constexpr idx kPlanePad = 16;
    idx tH, tW, tiles;  // 2x2 output tiles per image row/column, and in the batch
    idx Hp, Wp, plane;  // padded input plane: tile (th, tw) reads rows 2th.., columns 2tw..
    idx x_elems;        // padded batch
    idx tb, blocks;     // tiles per block, blocks: whole rounds of the threads where possible
    idx block_elems;    // one block's V (16 x C x tb) + M (16 x K x tb) + GEMM packing
    WinogradLayout(const ConvShape& s) {
        tH = (s.Ho + 1) / 2;
        tW = (s.Wo + 1) / 2;
        tiles = s.N * tH * tW;
        Hp = 2 * tH + 2;
        Wp = 2 * tW + 2;
        plane = Hp * Wp;
        x_elems = (s.N * s.C * plane + 15) / 16 * 16;
        const idx nt = num_threads();
        blocks = (tiles + kTileBlock - 1) / kTileBlock;
        if (blocks % nt && tiles >= nt * 32) blocks += nt - blocks % nt;
        tb = (tiles + blocks - 1) / blocks;
        blocks = (tiles + tb - 1) / tb;
        block_elems = (16 * ((s.C + s.K) * tb + 2 * kPlanePad) + GemmBlocking<T>::pack_elems + 15) / 16 * 16;
    }
};

// U[xi] (K x C) at U + xi * us, from g (K, C, 3, 3): U = G g G^T
template <class T>
void winograd_filters(const T* w, idx K, idx C, T* U, idx us) {
#pragma omp parallel for num_threads(threads_for(K)) schedule(static)
    for (idx k = 0; k < K; ++k)
        for (idx c = 0; c < C; ++c) {
            const T* g = w + (k * C + c) * 9;
            T u[4][3];  // G g
            for (int j = 0; j < 3; ++j) {
                u[0][j] = g[j];
                u[1][j] = T(0.5) * (g[j] + g[3 + j] + g[6 + j]);
                u[2][j] = T(0.5) * (g[j] - g[3 + j] + g[6 + j]);
                u[3][j] = g[6 + j];
            }
            for (int i = 0; i < 4; ++i) {  // (G g) G^T
                const T v[4] = {u[i][0], T(0.5) * (u[i][0] + u[i][1] + u[i][2]), T(0.5) * (u[i][0] - u[i][1] + u[i][2]),
                                u[i][2]};
                for (int j = 0; j < 4; ++j) U[(i * 4 + j) * us + k * C + c] = v[j];
            }
        }
}

// V[xi][c][t - t0] = (B^T d B)[xi] for the tiles t of [t0, t1)
template <class T>
void winograd_input_block(const T* xpad, const ConvShape& s, const WinogradLayout<T>& lay, idx t0, idx t1, T* V) {
    const idx TB = lay.tb, CT = s.C * TB + WinogradLayout<T>::kPlanePad;
    for (idx t = t0; t < t1;) {
        // a run of tiles on one tile row of one image
        const idx n = t / (lay.tH * lay.tW), th = (t / lay.tW) % lay.tH, tw0 = t % lay.tW;
        const idx run = imin(lay.tW - tw0, t1 - t), at = t - t0;
        for (idx c = 0; c < s.C; ++c) {
            const T* __restrict p0 = xpad + (n * s.C + c) * lay.plane + 2 * th * lay.Wp + 2 * tw0;
            const T* __restrict p1 = p0 + lay.Wp;
            const T* __restrict p2 = p1 + lay.Wp;
            const T* __restrict p3 = p2 + lay.Wp;
            T* __restrict v = V + c * TB + at;
            // one tile per i; the loop vectorizes across tiles (stride-2 loads)
            for (idx i = 0; i < run; ++i) {
                const idx o = 2 * i;
                T r[4][4];  // B^T d: rows
                for (int j = 0; j < 4; ++j) {
                    const T a0 = p0[o + j], a1 = p1[o + j], a2 = p2[o + j], a3 = p3[o + j];
                    r[0][j] = a0 - a2;
                    r[1][j] = a1 + a2;
                    r[2][j] = a2 - a1;
                    r[3][j] = a1 - a3;
                }
                for (int q = 0; q < 4; ++q) {  // (B^T d) B: columns
                    v[(q * 4 + 0) * CT + i] = r[q][0] - r[q][2];
                    v[(q * 4 + 1) * CT + i] = r[q][1] + r[q][2];
                    v[(q * 4 + 2) * CT + i] = r[q][2] - r[q][1];
                    v[(q * 4 + 3) * CT + i] = r[q][1] - r[q][3];
                }
            }
        }
        t += run;
    }
}

// y for the tiles of [t0, t1) from M[xi][k][t - t0]: Y = A^T m A, plus bias
template <class T>
void winograd_output_block(const T* M, const T* b, const ConvShape& s, const WinogradLayout<T>& lay, idx t0, idx t1,
                           T* y) {
    const idx TB = lay.tb, KT = s.K * TB + WinogradLayout<T>::kPlanePad, P = s.Ho * s.Wo;
    for (idx t = t0; t < t1;) {
        const idx n = t / (lay.tH * lay.tW), th = (t / lay.tW) % lay.tH, tw0 = t % lay.tW;
        const idx run = imin(lay.tW - tw0, t1 - t), at = t - t0;
        const idx ho = 2 * th;
        const bool two_rows = ho + 1 < s.Ho;
        for (idx k = 0; k < s.K; ++k) {
            const T* m = M + k * TB + at;
            const T bias = b ? b[k] : T(0);
            T* y0 = y + (n * s.K + k) * P + ho * s.Wo;
            T* y1 = y0 + s.Wo;
            for (idx i = 0; i < run; ++i) {
                T a[2][4];
                for (int j = 0; j < 4; ++j) {  // A^T m: rows
                    const T m0 = m[(0 + j) * KT + i], m1 = m[(4 + j) * KT + i], m2 = m[(8 + j) * KT + i],
                            m3 = m[(12 + j) * KT + i];
                    a[0][j] = m0 + m1 + m2;
                    a[1][j] = m1 - m2 - m3;
                }
                const idx wo = 2 * (tw0 + i);
                const bool two_cols = wo + 1 < s.Wo;
                y0[wo] = a[0][0] + a[0][1] + a[0][2] + bias;
                if (two_cols) y0[wo + 1] = a[0][1] - a[0][2] - a[0][3] + bias;
                if (two_rows) {
                    y1[wo] = a[1][0] + a[1][1] + a[1][2] + bias;
                    if (two_cols) y1[wo + 1] = a[1][1] - a[1][2] - a[1][3] + bias;
                }
            }
        }
        t += run;
    }
}

// Returns false, having written nothing to y, if x or w holds an inf or NaN:
// the transforms subtract inputs, so an inf there can become a NaN where the
// direct sum gives +-inf; the caller then takes another algorithm.
template <class T>
bool conv2d_forward_winograd(const T* x, const T* w, const T* b, T* y, const ConvShape& s) {
    const WinogradLayout<T> lay(s);
    const idx TB = lay.tb;
    // workspace slot 1: padded batch, then the packed transformed filters
    const idx upk_elems = packed_a_elems<T>(s.K, s.C);
    const idx us = s.K * s.C + WinogradLayout<T>::kPlanePad;
    T* xpad = static_cast<T*>(
        workspace(static_cast<std::size_t>(lay.x_elems + 16 * upk_elems + 16 * us) * sizeof(T), 1));
    T* Upk = xpad + lay.x_elems;
    T* U = Upk + 16 * upk_elems;
    // tile (th, tw) of the padded plane starts at row 2th, column 2tw: input
    // row h sits at padded row h + ph (rows past the input stay zero)
    const idx h1 = imin(s.H, lay.Hp - s.ph), w1 = imin(s.W, lay.Wp - s.pw);
    const idx h0 = imax(0, -s.ph), w0 = imax(0, -s.pw);
    int nonfinite = 0;  // v - v is 0 for finite v, NaN otherwise: a branch-free test fused with the copy
#pragma omp parallel for num_threads(threads_for(s.N * s.C)) schedule(static) reduction(| : nonfinite)
    for (idx t = 0; t < s.N * s.C; ++t) {
        T* dst = xpad + t * lay.plane;
        std::memset(dst, 0, static_cast<std::size_t>(lay.plane) * sizeof(T));
        for (idx h = h0; h < h1; ++h) {
            const T* src = x + t * s.H * s.W + h * s.W;
            T* row = dst + (h + s.ph) * lay.Wp + s.pw;
            int bad = 0;
            for (idx j = w0; j < w1; ++j) {
                row[j] = src[j];
                bad |= !(src[j] - src[j] == T(0));
            }
            nonfinite |= bad;
        }
    }
    // (padding is never negative and Hp, Wp cover the input, so the copy saw all of x)
    for (idx i = 0; i < s.K * s.C * 9; ++i) nonfinite |= !(w[i] - w[i] == T(0));
    if (nonfinite) return false;
    winograd_filters(w, s.K, s.C, U, us);
    for (int xi = 0; xi < 16; ++xi) pack_a_full(s.K, s.C, U + xi * us, s.C, idx(1), Upk + xi * upk_elems);

    const idx blocks = lay.blocks;
    const int nt = num_threads();
    const bool outer = nt > 1 && blocks >= nt;  // else: one block at a time, GEMMs on all threads
    T* scratch = static_cast<T*>(workspace(static_cast<std::size_t>((outer ? nt : 1) * lay.block_elems) * sizeof(T), 0));
    auto run_block = [&](idx blk, T* sc, bool inner) {
        const idx t0 = blk * TB, t1 = imin(lay.tiles, t0 + TB), nb = t1 - t0;
        const idx VS = s.C * TB + WinogradLayout<T>::kPlanePad, MS = s.K * TB + WinogradLayout<T>::kPlanePad;
        T* V = sc;
        T* M = V + 16 * VS;
        T* pack = M + 16 * MS;
        winograd_input_block(xpad, s, lay, t0, t1, V);
        for (int xi = 0; xi < 16; ++xi)
            gemm_blocked(s.K, nb, s.C, U + xi * us, s.C, idx(1), V + xi * VS, TB, idx(1), M + xi * MS, TB,
                         false, pack, inner, Upk + xi * upk_elems);
        winograd_output_block(M, b, s, lay, t0, t1, y);
    };
    if (outer) {
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
        for (idx blk = 0; blk < blocks; ++blk) run_block(blk, scratch + omp_get_thread_num() * lay.block_elems, false);
    } else {
        for (idx blk = 0; blk < blocks; ++blk) run_block(blk, scratch, true);
    }
    return true;
}
