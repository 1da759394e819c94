// conv2d on the tiled GEMM (gemm_tiled.cuh). Per group g:
//   forward      y_g (Kg, N*P)   = w_g (Kg, CRS) * col (CRS, N*P)
//   grad input   dcol (CRS, N*P) = w_g^T * gy_g, then col2im
//   grad weight  gw_g (Kg, CRS)  = gy_g (Kg, N*P) * col^T
// with CRS = C/G*R*S and P = Ho*Wo. The images are folded into the GEMM's N
// (or, for grad weight, its reduction), so small feature maps still fill the
// GPU. "im2col" materialises the column matrix for a chunk of images in the
// caller's work buffer; "implicit" gathers each column tile from the input as
// the GEMM loads it and needs no buffer. Grad weight is always implicit, split
// over fixed slices of its long reduction and summed in order (no atomics).
#include <atomic>
#include <stdexcept>

#include "gemm_tiled.cuh"
#include "ops.cuh"
#include "convkern/gpu/im2col.cuh"

namespace convkern::cuda {
namespace {

constexpr int kThreads = 256;

// ---- loaders ---------------------------------------------------------------
// (the interface is described in gemm_tiled.cuh)

// A position (hi, mid, lo) in a mixed-radix count, digits mid < MID and
// lo < LO, moved on by kGemmBK with adds and carries: the loaders whose k
// splits into (channel, r, s) or (image, ho, wo) walk it this way instead of
// dividing k for every element (two or three integer divisions each).
template <class I>
struct Radix {
    I MID, LO, dhi, dmid, dlo;  // kGemmBK = (dhi * MID + dmid) * LO + dlo
    struct Pos {
        I hi, mid, lo;
    };
    static Radix over(I MID, I LO) {  // host
        const i64 step = kGemmBK, q = step / LO;
        return Radix{MID, LO, static_cast<I>(q / MID), static_cast<I>(q % MID), static_cast<I>(step % LO)};
    }
    __device__ Pos at(i64 k) const {
        const I kk = static_cast<I>(k), q = kk / LO;
        return Pos{q / MID, q % MID, kk % LO};
    }
    __device__ void advance(Pos& p) const {
        p.lo += dlo;
        const bool c1 = p.lo >= LO;
        if (c1) p.lo -= LO;
        p.mid += dmid + c1;
        const bool c2 = p.mid >= MID;
        if (c2) p.mid -= MID;
        p.hi += dhi + c2;
    }
};

// w_g (Kg, CRS) row-major, batch = group
template <class T>
struct WeightRows {
    const T* w;
    i64 Kg, CRS;
    typedef const T* Cursor;  // at (group's row 0, k)
    __device__ Cursor cursor(i64 g, i64 k) const { return w + g * Kg * CRS + k; }
    __device__ void advance(Cursor& p) const { p += kGemmBK; }
    __device__ T load(i64, i64 m, Cursor p) const { return p[m * CRS]; }
};

// w_g^T (CRS, Kg): A(m = crs, k = output channel)
template <class T>
struct WeightCols {
    const T* w;
    i64 Kg, CRS;
    typedef const T* Cursor;  // at (output channel k, crs 0)
    __device__ Cursor cursor(i64 g, i64 k) const { return w + (g * Kg + k) * CRS; }
    __device__ void advance(Cursor& p) const { p += kGemmBK * CRS; }
    __device__ T load(i64, i64 m, Cursor p) const { return p[m]; }
};

// The column matrix of x, gathered: B(k = (c, r, s), n = (image, ho, wo)).
template <class T, class I>
struct ImplicitCols {
    const T* x;
    I H, W, sh, sw, ph, pw, dh, dw, Wo, P, NP, C, Cg;
    Radix<I> crs;  // k = (c, r, s)
    i64 image0;    // first image of this launch
    struct Col {
        const T* plane0;  // x at (image, first channel of the group)
        I h0, w0;         // ho*sh - ph, wo*sw - pw
        bool live;
    };
    typedef typename Radix<I>::Pos Cursor;
    __device__ Col column(i64 g, i64 n) const {
        Col c{x, 0, 0, n < NP};
        if (!c.live) return c;
        const I img = static_cast<I>(n / P), p = static_cast<I>(n % P);
        c.plane0 = x + ((image0 + img) * C + g * Cg) * static_cast<i64>(H) * W;
        c.h0 = (p / Wo) * sh - ph;
        c.w0 = (p % Wo) * sw - pw;
        return c;
    }
    __device__ Cursor cursor(const Col&, i64, i64 k) const { return crs.at(k); }
    __device__ void advance(Cursor& pos) const { crs.advance(pos); }
    __device__ T load(const Col& col, i64, const Cursor& pos) const {
        if (!col.live) return T(0);
        const I h = col.h0 + pos.mid * dh, w = col.w0 + pos.lo * dw;
        if (h < 0 || h >= H || w < 0 || w >= W) return T(0);
        return col.plane0[(static_cast<i64>(pos.hi) * H + h) * W + w];
    }
};

// A plain row-major (M, K) matrix
template <class T>
struct DenseRows {
    const T* a;
    i64 K;
    typedef const T* Cursor;  // at (row 0, k)
    __device__ Cursor cursor(i64, i64 k) const { return a + k; }
    __device__ void advance(Cursor& p) const { p += kGemmBK; }
    __device__ T load(i64, i64 m, Cursor p) const { return p[m * K]; }
};

// A plain row-major (rows, ld) matrix per batch: B(k, n) = m[batch * stride + k * ld + n]
template <class T>
struct DenseCols {
    const T* m;
    i64 ld, batch_stride, N;
    struct Col {
        i64 n;
        bool live;
    };
    __device__ Col column(i64, i64 n) const { return Col{n, n < N}; }
    typedef const T* Cursor;  // at (k, n); never read for a dead column
    __device__ Cursor cursor(const Col& c, i64 batch, i64 k) const { return m + batch * batch_stride + k * ld + c.n; }
    __device__ void advance(Cursor& p) const { p += kGemmBK * ld; }
    __device__ T load(const Col& c, i64, Cursor p) const { return c.live ? *p : T(0); }
};

// gy as B(k = output channel, n = (image, p)) for grad input
template <class T, class I>
struct GradOutCols {
    const T* gy;
    I K, Kg, P, NP;
    i64 image0;
    struct Col {
        const T* base;  // gy at (image, first channel of the group, p)
        bool live;
    };
    __device__ Col column(i64 g, i64 n) const {
        Col c{gy, n < NP};
        if (!c.live) return c;
        const I img = static_cast<I>(n / P), p = static_cast<I>(n % P);
        c.base = gy + ((image0 + img) * K + g * Kg) * static_cast<i64>(P) + p;
        return c;
    }
    typedef const T* Cursor;  // gy at (k, n); never read for a dead column
    __device__ Cursor cursor(const Col& c, i64, i64 k) const { return c.base + k * P; }
    __device__ void advance(Cursor& p) const { p += kGemmBK * static_cast<i64>(P); }
    __device__ T load(const Col& c, i64, Cursor p) const { return c.live ? *p : T(0); }
};

// gy as A(m = output channel, k = (image, p)) for grad weight
template <class T, class I>
struct GradOutRows {
    const T* gy;
    I K, Kg, P;
    Radix<I> ip;  // k = (image, 0, p)
    typedef typename Radix<I>::Pos Cursor;
    __device__ Cursor cursor(i64, i64 k) const { return ip.at(k); }
    __device__ void advance(Cursor& pos) const { ip.advance(pos); }
    __device__ T load(i64 g, i64 m, const Cursor& pos) const {
        return gy[(static_cast<i64>(pos.hi) * K + g * Kg + m) * P + pos.lo];
    }
};

// The column matrix transposed, gathered: B(k = (image, ho, wo), n = (c, r, s)).
template <class T, class I>
struct ImplicitColsT {
    const T* x;
    I C, H, W, R, S, sh, sw, ph, pw, dh, dw, Cg, CRS;
    Radix<I> hw;  // k = (image, ho, wo)
    struct Col {
        i64 chan;  // c within the group; the group is added at load time
        I roff, soff;
        bool live;
    };
    typedef typename Radix<I>::Pos Cursor;
    __device__ Col column(i64, i64 n) const {
        Col c{0, 0, 0, n < CRS};
        if (!c.live) return c;
        const I nn = static_cast<I>(n), RS = R * S;
        c.chan = nn / RS;
        c.roff = ((nn % RS) / S) * dh - ph;
        c.soff = (nn % S) * dw - pw;
        return c;
    }
    __device__ Cursor cursor(const Col&, i64, i64 k) const { return hw.at(k); }
    __device__ void advance(Cursor& pos) const { hw.advance(pos); }
    __device__ T load(const Col& c, i64 g, const Cursor& pos) const {
        if (!c.live) return T(0);
        const I h = pos.mid * sh + c.roff, w = pos.lo * sw + c.soff;
        if (h < 0 || h >= H || w < 0 || w >= W) return T(0);
        return x[((static_cast<i64>(pos.hi) * C + g * Cg + c.chan) * H + h) * W + w];
    }
};

// ---- stores ----------------------------------------------------------------

// y (N, K, P) from the (Kg, images*P) product of group g, plus bias
template <class T>
struct ConvOutput {
    T* y;
    const T* bias;
    i64 K, Kg, P, image0;
    __device__ void operator()(i64 g, int, i64 m, i64 n, T v) const {
        const i64 img = n / P, p = n % P, k = g * Kg + m;
        y[((image0 + img) * K + k) * P + p] = bias ? v + bias[k] : v;
    }
};

template <class T>
struct DenseStore {  // out[batch * batch_stride + m * ld + n]
    T* out;
    i64 ld, batch_stride;
    __device__ void operator()(i64 batch, int, i64 m, i64 n, T v) const { out[batch * batch_stride + m * ld + n] = v; }
};

template <class T>
struct WeightGradStore {  // split s of gw (K, CRS) at work + s * K * CRS (or gw itself)
    T* out;
    i64 Kg, CRS, K;
    __device__ void operator()(i64 g, int split, i64 m, i64 n, T v) const {
        out[(static_cast<i64>(split) * K + g * Kg + m) * CRS + n] = v;
    }
};

// ---- explicit im2col / col2im ----------------------------------------------

template <class T>
__global__ void sum_splits_kernel(const T* parts, T* out, i64 n, int splits) {
    CK_GRID_STRIDE(i64, i, n) {
        T acc = parts[i];
        for (int s = 1; s < splits; ++s) acc += parts[static_cast<i64>(s) * n + i];
        out[i] = acc;
    }
}

bool fits32(const ConvGeom& g, i64 images) {
    const i64 P = g.P();
    return fits_int32(images * g.C * g.R * g.S * P) && fits_int32(images * g.C * g.H * g.W) &&
           fits_int32(images * g.K * P) && fits_int32(g.H + g.W + g.ph + g.pw + (g.R + g.S) * (g.dh + g.dw));
}


// f(first image, images, images * P) over chunks of images whose column
// matrices fit the work buffer, in order (the chunks share the buffer)
template <class F>
void for_each_chunk(const ConvGeom& g, i64 work_elems, F f) {
    const i64 per = im2col_work_elems(g, 1);
    i64 chunk = per > 0 ? work_elems / per : g.N;
    if (chunk < 1) throw std::runtime_error("conv2d im2col: work buffer smaller than one image's column matrix");
    if (chunk > g.N) chunk = g.N;
    for (i64 i0 = 0; i0 < g.N; i0 += chunk) {
        const i64 images = chunk < g.N - i0 ? chunk : g.N - i0;
        f(i0, images, images * g.P());
    }
}

std::atomic<int> g_forced_gemm_tile{0};

}  // namespace

int forced_gemm_tile() { return g_forced_gemm_tile.load(std::memory_order_relaxed); }

void set_gemm_tile(int tile) {
    if (tile < 0 || tile > static_cast<int>(GemmTile::t128x128))
        throw std::invalid_argument("gemm tile must be 0 (automatic) or 1-4 (64x64, 64x128, 128x64, 128x128), got " +
                                    std::to_string(tile));
    g_forced_gemm_tile.store(tile, std::memory_order_relaxed);
}

int gemm_tile_choice(i64 M, i64 N, i64 zcount, int sms) { return static_cast<int>(gemm_tile_for(M, N, zcount, sms)); }

i64 im2col_work_elems(const ConvGeom& g, i64 images) { return g.G * g.CRS() * images * g.P(); }

int grad_weight_splits(const ConvGeom& g) {
    // enough 64 x 64 tiles to fill a large GPU (~4 per SM on 132 SMs) without
    // slicing the reduction below 4096; a function of the shape only
    const i64 tiles = ((g.Kg() + 63) / 64) * ((g.CRS() + 63) / 64) * g.G;
    const i64 red = g.N * g.P();
    i64 s = 1;
    while (tiles * s < 512 && red / (s * 2) >= 4096 && s < 64) s *= 2;
    return static_cast<int>(s);
}

template <class T>
void conv2d_forward_implicit(const T* x, const T* w, const T* b, T* y, const ConvGeom& g, cudaStream_t stream) {
    with_index_type(fits32(g, g.N), [&](auto zero) {
        typedef decltype(zero) I;
        const I P = static_cast<I>(g.P()), NP = static_cast<I>(g.N * g.P());
        ImplicitCols<T, I> cols{x, I(g.H), I(g.W), I(g.sh), I(g.sw), I(g.ph), I(g.pw), I(g.dh), I(g.dw), I(g.Wo), P,
                                NP, I(g.C), I(g.Cg()), Radix<I>::over(I(g.R), I(g.S)), 0};
        launch_gemm_tiled<T>(g.Kg(), g.N * g.P(), g.CRS(), g.G, 1, WeightRows<T>{w, g.Kg(), g.CRS()}, cols,
                             ConvOutput<T>{y, b, g.K, g.Kg(), g.P(), 0}, stream, "conv2d_forward_implicit");
    });
}

template <class T>
void conv2d_forward_im2col(const T* x, const T* w, const T* b, T* y, const ConvGeom& g, T* work, i64 work_elems,
                           cudaStream_t stream) {
    for_each_chunk(g, work_elems, [&](i64 i0, i64 images, i64 NP) {
        with_index_type(fits32(g, images), [&](auto zero) {
            typedef decltype(zero) I;
            const i64 total = g.C * g.R * g.S * NP;
            im2col_kernel<T, I><<<grid_for(total, kThreads), kThreads, 0, stream>>>(x, work, images, i0, g);
        });
        check_launch("conv2d_forward_im2col (im2col)");
        launch_gemm_tiled<T>(g.Kg(), NP, g.CRS(), g.G, 1, WeightRows<T>{w, g.Kg(), g.CRS()},
                             DenseCols<T>{work, NP, g.CRS() * NP, NP}, ConvOutput<T>{y, b, g.K, g.Kg(), g.P(), i0},
                             stream, "conv2d_forward_im2col (gemm)");
    });
}

template <class T>
void conv2d_grad_input_im2col(const T* gy, const T* w, T* gx, const ConvGeom& g, T* work, i64 work_elems,
                              cudaStream_t stream) {
    for_each_chunk(g, work_elems, [&](i64 i0, i64 images, i64 NP) {
        with_index_type(fits32(g, images), [&](auto zero) {
            typedef decltype(zero) I;
            GradOutCols<T, I> cols{gy, I(g.K), I(g.Kg()), I(g.P()), I(NP), i0};
            launch_gemm_tiled<T>(g.CRS(), NP, g.Kg(), g.G, 1, WeightCols<T>{w, g.Kg(), g.CRS()}, cols,
                                 DenseStore<T>{work, NP, g.CRS() * NP}, stream, "conv2d_grad_input_im2col (gemm)");
            const i64 total = images * g.C * g.H * g.W;
            col2im_kernel<T, I><<<grid_for(total, kThreads), kThreads, 0, stream>>>(work, gx, images, i0, g);
        });
        check_launch("conv2d_grad_input_im2col (col2im)");
    });
}

template <class T>
void conv2d_grad_weight_implicit(const T* gy, const T* x, T* gw, const ConvGeom& g, int splits, T* work,
                                 cudaStream_t stream) {
    if (splits < 1) splits = 1;
    if (splits > 1 && !work) throw std::runtime_error("conv2d_grad_weight_implicit: split reduction needs a work buffer");
    T* out = splits > 1 ? work : gw;
    with_index_type(fits32(g, g.N), [&](auto zero) {
        typedef decltype(zero) I;
        GradOutRows<T, I> rows{gy, I(g.K), I(g.Kg()), I(g.P()), Radix<I>::over(1, I(g.P()))};
        ImplicitColsT<T, I> cols{x, I(g.C), I(g.H), I(g.W), I(g.R), I(g.S), I(g.sh), I(g.sw), I(g.ph), I(g.pw),
                                 I(g.dh), I(g.dw), I(g.Cg()), I(g.CRS()), Radix<I>::over(I(g.Ho), I(g.Wo))};
        launch_gemm_tiled<T>(g.Kg(), g.CRS(), g.N * g.P(), g.G, splits, rows, cols,
                             WeightGradStore<T>{out, g.Kg(), g.CRS(), g.K}, stream, "conv2d_grad_weight_implicit");
    });
    if (splits > 1) {
        const i64 n = g.K * g.CRS();
        sum_splits_kernel<T><<<grid_for(n, kThreads), kThreads, 0, stream>>>(work, gw, n, splits);
        check_launch("conv2d_grad_weight_implicit (sum of splits)");
    }
}

template <class T>
void gemm(const T* a, const T* b, T* c, i64 M, i64 N, i64 K, cudaStream_t stream) {
    launch_gemm_tiled<T>(M, N, K, 1, 1, DenseRows<T>{a, K}, DenseCols<T>{b, N, 0, N}, DenseStore<T>{c, N, 0}, stream,
                         "gemm");
}

#define CK_INSTANTIATE(T)                                                                                           \
    template void conv2d_forward_implicit<T>(const T*, const T*, const T*, T*, const ConvGeom&, cudaStream_t);     \
    template void conv2d_forward_im2col<T>(const T*, const T*, const T*, T*, const ConvGeom&, T*, i64,            \
                                           cudaStream_t);                                                          \
    template void conv2d_grad_input_im2col<T>(const T*, const T*, T*, const ConvGeom&, T*, i64, cudaStream_t);     \
    template void conv2d_grad_weight_implicit<T>(const T*, const T*, T*, const ConvGeom&, int, T*, cudaStream_t); \
    template void gemm<T>(const T*, const T*, T*, i64, i64, i64, cudaStream_t);
CK_INSTANTIATE(float)
CK_INSTANTIATE(double)

}  // namespace convkern::cuda
