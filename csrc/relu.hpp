// relu and its gradient, matching PyTorch: relu(NaN) = NaN, and the gradient
// is passed where x > 0 or x is NaN (threshold_backward tests x <= 0).

constexpr idx kReluChunk = 1 << 16;

template <class T>
void relu_forward(const T* x, T* y, idx n) {
    const idx chunks = (n + kReluChunk - 1) / kReluChunk;
#pragma omp parallel for num_threads(threads_for(chunks)) schedule(static)
    for (idx c = 0; c < chunks; ++c) {
        const idx end = imin(n, (c + 1) * kReluChunk);
        for (idx i = c * kReluChunk; i < end; ++i) {
            const T v = x[i];
            y[i] = (v > T(0) || v != v) ? v : T(0);
        }
    }
}

// One chunk of the gradient; the restrict-qualified forms let the loops
// vectorize without the compiler's overlap test, which sends gx == gy (the
// in-place call) down its scalar fallback
template <class T>
inline void relu_backward_run(const T* __restrict gy, const T* __restrict x, T* __restrict gx, idx n) {
    // gy read unconditionally: read only where x > 0, the compiler made it
    // a masked load (vmaskmovps), which is slow on AMD cores: 0.65x PyTorch
    for (idx i = 0; i < n; ++i) {
        const T g = gy[i];
        gx[i] = x[i] <= T(0) ? T(0) : g;
    }
}

template <class T>
inline void relu_backward_run_inplace(T* __restrict g, const T* __restrict x, idx n) {
    for (idx i = 0; i < n; ++i) {
        const T v = g[i];
        g[i] = x[i] <= T(0) ? T(0) : v;
    }
}

// gx may be gy itself (each element is read before it is written), not
// otherwise overlap it
template <class T>
void relu_backward(const T* gy, const T* x, T* gx, idx n) {
    const idx chunks = (n + kReluChunk - 1) / kReluChunk;
#pragma omp parallel for num_threads(threads_for(chunks)) schedule(static)
    for (idx c = 0; c < chunks; ++c) {
        const idx i0 = c * kReluChunk, len = imin(n, (c + 1) * kReluChunk) - i0;
        if (gx == gy)
            relu_backward_run_inplace(gx + i0, x + i0, len);
        else
            relu_backward_run(gy + i0, x + i0, gx + i0, len);
    }
}
