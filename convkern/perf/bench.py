"""Side-by-side benchmarks: every backend and algorithm on the canonical
layers (and pooling/relu on a large activation), beside PyTorch when it is
installed, against the machine's own ceilings measured in the same run.
Each case is validated before it is timed.

Used by ``convkern bench`` and by the pytest-benchmark suite in bench/.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from .. import machine as _machine
from .. import backend as _backends
from .. import functional as F
from ..geometry import conv2d_geometry
from .canonical import BY_NAME, CANONICAL
from .verify import relative_error

OPS = ("conv2d", "conv2d_backward", "max_pool2d", "max_pool2d_backward", "avg_pool2d", "avg_pool2d_backward",
       "relu", "relu_backward", "gemm")
# (M, K, N): resnet_l3_3x3's forward over a batch of 8 as one GEMM; the gemm
# op adds each selected layer's per-image GEMM and 2048^3 (blocking.gemm_shapes)
GEMM_SHAPES = ((256, 2304, 1568),)
MEMORY_SHAPE = (8, 64, 112, 112)  # a ResNet stem activation: pooling and relu are timed on it


def median_time(fn: Callable[[], object], min_time: float = 0.5, min_reps: int = 3, max_reps: int = 100) -> float:
    """Median seconds per call after one warm-up call."""
    fn()
    times: List[float] = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < min_time and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


_BLAS_PEAK_SCRIPT = """
import json, time, statistics, numpy as np
a = np.random.default_rng(0).standard_normal((2048, 2048)).astype(np.float32)
a @ a
ts = []
t0 = time.perf_counter()
while len(ts) < 5 or (time.perf_counter() - t0 < {min_time} and len(ts) < 50):
    s = time.perf_counter(); a @ a; ts.append(time.perf_counter() - s)
print(json.dumps(2 * 2048**3 / statistics.median(ts) / 1e9))
"""


def blas_peak_gflops(min_time: float = 0.5) -> float:
    """FP32 GEMM rate of NumPy's BLAS at 2048^3, in a child process with the
    OPENBLAS_* variables removed: OpenBLAS then picks the kernel it would pick
    for this CPU (a variable such as OPENBLAS_CORETYPE=Haswell halves it on an
    AVX-512 core), and its threads, which keep spinning after a call, cannot
    steal the cores from the kernels timed here."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENBLAS_")}
    out = subprocess.run([sys.executable, "-c", _BLAS_PEAK_SCRIPT.format(min_time=min_time)], env=env,
                         capture_output=True, text=True, check=True, timeout=300)
    return float(out.stdout.strip().splitlines()[-1])


def measure_ceilings(min_time: float = 0.5) -> Dict[str, float]:
    """This machine's FP32 GEMM rate (the best BLAS here) and copy bandwidth, now."""
    rng = np.random.default_rng(0)
    try:
        gemm = blas_peak_gflops(min_time)
    except (OSError, subprocess.SubprocessError, ValueError):  # no child process: measure here
        a = rng.standard_normal((1536, 1536)).astype(np.float32)
        gemm = 2 * 1536**3 / median_time(lambda: a @ a, min_time) / 1e9
    big = rng.standard_normal(32 << 20).astype(np.float32)  # 128 MiB, past the caches
    dst = np.empty_like(big)
    tc = median_time(lambda: np.copyto(dst, big), min_time)
    return {"gemm_gflops": gemm, "copy_gbs": 2 * big.nbytes / tc / 1e9}


@dataclass
class Result:
    op: str
    problem: str
    impl: str                      # backend:algo, or torch
    ms: Optional[float]            # None: not timed (its check says why)
    rate: Optional[float]          # GFLOP/s or GB/s
    unit: str
    ceiling_pct: Optional[float]   # of the ceiling of the row's device
    check: str                     # what the output was validated against and the error, or why it failed


def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


@dataclass
class Case:
    op: str
    problem: str
    work: float        # FLOPs (compute ops) or bytes moved (memory ops)
    unit: str
    run: Callable[[], object]
    output: Callable[[], np.ndarray]
    device: str = "cpu"  # "cuda": timed with CUDA events after warm-up
    ran: object = ""     # for algo "auto": what ran (a callable asked right after the checked call)
    settle_s: float = 0.0  # seconds to let pass after timing it (see BLAS_SETTLE_S)


def _device_of(backend_name: str) -> str:
    return _backends.info(backend_name).device if backend_name != "torch" else "cpu"


def _on_device(device: str, *arrays):
    """The arrays on `device` (CuPy for "cuda"), and a function back to NumPy."""
    if device == "cpu":
        return arrays, np.asarray
    import cupy

    return tuple(cupy.asarray(a) for a in arrays), cupy.asnumpy


def _torch_gpu():
    torch = _torch()
    if torch is None or not torch.cuda.is_available():
        return None
    torch.backends.cudnn.allow_tf32 = False  # IEEE fp32 against IEEE fp32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
    return torch


def gpu_median_time(fn: Callable[[], object], reps: int = 50) -> float:
    """Median seconds per call on the GPU, by CUDA events, after warm-up."""
    import cupy

    for _ in range(3):
        fn()
    cupy.cuda.get_current_stream().synchronize()
    times = []
    for _ in range(reps):
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, end) / 1e3)
    return statistics.median(times)


def _torch_conv(torch, tensors, kw, backward: bool) -> Callable[[], object]:
    """PyTorch's conv2d (or its grad input, with grad weight computed too) on
    tensors (x, w, b, gy), wherever they live."""
    tx, tw, tb, tgy = tensors

    def run():
        if not backward:
            with torch.no_grad():
                return torch.nn.functional.conv2d(tx, tw, tb, **kw)
        txg = tx.detach().requires_grad_(True)
        twg = tw.detach().requires_grad_(True)
        torch.nn.functional.conv2d(txg, twg, None, **kw).backward(tgy)
        return txg.grad
    return run


def _what_ran(module) -> str:
    """The algorithm a backend's last conv call ran, and whether measured or by its rules."""
    from .. import tune

    return f"{module.last_algo()} ({'rules' if tune.mode() == 'off' else 'measured'})"


def conv_cases(layer_name: str, batch: int, impls: Sequence[str], backward: bool, rng) -> Dict[str, Case]:
    layer = BY_NAME[layer_name]
    xs, ws = layer.shapes(batch)
    x = rng.standard_normal(xs).astype(np.float32)
    w = (rng.standard_normal(ws) / np.sqrt(np.prod(ws[1:]))).astype(np.float32)
    b = rng.standard_normal(ws[0]).astype(np.float32)
    kw = layer.kwargs()
    g = conv2d_geometry(xs, ws, (ws[0],), **kw)
    gy = rng.standard_normal(g.output_shape).astype(np.float32)
    op = "conv2d_backward" if backward else "conv2d"
    work = g.flops * (2 if backward else 1)  # grad input + grad weight: twice the forward's FLOPs
    cases = {}
    for impl in impls:
        name, _, algo = impl.partition(":")
        module = _backends.get(name)
        if algo == "channels_last":  # the backend's own choice on channels_last arrays
            cases[impl] = _channels_last_case(name, op, layer_name, work, x, w, b, gy, kw, backward)
            continue
        problem = getattr(module, "algo_problem", None)
        if algo not in ("", "auto") and problem is not None and problem(g, algo, backward):
            continue  # the algorithm cannot run this layer (convkern says why when asked for it)
        ran: object = ""
        if algo == "auto" and hasattr(module, "last_algo"):
            ran = functools.partial(_what_ran, module)
        elif algo == "auto" and hasattr(module, "choose_algo"):
            ran = f"{module.choose_algo(g)} (rules)"
        device = _device_of(name)
        (xd, wd, bd, gyd), back = _on_device(device, x, w, b, gy)
        if backward:
            def run(name=name, algo=algo, xd=xd, wd=wd, gyd=gyd):
                return F.conv2d_backward(gyd, xd, wd, **kw, needs=(True, True, False), algo=algo, backend=name)[0]
        else:
            def run(name=name, algo=algo, xd=xd, wd=wd, bd=bd):
                return F.conv2d(xd, wd, bd, **kw, algo=algo, backend=name)
        cases[impl] = Case(op, layer_name, work, "GFLOP/s", run, (lambda run=run, back=back: back(run())), device,
                           ran, BLAS_SETTLE_S if (name, algo) == ("numba", "im2col") else 0.0)
    tg = _torch_gpu() if any(c.device == "cuda" for c in cases.values()) else None
    if tg is not None:
        run_cudnn = _torch_conv(tg, [tg.from_numpy(a).cuda() for a in (x, w, b, gy)], kw, backward)
        cases["torch:cudnn"] = Case(op, layer_name, work, "GFLOP/s", run_cudnn,
                                    lambda: run_cudnn().detach().cpu().numpy(), "cuda")
    torch = _torch()
    if torch is not None and (tg is None or any(c.device == "cpu" for c in cases.values())):
        # the CPU peers only beside CPU contenders (a GPU run compares with cuDNN), in
        # both of torch's layouts: channels_last is the one its users switch to for speed
        tensors = [torch.from_numpy(a) for a in (x, w, b, gy)]
        run_torch = _torch_conv(torch, tensors, kw, backward)
        cases["torch"] = Case(op, layer_name, work, "GFLOP/s", run_torch, lambda: run_torch().detach().numpy())
        cl = [t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t for t in tensors]
        run_cl = _torch_conv(torch, cl, kw, backward)
        cases["torch:channels_last"] = Case(op, layer_name, work, "GFLOP/s", run_cl,
                                            lambda: run_cl().detach().contiguous().numpy())
    return cases


def _channels_last_case(name: str, op: str, layer_name: str, work: float, x, w, b, gy, kw, backward: bool) -> Case:
    """The backend's own choice (auto) on channels_last arrays: its NHWC
    kernels, or the NCHW algorithms behind two layout copies where the
    autotuner found that faster."""
    from ..layout import is_channels_last, to_channels_last

    xc, gyc = to_channels_last(x), to_channels_last(gy)
    module = _backends.get(name)

    def layout_ran() -> str:
        text = F.last_layout().upper() + " kernels"
        # (forward: the algorithm; a backward runs several)
        return text if backward or not hasattr(module, "last_algo") else f"{text}, {_what_ran(module)}"

    ran = layout_ran if is_channels_last(xc) else "NCHW (one channel: both layouts)"
    if backward:
        def run():
            return F.conv2d_backward(gyc, xc, w, **kw, needs=(True, True, False), backend=name)[0]
    else:
        def run():
            return F.conv2d(xc, w, b, **kw, backend=name)
    return Case(op, layer_name, work, "GFLOP/s", run, lambda: np.ascontiguousarray(run()), "cpu", ran)


def memory_cases(op: str, impls: Sequence[str], shape, rng) -> Dict[str, Case]:
    """Pooling (2x2, stride 2) and relu, forward or backward; work = bytes read + written."""
    x = rng.standard_normal(shape).astype(np.float32)
    n, q = x.nbytes, x.nbytes // 4  # input and pooled-output bytes
    pooled = (shape[0], shape[1], shape[2] // 2, shape[3] // 2)
    gp = rng.standard_normal(pooled).astype(np.float32)
    gy = rng.standard_normal(shape).astype(np.float32)
    _, ind = F.max_pool2d(x, 2, return_indices=True, backend="reference")
    calls = {  # op -> (call(backend, x, gp, gy, ind), bytes moved)
        "max_pool2d": (lambda be, x, gp, gy, ind: F.max_pool2d(x, 2, backend=be), n + q),
        "max_pool2d_backward": (lambda be, x, gp, gy, ind: F.max_pool2d_backward(gp, x, ind, 2, backend=be),
                                3 * q + n),
        "avg_pool2d": (lambda be, x, gp, gy, ind: F.avg_pool2d(x, 2, backend=be), n + q),
        "avg_pool2d_backward": (lambda be, x, gp, gy, ind: F.avg_pool2d_backward(gp, x, 2, backend=be), q + n),
        "relu": (lambda be, x, gp, gy, ind: F.relu(x, backend=be), 2 * n),
        "relu_backward": (lambda be, x, gp, gy, ind: F.relu_backward(gy, x, backend=be), 3 * n),
    }
    fn, work = calls[op]
    problem = "x".join(map(str, shape)) + ("" if op.startswith("relu") else " 2x2/2")
    cases = {}
    for be in dict.fromkeys(impl.partition(":")[0] for impl in impls):  # no algorithms here
        device = _device_of(be)
        arrays, back = _on_device(device, x, gp, gy, ind)
        run = (lambda be=be, arrays=arrays: fn(be, *arrays))
        cases[be] = Case(op, problem, work, "GB/s", run, (lambda run=run, back=back: back(run())), device)
    for impl in impls:  # the NHWC kernels, on channels_last arrays
        if impl.endswith(":channels_last") and not op.startswith("relu"):
            from ..layout import to_channels_last

            arrays = [to_channels_last(a) for a in (x, gp, gy, ind)]
            run = (lambda be=impl.partition(":")[0], arrays=arrays: fn(be, *arrays))
            cases[impl] = Case(op, problem, work, "GB/s", run, (lambda run=run: np.ascontiguousarray(run())))
    tg = _torch_gpu() if any(c.device == "cuda" for c in cases.values()) else None
    peers = []  # (name, torch, device): PyTorch beside each device's contenders
    if tg is not None:
        peers.append(("torch:cuda", tg, "cuda"))
    if _torch() is not None and any(c.device == "cpu" for c in cases.values()):
        peers.append(("torch", _torch(), "cpu"))
    if _torch() is not None and any(c.device == "cpu" for c in cases.values()) and not op.startswith("relu"):
        peers.append(("torch:channels_last", _torch(), "cpu"))  # relu does not care about layout
    for peer, torch, device in peers:
        tx, tgp, tgy, tind = (torch.from_numpy(a).to(device) for a in (x, gp, gy, ind))
        if peer == "torch:channels_last":
            tx, tgp, tgy, tind = (t.contiguous(memory_format=torch.channels_last) for t in (tx, tgp, tgy, tind))
        aten = torch.ops.aten
        tfn = {
            "max_pool2d": lambda: torch.nn.functional.max_pool2d(tx, 2),
            "max_pool2d_backward": lambda: aten.max_pool2d_with_indices_backward(
                tgp, tx, [2, 2], [2, 2], [0, 0], [1, 1], False, tind),
            "avg_pool2d": lambda: torch.nn.functional.avg_pool2d(tx, 2),
            "avg_pool2d_backward": lambda: aten.avg_pool2d_backward(tgp, tx, [2, 2], [2, 2], [0, 0], False, True,
                                                                    None),
            "relu": lambda: torch.relu(tx),
            "relu_backward": lambda: aten.threshold_backward(tgy, tx, 0),
        }[op]
        cases[peer] = Case(op, problem, work, "GB/s", tfn, (lambda tfn=tfn: tfn().cpu().contiguous().numpy()),
                           device)
    return cases


def gemm_cases(shape, impls: Sequence[str], rng) -> Dict[str, Case]:
    """Our packed GEMM (the cpp backend's) beside NumPy's BLAS in this process
    and torch.mm; work = 2*M*N*K."""
    m, k, n = shape
    a = rng.standard_normal((m, k)).astype(np.float32)
    b = rng.standard_normal((k, n)).astype(np.float32)
    problem = f"{m}x{k}x{n}"
    cases = {}
    if any(impl.partition(":")[0] == "cpp" for impl in impls) and _backends.info("cpp").available:
        from ..backend import cpp

        cases["cpp"] = Case("gemm", problem, 2.0 * m * n * k, "GFLOP/s", lambda: cpp.gemm(a, b),
                            lambda: cpp.gemm(a, b))
    cases["numpy"] = Case("gemm", problem, 2.0 * m * n * k, "GFLOP/s", lambda: a @ b, lambda: a @ b,
                          settle_s=BLAS_SETTLE_S)
    torch = _torch()
    if torch is not None:
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        cases["torch"] = Case("gemm", problem, 2.0 * m * n * k, "GFLOP/s", lambda: torch.mm(ta, tb),
                              lambda: torch.mm(ta, tb).numpy())
    return cases


FAILED = ("MISMATCH", "ERROR", "OVER CAP")


def _validate(cases: Dict[str, Case], truth_key: Optional[str],
              max_call_s: Optional[float] = None) -> Dict[str, str]:
    """Each implementation's output against `truth_key`'s (torch when installed,
    else the float64 reference on small problems); with neither, against the
    first implementation's. A verdict starting with one of FAILED marks an
    implementation that is not timed: it raised, it disagreed, or its call
    took longer than max_call_s. The run goes on either way."""
    truth, label = None, truth_key
    if truth_key:
        try:
            truth = np.asarray(cases[truth_key].output())
        except Exception as exc:  # noqa: BLE001 - a broken peer is reported, not fatal
            truth, label = None, None
            broken = f"ERROR {type(exc).__name__}: {exc}"
        else:
            broken = None
    verdicts = {}
    for impl, case in cases.items():
        if impl == truth_key:
            verdicts[impl] = broken or ("peer" if impl.startswith("torch") else "oracle")
            continue
        t0 = time.perf_counter()
        try:
            out = np.asarray(case.output())
        except Exception as exc:  # noqa: BLE001 - one failing kernel must not end the run
            verdicts[impl] = f"ERROR {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            continue
        took = time.perf_counter() - t0
        if callable(case.ran):
            case.ran = case.ran()  # what this call ran, before another kernel runs
        if truth is None:
            truth, label = out, impl
            verdicts[impl] = "(first)"
        else:
            err = relative_error(out, truth)
            verdicts[impl] = f"{label} {err:.1e}" if err <= 1e-4 else f"MISMATCH against {label}: relative error {err:.3g}"
        if max_call_s is not None and took > max_call_s and not verdicts[impl].startswith("MISMATCH"):
            t0 = time.perf_counter()  # the first call may have paid for compiling or allocating: once more
            case.output()
            took = time.perf_counter() - t0
            if took > max_call_s:
                verdicts[impl] = f"OVER CAP: one call took {took:.3g} s (cap {max_call_s:g} s); {verdicts[impl]}"
    return verdicts


def measure_gpu_ceilings(reps: int = 20) -> Dict[str, float]:
    """The current GPU's copy bandwidth (a 1 GiB device-to-device copy) and
    FP32 GEMM rate (cuBLAS through CuPy at 8192^3, plain FP32: CuPy takes TF32
    only when CUPY_TF32=1, which is refused here), by CUDA events."""
    import cupy

    if os.environ.get("CUPY_TF32", "0") != "0":
        raise RuntimeError("CUPY_TF32 is set: the GPU GEMM ceiling must be plain FP32")
    def copy_seconds() -> float:  # its 2 GiB are freed on return, before the GEMM's
        src = cupy.random.default_rng(0).standard_normal(1 << 28, dtype=cupy.float32)
        dst = cupy.empty_like(src)
        return gpu_median_time(lambda: cupy.copyto(dst, src), reps)

    copy_s = copy_seconds()
    a = cupy.random.default_rng(1).standard_normal((8192, 8192), dtype=cupy.float32)
    gemm_s = gpu_median_time(lambda: a @ a, max(3, reps // 4))
    return {"gpu_copy_gbs": 2 * (1 << 28) * 4 / copy_s / 1e9, "gpu_gemm_gflops": 2 * 8192**3 / gemm_s / 1e9}


ROUNDS = 5

# OpenBLAS's threads (NumPy's matmul, and so the numba backend's im2col) keep
# spinning for about 2^28 cycles after a call: whatever is timed in that
# window shares the cores with them and reads up to 3x slower. Cases that call
# it are followed by this pause before the next case is timed.
BLAS_SETTLE_S = 0.25


def interleaved_peer_ms(peers: Dict[str, Dict[str, Callable[[], object]]], rounds: int,
                        reps: int = 1) -> Dict[str, Dict[str, float]]:
    """Median milliseconds per call of each peer's each call, over `rounds`
    rounds that take every one in turn, after a warm-up call of each (for
    whole-model timings: bench-train, bench-net). Each timed run follows an
    untimed call of the same function: OpenMP's idle threads spin for a while
    after a parallel region and would otherwise tax whoever runs next."""
    samples: Dict[str, Dict[str, List[float]]] = {p: {k: [] for k in fns} for p, fns in peers.items()}
    for fns in peers.values():  # warm-up: workspaces, JIT, first touch, tuning
        for fn in fns.values():
            fn()
    for _ in range(rounds):
        for p, fns in peers.items():
            for k, fn in fns.items():
                fn()
                t0 = time.perf_counter()
                for _ in range(reps):
                    fn()
                samples[p][k].append((time.perf_counter() - t0) / reps)
    return {p: {k: 1e3 * statistics.median(v) for k, v in ks.items()} for p, ks in samples.items()}


def _interleaved_times(cases: Dict[str, Case], min_time: float, rounds: int = ROUNDS) -> Dict[str, float]:
    """Median seconds per call of each case over `rounds` rounds that take
    every case in turn: a shared machine's state (and whatever the previous
    kernel left behind) then falls on all of them alike, where timing one
    case to the end and then the next favoured whichever came later."""
    samples: Dict[str, List[float]] = {impl: [] for impl in cases}
    time.sleep(max((case.settle_s for case in cases.values()), default=0.0))  # after the checks' calls
    for _ in range(rounds):
        for impl, case in cases.items():
            if case.device == "cuda":
                samples[impl].append(gpu_median_time(case.run, reps=10))
            else:
                samples[impl].append(median_time(case.run, min_time / rounds, min_reps=2))
            if case.settle_s:
                time.sleep(case.settle_s)
    return {impl: statistics.median(v) for impl, v in samples.items()}


def default_impls(names: Optional[Sequence[str]] = None) -> List[str]:
    """backend:algo for every available backend (the reference is the oracle, not a contender)."""
    out = []
    for info in _backends.backends():
        if not info.available or info.name == "reference":
            continue
        if names and info.name not in names:
            continue
        module = _backends.get(info.name)
        out += [f"{info.name}:{a}" for a in getattr(module, "ALGOS", ("direct",))]
        if hasattr(module, "conv2d_forward_nhwc"):
            out.append(f"{info.name}:channels_last")
    if names and "reference" in names:
        out.append("reference:direct")
    return out


def run(ops: Sequence[str] = ("conv2d",), impls: Optional[Sequence[str]] = None,
        layers: Sequence[str] = tuple(l.name for l in CANONICAL), batch: int = 8, min_time: float = 0.5,
        progress: bool = True, max_call_s: Optional[float] = None, jsonl: Optional[str] = None) -> dict:
    """Validate, then time, every (op, problem, implementation); returns a
    JSON-able report. An implementation that raises, disagrees or (with
    max_call_s) is too slow is recorded as such and not timed; the run goes
    on. With `jsonl`, each row is also appended to that file as it finishes."""
    impls = list(impls or default_impls())
    for name in dict.fromkeys(impl.partition(":")[0] for impl in impls):
        _backends.get(name)  # BackendUnavailableError saying why, before anything is timed
    ceilings = measure_ceilings()
    if any(_row_device(i) == "cuda" for i in impls):
        ceilings.update(measure_gpu_ceilings())
    machine = {"platform": platform.platform(), "processor": platform.processor(), "threads": _threads(),
               "simd": _simd(), "cpu": _machine.describe(), "gemm_blocking": _blocking()}
    sink = open(jsonl, "a") if jsonl else None
    if sink:
        sink.write(json.dumps({"machine": machine, "batch": batch, "ceilings": ceilings}) + "\n")
        sink.flush()
    rng = np.random.default_rng(0)
    jobs = []
    for op in ops:
        if op not in OPS:
            raise ValueError(f"unknown op {op!r}; choose from {', '.join(OPS)}")
        if op == "gemm" or op.startswith("conv2d"):
            for layer in layers:
                if layer not in BY_NAME:
                    raise ValueError(f"unknown layer {layer!r}; choose from {', '.join(BY_NAME)}")
        if op == "gemm":
            from ..blocking import gemm_shapes

            shapes = sorted(gemm_shapes(layers) + list(GEMM_SHAPES), key=lambda s: s[0] * s[1] * s[2])
            jobs.extend((op, shape) for shape in dict.fromkeys(shapes))
        elif op.startswith("conv2d"):
            jobs.extend((op, layer) for layer in layers)
        else:
            jobs.append((op, None))
    try:
        from tqdm import tqdm
    except ImportError:  # progress is a nicety, not a requirement
        tqdm = None
    bar = tqdm(total=len(jobs), desc="bench", unit="case", disable=not progress) if tqdm else None
    results: List[Result] = []
    for op, layer in jobs:
        if bar:
            bar.set_postfix_str(f"{op} {layer or ''}".strip() if op != "gemm" else op)
        skip = set()
        if op == "gemm":
            cases, small = gemm_cases(layer, impls, rng), False
        elif layer is not None:
            small = conv2d_geometry(*BY_NAME[layer].shapes(batch), None, **BY_NAME[layer].kwargs()).flops < 2e8
            extra = ["reference:direct"] if small and "reference:direct" not in impls else []
            cases = conv_cases(layer, batch, list(impls) + extra, op == "conv2d_backward", rng)
            skip = set(extra)
        else:
            cases = memory_cases(op, impls, (batch,) + MEMORY_SHAPE[1:], rng)
            small = False
        truth = next((p for p in _PEERS if p in cases),
                     "reference:direct" if small else None)
        verdicts = _validate(cases, truth, max_call_s)
        compute = cases[next(iter(cases))].unit == "GFLOP/s"
        seconds = _interleaved_times({i: c for i, c in cases.items()
                                      if i not in skip and not verdicts[i].startswith(FAILED)}, min_time)
        for impl, case in cases.items():
            if impl in skip:
                continue
            if verdicts[impl].startswith(FAILED):
                row = Result(op, case.problem, impl, None, None, case.unit, None, verdicts[impl])
            else:
                t = seconds[impl]
                gpu = case.device == "cuda" and "gpu_copy_gbs" in ceilings
                ceiling = ceilings[("gpu_" if gpu else "") + ("gemm_gflops" if compute else "copy_gbs")]
                rate = case.work / t / 1e9
                check = f"ran {case.ran}; {verdicts[impl]}" if case.ran else verdicts[impl]
                row = Result(op, case.problem, impl, t * 1e3, rate, case.unit, 100 * rate / ceiling, check)
            results.append(row)
            if sink:
                sink.write(json.dumps(asdict(row)) + "\n")
                sink.flush()
        if bar:
            bar.update(1)
    if bar:
        bar.close()
    if sink:
        sink.close()
    return {"machine": machine, "batch": batch, "ceilings": ceilings, "results": [asdict(r) for r in results]}


def _threads() -> int:
    try:
        import convkern

        return convkern.get_num_threads()
    except Exception:  # noqa: BLE001 - informative only
        return 0


def _blocking() -> str:
    try:
        from .. import blocking

        return blocking.describe()
    except ImportError:  # no compiled module
        return "no cpp backend"


def _simd() -> str:
    try:
        import convkern

        return convkern.simd_level()
    except Exception:  # noqa: BLE001 - informative only
        return "unknown"


_PEERS = ("torch", "torch:channels_last", "torch:cudnn", "torch:cuda")


def _row_device(impl: str) -> str:
    name = impl.partition(":")[0]
    if name == "torch":
        return "cpu" if impl in ("torch", "torch:channels_last") else "cuda"
    try:
        return _device_of(name)
    except Exception:  # noqa: BLE001 - a backend gone since the run: informative only
        return "cpu"


def table(report: dict) -> str:
    """One side-by-side table: time, rate, % of ceiling, ratio to the fastest and to torch."""
    c = report["ceilings"]
    gpu = (f"; GPU: FP32 GEMM {c['gpu_gemm_gflops']:.0f} GFLOP/s (cuBLAS, no TF32), copy {c['gpu_copy_gbs']:.0f} GB/s"
           if "gpu_copy_gbs" in c else "")
    m = report["machine"]
    lines = [f"machine: {m.get('cpu', m['processor'])}; {m.get('gemm_blocking', '')}",
             f"ceilings measured now: FP32 GEMM {c['gemm_gflops']:.0f} GFLOP/s (NumPy BLAS, OPENBLAS_* unset), "
             f"copy {c['copy_gbs']:.1f} GB/s{gpu}; {report['machine']['threads']} threads, "
             f"SIMD {report['machine']['simd']}, batch {report['batch']}",
             f"{'op':<20} {'problem':<20} {'impl':<20} {'ms':>10} {'rate':>14} {'%ceil':>6} {'vs best':>8} "
             f"{'vs torch':>9}  checked against"]
    groups: Dict[tuple, List[dict]] = {}
    for r in report["results"]:
        groups.setdefault((r["op"], r["problem"]), []).append(r)
    for (op, problem), rows in groups.items():
        timed = [r for r in rows if r["ms"] is not None]
        for r in rows:
            if r["ms"] is None:
                lines.append(f"{op:<20} {problem:<20} {r['impl']:<20} {'-':>10} {'-':>14} {'-':>6} {'-':>8} "
                             f"{'-':>9}  {r['check']}")
        if not timed:
            continue
        best = min(r["ms"] for r in timed)
        peer_ms: Dict[str, float] = {}  # the faster PyTorch layout on each device
        for r in timed:
            if r["impl"] in _PEERS:
                device = _row_device(r["impl"])
                peer_ms[device] = min(r["ms"], peer_ms.get(device, float("inf")))
        for r in timed:
            torch_ms = peer_ms.get(_row_device(r["impl"]))  # PyTorch on the same device
            vs_torch = f"{torch_ms / r['ms']:.2f}x" if torch_ms else "-"
            lines.append(f"{op:<20} {problem:<20} {r['impl']:<20} {r['ms']:>10.3f} "
                         f"{r['rate']:>8.1f} {r['unit']:<5} {r['ceiling_pct']:>5.0f}% {best / r['ms']:>7.2f}x "
                         f"{vs_torch:>9}  {r['check']}")
    lines.append("vs torch: speed relative to the faster of PyTorch's layouts (NCHW, channels_last) on the row's "
                 "device; above 1 is faster")
    return "\n".join(lines)


def plot(report: dict, path: str) -> None:
    """Bar chart of rate per problem and implementation."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise RuntimeError("--plot needs matplotlib: pip install 'convkern[bench]'") from exc
    rows = [r for r in report["results"] if r["ms"] is not None]
    problems = list(dict.fromkeys(f"{r['op']}\n{r['problem']}" for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    width = 0.8 / max(len(impls), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(problems) * max(1, len(impls)) / 2), 4.5))
    for i, impl in enumerate(impls):
        xs, ys = [], []
        for j, p in enumerate(problems):
            r = next((r for r in rows if f"{r['op']}\n{r['problem']}" == p and r["impl"] == impl), None)
            if r:
                xs.append(j + i * width)
                ys.append(r["ceiling_pct"])
        ax.bar(xs, ys, width, label=impl)
    ax.set_xticks([j + width * (len(impls) - 1) / 2 for j in range(len(problems))])
    ax.set_xticklabels(problems, fontsize=7, rotation=30, ha="right")
    ax.set_ylabel("% of the machine's ceiling (GEMM or copy)")
    ax.set_title("convkern bench")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main_bench(args) -> int:
    ops = args.ops.split(",")
    impls = None
    layers = args.layers.split(",") if args.layers else [l.name for l in CANONICAL]
    try:
        if args.backends:
            wanted = args.backends.split(",")
            plain = [w for w in wanted if ":" not in w]  # a bare backend name: all its algorithms
            for name in plain:  # default_impls would drop an unknown or unavailable one; run() checks the rest
                _backends.get(name)
            impls = [i for i in wanted if ":" in i] + (default_impls(plain) if plain else [])
        report = run(ops, impls, layers, args.batch, args.min_time, progress=not args.no_progress,
                     max_call_s=None if args.max_call_ms is None else args.max_call_ms / 1e3, jsonl=args.jsonl)
    except (ValueError, _backends.BackendUnavailableError) as exc:
        print(f"convkern bench: {exc}", file=sys.stderr)
        return 2
    print(table(report))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)
        print(f"wrote {args.json}")
    if args.plot:
        plot(report, args.plot)
        print(f"wrote {args.plot}")
    failed = [r for r in report["results"] if r["check"].startswith(FAILED)]
    for r in failed:
        print(f"convkern bench: {r['op']} {r['problem']} {r['impl']}: {r['check']}", file=sys.stderr)
    return 1 if failed else 0
