"""Classification metrics: accuracy, confusion matrix, per-class and macro
precision/recall/F1 (a class never predicted, or never present, scores 0 where
its ratio is undefined, as scikit-learn's zero_division=0)."""

from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np


def _labels(a, name: str) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 1 or a.dtype.kind not in "iu":
        raise ValueError(f"{name} must be a 1-D array of integer class labels, got {a.dtype} {a.shape}")
    return a.astype(np.int64)


def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """cm[i, j] = number of samples of class i predicted as j."""
    t, p = _labels(y_true, "y_true"), _labels(y_pred, "y_pred")
    if t.shape != p.shape:
        raise ValueError(f"y_true {t.shape} and y_pred {p.shape} differ in length")
    for name, a in (("y_true", t), ("y_pred", p)):
        if a.size and (a.min() < 0 or a.max() >= num_classes):
            raise ValueError(f"{name} has labels outside [0, {num_classes})")
    return np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def accuracy(y_true, y_pred) -> float:
    t, p = _labels(y_true, "y_true"), _labels(y_pred, "y_pred")
    if t.shape != p.shape:
        raise ValueError(f"y_true {t.shape} and y_pred {p.shape} differ in length")
    return float(np.mean(t == p)) if t.size else 0.0


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros(num.shape, np.float64), where=den > 0)


def report(cm: np.ndarray, classes: Optional[List[str]] = None) -> Dict[str, object]:
    """Accuracy, macro averages and per-class precision/recall/F1/support from a confusion matrix."""
    cm = np.asarray(cm, dtype=np.int64)
    tp = np.diag(cm).astype(np.float64)
    predicted, actual = cm.sum(axis=0), cm.sum(axis=1)
    precision, recall = _ratio(tp, predicted), _ratio(tp, actual)
    f1 = _ratio(2 * precision * recall, precision + recall)
    names = classes or [str(i) for i in range(len(cm))]
    total = int(cm.sum())
    return {
        "accuracy": float(tp.sum() / total) if total else 0.0,
        "macro": {"precision": float(precision.mean()), "recall": float(recall.mean()), "f1": float(f1.mean())},
        "per_class": {n: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                          "support": int(actual[i])} for i, n in enumerate(names)},
    }


def format_report(rep: Dict[str, object]) -> str:
    lines = [f"{'class':<14}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>9}"]
    for name, m in rep["per_class"].items():
        lines.append(f"{name:<14}{m['precision']:>10.4f}{m['recall']:>10.4f}{m['f1']:>10.4f}{m['support']:>9d}")
    mac = rep["macro"]
    lines.append(f"{'macro':<14}{mac['precision']:>10.4f}{mac['recall']:>10.4f}{mac['f1']:>10.4f}")
    lines.append(f"accuracy {rep['accuracy']:.4f}")
    return "\n".join(lines)
