"""Environment settings read on every op call (CONVKERN_BACKEND, CONVKERN_TUNE).

``os.environ.get`` of an unset name costs about a microsecond: the mapping
encodes the key, and its ``get`` raises and catches a KeyError. These are
read per call, so that a setting changed at run time (``os.environ[...] =``,
pytest's ``monkeypatch.setenv``) holds from the next call, and they are
almost always unset. :func:`get` asks the mapping's own store whether the
name is there first, and takes the usual road only when it is.
"""

from __future__ import annotations

import os
from typing import Callable, Optional


def _membership() -> Optional[Callable[[str], bool]]:
    """name -> whether os.environ holds it, through the encoded-key store
    that CPython's os.environ keeps; None where that store is not there."""
    store, encode = getattr(os.environ, "_data", None), getattr(os.environ, "encodekey", None)
    if not isinstance(store, dict) or not callable(encode):
        return None
    keys = {}

    def holds(name: str) -> bool:
        key = keys.get(name)
        if key is None:
            key = keys[name] = encode(name)
        return key in store

    return holds


_holds = _membership()


def get(name: str) -> Optional[str]:
    """os.environ.get(name), quickly when the name is unset."""
    if _holds is not None and not _holds(name):
        return None
    return os.environ.get(name)
