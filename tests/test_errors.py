"""Every bad input is a clear TypeError/ValueError naming the argument and the
shapes, on every backend — never a crash or a silent wrong answer."""

import numpy as np
import pytest

import convkern

X = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
W = np.random.default_rng(1).standard_normal((6, 4, 3, 3)).astype(np.float32)


@pytest.mark.parametrize("args, kwargs, exc, match", [
    ((X[0, 0], W), {}, ValueError, r"input must be 3-D .* or 4-D .*got shape \(8, 8\)"),
    ((X[None], W), {}, ValueError, r"4-D .* got shape \(1, 2, 4, 8, 8\)"),
    ((X, W[0]), {}, ValueError, r"weight must be 4-D .* got shape \(4, 3, 3\)"),
    ((X, W[:, :3]), {}, ValueError, r"input \(2, 4, 8, 8\) has 4 channels, but weight \(6, 3, 3, 3\)"),
    ((X, W[:, :1]), dict(groups=4), ValueError, r"out channels \(weight \(6, 1, 3, 3\): K=6\) must be divisible by groups=4"),
    ((X, W[:, :2]), dict(groups=3), ValueError, r"has 4 channels, but weight \(6, 2, 3, 3\) with groups=3 expects 6"),
    ((X, W), dict(groups=0), ValueError, r"groups must be positive"),
    ((X, W), dict(groups=1.5), TypeError, r"groups must be an int"),
    ((X, W), dict(stride=0), ValueError, r"stride must be positive"),
    ((X, W), dict(stride=(1, -2)), ValueError, r"stride must be positive"),
    ((X, W), dict(dilation=0), ValueError, r"dilation must be positive"),
    ((X, W), dict(padding=-1), ValueError, r"padding must be non-negative"),
    ((X, W), dict(padding=(1, 2, 3)), ValueError, r"padding must be an int or a pair"),
    ((X, W), dict(padding="full"), ValueError, r"padding must be an int, a pair, 'same' or 'valid'"),
    ((X, W), dict(padding="same", stride=2), ValueError, r"padding='same' is not supported for strided"),
    ((X, W), dict(stride=1.0), TypeError, r"stride must be an int or a pair of ints"),
    ((X[:, :, :2, :2], W), {}, ValueError, r"output would be 0x0.*smaller than the dilated kernel 3x3"),
    ((X, W), dict(dilation=5), ValueError, r"output would be"),
    ((X, W, np.zeros(5, np.float32)), {}, ValueError, r"bias must have shape \(6,\) .* got \(5,\)"),
    ((X, W), dict(algo="fft"), ValueError, r"algo 'fft' is not offered by backend 'cpp'; it has 'direct', 'depthwise'"),
    ((X.astype(np.int32), W), {}, TypeError, r"input has dtype int32; supported dtypes are float32 and float64"),
    ((X.astype(np.float16), W.astype(np.float16)), {}, TypeError, r"input has dtype float16"),
    ((X, W.astype(np.float64)), {}, TypeError, r"weight has dtype float64 but input has dtype float32"),
    (([[1.0]], W), {}, TypeError, r"input must be an array"),
    ((X, W), dict(backend="nope"), ValueError, r"unknown backend 'nope'"),
])
def test_conv2d_bad_input(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        convkern.conv2d(*args, **kwargs)


def test_conv2d_backward_bad_input():
    y = convkern.conv2d(X, W, padding=1)
    with pytest.raises(ValueError, match=r"grad_output must have shape \(2, 6, 8, 8\), got \(2, 6, 6, 6\)"):
        convkern.conv2d_backward(y[:, :, 1:-1, 1:-1], X, W, padding=1)
    with pytest.raises(ValueError, match=r"needs must be three booleans"):
        convkern.conv2d_backward(y, X, W, padding=1, needs=(True,))
    with pytest.raises(TypeError, match=r"input has dtype float32 but grad_output has dtype float64"):
        convkern.conv2d_backward(y.astype(np.float64), X, W, padding=1)


@pytest.mark.parametrize("fn, args, kwargs, exc, match", [
    ("max_pool2d", (X, 0), {}, ValueError, r"kernel_size must be positive"),
    ("max_pool2d", (X, 2, 0), {}, ValueError, r"stride must be positive"),
    ("max_pool2d", (X, 2), dict(padding=2), ValueError, r"padding \(2, 2\) must be at most half of kernel_size"),
    ("max_pool2d", (X, (3, 1)), dict(padding=1), ValueError, r"at most half of kernel_size \(3, 1\)"),
    ("max_pool2d", (X, 2), dict(dilation=0), ValueError, r"dilation must be positive"),
    ("max_pool2d", (X, 9), {}, ValueError, r"output would be 0x0 for input \(2, 4, 8, 8\)"),
    ("max_pool2d", (X[0, 0], 2), {}, ValueError, r"input must be 3-D"),
    ("max_pool2d", (X.astype(np.int64), 2), {}, TypeError, r"input has dtype int64"),
    ("avg_pool2d", (X, 2), dict(divisor_override=0), ValueError, r"divisor_override must not be zero"),
    ("avg_pool2d", (X, 2), dict(divisor_override=1.5), TypeError, r"divisor_override must be an int"),
    ("avg_pool2d", (X, 3), dict(padding=2), ValueError, r"must be at most half of kernel_size"),
    ("avg_pool2d", (X, 2.0), {}, TypeError, r"kernel_size must be an int"),
])
def test_pool_bad_input(fn, args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        getattr(convkern, fn)(*args, **kwargs)


def test_pool_geometry_kept_for_plain_ints_still_refuses_what_it_should():
    """Pooling geometry made from plain ints is kept per call signature; values
    that compare equal to a kept key's (2.0 and True to 2 and 1) must still be
    checked and refused, every time."""
    from convkern import geometry

    assert convkern.max_pool2d(X, 2, 1).shape == (2, 4, 7, 7) and convkern.max_pool2d(X, 2).shape == (2, 4, 4, 4)
    kept = geometry.pool2d_geometry(X.shape, 2, None, 0, 1, False, "max_pool2d")
    assert geometry.pool2d_geometry(X.shape, [2, 2], None, 0, 1, False, "max_pool2d") == kept
    for _ in range(2):
        with pytest.raises(TypeError, match=r"kernel_size must be an int"):
            convkern.max_pool2d(X, 2.0)
        with pytest.raises(TypeError, match=r"kernel_size must be an int"):
            convkern.max_pool2d(X, (2, 2.0))
        with pytest.raises(TypeError, match=r"stride must be an int"):
            convkern.max_pool2d(X, 2, True)
        with pytest.raises(ValueError, match=r"stride must be positive"):
            convkern.max_pool2d(X, 2, 0)
        with pytest.raises(ValueError, match=r"padding \(2, 2\) must be at most half"):
            convkern.max_pool2d(X, 2, padding=2)
    # another op name keeps its own geometry (its messages name it)
    with pytest.raises(ValueError, match=r"^avg_pool2d: output would be"):
        convkern.avg_pool2d(X, 9)


def test_pool_backward_bad_input():
    out, ind = convkern.max_pool2d(X, 2, return_indices=True)
    with pytest.raises(ValueError, match=r"grad_output must have shape \(2, 4, 4, 4\)"):
        convkern.max_pool2d_backward(out[:, :, :2], X, ind, 2)
    with pytest.raises(ValueError, match=r"indices must have shape \(2, 4, 4, 4\)"):
        convkern.max_pool2d_backward(out, X, ind[:, :, :2], 2)
    with pytest.raises(TypeError, match=r"indices must be an integer array"):
        convkern.max_pool2d_backward(out, X, ind.astype(np.float32), 2)
    with pytest.raises(ValueError, match=r"grad_output must have shape"):
        convkern.avg_pool2d_backward(out[:, :1], X, 2)


def test_relu_bad_input():
    with pytest.raises(ValueError, match=r"grad_output shape \(3,\) differs from input shape \(4,\)"):
        convkern.relu_backward(np.ones(3, np.float32), np.ones(4, np.float32))
    with pytest.raises(TypeError, match=r"input has dtype bool"):
        convkern.relu(np.ones(3, bool))
    ro = np.ones(3, np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match=r"inplace=True needs a writeable"):
        convkern.relu(ro, inplace=True)


def test_unavailable_backend_says_why(monkeypatch):
    from convkern.backend import cpp

    monkeypatch.setattr(cpp, "available", lambda: (False, "simulated: extension missing"))
    with pytest.raises(convkern.BackendUnavailableError, match=r"simulated: extension missing\. Available: .*reference"):
        convkern.conv2d(X, W, backend="cpp")
    # automatic selection falls back to the next backend
    np.testing.assert_allclose(convkern.relu(X), np.maximum(X, 0))


def test_gpu_array_on_cpu_only_machine_is_a_clear_error():
    class FakeGpuArray:
        __cuda_array_interface__ = {"shape": (1,), "typestr": "<f4", "data": (0, False), "version": 3}
        dtype = np.dtype(np.float32)
        shape = (1,)

    with pytest.raises(ValueError, match=r"weight is on cpu but input is on cuda"):
        convkern.conv2d(FakeGpuArray(), W)
    with pytest.raises(convkern.BackendUnavailableError, match=r"no available backend for cuda"):
        convkern.relu(FakeGpuArray())


def test_byte_swapped_and_read_only_inputs_work():
    x = X.astype(">f4")
    ro = W.copy()
    ro.flags.writeable = False
    out = convkern.conv2d(x, ro, padding=1)
    np.testing.assert_allclose(out, convkern.conv2d(X, W, padding=1, backend="reference"), rtol=1e-4, atol=1e-4)
    assert out.dtype == np.float32


@pytest.mark.parametrize("kw", [dict(stride=True), dict(stride=1.0), dict(stride=(1, True)), dict(groups=True),
                                dict(padding=1.0), dict(dilation=(1.0, 1)), dict(padding=[1, True]),
                                dict(stride=[1.0, 1])], ids=str)
def test_remembered_geometry_still_refuses_what_equals_a_good_argument(kw):
    """conv2d_geometry remembers plain arguments; True == 1 and 1.0 == 1, but
    those stay errors after the int form has been remembered."""
    good = convkern.conv2d_geometry((1, 2, 5, 5), (2, 2, 3, 3), stride=1, padding=1, dilation=1, groups=1)
    assert convkern.conv2d_geometry((1, 2, 5, 5), (2, 2, 3, 3), stride=1, padding=1, dilation=1, groups=1) is good
    with pytest.raises(TypeError, match="must be an int"):
        convkern.conv2d_geometry((1, 2, 5, 5), (2, 2, 3, 3), **{**dict(stride=1, padding=1, dilation=1, groups=1),
                                                                 **kw})


def test_a_list_argument_is_remembered_as_its_tuple():
    """A torch module's padding arrives as a list: the same geometry as the tuple, remembered."""
    good = convkern.conv2d_geometry((1, 2, 5, 5), (2, 2, 3, 3), stride=(1, 2), padding=(1, 0))
    assert convkern.conv2d_geometry((1, 2, 5, 5), (2, 2, 3, 3), stride=[1, 2], padding=[1, 0]) is good
