"""The canonical layer set: real CNN layer shapes every
speed figure is quoted on. float32, NCHW."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple


@dataclass(frozen=True)
class Layer:
    name: str
    C: int
    H: int
    W: int
    K: int
    R: int
    S: int
    stride: int
    pad: int
    groups: int = 1

    def shapes(self, batch: int) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
        return (batch, self.C, self.H, self.W), (self.K, self.C // self.groups, self.R, self.S)

    def kwargs(self) -> dict:
        return dict(stride=self.stride, padding=self.pad, groups=self.groups)


CANONICAL = [
    Layer("mnist_conv1", 1, 28, 28, 32, 5, 5, 1, 2),
    Layer("mnist_conv2", 32, 14, 14, 64, 3, 3, 1, 1),
    Layer("resnet_stem", 3, 224, 224, 64, 7, 7, 2, 3),
    Layer("resnet_l1_3x3", 64, 56, 56, 64, 3, 3, 1, 1),
    Layer("resnet_l3_3x3", 256, 14, 14, 256, 3, 3, 1, 1),
    Layer("bottleneck_1x1", 256, 56, 56, 64, 1, 1, 1, 0),
    Layer("vgg_3x3", 128, 112, 112, 128, 3, 3, 1, 1),
    Layer("down_3x3_s2", 128, 28, 28, 256, 3, 3, 2, 1),
    Layer("depthwise_3x3", 144, 56, 56, 144, 3, 3, 1, 1, 144),
]

BY_NAME = {layer.name: layer for layer in CANONICAL}
