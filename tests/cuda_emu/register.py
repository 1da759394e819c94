"""Registers the emulated GPU backends ("cuda-emu", "cupy-emu") with convkern:
used by the test suite's conftest and by run.py. CONVKERN_CUDA_EMU=0 leaves
them out; without a compiler they register as unavailable, saying why."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import convkern

from . import backend as emu_backend
from . import build as emu_build


def register() -> None:
    if os.environ.get("CONVKERN_CUDA_EMU", "1") == "0":
        return
    root = Path(os.environ.get("CONVKERN_CUDA_EMU_DIR")
                or Path(tempfile.gettempdir()) / f"convkern-cuda-emu-{os.getuid()}")
    try:
        cuda = emu_backend.make_backend(emu_build.load(root))
        cupy = emu_backend.make_cupy_backend(cuda.gpu_module._cuda.__file__)
    except emu_build.EmulatorBuildError as exc:  # no compiler: every emulated use says why
        why = f"the CUDA emulator did not build: {exc}"
        cuda, cupy = emu_backend.unavailable(emu_backend.NAME, why), emu_backend.unavailable(emu_backend.CUPY_NAME, why)
    convkern.register_backend(emu_backend.NAME, cuda, device="cpu")
    convkern.register_backend(emu_backend.CUPY_NAME, cupy, device="cpu")
