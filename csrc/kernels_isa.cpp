// Compiled once per SIMD level (see CMakeLists.txt): CK_ISA names the level
// and the -m flags decide what the vector code becomes. Produces that level's
// kernel table.
#include <unistd.h>

#include <algorithm>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#include "isa.hpp"

namespace convkern {
namespace CK_ISA {
namespace {
#include "kernel_util.hpp"
#include "transpose.hpp"
#include "gemm.hpp"
#include "gemm_rows.hpp"
#include "conv2d_common.hpp"
#include "conv2d_grad_weight.hpp"
#include "conv2d_grad_weight_taps.hpp"
#include "conv2d_direct.hpp"
#include "conv2d_im2col.hpp"
#include "conv2d_shifted.hpp"
#include "conv2d_winograd.hpp"
#include "conv2d_winograd_nhwc.hpp"
#include "conv2d_grad_weight_winograd.hpp"
#include "conv2d_grad_weight_pointwise.hpp"
#include "max_pool2d.hpp"
#include "avg_pool2d.hpp"
#include "conv2d_nhwc.hpp"
#include "pool2d_nhwc.hpp"
#include "relu.hpp"
#include "sgd.hpp"
#include "linear.hpp"

// auto's GEMM algorithm: 3x3 stride-1 layers with many channels and tiles take
// Winograd F(2x2, 3x3) (see conv_winograd_pays); small maps whose weights
// outnumber the batch's columns im2col with the weights read in place (see
// im2col_weights_in_place); other convs whose phase
// planes stay modest the shifted implicit GEMM (no column matrix), strided
// ones only with few output channels (im2col's copies cost in proportion to
// 1/K, the shifted micro-kernel's scattered loads do not); short reductions
// (fewer than 32 taps) cannot pay for its padded copy. The rest im2col in
// bands. The measurements behind the thresholds: docs/performance.md.
template <class T>
void conv2d_forward_gemm(const T* x, const T* w, const T* b, T* y, const ConvGeom& s) {
    constexpr idx kMaxShiftedBytes = idx(64) << 20, kMinShiftedReduction = 32, kMaxWinogradBytes = idx(512) << 20;
    if (conv_winograd_pays(s)) {
        const WinogradLayout<T> lay(s);
        if (lay.fixed_elems(s) * static_cast<idx>(sizeof(T)) <= kMaxWinogradBytes &&
            conv2d_forward_winograd(x, w, b, y, s))
            return;
    }
    constexpr idx kMaxStridedShiftedChannels = 64;
    const bool strided = s.sh > 1 || s.sw > 1;
    if (!im2col_weights_in_place<T>(s) && conv_shifted_applies(s) && s.C / s.G * s.R * s.S >= kMinShiftedReduction &&
        !(strided && s.K / s.G > kMaxStridedShiftedChannels)) {
        const ShiftedLayout<T> lay(s);
        if ((lay.x_elems + lay.y_elems) * static_cast<idx>(sizeof(T)) <= kMaxShiftedBytes)
            return conv2d_forward_shifted(x, w, b, y, s);
    }
    conv2d_forward_im2col(x, w, b, y, s);
}

// auto's first choice: the direct kernels where the reduction per output is
// too short for a GEMM to pay for packing (depthwise-like grouped convs, tiny
// kernels over few channels). A one-channel input with a real kernel (a
// grayscale CNN's first layer) still goes to the GEMM: (64, 1, 28, 28) *
// (32, 1, 5, 5) ran 1.5x faster forward and 30x faster for grad input there.
inline bool auto_takes_direct(const ConvGeom& s) {
    const idx Cg = s.C / s.G;
    return (s.G > 1 && Cg == 1) || Cg * s.R * s.S < 16;
}

template <class T>
void forward_direct(const T* x, const T* w, const T* b, T* y, const ConvGeom& s) {
    conv2d_forward_direct(x, w, b, y, s, true);
}
template <class T>
void forward_winograd(const T* x, const T* w, const T* b, T* y, const ConvGeom& s) {
    // Winograd's transforms subtract inputs (inf - inf = NaN where a direct sum
    // gives inf): with non-finite data it hands the call to im2col
    if (!conv2d_forward_winograd(x, w, b, y, s)) conv2d_forward_im2col(x, w, b, y, s);
}
template <class T>
void forward_winograd4(const T* x, const T* w, const T* b, T* y, const ConvGeom& s) {
    if (!conv2d_forward_winograd<T, 4>(x, w, b, y, s)) conv2d_forward_im2col(x, w, b, y, s);
}
template <class T>
void forward_auto(const T* x, const T* w, const T* b, T* y, const ConvGeom& s) {
    if (auto_takes_direct(s)) return conv2d_forward_direct(x, w, b, y, s);
    conv2d_forward_gemm(x, w, b, y, s);
}

template <class T>
void backward_direct(const T* gy, const T* x, const T* w, T* gx, T* gw, T* gb, const ConvGeom& s) {
    conv2d_backward_direct(gy, x, w, gx, gw, gb, s, true);
}
template <class T>
void backward_depthwise(const T* gy, const T* x, const T* w, T* gx, T* gw, T* gb, const ConvGeom& s) {
    conv2d_backward_direct(gy, x, w, gx, gw, gb, s, false);
}
template <class T>
void backward_im2col(const T* gy, const T* x, const T* w, T* gx, T* gw, T* gb, const ConvGeom& s) {
    conv2d_backward_im2col(gy, x, w, gx, gw, gb, s, false);
}
// grad input as the stride-1 forward conv of gy with the flipped filters, by
// Forward; grad weight by Winograd's F(3x3, 2x2) where WinogradGW and it runs
// (channels a multiple of the vector width), else, and bias, by im2col
template <class T, void (*Forward)(const T*, const T*, const T*, T*, const ConvGeom&), bool WinogradGW = false>
void backward_via_forward(const T* gy, const T* x, const T* w, T* gx, T* gw, T* gb, const ConvGeom& s) {
    ConvGeom t;
    if (gx && grad_input_conv_shape(s, t)) {
        // slot 2: the forward algorithms use 0 and 1
        T* wt = static_cast<T*>(workspace(static_cast<std::size_t>(s.K * (s.C / s.G) * s.R * s.S) * sizeof(T), 2));
        flip_transpose_filters(w, s, wt);
        Forward(gy, wt, static_cast<const T*>(nullptr), gx, t);
        gx = nullptr;
    }
    if (WinogradGW && gw && grad_weight_winograd_applies<T>(s) && conv2d_grad_weight_winograd(gy, x, gw, s, true))
        gw = nullptr;
    conv2d_backward_im2col(gy, x, w, gx, gw, gb, s, false);
}
template <class T>
void backward_auto(const T* gy, const T* x, const T* w, T* gx, T* gw, T* gb, const ConvGeom& s) {
    if (!gx)  // the weight gradient's
        note_conv_algo(auto_takes_direct(s)                ? ConvAlgo::direct
                       : grad_weight_winograd_pays<T>(s) ? ConvAlgo::winograd
                                                         : ConvAlgo::im2col);
    if (auto_takes_direct(s)) return conv2d_backward_direct(gy, x, w, gx, gw, gb, s);
    conv2d_backward_im2col(gy, x, w, gx, gw, gb, s, true);
}

const char* algo_problem(ConvAlgo a, const ConvGeom& s, bool backward) {
    ConvGeom t;
    switch (a) {
        case ConvAlgo::depthwise:
            // (backward at any stride: strided grad input is the zero-inserted conv or the direct gather)
            return conv_is_depthwise(s) ? nullptr : "depthwise needs groups == input channels";
        case ConvAlgo::shifted:
            if (!backward)
                return conv_shifted_applies(s) ? nullptr
                                                : "shifted has nothing to shift in a 1x1 stride-1 unpadded conv "
                                                  "(a plain GEMM: use im2col)";
            if (!grad_input_conv_shape(s, t))
                return "shifted backward runs grad input as a stride-1 conv: it needs stride 1 and padding no "
                       "larger than the dilated kernel";
            return conv_shifted_applies(t) ? nullptr : "shifted has nothing to shift in grad input's 1x1 conv";
        case ConvAlgo::winograd:
        case ConvAlgo::winograd4: {
            const bool f4 = a == ConvAlgo::winograd4;
            if (!backward)
                return conv_winograd_applies(s) ? nullptr
                       : f4 ? "winograd4 needs a 3x3 kernel, stride 1, no dilation and groups 1"
                            : "winograd needs a 3x3 kernel, stride 1, no dilation and groups 1";
            if (!grad_input_conv_shape(s, t) || !conv_winograd_applies(t))
                return f4 ? "winograd4 backward runs grad input as a 3x3 stride-1 conv: it needs a 3x3 kernel, "
                            "stride 1, no dilation, groups 1 and padding of at most 2"
                          : "winograd backward runs grad input as a 3x3 stride-1 conv: it needs a 3x3 kernel, "
                            "stride 1, no dilation, groups 1 and padding of at most 2";
            return nullptr;
        }
        default:
            return nullptr;
    }
}

// What forward_auto (backward: the grad input of backward_auto) runs for s.
template <class T>
const char* auto_algo_t(const ConvGeom& s, bool backward) {
    ConvGeom t = s;
    if (auto_takes_direct(s)) {
        if (backward)  // grad input: a direct conv of gy at stride 1, depthwise where that applies
            return grad_input_conv_shape(s, t) && depthwise_plane_fits<T>(t) ? "depthwise" : "direct";
        return depthwise_plane_fits<T>(s) ? "depthwise" : "direct";
    }
    if (backward && !(s.C / s.G >= 16 && grad_input_conv_shape(s, t))) return "im2col";
    constexpr idx kMaxShiftedBytes = idx(64) << 20, kMinShiftedReduction = 32, kMaxWinogradBytes = idx(512) << 20;
    if (conv_winograd_pays(t)) {
        if (WinogradLayout<T>(t).fixed_elems(t) * static_cast<idx>(sizeof(T)) <= kMaxWinogradBytes)
            return "winograd";
    }
    constexpr idx kMaxStridedShiftedChannels = 64;
    const bool strided = t.sh > 1 || t.sw > 1;
    if (!im2col_weights_in_place<T>(t) && conv_shifted_applies(t) && t.C / t.G * t.R * t.S >= kMinShiftedReduction &&
        !(strided && t.K / t.G > kMaxStridedShiftedChannels) &&
        (ShiftedLayout<T>(t).x_elems + ShiftedLayout<T>(t).y_elems) * static_cast<idx>(sizeof(T)) <= kMaxShiftedBytes)
        return "shifted";
    return "im2col";
}

const char* auto_algo(const ConvGeom& s, bool backward, bool f64) {
    return f64 ? auto_algo_t<double>(s, backward) : auto_algo_t<float>(s, backward);
}

template <class T>
void gemm_blocking(const CacheSizes* caches, idx kc, idx out[7]) {
    typedef GemmBlocking<T> GB;
    BlockingSource source = BlockingSource::caches;
    GemmDims d = caches ? derive_gemm_dims<T>(*caches) : resolve_gemm_dims<T>(false, &source);
    if (caches && kc > 0) d = derive_gemm_dims<T>(*caches, kc);
    out[0] = GB::MR;
    out[1] = GB::NR;
    out[2] = d.kc;
    out[3] = d.mc;
    out[4] = d.nc;
    out[5] = rows_kc_for(d.kc);  // (not rows_kc(): asking must not fix the blocking)
    out[6] = static_cast<idx>(source);
}

template <class T>
OpTable<T> make_table() {
    OpTable<T> t;
    const auto slot = [](ConvAlgo a) { return static_cast<int>(a); };
    t.conv2d_forward[slot(ConvAlgo::direct)] = &forward_direct<T>;
    t.conv2d_forward[slot(ConvAlgo::depthwise)] = &conv2d_forward_depthwise<T>;
    t.conv2d_forward[slot(ConvAlgo::im2col)] = &conv2d_forward_im2col<T>;
    t.conv2d_forward[slot(ConvAlgo::shifted)] = &conv2d_forward_shifted<T>;
    t.conv2d_forward[slot(ConvAlgo::winograd)] = &forward_winograd<T>;
    t.conv2d_forward[slot(ConvAlgo::winograd4)] = &forward_winograd4<T>;
    t.conv2d_forward[slot(ConvAlgo::auto_)] = &forward_auto<T>;
    t.conv2d_backward[slot(ConvAlgo::direct)] = &backward_direct<T>;
    t.conv2d_backward[slot(ConvAlgo::depthwise)] = &backward_depthwise<T>;
    t.conv2d_backward[slot(ConvAlgo::im2col)] = &backward_im2col<T>;
    t.conv2d_backward[slot(ConvAlgo::shifted)] = &backward_via_forward<T, conv2d_forward_shifted<T>>;
    t.conv2d_backward[slot(ConvAlgo::winograd)] = &backward_via_forward<T, forward_winograd<T>, true>;
    t.conv2d_backward[slot(ConvAlgo::winograd4)] = &backward_via_forward<T, forward_winograd4<T>, true>;
    t.conv2d_backward[slot(ConvAlgo::auto_)] = &backward_auto<T>;
    t.max_pool2d_forward = &max_pool2d_forward<T>;
    t.max_pool2d_backward = &max_pool2d_backward<T>;
    t.avg_pool2d_forward = &avg_pool2d_forward<T>;
    t.avg_pool2d_backward = &avg_pool2d_backward<T>;
    t.conv2d_forward_nhwc = &conv2d_forward_nhwc<T>;
    t.nhwc_winograd_rule = &nhwc_winograd_rule<T>;
    t.winograd_nhwc_filter_elems = &winograd_nhwc_filter_elems<T>;
    t.winograd_nhwc_filters = &winograd_nhwc_filters<T>;
    t.conv2d_backward_nhwc = &conv2d_backward_nhwc<T>;
    t.max_pool2d_forward_nhwc = &max_pool2d_forward_nhwc<T>;
    t.max_pool2d_backward_nhwc = &max_pool2d_backward_nhwc<T>;
    t.avg_pool2d_forward_nhwc = &avg_pool2d_forward_nhwc<T>;
    t.avg_pool2d_backward_nhwc = &avg_pool2d_backward_nhwc<T>;
    t.transpose_batched = &transpose_batched<T>;
    t.relu_forward = &relu_forward<T>;
    t.relu_backward = &relu_backward<T>;
    t.sgd_update = &sgd_update<T>;
    t.gemm = &gemm<T>;
    t.linear_forward = &linear_forward<T>;
    t.gemm_blocking = &gemm_blocking<T>;
    return t;
}
}  // namespace
}  // namespace CK_ISA

#define CK_STR2(a) #a
#define CK_STR(a) CK_STR2(a)
#define CK_CAT2(a, b) a##b
#define CK_CAT(a, b) CK_CAT2(a, b)
const KernelTable& CK_CAT(kernel_table_, CK_ISA)() {
    static const KernelTable table{
        CK_STR(CK_ISA),
        CK_ISA::make_table<float>(),
        CK_ISA::make_table<double>(),
        &CK_ISA::algo_problem,
        &CK_ISA::auto_algo,
    };
    return table;
}

}  // namespace convkern
