"""The ``convkern`` command. Library commands live here (info, tune, verify);
the performance tools' (bench, bench-train, bench-net, gate) in convkern.perf,
imported only when they run; the application's (train, predict, featuremaps)
in convkern.app.cli_train; bench-dist in convkern.distributed.bench."""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import subprocess
import sys
from typing import List, Optional

import numpy as np


def _deferred(module: str, function: str):
    """A subcommand whose module is imported only when it runs: the bench and
    gate modules pull in more than `convkern info` needs."""
    def run(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(module), function)(args)
    return run


def _build_config() -> dict:
    try:
        cfg = importlib.import_module("convkern._build_config")
    except ImportError:
        return {}
    return {k: v for k, v in vars(cfg).items() if not k.startswith("_")}


def cuda_status() -> dict:
    """What the CUDA module says about this machine (never raises)."""
    try:
        cuda = importlib.import_module("convkern._cuda")
    except ImportError as exc:
        built = _build_config().get("cuda_built")
        why = "not built (no CUDA compiler at build time)" if built is False else f"not importable: {exc}"
        return {"module": False, "reason": why, "devices": []}
    n = cuda.device_count()
    devices = [cuda.device_info(i) for i in range(n)]
    return {"module": True, "reason": "" if n else cuda.unavailable_reason(), "devices": devices,
            "runtime": cuda.runtime_version(), "driver": cuda.driver_version()}


def cmd_info(args: argparse.Namespace) -> int:
    import convkern

    print(f"convkern {convkern.__version__}  (Python {platform.python_version()}, NumPy {np.__version__}, "
          f"{platform.machine()})")
    cfg = _build_config()
    if cfg:
        print("build: " + ", ".join(f"{k}={v}" for k, v in sorted(cfg.items())))
    try:
        from .backend import cpp

        if cpp._cpu is not None:
            bi = cpp._cpu.build_info()
            print(f"SIMD: {bi['simd_active']} in use (CPU supports up to {bi['simd_best']}; compiled: "
                  f"{', '.join(bi['simd_compiled'])}; CONVKERN_SIMD=scalar|avx2|avx512 forces one)")
            print(f"threads: {bi['num_threads']} (OpenMP {bi['openmp']}; OMP_NUM_THREADS or "
                  f"convkern.set_num_threads change it)")
            b, c = bi["gemm_blocking_f32"], bi["caches"]
            read = ", ".join(f"{name} {size // 1024} KiB {ways}-way" + ("" if known else " (not reported: default)")
                             for name, size, known, ways in zip(("L1d", "L2", "L3"), (c["l1d"], c["l2"], c["l3"]),
                                                                c["known"], c["ways"]))
            source = {"CONVKERN_GEMM_BLOCKING": "set by CONVKERN_GEMM_BLOCKING",
                      "convkern tune": "measured by convkern tune"}.get(
                b["source"], "micro-panels in L1d's ways, A block in half of L2, B block in half of L3")
            print(f"caches: {read}" + (" (set by CONVKERN_CACHES)" if c["source"] == "CONVKERN_CACHES"
                                        else " (read from this machine)"))
            print(f"GEMM blocking (float32, {bi['simd_active']}): register tile {b['MR']}x{b['NR']}, KC {b['KC']}, "
                  f"MC {b['MC']}, NC {b['NC']} ({source}); channels_last GEMM KC {b['rows_KC']} "
                  f"(the same, at most 512)")
    except ImportError:
        pass
    from . import machine, tune

    print(f"machine: {machine.describe()}")
    try:
        st = tune.status()
        print(f"tuning: CONVKERN_TUNE={st['mode']} ({st['choices']} choices in {st['cache']})")
    except ValueError as exc:
        print(f"tuning: {exc}")
    print("backends:")
    for b in convkern.backends():
        print(f"  {b}")
    cs = cuda_status()
    if not cs["module"]:
        print(f"CUDA: module {cs['reason']}")
    elif not cs["devices"]:
        print(f"CUDA: module built, no usable device ({cs['reason']})")
    else:
        print(f"CUDA: runtime {cs['runtime']}, driver {cs['driver']}")
        for i, d in enumerate(cs["devices"]):
            cc = ".".join(map(str, d["compute_capability"]))
            print(f"  device {i}: {d['name']} (sm_{cc.replace('.', '')}, {d['multiprocessors']} SMs, "
                  f"{d['total_memory'] / 2**30:.1f} GiB)")
    return 0


def _tune_gemm_blocking(args: argparse.Namespace) -> bool:
    """Time the GEMM blocking candidates and keep the winner; True when it
    differs from the blocking this process runs with."""
    from . import blocking
    from .backend import cpp

    cands = blocking.candidates()
    print("GEMM blocking (KC, MC, NC) candidates: "
          + ", ".join(f"{name} {','.join(map(str, b))}" for name, b in cands.items()))
    results = blocking.measure(cands, rounds=5 if args.exhaustive else 3)
    name = blocking.pick(results)
    for n, r in results.items():
        print(f"  {n:<9} {','.join(map(str, r['blocking'])):<14} {r['gflops']:7.1f} GFLOP/s (geometric mean)"
              + ("  <- chosen" if n == name else ""))
    print(f"kept in {blocking.save(name, results)}")
    now = cpp._cpu.build_info()["gemm_blocking_f32"]
    return list(results[name]["blocking"]) != [now["KC"], now["MC"], now["NC"]]


def cmd_tune(args: argparse.Namespace) -> int:
    """Measure now what the library would otherwise measure on first sight,
    or not at all: the GEMM blocking for this machine (unless --no-gemm),
    then the algorithm auto picks for the canonical layers at --batch, or for
    the convs of a model file from convkern train (one training step at
    --batch), forward and backward."""
    from . import tune
    from .perf.canonical import BY_NAME, CANONICAL

    names = args.layers.split(",") if args.layers else [layer.name for layer in CANONICAL]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown and not args.model:
        print(f"convkern tune: unknown layers {unknown}; known: {', '.join(BY_NAME)}", file=sys.stderr)
        return 2
    if not args.no_gemm and _tune_gemm_blocking(args):
        # this process's blocking is fixed: time the algorithms under the new one in a fresh process
        argv = ["tune", "--no-gemm", "--batch", str(args.batch), "--dtype", args.dtype]
        argv += (["--layers", args.layers] if args.layers else []) + (["--model", args.model] if args.model else [])
        argv += ["--exhaustive"] if args.exhaustive else []
        return subprocess.run([sys.executable, "-m", "convkern", *argv]).returncode
    with tune.forced("exhaustive" if args.exhaustive else "on"):
        before = dict(tune._stats)
        if args.model:
            from . import nn

            model, header = nn.load_model(args.model)
            x = np.random.default_rng(0).random((args.batch,) + tuple(header["input_shape"])).astype(
                next(iter(model.parameters())).data.dtype)
            model.train()
            y = model(x)
            model.backward(np.ones_like(y))
        else:
            from .functional import conv2d, conv2d_backward

            rng = np.random.default_rng(0)
            for name in names:
                layer = BY_NAME[name]
                xs, ws = layer.shapes(args.batch)
                x, w = rng.standard_normal(xs).astype(args.dtype), rng.standard_normal(ws).astype(args.dtype)
                y = conv2d(x, w, **layer.kwargs())
                conv2d_backward(rng.standard_normal(y.shape).astype(args.dtype), x, w, **layer.kwargs())
        st = tune.status()
    print(f"measured {st['measured'] - before['measured']} problems, {st['remembered'] - before['remembered']} "
          f"already known; {st['choices']} choices in {st['cache']}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from .perf.verify import TOLERANCE, verify

    names = args.backends.split(",") if args.backends else None
    seed = args.seed if args.seed is not None else int(np.random.SeedSequence().entropy % (2**32))
    results = verify(names, count=args.count, seed=seed, dtypes=tuple(args.dtypes.split(",")))
    print(f"convkern verify: {args.count} random problems per op, seed {seed}; "
          f"relative error ||out - ref|| / ||ref|| against the float64 reference")
    print(f"{'backend':<10} {'op':<34} {'dtype':<8} {'cases':>5} {'max rel err':>12} {'tol':>8}  result")
    failed = 0
    for r in results:
        if r.unsupported and not r.failures:
            print(f"{r.backend:<10} {r.op:<34} {r.dtype:<8} {'-':>5} {'-':>12} {'-':>8}  n/a (not implemented)")
            continue
        ok = r.passed
        failed += not ok
        print(f"{r.backend:<10} {r.op:<34} {r.dtype:<8} {r.cases:>5} {r.worst:>12.3g} "
              f"{TOLERANCE[r.dtype]:>8.0e}  {'ok' if ok else 'FAIL'}")
        for f in r.failures[:3]:
            print(f"    {f}")
    print(f"{sum(r.passed and not r.unsupported for r in results)} passed, {failed} failed")
    return 1 if failed else 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="convkern", description="convolution kernels: info, checks, benchmarks, gates and a trainable CNN")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="version, build, SIMD level, threads, backends, CUDA devices")
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("verify", help="check every available backend against the float64 reference")
    p.add_argument("--backends", help="comma-separated backend names (default: all available)")
    p.add_argument("--count", type=int, default=20, help="random problems per op and dtype (default 20)")
    p.add_argument("--seed", type=int, help="random seed (default: fresh each run, printed)")
    p.add_argument("--dtypes", default="float32,float64", help="comma-separated (default float32,float64)")
    p.set_defaults(func=cmd_verify)
    p = sub.add_parser("tune", help="measure and remember this machine's GEMM blocking and the fastest conv2d "
                                    "algorithm for layers, ahead of use")
    p.add_argument("--layers", help="comma-separated canonical layer names (default: all)")
    p.add_argument("--model", help="a model file from convkern train: tune its convs instead")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--exhaustive", action="store_true", help="measure longer (a quiet machine, stabler choices)")
    p.add_argument("--no-gemm", action="store_true",
                   help="skip timing the GEMM's cache blocking (about a minute) and tune the algorithms only")
    p.set_defaults(func=cmd_tune)
    p = sub.add_parser("bench", help="side-by-side benchmark of backends/algorithms (and PyTorch if installed)")
    p.add_argument("--ops", default="conv2d", help="comma-separated: conv2d, conv2d_backward, max_pool2d, "
                   "avg_pool2d and relu (each also _backward), gemm (each layer's per-image im2col GEMM, "
                   "256x2304x1568 and 2048^3; default conv2d)")
    p.add_argument("--backends", help="comma-separated backend names or backend:algo pairs "
                   "(default: every available CPU backend and algorithm)")
    p.add_argument("--layers", help="comma-separated canonical layer names (default: all)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--min-time", type=float, default=0.5, help="seconds of timing per cell (default 0.5)")
    p.add_argument("--json", help="write the full report as JSON")
    p.add_argument("--plot", help="write a bar chart PNG (needs matplotlib)")
    p.add_argument("--jsonl", help="append each row to this file as it finishes (JSON lines)")
    p.add_argument("--max-call-ms", type=float, help="an implementation whose checked call takes longer is "
                   "reported and not timed")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_deferred("convkern.perf.bench", "main_bench"))
    p = sub.add_parser("gate", help="performance-regression gate: instruction counts (default) or wall clock")
    p.add_argument("--wallclock", action="store_true", help="the coarse wall-clock gate instead")
    p.add_argument("--cases", help="comma-separated case names (default: all)")
    p.add_argument("--baseline", help="baseline JSON (default: bench/baseline/<kind>.json)")
    p.add_argument("--threshold", type=float, default=0.03, help="instruction rise that fails (default 0.03)")
    p.add_argument("--wall-threshold", type=float, default=1.0,
                   help="wall-clock ratio rise that fails (default 1.0, i.e. twice as slow)")
    p.add_argument("--rounds", type=int, default=21, help="wall-clock rounds (default 21)")
    p.add_argument("--update", action="store_true", help="write the baseline instead of checking")
    p.add_argument("--reason", help="with --update: why the new figures are right (kept in the file)")
    p.set_defaults(func=_deferred("convkern.perf.gate", "main_gate"))
    p = sub.add_parser("bench-train", help="the LeNet-like model's training step and inference, next to PyTorch")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--backends", help="comma-separated convkern backends (default cpp)")
    p.add_argument("--no-torch", action="store_true", help="leave PyTorch out even when installed")
    p.add_argument("--json", help="write the report as JSON")
    p.set_defaults(func=_deferred("convkern.perf.bench_train", "main"))
    p = sub.add_parser("bench-net", help="whole networks in PyTorch, patched onto convkern, next to torch's layouts")
    p.add_argument("--nets", help="comma-separated: resnet18, vgg11_bn, mobilenet_v2, lenet (default: all)")
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes (default 1,8)")
    p.add_argument("--size", type=int, default=112, help="input pixels of the ImageNet nets (default 112; 224 is "
                   "theirs)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--backends", default="cpp", help="comma-separated convkern backends (default cpp)")
    p.add_argument("--no-onnx", action="store_true", help="leave onnxruntime out even when installed")
    p.add_argument("--profile", action="store_true", help="per-op profile of a ResNet-18 training step, both ways")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", help="write the report as JSON")
    p.set_defaults(func=_deferred("convkern.perf.bench_net", "main"))
    from .app.cli_train import add_parsers
    from .distributed.bench import add_parser as add_bench_dist

    add_parsers(sub)
    add_bench_dist(sub)
    args = parser.parse_args(argv)
    _keep_freed_memory()
    return args.func(args)


def _keep_freed_memory() -> None:
    """The commands are whole processes of ours: keep freed memory for reuse
    (convkern.keep_freed_memory) unless CONVKERN_KEEP_FREED_MEMORY=0."""
    if os.environ.get("CONVKERN_KEEP_FREED_MEMORY", "1").strip() == "0":
        return
    import convkern

    try:
        convkern.keep_freed_memory()
    except convkern.BackendUnavailableError:  # no compiled module: nothing to tune
        pass


if __name__ == "__main__":
    sys.exit(main())
