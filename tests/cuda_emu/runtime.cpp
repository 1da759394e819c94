// The CPU emulator's runtime (see include/cuda_runtime.h), and the host
// functions of cuda/device.cu that need a real GPU, answered for the emulator.
#include <ucontext.h>

#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda_runtime.h"
#include "device.cuh"

uint3 threadIdx, blockIdx;
dim3 blockDim, gridDim;

namespace {

cudaError_t g_last_error = cudaSuccess;
bool g_force_index64 = false;
bool g_reverse_threads = false;  // run a block's threads last to first (see ck_emu_reverse_threads)
std::mutex g_launch_lock;  // one launch at a time: the kernels' state is global

// dynamic shared memory of the running block
std::vector<unsigned char> g_smem;

// ---- fibers for kernels with barriers ----
constexpr std::size_t kStackBytes = 256 * 1024;
enum class State { runnable, at_barrier, done };
struct Fiber {
    ucontext_t ctx;
    std::unique_ptr<char[]> stack;
    State state = State::runnable;
    uint3 tid{};
};
ucontext_t g_scheduler;
std::vector<Fiber> g_fibers;
Fiber* g_current = nullptr;
const std::function<void()>* g_body = nullptr;

void fiber_entry() {
    (*g_body)();
    g_current->state = State::done;
    // returning resumes g_scheduler through uc_link
}

void fail(const char* what) {
    std::fprintf(stderr, "cuda emulator: %s\n", what);
    std::abort();
}

void run_block_with_fibers(unsigned nthreads, const dim3& block) {
    if (g_fibers.size() < nthreads) g_fibers.resize(nthreads);
    for (unsigned t = 0; t < nthreads; ++t) {
        Fiber& f = g_fibers[t];
        if (!f.stack) f.stack.reset(new char[kStackBytes]);
        f.state = State::runnable;
        f.tid = uint3{t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
        if (getcontext(&f.ctx) != 0) fail("getcontext failed");
        f.ctx.uc_stack.ss_sp = f.stack.get();
        f.ctx.uc_stack.ss_size = kStackBytes;
        f.ctx.uc_link = &g_scheduler;
        makecontext(&f.ctx, fiber_entry, 0);
    }
    for (;;) {
        for (unsigned i = 0; i < nthreads; ++i) {
            Fiber& f = g_fibers[g_reverse_threads ? nthreads - 1 - i : i];
            if (f.state != State::runnable) continue;
            g_current = &f;
            threadIdx = f.tid;
            if (swapcontext(&g_scheduler, &f.ctx) != 0) fail("swapcontext failed");
        }
        // every thread has now finished or is waiting at the barrier: release it
        // (threads that exited count as arrived, as on sm_70 and later)
        bool waiting = false;
        for (unsigned t = 0; t < nthreads; ++t)
            if (g_fibers[t].state == State::at_barrier) {
                g_fibers[t].state = State::runnable;
                waiting = true;
            }
        if (!waiting) break;
    }
    g_current = nullptr;
}

}  // namespace

namespace ck_emu {

void syncthreads() {
    if (!g_current) fail("__syncthreads in a kernel launched without fibers (build.py did not see its barrier)");
    Fiber* f = g_current;
    f->state = State::at_barrier;
    if (swapcontext(&f->ctx, &g_scheduler) != 0) fail("swapcontext failed");
}

void* dynamic_smem_bytes() { return g_smem.data(); }

bool force_index64() { return g_force_index64; }

void fault(const char* what) {
    std::fprintf(stderr, "cuda emulator: %s\n", what);
    g_last_error = cudaErrorMisalignedAddress;
}

void run_grid(bool barriers, dim3 grid, dim3 block, std::size_t smem, const std::function<void()>& body) {
    std::lock_guard<std::mutex> lock(g_launch_lock);
    // CUDA's launch limits (compute capability 7.0 and later); a violation is
    // a launch error, reported by the next cudaGetLastError, and nothing runs.
    const unsigned long long nthreads = 1ULL * block.x * block.y * block.z;
    if (grid.x == 0 || grid.y == 0 || grid.z == 0 || nthreads == 0 || nthreads > 1024 || block.x > 1024 ||
        block.y > 1024 || block.z > 64 || grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535 ||
        smem > 48 * 1024) {
        g_last_error = cudaErrorInvalidConfiguration;
        return;
    }
    gridDim = grid;
    blockDim = block;
    g_body = &body;
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                blockIdx = uint3{bx, by, bz};
                g_smem.assign(smem, 0xff);  // NaN bytes: reading what no thread wrote shows
                if (barriers) {
                    run_block_with_fibers(static_cast<unsigned>(nthreads), block);
                    continue;
                }
                for (unsigned t = 0; t < nthreads; ++t) {
                    threadIdx = uint3{t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
                    body();
                }
            }
    g_body = nullptr;
}

}  // namespace ck_emu

extern "C" __attribute__((visibility("default"))) void ck_emu_force_index64(int on) { g_force_index64 = on != 0; }

// Threads between two barriers run one after another, so a missing barrier
// shows only where a thread reads what a thread later in the order writes;
// the reverse order shows the other half of such races.
extern "C" __attribute__((visibility("default"))) void ck_emu_reverse_threads(int on) { g_reverse_threads = on != 0; }

cudaError_t cudaGetLastError() {
    const cudaError_t e = g_last_error;
    g_last_error = cudaSuccess;
    return e;
}
cudaError_t cudaPeekAtLastError() { return g_last_error; }
const char* cudaGetErrorName(cudaError_t e) {
    switch (e) {
        case cudaSuccess: return "cudaSuccess";
        case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
        case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
        case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
        case cudaErrorMisalignedAddress: return "cudaErrorMisalignedAddress";
    }
    return "cudaErrorUnknown";
}
const char* cudaGetErrorString(cudaError_t e) {
    switch (e) {
        case cudaSuccess: return "no error";
        case cudaErrorInvalidValue: return "invalid argument";
        case cudaErrorMemoryAllocation: return "out of memory";
        case cudaErrorInvalidConfiguration: return "invalid configuration argument";
        case cudaErrorMisalignedAddress: return "misaligned address";
    }
    return "unknown error";
}
cudaError_t cudaMallocAsync(void** p, std::size_t bytes, cudaStream_t) {
    *p = std::malloc(bytes ? bytes : 1);
    return *p ? cudaSuccess : (g_last_error = cudaErrorMemoryAllocation);
}
cudaError_t cudaFreeAsync(void* p, cudaStream_t) {
    std::free(p);
    return cudaSuccess;
}
cudaError_t cudaMemsetAsync(void* p, int value, std::size_t bytes, cudaStream_t) {
    std::memset(p, value, bytes);
    return cudaSuccess;
}
cudaError_t cudaMemcpyAsync(void* dst, const void* src, std::size_t bytes, cudaMemcpyKind, cudaStream_t) {
    std::memcpy(dst, src, bytes);
    return cudaSuccess;
}
cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }

namespace convkern::cuda {

void check_launch(const char* kernel) {
    const cudaError_t status = cudaGetLastError();
    if (status == cudaSuccess) return;
    throw std::runtime_error(std::string(kernel) + ": " + cudaGetErrorName(status) + ": " + cudaGetErrorString(status));
}

void require_device() {}

int current_multiprocessors() { return 1; }

int device_count(std::string*) { return 1; }

DeviceInfo device_info(int) {
    DeviceInfo d;
    d.name = "convkern CUDA emulator (CPU)";
    d.major = 9;
    d.multiprocessors = 1;
    return d;
}

int runtime_version() { return 0; }
int driver_version() { return 0; }

void selftest_iota(int* host_out, int n) {
    for (int i = 0; i < n; ++i) host_out[i] = i;
}

}  // namespace convkern::cuda
