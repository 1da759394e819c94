"""The NHWC forward's algorithms and routes. Winograd on channels_last data
(the NHWC tiles): F(2x2, 3x3) and
F(4x4, 3x3) against the float64 reference, forward and the stride-1 input
gradient that runs them; channel counts off the vector width, maps off the
tile size, every padding up to 3, several tile blocks with a short last one,
relu fused, no bias. The bits do not change with the thread count, an inf or
NaN gives the implicit GEMM's answer, the rule and the tuner choose among
them, and every SIMD level runs them. channels_last weights are read in
place on every route (Winograd, the implicit GEMM, weights in place, groups,
depthwise, 1x1 input rows in place) with the bits of contiguous ones."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import convkern
from convkern import functional as F
from convkern import layout, tune
from convkern.backend import cpp
from convkern.geometry import conv2d_geometry
from helpers import SIMD_LEVELS, assert_close, at_simd_level, randn

pytestmark = pytest.mark.skipif(not cpp.available()[0], reason="the cpp backend is not built here")

# (x shape, K, padding): channels below, at and off the vector width; maps
# smaller than a tile, odd, and one tile row; blocks of tiles with a short
# last one (3 x 17 x 19 has 270 2x2 tiles); batches whose transformed
# filters outweigh their tiles (one block, GEMMs split by plane: 2 x 64 x
# 8 x 8 and 2 x 90 x 5 x 7).
SHAPES = [((1, 1, 3, 3), 1, 0), ((2, 3, 7, 9), 5, 1), ((1, 17, 6, 5), 33, 1), ((2, 40, 9, 10), 70, 2),
          ((3, 16, 17, 19), 32, 1), ((1, 35, 4, 4), 20, 3), ((2, 64, 8, 8), 48, 0), ((1, 9, 1, 12), 7, 1),
          ((2, 90, 5, 7), 72, 1)]

# error norms against the norm of the terms' magnitudes (see
# _assert_winograd_close), about 10x what 15 random draws of SHAPES gave;
# F(4x4)'s transforms scale by up to 8 (the filters' by 1/24): its rounding
# is about twice F(2x2)'s
TOL = {("winograd", np.float32): 2e-6, ("winograd4", np.float32): 4e-6,
       ("winograd", np.float64): 2e-15, ("winograd4", np.float64): 5e-15}


def _cl(a):
    return layout.to_channels_last(a)


def _assert_winograd_close(y, x, w, b, pad, algo, dtype, what):
    """The error's norm against that of the sum of magnitudes |x| * |w| + |b|
    (the transforms' rounding scales with the terms, not with a result that
    cancels: a one-output problem can sum to near zero)."""
    f64 = np.float64
    want = convkern.conv2d(x.astype(f64), w.astype(f64), None if b is None else b.astype(f64), padding=pad,
                           backend="reference")
    scale = convkern.conv2d(np.abs(x).astype(f64), np.abs(w).astype(f64), None if b is None else np.abs(b).astype(f64),
                            padding=pad, backend="reference")
    assert y.shape == want.shape and y.dtype == dtype, what
    err = np.linalg.norm((y.astype(f64) - want).ravel()) / np.linalg.norm(scale.ravel())
    assert err <= TOL[algo, dtype], f"{what}: error {err:.3g} of the terms' magnitude > {TOL[algo, dtype]:g}"


@pytest.mark.parametrize("algo", ["winograd", "winograd4"])
def test_nhwc_winograd_against_the_reference(algo, dtype, rng):
    for (xs, K, pad), relu, with_bias in itertools.product(SHAPES, (False, True), (True, False)):
        x, w = randn(rng, xs, dtype), randn(rng, (K, xs[1], 3, 3), dtype)
        b = randn(rng, (K,), dtype) if with_bias else None
        what = f"{algo} x{xs} K={K} pad {pad} relu {relu} bias {with_bias}"
        conv = convkern.conv2d_relu if relu else convkern.conv2d
        # (a one-channel input is both layouts: asked for channels_last)
        y = conv(_cl(x), w, b, padding=pad, algo=algo, backend="cpp", memory_format="channels_last")
        assert cpp.last_algo() == algo and F.last_layout() == "nhwc", f"{what}: ran {cpp.last_algo()}"
        assert y.transpose(0, 2, 3, 1).flags.c_contiguous and y.dtype == dtype, what
        plain = convkern.conv2d(_cl(x), w, b, padding=pad, algo=algo, backend="cpp", memory_format="channels_last")
        if relu:
            np.testing.assert_array_equal(y, np.maximum(plain, 0), err_msg=f"{what}: fused relu")
        _assert_winograd_close(plain, x, w, b, pad, algo, dtype, what)
        g = conv2d_geometry(xs, w.shape, None if b is None else b.shape, padding=pad)
        direct = cpp.conv2d_forward_nhwc(layout.nhwc(x), w, b, g, relu=relu, algo=algo)
        np.testing.assert_array_equal(direct, layout.nhwc(y), err_msg=f"{what}: the backend's op")


@pytest.mark.parametrize("algo", ["winograd", "winograd4"])
@pytest.mark.parametrize("xs,K", [((3, 24, 30, 42), 40), ((2, 90, 5, 7), 72)], ids=["blocks", "one-block"])
def test_nhwc_winograd_bits_do_not_change_with_the_thread_count(algo, xs, K):
    """3 x 15 x 21 tiles of 2x2: blocks of different sizes for 1, 2 and 3
    threads; 2 x 3 x 4 tiles under 90 -> 72 channels: one block, its GEMMs
    split by plane among the threads."""
    rng = np.random.default_rng(3)
    x, w, b = rng.standard_normal(xs, np.float32), rng.standard_normal((K, xs[1], 3, 3), np.float32), \
        rng.standard_normal(K, np.float32)
    g = conv2d_geometry(x.shape, w.shape, b.shape, padding=1)
    xn = layout.nhwc(_cl(x))
    outs = []
    for n in (1, 2, 3):
        convkern.set_num_threads(n)
        try:
            outs.append(cpp.conv2d_forward_nhwc(xn, w, b, g, algo=algo))
        finally:
            convkern.set_num_threads(0)
    for other in outs[1:]:
        np.testing.assert_array_equal(other, outs[0], err_msg=f"{algo}: changed with the thread count")


@pytest.mark.parametrize("algo", ["winograd", "winograd4"])
@pytest.mark.parametrize("where", ["input", "weight", "bias"])
def test_nhwc_winograd_hands_non_finite_data_to_the_gemm(algo, where):
    """The transforms would turn an inf into NaNs where the direct sum gives
    +-inf: the implicit GEMM's answer instead, infs and NaNs where it has them."""
    rng = np.random.default_rng(5)
    x, w, b = rng.standard_normal((2, 20, 9, 11)), rng.standard_normal((24, 20, 3, 3)), rng.standard_normal(24)
    {"input": lambda: x.__setitem__((1, 3, 4, 5), np.inf), "weight": lambda: w.__setitem__((2, 7, 1, 1), -np.inf),
     "bias": lambda: b.__setitem__(5, np.nan)}[where]()
    g = conv2d_geometry(x.shape, w.shape, b.shape, padding=1)
    xn = layout.nhwc(_cl(x))
    got = cpp.conv2d_forward_nhwc(xn, w, b, g, algo=algo)
    want = cpp.conv2d_forward_nhwc(xn, w, b, g, algo="im2col")
    assert not np.isfinite(want).all()
    np.testing.assert_array_equal(got, want)
    ref = convkern.conv2d(x, w, b, padding=1, backend="reference")
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(layout.nhwc(ref)))


def test_nhwc_rule_takes_winograd_where_channels_share_the_transforms(rng):
    """With tuning off, channels_last 3x3 stride-1 convs with 16+ channels in
    and out (or 32+ in) run F(2x2) on the NHWC tiles, fewer the implicit GEMM;
    an NCHW input keeps its own rule."""
    with tune.forced("off"):
        for (C, K), algo in (((16, 16), "winograd"), ((32, 8), "winograd"), ((64, 64), "winograd"),
                             ((8, 32), "im2col"), ((16, 8), "im2col"), ((3, 64), "im2col")):
            x, w = randn(rng, (2, C, 10, 10), np.float32), randn(rng, (K, C, 3, 3), np.float32)
            y = convkern.conv2d(_cl(x), w, padding=1)
            assert (cpp.last_algo(), F.last_layout()) == (algo, "nhwc"), f"C={C} K={K}"
            named = convkern.conv2d(_cl(x), w, padding=1, algo="winograd") if algo == "winograd" else None
            if named is not None:
                np.testing.assert_array_equal(y, named)


def test_stride1_grad_input_runs_the_nhwc_winograd(dtype, rng):
    """grad input of a 3x3 stride-1 channels_last conv is the forward conv of
    grad_output with the flipped filters: on 16+ channels and 32+ tiles, the
    NHWC tiles."""
    for xs, K, pad in (((2, 24, 11, 9), 32, 1), ((2, 40, 9, 8), 16, 0), ((2, 16, 10, 10), 20, 2)):
        x, w = randn(rng, xs, dtype), randn(rng, (K, xs[1], 3, 3), dtype)
        gy = randn(rng, convkern.conv2d(x, w, padding=pad, backend="reference").shape, dtype)
        with tune.forced("off"):
            gx = convkern.conv2d_backward(_cl(gy), _cl(x), w, padding=pad, needs=(True, False, False))[0]
        assert cpp.last_algo() == "winograd", f"x{xs} K={K} pad {pad}: grad input ran {cpp.last_algo()}"
        assert layout.is_channels_last(gx)
        want = convkern.conv2d_backward(gy, x, w, padding=pad, needs=(True, False, False), backend="reference")[0]
        assert_close(gx, want, dtype, f"x{xs} K={K} pad {pad}")


@pytest.mark.parametrize("weights", ["contiguous", "channels_last"])
def test_few_tiles_take_the_gemm(weights, dtype, rng):
    """A batch of one on a small map has too few tiles to pay for the
    per-call filter transform: the rules take a GEMM, forward and for grad
    input, where the weights (outnumbering the pixels) are read in place,
    channels_last ones in their own order (so within rounding of the
    contiguous weights' result)."""
    for xs, K in (((1, 48, 4, 4), 64), ((1, 32, 7, 7), 40), ((1, 24, 5, 6), 24)):
        x, w = randn(rng, xs, dtype), randn(rng, (K, xs[1], 3, 3), dtype)
        wl = _cl(w) if weights == "channels_last" else w
        g = conv2d_geometry(xs, w.shape, None, padding=1)
        assert cpp.nhwc_winograd_tile(g) == 0, f"x{xs}: the rule takes Winograd"
        gy = randn(rng, convkern.conv2d(x, w, padding=1, backend="reference").shape, dtype)
        with tune.forced("off"):
            y = convkern.conv2d(_cl(x), wl, padding=1)
            assert cpp.last_algo() == "im2col", f"x{xs}: forward ran {cpp.last_algo()}"
            gx = convkern.conv2d_backward(_cl(gy), _cl(x), wl, padding=1, needs=(True, False, False))[0]
            assert cpp.last_algo() == "im2col", f"x{xs}: grad input ran {cpp.last_algo()}"
            assert_close(y, convkern.conv2d(_cl(x), w, padding=1), dtype, f"x{xs} weights")
        assert_close(y, convkern.conv2d(x, w, padding=1, backend="reference"), dtype, f"x{xs}")
        want = convkern.conv2d_backward(gy, x, w, padding=1, needs=(True, False, False), backend="reference")[0]
        assert_close(gx, want, dtype, f"x{xs} grad input")


def test_the_tuner_chooses_among_the_nhwc_algorithms(tmp_path, monkeypatch, rng):
    """Tuning a channels_last 3x3 conv times NCHW against each NHWC
    algorithm; a remembered "nhwc:winograd4" runs F(4x4) on the NHWC tiles,
    bit for bit the named algorithm's, and an old plain "nhwc" still means
    the NHWC rules."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    x, w = randn(rng, (2, 16, 12, 12), np.float32), randn(rng, (16, 16, 3, 3), np.float32)
    g = conv2d_geometry(x.shape, w.shape, None, padding=1)
    key = F._tune_key(cpp, "forward:channels_last", g, np.float32, None)
    tune.forget()
    try:
        with tune.forced("on"):
            convkern.conv2d(_cl(x), w, padding=1)
            assert tune.remembered(key) in ("nchw", "nhwc:im2col", "nhwc:winograd", "nhwc:winograd4")
        for choice, algo in (("nhwc:winograd4", "winograd4"), ("nhwc:im2col", "im2col"), ("nhwc", "winograd")):
            tune.forget()
            tune.adopt({key: choice})
            with tune.forced("recall"):
                y = convkern.conv2d(_cl(x), w, padding=1)
            assert cpp.last_algo() == algo, f"{choice}: ran {cpp.last_algo()}"
            np.testing.assert_array_equal(layout.nhwc(y), cpp.conv2d_forward_nhwc(layout.nhwc(_cl(x)), w, None, g,
                                                                                  algo=algo))
    finally:
        tune.forget()


def test_channels_last_weights_are_timed_apart(tmp_path, monkeypatch, rng):
    """channels_last weights cost the NCHW route a transpose that the NHWC
    kernels, reading them in place, do not pay: a choice timed with
    contiguous weights is not reused for them (and back), on channels_last
    and NCHW inputs."""
    x, w = randn(rng, (2, 16, 12, 12), np.float32), randn(rng, (16, 16, 3, 3), np.float32)
    g = conv2d_geometry(x.shape, w.shape, None, padding=1)
    tune.forget()
    try:
        for op, xin in (("forward:channels_last", _cl(x)), ("forward:nchw_via_nhwc", x)):
            plain = F._tune_key(cpp, op, g, np.float32, None)
            cl = F._tune_key(cpp, op, g, np.float32, None, ("w:channels_last",))
            assert plain != cl
            monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / op))  # (forget() alone rereads the file)
            tune.forget()
            with tune.forced("on"):
                convkern.conv2d(xin, w, padding=1)
                assert tune.remembered(plain) is not None and tune.remembered(cl) is None, op
                convkern.conv2d(xin, _cl(w), padding=1)
                assert tune.remembered(cl) is not None, op
    finally:
        tune.forget()


def test_nhwc_algorithm_names_are_checked():
    g = conv2d_geometry((1, 4, 8, 8), (4, 4, 5, 5), None, padding=2)
    x, w = np.ones((1, 8, 8, 4), np.float32), np.ones((4, 4, 5, 5), np.float32)
    with pytest.raises(ValueError, match="cannot run this problem"):
        cpp.conv2d_forward_nhwc(x, w, None, g, algo="winograd")
    with pytest.raises(ValueError, match="cannot run this problem"):
        cpp.conv2d_forward_nhwc(x, w, None, g, algo="shifted")
    assert cpp.nhwc_forward_algos(g) == ("im2col",)
    with pytest.raises(ValueError, match="winograd needs a 3x3 kernel"):
        convkern.conv2d(_cl(np.ones((1, 4, 8, 8), np.float32)), w, padding=2, algo="winograd")


@pytest.mark.parametrize("level", SIMD_LEVELS)
def test_nhwc_winograd_at_every_simd_level(level, dtype):
    with at_simd_level(level):
        rng = np.random.default_rng(11)
        for (xs, K, pad), algo in itertools.product(SHAPES[1:6], ("winograd", "winograd4")):
            x, w, b = randn(rng, xs, dtype), randn(rng, (K, xs[1], 3, 3), dtype), randn(rng, (K,), dtype)
            g = conv2d_geometry(xs, w.shape, b.shape, padding=pad)
            y = cpp.conv2d_forward_nhwc(layout.nhwc(x), w, b, g, algo=algo)
            _assert_winograd_close(y.transpose(0, 3, 1, 2), x, w, b, pad, algo, dtype,
                                   f"{level} {algo} x{xs} K={K} pad {pad}")


# (x shape, w shape, kwargs) with more output channels than the batch has
# output pixels: the rule's GEMM runs over output channels (weights read in
# place), "implicit" over output pixels
FEW_PIXELS = [((2, 20, 3, 3), (40, 20, 3, 3), dict(padding=1)),
              ((2, 16, 4, 4), (64, 16, 3, 3), dict(padding=1, stride=2)),
              ((2, 24, 3, 3), (40, 24, 1, 1), {}),
              ((3, 12, 2, 2), (16, 12, 1, 1), {})]


@pytest.mark.parametrize("level", SIMD_LEVELS)
def test_implicit_runs_over_output_pixels_on_few_pixels(level, dtype):
    """Where a batch has no more output pixels than output channels, the NHWC
    forward offers "implicit" beside the rule's GEMM (for the autotuner to
    time): the GEMM over output pixels, whose sums for a pixel do not depend
    on how many pixels there are. So its output is, bit for bit, the first
    images of the same conv on a batch large enough for the rule to take that
    GEMM itself, and the reference's within rounding."""
    rng = np.random.default_rng(5)
    with at_simd_level(level):
        for xs, ws, kw in FEW_PIXELS:
            x, w, b = randn(rng, xs, dtype), randn(rng, ws, dtype), randn(rng, (ws[0],), dtype)
            g = conv2d_geometry(xs, ws, b.shape, **kw)
            assert g.N * g.Ho * g.Wo <= g.K and "implicit" in cpp.nhwc_forward_algos(g)
            got = cpp.conv2d_forward_nhwc(layout.nhwc(x), w, b, g, algo="implicit")
            big = np.concatenate([x] * (g.K // (g.N * g.Ho * g.Wo) + 1))
            gb = conv2d_geometry(big.shape, ws, b.shape, **kw)
            assert "implicit" not in cpp.nhwc_forward_algos(gb)
            np.testing.assert_array_equal(got, cpp.conv2d_forward_nhwc(layout.nhwc(big), w, b, gb, algo="im2col")[:g.N],
                                          err_msg=f"{level} x{xs} w{ws} {kw}")
            want = convkern.conv2d(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64), **kw,
                                   backend="reference")
            assert_close(got.transpose(0, 3, 1, 2), want, dtype, f"{level} x{xs} w{ws} {kw}")


def test_implicit_is_offered_only_where_the_gemms_differ():
    many = conv2d_geometry((8, 16, 8, 8), (32, 16, 1, 1), None)
    few = conv2d_geometry((8, 16, 2, 2), (32, 16, 1, 1), None)
    grouped = conv2d_geometry((2, 16, 2, 2), (32, 8, 1, 1), None, groups=2)
    assert cpp.nhwc_forward_algos(many) == ("im2col",) and cpp.nhwc_forward_algos(grouped) == ("im2col",)
    assert cpp.nhwc_forward_algos(few) == ("im2col", "implicit")
    x, w = np.ones((8, 2, 2, 16), np.float32), np.ones((32, 16, 1, 1), np.float32)
    with pytest.raises(ValueError, match="cannot run this problem"):
        cpp.conv2d_forward_nhwc(np.ones((8, 8, 8, 16), np.float32), w, None, many, algo="implicit")
    with pytest.raises(ValueError, match="pixel_rows=True asks for a GEMM"):
        cpp._cpu.conv2d_forward_nhwc(x, w, None, few.as_tuple(), False, 2, False, None, True)
    with pytest.raises(ValueError, match="is not offered by backend"):  # (an NHWC form, not an NCHW algorithm)
        convkern.conv2d(np.ones((8, 16, 2, 2), np.float32), w, algo="implicit")


# (x shape, w shape, kwargs): the NHWC forward's routes, each with weights in
# both layouts: Winograd, the implicit GEMM (padded, strided), the weights read
# in place (more filters than output pixels), groups, depthwise, 1x1 (input
# rows read in place), grouped 1x1
WEIGHT_ROUTES = [((2, 24, 9, 10), (32, 24, 3, 3), dict(padding=1)),
                 ((2, 5, 11, 9), (7, 5, 3, 3), dict(padding=1, stride=2)),
                 ((2, 20, 3, 3), (40, 20, 3, 3), dict(padding=1)),
                 ((2, 6, 12, 12), (9, 2, 3, 3), dict(padding=1, stride=2, groups=3)),
                 ((2, 8, 7, 7), (8, 1, 3, 3), dict(padding=1, groups=8)),
                 ((2, 16, 5, 6), (12, 16, 1, 1), {}),
                 ((2, 12, 5, 6), (9, 4, 1, 1), dict(groups=3))]


@pytest.mark.parametrize("case", WEIGHT_ROUTES, ids=lambda c: "x".join(map(str, c[0])) + "-" + "x".join(map(str, c[1])))
def test_channels_last_weights_are_read_in_place(case, dtype, rng):
    """A model moved to channels_last has channels_last weights too: the NHWC
    forward reads their (K, R, S, C/G) memory in place, on channels_last and
    NCHW inputs and for every NHWC algorithm that runs the problem, with the
    bits of the contiguous weights; except where the GEMM reads the weights
    as its rows (they outnumber the batch's pixels), which sums each row in
    its memory order, (r, s, c) for channels_last weights: the same result
    within rounding there."""
    xs, ws, kw = case
    x, w, b = randn(rng, xs, dtype), randn(rng, ws, dtype), randn(rng, (ws[0],), dtype)
    wcl = _cl(w)
    assert layout.is_channels_last(wcl) or ws[1] == 1 or ws[2:] == (1, 1)  # (else both layouts at once)
    want = convkern.conv2d(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64), **kw,
                           backend="reference")
    g = conv2d_geometry(xs, ws, b.shape, **kw)
    # the weights-in-place GEMM on channels_last weights whose order differs
    rows_order = g.groups == 1 and g.K >= g.N * g.Ho * g.Wo and ws[1] > 1 and ws[2] * ws[3] > 1

    def same(got, plain, what, order_may_differ):
        if order_may_differ:
            assert_close(got, plain, dtype, what)
        else:
            np.testing.assert_array_equal(got, plain, err_msg=what)

    with tune.forced("off"):
        for xin in (_cl(x), x):
            plain = convkern.conv2d(xin, w, b, **kw)
            got = convkern.conv2d(xin, wcl, b, **kw)
            same(got, plain, f"channels_last weights, input {xin.strides}",
                 rows_order and layout.is_channels_last(xin))
            assert_close(got, want, dtype, f"x{xs} w{ws} {kw}")
    for algo in cpp.nhwc_forward_algos(g) or ("auto",):
        got = cpp.conv2d_forward_nhwc(layout.nhwc(x), wcl, b, g, algo=algo)
        same(got, cpp.conv2d_forward_nhwc(layout.nhwc(x), w, b, g, algo=algo), algo,
             rows_order and algo in ("im2col", "auto"))
        assert_close(layout.from_nhwc(got), want, dtype, f"x{xs} w{ws} {kw} {algo}")
