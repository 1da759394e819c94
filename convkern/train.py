"""The training loop behind `convkern train`: data, model, optimizer and
schedule from a config; a progress bar per epoch; validation each epoch; the
best model kept; metrics JSON and plots written at the end. Ctrl-C stops
cleanly and keeps the last checkpoint."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from . import BackendUnavailableError, get_flush_denormal, metrics, nn, set_flush_denormal
from .backend import use_backend
from .nn.module import to_numpy
from .data import Augment, Dataset, batches, load_digits, load_folder, load_idx, make_shapes, normalisation, split

DATASETS = "shapes, shapes-rgb, digits, idx:DIR, folder:DIR"


@dataclass
class TrainConfig:
    data: str = "shapes"
    arch: str = "lenet"
    epochs: int = 6
    batch_size: int = 64
    lr: Optional[float] = None          # None: the optimizer's default below
    optimizer: str = "sgd"              # sgd (momentum 0.9, Nesterov), adam, adamw
    weight_decay: float = 5e-4
    schedule: str = "cosine"            # cosine, step, none
    label_smoothing: float = 0.0
    backend: Optional[str] = None
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0
    out: str = "runs/latest"
    val_fraction: float = 0.1
    shapes_train: int = 6000            # images of the synthetic set (test set: a quarter of it, own seed)
    image_size: int = 28                # for shapes and folder: images are resized to this
    flush_denormal: bool = True         # denormal gradients late in training slow x86 arithmetic ~1.4x
    augment: Augment = field(default_factory=Augment)
    progress: bool = True

    def default_lr(self) -> float:
        return self.lr if self.lr is not None else {"sgd": 0.05, "adam": 1e-3, "adamw": 1e-3}[self.optimizer]


OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "step", "none")


def load_data(cfg: TrainConfig) -> Tuple[Dataset, Dataset]:
    """(train, test) for the config's data source."""
    spec = cfg.data
    if spec in ("shapes", "shapes-rgb"):
        ch = 3 if spec == "shapes-rgb" else 1
        n_test = max(cfg.shapes_train // 4, 30)
        return (make_shapes(cfg.shapes_train, cfg.image_size, ch, seed=cfg.seed),
                make_shapes(n_test, cfg.image_size, ch, seed=cfg.seed + 10_007))
    if spec == "digits":
        return split(load_digits(), 0.2, seed=cfg.seed)
    if spec.startswith("idx:"):
        root = spec[4:]
        train = load_idx(root, "train")
        try:
            return train, load_idx(root, "test")
        except FileNotFoundError:
            return split(train, 0.2, seed=cfg.seed)
    if spec.startswith("folder:"):
        return split(load_folder(spec[7:], (cfg.image_size, cfg.image_size)), 0.2, seed=cfg.seed)
    raise ValueError(f"unknown data {spec!r}; use one of: {DATASETS}")


class Normalise:
    """(x - mean) / std per channel, with the training set's statistics."""

    def __init__(self, mean: List[float], std: List[float]):
        self.mean = np.asarray(mean, np.float32)[None, :, None, None]
        self.std = np.asarray(std, np.float32)[None, :, None, None]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mean) / self.std


def _device_array(x, device: str, dtype):
    if device == "cuda":
        import cupy
        return cupy.asarray(x, dtype=dtype)
    return np.ascontiguousarray(x, dtype=dtype)


def evaluate(model: nn.Module, ds: Dataset, norm: Normalise, device: str = "cpu", batch_size: int = 256
             ) -> Dict[str, object]:
    """Loss, accuracy, predictions and probabilities on a dataset, in eval mode."""
    was_training = model.training
    model.eval()
    crit = nn.CrossEntropyLoss()
    total, preds, probs = 0.0, [], []
    try:
        for x, y in batches(ds.images, ds.labels, batch_size):
            logits = model(_device_array(norm(x), device, model.dtype))
            total += float(to_numpy(crit(logits, _device_array(y, device, np.int64)))) * len(y)
            p = to_numpy(nn.softmax(logits))
            probs.append(p)
            preds.append(p.argmax(axis=1))
    finally:
        model.train(was_training)
    pred = np.concatenate(preds) if preds else np.zeros(0, np.int64)
    return {"loss": total / max(len(ds), 1), "accuracy": metrics.accuracy(ds.labels, pred), "pred": pred,
            "prob": np.concatenate(probs) if probs else np.zeros((0, len(ds.classes)))}


def _optimizer(cfg: TrainConfig, model: nn.Module) -> nn.Optimizer:
    lr = cfg.default_lr()
    if cfg.optimizer == "sgd":
        return nn.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return nn.Adam(model.parameters(), lr=lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return nn.AdamW(model.parameters(), lr=lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {cfg.optimizer!r}")


def _schedule(cfg: TrainConfig, opt: nn.Optimizer):
    if cfg.schedule == "cosine":
        return nn.CosineAnnealingLR(opt, T_max=cfg.epochs)
    if cfg.schedule == "step":
        return nn.StepLR(opt, step_size=max(cfg.epochs // 3, 1), gamma=0.1)
    if cfg.schedule == "none":
        return None
    raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {cfg.schedule!r}")


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, leave=True, dynamic_ncols=True)


def fit(cfg: TrainConfig, log=print) -> Dict[str, object]:
    """Train per the config, write everything into cfg.out, return the metrics."""
    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise ValueError(f"epochs ({cfg.epochs}) and batch_size ({cfg.batch_size}) must be >= 1")
    if cfg.device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {cfg.device!r}")
    dtype = nn.init.check_dtype(cfg.dtype)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    try:  # a process-wide switch of the C++ kernels: restored afterwards
        flush_before = get_flush_denormal()
        set_flush_denormal(cfg.flush_denormal)
    except BackendUnavailableError:  # no compiled kernels: nothing to switch
        flush_before = None
    try:
        return _fit(cfg, dtype, out, log)
    finally:
        if flush_before is not None:
            set_flush_denormal(flush_before)


def _fit(cfg: TrainConfig, dtype, out: Path, log) -> Dict[str, object]:
    with use_backend(cfg.backend):
        train_all, test = load_data(cfg)
        train, val = split(train_all, cfg.val_fraction, seed=cfg.seed)
        mean, std = normalisation(train.images)
        norm = Normalise(mean, std)
        model = nn.build(cfg.arch, train.input_shape, len(train.classes), dtype=dtype, rng=cfg.seed)
        if cfg.device == "cuda":
            model.to(device="cuda")
        opt, crit = _optimizer(cfg, model), nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        sched = _schedule(cfg, opt)
        meta = dict(arch=cfg.arch, input_shape=list(train.input_shape), num_classes=len(train.classes),
                    classes=train.classes, normalisation={"mean": mean, "std": std}, data=cfg.data)
        log(f"data {cfg.data}: {len(train)} train, {len(val)} validation, {len(test)} test images of "
            f"{train.input_shape}, classes {', '.join(train.classes)}")
        log(f"model {cfg.arch}: {model.num_parameters():,} parameters; {cfg.optimizer} lr {opt.lr:g}, "
            f"{cfg.schedule} schedule, {cfg.epochs} epochs of batch {cfg.batch_size}, {cfg.device}")
        rng = np.random.default_rng(cfg.seed)
        history: List[Dict[str, float]] = []
        best = (-1.0, 0.0)  # (accuracy, -loss): on a small validation set accuracy ties often
        interrupted = False
        t_start = time.perf_counter()
        try:
            for epoch in range(1, cfg.epochs + 1):
                model.train()
                seen, loss_sum, correct, t0 = 0, 0.0, 0, time.perf_counter()
                bar = _progress(len(train), f"epoch {epoch}/{cfg.epochs}", cfg.progress)
                for xb, yb in batches(train.images, train.labels, cfg.batch_size, shuffle=True, rng=rng):
                    xb = _device_array(norm(cfg.augment(xb, rng)), cfg.device, dtype)
                    yd = _device_array(yb, cfg.device, np.int64)
                    opt.zero_grad()
                    logits = model(xb)
                    loss = float(crit(logits, yd))
                    model.backward(crit.backward(), need_input_grad=False)
                    opt.step()
                    seen += len(yb)
                    loss_sum += loss * len(yb)
                    correct += int((to_numpy(logits).argmax(axis=1) == yb).sum())
                    bar.update(len(yb))
                    bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.4f}",
                                    img_s=f"{seen / (time.perf_counter() - t0):.0f}")
                bar.close()
                train_time = time.perf_counter() - t0
                ev = evaluate(model, val, norm, cfg.device)
                row = dict(epoch=epoch, lr=opt.lr, train_loss=loss_sum / seen, train_accuracy=correct / seen,
                           val_loss=ev["loss"], val_accuracy=ev["accuracy"], images_per_s=seen / train_time,
                           epoch_seconds=time.perf_counter() - t0)
                history.append(row)
                nn.save(out / "last.npz", model, dict(meta, epoch=epoch))
                if (ev["accuracy"], -ev["loss"]) > best:
                    best = (ev["accuracy"], -ev["loss"])
                    nn.save(out / "model.npz", model, dict(meta, epoch=epoch, val_accuracy=ev["accuracy"],
                                                           val_loss=ev["loss"]))
                log(f"epoch {epoch}: train loss {row['train_loss']:.4f} acc {row['train_accuracy']:.4f} | "
                    f"val loss {row['val_loss']:.4f} acc {row['val_accuracy']:.4f} | "
                    f"{row['images_per_s']:.0f} img/s, lr {opt.lr:.3g}")
                if sched is not None:
                    sched.step()
        except KeyboardInterrupt:
            interrupted = True
            log(f"interrupted: the last checkpoint is {out / 'last.npz'}, the best {out / 'model.npz'}")
        result: Dict[str, object] = dict(config=_config_dict(cfg), history=history, interrupted=interrupted,
                                          train_seconds=time.perf_counter() - t_start)
        if (out / "model.npz").exists():
            nn.load_into(model, out / "model.npz")
            ev = evaluate(model, test, norm, cfg.device)
            cm = metrics.confusion_matrix(test.labels, ev["pred"], len(test.classes))
            rep = metrics.report(cm, test.classes)
            result.update(test=dict(loss=ev["loss"], **rep), confusion_matrix=cm.tolist(), classes=test.classes)
            log(f"test ({len(test)} images, best model): loss {ev['loss']:.4f}, accuracy {rep['accuracy']:.4f}")
            log(metrics.format_report(rep))
            _plots(out, history, cm, test.classes, log)
        (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
        log(f"wrote {out / 'model.npz'}, {out / 'metrics.json'}")
        return result


def _config_dict(cfg: TrainConfig) -> dict:
    d = asdict(cfg)
    d["lr"] = cfg.default_lr()
    return d


def _plots(out: Path, history, cm, classes, log) -> None:
    try:
        from . import plots
    except ImportError as exc:
        log(f"no plots ({exc}): pip install 'convkern[train]'")
        return
    if history:
        plots.curves(history, out / "curves.png")
    plots.confusion(cm, classes, out / "confusion.png")
