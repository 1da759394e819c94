"""The GPU backends with their kernels on the CPU emulator: backends
"cuda-emu" and "cupy-emu".

convkern/backend/cuda_gpu.py and cupy_gpu.py run as they are, with two
substitutions: their `cupy` is a NumPy stand-in whose arrays are "device
memory" (host pointers the emulated kernels read), and their kernels are the
emulated build (build.py): convkern._cuda for `cuda`, and for `cupy` a
RawModule whose functions call the build's entry points for the kernels
cupy_gpu.py names (the CUDA module's own), checking each argument's size
against the kernel's parameter as they go. Every array the backend allocates or copies sits between
guard zones of NaN (or, for int64, a sentinel), and its body starts as NaN:
a kernel reading out of bounds gets NaN into its answer, one writing out of
bounds is caught by the guard check after each op, and an output element no
kernel wrote stays NaN. So the shared test suite checks the CUDA kernels'
indexing, algorithms and host launchers on any machine. What it cannot check
is listed in include/cuda_runtime.h; nothing here says anything about speed.
"""

from __future__ import annotations

import ctypes
import importlib.util
import threading
from pathlib import Path
from types import ModuleType, SimpleNamespace

import numpy as np

from convkern.backend import OPS

from .build import entry_symbol

NAME = "cuda-emu"
CUPY_NAME = "cupy-emu"
_BACKENDS = Path(__file__).resolve().parents[2] / "convkern" / "backend"
GUARD = 64  # elements on each side of every array


def _poison(dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return np.array(np.nan, dtype)
    return np.array(np.iinfo(dtype).min + 7, dtype)  # an index no kernel writes


class DeviceArray(np.ndarray):
    """An array in emulated device memory: a NumPy array with CuPy's get()."""

    def get(self):
        return np.array(self)


class GuardedMemory:
    """The part of cupy the backends use, over NumPy; each array the backend
    allocates sits between guard zones."""

    int32, int64 = np.int32, np.int64

    def __init__(self, raw_module=None):
        self._live = threading.local()
        self.cuda = SimpleNamespace(get_current_stream=lambda: SimpleNamespace(ptr=0))
        self.RawModule = raw_module

    @staticmethod
    def matmul(a, b):
        return np.matmul(a, b).view(DeviceArray)

    def _arrays(self) -> list:
        if not hasattr(self._live, "arrays"):
            self._live.arrays = []
        return self._live.arrays

    def empty(self, shape, dtype=np.float32):
        shape = (shape,) if np.isscalar(shape) else tuple(shape)
        n = int(np.prod(shape, dtype=np.int64))
        flat = np.empty(n + 2 * GUARD, dtype=dtype)
        flat[...] = _poison(dtype)
        self._arrays().append((flat, n))
        return flat[GUARD:GUARD + n].reshape(shape).view(DeviceArray)

    def zeros(self, shape, dtype=np.float32):
        out = self.empty(shape, dtype)
        out[...] = 0
        return out

    def empty_like(self, a):
        return self.empty(a.shape, a.dtype)

    def ascontiguousarray(self, a, dtype=None):
        out = self.empty(np.shape(a), dtype or a.dtype)
        out[...] = a
        return out

    def check_guards(self, op: str) -> None:
        """Raises AssertionError if a kernel wrote into a guard zone; forgets the arrays."""
        arrays, self._live.arrays = self._arrays(), []
        for flat, n in arrays:
            poison = _poison(flat.dtype).tobytes()
            for zone in (flat[:GUARD], flat[GUARD + n:]):
                if zone.tobytes() != poison * GUARD:
                    raise AssertionError(f"{op}: a kernel wrote outside an array of {n} {flat.dtype} elements")


def _ptr(a) -> int:
    return 0 if a is None else int(a.ctypes.data)


def _load_source(name: str) -> ModuleType:
    """A fresh copy of convkern/backend/<name>.py (its globals are ours to replace)."""
    spec = importlib.util.spec_from_file_location(f"convkern.backend._emu_{name}", _BACKENDS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _wrap(name: str, gpu: ModuleType, memory: GuardedMemory, ops) -> ModuleType:
    """The backend `name`: gpu's ops, checking the guards after each, returning NumPy arrays."""
    backend = ModuleType(f"convkern_tests.{name}")
    backend.NAME, backend.DEVICE, backend.ALGOS = name, "cpu", gpu.ALGOS
    backend.DIRECT_PADDING_MULTIPLIES = gpu.DIRECT_PADDING_MULTIPLIES
    backend.available = lambda: (True, "")
    backend.gpu_module, backend.memory = gpu, memory

    def wrap(op: str):
        impl = getattr(gpu, op)

        def run(*args, **kwargs):
            try:
                out = impl(*args, **kwargs)
            finally:
                memory.check_guards(op)
            if isinstance(out, tuple):
                return tuple(None if o is None else np.array(o) for o in out)
            return np.array(out)

        run.__name__ = op
        return run

    for op in ops:
        setattr(backend, op, wrap(op))
    return backend


def make_backend(emulated_cuda) -> ModuleType:
    """cuda_gpu.py's code on the emulated convkern._cuda and guarded memory."""
    gpu = _load_source("cuda_gpu")
    memory = GuardedMemory()
    gpu._cuda, gpu.cupy, gpu._ptr = emulated_cuda, memory, _ptr
    return _wrap(NAME, gpu, memory, OPS + ("gemm",))


class _RawFunction:
    """One kernel instantiation of the CuPy backend's source, launched like a
    RawKernel: arrays pass as device pointers, NumPy scalars by value in
    their own C type, and a one-element structured array (a C struct) by
    value as its bytes."""

    _C_TYPES = {np.dtype(np.int64): ctypes.c_int64, np.dtype(np.int32): ctypes.c_int32,
                np.dtype(np.uint64): ctypes.c_uint64,
                np.dtype(np.float32): ctypes.c_float, np.dtype(np.float64): ctypes.c_double}

    def __init__(self, lib: ctypes.CDLL, name: str):
        self.name = name
        self.entry = getattr(lib, entry_symbol(name))
        self.entry.restype = ctypes.c_int

    def _value(self, a):
        if isinstance(a, np.ndarray) and a.dtype.names is not None:
            if a.size != 1:
                raise TypeError(f"{self.name}: a struct argument must be one element, got {a.size}")
            return ctypes.create_string_buffer(a.tobytes(), a.dtype.itemsize)
        if isinstance(a, np.ndarray):
            return ctypes.c_void_p(a.ctypes.data)
        if isinstance(a, np.generic) and a.dtype in self._C_TYPES:
            return self._C_TYPES[a.dtype](a.item())
        # CuPy would guess a C type for it; the backend must not leave that to chance
        raise TypeError(f"{self.name}: argument of type {type(a).__name__} has no fixed C type")

    def __call__(self, grid, block, args):
        values = [self._value(a) for a in args]
        n = len(values)
        pointers = (ctypes.c_void_p * max(n, 1))(*[ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in values])
        sizes = (ctypes.c_size_t * max(n, 1))(*[ctypes.sizeof(v) for v in values])
        status = self.entry(ctypes.c_uint(int(grid[0])), ctypes.c_uint(int(block[0])), pointers, sizes, n)
        if status == -1:
            raise TypeError(f"{self.name}: launched with {n} arguments, which is not the kernel's count")
        if status < -1:
            i = -status - 2
            raise TypeError(f"{self.name}: argument {i} is {sizes[i]} bytes, not the size of the kernel's parameter")
        if status:
            raise RuntimeError(f"{self.name}: launch failed (cudaError_t {status})")


def make_cupy_backend(library_path) -> ModuleType:
    """cupy_gpu.py's code with its kernel source built for the emulator, on guarded memory."""
    lib = ctypes.CDLL(str(library_path))

    class RawModule:
        def __init__(self, code, options=(), name_expressions=()):
            self.names = set(name_expressions)

        def get_function(self, name):
            if name not in self.names:
                raise KeyError(f"{name} is not among the module's name_expressions")
            return _RawFunction(lib, name)

    gpu = _load_source("cupy_gpu")
    memory = GuardedMemory(RawModule)
    gpu.cupy = memory
    gpu._MAX_BLOCKS = 3  # as the cuda build's CK_MAX_GRID_BLOCKS: every grid-stride loop wraps
    gpu._module.cache_clear()
    return _wrap(CUPY_NAME, gpu, memory, OPS)


def unavailable(name: str, reason: str) -> ModuleType:
    """A stand-in backend that says why the emulator is missing."""
    backend = ModuleType(f"convkern_tests.{name}")
    backend.NAME, backend.DEVICE, backend.ALGOS = name, "cpu", ("direct",)
    backend.available = lambda: (False, reason)

    def missing(*args, **kwargs):
        raise RuntimeError(reason)

    backend.conv2d_forward = missing
    return backend
