"""Dropout (single activations) and Dropout2d (whole feature maps, the seeds'
"dropping layers"): inverted dropout, survivors scaled by 1/(1-p), identity in eval."""

from __future__ import annotations

from .init import Seed, generator
from .module import Module, array_module


class Dropout(Module):
    """Zero each element with probability p during training.

    The mask is ``rng.random(mask_shape) >= p`` from a per-layer NumPy
    generator seeded by `rng`, drawn on the host even for GPU input (a mask is
    small next to the convolutions), so a seed gives the same masks, and the
    same training run, on every backend."""
    grad_view = True


    def __init__(self, p: float = 0.5, *, rng: Seed = None):
        super().__init__()
        if not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"{type(self).__name__}: p must be in [0, 1], got {p}")
        self.p = float(p)
        self._rng = generator(rng)
        self._mask = None

    def _mask_shape(self, x):
        return x.shape

    def forward(self, x):
        if not self.training or self.p == 0.0:
            self._mask = None
            return x
        xp = array_module(x)
        if self.p == 1.0:
            self._mask = xp.zeros(self._mask_shape(x), dtype=x.dtype)
        else:
            keep = self._rng.random(self._mask_shape(x)) >= self.p
            self._mask = xp.asarray(keep.astype(x.dtype) * x.dtype.type(1.0 / (1.0 - self.p)))
        return x * self._mask

    def backward(self, grad_output, need_input_grad: bool = True):
        if not need_input_grad:
            return None
        if self._mask is None:
            if self.training and self.p != 0.0:
                raise RuntimeError(f"{type(self).__name__}.backward: no saved forward pass")
            return grad_output
        return grad_output * self._mask

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Dropout2d(Dropout):
    """Zero whole channels (N, C) of an (N, C, H, W) input with probability p."""

    def _mask_shape(self, x):
        if x.ndim != 4:
            raise ValueError(f"Dropout2d: input must be (N, C, H, W), got {tuple(x.shape)}")
        return tuple(x.shape[:2]) + (1, 1)
