"""Helpers shared by the tests (importable: pyproject sets pythonpath = tests)."""

from __future__ import annotations

import numpy as np

from convkern.verify import TOLERANCE, DeviceOps, max_abs_error_at, relative_error


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
