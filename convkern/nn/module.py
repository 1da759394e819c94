"""Module, Parameter and Sequential: the thin trainable layer.

No autograd tape: every module has an explicit ``forward(x)`` that keeps what
its backward needs, and ``backward(grad_output)`` that fills its parameters'
``.grad`` and returns the gradient with respect to its input. Arrays are NumPy
on the CPU or CuPy on the GPU; the same code runs on both.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

from ..arrays import array_module as _xp
from ..arrays import cupy_or_none
from ..arrays import device_of as _device_of


def array_module(a):
    """NumPy or CuPy, whichever `a` belongs to."""
    return _xp(_device_of(a))


def to_numpy(a) -> np.ndarray:
    """A NumPy array from a NumPy/CuPy array or scalar (CuPy data is copied to the host)."""
    if hasattr(a, "__cuda_array_interface__") and hasattr(a, "get"):
        return a.get()
    return np.asarray(a)


def _is_float(v) -> bool:
    dt = getattr(v, "dtype", None)
    if dt is None:
        return np.asarray(v).dtype.kind == "f"
    try:
        return np.dtype(dt).kind == "f"
    except TypeError:  # another library's dtype object, e.g. torch.float32
        return "float" in str(dt)


class Parameter:
    """A trainable array and its gradient (None until a backward pass fills it)."""

    __slots__ = ("data", "grad")

    def __init__(self, data):
        self.data = data
        self.grad = None

    @property
    def shape(self) -> Tuple[int, ...]:
        return tuple(self.data.shape)

    def __repr__(self) -> str:
        return f"Parameter(shape={self.shape}, dtype={self.data.dtype})"


class Module:
    """Base class. Subclasses register parameters as attributes of type
    Parameter and child modules as attributes of type Module; names follow
    PyTorch's (``weight``, ``bias``, ``0.weight`` inside a Sequential) so
    state dicts carry over."""

    def __init__(self):
        object.__setattr__(self, "_params", OrderedDict())
        object.__setattr__(self, "_children", OrderedDict())
        object.__setattr__(self, "training", True)

    def __setattr__(self, name, value):
        if isinstance(value, Parameter):
            self._params[name] = value
        elif isinstance(value, Module):
            self._children[name] = value
        object.__setattr__(self, name, value)

    # What backward returns, for Sequential's reuse of gradient arrays:
    # fresh_grad, an array nothing else holds; grad_view, grad_output itself
    # or a view of it (or a fresh array). Neither: unknown, never reused.
    fresh_grad = False
    grad_view = False

    # -- the work
    def forward(self, x):
        raise NotImplementedError

    def backward(self, grad_output, need_input_grad: bool = True):
        raise NotImplementedError

    def __call__(self, x):
        return self.forward(x)

    # -- modes
    def train(self, mode: bool = True) -> "Module":
        object.__setattr__(self, "training", bool(mode))
        for c in self._children.values():
            c.train(mode)
        return self

    def eval(self) -> "Module":
        return self.train(False)

    # -- parameters
    def named_parameters(self, prefix: str = "") -> Iterator[Tuple[str, Parameter]]:
        for n, p in self._params.items():
            yield prefix + n, p
        for cn, c in self._children.items():
            yield from c.named_parameters(prefix + cn + ".")

    def parameters(self) -> List[Parameter]:
        return [p for _, p in self.named_parameters()]

    def modules(self) -> Iterator["Module"]:
        yield self
        for c in self._children.values():
            yield from c.modules()

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    def num_parameters(self) -> int:
        return int(sum(np.prod(p.shape) for p in self.parameters()))

    def to(self, dtype=None, device: Optional[str] = None, memory_format: Optional[str] = None) -> "Module":
        """Convert every parameter to `dtype` and/or move it to `device`
        ("cpu" or "cuda"); gradients are dropped. memory_format="channels_last"
        (or "contiguous", the default, to undo it): every Conv2d gives
        channels_last outputs whatever its input's layout, and the layers
        after it run on them as they lie, as a PyTorch model does after
        ``.to(memory_format=torch.channels_last)`` (NumPy arrays; on the GPU
        the convs stay NCHW)."""
        if device not in (None, "cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
        if memory_format not in (None, "contiguous", "channels_last"):
            raise ValueError(f"memory_format must be 'contiguous' or 'channels_last', got {memory_format!r}")
        if memory_format is not None:
            for m in self.modules():
                if hasattr(m, "memory_format"):
                    m.memory_format = None if memory_format == "contiguous" else memory_format
        if device == "cuda":
            if cupy_or_none() is None:
                raise RuntimeError("device='cuda' needs CuPy (pip install cupy-cuda13x)")
        for p in self.parameters():
            data = p.data
            if device == "cpu":
                data = to_numpy(data)
            elif device == "cuda":
                data = _xp("cuda").asarray(data)
            if dtype is not None:
                data = data.astype(dtype, copy=False)
            p.data, p.grad = data, None
        return self

    @property
    def dtype(self):
        ps = self.parameters()
        return ps[0].data.dtype if ps else None

    # -- state
    def state_dict(self) -> "OrderedDict[str, np.ndarray]":
        """Parameter name -> host copy (NumPy), with PyTorch's key names."""
        return OrderedDict((n, np.array(to_numpy(p.data), copy=True)) for n, p in self.named_parameters())

    def load_state_dict(self, state: Dict[str, object], strict: bool = True) -> None:
        """Copy arrays (NumPy, CuPy, or anything array-like such as torch
        tensors' ``.numpy()``) into the parameters, keeping each parameter's
        dtype and device. Mismatched keys or shapes raise ValueError naming them."""
        own = dict(self.named_parameters())
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        problems = []
        if strict and missing:
            problems.append(f"missing keys: {', '.join(missing)}")
        if strict and unexpected:
            problems.append(f"unexpected keys: {', '.join(unexpected)}")
        for k, p in own.items():
            if k in state:
                shape = tuple(np.shape(state[k]))
                if shape != p.shape:
                    problems.append(f"{k}: the model has shape {p.shape}, the state has {shape}")
                if not _is_float(state[k]):
                    problems.append(f"{k}: the state holds {getattr(state[k], 'dtype', type(state[k]))} values, "
                                    "not floating point")
        if problems:
            raise ValueError(f"load_state_dict into {type(self).__name__}: " + "; ".join(problems))
        for k, p in own.items():
            if k in state:
                xp = array_module(p.data)
                value = to_numpy(state[k]) if xp is np else state[k]
                p.data = xp.array(value, dtype=p.data.dtype, copy=True)
                p.grad = None

    # -- display
    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        if not self._children:
            return f"{type(self).__name__}({self.extra_repr()})"
        lines = [f"{type(self).__name__}("]
        for n, c in self._children.items():
            lines.append(f"  ({n}): " + repr(c).replace("\n", "\n  "))
        lines.append(")")
        return "\n".join(lines)


class Sequential(Module):
    """Modules applied in order; backward runs them in reverse.

    A Conv2d directly followed by a ReLU runs as one fused conv+relu call
    (``Conv2d.forward_relu``): the same result, without a second pass over
    the output and a second array. The ReLU module itself then keeps nothing."""

    def __init__(self, *modules: Module):
        super().__init__()
        for i, m in enumerate(modules):
            if not isinstance(m, Module):
                raise TypeError(f"Sequential: item {i} is a {type(m).__name__}, not a Module")
            setattr(self, str(i), m)
        object.__setattr__(self, "_fused", ())

    def __len__(self) -> int:
        return len(self._children)

    def __iter__(self) -> Iterator[Module]:
        return iter(self._children.values())

    def __getitem__(self, i: int) -> Module:
        return list(self._children.values())[i]

    def _fusable(self, mods: List[Module], i: int) -> bool:
        from .layers import Conv2d, ReLU  # layers imports this module

        return i + 1 < len(mods) and type(mods[i]) is Conv2d and type(mods[i + 1]) is ReLU

    def forward(self, x):
        mods, fused, i = list(self), [], 0
        while i < len(mods):
            if self._fusable(mods, i):
                x = mods[i].forward_relu(x)
                mods[i + 1]._x = None
                fused.append(i)
                i += 2
            else:
                x = mods[i].forward(x)
                i += 1
        object.__setattr__(self, "_fused", tuple(fused))
        return x

    def backward(self, grad_output, need_input_grad: bool = True):
        from .layers import ReLU  # layers imports this module

        mods, fused = list(self), set(self._fused)
        g, i = grad_output, len(mods) - 1
        # owned: g came from a module of this Sequential and nothing else holds
        # it, so relu's gradient may be written over it (the caller's
        # grad_output is never written)
        owned = False
        while i >= 0:
            if i - 1 in fused:  # a fused conv+relu pair: the conv takes relu's gradient too
                m = mods[i - 1]
                g = m.backward_relu(g, need_input_grad=need_input_grad or i - 1 > 0, reuse_grad=owned)
                i -= 2
            else:
                m = mods[i]
                if type(m) is ReLU:
                    g = m.backward(g, need_input_grad=need_input_grad or i > 0, reuse_grad=owned)
                else:
                    g = m.backward(g, need_input_grad=need_input_grad or i > 0)
                i -= 1
            own = vars(type(m))  # a subclass may override backward: its flags are its own to set
            owned = own.get("fresh_grad", False) or (owned and own.get("grad_view", False))
        return g
