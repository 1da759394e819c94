"""The float64 NumPy oracle: written for clarity, not speed; the truth every
other backend is checked against. It computes in float64 whatever the input
dtype and returns the input's dtype.

Conventions are PyTorch's (torch.nn.functional); shapes are (N, C, H, W) throughout.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

from ..geometry import ConvGeometry, PoolGeometry

NAME = "reference"
DEVICE = "cpu"
ALGOS = ("direct",)  # any requested algorithm is computed the one clear way


def available() -> Tuple[bool, str]:
    return True, ""


def _f64(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def _grouped(x: np.ndarray, groups: int) -> np.ndarray:
    n, c = x.shape[:2]
    return x.reshape(n, groups, c // groups, *x.shape[2:])


def _tap(g: ConvGeometry, r: int, s: int):
    """Input rows and columns that tap (r, s) reads for every output row and
    column, clipped into the image, and the mask of those that are real input
    (the rest read zero padding). Positions are computed, never materialised
    as a padded image, so any padding or stride size is fine."""
    (sh, sw), (dh, dw) = g.stride, g.dilation
    rows = np.arange(g.Ho) * sh - g.pad_top + r * dh
    cols = np.arange(g.Wo) * sw - g.pad_left + s * dw
    real = ((rows >= 0) & (rows < g.H))[:, None] & ((cols >= 0) & (cols < g.W))[None, :]
    return np.clip(rows, 0, max(g.H - 1, 0)), np.clip(cols, 0, max(g.W - 1, 0)), real


def _patch(x: np.ndarray, rows, cols, real) -> np.ndarray:
    """x (..., H, W) read at (rows, cols): padding reads exactly 0 (so that
    0 * NaN-weight is NaN, as in PyTorch), whatever the clipped positions hold."""
    return np.where(real, x[..., rows[:, None], cols[None, :]], 0.0)


def conv2d_forward(x, weight, bias, g: ConvGeometry, algo: str = "direct"):
    """y[n, k, i, j] = b[k] + sum_{c, r, s} x_pad[n, c, i*sh + r*dh, j*sw + s*dw] * w[k, c, r, s]
    with c running over k's group and x_pad zero outside the image."""
    xg = _grouped(_f64(x), g.groups)                                   # (N, G, Cg, H, W)
    w = _f64(weight).reshape(g.groups, g.K // g.groups, *g.weight_shape[1:])  # (G, Kg, Cg, R, S)
    y = np.zeros((g.N, g.groups, g.K // g.groups, g.Ho, g.Wo))
    for r in range(g.R):
        for s in range(g.S):
            y += np.einsum("ngchw,gkc->ngkhw", _patch(xg, *_tap(g, r, s)), w[:, :, :, r, s])
    y = y.reshape(g.output_shape)
    if bias is not None:
        y += _f64(bias)[None, :, None, None]
    return y.astype(x.dtype)


def conv2d_backward(grad_output, x, weight, g: ConvGeometry, algo: str = "direct",
                    needs=(True, True, True)):
    """The adjoint of conv2d_forward: every (r, s) tap sends grad_output back to
    the input positions it read, and correlates grad_output with them for the weight."""
    gy = _grouped(_f64(grad_output), g.groups)                 # (N, G, Kg, Ho, Wo)
    xg = _grouped(_f64(x), g.groups)                           # (N, G, Cg, H, W)
    w = _f64(weight).reshape(g.groups, g.K // g.groups, *g.weight_shape[1:])  # (G, Kg, Cg, R, S)
    gx = np.zeros_like(xg) if needs[0] else None
    gw = np.zeros_like(w) if needs[1] else None
    for r in range(g.R):
        for s in range(g.S):
            rows, cols, real = _tap(g, r, s)
            if gx is not None:
                back = np.einsum("ngkhw,gkc->ngchw", gy, w[:, :, :, r, s])
                ri, ci = np.nonzero(real)
                np.add.at(gx, (slice(None), slice(None), slice(None), rows[ri], cols[ci]), back[..., ri, ci])
            if gw is not None:
                gw[:, :, :, r, s] = np.einsum("ngkhw,ngchw->gkc", gy, _patch(xg, rows, cols, real))
    if gx is not None:
        gx = gx.reshape(g.input_shape).astype(x.dtype)
    if gw is not None:
        gw = gw.reshape(g.weight_shape).astype(x.dtype)
    gb = _f64(grad_output).sum(axis=(0, 2, 3)).astype(x.dtype) if needs[2] else None
    return gx, gw, gb


def _pool_positions(out: int, stride: int, pad: int, offset: int, dilation: int, size: int):
    """Input positions of window offset `offset` for every output, and which are real input."""
    pos = np.arange(out) * stride - pad + offset * dilation
    return pos, (pos >= 0) & (pos < size)


def max_pool2d_forward(x, g: PoolGeometry):
    """Max over each window; padding is -inf, NaN wins, ties keep the first
    (row-major) position; indices are h*W + w within each plane, -1 for a
    window that covers no input."""
    xf = _f64(x)
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = g.kernel, g.stride, g.padding, g.dilation
    best = np.full(g.output_shape, -np.inf)
    # a window with no real input (possible with dilation) keeps -inf and index -1
    index = np.full(g.output_shape, -1, dtype=np.int64)
    seen = np.zeros(g.output_shape, dtype=bool)
    for i in range(kh):
        hs, hvalid = _pool_positions(g.Ho, sh, ph, i, dh, g.H)
        for j in range(kw):
            ws, wvalid = _pool_positions(g.Wo, sw, pw, j, dw, g.W)
            v = xf[:, :, np.clip(hs, 0, g.H - 1)[:, None], np.clip(ws, 0, g.W - 1)[None, :]]
            valid = hvalid[:, None] & wvalid[None, :]
            # the first real position is taken even if it is -inf
            take = valid & ((v > best) | np.isnan(v) | ~seen)
            seen |= valid
            best = np.where(take, v, best)
            index = np.where(take, hs[:, None] * g.W + ws[None, :], index)
    return best.astype(x.dtype), index.astype(np.int64)


def max_pool2d_backward(grad_output, indices, g: PoolGeometry):
    """Each output's gradient is added to the input position its index names
    (-1: the window covered no input, the gradient is dropped)."""
    gx = np.zeros((g.N * g.C, g.H * g.W))
    planes = np.broadcast_to(np.arange(g.N * g.C)[:, None], (g.N * g.C, g.Ho * g.Wo))
    idx = np.asarray(indices).reshape(planes.shape)
    if ((idx < -1) | (idx >= g.H * g.W)).any():
        raise ValueError(f"indices: an index lies outside its (H*W = {g.H * g.W}) input plane")
    real = idx >= 0
    np.add.at(gx, (planes[real], idx[real]), _f64(grad_output).reshape(idx.shape)[real])
    return gx.reshape(g.input_shape).astype(grad_output.dtype)


def _avg_divisors(g: PoolGeometry, count_include_pad: bool, divisor_override: int) -> np.ndarray:
    """Divisor per output (0 where the window holds no real input), as PyTorch computes it."""
    def bounds(out, stride, pad, k, size):
        start = np.arange(out) * stride - pad
        end = np.minimum(start + k, size + pad)
        padded = end - start
        real = np.minimum(end, size) - np.maximum(start, 0)
        return padded, real

    ph_n, rh = bounds(g.Ho, g.stride[0], g.padding[0], g.kernel[0], g.H)
    pw_n, rw = bounds(g.Wo, g.stride[1], g.padding[1], g.kernel[1], g.W)
    real = np.outer(np.maximum(rh, 0), np.maximum(rw, 0))
    if divisor_override:
        div = np.full(real.shape, float(divisor_override))
    elif count_include_pad:
        div = np.outer(ph_n, pw_n).astype(np.float64)
    else:
        div = real.astype(np.float64)
    return np.where(real > 0, div, 0.0)


def _avg_taps(g: PoolGeometry):
    """(rows, cols, valid) of every window offset, clipped rows/cols for indexing."""
    (kh, kw), (sh, sw), (ph, pw) = g.kernel, g.stride, g.padding
    for i in range(kh):
        hs, hvalid = _pool_positions(g.Ho, sh, ph, i, 1, g.H)
        for j in range(kw):
            ws, wvalid = _pool_positions(g.Wo, sw, pw, j, 1, g.W)
            yield (np.clip(hs, 0, g.H - 1)[:, None], np.clip(ws, 0, g.W - 1)[None, :],
                   hvalid[:, None] & wvalid[None, :])


def avg_pool2d_forward(x, g: PoolGeometry, count_include_pad: bool = True, divisor_override: int = 0):
    """Sum of the real inputs in each window over PyTorch's divisor; 0 for an empty window."""
    xf = _f64(x)
    total = np.zeros(g.output_shape)
    for rows, cols, valid in _avg_taps(g):
        total += np.where(valid, xf[:, :, rows, cols], 0.0)
    div = _avg_divisors(g, count_include_pad, divisor_override)
    out = np.divide(total, div, out=np.zeros_like(total), where=div != 0)
    return out.astype(x.dtype)


def avg_pool2d_backward(grad_output, g: PoolGeometry, count_include_pad: bool = True,
                        divisor_override: int = 0):
    """Each output spreads grad/divisor evenly over the real inputs of its window."""
    div = _avg_divisors(g, count_include_pad, divisor_override)
    gy = _f64(grad_output)
    share = np.divide(gy, div, out=np.zeros_like(gy), where=div != 0)
    gx = np.zeros(g.input_shape)
    for rows, cols, valid in _avg_taps(g):
        r = np.broadcast_to(rows, valid.shape)[valid]
        c = np.broadcast_to(cols, valid.shape)[valid]
        np.add.at(gx, (slice(None), slice(None), r, c), share[:, :, valid])
    return gx.astype(grad_output.dtype)


def relu_forward(x):
    """max(x, 0), with NaN passed through."""
    xf = _f64(x)
    return np.where((xf > 0) | np.isnan(xf), xf, 0.0).astype(x.dtype)


def relu_backward(grad_output, x):
    """grad where x > 0 (or x is NaN), else 0 — PyTorch's threshold_backward."""
    return np.where(_f64(x) <= 0, 0.0, _f64(grad_output)).astype(grad_output.dtype)
