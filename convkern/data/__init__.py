"""Datasets, batching and augmentation for convkern.nn.

    from convkern.data import make_shapes, load_digits, load_idx, load_folder, split, batches, Augment
"""

from .augment import Augment
from .dataset import Dataset, batches, normalisation, split
from .loaders import load_digits, load_folder, load_idx, load_image, read_idx
from .shapes import make_shapes

__all__ = ["Dataset", "split", "batches", "normalisation", "Augment", "make_shapes", "load_digits",
           "load_idx", "read_idx", "load_folder", "load_image"]
