"""The C++ CPU backend: wraps the compiled module convkern._cpu."""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from .. import layout
from ..geometry import ConvGeometry, PoolGeometry, check_layout

NAME = "cpp"
DEVICE = "cpu"
# each runs exactly what it names (see algo_problem for where each applies);
# "auto" is the C++ rule, which choose_algo reports
ALGOS = ("direct", "depthwise", "im2col", "shifted", "winograd", "winograd4")

try:
    from .. import _cpu  # type: ignore[attr-defined]
    check_layout("convkern._cpu", _cpu.geometry_fields())
    _IMPORT_ERROR = ""
except (ImportError, AttributeError) as exc:  # broken installs, or a malformed CONVKERN_* setting
    _cpu = None
    _IMPORT_ERROR = f"compiled module convkern._cpu is not importable ({exc})"
    if "CONVKERN_" not in str(exc):
        _IMPORT_ERROR += "; reinstall with `pip install .`"
else:
    from .. import blocking

    blocking.apply()  # the GEMM blocking `convkern tune` measured here, before any kernel runs


def available() -> Tuple[bool, str]:
    return (_cpu is not None), _IMPORT_ERROR


def choose_algo(g: ConvGeometry, backward: bool = False, dtype="float32") -> str:
    """What algo="auto" runs for g (backward: for its grad input). The rule
    itself lives in the C++ module (csrc/kernels_isa.cpp), where the kernels
    and their workspace limits are; this reports its choice."""
    return _cpu.conv_auto_algo(g.as_tuple(), bool(backward), dtype if isinstance(dtype, str) else np.dtype(dtype).name)


def algo_problem(g: ConvGeometry, algo: str, backward: bool = False) -> Optional[str]:
    """Why `algo` cannot run g (backward: its grad input), or None."""
    return _cpu.conv_algo_problem(g.as_tuple(), algo, bool(backward))


def threads() -> int:
    return int(_cpu.num_threads())


def simd_level() -> str:
    return str(_cpu.simd_level())


def last_algo() -> str:
    """The algorithm this thread's last conv2d call ran (backward: for its grad
    input): what "auto" picked, and where a named one handed the call on
    (winograd gives non-finite data to im2col)."""
    return _cpu.last_conv_algo()


def conv2d_forward(x, weight, bias, g: ConvGeometry, algo: str, relu: bool = False):
    """relu=True stores relu(y): applied in place within the call."""
    return _cpu.conv2d_forward(x, weight, bias, g.as_tuple(), algo, bool(relu))


def conv2d_backward(grad_output, x, weight, g: ConvGeometry, algo: str, needs=(True, True, True)):
    return tuple(_cpu.conv2d_backward(grad_output, x, weight, g.as_tuple(), algo,
                                      bool(needs[0]), bool(needs[1]), bool(needs[2])))


def max_pool2d_forward(x, g: PoolGeometry, indices: bool = True):
    """(y, indices); indices=False skips computing them and returns (y, None)."""
    y, ind = _cpu.max_pool2d_forward(x, g.as_tuple(), bool(indices))
    return y.reshape(g.output_shape), (ind.reshape(g.output_shape) if indices else None)


def max_pool2d_backward(grad_output, indices, g: PoolGeometry):
    return _cpu.max_pool2d_backward(grad_output, indices, g.as_tuple()).reshape(g.input_shape)


def avg_pool2d_forward(x, g: PoolGeometry, count_include_pad: bool = True, divisor_override: int = 0):
    y = _cpu.avg_pool2d_forward(x, g.as_tuple(count_include_pad, divisor_override))
    return y.reshape(g.output_shape)


def avg_pool2d_backward(grad_output, g: PoolGeometry, count_include_pad: bool = True,
                        divisor_override: int = 0):
    gx = _cpu.avg_pool2d_backward(grad_output, g.as_tuple(count_include_pad, divisor_override))
    return gx.reshape(g.input_shape)


# channels_last: arrays in and out are C-contiguous (N, H, W, C); weights (K, C/G, R, S)


# the NHWC forward's algorithms, by name (their winograd code): its GEMMs and Winograd's F(2x2, 3x3) and
# F(4x4, 3x3); "implicit" also passes pixel_rows
_NHWC_WINOGRAD = {"auto": -1, "im2col": 0, "implicit": 0, "winograd": 2, "winograd4": 4}


def nhwc_forward_algos(g: ConvGeometry) -> Tuple[str, ...]:
    """The algorithms conv2d_forward_nhwc can be told to run on g: a GEMM
    ("im2col": over output pixels, patches read in place, or where the
    weights outnumber the batch's pixels over output channels, weights read
    in place), "implicit" (over output pixels whatever the shape; offered
    where the two may differ, one group and no more pixels than output
    channels), and Winograd for 3x3 stride-1 undilated ungrouped convs;
    none for a depthwise conv (its own loops run)."""
    if g.groups == g.C == g.K and g.groups > 1:
        return ()
    gemms = ("im2col", "implicit") if g.groups == 1 and g.K >= g.N * g.Ho * g.Wo else ("im2col",)
    winograd = (g.R, g.S, g.stride, g.dilation, g.groups) == (3, 3, (1, 1), (1, 1), 1)
    return gemms + ("winograd", "winograd4") if winograd else gemms


# conv2d_forward_nhwc and conv2d_backward_nhwc read channels_last weights in
# place (the implicit GEMM's own order), as well as contiguous ones, and the
# backward gives their gradient in the weights' layout
CHANNELS_LAST_WEIGHTS = True


def conv2d_forward_nhwc(x, weight, bias, g: ConvGeometry, relu: bool = False, algo: str = "auto", filters=None):
    """y (N, Ho, Wo, K); relu=True applies relu before storing (fused).
    algo: "auto" (the kernels' rules) or one of nhwc_forward_algos(g).
    weight: (K, C/G, R, S), C-contiguous or channels_last. filters: where
    this call runs Winograd (nhwc_winograd_tile), weight's transformed
    filters from winograd_nhwc_filters, read instead of transforming weight."""
    if algo != "auto" and algo not in nhwc_forward_algos(g):
        raise ValueError(f"conv2d_forward_nhwc: algo {algo!r} cannot run this problem; "
                         f"it takes 'auto' or one of {nhwc_forward_algos(g)}")
    krsc = layout.is_channels_last(weight)
    wino = _NHWC_WINOGRAD[algo]
    if filters is not None and wino < 0:
        wino = nhwc_winograd_tile(g, algo)
    return _cpu.conv2d_forward_nhwc(x, layout.nhwc(weight) if krsc else weight, bias, g.as_tuple(), bool(relu),
                                    wino, krsc, filters, algo == "implicit")


def nhwc_winograd_tile(g: ConvGeometry, algo: str = "auto") -> int:
    """The Winograd tile conv2d_forward_nhwc(g, algo=algo) runs: 2 (F(2x2)),
    4 (F(4x4)) or 0 (none: the implicit GEMM, or the depthwise loops)."""
    wino = _NHWC_WINOGRAD[algo]
    if wino >= 0 or not nhwc_forward_algos(g):  # (none: a depthwise conv's own loops)
        return max(wino, 0)
    return int(_cpu.nhwc_winograd_rule(g.as_tuple()))


def winograd_nhwc_filters(weight, g: ConvGeometry, m: int):
    """weight's transformed filters for conv2d_forward_nhwc's F(m x m, 3x3)
    on g (m 2 or 4), valid at the SIMD level active now."""
    krsc = layout.is_channels_last(weight)
    return _cpu.winograd_nhwc_filters(layout.nhwc(weight) if krsc else weight, g.as_tuple(), int(m), krsc)


def conv2d_backward_nhwc(grad_output, x, weight, g: ConvGeometry, needs=(True, True, True)):
    """weight: (K, C/G, R, S), C-contiguous or channels_last; grad_weight comes
    in the same layout."""
    krsc = layout.is_channels_last(weight)
    gx, gw, gb = _cpu.conv2d_backward_nhwc(grad_output, x, layout.nhwc(weight) if krsc else weight, g.as_tuple(),
                                           bool(needs[0]), bool(needs[1]), bool(needs[2]), krsc)
    return gx, (layout.from_nhwc(gw) if krsc and gw is not None else gw), gb


def max_pool2d_forward_nhwc(x, g: PoolGeometry, indices: bool = True):
    return tuple(_cpu.max_pool2d_forward_nhwc(x, g.as_tuple(), g.C, bool(indices)))


def max_pool2d_backward_nhwc(grad_output, indices, g: PoolGeometry):
    return _cpu.max_pool2d_backward_nhwc(grad_output, indices, g.as_tuple(), g.C)


def avg_pool2d_forward_nhwc(x, g: PoolGeometry, count_include_pad: bool = True, divisor_override: int = 0):
    return _cpu.avg_pool2d_forward_nhwc(x, g.as_tuple(count_include_pad, divisor_override), g.C)


def avg_pool2d_backward_nhwc(grad_output, g: PoolGeometry, count_include_pad: bool = True,
                             divisor_override: int = 0):
    return _cpu.avg_pool2d_backward_nhwc(grad_output, g.as_tuple(count_include_pad, divisor_override), g.C)


def relu_forward(x):
    return _cpu.relu_forward(x)


def relu_forward_inplace(x) -> None:
    """relu written over x (writeable, C-contiguous)."""
    _cpu.relu_forward_inplace(x)


def relu_backward(grad_output, x):
    return _cpu.relu_backward(grad_output, x)


def sgd_update(param, grad, momentum_buffer, lr: float, momentum: float, dampening: float, weight_decay: float,
               nesterov: bool, first: bool) -> None:
    """One SGD step over param (and momentum_buffer) in place, in one pass."""
    _cpu.sgd_update(param, grad, momentum_buffer, lr, momentum, dampening, weight_decay, nesterov, first)


def relu_backward_inplace(grad_output, x) -> None:
    """relu_backward written over grad_output (writeable, C-contiguous)."""
    _cpu.relu_backward_inplace(grad_output, x)


def linear_forward(x: np.ndarray, w: np.ndarray, b) -> np.ndarray:
    """x (M, K) @ w (N, K).T (+ b); C-contiguous, one dtype."""
    return _cpu.linear_forward(x, w, b)


def linear_backward(gy: np.ndarray, x: np.ndarray, w: np.ndarray, needs):
    """gy (M, N), x (M, K), w (N, K): gy @ w, gy.T @ x and gy's column sums
    (in float64, as the conv bias gradient), each where needs asks."""
    gx = _cpu.gemm(gy, w) if needs[0] else None
    gw = _cpu.gemm(np.ascontiguousarray(gy.T), x) if needs[1] else None
    gb = gy.sum(axis=0, dtype=np.float64).astype(gy.dtype) if needs[2] else None
    return gx, gw, gb


def gemm(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """C = A @ B with convkern's packed GEMM (used by tests and the bench)."""
    return _cpu.gemm(np.ascontiguousarray(a), np.ascontiguousarray(b))
