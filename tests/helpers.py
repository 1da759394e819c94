"""Helpers shared by the tests (importable: pyproject sets pythonpath = tests)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
from typing import Iterator

import numpy as np
import pytest

from convkern.perf.verify import TOLERANCE, DeviceOps, max_abs_error_at, relative_error


def assert_close(out, ref, dtype, what: str = "", tol: float | None = None) -> None:
    """Shape and dtype first, then the relative norm error against the tolerance."""
    assert out is not None, f"{what}: got None"
    assert tuple(out.shape) == tuple(ref.shape), f"{what}: shape {out.shape} != reference {ref.shape}"
    assert np.dtype(out.dtype) == np.dtype(dtype), f"{what}: dtype {out.dtype} != {np.dtype(dtype)}"
    tol = TOLERANCE[np.dtype(dtype).name] if tol is None else tol
    err = relative_error(out, ref)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:g}; {max_abs_error_at(out, ref)}"


def cancelling_tol(ref, magnitude, dtype) -> float:
    """The dtype's tolerance on the error relative to ref, widened where ref's
    sums cancel: rounding is relative to the sum of the terms' magnitudes
    (`magnitude`: the same sums of absolute values), which for a few
    products summing to almost nothing (a random 16-tap dot product that came
    to 0.011) is far above the result itself. A wrong answer is off by the
    order of `magnitude`, still far past the widened bound."""
    tol = TOLERANCE[np.dtype(dtype).name]
    r, m = float(np.linalg.norm(ref)), float(np.linalg.norm(magnitude))
    return tol * max(1.0, m / r) if r > 0 else tol


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


SIMD_LEVELS = ("scalar", "avx2", "avx512")


@contextlib.contextmanager
def at_simd_level(level: str) -> Iterator[None]:
    """Run a block on the cpp kernels of one SIMD level (restored after);
    the test skips, saying so, where this CPU cannot run that level."""
    import convkern
    from convkern.backend import cpp

    if not cpp.available()[0]:
        pytest.skip(f"the cpp backend is not built here: {cpp.available()[1]}")
    best = cpp._cpu.build_info()["simd_best"]
    if SIMD_LEVELS.index(level) > SIMD_LEVELS.index(best):
        pytest.skip(f"this CPU does not support {level} (best: {best})")
    before = convkern.simd_level()
    convkern.set_simd_level(level)
    try:
        yield
    finally:
        convkern.set_simd_level(before)


def at_thread_counts(call, counts=(1, 2, 3)) -> list:
    """call() under each thread count in turn (the default restored after):
    the results, in order."""
    import convkern

    outs = []
    for n in counts:
        convkern.set_num_threads(n)
        try:
            outs.append(call())
        finally:
            convkern.set_num_threads(0)
    return outs


def run_python(code: str, tmp_path, **env) -> dict:
    """Run code in a fresh interpreter (tuning off) with env added, from
    tmp_path; its last stdout line is JSON, returned parsed."""
    full = dict(os.environ, CONVKERN_TUNE="off", **env)
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                       env=full, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])
