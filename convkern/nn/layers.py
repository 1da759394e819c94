"""Conv2d, MaxPool2d, AvgPool2d, ReLU, Flatten and Linear over convkern's kernels.

Each forward keeps what its backward needs only in training mode; in eval mode
the layers hold no activations."""

from __future__ import annotations

from typing import Optional

import numpy as np

from .. import functional as F
from ..geometry import IntPair, Padding, pair
from .init import Seed, bias_uniform, check_dtype, generator, kaiming_uniform
from .module import Module, Parameter


def _saved(layer: Module, what: str):
    value = getattr(layer, what, None)
    if value is None:
        raise RuntimeError(f"{type(layer).__name__}.backward: no saved forward pass (call forward in training "
                           "mode first; eval mode keeps nothing)")
    return value


class Conv2d(Module):
    """Like torch.nn.Conv2d; `algo` picks the kernel (direct, im2col or auto)."""
    fresh_grad = True

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntPair, stride: IntPair = 1,
                 padding: Padding = 0, dilation: IntPair = 1, groups: int = 1, bias: bool = True, *,
                 algo: str = "auto", dtype=np.float32, rng: Seed = None):
        super().__init__()
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels), ("groups", groups)):
            if not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"Conv2d: {name} must be a positive int, got {v!r}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"Conv2d: in_channels ({in_channels}) and out_channels ({out_channels}) "
                             f"must be divisible by groups ({groups})")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size = pair(kernel_size, "kernel_size")
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, int(groups)
        self.algo = algo
        dt, g = check_dtype(dtype), generator(rng)
        fan_in = (in_channels // groups) * self.kernel_size[0] * self.kernel_size[1]
        self.weight = Parameter(kaiming_uniform((out_channels, in_channels // groups) + self.kernel_size,
                                                fan_in, g, dt))
        self.bias = Parameter(bias_uniform(out_channels, fan_in, g, dt)) if bias else None
        # "channels_last": outputs in that layout whatever the input's (Module.to(memory_format=...))
        self.memory_format = None
        self._x = self._y = None

    def _kw(self):
        """The conv's geometry and algorithm, for the forward and the backward."""
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups,
                    algo=self.algo)

    def _forward_kw(self, x):
        kw = self._kw()
        if self.memory_format is not None and isinstance(x, np.ndarray):  # (on the GPU the convs stay NCHW)
            kw["memory_format"] = self.memory_format
        return kw

    def forward(self, x):
        y = F.conv2d(x, self.weight.data, None if self.bias is None else self.bias.data, **self._forward_kw(x))
        self._x, self._y = (x if self.training else None), None
        return y

    def forward_relu(self, x):
        """relu(self.forward(x)) in one fused call (Sequential uses it where a
        ReLU follows); its gradient is backward_relu."""
        y = F.conv2d_relu(x, self.weight.data, None if self.bias is None else self.bias.data, **self._forward_kw(x))
        self._x, self._y = (x, y) if self.training else (None, None)
        return y

    def backward_relu(self, grad_output, need_input_grad: bool = True, *, reuse_grad: bool = False):
        """The gradient through forward_relu: relu's (from the saved output),
        then the conv's. reuse_grad=True lets relu's gradient be written over
        grad_output (which nothing else may then hold)."""
        return self.backward(F.relu_backward(grad_output, _saved(self, "_y"), inplace=reuse_grad), need_input_grad)

    def backward(self, grad_output, need_input_grad: bool = True):
        x = _saved(self, "_x")
        gx, gw, gb = F.conv2d_backward(grad_output, x, self.weight.data, **self._kw(),
                                       needs=(need_input_grad, True, self.bias is not None))
        _accumulate(self.weight, gw)
        if self.bias is not None:
            _accumulate(self.bias, gb)
        return gx

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding != 0:
            s += f", padding={self.padding}"
        if self.dilation != 1:
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        return s + ("" if self.bias is not None else ", bias=False")


def _accumulate(p: Parameter, g) -> None:
    """Gradients add up across backward calls until zero_grad, as in PyTorch."""
    p.grad = g if p.grad is None else p.grad + g


class MaxPool2d(Module):
    fresh_grad = True

    def __init__(self, kernel_size: IntPair, stride: Optional[IntPair] = None, padding: IntPair = 0,
                 dilation: IntPair = 1, ceil_mode: bool = False):
        super().__init__()
        self.kw = dict(kernel_size=kernel_size, stride=stride, padding=padding, dilation=dilation,
                       ceil_mode=ceil_mode)
        self._x = self._ind = None

    def forward(self, x):
        if not self.training:
            self._x = self._ind = None
            return F.max_pool2d(x, **self.kw)
        y, self._ind = F.max_pool2d(x, **self.kw, return_indices=True)
        self._x = x
        return y

    def backward(self, grad_output, need_input_grad: bool = True):
        x, ind = _saved(self, "_x"), _saved(self, "_ind")
        return F.max_pool2d_backward(grad_output, x, ind, **self.kw) if need_input_grad else None

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.kw.items())


class AvgPool2d(Module):
    fresh_grad = True

    def __init__(self, kernel_size: IntPair, stride: Optional[IntPair] = None, padding: IntPair = 0,
                 ceil_mode: bool = False, count_include_pad: bool = True, divisor_override: Optional[int] = None):
        super().__init__()
        self.kw = dict(kernel_size=kernel_size, stride=stride, padding=padding, ceil_mode=ceil_mode,
                       count_include_pad=count_include_pad, divisor_override=divisor_override)
        self._x = None

    def forward(self, x):
        self._x = x if self.training else None
        return F.avg_pool2d(x, **self.kw)

    def backward(self, grad_output, need_input_grad: bool = True):
        x = _saved(self, "_x")
        return F.avg_pool2d_backward(grad_output, x, **self.kw) if need_input_grad else None

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.kw.items())


class ReLU(Module):
    fresh_grad = True

    def __init__(self):
        super().__init__()
        self._x = None

    def forward(self, x):
        self._x = x if self.training else None
        return F.relu(x)

    def backward(self, grad_output, need_input_grad: bool = True, *, reuse_grad: bool = False):
        """reuse_grad=True: the gradient is written over grad_output (which
        nothing else may then hold)."""
        x = _saved(self, "_x")
        return F.relu_backward(grad_output, x, inplace=reuse_grad) if need_input_grad else None


class Flatten(Module):
    """Flattens dimensions start_dim.. into one (default: all but the batch)."""
    grad_view = True

    def __init__(self, start_dim: int = 1):
        super().__init__()
        self.start_dim = start_dim
        self._shape = None

    def forward(self, x):
        self._shape = x.shape
        return x.reshape(tuple(x.shape[:self.start_dim]) + (-1,))

    def backward(self, grad_output, need_input_grad: bool = True):
        return grad_output.reshape(_saved(self, "_shape")) if need_input_grad else None

    def extra_repr(self) -> str:
        return f"start_dim={self.start_dim}"


class Linear(Module):
    """y = x W^T + b, like torch.nn.Linear (weight (out, in)).

    Runs on convkern's own kernels (convkern.functional.linear and
    linear_backward): NumPy's matmul would wake BLAS threads that spin
    against the kernels' OpenMP threads (on 2 cores that made a LeNet
    training step 3x slower)."""
    fresh_grad = True

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, dtype=np.float32,
                 rng: Seed = None):
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"Linear: {name} must be a positive int, got {v!r}")
        self.in_features, self.out_features = int(in_features), int(out_features)
        dt, g = check_dtype(dtype), generator(rng)
        self.weight = Parameter(kaiming_uniform((out_features, in_features), in_features, g, dt))
        self.bias = Parameter(bias_uniform(out_features, in_features, g, dt)) if bias else None
        self._x = None

    def forward(self, x):
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"Linear: input must be (N, {self.in_features}), got {tuple(x.shape)}")
        if x.dtype != self.weight.data.dtype:
            raise TypeError(f"Linear: input has dtype {x.dtype} but the weight has {self.weight.data.dtype}")
        y = F.linear(x, self.weight.data, None if self.bias is None else self.bias.data)
        self._x = x if self.training else None
        return y

    def backward(self, grad_output, need_input_grad: bool = True):
        gx, gw, gb = F.linear_backward(grad_output, _saved(self, "_x"), self.weight.data,
                                       needs=(need_input_grad, True, self.bias is not None))
        _accumulate(self.weight, gw)
        if self.bias is not None:
            _accumulate(self.bias, gb)
        return gx

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
