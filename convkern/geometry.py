"""Argument checking and output-shape arithmetic for every op, in one place.

Every public function in :mod:`convkern.functional` turns its arguments into a
geometry here first; backends receive only validated geometry and C-contiguous
arrays. The rules follow ``torch.nn.functional`` exactly.
Bad arguments raise ``TypeError`` (wrong kind of value) or ``ValueError``
(right kind, wrong value), naming the argument and the shapes involved.
"""

from __future__ import annotations

import functools
import numbers
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

IntPair = Union[int, Tuple[int, int], Sequence[int]]
Padding = Union[int, Tuple[int, int], Sequence[int], str]


# Geometry parameters stay below 2^31 in magnitude, so every product the
# kernels form (an output index times a stride, a padded size) fits in 64 bits.
PARAM_LIMIT = 2**31 - 1


def _int(value, name: str) -> int:
    if type(value) is int and -PARAM_LIMIT <= value <= PARAM_LIMIT:  # the common case, without ABC checks
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if abs(int(value)) > PARAM_LIMIT:
        raise ValueError(f"{name} must be below 2**31 in magnitude, got {value!r}")
    return int(value)


def pair(value, name: str) -> Tuple[int, int]:
    """An int, or a sequence of one or two ints, as an (h, w) pair."""
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, (tuple, list)):
        items = list(value)
        if len(items) == 1:
            items = items * 2
        if len(items) != 2:
            raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
        return _int(items[0], name), _int(items[1], name)
    v = _int(value, name)
    return v, v


def _positive(value, name: str) -> Tuple[int, int]:
    p = pair(value, name)
    if p[0] <= 0 or p[1] <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return p


def _nonnegative(value, name: str) -> Tuple[int, int]:
    p = pair(value, name)
    if p[0] < 0 or p[1] < 0:
        raise ValueError(f"{name} must be non-negative, got {value!r}")
    return p


def batched_shape(shape: Tuple[int, ...], name: str, op: str) -> Tuple[Tuple[int, int, int, int], bool]:
    """(N, C, H, W) for a 4-D shape or an unbatched 3-D one; and whether it was unbatched."""
    if len(shape) == 4:
        return tuple(int(s) for s in shape), False  # type: ignore[return-value]
    if len(shape) == 3:
        return (1,) + tuple(int(s) for s in shape), True  # type: ignore[return-value]
    raise ValueError(f"{op}: {name} must be 3-D (C, H, W) or 4-D (N, C, H, W), got shape {tuple(shape)}")


def conv_output_size(size: int, pad_total: int, dilation: int, kernel: int, stride: int) -> int:
    """floor((size + pad_total - dilation*(kernel-1) - 1) / stride) + 1"""
    return (size + pad_total - dilation * (kernel - 1) - 1) // stride + 1


@dataclass(frozen=True)
class ConvGeometry:
    """A validated conv2d problem. Padding is per side: top/left are what the
    kernels index with; bottom/right only shape the output (``"same"`` with an
    odd total pads one more at the bottom/right, as PyTorch does)."""

    N: int
    C: int
    H: int
    W: int
    K: int
    R: int
    S: int
    groups: int
    stride: Tuple[int, int]
    pad_top: int
    pad_left: int
    pad_bottom: int
    pad_right: int
    dilation: Tuple[int, int]
    Ho: int
    Wo: int
    unbatched: bool = False

    @property
    def input_shape(self) -> Tuple[int, int, int, int]:
        return (self.N, self.C, self.H, self.W)

    @property
    def weight_shape(self) -> Tuple[int, int, int, int]:
        return (self.K, self.C // self.groups, self.R, self.S)

    @property
    def output_shape(self) -> Tuple[int, int, int, int]:
        return (self.N, self.K, self.Ho, self.Wo)

    @property
    def flops(self) -> int:
        """Multiply-adds counted as 2 FLOPs: 2*N*K*Ho*Wo*(C/groups)*R*S."""
        return 2 * self.N * self.K * self.Ho * self.Wo * (self.C // self.groups) * self.R * self.S

    def as_tuple(self) -> Tuple[int, ...]:
        """The geometry as every compiled kernel takes it: the fields of the C
        struct ConvGeom (include/convkern/geometry.h), in CONV_GEOM_FIELDS order."""
        return (self.N, self.C, self.H, self.W, self.K, self.R, self.S, self.groups,
                self.stride[0], self.stride[1], self.pad_top, self.pad_left,
                self.dilation[0], self.dilation[1], self.Ho, self.Wo)


def _plain(v) -> bool:
    """An int, a tuple of ints or a string, by exact type: arguments whose
    equality means the same geometry (True == 1 and 1.0 == 1, but a bool or
    a float stride is an error)."""
    t = type(v)
    return t is int or t is str or (t is tuple and _ints(v))


def _ints(values) -> bool:
    for e in values:  # (a loop: all() over a generator costs more than the check on a short tuple)
        if type(e) is not int:
            return False
    return True


def conv2d_geometry(x_shape, weight_shape, bias_shape=None, stride: IntPair = 1, padding: Padding = 0,
                    dilation: IntPair = 1, groups: int = 1) -> ConvGeometry:
    """The geometry of a conv2d call, checked (ValueError/TypeError naming the
    argument). Remembered for plain arguments: a layer asks for the same one
    every step, and working it out costs microseconds a small layer feels."""
    # (a list of ints, as a torch module's padding, means its tuple)
    xs, ws, bs = tuple(x_shape), tuple(weight_shape), None if bias_shape is None else tuple(bias_shape)
    s = tuple(stride) if type(stride) is list else stride
    p = tuple(padding) if type(padding) is list else padding
    d = tuple(dilation) if type(dilation) is list else dilation
    if (_ints(xs) and _ints(ws) and (bs is None or _ints(bs)) and _plain(s) and _plain(p) and _plain(d)
            and type(groups) is int):
        return _conv2d_geometry_remembered(xs, ws, bs, s, p, d, groups)
    return _conv2d_geometry(xs, ws, bs, s, p, d, groups)


@functools.lru_cache(maxsize=1024)
def _conv2d_geometry_remembered(*key) -> ConvGeometry:
    return _conv2d_geometry(*key)


def _conv2d_geometry(x_shape, weight_shape, bias_shape, stride, padding, dilation, groups) -> ConvGeometry:
    (N, C, H, W), unbatched = batched_shape(tuple(x_shape), "input", "conv2d")
    if len(weight_shape) != 4:
        raise ValueError(f"conv2d: weight must be 4-D (K, C/groups, R, S), got shape {tuple(weight_shape)}")
    K, Cg, R, S = (int(s) for s in weight_shape)
    if isinstance(groups, bool) or not isinstance(groups, numbers.Integral):
        raise TypeError(f"conv2d: groups must be an int, got {groups!r}")
    groups = int(groups)
    if groups <= 0:
        raise ValueError(f"conv2d: groups must be positive, got {groups}")
    if K <= 0 or R <= 0 or S <= 0 or Cg <= 0:
        raise ValueError(f"conv2d: weight shape {tuple(weight_shape)} has an empty dimension")
    if K % groups:
        raise ValueError(f"conv2d: out channels (weight {tuple(weight_shape)}: K={K}) "
                         f"must be divisible by groups={groups}")
    if C != Cg * groups:
        raise ValueError(f"conv2d: input {tuple(x_shape)} has {C} channels, but weight {tuple(weight_shape)} "
                         f"with groups={groups} expects {Cg * groups}")
    if bias_shape is not None and tuple(bias_shape) != (K,):
        raise ValueError(f"conv2d: bias must have shape ({K},) for weight {tuple(weight_shape)}, "
                         f"got {tuple(bias_shape)}")
    sh, sw = _positive(stride, "stride")
    dh, dw = _positive(dilation, "dilation")
    if isinstance(padding, str):
        if padding == "valid":
            pt = pb = pl = pr = 0
        elif padding == "same":
            if (sh, sw) != (1, 1):
                raise ValueError(f"conv2d: padding='same' is not supported for strided convolutions "
                                 f"(stride={(sh, sw)})")
            th, tw = dh * (R - 1), dw * (S - 1)
            pt, pl = th // 2, tw // 2
            pb, pr = th - pt, tw - pl
        else:
            raise ValueError(f"conv2d: padding must be an int, a pair, 'same' or 'valid', got {padding!r}")
    else:
        pt, pl = _nonnegative(padding, "padding")
        pb, pr = pt, pl
    if H <= 0 or W <= 0 or C <= 0:
        raise ValueError(f"conv2d: input shape {tuple(x_shape)} has an empty channel or spatial dimension")
    Ho = conv_output_size(H, pt + pb, dh, R, sh)
    Wo = conv_output_size(W, pl + pr, dw, S, sw)
    if Ho <= 0 or Wo <= 0:
        raise ValueError(
            f"conv2d: output would be {Ho}x{Wo}: the padded input {H + pt + pb}x{W + pl + pr} "
            f"(input {tuple(x_shape)}) is smaller than the dilated kernel "
            f"{dh * (R - 1) + 1}x{dw * (S - 1) + 1} (weight {tuple(weight_shape)}, dilation {(dh, dw)})")
    return ConvGeometry(N, C, H, W, K, R, S, groups, (sh, sw), pt, pl, pb, pr, (dh, dw), Ho, Wo, unbatched)


@dataclass(frozen=True)
class PoolGeometry:
    """A validated 2-D pooling problem over N*C independent planes."""

    N: int
    C: int
    H: int
    W: int
    kernel: Tuple[int, int]
    stride: Tuple[int, int]
    padding: Tuple[int, int]
    dilation: Tuple[int, int]
    ceil_mode: bool
    Ho: int
    Wo: int
    unbatched: bool = False

    @property
    def input_shape(self) -> Tuple[int, int, int, int]:
        return (self.N, self.C, self.H, self.W)

    @property
    def output_shape(self) -> Tuple[int, int, int, int]:
        return (self.N, self.C, self.Ho, self.Wo)

    def as_tuple(self, count_include_pad: bool = True, divisor_override: int = 0) -> Tuple[int, ...]:
        """The geometry as every compiled kernel takes it: the fields of the C
        struct PoolGeom (include/convkern/geometry.h), in POOL_GEOM_FIELDS
        order. The last two matter to average pooling only (0: no divisor)."""
        return (self.N * self.C, self.H, self.W, self.kernel[0], self.kernel[1], self.stride[0],
                self.stride[1], self.padding[0], self.padding[1], self.dilation[0], self.dilation[1],
                self.Ho, self.Wo, int(bool(count_include_pad)), int(divisor_override or 0))


# The field order of as_tuple(), which is the C structs' (CK_CONV_GEOM_FIELDS
# and CK_POOL_GEOM_FIELDS in include/convkern/geometry.h); check_layout holds a
# compiled module to it.
CONV_GEOM_FIELDS = ("N", "C", "H", "W", "K", "R", "S", "G", "sh", "sw", "ph", "pw", "dh", "dw", "Ho", "Wo")
POOL_GEOM_FIELDS = ("planes", "H", "W", "kh", "kw", "sh", "sw", "ph", "pw", "dh", "dw", "Ho", "Wo",
                    "count_include_pad", "divisor_override")


def check_layout(module_name: str, fields: Tuple[str, str]) -> None:
    """Raise ImportError unless a compiled module's geometry structs (its
    geometry_fields()) are the layout as_tuple() packs: a module built from
    other sources would read every problem wrongly."""
    conv, pool = (tuple(f.split(",")) for f in fields)
    if conv != CONV_GEOM_FIELDS or pool != POOL_GEOM_FIELDS:
        raise ImportError(f"{module_name} was built with another geometry layout (conv {conv}, pool {pool}; "
                          f"this convkern packs conv {CONV_GEOM_FIELDS}, pool {POOL_GEOM_FIELDS}): rebuild it")


def pool_output_size(size: int, kernel: int, pad: int, stride: int, dilation: int, ceil_mode: bool) -> int:
    """PyTorch's pooling_output_shape: with ceil_mode, a last window that would
    start in the right padding is dropped."""
    numerator = size + 2 * pad - dilation * (kernel - 1) - 1 + (stride - 1 if ceil_mode else 0)
    out = numerator // stride + 1
    if ceil_mode and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def pool2d_geometry(x_shape, kernel_size: IntPair, stride: Optional[IntPair] = None, padding: IntPair = 0,
                    dilation: IntPair = 1, ceil_mode: bool = False, op: str = "max_pool2d") -> PoolGeometry:
    """The geometry of a pooling call, checked. Remembered for plain
    arguments, as conv2d_geometry's: a layer asks for the same one every step."""
    xs = tuple(x_shape)
    k = tuple(kernel_size) if type(kernel_size) is list else kernel_size
    s = tuple(stride) if type(stride) is list else stride
    p = tuple(padding) if type(padding) is list else padding
    d = tuple(dilation) if type(dilation) is list else dilation
    if _ints(xs) and _plain(k) and (s is None or _plain(s)) and _plain(p) and _plain(d) and type(ceil_mode) is bool:
        return _pool2d_geometry_remembered(xs, k, s, p, d, ceil_mode, op)
    return _pool2d_geometry(xs, k, s, p, d, ceil_mode, op)


@functools.lru_cache(maxsize=1024)
def _pool2d_geometry_remembered(*key) -> PoolGeometry:
    return _pool2d_geometry(*key)


def _pool2d_geometry(x_shape, kernel_size: IntPair, stride: Optional[IntPair], padding: IntPair,
                     dilation: IntPair, ceil_mode: bool, op: str) -> PoolGeometry:
    (N, C, H, W), unbatched = batched_shape(tuple(x_shape), "input", op)
    kh, kw = _positive(kernel_size, "kernel_size")
    if stride is None or (isinstance(stride, Sequence) and not isinstance(stride, str) and len(stride) == 0):
        sh, sw = kh, kw
    else:
        sh, sw = _positive(stride, "stride")
    ph, pw = _nonnegative(padding, "padding")
    dh, dw = _positive(dilation, "dilation")
    if ph > kh // 2 or pw > kw // 2:
        raise ValueError(f"{op}: padding {(ph, pw)} must be at most half of kernel_size {(kh, kw)}")
    if H <= 0 or W <= 0 or C <= 0:
        raise ValueError(f"{op}: input shape {tuple(x_shape)} has an empty channel or spatial dimension")
    ceil_mode = bool(ceil_mode)
    Ho = pool_output_size(H, kh, ph, sh, dh, ceil_mode)
    Wo = pool_output_size(W, kw, pw, sw, dw, ceil_mode)
    if Ho <= 0 or Wo <= 0:
        raise ValueError(f"{op}: output would be {Ho}x{Wo} for input {tuple(x_shape)} with kernel_size {(kh, kw)}, "
                         f"stride {(sh, sw)}, padding {(ph, pw)}, dilation {(dh, dw)}: the input is too small")
    return PoolGeometry(N, C, H, W, (kh, kw), (sh, sw), (ph, pw), (dh, dw), ceil_mode, Ho, Wo, unbatched)


def check_divisor(divisor_override) -> int:
    """0 for None, else a non-zero int."""
    if divisor_override is None:
        return 0
    if isinstance(divisor_override, bool) or not isinstance(divisor_override, numbers.Integral):
        raise TypeError(f"avg_pool2d: divisor_override must be an int or None, got {divisor_override!r}")
    if int(divisor_override) == 0:
        raise ValueError("avg_pool2d: divisor_override must not be zero")
    if abs(int(divisor_override)) > PARAM_LIMIT:
        raise ValueError(f"avg_pool2d: divisor_override must be below 2**31 in magnitude, got {divisor_override!r}")
    return int(divisor_override)
