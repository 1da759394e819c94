"""The NHWC backward with channels_last weights: read as they lie and their
gradient written in their layout, on every route (grad weight by taps,
Winograd, the implicit GEMM and the im2col GEMM; grad input by the weights
read in place, the flipped filters and the column gather), with the bits of
contiguous weights, against the float64 reference; and a torch model moved
to channels_last gets channels_last weight gradients."""

from __future__ import annotations

import numpy as np
import pytest

import convkern
from convkern import layout, tune
from convkern.backend import cpp
from convkern.geometry import conv2d_geometry
from helpers import SIMD_LEVELS, assert_close, at_simd_level, randn

pytestmark = pytest.mark.skipif(not cpp.available()[0], reason="the cpp backend is not built here")

# (x shape, w shape, kwargs) and the routes they take at every SIMD level:
# grad weight by taps (few taps and filters), by Winograd (3x3, channels a
# whole number of vectors, 64+ tiles), by the implicit GEMM (small map), by
# the im2col GEMM (24 channels, groups); grad input by the weights read in
# place (more channels than pixels), the flipped filters (stride 1), the
# column gather (stride 2, groups)
ROUTES = [((2, 5, 11, 9), (7, 5, 3, 3), dict(padding=1, stride=2)),
          ((1, 3, 20, 20), (8, 3, 5, 5), dict(padding=2)),
          ((2, 32, 16, 16), (32, 32, 3, 3), dict(padding=1)),
          ((2, 64, 8, 8), (64, 64, 3, 3), dict(padding=1)),
          ((2, 24, 9, 10), (32, 24, 3, 3), dict(padding=1)),
          ((2, 20, 3, 3), (40, 20, 3, 3), dict(padding=1)),
          ((2, 6, 12, 12), (9, 2, 3, 3), dict(padding=1, stride=2, groups=3)),
          ((2, 32, 6, 6), (48, 32, 3, 3), dict(padding=0)),
          ((2, 12, 7, 7), (16, 12, 3, 5), dict(padding=(1, 2)))]


def _ids(case):
    return "x".join(map(str, case[0])) + "-" + "x".join(map(str, case[1]))


def _cl(a):
    return layout.to_channels_last(a)


@pytest.mark.parametrize("case", ROUTES, ids=_ids)
def test_channels_last_weights_in_the_nhwc_backward(case, dtype, rng):
    xs, ws, kw = case
    x, w = randn(rng, xs, dtype), randn(rng, ws, dtype)
    g = conv2d_geometry(xs, ws, None, **kw)
    gy = randn(rng, g.output_shape, dtype)
    gyn, xn = layout.nhwc(_cl(gy)), layout.nhwc(_cl(x))
    plain = cpp.conv2d_backward_nhwc(gyn, xn, w, g)
    got = cpp.conv2d_backward_nhwc(gyn, xn, _cl(w), g)
    assert layout.is_channels_last(got[1]), "grad weight in the weights' layout"
    for name, a, b in zip(("grad input", "grad weight", "grad bias"), got, plain):
        np.testing.assert_array_equal(a, b, err_msg=name)
    f64 = np.float64
    want = convkern.conv2d_backward(gy.astype(f64), x.astype(f64), w.astype(f64), **kw, backend="reference")
    assert_close(layout.from_nhwc(got[0]), want[0], dtype, "grad input")
    assert_close(got[1], want[1], dtype, "grad weight")


@pytest.mark.parametrize("case", ROUTES[:6], ids=_ids)
def test_channels_last_weights_through_conv2d_backward(case, rng):
    """convkern.conv2d_backward on channels_last data (NHWC kernels) and on
    NCHW data (NCHW kernels): the same gradients for either weight layout."""
    xs, ws, kw = case
    x, w = randn(rng, xs, np.float32), randn(rng, ws, np.float32)
    gy = randn(rng, conv2d_geometry(xs, ws, None, **kw).output_shape, np.float32)
    with tune.forced("off"):
        for xin, gin in ((_cl(x), _cl(gy)), (x, gy)):
            plain = convkern.conv2d_backward(gin, xin, w, **kw)
            got = convkern.conv2d_backward(gin, xin, _cl(w), **kw)
            for name, a, b in zip(("grad input", "grad weight", "grad bias"), got, plain):
                np.testing.assert_array_equal(a, b, err_msg=f"{name}, input strides {xin.strides}")


@pytest.mark.parametrize("level", SIMD_LEVELS)
def test_channels_last_weights_at_every_simd_level(level, rng):
    for xs, ws, kw in ROUTES[2:6]:
        x, w = randn(rng, xs, np.float32), randn(rng, ws, np.float32)
        g = conv2d_geometry(xs, ws, None, **kw)
        gy = randn(rng, g.output_shape, np.float32)
        gyn, xn = layout.nhwc(_cl(gy)), layout.nhwc(_cl(x))
        with at_simd_level(level):
            plain = cpp.conv2d_backward_nhwc(gyn, xn, w, g)
            got = cpp.conv2d_backward_nhwc(gyn, xn, _cl(w), g)
        for a, b in zip(got, plain):
            np.testing.assert_array_equal(a, b, err_msg=f"{level} x{xs} w{ws}")


# grad input from the column matrix by row runs (one group, undilated rows,
# stride above 1): a 7x7/2 stem, runs clipped at both borders
# (padding past the kernel's reach, a map narrower than the kernel), a
# dilated kernel height, strides of 3, one channel
ROW_RUNS = [((2, 3, 23, 21), (8, 3, 7, 7), dict(stride=2, padding=3)),
            ((1, 5, 9, 4), (6, 5, 3, 6), dict(stride=(2, 3), padding=(1, 4))),
            ((2, 2, 13, 11), (4, 2, 3, 3), dict(stride=2, padding=(2, 1), dilation=(2, 1))),
            ((1, 1, 10, 12), (3, 1, 5, 4), dict(stride=3, padding=2)),
            ((2, 7, 8, 9), (5, 7, 2, 3), dict(stride=2, padding=0))]


@pytest.mark.parametrize("level", SIMD_LEVELS)
@pytest.mark.parametrize("case", ROW_RUNS, ids=_ids)
def test_grad_input_of_few_channels_by_row_runs(case, level, dtype, rng):
    xs, ws, kw = case
    x, w = randn(rng, xs, dtype), randn(rng, ws, dtype)
    g = conv2d_geometry(xs, ws, None, **kw)
    gy = randn(rng, g.output_shape, dtype)
    with at_simd_level(level):
        got = cpp.conv2d_backward_nhwc(layout.nhwc(_cl(gy)), layout.nhwc(_cl(x)), _cl(w), g, (True, False, False))
    f64 = np.float64
    want = convkern.conv2d_backward(gy.astype(f64), x.astype(f64), w.astype(f64), **kw, needs=(True, False, False),
                                    backend="reference")
    assert_close(layout.from_nhwc(got[0]), want[0], dtype, f"{level} grad input")


def test_a_channels_last_torch_model_gets_channels_last_weight_grads(rng):
    torch = pytest.importorskip("torch", reason="PyTorch is not installed: convkern.torch needs it")
    import convkern.torch as ckt

    torch.manual_seed(int(rng.integers(1 << 31)))
    model = torch.nn.Sequential(torch.nn.Conv2d(16, 24, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(24, 32, 3, padding=1, stride=2))
    x = torch.randn(2, 16, 9, 9)
    want_model = ckt.patch(torch.nn.Sequential(*[type(m)(**_kwargs(m)) for m in model]))
    want_model.load_state_dict(model.state_dict())
    ours = ckt.patch(model).to(memory_format=torch.channels_last)
    with tune.forced("off"):
        ours(x.contiguous(memory_format=torch.channels_last)).square().sum().backward()
        want_model(x).square().sum().backward()
    for (name, p), q in zip(ours.named_parameters(), want_model.parameters()):
        if p.dim() == 4:
            assert p.grad.is_contiguous(memory_format=torch.channels_last), name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-4, msg=name)


def _kwargs(m):
    if hasattr(m, "in_channels"):
        return dict(in_channels=m.in_channels, out_channels=m.out_channels, kernel_size=m.kernel_size,
                    stride=m.stride, padding=m.padding)
    return {}
