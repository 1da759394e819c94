// conv2d forward as an implicit GEMM on padded phase planes of the input,
// with no column matrix and no B packing.
//
// Stride 1: pad each input plane to Hp x Wp (Hp = Ho + (R-1)dh, Wp = Wo +
// (S-1)dw) and number the output positions in the padded width, p = ho * Wp +
// wo (0 <= wo < Wp). The input under tap (c, r, q) at position p is then
//     xp[c * Hp * Wp + r * dh * Wp + q * dw + p]
// so row (c, r, q) of the column matrix is the padded input shifted by a fixed
// offset: the micro-kernel loads its B vectors straight from the padded planes
// (one offset per reduction step) instead of from packed panels. Positions with
// wo >= Wo wrap into the next row and are computed and dropped: a waste of
// (Wp - Wo) / Wp, against im2col's write of R*S copies of the input and the
// packing pass over them, which cost as much as a fifth of a 3x3 layer.
//
// Stride (sh, sw) > 1: tap r reads padded row ho * sh + r * dh, which is row
// ho + (r * dh) / sh of the phase plane holding padded rows congruent to
// (r * dh) % sh (likewise for columns). Split each channel into the phase
// planes its taps read (at most sh x sw, each about H/sh x W/sw) and the
// strided conv is the stride-1 case above over those planes: the input is
// gathered once, not R*S times as im2col does (resnet_stem: 49x).
//
// Loop nest: bands of output rows whose padded output fits in L2; in each,
// KC blocks of the reduction (weights packed once per call by pack_a_full),
// MC-row blocks of the weights, then NR-wide position tiles x MR-row weight
// panels. The band's padded output accumulates across KC blocks and is
// compacted into y, with the bias, at the end of the band; with a single KC
// block the tiles are stored straight into y instead, their padding lanes
// squeezed out. The reduction order per output is fixed: deterministic for any
// thread count.

inline bool conv_shifted_applies(const ConvGeom& s) {
    return !(s.R == 1 && s.S == 1 && s.sh == 1 && s.sw == 1 && s.ph == 0 && s.pw == 0);
}

// The phases (tap * dilation) % stride that taps [0, taps) read, ascending.
inline std::vector<idx> shifted_phases(idx taps, idx dilation, idx stride) {
    std::vector<idx> ph;
    for (idx t = 0; t < taps; ++t) ph.push_back((t * dilation) % stride);
    std::sort(ph.begin(), ph.end());
    ph.erase(std::unique(ph.begin(), ph.end()), ph.end());
    return ph;
}

inline idx phase_index(const std::vector<idx>& phases, idx phase) {
    return static_cast<idx>(std::lower_bound(phases.begin(), phases.end(), phase) - phases.begin());
}

template <class T>
struct ShiftedLayout {
    std::vector<idx> row_phases, col_phases;
    idx planes;         // phase planes per channel
    idx Hp, Wp, plane;  // one phase plane
    idx npos, tiles;    // Ho * Wp padded output positions, in NR-wide tiles
    idx band, ldy;      // output rows per band; its padded output's row length (whole tiles)
    idx x_elems;        // phase planes of one (image, group), with read slack
    idx y_elems;        // padded output of one band
    ShiftedLayout(const ConvGeom& s)
        : row_phases(shifted_phases(s.R, s.dh, s.sh)), col_phases(shifted_phases(s.S, s.dw, s.sw)) {
        constexpr int NR = GemmBlocking<T>::NR;
        planes = static_cast<idx>(row_phases.size() * col_phases.size());
        // what the output reads: padding may differ per side ('same' with an
        // even kernel), so the plane size comes from the output's
        Hp = s.Ho + (s.R - 1) * s.dh / s.sh;
        Wp = s.Wo + (s.S - 1) * s.dw / s.sw;
        plane = Hp * Wp;
        npos = s.Ho * Wp;
        tiles = (npos + NR - 1) / NR;
        // A band's padded output stays in L2 until it is compacted into y:
        // written whole (resnet_stem's is 3.3 MB an image), it went out to
        // memory and back: a quarter of L2. Depends on the shape and the
        // machine only.
        const idx band_bytes = cache_sizes().l2 / 4;
        band = imax(1, imin(s.Ho, band_bytes / imax((s.K / s.G) * Wp * static_cast<idx>(sizeof(T)), 1)));
        ldy = (band * Wp + NR - 1) / NR * NR;
        // a band's last tile reads up to NR - 1 positions past its rows, the
        // last band's past npos, plus the largest offset
        x_elems = ((s.C / s.G) * planes * plane + (tiles * NR - npos) + (s.S - 1) * s.dw / s.sw + NR + 15) / 16 * 16;
        y_elems = ((s.K / s.G) * ldy + 15) / 16 * 16;
    }
};

// The rt x (2 vectors) sums of a tile; Ap is a pack_a_full panel
// (MR-strided), B rows are xb + off[k].
template <class T, int RT>
__attribute__((always_inline)) inline void shifted_sums(idx kc, const T* __restrict Ap, const T* xb,
                                                        const idx* __restrict off,
                                                        typename GemmBlocking<T>::V (&c)[RT][2]) {
    typedef typename GemmBlocking<T>::V V;
    constexpr int MR = GemmBlocking<T>::MR, L = GemmBlocking<T>::L;
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
}

// rt x (2 vectors) tile of the padded output. Stores whole vectors: a band's
// padded output rows are ldy (whole tiles) long.
template <class T, int RT>
inline void shifted_micro_t(idx kc, const T* __restrict Ap, const T* xb, const idx* __restrict off, T* C, idx ldc,
                            idx mr, bool accumulate) {
    typedef typename GemmBlocking<T>::V V;
    constexpr int L = GemmBlocking<T>::L;
    V c[RT][2] = {};
    shifted_sums<T, RT>(kc, Ap, xb, off, c);
    // a constant row count for the full tile keeps c in registers (a run-time
    // count sends all of it through the stack)
    const int rows = mr == RT ? RT : static_cast<int>(mr);
#pragma GCC unroll 12
    for (int i = 0; i < RT; ++i) {
        if (i >= rows) break;
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

// Where a tile of a band's padded output lands in y: per vector, the lanes
// that are outputs (wo < Wo, inside the band) and the y index of the first.
// The outputs of one padded row and of the next are neighbours in y, so a
// vector's outputs are one run there, whatever padding lanes lie between.
struct TileLanes {
    std::uint32_t mask[2];
    idx y0[2];
};

template <class T>
void band_tile_lanes(idx tiles, idx rows, idx Wp, idx Wo, idx ho0, TileLanes* out) {
    constexpr int L = GemmBlocking<T>::L;
    idx r = 0, wo = 0;  // of position q, walked in order
    for (idx t = 0; t < tiles; ++t)
        for (int v = 0; v < 2; ++v) {
            std::uint32_t mask = 0;
            idx first = -1;
            for (int l = 0; l < L; ++l) {
                if (r < rows && wo < Wo) {
                    mask |= 1u << l;
                    if (first < 0) first = (ho0 + r) * Wo + wo;
                }
                if (++wo == Wp) {
                    wo = 0;
                    ++r;
                }
            }
            out[t].mask[v] = mask;
            out[t].y0[v] = first < 0 ? 0 : first;
        }
}

// rt x (2 vectors) tile straight into y (output rows P apart), with the bias
// (or null): a vector with padding lanes has its outputs packed together and
// stored as the run they are in y. For a reduction of one KC block only.
template <class T, int RT>
inline void shifted_micro_direct_t(idx kc, const T* __restrict Ap, const T* xb, const idx* __restrict off, T* Y,
                                   idx P, const TileLanes& lanes, idx mr, const T* bias) {
    typedef typename GemmBlocking<T>::V V;
    constexpr int L = GemmBlocking<T>::L;
    constexpr std::uint32_t full = (1u << L) - 1;
    const int rows = mr == RT ? RT : static_cast<int>(mr);
    // each output row is its own line, often its own page: asked for now,
    // its lines arrive while the sums run, not at the store
    if (lanes.mask[0] | lanes.mask[1])
        for (int i = 0; i < rows; ++i) {
            __builtin_prefetch(Y + i * P + lanes.y0[0], 1, 3);
            __builtin_prefetch(Y + i * P + lanes.y0[1] + L - 1, 1, 3);
        }
    V c[RT][2] = {};
    shifted_sums<T, RT>(kc, Ap, xb, off, c);
#pragma GCC unroll 12
    for (int i = 0; i < RT; ++i) {
        if (i >= rows) break;
#pragma GCC unroll 2
        for (int v = 0; v < 2; ++v) {
            const std::uint32_t m = lanes.mask[v];
            T* p = Y + i * P + lanes.y0[v];
            V r = c[i][v];
            if (bias) r += bias[i];
            if (m == full)
                vstore(p, r);
            else if (m)
                vstore_first(p, vcompress(r, m), __builtin_popcount(m));
        }
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
inline void shifted_micro_direct(idx kc, const T* Ap, const T* xb, const idx* off, T* Y, idx P,
                                 const TileLanes& lanes, idx mr, const T* bias) {
    if constexpr (GemmBlocking<T>::MR == 12) {
        if (mr > 8) return shifted_micro_direct_t<T, 12>(kc, Ap, xb, off, Y, P, lanes, mr, bias);
        if (mr > 4) return shifted_micro_direct_t<T, 8>(kc, Ap, xb, off, Y, P, lanes, mr, bias);
        return shifted_micro_direct_t<T, 4>(kc, Ap, xb, off, Y, P, lanes, mr, bias);
    } else {
        if (mr > 3) return shifted_micro_direct_t<T, GemmBlocking<T>::MR>(kc, Ap, xb, off, Y, P, lanes, mr, bias);
        return shifted_micro_direct_t<T, 3>(kc, Ap, xb, off, Y, P, lanes, mr, bias);
    }
}

template <class T>
void conv2d_forward_shifted(const T* x, const T* w, const T* b, T* y, const ConvGeom& s) {
    note_conv_algo(ConvAlgo::shifted);
    typedef GemmBlocking<T> GB;
    constexpr int MR = GB::MR, NR = GB::NR;
    const GemmDims& dims = gemm_dims<T>();
    const idx Cg = s.C / s.G, Kg = s.K / s.G, P = s.Ho * s.Wo, CRS = Cg * s.R * s.S;
    const ShiftedLayout<T> lay(s);
    const idx nrp = static_cast<idx>(lay.col_phases.size());
    std::vector<idx> off(static_cast<std::size_t>(CRS));
    for (idx c = 0, i = 0; c < Cg; ++c)
        for (idx r = 0; r < s.R; ++r)
            for (idx q = 0; q < s.S; ++q) {
                const idx pr = phase_index(lay.row_phases, r * s.dh % s.sh);
                const idx pq = phase_index(lay.col_phases, q * s.dw % s.sw);
                const idx plane = c * lay.planes + pr * nrp + pq;
                off[static_cast<std::size_t>(i++)] = plane * lay.plane + r * s.dh / s.sh * lay.Wp + q * s.dw / s.sw;
            }
    const idx wpk_elems = packed_a_elems<T>(Kg, CRS), Mpad = wpk_elems / imax(CRS, 1);
    T* wpk = static_cast<T*>(workspace(static_cast<std::size_t>(s.G * wpk_elems) * sizeof(T), 1));
    for (idx g = 0; g < s.G; ++g) pack_a_full(Kg, CRS, w + g * Kg * CRS, CRS, idx(1), wpk + g * wpk_elems);
    // With one KC block there is nothing to accumulate, and compacting the
    // padded output was a second pass over all of y: tiles go straight there,
    // where a vector's padding lanes are squeezed out by one instruction
    // (AVX-512; without it, per lane, the small layers ran slower). With more
    // blocks, the band's padded output keeps the partial sums in L2 (sent to
    // y, they would travel to memory and back once a block).
    const bool direct = kVcompressNative && CRS <= dims.kc;
    for_each_image_group<T>(s, lay.x_elems + (direct ? 0 : lay.y_elems), [&](idx n, idx g, T* scratch, bool inner) {
        const T* xg = x + (n * s.C + g * Cg) * s.H * s.W;
        T* xp = scratch;
        T* yp = scratch + lay.x_elems;
        // zero-padded phase planes (anything outside [0, Hp) x [0, Wp) is never read), then the read slack
#pragma omp parallel for num_threads(threads_for(Cg * lay.planes)) if (inner) schedule(static)
        for (idx cp = 0; cp < Cg * lay.planes; ++cp) {
            const idx c = cp / lay.planes, pr = cp % lay.planes / nrp, pq = cp % nrp;
            const idx h0 = lay.row_phases[static_cast<std::size_t>(pr)] - s.ph;
            const idx w0 = lay.col_phases[static_cast<std::size_t>(pq)] - s.pw;
            copy_padded_plane<false>(xg + c * s.H * s.W, s.H, s.W, h0, w0, s.sh, s.sw, xp + cp * lay.plane, lay.Hp,
                                     lay.Wp, lay.plane);
        }
        const idx used = Cg * lay.planes * lay.plane;
        std::memset(xp + used, 0, static_cast<std::size_t>(lay.x_elems - used) * sizeof(T));
        const T* wg_packed = wpk + g * wpk_elems;
        T* yg = y + (n * s.K + g * Kg) * P;
        std::vector<TileLanes> lanes(direct ? static_cast<std::size_t>(lay.ldy / NR) : 0);
        for (idx ho0 = 0; ho0 < s.Ho; ho0 += lay.band) {
            const idx ho1 = imin(s.Ho, ho0 + lay.band), tiles = ((ho1 - ho0) * lay.Wp + NR - 1) / NR;
            const T* xb = xp + ho0 * lay.Wp;
            // weight panels in MC-row blocks, each swept across the band's
            // tiles from L2 (down_3x3_s2's 256 x 512 block is 512 KB)
            if (direct) band_tile_lanes<T>(tiles, ho1 - ho0, lay.Wp, s.Wo, ho0, lanes.data());
            for (idx pc = 0; pc < CRS; pc += dims.kc) {
                const idx kc = imin(dims.kc, CRS - pc);
                const T* Ablk = wg_packed + pc * Mpad;
                for (idx ic = 0; ic < Kg; ic += dims.mc) {
                    const idx p0 = ic / MR, np = (imin(dims.mc, Kg - ic) + MR - 1) / MR;
#pragma omp parallel for num_threads(threads_for(tiles * np)) if (inner) schedule(static)
                    for (idx t = 0; t < tiles * np; ++t) {
                        const idx tile = t / np, ip = p0 + t % np, mr = imin(MR, Kg - ip * MR);
                        if constexpr (kVcompressNative) {
                            if (direct) {
                                shifted_micro_direct(kc, Ablk + ip * MR * kc, xb + tile * NR, off.data(),
                                                     yg + ip * MR * P, P, lanes[static_cast<std::size_t>(tile)], mr,
                                                     b ? b + g * Kg + ip * MR : nullptr);
                                continue;
                            }
                        }
                        shifted_micro(kc, Ablk + ip * MR * kc, xb + tile * NR, off.data() + pc,
                                      yp + ip * MR * lay.ldy + tile * NR, lay.ldy, mr, pc > 0);
                    }
                }
            }
            if (direct) continue;
#pragma omp parallel for num_threads(threads_for(Kg)) if (inner) schedule(static)
            for (idx k = 0; k < Kg; ++k) {
                for (idx ho = ho0; ho < ho1; ++ho) {
                    const T* src = yp + k * lay.ldy + (ho - ho0) * lay.Wp;
                    T* dst = yg + k * P + ho * s.Wo;
                    if (b) {
                        const T bv = b[g * Kg + k];
                        for (idx wo = 0; wo < s.Wo; ++wo) dst[wo] = src[wo] + bv;
                    } else {
                        std::memcpy(dst, src, static_cast<std::size_t>(s.Wo) * sizeof(T));
                    }
                }
            }
        }
    });
}
