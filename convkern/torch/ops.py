"""The custom ops: ``torch.ops.convkern.<op>`` and their backward twins.

Each forward op has autograd registered (its backward calls the matching
``*_backward`` op, asking only for the gradients autograd needs) and a fake
implementation that gives the output's shape, dtype and memory format without
running a kernel, which is what ``torch.compile`` and ``torch.export`` trace.
Backward ops have an autograd formula that refuses: convkern's backward
kernels are not themselves differentiable, so double backward is an error.

Eager calls take a shorter road to the same kernels (:func:`call`): the
autograd that ``register_autograd`` generates costs about 100 µs a call in
Python (a 6x6 conv forward and backward: 169 µs through it, 63 µs through a
plain ``torch.autograd.Function``, 26 µs for the kernels alone), which would
dominate small layers. So outside ``torch.compile``/``torch.export`` an op
that needs gradients runs as an ``autograd.Function`` with the same setup and
gradient formula, and one that needs none calls its implementation directly;
traced code gets the registered ops.

Tensors cross to convkern as NumPy views (CPU; no copy) or CuPy arrays via
DLPack (CUDA; no copy, on torch's current stream); results come back the same
way. A channels_last tensor crosses as a channels_last array, which the cpp
backend's NHWC kernels read and write as it lies: the output is channels_last,
as torch would give it, with no copy either way (other backends convert).
"""

from __future__ import annotations

import contextlib
from typing import List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from .. import functional as ck
from .. import layout as _layout
from .. import weight_cache as _weight_cache
from ..geometry import conv2d_geometry, pool2d_geometry

# ---------------------------------------------------------------- crossing


def memory_format(t: Tensor) -> torch.memory_format:
    """The format torch gives the output of a conv/pool on `t`."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def conv_memory_format(input: Tensor, weight: Tensor) -> torch.memory_format:
    """The format torch gives a conv's output: channels_last where the input
    is, or where the weight's strides read so (a channels_last model's conv
    on an NCHW input, or on one-channel images, which are both layouts)."""
    if input.dim() == 4 and weight.dim() == 4 and _layout.strides_say_channels_last(tuple(weight.shape),
                                                                                    weight.stride()):
        return torch.channels_last
    return memory_format(input)


def to_array(t: Tensor):
    """A NumPy (CPU) or CuPy (CUDA) view of `t`: same memory, no copy."""
    if t.is_cpu:
        return (t.detach() if t.requires_grad else t).numpy()
    t = t.detach()
    if t.device.type == "cuda":
        import cupy

        return cupy.from_dlpack(t)
    raise TypeError(f"convkern.torch: tensors on {t.device} are not supported (cpu and cuda are)")


def from_array(a, fmt: torch.memory_format = torch.contiguous_format) -> Tensor:
    t = torch.from_numpy(a) if isinstance(a, np.ndarray) else torch.from_dlpack(a)
    return t if fmt == torch.contiguous_format else t.contiguous(memory_format=fmt)


def empty(t: Tensor, shape, fmt: torch.memory_format = torch.contiguous_format, dtype=None) -> Tensor:
    return torch.empty(tuple(shape), dtype=dtype or t.dtype, device=t.device, memory_format=fmt)


_threads_set = [0]


def _follow_torch_threads() -> None:
    """convkern's kernels take torch's intra-op thread count. (The two share one
    OpenMP runtime: both load libgomp.so.1, and the second to load gets the
    first's; so no second pool spins beside torch's.)"""
    n = torch.get_num_threads()
    if n != _threads_set[0]:
        import convkern

        convkern.set_num_threads(n)
        _threads_set[0] = n


class _OnTorchStream:
    """CuPy work on torch's current stream for a CUDA tensor's device."""

    __slots__ = ("_t", "_inner")

    def __init__(self, t: Tensor):
        self._t, self._inner = t, contextlib.ExitStack()

    def __enter__(self) -> None:
        import cupy

        t = self._t
        stream = torch.cuda.current_stream(t.device)
        self._inner.enter_context(cupy.cuda.Device(t.device.index))
        self._inner.enter_context(cupy.cuda.ExternalStream(stream.cuda_stream, t.device.index))

    def __exit__(self, *exc) -> None:
        self._inner.__exit__(*exc)


_ON_CPU = contextlib.nullcontext()


def on_torch_stream(t: Tensor):
    """A context that runs CPU work with torch's thread count (set here), or
    CuPy work on torch's current stream for `t`'s device. (The CPU's is one
    shared do-nothing context: small layers feel every microsecond a call.)"""
    if not t.is_cuda:
        _follow_torch_threads()
        return _ON_CPU
    return _OnTorchStream(t)


def _opt(backend: str) -> Optional[str]:
    return backend or None


def _double_backward(ctx, *grads):
    raise RuntimeError("convkern.torch: double backward (a gradient of a gradient) is not supported: convkern's "
                       "backward kernels are not themselves differentiable")


def _refuse_setup(ctx, inputs, output):
    pass


def _padding(padding: List[int], same: bool):
    return "same" if same else tuple(padding)


class Op:
    """One convkern op in torch: ``impl`` (the kernel call on tensors) and
    ``backward_impl`` registered as the custom ops ``convkern::<name>`` and
    ``convkern::<name>_backward`` with their fake implementations, autograd
    from ``setup(ctx, inputs, output)`` and ``grad(ctx, backward, *grads)``,
    and the same setup and gradient as a plain autograd.Function for eager
    calls (see the module docstring). ``op(*args)`` calls the registered op."""

    def __init__(self, name, impl, fake, backward_impl, backward_fake, setup, grad, tensors: int):
        self.impl, self.backward_impl = impl, backward_impl
        self.tensors = tensors  # how many leading arguments may be tensors (the rest are settings)
        self.op = torch.library.custom_op(f"convkern::{name}", impl, mutates_args=())
        self.op.register_fake(fake)
        self.backward_op = torch.library.custom_op(f"convkern::{name}_backward", backward_impl, mutates_args=())
        self.backward_op.register_fake(backward_fake)
        self.op.register_autograd(lambda ctx, *grads: grad(ctx, self.backward_op, *grads), setup_context=setup)
        self.backward_op.register_autograd(_double_backward, setup_context=_refuse_setup)
        op = self

        def forward(ctx, *args):
            output = impl(*args)
            setup(ctx, args, output)
            return output

        def backward(ctx, *grads):
            # with create_graph, the registered backward op: its autograd refuses double backward
            return grad(ctx, op.backward_op if torch.is_grad_enabled() else op.backward_impl, *grads)

        # named per op, so profiles show convkern_conv2d / convkern_conv2dBackward
        self.function = type(f"convkern_{name}", (torch.autograd.Function,),
                             {"forward": staticmethod(forward), "backward": staticmethod(backward)})

    def __call__(self, *args):
        return self.op(*args)

    def call(self, *args):
        """The op for `args`: registered while torch.compile/export traces,
        else the autograd.Function where a gradient is wanted, else the bare
        implementation."""
        if torch.compiler.is_compiling():
            return self.op(*args)
        if torch.is_grad_enabled():
            for a in args[:self.tensors]:
                if a is not None and a.requires_grad:
                    return self.function.apply(*args)
        return self.impl(*args)


# ---------------------------------------------------------------- conv2d


def _run_conv(fn, input: Tensor, weight: Tensor, bias: Optional[Tensor], stride, padding, same: bool, dilation,
              groups: int, algo: str, backend: str) -> Tensor:
    # inside convkern.cached_weights(), the tensor's version tells a weight
    # changed in place (an optimizer step) from the one whose filters are kept
    token = _weight_cache.weight_version.set(weight._version) if _weight_cache.active() else None
    try:
        fmt = conv_memory_format(input, weight)
        with on_torch_stream(input):
            y = fn(to_array(input), to_array(weight), None if bias is None else to_array(bias), stride,
                   _padding(padding, same), dilation, groups, algo=algo, backend=_opt(backend),
                   memory_format="channels_last" if fmt == torch.channels_last and input.dim() == 4 else None)
    finally:
        if token is not None:
            _weight_cache.weight_version.reset(token)
    return from_array(y, fmt)


def conv2d_impl(input: Tensor, weight: Tensor, bias: Optional[Tensor], stride: List[int], padding: List[int],
           same: bool, dilation: List[int], groups: int, algo: str, backend: str) -> Tensor:
    return _run_conv(ck.conv2d, input, weight, bias, stride, padding, same, dilation, groups, algo, backend)


def _conv2d_fake(input, weight, bias, stride, padding, same, dilation, groups, algo, backend):
    g = conv2d_geometry(input.shape, weight.shape, None if bias is None else bias.shape, stride,
                        _padding(padding, same), dilation, groups)
    shape = g.output_shape[1:] if g.unbatched else g.output_shape
    return empty(input, shape, conv_memory_format(input, weight))


def conv2d_backward_impl(grad_output: Tensor, input: Tensor, weight: Tensor, stride: List[int], padding: List[int],
                    same: bool, dilation: List[int], groups: int, needs: List[bool], algo: str,
                    backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    with on_torch_stream(input):
        grads = ck.conv2d_backward(to_array(grad_output), to_array(input), to_array(weight), stride,
                                   _padding(padding, same), dilation, groups, needs=tuple(needs), algo=algo,
                                   backend=_opt(backend))
    return _conv_grads(input, *grads)


def _conv_grads(input: Tensor, gx, gw, gb) -> Tuple[Tensor, Tensor, Tensor]:
    # outputs may not alias each other: a fresh empty tensor for each gradient not asked for
    return (input.new_empty(0) if gx is None else from_array(gx, memory_format(input)),
            input.new_empty(0) if gw is None else from_array(gw),
            input.new_empty(0) if gb is None else from_array(gb))


def _conv2d_backward_fake(grad_output, input, weight, stride, padding, same, dilation, groups, needs, algo, backend):
    return (empty(input, input.shape, memory_format(input)) if needs[0] else input.new_empty(0),
            empty(weight, weight.shape) if needs[1] else input.new_empty(0),
            empty(weight, (weight.shape[0],)) if needs[2] else input.new_empty(0))


def _conv2d_setup(ctx, inputs, output):
    input, weight, bias, *geometry = inputs
    ctx.save_for_backward(input, weight)
    ctx.geometry = geometry
    ctx.has_bias = bias is not None


def _conv2d_grad(ctx, backward, grad_output):
    input, weight = ctx.saved_tensors
    needs = [bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1]),
             bool(ctx.needs_input_grad[2]) and ctx.has_bias]
    if not any(needs):
        return (None,) * 10
    gx, gw, gb = backward(grad_output, input, weight, *ctx.geometry[:5], needs, *ctx.geometry[5:])
    return (gx if needs[0] else None, gw if needs[1] else None, gb if needs[2] else None) + (None,) * 7


conv2d = Op("conv2d", conv2d_impl, _conv2d_fake, conv2d_backward_impl, _conv2d_backward_fake, _conv2d_setup,
            _conv2d_grad, 3)

# ---------------------------------------------------------------- conv2d + relu (fused)


def conv2d_relu_impl(input: Tensor, weight: Tensor, bias: Optional[Tensor], stride: List[int], padding: List[int],
                     same: bool, dilation: List[int], groups: int, algo: str, backend: str) -> Tensor:
    return _run_conv(ck.conv2d_relu, input, weight, bias, stride, padding, same, dilation, groups, algo, backend)


def conv2d_relu_backward_impl(grad_output: Tensor, output: Tensor, input: Tensor, weight: Tensor,
                              stride: List[int], padding: List[int], same: bool, dilation: List[int], groups: int,
                              needs: List[bool], algo: str, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    with on_torch_stream(input):  # (relu's gradient as an array, straight into the conv's backward)
        grads = ck.conv2d_relu_backward(to_array(grad_output), to_array(input), to_array(weight), to_array(output),
                                        stride, _padding(padding, same), dilation, groups, needs=tuple(needs),
                                        algo=algo, backend=_opt(backend))
    return _conv_grads(input, *grads)


def _conv2d_relu_backward_fake(grad_output, output, input, weight, stride, padding, same, dilation, groups, needs,
                               algo, backend):
    return _conv2d_backward_fake(grad_output, input, weight, stride, padding, same, dilation, groups, needs, algo,
                                 backend)


def _conv2d_relu_setup(ctx, inputs, output):
    input, weight, bias, *geometry = inputs
    # relu's output stands in for the conv's (positive, or NaN, exactly where it is)
    ctx.save_for_backward(output, input, weight)
    ctx.geometry = geometry
    ctx.has_bias = bias is not None


def _conv2d_relu_grad(ctx, backward, grad_output):
    output, input, weight = ctx.saved_tensors
    needs = [bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1]),
             bool(ctx.needs_input_grad[2]) and ctx.has_bias]
    if not any(needs):
        return (None,) * 10
    gx, gw, gb = backward(grad_output, output, input, weight, *ctx.geometry[:5], needs, *ctx.geometry[5:])
    return (gx if needs[0] else None, gw if needs[1] else None, gb if needs[2] else None) + (None,) * 7


conv2d_relu = Op("conv2d_relu", conv2d_relu_impl, _conv2d_fake, conv2d_relu_backward_impl,
                 _conv2d_relu_backward_fake, _conv2d_relu_setup, _conv2d_relu_grad, 3)

# ---------------------------------------------------------------- max pooling


def max_pool2d_impl(input: Tensor, kernel_size: List[int], stride: List[int], padding: List[int], dilation: List[int],
               ceil_mode: bool, backend: str) -> Tuple[Tensor, Tensor]:
    fmt = memory_format(input)
    with on_torch_stream(input):
        y, ind = ck.max_pool2d(to_array(input), kernel_size, stride, padding, dilation, ceil_mode,
                               return_indices=True, backend=_opt(backend))
    return from_array(y, fmt), from_array(ind, fmt)


def _pool_out(input, kernel_size, stride, padding, dilation, ceil_mode, op):
    g = pool2d_geometry(input.shape, kernel_size, stride, padding, dilation, ceil_mode, op)
    return g.output_shape[1:] if g.unbatched else g.output_shape


def _max_pool2d_fake(input, kernel_size, stride, padding, dilation, ceil_mode, backend):
    shape, fmt = _pool_out(input, kernel_size, stride, padding, dilation, ceil_mode, "max_pool2d"), memory_format(input)
    return empty(input, shape, fmt), empty(input, shape, fmt, torch.int64)


def max_pool2d_backward_impl(grad_output: Tensor, input: Tensor, indices: Tensor, kernel_size: List[int],
                        stride: List[int], padding: List[int], dilation: List[int], ceil_mode: bool,
                        backend: str) -> Tensor:
    with on_torch_stream(input):
        gx = ck.max_pool2d_backward(to_array(grad_output), to_array(input), to_array(indices), kernel_size, stride,
                                    padding, dilation, ceil_mode, backend=_opt(backend))
    return from_array(gx, memory_format(input))


def _max_pool2d_backward_fake(grad_output, input, indices, kernel_size, stride, padding, dilation, ceil_mode,
                              backend):
    return empty(input, input.shape, memory_format(input))


def _max_pool2d_setup(ctx, inputs, output):
    input, *geometry = inputs
    ctx.save_for_backward(input, output[1])
    ctx.geometry = geometry
    ctx.mark_non_differentiable(output[1])
    # (else autograd fills the indices' gradient, never asked for, with a tensor of zeros on every backward)
    ctx.set_materialize_grads(False)


def _max_pool2d_grad(ctx, backward, grad_output, grad_indices):
    if grad_output is None:  # only the indices were used
        return (None,) * 7
    input, indices = ctx.saved_tensors
    return (backward(grad_output, input, indices, *ctx.geometry),) + (None,) * 6


max_pool2d = Op("max_pool2d", max_pool2d_impl, _max_pool2d_fake, max_pool2d_backward_impl, _max_pool2d_backward_fake,
                _max_pool2d_setup, _max_pool2d_grad, 1)

# ---------------------------------------------------------------- average pooling


def avg_pool2d_impl(input: Tensor, kernel_size: List[int], stride: List[int], padding: List[int], ceil_mode: bool,
               count_include_pad: bool, divisor_override: Optional[int], backend: str) -> Tensor:
    with on_torch_stream(input):
        y = ck.avg_pool2d(to_array(input), kernel_size, stride, padding, ceil_mode, count_include_pad,
                          divisor_override, backend=_opt(backend))
    return from_array(y, memory_format(input))


def _avg_pool2d_fake(input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override, backend):
    return empty(input, _pool_out(input, kernel_size, stride, padding, 1, ceil_mode, "avg_pool2d"),
                 memory_format(input))


def avg_pool2d_backward_impl(grad_output: Tensor, input: Tensor, kernel_size: List[int], stride: List[int],
                        padding: List[int], ceil_mode: bool, count_include_pad: bool,
                        divisor_override: Optional[int], backend: str) -> Tensor:
    with on_torch_stream(input):
        gx = ck.avg_pool2d_backward(to_array(grad_output), to_array(input), kernel_size, stride, padding, ceil_mode,
                                    count_include_pad, divisor_override, backend=_opt(backend))
    return from_array(gx, memory_format(input))


def _avg_pool2d_backward_fake(grad_output, input, kernel_size, stride, padding, ceil_mode, count_include_pad,
                              divisor_override, backend):
    return empty(input, input.shape, memory_format(input))


def _avg_pool2d_setup(ctx, inputs, output):
    input, *geometry = inputs
    ctx.save_for_backward(input)
    ctx.geometry = geometry


def _avg_pool2d_grad(ctx, backward, grad_output):
    (input,) = ctx.saved_tensors
    return (backward(grad_output, input, *ctx.geometry),) + (None,) * 7


avg_pool2d = Op("avg_pool2d", avg_pool2d_impl, _avg_pool2d_fake, avg_pool2d_backward_impl, _avg_pool2d_backward_fake,
                _avg_pool2d_setup, _avg_pool2d_grad, 1)

# ---------------------------------------------------------------- relu


def _dense_order(t: Tensor) -> Optional[List[int]]:
    """The dimension order in which a dense but non-contiguous `t` (e.g.
    channels_last) is contiguous, so elementwise work runs on it in place of a
    copy; None when `t` is contiguous already or not dense."""
    if t.is_contiguous():
        return None
    order = sorted(range(t.dim()), key=lambda d: -t.stride(d))
    return order if t.permute(order).is_contiguous() else None


def _elementwise(fn, first: Tensor, *others: Tensor) -> Tensor:
    """fn over NumPy/CuPy views, in `first`'s memory order; the result has `first`'s strides where it is dense."""
    order = _dense_order(first)
    if order is None:
        return from_array(fn(*(to_array(t) for t in (first,) + others)))
    inverse = [order.index(d) for d in range(len(order))]
    y = fn(*(to_array(t.permute(order)) for t in (first,) + others))
    return from_array(y).permute(inverse)


def _like(t: Tensor) -> Tensor:
    return torch.empty_like(t) if _dense_order(t) is not None else torch.empty(t.shape, dtype=t.dtype, device=t.device)


def relu_impl(input: Tensor, backend: str) -> Tensor:
    with on_torch_stream(input):
        if input.is_contiguous():
            return from_array(ck.relu(to_array(input), backend=_opt(backend)))
        return _elementwise(lambda x: ck.relu(x, backend=_opt(backend)), input)


def _relu_fake(input, backend):
    return _like(input)


def relu_backward_impl(grad_output: Tensor, output: Tensor, backend: str) -> Tensor:
    with on_torch_stream(output):
        if grad_output.stride() == output.stride():  # (ck's result then has output's memory order too)
            return from_array(ck.relu_backward(to_array(grad_output), to_array(output), backend=_opt(backend)))
        return _elementwise(lambda y, gy: ck.relu_backward(gy, y, backend=_opt(backend)), output, grad_output)


def _relu_backward_fake(grad_output, output, backend):
    return _like(output)


def _relu_setup(ctx, inputs, output):
    # relu's output is as good as its input for the gradient (positive, or NaN,
    # exactly where the input is) and lets inplace relu free the input
    ctx.save_for_backward(output)
    ctx.backend = inputs[1]


def _relu_grad(ctx, backward, grad_output):
    (output,) = ctx.saved_tensors
    return backward(grad_output, output, ctx.backend), None


relu = Op("relu", relu_impl, _relu_fake, relu_backward_impl, _relu_backward_fake, _relu_setup, _relu_grad, 1)
