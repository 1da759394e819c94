// dst[b][j][i] = src[b][i][j] for b < batches, i < rows, j < cols: the NCHW <->
// NHWC conversion ((C, H*W) planes <-> (H*W, C)), in 16 x 16 tiles so both
// sides are read and written in cache lines rather than one element per line.
// NumPy's own transposed copy of a large array ran at a few GB/s here.

template <class T>
void transpose_batched(const T* src, T* dst, idx batches, idx rows, idx cols) {
    constexpr idx B = 16;
    const idx rt = (rows + B - 1) / B, ct = (cols + B - 1) / B, tasks = batches * rt;
#pragma omp parallel for num_threads(threads_for(tasks)) schedule(static)
    for (idx t = 0; t < tasks; ++t) {
        const idx b = t / rt, i0 = (t % rt) * B, i1 = imin(rows, i0 + B);
        const T* s = src + b * rows * cols;
        T* d = dst + b * rows * cols;
        for (idx cj = 0; cj < ct; ++cj) {
            const idx j0 = cj * B, j1 = imin(cols, j0 + B);
            for (idx j = j0; j < j1; ++j)
                for (idx i = i0; i < i1; ++i) d[j * rows + i] = s[i * cols + j];
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
