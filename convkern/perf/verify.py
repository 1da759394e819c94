"""Check backends against the float64 reference on random problems.

Used by ``convkern verify`` and by the test suite. The error measure is the
relative norm error ``||out - ref|| / ||ref||`` (NaN positions must agree),
with a tolerance per dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np

from .. import backend as _backends
from .. import functional as F
from ..geometry import conv2d_geometry

TOLERANCE: Dict[str, float] = {"float32": 1e-5, "float64": 1e-12}


def relative_error(out, ref) -> float:
    """||out - ref|| / ||ref|| over the finite entries; inf if shapes, NaN or
    infinity positions differ. A zero reference compares absolutely."""
    out = np.asarray(out, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if out.shape != ref.shape:
        return float("inf")
    nan_out, nan_ref = np.isnan(out), np.isnan(ref)
    if not np.array_equal(nan_out, nan_ref):
        return float("inf")
    inf_ref = np.isinf(ref)
    if not np.array_equal(out[inf_ref], ref[inf_ref]) or np.isinf(out[~inf_ref]).any():
        return float("inf")
    keep = ~(nan_ref | inf_ref)
    diff = np.linalg.norm(out[keep] - ref[keep])
    scale = np.linalg.norm(ref[keep])
    return float(diff / scale) if scale > 0 else float(diff)


def max_abs_error_at(out, ref) -> str:
    """Where the largest mismatch is, for failure messages."""
    out = np.asarray(out, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if out.shape != ref.shape:
        return f"shape {out.shape} vs reference {ref.shape}"
    d = np.abs(np.nan_to_num(out - ref, nan=np.inf))
    d[np.isnan(out) & np.isnan(ref)] = 0
    d[(out == ref)] = 0
    i = np.unravel_index(int(np.argmax(d)), d.shape) if d.size else ()
    return f"largest at {tuple(int(v) for v in i)}: {out[i] if d.size else ''} vs {ref[i] if d.size else ''}"


class DeviceOps:
    """convkern's ops, with NumPy arguments moved to the backend's device and
    results moved back, so one check serves CPU and GPU backends:
    ``DeviceOps().conv2d(x, w, backend="cupy")`` takes and returns NumPy arrays."""

    def __getattr__(self, name):
        fn = getattr(F, name)

        def call(*args, backend=None, **kwargs):
            device = _backends.info(backend).device if backend else "cpu"
            if device != "cpu":
                import cupy

                def move(a):
                    if isinstance(a, np.ndarray):
                        return cupy.asarray(a)
                    return type(a)(move(v) for v in a) if isinstance(a, tuple) else a

                args = tuple(move(a) for a in args)
                kwargs = {k: move(v) for k, v in kwargs.items()}
                out = fn(*args, backend=backend, **kwargs)

                def back(a):
                    if isinstance(a, cupy.ndarray):
                        return cupy.asnumpy(a)
                    return type(a)(back(v) for v in a) if isinstance(a, tuple) else a

                return back(out)
            return fn(*args, backend=backend, **kwargs)

        return call


@dataclass
class ConvCase:
    x_shape: Tuple[int, int, int, int]
    w_shape: Tuple[int, int, int, int]
    bias: bool
    stride: Tuple[int, int]
    padding: object
    dilation: Tuple[int, int]
    groups: int

    def kwargs(self) -> dict:
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups)


@dataclass
class PoolCase:
    x_shape: Tuple[int, int, int, int]
    kernel_size: Tuple[int, int]
    stride: Tuple[int, int]
    padding: Tuple[int, int]
    dilation: Tuple[int, int]
    ceil_mode: bool
    count_include_pad: bool = True
    divisor_override: Optional[int] = None


def random_conv_case(rng: np.random.Generator) -> ConvCase:
    """A small random conv2d problem covering groups, dilation, stride > kernel,
    per-axis and 'same'/'valid' padding, 1x1 images and batch 1."""
    groups = int(rng.choice([1, 1, 1, 2, 3]))
    depthwise = rng.random() < 0.15
    cg = 1 if depthwise else int(rng.integers(1, 5))
    kg = int(rng.integers(1, 5))
    if depthwise:
        groups = int(rng.integers(1, 6))
    C, K = cg * groups, kg * groups
    R, S = int(rng.integers(1, 6)), int(rng.integers(1, 6))
    dh, dw = (int(rng.integers(1, 4)), int(rng.integers(1, 4))) if rng.random() < 0.3 else (1, 1)
    sh, sw = (int(rng.integers(1, 5)), int(rng.integers(1, 5))) if rng.random() < 0.5 else (1, 1)
    mode = rng.random()
    if mode < 0.1 and (sh, sw) == (1, 1):
        padding: object = "same"
    elif mode < 0.2:
        padding = "valid"
    else:
        padding = (int(rng.integers(0, 4)), int(rng.integers(0, 4)))
    pad = (0, 0) if isinstance(padding, str) else padding
    # at least one output row/column
    min_h = max(1, dh * (R - 1) + 1 - 2 * pad[0])
    min_w = max(1, dw * (S - 1) + 1 - 2 * pad[1])
    H = min_h + int(rng.integers(0, 12))
    W = min_w + int(rng.integers(0, 12))
    if padding == "same":
        H, W = max(H, 1), max(W, 1)
    N = int(rng.integers(1, 4))
    return ConvCase((N, C, H, W), (K, cg, R, S), bool(rng.random() < 0.7), (sh, sw), padding, (dh, dw), groups)


def random_pool_case(rng: np.random.Generator, avg: bool) -> PoolCase:
    kh, kw = int(rng.integers(1, 5)), int(rng.integers(1, 5))
    sh, sw = int(rng.integers(1, 5)), int(rng.integers(1, 5))
    ph, pw = int(rng.integers(0, kh // 2 + 1)), int(rng.integers(0, kw // 2 + 1))
    dh, dw = (1, 1) if avg or rng.random() < 0.6 else (int(rng.integers(1, 4)), int(rng.integers(1, 4)))
    H = max(1, dh * (kh - 1) + 1 - 2 * ph) + int(rng.integers(0, 10))
    W = max(1, dw * (kw - 1) + 1 - 2 * pw) + int(rng.integers(0, 10))
    N, C = int(rng.integers(1, 3)), int(rng.integers(1, 4))
    div = int(rng.integers(1, 10)) if avg and rng.random() < 0.2 else None
    return PoolCase((N, C, H, W), (kh, kw), (sh, sw), (ph, pw), (dh, dw), bool(rng.random() < 0.4),
                    bool(rng.random() < 0.5), div)


@dataclass
class Check:
    backend: str
    op: str
    dtype: str
    cases: int = 0
    worst: float = 0.0
    failures: List[str] = field(default_factory=list)
    unsupported: bool = False  # the backend does not implement this op

    @property
    def passed(self) -> bool:
        return not self.failures and self.worst <= TOLERANCE[self.dtype]


def _compare(check: Check, out, ref, label: str) -> None:
    err = relative_error(out, ref)
    check.cases += 1
    check.worst = max(check.worst, err)
    if not err <= TOLERANCE[check.dtype]:
        check.failures.append(f"{label}: relative error {err:.3g}; {max_abs_error_at(out, ref)}")


def _ops(backend: str, algo: str, rng: np.random.Generator, dtype, count: int
         ) -> Iterator[Tuple[str, Callable[[], object], Callable[[], object], str]]:
    """(op name, backend call, reference call, label) for `count` random problems per op."""
    ref = "reference"
    D = DeviceOps()  # the backend under test, on its own device

    def arr(shape):
        return rng.standard_normal(shape).astype(dtype)

    # an algorithm that runs only some problems (cpp's depthwise, shifted,
    # winograd) is checked on `count` random problems it runs
    problem = getattr(_backends.get(backend), "algo_problem", None)
    found = tries = 0
    while found < count and tries < 100 * count:
        tries += 1
        c = random_conv_case(rng)
        if problem is not None:
            g = conv2d_geometry(c.x_shape, c.w_shape, None, **c.kwargs())
            if problem(g, algo, False) or problem(g, algo, True):
                continue
        i, found = found, found + 1
        x, w = arr(c.x_shape), arr(c.w_shape)
        b = arr((c.w_shape[0],)) if c.bias else None
        kw = c.kwargs()
        label = f"case {i}: x{c.x_shape} w{c.w_shape} {kw}"
        y = F.conv2d(x, w, b, **kw, backend=ref)
        gy = arr(y.shape)
        yield (f"conv2d[{algo}]", lambda x=x, w=w, b=b, kw=kw: D.conv2d(x, w, b, **kw, algo=algo, backend=backend),
               lambda y=y: y, label)
        got = {}

        def back(gy=gy, x=x, w=w, kw=kw):
            got["b"] = D.conv2d_backward(gy, x, w, **kw, algo=algo, backend=backend)
            got["r"] = F.conv2d_backward(gy, x, w, **kw, backend=ref)
            return got["b"][0]

        yield f"conv2d_backward[{algo}].input", back, lambda: got["r"][0], label
        yield f"conv2d_backward[{algo}].weight", lambda: got["b"][1], lambda: got["r"][1], label
        yield f"conv2d_backward[{algo}].bias", lambda: got["b"][2], lambda: got["r"][2], label
    if algo != "direct":
        return
    for i in range(count):
        p = random_pool_case(rng, avg=False)
        x = arr(p.x_shape)
        kw = dict(kernel_size=p.kernel_size, stride=p.stride, padding=p.padding, dilation=p.dilation,
                  ceil_mode=p.ceil_mode)
        label = f"case {i}: x{p.x_shape} {kw}"
        y, ind = F.max_pool2d(x, **kw, return_indices=True, backend=ref)
        gy = arr(y.shape)
        yield "max_pool2d", lambda x=x, kw=kw: D.max_pool2d(x, **kw, backend=backend), lambda y=y: y, label
        yield ("max_pool2d.indices", lambda x=x, kw=kw: D.max_pool2d(x, **kw, return_indices=True,
                                                                      backend=backend)[1],
               lambda ind=ind: ind, label)
        yield ("max_pool2d_backward", lambda gy=gy, x=x, ind=ind, kw=kw: D.max_pool2d_backward(
            gy, x, ind, **kw, backend=backend),
               lambda gy=gy, x=x, ind=ind, kw=kw: F.max_pool2d_backward(gy, x, ind, **kw, backend=ref), label)
    for i in range(count):
        p = random_pool_case(rng, avg=True)
        x = arr(p.x_shape)
        kw = dict(kernel_size=p.kernel_size, stride=p.stride, padding=p.padding, ceil_mode=p.ceil_mode,
                  count_include_pad=p.count_include_pad, divisor_override=p.divisor_override)
        label = f"case {i}: x{p.x_shape} {kw}"
        y = F.avg_pool2d(x, **kw, backend=ref)
        gy = arr(y.shape)
        yield "avg_pool2d", lambda x=x, kw=kw: D.avg_pool2d(x, **kw, backend=backend), lambda y=y: y, label
        yield ("avg_pool2d_backward", lambda gy=gy, x=x, kw=kw: D.avg_pool2d_backward(gy, x, **kw, backend=backend),
               lambda gy=gy, x=x, kw=kw: F.avg_pool2d_backward(gy, x, **kw, backend=ref), label)
    for i in range(count):
        shape = tuple(int(v) for v in rng.integers(1, 40, size=int(rng.integers(1, 5))))
        x = arr(shape)
        x.flat[:: 7] = 0.0  # the kink itself
        gy = arr(shape)
        label = f"case {i}: shape {shape}"
        yield "relu", lambda x=x: D.relu(x, backend=backend), lambda x=x: F.relu(x, backend=ref), label
        yield ("relu_backward", lambda gy=gy, x=x: D.relu_backward(gy, x, backend=backend),
               lambda gy=gy, x=x: F.relu_backward(gy, x, backend=ref), label)


def verify(backend_names: Optional[List[str]] = None, count: int = 20, seed: Optional[int] = None,
           dtypes=("float32", "float64")) -> List[Check]:
    """Run every op of every available backend against the reference on
    `count` random problems per op and dtype."""
    # the reference is the oracle: checking it against itself proves nothing
    names = backend_names or [b.name for b in _backends.backends() if b.available and b.name != "reference"]
    seed = int(np.random.SeedSequence().entropy % (2**32)) if seed is None else seed
    results: List[Check] = []
    for name in names:
        module = _backends.get(name)
        for dtype in dtypes:
            checks: Dict[str, Check] = {}
            for algo in getattr(module, "ALGOS", ("direct",)):
                rng = np.random.default_rng(seed)
                for op, run, expect, label in _ops(name, algo, rng, np.dtype(dtype), count):
                    check = checks.setdefault(op, Check(name, op, dtype))
                    try:
                        _compare(check, run(), expect(), label)
                    except _backends.UnsupportedOpError:
                        check.unsupported = True
                    except Exception as exc:  # noqa: BLE001 - a crash is a failure to report
                        check.cases += 1
                        check.failures.append(f"{label}: raised {type(exc).__name__}: {exc}")
            results.extend(checks.values())
    return results
