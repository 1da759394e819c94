"""convkern.linear (torch.nn.functional.linear) and linear_backward: every
backend against the float64 product and gradients, on few rows (cpp's dot
products) and many (its packed GEMM), any leading shape, with and without
bias; bad shapes name the argument."""

import numpy as np
import pytest

import convkern
from convkern.backend import cpp
from helpers import assert_close, cancelling_tol, ck, randn

# rows either side of cpp's switch from dot products to the packed GEMM (16),
# feature counts off the vector width and its 3-column tiles
SHAPES = [((1, 3136), 128), ((3, 37), 5), ((16, 100), 31), ((17, 100), 31), ((64, 257), 10), ((2, 3, 7, 19), 4),
          ((19,), 6), ((5, 1), 1)]


@pytest.mark.parametrize("xs,out", SHAPES, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
def test_linear_matches_the_float64_product(backend, dtype, rng, xs, out, with_bias):
    x = randn(rng, xs, dtype)
    w = randn(rng, (out, xs[-1]), dtype)
    b = randn(rng, (out,), dtype) if with_bias else None
    want = x.astype(np.float64) @ w.astype(np.float64).T + (0 if b is None else b.astype(np.float64))
    magnitude = np.abs(x.astype(np.float64)) @ np.abs(w.astype(np.float64)).T + (0 if b is None else np.abs(b))
    y = ck.linear(x, w, b, backend=backend)
    assert y.shape == xs[:-1] + (out,)
    assert_close(y, want, dtype, f"linear {xs} -> {out}", tol=cancelling_tol(want, magnitude, dtype))


@pytest.mark.parametrize("xs,out", SHAPES, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_linear_backward_matches_the_float64_gradients(backend, dtype, rng, xs, out):
    x = randn(rng, xs, dtype)
    w = randn(rng, (out, xs[-1]), dtype)
    gy = randn(rng, xs[:-1] + (out,), dtype)
    x64, w64, gy64 = (a.astype(np.float64) for a in (x, w, gy))
    rows, grows = x64.reshape(-1, xs[-1]), gy64.reshape(-1, out)
    want = (gy64 @ w64, grows.T @ rows, grows.sum(axis=0))
    # a few products can sum to almost nothing (5 rows came to 6e-5): rounding is
    # relative to the sums of the terms' magnitudes, so the tolerance widens there
    magnitudes = (np.abs(gy64) @ np.abs(w64), np.abs(grows).T @ np.abs(rows), np.abs(grows).sum(axis=0))
    got = ck.linear_backward(gy, x, w, backend=backend)
    for name, g, r, m in zip(("grad input", "grad weight", "grad bias"), got, want, magnitudes):
        assert_close(g, r, dtype, f"linear {name} {xs} -> {out}", tol=cancelling_tol(r, m, dtype))
    only = ck.linear_backward(gy, x, w, needs=(False, True, False), backend=backend)
    assert only[0] is None and only[2] is None
    assert_close(only[1], want[1], dtype, "grad weight alone", tol=cancelling_tol(want[1], magnitudes[1], dtype))


def test_linear_takes_views_and_is_the_same_at_any_thread_count(rng):
    if not cpp.available()[0]:
        pytest.skip(f"cpp unavailable: {cpp.available()[1]}")
    x = randn(rng, (6, 50), np.float32)[:, ::2]  # a strided view: copied once, as any op does
    w = randn(rng, (40, 25), np.float32)
    before = convkern.get_num_threads()
    try:
        convkern.set_num_threads(1)
        one = convkern.linear(x, w, backend="cpp")
        convkern.set_num_threads(2)
        two = convkern.linear(x, w, backend="cpp")
    finally:
        convkern.set_num_threads(before)
    np.testing.assert_array_equal(one, two)
    assert_close(one, x.astype(np.float64) @ w.astype(np.float64).T, np.float32, "strided input")


@pytest.mark.parametrize("args,match", [
    (((4, 5), (3, 6), None), r"input must be \(\*, 6\)"),
    (((4, 5), (3, 5, 1), None), "weight must be"),
    (((4, 5), (3, 5), (4,)), r"bias must be \(3,\)"),
])
def test_linear_rejects_bad_shapes(args, match):
    xs, ws, bs = args
    with pytest.raises(ValueError, match=match):
        convkern.linear(np.ones(xs, np.float32), np.ones(ws, np.float32),
                        None if bs is None else np.ones(bs, np.float32))


def test_linear_backward_rejects_mismatched_grad_output():
    with pytest.raises(ValueError, match="linear_backward: need input"):
        convkern.linear_backward(np.ones((4, 2), np.float32), np.ones((4, 5), np.float32), np.ones((3, 5), np.float32))


def test_linear_rejects_mixed_dtypes():
    with pytest.raises(TypeError, match="dtype"):
        convkern.linear(np.ones((2, 3), np.float32), np.ones((4, 3), np.float64))
