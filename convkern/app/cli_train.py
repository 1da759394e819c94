"""`convkern train`, `convkern predict` and `convkern featuremaps`."""

from __future__ import annotations

import argparse
import sys

from ..data import Augment
from ..distributed.comm import DistributedError, world
from ..nn import ARCHITECTURES
from .train import DATASETS, OPTIMIZERS, SCHEDULES, TrainConfig


def add_parsers(sub) -> None:
    d = TrainConfig()
    p = sub.add_parser("train", help="train a CNN (default: LeNet-like on the built-in shapes dataset)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=d.data, help=f"one of: {DATASETS}")
    p.add_argument("--arch", default=d.arch, choices=sorted(ARCHITECTURES))
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: 0.05 for sgd, 1e-3 for adam/w)")
    p.add_argument("--optimizer", default=d.optimizer, choices=OPTIMIZERS)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--schedule", default=d.schedule, choices=SCHEDULES)
    p.add_argument("--label-smoothing", type=float, default=d.label_smoothing)
    p.add_argument("--backend", default=None, help="kernel backend (default: the best available)")
    p.add_argument("--device", default=d.device, choices=("cpu", "cuda"), help="cuda trains on CuPy arrays")
    p.add_argument("--dtype", default=d.dtype, choices=("float32", "float64"))
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", default=d.out, help="directory for model.npz, last.npz, metrics.json and plots")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction)
    p.add_argument("--shapes-train", type=int, default=d.shapes_train, help="training images of the shapes set")
    p.add_argument("--image-size", type=int, default=d.image_size, help="shapes and folder images: side in px")
    g = p.add_argument_group("augmentation (all off by default)")
    a = Augment()
    g.add_argument("--crop-padding", type=int, default=a.crop_padding)
    g.add_argument("--hflip", action="store_true")
    g.add_argument("--rotate", type=float, default=a.rotate, help="max degrees")
    g.add_argument("--brightness", type=float, default=a.brightness)
    g.add_argument("--contrast", type=float, default=a.contrast)
    g.add_argument("--noise", type=float, default=a.noise)
    g.add_argument("--cutout", type=int, default=a.cutout)
    p.add_argument("--no-flush-denormal", action="store_true",
                   help="keep denormal floats in the kernels (exact IEEE; slower once gradients get tiny)")
    p.add_argument("--no-progress", action="store_true")
    g = p.add_argument_group("runs across processes, and resuming")
    g.add_argument("--distributed", action="store_true",
                   help="be one rank of an MPI job: mpiexec -n 2 convkern train --distributed (batch size is "
                        "per rank; rank 0 writes the files)")
    g.add_argument("--dist-timeout", type=float, default=None,
                   help="seconds a rank may wait in a collective before aborting the job (default: "
                        "CONVKERN_DIST_TIMEOUT or 60)")
    g.add_argument("--stop-after", type=int, default=None, metavar="EPOCH",
                   help="stop after this epoch, keeping the checkpoint (continue with --resume)")
    g.add_argument("--resume", default=None, metavar="DIR",
                   help="continue the run in DIR from its last checkpoint, under the config saved there "
                        "(the flags above still apply; other training flags are ignored)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("predict", help="classify image files with a trained model")
    p.add_argument("model", help="model file written by convkern train (model.npz)")
    p.add_argument("images", nargs="+", help="PNG/JPEG files; resized and converted to the model's input")
    p.add_argument("--top", type=int, default=3, help="probabilities to show per image")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("featuremaps", help="draw every conv layer's feature maps for one image")
    p.add_argument("model")
    p.add_argument("image")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.set_defaults(func=cmd_featuremaps)


def cmd_train(args) -> int:
    from .train import fit

    cfg = TrainConfig(
        data=args.data, arch=args.arch, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        optimizer=args.optimizer, weight_decay=args.weight_decay, schedule=args.schedule,
        label_smoothing=args.label_smoothing, backend=args.backend, device=args.device, dtype=args.dtype,
        seed=args.seed, out=args.out, val_fraction=args.val_fraction, shapes_train=args.shapes_train,
        image_size=args.image_size, progress=not args.no_progress, flush_denormal=not args.no_flush_denormal,
        augment=Augment(args.crop_padding, args.hflip, args.rotate, args.brightness, args.contrast, args.noise,
                        args.cutout),
        distributed=args.distributed, dist_timeout=args.dist_timeout, stop_after=args.stop_after,
        resume=args.resume)
    try:
        result = fit(cfg)
    except (ValueError, FileNotFoundError, ImportError, DistributedError) as exc:
        comm = world()
        if comm.size > 1:  # the other ranks would wait for this one in their next collective
            comm.abort(f"convkern train: rank {comm.rank} of {comm.size}: {exc}", code=2)
        print(f"convkern train: {exc}", file=sys.stderr)
        return 2
    return 130 if result["interrupted"] else 0


def cmd_predict(args) -> int:
    from .inference import predict

    try:
        rows = predict(args.model, args.images)
    except (ValueError, FileNotFoundError, ImportError) as exc:
        print(f"convkern predict: {exc}", file=sys.stderr)
        return 2
    for path, cls, prob, classes in rows:
        top = prob.argsort()[::-1][:max(args.top, 1)]
        print(f"{path}: {cls}  (" + ", ".join(f"{classes[i]} {prob[i]:.4f}" for i in top) + ")")
    return 0


def cmd_featuremaps(args) -> int:
    from .inference import feature_maps

    try:
        from . import plots
        image, layers = feature_maps(args.model, args.image)
    except (ValueError, FileNotFoundError, ImportError) as exc:
        print(f"convkern featuremaps: {exc}", file=sys.stderr)
        return 2
    plots.feature_maps(image, layers, args.out)
    print(f"wrote {args.out}: " + ", ".join(f"{n} {m.shape[0]} maps" for n, m in layers))
    return 0
