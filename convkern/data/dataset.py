"""Dataset container, train/validation split and batching."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Tuple

import numpy as np


@dataclass
class Dataset:
    """Images (N, C, H, W) float32 in [0, 1], labels (N,) int64, class names."""

    images: np.ndarray
    labels: np.ndarray
    classes: List[str]
    name: str = "dataset"
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.images.ndim != 4:
            raise ValueError(f"{self.name}: images must be (N, C, H, W), got {self.images.shape}")
        if self.labels.shape != self.images.shape[:1]:
            raise ValueError(f"{self.name}: {self.images.shape[0]} images but labels of shape {self.labels.shape}")
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= len(self.classes)):
            raise ValueError(f"{self.name}: labels must be in [0, {len(self.classes)})")
        self.images = np.ascontiguousarray(self.images, dtype=np.float32)
        self.labels = np.asarray(self.labels, dtype=np.int64)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def input_shape(self) -> Tuple[int, int, int]:
        return tuple(int(v) for v in self.images.shape[1:])

    def subset(self, index: np.ndarray, name: Optional[str] = None) -> "Dataset":
        return Dataset(self.images[index], self.labels[index], list(self.classes), name or self.name, dict(self.meta))

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=len(self.classes))


def split(ds: Dataset, fraction: float, seed: int = 0) -> Tuple[Dataset, Dataset]:
    """(rest, held_out): a stratified split keeping `fraction` of every class
    (at least one image of a class with two or more) for the held-out part."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"split fraction must be in (0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    held: List[np.ndarray] = []
    for c in range(len(ds.classes)):
        idx = np.flatnonzero(ds.labels == c)
        rng.shuffle(idx)
        k = int(round(fraction * len(idx)))
        if len(idx) >= 2:
            k = min(max(k, 1), len(idx) - 1)
        held.append(idx[:k])
    held_idx = np.sort(np.concatenate(held)) if held else np.zeros(0, np.int64)
    mask = np.ones(len(ds), bool)
    mask[held_idx] = False
    return ds.subset(np.flatnonzero(mask), ds.name), ds.subset(held_idx, ds.name + "-heldout")


def batches(images: np.ndarray, labels: np.ndarray, batch_size: int, *, shuffle: bool = False,
            rng: Optional[np.random.Generator] = None, drop_last: bool = False
            ) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    """Yield (images, labels) mini-batches, in a fresh random order each call when shuffling."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = images.shape[0]
    order = (rng or np.random.default_rng()).permutation(n) if shuffle else np.arange(n)
    stop = n - n % batch_size if drop_last else n
    for i in range(0, stop, batch_size):
        idx = order[i:i + batch_size]
        yield images[idx], labels[idx]


def normalisation(images: np.ndarray) -> Tuple[List[float], List[float]]:
    """Per-channel mean and std (std floored so a constant channel stays finite)."""
    mean = images.mean(axis=(0, 2, 3), dtype=np.float64)
    std = np.maximum(images.std(axis=(0, 2, 3), dtype=np.float64), 1e-6)
    return mean.tolist(), std.tolist()
