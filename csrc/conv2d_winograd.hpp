// conv2d forward for 3x3, stride-1, undilated, ungrouped layers by Winograd's
// minimal filtering F(m x m, 3x3) (Lavin & Gray's formulation):
//     Y = A^T [ (G g G^T) . (B^T d B) ] A
// for every m x m output tile, whose (m+2) x (m+2) input patch is d. The
// (m+2)^2 elementwise products over all channels become (m+2)^2 GEMMs,
// (K x C) x (C x tiles). Two tile sizes:
// - F(2x2, 3x3), algo "winograd": 16 GEMMs, 2.25x fewer multiplications than
//   the direct sum. Its transforms only add, subtract and halve. Measured in
//   float32 against a float64 conv: relative norm error 5.0e-7 on
//   resnet_l3_3x3 and 3.5e-7 on vgg_3x3 (the float32 direct sum: 8.3e-7 and
//   6.1e-7; PyTorch: 2.2e-7).
// - F(4x4, 3x3), algo "winograd4": 36 GEMMs, 4x fewer multiplications, and
//   per output a smaller transformed tensor to write and read. Its transforms
//   scale by up to 8 (and the filters' by 1/24), so float32 rounding grows:
//   the error is measured in docs/performance.md, and "auto" takes it only
//   where the autotuner measured it fastest.
//
// Work per call: the batch is copied into zero-padded planes (tiles then need
// no bounds checks), the filters are transformed and packed once, and tiles
// are processed in blocks of at most kTileBlock: transform the block's input
// (V), run the GEMMs (M = U V), transform M into y with the bias. Blocks run
// in parallel, each on its own scratch; the reduction order of every output
// is fixed, so results are deterministic for any thread count.

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

// M: the output tile's side (2 or 4)
template <class T, int M = 2>
struct WinogradLayout {
    static constexpr int kSide = M + 2;           // the input patch's side
    static constexpr int kXi = kSide * kSide;     // transformed planes: GEMMs per block
    static constexpr idx kTileBlock = 512 / M;    // tiles per block, at most
    // the planes of V and M are written and read together: a stride of a
    // multiple of 4 KiB would put all their streams in one cache set
    static constexpr idx kPlanePad = 16;
    idx tH, tW, tiles;  // M x M output tiles per image row/column, and in the batch
    idx Hp, Wp, plane;  // padded input plane: tile (th, tw) reads rows M th.., columns M tw..
    idx x_elems;        // padded batch
    idx tb, blocks;     // tiles per block, blocks: whole rounds of the threads where possible
    idx block_elems;    // one block's V (kXi x C x tb) + M (kXi x K x tb) + GEMM packing
    WinogradLayout(const ConvGeom& s) {
        tH = (s.Ho + M - 1) / M;
        tW = (s.Wo + M - 1) / M;
        tiles = s.N * tH * tW;
        Hp = M * tH + 2;
        // F(4x4)'s vector loads reach M columns past a run's last patch
        Wp = M * tW + (M == 2 ? 2 : 4);
        plane = Hp * Wp;
        // the last group of a run is computed in whole vectors: its loads may
        // reach up to 4 vectors past the last plane
        x_elems = (s.N * s.C * plane + 4 * 16 + 15) / 16 * 16;
        const idx nt = num_threads();
        blocks = (tiles + kTileBlock - 1) / kTileBlock;
        if (blocks % nt && tiles >= nt * 32) blocks += nt - blocks % nt;
        tb = (tiles + blocks - 1) / blocks;
        blocks = (tiles + tb - 1) / tb;
        block_elems = (kXi * ((s.C + s.K) * tb + 2 * kPlanePad) + gemm_pack_elems<T>() + 15) / 16 * 16;
    }
    // the workspace one call takes besides its per-thread blocks
    idx fixed_elems(const ConvGeom& s) const { return x_elems + idx(kXi) * ((s.K + 16) * s.C + kPlanePad); }
};

// G applied to three taps: r[j * stride] for the M + 2 rows of G. F(4x4)'s G
// holds sixths, twelfths and 24ths: multiplied, not divided (a few times
// faster per call; the rounding of 1/6 is far below the transforms' own).
template <int M, class T>
inline void winograd_g_1d(T g0, T g1, T g2, T* r, int stride) {
    if constexpr (M == 2) {
        r[0] = g0;
        r[stride] = T(0.5) * (g0 + g1 + g2);
        r[2 * stride] = T(0.5) * (g0 - g1 + g2);
        r[3 * stride] = g2;
    } else {
        constexpr T kSixth = T(1) / T(6), k12th = T(1) / T(12), k24th = T(1) / T(24);
        r[0] = T(0.25) * g0;
        r[stride] = -kSixth * (g0 + g1 + g2);
        r[2 * stride] = -kSixth * (g0 - g1 + g2);
        r[3 * stride] = k24th * g0 + k12th * g1 + kSixth * g2;
        r[4 * stride] = k24th * g0 - k12th * g1 + kSixth * g2;
        r[5 * stride] = g2;
    }
}

// W filters' transforms side by side, u = G g G^T, (M+2) x (M+2) from g
// (3x3), lane i of each array being filter i: loops over the lanes, which
// the compiler turns into vector code.
template <int M, class T, int W>
inline void winograd_filter_tiles(const T (&g)[9][W], T (&u)[(M + 2) * (M + 2)][W]) {
    constexpr int A = M + 2;
    T gg[A * 3][W];  // G g, row-major
    T r[A];
    for (int j = 0; j < 3; ++j)
        for (int i = 0; i < W; ++i) {
            winograd_g_1d<M>(g[j][i], g[3 + j][i], g[6 + j][i], r, 1);
            for (int a = 0; a < A; ++a) gg[a * 3 + j][i] = r[a];
        }
    for (int a = 0; a < A; ++a)  // (G g) G^T
        for (int i = 0; i < W; ++i) {
            winograd_g_1d<M>(gg[a * 3][i], gg[a * 3 + 1][i], gg[a * 3 + 2][i], r, 1);
            for (int b = 0; b < A; ++b) u[a * A + b][i] = r[b];
        }
}

// The transformed filters U[xi] = (G g G^T)[xi] from g (K, C, 3, 3) (tap j
// of filter k, channel c at w[k * 9 * C + c * cs + j * js]: cs = 9, js = 1
// for (K, C, 3, 3) memory, cs = 1, js = C for (K, 3, 3, C)),
// written straight into a GEMM's packed panel layout at Upk + xi * upk: for
// each KC block of C, W-wide panels of the K filters, a channel's W values
// contiguous (pack_a_full's A panels of K x C with W = MR; gemm_rows' B
// panels of C x K with W = NR). U itself is never stored, which halves the
// per-call filter traffic. A panel's W filters of one channel go at a time,
// so each transformed value is one W-long run (16 or 36 runs per step)
// rather than XI single floats a matrix apart per filter.
// Channels go L (a vector's lanes) at a time. A whole panel's block of L
// channels is 9 L-long runs of each filter's row (9L consecutive values for
// (K, C, 3, 3) memory, one run of L channels per tap for (K, 3, 3, C)): L x L
// tiles of those rows are transposed in registers into g's layout, where
// gathering the W x 9 values of each channel one by one cost three times
// the transform's arithmetic. Other blocks (the last panel's filters past
// K, channels past the last whole L) take the element loop.
template <class T, int M, int W>
void winograd_filter_panels(const T* w, idx K, idx C, idx cs, idx js, idx KC, T* Upk, idx upk) {
    constexpr int XI = (M + 2) * (M + 2);
    constexpr idx L = CK_VEC_BYTES / sizeof(T);
    const idx panels = (K + W - 1) / W, Kpad = panels * W, blocks = (C + L - 1) / L;
    const bool kcrs = cs == 9 && js == 1, krsc = cs == 1 && js == C;
    const bool tiled = W % L == 0 && (kcrs || krsc);
    const auto store = [&](idx kp, idx c, const T (&g)[9][W]) {
        T u[XI][W];
        winograd_filter_tiles<M>(g, u);
        const idx pc = c / KC * KC, kc = imin(KC, C - pc);
        T* dst = Upk + pc * Kpad + kp * W * kc + (c - pc) * W;
        for (int xi = 0; xi < XI; ++xi) std::memcpy(dst + xi * upk, u[xi], sizeof u[xi]);
    };
#pragma omp parallel for collapse(2) num_threads(threads_for(panels * blocks)) schedule(static)
    for (idx kp = 0; kp < panels; ++kp)
        for (idx cb = 0; cb < blocks; ++cb) {
            const idx c0 = cb * L, c1 = imin(C, c0 + L);
            T g[9][W];
            if (tiled && (kp + 1) * W <= K && c1 - c0 == L) {
                // flat[q][i]: filter kp*W + i's value q of the block, q = (c - c0) * 9 + j
                // for (K, C, 3, 3) memory, j * L + (c - c0) for (K, 3, 3, C)
                alignas(64) T flat[9 * L][W];
                const T* base = w + kp * W * 9 * C;
                for (idx i0 = 0; i0 < W; i0 += L)
                    for (idx t = 0; t < 9; ++t)
                        transpose_tile(base + i0 * 9 * C + (kcrs ? c0 * 9 + t * L : t * C + c0), 9 * C,
                                       &flat[t * L][i0], idx(W));
                for (idx cl = 0; cl < L; ++cl) {
                    for (int j = 0; j < 9; ++j)
                        std::memcpy(g[j], flat[kcrs ? cl * 9 + j : j * L + cl], sizeof g[j]);
                    store(kp, c0 + cl, g);
                }
                continue;
            }
            for (idx c = c0; c < c1; ++c) {
                for (int i = 0; i < W; ++i) {
                    const idx k = kp * W + i;  // filters past K pad the last panel with zeros
                    for (int j = 0; j < 9; ++j) g[j][i] = k < K ? w[k * 9 * C + c * cs + j * js] : T(0);
                }
                store(kp, c, g);
            }
        }
}

// U[xi] as K x C matrices in the packed GEMM's A layout
template <class T, int M = 2>
void winograd_filters(const T* w, idx K, idx C, T* Upk, idx upk) {
    winograd_filter_panels<T, M, GemmBlocking<T>::MR>(w, K, C, idx(9), idx(1), gemm_dims<T>().kc, Upk, upk);
}

// The transforms of one tile, on X = T (one tile) or a vector of tiles
// (one per lane), so the vector body and the scalar edges share the math.
// in: d[row][col] of the 4x4 input patch; out[xi] = (B^T d B)[xi]
template <class T, class X>
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
template <class T, class X>
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

// The first n lanes of v to p: all of them, some, or (n <= 0) none.
template <class T, class V>
inline void store_cols(T* p, const V& v, idx n) {
    constexpr idx L = sizeof(V) / sizeof(T);
    if (n >= L)
        vstore(p, v);
    else if (n > 0)
        vstore_first(p, v, n);
}

// F(2x2)'s per-tile pieces for the generic blocks below (F(4x4)'s are in
// conv2d_winograd4.hpp): the 4 patch columns of L tiles from one input row
// (q: the first tile's patch; tile i's column j is column 2i + j) ...
template <class T, class Vt>
inline void winograd_patch_row(const T* q, const WinogradLanes<T>& lanes, Vt (&d)[4]) {
    constexpr int L = WinogradLanes<T>::L;
    const Vt a0 = vload<Vt>(q), a1 = vload<Vt>(q + L);          // columns 0 .. 2L-1
    const Vt b0 = vload<Vt>(q + 2), b1 = vload<Vt>(q + 2 + L);  // shifted by 2
    d[0] = __builtin_shuffle(a0, a1, lanes.even);
    d[1] = __builtin_shuffle(a0, a1, lanes.odd);
    d[2] = __builtin_shuffle(b0, b1, lanes.even);
    d[3] = __builtin_shuffle(b0, b1, lanes.odd);
}

// ... and one output row of L tiles (c[j]: column j of each) back in column
// order, the first `cols` columns stored
template <class T, class Vt>
inline void winograd_store_row(T* out, const Vt (&c)[2], const WinogradLanes<T>& lanes, idx cols) {
    constexpr int L = WinogradLanes<T>::L;
    store_cols(out, __builtin_shuffle(c[0], c[1], lanes.lo), cols);
    store_cols(out + L, __builtin_shuffle(c[0], c[1], lanes.hi), cols - L);
}

#include "conv2d_winograd4.hpp"

// V[xi][c][t - t0] = (B^T d B)[xi] for the tiles t of [t0, t1), L tiles at a
// time; the last group of a run computes lanes past it too (they read the
// next rows or the padded batch's slack) and does not store them.
template <class T, int M>
void winograd_input_block(const T* xpad, const ConvGeom& s, const WinogradLayout<T, M>& lay, idx t0, idx t1, T* V) {
    typedef WinogradLanes<T> WL;
    typedef typename WL::V Vt;
    constexpr int L = WL::L, A = M + 2, XI = A * A;
    const WL lanes;
    const idx TB = lay.tb, CT = s.C * TB + WinogradLayout<T, M>::kPlanePad;
    for (idx t = t0; t < t1;) {
        // a run of tiles on one tile row of one image
        const idx n = t / (lay.tH * lay.tW), th = (t / lay.tW) % lay.tH, tw0 = t % lay.tW;
        const idx run = imin(lay.tW - tw0, t1 - t), at = t - t0;
        for (idx c = 0; c < s.C; ++c) {
            const T* p = xpad + (n * s.C + c) * lay.plane + M * th * lay.Wp + M * tw0;
            T* v = V + c * TB + at;
            for (idx i = 0; i < run; i += L) {
                Vt d[A][A], out[XI];
                for (int r = 0; r < A; ++r) winograd_patch_row(p + r * lay.Wp + M * i, lanes, d[r]);
                winograd_in_tile<T>(d, out);
                if (i + L <= run)
                    for (int xi = 0; xi < XI; ++xi) vstore(v + xi * CT + i, out[xi]);
                else
                    for (int xi = 0; xi < XI; ++xi) vstore_first(v + xi * CT + i, out[xi], run - i);
            }
        }
        t += run;
    }
}

// y for the tiles of [t0, t1) from Mt[xi][k][t - t0], plus bias, L tiles at a
// time; of the last group of a run only the columns that exist are stored
// (its lanes past the run read Mt's padding).
template <class T, int M>
void winograd_output_block(const T* Mt, const T* b, const ConvGeom& s, const WinogradLayout<T, M>& lay, idx t0,
                           idx t1, T* y) {
    typedef WinogradLanes<T> WL;
    typedef typename WL::V Vt;
    constexpr int L = WL::L, XI = (M + 2) * (M + 2);
    const WL lanes;
    const idx TB = lay.tb, KT = s.K * TB + WinogradLayout<T, M>::kPlanePad, P = s.Ho * s.Wo;
    for (idx t = t0; t < t1;) {
        const idx n = t / (lay.tH * lay.tW), th = (t / lay.tW) % lay.tH, tw0 = t % lay.tW;
        const idx run = imin(lay.tW - tw0, t1 - t), at = t - t0;
        const idx ho = M * th;
        const int rows = static_cast<int>(imin(M, s.Ho - ho));
        for (idx k = 0; k < s.K; ++k) {
            const T* m = Mt + k * TB + at;
            const T bias = b ? b[k] : T(0);
            T* yk = y + (n * s.K + k) * P + ho * s.Wo;
            for (idx i = 0; i < run; i += L) {
                Vt mv[XI], yv[M][M];
                for (int xi = 0; xi < XI; ++xi) mv[xi] = vload<Vt>(m + xi * KT + i);
                winograd_out_tile<T>(mv, yv);
                const idx cols = imin(M * (run - i), s.Wo - M * (tw0 + i));
                for (int r = 0; r < rows; ++r) {
                    Vt c[M];
                    for (int j = 0; j < M; ++j) c[j] = yv[r][j] + bias;
                    winograd_store_row(yk + r * s.Wo + M * (tw0 + i), c, lanes, cols);
                }
            }
        }
        t += run;
    }
}

// Returns false, having written nothing to y, if x or w holds an inf or NaN:
// the transforms subtract inputs, so an inf there can become a NaN where the
// direct sum gives +-inf; the caller then takes another algorithm.
template <class T, int M = 2>
bool conv2d_forward_winograd(const T* x, const T* w, const T* b, T* y, const ConvGeom& s) {
    typedef WinogradLayout<T, M> Lay;
    constexpr int XI = Lay::kXi;
    note_conv_algo(M == 2 ? ConvAlgo::winograd : ConvAlgo::winograd4);
    const Lay lay(s);
    const idx TB = lay.tb;
    // workspace slot 1: padded batch, then the packed transformed filters
    // (each padded so that the XI streams do not share cache sets)
    const idx upk_elems = packed_a_elems<T>(s.K, s.C) + Lay::kPlanePad;
    T* xpad = static_cast<T*>(workspace(static_cast<std::size_t>(lay.x_elems + XI * upk_elems) * sizeof(T), 1));
    T* Upk = xpad + lay.x_elems;
    // tile (th, tw) of the padded plane starts at row M th, column M tw: input
    // row h sits at padded row h + ph (rows past the input stay zero)
    int nonfinite = 0;
#pragma omp parallel for num_threads(threads_for(s.N * s.C)) schedule(static) reduction(| : nonfinite)
    for (idx t = 0; t < s.N * s.C; ++t)
        nonfinite |= copy_padded_plane<true>(x + t * s.H * s.W, s.H, s.W, -s.ph, -s.pw, 1, 1, xpad + t * lay.plane,
                                             lay.Hp, lay.Wp, lay.plane);
    // (padding is never negative and Hp, Wp cover the input, so the copy saw all of x)
    if (nonfinite || !all_finite(w, s.K * s.C * 9)) return false;
    winograd_filters<T, M>(w, s.K, s.C, Upk, upk_elems);

    const idx blocks = lay.blocks;
    const int nt = num_threads();
    const bool outer = nt > 1 && blocks >= nt;  // else: one block at a time, GEMMs on all threads
    T* scratch = static_cast<T*>(workspace(static_cast<std::size_t>((outer ? nt : 1) * lay.block_elems) * sizeof(T), 0));
    auto run_block = [&](idx blk, T* sc, bool inner) {
        const idx t0 = blk * TB, t1 = imin(lay.tiles, t0 + TB), nb = t1 - t0;
        const idx VS = s.C * TB + Lay::kPlanePad, MS = s.K * TB + Lay::kPlanePad;
        T* V = sc;
        T* Mt = V + XI * VS;
        T* pack = Mt + XI * MS;
        winograd_input_block(xpad, s, lay, t0, t1, V);
        for (int xi = 0; xi < XI; ++xi)
            gemm_blocked(s.K, nb, s.C, static_cast<const T*>(nullptr), s.C, idx(1), V + xi * VS, TB, idx(1),
                         Mt + xi * MS, TB, false, pack, inner, Upk + xi * upk_elems);
        winograd_output_block(Mt, b, s, lay, t0, t1, y);
    };
    if (outer) {
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
        for (idx blk = 0; blk < blocks; ++blk) run_block(blk, scratch + omp_get_thread_num() * lay.block_elems, false);
    } else {
        for (idx blk = 0; blk < blocks; ++blk) run_block(blk, scratch, true);
    }
    return true;
}
