"""channels_last (NHWC-strided) arrays: every op gives the float64
reference's answer, its output keeps the input's layout, and on cpp the NHWC
kernels run without transposing (their outputs are views of NHWC buffers).
Awkward shapes included: groups, depthwise, strides, dilation, asymmetric
padding, 1x1, one-pixel rows, NaN and ties in pooling."""

from __future__ import annotations

import itertools
import zlib

import numpy as np
import pytest

import convkern as ck
from convkern import layout
from convkern.backend import cpp
from helpers import SIMD_LEVELS, at_simd_level, at_thread_counts

BACKENDS = ["cpp", "numba", "reference"]


def cl(a):
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)


def tol(dtype):
    return dict(rtol=2e-4, atol=2e-4) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-10)


CONVS = [  # x shape, w shape, stride, padding, dilation, groups
    ((2, 3, 9, 11), (4, 3, 3, 3), 1, 1, 1, 1),
    ((3, 8, 10, 7), (8, 1, 3, 3), 1, 1, 1, 8),       # depthwise
    ((2, 12, 9, 9), (12, 1, 3, 3), 2, 1, 1, 12),     # depthwise, strided
    ((2, 6, 12, 12), (9, 2, 3, 3), 2, 1, 1, 3),      # groups
    ((2, 5, 8, 8), (7, 5, 1, 1), 1, 0, 1, 1),        # pointwise
    ((2, 16, 7, 7), (16, 16, 1, 1), 2, 0, 1, 1),     # strided 1x1
    ((1, 4, 13, 9), (6, 4, 5, 3), 2, 2, 2, 1),       # dilated
    ((4, 2, 28, 28), (32, 2, 5, 5), 1, 2, 1, 1),     # a first layer
    ((1, 3, 6, 6), (2, 3, 3, 3), 1, (0, 2), (2, 1), 1),
    ((2, 3, 1, 17), (5, 3, 1, 3), 1, (0, 1), 1, 1),  # one-pixel rows
    ((2, 4, 7, 7), (6, 4, 3, 3), 1, "same", 1, 1),
    ((2, 5, 8, 9), (6, 5, 2, 4), 1, "same", 1, 1),   # even kernel: more padding bottom/right
    ((2, 20, 3, 3), (40, 20, 3, 3), 1, 1, 1, 1),     # more filters than output pixels: weights read in place
    ((2, 6, 5, 5), (30, 6, 3, 3), 2, 1, 1, 1),       # the same, strided
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", CONVS, ids=lambda c: "x".join(map(str, c[0])) + "-" + "x".join(map(str, c[1])))
def test_conv2d_forward_and_backward(backend, dtype, case):
    xs, ws, stride, padding, dilation, groups = case
    rng = np.random.default_rng(zlib.crc32(repr(case).encode()))
    x = rng.standard_normal(xs).astype(dtype)
    w = rng.standard_normal(ws).astype(dtype)
    b = rng.standard_normal(ws[0]).astype(dtype)
    kw = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    x64, w64, b64 = x.astype(np.float64), w.astype(np.float64), b.astype(np.float64)
    want = ck.conv2d(x64, w64, b64, **kw, backend="reference")
    y = ck.conv2d(cl(x), w, b, **kw, backend=backend)
    assert layout.is_channels_last(y) or y.shape[1] == 1
    np.testing.assert_allclose(y, want, **tol(dtype))
    gy = rng.standard_normal(y.shape).astype(dtype)
    wants = ck.conv2d_backward(gy.astype(np.float64), x64, w64, **kw, backend="reference")
    got = ck.conv2d_backward(cl(gy), cl(x), w, **kw, backend=backend)
    assert layout.is_channels_last(got[0]) or got[0].shape[1] == 1
    for name, g, r in zip(("grad input", "grad weight", "grad bias"), got, wants):
        np.testing.assert_allclose(g, r, **tol(dtype), err_msg=name)
    only_gw = ck.conv2d_backward(cl(gy), cl(x), w, **kw, needs=(False, True, False), backend=backend)
    assert only_gw[0] is None and only_gw[2] is None
    np.testing.assert_allclose(only_gw[1], wants[1], **tol(dtype))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_stride1_grad_input_as_the_flipped_forward(dtype):
    """At stride 1 (undilated, one group) cpp's NHWC grad input runs the
    forward conv of grad_output with flipped, transposed filters; kernel
    sizes, paddings up to R-1 (and past it: the general path) and widths
    vary, including 1-wide kernels and padding on one side only."""
    rng = np.random.default_rng(11)
    for R, S, ph, pw, H, W, C, K in [(3, 3, 1, 1, 9, 11, 5, 7), (3, 3, 0, 0, 6, 8, 3, 4), (3, 3, 2, 2, 5, 5, 4, 3),
                                     (5, 5, 2, 2, 12, 10, 2, 6), (5, 3, 4, 0, 7, 9, 3, 5), (1, 3, 0, 1, 4, 13, 6, 2),
                                     (2, 2, 1, 0, 6, 7, 4, 4), (3, 1, 1, 0, 8, 3, 2, 9), (3, 3, 3, 1, 6, 6, 3, 3),
                                     (7, 7, 3, 3, 16, 16, 3, 16)]:
        x = rng.standard_normal((2, C, H, W)).astype(dtype)
        w = rng.standard_normal((K, C, R, S)).astype(dtype)
        g = ck.conv2d_geometry(x.shape, w.shape, None, padding=(ph, pw))
        gy = rng.standard_normal((2, K, g.Ho, g.Wo)).astype(dtype)
        want = ck.conv2d_backward(gy.astype(np.float64), x.astype(np.float64), w.astype(np.float64),
                                  padding=(ph, pw), needs=(True, False, False), backend="reference")[0]
        got = cpp.conv2d_backward_nhwc(layout.nhwc(gy), layout.nhwc(x), w, g, needs=(True, False, False))[0]
        np.testing.assert_allclose(got.transpose(0, 3, 1, 2), want, **tol(dtype),
                                   err_msg=f"{R}x{S} pad ({ph}, {pw}) {H}x{W} C={C} K={K}")


WIDE_TILES = [  # x shape, w shape, padding; no 3x3, which goes to NCHW Winograd
    ((2, 24, 15, 11), (64, 24, 3, 2), 1),  # one pair; 360 rows, so no split of the columns
    ((1, 48, 5, 5), (96, 48, 3, 2), 1),    # few rows: the columns split between threads, a chunk
                                           # starting at an odd panel; 288-long rows (two K blocks)
    ((2, 16, 15, 11), (80, 16, 5, 5), 2),  # a pair, then a part panel alone
    ((3, 32, 9, 11), (160, 32, 1, 1), 0),  # pairs after pairs; a row block ends in a short panel
]


@pytest.mark.parametrize("xs, ws, pad", WIDE_TILES)
def test_nhwc_conv_pairs_of_column_panels(dtype, xs, ws, pad):
    """The NHWC forward's GEMM reads the patches in place and takes two
    column panels at a time where both are full: every pairing against the
    float64 reference, on 2 threads (where the shapes' comments hold) and 1."""
    from convkern import functional

    rng = np.random.default_rng(zlib.crc32(repr((xs, ws)).encode()))
    x = rng.standard_normal(xs).astype(dtype)
    w = (rng.standard_normal(ws) / np.sqrt(ws[1] * ws[2] * ws[3])).astype(dtype)
    b = rng.standard_normal(ws[0]).astype(dtype)
    want = ck.conv2d(x, w, b, padding=pad, backend="reference")
    for threads in (2, 1):
        ck.set_num_threads(threads)
        try:
            got = ck.conv2d(cl(x), w, b, padding=pad, backend="cpp")
        finally:
            ck.set_num_threads(0)
        assert functional.last_layout() == "nhwc" and layout.is_channels_last(got)
        np.testing.assert_allclose(got, want, err_msg=f"{threads} threads", **tol(dtype))


def test_weights_in_place_gemm_pairs_of_column_panels(dtype):
    """A small map's conv reading the weights in place (as many filters as
    the batch has pixels) pairs its column panels too."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 4, 8, 8)).astype(dtype)
    w = rng.standard_normal((128, 4, 3, 3)).astype(dtype)
    want = ck.conv2d(x, w, padding=1, backend="reference")
    np.testing.assert_allclose(ck.conv2d(x, w, padding=1, algo="im2col", backend="cpp"), want, **tol(dtype))


@pytest.mark.parametrize("xs, relu", [((2, 3, 9, 11), False), ((3, 1, 12, 10), True), ((2, 6, 7, 7), True)],
                         ids=["NCHW input", "one channel, relu", "channels_last input, relu"])
def test_conv2d_memory_format_channels_last(xs, relu):
    rng = np.random.default_rng(zlib.crc32(repr(xs).encode()))
    x = rng.standard_normal(xs).astype(np.float32)
    w = rng.standard_normal((5, xs[1], 3, 2)).astype(np.float32)
    b = rng.standard_normal(5).astype(np.float32)
    want = ck.conv2d(x, w, b, padding=1, backend="reference")
    if relu:
        want = np.maximum(want, 0)
    if xs[1] == 6:
        x = cl(x)
    keep = x.copy()
    conv = ck.conv2d_relu if relu else ck.conv2d
    got = conv(x, w, b, padding=1, memory_format="channels_last")
    assert layout.is_channels_last(got)
    np.testing.assert_allclose(got, want, **tol(np.float32))
    np.testing.assert_array_equal(x, keep)
    with pytest.raises(ValueError, match="conv2d: memory_format must be None or 'channels_last', got 'nhwc'"):
        ck.conv2d(x, w, memory_format="nhwc")
    with pytest.raises(ValueError, match=r"memory_format='channels_last' needs a batched .* got shape \(3, 9, 11\)"):
        ck.conv2d(np.zeros((3, 9, 11), np.float32), w[:, :3], memory_format="channels_last")


def test_cpp_runs_nhwc_kernels_without_transposes():
    rng = np.random.default_rng(0)
    x = cl(rng.standard_normal((2, 8, 10, 10)).astype(np.float32))
    w = rng.standard_normal((16, 8, 3, 3)).astype(np.float32)
    y = ck.conv2d(x, w, padding=1, backend="cpp")
    # a view of a fresh (N, Ho, Wo, K) buffer: nothing transposed the result
    assert y.base is not None and y.base.shape == (2, 10, 10, 16) and y.base.flags.c_contiguous
    p, i = ck.max_pool2d(y, 2, return_indices=True, backend="cpp")
    assert p.base.shape == (2, 5, 5, 16) and i.base.shape == (2, 5, 5, 16)
    assert ck.avg_pool2d(y, 2, backend="cpp").base.shape == (2, 5, 5, 16)
    r = ck.relu(y, backend="cpp")
    assert layout.is_channels_last(r) and r.base is not None


@pytest.mark.parametrize("shape, pad", [((3, 1, 12, 10), 1), ((5, 4, 1, 1), 2)], ids=["one channel", "1x1 planes"])
def test_backward_of_an_input_in_both_layouts_follows_a_channels_last_grad_output(shape, pad):
    """A one-channel input (or 1x1 planes) is NCHW and NHWC at once: with a
    channels_last grad_output the channels_last path runs (no NCHW copy of
    the gradient), with the NCHW path's answers."""
    from convkern import functional

    rng = np.random.default_rng(zlib.crc32(repr(shape).encode()))
    x = rng.standard_normal(shape).astype(np.float32)
    assert layout.is_both(x) and not layout.is_channels_last(x)
    w = rng.standard_normal((6, shape[1], 3, 3)).astype(np.float32)
    gy = rng.standard_normal(ck.conv2d(x, w, padding=pad).shape).astype(np.float32)
    want = ck.conv2d_backward(gy, x, w, padding=pad, backend="reference")
    functional._last_layout[0] = ""
    got = ck.conv2d_backward(cl(gy), x, w, padding=pad, backend="cpp")
    assert functional.last_layout() in ("nhwc", "nchw"), "the channels_last path did not run"
    for a, b, what in zip(got, want, ("grad_input", "grad_weight", "grad_bias")):
        np.testing.assert_allclose(a, b, err_msg=what, **tol(np.float32))


def test_fused_relu_epilogue_matches_conv_then_relu():
    rng = np.random.default_rng(1)
    for shape, wshape, kw in [((2, 6, 9, 9), (8, 6, 3, 3), dict(padding=1)), ((2, 6, 9, 9), (6, 1, 3, 3), {}),
                              ((3, 5, 4, 4), (7, 5, 1, 1), {}), ((2, 5, 3, 3), (25, 5, 3, 3), dict(padding=1))]:
        x = rng.standard_normal(shape).astype(np.float32)
        x[0, 0, 0, 0] = np.nan
        w = rng.standard_normal(wshape).astype(np.float32)
        b = rng.standard_normal(wshape[0]).astype(np.float32)
        groups = shape[1] if wshape[1] == 1 else 1
        g = ck.conv2d_geometry(shape, wshape, (wshape[0],), **kw, groups=groups)
        fused = cpp.conv2d_forward_nhwc(layout.nhwc(x), w, b, g, relu=True)
        plain = cpp.conv2d_forward_nhwc(layout.nhwc(x), w, b, g, relu=False)
        np.testing.assert_array_equal(fused, np.where(np.isnan(plain) | (plain > 0), plain, 0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kw", [dict(kernel_size=3, stride=2, padding=1), dict(kernel_size=2),
                                dict(kernel_size=3, stride=1, padding=1, dilation=2),
                                dict(kernel_size=(2, 3), stride=(1, 2), ceil_mode=True)], ids=str)
def test_pooling(backend, dtype, kw):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 6, 9, 11)).astype(dtype)
    x[0, 0, 1, 1] = np.nan
    x[1, 2, :3, :3] = 0.5  # ties: the first position wins
    y, i = ck.max_pool2d(x, **kw, return_indices=True, backend="reference")
    yc, ic = ck.max_pool2d(cl(x), **kw, return_indices=True, backend=backend)
    assert layout.is_channels_last(yc) and layout.is_channels_last(ic)
    np.testing.assert_array_equal(yc, y)
    np.testing.assert_array_equal(ic, i)
    np.testing.assert_array_equal(ck.max_pool2d(cl(x), **kw, backend=backend), y)
    gy = rng.standard_normal(y.shape).astype(dtype)
    want = ck.max_pool2d_backward(gy, x, i, **kw, backend="reference")
    got = ck.max_pool2d_backward(cl(gy), cl(x), ic, **kw, backend=backend)
    assert layout.is_channels_last(got)
    np.testing.assert_allclose(got, want, **tol(dtype))
    if kw.get("dilation", 1) != 1:
        return
    akw = {k: v for k, v in kw.items() if k != "dilation"}
    for cip in (True, False):
        want = ck.avg_pool2d(x, **akw, count_include_pad=cip, backend="reference")
        got = ck.avg_pool2d(cl(x), **akw, count_include_pad=cip, backend=backend)
        assert layout.is_channels_last(got)
        np.testing.assert_allclose(got, want, **tol(dtype))
        want = ck.avg_pool2d_backward(gy, x, **akw, count_include_pad=cip, backend="reference")
        got = ck.avg_pool2d_backward(cl(gy), cl(x), **akw, count_include_pad=cip, backend=backend)
        assert layout.is_channels_last(got)
        np.testing.assert_allclose(got, want, **tol(dtype))


def test_max_pool_backward_rejects_foreign_indices_in_nhwc():
    x = cl(np.random.default_rng(2).standard_normal((1, 3, 4, 4)).astype(np.float32))
    y, i = ck.max_pool2d(x, 2, return_indices=True)
    bad = i.copy()
    bad[0, 1, 0, 0] = 99
    with pytest.raises(ValueError, match="outside its"):
        ck.max_pool2d_backward(np.ones_like(y), x, bad, 2)


def test_depthwise_nan_weight_meeting_padding_is_nan_as_in_torch():
    """The NHWC depthwise loops skip padding taps; a NaN/inf weight there
    must still give NaN (PyTorch multiplies the zeros), so the call goes to
    a kernel that multiplies them."""
    rng = np.random.default_rng(3)
    x = cl(rng.standard_normal((1, 4, 5, 5)).astype(np.float32))
    w = rng.standard_normal((4, 1, 3, 3)).astype(np.float32)
    w[1, 0, 0, 0] = np.inf
    y = ck.conv2d(x, w, padding=1, groups=4)
    want = ck.conv2d(np.ascontiguousarray(x, dtype=np.float64), w.astype(np.float64), padding=1, groups=4,
                     backend="reference")
    np.testing.assert_array_equal(np.isnan(y), np.isnan(want))
    assert np.isnan(y[0, 1, 0, 0]) and layout.is_channels_last(y)


def test_relu_keeps_any_dense_layout():
    rng = np.random.default_rng(4)
    base = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
    for v in (cl(base), base.transpose(1, 0, 3, 2), np.ascontiguousarray(base.transpose(3, 2, 1, 0)).T):
        y = ck.relu(v)
        assert y.strides == v.strides or layout.dense_order(y) == layout.dense_order(v)
        np.testing.assert_array_equal(y, np.maximum(v, 0))
        g = ck.relu_backward(v, v)
        np.testing.assert_array_equal(g, np.where(v > 0, v, 0))


@pytest.mark.parametrize("shape, ws", [((3, 1, 12, 10), (6, 1, 3, 3)), ((5, 4, 1, 1), (6, 4, 1, 1))],
                         ids=["one channel", "1x1 planes"])
def test_an_input_in_both_layouts_takes_the_weights_layout(shape, ws):
    """A one-channel input (or 1x1 planes) is NCHW and NHWC at once: its
    conv's output is channels_last where the weights' strides read so (a
    channels_last model's first conv), NCHW where they are C-contiguous, the
    same values either way."""
    rng = np.random.default_rng(zlib.crc32(repr(shape).encode()))
    x = rng.standard_normal(shape).astype(np.float32)
    w = rng.standard_normal(ws).astype(np.float32)
    # NHWC strides on every axis, size-1 ones included (as a torch tensor made channels_last
    # carries them; NumPy keeps a view's strides where a size-1 axis makes it contiguous already)
    w_cl = np.moveaxis(w, 1, 3).copy().transpose(0, 3, 1, 2)
    assert layout.is_both(x) and layout.prefers_channels_last(w_cl) and not layout.prefers_channels_last(w)
    want = ck.conv2d(x, w, padding=1, backend="reference")
    for weights, channels_last in ((w_cl, True), (w, False)):
        got = ck.conv2d(x, weights, padding=1)
        assert layout.is_channels_last(got) == channels_last and (channels_last or got.flags.c_contiguous)
        np.testing.assert_allclose(got, want, **tol(np.float32))


def test_strides_read_as_pytorch_reads_them():
    """Channels_last by PyTorch's stride rule, which settles size-1
    dimensions by their strides where NumPy's flags ignore them."""
    say = layout.strides_say_channels_last
    assert say((8, 3, 4, 5), (60, 1, 15, 3)) and not say((8, 3, 4, 5), (60, 20, 5, 1))
    assert say((32, 1, 5, 5), (25, 1, 5, 1)) and not say((32, 1, 5, 5), (25, 25, 5, 1))
    assert say((2, 6, 1, 1), (6, 1, 6, 6)) and not say((2, 6, 1, 1), (6, 1, 1, 1))  # N x C x 1 x 1
    assert not say((4, 1, 1, 1), (1, 1, 1, 1)) and not say((2, 3, 4, 5), (60, 0, 15, 3))
    assert not layout.prefers_channels_last(np.zeros((2, 3, 4), np.float32))


def test_layout_detection():
    x = np.zeros((2, 3, 4, 5), np.float32)
    assert not layout.is_channels_last(x)
    assert layout.is_channels_last(cl(x))
    assert not layout.is_channels_last(cl(np.zeros((2, 1, 4, 5), np.float32)))  # both at once: NCHW
    assert not layout.is_channels_last(x[:, :, ::2])
    assert layout.dense_order(cl(x)) == (0, 2, 3, 1)
    assert layout.dense_order(x) is None and layout.dense_order(x[:, :, ::2]) is None


@pytest.mark.parametrize("level", SIMD_LEVELS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_depthwise_3x3_register_blocked_rows_at_every_simd_level(level, dtype):
    """A 3x3 depthwise row's interior takes register-blocked loops: forward
    (blocks of two channel vectors with one-vector tails, the nine weights in
    registers, pixels in chunks sized from L1) and grad weight at stride 1 or
    2, grad input (the forward's loops over grad_output) at stride 1; channel
    counts, widths, paddings and strides here straddle each (144 channels on
    a 40-pixel row cross several chunks)."""
    with at_simd_level(level):
        rng = np.random.default_rng(7)
        for C, (H, W, pad), stride in itertools.product(
                (4, 8, 16, 24, 32, 48, 144),
                ((5, 13, 1), (4, 11, 0), (6, 20, 2), (3, 3, 1), (4, 2, 1), (9, 22, 1), (3, 40, 1)),
                (1, 2, (1, 2), (2, 1))):
            x = rng.standard_normal((2, C, H, W)).astype(dtype)
            w = rng.standard_normal((C, 1, 3, 3)).astype(dtype)
            b = rng.standard_normal(C).astype(dtype)
            g = ck.conv2d_geometry(x.shape, w.shape, (C,), stride=stride, padding=pad, groups=C)
            want = ck.conv2d(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64), stride=stride,
                             padding=pad, groups=C, backend="reference")
            for bias in (b, None):
                plain = cpp.conv2d_forward_nhwc(layout.nhwc(x), w, bias, g)
                ref = want if bias is not None else want - b.astype(np.float64)[None, :, None, None]
                np.testing.assert_allclose(plain.transpose(0, 3, 1, 2), ref, **tol(dtype),
                                           err_msg=f"{level} C={C} {H}x{W} pad {pad} stride {stride}")
            fused = cpp.conv2d_forward_nhwc(layout.nhwc(x), w, b, g, relu=True)
            np.testing.assert_array_equal(fused, np.maximum(cpp.conv2d_forward_nhwc(layout.nhwc(x), w, b, g), 0))
            # backward: grad input is the same loops over grad_output, grad weight its own
            gy = rng.standard_normal(want.shape).astype(dtype)
            wants = ck.conv2d_backward(gy.astype(np.float64), x.astype(np.float64), w.astype(np.float64),
                                       stride=stride, padding=pad, groups=C, backend="reference")
            got = cpp.conv2d_backward_nhwc(layout.nhwc(gy), layout.nhwc(x), w, g)
            for name, o, r in zip(("grad input", "grad weight", "grad bias"), got, wants):
                o = o.transpose(0, 3, 1, 2) if name == "grad input" else o
                np.testing.assert_allclose(o, r, **tol(dtype),
                                           err_msg=f"{level} C={C} {H}x{W} pad {pad} stride {stride} {name}")


@pytest.mark.parametrize("level", SIMD_LEVELS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_tiled_transpose_is_numpys(level, dtype):
    """NCHW <-> NHWC copies: whole tiles, partial ones at both edges, row
    blocks of one tile up to sixteen and a partial last one, one or many
    batches, at 1-3 threads."""
    rng = np.random.default_rng(11)
    for shape in [(1, 3, 5), (2, 17, 33), (3, 300, 19), (1, 1000, 48), (5, 16, 16), (2, 257, 129),
                  (1, 4096, 20), (8, 49, 576)]:
        a = rng.standard_normal(shape).astype(dtype)
        want = np.ascontiguousarray(a.transpose(0, 2, 1))
        with at_simd_level(level):
            for got in at_thread_counts(lambda: cpp._cpu.transpose_batched(a)):
                np.testing.assert_array_equal(got, want, err_msg=f"{level} {shape}")
