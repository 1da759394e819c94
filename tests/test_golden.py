"""Every backend against PyTorch's stored outputs (tests/golden/torch_golden.npz,
made by tests/golden/make_golden.py), so the comparison runs without torch."""

import json
import pathlib

import numpy as np
import pytest

from helpers import assert_close, ck

GOLDEN = np.load(pathlib.Path(__file__).parent / "golden" / "torch_golden.npz", allow_pickle=False)


def cases(prefix):
    return sorted({int(k.split("/")[1]) for k in GOLDEN.files if k.startswith(prefix + "/")})


def get(prefix, i, name):
    key = f"{prefix}/{i}/{name}"
    return GOLDEN[key] if key in GOLDEN.files else None


def kwargs(prefix, i):
    kw = json.loads(str(get(prefix, i, "kwargs")))
    return {k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()}


def test_golden_file_is_complete():
    assert len(cases("conv")) >= 30 and len(cases("max_pool")) >= 20 and len(cases("avg_pool")) >= 20


@pytest.mark.parametrize("algo", ["direct", "im2col"])
@pytest.mark.parametrize("i", cases("conv"))
def test_conv2d_matches_torch_golden(backend, algo, i):
    x, w, b, gy = get("conv", i, "x"), get("conv", i, "w"), get("conv", i, "b"), get("conv", i, "gy")
    kw = kwargs("conv", i)
    assert_close(ck.conv2d(x, w, b, **kw, algo=algo, backend=backend), get("conv", i, "y"), x.dtype,
                 f"forward {kw}")
    gx, gw, gb = ck.conv2d_backward(gy, x, w, **kw, needs=(True, True, b is not None), algo=algo,
                                          backend=backend)
    assert_close(gx, get("conv", i, "gx"), x.dtype, "grad_input")
    assert_close(gw, get("conv", i, "gw"), x.dtype, "grad_weight")
    if b is not None:
        assert_close(gb, get("conv", i, "gb"), x.dtype, "grad_bias")


@pytest.mark.parametrize("i", cases("max_pool"))
def test_max_pool2d_matches_torch_golden(backend, i):
    x, gy, kw = get("max_pool", i, "x"), get("max_pool", i, "gy"), kwargs("max_pool", i)
    y, ind = ck.max_pool2d(x, **kw, return_indices=True, backend=backend)
    assert_close(y, get("max_pool", i, "y"), x.dtype, f"max_pool2d {kw}")
    np.testing.assert_array_equal(ind, get("max_pool", i, "ind"))
    if get("max_pool", i, "gx") is not None:
        assert_close(ck.max_pool2d_backward(gy, x, ind, **kw, backend=backend), get("max_pool", i, "gx"),
                     x.dtype, "max_pool2d_backward")


@pytest.mark.parametrize("i", cases("avg_pool"))
def test_avg_pool2d_matches_torch_golden(backend, i):
    x, gy, kw = get("avg_pool", i, "x"), get("avg_pool", i, "gy"), kwargs("avg_pool", i)
    assert_close(ck.avg_pool2d(x, **kw, backend=backend), get("avg_pool", i, "y"), x.dtype,
                 f"avg_pool2d {kw}")
    assert_close(ck.avg_pool2d_backward(gy, x, **kw, backend=backend), get("avg_pool", i, "gx"), x.dtype,
                 "avg_pool2d_backward")


def test_relu_matches_torch_golden(backend):
    x, gy = GOLDEN["relu/x"], GOLDEN["relu/gy"]
    np.testing.assert_array_equal(ck.relu(x, backend=backend), GOLDEN["relu/y"])
    np.testing.assert_array_equal(ck.relu_backward(gy, x, backend=backend), GOLDEN["relu/gx"])
