"""conv2d algorithms by name: each runs exactly what it names, on every
problem it can run, against the float64 reference (forward and every
gradient); a problem it cannot run is refused saying why; "auto" runs the
algorithm the backend's rule reports."""

import numpy as np
import pytest

import convkern
from convkern.backend import cpp
from convkern.geometry import conv2d_geometry
from convkern.perf.canonical import CANONICAL
from helpers import SIMD_LEVELS, assert_close, at_simd_level, at_thread_counts, randn, run_python

# (x shape, w shape, kwargs) that each cpp algorithm runs, awkward ones included
RUNS = {
    "direct": [((1, 3, 7, 5), (4, 3, 2, 3), dict(stride=(2, 1), padding=(1, 0), dilation=(1, 2))),
               ((2, 4, 6, 6), (6, 2, 3, 3), dict(groups=2, padding="same")),
               ((2, 6, 9, 9), (6, 1, 3, 3), dict(groups=6, padding=1))],
    "depthwise": [((2, 6, 9, 8), (6, 1, 3, 3), dict(groups=6, padding=1)),
                  ((1, 4, 7, 11), (8, 1, 5, 3), dict(groups=4, padding=(2, 0), dilation=(1, 2))),
                  ((1, 3, 5, 5), (3, 1, 7, 7), dict(groups=3, padding=3)),
                  ((2, 6, 9, 8), (6, 1, 3, 3), dict(groups=6, stride=2, padding=1)),
                  ((1, 4, 11, 13), (8, 1, 3, 3), dict(groups=4, stride=(1, 2))),
                  ((1, 3, 14, 17), (3, 1, 5, 3), dict(groups=3, stride=3, padding=(2, 1), dilation=(1, 2)))],
    "im2col": [((2, 5, 8, 7), (6, 5, 3, 3), dict(padding=1)),
               ((1, 4, 9, 9), (6, 2, 3, 2), dict(stride=2, groups=2, dilation=(2, 1))),
               ((3, 8, 5, 5), (4, 8, 1, 1), {})],
    "shifted": [((2, 5, 8, 7), (6, 5, 3, 3), dict(padding=1)),
                ((1, 4, 11, 9), (6, 2, 3, 3), dict(groups=2, padding=(1, 2), dilation=2)),
                ((2, 3, 13, 12), (5, 3, 5, 5), dict(padding="same"))],
    "winograd": [((2, 5, 8, 7), (6, 5, 3, 3), dict(padding=1)),
                 ((1, 3, 9, 10), (4, 3, 3, 3), {}),
                 ((1, 2, 5, 3), (3, 2, 3, 3), dict(padding=2))],
    # F(4x4): partial tiles at both edges, runs of tiles longer and shorter
    # than a vector, blocks that cut tile rows, more channels than a KC block
    "winograd4": [((2, 5, 8, 7), (6, 5, 3, 3), dict(padding=1)),
                  ((1, 3, 9, 10), (4, 3, 3, 3), {}),
                  ((1, 2, 5, 3), (3, 2, 3, 3), dict(padding=2)),
                  ((2, 4, 23, 150), (5, 4, 3, 3), dict(padding=(2, 1))),
                  ((1, 300, 6, 9), (7, 300, 3, 3), dict(padding=1))],
}
# forward-only problems (the backward needs stride 1 and padding within the kernel's reach)
FORWARD_ONLY = {"shifted": [((1, 4, 15, 13), (3, 4, 5, 5), dict(stride=2, padding=2))]}
STRIDED_DEPTHWISE = RUNS["depthwise"][3:]
REFUSED = [
    ("winograd", (1, 2, 8, 8), (3, 2, 5, 5), {}, False, "winograd needs a 3x3 kernel"),
    ("winograd", (1, 2, 8, 8), (3, 2, 3, 3), dict(stride=2), False, "stride 1"),
    ("winograd", (1, 4, 8, 8), (4, 2, 3, 3), dict(groups=2), False, "groups 1"),
    ("depthwise", (1, 2, 8, 8), (3, 2, 3, 3), {}, False, "depthwise needs groups == input channels"),
    ("shifted", (1, 2, 8, 8), (3, 2, 1, 1), {}, False, "nothing to shift"),
    ("shifted", (1, 2, 9, 9), (3, 2, 3, 3), dict(stride=2), True, "needs stride 1"),
    ("winograd", (1, 2, 8, 8), (3, 2, 3, 3), dict(padding=3), True, "padding of at most 2"),
    ("winograd4", (1, 2, 8, 8), (3, 2, 5, 5), {}, False, "winograd4 needs a 3x3 kernel"),
    ("winograd4", (1, 2, 8, 8), (3, 2, 3, 3), dict(dilation=2), False, "no dilation"),
    ("winograd4", (1, 2, 8, 8), (3, 2, 3, 3), dict(padding=3), True, "padding of at most 2"),
]


def _check(algo, x_shape, w_shape, kw, dtype, rng, backward=True):
    x, w, b = randn(rng, x_shape, dtype), randn(rng, w_shape, dtype), randn(rng, (w_shape[0],), dtype)
    what = f"{algo} x{x_shape} w{w_shape} {kw}"
    want = convkern.conv2d(x, w, b, **kw, backend="reference")
    assert_close(convkern.conv2d(x, w, b, **kw, algo=algo, backend="cpp"), want, dtype, what)
    assert cpp.last_algo() == algo, f"{what}: ran {cpp.last_algo()}"
    if not backward:
        return
    gy = randn(rng, want.shape, dtype)
    got = convkern.conv2d_backward(gy, x, w, **kw, algo=algo, backend="cpp")
    # depthwise's grad input is a depthwise conv only with one filter per channel
    grad_input_algo = "direct" if algo == "depthwise" and w_shape[0] != x_shape[1] else algo
    assert cpp.last_algo() == grad_input_algo, f"{what} backward: grad input ran {cpp.last_algo()}"
    ref = convkern.conv2d_backward(gy, x, w, **kw, backend="reference")
    for name, g, r in zip(("grad input", "grad weight", "grad bias"), got, ref):
        assert_close(g, r, dtype, f"{what} {name}")


@pytest.mark.parametrize("algo", list(RUNS))
def test_each_algorithm_against_the_reference(algo, dtype, rng):
    for x_shape, w_shape, kw in RUNS[algo]:
        _check(algo, x_shape, w_shape, kw, dtype, rng)
    for x_shape, w_shape, kw in FORWARD_ONLY.get(algo, []):
        _check(algo, x_shape, w_shape, kw, dtype, rng, backward=False)


@pytest.mark.parametrize("algo,x_shape,w_shape,kw,backward,why", REFUSED)
def test_an_algorithm_refuses_what_it_cannot_run(algo, x_shape, w_shape, kw, backward, why):
    x, w = np.ones(x_shape, np.float32), np.ones(w_shape, np.float32)
    y = convkern.conv2d(x, w, **kw, backend="reference")
    with pytest.raises(ValueError, match=why):
        if backward:
            convkern.conv2d_backward(np.ones_like(y), x, w, **kw, algo=algo, backend="cpp")
        else:
            convkern.conv2d(x, w, **kw, algo=algo, backend="cpp")


def test_weight_gradients_alone_need_no_grad_input_path(rng):
    """shifted and winograd take their input gradient as a stride-1 conv; the
    weight and bias gradients are im2col's, so they run wherever asked alone."""
    x, w = randn(rng, (1, 2, 9, 9), np.float64), randn(rng, (3, 2, 3, 3), np.float64)
    gy = randn(rng, convkern.conv2d(x, w, stride=2, backend="reference").shape, np.float64)
    ref = convkern.conv2d_backward(gy, x, w, stride=2, backend="reference")
    for algo in ("shifted", "winograd", "winograd4"):
        _, gw, gb = convkern.conv2d_backward(gy, x, w, stride=2, needs=(False, True, True), algo=algo, backend="cpp")
        assert_close(gw, ref[1], np.float64, algo) and assert_close(gb, ref[2], np.float64, algo)


# problems of every kind the algorithms refuse some of: strided, depthwise,
# strided depthwise, grouped, 1x1, a 5x5 kernel, dilation, wide padding
ADMISSION = [((1, 4, 9, 9), (4, 1, 3, 3), dict(groups=4, stride=2, padding=1)),
             ((1, 3, 10, 8), (6, 1, 3, 3), dict(groups=3, stride=(1, 2))),
             ((1, 4, 8, 8), (4, 1, 3, 3), dict(groups=4, padding=1)),
             ((1, 2, 9, 9), (3, 2, 3, 3), dict(stride=2)),
             ((1, 4, 8, 8), (4, 2, 3, 3), dict(groups=2, padding=1)),
             ((1, 2, 6, 6), (3, 2, 1, 1), {}),
             ((1, 2, 9, 9), (3, 2, 5, 5), dict(padding=2)),
             ((1, 2, 9, 9), (3, 2, 3, 3), dict(padding=3, dilation=2))]


@pytest.mark.parametrize("x_shape,w_shape,kw", ADMISSION)
def test_what_the_algorithm_filter_admits_runs(x_shape, w_shape, kw, rng):
    """The autotuner measures the algorithms that algo_problem admits for a
    backward (asked with or without the input gradient): each must run and
    give the reference's gradients, so a measurement never meets an error."""
    x, w = randn(rng, x_shape, np.float64), randn(rng, w_shape, np.float64)
    gy = randn(rng, convkern.conv2d(x, w, **kw, backend="reference").shape, np.float64)
    ref = convkern.conv2d_backward(gy, x, w, **kw, backend="reference")
    g = conv2d_geometry(x_shape, w_shape, **kw)
    for needs in ((True, True, True), (False, True, False), (False, False, True), (True, False, False)):
        for algo in convkern.algorithms("cpp")[:-1]:
            what = f"{algo} x{x_shape} w{w_shape} {kw} needs {needs}"
            if cpp.algo_problem(g, algo, needs[0]) is not None:
                continue
            got = convkern.conv2d_backward(gy, x, w, **kw, needs=needs, algo=algo, backend="cpp")
            for name, n, a, r in zip(("grad input", "grad weight", "grad bias"), needs, got, ref):
                if n:
                    assert_close(a, r, np.float64, f"{what} {name}")
                else:
                    assert a is None, f"{what}: {name} not asked for"


def test_algorithms_lists_what_each_backend_runs_by_name():
    assert convkern.algorithms("cpp") == ("direct", "depthwise", "im2col", "shifted", "winograd", "winograd4",
                                            "auto")
    assert convkern.algorithms("numba") == ("direct", "im2col", "auto")
    x, w = np.ones((1, 2, 6, 6), np.float32), np.ones((3, 2, 3, 3), np.float32)
    with pytest.raises(ValueError, match="algo 'winograd' is not offered by backend 'numba'; it has 'direct', 'im2col'"):
        convkern.conv2d(x, w, algo="winograd", backend="numba")


@pytest.mark.parametrize("layer", [layer.name for layer in CANONICAL])
def test_auto_runs_the_algorithm_it_reports(layer, rng):
    """"auto" runs what its rule reports (the kernels note themselves as they
    run), forward and for the input gradient, and gives that algorithm's bits."""
    spec = next(c for c in CANONICAL if c.name == layer)
    x_shape, w_shape = spec.shapes(1)
    kw = spec.kwargs()
    g = conv2d_geometry(x_shape, w_shape, None, **kw)
    x, w = randn(rng, x_shape, np.float32), randn(rng, w_shape, np.float32)
    auto = convkern.conv2d(x, w, **kw, backend="cpp")
    ran = cpp.choose_algo(g)
    assert cpp.last_algo() == ran
    np.testing.assert_array_equal(auto, convkern.conv2d(x, w, **kw, algo=ran, backend="cpp"), err_msg=f"auto ran {ran}")
    gy = randn(rng, g.output_shape, np.float32)
    convkern.conv2d_backward(gy, x, w, **kw, needs=(True, False, False), backend="cpp")
    assert cpp.last_algo() == cpp.choose_algo(g, backward=True)


# Small maps with more filters than the batch has output pixels (K >= N*Ho*Wo,
# the deep layers of a CNN at small batch): im2col reads the weights in place
# instead of packing them. K either side of N*Ho*Wo, an edge panel of fewer
# than a register tile's rows, more filters than one row block, reductions
# longer than one block, strides, dilation, 1x1; grad input too (as the
# forward conv of the flipped filters: C >= N*Ho*Wo).
SMALL_MAPS = [((2, 5, 3, 3), (17, 5, 3, 3), dict(padding=1)),
              ((2, 5, 3, 3), (18, 5, 3, 3), dict(padding=1)),
              ((2, 20, 3, 3), (37, 20, 3, 3), dict(padding=1)),
              ((1, 40, 4, 4), (300, 40, 3, 3), dict(padding=1)),
              ((3, 6, 7, 6), (50, 6, 3, 2), dict(stride=2, dilation=(1, 2), padding=(1, 0))),
              ((4, 16, 2, 3), (30, 16, 1, 1), {})]


@pytest.mark.parametrize("algo", ["im2col", "auto"])
def test_small_maps_with_many_filters(algo, dtype, rng):
    for x_shape, w_shape, kw in SMALL_MAPS:
        x, w, b = randn(rng, x_shape, dtype), randn(rng, w_shape, dtype), randn(rng, (w_shape[0],), dtype)
        what = f"{algo} x{x_shape} w{w_shape} {kw}"
        want = convkern.conv2d(x, w, b, **kw, backend="reference")
        assert_close(convkern.conv2d(x, w, b, **kw, algo=algo, backend="cpp"), want, dtype, what)
        assert_close(convkern.conv2d(x, w, None, **kw, algo=algo, backend="cpp"),
                     convkern.conv2d(x, w, None, **kw, backend="reference"), dtype, what + " no bias")
        relu = convkern.conv2d_relu(x, w, b, **kw, algo=algo, backend="cpp")
        np.testing.assert_array_equal(relu, np.maximum(convkern.conv2d(x, w, b, **kw, algo=algo, backend="cpp"), 0))
        gy = randn(rng, want.shape, dtype)
        got = convkern.conv2d_backward(gy, x, w, **kw, algo=algo, backend="cpp")
        ref = convkern.conv2d_backward(gy, x, w, **kw, backend="reference")
        for name, g, r in zip(("grad input", "grad weight", "grad bias"), got, ref):
            assert_close(g, r, dtype, f"{what} {name}")


# Maps of 256 or more output pixels: auto's weight gradient transposes each
# image to NHWC and runs the NHWC GEMM. Padding, strides, dilation, 1x1, and
# a batch split into several chunks.
LARGE_MAPS = [((3, 5, 16, 17), (7, 5, 3, 3), dict(padding=1)),
              ((2, 40, 20, 20), (24, 40, 1, 1), {}),
              ((2, 8, 35, 33), (6, 8, 3, 3), dict(stride=2, padding=(1, 0))),
              ((1, 4, 24, 24), (5, 4, 3, 3), dict(dilation=2)),
              ((9, 4, 16, 16), (8, 4, 3, 3), dict(padding=1))]


def test_weight_gradient_on_large_maps(dtype, rng):
    for x_shape, w_shape, kw in LARGE_MAPS:
        x, w = randn(rng, x_shape, dtype), randn(rng, w_shape, dtype)
        gy = randn(rng, convkern.conv2d(x, w, **kw, backend="reference").shape, dtype)
        ref = convkern.conv2d_backward(gy, x, w, **kw, backend="reference")
        what = f"x{x_shape} w{w_shape} {kw}"
        got = convkern.conv2d_backward(gy, x, w, **kw, backend="cpp")
        for name, g, r in zip(("grad input", "grad weight", "grad bias"), got, ref):
            assert_close(g, r, dtype, f"{what} {name}")
        alone = convkern.conv2d_backward(gy, x, w, **kw, needs=(False, True, False), backend="cpp")[1]
        np.testing.assert_array_equal(alone, got[1], err_msg=what)


# auto's weight gradient as an implicit GEMM (read from a padded NHWC copy of
# the input, no column matrix): channels a multiple of 32, maps under 256
# pixels, more pixels than filters. Filters fewer than and not a multiple of
# a register panel's rows, strides with dilation, no padding, three panels a
# tap, pixels just above the filters, and a batch in several chunks.
def _check_weight_gradient(x, w, gy, kw, dtype, what, algo="auto"):
    """grad weight against the reference, the same bits for 1, 2 and 3
    threads, and the same with grad input computed alongside."""
    ref = convkern.conv2d_backward(gy, x, w, **kw, needs=(False, True, False), backend="reference")[1]
    outs = at_thread_counts(lambda: convkern.conv2d_backward(gy, x, w, **kw, needs=(False, True, False), algo=algo,
                                                              backend="cpp")[1])
    assert_close(outs[0], ref, dtype, what)
    for other in outs[1:]:
        np.testing.assert_array_equal(other, outs[0], err_msg=f"{what}: changed with the thread count")
    both = convkern.conv2d_backward(gy, x, w, **kw, algo=algo, backend="cpp")[1]
    np.testing.assert_array_equal(both, outs[0], err_msg=f"{what}: with grad input")


IMPLICIT_GW = [((3, 32, 9, 11), (20, 32, 3, 3), dict(padding=1)),
               ((2, 64, 8, 7), (4, 64, 3, 2), dict(stride=2, padding=(1, 0), dilation=(1, 2))),
               ((1, 96, 10, 10), (41, 96, 3, 3), {}),
               ((2, 32, 5, 5), (48, 32, 5, 5), dict(padding="same")),
               ((24, 64, 15, 15), (40, 64, 3, 3), dict(padding=1))]


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_weight_gradient_as_implicit_gemm(layout, dtype, rng):
    def arr(shape):
        a = randn(rng, shape, dtype)
        return a if layout == "nchw" else np.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)

    for x_shape, w_shape, kw in IMPLICIT_GW:
        x, w = arr(x_shape), randn(rng, w_shape, dtype)
        gy = arr(convkern.conv2d(x, w, **kw, backend="reference").shape)
        _check_weight_gradient(x, w, gy, kw, dtype, f"{layout} x{x_shape} w{w_shape} {kw}")


# The Winograd weight gradient (F(3x3, 2x2)), named: odd maps (tiles reaching
# past the last row and column), padding 0 and 2, channels filling part of a
# register panel (48 of 32 + 32) and filters not a multiple of its rows (80,
# 20), a batch in chunks of unequal image counts, a chunk of more tiles than
# one block, a chunk staged one image at a time, and channels not a multiple
# of the vector width (im2col then).
WINOGRAD_GW = [((3, 32, 9, 11), (48, 32, 3, 3), dict(padding=1)),
               ((2, 48, 8, 8), (80, 48, 3, 3), {}),
               ((1, 16, 12, 7), (16, 16, 3, 3), dict(padding=2)),
               ((5, 16, 16, 16), (20, 16, 3, 3), dict(padding=1)),
               ((2, 16, 40, 40), (16, 16, 3, 3), dict(padding=1)),
               ((9, 16, 32, 32), (16, 16, 3, 3), dict(padding=1)),
               ((2, 12, 9, 9), (8, 12, 3, 3), dict(padding=1))]


@pytest.mark.parametrize("algo", ["winograd", "winograd4"])
def test_weight_gradient_by_winograd(algo, dtype, rng):
    """grad weight by F(3x3, 2x2) against the reference, the same bits for
    1, 2 and 3 threads, and alone as with grad input."""
    for x_shape, w_shape, kw in WINOGRAD_GW:
        x, w = randn(rng, x_shape, dtype), randn(rng, w_shape, dtype)
        gy = randn(rng, convkern.conv2d(x, w, **kw, backend="reference").shape, dtype)
        _check_weight_gradient(x, w, gy, kw, dtype, f"{algo} x{x_shape} w{w_shape} {kw}", algo)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_auto_weight_gradient_takes_winograd_where_it_pays(layout, dtype, rng):
    """auto's rule sends a 3x3 stride-1 layer with 16+ channels each way and
    64+ 2x2 tiles to F(3x3, 2x2), on NCHW and on NHWC data alike: the same
    bits as the named algorithm's weight gradient."""
    def arr(a):
        return a if layout == "nchw" else np.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)

    x, w = randn(rng, (2, 32, 24, 24), dtype), randn(rng, (32, 32, 3, 3), dtype)
    gy = randn(rng, (2, 32, 24, 24), dtype)
    named = convkern.conv2d_backward(gy, x, w, padding=1, needs=(False, True, False), algo="winograd",
                                     backend="cpp")[1]
    got = convkern.conv2d_backward(arr(gy), arr(x), w, padding=1, needs=(False, True, False), backend="cpp")[1]
    if layout == "nchw":
        assert cpp.last_algo() == "winograd", f"auto's weight gradient ran {cpp.last_algo()}"
    np.testing.assert_array_equal(got, named, err_msg=f"{layout}: auto's weight gradient")
    ref = convkern.conv2d_backward(gy, x, w, padding=1, needs=(False, True, False), backend="reference")[1]
    assert_close(got, ref, dtype, layout)


@pytest.mark.parametrize("where", ["input", "grad_output"])
def test_winograd_weight_gradient_hands_non_finite_data_to_im2col(rng, where):
    """An inf in the input or grad_output: the weight gradient's NaNs and infs
    where the reference has them (the transforms would make NaNs of some)."""
    x, w = randn(rng, (2, 32, 24, 24), np.float64), randn(rng, (32, 32, 3, 3), np.float64)
    gy = randn(rng, (2, 32, 24, 24), np.float64)
    (x if where == "input" else gy)[1, 3, 5, 7] = np.inf
    ref = convkern.conv2d_backward(gy, x, w, padding=1, needs=(False, True, False), backend="reference")[1]
    assert np.isinf(ref).any(), "the case must put an inf in the gradient"
    for algo in ("winograd", "auto"):
        got = convkern.conv2d_backward(gy, x, w, padding=1, needs=(False, True, False), algo=algo,
                                       backend="cpp")[1]
        np.testing.assert_array_equal(np.isnan(got), np.isnan(ref), err_msg=f"{algo}: NaNs")
        np.testing.assert_array_equal(np.isinf(got), np.isinf(ref), err_msg=f"{algo}: infs")
        finite = np.isfinite(ref)
        assert_close(got[finite], ref[finite], np.float64, f"{algo}: finite entries")


# auto's grad weight for filters of few taps (C*R*S <= 112 but more than one, up to 5 a row,
# column stride 1): LeNet's first layer (rows of a vector and a partial
# one), three channels at row stride 2 with rows of exactly one float32
# AVX-512 vector and fewer filters than a block, rows shorter than a vector,
# one column of taps with dilated rows, five dilated column taps, four
# channels of 5x5 (100 taps), and a batch in two L2 chunks.
TAPS_GW = [((3, 1, 28, 28), (32, 1, 5, 5), dict(padding=2)),
           ((2, 3, 9, 16), (5, 3, 3, 3), dict(padding=1, stride=(2, 1))),
           ((1, 1, 6, 5), (3, 1, 2, 2), {}),
           ((2, 2, 12, 40), (7, 2, 3, 1), dict(padding=(1, 0), dilation=(2, 1))),
           ((1, 1, 20, 20), (4, 1, 3, 5), dict(padding=(1, 4), dilation=(1, 2))),
           ((2, 4, 10, 19), (6, 4, 5, 5), dict(padding=2)),
           ((70, 1, 28, 28), (8, 1, 5, 5), dict(padding=2))]


def test_weight_gradient_of_few_taps(dtype, rng):
    """auto's direct grad weight for first layers against the reference, the
    same bits for 1, 2 and 3 threads, and with grad input."""
    for x_shape, w_shape, kw in TAPS_GW:
        x, w = randn(rng, x_shape, dtype), randn(rng, w_shape, dtype)
        gy = randn(rng, convkern.conv2d(x, w, **kw, backend="reference").shape, dtype)
        _check_weight_gradient(x, w, gy, kw, dtype, f"x{x_shape} w{w_shape} {kw}")


TAPS_GW_NHWC = TAPS_GW + [((2, 2, 9, 9), (17, 2, 3, 3), dict(padding=1)),   # a vector and one lane
                           ((3, 3, 11, 10), (50, 3, 3, 3), dict(stride=2)),  # three vectors and a part (float32)
                           ((2, 1, 7, 7), (64, 1, 5, 5), dict(padding=2))]   # four whole vectors (float32)


def test_weight_gradient_of_few_taps_channels_last(dtype, rng):
    """The channels_last direct grad weight (output channels in vector lanes,
    taps in register groups) against the reference, the same bits for 1, 2
    and 3 threads, and with grad input."""
    from convkern import functional

    def cl(a):
        return np.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)

    for x_shape, w_shape, kw in TAPS_GW_NHWC:
        x, w = cl(randn(rng, x_shape, dtype)), randn(rng, w_shape, dtype)
        gy = cl(randn(rng, convkern.conv2d(x, w, **kw, backend="reference").shape, dtype))
        _check_weight_gradient(x, w, gy, kw, dtype, f"channels_last x{x_shape} w{w_shape} {kw}")
        assert functional.last_layout() == "nhwc"


@pytest.mark.parametrize("x_shape", [(1, 3, 5, 7), (3, 4, 40, 37)], ids=["one chunk", "sixteen chunks"])
def test_bias_gradient_of_channels_last_data(dtype, rng, x_shape):
    """The channels_last bias gradient (row chunks summed in double, then in
    order) against the reference, the same bits for 1, 2 and 3 threads."""
    def cl(a):
        return np.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)

    x, w = cl(randn(rng, x_shape, dtype)), randn(rng, (37, x_shape[1], 3, 3), dtype)
    gy = cl(randn(rng, convkern.conv2d(x, w, padding=1, backend="reference").shape, dtype) + 0.25)
    ref = convkern.conv2d_backward(gy, x, w, padding=1, needs=(False, False, True), backend="reference")[2]
    outs = at_thread_counts(lambda: convkern.conv2d_backward(gy, x, w, padding=1, needs=(False, False, True),
                                                              backend="cpp")[2])
    assert_close(outs[0], ref, dtype, "grad bias")
    for other in outs[1:]:
        np.testing.assert_array_equal(other, outs[0])


def test_weight_gradient_of_few_taps_keeps_infs_apart_from_padding_lanes(rng):
    """An inf in the input's last column: the lanes past a row's end are
    zero on both sides, so the NaNs and infs are the reference's."""
    x, w = randn(rng, (2, 1, 12, 21), np.float64), randn(rng, (6, 1, 5, 5), np.float64)
    x[1, 0, 4, 20] = np.inf
    gy = randn(rng, (2, 6, 12, 21), np.float64)
    ref = convkern.conv2d_backward(gy, x, w, padding=2, needs=(False, True, False), backend="reference")[1]
    got = convkern.conv2d_backward(gy, x, w, padding=2, needs=(False, True, False), backend="cpp")[1]
    assert np.isinf(ref).any()
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    np.testing.assert_array_equal(np.isinf(got), np.isinf(ref))
    assert_close(got[np.isfinite(ref)], ref[np.isfinite(ref)], np.float64, "finite entries")


def test_depthwise_3x3_rows_of_every_length(dtype, rng):
    """The NCHW depthwise kernel's unrolled 3x3 taps, stride 1 and 2: rows
    shorter than a vector, whole vectors, runs of four vectors and a partial
    last one, with each padding the grad input (a depthwise conv itself) also
    takes."""
    for W in (1, 3, 8, 15, 16, 17, 33, 64, 65, 70):
        for pad in (0, 1, 2):
            if W + 2 * pad < 3:
                continue
            _check("depthwise", (2, 3, 5, W), (3, 1, 3, 3), dict(groups=3, padding=pad), dtype, rng)
            # stride 2 (forward): the two phase planes of each row
            _check("depthwise", (2, 3, 5, 2 * W + 1), (3, 1, 3, 3), dict(groups=3, padding=pad, stride=2), dtype,
                   rng, backward=False)


@pytest.mark.parametrize("level", SIMD_LEVELS)
def test_depthwise_small_planes_on_channels_last_copies(level, dtype, rng):
    """NCHW depthwise 3x3 convs with at most 64 outputs a plane run on
    channels-last copies of their images (channels a whole number of vectors
    at every level), forward and backward: planes from 1x1 to 8x8, stride 1
    and 2, each padding, with bias, the same at 1-3 threads."""
    cases = [((3, 16, 4, 4), 1, 1), ((2, 48, 7, 7), 1, 1), ((2, 32, 8, 8), 1, 0), ((3, 16, 14, 13), 2, 1),
             ((1, 32, 5, 3), 1, 2), ((2, 16, 1, 1), 1, 1), ((2, 64, 12, 13), 2, 2)]
    for x_shape, stride, pad in cases:
        C = x_shape[1]
        x, w, b = randn(rng, x_shape, dtype), randn(rng, (C, 1, 3, 3), dtype), randn(rng, (C,), dtype)
        kw = dict(stride=stride, padding=pad, groups=C)
        want = convkern.conv2d(x, w, b, **kw, backend="reference")
        assert want.shape[2] * want.shape[3] <= 64, want.shape
        with at_simd_level(level):
            outs = at_thread_counts(lambda: convkern.conv2d(x, w, b, **kw, algo="depthwise", backend="cpp"))
            assert cpp.last_algo() == "depthwise"
        what = f"{level} x{x_shape} {kw}"
        assert_close(outs[0], want, dtype, what)
        for other in outs[1:]:
            np.testing.assert_array_equal(other, outs[0], err_msg=what)
        gy = randn(rng, want.shape, dtype)
        ref = convkern.conv2d_backward(gy, x, w, **kw, needs=(True, True, False), backend="reference")
        with at_simd_level(level):
            grads = at_thread_counts(lambda: convkern.conv2d_backward(gy, x, w, **kw, needs=(True, True, False),
                                                                      algo="depthwise", backend="cpp"))
        for name, i in (("grad input", 0), ("grad weight", 1)):
            assert_close(grads[0][i], ref[i], dtype, f"{what} {name}")
            for other in grads[1:]:
                np.testing.assert_array_equal(other[i], grads[0][i], err_msg=f"{what} {name}")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_depthwise_small_planes_keep_torchs_nan_pattern_at_padding(rng):
    """The channels-last loops skip padding taps: a NaN or inf weight that
    meets the padding of a small plane still gives NaN there (the plane
    kernel multiplies the zeros), as PyTorch's padded input does."""
    x, w = randn(rng, (2, 16, 5, 5), np.float32), randn(rng, (16, 1, 3, 3), np.float32)
    w[3, 0, 0, 0], w[7, 0, 2, 1] = np.inf, np.nan
    out = convkern.conv2d(x, w, padding=1, groups=16, algo="depthwise", backend="cpp")
    ref = convkern.conv2d(x.astype(np.float64), w.astype(np.float64), padding=1, groups=16, backend="reference")
    np.testing.assert_array_equal(np.isnan(out), np.isnan(ref))
    assert np.isnan(ref[:, 3, 0, 0]).all() and not np.isnan(ref[:, 3, 2, 2]).any()


def test_depthwise_gradients_at_any_stride(dtype, rng):
    """auto's backward of strided depthwise convs: the depthwise grad weight
    kernel reads the forward's phase planes (3x3, 5x5 and 7x7 taps, strides 2
    and 3, dilation, rows longer than a vector)."""
    cases = STRIDED_DEPTHWISE + [((2, 5, 20, 41), (5, 1, 5, 5), dict(groups=5, stride=2, padding=2)),
                                         ((1, 2, 30, 37), (2, 1, 7, 7), dict(groups=2, stride=2, padding=3))]
    for x_shape, w_shape, kw in cases:
        x, w = randn(rng, x_shape, dtype), randn(rng, w_shape, dtype)
        gy = randn(rng, convkern.conv2d(x, w, **kw, backend="reference").shape, dtype)
        got = convkern.conv2d_backward(gy, x, w, **kw, backend="cpp")
        ref = convkern.conv2d_backward(gy, x, w, **kw, backend="reference")
        for name, g, r in zip(("grad input", "grad weight", "grad bias"), got, ref):
            assert_close(g, r, dtype, f"x{x_shape} w{w_shape} {kw} {name}")


# strided depthwise convs (one filter per channel) whose grad input runs as
# the zero-inserted stride-1 conv: strides 2, 3 and per axis, dilation,
# padding from none to the taps' reach, rows shorter and longer than a
# vector, one channel
UPSAMPLED_GX = [((2, 3, 9, 9), (3, 1, 3, 3), dict(groups=3, stride=2, padding=1)),
                ((1, 4, 12, 37), (4, 1, 3, 3), dict(groups=4, stride=2)),
                ((2, 2, 11, 10), (2, 1, 5, 5), dict(groups=2, stride=3, padding=2)),
                ((1, 3, 10, 19), (3, 1, 3, 3), dict(groups=3, stride=(2, 1), padding=(1, 0))),
                ((1, 3, 13, 8), (3, 1, 3, 5), dict(groups=3, stride=(1, 2), padding=(0, 2))),
                ((2, 2, 15, 15), (2, 1, 3, 3), dict(groups=2, stride=2, padding=2, dilation=2)),
                ((1, 5, 7, 70), (5, 1, 3, 3), dict(groups=5, stride=2, padding=1)),
                ((1, 1, 4, 4), (1, 1, 3, 3), dict(stride=2, padding=1))]


@pytest.mark.parametrize("level", SIMD_LEVELS)
def test_strided_depthwise_grad_input_as_a_zero_inserted_conv(level, dtype, rng):
    for x_shape, w_shape, kw in UPSAMPLED_GX:
        x, w = randn(rng, x_shape, dtype), randn(rng, w_shape, dtype)
        gy = randn(rng, convkern.conv2d(x, w, **kw, backend="reference").shape, dtype)
        with at_simd_level(level):
            got = convkern.conv2d_backward(gy, x, w, **kw, needs=(True, False, False), backend="cpp")[0]
            assert cpp.last_algo() == "depthwise", f"x{x_shape} w{w_shape} {kw}: ran {cpp.last_algo()}"
        ref = convkern.conv2d_backward(gy, x, w, **kw, needs=(True, False, False), backend="reference")[0]
        assert_close(got, ref, dtype, f"{level} x{x_shape} w{w_shape} {kw}")


def test_strided_depthwise_grad_input_of_an_inf_weight_is_the_gathers(rng):
    """An inf weight times the inserted zeros would be NaN where the gather
    (and torch) adds no product: such weights take the gather."""
    x, w = randn(rng, (1, 3, 9, 9), np.float64), randn(rng, (3, 1, 3, 3), np.float64)
    w[1, 0, 0, 2] = np.inf
    gy = randn(rng, (1, 3, 5, 5), np.float64)
    got = convkern.conv2d_backward(gy, x, w, stride=2, padding=1, groups=3, needs=(True, False, False),
                                   backend="cpp")[0]
    ref = convkern.conv2d_backward(gy, x, w, stride=2, padding=1, groups=3, needs=(True, False, False),
                                   backend="reference")[0]
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    np.testing.assert_array_equal(np.isinf(got), np.isinf(ref))
    assert np.isinf(ref).any() and not np.isnan(got[:, 0]).any()
    assert_close(got[np.isfinite(ref)], ref[np.isfinite(ref)], np.float64, "finite entries")


@pytest.mark.parametrize("algo", ["winograd", "winograd4"])
def test_winograd_hands_non_finite_data_to_im2col(rng, algo):
    """Its transforms subtract inputs (inf - inf = NaN where a direct sum gives
    inf): with non-finite data the answer is im2col's, the reference's pattern."""
    x, w = randn(rng, (1, 4, 8, 8), np.float64), randn(rng, (3, 4, 3, 3), np.float64)
    x[0, 1, 3, 3] = np.inf
    got = convkern.conv2d(x, w, padding=1, algo=algo, backend="cpp")
    assert cpp.last_algo() == "im2col"
    ref = convkern.conv2d(x, w, padding=1, backend="reference")
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    np.testing.assert_array_equal(np.isinf(got), np.isinf(ref))


# NCHW depthwise convs under a 64 KiB L2: the plane kernel asks for the next
# plane's lines ahead only where input and output exceed L2, which turns it on
# for the first three small problems; the last, of small planes, runs on
# channels-last copies in chunks of images that fit the threads' L2 (4 of 9
# images at one thread, 8 at two; its grad weight 4 at any thread count).
SMALL_L2_DEPTHWISE_CHECK = """
    import json
    import numpy as np
    import convkern
    from convkern.backend import cpp

    rng = np.random.default_rng(7)
    errors = {}
    for xs, ws, kw in [((3, 16, 23, 21), (16, 1, 3, 3), dict(groups=16, padding=1)),
                       ((2, 12, 30, 29), (12, 1, 3, 3), dict(groups=12, stride=2, padding=1)),
                       ((2, 8, 26, 25), (16, 1, 5, 3), dict(groups=8, padding=(2, 1), dilation=(1, 2))),
                       ((9, 48, 7, 6), (48, 1, 3, 3), dict(groups=48, padding=1))]:
        x = rng.standard_normal(xs).astype(np.float32)
        w = rng.standard_normal(ws).astype(np.float32)
        b = rng.standard_normal(ws[0]).astype(np.float32)
        ref = convkern.conv2d(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64), **kw,
                              backend="reference")
        outs = []
        for nt in (1, 2):
            convkern.set_num_threads(nt)
            outs.append(convkern.conv2d(x, w, b, **kw, algo="depthwise", backend="cpp"))
            assert cpp.last_algo() == "depthwise"
        err = float(np.linalg.norm(outs[0] - ref) / np.linalg.norm(ref))
        errors[f"x{xs} w{ws}"] = [err, bool(np.array_equal(outs[0], outs[1]))]
        # the small planes' grad weight: sums over chunks of images, the same at any thread count
        if xs[2] * xs[3] <= 64:
            gy = rng.standard_normal(ref.shape).astype(np.float32)
            gw_ref = convkern.conv2d_backward(gy.astype(np.float64), x.astype(np.float64), w.astype(np.float64),
                                              **kw, needs=(False, True, False), backend="reference")[1]
            gws = []
            for nt in (1, 2):
                convkern.set_num_threads(nt)
                gws.append(convkern.conv2d_backward(gy, x, w, **kw, needs=(False, True, False), algo="depthwise",
                                                    backend="cpp")[1])
            err = float(np.linalg.norm(gws[0] - gw_ref) / np.linalg.norm(gw_ref))
            errors[f"x{xs} w{ws} grad weight"] = [err, bool(np.array_equal(gws[0], gws[1]))]
    print(json.dumps({"errors": errors, "l2": cpp._cpu.build_info()["caches"]["l2"]}))
"""


def test_depthwise_with_a_small_l2_gives_the_same_results(tmp_path):
    out = run_python(SMALL_L2_DEPTHWISE_CHECK, tmp_path, CONVKERN_CACHES="32K/8,64K/8,8M/16")
    assert out["l2"] == 64 << 10
    bad = {k: v for k, v in out["errors"].items() if not (v[0] < 2e-6 and v[1])}
    assert not bad, bad
