"""Inputs the kernels cannot read as they are (strided views, broadcasts,
another byte order), taken a bounded block at a time.

The C++ kernels read C-contiguous native-endian arrays. Making a whole
contiguous copy of a view first costs as much memory as the input's logical
size: a 2^32-element broadcast of one float becomes 16 GiB before the first
element is computed. The elementwise ops and pooling instead copy one block
of at most ``BLOCK_BYTES`` at a time, run the kernel on it, and write its
result into the (full, contiguous) output, so an op's peak memory is its
output, its inputs and a few blocks.
"""

from __future__ import annotations

from typing import Iterator, Tuple

import numpy as np

BLOCK_BYTES = 8 << 20


def needs_copy(a, dtype) -> bool:
    """Whether a NumPy array must be copied before a kernel can read it."""
    return not (a.flags.c_contiguous and a.dtype == dtype)


def worth_blocking(a, dtype) -> bool:
    """A copy is needed and would exceed one block."""
    return isinstance(a, np.ndarray) and needs_copy(a, dtype) and a.size * np.dtype(dtype).itemsize > BLOCK_BYTES


def blocks(shape: Tuple[int, ...], itemsize: int) -> Iterator[tuple]:
    """Index tuples that cover an array of `shape` in C order, each selecting
    at most BLOCK_BYTES (or one element row of the last axis if that is
    larger), each a contiguous range of a C-contiguous array of that shape."""
    limit = max(BLOCK_BYTES // itemsize, 1)
    inner, k = 1, len(shape)
    while k > 0 and inner * shape[k - 1] <= limit:
        inner *= shape[k - 1]
        k -= 1
    if k == 0:
        yield (Ellipsis,)
        return
    step = max(limit // inner, 1)  # rows of axis k-1 per block
    axis = k - 1
    for outer in np.ndindex(*shape[:axis]):
        for i in range(0, shape[axis], step):
            yield outer + (slice(i, min(i + step, shape[axis])),)


def plane_blocks(n: int, c: int, plane_elems: int, itemsize: int) -> Iterator[Tuple[int, slice]]:
    """(n, channel slice) blocks of an (N, C, ...) array whose (n, c) planes
    hold plane_elems each: as many planes as fit in BLOCK_BYTES, at least one."""
    per = max(BLOCK_BYTES // max(plane_elems * itemsize, 1), 1)
    for i in range(n):
        for c0 in range(0, c, per):
            yield i, slice(c0, min(c0 + per, c))
