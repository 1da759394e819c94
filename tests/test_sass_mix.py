"""A gate on the GPU GEMM's code that runs without a GPU: the share of FFMAs
in the main loop of each tiled GEMM, read from the sm_90 SASS nvcc emits
(tools/sass_mix.py). The share bounds how much of the FP32 peak a loop can
issue at; a change that adds index arithmetic or shared-memory loads to the
loop lowers it and fails here. Floors: the shares measured when the loaders
walked k with pointers and mixed-radix counters (nvcc 13.0), less 0.03.
Raise them when a change earns it; lower one only with the reason in the
commit."""

from __future__ import annotations

import importlib.util
import os

import pytest

FLOORS = {  # (GEMM, tile): minimum FFMA share of its main loop, sm_90, float, 32-bit indices
    ("grad input (im2col)", "128x128"): 0.78, ("grad input (im2col)", "128x64"): 0.69,
    ("grad input (im2col)", "64x128"): 0.69, ("grad input (im2col)", "64x64"): 0.58,
    ("grad weight (implicit)", "128x128"): 0.56, ("grad weight (implicit)", "128x64"): 0.48,
    ("grad weight (implicit)", "64x128"): 0.42, ("grad weight (implicit)", "64x64"): 0.35,
    ("im2col forward", "128x128"): 0.76, ("im2col forward", "128x64"): 0.66,
    ("im2col forward", "64x128"): 0.66, ("im2col forward", "64x64"): 0.56,
    ("implicit forward", "128x128"): 0.63, ("implicit forward", "128x64"): 0.56,
    ("implicit forward", "64x128"): 0.49, ("implicit forward", "64x64"): 0.43,
    ("plain GEMM", "128x128"): 0.76, ("plain GEMM", "128x64"): 0.68,
    ("plain GEMM", "64x128"): 0.68, ("plain GEMM", "64x64"): 0.56,
}


def _tool():
    path = os.path.join(os.path.dirname(__file__), os.pardir, "tools", "sass_mix.py")
    spec = importlib.util.spec_from_file_location("sass_mix", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def mix():
    rows = _tool().measure("90")
    if rows is None:
        pytest.skip("needs nvcc and cuobjdump + nvdisasm (the test extra installs the latter two on Linux)")
    return {(role, tile): (total, ffma, share) for role, tile, total, ffma, lds, share in rows}


def test_every_gemm_is_measured(mix):
    assert set(mix) == set(FLOORS)
    for (role, tile), (total, ffma, share) in mix.items():
        bm, bn = (int(v) for v in tile.split("x"))
        assert ffma == bm * bn * 8 // 256, f"{role} {tile}: {ffma} FFMAs per 8-deep slice"


@pytest.mark.parametrize("key", sorted(FLOORS), ids=[f"{r}-{t}" for r, t in sorted(FLOORS)])
def test_ffma_share_of_the_main_loop(mix, key):
    total, ffma, share = mix[key]
    assert share >= FLOORS[key], (f"{key[0]} {key[1]}: FFMA share {share:.3f} < floor {FLOORS[key]} "
                                  f"({ffma} FFMAs in {total} instructions)")
