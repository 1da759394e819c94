"""max_pool2d / avg_pool2d forward and backward on every backend against the
float64 reference, with PyTorch's exact conventions spelled out as tests."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import SIMD_LEVELS, assert_close, at_simd_level, randn, ck

MAX_CASES = {
    "2x2": ((2, 3, 8, 8), dict(kernel_size=2)),
    "3x3_s2_p1": ((2, 3, 9, 10), dict(kernel_size=3, stride=2, padding=1)),
    "stride_gt_kernel": ((1, 2, 11, 13), dict(kernel_size=2, stride=3)),
    "ceil_mode": ((2, 2, 7, 8), dict(kernel_size=2, ceil_mode=True)),
    "ceil_mode_drops_padding_window": ((1, 1, 5, 5), dict(kernel_size=2, stride=2, padding=1, ceil_mode=True)),
    "dilation": ((2, 2, 11, 12), dict(kernel_size=3, stride=1, padding=1, dilation=2)),
    "dilation_empty_window": ((1, 2, 2, 2), dict(kernel_size=2, stride=1, padding=1, dilation=3)),
    "non_square": ((2, 3, 9, 10), dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 0))),
    "one_by_one_image": ((3, 2, 1, 1), dict(kernel_size=1)),
    "whole_plane": ((2, 3, 5, 7), dict(kernel_size=(5, 7))),
    # 2x2/2 rows of whole 16-window vectors plus a tail (the AVX-512 path)
    "2x2_wide_rows": ((2, 3, 6, 70), dict(kernel_size=2)),
    # other windows at column stride 1 or 2, 16 windows a vector (AVX-512):
    # border runs, interior runs and tails, dilation, ceil mode's last window
    "3x3_s2_p1_wide_rows": ((2, 3, 9, 70), dict(kernel_size=3, stride=2, padding=1)),
    "3x3_s1_p1_wide_rows": ((1, 2, 5, 40), dict(kernel_size=3, stride=1, padding=1)),
    "dilated_wide_rows": ((1, 2, 7, 45), dict(kernel_size=3, stride=2, padding=1, dilation=2)),
    "ceil_mode_wide_rows": ((1, 2, 6, 37), dict(kernel_size=3, stride=2, padding=1, ceil_mode=True)),
}

AVG_CASES = {
    "2x2": ((2, 3, 8, 8), dict(kernel_size=2)),
    "3x3_s2_p1": ((2, 3, 9, 10), dict(kernel_size=3, stride=2, padding=1)),
    "exclude_pad": ((2, 3, 9, 10), dict(kernel_size=3, stride=2, padding=1, count_include_pad=False)),
    "divisor_override": ((2, 2, 7, 7), dict(kernel_size=3, padding=1, divisor_override=5)),
    "negative_divisor": ((1, 2, 6, 6), dict(kernel_size=2, divisor_override=-3)),
    # whole 2x2/2 windows with a row and a column no window covers (one-pass backward)
    "2x2_odd_sizes": ((2, 3, 7, 9), dict(kernel_size=2)),
    "2x2_odd_sizes_divisor": ((1, 2, 5, 11), dict(kernel_size=2, divisor_override=3)),
    "2x2_padded_exclude_pad": ((2, 3, 7, 9), dict(kernel_size=2, padding=1, count_include_pad=False)),
    "2x2_stride1_padded_ceil": ((1, 2, 6, 7), dict(kernel_size=2, stride=1, padding=1, ceil_mode=True)),
    "ceil_mode": ((2, 2, 7, 8), dict(kernel_size=2, ceil_mode=True)),
    "ceil_mode_padded": ((1, 2, 6, 7), dict(kernel_size=3, stride=2, padding=1, ceil_mode=True)),
    "ceil_exclude_pad": ((1, 2, 6, 7), dict(kernel_size=3, stride=2, padding=1, ceil_mode=True,
                                           count_include_pad=False)),
    "stride_gt_kernel": ((1, 2, 11, 13), dict(kernel_size=2, stride=3)),
    "non_square": ((2, 3, 9, 10), dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 0))),
    "one_by_one_image": ((3, 2, 1, 1), dict(kernel_size=1)),
}


def check_max(backend, dtype, rng, x, kw):
    ref, ref_ind = ck.max_pool2d(x, **kw, return_indices=True, backend="reference")
    out, ind = ck.max_pool2d(x, **kw, return_indices=True, backend=backend)
    assert_close(out, ref, dtype, f"max_pool2d {x.shape} {kw}")
    # without return_indices a backend may take an index-free kernel (cpp does)
    np.testing.assert_array_equal(ck.max_pool2d(x, **kw, backend=backend), out)
    assert ind.dtype == np.int64 and ind.shape == out.shape
    np.testing.assert_array_equal(ind, ref_ind)
    gy = randn(rng, out.shape, dtype)
    gx = ck.max_pool2d_backward(gy, x, ind, **kw, backend=backend)
    assert_close(gx, ck.max_pool2d_backward(gy, x, ref_ind, **kw, backend="reference"), dtype,
                 f"max_pool2d_backward {x.shape} {kw}")


def check_avg(backend, dtype, rng, x, kw):
    ref = ck.avg_pool2d(x, **kw, backend="reference")
    out = ck.avg_pool2d(x, **kw, backend=backend)
    assert_close(out, ref, dtype, f"avg_pool2d {x.shape} {kw}")
    gy = randn(rng, out.shape, dtype)
    gx = ck.avg_pool2d_backward(gy, x, **kw, backend=backend)
    assert_close(gx, ck.avg_pool2d_backward(gy, x, **kw, backend="reference"), dtype,
                 f"avg_pool2d_backward {x.shape} {kw}")


@pytest.mark.parametrize("case", list(MAX_CASES), ids=list(MAX_CASES))
def test_max_pool_cases(backend, dtype, rng, case):
    shape, kw = MAX_CASES[case]
    check_max(backend, dtype, rng, randn(rng, shape, dtype), kw)


@pytest.mark.parametrize("case", list(AVG_CASES), ids=list(AVG_CASES))
def test_avg_pool_cases(backend, dtype, rng, case):
    shape, kw = AVG_CASES[case]
    check_avg(backend, dtype, rng, randn(rng, shape, dtype), kw)


def test_max_pool_semantics(backend, dtype):
    x = np.array([[[[1, 3, 3, 0],
                    [2, 3, -1, 5],
                    [np.nan, 0, -np.inf, -np.inf],
                    [4, np.nan, -np.inf, -np.inf]]]], dtype=dtype)
    out, ind = ck.max_pool2d(x, 2, return_indices=True, backend=backend)
    # tie (3 at flat 1, 2 and 5): the first wins; NaN wins and the last NaN is
    # reported (PyTorch's CPU rule); an all -inf window keeps its first position
    assert out[0, 0, 0, 0] == 3 and ind[0, 0, 0, 0] == 1
    assert out[0, 0, 0, 1] == 5 and ind[0, 0, 0, 1] == 7
    assert np.isnan(out[0, 0, 1, 0]) and ind[0, 0, 1, 0] == 13
    assert out[0, 0, 1, 1] == -np.inf and ind[0, 0, 1, 1] == 10
    np.testing.assert_array_equal(ck.max_pool2d(x, 2, backend=backend), out)  # the index-free path
    # padding is -inf, never a value: an all-negative border window stays negative
    neg = -np.ones((1, 1, 3, 3), dtype)
    assert ck.max_pool2d(neg, 3, 1, 1, backend=backend).max() == -1


@pytest.mark.parametrize("kw", [dict(kernel_size=2), dict(kernel_size=3, stride=2, padding=1),
                                dict(kernel_size=3, stride=1, padding=1),
                                dict(kernel_size=3, stride=2, padding=1, dilation=2)], ids=str)
def test_max_pool_nan_ties_and_inf_on_wide_rows(backend, dtype, rng, kw):
    """NaN wins, ties keep the first index, all -inf windows their first
    position, in every lane of the vector paths, with and without indices."""
    nan = randn(rng, (2, 2, 7, 66), dtype)
    nan[rng.random(nan.shape) < 0.05] = np.nan
    ties = rng.integers(0, 3, (2, 2, 7, 66)).astype(dtype)
    inf = ties.copy()
    inf[rng.random(inf.shape) < 0.7] = -np.inf
    for x in (nan, ties, inf):
        ref, ref_ind = ck.max_pool2d(x, **kw, return_indices=True, backend="reference")
        out, ind = ck.max_pool2d(x, **kw, return_indices=True, backend=backend)
        np.testing.assert_array_equal(out, ref)
        np.testing.assert_array_equal(ind, ref_ind)
        np.testing.assert_array_equal(ck.max_pool2d(x, **kw, backend=backend), ref)
    assert np.isnan(ck.max_pool2d(nan, **kw, backend="reference")).any()


# Row widths around the vector kernels' sizes (8 and 16 outputs, two 8s at
# once): fewer windows than one vector, exactly one, one plus an overlapping
# last step, whole double steps plus a tail; the odd input widths put the
# last plane's last load at the array's end (stride 2 reads one float past
# the last tap, so that step falls back to scalar).
LEVEL_WIDTHS = (9, 14, 16, 17, 30, 33, 47, 66)
LEVEL_KWS = (dict(kernel_size=2), dict(kernel_size=3, stride=2, padding=1), dict(kernel_size=3, stride=1, padding=1),
             dict(kernel_size=2, stride=1), dict(kernel_size=3, stride=2, padding=1, dilation=2),
             dict(kernel_size=(2, 3), stride=2, padding=(1, 0), ceil_mode=True))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("level", SIMD_LEVELS)
def test_max_pool_every_simd_level(level, channels_last, rng):
    """Each SIMD level's kernels against the float64 reference, values,
    indices and the backward, with NaN, ties and all -inf windows mixed into
    random data; on channels_last data, channel counts around the vector
    widths."""
    import convkern

    def as_layout(a):
        return np.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2) if channels_last else a

    with at_simd_level(level):
        assert convkern.simd_level() == level
        for width in LEVEL_WIDTHS:
            for kw in LEVEL_KWS:
                for dtype in (np.float32, np.float64):
                    channels = 3 + 2 * width % 37 if channels_last else 3
                    x = randn(rng, (2, channels, 7, width), dtype)
                    x[rng.random(x.shape) < 0.02] = np.nan
                    x[:, 1::3] = rng.integers(0, 3, x[:, 1::3].shape)  # ties
                    x[:, 2::3][rng.random(x[:, 2::3].shape) < 0.6] = -np.inf
                    x = as_layout(x)
                    ref, ref_ind = ck.max_pool2d(x, **kw, return_indices=True, backend="reference")
                    out, ind = ck.max_pool2d(x, **kw, return_indices=True, backend="cpp")
                    what = f"{level} {x.shape} {kw} {dtype.__name__}"
                    np.testing.assert_array_equal(out, ref, err_msg=what)
                    np.testing.assert_array_equal(ind, ref_ind, err_msg=what)
                    np.testing.assert_array_equal(ck.max_pool2d(x, **kw, backend="cpp"), ref, err_msg=what)
                    # backward: its own indices, and indices from elsewhere in the
                    # plane (the gather paths must notice and scatter instead)
                    gy = randn(rng, ref.shape, dtype)
                    foreign = rng.integers(0, x.shape[2] * x.shape[3], ref_ind.shape)
                    for indices in (ref_ind, foreign):
                        want = ck.max_pool2d_backward(gy, x, indices, **kw, backend="reference")
                        got = ck.max_pool2d_backward(as_layout(gy), x, as_layout(indices), **kw, backend="cpp")
                        assert_close(got, want, dtype, what + " backward")


def test_avg_pool_divisors(backend, dtype):
    x = np.ones((1, 1, 3, 3), dtype)
    incl = ck.avg_pool2d(x, 3, 1, 1, backend=backend)[0, 0]
    excl = ck.avg_pool2d(x, 3, 1, 1, count_include_pad=False, backend=backend)[0, 0]
    assert incl[0, 0] == pytest.approx(4 / 9) and incl[1, 1] == pytest.approx(1.0)
    np.testing.assert_allclose(excl, np.ones((3, 3)), rtol=1e-6)
    over = ck.avg_pool2d(x, 3, 1, 1, divisor_override=2, backend=backend)[0, 0]
    assert over[1, 1] == pytest.approx(4.5) and over[0, 0] == pytest.approx(2.0)


def test_max_pool_backward_routes_to_argmax_and_accumulates_overlaps(backend, dtype):
    x = np.array([[[[0, 1, 0], [1, 9, 1], [0, 1, 0]]]], dtype=dtype)
    out, ind = ck.max_pool2d(x, 2, 1, return_indices=True, backend=backend)
    assert np.all(ind == 4)
    gy = np.array([[[[1, 2], [3, 4]]]], dtype=dtype)
    gx = ck.max_pool2d_backward(gy, x, ind, 2, 1, backend=backend)
    expected = np.zeros((1, 1, 3, 3), dtype)
    expected[0, 0, 1, 1] = 10
    np.testing.assert_array_equal(gx, expected)


@pytest.mark.parametrize("shape", [(2, 3, 28, 28), (1, 2, 7, 37), (1, 1, 2, 2)])
def test_max_pool_backward_takes_indices_from_elsewhere(backend, dtype, rng, shape):
    """2x2/stride-2 backward with indices that are in the plane but not the
    windows' own (the gather fast path must notice and scatter instead)."""
    x = randn(rng, shape, dtype)
    out, ind = ck.max_pool2d(x, 2, return_indices=True, backend=backend)
    gy = randn(rng, out.shape, dtype)
    for foreign in (np.zeros_like(ind), rng.integers(0, shape[2] * shape[3], ind.shape)):
        want = ck.max_pool2d_backward(gy, x, foreign, 2, backend="reference")
        got = ck.max_pool2d_backward(gy, x, foreign, 2, backend=backend)
        assert_close(got, want, dtype, "foreign indices")
    got = ck.max_pool2d_backward(gy, x, ind, 2, backend=backend)
    assert_close(got, ck.max_pool2d_backward(gy, x, ind, 2, backend="reference"), dtype, "own indices")


def test_unbatched(backend, dtype, rng):
    x = randn(rng, (3, 8, 7), dtype)
    out, ind = ck.max_pool2d(x, 2, return_indices=True, backend=backend)
    assert out.shape == ind.shape == (3, 4, 3)
    gx = ck.max_pool2d_backward(np.ones_like(out), x, ind, 2, backend=backend)
    assert gx.shape == x.shape
    a = ck.avg_pool2d(x, 2, backend=backend)
    assert a.shape == (3, 4, 3)
    assert ck.avg_pool2d_backward(np.ones_like(a), x, 2, backend=backend).shape == x.shape


def test_non_contiguous(backend, dtype, rng):
    base = randn(rng, (2, 3, 14, 16), dtype)
    x = base[:, ::-1, ::2, 1::2]
    check_max(backend, dtype, rng, x, dict(kernel_size=3, stride=2, padding=1))
    check_avg(backend, dtype, rng, x, dict(kernel_size=3, stride=2, padding=1))


def test_max_pool_backward_rejects_out_of_range_indices(backend, dtype, rng):
    x = randn(rng, (1, 2, 4, 4), dtype)
    out, ind = ck.max_pool2d(x, 2, return_indices=True, backend=backend)
    bad = ind.copy()
    bad[0, 1, 0, 0] = 16
    with pytest.raises(ValueError, match="indices"):
        ck.max_pool2d_backward(np.ones_like(out), x, bad, 2, backend=backend)
    bad[0, 1, 0, 0] = -2  # -1 is the "window covered no input" marker
    with pytest.raises(ValueError, match="indices"):
        ck.max_pool2d_backward(np.ones_like(out), x, bad, 2, backend=backend)


@st.composite
def pool_problems(draw, avg):
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    sh, sw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    ph, pw = draw(st.integers(0, kh // 2)), draw(st.integers(0, kw // 2))
    dh, dw = (1, 1) if avg else (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    H = max(1, dh * (kh - 1) + 1 - 2 * ph) + draw(st.integers(0, 8))
    W = max(1, dw * (kw - 1) + 1 - 2 * pw) + draw(st.integers(0, 8))
    kw_ = dict(kernel_size=(kh, kw), stride=(sh, sw), padding=(ph, pw), ceil_mode=draw(st.booleans()))
    if avg:
        kw_["count_include_pad"] = draw(st.booleans())
        kw_["divisor_override"] = draw(st.one_of(st.none(), st.integers(1, 9)))
    else:
        kw_["dilation"] = (dh, dw)
    return (draw(st.integers(1, 3)), draw(st.integers(1, 3)), H, W), kw_, draw(st.integers(0, 2**32 - 1))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(problem=pool_problems(avg=False))
def test_random_max_pool(backend, dtype, problem):
    shape, kw, seed = problem
    rng = np.random.default_rng(seed)
    check_max(backend, dtype, rng, randn(rng, shape, dtype), kw)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(problem=pool_problems(avg=True))
def test_random_avg_pool(backend, dtype, problem):
    shape, kw, seed = problem
    rng = np.random.default_rng(seed)
    check_avg(backend, dtype, rng, randn(rng, shape, dtype), kw)
