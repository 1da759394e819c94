"""Batch augmentation on the host: random crop with padding, horizontal flip,
small rotation, brightness/contrast jitter, Gaussian noise and cutout. Each is
off unless asked for; every draw comes from the generator passed in, so a
seed reproduces a run."""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np


@dataclass
class Augment:
    crop_padding: int = 0      # pad by this many pixels (zeros), crop back at a random offset
    hflip: bool = False        # mirror left-right with probability 1/2
    rotate: float = 0.0        # rotate by U(-rotate, rotate) degrees, bilinear, zero fill
    brightness: float = 0.0    # add U(-b, b)
    contrast: float = 0.0      # scale about the image mean by U(1-c, 1+c)
    noise: float = 0.0         # add N(0, noise)
    cutout: int = 0            # zero a random cutout x cutout square

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, bool) and v < 0:
                raise ValueError(f"Augment: {f.name} must be >= 0, got {v}")

    @property
    def active(self) -> bool:
        return any(bool(getattr(self, f.name)) for f in fields(self))

    def __call__(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """A new, augmented copy of the batch x (N, C, H, W)."""
        if not self.active:
            return x
        x = np.array(x, dtype=np.float32, copy=True)
        n = x.shape[0]
        if self.crop_padding:
            x = _random_crop(x, self.crop_padding, rng)
        if self.hflip:
            flip = rng.random(n) < 0.5
            x[flip] = x[flip, :, :, ::-1]
        if self.rotate:
            x = _rotate(x, rng.uniform(-self.rotate, self.rotate, n))
        if self.contrast:
            mean = x.mean(axis=(1, 2, 3), keepdims=True)
            x = (x - mean) * rng.uniform(1 - self.contrast, 1 + self.contrast, (n, 1, 1, 1)) + mean
        if self.brightness:
            x += rng.uniform(-self.brightness, self.brightness, (n, 1, 1, 1))
        if self.noise:
            x += rng.normal(0.0, self.noise, x.shape)
        if self.cutout:
            _cutout(x, self.cutout, rng)
        return np.clip(x, 0.0, 1.0).astype(np.float32, copy=False)


def _random_crop(x: np.ndarray, pad: int, rng: np.random.Generator) -> np.ndarray:
    n, _, h, w = x.shape
    padded = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    dy, dx = rng.integers(0, 2 * pad + 1, n), rng.integers(0, 2 * pad + 1, n)
    return np.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


def _rotate(x: np.ndarray, degrees: np.ndarray) -> np.ndarray:
    """Rotate each image about its centre (inverse mapping, bilinear, zeros outside)."""
    n, c, h, w = x.shape
    t = np.deg2rad(degrees)[:, None, None]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    cy, cx = (h - 1) / 2, (w - 1) / 2
    sy = cy + (yy - cy) * np.cos(t) - (xx - cx) * np.sin(t)
    sx = cx + (yy - cy) * np.sin(t) + (xx - cx) * np.cos(t)
    y0, x0 = np.floor(sy).astype(np.int64), np.floor(sx).astype(np.int64)
    fy, fx = sy - y0, sx - x0
    out = np.zeros_like(x)
    img = np.arange(n)[:, None, None]
    for oy, ox, wgt in ((0, 0, (1 - fy) * (1 - fx)), (0, 1, (1 - fy) * fx), (1, 0, fy * (1 - fx)), (1, 1, fy * fx)):
        yi, xi = y0 + oy, x0 + ox
        ok = (yi >= 0) & (yi < h) & (xi >= 0) & (xi < w)
        vals = x[img, :, np.clip(yi, 0, h - 1), np.clip(xi, 0, w - 1)]  # (n, h, w, c)
        out += (vals * (wgt * ok)[..., None]).transpose(0, 3, 1, 2).astype(np.float32)
    return out


def _cutout(x: np.ndarray, size: int, rng: np.random.Generator) -> None:
    n, _, h, w = x.shape
    cy, cx = rng.integers(0, h, n), rng.integers(0, w, n)
    for i in range(n):
        y0, x0 = max(cy[i] - size // 2, 0), max(cx[i] - size // 2, 0)
        x[i, :, y0:y0 + size, x0:x0 + size] = 0.0
