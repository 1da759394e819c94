"""Initialisation as PyTorch does it, drawn from NumPy generators so a seed
reproduces a model on any backend."""

from __future__ import annotations

import math
from typing import Union

import numpy as np

Seed = Union[None, int, np.random.Generator]

_default = np.random.default_rng()


def manual_seed(seed: int) -> None:
    """Seed the generator that layers created without `rng=` draw from."""
    global _default
    _default = np.random.default_rng(seed)


def generator(rng: Seed = None) -> np.random.Generator:
    if rng is None:
        return _default
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)


def kaiming_uniform(shape, fan_in: int, rng: np.random.Generator, dtype) -> np.ndarray:
    """PyTorch's default for Conv2d and Linear weights: kaiming_uniform_(a=sqrt(5)),
    which works out to U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    gain = math.sqrt(2.0 / (1 + 5.0))
    bound = gain * math.sqrt(3.0 / fan_in)
    return rng.uniform(-bound, bound, size=shape).astype(dtype)


def bias_uniform(n: int, fan_in: int, rng: np.random.Generator, dtype) -> np.ndarray:
    """PyTorch's bias rule: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    return rng.uniform(-bound, bound, size=(n,)).astype(dtype)


def check_dtype(dtype) -> np.dtype:
    dt = np.dtype(dtype)
    if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise TypeError(f"dtype must be float32 or float64, got {dt}")
    return dt

