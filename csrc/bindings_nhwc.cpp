// pybind11 bindings of the channels_last (NHWC) kernels: arrays arrive as
// C-contiguous (N, H, W, C) buffers (the NHWC view of a channels_last array)
// and outputs leave as (N, Ho, Wo, K) ones; weights stay (K, C/G, R, S).
#include "bindings_util.hpp"

namespace {

// A weight's transformed filters for the NHWC Winograd F(m x m, 3x3), made
// once and handed to many calls: their packing follows the SIMD level that
// made them (its GEMM panel width), which each call checks.
struct WinogradFilters {
    py::array data;
    int m;
    idx K, C;
    convkern::SimdLevel level;
    DType dt;
};

template <class T>
WinogradFilters winograd_nhwc_filters_t(const py::array& w, idx K, idx C, int m, bool krsc) {
    const convkern::OpTable<T>& t = ops<T>();
    py::array u = empty<T>({t.winograd_nhwc_filter_elems(K, C, m)});
    const T* wp = cptr<T>(w);
    T* up = mptr<T>(u);
    {
        py::gil_scoped_release nogil;
        t.winograd_nhwc_filters(wp, K, C, m, krsc, up);
    }
    return WinogradFilters{u, m, K, C, convkern::active_simd_level(), dtype_of(w, "weight")};
}

WinogradFilters winograd_nhwc_filters(const py::array& w, const std::array<idx, 16>& geom, int m, bool weight_krsc) {
    const ConvGeom s = conv_geom(geom);
    if (m != 2 && m != 4) throw py::value_error("winograd_nhwc_filters: m must be 2 or 4, got " + std::to_string(m));
    if (!convkern::conv_winograd_applies(s))
        throw py::value_error("winograd_nhwc_filters: the geometry is not a 3x3 stride-1 ungrouped conv");
    const DType dt = dtype_of(w, "weight");
    require(w, "weight", dt, s.K * s.C * 9);
    if (dt == DType::f32) return winograd_nhwc_filters_t<float>(w, s.K, s.C, m, weight_krsc);
    return winograd_nhwc_filters_t<double>(w, s.K, s.C, m, weight_krsc);
}

template <class T>
py::array conv2d_forward_nhwc_t(const py::array& x, const py::array& w, const py::object& b, const ConvGeom& s,
                                bool relu, int wino, bool krsc, const WinogradFilters* u) {
    const DType dt = dtype_of(x, "x");
    require(x, "x", dt, s.N * s.H * s.W * s.C);
    require(w, "weight", dt, s.K * (s.C / s.G) * s.R * s.S);
    const T* bp = bias_ptr<T>(b, dt, s.K);
    const T* up = nullptr;
    if (u) {
        if (u->m != wino || u->K != s.K || u->C != s.C || u->dt != dt || !convkern::conv_winograd_applies(s))
            throw py::value_error("conv2d_forward_nhwc: filters were made for F(" + std::to_string(u->m) +
                                  "x" + std::to_string(u->m) + ") of " + std::to_string(u->K) + " x " +
                                  std::to_string(u->C) + " weights, this call runs winograd=" +
                                  std::to_string(wino) + " with K=" + std::to_string(s.K) +
                                  ", C=" + std::to_string(s.C) + " (or another dtype)");
        if (u->level != convkern::active_simd_level())
            throw py::value_error(std::string("conv2d_forward_nhwc: filters were made at SIMD level ") +
                                  convkern::simd_level_name(u->level) + ", the active level is " +
                                  convkern::simd_level_name(convkern::active_simd_level()));
        up = cptr<T>(u->data);
    }
    py::array y = empty<T>({s.N, s.Ho, s.Wo, s.K});
    const T* xp = cptr<T>(x);
    const T* wp = cptr<T>(w);
    T* yp = mptr<T>(y);
    kernel_region([&] { ops<T>().conv2d_forward_nhwc(xp, wp, bp, yp, s, relu, wino, krsc, up); });
    return y;
}

py::array conv2d_forward_nhwc(const py::array& x, const py::array& w, const py::object& b,
                              const std::array<idx, 16>& geom, bool relu, int winograd, bool weight_krsc,
                              const WinogradFilters* filters, bool pixel_rows) {
    const ConvGeom s = conv_geom(geom);
    if (winograd != -1 && winograd != 0 && winograd != 2 && winograd != 4)
        throw py::value_error("conv2d_forward_nhwc: winograd must be -1 (the rule), 0, 2 or 4, got " +
                              std::to_string(winograd));
    if (pixel_rows) {
        if (winograd != 0)
            throw py::value_error("conv2d_forward_nhwc: pixel_rows=True asks for a GEMM, so winograd must be 0, got " +
                                  std::to_string(winograd));
        winograd = convkern::kNhwcPixelRows;  // (the kernels' code for that GEMM form)
    }
    if (dtype_of(x, "x") == DType::f32)
        return conv2d_forward_nhwc_t<float>(x, w, b, s, relu, winograd, weight_krsc, filters);
    return conv2d_forward_nhwc_t<double>(x, w, b, s, relu, winograd, weight_krsc, filters);
}

// krsc: the weights are (K, R, S, C/G) memory, and so is the weight
// gradient returned (shaped so)
template <class T>
py::tuple conv2d_backward_nhwc_t(const py::array& gy, const py::array& x, const py::array& w, const ConvGeom& s,
                                 bool need_gx, bool need_gw, bool need_gb, bool krsc) {
    const DType dt = dtype_of(gy, "grad_output");
    require(gy, "grad_output", dt, s.N * s.Ho * s.Wo * s.K);
    require(x, "x", dt, s.N * s.H * s.W * s.C);
    require(w, "weight", dt, s.K * (s.C / s.G) * s.R * s.S);
    const ConvGrads<T> out({s.N, s.H, s.W, s.C}, s, need_gx, need_gw, need_gb);
    T *gxp = out.gxp, *gwp = out.gwp, *gbp = out.gbp;
    const T* gyp = cptr<T>(gy);
    const T* xp = cptr<T>(x);
    const T* wp = cptr<T>(w);
    kernel_region([&] { ops<T>().conv2d_backward_nhwc(gyp, xp, wp, gxp, gwp, gbp, s, krsc); });
    if (krsc && need_gw)
        return py::make_tuple(out.gx, py::reinterpret_borrow<py::array>(out.gw).reshape({s.K, s.R, s.S, s.C / s.G}),
                              out.gb);
    return out.tuple();
}

py::tuple conv2d_backward_nhwc(const py::array& gy, const py::array& x, const py::array& w,
                               const std::array<idx, 16>& geom, bool need_gx, bool need_gw, bool need_gb,
                               bool weight_krsc) {
    const ConvGeom s = conv_geom(geom);
    if (dtype_of(gy, "grad_output") == DType::f32)
        return conv2d_backward_nhwc_t<float>(gy, x, w, s, need_gx, need_gw, need_gb, weight_krsc);
    return conv2d_backward_nhwc_t<double>(gy, x, w, s, need_gx, need_gw, need_gb, weight_krsc);
}

// The pool geometry's first entry is N*C planes; these kernels want N and C.
PoolGeom nhwc_pool_geom(const std::array<idx, 15>& geom, idx channels) {
    PoolGeom p = pool_geom(geom);
    if (channels <= 0 || p.planes % channels) throw py::value_error("pool geometry: planes not a multiple of C");
    p.planes /= channels;
    return p;
}

template <class T>
py::tuple max_pool2d_forward_nhwc_t(const py::array& x, const PoolGeom& p, idx C, bool with_indices) {
    require(x, "x", dtype_of(x, "x"), p.planes * p.H * p.W * C);
    py::array y = empty<T>({p.planes, p.Ho, p.Wo, C});
    py::object ind = py::none();
    std::int64_t* ip = nullptr;
    if (with_indices) {
        py::array_t<std::int64_t> arr(std::vector<py::ssize_t>{p.planes, p.Ho, p.Wo, C});
        ip = arr.mutable_data();
        ind = arr;
    }
    const T* xp = cptr<T>(x);
    T* yp = mptr<T>(y);
    kernel_region([&] { ops<T>().max_pool2d_forward_nhwc(xp, yp, ip, p, C); });
    return py::make_tuple(y, ind);
}

py::tuple max_pool2d_forward_nhwc(const py::array& x, const std::array<idx, 15>& geom, idx channels,
                                  bool with_indices) {
    const PoolGeom p = nhwc_pool_geom(geom, channels);
    if (dtype_of(x, "x") == DType::f32) return max_pool2d_forward_nhwc_t<float>(x, p, channels, with_indices);
    return max_pool2d_forward_nhwc_t<double>(x, p, channels, with_indices);
}

template <class T>
py::array max_pool2d_backward_nhwc_t(const py::array& gy, const py::array& ind, const PoolGeom& p, idx C) {
    require(gy, "grad_output", dtype_of(gy, "grad_output"), p.planes * p.Ho * p.Wo * C);
    if (ind.dtype().kind() != 'i' || ind.dtype().itemsize() != 8) throw py::type_error("indices: expected int64");
    if (!(ind.flags() & py::array::c_style)) throw py::value_error("indices: must be C-contiguous");
    if (ind.size() != gy.size()) throw py::value_error("indices: must have grad_output's shape");
    py::array gx = empty<T>({p.planes, p.H, p.W, C});
    const T* gyp = cptr<T>(gy);
    const auto* ip = static_cast<const std::int64_t*>(ind.data());
    T* gxp = mptr<T>(gx);
    bool ok = true;
    kernel_region([&] { ok = ops<T>().max_pool2d_backward_nhwc(gyp, ip, gxp, p, C); });
    if (!ok)
        throw py::value_error("indices: an index lies outside its (H*W = " + std::to_string(p.H * p.W) +
                              ") input plane");
    return gx;
}

py::array max_pool2d_backward_nhwc(const py::array& gy, const py::array& ind, const std::array<idx, 15>& geom,
                                   idx channels) {
    const PoolGeom p = nhwc_pool_geom(geom, channels);
    if (dtype_of(gy, "grad_output") == DType::f32) return max_pool2d_backward_nhwc_t<float>(gy, ind, p, channels);
    return max_pool2d_backward_nhwc_t<double>(gy, ind, p, channels);
}

template <class T>
py::array avg_pool2d_forward_nhwc_t(const py::array& x, const PoolGeom& p, idx C) {
    require(x, "x", dtype_of(x, "x"), p.planes * p.H * p.W * C);
    py::array y = empty<T>({p.planes, p.Ho, p.Wo, C});
    const T* xp = cptr<T>(x);
    T* yp = mptr<T>(y);
    kernel_region([&] { ops<T>().avg_pool2d_forward_nhwc(xp, yp, p, C); });
    return y;
}

py::array avg_pool2d_forward_nhwc(const py::array& x, const std::array<idx, 15>& geom, idx channels) {
    const PoolGeom p = nhwc_pool_geom(geom, channels);
    if (dtype_of(x, "x") == DType::f32) return avg_pool2d_forward_nhwc_t<float>(x, p, channels);
    return avg_pool2d_forward_nhwc_t<double>(x, p, channels);
}

template <class T>
py::array avg_pool2d_backward_nhwc_t(const py::array& gy, const PoolGeom& p, idx C) {
    require(gy, "grad_output", dtype_of(gy, "grad_output"), p.planes * p.Ho * p.Wo * C);
    py::array gx = empty<T>({p.planes, p.H, p.W, C});
    const T* gyp = cptr<T>(gy);
    T* gxp = mptr<T>(gx);
    kernel_region([&] { ops<T>().avg_pool2d_backward_nhwc(gyp, gxp, p, C); });
    return gx;
}

py::array avg_pool2d_backward_nhwc(const py::array& gy, const std::array<idx, 15>& geom, idx channels) {
    const PoolGeom p = nhwc_pool_geom(geom, channels);
    if (dtype_of(gy, "grad_output") == DType::f32) return avg_pool2d_backward_nhwc_t<float>(gy, p, channels);
    return avg_pool2d_backward_nhwc_t<double>(gy, p, channels);
}

template <class T>
py::array transpose_batched_t(const py::array& a) {
    if (a.ndim() != 3) throw py::value_error("transpose_batched: need a (batches, rows, cols) array");
    const idx nb = a.shape(0), rows = a.shape(1), cols = a.shape(2);
    require(a, "a", dtype_of(a, "a"), nb * rows * cols);
    py::array out = empty<T>({nb, cols, rows});
    const T* src = cptr<T>(a);
    T* dst = mptr<T>(out);
    kernel_region([&] { ops<T>().transpose_batched(src, dst, nb, rows, cols); });
    return out;
}

py::array transpose_batched(const py::array& a) {
    if (dtype_of(a, "a") == DType::f32) return transpose_batched_t<float>(a);
    return transpose_batched_t<double>(a);
}

}  // namespace

void bind_nhwc(py::module_& m) {
    m.def("transpose_batched", &transpose_batched, py::arg("a"),
          "(B, R, C) -> (B, C, R), C-contiguous: NCHW <-> NHWC in cache-sized tiles");
    py::class_<WinogradFilters>(m, "WinogradFilters",
                                "A weight's transformed filters for the NHWC Winograd F(m x m, 3x3) "
                                "(winograd_nhwc_filters), valid at the SIMD level that made them")
        .def_readonly("m", &WinogradFilters::m)
        .def_readonly("K", &WinogradFilters::K)
        .def_readonly("C", &WinogradFilters::C)
        .def_property_readonly("nbytes", [](const WinogradFilters& u) { return u.data.nbytes(); })
        .def_property_readonly("simd_level",
                               [](const WinogradFilters& u) { return std::string(convkern::simd_level_name(u.level)); });
    m.def("nhwc_winograd_rule", [](const std::array<idx, 16>& geom) {
        return ops<float>().nhwc_winograd_rule(conv_geom(geom));
    }, py::arg("geom"), "The Winograd tile conv2d_forward_nhwc(winograd=-1) runs (2 or 4), or 0 for none");
    m.def("winograd_nhwc_filters", &winograd_nhwc_filters, py::arg("weight"), py::arg("geom"), py::arg("m"),
          py::arg("weight_krsc") = false,
          "The transformed filters conv2d_forward_nhwc(..., winograd=m, filters=) reads instead of transforming "
          "the weights in each call");
    m.def("conv2d_forward_nhwc", &conv2d_forward_nhwc, py::arg("x"), py::arg("weight"), py::arg("bias"),
          py::arg("geom"), py::arg("relu") = false, py::arg("winograd") = -1,
          py::arg("weight_krsc") = false, py::arg("filters") = nullptr, py::arg("pixel_rows") = false);
    m.def("conv2d_backward_nhwc", &conv2d_backward_nhwc, py::arg("grad_output"), py::arg("x"), py::arg("weight"),
          py::arg("geom"), py::arg("need_gx") = true, py::arg("need_gw") = true, py::arg("need_gb") = true,
          py::arg("weight_krsc") = false);
    m.def("max_pool2d_forward_nhwc", &max_pool2d_forward_nhwc, py::arg("x"), py::arg("geom"), py::arg("channels"),
          py::arg("indices") = true);
    m.def("max_pool2d_backward_nhwc", &max_pool2d_backward_nhwc, py::arg("grad_output"), py::arg("indices"),
          py::arg("geom"), py::arg("channels"));
    m.def("avg_pool2d_forward_nhwc", &avg_pool2d_forward_nhwc, py::arg("x"), py::arg("geom"), py::arg("channels"));
    m.def("avg_pool2d_backward_nhwc", &avg_pool2d_backward_nhwc, py::arg("grad_output"), py::arg("geom"),
          py::arg("channels"));
}
