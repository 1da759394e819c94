"""The NHWC backward of a 1x1 conv (stride 1, no padding, one group): grad
weight by register tiles that walk the pixels reading grad_output and the
input in place, grad input by the GEMM reading grad_output's rows in place.
Checked against the float64 reference at every SIMD level, on filter counts
that leave every edge tile (MR of 6 and 12: remainders of 1 to 11), channel
counts that leave partial vectors, single pixels and batches of several
reduction chunks; the same bits for any thread count and either weight
layout."""

from __future__ import annotations

import numpy as np
import pytest

import convkern
from convkern import layout
from convkern.backend import cpp
from convkern.geometry import conv2d_geometry
from helpers import SIMD_LEVELS, assert_close, at_simd_level, randn

pytestmark = pytest.mark.skipif(not cpp.available()[0], reason="the cpp backend is not built here")

# (N, C, H, W, K): C channels (partial vectors: 1, 3, 9, 17, 33 at 4, 8 or
# 16 lanes), K filters (tiles of 12 or 6 plus every remainder), pixels from
# one to several chunks of the reduction (256 pixels a chunk at least); K
# leaves each remainder 1-5 of 6 and 1, 2, 3, 5, 9, 10, 11 of 12
SHAPES = [(1, 1, 1, 1, 1), (2, 3, 5, 7, 5), (3, 17, 6, 5, 13), (2, 33, 9, 9, 26), (1, 40, 3, 3, 9),
          (8, 16, 12, 12, 96), (4, 24, 20, 20, 11), (2, 9, 30, 30, 22), (2, 48, 7, 7, 147)]


def _ids(shape):
    return "N{}C{}H{}W{}K{}".format(*shape)


def _problem(rng, shape, dtype):
    N, C, H, W, K = shape
    x, w = randn(rng, (N, C, H, W), dtype), randn(rng, (K, C, 1, 1), dtype)
    gy = randn(rng, (N, K, H, W), dtype)
    return x, w, gy, conv2d_geometry(x.shape, w.shape, None)


def _nhwc(a):
    return layout.nhwc(layout.to_channels_last(a))


def _reference(x, w, gy):
    f64 = np.float64
    return convkern.conv2d_backward(gy.astype(f64), x.astype(f64), w.astype(f64), backend="reference")


@pytest.mark.parametrize("level", SIMD_LEVELS)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_pointwise_nhwc_backward_matches_the_reference(shape, level, dtype, rng):
    x, w, gy, g = _problem(rng, shape, dtype)
    with at_simd_level(level):
        gx, gw, gb = cpp.conv2d_backward_nhwc(_nhwc(gy), _nhwc(x), w, g)
    want = _reference(x, w, gy)
    what = f"{level} {_ids(shape)}"
    assert_close(layout.from_nhwc(gx), want[0], dtype, f"grad input, {what}")
    assert_close(gw, want[1], dtype, f"grad weight, {what}")
    assert_close(gb, want[2], dtype, f"grad bias, {what}")
    # element by element too: one wrong edge element can hide in a norm
    tol = 1e-4 if dtype == np.float32 else 1e-10
    scale = np.sqrt(gy.shape[0] * gy.shape[2] * gy.shape[3])
    np.testing.assert_allclose(gw, want[1], rtol=tol, atol=tol * scale, err_msg=f"grad weight, {what}")
    np.testing.assert_allclose(layout.from_nhwc(gx), want[0], rtol=tol, atol=tol * np.sqrt(shape[4]),
                               err_msg=f"grad input, {what}")


@pytest.mark.parametrize("shape", [SHAPES[5], SHAPES[6], SHAPES[8]], ids=_ids)
def test_pointwise_nhwc_backward_has_the_same_bits_for_any_thread_count_and_weight_layout(shape, rng):
    x, w, gy, g = _problem(rng, shape, np.float32)
    before = convkern.get_num_threads()
    got = []
    try:
        for threads in (1, 2, 3):
            convkern.set_num_threads(threads)
            got.append(cpp.conv2d_backward_nhwc(_nhwc(gy), _nhwc(x), w, g))
        got.append(cpp.conv2d_backward_nhwc(_nhwc(gy), _nhwc(x), layout.to_channels_last(w), g))
    finally:
        convkern.set_num_threads(before)
    for other in got[1:]:
        for name, a, b in zip(("grad input", "grad weight", "grad bias"), other, got[0]):
            np.testing.assert_array_equal(a, b, err_msg=f"{name}, {_ids(shape)}")


def test_a_channels_last_1x1_backward_through_conv2d_backward(rng):
    """convkern.conv2d_backward on channels_last arrays takes the NHWC
    kernels here, each gradient asked for alone or together."""
    x, w, gy, _ = _problem(rng, (4, 24, 10, 10, 40), np.float32)
    want = _reference(x, w, gy)
    for needs in ((True, True, True), (False, True, False), (True, False, False)):
        got = convkern.conv2d_backward(layout.to_channels_last(gy), layout.to_channels_last(x), w, needs=needs)
        for name, n, a, b in zip(("grad input", "grad weight", "grad bias"), needs, got, want):
            if n:
                assert_close(a, b, np.float32, f"{name}, needs {needs}")
            else:
                assert a is None, name
    assert layout.is_channels_last(got[0])
