"""The CuPy GPU backend: the same op set on CuPy arrays, running the CUDA
module's own kernels, compiled by CuPy with NVRTC at first use, and CuPy's
matmul (cuBLAS) for the im2col GEMM. It is the GPU fallback where
convkern._cuda was not built, and the GPU bench's comparison rows. Runs on
CuPy's current stream.

The kernels are the headers in convkern/include/convkern/gpu/ (shipped in the
package), instantiated for float and double with 64-bit indexing; they take
the geometry as the C struct it is (ConvGeom, PoolGeom), passed by value as a
NumPy structured scalar packed by convkern.geometry. RawKernel ignores strides
and views and validates nothing, so every array is made C-contiguous and
every scalar gets an explicit C type before a launch.
"""

from __future__ import annotations

import functools
import hashlib
import pathlib
from typing import Dict, Tuple

import numpy as np

from ..geometry import CONV_GEOM_FIELDS, POOL_GEOM_FIELDS, ConvGeometry, PoolGeometry

NAME = "cupy"
DEVICE = "cuda"
ALGOS = ("direct", "im2col")
# the direct kernels multiply padding zeros (NaN/inf meet them as in PyTorch),
# so conv2d needs no look at the weights first (a device-to-host sync per call)
DIRECT_PADDING_MULTIPLIES = True

INCLUDE_DIR = pathlib.Path(__file__).resolve().parents[1] / "include"
_HEADERS = ("relu.cuh", "max_pool2d.cuh", "avg_pool2d.cuh", "conv2d_direct.cuh", "im2col.cuh")
_NAMESPACE = "convkern::cuda::"
_INDEX = "long long"  # the kernels' index type I: 64-bit, so every problem size is safe
# each kernel this backend launches, with its template parameters: T (the
# element type) and I (the index type)
_KERNELS: Dict[str, str] = {
    "conv_forward_direct_kernel": "TI", "conv_grad_input_direct_kernel": "TI",
    "conv_grad_weight_direct_kernel": "TI", "conv_grad_bias_kernel": "T", "im2col_kernel": "TI",
    "col2im_kernel": "TI", "max_pool_forward_kernel": "TI", "max_pool_check_kernel": "I",
    "max_pool_backward_gather": "TI", "max_pool_backward_scatter": "T", "avg_pool_forward_kernel": "TI",
    "avg_pool_backward_kernel": "TI", "relu_forward_scalar": "T", "relu_backward_scalar": "T",
}
_THREADS = 256
_BIAS_THREADS = 256  # kBiasThreads in conv2d_direct.cuh: conv_grad_bias_kernel's block
_SCATTER_THREADS = 64
_MAX_BLOCKS = 65535 * 16  # the kernels' grid-stride loops cover the rest

# the C structs as NumPy sees them: every field int64, so no padding; marked
# aligned (C's layout), as CuPy wants of a struct passed by value
CONV_GEOM_DTYPE = np.dtype([(f, np.int64) for f in CONV_GEOM_FIELDS], align=True)
POOL_GEOM_DTYPE = np.dtype([(f, np.int64) for f in POOL_GEOM_FIELDS], align=True)

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


def kernel_name(kernel: str, ctype: str) -> str:
    """The name expression of one instantiation, e.g.
    convkern::cuda::im2col_kernel<float, long long>."""
    args = [ctype if p == "T" else _INDEX for p in _KERNELS[kernel]]
    return f"{_NAMESPACE}{kernel}<{', '.join(args)}>"


def name_expressions() -> Tuple[str, ...]:
    return tuple(dict.fromkeys(kernel_name(k, t) for k in _KERNELS for t in ("float", "double")))


def kernel_source() -> str:
    """The translation unit NVRTC compiles (with -I INCLUDE_DIR). It names a
    hash of the headers, because CuPy's kernel cache keys on this text and
    would otherwise keep a binary built from older headers."""
    digest = hashlib.sha256()
    for path in sorted((INCLUDE_DIR / "convkern").rglob("*")):
        if path.is_file():
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    lines = [f"// convkern GPU kernels, headers sha256 {digest.hexdigest()[:16]}"]
    lines += [f'#include "convkern/gpu/{h}"' for h in _HEADERS]
    return "\n".join(lines) + "\n"


def compile_options() -> Tuple[str, ...]:
    return ("-std=c++17", f"-I{INCLUDE_DIR}")


@functools.lru_cache(maxsize=None)
def _module():
    return cupy.RawModule(code=kernel_source(), options=compile_options(), name_expressions=name_expressions())


def _ctype(dtype) -> str:
    return "float" if np.dtype(dtype) == np.float32 else "double"


def _launch(kernel: str, dtype, work: int, args, threads: int = _THREADS, blocks: int = 0) -> None:
    """Launch a grid-stride kernel over `work` items (or exactly `blocks` blocks)."""
    if work <= 0:
        return
    fn = _module().get_function(kernel_name(kernel, _ctype(dtype)))
    if not blocks:
        blocks = int(min((work + threads - 1) // threads, _MAX_BLOCKS))
    fn((blocks,), (threads,), tuple(args))


def _i64(v) -> np.int64:
    return np.int64(v)


_NULL = np.uint64(0)  # a null device pointer (the kernels test for it)


def _conv(g: ConvGeometry):
    return np.array(g.as_tuple(), dtype=np.int64).view(CONV_GEOM_DTYPE)


def _pool(g: PoolGeometry, count_include_pad: bool = True, divisor_override: int = 0):
    return np.array(g.as_tuple(count_include_pad, divisor_override), dtype=np.int64).view(POOL_GEOM_DTYPE)


def _c(a):
    return cupy.ascontiguousarray(a)


def choose_algo(g: ConvGeometry, backward: bool = False, dtype="float32") -> str:
    return "direct" if g.C // g.groups == 1 else "im2col"


def _columns(x, g: ConvGeometry):
    """The column matrix of every image: (C*R*S, N*P) = per group (CRS, N*P)."""
    P = g.Ho * g.Wo
    col = cupy.empty((g.C * g.R * g.S, g.N * P), dtype=x.dtype)
    _launch("im2col_kernel", x.dtype, col.size, (x, col, _i64(g.N), _i64(0), _conv(g)))
    return col.reshape(g.groups, -1, g.N * P)


def _per_group(a, g: ConvGeometry):
    """(N, K, P) -> (G, Kg, N*P), the GEMM's layout of the output side."""
    return _c(a.reshape(g.N, g.K, -1).transpose(1, 0, 2)).reshape(g.groups, g.K // g.groups, -1)


def conv2d_forward(x, weight, bias, g: ConvGeometry, algo: str):
    x, weight = _c(x), _c(weight)
    if algo == "auto":
        algo = choose_algo(g)
    if algo == "direct":
        y = cupy.empty(g.output_shape, dtype=x.dtype)
        b = _c(bias) if bias is not None else _NULL
        _launch("conv_forward_direct_kernel", x.dtype, y.size, (x, weight, b, y, _conv(g)))
        return y
    P = g.Ho * g.Wo
    y = cupy.matmul(weight.reshape(g.groups, g.K // g.groups, -1), _columns(x, g))  # (G, Kg, N*P)
    y = _c(y.reshape(g.K, g.N, P).transpose(1, 0, 2)).reshape(g.output_shape)
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
            _launch("conv_grad_input_direct_kernel", x.dtype, gx.size, (gy, weight, gx, _conv(g)))
        if needs[1]:
            gw = cupy.empty(g.weight_shape, dtype=x.dtype)
            _launch("conv_grad_weight_direct_kernel", x.dtype, gw.size, (gy, x, gw, _conv(g)))
    elif needs[0] or needs[1]:
        gyg = _per_group(gy, g)                                          # (G, Kg, N*P)
        wg = weight.reshape(g.groups, g.K // g.groups, -1)               # (G, Kg, CRS)
        if needs[0]:
            dcol = _c(cupy.matmul(wg.transpose(0, 2, 1), gyg))           # (G, CRS, N*P)
            gx = cupy.empty(g.input_shape, dtype=x.dtype)
            _launch("col2im_kernel", x.dtype, gx.size, (dcol, gx, _i64(g.N), _i64(0), _conv(g)))
        if needs[1]:
            gw = _c(cupy.matmul(gyg, _columns(x, g).transpose(0, 2, 1))).reshape(g.weight_shape)
    if needs[2]:
        gb = cupy.empty(g.K, dtype=x.dtype)
        _launch("conv_grad_bias_kernel", x.dtype, g.K, (gy, gb, _conv(g)), threads=_BIAS_THREADS, blocks=g.K)
    return gx, gw, gb


def max_pool2d_forward(x, g: PoolGeometry):
    x = _c(x)
    y = cupy.empty(g.output_shape, dtype=x.dtype)
    ind = cupy.empty(g.output_shape, dtype=cupy.int64)
    _launch("max_pool_forward_kernel", x.dtype, y.size, (x, y, ind, _pool(g)))
    return y, ind


def max_pool2d_backward(grad_output, indices, g: PoolGeometry):
    gy, ind = _c(grad_output), _c(indices).astype(cupy.int64, copy=False)
    gx = cupy.empty(g.input_shape, dtype=gy.dtype)
    flags = cupy.zeros(1, dtype=cupy.int32)
    _launch("max_pool_check_kernel", gy.dtype, gy.size, (ind, flags, _pool(g)))
    bits = int(flags.get()[0])
    if bits & 1:
        raise ValueError(f"indices: an index lies outside its (H*W = {g.H * g.W}) input plane")
    if bits & 2:  # indices from elsewhere: the gather would miss them, scatter instead
        planes = g.N * g.C
        _launch("max_pool_backward_scatter", gy.dtype, planes, (gy, ind, gx, _pool(g)), threads=_SCATTER_THREADS)
    else:
        _launch("max_pool_backward_gather", gy.dtype, gx.size, (gy, ind, gx, _pool(g)))
    return gx


def avg_pool2d_forward(x, g: PoolGeometry, count_include_pad: bool = True, divisor_override: int = 0):
    x = _c(x)
    y = cupy.empty(g.output_shape, dtype=x.dtype)
    _launch("avg_pool_forward_kernel", x.dtype, y.size, (x, y, _pool(g, count_include_pad, divisor_override)))
    return y


def avg_pool2d_backward(grad_output, g: PoolGeometry, count_include_pad: bool = True, divisor_override: int = 0):
    gy = _c(grad_output)
    gx = cupy.empty(g.input_shape, dtype=gy.dtype)
    _launch("avg_pool_backward_kernel", gy.dtype, gx.size, (gy, gx, _pool(g, count_include_pad, divisor_override)))
    return gx


def relu_forward(x):
    x = _c(x)
    y = cupy.empty_like(x)
    _launch("relu_forward_scalar", x.dtype, x.size, (x, y, _i64(0), _i64(x.size)))
    return y


def relu_backward(grad_output, x):
    gy, x = _c(grad_output), _c(x)
    gx = cupy.empty_like(x)
    _launch("relu_backward_scalar", x.dtype, x.size, (gy, x, gx, _i64(0), _i64(x.size)))
    return gx
