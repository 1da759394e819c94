// Runtime services compiled for the baseline ISA: CPU feature detection and
// kernel-table selection, the thread count, and per-thread workspaces.
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

#include <omp.h>
#include <unistd.h>
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

namespace {
// Size in bytes and ways of the data or unified cache at `level` that cpu0
// sees, from sysfs (what one core shares: an AMD CCX's L3, not the socket's),
// or 0.
idx sysfs_cache(int level, idx* ways) {
    for (int i = 0; i < 16; ++i) {
        const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(i) + "/";
        char buf[64] = {0};
        auto read = [&](const char* name) {
            std::FILE* f = std::fopen((dir + name).c_str(), "r");
            if (f == nullptr) return false;
            const bool ok = std::fgets(buf, sizeof buf, f) != nullptr;
            std::fclose(f);
            return ok;
        };
        if (!read("level")) return 0;
        if (std::atoi(buf) != level) continue;
        if (!read("type") || std::strncmp(buf, "Instruction", 11) == 0) continue;
        if (!read("size")) continue;
        char* end = nullptr;
        const long long size = std::strtoll(buf, &end, 10);
        const idx unit = (*end == 'K') ? 1024 : (*end == 'M') ? (1 << 20) : 1;
        *ways = read("ways_of_associativity") ? std::atoll(buf) : 0;
        return size > 0 ? static_cast<idx>(size) * unit : 0;
    }
    return 0;
}
}  // namespace

namespace {
// "48K/12": a size with an optional K or M suffix, then optionally "/ways".
bool parse_cache(const std::string& text, idx* size, idx* ways) {
    char* end = nullptr;
    const long long v = std::strtoll(text.c_str(), &end, 10);
    if (end == text.c_str() || v <= 0 || v > (1LL << 32)) return false;
    idx unit = 1;
    if (*end == 'K' || *end == 'k') unit = 1024, ++end;
    else if (*end == 'M' || *end == 'm') unit = idx(1) << 20, ++end;
    *size = static_cast<idx>(v) * unit;
    if (*end == '\0') return true;
    if (*end != '/') return false;
    const char* w = end + 1;
    const long long n = std::strtoll(w, &end, 10);
    if (end == w || *end != '\0' || n <= 0 || n > 64) return false;
    *ways = static_cast<idx>(n);
    return true;
}

struct CacheReading {
    CacheSizes sizes{};
    std::string error;
};

const CacheReading& cache_reading() {
    static const CacheReading reading = [] {
        CacheReading r;
        CacheSizes& c = r.sizes;
        const int names[3] = {_SC_LEVEL1_DCACHE_SIZE, _SC_LEVEL2_CACHE_SIZE, _SC_LEVEL3_CACHE_SIZE};
        const int assoc[3] = {_SC_LEVEL1_DCACHE_ASSOC, _SC_LEVEL2_CACHE_ASSOC, _SC_LEVEL3_CACHE_ASSOC};
        const idx defaults[3] = {idx(32) << 10, idx(512) << 10, idx(4) << 20}, default_ways[3] = {8, 8, 16};
        idx* out[3] = {&c.l1d, &c.l2, &c.l3};
        for (int i = 0; i < 3; ++i) {
            idx ways = 0, v = sysfs_cache(i + 1, &ways);
            if (v <= 0) {
                v = static_cast<idx>(sysconf(names[i]));
                ways = static_cast<idx>(sysconf(assoc[i]));
            }
            c.known[i] = v > 0;
            *out[i] = v > 0 ? v : defaults[i];
            c.ways[i] = v > 0 && ways > 0 ? ways : default_ways[i];
        }
        const char* env = std::getenv("CONVKERN_CACHES");
        if (env == nullptr || *env == '\0') return r;
        CacheSizes forced = c;
        idx* fout[3] = {&forced.l1d, &forced.l2, &forced.l3};
        std::vector<std::string> items(1);
        for (const char* p = env; *p; ++p) {
            if (*p == ',') items.emplace_back();
            else items.back() += *p;
        }
        bool ok = items.size() == 3;
        for (int i = 0; ok && i < 3; ++i) {
            ok = parse_cache(items[i], fout[i], &forced.ways[i]);
            forced.known[i] = true;
        }
        if (!ok)
            r.error = std::string("CONVKERN_CACHES must be the L1d, L2 and L3 sizes, each with an optional ") +
                      "K or M suffix and /ways, e.g. '48K/12,1M/16,32M/16'; got '" + env + "'";
        else
            c = forced, c.from_env = true;
        return r;
    }();
    return reading;
}
}  // namespace

const CacheSizes& cache_sizes() { return cache_reading().sizes; }

void check_cache_override() {
    const CacheReading& r = cache_reading();
    if (!r.error.empty()) throw std::invalid_argument(r.error);
}

namespace {
bool blocking_in_range(long long kc, long long mc, long long nc) {
    return kc >= 8 && mc >= 1 && nc >= 1 && kc <= (1 << 16) && mc <= (1 << 16) && nc <= (1 << 20) &&
           kc * (mc + nc) <= (1LL << 28);
}
constexpr const char* kBlockingRange = "(KC 8..65536, MC 1..65536, NC 1..1048576, KC*(MC+NC) at most 2^28)";

struct BlockingEnv {
    idx v[3] = {0, 0, 0};
    std::string error;
};

const BlockingEnv& blocking_env() {
    static const BlockingEnv o = [] {
        BlockingEnv r;
        const char* env = std::getenv("CONVKERN_GEMM_BLOCKING");
        if (env == nullptr || *env == '\0') return r;
        long long a = 0, b = 0, c = 0;
        char tail = 0;
        if (std::sscanf(env, "%lld,%lld,%lld%c", &a, &b, &c, &tail) != 3 || !blocking_in_range(a, b, c))
            r.error = std::string("CONVKERN_GEMM_BLOCKING must be KC,MC,NC: three positive integers ") +
                      kBlockingRange + "; got '" + env + "'";
        else
            r.v[0] = a, r.v[1] = b, r.v[2] = c;
        return r;
    }();
    return o;
}

std::mutex g_blocking_mutex;
bool g_blocking_frozen = false;  // a kernel has taken its blocking: it can no longer change
idx g_tuned_blocking[3] = {0, 0, 0};
}  // namespace

void check_gemm_blocking_env() {
    if (!blocking_env().error.empty()) throw std::invalid_argument(blocking_env().error);
}

bool set_tuned_gemm_blocking(idx kc, idx mc, idx nc) {
    if (!blocking_in_range(kc, mc, nc))
        throw std::invalid_argument(std::string("tuned GEMM blocking out of range ") + kBlockingRange + ": " +
                                    std::to_string(kc) + "," + std::to_string(mc) + "," + std::to_string(nc));
    std::lock_guard<std::mutex> lock(g_blocking_mutex);
    if (g_blocking_frozen) return false;
    g_tuned_blocking[0] = kc, g_tuned_blocking[1] = mc, g_tuned_blocking[2] = nc;
    return true;
}

BlockingSource gemm_blocking_setting(bool f64, bool freeze, idx out[3]) {
    const BlockingEnv& env = blocking_env();
    std::lock_guard<std::mutex> lock(g_blocking_mutex);
    if (freeze) g_blocking_frozen = true;
    if (env.v[0] > 0) {
        for (int i = 0; i < 3; ++i) out[i] = env.v[i];
        return BlockingSource::environment;
    }
    if (!f64 && g_tuned_blocking[0] > 0) {
        for (int i = 0; i < 3; ++i) out[i] = g_tuned_blocking[i];
        return BlockingSource::tuned;
    }
    return BlockingSource::caches;
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
constexpr int kSlots = 5;
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
constexpr const char* kConvAlgoNames[kConvAlgos] = {"direct", "depthwise", "im2col", "shifted", "winograd",
                                                             "winograd4", "auto"};
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
