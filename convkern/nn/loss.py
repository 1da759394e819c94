"""Softmax, log-softmax and cross-entropy on logits (numerically stable)."""

from __future__ import annotations

from .module import array_module


def log_softmax(logits, axis: int = -1):
    """log(softmax(logits)) without overflow: the row maximum is subtracted first."""
    xp = array_module(logits)
    shifted = logits - xp.max(logits, axis=axis, keepdims=True)
    return shifted - xp.log(xp.sum(xp.exp(shifted), axis=axis, keepdims=True))


def softmax(logits, axis: int = -1):
    xp = array_module(logits)
    return xp.exp(log_softmax(logits, axis=axis))


class CrossEntropyLoss:
    """Like torch.nn.CrossEntropyLoss on (N, classes) logits and int class
    targets, mean reduction, optional label smoothing: the target distribution
    is (1 - eps) one-hot + eps / classes. ``loss = crit(logits, target)``
    returns a 0-d array; ``crit.backward()`` returns d loss / d logits."""

    def __init__(self, label_smoothing: float = 0.0):
        if not 0.0 <= float(label_smoothing) <= 1.0:
            raise ValueError(f"CrossEntropyLoss: label_smoothing must be in [0, 1], got {label_smoothing}")
        self.label_smoothing = float(label_smoothing)
        self._saved = None

    def _target_dist(self, xp, target, n_classes, dtype):
        dist = xp.zeros((target.shape[0], n_classes), dtype=dtype)
        dist[xp.arange(target.shape[0]), target] = 1.0
        if self.label_smoothing:
            dist = dist * (1.0 - self.label_smoothing) + self.label_smoothing / n_classes
        return dist

    def __call__(self, logits, target):
        return self.forward(logits, target)

    def forward(self, logits, target):
        xp = array_module(logits)
        if logits.ndim != 2:
            raise ValueError(f"CrossEntropyLoss: logits must be (N, classes), got {tuple(logits.shape)}")
        target = xp.asarray(target)
        if target.shape != logits.shape[:1]:
            raise ValueError(f"CrossEntropyLoss: target must be ({logits.shape[0]},) class indices to match "
                             f"logits {tuple(logits.shape)}, got {tuple(target.shape)}")
        if target.dtype.kind not in "iu":
            raise TypeError(f"CrossEntropyLoss: target must hold integer class indices, got {target.dtype}")
        n, c = logits.shape
        if n == 0:
            raise ValueError("CrossEntropyLoss: empty batch")
        if target.size and (int(target.min()) < 0 or int(target.max()) >= c):
            raise ValueError(f"CrossEntropyLoss: target values must be in [0, {c}), got "
                             f"[{int(target.min())}, {int(target.max())}]")
        logp = log_softmax(logits)
        dist = self._target_dist(xp, target, c, logits.dtype)
        self._saved = (logp, dist)
        return -xp.sum(dist * logp) / n

    def backward(self):
        if self._saved is None:
            raise RuntimeError("CrossEntropyLoss.backward: call the loss first")
        logp, dist = self._saved
        xp = array_module(logp)
        return (xp.exp(logp) - dist) / logp.dtype.type(logp.shape[0])

