"""The autotuner behind algo="auto" (convkern.tune): it measures the
algorithms that can run a problem once, remembers the fastest in memory and
in a per-machine cache file, never replaces a named algorithm, and its choice
gives that algorithm's own bits. (The rest of the suite runs with it off.)"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import convkern
from convkern import tune
from convkern.backend import cpp
from convkern.geometry import conv2d_geometry
from convkern.layout import to_channels_last
from helpers import assert_close, randn

X, W, KW = (2, 16, 12, 12), (16, 16, 3, 3), dict(padding=1)  # direct, im2col, shifted, winograd(4) all run it


@pytest.fixture
def tuning(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CONVKERN_TUNE", "on")
    tune.forget()
    before = dict(tune._stats)
    yield tmp_path
    tune.forget()
    tune._stats.update(before)


def open_text(path):
    with open(path) as f:
        return f.read()


def _counts():
    return tune._stats["measured"], tune._stats["remembered"]


def _pin_layout(g, choice, needs=(True, True, True)):
    """Adopt a choice for whether an NCHW problem runs through the NHWC kernels."""
    from convkern import functional as F

    tune.adopt({F._tune_key(cpp, "forward:nchw_via_nhwc", g, np.float32, None): choice,
                F._tune_key(cpp, "backward:nchw_via_nhwc", g, np.float32, needs): choice})


def test_auto_measures_once_then_remembers(tuning, rng):
    x, w = randn(rng, X, np.float32), randn(rng, W, np.float32)
    _pin_layout(conv2d_geometry(X, W, **KW), "nchw")  # the algorithms alone here; the layout has its own test
    m0, r0 = _counts()
    y = convkern.conv2d(x, w, **KW)
    chosen = cpp.last_algo()
    assert chosen in ("direct", "im2col", "shifted", "winograd", "winograd4") and _counts() == (m0 + 1, r0 + 1)
    y2 = convkern.conv2d(x, w, **KW)
    assert _counts() == (m0 + 1, r0 + 3) and cpp.last_algo() == chosen
    # the tuned result is the chosen algorithm's, bit for bit, and the reference's within float32 rounding
    np.testing.assert_array_equal(y, convkern.conv2d(x, w, **KW, algo=chosen))
    np.testing.assert_array_equal(y, y2)
    assert_close(y, convkern.conv2d(x, w, **KW, backend="reference"), np.float32, f"tuned {chosen}")
    gy = randn(rng, y.shape, np.float32)
    grads = convkern.conv2d_backward(gy, x, w, **KW)  # a pass of its own: measured separately
    assert _counts()[0] == m0 + 2
    for g, r in zip(grads, convkern.conv2d_backward(gy, x, w, **KW, backend="reference")):
        assert_close(g, r, np.float32, "tuned backward")


def test_backward_measures_the_rules_against_the_named_algorithms(tuning, rng, monkeypatch):
    """auto's backward takes weight-gradient routes no named algorithm does
    (implicit GEMM, NHWC, Winograd by its rules): "auto" is a candidate of
    the backward's measurement, and what it picks is what runs."""
    from convkern import functional as F

    seen = {}
    real = tune.choose

    def spy(key, candidates, run):
        seen[key.split("|")[1]] = list(candidates)
        return real(key, candidates, run)

    monkeypatch.setattr(F._tune, "choose", spy)
    x, w = randn(rng, X, np.float32), randn(rng, W, np.float32)
    _pin_layout(conv2d_geometry(X, W, **KW), "nchw")
    y = convkern.conv2d(x, w, **KW)
    gy = randn(rng, y.shape, np.float32)
    grads = convkern.conv2d_backward(gy, x, w, **KW, needs=(False, True, False))
    assert "auto" in seen["backward"] and "auto" not in seen["forward"], seen
    chosen = tune.remembered(F._tune_key(cpp, "backward", conv2d_geometry(X, W, **KW), np.float32,
                                         (False, True, False)))
    np.testing.assert_array_equal(grads[1], convkern.conv2d_backward(gy, x, w, **KW, needs=(False, True, False),
                                                                     algo=chosen)[1])


def test_an_nchw_problem_may_run_through_the_nhwc_kernels(tuning, rng):
    """Tuning also measures copying an NCHW conv to NHWC, running the NHWC
    kernels and copying back; chosen, the result is theirs bit for bit and
    NCHW-contiguous, and off means it is never taken."""
    x, w = randn(rng, X, np.float32), randn(rng, W, np.float32)
    g = conv2d_geometry(X, W, **KW)
    m0, _ = _counts()
    convkern.conv2d(x, w, **KW)
    assert _counts()[0] == m0 + 2  # the algorithm, then NCHW against NHWC
    tune.forget()
    _pin_layout(g, "nhwc")
    y = convkern.conv2d(x, w, **KW)
    assert y.flags.c_contiguous
    want = np.ascontiguousarray(cpp.conv2d_forward_nhwc(np.ascontiguousarray(x.transpose(0, 2, 3, 1)), w, None,
                                                        g).transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(y, want)
    gy = randn(rng, y.shape, np.float32)
    grads = convkern.conv2d_backward(gy, x, w, **KW)
    nhwc = cpp.conv2d_backward_nhwc(np.ascontiguousarray(gy.transpose(0, 2, 3, 1)),
                                    np.ascontiguousarray(x.transpose(0, 2, 3, 1)), w, g)
    assert grads[0].flags.c_contiguous
    np.testing.assert_array_equal(grads[0], nhwc[0].transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(grads[1], nhwc[1])
    for got, ref in zip(grads, convkern.conv2d_backward(gy, x, w, **KW, backend="reference")):
        assert_close(got, ref, np.float32, "through NHWC")
    with tune.forced("off"):
        np.testing.assert_array_equal(convkern.conv2d(x, w, **KW), convkern.conv2d(x, w, **KW, algo="auto"))
        cpp.conv2d_forward(x, w, None, g, "direct")  # anything that notes an algorithm
        convkern.conv2d(x, w, **KW)
        assert cpp.last_algo() != "direct"  # the NCHW rule ran, not the NHWC kernels (which note none)


def test_the_cache_file_serves_the_next_process(tuning, rng):
    x, w = randn(rng, X, np.float64), randn(rng, W, np.float64)
    convkern.conv2d(x, w, **KW)
    path = tune.cache_path()
    data = json.loads(open_text(path))
    assert data["format"] == tune.FORMAT and data["machine"] == tune.machine_key()
    # the algorithm, and whether the NCHW problem runs through the NHWC kernels
    assert sorted(k.split("|")[1] for k in data["choices"]) == ["forward", "forward:nchw_via_nhwc"]
    algo_chosen = next(v for k, v in data["choices"].items() if k.split("|")[1] == "forward")
    layout_chosen = next(v for k, v in data["choices"].items() if k.split("|")[1] != "forward")
    code = ("import numpy as np, convkern\nfrom convkern import tune\nfrom convkern.backend import cpp\n"
            f"x = np.random.default_rng(0).standard_normal({X}); w = np.ones({W})\n"
            f"convkern.conv2d(x, w, padding=1)\nprint(tune._stats['measured'], tune._stats['remembered'], "
            f"cpp.last_algo())\n")
    # cwd away from the checkout: its convkern/ has no compiled modules where the package is installed
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=str(tuning),
                         env=dict(os.environ, XDG_CACHE_HOME=str(tuning), CONVKERN_TUNE="on"))
    assert out.returncode == 0, out.stderr[-3000:]
    measured, remembered, algo = out.stdout.split()
    assert (measured, remembered) == ("0", "2"), out.stderr
    # what ran is what was chosen: the NCHW algorithm, or the NHWC kernels'
    # one (their GEMMs note "im2col"); this 3x3 problem has several, so the
    # layout choice names one
    assert layout_chosen == "nchw" or layout_chosen.startswith("nhwc:"), layout_chosen
    nhwc_algo = layout_chosen.partition(":")[2].replace("implicit", "im2col")
    assert algo == (algo_chosen if layout_chosen == "nchw" else nhwc_algo), layout_chosen


@pytest.mark.parametrize("content", ["{not json", json.dumps({"format": 1, "machine": {"cpu": "elsewhere"},
                                                              "choices": {"k": "im2col"}})])
def test_a_corrupt_or_foreign_cache_is_ignored_with_a_warning(tuning, rng, content):
    os.makedirs(os.path.dirname(tune.cache_path()), exist_ok=True)
    with open(tune.cache_path(), "w") as f:
        f.write(content)
    with pytest.warns(RuntimeWarning, match="ignoring the tuning cache"):
        convkern.conv2d(randn(rng, X, np.float32), randn(rng, W, np.float32), **KW)
    assert json.loads(open_text(tune.cache_path()))["machine"] == tune.machine_key()  # rewritten, valid


def test_off_means_the_rules_and_a_named_algorithm_is_never_replaced(tuning, rng, monkeypatch):
    x, w = randn(rng, X, np.float32), randn(rng, W, np.float32)
    m0, _ = _counts()
    convkern.conv2d(x, w, **KW, algo="im2col")
    assert cpp.last_algo() == "im2col" and _counts()[0] == m0
    monkeypatch.setenv("CONVKERN_TUNE", "off")
    convkern.conv2d(x, w, **KW)
    g = conv2d_geometry(X, W, None, **KW)
    assert cpp.last_algo() == cpp.choose_algo(g) and _counts()[0] == m0
    for bad in ("sometimes", ""):  # (set but empty is not unset)
        monkeypatch.setenv("CONVKERN_TUNE", bad)
        with pytest.raises(ValueError, match="CONVKERN_TUNE must be one of off, on, exhaustive"):
            convkern.conv2d(x, w, **KW)
    monkeypatch.delenv("CONVKERN_TUNE")
    assert convkern.tune.mode() == "on"


def test_exhaustive_and_forced_modes(tuning, rng):
    with tune.forced("exhaustive"):
        convkern.conv2d(randn(rng, X, np.float32), randn(rng, W, np.float32), **KW)
    assert tune.status()["choices"] == 2  # the algorithm, and NCHW against NHWC kernels
    with tune.forced("off"):
        m0, _ = _counts()
        convkern.conv2d(randn(rng, (1, 16, 9, 9), np.float32), randn(rng, W, np.float32), **KW)
        assert _counts()[0] == m0
    with pytest.raises(ValueError):
        with tune.forced("always"):
            pass


def test_convkern_tune_measures_ahead_of_use(tuning, tmp_path, capsys):
    from convkern import nn
    from convkern.cli import main

    assert main(["tune", "--no-gemm", "--layers", "mnist_conv1,resnet_l1_3x3", "--batch", "1"]) == 0
    # forward and backward each; resnet_l1_3x3 also NCHW against NHWC kernels (mnist_conv1 has one channel)
    assert "measured 6 problems, 0 already known" in capsys.readouterr().out
    assert main(["tune", "--no-gemm", "--layers", "mnist_conv1", "--batch", "1"]) == 0
    assert "measured 0 problems, 2 already known" in capsys.readouterr().out
    path = tmp_path / "m.npz"
    nn.save(path, nn.build("lenet", (1, 28, 28), 10, rng=0), meta={"arch": "lenet", "input_shape": [1, 28, 28],
                                                                  "num_classes": 10})
    assert main(["tune", "--no-gemm", "--model", str(path), "--batch", "2"]) == 0
    assert "measured 0 problems" not in capsys.readouterr().out  # its two convs at batch 2, forward and backward
    assert main(["tune", "--no-gemm", "--model", str(path), "--batch", "2"]) == 0
    assert "measured 0 problems" in capsys.readouterr().out
    assert main(["tune", "--layers", "nope"]) == 2


# ---- the GEMM blocking (convkern.blocking)

_BLOCKING_IN_CHILD = """
import json, warnings
warnings.simplefilter("always")
from convkern.backend import cpp
from convkern import tune
b = cpp._cpu.build_info()["gemm_blocking_f32"]
print(json.dumps({"blocking": [b["KC"], b["MC"], b["NC"]], "source": b["source"], "rows_KC": b["rows_KC"],
                  "key": tune.machine_key()["blocking"]["gemm"]}))
"""


def _child_blocking(tmp_path, **env):
    r = subprocess.run([sys.executable, "-c", _BLOCKING_IN_CHILD], capture_output=True, text=True, timeout=120,
                       cwd=tmp_path, env=dict(os.environ, XDG_CACHE_HOME=str(tmp_path), **env))
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1]), r.stderr


def test_measured_blocking_is_kept_and_applied_by_the_next_process(tuning):
    from convkern import blocking

    cands = blocking.candidates()
    assert cands["model"][0] < cands["KC x1.5"][0] < cands["KC x2"][0] < cands["KC x3"][0]
    kc, mc, nc = cands["model"]
    mr = blocking._cpu().build_info()["gemm_blocking_f32"]["MR"]
    # the model's KC and NC with its MC cut to whole register panels
    assert cands["MC /8"][0::2] == cands["MC /2"][0::2] == (kc, nc)
    assert cands["MC /2"][1] == max(mr, mc // 2 // mr * mr) and cands["MC /8"][1] == max(mr, mc // 8 // mr * mr)
    results = blocking.measure(cands, shapes=[(24, 300, 70), (12, 40, 33)], rounds=1, min_time=0.01,
                               layers=["mnist_conv2"])
    assert set(results) == set(cands) and all(r["gflops"] > 0 for r in results.values())
    assert all(set(r["per_shape"]) == {"24x300x70", "12x40x33", "mnist_conv2 channels_last"}
               for r in results.values())
    # whatever won, store a candidate other than the model's, to see it applied
    # (twice the best rate measured: a 10 ms timing of the model alone can read
    # under half of another candidate's)
    results["KC x2"]["gflops"] = 2 * max(r["gflops"] for r in results.values())
    assert blocking.pick(results) == "KC x2"
    path = blocking.save("KC x2", results)
    assert os.path.dirname(path) == os.path.dirname(tune.cache_path())
    want = list(cands["KC x2"])
    got, _ = _child_blocking(tuning, CONVKERN_TUNE="on")
    # algorithm choices are keyed by it, and the channels_last GEMM takes its KC
    assert got == {"blocking": want, "source": "convkern tune", "key": want, "rows_KC": min(512, want[0])}
    got, _ = _child_blocking(tuning, CONVKERN_TUNE="off")
    assert got["source"] == "caches" and got["key"] == "derived" and got["rows_KC"] == got["blocking"][0]
    got, _ = _child_blocking(tuning, CONVKERN_TUNE="on", CONVKERN_GEMM_BLOCKING="64,48,128")
    assert got["blocking"] == [64, 48, 128] and got["source"] == "CONVKERN_GEMM_BLOCKING" and got["rows_KC"] == 64
    got, _ = _child_blocking(tuning, CONVKERN_TUNE="on", CONVKERN_GEMM_BLOCKING="640,48,128")
    assert got["rows_KC"] == 512  # (the channels_last GEMM's row tables hold at most 512)


def test_the_model_blocking_stays_unless_beaten_by_the_margin():
    from convkern import blocking

    results = {"model": {"gflops": 100.0}, "KC x1.5": {"gflops": 101.5}, "KC x2": {"gflops": 90.0}}
    assert blocking.pick(results) == "model"
    results["KC x1.5"]["gflops"] = 103.0
    assert blocking.pick(results) == "KC x1.5"


@pytest.mark.parametrize("content", ["{not json", '{"format": 1, "machine": {}, "choices": {}}',
                                     '{"format": 1, "machine": "x", "choices": {"avx512|2": {"blocking": [0]}}}'])
def test_a_corrupt_or_foreign_blocking_file_is_ignored_with_a_warning(tuning, content):
    from convkern import blocking

    os.makedirs(os.path.dirname(blocking.path()), exist_ok=True)
    with open(blocking.path(), "w") as f:
        f.write(content)
    got, err = _child_blocking(tuning, CONVKERN_TUNE="on")
    assert got["source"] == "caches" and "ignoring the GEMM blocking file" in err


def test_a_blocking_arrives_too_late_once_a_kernel_ran():
    x = np.ones((4, 4), np.float32)
    cpp.gemm(x, x)
    before = cpp._cpu.build_info()["gemm_blocking_f32"]
    assert cpp._cpu.set_tuned_gemm_blocking(64, 48, 128) is False
    assert cpp._cpu.build_info()["gemm_blocking_f32"] == before
    with pytest.raises(ValueError, match="out of range"):
        cpp._cpu.set_tuned_gemm_blocking(4, 48, 128)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_weight_gradients_alone_of_a_strided_depthwise_conv(tuning, rng, layout):
    """A strided depthwise conv's weight gradient asked alone (a frozen
    input, or a network's first layer): every algorithm the tuner measures
    runs it, and the result is the reference's."""
    x, w = randn(rng, (2, 8, 11, 11), np.float32), randn(rng, (8, 1, 3, 3), np.float32)
    kw = dict(stride=2, padding=1, groups=8)
    gy = randn(rng, convkern.conv2d(x, w, **kw, backend="reference").shape, np.float32)
    ref = convkern.conv2d_backward(gy, x, w, **kw, backend="reference")
    if layout == "channels_last":
        x, gy = to_channels_last(x), to_channels_last(gy)
    for needs in ((False, True, False), (False, True, True)):
        got = convkern.conv2d_backward(gy, x, w, **kw, needs=needs)
        assert_close(got[1], ref[1], np.float32, f"{layout} {needs} grad weight")
        assert got[0] is None


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_tuned_convs_of_any_shape_match_the_reference(tuning, data):
    """With the tuner measuring, random conv problems (groups, depthwise,
    strides, dilation, padding, any gradients asked, NCHW or channels_last)
    give the reference's output and gradients: every candidate it times runs."""
    draw = data.draw
    groups = draw(st.sampled_from([1, 2, 0]))  # 0: depthwise
    per = draw(st.integers(1, 4))
    C = per * max(groups, 1)
    G = C if groups == 0 else groups
    K = G * draw(st.integers(1, 3))
    R, S = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    H = draw(st.integers(1, 10)) + dilation[0] * (R - 1)
    W = draw(st.integers(1, 10)) + dilation[1] * (S - 1)
    needs = draw(st.tuples(st.booleans(), st.booleans(), st.booleans()).filter(any))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = randn(rng, (draw(st.integers(1, 2)), C, H, W), np.float32)
    w, b = randn(rng, (K, C // G, R, S), np.float32), randn(rng, (K,), np.float32)
    kw = dict(stride=stride, padding=padding, dilation=dilation, groups=G)
    what = f"x{x.shape} w{w.shape} {kw} needs {needs}"
    want = convkern.conv2d(x, w, b, **kw, backend="reference")
    gy = randn(rng, want.shape, np.float32)
    ref = convkern.conv2d_backward(gy, x, w, **kw, needs=needs, backend="reference")
    if draw(st.booleans()):
        x, gy, what = to_channels_last(x), to_channels_last(gy), what + " channels_last"
    assert_close(convkern.conv2d(x, w, b, **kw), want, np.float32, what)
    for name, n, got, r in zip(("grad input", "grad weight", "grad bias"), needs,
                               convkern.conv2d_backward(gy, x, w, **kw, needs=needs), ref):
        if n:
            assert_close(got, r, np.float32, f"{what} {name}")
