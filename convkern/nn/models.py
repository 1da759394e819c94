"""Named architectures for `convkern train`, built for a given input shape and
class count. Each is a Sequential, so its state dict has PyTorch's key names
for the same nn.Sequential."""

from __future__ import annotations

from typing import Callable, Dict, List, Tuple

import numpy as np

from .dropout import Dropout, Dropout2d
from .init import Seed, generator
from .layers import AvgPool2d, Conv2d, Flatten, Linear, MaxPool2d, ReLU
from .module import Module, Sequential


def _flat_size(features: List[Module], input_shape: Tuple[int, int, int], dtype) -> int:
    """Feature count after the convolutional part, found by running it once on
    one image (the geometry rules, including bad sizes, are then the ops' own)."""
    probe = Sequential(*features).eval()
    try:
        y = probe(np.ones((1,) + tuple(input_shape), dtype=dtype))
    except ValueError as exc:
        raise ValueError(f"input shape {tuple(input_shape)} is too small for this architecture: {exc}") from exc
    finally:
        probe.train()  # models start in training mode, as in PyTorch
    return int(np.prod(y.shape[1:]))


def lenet(input_shape: Tuple[int, int, int], num_classes: int, *, dtype=np.float32, rng: Seed = None,
          dropout: float = 0.25) -> Sequential:
    """The LeNet-like model the benchmarks use: conv 32 5x5 p2, relu, maxpool 2,
    conv 64 3x3 p1, relu, maxpool 2, flatten, linear 128, relu, dropout, linear."""
    g = generator(rng)
    c = input_shape[0]
    feats = [Conv2d(c, 32, 5, padding=2, dtype=dtype, rng=g), ReLU(), MaxPool2d(2),
             Conv2d(32, 64, 3, padding=1, dtype=dtype, rng=g), ReLU(), MaxPool2d(2), Flatten()]
    n = _flat_size(feats, input_shape, dtype)
    return Sequential(*feats, Linear(n, 128, dtype=dtype, rng=g), ReLU(), Dropout(dropout, rng=g),
                      Linear(128, num_classes, dtype=dtype, rng=g))


def lenet5(input_shape: Tuple[int, int, int], num_classes: int, *, dtype=np.float32, rng: Seed = None
           ) -> Sequential:
    """LeCun's LeNet-5 shape with ReLU: conv 6 5x5 p2, avgpool 2, conv 16 5x5,
    avgpool 2, linear 120, linear 84, linear."""
    g = generator(rng)
    c = input_shape[0]
    feats = [Conv2d(c, 6, 5, padding=2, dtype=dtype, rng=g), ReLU(), AvgPool2d(2),
             Conv2d(6, 16, 5, dtype=dtype, rng=g), ReLU(), AvgPool2d(2), Flatten()]
    n = _flat_size(feats, input_shape, dtype)
    return Sequential(*feats, Linear(n, 120, dtype=dtype, rng=g), ReLU(), Linear(120, 84, dtype=dtype, rng=g),
                      ReLU(), Linear(84, num_classes, dtype=dtype, rng=g))


def small(input_shape: Tuple[int, int, int], num_classes: int, *, dtype=np.float32, rng: Seed = None,
          dropout: float = 0.25) -> Sequential:
    """A small, quick CNN with the seeds' layer sequence: conv 8, relu, maxpool,
    conv 16, relu, maxpool, dropped feature maps, flatten, linear 32, relu,
    dropout, linear."""
    g = generator(rng)
    c = input_shape[0]
    feats = [Conv2d(c, 8, 3, padding=1, dtype=dtype, rng=g), ReLU(), MaxPool2d(2),
             Conv2d(8, 16, 3, padding=1, dtype=dtype, rng=g), ReLU(), MaxPool2d(2),
             Dropout2d(dropout / 2, rng=g), Flatten()]
    n = _flat_size(feats, input_shape, dtype)
    return Sequential(*feats, Linear(n, 32, dtype=dtype, rng=g), ReLU(), Dropout(dropout, rng=g),
                      Linear(32, num_classes, dtype=dtype, rng=g))


def vgg(input_shape: Tuple[int, int, int], num_classes: int, *, dtype=np.float32, rng: Seed = None,
        dropout: float = 0.4, width: int = 32) -> Sequential:
    """A small VGG-style stack: two 3x3 convs before each of two max pools
    (width, then 2*width channels), linear 128, dropout, linear. Keeps more
    resolution per pooled feature than LeNet, which suits small images."""
    g = generator(rng)
    c, w2 = input_shape[0], 2 * width
    feats = [Conv2d(c, width, 3, padding=1, dtype=dtype, rng=g), ReLU(),
             Conv2d(width, width, 3, padding=1, dtype=dtype, rng=g), ReLU(), MaxPool2d(2),
             Conv2d(width, w2, 3, padding=1, dtype=dtype, rng=g), ReLU(),
             Conv2d(w2, w2, 3, padding=1, dtype=dtype, rng=g), ReLU(), MaxPool2d(2), Flatten()]
    n = _flat_size(feats, input_shape, dtype)
    return Sequential(*feats, Linear(n, 128, dtype=dtype, rng=g), ReLU(), Dropout(dropout, rng=g),
                      Linear(128, num_classes, dtype=dtype, rng=g))


ARCHITECTURES: Dict[str, Callable[..., Sequential]] = {"lenet": lenet, "lenet5": lenet5, "small": small, "vgg": vgg}


def build(arch: str, input_shape: Tuple[int, int, int], num_classes: int, **kw) -> Sequential:
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    if len(input_shape) != 3:
        raise ValueError(f"input_shape must be (C, H, W), got {tuple(input_shape)}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    return ARCHITECTURES[arch](tuple(int(v) for v in input_shape), int(num_classes), **kw)
