// y (M x N) = x (M x K) w (N x K)^T (+ b): torch.nn.functional.linear, with
// x and w as they are stored (both contiguous along K).
//
// Few rows (a batch of a few inputs): dot products straight from x and w
// (gemm_nt), threads splitting the output features. Packing w into GEMM
// panels reads and writes all of it, and at one row that copy costs several
// times the product itself. More rows: the packed GEMM, which reads w
// transposed through its strides. Each output is reduced by one thread in a
// fixed order whatever the thread count.

// rows up to which the dot products beat packing (where the two cross on a
// LeNet-sized layer: docs/performance.md)
constexpr idx kLinearDotRows = 16;

template <class T>
void linear_forward(const T* x, const T* w, const T* b, T* y, idx M, idx N, idx K) {
    if (M <= kLinearDotRows) {
        // column blocks of a multiple of gemm_nt's 3-column tiles, at least 24
        const int nt = threads_for((N + 23) / 24);
        const idx per = ((N + nt - 1) / nt + 2) / 3 * 3;
#pragma omp parallel for num_threads(nt) schedule(static)
        for (int t = 0; t < nt; ++t) {
            const idx j0 = imin(N, t * per), j1 = imin(N, j0 + per);
            if (j1 > j0) gemm_nt(M, j1 - j0, K, x, K, w + j0 * K, K, y + j0, N, false);
        }
    } else {
        gemm(M, N, K, x, K, idx(1), w, idx(1), K, y, N, false);
    }
    if (b) {
#pragma omp parallel for num_threads(threads_for(M / 64 + 1)) schedule(static)
        for (idx i = 0; i < M; ++i)
            for (idx j = 0; j < N; ++j) y[i * N + j] += b[j];
    }
}
