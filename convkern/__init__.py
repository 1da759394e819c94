"""convkern: convolution kernels with PyTorch semantics on NumPy arrays.

    import numpy as np, convkern as ck
    x = np.random.rand(8, 3, 32, 32).astype(np.float32)
    w = np.random.rand(16, 3, 3, 3).astype(np.float32)
    y = ck.relu(ck.conv2d(x, w, padding=1))       # (8, 16, 32, 32)
    p = ck.max_pool2d(y, 2)                        # (8, 16, 16, 16)

The ops mirror ``torch.nn.functional`` (conv2d, max_pool2d, avg_pool2d, relu)
and have explicit ``*_backward`` twins. ``convkern.backends()`` lists the
backends and why any is unavailable.
"""

from __future__ import annotations

from typing import List

from .backend import BackendInfo, BackendUnavailableError, UnsupportedOpError, register_backend, use_backend
from .backend import backends as _backend_list
from .functional import (algorithms, avg_pool2d, avg_pool2d_backward, conv2d, conv2d_backward, conv2d_relu,
                         conv2d_relu_backward, linear, linear_backward, max_pool2d, max_pool2d_backward, relu,
                         relu_backward)
from .geometry import ConvGeometry, PoolGeometry, conv2d_geometry, pool2d_geometry
from .weight_cache import cached_weights
from . import _moved

_moved.install()

__version__ = "0.1.0"


def backends() -> List[BackendInfo]:
    """Each backend with whether it is available here and, if not, why."""
    return _backend_list()


def _cpu_module():
    from .backend import cpp

    ok, reason = cpp.available()
    if not ok:
        raise BackendUnavailableError(reason)
    return cpp._cpu


def set_num_threads(n: int) -> None:
    """Threads the C++ kernels use (n <= 0 restores the default: OMP_NUM_THREADS or all cores)."""
    _cpu_module().set_num_threads(int(n))


def get_num_threads() -> int:
    return int(_cpu_module().num_threads())


def keep_freed_memory() -> bool:
    """Tell the C library's allocator (glibc) to keep freed memory for reuse
    instead of returning it to the OS; returns False where it cannot.

    Each op returns a fresh array. glibc hands a freed block of several MB back
    to the OS, so the next array of that size is faulted in again page by
    page, which can cost more than the op itself (docs/performance.md has the
    measurements). With this the process keeps up to 1 GiB of freed heap
    (its resident size can stay that much above what is in use). Process-wide
    and irreversible; the ``convkern`` command calls it unless
    CONVKERN_KEEP_FREED_MEMORY=0. The same as setting MALLOC_MMAP_THRESHOLD_,
    MALLOC_TRIM_THRESHOLD_ and MALLOC_TOP_PAD_ before Python starts."""
    return bool(_cpu_module().keep_freed_memory())


def set_flush_denormal(on: bool) -> bool:
    """Flush denormal floats to zero inside the C++ kernels (like
    torch.set_flush_denormal; off by default, which is exact IEEE arithmetic).
    Denormal gradients appear as a network converges and cost x86 cores
    microcode assists; `convkern train` turns this on. NumPy code around the
    calls is not affected. Returns False where the CPU has no such mode."""
    return bool(_cpu_module().set_flush_denormal(bool(on)))


def get_flush_denormal() -> bool:
    return bool(_cpu_module().flush_denormal())


def simd_level() -> str:
    """The SIMD level the C++ kernels run at: 'scalar', 'avx2' or 'avx512'."""
    return str(_cpu_module().simd_level())


def set_simd_level(level: str) -> None:
    """Force a SIMD level ('scalar', 'avx2', 'avx512'); the CPU must support it.
    The environment variable CONVKERN_SIMD does the same at start-up."""
    _cpu_module().set_simd_level(level)


__all__ = [
    "conv2d", "conv2d_backward", "conv2d_relu", "conv2d_relu_backward", "max_pool2d", "max_pool2d_backward",
    "avg_pool2d", "avg_pool2d_backward",
    "relu", "relu_backward", "linear", "linear_backward", "algorithms", "backends", "use_backend", "register_backend", "BackendInfo",
    "BackendUnavailableError", "UnsupportedOpError",
    "ConvGeometry", "PoolGeometry", "conv2d_geometry", "pool2d_geometry", "set_num_threads",
    "get_num_threads", "cached_weights", "simd_level", "set_simd_level", "set_flush_denormal", "get_flush_denormal", "__version__",
    "keep_freed_memory",
]
