"""`convkern bench-net`: whole networks in PyTorch with their convs, pools and
relus on convkern (convkern.torch.patch), next to torch's NCHW and
channels_last layouts and, for inference, onnxruntime when installed.

One process, interleaved rounds (every peer once per round, so the shared
machine's state hits all of them alike), medians; every peer's eval-mode
logits are checked against torch's before anything is timed. Ratios are to
the faster torch layout. Also: the adapter's own cost per call on a tiny
op, and (--profile) a per-op profile of patched ResNet-18 beside torch's.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

TORCH_PEERS = ("torch NCHW", "torch channels_last")


def machine() -> Dict[str, object]:
    """CPU model, SIMD level, cores and threads, with the ceilings measured now."""
    import convkern
    from .. import blocking
    from .. import machine as this_machine
    from .bench import measure_ceilings

    return {"cpu": this_machine.describe(), "simd": convkern.simd_level(), "cores": os.cpu_count(),
            "threads": convkern.get_num_threads(), "gemm_blocking": blocking.describe(), **measure_ceilings(0.3)}


def machine_line(info: Dict[str, object]) -> str:
    return (f"machine: {info['cpu']}, {info['simd']}, convkern threads {info['threads']}; {info['gemm_blocking']}; "
            f"ceilings now: BLAS SGEMM {info['gemm_gflops']:.0f} GFLOP/s, copy {info['copy_gbs']:.1f} GB/s")


def _inputs(torch, name: str, batch: int, size: int):
    from ..torch.nets import INPUT

    channels, default = INPUT[name]
    size = default if name == "lenet" else size
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, channels, size, size, generator=g)


KEPT = "inference, weights kept"  # (convkern.cached_weights: each Winograd filter transform made once)


def _peer_runs(torch, model, x, fmt, kept: bool = False) -> Dict[str, Callable[[], object]]:
    model = model.to(memory_format=fmt)
    x = x.contiguous(memory_format=fmt)

    def infer():
        model.eval()
        with torch.no_grad():
            return model(x)

    def train():
        model.train()
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()

    runs = {"inference": infer, "train step": train}
    if kept:
        from ..weight_cache import cached_weights

        cache = cached_weights()

        def infer_kept():
            with cache:
                return infer()

        runs[KEPT] = infer_kept
    return runs


def _onnx_run(torch, model, x) -> Optional[Callable[[], object]]:
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    import io

    buf = io.BytesIO()
    torch.onnx.export(model.eval(), (x,), buf, input_names=["x"], output_names=["y"], dynamo=False)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    sess = ort.InferenceSession(buf.getvalue(), opts, providers=["CPUExecutionProvider"])
    feed = {"x": x.numpy()}
    return lambda: sess.run(None, feed)[0]


def run(nets: Sequence[str], batches: Sequence[int], size: int = 112, rounds: int = 5,
        backends: Sequence[str] = ("cpp",), onnx: bool = True, progress: bool = True) -> dict:
    import torch

    import convkern.torch as ckt
    from .bench import interleaved_peer_ms
    from ..torch.nets import NETS

    results: List[dict] = []
    for name in nets:
        for batch in batches:
            torch.manual_seed(0)
            base = NETS[name]()
            x = _inputs(torch, name, batch, size)
            peers: Dict[str, Dict[str, Callable[[], object]]] = {
                "torch NCHW": _peer_runs(torch, copy.deepcopy(base), x, torch.contiguous_format),
                "torch channels_last": _peer_runs(torch, copy.deepcopy(base), x, torch.channels_last)}
            for b in backends:
                peers[f"convkern {b}"] = _peer_runs(torch, ckt.patch(copy.deepcopy(base), backend=b), x,
                                                    torch.contiguous_format, kept=True)
                peers[f"convkern {b} channels_last"] = _peer_runs(
                    torch, ckt.patch(copy.deepcopy(base), backend=b), x, torch.channels_last, kept=True)
            if onnx:
                ort_run = _onnx_run(torch, copy.deepcopy(base), x)
                if ort_run is not None:
                    peers["onnxruntime"] = {"inference": ort_run}
            want = peers["torch NCHW"]["inference"]().numpy()
            for peer, fns in peers.items():  # validate before timing
                for kind in ("inference", KEPT):
                    if kind not in fns:
                        continue
                    got = np.asarray(fns[kind]())
                    err = float(np.linalg.norm(got - want) / np.linalg.norm(want))
                    if err > 1e-3:
                        raise RuntimeError(f"bench-net: {peer}'s {name} logits ({kind}) differ from torch's "
                                           f"(relative {err:.2g})")
            row = {"net": name, "batch": batch, "size": int(x.shape[-1]), "ms": interleaved_peer_ms(peers, rounds)}
            results.append(row)
            if progress:
                print(_row_text(row), flush=True)
    return {"rounds": rounds, "rows": results}


def _best_torch(row: dict, kind: str) -> float:
    """torch's faster layout for `kind` (torch's own inference for the kept-weights row)."""
    return min(row["ms"][p]["inference" if kind == KEPT else kind] for p in TORCH_PEERS)


def _row_text(row: dict) -> str:
    cells = []
    for peer, ks in row["ms"].items():
        for kind, ms in ks.items():
            cells.append(f"{peer} {kind} {ms:.2f} ms ({_best_torch(row, kind) / ms:.2f}x)")
    return f"{row['net']} b{row['batch']} {row['size']}px: " + "; ".join(cells)


def table(report: dict) -> str:
    peers = list(report["rows"][0]["ms"]) if report["rows"] else []
    width = max([24] + [len(p) + 2 for p in peers])  # every column apart, the longest name included
    lines = [f"ms per call, median of {report['rounds']} interleaved rounds; (Nx) = speed relative to the faster "
             f"torch layout in that row, above 1 is faster"]
    for kind in ("inference", KEPT, "train step"):
        if not any(kind in row["ms"][p] for row in report["rows"] for p in peers):
            continue
        lines.append(f"\n{kind}" + (" (convkern.cached_weights(); torch's figures are its plain inference)"
                                     if kind == KEPT else ""))
        lines.append(f"{'net':<14}{'batch':>6}{'px':>5}" + "".join(f"{p:>{width}}" for p in peers))
        for row in report["rows"]:
            best = _best_torch(row, kind)
            cells = [f"{row['ms'][p][kind]:>10.2f} ({best / row['ms'][p][kind]:.2f}x)" if kind in row["ms"][p]
                     else "-" for p in peers]
            lines.append(f"{row['net']:<14}{row['batch']:>6}{row['size']:>5}" + "".join(f"{c:>{width}}" for c in cells))
    return "\n".join(lines)


def adapter_overhead(reps: int = 3000) -> Dict[str, float]:
    """Microseconds per call of relu on a 1x1x4x4 tensor: torch's, convkern's
    bare kernel on the NumPy view, and through convkern.torch (with and
    without autograd): the difference is the adapter's own cost."""
    import torch

    import convkern
    import convkern.torch as ckt

    t = torch.randn(1, 1, 4, 4)
    tg = t.clone().requires_grad_()
    a = t.numpy()
    calls = {"torch.relu": lambda: torch.relu(t), "convkern.relu on the NumPy view": lambda: convkern.relu(a),
             "convkern.torch.relu": lambda: ckt.relu(t), "convkern.torch.relu, requires_grad": lambda: ckt.relu(tg)}
    out = {}
    for name, fn in calls.items():
        for _ in range(200):
            fn()
        best = []
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            best.append((time.perf_counter() - t0) / reps * 1e6)
        out[name] = min(best)
    return out


TORCH_OWN = ("aten::native_batch_norm", "aten::native_batch_norm_backward", "aten::add", "aten::add_")


def _profiled_step(model, x, steps: int):
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    step = _peer_runs(torch, model, x, torch.contiguous_format)["train step"]
    step()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    averages = prof.key_averages()
    own = sum(e.self_cpu_time_total for e in averages if e.key in TORCH_OWN) / 1e3 / steps
    return averages, own


def profile(size: int = 112, batch: int = 8, steps: int = 3, rows: int = 14, rounds: int = 3) -> dict:
    """torch.profiler's per-op table (self CPU time) for a ResNet-18 training
    step, unpatched and patched, and the time of torch's own ops in it
    (BatchNorm and adds, which stay torch's in the patched model) both ways,
    median over `rounds` alternating rounds: how much convkern's kernels
    running beside torch's slow torch's own."""
    import torch

    import convkern.torch as ckt
    from ..torch.nets import ResNet18

    torch.manual_seed(0)
    base = ResNet18()
    x = _inputs(torch, "resnet18", batch, size)
    models = {"torch NCHW": copy.deepcopy(base), "convkern (patched)": ckt.patch(copy.deepcopy(base))}
    own: Dict[str, List[float]] = {k: [] for k in models}
    tables = {}
    for _ in range(rounds):
        for label, model in models.items():
            averages, ms = _profiled_step(model, x, steps)
            own[label].append(ms)
            tables[label] = averages.table(sort_by="self_cpu_time_total", row_limit=rows)
    medians = {k: statistics.median(v) for k, v in own.items()}
    text = "\n".join(f"ResNet-18 training step, batch {batch}, {size}px, {steps} steps: {label}\n{table}"
                     for label, table in tables.items())
    text += (f"\ntorch's own ops ({', '.join(TORCH_OWN)}) per training step, median of {rounds} rounds: "
             f"{medians['torch NCHW']:.2f} ms unpatched, {medians['convkern (patched)']:.2f} ms patched "
             f"({medians['convkern (patched)'] / medians['torch NCHW']:.2f}x)")
    return {"text": text, "torch_own_ms": medians}


def main(args) -> int:
    try:
        import torch  # noqa: F401
    except ImportError:
        print("bench-net needs PyTorch: pip install torch")
        return 2
    from ..torch.nets import NETS

    nets = args.nets.split(",") if args.nets else list(NETS)
    unknown = [n for n in nets if n not in NETS]
    if unknown:
        print(f"bench-net: unknown nets {unknown}; the nets are {', '.join(NETS)}")
        return 2
    info = machine()
    print(machine_line(info) + f"; torch threads {torch.get_num_threads()}")
    report = run(nets, [int(b) for b in args.batches.split(",")], args.size, args.rounds,
                 args.backends.split(","), onnx=not args.no_onnx, progress=not args.no_progress)
    print(table(report))
    report["machine"] = info
    report["adapter_us"] = adapter_overhead()
    print("\nadapter cost, microseconds per relu call on a 1x1x4x4 tensor:")
    for k, v in report["adapter_us"].items():
        print(f"  {k:<40}{v:8.1f}")
    if args.profile:
        report["profile"] = profile(args.size)
        print("\n" + report["profile"]["text"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0
