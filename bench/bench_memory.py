"""The memory-bound ops (max/avg pooling, relu; forward and backward) on the
ANCHORS tensor (8, 64, 112, 112) float32: time and GB/s (bytes read + written)
beside PyTorch CPU when installed, and NumPy's copy as the practical ceiling.

    python bench/bench_memory.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import convkern  # noqa: E402
from bench_conv import load_torch, median_time  # noqa: E402
from convkern.verify import relative_error  # noqa: E402


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="8,64,112,112")
    ap.add_argument("--min-time", type=float, default=1.0)
    args = ap.parse_args(argv)
    shape = tuple(int(v) for v in args.shape.split(","))
    torch = load_torch(convkern.get_num_threads())
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    n = x.nbytes
    pooled = (shape[0], shape[1], shape[2] // 2, shape[3] // 2)
    gp = rng.standard_normal(pooled).astype(np.float32)
    gy = rng.standard_normal(shape).astype(np.float32)
    _, ind = convkern.max_pool2d(x, 2, return_indices=True)
    q = n // 4  # a pooled tensor's bytes
    # (name, bytes moved, convkern call, torch call or None)
    rows: List[Tuple[str, int, Callable[[], object], Optional[Callable[[], object]]]] = [
        ("numpy copy", 2 * n, lambda: x.copy(), None),
        ("max_pool2d 2x2", n + q, lambda: convkern.max_pool2d(x, 2), None),
        ("max_pool2d 2x2 + indices", n + 3 * q, lambda: convkern.max_pool2d(x, 2, return_indices=True), None),
        ("max_pool2d_backward 2x2", 3 * q + n, lambda: convkern.max_pool2d_backward(gp, x, ind, 2), None),
        ("avg_pool2d 2x2", n + q, lambda: convkern.avg_pool2d(x, 2), None),
        ("avg_pool2d_backward 2x2", q + n, lambda: convkern.avg_pool2d_backward(gp, x, 2), None),
        ("relu", 2 * n, lambda: convkern.relu(x), None),
        ("relu_backward", 3 * n, lambda: convkern.relu_backward(gy, x), None),
    ]
    if torch:
        import torch.nn.functional as F

        tx, tgp, tgy, tind = (torch.from_numpy(a) for a in (x, gp, gy, ind))
        peers = {
            "max_pool2d 2x2": lambda: F.max_pool2d(tx, 2),
            "max_pool2d 2x2 + indices": lambda: F.max_pool2d(tx, 2, return_indices=True),
            "max_pool2d_backward 2x2": lambda: torch.ops.aten.max_pool2d_with_indices_backward(
                tgp, tx, [2, 2], [2, 2], [0, 0], [1, 1], False, tind),
            "avg_pool2d 2x2": lambda: F.avg_pool2d(tx, 2),
            "avg_pool2d_backward 2x2": lambda: torch.ops.aten.avg_pool2d_backward(
                tgp, tx, [2, 2], [2, 2], [0, 0], False, True, None),
            "relu": lambda: torch.relu(tx),
            "relu_backward": lambda: torch.ops.aten.threshold_backward(tgy, tx, 0),
        }
        rows = [(name, b, fn, peers.get(name)) for name, b, fn, _ in rows]
        for name, _, fn, peer in rows:  # validate, then time
            if peer is not None:
                ours, theirs = fn(), peer()
                ours = ours[0] if isinstance(ours, tuple) else ours
                theirs = (theirs[0] if isinstance(theirs, tuple) else theirs).numpy()
                err = relative_error(ours, theirs)
                if not err <= 1e-6:
                    print(f"{name}: disagrees with torch (relative error {err:.3g}); not timing")
                    return 1
    print(f"tensor {shape} float32 ({n / 1e6:.1f} MB), {convkern.get_num_threads()} threads, "
          f"SIMD {convkern.simd_level()}" + (f"; torch {torch.__version__}" if torch else ""))
    print(f"{'op':<28} {'ms':>8} {'GB/s':>7} {'% copy':>7}" + (f" {'torch ms':>9} {'GB/s':>7} {'speedup':>8}"
                                                              if torch else ""))
    copy_gbs = None
    for name, nbytes, fn, peer in rows:
        t = median_time(fn, args.min_time)
        gbs = nbytes / t / 1e9
        copy_gbs = copy_gbs or gbs
        line = f"{name:<28} {t * 1e3:>8.3f} {gbs:>7.1f} {100 * gbs / copy_gbs:>6.0f}%"
        if torch and peer is not None:
            tt = median_time(peer, args.min_time)
            line += f" {tt * 1e3:>9.3f} {nbytes / tt / 1e9:>7.1f} {tt / t:>7.2f}x"
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
