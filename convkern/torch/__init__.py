"""convkern inside PyTorch: the kernels as torch custom ops with autograd.

    import convkern.torch as ckt
    model = ckt.patch(torchvision_or_own_model)    # Conv2d, pools, ReLU now run on convkern
                                                   # (a Conv2d then ReLU in a Sequential: one fused op)
    loss = model(x).sum(); loss.backward()         # gradients through convkern's backward kernels
    print(ckt.report(model))                       # what was swapped, what was left to torch and why
    with torch.no_grad(), ckt.cached_weights():    # inference: each weight's Winograd filters made once
        for x in batches: model(x)

or op by op, with ``torch.nn.functional``'s signatures::

    y = ckt.relu(ckt.conv2d(x, w, b, padding=1))
    y = ckt.max_pool2d(y, 2)

The ops are registered with ``torch.library`` in the ``convkern`` namespace
(``torch.ops.convkern.conv2d`` and friends), each with autograd and a fake
(meta) implementation, so ``torch.compile(model, fullgraph=True)`` and
``torch.export`` trace through them. CPU tensors cross to NumPy without a
copy; CUDA tensors go to the cuda/cupy backend through DLPack, on torch's
current stream.

Supported torch versions: 2.11 to 2.13 (older ones lack pieces of
``torch.library`` this module uses and are refused at import; newer ones are
accepted with a warning until tested). torch is not a dependency of
``convkern``: install it yourself (``pip install torch``).
"""

from __future__ import annotations

import warnings

try:
    import torch as _torch
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError("convkern.torch needs PyTorch, which is not installed: `pip install torch` "
                      "(convkern supports torch 2.11 to 2.13); the rest of convkern works without it") from exc

SUPPORTED_TORCH = ((2, 11), (2, 13))


def _torch_version(text: str):
    parts = text.split("+")[0].split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return (0, 0)


_version = _torch_version(_torch.__version__)
if _version < SUPPORTED_TORCH[0]:
    raise ImportError(f"convkern.torch supports torch {SUPPORTED_TORCH[0][0]}.{SUPPORTED_TORCH[0][1]} to "
                      f"{SUPPORTED_TORCH[1][0]}.{SUPPORTED_TORCH[1][1]}; this is torch {_torch.__version__}")
if _version > SUPPORTED_TORCH[1]:
    warnings.warn(f"convkern.torch was tested with torch up to {SUPPORTED_TORCH[1][0]}.{SUPPORTED_TORCH[1][1]}; "
                  f"this is torch {_torch.__version__}", RuntimeWarning, stacklevel=2)

from .functional import adaptive_avg_pool2d, avg_pool2d, conv2d, conv2d_relu, max_pool2d, relu  # noqa: E402
from .modules import PatchReport, patch, report, unpatch  # noqa: E402
from ..weight_cache import cached_weights  # noqa: E402

__all__ = ["conv2d", "conv2d_relu", "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "relu", "patch", "unpatch", "report",
           "PatchReport", "cached_weights", "SUPPORTED_TORCH"]
