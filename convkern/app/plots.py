"""PNG figures for training runs: loss/accuracy curves, the confusion matrix,
and feature maps. matplotlib (the train extra) is imported here only."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def curves(history: List[Dict[str, float]], path) -> Path:
    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    ax1.plot(epochs, [h["val_loss"] for h in history], "o-", label="validation")
    ax1.set(xlabel="epoch", ylabel="cross-entropy loss", title="Loss")
    ax2.plot(epochs, [h["train_accuracy"] for h in history], "o-", label="train")
    ax2.plot(epochs, [h["val_accuracy"] for h in history], "o-", label="validation")
    ax2.set(xlabel="epoch", ylabel="accuracy", title="Accuracy")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def confusion(cm: np.ndarray, classes: Sequence[str], path) -> Path:
    cm = np.asarray(cm)
    k = len(classes)
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * k, 1.0 + 0.6 * k))
    im = ax.imshow(cm, cmap="Blues")
    ax.set(xticks=range(k), yticks=range(k), xticklabels=classes, yticklabels=classes,
           xlabel="predicted", ylabel="true", title="Confusion matrix")
    plt.setp(ax.get_xticklabels(), rotation=45, ha="right")
    thresh = cm.max() / 2 if cm.size else 0
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if cm[i, j] > thresh else "black")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def feature_maps(image: np.ndarray, layers: List[Tuple[str, np.ndarray]], path, columns: int = 16) -> Path:
    """The input image, then every map of each layer as 0-255 grayscale tiles."""
    rows = [1] + [math.ceil(m.shape[0] / columns) for _, m in layers]
    fig = plt.figure(figsize=(columns * 0.8, 0.9 * sum(rows) + 0.4 * len(rows)))
    grid = fig.add_gridspec(len(rows), 1, height_ratios=rows, hspace=0.4)
    ax = fig.add_subplot(grid[0])
    ax.imshow(image.transpose(1, 2, 0).squeeze(), cmap="gray" if image.shape[0] == 1 else None)
    ax.set_title("input", fontsize=9)
    ax.axis("off")
    for r, (name, maps) in enumerate(layers, start=1):
        sub = grid[r].subgridspec(rows[r], columns, wspace=0.05, hspace=0.05)
        for i in range(rows[r] * columns):
            ax = fig.add_subplot(sub[i // columns, i % columns])
            ax.axis("off")
            if i < maps.shape[0]:
                ax.imshow(maps[i], cmap="gray", vmin=0, vmax=255)
            if i == 0:
                ax.set_title(f"{name}: {maps.shape[0]} maps {maps.shape[1]}x{maps.shape[2]}", fontsize=9,
                             loc="left")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return Path(path)
