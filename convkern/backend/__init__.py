"""The backend registry (package `convkern.backend`; `convkern.backends()` lists it).

Every backend is a module implementing the same functions (see reference.py
for the set and their contracts) plus ``NAME``, ``DEVICE``, ``ALGOS`` and
``available() -> (bool, reason)``. Modules are imported lazily, so a missing
optional dependency never breaks ``import convkern``.

Selection for ``backend=None``: ``use_backend(...)`` if active, else the
``CONVKERN_BACKEND`` environment variable, else the first available backend in
the preference order for the arrays' device.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Dict, Iterator, List, Optional

_MODULES: Dict[str, str] = {
    "cpp": "convkern.backend.cpp",
    "numba": "convkern.backend.numba_cpu",
    "reference": "convkern.backend.reference",
    "cupy": "convkern.backend.cupy_gpu",
}
_DEVICES: Dict[str, str] = {"cpp": "cpu", "numba": "cpu", "reference": "cpu", "cupy": "cuda"}
_PREFERENCE: Dict[str, List[str]] = {"cpu": ["cpp", "numba", "reference"], "cuda": ["cupy"]}

_chosen: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("convkern_backend", default=None)


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name but cannot run here; the message says why."""


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
    return list(_MODULES)


def _load(name: str) -> ModuleType:
    if name not in _MODULES:
        raise ValueError(f"unknown backend {name!r}; known backends: {', '.join(_MODULES)}")
    try:
        return importlib.import_module(_MODULES[name])
    except ImportError as exc:
        raise BackendUnavailableError(f"backend {name!r} failed to import: {exc}") from exc


def info(name: str) -> BackendInfo:
    try:
        module = _load(name)
        ok, reason = module.available()
    except BackendUnavailableError as exc:
        ok, reason = False, str(exc)
    return BackendInfo(name, _DEVICES[name], bool(ok), reason)


def backends() -> List[BackendInfo]:
    """Every known backend, whether it is available here and, if not, why."""
    return [info(name) for name in _MODULES]


def get(name: str) -> ModuleType:
    """The backend module `name`, or BackendUnavailableError saying why not."""
    module = _load(name)
    ok, reason = module.available()
    if not ok:
        usable = [b.name for b in backends() if b.available]
        raise BackendUnavailableError(f"backend {name!r} is unavailable: {reason}. "
                                      f"Available: {', '.join(usable) or 'none'}")
    return module


def select(device: str, name: Optional[str] = None) -> ModuleType:
    """The backend to run on arrays living on `device`."""
    name = name or _chosen.get() or os.environ.get("CONVKERN_BACKEND") or None
    if name is not None:
        module = get(name)
        if module.DEVICE != device:
            raise ValueError(f"backend {name!r} runs on {module.DEVICE} arrays, but the arrays are on {device}")
        return module
    reasons = []
    for candidate in _PREFERENCE.get(device, []):
        bi = info(candidate)
        if bi.available:
            return _load(candidate)
        reasons.append(f"{candidate}: {bi.reason}")
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
