"""Deprecated: the canonical layer set is now :mod:`convkern.canonical` (this
name collided with :mod:`convkern.nn.layers`). Kept for one release."""

import warnings

from .canonical import BY_NAME, CANONICAL, Layer

warnings.warn("convkern.layers is now convkern.canonical (the old name collided with convkern.nn.layers); "
              "convkern.layers goes in the next release", DeprecationWarning, stacklevel=2)

__all__ = ["BY_NAME", "CANONICAL", "Layer"]
