// max and average pooling on channels_last (NHWC) arrays, with the same rules
// as the plane kernels (max_pool2d.hpp, avg_pool2d.hpp): indices are
// h*W + w within each (n, c) plane, NaN wins, ties keep the first position
// (windows are read row by row, as there), an empty window yields -inf and
// index -1. The innermost loops run across channels, which are contiguous.
// PoolGeom.planes is the image count N here; `C` is passed beside it.

// out[c] = the window's max (NaN wins) for every channel, L channels a vector
template <class T>
inline void max_window_nhwc(const T* px, T* out, idx hstart, idx hend, idx wstart, idx wend, const PoolGeom& p,
                            idx C) {
    typedef typename Vec<T>::type V;
    constexpr int L = CK_VEC_BYTES / sizeof(T);
    idx c = 0;
    for (; c + L <= C; c += L) {
        V m = V{} - __builtin_inf();
        for (idx h = hstart; h < hend; h += p.dh)
            for (idx w = wstart; w < wend; w += p.dw) {
                const V v = vload<V>(px + (h * p.W + w) * C + c);
                m = ((v > m) | (v != v)) ? v : m;
            }
        vstore(out + c, m);
    }
    for (; c < C; ++c) {
        T m = -__builtin_inf();
        for (idx h = hstart; h < hend; h += p.dh)
            for (idx w = wstart; w < wend; w += p.dw) {
                const T v = px[(h * p.W + w) * C + c];
                m = ((v > m) | (v != v)) ? v : m;
            }
        out[c] = m;
    }
}

template <class T>
void max_pool2d_forward_nhwc(const T* x, T* y, std::int64_t* ind, const PoolGeom& p, idx C) {
    const idx rows = p.planes * p.Ho;
#pragma omp parallel for num_threads(threads_for(rows)) schedule(static)
    for (idx t = 0; t < rows; ++t) {
        const idx n = t / p.Ho, ho = t % p.Ho;
        const idx h0 = ho * p.sh - p.ph, hend = imin(h0 + (p.kh - 1) * p.dh + 1, p.H), hstart = window_first(h0, p.dh);
        for (idx wo = 0; wo < p.Wo; ++wo) {
            const idx w0 = wo * p.sw - p.pw, wend = imin(w0 + (p.kw - 1) * p.dw + 1, p.W);
            const idx wstart = window_first(w0, p.dw);
            const std::int64_t first = (hstart < hend && wstart < wend) ? hstart * p.W + wstart : -1;
            T* out = y + ((n * p.Ho + ho) * p.Wo + wo) * C;
            std::int64_t* oi = ind ? ind + ((n * p.Ho + ho) * p.Wo + wo) * C : nullptr;
            if (!oi) {  // vectors of channels kept in registers over the window, stored once
                max_window_nhwc(x + n * p.H * p.W * C, out, hstart, hend, wstart, wend, p, C);
                continue;
            }
            for (idx c = 0; c < C; ++c) out[c] = -__builtin_inf();
            for (idx c = 0; c < C; ++c) oi[c] = first;
            for (idx h = hstart; h < hend; h += p.dh)
                for (idx w = wstart; w < wend; w += p.dw) {
                    const T* in = x + ((n * p.H + h) * p.W + w) * C;
                    const std::int64_t pos = h * p.W + w;
#pragma omp simd
                    for (idx c = 0; c < C; ++c) {  // max_step across channels
                        const T v = in[c];
                        const bool take = (v > out[c]) | (v != v);
                        out[c] = take ? v : out[c];
                        oi[c] = take ? pos : oi[c];
                    }
                }
        }
    }
}

template <class T>
bool max_pool2d_backward_nhwc(const T* gy, const std::int64_t* ind, T* gx, const PoolGeom& p, idx C) {
    const idx HW = p.H * p.W, OP = p.Ho * p.Wo;
    bool ok = true;
#pragma omp parallel for num_threads(threads_for(p.planes)) schedule(static) reduction(&& : ok)
    for (idx n = 0; n < p.planes; ++n) {
        T* g = gx + n * HW * C;
        for (idx i = 0; i < HW * C; ++i) g[i] = T(0);
        for (idx o = 0; o < OP; ++o) {
            const T* go = gy + (n * OP + o) * C;
            const std::int64_t* io = ind + (n * OP + o) * C;
            for (idx c = 0; c < C; ++c) {
                const std::int64_t i = io[c];
                if (i == -1) continue;  // an empty window has no input to send to
                if (i < 0 || i >= HW) {
                    ok = false;
                    continue;
                }
                g[i * C + c] += go[c];
            }
        }
    }
    return ok;
}

template <class T>
void avg_pool2d_forward_nhwc(const T* x, T* y, const PoolGeom& p, idx C) {
    const idx rows = p.planes * p.Ho;
#pragma omp parallel for num_threads(threads_for(rows)) schedule(static)
    for (idx t = 0; t < rows; ++t) {
        const idx n = t / p.Ho, ho = t % p.Ho;
        for (idx wo = 0; wo < p.Wo; ++wo) {
            const AvgWindow a = avg_window(ho, wo, p);
            T* out = y + ((n * p.Ho + ho) * p.Wo + wo) * C;
            for (idx c = 0; c < C; ++c) out[c] = T(0);
            for (idx h = a.h0; h < a.h1; ++h)
                for (idx w = a.w0; w < a.w1; ++w) {
                    const T* in = x + ((n * p.H + h) * p.W + w) * C;
#pragma omp simd
                    for (idx c = 0; c < C; ++c) out[c] += in[c];
                }
            const T div = a.divisor ? static_cast<T>(a.divisor) : T(0);
            for (idx c = 0; c < C; ++c) out[c] = a.divisor ? out[c] / div : T(0);
        }
    }
}

template <class T>
void avg_pool2d_backward_nhwc(const T* gy, T* gx, const PoolGeom& p, idx C) {
    const idx HW = p.H * p.W;
#pragma omp parallel for num_threads(threads_for(p.planes)) schedule(static)
    for (idx n = 0; n < p.planes; ++n) {
        T* g = gx + n * HW * C;
        for (idx i = 0; i < HW * C; ++i) g[i] = T(0);
        for (idx ho = 0; ho < p.Ho; ++ho)
            for (idx wo = 0; wo < p.Wo; ++wo) {
                const AvgWindow a = avg_window(ho, wo, p);
                if (!a.divisor) continue;
                const T* go = gy + ((n * p.Ho + ho) * p.Wo + wo) * C;
                const T div = static_cast<T>(a.divisor);
                for (idx h = a.h0; h < a.h1; ++h)
                    for (idx w = a.w0; w < a.w1; ++w) {
                        T* gi = g + (h * p.W + w) * C;
#pragma omp simd
                        for (idx c = 0; c < C; ++c) gi[c] += go[c] / div;
                    }
            }
    }
}
