"""Memory layouts, PyTorch's way: arrays keep the logical (N, C, H, W) shape,
and channels_last means NHWC strides, such as
``np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)``.

The layout is read from the strides. An op's output has its input's layout
(a channels_last input gives a channels_last output), as in torch; a conv's
input of both layouts at once (one channel, 1x1 planes) takes its weights'. Where the
backend has channels_last kernels (cpp) the data is read and written in NHWC
order with no transposes; elsewhere the op converts, at the cost of a copy
each way.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np


def is_channels_last(a) -> bool:
    """A 4-D NumPy array with NHWC strides that is not also C-contiguous (one
    channel, or 1x1 planes, are both layouts at once: those count as NCHW)."""
    return (isinstance(a, np.ndarray) and a.ndim == 4 and not a.flags.c_contiguous
            and a.transpose(0, 2, 3, 1).flags.c_contiguous)


def is_both(a) -> bool:
    """A 4-D NumPy array that is NCHW and NHWC at once (one channel, or 1x1
    planes, C-contiguous): it takes whichever layout the arrays beside it have."""
    return (isinstance(a, np.ndarray) and a.ndim == 4 and a.flags.c_contiguous
            and a.transpose(0, 2, 3, 1).flags.c_contiguous)


def strides_say_channels_last(shape, strides) -> bool:
    """Whether element strides of a 4-D (N, C, H, W) shape read as
    channels_last by PyTorch's rule, which also settles arrays of one
    channel or 1x1 planes by the strides their size-1 dimensions carry: a
    one-channel weight made channels_last, (C, 1, 5, 5) with strides
    (25, 1, 5, 1), is; the same weight C-contiguous, strides (25, 25, 5, 1),
    is not. (NumPy's flags ignore a size-1 dimension's stride.)"""
    if len(shape) != 4 or strides[1] == 0:
        return False
    least = 0
    for d in (1, 3, 2, 0):
        if shape[d] == 0 or strides[d] < least:
            return False
        if d == 0 and least == strides[1]:  # N x 1 x 1 x 1 with equal strides: NCHW
            return False
        least = strides[d] * (shape[d] if shape[d] > 1 else 1)
    return True


def prefers_channels_last(a) -> bool:
    """A 4-D NumPy array whose strides read as channels_last by PyTorch's
    rule (strides_say_channels_last): every channels_last array, and arrays
    of both layouts whose size-1 dimensions carry NHWC strides."""
    return (isinstance(a, np.ndarray) and a.ndim == 4 and a.itemsize > 0
            and strides_say_channels_last(a.shape, tuple(st // a.itemsize for st in a.strides)))


def _transposer():
    """The C++ tiled transpose, or None where the compiled module is missing."""
    try:
        from . import _cpu  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _cpu.transpose_batched


def _fast(a) -> bool:
    return a.dtype in (np.float32, np.float64) and a.dtype.isnative and a.size > 0 and _transposer() is not None


def nhwc(a) -> np.ndarray:
    """The (N, H, W, C) C-contiguous form of a logical (N, C, H, W) array: a
    view of a channels_last array, a copy of anything else (NCHW by the tiled
    C++ transpose)."""
    t = a.transpose(0, 2, 3, 1)
    if t.flags.c_contiguous or not (a.flags.c_contiguous and _fast(a)):
        return np.ascontiguousarray(t)
    n, c, h, w = a.shape
    return _transposer()(a.reshape(n, c, h * w)).reshape(n, h, w, c)


def nchw(a) -> np.ndarray:
    """A C-contiguous (N, C, H, W) copy of a channels_last array (or `a` made
    contiguous, if it is not channels_last)."""
    if not (is_channels_last(a) and _fast(a)):
        return np.ascontiguousarray(a)
    n, c, h, w = a.shape
    return _transposer()(a.transpose(0, 2, 3, 1).reshape(n, h * w, c)).reshape(n, c, h, w)


def from_nhwc(a: np.ndarray) -> np.ndarray:
    """The logical (N, C, H, W) view of an (N, H, W, C) array: channels_last."""
    return a.transpose(0, 3, 1, 2)


def to_channels_last(a: np.ndarray) -> np.ndarray:
    """`a` in channels_last layout (a copy unless it is already)."""
    return a if is_channels_last(a) else from_nhwc(nhwc(a))


def dense_order(a) -> Optional[Tuple[int, ...]]:
    """The axis order in which a dense but not C-contiguous NumPy array is
    C-contiguous (channels_last, any transpose of a contiguous array), so that
    elementwise work can run on its memory as it lies; None if `a` is
    C-contiguous already or not dense."""
    if not isinstance(a, np.ndarray) or a.flags.c_contiguous or a.ndim < 2:
        return None
    order = tuple(sorted(range(a.ndim), key=lambda i: -a.strides[i]))
    return order if a.transpose(order).flags.c_contiguous else None


def inverse(order: Tuple[int, ...]) -> Tuple[int, ...]:
    return tuple(sorted(range(len(order)), key=order.__getitem__))
