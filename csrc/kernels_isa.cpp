// Compiled once per SIMD level (see CMakeLists.txt): CK_ISA names the level
// and the -m flags decide what the vector code becomes. Produces that level's
// kernel table.
#include "isa.hpp"

namespace convkern {
namespace CK_ISA {
namespace {
#include "kernel_util.hpp"
#include "gemm.hpp"
#include "conv2d_common.hpp"
#include "conv2d_direct.hpp"
#include "conv2d_im2col.hpp"
#include "max_pool2d.hpp"
#include "avg_pool2d.hpp"
#include "relu.hpp"

template <class T>
OpTable<T> make_table() {
    OpTable<T> t;
    t.conv2d_forward_direct = &conv2d_forward_direct<T>;
    t.conv2d_forward_im2col = &conv2d_forward_im2col<T>;
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
