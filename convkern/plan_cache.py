"""Decisions remembered per call signature, so a layer's second call skips
the checks and choices its first call made.

A conv call on NumPy arrays decides a good deal before any kernel runs:
it checks the arrays and arguments, works out the geometry, selects the
backend, asks the autotuner (or the rules) for the algorithm and the layout
route, and decides how to take the weights. For a small layer that costs
several times the kernel. All of it follows from what this module keys a
plan by:

- the call's signature: each array's type, shape, strides and dtype, and
  the other arguments;
- the state around it (``state``): the tuning mode and the choices held
  (``tune.generation``), the backend selected, its thread count and SIMD
  level, and whether ``cached_weights`` is active.

The same holds for a conv's backward (``conv2d_backward``). One decision
depends on the data: where kernels that skip padding taps would run, the
weights (forward) or grad_output (the weight gradient) are checked for
NaN/inf (PyTorch multiplies the padding's zeros, so 0 * inf must give NaN).
A plan made where that check ran says so (``Plan.check_finite``) and the
check runs again on each call;
a call whose check fails takes the full road. A plan is stored only from a
call that measured nothing (the next call recalls what was measured) and
whose checks all passed.
"""

from __future__ import annotations

import contextvars
from typing import Callable, Dict, List, Optional

import numpy as np

from . import tune as _tune
from . import weight_cache as _weight_cache

MAX_PLANS = 1024  # (a process rarely sees more signatures; past that the dict starts afresh)

_plans: Dict[tuple, "Plan"] = {}
_finite_log: contextvars.ContextVar[Optional[List[bool]]] = contextvars.ContextVar("_finite_log", default=None)


class Plan:
    """How to run calls of one signature: run(x, w, b) on the raw arrays;
    impl and state as when it was made; recalls: the autotuner choices its
    making recalled, counted again on each use."""

    __slots__ = ("impl", "state", "run", "check_finite", "recalls")

    def __init__(self, impl, state: tuple, run: Callable, check_finite: bool, recalls: int):
        self.impl, self.state, self.run = impl, state, run
        self.check_finite, self.recalls = check_finite, recalls


def key(op: str, arrays, args) -> Optional[tuple]:
    """The signature of a call on NumPy arrays (None entries allowed), or None
    where a plan does not apply (another array type). Lists among args (as
    torch modules pass) count as tuples; a key with something unhashable in
    it finds no plan (get, put)."""
    parts: list = [op, _weight_cache.active()]
    for a in arrays:
        if a is None:
            parts.append(None)
        elif type(a) is np.ndarray:
            parts += (a.shape, a.strides, a.dtype)
        else:
            return None
    for value in args:
        parts.append(tuple(value) if type(value) is list else value)
    return tuple(parts)


def state(impl) -> tuple:
    """What a plan's choices depend on beyond the call's signature. (Not the
    tuning file's path: a file read later only adds choices for problems not
    held already, and those take the full road, which reads it.)"""
    threads = impl.threads() if hasattr(impl, "threads") else 0
    simd = impl.simd_level() if hasattr(impl, "simd_level") else None
    return (_tune.mode(), _tune.generation(), threads, simd)


def get(k: tuple) -> Optional[Plan]:
    try:
        return _plans.get(k)
    except TypeError:  # an unhashable argument
        return None


def put(k: tuple, plan: Plan) -> None:
    try:
        hash(k)
    except TypeError:
        return
    if len(_plans) >= MAX_PLANS:
        _plans.clear()
    _plans[k] = plan


def clear() -> None:
    """Forget every plan (they are remade on the next call of each signature)."""
    _plans.clear()


def log_finite(result: bool) -> bool:
    """Record a NaN/inf check made while a plan is being made; returns result."""
    log = _finite_log.get()
    if log is not None:
        log.append(result)
    return result


class Making:
    """Entered while a call decides what to run: collects its NaN/inf checks
    and counts its tuner lookups; `plan(...)` then gives the plan to keep, or
    None where the call measured something or a check failed."""

    __slots__ = ("_checks", "_token", "_measured", "_remembered", "recalls", "measured")

    def __enter__(self) -> "Making":
        self._checks: List[bool] = []
        self._token = _finite_log.set(self._checks)
        self._measured, self._remembered = _tune._stats["measured"], _tune._stats["remembered"]
        return self

    def __exit__(self, *exc) -> None:
        _finite_log.reset(self._token)
        self.measured = _tune._stats["measured"] != self._measured
        self.recalls = _tune._stats["remembered"] - self._remembered

    def plan(self, impl, run: Callable) -> Optional[Plan]:
        if self.measured or not all(self._checks):
            return None
        return Plan(impl, state(impl), run, bool(self._checks), self.recalls)
