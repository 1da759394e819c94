"""The backend contract: the functions a backend may implement, with their
exact signatures and what they must do. ``register_backend`` checks every one
a backend has against these (a backend may implement any subset of OPS; an op
it lacks raises UnsupportedOpError when asked for). Arrays arrive validated:
C-contiguous, native-endian float32/float64 (indices int64), on the backend's
device, with shapes that match the geometry; outputs are fresh arrays of the
input's dtype. A module also gives ``NAME``, ``DEVICE`` ("cpu" or "cuda"),
``ALGOS`` (the conv2d algorithms it runs by name) and ``available() -> (bool,
reason)``; ``choose_algo(g, backward=False, dtype="float32")`` and
``algo_problem(g, algo, backward)`` are optional (what "auto" runs for g's
forward, or its grad input, in that dtype; why an algorithm cannot run g).
"""

from __future__ import annotations

import inspect
from typing import Dict, Optional, Tuple

from ..geometry import ConvGeometry, PoolGeometry


def conv2d_forward(x, weight, bias, g: ConvGeometry, algo: str, relu: bool = False):
    """y (N, K, Ho, Wo) = conv(x (N, C, H, W), weight (K, C/groups, R, S)) + bias
    (K,) or None. algo: "auto" (the backend's own rule, resolved here and
    nowhere else) or one of ALGOS, which must then run exactly that.
    relu (optional): store relu(y); a backend without it gets relu applied
    to its output by the caller."""


def conv2d_backward(grad_output, x, weight, g: ConvGeometry, algo: str, needs=(True, True, True)):
    """(grad_input, grad_weight, grad_bias), each None unless its flag in
    `needs` is set."""


def max_pool2d_forward(x, g: PoolGeometry, indices: bool = True):
    """(y, indices) over N*C planes; indices int64 h*W + w per plane, -1 for a
    window with no input. `indices` is optional: a backend that takes it may
    return (y, None) when it is False."""


def max_pool2d_backward(grad_output, indices, g: PoolGeometry):
    """grad_input: each output's gradient added at its index; raises
    ValueError for an index outside [-1, H*W)."""


def avg_pool2d_forward(x, g: PoolGeometry, count_include_pad: bool = True, divisor_override: int = 0):
    """y; the divisor is divisor_override if non-zero, else the window clipped
    to the padded input (count_include_pad) or to the input."""


def avg_pool2d_backward(grad_output, g: PoolGeometry, count_include_pad: bool = True, divisor_override: int = 0):
    """grad_input, with avg_pool2d_forward's divisors."""


def relu_forward(x):
    """max(x, 0), any shape; NaN stays NaN."""


def relu_forward_inplace(x):
    """Optional: relu written over x itself (writeable, C-contiguous); returns None."""


def relu_backward(grad_output, x):
    """grad_output where x > 0 or x is NaN, else 0."""


def relu_backward_inplace(grad_output, x):
    """Optional: relu_backward written over grad_output itself (writeable, C-contiguous, x's shape); returns None."""


def sgd_update(param, grad, momentum_buffer, lr, momentum, dampening, weight_decay, nesterov, first):
    """Optional: one SGD step (PyTorch's rule) written over param and momentum_buffer (None without
    momentum; on the first step it is filled with the gradient), all C-contiguous, one dtype, no overlap;
    returns None."""


def gemm(a, b):
    """a (M, K) @ b (K, N), for the tests and the bench (not an op of OPS)."""


# Channels_last forms, optional: a backend with them gets channels_last
# (NHWC-strided) arrays as C-contiguous (N, H, W, C) buffers and returns
# (N, Ho, Wo, K) ones; without them convkern converts to NCHW and back.
# Weights stay (K, C/groups, R, S); pool geometries still count N*C planes.


def conv2d_forward_nhwc(x, weight, bias, g: ConvGeometry, relu: bool = False):
    """y (N, Ho, Wo, K) from x (N, H, W, C); relu=True stores relu(y) (a fused epilogue)."""


def conv2d_backward_nhwc(grad_output, x, weight, g: ConvGeometry, needs=(True, True, True)):
    """(grad_input (N, H, W, C), grad_weight, grad_bias) from grad_output (N, Ho, Wo, K)."""


def max_pool2d_forward_nhwc(x, g: PoolGeometry, indices: bool = True):
    """(y, indices), both (N, Ho, Wo, C); indices as max_pool2d_forward's (h*W + w per plane)."""


def max_pool2d_backward_nhwc(grad_output, indices, g: PoolGeometry):
    """grad_input (N, H, W, C)."""


def avg_pool2d_forward_nhwc(x, g: PoolGeometry, count_include_pad: bool = True, divisor_override: int = 0):
    """y (N, Ho, Wo, C)."""


def avg_pool2d_backward_nhwc(grad_output, g: PoolGeometry, count_include_pad: bool = True, divisor_override: int = 0):
    """grad_input (N, H, W, C)."""


CONTRACT: Dict[str, inspect.Signature] = {
    f.__name__: inspect.signature(f)
    for f in (conv2d_forward, conv2d_backward, max_pool2d_forward, max_pool2d_backward, avg_pool2d_forward,
              avg_pool2d_backward, relu_forward, relu_forward_inplace, relu_backward,
              relu_backward_inplace, sgd_update, gemm, conv2d_forward_nhwc, conv2d_backward_nhwc,
              max_pool2d_forward_nhwc, max_pool2d_backward_nhwc, avg_pool2d_forward_nhwc, avg_pool2d_backward_nhwc)
}
# parameters a backend may leave out (then it is never passed)
OPTIONAL = {"max_pool2d_forward": ("indices",), "conv2d_forward": ("relu",),
            "conv2d_forward_nhwc": ("relu",)}


def _describe(name: str, sig: inspect.Signature) -> str:
    return f"{name}{sig}".replace("'", "")


def mismatch(name: str, fn) -> Optional[str]:
    """Why `fn` does not fit the contract's `name`, or None. It must take the
    contract's parameters in order (names may differ), may leave out the
    optional ones, and may add parameters only with defaults."""
    want = CONTRACT[name]
    if not callable(fn):
        return f"{name} is not callable"
    try:
        have = inspect.signature(fn)
    except (TypeError, ValueError):
        return None  # a builtin without a signature: trusted
    params = [p for p in have.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if any(p.kind == p.VAR_POSITIONAL for p in have.parameters.values()):
        return None
    optional = OPTIONAL.get(name, ())
    expected = [p for p in want.parameters.values() if p.name not in optional]
    required_have = [p for p in params if p.default is p.empty]
    required_want = [p for p in expected if p.default is p.empty]
    if len(params) < len(expected) or len(required_have) > len(required_want):
        return (f"{_describe(name, have)} does not match the contract {_describe(name, want)}: it must take "
                f"{len(required_want)} positional arguments ({', '.join(p.name for p in required_want)}) "
                f"and give later ones defaults")
    return None


def check(backend: str, module) -> Tuple[str, ...]:
    """The contract's functions `module` implements; ValueError naming the
    first that does not fit."""
    found = []
    for name in CONTRACT:
        fn = getattr(module, name, None)
        if fn is None:
            continue
        why = mismatch(name, fn)
        if why:
            raise ValueError(f"backend {backend!r}: {why}")
        found.append(name)
    return tuple(found)
