"""Direct comparison with PyTorch where it is installed: at least 300 random
conv2d configurations (forward and every gradient, both algorithms, float32
and float64), plus random pooling and relu problems."""

import numpy as np
import pytest

import convkern
from helpers import ck
from convkern.perf.verify import random_conv_case, random_pool_case, relative_error
from torch_cases import (avg_kwargs, avg_pool_reference, conv_kwargs, conv_reference, max_kwargs,
                         max_pool_reference, random_data, relu_reference)

torch = pytest.importorskip("torch", reason="PyTorch is not installed: the golden files cover this instead")
pytestmark = pytest.mark.torch

TOL = {np.float32: 1e-5, np.float64: 1e-12}
CONFIGS = 300


def assert_torch_close(ours, theirs, dtype, what):
    err = relative_error(ours, theirs)
    assert err <= TOL[dtype], f"{what}: relative error {err:.3g} against torch"


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("algo", ["direct", "im2col"])
def test_conv2d_against_torch(backend, algo, dtype):
    torch.set_num_threads(2)
    rng = np.random.default_rng(20261122)
    worst = 0.0
    for i in range(CONFIGS):
        case = random_conv_case(rng)
        kw = conv_kwargs(case)
        x = random_data(rng, case.x_shape, dtype)
        w = random_data(rng, case.w_shape, dtype)
        b = random_data(rng, (case.w_shape[0],), dtype) if case.bias else None
        y = ck.conv2d(x, w, b, **kw, algo=algo, backend=backend)
        gy = random_data(rng, y.shape, dtype)
        want = conv_reference(torch, x, w, b, gy, kw)
        got = (y,) + ck.conv2d_backward(gy, x, w, **kw, needs=(True, True, b is not None), algo=algo,
                                              backend=backend)
        for name, o, t in zip(("forward", "grad_input", "grad_weight", "grad_bias"), got, want):
            if t is None:
                continue
            err = relative_error(o, t)
            worst = max(worst, err)
            assert err <= TOL[dtype], f"config {i} {case}: {name} relative error {err:.3g} against torch"
    print(f"{backend}/{algo}/{np.dtype(dtype).name}: {CONFIGS} configs, worst relative error {worst:.3g}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_pooling_and_relu_against_torch(backend, dtype):
    rng = np.random.default_rng(7)
    for i in range(150):
        p = random_pool_case(rng, avg=False)
        x = random_data(rng, p.x_shape, dtype)
        kw = max_kwargs(p)
        y, ind = ck.max_pool2d(x, **kw, return_indices=True, backend=backend)
        gy = random_data(rng, y.shape, dtype)
        ty, tind, tgrad = max_pool_reference(torch, x, gy, kw)
        assert_torch_close(y, ty, dtype, f"max_pool2d {i} {p}")
        np.testing.assert_array_equal(ind, tind, err_msg=f"max_pool2d indices {i} {p}")
        if tgrad is not None:
            gx = ck.max_pool2d_backward(gy, x, ind, **kw, backend=backend)
            assert_torch_close(gx, tgrad, dtype, f"max_pool2d_backward {i} {p}")

        p = random_pool_case(rng, avg=True)
        x = random_data(rng, p.x_shape, dtype)
        kw = avg_kwargs(p)
        y = ck.avg_pool2d(x, **kw, backend=backend)
        gy = random_data(rng, y.shape, dtype)
        ty, tgrad = avg_pool_reference(torch, x, gy, kw)
        assert_torch_close(y, ty, dtype, f"avg_pool2d {i} {p}")
        assert_torch_close(ck.avg_pool2d_backward(gy, x, **kw, backend=backend), tgrad, dtype,
                           f"avg_pool2d_backward {i} {p}")

    x = random_data(rng, (4, 5, 6, 7), dtype)
    x.flat[::3] = 0
    x.flat[1::11] = np.nan
    gy = random_data(rng, x.shape, dtype)
    ty, tgrad = relu_reference(torch, x, gy)
    np.testing.assert_array_equal(ck.relu(x, backend=backend), ty)
    np.testing.assert_array_equal(ck.relu_backward(gy, x, backend=backend), tgrad)


def test_nan_propagation_matches_torch(backend):
    x = np.random.default_rng(3).standard_normal((1, 2, 6, 6))
    x[0, 0, 1, 1] = np.nan
    x[0, 1, 3, 2] = np.nan
    x[0, 1, 3, 3] = np.nan
    ty, tind, _ = max_pool_reference(torch, x, np.ones((1, 2, 3, 3)), dict(kernel_size=2))
    y, ind = ck.max_pool2d(x, 2, return_indices=True, backend=backend)
    np.testing.assert_array_equal(ind, tind)
    np.testing.assert_array_equal(np.isnan(y), np.isnan(ty))
    w = np.ones((1, 2, 3, 3))
    np.testing.assert_array_equal(np.isnan(ck.conv2d(x, w, padding=1, backend=backend)),
                                  np.isnan(torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w),
                                                                      padding=1).numpy()))


def test_torch_tensors_are_taken_without_a_copy(backend):
    if convkern.backend.info(backend).device != "cpu":
        pytest.skip("CPU tensors go to CPU backends")
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    out = convkern.conv2d(x, w, padding=1, backend=backend)
    assert isinstance(out, np.ndarray)
    np.testing.assert_allclose(out, torch.nn.functional.conv2d(x, w, padding=1).numpy(), rtol=1e-12, atol=1e-12)
    y = convkern.relu(x, backend=backend)
    np.testing.assert_array_equal(y, torch.relu(x).numpy())
