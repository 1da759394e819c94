"""conv2d_relu and its gradient: relu(conv2d(...)) bit for bit on every
backend and algorithm (NaN included, NCHW and channels_last), gradients
against the float64 reference, and convkern.nn's Sequential fusing Conv2d +
ReLU pairs without changing a value or a gradient."""

from __future__ import annotations

import numpy as np
import pytest

import convkern as ck
from convkern import nn
from convkern.perf.verify import random_conv_case
from helpers import assert_close, randn


def cl(a):
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)


def case_arrays(rng, dtype):
    case = random_conv_case(rng)
    x, w = randn(rng, case.x_shape, dtype), randn(rng, case.w_shape, dtype)
    b = randn(rng, case.w_shape[0], dtype) if case.bias else None
    return case, x, w, b


def runnable(algo, x, w, b, kw, backend):
    try:
        return ck.conv2d(x, w, b, **kw, algo=algo, backend=backend)
    except ValueError as e:  # a named algorithm refuses problems it cannot run, saying why
        if algo == "auto":
            raise
        assert algo in str(e) or "needs" in str(e), e
        return None


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_conv2d_relu_is_relu_of_conv2d_bit_for_bit(backend, dtype, rng, channels_last):
    for _ in range(6):
        case, x, w, b = case_arrays(rng, dtype)
        x.flat[rng.integers(0, x.size)] = np.nan  # NaN reaches some outputs and must stay NaN
        if channels_last:
            x = cl(x)
        kw = case.kwargs()
        for algo in ck.algorithms(backend):
            plain = runnable(algo, x, w, b, kw, backend)
            if plain is None:
                continue
            fused = ck.conv2d_relu(x, w, b, **kw, algo=algo, backend=backend)
            want = ck.relu(plain, backend=backend)
            assert fused.shape == want.shape and fused.dtype == want.dtype
            np.testing.assert_array_equal(fused, want, err_msg=f"{algo} {case}")
            assert np.isnan(fused).any() == np.isnan(plain).any()
            assert fused.strides == plain.strides, f"{algo} {case}: the memory format of conv2d's output"


def test_conv2d_relu_against_the_reference(backend, dtype, rng):
    for _ in range(4):
        case, x, w, b = case_arrays(rng, dtype)
        want = np.maximum(ck.conv2d(x.astype(np.float64), w.astype(np.float64),
                                    None if b is None else b.astype(np.float64), **case.kwargs(),
                                    backend="reference"), 0)
        assert_close(ck.conv2d_relu(x, w, b, **case.kwargs(), backend=backend), want, dtype, f"{case}")


def test_conv2d_relu_backward_against_the_reference(backend, dtype, rng):
    for _ in range(4):
        case, x, w, b = case_arrays(rng, dtype)
        kw = case.kwargs()
        y = ck.conv2d_relu(x, w, b, **kw, backend=backend)
        gy = randn(rng, y.shape, dtype)
        got = ck.conv2d_relu_backward(gy, x, w, y, **kw, backend=backend)
        # the oracle: relu's mask from this backend's own output (a value
        # within rounding of 0 may fall either side), the rest in float64
        g_pre = np.where(y > 0, gy, 0).astype(np.float64)
        want = ck.conv2d_backward(g_pre, x.astype(np.float64), w.astype(np.float64), **kw, backend="reference")
        for name, a, e in zip(("grad_input", "grad_weight", "grad_bias"), got, want):
            assert_close(a, e, dtype, f"{name} {case}")


def test_conv2d_relu_backward_gives_only_what_is_asked(rng):
    x, w = randn(rng, (2, 3, 6, 6), np.float64), randn(rng, (4, 3, 3, 3), np.float64)
    y = ck.conv2d_relu(x, w, padding=1)
    gx, gw, gb = ck.conv2d_relu_backward(np.ones_like(y), x, w, y, padding=1, needs=(False, True, False))
    assert gx is None and gb is None and gw.shape == w.shape


def test_conv2d_relu_backward_refuses_an_output_of_another_shape(rng):
    x, w = randn(rng, (2, 3, 6, 6), np.float32), randn(rng, (4, 3, 3, 3), np.float32)
    y = ck.conv2d_relu(x, w)
    with pytest.raises(ValueError, match=r"output shape \(2, 4, 4, 4\) differs from grad_output shape"):
        ck.conv2d_relu_backward(np.ones((2, 4, 4, 3), np.float32), x, w, y)


def net(dtype, conv=nn.Conv2d):
    return nn.Sequential(conv(3, 6, 3, padding=1, dtype=dtype, rng=1), nn.ReLU(), nn.MaxPool2d(2),
                         conv(6, 5, 3, dtype=dtype, rng=2), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 2 * 2, 3,
                                                                                             dtype=dtype, rng=3))


def one_by_one(model, x, gy):
    """The same modules run in turn: forward, then backward in reverse."""
    mods = list(model)
    for m in mods:
        x = m.forward(x)
    g = gy
    for m in reversed(mods):
        g = m.backward(g)
    return x, g


def test_nn_sequential_fuses_conv_relu_pairs_without_changing_anything(dtype, rng):
    x = randn(rng, (3, 3, 8, 8), dtype)
    fused_model, plain_model = net(dtype), net(dtype)
    y = fused_model.forward(x)
    assert fused_model._fused == (0, 3)
    gy = randn(rng, y.shape, dtype)
    gx = fused_model.backward(gy)
    y_plain, gx_plain = one_by_one(plain_model, x, gy)
    np.testing.assert_array_equal(y, y_plain)
    np.testing.assert_array_equal(gx, gx_plain)
    for p, q in zip(fused_model.parameters(), plain_model.parameters()):
        np.testing.assert_array_equal(p.grad, q.grad)
    fused_model.eval()
    fused_model.forward(x)
    assert fused_model[0]._x is None and fused_model[0]._y is None, "eval keeps nothing for backward"


def test_nn_sequential_leaves_a_conv_subclass_unfused(rng):
    class Scaled(nn.Conv2d):
        def forward(self, x):
            return super().forward(x) * 2

    model = net(np.float64, conv=Scaled)
    x = randn(rng, (2, 3, 8, 8), np.float64)
    y = model.forward(x)
    assert model._fused == ()
    assert np.all(y == one_by_one(net(np.float64, conv=Scaled), x, np.ones_like(y))[0])
