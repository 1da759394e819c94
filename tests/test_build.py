"""The build itself: the compiled modules import, SIMD dispatch and threads work."""

import os
import subprocess
import sys

import numpy as np
import pytest

import convkern
from convkern.backend import cpp

from helpers import assert_close, randn

LEVELS = ["scalar", "avx2", "avx512"]


def test_cpp_backend_is_built():
    # A missing extension would silently leave only the reference backend; the
    # suite must fail loudly instead.
    ok, reason = cpp.available()
    assert ok, reason


def test_cuda_module_imports_without_gpu():
    from convkern.cli import cuda_status

    status = cuda_status()
    if status["module"]:
        from convkern import _cuda

        n = _cuda.device_count()
        assert n >= 0
        if n == 0:
            assert status["reason"], "no device, but no reason given"
            with pytest.raises(RuntimeError, match="no CUDA device"):
                _cuda.selftest(10)
        else:
            assert _cuda.selftest(1000) == list(range(1000))
    else:
        assert "not built" in status["reason"] or "not importable" in status["reason"]


def supported_levels():
    best = cpp._cpu.build_info()["simd_best"]
    return LEVELS[: LEVELS.index(best) + 1]


@pytest.mark.parametrize("level", LEVELS)
def test_every_simd_level_matches_reference(level, rng):
    if level not in supported_levels():
        pytest.skip(f"this CPU does not support {level}")
    before = convkern.simd_level()
    convkern.set_simd_level(level)
    try:
        assert convkern.simd_level() == level
        for dtype in (np.float32, np.float64):
            # sizes straddling the GEMM tiles (MR=6, NR=2*lanes)
            x = randn(rng, (2, 7, 13, 11), dtype)
            w = randn(rng, (33, 7, 3, 2), dtype)
            b = randn(rng, (33,), dtype)
            ref = convkern.conv2d(x, w, b, padding=(1, 2), backend="reference")
            for algo in ("direct", "im2col"):
                out = convkern.conv2d(x, w, b, padding=(1, 2), algo=algo, backend="cpp")
                assert_close(out, ref, dtype, f"{level} {algo}")
                gy = randn(rng, ref.shape, dtype)
                got = convkern.conv2d_backward(gy, x, w, padding=(1, 2), algo=algo, backend="cpp")
                want = convkern.conv2d_backward(gy, x, w, padding=(1, 2), backend="reference")
                for name, o, r in zip(("input", "weight", "bias"), got, want):
                    assert_close(o, r, dtype, f"{level} {algo} grad {name}")
            p = convkern.max_pool2d(x, 3, 2, 1, backend="cpp")
            assert_close(p, convkern.max_pool2d(x, 3, 2, 1, backend="reference"), dtype, f"{level} max_pool2d")
            y = convkern.relu(x, backend="cpp")
            assert_close(y, convkern.relu(x, backend="reference"), dtype, f"{level} relu")
    finally:
        convkern.set_simd_level(before)


def test_unsupported_simd_level_is_an_error():
    with pytest.raises(ValueError, match="SIMD level"):
        convkern.set_simd_level("sse9")
    if "avx512" not in supported_levels():
        with pytest.raises(ValueError, match="not supported"):
            convkern.set_simd_level("avx512")


def _run(code: str, cwd, **env) -> subprocess.CompletedProcess:
    # cwd away from the checkout: its convkern/ source folder (no compiled
    # modules) would shadow the installed package
    e = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e, timeout=120,
                          cwd=cwd)


def test_simd_environment_switch(tmp_path):
    r = _run("import convkern; print(convkern.simd_level())", tmp_path, CONVKERN_SIMD="scalar")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "scalar"
    r = _run("import convkern, numpy as np; convkern.relu(np.ones(3, np.float32))", tmp_path,
             CONVKERN_SIMD="bogus")
    assert r.returncode != 0 and "CONVKERN_SIMD" in r.stderr


def test_omp_num_threads_and_set_num_threads(tmp_path):
    r = _run("import convkern; print(convkern.get_num_threads())", tmp_path, OMP_NUM_THREADS="1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "1"
    before = convkern.get_num_threads()
    try:
        convkern.set_num_threads(3)
        assert convkern.get_num_threads() == 3
    finally:
        convkern.set_num_threads(0)
    assert convkern.get_num_threads() == before


@pytest.mark.parametrize("algo", ["direct", "im2col"])
def test_results_do_not_depend_on_thread_count(algo, rng):
    x = randn(rng, (3, 8, 17, 15), np.float32)
    w = randn(rng, (12, 4, 3, 3), np.float32)
    gy = randn(rng, (3, 12, 17, 15), np.float32)
    gp = randn(rng, (3, 8, 9, 8), np.float32)
    outs = []
    for n in (1, 2, 3):
        convkern.set_num_threads(n)
        try:
            y = convkern.conv2d(x, w, padding=1, groups=2, algo=algo, backend="cpp")
            grads = convkern.conv2d_backward(gy, x, w, padding=1, groups=2, algo=algo, backend="cpp")
            _, ind = convkern.max_pool2d(x, 3, 2, 1, return_indices=True, backend="cpp")
            gmax = convkern.max_pool2d_backward(gp, x, ind, 3, 2, 1, backend="cpp")
            gavg = convkern.avg_pool2d_backward(gp, x, 3, 2, 1, backend="cpp")
            outs.append((y, *grads, gmax, gavg))
        finally:
            convkern.set_num_threads(0)
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert np.array_equal(a, b), "result changed with the thread count"


def test_concurrent_calls_from_python_threads(rng):
    # the GIL is released in the kernels and workspaces are per calling thread:
    # simultaneous calls must not disturb each other
    from concurrent.futures import ThreadPoolExecutor

    problems = []
    for i in range(8):
        x = randn(rng, (2, 4 + i, 11 + i, 9), np.float32)
        w = randn(rng, (6, 4 + i, 3, 3), np.float32)
        problems.append((x, w, "im2col" if i % 2 else "direct"))
    expected = [convkern.conv2d(x, w, padding=1, algo=a, backend="cpp") for x, w, a in problems]

    def run(i):
        x, w, a = problems[i % len(problems)]
        return i % len(problems), convkern.conv2d(x, w, padding=1, algo=a, backend="cpp")

    with ThreadPoolExecutor(max_workers=4) as pool:
        for i, out in pool.map(run, range(64)):
            assert np.array_equal(out, expected[i]), f"problem {i} changed under concurrency"


def test_flush_denormal_switch_reaches_every_thread_and_spares_numpy():
    import convkern as ck

    tiny = np.float32(1e-40)  # a float32 denormal
    x = np.full((4, 8, 6, 6), tiny, np.float32)  # planes spread over the OpenMP workers
    w = np.ones((8, 8, 1, 1), np.float32)
    before = ck.get_flush_denormal()
    try:
        ck.set_num_threads(2)
        assert ck.set_flush_denormal(False)
        exact = ck.conv2d(x, w, backend="cpp")
        np.testing.assert_array_equal(exact, np.float32(8) * tiny)  # IEEE: denormals kept
        assert ck.set_flush_denormal(True) and ck.get_flush_denormal()
        assert np.all(ck.conv2d(x, w, backend="cpp") == 0)  # flushed on every thread
        assert np.float32(tiny) * np.float32(1.0) == tiny  # NumPy around the call unaffected
        ck.set_flush_denormal(False)
        np.testing.assert_array_equal(ck.conv2d(x, w, backend="cpp"), exact)  # and back
    finally:
        ck.set_flush_denormal(before)
        ck.set_num_threads(0)
