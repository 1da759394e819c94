"""Helpers shared by the tests (importable: pyproject sets pythonpath = tests)."""

from __future__ import annotations

import numpy as np

from convkern.perf.verify import TOLERANCE, DeviceOps, max_abs_error_at, relative_error


def assert_close(out, ref, dtype, what: str = "", tol: float | None = None) -> None:
    """Shape and dtype first, then the relative norm error against the tolerance."""
    assert out is not None, f"{what}: got None"
    assert tuple(out.shape) == tuple(ref.shape), f"{what}: shape {out.shape} != reference {ref.shape}"
    assert np.dtype(out.dtype) == np.dtype(dtype), f"{what}: dtype {out.dtype} != {np.dtype(dtype)}"
    tol = TOLERANCE[np.dtype(dtype).name] if tol is None else tol
    err = relative_error(out, ref)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:g}; {max_abs_error_at(out, ref)}"


def randn(rng: np.random.Generator, shape, dtype) -> np.ndarray:
    return rng.standard_normal(shape).astype(dtype)


ck = DeviceOps()


def numeric_grad(f, x, eps=1e-6):
    """d f(x) / dx for a scalar f, by central differences, entry by entry."""
    g = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        old = x[i]
        x[i] = old + eps
        up = f(x)
        x[i] = old - eps
        down = f(x)
        x[i] = old
        g[i] = (up - down) / (2 * eps)
    return g
