// pybind11 bindings for convkern._cpu. All Python-object handling lives here:
// dtype/contiguity/shape checks, output allocation, GIL release around the
// kernel. The Python layer (convkern/functional.py) has already validated the
// arguments and computed the geometry; these checks are the last line of
// defence against a buffer overrun, not the user-facing error messages.
#include "bindings_util.hpp"

namespace {

// The algorithm named `algo` for s, or a ValueError saying why it cannot run
// s. Backward without grad input, every algorithm can (the weight and bias
// gradients of shifted and winograd are im2col's); depthwise still needs
// groups == input channels.
ConvAlgo conv_algo(const std::string& algo, const ConvGeom& s, bool backward, bool grad_input = true) {
    ConvAlgo a;
    if (!conv_algo_from_name(algo, a)) {
        std::string names;  // from the one list of names (runtime.cpp), so a new algorithm cannot be left out
        for (int i = 0; i < convkern::kConvAlgos; ++i)
            names += std::string(i ? ", '" : "'") + conv_algo_name(static_cast<ConvAlgo>(i)) + "'";
        throw py::value_error("algo must be one of " + names + "; got '" + algo + "'");
    }
    if (backward && !grad_input && a != ConvAlgo::depthwise) return a;
    if (const char* why = active_kernels().conv_algo_problem(a, s, backward)) throw py::value_error(why);
    return a;
}

template <class T>
py::array conv2d_forward_t(const py::array& x, const py::array& w, const py::object& b, const ConvGeom& s,
                           ConvAlgo algo, bool relu) {
    const DType dt = dtype_of(x, "x");
    require(x, "x", dt, s.N * s.C * s.H * s.W);
    require(w, "weight", dt, s.K * (s.C / s.G) * s.R * s.S);
    const T* bp = bias_ptr<T>(b, dt, s.K);
    py::array y = empty<T>({s.N, s.K, s.Ho, s.Wo});
    const T* xp = cptr<T>(x);
    const T* wp = cptr<T>(w);
    T* yp = mptr<T>(y);
    kernel_region([&] {
        convkern::note_conv_algo(ConvAlgo::auto_);
        ops<T>().conv2d_forward[static_cast<int>(algo)](xp, wp, bp, yp, s);
        // The NCHW algorithms store without an epilogue hook: relu runs over
        // the output in place, in this call (no second array, no second call).
        if (relu) ops<T>().relu_forward(yp, yp, s.N * s.K * s.Ho * s.Wo);
    });
    return y;
}

py::array conv2d_forward(const py::array& x, const py::array& w, const py::object& b,
                         const std::array<idx, 16>& geom, const std::string& algo, bool relu) {
    ConvGeom s = conv_geom(geom);
    const ConvAlgo a = conv_algo(algo, s, false);
    if (dtype_of(x, "x") == DType::f32) return conv2d_forward_t<float>(x, w, b, s, a, relu);
    return conv2d_forward_t<double>(x, w, b, s, a, relu);
}

template <class T>
py::tuple conv2d_backward_t(const py::array& gy, const py::array& x, const py::array& w, const ConvGeom& s,
                            ConvAlgo algo, bool need_gx, bool need_gw, bool need_gb) {
    DType dt = dtype_of(gy, "grad_output");
    require(gy, "grad_output", dt, s.N * s.K * s.Ho * s.Wo);
    require(x, "x", dt, s.N * s.C * s.H * s.W);
    require(w, "weight", dt, s.K * (s.C / s.G) * s.R * s.S);
    const ConvGrads<T> out({s.N, s.C, s.H, s.W}, s, need_gx, need_gw, need_gb);
    T *gxp = out.gxp, *gwp = out.gwp, *gbp = out.gbp;
    const T* gyp = cptr<T>(gy);
    const T* xp = cptr<T>(x);
    const T* wp = cptr<T>(w);
    kernel_region([&] {
        convkern::note_conv_algo(algo);  // the kernels that run grad input note themselves
        ops<T>().conv2d_backward[static_cast<int>(algo)](gyp, xp, wp, gxp, gwp, gbp, s);
    });
    return out.tuple();
}

py::tuple conv2d_backward(const py::array& gy, const py::array& x, const py::array& w,
                          const std::array<idx, 16>& geom, const std::string& algo, bool need_gx, bool need_gw,
                          bool need_gb) {
    ConvGeom s = conv_geom(geom);
    const ConvAlgo a = conv_algo(algo, s, true, need_gx);
    if (dtype_of(gy, "grad_output") == DType::f32)
        return conv2d_backward_t<float>(gy, x, w, s, a, need_gx, need_gw, need_gb);
    return conv2d_backward_t<double>(gy, x, w, s, a, need_gx, need_gw, need_gb);
}

// indices=false (max_pool2d without return_indices) skips the int64 index
// plane, which is twice the size of a float32 output: inference pooling then
// moves a third fewer bytes.
template <class T>
py::tuple max_pool2d_forward_t(const py::array& x, const PoolGeom& p, bool with_indices) {
    DType dt = dtype_of(x, "x");
    require(x, "x", dt, p.planes * p.H * p.W);
    py::array y = empty<T>({p.planes, p.Ho, p.Wo});
    py::object ind = py::none();
    std::int64_t* ip = nullptr;
    if (with_indices) {
        py::array_t<std::int64_t> arr(std::vector<py::ssize_t>{p.planes, p.Ho, p.Wo});
        ip = arr.mutable_data();
        ind = arr;
    }
    const T* xp = cptr<T>(x);
    T* yp = mptr<T>(y);
    kernel_region([&] {
        ops<T>().max_pool2d_forward(xp, yp, ip, p);
    });
    return py::make_tuple(y, ind);
}

py::tuple max_pool2d_forward(const py::array& x, const std::array<idx, 15>& geom, bool with_indices) {
    PoolGeom p = pool_geom(geom);
    if (dtype_of(x, "x") == DType::f32) return max_pool2d_forward_t<float>(x, p, with_indices);
    return max_pool2d_forward_t<double>(x, p, with_indices);
}

template <class T>
py::array max_pool2d_backward_t(const py::array& gy, const py::array& ind, const PoolGeom& p) {
    DType dt = dtype_of(gy, "grad_output");
    require(gy, "grad_output", dt, p.planes * p.Ho * p.Wo);
    if (ind.dtype().kind() != 'i' || ind.dtype().itemsize() != 8) throw py::type_error("indices: expected int64");
    if (!(ind.flags() & py::array::c_style)) throw py::value_error("indices: must be C-contiguous");
    if (ind.size() != gy.size()) throw py::value_error("indices: must have grad_output's shape");
    py::array gx = empty<T>({p.planes, p.H, p.W});
    const T* gyp = cptr<T>(gy);
    const auto* ip = static_cast<const std::int64_t*>(ind.data());
    T* gxp = mptr<T>(gx);
    bool ok;
    kernel_region([&] {
        ok = ops<T>().max_pool2d_backward(gyp, ip, gxp, p);
    });
    if (!ok)
        throw py::value_error("indices: an index lies outside its (H*W = " + std::to_string(p.H * p.W) +
                              ") input plane");
    return gx;
}

py::array max_pool2d_backward(const py::array& gy, const py::array& ind, const std::array<idx, 15>& geom) {
    PoolGeom p = pool_geom(geom);
    if (dtype_of(gy, "grad_output") == DType::f32) return max_pool2d_backward_t<float>(gy, ind, p);
    return max_pool2d_backward_t<double>(gy, ind, p);
}

template <class T>
py::array avg_pool2d_forward_t(const py::array& x, const PoolGeom& p) {
    require(x, "x", dtype_of(x, "x"), p.planes * p.H * p.W);
    py::array y = empty<T>({p.planes, p.Ho, p.Wo});
    const T* xp = cptr<T>(x);
    T* yp = mptr<T>(y);
    kernel_region([&] {
        ops<T>().avg_pool2d_forward(xp, yp, p);
    });
    return y;
}

py::array avg_pool2d_forward(const py::array& x, const std::array<idx, 15>& geom) {
    PoolGeom p = pool_geom(geom);
    if (dtype_of(x, "x") == DType::f32) return avg_pool2d_forward_t<float>(x, p);
    return avg_pool2d_forward_t<double>(x, p);
}

template <class T>
py::array avg_pool2d_backward_t(const py::array& gy, const PoolGeom& p) {
    require(gy, "grad_output", dtype_of(gy, "grad_output"), p.planes * p.Ho * p.Wo);
    py::array gx = empty<T>({p.planes, p.H, p.W});
    const T* gyp = cptr<T>(gy);
    T* gxp = mptr<T>(gx);
    kernel_region([&] {
        ops<T>().avg_pool2d_backward(gyp, gxp, p);
    });
    return gx;
}

py::array avg_pool2d_backward(const py::array& gy, const std::array<idx, 15>& geom) {
    PoolGeom p = pool_geom(geom);
    if (dtype_of(gy, "grad_output") == DType::f32) return avg_pool2d_backward_t<float>(gy, p);
    return avg_pool2d_backward_t<double>(gy, p);
}

template <class T>
py::array relu_forward_t(const py::array& x) {
    require(x, "x", dtype_of(x, "x"), x.size());
    py::array y = py::array(x.dtype(), std::vector<py::ssize_t>(x.shape(), x.shape() + x.ndim()));
    const T* xp = cptr<T>(x);
    T* yp = mptr<T>(y);
    idx n = x.size();
    kernel_region([&] {
        ops<T>().relu_forward(xp, yp, n);
    });
    return y;
}

// relu written over x itself (the kernel reads each element before writing
// it): torch's relu_ and inplace=True without a second array and a copy back
void relu_forward_inplace(py::array& x) {
    const DType dt = dtype_of(x, "x");
    require(x, "x", dt, x.size());
    if (!x.writeable()) throw py::value_error("x: read-only");
    const idx n = x.size();
    if (dt == DType::f32) {
        float* p = mptr<float>(x);
        kernel_region([&] { ops<float>().relu_forward(p, p, n); });
    } else {
        double* p = mptr<double>(x);
        kernel_region([&] { ops<double>().relu_forward(p, p, n); });
    }
}

py::array relu_forward(const py::array& x) {
    if (dtype_of(x, "x") == DType::f32) return relu_forward_t<float>(x);
    return relu_forward_t<double>(x);
}

template <class T>
py::array relu_backward_t(const py::array& gy, const py::array& x) {
    DType dt = dtype_of(x, "x");
    require(x, "x", dt, x.size());
    require(gy, "grad_output", dt, x.size());
    py::array gx = py::array(x.dtype(), std::vector<py::ssize_t>(x.shape(), x.shape() + x.ndim()));
    const T* gyp = cptr<T>(gy);
    const T* xp = cptr<T>(x);
    T* gxp = mptr<T>(gx);
    idx n = x.size();
    kernel_region([&] {
        ops<T>().relu_backward(gyp, xp, gxp, n);
    });
    return gx;
}

py::array relu_backward(const py::array& gy, const py::array& x) {
    if (dtype_of(x, "x") == DType::f32) return relu_backward_t<float>(gy, x);
    return relu_backward_t<double>(gy, x);
}

// relu's gradient written over grad_output itself (each element is read
// before it is written): no fresh array, whose first touch costs as much
// as the pass
void relu_backward_inplace(py::array& gy, const py::array& x) {
    const DType dt = dtype_of(x, "x");
    require(x, "x", dt, x.size());
    require(gy, "grad_output", dt, x.size());
    if (!gy.writeable()) throw py::value_error("grad_output: read-only");
    const idx n = x.size();
    if (dt == DType::f32) {
        float* g = mptr<float>(gy);
        const float* xp = cptr<float>(x);
        kernel_region([&] { ops<float>().relu_backward(g, xp, g, n); });
    } else {
        double* g = mptr<double>(gy);
        const double* xp = cptr<double>(x);
        kernel_region([&] { ops<double>().relu_backward(g, xp, g, n); });
    }
}

// One SGD step in place (sgd_update): param, grad and momentum_buffer (None
// without momentum) C-contiguous, of one dtype and size.
void sgd_update(py::array& param, const py::array& grad, py::object buf, double lr, double momentum,
                double dampening, double weight_decay, bool nesterov, bool first) {
    const DType dt = dtype_of(param, "param");
    const idx n = param.size();
    require(param, "param", dt, n);
    require(grad, "grad", dt, n);
    if (!param.writeable()) throw py::value_error("param: read-only");
    py::array b;
    if (momentum != 0.0) {
        if (buf.is_none()) throw py::value_error("sgd_update: momentum needs a momentum_buffer");
        b = buf.cast<py::array>();
        require(b, "momentum_buffer", dt, n);
        if (!b.writeable()) throw py::value_error("momentum_buffer: read-only");
    }
    const convkern::SgdStep h{lr, momentum, dampening, weight_decay, nesterov, first};
    if (dt == DType::f32) {
        float* bp = momentum != 0.0 ? mptr<float>(b) : nullptr;
        float* pp = mptr<float>(param);
        const float* gp = cptr<float>(grad);
        kernel_region([&] { ops<float>().sgd_update(pp, gp, bp, n, h); });
    } else {
        double* bp = momentum != 0.0 ? mptr<double>(b) : nullptr;
        double* pp = mptr<double>(param);
        const double* gp = cptr<double>(grad);
        kernel_region([&] { ops<double>().sgd_update(pp, gp, bp, n, h); });
    }
}

template <class T>
py::array gemm_t(const py::array& a, const py::array& b) {
    if (a.ndim() != 2 || b.ndim() != 2 || a.shape(1) != b.shape(0))
        throw py::value_error("gemm: need A (M, K) and B (K, N)");
    DType dt = dtype_of(a, "A");
    idx M = a.shape(0), K = a.shape(1), N = b.shape(1);
    require(a, "A", dt, M * K);
    require(b, "B", dt, K * N);
    py::array c = empty<T>({M, N});
    const T* ap = cptr<T>(a);
    const T* bp = cptr<T>(b);
    T* cp = mptr<T>(c);
    kernel_region([&] {
        ops<T>().gemm(M, N, K, ap, K, 1, bp, N, 1, cp, N, false);
    });
    return c;
}

template <class T>
py::array linear_forward_t(const py::array& x, const py::array& w, const py::object& b) {
    DType dt = dtype_of(x, "input");
    const idx M = x.shape(0), K = x.shape(1), N = w.shape(0);
    require(x, "input", dt, M * K);
    require(w, "weight", dt, N * K);
    const T* bp = nullptr;
    if (!b.is_none()) {
        const py::array ba = py::cast<py::array>(b);
        if (ba.ndim() != 1 || ba.shape(0) != N)
            throw py::value_error("linear: bias must be (" + std::to_string(N) + ",)");
        require(ba, "bias", dt, N);
        bp = cptr<T>(ba);
    }
    py::array y = empty<T>({M, N});
    const T* xp = cptr<T>(x);
    const T* wp = cptr<T>(w);
    T* yp = mptr<T>(y);
    kernel_region([&] { ops<T>().linear_forward(xp, wp, bp, yp, M, N, K); });
    return y;
}

py::array linear_forward(const py::array& x, const py::array& w, const py::object& b) {
    if (x.ndim() != 2 || w.ndim() != 2 || x.shape(1) != w.shape(1))
        throw py::value_error("linear: need input (M, K) and weight (N, K) with the same K");
    if (dtype_of(x, "input") == DType::f32) return linear_forward_t<float>(x, w, b);
    return linear_forward_t<double>(x, w, b);
}

py::array gemm(const py::array& a, const py::array& b) {
    if (dtype_of(a, "A") == DType::f32) return gemm_t<float>(a, b);
    return gemm_t<double>(a, b);
}

convkern::SimdLevel parse_simd(const std::string& s) {
    if (s == "scalar") return convkern::SimdLevel::scalar;
    if (s == "avx2") return convkern::SimdLevel::avx2;
    if (s == "avx512") return convkern::SimdLevel::avx512;
    throw py::value_error("SIMD level must be 'scalar', 'avx2' or 'avx512', got '" + s + "'");
}

template <class T>
py::dict gemm_blocking_dict(const convkern::OpTable<T>& t, const convkern::CacheSizes* caches, idx kc) {
    static const char* const sources[] = {"caches", "CONVKERN_GEMM_BLOCKING", "convkern tune"};
    idx b[7];
    t.gemm_blocking(caches, kc, b);
    return py::dict(py::arg("MR") = b[0], py::arg("NR") = b[1], py::arg("KC") = b[2], py::arg("MC") = b[3],
                    py::arg("NC") = b[4], py::arg("rows_KC") = b[5], py::arg("source") = sources[b[6]]);
}

py::dict build_info() {
    py::dict d;
    d["simd_best"] = convkern::simd_level_name(convkern::cpu_best_simd_level());
    d["simd_active"] = convkern::simd_level_name(convkern::active_simd_level());
    d["simd_compiled"] = py::make_tuple("scalar", "avx2", "avx512");
    d["openmp"] = _OPENMP;
    d["callgrind_dumps"] = static_cast<bool>(CONVKERN_CALLGRIND);
#if defined(__SANITIZE_ADDRESS__)
    d["sanitized"] = true;  // ASan + UBSan (CONVKERN_SANITIZE=ON)
#else
    d["sanitized"] = false;
#endif
    d["num_threads"] = convkern::num_threads();
    const convkern::CacheSizes& c = convkern::cache_sizes();
    d["caches"] = py::dict(py::arg("l1d") = c.l1d, py::arg("l2") = c.l2, py::arg("l3") = c.l3,
                           py::arg("known") = py::make_tuple(c.known[0], c.known[1], c.known[2]),
                           py::arg("ways") = py::make_tuple(c.ways[0], c.ways[1], c.ways[2]),
                           py::arg("source") = c.from_env ? "CONVKERN_CACHES" : "machine");
    // what the active SIMD level's float32 GEMMs use (blocking is per ISA and type)
    d["gemm_blocking_f32"] = gemm_blocking_dict(convkern::active_kernels().f32, nullptr, 0);
#if defined(__VERSION__)
    d["compiler"] = __VERSION__;
#endif
    return d;
}

}  // namespace

PYBIND11_MODULE(_cpu, m) {
    m.doc() = "convkern C++ CPU kernels (float32/float64, NCHW, C-contiguous)";
    py::register_exception_translator([](std::exception_ptr p) {
        try {
            if (p) std::rethrow_exception(p);
        } catch (const std::invalid_argument& e) {
            PyErr_SetString(PyExc_ValueError, e.what());
        }
    });
    m.def("build_info", &build_info);
    // a malformed CONVKERN_GEMM_BLOCKING or CONVKERN_CACHES fails the import, naming the variable
    convkern::check_gemm_blocking_env();
    convkern::check_cache_override();
    m.def("set_tuned_gemm_blocking", &convkern::set_tuned_gemm_blocking, py::arg("kc"), py::arg("mc"), py::arg("nc"),
          "use this float32 GEMM blocking (measured by convkern tune); False once a kernel has taken its blocking");
    m.def(
        "gemm_blocking_for",
        [](idx l1d, idx l2, idx l3, idx l1_ways, idx l2_ways, const std::string& dtype, idx kc) {
            if (l1d <= 0 || l2 <= 0 || l3 <= 0 || l1_ways <= 0 || l2_ways <= 0)
                throw py::value_error("cache sizes and ways must be positive");
            if (kc < 0 || kc > (1 << 16)) throw py::value_error("kc must be 0 (derive it) or 1..65536");
            const convkern::CacheSizes c{l1d, l2, l3, {true, true, true}, {l1_ways, l2_ways, 16}, false};
            if (dtype == "float32") return gemm_blocking_dict(convkern::active_kernels().f32, &c, kc);
            if (dtype == "float64") return gemm_blocking_dict(convkern::active_kernels().f64, &c, kc);
            throw py::value_error("dtype must be 'float32' or 'float64', got '" + dtype + "'");
        },
        py::arg("l1d"), py::arg("l2"), py::arg("l3"), py::arg("l1_ways"), py::arg("l2_ways"),
        py::arg("dtype") = "float32", py::arg("kc") = 0,
        "the packed GEMM's KC, MC, NC the active SIMD level derives for these cache sizes (bytes); "
        "kc > 0: MC and NC for that KC");
    m.def("geometry_fields", [] { return py::make_tuple(CK_CONV_GEOM_FIELDS, CK_POOL_GEOM_FIELDS); },
          "the field order of the conv and pool geometry structs, as convkern.geometry checks it");
    m.def("simd_level", [] { return std::string(convkern::simd_level_name(convkern::active_simd_level())); });
    m.def("set_simd_level", [](const std::string& s) { convkern::set_simd_level(parse_simd(s)); });
    m.def("num_threads", &convkern::num_threads);
    m.def("set_num_threads", &convkern::set_num_threads);
    m.def("set_flush_denormal", &convkern::set_flush_denormal, py::arg("on"));
    m.def("flush_denormal", &convkern::flush_denormal);
    m.def("keep_freed_memory", &convkern::keep_freed_memory);
    m.def("conv2d_forward", &conv2d_forward, py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("geom"),
          py::arg("algo"), py::arg("relu") = false);
    m.def("conv2d_backward", &conv2d_backward, py::arg("grad_output"), py::arg("x"), py::arg("weight"),
          py::arg("geom"), py::arg("algo"), py::arg("need_input"), py::arg("need_weight"), py::arg("need_bias"));
    m.def(
        "conv_algo_problem",
        [](const std::array<idx, 16>& geom, const std::string& algo, bool backward) -> py::object {
            ConvAlgo a;
            if (!conv_algo_from_name(algo, a)) return py::str("unknown algorithm '" + algo + "'");
            const char* why = active_kernels().conv_algo_problem(a, conv_geom(geom), backward);
            return why ? py::object(py::str(why)) : py::object(py::none());
        },
        py::arg("geom"), py::arg("algo"), py::arg("backward"),
        "Why algorithm `algo` cannot run this conv (backward: its grad input), or None.");
    m.def(
        "last_conv_algo", [] { return std::string(convkern::conv_algo_name(convkern::last_conv_algo())); },
        "The algorithm this thread's last conv2d call ran (backward: for grad input).");
    m.def(
        "conv_auto_algo",
        [](const std::array<idx, 16>& geom, bool backward, const std::string& dtype) {
            return std::string(active_kernels().conv_auto_algo(conv_geom(geom), backward, dtype == "float64"));
        },
        py::arg("geom"), py::arg("backward"), py::arg("dtype"),
        "The algorithm algo='auto' runs for this conv (backward: for its grad input).");
    m.def("max_pool2d_forward", &max_pool2d_forward, py::arg("x"), py::arg("geom"), py::arg("indices") = true);
    m.def("max_pool2d_backward", &max_pool2d_backward, py::arg("grad_output"), py::arg("indices"), py::arg("geom"));
    m.def("avg_pool2d_forward", &avg_pool2d_forward, py::arg("x"), py::arg("geom"));
    m.def("avg_pool2d_backward", &avg_pool2d_backward, py::arg("grad_output"), py::arg("geom"));
    m.def("relu_forward", &relu_forward, py::arg("x"));
    m.def("relu_forward_inplace", &relu_forward_inplace, py::arg("x"));
    m.def("relu_backward", &relu_backward, py::arg("grad_output"), py::arg("x"));
    m.def("relu_backward_inplace", &relu_backward_inplace, py::arg("grad_output"), py::arg("x"));
    m.def("sgd_update", &sgd_update, py::arg("param"), py::arg("grad"), py::arg("momentum_buffer"), py::arg("lr"),
          py::arg("momentum"), py::arg("dampening"), py::arg("weight_decay"), py::arg("nesterov"), py::arg("first"));
    m.def("gemm", &gemm, py::arg("a"), py::arg("b"), "C = A @ B with the packed GEMM (2-D, C-contiguous)");
    m.def("linear_forward", &linear_forward, py::arg("x"), py::arg("weight"), py::arg("bias"),
          "y = x @ weight.T (+ bias): x (M, K), weight (N, K), bias (N,) or None; C-contiguous");
    bind_nhwc(m);
}
