"""patch(model): torch's Conv2d, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d and
ReLU modules run on convkern, in place. Where an ``nn.Sequential`` holds a
swapped Conv2d directly followed by a swapped ReLU, the pair runs as one
fused conv+relu op (:func:`convkern.torch.conv2d_relu`).

A swapped module keeps its object, its parameters and its ``state_dict`` keys:
only its class changes, to a subclass whose ``forward`` calls
:mod:`convkern.torch.functional`. So checkpoints load both ways, ``isinstance``
checks still hold, and ``copy.deepcopy``, ``model.to(...)``, ``train()/eval()``
and DistributedDataParallel see an ordinary module. ``unpatch`` puts the
classes back.

Some modules are left to torch, with the reason kept for :func:`report`:
subclasses with their own ``forward``, parameters of a dtype convkern lacks,
and ops not asked for. A Conv2d whose ``padding_mode`` is "reflect",
"replicate" or "circular" is swapped too: torch pads the input in that mode
(as its own Conv2d does), and the conv, padding nothing more, runs on
convkern. At call time a swapped module hands the call back to torch (and
counts it) when the input's dtype or device is one convkern lacks, or, for
adaptive pooling, when the output size does not divide the input size.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch.nn.functional as torch_F
from torch import Tensor, nn

from . import functional as F

OPS = ("conv2d", "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "relu")


@dataclass
class Settings:
    """What a swapped module runs with, and how often it handed calls back to torch (by reason)."""

    backend: Optional[str]
    algo: str
    fallbacks: Counter = field(default_factory=Counter)


def _fallback_reason(x: Tensor) -> Optional[str]:
    if x.is_cpu and x.dtype in F.SUPPORTED_DTYPES:  # (most calls, asked first)
        return None
    if x.dtype not in F.SUPPORTED_DTYPES:
        return f"input dtype {x.dtype}"
    if x.device.type not in ("cpu", "cuda"):
        return f"input on {x.device}"
    return None


class _Patched:
    """Mixed into each swapped class: the forward that hands a call convkern
    cannot take back to torch (and counts it), and the name print(model) shows.
    Each class gives _convkern_forward, and may add reasons in _fallback."""

    _convkern: Settings

    def _get_name(self):
        return "convkern." + super()._get_name()

    def _fallback(self, x: Tensor) -> Optional[str]:
        return _fallback_reason(x)

    def forward(self, x: Tensor):
        reason = self._fallback(x)
        if reason:
            self._convkern.fallbacks[reason] += 1
            return super().forward(x)
        return self._convkern_forward(x)


def _padded(conv: nn.Conv2d, x: Tensor):
    """The input and padding a conv runs with: for a padding_mode other than
    "zeros", the input padded in that mode by torch, as nn.Conv2d's own
    forward pads it (asymmetric where "same" asks for an odd total), and no
    further padding."""
    if conv.padding_mode == "zeros":
        return x, conv.padding
    return torch_F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode), 0


class Conv2d(_Patched, nn.Conv2d):
    def _convkern_forward(self, x: Tensor) -> Tensor:
        s = self._convkern
        x, padding = _padded(self, x)
        return F.conv2d(x, self.weight, self.bias, self.stride, padding, self.dilation, self.groups,
                        algo=s.algo, backend=s.backend)


class MaxPool2d(_Patched, nn.MaxPool2d):
    def _convkern_forward(self, x: Tensor):
        return F.max_pool2d(x, self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode,
                            self.return_indices, backend=self._convkern.backend)


class AvgPool2d(_Patched, nn.AvgPool2d):
    def _convkern_forward(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(x, self.kernel_size, self.stride, self.padding, self.ceil_mode, self.count_include_pad,
                            self.divisor_override, backend=self._convkern.backend)


class AdaptiveAvgPool2d(_Patched, nn.AdaptiveAvgPool2d):
    def _fallback(self, x: Tensor) -> Optional[str]:
        reason = _fallback_reason(x)
        if reason is None and F.adaptive_kernel(x.shape, self.output_size) is None:
            reason = f"output size {self.output_size} does not divide input {tuple(x.shape[-2:])}"
        return reason

    def _convkern_forward(self, x: Tensor) -> Tensor:
        return F.adaptive_avg_pool2d(x, self.output_size, backend=self._convkern.backend)


class ReLU(_Patched, nn.ReLU):
    def _convkern_forward(self, x: Tensor) -> Tensor:
        return F.relu(x, self.inplace, backend=self._convkern.backend)


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def _global_hooks() -> bool:
    from torch.nn.modules import module as torch_module

    return any(getattr(torch_module, name, None) for name in (
        "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
        "_global_backward_pre_hooks", "_global_forward_hooks_always_called"))


class Sequential(nn.Sequential):
    """nn.Sequential whose swapped Conv2d + ReLU pairs run as one fused op.

    A pair is fused only where running it fused cannot be told apart from
    running it module by module: both are swapped modules, neither has
    hooks (nor are global module hooks set), and the conv would not hand
    this input back to torch. Otherwise each module runs as usual."""

    def forward(self, x):
        mods = list(self._modules.values())
        i, n = 0, len(mods)
        global_hooks = None
        while i < n:
            m = mods[i]
            if type(m) is Conv2d and i + 1 < n and type(mods[i + 1]) is ReLU and isinstance(x, Tensor):
                if global_hooks is None:
                    global_hooks = _global_hooks()
                if not global_hooks and not _hooked(m) and not _hooked(mods[i + 1]) and m._fallback(x) is None:
                    s = m._convkern
                    x, padding = _padded(m, x)
                    x = F.conv2d_relu(x, m.weight, m.bias, m.stride, padding, m.dilation, m.groups, algo=s.algo,
                                      backend=s.backend)
                    i += 2
                    continue
            x = m(x)
            i += 1
        return x


# torch class -> (op name, convkern class)
_SWAPS = {nn.Conv2d: ("conv2d", Conv2d), nn.MaxPool2d: ("max_pool2d", MaxPool2d),
          nn.AvgPool2d: ("avg_pool2d", AvgPool2d), nn.AdaptiveAvgPool2d: ("adaptive_avg_pool2d", AdaptiveAvgPool2d),
          nn.ReLU: ("relu", ReLU)}
_ORIGINAL = {ours: theirs for theirs, (_, ours) in _SWAPS.items()}
_ORIGINAL_CONTAINERS = {Sequential: nn.Sequential}


def _fused_pairs(model: nn.Module) -> List[str]:
    """"conv+relu" names of the pairs patched Sequentials in `model` may fuse."""
    pairs = []
    for name, module in model.named_modules():
        if type(module) is Sequential:
            items = list(module._modules.items())
            pairs += [f"{name}.{a}+{b}" if name else f"{a}+{b}" for (a, m), (b, r) in zip(items, items[1:])
                      if type(m) is Conv2d and type(r) is ReLU]
    return pairs


def _why_not(module: nn.Module, ops: Sequence[str]) -> Optional[str]:
    """None if `module` can be swapped, else why not."""
    kind = type(module)
    op = _SWAPS[kind][0]
    if op not in ops:
        return f"{op} not in ops"
    if kind is nn.Conv2d and module.weight.dtype not in F.SUPPORTED_DTYPES:
        return f"weight dtype {module.weight.dtype}"
    if kind is nn.AdaptiveAvgPool2d and not isinstance(module.output_size, (int, tuple, list)):
        return f"output_size {module.output_size!r}"
    return None


@dataclass
class PatchReport:
    """What patch() did to a model: module names swapped, those left to torch
    with the reason, the calls swapped modules handed back to torch, and the
    Conv2d+ReLU pairs that run as one fused op."""

    swapped: List[str]
    left: Dict[str, str]
    fallbacks: Dict[str, Dict[str, int]]
    fused: List[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"convkern.torch: {len(self.swapped)} modules swapped, {len(self.left)} left to torch"]
        if self.fused:
            lines.append(f"  fused conv+relu: {', '.join(self.fused)}")
        lines += [f"  left   {name or '(model)'}: {why}" for name, why in self.left.items()]
        for name, counts in self.fallbacks.items():
            lines += [f"  torch ran {name} {n}x: {why}" for why, n in counts.items()]
        return "\n".join(lines)


def patch(model: nn.Module, *, backend: Optional[str] = None, algo: str = "auto",
          ops: Sequence[str] = OPS) -> nn.Module:
    """Swap the model's Conv2d, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d and
    ReLU modules (those of exactly these classes, among the ops named in
    `ops`) for convkern's, in place; returns the model. Patching again
    updates backend and algo. ``report(model)`` says what was swapped."""
    unknown = [op for op in ops if op not in OPS]
    if unknown:
        raise ValueError(f"patch: unknown ops {unknown}; the ops are {', '.join(OPS)}")
    if not isinstance(algo, str):
        raise TypeError(f"patch: algo must be a string, got {algo!r}")
    left: Dict[str, str] = {}
    for name, module in model.named_modules():
        kind = type(module)
        if kind in _ORIGINAL:  # patched before: new settings, same fallback counts
            module._convkern = Settings(backend, algo, module._convkern.fallbacks)
        elif kind in _SWAPS:
            reason = _why_not(module, ops)
            if reason:
                left[name] = reason
            else:
                module.__class__ = _SWAPS[kind][1]
                module._convkern = Settings(backend, algo)
        else:
            base = next((t for t in _SWAPS if isinstance(module, t)), None)
            if base is not None:
                left[name] = f"{kind.__name__} is a subclass of nn.{base.__name__} with its own behaviour"
    if "conv2d" in ops and "relu" in ops:
        for module in model.modules():
            if type(module) is nn.Sequential:
                module.__class__ = Sequential
    model._convkern_left = left
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo patch(): every swapped module gets its torch class back."""
    for module in model.modules():
        original = _ORIGINAL.get(type(module))
        if original is not None:
            module.__class__ = original
            del module._convkern
        elif type(module) in _ORIGINAL_CONTAINERS:
            module.__class__ = _ORIGINAL_CONTAINERS[type(module)]
    model.__dict__.pop("_convkern_left", None)
    return model


def report(model: nn.Module) -> PatchReport:
    """What patch() swapped in `model`, what it left to torch and why, and
    how often swapped modules handed a call back to torch (and why)."""
    swapped, fallbacks = [], {}
    for name, module in model.named_modules():
        if type(module) in _ORIGINAL:
            swapped.append(name)
            if module._convkern.fallbacks:
                fallbacks[name] = dict(module._convkern.fallbacks)
    return PatchReport(swapped, dict(getattr(model, "_convkern_left", {})), fallbacks, _fused_pairs(model))


def swappable(model: nn.Module) -> List[Tuple[str, type]]:
    """Modules patch() would swap with every op asked for (exact torch classes)."""
    return [(n, type(m)) for n, m in model.named_modules() if type(m) in _SWAPS and _why_not(m, OPS) is None]


__all__ = ["patch", "unpatch", "report", "PatchReport", "Sequential", "Conv2d", "MaxPool2d", "AvgPool2d",
           "AdaptiveAvgPool2d", "ReLU", "OPS"]
