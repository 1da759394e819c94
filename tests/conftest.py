"""Shared fixtures: every test that takes `backend` runs once per registered
backend (skipped, with the reason, where one is unavailable) and every test
that takes `dtype` once per supported dtype.

Besides the built-in backends, the suite registers "cuda-emu" and
"cupy-emu": the `cuda` and `cupy` backends' code with their kernels (cuda/,
convkern/backend/cupy_kernels.cu) built for a CPU emulator (tests/cuda_emu),
so the GPU kernels' logic is checked on machines without a GPU.
CONVKERN_CUDA_EMU=0 leaves them out."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest

import convkern


def _register_cuda_emulator() -> None:
    if os.environ.get("CONVKERN_CUDA_EMU", "1") == "0":
        return
    from cuda_emu import backend as emu_backend
    from cuda_emu import build as emu_build

    root = Path(os.environ.get("CONVKERN_CUDA_EMU_DIR") or Path(tempfile.gettempdir()) / f"convkern-cuda-emu-{os.getuid()}")
    try:
        cuda = emu_backend.make_backend(emu_build.load(root))
        cupy = emu_backend.make_cupy_backend(cuda.gpu_module._cuda.__file__)
    except emu_build.EmulatorBuildError as exc:  # no compiler: every emulated test skips, saying why
        why = f"the CUDA emulator did not build: {exc}"
        cuda, cupy = emu_backend.unavailable(emu_backend.NAME, why), emu_backend.unavailable(emu_backend.CUPY_NAME, why)
    convkern.register_backend(emu_backend.NAME, cuda, device="cpu")
    convkern.register_backend(emu_backend.CUPY_NAME, cupy, device="cpu")


_register_cuda_emulator()
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
