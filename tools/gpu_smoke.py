"""A few small convs, pools and relus on a GPU backend, with each tiled-GEMM
shape forced in turn, every result checked against the float64 reference.
Small on purpose: it is what runs under compute-sanitizer (memcheck,
racecheck) and with CUDA_LAUNCH_BLOCKING=1, where every launch is slow.
Exit status 1 on any mismatch or error.

    python3 tools/gpu_smoke.py [--backend cuda] [--tiles 0,1,2,3,4]
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

# (input, weight, kwargs): a GEMM tile edge (129 output channels), groups, stride with dilation, same padding
CONVS = [((2, 5, 9, 11), (129, 5, 3, 3), dict(padding=1)),
         ((1, 6, 8, 7), (6, 2, 3, 2), dict(stride=2, dilation=(1, 2), groups=3)),
         ((3, 4, 6, 6), (8, 4, 2, 2), dict(padding="same")),
         ((1, 8, 7, 7), (8, 1, 3, 3), dict(padding=1, groups=8))]
POOLS = [((2, 3, 9, 8), dict(kernel_size=3, stride=2, padding=1, ceil_mode=True)),
         ((1, 2, 7, 7), dict(kernel_size=2, dilation=2))]


def _algos(backend):
    return [a for a in ("direct", "im2col", "implicit") if a in getattr(backend, "ALGOS", ("direct", "im2col"))]


def main(argv=None) -> int:
    import convkern
    from convkern.perf.verify import relative_error

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="cuda")
    parser.add_argument("--tiles", default="0,1,2,3,4", help="tiles to force (0: automatic; 1-4 as set_gemm_tile)")
    parser.add_argument("--require", help="only check that these backends (comma-separated) are available; "
                        "exit 1 naming the reason of any that is not")
    args = parser.parse_args(argv)
    if args.require:
        infos = {b.name: b for b in convkern.backends()}
        missing = {n: (infos[n].reason if n in infos else "not registered") for n in args.require.split(",")
                   if n not in infos or not infos[n].available}
        for name, why in missing.items():
            print(f"backend {name} is NOT available: {why}", file=sys.stderr)
        if not missing:
            print(f"available: {args.require}")
        return 1 if missing else 0
    info = {b.name: b for b in convkern.backends()}.get(args.backend)
    if info is None or not info.available:
        print(f"backend {args.backend} is unavailable: {info.reason if info else 'not registered'}", file=sys.stderr)
        return 2
    backend = convkern.backend.get(args.backend)
    gpu = getattr(backend, "gpu_module", backend)
    real = getattr(gpu.cupy, "__name__", "") == "cupy"
    xp = gpu.cupy if real else np
    back = gpu.cupy.asnumpy if real else np.asarray
    rng = np.random.default_rng(0)
    failures = checks = 0
    tiles = getattr(gpu, "_cuda", None)  # the cuda backend's module; cupy's GEMM is cuBLAS: no tiles to force

    def set_tile(t):
        if tiles is not None:
            tiles.set_gemm_tile(t)

    def check(what, got, want, tol=1e-4):
        nonlocal failures, checks
        checks += 1
        err = relative_error(back(got), want)
        if not err <= tol:
            failures += 1
            print(f"FAIL {what}: relative error {err:.3g}")

    ref = dict(backend="reference")
    try:
        for tile in [int(t) for t in args.tiles.split(",")] if tiles is not None else [0]:
            set_tile(tile)
            for xs, ws, kw in CONVS:
                x, w = rng.standard_normal(xs).astype(np.float32), rng.standard_normal(ws).astype(np.float32)
                y_ref = convkern.conv2d(x, w, **kw, **ref)
                gy = rng.standard_normal(y_ref.shape).astype(np.float32)
                grads_ref = convkern.conv2d_backward(gy, x, w, **kw, needs=(True, True, True), **ref)
                dx, dw, dgy = xp.asarray(x), xp.asarray(w), xp.asarray(gy)
                for algo in _algos(backend):
                    what = f"tile {tile} conv {xs}x{ws} {kw} {algo}"
                    check(what + " forward", convkern.conv2d(dx, dw, **kw, algo=algo, backend=args.backend), y_ref)
                    got = convkern.conv2d_backward(dgy, dx, dw, **kw, needs=(True, True, True), algo=algo,
                                                   backend=args.backend)
                    for name, g, r in zip(("grad input", "grad weight", "grad bias"), got, grads_ref):
                        check(f"{what} {name}", g, r)
        set_tile(0)
        for xs, kw in POOLS:
            x = rng.standard_normal(xs).astype(np.float32)
            dx = xp.asarray(x)
            y_ref, ind_ref = convkern.max_pool2d(x, **kw, return_indices=True, **ref)
            y, ind = convkern.max_pool2d(dx, **kw, return_indices=True, backend=args.backend)
            check(f"max_pool2d {xs} {kw}", y, y_ref)
            gy = rng.standard_normal(y_ref.shape).astype(np.float32)
            check(f"max_pool2d_backward {xs} {kw}",
                  convkern.max_pool2d_backward(xp.asarray(gy), dx, ind, **kw, backend=args.backend),
                  convkern.max_pool2d_backward(gy, x, ind_ref, **kw, **ref))
            akw = {k: v for k, v in kw.items() if k != "dilation"}
            check(f"avg_pool2d {xs} {akw}", convkern.avg_pool2d(dx, **akw, backend=args.backend),
                  convkern.avg_pool2d(x, **akw, **ref))
            gya = rng.standard_normal(convkern.avg_pool2d(x, **akw, **ref).shape).astype(np.float32)
            check(f"avg_pool2d_backward {xs} {akw}",
                  convkern.avg_pool2d_backward(xp.asarray(gya), dx, **akw, backend=args.backend),
                  convkern.avg_pool2d_backward(gya, x, **akw, **ref))
        x = rng.standard_normal(1001).astype(np.float32)  # not a multiple of the vector width
        check("relu", convkern.relu(xp.asarray(x), backend=args.backend), np.maximum(x, 0))
        check("relu_backward", convkern.relu_backward(xp.asarray(x), xp.asarray(x), backend=args.backend),
              np.where(x > 0, x, 0))
    except Exception as exc:  # noqa: BLE001 - report, then fail
        print(f"ERROR {type(exc).__name__}: {exc}")
        failures += 1
    finally:
        set_tile(0)
    print(f"gpu_smoke {args.backend}: {checks - failures} of {checks} checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
