// avg_pool2d with PyTorch's divisor rules: the window is clipped to the padded
// input for count_include_pad, to the real input otherwise; divisor_override
// replaces both. A window with no real input averages to 0.

struct AvgWindow {
    idx h0, h1, w0, w1;  // clipped to the input
    idx divisor;         // 0: empty window
};

inline AvgWindow avg_window(idx ho, idx wo, const PoolGeom& p) {
    idx h0 = ho * p.sh - p.ph, w0 = wo * p.sw - p.pw;
    idx h1 = imin(h0 + p.kh, p.H + p.ph), w1 = imin(w0 + p.kw, p.W + p.pw);
    const idx pool_size = (h1 - h0) * (w1 - w0);
    h0 = imax(h0, 0);
    w0 = imax(w0, 0);
    h1 = imin(h1, p.H);
    w1 = imin(w1, p.W);
    AvgWindow a{h0, h1, w0, w1, 0};
    if (h0 >= h1 || w0 >= w1) return a;
    if (p.divisor_override)
        a.divisor = p.divisor_override;
    else if (p.count_include_pad)
        a.divisor = pool_size;
    else
        a.divisor = (h1 - h0) * (w1 - w0);
    return a;
}

// Output columns [lo, hi) of row ho whose 2x2 window lies inside the input
// (the common pooling layer): no clipping, divisor 4 or the override. Empty
// range when the layer is not 2x2 or the row's window leaves the input.
inline void avg_interior_2x2(idx ho, const PoolGeom& p, idx& lo, idx& hi) {
    lo = hi = 0;
    const idx h0 = ho * p.sh - p.ph;
    if (p.kh != 2 || p.kw != 2 || h0 < 0 || h0 + 1 >= p.H) return;
    valid_range(p.W - 1, p.Wo, p.sw, -p.pw, lo, hi);
}

// The general window sum for outputs [wo_begin, wo_end) of row ho.
template <class T>
inline void avg_row_forward(const T* xp, T* yp, idx ho, idx wo_begin, idx wo_end, const PoolGeom& p) {
    for (idx wo = wo_begin; wo < wo_end; ++wo) {
        const AvgWindow a = avg_window(ho, wo, p);
        T sum = 0;
        for (idx h = a.h0; h < a.h1; ++h)
            for (idx w = a.w0; w < a.w1; ++w) sum += xp[h * p.W + w];
        yp[ho * p.Wo + wo] = a.divisor ? sum / static_cast<T>(a.divisor) : T(0);
    }
}

template <class T>
void avg_pool2d_forward(const T* x, T* y, const PoolGeom& p) {
    const idx HW = p.H * p.W, P = p.Ho * p.Wo;
    const T div = static_cast<T>(p.divisor_override ? p.divisor_override : 4);
#pragma omp parallel for num_threads(threads_for(p.planes)) schedule(static)
    for (idx t = 0; t < p.planes; ++t) {
        const T* xp = x + t * HW;
        T* yp = y + t * P;
        for (idx ho = 0; ho < p.Ho; ++ho) {
            idx lo, hi;
            avg_interior_2x2(ho, p, lo, hi);
            if (lo >= hi) {
                avg_row_forward(xp, yp, ho, 0, p.Wo, p);
                continue;
            }
            const T* r0 = xp + (ho * p.sh - p.ph) * p.W;
            for (idx wo = lo; wo < hi; ++wo) {  // same summation order as the general loop
                const idx w = wo * p.sw - p.pw;
                yp[ho * p.Wo + wo] = (((r0[w] + r0[w + 1]) + r0[p.W + w]) + r0[p.W + w + 1]) / div;
            }
            avg_row_forward(xp, yp, ho, 0, lo, p);
            avg_row_forward(xp, yp, ho, hi, p.Wo, p);
        }
    }
}

// Each output of row ho, columns [wo_begin, wo_end), spreads its share over its window.
template <class T>
inline void avg_row_backward(const T* g, T* gp, idx ho, idx wo_begin, idx wo_end, const PoolGeom& p) {
    for (idx wo = wo_begin; wo < wo_end; ++wo) {
        const AvgWindow a = avg_window(ho, wo, p);
        if (!a.divisor) continue;
        const T v = g[ho * p.Wo + wo] / static_cast<T>(a.divisor);
        for (idx h = a.h0; h < a.h1; ++h)
            for (idx w = a.w0; w < a.w1; ++w) gp[h * p.W + w] += v;
    }
}

// Whole, non-overlapping 2x2 / stride-2 windows: every input gets exactly one
// share (or none, past the last window), so each element is written once
// instead of zeroed and then accumulated: one pass over gx, not two.
template <class T>
void avg_pool_2x2s2_backward_plane(const T* g, T* gp, T div, const PoolGeom& p) {
    for (idx ho = 0; ho < p.Ho; ++ho) {
        const T* grow = g + ho * p.Wo;
        T* r0 = gp + 2 * ho * p.W;
        T* r1 = r0 + p.W;
        for (idx wo = 0; wo < p.Wo; ++wo) {
            const T v = grow[wo] / div;
            r0[2 * wo] = v;
            r0[2 * wo + 1] = v;
            r1[2 * wo] = v;
            r1[2 * wo + 1] = v;
        }
        for (idx w = 2 * p.Wo; w < p.W; ++w) r0[w] = r1[w] = T(0);  // columns no window covers
    }
    for (idx i = 2 * p.Ho * p.W; i < p.H * p.W; ++i) gp[i] = T(0);  // rows no window covers
}

template <class T>
void avg_pool2d_backward(const T* gy, T* gx, const PoolGeom& p) {
    const idx HW = p.H * p.W, P = p.Ho * p.Wo;
    const T div = static_cast<T>(p.divisor_override ? p.divisor_override : 4);
    const bool tiles = p.kh == 2 && p.kw == 2 && p.sh == 2 && p.sw == 2 && p.ph == 0 && p.pw == 0 &&
                       2 * p.Ho <= p.H && 2 * p.Wo <= p.W;
#pragma omp parallel for num_threads(threads_for(p.planes)) schedule(static)
    for (idx t = 0; t < p.planes; ++t) {
        T* gp = gx + t * HW;
        const T* g = gy + t * P;
        if (tiles) {
            avg_pool_2x2s2_backward_plane(g, gp, div, p);
            continue;
        }
        for (idx i = 0; i < HW; ++i) gp[i] = T(0);
        for (idx ho = 0; ho < p.Ho; ++ho) {
            idx lo, hi;
            avg_interior_2x2(ho, p, lo, hi);
            if (lo >= hi) {
                avg_row_backward(g, gp, ho, 0, p.Wo, p);
                continue;
            }
            T* r0 = gp + (ho * p.sh - p.ph) * p.W;
            avg_row_backward(g, gp, ho, 0, lo, p);
            for (idx wo = lo; wo < hi; ++wo) {  // in output order, as the general loop
                const idx w = wo * p.sw - p.pw;
                const T v = g[ho * p.Wo + wo] / div;
                r0[w] += v;
                r0[w + 1] += v;
                r0[p.W + w] += v;
                r0[p.W + w + 1] += v;
            }
            avg_row_backward(g, gp, ho, hi, p.Wo, p);
        }
    }
}
