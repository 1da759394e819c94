"""The backend registry (package `convkern.backend`; `convkern.backends()` lists it).

Every backend is a module implementing some of the functions of the written
contract (contract.py: exact signatures and duties) plus ``NAME``,
``DEVICE``, ``ALGOS`` and ``available() -> (bool, reason)``. Modules are imported lazily, so a missing
optional dependency never breaks ``import convkern``.

Bring your own kernels: ``convkern.register_backend(name, module)``, or an
entry point in the ``convkern.backends`` group naming the module. A registered
backend may implement any subset of the ops (OPS below); asking it for one it
lacks raises UnsupportedOpError, and it is used only when chosen by name.

Selection for ``backend=None``: ``use_backend(...)`` if active, else the
``CONVKERN_BACKEND`` environment variable, else the first available backend in
the preference order for the arrays' device.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Dict, Iterator, List, Optional, Tuple

from .. import envvars

_MODULES: Dict[str, str] = {
    "cpp": "convkern.backend.cpp",
    "numba": "convkern.backend.numba_cpu",
    "reference": "convkern.backend.reference",
    "cupy": "convkern.backend.cupy_gpu",
    "cuda": "convkern.backend.cuda_gpu",
}
_DEVICES: Dict[str, str] = {"cpp": "cpu", "numba": "cpu", "reference": "cpu", "cupy": "cuda", "cuda": "cuda"}
_PREFERENCE: Dict[str, List[str]] = {"cpu": ["cpp", "numba", "reference"], "cuda": ["cuda", "cupy"]}

_chosen: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("convkern_backend", default=None)
_REGISTERED: Dict[str, ModuleType] = {}
_IMPORTED: Dict[str, ModuleType] = {}  # built-in and entry-point modules once imported (select runs per op call)
_entry_points_loaded = False
# select's answer for (device, op) when no backend is named: kept only where it is the first in the
# preference order (an unavailable one skipped would make the answer change when it comes back), and
# its availability is asked again on each use
_FIRST: Dict[Tuple[str, Optional[str]], ModuleType] = {}

ENTRY_POINT_GROUP = "convkern.backends"
OPS = ("conv2d_forward", "conv2d_backward", "max_pool2d_forward", "max_pool2d_backward", "avg_pool2d_forward",
       "avg_pool2d_backward", "relu_forward", "relu_backward")


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name but cannot run here; the message says why."""


class UnsupportedOpError(NotImplementedError):
    """Valid input, but the chosen backend does not implement this op."""


def register_backend(name: str, module, device: Optional[str] = None) -> None:
    """Add a backend: a module (or any object) with some of OPS, optionally
    ``available()``, ``DEVICE`` ("cpu" or "cuda") and ``ALGOS``."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"backend name must be a non-empty string, got {name!r}")
    if name in _MODULES and name not in _REGISTERED:
        raise ValueError(f"backend {name!r} is built in and cannot be replaced")
    dev = device or getattr(module, "DEVICE", "cpu")
    if dev not in ("cpu", "cuda"):
        raise ValueError(f"backend {name!r}: device must be 'cpu' or 'cuda', got {dev!r}")
    from .contract import check

    if not any(op in check(name, module) for op in OPS):  # ValueError naming a function that does not fit
        raise ValueError(f"backend {name!r} implements none of {', '.join(OPS)}")
    _REGISTERED[name] = module
    _MODULES[name] = getattr(module, "__name__", name)
    _DEVICES[name] = dev


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in _MODULES:
            _MODULES[ep.name] = ep.value
            _DEVICES[ep.name] = "cpu"  # corrected from the module's DEVICE when it loads


def supports(module, op: str) -> bool:
    return callable(getattr(module, op, None))


@dataclass(frozen=True)
class BackendInfo:
    name: str
    device: str
    available: bool
    reason: str  # why it is unavailable ("" when available)

    def __str__(self) -> str:
        state = "available" if self.available else f"unavailable: {self.reason}"
        return f"{self.name:<10} {self.device:<5} {state}"


def names() -> List[str]:
    _load_entry_points()
    return list(_MODULES)


def _load(name: str) -> ModuleType:
    _load_entry_points()
    if name not in _MODULES:
        raise ValueError(f"unknown backend {name!r}; known backends: {', '.join(_MODULES)}")
    if name in _REGISTERED:
        return _REGISTERED[name]
    module = _IMPORTED.get(name)
    if module is not None and module.__name__ == _MODULES[name]:
        return module
    try:
        module = importlib.import_module(_MODULES[name])
    except ImportError as exc:
        raise BackendUnavailableError(f"backend {name!r} failed to import: {exc}") from exc
    _DEVICES[name] = getattr(module, "DEVICE", _DEVICES.get(name, "cpu"))
    _IMPORTED[name] = module
    return module


def _available(module) -> tuple:
    check = getattr(module, "available", None)
    return check() if callable(check) else (True, "")


def info(name: str) -> BackendInfo:
    try:
        module = _load(name)
        ok, reason = _available(module)
    except BackendUnavailableError as exc:
        ok, reason = False, str(exc)
    return BackendInfo(name, _DEVICES[name], bool(ok), reason)


def backends() -> List[BackendInfo]:
    """Every known backend, whether it is available here and, if not, why."""
    return [info(name) for name in names()]


def get(name: str) -> ModuleType:
    """The backend module `name`, or BackendUnavailableError saying why not."""
    module = _load(name)
    ok, reason = _available(module)
    if not ok:
        usable = [b.name for b in backends() if b.available]
        raise BackendUnavailableError(f"backend {name!r} is unavailable: {reason}. "
                                      f"Available: {', '.join(usable) or 'none'}")
    return module


def select(device: str, name: Optional[str] = None, op: Optional[str] = None) -> ModuleType:
    """The backend to run `op` on arrays living on `device`."""
    name = name or _chosen.get() or envvars.get("CONVKERN_BACKEND") or None
    if name is None:
        module = _FIRST.get((device, op))
        if module is not None and _available(module)[0]:
            return module
    else:
        module = get(name)
        if _DEVICES[name] != device:
            raise ValueError(f"backend {name!r} runs on {_DEVICES[name]} arrays, but the arrays are on {device}")
        if op is not None and not supports(module, op):
            raise UnsupportedOpError(f"backend {name!r} does not implement {op}")
        return module
    reasons = []
    for candidate in _PREFERENCE.get(device, []):
        try:
            module = _load(candidate)
            ok, reason = _available(module)
        except BackendUnavailableError as exc:
            module, ok, reason = None, False, str(exc)
        if ok and (op is None or supports(module, op)):
            if not reasons:
                _FIRST[(device, op)] = module
            return module
        reasons.append(f"{candidate}: {reason or 'does not implement ' + str(op)}")
    detail = "; ".join(reasons) or "none is implemented yet"
    raise BackendUnavailableError(f"no available backend for {device} arrays ({detail})")


@contextlib.contextmanager
def use_backend(name: Optional[str]) -> Iterator[None]:
    """Run the enclosed calls on backend `name` (None restores automatic choice)."""
    if name is not None:
        get(name)  # fail now, with the reason, rather than at the first call
    token = _chosen.set(name)
    try:
        yield
    finally:
        _chosen.reset(token)
