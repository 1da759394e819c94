// Packed, cache-blocked GEMM: C(M,N) = A(M,K) * B(K,N) [+ C].
//
// BLIS-style loop nest: B is packed into KC x NR column panels, A into MC x KC
// blocks of MR-row panels, and an MR x NR register-tiled micro-kernel written
// with GCC vector extensions does the arithmetic, so the same source becomes
// SSE2, AVX2+FMA or AVX-512 code depending on how this TU is compiled.
// A and B are read through (row stride, column stride) pairs, so transposed
// operands cost nothing extra: packing absorbs the layout.
//
// Determinism: each C element is reduced over K in a fixed order (KC blocks in
// sequence), whatever the thread count, so results are bit-identical across
// thread counts.

template <class T>
struct GemmBlocking {
    typedef typename Vec<T>::type V;
    static constexpr int L = CK_VEC_BYTES / sizeof(T);  // lanes per vector
    // MR x 2 accumulator vectors + 2 B vectors + 1 broadcast must fit the
    // register file: 32 zmm with AVX-512, 16 ymm/xmm otherwise.
    static constexpr int MR = CK_VEC_BYTES == 64 ? 12 : 6;
    static constexpr int NR = 2 * L;
};

// The cache blocking of gemm_blocked, in elements, after BLIS's analytical
// model:
// - KC: the B micro-panel (KC x NR) is reused by every A micro-panel of an MC
//   block, so it must stay in L1 while they stream through: the largest
//   multiple of 16 for which the A and B micro-panels fill separate ways of
//   L1 with one way to spare (C's tile and the stack);
// - MC: the packed A block (MC x KC), reread for every B micro-panel, stays
//   in half of L2 (gemm_block takes fewer rows where C is wide);
// - NC: the packed B block (KC x NC), reread for every A block, stays in half
//   of L3 (and at most 4 MiB: it is per-thread workspace in the conv drivers).
struct GemmDims {
    idx kc, mc, nc;
};

template <class T>
idx l1_kc(const CacheSizes& c) {
    typedef GemmBlocking<T> GB;
    const idx sz = static_cast<idx>(sizeof(T)), ways = imax(2, c.ways[0]), way = imax(1, c.l1d / ways);
    const auto ways_of = [way](idx bytes) { return (bytes + way - 1) / way; };
    idx kc = 64;
    for (idx k = 64; k <= 1024; k += 16)
        if (ways_of(GB::MR * k * sz) + ways_of(GB::NR * k * sz) <= ways - 1) kc = k;
    return kc;
}

// kc > 0: MC and NC for that KC (the tuner's candidates)
template <class T>
GemmDims derive_gemm_dims(const CacheSizes& c, idx kc = 0) {
    typedef GemmBlocking<T> GB;
    const idx sz = static_cast<idx>(sizeof(T));
    GemmDims d;
    d.kc = kc > 0 ? kc : l1_kc<T>(c);
    d.mc = imax(4 * GB::MR, imin(240 * GB::MR, c.l2 / 2 / (d.kc * sz) / GB::MR * GB::MR));
    const idx nc_cap = (idx(4) << 20) / (d.kc * sz);
    d.nc = imax(8 * GB::NR, imin(nc_cap, c.l3 / 2 / (d.kc * sz)) / GB::NR * GB::NR);
    return d;
}

// The blocking the setting (see gemm_blocking_setting) gives for T.
template <class T>
GemmDims resolve_gemm_dims(bool freeze, BlockingSource* source) {
    typedef GemmBlocking<T> GB;
    idx o[3];
    const BlockingSource src = gemm_blocking_setting(sizeof(T) == 8, freeze, o);
    if (source) *source = src;
    if (src == BlockingSource::caches) return derive_gemm_dims<T>(cache_sizes());
    // whole register panels per block: packed A is addressed by panel
    return GemmDims{o[0], imax(GB::MR, o[1] / GB::MR * GB::MR), imax(GB::NR, o[2] / GB::NR * GB::NR)};
}

// What gemm_blocked uses, fixed for the process at first use, so workspace
// sized with it before a call matches what the call uses.
template <class T>
const GemmDims& gemm_dims() {
    static const GemmDims d = resolve_gemm_dims<T>(true, nullptr);
    return d;
}

// elements of packing workspace one gemm_blocked call needs
template <class T>
idx gemm_pack_elems() {
    const GemmDims& d = gemm_dims<T>();
    return d.mc * d.kc + d.kc * d.nc + 64;
}

// Ap: panels of MR rows, k-major inside a panel; rows past mc are zero.
template <class T>
inline void pack_a_panel(idx kc, idx rows, const T* A, idx rsa, idx csa, T* Ap) {
    constexpr int MR = GemmBlocking<T>::MR;
    if (csa == 1) {  // row-major A
        idx k0 = 0;
        if constexpr (MR <= GemmBlocking<T>::L) {
            // L columns at a time: the rows' vectors (zero past `rows`)
            // transposed in registers, each column's first MR lanes stored
            typedef typename GemmBlocking<T>::V V;
            constexpr int L = GemmBlocking<T>::L;
            // Each column is stored whole, its lanes past MR landing where
            // the next column's store overwrites them; only the panel's last
            // column is masked (a masked store is microcoded on some cores).
            for (; k0 + L <= kc; k0 += L) {
                V r[L];
#pragma GCC unroll 16
                for (int i = 0; i < L; ++i) r[i] = i < rows ? vload<V>(A + i * rsa + k0) : V{};
                transpose_regs<T>(r);
#pragma GCC unroll 16
                for (int j = 0; j < L - 1; ++j) vstore(Ap + (k0 + j) * MR, r[j]);
                if (k0 + L < kc)
                    vstore(Ap + (k0 + L - 1) * MR, r[L - 1]);
                else
                    vstore_first(Ap + (k0 + L - 1) * MR, r[L - 1], MR);
            }
        }
        for (idx i = 0; i < rows; ++i)
            for (idx k = k0; k < kc; ++k) Ap[k * MR + i] = A[i * rsa + k];
        for (idx i = rows; i < MR; ++i)
            for (idx k = k0; k < kc; ++k) Ap[k * MR + i] = T(0);
        return;
    }
    if (rsa == 1 && rows > 0) {  // column-major A (a transposed operand, e.g. grad_output in a weight gradient)
        // each k's rows are contiguous: one masked vector copy per k
        if constexpr (MR <= GemmBlocking<T>::L) {
            // whole stores but the last, as above
            for (idx k = 0; k + 1 < kc; ++k) vstore(Ap + k * MR, vload_first(A + k * csa, rows));
            vstore_first(Ap + (kc - 1) * MR, vload_first(A + (kc - 1) * csa, rows), MR);
            return;
        }
        for (idx k = 0; k < kc; ++k) {
            std::memcpy(Ap + k * MR, A + k * csa, static_cast<std::size_t>(rows) * sizeof(T));
            for (idx i = rows; i < MR; ++i) Ap[k * MR + i] = T(0);
        }
        return;
    }
    for (idx k = 0; k < kc; ++k) {
        idx i = 0;
        for (; i < rows; ++i) Ap[k * MR + i] = A[i * rsa + k * csa];
        for (; i < MR; ++i) Ap[k * MR + i] = T(0);
    }
}

// Bp: panels of NR columns, k-major inside a panel; columns past nc are zero.
template <class T>
inline void pack_b_panel(idx kc, idx cols, const T* B, idx rsb, idx csb, T* Bp) {
    constexpr int NR = GemmBlocking<T>::NR;
    if (csb == 1 && cols == NR) {
        for (idx k = 0; k < kc; ++k) std::memcpy(Bp + k * NR, B + k * rsb, NR * sizeof(T));
        return;
    }
    if (rsb == 1) {  // transposed B (grad weight's col^T, linear's weights)
        constexpr idx L = GemmBlocking<T>::L;
        if (cols == NR && kc % L == 0) {  // whole L x L tiles through registers
            for (idx k0 = 0; k0 < kc; k0 += L)
                for (idx j0 = 0; j0 < NR; j0 += L) transpose_tile(B + j0 * csb + k0, csb, Bp + k0 * NR + j0, idx(NR));
            return;
        }
        // else contiguous reads down each column, in k blocks whose part of
        // the panel (64 x NR) stays in L1 across the columns
        for (idx k0 = 0; k0 < kc; k0 += 64) {
            const idx k1 = imin(kc, k0 + 64);
            for (idx j = 0; j < cols; ++j)
                for (idx k = k0; k < k1; ++k) Bp[k * NR + j] = B[j * csb + k];
            for (idx j = cols; j < NR; ++j)
                for (idx k = k0; k < k1; ++k) Bp[k * NR + j] = T(0);
        }
        return;
    }
    for (idx k = 0; k < kc; ++k) {
        idx j = 0;
        for (; j < cols; ++j) Bp[k * NR + j] = B[k * rsb + j * csb];
        for (; j < NR; ++j) Bp[k * NR + j] = T(0);
    }
}

// The panels of an nc-column block of B. A row-major B is copied eight rows
// at a time across all whole panels, so each row is read front to back and
// each panel written in runs of eight rows. Panel by panel, every k started
// a new line rsb apart, a pattern the hardware prefetchers follow poorly: a
// GEMM with few rows of A, which packs much B for little arithmetic, spent
// a large part of its time on those misses.
template <class T>
inline void pack_b_block(idx kc, idx nc, const T* B, idx rsb, idx csb, T* Bp) {
    constexpr int NR = GemmBlocking<T>::NR;
    typedef typename GemmBlocking<T>::V V;
    constexpr int L = GemmBlocking<T>::L;
    const idx whole = csb == 1 ? nc / NR : 0;
    if (whole > 1) {
        constexpr idx kRows = 8;
        for (idx k0 = 0; k0 < kc; k0 += kRows) {
            const idx k1 = imin(kc, k0 + kRows);
            for (idx jp = 0; jp < whole; ++jp)
                for (idx k = k0; k < k1; ++k)
#pragma GCC unroll 2
                    for (int v = 0; v < NR / L; ++v)
                        vstore(Bp + jp * NR * kc + k * NR + v * L, vload<V>(B + k * rsb + jp * NR + v * L));
        }
    } else {
        for (idx jp = 0; jp < whole; ++jp) pack_b_panel(kc, idx(NR), B + jp * NR, rsb, csb, Bp + jp * NR * kc);
    }
    const idx npanels = (nc + NR - 1) / NR;
    for (idx jp = whole; jp < npanels; ++jp)
        pack_b_panel(kc, imin(NR, nc - jp * NR), B + jp * NR * csb, rsb, csb, Bp + jp * NR * kc);
}

// Lanes [0, n) of C's row segment p = r (+ p), 0 < n < lanes.
template <class T, class V>
__attribute__((always_inline)) inline void store_part(T* p, V r, idx n, bool accumulate) {
#if defined(__AVX512F__)
    if (accumulate) r += vload_first(p, n);
    vstore_first(p, r, n);
#else
    // (AVX2's masked store is microcoded on some cores: lane by lane instead)
    constexpr int L = sizeof(V) / sizeof(T);
    alignas(64) T lanes[L];
    vstore(lanes, r);
    for (idx j = 0; j < n; ++j) p[j] = accumulate ? p[j] + lanes[j] : lanes[j];
#endif
}

// C (mr x nr of an RT x NV-vector tile) = c (+ C). Every loop over the tile
// is unrolled whole, edge tiles too: c indexed by a variable would live in
// memory for the whole micro-kernel (zeroed, spilled and copied each call,
// which in a short-K GEMM costs as much as the multiply-adds).
template <class T, int RT, int NV>
__attribute__((always_inline)) inline void store_tile(const typename GemmBlocking<T>::V (&c)[RT][NV], T* C,
                                                     idx ldc, idx mr, idx nr, bool accumulate) {
    typedef typename GemmBlocking<T>::V V;
    constexpr int L = GemmBlocking<T>::L;
    const bool whole = nr == NV * L;
#pragma GCC unroll 12
    for (int i = 0; i < RT; ++i) {
        if (i >= mr) break;
        T* row = C + i * ldc;
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) {
            const idx n = whole ? idx(L) : nr - v * L;
            if (n <= 0) break;
            V r = c[i][v];
            if (n >= L) {
                if (accumulate) r += vload<V>(row + v * L);
                vstore(row + v * L, r);
            } else {
                store_part(row + v * L, r, n, accumulate);
            }
        }
    }
}

// One step along K of an RT x (NV vectors) tile: c += the RT values of A at
// Ap times the NV vectors of B's row at b.
template <class T, int RT, int NV>
__attribute__((always_inline)) inline void tile_step(typename GemmBlocking<T>::V (&c)[RT][NV], const T* __restrict Ap,
                                                     const T* __restrict b) {
    typedef typename GemmBlocking<T>::V V;
    constexpr int L = GemmBlocking<T>::L;
    V bv[NV];
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) bv[v] = vload<V>(b + v * L);
#pragma GCC unroll 12
    for (int i = 0; i < RT; ++i) {
        const T a = Ap[i];
#pragma GCC unroll 2
        for (int v = 0; v < NV; ++v) c[i][v] += a * bv[v];
    }
}

// RT x (NV vectors) tile of C from panels packed for the full MR x NR tile.
// Edge tiles use the smallest RT (a multiple of 4) and NV that cover them, so
// a 64-row M (5 full panels + 4 rows) or a 196-column N (6 full panels + 4
// columns) wastes at most 3 rows and one vector instead of most of a tile.
// gemm_micro and its tiles are always inlined: with two GEMM drivers calling
// them GCC otherwise makes them out-of-line calls (6-8% more instructions on
// a small 1x1 conv and a Winograd layer, counted by the instruction gate)
template <class T, int RT, int NV>
__attribute__((always_inline)) inline void gemm_micro_t(idx kc, const T* __restrict Ap, const T* __restrict Bp, T* C, idx ldc, idx mr, idx nr,
                         bool accumulate) {
    typedef GemmBlocking<T> GB;
    typedef typename GB::V V;
    constexpr int MR = GB::MR, NR = GB::NR;
    // C's rows are ldc apart, each on its own lines and often its own page:
    // asked for now, they arrive while the K loop runs, not at the store
    for (idx i = 0; i < mr; ++i) {
        __builtin_prefetch(C + i * ldc, 1, 3);
        __builtin_prefetch(C + i * ldc + nr - 1, 1, 3);
    }
    V c[RT][NV] = {};
    for (idx k = 0; k < kc; ++k) {
        tile_step<T, RT, NV>(c, Ap, Bp);
        Ap += MR;
        Bp += NR;
    }
    store_tile<T, RT, NV>(c, C, ldc, mr, nr, accumulate);
}

// Rows read in place stream from memory at once, more than the hardware
// prefetchers follow: at each cache line's start, ask for each row's line
// two lines ahead.
template <class T, int RT>
__attribute__((always_inline)) inline void prefetch_rows_ahead(const T* const (&r)[RT], const idx* off, idx k,
                                                               idx kc) {
    constexpr idx kLine = 64 / sizeof(T);
    if (k % kLine == 0 && k + 2 * kLine < kc) {
        const idx po = off[k + 2 * kLine];
        for (int i = 0; i < RT; ++i) __builtin_prefetch(r[i] + po, 0, 3);
    }
}

// The indirect form (an implicit GEMM): row i of A is read at rows[i] +
// off[k] instead of from a packed panel, so a conv's input patches need no
// copy (the offsets walk an NHWC patch). RT = MR: only whole row panels.
template <class T, int NV>
inline void gemm_micro_indirect(idx kc, const T* const* rows, const idx* __restrict off, const T* __restrict Bp,
                                T* C, idx ldc, idx nr, bool accumulate) {
    typedef GemmBlocking<T> GB;
    typedef typename GB::V V;
    constexpr int MR = GB::MR, NR = GB::NR, L = GB::L;
    V c[MR][NV] = {};
    const T* r[MR];
    for (int i = 0; i < MR; ++i) r[i] = rows[i];
    for (idx k = 0; k < kc; ++k) {
        V b[NV];
#pragma GCC unroll 2
        for (int v = 0; v < NV; ++v) b[v] = vload<V>(Bp + v * L);
        const idx o = off[k];
        prefetch_rows_ahead<T, MR>(r, off, k, kc);
#pragma GCC unroll 12
        for (int i = 0; i < MR; ++i) {
            const T a = r[i][o];
#pragma GCC unroll 2
            for (int v = 0; v < NV; ++v) c[i][v] += a * b[v];
        }
        Bp += NR;
    }
    store_tile<T, MR, NV>(c, C, ldc, MR, nr, accumulate);
}

// Half an MR-row panel across two NR-column panels (MR/2 x 2*NR, the two
// panels' packed B read side by side), A read in place as in
// gemm_micro_indirect: per k, MR/2 broadcasts feed as many FMAs as MR do in
// the MR x NR tile, so A (an NHWC conv's patches, streaming from memory)
// is read at half the rate. Only where 2*NR columns of accumulators fit
// beside the B vectors (32 vector registers).
template <class T>
constexpr bool kIndirectWide = GemmBlocking<T>::MR == 12 && GemmBlocking<T>::NR == 2 * GemmBlocking<T>::L;

template <class T>
inline void gemm_micro_indirect_wide(idx kc, const T* const* rows, const idx* __restrict off,
                                     const T* __restrict Bp0, const T* __restrict Bp1, T* C, idx ldc,
                                     bool accumulate) {
    typedef GemmBlocking<T> GB;
    typedef typename GB::V V;
    constexpr int MH = GB::MR / 2, NR = GB::NR, L = GB::L;
    V c[MH][4] = {};
    const T* r[MH];
    for (int i = 0; i < MH; ++i) r[i] = rows[i];
    for (idx k = 0; k < kc; ++k) {
        const V b0 = vload<V>(Bp0), b1 = vload<V>(Bp0 + L), b2 = vload<V>(Bp1), b3 = vload<V>(Bp1 + L);
        const idx o = off[k];
        prefetch_rows_ahead<T, MH>(r, off, k, kc);
#pragma GCC unroll 6
        for (int i = 0; i < MH; ++i) {
            const T a = r[i][o];
            c[i][0] += a * b0;
            c[i][1] += a * b1;
            c[i][2] += a * b2;
            c[i][3] += a * b3;
        }
        Bp0 += NR;
        Bp1 += NR;
    }
    store_tile<T, MH, 4>(c, C, ldc, MH, 2 * NR, accumulate);
}

// One MR-row panel of A read in place (rows, off) against column panel jp of
// a packed B block, nr of its columns live; with pair, panel jp + 1 too, by
// the wide tile (the caller checks kIndirectWide and that both are full).
template <class T>
__attribute__((always_inline)) inline void gemm_micro_indirect_panel(idx kc, const T* const* rows, const idx* off,
                                                                     const T* Bblk, idx jp, idx nr, bool pair, T* Ct,
                                                                     idx ldc, bool accumulate) {
    typedef GemmBlocking<T> GB;
    constexpr int MR = GB::MR, NR = GB::NR;
    const T* Bp = Bblk + jp * NR * kc;
    if (pair) {
        for (int h = 0; h < 2; ++h)
            gemm_micro_indirect_wide<T>(kc, rows + h * (MR / 2), off, Bp, Bp + NR * kc, Ct + h * (MR / 2) * ldc, ldc,
                                        accumulate);
    } else if (nr <= GB::L) {
        gemm_micro_indirect<T, 1>(kc, rows, off, Bp, Ct, ldc, nr, accumulate);
    } else {
        gemm_micro_indirect<T, 2>(kc, rows, off, Bp, Ct, ldc, nr, accumulate);
    }
}

template <class T>
__attribute__((always_inline)) inline void gemm_micro(idx kc, const T* __restrict Ap, const T* __restrict Bp, T* C,
                                                      idx ldc, idx mr, idx nr, bool accumulate) {
    typedef GemmBlocking<T> GB;
    static_assert(GB::MR == 12 || GB::MR == 6, "edge dispatch assumes MR 12 (AVX-512) or 6");
    const bool one = nr <= GB::L;
    if constexpr (GB::MR == 12) {
        if (mr > 8) {
            if (one) return gemm_micro_t<T, 12, 1>(kc, Ap, Bp, C, ldc, mr, nr, accumulate);
            return gemm_micro_t<T, 12, 2>(kc, Ap, Bp, C, ldc, mr, nr, accumulate);
        }
        if (mr > 4) {
            if (one) return gemm_micro_t<T, 8, 1>(kc, Ap, Bp, C, ldc, mr, nr, accumulate);
            return gemm_micro_t<T, 8, 2>(kc, Ap, Bp, C, ldc, mr, nr, accumulate);
        }
        if (one) return gemm_micro_t<T, 4, 1>(kc, Ap, Bp, C, ldc, mr, nr, accumulate);
        return gemm_micro_t<T, 4, 2>(kc, Ap, Bp, C, ldc, mr, nr, accumulate);
    } else {
        if (mr > 3) {
            if (one) return gemm_micro_t<T, 6, 1>(kc, Ap, Bp, C, ldc, mr, nr, accumulate);
            return gemm_micro_t<T, 6, 2>(kc, Ap, Bp, C, ldc, mr, nr, accumulate);
        }
        if (one) return gemm_micro_t<T, 3, 1>(kc, Ap, Bp, C, ldc, mr, nr, accumulate);
        return gemm_micro_t<T, 3, 2>(kc, Ap, Bp, C, ldc, mr, nr, accumulate);
    }
}

// A packed once for the whole matrix (pack_a_full), for operands reused across
// many GEMMs (a conv's weights across images and bands): for each KC block of
// K, every MR-row panel of M, zero-padded to Mpad rows.
template <class T>
idx packed_a_elems(idx M, idx K) {
    constexpr int MR = GemmBlocking<T>::MR;
    return ((M + MR - 1) / MR) * MR * K;
}

template <class T>
void pack_a_full(idx M, idx K, const T* A, idx rsa, idx csa, T* out) {
    constexpr int MR = GemmBlocking<T>::MR;
    const idx KC = gemm_dims<T>().kc;
    const idx panels = (M + MR - 1) / MR, Mpad = panels * MR;
    const idx blocks = (K + KC - 1) / KC;
#pragma omp parallel for collapse(2) num_threads(threads_for(panels * blocks)) schedule(static)
    for (idx b = 0; b < blocks; ++b)
        for (idx ip = 0; ip < panels; ++ip) {
            const idx pc = b * KC, kc = imin(KC, K - pc);
            pack_a_panel(kc, imin(MR, M - ip * MR), A + ip * MR * rsa + pc * csa, rsa, csa,
                         out + pc * Mpad + ip * MR * kc);
        }
}

// A thread's block of C with at most this many row panels packs B in blocks
// that fit half of L2 (gemm_block).
constexpr idx kFewRowPanels = 12;

// Rows of A per block for a B block nc columns wide. A line of the A block is
// reused only after the whole block, a B micro-panel and the block's column
// of C tiles have passed through L2, and the C tiles of the whole B block
// (MC x nc, read and written on every KC pass) stream through L2 between the
// block's first and last use: the A block and those C tiles take half of L2
// together. MC stays the upper bound, and at least 8 register panels, so
// that each B micro-panel brought into L1 serves that many A micro-panels.
template <class T>
idx a_block_rows(const GemmDims& d, idx nc) {
    constexpr int MR = GemmBlocking<T>::MR;
    const idx fit = cache_sizes().l2 / 2 / ((d.kc + nc) * static_cast<idx>(sizeof(T))) / MR * MR;
    return imin(d.mc, imax(idx(8 * MR), fit));
}

// One thread's block of C: rows [r0, r1) (whole MR panels, but for M's last
// one), columns [c0, c1), B packed ncb columns at a time. Ap holds MC x KC
// (unused with a_packed), Bp KC x ncb. With b_packed (all of B, packed as
// pack_a_full packs A: per KC block, every panel; c0 = 0, ncb >= c1 = N),
// B is not read or packed again.
template <class T>
void gemm_block(idx M, idx K, idx r0, idx r1, idx c0, idx c1, idx ncb, const T* A, idx rsa, idx csa, const T* B,
                idx rsb, idx csb, T* C, idx ldc, bool accumulate, T* Ap, T* Bp, const T* a_packed,
                const T* b_packed = nullptr) {
    typedef GemmBlocking<T> GB;
    constexpr int MR = GB::MR, NR = GB::NR;
    const GemmDims& d = gemm_dims<T>();
    const idx KC = d.kc, Mpad = (M + MR - 1) / MR * MR;
    // With few rows, each packed B panel feeds few micro-kernel calls, so a
    // B block past L2 costs a trip through L3 per panel for little reuse: B
    // goes in blocks that stay in half of L2 (A, repacked per block, is small)
    if (!b_packed && r1 - r0 <= kFewRowPanels * MR)
        ncb = imin(ncb, imax(idx(NR), cache_sizes().l2 / 2 / (KC * static_cast<idx>(sizeof(T))) / NR * NR));
    for (idx jc = c0; jc < c1; jc += ncb) {
        const idx nc = imin(ncb, c1 - jc), npanels = (nc + NR - 1) / NR, MC = a_block_rows<T>(d, nc);
        for (idx pc = 0; pc < K; pc += KC) {
            const idx kc = imin(KC, K - pc);
            const bool acc = accumulate || pc > 0;
            const T* Bblk = Bp;
            if (b_packed)
                Bblk = b_packed + pc * npanels * NR;
            else
                pack_b_block(kc, nc, B + pc * rsb + jc * csb, rsb, csb, Bp);
            for (idx ic = r0; ic < r1; ic += MC) {
                const idx mc = imin(MC, r1 - ic), mpanels = (mc + MR - 1) / MR;
                const T* Ablk = Ap;
                if (a_packed)
                    Ablk = a_packed + pc * Mpad + ic * kc;
                else
                    for (idx ip = 0; ip < mpanels; ++ip)
                        pack_a_panel(kc, imin(MR, mc - ip * MR), A + (ic + ip * MR) * rsa + pc * csa, rsa, csa,
                                     Ap + ip * MR * kc);
                for (idx jp = 0; jp < npanels; ++jp)
                    for (idx ip = 0; ip < mpanels; ++ip)
                        gemm_micro(kc, Ablk + ip * MR * kc, Bblk + jp * NR * kc, C + (ic + ip * MR) * ldc + jc + jp * NR,
                                   ldc, imin(MR, mc - ip * MR), imin(NR, nc - jp * NR), acc);
            }
        }
    }
}

// How gemm_blocked shares C among nt threads: a grid of tm x tn blocks.
struct GemmSplit {
    int tm, tn;
};

// The grid whose busiest thread does least: its multiply-adds (2 FMA ports of
// L lanes a cycle) plus what it packs, about one element a cycle: the A rows
// it reads, once per B block, unless A is pre-packed, and its B columns.
template <class T>
GemmSplit gemm_split(idx M, idx N, int nt, idx ncb, bool a_packed) {
    typedef GemmBlocking<T> GB;
    const idx mp = (M + GB::MR - 1) / GB::MR, np = (N + GB::NR - 1) / GB::NR;
    GemmSplit best{1, nt};
    double best_cost = -1;
    for (int tm = 1; tm <= nt; ++tm) {
        if (nt % tm) continue;
        const int tn = nt / tm;
        const idx rows = (mp + tm - 1) / tm * GB::MR, cols = (np + tn - 1) / tn * GB::NR;
        const double cost = double(rows) * double(cols) / (2 * GB::L) + double(cols) +
                            (a_packed ? 0.0 : double(rows) * double((cols + ncb - 1) / ncb));
        if (best_cost < 0 || cost < best_cost) {
            best_cost = cost;
            best = GemmSplit{tm, tn};
        }
    }
    return best;
}

// `pack` must hold gemm_pack_elems<T>() elements, 64-byte aligned.
// parallel=false when called from inside an OpenMP region. With `a_packed`
// (from pack_a_full of this A) A is not read or packed again.
//
// With several threads each owns a block of C and packs what it reads (B
// too, where every thread reads all of it), so the threads never wait for
// each other and never read panels another core has just written. Packing
// shared out over the threads ends every packing step in a barrier, and each
// thread then reads the others' panels from their caches, which on a VM
// whose vCPUs sit apart costs more than packing them twice. Thread 0 packs
// into `pack`; the others' A blocks come from workspace slot 4 and their B
// blocks share `pack`'s KC x NC.
template <class T>
void gemm_blocked(idx M, idx N, idx K, const T* A, idx rsa, idx csa, const T* B, idx rsb, idx csb, T* C, idx ldc,
                  bool accumulate, T* pack, bool parallel, const T* a_packed = nullptr) {
    typedef GemmBlocking<T> GB;
    constexpr int MR = GB::MR, NR = GB::NR;
    if (M <= 0 || N <= 0) return;
    if (K <= 0) {
        if (!accumulate)
            for (idx i = 0; i < M; ++i) std::memset(C + i * ldc, 0, N * sizeof(T));
        return;
    }
    const GemmDims& d = gemm_dims<T>();
    const idx KC = d.kc, MC = d.mc, NC = d.nc;
    const idx mp = (M + MR - 1) / MR, np = (N + NR - 1) / NR;
    idx nt = parallel ? num_threads() : 1;
    nt = imin(nt, imin(mp * np, NC / NR));
    if (nt <= 1) return gemm_block(M, K, idx(0), M, idx(0), N, NC, A, rsa, csa, B, rsb, csb, C, ldc, accumulate,
                                   pack, pack + MC * KC, a_packed);
    const idx ncb = NC / nt / NR * NR;
    const GemmSplit sp = gemm_split<T>(M, N, static_cast<int>(nt), ncb, a_packed != nullptr);
    const idx a_elems = (MC * KC + 15) / 16 * 16;
    T* extra = a_packed ? nullptr
                        : static_cast<T*>(workspace(static_cast<std::size_t>((nt - 1) * a_elems) * sizeof(T), 4));
#pragma omp parallel num_threads(static_cast<int>(nt))
    {
        const idx t = omp_get_thread_num(), bi = t / sp.tn, bj = t % sp.tn;
        const idx r0 = imin(M, bi * mp / sp.tm * MR), r1 = imin(M, (bi + 1) * mp / sp.tm * MR);
        const idx c0 = imin(N, bj * np / sp.tn * NR), c1 = imin(N, (bj + 1) * np / sp.tn * NR);
        T* Ap = t == 0 ? pack : extra + (t - 1) * a_elems;
        if (r0 < r1 && c0 < c1)
            gemm_block(M, K, r0, r1, c0, c1, ncb, A, rsa, csa, B, rsb, csb, C, ldc, accumulate, Ap,
                       pack + MC * KC + t * ncb * KC, a_packed);
    }
}

template <class T>
void gemm(idx M, idx N, idx K, const T* A, idx rsa, idx csa, const T* B, idx rsb, idx csb, T* C, idx ldc,
          bool accumulate) {
    T* pack = static_cast<T*>(workspace(gemm_pack_elems<T>() * sizeof(T), 1));
    gemm_blocked(M, N, K, A, rsa, csa, B, rsb, csb, C, ldc, accumulate, pack, true);
}

// C (M, N) (+)= A (M, K) * B (N, K)^T with both operands contiguous along K
// (grad weight: gy rows times column-matrix rows). No packing: each RA x RB
// tile keeps RA*RB vector accumulators over K and sums their lanes once. For
// small M and N with a long K the packed GEMM spends more time transposing
// its operands into panels (scalar, strided stores) than multiplying.
// Sums run over K in a fixed order: deterministic.
template <class T, int RA, int RB>
inline void gemm_nt_tile(idx K, const T* A, idx lda, const T* B, idx ldb, T* C, idx ldc, bool accumulate) {
    typedef typename Vec<T>::type V;
    constexpr int L = CK_VEC_BYTES / sizeof(T);
    V acc[RA][RB];
    for (int i = 0; i < RA; ++i)
        for (int j = 0; j < RB; ++j) acc[i][j] = V{};
    idx k = 0;
    for (; k + L <= K; k += L) {
        V a[RA], b[RB];
        for (int i = 0; i < RA; ++i) a[i] = vload<V>(A + i * lda + k);
        for (int j = 0; j < RB; ++j) b[j] = vload<V>(B + j * ldb + k);
        for (int i = 0; i < RA; ++i)
            for (int j = 0; j < RB; ++j) acc[i][j] += a[i] * b[j];
    }
    for (int i = 0; i < RA; ++i)
        for (int j = 0; j < RB; ++j) {
            T sum = T(0);
            for (int l = 0; l < L; ++l) sum += acc[i][j][l];
            for (idx kk = k; kk < K; ++kk) sum += A[i * lda + kk] * B[j * ldb + kk];
            T& c = C[i * ldc + j];
            c = accumulate ? c + sum : sum;
        }
}

template <class T, int RA>
inline void gemm_nt_row(idx N, idx K, const T* A, idx lda, const T* B, idx ldb, T* C, idx ldc, bool accumulate) {
    idx j = 0;
    for (; j + 3 <= N; j += 3) gemm_nt_tile<T, RA, 3>(K, A, lda, B + j * ldb, ldb, C + j, ldc, accumulate);
    if (N - j == 2) gemm_nt_tile<T, RA, 2>(K, A, lda, B + j * ldb, ldb, C + j, ldc, accumulate);
    if (N - j == 1) gemm_nt_tile<T, RA, 1>(K, A, lda, B + j * ldb, ldb, C + j, ldc, accumulate);
}

template <class T>
void gemm_nt(idx M, idx N, idx K, const T* A, idx lda, const T* B, idx ldb, T* C, idx ldc, bool accumulate) {
    idx i = 0;
    for (; i + 4 <= M; i += 4) gemm_nt_row<T, 4>(N, K, A + i * lda, lda, B, ldb, C + i * ldc, ldc, accumulate);
    switch (M - i) {
        case 3: gemm_nt_row<T, 3>(N, K, A + i * lda, lda, B, ldb, C + i * ldc, ldc, accumulate); break;
        case 2: gemm_nt_row<T, 2>(N, K, A + i * lda, lda, B, ldb, C + i * ldc, ldc, accumulate); break;
        case 1: gemm_nt_row<T, 1>(N, K, A + i * lda, lda, B, ldb, C + i * ldc, ldc, accumulate); break;
        default: break;
    }
}
