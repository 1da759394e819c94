// Compiled once per SIMD level (see CMakeLists.txt): CK_ISA names the level
// and the -m flags decide what the vector code becomes. Produces that level's
// kernel table.
#include <algorithm>
#include <type_traits>
#include <vector>

#include "isa.hpp"

namespace convkern {
namespace CK_ISA {
namespace {
#include "kernel_util.hpp"
#include "gemm.hpp"
#include "conv2d_common.hpp"
#include "conv2d_direct.hpp"
#include "conv2d_im2col.hpp"
#include "conv2d_shifted.hpp"
#include "conv2d_winograd.hpp"
#include "max_pool2d.hpp"
#include "avg_pool2d.hpp"
#include "relu.hpp"

// The GEMM algorithm: 3x3 stride-1 layers with many channels and tiles take
// Winograd F(2x2, 3x3) (see conv_winograd_pays); other convs whose phase
// planes stay modest the shifted implicit GEMM (no column matrix), strided
// ones only with few output channels; the rest im2col in bands. Measured on
// the canonical layers (batch 8, AVX-512): shifted 1.37x im2col's speed on
// resnet_l1_3x3, 1.13x on resnet_l3_3x3, 1.06x on vgg_3x3, even on
// mnist_conv2; slower (0.85x) on mnist_conv1, whose 25-long reduction cannot
// pay for the padded copy and the extra positions. Strided (AVX2, batch 8):
// im2col's copies cost in proportion to 1/K, so the shifted GEMM is 1.1-1.25x
// faster with 64 output channels (resnet_stem, 3x3/2 from 32 and 64
// channels), even at 128, and 0.7-0.9x at 256 and more (down_3x3_s2, a 1x1/2
// shortcut from 1024 to 2048), where its micro-kernel's scattered B loads
// cost more than the copies it saves.
template <class T>
void conv2d_forward_gemm(const T* x, const T* w, const T* b, T* y, const ConvShape& s) {
    constexpr idx kMaxShiftedBytes = idx(64) << 20, kMinShiftedReduction = 32, kMaxWinogradBytes = idx(512) << 20;
    if (conv_winograd_pays(s)) {
        const WinogradLayout<T> lay(s);
        if ((lay.x_elems + idx(16) * (s.K + 16) * s.C) * static_cast<idx>(sizeof(T)) <= kMaxWinogradBytes &&
            conv2d_forward_winograd(x, w, b, y, s))
            return;
    }
    constexpr idx kMaxStridedShiftedChannels = 64;
    const bool strided = s.sh > 1 || s.sw > 1;
    if (conv_shifted_applies(s) && s.C / s.G * s.R * s.S >= kMinShiftedReduction &&
        !(strided && s.K / s.G > kMaxStridedShiftedChannels)) {
        const ShiftedLayout<T> lay(s);
        if ((lay.x_elems + lay.y_elems) * static_cast<idx>(sizeof(T)) <= kMaxShiftedBytes)
            return conv2d_forward_shifted(x, w, b, y, s);
    }
    conv2d_forward_im2col(x, w, b, y, s);
}

template <class T>
OpTable<T> make_table() {
    OpTable<T> t;
    t.conv2d_forward_direct = &conv2d_forward_direct<T>;
    t.conv2d_forward_im2col = &conv2d_forward_gemm<T>;
    t.conv2d_backward_direct = &conv2d_backward_direct<T>;
    t.conv2d_backward_im2col = &conv2d_backward_im2col<T>;
    t.max_pool2d_forward = &max_pool2d_forward<T>;
    t.max_pool2d_backward = &max_pool2d_backward<T>;
    t.avg_pool2d_forward = &avg_pool2d_forward<T>;
    t.avg_pool2d_backward = &avg_pool2d_backward<T>;
    t.relu_forward = &relu_forward<T>;
    t.relu_backward = &relu_backward<T>;
    t.gemm = &gemm<T>;
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
    };
    return table;
}

}  // namespace convkern
