"""conv2d forward (or forward + backward) on the canonical layers: time and
GFLOP/s of each convkern algorithm beside PyTorch CPU when it is installed.

    python bench/bench_conv.py                      # all layers, batch 8, forward
    python bench/bench_conv.py --backward --layers resnet_l1_3x3,mnist_conv2
    python bench/bench_conv.py --impls cpp:im2col,numba:im2col,numba:direct

Every timed result is first checked against PyTorch (when installed) or
against the other algorithm (validate, then time). Times are medians of
repeated calls after a warm-up; compare ratios from one run, not across days.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import convkern  # noqa: E402
from convkern.geometry import conv2d_geometry  # noqa: E402
from convkern.verify import relative_error  # noqa: E402
from layers import BY_NAME, CANONICAL  # noqa: E402


def median_time(fn: Callable[[], object], min_time: float, min_reps: int = 3) -> float:
    fn()  # warm-up: first-touch of buffers, workspace growth
    times: List[float] = []
    start = time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= 200:
            break
    return statistics.median(times)


def load_torch(threads: int):
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(threads)
    return torch


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", default=",".join(BY_NAME), help="comma-separated layer names")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--impls", default="cpp:direct,cpp:im2col",
                    help="comma-separated backend:algo pairs, e.g. cpp:im2col,numba:im2col")
    ap.add_argument("--backward", action="store_true",
                    help="time forward + grad input + grad weight together (counted as 3x the forward FLOPs)")
    ap.add_argument("--min-time", type=float, default=1.0, help="seconds of timing per cell")
    ap.add_argument("--no-torch", action="store_true")
    args = ap.parse_args(argv)

    threads = convkern.get_num_threads()
    torch = None if args.no_torch else load_torch(threads)
    impls = args.impls.split(",")
    for impl in impls:
        name, _, algo = impl.partition(":")
        if not algo:
            ap.error(f"--impls entries are backend:algo, got {impl!r}")
        if name == "numba":  # report the JIT cost once, apart from the timings
            t0 = time.perf_counter()
            convkern.conv2d(np.ones((1, 2, 5, 5), np.float32), np.ones((2, 2, 3, 3), np.float32), algo=algo,
                            backend="numba")
            print(f"numba {algo}: first call (compile or load from cache) {time.perf_counter() - t0:.2f} s")
    malloc = "tuned" if os.environ.get("MALLOC_MMAP_THRESHOLD_") else "default"
    print(f"convkern {convkern.__version__}: SIMD {convkern.simd_level()}, {threads} threads, "
          f"glibc malloc {malloc}, batch {args.batch}, float32"
          + (f"; torch {torch.__version__}" if torch else "; torch not installed"))
    cols = impls + (["torch"] if torch else [])
    head = f"{'layer':<15} {'GFLOP':>7}" + "".join(f" {c + ' ms':>16} {'GF/s':>6}" for c in cols)
    if torch:
        head += "  best/torch"
    print(head)
    rng = np.random.default_rng(0)
    ratios = []
    for name in args.layers.split(","):
        layer = BY_NAME[name]
        xs, ws = layer.shapes(args.batch)
        x = rng.standard_normal(xs).astype(np.float32)
        w = (rng.standard_normal(ws) / np.sqrt(np.prod(ws[1:]))).astype(np.float32)
        b = rng.standard_normal(ws[0]).astype(np.float32)
        kw = layer.kwargs()
        g = conv2d_geometry(xs, ws, (ws[0],), **kw)
        gy = rng.standard_normal(g.output_shape).astype(np.float32)
        flops = g.flops * (3 if args.backward else 1)  # backward: grad input + grad weight ~ 2x forward
        fns: Dict[str, Callable[[], object]] = {}
        outs: Dict[str, np.ndarray] = {}
        for impl in impls:
            backend, _, algo = impl.partition(":")

            def run(algo=algo, backend=backend):
                y = convkern.conv2d(x, w, b, **kw, algo=algo, backend=backend)
                if args.backward:
                    convkern.conv2d_backward(gy, x, w, **kw, needs=(True, True, False), algo=algo,
                                             backend=backend)
                return y
            fns[impl] = run
            outs[impl] = run()
        if torch:
            tx, tw, tb = (torch.from_numpy(a) for a in (x, w, b))
            tgy = torch.from_numpy(gy)

            def run_torch():
                if not args.backward:
                    with torch.no_grad():
                        return torch.nn.functional.conv2d(tx, tw, tb, **kw)
                txg = tx.detach().requires_grad_(True)
                twg = tw.detach().requires_grad_(True)
                y = torch.nn.functional.conv2d(txg, twg, tb, **kw)
                y.backward(tgy)
                return y
            fns["torch"] = run_torch
            expect = run_torch().detach().numpy()
        else:
            expect = outs[impls[0]]
        for impl in impls:  # validate, then time
            err = relative_error(outs[impl], expect)
            if not err <= 1e-4:
                print(f"{name}: {impl} disagrees with the check (relative error {err:.3g}); not timing it")
                return 1
        row = f"{name:<15} {flops / 1e9:>7.3f}"
        times = {}
        for c in cols:
            t = median_time(fns[c], args.min_time)
            times[c] = t
            row += f" {t * 1e3:>16.3f} {flops / t / 1e9:>6.1f}"
        if torch:
            best = min(times[i] for i in impls)
            ratios.append(times["torch"] / best)
            row += f"  {times['torch'] / best:>9.2f}x"
        print(row, flush=True)
    if ratios:
        print(f"geometric mean speed vs torch (best algorithm per layer): "
              f"{float(np.exp(np.mean(np.log(ratios)))):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
