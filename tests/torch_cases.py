"""Running convkern's problems through PyTorch, for the golden files and the
direct comparison (torch is only imported by callers that have it)."""

from __future__ import annotations

import warnings

import numpy as np


def torch_conv2d(torch, x, w, b, kw):
    """Leaf tensors and torch's conv2d output."""
    import torch.nn.functional as F

    tx = torch.from_numpy(x).requires_grad_(True)
    tw = torch.from_numpy(w).requires_grad_(True)
    tb = None if b is None else torch.from_numpy(b).requires_grad_(True)
    with warnings.catch_warnings():
        # torch notes that "same" with an even kernel pads a copy; that is expected
        warnings.simplefilter("ignore", UserWarning)
        y = F.conv2d(tx, tw, tb, **kw)
    return tx, tw, tb, y


def conv_reference(torch, x, w, b, gy, kw):
    tx, tw, tb, y = torch_conv2d(torch, x, w, b, kw)
    y.backward(torch.from_numpy(gy))
    return (y.detach().numpy(), tx.grad.numpy(), tw.grad.numpy(),
            None if tb is None else tb.grad.numpy())


def max_pool_reference(torch, x, gy, kw):
    import torch.nn.functional as F

    tx = torch.from_numpy(x).requires_grad_(True)
    y, ind = F.max_pool2d(tx, **kw, return_indices=True)
    ind = ind.numpy().copy()
    # PyTorch's index for a window with no input lies outside the plane (and its
    # backward writes through it); convkern reports -1 there and drops the gradient.
    empty = (ind < 0) | (ind >= x.shape[-2] * x.shape[-1])
    ind[empty] = -1
    grad = None
    if not empty.any():
        y.backward(torch.from_numpy(gy))
        grad = tx.grad.numpy()
    return y.detach().numpy(), ind, grad


def avg_pool_reference(torch, x, gy, kw):
    import torch.nn.functional as F

    tx = torch.from_numpy(x).requires_grad_(True)
    y = F.avg_pool2d(tx, **kw)
    y.backward(torch.from_numpy(gy))
    return y.detach().numpy(), tx.grad.numpy()


def relu_reference(torch, x, gy):
    tx = torch.from_numpy(x).requires_grad_(True)
    y = torch.relu(tx)
    y.backward(torch.from_numpy(gy))
    return y.detach().numpy(), tx.grad.numpy()


def conv_kwargs(case) -> dict:
    kw = case.kwargs()
    kw["stride"] = tuple(kw["stride"])
    kw["dilation"] = tuple(kw["dilation"])
    if not isinstance(kw["padding"], str):
        kw["padding"] = tuple(kw["padding"])
    return kw


def max_kwargs(p) -> dict:
    return dict(kernel_size=p.kernel_size, stride=p.stride, padding=p.padding, dilation=p.dilation,
                ceil_mode=p.ceil_mode)


def avg_kwargs(p) -> dict:
    return dict(kernel_size=p.kernel_size, stride=p.stride, padding=p.padding, ceil_mode=p.ceil_mode,
                count_include_pad=p.count_include_pad, divisor_override=p.divisor_override)


def random_data(rng: np.random.Generator, shape, dtype) -> np.ndarray:
    return rng.standard_normal(shape).astype(dtype)


def randn(*shape, dtype=None, seed=0, grad=False):
    """A seeded normal tensor (float64 unless `dtype` says otherwise)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, dtype=dtype or torch.float64, generator=g).requires_grad_(grad)


def rel(a, b) -> float:
    """Relative L2 distance of tensor `a` from `b`."""
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / max(float(b.norm()), 1e-300))
