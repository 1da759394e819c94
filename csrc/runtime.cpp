// Runtime services compiled for the baseline ISA: CPU feature detection and
// kernel-table selection, the thread count, and per-thread workspaces.
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <stdexcept>
#include <string>

#include <omp.h>
#if defined(__GLIBC__)
#include <malloc.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#endif

#include "common.hpp"

namespace convkern {

namespace {

bool cpu_has_avx512() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("fma");
#else
    return false;
#endif
}

bool cpu_has_avx2() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    return false;
#endif
}

SimdLevel parse_level(const char* s) {
    std::string v(s);
    if (v == "scalar") return SimdLevel::scalar;
    if (v == "avx2") return SimdLevel::avx2;
    if (v == "avx512") return SimdLevel::avx512;
    throw std::invalid_argument("CONVKERN_SIMD must be one of scalar, avx2, avx512; got '" + v + "'");
}

SimdLevel initial_level() {
    SimdLevel best = cpu_best_simd_level();
    const char* env = std::getenv("CONVKERN_SIMD");
    if (env == nullptr || *env == '\0' || std::strcmp(env, "auto") == 0) return best;
    SimdLevel want = parse_level(env);
    if (static_cast<int>(want) > static_cast<int>(best))
        throw std::invalid_argument(std::string("CONVKERN_SIMD=") + env + " but this CPU supports at most " +
                                    simd_level_name(best));
    return want;
}

std::atomic<int> g_level{-1};
std::atomic<int> g_threads{0};

}  // namespace

const char* simd_level_name(SimdLevel level) {
    switch (level) {
        case SimdLevel::avx512: return "avx512";
        case SimdLevel::avx2: return "avx2";
        default: return "scalar";
    }
}

SimdLevel cpu_best_simd_level() {
    if (cpu_has_avx512()) return SimdLevel::avx512;
    if (cpu_has_avx2()) return SimdLevel::avx2;
    return SimdLevel::scalar;
}

SimdLevel active_simd_level() {
    int v = g_level.load(std::memory_order_relaxed);
    if (v < 0) {
        v = static_cast<int>(initial_level());
        g_level.store(v, std::memory_order_relaxed);
    }
    return static_cast<SimdLevel>(v);
}

void set_simd_level(SimdLevel level) {
    if (static_cast<int>(level) > static_cast<int>(cpu_best_simd_level()))
        throw std::invalid_argument(std::string("SIMD level ") + simd_level_name(level) +
                                    " is not supported by this CPU (best: " +
                                    simd_level_name(cpu_best_simd_level()) + ")");
    g_level.store(static_cast<int>(level), std::memory_order_relaxed);
}

const KernelTable& active_kernels() {
    switch (active_simd_level()) {
        case SimdLevel::avx512: return kernel_table_avx512();
        case SimdLevel::avx2: return kernel_table_avx2();
        default: return kernel_table_scalar();
    }
}

int num_threads() {
    int n = g_threads.load(std::memory_order_relaxed);
    // omp_get_max_threads() reflects OMP_NUM_THREADS for the initial thread.
    return n > 0 ? n : omp_get_max_threads();
}

void set_num_threads(int n) { g_threads.store(n > 0 ? n : 0, std::memory_order_relaxed); }

namespace {
std::atomic<bool> g_flush{false};
std::atomic<int> g_flush_generation{0};
#if defined(__x86_64__) || defined(__i386__)
constexpr unsigned kFtzDaz = 0x8040;  // MXCSR: flush-to-zero (bit 15), denormals-are-zero (bit 6)
unsigned csr_for(unsigned csr, bool on) { return on ? (csr | kFtzDaz) : (csr & ~kFtzDaz); }
#endif
}  // namespace

bool set_flush_denormal(bool on) {
#if defined(__x86_64__) || defined(__i386__)
    if (g_flush.exchange(on) != on) g_flush_generation.fetch_add(1);
    return true;
#else
    (void)on;
    return false;
#endif
}

bool flush_denormal() { return g_flush.load(); }

DenormalScope::DenormalScope() {
#if defined(__x86_64__) || defined(__i386__)
    saved_ = _mm_getcsr();
    const bool on = g_flush.load();
    const int gen = g_flush_generation.load(), nt = num_threads();
    // Workers keep their mode between calls (they only run kernels); bring them
    // in line when the mode changed or the team grew since they were last set.
    // OpenMP keeps one worker pool per calling thread, hence thread_local.
    thread_local int synced_generation = -1, synced_threads = 0;
    if (synced_generation != gen || synced_threads < nt) {
#pragma omp parallel num_threads(nt)
        _mm_setcsr(csr_for(_mm_getcsr(), on));
        synced_generation = gen;
        synced_threads = nt;
    }
    const unsigned want = csr_for(saved_, on);
    _mm_setcsr(want);
    restore_ = want != saved_;
#endif
}

DenormalScope::~DenormalScope() {
#if defined(__x86_64__) || defined(__i386__)
    if (restore_) _mm_setcsr(saved_);
#endif
}

bool keep_freed_memory() {
#if defined(__GLIBC__)
    // A freed block of several MB is otherwise trimmed from the heap or
    // unmapped, and the next array of that size is faulted in page by page:
    // up to 2,000 page faults a LeNet forward, relu and pooling 5-10x slower.
    // Blocks up to 32 MB come from the heap, up to 1 GiB of free heap is kept,
    // and growing the heap adds 64 MB of slack.
    return mallopt(M_MMAP_THRESHOLD, 32 << 20) == 1 && mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1 &&
           mallopt(M_TOP_PAD, 64 << 20) == 1;
#else
    return false;
#endif
}

namespace {
struct FreeDeleter {
    void operator()(void* p) const { std::free(p); }
};
struct Buffer {
    std::unique_ptr<void, FreeDeleter> ptr;
    std::size_t size = 0;
};
constexpr int kSlots = 4;
}  // namespace

void* workspace(std::size_t bytes, int slot) {
    if (slot < 0 || slot >= kSlots) throw std::out_of_range("workspace slot");
    thread_local Buffer buffers[kSlots];
    Buffer& b = buffers[slot];
    if (bytes == 0) bytes = 64;
    if (b.size < bytes) {
        b.ptr.reset();
        b.size = 0;
        std::size_t rounded = (bytes + 63) / 64 * 64;
        void* p = std::aligned_alloc(64, rounded);
        if (p == nullptr) throw std::bad_alloc();
        b.ptr.reset(p);
        b.size = rounded;
    }
    return b.ptr.get();
}

}  // namespace convkern

namespace convkern {

namespace {
constexpr const char* kConvAlgoNames[kConvAlgos] = {"direct", "depthwise", "im2col", "shifted", "winograd", "auto"};
}

const char* conv_algo_name(ConvAlgo a) { return kConvAlgoNames[static_cast<int>(a)]; }

bool conv_algo_from_name(const std::string& name, ConvAlgo& a) {
    for (int i = 0; i < kConvAlgos; ++i)
        if (name == kConvAlgoNames[i]) {
            a = static_cast<ConvAlgo>(i);
            return true;
        }
    return false;
}

}  // namespace convkern

namespace convkern {

namespace {
thread_local ConvAlgo g_last_conv_algo = ConvAlgo::auto_;
}

void note_conv_algo(ConvAlgo a) { g_last_conv_algo = a; }
ConvAlgo last_conv_algo() { return g_last_conv_algo; }

}  // namespace convkern
