// Shared by the binding files (bindings.cpp: the NCHW ops and the module;
// bindings_nhwc.cpp: the channels_last ops): argument checks, output
// allocation and the kernel region. Everything here has internal linkage.
#pragma once
#include <array>
#include <cstring>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <stdexcept>
#include <string>

#include <omp.h>
#if __has_include(<valgrind/callgrind.h>)
#include <valgrind/callgrind.h>
#define CONVKERN_CALLGRIND 1
#else
#define CONVKERN_CALLGRIND 0
#define CALLGRIND_DUMP_STATS
#endif
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "common.hpp"

namespace py = pybind11;

// bindings_nhwc.cpp
void bind_nhwc(py::module_& m);
using convkern::active_kernels;
using convkern::conv_algo_from_name;
using convkern::ConvAlgo;
using convkern::ConvGeom;
using convkern::idx;
using convkern::PoolGeom;

namespace {

// Every kernel runs inside kernel_region, with the GIL released. The
// instruction-count gate (convkern/gate.py) tells callgrind to count only
// inside this function (--toggle-collect=*kernel_region*), so it must keep its
// own symbol: never inlined, and the module is not stripped (CMakeLists.txt).
// Under callgrind each call ends with a dump of its own counts (a no-op of a
// few instructions otherwise).
// CONVKERN_DEBUG_REPEAT=n runs each kernel n times: a deliberately slowed
// build that the regression gates' own tests must catch.
int debug_repeat() {
    static const int n = [] {
        const char* v = std::getenv("CONVKERN_DEBUG_REPEAT");
        const int r = v ? std::atoi(v) : 1;
        return r > 1 ? r : 1;
    }();
    return n;
}

__attribute__((noinline)) void kernel_region(const std::function<void()>& kernel) {
    py::gil_scoped_release nogil;
    convkern::DenormalScope denormals;
    for (int i = 0; i < debug_repeat(); ++i) kernel();
    CALLGRIND_DUMP_STATS;
}

enum class DType { f32, f64 };

DType dtype_of(const py::array& a, const char* name) {
    const py::dtype dt = a.dtype();
    const bool native = dt.byteorder() == '=' || dt.byteorder() == '<' || dt.byteorder() == '|';
    if (native && dt.kind() == 'f' && dt.itemsize() == 4) return DType::f32;
    if (native && dt.kind() == 'f' && dt.itemsize() == 8) return DType::f64;
    throw py::type_error(std::string(name) + ": expected float32 or float64, got " +
                         py::str(a.dtype()).cast<std::string>());
}

void require(const py::array& a, const char* name, DType dt, idx numel) {
    if (dtype_of(a, name) != dt) throw py::type_error(std::string(name) + ": dtype differs from the input's");
    if (!(a.flags() & py::array::c_style)) throw py::value_error(std::string(name) + ": must be C-contiguous");
    if (a.size() != numel)
        throw py::value_error(std::string(name) + ": has " + std::to_string(a.size()) + " elements, geometry needs " +
                              std::to_string(numel));
}

template <class T>
const convkern::OpTable<T>& ops() {
    if constexpr (std::is_same<T, float>::value)
        return convkern::active_kernels().f32;
    else
        return convkern::active_kernels().f64;
}

// The geometry arrives as the tuple convkern.geometry packs, field for field
// (convkern/include/convkern/geometry.h); conv_geom_error is its one check.
ConvGeom conv_geom(const std::array<idx, 16>& t) {
    static_assert(sizeof(ConvGeom) == sizeof(t), "the tuple is the struct");
    ConvGeom g;
    std::memcpy(&g, t.data(), sizeof g);
    if (const char* why = conv_geom_error(g)) throw py::value_error(why);
    return g;
}

PoolGeom pool_geom(const std::array<idx, 15>& t) {
    static_assert(sizeof(PoolGeom) == sizeof(t), "the tuple is the struct");
    PoolGeom p;
    std::memcpy(&p, t.data(), sizeof p);
    if (const char* why = pool_geom_error(p)) throw py::value_error(why);
    return p;
}

template <class T>
py::array_t<T> empty(std::vector<idx> shape) {
    return py::array_t<T>(std::vector<py::ssize_t>(shape.begin(), shape.end()));
}

template <class T>
const T* cptr(const py::array& a) {
    return static_cast<const T*>(a.data());
}
template <class T>
T* mptr(py::array& a) {
    return static_cast<T*>(a.mutable_data());
}

// The bias's data, checked (null for None); the caller's `b` keeps it alive.
template <class T>
const T* bias_ptr(const py::object& b, DType dt, idx K) {
    if (b.is_none()) return nullptr;
    const auto barr = py::reinterpret_borrow<py::array>(b);
    require(barr, "bias", dt, K);
    return cptr<T>(barr);
}

// conv2d_backward's outputs: each an array (None where not asked for) and
// its data pointer (null where not asked for); grad input takes x_shape.
template <class T>
struct ConvGrads {
    py::object gx = py::none(), gw = py::none(), gb = py::none();
    T *gxp = nullptr, *gwp = nullptr, *gbp = nullptr;
    ConvGrads(std::vector<idx> x_shape, const ConvGeom& s, bool need_gx, bool need_gw, bool need_gb) {
        if (need_gx) {
            py::array a = empty<T>(x_shape);
            gxp = mptr<T>(a);
            gx = a;
        }
        if (need_gw) {
            py::array a = empty<T>({s.K, s.C / s.G, s.R, s.S});
            gwp = mptr<T>(a);
            gw = a;
        }
        if (need_gb) {
            py::array a = empty<T>({s.K});
            gbp = mptr<T>(a);
            gb = a;
        }
    }
    py::tuple tuple() const { return py::make_tuple(gx, gw, gb); }
};

}  // namespace
