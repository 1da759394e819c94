// CUDA kernels of the CuPy backend (compiled at run time by CuPy's NVRTC;
// convkern/backend/cupy_gpu.py instantiates them for float and double).
// One thread per output element, grid-stride loops, 64-bit indices. Every
// backward pass is a gather (each output element reads what it depends on),
// so there are no atomics and results are deterministic.
// Conventions: NCHW, C-contiguous; padding top/left (bottom/right implied by
// Ho/Wo); max-pool windows with no input give -inf and index -1.

typedef long long i64;

// The output position o (< out) whose window tap t reads input position i,
// for stride s, padding p, dilation d; -1 if there is none.
__device__ inline i64 tap_output(i64 i, i64 p, i64 t, i64 d, i64 s, i64 out) {
    const i64 v = i + p - t * d;
    if (v < 0 || v % s) return -1;
    const i64 o = v / s;
    return o < out ? o : -1;
}

#define GRID_STRIDE(i, n) for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < (n); \
                               i += (i64)blockDim.x * gridDim.x)

// y (N, K, Ho, Wo) = conv(x (N, C, H, W), w (K, C/G, R, S)) + b
template <typename T>
__global__ void conv2d_forward_direct(const T* x, const T* w, const T* b, T* y, i64 N, i64 C, i64 H, i64 W,
                                      i64 K, i64 R, i64 S, i64 G, i64 sh, i64 sw, i64 ph, i64 pw, i64 dh,
                                      i64 dw, i64 Ho, i64 Wo, int has_bias) {
    const i64 Cg = C / G, Kg = K / G;
    GRID_STRIDE(i, N * K * Ho * Wo) {
        const i64 wo = i % Wo, ho = (i / Wo) % Ho, k = (i / (Wo * Ho)) % K, n = i / (Wo * Ho * K);
        const i64 g = k / Kg;
        T acc = has_bias ? b[k] : T(0);
        for (i64 c = 0; c < Cg; ++c) {
            const T* xp = x + ((n * C + g * Cg + c) * H) * W;
            const T* wp = w + (k * Cg + c) * R * S;
            // taps on padding multiply a zero, as a padded input would: a NaN or
            // inf weight there gives NaN, as in PyTorch (no host-side check needed)
            for (i64 r = 0; r < R; ++r) {
                const i64 h = ho * sh - ph + r * dh;
                const bool row_in = h >= 0 && h < H;
                for (i64 s = 0; s < S; ++s) {
                    const i64 iw = wo * sw - pw + s * dw;
                    const T v = row_in && iw >= 0 && iw < W ? xp[h * W + iw] : T(0);
                    acc += wp[r * S + s] * v;
                }
            }
        }
        y[i] = acc;
    }
}

// gx (N, C, H, W): each input element gathers the outputs that read it.
template <typename T>
__global__ void conv2d_grad_input_direct(const T* gy, const T* w, T* gx, i64 N, i64 C, i64 H, i64 W, i64 K,
                                         i64 R, i64 S, i64 G, i64 sh, i64 sw, i64 ph, i64 pw, i64 dh, i64 dw,
                                         i64 Ho, i64 Wo) {
    const i64 Cg = C / G, Kg = K / G;
    GRID_STRIDE(i, N * C * H * W) {
        const i64 iw = i % W, h = (i / W) % H, c = (i / (W * H)) % C, n = i / (W * H * C);
        const i64 g = c / Cg, cc = c % Cg;
        T acc = T(0);
        for (i64 r = 0; r < R; ++r) {
            const i64 ho = tap_output(h, ph, r, dh, sh, Ho);
            if (ho < 0) continue;
            for (i64 s = 0; s < S; ++s) {
                const i64 wo = tap_output(iw, pw, s, dw, sw, Wo);
                if (wo < 0) continue;
                for (i64 k = g * Kg; k < (g + 1) * Kg; ++k)
                    acc += gy[((n * K + k) * Ho + ho) * Wo + wo] * w[((k * Cg + cc) * R + r) * S + s];
            }
        }
        gx[i] = acc;
    }
}

// gw (K, C/G, R, S): each weight reduces over the batch and the output.
template <typename T>
__global__ void conv2d_grad_weight_direct(const T* gy, const T* x, T* gw, i64 N, i64 C, i64 H, i64 W, i64 K,
                                          i64 R, i64 S, i64 G, i64 sh, i64 sw, i64 ph, i64 pw, i64 dh, i64 dw,
                                          i64 Ho, i64 Wo) {
    const i64 Cg = C / G, Kg = K / G;
    GRID_STRIDE(i, K * Cg * R * S) {
        const i64 s = i % S, r = (i / S) % R, cc = (i / (S * R)) % Cg, k = i / (S * R * Cg);
        const i64 c = (k / Kg) * Cg + cc;
        T acc = T(0);
        for (i64 n = 0; n < N; ++n)
            for (i64 ho = 0; ho < Ho; ++ho) {  // padding multiplies a zero, as in forward
                const i64 h = ho * sh - ph + r * dh;
                const bool row_in = h >= 0 && h < H;
                for (i64 wo = 0; wo < Wo; ++wo) {
                    const i64 iw = wo * sw - pw + s * dw;
                    const T v = row_in && iw >= 0 && iw < W ? x[((n * C + c) * H + h) * W + iw] : T(0);
                    acc += gy[((n * K + k) * Ho + ho) * Wo + wo] * v;
                }
            }
        gw[i] = acc;
    }
}

// gb (K,) = sum of gy over n, ho, wo, accumulated in double.
template <typename T>
__global__ void conv2d_grad_bias(const T* gy, T* gb, i64 N, i64 K, i64 P) {
    GRID_STRIDE(k, K) {
        double acc = 0.0;
        for (i64 n = 0; n < N; ++n)
            for (i64 p = 0; p < P; ++p) acc += (double)gy[(n * K + k) * P + p];
        gb[k] = (T)acc;
    }
}

// col (N, C*R*S, Ho*Wo) from x (N, C, H, W)
template <typename T>
__global__ void im2col(const T* x, T* col, i64 N, i64 C, i64 H, i64 W, i64 R, i64 S, i64 sh, i64 sw, i64 ph,
                       i64 pw, i64 dh, i64 dw, i64 Ho, i64 Wo) {
    const i64 P = Ho * Wo, rows = C * R * S;
    GRID_STRIDE(i, N * rows * P) {
        const i64 p = i % P, row = (i / P) % rows, n = i / (P * rows);
        const i64 wo = p % Wo, ho = p / Wo, s = row % S, r = (row / S) % R, c = row / (S * R);
        const i64 h = ho * sh - ph + r * dh, iw = wo * sw - pw + s * dw;
        col[i] = (h >= 0 && h < H && iw >= 0 && iw < W) ? x[((n * C + c) * H + h) * W + iw] : T(0);
    }
}

// gx (N, C, H, W) = col2im(dcol (N, C*R*S, Ho*Wo)), each input gathering its taps
template <typename T>
__global__ void col2im(const T* dcol, T* gx, i64 N, i64 C, i64 H, i64 W, i64 R, i64 S, i64 sh, i64 sw, i64 ph,
                       i64 pw, i64 dh, i64 dw, i64 Ho, i64 Wo) {
    const i64 P = Ho * Wo;
    GRID_STRIDE(i, N * C * H * W) {
        const i64 iw = i % W, h = (i / W) % H, c = (i / (W * H)) % C, n = i / (W * H * C);
        T acc = T(0);
        for (i64 r = 0; r < R; ++r) {
            const i64 ho = tap_output(h, ph, r, dh, sh, Ho);
            if (ho < 0) continue;
            for (i64 s = 0; s < S; ++s) {
                const i64 wo = tap_output(iw, pw, s, dw, sw, Wo);
                if (wo < 0) continue;
                acc += dcol[(n * C * R * S + (c * R + r) * S + s) * P + ho * Wo + wo];
            }
        }
        gx[i] = acc;
    }
}

// planes (P, H, W) -> y, ind (P, Ho, Wo)
template <typename T>
__global__ void max_pool2d_forward(const T* x, T* y, i64* ind, i64 planes, i64 H, i64 W, i64 kh, i64 kw, i64 sh,
                                   i64 sw, i64 ph, i64 pw, i64 dh, i64 dw, i64 Ho, i64 Wo) {
    GRID_STRIDE(i, planes * Ho * Wo) {
        const i64 wo = i % Wo, ho = (i / Wo) % Ho, t = i / (Wo * Ho);
        const T* xp = x + t * H * W;
        T m = (T)__int_as_float(0xff800000);  // -inf
        i64 best = -1;
        for (i64 a = 0; a < kh; ++a) {
            const i64 h = ho * sh - ph + a * dh;
            if (h < 0 || h >= H) continue;
            for (i64 c = 0; c < kw; ++c) {
                const i64 iw = wo * sw - pw + c * dw;
                if (iw < 0 || iw >= W) continue;
                const T v = xp[h * W + iw];
                if (best == -1 || v > m || v != v) {  // first real position, then NaN or larger
                    m = v;
                    best = h * W + iw;
                }
            }
        }
        y[i] = m;
        ind[i] = best;
    }
}

// gx (P, H, W): each input gathers the outputs whose index names it. The
// gather sees only indices inside their own window, so the same launch sets
// flags bit 0 for an index outside [-1, H*W) (an error) and bit 1 for one in
// the plane but outside its window (not produced by this pooling): the caller
// then redoes gx with max_pool2d_backward_scatter.
template <typename T>
__global__ void max_pool2d_backward(const T* gy, const i64* ind, T* gx, int* flags, i64 planes, i64 H, i64 W,
                                    i64 kh, i64 kw, i64 sh, i64 sw, i64 ph, i64 pw, i64 dh, i64 dw, i64 Ho,
                                    i64 Wo) {
    GRID_STRIDE(i, planes * H * W) {
        const i64 iw = i % W, h = (i / W) % H, t = i / (W * H), self = h * W + iw;
        T acc = T(0);
        for (i64 a = 0; a < kh; ++a) {
            const i64 ho = tap_output(h, ph, a, dh, sh, Ho);
            if (ho < 0) continue;
            for (i64 c = 0; c < kw; ++c) {
                const i64 wo = tap_output(iw, pw, c, dw, sw, Wo);
                if (wo < 0) continue;
                const i64 o = (t * Ho + ho) * Wo + wo;
                if (ind[o] == self) acc += gy[o];
            }
        }
        gx[i] = acc;
    }
    GRID_STRIDE(o, planes * Ho * Wo) {
        const i64 j = ind[o];
        if (j == -1) continue;
        if (j < -1 || j >= H * W) {
            atomicOr(flags, 1);
            continue;
        }
        const i64 wo = o % Wo, ho = (o / Wo) % Ho, h = j / W, iw = j % W;
        const i64 dh0 = h - (ho * sh - ph), dw0 = iw - (wo * sw - pw);
        if (dh0 < 0 || dw0 < 0 || dh0 % dh || dw0 % dw || dh0 / dh >= kh || dw0 / dw >= kw) atomicOr(flags, 2);
    }
}

// gx for indices from elsewhere: one thread per plane adds gy at each index
// in output order (PyTorch's scatter, deterministic). Slow; only for the rare
// indices that max_pool2d_backward flags as outside their windows.
template <typename T>
__global__ void max_pool2d_backward_scatter(const T* gy, const i64* ind, T* gx, i64 planes, i64 HW, i64 P) {
    GRID_STRIDE(t, planes) {
        T* gp = gx + t * HW;
        for (i64 i = 0; i < HW; ++i) gp[i] = T(0);
        for (i64 o = t * P; o < (t + 1) * P; ++o)
            if (ind[o] >= 0) gp[ind[o]] += gy[o];
    }
}

struct AvgWindow {
    i64 h0, h1, w0, w1, divisor;
};

__device__ AvgWindow avg_window(i64 ho, i64 wo, i64 H, i64 W, i64 kh, i64 kw, i64 sh, i64 sw, i64 ph, i64 pw,
                                int count_include_pad, i64 divisor_override) {
    i64 h0 = ho * sh - ph, w0 = wo * sw - pw;
    i64 h1 = min(h0 + kh, H + ph), w1 = min(w0 + kw, W + pw);
    const i64 pool_size = (h1 - h0) * (w1 - w0);
    h0 = max(h0, (i64)0);
    w0 = max(w0, (i64)0);
    h1 = min(h1, H);
    w1 = min(w1, W);
    AvgWindow a{h0, h1, w0, w1, 0};
    if (h0 >= h1 || w0 >= w1) return a;
    a.divisor = divisor_override ? divisor_override : (count_include_pad ? pool_size : (h1 - h0) * (w1 - w0));
    return a;
}

template <typename T>
__global__ void avg_pool2d_forward(const T* x, T* y, i64 planes, i64 H, i64 W, i64 kh, i64 kw, i64 sh, i64 sw,
                                   i64 ph, i64 pw, i64 Ho, i64 Wo, int count_include_pad, i64 divisor_override) {
    GRID_STRIDE(i, planes * Ho * Wo) {
        const i64 wo = i % Wo, ho = (i / Wo) % Ho, t = i / (Wo * Ho);
        const AvgWindow a = avg_window(ho, wo, H, W, kh, kw, sh, sw, ph, pw, count_include_pad, divisor_override);
        T sum = T(0);
        for (i64 h = a.h0; h < a.h1; ++h)
            for (i64 iw = a.w0; iw < a.w1; ++iw) sum += x[(t * H + h) * W + iw];
        y[i] = a.divisor ? sum / (T)a.divisor : T(0);
    }
}

template <typename T>
__global__ void avg_pool2d_backward(const T* gy, T* gx, i64 planes, i64 H, i64 W, i64 kh, i64 kw, i64 sh,
                                    i64 sw, i64 ph, i64 pw, i64 Ho, i64 Wo, int count_include_pad,
                                    i64 divisor_override) {
    GRID_STRIDE(i, planes * H * W) {
        const i64 iw = i % W, h = (i / W) % H, t = i / (W * H);
        // outputs whose (unclipped) window [o*s - p, o*s - p + k) contains h
        const i64 ho_lo = max((i64)0, (h + ph - kh + sh) / sh), ho_hi = min(Ho - 1, (h + ph) / sh);
        const i64 wo_lo = max((i64)0, (iw + pw - kw + sw) / sw), wo_hi = min(Wo - 1, (iw + pw) / sw);
        T acc = T(0);
        for (i64 ho = ho_lo; ho <= ho_hi; ++ho)
            for (i64 wo = wo_lo; wo <= wo_hi; ++wo) {
                const AvgWindow a =
                    avg_window(ho, wo, H, W, kh, kw, sh, sw, ph, pw, count_include_pad, divisor_override);
                if (!a.divisor || h < a.h0 || h >= a.h1 || iw < a.w0 || iw >= a.w1) continue;
                acc += gy[(t * Ho + ho) * Wo + wo] / (T)a.divisor;
            }
        gx[i] = acc;
    }
}

template <typename T>
__global__ void relu_forward(const T* x, T* y, i64 n) {
    GRID_STRIDE(i, n) {
        const T v = x[i];
        y[i] = (v > T(0) || v != v) ? v : T(0);
    }
}

template <typename T>
__global__ void relu_backward(const T* gy, const T* x, T* gx, i64 n) {
    GRID_STRIDE(i, n) { gx[i] = x[i] <= T(0) ? T(0) : gy[i]; }
}
