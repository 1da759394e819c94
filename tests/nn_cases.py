"""The small CNN of the step-for-step check, built in convkern and (for the
golden file and the direct comparison) in PyTorch, and the protocol both run:
one forward/backward, then 3 optimizer steps, each with its own dropout mask.

conv 2->4 3x3 p1, relu, maxpool 2, conv 4->6 3x3 p1, relu, avgpool 2 (ceil),
flatten, linear 54->16, relu, dropout 0.3, linear 16->3; input (5, 2, 11, 11).
"""

from __future__ import annotations

import numpy as np

X_SHAPE, CLASSES, P_DROP, DROP_SEED = (5, 2, 11, 11), 3, 0.3, 77
STEPS = 3
OPTIMIZERS = {  # name -> (convkern class name, kwargs, label smoothing)
    "sgd": ("SGD", dict(lr=0.05, momentum=0.9, weight_decay=1e-3), 0.0),
    "nesterov": ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True), 0.0),
    "adam": ("Adam", dict(lr=0.01, weight_decay=1e-4), 0.1),
    "adamw": ("AdamW", dict(lr=0.01, weight_decay=1e-2), 0.0),
}


def convkern_model(dtype, seed: int = 5):
    import convkern.nn as nn

    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, dtype=dtype, rng=seed), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, padding=1, dtype=dtype, rng=seed + 1), nn.ReLU(), nn.AvgPool2d(2, ceil_mode=True),
        nn.Flatten(), nn.Linear(54, 16, dtype=dtype, rng=seed + 2), nn.ReLU(), nn.Dropout(P_DROP, rng=DROP_SEED),
        nn.Linear(16, CLASSES, dtype=dtype, rng=seed + 3))


def data(dtype):
    rng = np.random.default_rng(2024)
    x = rng.standard_normal(X_SHAPE).astype(dtype)
    y = rng.integers(0, CLASSES, size=X_SHAPE[0])
    return x, y


def run_convkern(dtype, opt_name: str, state=None, device: str = "cpu"):
    """{"logits", "loss", "grad/<param>", "step<k>/<param>"} from convkern, as
    NumPy arrays; device="cuda" runs it on CuPy arrays."""
    import convkern.nn as nn
    from convkern.nn.module import to_numpy

    model = convkern_model(dtype)
    if state is not None:
        model.load_state_dict(state)
    x, y = data(dtype)
    if device == "cuda":
        import cupy

        model.to(device="cuda")
        x, y = cupy.asarray(x), cupy.asarray(y)
    cls, kw, smoothing = OPTIMIZERS[opt_name]
    crit = nn.CrossEntropyLoss(label_smoothing=smoothing)
    opt = getattr(nn, cls)(model.parameters(), **kw)
    out = {}
    for step in range(STEPS):
        opt.zero_grad()
        logits = model(x)
        loss = crit(logits, y)
        model.backward(crit.backward())
        if step == 0:
            out["logits"], out["loss"] = to_numpy(logits), to_numpy(loss)
            out.update({f"grad/{n}": to_numpy(p.grad) for n, p in model.named_parameters()})
        opt.step()
        out.update({f"step{step + 1}/{n}": to_numpy(p.data).copy() for n, p in model.named_parameters()})
    return out


def run_torch(torch, dtype, opt_name: str, state):
    """The same protocol in PyTorch, dropout masks replayed from the same
    generator convkern's Dropout draws from."""
    tnn = torch.nn
    tdt = {np.float32: torch.float32, np.float64: torch.float64}[dtype]
    masks = np.random.default_rng(DROP_SEED)

    class ReplayDropout(tnn.Module):
        def forward(self, t):
            keep = masks.random(tuple(t.shape)) >= P_DROP
            scale = keep.astype(dtype) * dtype(1.0 / (1.0 - P_DROP))
            return t * torch.from_numpy(scale)

    model = tnn.Sequential(
        tnn.Conv2d(2, 4, 3, padding=1), tnn.ReLU(), tnn.MaxPool2d(2),
        tnn.Conv2d(4, 6, 3, padding=1), tnn.ReLU(), tnn.AvgPool2d(2, ceil_mode=True),
        tnn.Flatten(), tnn.Linear(54, 16), tnn.ReLU(), ReplayDropout(), tnn.Linear(16, CLASSES)).to(tdt)
    model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()})
    x, y = data(dtype)
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    cls, kw, smoothing = OPTIMIZERS[opt_name]
    crit = tnn.CrossEntropyLoss(label_smoothing=smoothing)
    opt = getattr(torch.optim, cls)(model.parameters(), **kw)
    out = {}
    for step in range(STEPS):
        opt.zero_grad()
        logits = model(tx)
        loss = crit(logits, ty)
        loss.backward()
        if step == 0:
            out["logits"], out["loss"] = logits.detach().numpy().copy(), loss.detach().numpy().copy()
            out.update({f"grad/{n}": p.grad.numpy().copy() for n, p in model.named_parameters()})
        opt.step()
        out.update({f"step{step + 1}/{n}": p.detach().numpy().copy() for n, p in model.named_parameters()})
    return out
