"""The public ops, with ``torch.nn.functional``'s signatures and semantics on
NumPy arrays on the CPU and CuPy arrays on the GPU (and anything exposing
``__dlpack__``, ``__cuda_array_interface__`` or the array interface, taken
without a copy where possible). Results are arrays of the same kind.

Each function checks its arguments through :mod:`convkern.geometry`, makes the
arrays C-contiguous in a native float dtype, picks a backend and dispatches.
Shapes: input (N, C, H, W) or unbatched (C, H, W); weight (K, C/groups, R, S).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np

from . import backend as _backends
from . import layout, strided
from . import plan_cache as _plan_cache
from . import tune as _tune
from . import weight_cache as _weight_cache
from .arrays import array_module as _xp
from .arrays import cupy_or_none as _cupy
from .arrays import device_of as _device_of
from .geometry import (ConvGeometry, IntPair, Padding, PoolGeometry, check_divisor, conv2d_geometry,
                       pool2d_geometry)

_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _as_array(a, name: str, op: str):
    """(array, device) for a NumPy array, a GPU array, or a DLPack/array-interface object."""
    if isinstance(a, np.ndarray):
        return a, "cpu"
    device = _device_of(a)
    if device == "cuda":
        cupy = _cupy()
        if cupy is None or isinstance(a, cupy.ndarray) or not _backends.info("cupy").available:
            # without a working CuPy, backend selection explains why no GPU backend runs
            return a, "cuda"
        try:
            if hasattr(a, "__cuda_array_interface__"):
                return cupy.asarray(a), "cuda"  # zero-copy view
            return cupy.from_dlpack(a), "cuda"
        except (TypeError, RuntimeError, BufferError, ValueError) as exc:
            raise TypeError(f"{op}: {name} could not be taken as a CuPy array: {exc}") from exc
    if hasattr(a, "__dlpack__"):
        try:
            return np.from_dlpack(a), "cpu"
        except (TypeError, RuntimeError, BufferError) as exc:
            raise TypeError(f"{op}: {name} could not be taken as an array via DLPack: {exc}") from exc
    if hasattr(a, "__array_interface__") or hasattr(a, "__array__"):
        return np.asarray(a), "cpu"
    raise TypeError(f"{op}: {name} must be an array (NumPy, CuPy or DLPack), got {type(a).__name__}")


def _float_dtype(a, name: str, op: str) -> np.dtype:
    dt = a.dtype
    if dt in _FLOAT_DTYPES:  # (a NumPy or CuPy array's own float32/float64: asked first)
        return dt
    dt = np.dtype(dt)
    native = dt.newbyteorder("=")
    if native not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} has dtype {dt}; supported dtypes are float32 and float64")
    return native


@functools.lru_cache(maxsize=None)
def _dtype_name(dtype) -> str:
    """np.dtype(dtype).name, remembered: NumPy works the name out anew on each access."""
    return np.dtype(dtype).name


def _prepare(op: str, named: Sequence[Tuple[str, object]], contiguous: bool = True):
    """Arrays as C-contiguous native-endian floats of one dtype on one device
    (with contiguous=False: checked but as given, for ops that take views a
    block at a time). Returns (arrays, device, dtype). None entries stay None."""
    arrays, device, dtype, first = [], None, None, None
    for name, value in named:
        if value is None:
            arrays.append(None)
            continue
        arr, dev = _as_array(value, name, op)
        dt = _float_dtype(arr, name, op)
        if device is None:
            device, dtype, first = dev, dt, name
        elif dev != device:
            raise ValueError(f"{op}: {name} is on {dev} but {first} is on {device}; move them to one device")
        elif dt != dtype:
            raise TypeError(f"{op}: {name} has dtype {dt} but {first} has dtype {dtype}; use one dtype")
        arrays.append(arr)
    if contiguous:
        arrays = [None if a is None else _contiguous(a, device, dtype) for a in arrays]
    return arrays, device, dtype


def _contiguous(a, device: str, dtype):
    if device == "cpu":
        if a.dtype == dtype and layout.is_channels_last(a):
            # (channels_last weights, from a model moved to that format):
            # the tiled transpose, 2-4x faster than NumPy's strided copy
            return layout.nchw(a)
        return np.ascontiguousarray(a, dtype=dtype)
    xp = _xp(device)
    if xp is None or not isinstance(a, xp.ndarray):
        return a  # a GPU array CuPy cannot take: selection reports why
    return xp.ascontiguousarray(a, dtype=dtype)


def _zeros(device: str, shape, dtype):
    return _xp(device).zeros(shape, dtype=dtype)


def _check_algo(algo) -> str:
    if not isinstance(algo, str):
        raise TypeError(f"algo must be a string, got {algo!r}")
    return algo


def _check_shape(arr, expected, name: str, op: str, unbatched: bool):
    shape = tuple(arr.shape)
    want = tuple(expected[1:]) if unbatched else tuple(expected)
    if shape != want:
        raise ValueError(f"{op}: {name} must have shape {want}, got {shape}")
    return arr.reshape(expected) if unbatched else arr


@functools.lru_cache(maxsize=None)
def _takes_keyword(fn, name: str) -> bool:
    """Whether a backend function accepts keyword `name` (optional extensions of
    the backend interface, such as max_pool2d_forward's indices=False)."""
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _unbatch(a, unbatched: bool):
    return a[0] if (unbatched and a is not None) else a


# ---------------------------------------------------------------- conv2d


def algorithms(backend: Optional[str] = None, device: str = "cpu") -> Tuple[str, ...]:
    """The conv2d algorithms `backend` (default: the one chosen for `device`)
    runs by name, and "auto" (its own rule)."""
    impl = _backends.select(device, backend, "conv2d_forward")
    return tuple(getattr(impl, "ALGOS", ("direct", "im2col"))) + ("auto",)


def _resolve_algo(impl, algo: str) -> str:
    """algo as the backend takes it: "auto" passes through (each backend
    resolves it in one place of its own); a name the backend does not offer
    is refused, listing what it does. Every backend takes "direct" and
    "im2col" (the reference computes either the one clear way)."""
    offered = tuple(getattr(impl, "ALGOS", ("direct", "im2col")))
    if algo not in ("auto", "direct", "im2col") and algo not in offered:
        name = getattr(impl, "NAME", getattr(impl, "__name__", "this backend"))
        raise ValueError(f"algo {algo!r} is not offered by backend {name!r}; it has "
                         f"{', '.join(map(repr, offered + ('auto',)))}")
    return algo


def _tune_key(impl, op: str, g: ConvGeometry, dtype, needs, extra: Tuple[str, ...] = ()) -> str:
    """The tuning cache's key for a conv problem on a backend (choices are per
    thread count); `extra` names what else changes the timings (channels_last
    weights: read in place by the NHWC kernels, transposed for the NCHW ones;
    Winograd filters kept across calls, no longer transformed in each)."""
    threads = impl.threads() if hasattr(impl, "threads") else 0
    return _tune.key(getattr(impl, "NAME", "?"), op, g.as_tuple(), _dtype_name(dtype), threads,
                     (() if needs is None else ("".join("1" if n else "0" for n in needs),)) + extra)


def _tuned(impl, op: str, g: ConvGeometry, dtype, needs, run) -> str:
    """algo="auto" on a backend that says which algorithms can run g: the
    measured best (convkern.tune), or "auto" (the backend's rules) when
    tuning is off or there is nothing to choose between."""
    problem = getattr(impl, "algo_problem", None)
    if problem is None or _tune.mode() == "off":
        return "auto"
    key = _tune_key(impl, op, g, dtype, needs)
    known = _tune.remembered(key)  # the common case: no need to ask which algorithms can run g
    if known is not None:
        return known
    if _tune.mode() == "recall":
        return "auto"
    grad_input = op == "backward" and needs[0]
    candidates = [a for a in getattr(impl, "ALGOS", ()) if not problem(g, a, grad_input)]
    if op == "backward":
        # the rules' own routes (auto's weight gradient takes paths no named
        # algorithm does) compete too
        candidates.append("auto")
    if len(candidates) < 2:
        return candidates[0] if candidates else "auto"
    return _tune.choose(key, candidates, run)


def _native(a, dtype):
    """`a` in the native byte order and `dtype`, keeping its strides (a view when it is already)."""
    return a if a.dtype == dtype else a.astype(dtype)


def _runs_nhwc(impl, op: str, g: ConvGeometry, algo: str, checked, device: str) -> bool:
    """Whether a channels_last conv runs on the backend's NHWC kernels: the
    backend has them, the algorithm is the backend's choice ("auto"), and
    `checked` (the weights forward, grad_output for the weight gradient) is
    finite where the NHWC depthwise loops would skip padding taps whose
    zeros PyTorch multiplies (0 * inf = NaN)."""
    if device != "cpu" or not hasattr(impl, op):
        return False
    if algo != "auto" and not (op == "conv2d_forward_nhwc" and algo in _nhwc_named(impl, g)):
        return False
    depthwise_padded = g.groups == g.C == g.K and g.groups > 1 and _padded(g)
    return not (depthwise_padded and checked is not None and not _all_finite(checked, device))


def _nhwc_algos(impl, g: ConvGeometry):
    """The algorithms the backend's NHWC forward can be told to run on g."""
    named = getattr(impl, "nhwc_forward_algos", None)
    return () if named is None or not _takes_keyword(impl.conv2d_forward_nhwc, "algo") else tuple(named(g))


def _nhwc_named(impl, g: ConvGeometry):
    """The NCHW algorithm names a channels_last conv runs on the NHWC
    kernels when named: Winograd's (the NHWC tiles are the faster form)."""
    return tuple(a for a in _nhwc_algos(impl, g) if a.startswith("winograd"))


def _nhwc_choices(impl, op: str, g: ConvGeometry) -> Tuple[str, ...]:
    """The candidates of a layout choice: "nchw" first (convert, run the
    NCHW algorithms, convert back), then "nhwc" (the NHWC kernels by their
    rules) or, where the NHWC forward has more than one algorithm for g,
    "nhwc:<algo>" for each."""
    algos = _nhwc_algos(impl, g) if op == "forward" else ()
    return ("nchw", "nhwc") if len(algos) < 2 else ("nchw",) + tuple(f"nhwc:{a}" for a in algos)


def _nhwc_runners(choices: Sequence[str], native, via_nchw) -> Dict[str, Callable[[], object]]:
    """Each of `choices` as a call: via_nchw(), native() ("nhwc") or native(<algo>) ("nhwc:<algo>")."""
    return {c: via_nchw if c == "nchw" else native if c == "nhwc" else (lambda a=_nhwc_algo(c): native(a))
            for c in choices}


def _nhwc_algo(choice: str) -> str:
    """The NHWC algorithm a layout choice names ("auto" for plain "nhwc")."""
    return choice.partition(":")[2] or "auto"


def _layout_choice(impl, op: str, g: ConvGeometry, dtype, needs, native, via_nchw,
                   extra: Tuple[str, ...] = ()) -> str:
    """For a channels_last conv on a backend with NHWC kernels: "nhwc" or
    "nhwc:<algo>" (run them) or "nchw" (convert, run the NCHW algorithms,
    convert back). Measured by the autotuner like the algorithms
    (convkern.tune); with tuning off, the rule: NHWC, except forward where
    the NCHW side has Winograd and the NHWC side has not."""
    choice = _layout_choice_made(impl, op, g, dtype, needs, native, via_nchw, extra)
    _last_layout[0] = choice.partition(":")[0]
    return choice


_last_layout = [""]


def last_layout() -> str:
    """What the last channels_last conv on a backend with NHWC kernels ran:
    "nhwc" (its NHWC kernels) or "nchw" (converted to NCHW and back)."""
    return _last_layout[0]


def _measured_layout(impl, key_op: str, g: ConvGeometry, dtype, needs, rule: Callable[[], str], op: str, native,
                     via_nchw, extra: Tuple[str, ...] = ()) -> str:
    """One of _nhwc_choices, measured once per problem by the autotuner
    (and remembered like the algorithms); rule() with tuning off, on a
    backend that cannot be tuned, or recalled without a choice. "nchw"
    runs first: its own first call tunes the NCHW algorithms, which must
    not count against it (a candidate whose warm-up takes 4x the fastest is
    dropped)."""
    mode = _tune.mode()
    if mode == "off" or getattr(impl, "algo_problem", None) is None:
        return rule()
    key = _tune_key(impl, key_op, g, dtype, needs, extra)
    known = _tune.remembered(key)
    if known is not None:
        choices = _nhwc_choices(impl, op, g)
        if known in choices or (known == "nhwc" and "nhwc:im2col" in choices):  # "nhwc": by the NHWC rules
            return known
    if mode == "recall":
        return rule()
    runners = _nhwc_runners(_nhwc_choices(impl, op, g), native, via_nchw)
    runners["nchw"]()
    return _tune.choose(key, list(runners), lambda a: runners[a]())


def _layout_choice_made(impl, op: str, g: ConvGeometry, dtype, needs, native, via_nchw, extra) -> str:
    def rule() -> str:
        chooser = getattr(impl, "choose_algo", None)
        nchw_winograd = op == "forward" and chooser is not None and chooser(g, False, dtype) == "winograd"
        return "nchw" if nchw_winograd and "winograd" not in _nhwc_algos(impl, g) else "nhwc"

    return _measured_layout(impl, op + ":channels_last", g, dtype, needs, rule, op, native, via_nchw, extra)


def _nchw_via_nhwc(impl, op: str, g: ConvGeometry, dtype, needs, nchw, nhwc, extra: Tuple[str, ...] = ()) -> str:
    """For an NCHW conv whose algorithm auto picks, on a backend with NHWC
    kernels: "nchw", or "nhwc"/"nhwc:<algo>" where copying to NHWC, running
    those kernels and copying back is faster than the NCHW algorithm the
    tuner chose (a small map's GEMMs can be faster over pixels than over
    channels by more than the copies cost). With tuning off, or recalled
    without a choice, NCHW runs."""
    return _measured_layout(impl, op + ":nchw_via_nhwc", g, dtype, needs, lambda: "nchw", op, nhwc, nchw, extra)


def _all_finite(a, device: str) -> bool:
    return _plan_cache.log_finite(bool(_xp(device).isfinite(a).all()))


def _padded(g: ConvGeometry) -> bool:
    return bool(g.pad_top or g.pad_left or g.pad_bottom or g.pad_right)


# The cpu algorithms whose kernels skip the taps on padding: forward, and grad weight.
_SKIP_PADDING = {False: ("direct",), True: ("direct", "depthwise")}


def _may_skip_padding(impl, algo: str, g: ConvGeometry, dtype, backward: bool) -> bool:
    """Whether the call (its forward, or with `backward` its weight gradient)
    may run kernels that skip the padding taps: named, or what "auto" picks
    by the backend's rule (assumed so where the backend does not say)."""
    if algo == "auto":
        chooser = getattr(impl, "choose_algo", None)
        if chooser is None:
            return True
        algo = chooser(g, backward, _dtype_name(dtype))
    return algo in _SKIP_PADDING[backward]


def _direct_skips_padding(impl, g: ConvGeometry) -> bool:
    """Whether the backend's direct kernels skip the taps on this problem's
    padding (so NaN/inf weights there would not give PyTorch's NaN)."""
    return _padded(g) and not getattr(impl, "DIRECT_PADDING_MULTIPLIES", False)


# The CPU direct kernels (and cpp's depthwise grad weight) skip the taps that
# fall on zero padding; PyTorch multiplies the zeros, and 0 * NaN or 0 * inf is
# NaN. Where a NaN/inf weight (forward) or gradient (grad weight) meets padding,
# the im2col path, which multiplies the zeros too, gives PyTorch's answer. The
# check costs a pass over the weights (forward) or over grad_output (backward),
# and only runs where those kernels would run on a padded convolution, named or
# picked by "auto", on a backend whose direct kernels skip padding (the GPU ones
# multiply it: there a check would sync the device).


def conv2d(input, weight, bias=None, stride: IntPair = 1, padding: Padding = 0, dilation: IntPair = 1,
           groups: int = 1, *, algo: str = "auto", backend: Optional[str] = None,
           memory_format: Optional[str] = None):
    """2-D cross-correlation, like ``torch.nn.functional.conv2d``.

    input (N, C, H, W) or (C, H, W); weight (K, C/groups, R, S); bias (K,) or None.
    padding: int, (ph, pw), "valid" or "same" (stride 1 only; the odd pixel goes
    bottom/right). Returns (N, K, Ho, Wo) (or (K, Ho, Wo)) with
    Ho = floor((H + 2*ph - dh*(R-1) - 1) / sh) + 1.
    algo: "auto" (the autotuner's measured choice, or the backend's rule with
    CONVKERN_TUNE=off) or an algorithm the backend offers by name, which then
    runs exactly that (``convkern.algorithms(backend)`` lists them): "direct"
    and "im2col" everywhere; on cpp also "depthwise", "shifted", "winograd"
    (F(2x2, 3x3)) and "winograd4" (F(4x4, 3x3), float32 error a few times
    the others'); on cuda "implicit". A named algorithm that cannot run this
    problem raises ValueError saying why. On a channels_last input the cpp
    Winograd algorithms run on the NHWC data itself (channels in vector
    lanes); the others run on an NCHW copy.
    memory_format: None (the output takes the input's layout; an input of
    both layouts at once, one channel or 1x1 planes, takes the weights'
    where their strides read channels_last by PyTorch's rule) or
    "channels_last": the output is channels_last whatever the input's (an
    NCHW input is converted first; a one-channel input, both layouts at
    once, is not), as PyTorch does for a conv whose weight is channels_last.
    """
    return _conv2d(input, weight, bias, stride, padding, dilation, groups, algo, backend, False, memory_format)


def conv2d_relu(input, weight, bias=None, stride: IntPair = 1, padding: Padding = 0, dilation: IntPair = 1,
                groups: int = 1, *, algo: str = "auto", backend: Optional[str] = None,
                memory_format: Optional[str] = None):
    """``relu(conv2d(...))`` in one call, with :func:`conv2d`'s arguments.

    On cpp, the channels_last kernels apply relu to each output tile as they
    store it (bias added in the same pass), and the NCHW algorithms run relu
    over the output in place before returning; elsewhere relu runs in place
    on the fresh output. Either way no second output array is made. The
    result equals ``relu(conv2d(...))`` bit for bit (NaN stays NaN, as in
    PyTorch). Its gradient is :func:`conv2d_relu_backward`.
    """
    return _conv2d(input, weight, bias, stride, padding, dilation, groups, algo, backend, True, memory_format)


def conv2d_relu_backward(grad_output, input, weight, output, stride: IntPair = 1, padding: Padding = 0,
                         dilation: IntPair = 1, groups: int = 1, *, needs=(True, True, True), algo: str = "auto",
                         backend: Optional[str] = None):
    """Gradients of :func:`conv2d_relu`: (grad_input, grad_weight, grad_bias)
    as :func:`conv2d_backward` gives them. `output` is conv2d_relu's result:
    it is positive, or NaN, exactly where the conv before relu was, so the
    relu gradient taken from it is exact and the pre-relu output need not
    be kept."""
    if getattr(output, "shape", None) != getattr(grad_output, "shape", None):
        raise ValueError(f"conv2d_relu_backward: output shape {getattr(output, 'shape', None)} differs from "
                         f"grad_output shape {getattr(grad_output, 'shape', None)}")
    g_pre = relu_backward(grad_output, output, backend=backend)
    return conv2d_backward(g_pre, input, weight, stride, padding, dilation, groups, needs=needs, algo=algo,
                           backend=backend)


def _finish_relu(y, fuse_relu: bool, done: bool, backend: Optional[str]):
    """relu over a fresh conv output in place, where the kernel did not apply it."""
    if fuse_relu and not done:
        relu(y, inplace=True, backend=backend)
    return y


def _forward_nchw(impl, x, w, b, g: ConvGeometry, algo: str, fuse_relu: bool):
    """impl.conv2d_forward, with relu fused where the backend takes it; (y, relu applied)."""
    if fuse_relu and _takes_keyword(impl.conv2d_forward, "relu"):
        return impl.conv2d_forward(x, w, b, g, algo, relu=True), True
    return impl.conv2d_forward(x, w, b, g, algo), False


def _weights(impl, w, device: str, dtype):
    """(weights, the same if channels_last else None, tuning-key note): a
    model moved to channels_last has channels_last weights, which the
    backend's NHWC kernels read in place (and whose gradient they give in
    that layout) where it says so; anything else is made C-contiguous. The
    note tells the tuner which, since the routes' costs differ (_tune_key)."""
    if (device == "cpu" and w.dtype == dtype and layout.is_channels_last(w)
            and getattr(impl, "CHANNELS_LAST_WEIGHTS", False)):
        return w, w, ("w:channels_last",)
    return _contiguous(w, device, dtype), None, ()


def _forward_nhwc(impl, x, w, b, g: ConvGeometry, fuse_relu: bool, algo: str = "auto"):
    kw = {} if algo == "auto" else {"algo": algo}
    if _weight_cache.active():
        filters = _weight_cache.winograd_filters(impl, w, g, algo)
        if filters is not None:
            kw["filters"] = filters
    if fuse_relu and _takes_keyword(impl.conv2d_forward_nhwc, "relu"):
        return impl.conv2d_forward_nhwc(x, w, b, g, relu=True, **kw), True
    return impl.conv2d_forward_nhwc(x, w, b, g, **kw), False


_NO_PLAN = object()
# (conv2d's memory_format inside: run on NCHW arrays and give NCHW, whatever the weights' layout)
_AS_NCHW = object()


def _by_plan(k: tuple, op: str, backend, checked, arrays):
    """The call's result by the plan kept for its signature k, or _NO_PLAN
    where there is none, it was made in another state, or `checked` (the
    array its decisions checked for NaN/inf) is no longer finite."""
    plan = _plan_cache.get(k)
    if plan is None:
        return _NO_PLAN
    impl = _backends.select("cpu", backend, op)
    if (impl is not plan.impl or plan.state != _plan_cache.state(impl)
            or (plan.check_finite and not _all_finite(checked, "cpu"))):
        return _NO_PLAN
    if plan.recalls:
        _tune.count_remembered(plan.recalls)
    return plan.run(*arrays)


def _conv2d(input, weight, bias, stride, padding, dilation, groups, algo, backend, fuse_relu: bool,
            memory_format: Optional[str] = None):
    # a signature seen before, in the same state: its plan (convkern.plan_cache)
    k = _plan_cache.key("conv2d", (input, weight, bias),
                        (stride, padding, dilation, groups, algo, backend, fuse_relu, memory_format))
    if k is not None:
        planned = _by_plan(k, "conv2d_forward", backend, weight, (input, weight, bias))
        if planned is not _NO_PLAN:
            return planned
    with _plan_cache.Making() as making:
        impl, run, arrays = _conv2d_plan(input, weight, bias, stride, padding, dilation, groups, algo, backend,
                                         fuse_relu, memory_format)
    if k is not None and impl is not None:
        plan = making.plan(impl, run)
        if plan is not None:
            _plan_cache.put(k, plan)
    return run(*arrays)


def _conv2d_plan(input, weight, bias, stride, padding, dilation, groups, algo, backend, fuse_relu: bool,
                 memory_format: Optional[str]):
    """Check a conv2d call and decide how it runs: (impl, run, arrays), run
    giving the output for `arrays` (the call's arrays as taken) or for the
    arrays of any later call of the same signature (impl None: nothing to
    remember)."""
    (x, w, b), device, dtype = _prepare("conv2d", [("input", input), ("weight", weight), ("bias", bias)],
                                        contiguous=False)
    taken = (x, w, b)
    if memory_format not in (None, "channels_last", _AS_NCHW):
        raise ValueError(f"conv2d: memory_format must be None or 'channels_last', got {memory_format!r}")
    to_cl = memory_format == "channels_last"
    if to_cl and (x.ndim != 4 or not isinstance(x, np.ndarray)):
        raise ValueError(f"conv2d: memory_format='channels_last' needs a batched (N, C, H, W) NumPy input, "
                         f"got shape {tuple(x.shape)}")
    b = None if b is None else _contiguous(b, device, dtype)
    g = conv2d_geometry(x.shape, w.shape, None if b is None else b.shape, stride, padding, dilation, groups)
    algo = _check_algo(algo)
    impl = _backends.select(device, backend, "conv2d_forward")
    w, w_cl, weights = _weights(impl, w, device, dtype)
    if _weight_cache.active():  # (Winograd filters kept across calls: the routes' costs differ again)
        weights += ("w:kept",)
    algo = _resolve_algo(impl, algo)

    # what every route does to the arrays as taken, as _weights and the bias's _contiguous did here (a
    # flag, not w_cl, in the closures: a plan must not keep the first call's weights alive)
    weights_in_place = w_cl is not None

    def arrays(xr, wr, br):
        return xr, (wr if weights_in_place else _contiguous(wr, device, dtype)), \
            None if br is None else _contiguous(br, device, dtype)

    if g.N == 0:
        y = _zeros(device, g.output_shape, dtype)
        return None, lambda *_: layout.to_channels_last(y) if to_cl else _unbatch(y, g.unbatched), taken
    # an input of both layouts (one channel, 1x1 planes) takes the weights' layout, as in torch: a
    # channels_last model's first conv on a one-channel image gives channels_last
    if (layout.is_channels_last(x) or to_cl
            or (memory_format is None and layout.is_both(x) and layout.prefers_channels_last(taken[1]))):
        def via_nchw_run(xr, wr, br):
            _last_layout[0] = "nchw"
            xr, wr, br = arrays(xr, wr, br)
            return layout.to_channels_last(_conv2d(layout.nchw(_native(xr, dtype)), wr, br, stride, padding,
                                                   dilation, groups, algo, backend, fuse_relu, _AS_NCHW))

        if _runs_nhwc(impl, "conv2d_forward_nhwc", g, algo, w, device):
            def native_run(nhwc_algo: str):  # (an NCHW input asked to give channels_last is transposed here)
                def run(xr, wr, br):
                    _last_layout[0] = "nhwc"
                    xr, wr, br = arrays(xr, wr, br)
                    y, done = _forward_nhwc(impl, layout.nhwc(_native(xr, dtype)), wr, br, g, fuse_relu, nhwc_algo)
                    return _finish_relu(layout.from_nhwc(y), fuse_relu, done, backend)
                return run

            if algo != "auto":  # a Winograd named: the NHWC tiles
                return impl, native_run(algo), taken
            choice = _layout_choice(impl, "forward", g, dtype, None,
                                    lambda nhwc_algo="auto": native_run(nhwc_algo)(x, w, b),
                                    lambda: via_nchw_run(x, w, b), weights)
            if choice != "nchw":
                return impl, native_run(_nhwc_algo(choice)), taken
        return impl, via_nchw_run, taken
    xc = _contiguous(x, device, dtype).reshape(g.input_shape)
    w_nchw = w if w_cl is None else layout.nchw(w)
    auto = algo == "auto"
    if auto:
        algo = _tuned(impl, "forward", g, dtype, None, lambda a: impl.conv2d_forward(xc, w_nchw, b, g, a))
    if (_direct_skips_padding(impl, g) and _may_skip_padding(impl, algo, g, dtype, False)
            and not _all_finite(w_nchw, device)):
        algo = "im2col"

    def nchw_run(xr, wr, br):
        xr, wr, br = arrays(xr, wr, br)
        xr = _contiguous(xr, device, dtype).reshape(g.input_shape)
        y, done = _forward_nchw(impl, xr, layout.nchw(wr) if weights_in_place else wr, br, g, algo, fuse_relu)
        return _unbatch(_finish_relu(y, fuse_relu, done, backend), g.unbatched)

    if auto and g.C > 1 and _runs_nhwc(impl, "conv2d_forward_nhwc", g, "auto", w_nchw, device):
        def nhwc_run(nhwc_algo: str):
            def run(xr, wr, br):
                xr, wr, br = arrays(xr, wr, br)
                xr = _contiguous(xr, device, dtype).reshape(g.input_shape)
                y, done = _forward_nhwc(impl, layout.nhwc(xr), wr, br, g, fuse_relu, nhwc_algo)
                return _unbatch(_finish_relu(layout.nchw(layout.from_nhwc(y)), fuse_relu, done, backend),
                                g.unbatched)
            return run

        choice = _nchw_via_nhwc(impl, "forward", g, dtype, None,
                                lambda: _forward_nchw(impl, xc, w_nchw, b, g, algo, fuse_relu)[0],
                                lambda nhwc_algo="auto": nhwc_run(nhwc_algo)(x, w, b), weights)
        if choice != "nchw":
            return impl, nhwc_run(_nhwc_algo(choice)), taken
    return impl, nchw_run, taken


def conv2d_backward(grad_output, input, weight, stride: IntPair = 1, padding: Padding = 0,
                    dilation: IntPair = 1, groups: int = 1, *, needs=(True, True, True), algo: str = "auto",
                    backend: Optional[str] = None):
    """Gradients of conv2d: (grad_input, grad_weight, grad_bias), each None
    unless asked for in `needs` (input, weight, bias).

    grad_output has conv2d's output shape; grad_input input's, grad_weight
    weight's, grad_bias (K,).
    """
    if len(tuple(needs)) != 3:
        raise ValueError(f"conv2d_backward: needs must be three booleans (input, weight, bias), got {needs!r}")
    needs = tuple(bool(n) for n in needs)
    # a signature seen before, in the same state: its plan (convkern.plan_cache); the only data its
    # decisions read is grad_output's finiteness
    k = _plan_cache.key("conv2d_backward", (grad_output, input, weight),
                        (stride, padding, dilation, groups, needs, algo, backend))
    if k is not None:
        planned = _by_plan(k, "conv2d_backward", backend, grad_output, (grad_output, input, weight))
        if planned is not _NO_PLAN:
            return planned
    with _plan_cache.Making() as making:
        impl, run, arrays = _conv2d_backward_plan(grad_output, input, weight, stride, padding, dilation, groups,
                                                  needs, algo, backend)
    if k is not None and impl is not None:
        plan = making.plan(impl, run)
        if plan is not None:
            _plan_cache.put(k, plan)
    return run(*arrays)


def _conv2d_backward_plan(grad_output, input, weight, stride, padding, dilation, groups, needs, algo, backend):
    """Check a conv2d_backward call and decide how it runs: (impl, run,
    arrays), as _conv2d_plan."""
    (gy, x, w), device, dtype = _prepare("conv2d_backward", [("grad_output", grad_output), ("input", input),
                                                             ("weight", weight)], contiguous=False)
    taken = (gy, x, w)
    g = conv2d_geometry(x.shape, w.shape, None, stride, padding, dilation, groups)
    gy = _check_shape(gy, g.output_shape, "grad_output", "conv2d_backward", g.unbatched)
    algo = _check_algo(algo)
    impl = _backends.select(device, backend, "conv2d_backward")
    if not any(needs):
        return None, lambda *_: (None, None, None), taken
    w, w_cl, weights = _weights(impl, w, device, dtype)
    # (a flag, not w_cl, in the closures: a plan must not keep the first call's weights alive)
    weights_in_place = w_cl is not None

    def weights_of(wr):  # what _weights did to the weights as taken
        return wr if weights_in_place else _contiguous(wr, device, dtype)

    # a one-channel input is both layouts: a channels_last grad_output decides
    # (else the whole of it would be copied to NCHW)
    if g.N > 0 and (layout.is_channels_last(x) or (layout.is_both(x) and layout.is_channels_last(gy))):
        algo = _resolve_algo(impl, algo)

        def via_nchw_run(gyr, xr, wr):
            _last_layout[0] = "nchw"
            gx, gw, gb = conv2d_backward(layout.nchw(_native(gyr.reshape(g.output_shape), dtype)),
                                         layout.nchw(_native(xr, dtype)), weights_of(wr), stride, padding, dilation,
                                         groups, needs=needs, algo=algo, backend=backend)
            return (None if gx is None else layout.to_channels_last(gx)), gw, gb

        if _runs_nhwc(impl, "conv2d_backward_nhwc", g, algo, gy if needs[1] else None, device):
            def native_run(gyr, xr, wr):
                _last_layout[0] = "nhwc"
                gx, gw, gb = impl.conv2d_backward_nhwc(layout.nhwc(_native(gyr.reshape(g.output_shape), dtype)),
                                                       layout.nhwc(_native(xr, dtype)), weights_of(wr), g, needs)
                return (None if gx is None else layout.from_nhwc(gx)), gw, gb

            if _layout_choice(impl, "backward", g, dtype, needs, lambda: native_run(*taken),
                              lambda: via_nchw_run(*taken), weights) == "nhwc":
                return impl, native_run, taken
        return impl, via_nchw_run, taken
    if g.N == 0:
        gx = _zeros(device, g.input_shape, dtype) if needs[0] else None
        gw = _zeros(device, g.weight_shape, dtype) if needs[1] else None
        gb = _zeros(device, (g.K,), dtype) if needs[2] else None
        return None, lambda *_: (_unbatch(gx, g.unbatched), gw, gb), taken

    def gy_x(gyr, xr):  # the call's grad_output and input as the kernels take them
        return _contiguous(gyr.reshape(g.output_shape), device, dtype), \
            _contiguous(xr, device, dtype).reshape(g.input_shape)

    def nchw_weights(wr):
        wr = weights_of(wr)
        return layout.nchw(wr) if weights_in_place else wr

    algo = _resolve_algo(impl, algo)
    auto = algo == "auto"
    if auto:
        (gyc, xc), wc = gy_x(*taken[:2]), nchw_weights(taken[2])
        algo = _tuned(impl, "backward", g, dtype, needs, lambda a: impl.conv2d_backward(gyc, xc, wc, g, a, needs))

    def nchw_run(gyr, xr, wr):
        (gyr, xr), wr = gy_x(gyr, xr), nchw_weights(wr)
        if (needs[1] and _direct_skips_padding(impl, g) and _may_skip_padding(impl, algo, g, dtype, True)
                and not _all_finite(gyr, device)):
            gx = impl.conv2d_backward(gyr, xr, wr, g, algo, (needs[0], False, False))[0] if needs[0] else None
            gx, gw, gb = (gx,) + tuple(impl.conv2d_backward(gyr, xr, wr, g, "im2col", (False, True, needs[2]))[1:])
        else:
            gx, gw, gb = impl.conv2d_backward(gyr, xr, wr, g, algo, needs)
        return _unbatch(gx, g.unbatched), gw, gb

    if auto and g.C > 1 and _runs_nhwc(impl, "conv2d_backward_nhwc", g, "auto", gy if needs[1] else None, device):
        def nhwc_run(gyr, xr, wr):
            gyr, xr = gy_x(gyr, xr)
            gx, gw, gb = impl.conv2d_backward_nhwc(layout.nhwc(gyr), layout.nhwc(xr), weights_of(wr), g, needs)
            return _unbatch(None if gx is None else layout.nchw(layout.from_nhwc(gx)), g.unbatched), gw, gb

        if _nchw_via_nhwc(impl, "backward", g, dtype, needs, lambda: nchw_run(*taken), lambda: nhwc_run(*taken),
                          weights) != "nchw":
            return impl, nhwc_run, taken
    return impl, nchw_run, taken


# ---------------------------------------------------------------- pooling


def max_pool2d(input, kernel_size: IntPair, stride: Optional[IntPair] = None, padding: IntPair = 0,
               dilation: IntPair = 1, ceil_mode: bool = False, return_indices: bool = False, *,
               backend: Optional[str] = None):
    """Max pooling, like ``torch.nn.functional.max_pool2d``.

    Padding counts as -inf and must be at most kernel_size/2; NaN propagates;
    ties keep the first position; indices (int64, with the output's shape) are
    h*W + w within each (n, c) plane. Returns out, or (out, indices).
    """
    (x,), device, dtype = _prepare("max_pool2d", [("input", input)], contiguous=False)
    g = pool2d_geometry(x.shape, kernel_size, stride, padding, dilation, ceil_mode, "max_pool2d")
    impl = _backends.select(device, backend, "max_pool2d_forward")
    if not return_indices and _takes_keyword(impl.max_pool2d_forward, "indices"):
        def run(xb, gb):
            return impl.max_pool2d_forward(xb, gb, indices=False)
    else:
        def run(xb, gb):
            return impl.max_pool2d_forward(xb, gb)
    cl = False
    if device == "cpu" and g.N and x.flags.c_contiguous and x.dtype == dtype:  # (most calls: nothing to convert)
        y, ind = run(x.reshape(g.input_shape) if g.unbatched else x, g)
    else:
        cl = layout.is_channels_last(x)
        if g.N == 0:
            y, ind = _zeros(device, g.output_shape, dtype), _zeros(device, g.output_shape, np.int64)
        elif cl and hasattr(impl, "max_pool2d_forward_nhwc"):
            y, ind = impl.max_pool2d_forward_nhwc(layout.nhwc(_native(x, dtype)), g, bool(return_indices))
            y, ind = layout.from_nhwc(y), None if ind is None else layout.from_nhwc(ind)
            cl = False  # already channels_last
        elif device == "cpu" and strided.worth_blocking(x, dtype):
            y, ind = _pool_blocks(x.reshape(g.input_shape), g, dtype, run, two=True)
        else:
            y, ind = run(_contiguous(x, device, dtype).reshape(g.input_shape), g)
    if cl:  # a backend without channels_last kernels: the output takes the input's layout
        y, ind = layout.to_channels_last(y), None if ind is None else layout.to_channels_last(ind)
    y = _unbatch(y, g.unbatched)
    return (y, _unbatch(ind, g.unbatched)) if return_indices else y


def max_pool2d_backward(grad_output, input, indices, kernel_size: IntPair, stride: Optional[IntPair] = None,
                        padding: IntPair = 0, dilation: IntPair = 1, ceil_mode: bool = False, *,
                        backend: Optional[str] = None):
    """Gradient of max_pool2d w.r.t. its input: each output's gradient goes to
    the position its index names. Returns an array shaped like input."""
    (gy, x), device, dtype = _prepare("max_pool2d_backward", [("grad_output", grad_output), ("input", input)],
                                      contiguous=False)
    g = pool2d_geometry(x.shape, kernel_size, stride, padding, dilation, ceil_mode, "max_pool2d_backward")
    gy = _check_shape(gy, g.output_shape, "grad_output", "max_pool2d_backward", g.unbatched)
    ind, ind_device = _as_array(indices, "indices", "max_pool2d_backward")
    if ind_device != device:
        raise ValueError(f"max_pool2d_backward: indices are on {ind_device} but grad_output is on {device}")
    if np.dtype(ind.dtype).kind not in "iu":
        raise TypeError(f"max_pool2d_backward: indices must be an integer array, got dtype {ind.dtype}")
    ind = _check_shape(ind, g.output_shape, "indices", "max_pool2d_backward", g.unbatched)
    impl = _backends.select(device, backend, "max_pool2d_backward")
    if (device == "cpu" and g.N and gy.flags.c_contiguous and ind.flags.c_contiguous and gy.dtype == dtype
            and ind.dtype == np.int64 and not layout.is_channels_last(x)):  # (most calls: nothing to convert)
        return _unbatch(impl.max_pool2d_backward(gy, ind, g), g.unbatched)
    if g.N == 0:
        return _unbatch(_zeros(device, g.input_shape, dtype), g.unbatched)
    if layout.is_channels_last(x):
        if hasattr(impl, "max_pool2d_backward_nhwc"):
            return layout.from_nhwc(impl.max_pool2d_backward_nhwc(
                layout.nhwc(_native(gy, dtype)), layout.nhwc(ind.astype(np.int64, copy=False)), g))
        return layout.to_channels_last(max_pool2d_backward(_contiguous(gy, device, dtype), _contiguous(x, device, dtype),
                                                           ind, kernel_size, stride, padding, dilation, ceil_mode,
                                                           backend=backend))
    if device == "cpu" and (strided.worth_blocking(gy, dtype) or strided.worth_blocking(ind, np.int64)):
        return _unbatch(_pool_backward_blocks(g, dtype, impl.max_pool2d_backward, gy, ind), g.unbatched)
    return _unbatch(impl.max_pool2d_backward(_contiguous(gy, device, dtype), _contiguous(ind, device, np.int64), g),
                    g.unbatched)


def avg_pool2d(input, kernel_size: IntPair, stride: Optional[IntPair] = None, padding: IntPair = 0,
               ceil_mode: bool = False, count_include_pad: bool = True, divisor_override: Optional[int] = None,
               *, backend: Optional[str] = None):
    """Average pooling, like ``torch.nn.functional.avg_pool2d``.

    The divisor is divisor_override if given, else the window size clipped to
    the padded input (count_include_pad=True) or to the real input (False).
    """
    (x,), device, dtype = _prepare("avg_pool2d", [("input", input)], contiguous=False)
    g = pool2d_geometry(x.shape, kernel_size, stride, padding, 1, ceil_mode, "avg_pool2d")
    div = check_divisor(divisor_override)
    impl = _backends.select(device, backend, "avg_pool2d_forward")

    def run(xb, gb):
        return impl.avg_pool2d_forward(xb, gb, bool(count_include_pad), div)

    if device == "cpu" and g.N and x.flags.c_contiguous and x.dtype == dtype:  # (most calls: nothing to convert)
        return _unbatch(run(x.reshape(g.input_shape) if g.unbatched else x, g), g.unbatched)
    if g.N == 0:
        return _unbatch(_zeros(device, g.output_shape, dtype), g.unbatched)
    if layout.is_channels_last(x):
        if hasattr(impl, "avg_pool2d_forward_nhwc"):
            return layout.from_nhwc(impl.avg_pool2d_forward_nhwc(layout.nhwc(_native(x, dtype)), g,
                                                                 bool(count_include_pad), div))
        return layout.to_channels_last(run(_contiguous(x, device, dtype), g))
    if device == "cpu" and strided.worth_blocking(x, dtype):
        return _unbatch(_pool_blocks(x.reshape(g.input_shape), g, dtype, run), g.unbatched)
    return _unbatch(run(_contiguous(x, device, dtype).reshape(g.input_shape), g), g.unbatched)


def avg_pool2d_backward(grad_output, input, kernel_size: IntPair, stride: Optional[IntPair] = None,
                        padding: IntPair = 0, ceil_mode: bool = False, count_include_pad: bool = True,
                        divisor_override: Optional[int] = None, *, backend: Optional[str] = None):
    """Gradient of avg_pool2d w.r.t. its input (shaped like input)."""
    (gy, x), device, dtype = _prepare("avg_pool2d_backward", [("grad_output", grad_output), ("input", input)],
                                      contiguous=False)
    g = pool2d_geometry(x.shape, kernel_size, stride, padding, 1, ceil_mode, "avg_pool2d_backward")
    gy = _check_shape(gy, g.output_shape, "grad_output", "avg_pool2d_backward", g.unbatched)
    div = check_divisor(divisor_override)
    impl = _backends.select(device, backend, "avg_pool2d_backward")

    def run(gyb, gb):
        return impl.avg_pool2d_backward(gyb, gb, bool(count_include_pad), div)

    if (device == "cpu" and g.N and gy.flags.c_contiguous and gy.dtype == dtype
            and not layout.is_channels_last(x)):  # (most calls: nothing to convert)
        return _unbatch(run(gy, g), g.unbatched)
    if g.N == 0:
        return _unbatch(_zeros(device, g.input_shape, dtype), g.unbatched)
    if layout.is_channels_last(x):
        if hasattr(impl, "avg_pool2d_backward_nhwc"):
            return layout.from_nhwc(impl.avg_pool2d_backward_nhwc(layout.nhwc(_native(gy, dtype)), g,
                                                                  bool(count_include_pad), div))
        return layout.to_channels_last(run(_contiguous(gy, device, dtype), g))
    if device == "cpu" and strided.worth_blocking(gy, dtype):
        return _unbatch(_pool_backward_blocks(g, dtype, run, gy), g.unbatched)
    return _unbatch(run(_contiguous(gy, device, dtype), g), g.unbatched)


# ---------------------------------------------------------------- relu


def relu(input, inplace: bool = False, *, backend: Optional[str] = None):
    """max(input, 0) elementwise, any shape; NaN stays NaN. With inplace=True
    the result is written into `input` (which must be a writeable array of
    float32/float64) and `input` is returned."""
    if type(input) is np.ndarray and not inplace and input.dtype in _FLOAT_DTYPES and input.flags.c_contiguous:
        # the common call, asked first: what the road below comes to for it
        return _backends.select("cpu", backend, "relu_forward").relu_forward(input)
    (x,), device, dtype = _prepare("relu", [("input", input)], contiguous=False)
    impl = _backends.select(device, backend, "relu_forward")
    if inplace:
        xp = _xp(device)
        if xp is None or not isinstance(input, xp.ndarray) or not input.flags.writeable:
            raise ValueError("relu: inplace=True needs a writeable NumPy or CuPy array")
    if inplace and x.dtype == dtype and hasattr(impl, "relu_forward_inplace"):
        view = x if x.flags.c_contiguous else x.transpose(layout.dense_order(x) or range(x.ndim))
        if view.flags.c_contiguous:  # over the memory as it lies: no second array, no copy back
            impl.relu_forward_inplace(view)
            return input
    order = layout.dense_order(x) if x.dtype == dtype else None
    if order is not None:  # channels_last or another dense layout: run on the memory as it lies
        y = impl.relu_forward(x.transpose(order)).transpose(layout.inverse(order))
    elif device == "cpu" and strided.worth_blocking(x, dtype):
        return _elementwise_blocks(impl.relu_forward, input if inplace else np.empty(x.shape, dtype), dtype, x)
    else:
        y = impl.relu_forward(_contiguous(x, device, dtype))
    if inplace:
        input[...] = y
        return input
    return y


def relu_backward(grad_output, input, inplace: bool = False, *, backend: Optional[str] = None):
    """grad_output where input > 0 (or is NaN), else 0. With inplace=True the
    result is written into `grad_output` (a writeable float32/float64 array
    of input's dtype) and `grad_output` is returned: a gradient nothing else
    holds need not be copied."""
    if (type(grad_output) is np.ndarray and type(input) is np.ndarray and not inplace
            and grad_output.dtype in _FLOAT_DTYPES and input.dtype == grad_output.dtype
            and grad_output.shape == input.shape and grad_output.flags.c_contiguous and input.flags.c_contiguous):
        # the common call, asked first: what the road below comes to for it
        return _backends.select("cpu", backend, "relu_backward").relu_backward(grad_output, input)
    (gy, x), device, dtype = _prepare("relu_backward", [("grad_output", grad_output), ("input", input)],
                                      contiguous=False)
    if gy.shape != x.shape:
        raise ValueError(f"relu_backward: grad_output shape {gy.shape} differs from input shape {x.shape}")
    impl = _backends.select(device, backend, "relu_backward")
    if inplace:
        xp = _xp(device)
        if xp is None or not isinstance(grad_output, xp.ndarray) or not grad_output.flags.writeable:
            raise ValueError("relu_backward: inplace=True needs grad_output to be a writeable NumPy or CuPy array")
    order = _common_order(gy, x) if x.dtype == dtype and gy.dtype == dtype else None
    if order is not None:  # both dense in one layout: as they lie
        gyo, xo = gy.transpose(order), x.transpose(order)
        if inplace and gy is grad_output and hasattr(impl, "relu_backward_inplace"):
            impl.relu_backward_inplace(gyo, xo)
            return grad_output
        gx = impl.relu_backward(gyo, xo).transpose(layout.inverse(order))
    elif device == "cpu" and (strided.worth_blocking(gy, dtype) or strided.worth_blocking(x, dtype)):
        gx = _elementwise_blocks(impl.relu_backward, np.empty(x.shape, dtype), dtype, gy, x)
    else:
        gx = impl.relu_backward(_contiguous(gy, device, dtype), _contiguous(x, device, dtype))
    if inplace:
        grad_output[...] = gx
        return grad_output
    return gx


def linear(input, weight, bias=None, *, backend: Optional[str] = None):
    """input @ weight.T + bias, like ``torch.nn.functional.linear``: input
    (*, in_features), weight (out_features, in_features), bias
    (out_features,) or None; returns (*, out_features). On cpp one kernel
    (dot products straight from input and weight for a few rows, the packed
    GEMM for more); on other backends a 1x1 conv2d whose width is the rows."""
    (x, w, b), device, dtype = _prepare("linear", [("input", input), ("weight", weight), ("bias", bias)])
    if w.ndim != 2:
        raise ValueError(f"linear: weight must be (out_features, in_features), got {tuple(w.shape)}")
    if x.ndim < 1 or x.shape[-1] != w.shape[1]:
        raise ValueError(f"linear: input must be (*, {w.shape[1]}) for weight {tuple(w.shape)}, "
                         f"got {tuple(x.shape)}")
    if b is not None and tuple(b.shape) != (w.shape[0],):
        raise ValueError(f"linear: bias must be ({w.shape[0]},) for weight {tuple(w.shape)}, got {tuple(b.shape)}")
    rows = x.reshape(-1, w.shape[1])
    impl = _backends.select(device, backend, "conv2d_forward")
    if _backends.supports(impl, "linear_forward"):
        y = impl.linear_forward(rows, w, b)
    else:  # (M, in) -> a (1, in, 1, M) image: features are channels, the rows its width
        xp = _xp(device)
        image = xp.ascontiguousarray(rows.T).reshape(1, w.shape[1], 1, rows.shape[0])
        out = conv2d(image, w.reshape(w.shape[0], w.shape[1], 1, 1), b, backend=backend)
        y = xp.ascontiguousarray(out.reshape(w.shape[0], rows.shape[0]).T)
    return y.reshape(tuple(x.shape[:-1]) + (w.shape[0],))


def linear_backward(grad_output, input, weight, *, needs=(True, True, True), backend: Optional[str] = None):
    """Gradients of ``linear``: (grad_input, grad_weight, grad_bias), each
    None where `needs` says so. grad_output (*, out_features), input
    (*, in_features), weight (out_features, in_features). On cpp two packed
    GEMMs (grad_output @ weight, grad_output^T @ input) and a float64 column
    sum; elsewhere the 1x1 conv2d's backward."""
    (gy, x, w), device, dtype = _prepare("linear_backward", [("grad_output", grad_output), ("input", input),
                                                             ("weight", weight)])
    if w.ndim != 2 or x.ndim < 1 or x.shape[-1] != w.shape[1] or tuple(gy.shape) != tuple(x.shape[:-1]) + (
            w.shape[0],):
        raise ValueError(f"linear_backward: need input (*, {w.shape[-1]}), weight (out, in) and grad_output "
                         f"(*, out); got input {tuple(x.shape)}, weight {tuple(w.shape)}, "
                         f"grad_output {tuple(gy.shape)}")
    rows, grows = x.reshape(-1, w.shape[1]), gy.reshape(-1, w.shape[0])
    impl = _backends.select(device, backend, "conv2d_backward")
    if _backends.supports(impl, "linear_backward"):
        gx, gw, gb = impl.linear_backward(grows, rows, w, tuple(bool(n) for n in needs))
    else:  # as a (1, in, 1, M) image, the rows its width
        xp = _xp(device)

        def image(a):
            return xp.ascontiguousarray(a.T).reshape(1, a.shape[1], 1, a.shape[0])

        gx, gw, gb = conv2d_backward(image(grows), image(rows), w.reshape(w.shape[0], w.shape[1], 1, 1),
                                     needs=needs, backend=backend)
        gx = None if gx is None else xp.ascontiguousarray(gx.reshape(w.shape[1], rows.shape[0]).T)
        gw = None if gw is None else gw.reshape(w.shape)
    return (None if gx is None else gx.reshape(x.shape)), gw, gb


def _common_order(a, b) -> Optional[Tuple[int, ...]]:
    """An axis order in which both arrays are C-contiguous (the identity for
    two C-contiguous arrays), else None."""
    if a.flags.c_contiguous and b.flags.c_contiguous:
        return tuple(range(a.ndim))
    order = layout.dense_order(a)
    return order if order is not None and layout.dense_order(b) == order else None


def _elementwise_blocks(kernel, out: np.ndarray, dtype, *inputs) -> np.ndarray:
    """out = kernel(*inputs), a bounded block at a time (convkern.strided)."""
    for idx in strided.blocks(out.shape, np.dtype(dtype).itemsize):
        out[idx] = kernel(*(np.ascontiguousarray(a[idx], dtype=dtype) for a in inputs)).reshape(out[idx].shape)
    return out


def _pool_backward_blocks(g, dtype, kernel, gy: np.ndarray, ind: Optional[np.ndarray] = None) -> np.ndarray:
    """A pooling backward over blocks of whole planes of a grad_output (and
    indices) that would need a copy: kernel(gy block[, ind block], geometry)."""
    N, C, H, W = g.input_shape
    gx = np.empty(g.input_shape, dtype)
    for n, cs in strided.plane_blocks(N, C, max(H * W, g.Ho * g.Wo), np.dtype(dtype).itemsize):
        gb = dataclasses.replace(g, N=1, C=len(range(C)[cs]))
        args = [np.ascontiguousarray(gy[n:n + 1, cs], dtype=dtype)]
        if ind is not None:
            args.append(np.ascontiguousarray(ind[n:n + 1, cs], dtype=np.int64))
        gx[n:n + 1, cs] = kernel(*args, gb)
    return gx


def _pool_blocks(x: np.ndarray, g, dtype, run, two: bool = False):
    """A pooling forward over blocks of whole (n, c) planes of a view that
    would need a copy: run(block, its geometry) on each, results written into
    the full output(s). Max pooling's indices are within a plane, so they
    hold as they come."""
    N, C, H, W = g.input_shape
    y, ind = np.empty(g.output_shape, dtype), None
    for n, cs in strided.plane_blocks(N, C, H * W, np.dtype(dtype).itemsize):
        block = np.ascontiguousarray(x[n:n + 1, cs], dtype=dtype)
        got = run(block, dataclasses.replace(g, N=1, C=block.shape[1]))
        y[n:n + 1, cs] = got[0] if two else got
        if two and got[1] is not None:  # max pooling without indices asked gives None
            if ind is None:
                ind = np.empty(g.output_shape, np.int64)
            ind[n:n + 1, cs] = got[1]
    return (y, ind) if two else y


__all__ = ["algorithms", "conv2d", "conv2d_backward", "conv2d_relu", "conv2d_relu_backward", "max_pool2d",
           "max_pool2d_backward", "avg_pool2d", "avg_pool2d_backward", "relu", "relu_backward", "linear",
           "linear_backward", "ConvGeometry", "PoolGeometry"]
