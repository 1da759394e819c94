"""Which device an array lives on and which array module (NumPy or CuPy)
works on it: shared by the ops (convkern.functional) and the trainable
layers (convkern.nn), which keep parameters on the device of their data."""

from __future__ import annotations

import numpy as np


def cupy_or_none():
    """The cupy module, or None where it is not installed."""
    try:
        import cupy
    except ImportError:
        return None
    return cupy


def device_of(a) -> str:
    """"cpu" for NumPy arrays and host DLPack/array-interface objects, "cuda"
    for GPU arrays (``__cuda_array_interface__`` or a CUDA DLPack device)."""
    if isinstance(a, np.ndarray):
        return "cpu"
    if hasattr(a, "__cuda_array_interface__"):
        return "cuda"
    if hasattr(a, "__dlpack_device__"):
        kind = a.__dlpack_device__()[0]
        return "cpu" if int(kind) == 1 else "cuda"
    return "cpu"


def array_module(device: str):
    """NumPy for "cpu", CuPy for "cuda" (None if CuPy is missing)."""
    return np if device == "cpu" else cupy_or_none()
