"""Times the cuda backend's tiled GEMM in each of its tile shapes on a GPU, to
tune the rule that picks one (gemm_tile_for in cuda/gemm_tiled.cuh).

For each canonical layer: conv2d forward (implicit GEMM) and backward (grad
input on the im2col GEMM, grad weight on the split implicit GEMM), float32,
with the tile chosen automatically and then forced to each shape through
convkern._cuda.set_gemm_tile. Median milliseconds by CUDA events; the fastest
per row is starred. Every tile gives the same bits (tests/test_cuda_emu.py),
so only time differs.

    python3 tools/gemm_tiles.py [--batch 64] [--layers resnet_l1_3x3,vgg_3x3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys

TILES = {"auto": 0, "64x64": 1, "64x128": 2, "128x64": 3, "128x128": 4}


def main(argv=None) -> int:
    import numpy as np

    import convkern
    from convkern.perf.bench import gpu_median_time, median_time
    from convkern.perf.canonical import BY_NAME, CANONICAL

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--layers", default=",".join(layer.name for layer in CANONICAL if layer.groups == 1))
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--backend", default="cuda",
                        help="cuda, or the test suite's cuda-emu (CPU emulator: checks the script, times nothing real)")
    parser.add_argument("--json", help="write the times here")
    args = parser.parse_args(argv)

    names = [n for n in args.layers.split(",") if n]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        parser.error(f"unknown layers {unknown}; known: {sorted(BY_NAME)}")
    info = {b.name: b for b in convkern.backends()}.get(args.backend)
    if info is None or not info.available:
        print(f"backend {args.backend} is unavailable: {info.reason if info else 'not registered'}", file=sys.stderr)
        return 2
    backend = convkern.backend.get(args.backend)
    gpu = getattr(backend, "gpu_module", backend)  # the emulator wraps the cuda backend's module
    if getattr(gpu.cupy, "__name__", "") == "cupy":
        xp, timer = gpu.cupy, gpu_median_time
    else:  # the emulator: NumPy arrays in, host timing
        xp = np

        def timer(fn, reps):
            return median_time(fn, min_time=0, min_reps=reps, max_reps=reps)
    rng = np.random.default_rng(0)
    rows = []
    print(f"{'layer':<16} {'pass':<9}" + "".join(f"{t:>10}" for t in TILES) + f"   (ms, batch {args.batch})")
    try:
        for name in names:
            layer = BY_NAME[name]
            x_shape, w_shape = layer.shapes(args.batch)
            x = xp.asarray(rng.standard_normal(x_shape, dtype=np.float32))
            w = xp.asarray(rng.standard_normal(w_shape, dtype=np.float32))
            kw = dict(layer.kwargs(), algo="implicit", backend=args.backend)
            y = convkern.conv2d(x, w, **kw)
            gy = xp.asarray(rng.standard_normal(y.shape, dtype=np.float32))
            passes = {
                "forward": lambda: convkern.conv2d(x, w, **kw),
                "backward": lambda: convkern.conv2d_backward(gy, x, w, needs=(True, True, False), **kw),
            }
            for what, fn in passes.items():
                times = {}
                for tile, value in TILES.items():
                    gpu._cuda.set_gemm_tile(value)
                    times[tile] = timer(fn, reps=args.reps) * 1e3
                best = min(times, key=times.get)
                print(f"{name:<16} {what:<9}" +
                      "".join(f"{times[t]:>9.3f}{'*' if t == best else ' '}" for t in TILES))
                rows.append(dict(layer=name, batch=args.batch, pass_=what, ms=times))
    finally:
        gpu._cuda.set_gemm_tile(0)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
