"""Performance-regression gates that hold on noisy shared machines.

Instruction gate (deterministic): each case calls one compiled kernel on a
small fixed problem under ``valgrind --tool=callgrind`` (a warm-up pass over all
cases, then the counted pass), counting only inside
the kernel (the bindings' ``kernel_region``; each call dumps its own counts),
with the SIMD level forced to AVX2 (valgrind cannot run AVX-512), one
thread and the cache sizes pinned (``CONVKERN_CACHES``: blocking and band
sizes follow the caches, so counts would otherwise differ between machines).
The counts are compared with a baseline kept in the repository; a rise
above the threshold (default 3%) fails.

Wall-clock gate (coarse): each case's median time divided by a calibration
kernel's (NumPy's sgemm and copy, which convkern does not touch), measured in
interleaved rounds in one process, against the baseline's ratios; only a rise
beyond a generous factor fails.

    convkern gate                      # instruction gate against bench/baseline/instructions.json
    convkern gate --wallclock          # wall-clock gate against bench/baseline/wallclock.json
    convkern gate --update --reason "why the new figures are right"   # re-baseline deliberately
"""

from __future__ import annotations

import datetime
import glob
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

DEFAULT_INSTRUCTIONS = Path("bench/baseline/instructions.json")
DEFAULT_WALLCLOCK = Path("bench/baseline/wallclock.json")
# the caches the instruction baseline was recorded with (an AMD EPYC's L1d, L2, L3)
GATE_CACHES = "48K/12,1M/16,32M/16"


def _randn(rng, shape) -> np.ndarray:
    """float32 normal samples in a 64-byte aligned buffer: where an array starts
    within a cache line changes the instruction count of libc's memcpy and of
    vector loops' remainders, and NumPy's own alignment follows the heap's state."""
    shape = tuple(shape)
    n = int(np.prod(shape))
    raw = np.empty(n * 4 + 64, dtype=np.uint8)
    start = (-raw.ctypes.data) % 64
    out = raw[start:start + n * 4].view(np.float32).reshape(shape)
    out[...] = rng.standard_normal(shape)
    return out


def _conv_inputs(rng, x_shape, w_shape):
    return _randn(rng, x_shape), _randn(rng, w_shape)


def _case_table(scale: int = 1) -> Dict[str, Callable[[np.random.Generator, str], Callable[[], object]]]:
    """name -> builder(rng, backend) returning a call that runs exactly one kernel.
    Inputs are made (and any helper results computed with the reference backend)
    before the call, so only the kernel is counted. `scale` multiplies the batch
    (the wall-clock gate wants calls long enough to time)."""
    import convkern as ck

    def batch(shape):
        return (shape[0] * scale,) + tuple(shape[1:])

    def conv_fwd(algo, x_shape, w_shape, **kw):
        def build(rng, backend):
            x, w = _conv_inputs(rng, batch(x_shape), w_shape)
            b = _randn(rng, (w_shape[0],))
            return lambda: ck.conv2d(x, w, b, **kw, algo=algo, backend=backend)
        return build

    def conv_bwd(algo, x_shape, w_shape, **kw):
        def build(rng, backend):
            x, w = _conv_inputs(rng, batch(x_shape), w_shape)
            y = ck.conv2d(x, w, **kw, backend="reference")
            gy = _randn(rng, y.shape)
            return lambda: ck.conv2d_backward(gy, x, w, **kw, algo=algo, backend=backend)
        return build

    def pool(op, shape, **kw):
        def build(rng, backend):
            x = _randn(rng, batch(shape))
            if op == "max_pool2d":
                return lambda: ck.max_pool2d(x, **kw, return_indices=True, backend=backend)
            if op == "avg_pool2d":
                return lambda: ck.avg_pool2d(x, **kw, backend=backend)
            y, ind = ck.max_pool2d(x, **kw, return_indices=True, backend="reference")
            gy = _randn(rng, y.shape)
            if op == "max_pool2d_backward":
                return lambda: ck.max_pool2d_backward(gy, x, ind, **kw, backend=backend)
            return lambda: ck.avg_pool2d_backward(gy, x, **kw, backend=backend)
        return build

    def relu(backward):
        def build(rng, backend):
            x = _randn(rng, batch((4, 16, 24, 24)))
            gy = _randn(rng, x.shape)
            if backward:
                return lambda: ck.relu_backward(gy, x, backend=backend)
            return lambda: ck.relu(x, backend=backend)
        return build

    small = ((2, 16, 14, 14), (32, 16, 3, 3))
    return {
        # each case names the algorithm it runs (cpp; other backends run their own)
        "conv2d_shifted_3x3": conv_fwd("shifted", *small, padding=1),
        "conv2d_direct_3x3": conv_fwd("direct", *small, padding=1),
        "conv2d_im2col_1x1": conv_fwd("im2col", (2, 32, 14, 14), (16, 32, 1, 1)),
        "conv2d_depthwise": conv_fwd("depthwise", (2, 32, 14, 14), (32, 1, 3, 3), padding=1, groups=32),
        "conv2d_shifted_stride2": conv_fwd("shifted", (2, 8, 21, 21), (16, 8, 5, 5), stride=2, padding=2),
        "conv2d_winograd_3x3": conv_fwd("winograd", (1, 64, 32, 32), (128, 64, 3, 3), padding=1),
        "conv2d_backward_shifted": conv_bwd("shifted", *small, padding=1),
        "conv2d_backward_direct": conv_bwd("direct", *small, padding=1),
        "max_pool2d_2x2": pool("max_pool2d", (4, 16, 24, 24), kernel_size=2),
        "max_pool2d_3x3s2p1": pool("max_pool2d", (4, 16, 24, 24), kernel_size=3, stride=2, padding=1),
        "max_pool2d_backward": pool("max_pool2d_backward", (4, 16, 24, 24), kernel_size=2),
        "avg_pool2d_3x3s2p1": pool("avg_pool2d", (4, 16, 24, 24), kernel_size=3, stride=2, padding=1),
        "avg_pool2d_backward": pool("avg_pool2d_backward", (4, 16, 24, 24), kernel_size=3, stride=2, padding=1),
        "relu": relu(False),
        "relu_backward": relu(True),
    }


def case_names() -> List[str]:
    return list(_case_table())


def _build(names: List[str], backend: str, scale: int = 1) -> List[Callable[[], object]]:
    table = _case_table(scale)
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValueError(f"unknown gate cases {unknown}; known: {', '.join(table)}")
    # seeded by name, so a case gets the same data whichever cases run with it
    return [table[n](np.random.default_rng(zlib.crc32(n.encode())), backend) for n in names]


# ------------------------------------------------------------ instructions


def run_cases_twice(names: List[str], backend: str = "cpp") -> None:
    """The body run under callgrind: every case once to warm up, then every case
    again; only the second pass is counted. The first call in a process pays
    one-off costs (the OpenMP runtime starting, workspaces growing through
    malloc) whose size depends on the heap's state, hence on the environment
    and on which cases ran before: counting them made the figures move by a few
    percent between machines."""
    calls = _build(names, backend)
    for _ in range(2):
        for call in calls:
            call()


def count_instructions(names: List[str], backend: str = "cpp", env: Optional[dict] = None) -> Dict[str, int]:
    """Instructions executed inside the kernel of each case (callgrind, AVX2, 1 thread)."""
    if shutil.which("valgrind") is None:
        raise RuntimeError("valgrind is not installed (Debian/Ubuntu: apt-get install valgrind)")
    from ..backend import cpp

    if backend == "cpp" and not cpp._cpu.build_info().get("callgrind_dumps"):
        raise RuntimeError("convkern._cpu was built without <valgrind/callgrind.h>; install valgrind's "
                           "headers and rebuild to use the instruction gate")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "cg.out")
        # nothing machine-specific: the rules' blocking for fixed caches, no measured choices
        e = dict(os.environ, OMP_NUM_THREADS="1", CONVKERN_SIMD="avx2", CONVKERN_CACHES=GATE_CACHES,
                 CONVKERN_TUNE="off", **(env or {}))
        e.pop("CONVKERN_GEMM_BLOCKING", None)
        cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--toggle-collect=*kernel_region*",
               sys.executable, "-m", "convkern.perf.gate", "_run", backend, ",".join(names)]
        r = subprocess.run(cmd, capture_output=True, text=True, env=e, cwd=tmp, timeout=1800)
        if r.returncode != 0:
            raise RuntimeError(f"the gate run under valgrind failed:\n{r.stderr[-3000:]}")
        dumps = sorted(glob.glob(out + ".*"), key=lambda p: int(p.rsplit(".", 1)[1]))
        if len(dumps) != 2 * len(names):
            raise RuntimeError(f"expected two callgrind dumps per case ({2 * len(names)}), got {len(dumps)}")
        counts = {}
        for name, path in zip(names, dumps[len(names):]):  # the warm-up pass is not counted
            m = re.search(r"^totals:\s*(\d+)", Path(path).read_text(), re.M)
            if m is None:
                raise RuntimeError(f"no totals in {path}")
            counts[name] = int(m.group(1))
        return counts


# ------------------------------------------------------------ wall clock


def _calibration() -> Callable[[], object]:
    """Single-threaded NumPy work convkern does not touch: a sort (compute) and
    a 16 MiB copy (memory), so the ratio tracks the machine's speed of the moment."""
    rng = np.random.default_rng(7)
    keys = rng.standard_normal(1 << 15).astype(np.float32)
    big = rng.standard_normal(1 << 22).astype(np.float32)

    def run():
        np.sort(keys)
        big.copy()
    return run


WALL_SCALE = 8        # batch multiplier: calls of about a millisecond or more
WALL_SAMPLE = 5e-3    # seconds each timing sample lasts at least


def time_ratios(names: List[str], rounds: int = 21, backend: str = "cpp") -> Dict[str, float]:
    """Median over interleaved rounds of (case time / calibration time), on one
    thread so the other core's load matters less."""
    import convkern

    calls = dict(zip(names, _build(names, backend, scale=WALL_SCALE)))
    cal = _calibration()

    def clock(fn, reps):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t0) / reps

    before_threads = convkern.get_num_threads()
    convkern.set_num_threads(1)
    try:
        for f in calls.values():
            f()  # warm-up: workspaces, first touch
        reps = {n: max(1, int(WALL_SAMPLE / max(clock(f, 1), 1e-7))) for n, f in calls.items()}
        cal_reps = max(1, int(WALL_SAMPLE / max(clock(cal, 1), 1e-7)))
        samples: Dict[str, List[float]] = {n: [] for n in names}
        for _ in range(rounds):
            for n, f in calls.items():
                before = clock(cal, cal_reps)
                t = clock(f, reps[n])
                after = clock(cal, cal_reps)
                samples[n].append(t / (0.5 * (before + after)))
    finally:
        convkern.set_num_threads(before_threads if before_threads > 0 else 0)
    return {n: statistics.median(v) for n, v in samples.items()}


# ------------------------------------------------------------ comparison


@dataclass
class Verdict:
    case: str
    baseline: float
    now: float
    limit: float  # now/baseline above this fails

    @property
    def ratio(self) -> float:
        return self.now / self.baseline if self.baseline else float("inf")

    @property
    def failed(self) -> bool:
        return self.ratio > self.limit


def compare(baseline: Dict[str, float], now: Dict[str, float], limit: float) -> List[Verdict]:
    missing = [n for n in now if n not in baseline]
    if missing:
        raise ValueError(f"no baseline for {missing}: re-baseline with --update --reason ...")
    return [Verdict(n, float(baseline[n]), float(v), limit) for n, v in now.items()]


GLOBAL_FACTOR = 1.5  # the all-cases median may drift this much further than one case


def compare_wallclock(baseline: Dict[str, float], now: Dict[str, float], limit: float
                      ) -> Tuple[List[Verdict], float]:
    """Judge each case relative to the median drift of all cases: a shared
    machine's changing state (memory vs compute contention) moves every ratio
    together, a regression moves one kernel. A slowdown of everything is caught
    by the median's own, wider limit (and exactly by the instruction gate)."""
    raw = compare(baseline, now, limit)
    state = statistics.median(v.ratio for v in raw)
    verdicts = [Verdict(v.case, v.baseline * state, v.now, limit) for v in raw]
    if state > GLOBAL_FACTOR * limit:
        verdicts = [Verdict(v.case, v.baseline, v.now, GLOBAL_FACTOR * limit) for v in raw]
    return verdicts, state


def load_baseline(path: Path) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"no baseline at {path}: create one with `convkern gate --update --reason ...`")
    return json.loads(path.read_text())


def simd_level() -> str:
    from ..backend import cpp
    return cpp._cpu.simd_level()


def machine_kind() -> str:
    """What a wall-clock baseline is kept per: the SIMD level and the CPU's
    vendor and family. Times against NumPy depend on both: AVX-512 has kernels
    AVX2 lacks (the 2x2 max pool ran 5x its AVX-512 ratio on an AVX2 machine),
    and relu ran 1.7-1.8x its AMD ratio on an AVX-512 Intel Xeon."""
    from .. import machine

    m = machine.identity()
    return f"{simd_level()} {m['vendor'] or 'unknown-vendor'} family {m['family'] or '?'}"


def wallclock_values(data: dict, kind: str) -> Optional[Dict[str, float]]:
    """The wall-clock baseline for a machine kind, or None: a machine of a kind
    without one is not judged by this gate (the instruction gate, pinned to
    AVX2 and one thread, covers every machine)."""
    return data.get("by_machine", {}).get(kind)


def save_baseline(path: Path, kind: str, values: Dict[str, float], reason: str) -> None:
    """Record `values` (some cases or all) for `kind`; the baselines of the
    cases not measured, and of other machine kinds, stay as they were."""
    old = json.loads(path.read_text()) if path.exists() else {}
    history = old.get("history", [])
    entry = {"date": datetime.date.today().isoformat(), "reason": reason}
    data = {
        "kind": kind,
        "conditions": (f"callgrind, CONVKERN_SIMD=avx2, OMP_NUM_THREADS=1, CONVKERN_CACHES={GATE_CACHES}, float32"
                       if kind == "instructions"
                       else f"1 thread, batch x{WALL_SCALE}, median of interleaved rounds of "
                            "case time / (numpy sort of 32K floats + 16 MiB copy) time, per machine kind "
                            "(SIMD level, CPU vendor and family)"),
    }
    if kind == "wallclock":
        machine = machine_kind()
        entry["machine"] = machine
        by_machine = old.get("by_machine", {})
        data["by_machine"] = {**by_machine, machine: {**by_machine.get(machine, {}), **values}}
    else:
        data["values"] = {**old.get("values", {}), **values}
    history.append(entry)
    data["history"] = history
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def report(verdicts: List[Verdict], unit: str) -> Tuple[str, bool]:
    lines = [f"{'case':<28} {'baseline':>14} {'now':>14} {'ratio':>7}  result"]
    failed = False
    for v in verdicts:
        failed |= v.failed
        fmt = "{:>14,.0f}" if unit == "instructions" else "{:>14.3f}"
        lines.append(f"{v.case:<28} {fmt.format(v.baseline)} {fmt.format(v.now)} {v.ratio:>7.3f}  "
                     + ("FAIL" if v.failed else "ok"))
    return "\n".join(lines), failed


def main_gate(args) -> int:
    names = args.cases.split(",") if args.cases else case_names()
    if args.wallclock:
        kind, path, limit = "wallclock", Path(args.baseline or DEFAULT_WALLCLOCK), 1.0 + args.wall_threshold
        if not args.update:
            data = load_baseline(path)
            if wallclock_values(data, machine_kind()) is None:
                print(f"no wall-clock baseline for this machine kind ({machine_kind()}) in {path} (recorded: "
                      f"{'; '.join(sorted(data.get('by_machine', {}))) or 'none'}): not judged here; the "
                      "instruction gate still is. Record one on such a machine with `convkern gate --wallclock "
                      "--update --reason ...`")
                return 0
        now = time_ratios(names, rounds=args.rounds)
        if args.update:  # a baseline deserves more care than a check: median of three measurements
            runs = [now] + [time_ratios(names, rounds=args.rounds) for _ in range(2)]
            now = {n: statistics.median(r[n] for r in runs) for n in names}
    else:
        kind, path, limit = "instructions", Path(args.baseline or DEFAULT_INSTRUCTIONS), 1.0 + args.threshold
        now = count_instructions(names)
    if args.update:
        if not args.reason:
            print("convkern gate --update needs --reason: say why the new figures are right", file=sys.stderr)
            return 2
        save_baseline(path, kind, now, args.reason)
        print(f"wrote {len(now)} {kind} baselines to {path}")
        return 0
    data = load_baseline(path)
    if kind == "wallclock":
        base = wallclock_values(data, machine_kind())
        verdicts, state = compare_wallclock(base, now, limit)
        if any(v.failed for v in verdicts):
            # a real slowdown persists; a burst of load on a shared machine rarely does
            again = [v.case for v in verdicts if v.failed]
            print(f"re-measuring {', '.join(again)} before failing")
            now.update(time_ratios(again, rounds=args.rounds))
            verdicts, state = compare_wallclock(base, now, limit)
        print(f"machine state: cases run {state:.2f}x their baseline ratios overall (median); "
              f"each case is judged relative to that, and the median itself fails above {GLOBAL_FACTOR * limit:.1f}x")
    else:
        verdicts = compare(data["values"], now, limit)
    text, failed = report(verdicts, kind)
    print(f"{kind} gate against {path} (fails above {limit:.2f}x the baseline)")
    print(text)
    print(f"{sum(not v.failed for v in verdicts)} passed, {sum(v.failed for v in verdicts)} failed")
    return 1 if failed else 0


if __name__ == "__main__" and len(sys.argv) >= 4 and sys.argv[1] == "_run":
    run_cases_twice(sys.argv[3].split(","), backend=sys.argv[2])
