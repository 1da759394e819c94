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


def read(path) -> Tuple[dict, dict]:
    """(header, state dict) of a model file, with clear errors for anything else."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist")
    try:
        z = np.load(path, allow_pickle=False)
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
        except (UnicodeDecodeError, json.JSONDecodeError, zipfile.BadZipFile, ValueError, OSError) as exc:
            raise ValueError(f"{path}: the model file is corrupt: {exc}") from exc
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError(f"{path} is not a convkern model file (format {header.get('format')!r})")
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
    first = next(iter(state.values()), None)
    dt = dtype or (first.dtype if first is not None else np.float32)
    model = build(arch, shape, classes, dtype=dt, **header.get("arch_kwargs", {}))
    try:
        model.load_state_dict(state)
    except ValueError as exc:
        raise ValueError(f"{path} does not match architecture {arch!r}: {exc}") from exc
    return model.eval(), header
