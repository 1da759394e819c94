"""Model files: a NumPy .npz holding the state dict under PyTorch's key names,
plus a JSON header (format name and version, architecture, input shape,
classes). Loaded with allow_pickle=False: a model file cannot run code."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from .models import build
from .module import Module

FORMAT = "convkern-model"
VERSION = 1
_HEADER = "__convkern__"


def save(path, model: Module, meta: Optional[dict] = None) -> Path:
    """Write the model's parameters and `meta` (JSON-serialisable; `arch`,
    `input_shape` and `num_classes` let load_model rebuild it) to `path`."""
    header = dict(meta or {}, format=FORMAT, version=VERSION)
    arrays = {f"param/{k}": v for k, v in model.state_dict().items()}
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
    return header, state


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
