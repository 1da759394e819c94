"""Backward passes against float64 finite differences of the forward passes,
on every backend: the gradients are checked without trusting any backward."""

import numpy as np
import pytest

from helpers import ck, numeric_grad


def check_grad(analytic, numeric, what):
    err = np.linalg.norm(analytic - numeric) / max(np.linalg.norm(numeric), 1e-12)
    assert err < 1e-7, f"{what}: finite-difference mismatch, relative error {err:.3g}"


CONV = [
    ((2, 4, 6, 5), (6, 2, 3, 2), dict(stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2)),
    ((1, 3, 5, 5), (2, 3, 3, 3), dict(padding="same")),
    ((1, 3, 4, 6), (3, 1, 3, 3), dict(padding=1, groups=3, stride=2)),
]


@pytest.mark.parametrize("algo", ["direct", "im2col"])
@pytest.mark.parametrize("case", range(len(CONV)))
def test_conv2d_gradients(backend, algo, rng, case):
    x_shape, w_shape, kw = CONV[case]
    x = rng.standard_normal(x_shape)
    w = rng.standard_normal(w_shape)
    b = rng.standard_normal(w_shape[0])
    probe = rng.standard_normal(ck.conv2d(x, w, b, **kw, backend="reference").shape)

    def loss(x_, w_, b_):
        return float(np.sum(ck.conv2d(x_, w_, b_, **kw, algo=algo, backend=backend) * probe))

    gx, gw, gb = ck.conv2d_backward(probe, x, w, **kw, algo=algo, backend=backend)
    check_grad(gx, numeric_grad(lambda v: loss(v, w, b), x.copy()), "grad_input")
    check_grad(gw, numeric_grad(lambda v: loss(x, v, b), w.copy()), "grad_weight")
    check_grad(gb, numeric_grad(lambda v: loss(x, w, v), b.copy()), "grad_bias")


def distinct_values(rng, shape):
    """Values at least 1e-3 apart so no max-pool tie flips under a 1e-6 nudge."""
    n = int(np.prod(shape))
    return rng.permutation(n).reshape(shape) * 1e-3 - n * 5e-4


@pytest.mark.parametrize("kw", [dict(kernel_size=2), dict(kernel_size=3, stride=2, padding=1, ceil_mode=True),
                                dict(kernel_size=(2, 3), stride=1, dilation=(2, 1))])
def test_max_pool2d_gradient(backend, rng, kw):
    x = distinct_values(rng, (2, 2, 6, 7))
    out, ind = ck.max_pool2d(x, **kw, return_indices=True, backend=backend)
    probe = rng.standard_normal(out.shape)
    gx = ck.max_pool2d_backward(probe, x, ind, **kw, backend=backend)
    num = numeric_grad(lambda v: float(np.sum(ck.max_pool2d(v, **kw, backend=backend) * probe)), x.copy())
    check_grad(gx, num, "max_pool2d")


@pytest.mark.parametrize("kw", [dict(kernel_size=2), dict(kernel_size=3, stride=2, padding=1, ceil_mode=True),
                                dict(kernel_size=3, padding=1, count_include_pad=False, stride=1),
                                dict(kernel_size=(3, 2), divisor_override=4)])
def test_avg_pool2d_gradient(backend, rng, kw):
    x = rng.standard_normal((2, 2, 6, 7))
    out = ck.avg_pool2d(x, **kw, backend=backend)
    probe = rng.standard_normal(out.shape)
    gx = ck.avg_pool2d_backward(probe, x, **kw, backend=backend)
    num = numeric_grad(lambda v: float(np.sum(ck.avg_pool2d(v, **kw, backend=backend) * probe)), x.copy())
    check_grad(gx, num, "avg_pool2d")


def test_relu_gradient_away_from_the_kink(backend, rng):
    x = rng.standard_normal((3, 4, 5))
    x[np.abs(x) < 1e-3] = 0.5  # the kink has no derivative; stay clear of it
    probe = rng.standard_normal(x.shape)
    gx = ck.relu_backward(probe, x, backend=backend)
    num = numeric_grad(lambda v: float(np.sum(ck.relu(v, backend=backend) * probe)), x.copy())
    check_grad(gx, num, "relu")
