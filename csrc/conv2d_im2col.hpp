// conv2d by im2col + GEMM. Per (image, group):
//   forward      y_g (Kg, P)    = w_g (Kg, CRS) * col (CRS, P)
//   grad input   dcol (CRS, P)  = w_g^T * gy_g, then col2im adds dcol into gx
//   grad weight  gw_g (Kg, CRS) += gy_g (Kg, P) * col^T
// with CRS = C/G * R * S and P = Ho * Wo. A 1x1, stride-1, unpadded conv uses
// the input itself as the column matrix (no im2col).
// Work is split over (image, group) pairs when there are enough of them,
// otherwise the GEMM itself runs on all threads. Grad weight reduces over the
// batch serially, with the GEMM parallel inside, so it is deterministic.

// col (Cg*R*S, Ho*Wo) from xg (Cg, H, W)
template <class T>
void im2col(const T* xg, idx Cg, const ConvShape& s, T* col, bool parallel) {
    const idx P = s.Ho * s.Wo, rows = Cg * s.R * s.S;
#pragma omp parallel for num_threads(threads_for(rows)) if (parallel) schedule(static)
    for (idx row = 0; row < rows; ++row) {
        const idx c = row / (s.R * s.S), r = (row / s.S) % s.R, q = row % s.S;
        const T* xp = xg + c * s.H * s.W;
        T* dst = col + row * P;
        const idx off = q * s.dw - s.pw;
        idx lo, hi;
        valid_range(s.W, s.Wo, s.sw, off, lo, hi);
        for (idx ho = 0; ho < s.Ho; ++ho, dst += s.Wo) {
            const idx h = ho * s.sh - s.ph + r * s.dh;
            if (h < 0 || h >= s.H) {
                for (idx wo = 0; wo < s.Wo; ++wo) dst[wo] = T(0);
                continue;
            }
            const T* xrow = xp + h * s.W;
            for (idx wo = 0; wo < lo; ++wo) dst[wo] = T(0);
            if (s.sw == 1)
                for (idx wo = lo; wo < hi; ++wo) dst[wo] = xrow[wo + off];
            else
                for (idx wo = lo; wo < hi; ++wo) dst[wo] = xrow[wo * s.sw + off];
            for (idx wo = hi; wo < s.Wo; ++wo) dst[wo] = T(0);
        }
    }
}

// gxg (Cg, H, W) += col2im(dcol). Rows of one channel touch only that channel's
// plane, so channels are independent; within a channel the order is fixed.
template <class T>
void col2im_add(const T* dcol, idx Cg, const ConvShape& s, T* gxg) {
    const idx P = s.Ho * s.Wo, RS = s.R * s.S;
    for (idx c = 0; c < Cg; ++c) {
        T* gp = gxg + c * s.H * s.W;
        for (idx rq = 0; rq < RS; ++rq) {
            const idx r = rq / s.S, q = rq % s.S;
            const T* src = dcol + (c * RS + rq) * P;
            const idx off = q * s.dw - s.pw;
            idx lo, hi;
            valid_range(s.W, s.Wo, s.sw, off, lo, hi);
            for (idx ho = 0; ho < s.Ho; ++ho, src += s.Wo) {
                const idx h = ho * s.sh - s.ph + r * s.dh;
                if (h < 0 || h >= s.H) continue;
                T* grow = gp + h * s.W;
                if (s.sw == 1)
                    for (idx wo = lo; wo < hi; ++wo) grow[wo + off] += src[wo];
                else
                    for (idx wo = lo; wo < hi; ++wo) grow[wo * s.sw + off] += src[wo];
            }
        }
    }
}

inline bool conv_is_pointwise(const ConvShape& s) {
    return s.R == 1 && s.S == 1 && s.sh == 1 && s.sw == 1 && s.ph == 0 && s.pw == 0 && s.Ho == s.H && s.Wo == s.W;
}

// Runs body(n, g, scratch, inner_parallel) over all (image, group) pairs, each
// with `scratch_elems` private elements (64-byte aligned).
template <class T, class Body>
void for_each_image_group(const ConvShape& s, idx scratch_elems, Body body) {
    scratch_elems = (scratch_elems + 15) / 16 * 16;
    const idx tasks = s.N * s.G;
    const int nt = num_threads();
    if (nt > 1 && tasks >= nt) {
        T* buf = static_cast<T*>(workspace(static_cast<std::size_t>(nt * scratch_elems) * sizeof(T), 0));
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
        for (idx t = 0; t < tasks; ++t)
            body(t / s.G, t % s.G, buf + omp_get_thread_num() * scratch_elems, false);
    } else {
        T* buf = static_cast<T*>(workspace(static_cast<std::size_t>(scratch_elems) * sizeof(T), 0));
        for (idx t = 0; t < tasks; ++t) body(t / s.G, t % s.G, buf, true);
    }
}

template <class T>
void conv2d_forward_im2col(const T* x, const T* w, const T* b, T* y, const ConvShape& s) {
    const idx Cg = s.C / s.G, Kg = s.K / s.G, P = s.Ho * s.Wo, CRS = Cg * s.R * s.S;
    const bool pointwise = conv_is_pointwise(s);
    const idx col_elems = pointwise ? 0 : (CRS * P + 15) / 16 * 16;
    for_each_image_group<T>(s, col_elems + GemmBlocking<T>::pack_elems, [&](idx n, idx g, T* scratch, bool inner) {
        const T* xg = x + (n * s.C + g * Cg) * s.H * s.W;
        const T* col = xg;
        if (!pointwise) {
            im2col(xg, Cg, s, scratch, inner);
            col = scratch;
        }
        T* yg = y + (n * s.K + g * Kg) * P;
        gemm_blocked(Kg, P, CRS, w + g * Kg * CRS, CRS, idx(1), col, P, idx(1), yg, P, false, scratch + col_elems,
                     inner);
        if (b)
            for (idx k = 0; k < Kg; ++k) {
                const T bv = b[g * Kg + k];
                T* row = yg + k * P;
                for (idx i = 0; i < P; ++i) row[i] += bv;
            }
    });
}

template <class T>
void conv2d_backward_im2col(const T* gy, const T* x, const T* w, T* gx, T* gw, T* gb, const ConvShape& s) {
    const idx Cg = s.C / s.G, Kg = s.K / s.G, P = s.Ho * s.Wo, CRS = Cg * s.R * s.S, HW = s.H * s.W;
    const bool pointwise = conv_is_pointwise(s);
    const idx col_elems = pointwise ? 0 : (CRS * P + 15) / 16 * 16;
    if (gx) {
        for_each_image_group<T>(s, col_elems + GemmBlocking<T>::pack_elems,
                                [&](idx n, idx g, T* scratch, bool inner) {
                                    T* gxg = gx + (n * s.C + g * Cg) * HW;
                                    const T* gyg = gy + (n * s.K + g * Kg) * P;
                                    const T* wg = w + g * Kg * CRS;
                                    T* dcol = pointwise ? gxg : scratch;
                                    gemm_blocked(CRS, P, Kg, wg, idx(1), CRS, gyg, P, idx(1), dcol, P, false,
                                                 scratch + col_elems, inner);
                                    if (!pointwise) {
                                        for (idx i = 0; i < Cg * HW; ++i) gxg[i] = T(0);
                                        col2im_add(dcol, Cg, s, gxg);
                                    }
                                });
    }
    if (gw) {
        T* buf = static_cast<T*>(
            workspace(static_cast<std::size_t>(col_elems + GemmBlocking<T>::pack_elems) * sizeof(T), 0));
        for (idx n = 0; n < s.N; ++n)
            for (idx g = 0; g < s.G; ++g) {
                const T* xg = x + (n * s.C + g * Cg) * HW;
                const T* col = xg;
                if (!pointwise) {
                    im2col(xg, Cg, s, buf, true);
                    col = buf;
                }
                gemm_blocked(Kg, CRS, P, gy + (n * s.K + g * Kg) * P, P, idx(1), col, idx(1), P, gw + g * Kg * CRS,
                             CRS, n > 0, buf + col_elems, true);
            }
    }
    if (gb) bias_grad(gy, gb, s);
}
