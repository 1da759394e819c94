#include <cuda_runtime.h>

#include <atomic>
#include <stdexcept>
#include <string>

#include "common.cuh"
#include "device.cuh"

namespace convkern::cuda {

namespace {

void check(cudaError_t status, const char* what) {
    if (status != cudaSuccess)
        throw std::runtime_error(std::string(what) + ": " + cudaGetErrorName(status) + ": " +
                                 cudaGetErrorString(status));
}

// out is (n,)
__global__ void iota_kernel(int* out, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) out[i] = i;
}

}  // namespace

void check_launch(const char* kernel) {
    const cudaError_t status = cudaGetLastError();
    if (status == cudaSuccess) return;
    std::string msg = std::string(kernel) + ": " + cudaGetErrorName(status) + ": " + cudaGetErrorString(status);
    if (status == cudaErrorNoKernelImageForDevice || status == cudaErrorUnsupportedPtxVersion) {
        int dev = 0, major = 0, minor = 0;
        cudaGetDevice(&dev);
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
        cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
        msg += " (this GPU is sm_" + std::to_string(major * 10 + minor) +
               "; rebuild convkern with CMAKE_CUDA_ARCHITECTURES including it)";
    }
    if (status == cudaErrorMemoryAllocation) msg = "CUDA out of memory in " + msg;
    throw std::runtime_error(msg);
}

int current_multiprocessors() {
    static std::atomic<int> cache[64];  // 0: not asked yet
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) {
        cudaGetLastError();
        return 0;
    }
    int n = cache[dev].load(std::memory_order_relaxed);
    if (n == 0) {
        int asked = 0;
        if (cudaDeviceGetAttribute(&asked, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) {
            cudaGetLastError();
            return 0;
        }
        cache[dev].store(n = asked, std::memory_order_relaxed);
    }
    return n;
}

void require_device() {
    std::string why;
    if (device_count(&why) == 0) throw std::runtime_error("no usable CUDA device: " + why);
}

int device_count(std::string* why) {
    int n = 0;
    cudaError_t status = cudaGetDeviceCount(&n);
    if (status != cudaSuccess) {
        if (why) *why = std::string(cudaGetErrorName(status)) + ": " + cudaGetErrorString(status);
        cudaGetLastError();  // clear the sticky-free error so later calls start clean
        return 0;
    }
    if (n == 0 && why) *why = "no CUDA device visible";
    return n;
}

DeviceInfo device_info(int device) {
    cudaDeviceProp prop{};
    check(cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties");
    DeviceInfo info;
    info.name = prop.name;
    info.major = prop.major;
    info.minor = prop.minor;
    info.total_memory = prop.totalGlobalMem;
    info.multiprocessors = prop.multiProcessorCount;
    return info;
}

int runtime_version() {
    int v = 0;
    check(cudaRuntimeGetVersion(&v), "cudaRuntimeGetVersion");
    return v;
}

int driver_version() {
    int v = 0;
    if (cudaDriverGetVersion(&v) != cudaSuccess) return 0;
    return v;
}

void selftest_iota(int* host_out, int n) {
    std::string why;
    if (device_count(&why) == 0) throw std::runtime_error("no CUDA device: " + why);
    int* dev = nullptr;
    check(cudaMalloc(&dev, sizeof(int) * (n > 0 ? n : 1)), "cudaMalloc");
    try {
        iota_kernel<<<(n + 255) / 256 > 0 ? (n + 255) / 256 : 1, 256>>>(dev, n);
        check(cudaGetLastError(), "iota_kernel launch");
        check(cudaDeviceSynchronize(), "iota_kernel");
        check(cudaMemcpy(host_out, dev, sizeof(int) * n, cudaMemcpyDeviceToHost), "cudaMemcpy");
    } catch (...) {
        cudaFree(dev);
        throw;
    }
    check(cudaFree(dev), "cudaFree");
}

}  // namespace convkern::cuda
