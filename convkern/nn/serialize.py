"""Model files: a NumPy .npz holding the state dict under PyTorch's key names,
plus a JSON header (format name and version, architecture, input shape,
classes). Loaded with allow_pickle=False: a model file cannot run code."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np

from .models import build
from .module import Module

FORMAT = "convkern-model"
VERSION = 1
_HEADER = "__convkern__"
_EXTRA = "extra/"


def save(path, model: Module, meta: Optional[dict] = None, extra: Optional[Dict[str, np.ndarray]] = None) -> Path:
    """Write the model's parameters and `meta` (JSON-serialisable; `arch`,
    `input_shape` and `num_classes` let load_model rebuild it) to `path`;
    `extra` arrays (a checkpoint's optimizer state) go beside them."""
    header = dict(meta or {}, format=FORMAT, version=VERSION)
    arrays = {f"param/{k}": v for k, v in model.state_dict().items()}
    arrays.update({f"{_EXTRA}{k}": v for k, v in (extra or {}).items()})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:  # write then rename: an interrupted save never leaves half a file
        np.savez(f, **arrays, **{_HEADER: np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)})
    tmp.replace(path)
    return path


def _read_members(path: Path, f) -> Tuple[object, dict]:
    try:
        z = np.load(f, allow_pickle=False)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise ValueError(f"{path} is not a readable .npz model file: {exc}") from exc
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise ValueError(f"{path} is not a readable .npz model file: it holds a single .npy array")
    with z:
        if _HEADER not in z.files:
            raise ValueError(f"{path} is not a convkern model file (no {_HEADER} header)")
        try:
            header = json.loads(bytes(z[_HEADER]).decode())
            state = {k[len("param/"):]: z[k] for k in z.files if k.startswith("param/")}
            state.update({k: z[k] for k in z.files if k.startswith(_EXTRA)})
        except MemoryError as exc:  # a member declaring an absurd shape
            raise ValueError(f"{path}: the model file declares arrays too large to load") from exc
        except (UnicodeDecodeError, json.JSONDecodeError, zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
            raise ValueError(f"{path}: the model file is corrupt: {exc}") from exc
    return header, state


def read(path) -> Tuple[dict, dict]:
    """(header, state dict) of a model file, with clear errors for anything else."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist")
    with open(path, "rb") as f:  # ours to close, whatever np.load makes of the bytes
        header, state = _read_members(path, f)
    for k, v in state.items():
        if v.dtype.kind != "f" or v.dtype.itemsize not in (4, 8):
            raise ValueError(f"{path}: parameter {k} has dtype {v.dtype}; model files hold float32/float64")
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        got = header.get("format") if isinstance(header, dict) else type(header).__name__
        raise ValueError(f"{path} is not a convkern model file (format {got!r})")
    if header.get("version") != VERSION:
        raise ValueError(f"{path} has model format version {header.get('version')}; this convkern reads "
                         f"version {VERSION}")
    return header, {k: v for k, v in state.items() if not k.startswith(_EXTRA)}


def save_checkpoint(path, model: Module, optimizer, schedule=None, meta: Optional[dict] = None) -> Path:
    """A model file that also holds the optimizer's state (momentum buffers,
    Adam moments, step counts, lr) and the schedule's epoch: everything
    load_checkpoint needs to continue training where it stopped. It is still
    a model file (load_model reads it). Written to a temporary file and
    renamed, so a crash never leaves a truncated checkpoint."""
    sd = optimizer.state_dict()
    arrays, scalars = {}, {}
    for i, st in sd["state"].items():
        for k, v in st.items():
            if hasattr(v, "shape"):
                arrays[f"optim/{i}/{k}"] = _host(v)
            else:
                scalars[f"{i}/{k}"] = v
    header = dict(meta or {}, optimizer={"type": type(optimizer).__name__, "lr": sd["lr"],
                                         "initial_lr": sd["initial_lr"], "scalars": scalars},
                  schedule=None if schedule is None else schedule.state_dict())
    return save(path, model, header, arrays)


def load_checkpoint(path, model: Module, optimizer, schedule=None) -> dict:
    """Restore a save_checkpoint file into `model`, `optimizer` (of the same
    type) and `schedule`; returns the header."""
    path = Path(path)
    header = load_into(model, path)
    opt = header.get("optimizer")
    if not isinstance(opt, dict):
        raise ValueError(f"{path} is a model file without optimizer state, not a checkpoint")
    if opt.get("type") != type(optimizer).__name__:
        raise ValueError(f"{path} holds {opt.get('type')} state; the optimizer is {type(optimizer).__name__}")
    with open(path, "rb") as f:
        _, members = _read_members(path, f)
    state: Dict[int, dict] = {}
    for k, v in members.items():
        if k.startswith(_EXTRA + "optim/"):
            i, name = k[len(_EXTRA + "optim/"):].split("/", 1)
            state.setdefault(int(i), {})[name] = v
    for k, v in opt.get("scalars", {}).items():
        i, name = k.split("/", 1)
        state.setdefault(int(i), {})[name] = v
    optimizer.load_state_dict({"lr": opt["lr"], "initial_lr": opt["initial_lr"], "state": state})
    if schedule is not None and header.get("schedule") is not None:
        schedule.load_state_dict(header["schedule"])
    return header


def _host(a) -> np.ndarray:
    return a.get() if hasattr(a, "get") and hasattr(a, "__cuda_array_interface__") else np.asarray(a)


def load_into(model: Module, path) -> dict:
    """Load a model file's weights into `model` (shapes and names must match);
    returns the header."""
    header, state = read(path)
    try:
        model.load_state_dict(state)
    except ValueError as exc:
        raise ValueError(f"{path} does not match the model: {exc}") from exc
    return header


def load_model(path, dtype=None) -> Tuple[Module, dict]:
    """Rebuild the architecture named in the file and load its weights;
    returns (model in eval mode, header)."""
    header, state = read(path)
    try:
        arch, shape, classes = header["arch"], header["input_shape"], header["num_classes"]
    except KeyError as exc:
        raise ValueError(f"{path} does not say its architecture ({exc.args[0]} missing); build the model "
                         "yourself and use load_into") from exc
    arch_kwargs = header.get("arch_kwargs", {})
    if not (isinstance(arch, str) and isinstance(shape, list) and len(shape) == 3
            and all(isinstance(v, int) and 0 < v <= 1 << 16 for v in shape)
            and isinstance(classes, int) and 2 <= classes <= 1 << 20 and isinstance(arch_kwargs, dict)):
        raise ValueError(f"{path}: malformed architecture in the header (arch {arch!r}, input_shape {shape!r}, "
                         f"num_classes {classes!r})")
    first = next(iter(state.values()), None)
    dt = dtype or (first.dtype if first is not None else np.float32)
    try:
        model = build(arch, shape, classes, dtype=dt, **arch_kwargs)
    except TypeError as exc:
        raise ValueError(f"{path}: the header's arch_kwargs do not fit {arch!r}: {exc}") from exc
    try:
        model.load_state_dict(state)
    except ValueError as exc:
        raise ValueError(f"{path} does not match architecture {arch!r}: {exc}") from exc
    return model.eval(), header
