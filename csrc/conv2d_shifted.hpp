// conv2d forward for stride-1 convolutions as an implicit GEMM on a padded
// copy of the input, with no column matrix and no B packing.
//
// Pad each input plane to Hp x Wp (Hp = Ho + (R-1)dh, Wp = Wo + (S-1)dw) and number the
// output positions in the padded width, p = ho * Wp + wo (0 <= wo < Wp). For
// stride 1 the input under tap (c, r, q) at position p is then
//     xp[c * Hp * Wp + r * dh * Wp + q * dw + p]
// so row (c, r, q) of the column matrix is the padded input shifted by a fixed
// offset: the micro-kernel loads its B vectors straight from the padded planes
// (one offset per reduction step) instead of from packed panels. Positions with
// wo >= Wo wrap into the next row and are computed and dropped: a waste of
// (Wp - Wo) / Wp, against im2col's write of R*S copies of the input and the
// packing pass over them, which cost as much as a fifth of a 3x3 layer.
//
// Loop nest: KC blocks of the reduction (weights packed once per call by
// pack_a_full), then NR-wide position tiles x MR-row weight panels; the output
// tile (in padded positions) accumulates across KC blocks and is compacted into
// y, with the bias, at the end. The reduction order per output is fixed:
// deterministic for any thread count.

inline bool conv_shifted_applies(const ConvShape& s) {
    return s.sh == 1 && s.sw == 1 && !(s.R == 1 && s.S == 1 && s.ph == 0 && s.pw == 0);
}

template <class T>
struct ShiftedLayout {
    idx Hp, Wp, plane;  // padded plane
    idx npos, tiles;    // Ho * Wp padded output positions, in NR-wide tiles
    idx x_elems;        // padded input of one (image, group), with read slack
    idx y_elems;        // padded output of one (image, group)
    ShiftedLayout(const ConvShape& s) {
        constexpr int NR = GemmBlocking<T>::NR;
        // what the output reads: padding may differ per side ('same' with an
        // even kernel), so the padded size comes from the output's
        Hp = s.Ho + (s.R - 1) * s.dh;
        Wp = s.Wo + (s.S - 1) * s.dw;
        plane = Hp * Wp;
        npos = s.Ho * Wp;
        tiles = (npos + NR - 1) / NR;
        // the last tile reads up to tiles*NR - 1 + the largest offset
        x_elems = ((s.C / s.G) * plane + (tiles * NR - npos) + (s.S - 1) * s.dw + NR + 15) / 16 * 16;
        y_elems = ((s.K / s.G) * tiles * NR + 15) / 16 * 16;
    }
};

// rt x (2 vectors) tile of the padded output; Ap is a pack_a_full panel
// (MR-strided), B rows are xb + off[k]. Stores whole vectors: the padded output
// rows are tiles*NR long.
template <class T, int RT>
inline void shifted_micro_t(idx kc, const T* __restrict Ap, const T* xb, const idx* __restrict off, T* C, idx ldc,
                            idx mr, bool accumulate) {
    typedef GemmBlocking<T> GB;
    typedef typename GB::V V;
    constexpr int MR = GB::MR, L = GB::L;
    V c[RT][2] = {};
    for (idx k = 0; k < kc; ++k) {
        const T* b = xb + off[k];
        const V b0 = vload<V>(b), b1 = vload<V>(b + L);
#pragma GCC unroll 12
        for (int i = 0; i < RT; ++i) {
            const T a = Ap[i];
            c[i][0] += a * b0;
            c[i][1] += a * b1;
        }
        Ap += MR;
    }
    for (idx i = 0; i < mr; ++i) {
        T* row = C + i * ldc;
        V r0 = c[i][0], r1 = c[i][1];
        if (accumulate) {
            r0 += vload<V>(row);
            r1 += vload<V>(row + L);
        }
        vstore(row, r0);
        vstore(row + L, r1);
    }
}

template <class T>
inline void shifted_micro(idx kc, const T* Ap, const T* xb, const idx* off, T* C, idx ldc, idx mr, bool accumulate) {
    if constexpr (GemmBlocking<T>::MR == 12) {
        if (mr > 8) return shifted_micro_t<T, 12>(kc, Ap, xb, off, C, ldc, mr, accumulate);
        if (mr > 4) return shifted_micro_t<T, 8>(kc, Ap, xb, off, C, ldc, mr, accumulate);
        return shifted_micro_t<T, 4>(kc, Ap, xb, off, C, ldc, mr, accumulate);
    } else {
        if (mr > 3) return shifted_micro_t<T, GemmBlocking<T>::MR>(kc, Ap, xb, off, C, ldc, mr, accumulate);
        return shifted_micro_t<T, 3>(kc, Ap, xb, off, C, ldc, mr, accumulate);
    }
}

template <class T>
void conv2d_forward_shifted(const T* x, const T* w, const T* b, T* y, const ConvShape& s) {
    typedef GemmBlocking<T> GB;
    constexpr int MR = GB::MR, NR = GB::NR;
    const idx Cg = s.C / s.G, Kg = s.K / s.G, P = s.Ho * s.Wo, CRS = Cg * s.R * s.S;
    const ShiftedLayout<T> lay(s);
    std::vector<idx> off(static_cast<std::size_t>(CRS));
    for (idx c = 0, i = 0; c < Cg; ++c)
        for (idx r = 0; r < s.R; ++r)
            for (idx q = 0; q < s.S; ++q) off[static_cast<std::size_t>(i++)] = c * lay.plane + r * s.dh * lay.Wp + q * s.dw;
    const idx wpk_elems = packed_a_elems<T>(Kg, CRS), Mpad = wpk_elems / imax(CRS, 1);
    T* wpk = static_cast<T*>(workspace(static_cast<std::size_t>(s.G * wpk_elems) * sizeof(T), 1));
    for (idx g = 0; g < s.G; ++g) pack_a_full(Kg, CRS, w + g * Kg * CRS, CRS, idx(1), wpk + g * wpk_elems);
    const idx panels = (Kg + MR - 1) / MR, ldy = lay.tiles * NR;
    for_each_image_group<T>(s, lay.x_elems + lay.y_elems, [&](idx n, idx g, T* scratch, bool inner) {
        const T* xg = x + (n * s.C + g * Cg) * s.H * s.W;
        T* xp = scratch;
        T* yp = scratch + lay.x_elems;
        // zero-padded planes (anything outside [0, Hp) x [0, Wp) is never read), then the read slack
#pragma omp parallel for num_threads(threads_for(Cg)) if (inner) schedule(static)
        for (idx c = 0; c < Cg; ++c)
            copy_padded_plane<false>(xg + c * s.H * s.W, s.H, s.W, s.ph, s.pw, xp + c * lay.plane, lay.Hp, lay.Wp,
                                     lay.plane);
        std::memset(xp + Cg * lay.plane, 0, static_cast<std::size_t>(lay.x_elems - Cg * lay.plane) * sizeof(T));
        const T* wg_packed = wpk + g * wpk_elems;
        for (idx pc = 0; pc < CRS; pc += GB::KC) {
            const idx kc = imin(GB::KC, CRS - pc);
            const T* Ablk = wg_packed + pc * Mpad;
#pragma omp parallel for num_threads(threads_for(lay.tiles * panels)) if (inner) schedule(static)
            for (idx t = 0; t < lay.tiles * panels; ++t) {
                const idx tile = t / panels, ip = t % panels;
                shifted_micro(kc, Ablk + ip * MR * kc, xp + tile * NR, off.data() + pc, yp + ip * MR * ldy + tile * NR,
                              ldy, imin(MR, Kg - ip * MR), pc > 0);
            }
        }
        T* yg = y + (n * s.K + g * Kg) * P;
#pragma omp parallel for num_threads(threads_for(Kg)) if (inner) schedule(static)
        for (idx k = 0; k < Kg; ++k) {
            for (idx ho = 0; ho < s.Ho; ++ho) {
                const T* src = yp + k * ldy + ho * lay.Wp;
                T* dst = yg + k * P + ho * s.Wo;
                if (b) {
                    const T bv = b[g * Kg + k];
                    for (idx wo = 0; wo < s.Wo; ++wo) dst[wo] = src[wo] + bv;
                } else {
                    std::memcpy(dst, src, static_cast<std::size_t>(s.Wo) * sizeof(T));
                }
            }
        }
    });
}
