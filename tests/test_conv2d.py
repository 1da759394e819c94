"""conv2d forward and backward on every backend and algorithm against the
float64 reference: random shapes (hypothesis) and the awkward cases by name."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import convkern
from convkern import backend as backends
from helpers import assert_close, cancelling_tol, randn, ck

# "implicit" (the cuda backend's implicit GEMM) is offered by some backends only;
# the others must refuse it with a ValueError that says so
ALGOS = ["direct", "im2col", "implicit", "auto"]


def offers(backend: str, algo: str) -> bool:
    return algo in ("direct", "im2col", "auto") or algo in getattr(backends.get(backend), "ALGOS", ())


def check_conv(backend, algo, dtype, rng, x_shape, w_shape, bias=True, make_view=None, **kw):
    x = randn(rng, x_shape, dtype)
    w = randn(rng, w_shape, dtype)
    if not offers(backend, algo):
        with pytest.raises(ValueError, match=f"algo '{algo}' is not offered by backend '{backend}'"):
            ck.conv2d(x, w, **kw, algo=algo, backend=backend)
        with pytest.raises(ValueError, match="not offered"):
            ck.conv2d_backward(randn(rng, ck.conv2d(x, w, **kw, backend=backend).shape, dtype), x, w, **kw,
                               algo=algo, backend=backend)
        return
    b = randn(rng, (w_shape[0],), dtype) if bias else None
    if make_view is not None:
        x = make_view(x)
    ref = ck.conv2d(x, w, b, **kw, backend="reference")
    out = ck.conv2d(x, w, b, **kw, algo=algo, backend=backend)
    ax, aw = np.abs(x), np.abs(w)
    magnitude = ck.conv2d(ax, aw, None if b is None else np.abs(b), **kw, backend="reference")
    assert_close(out, ref, dtype, f"forward {x.shape} {w_shape} {kw}", tol=cancelling_tol(ref, magnitude, dtype))
    gy = randn(rng, ref.shape, dtype)
    got = ck.conv2d_backward(gy, x, w, **kw, algo=algo, backend=backend)
    want = ck.conv2d_backward(gy, x, w, **kw, backend="reference")
    magnitudes = ck.conv2d_backward(np.abs(gy), ax, aw, **kw, backend="reference")
    for name, o, r, m in zip(("grad_input", "grad_weight", "grad_bias"), got, want, magnitudes):
        assert_close(o, r, dtype, f"{name} {x.shape} {w_shape} {kw}", tol=cancelling_tol(r, m, dtype))
    assert got[0].shape == x.shape and got[1].shape == w.shape


AWKWARD = {
    "plain_3x3": ((2, 3, 8, 8), (4, 3, 3, 3), dict(padding=1)),
    "stride_gt_kernel": ((2, 3, 13, 11), (5, 3, 2, 2), dict(stride=3)),
    "stride_per_axis": ((1, 2, 12, 9), (3, 2, 3, 2), dict(stride=(2, 3), padding=(1, 0))),
    "dilation": ((2, 4, 15, 14), (3, 4, 3, 3), dict(dilation=2, padding=2)),
    "dilation_per_axis": ((1, 3, 16, 11), (2, 3, 3, 2), dict(dilation=(3, 1), padding=(0, 1))),
    "groups": ((2, 6, 9, 9), (9, 2, 3, 3), dict(groups=3, padding=1)),
    "depthwise": ((2, 5, 11, 10), (5, 1, 3, 3), dict(groups=5, padding=1)),
    "depthwise_multiplier": ((1, 4, 7, 9), (8, 1, 5, 3), dict(groups=4, padding=(2, 1))),
    "one_by_one_image": ((3, 4, 1, 1), (6, 4, 1, 1), {}),
    "one_by_one_image_padded": ((2, 3, 1, 1), (2, 3, 3, 3), dict(padding=1)),
    "pointwise": ((2, 16, 7, 5), (8, 16, 1, 1), {}),
    "pointwise_strided": ((2, 8, 9, 7), (4, 8, 1, 1), dict(stride=2)),
    "batch_1_prime_sizes": ((1, 7, 13, 17), (11, 7, 5, 3), dict(padding=(2, 1))),
    "non_square_kernel": ((2, 3, 10, 12), (4, 3, 1, 5), dict(padding=(0, 2))),
    "asymmetric_padding": ((2, 3, 9, 10), (4, 3, 3, 3), dict(padding=(0, 3))),
    "same_odd_kernel": ((2, 3, 9, 8), (4, 3, 3, 5), dict(padding="same")),
    "same_even_kernel": ((2, 3, 9, 8), (4, 3, 4, 2), dict(padding="same")),
    "same_dilated": ((1, 2, 10, 9), (3, 2, 2, 3), dict(padding="same", dilation=(3, 2))),
    "valid": ((2, 3, 9, 8), (4, 3, 3, 5), dict(padding="valid")),
    "padding_larger_than_kernel": ((1, 2, 4, 5), (3, 2, 2, 2), dict(padding=3)),
    # taps whose first in-bounds output would lie past the output row
    "padding_past_dilated_taps": ((2, 3, 1, 1), (4, 3, 1, 3), dict(dilation=2, padding=(0, 2))),
    "padding_past_dilated_taps_strided": ((1, 2, 3, 1), (2, 2, 1, 3), dict(dilation=(1, 2), padding=(0, 2),
                                                                          stride=(1, 3))),
    "padding_past_dilated_taps_wide_reduction": ((1, 40, 1, 1), (5, 40, 3, 3), dict(dilation=2, padding=2)),
    "kernel_equals_input": ((2, 3, 5, 4), (7, 3, 5, 4), {}),
    "gemm_tile_edges": ((2, 5, 9, 7), (13, 5, 3, 3), dict(padding=1)),
    "wide_output": ((1, 3, 4, 70), (2, 3, 3, 3), dict(padding=1)),
    # the direct kernel's vector tiles (8/4/2/1 output channels, overlapping last tile)
    "wide_8_channels": ((2, 3, 5, 41), (16, 3, 3, 3), dict(padding=1)),
    "wide_4_channels_dilated": ((1, 2, 6, 45), (4, 2, 3, 3), dict(padding=(1, 2), dilation=(1, 2))),
    "wide_depthwise": ((2, 4, 5, 60), (4, 1, 3, 3), dict(groups=4, padding=1)),
    "wide_odd_channels": ((1, 2, 3, 77), (3, 2, 1, 4), dict(padding=(0, 3))),
    # im2col builds its column matrix in bands of output rows sized for L2
    "im2col_several_bands": ((2, 64, 20, 64), (4, 64, 3, 3), dict(padding=1)),
    "im2col_bands_strided": ((1, 96, 41, 40), (6, 48, 3, 3), dict(padding=1, stride=(2, 1), groups=2)),
    # stride-1 convs with a reduction of 32 or more take the shifted implicit
    # GEMM (csrc/conv2d_shifted.hpp): padded planes, wrapped positions dropped
    "shifted_plain": ((2, 8, 9, 11), (13, 8, 3, 3), dict(padding=1)),
    "shifted_same_even_kernel": ((2, 8, 9, 8), (5, 8, 4, 2), dict(padding="same")),
    "shifted_dilated": ((1, 6, 15, 13), (7, 6, 3, 3), dict(dilation=(2, 3), padding=(2, 1))),
    "shifted_groups": ((2, 12, 9, 10), (9, 4, 3, 3), dict(groups=3, padding=1)),
    "shifted_valid": ((2, 8, 10, 9), (4, 8, 3, 5), {}),
    "shifted_1x1_image": ((2, 8, 1, 1), (3, 8, 3, 3), dict(padding=1)),
    "shifted_padding_larger_than_kernel": ((1, 16, 4, 5), (3, 16, 2, 2), dict(padding=3)),
    "shifted_padded_1x1_kernel": ((2, 40, 5, 6), (3, 40, 1, 1), dict(padding=(1, 2))),
    "shifted_several_kc_blocks": ((1, 70, 6, 7), (14, 70, 3, 3), dict(padding=1)),
    "shifted_wide": ((1, 8, 3, 70), (4, 8, 3, 3), dict(padding=1)),
    # strided: the same over the phase planes (rows, columns = tap * dilation mod stride)
    "shifted_stride_2_stem_like": ((2, 3, 23, 21), (8, 3, 7, 7), dict(stride=2, padding=3)),
    # one reduction block: tiles stored straight into y, over several bands of rows
    "shifted_stem_several_bands": ((1, 3, 60, 230), (64, 3, 7, 7), dict(stride=2, padding=3)),
    "shifted_stride_per_axis_dilated": ((1, 8, 17, 19), (5, 8, 3, 3), dict(stride=(2, 3), dilation=(2, 1),
                                                                             padding=(1, 2))),
    "shifted_stride_gt_kernel": ((2, 16, 13, 11), (5, 16, 2, 2), dict(stride=3)),
    "shifted_pointwise_strided": ((2, 40, 9, 7), (6, 40, 1, 1), dict(stride=2)),
    "shifted_strided_groups": ((1, 24, 11, 12), (6, 12, 3, 3), dict(stride=2, padding=1, groups=2)),
    "shifted_strided_even_kernel_asymmetric": ((2, 8, 10, 9), (4, 8, 4, 4), dict(stride=2, padding=(0, 3))),
    "shifted_stride_equals_dilation": ((1, 8, 15, 14), (3, 8, 3, 3), dict(stride=2, dilation=2, padding=2)),
    "shifted_stride_3_dilation_2": ((1, 8, 20, 19), (4, 8, 3, 3), dict(stride=3, dilation=2)),
    "shifted_strided_1x1_image": ((2, 8, 1, 1), (3, 8, 3, 3), dict(stride=2, padding=1)),
    # output rows in L2-sized bands (64 channels x 130 padded columns: 3-7 rows a band)
    "shifted_bands": ((1, 8, 9, 128), (64, 8, 3, 3), dict(padding=1)),
    "shifted_bands_strided": ((1, 3, 15, 260), (64, 3, 7, 7), dict(stride=2, padding=3)),
    # depthwise stride 1 copies each plane into a padded L1 buffer (conv2d_direct.hpp)
    "depthwise_same_even_dilated": ((2, 6, 9, 21), (6, 1, 4, 3), dict(groups=6, padding="same", dilation=(1, 2))),
    "depthwise_valid_multiplier": ((1, 3, 5, 40), (6, 1, 3, 3), dict(groups=3)),
    "depthwise_1x1_image": ((2, 4, 1, 1), (4, 1, 3, 3), dict(groups=4, padding=1)),
    "depthwise_padding_larger_than_kernel": ((1, 3, 4, 37), (3, 1, 2, 2), dict(groups=3, padding=3)),
    # depthwise grad weight: padded per-image planes, a pass per filter row (S = 3, 5, 7; R <= 8)
    "depthwise_5x5_dilated": ((2, 5, 17, 23), (5, 1, 5, 5), dict(groups=5, padding=4, dilation=2)),
    "depthwise_7x7_asymmetric_padding": ((1, 3, 12, 19), (3, 1, 7, 7), dict(groups=3, padding=(3, 1))),
    "depthwise_tall_9x3": ((1, 2, 20, 9), (2, 1, 9, 3), dict(groups=2, padding=(4, 0))),
    # stride-1 grad input with >= 16 channels per group runs as a forward conv
    # of grad_output with the flipped, transposed filters (conv2d_im2col.hpp)
    "grad_as_forward_same_even_kernel": ((2, 16, 9, 8), (5, 16, 4, 2), dict(padding="same")),
    "grad_as_forward_dilated_groups": ((1, 32, 12, 11), (8, 16, 3, 3), dict(dilation=2, padding=2, groups=2)),
    "grad_as_forward_valid": ((2, 16, 10, 9), (6, 16, 3, 5), {}),
    "shifted_batch_1_prime_sizes": ((1, 7, 13, 17), (29, 7, 5, 3), dict(padding=(2, 1))),
}


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("case", list(AWKWARD), ids=list(AWKWARD))
def test_awkward_shapes(backend, algo, dtype, rng, case):
    x_shape, w_shape, kw = AWKWARD[case]
    check_conv(backend, algo, dtype, rng, x_shape, w_shape, **kw)


# 3x3 stride-1 layers with C*K >= 8192 (>= 4096 below AVX-512) and >= 256 2x2
# tiles run Winograd F(2x2, 3x3) in the cpp backend's GEMM algorithm
# (conv2d_winograd.hpp); odd
# sizes give partial edge tiles. Larger than the awkward cases, so checked on
# the GEMM algorithm only.
WINOGRAD = {
    "odd_sizes": ((2, 64, 29, 33), (128, 64, 3, 3), dict(padding=1)),
    "valid": ((2, 128, 33, 31), (64, 128, 3, 3), {}),
    "wide_padding": ((2, 64, 25, 27), (128, 64, 3, 3), dict(padding=2)),
    "padding_per_axis": ((2, 96, 31, 32), (96, 96, 3, 3), dict(padding=(1, 0))),
    "ck_4096_below_avx512": ((2, 64, 23, 24), (64, 64, 3, 3), dict(padding=1)),
}


@pytest.mark.parametrize("case", list(WINOGRAD), ids=list(WINOGRAD))
def test_winograd_shapes(backend, dtype, rng, case):
    x_shape, w_shape, kw = WINOGRAD[case]
    check_conv(backend, "im2col", dtype, rng, x_shape, w_shape, **kw)


@pytest.mark.parametrize("algo", ALGOS)
def test_no_bias(backend, algo, dtype, rng):
    check_conv(backend, algo, dtype, rng, (2, 3, 7, 7), (4, 3, 3, 3), bias=False, padding=1)


VIEWS = {
    "sliced": lambda a: a[:, :, 1:-1:2, ::3],
    "transposed_hw": lambda a: a.transpose(0, 1, 3, 2),
    "channels_last_view": lambda a: np.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2),
    "negative_strides": lambda a: a[::-1, :, ::-1, :],
    "fortran_order": lambda a: np.asfortranarray(a),
}


@pytest.mark.parametrize("view", list(VIEWS), ids=list(VIEWS))
@pytest.mark.parametrize("algo", ["direct", "im2col", "implicit"])
def test_non_contiguous_input(backend, algo, dtype, rng, view):
    check_conv(backend, algo, dtype, rng, (2, 3, 12, 13), (4, 3, 3, 2), make_view=VIEWS[view], padding=1)


def test_non_contiguous_weight_and_grad(backend, dtype, rng):
    x = randn(rng, (2, 3, 8, 9), dtype)
    w = randn(rng, (3, 4, 3, 3), dtype).transpose(1, 0, 2, 3)  # (4, 3, 3, 3) view
    ref = ck.conv2d(x, np.ascontiguousarray(w), padding=1, backend="reference")
    assert_close(ck.conv2d(x, w, padding=1, backend=backend), ref, dtype, "strided weight")
    gy = randn(rng, ref.shape[::-1], dtype).transpose(3, 2, 1, 0)
    got = ck.conv2d_backward(gy, x, w, padding=1, backend=backend)
    want = ck.conv2d_backward(np.ascontiguousarray(gy), x, np.ascontiguousarray(w), padding=1,
                                    backend="reference")
    for o, r in zip(got, want):
        assert_close(o, r, dtype, "strided grad_output")


def test_unbatched_input(backend, dtype, rng):
    x = randn(rng, (3, 9, 8), dtype)
    w = randn(rng, (5, 3, 3, 3), dtype)
    out = ck.conv2d(x, w, padding=1, backend=backend)
    assert out.shape == (5, 9, 8)
    assert_close(out, ck.conv2d(x[None], w, padding=1, backend="reference")[0], dtype, "unbatched")
    gy = randn(rng, out.shape, dtype)
    gx, gw, gb = ck.conv2d_backward(gy, x, w, padding=1, backend=backend)
    assert gx.shape == x.shape
    want = ck.conv2d_backward(gy[None], x[None], w, padding=1, backend="reference")
    assert_close(gx, want[0][0], dtype, "unbatched grad_input")
    assert_close(gw, want[1], dtype, "unbatched grad_weight")


@pytest.mark.parametrize("needs", [(True, False, False), (False, True, False), (False, False, True),
                                   (False, False, False), (True, False, True)])
@pytest.mark.parametrize("algo", ["direct", "im2col", "implicit"])
def test_backward_computes_only_what_is_needed(backend, algo, rng, needs):
    x = randn(rng, (2, 3, 6, 6), np.float64)
    w = randn(rng, (4, 3, 3, 3), np.float64)
    gy = randn(rng, (2, 4, 6, 6), np.float64)
    if not offers(backend, algo) and any(needs):
        with pytest.raises(ValueError, match="not offered"):
            ck.conv2d_backward(gy, x, w, padding=1, needs=needs, algo=algo, backend=backend)
        return
    got = ck.conv2d_backward(gy, x, w, padding=1, needs=needs, algo=algo, backend=backend)
    full = ck.conv2d_backward(gy, x, w, padding=1, backend="reference")
    for need, o, r in zip(needs, got, full):
        if need:
            assert_close(o, r, np.float64)
        else:
            assert o is None


def test_non_finite_input_on_a_winograd_shape(backend, dtype, rng):
    """Winograd's transforms subtract inputs (inf - inf = NaN where the direct sum
    gives inf): with non-finite data the cpp backend takes another algorithm, and
    every backend matches the reference's inf/NaN pattern."""
    x = randn(rng, (2, 64, 29, 33), dtype)
    w = randn(rng, (128, 64, 3, 3), dtype)
    x[0, 3, 10, 10], x[1, 5, 0, 0], x[1, 7, 20, 20] = np.inf, -np.inf, np.nan
    ref = ck.conv2d(x, w, padding=1, backend="reference")
    out = ck.conv2d(x, w, padding=1, backend=backend)
    np.testing.assert_array_equal(np.isnan(out), np.isnan(ref))
    np.testing.assert_array_equal(np.isposinf(out), np.isposinf(ref))
    np.testing.assert_array_equal(np.isneginf(out), np.isneginf(ref))
    finite = np.isfinite(ref)
    assert (~finite).any() and finite.any()
    assert_close(np.where(finite, out, 0), np.where(finite, ref, 0), dtype, "finite part")


def test_empty_batch(backend, dtype, rng):
    x = np.empty((0, 3, 8, 8), dtype)
    w = randn(rng, (4, 3, 3, 3), dtype)
    y = ck.conv2d(x, w, padding=1, backend=backend)
    assert y.shape == (0, 4, 8, 8) and y.dtype == dtype
    gx, gw, gb = ck.conv2d_backward(np.empty((0, 4, 8, 8), dtype), x, w, padding=1, backend=backend)
    assert gx.shape == x.shape and np.all(gw == 0) and np.all(gb == 0)


@st.composite
def conv_problems(draw):
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    depthwise = draw(st.booleans()) and draw(st.booleans())
    cg = 1 if depthwise else draw(st.integers(1, 4))
    kg = draw(st.integers(1, 4))
    R, S = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    dh, dw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    sh, sw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    ph, pw = draw(st.integers(0, 3)), draw(st.integers(0, 3))
    H = max(1, dh * (R - 1) + 1 - 2 * ph) + draw(st.integers(0, 9))
    W = max(1, dw * (S - 1) + 1 - 2 * pw) + draw(st.integers(0, 9))
    N = draw(st.integers(1, 3))
    return ((N, cg * groups, H, W), (kg * groups, cg, R, S),
            dict(stride=(sh, sw), padding=(ph, pw), dilation=(dh, dw), groups=groups),
            draw(st.booleans()), draw(st.integers(0, 2**32 - 1)))


@pytest.mark.parametrize("algo", ["direct", "im2col", "implicit"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(problem=conv_problems())
def test_random_problems(backend, algo, dtype, problem):
    x_shape, w_shape, kw, bias, seed = problem
    check_conv(backend, algo, dtype, np.random.default_rng(seed), x_shape, w_shape, bias=bias, **kw)


def test_seed_worked_example(backend):
    """The teaching text's example: a 6x6 image, the 1/-1 3x3 filter, and the
    feature map 155/-155/310 it derives by hand, then ReLU."""
    image = np.array([[255, 255, 255, 255, 255, 255],
                      [255, 255, 100, 255, 255, 255],
                      [255, 100, 100, 100, 255, 255],
                      [100, 100, 100, 100, 100, 255],
                      [255, 255, 255, 255, 255, 255],
                      [255, 255, 255, 255, 255, 255]], dtype=np.float32)
    kernel = np.array([[1, -1, 1], [-1, 0, -1], [1, -1, 1]], dtype=np.float32)
    feature_map = np.array([[155, -155, 155, -155],
                            [-155, 310, -155, 155],
                            [310, 155, 310, 0],
                            [-155, -155, -155, 0]], dtype=np.float32)
    for algo in ("direct", "im2col"):
        out = ck.conv2d(image[None, None], kernel[None, None], algo=algo, backend=backend)
        np.testing.assert_array_equal(out[0, 0], feature_map)
        # the text pads the 4x4 map back to 6x6 with zeros, then applies ReLU
        padded = ck.conv2d(image[None], kernel[None, None], padding=1, algo=algo, backend=backend)[0]
        np.testing.assert_array_equal(padded[1:-1, 1:-1], feature_map)
        activated = ck.relu(np.pad(out[0, 0], 1), backend=backend)
        np.testing.assert_array_equal(activated, np.pad(np.maximum(feature_map, 0), 1))
        assert activated[2, 2] == 310 and activated[1, 2] == 0


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NumPy's matmul seeing the NaN
@pytest.mark.parametrize("algo", ["direct", "im2col", "auto"])
def test_nonfinite_weights_and_gradients_meet_padding_as_in_torch(backend, algo, rng):
    """0 * NaN and 0 * inf are NaN: where a NaN/inf weight (forward) or
    gradient (grad weight) meets the zero padding, the result is NaN there, as
    with PyTorch's padded input, whatever the backend and algorithm."""
    x = randn(rng, (2, 3, 6, 7), np.float64)
    w = randn(rng, (4, 3, 3, 3), np.float64)
    w[1, 2, 0, 0], w[3, 0, 2, 1] = np.nan, np.inf
    kw = dict(padding=1)
    out = ck.conv2d(x, w, **kw, algo=algo, backend=backend)
    ref = ck.conv2d(x, w, **kw, backend="reference")
    np.testing.assert_array_equal(np.isnan(out), np.isnan(ref))
    assert np.isnan(ref[:, 3]).any()  # the inf tap on the bottom padding
    gy = randn(rng, ref.shape, np.float64)
    gy[0, 2, 0, 0], gy[1, 0, -1, -1] = np.inf, np.nan
    finite_w = randn(rng, w.shape, np.float64)
    _, gw, _ = ck.conv2d_backward(gy, x, finite_w, **kw, needs=(False, True, False), algo=algo, backend=backend)
    _, gw_ref, _ = ck.conv2d_backward(gy, x, finite_w, **kw, needs=(False, True, False), backend="reference")
    np.testing.assert_array_equal(np.isnan(gw), np.isnan(gw_ref))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("algo", ["auto", "depthwise"])
def test_direct_and_depthwise_loops_keep_torchs_nan_pattern_at_padding(backend, algo, rng):
    """A one-channel 3x3 conv is too small for a GEMM: "auto" takes cpp's
    depthwise or direct loops there, whose grad weight skips padding, so a
    NaN/inf weight or gradient must still reach the padded positions as in
    PyTorch (named or chosen by the rule)."""
    if algo not in convkern.algorithms(backend):
        pytest.skip(f"backend {backend} has no {algo!r} algorithm")
    x = randn(rng, (2, 1, 6, 7), np.float64)
    w = randn(rng, (4, 1, 3, 3), np.float64)
    w[1, 0, 0, 0], w[3, 0, 2, 1] = np.nan, np.inf
    out = ck.conv2d(x, w, padding=1, algo=algo, backend=backend)
    ref = ck.conv2d(x, w, padding=1, backend="reference")
    np.testing.assert_array_equal(np.isnan(out), np.isnan(ref))
    assert np.isnan(ref[:, 3]).any()
    gy = randn(rng, ref.shape, np.float64)
    gy[0, 2, 0, 0] = np.inf
    finite_w = randn(rng, w.shape, np.float64)
    _, gw, _ = ck.conv2d_backward(gy, x, finite_w, padding=1, needs=(False, True, False), algo=algo,
                                  backend=backend)
    _, gw_ref, _ = ck.conv2d_backward(gy, x, finite_w, padding=1, needs=(False, True, False), backend="reference")
    np.testing.assert_array_equal(np.isnan(gw), np.isnan(gw_ref))
