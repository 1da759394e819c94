// Shared declarations for the CPU kernels: problem descriptors, the per-ISA
// kernel table, and the runtime services (threads, workspace) that live in
// the baseline-compiled translation unit.
//
// Kernels take raw pointers to C-contiguous NCHW data plus a descriptor; all
// Python-object handling stays in bindings.cpp.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

#include "convkern/geometry.h"

namespace convkern {

using idx = std::int64_t;  // 64-bit everywhere: products of sizes overflow int32

// The conv and pool geometry (ConvGeom, PoolGeom) is shared with the CUDA
// kernels and Python: convkern/include/convkern/geometry.h.

// The convs Winograd F(m x m, 3x3) takes: 3x3, stride 1, undilated, one group
// (asked by the kernels and by the bindings that check handed-in filters).
inline bool conv_winograd_applies(const ConvGeom& s) {
    return s.R == 3 && s.S == 3 && s.sh == 1 && s.sw == 1 && s.dh == 1 && s.dw == 1 && s.G == 1;
}

// conv2d algorithms, each a slot in the op table. direct: the direct loops;
// depthwise: padded (phase) planes, one filter each (C == groups); im2col: the
// column matrix in bands times the packed GEMM; shifted: an implicit GEMM over
// a padded copy of the input (or its phase planes when strided); winograd:
// F(2x2, 3x3) (3x3, stride 1, no dilation); winograd4: F(4x4, 3x3), where the
// same apply. Backward, shifted and the Winograd algorithms run
// the input gradient as the forward conv of grad_output with the flipped
// filters (stride 1) and the weight gradient by im2col; depthwise runs its input
// gradient as a depthwise conv where that has one filter per channel (K == C),
// else by the direct loops. auto_: the rule.
enum class ConvAlgo : int { direct = 0, depthwise, im2col, shifted, winograd, winograd4, auto_ };
constexpr int kConvAlgos = 7;
// "direct", ..., "auto"; from_name returns false for an unknown name
const char* conv_algo_name(ConvAlgo a);
bool conv_algo_from_name(const std::string& name, ConvAlgo& a);
// What the calling thread's last conv2d call ran (backward: for grad input,
// else the algorithm named): each kernel notes itself as it starts, so "auto"
// and the fallbacks report what really ran. auto_ means nothing was noted.
void note_conv_algo(ConvAlgo a);
ConvAlgo last_conv_algo();

// One SGD step's hyperparameters (OpTable::sgd_update): PyTorch's SGD, with
// `first` set on a parameter's first step (its momentum buffer starts as the
// gradient).
struct SgdStep {
    double lr, momentum, dampening, weight_decay;
    bool nesterov, first;
};

// conv2d_forward_nhwc's wino code for the GEMM whose rows are output pixels
// (patches read in place), never the one over output channels.
constexpr int kNhwcPixelRows = 1;

template <class T>
struct OpTable {
    typedef void (*ConvForward)(const T* x, const T* w, const T* b, T* y, const ConvGeom&);
    // gx/gw/gb may be null: that gradient is not computed.
    typedef void (*ConvBackward)(const T* gy, const T* x, const T* w, T* gx, T* gw, T* gb, const ConvGeom&);
    // one slot per ConvAlgo; auto is the library's rule (conv_auto_algo says what it runs)
    ConvForward conv2d_forward[kConvAlgos];
    ConvBackward conv2d_backward[kConvAlgos];
    void (*max_pool2d_forward)(const T* x, T* y, std::int64_t* ind, const PoolGeom&);
    // returns false if an index lies outside its plane (nothing is written for it)
    bool (*max_pool2d_backward)(const T* gy, const std::int64_t* ind, T* gx, const PoolGeom&);
    void (*avg_pool2d_forward)(const T* x, T* y, const PoolGeom&);
    void (*avg_pool2d_backward)(const T* gy, T* gx, const PoolGeom&);
    // channels_last: x, y, gx and gy are NHWC; weights stay (K, C/G, R, S).
    // relu: the conv's output goes through relu before it is stored.
    // wino: 2 or 4 runs a 3x3 stride-1 conv by Winograd F(2x2) or F(4x4),
    // 0 by a GEMM (of the form the rule picks), kNhwcPixelRows by the GEMM
    // over output pixels, -1 as the kernels' rule chooses. krsc: w is
    // (K, R, S, C/G) memory (channels_last weights), read in place. U: with
    // wino 2 or 4, w's transformed filters from winograd_nhwc_filters at
    // this level (whose elements winograd_nhwc_filter_elems counts), or
    // nullptr to transform w in the call.
    void (*conv2d_forward_nhwc)(const T* x, const T* w, const T* b, T* y, const ConvGeom&, bool relu, int wino,
                                bool krsc, const T* U);
    int (*nhwc_winograd_rule)(const ConvGeom&);  // the tile wino=-1 takes (0: none)
    idx (*winograd_nhwc_filter_elems)(idx K, idx C, int m);
    void (*winograd_nhwc_filters)(const T* w, idx K, idx C, int m, bool krsc, T* U);
    // krsc: w is (K, R, S, C/G) memory and gw is written so (channels_last
    // weights, read and written as they lie)
    void (*conv2d_backward_nhwc)(const T* gy, const T* x, const T* w, T* gx, T* gw, T* gb, const ConvGeom&,
                                 bool krsc);
    // PoolGeom.planes is N here; C channels per pixel
    void (*max_pool2d_forward_nhwc)(const T* x, T* y, std::int64_t* ind, const PoolGeom&, idx C);
    bool (*max_pool2d_backward_nhwc)(const T* gy, const std::int64_t* ind, T* gx, const PoolGeom&, idx C);
    void (*avg_pool2d_forward_nhwc)(const T* x, T* y, const PoolGeom&, idx C);
    void (*avg_pool2d_backward_nhwc)(const T* gy, T* gx, const PoolGeom&, idx C);
    // dst (batches, cols, rows) = src (batches, rows, cols) transposed per batch
    void (*transpose_batched)(const T* src, T* dst, idx batches, idx rows, idx cols);
    void (*relu_forward)(const T* x, T* y, idx n);
    void (*relu_backward)(const T* gy, const T* x, T* gx, idx n);
    void (*sgd_update)(T* p, const T* g, T* buf, idx n, const SgdStep& step);
    // C(M,N) = A(M,K) B(K,N) (+ C if accumulate); A and B by arbitrary strides.
    void (*gemm)(idx M, idx N, idx K, const T* A, idx rsa, idx csa, const T* B, idx rsb, idx csb,
                 T* C, idx ldc, bool accumulate);
    // y (M, N) = x (M, K) w (N, K)^T (+ b); all C-contiguous
    void (*linear_forward)(const T* x, const T* w, const T* b, T* y, idx M, idx N, idx K);
    // the blocking this ISA's GEMMs use: MR, NR, KC, MC, NC of the packed GEMM,
    // KC of gemm_rows and the BlockingSource. caches null: what the kernels
    // use (or will, if none has run yet); else what would be derived for those
    // caches (with kc > 0: MC and NC for that KC).
    void (*gemm_blocking)(const struct CacheSizes* caches, idx kc, idx out[7]);
};

// Why algorithm a cannot run s (backward: its gradients), or null if it can.
typedef const char* (*ConvAlgoProblem)(ConvAlgo a, const ConvGeom& s, bool backward);
// The algorithm ConvAlgo::auto_ runs for s (forward; backward: the grad input's), by name.
typedef const char* (*ConvAutoAlgo)(const ConvGeom& s, bool backward, bool f64);

struct KernelTable {
    const char* isa;
    OpTable<float> f32;
    OpTable<double> f64;
    ConvAlgoProblem conv_algo_problem;
    ConvAutoAlgo conv_auto_algo;
};

// One table per compiled ISA level (kernels_isa.cpp, built once per level).
const KernelTable& kernel_table_scalar();
const KernelTable& kernel_table_avx2();
const KernelTable& kernel_table_avx512();

// ---- runtime services (runtime.cpp, baseline ISA) ----
enum class SimdLevel { scalar = 0, avx2 = 1, avx512 = 2 };
SimdLevel cpu_best_simd_level();          // what this CPU supports
SimdLevel active_simd_level();            // what is in use (CONVKERN_SIMD may lower it)
void set_simd_level(SimdLevel level);     // throws std::invalid_argument if unsupported
const KernelTable& active_kernels();
const char* simd_level_name(SimdLevel level);

// The data caches one core sees (sysfs, else sysconf), read once: sizes in
// bytes and ways. A level it does not report gets a conservative default
// (32 KiB, 512 KiB, 4 MiB; 8, 8, 16 ways); known[] says which levels were read.
// CONVKERN_CACHES="48K/12,1M/16,32M/16" replaces them all (ways optional):
// blocking and band sizes derived from the caches then do not depend on the
// machine (the instruction gate pins them so).
struct CacheSizes {
    idx l1d, l2, l3;
    bool known[3];
    idx ways[3];
    bool from_env;  // set by CONVKERN_CACHES
};
const CacheSizes& cache_sizes();
// Throws std::invalid_argument if CONVKERN_CACHES is malformed (cache_sizes()
// then reports what the machine does); the module checks it at import.
void check_cache_override();

// The packed GEMM's blocking (KC, MC, NC in elements) comes, first found, from
// - CONVKERN_GEMM_BLOCKING="KC,MC,NC" (both dtypes; read once);
// - set_tuned_gemm_blocking (float32 only: what `convkern tune` measured on
//   this machine, applied as the module loads);
// - the caches (derive_gemm_dims).
// MC and NC are rounded down to whole register panels. The first kernel to
// ask freezes the choice for the process, so every call sizes and uses its
// workspace with the same values.
enum class BlockingSource : int { caches = 0, environment = 1, tuned = 2 };
// out is set unless the source is caches; freeze: a kernel is taking it.
BlockingSource gemm_blocking_setting(bool f64, bool freeze, idx out[3]);
// false (nothing changes) once a kernel has taken its blocking; throws
// std::invalid_argument out of range.
bool set_tuned_gemm_blocking(idx kc, idx mc, idx nc);
// Throws std::invalid_argument if CONVKERN_GEMM_BLOCKING is malformed; the
// module checks it at import.
void check_gemm_blocking_env();

int num_threads();
void set_num_threads(int n);  // n <= 0 restores the default (OMP_NUM_THREADS or all cores)

// Flush-to-zero / denormals-are-zero inside kernels (off by default: IEEE).
// Gradients of a converging network drift into the denormal range, where x86
// arithmetic takes microcode assists; training runs measurably slow down.
// Returns false where the CPU has no such mode (then nothing changes).
bool set_flush_denormal(bool on);
bool flush_denormal();

// Puts the calling thread and the OpenMP workers in the chosen denormal mode
// for one kernel call; the calling thread's own mode is restored afterwards,
// so NumPy code around the call is unaffected.
class DenormalScope {
   public:
    DenormalScope();
    ~DenormalScope();
    DenormalScope(const DenormalScope&) = delete;
    DenormalScope& operator=(const DenormalScope&) = delete;

   private:
    unsigned saved_ = 0;
    bool restore_ = false;
};

// glibc's malloc told to keep freed memory instead of returning it to the OS
// (process-wide); false where the C library is not glibc.
bool keep_freed_memory();

// Per-calling-thread scratch memory, reused across calls so large buffers are
// not page-faulted in again each time. Returns 64-byte aligned storage of at
// least `bytes`; contents are undefined. Throws std::bad_alloc. Call it outside
// OpenMP regions and carve per-thread slices from it. `slot` (0-4) lets one
// call hold independent buffers; slot 4 belongs to gemm_blocked.
void* workspace(std::size_t bytes, int slot);

}  // namespace convkern
