"""The CUDA backend: convkern's own kernels (cuda/*.cu, built into
convkern._cuda) on CuPy arrays, on CuPy's current stream.

Algorithms: "direct" (one thread per output; depthwise layers stage tiles in
shared memory), "im2col" (a column buffer in chunks of images, then the tiled
GEMM) and "implicit" (the tiled GEMM gathering its column tiles straight from
the input; no buffer). Backward: grad input by the direct kernel ("direct") or
the im2col GEMM ("im2col", and "implicit", which has no grad-input kernel of
its own); grad weight by the direct kernel ("direct") or an implicit GEMM
split over fixed slices of its reduction, summed in order. Every backward pass
is deterministic (no atomics).

The kernels read raw device pointers, so every array is made C-contiguous and
of the op's dtype first (RawKernel-style launches ignore strides).
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

from ..geometry import ConvGeometry, PoolGeometry, check_layout

NAME = "cuda"
DEVICE = "cuda"
ALGOS = ("direct", "im2col", "implicit")
# the direct kernels multiply padding zeros (NaN/inf meet them as in PyTorch),
# so conv2d needs no look at the weights first (a device-to-host sync per call)
DIRECT_PADDING_MULTIPLIES = True

# im2col's column buffer is built for as many images at a time as fit here
_WORK_BYTES = 256 << 20

try:
    from .. import _cuda
    check_layout("convkern._cuda", _cuda.geometry_fields())
    _IMPORT_ERROR = ""
except (ImportError, AttributeError) as exc:  # built without a CUDA compiler, or from other sources
    _cuda = None
    _IMPORT_ERROR = f"convkern was built without its CUDA module ({exc}); rebuild where nvcc is installed"

try:
    import cupy
except ImportError as exc:  # pragma: no cover - depends on the environment
    cupy = None
    _CUPY_ERROR = f"cupy is not installed ({exc}); pip install cupy-cuda13x"
else:
    _CUPY_ERROR = ""


def available() -> Tuple[bool, str]:
    if _cuda is None:
        return False, _IMPORT_ERROR
    if cupy is None:
        return False, _CUPY_ERROR
    if _cuda.device_count() == 0:
        return False, f"no usable CUDA device: {_cuda.unavailable_reason()}"
    return True, ""


def _c(a, dtype=None):
    return cupy.ascontiguousarray(a, dtype=dtype)


def _ptr(a) -> int:
    return 0 if a is None else int(a.data.ptr)


def _stream() -> int:
    return int(cupy.cuda.get_current_stream().ptr)


def _dtype(a) -> str:
    return np.dtype(a.dtype).name


def choose_algo(g: ConvGeometry, backward: bool = False, dtype="float32") -> str:
    """Depthwise layers take the direct (tiled) kernel; the rest the implicit GEMM."""
    return "direct" if g.C // g.groups == 1 else "implicit"


def _work(geom, dtype):
    """A column buffer for as many images as fit in _WORK_BYTES (at least one)."""
    per_image = _cuda.im2col_work_elems(geom, 1)
    images = max(1, min(geom[0], _WORK_BYTES // max(1, per_image * np.dtype(dtype).itemsize)))
    elems = _cuda.im2col_work_elems(geom, images)
    return cupy.empty(max(elems, 1), dtype=dtype), elems


def conv2d_forward(x, weight, bias, g: ConvGeometry, algo: str):
    x = _c(x)
    weight, b = _c(weight, x.dtype), (None if bias is None else _c(bias, x.dtype))
    if algo == "auto":
        algo = choose_algo(g)
    geom = g.as_tuple()
    y = cupy.empty(g.output_shape, dtype=x.dtype)
    work, elems = _work(geom, x.dtype) if algo == "im2col" else (None, 0)
    _cuda.conv2d_forward(_ptr(x), _ptr(weight), _ptr(b), _ptr(y), geom, algo, _ptr(work), elems, _dtype(x),
                         _stream())
    return y


def conv2d_backward(grad_output, x, weight, g: ConvGeometry, algo: str, needs=(True, True, True)):
    """direct: the direct kernels. im2col and implicit (the module has one GEMM
    backward): grad input by im2col + col2im, grad weight by the implicit GEMM
    split over fixed slices of its reduction (deterministic, no atomics)."""
    x = _c(x)
    gy, weight = _c(grad_output, x.dtype), _c(weight, x.dtype)
    if algo == "auto":
        algo = choose_algo(g)
    geom, dt, stream = g.as_tuple(), _dtype(x), _stream()
    gx = gw = gb = None
    if needs[0]:
        gx = cupy.empty(g.input_shape, dtype=x.dtype)
        work, elems = _work(geom, x.dtype) if algo != "direct" else (None, 0)
        _cuda.conv2d_grad_input(_ptr(gy), _ptr(weight), _ptr(gx), geom, "direct" if algo == "direct" else "im2col",
                                _ptr(work), elems, dt, stream)
    if needs[1]:
        gw = cupy.empty(g.weight_shape, dtype=x.dtype)
        splits = _cuda.grad_weight_splits(geom) if algo != "direct" else 1
        work = cupy.empty(splits * gw.size, dtype=x.dtype) if splits > 1 else None
        _cuda.conv2d_grad_weight(_ptr(gy), _ptr(x), _ptr(gw), geom, "direct" if algo == "direct" else "implicit",
                                 splits, _ptr(work), dt, stream)
    if needs[2]:
        gb = cupy.empty(g.K, dtype=x.dtype)
        _cuda.conv2d_grad_bias(_ptr(gy), _ptr(gb), geom, dt, stream)
    return gx, gw, gb


def max_pool2d_forward(x, g: PoolGeometry, indices: bool = True):
    """(y, indices); indices=False skips computing them and returns (y, None)."""
    x = _c(x)
    y = cupy.empty(g.output_shape, dtype=x.dtype)
    ind = cupy.empty(g.output_shape, dtype=cupy.int64) if indices else None
    _cuda.max_pool2d_forward(_ptr(x), _ptr(y), _ptr(ind), g.as_tuple(), _dtype(x), _stream())
    return y, ind


def max_pool2d_backward(grad_output, indices, g: PoolGeometry):
    gy = _c(grad_output)
    ind = _c(indices, cupy.int64)
    gx = cupy.empty(g.input_shape, dtype=gy.dtype)
    _cuda.max_pool2d_backward(_ptr(gy), _ptr(ind), _ptr(gx), g.as_tuple(), _dtype(gy), _stream())
    return gx


def avg_pool2d_forward(x, g: PoolGeometry, count_include_pad: bool = True, divisor_override: int = 0):
    x = _c(x)
    y = cupy.empty(g.output_shape, dtype=x.dtype)
    _cuda.avg_pool2d_forward(_ptr(x), _ptr(y), g.as_tuple(count_include_pad, divisor_override), _dtype(x),
                             _stream())
    return y


def avg_pool2d_backward(grad_output, g: PoolGeometry, count_include_pad: bool = True, divisor_override: int = 0):
    gy = _c(grad_output)
    gx = cupy.empty(g.input_shape, dtype=gy.dtype)
    _cuda.avg_pool2d_backward(_ptr(gy), _ptr(gx), g.as_tuple(count_include_pad, divisor_override),
                              _dtype(gy), _stream())
    return gx


def relu_forward(x):
    x = _c(x)
    y = cupy.empty_like(x)
    _cuda.relu_forward(_ptr(x), _ptr(y), x.size, _dtype(x), _stream())
    return y


def relu_backward(grad_output, x):
    x = _c(x)
    gy = _c(grad_output, x.dtype)
    gx = cupy.empty_like(x)
    _cuda.relu_backward(_ptr(gy), _ptr(x), _ptr(gx), x.size, _dtype(x), _stream())
    return gx


def gemm(a, b):
    """C = A @ B with the tiled GEMM (2-D, float32 or float64 CuPy arrays)."""
    a = _c(a)
    b = _c(b, a.dtype)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"gemm: shapes {a.shape} and {b.shape} do not multiply")
    c = cupy.empty((a.shape[0], b.shape[1]), dtype=a.dtype)
    _cuda.gemm(_ptr(a), _ptr(b), _ptr(c), a.shape[0], b.shape[1], a.shape[1], _dtype(a), _stream())
    return c
