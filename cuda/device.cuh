// Device discovery and a self-test launch for convkern._cuda. The op kernels
// come in their own files; this is what the module can do on any machine.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

namespace convkern::cuda {

struct DeviceInfo {
    std::string name;
    int major = 0, minor = 0;
    std::size_t total_memory = 0;
    int multiprocessors = 0;
};

// Number of visible devices; 0 (and `why` set) when there is no usable driver
// or device. Never throws: a machine without a GPU is a normal state.
int device_count(std::string* why);
DeviceInfo device_info(int device);  // throws std::runtime_error
int runtime_version();
int driver_version();  // 0 when no driver is installed

// Fills n ints with 0..n-1 on the device and copies them back; throws
// std::runtime_error naming the failing call.
void selftest_iota(int* host_out, int n);

}  // namespace convkern::cuda
