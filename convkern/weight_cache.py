"""Keep what a conv derives from its weights across calls: ``cached_weights``.

A Winograd conv first transforms its filters, work that does not depend on
the input: on a small map with many channels (512 in and out at 4x4) it
takes as long as the conv itself. Inference runs the same weights again and
again, so inside a ``with convkern.cached_weights():`` block the transformed
filters of each weight are made once and reused while the weight is the
same array (same memory, shape and strides) and, for a torch tensor, has
the same version (torch counts in-place changes: an optimizer step makes
new filters). Outside a block nothing is kept. One object can be entered
again and again (a server's requests), keeping its filters between blocks:

    kept = convkern.cached_weights()
    for x in requests:
        with kept:
            y = model(x)

The promise a block asks of its caller: weights are not changed behind
their owner's back inside it (a NumPy array written in place, or a tensor
changed through ``.data``, which torch does not count). The block holds a
reference to each weight it transformed, so their memory is not reused by
other arrays, until the object is dropped or cleared (the transformed
filters take 16/9 of the weights' memory for F(2x2), 4x for F(4x4)).
"""

from __future__ import annotations

import contextvars
from typing import Dict, List, Optional, Tuple

from .geometry import ConvGeometry

# the open block's entries: key -> (weight array, version, filters)
_active: contextvars.ContextVar[Optional[Dict[Tuple, Tuple]]] = contextvars.ContextVar("convkern_weight_cache",
                                                                                     default=None)
# the version of the weight the next conv reads (set by convkern.torch from the tensor's)
weight_version: contextvars.ContextVar[int] = contextvars.ContextVar("convkern_weight_version", default=0)


class cached_weights:
    """A context manager: inside its blocks each weight's transformed
    Winograd filters are made once and reused (see the module's docstring
    for what it assumes). Blocks nest: an inner one uses the outer one's
    filters."""

    def __init__(self) -> None:
        self._entries: Dict[Tuple, Tuple] = {}
        self._tokens: List[contextvars.Token] = []

    def __enter__(self) -> "cached_weights":
        outer = _active.get()
        self._tokens.append(_active.set(self._entries if outer is None else outer))
        return self

    def __exit__(self, *exc) -> None:
        _active.reset(self._tokens.pop())

    def __len__(self) -> int:
        """How many weights' filters it holds."""
        return len(self._entries)

    def clear(self) -> None:
        """Drop the filters it holds (and its references to the weights)."""
        self._entries.clear()


def active() -> bool:
    """Whether a cached_weights() block is open here."""
    return _active.get() is not None


def kept() -> int:
    """How many weights' filters the open block holds (0 outside one)."""
    entries = _active.get()
    return 0 if entries is None else len(entries)


def winograd_filters(impl, w, g: ConvGeometry, algo: str):
    """w's transformed filters for the NHWC Winograd call `impl` makes for
    (g, algo), kept in the open block; None outside one, where the call runs
    no Winograd, or on a backend that cannot take them."""
    entries = _active.get()
    if entries is None or not hasattr(impl, "winograd_nhwc_filters"):
        return None
    m = impl.nhwc_winograd_tile(g, algo)
    if not m:
        return None
    level = impl.simd_level()  # (the packing follows the level's GEMM panels)
    key = (w.__array_interface__["data"][0], w.shape, w.strides, w.dtype.str, m, level)
    version = weight_version.get()
    hit = entries.get(key)
    if hit is not None and hit[1] == version:
        return hit[2]
    filters = impl.winograd_nhwc_filters(w, g, m)
    entries[key] = (w, version, filters)
    return filters
