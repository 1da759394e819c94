// Pieces shared by both conv2d algorithms.

// y[n, k, :] += bias[k] over every output plane.
template <class T>
void add_bias(T* y, const T* b, const ConvShape& s) {
    idx P = s.Ho * s.Wo;
    idx planes = s.N * s.K;
#pragma omp parallel for num_threads(threads_for(planes)) schedule(static)
    for (idx t = 0; t < planes; ++t) {
        T bv = b[t % s.K];
        T* p = y + t * P;
        for (idx i = 0; i < P; ++i) p[i] += bv;
    }
}

// gb[k] = sum over n, ho, wo of gy[n, k, ho, wo], accumulated in double: a
// single sum of N*Ho*Wo terms that may nearly cancel. Eight independent lanes
// (element i goes to lane i % 8 of its plane, lanes summed in order at the
// end) keep the adds off one dependency chain and vectorizable; the order is
// fixed, so the result does not depend on the thread count.
template <class T>
void bias_grad(const T* gy, T* gb, const ConvShape& s) {
    constexpr int L = 8;
    const idx P = s.Ho * s.Wo, body = P - P % L;
#pragma omp parallel for num_threads(threads_for(s.K)) schedule(static)
    for (idx k = 0; k < s.K; ++k) {
        double lane[L] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (idx n = 0; n < s.N; ++n) {
            const T* p = gy + (n * s.K + k) * P;
            for (idx i = 0; i < body; i += L)
                for (int l = 0; l < L; ++l) lane[l] += static_cast<double>(p[i + l]);
            for (idx i = body; i < P; ++i) lane[i - body] += static_cast<double>(p[i]);
        }
        double acc = 0.0;
        for (int l = 0; l < L; ++l) acc += lane[l];
        gb[k] = static_cast<T>(acc);
    }
}
