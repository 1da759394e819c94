"""Bring your own kernel: a backend registered from outside convkern gets the
same verify check, bench rows and regression gate as the built-in ones."""

import importlib.metadata

import numpy as np
import pytest

import byo_backend
import convkern
from convkern import backend as registry
from convkern.perf import bench, gate
from convkern.perf.verify import verify


@pytest.fixture
def byo():
    convkern.register_backend("byo", byo_backend)
    yield "byo"
    registry._REGISTERED.pop("byo", None)
    registry._MODULES.pop("byo", None)
    registry._DEVICES.pop("byo", None)


def test_registered_backend_runs_its_ops_and_refuses_the_rest(byo):
    x = np.random.default_rng(0).standard_normal((1, 2, 5, 5))
    np.testing.assert_array_equal(convkern.relu(x, backend=byo), np.maximum(x, 0))
    assert "byo" in [b.name for b in convkern.backends()]
    with pytest.raises(convkern.UnsupportedOpError, match="byo.*max_pool2d_forward"):
        convkern.max_pool2d(x, 2, backend=byo)
    # never picked automatically
    assert registry.select("cpu").NAME == "cpp"


def test_verify_checks_what_it_implements(byo):
    results = verify([byo], count=3, seed=1)
    by_op = {(r.op, r.dtype): r for r in results}
    assert by_op[("conv2d[direct]", "float32")].passed and by_op[("conv2d[direct]", "float32")].cases == 3
    assert by_op[("relu", "float64")].passed
    assert by_op[("max_pool2d", "float32")].unsupported


def test_bench_has_rows_for_it(byo):
    report = bench.run(["conv2d", "relu"], ["cpp:im2col", "byo:direct"], ["mnist_conv1"], batch=1,
                       min_time=0.01, progress=False)
    impls = {(r["op"], r["impl"]) for r in report["results"]}
    assert ("conv2d", "byo:direct") in impls and ("relu", "byo") in impls
    assert "byo:direct" in bench.table(report)


def test_wallclock_gate_runs_on_it(byo):
    ratios = gate.time_ratios(["relu"], rounds=3, backend=byo)
    verdicts, _ = gate.compare_wallclock(ratios, ratios, 2.0)
    assert not any(v.failed for v in verdicts)


def test_entry_point_discovery(monkeypatch):
    ep = importlib.metadata.EntryPoint(name="byo_ep", value="byo_backend", group=registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda group=None: [ep] if group == registry.ENTRY_POINT_GROUP else [])
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    try:
        assert "byo_ep" in registry.names()
        x = np.array([-1.0, 2.0])
        np.testing.assert_array_equal(convkern.relu(x, backend="byo_ep"), [0.0, 2.0])
    finally:
        registry._MODULES.pop("byo_ep", None)
        registry._DEVICES.pop("byo_ep", None)


def test_register_rejects_bad_backends():
    with pytest.raises(ValueError, match="built in"):
        convkern.register_backend("cpp", byo_backend)
    with pytest.raises(ValueError, match="implements none"):
        convkern.register_backend("empty", object())


def test_bench_survives_a_bad_kernel(monkeypatch, tmp_path, byo):
    """A kernel that raises, one that disagrees and one over the per-call cap
    are recorded as such, untimed, and the run goes on: rows stream to the
    JSON-lines file as they finish."""
    def wrong(x):
        return np.maximum(x, 0) + 1.0

    def broken(*args, **kwargs):
        raise RuntimeError("launch failed")

    monkeypatch.setattr(byo_backend, "relu_forward", wrong)
    monkeypatch.setattr(byo_backend, "conv2d_forward", broken)
    rows = tmp_path / "rows.jsonl"
    report = bench.run(["conv2d", "relu"], ["cpp:im2col", "byo:direct", "numba:direct"], ["mnist_conv1"], batch=1,
                       min_time=0.01, progress=False, max_call_s=1e-9, jsonl=str(rows))
    check = {(r["op"], r["impl"]): r for r in report["results"]}
    assert check[("conv2d", "byo:direct")]["check"].startswith("ERROR RuntimeError: launch failed")
    assert check[("relu", "byo")]["check"].startswith("MISMATCH")
    assert check[("conv2d", "numba:direct")]["check"].startswith("OVER CAP")
    assert all(check[k]["ms"] is None for k in [("conv2d", "byo:direct"), ("relu", "byo"), ("conv2d", "numba:direct")])
    lines = rows.read_text().splitlines()
    assert len(lines) == 1 + len(report["results"])  # the machine first, then every row
    assert "MISMATCH" in bench.table(report)


def test_every_built_in_backend_fits_the_contract():
    from convkern.backend import contract

    for name in ("cpp", "numba", "reference", "cuda", "cupy", "cuda-emu", "cupy-emu"):
        info = registry.info(name)
        if not info.available:
            continue
        assert "conv2d_forward" in contract.check(name, registry.get(name)), name


def test_registering_a_function_that_does_not_fit_names_it():
    import types

    bad = types.SimpleNamespace(NAME="bad", conv2d_forward=lambda x, weight, g: x, relu_forward=lambda x: x)
    with pytest.raises(ValueError, match=r"backend 'bad': conv2d_forward\(x, weight, g\) does not match the contract "
                                         r"conv2d_forward\(x, weight, bias, g: ConvGeometry, algo: str, relu: bool = False\): "
                                         r"it must take 5 positional arguments"):
        convkern.register_backend("bad", bad)
    assert "bad" not in [b.name for b in convkern.backends()]
    extra_ok = types.SimpleNamespace(NAME="fine", relu_forward=lambda x, *, scale=1.0: x)
    convkern.register_backend("fine", extra_ok)
    registry._REGISTERED.pop("fine", None), registry._MODULES.pop("fine", None), registry._DEVICES.pop("fine", None)
