// Winograd F(4x4, 3x3) (algo "winograd4"): its tile transforms and how a row
// of L tiles is gathered and stored; the layout, the filter transform, the
// block passes and the driver are conv2d_winograd.hpp's, shared with
// F(2x2, 3x3). Included from there.
//     B^T = [4  0 -5  0 1 0;  0 -4 -4  1 1 0;  0 4 -4 -1 1 0;
//            0 -2 -1  2 1 0;  0  2 -1 -2 1 0;  0 4  0 -5 0 1]
//     A^T = [1 1  1 1  1 0;  0 1 -1 2 -2 0;  0 1 1 4 4 0;  0 1 -1 8 -8 1]

// F(4x4, 3x3)'s transforms of one tile, on X = T or a vector of tiles of T.
// in: d[row][col] of the 6x6 input patch; out[xi] = (B^T d B)[xi]
template <class T, class X>
inline void winograd_in_1d6(const X& d0, const X& d1, const X& d2, const X& d3, const X& d4, const X& d5,
                            X (&r)[6]) {
    const X a = d4 - T(4) * d2, b = d3 - T(4) * d1;  // shared by rows 1 and 2
    const X c = d4 - d2, e = T(2) * (d3 - d1);       // shared by rows 3 and 4
    r[0] = T(4) * d0 - T(5) * d2 + d4;
    r[1] = a + b;
    r[2] = a - b;
    r[3] = c + e;
    r[4] = c - e;
    r[5] = T(4) * d1 - T(5) * d3 + d5;
}

template <class T, class X>
inline void winograd_in_tile(const X (&d)[6][6], X (&out)[36]) {
    X r[6][6];  // B^T d, column by column: r[row][col]
    for (int j = 0; j < 6; ++j) {
        X t[6];
        winograd_in_1d6<T>(d[0][j], d[1][j], d[2][j], d[3][j], d[4][j], d[5][j], t);
        for (int q = 0; q < 6; ++q) r[q][j] = t[q];
    }
    for (int q = 0; q < 6; ++q) {  // (B^T d) B, row by row
        X t[6];
        winograd_in_1d6<T>(r[q][0], r[q][1], r[q][2], r[q][3], r[q][4], r[q][5], t);
        for (int j = 0; j < 6; ++j) out[q * 6 + j] = t[j];
    }
}

// A^T applied to six values: the tile's four outputs along one axis
template <class T, class X>
inline void winograd_out_1d6(const X& m0, const X& m1, const X& m2, const X& m3, const X& m4, const X& m5,
                             X (&y)[4]) {
    const X p12 = m1 + m2, d12 = m1 - m2, p34 = m3 + m4, d34 = m3 - m4;
    y[0] = m0 + p12 + p34;
    y[1] = d12 + T(2) * d34;
    y[2] = p12 + T(4) * p34;
    y[3] = d12 + T(8) * d34 + m5;
}

template <class T, class X>
inline void winograd_out_tile(const X (&m)[36], X (&y)[4][4]) {
    X a[4][6];  // A^T m: rows
    for (int j = 0; j < 6; ++j) {
        X t[4];
        winograd_out_1d6<T>(m[j], m[6 + j], m[12 + j], m[18 + j], m[24 + j], m[30 + j], t);
        for (int r = 0; r < 4; ++r) a[r][j] = t[r];
    }
    for (int r = 0; r < 4; ++r) winograd_out_1d6<T>(a[r][0], a[r][1], a[r][2], a[r][3], a[r][4], a[r][5], y[r]);
}

// The 6 patch columns of L tiles from one input row (q: the first tile's
// patch; tile i's column j is column 4i + j): a stride-4 gather, as two
// rounds of even/odd lane shuffles over 4 vectors and their shift by 4.
template <class T, class Vt>
inline void winograd_patch_row(const T* q, const WinogradLanes<T>& lanes, Vt (&d)[6]) {
    constexpr int L = WinogradLanes<T>::L;
    const Vt a0 = vload<Vt>(q), a1 = vload<Vt>(q + L), a2 = vload<Vt>(q + 2 * L), a3 = vload<Vt>(q + 3 * L);
    const Vt e0 = __builtin_shuffle(a0, a1, lanes.even), o0 = __builtin_shuffle(a0, a1, lanes.odd);
    const Vt e1 = __builtin_shuffle(a2, a3, lanes.even), o1 = __builtin_shuffle(a2, a3, lanes.odd);
    d[0] = __builtin_shuffle(e0, e1, lanes.even);
    d[1] = __builtin_shuffle(o0, o1, lanes.even);
    d[2] = __builtin_shuffle(e0, e1, lanes.odd);
    d[3] = __builtin_shuffle(o0, o1, lanes.odd);
    const Vt b0 = vload<Vt>(q + 4), b1 = vload<Vt>(q + 4 + L), b2 = vload<Vt>(q + 4 + 2 * L),
             b3 = vload<Vt>(q + 4 + 3 * L);  // columns 4 and 5: columns 0 and 1 of the next tile
    d[4] = __builtin_shuffle(__builtin_shuffle(b0, b1, lanes.even), __builtin_shuffle(b2, b3, lanes.even), lanes.even);
    d[5] = __builtin_shuffle(__builtin_shuffle(b0, b1, lanes.odd), __builtin_shuffle(b2, b3, lanes.odd), lanes.even);
}

// One output row of L tiles (c[j]: column j of each) back in column order by
// two rounds of interleaves (tile l's columns land at 4l..4l+3), the first
// `cols` columns stored.
template <class T, class Vt>
inline void winograd_store_row(T* out, const Vt (&c)[4], const WinogradLanes<T>& lanes, idx cols) {
    constexpr int L = WinogradLanes<T>::L;
    const Vt p0 = __builtin_shuffle(c[0], c[2], lanes.lo), p1 = __builtin_shuffle(c[0], c[2], lanes.hi);
    const Vt q0 = __builtin_shuffle(c[1], c[3], lanes.lo), q1 = __builtin_shuffle(c[1], c[3], lanes.hi);
    store_cols(out, __builtin_shuffle(p0, q0, lanes.lo), cols);
    store_cols(out + L, __builtin_shuffle(p0, q0, lanes.hi), cols - L);
    store_cols(out + 2 * L, __builtin_shuffle(p1, q1, lanes.lo), cols - 2 * L);
    store_cols(out + 3 * L, __builtin_shuffle(p1, q1, lanes.hi), cols - 3 * L);
}
