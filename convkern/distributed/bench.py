"""`convkern bench-dist`: data-parallel training throughput at 1, 2, ...
ranks on this machine, the scaling efficiency, and the communication model's
prediction for a cluster from the measured single-rank step.

Each rank count runs as its own ``mpiexec -n R`` job (one kernel thread per
rank unless --threads says otherwise), the rank counts interleaved over
--rounds so the shared machine's drift hits each alike; the figure is the
median round. A job times --steps training steps after --warmup, on
synthetic images of the architecture's input size, and reports the
images/s over all ranks and the time its ranks spent in the gradient
allreduce.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

from .cost import LINKS, gradient_bytes, ring_allreduce_seconds

INPUTS = {"lenet": (1, 28, 28), "lenet5": (1, 28, 28), "small": (1, 28, 28), "vgg": (3, 32, 32)}


def _worker(args: argparse.Namespace) -> None:
    from .. import nn
    from .comm import init
    from .data_parallel import DataParallel

    comm = init()
    shape = INPUTS[args.arch]
    model = nn.build(args.arch, shape, 10, rng=0)
    net = DataParallel(model, comm)
    opt = nn.SGD(model.parameters(), lr=0.01, momentum=0.9)
    crit = nn.CrossEntropyLoss()
    rng = np.random.default_rng(comm.rank)
    x = rng.random((args.batch_size,) + shape, dtype=np.float32)
    y = rng.integers(0, 10, args.batch_size)
    reduce_s = [0.0]
    real = net.allreduce_gradients

    def timed_allreduce():
        t0 = time.perf_counter()
        real()
        reduce_s[0] += time.perf_counter() - t0

    net.allreduce_gradients = timed_allreduce

    def step():
        opt.zero_grad()
        crit(net(x), y)
        net.backward(crit.backward(), need_input_grad=False)
        opt.step()

    for _ in range(args.warmup):
        step()
    comm.barrier("the benchmark's start")
    reduce_s[0] = 0.0
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    comm.barrier("the benchmark's end")
    seconds = time.perf_counter() - t0
    per_rank = comm.allgather_obj(reduce_s[0], "the allreduce times")
    if comm.rank == 0:
        print(json.dumps({"ranks": comm.size, "seconds": seconds, "steps": args.steps,
                          "images_per_s": args.steps * args.batch_size * comm.size / seconds,
                          "allreduce_s": max(per_rank), "bytes": gradient_bytes(model),
                          "buckets": len(net.bucket_sizes)}))


def _mpiexec() -> str:
    here = Path(sys.executable).with_name("mpiexec")
    found = str(here) if here.exists() else shutil.which("mpiexec")
    if found is None:
        raise SystemExit("convkern bench-dist: no mpiexec; pip install 'convkern[distributed]'")
    return found


def _run(ranks: int, args: argparse.Namespace) -> Dict[str, float]:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), CONVKERN_TUNE="off")
    cmd = [_mpiexec(), "-n", str(ranks), sys.executable, "-m", "convkern.distributed.bench", "--worker",
           "--arch", args.arch, "--batch-size", str(args.batch_size), "--steps", str(args.steps),
           "--warmup", str(args.warmup)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        raise SystemExit(f"convkern bench-dist: {ranks} ranks failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(args: argparse.Namespace) -> int:
    from .. import nn

    if args.arch not in INPUTS:
        print(f"convkern bench-dist: --arch must be one of {', '.join(INPUTS)}", file=sys.stderr)
        return 2
    ranks = sorted({int(r) for r in args.ranks.split(",")})
    if not ranks or ranks[0] < 1:
        print(f"convkern bench-dist: --ranks must be positive integers, got {args.ranks!r}", file=sys.stderr)
        return 2
    from ..perf.bench_net import machine as measured_machine

    info = measured_machine()
    print(f"machine: {info['cpu']}, {info['simd']}; ceilings now: BLAS SGEMM {info['gemm_gflops']:.0f} GFLOP/s, "
          f"copy {info['copy_gbs']:.1f} GB/s")
    print(f"{args.arch}, batch {args.batch_size} per rank, {args.threads} kernel thread(s) per rank, "
          f"{args.steps} steps after {args.warmup}, median of {args.rounds} interleaved rounds")
    runs: Dict[int, List[dict]] = {r: [] for r in ranks}
    for _ in range(args.rounds):
        for r in ranks:
            runs[r].append(_run(r, args))
    med = {r: sorted(rs, key=lambda d: d["images_per_s"])[len(rs) // 2] for r, rs in runs.items()}
    base = med[ranks[0]]["images_per_s"] / ranks[0]
    print(f"{'ranks':>5} {'images/s':>10} {'step ms':>8} {'allreduce ms':>13} {'efficiency':>10}")
    rows = []
    for r in ranks:
        m = med[r]
        step_ms = 1e3 * m["seconds"] / m["steps"]
        red_ms = 1e3 * m["allreduce_s"] / m["steps"]
        eff = m["images_per_s"] / (r * base)
        rows.append(dict(m, step_ms=step_ms, allreduce_ms=red_ms, efficiency=eff))
        print(f"{r:>5} {m['images_per_s']:>10.0f} {step_ms:>8.2f} {red_ms:>13.3f} {eff:>10.2f}")
    one = med[ranks[0]]
    compute_s = one["seconds"] / one["steps"]
    model = nn.build(args.arch, INPUTS[args.arch], 10, rng=0)
    nbytes = gradient_bytes(model)
    print(f"\nmodel: {nbytes / 1e6:.2f} MB of gradients allreduced per step in {one['buckets']} bucket(s); "
          f"step at {ranks[0]} rank(s) {1e3 * compute_s:.2f} ms")
    counts = [2, 4, 8, 16, 64]
    print(f"{'predicted scaling efficiency (ring allreduce, no overlap)':<60}" +
          "".join(f"{'N=' + str(n):>8}" for n in counts))
    model_rows = {}
    for name, (bw, lat) in LINKS.items():
        effs = [compute_s / (compute_s + ring_allreduce_seconds(nbytes, n, bw, lat, one["buckets"])) for n in counts]
        model_rows[name] = effs
        print(f"  {name:<58}" + "".join(f"{e:>8.2f}" for e in effs))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "arch": args.arch,
                                               "batch_size": args.batch_size, "threads": args.threads,
                                               "rows": rows, "model": model_rows, "rounds": runs}, indent=1,
                                              default=str))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("bench-dist", help="data-parallel training throughput at 1, 2, ... MPI ranks, and a "
                                          "model of the scaling on a cluster")
    _options(p)
    p.set_defaults(func=main)


def _options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", default="lenet", choices=sorted(INPUTS))
    p.add_argument("--ranks", default="1,2", help="comma-separated rank counts (default 1,2)")
    p.add_argument("--batch-size", type=int, default=32, help="per rank (default 32)")
    p.add_argument("--threads", type=int, default=1, help="kernel threads per rank (default 1)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--timeout", type=float, default=600, help="seconds one job may take")
    p.add_argument("--json", help="write the report as JSON")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m convkern.distributed.bench")
    parser.add_argument("--worker", action="store_true", help="be one rank of a benchmark job")
    _options(parser)
    a = parser.parse_args()
    if a.worker:
        _worker(a)
    else:
        sys.exit(main(a))
