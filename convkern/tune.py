"""The measuring autotuner behind ``algo="auto"``, after FFTW's wisdom and
``torch.backends.cudnn.benchmark``: the first time a backend sees a conv
problem (shape, stride, padding, dilation, groups, dtype, pass, thread
count), it times every algorithm that can run it on the call's own arrays,
remembers the fastest, and runs that from then on. The choices live in memory
for the process and in a per-machine file under the XDG cache directory, so
a later process on the same machine and build measures nothing.

``CONVKERN_TUNE`` sets the mode:

- ``on`` (the default): measure on first sight, a few calls per algorithm.
  The rules behind ``auto`` were tuned on one CPU family and are off by 1.2x
  and more on others (see docs/performance.md); measuring costs a few calls
  once per problem and machine, and the cache file makes even that a one-off.
- ``exhaustive``: measure longer (for a quiet machine and stable choices).
- ``recall``: the choices already held (cache file, or adopted from another
  process with ``adopt``), the backend's rules elsewhere; nothing measured.
  Distributed ranks run so after rank 0 has tuned: a rank must not time its
  kernels while the others load the same cores.
- ``off``: the backend's rules only, nothing measured or read.

The cache file is JSON (nothing in it is executed or unpickled), written
atomically; it is keyed by the CPU's identity and the compiled module, and a
file that is corrupt or was made on another machine or build is ignored with
a warning. Only backends that say which algorithms can run a problem
(``algo_problem``: cpp) are tuned; a named algorithm is never replaced.
Choices are per thread count, and bit-identical for a given choice: tests
that compare bits, the regression gates and distributed ranks run with
``CONVKERN_TUNE=off`` or a choice made once and shared.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import tempfile
import threading
import time
import warnings
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from . import envvars, machine

MODES = ("off", "on", "exhaustive", "recall")
FORMAT = 1
_lock = threading.RLock()
_memory: Dict[str, str] = {}
_loaded_from: Optional[str] = None
_override: List[str] = []  # set by forced(); innermost last
_stats = {"measured": 0, "remembered": 0}
_generation = [0]  # bumped whenever the choices held may have changed


def generation() -> int:
    """A number that changes whenever the choices held may have (measured,
    adopted, forgotten or read from a file): what a caller that remembers
    decisions made from them checks."""
    return _generation[0]


def mode() -> str:
    """The tuning mode now: forced() if active, else CONVKERN_TUNE (default "on")."""
    if _override:
        return _override[-1]
    value = envvars.get("CONVKERN_TUNE")
    value = ("on" if value is None else value).strip().lower()
    if value not in MODES:
        raise ValueError(f"CONVKERN_TUNE must be one of {', '.join(MODES)}, got {value!r}")
    return value


@contextlib.contextmanager
def forced(value: str) -> Iterator[None]:
    """Run a block with the given tuning mode, whatever CONVKERN_TUNE says."""
    if value not in MODES:
        raise ValueError(f"tuning mode must be one of {', '.join(MODES)}, got {value!r}")
    _override.append(value)
    try:
        yield
    finally:
        _override.pop()


@functools.lru_cache(maxsize=1)
def build_id() -> str:
    """Changes when the compiled kernels do: a digest of the C++ module file."""
    try:
        from . import _cpu  # type: ignore[attr-defined]

        with open(_cpu.__file__, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()[:16]
    except (ImportError, OSError):
        return "none"


def _kernel_blocking() -> Optional[Dict[str, object]]:
    """The caches the kernels size their blocks by and the GEMM blocking they
    derived (CONVKERN_CACHES or CONVKERN_GEMM_BLOCKING change both, and with
    them which algorithm is fastest)."""
    try:
        from . import _cpu  # type: ignore[attr-defined]

        info = _cpu.build_info()
    except ImportError:
        return None
    gemm = info["gemm_blocking_f32"]
    # derived blocking follows from the caches (and the SIMD level, which a
    # process may change: it is not part of the file's key); a measured or
    # forced one is part of it, so choices timed under another blocking are
    # not reused
    return {"caches": dict(info["caches"], known=list(info["caches"]["known"]), ways=list(info["caches"]["ways"])),
            "gemm": "derived" if gemm["source"] == "caches" else [gemm["KC"], gemm["MC"], gemm["NC"]]}


def cpu_key() -> Dict[str, object]:
    """The CPU's identity, its cores and the build: what every per-machine file is keyed by."""
    m = machine.identity()
    return {"cpu": m["cpu"], "vendor": m["vendor"], "family": m["family"], "model": m["model"],
            "stepping": m["stepping"], "cores": m["cores"], "build": build_id()}


def machine_key() -> Dict[str, object]:
    return {**cpu_key(), "caches": machine.identity()["caches"], "blocking": _kernel_blocking()}


@functools.lru_cache(maxsize=1)
def _machine_digest() -> str:
    return hashlib.sha256(json.dumps(machine_key(), sort_keys=True).encode()).hexdigest()[:16]


def cache_path() -> str:
    """The per-machine cache file (its name digests the machine key)."""
    return _cache_path(os.environ.get("XDG_CACHE_HOME"), os.environ.get("HOME"))


@functools.lru_cache(maxsize=16)  # (asked on every tuned call: the path is worked out once per environment)
def _cache_path(xdg: Optional[str], home: Optional[str]) -> str:
    root = xdg or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "convkern", f"tune-{_machine_digest()}.json")


def _load() -> None:
    """Read the cache file once per process (and again if its path changes)."""
    global _loaded_from
    path = cache_path()
    if _loaded_from == path:
        return
    _loaded_from = path
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return
    except (OSError, ValueError) as exc:
        warnings.warn(f"convkern: ignoring the tuning cache {path}: unreadable ({exc})", RuntimeWarning, stacklevel=3)
        return
    if (not isinstance(data, dict) or data.get("format") != FORMAT or data.get("machine") != machine_key()
            or not isinstance(data.get("choices"), dict)
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in data["choices"].items())):
        warnings.warn(f"convkern: ignoring the tuning cache {path}: made for another machine or build, or not "
                      f"a convkern tuning file", RuntimeWarning, stacklevel=3)
        return
    for key, algo in data["choices"].items():
        _memory.setdefault(key, algo)
    _generation[0] += 1


def _save() -> None:
    path = cache_path()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        payload = {"format": FORMAT, "machine": machine_key(), "choices": dict(sorted(_memory.items()))}
        fd, tmp = tempfile.mkstemp(prefix=".tune-", dir=os.path.dirname(path))
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=1)
        os.replace(tmp, path)  # atomic: a reader sees the old file or the new one
    except OSError as exc:  # a read-only home: the choices still hold for this process
        warnings.warn(f"convkern: could not write the tuning cache {path}: {exc}", RuntimeWarning, stacklevel=3)


@functools.lru_cache(maxsize=4096)  # (asked on every auto call: a layer's key is made once)
def key(backend: str, op: str, geometry: Tuple[int, ...], dtype: str, threads: int,
        extra: Sequence[object] = ()) -> str:
    return "|".join(str(p) for p in (backend, op, dtype, threads, ",".join(map(str, geometry)), *extra))


def _timings(runs: Dict[str, Callable[[], object]], exhaustive: bool) -> Dict[str, float]:
    """Each candidate's best time over interleaved rounds (A, B, A, B, ...),
    after one warm-up call each (a fresh workspace, first touch): on a shared
    machine a load that comes and goes then hits every candidate alike,
    where timing them one after another would hand the quiet moment to one.
    A candidate whose warm-up took over 4x the fastest warm-up is not timed
    further: the direct loops on a large layer take 30x a GEMM's."""
    first: Dict[str, float] = {}
    for algo, run in runs.items():
        t0 = time.perf_counter()
        run()
        first[algo] = time.perf_counter() - t0
    fastest = min(first.values())
    live = [a for a in runs if first[a] <= 4 * fastest]
    best = {a: first[a] for a in runs}
    rounds, budget = (10, 0.2 * len(live)) if exhaustive else (3, 0.02 * len(live))
    start, n = time.perf_counter(), 0
    while n < rounds or (time.perf_counter() - start < budget and n < 10 * rounds):
        for algo in live:
            t0 = time.perf_counter()
            runs[algo]()
            best[algo] = min(best[algo], time.perf_counter() - t0)
        n += 1
    return best


def choose(cache_key: str, candidates: Sequence[str], run: Callable[[str], object]) -> str:
    """The remembered algorithm for `cache_key`, or the fastest of `candidates`
    timed now through run(algo) (and remembered)."""
    with _lock:
        _load()
        known = _memory.get(cache_key)
        if known in candidates:
            _stats["remembered"] += 1
            return known
        times = _timings({a: (lambda a=a: run(a)) for a in candidates}, mode() == "exhaustive")
        best = min(times, key=times.get)
        _memory[cache_key] = best
        _generation[0] += 1
        _stats["measured"] += 1
        _save()
        return best


def count_remembered(n: int) -> None:
    """Count n choices as remembered: a caller that keeps what it decided
    from them (convkern.plan_cache) counts its recalls as if it had asked."""
    with _lock:
        _stats["remembered"] += n


def remembered(cache_key: str) -> Optional[str]:
    """The algorithm chosen for `cache_key` before (in this process or the
    cache file), counted as remembered; None if it has not been measured."""
    with _lock:
        _load()
        known = _memory.get(cache_key)
        if known is not None:
            _stats["remembered"] += 1
        return known


def choices() -> Dict[str, str]:
    """Every choice held (cache file and this process), to hand to other processes."""
    with _lock:
        _load()
        return dict(_memory)


def adopt(made: Dict[str, str]) -> None:
    """Take another process's choices (replacing ours where both have one):
    a distributed job tunes on one rank and adopts its choices on the rest."""
    with _lock:
        _load()
        _memory.update({str(k): str(v) for k, v in made.items()})
        _generation[0] += 1


def status() -> Dict[str, object]:
    """Mode, cache file, choices held and this process's measured/remembered counts."""
    with _lock:
        _load()
        return {"mode": os.environ.get("CONVKERN_TUNE", "on"), "cache": cache_path(), "choices": len(_memory),
                **_stats}


def forget() -> None:
    """Drop every choice held in memory (the cache file stays)."""
    global _loaded_from
    with _lock:
        _memory.clear()
        _loaded_from = None
        _generation[0] += 1
