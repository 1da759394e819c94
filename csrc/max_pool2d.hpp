// max_pool2d with PyTorch's exact rules: padding reads as -inf, NaN wins and
// propagates, ties keep the first index, indices are h*W + w within the plane.
// A window that holds no real input (possible with dilation) yields -inf and
// index -1, and backward drops its gradient. (PyTorch reports an index outside
// the plane there, which its own backward then writes through.)

// first in-range position of a dilated window starting at `start`
inline idx window_first(idx start, idx dilation) {
    return start >= 0 ? start : start + ceildiv(-start, dilation) * dilation;
}

// The NaN-propagating, first-index-on-ties running max, branch-free: on random
// data a taken/not-taken max comparison mispredicts about half the time.
template <class T>
inline void max_step(T v, idx i, T& m, idx& best) {
    const bool take = (v > m) | (v != v);
    m = take ? v : m;
    best = take ? i : best;
}

// 2x2 windows, dilation 1, fully inside the row pair (the common pooling layer).
template <class T>
inline void max_pool_row_2x2(const T* r0, const T* r1, idx h, idx W, idx sw, idx pw, idx wo_begin, idx wo_end,
                             T* yrow, std::int64_t* irow) {
    for (idx wo = wo_begin; wo < wo_end; ++wo) {
        const idx w = wo * sw - pw;
        T m = r0[w];
        idx best = h * W + w;
        max_step(r0[w + 1], h * W + w + 1, m, best);
        max_step(r1[w], (h + 1) * W + w, m, best);
        max_step(r1[w + 1], (h + 1) * W + w + 1, m, best);
        yrow[wo] = m;
        if (irow) irow[wo] = best;
    }
}

template <class T>
void max_pool2d_forward(const T* x, T* y, std::int64_t* ind, const PoolShape& p) {
    const idx HW = p.H * p.W, P = p.Ho * p.Wo;
#pragma omp parallel for num_threads(threads_for(p.planes)) schedule(static)
    for (idx t = 0; t < p.planes; ++t) {
        const T* xp = x + t * HW;
        T* yp = y + t * P;
        std::int64_t* ip = ind ? ind + t * P : nullptr;
        // output columns whose 2x2 window lies inside the row (fast path)
        idx lo2 = 0, hi2 = 0;
        const bool fast2 = p.kh == 2 && p.kw == 2 && p.dh == 1 && p.dw == 1;
        if (fast2) {
            valid_range(p.W - 1, p.Wo, p.sw, -p.pw, lo2, hi2);
        }
        for (idx ho = 0; ho < p.Ho; ++ho) {
            const idx h0 = ho * p.sh - p.ph;
            const idx hend = imin(h0 + (p.kh - 1) * p.dh + 1, p.H);
            const idx hstart = window_first(h0, p.dh);
            idx skip_begin = 0, skip_end = 0;  // columns done by the fast path
            if (fast2 && h0 >= 0 && h0 + 1 < p.H && lo2 < hi2) {
                max_pool_row_2x2(xp + h0 * p.W, xp + (h0 + 1) * p.W, h0, p.W, p.sw, p.pw, lo2, hi2,
                                 yp + ho * p.Wo, ip ? ip + ho * p.Wo : nullptr);
                skip_begin = lo2;
                skip_end = hi2;
            }
            for (idx wo = 0; wo < p.Wo; ++wo) {
                if (wo == skip_begin && skip_end > skip_begin) {
                    wo = skip_end - 1;
                    continue;
                }
                const idx w0 = wo * p.sw - p.pw;
                const idx wend = imin(w0 + (p.kw - 1) * p.dw + 1, p.W);
                const idx wstart = window_first(w0, p.dw);
                idx best = (hstart < hend && wstart < wend) ? hstart * p.W + wstart : -1;
                T m = -__builtin_inf();
                for (idx h = hstart; h < hend; h += p.dh)
                    for (idx w = wstart; w < wend; w += p.dw) max_step(xp[h * p.W + w], h * p.W + w, m, best);
                yp[ho * p.Wo + wo] = m;
                if (ip) ip[ho * p.Wo + wo] = best;
            }
        }
    }
}

// gx = 0, then each output's gradient goes to the input that won its window
// (index -1: none).
// A plane is owned by one thread and walked in order: deterministic.
template <class T>
bool max_pool2d_backward(const T* gy, const std::int64_t* ind, T* gx, const PoolShape& p) {
    const idx HW = p.H * p.W, P = p.Ho * p.Wo;
    idx bad = 0;
#pragma omp parallel for num_threads(threads_for(p.planes)) schedule(static) reduction(+ : bad)
    for (idx t = 0; t < p.planes; ++t) {
        T* gp = gx + t * HW;
        const T* g = gy + t * P;
        const std::int64_t* ip = ind + t * P;
        for (idx i = 0; i < HW; ++i) gp[i] = T(0);
        for (idx i = 0; i < P; ++i) {
            const std::int64_t j = ip[i];
            if (j == -1) continue;  // a window with no input
            if (j < 0 || j >= HW) {
                ++bad;
                continue;
            }
            gp[j] += g[i];
        }
    }
    return bad == 0;
}
