"""Real data: scikit-learn's digits, the IDX format (MNIST's files, plain or
gzip) and an image folder (one sub-folder per class)."""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from .dataset import Dataset

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def load_digits() -> Dataset:
    """scikit-learn's 1797 handwritten digits, 8x8, scaled from 0..16 to [0, 1]."""
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError as exc:
        raise ImportError("the digits dataset needs scikit-learn: pip install 'convkern[train]'") from exc
    d = sk_digits()
    images = (d.images / 16.0).astype(np.float32)[:, None]
    return Dataset(images, d.target.astype(np.int64), [str(c) for c in d.target_names], "digits")


# IDX: magic 0x00 0x00 <type> <ndim>, ndim big-endian uint32 sizes, then the data, big-endian.
_IDX_TYPES = {0x08: np.dtype(">u1"), 0x09: np.dtype(">i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path) -> np.ndarray:
    """One IDX file (gzip-compressed or not) as a native-endian array."""
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise ValueError(f"{path}: corrupt gzip data: {exc}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic {raw[:4].hex() or 'empty'})")
    ndim = raw[3]
    if ndim == 0 or len(raw) < 4 + 4 * ndim:
        raise ValueError(f"{path}: IDX header truncated or has 0 dimensions")
    shape = tuple(int(v) for v in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dt = _IDX_TYPES[raw[2]]
    need = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    have = len(raw) - 4 - 4 * ndim
    if have != need:
        raise ValueError(f"{path}: IDX header says shape {shape} ({need} bytes of {dt}) but the file holds "
                         f"{have} bytes")
    return np.frombuffer(raw, dtype=dt, offset=4 + 4 * ndim).reshape(shape).astype(dt.newbyteorder("="))


def _find(root: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(f"{root}: no {stem}[.gz] (MNIST's file names are expected)")


def load_idx(root, split: str = "train", classes: Optional[List[str]] = None) -> Dataset:
    """A directory of MNIST-style IDX files: {train,t10k}-images-idx3-ubyte[.gz]
    and the matching -labels-idx1-ubyte[.gz]. split is "train" or "test"."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"IDX directory {root} does not exist")
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(_find(root, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_find(root, f"{prefix}-labels-idx1-ubyte"))
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim != 4 or labels.ndim != 1 or len(labels) != len(images):
        raise ValueError(f"{root}: images {images.shape} and labels {labels.shape} do not pair up "
                         "(want (N, H, W) images and (N,) labels)")
    scale = 255.0 if images.dtype == np.uint8 else 1.0
    n_classes = int(labels.max()) + 1 if len(labels) else 0
    names = classes or [str(c) for c in range(n_classes)]
    return Dataset(images.astype(np.float32) / scale, labels.astype(np.int64), names, f"idx:{root.name}")


def load_image(path, size: Optional[Tuple[int, int]], channels: int) -> np.ndarray:
    """One image file as (channels, H, W) float32 in [0, 1], resized to size (H, W)."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError as exc:
        raise ImportError("reading images needs Pillow: pip install 'convkern[train]'") from exc
    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB")
            if size is not None and im.size != (size[1], size[0]):
                im = im.resize((size[1], size[0]), Image.BILINEAR)
            a = np.asarray(im, dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"{path}: not a readable image: {exc}") from exc
    return a[None] if channels == 1 else a.transpose(2, 0, 1)


def load_folder(root, size: Tuple[int, int] = (28, 28), channels: int = 1) -> Dataset:
    """root/<class>/<image files>: class names are the sub-folders, sorted."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise ValueError(f"{root}: need one sub-folder per class and at least two classes, found {classes}")
    images, labels = [], []
    for c, name in enumerate(classes):
        files = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"{root / name}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        images += [load_image(p, size, channels) for p in files]
        labels += [c] * len(files)
    return Dataset(np.stack(images), np.array(labels, np.int64), classes, f"folder:{root.name}")
