// conv2d by im2col + GEMM. Per (image, group):
//   forward      y_g (Kg, P)    = w_g (Kg, CRS) * col (CRS, P)
//   grad input   dcol (CRS, P)  = w_g^T * gy_g, then col2im adds dcol into gx
//   grad weight  gw_g (Kg, CRS) += gy_g (Kg, P) * col^T
// with CRS = C/G * R * S and P = Ho * Wo. A 1x1, stride-1, unpadded conv uses
// the input itself as the column matrix (no im2col). Otherwise the column
// matrix is built a band of output rows at a time, sized to stay in cache,
// so memory stays bounded (CRS x band) instead of CRS x P per image.
// Work is split over (image, group) pairs when there are enough of them,
// otherwise the GEMM itself runs on all threads. Grad weight sums fixed chunks
// of the batch in parallel and adds the chunks in order: deterministic.

// col (Cg*R*S, (ho1-ho0)*Wo) from xg (Cg, H, W): the columns of output rows [ho0, ho1)
template <class T>
void im2col(const T* xg, idx Cg, const ConvGeom& s, T* col, bool parallel, idx ho0, idx ho1, idx ld = 0) {
    const idx P = (ho1 - ho0) * s.Wo, rows = Cg * s.R * s.S;
    if (ld == 0) ld = P;  // the column matrix's row stride: wider to lay images side by side
#pragma omp parallel for num_threads(threads_for(rows)) if (parallel) schedule(static)
    for (idx row = 0; row < rows; ++row) {
        const idx c = row / (s.R * s.S), r = (row / s.S) % s.R, q = row % s.S;
        const T* xp = xg + c * s.H * s.W;
        T* dst = col + row * ld;
        const idx off = q * s.dw - s.pw;
        idx lo, hi;
        valid_range(s.W, s.Wo, s.sw, off, lo, hi);
        if (s.sw == 1) {
            // output rows [hlo, hhi) read real input rows; the rest are padding
            const idx hoff = r * s.dh - s.ph;
            idx hlo, hhi;
            valid_range(s.H, s.Ho, s.sh, hoff, hlo, hhi);
            hlo = imin(imax(hlo, ho0), ho1);
            hhi = imax(imin(hhi, ho1), hlo);
            for (idx i = 0; i < (hlo - ho0) * s.Wo; ++i) dst[i] = T(0);
            // xp + ... + off is only read at columns [lo, hi)
            gather_rows(dst + (hlo - ho0) * s.Wo, xp + (hlo * s.sh + hoff) * s.W + off, s.sh * s.W, hhi - hlo, lo,
                        hi, s.Wo);
            for (idx i = (hhi - ho0) * s.Wo; i < P; ++i) dst[i] = T(0);
            continue;
        }
        for (idx ho = ho0; ho < ho1; ++ho, dst += s.Wo) {
            const idx h = ho * s.sh - s.ph + r * s.dh;
            if (h < 0 || h >= s.H) {
                for (idx wo = 0; wo < s.Wo; ++wo) dst[wo] = T(0);
                continue;
            }
            const T* xrow = xp + h * s.W;
            for (idx wo = 0; wo < lo; ++wo) dst[wo] = T(0);
            for (idx wo = lo; wo < hi; ++wo) dst[wo] = xrow[wo * s.sw + off];
            for (idx wo = hi; wo < s.Wo; ++wo) dst[wo] = T(0);
        }
    }
}

// gxg (Cg, H, W) += col2im(dcol) for dcol (Cg*R*S, (ho1-ho0)*Wo), output rows
// [ho0, ho1). The order of additions is fixed: deterministic.
template <class T>
void col2im_add(const T* dcol, idx Cg, const ConvGeom& s, T* gxg, idx ho0, idx ho1) {
    const idx P = (ho1 - ho0) * s.Wo, RS = s.R * s.S;
    for (idx c = 0; c < Cg; ++c) {
        T* gp = gxg + c * s.H * s.W;
        for (idx rq = 0; rq < RS; ++rq) {
            const idx r = rq / s.S, q = rq % s.S;
            const T* src = dcol + (c * RS + rq) * P;
            const idx off = q * s.dw - s.pw;
            idx lo, hi;
            valid_range(s.W, s.Wo, s.sw, off, lo, hi);
            for (idx ho = ho0; ho < ho1; ++ho, src += s.Wo) {
                const idx h = ho * s.sh - s.ph + r * s.dh;
                if (h < 0 || h >= s.H) continue;
                T* grow = gp + h * s.W;
                if (s.sw == 1)
                    add_row(grow + off, src, lo, hi);
                else
                    for (idx wo = lo; wo < hi; ++wo) grow[wo * s.sw + off] += src[wo];
            }
        }
    }
}

// Output rows per column band: the band (CRS x rows*Wo) should stay in L2,
// as big as this machine's L2. Depends only on the shape and the machine,
// never on the thread count (determinism).
template <class T>
idx band_rows(const ConvGeom& s) {
    const idx band_bytes = cache_sizes().l2;
    const idx row_bytes = (s.C / s.G) * s.R * s.S * s.Wo * static_cast<idx>(sizeof(T));
    return imax(1, imin(s.Ho, band_bytes / imax(row_bytes, 1)));
}

// How many partial sums grad weight splits the batch into: up to 8, while the
// partials stay within 32 MB. A function of the shape only (determinism).
template <class T>
idx gw_chunks(const ConvGeom& s, idx wsize) {
    constexpr idx kMaxChunks = 8, kPartialBytes = idx(32) << 20;
    const idx by_memory = kPartialBytes / imax(wsize * static_cast<idx>(sizeof(T)), 1);
    return imax(1, imin(imin(s.N, kMaxChunks), by_memory));
}

// out[i] = the chunks' partial sums of element i (`chunks` arrays of `size`,
// one after another), added in chunk order: the same bits for any thread count.
// Blocks of 1024 elements, each chunk's block added in turn: the inner loop
// runs along contiguous elements and vectorizes.
template <class T>
void sum_chunks(const T* part, idx chunks, idx size, T* out) {
    constexpr idx kBlock = 1024;
    const idx blocks = (size + kBlock - 1) / kBlock;
#pragma omp parallel for num_threads(threads_for(size / 4096 + 1)) schedule(static)
    for (idx b = 0; b < blocks; ++b) {
        const idx i0 = b * kBlock, i1 = imin(size, i0 + kBlock);
        for (idx i = i0; i < i1; ++i) out[i] = part[i];
        for (idx j = 1; j < chunks; ++j) {
            const T* p = part + j * size;
            for (idx i = i0; i < i1; ++i) out[i] += p[i];
        }
    }
}

// Runs body(t, scratch, inner_parallel) for t < tasks, each with
// `scratch_elems` private elements (64-byte aligned): tasks over the threads
// where there are enough of them, else one after another with the threads
// inside each.
template <class T, class Body>
void for_each_task(idx tasks, idx scratch_elems, Body body) {
    scratch_elems = (scratch_elems + 15) / 16 * 16;
    const int nt = num_threads();
    if (nt > 1 && tasks >= nt) {
        T* buf = static_cast<T*>(workspace(static_cast<std::size_t>(nt * scratch_elems) * sizeof(T), 0));
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
        for (idx t = 0; t < tasks; ++t) body(t, buf + omp_get_thread_num() * scratch_elems, false);
    } else {
        T* buf = static_cast<T*>(workspace(static_cast<std::size_t>(scratch_elems) * sizeof(T), 0));
        for (idx t = 0; t < tasks; ++t) body(t, buf, true);
    }
}

// Runs body(n, g, scratch, inner_parallel) over all (image, group) pairs.
template <class T, class Body>
void for_each_image_group(const ConvGeom& s, idx scratch_elems, Body body) {
    for_each_task<T>(s.N * s.G, scratch_elems,
                     [&](idx t, T* scratch, bool inner) { body(t / s.G, t % s.G, scratch, inner); });
}

// Small feature maps (the deep layers' 4x4 and 7x7) make a GEMM per image
// thin: forward, its P columns fill part of one register tile; grad weight,
// its reduction of P reads and writes the whole weight gradient again for
// every image. Whole images go side by side instead, this many at a time
// (a function of the shape only), so that one GEMM spans at least kMinCols
// columns where kGroupBytes of scratch for `rows` rows allows.
// images_groupable: how many images a GEMM may take side by side, 0 where
// they go one by one (maps of kMinCols pixels or more, bands that cut a map,
// or a column matrix over kGroupBytes); images_per_gemm: how many it takes.
template <class T>
idx images_groupable(const ConvGeom& s, idx band, idx rows) {
    constexpr idx kMinCols = 256, kGroupBytes = idx(4) << 20;
    const idx P = s.Ho * s.Wo;
    if (band < s.Ho || P >= kMinCols) return 0;
    const idx by_memory = kGroupBytes / imax(1, rows * P * static_cast<idx>(sizeof(T)));
    return imin((kMinCols + P - 1) / P, by_memory);
}

template <class T>
idx images_per_gemm(const ConvGeom& s, idx band, idx rows) {
    return imax(1, imin(s.N, images_groupable<T>(s, band, rows)));
}

// The column matrices of images [n, n + m) of group g side by side: CRS rows of m*P.
template <class T>
void im2col_images(const T* x, const ConvGeom& s, idx n, idx m, idx g, T* wc, bool inner) {
    const idx Cg = s.C / s.G, P = s.Ho * s.Wo, HW = s.H * s.W, mp = m * P;
    for (idx i = 0; i < m; ++i) {
        const T* xg = x + ((n + i) * s.C + g * Cg) * HW;
        if (conv_is_pointwise(s))
            for (idx c = 0; c < Cg; ++c) std::memcpy(wc + c * mp + i * P, xg + c * HW, P * sizeof(T));
        else
            im2col(xg, Cg, s, wc + i * P, inner, 0, s.Ho, mp);
    }
}

// y_g of images [n, n + m) (Kg x m*P, in `out`) into each image's planes, plus bias.
template <class T>
void scatter_image_group(const T* out, const T* b, T* y, const ConvGeom& s, idx n, idx m, idx g) {
    const idx Kg = s.K / s.G, P = s.Ho * s.Wo, mp = m * P;
    for (idx i = 0; i < m; ++i)
        for (idx k = 0; k < Kg; ++k) {
            T* dst = y + ((n + i) * s.K + g * Kg + k) * P;
            const T* src = out + k * mp + i * P;
            if (!b) {
                std::memcpy(dst, src, P * sizeof(T));
                continue;
            }
            const T bv = b[g * Kg + k];
            for (idx p = 0; p < P; ++p) dst[p] = src[p] + bv;
        }
}

// gemm_rows' A read in place: row i starts at a + i * ld and its column j is
// at row start + off[j].
template <class T>
struct InPlaceRows {
    const T* a;
    idx ld;
    const idx* off;
    bool indirect(idx i0, idx live, const T** rows) const {
        constexpr int MR = GemmBlocking<T>::MR;
        if (live < MR) return false;
        for (int i = 0; i < MR; ++i) rows[i] = a + (i0 + i) * ld;
        return true;
    }
    const idx* offsets(idx pc) const { return off + pc; }
    void panel(idx i0, idx live, idx pc, idx kc, T* Ap) const {
        constexpr int MR = GemmBlocking<T>::MR;
        for (idx k = 0; k < kc; ++k)
            for (idx i = 0; i < MR; ++i) Ap[k * MR + i] = i < live ? a[(i0 + i) * ld + off[pc + k]] : T(0);
    }
};

// Whether conv2d_forward_im2col reads the weights in place instead of
// packing them: when all N images fit one group of side-by-side column
// matrices (one image too: a batch of one on a small map) and the weights
// (K x CRS) outnumber those columns (CRS x N*P), packing the columns is the
// smaller copy, and each packed weight would serve only a few column panels.
// (A function of the shape alone, not of the thread count: the two paths
// block the reduction differently.)
template <class T>
bool im2col_weights_in_place(const ConvGeom& s) {
    const idx CRS = s.C / s.G * s.R * s.S;
    const idx band = conv_is_pointwise(s) ? s.Ho : band_rows<T>(s);
    return images_groupable<T>(s, band, CRS + s.K / s.G) >= s.N && s.G == 1 && s.K >= s.N * s.Ho * s.Wo;
}

// The column matrix of all N images of a one-group conv (CRS x N*Ho*Wo)
// straight into pack_b_full's layout, each element read from a zero-padded
// copy of x (xpad: N*C planes of padded_extent) at its pixel's offset plus its
// tap's: no column matrix written and packed again, and no bounds tests per
// element (on 4x4 maps im2col's per-row bookkeeping had been 12% of a
// 512-channel layer's samples). poff: N*Ho*Wo offsets of scratch. Rows in
// (c, r, s) order, or with rsc in (r, s, c) order (channels_last weights').
template <class T>
void pack_patches_b(const T* x, const ConvGeom& s, T* xpad, idx* poff, T* bp, bool rsc) {
    constexpr int NR = GemmBlocking<T>::NR;
    idx Hp, Wp;
    padded_extent(s, Hp, Wp);
    const idx plane = Hp * Wp, P = s.Ho * s.Wo, cols = s.N * P, RS = s.R * s.S, CRS = s.C * RS;
    pad_nchw_planes(x, s, Hp, Wp, xpad);
    for (idx n = 0, p = 0; n < s.N; ++n)
        for (idx ho = 0; ho < s.Ho; ++ho)
            for (idx wo = 0; wo < s.Wo; ++wo, ++p) poff[p] = n * s.C * plane + ho * s.sh * Wp + wo * s.sw;
    const idx KC = rows_kc<T>();
    const idx panels = (cols + NR - 1) / NR, Npad = panels * NR, blocks = (CRS + KC - 1) / KC;
#pragma omp parallel for collapse(2) num_threads(threads_for(panels * blocks)) schedule(static)
    for (idx b = 0; b < blocks; ++b)
        for (idx jp = 0; jp < panels; ++jp) {
            const idx pc = b * KC, kc = imin(KC, CRS - pc), live = imin(NR, cols - jp * NR);
            const idx* po = poff + jp * NR;
            T* dst = bp + pc * Npad + jp * NR * kc;
            for (idx kk = 0; kk < kc; ++kk, dst += NR) {
                const idx k = pc + kk, c = rsc ? k % s.C : k / RS, rs = rsc ? k / s.C : k % RS;
                const idx r = rs / s.S, q = rs % s.S;
                const T* src = xpad + c * plane + r * s.dh * Wp + q * s.dw;
                for (idx j = 0; j < live; ++j) dst[j] = src[po[j]];
                for (idx j = live; j < NR; ++j) dst[j] = T(0);
            }
        }
}

// All images in one GEMM, out (K x N*P) = A (K x CRS) * col (CRS x N*P): the
// columns packed, A read in place by the indirect micro-kernel (row k at
// a + k * ld, its column j at offset_of(j) from there). x is NCHW, one group;
// store(out) writes the result where the caller wants it. rsc: the reduction
// runs over (r, s, c), the order of channels_last weights, so that their
// rows are read front to back, else over (c, r, s).
template <class T, class Offset, class Store>
void forward_weight_rows(const T* x, const T* a, idx ld, const Offset& offset_of, const ConvGeom& s,
                         const Store& store, bool rsc = false) {
    const idx CRS = s.C * s.R * s.S, cols = s.N * s.Ho * s.Wo;
    idx Hp, Wp;
    padded_extent(s, Hp, Wp);
    const idx pad_elems = (s.N * s.C * Hp * Wp + 15) / 16 * 16, out_elems = (s.K * cols + 15) / 16 * 16;
    T* xpad = static_cast<T*>(
        workspace(static_cast<std::size_t>(pad_elems + out_elems) * sizeof(T) + cols * sizeof(idx), 0));
    T* out = xpad + pad_elems;
    idx* poff = reinterpret_cast<idx*>(out + out_elems);
    const idx bp_elems = (packed_b_elems<T>(CRS, cols) + 15) / 16 * 16;
    T* bp = static_cast<T*>(workspace(static_cast<std::size_t>(bp_elems) * sizeof(T) + CRS * sizeof(idx), 1));
    idx* off = reinterpret_cast<idx*>(bp + bp_elems);
    for (idx j = 0; j < CRS; ++j) off[j] = offset_of(j);
    pack_patches_b(x, s, xpad, poff, bp, rsc);
    gemm_rows(s.K, cols, CRS, InPlaceRows<T>{a, ld, off}, bp, out, cols, [](idx, idx, idx, idx) {});
    store(static_cast<const T*>(out));
}

// The plain weights (K x CRS, row-major).
template <class T, class Store>
void forward_weight_rows(const T* x, const T* w, const ConvGeom& s, const Store& store) {
    forward_weight_rows(x, w, s.C * s.R * s.S, [](idx j) { return j; }, s, store);
}

template <class T>
void conv2d_forward_im2col(const T* x, const T* w, const T* b, T* y, const ConvGeom& s) {
    note_conv_algo(ConvAlgo::im2col);
    const idx Cg = s.C / s.G, Kg = s.K / s.G, P = s.Ho * s.Wo, CRS = Cg * s.R * s.S;
    const bool pointwise = conv_is_pointwise(s);
    const idx band = pointwise ? s.Ho : band_rows<T>(s);
    const idx col_elems = pointwise ? 0 : (CRS * band * s.Wo + 15) / 16 * 16;
    if (im2col_weights_in_place<T>(s))
        return forward_weight_rows(x, w, s, [&](const T* out) { scatter_image_group(out, b, y, s, 0, s.N, 0); });
    const idx group = images_per_gemm<T>(s, band, CRS + Kg);
    // the weights are packed once per call, not once per image and band
    const idx wpk_elems = packed_a_elems<T>(Kg, CRS);
    T* wpk = static_cast<T*>(workspace(static_cast<std::size_t>(s.G * wpk_elems) * sizeof(T), 1));
    for (idx g = 0; g < s.G; ++g) pack_a_full(Kg, CRS, w + g * Kg * CRS, CRS, idx(1), wpk + g * wpk_elems);
    if (group > 1) {  // y_g of `group` images at once: (Kg x m*P), then to each image's planes
        const idx wide = (group * P * (CRS + Kg) + 15) / 16 * 16, image_groups = (s.N + group - 1) / group;
        for_each_task<T>(image_groups * s.G, wide + gemm_pack_elems<T>(), [&](idx t, T* scratch, bool inner) {
            const idx n = (t / s.G) * group, g = t % s.G, m = imin(group, s.N - n), mp = m * P;
            T* out = scratch + CRS * mp;
            im2col_images(x, s, n, m, g, scratch, inner);
            gemm_blocked(Kg, mp, CRS, w + g * Kg * CRS, CRS, idx(1), scratch, mp, idx(1), out, mp, false,
                         scratch + wide, inner, wpk + g * wpk_elems);
            scatter_image_group(out, b, y, s, n, m, g);
        });
        return;
    }
    for_each_image_group<T>(s, col_elems + gemm_pack_elems<T>(), [&](idx n, idx g, T* scratch, bool inner) {
        const T* xg = x + (n * s.C + g * Cg) * s.H * s.W;
        const T* wg = w + g * Kg * CRS;
        const T* wg_packed = wpk + g * wpk_elems;
        T* yg = y + (n * s.K + g * Kg) * P;
        for (idx ho0 = 0; ho0 < s.Ho; ho0 += band) {
            const idx ho1 = imin(s.Ho, ho0 + band), pc = (ho1 - ho0) * s.Wo;
            const T* col = xg;
            if (!pointwise) {
                im2col(xg, Cg, s, scratch, inner, ho0, ho1);
                col = scratch;
            }
            gemm_blocked(Kg, pc, CRS, wg, CRS, idx(1), col, pc, idx(1), yg + ho0 * s.Wo, P, false,
                         scratch + col_elems, inner, wg_packed);
        }
        if (b)
            for (idx k = 0; k < Kg; ++k) {
                const T bv = b[g * Kg + k];
                T* row = yg + k * P;
                for (idx i = 0; i < P; ++i) row[i] += bv;
            }
    });
}

// the GEMM forward algorithm's dispatcher (kernels_isa.cpp)
template <class T>
void conv2d_forward_gemm(const T* x, const T* w, const T* b, T* y, const ConvGeom& s);
template <class T>
void nhwc_grad_weight(const T* gy, const T* x, T* gw, const ConvGeom& s, bool nchw, bool krsc);
template <class T>
bool grad_weight_winograd_pays(const ConvGeom& s);
template <class T>
bool conv2d_grad_weight_winograd(const T* gy, const T* x, T* gw, const ConvGeom& s, bool nchw);
inline bool conv_winograd_pays(const ConvGeom& s);

// Whether auto's grad weight runs an NCHW conv through the NHWC kernel's GEMM
// (image by image transposed to NHWC): on maps large enough not to be grouped
// (images_per_gemm), where the column matrix's transposing pack into the GEMM's
// panels cost more than the two transposes of each image; not for the short
// reductions gemm_nt takes.
inline bool gw_via_nhwc(const ConvGeom& s, idx crs) { return s.G == 1 && s.Ho * s.Wo >= 256 && crs >= 32; }

// Stride 1: the input gradient as a forward conv (grad_input_conv_shape) on
// the forward GEMM algorithms (Winograd, shifted GEMM) instead of a GEMM into
// a column buffer plus col2im. Returns false where it does not apply: strided
// convs, and fewer than 16 input channels per group, where the transposed
// conv's GEMM would have under 16 rows (mnist_conv1's one channel ran 1.3x slower).
template <class T>
bool grad_input_as_forward(const T* gy, const T* w, T* gx, const ConvGeom& s) {
    ConvGeom t;
    if (s.C / s.G < 16 || !grad_input_conv_shape(s, t)) return false;
    if (!conv_winograd_pays(t) && im2col_weights_in_place<T>(t)) {
        // conv2d_forward_gemm's choice for t, with the flipped filters read
        // where they lie: t's row c, column (k, r, s) is w[k, c, R-1-r, S-1-s]
        note_conv_algo(ConvAlgo::im2col);
        const idx RS = s.R * s.S, CRS = s.C * RS;
        const auto flipped = [RS, CRS](idx j) { return j / RS * CRS + (RS - 1 - j % RS); };
        forward_weight_rows(gy, w, RS, flipped, t, [&](const T* out) {
            scatter_image_group(out, static_cast<const T*>(nullptr), gx, t, 0, t.N, 0);
        });
        return true;
    }
    // slot 2: the forward path uses 0 and 1
    T* wt = static_cast<T*>(workspace(static_cast<std::size_t>(s.K * (s.C / s.G) * s.R * s.S) * sizeof(T), 2));
    flip_transpose_filters(w, s, wt);
    conv2d_forward_gemm(gy, wt, static_cast<const T*>(nullptr), gx, t);
    return true;
}

// grad input by col2im, or (with `as_forward`, where it applies) as the
// forward conv of gy with the flipped filters by conv2d_forward_gemm's rule
template <class T>
void conv2d_backward_im2col(const T* gy, const T* x, const T* w, T* gx, T* gw, T* gb, const ConvGeom& s,
                            bool as_forward = true) {
    const idx Cg = s.C / s.G, Kg = s.K / s.G, P = s.Ho * s.Wo, CRS = Cg * s.R * s.S, HW = s.H * s.W;
    const bool pointwise = conv_is_pointwise(s);
    const idx band = pointwise ? s.Ho : band_rows<T>(s);
    const idx col_elems = pointwise ? 0 : (CRS * band * s.Wo + 15) / 16 * 16;
    if (gx && as_forward && grad_input_as_forward(gy, w, gx, s)) gx = nullptr;  // done
    if (gx) {
        note_conv_algo(ConvAlgo::im2col);
        // w_g^T, packed once per call
        const idx wpk_elems = packed_a_elems<T>(CRS, Kg);
        T* wpk = static_cast<T*>(workspace(static_cast<std::size_t>(s.G * wpk_elems) * sizeof(T), 1));
        for (idx g = 0; g < s.G; ++g) pack_a_full(CRS, Kg, w + g * Kg * CRS, idx(1), CRS, wpk + g * wpk_elems);
        for_each_image_group<T>(s, col_elems + gemm_pack_elems<T>(),
                                [&](idx n, idx g, T* scratch, bool inner) {
                                    T* gxg = gx + (n * s.C + g * Cg) * HW;
                                    const T* gyg = gy + (n * s.K + g * Kg) * P;
                                    const T* wg = w + g * Kg * CRS;
                                    const T* wt_packed = wpk + g * wpk_elems;
                                    if (pointwise) {  // gx_g = w_g^T gy_g directly
                                        gemm_blocked(CRS, P, Kg, wg, idx(1), CRS, gyg, P, idx(1), gxg, P, false,
                                                     scratch, inner, wt_packed);
                                        return;
                                    }
                                    for (idx i = 0; i < Cg * HW; ++i) gxg[i] = T(0);
                                    for (idx ho0 = 0; ho0 < s.Ho; ho0 += band) {
                                        const idx ho1 = imin(s.Ho, ho0 + band), pc = (ho1 - ho0) * s.Wo;
                                        gemm_blocked(CRS, pc, Kg, wg, idx(1), CRS, gyg + ho0 * s.Wo, P, idx(1),
                                                     scratch, pc, false, scratch + col_elems, inner, wt_packed);
                                        col2im_add(scratch, Cg, s, gxg, ho0, ho1);
                                    }
                                });
    }
    if (gw && as_forward && grad_weight_winograd_pays<T>(s) && conv2d_grad_weight_winograd(gy, x, gw, s, true))
        gw = nullptr;
    if (gw && as_forward && grad_weight_taps_applies<T>(s)) {
        conv2d_grad_weight_taps(gy, x, gw, s);
        gw = nullptr;
    }
    if (gw && as_forward && grad_weight_implicit_applies<T>(s)) {
        conv2d_grad_weight_implicit(gy, x, gw, s, true);
        gw = nullptr;
    } else if (gw && as_forward && gw_via_nhwc(s, CRS)) {
        nhwc_grad_weight(gy, x, gw, s, true, false);
        gw = nullptr;
    }
    if (gw) {
        // Images are summed in a fixed number of chunks (a function of the shape
        // only), each chunk serially, then the chunks in order: parallel over
        // chunks, yet the same bits for any thread count.
        const idx band_scratch = (col_elems + gemm_pack_elems<T>() + 15) / 16 * 16;
        const idx wsize = s.K * CRS;
        // a reduction of fewer than 32 taps (a first layer: C*R*S = 25 for one
        // channel and 5x5) fills less than one packed panel: the unpacked
        // A B^T kernel ran LeNet's conv1 grad weight 2.4x faster; with 288 or
        // more taps it was 0.3-0.9x the packed GEMM's speed
        const bool nt_form = CRS < 32;
        const idx group = nt_form ? 1 : images_per_gemm<T>(s, band, CRS + Kg);
        // chunks hold whole groups: splitting the batch finer for the threads
        // would cut the images a GEMM puts side by side back to one or two
        // (ResNet's 7x7 and 4x4 layers), each chunk would rewrite the whole
        // partial gradient, and the GEMM is wide enough for the threads inside
        const idx chunks = group > 1 ? imax(1, imin(gw_chunks<T>(s, wsize), s.N / group)) : gw_chunks<T>(s, wsize);
        const idx wide_elems = (group * P * (CRS + Kg) + 15) / 16 * 16;
        const idx scratch = group > 1 ? wide_elems + (gemm_pack_elems<T>() + 15) / 16 * 16 : band_scratch;
        const int nt = num_threads();
        const bool outer = nt > 1 && chunks > 1;
        T* buf = static_cast<T*>(workspace(static_cast<std::size_t>((outer ? nt : 1) * scratch) * sizeof(T), 0));
        T* partial = chunks > 1 ? static_cast<T*>(workspace(static_cast<std::size_t>(chunks * wsize) * sizeof(T), 1))
                                : gw;
        // images [n, n + m) of group g: their column matrices side by side
        // (CRS x m*P) and their grad_output rows likewise (Kg x m*P), one GEMM
        auto accumulate_group = [&](idx n, idx m, idx g, T* dst, T* sbuf, bool inner, bool acc) {
            const idx mp = m * P;
            T* wc = sbuf;
            T* ga = sbuf + CRS * mp;
            im2col_images(x, s, n, m, g, wc, inner);
            for (idx i = 0; i < m; ++i)
                for (idx k = 0; k < Kg; ++k)
                    std::memcpy(ga + k * mp + i * P, gy + ((n + i) * s.K + g * Kg + k) * P, P * sizeof(T));
            gemm_blocked(Kg, CRS, mp, ga, mp, idx(1), wc, idx(1), mp, dst + g * Kg * CRS, CRS, acc, sbuf + wide_elems,
                         inner);
        };
        auto accumulate = [&](idx n0, idx n1, T* dst, T* sbuf, bool inner) {
            if (n0 == n1)
                for (idx i = 0; i < wsize; ++i) dst[i] = T(0);
            if (group > 1) {
                for (idx n = n0; n < n1; n += group)
                    for (idx g = 0; g < s.G; ++g) accumulate_group(n, imin(group, n1 - n), g, dst, sbuf, inner, n > n0);
                return;
            }
            for (idx n = n0; n < n1; ++n)
                for (idx g = 0; g < s.G; ++g) {
                    const T* xg = x + (n * s.C + g * Cg) * HW;
                    const T* gyg = gy + (n * s.K + g * Kg) * P;
                    for (idx ho0 = 0; ho0 < s.Ho; ho0 += band) {
                        const idx ho1 = imin(s.Ho, ho0 + band), pc = (ho1 - ho0) * s.Wo;
                        const T* col = xg;  // pointwise: band == Ho, the input is the column matrix
                        if (!pointwise) {
                            im2col(xg, Cg, s, sbuf, inner, ho0, ho1);
                            col = sbuf;
                        }
                        if (nt_form)
                            gemm_nt(Kg, CRS, pc, gyg + ho0 * s.Wo, P, col, pc, dst + g * Kg * CRS, CRS,
                                    n > n0 || ho0 > 0);
                        else
                            gemm_blocked(Kg, CRS, pc, gyg + ho0 * s.Wo, P, idx(1), col, idx(1), pc,
                                         dst + g * Kg * CRS, CRS, n > n0 || ho0 > 0, sbuf + col_elems, inner);
                    }
                }
        };
        if (outer) {
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
            for (idx j = 0; j < chunks; ++j)
                accumulate(j * s.N / chunks, (j + 1) * s.N / chunks, partial + j * wsize,
                           buf + omp_get_thread_num() * scratch, false);
        } else {
            for (idx j = 0; j < chunks; ++j)
                accumulate(j * s.N / chunks, (j + 1) * s.N / chunks, partial + j * wsize, buf, true);
        }
        if (chunks > 1) sum_chunks(partial, chunks, wsize, gw);
    }
    if (gb) bias_grad(gy, gb, s);
}
