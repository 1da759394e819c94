"""The CuPy GPU backend: the same op set on CuPy arrays, with the kernels in
cupy_kernels.cu (compiled by CuPy at first use, instantiated for float and
double) and CuPy's matmul (cuBLAS) for the im2col GEMM. Runs on CuPy's
current stream.

RawKernel ignores strides and views and validates nothing, so every array is
made C-contiguous and every scalar an explicit 64-bit int before a launch.
"""

from __future__ import annotations

import functools
import pathlib
from typing import Tuple

import numpy as np

from ..geometry import ConvGeometry, PoolGeometry

NAME = "cupy"
DEVICE = "cuda"
ALGOS = ("direct", "im2col")
# the direct kernels multiply padding zeros (NaN/inf meet them as in PyTorch),
# so conv2d needs no look at the weights first (a device-to-host sync per call)
DIRECT_PADDING_MULTIPLIES = True

_KERNELS = ("conv2d_forward_direct", "conv2d_grad_input_direct", "conv2d_grad_weight_direct", "conv2d_grad_bias",
            "im2col", "col2im", "max_pool2d_forward", "max_pool2d_backward", "max_pool2d_backward_scatter",
            "avg_pool2d_forward", "avg_pool2d_backward", "relu_forward", "relu_backward")
_THREADS = 256
_MAX_BLOCKS = 65535 * 16  # the kernels' grid-stride loops cover the rest

try:
    import cupy
    _IMPORT_ERROR = ""
except ImportError as exc:  # pragma: no cover - depends on the environment
    cupy = None
    _IMPORT_ERROR = f"cupy is not installed ({exc}); pip install cupy-cuda13x"


def available() -> Tuple[bool, str]:
    if cupy is None:
        return False, _IMPORT_ERROR
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # noqa: BLE001 - CUDARuntimeError, or no driver at all
        return False, f"CuPy cannot reach a GPU: {exc}"
    return (n > 0), ("" if n > 0 else "no CUDA device visible")


@functools.lru_cache(maxsize=None)
def _module():
    source = (pathlib.Path(__file__).with_name("cupy_kernels.cu")).read_text()
    names = [f"{k}<{t}>" for k in _KERNELS for t in ("float", "double")]
    return cupy.RawModule(code=source, options=("-std=c++17",), name_expressions=names)


def _launch(kernel: str, dtype, total: int, args) -> None:
    if total <= 0:
        return
    ctype = "float" if np.dtype(dtype) == np.float32 else "double"
    fn = _module().get_function(f"{kernel}<{ctype}>")
    blocks = int(min((total + _THREADS - 1) // _THREADS, _MAX_BLOCKS))
    converted = tuple(np.int64(a) if isinstance(a, (int, np.integer)) and not isinstance(a, bool) else
                      (np.int32(a) if isinstance(a, bool) else a) for a in args)
    fn((blocks,), (_THREADS,), converted)


def _c(a):
    return cupy.ascontiguousarray(a)


def _conv_geom(g: ConvGeometry):
    return (g.N, g.C, g.H, g.W, g.K, g.R, g.S, g.groups, g.stride[0], g.stride[1], g.pad_top, g.pad_left,
            g.dilation[0], g.dilation[1], g.Ho, g.Wo)


def _im2col_geom(g: ConvGeometry):
    return (g.N, g.C, g.H, g.W, g.R, g.S, g.stride[0], g.stride[1], g.pad_top, g.pad_left, g.dilation[0],
            g.dilation[1], g.Ho, g.Wo)


def choose_algo(g: ConvGeometry) -> str:
    return "direct" if g.C // g.groups == 1 else "im2col"


def _columns(x, g: ConvGeometry):
    col = cupy.empty((g.N, g.C * g.R * g.S, g.Ho * g.Wo), dtype=x.dtype)
    _launch("im2col", x.dtype, col.size, (x, col) + _im2col_geom(g))
    return col.reshape(g.N, g.groups, -1, g.Ho * g.Wo)


def conv2d_forward(x, weight, bias, g: ConvGeometry, algo: str):
    x, weight = _c(x), _c(weight)
    if algo == "auto":
        algo = choose_algo(g)
    if algo == "direct":
        y = cupy.empty(g.output_shape, dtype=x.dtype)
        b = _c(bias) if bias is not None else cupy.zeros(1, dtype=x.dtype)
        _launch("conv2d_forward_direct", x.dtype, y.size, (x, weight, b, y) + _conv_geom(g) + (bias is not None,))
        return y
    col = _columns(x, g)                                                 # (N, G, CRS, P)
    y = cupy.matmul(weight.reshape(g.groups, g.K // g.groups, -1), col)  # (N, G, Kg, P)
    y = y.reshape(g.output_shape)
    if bias is not None:
        y += _c(bias)[None, :, None, None]
    return y


def conv2d_backward(grad_output, x, weight, g: ConvGeometry, algo: str, needs=(True, True, True)):
    gy, x, weight = _c(grad_output), _c(x), _c(weight)
    if algo == "auto":
        algo = choose_algo(g)
    gx = gw = gb = None
    if algo == "direct":
        if needs[0]:
            gx = cupy.empty(g.input_shape, dtype=x.dtype)
            _launch("conv2d_grad_input_direct", x.dtype, gx.size, (gy, weight, gx) + _conv_geom(g))
        if needs[1]:
            gw = cupy.empty(g.weight_shape, dtype=x.dtype)
            _launch("conv2d_grad_weight_direct", x.dtype, gw.size, (gy, x, gw) + _conv_geom(g))
    else:
        gyg = gy.reshape(g.N, g.groups, g.K // g.groups, -1)             # (N, G, Kg, P)
        wg = weight.reshape(g.groups, g.K // g.groups, -1)               # (G, Kg, CRS)
        if needs[0]:
            dcol = _c(cupy.matmul(wg.transpose(0, 2, 1), gyg))           # (N, G, CRS, P)
            gx = cupy.empty(g.input_shape, dtype=x.dtype)
            _launch("col2im", x.dtype, gx.size, (dcol, gx) + _im2col_geom(g))
        if needs[1]:
            col = _columns(x, g)
            gw = cupy.matmul(gyg, col.transpose(0, 1, 3, 2)).sum(axis=0).reshape(g.weight_shape)
    if needs[2]:
        gb = cupy.empty(g.K, dtype=x.dtype)
        _launch("conv2d_grad_bias", x.dtype, g.K, (gy, gb, g.N, g.K, g.Ho * g.Wo))
    return gx, gw, gb


def _pool_geom(g: PoolGeometry, dilation: bool):
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = g.kernel, g.stride, g.padding, g.dilation
    head = (g.N * g.C, g.H, g.W, kh, kw, sh, sw, ph, pw)
    return head + ((dh, dw) if dilation else ()) + (g.Ho, g.Wo)


def max_pool2d_forward(x, g: PoolGeometry):
    x = _c(x)
    y = cupy.empty(g.output_shape, dtype=x.dtype)
    ind = cupy.empty(g.output_shape, dtype=cupy.int64)
    _launch("max_pool2d_forward", x.dtype, y.size, (x, y, ind) + _pool_geom(g, True))
    return y, ind


def max_pool2d_backward(grad_output, indices, g: PoolGeometry):
    gy, ind = _c(grad_output), _c(indices).astype(cupy.int64, copy=False)
    gx = cupy.empty(g.input_shape, dtype=gy.dtype)
    flags = cupy.zeros(1, dtype=cupy.int32)
    _launch("max_pool2d_backward", gy.dtype, max(gx.size, gy.size), (gy, ind, gx, flags) + _pool_geom(g, True))
    bits = int(flags.get()[0])
    if bits & 1:
        raise ValueError(f"indices: an index lies outside its (H*W = {g.H * g.W}) input plane")
    if bits & 2:  # indices from elsewhere: the gather missed them, scatter instead
        planes = g.N * g.C
        _launch("max_pool2d_backward_scatter", gy.dtype, planes, (gy, ind, gx, planes, g.H * g.W, g.Ho * g.Wo))
    return gx


def avg_pool2d_forward(x, g: PoolGeometry, count_include_pad: bool = True, divisor_override: int = 0):
    x = _c(x)
    y = cupy.empty(g.output_shape, dtype=x.dtype)
    _launch("avg_pool2d_forward", x.dtype, y.size,
            (x, y) + _pool_geom(g, False) + (bool(count_include_pad), int(divisor_override)))
    return y


def avg_pool2d_backward(grad_output, g: PoolGeometry, count_include_pad: bool = True, divisor_override: int = 0):
    gy = _c(grad_output)
    gx = cupy.empty(g.input_shape, dtype=gy.dtype)
    _launch("avg_pool2d_backward", gy.dtype, gx.size,
            (gy, gx) + _pool_geom(g, False) + (bool(count_include_pad), int(divisor_override)))
    return gx


def relu_forward(x):
    x = _c(x)
    y = cupy.empty_like(x)
    _launch("relu_forward", x.dtype, x.size, (x, y, x.size))
    return y


def relu_backward(grad_output, x):
    gy, x = _c(grad_output), _c(x)
    gx = cupy.empty_like(x)
    _launch("relu_backward", x.dtype, x.size, (gy, x, gx, x.size))
    return gx
