"""Regenerate nn_golden.npz: PyTorch's logits, loss, gradients and parameters
after 3 optimizer steps for the small CNN of tests/nn_cases.py, so the
step-for-step test runs without torch.

    pip install torch==2.13.0   # CPU build
    python tests/golden/make_nn_golden.py
"""

from __future__ import annotations

import pathlib
import sys

import numpy as np
import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import nn_cases  # noqa: E402


def main() -> None:
    out = {}
    for dtype in (np.float64, np.float32):
        dt = np.dtype(dtype).name
        state = nn_cases.convkern_model(dtype).state_dict()
        out.update({f"{dt}/init/{k}": v for k, v in state.items()})
        for opt in nn_cases.OPTIMIZERS:
            res = nn_cases.run_torch(torch, dtype, opt, state)
            out.update({f"{dt}/{opt}/{k}": v for k, v in res.items()})
    np.savez_compressed(HERE / "nn_golden.npz", **out)
    print(f"wrote {len(out)} arrays with torch {torch.__version__}")


if __name__ == "__main__":
    main()
