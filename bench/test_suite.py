"""The pytest-benchmark suite: op x backend x algorithm x canonical layer
(float32), each case validated before it is timed, with GFLOP/s or GB/s and
the share of the machine's ceiling in extra_info.

    pytest bench/ --benchmark-only -k "resnet_l1 or relu" --benchmark-json out.json
"""

import functools

import numpy as np
import pytest

from convkern.perf import bench
from convkern.perf.canonical import CANONICAL

IMPLS = bench.default_impls()
PEERS = IMPLS + ["torch"]
BATCH = 8


@functools.lru_cache(maxsize=None)
def ceilings():
    return bench.measure_ceilings(min_time=0.3)


@functools.lru_cache(maxsize=None)
def validated(op: str, problem: str):
    """The cases of one (op, problem), checked once against torch or the reference."""
    rng = np.random.default_rng(0)
    if op.startswith("conv2d"):
        cases = bench.conv_cases(problem, BATCH, IMPLS + ["reference:direct"], op == "conv2d_backward", rng)
        truth = "torch" if "torch" in cases else "reference:direct"
        if truth != "reference:direct":
            del cases["reference:direct"]
    else:
        cases = bench.memory_cases(op, IMPLS, (BATCH,) + bench.MEMORY_SHAPE[1:], rng)
        truth = "torch" if "torch" in cases else None
    bench._validate(cases, truth)
    return cases


def _time(benchmark, case):
    benchmark.pedantic(case.run, rounds=5, iterations=1, warmup_rounds=1)
    rate = case.work / benchmark.stats.stats.median / 1e9
    ceiling = ceilings()["gemm_gflops" if case.unit == "GFLOP/s" else "copy_gbs"]
    benchmark.extra_info.update(rate=rate, unit=case.unit, ceiling_pct=100 * rate / ceiling)


@pytest.mark.parametrize("impl", PEERS)
@pytest.mark.parametrize("op", ["conv2d", "conv2d_backward"])
@pytest.mark.parametrize("layer", [layer.name for layer in CANONICAL])
def test_conv(benchmark, layer, op, impl):
    cases = validated(op, layer)
    if impl not in cases:
        pytest.skip(f"{impl} not available here")
    _time(benchmark, cases[impl])


@pytest.mark.parametrize("impl", list(dict.fromkeys(i.split(":")[0] for i in IMPLS)) + ["torch"])
@pytest.mark.parametrize("op", ["max_pool2d", "max_pool2d_backward", "avg_pool2d", "avg_pool2d_backward", "relu",
                                "relu_backward"])
def test_memory_bound(benchmark, op, impl):
    cases = validated(op, "memory")
    if impl not in cases:
        pytest.skip(f"{impl} not available here")
    _time(benchmark, cases[impl])
