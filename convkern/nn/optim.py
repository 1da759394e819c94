"""SGD (momentum, Nesterov, weight decay), Adam, AdamW, and the StepLR and
cosine-annealing schedules, with PyTorch's update rules step for step."""

from __future__ import annotations

import math
from typing import Dict, Iterable, List

import numpy as np

from .. import backend as _backends
from .module import Parameter, array_module


def _one_pass(op: str, *arrays):
    """The CPU backend's fused update `op` where it can take these arrays
    (NumPy, writeable, C-contiguous, one float dtype, none overlapping),
    else None (the update then runs as NumPy expressions)."""
    dt = arrays[0].dtype
    if dt not in (np.float32, np.float64):
        return None
    for i, a in enumerate(arrays):
        if not (isinstance(a, np.ndarray) and a.dtype == dt and a.flags.c_contiguous and a.flags.writeable):
            return None
        if any(np.may_share_memory(a, b) for b in arrays[:i]):
            return None
    try:
        impl = _backends.select("cpu")  # the backend in use: use_backend("numba") has no fused update
    except _backends.BackendUnavailableError:
        return None
    return getattr(impl, op, None)


class Optimizer:
    def __init__(self, params: Iterable[Parameter], lr: float):
        self.params: List[Parameter] = list(params)
        if not self.params:
            raise ValueError(f"{type(self).__name__}: no parameters to optimise")
        if not lr > 0:
            raise ValueError(f"{type(self).__name__}: lr must be > 0, got {lr}")
        self.lr = float(lr)
        self.initial_lr = self.lr
        self.state: Dict[int, dict] = {}

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        for i, p in enumerate(self.params):
            if p.grad is not None:
                if p.grad.shape != p.data.shape:
                    raise ValueError(f"{type(self).__name__}: parameter {i} has shape {p.shape} but its "
                                     f"gradient has {tuple(p.grad.shape)}")
                self._update(p, p.grad.astype(p.data.dtype, copy=False), self.state.setdefault(i, {}))

    def _update(self, p: Parameter, g, state: dict) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict:
        """lr, initial_lr and the per-parameter state (momentum buffers, Adam
        moments and step counts), keyed by parameter position; enough to
        resume training exactly."""
        return {"lr": self.lr, "initial_lr": self.initial_lr,
                "state": {i: dict(st) for i, st in self.state.items()}}

    def load_state_dict(self, sd: dict) -> None:
        """Restore what state_dict() gave; arrays go to each parameter's device and dtype."""
        state = {int(i): st for i, st in sd["state"].items()}
        for i, st in state.items():
            if not 0 <= i < len(self.params):
                raise ValueError(f"{type(self).__name__}: state for parameter {i}, but there are "
                                 f"{len(self.params)} parameters")
            for k, v in st.items():
                if hasattr(v, "shape") and tuple(v.shape) != self.params[i].shape:
                    raise ValueError(f"{type(self).__name__}: state {k!r} of parameter {i} has shape "
                                     f"{tuple(v.shape)}, the parameter {self.params[i].shape}")
        self.lr, self.initial_lr = float(sd["lr"]), float(sd["initial_lr"])
        self.state = {}
        for i, st in state.items():
            p = self.params[i]
            xp = array_module(p.data)
            self.state[i] = {k: (xp.array(v, dtype=p.data.dtype) if hasattr(v, "shape") else v)
                             for k, v in st.items()}


class SGD(Optimizer):
    def __init__(self, params, lr: float = 0.01, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False):
        super().__init__(params, lr)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("SGD: Nesterov momentum needs momentum > 0 and dampening = 0")
        if momentum < 0 or weight_decay < 0:
            raise ValueError(f"SGD: momentum ({momentum}) and weight_decay ({weight_decay}) must be >= 0")
        self.momentum, self.dampening = float(momentum), float(dampening)
        self.weight_decay, self.nesterov = float(weight_decay), bool(nesterov)

    def _update(self, p, g, state):
        buf = state.get("momentum_buffer")
        first = bool(self.momentum) and buf is None
        if first and isinstance(p.data, np.ndarray):
            buf = np.empty_like(p.data)  # filled by the first step
        fused = _one_pass("sgd_update", p.data, g, *(() if buf is None else (buf,)))
        if fused is not None:
            fused(p.data, g, buf, self.lr, self.momentum, self.dampening, self.weight_decay, self.nesterov, first)
            if self.momentum:
                state["momentum_buffer"] = buf
            return
        if self.weight_decay:
            g = g + self.weight_decay * p.data
        if self.momentum:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = g.copy()
            else:
                buf *= self.momentum
                buf += (1.0 - self.dampening) * g
            g = g + self.momentum * buf if self.nesterov else buf
        p.data -= self.lr * g


class Adam(Optimizer):
    """Adam; with decoupled=True (AdamW) the decay shrinks the weights directly
    instead of being added to the gradient."""

    decoupled = False

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        super().__init__(params, lr)
        b1, b2 = betas
        if not (0 <= b1 < 1 and 0 <= b2 < 1):
            raise ValueError(f"{type(self).__name__}: betas must be in [0, 1), got {betas}")
        if eps < 0 or weight_decay < 0:
            raise ValueError(f"{type(self).__name__}: eps ({eps}) and weight_decay ({weight_decay}) must be >= 0")
        self.betas, self.eps, self.weight_decay = (float(b1), float(b2)), float(eps), float(weight_decay)

    def _update(self, p, g, state):
        xp = array_module(p.data)
        b1, b2 = self.betas
        if self.weight_decay:
            if self.decoupled:
                p.data *= 1.0 - self.lr * self.weight_decay
            else:
                g = g + self.weight_decay * p.data
        if not state:
            state.update(step=0, exp_avg=xp.zeros_like(p.data), exp_avg_sq=xp.zeros_like(p.data))
        state["step"] += 1
        t, m, v = state["step"], state["exp_avg"], state["exp_avg_sq"]
        m *= b1
        m += (1.0 - b1) * g
        v *= b2
        v += (1.0 - b2) * (g * g)
        step_size = self.lr / (1.0 - b1 ** t)
        denom = xp.sqrt(v) / math.sqrt(1.0 - b2 ** t) + self.eps
        p.data -= step_size * (m / denom)


class AdamW(Adam):
    decoupled = True

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2):
        super().__init__(params, lr, betas, eps, weight_decay)


class _Schedule:
    """Sets optimizer.lr from the epoch count; call step() once per epoch."""

    def __init__(self, optimizer: Optimizer):
        self.optimizer, self.epoch = optimizer, 0

    def _lr(self, base: float, epoch: int) -> float:
        raise NotImplementedError

    def step(self) -> None:
        self.epoch += 1
        self.optimizer.lr = self._lr(self.optimizer.initial_lr, self.epoch)

    def get_last_lr(self) -> float:
        return self.optimizer.lr

    def state_dict(self) -> dict:
        return {"epoch": self.epoch}

    def load_state_dict(self, sd: dict) -> None:
        self.epoch = int(sd["epoch"])  # the optimizer's own state holds its lr


class StepLR(_Schedule):
    """lr = initial_lr * gamma ** (epoch // step_size)."""

    def __init__(self, optimizer: Optimizer, step_size: int, gamma: float = 0.1):
        if step_size < 1:
            raise ValueError(f"StepLR: step_size must be >= 1, got {step_size}")
        super().__init__(optimizer)
        self.step_size, self.gamma = int(step_size), float(gamma)

    def _lr(self, base, epoch):
        return base * self.gamma ** (epoch // self.step_size)


class CosineAnnealingLR(_Schedule):
    """lr = eta_min + (initial_lr - eta_min) * (1 + cos(pi * epoch / T_max)) / 2."""

    def __init__(self, optimizer: Optimizer, T_max: int, eta_min: float = 0.0):
        if T_max < 1:
            raise ValueError(f"CosineAnnealingLR: T_max must be >= 1, got {T_max}")
        super().__init__(optimizer)
        self.T_max, self.eta_min = int(T_max), float(eta_min)

    def _lr(self, base, epoch):
        return self.eta_min + (base - self.eta_min) * (1 + math.cos(math.pi * epoch / self.T_max)) / 2
