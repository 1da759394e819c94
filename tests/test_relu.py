"""relu and relu_backward: values, NaN, the kink at exactly 0, any shape."""

import numpy as np
import pytest

import convkern
from helpers import assert_close, randn, ck


@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5), (2, 3, 4, 5), (65537,), (2, 1, 1, 1, 3)])
def test_relu_matches_reference(backend, dtype, rng, shape):
    x = randn(rng, shape, dtype)
    x.flat[::5] = 0
    gy = randn(rng, shape, dtype)
    assert_close(ck.relu(x, backend=backend), ck.relu(x, backend="reference"), dtype, "relu")
    assert_close(ck.relu_backward(gy, x, backend=backend),
                 ck.relu_backward(gy, x, backend="reference"), dtype, "relu_backward")


def test_relu_special_values(backend, dtype):
    x = np.array([-2.0, -0.0, 0.0, 1e-30, 3.0, np.nan, np.inf, -np.inf], dtype=dtype)
    y = ck.relu(x, backend=backend)
    np.testing.assert_array_equal(y[[0, 1, 2, 3, 4, 6, 7]], np.array([0, 0, 0, 1e-30, 3, np.inf, 0], dtype))
    assert np.isnan(y[5])
    g = ck.relu_backward(np.full(x.shape, 7.0, dtype), x, backend=backend)
    # gradient passes where x > 0 or x is NaN; at exactly 0 it is 0 (PyTorch's rule)
    np.testing.assert_array_equal(g, np.array([0, 0, 0, 7, 7, 7, 7, 0], dtype))


def test_relu_non_contiguous_and_inplace(backend, dtype, rng):
    base = randn(rng, (6, 8), dtype)
    view = base[::2, ::-3]
    assert_close(ck.relu(view, backend=backend), np.maximum(view, 0), dtype, "strided relu")
    if convkern.backend.info(backend).device != "cpu":
        return  # in-place on the GPU is covered by test_relu_inplace_on_gpu
    x = base.copy()
    out = convkern.relu(x, inplace=True, backend=backend)
    assert out is x
    np.testing.assert_array_equal(x, np.maximum(base, 0))


@pytest.mark.parametrize("arrange", ["contiguous", "channels_last", "strided"])
def test_relu_backward_inplace_writes_over_grad_output(backend, dtype, rng, arrange):
    if convkern.backend.info(backend).device != "cpu":
        pytest.skip("NumPy arrays only here; the GPU backends take the same path as their out-of-place kernel")
    x = randn(rng, (3, 5, 6, 7), dtype)
    x.flat[::4] = 0
    x.flat[1::9] = np.nan
    gy = randn(rng, (3, 5, 6, 7), dtype)
    if arrange == "channels_last":
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
        gy = np.ascontiguousarray(gy.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    elif arrange == "strided":
        gy = np.repeat(gy, 2, axis=3)[..., ::2]
    want = ck.relu_backward(gy, x, backend="reference")
    keep = gy.copy()
    out = ck.relu_backward(gy, x, inplace=True, backend=backend)
    assert out is gy
    np.testing.assert_array_equal(out, want)  # a selection: exact
    assert not np.array_equal(gy, keep), "the gradient was not written over grad_output"


def test_relu_backward_inplace_refuses_what_it_cannot_write(rng):
    x = randn(rng, (4, 5), np.float32)
    gy = randn(rng, (4, 5), np.float32)
    gy.flags.writeable = False
    with pytest.raises(ValueError, match="relu_backward: inplace=True needs grad_output to be a writeable"):
        ck.relu_backward(gy, x, inplace=True)
    with pytest.raises(TypeError, match="relu_backward: grad_output must be an array"):
        ck.relu_backward(gy.tolist(), x, inplace=True)
