// dst[b][j][i] = src[b][i][j] for b < batches, i < rows, j < cols: the NCHW <->
// NHWC conversion ((C, H*W) planes <-> (H*W, C)), in tiles so both sides are
// read and written in cache lines rather than one element per line. Whole
// L x L tiles (L: the vector's lanes) go through registers: L rows loaded as
// vectors, transposed by log2(L) rounds of two-vector shuffles, stored as L
// vectors. An element loop over the tiles ran at under 3 GB/s, a quarter of
// a Winograd weight gradient's time on NCHW data. NumPy's own transposed
// copy of a large array ran at a few GB/s here.

// The masks of round B of transpose_tile, as constants: lane l of row i
// (bit B clear) takes row i + B's lane l - B where bit B of l is set, and
// row i + B's lane l takes row i's lane l + B where it is clear.
template <class M, int L, int B, int... l>
constexpr M transpose_lo_mask(std::integer_sequence<int, l...>) {
    return M{((l & B) ? L + l - B : l)...};
}
template <class M, int L, int B, int... l>
constexpr M transpose_hi_mask(std::integer_sequence<int, l...>) {
    return M{((l & B) ? L + l : l + B)...};
}

template <class V, class M, int L, int B>
inline void transpose_rounds(V (&r)[L]) {
    if constexpr (B < L) {
        constexpr M lo = transpose_lo_mask<M, L, B>(std::make_integer_sequence<int, L>());
        constexpr M hi = transpose_hi_mask<M, L, B>(std::make_integer_sequence<int, L>());
#pragma GCC unroll 16
        for (int i = 0; i < L; ++i)
            if (!(i & B)) {
                const V a = r[i], c = r[i + B];
                r[i] = __builtin_shuffle(a, c, lo);
                r[i + B] = __builtin_shuffle(a, c, hi);
            }
        transpose_rounds<V, M, L, 2 * B>(r);
    }
}

// L vectors (rows) in registers, transposed in place: r[j] lane i = old r[i] lane j.
template <class T>
__attribute__((always_inline)) inline void transpose_regs(typename Vec<T>::type (&r)[CK_VEC_BYTES / sizeof(T)]) {
    typedef typename Vec<T>::type V;
    typedef typename std::conditional<sizeof(T) == 4, int, long long>::type I;
    typedef I M __attribute__((vector_size(CK_VEC_BYTES)));
    transpose_rounds<V, M, CK_VEC_BYTES / sizeof(T), 1>(r);
}

// The L x L tile at s (row stride lds) to d (row stride ldd), transposed.
// Round B swaps bit B of each element's row with bit B of its lane; after
// every bit, element (i, j) sits at (j, i).
template <class T>
__attribute__((always_inline)) inline void transpose_tile(const T* s, idx lds, T* d, idx ldd) {
    typedef typename Vec<T>::type V;
    constexpr int L = CK_VEC_BYTES / sizeof(T);
    V r[L];
#pragma GCC unroll 16
    for (int i = 0; i < L; ++i) r[i] = vload<V>(s + i * lds);
    transpose_regs<T>(r);
#pragma GCC unroll 16
    for (int i = 0; i < L; ++i) vstore(d + i * ldd, r[i]);
}

template <class T>
void transpose_batched(const T* src, T* dst, idx batches, idx rows, idx cols) {
    constexpr idx L = CK_VEC_BYTES / sizeof(T), B = L < 16 ? 16 : L;
    // A task takes RB source rows, tile column by tile column: each of the B
    // destination rows a column of tiles writes gets RB values in a run (with
    // one tile a task, a tall NHWC -> NCHW copy wrote one line per row per
    // task and ran well below the other direction). Up to 16 tiles, fewer
    // while that would leave under 4 tasks a thread.
    idx RB = B * 16;
    while (RB > B && batches * ((rows + RB - 1) / RB) < 4 * num_threads()) RB /= 2;
    const idx rt = (rows + RB - 1) / RB, ct = (cols + B - 1) / B, tasks = batches * rt;
#pragma omp parallel for num_threads(threads_for(tasks)) schedule(static)
    for (idx t = 0; t < tasks; ++t) {
        const idx b = t / rt, r0 = (t % rt) * RB, r1 = imin(rows, r0 + RB);
        const T* s = src + b * rows * cols;
        T* d = dst + b * rows * cols;
        for (idx cj = 0; cj < ct; ++cj) {
            const idx j0 = cj * B, j1 = imin(cols, j0 + B);
            for (idx i0 = r0; i0 < r1; i0 += B) {
                const idx i1 = imin(r1, i0 + B);
                if (i1 - i0 == B && j1 - j0 == B) {
                    for (idx ii = i0; ii < i1; ii += L)
                        for (idx jj = j0; jj < j1; jj += L)
                            transpose_tile(s + ii * cols + jj, cols, d + jj * rows + ii, rows);
                    continue;
                }
                for (idx j = j0; j < j1; ++j)
                    for (idx i = i0; i < i1; ++i) d[j * rows + i] = s[i * cols + j];
            }
        }
    }
}

// (K, C/G, R, S) <-> (K, R, S, C/G): per filter, a (C/G x RS) transpose, in
// tiles and over the threads: a deep layer's weights are several MB, which a
// plain loop nest would write one element per cache line.
template <class T>
void weights_to_krsc(const T* w, T* wr, const ConvGeom& s) {
    transpose_batched(w, wr, s.K, s.C / s.G, s.R * s.S);
}

template <class T>
void weights_from_krsc(const T* wr, T* w, const ConvGeom& s) {
    transpose_batched(wr, w, s.K, s.R * s.S, s.C / s.G);
}
