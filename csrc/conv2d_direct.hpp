// conv2d by the direct algorithm: loops over the output, no column buffer.
// Every output plane (forward), input plane (grad input) and filter slice
// (grad weight) is owned by exactly one thread, so there are no atomics and
// the result does not depend on the thread count. The innermost loop runs
// along an output row; with stride 1 it is a contiguous axpy the compiler
// vectorizes.

// y (N, K, Ho, Wo) = conv(x (N, C, H, W), w (K, C/G, R, S)) + b
template <class T>
void conv2d_forward_direct(const T* x, const T* w, const T* b, T* y, const ConvShape& s) {
    const idx Cg = s.C / s.G, Kg = s.K / s.G, P = s.Ho * s.Wo, HW = s.H * s.W;
    const idx planes = s.N * s.K;
#pragma omp parallel for num_threads(threads_for(planes)) schedule(dynamic, 1)
    for (idx t = 0; t < planes; ++t) {
        const idx n = t / s.K, k = t % s.K, g = k / Kg;
        T* yp = y + t * P;
        const T bias = b ? b[k] : T(0);
        for (idx i = 0; i < P; ++i) yp[i] = bias;
        const T* xg = x + (n * s.C + g * Cg) * HW;
        const T* wk = w + k * Cg * s.R * s.S;
        for (idx ho = 0; ho < s.Ho; ++ho) {
            T* yrow = yp + ho * s.Wo;
            for (idx c = 0; c < Cg; ++c) {
                const T* xp = xg + c * HW;
                const T* wc = wk + c * s.R * s.S;
                for (idx r = 0; r < s.R; ++r) {
                    const idx h = ho * s.sh - s.ph + r * s.dh;
                    if (h < 0 || h >= s.H) continue;
                    const T* xrow = xp + h * s.W;
                    for (idx q = 0; q < s.S; ++q) {
                        const T wv = wc[r * s.S + q];
                        const idx off = q * s.dw - s.pw;
                        idx lo, hi;
                        valid_range(s.W, s.Wo, s.sw, off, lo, hi);
                        if (s.sw == 1) {
                            const T* xs = xrow + off;
                            for (idx wo = lo; wo < hi; ++wo) yrow[wo] += wv * xs[wo];
                        } else {
                            for (idx wo = lo; wo < hi; ++wo) yrow[wo] += wv * xrow[wo * s.sw + off];
                        }
                    }
                }
            }
        }
    }
}

// gx (N, C, H, W): each input plane gathers from the output planes of its group.
template <class T>
void conv2d_grad_input_direct(const T* gy, const T* w, T* gx, const ConvShape& s) {
    const idx Cg = s.C / s.G, Kg = s.K / s.G, P = s.Ho * s.Wo, HW = s.H * s.W;
    const idx planes = s.N * s.C;
#pragma omp parallel for num_threads(threads_for(planes)) schedule(dynamic, 1)
    for (idx t = 0; t < planes; ++t) {
        const idx n = t / s.C, c = t % s.C, g = c / Cg, cc = c % Cg;
        T* gxp = gx + t * HW;
        for (idx i = 0; i < HW; ++i) gxp[i] = T(0);
        for (idx k = g * Kg; k < (g + 1) * Kg; ++k) {
            const T* gyp = gy + (n * s.K + k) * P;
            const T* wc = w + (k * Cg + cc) * s.R * s.S;
            for (idx ho = 0; ho < s.Ho; ++ho) {
                const T* gyrow = gyp + ho * s.Wo;
                for (idx r = 0; r < s.R; ++r) {
                    const idx h = ho * s.sh - s.ph + r * s.dh;
                    if (h < 0 || h >= s.H) continue;
                    T* gxrow = gxp + h * s.W;
                    for (idx q = 0; q < s.S; ++q) {
                        const T wv = wc[r * s.S + q];
                        const idx off = q * s.dw - s.pw;
                        idx lo, hi;
                        valid_range(s.W, s.Wo, s.sw, off, lo, hi);
                        if (s.sw == 1) {
                            T* gs = gxrow + off;
                            for (idx wo = lo; wo < hi; ++wo) gs[wo] += wv * gyrow[wo];
                        } else {
                            for (idx wo = lo; wo < hi; ++wo) gxrow[wo * s.sw + off] += wv * gyrow[wo];
                        }
                    }
                }
            }
        }
    }
}

// gw (K, C/G, R, S): each (k, c) filter slice reduces over the batch and the output.
template <class T>
void conv2d_grad_weight_direct(const T* gy, const T* x, T* gw, const ConvShape& s) {
    const idx Cg = s.C / s.G, Kg = s.K / s.G, P = s.Ho * s.Wo, HW = s.H * s.W, RS = s.R * s.S;
    const idx slices = s.K * Cg;
#pragma omp parallel for num_threads(threads_for(slices)) schedule(dynamic, 1)
    for (idx t = 0; t < slices; ++t) {
        const idx k = t / Cg, cc = t % Cg, c = (k / Kg) * Cg + cc;
        T* gwp = gw + t * RS;
        for (idx i = 0; i < RS; ++i) gwp[i] = T(0);
        for (idx n = 0; n < s.N; ++n) {
            const T* gyp = gy + (n * s.K + k) * P;
            const T* xp = x + (n * s.C + c) * HW;
            for (idx ho = 0; ho < s.Ho; ++ho) {
                const T* gyrow = gyp + ho * s.Wo;
                for (idx r = 0; r < s.R; ++r) {
                    const idx h = ho * s.sh - s.ph + r * s.dh;
                    if (h < 0 || h >= s.H) continue;
                    const T* xrow = xp + h * s.W;
                    for (idx q = 0; q < s.S; ++q) {
                        const idx off = q * s.dw - s.pw;
                        idx lo, hi;
                        valid_range(s.W, s.Wo, s.sw, off, lo, hi);
                        T acc = 0;
                        if (s.sw == 1) {
                            const T* xs = xrow + off;
#pragma omp simd reduction(+ : acc)
                            for (idx wo = lo; wo < hi; ++wo) acc += gyrow[wo] * xs[wo];
                        } else {
                            for (idx wo = lo; wo < hi; ++wo) acc += gyrow[wo] * xrow[wo * s.sw + off];
                        }
                        gwp[r * s.S + q] += acc;
                    }
                }
            }
        }
    }
}

template <class T>
void conv2d_backward_direct(const T* gy, const T* x, const T* w, T* gx, T* gw, T* gb, const ConvShape& s) {
    if (gx) conv2d_grad_input_direct(gy, w, gx, s);
    if (gw) conv2d_grad_weight_direct(gy, x, gw, s);
    if (gb) bias_grad(gy, gb, s);
}
