"""The synthetic shapes dataset of the seeds' worked example: triangle, square
and circle outlines (some filled), with random size, position, rotation, line
width, colours and noise, rendered anti-aliased and reproducible from a seed."""

from __future__ import annotations

import numpy as np

from .dataset import Dataset

CLASSES = ["triangle", "square", "circle"]


def _segment_distance(px, py, ax, ay, bx, by):
    """Distance from pixel centres (H, W) to segments a-b, one per image (n, 1, 1)."""
    dx, dy = bx - ax, by - ay
    t = np.clip(((px - ax) * dx + (py - ay) * dy) / np.maximum(dx * dx + dy * dy, 1e-12), 0.0, 1.0)
    return np.hypot(px - ax - t * dx, py - ay - t * dy)


def _polygon(px, py, cx, cy, r, theta, sides: int):
    """(distance to the outline, inside mask) of regular polygons with circumradius r."""
    angles = theta[:, None] + 2 * np.pi * np.arange(sides) / sides  # (n, sides)
    vx = cx[:, None] + r[:, None] * np.cos(angles)
    vy = cy[:, None] + r[:, None] * np.sin(angles)
    dist = np.full((len(cx),) + px.shape, np.inf)
    inside = np.ones((len(cx),) + px.shape, bool)
    for k in range(sides):
        ax, ay = vx[:, k, None, None], vy[:, k, None, None]
        bx, by = vx[:, (k + 1) % sides, None, None], vy[:, (k + 1) % sides, None, None]
        dist = np.minimum(dist, _segment_distance(px, py, ax, ay, bx, by))
        # vertices run counter-clockwise: inside is to the left of every edge
        inside &= (bx - ax) * (py - ay) - (by - ay) * (px - ax) >= 0
    return dist, inside


def make_shapes(n: int = 3000, size: int = 28, channels: int = 1, seed: int = 0, noise: float = 0.05,
                fill_fraction: float = 0.25) -> Dataset:
    """`n` images (N, channels, size, size) in [0, 1], classes balanced, in random order.

    Each shape gets a circumradius of 22-45% of the image, a centre that keeps
    it inside, a random rotation, a line width of 1-2.5 px (scaled with size),
    a foreground brighter than the background (random colours when RGB), and
    Gaussian noise of std `noise`."""
    if n < 1 or size < 8:
        raise ValueError(f"make_shapes: need n >= 1 and size >= 8, got n={n}, size={size}")
    if channels not in (1, 3):
        raise ValueError(f"make_shapes: channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % len(CLASSES))
    s = float(size)
    r = np.minimum(rng.uniform(0.22, 0.45, n) * s, s / 2 - 1.5)  # small images: keep a margin
    cx = rng.uniform(r + 1, s - 1 - r)
    cy = rng.uniform(r + 1, s - 1 - r)
    theta = rng.uniform(0, 2 * np.pi, n)
    lw = rng.uniform(1.0, 2.5, n) * s / 28.0
    filled = rng.random(n) < fill_fraction
    py, px = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5

    dist = np.empty((n, size, size))
    inside = np.zeros((n, size, size), bool)
    for c, sides in ((0, 3), (1, 4)):
        m = labels == c
        if m.any():
            dist[m], inside[m] = _polygon(px, py, cx[m], cy[m], r[m], theta[m], sides)
    m = labels == 2
    d = np.hypot(px - cx[m, None, None], py - cy[m, None, None])
    dist[m], inside[m] = np.abs(d - r[m, None, None]), d <= r[m, None, None]

    ink = np.clip(lw[:, None, None] / 2 + 0.5 - dist, 0.0, 1.0)  # anti-aliased edge of the stroke
    ink = np.where(filled[:, None, None] & inside, 1.0, ink)
    if channels == 1:
        fg = rng.uniform(0.6, 1.0, (n, 1))
        bg = rng.uniform(0.0, 0.3, (n, 1))
    else:
        fg = rng.uniform(0.45, 1.0, (n, 3))
        bg = rng.uniform(0.0, 0.35, (n, 3))
    img = bg[:, :, None, None] + (fg - bg)[:, :, None, None] * ink[:, None]
    if noise > 0:
        img = img + rng.normal(0.0, noise, img.shape)
    img = np.clip(img, 0.0, 1.0).astype(np.float32)
    return Dataset(img, labels.astype(np.int64), list(CLASSES), "shapes",
                   dict(seed=seed, size=size, channels=channels, noise=noise))
