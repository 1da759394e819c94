"""The training loop behind `convkern train`: data, model, optimizer and
schedule from a config; a progress bar per epoch; validation each epoch; the
best model kept; metrics JSON and plots written at the end. Ctrl-C stops
cleanly and keeps the last checkpoint."""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from .. import BackendUnavailableError, get_flush_denormal, nn, set_flush_denormal, tune
from . import metrics
from .. import distributed as dist
from ..backend import use_backend
from ..distributed.comm import LocalComm
from ..nn.module import to_numpy
from ..data import Augment, Dataset, load_digits, load_folder, load_idx, make_shapes, normalisation, split

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
    distributed: bool = False           # one rank of an mpiexec job; batch_size is per rank
    dist_timeout: Optional[float] = None  # seconds a collective may wait (None: CONVKERN_DIST_TIMEOUT or 60)
    stop_after: Optional[int] = None    # stop after this epoch, checkpoint kept, as if interrupted
    resume: Optional[str] = None        # continue from this run directory's last.npz, under its saved config

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
    """Train per the config, write everything into cfg.out, return the metrics.

    With cfg.distributed, this process is one rank of an mpiexec job: the
    batch size is per rank, the data is sharded (DistributedSampler),
    gradients are averaged (DataParallel), evaluation is sharded and
    reduced, and only rank 0 logs and writes files. With cfg.resume, training
    continues from that directory's last checkpoint, under the config saved
    there."""
    comm: LocalComm = dist.init(cfg.dist_timeout) if cfg.distributed else LocalComm()
    if comm.rank != 0:
        log = _quiet
    if cfg.resume:
        cfg = _resumed_config(cfg, comm)
    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise ValueError(f"epochs ({cfg.epochs}) and batch_size ({cfg.batch_size}) must be >= 1")
    if cfg.device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {cfg.device!r}")
    if cfg.stop_after is not None and cfg.stop_after < 1:
        raise ValueError(f"stop_after must be >= 1, got {cfg.stop_after}")
    dtype = nn.init.check_dtype(cfg.dtype)
    out = Path(cfg.out)
    if comm.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    if cfg.device == "cuda" and comm.size > 1:
        import cupy
        cupy.cuda.Device(comm.local_rank % cupy.cuda.runtime.getDeviceCount()).use()
    try:  # a process-wide switch of the C++ kernels: restored afterwards
        flush_before = get_flush_denormal()
        set_flush_denormal(cfg.flush_denormal)
    except BackendUnavailableError:  # no compiled kernels: nothing to switch
        flush_before = None
    # Distributed ranks measure nothing on their own (they share cores):
    # rank 0 tunes a training step alone, below, and the rest adopt its choices.
    tuning = tune.mode()
    recall = tune.forced("recall") if comm.size > 1 and tuning != "off" else contextlib.nullcontext()
    try:
        with recall:
            return _fit(cfg, dtype, out, log, comm, tuning)
    finally:
        if flush_before is not None:
            set_flush_denormal(flush_before)


def _quiet(*args, **kwargs) -> None:
    """The log of ranks other than 0."""


def _resumed_config(cfg: TrainConfig, comm: LocalComm) -> TrainConfig:
    """The config saved in the checkpoint, with this call's distributed,
    progress, stop_after and timeout settings."""
    path = Path(cfg.resume) / "last.npz"
    saved = None
    if comm.rank == 0:
        try:
            saved = nn.serialize.read(path)[0].get("config")
        except (FileNotFoundError, ValueError) as exc:
            saved = exc
    saved = comm.bcast_obj(saved, 0, "the resumed config")
    if isinstance(saved, Exception):
        raise ValueError(f"cannot resume from {cfg.resume}: {saved}")
    if not isinstance(saved, dict):
        raise ValueError(f"cannot resume from {cfg.resume}: {path} holds no training config (not a checkpoint "
                         f"of convkern train)")
    saved = dict(saved, augment=Augment(**saved["augment"]), out=str(cfg.resume), resume=str(cfg.resume),
                 distributed=cfg.distributed, progress=cfg.progress, stop_after=cfg.stop_after,
                 dist_timeout=cfg.dist_timeout)
    known = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in saved.items() if k in known})


def _reseed_dropout(model: nn.Module, seed: List[int]) -> None:
    """One generator per (seed, epoch, rank) for every dropout layer: ranks
    draw different masks, and a resumed run draws the masks the uninterrupted
    one would have."""
    g = np.random.default_rng(seed)
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m._rng = g


def _tune_on_rank0(cfg: TrainConfig, model: nn.Module, train: Dataset, norm: "Normalise", dtype,
                   comm: LocalComm, tuning: str) -> None:
    """Ranks sharing a machine must not time their kernels while the others
    load the same cores: rank 0 measures a training step's problems alone
    (the others wait asleep), then every rank adopts its choices and runs in
    recall mode (nothing more measured)."""
    if comm.rank == 0:
        n = min(cfg.batch_size, len(train))
        x = _device_array(norm(train.images[:n]), cfg.device, dtype)
        crit = nn.CrossEntropyLoss()
        with tune.forced(tuning):
            crit(model(x), _device_array(train.labels[:n], cfg.device, np.int64))
            model.backward(crit.backward(), need_input_grad=False)
        model.zero_grad()
    comm.barrier("rank 0's kernel tuning", idle=True, timeout=max(comm.timeout, 3600.0))
    choices = comm.bcast_obj(tune.choices() if comm.rank == 0 else None, 0, "the tuning choices")
    if comm.rank != 0:
        tune.adopt(choices)


def _evaluate_shared(model: nn.Module, ds: Dataset, norm: "Normalise", device: str, comm: LocalComm,
                     batch_size: int = 256) -> Dict[str, object]:
    """Loss, accuracy and confusion matrix over a dataset, each rank taking
    every size-th image (no padding: each image counted once) and the sums
    reduced across ranks."""
    was_training = model.training
    model.eval()
    crit = nn.CrossEntropyLoss()
    k = len(ds.classes)
    cm = np.zeros((k, k), np.float64)
    loss = np.zeros(1, np.float64)
    idx = np.arange(comm.rank, len(ds), comm.size)
    try:
        for i in range(0, len(idx), batch_size):
            b = idx[i:i + batch_size]
            logits = model(_device_array(norm(ds.images[b]), device, model.dtype))
            loss += float(to_numpy(crit(logits, _device_array(ds.labels[b], device, np.int64)))) * len(b)
            cm += metrics.confusion_matrix(ds.labels[b], to_numpy(logits).argmax(axis=1), k)
    finally:
        model.train(was_training)
    comm.allreduce_(loss, "the evaluation loss")
    comm.allreduce_(cm, "the confusion matrix")
    cm = cm.astype(np.int64)
    n = max(int(cm.sum()), 1)
    return {"loss": float(loss[0]) / n, "accuracy": float(np.trace(cm)) / n, "cm": cm}


def _fit(cfg: TrainConfig, dtype, out: Path, log, comm: LocalComm, tuning: str) -> Dict[str, object]:
    with use_backend(cfg.backend):
        train_all, test = load_data(cfg)
        train, val = split(train_all, cfg.val_fraction, seed=cfg.seed)
        dist.check_agreement(comm, (train.input_shape, len(train.classes), len(train), len(val), len(test),
                                    _config_dict(cfg)), "the data (image shape, classes, sizes) and config")
        sampler = dist.DistributedSampler(len(train), comm.size, comm.rank, seed=cfg.seed)
        mean, std = normalisation(train.images)
        norm = Normalise(mean, std)
        model = nn.build(cfg.arch, train.input_shape, len(train.classes), dtype=dtype, rng=cfg.seed)
        if cfg.device == "cuda":
            model.to(device="cuda")
        opt, crit = _optimizer(cfg, model), nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        sched = _schedule(cfg, opt)
        meta = dict(arch=cfg.arch, input_shape=list(train.input_shape), num_classes=len(train.classes),
                    classes=train.classes, normalisation={"mean": mean, "std": std}, data=cfg.data)
        history: List[Dict[str, float]] = []
        best = [-1.0, 0.0]  # (accuracy, -loss): on a small validation set accuracy ties often
        first = 1
        if cfg.resume:
            state = _load_checkpoint(out / "last.npz", model, opt, sched, comm)
            history, best, first = state["history"], list(state["best"]), int(state["epoch"]) + 1
        net = dist.DataParallel(model, comm) if comm.size > 1 else model  # takes rank 0's weights
        if comm.size > 1 and tuning in ("on", "exhaustive"):
            _tune_on_rank0(cfg, model, train, norm, dtype, comm, tuning)
        ranks = f" on {comm.size} ranks (batch {cfg.batch_size} each, {cfg.batch_size * comm.size} in all)" \
            if comm.size > 1 else ""
        log(f"data {cfg.data}: {len(train)} train, {len(val)} validation, {len(test)} test images of "
            f"{train.input_shape}, classes {', '.join(train.classes)}")
        log(f"model {cfg.arch}: {model.num_parameters():,} parameters; {cfg.optimizer} lr {opt.initial_lr:g}, "
            f"{cfg.schedule} schedule, {cfg.epochs} epochs of batch {cfg.batch_size}, {cfg.device}{ranks}")
        if comm.size > 1:
            log(comm.roster())
        if first > 1:
            log(f"resumed from {out / 'last.npz'} after epoch {first - 1}")
        interrupted = stopped = False
        t_start = time.perf_counter()
        try:
            for epoch in range(first, cfg.epochs + 1):
                row = _epoch(cfg, epoch, net, model, opt, crit, train, norm, dtype, sampler, comm, log)
                ev = _evaluate_shared(model, val, norm, cfg.device, comm)
                row.update(val_loss=ev["loss"], val_accuracy=ev["accuracy"])
                history.append(row)
                if sched is not None:
                    sched.step()
                improved = (ev["accuracy"], -ev["loss"]) > tuple(best)
                if improved:
                    best = [ev["accuracy"], -ev["loss"]]
                if comm.rank == 0:
                    if improved:
                        nn.save(out / "model.npz", model, dict(meta, epoch=epoch, val_accuracy=ev["accuracy"],
                                                               val_loss=ev["loss"]))
                    nn.serialize.save_checkpoint(out / "last.npz", model, opt, sched, dict(
                        meta, epoch=epoch, config=_config_dict(cfg), history=history, best=best))
                log(f"epoch {epoch}: train loss {row['train_loss']:.4f} acc {row['train_accuracy']:.4f} | "
                    f"val loss {row['val_loss']:.4f} acc {row['val_accuracy']:.4f} | "
                    f"{row['images_per_s']:.0f} img/s, lr {row['lr']:.3g}")
                if cfg.stop_after is not None and epoch >= cfg.stop_after and epoch < cfg.epochs:
                    stopped = True
                    log(f"stopped after epoch {epoch} as asked; continue with --resume {out}")
                    break
        except KeyboardInterrupt:
            if comm.size > 1:
                raise  # ranks stop at different points: the abort hook ends the job
            interrupted = True
            log(f"interrupted: the last checkpoint is {out / 'last.npz'}, the best {out / 'model.npz'}")
        result: Dict[str, object] = dict(config=_config_dict(cfg), world_size=comm.size, history=history,
                                          interrupted=interrupted, stopped=stopped,
                                          train_seconds=time.perf_counter() - t_start)
        if comm.bcast_obj((out / "model.npz").exists() if comm.rank == 0 else None, 0, "the best model's path"):
            if comm.rank == 0:
                nn.load_into(model, out / "model.npz")
            if comm.size > 1:
                net.broadcast_parameters()
            ev = _evaluate_shared(model, test, norm, cfg.device, comm)
            cm = ev["cm"]
            rep = metrics.report(cm, test.classes)
            result.update(test=dict(loss=ev["loss"], **rep), confusion_matrix=cm.tolist(), classes=test.classes)
            log(f"test ({len(test)} images, best model): loss {ev['loss']:.4f}, accuracy {rep['accuracy']:.4f}")
            log(metrics.format_report(rep))
            if comm.rank == 0:
                _plots(out, history, cm, test.classes, log)
        if comm.rank == 0:
            tmp = out / "metrics.json.tmp"
            tmp.write_text(json.dumps(result, indent=2) + "\n")
            tmp.replace(out / "metrics.json")
        log(f"wrote {out / 'model.npz'}, {out / 'metrics.json'}")
        return result


def _load_checkpoint(path: Path, model: nn.Module, opt: nn.Optimizer, sched, comm: LocalComm) -> dict:
    """Rank 0 reads the checkpoint (other ranks need no shared filesystem)
    and hands the optimizer and schedule state to the rest; DataParallel
    then broadcasts the weights."""
    header = None
    if comm.rank == 0:
        header = nn.serialize.load_checkpoint(path, model, opt, sched)
    header, opt_state, sched_state = comm.bcast_obj(
        (header, opt.state_dict(), None if sched is None else sched.state_dict()) if comm.rank == 0 else None,
        0, "the checkpoint")
    if comm.rank != 0:
        opt.load_state_dict(opt_state)
        if sched is not None:
            sched.load_state_dict(sched_state)
    for k in ("epoch", "history", "best"):
        if k not in header:
            raise ValueError(f"{path} is not a convkern train checkpoint ({k!r} missing)")
    return header


def _epoch(cfg: TrainConfig, epoch: int, net: nn.Module, model: nn.Module, opt: nn.Optimizer, crit, train: Dataset,
           norm: "Normalise", dtype, sampler, comm: LocalComm, log) -> Dict[str, float]:
    """One epoch over this rank's shard; the counts are summed over ranks."""
    model.train()
    sampler.set_epoch(epoch)
    idx = sampler.indices()
    rng = np.random.default_rng([cfg.seed, epoch, comm.rank])  # augmentation: a function of the epoch
    _reseed_dropout(model, [cfg.seed, epoch, comm.rank, 1])
    lr = opt.lr
    counts = np.zeros(3, np.float64)  # loss sum, correct, seen
    t0 = time.perf_counter()
    bar = _progress(len(idx) * comm.size, f"epoch {epoch}/{cfg.epochs}", cfg.progress and comm.rank == 0)
    for i in range(0, len(idx), cfg.batch_size):
        b = idx[i:i + cfg.batch_size]
        yb = train.labels[b]
        xb = _device_array(norm(cfg.augment(train.images[b], rng)), cfg.device, dtype)
        opt.zero_grad()
        logits = net(xb)
        loss = float(crit(logits, _device_array(yb, cfg.device, np.int64)))
        net.backward(crit.backward(), need_input_grad=False)
        opt.step()
        counts += (loss * len(yb), int((to_numpy(logits).argmax(axis=1) == yb).sum()), len(yb))
        bar.update(len(yb) * comm.size)
        bar.set_postfix(loss=f"{counts[0] / counts[2]:.4f}", acc=f"{counts[1] / counts[2]:.4f}",
                        img_s=f"{counts[2] * comm.size / (time.perf_counter() - t0):.0f}")
    bar.close()
    comm.allreduce_(counts, "the epoch's training counts")
    train_time = time.perf_counter() - t0
    return dict(epoch=epoch, lr=lr, train_loss=counts[0] / counts[2], train_accuracy=counts[1] / counts[2],
                images_per_s=counts[2] / train_time, epoch_seconds=train_time)


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
