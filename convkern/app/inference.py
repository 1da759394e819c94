"""Using a trained model: class probabilities for image files, and each
convolutional layer's feature maps (normalised to 0-255 as the seeds draw them)."""

from __future__ import annotations

from typing import List, Tuple

import numpy as np

from .. import nn
from ..data import load_image
from ..nn.module import to_numpy
from .train import Normalise


def _input(header: dict, path) -> np.ndarray:
    c, h, w = header["input_shape"]
    return load_image(path, (h, w), c)


def predict(model_path, images: List[str]) -> List[Tuple[str, str, np.ndarray, List[str]]]:
    """[(image, predicted class, probabilities, class names)] for each image file."""
    model, header = nn.load_model(model_path)
    norm = Normalise(**header["normalisation"])
    classes = header.get("classes") or [str(i) for i in range(header["num_classes"])]
    x = np.stack([_input(header, p) for p in images])
    prob = to_numpy(nn.softmax(model(norm(x).astype(model.dtype))))
    return [(str(p), classes[int(pr.argmax())], pr, classes) for p, pr in zip(images, prob)]


def feature_maps(model_path, image) -> Tuple[np.ndarray, List[Tuple[str, np.ndarray]]]:
    """(input image, [(layer name, maps (K, H, W) uint8)]) for every Conv2d, taken
    after its ReLU when one follows, each map scaled to 0-255 on its own range."""
    model, header = nn.load_model(model_path)
    norm = Normalise(**header["normalisation"])
    img = _input(header, image)
    x = norm(img[None]).astype(model.dtype)
    out: List[Tuple[str, np.ndarray]] = []
    mods = list(model)
    for i, m in enumerate(mods):
        x = m(x)
        after_relu = isinstance(m, nn.ReLU) and i > 0 and isinstance(mods[i - 1], nn.Conv2d)
        conv_alone = isinstance(m, nn.Conv2d) and not (i + 1 < len(mods) and isinstance(mods[i + 1], nn.ReLU))
        if after_relu or conv_alone:
            maps = to_numpy(x[0]).astype(np.float64)
            lo = maps.min(axis=(1, 2), keepdims=True)
            span = maps.max(axis=(1, 2), keepdims=True) - lo
            scaled = np.divide(maps - lo, span, out=np.zeros_like(maps), where=span > 0) * 255.0
            name = f"conv {len(out) + 1} (layer {i - 1 if after_relu else i})" + (" + relu" if after_relu else "")
            out.append((name, np.round(scaled).astype(np.uint8)))
    return img, out
