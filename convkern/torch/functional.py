"""``torch.nn.functional``'s conv2d, pools and relu on convkern's kernels.

Same signatures and semantics as torch's, plus keyword-only ``algo=`` and
``backend=`` (as in :func:`convkern.conv2d`). Arguments are checked here and
again by convkern's geometry, so a bad one raises the same ``ValueError`` or
``TypeError`` that :mod:`convkern.functional` gives, before any kernel runs.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.graph import increment_version

from .. import functional as ck
from ..geometry import pair
from . import ops

SUPPORTED_DTYPES = (torch.float32, torch.float64)


def check_tensors(op: str, **named) -> None:
    """Tensors of a supported dtype, all on one device."""
    first = None
    for name, t in named.items():
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{op}: {name} has dtype {t.dtype}; convkern supports torch.float32 and torch.float64")
        if t.device.type not in ("cpu", "cuda"):
            raise TypeError(f"{op}: {name} is on {t.device}; convkern runs on cpu and cuda tensors")
        if first is None:
            first = (name, t)
        elif t.device != first[1].device:
            raise ValueError(f"{op}: {name} is on {t.device} but {first[0]} is on {first[1].device}; "
                             f"move them to one device")
        elif t.dtype != first[1].dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but {first[0]} has dtype {first[1].dtype}; "
                            f"use one dtype")


def _backend(backend: Optional[str]) -> str:
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend must be a backend name or None, got {backend!r}")
    return backend or ""


def _pair(value, name: str):
    t = type(value)  # (a module's own tuple of two ints, or an int: most calls; checked in full otherwise)
    if t is tuple and len(value) == 2 and type(value[0]) is int and type(value[1]) is int:
        return [value[0], value[1]]
    if t is int:
        return [value, value]
    return list(pair(value, name))


def _fine(input, weight, bias) -> bool:
    """The common case check_tensors passes, asked quickly: CPU tensors of one supported dtype."""
    return (isinstance(input, Tensor) and isinstance(weight, Tensor) and input.is_cpu and weight.is_cpu
            and input.dtype in SUPPORTED_DTYPES and weight.dtype == input.dtype
            and (bias is None or (isinstance(bias, Tensor) and bias.is_cpu and bias.dtype == input.dtype)))


def _check_input(op: str, input) -> None:
    """check_tensors for an op's one tensor, the common case asked first."""
    if not (isinstance(input, Tensor) and input.is_cpu and input.dtype in SUPPORTED_DTYPES):
        check_tensors(op, input=input)


def _conv_args(op: str, input, weight, bias, stride, padding, dilation, algo):
    if not _fine(input, weight, bias):
        check_tensors(op, input=input, weight=weight, bias=bias)
    if isinstance(padding, str):
        if padding not in ("same", "valid"):
            raise ValueError(f"{op}: padding must be an int, a pair, 'same' or 'valid', got {padding!r}")
        same, pad = padding == "same", [0, 0]
    else:
        same, pad = False, _pair(padding, "padding")
    if not isinstance(algo, str):
        raise TypeError(f"algo must be a string, got {algo!r}")
    return _pair(stride, "stride"), pad, same, _pair(dilation, "dilation")


def conv2d(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride=1, padding=0, dilation=1,
           groups: int = 1, *, algo: str = "auto", backend: Optional[str] = None) -> Tensor:
    """``torch.nn.functional.conv2d`` on convkern; padding may be an int, a pair, "same" or "valid"."""
    stride, pad, same, dilation = _conv_args("conv2d", input, weight, bias, stride, padding, dilation, algo)
    return ops.conv2d.call(input, weight, bias, stride, pad, same, dilation, groups, algo, _backend(backend))


def conv2d_relu(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride=1, padding=0, dilation=1,
                groups: int = 1, *, algo: str = "auto", backend: Optional[str] = None) -> Tensor:
    """``relu(conv2d(...))`` as one op (:func:`convkern.conv2d_relu`): the
    relu is applied as the conv's output is stored, and the backward takes
    relu's gradient from the result, so nothing more is saved than for the
    conv alone."""
    stride, pad, same, dilation = _conv_args("conv2d_relu", input, weight, bias, stride, padding, dilation, algo)
    return ops.conv2d_relu.call(input, weight, bias, stride, pad, same, dilation, groups, algo, _backend(backend))


def _stride(stride, kernel_size):
    # torch: stride None or an empty list means the kernel size
    return _pair(kernel_size if stride is None or (isinstance(stride, (list, tuple)) and not stride) else stride,
                 "stride")


def max_pool2d(input: Tensor, kernel_size, stride=None, padding=0, dilation=1, ceil_mode: bool = False,
               return_indices: bool = False, *, backend: Optional[str] = None):
    """``torch.nn.functional.max_pool2d`` on convkern (indices are h*W + w per plane, as torch's)."""
    _check_input("max_pool2d", input)
    y, ind = ops.max_pool2d.call(input, _pair(kernel_size, "kernel_size"), _stride(stride, kernel_size),
                                 _pair(padding, "padding"), _pair(dilation, "dilation"), bool(ceil_mode),
                                 _backend(backend))
    return (y, ind) if return_indices else y


def avg_pool2d(input: Tensor, kernel_size, stride=None, padding=0, ceil_mode: bool = False,
               count_include_pad: bool = True, divisor_override: Optional[int] = None, *,
               backend: Optional[str] = None) -> Tensor:
    """``torch.nn.functional.avg_pool2d`` on convkern."""
    _check_input("avg_pool2d", input)
    return ops.avg_pool2d.call(input, _pair(kernel_size, "kernel_size"), _stride(stride, kernel_size),
                               _pair(padding, "padding"), bool(ceil_mode), bool(count_include_pad), divisor_override,
                               _backend(backend))


def adaptive_kernel(size, output_size):
    """(kernel, stride) pairs when every output size divides its input size,
    which makes adaptive average pooling an ordinary one; else None."""
    H, W = int(size[-2]), int(size[-1])
    if isinstance(output_size, int):
        output_size = (output_size, output_size)
    if len(output_size) != 2:
        return None
    out = [size if o is None else int(o) for o, size in zip(output_size, (H, W))]
    if min(out) <= 0 or H % out[0] or W % out[1]:
        return None
    return [H // out[0], W // out[1]]


def adaptive_avg_pool2d(input: Tensor, output_size, *, backend: Optional[str] = None) -> Tensor:
    """``torch.nn.functional.adaptive_avg_pool2d``. Where each output size
    divides the input size (global pooling, for instance) it is an average
    pool with kernel = stride = input/output and runs on convkern; otherwise
    the windows overlap unevenly and torch's own kernel runs."""
    check_tensors("adaptive_avg_pool2d", input=input)
    kernel = adaptive_kernel(input.shape, output_size)
    if kernel is None:
        return F.adaptive_avg_pool2d(input, output_size)
    return ops.avg_pool2d.call(input, kernel, kernel, [0, 0], False, True, None, _backend(backend))


class _InplaceReLU(torch.autograd.Function):
    """relu written into its input. Marked dirty, so autograd rebases the
    input's history onto this op as it does for torch.relu_ (a plain
    input.copy_(relu(input)) would leave autograd a zero gradient to fill and
    add for the overwritten value on every backward)."""

    @staticmethod
    def forward(ctx, input: Tensor, backend: str) -> Tensor:
        if input.device.type == "cpu":  # the kernel writes over the tensor's memory
            with ops.on_torch_stream(input):
                ck.relu(ops.to_array(input), inplace=True, backend=ops._opt(backend))
        else:
            input.copy_(ops.relu.impl(input, backend))
        ctx.mark_dirty(input)
        ctx.save_for_backward(input)
        ctx.backend = backend
        return input

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        (output,) = ctx.saved_tensors
        backward = ops.relu.backward_op if torch.is_grad_enabled() else ops.relu.backward_impl
        return backward(grad_output, output, ctx.backend), None


def relu(input: Tensor, inplace: bool = False, *, backend: Optional[str] = None) -> Tensor:
    """``torch.nn.functional.relu``; with inplace=True the result is written
    into `input` (an in-place op autograd and torch.compile track, as torch's
    relu_) and `input` is returned."""
    _check_input("relu", input)
    if not inplace:
        return ops.relu.call(input, _backend(backend))
    if torch.is_grad_enabled() and input.requires_grad and not torch.compiler.is_compiling():
        # (a compiled graph is functionalized: there the plain copy below costs nothing extra)
        return _InplaceReLU.apply(input, _backend(backend))
    if input.device.type == "cpu" and not torch.compiler.is_compiling():
        ck.relu(ops.to_array(input), inplace=True, backend=ops._opt(_backend(backend)))
        # written behind autograd's back: bump the version as an in-place torch op
        # does, so a backward that saved this tensor sees it changed and refuses
        increment_version(input)
        return input
    return input.copy_(ops.relu.call(input, _backend(backend)))


__all__ = ["conv2d", "conv2d_relu", "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "relu"]
