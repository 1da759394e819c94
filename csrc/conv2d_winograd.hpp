// conv2d forward for 3x3, stride-1, undilated, ungrouped layers by Winograd's
// minimal filtering F(2x2, 3x3) (Lavin & Gray's formulation):
//     Y = A^T [ (G g G^T) . (B^T d B) ] A
// for every 2x2 output tile, whose 4x4 input patch is d. The 16 elementwise
// products over all channels become 16 GEMMs, (K x C) x (C x tiles): 2.25x
// fewer multiplications than the direct sum. Accuracy: the transforms only
// add, subtract and halve. Measured in float32 against a float64 conv:
// relative norm error 5.0e-7 on resnet_l3_3x3 and 3.5e-7 on vgg_3x3 (the
// float32 direct sum: 8.3e-7 and 6.1e-7; PyTorch: 2.2e-7).
//
// Work per call: the batch is copied into zero-padded planes (tiles then need
// no bounds checks), the filters are transformed and packed once, and tiles
// are processed in blocks of at most kTileBlock: transform the block's input (V), run
// the 16 GEMMs (M = U V), transform M into y with the bias. Blocks run in
// parallel, each on its own scratch; the reduction order of every output is
// fixed, so results are deterministic for any thread count.

inline bool conv_winograd_applies(const ConvGeom& s) {
    return s.R == 3 && s.S == 3 && s.sh == 1 && s.sw == 1 && s.dh == 1 && s.dw == 1 && s.G == 1;
}

// Where the transforms pay for themselves. Measured against the shifted GEMM
// (batch 8 unless noted, float32, 2 threads, one process). AVX-512: 2.0x
// faster on vgg_3x3 (128 -> 128 at 112x112), 1.25x on resnet_l3_3x3 (256 at
// 14x14), 1.13x at 128 x 28x28; even at 64 -> 64 (1.04x on resnet_l1_3x3,
// 0.87x at 28x28); slower with fewer channels (0.6-0.8x) and with few tiles,
// where the per-call filter transform dominates (batch 1 at 14x14: 0.57x;
// 7x7 maps: 0.92x). With half the vector width the GEMM is slower against
// the transforms, so AVX2 gains sooner: 64 -> 64 runs 1.45-1.6x faster
// (resnet_l1_3x3, 28x28, 14x14, batch 1 at 56x56); 32 -> 32 and 32 -> 64
// are even (0.9-1.1x) and 16 channels slower (0.6-0.8x).
inline bool conv_winograd_pays(const ConvGeom& s) {
    constexpr idx kMinCK = CK_VEC_BYTES == 64 ? 8192 : 4096;
    const idx tiles = s.N * ((s.Ho + 1) / 2) * ((s.Wo + 1) / 2);
    return conv_winograd_applies(s) && s.C >= 32 && s.C * s.K >= kMinCK && tiles >= 256;
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
    WinogradLayout(const ConvGeom& s) {
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
        block_elems = (16 * ((s.C + s.K) * tb + 2 * kPlanePad) + gemm_pack_elems<T>() + 15) / 16 * 16;
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

// The transforms of one tile, on X = T (one tile) or a vector of tiles
// (one per lane), so the vector body and the scalar edges share the math.
// in: d[row][col] of the 4x4 input patch; out[xi] = (B^T d B)[xi]
template <class X>
inline void winograd_in_tile(const X (&d)[4][4], X (&out)[16]) {
    X r[4][4];  // B^T d: rows
    for (int j = 0; j < 4; ++j) {
        r[0][j] = d[0][j] - d[2][j];
        r[1][j] = d[1][j] + d[2][j];
        r[2][j] = d[2][j] - d[1][j];
        r[3][j] = d[1][j] - d[3][j];
    }
    for (int q = 0; q < 4; ++q) {  // (B^T d) B: columns
        out[q * 4 + 0] = r[q][0] - r[q][2];
        out[q * 4 + 1] = r[q][1] + r[q][2];
        out[q * 4 + 2] = r[q][2] - r[q][1];
        out[q * 4 + 3] = r[q][1] - r[q][3];
    }
}

// m[xi] of one tile -> its 2x2 output y = A^T m A
template <class X>
inline void winograd_out_tile(const X (&m)[16], X (&y)[2][2]) {
    X a[2][4];  // A^T m: rows
    for (int j = 0; j < 4; ++j) {
        a[0][j] = m[j] + m[4 + j] + m[8 + j];
        a[1][j] = m[4 + j] - m[8 + j] - m[12 + j];
    }
    for (int r = 0; r < 2; ++r) {
        y[r][0] = a[r][0] + a[r][1] + a[r][2];
        y[r][1] = a[r][1] - a[r][2] - a[r][3];
    }
}

// Lane shuffles for the stride-2 tile layout: even/odd lanes of two vectors
// (tile i's column j is input column 2i + j) and the inverse interleave.
template <class T>
struct WinogradLanes {
    typedef typename Vec<T>::type V;
    static constexpr int L = CK_VEC_BYTES / sizeof(T);
    typedef typename std::conditional<sizeof(T) == 4, int, long long>::type I;
    typedef I M __attribute__((vector_size(CK_VEC_BYTES)));
    M even, odd, lo, hi;
    WinogradLanes() {
        for (int l = 0; l < L; ++l) {
            even[l] = 2 * l;
            odd[l] = 2 * l + 1;
            lo[l] = (l % 2 ? L : 0) + l / 2;
            hi[l] = (l % 2 ? L : 0) + L / 2 + l / 2;
        }
    }
};

// V[xi][c][t - t0] = (B^T d B)[xi] for the tiles t of [t0, t1)
template <class T>
void winograd_input_block(const T* xpad, const ConvGeom& s, const WinogradLayout<T>& lay, idx t0, idx t1, T* V) {
    typedef WinogradLanes<T> WL;
    typedef typename WL::V Vt;
    constexpr int L = WL::L;
    const WL lanes;
    const idx TB = lay.tb, CT = s.C * TB + WinogradLayout<T>::kPlanePad;
    for (idx t = t0; t < t1;) {
        // a run of tiles on one tile row of one image
        const idx n = t / (lay.tH * lay.tW), th = (t / lay.tW) % lay.tH, tw0 = t % lay.tW;
        const idx run = imin(lay.tW - tw0, t1 - t), at = t - t0;
        for (idx c = 0; c < s.C; ++c) {
            const T* p[4];
            p[0] = xpad + (n * s.C + c) * lay.plane + 2 * th * lay.Wp + 2 * tw0;
            for (int r = 1; r < 4; ++r) p[r] = p[r - 1] + lay.Wp;
            T* v = V + c * TB + at;
            idx i = 0;
            // L tiles at a time: a whole group reads at most column 2(run-1)+3 < Wp
            for (; i + L <= run; i += L) {
                Vt d[4][4], out[16];
                for (int r = 0; r < 4; ++r) {
                    const T* q = p[r] + 2 * i;
                    const Vt a0 = vload<Vt>(q), a1 = vload<Vt>(q + L);          // columns 2i .. 2i+2L-1
                    const Vt b0 = vload<Vt>(q + 2), b1 = vload<Vt>(q + 2 + L);  // shifted by 2
                    d[r][0] = __builtin_shuffle(a0, a1, lanes.even);
                    d[r][1] = __builtin_shuffle(a0, a1, lanes.odd);
                    d[r][2] = __builtin_shuffle(b0, b1, lanes.even);
                    d[r][3] = __builtin_shuffle(b0, b1, lanes.odd);
                }
                winograd_in_tile(d, out);
                for (int xi = 0; xi < 16; ++xi) vstore(v + xi * CT + i, out[xi]);
            }
            for (; i < run; ++i) {
                T d[4][4], out[16];
                for (int r = 0; r < 4; ++r)
                    for (int j = 0; j < 4; ++j) d[r][j] = p[r][2 * i + j];
                winograd_in_tile(d, out);
                for (int xi = 0; xi < 16; ++xi) v[xi * CT + i] = out[xi];
            }
        }
        t += run;
    }
}

// y for the tiles of [t0, t1) from M[xi][k][t - t0], plus bias
template <class T>
void winograd_output_block(const T* M, const T* b, const ConvGeom& s, const WinogradLayout<T>& lay, idx t0, idx t1,
                           T* y) {
    typedef WinogradLanes<T> WL;
    typedef typename WL::V Vt;
    constexpr int L = WL::L;
    const WL lanes;
    const idx TB = lay.tb, KT = s.K * TB + WinogradLayout<T>::kPlanePad, P = s.Ho * s.Wo;
    for (idx t = t0; t < t1;) {
        const idx n = t / (lay.tH * lay.tW), th = (t / lay.tW) % lay.tH, tw0 = t % lay.tW;
        const idx run = imin(lay.tW - tw0, t1 - t), at = t - t0;
        const idx ho = 2 * th;
        const int rows = ho + 1 < s.Ho ? 2 : 1;
        for (idx k = 0; k < s.K; ++k) {
            const T* m = M + k * TB + at;
            const T bias = b ? b[k] : T(0);
            T* yr[2] = {y + (n * s.K + k) * P + ho * s.Wo, y + (n * s.K + k) * P + (ho + 1) * s.Wo};
            idx i = 0;
            // L whole tiles at a time while every column they write exists
            for (; i + L <= run && 2 * (tw0 + i + L) <= s.Wo; i += L) {
                Vt mv[16], yv[2][2];
                for (int xi = 0; xi < 16; ++xi) mv[xi] = vload<Vt>(m + xi * KT + i);
                winograd_out_tile(mv, yv);
                for (int r = 0; r < rows; ++r) {
                    const Vt c0 = yv[r][0] + bias, c1 = yv[r][1] + bias;
                    T* out = yr[r] + 2 * (tw0 + i);
                    vstore(out, __builtin_shuffle(c0, c1, lanes.lo));
                    vstore(out + L, __builtin_shuffle(c0, c1, lanes.hi));
                }
            }
            for (; i < run; ++i) {
                T mv[16], yv[2][2];
                for (int xi = 0; xi < 16; ++xi) mv[xi] = m[xi * KT + i];
                winograd_out_tile(mv, yv);
                const idx wo = 2 * (tw0 + i);
                for (int r = 0; r < rows; ++r) {
                    yr[r][wo] = yv[r][0] + bias;
                    if (wo + 1 < s.Wo) yr[r][wo + 1] = yv[r][1] + bias;
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
bool conv2d_forward_winograd(const T* x, const T* w, const T* b, T* y, const ConvGeom& s) {
    note_conv_algo(ConvAlgo::winograd);
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
    int nonfinite = 0;
#pragma omp parallel for num_threads(threads_for(s.N * s.C)) schedule(static) reduction(| : nonfinite)
    for (idx t = 0; t < s.N * s.C; ++t)
        nonfinite |= copy_padded_plane<true>(x + t * s.H * s.W, s.H, s.W, -s.ph, -s.pw, 1, 1, xpad + t * lay.plane,
                                             lay.Hp, lay.Wp, lay.plane);
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
