"""The packed GEMM's cache blocking, measured on this machine.

The C++ kernels derive their GEMM blocking (KC, MC, NC) from the caches they
read at start-up: the A and B micro-panels in L1's ways, the A block in half
of L2, the B block in half of L3 (``convkern info`` prints both). That model
is a starting point, not the optimum: a core whose L2 streams B fast enough
runs faster with a longer KC (fewer passes over C); one whose L2 loses lines
of a large A block to the B and C streams between their reuses runs faster
with a smaller MC; and which one wins is a property of the core, not of its
cache sizes.

``convkern tune`` therefore times a few candidates around the model's
(KC as derived, 1.5x, 2x and 3x it, each with its own MC and NC; the model's
KC and NC with a half and an eighth of its MC) on the GEMM
shapes of the canonical layers and 2048^3, and on the canonical layers as
channels_last convs (whose GEMM over output pixels takes the same KC), in
child processes (a process's blocking is fixed at its first kernel call),
in interleaved rounds. A
candidate replaces the model's only if its geometric-mean speed is more than
2% higher. The winner is kept per SIMD level and thread count in a JSON file
beside the algorithm choices, keyed by the CPU's identity and the build, and
applied as the cpp backend loads (``apply``) unless ``CONVKERN_TUNE=off``.
``CONVKERN_GEMM_BLOCKING=KC,MC,NC`` overrides everything.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

FORMAT = 1
MARGIN = 1.02  # a candidate must beat the model's blocking by this factor
Blocking = Tuple[int, int, int]


def gemm_shapes(layers: Optional[Sequence[str]] = None) -> List[Tuple[int, int, int]]:
    """(M, K, N) of each canonical layer's (or each named one's) per-image
    im2col GEMM (output channels x patch length x output pixels), and 2048^3."""
    from .perf.canonical import CANONICAL

    shapes = []
    for layer in CANONICAL:
        if layer.groups > 1 or (layers is not None and layer.name not in layers):
            continue  # depthwise layers run no GEMM
        ho = (layer.H + 2 * layer.pad - layer.R) // layer.stride + 1
        wo = (layer.W + 2 * layer.pad - layer.S) // layer.stride + 1
        shapes.append((layer.K, layer.C * layer.R * layer.S, ho * wo))
    return shapes + [(2048, 2048, 2048)]


def _cpu():
    from . import _cpu as module  # type: ignore[attr-defined]

    return module


def candidates() -> Dict[str, Blocking]:
    """The model's blocking for this machine's caches and the longer-KC and
    smaller-MC candidates, by name."""
    info = _cpu().build_info()
    c = info["caches"]
    args = (c["l1d"], c["l2"], c["l3"], c["ways"][0], c["ways"][1])
    rule = _cpu().gemm_blocking_for(*args)
    out = {"model": (rule["KC"], rule["MC"], rule["NC"])}
    for name, factor in (("KC x1.5", 1.5), ("KC x2", 2.0), ("KC x3", 3.0)):
        kc = int(rule["KC"] * factor) // 16 * 16
        b = _cpu().gemm_blocking_for(*args, kc=kc)
        out[name] = (b["KC"], b["MC"], b["NC"])
    mr = info["gemm_blocking_f32"]["MR"]
    for name, share in (("MC /2", 2), ("MC /8", 8)):
        mc = max(mr, rule["MC"] // share // mr * mr)  # whole register panels
        out[name] = (rule["KC"], mc, rule["NC"])
    return out


NHWC_BATCH = 2


def nhwc_layers() -> List[str]:
    """The canonical layers whose channels_last forward runs a GEMM (not
    depthwise), timed at batch NHWC_BATCH by their "im2col" NHWC algorithm."""
    from .perf.canonical import CANONICAL

    return [layer.name for layer in CANONICAL if layer.groups == 1]


def _best_time(fn, min_time: float) -> float:
    """The fastest call of fn within min_time (at least 3): on a shared
    machine a neighbour's load only ever slows a call down, so the fastest
    call is the one that measures the blocking."""
    fn()
    times: List[float] = []
    end = time.perf_counter() + min_time
    while time.perf_counter() < end or len(times) < 3:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _speeds(shapes: Sequence[Tuple[int, int, int]], min_time: float,
            layers: Sequence[str] = ()) -> Dict[str, float]:
    """GFLOP/s of the cpp GEMM on each shape, and of each named canonical
    layer's channels_last forward, in this process."""
    from .backend import cpp
    from .geometry import conv2d_geometry
    from .perf.canonical import CANONICAL

    rng = np.random.default_rng(0)
    out = {}
    for m, k, n in shapes:
        a = rng.standard_normal((m, k)).astype(np.float32)
        b = rng.standard_normal((k, n)).astype(np.float32)
        out[f"{m}x{k}x{n}"] = 2.0 * m * k * n / _best_time(lambda: cpp.gemm(a, b), min_time) / 1e9
    by_name = {layer.name: layer for layer in CANONICAL}
    for name in layers:
        ly = by_name[name]
        x = rng.standard_normal((NHWC_BATCH, ly.H, ly.W, ly.C)).astype(np.float32)
        w = rng.standard_normal((ly.K, ly.C // ly.groups, ly.R, ly.S)).astype(np.float32)
        g = conv2d_geometry((NHWC_BATCH, ly.C, ly.H, ly.W), w.shape, None, ly.stride, ly.pad, 1, ly.groups)
        seconds = _best_time(lambda: cpp.conv2d_forward_nhwc(x, w, None, g, algo="im2col"), min_time)
        out[f"{name} channels_last"] = g.flops / seconds / 1e9
    return out


def _child(blocking: Blocking, shapes, min_time: float, layers: Sequence[str] = ()) -> Dict[str, float]:
    env = dict(os.environ, CONVKERN_GEMM_BLOCKING=",".join(map(str, blocking)), CONVKERN_TUNE="off")
    spec = {"shapes": shapes, "min_time": min_time, "layers": list(layers)}
    cmd = [sys.executable, "-m", "convkern.blocking", json.dumps(spec)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tempfile.gettempdir())
    if r.returncode != 0:
        raise RuntimeError(f"timing the GEMM with blocking {blocking} failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def measure(cands: Dict[str, Blocking], shapes=None, rounds: int = 3,
            min_time: float = 0.2, layers: Optional[Sequence[str]] = None) -> Dict[str, Dict[str, object]]:
    """Each candidate's geometric-mean GFLOP/s over the GEMM shapes and the
    channels_last layers (default: all of nhwc_layers; the best of
    interleaved rounds per shape)."""
    shapes = [list(s) for s in (shapes or gemm_shapes())]
    layers = nhwc_layers() if layers is None else list(layers)
    runs: Dict[str, List[Dict[str, float]]] = {name: [] for name in cands}
    for _ in range(rounds):
        for name, blocking in cands.items():
            runs[name].append(_child(blocking, shapes, min_time, layers))
    out = {}
    for name, rs in runs.items():
        per_shape = {s: max(r[s] for r in rs) for s in rs[0]}
        score = math.exp(sum(math.log(v) for v in per_shape.values()) / len(per_shape))
        out[name] = {"blocking": list(cands[name]), "gflops": score, "per_shape": per_shape}
    return out


def pick(results: Dict[str, Dict[str, object]]) -> str:
    """The model's blocking unless another beats it by more than MARGIN."""
    best = max(results, key=lambda n: results[n]["gflops"])
    if best != "model" and results[best]["gflops"] > MARGIN * results["model"]["gflops"]:
        return best
    return "model"


def _key() -> Dict[str, object]:
    from . import tune

    return {**tune.cpu_key(), "caches": _cpu().build_info()["caches"]}


def path() -> str:
    from . import tune

    digest = hashlib.sha256(json.dumps(_key(), sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(os.path.dirname(tune.cache_path()), f"gemm-{digest}.json")


def describe() -> str:
    """The float32 GEMM blocking in use and where it came from, in one phrase."""
    b = _cpu().build_info()["gemm_blocking_f32"]
    origin = {"caches": "derived from the caches", "convkern tune": "measured by convkern tune",
              "CONVKERN_GEMM_BLOCKING": "set by CONVKERN_GEMM_BLOCKING"}[b["source"]]
    return f"GEMM blocking KC {b['KC']}, MC {b['MC']}, NC {b['NC']} ({origin})"


def slot() -> str:
    """Choices are per SIMD level and thread count."""
    return f"{_cpu().simd_level()}|{_cpu().num_threads()}"


def _read() -> Dict[str, object]:
    p = path()
    try:
        with open(p) as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        warnings.warn(f"convkern: ignoring the GEMM blocking file {p}: unreadable ({exc})", RuntimeWarning,
                      stacklevel=3)
        return {}
    key = json.loads(json.dumps(_key()))
    ok = (isinstance(data, dict) and data.get("format") == FORMAT and data.get("machine") == key
          and isinstance(data.get("choices"), dict))
    if ok:
        for choice in data["choices"].values():
            b = choice.get("blocking") if isinstance(choice, dict) else None
            ok = ok and isinstance(b, list) and len(b) == 3 and all(isinstance(v, int) and v > 0 for v in b)
    if not ok:
        warnings.warn(f"convkern: ignoring the GEMM blocking file {p}: made for another machine or build, or not "
                      f"a convkern blocking file", RuntimeWarning, stacklevel=3)
        return {}
    return data["choices"]


def stored() -> Optional[Blocking]:
    """The blocking measured for this machine, SIMD level and thread count, if any."""
    choice = _read().get(slot())
    return tuple(choice["blocking"]) if choice else None


def save(name: str, results: Dict[str, Dict[str, object]]) -> str:
    choices = _read()
    choices[slot()] = {"blocking": results[name]["blocking"], "chosen": name,
                       "gflops": {n: round(r["gflops"], 1) for n, r in results.items()}}
    p = path()
    os.makedirs(os.path.dirname(p), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".gemm-", dir=os.path.dirname(p))
    with os.fdopen(fd, "w") as f:
        json.dump({"format": FORMAT, "machine": _key(), "choices": choices}, f, indent=1)
    os.replace(tmp, p)  # atomic: a reader sees the old file or the new one
    return p


def apply() -> Optional[Blocking]:
    """Hand the stored blocking to the kernels (before any has run), unless
    CONVKERN_TUNE=off or CONVKERN_GEMM_BLOCKING is set. Returns what was applied."""
    from . import tune

    try:
        if tune.mode() == "off" or os.environ.get("CONVKERN_GEMM_BLOCKING"):
            return None
        b = stored()
    except (OSError, ValueError):  # a bad CONVKERN_TUNE is reported where tuning is used
        return None
    if b is None or not _cpu().set_tuned_gemm_blocking(*b):
        return None
    return b


if __name__ == "__main__":  # a child of measure(): time the GEMM under the blocking in the environment
    spec = json.loads(sys.argv[1])
    print(json.dumps(_speeds([tuple(s) for s in spec["shapes"]], spec["min_time"], spec.get("layers", ()))))
