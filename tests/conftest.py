"""Shared fixtures: every test that takes `backend` runs once per registered
backend (skipped, with the reason, where one is unavailable) and every test
that takes `dtype` once per supported dtype.

Besides the built-in backends, the suite registers "cuda-emu" and
"cupy-emu": the `cuda` and `cupy` backends' code with their kernels (cuda/,
the same kernels through cupy_gpu.py) built for a CPU emulator (tests/cuda_emu),
so the GPU kernels' logic is checked on machines without a GPU.
CONVKERN_CUDA_EMU=0 leaves them out."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

# The suite runs with the autotuner off (auto = the backends' rules, the same
# choices on every run) and never touches the user's cache; the tuner's own
# tests turn it on. Set before convkern is imported, and inherited by the
# commands the tests start.
os.environ["CONVKERN_TUNE"] = "off"
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="convkern-test-cache-")
atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], True)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import convkern  # noqa: E402
from cuda_emu.register import register as register_cuda_emulator  # noqa: E402

register_cuda_emulator()
BACKENDS = [b.name for b in convkern.backends()]
DTYPES = [np.float32, np.float64]


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    info = {b.name: b for b in convkern.backends()}[request.param]
    if not info.available:
        pytest.skip(f"backend {info.name} unavailable: {info.reason}")
    return info.name


@pytest.fixture(params=DTYPES, ids=lambda d: np.dtype(d).name)
def dtype(request):
    return request.param


@pytest.fixture
def rng(request) -> np.random.Generator:
    """Fresh random data each run; the seed is printed on failure."""
    seed = int(np.random.SeedSequence().entropy % (2**32))
    request.node.user_properties.append(("seed", seed))
    print(f"rng seed {seed}")
    return np.random.default_rng(seed)
