"""convkern.nn: a thin trainable-CNN layer over convkern's kernels.

Explicit forward/backward per layer, no tape::

    import convkern.nn as nn
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(8 * 14 * 14, 10))
    crit, opt = nn.CrossEntropyLoss(), nn.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss = crit(model(x), y)
    opt.zero_grad(); model.backward(crit.backward()); opt.step()
"""

from .dropout import Dropout, Dropout2d
from .init import manual_seed
from .layers import AvgPool2d, Conv2d, Flatten, Linear, MaxPool2d, ReLU
from .loss import CrossEntropyLoss, log_softmax, softmax
from .models import ARCHITECTURES, build
from .module import Module, Parameter, Sequential
from .optim import SGD, Adam, AdamW, CosineAnnealingLR, Optimizer, StepLR
from .serialize import load_checkpoint, load_into, load_model, save, save_checkpoint

__all__ = [
    "Module", "Parameter", "Sequential", "Conv2d", "MaxPool2d", "AvgPool2d", "ReLU", "Dropout", "Dropout2d",
    "Flatten", "Linear", "CrossEntropyLoss", "softmax", "log_softmax", "Optimizer", "SGD", "Adam", "AdamW",
    "StepLR", "CosineAnnealingLR", "ARCHITECTURES", "build", "save", "load_model", "load_into", "manual_seed",
    "save_checkpoint", "load_checkpoint",
]
