// pybind11 bindings for convkern._cuda. The module imports on machines with no
// GPU or no driver; calls that need a device raise RuntimeError saying why.
// Kernel entry points take device pointers (integers: CuPy's x.data.ptr), the
// geometry as a tuple, the dtype name and a stream handle (CuPy's
// get_current_stream().ptr); convkern/backend/cuda_gpu.py builds them. They
// release the GIL while launching; errors name the kernel.
#include <array>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "device.cuh"
#include "ops.cuh"

namespace py = pybind11;
namespace ck = convkern::cuda;
using ck::i64;

namespace {

typedef std::uintptr_t ptr_t;

cudaStream_t as_stream(ptr_t s) { return reinterpret_cast<cudaStream_t>(s); }
template <class T> T* as(ptr_t p) { return reinterpret_cast<T*>(p); }

bool is_f32(const std::string& dtype) {
    if (dtype == "float32") return true;
    if (dtype == "float64") return false;
    throw py::type_error("dtype must be 'float32' or 'float64', got '" + dtype + "'");
}

// The geometry arrives as the tuple convkern.geometry packs, field for field
// (convkern/include/convkern/geometry.h); conv_geom_error is its one check.
ck::ConvGeom conv_geom(const std::array<i64, 16>& t) {
    static_assert(sizeof(ck::ConvGeom) == sizeof(t), "the tuple is the struct");
    ck::ConvGeom g;
    std::memcpy(&g, t.data(), sizeof g);
    if (const char* why = convkern::conv_geom_error(g)) throw py::value_error(why);
    return g;
}

ck::PoolGeom pool_geom(const std::array<i64, 15>& t) {
    static_assert(sizeof(ck::PoolGeom) == sizeof(t), "the tuple is the struct");
    ck::PoolGeom p;
    std::memcpy(&p, t.data(), sizeof p);
    if (const char* why = convkern::pool_geom_error(p)) throw py::value_error(why);
    return p;
}

// Runs f<float> or f<double> without the GIL, after checking for a device.
template <class F>
void run(const std::string& dtype, F f) {
    const bool f32 = is_f32(dtype);
    ck::require_device();
    py::gil_scoped_release nogil;
    if (f32)
        f(float(0));
    else
        f(double(0));
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
    m.doc() = "convkern CUDA kernels (conv2d direct/im2col/implicit GEMM, pooling, relu) and device query";
    m.def("geometry_fields", [] { return py::make_tuple(CK_CONV_GEOM_FIELDS, CK_POOL_GEOM_FIELDS); },
          "the field order of the conv and pool geometry structs, as convkern.geometry checks it");
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

    m.def("relu_forward", [](ptr_t x, ptr_t y, i64 n, const std::string& dtype, ptr_t stream) {
        run(dtype, [&](auto z) {
            typedef decltype(z) T;
            ck::relu_forward<T>(as<const T>(x), as<T>(y), n, as_stream(stream));
        });
    });
    m.def("relu_backward", [](ptr_t gy, ptr_t x, ptr_t gx, i64 n, const std::string& dtype, ptr_t stream) {
        run(dtype, [&](auto z) {
            typedef decltype(z) T;
            ck::relu_backward<T>(as<const T>(gy), as<const T>(x), as<T>(gx), n, as_stream(stream));
        });
    });
    m.def("max_pool2d_forward", [](ptr_t x, ptr_t y, ptr_t ind, const std::array<i64, 15>& geom,
                                   const std::string& dtype, ptr_t stream) {
        const ck::PoolGeom p = pool_geom(geom);
        run(dtype, [&](auto z) {
            typedef decltype(z) T;
            ck::max_pool2d_forward<T>(as<const T>(x), as<T>(y), as<std::int64_t>(ind), p, as_stream(stream));
        });
    }, "ind = 0: values only");
    m.def("max_pool2d_backward", [](ptr_t gy, ptr_t ind, ptr_t gx, const std::array<i64, 15>& geom,
                                    const std::string& dtype, ptr_t stream) {
        const ck::PoolGeom p = pool_geom(geom);
        int bad = 0;
        run(dtype, [&](auto z) {
            typedef decltype(z) T;
            bad = ck::max_pool2d_backward<T>(as<const T>(gy), as<const std::int64_t>(ind), as<T>(gx), p,
                                             as_stream(stream));
        });
        if (bad)
            throw py::value_error("indices: an index lies outside its (H*W = " + std::to_string(p.H * p.W) +
                                  ") input plane");
    });
    m.def("avg_pool2d_forward", [](ptr_t x, ptr_t y, const std::array<i64, 15>& geom,
                                   const std::string& dtype, ptr_t stream) {
        const ck::PoolGeom p = pool_geom(geom);
        run(dtype, [&](auto z) {
            typedef decltype(z) T;
            ck::avg_pool2d_forward<T>(as<const T>(x), as<T>(y), p, as_stream(stream));
        });
    });
    m.def("avg_pool2d_backward", [](ptr_t gy, ptr_t gx, const std::array<i64, 15>& geom,
                                   const std::string& dtype, ptr_t stream) {
        const ck::PoolGeom p = pool_geom(geom);
        run(dtype, [&](auto z) {
            typedef decltype(z) T;
            ck::avg_pool2d_backward<T>(as<const T>(gy), as<T>(gx), p, as_stream(stream));
        });
    });
    m.def("conv2d_forward", [](ptr_t x, ptr_t w, ptr_t b, ptr_t y, const std::array<i64, 16>& geom,
                               const std::string& algo, ptr_t work, i64 work_elems, const std::string& dtype,
                               ptr_t stream) {
        const ck::ConvGeom g = conv_geom(geom);
        if (algo != "direct" && algo != "im2col" && algo != "implicit")
            throw py::value_error("algo must be 'direct', 'im2col' or 'implicit', got '" + algo + "'");
        run(dtype, [&](auto z) {
            typedef decltype(z) T;
            if (algo == "direct")
                ck::conv2d_forward_direct<T>(as<const T>(x), as<const T>(w), as<const T>(b), as<T>(y), g,
                                             as_stream(stream));
            else if (algo == "implicit")
                ck::conv2d_forward_implicit<T>(as<const T>(x), as<const T>(w), as<const T>(b), as<T>(y), g,
                                               as_stream(stream));
            else
                ck::conv2d_forward_im2col<T>(as<const T>(x), as<const T>(w), as<const T>(b), as<T>(y), g, as<T>(work),
                                             work_elems, as_stream(stream));
        });
    }, "b = 0: no bias; work: im2col's column buffer (work_elems elements)");
    m.def("conv2d_grad_input", [](ptr_t gy, ptr_t w, ptr_t gx, const std::array<i64, 16>& geom,
                                  const std::string& algo, ptr_t work, i64 work_elems, const std::string& dtype,
                                  ptr_t stream) {
        const ck::ConvGeom g = conv_geom(geom);
        run(dtype, [&](auto z) {
            typedef decltype(z) T;
            if (algo == "direct")
                ck::conv2d_grad_input_direct<T>(as<const T>(gy), as<const T>(w), as<T>(gx), g, as_stream(stream));
            else
                ck::conv2d_grad_input_im2col<T>(as<const T>(gy), as<const T>(w), as<T>(gx), g, as<T>(work),
                                                work_elems, as_stream(stream));
        });
    });
    m.def("conv2d_grad_weight", [](ptr_t gy, ptr_t x, ptr_t gw, const std::array<i64, 16>& geom,
                                   const std::string& algo, int splits, ptr_t work, const std::string& dtype,
                                   ptr_t stream) {
        const ck::ConvGeom g = conv_geom(geom);
        run(dtype, [&](auto z) {
            typedef decltype(z) T;
            if (algo == "direct")
                ck::conv2d_grad_weight_direct<T>(as<const T>(gy), as<const T>(x), as<T>(gw), g, as_stream(stream));
            else
                ck::conv2d_grad_weight_implicit<T>(as<const T>(gy), as<const T>(x), as<T>(gw), g, splits, as<T>(work),
                                                   as_stream(stream));
        });
    }, "splits > 1 needs work of splits * K * C/G*R*S elements");
    m.def("conv2d_grad_bias", [](ptr_t gy, ptr_t gb, const std::array<i64, 16>& geom, const std::string& dtype,
                                 ptr_t stream) {
        const ck::ConvGeom g = conv_geom(geom);
        run(dtype, [&](auto z) {
            typedef decltype(z) T;
            ck::conv2d_grad_bias<T>(as<const T>(gy), as<T>(gb), g, as_stream(stream));
        });
    });
    m.def("im2col_work_elems", [](const std::array<i64, 16>& geom, i64 images) {
        return ck::im2col_work_elems(conv_geom(geom), images);
    });
    // the index-type rule, for tests: whether a problem of n elements runs on int32 indices
    m.def("index_fits_int32", [](i64 n) { return ck::fits_int32(n); });
    m.attr("MAX_GRID_STRIDE") = ck::kMaxGridStride;
    // the float GEMM's tile rule, for tests: 1-4 as set_gemm_tile takes them
    m.def("gemm_tile_for", [](i64 M, i64 N, i64 zcount, int sms) {
        return ck::gemm_tile_choice(M, N, zcount, sms);
    });
    m.def("set_gemm_tile", [](int tile) {
        try {
            ck::set_gemm_tile(tile);
        } catch (const std::invalid_argument& e) {
            throw py::value_error(e.what());
        }
    }, "force the tiled GEMM's tile for float (1-4: 64x64, 64x128, 128x64, 128x128), process-wide; 0: automatic");
    m.def("gemm_tile", &ck::forced_gemm_tile, "the forced tile (0: automatic)");
    m.def("grad_weight_splits", [](const std::array<i64, 16>& geom) { return ck::grad_weight_splits(conv_geom(geom)); });
    m.def("gemm", [](ptr_t a, ptr_t b, ptr_t c, i64 M, i64 N, i64 K, const std::string& dtype, ptr_t stream) {
        if (M < 0 || N < 0 || K < 0) throw py::value_error("gemm: negative size");
        run(dtype, [&](auto z) {
            typedef decltype(z) T;
            ck::gemm<T>(as<const T>(a), as<const T>(b), as<T>(c), M, N, K, as_stream(stream));
        });
    }, "C (M, N) = A (M, K) B (K, N), row-major device arrays");
}
