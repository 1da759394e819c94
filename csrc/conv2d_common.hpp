// Pieces shared by both conv2d algorithms.

// y[n, k, :] += bias[k] over every output plane.
template <class T>
void add_bias(T* y, const T* b, const ConvGeom& s) {
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
void bias_grad(const T* gy, T* gb, const ConvGeom& s) {
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

// With stride 1 the input gradient is itself a convolution: of gy with the
// filters flipped in space and transposed (K <-> C within each group),
// dilation unchanged, padding (R-1)*dh - ph (gy rows past its end read as
// zero padding, which covers asymmetric padding). Sets t to that conv's shape;
// false where it does not apply (strided, or padding beyond the kernel's reach).
inline bool grad_input_conv_shape(const ConvGeom& s, ConvGeom& t) {
    const idx ph2 = (s.R - 1) * s.dh - s.ph, pw2 = (s.S - 1) * s.dw - s.pw;
    if (s.sh != 1 || s.sw != 1 || ph2 < 0 || pw2 < 0) return false;
    t = ConvGeom{s.N, s.K, s.Ho, s.Wo, s.C, s.R, s.S, s.G, 1, 1, ph2, pw2, s.dh, s.dw, s.H, s.W};
    return true;
}

// wt[g*Cg + c][k][r][s] = w[g*Kg + k][c][R-1-r][S-1-s]: the filters of that conv
template <class T>
void flip_transpose_filters(const T* w, const ConvGeom& s, T* wt, bool krsc = false) {
    const idx Cg = s.C / s.G, Kg = s.K / s.G, RS = s.R * s.S;
#pragma omp parallel for num_threads(threads_for(s.G * Cg)) schedule(static)
    for (idx gc = 0; gc < s.G * Cg; ++gc) {
        const idx g = gc / Cg, c = gc % Cg;
        for (idx k = 0; k < Kg; ++k) {
            T* dst = wt + ((g * Cg + c) * Kg + k) * RS;
            if (krsc) {  // w (K, R, S, C/G): filter k's channel c is RS values Cg apart
                const T* src = w + (g * Kg + k) * RS * Cg + c;
                for (idx i = 0; i < RS; ++i) dst[i] = src[(RS - 1 - i) * Cg];
            } else {
                const T* src = w + ((g * Kg + k) * Cg + c) * RS;
                for (idx i = 0; i < RS; ++i) dst[i] = src[RS - 1 - i];
            }
        }
    }
}

// Lanes 0, 2, 4, ... of two vectors side by side: the shuffle mask.
template <class M, int... l>
constexpr M even_lanes_mask(std::integer_sequence<int, l...>) {
    return M{(2 * l)...};
}

// Copies plane src (H x W) into dst (`elems` elements, zeroed first, rows
// `stride` apart) with dst (i, j) = src (i * sh + h0, j * sw + w0) for the i <
// rows, j < stride that fall inside src. A zero-padded copy is h0 = -ph,
// w0 = -pw with unit steps; a strided conv's phase plane steps by the stride.
// With CheckFinite, also returns whether a copied value is inf or NaN (v - v
// is 0 only for finite v: a branch-free test fused with the copy).
template <bool CheckFinite, class T>
bool copy_padded_plane(const T* src, idx H, idx W, idx h0, idx w0, idx sh, idx sw, T* dst, idx rows, idx stride,
                       idx elems) {
    std::memset(dst, 0, static_cast<std::size_t>(elems) * sizeof(T));
    idx ilo, ihi, jlo, jhi;
    valid_range(H, rows, sh, h0, ilo, ihi);
    valid_range(W, stride, sw, w0, jlo, jhi);
    int bad = 0;
    // (one loop per kind of copy: a row loop that tested sw in each row cost a
    // small stride-1 depthwise conv measurably more instructions)
    if constexpr (CheckFinite) {
        for (idx i = ilo; i < ihi; ++i) {
            const T* in = src + (i * sh + h0) * W;
            T* row = dst + i * stride;
            for (idx j = jlo; j < jhi; ++j) {
                const T v = in[j * sw + w0];
                row[j] = v;
                bad |= !(v - v == T(0));
            }
        }
    } else if (sw == 1) {
        for (idx i = ilo; i < ihi; ++i)
            std::memcpy(dst + i * stride + jlo, src + (i * sh + h0) * W + jlo + w0,
                        static_cast<std::size_t>(jhi - jlo) * sizeof(T));
    } else if (sw == 2) {
        // (a stride-2 conv's phase plane: element by element, this copy
        // took most of a stride-2 depthwise conv's time)
        typedef typename Vec<T>::type V;
        typedef typename std::conditional<sizeof(T) == 4, int, long long>::type I;
        typedef I M __attribute__((vector_size(CK_VEC_BYTES)));
        constexpr int L = CK_VEC_BYTES / sizeof(T);
        constexpr M even = even_lanes_mask<M>(std::make_integer_sequence<int, L>());
        for (idx i = ilo; i < ihi; ++i) {
            const T* in = src + (i * sh + h0) * W;
            T* row = dst + i * stride;
            idx j = jlo;
            for (; j + L <= jhi && 2 * (j + L) + w0 <= W; j += L)  // (both vectors inside the row)
                vstore(row + j, __builtin_shuffle(vload<V>(in + 2 * j + w0), vload<V>(in + 2 * j + w0 + L), even));
            for (; j < jhi; ++j) row[j] = in[2 * j + w0];
        }
    } else {
        for (idx i = ilo; i < ihi; ++i) {
            const T* in = src + (i * sh + h0) * W;
            T* row = dst + i * stride;
            for (idx j = jlo; j < jhi; ++j) row[j] = in[j * sw + w0];
        }
    }
    return bad != 0;
}

// A 1x1 stride-1 unpadded conv: the input is its own column matrix.
inline bool conv_is_pointwise(const ConvGeom& s) {
    return s.R == 1 && s.S == 1 && s.sh == 1 && s.sw == 1 && s.ph == 0 && s.pw == 0 && s.Ho == s.H && s.Wo == s.W;
}
