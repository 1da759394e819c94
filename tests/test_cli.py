"""The convkern command line: info, verify, bench and the old module names."""

import importlib
import subprocess
import sys

import pytest

from convkern import cli
from convkern._moved import MOVED


def test_info_reports_simd_threads_backends_and_cuda(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "SIMD:" in out and "threads:" in out
    assert "GEMM blocking (float32" in out and "micro-panels in L1d's ways" in out
    assert "caches: L1d " in out and "(read from this machine)" in out
    assert "cpp" in out and "reference" in out
    assert "CUDA:" in out


def test_verify_passes_and_prints_a_table(capsys):
    assert cli.main(["verify", "--count", "3", "--seed", "5"]) == 0
    out = capsys.readouterr().out
    assert "conv2d[im2col]" in out and "max_pool2d_backward" in out and "relu" in out
    assert "0 failed" in out


def test_verify_exits_nonzero_on_a_mismatch(monkeypatch, capsys):
    from convkern.backend import cpp

    real = cpp.relu_forward
    monkeypatch.setattr(cpp, "relu_forward", lambda x: real(x) * 1.001)
    assert cli.main(["verify", "--count", "2", "--seed", "1", "--backends", "cpp", "--dtypes", "float32"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_console_script_runs(tmp_path):
    r = subprocess.run([sys.executable, "-m", "convkern", "info"], capture_output=True, text=True, timeout=120,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "backends:" in r.stdout


def test_unknown_command_is_an_argparse_error():
    with pytest.raises(SystemExit) as e:
        cli.main(["frobnicate"])
    assert e.value.code == 2


def test_bench_prints_a_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = ["bench", "--ops", "conv2d,relu", "--layers", "mnist_conv1", "--batch", "1", "--backends", "cpp",
            "--min-time", "0.01", "--json", str(out), "--no-progress"]
    assert cli.main(args) == 0
    text = capsys.readouterr().out
    assert "ceilings measured now" in text and "cpp:im2col" in text and "cpp:direct" in text
    assert "machine: " in text and "GEMM blocking KC" in text and "(derived from the caches)" in text
    import json

    report = json.loads(out.read_text())
    assert report["ceilings"]["gemm_gflops"] > 0 and report["ceilings"]["copy_gbs"] > 0
    rows = {(r["op"], r["impl"]) for r in report["results"]}
    assert {("conv2d", "cpp:im2col"), ("conv2d", "cpp:direct"), ("relu", "cpp")} <= rows
    assert all(r["rate"] > 0 for r in report["results"])


def test_bench_plot(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (bench, train and test extras have it)")
    png = tmp_path / "bench.png"
    assert cli.main(["bench", "--layers", "mnist_conv1", "--batch", "1", "--backends", "cpp", "--min-time", "0.01",
                     "--plot", str(png), "--no-progress"]) == 0
    assert png.stat().st_size > 1000


def test_bench_backend_algo_pairs_select_exactly_those(tmp_path):
    out = tmp_path / "b.json"
    assert cli.main(["bench", "--layers", "mnist_conv1", "--batch", "1", "--backends", "cpp:im2col",
                     "--min-time", "0.01", "--json", str(out), "--no-progress"]) == 0
    import json

    impls = {r["impl"] for r in json.loads(out.read_text())["results"]}
    assert impls <= {"cpp:im2col", "torch", "torch:channels_last"} and "cpp:im2col" in impls


@pytest.mark.parametrize("argv, says", [
    (["--backends", "nosuch"], "unknown backend 'nosuch'"),
    (["--ops", "conv3d"], "unknown op 'conv3d'"),
])
def test_bench_refuses_bad_choices_before_timing(capsys, argv, says):
    assert cli.main(["bench", "--layers", "mnist_conv1", "--no-progress", *argv]) == 2
    assert says in capsys.readouterr().err


@pytest.mark.parametrize("old", sorted(MOVED))
def test_moved_modules_keep_their_old_names_for_a_release_with_a_warning(old):
    saved = sys.modules.pop(old, None)
    try:
        with pytest.warns(DeprecationWarning, match=f"{old} is now {MOVED[old]}"):
            module = importlib.import_module(old)
        assert module is importlib.import_module(MOVED[old])  # the same module, not a copy
    finally:
        sys.modules.pop(old, None)
        if saved is not None:
            sys.modules[old] = saved

def test_bench_gemm_rows_follow_the_layers():
    """The gemm op times each chosen layer's per-image im2col GEMM beside the
    fixed shapes, against NumPy's BLAS, every row checked."""
    from convkern.blocking import gemm_shapes
    from convkern.perf import bench

    report = bench.run(["gemm"], ["cpp"], ["mnist_conv2", "depthwise_3x3"], min_time=0.01, progress=False)
    rows = {(r["problem"], r["impl"]): r for r in report["results"]}
    layer_shapes = gemm_shapes(["mnist_conv2", "depthwise_3x3"])
    assert len(layer_shapes) == 2  # the depthwise layer runs no GEMM: mnist_conv2's and 2048^3
    for m, k, n in layer_shapes + list(bench.GEMM_SHAPES):
        for impl in ("cpp", "numpy"):
            row = rows[(f"{m}x{k}x{n}", impl)]
            assert row["ms"] > 0 and not row["check"].startswith(bench.FAILED), row
    assert len(report["results"]) == len(rows)
    with pytest.raises(ValueError, match="unknown layer 'nope'"):
        bench.run(["gemm"], ["cpp"], ["nope"], min_time=0.01, progress=False)


def test_bench_lets_openblas_threads_go_idle_after_numpy_gemm(monkeypatch):
    """NumPy's BLAS threads keep spinning after a call; the case timed next
    must not run beside them (it read up to 3x slower)."""
    import numpy as np

    from convkern.perf import bench

    events = []
    monkeypatch.setattr(bench.time, "sleep", lambda s: events.append(("sleep", s)))
    cases = bench.gemm_cases((8, 8, 8), ["cpp"], np.random.default_rng(0))
    assert cases["numpy"].settle_s >= 0.2 and cases["cpp"].settle_s == 0
    timed = {impl: bench.Case(c.op, c.problem, c.work, c.unit, (lambda impl=impl: events.append(impl)), c.output,
                              settle_s=c.settle_s) for impl, c in cases.items()}
    bench._interleaved_times(timed, min_time=0.0, rounds=2)
    assert events[0] == ("sleep", cases["numpy"].settle_s)  # after the checks' calls
    for i, e in enumerate(events):
        if e == "numpy" and i + 1 < len(events) and events[i + 1] != "numpy":
            assert events[i + 1] == ("sleep", cases["numpy"].settle_s), events
    assert events.count(("sleep", cases["numpy"].settle_s)) == 3
    if bench._backends.info("numba").available:  # its im2col multiplies through NumPy's BLAS
        conv = bench.conv_cases("mnist_conv1", 1, ["numba:im2col", "numba:direct", "cpp:im2col"], False,
                                np.random.default_rng(0))
        assert [conv[i].settle_s > 0 for i in ("numba:im2col", "numba:direct", "cpp:im2col")] == [True, False, False]


def test_bench_net_table_keeps_long_column_names_apart(monkeypatch):
    from convkern.perf import bench_net

    peers = ("torch NCHW", "convkern cpp", "convkern cpp channels_last")
    report = {"rounds": 3, "rows": [{"net": "mobilenet_v2", "batch": 8, "size": 112,
                                     "ms": {p: {"inference": 1.0 + i} for i, p in enumerate(peers)}}]}
    monkeypatch.setattr(bench_net, "_best_torch", lambda row, kind: 1.0)
    header = bench_net.table(report).splitlines()[3]
    assert header.split("  ")[-2:] == ["convkern cpp", "convkern cpp channels_last"]
