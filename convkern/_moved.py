"""Old module names that keep working for one release: importing one warns
(DeprecationWarning) and gives the module at its new place, the same object,
so its functions and state are shared."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {
    "convkern.bench": "convkern.perf.bench",
    "convkern.bench_net": "convkern.perf.bench_net",
    "convkern.bench_train": "convkern.perf.bench_train",
    "convkern.gate": "convkern.perf.gate",
    "convkern.verify": "convkern.perf.verify",
    "convkern.layers": "convkern.perf.canonical",
    "convkern.canonical": "convkern.perf.canonical",
    "convkern.train": "convkern.app.train",
    "convkern.cli_train": "convkern.app.cli_train",
    "convkern.inference": "convkern.app.inference",
    "convkern.plots": "convkern.app.plots",
    "convkern.metrics": "convkern.app.metrics",
}


class _Alias(importlib.abc.Loader):
    def __init__(self, new: str):
        self.new = new

    def create_module(self, spec):
        warnings.warn(f"{spec.name} is now {self.new}; the old name goes in the next release",
                      DeprecationWarning, stacklevel=2)
        module = importlib.import_module(self.new)
        self.spec = module.__spec__
        return module

    def exec_module(self, module) -> None:
        # already executed under its new name; the import system has just set
        # __spec__ to the old name's, which the module's own imports would misread
        module.__spec__ = self.spec


class _MovedFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        new = MOVED.get(fullname)
        return None if new is None else importlib.util.spec_from_loader(fullname, _Alias(new))


def install() -> None:
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.append(_MovedFinder())
