"""Regenerate torch_golden.npz: PyTorch's outputs and gradients for a fixed set
of random problems, so the test suite can compare with PyTorch without it.

    pip install torch==2.13.0   # CPU build
    python tests/golden/make_golden.py

The file holds, per case, the inputs, the keyword arguments (JSON) and torch's
results; everything is float64 except the float32 cases marked so.
"""

from __future__ import annotations

import json
import pathlib
import sys

import numpy as np
import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from convkern.geometry import conv2d_geometry  # noqa: E402
from convkern.perf.verify import random_conv_case, random_pool_case  # noqa: E402
from torch_cases import (avg_kwargs, avg_pool_reference, conv_kwargs, conv_reference, max_kwargs,  # noqa: E402
                         max_pool_reference, random_data, relu_reference)

CONV_CASES, POOL_CASES = 32, 24


def main() -> None:
    rng = np.random.default_rng(1122)
    out: dict = {}
    for i in range(CONV_CASES):
        dtype = np.float32 if i % 4 == 3 else np.float64
        case = random_conv_case(rng)
        kw = conv_kwargs(case)
        x = random_data(rng, case.x_shape, dtype)
        w = random_data(rng, case.w_shape, dtype)
        b = random_data(rng, (case.w_shape[0],), dtype) if case.bias else None
        gy = random_data(rng, conv2d_geometry(x.shape, w.shape, None, **kw).output_shape, dtype)
        y, gx, gw, gb = conv_reference(torch, x, w, b, gy, kw)
        p = f"conv/{i}/"
        out.update({p + "kwargs": np.array(json.dumps(kw)), p + "x": x, p + "w": w, p + "gy": gy, p + "y": y,
                    p + "gx": gx, p + "gw": gw})
        if b is not None:
            out.update({p + "b": b, p + "gb": gb})
    for i in range(POOL_CASES):
        dtype = np.float32 if i % 4 == 3 else np.float64
        pc = random_pool_case(rng, avg=False)
        kw = max_kwargs(pc)
        x = random_data(rng, pc.x_shape, dtype)
        shape = torch.nn.functional.max_pool2d(torch.from_numpy(x), **kw).shape
        gy = random_data(rng, tuple(shape), dtype)
        y, ind, gx = max_pool_reference(torch, x, gy, kw)
        p = f"max_pool/{i}/"
        out.update({p + "kwargs": np.array(json.dumps(kw)), p + "x": x, p + "gy": gy, p + "y": y, p + "ind": ind})
        if gx is not None:
            out[p + "gx"] = gx
        pc = random_pool_case(rng, avg=True)
        kw = avg_kwargs(pc)
        x = random_data(rng, pc.x_shape, dtype)
        shape = torch.nn.functional.avg_pool2d(torch.from_numpy(x), **kw).shape
        gy = random_data(rng, tuple(shape), dtype)
        y, gx = avg_pool_reference(torch, x, gy, kw)
        p = f"avg_pool/{i}/"
        out.update({p + "kwargs": np.array(json.dumps(kw)), p + "x": x, p + "gy": gy, p + "y": y, p + "gx": gx})
    x = random_data(rng, (3, 4, 5, 6), np.float64)
    x.flat[::4] = 0.0
    x.flat[1::13] = np.nan
    gy = random_data(rng, x.shape, np.float64)
    y, gx = relu_reference(torch, x, gy)
    out.update({"relu/x": x, "relu/gy": gy, "relu/y": y, "relu/gx": gx})
    out["meta/torch_version"] = np.array(torch.__version__)
    np.savez_compressed(HERE / "torch_golden.npz", **out)
    print(f"wrote {HERE / 'torch_golden.npz'} ({len(out)} arrays, torch {torch.__version__})")


if __name__ == "__main__":
    main()
