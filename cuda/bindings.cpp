// pybind11 bindings for convkern._cuda. The module imports on machines with no
// GPU or no driver; calls that need a device raise RuntimeError saying why.
#include <stdexcept>
#include <string>
#include <vector>

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "device.cuh"

namespace py = pybind11;
namespace ck = convkern::cuda;

PYBIND11_MODULE(_cuda, m) {
    m.doc() = "convkern CUDA module: device query (kernels come in their own files)";
    m.def("device_count", [] { return ck::device_count(nullptr); }, "visible CUDA devices (0 if none or no driver)");
    m.def("unavailable_reason", [] {
        std::string why;
        return ck::device_count(&why) > 0 ? std::string() : why;
    });
    m.def("device_info", [](int device) {
        std::string why;
        int n = ck::device_count(&why);
        if (device < 0 || device >= n)
            throw py::value_error("device " + std::to_string(device) + " out of range: " + std::to_string(n) +
                                  " visible" + (why.empty() ? "" : " (" + why + ")"));
        ck::DeviceInfo d = ck::device_info(device);
        py::dict out;
        out["name"] = d.name;
        out["compute_capability"] = py::make_tuple(d.major, d.minor);
        out["total_memory"] = d.total_memory;
        out["multiprocessors"] = d.multiprocessors;
        return out;
    });
    m.def("runtime_version", &ck::runtime_version);
    m.def("driver_version", &ck::driver_version);
    m.def("selftest", [](int n) {
        if (n < 0) throw py::value_error("n must be >= 0");
        std::vector<int> out(n);
        {
            py::gil_scoped_release nogil;
            ck::selftest_iota(out.data(), n);
        }
        return out;
    }, py::arg("n") = 1000, "launch a trivial kernel and return its output (0..n-1)");
}
