// conv2d grad weight as an implicit GEMM: no column matrix, no packed copy
// of the patches.
//
//   gW (K x RSC) = gy^T (K x M) * patches (M x RSC)
//
// with M = N*Ho*Wo output pixels and RSC = R*S*C taps in (r, s, c) order.
// Where C is a multiple of the register panel's width NR, every NR-column
// panel of the patch matrix is NR consecutive channels of one tap, so row m
// of a panel is NR consecutive floats of a zero-padded NHWC copy of the
// input, at pixel m's offset plus the tap's: the micro-kernel reads B there,
// in place. The column-matrix route writes each pixel's R*S*C patch and
// packs it again for the GEMM, and each packed panel then meets only K/MR
// row panels: on small maps, where it lays images side by side, those
// copies weigh as much as a good part of the multiply.
//
// The batch goes in chunks of images whose padded NHWC input (and, from
// NCHW, transposed grad_output) fill at most L2; the threads split the column
// panels, each packing the chunk's gy^T block by block for itself, so each
// element of gW is reduced over the pixels in order by one thread, chunk
// after chunk: the same bits for any thread count.

// Whether conv2d's grad weight takes the implicit GEMM: one group, channels
// a multiple of the panel width, a patch of more than one tap (a 1x1 conv's
// column matrix is at most its input), maps under 256 pixels (larger ones go
// to the band-by-band GEMM, whose column band stays in L2 and which measured
// as fast), and more pixels than filters: the result comes out tap-major
// (K x RSC) and is permuted to (K, C, R, S) in one more pass over the
// weights, which for a deep layer on a small map (512 filters on 128
// pixels) cost more than the column matrix it saves.
template <class T>
bool grad_weight_implicit_applies(const ConvGeom& s) {
    return s.G == 1 && s.C % GemmBlocking<T>::NR == 0 && s.R * s.S > 1 && s.Ho * s.Wo < 256 &&
           s.N * s.Ho * s.Wo > s.K;
}

// C (mr x NV vectors of an RT-row tile) (+)= A (packed panel, MR per step)
// times kc rows of B, row k read at b + off[k].
template <class T, int RT, int NV>
__attribute__((always_inline)) inline void micro_b_rows(idx kc, const T* __restrict Ap, const T* b,
                                                        const idx* __restrict off, T* C, idx ldc, idx mr,
                                                        bool accumulate) {
    typedef GemmBlocking<T> GB;
    typedef typename GB::V V;
    constexpr int MR = GB::MR, L = GB::L;
    V c[RT][NV] = {};
    constexpr idx kAhead = 8;
    for (idx k = 0; k < kc; ++k) {
        const T* bk = b + off[k];
        // B's rows are scattered (one per pixel): ask for one a few steps ahead
        if (k + kAhead < kc) {
            const T* bn = b + off[k + kAhead];
#pragma GCC unroll 2
            for (int v = 0; v < NV; ++v) __builtin_prefetch(bn + v * L, 0, 3);
        }
        tile_step<T, RT, NV>(c, Ap, bk);
        Ap += MR;
    }
    store_tile<T, RT, NV>(c, C, ldc, mr, NV * L, accumulate);
}

template <class T>
void micro_b_rows_edge(idx kc, const T* Ap, const T* b, const idx* off, T* C, idx ldc, idx mr, bool accumulate) {
    typedef GemmBlocking<T> GB;
    constexpr int NV = GB::NR / GB::L;
    if constexpr (GB::MR == 12) {
        if (mr > 8) return micro_b_rows<T, 12, NV>(kc, Ap, b, off, C, ldc, mr, accumulate);
        if (mr > 4) return micro_b_rows<T, 8, NV>(kc, Ap, b, off, C, ldc, mr, accumulate);
        return micro_b_rows<T, 4, NV>(kc, Ap, b, off, C, ldc, mr, accumulate);
    } else {
        if (mr > 3) return micro_b_rows<T, 6, NV>(kc, Ap, b, off, C, ldc, mr, accumulate);
        return micro_b_rows<T, 3, NV>(kc, Ap, b, off, C, ldc, mr, accumulate);
    }
}

// gW (K x RSC, ldw RSC) (+)= gy^T patches over `pixels` pixels: gy rows at
// gys (K apart), pixel m's patch at xs + off[m], panel jp's tap at
// xs + panel_off[jp].
template <class T>
void grad_weight_panels(const T* xs, const T* gys, idx K, idx RSC, idx pixels, const idx* off,
                        const idx* panel_off, T* gwk, bool accumulate) {
    typedef GemmBlocking<T> GB;
    constexpr int MR = GB::MR, NR = GB::NR;
    const idx KC = gemm_dims<T>().kc, npanels = RSC / NR, mpanels = (K + MR - 1) / MR;
    const idx abuf = (mpanels * MR * KC + 15) / 16 * 16;
    const int nt = threads_for(npanels);
    T* ws = static_cast<T*>(workspace(static_cast<std::size_t>(nt * abuf) * sizeof(T), 3));
#pragma omp parallel num_threads(nt)
    {
        const int t = omp_get_thread_num(), n = omp_get_num_threads();
        const idx jp0 = t * npanels / n, jp1 = (t + 1) * npanels / n;
        T* Ap = ws + t * abuf;
        for (idx pc = 0; pc < pixels && jp0 < jp1; pc += KC) {
            const idx kc = imin(KC, pixels - pc);
            for (idx ip = 0; ip < mpanels; ++ip)
                pack_a_panel(kc, imin(idx(MR), K - ip * MR), gys + pc * K + ip * MR, idx(1), K, Ap + ip * MR * kc);
            for (idx jp = jp0; jp < jp1; ++jp)
                for (idx ip = 0; ip < mpanels; ++ip)
                    micro_b_rows_edge(kc, Ap + ip * MR * kc, xs + panel_off[jp], off + pc,
                                      gwk + ip * MR * RSC + jp * NR, RSC, imin(idx(MR), K - ip * MR),
                                      accumulate || pc > 0);
        }
    }
}

// The zero-padded input's rows and columns: the top and left padding, then
// as far as the last tap reaches and no further.
inline void padded_extent(const ConvGeom& s, idx& Hp, idx& Wp) {
    Hp = imax(s.H + s.ph, (s.Ho - 1) * s.sh + (s.R - 1) * s.dh + 1);
    Wp = imax(s.W + s.pw, (s.Wo - 1) * s.sw + (s.S - 1) * s.dw + 1);
}

// m NHWC images into xp with s's top and left padding, zeros to Hp x Wp
template <class T>
void pad_nhwc_images(const T* src, const ConvGeom& s, idx m, idx Hp, idx Wp, T* xp) {
    const std::size_t row = static_cast<std::size_t>(s.C) * sizeof(T);
    const idx rows = m * Hp;
#pragma omp parallel for num_threads(threads_for(rows)) schedule(static)
    for (idx t = 0; t < rows; ++t) {
        const idx n = t / Hp, h = t % Hp - s.ph;
        T* dst = xp + t * Wp * s.C;
        if (h < 0 || h >= s.H) {
            std::memset(dst, 0, static_cast<std::size_t>(Wp) * row);
            continue;
        }
        std::memset(dst, 0, static_cast<std::size_t>(s.pw) * row);
        std::memcpy(dst + s.pw * s.C, src + (n * s.H + h) * s.W * s.C, static_cast<std::size_t>(s.W) * row);
        std::memset(dst + (s.pw + s.W) * s.C, 0, static_cast<std::size_t>(Wp - s.pw - s.W) * row);
    }
}

// The N*C planes of NCHW x into xpad, each Hp x Wp with s's top and left
// padding and zeros elsewhere
template <class T>
void pad_nchw_planes(const T* x, const ConvGeom& s, idx Hp, idx Wp, T* xpad) {
    const idx plane = Hp * Wp;
#pragma omp parallel for num_threads(threads_for(s.N * s.C / 8 + 1)) schedule(static)
    for (idx t = 0; t < s.N * s.C; ++t)
        copy_padded_plane<false>(x + t * s.H * s.W, s.H, s.W, -s.ph, -s.pw, 1, 1, xpad + t * plane, Hp, Wp, plane);
}

// gw (K, C, R, S) of a one-group conv; x and gy NHWC, or NCHW with `nchw`.
template <class T>
void conv2d_grad_weight_implicit(const T* gy, const T* x, T* gw, const ConvGeom& s, bool nchw) {
    const idx chunk_bytes = cache_sizes().l2;
    const idx RSC = s.R * s.S * s.C, P = s.Ho * s.Wo, sz = static_cast<idx>(sizeof(T));
    if (s.N * P == 0) {  // no pixels: a zero gradient
        std::memset(gw, 0, static_cast<std::size_t>(s.K * RSC) * sizeof(T));
        return;
    }
    idx Hp, Wp;
    padded_extent(s, Hp, Wp);
    const bool padded = Hp != s.H || Wp != s.W;
    const idx pad_elems = padded ? (Hp * Wp * s.C + 15) / 16 * 16 : 0;
    // NCHW: each image's input and grad_output transposed to NHWC first
    const idx xt_elems = nchw ? (s.C * s.H * s.W + 15) / 16 * 16 : 0, gt_elems = nchw ? (s.K * P + 15) / 16 * 16 : 0;
    const idx per_image = pad_elems + xt_elems + gt_elems;
    const idx imgs = imax(1, imin(s.N, chunk_bytes / imax(1, per_image * sz)));
    T* xp = static_cast<T*>(
        workspace(static_cast<std::size_t>(imgs * (pad_elems + xt_elems + gt_elems)) * sizeof(T), 0));
    T* xt = xp + imgs * pad_elems;
    T* gt = xt + imgs * xt_elems;
    const idx gwk_elems = (s.K * RSC + 15) / 16 * 16;
    T* gwk = static_cast<T*>(workspace(
        static_cast<std::size_t>(gwk_elems) * sizeof(T) + (RSC / GemmBlocking<T>::NR + imgs * P) * sizeof(idx), 1));
    idx* panel_off = reinterpret_cast<idx*>(gwk + gwk_elems);
    idx* off = panel_off + RSC / GemmBlocking<T>::NR;
    const idx ldx = padded ? Wp : s.W, hx = padded ? Hp : s.H;
    for (idx jp = 0; jp < RSC / GemmBlocking<T>::NR; ++jp) {
        const idx j = jp * GemmBlocking<T>::NR, rs = j / s.C;
        panel_off[jp] = ((rs / s.S) * s.dh * ldx + (rs % s.S) * s.dw) * s.C + j % s.C;
    }
    for (idx n = 0, m = 0; n < imgs; ++n)
        for (idx ho = 0; ho < s.Ho; ++ho)
            for (idx wo = 0; wo < s.Wo; ++wo, ++m) off[m] = ((n * hx + ho * s.sh) * ldx + wo * s.sw) * s.C;
    for (idx n0 = 0; n0 < s.N; n0 += imgs) {
        const idx m = imin(imgs, s.N - n0);
        const T* xs = x + n0 * s.C * s.H * s.W;
        if (nchw) {
            transpose_batched(xs, xt, m, s.C, s.H * s.W);
            xs = xt;
        }
        if (padded) {
            pad_nhwc_images(xs, s, m, Hp, Wp, xp);
            xs = xp;
        }
        const T* gys = gy + n0 * P * s.K;
        if (nchw) {
            transpose_batched(gys, gt, m, s.K, P);
            gys = gt;
        }
        grad_weight_panels(xs, gys, s.K, RSC, m * P, off, panel_off, gwk, n0 > 0);
    }
    weights_from_krsc(gwk, gw, s);
}
